"""`glmctl convert BASE --merge-adapter ADAPTER OUT` (the same merge as `finetune --merge`) and
trainable LayerNorms (`--train-norms`): saved in the adapter, applied on load and on merge."""
import json

import pytest
import torch
from safetensors import safe_open

from conftest import run_glmctl
from test_finetune import ENV, base, batch_of, finetune, forward, one_thread  # noqa: F401 - fixtures
from glmctl import adapters
from glmctl.checkpoint import load_model
from glmctl.kernels import dequantize, quantize_rtn
from glmctl.session import open_model


def make_adapter(model_dir, out, norms=False, seed=0, rank=4):
    """A LoRA adapter on ``model_dir`` with random A, B (and LayerNorms moved off the base's)."""
    model = load_model(model_dir, dtype="fp32")
    spec = adapters.AdapterSpec("lora", lora=adapters.LoraSpec(rank=rank, alpha=8), norms=norms, seed=seed)
    adapters.attach(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapters.adapter_state(model).items():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if adapters.is_norm_param(n) else 0.05))
    return adapters.save_adapter(model, spec, model_dir, out)


def logits(model, b):
    with torch.no_grad():
        return forward(model.float(), b)


@pytest.mark.parametrize("norms", [False, True])
def test_convert_merge_adapter_equals_base_plus_adapter(base, tmp_path, norms):
    ad = make_adapter(base / "model", tmp_path / "ad", norms=norms)
    r = run_glmctl("convert", base / "model", tmp_path / "merged", "--merge-adapter", ad, "--json", env=ENV)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["merged_adapter"] == str(ad) and s["verify"]["max_logit_diff"] <= 1e-5
    merged = load_model(tmp_path / "merged")
    assert merged.config.quantization is None and not any("lora" in k for k in merged.state_dict())
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    b = batch_of(base / "model")
    unmerged = open_model(base / "model", dtype="fp32", adapter=ad).model
    plain = load_model(base / "model", dtype="fp32")
    torch.testing.assert_close(logits(merged, b), logits(unmerged, b), rtol=0, atol=1e-5)
    assert (logits(plain, b) - logits(unmerged, b)).abs().max() > 1e-3  # the adapter does something
    # the merged weights: W + (alpha / r) B A from the adapter file, in float64
    with safe_open(str(ad / adapters.ADAPTER_WEIGHTS), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    name = "transformer.layers.1.mlp.dense_4h_to_h"
    delta = t[f"{name}.lora.B"].double() @ t[f"{name}.lora.A"].double()
    want = plain.get_submodule(name).weight.double() + 2.0 * delta
    torch.testing.assert_close(merged.get_submodule(name).weight.double(), want, rtol=0, atol=1e-6)
    ln = "transformer.layers.0.input_layernorm.weight"
    assert (ln in t) == norms
    expect_ln = t[ln] if norms else plain.state_dict()[ln]
    assert torch.equal(merged.state_dict()[ln], expect_ln)  # trained norms are merged as they are


def test_convert_merge_adapter_on_int4_full_or_requantized(base, tmp_path):
    ad = make_adapter(base / "model-int4", tmp_path / "ad")
    b = batch_of(base / "model")
    unmerged = logits(open_model(base / "model-int4", dtype="fp32", adapter=ad).model, b)
    r = run_glmctl("convert", base / "model-int4", tmp_path / "full", "--merge-adapter", ad, env=ENV)
    assert r.returncode == 0, r.stderr
    full = load_model(tmp_path / "full")
    assert full.config.quantization is None
    assert full.get_submodule("transformer.layers.0.mlp.dense_h_to_4h").weight.is_floating_point()
    torch.testing.assert_close(logits(full, b), unmerged, rtol=0, atol=1e-4)
    r = run_glmctl("convert", base / "model-int4", tmp_path / "q", "--merge-adapter", ad, "--merge-precision",
                   "quantized", "--json", env=ENV)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verify"]["tolerance"] is None  # re-quantized: reported, not gated
    q = load_model(tmp_path / "q")
    base_q = load_model(base / "model-int4")
    assert q.config.quantization == base_q.config.quantization
    # each weight: RTN of dequant(W) + (alpha / r) B A with the base's bits and group size
    name = "transformer.layers.0.attention.query_key_value"
    with safe_open(str(ad / adapters.ADAPTER_WEIGHTS), framework="pt") as f:
        a, bm = f.get_tensor(f"{name}.lora.A"), f.get_tensor(f"{name}.lora.B")
    layer = base_q.get_submodule(name)
    w = dequantize(layer.weight, layer.weight_scale, 4, torch.float64) + 2.0 * (bm.double() @ a.double())
    wq, sc = quantize_rtn(w.float(), 4, 32, scale_dtype=layer.weight_scale.dtype)
    got = q.get_submodule(name)
    assert torch.equal(got.weight, wq) and torch.equal(got.weight_scale, sc)
    # closer to the unmerged model than the base is
    err = (logits(q, b) - unmerged).abs().max()
    assert err < (logits(base_q, b) - unmerged).abs().max(), err


def test_convert_merge_adapter_bad_input(base, tmp_path):
    ad = make_adapter(base / "model", tmp_path / "ad")
    r = run_glmctl("convert", base / "model-int4", tmp_path / "x", "--merge-adapter", ad, env=ENV)
    assert r.returncode == 3 and "wrong base checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()
    pt = adapters.AdapterSpec("ptuning", prefix=adapters.PrefixSpec(length=2))
    model = load_model(base / "model")
    adapters.attach(model, pt)
    adapters.save_adapter(model, pt, base / "model", tmp_path / "pt")
    r = run_glmctl("convert", base / "model", tmp_path / "x", "--merge-adapter", tmp_path / "pt", env=ENV)
    assert r.returncode == 3 and "P-tuning" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_glmctl("convert", base / "model", tmp_path / "x", "--merge-adapter", tmp_path / "nothing", env=ENV)
    assert r.returncode == 3 and "not an adapter directory" in r.stderr, r.stderr
    r = run_glmctl("convert", base / "model", tmp_path / "x", "--merge-adapter", ad, "--to", "hf", env=ENV)
    assert r.returncode == 2 and "--merge-adapter: drop --to" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_train_norms_trains_saves_and_applies_the_layernorms(base, tmp_path):
    out = tmp_path / "ln"
    res = finetune(base / "model", out, steps=4, lr=1e-2, lora_rank=2, train_norms=True, merge=True)
    plain = load_model(base / "model", dtype="fp32")
    lns = {k: v for k, v in plain.state_dict().items() if "layernorm" in k}
    lora_only = finetune(base / "model", tmp_path / "lo", steps=1, lora_rank=2).summary["trainable_parameters"]
    assert res.summary["trainable_parameters"] == lora_only + sum(v.numel() for v in lns.values())
    with safe_open(str(out / "final" / adapters.ADAPTER_WEIGHTS), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert set(lns) <= set(stored) and any(not torch.equal(stored[k], v) for k, v in lns.items())
    assert json.loads((out / "final" / adapters.ADAPTER_CONFIG).read_text())["norms"] is True
    # on load the trained norms replace the base's; the base checkpoint itself is unchanged
    adapted = open_model(base / "model", dtype="fp32", adapter=out).model
    assert all(torch.equal(adapted.state_dict()[k], stored[k]) for k in lns)
    assert all(torch.equal(load_model(base / "model", dtype="fp32").state_dict()[k], v) for k, v in lns.items())
    b = batch_of(base / "model")
    torch.testing.assert_close(logits(load_model(out / "merged"), b), logits(adapted, b), rtol=0, atol=1e-5)
    # only adapter parameters and the LayerNorms receive gradients
    adapters.freeze_base(adapted)
    adapted.train()
    out_ = forward(adapted, b)
    torch.nn.functional.cross_entropy(out_[b["loss_mask"]], b["targets"][b["loss_mask"]]).backward()
    for n, p in adapted.named_parameters():
        assert (p.grad is not None) == (adapters.is_adapter_param(n) or "layernorm" in n), n
    r = run_glmctl("finetune", base / "model", "--data", "numerals_zh", "--out", tmp_path / "f", "--method", "full",
                   "--train-norms", env=ENV)
    assert r.returncode == 2 and "--train-norms / --train-tokens are for adapters" in r.stderr, r.stderr


def test_train_tokens_and_embedding_lora_start_at_the_base_save_load_and_merge(base, tmp_path):
    from glmctl import finetune_data as fd
    from glmctl import finetune_tasks
    from glmctl.tokenizer import Tokenizer
    b = batch_of(base / "model")
    plain = load_model(base / "model", dtype="fp32")
    ref = logits(plain, b)
    spec = adapters.AdapterSpec("lora", lora=adapters.LoraSpec(rank=2, alpha=4, targets=("dense", "word_embeddings")),
                                token_ids=(3, 5, 7))
    fresh = load_model(base / "model", dtype="fp32")
    adapters.attach(fresh, spec)
    assert torch.equal(logits(fresh, b), ref)  # B = 0 and zero row deltas: exactly the base
    out = tmp_path / "tok"
    res = finetune(base / "model", out, steps=4, lr=1e-2, lora_rank=2, lora_targets=("dense", "word_embeddings"),
                   train_tokens=True, merge=True)
    # the rows: every token of the training split's laid-out examples, plus sop and eop
    tok, ids = Tokenizer.load(base / "model"), plain.config.special_token_ids()
    want = {ids["sop"], ids["eop"]}
    for line in finetune_tasks.lines("train"):
        rec = json.loads(line)
        want |= set(fd.with_mask(tok.encode(rec["prompt"]), ids)) | set(tok.encode(rec["target"], allow_special=False))
    cfg = json.loads((out / "final" / adapters.ADAPTER_CONFIG).read_text())
    assert cfg["token_ids"] == sorted(want)
    with safe_open(str(out / "final" / adapters.ADAPTER_WEIGHTS), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    h, vocab = plain.config.hidden_size, plain.config.vocab_size
    rows = t["transformer.word_embeddings.token_rows.delta"]
    assert rows.shape == (len(want), h) and rows.abs().sum(1).min() > 0  # every row trained
    a, bm = t["transformer.word_embeddings.lora.A"], t["transformer.word_embeddings.lora.B"]
    assert a.shape == (2, vocab) and bm.shape == (h, 2)
    lora_linear = plain.config.num_layers * 2 * 2 * h  # dense: A [2, h] + B [h, 2] per layer
    assert res.summary["trainable_parameters"] == lora_linear + 2 * (vocab + h) + len(want) * h
    # the adapted embedding, from the stored tensors in float64: E + rows + (alpha / r) (B A)^T
    e = plain.transformer.word_embeddings.weight.double().clone()
    e[sorted(want)] += rows.double()
    e += cfg["lora"]["alpha"] / cfg["lora"]["rank"] * (bm.double() @ a.double()).T
    adapted = open_model(base / "model", dtype="fp32", adapter=out).model
    torch.testing.assert_close(adapted.transformer.word_embeddings.weight.double(), e, rtol=0, atol=1e-6)
    assert torch.equal(adapted.state_dict()["transformer.word_embeddings.weight"],
                       plain.state_dict()["transformer.word_embeddings.weight"])  # the base tensor is untouched
    merged = load_model(out / "merged")
    torch.testing.assert_close(merged.transformer.word_embeddings.weight.double(), e, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(merged, b), logits(adapted, b), rtol=0, atol=1e-5)
    # the INT4 checkpoint's embedding is floating point here, so rows train on it too
    res = finetune(base / "model-int4", tmp_path / "q", steps=2, lr=1e-2, lora_rank=2, train_tokens=True)
    assert res.summary["trainable_parameters"] > 0
