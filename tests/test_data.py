"""glmctl.data: the MMIDIDX writer/reader, documents and windows as views, seeded epoch order.

Oracles: the byte layout written out by hand with struct (Megatron's _IndexWriter order),
plain numpy slicing of the concatenated documents, and bijection/partition properties.
"""
import struct

import numpy as np
import pytest

from glmctl.artifacts import ArtifactWriter
from glmctl.data import (IndexedDataset, TokenDataset, feistel_permute, index_bytes, token_dtype)
from glmctl.errors import InputError


def write_shard(prefix, docs, dtype=np.uint16):
    prefix.parent.mkdir(parents=True, exist_ok=True)
    np.concatenate(docs).astype(dtype).tofile(str(prefix) + ".bin")
    (prefix.parent / (prefix.name + ".idx")).write_bytes(index_bytes([len(d) for d in docs], dtype))


def make_artifact(out, shards, dtype=np.uint16):
    with ArtifactWriter(out, stage="tokenize", config={}, inputs=[]) as w:
        for i, docs in enumerate(shards):
            write_shard(w.path / f"shard-{i:05d}", docs, dtype)
        w.summary["shards"] = [{"name": f"shard-{i:05d}", "documents": len(d)} for i, d in enumerate(shards)]
        w.summary["eod_token_id"] = 7
    return out


def docs_of(lengths, seed=0, high=500):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, n).astype(np.int64) for n in lengths]


def test_index_layout_matches_megatron_byte_for_byte(tmp_path):
    docs = docs_of([3, 1, 4])
    raw = index_bytes([len(d) for d in docs], np.uint16)
    want = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 3)
            + struct.pack("<Q", 4) + struct.pack("<3i", 3, 1, 4) + struct.pack("<3q", 0, 6, 8)
            + struct.pack("<4q", 0, 1, 2, 3))
    assert raw == want
    assert index_bytes([5], np.int32)[17] == 4  # dtype code of int32


@pytest.mark.parametrize("vocab,dtype", [(512, np.uint16), (65499, np.uint16), (65500, np.int32), (150528, np.int32)])
def test_token_dtype(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_indexed_dataset_round_trip(tmp_path, dtype):
    docs = docs_of([5, 1, 9, 2], high=70000 if dtype == np.int32 else 500)
    write_shard(tmp_path / "s", docs, dtype)
    ds = IndexedDataset(tmp_path / "s")
    assert len(ds) == 4 and ds.dtype == np.dtype(dtype) and ds.num_tokens == 17
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d.tolist()
    assert IndexedDataset(str(tmp_path / "s") + ".idx").num_tokens == 17  # a path with extension works too


def test_documents_across_shards_are_views(tmp_path):
    shards = [docs_of([4, 2], 1), docs_of([3], 2), docs_of([1, 1, 6], 3)]
    ds = TokenDataset.open(make_artifact(tmp_path / "tok", shards))
    flat = [d for s in shards for d in s]
    assert ds.num_documents == len(flat) and ds.num_tokens == sum(len(d) for d in flat)
    assert ds.eod_token_id == 7
    for i, d in enumerate(flat):
        got = ds.document(i)
        assert got.tolist() == d.tolist()
        assert isinstance(got.base, np.memmap) or isinstance(got, np.memmap)  # no copy
    with pytest.raises(IndexError):
        ds.document(len(flat))


def test_windows_are_slices_of_each_shard(tmp_path):
    shards = [docs_of([10, 7], 1), docs_of([5], 2)]  # 17 and 5 tokens
    ds = TokenDataset.open(make_artifact(tmp_path / "tok", shards))
    w = ds.windows(4, stride=3)
    s0, s1 = np.concatenate(shards[0]), np.concatenate(shards[1])
    want = [s0[i:i + 4] for i in range(0, 17 - 4 + 1, 3)] + [s1[i:i + 4] for i in range(0, 5 - 4 + 1, 3)]
    assert len(w) == len(want) == 6
    for i, x in enumerate(want):
        assert w[i].tolist() == x.tolist()
        assert np.shares_memory(w[i], ds.shards[0 if i < 5 else 1].bin)
    assert len(ds.windows(6)) == 2 + 0  # the 5-token shard has no full 6-token window


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_feistel_is_a_bijection(n):
    x = np.arange(n)
    p = feistel_permute(x, n, key=(3, 1))
    assert sorted(p.tolist()) == list(range(n))
    assert feistel_permute(x, n, key=(3, 1)).tolist() == p.tolist()
    if n >= 17:
        assert p.tolist() != list(range(n))
        assert feistel_permute(x, n, key=(3, 2)).tolist() != p.tolist()
        assert feistel_permute(x, n, key=(4, 1)).tolist() != p.tolist()


def test_feistel_known_values_are_stable():
    """Pinned: the order must not change across numpy versions, machines or glmctl releases
    (a resumed pre-training run relies on it)."""
    assert feistel_permute(np.arange(10), 10, key=(0, 0)).tolist() == [6, 7, 3, 2, 5, 8, 0, 1, 9, 4]
    assert feistel_permute(np.arange(5), 1000003, key=(1234, 7)).tolist() == [258668, 780512, 996901, 273067,
                                                                              520970]


def test_epoch_order_deterministic_resumable_and_rank_split(tmp_path):
    ds = TokenDataset.open(make_artifact(tmp_path / "tok", [docs_of([200], 1), docs_of([150], 2)]))
    w = ds.windows(8, seed=5)
    n = len(w)
    full = [x.tolist() for x in w.epoch(0)]
    assert len(full) == n
    assert sorted(map(tuple, full)) == sorted(tuple(w[i].tolist()) for i in range(n))  # every window once
    assert [x.tolist() for x in w.epoch(0)] == full
    assert [x.tolist() for x in w.epoch(1)] != full
    assert [x.tolist() for x in ds.windows(8, seed=6).epoch(0)] != full
    assert [x.tolist() for x in w.epoch(0, start=10)] == full[10:]
    r0 = [x.tolist() for x in w.epoch(0, rank=0, world_size=2)]
    r1 = [x.tolist() for x in w.epoch(0, rank=1, world_size=2)]
    assert r0 == full[0::2] and r1 == full[1::2]
    b = w.batch(0, step=2, batch_size=3, rank=1, world_size=2)
    assert b.shape == (3, 8) and b.dtype == np.int64
    assert b.tolist() == [full[12 + 1], full[14 + 1], full[16 + 1]]
    assert w.steps_per_epoch(3, 2) == n // 6


def test_corrupt_files_are_input_errors(tmp_path):
    write_shard(tmp_path / "s", docs_of([5, 5]))
    idx = tmp_path / "s.idx"
    good = idx.read_bytes()
    idx.write_bytes(b"XXXXXXXXX" + good[9:])
    with pytest.raises(InputError, match="not an MMIDIDX"):
        IndexedDataset(tmp_path / "s")
    idx.write_bytes(good[:40])
    with pytest.raises(InputError, match="truncated index"):
        IndexedDataset(tmp_path / "s")
    idx.write_bytes(good)
    (tmp_path / "s.bin").write_bytes(b"\0" * 6)
    with pytest.raises(InputError, match="truncated data"):
        IndexedDataset(tmp_path / "s")
    with pytest.raises(InputError, match="no such file"):
        IndexedDataset(tmp_path / "missing")
    (tmp_path / "incomplete").mkdir()
    with pytest.raises(InputError, match="incomplete artifact"):
        TokenDataset.open(tmp_path / "incomplete")
