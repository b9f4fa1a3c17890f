"""`glmctl convert --to hf` checked by transformers itself (a dev dependency), offline, on tiny
models made here: logits of AutoModelForCausalLM against glmctl's network with GLM-130B's
positions and masks (docs/glm130b.md §4), greedy generate() against `glmctl generate`, the
tokenizer against glmctl's, export -> import bit for bit (native and SAT-imported), quantized
sources, and the modelling file against glmctl's network on random configs."""
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the repository root on sys.path, where glmctl's kernels/ source folder
# (installed as glmctl.kernels) would shadow the `kernels` distribution transformers imports
_REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]
os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the Hub; remote code is copied into a private cache
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="glmctl-hf-modules-"))

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

from conftest import run_glmctl  # noqa: E402
from test_convert import tiny_cfg, write_sat  # noqa: E402  (SAT checkpoints written from the spec)
from test_generate import TEXT, make_tokenizer, quantized_checkpoint, varied  # noqa: E402

from glmctl.checkpoint import load_model, read_state_dict, save_model  # noqa: E402
from glmctl.config import ModelConfig  # noqa: E402
from glmctl.errors import InputError, UsageError  # noqa: E402
from glmctl.formats import describe_checkpoint, detect, hf  # noqa: E402
from glmctl.generation import DecodeRequest, GenerationConfig, decode_batch  # noqa: E402
from glmctl.model import GLM, masks  # noqa: E402
from glmctl.stages import convert as C  # noqa: E402
from glmctl.tokenizer import Tokenizer  # noqa: E402

MIXED = "Tsinghua University 清华大学位于北京。\nThe quick brown fox ▁ jumps\n\n天气很好 [sop] 今天  星期五。\t end"


@pytest.fixture(scope="module", autouse=True)
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok = make_tokenizer(root / "tok")
    cfg = tiny_cfg().replace(**tok.config_overrides())
    model = varied(GLM(cfg).init_weights(5)).eval()
    save_model(model, root / "native", tokenizer=root / "tok", stage="pretrain",
               config_extra={"pretrain": {"preset": "tiny", "steps": 5, "seq_len": 64}},
               summary={"step": 5, "tokens": 3072, "train_loss": 6.23, "eval_loss": 6.5}, inputs=[root / "tok"])
    r = C.run(C.ConvertConfig(src=str(root / "native"), out=str(root / "hf"), to="hf", max_shard_size="100KB"))
    assert r.summary["verify"]["max_logit_diff"] == 0.0
    return root


@pytest.fixture(scope="module")
def glm(root):
    return load_model(root / "native", dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_model(root):
    return AutoModelForCausalLM.from_pretrained(root / "hf", trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def hf_tok(root):
    return AutoTokenizer.from_pretrained(root / "hf", trust_remote_code=True)


def glm_logits(model, tokens, positions, prefix_len):
    with torch.no_grad():
        return model(torch.tensor([tokens]), torch.tensor([positions]),
                     masks.prefix_lm_mask(len(tokens), prefix_len)).float()


def rand_ids(cfg, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, cfg.vocab_size - 64, (n,), generator=g).tolist()  # no special ids


# ---- the files ------------------------------------------------------------------------------------
def test_export_layout_config_and_card(root):
    d = root / "hf"
    cfg = json.loads((d / "config.json").read_text())
    native = ModelConfig.load(root / "native")
    assert cfg["model_type"] == "glm130b" and cfg["architectures"] == ["GLM130BForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_glm130b.GLM130BForCausalLM"
    assert {k: cfg[k] for k in hf.FIELDS} == {k: getattr(native, k) for k in hf.FIELDS}
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((d / f).exists() for f in files)
    assert set(index["weight_map"]) == set(read_state_dict(root / "native")[1])
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [native.eop_token_id, native.eos_token_id, native.eod_token_id]
    assert native.sop_token_id in gen["suppress_tokens"] and native.mask_token_id in gen["suppress_tokens"]
    card = (d / "README.md").read_text()
    for want in ("| layers | 2 |", "| hidden size | 64 |", "glmctl pretrain", "step 5, 3,072 tokens",
                 "| train_loss | 6.23 |", "| eval_loss | 6.5 |", "trust_remote_code=True"):
        assert want in card, want
    for f in hf.REMOTE_FILES:  # self-contained remote code
        assert "glmctl" not in "".join(line for line in (d / f).read_text().splitlines()
                                       if line.startswith(("import", "from")))
    assert detect(d)[0] == "hf" and describe_checkpoint(d)["format"] == "hf"  # what `glmctl inspect` shows


# ---- logits ---------------------------------------------------------------------------------------
def test_logits_equal_glmctl_for_gmask_and_two_mask_inputs(glm, hf_model):
    cfg = glm.config
    ids = cfg.special_token_ids()
    cases = [rand_ids(cfg, 12, 1) + [ids["[gMASK]"]],
             rand_ids(cfg, 5, 2) + [ids["[MASK]"]] + rand_ids(cfg, 4, 3) + [ids["[MASK]"]] + rand_ids(cfg, 3, 4)
             + [ids["eos"]]]
    for context in cases:
        tokens, positions, prefix_len, _, next_pos = masks.generation_input(context, ids)
        span = rand_ids(cfg, 5, 9)
        tokens, positions = tokens + span, positions + [next_pos(k) for k in range(1, 6)]
        want = glm_logits(glm, tokens, positions, prefix_len)
        if ids["[MASK]"] in context:  # GLM-130B's positions: the span sits at the first [MASK]
            assert positions[prefix_len:] == [context.index(ids["[MASK]"])] * 6
        with torch.no_grad():
            alone = hf_model(torch.tensor([tokens])).logits
            explicit = hf_model(torch.tensor([tokens]), position_ids=torch.tensor([positions]),
                                attention_mask=~masks.prefix_lm_mask(len(tokens), prefix_len)).logits
        assert alone.shape == want.shape
        assert (alone - want).abs().max() <= 1e-5
        assert (explicit - want).abs().max() <= 1e-5


def test_plain_text_is_read_after_an_implied_gmask_sop(glm, hf_model):
    """GLM-130B's LM protocol (docs/glm130b.md §4.4, unidirectional): [gMASK] <sop> text, causal,
    positions 0, 1, ...; the logits come back aligned with the ids given. Batched with left
    padding (and next to a [MASK] row) gives the same logits."""
    cfg = glm.config
    ids = cfg.special_token_ids()
    text = rand_ids(cfg, 10, 5)
    full = [ids["[gMASK]"], ids["sop"]] + text
    want = glm_logits(glm, full, list(range(len(full))), 0)[:, 2:]
    starts_with_sop = glm_logits(glm, full, list(range(len(full))), 0)[:, 1:]
    other = rand_ids(cfg, 4, 6) + [ids["[MASK]"], ids["eos"], ids["sop"]] + rand_ids(cfg, 3, 7)
    other_want = glm_logits(glm, other, list(range(6)) + [4] * 4, 6)
    with torch.no_grad():
        got = hf_model(torch.tensor([text])).logits
        got_sop = hf_model(torch.tensor([[ids["sop"]] + text])).logits
        n = len(text)
        batch = torch.tensor([text, [ids["pad"]] * (n - len(other)) + other])
        pad = torch.tensor([[1] * n, [0] * (n - len(other)) + [1] * len(other)])
        got_b = hf_model(batch, attention_mask=pad).logits
    assert (got - want).abs().max() <= 1e-5
    assert (got_sop - starts_with_sop).abs().max() <= 1e-5
    assert (got_b[0] - want[0]).abs().max() <= 1e-5
    assert (got_b[1, n - len(other):] - other_want[0]).abs().max() <= 1e-5


# ---- generation -----------------------------------------------------------------------------------
def test_generate_greedy_equals_glmctl_generate(root, hf_model, hf_tok):
    prompts = ["Tsinghua University is in [gMASK]", "清华大学 [MASK] 北京。"]
    r = run_glmctl("generate", root / "native", *prompts, "--strategy", "greedy", "-n", "8", "--json")
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)["results"]
    end_ids = set(hf_model.generation_config.eos_token_id)
    for prompt, rec in zip(prompts, records):
        enc = hf_tok(prompt, return_tensors="pt")
        out = hf_model.generate(**enc, do_sample=False, max_new_tokens=8)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        if new and new[-1] in end_ids:
            new = new[:-1]
        (blank,) = rec["blanks"]
        # glmctl reports each blank's text stripped of surrounding whitespace
        assert len(new) == blank["tokens"] and hf_tok.decode(new).strip() == blank["text"]
    # both prompts in one left-padded batch: the same spans
    enc = hf_tok(prompts, return_tensors="pt", padding=True)
    out = hf_model.generate(**enc, do_sample=False, max_new_tokens=8)
    for row, rec in zip(out, records):
        new = [t for t in row[enc["input_ids"].shape[1]:].tolist() if t not in end_ids | {hf_tok.pad_token_id}]
        assert hf_tok.decode(new).strip() == rec["blanks"][0]["text"]


def test_text_generation_pipeline_continues_text_under_glm_protocol(glm, hf_model, hf_tok):
    """pipeline("text-generation") on plain text: the continuation glmctl decodes greedily from
    [gMASK] <sop> text with a causal mask (the implied prefix)."""
    text = "The quick brown fox"
    ids = glm.config.special_token_ids()
    toks = [ids["[gMASK]"], ids["sop"]] + hf_tok(text)["input_ids"]
    n = len(toks)
    gen = GenerationConfig(max_new_tokens=6, banned_token_ids=(ids["[MASK]"], ids["[gMASK]"], ids["[sMASK]"], ids["sop"]))
    (hyp,) = decode_batch(glm, [DecodeRequest(toks, list(range(n)), 0, lambda k: n - 1 + k)], gen, ids)[0]
    pipe = pipeline("text-generation", model=hf_model, tokenizer=hf_tok)
    out = pipe(text, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert out == hf_tok.decode(hyp.tokens, skip_special_tokens=True)


# ---- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_equals_glmctl(root, hf_tok):
    tok = Tokenizer.load(root / "native")
    for text in [MIXED, *TEXT[:6], "[MASK] 清华 [gMASK]\n[sMASK]", "", " ▁▁ x"]:
        want = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == want
        assert hf_tok.encode(text, add_special_tokens=False) == want
        assert hf_tok.decode(want) == tok.decode(want) == text
    ids = tok.encode(MIXED) + [tok.sop_token_id, tok.eop_token_id, tok.vocab_size - 1]
    assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(tok.encode(MIXED))
    # add_special_tokens: a blank-filling prompt as GLM-130B's generate.py builds it
    ids_map = load_model(root / "native").config.special_token_ids()
    for prompt in ("清华 [MASK] 北京", "continue [gMASK]", "plain text"):
        body = tok.encode(prompt)
        want = masks.prepare_prompt(body, ids_map) + [tok.sop_token_id] if "[" in prompt else body
        assert hf_tok(prompt)["input_ids"] == want
    assert len(hf_tok) == tok.vocab_size and hf_tok.bos_token_id == tok.sop_token_id


# ---- import back ----------------------------------------------------------------------------------
def assert_same_checkpoint(a: Path, b: Path):
    ca, sa = read_state_dict(a)
    cb, sb = read_state_dict(b)
    assert ca.to_dict() == cb.to_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_export_import_is_bit_identical(root):
    r = C.run(C.ConvertConfig(src=str(root / "hf"), out=str(root / "back")))
    assert r.summary["source_format"] == "hf"
    assert_same_checkpoint(root / "native", root / "back")
    for f in Tokenizer.files:
        assert (root / "back" / f).read_bytes() == (root / "native" / f).read_bytes()


def test_sat_checkpoint_round_trips_and_its_export_matches_glmctl(tmp_path):
    cfg = tiny_cfg()
    sd = {k: v for k, v in varied(GLM(cfg).init_weights(7)).state_dict().items()}
    write_sat(tmp_path / "sat", sd, tp=2)  # fp16, with SAT's inv_freq buffers
    C.run(C.ConvertConfig(src=str(tmp_path / "sat"), out=str(tmp_path / "native"), preset="tiny"))
    C.run(C.ConvertConfig(src=str(tmp_path / "native"), out=str(tmp_path / "hf"), to="hf"))
    C.run(C.ConvertConfig(src=str(tmp_path / "hf"), out=str(tmp_path / "back")))
    assert_same_checkpoint(tmp_path / "native", tmp_path / "back")
    glm = load_model(tmp_path / "native", dtype=torch.float32)
    assert glm.config.rope == "sat"  # SAT imports keep SAT's RoPE angles
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32)
    ids = glm.config.special_token_ids()
    context = rand_ids(cfg, 9, 11) + [ids["[MASK]"]] + rand_ids(cfg, 5, 12)
    tokens, positions, prefix_len, _, _ = masks.generation_input(masks.prepare_prompt(context, ids), ids)
    with torch.no_grad():
        got = model.eval()(torch.tensor([tokens])).logits
    assert (got - glm_logits(glm, tokens, positions, prefix_len)).abs().max() <= 1e-5


# ---- quantized sources and bad input --------------------------------------------------------------
def test_quantized_source_refused_unless_dequantized(root, tmp_path):
    q = quantized_checkpoint(root / "native", tmp_path / "int4", 4)
    with pytest.raises(UsageError, match="--dequantize"):
        C.run(C.ConvertConfig(src=str(q), out=str(tmp_path / "x"), to="hf"))
    assert not (tmp_path / "x").exists()
    r = run_glmctl("convert", q, tmp_path / "x", "--to", "hf")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    C.run(C.ConvertConfig(src=str(q), out=str(tmp_path / "deq"), to="hf", dequantize=True))
    glm = load_model(q)  # int4 weights through glmctl's kernels
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "deq", trust_remote_code=True).eval()
    ids = glm.config.special_token_ids()
    tokens, positions, prefix_len, _, _ = masks.generation_input(rand_ids(glm.config, 10, 3) + [ids["[gMASK]"]], ids)
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits
    assert (got - glm_logits(glm, tokens, positions, prefix_len)).abs().max() <= 1e-4
    assert "dequantized from INT4" in (tmp_path / "deq" / "README.md").read_text()


def test_bad_options_and_damaged_exports(root, tmp_path):
    with pytest.raises(UsageError, match="TP=1"):
        C.ConvertConfig(src=str(root / "native"), out=str(tmp_path / "x"), to="hf", tp=2).validate()
    with pytest.raises(UsageError, match="--dequantize applies"):
        C.ConvertConfig(src=str(root / "native"), out=str(tmp_path / "x"), dequantize=True).validate()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "glm130b", "hidden_size": 64}))
    with pytest.raises(InputError, match="lacks num_layers"):
        C.run(C.ConvertConfig(src=str(bad), out=str(tmp_path / "y")))
    doc = json.loads((root / "hf" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="missing weights file"):
        C.run(C.ConvertConfig(src=str(bad), out=str(tmp_path / "y")))


# ---- the modelling file stays in step with glmctl's network ---------------------------------------
def remote_module():
    """The modelling file as shipped, imported as a package beside its configuration file."""
    name = "glm130b_remote_under_test"
    if name in sys.modules:
        return sys.modules[name + ".modeling_glm130b"]
    pkg = importlib.util.spec_from_loader(name, loader=None, is_package=True)
    mod = importlib.util.module_from_spec(pkg)
    mod.__path__ = [str(hf.REMOTE_DIR)]
    sys.modules[name] = mod
    return importlib.import_module(name + ".modeling_glm130b")


@pytest.mark.parametrize("seed", range(4))
def test_modelling_file_agrees_with_glmctl_network(seed):
    """Random shapes, RoPE modes and bases, random weights, positions and masks: the shipped
    modelling file (explicit position_ids + 4-D mask, then token by token through its cache)
    gives glmctl's logits. A change to either network fails here."""
    mod = remote_module()
    g = torch.Generator().manual_seed(seed)
    heads = [2, 4, 3, 1][seed]
    head_dim = [8, 16, 12, 32][seed]
    cfg = ModelConfig(num_layers=1 + seed % 3, hidden_size=heads * head_dim, num_attention_heads=heads,
                      inner_hidden_size=[48, 96, 40, 64][seed], vocab_size=128, max_sequence_length=64,
                      rotary_base=[10000.0, 500.0, 10000.0, 1e6][seed], rope=["exact", "sat"][seed % 2],
                      hidden_dropout=0.0, attention_dropout=0.0, mask_token_id=120, gmask_token_id=121,
                      smask_token_id=122, eod_token_id=123, sop_token_id=124, eop_token_id=125, eos_token_id=2)
    glm = GLM(cfg).init_weights(seed).eval()
    with torch.no_grad():
        for p in glm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model = mod.GLM130BForCausalLM(mod.GLM130BConfig(**{k: v for k, v in hf.hf_config(cfg, torch.float32).items()
                                                        if k not in ("auto_map", "architectures", "model_type")}))
    missing, unexpected = model.load_state_dict(glm.state_dict(), strict=False)
    assert not missing and not unexpected
    model.eval()
    b, s = 2, 11
    tokens = torch.randint(0, 120, (b, s), generator=g)
    positions = torch.randint(0, 60, (b, s), generator=g)
    prefix = (torch.rand(b, s, generator=g) < 0.6) & (torch.arange(s) < 6)  # the prefix lies in the prefill
    blocked = masks.build_mask(prefix)
    with torch.no_grad():
        want = glm(tokens, positions, blocked)
        got = model(tokens, position_ids=positions, attention_mask=~blocked).logits
        assert (got - want).abs().max() <= 1e-5
        # incremental: prefill 6, then one token at a time through the KV cache
        out = model(tokens[:, :6], position_ids=positions[:, :6], attention_mask=~blocked[:, :, :6, :6],
                    use_cache=True)
        steps = [out.logits]
        for i in range(6, s):
            out = model(tokens[:, i:i + 1], position_ids=positions[:, i:i + 1],
                        attention_mask=~blocked[:, :, i:i + 1, :i + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
        assert (torch.cat(steps, dim=1) - want).abs().max() <= 1e-5
