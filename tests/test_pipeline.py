"""The README's stage-by-stage sequence, run for real on a small corpus the test writes:
tokenizer train -> tokenize -> pretrain -> convert (TP 2 and back, verified) -> quantize ->
evaluate -> generate -> report. Every artifact is checked against the one before it."""
import json
import random

import pytest
import torch

from conftest import run_glmctl

EN = ["The quick brown fox jumps over the lazy dog.", "Python is a programming language that lets you work quickly.",
      "A list is a mutable sequence of items.", "The function returns None when the list is empty.",
      "Tensor parallelism splits each weight matrix over several devices."]
ZH = ["今天天气很好，我们去公园散步。", "人民日报发表了新年献词。", "这本书的内容很丰富，值得一读。",
      "我们在北京学习中文。", "经济发展需要科学技术的进步。"]


def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
    rnd = random.Random(0)
    corpus = tmp_path / "corpus"
    for split, n in (("train", 300), ("valid", 30)):
        (corpus / split).mkdir(parents=True)
        for lang, sents in (("en", EN), ("zh", ZH)):
            with open(corpus / split / f"{lang}.jsonl", "w") as f:
                for _ in range(n):
                    doc = (" " if lang == "en" else "").join(rnd.choice(sents) for _ in range(rnd.randint(2, 6)))
                    f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    t = tmp_path
    ok(run_glmctl("tokenizer", "train", corpus / "train/en.jsonl", corpus / "train/zh.jsonl",
                  "--out", t / "tokenizer", "--vocab-size", 370))
    ok(run_glmctl("tokenize", corpus / "train", "--tokenizer", t / "tokenizer", "--out", t / "tokens"))
    ok(run_glmctl("tokenize", corpus / "valid", "--tokenizer", t / "tokenizer", "--out", t / "tokens-valid"))
    r = ok(run_glmctl("pretrain", "--data", t / "tokens", "--valid-data", t / "tokens-valid", "--out", t / "run",
                      "--preset", "tiny", "--seq-len", 64, "--micro-batch-size", 4, "--global-batch-size", 8,
                      "--steps", 30, "--lr", 3e-3, "--json"))
    summary = json.loads(r.stdout)
    losses = [json.loads(line) for line in (t / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m["loss"] for m in losses if "loss" in m]
    assert train[-1] < train[0]  # it learns
    assert (t / "run" / "loss.png").exists() and summary
    ok(run_glmctl("convert", t / "run" / "final", t / "model-tp2", "--tp", 2, "--verify"))
    ok(run_glmctl("convert", t / "model-tp2", t / "model", "--tp", 1, "--verify"))
    from glmctl.checkpoint import read_state_dict
    _, a = read_state_dict(t / "run" / "final")
    _, b = read_state_dict(t / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # TP 1 -> 2 -> 1 is exact
    ok(run_glmctl("quantize", t / "model", t / "model-int8", "--bits", 8, "--eval", t / "tokens-valid",
                  "--max-ppl-increase", 1.0))
    ok(run_glmctl("quantize", t / "model", t / "model-int4", "--bits", 4, "--group-size", 32, "--method", "gptq",
                  "--calibration", t / "tokens", "--eval", t / "tokens-valid"))
    for name in ("model", "model-int4"):
        ok(run_glmctl("evaluate", t / name, "mc_en", "ppl_zh", "--out", t / f"eval-{name}", "--limit", 8))
        res = json.loads((t / f"eval-{name}" / "results.json").read_text())
        assert 0.0 <= res["results"]["mc_en"]["acc,none"] <= 1.0
    r = ok(run_glmctl("generate", t / "model-int4", "Python is [MASK] language that [MASK].", "今天",
                      "--max-new-tokens", 8, "--no-stream", "--output", t / "samples.jsonl"))
    rows = [json.loads(line) for line in (t / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["blanks"]) == 2
    r = ok(run_glmctl("report", t, "--samples", t / "samples.jsonl", "--json"))
    stages = [row["stage"] for row in json.loads(r.stdout)["rows"]]
    assert stages[:4] == ["tokenizer", "tokenize", "tokenize", "pretrain"] and "quantize" in stages
    assert (t / "REPORT.md").read_text().count("| quantize |") == 2
