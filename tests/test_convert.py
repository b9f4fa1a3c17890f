"""glmctl convert: SAT import at any TP, exact reshard chains, bit-exact SAT round trips, quantized
checkpoints without requantising, DeepSpeed ZeRO-2 gathering, verification, and bad input.

The SAT checkpoints here are written by the tests themselves with torch.save and the split rules
of docs/glm130b.md §6.3 coded directly below (not glmctl.tp_layout), and logits are compared with a model
built from the original weights.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port
from glmctl import cli
from glmctl.checkpoint import load_model, save_model
from glmctl.config import get_preset
from glmctl.errors import GlmctlError, InputError, UsageError
from glmctl.formats import describe_checkpoint
from glmctl.kernels import dequantize, quantize_rtn
from glmctl.model import GLM
from glmctl.model.masks import prefix_lm_mask
from glmctl.stages import convert as C

ITER = "49300"


# ---- fixtures written straight from the spec ------------------------------------------------------
def tiny_cfg():
    return get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)


def tiny(seed=1, cfg=None):
    return GLM(cfg or tiny_cfg()).init_weights(seed=seed).eval()


def spec_shard(name, t, tp, r):
    """Spec §6.3: QKV/embedding rows, dense/4h_to_h columns, h_to_4h half by half, rest replicated."""
    if tp == 1:
        return t
    if name.endswith(("layernorm.weight", "layernorm.bias", "attention.dense.bias", "dense_4h_to_h.bias",
                      "rotary_emb.inv_freq")):
        return t
    if "dense_h_to_4h" in name:
        half = t.shape[0] // 2
        c = half // tp
        return torch.cat([t[r * c:(r + 1) * c], t[half + r * c:half + (r + 1) * c]])
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        c = t.shape[1] // tp
        return t[:, r * c:(r + 1) * c]
    c = t.shape[0] // tp
    return t[r * c:(r + 1) * c]


def spec_merge(name, shards):
    tp = len(shards)
    if tp == 1 or name.endswith(("layernorm.weight", "layernorm.bias", "attention.dense.bias",
                                 "dense_4h_to_h.bias", "rotary_emb.inv_freq")):
        return shards[0]
    if "dense_h_to_4h" in name:
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        return torch.cat(shards, dim=1)
    return torch.cat(shards)


LINEARS = ("query_key_value.weight", "attention.dense.weight", "dense_h_to_4h.weight", "dense_4h_to_h.weight")


def inv_freq(d=16):
    return 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))


def write_sat(root, sd, tp, dtype=torch.float16, bits=None, inv=True, iteration=ITER, extra=None):
    """A SAT checkpoint as GLM-130B's convert_tp.py writes one; quantized: per rank, per row (docs/glm130b.md §7.1)."""
    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    (root / iteration).mkdir(parents=True)
    (root / "latest").write_text(iteration + "\n")
    for r in range(tp):
        mod = {}
        for k, v in sd.items():
            local = spec_shard(k, v, tp, r).to(dtype).clone()
            if bits and k.endswith(LINEARS):
                q, s = quantize_rtn(local, bits)
                mod[k], mod[k + "_scale"] = q, s
            else:
                mod[k] = local
            if inv and k.endswith("attention.dense.bias"):
                mod[k.replace("dense.bias", "rotary_emb.inv_freq")] = inv_freq().to(dtype)
        torch.save({"module": mod, **(extra or {})}, root / iteration / f"mp_rank_{r:02d}_model_states.pt")
    return root


def read_sat(root):
    root = Path(root)
    it = (root / "latest").read_text().strip()
    files = sorted((root / it).glob("mp_rank_*_model_states.pt"))
    return it, [torch.load(f, weights_only=True)["module"] for f in files]


def probe(cfg, seed=0, s=20, prefix=8):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, cfg.vocab_size - 64, (2, s), generator=g)
    tok[:, prefix - 1] = cfg.gmask_token_id
    return tok, torch.arange(s)[None].expand(2, s), prefix_lm_mask(s, prefix)


def logits(model, cfg):
    with torch.no_grad():
        return model(*probe(cfg)).float()


def float_model(cfg, sd):
    m = GLM(cfg, device="meta", dtype=torch.float32)
    m.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    return m.eval()


def convert(src, out, **kw):
    """The summary of one conversion (StageResult.summary)."""
    kw.setdefault("verify", False)
    result = C.run(C.ConvertConfig(src=str(src), out=str(out), **kw))
    assert result.status == "complete" and result.out == Path(out)
    return result.summary


def cli_run(capsys, *argv):
    capsys.readouterr()  # drop what earlier calls printed
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def safetensors_state(path):
    from safetensors.torch import load_file
    return {p.name: load_file(p) for p in sorted(Path(path).glob("*.safetensors"))}


# ---- SAT import ----------------------------------------------------------------------------------
def test_sat_import_at_tp_1_2_4_gives_the_same_logits(tmp_path):
    m = tiny()
    sd16 = {k: v.half() for k, v in m.state_dict().items()}
    cfg = tiny_cfg().replace(rope="sat")  # a SAT import runs SAT's rotary rule (docs/glm130b.md §2.3)
    want = logits(float_model(cfg, sd16), cfg)  # the fp16 weights, run in fp32
    for tp in (1, 2, 4):
        write_sat(tmp_path / f"sat{tp}", sd16, tp)
        res = convert(tmp_path / f"sat{tp}", tmp_path / f"out{tp}", preset="tiny")
        assert res["source_tp"] == tp and res["tp"] == tp
        got = logits(load_model(tmp_path / f"out{tp}", dtype=torch.float32), cfg)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (tp, (got - want).abs().max())
        out_cfg = json.loads((tmp_path / f"out{tp}" / "config.json").read_text())
        assert out_cfg["tensor_parallel_size"] == tp and out_cfg["num_attention_heads"] == 4
        assert out_cfg["gmask_token_id"] == cfg.gmask_token_id
    # rank files hold exactly the spec's slices (GLU half by half)
    files = safetensors_state(tmp_path / "out2")
    name = "transformer.layers.1.mlp.dense_h_to_4h.weight"
    for r in range(2):
        assert torch.equal(files[f"model-tp{r:02d}-of-02.safetensors"][name], spec_shard(name, sd16[name], 2, r))


def test_sat_head_count_from_inv_freq_and_preset_mismatch(tmp_path, capsys):
    m = tiny()
    sd16 = {k: v.half() for k, v in m.state_dict().items()}
    write_sat(tmp_path / "sat", sd16, 2)
    convert(tmp_path / "sat", tmp_path / "o")  # 16-dim heads from inv_freq -> 4 heads
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_attention_heads"] == 4
    code, _, err = cli_run(capsys, "convert", tmp_path / "sat", tmp_path / "o2", "--preset", "small")
    assert code == 3 and "preset small does not match" in err and "transformer." in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()
    write_sat(tmp_path / "sat_noinv", sd16, 2, inv=False)
    code, _, err = cli_run(capsys, "convert", tmp_path / "sat_noinv", tmp_path / "o3")
    assert code == 2 and "--num-attention-heads" in err and not (tmp_path / "o3").exists()
    code, _, err = cli_run(capsys, "convert", tmp_path / "sat_noinv", tmp_path / "o3", "--num-attention-heads", "4",
                           "--no-verify")
    assert code == 0, err


# ---- native resharding ---------------------------------------------------------------------------
def test_native_tp1_2_4_1_is_exact(tmp_path):
    m = tiny(seed=4)
    save_model(m, tmp_path / "tp1")
    convert(tmp_path / "tp1", tmp_path / "tp2", tp=2)
    convert(tmp_path / "tp2", tmp_path / "tp4", tp=4)
    convert(tmp_path / "tp4", tmp_path / "back", tp=1)
    back = safetensors_state(tmp_path / "back")["model.safetensors"]
    orig = m.state_dict()
    assert set(back) == set(orig)
    for k, v in orig.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    tp4 = safetensors_state(tmp_path / "tp4")
    for k, v in orig.items():
        for r in range(4):
            assert torch.equal(tp4[f"model-tp{r:02d}-of-04.safetensors"][k], spec_shard(k, v, 4, r)), (k, r)


def test_pretrain_run_dir_uses_latest_and_dtype_cast_verifies(tmp_path):
    m = tiny(seed=5)
    run = tmp_path / "run"
    save_model(m, run / "step-00000010", stage="pretrain")
    save_model(tiny(seed=6), run / "step-00000020", stage="pretrain")
    (run / "latest").write_text("step-00000010\n")
    res = convert(run, tmp_path / "bf16", dtype="bf16", verify=True)
    assert res["verify"]["max_logit_diff"] > 0  # bf16 rounding is visible ...
    assert res["verify"]["max_logit_diff"] <= res["verify"]["tolerance"]  # ... and within tolerance
    sd = load_model(tmp_path / "bf16").state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v.bfloat16()), k  # the step named by `latest`, not the newest


def test_small_shard_size_writes_an_index(tmp_path):
    m = tiny()
    save_model(m, tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "b", tp=2, max_shard_size="40KiB", verify=True)
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 2
    sd = load_model(tmp_path / "b").state_dict()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


# ---- SAT export ------------------------------------------------------------------------------------
def test_sat_round_trip_is_bit_exact(tmp_path):
    sd16 = {k: v.half() for k, v in tiny(seed=2).state_dict().items()}
    write_sat(tmp_path / "sat", sd16, 2)
    it0, orig = read_sat(tmp_path / "sat")
    convert(tmp_path / "sat", tmp_path / "glm", preset="tiny", tp=4)
    convert(tmp_path / "glm", tmp_path / "sat4", to="sat")
    convert(tmp_path / "sat4", tmp_path / "glm2")  # config recorded by glmctl's export: no --preset
    convert(tmp_path / "glm2", tmp_path / "back", to="sat", tp=2, verify=True)
    it, back = read_sat(tmp_path / "back")
    assert it == it0 == ITER and len(back) == 2
    for r in range(2):
        assert list(back[r]) != [] and set(back[r]) == set(orig[r])
        for k, v in orig[r].items():
            assert back[r][k].dtype == v.dtype and torch.equal(back[r][k], v), (r, k)


def test_export_of_a_trained_model_adds_sat_rotary_buffers(tmp_path):
    m = tiny(seed=3)
    save_model(m, tmp_path / "glm")
    convert(tmp_path / "glm", tmp_path / "sat", to="sat", tp=2, iteration="1000")
    it, shards = read_sat(tmp_path / "sat")
    assert it == "1000"
    for r in range(2):
        assert torch.equal(shards[r]["transformer.layers.1.attention.rotary_emb.inv_freq"], inv_freq())
        for k, v in m.state_dict().items():
            assert torch.equal(shards[r][k], spec_shard(k, v, 2, r)), k


# ---- quantized checkpoints ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_sat_imports_and_reshards_without_requantising(tmp_path, bits):
    cfg = tiny_cfg()
    sd16 = {k: v.half() for k, v in tiny(seed=8).state_dict().items()}
    write_sat(tmp_path / "sat", sd16, 2, bits=bits)
    _, shards = read_sat(tmp_path / "sat")
    # reference: dequantize each rank's slice (docs/glm130b.md §7.1) and assemble the float model
    ref_sd = {}
    for k in sd16:
        if k.endswith(LINEARS):
            ref_sd[k] = spec_merge(k, [dequantize(s[k], s[k + "_scale"], bits) for s in shards])
        else:
            ref_sd[k] = spec_merge(k, [s[k] for s in shards])
    want = logits(float_model(cfg, ref_sd), cfg)
    convert(tmp_path / "sat", tmp_path / "q2", preset="tiny")
    q = json.loads((tmp_path / "q2" / "config.json").read_text())["quantization"]
    assert q["bits"] == bits and q["group_size"] == 32  # per-rank rows: in/TP = 32 (dense), 64 (4h_to_h)
    got = logits(load_model(tmp_path / "q2", dtype=torch.float32), cfg)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    for tp in (1, 4):
        convert(tmp_path / "q2", tmp_path / f"q{tp}", tp=tp, verify=True)
        assert torch.equal(logits(load_model(tmp_path / f"q{tp}", dtype=torch.float32), cfg), got), tp
    # int8 weights are never recomputed: TP4's rank files are slices of the SAT ones
    files = safetensors_state(tmp_path / "q4")
    name = "transformer.layers.0.attention.dense.weight"
    merged = spec_merge(name, [s[name] for s in shards])
    for r in range(4):
        assert torch.equal(files[f"model-tp{r:02d}-of-04.safetensors"][name], spec_shard(name, merged, 4, r))
    # back to SAT at the TP it was quantized for: bit for bit; at TP=1 SAT cannot hold the scales
    convert(tmp_path / "q4", tmp_path / "back", to="sat", tp=2)
    _, back = read_sat(tmp_path / "back")
    for r in range(2):
        assert set(back[r]) == set(shards[r])
        assert all(torch.equal(back[r][k], v) and back[r][k].dtype == v.dtype for k, v in shards[r].items())
    with pytest.raises(UsageError, match="without requantising"):
        convert(tmp_path / "q4", tmp_path / "bad", to="sat", tp=1)
    assert not (tmp_path / "bad").exists()


def test_quantized_native_per_row_round_trip_and_group_regrouping(tmp_path):
    cfg = tiny_cfg()
    m = tiny(seed=9)
    for group in (None, 32):
        qcfg = cfg.replace(quantization={"bits": 4, "group_size": group, "method": "rtn"})
        sd = {}
        for k, v in m.state_dict().items():
            if k.endswith(LINEARS):
                sd[k], sd[k + "_scale"] = quantize_rtn(v, 4, group)
            else:
                sd[k] = v
        qm = GLM(qcfg, device="meta")
        qm.load_state_dict(sd, assign=True)
        src = tmp_path / f"g{group}"
        save_model(qm, src)
        want = logits(load_model(src, dtype=torch.float32), cfg)
        convert(src, tmp_path / f"g{group}-tp2", tp=2)
        convert(tmp_path / f"g{group}-tp2", tmp_path / f"g{group}-tp4", tp=4)
        q4 = json.loads((tmp_path / f"g{group}-tp4" / "config.json").read_text())["quantization"]
        assert q4["group_size"] == 16  # dense has 16 input columns per rank at TP=4: finer groups, same values
        assert torch.equal(logits(load_model(tmp_path / f"g{group}-tp4", dtype=torch.float32), cfg), want)
        convert(tmp_path / f"g{group}-tp4", tmp_path / f"g{group}-back", tp=1)
        q1 = json.loads((tmp_path / f"g{group}-back" / "config.json").read_text())["quantization"]
        assert q1["group_size"] == group  # scales merge back to the original granularity
        back = safetensors_state(tmp_path / f"g{group}-back")["model.safetensors"]
        assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


# ---- verification ----------------------------------------------------------------------------------
def test_verify_catches_a_corrupted_tensor_and_keeps_the_old_output(tmp_path, monkeypatch):
    from safetensors import safe_open
    m = tiny(seed=11)
    save_model(m, tmp_path / "src")
    good = convert(tmp_path / "src", tmp_path / "out", tp=2, verify=True)
    assert good["verify"]["max_logit_diff"] == 0.0
    before = (tmp_path / "out" / "manifest.json").read_bytes()

    def corrupt(d):  # overwrite one rank's slice of one weight in place, as a bad disk or a bug would
        f = d / "model-tp01-of-02.safetensors"
        name = "transformer.layers.1.attention.dense.weight"
        header_len = int.from_bytes(f.read_bytes()[:8], "little")
        header = json.loads(f.read_bytes()[8:8 + header_len])
        start, end = header[name]["data_offsets"]
        with open(f, "r+b") as fh:
            fh.seek(8 + header_len + start)
            fh.write(torch.full(((end - start) // 4,), 0.05).numpy().tobytes())
        with safe_open(str(f), framework="pt") as h:
            assert float(h.get_tensor(name).abs().max()) == pytest.approx(0.05)

    verify_output = C.verify_output

    def corrupt_then_verify(src, plan, out_dir, config):  # the files are written, not yet verified
        corrupt(out_dir)
        return verify_output(src, plan, out_dir, config)

    monkeypatch.setattr(C, "verify_output", corrupt_then_verify)
    with pytest.raises(GlmctlError, match="verification failed: max logit difference") as e:
        C.run(C.ConvertConfig(src=str(tmp_path / "src"), out=str(tmp_path / "out"), tp=2, verify=True))
    assert e.value.exit_code == 1
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before  # the earlier output is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left behind


def test_probe_inputs_use_gmask_and_mask(tmp_path):
    cfg = tiny_cfg()
    p = C.probe_inputs(cfg, seed=3)
    assert set(p) == {"[gMASK]", "[MASK]"}
    tok, pos, mask = p["[MASK]"]
    t = tok[0].tolist()
    mi, sop = t.index(cfg.mask_token_id), t.index(cfg.sop_token_id)
    assert 0 < mi < sop - 1 and pos[0, sop:].tolist() == [mi] * (len(t) - sop)  # span sits at its mask
    assert not mask[0, 0, 0, :sop].any() and mask[0, 0, 0, sop:].all()  # bidirectional context only
    tok, pos, _ = p["[gMASK]"]
    assert tok[0].tolist().index(cfg.gmask_token_id) == tok[0].tolist().index(cfg.sop_token_id) - 1
    assert pos[0].tolist() == list(range(tok.shape[1]))


# ---- tokenizer -------------------------------------------------------------------------------------
def _tokenizer(d, pieces):
    import sentencepiece as spm
    from glmctl.tokenizer import SENTENCEPIECE_OPTIONS, Tokenizer, build_meta
    import io
    words = [f"w{i}x{i * 7 % 13}y{i % 5}" for i in range(3000)]
    text = "\n".join(" ".join(words[i:i + 12]) for i in range(0, 3000, 12))
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=proto,
                                   vocab_size=pieces, model_type="bpe", **SENTENCEPIECE_OPTIONS)
    tok = Tokenizer(proto.getvalue(), build_meta(proto.getvalue(), model_type="bpe"))
    tok.save(d)
    return tok


def test_tokenizer_is_attached_and_its_vocab_checked(tmp_path, capsys):
    tok = _tokenizer(tmp_path / "tok", 400)  # 400 pieces + 8 specials -> 512 rows, tiny's vocab
    assert tok.vocab_size == 512
    sd16 = {k: v.half() for k, v in tiny().state_dict().items()}
    write_sat(tmp_path / "sat", sd16, 2)
    convert(tmp_path / "sat", tmp_path / "o", tokenizer=str(tmp_path / "tok"))
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["gmask_token_id"] == tok.gmask_token_id and cfg["eos_token_id"] == tok.eos_token_id
    assert (tmp_path / "o" / "tokenizer.model").read_bytes() == (tmp_path / "tok" / "tokenizer.model").read_bytes()
    _tokenizer(tmp_path / "big", 700)  # 708 -> 768 rows
    code, _, err = cli_run(capsys, "convert", tmp_path / "sat", tmp_path / "o2", "--tokenizer", tmp_path / "big")
    assert code == 3 and "768" in err and "512" in err and not (tmp_path / "o2").exists()


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["no_latest", "rank_gap", "last_rank_missing", "shape_mismatch", "unknown",
                                  "unsafe_pickle", "not_glm"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    sd16 = {k: v.half() for k, v in tiny().state_dict().items()}
    src = write_sat(tmp_path / "sat", sd16, 4 if case == "rank_gap" else 2)
    folder = src / ITER
    expect = {"no_latest": "no `latest` file", "rank_gap": "missing rank file mp_rank_01",
              "last_rank_missing": "mp_rank_01_model_states.pt is missing",
              "shape_mismatch": "transformer.layers.0.attention.dense.weight is [64, 32]",
              "unknown": "unknown checkpoint format", "unsafe_pickle": "weights_only=True",
              "not_glm": "not a GLM checkpoint"}[case]
    if case == "no_latest":
        (src / "latest").unlink()
    elif case == "rank_gap":
        (folder / "mp_rank_01_model_states.pt").unlink()
    elif case == "last_rank_missing":
        (folder / "mp_rank_01_model_states.pt").unlink()
    elif case == "shape_mismatch":
        f = folder / "mp_rank_01_model_states.pt"
        mod = torch.load(f, weights_only=True)["module"]
        mod["transformer.layers.0.attention.dense.weight"] = torch.zeros(64, 16, dtype=torch.float16)
        torch.save({"module": mod}, f)
    elif case == "unknown":
        shutil.rmtree(src)
        src.mkdir()
        (src / "weights.bin").write_bytes(b"\0" * 16)
    elif case == "unsafe_pickle":
        write_sat(src, sd16, 2, extra={"hook": subprocess.CompletedProcess(["x"], 0)})
    elif case == "not_glm":
        write_sat(src, {"encoder.weight": torch.zeros(4, 4)}, 1)
    code, out, err = cli_run(capsys, "convert", src, tmp_path / "out", "--preset", "tiny")
    assert code == 3, err
    assert expect in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == "" and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_tp_is_a_usage_error(tmp_path, capsys):
    save_model(tiny(), tmp_path / "a")
    code, _, err = cli_run(capsys, "convert", tmp_path / "a", tmp_path / "b", "--tp", "3")
    assert code == 2 and "4 attention heads do not split over 3" in err and not (tmp_path / "b").exists()


# ---- inspect -----------------------------------------------------------------------------------------
def test_inspect_describes_sat_and_run_dirs(tmp_path, capsys):
    sd16 = {k: v.half() for k, v in tiny().state_dict().items()}
    write_sat(tmp_path / "sat", sd16, 2, bits=4)
    info = describe_checkpoint(tmp_path / "sat")
    assert info["format"] == "sat" and info["iteration"] == ITER and info["tensor_parallel_size"] == 2
    assert info["quantization"]["bits"] == 4
    assert info["parameters"] == tiny_cfg().num_parameters()
    rows = {(t["name"], t["rank"]): t for t in info["tensors"]}
    assert rows[("transformer.layers.0.attention.dense.weight_scale", 1)]["shape"] == [64]
    assert rows[("transformer.layers.0.attention.query_key_value.weight", 0)]["shape"] == [96, 32]
    save_model(tiny(), tmp_path / "run" / "step-00000005", stage="pretrain")
    (tmp_path / "run" / "latest").write_text("step-00000005\n")
    code, out, err = cli_run(capsys, "inspect", tmp_path / "run", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "pretrain-run" and doc["latest"] == "step-00000005"
    assert doc["steps"] == [{"name": "step-00000005", "complete": True, "deepspeed": False}]
    assert doc["tensor_parallel_size"] == 1 and len(doc["tensors"]) == len(tiny().state_dict())


# ---- DeepSpeed ZeRO-2 -----------------------------------------------------------------------------------
ZERO2_SCRIPT = '''
"""2-process ZeRO-2 pretraining of GLM tiny on CPU, saved in `glmctl pretrain`'s run layout:
RUN/latest, RUN/step-N/ (native checkpoint) with trainer/deepspeed (engine.save_checkpoint, tag "ds")."""
import gc, shutil, sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist
import deepspeed
from glmctl.checkpoint import save_model
from glmctl.config import get_preset
from glmctl.model import GLM
from glmctl.model.masks import prefix_lm_mask

run = Path(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
cfg = get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
model = GLM(cfg).init_weights(seed=3)
ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg,
                                         optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
g = torch.Generator().manual_seed(100 + rank)
s = 16
mask, pos = prefix_lm_mask(s, 4), torch.arange(s)[None].expand(2, s)
for _ in range(3):
    tok = torch.randint(0, 400, (2, s), generator=g)
    logits = engine(tok, pos, mask)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), tok[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()
tmp_trainer = run / ".trainer-tmp"
engine.save_checkpoint(str(tmp_trainer / "deepspeed"), tag="ds")
dist.barrier()
if rank == 0:
    engine.module.eval()
    probe = torch.randint(0, 400, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = engine.module(probe, torch.arange(20)[None], prefix_lm_mask(20, 8))
    torch.save({"tokens": probe, "logits": ref}, run / "in_training_logits.pt")
    save_model(engine.module, run / "step-00000003", stage="pretrain",
               write_extra=lambda d: shutil.move(str(tmp_trainer), str(d / "trainer")))
    (run / "latest").write_text("step-00000003\\n")
dist.barrier()
del engine, opt, model
gc.collect()
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_pretrain_checkpoint_converts_to_the_in_training_logits(tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero2.py"
    script.write_text(ZERO2_SCRIPT)
    run = tmp_path / "run"
    run.mkdir()
    import os
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    exe = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(exe), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port()), str(script), str(run)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = torch.load(run / "in_training_logits.pt", weights_only=True)
    step = run / "step-00000003"
    assert len(list((step / "trainer" / "deepspeed" / "ds").glob("*optim_states.pt"))) == 2  # two ZeRO partitions
    for name, src, kw in (("native", run, {}), ("master", run, {"zero_master": True}),
                          ("dsdir", step / "trainer" / "deepspeed", {})):
        res = convert(src, tmp_path / name, tp=2, verify=True, **kw)
        assert res["source_format"] == ("glmctl" if name == "native" else "deepspeed")
        m = load_model(tmp_path / name, dtype=torch.float32)
        with torch.no_grad():
            got = m(ref["tokens"], torch.arange(20)[None], prefix_lm_mask(20, 8))
        assert torch.allclose(got, ref["logits"], atol=1e-5, rtol=0), (name, (got - ref["logits"]).abs().max())
        assert json.loads((tmp_path / name / "config.json").read_text())["mask_token_id"] == 448  # from step config
