"""Pre-training throughput: `glmctl pretrain` on the `small` preset (or --preset) on CPU (and
glm-335m in bf16 on a GPU when one is present), as tokens/s and as achieved FLOP/s over a large
torch.mm measured in the same process (fp32 on CPU, bf16 on GPU).

    .venv/bin/python bench/pretrain.py [--preset small] [--steps 8] [--micro-batch-size 8] [--seq-len 512] [--threads N]

Two FLOP counts per trained token (L layers, width d, sequence s, vocabulary V, N parameters):

    issue formula  6 N + 12 L d s                         (PaLM's model FLOPs; what the target uses)
    work needed    6 (N - V d) + 6 V d f + 12 L d s       f = share of tokens scored (Part B):
                                                          the trainer computes logits only there
Each training step is followed by a short matmul probe, and the ratio is the median over steps of
step FLOP/s / probe FLOP/s: the machine may be shared, and its load changes during a run.
Targets (docs/pretrain.md, "Speed"): CPU >= 30 % of fp32 mm; H100 bf16 glm-335m >= 35 %.
The fused-attention path is compared with the explicit fp32-softmax math (--exact-attention).
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds tokenize.py, which would shadow the standard library's tokenize module
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from glmctl import runtime  # noqa: E402
from glmctl.artifacts import ArtifactWriter  # noqa: E402
from glmctl.config import get_preset  # noqa: E402
from glmctl.console import print_table  # noqa: E402
from glmctl.data import index_bytes  # noqa: E402
from glmctl.stages.pretrain import PretrainConfig, resolve_model_config  # noqa: E402
from glmctl.train_utils import TrainData  # noqa: E402
from glmctl.training import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def mm_rate(device: str, dtype, n: int, repeats: int = 2) -> float:
    """FLOP/s of an n x n x n matmul, best of ``repeats`` (the practical peak for this dtype)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def make_tokens(out: Path, n_tokens: int, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    toks = rng.integers(10, vocab - 100, size=n_tokens).astype(np.uint16)
    lengths = np.full(n_tokens // 1000, 1000)
    with ArtifactWriter(out, stage="tokenize", config={"bench": n_tokens}) as w:
        (w.path / "shard-00000.bin").write_bytes(toks[: lengths.sum()].tobytes())
        (w.path / "shard-00000.idx").write_bytes(index_bytes(lengths, np.uint16))
        w.summary = {"shards": [{"name": "shard-00000"}], "vocab_size": vocab}
    return out


def train(tmp: Path, *, preset: str, seq_len: int, micro: int, steps: int, precision: str, exact: bool,
          device: str, mm_dtype, mm_n: int) -> dict:
    """The stage's own Trainer, step by step; after each step a matmul probe measures the peak
    at that moment, so a machine whose load changes still gives a fair ratio (median of steps)."""
    cfg = get_preset(preset)
    data = tmp / f"tokens-{preset}-{seq_len}"
    if not data.exists():
        make_tokens(data, (steps + 4) * micro * seq_len * 2, cfg.vocab_size - 64)
    c = PretrainConfig(data=str(data), out=str(tmp / "run"), preset=preset, seq_len=seq_len,
                       micro_batch_size=micro, steps=steps, precision=precision, exact_attention=exact,
                       dropout=0.1, eval_samples=micro, valid_fraction=0.05)
    rt = runtime.start(device=device, tp=c.tensor_parallel)
    mcfg, seq_len = resolve_model_config(c, None)
    tr = Trainer(c, rt, mcfg, seq_len, TrainData(c.data, seq_len, c.seed, None, c.valid_fraction), None,
                 None, tmp / "run", [])
    L, d, V, N = mcfg.num_layers, mcfg.hidden_size, mcfg.vocab_size, mcfg.num_parameters()
    attn = 12 * L * d * seq_len
    per_step = []
    for i in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m = tr.train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        peak = mm_rate(device, mm_dtype, mm_n)
        if i >= 2:  # the first steps warm up allocators and kernels
            tokens = m["batch_size"] * seq_len
            work = 6 * (N - V * d) * tokens + 6 * V * d * m["scored_tokens"] + attn * tokens
            per_step.append((tokens / dt, (6 * N + attn) * tokens / dt, work / dt, peak))
    runtime.stop(rt)
    med = lambda k: statistics.median(x[k] for x in per_step)  # noqa: E731
    return {"preset": preset, "precision": precision, "attention": "explicit" if exact else "fused", "params": N,
            "tokens_per_s": med(0), "flops_issue": med(1), "flops_work": med(2), "mm_peak": med(3),
            "ratio_issue": statistics.median(x[1] / x[3] for x in per_step),
            "ratio_work": statistics.median(x[2] / x[3] for x in per_step)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="CPU model (default small; medium is the 14M model)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-exact", action="store_true", help="skip the explicit-attention comparison run")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        kw = dict(preset=a.preset, seq_len=a.seq_len, micro=a.micro_batch_size, precision="fp32", device="cpu",
                  mm_dtype=torch.float32, mm_n=2048)
        runs = [train(tmp, steps=a.steps, exact=False, **kw)]
        if not a.no_exact:
            runs.append(train(tmp, steps=max(5, a.steps // 2), exact=True, **kw))
        for r in runs:
            rows.append({**r, "device": f"cpu x{torch.get_num_threads()} threads", "target": 0.30})
        if torch.cuda.is_available():
            r = train(tmp, preset="glm-335m", seq_len=2048, micro=8, steps=12, precision="bf16", exact=False,
                      device="cuda", mm_dtype=torch.bfloat16, mm_n=8192)
            rows.append({**r, "device": torch.cuda.get_device_name(), "target": 0.35})
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print_table("pretrain throughput (ratio = achieved FLOP/s / torch.mm FLOP/s in this process)",
                ["device", "model", "precision", "attention", "tokens/s", "GFLOP/s (6N+attn)", "GFLOP/s (work)",
                 "mm GFLOP/s", "ratio (6N+attn)", "ratio (work)", "target"],
                [[r["device"], f"{r['preset']} ({r['params'] / 1e6:.1f}M)", r["precision"], r["attention"],
                  round(r["tokens_per_s"]), round(r["flops_issue"] / 1e9, 1), round(r["flops_work"] / 1e9, 1),
                  round(r["mm_peak"] / 1e9, 1), f"{r['ratio_issue']:.1%}", f"{r['ratio_work']:.1%}",
                  f">= {r['target']:.0%}"] for r in rows])
    fused = [r for r in rows if r["attention"] == "fused" and r["precision"] == "fp32"]
    exact = [r for r in rows if r["attention"] == "explicit"]
    if fused and exact:
        speedup = fused[0]["tokens_per_s"] / exact[0]["tokens_per_s"]
        print(f"fused attention vs explicit fp32-softmax math: {speedup:.2f}x tokens/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
