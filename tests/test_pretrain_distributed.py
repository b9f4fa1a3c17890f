"""Multi-process pre-training gives the single-process result: DeepSpeed ZeRO-2 over 2 data-parallel
ranks, and 2-way tensor parallelism, both on gloo CPU (same global batch, same data order)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_glmctl
from glmctl import train_utils as tu
from test_pretrain import make_tokens

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
ENV = {"OMP_NUM_THREADS": "1", "GLMCTL_PROGRESS_INTERVAL": "1000", "DS_ACCELERATOR": "cpu",
       "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning"}
ARGS = ["--preset", "tiny", "--seq-len", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--steps", "4", "--dropout", "0", "--log-interval", "1", "--save-interval", "2", "--eval-samples", "8"]


def torchrun_glmctl(*args, nproc=2, timeout=600):
    exe = Path(sys.executable).parent / "torchrun"
    cmd = [str(exe), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "glmctl", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=timeout)


def steps(run: Path) -> list[dict]:
    return [r for r in tu.read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    tokens = make_tokens(d / "tokens")
    r = run_glmctl("pretrain", "--data", tokens, "--out", d / "single", *ARGS, env=ENV)
    assert r.returncode == 0, r.stderr
    return tokens, d / "single"


def assert_same_run(a: Path, b: Path):
    ra, rb = steps(a), steps(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)  # same gradient scale, not only loss
        assert x["lr"] == y["lr"] and x["samples"] == y["samples"]


def test_deepspeed_zero2_matches_single_process_and_resumes(single, tmp_path):
    tokens, ref = single
    ds = tmp_path / "ds"
    r = torchrun_glmctl("pretrain", "--data", tokens, "--out", ds, *ARGS, "--zero-stage", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(ref, ds)
    assert (ds / "final" / "trainer" / "deepspeed" / "latest").read_text().strip() == "ds"
    from safetensors.torch import load_file
    a, b = load_file(str(ref / "final" / "model.safetensors")), load_file(str(ds / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    # resuming the DeepSpeed checkpoint of step 2 repeats steps 3 and 4
    again = tmp_path / "again"
    r = torchrun_glmctl("pretrain", "--data", tokens, "--out", again, *ARGS, "--zero-stage", "2",
                        "--resume", ds / "step-00000002")
    assert r.returncode == 0, r.stderr[-3000:]
    for x, y in zip(steps(ds)[2:], steps(again)):
        assert (x["step"], x["loss"]) == (y["step"], y["loss"])


def test_tensor_parallel_matches_single_process(single, tmp_path):
    tokens, ref = single
    tp = tmp_path / "tp"
    r = torchrun_glmctl("pretrain", "--data", tokens, "--out", tp, *ARGS, "--tensor-parallel", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(ref, tp)
    names = sorted(p.name for p in (tp / "final").iterdir())
    assert "model-tp00-of-02.safetensors" in names and "model-tp01-of-02.safetensors" in names
    from glmctl.checkpoint import load_model
    a, b = load_model(ref / "final").state_dict(), load_model(tp / "final").state_dict()  # merged to TP=1 on load
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
