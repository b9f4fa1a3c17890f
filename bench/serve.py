"""`glmctl serve` under load on loopback, as ratios against baselines measured in the same run.

    .venv/bin/python bench/serve.py                 # T = 30 s per load level
    .venv/bin/python bench/serve.py --seconds 10    # quicker

1. one request: HTTP (`glmctl serve`, non-streamed) vs in-process `Filler.fill` (what
   `glmctl generate` runs), same prompt and length, interleaved, best of 15 each; target:
   overhead <= 10 %
2. C concurrent streaming clients for T seconds, C = 1 and 8 alternating in --rounds rounds of
   T/rounds seconds (default 3), each client on one kept-alive connection, mixed prompt lengths (8/32/96
   tokens, --prompt-tokens; each prompt is the longest run of random words that encodes to at
   most that many tokens) and output lengths (16/32/64 tokens): throughput (generated tokens/s), p50/p99 time to
   first token (the first SSE chunk) and per-token latency ((last chunk - first chunk) / (tokens - 1)),
   errors (must be 0); target: 8 clients >= 3x the throughput of one at a time

The model is the `medium` preset (6 x 384) with random weights and the 512-id test tokenizer of
tests/test_generate.py (so its vocabulary is 512 rows, not 8192: every generated id decodes to
text). min_tokens = max_tokens, so every request generates exactly its length. The server and the
in-process baseline run with the same number of threads (--threads, default 1). The load is
bounded: no request starts after T seconds, and the clients wait for the ones running.
"""
from __future__ import annotations

import os
import sys

# `python bench/serve.py` puts bench/ first on sys.path, where bench/tokenize.py would shadow the
# standard library's tokenize module (torch imports it)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))  # the tests' tiny tokenizer

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402

from glmctl.blanks import Filler  # noqa: E402
from glmctl.checkpoint import save_model  # noqa: E402
from glmctl.config import get_preset  # noqa: E402
from glmctl.generation import GenerationConfig  # noqa: E402
from glmctl.model import GLM  # noqa: E402
from glmctl.session import open_model  # noqa: E402
from test_generate import TEXT, make_tokenizer  # noqa: E402

WORDS = " ".join(TEXT[:6]).split()


def prompt_text(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def prompt_pool(tok, n_tokens: int, rng: random.Random, size: int = 32) -> list[str]:
    """``size`` prompts of at most ``n_tokens`` tokens each (as many random words as fit)."""
    pool = []
    for _ in range(size):
        words: list[str] = []
        while True:
            nxt = words + [rng.choice(WORDS)]
            if len(tok.encode(" ".join(nxt))) > n_tokens:
                break
            words = nxt
        pool.append(" ".join(words or [rng.choice(WORDS)]))
    return pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def one_stream(client: httpx.Client, url: str, prompt: str, n: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    body = {"model": "bench", "prompt": prompt, "max_tokens": n, "min_tokens": n, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}"}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if line == "data: [DONE]":
                break
            # a text chunk is only timed: the load generator shares the machine's 2 cores with the
            # server, so it parses just the chunks that say something (usage, an error)
            if '"usage"' in line or '"error"' in line:
                msg = json.loads(line[6:])
                if "error" in msg:
                    return {"error": msg["error"]["message"]}
                if msg.get("usage"):
                    tokens = msg["usage"]["completion_tokens"]
                    continue
            if first is None:
                first = now
            last = now
    if tokens != n or first is None:
        return {"error": f"expected {n} tokens, got {tokens}"}
    return {"ttft": first - t0, "tpot": (last - first) / max(1, n - 1), "tokens": tokens, "end": time.perf_counter()}


def load(url: str, clients: int, seconds: float, seed: int, pools: dict[int, list[str]]) -> tuple[list[dict], float]:
    """``clients`` streaming clients for ``seconds``: every request's result, and the time until the
    last one ended."""
    results: list[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + seconds

    def client(k: int):
        rng = random.Random(seed * 100 + k)
        with httpx.Client() as http:  # one connection per client, kept alive, as API clients do
            while time.perf_counter() < stop_at:
                r = one_stream(http, url, rng.choice(pools[rng.choice(sorted(pools))]), rng.choice((16, 32, 64)))
                with lock:
                    results.append(r)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ends = [r["end"] for r in results if "error" not in r]
    return results, (max(ends) - start if ends else float("nan"))


def summary(clients: int, runs: list[tuple[list[dict], float]]) -> dict:
    """One load level over its rounds: tokens over the summed time, latency percentiles over all requests."""
    results = [r for res, _ in runs for r in res]
    ok = [r for r in results if "error" not in r]
    elapsed = sum(e for _, e in runs)
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "tokens": tokens, "seconds": round(elapsed, 2), "tokens_per_s": round(tokens / elapsed, 1),
            "ttft_p50_ms": round(1000 * pct([r["ttft"] for r in ok], 50), 1),
            "ttft_p99_ms": round(1000 * pct([r["ttft"] for r in ok], 99), 1),
            "tpot_p50_ms": round(1000 * pct([r["tpot"] for r in ok], 50), 2),
            "tpot_p99_ms": round(1000 * pct([r["tpot"] for r in ok], 99), 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="T: seconds of load per level")
    ap.add_argument("--rounds", type=int, default=3,
                    help="the levels alternate in this many rounds of T/rounds seconds (slow drifts of the "
                         "machine's speed then weigh on both alike)")
    ap.add_argument("--single-repeats", type=int, default=15, help="repeats of the single-request comparison")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the baseline")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens of the single-request comparison")
    ap.add_argument("--prompt-tokens", default="8,32,96", help="the load's prompt lengths in tokens (at most)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="glmctl-bench-serve-"))
    tok = make_tokenizer(root / "tok")
    cfg = get_preset("medium").replace(**tok.config_overrides(), hidden_dropout=0.0, attention_dropout=0.0)
    save_model(GLM(cfg).init_weights(0), root / "bench", tokenizer=root / "tok")
    prompt = prompt_text(24, random.Random(1))
    pools = {n: prompt_pool(tok, n, random.Random(n)) for n in map(int, args.prompt_tokens.split(","))}
    n = args.new_tokens

    # 1. in-process: what `glmctl generate` runs for one prompt
    session = open_model(root / "bench", device="cpu")
    filler = Filler(session, GenerationConfig(max_new_tokens=n, min_new_tokens=n))
    toks = filler.encode(prompt, "bench")
    filler.fill([toks], keys=[0])  # warm-up

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    exe = Path(sys.executable).parent / "glmctl"
    proc = subprocess.Popen([str(exe), "serve", str(root / "bench"), "--port", str(port), "--max-batch-size", "8",
                             "--max-queue", "64", "--max-new-tokens-limit", "256"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {proc.stderr.read()}")
            time.sleep(0.2)
        body = {"model": "bench", "prompt": prompt, "max_tokens": n, "min_tokens": n}
        http = httpx.Client()  # kept alive (a new httpx client costs the caller ~20 ms: its SSL context)
        http.post(url + "/v1/completions", json=body, timeout=300)  # warm-up
        # interleaved, best of N each: the machine's other load disturbs both alike
        inproc_runs, http_runs = [], []
        for _ in range(args.single_repeats):
            inproc_runs.append(_timed(lambda: filler.fill([toks], keys=[0])))
            http_runs.append(_timed(lambda: http.post(url + "/v1/completions", json=body, timeout=300)))
        http.close()
        inproc, http = min(inproc_runs), min(http_runs)
        del session, filler
        runs: dict[int, list] = {1: [], 8: []}
        for r in range(args.rounds):  # 1, 8, 1, 8, ...: each level gets T seconds in all
            for c in runs:
                runs[c].append(load(url, c, args.seconds / args.rounds, seed=100 * r + c, pools=pools))
        levels = [summary(c, runs[c]) for c in runs]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    one, eight = levels
    report = {
        "preset": "medium (random weights, 512-id vocabulary)", "threads": args.threads,
        "prompt_tokens": {n: sorted({len(tok.encode(p)) for p in pool}) for n, pool in pools.items()},
        "single_request": {"new_tokens": n, "in_process_s": round(inproc, 4), "http_s": round(http, 4),
                           "overhead": round(http / inproc - 1, 4)},
        "load": levels, "throughput_ratio_8_vs_1": round(eight["tokens_per_s"] / one["tokens_per_s"], 2),
        "server_exit_code": rc}
    print(json.dumps(report, indent=2))
    print(f"\n8 clients vs 1: {report['throughput_ratio_8_vs_1']}x throughput (target >= 3x); "
          f"server overhead for one request: {100 * report['single_request']['overhead']:+.1f}% (target <= 10%); "
          f"errors: {one['errors'] + eight['errors']}")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
