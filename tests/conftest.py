import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("GLMCTL_PROGRESS_INTERVAL", "1000")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_glmctl(*args, env=None, input=None, cwd=None, timeout=600):
    """Run the real console script in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    exe = Path(sys.executable).parent / "glmctl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "glmctl"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=e, input=input,
                          cwd=cwd, timeout=timeout)


def torchrun(script: Path, nproc: int, *args, env=None, timeout=300):
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"})
    e.update(env or {})
    exe = Path(sys.executable).parent / "torchrun"
    cmd = [str(exe), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script)] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)


def pytest_collection_modifyitems(config, items):
    import torch
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
