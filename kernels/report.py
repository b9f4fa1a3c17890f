"""Resource usage of every CUDA kernel: registers, spills, stack and shared memory, per GPU arch.

    python -m glmctl.kernels.report [--arch "8.0;9.0"] [--json]

Compiles kernels/csrc/quant_cuda.cu (pure CUDA, no torch headers: seconds per arch) with
``ptxas -v`` and tabulates what ptxas reports.  Needs nvcc (CUDA_HOME, else /usr/local/cuda), not
a GPU.  Spills or a local-memory stack in a hot kernel are worth a look before timing anything.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from glmctl.console import print_table

from .build import cuda_arch_flags

CSRC = Path(__file__).resolve().parent / "csrc"

# Dynamic shared memory the launchers request (quant_cuda.cu): the tensor-core kernel uses
# warps * 4 stages * 16 rows * 80 bytes for its weight ring (the k-slice reduction reuses it).
DYNAMIC_SMEM = {"wo_mma_kernel": "warps x 5120 B (<= 40960 B at 8 warps)"}


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    p = Path(home) / "bin" / "nvcc"
    return str(p) if p.exists() else shutil.which("nvcc")


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """'(anonymous namespace)::wo_mma_kernel<__half, 4, 1, true>(...)' -> 'wo_mma_kernel<__half, 4, 1, true>'."""
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list: first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    return name[:cut]


def parse_ptxas(text: str) -> list[dict]:
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": 0,
                   "spill_loads": 0, "stack": 0, "static_smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(v) for v in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["static_smem"] = int(s.group(1)) if s else 0
    names = demangle([r["mangled"] for r in rows])
    for r in rows:
        r["kernel"] = short(names[r.pop("mangled")])
        base = r["kernel"].split("<")[0]
        r["dynamic_smem"] = DYNAMIC_SMEM.get(base, "0")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default=None, help='TORCH_CUDA_ARCH_LIST-style list (default: $TORCH_CUDA_ARCH_LIST, '
                                                 'else "8.0;9.0")')
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    a = ap.parse_args(argv)
    nvcc = find_nvcc()
    if not nvcc:
        print("glmctl.kernels.report: no nvcc (set CUDA_HOME)", file=sys.stderr)
        return 1
    archs = a.arch or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    flags, _ = cuda_arch_flags(archs)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-O3", "-DNDEBUG", "-std=c++17", "-Xptxas", "-v", "-c", str(CSRC / "quant_cuda.cu"),
               "-o", str(Path(tmp) / "quant_cuda.o")] + flags
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-4000:], file=sys.stderr)
        return 1
    rows = sorted(parse_ptxas(r.stderr), key=lambda x: (x["arch"], x["kernel"]))
    if a.json:
        json.dump({"nvcc": nvcc, "archs": archs, "kernels": rows}, sys.stdout, indent=2)
        print()
        return 0
    print_table(f"CUDA kernel resources ({archs}; dynamic shared memory is set at launch)",
                ["arch", "kernel", "regs", "spill st/ld B", "stack B", "static smem B", "dynamic smem"],
                [[x["arch"], x["kernel"], x["registers"], f"{x['spill_stores']}/{x['spill_loads']}", x["stack"],
                  x["static_smem"], x["dynamic_smem"]] for x in rows])
    bad = [x for x in rows if x["spill_stores"] or x["spill_loads"]]
    if bad:
        print(f"{len(bad)} kernel(s) spill registers to local memory", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
