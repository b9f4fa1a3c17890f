"""Run one task against a model: build requests, score or decode them, compute metrics.

Each protocol (docs/glm130b.md §9.2-9.3) yields per-example values, collected per data file:

    mul      acc,none  acc_norm,none          summed choice log-prob, argmax; acc_norm divides
                                              by the choice's character length (lm-eval)
    gen      exact_match,none  f1,none        SQuAD-normalised, max over targets
             (+ acc,none when the YAML lists "Accuracy": stripped strings equal)
    lambada  acc,glm130b_beam_first_word      GLM-130B: [gMASK], beam search, punctuation banned,
                                              first word of the first beam followed by punctuation
             acc,lmeval_greedy_last_word      lm-eval: the last word is the greedy continuation
             perplexity,lmeval_greedy_last_word   exp(-mean log-likelihood of the last word)
    lm       word_perplexity,none  token_perplexity,none  byte_perplexity,none  bits_per_byte,none

A file's metrics come from its examples; a group's and the task's from all their examples
pooled (for means this is GLM-130B's size-weighted average over files), plus the max and the
median over files (``acc_max,none``, ``acc_median,none``) when a group has several files.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from pathlib import Path

from glmctl import console
from glmctl.evaluation import data as D
from glmctl.evaluation import metrics as M
from glmctl.evaluation.scoring import (
    Request,
    RequestCache,
    lm_windows,
    multiple_choice_request,
    request_key,
    score_requests,
    window_request,
)
from glmctl.evaluation.tasks import TaskConfig
from glmctl.generation import DecodeRequest, GenerationConfig, decode_batch, span_request

GLM_LAMBADA = "glm130b_beam_first_word"
LMEVAL_LAMBADA = "lmeval_greedy_last_word"
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "token_perplexity", "byte_perplexity", "bits_per_byte")


@dataclass
class FileRecord:
    """What one data file contributed: per-example values of mean-aggregated metrics
    ("name,filter" -> list), lm-eval LAMBADA log-likelihoods, and LM sums."""
    group: str
    path: Path
    rel: str
    n: int = 0
    values: dict = field(default_factory=dict)
    ll: list = field(default_factory=list)
    sums: dict = field(default_factory=dict)
    by_set: dict = field(default_factory=dict)  # Pile: set name -> sums

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(float(value))


@dataclass
class TaskOutcome:
    task: TaskConfig
    records: list[FileRecord] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    n_original: int = 0
    n_effective: int = 0
    settings: dict = field(default_factory=dict)  # effective lengths etc., for results.json configs


# ---- metric summaries -----------------------------------------------------------------------
def _add_sums(into: dict, sums: dict) -> None:
    for k, v in sums.items():
        into[k] = into.get(k, 0) + v


def summarise(records: list[FileRecord]) -> dict[str, float]:
    """Metrics of the pooled examples of ``records`` ("name,filter" keys, lm-eval style)."""
    out: dict[str, float] = {}
    keys = []
    for r in records:
        keys += [k for k in r.values if k not in keys]
    for key in keys:
        vals = [v for r in records for v in r.values.get(key, [])]
        name, filt = key.split(",", 1)
        out[key] = M.mean(vals)
        out[f"{name}_stderr,{filt}"] = M.mean_stderr(vals)
    ll = [v for r in records for v in r.ll]
    if ll:
        out[f"perplexity,{LMEVAL_LAMBADA}"] = math.exp(min(-M.mean(ll), 700.0))
    sums: dict = {}
    for r in records:
        _add_sums(sums, r.sums)
    if sums:
        out.update({f"{k},none": v for k, v in
                    M.language_model_metrics(sums["loss"], sums["tokens"], sums["words"], sums["bytes"]).items()})
    return out


def group_summary(records: list[FileRecord]) -> dict[str, float]:
    """Pooled metrics plus, over several files, GLM-130B's max and median across files."""
    out = summarise(records)
    if len(records) > 1:
        per_file = [summarise([r]) for r in records]
        for key in list(out):
            name, filt = key.split(",", 1)
            if name.endswith("_stderr"):
                continue
            vals = [pf[key] for pf in per_file if key in pf and not math.isnan(pf[key])]
            if vals:
                out[f"{name}_max,{filt}"] = max(vals)
                out[f"{name}_median,{filt}"] = M.median(vals)
    return out


def higher_is_better(metric_key: str) -> bool:
    name = metric_key.split(",", 1)[0]
    for suffix in ("_stderr", "_max", "_median"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name not in LOWER_IS_BETTER


# ---- the evaluator ------------------------------------------------------------------------
class Evaluator:
    """Runs tasks against one loaded model. ``cache`` makes interrupted runs resumable."""

    def __init__(self, model, tokenizer, ids: dict[str, int], batch_size: int = 8,
                 cache: RequestCache | None = None, limit: int | None = None, show_progress: bool = True):
        self.model, self.tok, self.ids = model, tokenizer, ids
        self.batch_size = max(1, int(batch_size))
        self.cache, self.limit = cache, limit
        self.show_progress = show_progress
        self.model_max_len = model.config.max_sequence_length
        self._special = {ids[k] for k in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "eod") if k in ids}

    def text(self, tokens: list[int]) -> str:
        """Decoded generated text, special tokens left out."""
        return self.tok.decode([t for t in tokens if t not in self._special])

    # -- helpers --
    def _max_len(self, task: TaskConfig, outcome: TaskOutcome) -> int:
        L = min(task.max_seq_length, self.model_max_len)
        outcome.settings["max_seq_length"] = L
        return L

    def _progress(self, total: int, desc: str):
        return console.progress(total, desc, "req", enabled=self.show_progress)

    def _score(self, reqs: list[Request], desc: str):
        with self._progress(len(reqs), desc) as bar:
            return score_requests(self.model, reqs, self.batch_size, self.cache, bar,
                                  pad_id=self.ids.get("pad", 0))

    def run_task(self, task: TaskConfig) -> TaskOutcome:
        outcome = TaskOutcome(task)
        groups = task.file_groups()
        if task.type == "mul":
            self._multiple_choice(task, groups, outcome)
        elif task.type == "lm":
            self._language_model(task, groups, outcome)
        elif task.protocol == "lambada":
            self._lambada(task, groups, outcome)
        else:
            self._generation(task, groups, outcome)
        return outcome

    def _files(self, task, groups, outcome, reader):
        """[(record, items)] for every data file, reading with ``reader(path)``."""
        out = []
        for group, files in groups.items():
            for f in files:
                items = reader(f)
                rec = FileRecord(group, f, str(f.relative_to(task.data_dir)), len(items))
                outcome.n_effective += len(items)
                out.append((rec, items))
                outcome.records.append(rec)
        return out

    def _count_original(self, path: Path) -> int:
        return sum(1 for _ in D.read_jsonl(path)) if path.suffix in (".json", ".jsonl") else 1

    def _limit_note(self, outcome: TaskOutcome, files) -> None:
        outcome.n_original = (sum(self._count_original(rec.path) for rec, _ in files)
                              if self.limit is not None else outcome.n_effective)

    # -- multiple choice --
    def _multiple_choice(self, task, groups, outcome):
        L = self._max_len(task, outcome)
        files = self._files(task, groups, outcome,
                            lambda f: D.read_multiple_choice(f, self.tok, self.ids, L, self.limit))
        self._limit_note(outcome, files)
        reqs, index = [], []
        for _, examples in files:
            for ex in examples:
                r, idx = multiple_choice_request(ex.context, ex.choices, self.ids, task.use_task_mask)
                r.key = request_key("mul", task.use_task_mask, ex.context, ex.choices)
                reqs.append(r)
                index.append(idx)
        results = self._score(reqs, task.name)
        k = 0
        for rec, examples in files:
            for doc_id, ex in enumerate(examples):
                res, idx = results[k], index[k]
                k += 1
                scores = [sum(res[i][0] for i in span) for span in idx]
                norm = [s / max(1, len(t.strip())) for s, t in zip(scores, ex.choice_texts)]  # lm-eval: the choice without its delimiter
                pred = max(range(len(scores)), key=lambda i: (scores[i], -i))
                pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
                rec.add("acc,none", pred == ex.label)
                rec.add("acc_norm,none", pred_norm == ex.label)
                outcome.samples.append({
                    "task": task.name, "group": rec.group, "file": rec.rel, "line": ex.line, "doc_id": doc_id,
                    "inputs": ex.inputs, "choices": ex.choice_texts, "target": ex.label,
                    "scores": scores, "scores_norm": norm, "prediction": pred, "prediction_norm": pred_norm,
                    "acc": float(pred == ex.label), "acc_norm": float(pred_norm == ex.label),
                    "truncated": ex.truncated})

    # -- language modelling --
    def _language_model(self, task, groups, outcome):
        L = self._max_len(task, outcome)
        g = task.generation_length
        if g > L - 1:
            console.warn(f"{task.where('generation_length')}: generation_length {g} does not fit the model's "
                         f"{L} positions; using {L - 1} (windows without overlapping context)")
            g = L - 1
        outcome.settings["generation_length"] = g
        files = self._files(task, groups, outcome, lambda f: D.read_documents(f, self.tok, self.ids, self.limit))
        self._limit_note(outcome, files)
        reqs, owner = [], []
        for fi, (_, docs) in enumerate(files):
            for di, doc in enumerate(docs):
                for (p0, t0, t1) in lm_windows(len(doc.tokens), L, g):
                    prompt, text = doc.tokens[p0:t0], doc.tokens[t0:t1]
                    r = window_request(prompt, text, self.ids, task.use_task_mask, task.unidirectional)
                    r.key = request_key("lm", task.use_task_mask, task.unidirectional, prompt, text)
                    reqs.append(r)
                    owner.append((fi, di))
        results = self._score(reqs, task.name)
        loss: dict = {}
        for (fi, di), res in zip(owner, results):
            loss[(fi, di)] = loss.get((fi, di), 0.0) - sum(lp for lp, _ in res)
        for fi, (rec, docs) in enumerate(files):
            for di, doc in enumerate(docs):
                sums = {"loss": loss.get((fi, di), 0.0), "tokens": len(doc.tokens), "words": doc.n_words,
                        "bytes": doc.n_bytes}
                _add_sums(rec.sums, sums)
                if doc.set_name is not None:
                    _add_sums(rec.by_set.setdefault(doc.set_name, {}), sums)
                outcome.samples.append({
                    "task": task.name, "group": rec.group, "file": rec.rel, "line": doc.line, "doc_id": di,
                    "set": doc.set_name, "tokens": len(doc.tokens), "words": doc.n_words, "bytes": doc.n_bytes,
                    "loss": sums["loss"],
                    **M.language_model_metrics(sums["loss"], sums["tokens"], sums["words"], sums["bytes"])})

    # -- generation --
    def _gen_config(self, task, beam: bool | None = None, banned=(), banned_first=()):
        beam = task.sampling_strategy == "BeamSearchStrategy" if beam is None else beam
        if beam:
            return GenerationConfig(strategy="beam", max_new_tokens=task.max_gen_length, num_beams=task.num_beams,
                                    length_penalty=task.length_penalty,
                                    no_repeat_ngram_size=task.no_repeat_ngram_size,
                                    min_new_tokens=task.min_gen_length, deterministic=True, consider_end=True,
                                    banned_token_ids=tuple(banned), banned_first_token_ids=tuple(banned_first))
        # GLM-130B evaluates BaseStrategy with temperature 1 and top_k 1: greedy.
        return GenerationConfig(strategy="greedy", max_new_tokens=task.max_gen_length,
                                banned_token_ids=tuple(banned), banned_first_token_ids=tuple(banned_first))

    def _decode_request(self, task, context: list[int]):
        """Spec §4.4: a [MASK] in the text is the blank; else [MASK]/[gMASK] is appended and the
        context is bidirectional; unidirectional puts [gMASK, sop] first and is causal."""
        ids = self.ids
        mask_id = ids["[gMASK]"] if task.use_task_mask else ids["[MASK]"]
        if task.unidirectional:
            tokens = [mask_id, ids["sop"]] + list(context)
            n = len(tokens)
            return DecodeRequest(tokens, list(range(n)), 0, lambda k, _n=n: _n - 1 + k)
        if mask_id in context:
            return span_request(list(context), mask_id, ids)
        return span_request(list(context) + [mask_id], mask_id, ids)

    def _decode(self, task, contexts: list[list[int]], gen, desc: str) -> list[list[list[int]]]:
        """Hypotheses' tokens (best first) for every context, cached; batches hold contexts of
        one length, so no request is padded and results do not depend on the batch size."""
        reqs = [self._decode_request(task, c) for c in contexts]
        gkey = {k: v for k, v in vars(gen).items()}
        keys = [request_key("gen", gkey, r.tokens, r.positions, r.prefix_len, r.next_position(1)) for r in reqs]
        out: list = [None] * len(reqs)
        todo = []
        for i, key in enumerate(keys):
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                out[i] = hit
            else:
                todo.append(i)
        buckets: dict[int, list[int]] = {}
        for i in todo:
            buckets.setdefault(len(reqs[i].tokens), []).append(i)
        with self._progress(len(reqs), desc) as bar:
            bar.update(len(reqs) - len(todo))
            for length in sorted(buckets, reverse=True):
                idx = buckets[length]
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s:s + self.batch_size]
                    hyps = decode_batch(self.model, [reqs[i] for i in chunk], gen, self.ids)
                    for i, h in zip(chunk, hyps):
                        out[i] = [list(x.tokens) for x in h]
                        if self.cache is not None:
                            self.cache.put(keys[i], out[i])
                    if self.cache is not None:
                        self.cache.flush()
                    bar.update(len(chunk))
        return out

    def _generation(self, task, groups, outcome):
        L = self._max_len(task, outcome)
        files = self._files(task, groups, outcome, lambda f: D.read_generation(
            f, self.tok, self.ids, L, task.max_gen_length, self.limit))
        self._limit_note(outcome, files)
        gen = self._gen_config(task)
        outcome.settings["decoding"] = {"strategy": gen.strategy, "max_new_tokens": gen.max_new_tokens,
                                        **({"num_beams": gen.num_beams} if gen.strategy == "beam" else {})}
        contexts = [ex.context for _, exs in files for ex in exs]
        hyps = self._decode(task, contexts, gen, task.name)
        want_acc = "Accuracy" in task.metrics
        k = 0
        for rec, examples in files:
            for doc_id, ex in enumerate(examples):
                best = hyps[k][0] if hyps[k] else []
                k += 1
                pred = self.text(best)
                em = M.max_over_targets(M.exact_match, pred, ex.targets)
                f1 = M.max_over_targets(M.f1_score, pred, ex.targets)
                rec.add("exact_match,none", em)
                rec.add("f1,none", f1)
                sample = {"task": task.name, "group": rec.group, "file": rec.rel, "line": ex.line, "doc_id": doc_id,
                          "inputs": ex.inputs, "target": ex.targets, "prediction": pred,
                          "exact_match": em, "f1": f1, "truncated": ex.truncated}
                if want_acc:
                    acc = M.max_over_targets(M.strict_match, pred, ex.targets)
                    rec.add("acc,none", acc)
                    sample["acc"] = acc
                outcome.samples.append(sample)

    # -- LAMBADA, both protocols --
    def lambada_bans(self) -> tuple[list[int], list[int]]:
        """GLM-130B's LAMBADA bans for this tokenizer: every punctuation mark that is a single
        token is banned at every step; the first token of those and of the multi-token ones is
        banned as the first generated token. (GLM-130B bans a multi-token mark's LAST token
        after its other tokens; glmctl's decoder bans by position only, so those are approximated
        by their first token when that is not a bare word-boundary piece.)"""
        single, first = set(), set()
        boundary = set(self.tok.encode(" ")) if hasattr(self.tok, "encode") else set()
        for p in string.punctuation:
            pp = self.tok.encode(p)
            if len(pp) == 1:
                single.add(pp[0])
                first.add(pp[0])
            elif pp and pp[0] not in boundary and self.tok.decode([pp[0]]).strip() in string.punctuation:
                first.add(pp[0])
        return sorted(single), sorted(first)

    def _lambada(self, task, groups, outcome):
        L = self._max_len(task, outcome)
        files = self._files(task, groups, outcome, lambda f: D.read_generation(
            f, self.tok, self.ids, L, task.max_gen_length, self.limit))
        self._limit_note(outcome, files)
        banned, banned_first = self.lambada_bans()
        gen = self._gen_config(task, banned=banned, banned_first=banned_first)
        outcome.settings["decoding"] = {"strategy": gen.strategy, "max_new_tokens": gen.max_new_tokens,
                                        "num_beams": gen.num_beams if gen.strategy == "beam" else 1,
                                        "banned_tokens": len(banned)}
        examples = [ex for _, exs in files for ex in exs]
        hyps = self._decode(task, [ex.context for ex in examples], gen, f"{task.name} ({GLM_LAMBADA})")
        # lm-eval protocol: log-likelihood of the last word after the bidirectional context.
        reqs, targets = [], []
        for ex in examples:
            word = ex.targets[0].strip() if ex.targets else ""
            if word[:1].isascii() and word[:1].isalnum() and ex.inputs[-1:] and not ex.inputs[-1].isspace():
                word = " " + word  # lm-eval's continuation: target_delimiter " " + the last word
            target = D.encode(self.tok, word, self.ids)
            if not target:
                target = [self.ids["eos"]]
            prompt = ex.context[max(0, len(ex.context) + len(target) + 1 - L):]
            r = window_request(prompt, target, self.ids, use_task_mask=True)
            r.key = request_key("lambada-lm", prompt, target)
            reqs.append(r)
            targets.append(target)
        scored = self._score(reqs, f"{task.name} ({LMEVAL_LAMBADA})")
        k = 0
        for rec, exs in files:
            for doc_id, ex in enumerate(exs):
                beams = [self.text(h) for h in hyps[k]]
                res = scored[k]
                k += 1
                pred = _lambada_prediction(beams)
                acc = M.max_over_targets(M.strict_match, pred, ex.targets)
                ll = sum(lp for lp, _ in res)
                greedy = all(g for _, g in res)
                rec.add(f"acc,{GLM_LAMBADA}", acc)
                rec.add(f"acc,{LMEVAL_LAMBADA}", greedy)
                rec.ll.append(ll)
                outcome.samples.append({
                    "task": task.name, "group": rec.group, "file": rec.rel, "line": ex.line, "doc_id": doc_id,
                    "inputs": ex.inputs, "target": ex.targets, "prediction": pred, "beams": beams,
                    f"acc_{GLM_LAMBADA}": acc, "loglikelihood": ll, f"acc_{LMEVAL_LAMBADA}": float(greedy),
                    "truncated": ex.truncated})


def _lambada_prediction(beams: list[str]) -> str:
    """GLM-130B: the first beam whose second space-separated word is a punctuation mark, else
    the top beam; its first word."""
    for text in beams:
        words = text.strip().split(" ")
        if len(words) >= 2 and words[1] in string.punctuation:
            return words[0]
    return beams[0].strip().split(" ")[0] if beams else ""
