"""Hugging Face transformers directories: the export (``glmctl convert SRC OUT --to hf``) and its
reader (``HFSource``), so that ``glmctl convert HF_DIR OUT`` imports such a directory back.

An export holds everything ``AutoModelForCausalLM`` / ``AutoTokenizer`` need with
``trust_remote_code=True``:

    config.json                      GLM130BConfig: glmctl's ModelConfig fields, auto_map, model_type
    configuration_glm130b.py         \\
    modeling_glm130b.py               } copied from glmctl/formats/hf_remote/ (self-contained)
    tokenization_glm130b.py          /
    model.safetensors                or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    generation_config.json           GLM's end tokens; masks and <sop> suppressed (as glmctl generate)
    tokenizer.model, tokenizer_config.json, special_tokens_map.json
    glmctl_tokenizer.json            glmctl's tokenizer.json (renamed: transformers reads its own file
                                     of that name), so the import gets the tokenizer back
    README.md                        model card from the source's manifest
    manifest.json                    glmctl's, written last

Tensor names are glmctl's (= SwissArmyTransformer's), at TP=1, so export -> import is exact.
Quantized sources are exported dequantized (W = q * scale, ``--dequantize``) or refused.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from glmctl.artifacts import atomic_write_json, atomic_write_text, read_manifest
from glmctl.checkpoint import split_by_size
from glmctl.config import ModelConfig
from glmctl.console import warn
from glmctl.errors import InputError, UsageError
from glmctl.formats.safetensors_stream import SafetensorsFile, dtype_from_code
from glmctl.formats.source import Source, element_size
from glmctl.kernels import dequantize as dequantize_weight
from glmctl.tokenizer import META_FILE, MODEL_FILE, Tokenizer

MODEL_TYPE = "glm130b"
REMOTE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_glm130b.py", "modeling_glm130b.py", "tokenization_glm130b.py")
AUTO_MAP = {"AutoConfig": "configuration_glm130b.GLM130BConfig",
            "AutoModel": "modeling_glm130b.GLM130BModel",
            "AutoModelForCausalLM": "modeling_glm130b.GLM130BForCausalLM"}
TOKENIZER_META = "glmctl_tokenizer.json"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default, "5GB"
# ModelConfig fields carried one to one in config.json (the rest: tensor_parallel_size = 1,
# quantization = None, extra <-> glmctl_extra)
FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size",
          "max_sequence_length", "layernorm_epsilon", "rotary_base", "rope", "hidden_dropout",
          "attention_dropout", "mask_token_id", "gmask_token_id", "smask_token_id", "eod_token_id",
          "sop_token_id", "eop_token_id", "eos_token_id", "pad_token_id")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def is_hf_export(path: Path) -> bool:
    """A directory whose config.json names GLM-130B's transformers model type."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("model_type") == MODEL_TYPE


# ---- config.json <-> ModelConfig ----------------------------------------------------------------
def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    doc = {k: getattr(cfg, k) for k in FIELDS}
    doc.update({
        "model_type": MODEL_TYPE, "architectures": ["GLM130BForCausalLM"], "auto_map": dict(AUTO_MAP),
        # a text without mask tokens is read after an implied [gMASK] <sop>: 2 positions fewer
        "max_position_embeddings": cfg.max_sequence_length - 2,
        "bos_token_id": cfg.sop_token_id, "tie_word_embeddings": False, "use_cache": True,
        "dtype": DTYPE_NAMES.get(dtype, "float32"), "glmctl_extra": cfg.extra or None,
    })
    return doc


def model_config(doc: dict, where: str) -> ModelConfig:
    """The ModelConfig (TP=1) an export's config.json describes."""
    missing = [k for k in FIELDS if k not in doc]
    if missing:
        raise InputError(f"{where}: not a glmctl transformers export (config.json lacks {', '.join(missing)})")
    d = {k: doc[k] for k in FIELDS}
    if isinstance(d["eos_token_id"], list):  # edited by hand into transformers' list form: the first
        d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else 0
    d.update(tensor_parallel_size=1, quantization=None, extra=doc.get("glmctl_extra") or {})
    return ModelConfig.from_dict(d, source=where)


# ---- reading an export ---------------------------------------------------------------------------
class HFSource(Source):
    """A transformers export read tensor by tensor (TP=1). Its tokenizer is offered to the
    converter as a glmctl tokenizer directory (a temporary copy named as glmctl names it)."""
    kind = "hf"

    def __init__(self, path: Path, *, require_manifest: bool = False):
        self.path = Path(path)
        try:
            doc = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{self.path / 'config.json'}: unreadable ({e})") from None
        self.cfg = model_config(doc, str(self.path / "config.json"))
        self.tp = 1
        self.manifest = read_manifest(self.path) if require_manifest or (self.path / "manifest.json").exists() else {}
        self.label = f"transformers export {self.path}"
        if (self.path / INDEX).exists():
            try:
                files = sorted(set(json.loads((self.path / INDEX).read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise InputError(f"{self.path / INDEX}: malformed index ({e})") from None
        else:
            files = ["model.safetensors"]
        self.files, self.local, self.dtypes = {}, {}, {}
        for fname in files:
            f = self.path / fname
            if not f.exists():
                raise InputError(f"{f}: missing weights file")
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                        sl = h.get_slice(k)
                        self.files[k] = f
                        self.local[k] = [tuple(sl.get_shape())]
                        self.dtypes[k] = dtype_from_code(sl.get_dtype(), f)
            except InputError:
                raise
            except Exception as e:  # noqa: BLE001 - safetensors raises its own types
                raise InputError(f"{f}: damaged safetensors file ({str(e).splitlines()[0]})") from None
        self.names = list(self.local)
        self._tmp = None
        if (self.path / MODEL_FILE).exists() and (self.path / TOKENIZER_META).exists():
            self._tmp = Path(tempfile.mkdtemp(prefix="glmctl-hf-tok-"))
            shutil.copyfile(self.path / MODEL_FILE, self._tmp / MODEL_FILE)
            shutil.copyfile(self.path / TOKENIZER_META, self._tmp / META_FILE)
            self.tokenizer_dir = self._tmp
        source = ((self.manifest or {}).get("config") or {}).get("source") or {}
        self.iteration = source.get("iteration")

    def read(self, name, rank):
        f = self.files[name]
        try:
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{f}: damaged safetensors file ({str(e).splitlines()[0]})") from None

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


# ---- writing an export ---------------------------------------------------------------------------
def check_exportable(cfg: ModelConfig, dequantize: bool) -> None:
    """A quantized model goes to transformers only dequantized, and only when asked to."""
    q = cfg.quantization
    if q and not dequantize:
        raise UsageError(f"--to hf: the source is INT{q['bits']}-quantized and transformers cannot run glmctl's "
                         "quantized layers; pass --dequantize to export W = q * scale as float weights "
                         "(--dtype picks their precision), or export the unquantized model")
    if dequantize and not q:
        warn("--dequantize: the source is not quantized; nothing to dequantize")


class _ShardedWriter:
    """HF-style shards: entries [(name, shape, dtype)] split at ``max_bytes`` in order."""

    def __init__(self, directory: Path, entries: list[tuple], max_bytes: int):
        parts = split_by_size(entries, max_bytes, lambda e: math.prod(e[1]) * element_size(e[2]))
        n = len(parts)
        self.dir, self.total = directory, sum(math.prod(e[1]) * element_size(e[2]) for e in entries)
        self.layout = [("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors", p)
                       for i, p in enumerate(parts)]
        self.cursor, self.active = 0, None

    def write(self, name: str, t: torch.Tensor) -> None:
        if self.active is None:
            fn, entries = self.layout[self.cursor]
            self.active = SafetensorsFile(self.dir / fn, entries, {"format": "pt"})
        self.active.write(name, t)
        if self.active.done:
            self.active.close()
            self.active, self.cursor = None, self.cursor + 1

    def close(self) -> list[str]:
        assert self.active is None and self.cursor == len(self.layout)
        if len(self.layout) > 1:
            atomic_write_json(self.dir / INDEX, {"metadata": {"total_size": self.total},
                                                 "weight_map": {e[0]: fn for fn, p in self.layout for e in p}})
        return [fn for fn, _ in self.layout]


def export(src: Source, plan, out: Path, *, tokenizer_dir: Path | None, dequantize: bool, max_shard_bytes: int,
           progress=None) -> dict:
    """Write the transformers directory for ``plan`` (a TP=1 glmctl plan of ``src``) into ``out``."""
    cfg = plan.cfg_out.replace(tensor_parallel_size=1, quantization=None)
    q = plan.cfg_out.quantization
    float_dtype = plan.out_dtype("x.weight", src.stored_dtype())
    scales = {n[:-len("_scale")]: n for n in plan.names if n.endswith("weight_scale")} if q else {}
    names = [n for n in plan.names if n not in scales.values()]
    entries = []
    for n in names:
        shape = plan.global_shape[n]
        dt = plan.entries[0][plan.names.index(n)][2]
        if n in scales:  # packed INT4 holds two columns per byte
            shape = (shape[0], shape[1] * 2) if q["bits"] == 4 else shape
            dt = float_dtype
        entries.append((n, tuple(shape), dt))
    writer = _ShardedWriter(out, entries, max_shard_bytes)
    for n, _, dt in entries:
        t = next(iter(plan.output(n)))
        if n in scales:
            t = dequantize_weight(t, next(iter(plan.output(scales[n]))), q["bits"], torch.float32).to(dt)
        writer.write(n, t)
        if progress is not None:
            progress.update(1 + (n in scales))
    files = writer.close()
    atomic_write_json(out / "config.json", hf_config(cfg, float_dtype))
    atomic_write_json(out / "generation_config.json", generation_config(cfg))
    for f in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / f, out / f)
    tok = write_tokenizer(tokenizer_dir, out, cfg) if tokenizer_dir is not None else None
    if tok is None:
        warn(f"{out}: no tokenizer in the export (the source carries none); pass --tokenizer DIR")
    atomic_write_text(out / "README.md", model_card(cfg, src, float_dtype, q if dequantize else None, tok is not None))
    return {"weight_files": files, "dtype": DTYPE_NAMES.get(float_dtype, str(float_dtype)),
            "dequantized": bool(q), "tokenizer": tok is not None}


def generation_config(cfg: ModelConfig) -> dict:
    """glmctl generate's defaults: greedy, stop at eop/eos/eod, never emit a mask or <sop>."""
    ends = list(dict.fromkeys(i for i in (cfg.eop_token_id, cfg.eos_token_id, cfg.eod_token_id)
                              if 0 <= i < cfg.vocab_size))
    return {"bos_token_id": cfg.sop_token_id, "eos_token_id": ends, "pad_token_id": cfg.pad_token_id,
            "do_sample": False, "max_new_tokens": 64,
            "suppress_tokens": [cfg.mask_token_id, cfg.gmask_token_id, cfg.smask_token_id, cfg.sop_token_id]}


def write_tokenizer(tokenizer_dir: Path, out: Path, cfg: ModelConfig) -> Tokenizer:
    tok = Tokenizer.load(tokenizer_dir)
    shutil.copyfile(Path(tokenizer_dir) / MODEL_FILE, out / MODEL_FILE)
    shutil.copyfile(Path(tokenizer_dir) / META_FILE, out / TOKENIZER_META)
    piece = tok.sp.id_to_piece
    special = {"unk_token": piece(tok.unk_token_id), "eos_token": piece(tok.eos_token_id),
               "pad_token": piece(tok.pad_token_id), "bos_token": "[sop]", "mask_token": "[MASK]"}
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GLM130BTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_glm130b.GLM130BTokenizer", None]},
        "vocab_size": cfg.vocab_size, "model_max_length": cfg.max_sequence_length - 2,
        "padding_side": "left", "clean_up_tokenization_spaces": False, **special})
    atomic_write_json(out / "special_tokens_map.json", special)
    return tok


# ---- the model card ------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def model_card(cfg: ModelConfig, src: Source, dtype: torch.dtype, dequantized: dict | None,
               has_tokenizer: bool) -> str:
    """README.md: architecture, provenance (stage, training data, steps) and the numbers the
    source's manifest records (losses, evaluation results), then how to load the export."""
    m = src.manifest or {}
    conf, summary = m.get("config") or {}, m.get("summary") or {}
    lines = ["---", "library_name: transformers", "tags: [glm, glm-130b, glmctl]", "---", "",
             f"# {src.path.name}", "",
             ("A GLM-130B-architecture language model exported by `glmctl convert --to hf`. The modelling "
              "code travels with the weights (`trust_remote_code=True`; transformers 5)."), "",
             "## Architecture", "", "| | |", "| --- | --- |",
             f"| layers | {cfg.num_layers} |", f"| hidden size | {cfg.hidden_size} |",
             f"| attention heads | {cfg.num_attention_heads} (head dim {cfg.head_dim}) |",
             f"| GeGLU inner size | {cfg.inner_hidden_size} |",
             f"| vocabulary (embedding rows) | {cfg.vocab_size} |",
             f"| max sequence length | {cfg.max_sequence_length} |",
             f"| parameters | {cfg.num_parameters():,} |",
             f"| weights | {DTYPE_NAMES.get(dtype, str(dtype))}"
             + (f", dequantized from INT{dequantized['bits']}" if dequantized else "") + " |",
             "| normalization | DeepNorm (Post-LN, alpha = sqrt(2 N)) |",
             f"| positions | 1-D RoPE, half rotation, base {cfg.rotary_base:g}"
             + (", angles as SAT 0.2.x computes them" if cfg.rope == "sat" else "") + " |",
             "| output layer | tied to the word embedding |", ""]
    lines += ["## Provenance", "", f"- source: {src.label}" + (f", iteration {src.iteration}" if src.iteration else "")]
    if m.get("stage"):
        lines.append(f"- made by `glmctl {m['stage']}` (glmctl {m.get('glmctl_version', '?')}, "
                     f"finished {m.get('finished', '?')})")
    data = [i.get("path") for i in m.get("inputs") or [] if isinstance(i, dict)]
    if m.get("stage") == "pretrain" and data:
        lines.append(f"- training data: {', '.join(f'`{d}`' for d in data)}")
    pre = conf.get("pretrain") or {}
    if pre:
        keys = ("preset", "steps", "global_batch_size", "seq_len", "lr", "precision", "tokenizer")
        lines.append("- training: " + ", ".join(f"{k} {_fmt(pre[k])}" for k in keys if pre.get(k) is not None))
    if "step" in summary:
        lines.append(f"- step {summary['step']}" + (f", {summary['tokens']:,} tokens" if isinstance(
            summary.get("tokens"), int) else ""))
    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    results = summary.get("results") if isinstance(summary.get("results"), dict) else None
    if scalars or results:
        lines += ["", "## Recorded results", "", "From the source's manifest.json summary.", "",
                  "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(scalars.items())]
        for task, vals in (results or {}).items():
            items = vals.items() if isinstance(vals, dict) else [("", vals)]
            lines += [f"| {task} {k} | {_fmt(v)} |" for k, v in items]
    else:
        lines += ["", "No evaluation results are recorded in the source's manifest."]
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
              "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)" if has_tokenizer
              else "# no tokenizer was exported with this model",
              "```", "",
              ("Prompts with `[MASK]`, `[sMASK]` or `[gMASK]` are read as GLM-130B reads them (bidirectional "
               "context, the span generated after `<sop>`; the tokenizer appends `<sop>`). Text without a mask "
               "token is read as if `[gMASK] <sop>` came first, causally, so causal-LM tools work unchanged."), ""]
    return "\n".join(lines)
