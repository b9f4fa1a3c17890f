"""Token datasets for pre-training: Megatron's MMIDIDX ``.bin``/``.idx`` format and a loader.

Format (megatron/core/datasets/indexed_dataset.py; GPT-NeoX reads the same files):

    .bin   token ids of every document back to back, one small dtype, no headers
    .idx   b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 n_seq | u64 n_doc_idx
           | int32 lengths[n_seq] | int64 byte offsets[n_seq] | int64 doc_idx[n_doc_idx]

glmctl writes one sequence per document (doc_idx = 0, 1, ..., n), eod included in the length.
The token dtype comes from the vocabulary size (``token_dtype``) the way Megatron picks it.

Loading never copies the corpus: both files are memory-mapped, ``document(i)`` and
``TokenWindows[i]`` are views into the ``.bin`` map. Window order for an epoch is a keyed
permutation of the window indices (a Feistel network), so it needs no memory, is the same on
every machine and numpy version for a given (seed, epoch), and resuming at step k is O(1).
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from glmctl.artifacts import read_manifest
from glmctl.errors import InputError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_seq, n_doc_idx (34 bytes)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 below 65,500 ids (Megatron's ``best_fitting_dtype``), int32 otherwise."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def index_bytes(lengths: np.ndarray, dtype) -> bytes:
    """The .idx contents for documents of the given token lengths, stored back to back."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    n = len(lengths)
    pointers = np.zeros(n, dtype=np.int64)
    if n > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    header = _HEADER.pack(INDEX_MAGIC, INDEX_VERSION, CODE_OF_DTYPE[dtype], n, n + 1)
    return header + lengths.astype("<i4").tobytes() + pointers.astype("<i8").tobytes() + doc_idx.astype("<i8").tobytes()


class IndexedDataset:
    """One ``prefix.bin`` + ``prefix.idx`` pair. ``ds[i]`` is sequence i (a view, not a copy)."""

    def __init__(self, prefix: str | Path):
        prefix = str(prefix)
        for ext in (".bin", ".idx"):
            if prefix.endswith(ext):
                prefix = prefix[: -len(ext)]
        self.prefix = prefix
        idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise InputError(f"{p}: no such file (expected a Megatron .bin/.idx pair)")
        if idx_path.stat().st_size < _HEADER.size:
            raise InputError(f"{idx_path}: too short for an MMIDIDX index")
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        magic, version, code, n_seq, n_doc = _HEADER.unpack(bytes(idx[: _HEADER.size]))
        if magic != INDEX_MAGIC:
            raise InputError(f"{idx_path}: not an MMIDIDX index (magic {magic!r})")
        if version != INDEX_VERSION:
            raise InputError(f"{idx_path}: index version {version} is not supported (expected 1)")
        if code not in DTYPE_CODES:
            raise InputError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        need = _HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        if len(idx) < need:
            raise InputError(f"{idx_path}: truncated index ({len(idx)} bytes, header promises {need})")
        off = _HEADER.size
        self.sizes = np.frombuffer(idx, dtype="<i4", count=n_seq, offset=off)
        self.pointers = np.frombuffer(idx, dtype="<i8", count=n_seq, offset=off + n_seq * 4)
        self.doc_idx = np.frombuffer(idx, dtype="<i8", count=n_doc, offset=off + n_seq * 12)
        nbytes = bin_path.stat().st_size
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n_seq else 0
        if end > nbytes:
            raise InputError(f"{bin_path}: truncated data ({nbytes} bytes, index needs {end})")
        self.bin = (np.memmap(bin_path, dtype=self.dtype, mode="r") if nbytes
                    else np.zeros(0, dtype=self.dtype))
        self._idx_map = idx

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.bin[start: start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def tokens(self) -> np.ndarray:
        """The whole token stream of this file (a view)."""
        return self.bin[: self.num_tokens]


class TokenDataset:
    """The documents of a ``glmctl tokenize`` artifact (or of Megatron prefixes made elsewhere)."""

    def __init__(self, shards: list[IndexedDataset], meta: dict | None = None):
        self.shards = shards
        self.meta = meta or {}
        counts = np.array([len(s) for s in shards], dtype=np.int64)
        self._doc_offsets = np.concatenate([[0], np.cumsum(counts)])

    @classmethod
    def open(cls, path: str | Path | list) -> "TokenDataset":
        """A tokens artifact dir (shards listed in its manifest), or Megatron prefix path(s)."""
        if isinstance(path, (list, tuple)):
            return cls([IndexedDataset(p) for p in path])
        p = Path(path)
        if p.is_dir():
            m = read_manifest(p, stage="tokenize")
            summ = m.get("summary", {})
            shards = [IndexedDataset(p / s["name"]) for s in summ.get("shards", [])]
            if not shards:
                raise InputError(f"{p}: manifest lists no shards")
            return cls(shards, meta=summ)
        return cls([IndexedDataset(p)])

    @property
    def eod_token_id(self) -> int | None:
        return self.meta.get("eod_token_id")

    @property
    def num_documents(self) -> int:
        return int(self._doc_offsets[-1])

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i over all shards (eod included when it was appended); a view."""
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} out of range [0, {self.num_documents})")
        s = int(np.searchsorted(self._doc_offsets, i, side="right")) - 1
        return self.shards[s][i - int(self._doc_offsets[s])]

    __getitem__ = document

    def windows(self, length: int, *, stride: int | None = None, seed: int = 0) -> "TokenWindows":
        return TokenWindows(self, length, stride=stride, seed=seed)


class TokenWindows:
    """Fixed-length windows of each shard's token stream, in a seeded order per epoch.

    Window j of a shard covers tokens [j*stride, j*stride + length); windows never cross a shard
    boundary (so each is a view), and a shard's last partial window is dropped. For next-token
    training ask for ``length = seq_len + 1, stride = seq_len``.

        w = TokenDataset.open("tokens/").windows(2049, stride=2048, seed=1)
        for x in w.epoch(0, start=step * batch):   # views, in the same order on every run
            ...
    """

    def __init__(self, dataset: TokenDataset, length: int, *, stride: int | None = None, seed: int = 0):
        if length < 1:
            raise ValueError(f"window length must be >= 1, got {length}")
        self.dataset = dataset
        self.length = length
        self.stride = stride or length
        self.seed = int(seed)
        self._streams = [s.tokens() for s in dataset.shards]
        counts = [max(0, (len(t) - length) // self.stride + 1) for t in self._streams]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        """Window i in storage order (a view of the mapped .bin)."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        start = (i - int(self._offsets[s])) * self.stride
        return self._streams[s][start: start + self.length]

    def order(self, epoch: int, positions) -> np.ndarray:
        """Storage indices of the windows at ``positions`` of epoch ``epoch``'s shuffled order."""
        return feistel_permute(np.asarray(positions, dtype=np.int64), len(self), key=(self.seed, int(epoch)))

    def epoch(self, epoch: int, *, start: int = 0, rank: int = 0, world_size: int = 1):
        """Yield this rank's windows of an epoch from position ``start`` (every world_size-th one)."""
        n = len(self)
        for lo in range(start + rank, n, 4096 * world_size):
            pos = np.arange(lo, min(n, lo + 4096 * world_size), world_size)
            for j in self.order(epoch, pos):
                yield self[int(j)]

    def batch(self, epoch: int, step: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """[batch_size, length] int64 copy of global step ``step``'s windows for this rank.

        Step k of an epoch takes positions [k*B*W, (k+1)*B*W); rank r gets every W-th from r.
        """
        lo = step * batch_size * world_size + rank
        pos = np.arange(lo, lo + batch_size * world_size, world_size)
        if pos[-1] >= len(self):
            raise IndexError(f"step {step} runs past the {len(self)} windows of an epoch")
        return np.stack([self[int(j)] for j in self.order(epoch, pos)]).astype(np.int64)

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return len(self) // (batch_size * world_size)


# ---- keyed permutation -----------------------------------------------------------------------
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, k: int) -> np.ndarray:
    """splitmix64 finaliser of x ^ k (uint64, wraps)."""
    with np.errstate(over="ignore"):
        z = x ^ np.uint64(k & 0xFFFFFFFFFFFFFFFF)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def feistel_permute(x: np.ndarray, n: int, key: tuple[int, int], rounds: int = 4) -> np.ndarray:
    """A bijection of [0, n) keyed by ``key``: balanced Feistel on 2*h bits, cycle-walking into range."""
    if n <= 1:
        return np.zeros_like(x)
    if np.any((x < 0) | (x >= n)):
        raise IndexError(f"positions must lie in [0, {n})")
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << h) - 1)
    keys = [int(_mix(np.array([key[0] * 0x100000001B3 + key[1]], dtype=np.uint64), r + 1)[0]) for r in range(rounds)]
    out = x.astype(np.uint64)
    todo = np.ones(len(out), dtype=bool)
    while todo.any():  # each pass maps the whole domain; expected passes <= 4 (domain < 4n)
        v = out[todo]
        left, right = v >> np.uint64(h), v & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        v = (left << np.uint64(h)) | right
        out[todo] = v
        todo[todo] = v >= np.uint64(n)
    return out.astype(np.int64)
