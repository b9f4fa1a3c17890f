"""How each GLM-130B tensor splits across tensor-parallel ranks (docs/glm130b.md §6.3-6.4).

    column  (dim 0): query_key_value.{weight,bias}, word_embeddings.weight
    glu     (dim 0): dense_h_to_4h.{weight,bias}; rank r = [rows r of first half ; rows r of second half]
    row     (dim 1): attention.dense.weight, dense_4h_to_h.weight
    replicated     : LayerNorms, attention.dense.bias, dense_4h_to_h.bias, rotary inv_freq

Quantized ``*.weight_scale`` follow their weight: rows for column/glu; for row-parallel layers
the scale is [out, groups] and splits on groups, which needs groups % tp == 0. A per-row scale
[out] of a row-parallel layer can only live at TP=1 (GLM-130B's per-slice scales are the
group_size = in/TP case). All functions are pure tensor ops: they never see a whole model.
"""
from __future__ import annotations

import math

import torch

COLUMN, GLU, ROW, REPLICATED = "column", "glu", "row", "replicated"


def classify(name: str) -> str:
    base = name[: -len("_scale")] if name.endswith("_scale") else name
    if "dense_h_to_4h" in base:
        return GLU
    if base.endswith("query_key_value.weight") or base.endswith("query_key_value.bias") \
            or base.endswith("word_embeddings.weight"):
        return COLUMN
    if base.endswith("attention.dense.weight") or base.endswith("dense_4h_to_h.weight"):
        return ROW
    return REPLICATED


class LayoutError(ValueError):
    pass


def _row_dim(name: str, t: torch.Tensor) -> int:
    if name.endswith("_scale") and t.dim() == 1:
        raise LayoutError(f"{name}: a per-row scale of a row-parallel layer cannot be split; "
                          "quantize with --group-size (a divisor of in/TP) to reshard without requantising")
    return 1


def shard_tensor(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's slice of a global tensor."""
    if tp == 1:
        return full
    kind = classify(name)
    if kind == REPLICATED:
        return full
    if kind == COLUMN:
        return _chunk(name, full, tp, 0)[rank]
    if kind == ROW:
        return _chunk(name, full, tp, _row_dim(name, full))[rank]
    # GLU: both halves split the same way, kept in [first ; second] order locally.
    first, second = _chunk(name, full, 2, 0)
    return torch.cat([_chunk(name, first, tp, 0)[rank], _chunk(name, second, tp, 0)[rank]], dim=0)


def merge_tensors(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of shard_tensor: the global tensor from all ranks' slices, in rank order."""
    tp = len(shards)
    if tp == 1:
        return shards[0]
    kind = classify(name)
    if kind == REPLICATED:
        return shards[0]
    if kind == COLUMN:
        return torch.cat(shards, dim=0)
    if kind == ROW:
        return torch.cat(shards, dim=_row_dim(name, shards[0]))
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def reshard_tensor(name: str, shards: list[torch.Tensor], tp_out: int) -> list[torch.Tensor]:
    """Source shards (any count) -> tp_out shards, through the global tensor of this one name."""
    full = merge_tensors(name, shards)
    return [shard_tensor(name, full, tp_out, r) for r in range(tp_out)]


def _chunk(name, t, parts, dim):
    if t.shape[dim] % parts:
        raise LayoutError(f"{name}: dim {dim} of shape {tuple(t.shape)} does not split into {parts} parts")
    return t.chunk(parts, dim=dim)


def global_shape(name: str, local_shape: tuple, tp: int) -> tuple:
    shape = list(local_shape)
    kind = classify(name)
    if tp == 1 or kind == REPLICATED:
        return tuple(shape)
    dim = 1 if kind == ROW else 0
    shape[dim] *= tp
    return tuple(shape)


# ---- quantization scales: group size changes that keep the weights exact -----------------------
# A ``weight_scale`` is [out] (one scale per output row: group = all input columns) or
# [out, in/G] (one per row and group of G columns). GLM-130B's per-rank row scales are group
# scales with G = in/TP ("per-slice scales are group scales"), so a scale can be re-expressed
# at another group size without touching the int8 weights: repeating it to smaller groups is
# always exact; merging groups is exact only where the merged groups hold equal scales.

def regroup_scale(name: str, scale: torch.Tensor, in_features: int, group_from: int | None,
                  group_to: int | None) -> torch.Tensor:
    """``scale`` of a weight with ``in_features`` input columns, from group size ``group_from``
    to ``group_to`` (None = per row). Raises LayoutError when merging groups would lose values."""
    g_from, g_to = group_from or in_features, group_to or in_features
    if g_from == g_to and (scale.dim() == 1) == (group_to is None):
        return scale
    for g in (g_from, g_to):
        if in_features % g:
            raise LayoutError(f"{name}: group size {g} does not divide {in_features} input columns")
    s = scale if scale.dim() == 2 else scale[:, None]  # [out, in/g_from]
    if s.shape[1] != in_features // g_from:
        raise LayoutError(f"{name}: scale of shape {tuple(scale.shape)} does not match group size {g_from} "
                          f"over {in_features} columns")
    fine = math.gcd(g_from, g_to)
    if fine != g_from:  # repeat each scale over the smaller groups (exact)
        s = s.repeat_interleave(g_from // fine, dim=1)
    if fine != g_to:  # merge groups: every merged group must hold one value
        k = g_to // fine
        s = s.reshape(s.shape[0], -1, k)  # [out, in/g_to, k]
        if not s.is_meta and not bool((s == s[..., :1]).all()):
            raise LayoutError(f"{name}: scales differ inside groups of {g_to} input columns, so they cannot "
                              f"be stored {'per row' if group_to is None else f'with group size {g_to}'}")
        s = s[..., 0]
    return s[:, 0].contiguous() if group_to is None else s.contiguous()


def group_splits(group: int | None, in_features: int, tp: int) -> bool:
    """Whether scales with this group size split over ``tp`` ranks of a row-parallel layer."""
    if in_features % tp:
        return False
    if group is None:
        return tp == 1
    return (in_features // tp) % group == 0


def linear_in_features(name: str, hidden_size: int, inner_hidden_size: int) -> int | None:
    """Global input columns of the linear layer a ``weight``/``weight_scale`` belongs to."""
    base = name[: -len("_scale")] if name.endswith("_scale") else name
    if base.endswith("dense_4h_to_h.weight"):
        return inner_hidden_size
    if base.endswith(("query_key_value.weight", "attention.dense.weight", "dense_h_to_4h.weight")):
        return hidden_size
    return None


# ---- slices: which global index ranges a rank holds, and where they are stored ----------------------
def rank_ranges(name: str, global_shape: tuple, tp: int, rank: int):
    """(dim, [(start, stop), ...]): the global index ranges along ``dim`` whose concatenation is
    ``rank``'s shard of ``name`` at tensor-parallel size ``tp`` (shard_tensor's rule, as ranges);
    (None, None) when the rank holds the whole tensor."""
    kind = classify(name)
    if tp == 1 or kind == REPLICATED:
        return None, None
    if kind == ROW:
        if name.endswith("_scale") and len(global_shape) == 1:
            raise LayoutError(f"{name}: a per-row scale of a row-parallel layer cannot be split; "
                              "quantize with --group-size (a divisor of in/TP) to reshard without requantising")
        dim = 1
    else:
        dim = 0
    n = global_shape[dim]
    if kind == GLU:
        half = n // 2
        if n % 2 or half % tp:
            raise LayoutError(f"{name}: dim 0 of shape {tuple(global_shape)} does not split into 2 x {tp} parts")
        k = half // tp
        return dim, [(rank * k, (rank + 1) * k), (half + rank * k, half + (rank + 1) * k)]
    if n % tp:
        raise LayoutError(f"{name}: dim {dim} of shape {tuple(global_shape)} does not split into {tp} parts")
    k = n // tp
    return dim, [(rank * k, (rank + 1) * k)]


def locate(name: str, global_shape: tuple, tp_stored: int, start: int, stop: int):
    """Where the global range [start, stop) along the split dim of ``name`` lies in a checkpoint
    stored at ``tp_stored``: [(stored rank, local start, local stop)] in global order."""
    if tp_stored == 1:
        return [(0, start, stop)]
    pieces = []
    for s in range(tp_stored):
        _, ranges = rank_ranges(name, global_shape, tp_stored, s)
        offset = 0
        for a, b in ranges:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                pieces.append((lo, s, offset + lo - a, offset + hi - a))
            offset += b - a
    return [p[1:] for p in sorted(pieces)]
