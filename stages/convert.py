"""The convert stage: import, reshard, gather and export checkpoints, streaming, then verify.

    run(ConvertConfig(src="glm-130b-sat", out="glm-130b-tp4", tp=4, preset="glm-130b"))

Sources (detected): a native glmctl checkpoint; a SAT checkpoint (spec §6.1, glmctl/sat.py),
fp16 or quantized; a ``glmctl pretrain`` run dir (its ``latest`` step) or step dir (native
weights, or ``zero_master`` for the fp32 ZeRO master weights in trainer/deepspeed); a DeepSpeed
checkpoint folder (gathered with deepspeed.utils.zero_to_fp32). Targets: native (safetensors
per TP rank, glmctl/checkpoint.py's layout) or SAT (``to="sat"``).

Streaming: every tensor is read (safetensors via safe_open, SAT shards memory-mapped with
weights_only) and resharded on its own (glmctl/tp_layout.py, spec §6.3-6.4), and written
straight into per-rank files whose headers were laid out from the shapes beforehand, so
peak memory is a few tensors (bench/convert_memory.py), not the model. Quantized weights are
never requantised: scales are re-expressed at another group size only where that is exact
(tp_layout.regroup_scale); otherwise the conversion stops and says why.
Verification runs the same random tokens with [gMASK] and [MASK] through source and result
(each loaded at TP=1, one at a time) and compares logits; the output is only moved into place
when they agree.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from glmctl.errors import GlmctlError, InputError, UsageError

FORMATS = ("glmctl", "sat")
INV_FREQ = "rotary_emb.inv_freq"


@dataclass
class ConvertConfig:
    src: str
    out: str
    tp: int | None = None  # output tensor-parallel size (default: the source's)
    to: str = "glmctl"  # glmctl | sat
    dtype: str | None = None  # fp32 | bf16 | fp16 for floating tensors (default: as stored; scales kept)
    preset: str | None = None  # hyperparameters a SAT/DeepSpeed checkpoint does not carry
    num_attention_heads: int | None = None
    tokenizer: str | None = None  # tokenizer (or checkpoint) dir to attach to the output
    verify: bool | None = None  # None: verify when source and result fit in memory
    tolerance: float | None = None  # max |logit difference| allowed (default from the dtypes)
    zero_master: bool = False  # from a pretrain step: take the ZeRO fp32 master weights
    max_shard_size: str | None = None  # split a rank's weights into files of at most this size
    iteration: str | None = None  # SAT export: the iteration folder (default: from the source)
    seed: int = 0  # random probe tokens for verification
    if_stale: bool = False  # skip when OUT was made from the same source and options


# =============================================================================================
# Sources. Each exposes: cfg (ModelConfig at the source's TP; quantization in glmctl's group
# form), tp, names (canonical order), local[name] -> [shape per rank], dtypes[name],
# read(name, rank) -> tensor in glmctl form, release(name), tokenizer_dir, iteration, label.
# =============================================================================================
class _Source:
    kind = "?"
    cfg = None
    tokenizer_dir = None
    iteration = None
    manifest = None

    def cfg_dtype(self):
        """The float dtype the model is stored in (that of its LayerNorms)."""
        names = [n for n in self.names if "layernorm" in n]
        return self.dtypes[names[0]] if names else next(iter(self.dtypes.values()))

    def release(self, name, ranks=None):  # noqa: D401 - drop what reading ``name`` made resident
        pass

    def close(self):
        pass

    def bytes(self) -> int:
        import torch
        total = 0
        for n in self.names:
            el = torch.empty(0, dtype=self.dtypes[n]).element_size()
            total += sum(math.prod(s) for s in self.local[n]) * el
        return total


class NativeSource(_Source):
    kind = "glmctl"

    def __init__(self, path: Path):
        from glmctl.artifacts import read_manifest
        from glmctl.checkpoint import _open_safetensors, rank_files
        from glmctl.config import ModelConfig
        self.path = path
        self.manifest = read_manifest(path)
        self.cfg = ModelConfig.load(path)
        self.tp = self.cfg.tensor_parallel_size
        self.label = f"glmctl checkpoint {path}"
        self.files: dict[tuple[str, int], Path] = {}
        self.local: dict[str, list] = {}
        self.dtypes = {}
        per_rank: list[set] = []
        files = rank_files(path, self.cfg)
        if sorted(files) != list(range(self.tp)):
            raise InputError(f"{path}: config.json says TP={self.tp} but the files hold ranks {sorted(files)}")
        for rank in range(self.tp):
            seen = set()
            for fname in files[rank]:
                with _open_safetensors(path / fname) as h:
                    for k in h.keys():
                        sl = h.get_slice(k)
                        self.files[(k, rank)] = path / fname
                        self.local.setdefault(k, [None] * self.tp)[rank] = tuple(sl.get_shape())
                        self.dtypes[k] = _st_dtype(sl.get_dtype(), path / fname)
                        seen.add(k)
            per_rank.append(seen)
        _check_same_names(per_rank, lambda r: str(path / files[r][0]))
        self.names = list(self.local)
        if (path / "tokenizer.model").exists() or (path / "tokenizer.json").exists():
            self.tokenizer_dir = path
        m = re.fullmatch(r"step-0*(\d+)", path.name)
        step = (self.manifest.get("summary") or {}).get("step")  # pretrain records its step (also final/)
        self.iteration = m.group(1) if m else str(step) if isinstance(step, int) else (
            (self.manifest.get("config") or {}).get("source", {}).get("iteration"))

    def read(self, name, rank):
        from safetensors import safe_open
        f = self.files[(name, rank)]
        try:
            with safe_open(str(f), framework="pt") as h:  # opened per tensor: pages are unmapped on close
                return h.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types
            raise InputError(f"{f}: damaged safetensors file ({str(e).splitlines()[0]})") from None


class SatSource(_Source):
    """A SAT checkpoint; config from the shapes plus heads from the caller (or inv_freq)."""
    kind = "sat"

    def __init__(self, root: Path):
        from glmctl import sat
        self.path = root
        self.iteration = sat.read_latest(root)
        folder = root / self.iteration
        self.files = sat.shard_files(folder)
        self.label = f"SAT checkpoint {root} (iteration {self.iteration})"
        loaded = [sat.load_shard(f) for f in self.files]
        self.shards = [sd for sd, _ in loaded]
        self.mapped = [mapped for _, mapped in loaded]
        self.tp = len(self.files)
        _check_same_names([set(s) for s in self.shards], lambda r: str(self.files[r]))
        self.raw_local = {k: [tuple(s[k].shape) for s in self.shards] for k in self.shards[0]}
        self.raw_dtypes = {k: self.shards[0][k].dtype for k in self.shards[0]}
        for k, shapes in self.raw_local.items():
            for r, s in enumerate(shapes[1:], start=1):
                if s != shapes[0] or self.shards[r][k].dtype != self.raw_dtypes[k]:
                    dt = lambda t: str(t).replace("torch.", "")  # noqa: E731
                    raise InputError(f"{folder}: {k} is {list(shapes[0])} {dt(self.raw_dtypes[k])} in "
                                     f"{self.files[0].name} but {list(s)} {dt(self.shards[r][k].dtype)} in "
                                     f"{self.files[r].name}")
        self.shapes = _ShapeFacts(self.raw_local, self.raw_dtypes, self.tp, str(folder))
        self.shapes.check_rank_count(self.files)
        self.group = self.shapes.sat_group()
        # glmctl form: SAT's per-rank row scales become group scales of size ``group``.
        self.local, self.dtypes = {}, dict(self.raw_dtypes)
        for k, shapes in self.raw_local.items():
            shape = shapes[0]
            if k.endswith("weight_scale"):
                shape = regroup_shape(shape, self.shapes.in_features(k, local=True), self.group)
            self.local[k] = [shape] * self.tp
        self.names = list(self.raw_local)
        glm_manifest = root / "manifest.json"
        if glm_manifest.exists():  # exported by glmctl: its model config is recorded there
            with contextlib.suppress(ValueError, OSError):
                self.manifest = json.loads(glm_manifest.read_text())

    def _to_glmctl(self, name, t):
        from glmctl import tp_layout
        if not name.endswith("weight_scale"):
            return t
        in_local = self.shapes.in_features(name, local=True)
        return tp_layout.regroup_scale(name, t, in_local, None, self.group)

    def read(self, name, rank):
        return self._to_glmctl(name, self.shards[rank][name])

    def release(self, name, ranks=None):
        from glmctl import sat
        for r in range(self.tp) if ranks is None else ranks:
            if self.mapped[r]:  # only file-backed pages: on anonymous memory MADV_DONTNEED zeroes data
                sat.drop_pages(self.shards[r][name])


class ZeroSource(_Source):
    """fp32 master weights gathered from DeepSpeed ZeRO shards (deepspeed.utils.zero_to_fp32)."""
    kind = "deepspeed"

    def __init__(self, ds_dir: Path, cfg=None, tokenizer_dir=None, iteration=None):
        self.path = ds_dir
        self.tp = 1
        self.tokenizer_dir = tokenizer_dir
        self.iteration = iteration
        tag = (ds_dir / "latest").read_text().strip() if (ds_dir / "latest").is_file() else None
        if not tag or not (ds_dir / tag).is_dir():
            raise InputError(f"{ds_dir}: DeepSpeed checkpoint without a valid `latest` tag file")
        self.label = f"DeepSpeed ZeRO checkpoint {ds_dir / tag}"
        _check_deepspeed_pickles(ds_dir / tag)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise UsageError(f"gathering ZeRO shards needs DeepSpeed ({e}); pip install deepspeed") from None
        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints progress on stdout
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag, lazy_mode=True)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise InputError(f"{ds_dir / tag}: cannot gather ZeRO shards ({str(e).splitlines()[0]})") from None
        prefix = _common_prefix(list(sd))
        self.lazy = {k[len(prefix):]: v for k, v in sd.items()}
        import torch
        self.local = {k: [tuple(v.shape)] for k, v in self.lazy.items()}
        self.dtypes = {k: getattr(v, "dtype", torch.float32) for k, v in self.lazy.items()}
        self.names = list(self.lazy)
        self.shapes = _ShapeFacts(self.local, self.dtypes, 1, str(ds_dir / tag))
        self.group = None
        self.cfg = cfg
        if cfg is not None and cfg.tensor_parallel_size != 1:
            raise InputError(f"{ds_dir}: ZeRO shards of a tensor-parallel run (TP={cfg.tensor_parallel_size}) "
                             "cannot be gathered; convert the native weights instead")

    def read(self, name, rank):
        import torch
        t = self.lazy[name]
        t = t.contiguous() if not isinstance(t, torch.Tensor) else t
        return t.float() if t.is_floating_point() else t


def _common_prefix(names: list[str]) -> str:
    """'module.' / 'model.' wrappers around the GLM's own names ('transformer.…')."""
    firsts = {n.split("transformer.", 1)[0] for n in names if "transformer." in n}
    return firsts.pop() if len(firsts) == 1 else ""


# Globals DeepSpeed's checkpoints reference beyond torch's weights_only set: plain enums and
# records of its own (deepspeed 0.14-0.19). Exact names only: a prefix would admit callables.
DEEPSPEED_SAFE_GLOBALS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "argparse.Namespace",
}


def _check_deepspeed_pickles(folder: Path) -> None:
    """DeepSpeed's own loader unpickles fully (weights_only=False): first make sure every global
    its files reference is torch-safe or one of DEEPSPEED_SAFE_GLOBALS, so no code can run."""
    import torch
    for f in sorted(folder.glob("*.pt")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{f}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
        bad = [g for g in unsafe if g not in DEEPSPEED_SAFE_GLOBALS]
        if bad:
            raise InputError(f"{f}: refused to unpickle (it needs {', '.join(bad[:4])}); glmctl gathers only "
                             "DeepSpeed checkpoints made of tensors, plain containers and DeepSpeed's own "
                             "enums and records (stages/convert.py DEEPSPEED_SAFE_GLOBALS)")


def _check_same_names(per_rank: list[set], where) -> None:
    for r, names in enumerate(per_rank[1:], start=1):
        if names != per_rank[0]:
            diff = sorted(per_rank[0] ^ names)[0]
            side = 0 if diff in per_rank[0] else r
            raise InputError(f"{where(side if side else r)}: tensor {diff} is in rank {side} "
                             f"but not in rank {r if side == 0 else 0}")


def _st_dtype(code: str, where):
    import torch
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if code not in table:
        raise InputError(f"{where}: unsupported tensor dtype {code}")
    return table[code]


# ---- what the shapes say about the model (SAT and ZeRO sources) --------------------------------
class _ShapeFacts:
    def __init__(self, local: dict, dtypes: dict, tp: int, where: str):
        self.local, self.dtypes, self.tp, self.where = local, dtypes, tp, where
        self.layers = sorted({int(m.group(1)) for n in local for m in [re.match(r"transformer\.layers\.(\d+)\.", n)]
                              if m})
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
            import torch
            cols = self._dim("transformer.layers.0.attention.query_key_value.weight", 1)
            if w != torch.int8:
                raise InputError(f"{where}: weight_scale tensors present but query_key_value.weight is {w}, not int8")
            self.bits = 4 if cols * 2 == self.hidden else 8 if cols == self.hidden else None
            if self.bits is None:
                raise InputError(f"{where}: query_key_value.weight has {cols} columns for hidden size "
                                 f"{self.hidden}: neither INT8 nor packed INT4")
        inv = [n for n in local if n.endswith(INV_FREQ)]
        self.head_dim = 2 * local[inv[0]][0][0] if inv and local[inv[0]][0] else None
        self.dtype = dtypes["transformer.final_layernorm.weight"] if "transformer.final_layernorm.weight" in dtypes \
            else dtypes["transformer.layers.0.input_layernorm.weight"]

    def _dim(self, name, d):
        s = self.local.get(name)
        return s[0][d] if s and len(s[0]) > d else None

    def check_rank_count(self, files):
        implied, rem = divmod(3 * self.hidden, self.qkv_rows_local)
        if rem or implied != self.tp:
            have = len(files)
            extra = (f"; {files[0].parent / f'mp_rank_{have:02d}_model_states.pt'} is missing"
                     if not rem and implied > have else "")
            raise InputError(f"{self.where}: shapes imply TP={3 * self.hidden / self.qkv_rows_local:g} "
                             f"(query_key_value has {self.qkv_rows_local} of {3 * self.hidden} rows per rank) "
                             f"but {have} rank file{'s' if have != 1 else ''} exist{'s' if have == 1 else ''}{extra}")

    def in_features(self, name, local=False):
        from glmctl import tp_layout
        n = tp_layout.linear_in_features(name, self.hidden, self.inner)
        if local and tp_layout.classify(name) == tp_layout.ROW:
            n //= self.tp
        return n

    def sat_group(self):
        """GLM-130B's per-rank row scales as one group size for every layer."""
        if not self.quantized or self.tp == 1:
            return None
        return math.gcd(self.hidden // self.tp, self.inner // self.tp)

    def model_config(self, *, heads=None, preset=None, base=None):
        """ModelConfig for these shapes: head count from ``heads``, the preset, or inv_freq."""
        from glmctl.config import ModelConfig, own_vocab, get_preset
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
        quant = None
        if self.quantized:
            quant = {"bits": self.bits, "group_size": self.sat_group(), "method": "rtn"}
        return cfg.replace(tensor_parallel_size=self.tp, quantization=quant)

    def _mismatch(self, preset, field, want, got):
        if field == "num_layers":
            what = f"it has {got} layers (transformer.layers.0 ... {got - 1}), the preset {want}"
        else:
            name = {"hidden_size": "transformer.final_layernorm.weight",
                    "inner_hidden_size": "transformer.layers.0.mlp.dense_h_to_4h.weight",
                    "vocab_size": "transformer.word_embeddings.weight"}[field]
            what = f"{name} implies {field} {got}, the preset has {want}"
        return f"{self.where}: preset {preset} does not match the checkpoint: {what}"


# =============================================================================================
# Detecting what SRC is
# =============================================================================================
def detect(path: Path) -> tuple[str, Path]:
    """(kind, resolved path): kind in glmctl, sat, deepspeed, run (a pretrain run dir)."""
    from glmctl import sat
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise InputError(f"{path}: unknown checkpoint format (a file; expected a checkpoint directory)")
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        target = path / tag
        if tag and ((target / "manifest.json").exists() or (target / "config.json").exists()):
            return "run", path
        if tag and target.is_dir() and any(target.glob("*optim_states.pt")):
            return "deepspeed", path
        if sat.looks_like_sat(path):
            return "sat", path
        if not tag or not target.is_dir():
            raise InputError(f"{latest} names {tag!r} but {target} does not exist")
        raise InputError(f"{target}: no mp_rank_XX_model_states.pt files (a SAT checkpoint needs one per rank)")
    if (path / "config.json").exists() or (path / "manifest.json").exists():
        return "glmctl", path
    if any(p.is_dir() and any(p.glob("mp_rank_*_model_states.pt")) for p in path.iterdir()):
        sat.read_latest(path)  # raises: missing `latest`, naming the folders found
    steps = _run_steps(path)
    if steps:
        return "run", path
    raise InputError(f"{path}: unknown checkpoint format (expected a glmctl checkpoint with config.json, a SAT "
                     "checkpoint with `latest` and <iteration>/mp_rank_XX_model_states.pt, a pretrain run dir "
                     "or a DeepSpeed checkpoint folder)")


def _run_steps(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and (re.fullmatch(r"step-\d+", p.name)
                                                                    or p.name == "final"))


def resolve_run(path: Path) -> Path:
    """A pretrain run dir's checkpoint: the step named by ``latest``, else final/, else the newest step."""
    from glmctl.console import log
    latest = path / "latest"
    if latest.is_file():
        step = path / latest.read_text().strip()
        if not step.is_dir():
            raise InputError(f"{latest} names {step.name!r} but {step} does not exist")
        log(f"convert: {path} is a pretrain run; using its latest checkpoint {step.name}")
        return step
    steps = [s for s in _run_steps(path) if (path / s / "manifest.json").exists()]
    if not steps:
        raise InputError(f"{path}: pretrain run without a complete checkpoint (no `latest`, no step with a manifest)")
    pick = "final" if "final" in steps else steps[-1]
    log(f"convert: {path} has no `latest`; using {pick}")
    return path / pick


def open_source(path: Path, *, heads=None, preset=None, zero_master=False) -> _Source:
    kind, path = detect(path)
    if kind == "run":
        path = resolve_run(path)
        kind = "glmctl"
    if kind == "glmctl":
        ds = path / "trainer" / "deepspeed"
        if zero_master:
            if not ds.is_dir():
                raise UsageError(f"--zero-master: {path} has no trainer/deepspeed folder (not a DeepSpeed run)")
            native = NativeSource(path)  # config, tokenizer and step number come from the native side
            src = ZeroSource(ds, cfg=native.cfg, tokenizer_dir=native.tokenizer_dir, iteration=native.iteration)
            src.manifest = native.manifest
            return _finish_zero(src, heads, preset)
        src = NativeSource(path)
        if ds.is_dir():
            from glmctl.console import log
            log(f"convert: {path} also holds ZeRO shards; converting the native weights (--zero-master "
                "takes the fp32 master weights instead)")
        if heads is not None and heads != src.cfg.num_attention_heads:
            raise UsageError(f"--num-attention-heads {heads}: {path}/config.json says "
                             f"{src.cfg.num_attention_heads}")
        return src
    if kind == "sat":
        src = SatSource(path)
        src.cfg = _sat_config(src, heads, preset)
        return src
    # a DeepSpeed folder: its config lives in the step dir two levels up, when there is one
    step = path.parent.parent if path.parent.name == "trainer" else None
    native = None
    if step is not None and (step / "config.json").exists():
        with contextlib.suppress(InputError):
            native = NativeSource(step)
    src = ZeroSource(path, cfg=native.cfg if native else None,
                     tokenizer_dir=native.tokenizer_dir if native else None,
                     iteration=native.iteration if native else None)
    return _finish_zero(src, heads, preset)


def _sat_config(src: SatSource, heads, preset):
    base = None
    if src.manifest and not preset and heads is None:  # exported by glmctl: the recorded config
        with contextlib.suppress(Exception):
            from glmctl.config import ModelConfig
            base = ModelConfig.from_dict(src.manifest["config"]["model"])
    return src.shapes.model_config(heads=heads, preset=preset, base=base)


def _finish_zero(src: ZeroSource, heads, preset):
    if src.cfg is None:
        src.cfg = src.shapes.model_config(heads=heads, preset=preset)
    src.cfg = src.cfg.replace(tensor_parallel_size=1)
    return src


# =============================================================================================
# The plan: names, what each becomes, and the per-rank output layout, from the shapes alone
# (shape arithmetic, no meta tensors: ops on those import torch._dynamo, seconds per run)
# =============================================================================================
def regroup_shape(shape, in_features, group) -> tuple:
    """Shape of a weight_scale of ``shape`` stored with ``group`` (None: one per row)."""
    return (shape[0],) if group is None else (shape[0], in_features // group)


def split_shape(name, shape, tp) -> tuple:
    from glmctl import tp_layout
    kind = tp_layout.classify(name)
    if tp == 1 or kind == tp_layout.REPLICATED:
        return tuple(shape)
    dim = 1 if kind == tp_layout.ROW else 0
    if len(shape) <= dim or shape[dim] % tp:
        raise tp_layout.LayoutError(f"{name}: dim {dim} of shape {tuple(shape)} does not split into {tp} parts")
    out = list(shape)
    out[dim] //= tp
    return tuple(out)


def canonical_order(names, cfg) -> list[str]:
    """Model order (embedding, layer 0 … N, final LayerNorm); within a layer the GLM module's
    state-dict order; SAT's extra inv_freq after each layer's tensors."""
    model_keys = _model_keys(cfg)
    pos = {}
    for i, k in enumerate(model_keys):
        pos.setdefault(re.sub(r"layers\.\d+\.", "layers.#.", k), i)

    def key(n):
        m = re.match(r"transformer\.layers\.(\d+)\.", n)
        section = 1 if m else (0 if "word_embeddings" in n else 2)
        return (section, int(m.group(1)) if m else 0, pos.get(re.sub(r"layers\.\d+\.", "layers.#.", n), 10**6), n)
    return sorted(names, key=key)


def _model_keys(cfg) -> list[str]:
    from glmctl.checkpoint import build_model
    return list(build_model(cfg.replace(tensor_parallel_size=1), device="meta").state_dict())


def _meta_model_shapes(cfg) -> dict:
    from glmctl.checkpoint import build_model
    return {k: tuple(v.shape) for k, v in build_model(cfg.replace(tensor_parallel_size=1),
                                                      device="meta").state_dict().items()}


class Plan:
    def __init__(self, src: _Source, *, tp_out: int, to: str, dtype, preset=None):
        import torch
        from glmctl import tp_layout
        self.src, self.tp_in, self.tp_out, self.to = src, src.tp, tp_out, to
        cfg = src.cfg
        self.dtype = dtype
        if to not in FORMATS:
            raise UsageError(f"--to {to!r}: choose glmctl or sat")
        for what, n in (("attention heads", cfg.num_attention_heads), ("vocab rows", cfg.vocab_size),
                        ("FFN inner size", cfg.inner_hidden_size), ("hidden size", cfg.hidden_size)):
            if tp_out < 1 or n % tp_out:
                raise UsageError(f"--tp {tp_out}: the {n} {what} do not split over {tp_out} ranks")
        # global shapes from the stored ones, checked against the model the config describes
        self.global_shape = {}
        for n in src.names:
            try:
                if len(set(src.local[n])) != 1:
                    raise tp_layout.LayoutError(f"ranks disagree: {src.local[n]}")
                if src.tp > 1 and n.endswith("weight_scale") and tp_layout.classify(n) == tp_layout.ROW \
                        and len(src.local[n][0]) == 1:
                    raise tp_layout.LayoutError("a per-row scale of a row-parallel layer cannot be merged")
                self.global_shape[n] = tuple(tp_layout.global_shape(n, src.local[n][0], src.tp))
            except tp_layout.LayoutError as e:
                raise InputError(f"{src.path}: {n}: cannot merge the rank shapes ({e})") from None
        expected = _meta_model_shapes(cfg)
        where = f"preset {preset}" if preset else "the model config"
        for n, shape in expected.items():
            if n not in self.global_shape:
                raise InputError(f"{src.path}: missing tensor {n} ({where} needs it)")
            if self.global_shape[n] != shape:
                raise InputError(f"{src.path}: {n} has global shape {list(self.global_shape[n])}, "
                                 f"{where} implies {list(shape)}")
        dropped = [n for n in src.names if n not in expected and not n.endswith(INV_FREQ)]
        if dropped:
            from glmctl.console import warn
            warn(f"{src.path}: dropping {len(dropped)} tensor(s) a GLM does not use, e.g. {dropped[0]}")
        self.names = canonical_order([n for n in src.names if n not in dropped], cfg)
        self.add_inv_freq = []
        if to == "sat" and not any(n.endswith(INV_FREQ) for n in self.names):
            # SAT's loader expects per-layer rotary buffers (spec §6.2): recreate them as SAT computes them.
            self.add_inv_freq = [f"transformer.layers.{i}.attention.{INV_FREQ}" for i in range(cfg.num_layers)]
        # quantization: the group size of the output, chosen so no weight is requantised
        self.group_in = (cfg.quantization or {}).get("group_size")
        self.group_out = self.group_in
        if cfg.quantization:
            self.group_out = self._choose_group()
        q = dict(cfg.quantization, group_size=self.group_out) if cfg.quantization else None
        self.cfg_out = cfg.replace(tensor_parallel_size=tp_out, quantization=q)
        # per-rank output entries (name, shape, dtype), in writing order
        self.entries = [[] for _ in range(tp_out)]
        for n in self.names:
            shape = self.global_shape[n]
            if n.endswith("weight_scale"):
                shape = regroup_shape(shape, self._in_features(n), self.group_out)
            try:
                local = split_shape(n, shape, tp_out)
            except tp_layout.LayoutError as e:
                raise UsageError(f"cannot reshard TP={self.tp_in} -> TP={tp_out}: {e}") from None
            for r in range(tp_out):
                self.entries[r].append((n, local, self._out_dtype(n, src.dtypes[n])))
        self.inv_freq_dtype = self._out_dtype(INV_FREQ, src.cfg_dtype())
        for r in range(tp_out):
            self.entries[r] += [(n, (cfg.head_dim // 2,), self.inv_freq_dtype) for n in self.add_inv_freq]
        self.largest_tensor_bytes = max(math.prod(self.global_shape[n]) * torch.empty(0, dtype=src.dtypes[n])
                                        .element_size() for n in self.names)

    # -- choosing the output group size --------------------------------------------------------
    def _choose_group(self):
        from glmctl import tp_layout
        cfg, tp = self.src.cfg, self.tp_out
        h, f = cfg.hidden_size, cfg.inner_hidden_size
        bits = cfg.quantization["bits"]
        if bits == 4:
            for name, n in (("attention.dense", h), ("dense_4h_to_h", f)):
                if (n // tp) % 2:
                    raise UsageError(f"--tp {tp}: {name} would have {n // tp} input columns per rank; packed INT4 "
                                     "needs an even number, so this checkpoint cannot be resharded without "
                                     "requantising (quantize the fp16 model at this TP)")
        g_in = self.group_in
        widest = math.gcd(h // tp, f // tp)  # the largest group that splits both row-parallel layers
        cands = ([None] if tp == 1 else []) + sorted((g for g in range(1, widest + 1) if widest % g == 0),
                                                     reverse=True)
        scale_names = [n for n in self.src.names if n.endswith("weight_scale")]
        for g in cands:  # the coarsest group size that holds the stored scales exactly
            if not (g == g_in or g_in is None or (g is not None and g_in % g == 0)):
                # merging groups is exact only where the stored scales agree; real group scales
                # fail on the first tensor, so this reads one scale tensor per rejected candidate
                try:
                    for n in scale_names:
                        tp_layout.regroup_scale(n, self._global(n), self._in_features(n), g_in, g)
                except tp_layout.LayoutError:
                    continue
            if g != g_in:
                from glmctl.console import log
                log(f"convert: quantization scales re-expressed from {_gname(g_in)} to {_gname(g)} for TP={tp} "
                    "(exact: the int8 weights are unchanged)")
            return g
        raise UsageError(f"--tp {tp}: the quantization scales ({_gname(g_in)}) cannot be re-expressed for TP={tp} "
                         "without requantising; quantize the fp16 model at this TP")

    def _global(self, n):
        from glmctl import tp_layout
        return tp_layout.merge_tensors(n, [self.src.read(n, r) for r in range(self.tp_in)])

    def _in_features(self, n):
        from glmctl import tp_layout
        return tp_layout.linear_in_features(n, self.src.cfg.hidden_size, self.src.cfg.inner_hidden_size)

    def _out_dtype(self, n, dt):
        import torch
        if self.dtype is None or not dt.is_floating_point or n.endswith("_scale"):
            return dt
        return self.dtype if dt != torch.float64 else dt

    # -- one tensor: source rank tensors -> output rank tensors ----------------------------------
    def produce(self, name, get, free=None):
        """Yields this tensor's output for rank 0 … tp_out-1 (glmctl form, output dtype).

        ``get(r)`` reads source rank r; ``free(r)`` is called once rank r is no longer needed.
        When one TP divides the other, output rank i is cut from source rank i // k or merged
        from source ranks i·k … i·k+k-1 (as GLM-130B's convert_tp.py), so only those are resident;
        otherwise (or when scales are regrouped) through the global tensor.
        """
        from glmctl import tp_layout
        free = free or (lambda r: None)
        tin, tout = self.tp_in, self.tp_out
        regroup = name.endswith("weight_scale") and self.group_in != self.group_out

        def cast(t):
            dt = self._out_dtype(name, t.dtype)
            return t if dt == t.dtype else t.to(dt)
        try:
            if tin == tout and not regroup:
                for r in range(tin):
                    yield cast(get(r))
                    free(r)
            elif tout % tin == 0 and not regroup:  # up: cut each source shard into k
                k = tout // tin
                for r in range(tin):
                    t = get(r)
                    for j in range(k):
                        yield cast(tp_layout.shard_tensor(name, t, k, j))
                    del t
                    free(r)
            elif tin % tout == 0 and not regroup:  # down: merge k source shards
                k = tin // tout
                for i in range(tout):
                    yield cast(tp_layout.merge_tensors(name, [get(r) for r in range(i * k, (i + 1) * k)]))
                    for r in range(i * k, (i + 1) * k):
                        free(r)
            else:
                full = tp_layout.merge_tensors(name, [get(r) for r in range(tin)])
                if regroup:
                    full = tp_layout.regroup_scale(name, full, self._in_features(name), self.group_in,
                                                   self.group_out)
                for r in range(tin):
                    free(r)
                for r in range(tout):
                    yield cast(tp_layout.shard_tensor(name, full, tout, r))
        except tp_layout.LayoutError as e:
            raise UsageError(f"cannot reshard TP={tin} -> TP={tout}: {e}") from None


def _gname(g):
    return "one scale per row" if g is None else f"group size {g}"


# =============================================================================================
# Sinks: per-rank files written tensor by tensor
# =============================================================================================
ST_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
            "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


class SafetensorsFile:
    """One .safetensors file streamed: the header (all names, shapes, dtypes, offsets) first,
    then each tensor's bytes in declaration order. Same bytes as safetensors' own writer lays out."""

    def __init__(self, path: Path, entries, metadata: dict):
        import torch
        self.path, self.entries, self.next = path, list(entries), 0
        header, off = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0
        for name, shape, dtype in self.entries:
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": ST_CODES[str(dtype).replace("torch.", "")], "shape": list(shape),
                            "data_offsets": [off, off + nbytes]}
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)

    def write(self, name, t):
        want, shape, dtype = self.entries[self.next]
        if name != want or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise AssertionError(f"{self.path}: expected {want} {shape} {dtype}, got {name} {tuple(t.shape)} {t.dtype}")
        t = t.detach().contiguous().cpu()
        if t.numel():
            self.f.write(memoryview(t.view(-1).view(__import__("torch").uint8).numpy()))
        self.next += 1

    def close(self):
        assert self.next == len(self.entries), f"{self.path}: {len(self.entries) - self.next} tensors not written"
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


class NativeSink:
    def __init__(self, directory: Path, plan: Plan, max_shard_bytes: int):
        import torch
        from glmctl.checkpoint import shard_filename
        self.dir, self.plan = directory, plan
        tp = plan.tp_out
        self.maps = {}
        self.active = [None] * tp
        self.layout = []
        for r, entries in enumerate(plan.entries):
            parts, cur, size = [], [], 0
            for e in entries:
                nb = math.prod(e[1]) * torch.empty(0, dtype=e[2]).element_size()
                if cur and size + nb > max_shard_bytes:
                    parts.append(cur)
                    cur, size = [], 0
                cur.append(e)
                size += nb
            parts.append(cur)
            self.layout.append([(shard_filename(r, tp, i, len(parts)), p) for i, p in enumerate(parts)])
            self.maps[r] = {e[0]: fn for fn, p in self.layout[-1] for e in p}
        self.cursor = [0] * tp
        self.count = [0] * tp

    def write(self, rank, name, t):
        layout = self.layout[rank]
        if self.active[rank] is None:
            fn, entries = layout[self.cursor[rank]]
            self.active[rank] = SafetensorsFile(self.dir / fn, entries, {"format": "pt", "tp_rank": rank,
                                                                        "tp_size": self.plan.tp_out})
        f = self.active[rank]
        f.write(name, t)
        if f.next == len(f.entries):
            f.close()
            self.active[rank] = None
            self.cursor[rank] += 1

    def close(self):
        from glmctl.artifacts import atomic_write_json
        from glmctl.checkpoint import INDEX
        assert all(a is None for a in self.active)
        atomic_write_json(self.dir / "config.json", self.plan.cfg_out.to_dict())
        if any(len(parts) > 1 for parts in self.layout):
            atomic_write_json(self.dir / INDEX, {"tensor_parallel_size": self.plan.tp_out,
                                                 "weight_map": {str(r): m for r, m in self.maps.items()}})


class SatSink:
    """SAT shards: glmctl group scales become SAT's one scale per output row per rank."""

    def __init__(self, directory: Path, plan: Plan, iteration: str):
        import torch
        from glmctl import sat
        self.dir, self.plan, self.iteration = directory, plan, iteration
        cfg = self.cfg = plan.cfg_out
        self.in_local = lambda n: (plan._in_features(n) // plan.tp_out if _is_row(n) else plan._in_features(n))
        if cfg.quantization:  # scales are small: check every one converts before writing any weight
            for n in plan.names:
                if n.endswith("weight_scale"):
                    for t in plan.produce(n, lambda r, n=n: plan.src.read(n, r)):
                        self.to_sat(n, t)
        (directory / iteration).mkdir(parents=True)
        self.writers = []
        for r, entries in enumerate(plan.entries):
            sat_entries = []
            for n, shape, dt in entries:
                if n.endswith("weight_scale"):
                    shape = regroup_shape(shape, self.in_local(n), None)
                sat_entries.append((n, shape, dt))
            self.writers.append(sat.ShardWriter(directory / iteration / sat.shard_name(r), sat_entries))

    def to_sat(self, name, t):
        from glmctl import tp_layout
        if not name.endswith("weight_scale"):
            return t
        try:
            return tp_layout.regroup_scale(name, t, self.in_local(name), self.plan.group_out, None)
        except tp_layout.LayoutError as e:
            raise UsageError(f"cannot write SAT at TP={self.plan.tp_out} without requantising: {e}; SAT keeps one "
                             "scale per output row per rank (export at the TP the model was quantized for, or "
                             "quantize the fp16 model at this TP)") from None

    def write(self, rank, name, t):
        self.writers[rank].write(name, self.to_sat(name, t))

    def close(self):
        from glmctl import sat
        for w in self.writers:
            w.close()
        sat.write_latest(self.dir, self.iteration)


def _is_row(n):
    from glmctl import tp_layout
    return tp_layout.classify(n) == tp_layout.ROW


def _inv_freq(cfg, dtype):
    import torch
    d = cfg.head_dim
    return (1.0 / (cfg.rotary_base ** (torch.arange(0, d, 2).float() / d))).to(dtype)


def _write_all(plan: Plan, sink, progress) -> None:
    src = plan.src
    for n in plan.names:
        for r, t in enumerate(plan.produce(n, lambda r: src.read(n, r), lambda r: src.release(n, [r]))):
            sink.write(r, n, t)
        progress.update(1)
    for n in plan.add_inv_freq:
        for r in range(plan.tp_out):
            sink.write(r, n, _inv_freq(plan.cfg_out, plan.inv_freq_dtype))
    sink.close()


# =============================================================================================
# Verification
# =============================================================================================
def probe_inputs(cfg, seed: int = 0, length: int = 24):
    """Two probes built like generation inputs (spec §4.3, glmctl.model.masks): random context +
    [gMASK] + <sop> + a few tokens, and random text with a [MASK] in the middle + <sop> + a span.
    Returns {name: (tokens [1,s], positions [1,s], mask [1,1,s,s])}."""
    import torch
    from glmctl.model import masks
    ids = cfg.special_token_ids()
    special = torch.tensor(sorted(v for v in ids.values() if 0 <= v < cfg.vocab_size), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    length = max(8, min(length, cfg.max_sequence_length - 8))

    def rand(k):
        out = []
        while len(out) < k:
            cand = torch.randint(0, cfg.vocab_size, (2 * k + 4,), generator=g)
            out += [int(c) for c in cand if not bool((special == c).any())]
        return out[:k]

    probes = {}
    for name, context in (("[gMASK]", rand(length) + [ids["[gMASK]"]]),
                          ("[MASK]", rand(length // 2) + [ids["[MASK]"]] + rand(length - length // 2))):
        tokens, positions, prefix_len, _, gen_position = masks.generation_input(context, ids)
        extra = rand(6)
        tokens = tokens + extra
        positions = positions + [gen_position(k) for k in range(1, len(extra) + 1)]
        probes[name] = (torch.tensor([tokens]), torch.tensor([positions]),
                        masks.prefix_lm_mask(len(tokens), prefix_len))
    return probes


def model_from_source(src: _Source):
    """The source as one TP=1 model in fp32 (quantized weights stay int8), via the tp_layout merge."""
    import torch
    from glmctl import tp_layout
    from glmctl.checkpoint import build_model
    cfg = src.cfg.replace(tensor_parallel_size=1)
    model = build_model(cfg, dtype=torch.float32, device="meta")
    expected = model.state_dict()
    sd = {}
    for n in expected:
        t = tp_layout.merge_tensors(n, [src.read(n, r) for r in range(src.tp)])
        if t.is_floating_point() and not n.endswith("_scale"):
            t = t.float()
        sd[n] = t
        src.release(n)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def logits_of(model, probes) -> dict:
    import torch
    with torch.no_grad():
        return {k: model(tok, pos, mask).float() for k, (tok, pos, mask) in probes.items()}


def auto_tolerance(src_dtype, out_dtype) -> float:
    """Relative to max(1, max |source logit|): identical weights give ~0 (the models run the
    same fp32 code); a narrower output dtype rounds every weight."""
    import torch
    bits = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
    if bits.get(out_dtype, 23) >= bits.get(src_dtype, 23):
        return 1e-4
    return {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(out_dtype, 1e-3)


def fits_in_memory(nbytes_fp32: int) -> tuple[bool, int]:
    avail = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    if avail is None:
        return True, 0
    return nbytes_fp32 * 2 < avail, avail


def fp32_bytes(src: _Source) -> int:
    import torch
    total = 0
    for n in src.names:
        dt = src.dtypes[n]
        el = 4 if dt.is_floating_point and not n.endswith("_scale") else torch.empty(0, dtype=dt).element_size()
        total += sum(math.prod(s) for s in src.local[n]) * el
    return total


# =============================================================================================
# run
# =============================================================================================
def run(config: ConvertConfig, *, on_written=None) -> dict:
    """Convert ``config.src`` into ``config.out``; returns the summary (also in the manifest).

    ``on_written(tmp_dir)`` is called after the files are written and before verification
    (tests use it to damage a tensor and check that verification catches it).
    """
    import torch
    from glmctl.artifacts import MANIFEST, ArtifactWriter, atomic_write_json, is_up_to_date
    from glmctl.checkpoint import DEFAULT_MAX_SHARD_BYTES, copy_tokenizer, parse_dtype
    from glmctl.console import human_bytes, log, parse_size, progress
    src_path, out = Path(config.src), Path(config.out)
    if config.to not in FORMATS:
        raise UsageError(f"--to {config.to!r}: choose glmctl or sat")
    if config.num_attention_heads is not None and config.num_attention_heads < 1:
        raise UsageError("--num-attention-heads must be positive")
    dtype = parse_dtype(config.dtype)
    if out.resolve() == src_path.resolve():
        raise UsageError("OUT must differ from SRC")
    max_shard = parse_size(config.max_shard_size) if config.max_shard_size else DEFAULT_MAX_SHARD_BYTES
    run_cfg = {"convert": {k: v for k, v in asdict(config).items() if k not in ("src", "out", "if_stale")}}

    src = open_source(src_path, heads=config.num_attention_heads, preset=config.preset,
                      zero_master=config.zero_master)
    tp_out = config.tp or src.tp
    plan = Plan(src, tp_out=tp_out, to=config.to, dtype=dtype, preset=config.preset)
    tok_dir = Path(config.tokenizer) if config.tokenizer else src.tokenizer_dir
    if config.tokenizer:
        plan.cfg_out = _apply_tokenizer(plan.cfg_out, Path(config.tokenizer))
    iteration = config.iteration or (src.iteration if src.iteration is not None else "release")
    log(f"convert: {src.label}, TP={src.tp} -> {config.to} TP={tp_out}, {len(plan.names)} tensors, "
        f"{human_bytes(src.bytes())}; largest tensor {human_bytes(plan.largest_tensor_bytes)}")

    verify = config.verify
    need = max(fp32_bytes(src), 1)
    if verify is None:
        verify, avail = fits_in_memory(need)
        if not verify:
            log(f"convert: not verifying: a TP=1 fp32 model needs {human_bytes(need)}, "
                f"{human_bytes(avail)} available (--verify forces it)")

    summary = {"source_format": src.kind, "source": str(src.path), "source_tp": src.tp, "tp": tp_out,
               "format": config.to, "tensors": len(plan.names) + len(plan.add_inv_freq),
               "quantization": plan.cfg_out.quantization, "largest_tensor_bytes": plan.largest_tensor_bytes}
    config_doc = {"model": plan.cfg_out.to_dict(), **run_cfg,
                  "source": {"format": src.kind, "tensor_parallel_size": src.tp, "iteration": src.iteration}}
    if config.if_stale and is_up_to_date(out, "convert", config_doc, [src_path]):
        log(f"convert: {out} is up to date")
        return {"up_to_date": True, "out": str(out)}
    with ArtifactWriter(out, stage="convert", config=config_doc, inputs=[src_path]) as w:
        if config.to == "sat":
            sink = SatSink(w.path, plan, str(iteration))
            summary["iteration"] = str(iteration)
        else:
            sink = NativeSink(w.path, plan, max_shard)
        with progress(len(plan.names), "convert", unit="tensors") as bar:
            _write_all(plan, sink, bar)
        if tok_dir is not None:
            copy_tokenizer(tok_dir, w.path)
        elif config.to == "glmctl":
            from glmctl.console import warn
            warn(f"{out}: no tokenizer attached (the source carries none); pass --tokenizer DIR")
        if on_written is not None:
            on_written(w.path)
        if verify:
            # a provisional manifest so the standard loader accepts the directory; the real one
            # (with the verification result) replaces it when the writer finishes
            atomic_write_json(w.path / MANIFEST, {"status": "complete", "stage": "convert", "provisional": True})
            summary["verify"] = _verify(src, plan, w.path, config)
            (w.path / MANIFEST).unlink()
        w.summary.update(summary)
    src.close()
    summary["out"] = str(out)
    return summary


def _verify(src, plan, out_dir: Path, config) -> dict:
    import torch
    from glmctl.console import log
    probes = probe_inputs(src.cfg, config.seed)
    ref = logits_of(model_from_source(src), probes)
    if plan.to == "sat":
        res_src = SatSource(out_dir)
        res_src.cfg = res_src.shapes.model_config(base=src.cfg)
        model = model_from_source(res_src)
    else:
        from glmctl.checkpoint import load_model
        model = load_model(out_dir, dtype=torch.float32)
    got = logits_of(model, probes)
    del model
    scale = max(1.0, max(float(v.abs().max()) for v in ref.values()))
    src_dt, out_dt = src.cfg_dtype(), plan._out_dtype("x.weight", src.cfg_dtype())
    tol = config.tolerance if config.tolerance is not None else auto_tolerance(src_dt, out_dt) * scale
    diffs = {k: float((ref[k] - got[k]).abs().max()) for k in ref}
    worst = max(diffs.values())
    detail = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
    if not math.isfinite(worst) or worst > tol:
        raise GlmctlError(f"verification failed: max logit difference {worst:.4g} > tolerance {tol:.3g} "
                          f"({detail}); the output was removed")
    log(f"convert: verified: max logit difference {worst:.3g} ({detail}), tolerance {tol:.3g}")
    return {"max_logit_diff": worst, "per_mask": diffs, "tolerance": tol, "probe_tokens": {
        k: int(v[0].shape[1]) for k, v in probes.items()}}


def _apply_tokenizer(cfg, tok_dir: Path):
    try:
        from glmctl.tokenizer import Tokenizer
    except ImportError:
        from glmctl.console import warn
        warn(f"glmctl.tokenizer unavailable: attaching {tok_dir} without checking its vocabulary")
        return cfg
    try:
        over = Tokenizer.load(tok_dir).config_overrides()
    except GlmctlError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken tokenizer dir is bad input
        raise InputError(f"{tok_dir}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    if over.get("vocab_size", cfg.vocab_size) != cfg.vocab_size:
        raise InputError(f"{tok_dir}: the tokenizer's padded vocabulary is {over['vocab_size']} but the model's "
                         f"embedding has {cfg.vocab_size} rows")
    ids = {k: v for k, v in over.items() if k.endswith("_token_id")}
    return cfg.replace(**ids)


# =============================================================================================
# describe (for `glmctl inspect`)
# =============================================================================================
def describe_checkpoint(path) -> dict:
    """Facts about any checkpoint convert reads: format, iteration, TP size, quantization, config
    (inferred from shapes for SAT) and one row per stored tensor (name, rank, shape, dtype)."""
    path = Path(path)
    kind, path = detect(path)
    if kind == "run":
        steps = _run_steps(path)
        latest = (path / "latest").read_text().strip() if (path / "latest").is_file() else None
        info = {"format": "pretrain-run", "path": str(path), "latest": latest,
                "steps": [{"name": s, "complete": (path / s / "manifest.json").exists(),
                           "deepspeed": (path / s / "trainer" / "deepspeed").is_dir()} for s in steps]}
        step = resolve_run(path)
        inner = describe_checkpoint(step)
        info.update({k: v for k, v in inner.items() if k not in ("format", "path")})
        info["checkpoint"] = str(step)
        return info
    if kind == "glmctl":
        src = NativeSource(path)
        info = _describe_source(src, "glmctl")
        info["trainer"] = {"state": (path / "trainer" / "state.pt").exists(),
                           "deepspeed": (path / "trainer" / "deepspeed").is_dir()}
        info["manifest"] = {k: src.manifest.get(k) for k in ("stage", "glmctl_version", "status", "finished")}
        return info
    if kind == "sat":
        src = SatSource(path)
        with contextlib.suppress(UsageError):
            src.cfg = _sat_config(src, None, None)
        info = _describe_source(src, "sat")
        info["iteration"] = src.iteration
        return info
    tag = (path / "latest").read_text().strip()
    folder = path / tag
    optim = sorted(folder.glob("*optim_states.pt"))
    return {"format": "deepspeed", "path": str(path), "tag": tag, "zero_partitions": len(optim),
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in sorted(folder.glob("*.pt"))]}


def _describe_source(src: _Source, fmt: str) -> dict:
    cfg = getattr(src, "cfg", None)
    shapes = getattr(src, "shapes", None)
    if cfg is not None:
        conf = cfg.to_dict()
    else:  # SAT without inv_freq: everything but the head count
        conf = {"num_layers": len(shapes.layers), "hidden_size": shapes.hidden, "inner_hidden_size": shapes.inner,
                "vocab_size": shapes.vocab, "num_attention_heads": None}
    quant = cfg.quantization if cfg is not None else (
        {"bits": shapes.bits, "group_size": shapes.sat_group(), "method": "rtn"} if shapes.quantized else None)
    params = 0
    for n in src.names:
        if not n.endswith(("_scale", INV_FREQ)):
            from glmctl import tp_layout
            shape = tp_layout.global_shape(n, src.local[n][0], src.tp)
            k = math.prod(shape)
            if quant and quant["bits"] == 4 and src.dtypes[n] == __import__("torch").int8:
                k *= 2
            params += k
    raw_local = getattr(src, "raw_local", src.local)
    raw_dtypes = getattr(src, "raw_dtypes", src.dtypes)
    return {"format": fmt, "path": str(src.path), "tensor_parallel_size": src.tp, "quantization": quant,
            "dtype": str(src.cfg_dtype()).replace("torch.", ""), "parameters": params,
            "bytes": src.bytes(), "tensor_count": len(src.names),
            "tokenizer": src.tokenizer_dir is not None, "config": conf,
            "tensors": [{"name": n, "rank": r, "shape": list(raw_local[n][r]),
                         "dtype": str(raw_dtypes[n]).replace("torch.", "")}
                        for n in (canonical_order(src.names, cfg) if cfg is not None else src.names)
                        for r in range(src.tp)]}
