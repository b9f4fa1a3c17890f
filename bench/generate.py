"""Generation speed on CPU, as ratios against baselines measured in the same run.

    .venv/bin/python bench/generate.py                  # full: medium + glm-110m, 128 new tokens
    .venv/bin/python bench/generate.py --quick          # medium only, 32 new tokens

1. KV cache vs recomputing the whole sequence every step (``medium``, greedy, batch 1; target >= 5x)
2. batch 8 vs batch 1 throughput (``medium``, prompts of different lengths, KV cache)
3. INT4 (glmctl.kernels, per-row RTN scales) vs fp32 decode, for ``medium`` and ``glm-110m``
0. peers (first, ``--peers only`` alone): glmctl fp32 / INT4 g128 / INT4 g128 + INT8 output layer
   against transformers' LlamaForCausalLM and llama.cpp (llama_cpp) at equal shapes, for
   ``medium`` and ``glm-110m``, 1 and 2 threads, batch 1 and 8 (llama.cpp: batch 1); each engine
   in its own long-lived process (``--worker``), alternating, medians. llama.cpp is optional:
   skipped with a line when llama_cpp or gguf is missing.

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
from glmctl.kernels import quantize_rtn  # noqa: E402
from glmctl.model import GLM  # noqa: E402
from glmctl.model.glm import quantize_tied_embedding  # noqa: E402
from glmctl.model.masks import prefix_lm_mask, prepare_prompt  # noqa: E402


def build(preset: str, bits: int | None = None, seed: int = 0, group_size: int | None = None,
          embedding_bits: int | None = None):
    """A random ``preset`` GLM; with ``bits`` its linears RTN-quantized (per row, or in groups of
    ``group_size``); with ``embedding_bits`` its tied embedding/output too (INT8 per row, INT4 g128)."""
    cfg = get_preset(preset).replace(hidden_dropout=0.0, attention_dropout=0.0)
    fp = GLM(cfg).init_weights(seed).eval()
    if bits is None and embedding_bits is None:
        return fp
    quant = {"bits": bits, "group_size": group_size, "method": "rtn"} if bits else {}
    sd = {}
    for k, v in fp.state_dict().items():
        if bits and k.endswith(".weight") and ("dense" in k or "query_key_value" in k):
            qw, s = quantize_rtn(v, bits, group_size)
            sd[k], sd[k + "_scale"] = qw, s
        else:
            sd[k] = v
    if embedding_bits:
        eg = 128 if embedding_bits == 4 else None
        sd = quantize_tied_embedding(sd, embedding_bits, eg)
        quant["embedding"] = {"bits": embedding_bits, "group_size": eg}
    q = GLM(cfg.replace(quantization=quant))
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


# ---- peers: each engine in its own long-lived worker process --------------------------------
def _prompts(vocab: int, n: int, batch: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 100, (batch, n), generator=g).tolist()


# ---- glmctl ----------------------------------------------------------------------------------
class GlmctlWorker:
    def __init__(self, spec):
        self.model = build(spec["preset"], spec.get("bits"), group_size=spec.get("group_size"),
                           embedding_bits=spec.get("embedding_bits"))
        self.cfg = self.model.config
        self.spec = spec

    def run(self, batch: int) -> float:
        ids = self.cfg.special_token_ids()
        n, ctx = self.spec["new_tokens"], self.spec["context"]
        reqs = [span_request(prepare_prompt(p[:ctx - 2], ids), ids["[gMASK]"], ids)
                for p in _prompts(self.cfg.mask_token_id - 1, ctx, batch)]
        gen = GenerationConfig(max_new_tokens=n, end_token_ids=())
        t = time.perf_counter()
        out = decode_batch(self.model, reqs, gen, ids)
        dt = time.perf_counter() - t
        assert all(len(h[0].tokens) == n for h in out)
        return batch * n / dt


# ---- transformers ------------------------------------------------------------------------------
def llama_config(cfg):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.inner_hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
                       max_position_embeddings=cfg.max_sequence_length, tie_word_embeddings=True,
                       attention_bias=True, mlp_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


class TransformersWorker:
    def __init__(self, spec):
        from transformers import LlamaForCausalLM
        self.cfg = get_preset(spec["preset"])
        torch.manual_seed(0)
        lc = llama_config(self.cfg)
        lc._attn_implementation = "sdpa"
        self.model = LlamaForCausalLM(lc).float().eval()
        self.spec = spec

    def run(self, batch: int) -> float:
        n, ctx = self.spec["new_tokens"], self.spec["context"]
        x = torch.tensor(_prompts(self.cfg.vocab_size, ctx, batch))
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, num_beams=1, use_cache=True, eos_token_id=None,
                                      pad_token_id=0)
        dt = time.perf_counter() - t
        assert out.shape[1] == ctx + n
        return batch * n / dt


# ---- llama.cpp ---------------------------------------------------------------------------------
def write_gguf(cfg, path: str, seed: int = 0) -> None:
    """An equal-shape Llama GGUF (F32, random weights), tied output, a placeholder vocabulary."""
    import gguf
    import numpy as np
    g = torch.Generator().manual_seed(seed)
    h, f, V = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_sequence_length)
    w.add_embedding_length(h)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(f)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_attention_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # ALL_F32
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([2, 3, 3] + [1] * (V - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(name, *shape, std=0.02):
        w.add_tensor(name, (torch.randn(*shape, generator=g) * std).numpy().astype(np.float32))

    t("token_embd.weight", V, h)
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(h, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(b + name + ".weight", h, h)
        t(b + "ffn_gate.weight", f, h)
        t(b + "ffn_up.weight", f, h)
        t(b + "ffn_down.weight", h, f)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_gguf(src: str, dst: str, output: str) -> None:
    """Q4_0 with the tied output/embedding kept F32 (``output="f32"``) or llama.cpp's default (Q6_K)."""
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    p.nthread = 1
    if output == "f32":
        p.output_tensor_type = 0  # GGML_TYPE_F32
        p.token_embedding_type = 0
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


class LlamaCppWorker:
    def __init__(self, spec):
        import llama_cpp
        self.cfg = get_preset(spec["preset"])
        self.spec = spec
        th = spec["threads"]
        self.llm = llama_cpp.Llama(spec["gguf"], n_threads=th, n_threads_batch=th, n_ctx=spec["context"] +
                                   spec["new_tokens"] + 8, n_batch=spec["context"], verbose=False)

    def run(self, batch: int) -> float:
        if batch != 1:
            raise ValueError("the llama.cpp worker decodes batch 1 only")
        n, ctx = self.spec["new_tokens"], self.spec["context"]
        prompt = _prompts(self.cfg.vocab_size, ctx, 1)[0]
        t = time.perf_counter()
        got = 0
        for _ in self.llm.generate(prompt, top_k=1, temp=0.0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            got += 1
            if got == n:
                break
        return n / (time.perf_counter() - t)


WORKERS = {"glmctl": GlmctlWorker, "transformers": TransformersWorker, "llama.cpp": LlamaCppWorker}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    w = WORKERS[spec["engine"]](spec)
    w.run(1)  # warm-up (and the attention picker's measurements)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        print(json.dumps({"tok_s": w.run(int(cmd[1]))}), flush=True)


class Worker:
    """One engine in its own process (``--worker``), driven line by line."""

    def __init__(self, spec: dict):
        import subprocess
        self.spec = spec
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"worker {spec['label']} did not start (exit {self.proc.poll()})")

    def run(self, batch: int) -> float:
        self.proc.stdin.write(f"run {batch}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["tok_s"]

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def _missing(module: str) -> str | None:
    import importlib.util
    return None if importlib.util.find_spec(module) else module


def peer_engines(preset: str, tmp: str, say) -> list[dict]:
    """The engines compared for ``preset``; the llama.cpp ones only where llama_cpp and gguf exist."""
    engines = [dict(engine="glmctl", label="glmctl fp32"),
               dict(engine="glmctl", label="glmctl INT4 g128", bits=4, group_size=128),
               dict(engine="glmctl", label="glmctl INT4 g128 + INT8 output", bits=4, group_size=128,
                    embedding_bits=8)]
    if _missing("transformers"):
        say("transformers: skipped (not installed; it is a dev dependency: pip install -e '.[dev]')")
    else:
        engines.append(dict(engine="transformers", label="transformers fp32"))
    gone = _missing("llama_cpp") or _missing("gguf")
    if gone:
        say(f"llama.cpp: skipped ({gone} is not installed; CMAKE_ARGS=-DGGML_NATIVE=ON pip install "
            f"llama-cpp-python gguf)")
        return engines
    cfg = get_preset(preset)
    f32 = os.path.join(tmp, f"{preset}-f32.gguf")
    write_gguf(cfg, f32)
    q4f = os.path.join(tmp, f"{preset}-q4_0-outf32.gguf")
    q4k = os.path.join(tmp, f"{preset}-q4_0.gguf")
    quantize_gguf(f32, q4f, "f32")
    quantize_gguf(f32, q4k, "default")
    engines += [dict(engine="llama.cpp", label="llama.cpp F32", gguf=f32, batch1_only=True),
                dict(engine="llama.cpp", label="llama.cpp Q4_0 (output F32)", gguf=q4f, batch1_only=True),
                dict(engine="llama.cpp", label="llama.cpp Q4_0 (output Q6_K)", gguf=q4k, batch1_only=True)]
    return engines


RATIOS = [("glmctl fp32", "transformers fp32"), ("glmctl INT4 g128", "transformers fp32"),
          ("glmctl fp32", "llama.cpp F32"), ("glmctl INT4 g128", "llama.cpp Q4_0 (output F32)"),
          ("glmctl INT4 g128 + INT8 output", "llama.cpp Q4_0 (output Q6_K)")]


def run_peers(presets, threads, batches, repeats, n_new, context, say) -> dict:
    """Every engine in its own process, alternating within each repeat; medians."""
    import statistics
    import tempfile
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="glmctl-peers-") as tmp:
        for preset in presets:
            engines = peer_engines(preset, tmp, say)
            for th in threads:
                workers = [Worker(dict(e, preset=preset, threads=th, new_tokens=n_new, context=context))
                           for e in engines]
                try:
                    samples = {(w.spec["label"], b): [] for w in workers for b in batches}
                    for _ in range(repeats):
                        for b in batches:
                            for w in workers:
                                if b == 1 or not w.spec.get("batch1_only"):
                                    samples[(w.spec["label"], b)].append(w.run(b))
                finally:
                    for w in workers:
                        w.close()
                for b in batches:
                    med = {label: statistics.median(v) for (label, bb), v in samples.items() if bb == b and v}
                    out[f"{preset}/threads={th}/batch={b}"] = med
                    say(f"{preset}, {th} thread(s), batch {b}: " +
                        ", ".join(f"{k} {v:.1f}" for k, v in med.items()) + " tok/s")
                    for x, y in RATIOS:
                        if x in med and y in med:
                            say(f"    {x} / {y}: {med[x] / med[y]:.2f}x")
            for b in batches:  # thread scaling, batch 1 and 8
                one, two = out.get(f"{preset}/threads=1/batch={b}"), out.get(f"{preset}/threads=2/batch={b}")
                if one and two:
                    say(f"{preset}, batch {b}, 2 threads vs 1: " +
                        ", ".join(f"{k} {two[k] / one[k]:.2f}x" for k in one if k in two))
    return out


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
    ap.add_argument("--peers", choices=("on", "off", "only"), default=None,
                    help="peer comparison (transformers, llama.cpp): default on, off with --quick")
    ap.add_argument("--peer-presets", default="medium,glm-110m")
    ap.add_argument("--peer-threads", default="1,2")
    ap.add_argument("--peer-batches", default="1,8")
    ap.add_argument("--peer-repeats", type=int, default=3)
    a = ap.parse_args(argv)
    peers = a.peers or ("off" if a.quick else "on")
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

    if peers != "off":
        print(f"peers: {n_new} new tokens after a {a.context}-token prompt, each engine in its own process, "
              f"alternating, medians of {a.peer_repeats}; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs", flush=True)
        results["peers"] = run_peers(a.peer_presets.split(","), [int(t) for t in a.peer_threads.split(",")],
                                     [int(b) for b in a.peer_batches.split(",")], a.peer_repeats, n_new,
                                     a.context, lambda msg: print(msg, flush=True))
        if peers == "only":
            if a.json:
                print(json.dumps(results, indent=2))
            return

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
    if "--worker" in sys.argv:
        worker_main(sys.argv[sys.argv.index("--worker") + 1])
    else:
        main()
