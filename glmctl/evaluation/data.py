"""Evaluation data: GLM-130B's JSON-lines files, validated line by line (docs/glm130b.md §9.1).

    mul  {"inputs_pretokenized": str, "choices_pretokenized": [str, ...], "label": int}
    gen  {"inputs_pretokenized": str, "targets_pretokenized": [str, ...]}
    lm   a text file (one document), or JSON lines with "text" / "text_pretokenized"
         (+ optional "meta": {"pile_set_name": ...}, as the Pile)

Text is always tokenized with the model's own tokenizer. GLM-130B's files also carry
pre-tokenized ``inputs`` / ``choices`` / ``targets`` (icetk ids); those are used only when
the ``*_pretokenized`` text is absent. A mask token written in the text ("[MASK]", "[sMASK]",
"[gMASK]") becomes the special id. Every problem is an InputError naming the file and line.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from glmctl.errors import InputError

MASK_MARKERS = ("[MASK]", "[sMASK]", "[gMASK]")
_MARKER_RE = re.compile(r"(\[MASK\]|\[sMASK\]|\[gMASK\])")


def encode(tokenizer, text: str, ids: dict[str, int]) -> list[int]:
    """Tokenize ``text``; mask markers in it become their special ids."""
    out: list[int] = []
    for piece in _MARKER_RE.split(text):
        if piece in MASK_MARKERS:
            out.append(ids[piece])
        elif piece:
            out.extend(tokenizer.encode(piece))
    return out


@dataclass
class Example:
    """One multiple-choice or generation example."""
    file: Path
    line: int
    inputs: str                      # the input text (decoded if given as ids), for samples.jsonl
    context: list[int]
    choices: list[list[int]] = field(default_factory=list)   # mul
    choice_texts: list[str] = field(default_factory=list)    # mul (acc_norm divides by their length)
    label: int | None = None                                 # mul
    targets: list[str] = field(default_factory=list)         # gen
    truncated: int = 0               # context tokens dropped on the left


@dataclass
class Document:
    """One language-modelling document, with the counts its metrics divide by."""
    file: Path
    line: int                        # 0 when the whole file is the document
    tokens: list[int]
    n_words: int                     # whitespace-separated words of the raw text
    n_bytes: int                     # UTF-8 bytes of the raw text
    set_name: str | None = None      # Pile's meta.pile_set_name


def read_jsonl(path: Path):
    """Yield (line number, object) for each non-blank line."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        n = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise InputError(f"{path}:{n + 1}: not UTF-8 text") from None
            if not line:
                return
            n += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{n}: expected a JSON object")
            yield n, obj


def _is_ids(v) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _text_field(item: dict, key: str, where: str, tokenizer, ids) -> tuple[str, list[int]]:
    """(text, tokens) from ``key_pretokenized`` (preferred) or pre-tokenized ``key``."""
    pre = item.get(f"{key}_pretokenized")
    if isinstance(pre, str):
        return pre, encode(tokenizer, pre, ids)
    if pre is not None:
        raise InputError(f"{where}: {key}_pretokenized must be a string")
    raw = item.get(key)
    if _is_ids(raw):
        return tokenizer.decode(raw), list(raw)
    raise InputError(f"{where}: missing {key}_pretokenized")


def _list_field(item: dict, key: str, where: str, tokenizer, ids) -> tuple[list[str], list[list[int]]]:
    pre = item.get(f"{key}_pretokenized")
    if isinstance(pre, str):
        pre = [pre]
    if isinstance(pre, list) and all(isinstance(p, str) for p in pre):
        return list(pre), [encode(tokenizer, p, ids) for p in pre]
    if pre is not None:
        raise InputError(f"{where}: {key}_pretokenized must be a list of strings")
    raw = item.get(key)
    if isinstance(raw, list) and raw and all(_is_ids(r) for r in raw):
        return [tokenizer.decode(r) for r in raw], [list(r) for r in raw]
    raise InputError(f"{where}: missing {key}_pretokenized")


def read_multiple_choice(path: Path, tokenizer, ids, max_seq_length: int, limit: int | None = None) -> list[Example]:
    """Multiple-choice examples; the context is left-truncated so that context + choices + 2 fit
    (docs/glm130b.md §9.1; a single-token choice set needs one position)."""
    out = []
    for n, item in read_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}:{n}"
        text, context = _text_field(item, "inputs", where, tokenizer, ids)
        choice_texts, choices = _list_field(item, "choices", where, tokenizer, ids)
        if not choices:
            raise InputError(f"{where}: choices_pretokenized is empty")
        for i, c in enumerate(choices):
            if not c:
                raise InputError(f"{where}: choice {i} ({choice_texts[i]!r}) is empty after tokenization")
        if "label" not in item:
            raise InputError(f"{where}: no label")
        label = item["label"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise InputError(f"{where}: label must be an integer choice index, got {label!r}")
        if not 0 <= label < len(choices):
            raise InputError(f"{where}: label {label} is out of range for {len(choices)} choices")
        tgt = sum(len(c) for c in choices)
        if tgt == len(choices):
            tgt = 1
        if tgt + 2 >= max_seq_length:
            raise InputError(f"{where}: the choices take {tgt} tokens, more than max_seq_length {max_seq_length}")
        keep = max_seq_length - tgt - 2
        dropped = max(0, len(context) - keep)
        out.append(Example(path, n, text, context[dropped:], choices=choices, choice_texts=choice_texts,
                           label=label, truncated=dropped))
    return out


def read_generation(path: Path, tokenizer, ids, max_seq_length: int, max_gen_length: int,
                    limit: int | None = None) -> list[Example]:
    """Generation examples; the context keeps its last max_seq_length - max_gen_length - 2 tokens.
    LAMBADA-style lines may instead give the whole passage as ``text`` (lm-eval's format): the
    last whitespace-separated word becomes the target."""
    out = []
    for n, item in read_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}:{n}"
        if "inputs_pretokenized" not in item and "inputs" not in item and isinstance(item.get("text"), str):
            passage = item["text"].rstrip()
            if " " not in passage:
                raise InputError(f"{where}: text has no last word to predict")
            text, last = passage.rsplit(" ", 1)
            context, targets = encode(tokenizer, text, ids), [last]
        else:
            text, context = _text_field(item, "inputs", where, tokenizer, ids)
            targets, _ = _list_field(item, "targets", where, tokenizer, ids)
        keep = max_seq_length - max_gen_length - 2
        if keep < 1:
            raise InputError(f"{where}: max_gen_length {max_gen_length} leaves no room for the input "
                             f"in max_seq_length {max_seq_length}")
        dropped = max(0, len(context) - keep)
        out.append(Example(path, n, text, context[dropped:], targets=targets, truncated=dropped))
    return out


def read_documents(path: Path, tokenizer, ids, limit: int | None = None) -> list[Document]:
    """LM documents: JSON lines (``.json``/``.jsonl``, one document per line) or a whole text file."""
    if path.suffix not in (".json", ".jsonl"):
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
        if not raw.strip():
            return []
        return [Document(path, 0, encode(tokenizer, raw, ids), len(raw.split()), len(raw.encode("utf-8")))]
    out = []
    for n, item in read_jsonl(path):
        if limit is not None and len(out) >= limit:
            break
        where = f"{path}:{n}"
        raw = None
        for key in ("text_pretokenized", "text", "inputs_pretokenized"):
            if isinstance(item.get(key), str):
                raw = item[key]
                break
        if raw is None:
            raise InputError(f"{where}: no text (expected a \"text\" or \"text_pretokenized\" string)")
        if not raw.strip():
            continue
        meta = item.get("meta")
        set_name = meta.get("pile_set_name") if isinstance(meta, dict) else None
        out.append(Document(path, n, encode(tokenizer, raw, ids), len(raw.split()), len(raw.encode("utf-8")),
                            str(set_name) if set_name is not None else None))
    return out
