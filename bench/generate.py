"""Generation speed on CPU, as ratios against baselines measured in the same run.

    .venv/bin/python bench/generate.py                  # full: medium + glm-110m, 128 new tokens
    .venv/bin/python bench/generate.py --quick          # medium only, 32 new tokens

1. KV cache vs recomputing the whole sequence every step (``medium``, greedy, batch 1; target >= 5x)
2. batch 8 vs batch 1 throughput (``medium``, prompts of different lengths, KV cache)
3. INT4 (glmctl.kernels, per-row RTN scales) vs fp32 decode, for ``medium`` and ``glm-110m``

Random weights (``init_weights``); no end tokens, so every run generates exactly N tokens.
One CPU thread by default (``--threads``), so other processes on the machine disturb the ratios
as little as possible.
"""
from __future__ import annotations

import os
import sys

# `python bench/generate.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow
# the standard library's tokenize module (torch imports it)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from glmctl.config import get_preset  # noqa: E402
from glmctl.generation import DecodeRequest, GenerationConfig, decode_batch, span_request  # noqa: E402
from glmctl.model import GLM  # noqa: E402
from glmctl.model.masks import prefix_lm_mask, prepare_prompt  # noqa: E402


def build(preset: str, bits: int | None = None, seed: int = 0):
    cfg = get_preset(preset).replace(hidden_dropout=0.0, attention_dropout=0.0)
    fp = GLM(cfg).init_weights(seed).eval()
    if bits is None:
        return fp
    from glmctl.kernels import quantize_rtn
    q = GLM(cfg.replace(quantization={"bits": bits, "group_size": None, "method": "rtn"}))
    sd = {}
    for k, v in fp.state_dict().items():
        if k.endswith(".weight") and ("dense" in k or "query_key_value" in k):
            qw, s = quantize_rtn(v, bits)
            sd[k], sd[k + "_scale"] = qw, s
        else:
            sd[k] = v
    q.load_state_dict(sd)
    return q.eval()


def prompt(cfg, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, cfg.mask_token_id - 1, (n,), generator=g).tolist()
    return prepare_prompt(ids, cfg.special_token_ids())


def request(cfg, n: int, seed: int) -> DecodeRequest:
    ids = cfg.special_token_ids()
    return span_request(prompt(cfg, n, seed), ids["[gMASK]"], ids)


def timed(fn, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def cached(model, reqs, new_tokens):
    gen = GenerationConfig(max_new_tokens=new_tokens, end_token_ids=())
    ids = model.config.special_token_ids()
    return decode_batch(model, reqs, gen, ids)


def recompute(model, req: DecodeRequest, new_tokens):
    """The baseline: a full forward over the whole sequence for every new token."""
    gen = []
    with torch.inference_mode():
        for _ in range(new_tokens):
            seq = req.tokens + gen
            pos = req.positions + [req.next_position(k) for k in range(1, len(gen) + 1)]
            logits = model(torch.tensor([seq]), torch.tensor([pos]), prefix_lm_mask(len(seq), req.prefix_len))
            gen.append(int(logits[0, -1].float().argmax()))
    return gen


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="medium preset only, 32 new tokens")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per prompt (default 128)")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch (and kernel) CPU threads; 0 = torch's default. Default 1: on a shared "
                         "machine, OpenMP threads waiting on each other dominate multi-threaded timings")
    ap.add_argument("--presets", default=None, help="comma-separated presets for the INT4 comparison")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON document")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    n_new = a.new_tokens or (32 if a.quick else 128)
    presets = (a.presets or ("medium" if a.quick else "medium,glm-110m")).split(",")
    from glmctl import kernels
    kstatus = kernels.status() if hasattr(kernels, "status") else {}
    print(f"bench/generate: {n_new} new tokens after a {a.context}-token prompt, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU kernel: "
          f"{json.dumps(kstatus.get('cpu', kstatus)) if kstatus else 'n/a'}", file=sys.stderr)
    results = {"new_tokens": n_new, "context": a.context, "threads": torch.get_num_threads()}
    rows = []
    header = f"{'comparison':44}  {'tok/s':>9}  {'baseline':>9}  {'ratio':>6}  note"

    def row(name, x, base, ratio, note):  # printed as soon as measured (the full run takes minutes)
        rows.append((name, x, base, ratio, note))
        if not a.json:
            if len(rows) == 1:
                print(header, flush=True)
            print(f"{name:44}  {x:9.1f}  {base:9.1f}  {ratio:5.2f}x  {note}", flush=True)

    # 1. KV cache vs recompute --------------------------------------------------------------
    model = build("medium")
    req = request(model.config, a.context, 1)
    cached(model, [req], 4)  # warm-up
    t_cache, hyp = timed(lambda: cached(model, [req], n_new), repeat=2)
    t_full, toks = timed(lambda: recompute(model, req, n_new))
    same = hyp[0][0].tokens == toks
    r1 = t_full / t_cache
    row("KV cache vs full recompute (medium, batch 1)", n_new / t_cache, n_new / t_full, r1,
        "same tokens" if same else "TOKENS DIFFER")
    results["kv_cache"] = {"cache_tok_s": n_new / t_cache, "recompute_tok_s": n_new / t_full, "ratio": r1,
                           "same_tokens": same}

    # 2. batch 8 vs batch 1 ------------------------------------------------------------------
    reqs = [request(model.config, a.context - 8 + 2 * i, 10 + i) for i in range(8)]
    t_b1, _ = timed(lambda: [cached(model, [r], n_new) for r in reqs[:2]])
    t_b8, _ = timed(lambda: cached(model, reqs, n_new))
    tps1, tps8 = 2 * n_new / t_b1, 8 * n_new / t_b8
    row("batch 8 vs batch 1 throughput (medium)", tps8, tps1, tps8 / tps1, "tokens/s, all prompts")
    results["batch"] = {"batch8_tok_s": tps8, "batch1_tok_s": tps1, "ratio": tps8 / tps1}
    del model

    # 3. INT4 vs fp32 --------------------------------------------------------------------------
    results["int4"] = {}
    for preset in presets:
        fp = build(preset)
        req = request(fp.config, a.context, 2)
        cached(fp, [req], 2)
        t_fp, _ = timed(lambda: cached(fp, [req], n_new))
        del fp
        q = build(preset, bits=4)
        cached(q, [req], 2)
        t_q, _ = timed(lambda: cached(q, [req], n_new))
        del q
        row(f"INT4 vs fp32 decode ({preset}, batch 1)", n_new / t_q, n_new / t_fp, t_fp / t_q, "tokens/s")
        results["int4"][preset] = {"int4_tok_s": n_new / t_q, "fp32_tok_s": n_new / t_fp, "ratio": t_fp / t_q}

    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("GLMCTL_PROGRESS_INTERVAL", "1000")
    main()
