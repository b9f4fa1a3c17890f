"""GPU check: build the CUDA kernels, verify them, and benchmark them — one command, a few minutes.

    python bench/gpu_check.py [--out DIR] [--build pip|jit|none] [--quick]

Steps (everything printed as tables and written to <out>/gpu_check.json; <out> is --out, else
$OUT, else bench/out):
  1. build   the extension against this machine's torch, for this GPU's arch only
             (`pip install --no-build-isolation --no-deps -e .`, falling back to `setup.py
             build_ext --inplace` and torch.utils.cpp_extension.load), then re-run itself in a
             fresh process so the build is imported;
  2. verify  every CUDA path (tensor-core, dequantize + cuBLAS, CUDA-core, automatic) against the
             fp32 reference on fresh random inputs: fp16/bf16 x INT4/INT8 x per-row/group 32/64/128
             scales, ragged m = 1..257, n and k not multiples of the tiles, with and without bias,
             output memory poisoned with NaN before each call; gate: relative Frobenius error
             <= 1e-3 above the error of the correctly rounded answer (which is 0 for fp32 output);
  3. measure the card: device-to-device copy and read bandwidth, bf16 cuBLAS 8192^3 TFLOP/s;
  4. bench   GLM-130B TP-4/TP-8 per-rank layer shapes and 4096^2 / 8192^2 at m = 1..256:
             CUDA-event medians of >= 50 runs after warm-up, weights rotated over copies that
             together exceed 3x L2, against fp16 torch.matmul and dequantize-then-matmul;
  5. decode  end-to-end batch-1 tokens/s of a glm-2b model (random weights), INT4 vs fp16.

Only torch, numpy and glmctl.kernels / glmctl.model / glmctl.config are imported (no zstandard,
no DeepSpeed), so it runs on a bare torch install.
"""
from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (tokenize.py): keep it off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

GLM_SHAPES = [  # (name, n = output rows, k = input columns), per rank (docs/glm130b.md §6.3)
    ("QKV tp4", 9216, 12288), ("QKV tp8", 4608, 12288),
    ("dense tp4", 12288, 3072), ("dense tp8", 12288, 1536),
    ("h_to_4h tp4", 16384, 12288), ("h_to_4h tp8", 8192, 12288),
    ("4h_to_h tp4", 12288, 8192), ("4h_to_h tp8", 12288, 4096),
    ("square 4096", 4096, 4096), ("square 8192", 8192, 8192),
]
BENCH_MS = [1, 4, 16, 64, 128, 256]
CHECK_MS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 128, 129, 255, 257]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- 1. build ------------------------------------------------------------------------------------
def build(mode: str) -> None:
    """Build for this GPU's arch only: pip editable install, else setup.py build_ext --inplace,
    else torch.utils.cpp_extension.load (each needs less of the environment than the one before)."""
    import torch
    cap = torch.cuda.get_device_capability()
    env = dict(os.environ)
    env["TORCH_CUDA_ARCH_LIST"] = os.environ.get("GLMCTL_GPU_CHECK_ARCHS", f"{cap[0]}.{cap[1]}")
    env.setdefault("MAX_JOBS", str(min(16, os.cpu_count() or 4)))
    if not env.get("CUDA_HOME") or not Path(env["CUDA_HOME"], "bin", "nvcc").exists():
        for cand in ("/usr/local/cuda", "/usr/local/cuda-13.0", "/usr/local/cuda-12"):
            if Path(cand, "bin", "nvcc").exists():
                env["CUDA_HOME"] = cand
                break
    env["GLMCTL_STRICT_BUILD"] = "1"
    log(f"build: TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} CUDA_HOME={env.get('CUDA_HOME')}")
    t0 = time.time()
    steps = {"pip": [[sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(REPO)]],
             "inplace": [[sys.executable, "setup.py", "build_ext", "--inplace"]],
             "jit": [[sys.executable, "-c", "import sys; sys.path.insert(0, %r); "
                      "from bench.gpu_check import jit_build; jit_build()" % str(REPO)]]}
    order = {"pip": ["pip", "inplace", "jit"], "inplace": ["inplace", "jit"], "jit": ["jit"]}[mode]
    for name in order:
        for cmd in steps[name]:
            log(f"build ({name}): {' '.join(cmd)[:200]}")
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if r.returncode == 0:
                log(f"build: done in {time.time() - t0:.0f}s")
                return
            log(r.stdout[-3000:] + r.stderr[-6000:])
            log(f"build ({name}) failed")
    raise SystemExit("build: the CUDA extension failed to build")


def jit_build() -> None:
    """Build both extensions with cpp_extension.load and copy them next to kernels/__init__.py."""
    import shutil
    import sysconfig
    sys.path.insert(0, str(REPO))
    from kernels.build import CPU_SOURCES, CUDA_SOURCES, cuda_arch_flags
    from torch.utils.cpp_extension import load
    arch_flags, cubins = cuda_arch_flags(os.environ["TORCH_CUDA_ARCH_LIST"])
    bdir = REPO / "build" / "gpu_check_jit"
    bdir.mkdir(parents=True, exist_ok=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for name, srcs, kw in (
        ("_cpu", CPU_SOURCES, dict(extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])),
        ("_cuda", CUDA_SOURCES, dict(extra_cflags=["-O3"], extra_cuda_cflags=[
            "-O3", "-DGLMCTL_CUBIN_ARCHS=" + "_".join(map(str, cubins))] + arch_flags)),
    ):
        d = bdir / name
        d.mkdir(exist_ok=True)
        load(name=name, sources=[str(REPO / s) for s in srcs], build_directory=str(d), is_python_module=False,
             verbose=False, **kw)
        shutil.copy2(d / f"{name}.so", REPO / "kernels" / f"{name}{suffix}")


def import_kernels():
    """glmctl.kernels, installed (editable) or straight from the source tree."""
    try:
        import glmctl.kernels as K
        return K
    except ImportError:
        sys.path.insert(0, str(REPO))
        import glmctl
        glmctl.__path__.append(str(REPO))  # glmctl.kernels -> kernels/ as package-dir does
        import glmctl.kernels as K
        return K


# ---- helpers -------------------------------------------------------------------------------------
def rel_err(y, ref) -> float:
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison(torch) -> None:
    """Leave NaN in freed caching-allocator blocks, so unwritten output elements show up."""
    for nbytes in (64 << 20, 4 << 20, 1 << 20, 64 << 10):
        t = torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
        del t


def cuda_time(torch, fn, iters: int = 60, warmup: int = 5) -> float:
    """Median microseconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


class Rotor:
    """Copies of the weights whose total exceeds 3x L2, used round-robin so weights come from HBM."""

    def __init__(self, tensors, l2_bytes: int):
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        count = max(3, math.ceil(3 * l2_bytes / max(nbytes, 1)) + 1)
        self.copies = [tuple(t.clone() for t in tensors) for _ in range(count)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


# ---- 2. verify -----------------------------------------------------------------------------------
def verify(torch, K, quick: bool) -> dict:
    ms = CHECK_MS[::3] + [257] if quick else CHECK_MS
    rows, worst_all, failures = [], 0.0, []
    gen = torch.Generator().manual_seed(1234)
    configs = []
    for dtype in (torch.float16, torch.bfloat16):
        for bits in (4, 8):
            for group in (None, 32, 64, 128):
                configs.append((dtype, bits, group))
    for dtype, bits, group in configs:
        tile_cols = 128 if bits == 4 else 64
        k = {None: 3 * tile_cols + 32, 32: 3 * tile_cols + 32, 64: 7 * 64, 128: 5 * 128}[group]
        n = 1000 + 13
        w = torch.randn(n, k, generator=gen)
        q, s = K.quantize_rtn(w, bits, group, scale_dtype=dtype)
        b = torch.randn(n, generator=gen).to(dtype)
        q, s, b = q.cuda(), s.cuda(), b.cuda()
        worst = {p: 0.0 for p in (0, 1, 2, 3)}
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(dtype).cuda()
            for bias in (None, b):
                ref = K.quant_linear_ref(x.float(), q, s, bias, bits)
                floor = rel_err(ref.to(dtype), ref)
                for path in (0, 1, 2, 3):
                    poison(torch)
                    y = torch.ops.glmctl.quant_linear(x, q, s, bias, bits, path)
                    torch.cuda.synchronize()
                    nan = bool(y.isnan().any())
                    err = float("inf") if nan else rel_err(y, ref) - floor
                    worst[path] = max(worst[path], err)
                    if nan or err > 1e-3:
                        failures.append(dict(dtype=str(dtype), bits=bits, group=group, m=m, path=path,
                                             bias=bias is not None, excess_error=err, nan=nan))
        for p, e in worst.items():
            worst_all = max(worst_all, e)
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), bits=bits, group=group or "row", n=n, k=k,
                             path={0: "auto", 1: "tensor-core", 2: "dequant+cuBLAS", 3: "cuda-core"}[p],
                             worst_excess_error=e, ok=e <= 1e-3))
    # odd shapes and layouts that must fall back (CUDA-core / dequant), fp32 activations, misalignment
    odd = []
    for bits, k, group in ((4, 200, None), (4, 96, 48), (8, 100, None), (8, 72, 24), (4, 4096, 16)):
        w = torch.randn(77, k, generator=gen)
        q, s = K.quantize_rtn(w, bits, group)
        q, s = q.cuda(), s.cuda()
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for m in (1, 5, 40, 80):
                x = torch.randn(m, k, generator=gen).to(dtype).cuda()
                ref = K.quant_linear_ref(x.float(), q, s, None, bits)
                poison(torch)
                y = K.quant_linear(x, q, s, None, bits)
                e = rel_err(y, ref) - rel_err(ref.to(dtype), ref)
                odd.append(e)
                if not e <= 1e-3:
                    failures.append(dict(case="odd", bits=bits, k=k, group=group, dtype=str(dtype), m=m,
                                         excess_error=e))
    xb = torch.randn(3 * 256 + 1, generator=gen).half().cuda()
    x = xb[1:].view(3, 256)  # 2-byte offset: misaligned for 16-byte loads
    q, s = K.quantize_rtn(torch.randn(64, 256, generator=gen), 4)
    q, s = q.cuda(), s.cuda()
    ref = K.quant_linear_ref(x.float(), q, s, None, 4)
    e = rel_err(K.quant_linear(x, q, s, None, 4), ref) - rel_err(ref.half(), ref)
    odd.append(e)
    if not e <= 1e-3:
        failures.append(dict(case="misaligned x", excess_error=e))
    # batch independence of the tensor-core path
    q, s = K.quantize_rtn(torch.randn(512, 1024, generator=gen), 4, 128, scale_dtype=torch.bfloat16)
    q, s = q.cuda(), s.cuda()
    xx = torch.randn(40, 1024, generator=gen).bfloat16().cuda()
    yy = torch.ops.glmctl.quant_linear(xx, q, s, None, 4, 1)
    indep = all(torch.equal(torch.ops.glmctl.quant_linear(xx[i:i + 1], q, s, None, 4, 1)[0], yy[i]) for i in (0, 9, 39))
    if not indep:
        failures.append(dict(case="batch independence (tensor-core path)"))
    return {"rows": rows, "worst_excess_error": worst_all, "odd_shapes_worst": max(odd),
            "batch_independent": indep, "failures": failures[:50], "n_failures": len(failures),
            "ok": not failures}


# ---- 3. the card -----------------------------------------------------------------------------------
def measure_card(torch) -> dict:
    n = 1 << 28  # 1 GiB of fp32
    a = torch.empty(n, device="cuda")
    b = torch.empty_like(a)
    a.normal_()
    t_copy = cuda_time(torch, lambda: b.copy_(a), iters=20)
    t_sum = cuda_time(torch, lambda: a.sum(), iters=20)
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_mm = cuda_time(torch, lambda: x @ y, iters=20)
    del x, y
    props = torch.cuda.get_device_properties(0)
    copy_bw = 2 * 4 * n / (t_copy * 1e-6)
    read_bw = 4 * n / (t_sum * 1e-6)
    return {"copy_GBps": copy_bw / 1e9, "read_GBps": read_bw / 1e9, "bw_meas_GBps": max(copy_bw, read_bw) / 1e9,
            "bf16_TFLOPs": 2 * 8192 ** 3 / (t_mm * 1e-6) / 1e12, "l2_bytes": getattr(props, "L2_cache_size", 50 << 20),
            "sms": props.multi_processor_count}


# ---- 4. kernels ------------------------------------------------------------------------------------
def bench(torch, K, card: dict, quick: bool) -> list[dict]:
    shapes = GLM_SHAPES[:4] + GLM_SHAPES[-2:] if quick else GLM_SHAPES
    ms = [1, 16, 256] if quick else BENCH_MS
    bw = card["bw_meas_GBps"] * 1e9
    l2 = card["l2_bytes"]
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(7)
    for name, n, k in shapes:
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
        q4, s4 = K.quantize_rtn(w, 4, None)
        q4g, s4g = K.quantize_rtn(w, 4, 128)
        q8, s8 = K.quantize_rtn(w, 8, None)
        rot = {"fp16": Rotor([w], l2), "int4": Rotor([q4, s4], l2), "int4g128": Rotor([q4g, s4g], l2),
               "int8": Rotor([q8, s8], l2)}
        del w
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16, generator=gen)
            io = 2 * m * k + 2 * m * n

            def qcall(key, bits, path):
                r = rot[key]
                return lambda: torch.ops.glmctl.quant_linear(x, *r.next(), None, bits, path)

            t_fp16 = cuda_time(torch, lambda: torch.matmul(x, rot["fp16"].next()[0].t()))
            t_deq = cuda_time(torch, qcall("int4", 4, 2))
            entry = dict(shape=name, n=n, k=k, m=m, fp16_us=t_fp16, dequant_matmul_us=t_deq)
            for key, bits in (("int4", 4), ("int4g128", 4), ("int8", 8)):
                qb = sum(t.numel() * t.element_size() for t in rot[key].copies[0])
                t = cuda_time(torch, qcall(key, bits, 0))
                entry[f"{key}_us"] = t
                entry[f"{key}_bw_frac"] = (qb + io) / (t * 1e-6) / bw
                entry[f"{key}_vs_fp16"] = t_fp16 / t
                entry[f"{key}_vs_dequant"] = t_deq / t
            if m >= 64:  # both paths, to place the automatic switch
                entry["int4_fused_us"] = cuda_time(torch, qcall("int4", 4, 1))
                entry["int4_dequant_us"] = t_deq
            entry["fp16_bw_frac"] = (2 * n * k + io) / (t_fp16 * 1e-6) / bw
            rows.append(entry)
            log(f"bench {name:12s} m={m:3d}: fp16 {t_fp16:8.1f}us  int4 {entry['int4_us']:8.1f}us "
                f"({entry['int4_vs_fp16']:.2f}x, {entry['int4_bw_frac']:.0%} BW)")
        del rot
        torch.cuda.empty_cache()
    return rows


def bench_bf16_and_tuning(torch, K, card: dict) -> dict:
    """bf16 activations (vs bf16 matmul; fused vs hi/lo dequant at large m) and an (rt, ks) sweep."""
    l2 = card["l2_bytes"]
    out = {"bf16": [], "tuning": []}
    gen = torch.Generator(device="cuda").manual_seed(8)
    for name, n, k in (("h_to_4h tp8", 8192, 12288), ("dense tp8", 12288, 1536)):
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
        q, s = K.quantize_rtn(w, 4, 128, scale_dtype=torch.bfloat16)
        rw, rq = Rotor([w], l2), Rotor([q, s], l2)
        for m in (1, 16, 64, 128, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            t_bf = cuda_time(torch, lambda: torch.matmul(x, rw.next()[0].t()))
            t = {p: cuda_time(torch, lambda p=p: torch.ops.glmctl.quant_linear(x, *rq.next(), None, 4, p))
                 for p in (0, 1, 2)}
            out["bf16"].append(dict(shape=name, m=m, bf16_us=t_bf, auto_us=t[0], fused_us=t[1], dequant_hilo_us=t[2],
                                    auto_vs_bf16=t_bf / t[0]))
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            for rt, ks in ((0, 0), (1, 8), (1, 4), (1, 2), (2, 4), (2, 2), (4, 2), (4, 1)):
                torch.ops.glmctl.cuda_tune(rt, ks)
                us = cuda_time(torch, lambda: torch.ops.glmctl.quant_linear(x, *rq.next(), None, 4, 1))
                out["tuning"].append(dict(shape=name, m=m, rt=rt, ks=ks, us=us))
            torch.ops.glmctl.cuda_tune(0, 0)
        del rw, rq, w
        torch.cuda.empty_cache()
    return out


# ---- 5. decode -------------------------------------------------------------------------------------
def decode(torch, K, card: dict, steps: int, preset: str = "glm-2b", device: str = "cuda") -> dict:
    from glmctl.config import get_preset
    from glmctl.model import GLM
    from glmctl.model.parallel import _TPLinear
    cfg = get_preset(preset).replace(hidden_dropout=0.0, attention_dropout=0.0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    fp = GLM(cfg, device=dev, dtype=torch.float16).eval()
    with torch.no_grad():
        for name, p in fp.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    qm = GLM(cfg.replace(quantization={"bits": 4, "group_size": None, "method": "rtn"}), device=dev,
             dtype=torch.float16).eval()
    with torch.no_grad():
        fp_mods = dict(fp.named_modules())
        plain = {}
        for name, mod in qm.named_modules():
            if isinstance(mod, _TPLinear) and mod.quant:
                qq, ss = K.quantize_rtn(fp_mods[name].weight.float(), 4, None)
                mod.weight.copy_(qq)
                mod.weight_scale.copy_(ss)
        for key, v in fp.state_dict().items():
            mod_name = key.rsplit(".", 1)[0]
            if key.endswith(".weight") and isinstance(fp_mods.get(mod_name), _TPLinear):
                continue
            plain[key] = v
        missing, unexpected = qm.load_state_dict(plain, strict=False)
        assert not unexpected, unexpected

    def weight_bytes(model):
        return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

    def run(model, prompt=16):
        V = cfg.vocab_size
        with torch.inference_mode():
            toks = torch.randint(0, V, (1, prompt), device=dev)
            cache = model.new_kv_cache()
            pos = torch.arange(prompt, device=dev)[None]
            mask = torch.ones(prompt, prompt, dtype=torch.bool, device=dev).triu(1)[None, None]
            nxt = model(toks, pos, mask, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
            for i in range(3):  # warm-up steps
                p = prompt + i
                nxt = model(nxt, torch.full((1, 1), p, device=dev), torch.zeros(1, 1, 1, p + 1, dtype=torch.bool,
                                                                                 device=dev),
                            kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
            sync()
            t0 = time.perf_counter()
            for i in range(steps):
                p = prompt + 3 + i
                nxt = model(nxt, torch.full((1, 1), p, device=dev), torch.zeros(1, 1, 1, p + 1, dtype=torch.bool,
                                                                                 device=dev),
                            kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
            sync()
            return steps / (time.perf_counter() - t0)

    bw = card["bw_meas_GBps"] * 1e9
    res = {}
    for label, model in (("fp16", fp), ("int4", qm)):
        tps = run(model)
        wb = weight_bytes(model)
        res[label] = {"tokens_per_s": tps, "ms_per_token": 1e3 / tps, "weight_bytes": wb,
                      "bw_bound_tokens_per_s": bw / wb, "fraction_of_bw_bound": tps / (bw / wb)}
        log(f"decode {label}: {tps:.1f} tokens/s ({1e3 / tps:.2f} ms/token), bound {bw / wb:.0f} tokens/s")
    res["int4_vs_fp16"] = res["int4"]["tokens_per_s"] / res["fp16"]["tokens_per_s"]
    # the INT4 model's output agrees with its fp16 parent (quantization error only)
    with torch.inference_mode():
        toks = torch.randint(0, cfg.vocab_size, (1, 8), device=dev)
        pos = torch.arange(8, device=dev)[None]
        mask = torch.ones(8, 8, dtype=torch.bool, device=dev).triu(1)[None, None]
        a = fp(toks, pos, mask).float()
        b = qm(toks, pos, mask).float()
        res["int4_logits_rel_diff"] = rel_err(b, a)
    del fp, qm
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


# ---- report ----------------------------------------------------------------------------------------
def table(title: str, cols: list[str], rows: list[list]) -> None:
    cells = [[(f"{v:.3g}" if isinstance(v, float) else str(v)) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else bench/out)")
    ap.add_argument("--build", choices=["pip", "inplace", "jit", "none"], default="pip",
                    help="how to build the extension first (default pip: editable install; falls back to "
                         "setup.py build_ext --inplace, then to a JIT build); none: use what is built")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and batch sizes")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--skip", default="", help="comma list of steps to skip: verify,bench,decode")
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible", file=sys.stderr)
        return 2
    if a.build != "none":
        build(a.build)
        args = [x for x in (argv if argv is not None else sys.argv[1:])]
        if "--build" in args:
            i = args.index("--build")
            del args[i:i + 2]
        args = [x for x in args if not x.startswith("--build=")]
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", "none"] + args)
        return r.returncode
    out_dir = Path(a.out or os.environ.get("OUT") or REPO / "bench" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    K = import_kernels()
    st = K.status()
    report = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "kernels": st}
    print(f"gpu_check on {report['device']} (sm_{report['capability'][0]}{report['capability'][1]}), torch "
          f"{report['torch']}, kernels: cuda={st['cuda']['implementation']} ({st['cuda'].get('build')})")
    if st["cuda"]["implementation"] != "extension":
        print(f"gpu_check: the CUDA extension is not in use: {st['cuda'].get('reason')}", file=sys.stderr)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        return 1
    skip = set(a.skip.split(","))

    def save():
        report["elapsed_s"] = time.time() - t_start
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    ok = True
    if "verify" not in skip:
        t0 = time.time()
        v = verify(torch, K, a.quick)
        report["verify"] = v
        ok = v["ok"]
        table(f"correctness (excess rel. Frobenius error over the rounded answer, gate 1e-3; "
              f"{time.time() - t0:.0f}s)", ["dtype", "bits", "group", "n", "k", "path", "worst", "ok"],
              [[r["dtype"], r["bits"], r["group"], r["n"], r["k"], r["path"], r["worst_excess_error"], r["ok"]]
               for r in v["rows"]])
        print(f"odd shapes/layouts worst excess error {v['odd_shapes_worst']:.2e}; tensor-core path batch "
              f"independent: {v['batch_independent']}; failures: {v['n_failures']}")
        for f in v["failures"][:10]:
            print("  FAIL", f)
        save()
    card = measure_card(torch)
    report["card"] = card
    print(f"\ncard: copy {card['copy_GBps']:.0f} GB/s, read {card['read_GBps']:.0f} GB/s, bf16 cuBLAS 8192^3 "
          f"{card['bf16_TFLOPs']:.0f} TFLOP/s, L2 {card['l2_bytes'] >> 20} MiB, {card['sms']} SMs")
    save()
    if "bench" not in skip:
        rows = bench(torch, K, card, a.quick)
        report["bench"] = rows
        table("INT4/INT8 weight-only linear, fp16 activations (us = CUDA-event median; xFP16 = fp16 torch.matmul "
              "time / ours; xDQ = dequantize+cuBLAS time / ours; BW = fraction of measured bandwidth)",
              ["shape", "n", "k", "m", "fp16 us", "int4 us", "xFP16", "xDQ", "BW", "g128 us", "xFP16", "BW",
               "int8 us", "xFP16", "BW"],
              [[r["shape"], r["n"], r["k"], r["m"], r["fp16_us"], r["int4_us"], r["int4_vs_fp16"],
                r["int4_vs_dequant"], r["int4_bw_frac"], r["int4g128_us"], r["int4g128_vs_fp16"],
                r["int4g128_bw_frac"], r["int8_us"], r["int8_vs_fp16"], r["int8_bw_frac"]] for r in rows])
        big = [r for r in rows if r["m"] >= 64]
        if big:
            table("automatic switch (INT4 per-row, fp16): tensor-core kernel vs dequantize + cuBLAS",
                  ["shape", "m", "fused us", "dequant us", "auto us"],
                  [[r["shape"], r["m"], r["int4_fused_us"], r["int4_dequant_us"], r["int4_us"]] for r in big])
        save()
        extra = bench_bf16_and_tuning(torch, K, card)
        report["bench_bf16"] = extra["bf16"]
        report["tuning"] = extra["tuning"]
        table("bf16 activations, INT4 g128 (hi/lo dequant keeps fp32 accuracy)",
              ["shape", "m", "bf16 us", "auto us", "fused us", "dequant us", "x bf16"],
              [[r["shape"], r["m"], r["bf16_us"], r["auto_us"], r["fused_us"], r["dequant_hilo_us"],
                r["auto_vs_bf16"]] for r in extra["bf16"]])
        table("tensor-core kernel block shape (rt row tiles x ks k-slices; 0,0 = heuristic)",
              ["shape", "m", "rt", "ks", "us"],
              [[r["shape"], r["m"], r["rt"], r["ks"], r["us"]] for r in extra["tuning"]])
        save()
    if "decode" not in skip:
        d = decode(torch, K, card, a.decode_steps)
        report["decode"] = d
        table("glm-2b decode, batch 1, eager (random weights)", ["model", "tokens/s", "ms/token", "weights GB",
                                                               "BW bound tok/s", "of bound"],
              [[lab, d[lab]["tokens_per_s"], d[lab]["ms_per_token"], d[lab]["weight_bytes"] / 1e9,
                d[lab]["bw_bound_tokens_per_s"], d[lab]["fraction_of_bw_bound"]] for lab in ("fp16", "int4")])
        print(f"INT4 vs fp16 decode: {d['int4_vs_fp16']:.2f}x; INT4 logits rel. diff vs fp16 "
              f"{d['int4_logits_rel_diff']:.3f}")
        save()
    save()
    print(f"\ngpu_check: {'PASS' if ok else 'FAIL'} in {time.time() - t_start:.0f}s; report: {out_dir / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
