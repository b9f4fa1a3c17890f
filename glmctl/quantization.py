"""Quantization in bounded memory: INT8/INT4 RTN and GPTQ (docs/glm130b.md §7.1) streamed from a
checkpoint's files into per-rank output files, and the parent-vs-quantized quality report run
layer by layer. No step ever holds a whole model.

    reader = CheckpointReader("model")                       # the fp parent, any stored TP
    out = OutputLayout(reader.cfg, variant, tp_out=4, stored=torch.float16, scale_dtype=torch.float16)
    write_quantized(reader, out, RTN(reader, out), sink.write)        # tensor by tensor
    write_quantized(reader, out, GPTQ(reader, out, calib, opts), sink.write)   # layer by layer
    parent_row, rows = layerwise_report(cfg, parent_get, [variant_get], windows, opts)

* RTN reads, tensor by tensor, only the slice each output rank holds (CheckpointReader) and
  quantizes that slice: per-row scales are then per rank, as GLM-130B quantizes at its serving TP
  (a row-parallel layer's scale covers the rank's in/TP columns; stored as group scales of
  G = gcd(hidden/TP, inner/TP), the form convert uses for SAT's per-rank scales). With
  --group-size G dividing in/TP the result is the TP=1 quantization sliced. Peak memory: a few
  tensors.
* GPTQ runs at TP=1 one block at a time (glmctl.gptq.gptq_layer): the calibration activations of
  the current layer boundary (``ActivationStore``: in memory up to a budget, memory-mapped files
  beyond) give the block's Hessians, the block is quantized, and the activations go through the
  *quantized* block to the next. Peak memory: the activations, the finished linears' codes, and
  one linear's weight with its Hessian (each weight is read when its turn comes and rebuilt from
  its codes only for its own forwards; docs/quantize.md, "Memory").
  The output is then sliced per rank (needs G | in/TP at TP > 1).
* The report runs the parent and each quantized model block by block over the evaluation
  windows (final hidden states kept, spilled beyond the budget), then scores the windows batch
  by batch exactly as a whole-model forward would (same modules, same batches, same order).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glmctl import console, tp_layout
from glmctl.checkpoint import CheckpointReader, build_model, is_float_weight, layer_from_state_dict, \
    model_from_state_dict, parse_dtype
from glmctl.data import TokenDataset
from glmctl.errors import InputError, UsageError
from glmctl.gptq import LINEAR_NAMES, gptq_layer, materialized, released_tensor
from glmctl.kernels import quantize_rtn
from glmctl.model.glm import EMBEDDING_KEY, GLMBlock, quantize_embedding_rows
from glmctl.model.masks import lm_window

METHODS = ("rtn", "gptq")
FP16_MAX = 65504.0


# ---- variants -------------------------------------------------------------------------------
@dataclass
class Variant:
    bits: int
    method: str
    group_size: int | None
    embedding: tuple[int, int | None] | None = None  # (bits, group size) of the tied embedding; None: kept fp

    @property
    def name(self) -> str:
        name = f"int{self.bits} {self.method} {'g' + str(self.group_size) if self.group_size else 'per-row'}"
        return name + (f" + {embedding_name(self.embedding)}" if self.embedding else "")

    def block(self) -> dict:
        """The config's quantization block (``embedding`` only when the embedding is quantized)."""
        b = {"bits": self.bits, "group_size": self.group_size, "method": self.method}
        if self.embedding:
            b["embedding"] = {"bits": self.embedding[0], "group_size": self.embedding[1]}
        return b


def embedding_name(spec: tuple[int, int | None] | None) -> str:
    if not spec:
        return "embedding fp"
    return f"embedding int{spec[0]} {'g' + str(spec[1]) if spec[1] else 'per-row'}"


def embedding_spec(bits: int | None, group_size: int | None, hidden_size: int) -> tuple[int, int | None] | None:
    """(bits, group) of the tied embedding: None (full precision, GLM-130B's) without ``bits``;
    ``group_size`` None picks one per row for INT8 and the largest group <= 128 dividing the
    hidden size for INT4 (128 for every preset but the tiny ones); 0 asks for one per row."""
    if bits is None:
        return None
    if group_size is None:
        group_size = max(g for g in range(1, 129) if hidden_size % g == 0) if bits == 4 else 0
    return bits, (group_size or None)


def parse_variant(spec: str, default_bits: int, embedding: tuple[int, int | None] | None = None,
                  hidden_size: int = 0) -> Variant:
    """'rtn', 'gptq:g128', 'int8', 'int4:rtn:g64', '8:rtn', 'rtn:row' -> Variant; the embedding
    is ``embedding`` (the written variant's) unless a token says otherwise: 'embfp' (full
    precision), 'emb8', 'emb4' (default groups, ``embedding_spec``), 'emb4g64', 'emb8g0' (per row)."""
    bits, method, group = default_bits, "rtn", None
    for tok in [t for t in spec.strip().lower().split(":") if t]:
        if tok in METHODS:
            method = tok
        elif tok in ("int4", "int8", "4", "8"):
            bits = int(tok[-1])
        elif tok in ("row", "per-row"):
            group = None
        elif tok.startswith("g") and tok[1:].isdigit() and int(tok[1:]) > 0:
            group = int(tok[1:])
        elif tok in ("embfp", "emb-fp"):
            embedding = None
        elif tok[:3] == "emb" and tok[3:4] in ("4", "8") and (tok[4:] == "" or (tok[4] == "g" and tok[5:].isdigit())):
            embedding = embedding_spec(int(tok[3]), int(tok[5:]) if tok[4:] else None, hidden_size)
        else:
            raise UsageError(f"--compare {spec!r}: cannot read {tok!r} (use e.g. rtn, gptq:g128, int8:rtn, rtn:row, "
                             "emb8, emb4g128, embfp)")
    return Variant(bits, method, group, embedding)


def check_variant(v: Variant, cfg, where: str) -> None:
    if v.embedding:
        eb, eg = v.embedding
        if eb not in (4, 8):
            raise UsageError(f"{where}: unsupported embedding bit width {eb}; choose 4 or 8")
        if eg is not None and (eg <= 0 or cfg.hidden_size % eg):
            raise UsageError(f"{where}: embedding group size {eg} does not divide the hidden size {cfg.hidden_size}")
    if v.bits not in (4, 8):
        raise UsageError(f"{where}: unsupported bit width {v.bits}; choose 4 or 8")
    if v.method not in METHODS:
        raise UsageError(f"{where}: unknown method {v.method!r}; choose rtn or gptq")
    if v.group_size is not None:
        if v.group_size <= 0:
            raise UsageError(f"{where}: group size must be positive, got {v.group_size}")
        for name, k in (("query_key_value/attention.dense/dense_h_to_4h", cfg.hidden_size),
                        ("dense_4h_to_h", cfg.inner_hidden_size)):
            if k % v.group_size:
                raise UsageError(f"{where}: group size {v.group_size} does not divide the {k} input columns "
                                 f"of {name}")


def output_group(v: Variant, cfg, tp_out: int, where: str) -> int | None:
    """The group size the output at ``tp_out`` records (UsageError where it cannot be written):
    ``v.group_size``, or for per-row RTN at TP > 1 the per-rank row scales as G = gcd(h/TP, f/TP)."""
    h, f = cfg.hidden_size, cfg.inner_hidden_size
    for what, n in (("attention heads", cfg.num_attention_heads), ("vocab rows", cfg.vocab_size),
                    ("FFN inner size", f), ("hidden size", h)):
        if tp_out < 1 or n % tp_out:
            raise UsageError(f"--tp {tp_out}: the {n} {what} do not split over {tp_out} ranks")
    if tp_out == 1:
        return v.group_size
    if v.bits == 4 and ((h // tp_out) % 2 or (f // tp_out) % 2):
        raise UsageError(f"--tp {tp_out}: packed INT4 needs an even number of input columns per rank")
    if v.group_size is not None:
        if (h // tp_out) % v.group_size or (f // tp_out) % v.group_size:
            raise UsageError(f"{where}: at --tp {tp_out} the group size {v.group_size} must divide the "
                             f"{h // tp_out} and {f // tp_out} input columns per rank of the row-parallel layers")
        return v.group_size
    if v.method == "gptq":
        raise UsageError(f"{where}: GPTQ with one scale per row runs on whole rows (TP=1); at --tp {tp_out} "
                         "pass --group-size G dividing in/TP, or --tp 1")
    return math.gcd(h // tp_out, f // tp_out)


def linear_keys(cfg) -> list[str]:
    return [f"transformer.layers.{i}.{n}.weight" for i in range(cfg.num_layers) for n in LINEAR_NAMES]


# ---- token windows --------------------------------------------------------------------------
def open_windows(path: str | Path, width: int):
    """Non-overlapping windows of ``width`` tokens of a tokens artifact (or Megatron prefix), in
    storage order (glmctl.data.TokenWindows; windows never cross a shard boundary)."""
    return TokenDataset.open(path).windows(width, stride=width)


def spread(slots: list, n: int) -> list:
    """``n`` slots evenly spread over ``slots`` (all of them when there are fewer)."""
    if n >= len(slots):
        return list(slots)
    return [slots[(i * len(slots)) // n] for i in range(n)]


@dataclass
class Windows:
    tokens: torch.Tensor  # int64 [N, seq_len]
    positions: torch.Tensor  # [seq_len]
    mask: torch.Tensor  # bool [1, 1, seq_len, seq_len]
    target_positions: torch.Tensor  # [T]
    targets: torch.Tensor  # int64 [N, T]
    source: str

    def batches(self, batch_size: int, device):
        for i in range(0, len(self.tokens), batch_size):
            tok = self.tokens[i:i + batch_size].to(device)
            yield (tok, self.positions.to(device).expand(tok.shape[0], -1), self.mask.to(device),
                   self.targets[i:i + batch_size].to(device))


def make_windows(windows, slots, seq_len: int, prefix: int, cfg, source: str) -> Windows:
    """GLM LM inputs (``masks.lm_window``) from the token windows with storage indices ``slots``."""
    rows, tgts = [], []
    for i in slots:
        seg = np.asarray(windows[i]).astype(np.int64)
        if seg.size and (seg.min() < 0 or seg.max() >= cfg.vocab_size):
            bad = int(seg.max() if seg.max() >= cfg.vocab_size else seg.min())
            raise InputError(f"{source}: token id {bad} (window {i} of {seq_len - 1} tokens) is outside the "
                             f"model's vocabulary of {cfg.vocab_size}")
        toks, pos, mask, tpos, targets = lm_window(seg[:prefix].tolist(), seg[prefix:].tolist(),
                                                   cfg.gmask_token_id, cfg.sop_token_id)
        rows.append(toks)
        tgts.append(targets)
    return Windows(torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long), mask,
                   torch.tensor(tpos, dtype=torch.long), torch.tensor(tgts, dtype=torch.long), source)


def select_windows(c, cfg, need_calibration: bool, need_eval: bool = True):
    """(calibration Windows or None, eval Windows or None); disjoint when from the same source.
    ``c``: a QuantizeConfig (seq_len, eval_prefix, calibration, eval, *_samples)."""
    seq_len, prefix = c.seq_len, c.eval_prefix
    width = seq_len - 1
    calib = evals = None
    same = c.eval is None or (c.calibration is not None and Path(c.eval).resolve() == Path(c.calibration).resolve())
    cal_shards = open_windows(c.calibration, width) if c.calibration else None
    if c.eval is not None and not same:
        ev_shards = open_windows(c.eval, width)
        ev_slots = spread(list(range(len(ev_shards))), c.eval_samples)
        if not ev_slots:
            raise InputError(f"{c.eval}: fewer than {width} tokens, not one window of --seq-len {seq_len}")
        evals = make_windows(ev_shards, ev_slots, seq_len, prefix, cfg, c.eval)
        cal_slots = list(range(len(cal_shards))) if cal_shards is not None else []
    elif cal_shards is not None and need_eval:  # eval = held-out tail of the calibration data
        slots = list(range(len(cal_shards)))
        if len(slots) < 2:
            raise InputError(f"{c.calibration}: needs at least two windows of {width} tokens for calibration "
                             "and a held-out evaluation slice; pass --eval or a smaller --seq-len")
        n_eval = min(c.eval_samples, len(slots) // 2)
        ev_slots, cal_slots = slots[len(slots) - n_eval:], slots[:len(slots) - n_eval]
        evals = make_windows(cal_shards, ev_slots, seq_len, prefix, cfg, f"{c.calibration} (held-out tail)")
    else:
        cal_slots = list(range(len(cal_shards))) if cal_shards is not None else []
    if need_calibration:
        if cal_shards is None:
            raise UsageError("gptq needs calibration tokens: pass --calibration TOKENS_DIR")
        cal_slots = spread(cal_slots, c.calibration_samples)
        if not cal_slots:
            raise InputError(f"{c.calibration}: no calibration window of {width} tokens left")
        if len(cal_slots) < c.calibration_samples:
            console.warn(f"{c.calibration}: only {len(cal_slots)} calibration windows of {seq_len} tokens "
                         f"(asked for {c.calibration_samples})")
        calib = make_windows(cal_shards, cal_slots, seq_len, prefix, cfg, c.calibration)
    if evals is not None and len(evals.tokens) < c.eval_samples:
        console.warn(f"{evals.source}: only {len(evals.tokens)} evaluation windows (asked for {c.eval_samples})")
    return calib, (evals if need_eval else None)


# ---- activations in bounded memory ----------------------------------------------------------
class ActivationStore:
    """A list of tensors (one per batch) kept in memory up to ``budget`` bytes, in memory-mapped
    files under ``spill_dir`` beyond it; read back bit for bit, moved to ``device``."""

    def __init__(self, budget: int, spill_dir: Path, device=None):
        self.budget, self.dir, self.device = budget, Path(spill_dir), device
        self.items: list = []
        self.in_memory = 0
        self.spilled = 0

    def append(self, t: torch.Tensor) -> None:
        t = t.detach()
        nbytes = t.numel() * t.element_size()
        if self.in_memory + nbytes <= self.budget:
            self.items.append(t)
            self.in_memory += nbytes
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.dir, suffix=".act")
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        self.items.append((name, tuple(t.shape), t.dtype, nbytes))
        self.spilled += nbytes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        it = self.items[i]
        if isinstance(it, torch.Tensor):
            return it if self.device is None else it.to(self.device)
        name, shape, dtype, nbytes = it
        t = torch.from_file(name, shared=False, size=nbytes, dtype=torch.uint8).view(dtype).reshape(shape)
        return t if self.device is None else t.to(self.device)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        for it in self.items:
            if not isinstance(it, torch.Tensor):
                Path(it[0]).unlink(missing_ok=True)
        self.items = []


# ---- the layer-by-layer network -------------------------------------------------------------
def layer_tensors(get, cfg, index: int) -> dict:
    """Block ``index``'s tensors from ``get(global name)``, named without the layer prefix."""
    prefix = f"transformer.layers.{index}."
    names = build_model(cfg.replace(tensor_parallel_size=1, num_layers=1), device="meta").state_dict()
    return {k[len("transformer.layers.0."):]: get(prefix + k[len("transformer.layers.0."):])
            for k in names if k.startswith("transformer.layers.0.")}


def build_ends(cfg, get, dtype, device):
    """Embedding, final LayerNorm and the tied output of ``cfg`` at TP=1 (a GLM with no layers);
    quantized when ``cfg.quantization`` has an ``embedding`` entry."""
    spec = (cfg.quantization or {}).get("embedding")
    names = (EMBEDDING_KEY, *((EMBEDDING_KEY + "_scale",) if spec else ()), "transformer.final_layernorm.weight",
             "transformer.final_layernorm.bias")
    return model_from_state_dict(cfg.replace(num_layers=0, tensor_parallel_size=1,
                                             quantization={"embedding": spec} if spec else None),
                                 {n: get(n) for n in names}, dtype, device, where="embedding and final LayerNorm")


def build_layer(cfg, index: int, get, dtype, device, unread=()):
    """Block ``index`` of ``cfg`` at TP=1, its tensors from ``get(global name)``. The weights of
    the linears named in ``unread`` (LINEAR_NAMES) are not read: they get their shape and dtype
    but hold no memory (glmctl.gptq.released_tensor), for gptq_layer's ``load``."""
    cfg = cfg.replace(tensor_parallel_size=1)
    prefix = f"transformer.layers.{index}."
    skip = {f"{prefix}{n}.weight" for n in unread}
    read = get
    if skip:
        shapes = {prefix + k: v.shape for k, v in GLMBlock(cfg, index, device="meta").state_dict().items()}
        # the dtype layer_from_state_dict gives the block: ``dtype``, or as stored (its LayerNorms')
        dt = parse_dtype(dtype) or get(prefix + "input_layernorm.weight").dtype

        def read(name):
            return released_tensor(shapes[name], dt, device) if name in skip else get(name)
    return layer_from_state_dict(cfg, index, layer_tensors(read, cfg, index), dtype, device, where=f"layer {index}")


def embed(ends, tokens, positions, mask, dtype=None):
    """What GLM.forward computes before its first layer: (hidden, (cos, sin, mask)); with
    ``dtype``, of ``ends`` kept in another dtype (the rows are cast, exactly as a cast table's)."""
    h = ends.embed(tokens)
    if dtype is not None:
        h = h.to(parse_dtype(dtype))
    h = ends.transformer.embedding_dropout(h)
    cos, sin = ends.rope(positions, h.dtype)
    return h, (cos, sin, mask.unsqueeze(1) if mask.dim() == 3 else mask)


@torch.no_grad()
def layerwise_hidden(cfg, get, batches, dtype, device, budget: int, spill_dir: Path, ends=None,
                     progress=None) -> tuple[ActivationStore, list]:
    """Final hidden states (before the final LayerNorm) of every batch of (tokens, positions,
    mask), computed one block at a time from ``get``; and the per-batch (cos, sin, mask)."""
    ends = ends if ends is not None else build_ends(cfg, get, dtype, device)
    acts, rest = ActivationStore(budget, spill_dir, device), []
    for tokens, positions, mask in batches:
        h, r = embed(ends, tokens, positions, mask)
        acts.append(h)
        rest.append(r)
    for i in range(cfg.num_layers):
        layer = build_layer(cfg, i, get, dtype, device)
        nxt = ActivationStore(budget, spill_dir, device)
        for x, (cos, sin, mask) in zip(acts, rest):
            nxt.append(layer(x, cos, sin, mask, None))
        acts.close()
        acts = nxt
        del layer
        if progress is not None:
            progress.update(1)
    return acts, rest


# ---- quantizing tensor by tensor --------------------------------------------------------------
class ScaleOverflow(Exception):
    """A weight (or its scale) exceeds fp16: the checkpoint's scales must be fp32 (start again)."""


def check_fp16(name: str, w: torch.Tensor, bits: int, scale_dtype) -> None:
    if scale_dtype == torch.float16:
        lo, hi = torch.aminmax(w) if w.numel() else (torch.zeros(()), torch.zeros(()))  # no |w| copy
        m = max(-lo.item(), hi.item())
        if m > FP16_MAX or m / (2 ** (bits - 1) - 1) > FP16_MAX:
            raise ScaleOverflow(name)


class OutputLayout:
    """The quantized checkpoint ``v`` of ``cfg`` at ``tp_out``: config, names and per-rank entries."""

    def __init__(self, cfg, v: Variant, tp_out: int, stored: torch.dtype, scale_dtype: torch.dtype,
                 group_out: int | None):
        self.v, self.tp, self.group, self.scale_dtype = v, tp_out, group_out, scale_dtype
        self.cfg = cfg.replace(quantization={**v.block(), "group_size": group_out}, tensor_parallel_size=tp_out)
        meta = build_model(self.cfg.replace(tensor_parallel_size=1), dtype=stored, device="meta").state_dict()
        self.names = list(meta)
        self.linears = set(linear_keys(cfg))
        self.entries = [[] for _ in range(tp_out)]
        self.dtypes = {}
        for n, t in meta.items():
            shape = tuple(t.shape)
            dim, ranges = tp_layout.rank_ranges(n, shape, tp_out, 0)
            if dim is not None:
                shape = tuple(sum(b - a for a, b in ranges) if d == dim else s for d, s in enumerate(shape))
            dtype = self.dtypes[n] = scale_dtype if n.endswith("weight_scale") else t.dtype
            for r in range(tp_out):
                self.entries[r].append((n, shape, dtype))

    def linear_bytes(self) -> int:
        """Bytes of the quantized linear weights and their scales, all ranks."""
        return sum(math.prod(shape) * dtype.itemsize for rank in self.entries for n, shape, dtype in rank
                   if n in self.linears or (n.endswith("weight_scale") and n[:-len("_scale")] in self.linears))

    def embedding_bytes(self) -> int:
        """Bytes of the tied embedding (and its scales when quantized), all ranks."""
        return sum(math.prod(shape) * dtype.itemsize for rank in self.entries for n, shape, dtype in rank
                   if n.startswith(EMBEDDING_KEY))

    def in_local(self, name: str) -> int:
        n = tp_layout.linear_in_features(name, self.cfg.hidden_size, self.cfg.inner_hidden_size)
        return n // self.tp if tp_layout.classify(name) == tp_layout.ROW else n


class RTN:
    """Round to nearest on each output rank's slice, read straight from the parent's files."""

    def __init__(self, reader: CheckpointReader, out: OutputLayout, progress=None):
        self.reader, self.out, self.progress = reader, out, progress

    def quantize(self, name: str, rank: int):
        v, out = self.out.v, self.out
        if self.progress is not None and rank == out.tp - 1:
            self.progress.update(1)
        w = self.reader.read(name, out.tp, rank)
        check_fp16(name, w, v.bits, out.scale_dtype)
        # GLM-130B quantizes the fp16 weight: absmax, the division by qmax and the quotient in fp16.
        w = w.to(torch.float16) if out.scale_dtype == torch.float16 else w.to(torch.float32)
        q, s = quantize_rtn(w, v.bits, v.group_size, scale_dtype=out.scale_dtype)
        if v.group_size != out.group:  # per-rank row scales in the checkpoint's group form (exact)
            s = tp_layout.regroup_scale(name + "_scale", s, out.in_local(name), v.group_size, out.group)
        return q, s


class GPTQ:
    """GPTQ at TP=1, one block at a time in layer order (``gptq_layer``), activations in an
    ActivationStore; each output rank gets its slice of the block's results. ``layers``
    restricts it to those blocks (the others are not quantized: a measurement of one block)."""

    def __init__(self, reader: CheckpointReader, out: OutputLayout, calib, *, batch_size: int, dtype, device,
                 block_size: int, damp: float, act_order: bool, budget: int, spill_dir: Path, progress=None):
        self.reader, self.out = reader, out
        self.opts = dict(block_size=block_size, damp=damp, act_order=act_order)
        self.dtype, self.device, self.progress = dtype, device, progress
        self.cfg = reader.cfg.replace(tensor_parallel_size=1)
        self.get = lambda n: reader.read(n, 1, 0)
        # The calibration windows need only their tokens' rows of the word embedding: a float
        # table stays as stored (fp16: 3.7 GB at GLM-130B's size, not 7.4 GB cast to fp32, more
        # than a block) and only the rows are cast
        float_table = not (self.cfg.quantization or {}).get("embedding")
        ends = build_ends(self.cfg, self.get, None if float_table else dtype, device)
        self.acts, self.rest = ActivationStore(budget, spill_dir, device), []
        with torch.no_grad():
            for tokens, positions, mask, _ in calib.batches(batch_size, device):
                h, r = embed(ends, tokens, positions, mask, dtype)
                self.acts.append(h)
                self.rest.append(r)
        del ends
        self.budget, self.spill_dir = budget, spill_dir
        self.layer, self.results = -1, {}
        self.max_damp = damp

    def run_layer(self, index: int) -> None:
        if index != self.layer + 1:
            raise AssertionError(f"GPTQ runs layers in order: {index} after {self.layer}")
        v = self.out.v
        # Memory (docs/quantize.md, "Memory"): the block is built without its four linears'
        # weights; gptq_layer loads each when its turn comes and leaves them released, and the
        # propagation rebuilds each from its codes for its own forward only
        layer = build_layer(self.cfg, index, self.get, self.dtype, self.device, unread=LINEAR_NAMES)

        def load(name):
            weight = layer.get_submodule(name).weight
            w = self.get(f"transformer.layers.{index}.{name}.weight").to(weight.dtype).to(weight.device)  # as built
            check_fp16(name, w, v.bits, self.out.scale_dtype)
            return w

        # each linear's captured inputs share the activations' budget (spilled beyond it)
        res = gptq_layer(layer, self.acts, self.rest, v.bits, v.group_size, scale_dtype=self.out.scale_dtype,
                         inputs=lambda: ActivationStore(max(0, self.budget - self.acts.in_memory), self.spill_dir,
                                                        self.device), load=load, keep_released=True, **self.opts)
        self.max_damp = max([self.max_damp] + [r.damp for r in res.values()])
        self.results = {f"transformer.layers.{index}.{n}.weight": (r.qweight, r.scale) for n, r in res.items()}
        if index + 1 < self.cfg.num_layers:
            nxt = ActivationStore(self.budget, self.spill_dir, self.device)
            with torch.no_grad(), materialized(layer, res, v.bits):
                for x, (cos, sin, mask) in zip(self.acts, self.rest):
                    nxt.append(layer(x, cos, sin, mask, None))
            self.acts.close()
            self.acts = nxt
        else:
            self.acts.close()
        self.layer = index
        if self.progress is not None:
            self.progress.update(len(LINEAR_NAMES))

    def quantize(self, name: str, rank: int):
        index = int(name.split(".")[2])
        while self.layer < index:
            self.run_layer(self.layer + 1)
        q, s = self.results[name]
        q, s = q.cpu(), s.cpu()
        return (tp_layout.shard_tensor(name, q, self.out.tp, rank).contiguous(),
                tp_layout.shard_tensor(name + "_scale", s, self.out.tp, rank).contiguous())

    def close(self) -> None:
        self.acts.close()


def write_quantized(reader: CheckpointReader, out: OutputLayout, quantizer, write, layers=None) -> None:
    """Every tensor of ``out`` for every rank into ``write(rank, name, tensor)``, in ``out.names``
    order: the four linears of each block quantized by ``quantizer``, everything else read as the
    rank's slice of the parent. ``layers``: quantize only these blocks, write nothing else."""
    scales = {}
    for name in out.names:
        if layers is not None:
            if not name.startswith("transformer.layers.") or int(name.split(".")[2]) not in layers:
                continue
        for r in range(out.tp):
            if name in out.linears:
                q, scales[r] = quantizer.quantize(name, r)
                write(r, name, q)
            elif name == EMBEDDING_KEY and out.v.embedding:  # rows: each rank's slice on its own
                w = reader.read(name, out.tp, r)
                check_fp16(name, w, out.v.embedding[0], out.scale_dtype)
                q, scales[r] = quantize_embedding_rows(w, *out.v.embedding, scale_dtype=out.scale_dtype)
                write(r, name, q)
            elif name.endswith("weight_scale"):
                write(r, name, scales.pop(r))
            else:
                t = reader.read(name, out.tp, r)
                dt = out.dtypes[name] if is_float_weight(name, t) else t.dtype
                write(r, name, t if t.dtype == dt else t.to(dt))


class SpillSink:
    """Tensors of a variant that is evaluated but not written: one safetensors file each under
    ``directory`` (TP=1, rank 0), read back by ``get``."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, Path] = {}

    def write(self, rank: int, name: str, t: torch.Tensor) -> None:
        f = self.dir / f"{len(self.files):06d}.safetensors"
        save_file({name: t.contiguous()}, str(f))
        self.files[name] = f

    def get(self, name: str, fallback) -> torch.Tensor:
        if name not in self.files:
            return fallback(name)
        with safe_open(str(self.files[name]), framework="pt") as h:
            return h.get_tensor(name)

    def close(self) -> None:
        """Nothing to finish: every tensor is its own complete file."""


# ---- the quality report, layer by layer --------------------------------------------------------
@torch.no_grad()
def layerwise_report(cfg, parent_get, variants: list, windows: Windows, *, batch_size: int, dtype, device,
                     budget: int, spill_dir: Path) -> tuple[dict, list[dict]]:
    """Perplexity of the parent and of each quantized model, mean KL(parent || quantized) of the
    next-token distributions and top-1 agreement, over the scored tokens of ``windows``; every
    model runs block by block (``layerwise_hidden``), never two models at once. The embedding,
    final LayerNorm and output are the parent's, or where a variant's config quantizes the
    embedding (``quantization["embedding"]``), that variant's own quantized embedding and output
    (one copy per distinct embedding, held beside the parent's for the scoring).
    ``parent_get(name)``: the parent's TP=1 tensors; ``variants``: [(get, quantized config)]."""
    cfg = cfg.replace(tensor_parallel_size=1, quantization=None)
    batches = [b[:3] for b in windows.batches(batch_size, device)]
    targets = [b[3] for b in windows.batches(batch_size, device)]
    ends = build_ends(cfg, parent_get, dtype, device)
    own_ends = {}  # (bits, group, scale dtype) -> the quantized embedding's ends

    def ends_of(get, qcfg):
        spec = (qcfg.quantization or {}).get("embedding")
        if not spec:
            return ends
        key = (spec["bits"], spec.get("group_size"), get(EMBEDDING_KEY + "_scale").dtype)
        if key not in own_ends:
            own_ends[key] = build_ends(qcfg, get, dtype, device)
        return own_ends[key]
    passes, pass_ends = [], []
    with console.progress(cfg.num_layers * (1 + len(variants)), "evaluate", "layers") as bar:
        for i, (get, qcfg) in enumerate([(parent_get, cfg)] + variants):
            pass_ends.append(ends_of(get, qcfg))
            acts, _ = layerwise_hidden(qcfg.replace(tensor_parallel_size=1), get, batches, dtype, device, budget,
                                       Path(spill_dir) / f"eval{i}", ends=pass_ends[-1], progress=bar)
            passes.append(acts)
    n = 0
    nll_p = 0.0
    acc = [{"nll": 0.0, "kl": 0.0, "agree": 0} for _ in variants]
    tpos = windows.target_positions.to(device)

    def logprobs(h, e):
        return torch.log_softmax(e.logits(e.transformer.final_layernorm(h))[:, tpos].float(), dim=-1)
    for b, tgt in enumerate(targets):
        lp = logprobs(passes[0][b], ends)
        nll_p += -lp.gather(-1, tgt[..., None]).sum().item()
        top_p = lp.argmax(-1)
        p = lp.exp()
        for a, acts, e in zip(acc, passes[1:], pass_ends[1:]):
            lq = logprobs(acts[b], e)
            a["nll"] += -lq.gather(-1, tgt[..., None]).sum().item()
            a["kl"] += (p * (lp - lq)).sum().item()
            a["agree"] += (lq.argmax(-1) == top_p).sum().item()
        n += tgt.numel()
    for acts in passes:
        acts.close()
    ppl_p = math.exp(nll_p / n)
    rows = []
    for a in acc:
        ppl = math.exp(a["nll"] / n)
        rows.append({"ppl": ppl, "ppl_increase_pct": 100.0 * (ppl / ppl_p - 1.0), "kl_mean": a["kl"] / n,
                     "top1_agreement": a["agree"] / n})
    return {"ppl": ppl_p, "nll": nll_p / n, "tokens": n}, rows


@torch.no_grad()
def layerwise_logits(cfg, get, inputs: dict, dtype=torch.float32, device=None) -> dict:
    """{name: logits} of (tokens, positions, mask) ``inputs`` through the GLM ``cfg`` at TP=1,
    computed one block at a time from ``get(global name)``: the same modules and operations as a
    whole-model forward, with one block (or the embedding) in memory at a time. What convert's
    verification runs at GLM-130B's width."""
    cfg = cfg.replace(tensor_parallel_size=1)
    batches = list(inputs.values())
    ends = build_ends(cfg, get, dtype, device)
    hidden, rest = [], []
    for tokens, positions, mask in batches:
        h, r = embed(ends, tokens, positions, mask)
        hidden.append(h)
        rest.append(r)
    del ends  # the embedding is as large as a block: not held while the blocks run
    for i in range(cfg.num_layers):
        layer = build_layer(cfg, i, get, dtype, device)
        hidden = [layer(x, cos, sin, mask, None) for x, (cos, sin, mask) in zip(hidden, rest)]
        del layer
    ends = build_ends(cfg, get, dtype, device)
    return {k: ends.logits(ends.transformer.final_layernorm(h)).float() for k, h in zip(inputs, hidden)}
