"""Scoring token log-probabilities with a GLM: batched, padded, cached (docs/glm130b.md §4.4, §9.2).

A scoring *request* is one sequence with its own attention mask and a list of (index, token)
targets: the log-prob of ``token`` is read from the logits at ``index``. Multiple choice,
LM windows and lm-eval's LAMBADA all reduce to requests:

    multiple choice (packed)   context [M] | sop c1[:-1] | sop c2[:-1] | ...   one request per example
    multiple choice (unpacked) context [M] | sop ci[:-1]                       one request per choice
    LM window                  prompt [gMASK] | sop text[:-1]                  targets = text

Batches hold requests of the same padded length only (lengths rounded up to a multiple of
``PAD_MULTIPLE``), so what a request is padded to never depends on its neighbours or on the
batch size. Padding columns are masked; only the rows that have targets go through the output
layer, so the [batch, seq, vocab] logits tensor is never built.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from glmctl.model import masks

PAD_MULTIPLE = 16


@dataclass
class Request:
    """One sequence to score. Its attention mask is described, not stored (a 2048-token mask is
    4 MB; WikiText-103 has a thousand windows): the first ``prefix_len`` tokens are bidirectional,
    the rest causal within their block (``blocks``: a block id per token, default all 0); blocks
    never see each other (docs/glm130b.md §4.4). ``mask()`` builds it."""
    tokens: list[int]
    positions: list[int]
    prefix_len: int
    targets: list[tuple[int, int]]     # (index in tokens, target token id)
    blocks: list[int] | None = None
    key: str | None = None             # cache key

    def mask(self) -> torch.Tensor:
        """bool [s, s], True = blocked."""
        s = len(self.tokens)
        prefix = torch.arange(s) < self.prefix_len
        block = torch.tensor(self.blocks) if self.blocks is not None else torch.zeros(s, dtype=torch.long)
        return masks.build_mask(prefix[None], block=block[None], blocks_see_earlier=False)[0, 0]


def request_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:40]


# ---- building requests ---------------------------------------------------------------------
def multiple_choice_request(context: list[int], choices: list[list[int]], ids: dict[str, int],
                            use_task_mask: bool, single_token: bool | None = None) -> tuple[Request, list[list[int]]]:
    """The packed multiple-choice sequence of one example (docs/glm130b.md §4.4) and, per choice, the
    indices of its targets in ``Request.targets``.

    The context is bidirectional; each choice is a causal block [sop] + choice[:-1] that sees
    the context and itself, never the other choices. With [MASK] every choice token sits at the
    mask's position; with [gMASK] positions continue after it. When every choice is one token,
    one [sop] serves them all (``single_token``; the blocks would be identical anyway). A
    context that already holds [MASK] is a blank to fill: no mask is appended and the choices
    take that mask's position (GLM-130B's blank-filling multiple choice).
    """
    if single_token is None:
        single_token = all(len(c) == 1 for c in choices)
    mask_id = ids["[gMASK]"] if use_task_mask else ids["[MASK]"]
    sop = ids["sop"]
    if ids["[MASK]"] in context:
        tokens, positions, spans = _blank_choice_input(context, choices, sop, ids["[MASK]"], single_token)
        prefix_len = len(context)
    else:
        tokens, positions, _, spans = masks.multiple_choice_input(context, choices, mask_id, sop,
                                                                  gmask=use_task_mask, single_token=single_token)
        prefix_len = len(context) + 1
    # block ids: 0 for the context, then one id per choice block (one shared block when single-token)
    blocks = [0] * len(tokens)
    starts = sorted({span[0][0] for span in spans})
    for b, start in enumerate(starts, start=1):
        end = starts[b] if b < len(starts) else len(tokens)
        blocks[start:end] = [b] * (end - start)
    targets, index = [], []
    for span in spans:
        index.append(list(range(len(targets), len(targets) + len(span))))
        targets.extend(span)
    return Request(tokens, positions, prefix_len, targets, blocks), index


def _blank_choice_input(context, choices, sop_id, mask_id, single_token):
    """Multiple choice into a [MASK] already in the text: the whole text is context; every choice
    token takes that [MASK]'s position."""
    tokens = list(context)
    mask_pos = context.index(mask_id)
    positions = list(range(len(tokens)))
    if single_token:
        positions.append(mask_pos)
        return tokens + [sop_id], positions, [[(len(tokens), c[0])] for c in choices]
    spans = []
    for choice in choices:
        spans.append([(len(tokens) + k, t) for k, t in enumerate(choice)])
        tokens += [sop_id] + list(choice[:-1])
        positions += [mask_pos] * len(choice)
    return tokens, positions, spans


def window_request(prompt: list[int], text: list[int], ids: dict[str, int], use_task_mask: bool = True,
                   unidirectional: bool = False) -> Request:
    """LM scoring of ``text`` after ``prompt`` (docs/glm130b.md §4.4, ``masks.lm_window``): prompt + [M]
    bidirectional, then [sop] + text[:-1] causal, every text token a target. ``unidirectional``:
    the prompt is causal too (it still conditions, but sees nothing to its right)."""
    mask_id = ids["[gMASK]"] if use_task_mask else ids["[MASK]"]
    tokens, positions, _, tpos, targets = masks.lm_window(prompt, text, mask_id, ids["sop"])
    return Request(tokens, positions, 1 if unidirectional else len(prompt) + 1, list(zip(tpos, targets)))


def lm_windows(n_tokens: int, max_seq_length: int, generation_length: int) -> list[tuple[int, int, int]]:
    """GLM-130B's sliding windows over a document of ``n_tokens`` tokens (docs/glm130b.md §9.2) as
    (prompt_start, text_start, text_end): window 0 scores tokens [0, L-1) with no prompt; window
    k scores the next ``generation_length`` tokens with the L-1-g tokens before them as prompt.

        L = 8, g = 3, 12 tokens:  (0, 0, 7)  (3, 7, 10)  (6, 10, 12)
    """
    L, g = max_seq_length, generation_length
    n_windows = max(-(-max(n_tokens - (L - 1), 0) // g) + 1, 1)
    out = []
    for k in range(n_windows):
        start = k * g
        end = min(start + L - 1, n_tokens)
        text_start = start if k == 0 else start + (L - 1 - g)
        if text_start >= end:
            break
        out.append((start, text_start, end))
    return out


# ---- running requests -----------------------------------------------------------------------
class RequestCache:
    """Per-request results of one model, appended as JSON lines as batches finish, so an
    interrupted run resumes where it stopped. A torn last line (a kill mid-write) is ignored."""

    def __init__(self, path: str | Path | None, write: bool = True):
        self.path = Path(path) if path is not None else None
        self.write = write and self.path is not None
        self.data: dict[str, object] = {}
        self.loaded = 0
        if self.path is not None and self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        self.data[rec["k"]] = rec["v"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue
            self.loaded = len(self.data)
        self._pending: list[str] = []

    def get(self, key):
        return self.data.get(key) if key is not None else None

    def put(self, key, value) -> None:
        if key is None:
            return
        self.data[key] = value
        if self.write:
            self._pending.append(json.dumps({"k": key, "v": value}, separators=(",", ":")))

    def flush(self) -> None:
        if not self._pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(self._pending) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._pending = []

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def padded_length(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def _device_of(model) -> torch.device:
    return next(model.parameters()).device




@torch.no_grad()
def run_batch(model, batch: list[Request], pad_id: int = 0) -> list[list[tuple[float, bool]]]:
    """One forward over requests of equal padded length: per request, per target,
    (log-prob, target is the argmax)."""
    device = _device_of(model)
    P = padded_length(max(len(r.tokens) for r in batch))
    b = len(batch)
    tokens = torch.full((b, P), pad_id, dtype=torch.long)
    positions = torch.zeros((b, P), dtype=torch.long)
    prefix = torch.zeros((b, P), dtype=torch.bool)
    block = torch.zeros((b, P), dtype=torch.long)
    sample = torch.full((b, P), -1, dtype=torch.long)  # padding: its own "sample" -1, seen by no one
    rows, cols, tgt = [], [], []
    for i, r in enumerate(batch):
        s = len(r.tokens)
        tokens[i, :s] = torch.tensor(r.tokens)
        positions[i, :s] = torch.tensor(r.positions)
        prefix[i, :r.prefix_len] = True
        if r.blocks is not None:
            block[i, :s] = torch.tensor(r.blocks)
        sample[i, :s] = 0
        for idx, t in r.targets:
            rows.append(i)
            cols.append(idx)
            tgt.append(t)
    mask = masks.build_mask(prefix, sample, block, blocks_see_earlier=False)
    hidden = model(tokens.to(device), positions.to(device), mask.to(device), return_hidden=True)
    h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logits = model.logits(h, gemv=False).float()  # the same rounding at every batch size
    target = torch.tensor(tgt, device=device)
    logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
    greedy = logits.argmax(dim=-1) == target
    logp, greedy = logp.cpu().tolist(), greedy.cpu().tolist()
    out, k = [], 0
    for r in batch:
        n = len(r.targets)
        out.append(list(zip(logp[k:k + n], greedy[k:k + n])))
        k += n
    return out


def score_requests(model, requests: list[Request], batch_size: int, cache: RequestCache | None = None,
                   progress=None, pad_id: int = 0) -> list[list[tuple[float, bool]]]:
    """Score all requests (cached ones are not recomputed), longest first, in batches of at most
    ``batch_size`` requests that share a padded length. Returns results in request order."""
    results: list = [None] * len(requests)
    todo = []
    for i, r in enumerate(requests):
        hit = cache.get(r.key) if cache is not None else None
        if hit is not None:
            results[i] = [(float(lp), bool(g)) for lp, g in hit]
        else:
            todo.append(i)
    if progress is not None and len(todo) < len(requests):
        progress.update(len(requests) - len(todo))
    buckets: dict[int, list[int]] = {}
    for i in todo:
        buckets.setdefault(padded_length(len(requests[i].tokens)), []).append(i)
    for length in sorted(buckets, reverse=True):
        idx = buckets[length]
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            for i, res in zip(chunk, run_batch(model, [requests[i] for i in chunk], pad_id)):
                results[i] = res
                if cache is not None:
                    cache.put(requests[i].key, [[lp, g] for lp, g in res])
            if cache is not None:
                cache.flush()
            if progress is not None:
                progress.update(len(chunk))
    return results
