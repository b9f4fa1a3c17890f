"""GLM-130B's configuration for transformers (remote code, written by `glmctl convert --to hf`).

The fields are glmctl's ``ModelConfig`` (docs/glm130b.md §1 in the glmctl repository); the
special-token ids are the model's own. Self-contained: loaded by transformers with
``trust_remote_code=True``, without glmctl installed.
"""
from transformers import PretrainedConfig


class GLM130BConfig(PretrainedConfig):
    model_type = "glm130b"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers", "intermediate_size": "inner_hidden_size",
                     "layer_norm_eps": "layernorm_epsilon"}

    num_layers: int = 70
    hidden_size: int = 12288
    num_attention_heads: int = 96
    inner_hidden_size: int = 32768  # per GeGLU branch: dense_h_to_4h has twice as many rows
    vocab_size: int = 150528  # embedding rows (the output layer is tied to them)
    max_sequence_length: int = 2048
    # the longest plain text: a text without mask tokens is read after an implied [gMASK] <sop>
    max_position_embeddings: int | None = None
    layernorm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    # RoPE angles: "exact" (fp32) or "sat" (SwissArmyTransformer 0.2.x: fp16 frequencies, angles in the
    # model's dtype), docs/glm130b.md §2.3
    rope: str = "exact"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    mask_token_id: int = 150000
    gmask_token_id: int = 150001
    smask_token_id: int = 150002
    eod_token_id: int = 150003
    sop_token_id: int = 150004
    eop_token_id: int = 150005
    eos_token_id: int | list[int] | None = 20002
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False  # the output layer *is* the embedding (no separate weight)
    use_cache: bool = True
    glmctl_extra: dict | None = None  # glmctl's ModelConfig.extra, kept for the import back

    def __post_init__(self, **kwargs):
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.max_sequence_length - 2
        if self.rope not in ("exact", "sat"):
            raise ValueError(f"rope {self.rope!r}: choose exact or sat")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
