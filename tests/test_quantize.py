"""glmctl quantize: GLM-130B's RTN format on fixed tensors, quantized logits == dequantized fp
logits, GPTQ beats RTN on the same layer, the quality report against a direct computation,
the gate on an artificially bad quantization, and bad input (one line each)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glmctl.artifacts import ArtifactWriter, read_manifest
from glmctl.checkpoint import load_model, read_state_dict, save_model
from glmctl.cli import main
from glmctl.config import get_preset
from glmctl.data import index_bytes
from glmctl.gptq import Hessian, gptq_model, gptq_quantize
from glmctl.kernels.reference import dequantize, quantize_rtn
from glmctl.model import GLM
from glmctl.model.masks import lm_window

LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


# ---- fixtures ------------------------------------------------------------------------------
def write_tokens(out, docs):
    """A tokens artifact as `glmctl tokenize` writes it: one MMIDIDX shard, manifest last."""
    docs = [np.asarray(d, dtype=np.uint16) for d in docs]
    with ArtifactWriter(out, stage="tokenize", config={}) as w:
        np.concatenate(docs).tofile(w.path / "shard-00000.bin")
        (w.path / "shard-00000.idx").write_bytes(index_bytes(np.array([len(d) for d in docs]), np.uint16))
        w.summary["shards"] = [{"name": "shard-00000", "documents": len(docs)}]
    return out


def tiny_cfg():
    return get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)


# A learnable toy language: each of 300 tokens has one successor (90%), else a random token.
_PERM = np.random.default_rng(0).permutation(300)
_SUCC = np.zeros(300, dtype=np.int64)
_SUCC[_PERM] = np.roll(_PERM, -1)


def toy_stream(n, seed):
    r = np.random.default_rng(seed)
    t = [int(r.integers(300))]
    for _ in range(n - 1):
        t.append(int(_SUCC[t[-1]]) if r.random() < 0.9 else int(r.integers(300)))
    return np.array(t)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GLM trained for 40 steps on the toy language (ppl ~4 instead of ~300), and tokens."""
    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_cfg()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        m = GLM(cfg).init_weights(seed=0)
        s = toy_stream(20000, 1)
        g = np.random.default_rng(0)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(40):
            rows = [lm_window(s[a:a + 4].tolist(), s[a + 4:a + 31].tolist(), cfg.gmask_token_id, cfg.sop_token_id)
                    for a in g.integers(0, len(s) - 32, 8)]
            tok = torch.tensor([r[0] for r in rows])
            logits = m(tok, torch.tensor(rows[0][1]).expand(8, -1), rows[0][2])[:, torch.tensor(rows[0][3])]
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.tensor([r[4] for r in rows]).reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    save_model(m.eval(), root / "model")
    write_tokens(root / "tokens", [toy_stream(500, 100 + i) for i in range(24)])
    return root


@pytest.fixture()
def random_ckpt(tmp_path):
    save_model(GLM(tiny_cfg()).init_weights(seed=3), tmp_path / "model")
    rng = np.random.default_rng(5)
    write_tokens(tmp_path / "tokens", [rng.integers(0, 440, 400) for _ in range(8)])
    return tmp_path


def cli(*args):
    """Run the real CLI in-process; returns the exit code."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def unpack_int4_np(b: np.ndarray) -> np.ndarray:
    """Independent of the reference: high nibble = even column, 4-bit two's complement."""
    u = b.astype(np.uint8)
    hi = ((u >> 4).astype(np.int16) ^ 8) - 8
    lo = ((u & 0xF).astype(np.int16) ^ 8) - 8
    return np.stack([hi, lo], axis=-1).reshape(b.shape[0], -1)


def dequant_np(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    v = unpack_int4_np(q.numpy()) if bits == 4 else q.numpy().astype(np.int16)
    s = scale.float().numpy()
    s = s[:, None] if s.ndim == 1 else np.repeat(s, v.shape[1] // s.shape[1], axis=1)
    return torch.from_numpy(v.astype(np.float32) * s)


# ---- the format ----------------------------------------------------------------------------
def test_rtn_per_row_is_glm130b_scheme_on_fixed_rows(tmp_path):
    m = GLM(tiny_cfg()).init_weights(seed=1)
    w = m.transformer.layers[0].attention.query_key_value.weight
    with torch.no_grad():
        w[:3] = 0.0
        w[0, :6] = torch.tensor([7.0, -7.0, 2.5, 1.5, -0.5, 3.5])   # absmax 7: scale 1, ties to even
        w[1, :4] = torch.tensor([14.0, 5.0, 3.0, -1.0])             # scale 2: 2.5->2, 1.5->2, -0.5->-0
        w[2, :2] = torch.tensor([1.0, 0.5])                         # scale fp16(1/7)
        m.transformer.layers[0].attention.query_key_value.bias.fill_(0.25)
    save_model(m, tmp_path / "model")
    assert cli("quantize", tmp_path / "model", tmp_path / "q4", "--bits", "4") == 0
    assert cli("quantize", tmp_path / "model", tmp_path / "q8", "--bits", "8") == 0
    _, sd4 = read_state_dict(tmp_path / "q4")
    _, sd8 = read_state_dict(tmp_path / "q8")
    key = "transformer.layers.0.attention.query_key_value.weight"
    s4, q4 = sd4[key + "_scale"], sd4[key]
    assert s4.dtype == torch.float16 and q4.dtype == torch.int8 and tuple(q4.shape) == (192, 32)
    assert s4[:3].tolist() == [1.0, 2.0, 0.142822265625]
    # row 0 -> [7, -7, 2, 2, -0, 4]: bytes (7<<4)|(-7&15)=0x79, 0x22, (0<<4)|4=0x04
    assert q4[0, :4].tolist() == [0x79, 0x22, 0x04, 0x00]
    # row 1 -> [7, 2, 2, 0] (2.5 and 1.5 round to 2): 0x72, 0x20
    assert q4[1, :2].tolist() == [0x72, 0x20]
    # row 2: 1/fp16(1/7) = 7.0017 -> 7; 0.5/0.14282 = 3.5009 -> 4
    assert q4[2, :1].tolist() == [0x74]
    s8, q8 = sd8[key + "_scale"], sd8[key]
    assert s8.dtype == torch.float16 and s8[0].item() == float(np.float16(7.0) / np.float16(127.0))
    row = np.array([7.0, -7.0, 2.5, 1.5, -0.5, 3.5], dtype=np.float16)
    assert q8[0, :6].tolist() == np.round(row / np.float16(s8[0].item())).astype(int).tolist()
    # everything that is not one of the four linear weights is copied unchanged (biases kept)
    _, parent = read_state_dict(tmp_path / "model")
    for k, v in parent.items():
        if not any(k.endswith(n + ".weight") for n in LINEARS):
            assert torch.equal(sd4[k], v), k
    assert sorted(k for k in sd4 if k.endswith("_scale")) == sorted(
        f"transformer.layers.{i}.{n}.weight_scale" for i in range(2) for n in LINEARS)
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization"] == {"bits": 4, "group_size": None, "method": "rtn"}


def test_rtn_scales_match_a_direct_absmax_loop(random_ckpt):
    assert cli("quantize", random_ckpt / "model", random_ckpt / "q", "--bits", "4", "--group-size", "32") == 0
    _, sd = read_state_dict(random_ckpt / "q")
    _, parent = read_state_dict(random_ckpt / "model")
    key = "transformer.layers.1.mlp.dense_4h_to_h.weight"
    w = parent[key].half()
    s = sd[key + "_scale"]
    assert s.shape == (64, 4)
    for r in range(0, 64, 9):
        for g in range(4):
            assert s[r, g].item() == (w[r, 32 * g:32 * (g + 1)].abs().max() / 7).item()


# ---- quantized model == fp model with dequantized weights ------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("bits,group,method", [(8, None, "rtn"), (4, None, "rtn"), (4, 16, "rtn"),
                                               (4, 32, "gptq")])
def test_quantized_logits_equal_dequantized_fp_model(random_ckpt, bits, group, method):
    parent = load_model(random_ckpt / "model")
    args = ["quantize", random_ckpt / "model", random_ckpt / "q", "--bits", bits, "--method", method,
            "--seq-len", 48, "--calibration-samples", 8, "--eval-samples", 2]
    if group:
        args += ["--group-size", group]
    if method == "gptq":
        args += ["--calibration", random_ckpt / "tokens"]
    assert cli(*args) == 0
    shutil.rmtree(random_ckpt / "model")  # the quantized checkpoint runs with no fp parent
    q = load_model(random_ckpt / "q")
    _, sd = read_state_dict(random_ckpt / "q")
    ref = parent.state_dict()
    for i in range(2):
        for n in LINEARS:
            key = f"transformer.layers.{i}.{n}.weight"
            assert sd[key].dtype == torch.int8
            assert sd[key].shape[1] == ref[key].shape[1] // (2 if bits == 4 else 1)
            ref[key] = dequant_np(sd[key], sd[key + "_scale"], bits)
            # the dequantized weight is close to the parent's (the grid step bounds RTN's error)
            err = (ref[key] - parent.state_dict()[key]).abs().max().item()
            assert err <= (parent.state_dict()[key].abs().max().item() / (2 ** (bits - 1) - 1)) * (
                0.51 if method == "rtn" else 8)
    parent.load_state_dict(ref)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 440, (3, 20), generator=g)
    from glmctl.model.masks import prefix_lm_mask
    with torch.no_grad():
        a = q(tokens, torch.arange(20).expand(3, -1), prefix_lm_mask(20, 6))
        b = parent(tokens, torch.arange(20).expand(3, -1), prefix_lm_mask(20, 6))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fp32_scales_when_fp16_would_overflow(tmp_path):
    m = GLM(tiny_cfg()).init_weights(seed=2)
    with torch.no_grad():
        m.transformer.layers[1].attention.dense.weight[5, 7] = 1.0e6
    save_model(m, tmp_path / "model")
    assert cli("quantize", tmp_path / "model", tmp_path / "q", "--bits", "8") == 0
    _, sd = read_state_dict(tmp_path / "q")
    s = sd["transformer.layers.1.attention.dense.weight_scale"]
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert s[5].item() == pytest.approx(1.0e6 / 127, rel=1e-6)
    assert sd["transformer.layers.1.attention.dense.weight"][5, 7].item() == 127


# ---- GPTQ ----------------------------------------------------------------------------------
def correlated_inputs(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k // 4, k, generator=g)
    return torch.randn(n, k // 4, generator=g) @ basis + 0.1 * torch.randn(n, k, generator=g)


def test_hessian_accumulates_2_xtx_over_n():
    x = correlated_inputs(300, 32, 0)
    h = Hessian(32)
    for chunk in x.split(70):
        h.add(chunk)
    torch.testing.assert_close(h.H, 2 * x.t() @ x / 300, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,group,act_order", [(4, None, False), (4, 16, False), (4, 16, True),
                                                  (8, None, False), (4, None, True)])
def test_gptq_lower_reconstruction_error_than_rtn(bits, group, act_order):
    k, n = 64, 48
    x = correlated_inputs(2048, k, 1)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 0.05
    h = Hessian(k)
    h.add(x)
    res = gptq_quantize(w, h.H, bits, group, block_size=32, act_order=act_order)
    qmax = 2 ** (bits - 1) - 1
    q = unpack_int4_np(res.qweight.numpy()) if bits == 4 else res.qweight.numpy()
    assert np.abs(q).max() <= qmax and res.scale.dtype == torch.float16
    assert res.scale.shape == ((n, k // group) if group else (n,))
    assert torch.equal(dequant_np(res.qweight, res.scale, bits), res.dequantized)
    rq, rs = quantize_rtn(w.half(), bits, group)
    err = lambda wq: ((x @ w.t() - x @ wq.t()) ** 2).sum().item()  # noqa: E731
    e_gptq, e_rtn = err(res.dequantized), err(dequant_np(rq, rs, bits))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.slow
def test_gptq_beats_rtn_on_a_real_layer_of_a_trained_model(trained):
    """Inputs of layer 1's dense_4h_to_h collected from the calibration windows of a trained GLM."""
    model = load_model(trained / "model")
    cfg = model.config
    s = toy_stream(4000, 7)
    rows = [lm_window(s[a:a + 16].tolist(), s[a + 16:a + 63].tolist(), cfg.gmask_token_id, cfg.sop_token_id)
            for a in range(0, 3000, 64)]
    tok, pos, mask = torch.tensor([r[0] for r in rows]), torch.tensor(rows[0][1]).expand(len(rows), -1), rows[0][2]
    lin = model.transformer.layers[1].mlp.dense_4h_to_h
    seen = []
    h = lin.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].reshape(-1, inp[0].shape[-1])))
    with torch.no_grad():
        model(tok, pos, mask)
    h.remove()
    x = torch.cat(seen)
    hess = Hessian(x.shape[1])
    hess.add(x)
    w = lin.weight.detach()
    res = gptq_quantize(w, hess.H, 4, None)
    rq, rs = quantize_rtn(w.half(), 4, None)
    err = lambda wq: ((x @ w.t() - x @ wq.t()) ** 2).sum().item()  # noqa: E731
    assert err(res.dequantized) < 0.8 * err(dequant_np(rq, rs, 4))
    # the model-level driver quantizes every matrix and writes the dequantized weights back
    res_all = gptq_model(model, [(tok[:8], pos[:8], mask)], 4, 32)
    assert len(res_all) == 8
    for key, r in res_all.items():
        assert torch.equal(model.state_dict()[key], r.dequantized)


# ---- the quality report and the gate -------------------------------------------------------
def direct_ppl(model, stream, seq_len, prefix):
    """Perplexity over consecutive lm_windows computed here, window by window."""
    cfg = model.config
    width = seq_len - 1
    nll, n = 0.0, 0
    for a in range(0, len(stream) - width + 1, width):
        seg = stream[a:a + width].tolist()
        toks, pos, mask, tpos, tgt = lm_window(seg[:prefix], seg[prefix:], cfg.gmask_token_id, cfg.sop_token_id)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([toks]), torch.tensor([pos]), mask)[0].float(), -1)
        nll -= sum(lp[p, t].item() for p, t in zip(tpos, tgt))
        n += len(tgt)
    return math.exp(nll / n), n


@pytest.mark.slow
def test_report_matches_direct_computation(trained, tmp_path, capsys):
    stream = toy_stream(63 * 6, 55)  # exactly 6 windows of 63 tokens
    write_tokens(tmp_path / "eval", [stream[:200], stream[200:]])  # windows do not follow documents
    code = cli("quantize", trained / "model", tmp_path / "q", "--bits", "4", "--group-size", "32",
               "--eval", tmp_path / "eval", "--seq-len", "64", "--eval-prefix", "8", "--compare", "rtn:row,int8",
               "--json")
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["status"] == "complete" and rep["eval"]["windows"] == 6
    ppl_p, n = direct_ppl(load_model(trained / "model"), stream, 64, 8)
    ppl_q, _ = direct_ppl(load_model(tmp_path / "q"), stream, 64, 8)
    assert rep["eval"]["scored_tokens"] == n == 6 * 55
    assert rep["parent"]["ppl"] == pytest.approx(ppl_p, rel=1e-5)
    assert rep["quantized"]["ppl"] == pytest.approx(ppl_q, rel=1e-5)
    assert rep["quantized"]["ppl_increase_pct"] == pytest.approx(100 * (ppl_q / ppl_p - 1), rel=1e-4, abs=1e-6)
    assert 0.0 <= rep["quantized"]["kl_mean"] and 0.0 <= rep["quantized"]["top1_agreement"] <= 1.0
    names = [r["name"] for r in rep["compare"]]
    assert names == ["int4 rtn per-row", "int8 rtn per-row"]
    int8 = rep["compare"][1]
    assert abs(int8["ppl_increase_pct"]) < 0.5 and int8["top1_agreement"] > 0.98
    assert int8["kl_mean"] < rep["compare"][0]["kl_mean"]  # 8 bits are closer to the parent than 4
    m = read_manifest(tmp_path / "q", stage="quantize")
    assert m["summary"]["quantize"]["quantized"] == rep["quantized"]


def outlier_parent(src, dst):
    """The same function with weights that absmax quantization cannot represent: every 16th column of
    dense_4h_to_h times 1000, the matching rows of dense_h_to_4h's first (linear) half / 1000."""
    m = load_model(src)
    with torch.no_grad():
        for layer in m.transformer.layers:
            for c in range(0, m.config.inner_hidden_size, 16):
                layer.mlp.dense_4h_to_h.weight[:, c] *= 1000.0
                layer.mlp.dense_h_to_4h.weight[c] /= 1000.0
                layer.mlp.dense_h_to_4h.bias[c] /= 1000.0
    save_model(m, dst)


@pytest.mark.slow
def test_gate_trips_on_an_artificially_bad_quantization(trained, tmp_path, capsys):
    outlier_parent(trained / "model", tmp_path / "bad")
    common = ["--bits", "4", "--calibration", trained / "tokens", "--seq-len", "64", "--eval-samples", "12",
              "--max-ppl-increase", "5", "--json"]
    assert cli("quantize", trained / "model", tmp_path / "good", *common) == 0
    good = json.loads(capsys.readouterr().out)
    assert good["gate"] == {"max_ppl_increase_pct": 5.0, "passed": True}
    assert read_manifest(tmp_path / "good")["status"] == "complete"

    assert cli("quantize", tmp_path / "bad", tmp_path / "bad-int4", *common) == 5
    out, err = capsys.readouterr()
    bad = json.loads(out)
    # the parent is the same function: same perplexity; the quantized one is far off
    assert bad["parent"]["ppl"] == pytest.approx(good["parent"]["ppl"], rel=1e-4)
    assert bad["quantized"]["ppl_increase_pct"] > 50 and bad["gate"]["passed"] is False
    assert bad["status"] == "failed-gate"
    last = err.strip().splitlines()[-1]
    assert last.startswith("glmctl: error:") and "--max-ppl-increase 5.0%" in last and "failed-gate" in last
    assert "Traceback" not in err
    m = read_manifest(tmp_path / "bad-int4")  # kept, readable, marked
    assert m["status"] == "failed-gate" and m["summary"]["quantize"]["gate"]["passed"] is False
    load_model(tmp_path / "bad-int4")
    # --if-stale: same inputs and options -> nothing redone, the gate verdict is repeated
    before = (tmp_path / "bad-int4" / "manifest.json").stat().st_mtime_ns
    assert cli("quantize", tmp_path / "bad", tmp_path / "bad-int4", *common, "--if-stale") == 5
    assert (tmp_path / "bad-int4" / "manifest.json").stat().st_mtime_ns == before
    assert json.loads(capsys.readouterr().out)["skipped"] is True


# ---- bad input -----------------------------------------------------------------------------
def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glmctl: error:"), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_already_quantized_input_is_rejected(random_ckpt, capsys):
    assert cli("quantize", random_ckpt / "model", random_ckpt / "q", "--bits", "8") == 0
    capsys.readouterr()
    assert cli("quantize", random_ckpt / "q", random_ckpt / "qq", "--bits", "4") == 3
    one_line_error(capsys, str(random_ckpt / "q"), "already quantized")
    assert not (random_ckpt / "qq").exists()


def test_unsupported_bit_width(random_ckpt, capsys):
    assert cli("quantize", random_ckpt / "model", random_ckpt / "q", "--bits", "3") == 2
    one_line_error(capsys, "unsupported bit width 3", "4 or 8")
    assert not (random_ckpt / "q").exists()


def test_group_size_not_dividing_columns(random_ckpt, capsys):
    assert cli("quantize", random_ckpt / "model", random_ckpt / "q", "--bits", "4", "--group-size", "48") == 2
    one_line_error(capsys, "group size 48", "64 input columns")
    assert cli("quantize", random_ckpt / "model", random_ckpt / "q", "--bits", "4", "--compare", "rtn:g100") == 2
    one_line_error(capsys, "group size 100")
    assert not (random_ckpt / "q").exists()


def test_other_usage_errors(random_ckpt, capsys):
    m, q = random_ckpt / "model", random_ckpt / "q"
    assert cli("quantize", m, q, "--method", "gptq") == 2
    one_line_error(capsys, "--calibration")
    assert cli("quantize", m, q, "--method", "awq") == 2
    one_line_error(capsys, "unknown method 'awq'")
    assert cli("quantize", m, q, "--max-ppl-increase", "1") == 2
    one_line_error(capsys, "--max-ppl-increase needs evaluation tokens")
    assert cli("quantize", m, q, "--eval", random_ckpt / "tokens", "--compare", "int3") == 2
    one_line_error(capsys, "'int3'")
    write_tokens(random_ckpt / "big", [np.full(100, 600)])  # ids beyond the tiny vocab of 512
    assert cli("quantize", m, q, "--eval", random_ckpt / "big", "--seq-len", "32") == 3
    one_line_error(capsys, "token id 600", "vocabulary of 512")
    assert not q.exists()


def test_tp2_source_is_quantized_at_tp1_and_group_scales_reshard(random_ckpt):
    """A TP=2 source gives the same TP=1 output as its TP=1 original; with G | in/TP the output
    reshards to TP=2 and back without requantising (GLM-130B's per-slice scales are G = in/TP)."""
    m = random_ckpt / "model"
    assert cli("convert", m, random_ckpt / "tp2", "--tp", "2", "--no-verify") == 0
    assert json.loads((random_ckpt / "tp2" / "config.json").read_text())["tensor_parallel_size"] == 2
    assert cli("quantize", m, random_ckpt / "q1", "--bits", "4", "--group-size", "32") == 0
    assert cli("quantize", random_ckpt / "tp2", random_ckpt / "q2", "--bits", "4", "--group-size", "32") == 0
    cfg2, sd2 = read_state_dict(random_ckpt / "q2")
    _, sd1 = read_state_dict(random_ckpt / "q1")
    assert cfg2.tensor_parallel_size == 1 and sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert cli("convert", random_ckpt / "q2", random_ckpt / "q2-tp2", "--tp", "2", "--no-verify") == 0
    _, back = read_state_dict(random_ckpt / "q2-tp2", 1, 0)
    assert all(torch.equal(sd1[k], back[k]) for k in sd1)
