"""What tensor shapes say about a GLM: a ModelConfig inferred from a checkpoint that carries
none (SAT, DeepSpeed ZeRO), and shape arithmetic for resharding plans (no meta tensors are
sharded: ops on those import torch._dynamo, seconds per run)."""
from __future__ import annotations

import math
import re

import torch

from glmctl import tp_layout
from glmctl.checkpoint import build_model
from glmctl.config import ModelConfig, get_preset, own_vocab
from glmctl.errors import InputError, UsageError

INV_FREQ = "rotary_emb.inv_freq"
LAYER_RE = re.compile(r"transformer\.layers\.(\d+)\.")


class ShapeFacts:
    """Layers, hidden, FFN and vocabulary sizes, quantization bits and (from SAT's inv_freq) the
    head dim of a checkpoint with ``tp`` ranks, from {name: [shape per rank]} and {name: dtype}."""

    def __init__(self, local: dict, dtypes: dict, tp: int, where: str):
        self.local, self.dtypes, self.tp, self.where = local, dtypes, tp, where
        self.layers = sorted({int(m.group(1)) for n in local for m in [LAYER_RE.match(n)] if m})
        self.hidden = self._dim("transformer.final_layernorm.weight", 0) or self._dim(
            "transformer.layers.0.input_layernorm.weight", 0)
        if not self.hidden:
            raise InputError(f"{where}: not a GLM checkpoint (no transformer.final_layernorm.weight)")
        qkv = self._dim("transformer.layers.0.attention.query_key_value.weight", 0)
        h4h = self._dim("transformer.layers.0.mlp.dense_h_to_4h.weight", 0)
        emb = self._dim("transformer.word_embeddings.weight", 0)
        if not (qkv and h4h and emb):
            raise InputError(f"{where}: not a GLM checkpoint (layer 0's query_key_value, dense_h_to_4h or "
                             "the word embeddings are missing)")
        self.qkv_rows_local = qkv
        self.inner = h4h * tp // 2
        self.vocab = emb * tp
        w = dtypes.get("transformer.layers.0.attention.query_key_value.weight")
        self.quantized = any(n.endswith("weight_scale") for n in local)
        self.bits = None
        if self.quantized:
            cols = self._dim("transformer.layers.0.attention.query_key_value.weight", 1)
            if w != torch.int8:
                raise InputError(f"{where}: weight_scale tensors present but query_key_value.weight is {w}, not int8")
            self.bits = 4 if cols * 2 == self.hidden else 8 if cols == self.hidden else None
            if self.bits is None:
                raise InputError(f"{where}: query_key_value.weight has {cols} columns for hidden size "
                                 f"{self.hidden}: neither INT8 nor packed INT4")
        inv = [n for n in local if n.endswith(INV_FREQ)]
        self.head_dim = 2 * local[inv[0]][0][0] if inv and local[inv[0]][0] else None

    def _dim(self, name, d):
        s = self.local.get(name)
        return s[0][d] if s and len(s[0]) > d else None

    def check_rank_count(self, files) -> None:
        """The rank count the QKV rows imply is the number of rank ``files``."""
        implied, rem = divmod(3 * self.hidden, self.qkv_rows_local)
        if rem or implied != self.tp:
            have = len(files)
            extra = (f"; {files[0].parent / f'mp_rank_{have:02d}_model_states.pt'} is missing"
                     if not rem and implied > have else "")
            raise InputError(f"{self.where}: shapes imply TP={3 * self.hidden / self.qkv_rows_local:g} "
                             f"(query_key_value has {self.qkv_rows_local} of {3 * self.hidden} rows per rank) "
                             f"but {have} rank file{'s' if have != 1 else ''} exist{'s' if have == 1 else ''}{extra}")

    def in_features(self, name, local=False):
        n = tp_layout.linear_in_features(name, self.hidden, self.inner)
        if local and tp_layout.classify(name) == tp_layout.ROW:
            n //= self.tp
        return n

    def sat_group(self):
        """GLM-130B's per-rank row scales as one group size for every layer."""
        if not self.quantized or self.tp == 1:
            return None
        return math.gcd(self.hidden // self.tp, self.inner // self.tp)

    def quantization(self) -> dict | None:
        return {"bits": self.bits, "group_size": self.sat_group(), "method": "rtn"} if self.quantized else None

    def model_config(self, *, heads=None, preset=None, base=None) -> ModelConfig:
        """ModelConfig for these shapes: head count from ``heads``, the preset, or inv_freq."""
        cfg = get_preset(preset) if preset else (base or ModelConfig())
        if heads is None and not preset and base is None:
            if self.head_dim:
                heads = self.hidden // self.head_dim
            else:
                raise UsageError(f"{self.where}: the checkpoint does not record the attention head count; "
                                 "pass --preset NAME or --num-attention-heads N")
        if heads is not None:
            cfg = cfg.replace(num_attention_heads=heads)
        shape_fields = dict(num_layers=len(self.layers), hidden_size=self.hidden, inner_hidden_size=self.inner,
                            vocab_size=self.vocab)
        if preset:
            for field, value in shape_fields.items():
                if getattr(cfg, field) != value:
                    raise InputError(self._mismatch(preset, field, getattr(cfg, field), value))
        else:
            try:
                cfg = cfg.replace(**shape_fields)
            except UsageError as e:
                raise UsageError(f"{self.where}: {e}") from None
            if base is None and max(cfg.special_token_ids().values()) >= cfg.vocab_size:
                cfg = own_vocab(cfg)
        if self.head_dim and cfg.head_dim != self.head_dim:
            raise InputError(f"{self.where}: rotary_emb.inv_freq has {self.head_dim // 2} frequencies (head "
                             f"dim {self.head_dim}) but {cfg.num_attention_heads} heads give head dim {cfg.head_dim}")
        return cfg.replace(tensor_parallel_size=self.tp, quantization=self.quantization())

    def summary_config(self) -> dict:
        """What the shapes alone say (no head count), for inspect."""
        return {"num_layers": len(self.layers), "hidden_size": self.hidden, "inner_hidden_size": self.inner,
                "vocab_size": self.vocab, "num_attention_heads": None}

    def _mismatch(self, preset, field, want, got):
        if field == "num_layers":
            what = f"it has {got} layers (transformer.layers.0 ... {got - 1}), the preset {want}"
        else:
            name = {"hidden_size": "transformer.final_layernorm.weight",
                    "inner_hidden_size": "transformer.layers.0.mlp.dense_h_to_4h.weight",
                    "vocab_size": "transformer.word_embeddings.weight"}[field]
            what = f"{name} implies {field} {got}, the preset has {want}"
        return f"{self.where}: preset {preset} does not match the checkpoint: {what}"


# ---- shape arithmetic --------------------------------------------------------------------------
def regroup_shape(shape, in_features, group) -> tuple:
    """Shape of a weight_scale of ``shape`` stored with ``group`` (None: one per row)."""
    return (shape[0],) if group is None else (shape[0], in_features // group)


def split_shape(name, shape, tp) -> tuple:
    """The local shape of global ``shape`` on one of ``tp`` ranks (glmctl.tp_layout's rules)."""
    kind = tp_layout.classify(name)
    if tp == 1 or kind == tp_layout.REPLICATED:
        return tuple(shape)
    dim = 1 if kind == tp_layout.ROW else 0
    if len(shape) <= dim or shape[dim] % tp:
        raise tp_layout.LayoutError(f"{name}: dim {dim} of shape {tuple(shape)} does not split into {tp} parts")
    out = list(shape)
    out[dim] //= tp
    return tuple(out)


def model_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """{name: global shape} of the GLM ``cfg`` describes, in its state-dict order."""
    model = build_model(cfg.replace(tensor_parallel_size=1), device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def canonical_order(names, cfg: ModelConfig) -> list[str]:
    """Model order (embedding, layer 0 … N, final LayerNorm); within a layer the GLM module's
    state-dict order; SAT's extra inv_freq after each layer's tensors."""
    pos = {}
    for i, k in enumerate(model_shapes(cfg)):
        pos.setdefault(re.sub(r"layers\.\d+\.", "layers.#.", k), i)

    def key(n):
        m = LAYER_RE.match(n)
        section = 1 if m else (0 if "word_embeddings" in n else 2)
        return (section, int(m.group(1)) if m else 0, pos.get(re.sub(r"layers\.\d+\.", "layers.#.", n), 10**6), n)
    return sorted(names, key=key)
