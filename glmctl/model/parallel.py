"""Tensor-parallel state and the Megatron-style layers (docs/glm130b.md §2, §6.3).

At tensor-parallel world size 1 every layer here is the plain layer: no communication, and the
parameter shapes are the global ones. With ``init_tensor_parallel(tp)`` under torch.distributed
(gloo on CPU, NCCL on GPU), consecutive ranks [k*tp, (k+1)*tp) form one tensor-parallel group
and the remaining dimension is data parallel.

Quantized weights: when a linear layer's ``weight`` is int8 (INT8, or INT4 packed two per byte)
it carries a ``weight_scale`` buffer and the matmul goes through ``glmctl.kernels``.
"""
from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glmctl import kernels

_TP_GROUP = None
_TP_SIZE = 1
_TP_RANK = 0
_DP_GROUP = None


def init_tensor_parallel(tp_size: int) -> None:
    """Split the default process group into tensor-parallel groups of ``tp_size`` ranks."""
    global _TP_GROUP, _TP_SIZE, _TP_RANK, _DP_GROUP
    if tp_size == 1 and not dist.is_initialized():
        _TP_GROUP, _TP_SIZE, _TP_RANK, _DP_GROUP = None, 1, 0, None
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp_size:
        raise ValueError(f"world size {world} is not divisible by tensor-parallel size {tp_size}")
    for start in range(0, world, tp_size):  # every rank must create every group
        ranks = list(range(start, start + tp_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            _TP_GROUP = g
    for offset in range(tp_size):
        ranks = list(range(offset, world, tp_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            _DP_GROUP = g
    _TP_SIZE, _TP_RANK = tp_size, rank % tp_size


def reset_tensor_parallel() -> None:
    global _TP_GROUP, _TP_SIZE, _TP_RANK, _DP_GROUP
    _TP_GROUP, _TP_SIZE, _TP_RANK, _DP_GROUP = None, 1, 0, None


def tp_size() -> int:
    return _TP_SIZE


def tp_rank() -> int:
    return _TP_RANK


def tp_group():
    return _TP_GROUP


def dp_group():
    return _DP_GROUP


# ---- communication with autograd ---------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce of the gradient backward (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=_TP_GROUP)
        return g


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward (output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        dist.all_reduce(x, group=_TP_GROUP)
        return x

    @staticmethod
    def backward(ctx, g):
        return g


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim forward, keep the local slice backward."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
        dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(_TP_SIZE, dim=-1)[_TP_RANK].contiguous()


def copy_to_tp(x):
    return _CopyToTP.apply(x) if _TP_SIZE > 1 else x


def reduce_from_tp(x):
    return _ReduceFromTP.apply(x) if _TP_SIZE > 1 else x


def gather_last_dim(x):
    return _GatherLastDim.apply(x) if _TP_SIZE > 1 else x


def _divide(n: int, k: int, what: str) -> int:
    if n % k:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {k}")
    return n // k


# ---- layers --------------------------------------------------------------------------------
class _TPLinear(nn.Module):
    """Shared parts of column/row-parallel linears: fp or quantized weight storage."""

    def __init__(self, out_local: int, in_local: int, bias_size: int | None, quant: dict | None,
                 device=None, dtype=None):
        super().__init__()
        self.out_local, self.in_local = out_local, in_local
        self.quant = quant
        if quant is None:
            self.weight = nn.Parameter(torch.empty(out_local, in_local, device=device, dtype=dtype))
        else:
            bits, group = quant["bits"], quant.get("group_size")
            cols = in_local // 2 if bits == 4 else in_local
            self.register_buffer("weight", torch.zeros(out_local, cols, dtype=torch.int8, device=device))
            if group:
                scale_shape = (out_local, _divide(in_local, group, "input columns per rank"))
            else:
                scale_shape = (out_local,)
            self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=dtype or torch.float16,
                                                            device=device))
        self.bias = (nn.Parameter(torch.zeros(bias_size, device=device, dtype=dtype))
                     if bias_size is not None else None)

    def _matmul(self, x, bias=None):
        if self.quant is None:
            return kernels.dense_linear(x, self.weight, bias)  # F.linear, or the GEMV kernel when decoding
        return kernels.quant_linear(x, self.weight, self.weight_scale, bias, bits=self.quant["bits"])

    def extra_repr(self):
        q = f", quant={self.quant}" if self.quant else ""
        return f"in_local={self.in_local}, out_local={self.out_local}{q}"


class ColumnParallelLinear(_TPLinear):
    """y = x W^T + b with W split on rows (output features) across tensor-parallel ranks."""

    def __init__(self, in_features, out_features, bias=True, quant=None, device=None, dtype=None):
        out_local = _divide(out_features, _TP_SIZE, "output features")
        super().__init__(out_local, in_features, out_local if bias else None, quant, device, dtype)

    def forward(self, x):
        return self._matmul(copy_to_tp(x), self.bias)


class RowParallelLinear(_TPLinear):
    """y = x W^T + b with W split on columns; partial products are all-reduced, then b is added once."""

    def __init__(self, in_features, out_features, bias=True, quant=None, device=None, dtype=None):
        in_local = _divide(in_features, _TP_SIZE, "input features")
        super().__init__(out_features, in_local, out_features if bias else None, quant, device, dtype)

    def forward(self, x):
        y = reduce_from_tp(self._matmul(x))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Rank r owns vocabulary rows [r*V/tp, (r+1)*V/tp); other ids give 0 before the all-reduce."""

    def __init__(self, vocab_size, hidden_size, device=None, dtype=None):
        super().__init__()
        self.vocab_local = _divide(vocab_size, _TP_SIZE, "vocab size")
        self.start = _TP_RANK * self.vocab_local
        self.weight = nn.Parameter(torch.empty(self.vocab_local, hidden_size, device=device, dtype=dtype))

    def forward(self, ids):
        if _TP_SIZE == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.vocab_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out)
