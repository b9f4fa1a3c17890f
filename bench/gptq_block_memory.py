"""Peak host memory of GPTQ on one GLM-130B block at full width (glmctl.quantization.GPTQ), measured.

    nice .venv/bin/python bench/gptq_block_memory.py [--width 12288 --inner 32768 --heads 96]
                                                     [--windows 4 --seq 128 --batch-size 1] [--lapack]

Runs what `glmctl quantize --method gptq` runs for one block: glmctl.quantization.GPTQ.run_layer
(GPTQ INT4, groups of 1024, act order, as bench/glm130b_rehearsal.py's gptq-layer step) over random
calibration windows, on a synthetic checkpoint with GLM-130B's block shapes (hidden 12,288, 96
heads, GeGLU inner 32,768; random weights stored fp16 as released, quantized in fp32; a 1,024-token
vocabulary: the embedding is not what is measured), up to and including the propagation of the
calibration activations through the quantized block to the next one. The block is built without
its linears' weights; each is read when its turn comes, released once quantized and rebuilt from
its codes only for its own forwards (docs/quantize.md, "Memory").

Per phase it prints the peak RSS within that phase (VmHWM, reset at each phase's start through
/proc/self/clear_refs), the parts a model of the phase expects (fp32 weights, the fp16 buffer a
weight is read into, Hessian, codes, activations) and what is left over (temporaries), then the
same parts at full width with the left-over scaled by the width ratio (an upper bound: much of it is
allocator and BLAS pools that do not grow with the width; also printed as measured): the
extrapolated full-width peak per phase, next to the issue's target (one layer fp32 + calibration activations + 1 GB, on
top of the process's baseline). Phases per linear: "inputs" (a forward per batch up to the linear,
the finished linears rebuilt one at a time), "read" (its weight read and cast to fp32), "H" (the
Hessian built from the captured inputs, before it is factored), "GPTQ" (factoring and the column
loop, packing); then "propagate".

Without ``--lapack`` the three LAPACK calls of the inverse-Hessian factoring (cholesky,
cholesky_inverse, cholesky upper) are replaced by in-place no-ops: at k = 32,768 they alone take
~45 minutes on 2 cores, and with column-major ``out=`` (glmctl.gptq._inverse_cholesky_) they
allocate nothing (``--check-lapack K`` measures that on a K x K matrix). Memory, not speed, is
what this measures; the codes it produces without --lapack are meaningless.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import zlib
from pathlib import Path

import torch

from glmctl import gptq as G
from glmctl import quantization as QZ
from glmctl.config import get_preset
from glmctl.model import GLM
from glmctl.model.glm import GLMBlock
from glmctl.model.masks import prefix_lm_mask
from glmctl.quantization import GPTQ, OutputLayout, Variant, Windows

GB = 1e9


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def check_lapack(k: int) -> dict:
    """Extra peak RSS of the in-place factoring chain on a k x k SPD matrix (column-major out=),
    after one warm-up at that size (LAPACK keeps a workspace per size, allocated on first use)."""
    def spd():
        x = torch.randn(k + 64, k)
        return x.T @ x
    G._inverse_cholesky_(spd(), 0.01, torch.randperm(k))
    H = spd()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    ok = G._inverse_cholesky_(H, 0.01, torch.randperm(k)) is not None
    return {"k": k, "matrix_bytes": k * k * 4, "extra_peak_bytes": status("VmHWM") - base, "ok": ok}


class SyntheticReader:
    """What GPTQ reads a checkpoint through (``cfg``, ``read(name, tp, rank)`` at TP=1): random
    tensors of ``cfg``'s shapes, stored fp16, made on each read into a fresh buffer as
    glmctl.checkpoint.CheckpointReader reads one (a band of rows at a time: no fp32 temporary)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.shapes = {k: tuple(v.shape) for k, v in GLM(cfg, device="meta").state_dict().items()}

    def read(self, name: str, tp_out=None, rank: int = 0) -> torch.Tensor:
        shape = self.shapes[name]
        if "layernorm.weight" in name:
            return torch.ones(shape, dtype=torch.float16)
        if len(shape) == 1:
            return torch.zeros(shape, dtype=torch.float16)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        t = torch.empty(shape, dtype=torch.float16)
        for r in range(0, shape[0], 1024):
            t[r:r + 1024] = torch.randn(t[r:r + 1024].shape, generator=g).mul_(shape[1] ** -0.5)
        return t


def parts(cfg, phase: str, j: int, a) -> dict:
    """The bytes ``phase`` of linear ``j`` is expected to hold beyond the process's baseline."""
    shapes = linear_shapes(cfg)
    acts = a.windows * a.seq * cfg.hidden_size * 4
    n, k = shapes[j] if j is not None else (0, 0)
    done = range(j if j is not None else len(shapes))
    p = {"activations": acts,
         "codes of the finished linears": sum(nn * kk // 2 + nn * kk // 1024 * 2 for nn, kk in (shapes[i] for i in done))}
    if phase != "propagate":
        p["captured inputs"] = a.windows * a.seq * k * 4
    if phase == "inputs" and j:
        p["largest finished fp32 weight (its forward)"] = max(nn * kk * 4 for nn, kk in shapes[:j])
    elif phase == "read":
        p.update({"fp32 weight": n * k * 4, "fp16 read buffer": n * k * 2})
    elif phase == "H":
        p.update({"fp32 weight": n * k * 4, "Hessian": k * k * 4})
    elif phase == "GPTQ":
        p.update({"fp32 weight": n * k * 4, "Hessian": k * k * 4, "int8 codes": n * k})  # packed after H is freed
    elif phase == "propagate":
        p.update({"next activations": acts, "largest fp32 weight (its forward)": max(nn * kk * 4 for nn, kk in shapes)})
    return p


def linear_shapes(cfg) -> list:
    return [block_shapes(cfg)[f"{name}.weight"] for name in G.LINEAR_NAMES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=12288)
    ap.add_argument("--inner", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=96)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lapack", action="store_true", help="run the real LAPACK calls (hours at full width)")
    ap.add_argument("--check-lapack", type=int, metavar="K", help="only measure the factoring chain at K x K")
    a = ap.parse_args()
    if a.check_lapack:
        print(json.dumps(check_lapack(a.check_lapack)))
        return
    if not a.lapack:
        def chol(A, upper=False, out=None):
            out[1].zero_()
            return out

        torch.linalg.cholesky_ex = chol
        torch.cholesky_inverse = lambda A, upper=False, out=None: out
    base = get_preset("glm-130b")
    cfg = base.replace(num_layers=2, hidden_size=a.width, num_attention_heads=a.heads, inner_hidden_size=a.inner,
                       vocab_size=1024, hidden_dropout=0.0, attention_dropout=0.0)
    full = base.replace(num_layers=2)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    s = a.seq
    windows = Windows(torch.randint(0, cfg.vocab_size, (a.windows, s), generator=g), torch.arange(s),
                      prefix_lm_mask(s, s // 4), torch.arange(s), torch.zeros(a.windows, s, dtype=torch.long), "random")
    out = OutputLayout(cfg, Variant(4, "gptq", 1024), 1, torch.float16, torch.float16, 1024)
    phases, where = [], {"linear": None}

    def mark(phase: str, j=None) -> None:
        """Close the phase that ends now (its peak: VmHWM since the last mark) and start the next."""
        phases.append({"phase": phase, "linear": j, "rss": status("VmRSS"), "peak": status("VmHWM"),
                       "s": time.perf_counter() - t0})
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS

    def traced(fn, phase, after=True):
        def wrapper(*args, **kw):
            if not after:
                mark(phase, where["linear"])
            r = fn(*args, **kw)
            if after:
                mark(phase, where["linear"])
            return r
        return wrapper

    capture = G._capture_inputs

    def capture_traced(blk, linear, *args):
        where["linear"] = next(j for j, n in enumerate(G.LINEAR_NAMES) if blk.get_submodule(n) is linear)
        r = capture(blk, linear, *args)
        mark("inputs", where["linear"])
        return r

    with tempfile.TemporaryDirectory() as spill:
        qz = GPTQ(SyntheticReader(cfg), out, windows, batch_size=a.batch_size, dtype=torch.float32, device="cpu",
                  block_size=128, damp=0.01, act_order=True, budget=2**30, spill_dir=Path(spill))
        mark("setup (embedding, windows)")
        QZ.build_layer = traced(QZ.build_layer, "block built (linears unread)")
        QZ.check_fp16 = traced(QZ.check_fp16, "read")  # called on the weight just read and cast
        G._inverse_cholesky_ = traced(G._inverse_cholesky_, "H", after=False)
        G.gptq_quantize = traced(G.gptq_quantize, "GPTQ")
        G._capture_inputs = capture_traced
        qz.run_layer(0)
        mark("propagate")
        qz.close()
    baseline = phases[0]["rss"]
    acts = a.windows * s * cfg.hidden_size * 4
    layer_bytes = sum(math.prod(sh) * 4 for sh in block_shapes(cfg).values())
    full_layer = sum(math.prod(sh) * 4 for sh in block_shapes(full).values())
    ratio = full.hidden_size / cfg.hidden_size
    rows = []
    for p in phases[2:]:
        key = p["phase"]
        if key == "H" and rows and rows[-1]["phase"] == "H" and rows[-1]["linear"] == p["linear"]:
            continue  # a dampening retry
        here, there = parts(cfg, key, p["linear"], a), parts(full, key, p["linear"], a)
        rest = p["peak"] - baseline - sum(here.values())
        rows.append({"phase": key, "linear": p["linear"], "peak": p["peak"], "parts": here, "other": rest,
                     "full_parts": there, "full_peak": baseline + sum(there.values()) + max(rest, 0) * ratio,
                     "full_peak_other_as_measured": baseline + sum(there.values()) + max(rest, 0)})
    target = layer_bytes + acts + GB
    full_target = full_layer + acts + GB
    print(f"width {cfg.hidden_size} / {cfg.inner_hidden_size}: process baseline {baseline / GB:.2f} GB, "
          f"block fp32 {layer_bytes / GB:.2f} GB, activations {acts / GB:.3f} GB, "
          f"target {target / GB:.2f} GB + baseline = {(target + baseline) / GB:.2f} GB")
    shapes = linear_shapes(cfg)
    for r in rows:
        name = r["phase"] + ("" if r["linear"] is None else f" {G.LINEAR_NAMES[r['linear']]} {shapes[r['linear']]}")
        print(f"  {name:60s} peak {r['peak'] / GB:6.2f} GB = baseline + "
              + " + ".join(f"{k} {v / GB:.3f}" for k, v in r["parts"].items()) + f" + other {r['other'] / GB:.3f}")
    print(f"peak RSS {max(r['peak'] for r in rows) / GB:.2f} GB")
    print(f"extrapolated to {full.hidden_size} / {full.inner_hidden_size} (parts at that width, 'other' x {ratio:g}; "
          f"target {full_target / GB:.2f} GB + baseline = {(full_target + baseline) / GB:.2f} GB):")
    for r in rows:
        name = r["phase"] + ("" if r["linear"] is None else f" {G.LINEAR_NAMES[r['linear']]}")
        print(f"  {name:40s} {r['full_peak'] / GB:6.2f} GB = {baseline / GB:.2f} + "
              + " + ".join(f"{k} {v / GB:.2f}" for k, v in r["full_parts"].items())
              + f" + other {max(r['other'], 0) * ratio / GB:.2f}  (other as measured: {r['full_peak_other_as_measured'] / GB:.2f})")
    print(f"extrapolated peak {max(r['full_peak'] for r in rows) / GB:.2f} GB "
          f"({max(r['full_peak_other_as_measured'] for r in rows) / GB:.2f} GB with 'other' as measured)")
    print(json.dumps({"width": cfg.hidden_size, "inner": cfg.inner_hidden_size, "heads": cfg.num_attention_heads,
                      "lapack": a.lapack, "baseline_bytes": baseline, "layer_fp32_bytes": layer_bytes,
                      "activation_bytes": acts, "target_bytes": target, "phases": rows,
                      "peak_rss_bytes": max(r["peak"] for r in rows),
                      "full_width_peak_bytes": max(r["full_peak"] for r in rows), "full_width_target_bytes": full_target}))


def block_shapes(cfg) -> dict:
    return {k: tuple(v.shape) for k, v in GLMBlock(cfg, 0, device="meta").state_dict().items()}


if __name__ == "__main__":
    main()
