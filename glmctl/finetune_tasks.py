"""Built-in fine-tuning tasks, made deterministically here (no download).

``numerals_zh``: write a number 0-999 in Chinese numerals, "写出 4 2 7：" -> "四百二十七". The digits
are spaced because the demo tokenizer merges digit groups into opaque pieces (" 100", "27"); one
digit per piece makes the task compositional, so numbers never seen in training can be done.
The 1000 numbers are split once by a fixed permutation into 800 train, 100 valid and 100 test
(disjoint). The test split ships as the evaluation task ``glmctl/tasks/numerals_zh.yaml`` (exact
match, greedy); ``write_task`` writes all three splits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from glmctl.artifacts import atomic_write_text

DIGITS = "零一二三四五六七八九"
SPLITS = {"train": 800, "valid": 100, "test": 100}
TASKS = ("numerals_zh",)


def chinese_numeral(n: int) -> str:
    """0-999 in Chinese numerals: 十五, 二十, 一百零七, 一百一十, 九百九十九."""
    if not 0 <= n <= 999:
        raise ValueError(f"{n} is outside 0-999")
    if n < 10:
        return DIGITS[n]
    if n < 20:
        return "十" + (DIGITS[n - 10] if n > 10 else "")
    if n < 100:
        return DIGITS[n // 10] + "十" + (DIGITS[n % 10] if n % 10 else "")
    rest = n % 100
    head = DIGITS[n // 100] + "百"
    if rest == 0:
        return head
    if rest < 10:
        return head + "零" + DIGITS[rest]
    return head + (DIGITS[rest // 10] + "十" + (DIGITS[rest % 10] if rest % 10 else ""))


def prompt(n: int) -> str:
    return f"写出 {' '.join(str(n))}："


def split_numbers() -> dict[str, list[int]]:
    """Disjoint train / valid / test numbers (a fixed permutation of 0-999)."""
    order = np.random.default_rng(20240518).permutation(1000).tolist()
    out, start = {}, 0
    for name, k in SPLITS.items():
        out[name] = order[start:start + k]
        start += k
    return out


def lines(split: str, glm_format: bool = False) -> list[str]:
    """The JSON lines of one split: {"prompt", "target"}, or GLM-130B's task format."""
    out = []
    for n in split_numbers()[split]:
        rec = ({"inputs_pretokenized": prompt(n), "targets_pretokenized": [chinese_numeral(n)]} if glm_format
               else {"prompt": prompt(n), "target": chinese_numeral(n)})
        out.append(json.dumps(rec, ensure_ascii=False))
    return out


def write_task(name: str, out: str | Path) -> dict[str, Path]:
    """train.jsonl, valid.jsonl, test.jsonl of task ``name`` in ``out``; returns their paths."""
    if name not in TASKS:
        raise ValueError(f"unknown built-in task {name!r}")
    out = Path(out)
    paths = {}
    for split in SPLITS:
        paths[split] = out / f"{split}.jsonl"
        atomic_write_text(paths[split], "\n".join(lines(split)) + "\n")
    return paths
