"""Multiple-choice scoring: GLM-130B's packed forward vs one forward per choice.

Same model, same examples, same batch size. Packed: one sequence per example, context once and
every choice as its own block (docs/glm130b.md §4.4). Per choice: one sequence per choice, context repeated
(how lm-eval scores a multiple-choice question). Prints examples/s for both, the speed-up, and
how far the scores differ (they are the same numbers computed two ways).

    .venv/bin/python bench/evaluate.py                      # medium preset, 4 choices, CPU
    .venv/bin/python bench/evaluate.py --preset tiny --examples 64 --context 256
"""
from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds scripts named like stdlib modules (tokenize.py): keep it off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from glmctl.config import get_preset  # noqa: E402
from glmctl.evaluation.scoring import multiple_choice_request, score_requests  # noqa: E402
from glmctl.model import GLM  # noqa: E402


def make_examples(n: int, vocab: int, context: int, choices: int, choice_len: tuple[int, int], seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = [rng.randrange(10, vocab) for _ in range(rng.randint(context // 2, context))]
        ch = [[rng.randrange(10, vocab) for _ in range(rng.randint(*choice_len))] for _ in range(choices)]
        out.append((ctx, ch))
    return out


def packed(model, examples, ids, batch_size):
    reqs, index = [], []
    for ctx, ch in examples:
        r, idx = multiple_choice_request(ctx, ch, ids, use_task_mask=False)
        reqs.append(r)
        index.append(idx)
    res = score_requests(model, reqs, batch_size)
    return [[sum(r[i][0] for i in span) for span in idx] for r, idx in zip(res, index)]


def per_choice(model, examples, ids, batch_size):
    reqs, owner = [], []
    for e, (ctx, ch) in enumerate(examples):
        for c in ch:
            reqs.append(multiple_choice_request(ctx, [c], ids, use_task_mask=False, single_token=False)[0])
            owner.append(e)
    res = score_requests(model, reqs, batch_size)
    out = [[] for _ in examples]
    for e, r in zip(owner, res):
        out[e].append(sum(lp for lp, _ in r))
    return out


def timed_pair(a, b, args, repeats: int):
    """Best time of each of two functions, run alternately so that a change in machine load
    (shared CPUs) hits both alike."""
    best, out = [float("inf"), float("inf")], [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            out[i] = fn(*args)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--context", type=int, default=160, help="longest context in tokens (shortest: half)")
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--choice-len", type=int, nargs=2, default=(2, 8), metavar=("MIN", "MAX"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    model = GLM(cfg).init_weights(seed=0).to(dtype).eval()
    ids = cfg.special_token_ids()
    examples = make_examples(args.examples, cfg.vocab_size - 64, args.context, args.choices,
                             tuple(args.choice_len), seed=1)
    with torch.no_grad():
        packed(model, examples[:2], ids, args.batch_size)  # warm-up
        (t_unp, t_pk), (s_unp, s_pk) = timed_pair(per_choice, packed, (model, examples, ids, args.batch_size),
                                                  args.repeats)
    diff = max(abs(a - b) for x, y in zip(s_pk, s_unp) for a, b in zip(x, y))
    same_pred = sum(max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__)
                    for x, y in zip(s_pk, s_unp))
    tok_pk = sum(len(multiple_choice_request(c, ch, ids, False)[0].tokens) for c, ch in examples)
    tok_unp = sum(len(c) + 1 + len(x) for c, ch in examples for x in ch)
    print(f"preset {args.preset} ({cfg.num_parameters() / 1e6:.1f}M params, {args.dtype}), {args.examples} examples, "
          f"{args.choices} choices, context {args.context // 2}-{args.context} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'method':<22}{'examples/s':>12}{'tokens':>10}")
    print(f"{'one forward per choice':<22}{args.examples / t_unp:>12.2f}{tok_unp:>10}")
    print(f"{'packed (GLM-130B)':<22}{args.examples / t_pk:>12.2f}{tok_pk:>10}")
    print(f"speed-up packed / per-choice: {t_unp / t_pk:.2f}x (target >= 2.5x)")
    print(f"scores: max |packed - per-choice| = {diff:.2e} nats; same prediction on {same_pred}/{len(examples)}")


if __name__ == "__main__":
    main()
