"""The glmctl tokenizer: a sentencepiece model plus GLM-130B's special tokens (docs/glm130b.md §3).

Id layout (GLM-130B's icetk layout without the 20,000 image tokens):

    0 <unk>   1 <s>   2 </s> (eos)   3 <pad>   4 "\\n" (the paper's <n>)   5..260 <0x00>..<0xFF>
    ...       sentencepiece pieces, ids unchanged                       (num_text_tokens of them)
    N+0 [MASK]  N+1 [gMASK]  N+2 [sMASK]  N+3 eod  N+4 sop  N+5 eop  N+6 ENC  N+7 dBLOCK
    ...       padding rows up to vocab_size, a multiple of 128 so the embedding splits evenly
              for tensor parallelism

Lossless: the model is trained with identity normalisation, byte fallback, no dummy prefix and
whitespace kept, so ``decode(encode(text)) == text`` for any valid Unicode text. The one character
sentencepiece cannot round-trip, its own space marker U+2581 "▁", is encoded as its three UTF-8
byte pieces. ``decode`` renders a special id as its name in brackets, as GLM's ``detokenize`` does:
``[MASK]``, ``[gMASK]``, ``[sMASK]``, ``[eod]``, ``[sop]``, ``[eop]``, ``[ENC]``, ``[dBLOCK]``;
padding rows decode to nothing. ``encode`` maps the literal strings ``[MASK]``, ``[sMASK]`` and
``[gMASK]`` to their special ids (generation prompts contain them) unless ``allow_special=False``,
which corpus tokenization uses so a corpus never produces special tokens.

Files: ``tokenizer.model`` (sentencepiece) and ``tokenizer.json`` (this layout); a checkpoint
copies both (``Tokenizer.files``).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import sentencepiece as spm

from glmctl.artifacts import atomic_write_bytes, atomic_write_json
from glmctl.config import SPECIAL_TOKENS
from glmctl.errors import InputError

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
FORMAT = "glmctl-tokenizer"
FORMAT_VERSION = 1
PAD_MULTIPLE = 128  # embedding rows split evenly over up to 128-way tensor parallelism
SPACE_MARKER = "\u2581"  # sentencepiece's "▁"; literal occurrences go through byte pieces
_MASK_RE = re.compile(r"(\[(?:MASK|gMASK|sMASK)\])")

# Sentencepiece trainer settings that make the model lossless and give the layout above.
SENTENCEPIECE_OPTIONS = dict(
    byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
    add_dummy_prefix=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
    unk_id=0, bos_id=1, eos_id=2, pad_id=3, max_sentence_length=16384,
)


def padded_vocab_size(num_text_tokens: int, multiple: int = PAD_MULTIPLE) -> int:
    """Text tokens + the 8 GLM specials, rounded up: 8000 -> 8064, 32000 -> 32128."""
    n = num_text_tokens + len(SPECIAL_TOKENS)
    return -(-n // multiple) * multiple


def build_meta(model_proto: bytes, *, model_type: str) -> dict:
    """The tokenizer.json contents for a sentencepiece model trained with SENTENCEPIECE_OPTIONS."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    n = sp.get_piece_size()
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "model_sha256": hashlib.sha256(model_proto).hexdigest(),
        "model_type": model_type,
        "num_text_tokens": n,
        "vocab_size": padded_vocab_size(n),
        "pad_to_multiple_of": PAD_MULTIPLE,
        "special_tokens": {name: n + i for i, name in enumerate(SPECIAL_TOKENS)},
        "text_tokens": {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(),
                        "newline": sp.piece_to_id("\n")},
    }


class Tokenizer:
    """Load with ``Tokenizer.load(dir)``; ``encode(text) -> list[int]``, ``decode(ids) -> str``."""

    files = (MODEL_FILE, META_FILE)

    def __init__(self, model_proto: bytes, meta: dict, source: str = "<memory>"):
        self.source = source
        self.model_proto = model_proto
        self.meta = meta
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.num_text_tokens = self.sp.get_piece_size()
        self._check(meta, source)
        self.vocab_size = int(meta["vocab_size"])
        self.special_ids = dict(meta["special_tokens"])
        text = meta["text_tokens"]
        self.special_ids["eos"] = int(text["eos"])
        self.special_ids["pad"] = int(text["pad"])
        self.mask_token_id = self.special_ids["[MASK]"]
        self.gmask_token_id = self.special_ids["[gMASK]"]
        self.smask_token_id = self.special_ids["[sMASK]"]
        self.eod_token_id = self.special_ids["eod"]
        self.sop_token_id = self.special_ids["sop"]
        self.eop_token_id = self.special_ids["eop"]
        self.eos_token_id = self.special_ids["eos"]
        self.pad_token_id = self.special_ids["pad"]
        self.unk_token_id = int(text["unk"])
        self.newline_token_id = int(text["newline"])
        self._names = {self.special_ids[n]: f"[{n}]" if not n.startswith("[") else n for n in SPECIAL_TOKENS}
        self._literal = {"[MASK]": self.mask_token_id, "[gMASK]": self.gmask_token_id,
                         "[sMASK]": self.smask_token_id}
        self._marker_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARKER.encode()]
        self._numpy_batch = True  # sentencepiece >= 0.2.1 returns numpy buffers; older: int lists

    def _check(self, meta: dict, source: str) -> None:
        if meta.get("format") != FORMAT:
            raise InputError(f"{source}: not a glmctl tokenizer.json (format {meta.get('format')!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise InputError(f"{source}: tokenizer.json version {meta.get('version')!r} is not supported "
                             f"(this glmctl reads version {FORMAT_VERSION})")
        if meta.get("num_text_tokens") != self.num_text_tokens:
            raise InputError(f"{source}: {MODEL_FILE} has {self.num_text_tokens} pieces but {META_FILE} says "
                             f"{meta.get('num_text_tokens')} (the two files do not belong together)")
        want = {name: self.num_text_tokens + i for i, name in enumerate(SPECIAL_TOKENS)}
        if meta.get("special_tokens") != want:
            raise InputError(f"{source}: special tokens {meta.get('special_tokens')} do not follow the text "
                             f"tokens in GLM-130B's order {list(SPECIAL_TOKENS)}")
        vs = meta.get("vocab_size")
        if not isinstance(vs, int) or vs < self.num_text_tokens + len(SPECIAL_TOKENS):
            raise InputError(f"{source}: vocab_size {vs!r} is smaller than the "
                             f"{self.num_text_tokens + len(SPECIAL_TOKENS)} tokens it must hold")

    # ---- files -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """From a tokenizer artifact or a checkpoint dir holding tokenizer.model + tokenizer.json."""
        path = Path(path)
        d = path.parent if path.name in cls.files else path
        if not d.is_dir():
            raise InputError(f"{path}: no such tokenizer directory")
        missing = [f for f in cls.files if not (d / f).is_file()]
        if missing:
            raise InputError(f"{d}: not a tokenizer (missing {', '.join(missing)}); "
                             f"make one with `glmctl tokenizer train`")
        try:
            meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{d / META_FILE}: malformed JSON ({e})") from None
        proto = (d / MODEL_FILE).read_bytes()
        if meta.get("model_sha256") not in (None, hashlib.sha256(proto).hexdigest()):
            raise InputError(f"{d / MODEL_FILE}: sha256 does not match {META_FILE} (a different or damaged model)")
        try:
            return cls(proto, meta, source=str(d))
        except RuntimeError as e:  # sentencepiece could not parse the model
            raise InputError(f"{d / MODEL_FILE}: not a sentencepiece model ({e})") from None

    def save(self, directory: str | Path) -> list[Path]:
        """Write tokenizer.model + tokenizer.json into ``directory`` (atomically); returns the paths."""
        d = Path(directory)
        atomic_write_bytes(d / MODEL_FILE, self.model_proto)
        atomic_write_json(d / META_FILE, self.meta)
        return [d / f for f in self.files]

    def config_overrides(self) -> dict:
        """Fields to apply to a ModelConfig: ``cfg.replace(**tok.config_overrides())``."""
        return {"vocab_size": self.vocab_size, "mask_token_id": self.mask_token_id,
                "gmask_token_id": self.gmask_token_id, "smask_token_id": self.smask_token_id,
                "eod_token_id": self.eod_token_id, "sop_token_id": self.sop_token_id,
                "eop_token_id": self.eop_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}

    # ---- encode / decode -------------------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        if SPACE_MARKER not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARKER)):
            if i:
                ids.extend(self._marker_ids)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Text -> ids. "[MASK]", "[gMASK]", "[sMASK]" in the text become special ids unless
        ``allow_special=False``. Line breaks are token ``newline_token_id``; no eod is added."""
        if not allow_special or "[" not in text:
            return self._encode_plain(text)
        ids: list[int] = []
        for part in _MASK_RE.split(text):
            if part in self._literal:
                ids.append(self._literal[part])
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

    def encode_arrays(self, texts: list[str]) -> list:
        """Plain-text batch encode (no special strings) -> one int32 numpy array per text.

        Same ids as ``encode(t, allow_special=False)``; the corpus path of ``glmctl tokenize``.
        """
        out = None
        if self._numpy_batch:
            try:
                out = self.sp.encode(texts, num_threads=1, return_type="numpy")
            except (ValueError, TypeError):  # sentencepiece < 0.2.1: no numpy return type
                self._numpy_batch = False
        if out is None:
            out = [np.asarray(ids, dtype=np.int32) for ids in self.sp.encode(texts, num_threads=1)]
        for i, t in enumerate(texts):
            if SPACE_MARKER in t:
                out[i] = np.asarray(self._encode_plain(t), dtype=np.int32)
        return out

    def decode(self, ids) -> str:
        """Ids -> text. Special ids render as "[MASK]", "[sop]", ...; padding rows as ""."""
        out: list[str] = []
        run: list[int] = []
        n = self.num_text_tokens
        for i in ids:
            i = int(i)
            if 0 <= i < n:
                run.append(i)
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if run:
                out.append(self.sp.decode(run))
                run = []
            out.append(self._names.get(i, ""))
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if 0 <= i < self.num_text_tokens:
            return self.sp.id_to_piece(i)
        return self._names.get(i, f"<unused_{i}>")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, text_tokens={self.num_text_tokens}, vocab_size={self.vocab_size}, "
                f"type={self.meta.get('model_type')})")
