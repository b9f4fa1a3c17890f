"""Prompts with blanks, for every stage that completes text (generate, serve).

    f = Filler(session, GenerationConfig(...))
    tokens = f.encode(text, where)              # exact [MASK] / [sMASK] / [gMASK] become mask ids
    records = f.fill([tokens, ...], keys=[...])  # completed text and each blank with its offsets

A prompt with ``[MASK]`` or ``[sMASK]`` has its blanks filled left to right; a prompt without a
mask gets ``[gMASK]`` appended and is continued (docs/glm130b.md §4.3; decoding in
glmctl.generation). A record is {"text", "mask", "blanks": [{"text", "tokens", "start", "end",
"stop"}], "new_tokens"}: ``start``/``end`` are character offsets of the blank in ``text``
(``text[start:end] == blank["text"]``, surrounding whitespace left outside).
"""
from __future__ import annotations

import os
import re

from glmctl.errors import InputError
from glmctl.generation import GenerationConfig, derive_seed, fill_batch
from glmctl.model.masks import prepare_prompt
from glmctl.session import Session

MASK_SPELLINGS = ("[MASK]", "[sMASK]", "[gMASK]")
_MASK_SPLIT = re.compile(r"(\[(?:MASK|sMASK|gMASK)\])")
_MASK_LIKE = re.compile(r"\[[^\[\]\s]{0,24}\]")


def encode_prompt(text: str, tokenizer, ids: dict, where: str) -> list[int]:
    """Prompt text -> ids: exact [MASK] / [sMASK] / [gMASK] become the model's mask ids; any other
    bracketed word containing "mask" is rejected (a typo would otherwise be read as text)."""
    for m in _MASK_LIKE.finditer(text):
        word = m.group(0)
        if "mask" in word.lower() and word not in MASK_SPELLINGS:
            raise InputError(f"{where}: unknown mask token {word!r} at character {m.start() + 1}; "
                             f"use [MASK], [sMASK] or [gMASK]")
    out: list[int] = []
    for part in _MASK_SPLIT.split(text):
        if part in MASK_SPELLINGS:
            out.append(ids[part])
        elif part:
            out.extend(tokenizer.encode(part, allow_special=False))
    return out


class TextStream:
    """Print the text of a growing token list as it grows, without splitting a multi-byte
    character: a trailing U+FFFD (an incomplete UTF-8 sequence of byte pieces) is held back until
    the next token completes it, or until ``final``."""

    def __init__(self, decode, write):
        self.decode, self.write = decode, write
        self.printed = ""

    def update(self, tokens, final: bool = False) -> None:
        text = self.decode(tokens)
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > len(self.printed):
            # a lossless tokenizer only appends; if an earlier character changed, print from the change
            k = len(self.printed) if text.startswith(self.printed) else 0
            if k == 0 and self.printed:
                k = len(os.path.commonprefix([text, self.printed]))
                if k < len(self.printed):
                    k = len(self.printed)
            self.write(text[k:])
            self.printed = text

    def reset(self) -> None:
        self.printed = ""


class Filler:
    """A model session and a generation config that turn prompts into records."""

    def __init__(self, session: Session, gen: GenerationConfig):
        self.session = session
        self.gen = gen.validate()
        self.tokenizer = session.tokenizer
        self.ids = session.ids
        self.max_len = session.config.max_sequence_length

    def encode(self, text: str, where: str) -> list[int]:
        """The prompt's ids, checked to leave room for <sop> and one new token (InputError)."""
        toks = encode_prompt(text, self.tokenizer, self.ids, where)
        if len(prepare_prompt(toks, self.ids)) + 2 > self.max_len:
            raise InputError(f"{where}: prompt is {len(toks)} tokens; with its mask, <sop> and one new token "
                             f"that is longer than the model's maximum length {self.max_len}")
        return toks

    def fill(self, prompts: list[list[int]], keys: list[int], on_token=None, on_blank_start=None) -> list[dict]:
        """Records for ``prompts``; ``keys`` (e.g. input positions) derive each prompt's sampling
        seed from the configured one, so batching does not change results."""
        seeds = None if self.gen.seed is None else [derive_seed(self.gen.seed, k) for k in keys]
        results = fill_batch(self.session.model, prompts, self.ids, self.gen, on_token=on_token, seeds=seeds,
                             on_blank_start=on_blank_start)
        return [self.record(r) for r in results]

    def record(self, r) -> dict:
        tok = self.tokenizer
        text = tok.decode(r.tokens)
        names = {v: k for k, v in self.ids.items() if k in MASK_SPELLINGS}
        blanks = []
        for (start, span), hyps in zip(r.spans, r.hypotheses):
            a = len(tok.decode(r.tokens[:start]))
            b = len(tok.decode(r.tokens[:start + len(span)]))
            seg = text[a:b]
            a += len(seg) - len(seg.lstrip())
            b -= len(seg) - len(seg.rstrip())
            b = max(a, b)
            stop = hyps[0].stop_token if hyps else None
            stop_name = "length" if stop is None else next((k for k, v in self.ids.items() if v == stop), str(stop))
            blank = {"text": text[a:b], "tokens": len(span), "start": a, "end": b, "stop": stop_name}
            if self.gen.strategy == "beam" and hyps:
                blank["score"] = round(hyps[0].score, 6)
            blanks.append(blank)
        return {"text": text, "mask": names.get(r.mask_id, "[gMASK]"), "blanks": blanks,
                "new_tokens": sum(len(s) for _, s in r.spans)}
