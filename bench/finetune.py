"""Fine-tuning cost per method on one model: step time and peak memory of LoRA, P-tuning v2 and
LoRA on the INT4 model against full fine-tuning, measured in the same run (each method in its own
process, so peak memory is its own).

    .venv/bin/python bench/finetune.py --model demo/model [--int4 demo/model-int4] [--steps 12]

Step time: median over steps after two warm-up steps (the machine may be shared). Peak memory:
the process's peak resident set after training minus its peak once the model is loaded and the
adapters are attached (activations, gradients, optimizer state), and the trainable state itself
(weights, gradients, two AdamW moments of the trainable parameters, fp32).
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds tokenize.py, which would shadow the standard library's tokenize module
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from glmctl import adapters, finetune_tasks  # noqa: E402
from glmctl import finetune_data as fd  # noqa: E402
from glmctl import runtime  # noqa: E402
from glmctl.console import print_table  # noqa: E402
from glmctl.session import open_model  # noqa: E402
from glmctl.stages.finetune import DEFAULT_LR, FinetuneConfig  # noqa: E402
from glmctl.training import Trainer  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def one(method: str, model: str, steps: int, seq_len: int, micro: int) -> dict:
    """Train ``steps`` steps of ``method`` (lora | ptuning | full) on the built-in task."""
    with tempfile.TemporaryDirectory() as td:
        paths = finetune_tasks.write_task("numerals_zh", Path(td) / "data")
        rt = runtime.start(device="cpu", tp=1)
        s = open_model(model, dtype="fp32", device=rt.device)
        ex = fd.read_examples(paths["train"], s.tokenizer, s.ids, seq_len)
        src = fd.FinetuneSource(fd.pack_examples(ex.items, seq_len, s.ids, 1),
                                fd.pack_examples(ex.items[:8], seq_len, s.ids, 2), 1)
        c = FinetuneConfig(base=model, data=str(paths["train"]), out=td, method=method, micro_batch_size=micro,
                           eval_samples=1, lr=DEFAULT_LR[method])
        glm = s.model
        for m in glm.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        glm.use_fast_attention(True)
        if method != "full":
            adapters.attach(glm, c.adapter_spec())
            adapters.freeze_base(glm)
        tr = Trainer.for_model(c, rt, glm, seq_len, src, None, Path(td), [], stage="finetune", steps=steps)
        loaded = peak_rss_mib()
        times = []
        for i in range(steps):
            t = time.perf_counter()
            tr.train_step()
            if i >= 2:
                times.append(time.perf_counter() - t)
        n = tr.trainable_parameters()
        runtime.stop(rt)
        return {"method": method, "model": model, "trainable_parameters": n, "step_s": statistics.median(times),
                "peak_over_loaded_mib": peak_rss_mib() - loaded, "trainable_state_mib": n * 16 / 2**20,
                "tokens_per_step": micro * seq_len}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--int4", default=None, help="the INT4 model made from --model (LoRA on it is reported too)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.model, a.steps, a.seq_len, a.micro_batch_size)))
        return
    runs = [("full", a.model), ("lora", a.model), ("ptuning", a.model)] + ([("lora", a.int4)] if a.int4 else [])
    rows = []
    for method, model in runs:
        r = subprocess.run([sys.executable, __file__, "--one", method, "--model", model, "--steps", str(a.steps),
                            "--seq-len", str(a.seq_len), "--micro-batch-size", str(a.micro_batch_size)],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    full = rows[0]
    for r in rows:
        r["step_vs_full"] = r["step_s"] / full["step_s"]
        r["memory_vs_full"] = r["peak_over_loaded_mib"] / max(full["peak_over_loaded_mib"], 1e-9)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print_table(f"fine-tuning cost, {a.micro_batch_size} x {a.seq_len} tokens per step, cpu x{torch.get_num_threads()}",
                ["method", "model", "trainable", "step s", "vs full", "peak MiB over loaded", "vs full",
                 "trainable state MiB"],
                [[r["method"], r["model"], f"{r['trainable_parameters']:,}", f"{r['step_s']:.3f}",
                  f"{r['step_vs_full']:.2f}", f"{r['peak_over_loaded_mib']:.1f}", f"{r['memory_vs_full']:.2f}",
                  f"{r['trainable_state_mib']:.2f}"] for r in rows])


if __name__ == "__main__":
    main()
