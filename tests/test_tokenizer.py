"""glmctl.tokenizer and `glmctl tokenizer train`: id layout, lossless round trips, GLM specials.

Oracles: sentencepiece itself (same ids for plain text), round trips over hand-picked and
random Unicode strings, and the layout the issue fixes (specials right after the text tokens
in GLM-130B's order, vocab padded to a multiple of 128).
"""
import json
import random
import shutil

import pytest
import sentencepiece as spm

from glmctl.cli import main
from glmctl.config import SPECIAL_TOKENS, get_preset
from glmctl.corpus import sample_lines
from glmctl.errors import InputError, UsageError
from glmctl.stages.tokenize import TrainConfig, train_tokenizer
from glmctl.tokenizer import Tokenizer, padded_vocab_size


EN = ("the a of and to in is that model data language train token general large pre quick brown fox jumps over "
      "lazy dog we show results paper method attention layer network weight learning test value small big new "
      "blank infilling objective bilingual english chinese corpus").split()
ZH = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机"


def sentence(rng: random.Random, lang: str) -> str:
    if lang == "en":
        return " ".join(rng.choice(EN) for _ in range(rng.randint(4, 14))).capitalize() + "."
    return "".join(rng.choice(ZH) for _ in range(rng.randint(6, 30))) + "。"


def write_corpus(root, n_docs=200, seed=0):
    """en.jsonl and zh.txt (blank-line blocks) of made-up sentences; returns the two paths."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    en = root / "en.jsonl"
    en.write_text("".join(json.dumps({"text": "\n".join(sentence(rng, "en") for _ in range(rng.randint(1, 5)))}) + "\n"
                          for _ in range(n_docs)), encoding="utf-8")
    zh = root / "zh.txt"
    zh.write_text("\n\n".join(" ".join(sentence(rng, "zh") for _ in range(rng.randint(1, 4))) for _ in range(n_docs)),
                  encoding="utf-8")
    return en, zh


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    en, zh = write_corpus(root / "corpus")
    summary = train_tokenizer(TrainConfig(inputs=(str(en), str(zh)), out=str(root / "tok"), vocab_size=600,
                                          txt_blocks=True, threads=1)).summary
    return root / "tok", summary


@pytest.fixture(scope="module")
def tok(trained):
    return Tokenizer.load(trained[0])


# ---- layout ----------------------------------------------------------------------------------
def test_artifact_files_and_manifest(trained):
    d, summary = trained
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "tokenizer.json", "tokenizer.model"]
    m = json.loads((d / "manifest.json").read_text())
    assert m["stage"] == "tokenizer" and m["status"] == "complete"
    assert {o["path"] for o in m["outputs"]} == {"tokenizer.json", "tokenizer.model"}
    assert summary["num_text_tokens"] == 600 and summary["vocab_size"] == 640


def test_special_ids_follow_text_tokens_in_glm_order(tok):
    sp = spm.SentencePieceProcessor(model_file=str(tok.source + "/tokenizer.model"))
    n = sp.get_piece_size()
    assert tok.num_text_tokens == n
    assert [tok.special_ids[name] for name in SPECIAL_TOKENS] == list(range(n, n + 8))
    assert (tok.mask_token_id, tok.gmask_token_id, tok.smask_token_id, tok.eod_token_id, tok.sop_token_id,
            tok.eop_token_id) == (n, n + 1, n + 2, n + 3, n + 4, n + 5)
    assert tok.eos_token_id == sp.eos_id() == sp.piece_to_id("</s>")
    assert tok.pad_token_id == sp.pad_id() and tok.newline_token_id == sp.piece_to_id("\n")
    assert set(tok.special_ids) == set(SPECIAL_TOKENS) | {"eos", "pad"}
    assert tok.vocab_size % 128 == 0 and n + 8 <= tok.vocab_size < n + 8 + 128


@pytest.mark.parametrize("n,want", [(600, 640), (8000, 8064), (8056, 8064), (8057, 8192), (32000, 32128),
                                    (150000, 150016)])
def test_padded_vocab_size(n, want):
    assert padded_vocab_size(n) == want


def test_config_overrides_apply_to_model_config(tok):
    cfg = get_preset("tiny").replace(**tok.config_overrides())
    assert cfg.vocab_size == tok.vocab_size
    assert cfg.special_token_ids() == {k: tok.special_ids[k] for k in cfg.special_token_ids()}


# ---- round trips -----------------------------------------------------------------------------
ROUND_TRIP = [
    "The model is trained on English and 中文 text. 清华大学位于北京。",
    "emoji 😀👍🏽🇨🇳 and a ZWJ family 👨‍👩‍👧 in one line",
    "line one\nline two\n\n\nafter blank lines\n",
    "\n", "\n\n", "", " ", "   leading and trailing spaces   ", "tabs\tand\r\nCRLF\r\n",
    "sentencepiece's own marker ▁ and ▁▁ twice", "▁", "NUL \x00 and control \x07\x1b chars",
    "combining é vs é, ﬁ ligature, full-width １２３ ＡＢＣ", "\ufeffBOM and \u200b zero width",
    "rare CJK 𠀀𪚥 and Hangul 한국어, Arabic العربية, Devanagari हिन्दी",
    "code:\n    def f(x):\n        return x  # comment\n",
    "[MASK] literal specials [gMASK] and [sMASK] round trip, [sop] stays text",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(1)
    ranges = [(0x20, 0x7E), (0x0A, 0x0D), (0xA0, 0x2FF), (0x2580, 0x259F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
              (0x10000, 0x10FFFF), (0x0, 0xD7FF), (0xE000, 0xFFFF)]
    for _ in range(200):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_newline_is_one_token(tok):
    assert tok.encode("\n") == [tok.newline_token_id]
    ids = tok.encode("a\nb")
    assert tok.newline_token_id in ids


def test_plain_text_ids_are_sentencepiece_ids(tok):
    sp = spm.SentencePieceProcessor(model_file=str(tok.source + "/tokenizer.model"))
    rng = random.Random(2)
    texts = [" ".join(sentence(rng, rng.choice(["en", "zh"])) for _ in range(3)) for _ in range(50)] + ROUND_TRIP[:5]
    for t in texts:
        assert tok.encode(t) == sp.encode(t)
    assert [a.tolist() for a in tok.encode_arrays(texts)] == [sp.encode(t) for t in texts]


# ---- specials --------------------------------------------------------------------------------
def test_mask_strings_become_special_ids(tok):
    ids = tok.encode("Tsinghua is in [MASK]. [gMASK]")
    assert tok.mask_token_id in ids and ids[-1] == tok.gmask_token_id
    assert tok.encode("[sMASK]") == [tok.smask_token_id]
    plain = tok.encode("Tsinghua is in [MASK]. [gMASK]", allow_special=False)
    assert not set(plain) & set(tok.special_ids[n] for n in SPECIAL_TOKENS)


def test_decode_renders_specials_in_brackets(tok):
    a, b = tok.encode("model"), tok.encode("data")
    ids = a + [tok.mask_token_id] + b + [tok.sop_token_id, tok.eop_token_id, tok.eod_token_id,
                                         tok.special_ids["ENC"], tok.special_ids["dBLOCK"]]
    assert tok.decode(ids) == "model[MASK]data[sop][eop][eod][ENC][dBLOCK]"
    assert tok.decode([tok.gmask_token_id, tok.smask_token_id]) == "[gMASK][sMASK]"
    assert tok.decode([tok.vocab_size - 1]) == ""  # a padding row
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


# ---- files -----------------------------------------------------------------------------------
def test_load_from_checkpoint_dir_with_copied_files(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in Tokenizer.files:
        shutil.copy(trained[0] / f, ckpt / f)
    (ckpt / "config.json").write_text("{}")
    t = Tokenizer.load(ckpt)
    assert t.vocab_size == Tokenizer.load(trained[0]).vocab_size
    assert Tokenizer.load(ckpt / "tokenizer.json").vocab_size == t.vocab_size


def test_save_writes_the_listed_files(tok, tmp_path):
    paths = tok.save(tmp_path / "copy")
    assert sorted(p.name for p in paths) == sorted(Tokenizer.files)
    t = Tokenizer.load(tmp_path / "copy")
    assert t.encode("清华 model [MASK]") == tok.encode("清华 model [MASK]")


def test_load_errors_name_the_problem(trained, tmp_path):
    with pytest.raises(InputError, match="no such tokenizer"):
        Tokenizer.load(tmp_path / "nope")
    d = tmp_path / "half"
    d.mkdir()
    shutil.copy(trained[0] / "tokenizer.model", d)
    with pytest.raises(InputError, match="missing tokenizer.json"):
        Tokenizer.load(d)
    meta = json.loads((trained[0] / "tokenizer.json").read_text())
    meta["special_tokens"]["[MASK]"] += 1
    meta["model_sha256"] = None
    (d / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="GLM-130B's order"):
        Tokenizer.load(d)
    (d / "tokenizer.model").write_bytes(b"not a model")
    meta = json.loads((trained[0] / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="sha256"):
        Tokenizer.load(d)


# ---- training --------------------------------------------------------------------------------
def test_sample_is_balanced_bounded_and_deterministic():
    rng = random.Random(3)
    docs = ["\n".join(sentence(rng, "en") for _ in range(5)) for _ in range(500)]
    lines, nbytes, seen = sample_lines(iter(docs), 5000, seed=7)
    assert nbytes <= 5000 and seen > 10 * 5000
    assert nbytes == sum(len(x.encode()) for x in lines) > 4000
    all_lines = [ln for d in docs for ln in d.split("\n")]
    pos = [all_lines.index(x) for x in lines]
    assert pos == sorted(pos)  # corpus order kept
    assert sample_lines(iter(docs), 5000, seed=7)[0] == lines
    assert sample_lines(iter(docs), 5000, seed=8)[0] != lines


def test_each_input_gets_an_equal_share(tmp_path):
    rng = random.Random(4)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": sentence(rng, "en")}) + "\n" for _ in range(3000)))
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": sentence(rng, "zh")}) + "\n" for _ in range(600)))
    s = train_tokenizer(TrainConfig(inputs=(str(big), str(small)), out=str(tmp_path / "tok"), vocab_size=500,
                                    sample_size=40_000, model_type="bpe", threads=1)).summary
    a, b = s["inputs"]
    assert a["bytes_seen"] > 40_000 and a["bytes_sampled"] <= 20_000
    assert b["bytes_sampled"] <= 20_000 and b["bytes_sampled"] > 15_000
    assert Tokenizer.load(tmp_path / "tok").meta["model_type"] == "bpe"


def test_bad_training_options_are_usage_errors(tmp_path):
    en, zh = write_corpus(tmp_path / "c", n_docs=20)
    with pytest.raises(UsageError, match="--model-type"):
        train_tokenizer(TrainConfig(inputs=(str(en),), out=str(tmp_path / "t"), vocab_size=500, model_type="wordpiece"))
    with pytest.raises(UsageError, match="vocab-size"):
        train_tokenizer(TrainConfig(inputs=(str(en),), out=str(tmp_path / "t"), vocab_size=10))


@pytest.mark.parametrize("args,code,needle", [
    (["tokenizer", "train", "{c}/missing.jsonl", "--out", "{t}/tok", "--vocab-size", "500"], 3, "no such file"),
    (["tokenizer", "train", "{c}/en.jsonl", "--out", "{t}/tok", "--vocab-size", "500", "--model-type", "x"], 2,
     "--model-type"),
    (["tokenizer", "train", "{c}/notes.md", "--out", "{t}/tok", "--vocab-size", "500"], 2, "unsupported file type"),
    (["tokenizer", "train", "{c}/en.jsonl", "--out", "{t}/tok", "--vocab-size", "lots"], 2, "vocab-size"),
    (["tokenizer", "train", "{c}/en.jsonl", "--out", "{t}/tok", "--vocab-size", "500", "--sample-size", "big"], 2,
     "--sample-size"),
    (["tokenizer", "train", "{c}/en.jsonl", "--out", "{t}/tok", "--vocab-size", "60000"], 2, "sentencepiece"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, code, needle):
    c = tmp_path / "c"
    write_corpus(c, n_docs=20)
    (c / "notes.md").write_text("# notes\n")
    with pytest.raises(SystemExit) as e:
        main([a.format(c=c, t=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "tok").exists()


def test_cli_train_prints_a_summary(tmp_path, capsys):
    en, zh = write_corpus(tmp_path / "c", n_docs=100)
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", str(en), str(zh), "--txt-blocks", "--out", str(tmp_path / "tok"),
              "--vocab-size", "500", "--threads", "1", "--json"])
    assert e.value.code == 0
    s = json.loads(capsys.readouterr().out)
    assert s["vocab_size"] == 512 and s["special_tokens"]["[gMASK]"] == 501
