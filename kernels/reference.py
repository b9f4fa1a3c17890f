"""The torch reference for weight-only quantized linears: it defines the right answer.

On-disk format (docs/glm130b.md §7.1, docs/architecture.md), canonical for every kernel:
    qweight int8 [n, k] for INT8; for INT4 int8 [n, k/2], column 2j in the HIGH nibble and
            column 2j+1 in the LOW nibble, each 4-bit two's complement.
    scale   [n] (one per output row) or [n, k/G] (one per row and group of G input columns).
    W[r, c] = q[r, c] * scale[r, c // G]
"""
from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [n, k] with values in [-8, 7] -> int8 [n, k/2]; even column in the high nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"INT4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.int16)
    hi, lo = q[..., 0::2], q[..., 1::2]
    return (((hi & 0xF) << 4) | (lo & 0xF)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4, sign-extending each nibble (high: >> 4; low: << 4 then >> 4)."""
    p = packed.view(torch.int8)
    hi = p >> 4  # arithmetic shift on int8 sign-extends
    lo = (p << 4) >> 4
    return torch.stack([hi, lo], dim=-1).flatten(-2)


def expand_scale(scale: torch.Tensor, k: int) -> torch.Tensor:
    """[n] or [n, k/G] -> [n, k] (or [n, 1])."""
    if scale.dim() == 1:
        return scale[:, None]
    return scale.repeat_interleave(k // scale.shape[1], dim=1)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(qweight) if bits == 4 else qweight
    return q.to(dtype) * expand_scale(scale, q.shape[-1]).to(dtype)


def quant_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias=None, bits: int = 4):
    """y = x W^T + b computed in fp32 from the dequantized weight, returned in x's dtype."""
    w = dequantize(qweight, scale, bits, torch.float32)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None = None, scale_dtype=torch.float16):
    """GLM-130B's round-to-nearest absmax quantization (docs/glm130b.md §7.1), optionally per group.

    s = absmax / (2^(b-1) - 1) stored in ``scale_dtype``; q = round_half_even(W / s) in that
    dtype's precision (GLM-130B divides fp16 by fp16). Returns (qweight, scale): packed for INT4.
    """
    if bits not in (4, 8):
        raise ValueError(f"unsupported bit width {bits}; choose 4 or 8")
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    if group_size:
        if k % group_size:
            raise ValueError(f"group size {group_size} does not divide {k} columns")
        wg = w.reshape(n, k // group_size, group_size)
    else:
        wg = w.reshape(n, 1, k)
    scale = (wg.abs().amax(dim=-1) / qmax).to(scale_dtype)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(wg.to(scale_dtype) / safe[..., None]).clamp_(-qmax, qmax).to(torch.int8).reshape(n, k)
    scale = scale if group_size else scale[:, 0]
    return (pack_int4(q) if bits == 4 else q), scale


def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), blocked keys excluded) v in fp32 (q [b, n, s, d], k/v [b, n, t, d],
    blocked bool broadcastable to [b, n, s, t]); a row with every key blocked gets the mean of v."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    none = blocked.all(dim=-1, keepdim=True)
    scores = scores.masked_fill(blocked & ~none, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
