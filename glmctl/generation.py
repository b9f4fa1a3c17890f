"""Decoding for GLM models, shared by ``glmctl generate`` and ``glmctl evaluate``.

    decode(model, tokens, positions, prefix_len, next_position, gen, ids) -> [Hypothesis]
    generate_span(model, context, ids, gen)                              -> [Hypothesis]
    fill(model, tokens, ids, gen)                                        -> (final_tokens, spans)
    DecodeBatch(model).join(...) / .step() / .drop(...)  the step-wise loop (continuous batching)
    BlankFill(prompt, ids, seed)                         one prompt's blanks, round by round

Strategies (docs/glm130b.md §8): greedy; sampling as GLM-130B's ``BaseStrategy`` (temperature, banned
tokens filled with -65504, top-k then top-p keeping the first token that crosses p, softmax in
fp32); beam search as its ``BeamSearchStrategy`` (see ``BeamSearch``).

The context is encoded once into a KV cache; every later step runs one token per live sequence
(beam search reorders the cache with ``KVCache.reorder``). ``decode_batch`` runs many requests
at once: contexts are left-padded to a common length, padding keys are blocked by the mask and
each row keeps its own position ids, so a request gives the same result alone or in a batch
(greedy; up to float rounding in the batched matmuls). Finished rows leave the batch.

Blank filling (docs/glm130b.md §4.3): the mask type in use is [MASK] if the prompt has one, else [sMASK],
else [gMASK] (appended when the prompt has no mask). Blanks of that type are filled left to
right, one decoding round each, every round seeing the earlier blanks already filled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from glmctl.errors import UsageError
from glmctl.model import parallel as tp
from glmctl.model.masks import build_mask, prepare_prompt

FILLER = -65504.0  # GLM-130B's "minus infinity" for banned logits (fp16's lowest finite value)
STRATEGIES = ("greedy", "sample", "beam")
MASK_NAMES = ("[MASK]", "[sMASK]", "[gMASK]")


@dataclass
class GenerationConfig:
    strategy: str = "greedy"  # greedy | sample | beam
    max_new_tokens: int = 64  # decoding steps per blank (a terminator counts as one)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 0.0  # 0 = off
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0  # end tokens are banned until this many tokens were generated
    seed: int | None = None
    end_token_ids: tuple | None = None  # default (eop, eos, eod)
    banned_token_ids: tuple = ()
    banned_first_token_ids: tuple = ()
    deterministic: bool = True  # beam search: top-k candidate pick (else multinomial w/o replacement)
    consider_end: bool = True  # beam search: unfinished beams count as hypotheses at the end

    def validate(self) -> "GenerationConfig":
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {self.strategy!r}; choose greedy, sample or beam")
        checks = [(self.max_new_tokens >= 1, "max-new-tokens must be at least 1"),
                  (self.temperature > 0, "temperature must be positive"),
                  (self.top_k >= 0, "top-k must be 0 (off) or positive"),
                  (0.0 <= self.top_p <= 1.0, "top-p must be between 0 (off) and 1"),
                  (self.num_beams >= 1, "num-beams must be at least 1"),
                  (self.no_repeat_ngram_size >= 0, "no-repeat-ngram-size must be 0 (off) or positive"),
                  (self.min_new_tokens >= 0, "min-new-tokens must be 0 or positive")]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        return self


@dataclass
class Hypothesis:
    """Generated tokens WITHOUT <sop> and WITHOUT the terminator, and the score.

    score: greedy/sample - the sum of the chosen tokens' log-probabilities (after bans, before
    temperature and top-k/top-p); beam - GLM-130B's length-penalized cumulative log-probability.
    stop_token: the terminator that ended it, or None when the length limit did.
    """
    tokens: list[int]
    score: float
    stop_token: int | None = None


@dataclass
class DecodeRequest:
    tokens: list[int]  # ends with <sop>
    positions: list[int]
    prefix_len: int  # the first prefix_len tokens are bidirectional
    next_position: Callable[[int], int]  # position id of the k-th token from <sop>
    seed: int | None = None  # sampling seed for this request (default: gen.seed)


def end_token_ids(gen: GenerationConfig, ids: dict) -> tuple:
    """GLM-130B stops a span at eop or eos (docs/glm130b.md §8.1). glmctl also stops at eod: a model
    pre-trained on documents separated by eod (every glmctl tokens artifact) ends a document
    with it, and what follows belongs to another one."""
    if gen.end_token_ids is not None:
        return tuple(gen.end_token_ids)
    return tuple(dict.fromkeys([ids["eop"], ids["eos"]] + ([ids["eod"]] if "eod" in ids else [])))


def derive_seed(seed: int, *parts) -> int:
    """A seed for a sub-stream (a prompt, a blank) that does not depend on batching."""
    h = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# ---- logit processing --------------------------------------------------------------------
def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       filler: float = FILLER) -> torch.Tensor:
    """SAT's ``top_k_logits`` for any number of rows [..., V] (docs/glm130b.md §8.2).

    top-k keeps logits >= the k-th largest; top-p sorts, takes the cumulative softmax and removes
    the tokens past p, always keeping the first token that crosses p.
    """
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, filler)
    if top_p > 0.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.cumsum(torch.softmax(sorted_logits.float(), dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, sorted_idx, remove), filler)
    return logits


class NgramBans:
    """GLM-130B's no-repeat-ngram table for one sequence: (n-1)-token prefix -> tokens seen after it.

    Only generated tokens are recorded, but their prefixes may reach into the context (<sop> and
    the prompt), exactly as in BeamSearchStrategy. For n = 1 (GLM-130B's unfinished case) the
    prefix is empty: no generated token is repeated.
    """

    def __init__(self, n: int, table: dict | None = None):
        self.n = n
        self.table: dict[tuple, tuple] = dict(table or {})

    def key(self, seq: list[int]) -> tuple:
        return tuple(seq[len(seq) - (self.n - 1):]) if self.n > 1 else ()

    def banned(self, seq: list[int]) -> tuple:
        """Tokens that may not follow ``seq``; GLM applies bans only once len(seq) > n."""
        if self.n <= 0 or len(seq) <= self.n:
            return ()
        return self.table.get(self.key(seq), ())

    def record(self, seq: list[int], token: int) -> "NgramBans":
        """A copy with ``token`` recorded after ``seq`` (the parent's sequence)."""
        out = NgramBans(self.n, self.table)
        k = self.key(seq)
        out.table[k] = out.table.get(k, ()) + (int(token),)
        return out


def _ban(logits: torch.Tensor, row: int, tokens) -> None:
    toks = [t for t in tokens if 0 <= t < logits.shape[-1]]
    if toks:
        logits[row, toks] = FILLER


def banned_ids(gen: GenerationConfig, ends: tuple, step: int) -> list[int]:
    """Tokens banned at this step for every row: banned tokens, banned first tokens (step 0) and
    the end tokens while fewer than min_new_tokens were generated."""
    banned = list(gen.banned_token_ids)
    if step == 0:
        banned += list(gen.banned_first_token_ids)
    if gen.min_new_tokens > step:
        banned += list(ends)
    return banned


# ---- strategies: one object per request, driven step by step ----------------------------
class _Strategy:
    """step(logits [rows, V] of this request's live rows) -> (parents, tokens) for the next step
    (parents index the live rows); ``done`` once finished; ``result()`` the hypotheses."""

    done = False

    def __init__(self, context: list[int], gen: GenerationConfig, ends: tuple, generator):
        self.context, self.gen, self.ends, self.generator = list(context), gen, ends, generator
        self.step_index = 0


class Sampler(_Strategy):
    """Greedy (argmax) or GLM-130B BaseStrategy sampling, for one sequence."""

    def __init__(self, context, gen, ends, generator, on_token=None):
        super().__init__(context, gen, ends, generator)
        self.generated: list[int] = []
        self.score = 0.0
        self.stop_token = None
        self.bans = NgramBans(gen.no_repeat_ngram_size)
        self.on_token = on_token

    def step(self, logits: torch.Tensor):
        gen = self.gen
        seq = self.context + self.generated
        banned = banned_ids(gen, self.ends, self.step_index)
        if gen.no_repeat_ngram_size > 0:
            banned += list(self.bans.banned(seq))
        x = logits.float().clone()
        raw = x.clone()
        _ban(raw, 0, banned)
        if gen.strategy == "greedy":
            token = int(torch.argmax(raw[0]))
        else:  # BaseStrategy: / temperature, bans -> -65504, top-k, top-p, fp32 softmax, draw
            x = x / gen.temperature
            _ban(x, 0, banned)
            x = filter_top_k_top_p(x, gen.top_k, gen.top_p)
            probs = torch.softmax(x, dim=-1)
            token = int(torch.multinomial(probs[0], 1, generator=self.generator))
        self.score += float(torch.log_softmax(raw[0], dim=-1)[token])
        self.step_index += 1
        if gen.no_repeat_ngram_size > 0:
            self.bans = self.bans.record(seq, token)
        if token in self.ends:
            self.stop_token, self.done = token, True
            return [], []
        self.generated.append(token)
        if self.on_token is not None:
            self.on_token(token)
        return [0], [token]

    def finish(self):
        self.done = True

    def result(self) -> list[Hypothesis]:
        return [Hypothesis(list(self.generated), self.score, self.stop_token)]


class BeamSearch(_Strategy):
    """GLM-130B's BeamSearchStrategy for one request (docs/glm130b.md §8.3).

    * logits -> fp32; banned tokens and (before min_new_tokens) end tokens get -65504; per-beam
      no-repeat-ngram bans once the whole sequence (context included) is longer than n.
    * score = log_softmax + cumulative beam score, flattened over (beam x vocab).
    * (max(1, #end tokens) + 1) * num_beams candidates: top-k (deterministic) or a multinomial
      draw without replacement from the softmax of the flat scores; sorted by score.
    * walking the candidates: an end token becomes a finished hypothesis scored
      score / ((5 + L) / 6) ** length_penalty with L the length of the WHOLE sequence including
      the context and the end token (GLM-130B's quirk), at most num_beams kept; any other
      candidate continues until num_beams continuing beams are collected.
    * done when num_beams finished hypotheses exist and the worst of them is >= the best live
      score / ((5 + seq_len + 1) / 6) ** length_penalty.
    * at the end, with consider_end, the live beams are added as hypotheses (penalized the same
      way). Deviations from GLM-130B: its finalize loops over ``range(batch_size)`` instead of
      the beams (so with batch 1 only beam 0 is added); here every live beam is. Without
      consider_end, the finished hypotheses are returned, or the live beams if none finished.
      The deterministic pick takes top-k of the scores rather than of their softmax (the same
      order, without underflow ties).
    """

    def __init__(self, context, gen, ends, generator):
        super().__init__(context, gen, ends, generator)
        self.nb = gen.num_beams
        self.beams: list[list[int]] = [[]]  # generated tokens of each live beam
        self.scores = torch.zeros(1)
        self.bans = [NgramBans(gen.no_repeat_ngram_size)]
        self.ended: list[tuple[float, list[int], int | None]] = []  # (penalized score, tokens, end)

    def _penalty(self, length: int) -> float:
        return ((5.0 + length) / 6) ** self.gen.length_penalty

    def _add_end(self, score: float, length: int, tokens: list[int], end: int | None):
        score = score / self._penalty(length)
        i = 0
        while i < len(self.ended) and self.ended[i][0] > score:
            i += 1
        self.ended.insert(i, (score, tokens, end))
        del self.ended[self.nb:]

    def step(self, logits: torch.Tensor):
        gen = self.gen
        n_live, V = logits.shape
        logits = logits.float().clone()
        banned = banned_ids(gen, self.ends, self.step_index)
        for i in range(n_live):
            _ban(logits, i, banned)
        seq_len = len(self.context) + self.step_index  # tokens before this step's append
        if gen.no_repeat_ngram_size > 0:
            for i in range(n_live):
                _ban(logits, i, self.bans[i].banned(self.context + self.beams[i]))
        scores = torch.log_softmax(logits, dim=-1) + self.scores.to(logits.device)[:, None]
        flat = scores.reshape(-1)
        k = min((max(1, len(self.ends)) + 1) * self.nb, flat.numel())
        if gen.deterministic:
            cand = torch.topk(flat, k).indices
        else:
            probs = torch.softmax(flat, dim=-1)
            if int((probs > 0).sum()) >= k:
                cand = torch.multinomial(probs, k, replacement=False, generator=self.generator)
            else:  # too few non-zero probabilities to draw k distinct candidates
                cand = torch.topk(flat, k).indices
        cand_scores = flat[cand]
        order = torch.sort(cand_scores, descending=True, stable=True).indices
        cand, cand_scores = cand[order].tolist(), cand_scores[order].tolist()

        parents, tokens, new_beams, new_scores, new_bans = [], [], [], [], []
        for flat_index, s in zip(cand, cand_scores):
            parent, token = divmod(flat_index, V)
            if token in self.ends:
                self._add_end(s, seq_len + 1, self.beams[parent] + [token], token)
            elif len(new_beams) < self.nb:
                parents.append(parent)
                tokens.append(token)
                new_beams.append(self.beams[parent] + [token])
                new_scores.append(s)
                if gen.no_repeat_ngram_size > 0:
                    new_bans.append(self.bans[parent].record(self.context + self.beams[parent], token))
            else:
                break
        self.step_index += 1
        self.beams, self.scores = new_beams, torch.tensor(new_scores, dtype=torch.float32)
        self.bans = new_bans if gen.no_repeat_ngram_size > 0 else [self.bans[0]] * len(new_beams)
        if not new_beams:
            self.done = True
        elif (len(self.ended) == self.nb
              and self.ended[-1][0] >= max(new_scores) / self._penalty(seq_len + 1)):
            self.done = True
        if self.done:
            return [], []
        return parents, tokens

    def finish(self):
        """Stop at the length limit: add the live beams as hypotheses (consider_end)."""
        if self.gen.consider_end and not self.done:
            length = len(self.context) + self.step_index
            for beam, s in zip(self.beams, self.scores.tolist()):
                self._add_end(s, length, list(beam), None)
        self.done = True

    def result(self) -> list[Hypothesis]:
        if self.ended:
            return [Hypothesis(list(toks[:-1]) if end is not None else list(toks), float(s), end)
                    for s, toks, end in self.ended]
        order = sorted(range(len(self.beams)), key=lambda i: -float(self.scores[i]))
        return [Hypothesis(list(self.beams[i]), float(self.scores[i]), None) for i in order]


# ---- the decoding loop ---------------------------------------------------------------------
def _device_of(model) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")




def _shared_seed(seed: int | None) -> int:
    """A seed every tensor-parallel rank agrees on (rank 0's random one when ``seed`` is None)."""
    if seed is not None:
        return int(seed)
    s = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
    if tp.tp_size() > 1:
        t = torch.tensor([s], dtype=torch.long)
        if dist.get_backend(tp.tp_group()) == "nccl":
            t = t.cuda()
        dist.broadcast(t, src=dist.get_rank() - tp.tp_rank(), group=tp.tp_group())
        s = int(t.item())
    return s


def decode_batch(model, requests: list[DecodeRequest], gen: GenerationConfig, ids: dict,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[Hypothesis]]:
    """Decode several requests at once; returns each request's hypotheses, best first.

    ``on_token(request_index, token)`` is called for every generated token as it is produced
    (greedy and sampling; beam search cannot know its final tokens before the end).
    """
    gen.validate()
    if not requests:
        return []
    device = _device_of(model)
    max_len = model.config.max_sequence_length
    pad = ids.get("pad", 0)
    needs_rng = gen.strategy == "sample" or (gen.strategy == "beam" and not gen.deterministic)
    base_seed = _shared_seed(gen.seed) if needs_rng else 0

    strategies: list[_Strategy] = []
    limits = []
    for i, r in enumerate(requests):
        cb = (lambda tok, _i=i: on_token(_i, tok)) if on_token is not None else None
        s, limit = new_strategy(r, gen, ids, device, max_len, base_seed, cb)
        strategies.append(s)
        limits.append(limit)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batch = DecodeBatch(model, pad)
            batch.join(list(range(len(requests))), requests, strategies, limits)
            while len(batch):
                batch.step()
    finally:
        model.train(was_training)
    return [s.result() for s in strategies]


def new_strategy(r: DecodeRequest, gen: GenerationConfig, ids: dict, device, max_len: int, default_seed: int = 0,
                 on_token: Callable[[int], None] | None = None) -> tuple[_Strategy, int]:
    """The strategy object that decodes request ``r`` and its limit of new tokens (the model's
    window included). Sampling draws from a generator seeded with ``r.seed`` (else
    ``default_seed``); ``on_token(token)`` is called for each token (greedy and sampling)."""
    if not r.tokens:
        raise ValueError("a decode request needs at least the <sop> token")
    if len(r.positions) != len(r.tokens) or not 0 <= r.prefix_len <= len(r.tokens):
        raise ValueError("positions must match tokens and prefix_len must lie within them")
    ends = end_token_ids(gen, ids)
    generator = None
    if gen.strategy == "sample" or (gen.strategy == "beam" and not gen.deterministic):
        generator = torch.Generator(device=device)
        generator.manual_seed(int(r.seed) if r.seed is not None else int(default_seed))
    if gen.strategy == "beam":
        s = BeamSearch(r.tokens, gen, ends, generator)
    else:
        s = Sampler(r.tokens, gen, ends, generator, on_token)
    return s, min(gen.max_new_tokens, max_len - len(r.tokens))


class DecodeBatch:
    """Requests decoding together, one step at a time: the loop of ``decode_batch``, and the
    continuous (iteration-level) batching of ``glmctl serve``.

    ``join(keys, requests, strategies, limits)`` encodes the new requests' contexts (left-padded
    to a common length, padding blocked by the mask, each row with its own position ids) and adds
    their rows to the shared KV cache; ``step()`` lets every request's strategy pick its next
    tokens from its rows' logits, removes the requests that finished (returning their keys) and
    runs one forward for the tokens of the others; ``drop(keys)`` removes requests at once (a
    cancelled one). A request's rows are contiguous (beam search reorders within them). Caches of
    different lengths are left-padded with blocked keys, so a request decodes the same alone or
    beside others (greedy; up to float rounding in the batched matmuls). A strategy finished from
    outside (``finish()``, e.g. a stop string) leaves at the next step. Call under
    ``torch.inference_mode()`` with the model in eval mode.

    The decode cache is a ``StaticKVCache`` sized at each join for the longest remaining
    request (every step writes one column in place), and the mask is derived, not rebuilt:
    ``blocked`` [rows, capacity] marks the padding columns once, every later column is a token's
    own and visible, and each step passes a view of its filled part.
    """

    def __init__(self, model, pad: int = 0):
        self.model, self.pad, self.device = model, pad, _device_of(model)
        self.cache = None  # StaticKVCache
        self.blocked: torch.Tensor | None = None  # bool [rows, capacity], aligned with the cache columns
        self.logits: torch.Tensor | None = None  # [rows, vocab]: the next pick of every row
        self.rows: list = []  # the key of each row
        self.entries: dict = {}  # key -> (request, strategy, limit)

    def __len__(self) -> int:
        return len(self.entries)

    def _room(self) -> int:
        """Columns the live requests may still append (one per step until their limit)."""
        return max([lim - s.step_index for _, s, lim in self.entries.values()] + [1])

    def join(self, keys: list, requests: list[DecodeRequest], strategies: list[_Strategy], limits: list[int]) -> list:
        """Add requests; returns the keys of those that finished without a step (no room left)."""
        done, new = [], []
        for k, r, s, lim in zip(keys, requests, strategies, limits):
            if lim <= 0:  # no room left in the model's window
                s.finish()
            if s.done:
                done.append(k)
            else:
                new.append((k, r, s, lim))
        if not new:
            return done
        B = len(new)
        L = max(len(r.tokens) for _, r, _, _ in new)
        tok = torch.full((B, L), self.pad, dtype=torch.long)
        pos = torch.zeros((B, L), dtype=torch.long)
        valid = torch.zeros((B, L), dtype=torch.bool)
        prefix = torch.zeros((B, L), dtype=torch.bool)
        for row, (_, r, _, _) in enumerate(new):  # left padding: every <sop> sits in the last column
            o = L - len(r.tokens)
            tok[row, o:] = torch.tensor(r.tokens)
            pos[row, o:] = torch.tensor(r.positions)
            valid[row, o:] = True
            prefix[row, o:o + r.prefix_len] = True
        mask = build_mask(prefix, torch.where(valid, 0, -1))  # padding sees nothing and is seen by no one
        tok, pos, mask, valid = tok.to(self.device), pos.to(self.device), mask.to(self.device), valid.to(self.device)
        pre = self.model.new_kv_cache()
        hidden = self.model(tok, pos, mask, kv_cache=pre, return_hidden=True)[:, -1]
        logits = self.model.logits(hidden).float()
        for k, r, s, lim in new:
            self.rows.append(k)
            self.entries[k] = (r, s, lim)
        self._merge(pre, valid, logits)
        return done

    def _merge(self, pre, valid: torch.Tensor, logits: torch.Tensor) -> None:
        """Copy a prefill's cache (rows appended after the live ones) into a new static cache with
        room for every live request, both parts right-aligned at the same column."""
        p = getattr(pre, "prefix_length", 0)  # a P-tuning prefix in front of the tokens (glmctl.adapters)
        new_cols = pre.length
        new_blocked = torch.cat([valid.new_zeros(valid.shape[0], p), ~valid], dim=1)
        old = self.cache
        old_cols = old.length if old is not None else 0
        if p and old is not None and old_cols != new_cols:
            raise ValueError("a P-tuned model decodes requests of different lengths only when they join together")
        T = max(old_cols, new_cols)
        R_old = old.k[0].shape[0] if old is not None else 0
        # uninitialised: below T every column is copied or zeroed here (padding must hold zeros, not
        # stale NaNs: a blocked key's weight is exactly 0, but 0 * NaN is not); above T a step writes
        # each column before any row reads it
        cache = self.model.new_static_kv_cache(R_old + valid.shape[0], T + self._room() + 1, zeros=False)
        cache.prefix_length = p
        blocked = torch.zeros(R_old + valid.shape[0], cache.capacity, dtype=torch.bool, device=self.device)
        blocked[:, :T] = True
        for layer in range(len(cache.k)):
            for dst, src_old, src_new in ((cache.k[layer], old and old.keys[layer], pre.keys[layer]),
                                          (cache.v[layer], old and old.values[layer], pre.values[layer])):
                if old is not None:
                    dst[:R_old, :, :T - old_cols].zero_()
                    dst[:R_old, :, T - old_cols:T] = src_old
                dst[R_old:, :, :T - new_cols].zero_()
                dst[R_old:, :, T - new_cols:T] = src_new
        if old is not None:
            blocked[:R_old, T - old_cols:T] = self.blocked[:, old.start:old.start + old_cols]
        blocked[R_old:, T - new_cols:T] = new_blocked
        cache.fill = [T] * len(cache.k)
        self.cache, self.blocked = cache, blocked
        self.logits = logits if self.logits is None or not R_old else torch.cat([self.logits, logits])

    def _select(self, index: list[int]) -> None:
        if index == list(range(len(self.rows))):
            return
        if not index:
            self.cache = self.blocked = self.logits = None
            return
        idx = torch.tensor(index, device=self.device)
        self.cache.reorder(idx)
        self.blocked = self.blocked.index_select(0, idx)
        if self.logits is not None:
            self.logits = self.logits.index_select(0, idx)
        # keys that no row sees any more (the padding of a request that left) are skipped
        c = self.cache
        seen = ~self.blocked[:, c.start:c.fill[0]]
        first = int(seen.any(dim=0).float().argmax())
        c.start += first

    def drop(self, keys) -> None:
        """Remove these requests (not stepped again; their strategies keep what they had)."""
        keys = set(keys) & set(self.entries)
        if not keys:
            return
        keep = [i for i, k in enumerate(self.rows) if k not in keys]
        self._select(keep)
        self.rows = [self.rows[i] for i in keep]
        for k in keys:
            del self.entries[k]

    def step(self) -> list:
        """One decoding step for every request; returns the keys that finished."""
        finished, index, new_rows, new_tokens = [], [], [], []
        r0 = 0
        while r0 < len(self.rows):
            key = self.rows[r0]
            r1 = r0
            while r1 < len(self.rows) and self.rows[r1] == key:
                r1 += 1
            _, s, limit = self.entries[key]
            if not s.done:
                parents, tokens = s.step(self.logits[r0:r1])
                if not s.done and s.step_index >= limit:
                    s.finish()
            if s.done:
                finished.append(key)
                del self.entries[key]
            else:
                index += [r0 + p for p in parents]
                new_rows += [key] * len(parents)
                new_tokens += tokens
            r0 = r1
        self.logits = None
        self._select(index)
        self.rows = new_rows
        if not new_rows:
            return finished
        c = self.cache
        end = c.fill[0] + 1  # the new token's column
        if end > self.blocked.shape[1]:  # past the planned capacity: the cache grows itself, the mask here
            self.blocked = torch.cat([self.blocked, torch.zeros_like(self.blocked)], dim=1)
        step_mask = self.blocked[:, None, None, c.start + c.prefix_length:end]
        step_tok = torch.tensor(new_tokens, dtype=torch.long, device=self.device)[:, None]
        step_pos = torch.tensor([self.entries[k][0].next_position(self.entries[k][1].step_index) for k in new_rows],
                                dtype=torch.long, device=self.device)[:, None]
        hidden = self.model.decode_step(step_tok, step_pos, step_mask, c, return_hidden=True)[:, -1]
        self.logits = self.model.logits(hidden).float()
        return finished


def decode(model, tokens: list[int], positions: list[int], prefix_len: int,
           next_position: Callable[[int], int], gen: GenerationConfig, ids: dict,
           on_token: Callable[[int], None] | None = None) -> list[Hypothesis]:
    """Generate after ``tokens`` (which end with <sop>); hypotheses best first (one for
    greedy/sample, up to num_beams for beam). The first ``prefix_len`` tokens are bidirectional,
    the rest causal; ``next_position(k)`` is the position id of the k-th token from <sop>."""
    cb = (lambda _i, t: on_token(t)) if on_token is not None else None
    return decode_batch(model, [DecodeRequest(list(tokens), list(positions), prefix_len, next_position)],
                        gen, ids, cb)[0]


# ---- blanks --------------------------------------------------------------------------------
def mask_in_use(tokens: list[int], ids: dict) -> int:
    """Spec §4.3: [MASK] if present, else [sMASK], else [gMASK]."""
    for name in MASK_NAMES:
        if ids[name] in tokens:
            return ids[name]
    return ids["[gMASK]"]


def span_request(context: list[int], mask_id: int, ids: dict, seed: int | None = None) -> DecodeRequest:
    """Decode input for the first ``mask_id`` of ``context`` (docs/glm130b.md §4.2): tokens = context + <sop>,
    the context bidirectional; [gMASK] positions continue, [MASK]/[sMASK] stay at the mask."""
    mask_index = context.index(mask_id)
    n = len(context)
    if mask_id == ids["[gMASK]"]:
        def next_position(k: int) -> int:
            return n + k
    else:
        def next_position(k: int) -> int:
            return mask_index
    tokens = list(context) + [ids["sop"]]
    return DecodeRequest(tokens, list(range(n)) + [next_position(0)], n, next_position, seed)


def generate_span(model, context: list[int], ids: dict, gen: GenerationConfig) -> list[Hypothesis]:
    """Fill the first mask of ``context`` (the mask in use, see ``mask_in_use``)."""
    req = span_request(list(context), mask_in_use(context, ids), ids)
    return decode_batch(model, [req], gen, ids)[0]


@dataclass
class FillResult:
    tokens: list[int]  # the completed token sequence (masks replaced, appended eos removed)
    spans: list[tuple[int, list[int]]]  # per blank: (start index in tokens, generated ids)
    hypotheses: list[list[Hypothesis]] = field(default_factory=list)  # per blank, best first
    mask_id: int | None = None


def span_generation(gen: GenerationConfig, ids: dict) -> GenerationConfig:
    """``gen`` for filling blanks: a generated mask token would be read as a new blank (and could
    loop forever), a generated <sop> as the start of a span, so neither may appear inside a span."""
    never = tuple(ids[m] for m in MASK_NAMES) + (ids["sop"],)
    return dataclasses.replace(gen, banned_token_ids=tuple(gen.banned_token_ids) + never)


class BlankFill:
    """One prompt's blanks (docs/glm130b.md §4.3), filled one decoding round at a time.

    ``request()`` is the next round's decode input (None once every blank of the mask in use is
    filled); ``complete(hypotheses)`` puts the best one in that blank's place, so the next round
    sees it as context; ``result()`` is the FillResult. ``seed``: this prompt's sampling seed
    (blank k decodes with ``derive_seed(seed, k)``).
    """

    def __init__(self, prompt: list[int], ids: dict, seed: int | None = None):
        self.ids, self.seed = ids, seed
        self.tokens = prepare_prompt(list(prompt), ids)  # appends either [gMASK] or eos, never both
        self.appended_eos = len(self.tokens) > len(prompt) and self.tokens[-1] == ids["eos"]
        self.mask = mask_in_use(self.tokens, ids)
        self.spans: list[tuple[int, list[int]]] = []
        self.hypotheses: list[list[Hypothesis]] = []

    @property
    def blank(self) -> int:
        return len(self.spans)

    @property
    def done(self) -> bool:
        return self.mask not in self.tokens

    @property
    def mask_index(self) -> int:
        return self.tokens.index(self.mask)

    def request(self) -> DecodeRequest | None:
        if self.done:
            return None
        seed = None if self.seed is None else derive_seed(self.seed, self.blank)
        return span_request(self.tokens, self.mask, self.ids, seed)

    def complete(self, hyps: list[Hypothesis]) -> None:
        best = hyps[0].tokens if hyps else []
        mi = self.mask_index
        self.tokens = self.tokens[:mi] + list(best) + self.tokens[mi + 1:]
        self.spans.append((mi, list(best)))
        self.hypotheses.append(hyps)

    def result(self) -> FillResult:
        toks = self.tokens
        if self.appended_eos and toks and toks[-1] == self.ids["eos"]:
            toks = toks[:-1]
        return FillResult(toks, self.spans, self.hypotheses, self.mask)


def fill_batch(model, prompts: list[list[int]], ids: dict, gen: GenerationConfig,
               on_token: Callable[[int, int, int], None] | None = None,
               seeds: list[int | None] | None = None,
               on_blank_start: Callable[[int, int, list[int], int], None] | None = None) -> list[FillResult]:
    """``fill`` for several prompts; round r decodes the r-th blank of every prompt together.
    Spans never contain a mask token or <sop> (they are banned while filling).

    on_token(prompt_index, blank_index, token); on_blank_start(prompt_index, blank_index,
    current_tokens, mask_index) before each blank (streaming uses both). ``seeds`` gives each
    prompt its sampling seed (each blank then gets a seed derived from it).
    """
    gen = span_generation(gen.validate(), ids)
    fills = [BlankFill(p, ids, seeds[i] if seeds is not None and seeds[i] is not None else gen.seed)
             for i, p in enumerate(prompts)]
    blank = 0
    while True:
        todo = [i for i, f in enumerate(fills) if not f.done]
        if not todo:
            break
        reqs = []
        for i in todo:
            reqs.append(fills[i].request())
            if on_blank_start is not None:
                on_blank_start(i, blank, fills[i].tokens, fills[i].mask_index)
        cb = None
        if on_token is not None:
            cb = (lambda j, t, _b=blank, _todo=todo: on_token(_todo[j], _b, t))
        for i, hyps in zip(todo, decode_batch(model, reqs, gen, ids, cb)):
            fills[i].complete(hyps)
        blank += 1
    return [f.result() for f in fills]


def fill(model, tokens: list[int], ids: dict, gen: GenerationConfig) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """GLM-130B's generate.py semantics (docs/glm130b.md §4.3): the blanks of the mask in use are filled
    left to right, one at a time, each seeing the earlier ones filled; with no mask, [gMASK] is
    appended and the text continued. Mask tokens and <sop> are banned inside spans (a generated
    mask would become a new blank). Returns (final tokens, [(start index, generated ids)])."""
    r = fill_batch(model, [list(tokens)], ids, gen)[0]
    return r.tokens, r.spans


__all__ = ["GenerationConfig", "Hypothesis", "DecodeRequest", "BeamSearch", "Sampler", "NgramBans",
           "decode", "decode_batch", "generate_span", "fill", "fill_batch", "FillResult",
           "filter_top_k_top_p", "end_token_ids", "mask_in_use", "span_request", "derive_seed",
           "banned_ids", "FILLER", "DecodeBatch", "new_strategy", "BlankFill", "span_generation"]
