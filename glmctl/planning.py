"""Memory plan of a configuration: parameters, weight bytes per precision, KV cache, per-GPU fit.

Everything is computed from the tensors the network actually creates (built on the meta
device, so the 130B configuration costs no memory) and from the tensor-parallel split rules
in glmctl.tp_layout — nothing is hard-coded.
"""
from __future__ import annotations

import math

import torch

from glmctl import tp_layout
from glmctl.config import ModelConfig
from glmctl.model import GLM

GiB = 2**30


def meta_state(cfg: ModelConfig, bits: int | None, group_size: int | None = None, dtype=torch.float16) -> dict:
    """{name: (global shape, dtype)} of the model at TP=1, built on the meta device."""
    q = {"bits": bits, "group_size": group_size, "method": "rtn"} if bits in (4, 8) else None
    model = GLM(cfg.replace(quantization=q, tensor_parallel_size=1), device="meta", dtype=dtype)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def weight_bytes(cfg: ModelConfig, bits: int | None, tp: int = 1, group_size: int | None = None) -> dict:
    """Total bytes (the model as quantized at TP=1) and bytes on the fullest rank at
    tensor-parallel size ``tp``.

    Per-row scales at TP > 1 are per rank, as `glmctl quantize --tp` writes them: group scales of
    G = gcd(hidden/TP, inner/TP) (glmctl.quantization.output_group), which the per-rank figure
    counts (bench/glm130b_rehearsal.py compares it with the files written)."""
    total = sum(_nbytes(shape, dtype) for shape, dtype in meta_state(cfg, bits, group_size).values())
    if bits in (4, 8) and group_size is None and tp > 1:
        group_size = math.gcd(cfg.hidden_size // tp, cfg.inner_hidden_size // tp)
    per_rank = 0
    for name, (shape, dtype) in meta_state(cfg, bits, group_size).items():
        nb = _nbytes(shape, dtype)
        kind = tp_layout.classify(name)
        per_rank += nb if kind == tp_layout.REPLICATED else nb // tp
    return {"total": total, "per_rank": per_rank}


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for one token (fp16), over all ranks."""
    return 2 * cfg.num_layers * cfg.hidden_size * bytes_per_value


def plan(cfg: ModelConfig, bits: int | None = None, tp: int = 1, gpu_memory: int | None = None,
         seq_len: int | None = None, batch_size: int = 1, group_size: int | None = None,
         reserve: int = 1 * GiB) -> dict:
    seq_len = seq_len or cfg.max_sequence_length
    precisions = {"fp16": None, "int8": 8, "int4": 4}
    weights = {name: weight_bytes(cfg, b, tp, group_size) for name, b in precisions.items()}
    chosen = {None: "fp16", 16: "fp16", 8: "int8", 4: "int4"}[bits]
    kv_token = kv_bytes_per_token(cfg)
    kv_total = kv_token * seq_len * batch_size
    # Largest transient activation on a rank: the logits slice [batch, seq, vocab/tp] in fp16
    # (evaluation scores a whole window at once) plus the widest FFN output [batch, seq, 2f/tp].
    act = 2 * batch_size * seq_len * (cfg.vocab_size + 2 * cfg.inner_hidden_size) // tp
    per_gpu = weights[chosen]["per_rank"] + kv_total // tp + act + reserve
    out = {
        "config": {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                "inner_hidden_size", "vocab_size", "max_sequence_length")},
        "parameters": cfg.num_parameters(),
        "linear_parameters": cfg.num_linear_parameters(),
        "weight_bytes": {k: v["total"] for k, v in weights.items()},
        "kv_cache_bytes_per_token": kv_token,
        "kv_cache_bytes": kv_total,
        "precision": chosen,
        "tensor_parallel_size": tp,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "per_gpu": {"weights": weights[chosen]["per_rank"], "kv_cache": kv_total // tp,
                    "activations": act, "reserve": reserve, "total": per_gpu},
    }
    if gpu_memory is not None:
        out["gpu_memory"] = gpu_memory
        out["fits"] = per_gpu <= gpu_memory
    return out
