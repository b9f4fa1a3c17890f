"""The GLM pre-training objective (docs/glm130b.md §4.5, §5.1): training sequences built from raw token windows.

Every training sequence has ``seq_len`` tokens and uses one objective, drawn per sequence:

    [MASK]  (share ``mask_ratio``, 30 %): the sequence is cut into ``samples_per_sequence``
            windows (4 x 512 in GLM-130B); in each, spans with Poisson(lambda=3) lengths covering
            15 % of the text become one [MASK] each (Part A, bidirectional); Part B holds the
            spans in random order, each as input ``sop + span`` and target ``span + eop``, every
            Part-B token at its mask's position. The windows sit side by side, block-diagonal.
    [gMASK] (the rest, 70 %): prefix + [gMASK] + sop + suffix; the suffix (uniform length, at
            least ``gmask_min_ratio`` of the text) is generated left to right; positions arange.
    MIP     (share ``mip_ratio`` when instruction data is given, 5 %): prompt + [gMASK] + sop +
            target, target + eop scored; several packed per sequence like [MASK] windows.

Loss is on Part B only. A sequence is a set of numpy arrays; ``collate`` turns a list of them
into tensors and the boolean attention mask (True = blocked) via ``glmctl.model.masks.build_mask``
from three per-token labels: ``sample`` (packed sample id, -1 = padding), ``block`` (0 = Part A,
1 = Part B) and ``prefix`` (bidirectional Part A).

Everything is a pure function of the input tokens and a numpy ``Generator``: seeding that
generator with (seed, global sample index) makes the data independent of the number of
processes and restartable from a sample count alone.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from glmctl.model.masks import build_mask

MASK, GMASK, MIP = "mask", "gmask", "mip"
KIND_CODES = {MASK: 0, GMASK: 1, MIP: 2}


@dataclass(frozen=True)
class ObjectiveConfig:
    seq_len: int
    mask_ratio: float = 0.3  # share of sequences using [MASK] (GLM-130B: 30 %, gpt_prob 0.7)
    mask_prob: float = 0.15  # share of a [MASK] sample's text inside spans
    span_lambda: float = 3.0  # Poisson mean of the span lengths (average_block_length)
    max_span: int = 39  # GLM's span-length table covers 1..39
    gmask_min_ratio: float = 0.2  # shortest generated suffix, as a share of the text
    samples_per_sequence: int = 4  # [MASK] / MIP samples packed in one sequence
    mip_ratio: float = 0.0  # share of sequences made of instruction samples (0.05 when given)

    @property
    def window(self) -> int:
        return self.seq_len // self.samples_per_sequence

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.mask_ratio <= 1:
            out.append(f"mask ratio must be within [0, 1], got {self.mask_ratio}")
        if not 0 < self.mask_prob < 0.5:
            out.append(f"mask probability must be within (0, 0.5), got {self.mask_prob}")
        if not 0 <= self.mip_ratio < 1:
            out.append(f"MIP ratio must be within [0, 1), got {self.mip_ratio}")
        if not 0 < self.gmask_min_ratio < 1:
            out.append(f"gMASK minimum ratio must be within (0, 1), got {self.gmask_min_ratio}")
        if self.samples_per_sequence < 1 or self.window < 16:
            out.append(f"seq_len {self.seq_len} / {self.samples_per_sequence} samples per sequence leaves "
                       f"{self.window}-token windows; need at least 16")
        if self.seq_len < 8:
            out.append(f"seq_len must be at least 8, got {self.seq_len}")
        return out


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    gmask: int
    sop: int
    eop: int
    pad: int
    smask: int | None = None

    @classmethod
    def from_dict(cls, ids: dict) -> "SpecialIds":
        """From ``ModelConfig.special_token_ids()`` / ``Tokenizer.special_ids``."""
        return cls(mask=ids["[MASK]"], gmask=ids["[gMASK]"], sop=ids["sop"], eop=ids["eop"], pad=ids["pad"],
                   smask=ids.get("[sMASK]"))


@dataclass
class Segment:
    """One sample before packing; all arrays have the same length."""
    tokens: np.ndarray
    targets: np.ndarray
    loss: np.ndarray  # bool: scored
    positions: np.ndarray
    prefix: np.ndarray  # bool: Part A (bidirectional)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Sequence:
    """One training sequence of ``seq_len`` tokens (numpy arrays) and the objective it uses."""
    tokens: np.ndarray  # int64 [L]
    targets: np.ndarray  # int64 [L]; meaningful where loss
    loss: np.ndarray  # bool [L]
    positions: np.ndarray  # int64 [L]
    prefix: np.ndarray  # bool [L]
    sample: np.ndarray  # int64 [L]; -1 = padding
    block: np.ndarray  # int64 [L]; 0 = Part A, 1 = Part B
    kind: str


# ---- [MASK]: Poisson spans ---------------------------------------------------------------------
def span_length_pmf(lam: float, max_span: int) -> np.ndarray:
    """P(length = k) for k = 1..max_span: Poisson(lam) restricted to 1..max_span (GLM's table)."""
    k = np.arange(1, max_span + 1)
    logp = k * math.log(lam) - lam - np.array([math.lgamma(x + 1) for x in k])
    p = np.exp(logp)
    return p / p.sum()


def masked_target(n: int, mask_prob: float) -> int:
    """How many of n text tokens a [MASK] sample must cover at least."""
    return max(1, int(mask_prob * n))


def draw_span_lengths(target: int, rng: np.random.Generator, cfg: ObjectiveConfig) -> list[int]:
    """Span lengths drawn until they cover ``target`` tokens (the last one may overshoot)."""
    cdf = _span_cdf(cfg.span_lambda, cfg.max_span)
    out, total = [], 0
    while total < target:
        # Inverse-CDF draws in blocks of about the expected count; only the ones needed are kept.
        block = np.searchsorted(cdf, rng.random(max(4, (target - total) // 3 + 4)), side="right") + 1
        for n in block.tolist():
            out.append(n)
            total += n
            if total >= target:
                break
    return out


@functools.lru_cache(maxsize=8)
def _span_cdf(lam: float, max_span: int) -> np.ndarray:
    cdf = np.cumsum(span_length_pmf(lam, max_span))
    cdf[-1] = 1.0
    return cdf[:-1]  # searchsorted over the inner edges gives 0..max_span-1


def place_spans(lengths: list[int], n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random non-touching [start, end) spans with these lengths, in order, inside n tokens
    (GLM's ``sample_spans``: at least one unmasked token between two spans)."""
    k = len(lengths)
    free = n - sum(lengths) - (k - 1)  # unmasked tokens beyond the k-1 mandatory separators
    places = np.sort(rng.integers(0, free + 1, size=k))
    spans, offset = [], 0
    for place, length in zip(places.tolist(), lengths):
        start = offset + place
        spans.append((start, start + length))
        offset += length + 1
    return spans


def mask_sample(window: np.ndarray, rng: np.random.Generator, cfg: ObjectiveConfig, ids: SpecialIds) -> Segment:
    """One [MASK] sample that fits in ``len(window)`` tokens, built from a prefix of ``window``.

    Text of n tokens with k spans needs n + 2k tokens (k masks replace the spans in Part A, and
    Part B adds sop per span on input / eop per span on target). n is chosen as the largest
    length the drawn spans allow: lengths are drawn for the whole window, then n = w - 2k and
    the shortest prefix of the same draws covering n's target is used (k can only shrink).
    """
    w = len(window)
    drawn = draw_span_lengths(masked_target(w, cfg.mask_prob), rng, cfg)
    n = w - 2 * len(drawn)
    target, lengths, total = masked_target(n, cfg.mask_prob), [], 0
    for length in drawn:
        if total >= target:
            break
        lengths.append(length)
        total += length
    while n - sum(lengths) - (len(lengths) - 1) < 0:  # tiny windows: spans must fit with gaps
        i = int(np.argmax(lengths))
        lengths[i] -= 1
    text = np.asarray(window[:n], dtype=np.int64)
    spans = place_spans(lengths, n, rng)

    # Part A: the text with each span replaced by one [MASK]; remember each mask's index.
    part_a, mask_index, cursor = [], [], 0
    for start, end in spans:
        part_a.extend(text[cursor:start].tolist())
        mask_index.append(len(part_a))
        part_a.append(ids.mask)
        cursor = end
    part_a.extend(text[cursor:].tolist())
    la = len(part_a)

    tokens, targets, positions = list(part_a), [ids.pad] * la, list(range(la))
    for i in rng.permutation(len(spans)).tolist():  # Part B: spans in random order
        start, end = spans[i]
        span = text[start:end].tolist()
        tokens += [ids.sop] + span
        targets += span + [ids.eop]
        positions += [mask_index[i]] * (len(span) + 1)
    lt = len(tokens)
    loss = np.arange(lt) >= la
    return Segment(np.array(tokens, np.int64), np.array(targets, np.int64), loss,
                   np.array(positions, np.int64), ~loss)


# ---- [gMASK] -----------------------------------------------------------------------------------
def gmask_sample(text: np.ndarray, rng: np.random.Generator, cfg: ObjectiveConfig, ids: SpecialIds,
                 generate: int | None = None) -> Segment:
    """prefix + [gMASK] + sop + suffix[:-1] (n + 1 tokens for n text tokens); targets the suffix.

    The suffix length g is uniform in [ceil(gmask_min_ratio * n), n - 1] (at least one token of
    prefix), unless ``generate`` fixes it. Positions are 0..n (docs/glm130b.md §4.2, [gMASK] case).
    """
    text = np.asarray(text, dtype=np.int64)
    n = len(text)
    if generate is None:
        lo = max(1, math.ceil(cfg.gmask_min_ratio * n))
        generate = int(rng.integers(lo, max(lo, n - 1) + 1))
    p = n - generate
    tokens = np.concatenate([text[:p], [ids.gmask, ids.sop], text[p:n - 1]])
    targets = np.concatenate([np.full(p + 1, ids.pad), text[p:]])
    loss = np.arange(n + 1) > p
    return Segment(tokens, targets, loss, np.arange(n + 1, dtype=np.int64), ~loss)


# ---- MIP: instruction samples ------------------------------------------------------------------
def instruction_sample(prompt: list[int], target: list[int], max_len: int, ids: SpecialIds) -> Segment:
    """prompt + [gMASK] + sop + target -> target + eop (the generation layout, docs/glm130b.md §4.3).

    A prompt that already holds a [MASK] / [sMASK] keeps it and Part B sits at its position.
    Too long: the target is cut to leave at least a quarter for the prompt, then the prompt is
    truncated on the left (like evaluation inputs, docs/glm130b.md §9.1).
    """
    blank = [m for m in (ids.mask, ids.smask) if m is not None and m in prompt]
    extra = 1 if blank else 2  # [gMASK] + sop, or only sop
    target = list(target)[: max(1, max_len - extra - max(1, max_len // 4))]
    prompt = list(prompt)[-(max_len - extra - len(target)):]
    if blank and not any(m in prompt for m in blank):  # the mask fell off the left edge
        blank, extra = [], 2
        prompt = prompt[1:]
    if blank:
        ctx = prompt
        mask_pos = min(prompt.index(m) for m in blank if m in prompt)
        gen_pos = [mask_pos] * (len(target) + 1)
    else:
        ctx = prompt + [ids.gmask]
        gen_pos = list(range(len(ctx), len(ctx) + len(target) + 1))
    la = len(ctx)
    tokens = ctx + [ids.sop] + target
    targets = [ids.pad] * la + target + [ids.eop]
    loss = np.arange(len(tokens)) >= la
    return Segment(np.array(tokens, np.int64), np.array(targets, np.int64), loss,
                   np.array(list(range(la)) + gen_pos, np.int64), ~loss)


# ---- packing ----------------------------------------------------------------------------------
def pack(segments: list[Segment], seq_len: int, pad_id: int, kind: str) -> Sequence:
    """Segments side by side (sample ids 0, 1, ...), padded to seq_len with sample id -1."""
    total = sum(len(s) for s in segments)
    if total > seq_len:
        raise ValueError(f"segments hold {total} tokens, more than seq_len {seq_len}")
    pad = seq_len - total
    cat = lambda xs, fill, dt: np.concatenate([*xs, np.full(pad, fill, dt)])  # noqa: E731
    return Sequence(
        tokens=cat([s.tokens for s in segments], pad_id, np.int64),
        targets=cat([s.targets for s in segments], pad_id, np.int64),
        loss=cat([s.loss for s in segments], False, bool),
        positions=cat([s.positions for s in segments], 0, np.int64),
        prefix=cat([s.prefix for s in segments], False, bool),
        sample=cat([np.full(len(s), i, np.int64) for i, s in enumerate(segments)], -1, np.int64),
        block=cat([(~s.prefix).astype(np.int64) for s in segments], 0, np.int64),
        kind=kind,
    )


def choose_kind(rng: np.random.Generator, cfg: ObjectiveConfig, have_instructions: bool) -> str:
    u = rng.random()
    if have_instructions and u < cfg.mip_ratio:
        return MIP
    u = rng.random()
    return MASK if u < cfg.mask_ratio else GMASK


def build_sequence(chunk: np.ndarray, rng: np.random.Generator, cfg: ObjectiveConfig, ids: SpecialIds,
                   instructions: list[tuple[list[int], list[int]]] | None = None,
                   kind: str | None = None) -> Sequence:
    """One training sequence from a chunk of ``seq_len`` corpus tokens.

    [gMASK] uses the chunk's first seq_len - 1 tokens; [MASK] uses a prefix of each of the
    ``samples_per_sequence`` windows of the chunk; MIP ignores the chunk and packs instruction
    samples (each cut to one window) drawn at random, with replacement, until the next one
    would not fit.
    """
    L = cfg.seq_len
    if kind is None:
        kind = choose_kind(rng, cfg, bool(instructions))
    if kind == GMASK:
        return pack([gmask_sample(chunk[: L - 1], rng, cfg, ids)], L, ids.pad, kind)
    if kind == MASK:
        w = cfg.window
        segs = [mask_sample(chunk[j * w:(j + 1) * w], rng, cfg, ids) for j in range(cfg.samples_per_sequence)]
        return pack(segs, L, ids.pad, kind)
    if kind == MIP:
        segs, used = [], 0
        for _ in range(4 * cfg.samples_per_sequence):  # bounded: stop at the first one that does not fit
            prompt, target = instructions[int(rng.integers(len(instructions)))]
            seg = instruction_sample(prompt, target, cfg.window, ids)
            if used + len(seg) > L:
                break
            segs.append(seg)
            used += len(seg)
        return pack(segs, L, ids.pad, kind)
    raise ValueError(f"unknown objective {kind!r}")


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of global sample ``index``: the same in every process and after a restart."""
    return np.random.default_rng([int(seed), int(index)])


# ---- batches ----------------------------------------------------------------------------------
def collate(seqs: list[Sequence], device=None) -> dict:
    """Tensors for a micro-batch: tokens, positions, targets [b, L] int64; loss_mask [b, L] bool;
    attention_mask [b, 1, L, L] bool (True = blocked)."""

    def stack(name, dtype):
        return torch.from_numpy(np.stack([getattr(s, name) for s in seqs])).to(device=device, dtype=dtype)
    prefix, sample, block = stack("prefix", torch.bool), stack("sample", torch.long), stack("block", torch.long)
    return {
        "tokens": stack("tokens", torch.long),
        "positions": stack("positions", torch.long),
        "targets": stack("targets", torch.long),
        "loss_mask": stack("loss", torch.bool),
        "attention_mask": build_mask(prefix, sample, block),
    }
