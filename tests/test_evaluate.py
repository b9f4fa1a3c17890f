"""glmctl evaluate: scoring against direct computations, metrics against hand-computed values,
results layout, bad input, cron behaviour (lock, resume, staleness, gates), TP and INT4."""
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, run_glmctl
from glmctl.artifacts import file_lock, manifest_hash, read_manifest
from glmctl.checkpoint import load_model, save_model
from glmctl.config import get_preset
from glmctl.evaluation import metrics as M
from glmctl.evaluation.runner import Evaluator, _lambada_prediction
from glmctl.evaluation.scoring import (lm_windows, multiple_choice_request, score_requests, window_request)
from glmctl.evaluation.tasks import builtin_tasks, load_task
from glmctl.model import GLM
from glmctl.tokenizer import SENTENCEPIECE_OPTIONS, Tokenizer, build_meta

CORPUS = [
    "The cat sat on the mat and looked at the garden.",
    "Bees make honey in the summer, and people eat it with bread.",
    "What is the capital of France? The answer is Paris.",
    "A spider has eight legs; an insect has six legs.",
    "The train to the coast was late because of the snow.",
    "中国的首都是北京，那里有故宫和天安门。",
    "春天来了，花开了，小鸟在树上唱歌。",
    "我们每天早上七点起床，然后吃早饭。",
]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- fixtures: a real tiny sentencepiece tokenizer and a tiny random GLM --------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import sentencepiece as spm
    root = tmp_path_factory.mktemp("evalmodel")
    lines = CORPUS * 20
    for p in (Path(REPO) / "glmctl/tasks/ppl_en").glob("*.txt"):
        lines += p.read_text(encoding="utf-8").split(". ")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=400,
                                   model_type="unigram", minloglevel=2, **SENTENCEPIECE_OPTIONS)
    tok = Tokenizer(buf.getvalue(), build_meta(buf.getvalue(), model_type="unigram"))
    tok.save(root / "tok")
    cfg = get_preset("tiny").replace(**tok.config_overrides())
    save_model(GLM(cfg).init_weights(seed=3), root / "model", tokenizer=root / "tok")
    return root / "model"


@pytest.fixture(scope="module")
def loaded(model_dir):
    model = load_model(model_dir)
    return model, Tokenizer.load(model_dir), model.config.special_token_ids()


@pytest.fixture
def mc_task(tmp_path):
    rows = [{"inputs_pretokenized": "Question: What do bees make?\nAnswer:",
             "choices_pretokenized": [" honey", " milk", " silk and wool", " a small red boat"], "label": 0},
            {"inputs_pretokenized": "中国的首都是", "choices_pretokenized": ["北京", "上海", "广州市"], "label": 0},
            {"inputs_pretokenized": "The cat sat on the", "choices_pretokenized": [" mat", " garden"], "label": 1},
            {"inputs_pretokenized": "A spider has", "choices_pretokenized": [" eight legs", " six legs", " wings"],
             "label": 0},
            {"inputs_pretokenized": "Bees make honey in the", "choices_pretokenized": [" summer", " train"], "label": 0}]
    write_jsonl(tmp_path / "data/mc/test.jsonl", rows)
    y = tmp_path / "mc.yaml"
    y.write_text('name: "mc"\ntype: "mul"\npath: "mc"\n')
    return y


# ---- multiple choice ---------------------------------------------------------------------------
def _naive_mask(n_ctx: int, blocks: list[int]) -> torch.Tensor:
    """Spec §4.4 element by element: context columns visible to every row; a choice block sees
    itself causally; blocks never see each other. True = blocked."""
    owner = [0] * n_ctx
    for b, size in enumerate(blocks, start=1):
        owner += [b] * size
    s = len(owner)
    blocked = torch.ones(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(s):
            if owner[j] == 0 or (owner[j] == owner[i] and j <= i):
                blocked[i, j] = False
    return blocked


def _direct_packed_scores(model, context, choices, ids, gmask):
    mask_id = ids["[gMASK]"] if gmask else ids["[MASK]"]
    tokens, positions, blocks, where = list(context) + [mask_id], list(range(len(context) + 1)), [], []
    m = len(context)
    for c in choices:
        where.append([(len(tokens) + k, t) for k, t in enumerate(c)])
        blk = [ids["sop"]] + list(c[:-1])
        tokens += blk
        positions += list(range(m + 1, m + 1 + len(blk))) if gmask else [m] * len(blk)
        blocks.append(len(blk))
    mask = _naive_mask(m + 1, blocks)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens]), torch.tensor([positions]), mask[None, None])[0]
                                 .double(), -1)
    return [sum(logp[i, t].item() for i, t in w) for w in where]


@pytest.mark.parametrize("gmask", [False, True])
def test_multiple_choice_scores_are_summed_logprobs_of_the_spec_masks(loaded, gmask):
    model, tok, ids = loaded
    context = tok.encode("Question: What do bees make?\nAnswer:")
    choices = [tok.encode(c) for c in (" honey", " milk", " silk and wool")]
    req, index = multiple_choice_request(context, choices, ids, use_task_mask=gmask)
    res = score_requests(model, [req], batch_size=4)[0]
    packed = [sum(res[i][0] for i in span) for span in index]
    direct = _direct_packed_scores(model, context, choices, ids, gmask)
    assert packed == pytest.approx(direct, abs=1e-4)
    # single-token choices share one <sop>: the same as each choice's own block
    single = [[c[0]] for c in choices]
    req, index = multiple_choice_request(context, single, ids, use_task_mask=gmask)
    assert req.tokens.count(ids["sop"]) == 1
    res = score_requests(model, [req], batch_size=4)[0]
    assert [res[s[0]][0] for s in index] == pytest.approx(
        _direct_packed_scores(model, context, single, ids, gmask), abs=1e-4)


def test_packed_and_one_forward_per_choice_agree(loaded):
    model, tok, ids = loaded
    examples = [("The cat sat on the", [" mat", " garden", " train to the coast"]),
                ("中国的首都是", ["北京", "上海", "广州市"]),
                ("A spider has", [" eight legs", " six legs", " wings", " honey"])]
    for text, ch in examples:
        context, choices = tok.encode(text), [tok.encode(c) for c in ch]
        req, index = multiple_choice_request(context, choices, ids, False)
        res = score_requests(model, [req], 8)[0]
        packed = [sum(res[i][0] for i in span) for span in index]
        singles = [multiple_choice_request(context, [c], ids, False)[0] for c in choices]
        unpacked = [sum(lp for lp, _ in r) for r in score_requests(model, singles, 8)]
        assert packed == pytest.approx(unpacked, abs=1e-4)
        assert len(req.tokens) < sum(len(r.tokens) for r in singles)


def test_blank_in_text_scores_choices_at_the_mask(loaded):
    """A [MASK] already in the text is the blank: nothing appended, choices at its position."""
    model, tok, ids = loaded
    context = tok.encode("The cat [MASK] on the mat.")
    choices = [tok.encode(" sat"), tok.encode(" ran away")]
    req, index = multiple_choice_request(context, choices, ids, False)
    assert req.tokens[:len(context)] == context and req.tokens[len(context)] == ids["sop"]
    mpos = context.index(ids["[MASK]"])
    assert set(req.positions[len(context):]) == {mpos}
    # direct: each choice alone, the whole text bidirectional, positions at the mask
    for c, span in zip(choices, index):
        toks = context + [ids["sop"]] + c[:-1]
        pos = list(range(len(context))) + [mpos] * len(c)
        mask = _naive_mask(len(context), [len(c)])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([toks]), torch.tensor([pos]), mask[None, None])[0].double(), -1)
        want = sum(logp[len(context) + k, t].item() for k, t in enumerate(c))
        got = sum(score_requests(model, [req], 2)[0][i][0] for i in span)
        assert got == pytest.approx(want, abs=1e-4)


# ---- metrics ----------------------------------------------------------------------------------
def test_em_f1_hand_computed_english_and_chinese():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.exact_match("The Cat sat!", "cat sat") == 1.0
    assert M.exact_match("a dog", "the cat") == 0.0
    assert M.f1_score("a quick brown fox", "the quick fox") == pytest.approx(0.8)        # P 2/3, R 1
    assert M.f1_score("fox fox", "fox") == pytest.approx(2 * 0.5 * 1 / 1.5)              # bag counts
    assert M.f1_score("", "fox") == 0.0
    assert M.exact_match("北京。", "北京") == 1.0                                          # CJK punctuation
    assert M.f1_score("北京市", "北京") == pytest.approx(0.8)                              # P 2/3, R 1
    assert M.f1_score("我爱北京天安门", "天安门广场") == pytest.approx(0.5)               # P 3/7, R 3/5
    assert M.f1_score("GLM-130B 模型", "GLM-130B") == pytest.approx(0.5)                 # P 1/3, R 1
    assert M.max_over_targets(M.exact_match, "早餐", ["早饭", "早餐"]) == 1.0
    assert M.strict_match(" guitar ", "guitar") == 1.0 and M.strict_match("Guitar", "guitar") == 0.0


def test_lm_metrics_and_aggregates_hand_computed():
    m = M.language_model_metrics(loss=20.0, tokens=10, words=5, n_bytes=40)
    assert m["word_perplexity"] == pytest.approx(math.exp(4.0))
    assert m["token_perplexity"] == pytest.approx(math.exp(2.0))
    assert m["bits_per_byte"] == pytest.approx(0.5 / math.log(2))
    assert M.language_model_metrics(1000.0, 10, 5, 40)["word_perplexity"] == pytest.approx(math.exp(20))
    assert M.mean_stderr([1, 0, 1, 0]) == pytest.approx(math.sqrt((4 * 0.25) / 3 / 4))
    assert M.median([3, 1, 2, 10]) == 2.5


def test_lambada_first_word_rule():
    # GLM-130B: the first beam whose second word is punctuation, else the top beam; its first word
    assert _lambada_prediction([" guitar in the", " guitar .", " cat !"]) == "guitar"
    assert _lambada_prediction([" big red", " tree ."]) == "tree"
    assert _lambada_prediction([" big red", " old man"]) == "big"


# ---- language modelling ---------------------------------------------------------------------
def test_lm_windows_cover_every_token_once():
    assert lm_windows(12, 8, 3) == [(0, 0, 7), (3, 7, 10), (6, 10, 12)]
    for n, L, g in [(1, 8, 3), (7, 8, 3), (8, 8, 3), (50, 16, 5), (50, 16, 15)]:
        scored = [i for _, t0, t1 in lm_windows(n, L, g) for i in range(t0, t1)]
        assert scored == list(range(n))
        assert all(t1 - p0 <= L - 1 for p0, _, t1 in lm_windows(n, L, g))


def test_windowed_perplexity_matches_direct_computation(loaded, tmp_path):
    model, tok, ids = loaded
    text = ("The cat sat on the mat and looked at the garden. Bees make honey in the summer. "
            "The train to the coast was late because of the snow.")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm/doc.txt").write_text(text, encoding="utf-8")
    y = tmp_path / "lm.yaml"
    y.write_text("name: lm\ntype: lm\npath: lm\nfile-pattern: '*.txt'\nmax_seq_length: 24\n"
                 "generation-length: 8\nuse_task_mask: true\n")
    out = Evaluator(model, tok, ids, batch_size=3, show_progress=False).run_task(load_task(y))
    doc = tok.encode(text)
    L, g = 24, 8
    assert len(doc) > 2 * L  # several windows
    # direct: window 0 scores tokens [0, L-1) after [gMASK] <sop>; then each block of g tokens is
    # scored with the L-1-g tokens before it as a bidirectional prefix (docs/glm130b.md §9.2)
    loss, start = 0.0, 0
    while start < len(doc):
        if start == 0:
            prompt, text_ids = [], doc[:L - 1]
        else:
            prompt, text_ids = doc[start - (L - 1 - g):start], doc[start:start + g]
        toks = prompt + [ids["[gMASK]"], ids["sop"]] + text_ids[:-1]
        s, n = len(toks), len(prompt) + 1
        mask = torch.tensor([[not (j < n or j <= i) for j in range(s)] for i in range(s)])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([toks]), torch.arange(s)[None], mask[None, None])[0].double(), -1)
        loss -= sum(logp[n + k, t].item() for k, t in enumerate(text_ids))
        start += len(text_ids)
    words, nbytes = len(text.split()), len(text.encode())
    sample = out.samples[0]
    assert sample["tokens"] == len(doc)
    assert sample["loss"] == pytest.approx(loss, rel=1e-5)
    assert sample["token_perplexity"] == pytest.approx(math.exp(loss / len(doc)), rel=1e-4)
    assert sample["word_perplexity"] == pytest.approx(math.exp(min(20, loss / words)), rel=1e-4)
    assert sample["bits_per_byte"] == pytest.approx(loss / nbytes / math.log(2), rel=1e-5)


# ---- batch-size independence ------------------------------------------------------------------
@pytest.mark.slow
def test_scores_do_not_depend_on_batch_size(loaded, mc_task, tmp_path):
    model, tok, ids = loaded
    (tmp_path / "data/lm").mkdir(parents=True)
    (tmp_path / "data/lm/a.txt").write_text(" ".join(CORPUS) * 3, encoding="utf-8")
    (tmp_path / "data/lm/b.txt").write_text(" ".join(CORPUS[::-1]), encoding="utf-8")
    lm = tmp_path / "lm.yaml"
    lm.write_text("name: lm\ntype: lm\npath: lm\nfile_pattern: '*.txt'\nmax_seq_length: 40\ngeneration_length: 16\n")
    write_jsonl(tmp_path / "data/gen/test.jsonl", [{"inputs_pretokenized": t[:-6], "targets_pretokenized": [t[-6:]]}
                                                   for t in CORPUS])
    gen = tmp_path / "gen.yaml"
    gen.write_text("name: gen\ntype: gen\npath: gen\nmax_gen_length: 3\n")
    for y in (mc_task, lm, gen):
        task = load_task(y, tmp_path / "data")
        runs = [Evaluator(model, tok, ids, bs, show_progress=False).run_task(task).samples for bs in (1, 2, 7)]
        assert runs[0] == runs[1] == runs[2]


# ---- the command: results layout, history, GLM-130B YAMLs ------------------------------------
@pytest.mark.slow
def test_cli_writes_lm_eval_layout_samples_and_history(model_dir, mc_task, tmp_path):
    hist = tmp_path / "history.jsonl"
    r = run_glmctl("evaluate", model_dir, mc_task, "--data-path", tmp_path / "data", "--out", tmp_path / "ev",
                   "--history", hist, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    res = json.loads((tmp_path / "ev/results.json").read_text())
    for key in ("results", "configs", "versions", "n-samples", "higher_is_better", "task_hashes", "config"):
        assert key in res
    assert doc["results"] == res["results"]
    e = res["results"]["mc"]
    assert set(e) >= {"alias", "acc,none", "acc_stderr,none", "acc_norm,none"}
    assert res["n-samples"]["mc"] == {"original": 5, "effective": 5}
    assert res["configs"]["mc"]["output_type"] == "multiple_choice"
    samples = [json.loads(x) for x in (tmp_path / "ev/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all(len(s["scores"]) == len(s["choices"]) for s in samples)
    assert e["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / 5)
    assert all(s["prediction"] == max(range(len(s["scores"])), key=lambda i: s["scores"][i]) for s in samples)
    assert read_manifest(tmp_path / "ev", "evaluate")["status"] == "complete"
    (line,) = hist.read_text().splitlines()
    h = json.loads(line)
    assert h["model_manifest_sha256"] == manifest_hash(model_dir)
    assert h["task_hash"] == res["task_hashes"]["mc"] and h["metrics"]["acc,none"] == e["acc,none"]
    # a table on stdout without --json, with another run side by side
    r = run_glmctl("evaluate", model_dir, mc_task, "--data-path", tmp_path / "data", "--compare", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    assert "acc_norm" in r.stdout and "Other" in r.stdout


@pytest.mark.slow
def test_glm130b_yaml_with_file_pattern_groups(model_dir, tmp_path):
    rows = lambda k: [{"inputs_pretokenized": f"Question {i}: what do bees make?", "inputs": [1, 2],  # noqa: E731
                       "choices_pretokenized": [" honey", " milk"], "choices": [[5], [6]], "label": (i + k) % 2}
                      for i in range(3 + k)]
    for k, p in enumerate(["prompt_a", "prompt_b"]):
        write_jsonl(tmp_path / f"data/quiz/{p}/test.jsonl", rows(k))
        write_jsonl(tmp_path / f"data/quiz/{p}/validation.jsonl", rows(k + 1))
    y = tmp_path / "tasks/quiz.yaml"
    y.parent.mkdir()
    y.write_text('name: "Quiz"\ntype: "mul"\npath: "quiz"\nfile-pattern:\n  test: "**/test.jsonl"\n'
                 '  validation: "**/validation.jsonl"\nno-tokenized: true\nmicro-batch-size: 8\n'
                 'max_seq-length: 896\nmodule: "tasks.mmlu.task.MMLU"\n')
    r = run_glmctl("evaluate", model_dir, tmp_path / "tasks", "--data-path", tmp_path / "data",
                   "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ev/results.json").read_text())["results"]
    files = {n: e for n, e in res.items() if n.count("/") == 3}
    sizes = {"Quiz/test/prompt_a/test.jsonl": 3, "Quiz/test/prompt_b/test.jsonl": 4,
             "Quiz/validation/prompt_a/validation.jsonl": 4, "Quiz/validation/prompt_b/validation.jsonl": 5}
    assert set(files) == set(sizes)
    for g in ("test", "validation"):
        names = [n for n in sizes if n.startswith(f"Quiz/{g}/")]
        accs = [files[n]["acc,none"] for n in names]
        ge = res[f"Quiz/{g}"]
        assert ge["acc_max,none"] == max(accs)
        assert ge["acc_median,none"] == pytest.approx(sum(accs) / 2)
        # GLM-130B's size-weighted average over the group's files
        assert ge["acc,none"] == pytest.approx(sum(a * sizes[n] for a, n in zip(accs, names)) /
                                               sum(sizes[n] for n in names))
    samples = [json.loads(x) for x in (tmp_path / "ev/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and samples[0]["inputs"] == "Question 0: what do bees make?"
    assert samples[0]["choices"] == [" honey", " milk"]   # the text, not GLM-130B's icetk ids


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_inputs_one_line_each_and_other_tasks_still_run(model_dir, mc_task, tmp_path):
    d = tmp_path / "data"
    (tmp_path / "t").mkdir()
    (tmp_path / "t/badtype.yaml").write_text('name: "badtype"\ntype: "classify"\npath: "mc"\n')
    write_jsonl(d / "nolabel/test.jsonl", [{"inputs_pretokenized": "a", "choices_pretokenized": ["x", "y"], "label": 0},
                                           {"inputs_pretokenized": "b", "choices_pretokenized": ["x", "y"]}])
    (tmp_path / "t/nolabel.yaml").write_text('name: "nolabel"\ntype: "mul"\npath: "nolabel"\n')
    write_jsonl(d / "range/test.jsonl", [{"inputs_pretokenized": "a", "choices_pretokenized": ["x", "y"], "label": 2}])
    (tmp_path / "t/range.yaml").write_text('name: "range"\ntype: "mul"\npath: "range"\n')
    (tmp_path / "t/nodir.yaml").write_text('name: "nodir"\ntype: "mul"\n\npath: "not_there"\n')
    r = run_glmctl("evaluate", model_dir, tmp_path / "t", mc_task, "--data-path", d, "--out", tmp_path / "ev")
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 5  # four tasks, then the summary line
    assert any(f"badtype.yaml:2: unknown task type 'classify'" in e for e in errors)
    assert any(f"nolabel/test.jsonl:2: no label" in e for e in errors)
    assert any(f"range/test.jsonl:1: label 2 is out of range for 2 choices" in e for e in errors)
    assert any(f"nodir.yaml:4: data folder" in e and "not_there does not exist" in e for e in errors)
    res = json.loads((tmp_path / "ev/results.json").read_text())
    assert set(res["failed"]) == {"badtype", "nolabel", "range", "nodir"}
    assert "acc,none" in res["results"]["mc"] and "error" in res["results"]["range"]


# ---- cron: lock, staleness, gates, resume ---------------------------------------------------------
def _run(model_dir, tasks, tmp_path, **kw):
    """The stage in this process (the CLI is exercised by the tests that check exit codes)."""
    from glmctl.stages.evaluate import EvaluateConfig, run
    return run(EvaluateConfig(model=str(model_dir), tasks=[str(t) for t in tasks], data_path=str(tmp_path / "data"),
                              show_progress=False, **kw))


@pytest.mark.slow
def test_lock_held_exits_75_at_once_or_after_timeout(model_dir, mc_task, tmp_path):
    from glmctl.errors import LockHeld
    lock = tmp_path / "ev.lock"
    with file_lock(lock):
        r = run_glmctl("evaluate", model_dir, mc_task, "--data-path", tmp_path / "data", "--lock", lock)
        assert r.returncode == 75 and "lock held" in r.stderr           # a second process, at once
        t0 = time.monotonic()
        with pytest.raises(LockHeld):
            _run(model_dir, [mc_task], tmp_path, lock=str(lock), lock_timeout=1.0)
        assert time.monotonic() - t0 >= 1.0                             # waited --lock-timeout
        with file_lock(tmp_path / ".ev.lock"), pytest.raises(LockHeld):  # bare --lock: next to --out
            _run(model_dir, [mc_task], tmp_path, out=str(tmp_path / "ev"), lock="auto")
    assert _run(model_dir, [mc_task], tmp_path, out=str(tmp_path / "ev"), lock="auto").exit_code == 0


@pytest.mark.slow
def test_if_stale_skips_until_model_or_task_changes(model_dir, mc_task, tmp_path):
    kw = dict(out=str(tmp_path / "ev"), if_stale=True)
    assert not _run(model_dir, [mc_task], tmp_path, **kw).skipped
    first = read_manifest(tmp_path / "ev")["finished"]
    r = run_glmctl("evaluate", model_dir, mc_task, "--data-path", tmp_path / "data", "--out", tmp_path / "ev",
                   "--if-stale")
    assert r.returncode == 0 and "up to date" in r.stderr
    assert read_manifest(tmp_path / "ev")["finished"] == first
    assert not _run(model_dir, [mc_task], tmp_path, limit=3, **kw).skipped      # other options: stale
    data = tmp_path / "data/mc/test.jsonl"
    data.write_text(data.read_text() + json.dumps({"inputs_pretokenized": "x", "choices_pretokenized": ["a", "b"],
                                                   "label": 1}) + "\n")
    assert not _run(model_dir, [mc_task], tmp_path, limit=3, **kw).skipped      # data changed: stale
    assert _run(model_dir, [mc_task], tmp_path, limit=3, **kw).skipped
    # without --out, the history decides per task
    hist = str(tmp_path / "h.jsonl")
    assert not _run(model_dir, [mc_task], tmp_path, history=hist, if_stale=True).skipped
    assert _run(model_dir, [mc_task], tmp_path, history=hist, if_stale=True).skipped
    assert len(Path(hist).read_text().splitlines()) == 1


@pytest.mark.slow
def test_fail_below_and_above_gate_with_exit_5(model_dir, mc_task, tmp_path):
    r = run_glmctl("evaluate", model_dir, mc_task, "--data-path", tmp_path / "data", "--out", tmp_path / "ev",
                   "--fail-below", "acc=1.01")
    assert r.returncode == 5 and "below 1.01" in r.stderr
    assert read_manifest(tmp_path / "ev")["status"] == "failed-gate"   # results kept
    from glmctl.stages.evaluate import check_gates, load_results, parse_gates
    from glmctl.errors import UsageError
    res = load_results(tmp_path / "ev")
    acc = res["results"]["mc"]["acc,none"]
    gate = lambda below=(), above=(): check_gates(parse_gates(list(below), True) +  # noqa: E731
                                                  parse_gates(list(above), False), res)
    assert gate(["mc:acc,none=0", "acc_norm=0", f"acc={acc}"]) == []
    assert len(gate([f"acc={acc + 1e-9}"])) == 1
    assert "reported no metric bleu" in gate(["mc:bleu=1"])[0]
    assert gate(above=["acc=-1"]) and gate(above=[f"mc:acc={acc}"]) == []
    with pytest.raises(UsageError):
        parse_gates(["acc"], True)


@pytest.mark.slow
def test_resume_after_kill(model_dir, tmp_path):
    rows = [{"inputs_pretokenized": f"{t} ({i})", "choices_pretokenized": [" yes", " no", " maybe"], "label": i % 3}
            for i, t in enumerate(CORPUS * 2)]
    write_jsonl(tmp_path / "data/mc/test.jsonl", rows)
    (tmp_path / "mc.yaml").write_text("name: mc\ntype: mul\npath: mc\n")
    args = ["evaluate", str(model_dir), str(tmp_path / "mc.yaml"), "--data-path", str(tmp_path / "data"),
            "--batch-size", "1"]
    slow = Path(__file__).parent / "scripts" / "slow_evaluate.py"
    p = subprocess.Popen([sys.executable, str(slow), "0.4", *args, "--out", str(tmp_path / "ev")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        caches = list((tmp_path / ".ev.cache").glob("*.jsonl")) if (tmp_path / ".ev.cache").exists() else []
        if caches and len(caches[0].read_text().splitlines()) >= 4:
            cache = caches[0]
            break
        assert p.poll() is None, "finished before it could be killed"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert cache is not None and not (tmp_path / "ev").exists()
    done = len(cache.read_text().splitlines())
    assert 4 <= done < len(rows)
    r = run_glmctl(*args, "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    assert f"resuming: {done} cached requests" in r.stderr
    assert not cache.exists()                       # removed once the run completed
    fresh = run_glmctl(*args, "--out", tmp_path / "fresh")
    a = json.loads((tmp_path / "ev/results.json").read_text())["results"]
    b = json.loads((tmp_path / "fresh/results.json").read_text())["results"]
    assert a == b
    sa = (tmp_path / "ev/samples.jsonl").read_text()
    assert sa == (tmp_path / "fresh/samples.jsonl").read_text() and fresh.returncode == 0


# ---- protocols end to end -------------------------------------------------------------------------
def test_lambada_reports_both_protocols(loaded, tmp_path):
    model, tok, ids = loaded
    rows = [{"inputs_pretokenized": "The cat sat on the mat and looked at the", "targets_pretokenized": ["garden"]},
            {"text": "Bees make honey in the summer, and people eat it with bread"}]
    write_jsonl(tmp_path / "lambada/test.jsonl", rows)
    y = tmp_path / "lambada.yaml"
    y.write_text('name: "LAMBADA"\ntype: "gen"\nmodule: "tasks.lambada.task.LAMBADA"\npath: "lambada"\n'
                 'file-pattern:\n  test: "**/test.jsonl"\nsampling_strategy: "BeamSearchStrategy"\n'
                 'num_beams: 4\nmax_gen_length: 3\nuse_task_mask: true\n')
    out = Evaluator(model, tok, ids, 4, show_progress=False).run_task(load_task(y))
    assert [s["target"] for s in out.samples] == [["garden"], ["bread"]]
    for s, ctx in zip(out.samples, ["The cat sat on the mat and looked at the",
                                    "Bees make honey in the summer, and people eat it with"]):
        assert len(s["beams"]) == 4
        assert s["prediction"] == _lambada_prediction(s["beams"])
        # lm-eval's protocol, directly: " word" after [gMASK] <sop>, greedy at every position
        context, target = tok.encode(ctx), tok.encode(" " + s["target"][0])
        toks = context + [ids["[gMASK]"], ids["sop"]] + target[:-1]
        n = len(context) + 1
        mask = torch.tensor([[not (j < n or j <= i) for j in range(len(toks))] for i in range(len(toks))])
        with torch.no_grad():
            logits = model(torch.tensor([toks]), torch.arange(len(toks))[None], mask[None, None])[0]
        logp = torch.log_softmax(logits.double(), -1)
        assert s["loglikelihood"] == pytest.approx(sum(logp[n + k, t].item() for k, t in enumerate(target)), abs=1e-4)
        greedy = all(int(logits[n + k].argmax()) == t for k, t in enumerate(target))
        assert s["acc_lmeval_greedy_last_word"] == float(greedy)
    from glmctl.evaluation.results import task_entries
    entry = task_entries(out)[0]["LAMBADA"]
    assert {"acc,glm130b_beam_first_word", "acc,lmeval_greedy_last_word",
            "perplexity,lmeval_greedy_last_word"} <= set(entry)
    ll = [s["loglikelihood"] for s in out.samples]
    assert entry["perplexity,lmeval_greedy_last_word"] == pytest.approx(math.exp(-sum(ll) / 2))


@pytest.mark.slow
def test_builtin_tasks_run(model_dir, tmp_path):
    assert set(builtin_tasks()) == {"cloze_en", "cloze_zh", "mc_en", "mc_zh", "ppl_en", "ppl_zh"}
    r = run_glmctl("evaluate", model_dir, "builtin", "--limit", "2", "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ev/results.json").read_text())
    assert set(res["versions"]) == set(builtin_tasks()) and not res["failed"]
    assert "bits_per_byte,none" in res["results"]["ppl_zh"] and "f1,none" in res["results"]["cloze_zh"]
    assert "mc_en/question_answer/test.jsonl" in res["results"]


def _quantize_checkpoint(src: Path, dst: Path, bits: int = 4) -> None:
    """INT4 per-row RTN (docs/glm130b.md §7.1) of every linear weight, via the reference kernels."""
    from glmctl.kernels import quantize_rtn
    from glmctl.tokenizer import Tokenizer as _T  # noqa: F401  (the tokenizer is copied below)
    model = load_model(src)
    qcfg = model.config.replace(quantization={"bits": bits, "group_size": None, "method": "rtn"})
    qmodel = GLM(qcfg)
    sd = {}
    for k, v in model.state_dict().items():
        lin = k.endswith(("query_key_value.weight", "attention.dense.weight", "dense_h_to_4h.weight",
                          "dense_4h_to_h.weight"))
        if lin:
            q, s = quantize_rtn(v, bits)
            sd[k], sd[k + "_scale"] = q, s.to(torch.float32)
        else:
            sd[k] = v
    qmodel.load_state_dict(sd)
    save_model(qmodel, dst, tokenizer=src)


@pytest.mark.slow
def test_int4_checkpoint_evaluates_the_same_way(model_dir, mc_task, tmp_path, loaded):
    _quantize_checkpoint(model_dir, tmp_path / "int4")
    q = load_model(tmp_path / "int4")
    _, tok, ids = loaded
    context, choices = tok.encode("Bees make honey in the"), [tok.encode(" summer"), tok.encode(" train")]
    req, index = multiple_choice_request(context, choices, ids, False)
    res = score_requests(q, [req], 2)[0]
    assert [sum(res[i][0] for i in s) for s in index] == pytest.approx(
        _direct_packed_scores(q, context, choices, ids, False), abs=1e-4)
    r = run_glmctl("evaluate", tmp_path / "int4", mc_task, "--data-path", tmp_path / "data", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["config"]["quantization"]["bits"] == 4 and "acc,none" in doc["results"]["mc"]


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_2_matches_single_process(model_dir, mc_task, tmp_path):
    lm = tmp_path / "lm.yaml"
    (tmp_path / "data/lm").mkdir(parents=True)
    (tmp_path / "data/lm/a.txt").write_text(" ".join(CORPUS) * 2, encoding="utf-8")
    lm.write_text("name: lm\ntype: lm\npath: lm\nfile_pattern: '*.txt'\nmax_seq_length: 48\ngeneration_length: 16\n")
    args = ["evaluate", str(model_dir), str(mc_task), str(lm), "--data-path", str(tmp_path / "data")]
    exe = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([str(exe), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(free_port()), "-m", "glmctl", *args, "--out", str(tmp_path / "tp2")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_glmctl(*args, "--out", tmp_path / "tp1").returncode == 0
    a = json.loads((tmp_path / "tp2/results.json").read_text())
    b = json.loads((tmp_path / "tp1/results.json").read_text())
    assert a["config"]["tensor_parallel_size"] == 2 and b["config"]["tensor_parallel_size"] == 1
    for task in ("mc", "lm"):
        for k, v in b["results"][task].items():
            if isinstance(v, float):
                assert a["results"][task][k] == pytest.approx(v, rel=1e-4), (task, k)
