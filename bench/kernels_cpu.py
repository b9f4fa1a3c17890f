"""CPU INT4/INT8 weight-only linear: glmctl's kernel against torch baselines, same process.

    python bench/kernels_cpu.py [--json] [--shapes 4096x4096,4096x11008] [--m 1,4,16] [--threads N]

For each shape (n x k: n output rows, k input columns) and batch m it times
  * glmctl INT4 / INT8 (per-row scale, and INT4 group 128) with fp32 and bf16 activations,
  * fp32 F.linear and bf16 F.linear on the dense weight,
  * dequantize-then-matmul (the torch reference: fp32 weight materialised each call),
  * torch's own CPU ops: aten._weight_int4pack_mm_for_cpu (group 128, bf16 activations) and
    aten._weight_int8pack_mm (per-row, bf16 activations), when this torch has them,
and prints microseconds, speedup over fp32 F.linear, and the fraction of the DRAM read
bandwidth measured in the same run (bytes = weights + scales + activations + output).
Weights are rotated over enough copies to exceed the last-level cache, so they come from DRAM.
Best and median of repeated runs after warm-up (ratios use the best: other processes only add
time); speed is a ratio against baselines in this process.
"""
from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (tokenize.py): keep it off the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

try:
    import glmctl.kernels as K
except ImportError:  # not installed: use the source tree (glmctl.kernels lives in kernels/)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import glmctl
    glmctl.__path__.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import glmctl.kernels as K

LLC_BYTES = 64 << 20  # rotate weight copies until at least this many bytes are in play


CLOCK = time.perf_counter


def timeit(fn, reps: int, min_time: float = 0.3) -> tuple[float, float]:
    """(best, median) seconds per call.  The table uses the best run: on a shared machine other
    processes only ever add time, so the minimum is the least noisy estimate of the kernel's cost."""
    fn()
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < reps or time.perf_counter() < t_end:
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
        if len(times) >= 20 * reps:
            break
    return min(times), statistics.median(times)


def dram_bandwidth(nbytes: int = 512 << 20) -> float:
    """Read bandwidth (bytes/s) of a sum over a tensor far larger than the caches."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    t, _ = timeit(lambda: a.sum(), reps=5, min_time=0.5)
    return nbytes / t


class Rotor:
    """Call fn(*args_i) cycling over copies i so each call streams fresh (uncached) weights."""

    def __init__(self, make, nbytes_each: int):
        self.copies = [make() for _ in range(max(2, -(-LLC_BYTES // max(nbytes_each, 1)) + 1))]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


def bench_shape(n: int, k: int, ms: list[int], bw: float, reps: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) * 0.02
    q4, s4 = K.quantize_rtn(w, 4, None)
    q4g, s4g = K.quantize_rtn(w, 4, 128)
    q8, s8 = K.quantize_rtn(w, 8, None)
    wb = w.to(torch.bfloat16)
    have_i4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    have_i8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")
    if have_i4:
        qi = K.unpack_int4(q4g).to(torch.int32) + 8
        t4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi, 2)
        sz = torch.stack([s4g.float().t().contiguous(), torch.zeros(k // 128, n)], -1).to(torch.bfloat16)
    s8b = s8.to(torch.bfloat16)

    def copies(*ts):
        return Rotor(lambda: tuple(t.clone() for t in ts), sum(t.numel() * t.element_size() for t in ts))

    rot = {
        "fp32": copies(w), "bf16": copies(wb),
        "int4": copies(q4, s4), "int4g128": copies(q4g, s4g), "int8": copies(q8, s8),
    }
    if have_i4:
        rot["t_int4"] = copies(t4, sz)
    if have_i8:
        rot["t_int8"] = copies(q8, s8b)

    def nbytes(*ts):
        return sum(t.numel() * t.element_size() for t in ts)

    for m in ms:
        x = torch.randn(m, k, generator=gen)
        xb = x.to(torch.bfloat16)
        io32 = nbytes(x) + m * n * 4
        io16 = nbytes(xb) + m * n * 2
        cases = [
            ("fp32 F.linear", "fp32", lambda r: F.linear(x, r[0]), nbytes(w) + io32),
            ("bf16 F.linear", "bf16", lambda r: F.linear(xb, r[0]), nbytes(wb) + io16),
            ("dequant+matmul int4", "int4", lambda r: K.quant_linear_ref(x, r[0], r[1], None, 4), nbytes(q4, s4) + io32),
            ("glmctl int4 fp32", "int4", lambda r: K.quant_linear(x, r[0], r[1], None, 4), nbytes(q4, s4) + io32),
            ("glmctl int4 bf16", "int4", lambda r: K.quant_linear(xb, r[0], r[1], None, 4), nbytes(q4, s4) + io16),
            ("glmctl int4 g128 fp32", "int4g128", lambda r: K.quant_linear(x, r[0], r[1], None, 4),
             nbytes(q4g, s4g) + io32),
            ("glmctl int4 g128 bf16", "int4g128", lambda r: K.quant_linear(xb, r[0], r[1], None, 4),
             nbytes(q4g, s4g) + io16),
            ("glmctl int8 fp32", "int8", lambda r: K.quant_linear(x, r[0], r[1], None, 8), nbytes(q8, s8) + io32),
            ("glmctl int8 bf16", "int8", lambda r: K.quant_linear(xb, r[0], r[1], None, 8), nbytes(q8, s8) + io16),
        ]
        if have_i4:
            cases.append(("torch _weight_int4pack_mm g128 bf16", "t_int4",
                          lambda r: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, r[0], 128, r[1]),
                          nbytes(t4, sz) + io16))
        if have_i8:
            cases.append(("torch _weight_int8pack_mm bf16", "t_int8",
                          lambda r: torch.ops.aten._weight_int8pack_mm(xb, r[0], r[1]), nbytes(q8, s8b) + io16))
        base = None
        for name, key, fn, nb in cases:
            ro = rot[key]
            t, med = timeit(lambda: fn(ro.next()), reps=reps)
            if base is None:
                base = t
            rows.append({"shape": f"{n}x{k}", "n": n, "k": k, "m": m, "impl": name, "us": t * 1e6,
                         "median_us": med * 1e6,
                         "speedup_vs_fp32": base / t, "bytes": nb, "bw_fraction": nb / t / bw})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="comma list of NxK")
    ap.add_argument("--m", default="1,4,16", help="comma list of batch sizes")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                    help="wall: perf_counter; cpu: this thread's CPU time with 1 thread (robust when other "
                         "processes compete for the cores); auto: cpu when the load average exceeds half "
                         "the cores")
    a = ap.parse_args(argv)
    global CLOCK
    clock = a.clock
    if clock == "auto":
        clock = "cpu" if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1) else "wall"
    if clock == "cpu":
        CLOCK = time.thread_time
        a.threads = 1
        print(f"note: timing CPU time of one thread (load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores)", file=sys.stderr)
    if a.threads:
        torch.set_num_threads(a.threads)
    st = K.status()
    if st["cpu"]["implementation"] != "extension":
        print(f"warning: CPU extension not loaded ({st['cpu'].get('reason')}); timing the reference",
              file=sys.stderr)
    bw = dram_bandwidth()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s]
    ms = [int(v) for v in a.m.split(",") if v]
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, ms, bw, a.reps)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": clock, "cpu": platform.processor() or
            platform.machine(), "isa": st["cpu"].get("isa"), "dram_read_GBps": bw / 1e9}
    if a.json:
        json.dump({"meta": meta, "rows": rows}, sys.stdout, indent=2)
        print()
        return 0
    print(f"torch {meta['torch']}, {meta['threads']} threads, {clock} clock, kernel ISA {meta['isa']}, "
          f"measured DRAM read bandwidth {bw / 1e9:.1f} GB/s")
    cur = None
    for r in rows:
        key = (r["shape"], r["m"])
        if key != cur:
            cur = key
            print(f"\n{r['shape']} (n x k), m={r['m']}")
            print(f"  {'implementation':38s} {'best us':>10s} {'median us':>10s} {'vs fp32':>8s} {'of DRAM BW':>10s}")
        print(f"  {r['impl']:38s} {r['us']:10.1f} {r['median_us']:10.1f} {r['speedup_vs_fp32']:7.2f}x "
              f"{r['bw_fraction']:9.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
