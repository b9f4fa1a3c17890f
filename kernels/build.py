"""Build glue for the compiled kernels, used by the repository's setup.py.

``extension_modules()`` returns
  * ``glmctl.kernels._cpu``  (always, when torch is importable): the C++ CPU kernel and the
    ``torch.ops.glmctl`` op definitions;
  * ``glmctl.kernels._cuda`` (when torch is a CUDA build and a CUDA toolkit is found): the CUDA
    kernels (pure ``.cu``, no torch headers, so nvcc stays fast) and their torch binding.

``build_ext_class`` is torch's BuildExtension, made tolerant: an extension that fails to compile
is reported and skipped, so glmctl still installs and runs on the torch reference.  The test
suite (tests/test_kernels.py) then fails loudly, because where a compiler exists the extensions
must exist too.

Environment:
  CUDA_HOME               CUDA toolkit root; defaults to /usr/local/cuda when it has bin/nvcc
                          (the nvcc first on PATH may be a wrapper that torch misreads).
  TORCH_CUDA_ARCH_LIST    defaults to "8.0;8.6;8.9;9.0" (A100, A10/3090, L4/4090, H100/H200).
  GLMCTL_NO_CUDA=1        build only the CPU extension.
  GLMCTL_NO_KERNELS=1     build nothing (pure-torch install).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0"

CPU_SOURCES = ["kernels/csrc/quant_cpu.cpp"]
CUDA_SOURCES = ["kernels/csrc/quant_cuda_binding.cpp", "kernels/csrc/quant_cuda.cu"]


def _default_cuda_home() -> str | None:
    """CUDA_HOME if set, else /usr/local/cuda when it holds nvcc (set in os.environ for torch)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        return "/usr/local/cuda"
    return None


def _src(rel: str) -> str:
    # setuptools wants paths relative to setup.py; fall back to absolute when run from elsewhere.
    return rel if Path.cwd().resolve() == ROOT else str(ROOT / rel)


def cuda_build_wanted() -> tuple[bool, str]:
    """(build the CUDA extension?, why not)."""
    if os.environ.get("GLMCTL_NO_CUDA") == "1":
        return False, "GLMCTL_NO_CUDA=1"
    import torch  # lazy: setup.py imports this module in build environments that may lack torch
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is not a CUDA build"
    home = _default_cuda_home()
    if not home or not (Path(home) / "bin" / "nvcc").exists():
        return False, "no CUDA toolkit (set CUDA_HOME to a directory with bin/nvcc)"
    return True, ""


def cuda_arch_flags(arch_list: str) -> tuple[list[str], list[int]]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST, and the cubin archs (e.g. [80, 86, 89, 90]).

    One PTX (compute_XY, lowest listed minor) per major version feeds the cubins of every
    listed minor, so "8.0;8.6;8.9;9.0" costs two front-end passes instead of four; "+PTX" also
    embeds that PTX, and "9.0a"-style entries get their own pass.
    """
    groups: dict[tuple[int, str], dict] = {}
    cubins: list[int] = []
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        entry = entry.removesuffix("+PTX")
        suffix = entry[-1] if entry[-1].isalpha() else ""
        major, minor = (int(v) for v in entry.rstrip("af").split("."))
        grp = groups.setdefault((major, suffix), {"minors": set(), "ptx": False})
        grp["minors"].add(minor)
        grp["ptx"] |= ptx
        cubins.append(major * 10 + minor)
    flags = []
    for (major, suffix), grp in sorted(groups.items()):
        base = f"{major}{min(grp['minors'])}{suffix}"
        codes = [f"sm_{major}{mi}{suffix}" for mi in sorted(grp["minors"])]
        if grp["ptx"]:
            codes.append(f"compute_{base}")
        flags.append(f"-gencode=arch=compute_{base},code=[{','.join(codes)}]")
    return flags, sorted(set(cubins))


def extension_modules() -> list:
    if os.environ.get("GLMCTL_NO_KERNELS") == "1":
        return []
    want_cuda, why_not = cuda_build_wanted()  # sets CUDA_HOME before cpp_extension reads it
    from torch.utils import cpp_extension  # lazy: see cuda_build_wanted (and after CUDA_HOME is set)
    common = ["-O3", "-g0", "-DNDEBUG"]
    exts = [cpp_extension.CppExtension(
        "glmctl.kernels._cpu", [_src(s) for s in CPU_SOURCES],
        extra_compile_args={"cxx": common + ["-fopenmp"]},
        extra_link_args=["-fopenmp", "-s"],
    )]
    if want_cuda:
        home = os.environ["CUDA_HOME"]
        if cpp_extension.CUDA_HOME != home:  # imported earlier with a guessed home
            cpp_extension.CUDA_HOME = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        arch_flags, cubins = cuda_arch_flags(os.environ["TORCH_CUDA_ARCH_LIST"])
        nvcc = ["-O3", "-DNDEBUG", "--threads=2",
                "-DGLMCTL_CUBIN_ARCHS=" + "_".join(str(a) for a in cubins)] + arch_flags
        exts.append(cpp_extension.CUDAExtension(
            "glmctl.kernels._cuda", [_src(s) for s in CUDA_SOURCES],
            extra_compile_args={"cxx": common, "nvcc": nvcc},  # our -gencode flags replace torch's
            extra_link_args=["-s"],
        ))
    elif os.environ.get("GLMCTL_VERBOSE_BUILD") == "1":
        print(f"glmctl.kernels: not building the CUDA extension: {why_not}", file=sys.stderr)
    return exts


def _make_build_ext():
    from torch.utils.cpp_extension import BuildExtension  # lazy: see cuda_build_wanted

    class TolerantBuildExtension(BuildExtension):
        """BuildExtension that skips (and reports) an extension that fails to compile."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - compiler errors come as several types
                if os.environ.get("GLMCTL_STRICT_BUILD") == "1":
                    raise
                msg = str(e).strip().splitlines()[-1:] or [type(e).__name__]
                print(f"\nglmctl.kernels: WARNING: building {ext.name} failed ({msg[0]}); glmctl will use "
                      f"the torch reference for it. Set GLMCTL_STRICT_BUILD=1 to stop on this error.\n",
                      file=sys.stderr)

    return TolerantBuildExtension.with_options(use_ninja=True)


_default_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME
try:
    build_ext_class = _make_build_ext()
except Exception:  # noqa: BLE001 - torch missing: setup.py installs without kernels
    build_ext_class = None
