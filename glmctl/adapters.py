"""Adapters for fine-tuning (docs/finetune.md): LoRA over glmctl's own tensor-parallel linear layers,
fp or quantized, P-tuning v2 prefixes, and the adapter directory (save, load, merge).

    add_lora(glm, LoraSpec(rank=8, alpha=16, targets=("query_key_value",)), seed=1)
    add_prefix(glm, PrefixSpec(length=16))
    freeze_base(glm)                           # only adapter parameters keep requires_grad
    save_adapter(glm, spec, base_dir, out)     # adapter_config.json + adapter.safetensors + manifest.json
    load_adapter(glm, adapter_dir, base_dir)   # wrong base (manifest hash, shapes) -> InputError (exit 3)
    merged_state_dict(glm, quantized=...)      # weights with the LoRA deltas folded in
    merged_model(glm, precision="full")        # ... as a new GLM (finetune --merge, convert --merge-adapter)

LoRA (y = x W^T + b + s * (x A^T) B^T, s = alpha / r, B = 0 at the start): a targeted layer becomes
``LoRAColumnParallelLinear`` / ``LoRARowParallelLinear``, the same layer with a ``lora`` submodule;
its weight, bias and scale tensors and their state-dict names are unchanged. Column-parallel: A
[r, in] whole, B [out/tp, r] this rank's rows; row-parallel: A [r, in/tp] this rank's columns, B
[out, r] whole, so a tensor-parallel rank computes its part exactly like the base matmul.

Quantized bases: the frozen int8 / INT4 weight stays packed and the forward is the quantized kernel
(glmctl.kernels.quant_linear). The kernel has no autograd, so every quantized linear of a model that
is trained (targeted or not: the gradient must reach earlier layers' adapters) computes through
``QuantMatmul``, whose backward is grad @ dequant(W): exact for the dequantized weight.

Trainable LayerNorms (``AdapterSpec.norms``, `--train-norms`): every LayerNorm's gain and bias
train as well (a few thousand numbers), are saved in adapter.safetensors under their own names,
replace the base's on load and are part of a merged checkpoint. On a DeepNorm model each sublayer's
output is added to alpha = sqrt(2N) times its normalized input, so the gains decide how much a
(low-rank) change inside a sublayer moves the residual stream (bench/RESULTS.md).

P-tuning v2: trainable keys and values for every layer (``PrefixEncoder``, optionally through a
reparameterisation MLP), attended by every position. They enter through the network's KV cache: a
forward pre-hook on the GLM puts them in front of the cache and widens the attention mask by the
prefix columns (visible to every row that sees anything; padding rows stay blocked). Positions
are unchanged (the prefix has none; RoPE is not applied to it).
"""
from __future__ import annotations

import inspect
import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from glmctl import kernels
from glmctl.artifacts import ArtifactWriter, atomic_write_json, manifest_hash
from glmctl.checkpoint import model_from_state_dict
from glmctl.errors import InputError
from glmctl.model import GLM
from glmctl.model import parallel as tp
from glmctl.model.glm import EMBEDDING_KEY, KVCache

LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "word_embeddings")
LINEAR_TARGETS = LORA_TARGETS[:4]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
FORMAT = "glmctl-adapter"
ADAPTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LINEAR_TARGETS


@dataclass(frozen=True)
class PrefixSpec:
    length: int = 16
    projection: int | None = None  # hidden size of the reparameterisation MLP (None: plain prefix)


@dataclass(frozen=True)
class AdapterSpec:
    method: str  # "lora" | "ptuning"
    lora: LoraSpec | None = None
    prefix: PrefixSpec | None = None
    dtype: str = "fp32"
    seed: int = 1234
    norms: bool = False  # the LayerNorms' gains and biases train too (saved in the adapter)
    token_ids: tuple[int, ...] = ()  # embedding rows that train too (a delta per row, saved in the adapter)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "lora": asdict(self.lora) if self.lora else None,
                "prefix": asdict(self.prefix) if self.prefix else None, "dtype": self.dtype, "seed": self.seed,
                "norms": self.norms, "token_ids": list(self.token_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterSpec":
        lora = d.get("lora")
        if lora is not None:
            lora = LoraSpec(**{**lora, "targets": tuple(lora["targets"])})
        prefix = PrefixSpec(**d["prefix"]) if d.get("prefix") else None
        return cls(method=d["method"], lora=lora, prefix=prefix, dtype=d.get("dtype", "fp32"),
                   seed=int(d.get("seed", 1234)), norms=bool(d.get("norms", False)),
                   token_ids=tuple(int(i) for i in d.get("token_ids") or ()))


# ---- the quantized matmul with a gradient to its input ------------------------------------------
class QuantMatmul(torch.autograd.Function):
    """y = quant_linear(x, W_q, scale, b); dy/dx through the dequantized weight, W_q frozen."""

    @staticmethod
    def forward(ctx, x, qweight, scale, bias, bits: int):
        ctx.save_for_backward(qweight, scale)
        ctx.bits = bits
        ctx.bias_dtype = None if bias is None else bias.dtype
        return kernels.quant_linear(x, qweight, scale, bias, bits=bits)

    @staticmethod
    def backward(ctx, grad):
        qweight, scale = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            w = kernels.dequantize(qweight, scale, ctx.bits, torch.float32)
            gx = (grad.float() @ w).to(grad.dtype)
        if ctx.needs_input_grad[3]:
            gb = grad.reshape(-1, grad.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return gx, None, None, gb, None


def _matmul(layer, x, bias=None):
    if layer.quant is None:
        return F.linear(x, layer.weight, bias)
    return QuantMatmul.apply(x, layer.weight, layer.weight_scale, bias, layer.quant["bits"])


# ---- LoRA ----------------------------------------------------------------------------------------
class LoRA(nn.Module):
    """The low-rank update of one layer: A [r, in_local], B [out_local, r], scaling alpha / r."""

    def __init__(self, in_local: int, out_local: int, spec: LoraSpec, dtype=torch.float32, device=None):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(spec.rank, in_local, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out_local, spec.rank, dtype=dtype, device=device))
        self.scaling = spec.alpha / spec.rank
        self.dropout = nn.Dropout(spec.dropout)

    def down(self, x):
        return F.linear(self.dropout(x).to(self.A.dtype), self.A)

    def up(self, u):
        return F.linear(u, self.B) * self.scaling

    def delta(self) -> torch.Tensor:
        """scaling * B A in fp32 ([out_local, in_local]): what merging adds to the weight."""
        return (self.B.float() @ self.A.float()) * self.scaling

    def extra_repr(self):
        return f"rank={self.A.shape[0]}, scaling={self.scaling:g}"


class LoRAColumnParallelLinear(tp.ColumnParallelLinear):
    """A column-parallel layer (fp or quantized) plus ``lora`` (or None: only the quantized matmul
    made differentiable). The LoRA input is whole on every rank; its rank-r activation is copied
    to the TP group so that A's and x's gradients sum over the ranks' B rows."""

    def _matmul(self, x, bias=None):
        return _matmul(self, x, bias)

    def forward(self, x):
        y = self._matmul(tp.copy_to_tp(x), self.bias)
        if self.lora is not None:
            y = y + self.lora.up(tp.copy_to_tp(self.lora.down(x))).to(y.dtype)
        return y


class LoRARowParallelLinear(tp.RowParallelLinear):
    """A row-parallel layer plus ``lora``: each rank's columns of A give a partial rank-r
    activation, summed over the TP group like the base matmul's partial products."""

    def _matmul(self, x, bias=None):
        return _matmul(self, x, bias)

    def forward(self, x):
        y = tp.reduce_from_tp(self._matmul(x))
        if self.lora is not None:
            y = y + self.lora.up(tp.reduce_from_tp(self.lora.down(x))).to(y.dtype)
        return y + self.bias if self.bias is not None else y


class TokenRows(nn.Module):
    """Trainable rows of the embedding (peft's trainable tokens): ``delta`` [k, h] added to the
    rows ``ids`` (AdapterSpec.token_ids; zero at the start). Under TP a rank adds the rows it holds."""

    def __init__(self, ids, hidden: int, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(ids), hidden, dtype=dtype, device=device))

    def add_to(self, w: torch.Tensor, start: int) -> torch.Tensor:
        local = self.ids - start
        keep = (local >= 0) & (local < w.shape[0])
        return w.index_add(0, local[keep], self.delta[keep].to(w.dtype))


class LoRAVocabEmbedding(tp.VocabParallelEmbedding):
    """The (tied) word embedding plus ``lora`` (A [r, V_local], this rank's vocabulary columns;
    B [h, r]: E + s (B A)^T) and/or ``token_rows`` (TokenRows). ``weight`` is the adapted matrix
    (computed on access, differentiable), so the lookup and the tied output layer (GLM.logits) both
    see it, as they would a merged matrix; the stored parameter (state-dict name ``weight``) stays
    the base's."""

    @property
    def weight(self):
        w = self._parameters["weight"]
        if self.lora is not None:
            w = w + self.lora.delta().T.to(w.dtype)
        return w if self.token_rows is None else self.token_rows.add_to(w, self.start)


def _adapt_embedding(glm: GLM) -> LoRAVocabEmbedding:
    emb = glm.transformer.word_embeddings
    if type(emb) is not LoRAVocabEmbedding:
        if type(emb) is not tp.VocabParallelEmbedding:
            raise InputError("adapting the word embedding (LoRA on word_embeddings, trainable token rows) needs "
                             "a floating-point embedding; this one is quantized")
        emb.__class__ = LoRAVocabEmbedding
        emb.lora = emb.token_rows = None
    return emb


def _adapt(layer, lora: LoRA | None):
    """Turn ``layer`` into its LoRA twin in place (same tensors and names, plus ``lora``)."""
    layer.__class__ = (LoRAColumnParallelLinear if isinstance(layer, tp.ColumnParallelLinear)
                       else LoRARowParallelLinear)
    layer.lora = lora
    return layer


def linear_layers(glm: GLM):
    """(name, layer) of every tensor-parallel linear layer."""
    return [(n, m) for n, m in glm.named_modules() if isinstance(m, (tp.ColumnParallelLinear, tp.RowParallelLinear))]


def _seeded(seed: int, name: str) -> torch.Generator:
    """A generator for one tensor: the same in every process and for every TP layout."""
    return torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2 ** 63))


def add_lora(glm: GLM, spec: LoraSpec, seed: int, dtype=torch.float32) -> list[str]:
    """LoRA on every layer whose last name is in ``spec.targets``; quantized layers that are not
    targeted get the differentiable matmul. A is drawn at its global shape from a generator seeded
    by (seed, layer name), as peft does (Kaiming-uniform, bound 1/sqrt(in)), then sliced to this
    rank; B = 0. Returns the targeted layer names."""
    done = []
    if "word_embeddings" in spec.targets:
        emb = _adapt_embedding(glm)
        name = "transformer.word_embeddings"
        w = emb._parameters["weight"]
        lora = LoRA(emb.vocab_local, w.shape[1], spec, dtype=dtype, device=w.device)
        v_global = emb.vocab_local * tp.tp_size()
        a = (torch.rand(spec.rank, v_global, generator=_seeded(seed, name), dtype=torch.float64) * 2 - 1)
        with torch.no_grad():
            lora.A.copy_((a / math.sqrt(v_global)).chunk(tp.tp_size(), dim=1)[tp.tp_rank()].to(dtype))
        emb.lora = lora
        done.append(name)
    for name, layer in linear_layers(glm):
        target = name.rsplit(".", 1)[-1] in spec.targets
        if not target:
            if layer.quant is not None:
                _adapt(layer, None)
            continue
        device = layer.bias.device if layer.bias is not None else None
        row = isinstance(layer, tp.RowParallelLinear)
        lora = LoRA(layer.in_local, layer.out_local, spec, dtype=dtype, device=device)
        in_global = layer.in_local * (tp.tp_size() if row else 1)
        bound = 1.0 / math.sqrt(in_global)
        a = (torch.rand(spec.rank, in_global, generator=_seeded(seed, name), dtype=torch.float64) * 2 - 1) * bound
        if row:
            a = a.chunk(tp.tp_size(), dim=1)[tp.tp_rank()]
        with torch.no_grad():
            lora.A.copy_(a.to(dtype))
        _adapt(layer, lora)
        done.append(name)
    return done


# ---- P-tuning v2 ---------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """Trainable keys and values of ``length`` prefix tokens for every layer: a [p, L * 2 * h]
    table, or a [p, h] embedding through an MLP (h -> projection -> L * 2 * h, tanh) as P-tuning v2's
    reparameterisation. ``key_values()`` gives [L, 2, heads/tp, p, d] for this rank's heads."""

    def __init__(self, cfg, spec: PrefixSpec, dtype=torch.float32, device=None):
        super().__init__()
        self.length, self.layers = spec.length, cfg.num_layers
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        width = cfg.num_layers * 2 * cfg.hidden_size
        if spec.projection:
            self.embedding = nn.Parameter(torch.zeros(spec.length, cfg.hidden_size, dtype=dtype, device=device))
            self.mlp = nn.Sequential(nn.Linear(cfg.hidden_size, spec.projection, dtype=dtype, device=device),
                                     nn.Tanh(), nn.Linear(spec.projection, width, dtype=dtype, device=device))
        else:
            self.embedding = nn.Parameter(torch.zeros(spec.length, width, dtype=dtype, device=device))
            self.mlp = None

    @torch.no_grad()
    def init(self, seed: int, std: float = 0.02) -> "PrefixEncoder":
        """A free table: N(0, std), keys and values near zero. Reparameterised (P-tuning v2): the
        embedding N(0, 1), the MLP's matrices uniform within 1/sqrt(fan-in) (torch's Linear
        default), biases zero. Seeded per tensor."""
        for name, p in self.named_parameters():
            g = _seeded(seed, "prefix." + name)
            if name == "embedding":
                t = torch.randn(p.shape, generator=g) * (1.0 if self.mlp is not None else std)
            elif p.ndim > 1:
                t = (torch.rand(p.shape, generator=g) * 2 - 1) / math.sqrt(p.shape[1])
            else:
                t = torch.zeros(p.shape)
            p.copy_(t.to(p.dtype))
        return self

    def key_values(self) -> torch.Tensor:
        kv = self.mlp(self.embedding) if self.mlp is not None else self.embedding
        kv = kv.view(self.length, self.layers, 2, self.heads, self.head_dim)
        kv = kv.chunk(tp.tp_size(), dim=3)[tp.tp_rank()]
        return kv.permute(1, 2, 3, 0, 4)  # [L, 2, n_local, p, d]


def prefix_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """[b, 1, s, t] -> [b, 1, s, p + t]: the prefix columns are visible to every row that may see
    any key; a row that sees nothing (padding) still sees nothing."""
    blocked = mask.all(dim=-1, keepdim=True)
    return torch.cat([blocked.expand(*mask.shape[:-1], length), mask], dim=-1)


_GLM_FORWARD = inspect.signature(GLM.forward)


def _prefix_hook(glm: GLM, args, kwargs):
    """Forward pre-hook: the prefix in front of the KV cache, the mask widened to match."""
    enc = glm.prefix_encoder
    bound = _GLM_FORWARD.bind(glm, *args, **kwargs)
    a = bound.arguments
    tokens, mask, cache = a["tokens"], a["attention_mask"], a.get("kv_cache")
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if cache is None:
        cache = KVCache(glm.config.num_layers)
    if not getattr(cache, "prefix_length", 0):  # a fresh cache: training, scoring, or a decode's first call
        if cache.length:
            raise ValueError("P-tuning needs an empty KV cache to put the prefix in")
        dev = tokens.device.type
        dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                 else glm.transformer.final_layernorm.weight.dtype)
        kv = enc.key_values().to(dtype)
        b = tokens.shape[0]
        for i in range(glm.config.num_layers):
            cache.append(i, kv[i, 0].unsqueeze(0).expand(b, *kv.shape[2:]),
                         kv[i, 1].unsqueeze(0).expand(b, *kv.shape[2:]))
        cache.prefix_length = enc.length
    a["kv_cache"] = cache
    if isinstance(mask, torch.Tensor):  # (a decode mask object built for this cache covers the prefix)
        a["attention_mask"] = prefix_mask(mask, enc.length)
    return bound.args[1:], bound.kwargs


def add_prefix(glm: GLM, spec: PrefixSpec, seed: int, dtype=torch.float32) -> PrefixEncoder:
    """Attach a P-tuning v2 prefix: ``glm.prefix_encoder`` (a submodule, so its parameters are the
    model's) and the forward pre-hook that feeds it to every layer."""
    device = glm.transformer.final_layernorm.weight.device
    glm.prefix_encoder = PrefixEncoder(glm.config, spec, dtype=dtype, device=device).init(seed)
    glm.register_forward_pre_hook(_prefix_hook, with_kwargs=True)
    return glm.prefix_encoder


# ---- attaching, freezing, counting --------------------------------------------------------------
def attach(glm: GLM, spec: AdapterSpec) -> None:
    """Attach the adapter ``spec`` describes (untrained) to ``glm``; ``glm.adapter_spec`` records it."""
    dtype = ADAPTER_DTYPES[spec.dtype]
    glm.adapter_spec = spec
    if spec.token_ids:
        emb = _adapt_embedding(glm)
        emb.token_rows = TokenRows(spec.token_ids, emb._parameters["weight"].shape[1], dtype,
                                   emb._parameters["weight"].device)
    if spec.method == "lora":
        add_lora(glm, spec.lora, spec.seed, dtype)
    elif spec.method == "ptuning":
        for _, layer in linear_layers(glm):
            if layer.quant is not None:
                _adapt(layer, None)
        add_prefix(glm, spec.prefix, spec.seed, dtype)
    else:
        raise ValueError(f"unknown adapter method {spec.method!r}")


def is_adapter_param(name: str) -> bool:
    """A parameter the adapter adds (LoRA A/B, the prefix encoder): not part of the base."""
    return ".lora." in name or ".token_rows." in name or name.startswith("prefix_encoder.")


def is_norm_param(name: str) -> bool:
    return "layernorm." in name


def trains(glm: GLM, name: str) -> bool:
    """Whether the adapter attached to ``glm`` trains (and saves) parameter ``name``."""
    spec = getattr(glm, "adapter_spec", None)
    return is_adapter_param(name) or (spec is not None and spec.norms and is_norm_param(name))


def freeze_base(glm: GLM) -> None:
    """Every parameter but the adapter's (and, with ``norms``, the LayerNorms) stops receiving gradients."""
    for name, p in glm.named_parameters():
        p.requires_grad_(trains(glm, name))


def adapter_state(glm: GLM) -> dict[str, torch.Tensor]:
    """The tensors an adapter directory stores: the adapter's, plus the LayerNorms with ``norms``."""
    return {n: p for n, p in glm.named_parameters() if trains(glm, n)}


# ---- the adapter directory ----------------------------------------------------------------------
def write_adapter_files(glm: GLM, spec: AdapterSpec, base: str | Path, directory: Path) -> None:
    """adapter_config.json and adapter.safetensors into ``directory`` (TP = 1 shapes)."""
    if tp.tp_size() > 1:
        raise InputError("adapters are trained at tensor-parallel size 1 (use data parallelism)")
    base = Path(base)
    cfg = {"format": FORMAT, "version": 1, **spec.to_dict(),
           "base": {"path": str(base), "manifest_sha256": manifest_hash(base),
                    "model": glm.config.replace(tensor_parallel_size=1).to_dict()}}
    atomic_write_json(directory / ADAPTER_CONFIG, cfg)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state(glm).items()},
              str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def save_adapter(glm: GLM, spec: AdapterSpec, base: str | Path, out: str | Path, **writer) -> Path:
    """A complete adapter directory at ``out`` (manifest last)."""
    writer = {"stage": "adapter", "config": {"adapter": spec.to_dict(), "base_manifest_sha256": manifest_hash(base)},
              "inputs": [base], **writer}
    with ArtifactWriter(out, **writer) as w:
        write_adapter_files(glm, spec, base, w.path)
    return Path(out)


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter directory, or a finetune run folder (its final/)."""
    p = Path(path)
    if not (p / ADAPTER_CONFIG).is_file() and (p / "final" / ADAPTER_CONFIG).is_file():
        p = p / "final"
    if not (p / ADAPTER_CONFIG).is_file():
        raise InputError(f"{path}: not an adapter directory (no {ADAPTER_CONFIG})")
    return p


def read_adapter_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path / ADAPTER_CONFIG}: unreadable ({e})") from None
    if cfg.get("format") != FORMAT:
        raise InputError(f"{path / ADAPTER_CONFIG}: not a glmctl adapter (format {cfg.get('format')!r})")
    return cfg


def check_base(adapter: Path, cfg: dict, base: str | Path) -> None:
    """The adapter was trained on ``base`` (the same manifest), else one line, exit 3."""
    want, have = cfg.get("base", {}).get("manifest_sha256"), manifest_hash(base)
    if want != have:
        raise InputError(f"{adapter}: trained on {cfg.get('base', {}).get('path')} (manifest sha256 "
                         f"{str(want)[:12]}), not on {base} ({str(have)[:12]}): wrong base checkpoint")


def _shard(name: str, t: torch.Tensor) -> torch.Tensor:
    """A stored (TP = 1) adapter tensor -> this rank's part (B of column layers: rows; A of row
    layers: columns; everything else whole)."""
    if tp.tp_size() == 1:
        return t
    if name.endswith("lora.B") and any(f".{k}.lora" in name for k in ("query_key_value", "dense_h_to_4h")):
        return t.chunk(tp.tp_size(), dim=0)[tp.tp_rank()]
    if name.endswith("lora.A") and any(f".{k}.lora" in name for k in ("attention.dense", "dense_4h_to_h",
                                                                       "word_embeddings")):
        return t.chunk(tp.tp_size(), dim=1)[tp.tp_rank()]
    return t


def load_adapter_weights(glm: GLM, adapter: Path) -> None:
    """Copy adapter.safetensors into the attached adapters; names and shapes must match."""
    f = adapter / ADAPTER_WEIGHTS
    if not f.is_file():
        raise InputError(f"{f}: missing adapter weights")
    want = adapter_state(glm)
    try:
        with safe_open(str(f), framework="pt") as h:
            stored = {k: h.get_tensor(k) for k in h.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{f}: damaged safetensors file ({str(e).splitlines()[0]})") from None
    if set(stored) != set(want):
        diff = sorted(set(stored) ^ set(want))[0]
        raise InputError(f"{f}: tensor {diff} does not match this base model (wrong base checkpoint)")
    with torch.no_grad():
        for k, p in want.items():
            t = _shard(k, stored[k])
            if tuple(t.shape) != tuple(p.shape):
                raise InputError(f"{f}: tensor {k} has shape {tuple(t.shape)}, the base model needs "
                                 f"{tuple(p.shape)} (wrong base checkpoint)")
            p.copy_(t.to(p.dtype))


def load_adapter(glm: GLM, adapter: str | Path, base: str | Path) -> AdapterSpec:
    """Attach the adapter at ``adapter`` (a directory or a finetune run) to ``glm``, the model of
    the checkpoint ``base``; InputError (exit 3) when it was trained on another base."""
    path = resolve_adapter_dir(adapter)
    cfg = read_adapter_config(path)
    check_base(path, cfg, base)
    try:
        spec = AdapterSpec.from_dict(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path / ADAPTER_CONFIG}: malformed ({e})") from None
    attach(glm, spec)
    load_adapter_weights(glm, path)
    return spec


# ---- merging -------------------------------------------------------------------------------------
def merged_state_dict(glm: GLM, quantized: bool, dtype=None) -> tuple[dict, dict | None]:
    """The model's weights with every LoRA delta folded in, and the quantization block they have.

    fp base: W + s B A in W's dtype. Quantized base: dequantize(W) + s B A, then re-quantized with
    the base's bits and group size (round to nearest, ``quantized=True``) or kept in full precision
    (every tensor in ``dtype``, default that of the LayerNorms), which drops the quantization block.
    ``dtype`` given: every floating tensor but the quantization scales in it. Trained LayerNorms
    (``norms``) are the model's own parameters, so they are in the result as they are."""
    if getattr(glm, "prefix_encoder", None) is not None:
        raise InputError("a P-tuning prefix cannot be folded into the weights (use the adapter with --adapter)")
    q = glm.config.quantization
    sd = {k: v.detach() for k, v in glm.state_dict().items() if not is_adapter_param(k)
          and not k.startswith("prefix_encoder.")}
    emb = glm.transformer.word_embeddings
    if isinstance(emb, LoRAVocabEmbedding):  # E + s (B A)^T + the token rows (LoRAVocabEmbedding.weight)
        sd[EMBEDDING_KEY] = emb.weight.detach()
    for name, layer in linear_layers(glm):
        lora = getattr(layer, "lora", None)
        delta = lora.delta() if lora is not None else None
        if layer.quant is None:
            if delta is not None:
                w = sd[f"{name}.weight"]
                sd[f"{name}.weight"] = (w.float() + delta).to(w.dtype)
            continue
        scale = sd[f"{name}.weight_scale"]
        w = kernels.dequantize(sd[f"{name}.weight"], scale, q["bits"], torch.float32)
        if delta is not None:
            w = w + delta
        if quantized:
            if delta is not None:
                sd[f"{name}.weight"], sd[f"{name}.weight_scale"] = kernels.quantize_rtn(
                    w, q["bits"], q.get("group_size"), scale_dtype=scale.dtype)
        else:
            sd[f"{name}.weight"] = w
            del sd[f"{name}.weight_scale"]
    if q and not quantized:
        emb = q.get("embedding")
        if emb and f"{EMBEDDING_KEY}_scale" in sd:  # a quantized tied embedding: dequantized too
            sd[EMBEDDING_KEY] = kernels.dequantize(sd[EMBEDDING_KEY], sd.pop(f"{EMBEDDING_KEY}_scale"),
                                                   int(emb["bits"]), torch.float32)
        target = dtype or glm.transformer.final_layernorm.weight.dtype
        return {k: v.to(target) for k, v in sd.items()}, None
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("weight_scale") else v
              for k, v in sd.items()}
    return sd, q


MERGE_PRECISIONS = ("full", "quantized")


def merged_model(glm: GLM, precision: str = "full", dtype=None, where: str = "merged model") -> GLM:
    """A new GLM (TP = 1) with the LoRA update of ``glm`` folded in: what `finetune --merge` and
    `convert --merge-adapter` write. ``precision`` matters for a quantized base only: "full" keeps
    the merged weights in full precision, "quantized" re-quantizes them (merged_state_dict)."""
    cfg = merged_config(glm, precision)
    sd, _ = merged_state_dict(glm, quantized=precision == "quantized", dtype=dtype)
    return model_from_state_dict(cfg, sd, where=where)


def merged_config(glm: GLM, precision: str = "full"):
    """The model config of ``merged_model(glm, precision)``, without merging."""
    if precision not in MERGE_PRECISIONS:
        raise ValueError(f"merge precision must be full or quantized, got {precision!r}")
    q = glm.config.quantization if precision == "quantized" else None
    return glm.config.replace(quantization=q, tensor_parallel_size=1)
