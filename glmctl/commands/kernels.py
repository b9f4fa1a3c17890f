"""`glmctl kernels`: which quantized-linear implementation serves CPU and CUDA tensors, and why."""
from __future__ import annotations

import typer

from glmctl import console, kernels
from glmctl.errors import EXIT_CODES_HELP

EPILOG = ("Examples:\n\n  glmctl kernels\n\n  glmctl kernels --json\n\n"
          "Rebuild the compiled kernels with `pip install --no-build-isolation -e .` "
          "(CUDA_HOME and TORCH_CUDA_ARCH_LIST select the CUDA toolkit and GPU archs).\n\n" + EXIT_CODES_HELP)


def register(app: typer.Typer) -> None:
    app.command("kernels", epilog=EPILOG)(kernels_cmd)


def _rows(st: dict) -> list[list]:
    rows = []
    for dev in ("cpu", "cuda"):
        d = st[dev]
        detail = []
        if dev == "cpu" and d.get("isa"):
            detail.append(f"isa={d['isa']}, threads={d['threads']}")
        if dev == "cuda":
            if d.get("compiled_archs"):
                detail.append("archs=" + ",".join(d["compiled_archs"]))
            if "device" in d:
                detail.append(f"device={d['device'] or 'none visible'}")
        if d.get("extension"):
            detail.append(d["extension"])
        rows.append([dev, d["implementation"], d.get("reason") or "", "; ".join(detail)])
    return rows


def kernels_cmd(json_out: bool = typer.Option(False, "--json", help="Print the status as one JSON document.")):
    """Show which quantized-linear kernel serves CPU and CUDA tensors (compiled extension or torch
    reference), the reason, the extension file and the compiled GPU architectures."""
    st = kernels.status()
    if json_out:
        console.emit_json(st)
        return
    console.print_table(f"glmctl kernels (torch {st['torch']}, CUDA {st['torch_cuda'] or 'none'})",
                        ["device", "implementation", "why", "details"], _rows(st))
