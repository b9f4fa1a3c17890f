"""`glmctl finetune`: LoRA (fp and INT4 bases), P-tuning v2, full fine-tuning, adapters on
generate / evaluate, resume after kill -9, bad input; the built-in numerals task."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import free_port, run_glmctl
from test_serve import start  # the live-server helper of the serve tests
from glmctl import adapters, finetune_tasks
from glmctl import finetune_data as fd
from glmctl import objective as obj
from glmctl import train_utils as tu
from glmctl.checkpoint import load_model, model_from_state_dict, save_model
from glmctl.config import get_preset
from glmctl.generation import GenerationConfig, decode_batch, span_request
from glmctl.kernels import dequantize, quantize_rtn
from glmctl.model import GLM
from glmctl.model.masks import build_mask
from glmctl.runtime import Runtime
from glmctl.stages.finetune import FinetuneConfig, run
from glmctl.training import Trainer

ENV = {"OMP_NUM_THREADS": "1", "GLMCTL_PROGRESS_INTERVAL": "1000"}
TASK = "numerals_zh"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices, shared machine
    yield
    torch.set_num_threads(n)


def make_tokenizer(directory: Path):
    import sentencepiece as spm
    from glmctl.tokenizer import SENTENCEPIECE_OPTIONS, Tokenizer, build_meta
    text = [finetune_tasks.prompt(n) + finetune_tasks.chinese_numeral(n) for n in range(1000)]
    text += ["The quick brown fox jumps over the lazy dog."] * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, model_type="bpe", vocab_size=400,
                                   minloglevel=2, **SENTENCEPIECE_OPTIONS)
    tok = Tokenizer(buf.getvalue(), build_meta(buf.getvalue(), model_type="bpe"))
    tok.save(directory)
    return tok


def quantized_copy(model: GLM, bits=4, group=32) -> GLM:
    """The same network with every linear weight quantized (RTN), as `glmctl quantize` stores it."""
    q = {"bits": bits, "group_size": group, "method": "rtn"}
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(".weight") and ("dense" in k or "query_key_value" in k):
            sd[k], sd[k[:-len("weight")] + "weight_scale"] = quantize_rtn(v.float(), bits, group)
        else:
            sd[k] = v
    return model_from_state_dict(model.config.replace(quantization=q), sd, dtype=torch.float32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    tok = make_tokenizer(root / "tok")
    cfg = get_preset("tiny").replace(**tok.config_overrides(), hidden_dropout=0.0, attention_dropout=0.0,
                                     max_sequence_length=64)
    model = GLM(cfg).init_weights(3)
    save_model(model, root / "model", tokenizer=root / "tok")
    save_model(quantized_copy(model), root / "model-int4", tokenizer=root / "tok")
    return root


def batch_of(model_dir: Path, n=4, seq_len=64):
    """Packed training sequences of the built-in task (collated)."""
    from glmctl.tokenizer import Tokenizer
    tok = Tokenizer.load(model_dir)
    ids = load_model(model_dir).config.special_token_ids()
    items = [(fd.with_mask(tok.encode(finetune_tasks.prompt(k)), ids),
              tok.encode(finetune_tasks.chinese_numeral(k), allow_special=False)) for k in range(40)]
    return obj.collate(fd.pack_examples(items, seq_len, ids, seed=1)[:n])


def forward(model, b):
    return model(b["tokens"], b["positions"], b["attention_mask"])


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapters.adapter_state(model).items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---- the built-in task ----------------------------------------------------------------------------
def test_numerals_hand_values_and_disjoint_splits():
    want = {0: "零", 7: "七", 10: "十", 15: "十五", 20: "二十", 99: "九十九", 100: "一百", 105: "一百零五",
            110: "一百一十", 118: "一百一十八", 230: "二百三十", 999: "九百九十九"}
    assert {n: finetune_tasks.chinese_numeral(n) for n in want} == want
    assert finetune_tasks.prompt(427) == "写出 4 2 7："
    s = finetune_tasks.split_numbers()
    assert [len(s[k]) for k in ("train", "valid", "test")] == [800, 100, 100]
    assert sorted(s["train"] + s["valid"] + s["test"]) == list(range(1000))  # disjoint, complete
    shipped = Path(finetune_tasks.__file__).parent / "tasks" / "finetune" / "numerals_zh" / "test.jsonl"
    assert shipped.read_text(encoding="utf-8").splitlines() == finetune_tasks.lines("test", glm_format=True)


# ---- LoRA -------------------------------------------------------------------------------------
def test_lora_starts_at_the_base_merges_exactly_and_only_adapters_get_gradients(base):
    model = load_model(base / "model")
    b = batch_of(base / "model")
    with torch.no_grad():
        ref = forward(model, b)
    adapters.attach(model, adapters.AdapterSpec("lora", lora=adapters.LoraSpec(rank=4, alpha=8)))
    adapters.freeze_base(model)
    with torch.no_grad():
        assert torch.equal(forward(model, b), ref)  # B = 0: exactly the base
    randomize_lora(model)
    with torch.no_grad():
        adapted = forward(model, b)
    assert (adapted - ref).abs().max() > 1e-3  # the update does something
    sd, q = adapters.merged_state_dict(model, quantized=False)
    assert q is None and not any("lora" in k for k in sd)
    merged = model_from_state_dict(model.config, sd)
    with torch.no_grad():
        torch.testing.assert_close(forward(merged, b), adapted, rtol=0, atol=1e-5)
    # gradients: adapter parameters only, and all of them
    model.train()
    logits = forward(model, b)
    F.cross_entropy(logits[b["loss_mask"]], b["targets"][b["loss_mask"]]).backward()
    for n, p in model.named_parameters():
        if adapters.is_adapter_param(n):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n


def test_lora_on_int4_input_gradient_is_the_dequantized_reference(base):
    model = load_model(base / "model-int4", dtype="fp32")
    adapters.attach(model, adapters.AdapterSpec("lora", lora=adapters.LoraSpec(rank=4, alpha=8)))
    randomize_lora(model)
    for name in ("transformer.layers.0.attention.query_key_value", "transformer.layers.1.mlp.dense_4h_to_h"):
        layer = model.get_submodule(name)
        assert layer.weight.dtype == torch.int8 and layer.lora is not None
        x = torch.randn(3, 5, layer.in_local, generator=torch.Generator().manual_seed(1), requires_grad=True)
        g = torch.randn(3, 5, layer.out_local, generator=torch.Generator().manual_seed(2))
        layer(x).backward(g)
        # reference in float64: the dequantized weight plus the LoRA path, autograd of plain matmuls
        w = dequantize(layer.weight, layer.weight_scale, 4, torch.float64)
        x64 = x.detach().double().requires_grad_(True)
        a, bm = layer.lora.A.double(), layer.lora.B.double()
        y = x64 @ w.T + layer.bias.double() + (x64 @ a.T) @ bm.T * layer.lora.scaling
        y.backward(g.double())
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-5)
    # a layer without LoRA on a quantized base passes the gradient through as well
    model2 = load_model(base / "model-int4", dtype="fp32")
    adapters.attach(model2, adapters.AdapterSpec("lora", lora=adapters.LoraSpec(rank=2, targets=("dense",))))
    layer = model2.get_submodule("transformer.layers.0.mlp.dense_h_to_4h")
    assert layer.lora is None
    x = torch.randn(2, layer.in_local, requires_grad=True)
    layer(x).sum().backward()
    w = dequantize(layer.weight, layer.weight_scale, 4, torch.float32)
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, -1), rtol=0, atol=1e-5)


def test_lora_on_int4_trains_and_merges(base, tmp_path):
    out = tmp_path / "q"
    res = finetune(base / "model-int4", out, method="lora", steps=12, lr=1e-2, log_interval=1,
                   merge=True, merge_precision="full")
    losses = [r["loss"] for r in tu.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.1, losses
    assert (out / "final" / adapters.ADAPTER_WEIGHTS).stat().st_size == res.summary["adapter_bytes"]
    # the merged full-precision checkpoint gives the adapted model's logits
    merged = load_model(out / "merged")
    assert merged.config.quantization is None
    from glmctl.session import open_model
    adapted = open_model(base / "model-int4", dtype="fp32", adapter=out).model
    b = batch_of(base / "model")
    with torch.no_grad():
        torch.testing.assert_close(forward(merged.float(), b), forward(adapted, b), rtol=0, atol=1e-4)


# ---- P-tuning v2 --------------------------------------------------------------------------------
def test_ptuning_masks_positions_and_frozen_base(base, tmp_path):
    model = load_model(base / "model")
    ids = model.config.special_token_ids()
    p, L = 5, 32
    adapters.attach(model, adapters.AdapterSpec("ptuning", prefix=adapters.PrefixSpec(length=p, projection=16)))
    seen = {}
    hook = model.transformer.layers[0].register_forward_pre_hook(lambda m, a: seen.update(mask=a[3].clone(),
                                                                                             cache=a[4]))
    # two examples side by side, then padding: prompts (with [gMASK]) of 6 and 4 tokens, targets of 3 and 5
    ex = [([11, 12, 13, 14, 15, ids["[gMASK]"]], [21, 22, 23]), ([16, 17, 18, ids["[gMASK]"]], [24, 25, 26, 27, 28])]
    b = obj.collate([obj.pack([fd.example_segment(pr, t, ids) for pr, t in ex], L, ids["pad"], obj.MIP)])
    forward(model, b)  # the training path (with gradients), where the mask reaches the layers as a tensor
    hook.remove()
    # independent construction: a loop over (query, key) pairs
    want = torch.ones(L, p + L, dtype=torch.bool)
    want_pos, start = [0] * L, 0
    for prompt, target in ex:
        n = len(prompt) + 1 + len(target)
        for q in range(start, start + n):
            want_pos[q] = q - start
            want[q, :p] = False  # every real position sees the whole prefix
            for k in range(start, start + n):
                if k < start + len(prompt) or k <= q:  # the prompt is bidirectional, the rest causal
                    want[q, p + k] = False
        start += n
    assert torch.equal(seen["mask"][0, 0], want)
    assert b["positions"][0].tolist() == want_pos
    assert seen["cache"].keys[0].shape[2] == p + L and seen["cache"].prefix_length == p
    # training moves the prefix only
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prefix_encoder.")}
    prefix_before = {k: v.clone() for k, v in adapters.adapter_state(model).items()}
    adapters.freeze_base(model)
    c = FinetuneConfig(base=str(base / "model"), data=TASK, out=str(tmp_path), method="ptuning", lr=1e-2,
                       micro_batch_size=2, eval_samples=2, log_interval=1)
    src = fd.FinetuneSource([fd.pack_examples([(fd.with_mask([7, 8, 9], ids), [10, 11])] * 3, 64, ids, 0)[0]] * 4,
                            [fd.pack_examples([(fd.with_mask([7, 8], ids), [12])], 64, ids, 0)[0]], seed=0)
    tr = Trainer.for_model(c, Runtime(world=1, rank=0, local_rank=0, tp=1), model, 64, src, None, tmp_path, [],
                           stage="finetune", steps=3)
    for _ in range(3):
        tr.train_step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(prefix_before[k], v) for k, v in adapters.adapter_state(model).items())
    # decoding with the KV cache (the prefix put in front of it) = recomputing every step without one
    model.eval()
    req = span_request([11, 12, 13, ids["[gMASK]"]], ids["[gMASK]"], ids)
    hyp = decode_batch(model, [req], GenerationConfig(strategy="greedy", max_new_tokens=4), ids)[0][0].tokens
    toks, pos, naive = list(req.tokens), list(req.positions), []
    with torch.no_grad():
        for k in range(len(hyp)):
            prefix = torch.tensor([[i < req.prefix_len for i in range(len(toks))]])
            t = int(model(torch.tensor([toks]), torch.tensor([pos]), build_mask(prefix))[0, -1].argmax())
            naive.append(t)
            toks.append(t)
            pos.append(req.next_position(k + 1))
    assert list(hyp) == naive


# ---- the stage --------------------------------------------------------------------------------
def finetune(model_dir, out, **kw):
    base = dict(base=str(model_dir), data=TASK, out=str(out), micro_batch_size=4, seq_len=64, eval_samples=4)
    base.update(kw)
    return run(FinetuneConfig(**base))


def test_adapter_directory_generate_evaluate_and_wrong_base(base, tmp_path):
    out = tmp_path / "lora"
    finetune(base / "model", out, steps=3, lora_rank=2, lora_targets=("query_key_value",))
    final = out / "final"
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter.safetensors", "manifest.json", "trainer"} <= names
    assert "model.safetensors" not in names
    cfg = json.loads((final / "adapter_config.json").read_text())
    assert cfg["base"]["manifest_sha256"] == adapters.manifest_hash(base / "model") and cfg["lora"]["rank"] == 2
    assert (out / "loss.png").is_file() and (out / "latest").read_text().strip() == "final"
    # generate / evaluate take it; on another base: one line, exit 3
    r = run_glmctl("generate", base / "model", "写出 4 2 7：", "--adapter", out, "--max-new-tokens", "3",
                   "--no-stream", env=ENV)
    assert r.returncode == 0, r.stderr
    task = Path(finetune_tasks.__file__).parent / "tasks" / "finetune" / "numerals_zh.yaml"
    r = run_glmctl("evaluate", base / "model", task, "--adapter", final, "--limit", "3", "--json", env=ENV)
    assert r.returncode == 0, r.stderr
    assert "exact_match,none" in json.loads(r.stdout)["results"]["numerals_zh"]
    r = run_glmctl("generate", base / "model-int4", "写出 1：", "--adapter", out, env=ENV)
    assert r.returncode == 3 and "wrong base checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bad_data_lines_are_skipped_and_reported(base, tmp_path):
    good = [json.dumps({"prompt": finetune_tasks.prompt(n), "target": finetune_tasks.chinese_numeral(n)},
                       ensure_ascii=False) for n in range(1, 30)]
    bad = ["{not json", json.dumps({"prompt": "x"}), json.dumps({"prompt": "写" * 80, "target": "一"}),
           json.dumps({"prompt": "写出 1：", "target": ""}),
           json.dumps({"inputs_pretokenized": "写出 2：", "targets_pretokenized": ["二"]})]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(good[:3] + bad + good[3:]) + "\n", encoding="utf-8")
    r = run_glmctl("finetune", base / "model", "--data", data, "--out", tmp_path / "o", "--steps", "1",
                   "--seq-len", "64", "--micro-batch-size", "2", "--json", env=ENV)
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("glmctl: warning") and "skipped)" in ln]
    assert len(warnings) == 4, r.stderr  # one line per reason, naming file and line
    assert any(f"{data}:4: malformed JSON" in w for w in warnings)
    assert any(f"{data}:5: no prompt/target" in w for w in warnings)
    assert any(f"{data}:6: prompt + target do not fit" in w for w in warnings)
    assert any(f"{data}:7: target empty after tokenization" in w for w in warnings)
    s = json.loads(r.stdout)
    assert s["skipped_lines"] == 4 and s["examples"] + s["held_out_examples"] == 30  # GLM format line kept
    # nothing usable: one line, exit 3
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("\n".join(bad[:4]) + "\n")
    r = run_glmctl("finetune", base / "model", "--data", only_bad, "--out", tmp_path / "o2", env=ENV)
    assert r.returncode == 3 and "no usable examples" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    r = run_glmctl("finetune", base / "model-int4", "--data", TASK, "--out", tmp_path / "o3", "--method", "full",
                   env=ENV)
    assert r.returncode == 3 and "cannot be fully fine-tuned" in r.stderr


def test_zstd_and_glm_format_give_the_same_examples(base, tmp_path):
    import zstandard
    from glmctl.tokenizer import Tokenizer
    tok = Tokenizer.load(base / "model")
    ids = load_model(base / "model").config.special_token_ids()
    lines = finetune_tasks.lines("valid")
    plain = tmp_path / "a.jsonl"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    z = tmp_path / "b.jsonl.zst"
    z.write_bytes(zstandard.ZstdCompressor().compress("\n".join(finetune_tasks.lines("valid", True)).encode()))
    a, b = fd.read_examples(plain, tok, ids, 64), fd.read_examples(z, tok, ids, 64)
    assert a.items == b.items and len(a.items) == 100
    prompt, target = a.items[0]
    seg = fd.example_segment(prompt, target, ids)
    n = len(prompt)
    assert prompt[-1] == ids["[gMASK]"] and seg.tokens.tolist() == prompt + [ids["sop"]] + target
    assert seg.targets[n:].tolist() == target + [ids["eop"]] and seg.loss.sum() == len(target) + 1
    assert seg.positions.tolist() == list(range(n + 1 + len(target)))
    # a [MASK] in the prompt: the generated part sits at the mask's position
    m = fd.with_mask([5, ids["[MASK]"], 6], ids)
    assert fd.example_segment(m, [9, 9], ids).positions.tolist() == [0, 1, 2, 1, 1, 1]


# ---- processes ------------------------------------------------------------------------------
FT_ARGS = ["--data", TASK, "--seq-len", "64", "--global-batch-size", "8", "--steps", "4", "--log-interval", "1",
           "--eval-interval", "1000", "--method", "full", "--lr", "1e-3"]


@pytest.mark.slow
@pytest.mark.distributed
def test_full_finetune_dp2_equals_single_process(base, tmp_path):
    single = run_glmctl("finetune", base / "model", "--out", tmp_path / "one", *FT_ARGS, "--micro-batch-size", "4",
                        env=ENV)
    assert single.returncode == 0, single.stderr
    exe = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(exe), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port()), "-m", "glmctl", "finetune", str(base / "model"), "--out",
                        str(tmp_path / "two"), *FT_ARGS, "--micro-batch-size", "2"],
                       capture_output=True, text=True, env={**os.environ, **ENV}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la = [x["loss"] for x in tu.read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in x]
    lb = [x["loss"] for x in tu.read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in x]
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.slow
def test_resume_after_kill9_is_bit_identical(base, tmp_path):
    args = ["--data", TASK, "--seq-len", "64", "--micro-batch-size", "4", "--steps", "24", "--save-interval", "4",
            "--eval-interval", "1000", "--log-interval", "1", "--lora-dropout", "0.1"]  # dropout: RNG state too
    ref = run_glmctl("finetune", base / "model", "--out", tmp_path / "ref", *args, env=ENV)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    exe = Path(sys.executable).parent / "glmctl"
    proc = subprocess.Popen([str(exe), "finetune", str(base / "model"), "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    t0 = time.monotonic()
    while not ((out / "latest").is_file() and (out / "latest").read_text().strip() >= "step-00000008"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 240
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "killed too late to test anything"
    again = run_glmctl("finetune", base / "model", "--out", out, *args, "--resume", "auto", env=ENV)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "ref" / "final" / adapters.ADAPTER_WEIGHTS))
    b = load_file(str(out / "final" / adapters.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in tu.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 25))


def test_serve_applies_the_adapter_as_generate_does(base, tmp_path):
    """`glmctl serve --adapter` fills blanks exactly as `glmctl generate --adapter`, and the
    adapter (a random LoRA update, so that it visibly matters) changes the text."""
    model = load_model(base / "model")
    spec = adapters.AdapterSpec("lora", lora=adapters.LoraSpec(rank=4, alpha=64))
    adapters.attach(model, spec)
    randomize_lora(model, seed=3)
    ad = adapters.save_adapter(model, spec, base / "model", tmp_path / "ad", stage="finetune", config={})
    prompts = ["写出 4 2 7：[MASK]", "写出 1 5：[MASK] 。"]
    args = ["-n", "6", "--json", "--no-stream"]
    plain = json.loads(run_glmctl("generate", base / "model", *prompts, *args, env=ENV).stdout)["results"]
    r = run_glmctl("generate", base / "model", *prompts, *args, "--adapter", ad, env=ENV)
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)["results"]
    assert [w["text"] for w in want] != [p["text"] for p in plain]
    s = start(base / "model", "--adapter", ad, tmp=tmp_path)
    try:
        got = httpx.post(s.url + "/v1/fill", json={"prompt": prompts, "max_tokens": 6}, timeout=60).json()["results"]
    finally:
        s.stop()
    assert [(g["text"], g["blanks"]) for g in got] == [(w["text"], w["blanks"]) for w in want]
