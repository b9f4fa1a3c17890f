"""glmctl quantize --embedding-bits: the tied embedding/output layer quantized too. The written
checkpoint's logits equal an fp model holding the independently dequantized weights, at any TP
in and out; it loads and generates; the quality report scores the written model, embedding
included; bad options are one line each."""
import json

import pytest
import torch

from glmctl.artifacts import read_manifest
from glmctl.checkpoint import load_model, read_state_dict, save_model
from glmctl.generation import GenerationConfig
from glmctl.model.masks import prefix_lm_mask
from test_generate import ckpt, direct, run_stage, tok  # noqa: F401 - fixtures (tiny model with a tokenizer)
from test_quantize import cli, dequant_np, direct_ppl, one_line_error, random_ckpt, toy_stream, trained, \
    write_tokens  # noqa: F401 - fixtures

EMB = "transformer.word_embeddings.weight"
LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def dequantized_state(sd: dict, cfg) -> dict:
    """An fp32 state dict with every quantized tensor replaced by q * s (numpy, not the kernels')."""
    q = cfg.quantization
    out = {k: v for k, v in sd.items() if not k.endswith("_scale")}
    for i in range(cfg.num_layers):
        for n in LINEARS:
            key = f"transformer.layers.{i}.{n}.weight"
            out[key] = dequant_np(sd[key], sd[key + "_scale"], q["bits"])
    if q.get("embedding"):
        out[EMB] = dequant_np(sd[EMB], sd[EMB + "_scale"], q["embedding"]["bits"])
    return out


def reference_model(parent, sd, cfg):
    ref = type(parent)(parent.config)
    ref.load_state_dict(dequantized_state(sd, cfg))
    return ref.eval()


@pytest.mark.parametrize("bits,group,tp", [(8, None, 1), (4, 16, 2)])
def test_written_embedding_equals_dequantized_reference(random_ckpt, bits, group, tp):  # noqa: F811
    m, q = random_ckpt / "model", random_ckpt / "q"
    args = ["quantize", m, q, "--bits", "4", "--group-size", "32", "--embedding-bits", bits, "--tp", tp, "--no-report"]
    if group:
        args += ["--embedding-group-size", group]
    assert cli(*args) == 0
    qcfg = json.loads((q / "config.json").read_text())
    assert qcfg["quantization"]["embedding"] == {"bits": bits, "group_size": group}
    assert qcfg["tensor_parallel_size"] == tp
    assert read_manifest(q)["summary"]["quantize"]["embedding"] == {"bits": bits, "group_size": group}
    parent = load_model(m)
    cfg, sd = read_state_dict(q)  # TP=1, merged from the written ranks
    w = parent.state_dict()[EMB]
    e, s = sd[EMB], sd[EMB + "_scale"]
    assert e.dtype == torch.int8 and e.shape == (512, 64 // (2 if bits == 4 else 1))
    assert s.dtype == torch.float16 and s.shape == ((512, 64 // group) if group else (512,))
    # scales by a direct loop: fp16(absmax of the fp16 weight / qmax), per row or group
    qmax, g = 2 ** (bits - 1) - 1, group or 64
    wh = w.half()
    for r in range(0, 512, 37):
        for j in range(64 // g):
            want = (wh[r, j * g:(j + 1) * g].abs().max() / qmax).item()
            assert (s[r, j] if group else s[r]).item() == want
    deq = dequant_np(e, s, bits)
    step = s.float()[:, None] if not group else s.float().repeat_interleave(g, dim=1)
    # round to nearest of the fp16 quotient: within half a step, plus its fp16 rounding (qmax * 2^-11 steps)
    assert ((deq - wh.float()).abs() <= step * (0.5 + qmax * 2.0 ** -11)).all() and not torch.equal(deq, w)
    # the written model (loaded at TP=1 from TP=tp files) == the fp model of the dequantized weights
    model = load_model(q)
    ref = reference_model(parent, sd, cfg)
    tokens = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(tokens, torch.arange(20).expand(3, -1), prefix_lm_mask(20, 6))
        b = ref(tokens, torch.arange(20).expand(3, -1), prefix_lm_mask(20, 6))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tp2_source_gives_the_tp1_embedding(random_ckpt):  # noqa: F811
    """Embedding rows quantize independently: a TP=2 source gives the TP=1 source's output."""
    m = random_ckpt / "model"
    assert cli("convert", m, random_ckpt / "tp2", "--tp", "2", "--no-verify") == 0
    common = ["--bits", "8", "--embedding-bits", "4", "--tp", "1", "--no-report"]
    assert cli("quantize", m, random_ckpt / "q1", *common) == 0
    assert cli("quantize", random_ckpt / "tp2", random_ckpt / "q2", *common) == 0
    _, sd1 = read_state_dict(random_ckpt / "q1")
    _, sd2 = read_state_dict(random_ckpt / "q2")
    assert sd1.keys() == sd2.keys() and EMB + "_scale" in sd1
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # default INT4 group: the largest <= 128 dividing hidden 64
    assert json.loads((random_ckpt / "q1" / "config.json").read_text())["quantization"]["embedding"] == \
        {"bits": 4, "group_size": 64}


def test_quantized_embedding_checkpoint_generates(ckpt, tok, tmp_path):  # noqa: F811
    q = tmp_path / "q"
    assert cli("quantize", ckpt, q, "--bits", "8", "--embedding-bits", "4", "--embedding-group-size", "32",
               "--tp", "2", "--no-report") == 0
    cfg, sd = read_state_dict(q)
    ref = reference_model(load_model(ckpt), sd, cfg)
    save_model(ref, tmp_path / "ref", tokenizer=ckpt)
    gen = GenerationConfig(max_new_tokens=6)
    prompts = ["Hello [MASK] world", "清华大学"]
    res, _ = run_stage(q, prompts=prompts, generation=gen)
    for rec, prompt in zip(res.records, prompts):
        assert rec["new_tokens"] >= 1
        assert rec["text"] == direct(tmp_path / "ref", tok, prompt, gen)[0]


@pytest.mark.slow
def test_report_scores_the_quantized_embedding(trained, tmp_path, capsys):  # noqa: F811
    stream = toy_stream(63 * 6, 55)
    write_tokens(tmp_path / "eval", [stream])
    code = cli("quantize", trained / "model", tmp_path / "q", "--bits", "8", "--embedding-bits", "4",
               "--embedding-group-size", "16", "--eval", tmp_path / "eval", "--seq-len", "64", "--eval-prefix", "8",
               "--compare", "embfp,emb8", "--json")
    assert code == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["embedding"] == {"bits": 4, "group_size": 16}
    assert rep["embedding_bytes"]["quantized"] < rep["embedding_bytes"]["parent"] / 6
    ppl_q, n = direct_ppl(load_model(tmp_path / "q"), stream, 64, 8)  # the written model, whole
    assert rep["eval"]["scored_tokens"] == n
    assert rep["quantized"]["ppl"] == pytest.approx(ppl_q, rel=1e-5)
    fp_emb, emb8 = rep["compare"]
    assert fp_emb["name"] == "int8 rtn per-row" and "embedding" not in fp_emb
    assert emb8["embedding"] == {"bits": 8, "group_size": None}
    # the numbers move with the embedding's precision: INT4 further from the parent than INT8, INT8 than fp
    assert rep["quantized"]["ppl"] != fp_emb["ppl"]
    assert rep["quantized"]["kl_mean"] > emb8["kl_mean"] > fp_emb["kl_mean"]
    m = read_manifest(tmp_path / "q", stage="quantize")
    assert m["summary"]["quantize"]["quantized"] == rep["quantized"]
    assert m["config"]["model"]["quantization"]["embedding"] == {"bits": 4, "group_size": 16}


def test_embedding_option_errors(random_ckpt, capsys):  # noqa: F811
    m, q = random_ckpt / "model", random_ckpt / "q"
    assert cli("quantize", m, q, "--embedding-bits", "6") == 2
    one_line_error(capsys, "--embedding-bits 6", "4 or 8")
    assert cli("quantize", m, q, "--embedding-group-size", "16") == 2
    one_line_error(capsys, "--embedding-group-size needs --embedding-bits")
    assert cli("quantize", m, q, "--embedding-bits", "4", "--embedding-group-size", "48") == 2
    one_line_error(capsys, "embedding group size 48", "hidden size 64")
    assert cli("quantize", m, q, "--eval", random_ckpt / "tokens", "--compare", "emb5") == 2
    one_line_error(capsys, "'emb5'")
    assert not q.exists()
