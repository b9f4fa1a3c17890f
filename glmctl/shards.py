"""Tokenize pipeline: corpus chunks -> parse + sentencepiece-encode -> Megatron shards, in order, resumable.

    main: read raw bytes in chunks cut at record boundaries (glmctl.corpus) --> pool of `workers`
          processes: parse records + encode (``Tokenizer.encode_arrays``) --> main, in order:
          split into shards at document boundaries, write .bin/.idx (glmctl.data)

Memory stays flat in corpus size and the output does not depend on ``workers``. With one worker,
the worker is a thread of the main process (sentencepiece releases the GIL while it encodes) and
the main thread parses, so nothing is copied between processes; with ``workers=0`` everything runs
in turn in the main thread.

Resume: each finished shard is renamed into the partial folder and the state file records where
the next shard starts (file, byte offset, records to skip) plus the counts so far; ``start_state``
with ``resume`` restarts there. Shards are cut by document sizes only, so a resumed run writes the
same bytes.
"""
from __future__ import annotations

import datetime as _dt
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from glmctl import console
from glmctl.artifacts import atomic_write_bytes, atomic_write_json, config_hash, fsync_dir
from glmctl.corpus import KEPT, REASONS, Chunk, Parsed, fingerprint, iter_chunks, parse_records, record_format
from glmctl.data import index_bytes
from glmctl.errors import UsageError
from glmctl.tokenizer import Tokenizer

STATE_VERSION = 1


def encode_docs(tok, texts: list, *, eod: int | None, dtype):
    """Documents -> (tokens [sum(lengths)] of dtype, lengths [n] int64), eod appended when given."""
    arrs = tok.encode_arrays(texts)
    lengths = np.fromiter(map(len, arrs), dtype=np.int64, count=len(arrs))
    if eod is not None:
        docs, arrs = arrs, [np.array([eod], dtype=np.int32)] * (2 * len(arrs))
        arrs[::2] = docs
        lengths += 1
    # ids fit ``dtype`` (glmctl.data.token_dtype): cast while concatenating, in one pass
    tokens = np.concatenate(arrs, dtype=dtype, casting="unsafe") if arrs else np.zeros(0, dtype=dtype)
    return tokens, lengths


# ---- worker processes ------------------------------------------------------------------------
_W: dict = {}


def _worker_init(tokenizer_dir: str, opts: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    _W.update(opts, tok=Tokenizer.load(tokenizer_dir))


def _worker_task(task):
    """("raw", data, fmt, first_line) -> (Parsed, tokens, lengths), in a worker process."""
    _, data, fmt, first_line = task
    parsed = parse_records(data, fmt, _W["json_key"], first_line)
    tokens, lengths = encode_docs(_W["tok"], parsed.texts, eod=_W["eod"], dtype=_W["dtype"])
    parsed.texts = []  # the main process does not need them back
    return parsed, tokens, lengths


# ---- shard writer with resume state ----------------------------------------------------------
class ShardWriter:
    """Appends documents to shards in order; at each shard end, saves where the next one starts.

    ``state`` comes from ``start_state``; finished shards are renamed into ``partial``.
    """

    def __init__(self, *, partial: Path, state_path: Path, state: dict, dtype, shard_size: int):
        self.partial, self.state_path, self.state = partial, state_path, state
        self.dtype = dtype
        self.cap = max(1, shard_size // dtype.itemsize)  # tokens per shard
        self.skip = state["position"]["skip"] if state["position"] else 0
        self.cur_file = state["position"]["file"] if state["position"] else -1
        self.file_docs = state["position"]["file_docs"] if state["position"] else 0
        self.inputs = state["inputs"]
        self.shard_tokens, self.lengths, self.fh = 0, [], None
        self.logged = {r: 0 for r in range(1, len(REASONS) + 1)}

    def _name(self) -> str:
        return f"shard-{len(self.state['shards']):05d}"

    def add(self, c: Chunk, parsed: Parsed, tokens, lengths, input_idx: int, paths: list) -> int:
        """Append a chunk's documents (from the resume point on); returns how many were written."""
        st = np.frombuffer(parsed.statuses, dtype=np.int8)
        r0 = min(self.skip, len(st))  # records already written before an interruption
        self.skip -= r0
        if c.file != self.cur_file:
            self.cur_file, self.file_docs = c.file, 0
        kept = np.flatnonzero(st == KEPT)  # record index of each document
        ends = np.concatenate([[0], np.cumsum(lengths)])
        nbytes = np.concatenate([[0], np.cumsum(np.asarray(parsed.doc_bytes, dtype=np.int64))])
        d, n = int(np.searchsorted(kept, r0)), len(lengths)
        rec, stats, written = r0, self.inputs[input_idx], 0
        while d < n:
            fit = int(np.searchsorted(ends[d + 1:] - ends[d], self.cap - self.shard_tokens, side="right"))
            if fit == 0 and self.shard_tokens == 0:
                fit = 1  # a document longer than a shard gets a shard of its own
            if fit:
                if self.fh is None:
                    self.fh = open(self.partial / f".{self._name()}.bin.tmp", "wb")
                self.fh.write(memoryview(tokens[ends[d]: ends[d + fit]]))  # contiguous slice: no copy
                self.lengths.append(lengths[d: d + fit])
                k = int(ends[d + fit] - ends[d])
                self.shard_tokens += k
                stats["documents"] += fit
                stats["tokens"] += k
                stats["bytes"] += int(nbytes[d + fit] - nbytes[d])
                self.file_docs += fit
                written += fit
                d += fit
            if d < n:  # document d starts the next shard
                self._count(st[rec: kept[d]], stats, c, paths, parsed)
                rec = int(kept[d])
                self.close({"file": c.file, "offset": c.offset, "line": c.line, "skip": rec,
                            "file_docs": self.file_docs})
        self._count(st[rec:], stats, c, paths, parsed)
        if c.damage:
            stats["damaged"].append({"path": str(paths[c.file]), "documents_recovered": self.file_docs,
                                     "error": c.damage})
            console.warn(f"{paths[c.file]}: {c.damage}; kept the {self.file_docs} documents before the damage")
        return written

    def _count(self, st, stats: dict, c: Chunk, paths: list, parsed: Parsed) -> None:
        counts = np.bincount(st, minlength=len(REASONS) + 1)
        for r, name in enumerate(REASONS, start=1):
            stats["skipped"][name] += int(counts[r])
            if counts[r] and self.logged[r] < 5:
                for line, code, detail in parsed.examples:
                    if code == r and self.logged[r] < 5:
                        self.logged[r] += 1
                        where = f"{paths[c.file]}:{line}" if line else str(paths[c.file])
                        console.warn(f"{where}: {name.replace('_', ' ')}{f' ({detail})' if detail else ''}; "
                                     f"skipped" + (" (further ones are only counted)" if self.logged[r] == 5 else ""))

    def close(self, position: dict | None) -> None:
        """Finish the current shard (renamed into place) and save the resume state (None: the end)."""
        if self.fh is not None:
            name = self._name()
            lengths = np.concatenate(self.lengths)
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            atomic_write_bytes(self.partial / f"{name}.idx", index_bytes(lengths, self.dtype))
            os.replace(self.partial / f".{name}.bin.tmp", self.partial / f"{name}.bin")
            fsync_dir(self.partial)
            self.state["shards"].append({"name": name, "documents": len(lengths), "tokens": int(lengths.sum()),
                                         "bytes": int(lengths.sum()) * self.dtype.itemsize})
            self.fh, self.lengths, self.shard_tokens = None, [], 0
        self.state["position"] = position
        atomic_write_json(self.state_path, self.state)


# ---- resume state --------------------------------------------------------------------------
def start_state(out: str, partial: Path, state_path: Path, hashed: dict, files: list, n_inputs: int, *,
                resume: bool) -> dict:
    """A fresh state (``partial`` emptied), or the saved one when resuming (after checking that the
    options ``hashed`` and the files did not change; else UsageError)."""
    fp = fingerprint(files)
    if resume and state_path.exists() and partial.is_dir():
        try:
            state = json.loads(state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            state = None
        if state and state.get("version") == STATE_VERSION:
            if state.get("config_hash") != config_hash(hashed):
                raise UsageError(f"cannot resume {out}: options or tokenizer differ from the interrupted run; "
                                 f"rerun without --resume to start over")
            if state.get("files") != fp:
                changed = next((a[0] for a, b in zip(state.get("files", []), fp) if a != b), "the file list")
                raise UsageError(f"cannot resume {out}: {changed} changed since the interrupted run; "
                                 f"rerun without --resume to start over")
            keep = {f".{n}" for s in state["shards"] for n in (s["name"] + ".bin", s["name"] + ".idx")}
            for p in partial.iterdir():
                if f".{p.name}" not in keep:
                    p.unlink()
            console.log(f"resuming {out}: {len(state['shards'])} shards kept "
                        f"({sum(s['documents'] for s in state['shards'])} documents)")
            return state
    if resume:
        console.log(f"{out}: nothing to resume, starting from the beginning")
    elif partial.exists():
        console.log(f"{out}: discarding an interrupted run (pass --resume to continue one)")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {"version": STATE_VERSION, "config_hash": config_hash(hashed), "files": fp,
             "started": _dt.datetime.now(_dt.timezone.utc).isoformat(), "shards": [],
             "position": {"file": 0, "offset": 0, "line": 0, "skip": 0, "file_docs": 0},
             "inputs": [{"documents": 0, "tokens": 0, "bytes": 0, "skipped": {r: 0 for r in REASONS}, "damaged": []}
                        for _ in range(n_inputs)]}
    atomic_write_json(state_path, state)
    return state


# ---- pipeline --------------------------------------------------------------------------------
def encode_corpus(files: list[Path], input_of: list[int], writer: ShardWriter, tok: Tokenizer, *,
                  tokenizer_dir: str, workers: int, json_key: str, eod: int | None, txt_blocks: bool,
                  chunk_size: int) -> dict:
    """Read chunks from the writer's resume position, encode them (pool or in-process), write in order.

    ``input_of[i]``: the CORPUS argument file i came from (counts are kept per argument). The
    worker processes load the tokenizer from ``tokenizer_dir``. Returns what this run did:
    {"chunks", "documents", "tokens", "bytes"}.
    """
    opts = {"json_key": json_key, "eod": eod, "dtype": writer.dtype}
    pos = writer.state["position"] or {"file": len(files), "offset": 0, "line": 0}
    fmts = [record_format(f, txt_blocks) for f in files]
    total = sum(f.stat().st_size for f in files)
    done_disk = sum(f.stat().st_size for f in files[: pos["file"]])

    def chunks():
        for i in range(pos["file"], len(files)):
            first = i == pos["file"]
            yield from iter_chunks(files[i], i, fmts[i], chunk_size,
                                   pos["offset"] if first else 0, pos["line"] if first else 0)

    stats = {"chunks": 0, "documents": 0, "tokens": 0, "bytes": 0}
    pool = thread = None
    if workers >= 2:  # processes that parse and encode; fork before the progress bar starts its thread
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(str(tokenizer_dir), opts))
    elif workers == 1:  # one encoding thread (sentencepiece releases the GIL); this thread reads and parses
        thread = ThreadPoolExecutor(1, thread_name_prefix="glmctl-encode")
    bar = console.progress(total=total / 1e6, desc="tokenize (MB)", unit="MB")
    bar.update(done_disk / 1e6)
    t0 = time.monotonic()
    window = 2 * max(workers, 1) + 2
    pending: deque = deque()

    def submit(c: Chunk):
        """Start a chunk; returns (Parsed or None, a callable giving (Parsed or None, tokens, lengths))."""
        if pool is not None:
            return None, pool.apply_async(_worker_task, (("raw", c.data, fmts[c.file], c.line),)).get
        parsed = parse_records(c.data, fmts[c.file], json_key, c.line)
        if thread is not None:
            fut = thread.submit(encode_docs, tok, parsed.texts, eod=opts["eod"], dtype=opts["dtype"])
            parsed.texts = []  # the encoder holds them; keep memory flat
            return parsed, lambda: (None, *fut.result())
        res = (None, *encode_docs(tok, parsed.texts, eod=opts["eod"], dtype=opts["dtype"]))
        return parsed, lambda: res

    def finish(item):
        c, parsed, get = item
        p2, tokens, lengths = get()
        parsed = parsed or p2
        n = writer.add(c, parsed, tokens, lengths, input_of[c.file], files)
        stats["chunks"] += 1
        stats["documents"] += n
        stats["tokens"] += int(lengths.sum())
        stats["bytes"] += sum(parsed.doc_bytes)
        dt = max(time.monotonic() - t0, 1e-9)
        bar.update(c.disk / 1e6, docs=stats["documents"], tok_s=f"{stats['tokens'] / dt:,.0f}")

    try:
        for c in chunks():
            parsed, get = submit(c)
            c.data = b""  # the worker has its copy; keep memory flat
            pending.append((c, parsed, get))
            while len(pending) >= window or (workers == 0 and pending):
                finish(pending.popleft())
        while pending:
            finish(pending.popleft())
    except KeyboardInterrupt:
        console.log(f"interrupted: {len(writer.state['shards'])} finished shards are kept; "
                    f"rerun with --resume to continue")
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if thread is not None:
            thread.shutdown(wait=True, cancel_futures=True)
    return stats

