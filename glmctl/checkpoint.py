"""Native checkpoints: config.json + safetensors per tensor-parallel rank + tokenizer + manifest.json.

    model/
      config.json                      ModelConfig (tensor_parallel_size, quantization block)
      model.safetensors                TP = 1
      model-tp00-of-02.safetensors     TP > 1, one per rank (rank-local shapes, docs/glm130b.md §6.3)
      model.safetensors.index.json     only when a rank's weights are split into several files
      tokenizer.model, tokenizer.json  copied in when known, so a checkpoint is self-contained
      manifest.json                    written last

``save_model`` and ``load_model`` are the one way weights are written and read. A checkpoint
saved at TP=k loads at TP=k under torchrun (each rank reads its file) and at TP=1 in one
process (the shards are merged on load); any other TP is resharded on load in memory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from glmctl.artifacts import ArtifactWriter, atomic_write_json, read_manifest
from glmctl import tp_layout
from glmctl.config import ModelConfig
from glmctl.errors import InputError
from glmctl.model import GLM
from glmctl.model import parallel as tp

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
DEFAULT_MAX_SHARD_BYTES = 10 * 2**30

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(d) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise InputError(f"unknown dtype {d!r}; choose fp32, bf16 or fp16")
    return DTYPES[d]


def shard_filename(rank: int, tp: int, part: int = 0, parts: int = 1) -> str:
    base = "model" if tp == 1 else f"model-tp{rank:02d}-of-{tp:02d}"
    if parts > 1:
        base += f"-{part + 1:05d}-of-{parts:05d}"
    return base + ".safetensors"


def _split_by_size(sd: dict, max_bytes: int) -> list[dict]:
    parts, cur, size = [], {}, 0
    for k, v in sd.items():
        nb = v.numel() * v.element_size()
        if cur and size + nb > max_bytes:
            parts.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nb
    parts.append(cur)
    return parts


def write_rank_files(directory: Path, sd: dict, rank: int, tp: int,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, str]:
    """Write one rank's state dict; returns {tensor name: file name}."""
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    parts = _split_by_size(sd, max_shard_bytes)
    weight_map = {}
    for i, part in enumerate(parts):
        fname = shard_filename(rank, tp, i, len(parts))
        save_file(part, str(directory / fname), metadata={"format": "pt", "tp_rank": str(rank), "tp_size": str(tp)})
        weight_map.update({k: fname for k in part})
    return weight_map


def copy_tokenizer(src: str | Path | None, dst: Path) -> None:
    if src is None:
        return
    src = Path(src)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def save_model(model, path: str | Path, tokenizer: str | Path | None = None, *, stage: str = "model",
               config_extra: dict | None = None, inputs: list | None = None, summary: dict | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, write_extra=None,
               status: str = "complete") -> Path:
    """Save ``model`` (a GLM) as a native checkpoint at ``path``, atomically.

    Under tensor parallelism every rank of the TP group calls this; each writes its own file and
    rank 0 writes config.json, the tokenizer and the manifest once all files are complete.
    ``write_extra(directory)`` (every rank) adds files (e.g. trainer state) before the manifest.
    ``status`` goes into the manifest ("failed-gate": complete and readable, but a quality gate tripped).
    """
    path = Path(path)
    tp_size, rank = tp.tp_size(), tp.tp_rank()
    cfg: ModelConfig = model.config.replace(tensor_parallel_size=tp_size)
    sd = {k: v for k, v in model.state_dict().items()}
    run_cfg = {"model": cfg.to_dict(), **(config_extra or {})}
    if tp_size == 1:
        with ArtifactWriter(path, stage=stage, config=run_cfg, inputs=inputs) as w:
            w.status = status
            wm = write_rank_files(w.path, sd, 0, 1, max_shard_bytes)
            _finish_files(w.path, cfg, {0: wm}, tokenizer)
            if write_extra is not None:
                write_extra(w.path)
            w.summary.update(summary or {})
        return path
    tmp = path.with_name(f".{path.name}.tmp-tp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=tp.tp_group())
    wm = write_rank_files(tmp, sd, rank, tp_size, max_shard_bytes)
    if write_extra is not None:
        write_extra(tmp)
    maps = [None] * tp_size
    dist.all_gather_object(maps, wm, group=tp.tp_group())
    if rank == 0:
        _finish_files(tmp, cfg, dict(enumerate(maps)), tokenizer)
        w = ArtifactWriter(path, stage=stage, config=run_cfg, inputs=inputs, staging=tmp)
        w.status = status
        w.summary.update(summary or {})
        w.finish()
    dist.barrier(group=tp.tp_group())
    return path


def _finish_files(directory: Path, cfg: ModelConfig, maps: dict[int, dict], tokenizer) -> None:
    atomic_write_json(directory / "config.json", cfg.to_dict())
    if any(len(set(m.values())) > 1 for m in maps.values()):
        atomic_write_json(directory / INDEX, {"tensor_parallel_size": cfg.tensor_parallel_size,
                                              "weight_map": {str(r): m for r, m in maps.items()}})
    copy_tokenizer(tokenizer, directory)


# ---- reading --------------------------------------------------------------------------------
def rank_files(path: Path, cfg: ModelConfig) -> dict[int, list[str]]:
    tp = cfg.tensor_parallel_size
    if (path / INDEX).exists():
        try:
            idx = json.loads((path / INDEX).read_text())
            return {int(r): sorted(set(m.values())) for r, m in idx["weight_map"].items()}
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise InputError(f"{path / INDEX}: malformed index ({e})") from None
    return {r: [shard_filename(r, tp)] for r in range(tp)}


def open_safetensors(f: Path):
    """safe_open ``f``, with one clear line for a missing or damaged file."""
    if not f.exists():
        raise InputError(f"{f}: missing checkpoint file")
    try:
        return safe_open(str(f), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{f}: damaged safetensors file ({str(e).splitlines()[0]})") from None


def read_rank(path: Path, cfg: ModelConfig, rank: int) -> dict[str, torch.Tensor]:
    """All tensors of one tensor-parallel rank (as stored)."""
    out = {}
    for fname in rank_files(path, cfg)[rank]:
        f = path / fname
        handle = open_safetensors(f)
        try:
            with handle as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{f}: damaged safetensors file ({str(e).splitlines()[0]})") from None
    return out


def tensor_table(path: Path) -> list[tuple[str, int, tuple, str]]:
    """(name, rank, shape, dtype) of every stored tensor, from the headers only."""
    cfg = ModelConfig.load(path)
    rows = []
    for rank, files in rank_files(path, cfg).items():
        for fname in files:
            with open_safetensors(path / fname) as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    rows.append((k, rank, tuple(sl.get_shape()), str(sl.get_dtype())))
    return rows


def read_state_dict(path: str | Path, tp_out: int = 1, rank: int = 0) -> tuple[ModelConfig, dict]:
    """The state dict of ``rank`` at tensor-parallel size ``tp_out``, resharded from what is stored."""
    path = Path(path)
    read_manifest(path)
    cfg = ModelConfig.load(path)
    tp_in = cfg.tensor_parallel_size
    if tp_in == tp_out:
        return cfg.replace(tensor_parallel_size=tp_out), read_rank(path, cfg, rank)
    shards = [read_rank(path, cfg, r) for r in range(tp_in)]
    names = list(shards[0])
    for r, s in enumerate(shards[1:], start=1):
        if set(s) != set(names):
            missing = sorted(set(names) ^ set(s))[0]
            raise InputError(f"{path}: rank {r} and rank 0 hold different tensors (e.g. {missing})")
    out = {}
    for name in names:
        try:
            full = tp_layout.merge_tensors(name, [s[name] for s in shards])
            out[name] = tp_layout.shard_tensor(name, full, tp_out, rank)
        except (tp_layout.LayoutError, RuntimeError) as e:
            raise InputError(f"{path}: cannot reshard {name} from TP={tp_in} to TP={tp_out}: {e}") from None
    return cfg.replace(tensor_parallel_size=tp_out), out


def build_model(cfg: ModelConfig, dtype=None, device=None) -> GLM:
    """An uninitialised GLM on ``device`` (use 'meta' to build the 130B config in no memory)."""
    return GLM(cfg, device=device, dtype=dtype)


def is_float_weight(name: str, t) -> bool:
    """Floating tensors that follow the model's dtype; quantization scales keep their own."""
    return t.is_floating_point() and not name.endswith("_scale")


def stored_dtype(dtypes: dict) -> torch.dtype:
    """The dtype a checkpoint is stored in, from {name: dtype}: that of its LayerNorms (int8
    weights and quantization scales do not count); fp32 when there is no float tensor."""
    for name, dt in dtypes.items():
        if "layernorm" in name:
            return dt
    return next((dt for name, dt in dtypes.items() if dt.is_floating_point and not name.endswith("_scale")),
                torch.float32)


def model_from_state_dict(cfg: ModelConfig, sd: dict, dtype=None, device=None, where: str = "checkpoint") -> GLM:
    """The one way a GLM is built from weights: on the meta device (no memory), names and shapes
    checked against ``cfg``, float tensors cast to ``dtype`` (default: as stored; int8 weights and
    their scales stay as they are), assigned without a copy, moved to ``device``, in eval mode."""
    dtype = parse_dtype(dtype) or stored_dtype({k: v.dtype for k, v in sd.items()})
    model = build_model(cfg, dtype=dtype, device="meta")
    expected = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # SAT's buffers: recomputed
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise InputError(f"{where}: {what} (checkpoint does not match its config.json)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise InputError(f"{where}: tensor {k} has shape {tuple(v.shape)}, config.json implies "
                             f"{tuple(expected[k].shape)}")
        if is_float_weight(k, v):
            sd[k] = v.to(dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_model(path: str | Path, dtype=None, device=None) -> GLM:
    """Load a native checkpoint for the current tensor-parallel layout (glmctl.model.parallel).

    dtype: torch dtype or 'fp32'/'bf16'/'fp16' for the float tensors (default: as stored);
    int8 quantized weights stay int8. Returns the model in eval mode.
    """
    cfg, sd = read_state_dict(path, tp.tp_size(), tp.tp_rank())
    return model_from_state_dict(cfg, sd, dtype, device, where=str(path))

