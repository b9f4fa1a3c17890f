"""ModelConfig: the hyperparameters of a GLM network, and the named presets.

``config.json`` in every checkpoint is ``ModelConfig.to_dict()``. Defaults are GLM-130B's
(docs/glm130b.md §1, §3). Token ids default to GLM-130B's icetk layout; a glmctl tokenizer puts its
special tokens right after its sentencepiece pieces and the pretrain stage copies them in.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from glmctl.errors import InputError, UsageError

ROPE_MODES = ("exact", "sat")
SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK")


@dataclass
class ModelConfig:
    num_layers: int = 70
    hidden_size: int = 12288
    num_attention_heads: int = 96
    inner_hidden_size: int = 32768  # per GeGLU branch; dense_h_to_4h has 2x this many rows
    vocab_size: int = 150528  # embedding rows (padded); a multiple of 128 for TP splits
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    # RoPE angles (docs/glm130b.md §2.3): "exact" (fp32 frequencies and angles; models trained with
    # glmctl) or "sat" (SAT 0.2.x: frequencies rounded to fp16, angles in the compute dtype; the
    # default for checkpoints imported from SAT). Old configs' rope_fp16 maps to these (from_dict).
    rope: str = "exact"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    tensor_parallel_size: int = 1
    # Special-token ids (docs/glm130b.md §3).
    mask_token_id: int = 150000
    gmask_token_id: int = 150001
    smask_token_id: int = 150002
    eod_token_id: int = 150003
    sop_token_id: int = 150004
    eop_token_id: int = 150005
    eos_token_id: int = 20002
    pad_token_id: int = 0
    # Set by `glmctl quantize`: {"bits": 4|8, "group_size": int|None, "method": "rtn"|"gptq"}
    quantization: dict | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.rope not in ROPE_MODES:
            raise UsageError(f"rope {self.rope!r}: choose {' or '.join(ROPE_MODES)}")
        if self.hidden_size % self.num_attention_heads:
            raise UsageError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise UsageError("head dimension must be even (RoPE rotates half-dimension pairs)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def deepnorm_alpha(self) -> float:
        return (2 * self.num_layers) ** 0.5

    def num_parameters(self) -> int:
        """Exact parameter count from the shapes (docs/glm130b.md §1)."""
        d, f, v = self.hidden_size, self.inner_hidden_size, self.vocab_size
        per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * 2 * f + 2 * f) + (f * d + d) + 4 * d
        return self.num_layers * per_layer + v * d + 2 * d

    def num_linear_parameters(self) -> int:
        d, f = self.hidden_size, self.inner_hidden_size
        return self.num_layers * (3 * d * d + d * d + 2 * f * d + f * d)

    def special_token_ids(self) -> dict[str, int]:
        return {
            "[MASK]": self.mask_token_id, "[gMASK]": self.gmask_token_id, "[sMASK]": self.smask_token_id,
            "eod": self.eod_token_id, "sop": self.sop_token_id, "eop": self.eop_token_id,
            "eos": self.eos_token_id, "pad": self.pad_token_id,
        }

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise InputError(f"{source}: expected a JSON object")
        known = {f.name: f for f in fields(cls)}
        if "rope_fp16" in d and "rope" not in d:  # configs written before the rope mode existed
            d = dict(d)
            d["rope"] = "sat" if d.pop("rope_fp16") else "exact"
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise InputError(f"{source}: unknown field(s) {', '.join(unknown)}")
        for name, value in d.items():
            t = known[name].type
            if t in ("int",) and not (isinstance(value, int) and not isinstance(value, bool)):
                raise InputError(f"{source}: field {name} must be an integer, got {value!r}")
            if t in ("float",) and not isinstance(value, (int, float)):
                raise InputError(f"{source}: field {name} must be a number, got {value!r}")
        try:
            return cls(**d)
        except UsageError as e:
            raise InputError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise InputError(f"{path}: no such file")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: malformed JSON ({e})") from None
        return cls.from_dict(d, source=str(path))


def own_vocab(cfg: ModelConfig) -> ModelConfig:
    """Presets below GLM-130B have their own vocabulary: until a tokenizer says otherwise, the
    8 GLM special tokens sit at vocab_size-64 ... (inside the padding), eos = 2 and pad = 0
    (sentencepiece's defaults). `glmctl pretrain --tokenizer` replaces them with the tokenizer's."""
    first = cfg.vocab_size - 64
    return dataclasses.replace(cfg, mask_token_id=first, gmask_token_id=first + 1, smask_token_id=first + 2,
                               eod_token_id=first + 3, sop_token_id=first + 4, eop_token_id=first + 5,
                               eos_token_id=2, pad_token_id=0)


def _glm_family(layers: int, hidden: int, heads: int, vocab: int = 50304) -> ModelConfig:
    # GLM family sizes (paper Table 10) with GLM-130B's architecture: GeGLU with inner size
    # 8/3*d (rounded up to a multiple of 64), DeepNorm, RoPE.
    inner = -(-(8 * hidden // 3) // 64) * 64
    return own_vocab(ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                  inner_hidden_size=inner, vocab_size=vocab, max_sequence_length=2048))


PRESETS: dict[str, ModelConfig] = {
    # Tests: ~0.2M parameters.
    "tiny": own_vocab(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=128,
                                   vocab_size=512, max_sequence_length=256)),
    # The demo's model: ~1.9M parameters at an 8k vocab, trains usefully on a 2-core CPU in 10
    # minutes. Measured on the sample corpus at equal CPU time (docs/pretrain.md): held-out loss
    # 5.37 for 4 x 128, 5.52 for 4 x 192, 6.20 for 4 x 256, 6.41 for 6 x 384 (now `medium`): with
    # DeepNorm, a few narrow layers and many steps beat a wider model at this budget. Widths are
    # multiples of 128 so INT4 group-128 quantization applies.
    "small": own_vocab(ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=2,
                                    inner_hidden_size=384, vocab_size=8192, max_sequence_length=512)),
    # ~14M parameters: the previous `small`; the CPU benchmarks of generate/evaluate use it.
    "medium": own_vocab(ModelConfig(num_layers=6, hidden_size=384, num_attention_heads=6,
                                     inner_hidden_size=1024, vocab_size=8192, max_sequence_length=512)),
    "glm-110m": _glm_family(12, 768, 12),
    "glm-335m": _glm_family(24, 1024, 16),
    "glm-2b": _glm_family(36, 2048, 32),
    "glm-10b": _glm_family(48, 4096, 64),
    "glm-130b": ModelConfig(),  # docs/glm130b.md §1 exactly
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
