"""Open a model for use: the one way generate, evaluate, quantize, convert's verification (and
serve, finetune) get a model, its tokenizer and its special-token ids.

    s = open_model("model-int4", dtype="fp16", device=rt.device)
    s.model(tokens, positions, mask);  s.tokenizer.encode(text);  s.ids["[gMASK]"]

* Weights: this tensor-parallel rank's shard only (glmctl.model.parallel), straight into the
  network built on the meta device (``checkpoint.model_from_state_dict``). Quantized weights stay
  int8 with their scales: full-precision copies of them are never made.
* Special-token ids: config.json is the model's truth. The tokenizer (the checkpoint's copy, or
  ``tokenizer=DIR``) must agree with it on every special token both define, and must not have
  more ids than the model has embedding rows; otherwise ``TokenizerMismatch`` (exit 3): a
  tokenizer that numbers [MASK] or sop differently would silently produce garbage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from glmctl.adapters import load_adapter
from glmctl.artifacts import read_manifest
from glmctl.checkpoint import load_model
from glmctl.config import ModelConfig
from glmctl.errors import InputError
from glmctl.model import GLM
from glmctl.model import parallel as tp
from glmctl.tokenizer import Tokenizer

# The special tokens a tokenizer and config.json must agree on (eod ends a span in generation).
CHECKED_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "eos", "eod")


class TokenizerMismatch(InputError):
    """A tokenizer and a checkpoint's config.json disagree (exit 3)."""


def check_tokenizer(cfg: ModelConfig, tokenizer: Tokenizer, where: str | Path) -> None:
    """The one policy for a tokenizer beside a model config (see the module docstring)."""
    ids = cfg.special_token_ids()
    tok_ids = tokenizer.special_ids
    for name in CHECKED_SPECIALS:
        if name in tok_ids and tok_ids[name] != ids[name]:
            raise TokenizerMismatch(f"{where}: the tokenizer's {name} id {tok_ids[name]} differs from config.json's "
                                    f"{ids[name]} (tokenizer and checkpoint do not belong together)")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TokenizerMismatch(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                                f"{cfg.vocab_size} embedding rows")


@dataclass
class Session:
    path: Path
    model: GLM
    tokenizer: Tokenizer | None
    manifest: dict

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def ids(self) -> dict[str, int]:
        return self.config.special_token_ids()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the float weights; int8 weights compute in it too)."""
        return self.model.transformer.final_layernorm.weight.dtype

    @property
    def precision(self) -> str:
        """'float32', 'bfloat16', or 'int4+float16' for a quantized model."""
        q = self.config.quantization
        dt = str(self.dtype).replace("torch.", "")
        return f"int{q['bits']}+{dt}" if q else dt

    def describe(self) -> str:
        """'<path> (N layers, precision, TP=k, device)' for the first log line of a stage."""
        return (f"{self.path} ({self.config.num_layers} layers, {self.precision}, TP={tp.tp_size()}, "
                f"{self.device})")


def open_model(path: str | Path, *, dtype=None, device=None, tokenizer: str | Path | None = None,
               need_tokenizer: bool = True, adapter: str | Path | None = None, compile: bool = False) -> Session:
    """Load the checkpoint at ``path`` for this rank and check its tokenizer (module docstring).

    ``dtype``: 'fp32' | 'bf16' | 'fp16' or a torch dtype for the float weights (default: as
    stored). ``tokenizer``: another tokenizer directory (default: the checkpoint's copy).
    ``need_tokenizer=False``: a checkpoint without one opens with ``tokenizer=None``.
    ``adapter``: a LoRA / P-tuning adapter directory (or finetune run) made on this checkpoint,
    attached to the model (glmctl.adapters); one made on another base is an InputError (exit 3).
    ``compile``: run each decoding step through ``torch.compile`` (``GLM.compile_decode``).
    """
    path = Path(path)
    manifest = read_manifest(path)  # one clear line for a missing or incomplete checkpoint
    tok = None
    tok_dir = Path(tokenizer) if tokenizer is not None else path
    if need_tokenizer or (tok_dir / "tokenizer.model").exists():
        tok = Tokenizer.load(tok_dir)
    model = load_model(path, dtype=dtype, device=device)
    if tok is not None:
        check_tokenizer(model.config, tok, path)
    if adapter is not None:
        load_adapter(model, adapter, path)
        model.eval()
    if compile:
        model.compile_decode()
    return Session(path=path, model=model, tokenizer=tok, manifest=manifest)
