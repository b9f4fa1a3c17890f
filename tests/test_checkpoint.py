"""Native checkpoints: exact round trips, TP=2 == TP=1 under torchrun, damaged files."""
import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_glmctl, torchrun
from glmctl.checkpoint import load_model, read_state_dict, save_model
from glmctl.config import get_preset
from glmctl.errors import InputError
from glmctl.model import GLM
from glmctl.model.masks import prefix_lm_mask
from glmctl import tp_layout


def tiny(seed=7):
    cfg = get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
    return GLM(cfg).init_weights(seed=seed).eval()


def test_save_load_roundtrip_is_exact(tmp_path):
    m = tiny()
    save_model(m, tmp_path / "ck")
    assert (tmp_path / "ck" / "manifest.json").exists()
    m2 = load_model(tmp_path / "ck")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert {o["path"] for o in manifest["outputs"]} == {"config.json", "model.safetensors"}


def test_load_with_dtype(tmp_path):
    m = tiny()
    save_model(m, tmp_path / "ck")
    m16 = load_model(tmp_path / "ck", dtype="bf16")
    assert m16.transformer.word_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(m16.transformer.word_embeddings.weight, m.transformer.word_embeddings.weight.bfloat16())


def test_shard_merge_rules_roundtrip():
    m = tiny()
    for name, t in m.state_dict().items():
        for tp in (2, 4):
            shards = [tp_layout.shard_tensor(name, t, tp, r) for r in range(tp)]
            assert torch.equal(tp_layout.merge_tensors(name, shards), t), name
    # GLU: rank r holds [rows r of first half ; rows r of second half]
    w = torch.arange(8.0)[:, None]
    s0 = tp_layout.shard_tensor("transformer.layers.0.mlp.dense_h_to_4h.weight", w, 2, 0)
    assert s0.flatten().tolist() == [0, 1, 4, 5]


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_equals_tp1_under_torchrun(tmp_path):
    script = REPO / "tests" / "scripts" / "tp_forward.py"
    r = torchrun(script, 2, tmp_path, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = torchrun(script, 1, tmp_path, 1)
    assert r1.returncode == 0, r1.stderr[-3000:]
    tp2, tp1 = torch.load(tmp_path / "tp2.pt"), torch.load(tmp_path / "tp1.pt")
    torch.testing.assert_close(tp2["logits"], tp1["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tp2["incremental"], tp1["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(tp2["reloaded"], tp2["logits"])
    torch.testing.assert_close(tp2["dense_bias_grad"], tp1["dense_bias_grad"], rtol=1e-4, atol=1e-6)
    # the TP=2 checkpoint has one file per rank, and loads merged in one process
    ck = tmp_path / "ckpt-tp2"
    assert sorted(p.name for p in ck.glob("*.safetensors")) == ["model-tp00-of-02.safetensors",
                                                                "model-tp01-of-02.safetensors"]
    merged = load_model(ck)
    cfg, sd1 = read_state_dict(tmp_path / "ckpt-tp1")
    for k, v in merged.state_dict().items():
        assert torch.equal(v, sd1[k]), k
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = merged(tokens, torch.arange(10).expand(2, 10), prefix_lm_mask(10, 4))
    torch.testing.assert_close(out, tp1["logits"], rtol=1e-5, atol=1e-5)


def test_damaged_checkpoints_give_one_line(tmp_path):
    m = tiny()
    save_model(m, tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors"):
        load_model(tmp_path / "ck")
    r = run_glmctl("inspect", tmp_path / "ck")
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "model.safetensors" in r.stderr
    # malformed config.json
    save_model(m, tmp_path / "ck2")
    (tmp_path / "ck2" / "config.json").write_text("{not json")
    r = run_glmctl("inspect", tmp_path / "ck2")
    assert r.returncode == 3 and "config.json" in r.stderr and "Traceback" not in r.stderr
    # incomplete: no manifest
    save_model(m, tmp_path / "ck3")
    (tmp_path / "ck3" / "manifest.json").unlink()
    with pytest.raises(InputError, match="incomplete"):
        load_model(tmp_path / "ck3")
    # a tensor of the wrong shape
    save_model(m, tmp_path / "ck4")
    cfg = json.loads((tmp_path / "ck4" / "config.json").read_text())
    cfg["inner_hidden_size"] = 64
    (tmp_path / "ck4" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="has shape"):
        load_model(tmp_path / "ck4")


def test_sharded_index_roundtrip(tmp_path):
    m = tiny()
    save_model(m, tmp_path / "ck", max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "ck").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "ck" / "model.safetensors.index.json").exists()
    m2 = load_model(tmp_path / "ck")
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
