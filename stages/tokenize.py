"""Stages `glmctl tokenizer train` and `glmctl tokenize`: corpus -> tokenizer/, corpus -> tokens/.

Both read their CORPUS arguments with glmctl.corpus (files and folders of .txt, .jsonl and
.zst; unusable records skipped and counted by reason). ``train_tokenizer`` samples every input
evenly and trains a sentencepiece model with the GLM special tokens. ``run`` encodes the corpus
into Megatron .bin/.idx shards with glmctl.shards (worker pool, shards in order, resumable from
``.<out>.partial/`` with ``resume``); the output does not depend on ``workers`` or ``chunk_size``.
A tokenize run always holds ``.<out>.lock`` beside OUT: two runs into one OUT would share the
partial folder.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from glmctl import console
from glmctl.artifacts import read_manifest
from glmctl.corpus import (REASONS, artifact_inputs, available_cpus, check_out, expand_inputs, iter_documents,
                           sample_lines)
from glmctl.data import token_dtype
from glmctl.errors import InputError, UsageError
from glmctl.shards import ShardWriter, encode_corpus, start_state
from glmctl.stage import StageOutput, StageResult
from glmctl.tokenizer import SENTENCEPIECE_OPTIONS, Tokenizer, build_meta


@dataclass(frozen=True)
class TrainConfig:
    inputs: tuple[str, ...]
    out: str
    vocab_size: int  # sentencepiece pieces; the model vocab adds the 8 specials and pads to 128
    model_type: str = "unigram"
    sample_size: int = 50_000_000  # bytes of text sampled, split evenly over the inputs
    threads: int | None = None  # None: all available CPUs
    character_coverage: float = 0.9995  # rarer characters fall back to bytes
    seed: int = 0
    json_key: str = "text"
    txt_blocks: bool = False
    if_stale: bool = False

    def validate(self) -> None:
        problems = []
        if self.vocab_size is None or self.vocab_size < 300:
            problems.append(f"--vocab-size must be at least 300 (256 byte pieces + a few), got {self.vocab_size}")
        if self.model_type not in ("unigram", "bpe"):
            problems.append(f"--model-type must be unigram or bpe, got {self.model_type!r}")
        if self.sample_size < 1000:
            problems.append(f"--sample-size must be at least 1kB, got {self.sample_size} bytes")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be >= 1, got {self.threads}")
        if not 0.9 <= self.character_coverage <= 1.0:
            problems.append(f"--character-coverage must be in [0.9, 1], got {self.character_coverage}")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass(frozen=True)
class TokenizeConfig:
    inputs: tuple[str, ...]
    tokenizer: str
    out: str
    workers: int | None = None  # None: all available CPUs; 0: encode in the main process
    json_key: str = "text"
    append_eod: bool = True
    shard_size: int = 1 << 30  # bytes of .bin per shard, at most (a bigger document gets its own)
    txt_blocks: bool = False
    resume: bool = False
    if_stale: bool = False
    chunk_size: int = 1 << 20  # bytes read per task; changes neither output nor resume points

    def validate(self) -> None:
        problems = []
        if self.workers is not None and self.workers < 0:
            problems.append(f"--workers must be >= 0, got {self.workers}")
        if self.shard_size < 1024:
            problems.append(f"--shard-size must be at least 1KiB, got {self.shard_size} bytes")
        if self.chunk_size < 1:
            problems.append(f"--chunk-size must be positive, got {self.chunk_size}")
        if not self.json_key:
            problems.append("--json-key must not be empty")
        if problems:
            raise UsageError("; ".join(problems))


# ---- tokenize --------------------------------------------------------------------------------
def run(config: TokenizeConfig) -> StageResult:
    """Tokenize the corpus into Megatron shards under config.out; the summary goes into the manifest."""
    config.validate()
    groups = expand_inputs(config.inputs)
    files = [f for g in groups for f in g]
    input_of = [i for i, g in enumerate(groups) for _ in g]
    read_manifest(config.tokenizer)  # a complete artifact (or checkpoint), else exit 3
    tok = Tokenizer.load(config.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    hashed = {"json_key": config.json_key, "append_eod": config.append_eod, "shard_size": config.shard_size,
              "txt_blocks": config.txt_blocks, "vocab_size": tok.vocab_size, "dtype": dtype.name}
    inputs = [config.tokenizer] + artifact_inputs(config.inputs, groups)
    out = Path(config.out)
    o = StageOutput("tokenize", out, lock="auto", if_stale=config.if_stale)
    if o.up_to_date(hashed, inputs):  # before the lock: an up-to-date OUT is answered even while a run holds it
        return o.result
    check_out(out, files)
    workers = available_cpus() if config.workers is None else config.workers
    with o:
        partial, state_path = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.partial.json")
        state = start_state(config.out, partial, state_path, hashed, files, len(groups), resume=config.resume)
        t0 = time.monotonic()
        writer = ShardWriter(partial=partial, state_path=state_path, state=state, dtype=dtype,
                             shard_size=config.shard_size)
        resumed_docs = sum(s["documents"] for s in state["inputs"])
        done = encode_corpus(files, input_of, writer, tok, tokenizer_dir=config.tokenizer, workers=workers,
                             json_key=config.json_key, eod=tok.eod_token_id if config.append_eod else None,
                             txt_blocks=config.txt_blocks, chunk_size=config.chunk_size)
        writer.close(None)
        summary = _summary(state, groups, config, tok, dtype, workers, done, time.monotonic() - t0)
        summary["resumed_after_documents"] = resumed_docs
        if summary["documents"] == 0:
            raise InputError(f"{', '.join(config.inputs)}: no documents (skipped: {summary['skipped']})")
        # the finished shards become OUT, manifest last; a resumed run began with the first try
        with o.writer(hashed, inputs, staging=partial, started=_dt.datetime.fromisoformat(state["started"])) as w:
            w.summary = summary
        state_path.unlink(missing_ok=True)
    return StageResult(summary=summary, out=out)


def _summary(state, groups, config, tok, dtype, workers, done, seconds) -> dict:
    ins = []
    for arg, files, st in zip(config.inputs, groups, state["inputs"]):
        ins.append({"path": str(arg), "files": len(files), **st})
    skipped = {r: sum(i["skipped"][r] for i in ins) for r in REASONS}
    nbytes = sum(i["bytes"] for i in ins)
    return {
        "documents": sum(i["documents"] for i in ins), "tokens": sum(i["tokens"] for i in ins), "bytes": nbytes,
        "skipped": skipped, "damaged": [d for i in ins for d in i["damaged"]],
        "shards": state["shards"], "inputs": ins, "dtype": dtype.name, "vocab_size": tok.vocab_size,
        "eod_token_id": tok.eod_token_id, "append_eod": config.append_eod, "workers": workers,
        "seconds": round(seconds, 3), "tokens_per_s": round(done["tokens"] / seconds, 1) if seconds > 0 else None,
        "mb_per_s": round(done["bytes"] / seconds / 1e6, 3) if seconds > 0 else None,
    }


# ---- tokenizer train -------------------------------------------------------------------------
def train_tokenizer(config: TrainConfig) -> StageResult:
    """Train a sentencepiece model on an even sample of every input; write the tokenizer artifact."""
    config.validate()
    groups = expand_inputs(config.inputs)
    hashed = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("inputs", "out", "if_stale", "threads")}
    inputs = artifact_inputs(config.inputs, groups)
    out = Path(config.out)
    with StageOutput("tokenizer", out, if_stale=config.if_stale) as o:
        if o.up_to_date(hashed, inputs):
            return o.result
        check_out(out, [f for g in groups for f in g])
        lines, per_input, counts = _sample(config, groups)
        threads = config.threads or available_cpus()
        console.log(f"training a {config.model_type} model, {config.vocab_size} pieces, on "
                    f"{sum(p['bytes_sampled'] for p in per_input) / 1e6:.1f} MB ({len(lines)} lines), "
                    f"{threads} threads")
        t0 = time.monotonic()
        model = _train(config, lines, threads)
        seconds = time.monotonic() - t0
        tok = Tokenizer(model, build_meta(model, model_type=config.model_type))
        summary = {"model_type": config.model_type, "num_text_tokens": tok.num_text_tokens,
                   "vocab_size": tok.vocab_size, "special_tokens": tok.special_ids, "inputs": per_input,
                   "skipped": counts, "train_seconds": round(seconds, 2), "threads": threads}
        with o.writer(hashed, inputs) as w:
            tok.save(w.path)
            w.summary = summary
    return StageResult(summary=summary, out=out)


def _sample(config: TrainConfig, groups: list) -> tuple[list, list, dict]:
    """An even share of ``sample_size`` from each input: (lines, per-input counts, skipped records)."""
    share = config.sample_size // len(groups)
    lines, per_input, counts = [], [], {}
    total_disk = sum(f.stat().st_size for g in groups for f in g)
    with console.progress(total=total_disk / 1e6, desc="sample", unit="MB") as bar:
        for i, (arg, files) in enumerate(zip(config.inputs, groups)):
            docs = iter_documents(files, json_key=config.json_key, txt_blocks=config.txt_blocks, counts=counts,
                                  bar=bar)
            got, nbytes, seen = sample_lines(docs, share, seed=config.seed * 1000003 + i)
            lines.extend(got)
            per_input.append({"path": str(arg), "files": len(files), "bytes_seen": seen, "bytes_sampled": nbytes,
                              "lines_sampled": len(got)})
    if not lines:
        raise InputError(f"{', '.join(config.inputs)}: no text to train on (skipped: {counts or 'nothing'})")
    return lines, per_input, counts


def _train(config: TrainConfig, lines: list, threads: int) -> bytes:
    """The sentencepiece model proto; a training failure is a usage error naming what to change."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type=config.model_type,
            vocab_size=config.vocab_size, character_coverage=config.character_coverage,
            num_threads=threads, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
            **SENTENCEPIECE_OPTIONS)
    except RuntimeError as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        msg = msg.split("] ", 1)[-1]  # drop sentencepiece's "INTERNAL: file.cc(638) [check]" prefix
        raise UsageError(f"sentencepiece could not train: {msg} (try a different --vocab-size, a larger "
                         f"--sample-size or a lower --character-coverage)") from None
    return model.getvalue()
