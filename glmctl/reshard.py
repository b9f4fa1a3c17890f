"""Resharding plans: what every tensor of a checkpoint becomes at another tensor-parallel size,
group size or dtype, worked out from the shapes alone, then produced one tensor at a time.

    plan = Plan(src, tp_out=4, to="glmctl", dtype=None)   # src: a glmctl.formats Source
    plan.cfg_out, plan.entries[rank] = [(name, local shape, dtype)], plan.names
    plan.write(sink)                                       # every tensor, in plan.names order

Split rules: glmctl.tp_layout (docs/glm130b.md §6.3-6.4). Quantized weights are never
requantised: scales are re-expressed at another group size only where that is exact
(tp_layout.regroup_scale); otherwise the plan stops and says why.
"""
from __future__ import annotations

import math

import torch

from glmctl import tp_layout
from glmctl.console import log, warn
from glmctl.errors import InputError, UsageError
from glmctl.formats.shapes import INV_FREQ, canonical_order, model_shapes, regroup_shape, split_shape
from glmctl.formats.source import Source, element_size

FORMATS = ("glmctl", "sat")


def _gname(g):
    return "one scale per row" if g is None else f"group size {g}"


def inv_freq(head_dim: int, base: float, dtype) -> torch.Tensor:
    """SAT's per-layer rotary buffer, computed as SAT computes it."""
    return (1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(dtype)


class Plan:
    """``src`` at ``tp_out`` ranks in format ``to``, floats cast to ``dtype`` (None: as stored;
    scales keep theirs); ``ids``: special-token ids that replace the source config's."""

    def __init__(self, src: Source, *, tp_out: int, to: str, dtype=None, preset=None, ids: dict | None = None):
        self.src, self.tp_in, self.tp_out, self.to, self.dtype = src, src.tp, tp_out, to, dtype
        cfg = src.cfg
        if to not in FORMATS:
            raise UsageError(f"--to {to!r}: choose glmctl or sat")
        for what, n in (("attention heads", cfg.num_attention_heads), ("vocab rows", cfg.vocab_size),
                        ("FFN inner size", cfg.inner_hidden_size), ("hidden size", cfg.hidden_size)):
            if tp_out < 1 or n % tp_out:
                raise UsageError(f"--tp {tp_out}: the {n} {what} do not split over {tp_out} ranks")
        # global shapes from the stored ones, checked against the model the config describes
        self.global_shape = {}
        for n in src.names:
            try:
                if len(set(src.local[n])) != 1:
                    raise tp_layout.LayoutError(f"ranks disagree: {src.local[n]}")
                if src.tp > 1 and n.endswith("weight_scale") and tp_layout.classify(n) == tp_layout.ROW \
                        and len(src.local[n][0]) == 1:
                    raise tp_layout.LayoutError("a per-row scale of a row-parallel layer cannot be merged")
                self.global_shape[n] = tuple(tp_layout.global_shape(n, src.local[n][0], src.tp))
            except tp_layout.LayoutError as e:
                raise InputError(f"{src.path}: {n}: cannot merge the rank shapes ({e})") from None
        expected = model_shapes(cfg)
        where = f"preset {preset}" if preset else "the model config"
        for n, shape in expected.items():
            if n not in self.global_shape:
                raise InputError(f"{src.path}: missing tensor {n} ({where} needs it)")
            if self.global_shape[n] != shape:
                raise InputError(f"{src.path}: {n} has global shape {list(self.global_shape[n])}, "
                                 f"{where} implies {list(shape)}")
        dropped = [n for n in src.names if n not in expected and not n.endswith(INV_FREQ)]
        if dropped:
            warn(f"{src.path}: dropping {len(dropped)} tensor(s) a GLM does not use, e.g. {dropped[0]}")
        self.names = canonical_order([n for n in src.names if n not in dropped], cfg)
        self.add_inv_freq = []
        if to == "sat" and not any(n.endswith(INV_FREQ) for n in self.names):
            # SAT's loader expects per-layer rotary buffers (docs/glm130b.md §6.2): recreate them.
            self.add_inv_freq = [f"transformer.layers.{i}.attention.{INV_FREQ}" for i in range(cfg.num_layers)]
        # quantization: the group size of the output, chosen so no weight is requantised
        self.group_in = (cfg.quantization or {}).get("group_size")
        self.group_out = self._choose_group() if cfg.quantization else self.group_in
        q = dict(cfg.quantization, group_size=self.group_out) if cfg.quantization else None
        self.cfg_out = cfg.replace(tensor_parallel_size=tp_out, quantization=q, **(ids or {}))
        # per-rank output entries (name, shape, dtype), in writing order
        self.entries = [[] for _ in range(tp_out)]
        for n in self.names:
            shape = self.global_shape[n]
            if n.endswith("weight_scale"):
                shape = regroup_shape(shape, self._in_features(n), self.group_out)
            try:
                local = split_shape(n, shape, tp_out)
            except tp_layout.LayoutError as e:
                raise UsageError(f"cannot reshard TP={self.tp_in} -> TP={tp_out}: {e}") from None
            for r in range(tp_out):
                self.entries[r].append((n, local, self.out_dtype(n, src.dtypes[n])))
        self.inv_freq_dtype = self.out_dtype(INV_FREQ, src.stored_dtype())
        for r in range(tp_out):
            self.entries[r] += [(n, (cfg.head_dim // 2,), self.inv_freq_dtype) for n in self.add_inv_freq]
        self.largest_tensor_bytes = max(math.prod(self.global_shape[n]) * element_size(src.dtypes[n])
                                        for n in self.names)

    @property
    def tensor_count(self) -> int:
        return len(self.names) + len(self.add_inv_freq)

    # -- choosing the output group size --------------------------------------------------------
    def _choose_group(self):
        cfg, tp = self.src.cfg, self.tp_out
        h, f = cfg.hidden_size, cfg.inner_hidden_size
        if cfg.quantization["bits"] == 4:
            for name, n in (("attention.dense", h), ("dense_4h_to_h", f)):
                if (n // tp) % 2:
                    raise UsageError(f"--tp {tp}: {name} would have {n // tp} input columns per rank; packed INT4 "
                                     "needs an even number, so this checkpoint cannot be resharded without "
                                     "requantising (quantize the fp16 model at this TP)")
        g_in = self.group_in
        widest = math.gcd(h // tp, f // tp)  # the largest group that splits both row-parallel layers
        cands = ([None] if tp == 1 else []) + sorted((g for g in range(1, widest + 1) if widest % g == 0),
                                                     reverse=True)
        scale_names = [n for n in self.src.names if n.endswith("weight_scale")]
        for g in cands:  # the coarsest group size that holds the stored scales exactly
            if not (g == g_in or g_in is None or (g is not None and g_in % g == 0)):
                # merging groups is exact only where the stored scales agree; real group scales
                # fail on the first tensor, so this reads one scale tensor per rejected candidate
                try:
                    for n in scale_names:
                        tp_layout.regroup_scale(n, self.src.merged(n), self._in_features(n), g_in, g)
                except tp_layout.LayoutError:
                    continue
            if g != g_in:
                log(f"convert: quantization scales re-expressed from {_gname(g_in)} to {_gname(g)} for TP={tp} "
                    "(exact: the int8 weights are unchanged)")
            return g
        raise UsageError(f"--tp {tp}: the quantization scales ({_gname(g_in)}) cannot be re-expressed for TP={tp} "
                         "without requantising; quantize the fp16 model at this TP")

    def _in_features(self, n):
        return tp_layout.linear_in_features(n, self.src.cfg.hidden_size, self.src.cfg.inner_hidden_size)

    def out_dtype(self, n: str, dt: torch.dtype) -> torch.dtype:
        """The output dtype of tensor ``n`` stored as ``dt``."""
        if self.dtype is None or not dt.is_floating_point or n.endswith("_scale"):
            return dt
        return self.dtype if dt != torch.float64 else dt

    # -- one tensor: source rank tensors -> output rank tensors ----------------------------------
    def produce(self, name, get, free=None):
        """Yields this tensor's output for rank 0 … tp_out-1 (glmctl form, output dtype).

        ``get(r)`` reads source rank r; ``free(r)`` is called once rank r is no longer needed.
        When one TP divides the other, output rank i is cut from source rank i // k or merged
        from source ranks i·k … i·k+k-1 (as GLM-130B's convert_tp.py), so only those are resident;
        otherwise (or when scales are regrouped) through the global tensor.
        """
        free = free or (lambda r: None)
        tin, tout = self.tp_in, self.tp_out
        regroup = name.endswith("weight_scale") and self.group_in != self.group_out

        def cast(t):
            dt = self.out_dtype(name, t.dtype)
            return t if dt == t.dtype else t.to(dt)
        try:
            if tin == tout and not regroup:
                for r in range(tin):
                    yield cast(get(r))
                    free(r)
            elif tout % tin == 0 and not regroup:  # up: cut each source shard into k
                k = tout // tin
                for r in range(tin):
                    t = get(r)
                    for j in range(k):
                        yield cast(tp_layout.shard_tensor(name, t, k, j))
                    del t
                    free(r)
            elif tin % tout == 0 and not regroup:  # down: merge k source shards
                k = tin // tout
                for i in range(tout):
                    yield cast(tp_layout.merge_tensors(name, [get(r) for r in range(i * k, (i + 1) * k)]))
                    for r in range(i * k, (i + 1) * k):
                        free(r)
            else:
                full = tp_layout.merge_tensors(name, [get(r) for r in range(tin)])
                if regroup:
                    full = tp_layout.regroup_scale(name, full, self._in_features(name), self.group_in,
                                                   self.group_out)
                for r in range(tin):
                    free(r)
                for r in range(tout):
                    yield cast(tp_layout.shard_tensor(name, full, tout, r))
        except tp_layout.LayoutError as e:
            raise UsageError(f"cannot reshard TP={tin} -> TP={tout}: {e}") from None

    def output(self, name):
        """``produce`` reading from the source, each source rank released once used."""
        return self.produce(name, lambda r: self.src.read(name, r), lambda r: self.src.release(name, [r]))

    def scales(self):
        """(name, output tensor) of every quantization scale, rank by rank (scales are small)."""
        for n in self.names:
            if n.endswith("weight_scale"):
                for t in self.produce(n, lambda r, n=n: self.src.read(n, r)):
                    yield n, t

    def write(self, sink, progress=None) -> None:
        """Every tensor into ``sink`` (``write(rank, name, tensor)``, ``close()``), in plan order."""
        for n in self.names:
            for r, t in enumerate(self.output(n)):
                sink.write(r, n, t)
            if progress is not None:
                progress.update(1)
        cfg = self.cfg_out
        for n in self.add_inv_freq:
            for r in range(self.tp_out):
                sink.write(r, n, inv_freq(cfg.head_dim, cfg.rotary_base, self.inv_freq_dtype))
        sink.close()
