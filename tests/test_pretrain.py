"""`glmctl pretrain` on the tiny preset: run folder, resume after kill -9, signals, skipped steps,
schedules, bad input. Token data is written here in the Megatron format (glmctl.data)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_glmctl
from glmctl import train_utils as tu
from glmctl.artifacts import ArtifactWriter
from glmctl.data import index_bytes
from glmctl.stages.pretrain import PretrainConfig, run
from glmctl.training import Trainer

ENV = {"OMP_NUM_THREADS": "1", "GLMCTL_PROGRESS_INTERVAL": "1000"}
TINY = ["--preset", "tiny", "--seq-len", "64", "--micro-batch-size", "4", "--global-batch-size", "8"]


def make_tokens(out: Path, n_docs=120, vocab=400, seed=0, vocab_size=512, max_id=None) -> Path:
    """A tokens artifact whose documents follow a sparse Markov chain (3 likely successors per
    token), so a model can learn something a unigram model cannot."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(10, vocab, size=(vocab, 3))
    docs = []
    for _ in range(n_docs):
        t = [int(rng.integers(10, vocab))]
        for _ in range(int(rng.integers(50, 400)) - 1):
            t.append(int(succ[t[-1], rng.integers(3)]) if rng.random() < 0.9 else int(rng.integers(10, vocab)))
        docs.append(np.array(t, np.uint16))
    if max_id is not None:
        docs[-1][-1] = max_id
    with ArtifactWriter(out, stage="tokenize", config={"test": seed}) as w:
        (w.path / "shard-00000.bin").write_bytes(np.concatenate(docs).tobytes())
        (w.path / "shard-00000.idx").write_bytes(index_bytes(np.array([len(d) for d in docs]), np.uint16))
        w.summary = {"shards": [{"name": "shard-00000", "documents": len(docs)}], "vocab_size": vocab_size}
    return out


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("data") / "tokens")


def pretrain(tokens, out, *extra, **kw):
    """The stage in this process; returns its StageResult."""
    base = dict(data=str(tokens), out=str(out), preset="tiny", seq_len=64, micro_batch_size=4, global_batch_size=8)
    base.update(kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and the machine is shared
    try:
        return run(PretrainConfig(**base))
    finally:
        torch.set_num_threads(threads)


def safetensors(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


# ---- pure functions --------------------------------------------------------------------------
def test_lr_schedule_hand_values():
    kw = dict(peak=1e-3, min_lr=1e-4, warmup_samples=100, decay_samples=1100)
    assert tu.lr_at(50, **kw) == pytest.approx(5e-4)  # linear warm-up
    assert tu.lr_at(100, **kw) == pytest.approx(1e-3)
    assert tu.lr_at(600, **kw) == pytest.approx(1e-4 + 9e-4 * 0.5)  # half-way down the cosine
    assert tu.lr_at(1100, **kw) == pytest.approx(1e-4) and tu.lr_at(5000, **kw) == pytest.approx(1e-4)


def test_batch_rampup_megatron_rule():
    r = tu.Rampup.parse("16,8,100")  # 16 -> 32 in 2 increments, one every 50 samples
    assert [tu.global_batch_at(c, 32, r) for c in (0, 49, 50, 99, 100, 10_000)] == [16, 16, 24, 24, 32, 32]
    # steps: 16, 16, 16, 16 (64 samples), then 24, 24 (112), then 32 ...
    assert tu.plan_steps(steps=7, samples=None, final_batch=32, rampup=r) == (7, 16 * 4 + 24 * 2 + 32)
    assert tu.plan_steps(steps=None, samples=100, final_batch=32, rampup=None) == (4, 128)
    with pytest.raises(ValueError):
        tu.Rampup.parse("16,8")


def test_loss_scaler_hysteresis_and_growth():
    s = tu.LossScaler(True, initial=1024, window=3, hysteresis=2)
    s.update(True)
    assert s.scale == 1024  # first overflow: hysteresis absorbs it
    s.update(True)
    assert s.scale == 512
    s.update(True)
    assert s.scale == 256  # hysteresis exhausted: every overflow halves
    for _ in range(3):
        s.update(False)
    assert s.scale == 512 and s.hysteresis_left == 2
    t = tu.LossScaler(True)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    off = tu.LossScaler(False)
    off.update(True)
    assert off.scale == 1.0


def test_grad_norm_and_clip_match_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    norm = tu.grad_norm([(f"p{i}", p) for i, p in enumerate(a)])
    tu.clip_grads_(a, norm, 0.5)
    ref = torch.nn.utils.clip_grad_norm_(b, 0.5)
    assert float(norm) == pytest.approx(float(ref), rel=1e-6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)


def test_unigram_baseline_and_split(tokens):
    assert np.exp(tu.unigram_logprobs(np.array([1, 0, 2]))).tolist() == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    data = tu.TrainData(str(tokens), 64, seed=1, valid_fraction=0.1)
    n = len(data.windows)
    assert data.n_train + len(data.valid_index) == n and data.valid_index == list(range(data.n_train, n))
    # one epoch of training samples is a permutation of the training windows, never a held-out one
    seen = {tuple(w[:8]) for w in data.train_chunks(range(data.n_train))}
    train = {tuple(data.windows[j][:8]) for j in range(data.n_train)}
    assert seen == train
    counts = data.unigram_counts(512)
    assert counts.sum() == data.n_train * 64


# ---- runs ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_folder_layout_and_reports(tokens, tmp_path):
    out = tmp_path / "run"
    r = pretrain(tokens, out, steps=8, save_interval=2, keep=2, log_interval=1, eval_samples=8)
    s = r.summary
    assert r.status == "complete" and r.out == out / "final" and s["checkpoint"] == str(out / "final")
    assert sorted(p.name for p in out.iterdir()) == ["final", "latest", "loss.png", "metrics.jsonl",
                                                     "step-00000004", "step-00000006"]  # step 2 pruned
    assert (out / "latest").read_text().strip() == "final"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = tu.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in recs if "eval_loss" in r] == [2, 4, 6, 8]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in recs if "loss" in r)
    m = json.loads((out / "final" / "manifest.json").read_text())
    assert m["stage"] == "pretrain" and m["summary"]["step"] == 8
    assert m["summary"]["eval_ppl"] == pytest.approx(s["eval_ppl"]) and m["summary"]["unigram_ppl"] > 1
    # every other stage reads the folder as a native checkpoint; the trainer state loads safely
    from glmctl.checkpoint import load_model
    model = load_model(out / "step-00000006")
    assert model.config.num_layers == 2
    st = torch.load(out / "step-00000006" / "trainer" / "state.pt", weights_only=True)
    assert st["step"] == 6 and st["consumed_samples"] == 48 and st["optimizer"]["state"]


@pytest.mark.slow
def test_forced_nan_step_is_skipped_and_counted(tokens, tmp_path, monkeypatch):
    micro_loss = Trainer.micro_loss

    def nan_at_step_3(self, b):  # every micro-batch loss of step 3 is NaN, so are its gradients
        s = micro_loss(self, b)
        return s * float("nan") if self.step + 1 == 3 else s

    monkeypatch.setattr(Trainer, "micro_loss", nan_at_step_3)
    out = tmp_path / "run"
    s = pretrain(tokens, out, steps=4, save_interval=1, keep=10, log_interval=1, eval_samples=4).summary
    recs = [r for r in tu.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1] and s["skipped_steps"] == 1
    assert math.isnan(recs[2]["grad_norm"]) and math.isfinite(recs[3]["grad_norm"])
    w2, w3, w4 = safetensors(out / "step-00000002"), safetensors(out / "step-00000003"), safetensors(out / "final")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the NaN step changed nothing
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # the next step trained again
    assert all(torch.isfinite(v).all() for v in w4.values())


@pytest.mark.slow
def test_bf16_and_fp16_steps_run(tokens, tmp_path):
    for precision in ("bf16", "fp16"):
        s = pretrain(tokens, tmp_path / precision, steps=2, precision=precision, eval_samples=4).summary
        assert math.isfinite(s["eval_loss"]) and s["skipped_steps"] == 0


@pytest.mark.slow
def test_learns_beyond_the_unigram_model(tokens, tmp_path):
    s = pretrain(tokens, tmp_path / "run", steps=60, lr=3e-3, warmup=5, dropout=0.0, eval_samples=16,
                 save_interval=60).summary
    assert s["eval_ppl"] < 0.8 * s["unigram_ppl"], s


@pytest.mark.slow
def test_compiled_training_steps_match_eager(tokens, tmp_path):
    """--compile (torch.compile of the network for training forwards) changes speed, not values."""
    runs = {}
    for comp in (False, True):
        s = pretrain(tokens, tmp_path / str(comp), steps=3, compile=comp, dropout=0.0, log_interval=1,
                     eval_samples=4).summary
        runs[comp] = ([r["loss"] for r in tu.read_metrics(tmp_path / str(comp) / "metrics.jsonl") if "loss" in r],
                      s["eval_loss"])
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-4)


@pytest.mark.slow
def test_optimizer_and_init_options_reach_the_run(tokens, tmp_path):
    out = tmp_path / "run"
    r = run_glmctl("pretrain", "--data", tokens, "--out", out, *TINY, "--steps", "1", "--adam-beta2", "0.99",
                   "--embedding-init-std", "0.5", env=ENV)
    assert r.returncode == 0, r.stderr
    st = torch.load(out / "final" / "trainer" / "state.pt", weights_only=True)
    assert all(tuple(g["betas"]) == (0.9, 0.99) for g in st["optimizer"]["param_groups"])
    # one step of AdamW moves each weight by about lr (6e-4 here): the std is still the init's
    emb = safetensors(out / "final")["transformer.word_embeddings.weight"]
    assert abs(emb.std().item() - 0.5) < 0.02


def _start(tokens, out, *extra):
    exe = Path(sys.executable).parent / "glmctl"
    env = {**os.environ, **ENV}
    return subprocess.Popen([str(exe), "pretrain", "--data", str(tokens), "--out", str(out), *TINY, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(pred, proc, timeout=240):
    t0 = time.monotonic()
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.slow
def test_resume_after_kill9_is_bit_identical(tokens, tmp_path):
    args = ["--steps", "24", "--save-interval", "4", "--eval-interval", "1000", "--log-interval", "1",
            "--dropout", "0.1"]  # dropout: the RNG state must be restored too
    ref = run_glmctl("pretrain", "--data", tokens, "--out", tmp_path / "ref", *TINY, *args, env=ENV)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    proc = _start(tokens, out, *args)
    _wait_for(lambda: (out / "latest").is_file() and (out / "latest").read_text().strip() >= "step-00000008", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "killed too late to test anything"
    again = run_glmctl("pretrain", "--data", tokens, "--out", out, *TINY, *args, "--resume", "auto", env=ENV)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr
    a, b = safetensors(tmp_path / "ref" / "final"), safetensors(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in tu.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 25))  # the repeated steps' lines were replaced, not duplicated


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint_and_exits_4(tokens, tmp_path):
    out = tmp_path / "run"
    proc = _start(tokens, out, "--steps", "100000", "--save-interval", "100000", "--log-interval", "1")
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 4, err
    assert "SIGTERM received: checkpoint saved" in err and "Traceback" not in err
    name = (out / "latest").read_text().strip()
    from glmctl.checkpoint import load_model
    load_model(out / name)
    st = torch.load(out / name / "trainer" / "state.pt", weights_only=True)
    assert name == tu.step_name(st["step"]) and st["step"] >= 2
    # --max-wall-time stops the same way, after resuming from that checkpoint
    r = run_glmctl("pretrain", "--data", tokens, "--out", out, *TINY, "--steps", "100000", "--resume", "auto",
                   "--max-wall-time", "1s", env=ENV)
    assert r.returncode == 4 and "--max-wall-time reached" in r.stderr, r.stderr
    assert int((out / "latest").read_text().strip()[5:]) > st["step"]


# ---- tokenizer, instruction data, bad input -------------------------------------------------
@pytest.fixture(scope="module")
def real_tokens(tmp_path_factory):
    """A real sentencepiece tokenizer (400 pieces -> vocab 512) and a corpus tokenized with it."""
    from glmctl.stages import tokenize as tk
    d = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 8))) for _ in range(300)]
    text = "\n\n".join(" ".join(rng.choice(words, size=rng.integers(20, 80))) + "." for _ in range(400))
    (d / "corpus.txt").write_text(text)
    tk.train_tokenizer(tk.TrainConfig(inputs=(str(d / "corpus.txt"),), out=str(d / "tok"), vocab_size=400,
                                      threads=1))
    tk.run(tk.TokenizeConfig(inputs=(str(d / "corpus.txt"),), tokenizer=str(d / "tok"), out=str(d / "tokens"),
                             workers=0, txt_blocks=True))
    return d


@pytest.mark.slow
def test_tokenizer_ids_and_instruction_mix(real_tokens, tmp_path):
    from glmctl.tokenizer import Tokenizer
    tok = Tokenizer.load(real_tokens / "tok")
    instr = tmp_path / "mip.jsonl"
    instr.write_text("\n".join(json.dumps({"prompt": f"question {i}: ", "target": f"answer {i}"}) for i in range(5)))
    out = tmp_path / "run"
    # the tokenizer is found through the tokens' manifest; MIP at 50 % so some sequences use it
    pretrain(real_tokens / "tokens", out, steps=2, instruction_data=str(instr), mip_ratio=0.5, eval_samples=4)
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert {k: cfg[k] for k in tok.config_overrides()} == tok.config_overrides()
    assert (out / "final" / "tokenizer.model").read_bytes() == (real_tokens / "tok" / "tokenizer.model").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "target": "b"}) + "\n{\"prompt\": 1}\n")
    r = run_glmctl("pretrain", "--data", real_tokens / "tokens", "--out", tmp_path / "r2", *TINY,
                   "--instruction-data", bad, env=ENV)
    assert r.returncode == 3 and f"{bad}:2:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bad_input_fails_before_training(tokens, real_tokens, tmp_path):
    def fails(code, needle, *args):
        r = run_glmctl("pretrain", *args, env=ENV)
        assert r.returncode == code, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("glmctl: error:")]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "out" / "step-00000001").exists()

    fails(3, "no such token directory", "--data", tmp_path / "missing", "--out", tmp_path / "out", *TINY)
    fails(2, "not divisible by --micro-batch-size 4", "--data", tokens, "--out", tmp_path / "out",
          "--preset", "tiny", "--micro-batch-size", "4", "--global-batch-size", "6")
    # a model config with a smaller vocabulary than the tokenizer
    small = tmp_path / "tiny256.json"
    from glmctl.config import get_preset
    small.write_text(get_preset("tiny").replace(vocab_size=256).to_json())
    fails(3, "has 512 ids but the model's vocab_size is 256", "--data", real_tokens / "tokens",
          "--out", tmp_path / "out", "--model-config", small, "--seq-len", "64")
    # raw Megatron shards with ids beyond the model's vocabulary (no tokenizer to compare with)
    wide = make_tokens(tmp_path / "wide", n_docs=20, vocab_size=70000, max_id=600)
    fails(3, "token id 600 is outside the model's vocabulary of 512", "--data", wide, "--out", tmp_path / "out",
          *TINY)
    fails(2, "--resume", "--data", tokens, "--out", tmp_path / "out", *TINY, "--resume", tmp_path / "nope")


def test_help_names_the_options_and_exit_code_4():
    r = run_glmctl("pretrain", "--help")
    assert r.returncode == 0
    for opt in ("--data", "--out", "--preset", "--resume", "--zero-stage", "--max-wall-time", "--batch-size-rampup",
                "--embedding-grad-shrink", "--instruction-data", "--valid-data"):
        assert opt in r.stdout
    assert "4: stopped by SIGTERM" in " ".join(r.stdout.split())


# ---- the fused attention path used for training ---------------------------------------------
def test_fast_attention_equals_the_explicit_math():
    """GLM.use_fast_attention (SDPA with an additive mask) against the spec's explicit fp32-softmax
    path: a packed [MASK] batch with padding rows (forward and every gradient), and KV-cached
    generation steps."""
    from glmctl import objective as obj
    from glmctl.config import get_preset
    from glmctl.model import GLM
    cfg = get_preset("tiny").replace(hidden_dropout=0.0, attention_dropout=0.0)
    ids = obj.SpecialIds.from_dict(cfg.special_token_ids())
    ocfg = obj.ObjectiveConfig(seq_len=96, samples_per_sequence=3)
    rng = np.random.default_rng(0)
    instr = [([16] * 20, [17] * 8)]  # 30 tokens each: 3 fit, 6 padding tokens
    seqs = [obj.build_sequence(rng.integers(10, 400, 96), obj.sample_rng(0, i), ocfg, ids, instr, kind=k)
            for i, k in enumerate([obj.MASK, obj.GMASK, obj.MIP])]
    b = obj.collate(seqs)
    assert b["attention_mask"].all(-1).any()  # padding rows see nothing: the special case is exercised
    outs, grads = [], []
    for fast in (False, True):
        m = GLM(cfg).init_weights(5).use_fast_attention(fast)
        logits = m(b["tokens"], b["positions"], b["attention_mask"])
        (logits.float().pow(2).mean()).backward()
        outs.append(logits.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-3, atol=1e-6)
    # generation: prefill then one cached step, s != t
    from glmctl.model.masks import prefix_lm_mask
    m = GLM(cfg).init_weights(5).eval()
    toks, pos = torch.tensor([[11, 12, 13, ids.gmask, ids.sop]]), torch.arange(5)[None]
    res = []
    for fast in (False, True):
        m.use_fast_attention(fast)
        cache = m.new_kv_cache()
        with torch.no_grad():
            a = m(toks, pos, prefix_lm_mask(5, 4), kv_cache=cache)
            step = m(torch.tensor([[20]]), torch.tensor([[5]]), prefix_lm_mask(6, 4)[:, :, -1:], kv_cache=cache)
        res.append((a, step))
    for x, y in zip(*res):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
