"""Quantized linear kernels: one entry point, ``quant_linear``.

Dispatch: CUDA extension for CUDA tensors -> compiled CPU extension -> torch reference.
(Only the reference exists so far; see kernels/reference.py for the format.)
"""
from __future__ import annotations

from glmctl.kernels.reference import (dequantize, pack_int4, quant_linear_ref, quantize_rtn,  # noqa: F401
                                      unpack_int4)


def quant_linear(x, qweight, scale, bias=None, bits: int = 4):
    """y = x @ dequant(qweight, scale)^T + bias, in x's dtype; x [..., k]."""
    shape = x.shape
    y = quant_linear_ref(x.reshape(-1, shape[-1]), qweight, scale, bias, bits)
    return y.reshape(*shape[:-1], y.shape[-1])
