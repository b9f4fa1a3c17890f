"""Stages `glmctl tokenizer train` and `glmctl tokenize`: corpus -> tokenizer/, corpus -> tokens/.

Corpus reading (both stages): each CORPUS argument is a file or a folder searched recursively for
``.txt``, ``.jsonl`` and ``.jsonl.zst`` / ``.txt.zst`` (the Pile's format). A ``.jsonl`` line is a
document (its ``json_key`` field); a ``.txt`` file is one document, or one per blank-line-separated
block with ``txt_blocks``. Records that are not usable documents are skipped and counted by reason
(REASONS); a damaged ``.zst`` keeps the documents before the damage and is reported.

Tokenize pipeline (memory flat in corpus size; the output does not depend on ``workers``):

    main: read raw bytes in chunks cut at record boundaries --> pool of `workers` processes:
          parse records + sentencepiece-encode (``Tokenizer.encode_arrays``) --> main, in order:
          split into shards at document boundaries, write .bin/.idx (glmctl.data), manifest last

With one worker, the worker is a thread of the main process (sentencepiece releases the GIL
while it encodes) and the main thread parses, so nothing is copied between processes; with
``workers=0`` everything runs in turn in the main thread. Resume: each finished
shard is renamed into ``.<out>.partial/`` and ``.<out>.partial.json`` records where the next shard
starts (file, byte offset, records to skip) plus the counts so far; ``resume`` restarts there.
Shards are cut by document sizes only, so a resumed run writes the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from glmctl import console
from glmctl.errors import InputError, UsageError

SUFFIXES = {".jsonl": "jsonl", ".jsonl.zst": "jsonl", ".txt": "txt", ".txt.zst": "txt"}
KEPT = 0
REASONS = ("malformed_json", "missing_key", "not_a_string", "invalid_utf8", "empty")  # status 1..5
STATE_VERSION = 1


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


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# ---- inputs ----------------------------------------------------------------------------------
def _suffix(p: Path) -> str | None:
    name = p.name.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return None


def expand_inputs(paths) -> list[list[Path]]:
    """Each CORPUS argument -> its files in a fixed order (folders recursively, sorted)."""
    if not paths:
        raise UsageError("no CORPUS given")
    out = []
    for arg in paths:
        p = Path(arg)
        if not p.exists():
            raise InputError(f"{p}: no such file or directory")
        if p.is_file():
            if _suffix(p) is None:
                raise UsageError(f"{p}: unsupported file type; expected .txt, .jsonl, .jsonl.zst or .txt.zst")
            out.append([p])
            continue
        files = sorted((f for f in p.rglob("*") if f.is_file() and _suffix(f)
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).parts)  # hidden files and folders are skipped
        if not files:
            raise InputError(f"{p}: no .txt, .jsonl or .jsonl.zst files in this folder")
        out.append(files)
    return out


def check_out(out: Path, inputs: list[Path]) -> None:
    """Refuse to replace a folder that is not an artifact, or one that holds the inputs."""
    o = out.resolve()
    for f in inputs:
        if o == f.resolve() or o in f.resolve().parents:
            raise UsageError(f"--out {out} contains the input {f}; choose another output folder")
    if out.exists() and not (out / "manifest.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not a glmctl artifact; refusing to replace it")


def _format(path: Path, txt_blocks: bool) -> str:
    kind = SUFFIXES[_suffix(path)]
    return "blocks" if kind == "txt" and txt_blocks else kind


class _ZstdStream:
    """Decompress a .zst file (any number of frames) with read(n); notes truncation or corruption."""

    def __init__(self, path: Path):
        try:
            import zstandard
        except ImportError:
            raise UsageError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        self._err = zstandard.ZstdError
        self.f = open(path, "rb")
        self.dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        self.dobj, self.fed = self.dctx.decompressobj(), False
        self.buf, self.eof, self.damage = bytearray(), False, None

    def _fill(self) -> None:
        raw = self.f.read(1 << 18)
        if not raw:
            if self.fed and not self.dobj.eof:
                self.damage = "truncated: the zstd stream ends inside a frame"
            self.eof = True
            return
        try:
            while raw:
                self.buf += self.dobj.decompress(raw)
                self.fed = True
                if self.dobj.eof:
                    raw = self.dobj.unused_data
                    self.dobj, self.fed = self.dctx.decompressobj(), False
                else:
                    raw = b""
        except self._err as e:
            self.damage, self.eof = f"corrupt zstd data ({e})", True

    def read(self, n: int) -> bytes:
        while len(self.buf) < n and not self.eof:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_all(self) -> bytes:
        while not self.eof:
            self._fill()
        out, self.buf = bytes(self.buf), bytearray()
        return out

    def disk_pos(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


class _PlainStream:
    damage = None

    def __init__(self, path: Path):
        self.f = open(path, "rb")

    def read(self, n: int) -> bytes:
        return self.f.read(n)

    def read_all(self) -> bytes:
        return self.f.read()

    def disk_pos(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


def _open(path: Path):
    try:
        return _ZstdStream(path) if path.name.lower().endswith(".zst") else _PlainStream(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _is_blank(line: bytes) -> bool:
    return not line.strip()


def _last_cut(buf: bytes, limit: int, fmt: str) -> int:
    """End of the last record boundary within buf[:limit], 0 if none. The buffer starts at a line
    start. jsonl: any line end; blocks: the end of a blank (whitespace-only) line."""
    end = buf.rfind(b"\n", 0, limit)
    if fmt == "jsonl":
        return end + 1
    while end >= 0:
        start = buf.rfind(b"\n", 0, end) + 1
        if _is_blank(buf[start:end]):
            return end + 1
        end = start - 1
    return 0


def _next_cut(buf: bytes, limit: int, fmt: str) -> int:
    """End of the first record boundary past ``limit`` (when _last_cut found none), 0 if none."""
    if fmt == "jsonl":
        return buf.find(b"\n", limit) + 1
    start = buf.rfind(b"\n", 0, limit) + 1
    while (end := buf.find(b"\n", start)) >= 0:
        if _is_blank(buf[start:end]):
            return end + 1
        start = end + 1
    return 0


@dataclass
class Chunk:
    file: int  # index into the run's flat file list
    offset: int  # decompressed byte offset of data in the file (a record boundary)
    line: int  # 0-based line number at that offset
    data: bytes | None  # None: no records (a damaged whole-file .txt.zst)
    disk: int  # on-disk bytes consumed by this chunk (progress)
    damage: str | None = None  # on the final chunk of a damaged .zst


def iter_chunks(path: Path, file_idx: int, fmt: str, chunk_size: int, offset: int = 0, line: int = 0):
    """Chunks of about chunk_size bytes cut at record boundaries.

    A chunk is a pure function of (file content, offset): the largest prefix of the next
    chunk_size bytes that ends on a boundary, or the first whole record if it is longer. So a
    resumed run that starts at a saved offset reads the same records as an uninterrupted one.
    """
    s = _open(path)
    try:
        if fmt == "txt":  # the whole file is one document
            data = s.read_all()
            yield Chunk(file_idx, 0, 0, None if s.damage else data, s.disk_pos(), s.damage)
            return
        left = offset
        while left:
            got = len(s.read(min(left, 1 << 24)))
            if not got:
                raise InputError(f"{path}: shorter than in the interrupted run (cannot resume at byte {offset})")
            left -= got
        disk_prev, buf, eof = s.disk_pos(), b"", False
        while True:
            while len(buf) < chunk_size and not eof:
                more = s.read(chunk_size - len(buf))
                eof = not more
                buf += more
            if eof and s.damage:  # keep the whole records before the damage
                yield Chunk(file_idx, offset, line, buf[: _last_cut(buf, len(buf), fmt)], s.disk_pos() - disk_prev,
                            s.damage)
                return
            if not buf:
                return
            cut = len(buf) if eof and len(buf) <= chunk_size else _last_cut(buf, chunk_size, fmt)
            while not cut:
                more = s.read(chunk_size)
                if not more:
                    eof = True
                    break
                buf += more
                cut = _next_cut(buf, chunk_size, fmt)
            if not cut:
                if s.damage:
                    continue
                cut = len(buf)
            data, buf = buf[:cut], buf[cut:]
            pos = s.disk_pos()
            yield Chunk(file_idx, offset, line, data, pos - disk_prev)
            disk_prev = pos
            offset += len(data)
            line += data.count(b"\n")
    finally:
        s.close()


# ---- records ---------------------------------------------------------------------------------
@dataclass
class Parsed:
    texts: list  # kept documents, in record order
    statuses: bytes  # one status per record: 0 kept, else 1 + index into REASONS
    doc_bytes: list  # UTF-8 bytes of each kept document
    examples: list  # (line, status, detail) of the first few skipped records of each reason


def parse_records(data: bytes | None, fmt: str, json_key: str, first_line: int, max_examples: int = 3) -> Parsed:
    """Split a chunk into records and keep the usable documents.

    Records: the non-blank lines of a .jsonl, the blocks of non-blank lines of a .txt with
    txt_blocks ("blocks"), or the whole .txt file ("txt"). Every record is kept or counted.
    """
    p = Parsed([], b"", [], [])
    status = bytearray()

    def skip(code: int, line: int, detail: str = "") -> None:
        status.append(code)
        if sum(1 for e in p.examples if e[1] == code) < max_examples:
            p.examples.append((line, code, detail))

    def add(text: str, line: int) -> None:
        if not text or text.isspace():
            skip(5, line)
            return
        p.texts.append(text)
        p.doc_bytes.append(len(text.encode("utf-8")))
        status.append(KEPT)

    def add_bytes(raw: bytes, line: int) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skip(4, line, f"at byte {e.start}")
            return
        add(text, line)

    if data is None:
        pass
    elif fmt == "jsonl":
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        loads = json.loads
        for i, raw in enumerate(lines):
            if _is_blank(raw):
                continue
            ln = first_line + i + 1
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skip(4, ln, f"at byte {e.start}")
                continue
            try:
                obj = loads(s)
            except ValueError as e:
                skip(1, ln, str(e))
                continue
            if type(obj) is not dict or json_key not in obj:
                skip(2, ln, f"no {json_key!r} field")
                continue
            text = obj[json_key]
            if type(text) is not str:
                skip(3, ln, f"{json_key!r} is {type(text).__name__}")
                continue
            if (b"\\ud" in raw or b"\\uD" in raw) and not _encodable(text):
                skip(4, ln, "lone surrogate escape")
                continue
            add(text, ln)
    elif fmt == "blocks":
        block: list = []
        start = 0
        for i, raw in enumerate(data.split(b"\n") + [b""]):
            if not _is_blank(raw):
                if not block:
                    start = i
                block.append(raw)
            elif block:
                add_bytes(b"\n".join(block).rstrip(b"\r"), first_line + start + 1)
                block = []
    else:  # "txt": the whole file
        add_bytes(data[3:] if data.startswith(b"\xef\xbb\xbf") else data, 0)
    p.statuses = bytes(status)
    return p


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def encode_docs(tok, texts: list, *, eod: int | None, dtype):
    """Documents -> (tokens [sum(lengths)] of dtype, lengths [n] int64), eod appended when given."""
    import numpy as np
    arrs = tok.encode_arrays(texts)
    lengths = np.fromiter((len(a) for a in arrs), dtype=np.int64, count=len(arrs))
    if eod is not None:
        e = np.array([eod], dtype=np.int32)
        arrs = [x for a in arrs for x in (a, e)]
        lengths += 1
    tokens = np.concatenate(arrs).astype(dtype) if arrs else np.zeros(0, dtype=dtype)
    return tokens, lengths


# ---- worker processes ------------------------------------------------------------------------
_W: dict = {}


def _worker_init(tokenizer_dir: str, opts: dict) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    from glmctl.tokenizer import Tokenizer
    _W.update(opts, tok=Tokenizer.load(tokenizer_dir))


def _worker_task(task):
    """("raw", data, fmt, first_line) -> (Parsed, tokens, lengths), in a worker process."""
    _, data, fmt, first_line = task
    parsed = parse_records(data, fmt, _W["json_key"], first_line)
    tokens, lengths = encode_docs(_W["tok"], parsed.texts, eod=_W["eod"], dtype=_W["dtype"])
    parsed.texts = []  # the main process does not need them back
    return parsed, tokens, lengths


# ---- shard writer with resume state ----------------------------------------------------------
class _Writer:
    """Appends documents to shards in order; at each shard end, saves where the next one starts."""

    def __init__(self, *, partial: Path, state_path: Path, state: dict, dtype, shard_size: int):
        import numpy as np
        self.np = np
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
        np = self.np
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
        counts = self.np.bincount(st, minlength=len(REASONS) + 1)
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
        """Finish the current shard (renamed into place) and save the resume state."""
        from glmctl.artifacts import atomic_write_bytes, atomic_write_json, fsync_dir
        from glmctl.data import index_bytes
        if self.fh is not None:
            np = self.np
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


# ---- tokenize --------------------------------------------------------------------------------
def _fingerprint(files: list[Path]) -> list:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def _artifact_inputs(args, groups) -> list:
    """Folders that are artifacts stay folders (their manifest identifies them); others expand to files."""
    out = []
    for arg, files in zip(args, groups):
        out.extend([arg] if Path(arg).is_dir() and (Path(arg) / "manifest.json").exists() else [str(f) for f in files])
    return out


def validate(config: TokenizeConfig) -> None:
    problems = []
    if config.workers is not None and config.workers < 0:
        problems.append(f"--workers must be >= 0, got {config.workers}")
    if config.shard_size < 1024:
        problems.append(f"--shard-size must be at least 1KiB, got {config.shard_size} bytes")
    if config.chunk_size < 1:
        problems.append(f"--chunk-size must be positive, got {config.chunk_size}")
    if not config.json_key:
        problems.append("--json-key must not be empty")
    if problems:
        raise UsageError("; ".join(problems))


def run(config: TokenizeConfig) -> dict:
    """Tokenize the corpus into Megatron shards under config.out; returns the summary."""
    from glmctl.artifacts import ArtifactWriter, file_lock, is_up_to_date, read_manifest
    validate(config)
    # resolve inputs and the tokenizer
    groups = expand_inputs(config.inputs)
    files = [f for g in groups for f in g]
    input_of = [i for i, g in enumerate(groups) for _ in g]
    read_manifest(config.tokenizer)  # a complete artifact (or checkpoint), else exit 3
    from glmctl.tokenizer import Tokenizer
    tok = Tokenizer.load(config.tokenizer)
    from glmctl.data import token_dtype
    dtype = token_dtype(tok.vocab_size)
    hashed = {"json_key": config.json_key, "append_eod": config.append_eod, "shard_size": config.shard_size,
              "txt_blocks": config.txt_blocks, "vocab_size": tok.vocab_size, "dtype": dtype.name}
    inputs = [config.tokenizer] + _artifact_inputs(config.inputs, groups)
    out = Path(config.out)
    if config.if_stale and is_up_to_date(out, "tokenize", hashed, inputs):
        console.log(f"{out}: up to date")
        return {"up_to_date": True, **read_manifest(out)["summary"]}
    check_out(out, files)
    workers = available_cpus() if config.workers is None else config.workers
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.with_name(f".{out.name}.lock")):
        partial, state_path = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.partial.json")
        state = _start_state(config, partial, state_path, hashed, files, len(groups))
        # loop: read -> encode (pool) -> write, in order
        t0 = time.monotonic()
        writer = _Writer(partial=partial, state_path=state_path, state=state, dtype=dtype,
                         shard_size=config.shard_size)
        resumed_docs = sum(s["documents"] for s in state["inputs"])
        opts = {"json_key": config.json_key, "eod": tok.eod_token_id if config.append_eod else None, "dtype": dtype}
        done = _pipeline(config, tok, files, input_of, writer, workers, opts)
        writer.close(None)
        # write artifact, manifest last
        summary = _summary(state, groups, config, tok, dtype, workers, done, time.monotonic() - t0)
        summary["resumed_after_documents"] = resumed_docs
        if summary["documents"] == 0:
            raise InputError(f"{', '.join(config.inputs)}: no documents (skipped: {summary['skipped']})")
        w = ArtifactWriter(out, stage="tokenize", config=hashed, inputs=inputs)
        w.path, w.summary = partial, summary
        import datetime as _dt
        w.started = _dt.datetime.fromisoformat(state["started"])
        w.finish()
        state_path.unlink(missing_ok=True)
    return summary


def _start_state(config, partial: Path, state_path: Path, hashed: dict, files: list, n_inputs: int) -> dict:
    """A fresh state, or the saved one when resuming (after checking nothing changed)."""
    import datetime as _dt
    import shutil
    from glmctl.artifacts import atomic_write_json, config_hash
    fp = _fingerprint(files)
    if config.resume and state_path.exists() and partial.is_dir():
        try:
            state = json.loads(state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            state = None
        if state and state.get("version") == STATE_VERSION:
            if state.get("config_hash") != config_hash(hashed):
                raise UsageError(f"cannot resume {config.out}: options or tokenizer differ from the interrupted run; "
                                 f"rerun without --resume to start over")
            if state.get("files") != fp:
                changed = next((a[0] for a, b in zip(state.get("files", []), fp) if a != b), "the file list")
                raise UsageError(f"cannot resume {config.out}: {changed} changed since the interrupted run; "
                                 f"rerun without --resume to start over")
            keep = {f".{n}" for s in state["shards"] for n in (s["name"] + ".bin", s["name"] + ".idx")}
            for p in partial.iterdir():
                if f".{p.name}" not in keep:
                    p.unlink()
            console.log(f"resuming {config.out}: {len(state['shards'])} shards kept "
                        f"({sum(s['documents'] for s in state['shards'])} documents)")
            return state
    if config.resume:
        console.log(f"{config.out}: nothing to resume, starting from the beginning")
    elif partial.exists():
        console.log(f"{config.out}: discarding an interrupted run (pass --resume to continue one)")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {"version": STATE_VERSION, "config_hash": config_hash(hashed), "files": fp,
             "started": _dt.datetime.now(_dt.timezone.utc).isoformat(), "shards": [],
             "position": {"file": 0, "offset": 0, "line": 0, "skip": 0, "file_docs": 0},
             "inputs": [{"documents": 0, "tokens": 0, "bytes": 0, "skipped": {r: 0 for r in REASONS}, "damaged": []}
                        for _ in range(n_inputs)]}
    atomic_write_json(state_path, state)
    return state


def _pipeline(config, tok, files, input_of, writer: _Writer, workers: int, opts: dict) -> dict:
    """Read chunks from the resume position, encode them (pool or in-process), write in order."""
    import multiprocessing as mp
    pos = writer.state["position"] or {"file": len(files), "offset": 0, "line": 0}
    fmts = [_format(f, config.txt_blocks) for f in files]
    total = sum(f.stat().st_size for f in files)
    done_disk = sum(f.stat().st_size for f in files[: pos["file"]])

    def chunks():
        for i in range(pos["file"], len(files)):
            first = i == pos["file"]
            yield from iter_chunks(files[i], i, fmts[i], config.chunk_size,
                                   pos["offset"] if first else 0, pos["line"] if first else 0)

    stop_after = int(os.environ.get("GLMCTL_TEST_PAUSE_AFTER_CHUNKS", "0"))  # test hook: hang here
    stats = {"chunks": 0, "documents": 0, "tokens": 0, "bytes": 0}
    pool = thread = None
    if workers >= 2:  # processes that parse and encode; fork before the progress bar starts its thread
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(str(config.tokenizer), opts))
    elif workers == 1:  # one encoding thread (sentencepiece releases the GIL); this thread reads and parses
        from concurrent.futures import ThreadPoolExecutor
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
        parsed = parse_records(c.data, fmts[c.file], config.json_key, c.line)
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
        if stop_after and stats["chunks"] == stop_after:
            print(f"glmctl-test: paused after {stop_after} chunks", file=sys.stderr, flush=True)
            while True:
                time.sleep(60)

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
def iter_documents(files: list[Path], *, json_key: str, txt_blocks: bool, counts: dict, bar=None,
                   chunk_size: int = 1 << 22):
    """Documents of files in order (skips counted by reason into ``counts``; progress in MB on ``bar``)."""
    for i, f in enumerate(files):
        fmt = _format(f, txt_blocks)
        for c in iter_chunks(f, i, fmt, chunk_size):
            if bar is not None:
                bar.update(c.disk / 1e6)
            p = parse_records(c.data, fmt, json_key, c.line)
            for s in p.statuses:
                if s:
                    counts[REASONS[s - 1]] = counts.get(REASONS[s - 1], 0) + 1
            if c.damage:
                console.warn(f"{f}: {c.damage}; using the text before the damage")
            yield from p.texts


def sample_lines(docs, budget: int, seed: int, max_len: int = 16384):
    """A uniform sample of the documents' non-blank lines, at most ``budget`` UTF-8 bytes, in corpus order.

    Bottom-k by a seeded random key: memory stays within the budget whatever the corpus size.
    Lines longer than sentencepiece's max_sentence_length are split at character boundaries.
    """
    import heapq
    import random
    rng = random.Random(seed)
    heap: list = []  # (-key, order, line, nbytes): the largest key is popped first
    total, order, seen = 0, 0, 0
    for doc in docs:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            b = line.encode("utf-8", "surrogatepass")
            pieces = [line] if len(b) <= max_len else _split_long(line, max_len)
            for piece in pieces:
                nb = len(piece.encode("utf-8", "surrogatepass"))
                seen += nb
                key = rng.random()
                order += 1
                if total + nb > budget and heap and -heap[0][0] < key:
                    continue
                heapq.heappush(heap, (-key, order, piece, nb))
                total += nb
                while total > budget and heap:
                    total -= heapq.heappop(heap)[3]
    kept = sorted(heap, key=lambda e: e[1])
    return [e[2] for e in kept], total, seen


def _split_long(line: str, max_len: int) -> list[str]:
    out, cur, n = [], [], 0
    for ch in line:
        k = len(ch.encode("utf-8", "surrogatepass"))
        if n + k > max_len:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(ch)
        n += k
    out.append("".join(cur))
    return out


def validate_train(config: TrainConfig) -> None:
    problems = []
    if config.vocab_size is None or config.vocab_size < 300:
        problems.append(f"--vocab-size must be at least 300 (256 byte pieces + a few), got {config.vocab_size}")
    if config.model_type not in ("unigram", "bpe"):
        problems.append(f"--model-type must be unigram or bpe, got {config.model_type!r}")
    if config.sample_size < 1000:
        problems.append(f"--sample-size must be at least 1kB, got {config.sample_size} bytes")
    if config.threads is not None and config.threads < 1:
        problems.append(f"--threads must be >= 1, got {config.threads}")
    if not 0.9 <= config.character_coverage <= 1.0:
        problems.append(f"--character-coverage must be in [0.9, 1], got {config.character_coverage}")
    if problems:
        raise UsageError("; ".join(problems))


def train_tokenizer(config: TrainConfig) -> dict:
    """Train a sentencepiece model on an even sample of every input; write the tokenizer artifact."""
    import io
    from glmctl.artifacts import ArtifactWriter, is_up_to_date, read_manifest
    from glmctl.tokenizer import SENTENCEPIECE_OPTIONS, Tokenizer, build_meta
    validate_train(config)
    groups = expand_inputs(config.inputs)
    hashed = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("inputs", "out", "if_stale", "threads")}
    inputs = _artifact_inputs(config.inputs, groups)
    out = Path(config.out)
    if config.if_stale and is_up_to_date(out, "tokenizer", hashed, inputs):
        console.log(f"{out}: up to date")
        return {"up_to_date": True, **read_manifest(out)["summary"]}
    check_out(out, [f for g in groups for f in g])
    # sample each input evenly
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
    # train
    import sentencepiece as spm
    threads = config.threads or available_cpus()
    console.log(f"training a {config.model_type} model, {config.vocab_size} pieces, on "
                f"{sum(p['bytes_sampled'] for p in per_input) / 1e6:.1f} MB ({len(lines)} lines), {threads} threads")
    t0 = time.monotonic()
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
    seconds = time.monotonic() - t0
    # write artifact, manifest last
    meta = build_meta(model.getvalue(), model_type=config.model_type)
    tok = Tokenizer(model.getvalue(), meta)
    summary = {"model_type": config.model_type, "num_text_tokens": tok.num_text_tokens,
               "vocab_size": tok.vocab_size, "special_tokens": tok.special_ids, "inputs": per_input,
               "skipped": counts, "train_seconds": round(seconds, 2), "threads": threads}
    with ArtifactWriter(out, stage="tokenizer", config=hashed, inputs=inputs) as w:
        tok.save(w.path)
        w.summary = summary
    return summary
