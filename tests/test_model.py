"""The GLM network against hand-written float64 formulas (docs/glm130b.md §2), and KV-cache decoding."""
import math

import pytest
import torch

from glmctl.config import ModelConfig, get_preset
from glmctl.model import GLM
from glmctl.model.masks import build_mask, prefix_lm_mask


def ref_forward(sd, cfg, tokens, positions, mask):
    """Naive float64 GLM-130B forward written from the spec, loop over heads, no torch modules."""
    d, H = cfg.hidden_size, cfg.num_attention_heads
    hd = d // H
    alpha = math.sqrt(2 * cfg.num_layers)
    E = sd["transformer.word_embeddings.weight"].double()

    def ln(x, p):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + cfg.layernorm_epsilon) * sd[p + ".weight"].double() + sd[p + ".bias"].double()

    def lin(x, p):
        return x @ sd[p + ".weight"].double().T + sd[p + ".bias"].double()

    def rope(x, pos):  # x [s, hd]; dim j pairs with j + hd/2
        out = x.clone()
        for j in range(hd // 2):
            theta = 10000 ** (-2 * j / hd)
            ang = pos.double() * theta
            c, s_ = torch.cos(ang), torch.sin(ang)
            out[:, j] = x[:, j] * c - x[:, j + hd // 2] * s_
            out[:, j + hd // 2] = x[:, j + hd // 2] * c + x[:, j] * s_
        return out

    outs = []
    for b in range(tokens.shape[0]):
        x = E[tokens[b]]
        for l in range(cfg.num_layers):
            p = f"transformer.layers.{l}."
            a = ln(x, p + "input_layernorm")
            qkv = lin(a, p + "attention.query_key_value")
            ctx = []
            for h in range(H):
                blk = qkv[:, 3 * hd * h: 3 * hd * (h + 1)]  # head-major [q|k|v]
                q, k, v = blk[:, :hd], blk[:, hd:2 * hd], blk[:, 2 * hd:]
                q, k = rope(q, positions[b]), rope(k, positions[b])
                sc = q @ k.T / math.sqrt(hd)
                sc = sc.masked_fill(mask[b, 0], -10000.0)
                ctx.append(torch.softmax(sc, -1) @ v)
            att = lin(torch.cat(ctx, -1), p + "attention.dense")
            hmid = alpha * a + att
            m = ln(hmid, p + "post_attention_layernorm")
            u = lin(m, p + "mlp.dense_h_to_4h")
            x1, x2 = u[:, :cfg.inner_hidden_size], u[:, cfg.inner_hidden_size:]
            gelu = 0.5 * x2 * (1 + torch.erf(x2 / math.sqrt(2)))
            x = alpha * m + lin(x1 * gelu, p + "mlp.dense_4h_to_h")
        y = ln(x, "transformer.final_layernorm")
        outs.append(y @ E.T)
    return torch.stack(outs)


def _model(seed=0, **kw):
    cfg = get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0, **kw)
    m = GLM(cfg).init_weights(seed=seed)
    # random biases and LN params so the formula test covers them too
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "layernorm" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def test_forward_matches_float64_formula():
    m = _model().double()
    cfg = m.config
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([list(range(9)), [0, 1, 2, 3, 4, 5, 3, 3, 3]])
    mask = torch.cat([prefix_lm_mask(9, 4), prefix_lm_mask(9, 6)])
    with torch.no_grad():
        got = m(tokens, positions, mask)
    want = ref_forward(m.state_dict(), cfg, tokens, positions, mask)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_qkv_is_head_major_interleaved():
    """Permuting heads in the fused QKV rows (and dense columns) must leave the output unchanged;
    treating rows as [all q | all k | all v] would not."""
    m = _model().double()
    cfg = m.config
    H, hd = cfg.num_attention_heads, cfg.head_dim
    tokens = torch.randint(0, cfg.vocab_size, (1, 7))
    pos = torch.arange(7)[None]
    mask = prefix_lm_mask(7, 3)
    with torch.no_grad():
        base = m(tokens, pos, mask)
        perm = torch.tensor([2, 0, 3, 1])
        for layer in m.transformer.layers:
            w = layer.attention.query_key_value.weight
            b = layer.attention.query_key_value.bias
            w.copy_(w.view(H, 3 * hd, -1)[perm].reshape(w.shape))
            b.copy_(b.view(H, 3 * hd)[perm].reshape(b.shape))
            dw = layer.attention.dense.weight
            dw.copy_(dw.view(dw.shape[0], H, hd)[:, perm].reshape(dw.shape))
        torch.testing.assert_close(m(tokens, pos, mask), base)


def test_incremental_decoding_equals_full_forward():
    m = _model(seed=3)
    cfg = m.config
    s = 12
    tokens = torch.randint(0, cfg.vocab_size, (2, s))
    pos = torch.tensor([list(range(s)), [0, 1, 2, 3, 4, 5] + [5] * 6])
    mask = prefix_lm_mask(s, 5).expand(2, 1, s, s)
    with torch.no_grad():
        full = m(tokens, pos, mask)
        cache = m.new_kv_cache()
        parts = [m(tokens[:, :5], pos[:, :5], mask[:, :, :5, :5], kv_cache=cache)]
        for i in range(5, s):
            parts.append(m(tokens[:, i:i + 1], pos[:, i:i + 1], mask[:, :, i:i + 1, :i + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(dtype):
    m = _model(seed=4)
    tokens = torch.randint(0, m.config.vocab_size, (1, 8))
    pos = torch.arange(8)[None]
    mask = prefix_lm_mask(8, 3)
    with torch.no_grad():
        ref = m(tokens, pos, mask)
        low = m.to(dtype)(tokens, pos, mask)
    assert low.dtype == dtype
    assert torch.isfinite(low.float()).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05


def test_rope_sat_mode_differs_from_exact_at_large_positions():
    from glmctl.model.glm import rope_cos_sin
    pos = torch.tensor([[2000]])
    sat, _ = rope_cos_sin(pos, 128, 10000.0, torch.float16, mode="sat")
    exact, _ = rope_cos_sin(pos, 128, 10000.0, torch.float16, mode="exact")
    # SAT in fp16: inv_freq and t in fp16, angle = fp16 product (steps of 1.0 rad near 2000);
    # the bit-exact check against an independent computation is tests/test_scale.py
    inv = (1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))).half()
    want = torch.cos((torch.tensor(2000.0).half() * inv).float()).half()
    torch.testing.assert_close(sat[0, 0, 0, :64], want, rtol=0, atol=0)
    assert (sat.float() - exact.float()).abs().max() > 1e-3  # the two paths really differ at large positions


def test_embedding_grad_shrink_scales_only_the_gradient():
    m = _model(seed=5).train()
    m.config.hidden_dropout = 0.0
    tokens = torch.randint(0, m.config.vocab_size, (1, 6))
    pos = torch.arange(6)[None]
    mask = prefix_lm_mask(6, 2)
    out1 = m(tokens, pos, mask)
    out1.sum().backward()
    g1 = m.transformer.word_embeddings.weight.grad.clone()
    m.zero_grad()
    m.embedding_grad_shrink = 0.1
    out2 = m(tokens, pos, mask)
    torch.testing.assert_close(out2, out1)
    out2.sum().backward()
    g2 = m.transformer.word_embeddings.weight.grad
    # the output-head part of the tied gradient is unchanged; the input part is scaled by 0.1
    m.zero_grad()
    m.embedding_grad_shrink = 0.0
    m(tokens, pos, mask).sum().backward()
    g_head = m.transformer.word_embeddings.weight.grad
    torch.testing.assert_close(g2, g_head + 0.1 * (g1 - g_head), rtol=1e-4, atol=1e-6)


def test_init_follows_deepnorm():
    cfg = get_preset("small").replace(num_layers=4)
    m = GLM(cfg).init_weights(seed=0)
    d, f = cfg.hidden_size, cfg.inner_hidden_size
    gain = (2 * cfg.num_layers) ** -0.5
    w = m.transformer.layers[0].attention.query_key_value.weight.view(cfg.num_attention_heads, 3, cfg.head_dim, d)
    assert abs(w[:, 0].std().item() - math.sqrt(1 / (3 * d))) < 0.05 * math.sqrt(1 / (3 * d))
    emb = m.transformer.word_embeddings.weight.std().item()  # 1/d: the tied output starts near uniform
    assert abs(emb - 1 / d) < 0.05 / d
    emb = GLM(cfg).init_weights(seed=0, embedding_std=0.0052).transformer.word_embeddings.weight.std().item()
    assert abs(emb - 0.0052) < 0.05 * 0.0052
    v_std = gain * math.sqrt(2 / (2 * d))
    assert abs(w[:, 2].std().item() - v_std) < 0.05 * v_std
    ffn = m.transformer.layers[0].mlp.dense_4h_to_h.weight.std().item()
    want = gain * math.sqrt(2 / (d + f))
    assert abs(ffn - want) < 0.05 * want
    assert m.transformer.layers[0].mlp.dense_h_to_4h.bias.abs().sum() == 0


def test_glm130b_forward_on_meta_device():
    cfg = get_preset("glm-130b")
    m = GLM(cfg, device="meta", dtype=torch.float16)
    tokens = torch.zeros(1, 4, dtype=torch.long, device="meta")
    pos = torch.zeros(1, 4, dtype=torch.long, device="meta")
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool, device="meta")
    out = m(tokens, pos, mask)
    assert out.shape == (1, 4, 150528) and out.device.type == "meta"
    assert sum(p.numel() for p in m.parameters()) == 128_697_794_560


def test_sat_state_dict_loads_and_ignores_inv_freq():
    m = _model(seed=6)
    sd = dict(m.state_dict())
    for i in range(m.config.num_layers):
        sd[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(8)
    m2 = GLM(m.config)
    m2.load_state_dict(sd)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    keys = set(m.state_dict())
    assert "transformer.layers.0.attention.query_key_value.weight" in keys
    assert "transformer.layers.1.mlp.dense_4h_to_h.bias" in keys
    assert "transformer.final_layernorm.weight" in keys and "transformer.word_embeddings.weight" in keys


def test_config_rejects_bad_heads_and_roundtrips(tmp_path):
    from glmctl.errors import UsageError
    with pytest.raises(UsageError):
        ModelConfig(hidden_size=10, num_attention_heads=3)
    cfg = get_preset("small")
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert ModelConfig.load(tmp_path) == cfg


def test_presets_have_expected_sizes():
    assert get_preset("tiny").num_parameters() < 1_000_000
    assert 1e6 <= get_preset("small").num_parameters() <= 4e6
    assert 10e6 <= get_preset("medium").num_parameters() <= 25e6
    c = get_preset("glm-130b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.inner_hidden_size, c.vocab_size,
            c.max_sequence_length, c.layernorm_epsilon) == (70, 12288, 96, 32768, 150528, 2048, 1e-5)
    assert c.num_parameters() == 128_697_794_560
    assert abs(c.deepnorm_alpha - 11.8322) < 1e-4
