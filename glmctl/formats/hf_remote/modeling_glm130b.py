"""GLM-130B for transformers (remote code, written by `glmctl convert --to hf`).

The network is glmctl's (glmctl/model/glm.py; docs/glm130b.md §2 in the glmctl repository),
reproduced here so that the export loads with plain transformers and ``trust_remote_code=True``:

    h0 = E[tokens]                          no scaling, no position table
    each layer:  a = LN_in(x);  h = alpha*a + Attn(a)
                 m = LN_post(h); x = alpha*m + GeGLU(m)            alpha = sqrt(2 N)  (DeepNorm)
    logits = LN_final(x) E^T                the output layer is the word embedding

Attention: fused QKV, head-major (per head [q | k | v]), bias before a 1-D RoPE with half
rotation over the whole head dim (``rope``: "exact" fp32 angles, or "sat" as SAT 0.2.x); scores
scaled by 1/(sqrt(d) * (layer + 1)) in the model dtype, multiplied back in fp32, blocked keys
set to -10000, softmax in fp32. GeGLU: x1 * gelu_erf(x2) for the two halves of dense_h_to_4h.

How a sequence is read when only ``input_ids`` (and a 2-D padding mask) are given
(GLM-130B's rules, docs/glm130b.md §4): the context is everything before the first <sop>.

* The context holds a mask token (the one in use: the first [MASK], else [sMASK], else
  [gMASK]): the context is bidirectional and has positions 0, 1, ...; from <sop> on the
  tokens are causal, their positions continue after [gMASK] and stay at the mask's index after
  [MASK]/[sMASK]. Without a <sop> the whole input is bidirectional context.
* The context holds no mask token: the text is read as GLM-130B reads text for language
  modelling, as if ``[gMASK] <sop>`` came first (only [gMASK] when the text starts with <sop>),
  causally, positions 0, 1, ... from the implied [gMASK]. The logits returned are aligned with
  the ids given: logits[i] predicts the token after input_ids[i].

Explicit ``position_ids`` and/or a 4-D ``attention_mask`` [b, 1, q, k] (bool or integer: nonzero
= may attend; float: additive, negative = blocked) are used as given and nothing is implied.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_glm130b import GLM130BConfig


# ---- RoPE: 1-D, half rotation (dim j pairs with j + d/2), over the full head dim -------------
def rope_cos_sin(position_ids, head_dim, base, dtype, mode="exact"):
    """cos/sin tables [b, s, 1, d] for the given position ids. ``mode="exact"``: frequencies and
    angles in fp32; ``mode="sat"``: SwissArmyTransformer 0.2.x, frequencies rounded to fp16 and
    angles computed in the model's dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    if mode == "sat":
        adt = dtype
        inv_freq = inv_freq.half()
    elif mode == "exact":
        adt = torch.float64 if dtype == torch.float64 else torch.float32
        if adt == torch.float64:
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                                    dtype=adt) / head_dim))
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    angles = position_ids.to(adt)[..., None] * inv_freq.to(adt)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---- how GLM-130B reads a sequence ----------------------------------------------------------
class Layout:
    """The internal sequence of a batch: ``offset`` implied columns ([gMASK] <sop>) first, then
    the columns given. ids, positions: int64 [b, offset + n]; prefix (bidirectional) and valid
    (not padding): bool [b, offset + n]; fixed: int64 [b], the position every later token of the
    row takes (-1: positions continue)."""

    def __init__(self, ids, positions, prefix, valid, fixed, offset):
        self.ids, self.positions, self.prefix, self.valid = ids, positions, prefix, valid
        self.fixed, self.offset = fixed, offset


def read_layout(config, input_ids, valid, prompt_length=None, imply=True) -> Layout:
    """GLM-130B's positions and bidirectional prefix for ``input_ids`` [b, n] (see the module
    docstring); ``valid`` [b, n] marks the tokens that are not padding. Only the first
    ``prompt_length`` columns decide how a row is read (generated tokens never change it).
    ``imply=False``: a row without a mask token is read causally with positions 0, 1, ..."""
    b, n = input_ids.shape
    p_len = n if prompt_length is None else min(prompt_length, n)
    masks = (config.mask_token_id, config.smask_token_id, config.gmask_token_id)
    sop, gmask = config.sop_token_id, config.gmask_token_id
    rows = []
    for toks_row, valid_row in zip(input_ids.tolist(), valid.tolist()):
        cols = [j for j in range(n) if valid_row[j]]
        toks = [toks_row[j] for j in cols]
        prompt = toks[:sum(1 for j in cols if j < p_len)]
        sop_at = prompt.index(sop) if sop in prompt else None
        context = prompt if sop_at is None else prompt[:sop_at]
        found = next(((m, context.index(m)) for m in masks if m in context), None)
        fixed = -1
        if found is None:
            implied = (1 if sop_at == 0 else 2) if imply else 0
            pos = list(range(implied, implied + len(toks)))
            prefix = [False] * len(toks)
        else:
            implied = 0
            pos = list(range(len(toks)))
            if sop_at is not None and found[0] != gmask:  # a [MASK]/[sMASK] span sits at its mask
                fixed = found[1]
                pos[sop_at:] = [fixed] * (len(toks) - sop_at)
            prefix_len = sop_at if sop_at is not None else len(prompt)
            prefix = [i < prefix_len for i in range(len(toks))]
        rows.append((cols, toks, pos, prefix, implied, fixed))
    offset = max((r[4] for r in rows), default=0)
    width = offset + n
    ids = torch.full((b, width), config.pad_token_id if config.pad_token_id is not None else 0, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    prefix_t = torch.zeros((b, width), dtype=torch.bool)
    valid_t = torch.zeros((b, width), dtype=torch.bool)
    fixed_t = torch.full((b,), -1, dtype=torch.long)
    for r, (cols, toks, pos, prefix, implied, fixed) in enumerate(rows):
        lead = [gmask, sop][:implied]
        for i, t in enumerate(lead):
            c = offset - implied + i
            ids[r, c], positions[r, c], valid_t[r, c] = t, i, True
        if cols:
            idx = torch.tensor(cols, dtype=torch.long) + offset
            ids[r, idx] = torch.tensor(toks, dtype=torch.long)
            positions[r, idx] = torch.tensor(pos, dtype=torch.long)
            prefix_t[r, idx] = torch.tensor(prefix, dtype=torch.bool)
            valid_t[r, idx] = True
        fixed_t[r] = fixed
    dev = input_ids.device
    return Layout(ids.to(dev), positions.to(dev), prefix_t.to(dev), valid_t.to(dev), fixed_t.to(dev), offset)


def blocked_mask(prefix, valid, q_start):
    """bool [b, 1, T - q_start, T], True = may not attend, for the queries at columns q_start ...:
    a key is visible to a query when both are real tokens and the key is in the bidirectional
    prefix or not after the query (glmctl.model.masks.build_mask for one sample, one block)."""
    t = prefix.shape[1]
    q = torch.arange(q_start, t, device=prefix.device)
    k = torch.arange(t, device=prefix.device)
    causal = k[None, :] <= q[:, None]  # [q, k]
    visible = valid[:, q_start:, None] & valid[:, None, :] & (prefix[:, None, :] | causal[None])
    return ~visible[:, None]


def blocked_from_4d(mask):
    if mask.dtype == torch.bool:
        return ~mask
    if mask.is_floating_point():
        return mask < 0
    return mask == 0


# ---- the network -----------------------------------------------------------------------------
class GLM130BAttention(nn.Module):
    def __init__(self, config: GLM130BConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = nn.Dropout(config.attention_dropout)

    def forward(self, x, cos, sin, blocked, cache):
        b, s, _ = x.shape
        n, d = self.heads, self.head_dim
        qkv = self.query_key_value(x).view(b, s, n, 3 * d)  # head-major [q | k | v]; bias before RoPE
        q, k, v = qkv.split(d, dim=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, n, s, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_id)
        c = float(self.layer_id + 1)  # query_key_layer_scaling
        scores = torch.matmul(q / (math.sqrt(d) * c), k.transpose(-1, -2))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * c
        scores = scores.masked_fill(blocked, -10000.0)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        probs = self.attention_dropout(probs)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, n * d)
        return self.dense(ctx)


class GLM130BGeGLU(nn.Module):
    def __init__(self, config: GLM130BConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        x1, x2 = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(x1 * F.gelu(x2))


class GLM130BBlock(nn.Module):
    def __init__(self, config: GLM130BConfig, layer_id: int):
        super().__init__()
        self.alpha = (2 * config.num_layers) ** 0.5  # DeepNorm
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = GLM130BAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLM130BGeGLU(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x, cos, sin, blocked, cache):
        a = self.input_layernorm(x)
        h = self.alpha * a + self.hidden_dropout(self.attention(a, cos, sin, blocked, cache))
        m = self.post_attention_layernorm(h)
        return self.alpha * m + self.hidden_dropout(self.mlp(m))


class GLM130BPreTrainedModel(PreTrainedModel):
    config_class = GLM130BConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLM130BBlock"]
    # glmctl keeps SwissArmyTransformer's per-layer rotary buffers; the frequencies are recomputed
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class GLM130BModel(GLM130BPreTrainedModel):
    """The transformer: hidden states aligned with the ids given (module docstring)."""

    def __init__(self, config: GLM130BConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(GLM130BBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def _inputs(self, input_ids, attention_mask, position_ids, cache):
        """(ids, positions, blocked [b,1,s,t], columns to drop from the output) for one call."""
        past = cache.get_seq_length() if cache is not None else 0
        b, s = input_ids.shape
        mask4 = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
        mask2 = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None and mask4 is None:  # GLM-130B's reading, from the tokens
            if past == 0:
                valid = mask2.bool() if mask2 is not None else torch.ones_like(input_ids, dtype=torch.bool)
                lay = read_layout(self.config, input_ids, valid)
                if cache is not None:  # for a later call that continues this cache
                    cache.glm130b_state = {"valid": lay.valid, "fixed": lay.fixed,
                                           "last": lay.positions.max(dim=1).values}
                return lay.ids, lay.positions, blocked_mask(lay.prefix, lay.valid, 0), lay.offset
            state = getattr(cache, "glm130b_state", None)
            if state is None or state["valid"].shape[0] != b:
                raise ValueError("GLM-130B: continuing a cache this model did not fill (or whose rows were "
                                 "reordered) needs explicit position_ids and a 4-D attention_mask")
            step = torch.arange(1, s + 1, device=input_ids.device)
            positions = torch.where(state["fixed"][:, None] >= 0, state["fixed"][:, None],
                                    state["last"][:, None] + step[None])
            new_valid = mask2[:, -s:].bool() if mask2 is not None else torch.ones_like(input_ids, dtype=torch.bool)
            valid = torch.cat([state["valid"], new_valid], dim=1)
            prefix = torch.zeros_like(valid)
            state.update(valid=valid, last=positions[:, -1])
            return input_ids, positions, blocked_mask(prefix, valid, valid.shape[1] - s), 0
        if mask4 is not None:
            blocked = blocked_from_4d(mask4)
        if position_ids is None or mask4 is None:
            if past and position_ids is None:
                raise ValueError("GLM-130B: with a 4-D attention_mask and a cache, pass position_ids too")
            valid = (mask2.bool() if mask2 is not None else
                     torch.ones((b, past + s), dtype=torch.bool, device=input_ids.device))
            if past == 0:
                lay = read_layout(self.config, input_ids, valid, imply=False)
                position_ids = lay.positions if position_ids is None else position_ids
                if mask4 is None:
                    blocked = blocked_mask(lay.prefix, valid, 0)
            else:  # new tokens after a cache: they see every real key up to themselves
                blocked = blocked_mask(torch.zeros_like(valid), valid, past)
        return input_ids, position_ids, blocked, 0

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if input_ids is None:
            raise ValueError("GLM-130B needs input_ids: its mask and <sop> tokens decide how the input is read")
        if inputs_embeds is not None:
            raise ValueError("GLM-130B: inputs_embeds is not supported; pass input_ids")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        ids, positions, blocked, drop = self._inputs(input_ids, attention_mask, position_ids, cache)
        h = self.embedding_dropout(self.word_embeddings(ids))
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rotary_base, h.dtype,
                                self.config.rope)
        hidden = []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(h[:, drop:])
            h = layer(h, cos, sin, blocked, cache)
        h = self.final_layernorm(h)[:, drop:]
        if output_hidden_states:
            hidden.append(h)
        return BaseModelOutputWithPast(last_hidden_state=h, cache=cache,
                                       hidden_states=tuple(hidden) if output_hidden_states else None)


class GLM130BForCausalLM(GLM130BPreTrainedModel, GenerationMixin):
    """GLM-130B with its output layer tied to the word embedding (no separate weight)."""

    def __init__(self, config: GLM130BConfig):
        super().__init__(config)
        self.transformer = GLM130BModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep=0,
                **kwargs):
        kwargs.pop("output_attentions", None)
        kwargs.pop("cache_position", None)
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               output_hidden_states=output_hidden_states, **kwargs)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = F.linear(h, self.transformer.word_embeddings.weight)
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, position_ids=None, **kwargs):
        """Every step re-reads the whole sequence (``read_layout``): the prompt decides how each row
        is read (stored on the cache at the first step), the new tokens get their GLM-130B positions
        and an explicit mask over the internal columns, so beam reordering needs no extra state."""
        if inputs_embeds is not None:
            raise ValueError("GLM-130B: generate from input_ids, not inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("GLM-130B: generate takes a 2-D attention_mask (padding); positions and the "
                             "prefix come from the tokens")
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None and past == 0:
            cache.glm130b_prompt_length = input_ids.shape[1]
        prompt_length = getattr(cache, "glm130b_prompt_length", None) if cache is not None else None
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        lay = read_layout(self.config, input_ids, valid, prompt_length)
        visible = ~blocked_mask(lay.prefix, lay.valid, past)
        inputs = {"input_ids": lay.ids[:, past:], "position_ids": lay.positions[:, past:],
                  "attention_mask": visible, "cache": cache}
        for key, value in kwargs.items():
            if key not in inputs and key not in ("labels", "token_type_ids"):
                inputs[key] = value
        return inputs
