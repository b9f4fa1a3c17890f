"""Kernels for decoding: one entry point per kernel.

    y = quant_linear(x, qweight, scale, bias=None, bits=4)     # x [..., k] -> y [..., n], x.dtype
    y = dense_linear(x, weight, bias=None)                     # fp32 GEMV for small m (inference)
    o = decode_attention(q, k, v, blocked)                     # one new token per row (CPU fp32)

Dispatch, per call:
  * CUDA tensors -> ``torch.ops.glmctl.quant_linear`` from the CUDA extension (``_cuda``):
    fused dequantize-in-registers tensor-core kernel for small m, dequantize + cuBLAS above;
  * CPU tensors  -> the same op from the C++ CPU extension (``_cpu``, AVX2/FMA + OpenMP);
  * otherwise (extension not built or failed to load, unsupported dtype/device) -> the torch
    reference ``quant_linear_ref``, which defines the right answer.  A missing or broken
    extension is reported once per process with a RuntimeWarning; results are never wrong.

The on-disk format is the canonical one of ``reference.py``; kernels read it as is.
``status()`` says which implementation serves each device and why (``glmctl kernels``).
Importing this module is cheap: the extensions load on first use.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings

import torch
import torch.nn.functional as F

from .reference import (decode_attention_ref, dequantize, pack_int4, quant_linear_ref, quantize_rtn,  # noqa: F401
                        unpack_int4)

__all__ = ["quant_linear", "dense_linear", "decode_attention", "decode_attention_ref", "quant_linear_ref", "pack_int4", "unpack_int4", "dequantize", "quantize_rtn",
           "status"]

_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
# backend -> {"ok": bool, "error": str | None, "path": str | None, "module": module | None}
_loaded: dict[str, dict] = {}
_warned = False
_fake_registered = False


def _import_extension(name: str):
    """Import ``glmctl.kernels.<name>`` (a separate function so tests can simulate failures)."""
    return importlib.import_module(f".{name}", __package__)


def _register_fake() -> None:
    """Shape function for torch.compile / FakeTensor tracing."""
    global _fake_registered
    if _fake_registered:
        return
    _fake_registered = True
    try:
        @torch.library.register_fake("glmctl::quant_linear")
        def _quant_linear_fake(x, qweight, scale, bias=None, bits=4, path=0):
            return x.new_empty((*x.shape[:-1], qweight.shape[0]))
    except Exception:  # noqa: BLE001 - already registered (e.g. a Meta kernel) or old torch
        pass
    try:
        @torch.library.register_fake("glmctl::dense_linear")
        def _dense_linear_fake(x, weight, bias=None):
            return x.new_empty((*x.shape[:-1], weight.shape[0]))
    except Exception:  # noqa: BLE001 - as above
        pass
    try:
        @torch.library.register_fake("glmctl::decode_attention")
        def _decode_attention_fake(q, k, v, blocked):
            return q.new_empty(q.shape)
    except Exception:  # noqa: BLE001 - as above
        pass


def _load(backend: str) -> dict:
    """Load the extension serving ``backend`` ("cpu" or "cuda") once; never raises."""
    info = _loaded.get(backend)
    if info is not None:
        return info
    with _lock:
        info = _loaded.get(backend)
        if info is not None:
            return info
        if os.environ.get("GLMCTL_KERNELS") == "reference":
            info = {"ok": False, "error": "disabled by GLMCTL_KERNELS=reference", "path": None,
                    "module": None, "disabled": True}
        else:
            names = ["_cpu"] if backend == "cpu" else ["_cpu", "_cuda"]  # _cpu defines the op schemas
            info = {"ok": True, "error": None, "path": None, "module": None}
            for name in names:
                try:
                    mod = _import_extension(name)
                except Exception as e:  # noqa: BLE001 - ImportError, OSError (bad .so), ...
                    info = {"ok": False, "path": None, "module": None,
                            "error": f"glmctl.kernels.{name}: {type(e).__name__}: {e}"}
                    break
                info["module"], info["path"] = mod, getattr(mod, "__file__", None)
            if info["ok"]:
                _register_fake()
        _loaded[backend] = info
        return info


def _warn_fallback(backend: str, info: dict) -> None:
    global _warned
    if _warned or info.get("disabled"):
        return
    _warned = True
    warnings.warn(f"glmctl.kernels: the compiled {backend.upper()} kernel is unavailable ({info['error']}); "
                  f"using the slower torch reference (rebuild with `pip install --no-build-isolation -e .`; "
                  f"`glmctl kernels` shows the status)", RuntimeWarning, stacklevel=4)


def _constant(fn):
    """Mark fn as returning a trace-time constant for torch.compile (what
    torch.compiler.assume_constant_result does, without importing dynamo here)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant
def _available(backend: str) -> bool:
    """The compiled extension for ``backend`` is loaded (loading it on first use); warns once if not."""
    info = _loaded.get(backend) or _load(backend)
    if not info["ok"]:
        _warn_fallback(backend, info)
    return info["ok"]


@_constant
def _cuda_device_ok(index: int) -> bool:
    """The compiled CUDA archs can run on device ``index`` (-1: the current one); cached."""
    if index < 0:
        index = torch.cuda.current_device()
    cache = _loaded["cuda"].setdefault("device_ok", {})
    if index not in cache:
        cap = torch.cuda.get_device_capability(index)
        cache[index] = ok = _arch_supported(cap, _cuda_archs())
        if not ok:
            _warn_fallback("cuda", {"error": f"not compiled for sm_{cap[0]}{cap[1]} (device {index}); rebuild with "
                                             f"TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}"})
    return cache[index]


def _cuda_archs() -> list[int]:
    """Compiled cubin archs, e.g. [80, 86, 89, 90], from the extension's build string."""
    try:
        field = str(torch.ops.glmctl.cuda_build_info()).split("archs=")[1].split()[0]
        return [int(a) for a in field.replace("_", ",").split(",") if a.isdigit()]
    except Exception:  # noqa: BLE001
        return []


def _arch_supported(cap: tuple[int, int], archs: list[int]) -> bool:
    """A cubin for sm_XY runs on devices of the same major version and minor >= Y."""
    major, minor = cap
    return any(a // 10 == major and a % 10 <= minor for a in archs)


def quant_linear(x, qweight, scale, bias=None, bits: int = 4):
    """y = x @ dequant(qweight, scale)^T + bias, in x's dtype; x [..., k] -> [..., n]."""
    dev = x.device.type
    if (dev == "cpu" or dev == "cuda") and _available(dev):
        if (x.dtype in (_CPU_DTYPES if dev == "cpu" else _CUDA_DTYPES)
                and scale.dtype in _SCALE_DTYPES and qweight.dtype == torch.int8
                and (dev == "cpu" or _cuda_device_ok(-1 if x.device.index is None else x.device.index))):
            return torch.ops.glmctl.quant_linear(x, qweight, scale, bias, bits, 0)
    shape = x.shape
    y = quant_linear_ref(x.reshape(-1, shape[-1]), qweight, scale, bias, bits)
    return y.reshape(*shape[:-1], y.shape[-1])


@_constant
def _dense_available() -> bool:
    """The CPU extension is loaded and has the dense kernel (an extension built from an older
    source has only quant_linear); cached."""
    info = _loaded.get("cpu") or _load("cpu")
    if "dense" not in info:
        info["dense"] = bool(info["ok"]) and hasattr(torch.ops.glmctl, "dense_linear")
    return info["dense"]


def dense_linear(x, weight, bias=None):
    """y = x W^T + b for a floating-point weight, as ``F.linear``.

    In inference (no autograd) on the CPU with fp32 tensors and few rows of x (a decode step of
    up to 8 sequences, a short prefill), the C++ kernel: weight rows split evenly over torch's
    threads, 8 rows in flight at m = 1; at m = 2..16 on a CPU with AVX-512VL, tiles of weight
    rows read once for all rows (groups of 8), at m = 2..8 without it 4 x 2 tiles; a row's
    result is the same at every such m (MKL's sgemv reads the weight at about half the streaming
    bandwidth on the bench's AMD CPU and gains nothing from a second thread, its sgemm at m = 8
    streams an uncached weight at ~6 GB/s; bench/RESULTS.md). Everything else: ``F.linear``.
    """
    if (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.numel() <= 16 * x.shape[-1] and _dense_available()):
        return torch.ops.glmctl.dense_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@_constant
def decode_attention_available() -> bool:
    """The CPU extension is loaded and has the decode-attention kernel; cached."""
    info = _loaded.get("cpu") or _load("cpu")
    if "attention" not in info:
        info["attention"] = bool(info["ok"]) and hasattr(torch.ops.glmctl, "decode_attention")
    return info["attention"]


def decode_attention(q, k, v, blocked):
    """Attention of one new token per row (a decode step): q [b, n, 1, d], k/v [b, n, t, d] (a KV
    cache view; rows contiguous), blocked bool [b, 1, 1, t] (True = masked) -> [b, n, 1, d] =
    softmax(q k^T / sqrt(d), blocked keys excluded) v; a row with every key blocked gets the mean
    of v (glmctl.model.glm.math_attention's result). On the CPU in fp32 the C++ kernel: every
    (row, head) reads its keys and values once, in order, and skips the blocked ones, so a row's
    result does not depend on its batch's padding; elsewhere ``decode_attention_ref``."""
    if (q.device.type == "cpu" and not torch.is_grad_enabled() and q.dtype == k.dtype == v.dtype == torch.float32
            and q.shape[2] == 1 and decode_attention_available()):
        return torch.ops.glmctl.decode_attention(q, k, v, blocked)
    return decode_attention_ref(q, k, v, blocked)


def status() -> dict:
    """Which implementation serves CPU and CUDA tensors, and why."""
    out: dict = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    cpu = _load("cpu")
    if cpu["ok"]:
        out["cpu"] = {"implementation": "extension", "extension": cpu["path"],
                      "isa": str(torch.ops.glmctl.cpu_isa()), "threads": torch.get_num_threads(),
                      "reason": "compiled C++ kernel (AVX2/FMA when the CPU has it, OpenMP threads)"}
    else:
        out["cpu"] = {"implementation": "reference", "extension": None, "reason": cpu["error"]}
    cuda: dict = {}
    if not torch.version.cuda:
        cuda = {"implementation": "unavailable", "reason": "torch is not a CUDA build"}
    else:
        info = _load("cuda")
        if info["ok"]:
            build = str(torch.ops.glmctl.cuda_build_info())
            archs = _cuda_archs()
            cuda = {"implementation": "extension", "extension": info["path"], "build": build,
                    "compiled_archs": [f"sm_{a}" for a in archs]}
        else:
            cuda = {"implementation": "reference", "extension": None, "reason": info["error"]}
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            cuda["device"] = f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
            if info["ok"] and not _arch_supported(cap, _cuda_archs()):
                cuda["implementation"] = "reference"
                cuda["reason"] = (f"the extension was not compiled for sm_{cap[0]}{cap[1]}; rebuild with "
                                  f"TORCH_CUDA_ARCH_LIST={cap[0]}.{cap[1]}")
            elif info["ok"]:
                cuda["reason"] = "fused CUDA kernel (tensor-core GEMV/GEMM small m, dequantize + cuBLAS large m)"
        else:
            cuda["device"] = None
            if info["ok"]:
                cuda["reason"] = "extension loaded, but no CUDA device is visible"
    out["cuda"] = cuda
    return out
