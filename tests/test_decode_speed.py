"""The fast decode path gives today's results (issue 20): static KV cache, attention kernels chosen
per step shape, derived masks, the GEMV kernel, the quantized tied embedding. Correctness only;
speed is measured in bench/generate.py.

"Today's path" is run here under ``torch.enable_grad()`` without a cache: the explicit
masked_fill + softmax attention and ``F.linear`` (the fast path is inference-only), a full
forward over the whole sequence at every step.
"""
import pytest
import torch
import torch.nn.functional as F

from glmctl import kernels
from glmctl.config import get_preset
from glmctl.generation import (BeamSearch, DecodeBatch, GenerationConfig, decode, fill_batch, new_strategy,
                               span_request)
from glmctl.model import GLM, KVCache, StaticKVCache
from glmctl.model.glm import QuantizedVocabEmbedding, math_attention, quantize_tied_embedding
from glmctl.model.masks import build_mask, prefix_lm_mask, prepare_prompt
from test_generation import one_thread, varied_model  # noqa: F401 - the one-thread fixture applies here too

CFG = get_preset("tiny").replace(num_layers=3)
IDS = CFG.special_token_ids()
M, S, G = IDS["[MASK]"], IDS["[sMASK]"], IDS["[gMASK]"]
ENDS = (IDS["eop"], IDS["eos"], IDS["eod"])
NEVER = (M, S, G, IDS["sop"])


@pytest.fixture(scope="module")
def model():
    return varied_model(3, CFG)


def reference_logits(model, seq, pos, prefix_len):
    """Today's path: full forward, explicit attention, F.linear (autograd on, so no fast kernel)."""
    with torch.enable_grad():
        out = model(torch.tensor([seq]), torch.tensor([pos]), prefix_lm_mask(len(seq), prefix_len))
    return out[0, -1].detach().float()


def reference_span(model, req, steps, banned=NEVER):
    gen = []
    for k in range(steps):
        seq = req.tokens + gen
        pos = req.positions + [req.next_position(j) for j in range(1, len(gen) + 1)]
        logits = reference_logits(model, seq, pos, req.prefix_len)
        logits[list(banned)] = -float("inf")
        t = int(logits.argmax())
        if t in ENDS:
            break
        gen.append(t)
    return gen


def reference_fill(model, prompt, steps):
    tokens = prepare_prompt(prompt, IDS)
    mask = M if M in tokens else (S if S in tokens else G)
    spans = []
    while mask in tokens:
        i = tokens.index(mask)
        gen = reference_span(model, span_request(tokens, mask, IDS), steps)
        tokens = tokens[:i] + gen + tokens[i + 1:]
        spans.append((i, gen))
    return spans


PROMPTS = [[5, 6, M, 7, 8, M, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, G], [40, 41, S, 42],
           [50, M, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61]]


@pytest.mark.parametrize("attention", ["auto", "math", "sdpa", "fused"])
def test_greedy_fill_equals_todays_path_with_masks_and_padding(model, attention):
    """[MASK] (two blanks), [gMASK] appended and given, [sMASK]; one padded batch of all prompts."""
    model.decode_attention = attention
    try:
        got = fill_batch(model, PROMPTS, IDS, GenerationConfig(max_new_tokens=6))
    finally:
        model.decode_attention = "auto"
    want = [reference_fill(model, p, 6) for p in PROMPTS]
    assert [r.spans for r in got] == want
    assert any(len(g) > 1 for spans in want for _, g in spans)  # not vacuous: real spans


def reference_beam(model, req, gen):
    bs = BeamSearch(req.tokens, gen, ENDS, None)
    for step in range(gen.max_new_tokens):
        rows = []
        for beam in bs.beams:
            seq = req.tokens + beam
            pos = req.positions + [req.next_position(k) for k in range(1, len(beam) + 1)]
            rows.append(reference_logits(model, seq, pos, req.prefix_len))
        bs.step(torch.stack(rows))
        if bs.done:
            break
        if step + 1 >= gen.max_new_tokens:
            bs.finish()
    return bs.result()


@pytest.mark.parametrize("attention", ["math", "sdpa", "fused"])
def test_beam_search_equals_todays_path(model, attention):
    model.decode_attention = attention
    try:
        for nb, ngram in ((3, 0), (2, 2)):
            gen = GenerationConfig(strategy="beam", num_beams=nb, max_new_tokens=6, no_repeat_ngram_size=ngram)
            req = span_request(prepare_prompt([9, 10, M, 11, 12], IDS), M, IDS)
            got = decode(model, req.tokens, req.positions, req.prefix_len, req.next_position, gen, IDS)
            want = reference_beam(model, req, gen)
            assert [h.tokens for h in got] == [h.tokens for h in want]
            assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)
    finally:
        model.decode_attention = "auto"


def run_cache(model, cache, tok, pos, mask, steps, attention):
    """Prefill then ``steps`` single-token steps; the logits of every forward."""
    model.decode_attention = attention
    out = []
    with torch.inference_mode():
        out.append(model(tok, pos, mask, kv_cache=cache))
        b, L = tok.shape
        blocked = mask[:, :, -1:, :]  # the last row sees every real key (the padded rows' real ones)
        for i in range(steps):
            blocked = torch.cat([blocked, torch.zeros(b, 1, 1, 1, dtype=torch.bool)], dim=-1)
            t = torch.tensor([[(7 * i + r) % 100 + 3] for r in range(b)])
            p = torch.tensor([[L + i] for _ in range(b)])
            out.append(model(t, p, blocked, kv_cache=cache))
    model.decode_attention = "auto"
    return out


@pytest.mark.parametrize("attention", ["math", "sdpa", "fused"])
def test_static_cache_logits_equal_growing_cache(model, attention):
    """Same logits (<= 1e-6, fp32) from the preallocated cache as from torch.cat growth; rows
    left-padded; a capacity too small on purpose, so the in-place growth runs too."""
    lens = [9, 6]
    L = max(lens)
    tok = torch.zeros(2, L, dtype=torch.long)
    valid = torch.zeros(2, L, dtype=torch.bool)
    prefix = torch.zeros(2, L, dtype=torch.bool)
    for r, n in enumerate(lens):
        tok[r, L - n:] = torch.arange(n) + 20 + r
        valid[r, L - n:] = True
        prefix[r, L - n:L - 1] = True
    pos = torch.arange(L).repeat(2, 1)
    mask = build_mask(prefix, torch.where(valid, 0, -1))
    grow = run_cache(model, KVCache(CFG.num_layers), tok, pos, mask, 8, attention)
    for capacity in (L + 8, L + 3):
        static = model.new_static_kv_cache(2, capacity)
        got = run_cache(model, static, tok, pos, mask, 8, attention)
        assert isinstance(static, StaticKVCache) and static.length == L + 8
        for a, b in zip(got, grow):
            torch.testing.assert_close(a[valid[:, -1]], b[valid[:, -1]], rtol=0, atol=1e-6)


def test_static_cache_reorder_moves_rows(model):
    c = model.new_static_kv_cache(3, 6)
    k = torch.randn(3, c.k[0].shape[1], 4, CFG.head_dim)
    for layer in range(CFG.num_layers):
        c.append(layer, k, k + 1)
    idx = torch.tensor([2, 2, 0])
    c.reorder(idx)  # same row count: in place
    assert torch.equal(c.keys[0], k[idx]) and torch.equal(c.values[1], k[idx] + 1)
    c.reorder(torch.tensor([1]))
    assert torch.equal(c.keys[2], k[[2]]) and c.k[0].shape[0] == 1


def test_joined_requests_decode_as_alone(model, monkeypatch):
    """Continuous batching on the static cache: a request joining mid-way (a longer and a shorter
    context) decodes what it decodes alone, and the running one is undisturbed. The caches a join
    allocates uninitialised are filled with NaN here: no step may read a column it did not write."""
    allocate = StaticKVCache.allocate.__func__

    def poisoned(cls, num_layers, batch, heads, capacity, head_dim, dtype, device, start=0, zeros=True):
        c = allocate(cls, num_layers, batch, heads, capacity, head_dim, dtype, device, start, zeros)
        if not zeros:
            for t in c.k + c.v:
                t.fill_(float("nan"))
        return c

    monkeypatch.setattr(StaticKVCache, "allocate", classmethod(poisoned))
    gen = GenerationConfig(max_new_tokens=8, end_token_ids=())
    reqs = [span_request(prepare_prompt(p, IDS), G, IDS) for p in ([3, 4, 5], [60, 61, 62, 63, 64, 65, 66, 67])]

    def alone(r):
        return decode(model, r.tokens, r.positions, r.prefix_len, r.next_position, gen, IDS)[0].tokens

    with torch.inference_mode():
        batch = DecodeBatch(model)
        strategies = [new_strategy(r, gen, IDS, "cpu", CFG.max_sequence_length)[0] for r in reqs]
        batch.join([0], reqs[:1], strategies[:1], [8])
        batch.step()
        batch.step()
        batch.join([1], reqs[1:], strategies[1:], [8])
        while len(batch):
            batch.step()
    assert [s.result()[0].tokens for s in strategies] == [alone(r) for r in reqs]


@pytest.mark.parametrize("tiles", ["wide", "avx2"])
def test_dense_linear_matches_float64(tiles):
    """m = 1 (8-row blocks + a tail), m = 2..8 (tiles + a tail of rows and columns: the 32-register
    tiles on a CPU with AVX-512VL, also up to m = 16 in groups of 8 rows; else, or forced, the
    4 x 2 AVX2 tiles), larger m (at::linear)."""
    kernels.status()  # loads the CPU extension (its torch.ops)
    if tiles == "wide" and "avx512vl" not in torch.ops.glmctl.cpu_isa():
        pytest.skip("this CPU has no AVX-512VL")
    prev = torch.ops.glmctl.cpu_force_avx2(tiles == "avx2")
    try:
        g = torch.Generator().manual_seed(0)
        for m, n, k in ((1, 37, 53), (1, 4, 16), (1, 7, 768), (1, 3, 8), (2, 5, 9), (3, 64, 768), (4, 9, 16),
                        (5, 13, 100), (6, 10, 12), (7, 1, 33), (8, 66, 2048), (8, 3, 7), (8, 29, 100), (9, 10, 12),
                        (13, 20, 100), (16, 7, 64), (17, 10, 12)):
            x, w, b = (torch.randn(*s, generator=g) for s in ((m, k), (n, k), (n,)))
            want = x.double() @ w.double().t() + b.double()
            with torch.inference_mode():
                got = kernels.dense_linear(x, w, b)
            assert got.dtype == torch.float32 and got.shape == (m, n)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(kernels.dense_linear(x[0], w), F.linear(x[0], w), rtol=1e-5, atol=1e-5)
            if m <= (16 if tiles == "wide" else 8) and n >= 2:  # every row's result is the one it gets alone
                # (batch invariance; n = 1 is at::linear's)
                with torch.inference_mode():
                    for i in range(m):
                        assert torch.equal(got[i], kernels.dense_linear(x[i:i + 1], w, b)[0]), (m, n, k, i)
                    if tiles == "wide" and m <= 8:  # and the same as the AVX2 tiles'
                        torch.ops.glmctl.cpu_force_avx2(True)
                        assert torch.equal(got, kernels.dense_linear(x, w, b)), (m, n, k)
                        torch.ops.glmctl.cpu_force_avx2(False)
    finally:
        torch.ops.glmctl.cpu_force_avx2(prev)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_quantized_tied_embedding(model, bits, group):
    """The quantized embedding looks up dequantized rows and its output layer is x @ dequant(E)^T;
    the layers stay in floating point; the default keeps the embedding in full precision."""
    cfg = CFG.replace(quantization={"embedding": {"bits": bits, "group_size": group}})
    sd = quantize_tied_embedding(model.state_dict(), bits, group)
    q = GLM(cfg)
    q.load_state_dict(sd)
    q.eval()
    emb = q.transformer.word_embeddings
    assert isinstance(emb, QuantizedVocabEmbedding) and emb.weight.dtype == torch.int8
    assert q.transformer.layers[0].attention.dense.weight.dtype == torch.float32
    assert not isinstance(model.transformer.word_embeddings, QuantizedVocabEmbedding)
    e = kernels.dequantize(sd["transformer.word_embeddings.weight"], sd["transformer.word_embeddings.weight_scale"],
                           bits).double()  # float64 formula: W = q * s
    ids = torch.tensor([[1, 5, 300, 511]])
    torch.testing.assert_close(emb(ids).double(), e[ids], rtol=0, atol=1e-6)
    h = torch.randn(2, CFG.hidden_size)
    with torch.inference_mode():
        torch.testing.assert_close(q.logits(h).double(), h.double() @ e.t(), rtol=1e-4, atol=1e-4)
    err = (e - model.transformer.word_embeddings.weight.double()).abs().max()
    assert 0 < err <= model.transformer.word_embeddings.weight.abs().max() / (7 if bits == 4 else 127)
    # it decodes: the same tokens as today's path run on the dequantized model
    deq = GLM(CFG)
    deq.load_state_dict({**model.state_dict(), "transformer.word_embeddings.weight": e.float()})
    deq.eval()
    r = span_request(prepare_prompt([5, 6, M, 7], IDS), M, IDS)
    got = decode(q, r.tokens, r.positions, r.prefix_len, r.next_position, GenerationConfig(max_new_tokens=5), IDS)
    assert got[0].tokens == reference_span(deq, r, 5, banned=())[:len(got[0].tokens)]


@pytest.mark.slow
def test_compiled_decode_step_gives_the_eager_tokens(model):
    """GLM.compile_decode: the per-token step through torch.compile; greedy fills (a padded batch with
    [MASK], [sMASK], [gMASK]) and beam search give the eager path's tokens, which are today's."""
    gen, beam = GenerationConfig(max_new_tokens=6), GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=5)
    eager = fill_batch(model, PROMPTS, IDS, gen)
    eager_beam = fill_batch(model, PROMPTS[:2], IDS, beam)
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    model.compile_decode()
    try:
        got = fill_batch(model, PROMPTS, IDS, gen)
        got_beam = fill_batch(model, PROMPTS[:2], IDS, beam)
        fill_batch(model, PROMPTS, IDS, GenerationConfig(max_new_tokens=12))  # cached lengths not seen yet
    finally:
        model.compile_decode(False)
    assert [r.spans for r in got] == [r.spans for r in eager] == [reference_fill(model, p, 6) for p in PROMPTS]
    assert [r.spans for r in got_beam] == [r.spans for r in eager_beam]
    # One dynamic graph serves every cached length: no recompilation per step (each one would
    # cost seconds, and past torch's recompile limit the step silently runs eagerly). A few graphs
    # remain: per attention kernel and with or without empty (left-padded) rows.
    assert graphs["unique_graphs"] <= 4


@pytest.mark.parametrize("scalar", [False, True])
def test_decode_attention_matches_float64(scalar):
    """kernels.decode_attention against math_attention in float64, on a cache view (rows of a
    larger buffer), with padding: a row's result is bit-identical with more padding in front of
    it, and a row with every key blocked gets the mean of v (as math_attention gives it)."""
    kernels.status()
    if not kernels.decode_attention_available():
        pytest.skip("the CPU extension is not built")
    prev = torch.ops.glmctl.cpu_force_scalar(scalar)
    try:
        g = torch.Generator().manual_seed(0)
        for b, n, t, d in ((3, 2, 17, 64), (2, 3, 40, 20), (1, 1, 1, 8)):
            kb, vb = (torch.randn(b, n, t + 5, d, generator=g) for _ in range(2))
            k, v = kb[:, :, :t], vb[:, :, :t]  # the cache's filled part: not contiguous
            q = torch.randn(b, n, 1, d, generator=g)
            blocked = torch.zeros(b, 1, 1, t, dtype=torch.bool)
            blocked[0, ..., :t // 2] = True
            if b > 2:
                blocked[2] = True  # sees nothing
            with torch.inference_mode():
                got = kernels.decode_attention(q, k, v, blocked)
            want = math_attention(q.double(), k.double(), v.double(), blocked, 1.0)
            assert got.shape == (b, n, 1, d) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
            if b > 2:
                torch.testing.assert_close(got[2, :, 0].double(), v[2].double().mean(dim=1), rtol=1e-5, atol=1e-6)
            # the first row again behind 9 more padding columns (NaN: never read)
            pad = torch.full((1, n, 9, d), float("nan"))
            k2, v2 = torch.cat([pad, k[:1]], dim=2), torch.cat([pad, v[:1]], dim=2)
            b2 = torch.cat([torch.ones(1, 1, 1, 9, dtype=torch.bool), blocked[:1]], dim=-1)
            with torch.inference_mode():
                assert torch.equal(kernels.decode_attention(q[:1], k2, v2, b2), got[:1])
    finally:
        torch.ops.glmctl.cpu_force_scalar(prev)
