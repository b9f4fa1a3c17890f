"""Decoding for GLM models, shared by ``glmctl generate`` and ``glmctl evaluate``.

    decode(model, tokens, positions, prefix_len, next_position, gen, ids) -> [Hypothesis]
    generate_span(model, context, ids, gen)                              -> [Hypothesis]
    fill(model, tokens, ids, gen)                                        -> (final_tokens, spans)

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
    ends = end_token_ids(gen, ids)
    device = _device_of(model)
    max_len = model.config.max_sequence_length
    pad = ids.get("pad", 0)
    needs_rng = gen.strategy == "sample" or (gen.strategy == "beam" and not gen.deterministic)
    base_seed = _shared_seed(gen.seed) if needs_rng else 0

    strategies: list[_Strategy] = []
    limits = []
    for i, r in enumerate(requests):
        if not r.tokens:
            raise ValueError("a decode request needs at least the <sop> token")
        if len(r.positions) != len(r.tokens) or not 0 <= r.prefix_len <= len(r.tokens):
            raise ValueError("positions must match tokens and prefix_len must lie within them")
        generator = None
        if needs_rng:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(r.seed) if r.seed is not None else base_seed)
        if gen.strategy == "beam":
            s = BeamSearch(r.tokens, gen, ends, generator)
        else:
            cb = (lambda tok, _i=i: on_token(_i, tok)) if on_token is not None else None
            s = Sampler(r.tokens, gen, ends, generator, cb)
        strategies.append(s)
        limits.append(min(gen.max_new_tokens, max_len - len(r.tokens)))

    for s, lim in zip(strategies, limits):
        if lim <= 0:  # no room left in the model's window
            s.finish()

    active = [i for i, s in enumerate(strategies) if not s.done]
    if not active:
        return [s.result() for s in strategies]

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            _run(model, requests, strategies, limits, active, device, pad)
    finally:
        model.train(was_training)
    return [s.result() for s in strategies]


def _run(model, requests, strategies, limits, active, device, pad):
    B = len(active)
    L = max(len(requests[i].tokens) for i in active)
    tok = torch.full((B, L), pad, dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    valid = torch.zeros((B, L), dtype=torch.bool)
    prefix = torch.zeros((B, L), dtype=torch.bool)
    for row, i in enumerate(active):  # left padding: every <sop> sits in the last column
        r = requests[i]
        o = L - len(r.tokens)
        tok[row, o:] = torch.tensor(r.tokens)
        pos[row, o:] = torch.tensor(r.positions)
        valid[row, o:] = True
        prefix[row, o:o + r.prefix_len] = True
    sample = torch.where(valid, 0, -1)
    mask = build_mask(prefix, sample)  # padding sees nothing and is seen by no one
    tok, pos, mask, valid = tok.to(device), pos.to(device), mask.to(device), valid.to(device)
    cache = model.new_kv_cache()
    hidden = model(tok, pos, mask, kv_cache=cache, return_hidden=True)[:, -1]
    logits = model.logits(hidden).float()
    rows = list(active)  # the request of each row
    key_valid = valid
    step = 0
    while True:
        index, new_rows, new_tokens = [], [], []
        r0 = 0
        while r0 < len(rows):
            i = rows[r0]
            r1 = r0
            while r1 < len(rows) and rows[r1] == i:
                r1 += 1
            s = strategies[i]
            parents, tokens = s.step(logits[r0:r1])
            if not s.done and step + 1 >= limits[i]:
                s.finish()
            if not s.done:
                index += [r0 + p for p in parents]
                new_rows += [i] * len(parents)
                new_tokens += tokens
            r0 = r1
        step += 1
        if not new_rows:
            break
        if index != list(range(len(rows))):
            idx = torch.tensor(index, device=device)
            cache.reorder(idx)
            key_valid = key_valid.index_select(0, idx)
        rows = new_rows
        R = len(rows)
        key_valid = torch.cat([key_valid, torch.ones(R, 1, dtype=torch.bool, device=device)], dim=1)
        step_mask = ~key_valid[:, None, None, :]
        step_tok = torch.tensor(new_tokens, dtype=torch.long, device=device)[:, None]
        step_pos = torch.tensor([requests[i].next_position(step) for i in rows], dtype=torch.long,
                                device=device)[:, None]
        hidden = model(step_tok, step_pos, step_mask, kv_cache=cache, return_hidden=True)[:, -1]
        logits = model.logits(hidden).float()


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
    gen.validate()
    # a generated mask token would be read as a new blank (and could loop forever), a generated
    # <sop> as the start of a span: neither may appear inside a span
    never = tuple(ids[m] for m in MASK_NAMES) + (ids["sop"],)
    gen = dataclasses.replace(gen, banned_token_ids=tuple(gen.banned_token_ids) + never)
    states = []
    for p in prompts:
        toks = prepare_prompt(list(p), ids)  # appends either [gMASK] or eos, never both
        states.append({"tokens": toks, "mask": mask_in_use(toks, ids), "spans": [], "hyps": [],
                       "appended_eos": len(toks) > len(p) and toks[-1] == ids["eos"]})
    blank = 0
    while True:
        todo = [i for i, s in enumerate(states) if s["mask"] in s["tokens"]]
        if not todo:
            break
        reqs = []
        for i in todo:
            s = states[i]
            seed = None
            if seeds is not None and seeds[i] is not None:
                seed = derive_seed(seeds[i], blank)
            elif gen.seed is not None:
                seed = derive_seed(gen.seed, blank)
            reqs.append(span_request(s["tokens"], s["mask"], ids, seed))
            if on_blank_start is not None:
                on_blank_start(i, blank, s["tokens"], s["tokens"].index(s["mask"]))
        cb = None
        if on_token is not None:
            cb = (lambda j, t, _b=blank, _todo=todo: on_token(_todo[j], _b, t))
        results = decode_batch(model, reqs, gen, ids, cb)
        for i, hyps in zip(todo, results):
            s = states[i]
            best = hyps[0].tokens if hyps else []
            mi = s["tokens"].index(s["mask"])
            s["tokens"] = s["tokens"][:mi] + list(best) + s["tokens"][mi + 1:]
            s["spans"].append((mi, list(best)))
            s["hyps"].append(hyps)
        blank += 1
    out = []
    for s in states:
        toks = s["tokens"]
        if s["appended_eos"] and toks and toks[-1] == ids["eos"]:
            toks = toks[:-1]
        out.append(FillResult(toks, s["spans"], s["hyps"], s["mask"]))
    return out


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
           "banned_ids", "FILLER"]
