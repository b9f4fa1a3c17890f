"""The GLM-130B network (docs/glm130b.md §2), one implementation for every size.

    h0 = E[tokens]                                  (no scaling, no position table)
    for each layer:  a = LN_in(x);  h = alpha*a + Attn(a)
                     m = LN_post(h); x = alpha*m + GeGLU(m)        alpha = sqrt(2 N)  (DeepNorm)
    logits = LN_final(x) E^T                        (output tied to the word embedding)

Shapes below: b batch, s new tokens, t total (cached + new) tokens, n local heads, d head dim.
Masks are bool [b, 1, s, t] with True = may not attend (GLM-130B's convention).
State-dict keys are exactly SAT's: ``transformer.layers.N.attention.query_key_value.weight`` ...
"""
from __future__ import annotations

import math
import time
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from glmctl import kernels
from glmctl.config import ModelConfig
from glmctl.model import parallel as tp
from glmctl.tp_layout import shard_tensor


# ---- RoPE (docs/glm130b.md §2.3): 1-D, half rotation (dim j pairs with j + d/2), over the full head dim ----
def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype, mode: str = "exact"):
    """cos/sin tables [b, s, 1, d] for the given position ids.

    ``mode="exact"``: frequencies and angles in fp32 (float64 for a float64 model), cos/sin then
    rounded to ``dtype``. ``mode="sat"``: SAT 0.2.x's RotaryEmbedding as GLM-130B runs it: the
    frequencies are rounded to fp16 when the buffer is built, the buffer follows the model's dtype
    (``.half()`` / ``.float()``), and positions, angle products and cos/sin are computed in that
    dtype, so an fp32 model gets fp32 angles of fp16 frequencies and an fp16 model fp16 products.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    if mode == "sat":
        adt = dtype
        inv_freq = inv_freq.half()
    elif mode == "exact":
        adt = torch.float64 if dtype == torch.float64 else torch.float32  # float64 only for reference checks
        if adt == torch.float64:
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                                    dtype=adt) / head_dim))
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    angles = position_ids.to(adt)[..., None] * inv_freq.to(adt)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [b, s, 1, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, n, d]: x' = x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Post-RoPE keys and values of every layer, [b, n, t, d] each, grown as tokens arrive."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Select / repeat batch rows (beam search)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]


class StaticKVCache:
    """The decode cache: per layer a preallocated [b, n, capacity, d] buffer for keys and one for
    values, written in place (no ``torch.cat`` per step). Columns [start, fill) hold the cached
    tokens, the same for every row (rows are right-aligned; shorter ones are left-padded with
    blocked keys). ``append`` has KVCache's contract and returns views of the filled columns;
    a write past the capacity reallocates (doubling), so a wrong estimate costs time, not results.
    Padding columns hold zeros, never uninitialised memory: a masked key's weight is exactly 0,
    and 0 * NaN would not be."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], start: int, fill: int,
                 prefix_length: int = 0):
        self.k, self.v = keys, values
        self.start = start
        self.fill = [fill] * len(keys)
        self.prefix_length = prefix_length  # P-tuning prefix columns at the front (glmctl.adapters)

    @classmethod
    def allocate(cls, num_layers: int, batch: int, heads: int, capacity: int, head_dim: int, dtype, device,
                 start: int = 0, zeros: bool = True) -> "StaticKVCache":
        """``zeros=False`` leaves the buffers uninitialised: the caller writes or zeroes every column
        below ``start``, and a column at or above it is read only after a step wrote it."""
        new = torch.zeros if zeros else torch.empty
        z = dict(dtype=dtype, device=device)
        return cls([new(batch, heads, capacity, head_dim, **z) for _ in range(num_layers)],
                   [new(batch, heads, capacity, head_dim, **z) for _ in range(num_layers)], start, start)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def length(self) -> int:
        return self.fill[0] - self.start

    @property
    def keys(self) -> list[torch.Tensor]:
        return [k[:, :, self.start:f] for k, f in zip(self.k, self.fill)]

    @property
    def values(self) -> list[torch.Tensor]:
        return [v[:, :, self.start:f] for v, f in zip(self.v, self.fill)]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        p, s = self.fill[layer], k.shape[2]
        if p + s > self.k[layer].shape[2]:
            self._grow(layer, p + s)
        self.k[layer][:, :, p:p + s].copy_(k)
        self.v[layer][:, :, p:p + s].copy_(v)
        self.fill[layer] = p + s
        return self.k[layer][:, :, self.start:p + s], self.v[layer][:, :, self.start:p + s]

    def _grow(self, layer: int, need: int) -> None:
        cap = max(need, 2 * self.k[layer].shape[2])
        for store in (self.k, self.v):
            old = store[layer]
            new = old.new_zeros(*old.shape[:2], cap, old.shape[3])
            new[:, :, :old.shape[2]] = old
            store[layer] = new

    def reorder(self, index: torch.Tensor) -> None:
        """Select / repeat batch rows (beam search, rows leaving a batch). With as many rows as
        before (beam search after its first step) only the filled columns move, in place."""
        if index.numel() == self.k[0].shape[0]:
            for store in (self.k, self.v):
                for layer, buf in enumerate(store):
                    a, b = self.start, self.fill[layer]
                    buf[:, :, a:b] = buf[:, :, a:b].index_select(0, index)
            return
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


def math_attention(q, k, v, mask, c: float, dropout=None):
    """The explicit attention (GLM-130B's): q [b, n, s, d], k/v [b, n, t, d], bool mask [b, 1, s, t].
    query_key_layer_scaling: divide by sqrt(d)*c in the model dtype, multiply c back in fp32."""
    d = q.shape[-1]
    scores = torch.matmul(q / (math.sqrt(d) * c), k.transpose(-1, -2))  # [b, n, s, t]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * c  # fp32 softmax
    scores = scores.masked_fill(mask, -10000.0)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return torch.matmul(probs, v)


class AttentionMask:
    """A forward's mask, prepared once for every layer (inference with a KV cache).

    ``impl`` "math" and "fused" (``kernels.decode_attention``): the bool mask as is (True =
    blocked). ``impl`` "sdpa": an additive bias
    (-10000 on blocked keys, as SelfAttention._sdpa) and, when some row sees no key at all
    (left padding in a prefill), those rows' queries zeroed (their uniform average, as the
    explicit path gives them)."""

    def __init__(self, blocked: torch.Tensor, impl: str, dtype: torch.dtype):
        self.blocked, self.impl = blocked, impl
        self.bias = self.empty_rows = None
        if impl == "sdpa":
            full = blocked.all(dim=-1, keepdim=True)
            if blocked.device.type != "cpu" or bool(full.any()):  # no host sync on a GPU
                self.empty_rows = full
                blocked = blocked & ~full
            self.bias = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, -10000.0)


def _bucket(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


class AttentionPicker:
    """Chooses the attention kernel for each step shape by timing the candidates, once per
    (device, dtype, batch, heads, new tokens, cached length) bucket (powers of two) on random
    tensors of that shape: "math" (``math_attention``), "sdpa" (F.scaled_dot_product_attention)
    and, for one new token per row in fp32 on the CPU, "fused" (``kernels.decode_attention``).
    Used by ``GLM.forward`` in inference with a KV cache."""

    IMPLS = ("math", "sdpa", "fused")

    @staticmethod
    def candidates(s: int, dtype, device) -> tuple[str, ...]:
        fused = s == 1 and dtype == torch.float32 and torch.device(device).type == "cpu" \
            and kernels.decode_attention_available()
        return AttentionPicker.IMPLS if fused else AttentionPicker.IMPLS[:2]

    def __init__(self, repeats: int = 5):
        self.repeats = repeats
        self.choice: dict[tuple, str] = {}

    def pick(self, b: int, n: int, s: int, t: int, d: int, dtype, device) -> str:
        key = (str(device), dtype, _bucket(b), n, _bucket(s), _bucket(t), d)
        impl = self.choice.get(key)
        if impl is None:
            impl = self.choice[key] = self.measure(*key[2:], dtype=dtype, device=device)
        return impl

    @torch.inference_mode()
    def measure(self, b, n, s, t, d, dtype, device) -> str:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, n, s, d, generator=g, device=device).to(dtype)
        k = torch.randn(b, n, t, d, generator=g, device=device).to(dtype)
        v = torch.randn(b, n, t, d, generator=g, device=device).to(dtype)
        blocked = torch.zeros(b, 1, s, t, dtype=torch.bool, device=device)
        blocked[..., 0] = True  # a padding column, as in a batch
        impls = self.candidates(s, dtype, device)
        masks = {impl: AttentionMask(blocked, impl, dtype) for impl in impls}
        run = {"math": lambda: math_attention(q, k, v, masks["math"].blocked, 1.0),
               "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=masks["sdpa"].bias),
               "fused": lambda: kernels.decode_attention(q, k, v, masks["fused"].blocked)}
        sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
        best = {impl: float("inf") for impl in impls}
        for impl in impls:
            run[impl]()  # warm-up
        for _ in range(self.repeats):  # alternating, best of
            for impl in impls:
                sync()
                t0 = time.perf_counter()
                run[impl]()
                sync()
                best[impl] = min(best[impl], time.perf_counter() - t0)
        return min(impls, key=lambda i: best[i])


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, device=None, dtype=None):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.heads_local = cfg.num_attention_heads // tp.tp_size()
        if cfg.num_attention_heads % tp.tp_size():
            raise ValueError(f"{cfg.num_attention_heads} heads do not split over TP={tp.tp_size()}")
        self.cfg = cfg
        q = linear_quantization(cfg)
        self.query_key_value = tp.ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, quant=q,
                                                       device=device, dtype=dtype)
        self.dense = tp.RowParallelLinear(cfg.hidden_size, cfg.hidden_size, quant=q, device=device, dtype=dtype)
        self.attention_dropout = nn.Dropout(cfg.attention_dropout)
        self.fast = False  # GLM.use_fast_attention(): the fused-kernel twin of the math below

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        b, s, _ = x.shape
        n, d = self.heads_local, self.head_dim
        # Head-major fused layout: per head [q(d) | k(d) | v(d)] (docs/glm130b.md §2.3). Bias before RoPE.
        qkv = self.query_key_value(x).view(b, s, n, 3 * d)
        q, k, v = qkv.split(d, dim=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, n, s, d]
        if cache is not None:
            k, v = cache.append(self.layer_id, k, v)  # [b, n, t, d]
        if isinstance(mask, AttentionMask):  # inference with a cache: mask and kernel chosen once per forward
            if mask.impl == "sdpa":
                ctx = F.scaled_dot_product_attention(q if mask.empty_rows is None else q.masked_fill(mask.empty_rows, 0.0),
                                                     k, v, attn_mask=mask.bias)
                return self.dense(ctx.transpose(1, 2).reshape(b, s, n * d))
            if mask.impl == "fused" and s == 1:
                return self.dense(kernels.decode_attention(q, k, v, mask.blocked).transpose(1, 2).reshape(b, s, n * d))
            mask = mask.blocked
        elif self.fast:
            return self.dense(self._sdpa(q, k, v, mask).transpose(1, 2).reshape(b, s, n * d))
        ctx = math_attention(q, k, v, mask, float(self.layer_id + 1), self.attention_dropout)
        return self.dense(ctx.transpose(1, 2).reshape(b, s, n * d))  # head-major context

    def _sdpa(self, q, k, v, mask):
        """The same attention through F.scaled_dot_product_attention (fused CPU/GPU kernels).

        Blocked keys get an additive -10000: their weight underflows to exactly 0, as with the
        masked_fill above. A row whose keys are all blocked (padding) gets q = 0 and no bias: the
        uniform average the explicit path gives it, with the same gradients. query_key_layer_
        scaling is left out: it is the identity in exact arithmetic and the kernels accumulate
        in fp32. Equal to the explicit path within float tolerance (tests/test_pretrain.py)."""
        full = mask.all(dim=-1, keepdim=True)
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask & ~full, -10000.0)
        p = self.attention_dropout.p if self.training else 0.0
        return F.scaled_dot_product_attention(q.masked_fill(full, 0.0), k, v, attn_mask=bias, dropout_p=p)


class GeGLU(nn.Module):
    """dense_h_to_4h -> [x1 | x2] halves -> x1 * GELU_erf(x2) -> dense_4h_to_h (docs/glm130b.md §2.4)."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        q = linear_quantization(cfg)
        self.dense_h_to_4h = tp.ColumnParallelLinear(cfg.hidden_size, 2 * cfg.inner_hidden_size, quant=q,
                                                     device=device, dtype=dtype)
        self.dense_4h_to_h = tp.RowParallelLinear(cfg.inner_hidden_size, cfg.hidden_size, quant=q,
                                                  device=device, dtype=dtype)

    def forward(self, x):
        x1, x2 = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(x1 * F.gelu(x2))


class GLMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, device=None, dtype=None):
        super().__init__()
        self.alpha = cfg.deepnorm_alpha
        ln = dict(eps=cfg.layernorm_epsilon, device=device, dtype=dtype)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, **ln)
        self.attention = SelfAttention(cfg, layer_id, device, dtype)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, **ln)
        self.mlp = GeGLU(cfg, device, dtype)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, cos, sin, mask, cache):
        a = self.input_layernorm(x)
        h = self.alpha * a + self.hidden_dropout(self.attention(a, cos, sin, mask, cache))
        m = self.post_attention_layernorm(h)
        return self.alpha * m + self.hidden_dropout(self.mlp(m))


def linear_quantization(cfg: ModelConfig) -> dict | None:
    """The quantization of the transformer's linears: ``cfg.quantization`` when it has ``bits``
    (a quantization block that only quantizes the embedding leaves them in floating point)."""
    q = cfg.quantization
    return q if q and q.get("bits") else None


class QuantizedVocabEmbedding(nn.Module):
    """The tied word embedding / output layer stored quantized (opt-in; GLM-130B keeps it in full
    precision, docs/glm130b.md §7.1): ``weight`` int8 [V, h] (INT8) or [V, h/2] (INT4, the
    kernels' packed format) and ``weight_scale`` [V] or [V, h/G]. The lookup dequantizes the
    selected rows (fp32); the output layer runs the quantized kernel (``GLM.logits``).
    ``spec``: {"bits": 4 | 8, "group_size": G | None}, the ``embedding`` entry of the config's
    quantization block. Vocabulary-parallel like VocabParallelEmbedding."""

    def __init__(self, vocab_size: int, hidden_size: int, spec: dict, device=None, dtype=None):
        super().__init__()
        self.bits, self.group_size = int(spec["bits"]), spec.get("group_size")
        if self.bits not in (4, 8):
            raise ValueError(f"embedding quantization: bits must be 4 or 8, got {self.bits}")
        self.vocab_local = vocab_size // tp.tp_size()
        self.start = tp.tp_rank() * self.vocab_local
        cols = hidden_size // 2 if self.bits == 4 else hidden_size
        self.register_buffer("weight", torch.zeros(self.vocab_local, cols, dtype=torch.int8, device=device))
        shape = (self.vocab_local, hidden_size // self.group_size) if self.group_size else (self.vocab_local,)
        self.register_buffer("weight_scale", torch.ones(shape, dtype=dtype or torch.float16, device=device))

    def forward(self, ids):
        local = ids - self.start
        outside = (local < 0) | (local >= self.vocab_local)
        local = local.masked_fill(outside, 0)
        q = self.weight[local]
        q = kernels.unpack_int4(q) if self.bits == 4 else q
        s = self.weight_scale[local].float()
        s = s[..., None] if s.dim() == local.dim() else s.repeat_interleave(q.shape[-1] // s.shape[-1], dim=-1)
        out = (q.float() * s).masked_fill(outside.unsqueeze(-1), 0.0)
        return tp.reduce_from_tp(out)

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        return kernels.quant_linear(hidden, self.weight, self.weight_scale, bits=self.bits)


EMBEDDING_KEY = "transformer.word_embeddings.weight"


def quantize_embedding_rows(w: torch.Tensor, bits: int, group_size: int | None = None,
                            scale_dtype: torch.dtype = torch.float16):
    """(qweight int8, scale) of embedding rows ``w`` [V, h] by GLM-130B's RTN absmax, the rule the
    quantize stage applies to the linears (``kernels.quantize_rtn``): the weight taken in fp16 when
    the scales are fp16, one scale per row or per row and group of ``group_size`` columns. Rows
    are quantized independently, so any vocabulary slice (a TP rank's) quantizes to the slice of
    the whole."""
    if not w.is_floating_point():
        raise ValueError(f"{EMBEDDING_KEY} is already quantized")
    w = w.to(torch.float16 if scale_dtype == torch.float16 else torch.float32)
    return kernels.quantize_rtn(w, bits, group_size, scale_dtype=scale_dtype)


def quantize_tied_embedding(state_dict: dict, bits: int, group_size: int | None = None) -> dict:
    """The state dict with its tied embedding/output matrix quantized (``quantize_embedding_rows``;
    INT8, or INT4 with optional groups as llama.cpp stores its output layer):
    ``transformer.word_embeddings.weight`` becomes int8 with a ``..._scale`` beside it.
    Pair it with ``quantization["embedding"] = {"bits": bits, "group_size": group_size}`` in the
    config. Other tensors are passed through (the same objects)."""
    out = dict(state_dict)
    out[EMBEDDING_KEY], out[EMBEDDING_KEY + "_scale"] = quantize_embedding_rows(out.pop(EMBEDDING_KEY), bits,
                                                                                 group_size)
    return out


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        eq = (cfg.quantization or {}).get("embedding")
        self.word_embeddings = (QuantizedVocabEmbedding(cfg.vocab_size, cfg.hidden_size, eq, device, dtype) if eq
                                else tp.VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, device, dtype))
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(GLMBlock(cfg, i, device, dtype) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, device=device, dtype=dtype)


class GLM(nn.Module):
    """``GLM(config)``; ``model(tokens, position_ids, attention_mask)`` -> logits [b, s, vocab].

    tokens, position_ids: int64 [b, s]; attention_mask: bool [b, 1, s, t], True = blocked.
    With ``kv_cache`` the new tokens attend to the cached ones too (t = cached + s) and their
    keys/values are appended. ``parallel_output=True`` returns this rank's vocab slice (TP).
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, device, dtype)
        # Embedding gradient shrink (docs/glm130b.md §5.3): forward unchanged, gradient into E scaled by this.
        self.embedding_grad_shrink = 1.0
        # Gradient checkpointing of each layer (pretraining large models).
        self.activation_checkpointing = False
        # Inference with a KV cache (decoding): the attention kernel, "auto" = the fastest of the
        # explicit math, F.scaled_dot_product_attention and (one new token per row, CPU fp32)
        # kernels.decode_attention, measured per step shape; "math"/"sdpa"/"fused" force one
        # ("fused" applies to single-token steps, a prefill then runs the math).
        self.decode_attention = "auto"
        self.attention_picker = AttentionPicker()
        # The per-token decode step through torch.compile (``compile_decode``); kept in __dict__
        # (not a submodule: the compiled wrapper holds this module).
        self.__dict__["_compiled_step"] = None

    def compile_decode(self, enabled: bool = True) -> "GLM":
        """Run ``decode_step`` (one new token per row with a KV cache: DecodeBatch.step) through
        ``torch.compile(dynamic=True)``, or eagerly again. The prefill stays eager. Same tokens as
        eager (tests/test_decode_speed.py); the first steps pay the compilation (tens of seconds
        on a CPU), so it pays for long-lived processes and long generations (bench/RESULTS.md).
        The compiled call goes through the module (forward hooks included: P-tuning's prefix)."""
        self.__dict__["_compiled_step"] = torch.compile(self, dynamic=True) if enabled else None
        return self

    def decode_step(self, tokens, position_ids, attention_mask, kv_cache, **kw):
        """One decoding step: ``self(...)``, compiled when ``compile_decode`` asked for it."""
        step = self.__dict__["_compiled_step"]
        if step is None:
            return self(tokens, position_ids, attention_mask, kv_cache=kv_cache, **kw)
        # The mask and its kernel are prepared here, eagerly: the picker's shape buckets are
        # Python ints of the cached length, and tracing them would recompile at every step.
        return step(tokens, position_ids, self.attention_mask(attention_mask, tokens.shape, kv_cache), kv_cache=kv_cache,
                    **kw)

    def attention_mask(self, blocked: torch.Tensor, shape, kv_cache) -> "AttentionMask | torch.Tensor":
        """An inference forward's mask with a KV cache, prepared once for every layer: the bool
        mask [b, (1,) s, t] and the attention kernel for this step's shape (``_decode_attention``)."""
        if isinstance(blocked, AttentionMask) or kv_cache is None or torch.is_grad_enabled() or not self.transformer.layers:
            return blocked
        if blocked.dim() == 3:
            blocked = blocked.unsqueeze(1)
        dtype = self.transformer.final_layernorm.weight.dtype
        return AttentionMask(blocked, self._decode_attention(shape[0], shape[1], kv_cache.length, dtype, blocked.device),
                             dtype)

    def use_fast_attention(self, enabled: bool = True) -> "GLM":
        """Switch every layer to F.scaled_dot_product_attention (SelfAttention._sdpa) or back."""
        for layer in self.transformer.layers:
            layer.attention.fast = enabled
        return self

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """cos/sin tables of ``position_ids`` in this model's rope mode (``rope_cos_sin``)."""
        cfg = self.config
        return rope_cos_sin(position_ids, cfg.head_dim, cfg.rotary_base, dtype, cfg.rope)

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.num_layers)

    def new_static_kv_cache(self, batch: int, capacity: int, start: int = 0, zeros: bool = True) -> StaticKVCache:
        """A preallocated decode cache for ``batch`` rows and ``capacity`` columns, filled from ``start``
        (``StaticKVCache.allocate``)."""
        ln = self.transformer.final_layernorm.weight
        return StaticKVCache.allocate(self.config.num_layers, batch, self.transformer.layers[0].attention.heads_local
                                      if len(self.transformer.layers) else 0, capacity, self.config.head_dim,
                                      ln.dtype, ln.device, start, zeros)

    def forward(self, tokens, position_ids, attention_mask, kv_cache: KVCache | None = None,
                parallel_output: bool = False, return_hidden: bool = False):
        h = self.embed(tokens)
        a = self.embedding_grad_shrink
        if a != 1.0 and h.requires_grad:
            h = h * a + h.detach() * (1.0 - a)
        h = self.transformer.embedding_dropout(h)
        cos, sin = self.rope(position_ids, h.dtype)
        attention_mask = self.attention_mask(attention_mask, tokens.shape, kv_cache)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 3:
            attention_mask = attention_mask.unsqueeze(1)
        for layer in self.transformer.layers:
            if self.activation_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attention_mask, kv_cache,
                                                      use_reentrant=False)
            else:
                h = layer(h, cos, sin, attention_mask, kv_cache)
        h = self.transformer.final_layernorm(h)
        if return_hidden:
            return h
        return self.logits(h, parallel_output)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings of ``tokens`` in the model's dtype (a quantized embedding dequantizes
        its rows in fp32)."""
        h = self.transformer.word_embeddings(tokens)
        if isinstance(self.transformer.word_embeddings, QuantizedVocabEmbedding):
            h = h.to(self.transformer.final_layernorm.weight.dtype)
        return h

    def _decode_attention(self, b: int, s: int, cached: int, dtype, device) -> str:
        """The attention kernel of this inference forward: ``decode_attention``, or when "auto"
        the one ``attention_picker`` measured faster for this shape; a model switched to fast
        attention (``use_fast_attention``) keeps SDPA."""
        att = self.transformer.layers[0].attention
        if att.fast:
            return "sdpa"
        if self.decode_attention != "auto":
            return self.decode_attention
        return self.attention_picker.pick(b, att.heads_local, s, cached + s, att.head_dim, dtype, device)

    def logits(self, hidden: torch.Tensor, parallel_output: bool = False, gemv: bool = True) -> torch.Tensor:
        """The output layer, tied to the word embedding (docs/glm130b.md §2.5): hidden [..., h] ->
        logits [..., vocab] (this rank's vocabulary slice with ``parallel_output``). A quantized
        embedding runs the quantized kernel; in inference a float one the small-m GEMV kernel,
        or with ``gemv=False`` F.linear whatever the number of rows (the kernel rounds
        differently from MKL, and evaluation's scores must not depend on how many rows are
        scored together)."""
        emb = self.transformer.word_embeddings
        x = tp.copy_to_tp(hidden)
        if isinstance(emb, QuantizedVocabEmbedding):
            logits = emb.output(x)
        else:
            logits = kernels.dense_linear(x, emb.weight) if gemv else F.linear(x, emb.weight)
        return logits if parallel_output else tp.gather_last_dim(logits)

    # ---- state dict: accept SAT's ignored rotary buffers ----------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- initialisation (docs/glm130b.md §2.7) ------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float | None = None, embedding_std: float | None = None):
        """DeepNorm init: Xavier-normal with gain (2N)^-1/2 on v, out, and the FFN matrices
        (per logical matrix), N(0, std) on q and k (std = sqrt(1/(3d)) by default, 0.0052 at
        d = 12288), N(0, embedding_std) on the embedding, zero biases, unit LayerNorms.

        The embedding's std is not documented (docs/glm130b.md §2.7). It defaults to 1/d, not to the q/k
        std: the output is tied to the embedding and the stack starts near the identity
        (DeepNorm's alpha), so at init each position's own token gets a logit of about
        d * embedding_std. With sqrt(1/(3d)) that is sqrt(d/3) (11 at d = 384), and a causal-LM
        run of the medium preset sat at the unigram loss for 150+ steps; with 1/d (a logit of 1)
        its held-out loss after 60 steps was 6.30 instead of 6.88 (docs/pretrain.md).

        Each tensor is drawn at its *global* shape from a generator seeded by ``seed`` and the
        tensor name, then sliced to this rank's shard, so TP=1 and TP=k give the same model.
        """
        cfg = self.config
        if cfg.quantization:
            raise ValueError("cannot initialise a quantized model")
        d, f = cfg.hidden_size, cfg.inner_hidden_size
        std = std if std is not None else math.sqrt(1.0 / (3 * d))
        embedding_std = embedding_std if embedding_std is not None else 1.0 / d
        gain = (2 * cfg.num_layers) ** -0.5
        xav = lambda fi, fo: gain * math.sqrt(2.0 / (fi + fo))  # noqa: E731
        base = 1234 if seed is None else seed
        for name, p in self.state_dict(keep_vars=True).items():
            gen = torch.Generator().manual_seed((base * 1000003 + _stable_hash(name)) % (2**63))
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
                continue
            if name.endswith(".bias"):
                p.zero_()
                continue
            if name.endswith("word_embeddings.weight"):
                full = torch.randn(cfg.vocab_size, d, generator=gen) * embedding_std
            elif name.endswith("query_key_value.weight"):
                # q, k ~ N(0, std); v Xavier(d, d) * gain. Rows are head-major [q|k|v] per head.
                full = torch.randn(cfg.num_attention_heads, 3, cfg.head_dim, d, generator=gen)
                full[:, :2] *= std
                full[:, 2] *= xav(d, d)
                full = full.reshape(3 * d, d)
            elif name.endswith("attention.dense.weight"):
                full = torch.randn(d, d, generator=gen) * xav(d, d)
            elif name.endswith("dense_h_to_4h.weight"):
                full = torch.randn(2 * f, d, generator=gen) * xav(d, f)
            elif name.endswith("dense_4h_to_h.weight"):
                full = torch.randn(d, f, generator=gen) * xav(f, d)
            else:
                raise AssertionError(f"no init rule for {name}")
            p.copy_(shard_tensor(name, full, tp.tp_size(), tp.tp_rank()).to(p.dtype))
        return self


def _stable_hash(s: str) -> int:
    return zlib.crc32(s.encode())
