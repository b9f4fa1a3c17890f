"""Peak host memory of GPTQ on one GLM-130B block at full width (glmctl.gptq.gptq_layer), measured.

    nice .venv/bin/python bench/gptq_block_memory.py [--width 12288 --inner 32768 --heads 96]
                                                     [--windows 4 --seq 128] [--lapack]

Builds one fp32 block with GLM-130B's shapes (hidden 12,288, 96 heads, GeGLU inner 32,768; random
weights), runs GPTQ INT4 (groups of 1024, act order, as bench/glm130b_rehearsal.py's gptq-layer
step) over random calibration states, then propagates them through the quantized block, and
prints VmHWM (peak RSS) after each phase next to the issue's target (one layer fp32 +
calibration activations + 1 GB). Per linear, gptq_layer first captures its inputs (a forward per
window, the finished linears rebuilt from their codes for it: phase "inputs of (n, k)"), then
releases the finished linears and builds the Hessian from the captured inputs (phase "H (k x k)
built", taken before it is factored, with the fp32 weight bytes the block still holds then: for
dense_4h_to_h its own weight alone; docs/quantize.md, "Memory"), then quantizes ("GPTQ (n, k)").

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
import time

import torch

from glmctl import gptq as G
from glmctl.checkpoint import layer_from_state_dict
from glmctl.config import get_preset
from glmctl.model.glm import GLMBlock, rope_cos_sin
from glmctl.model.masks import prefix_lm_mask

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=12288)
    ap.add_argument("--inner", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=96)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
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
    cfg = get_preset("glm-130b").replace(num_layers=70, hidden_size=a.width, num_attention_heads=a.heads,
                                         inner_hidden_size=a.inner, hidden_dropout=0.0, attention_dropout=0.0)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    shapes = block_shapes(cfg)
    sd = {}
    for name, shape in shapes.items():
        fan_in = shape[-1] if len(shape) == 2 else 1
        std = 1.0 / math.sqrt(fan_in) if len(shape) == 2 else 0.02
        sd[name] = torch.randn(shape, generator=g).mul_(std) if "layernorm.weight" not in name else torch.ones(shape)
    layer = layer_from_state_dict(cfg, 0, sd, torch.float32, "cpu").eval()
    del sd
    layer_bytes = sum(p.numel() * 4 for p in layer.parameters())
    b, s = a.windows, a.seq
    hidden = [torch.randn(1, s, cfg.hidden_size, generator=g) for _ in range(b)]
    pos = torch.arange(s)[None]
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rotary_base, torch.float32, cfg.rope)
    rest = [(cos, sin, prefix_lm_mask(s, s // 4))] * b
    act_bytes = b * s * cfg.hidden_size * 4
    phases = [{"phase": "block built", "rss": status("VmRSS"), "hwm": status("VmHWM"), "s": time.perf_counter() - t0}]
    orig = G.gptq_quantize

    def traced(weight, H, *args, **kw):
        r = orig(weight, H, *args, **kw)
        phases.append({"phase": f"GPTQ {tuple(weight.shape)}", "rss": status("VmRSS"), "hwm": status("VmHWM"),
                       "s": time.perf_counter() - t0})
        return r
    G.gptq_quantize = traced
    factor = G._inverse_cholesky_

    def factor_traced(H, d, perm=None):
        held = sum(p.untyped_storage().nbytes() for n, p in layer.named_parameters() if n.endswith(".weight")
                   and p.dim() == 2)
        phases.append({"phase": f"H {tuple(H.shape)} built", "rss": status("VmRSS"), "hwm": status("VmHWM"),
                       "s": time.perf_counter() - t0, "weights_held": held})
        return factor(H, d, perm)
    G._inverse_cholesky_ = factor_traced
    capture = G._capture_inputs

    def capture_traced(blk, linear, *args):
        r = capture(blk, linear, *args)
        phases.append({"phase": f"inputs of {tuple(linear.weight.shape)}", "rss": status("VmRSS"),
                       "hwm": status("VmHWM"), "s": time.perf_counter() - t0})
        return r
    G._capture_inputs = capture_traced
    res = G.gptq_layer(layer, hidden, rest, 4, 1024, block_size=128, damp=0.01, act_order=True)
    with torch.no_grad():
        nxt = [layer(x, c, sn, m, None) for x, (c, sn, m) in zip(hidden, rest)]
    phases.append({"phase": "propagated", "rss": status("VmRSS"), "hwm": status("VmHWM"), "s": time.perf_counter() - t0})
    target = layer_bytes + act_bytes + GB
    out = {"width": cfg.hidden_size, "inner": cfg.inner_hidden_size, "heads": cfg.num_attention_heads,
           "lapack": a.lapack, "layer_fp32_bytes": layer_bytes, "activation_bytes": act_bytes,
           "largest_hessian_bytes": max(cfg.hidden_size, cfg.inner_hidden_size) ** 2 * 4,
           "codes_bytes": sum(r.qweight.numel() * r.qweight.element_size() for r in res.values()),
           "target_bytes": target, "peak_rss_bytes": status("VmHWM"), "phases": phases, "outputs": len(nxt)}
    for p in phases:
        held = f", linear weights held {p['weights_held'] / GB:.2f} GB" if "weights_held" in p else ""
        print(f"{p['phase']:>28s}: RSS {p['rss'] / GB:6.2f} GB, peak {p['hwm'] / GB:6.2f} GB  ({p['s']:.0f} s){held}")
    print(f"layer fp32 {layer_bytes / GB:.2f} GB, activations {act_bytes / GB:.3f} GB, target {target / GB:.2f} GB, "
          f"peak RSS {out['peak_rss_bytes'] / GB:.2f} GB")
    print(json.dumps(out))


def block_shapes(cfg) -> dict:
    return {k: tuple(v.shape) for k, v in GLMBlock(cfg, 0, device="meta").state_dict().items()}


if __name__ == "__main__":
    main()
