"""The glmctl tokenizer for transformers (remote code, written by `glmctl convert --to hf`).

A sentencepiece model plus GLM-130B's special tokens right after its pieces, in this order:
[MASK] [gMASK] [sMASK] eod sop eop ENC dBLOCK, then padding ids up to the model's embedding rows
(glmctl/tokenizer.py). Encoding and decoding are glmctl's, id for id and character for character:

* the literal strings "[MASK]", "[gMASK]", "[sMASK]" in a text become their ids; the rest goes
  through sentencepiece, except sentencepiece's own space marker U+2581, which is encoded as its
  three UTF-8 byte pieces so that every text round-trips;
* special ids decode as "[MASK]", "[gMASK]", "[sMASK]", "[eod]", "[sop]", "[eop]", "[ENC]",
  "[dBLOCK]" (dropped with ``skip_special_tokens=True``); padding ids decode to nothing.

``add_special_tokens=True`` (the default of ``tokenizer(text)``) prepares a blank-filling prompt
as GLM-130B's generate.py does (docs/glm130b.md §4.3): a text that holds a mask token gets eos
appended unless it ends with a mask, then <sop>; a text without a mask is left as it is (the
model reads it after an implied [gMASK] <sop>). Self-contained: no glmctl import.
"""
import os
import re
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK")
SPACE_MARKER = "\u2581"
_MASK_RE = re.compile(r"(\[(?:MASK|gMASK|sMASK)\])")


class GLM130BTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, vocab_size=None, unk_token="<unk>", eos_token="</s>", pad_token="<pad>",
                 bos_token="[sop]", mask_token="[MASK]", clean_up_tokenization_spaces=False, **kwargs):
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        n = self.num_text_tokens = self.sp.get_piece_size()
        self.padded_vocab_size = int(vocab_size) if vocab_size else -(-(n + len(SPECIAL_TOKENS)) // 128) * 128
        self.special_ids = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._names = {i: (name if name.startswith("[") else f"[{name}]") for name, i in self.special_ids.items()}
        self._literal = {name: self.special_ids[name] for name in ("[MASK]", "[gMASK]", "[sMASK]")}
        self._marker_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARKER.encode()]
        self._vocab = {self._piece(i): i for i in range(self.padded_vocab_size)}
        for i in range(n):  # sentencepiece's pieces win a name clash
            self._vocab[self.sp.id_to_piece(i)] = i
        kwargs.pop("additional_special_tokens", None)
        kwargs.pop("extra_special_tokens", None)
        super().__init__(unk_token=unk_token, eos_token=eos_token, pad_token=pad_token, bos_token=bos_token,
                         mask_token=mask_token, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # ids of GLM-130B's special tokens
    @property
    def gmask_token_id(self):
        return self.special_ids["[gMASK]"]

    @property
    def smask_token_id(self):
        return self.special_ids["[sMASK]"]

    @property
    def sop_token_id(self):
        return self.special_ids["sop"]

    @property
    def eop_token_id(self):
        return self.special_ids["eop"]

    @property
    def eod_token_id(self):
        return self.special_ids["eod"]

    @property
    def vocab_size(self):
        return self.padded_vocab_size

    def get_vocab(self):
        return dict(self._vocab)

    def _piece(self, i):
        if 0 <= i < self.num_text_tokens:
            return self.sp.id_to_piece(i)
        return self._names.get(i, f"<unused_{i}>")

    # ---- glmctl's encode / decode ----------------------------------------------------------
    def _encode_plain(self, text):
        if SPACE_MARKER not in text:
            return self.sp.encode(text)
        ids = []
        for i, part in enumerate(text.split(SPACE_MARKER)):
            if i:
                ids.extend(self._marker_ids)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_ids(self, text):
        """Text -> ids exactly as glmctl's Tokenizer.encode."""
        if "[" not in text:
            return self._encode_plain(text)
        ids = []
        for part in _MASK_RE.split(text):
            if part in self._literal:
                ids.append(self._literal[part])
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

    def decode_ids(self, ids, skip_special_tokens=False):
        """Ids -> text exactly as glmctl's Tokenizer.decode (specials dropped on request)."""
        out, run, n = [], [], self.num_text_tokens
        for i in ids:
            i = int(i)
            if 0 <= i < n:
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if not skip_special_tokens:
                out.append(self._names.get(i, ""))
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    # ---- the transformers hooks --------------------------------------------------------------
    def tokenize(self, text, **kwargs):
        return [self._piece(i) for i in self.encode_ids(text)]

    def _tokenize(self, text, **kwargs):
        return self.tokenize(text)

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, self.sp.unk_id())

    def _convert_token_to_id_with_added_voc(self, token):
        return self._convert_token_to_id(token)

    def _convert_id_to_token(self, index):
        return self._piece(int(index))

    def convert_tokens_to_string(self, tokens):
        return self.decode_ids([self._convert_token_to_id(t) for t in tokens])

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.decode_ids(token_ids, skip_special_tokens=skip_special_tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = list(token_ids_0) + list(token_ids_1 or [])
        masks = set(self._literal.values())
        if not any(t in masks for t in ids) or self.sop_token_id in ids:
            return ids
        if ids[-1] not in masks:
            ids.append(self.eos_token_id)
        return ids + [self.sop_token_id]

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        ids = list(token_ids_0) + list(token_ids_1 or [])
        if already_has_special_tokens:
            return [1 if t >= self.num_text_tokens else 0 for t in ids]
        return [0] * len(ids) + [1] * (len(self.build_inputs_with_special_tokens(ids)) - len(ids))

    def num_special_tokens_to_add(self, pair=False):
        return 2  # at most eos and <sop>

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def save_vocabulary(self, save_directory, filename_prefix=None):
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
