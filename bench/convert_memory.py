"""Peak memory of `glmctl convert` on a large synthetic SAT checkpoint, against a naive baseline.

The claim (issue 5): resharding streams tensor by tensor, so peak memory is a few tensors, not the
model; GLM-130B's tools/convert_tp.py loads whole shards and needs ~260 GB of host RAM. This
script writes a synthetic fp16 SAT checkpoint (GLM-130B layout, random weights, a few GB), then in
fresh child processes runs:

  streaming  glmctl's convert: SAT TP=2 -> glmctl TP=4 (cut), glmctl TP=4 -> SAT TP=1 and
             SAT TP=2 -> glmctl TP=1 (merge: GLM-130B's TP 8 -> 4 case)
  naive      what convert_tp.py does: torch.load every shard whole, merge, split, torch.save per rank

and reports each child's peak RSS above its RSS after imports, against the largest tensor and the
checkpoint size, plus the naive/streaming ratios (memory and time) measured in this same run.

    .venv/bin/python bench/convert_memory.py                 # ~2.3 GB checkpoint (default)
    .venv/bin/python bench/convert_memory.py --layers 2 --hidden 2048 --vocab 16384   # quick
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds a tokenize.py that would shadow the standard library's `tokenize` (torch needs it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

CHILD = r'''
import json, sys, time
def status(key):  # VmHWM is this address space's peak; ru_maxrss would include the parent's (kept across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
mode, src, out, heads, tp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
to = sys.argv[6]
import torch
from glmctl import tp_layout
from glmctl.formats import sat
from glmctl.stages import convert as C
from glmctl.console import set_quiet
set_quiet(True)
base = status("VmRSS")
t0 = time.perf_counter()
if mode == "streaming":
    C.run(C.ConvertConfig(src=src, out=out, tp=tp, to=to, num_attention_heads=heads, verify=False))
else:  # naive: whole shards in memory, as tools/convert_tp.py
    from pathlib import Path
    root = Path(src); it = sat.read_latest(root)
    shards = [torch.load(f, weights_only=True)["module"] for f in sat.shard_files(root / it)]
    full = {k: tp_layout.merge_tensors(k, [s[k] for s in shards]) for k in shards[0]}
    del shards
    o = Path(out); (o / it).mkdir(parents=True)
    for r in range(tp):
        torch.save({"module": {k: tp_layout.shard_tensor(k, v, tp, r).clone() for k, v in full.items()}},
                   o / it / sat.shard_name(r))
    (o / "latest").write_text(it + "\n")
secs = time.perf_counter() - t0
print(json.dumps({"baseline": base, "peak": status("VmHWM"), "seconds": secs}))
'''


def write_synthetic(root: Path, *, layers: int, hidden: int, heads: int, vocab: int, tp: int) -> dict:
    """A SAT checkpoint written tensor by tensor (glmctl.formats.sat.ShardWriter), so making it is cheap too."""
    # imported here: this runs in the --make child, so the parent process stays small
    import torch
    from glmctl.config import ModelConfig
    from glmctl.formats import sat
    from glmctl.formats.shapes import split_shape
    from glmctl.model import GLM
    inner = -(-(8 * hidden // 3) // 64) * 64
    cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, inner_hidden_size=inner,
                      vocab_size=vocab)
    shapes = {k: tuple(v.shape) for k, v in GLM(cfg, device="meta").state_dict().items()}
    d = hidden // heads
    for i in range(layers):
        shapes[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = (d // 2,)
    it = "1000"
    (root / it).mkdir(parents=True)
    (root / "latest").write_text(it + "\n")
    local = {k: split_shape(k, s, tp) for k, s in shapes.items()}
    writers = [sat.ShardWriter(root / it / sat.shard_name(r), [(k, tuple(local[k]), torch.float16) for k in shapes])
               for r in range(tp)]
    g = torch.Generator().manual_seed(0)
    for k in shapes:
        for r in range(tp):
            writers[r].write(k, (torch.randn(tuple(local[k]), generator=g) * 0.02).half())
    for w in writers:
        w.close()
    sizes = {k: 2 * __import__("math").prod(s) for k, s in shapes.items()}
    return {"bytes": sum(sizes.values()), "largest": max(sizes.values()),
            "largest_name": max(sizes, key=sizes.get), "tensors": len(sizes), "config": cfg}


def child(mode, src, out, heads, tp, to):
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), str(heads), str(tp), to],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{mode} child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--tp", type=int, default=2, help="TP of the synthetic checkpoint")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:
        facts = write_synthetic(a.make, layers=a.layers, hidden=a.hidden, heads=a.heads, vocab=a.vocab, tp=a.tp)
        print(json.dumps({k: v for k, v in facts.items() if k != "config"}))
        return
    work = a.dir or Path(tempfile.mkdtemp(prefix="glmctl-convert-bench-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        # in a child too, so this process stays small
        r = subprocess.run([sys.executable, __file__, "--make", str(work / "sat"), "--layers", str(a.layers),
                            "--hidden", str(a.hidden), "--heads", str(a.heads), "--vocab", str(a.vocab),
                            "--tp", str(a.tp)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"making the checkpoint failed:\n{r.stderr[-3000:]}")
        facts = json.loads(r.stdout.strip().splitlines()[-1])
        gib = 2**30
        print(f"synthetic SAT checkpoint: {facts['tensors']} tensors, {facts['bytes'] / gib:.2f} GiB at TP={a.tp}, "
              f"largest tensor {facts['largest_name']} {facts['largest'] / gib:.3f} GiB "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        runs = [("streaming", "SAT TP=%d -> glmctl TP=4" % a.tp, work / "sat", work / "glm4", 4, "glmctl"),
                ("streaming", "glmctl TP=4 -> SAT TP=1", work / "glm4", work / "sat1", 1, "sat"),
                ("streaming", "SAT TP=%d -> glmctl TP=1" % a.tp, work / "sat", work / "glm1", 1, "glmctl")]
        if not a.skip_naive:
            runs.append(("naive", "SAT TP=%d -> SAT TP=4 (whole shards)" % a.tp, work / "sat", work / "naive4", 4,
                         "sat"))
        rows = []
        for mode, what, src, out, tp, to in runs:
            r = child(mode, src, out, a.heads, tp, to)
            extra = r["peak"] - r["baseline"]
            rows.append((mode, what, r, extra))
            print(f"{mode:9s} {what:38s} peak RSS {r['peak'] / gib:6.2f} GiB (after imports {r['baseline'] / gib:.2f}); "
                  f"above imports {extra / gib:6.3f} GiB = {extra / facts['largest']:5.2f} x largest tensor = "
                  f"{extra / facts['bytes']:5.3f} x checkpoint; {r['seconds']:6.1f} s")
        if not a.skip_naive:
            s, n = rows[0], rows[-1]
            print(f"naive / streaming (same source, same run): memory above imports {n[3] / s[3]:.1f}x, "
                  f"time {n[2]['seconds'] / s[2]['seconds']:.2f}x")
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
