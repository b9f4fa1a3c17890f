"""Corpus reading: input files, zstd streams, chunks cut at record boundaries, records -> documents.

Each CORPUS argument is a file or a folder searched recursively for ``.txt``, ``.jsonl`` and
``.jsonl.zst`` / ``.txt.zst`` (the Pile's format). A ``.jsonl`` line is a document (its ``json_key``
field); a ``.txt`` file is one document, or one per blank-line-separated block with ``txt_blocks``.
Records that are not usable documents are skipped and counted by reason (REASONS); a damaged
``.zst`` keeps the documents before the damage and is reported.

``iter_chunks`` reads a file in chunks cut at record boundaries (a pure function of the file and
the start offset, so a resumed run reads the same records); ``parse_records`` turns a chunk into
documents. ``iter_documents`` and ``sample_lines`` are what `glmctl tokenizer train` samples with;
glmctl.shards encodes the chunks into token shards.
"""
from __future__ import annotations

import heapq
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from glmctl import console
from glmctl.errors import InputError, UsageError

SUFFIXES = {".jsonl": "jsonl", ".jsonl.zst": "jsonl", ".txt": "txt", ".txt.zst": "txt"}
KEPT = 0
REASONS = ("malformed_json", "missing_key", "not_a_string", "invalid_utf8", "empty")  # status 1..5


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


def check_out(out: Path, inputs: list[Path] = (), *, name: str | None = None) -> None:
    """Refuse to replace a folder that is not an artifact, or one that holds the inputs.

    ``name``: how the messages call OUT (default ``--out OUT``).
    """
    name = name or f"--out {out}"
    o = out.resolve()
    for f in inputs:
        if o == f.resolve() or o in f.resolve().parents:
            raise UsageError(f"{name} contains the input {f}; choose another output folder")
    if out.exists() and not (out / "manifest.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{name} exists and is not a glmctl artifact; refusing to replace it")


def fingerprint(files: list[Path]) -> list:
    """[path, size, mtime] of each file: what a resumed run checks has not changed."""
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def artifact_inputs(args, groups) -> list:
    """Folders that are artifacts stay folders (their manifest identifies them); others expand to files."""
    out = []
    for arg, files in zip(args, groups):
        out.extend([arg] if Path(arg).is_dir() and (Path(arg) / "manifest.json").exists() else [str(f) for f in files])
    return out


def record_format(path: Path, txt_blocks: bool) -> str:
    """How a file splits into records: "jsonl" (lines), "blocks" (blank-line-separated) or "txt" (whole file)."""
    kind = SUFFIXES[_suffix(path)]
    return "blocks" if kind == "txt" and txt_blocks else kind


# ---- streams and chunks ----------------------------------------------------------------------
class _ZstdStream:
    """Decompress a .zst file (any number of frames) with read(n); notes truncation or corruption."""

    def __init__(self, path: Path):
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
        except zstandard.ZstdError as e:
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
        p.doc_bytes.append(len(text) if text.isascii() else len(text.encode("utf-8")))  # isascii: O(1)
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
        # the hot loop of `glmctl tokenize` (bench/tokenize_throughput.py): kept documents go
        # straight to the lists; everything else goes through skip()/add() as in the other formats
        fast, texts, doc_bytes, kept = orjson.loads, p.texts, p.doc_bytes, KEPT
        surrogates = b"\\ud" in data or b"\\uD" in data
        for i, raw in enumerate(lines):
            if not raw or raw.isspace():  # a blank line is not a record
                continue
            try:  # orjson reads the bytes as they are: ~3x faster than decode + json.loads
                obj = fast(raw)
            except orjson.JSONDecodeError:  # strict RFC 8259: json.loads decides, as it always did
                obj, code, detail = _loads_lenient(raw)
                if code:
                    skip(code, first_line + i + 1, detail)
                    continue
            if type(obj) is not dict or json_key not in obj:
                skip(2, first_line + i + 1, f"no {json_key!r} field")
                continue
            text = obj[json_key]
            if type(text) is not str:
                skip(3, first_line + i + 1, f"{json_key!r} is {type(text).__name__}")
                continue
            if surrogates and (b"\\ud" in raw or b"\\uD" in raw) and not _encodable(text):
                skip(4, first_line + i + 1, "lone surrogate escape")
                continue
            if not text or text.isspace():
                skip(5, first_line + i + 1)
                continue
            texts.append(text)
            doc_bytes.append(len(text) if text.isascii() else len(text.encode("utf-8")))  # isascii: O(1)
            status.append(kept)
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


def _loads_lenient(raw: bytes):
    """A .jsonl line orjson rejected -> (object, 0, "") or (None, status, detail). json.loads accepts
    what orjson does not (NaN, lone surrogate escapes, huge numbers) and names the error otherwise;
    on every line orjson accepts, the two give the same object."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, 4, f"at byte {e.start}"
    try:
        return json.loads(s), 0, ""
    except ValueError as e:
        return None, 1, str(e)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ---- documents (tokenizer training) ----------------------------------------------------------
def iter_documents(files: list[Path], *, json_key: str, txt_blocks: bool, counts: dict, bar=None,
                   chunk_size: int = 1 << 22):
    """Documents of files in order (skips counted by reason into ``counts``; progress in MB on ``bar``)."""
    for i, f in enumerate(files):
        fmt = record_format(f, txt_blocks)
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
