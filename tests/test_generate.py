"""`glmctl generate` end to end: a real (tiny) sentencepiece tokenizer and checkpoint made here,
results checked against glmctl.generation called directly, input pipelines, bad input, streaming,
quantized checkpoints, and TP=2 under torchrun equal to TP=1."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_glmctl

from glmctl.checkpoint import load_model, save_model
from glmctl.config import get_preset
from glmctl.generation import GenerationConfig, fill
from glmctl.model import GLM
from glmctl.blanks import TextStream, encode_prompt
from glmctl.stages import generate as stage

TEXT = ["The quick brown fox jumps over the lazy dog.", "Tsinghua University is in Beijing, China.",
        "天气很好，我们去公园散步吧。今天是星期五。", "清华大学位于北京。", "Hello world, this is a test of the tokenizer.",
        "A language model fills blanks in the middle of a text."] * 40


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_tokenizer(directory: Path):
    import sentencepiece as spm
    from glmctl.tokenizer import SENTENCEPIECE_OPTIONS, Tokenizer, build_meta
    buf = io.BytesIO()
    # 400 pieces + 8 specials -> vocab 512, the tiny preset's; coverage < 1 leaves rare
    # Chinese characters to byte pieces (multi-byte characters split over several tokens)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=buf, model_type="bpe",
                                   vocab_size=400, character_coverage=0.98, minloglevel=2,
                                   **SENTENCEPIECE_OPTIONS)
    tok = Tokenizer(buf.getvalue(), build_meta(buf.getvalue(), model_type="bpe"))
    tok.save(directory)
    return tok


def varied(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "dense" in n and n.endswith("weight"):
                p.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = make_tokenizer(root / "tok")
    cfg = get_preset("tiny").replace(**tok.config_overrides(), hidden_dropout=0.0, attention_dropout=0.0)
    model = varied(GLM(cfg).init_weights(3))
    save_model(model, root / "model", tokenizer=root / "tok")
    return root / "model"


@pytest.fixture(scope="module")
def tok(ckpt):
    from glmctl.tokenizer import Tokenizer
    return Tokenizer.load(ckpt)


def run_stage(ckpt, *, stdin="", **kw):
    gen = kw.pop("generation", GenerationConfig(max_new_tokens=6))
    out = io.StringIO()
    cfg = stage.GenerateConfig(model=str(ckpt), generation=gen, interactive=False, **kw)
    res = stage.run(cfg, stdin=io.StringIO(stdin), stdout=out)
    return res, out.getvalue()


def direct(ckpt, tok, text, gen):
    """The expected completion from the library: encode the pieces around the masks, fill()."""
    model = load_model(ckpt)
    ids = model.config.special_token_ids()
    toks = encode_prompt(text, tok, ids, "test")
    final, spans = fill(model, toks, ids, gen)
    return tok.decode(final), [(tok.decode(s)) for _, s in spans]


def test_json_blanks_match_library_fill(ckpt, tok):
    gen = GenerationConfig(max_new_tokens=5)
    prompt = "Tsinghua [MASK] is in [MASK], China."
    res, _ = run_stage(ckpt, prompts=[prompt, "The quick brown"], json=True, generation=gen)
    r0, r1 = res.records
    want_text, want_spans = direct(ckpt, tok, prompt, gen)
    assert r0["text"] == want_text and r0["mask"] == "[MASK]" and len(r0["blanks"]) == 2
    assert r0["text"].startswith("Tsinghua ") and r0["text"].endswith(", China.")
    for b, span in zip(r0["blanks"], want_spans):
        assert r0["text"][b["start"]:b["end"]] == b["text"] == span.strip()
        assert 1 <= b["tokens"] <= 5 and b["stop"] in ("length", "eop", "eos")
    assert r0["blanks"][0]["end"] <= r0["blanks"][1]["start"]
    # continuation: [gMASK] appended, the prompt text is kept as the prefix
    want_text, _ = direct(ckpt, tok, "The quick brown", gen)
    assert r1["mask"] == "[gMASK]" and r1["text"] == want_text and r1["text"].startswith("The quick brown")
    assert r1["id"] == 2 and r1["new_tokens"] == r1["blanks"][0]["tokens"]


@pytest.mark.slow
def test_cli_json_document_and_text_output(ckpt, tok):
    r = run_glmctl("generate", ckpt, "Tsinghua [MASK] is in [MASK], China.", "清华大学", "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [x["id"] for x in doc["results"]] == [1, 2] and doc["failed"] == 0
    assert doc["results"][1]["text"].startswith("清华大学")
    # text mode (prompt arguments, not a terminal): the completed texts, one per line, no ANSI
    res, out = run_stage(ckpt, prompts=["Tsinghua [MASK] is in [MASK], China.", "清华大学"],
                         generation=GenerationConfig(max_new_tokens=4))
    assert res.records == doc["results"]
    assert out == "".join(x["text"] + "\n" for x in doc["results"])


def test_batched_results_equal_one_by_one(ckpt, tmp_path):
    prompts = ["The quick brown", "Hello [MASK] this is a [MASK] of the tokenizer.", "清华", "A [sMASK] model.",
               "Tsinghua University is in Beijing, China. The quick brown fox", "天气很好，[MASK]。"]
    f = tmp_path / "p.txt"
    f.write_text("\n".join(prompts) + "\n")
    gen = GenerationConfig(max_new_tokens=6)
    one, _ = run_stage(ckpt, input=str(f), batch_size=1, generation=gen)
    many, out = run_stage(ckpt, input=str(f), batch_size=4, generation=gen)
    assert one.records == many.records
    # JSON lines on stdout for a file input, in order, ids = line numbers
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines == many.records and [x["id"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_jsonl_input_ids_kept_and_output_file(ckpt, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "The quick"}\n\n{"id": 7, "prompt": "清华大学[MASK]北京。"}\n'
                 '{"prompt": "no id here"}\n')
    out = tmp_path / "out.jsonl"
    _, stdout = run_stage(ckpt, input=str(f), output=str(out), generation=GenerationConfig(max_new_tokens=3))
    assert stdout == ""
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == ["a", 7, 4]  # a missing id becomes the line number
    assert recs[1]["text"].startswith("清华大学") and recs[1]["text"].endswith("北京。")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.slow
def test_bad_prompts_one_line_each_others_still_run(ckpt, tmp_path):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 40
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join([
        '{"id": 1, "prompt": "The quick brown"}',
        '{"id": 2, "prompt": "broken',
        '{"id": 3, "prompt": "Fill [MASK2] here"}',
        '{"id": 4, "prompt": "Fill [gmask] here"}',
        json.dumps({"id": 5, "prompt": long_prompt}),
        '["not", "an", "object"]',
        '{"id": 7, "text": "wrong key"}',
        '{"id": 8, "prompt": "Hello [MASK] world"}',
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    r = run_glmctl("generate", ckpt, "--input", f, "--output", out, "-n", "3")
    assert r.returncode == 3
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("glmctl: error:")]
    assert "Traceback" not in r.stderr
    assert len(err) == 7  # six bad lines + the summary
    assert f"{f}:2: malformed JSON line" in err[0]
    assert f"{f}:3: unknown mask token '[MASK2]'" in err[1]
    assert f"{f}:4: unknown mask token '[gmask]'" in err[2]
    assert f"{f}:5: prompt is" in err[3] and "maximum length 256" in err[3]
    assert f"{f}:6: expected a JSON object" in err[4]
    assert f"{f}:7: JSON line has no \"prompt\"" in err[5]
    assert "6 of 8 prompt(s) failed" in err[6]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "text" in recs[0] and "text" in recs[7] and all("error" in x for x in recs[1:7])


def test_text_file_line_numbers_count_blank_lines(ckpt, tmp_path):
    from glmctl.errors import InputError
    f = tmp_path / "p.txt"
    f.write_text("The quick\n\n\nFill [Mask] in\n清华大学 [MASK]\n")
    out = io.StringIO()
    cfg = stage.GenerateConfig(model=str(ckpt), input=str(f), interactive=False,
                               generation=GenerationConfig(max_new_tokens=2))
    with pytest.raises(InputError) as e:
        stage.run(cfg, stdin=io.StringIO(""), stdout=out)
    assert "1 of 3 prompt(s) failed" in str(e.value)
    recs = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [r["id"] for r in recs] == [1, 4, 5]
    assert recs[1]["error"].startswith(f"{f}:4: unknown mask token '[Mask]' at character 6")
    assert recs[2]["mask"] == "[MASK]" and recs[2]["text"].startswith("清华大学 ")


@pytest.mark.slow
def test_empty_input_file_cli(ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    r = run_glmctl("generate", ckpt, "--input", empty)
    assert r.returncode == 3
    assert r.stderr.strip().splitlines()[-1] == f"glmctl: error: {empty}: no prompts (the input is empty)"


def test_missing_inputs_and_bad_options(ckpt, tmp_path):
    from glmctl.errors import GlmctlError
    cases = [(dict(input=str(tmp_path / "nope.txt")), 3, "nope.txt: no such file"),
             (dict(prompts=["hi"], generation=GenerationConfig(strategy="nucleus")), 2, "unknown strategy"),
             (dict(prompts=["hi"], batch_size=0), 2, "--batch-size"),
             (dict(prompts=["hi"], input="x.txt"), 2, "not both")]
    for kw, code, msg in cases:
        with pytest.raises(GlmctlError) as e:
            run_stage(ckpt, **kw)
        assert e.value.exit_code == code and msg in str(e.value)
    with pytest.raises(GlmctlError) as e:
        run_stage(tmp_path / "no-model", prompts=["hi"])
    assert e.value.exit_code == 3 and "no-model" in str(e.value)


@pytest.mark.parametrize("name", ["eop", "eod"])
def test_tokenizer_and_config_disagreeing_on_an_end_token_is_refused(ckpt, tmp_path, name):
    from glmctl.errors import InputError
    bad = tmp_path / "model"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[f"{name}_token_id"] += 1  # the tokenizer files still say the old id
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError) as e:
        run_stage(bad, prompts=["hi"])
    assert f"tokenizer's {name} id" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_stdin_prompts(ckpt):
    r = run_glmctl("generate", ckpt, "-n", "3", input="The quick\n清华大学\n")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["id"] for x in recs] == [1, 2] and recs[1]["text"].startswith("清华大学")
    res, _ = run_stage(ckpt, input="-", stdin='{"id": "x", "prompt": "Hello"}\n')
    assert res.records[0]["id"] == "x"


def test_streaming_prints_the_same_text(ckpt):
    prompts = ["Hello [MASK] world [MASK] end", "清华大学"]
    _, plain = run_stage(ckpt, prompts=prompts, stream=False)
    _, streamed = run_stage(ckpt, prompts=prompts, stream=True)
    assert streamed == plain


def test_text_stream_never_splits_multibyte_characters(tok):
    text = "清华大学龘位于北京。鬱"  # rare characters fall back to 3 byte pieces each
    ids = tok.encode(text, allow_special=False)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)
    writes = []
    ts = TextStream(tok.decode, writes.append)
    for k in range(1, len(ids) + 1):
        ts.update(ids[:k])
    ts.update(ids, final=True)
    assert "".join(writes) == text
    assert all("\ufffd" not in w for w in writes)


def test_sampling_seed_reproducible_and_batch_invariant(ckpt):
    gen = GenerationConfig(strategy="sample", seed=42, top_p=0.9, max_new_tokens=6, temperature=1.3)
    prompts = ["The quick", "Hello [MASK] world", "清华"]
    a, _ = run_stage(ckpt, prompts=prompts, generation=gen, batch_size=3)
    b, _ = run_stage(ckpt, prompts=prompts, generation=gen, batch_size=1)
    assert a.records == b.records
    gen2 = GenerationConfig(strategy="sample", seed=43, top_p=0.9, max_new_tokens=6, temperature=1.3)
    c, _ = run_stage(ckpt, prompts=prompts, generation=gen2)
    assert [r["text"] for r in c.records] != [r["text"] for r in a.records]


def test_beam_search_stage(ckpt):
    gen = GenerationConfig(strategy="beam", num_beams=3, no_repeat_ngram_size=2, max_new_tokens=4)
    res, _ = run_stage(ckpt, prompts=["Hello [MASK] world"], generation=gen, json=True)
    b = res.records[0]["blanks"][0]
    assert "score" in b and b["tokens"] <= 4


def quantized_checkpoint(ckpt, out, bits):
    from glmctl.kernels import quantize_rtn
    fp = load_model(ckpt)
    cfg = fp.config.replace(quantization={"bits": bits, "group_size": None, "method": "rtn"})
    qm = GLM(cfg)
    sd = {}
    for k, v in fp.state_dict().items():
        if k.endswith(".weight") and ("dense" in k or "query_key_value" in k):
            q, s = quantize_rtn(v, bits)
            sd[k], sd[k + "_scale"] = q, s
        else:
            sd[k] = v
    qm.load_state_dict(sd)
    save_model(qm, out, tokenizer=ckpt)
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoints(ckpt, tok, tmp_path, bits):
    q = quantized_checkpoint(ckpt, tmp_path / f"int{bits}", bits)
    gen = GenerationConfig(max_new_tokens=5)
    res, _ = run_stage(q, prompts=["Hello [MASK] world", "清华大学"], generation=gen)
    for rec, prompt in zip(res.records, ["Hello [MASK] world", "清华大学"]):
        assert rec["text"] == direct(q, tok, prompt, gen)[0]


def test_low_precision_dtypes(ckpt):
    for dtype in ("bf16", "fp16"):
        res, _ = run_stage(ckpt, prompts=["Hello [MASK] world"], dtype=dtype, json=True)
        assert res.records[0]["text"].startswith("Hello ") and res.records[0]["new_tokens"] >= 1


@pytest.mark.slow
def test_interactive_session_on_a_terminal(ckpt):
    import pty
    import select
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="dumb", GLMCTL_PROGRESS_INTERVAL="1000")
    exe = Path(sys.executable).parent / "glmctl"
    p = subprocess.Popen([str(exe), "generate", str(ckpt), "-n", "3"], stdin=slave, stdout=slave,
                         stderr=subprocess.PIPE, env=env)
    os.close(slave)
    os.write(master, "清华大学\n".encode())
    os.write(master, b"\x04")  # Ctrl-D: end of input
    out = b""
    while True:
        r, _, _ = select.select([master], [], [], 120)
        if not r:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=120)
    err = p.stderr.read().decode()
    os.close(master)
    assert p.returncode == 0, err
    assert "prompt> " in err
    assert "清华大学" in out.decode("utf-8", "replace").split("\n", 1)[1]  # the echoed line, then the completion


def torchrun_generate(ckpt, *args):
    exe = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLMCTL_PROGRESS_INTERVAL="1000")
    return subprocess.run([str(exe), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), "-m", "glmctl", "generate", str(ckpt)] + [str(a) for a in args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_equals_tp1_under_torchrun(ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The quick brown\nHello [MASK] world [MASK] end\n清华大学\n")
    for gen, extra in ((GenerationConfig(max_new_tokens=8), []),
                       # sampling: the ranks share the seed, so TP=2 draws what TP=1 draws
                       (GenerationConfig(max_new_tokens=8, strategy="sample", seed=5),
                        ["--strategy", "sample", "--seed", "5"])):
        _, want = run_stage(ckpt, input=str(prompts), generation=gen)
        r = torchrun_generate(ckpt, "--input", prompts, "-n", "8", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout == want  # only rank 0 prints; the tokens are the TP=1 tokens
        assert len(want.splitlines()) == 3


def test_compile_option_reaches_the_decoding_step(ckpt, monkeypatch):
    """`generate --compile` hands the model to GLM.compile_decode (whose tokens equal eager ones:
    tests/test_decode_speed.py); here the compiled step is stubbed by the eager forward, counted."""
    calls = []

    def fake_compile(self, enabled=True):
        def step(*args, **kw):
            calls.append(args[0].shape)
            return type(self).__call__(self, *args, **kw)
        self.__dict__["_compiled_step"] = step if enabled else None
        return self

    monkeypatch.setattr(GLM, "compile_decode", fake_compile)
    gen = GenerationConfig(max_new_tokens=4, min_new_tokens=4)
    plain, _ = run_stage(ckpt, prompts=("The quick brown",), generation=gen)
    assert not calls
    compiled, _ = run_stage(ckpt, prompts=("The quick brown",), generation=gen, compile=True)
    assert compiled.records[0]["text"] == plain.records[0]["text"]
    assert calls == [(1, 1)] * 3  # every step after the prefill: tokens 2..4, one row each
    r = run_glmctl("generate", ckpt, "x", "--compile", "--help")
    assert "--compile" in r.stdout
