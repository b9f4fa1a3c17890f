"""Fine-tuning data: task examples read from JSON lines, laid out as GLM generates, packed into
training sequences (docs/finetune.md).

Accepted lines (``.jsonl`` or ``.jsonl.zst``):

    {"prompt": "写出 4 2 7：", "target": "四百二十七"}
    {"inputs_pretokenized": "...", "targets_pretokenized": ["..."]}     GLM-130B's task format (first target)

Layout of one example (docs/glm130b.md §4.2-4.3, the way ``glmctl generate`` / ``evaluate`` decode it):
the prompt with its mask ([gMASK] appended when it has no [MASK] / [sMASK] / [gMASK]), bidirectional;
then ``sop + target`` in, ``target + eop`` scored, causal. With [gMASK] the positions continue
0, 1, 2, ...; with [MASK] / [sMASK] every generated token sits at the mask's position. The loss is
on the target tokens (and eop) only.

Examples are packed side by side into ``seq_len``-token sequences (block-diagonal masks: an
example never sees another), in an order fixed by the seed; global training sample i is packed
sequence perm_e(i mod n) of epoch e = i div n (glmctl.data's keyed permutation), so batches are a
pure function of (seed, i) like pre-training's, whatever the number of processes.

A line that cannot be used is skipped and counted by reason (malformed JSON, missing field, a
prompt that does not fit the sequence, a target that is empty after tokenization); the first of
each reason is reported with its file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glmctl import console
from glmctl import objective as obj
from glmctl.corpus import _open as open_stream
from glmctl.data import feistel_permute
from glmctl.errors import InputError

REASONS = {"malformed_json": "malformed JSON", "missing_field": "no prompt/target (or inputs/targets_pretokenized) "
           "strings", "too_long": "prompt + target do not fit --seq-len", "empty_target":
           "target empty after tokenization"}
SUFFIXES = (".jsonl", ".json", ".jsonl.zst")


@dataclass
class Examples:
    """The usable examples of one file and what was skipped."""
    path: Path
    items: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt with mask, target)
    lines: int = 0
    skipped: dict = field(default_factory=lambda: {r: 0 for r in REASONS})
    first: dict = field(default_factory=dict)  # reason -> "file:line: detail"

    def skip(self, reason: str, line: int, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.first.setdefault(reason, f"{self.path}:{line}: {REASONS[reason]}{detail}")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> None:
        """One line per reason that occurred (file, line of its first occurrence, count)."""
        for reason, n in self.skipped.items():
            if n:
                console.warn(f"{self.first[reason]} ({n} line{'s' if n > 1 else ''} of {self.lines} skipped)")


def _fields(rec) -> tuple[str, str] | None:
    if not isinstance(rec, dict):
        return None
    if "prompt" in rec or "target" in rec:
        p, t = rec.get("prompt"), rec.get("target")
    else:
        p, t = rec.get("inputs_pretokenized"), rec.get("targets_pretokenized")
        if isinstance(t, list):
            t = t[0] if t and isinstance(t[0], str) else None
    return (p, t) if isinstance(p, str) and isinstance(t, str) else None


def with_mask(prompt: list[int], ids: dict) -> list[int]:
    """The prompt with its mask: as written when it has one, else with [gMASK] appended."""
    masks = (ids["[MASK]"], ids["[sMASK]"], ids["[gMASK]"])
    return list(prompt) if any(t in masks for t in prompt) else list(prompt) + [ids["[gMASK]"]]


def example_length(prompt: list[int], target: list[int]) -> int:
    """Tokens of the laid-out example: prompt (with mask) + sop + target."""
    return len(prompt) + 1 + len(target)


def read_examples(path: str | Path, tokenizer, ids: dict, seq_len: int) -> Examples:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    if not p.name.endswith(SUFFIXES):
        raise InputError(f"{p}: expected a .jsonl or .jsonl.zst file")
    stream = open_stream(p)
    try:
        raw = stream.read_all()
    finally:
        stream.close()
    damage = getattr(stream, "damage", None)
    if damage:
        console.warn(f"{p}: {damage}; using the lines before it")
    ex = Examples(p)
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        ex.lines += 1
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ex.skip("malformed_json", n)
            continue
        f = _fields(rec)
        if f is None:
            ex.skip("missing_field", n)
            continue
        prompt = with_mask(tokenizer.encode(f[0]), ids)
        target = tokenizer.encode(f[1], allow_special=False)
        if not target:
            ex.skip("empty_target", n)
            continue
        if example_length(prompt, target) > seq_len:
            ex.skip("too_long", n, f" ({example_length(prompt, target)} tokens > {seq_len})")
            continue
        ex.items.append((prompt, target))
    ex.report()
    if not ex.items:
        raise InputError(f"{p}: no usable examples ({ex.lines} lines, {ex.n_skipped} skipped)")
    return ex


def example_segment(prompt: list[int], target: list[int], ids: dict) -> obj.Segment:
    """One example laid out for training (module docstring); ``prompt`` already holds its mask."""
    mask_ids = [ids[m] for m in ("[MASK]", "[sMASK]", "[gMASK]")]
    mask_id = next(m for m in mask_ids if m in prompt)  # the mask in use (docs/glm130b.md §4.3)
    la = len(prompt)
    if mask_id == ids["[gMASK]"]:
        gen_pos = list(range(la, la + len(target) + 1))
    else:
        gen_pos = [prompt.index(mask_id)] * (len(target) + 1)
    tokens = prompt + [ids["sop"]] + target
    targets = [ids["pad"]] * la + target + [ids["eop"]]
    loss = np.arange(len(tokens)) >= la
    return obj.Segment(np.array(tokens, np.int64), np.array(targets, np.int64), loss,
                       np.array(list(range(la)) + gen_pos, np.int64), ~loss)


def pack_examples(items: list[tuple[list[int], list[int]]], seq_len: int, ids: dict, seed: int) -> list:
    """Examples (order shuffled by ``seed``) packed greedily into ``seq_len``-token sequences."""
    order = np.random.default_rng([int(seed), 17]).permutation(len(items))
    seqs, cur, used = [], [], 0
    for i in order.tolist():
        seg = example_segment(*items[i], ids)
        if cur and used + len(seg) > seq_len:
            seqs.append(obj.pack(cur, seq_len, ids["pad"], obj.MIP))
            cur, used = [], 0
        cur.append(seg)
        used += len(seg)
    if cur:
        seqs.append(obj.pack(cur, seq_len, ids["pad"], obj.MIP))
    return seqs


class FinetuneSource:
    """Training and held-out sequences for ``glmctl.training.Trainer`` (module docstring)."""

    def __init__(self, train: list, valid: list, seed: int):
        self.train, self.valid, self.seed = train, valid, int(seed)

    def batch(self, indices) -> list:
        idx = np.asarray(indices, dtype=np.int64)
        epochs, pos = np.divmod(idx, len(self.train))
        out = [None] * len(idx)
        for e in np.unique(epochs).tolist():
            sel = np.flatnonzero(epochs == e)
            for k, j in zip(sel, feistel_permute(pos[sel], len(self.train), key=(self.seed, e))):
                out[k] = self.train[int(j)]
        return out

    def held_out(self, dp: int, dp_rank: int, eval_samples: int):
        """This rank's share of the held-out sequences (no baseline model)."""
        n = max(dp, min(eval_samples, len(self.valid)) // dp * dp)
        seqs = [self.valid[k % len(self.valid)] for k in range(n)]
        return seqs[dp_rank::dp], None
