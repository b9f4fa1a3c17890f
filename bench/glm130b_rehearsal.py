"""GLM-130B's workflow at its real widths on one CPU machine: the memory story, measured.

A synthetic SAT checkpoint in SAT's own layout at TP=8 as released, with GLM-130B's exact shapes
(hidden 12,288, 96 heads, GeGLU inner 32,768, vocab 150,528, its special-token ids) and 2 layers
instead of 70 (~5.5B parameters, ~11 GB fp16; random weights at the scale of GLM-130B's init,
docs/glm130b.md §2.7), then the README's 130B workflow command by command:

  build       write the SAT checkpoint (tensor by tensor, glmctl.formats.sat.ShardWriter)
  convert     glmctl convert SAT TP8 -> glmctl TP4 --verify   (the SAT copy is deleted afterwards)
  quantize    glmctl quantize --bits 4 --no-report             (streaming RTN, TP4 -> TP4)
  gptq-layer  GPTQ of block 0 alone (glmctl.quantization.GPTQ, TP=1, random calibration windows)
  convert-q   glmctl convert of the INT4 model to SAT TP4 --verify
  generate    torchrun --nproc_per_node 4 (gloo, CPU): load the INT4 TP4 model per rank, greedy
              decoding with the KV cache, and a small evaluation (LM loss of two windows)

Every step runs in its own process(es); each records its wall time and VmHWM (peak RSS) per
process in STATS (json lines). The summary sets these beside ``glmctl.planning.plan`` for the
same 2-layer config (bytes per rank) and extrapolates to 70 layers from the per-layer numbers.

    nice .venv/bin/python bench/glm130b_rehearsal.py --dir /work/rehearsal       # all steps
    .venv/bin/python bench/glm130b_rehearsal.py --dir /work/rehearsal --summary  # table only
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds a tokenize.py that would shadow the standard library's `tokenize` (torch needs it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import atexit  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GLMCTL = [sys.executable, "-m", "glmctl"]
STEPS = ("build", "convert", "quantize", "gptq-layer", "convert-q", "generate")
GiB = 2**30


def vm(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def record_at_exit(step: str) -> None:
    """Append {step, rank, seconds, peak_rss} to $REHEARSAL_STATS when this process ends."""
    t0 = time.perf_counter()
    rank = int(os.environ.get("RANK", "0"))

    def dump():
        with open(os.environ["REHEARSAL_STATS"], "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "seconds": time.perf_counter() - t0,
                                "peak_rss": vm("VmHWM"), **EXTRA}) + "\n")
    atexit.register(dump)


EXTRA: dict = {}


# ---- the synthetic checkpoint ---------------------------------------------------------------------
def glm130b_cfg(layers: int):
    """GLM-130B's config with ``layers`` layers ($REHEARSAL_SHAPE="hidden,heads,inner" shrinks it
    for a smoke run of this script)."""
    from glmctl.config import get_preset
    cfg = get_preset("glm-130b").replace(num_layers=layers)
    if os.environ.get("REHEARSAL_SHAPE"):
        h, n, f = map(int, os.environ["REHEARSAL_SHAPE"].split(","))
        cfg = cfg.replace(hidden_size=h, num_attention_heads=n, inner_hidden_size=f)
    return cfg


def build(root: Path, layers: int, tp: int = 8) -> None:
    import torch
    from glmctl.formats import sat
    from glmctl.formats.shapes import split_shape
    from glmctl.model import GLM
    cfg = glm130b_cfg(layers)
    d, f = cfg.hidden_size, cfg.inner_hidden_size
    gain = (2 * 70) ** -0.5  # GLM-130B's 70 layers set the DeepNorm init scale
    xav = lambda fi, fo: gain * math.sqrt(2.0 / (fi + fo))  # noqa: E731
    std = {"query_key_value.weight": math.sqrt(1.0 / (3 * d)), "attention.dense.weight": xav(d, d),
           "dense_h_to_4h.weight": xav(d, f), "dense_4h_to_h.weight": xav(f, d), "word_embeddings.weight": 1.0 / d}
    shapes = {k: tuple(v.shape) for k, v in GLM(cfg, device="meta").state_dict().items()}
    names = []
    for k in shapes:
        names.append(k)
        if k.endswith("mlp.dense_4h_to_h.bias"):
            names.append(k.replace("mlp.dense_4h_to_h.bias", "attention.rotary_emb.inv_freq"))
    shapes.update({n: (cfg.head_dim // 2,) for n in names if n.endswith("inv_freq")})
    it = "49300"
    (root / it).mkdir(parents=True)
    local = {k: split_shape(k, shapes[k], tp) for k in names}
    inv = (1.0 / (10000 ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))).half()
    g = torch.Generator().manual_seed(0)
    for r in range(tp):  # one rank file at a time
        w = sat.ShardWriter(root / it / sat.shard_name(r), [(k, local[k], torch.float16) for k in names])
        for k in names:
            if k.endswith("inv_freq"):
                t = inv
            elif k.endswith("layernorm.weight"):
                t = torch.ones(local[k], dtype=torch.float16)
            elif k.endswith(".bias") or "layernorm" in k:
                t = torch.zeros(local[k], dtype=torch.float16)
            else:
                s = next(v for n, v in std.items() if k.endswith(n))
                t = torch.randn(local[k], generator=g).mul_(s).half()
            w.write(k, t)
            del t
        w.close()
    sat.write_latest(root, it)


# ---- GPTQ of one block, and the TP=4 run ------------------------------------------------------------
def gptq_layer(model_dir: Path, spill: Path, windows: int, seq: int) -> None:
    import torch
    from glmctl.checkpoint import CheckpointReader
    from glmctl.quantization import GPTQ, OutputLayout, Variant, Windows, write_quantized
    from glmctl.model.masks import lm_window
    reader = CheckpointReader(model_dir)
    cfg = reader.cfg
    group = math.gcd(cfg.hidden_size // 4, cfg.inner_hidden_size // 4, 1024)
    v = Variant(4, "gptq", group)
    out = OutputLayout(cfg, v, 1, torch.float16, torch.float16, group)
    g = torch.Generator().manual_seed(1)
    rows = [lm_window(torch.randint(0, 150000, (seq - 1,), generator=g).tolist()[:seq // 4],
                      torch.randint(0, 150000, (seq - 1,), generator=g).tolist()[seq // 4:seq - 1],
                      cfg.gmask_token_id, cfg.sop_token_id) for _ in range(windows)]
    calib = Windows(torch.tensor([r[0] for r in rows]), torch.tensor(rows[0][1]), rows[0][2],
                    torch.tensor(rows[0][3]), torch.tensor([r[4] for r in rows]), "random")
    written = {"bytes": 0}

    def sink(rank, name, t):
        written["bytes"] += t.numel() * t.element_size()
    qz = GPTQ(reader, out, calib, batch_size=windows, dtype=torch.float32, device="cpu", block_size=128, damp=0.01,
              act_order=True, budget=GiB, spill_dir=spill)
    write_quantized(reader, out, qz, sink, layers={0})
    qz.close()
    EXTRA.update(block_bytes_written=written["bytes"], calibration_windows=windows, seq_len=seq,
                 activation_bytes=windows * seq * cfg.hidden_size * 4)


def generate_worker(model_dir: Path) -> None:
    import torch
    from glmctl import runtime
    from glmctl.checkpoint import LOAD_STATS, load_model
    from glmctl.model import masks
    rt = runtime.start(device="cpu")
    try:
        model = load_model(model_dir)
        EXTRA.update(load_seconds=LOAD_STATS["seconds"], load_bytes_read=LOAD_STATS["bytes_read"],
                     load_peak_rss=LOAD_STATS["peak_rss_bytes"])
        cfg = model.config
        ids = cfg.special_token_ids()
        g = torch.Generator().manual_seed(3)
        context = torch.randint(0, 150000, (32,), generator=g).tolist() + [ids["[gMASK]"]]
        tokens, positions, prefix_len, _, gen_position = masks.generation_input(context, ids)
        t0 = time.perf_counter()
        with torch.no_grad():
            cache = model.new_kv_cache()
            tok = torch.tensor([tokens])
            logits = model(tok, torch.tensor([positions]), masks.prefix_lm_mask(len(tokens), prefix_len), cache)
            out = []
            for k in range(1, 9):
                nxt = int(logits[0, -1].argmax())
                out.append(nxt)
                t = cache.length + 1
                logits = model(torch.tensor([[nxt]]), torch.tensor([[gen_position(k)]]),
                               torch.zeros(1, 1, 1, t, dtype=torch.bool), cache)
            EXTRA.update(generate_seconds=time.perf_counter() - t0, new_tokens=len(out),
                         kv_cache_bytes=sum(k.numel() * k.element_size() * 2 for k in cache.keys))
            # a small evaluation: LM loss of two windows of 128 tokens (lm_window layout)
            t0 = time.perf_counter()
            nll = n = 0.0
            for w in range(2):
                seg = torch.randint(0, 150000, (127,), generator=g).tolist()
                toks, pos, mask, tpos, targets = masks.lm_window(seg[:32], seg[32:], ids["[gMASK]"], ids["sop"])
                lg = model(torch.tensor([toks]), torch.tensor([pos]), mask)[0, torch.tensor(tpos)].float()
                nll += float(torch.nn.functional.cross_entropy(lg, torch.tensor(targets), reduction="sum"))
                n += len(targets)
            EXTRA.update(evaluate_seconds=time.perf_counter() - t0, eval_tokens=int(n), eval_nll=nll / n)
    finally:
        runtime.stop(rt)


# ---- the driver ------------------------------------------------------------------------------------
def run_step(a, step: str, cmd: list[str], env_extra=None) -> None:
    env = dict(os.environ, REHEARSAL_STATS=str(a.dir / "stats.jsonl"), PYTHONPATH=str(REPO),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.update(env_extra or {})
    print(f"[rehearsal] {step}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(a.dir / f"{step}.log", "w") as log:
        r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"[rehearsal] {step}: exit {r.returncode} after {time.perf_counter() - t0:.0f}s", flush=True)
    if r.returncode:
        sys.exit(f"step {step} failed; see {a.dir / (step + '.log')}")


def self_cmd(*args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *map(str, args)]


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=REPO / ".rehearsal-130b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    ap.add_argument("--gptq-windows", type=int, default=4)
    ap.add_argument("--gptq-seq", type=int, default=128)
    ap.add_argument("--summary", action="store_true", help="only print the table from STATS")
    if sys.argv[1:2] == ["--child"]:  # one step, in this process: --child STEP ARGS...
        step, rest = sys.argv[2], sys.argv[3:]
        record_at_exit(step)
        if step == "build":
            build(Path(rest[0]), int(rest[1]))
        elif step == "gptq-layer":
            gptq_layer(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))
        elif step == "generate":
            generate_worker(Path(rest[0]))
        else:  # a glmctl command, in this process
            from glmctl.cli import main as glmctl_main
            glmctl_main(rest)
        return
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    d = a.dir
    steps = a.steps.split(",")
    if not a.summary:
        if "build" in steps:
            shutil.rmtree(d / "sat", ignore_errors=True)
            run_step(a, "build", self_cmd("--child", "build", d / "sat", a.layers))
            (d / "sizes.json").write_text(json.dumps({"sat": dir_bytes(d / "sat")}))
        sizes = json.loads((d / "sizes.json").read_text()) if (d / "sizes.json").exists() else {}
        if "convert" in steps:
            shutil.rmtree(d / "tp4", ignore_errors=True)
            run_step(a, "convert", self_cmd("--child", "convert", "convert", d / "sat", d / "tp4", "--tp", "4",
                                            "--verify"))
            sizes["tp4"] = dir_bytes(d / "tp4")
            shutil.rmtree(d / "sat", ignore_errors=True)  # keep the disk under 40 GB
        if "quantize" in steps:
            shutil.rmtree(d / "int4", ignore_errors=True)
            run_step(a, "quantize", self_cmd("--child", "quantize", "quantize", d / "tp4", d / "int4", "--bits", "4",
                                             "--no-report"))
            sizes["int4"] = dir_bytes(d / "int4")
            sizes["int4_rank0"] = dir_bytes(d / "int4") and (d / "int4" / "model-tp00-of-04.safetensors").stat().st_size
            sizes["tp4_rank0"] = (d / "tp4" / "model-tp00-of-04.safetensors").stat().st_size
        if "gptq-layer" in steps:
            run_step(a, "gptq-layer", self_cmd("--child", "gptq-layer", d / "tp4", d / "spill", a.gptq_windows,
                                               a.gptq_seq))
            shutil.rmtree(d / "spill", ignore_errors=True)
        if "convert-q" in steps:
            shutil.rmtree(d / "int4-sat", ignore_errors=True)
            run_step(a, "convert-q", self_cmd("--child", "convert-q", "convert", d / "int4", d / "int4-sat", "--to",
                                              "sat", "--verify"))
            sizes["int4-sat"] = dir_bytes(d / "int4-sat")
            shutil.rmtree(d / "int4-sat", ignore_errors=True)
        if "generate" in steps:
            run_step(a, "generate", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                                     "--master_port", "29533", str(Path(__file__).resolve()), "--child", "generate",
                                     str(d / "int4")], {"OMP_NUM_THREADS": "1"})
        (d / "sizes.json").write_text(json.dumps(sizes))
    summary(a)


def summary(a) -> None:
    from glmctl.planning import plan
    d = a.dir
    stats = [json.loads(line) for line in (d / "stats.jsonl").read_text().splitlines()] \
        if (d / "stats.jsonl").exists() else []
    sizes = json.loads((d / "sizes.json").read_text()) if (d / "sizes.json").exists() else {}
    cfg = glm130b_cfg(a.layers)
    p16, p4 = plan(cfg, bits=None, tp=4), plan(cfg, bits=4, tp=4)
    last = {}
    for s in stats:
        last[(s["step"], s["rank"])] = s
    print(f"| step | wall (s) | peak RSS per process (GiB) | plan, 2 layers | measured |")
    print("|---|---|---|---|---|")
    for step in STEPS:
        rows = [v for (st, _), v in sorted(last.items()) if st == step]
        if not rows:
            print(f"| {step} | not run | | | |")
            continue
        rss = ", ".join(f"{r['peak_rss'] / GiB:.2f}" for r in rows)
        secs = max(r["seconds"] for r in rows)
        planned = measured = ""
        if step == "convert" and "tp4_rank0" in sizes:
            planned = f"{p16['per_gpu']['weights'] / GiB:.3f} GiB fp16 per rank"
            measured = f"{sizes['tp4_rank0'] / GiB:.3f} GiB (rank 0 file)"
        if step == "quantize" and "int4_rank0" in sizes:
            planned = f"{p4['per_gpu']['weights'] / GiB:.3f} GiB INT4 per rank"
            measured = f"{sizes['int4_rank0'] / GiB:.3f} GiB (rank 0 file)"
        if step == "generate":
            planned = f"{(p4['per_gpu']['weights']) / GiB:.3f} GiB weights per rank"
            measured = f"{rows[0].get('load_bytes_read', 0) / GiB:.3f} GiB read by rank 0"
        print(f"| {step} | {secs:.0f} | {rss} | {planned} | {measured} |")
    print()
    print(json.dumps({"sizes": sizes, "stats": list(last.values())}, indent=1))


if __name__ == "__main__":
    main()
