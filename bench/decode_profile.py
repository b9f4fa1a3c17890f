"""Where a decode step spends its time, at 1 and 2 CPU threads (issue 20: why a second thread helps little).

    .venv/bin/python bench/decode_profile.py                      # glm-110m fp32, batch 1
    .venv/bin/python bench/decode_profile.py --preset medium --batch 8

1. greedy decode tok/s at each thread count, alternating, medians (``--rounds``);
2. the output projection alone (``kernels.dense_linear``, vocab x hidden fp32) and one layer's
   four linears alone, at each thread count, with the GB/s of weights they stream;
3. torch.profiler over a decode at each thread count: the top ops by self CPU time and their
   share of the wall time; what the ops do not cover is Python and dispatch overhead.

Random weights (``init_weights``), no end tokens. Timings on a shared machine are void as
absolute numbers; compare the thread counts within one run.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]  # bench/tokenize.py shadowing

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from glmctl import kernels  # noqa: E402
from glmctl.config import get_preset  # noqa: E402
from glmctl.generation import GenerationConfig, decode_batch, span_request  # noqa: E402
from glmctl.model import GLM  # noqa: E402
from glmctl.model.masks import prepare_prompt  # noqa: E402


def build(preset: str) -> GLM:
    cfg = get_preset(preset).replace(hidden_dropout=0.0, attention_dropout=0.0)
    return GLM(cfg).init_weights(0).eval()


def requests(cfg, batch: int, context: int):
    ids = cfg.special_token_ids()
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batch):
        toks = torch.randint(10, cfg.mask_token_id - 1, (context,), generator=g).tolist()
        out.append(span_request(prepare_prompt(toks, ids), ids["[gMASK]"], ids))
    return out


def decode_seconds(model, reqs, n_new: int) -> float:
    gen = GenerationConfig(max_new_tokens=n_new, end_token_ids=())
    ids = model.config.special_token_ids()
    t = time.perf_counter()
    decode_batch(model, reqs, gen, ids)
    return time.perf_counter() - t


def op_seconds(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="glm-110m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    model = build(a.preset)
    cfg = model.config
    reqs = requests(cfg, a.batch, a.context)
    print(f"{a.preset} fp32, batch {a.batch}, {a.context}-token prompt, {a.new_tokens} new tokens; "
          f"CPU kernel: {kernels.status()['cpu']['implementation']}; {os.cpu_count()} CPUs")
    with torch.inference_mode():
        decode_seconds(model, reqs, 4)  # warm-up (attention choice measured, caches)
        runs = {t: [] for t in threads}
        for _ in range(a.rounds):
            for t in threads:
                torch.set_num_threads(t)
                runs[t].append(a.batch * a.new_tokens / decode_seconds(model, reqs, a.new_tokens))
        for t in threads:
            print(f"decode, {t} thread(s): {statistics.median(runs[t]):.2f} tok/s (median of {a.rounds})")
        if len(threads) > 1:
            print(f"  {threads[-1]} vs {threads[0]} threads: "
                  f"{statistics.median(runs[threads[-1]]) / statistics.median(runs[threads[0]]):.2f}x")

        x = torch.randn(a.batch, cfg.hidden_size)
        emb = model.transformer.word_embeddings.weight
        layer = model.transformer.layers[0]
        lins = [layer.attention.query_key_value, layer.attention.dense, layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h]
        xs = [x, x, x, torch.randn(a.batch, cfg.inner_hidden_size)]
        layer_bytes = sum(m.weight.numel() * 4 for m in lins)
        for t in threads:
            torch.set_num_threads(t)
            s_out = op_seconds(lambda: kernels.dense_linear(x, emb), 10)
            s_mm = op_seconds(lambda: torch.nn.functional.linear(x, emb), 10)
            s_layer = op_seconds(lambda: [m(xi[:, None])for m, xi in zip(lins, xs)], 10)
            print(f"{t} thread(s): output projection {tuple(emb.shape)}: dense_linear {1e3 * s_out:.2f} ms "
                  f"({emb.numel() * 4 / s_out / 1e9:.1f} GB/s), F.linear {1e3 * s_mm:.2f} ms; "
                  f"one layer's linears {1e3 * s_layer:.2f} ms ({layer_bytes / s_layer / 1e9:.1f} GB/s)")

        for t in threads:
            torch.set_num_threads(t)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                wall = decode_seconds(model, reqs, a.new_tokens)
            ev = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in ev) / 1e6
            print(f"\nprofile, {t} thread(s): wall {wall:.3f} s ({a.batch * a.new_tokens / wall:.2f} tok/s under the "
                  f"profiler), op self time {total:.3f} s = {100 * total / wall:.0f}% of wall")
            print(f"{'op':<40} {'calls':>7} {'self ms':>9} {'% wall':>7}")
            for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:a.top]:
                print(f"{e.key[:40]:<40} {e.count:>7} {e.self_cpu_time_total / 1e3:>9.1f} "
                      f"{100 * e.self_cpu_time_total / 1e6 / wall:>6.1f}%")


if __name__ == "__main__":
    main()
