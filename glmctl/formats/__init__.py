"""Checkpoint formats: each a reader (a ``Source``, glmctl/formats/source.py) and/or a writer.

    kind, path = detect(path)          # glmctl | sat | deepspeed | run (a pretrain run dir) | hf
    src = open_source(path, preset="glm-130b")
    src.cfg, src.tp, src.names, src.read(name, rank)
    describe_checkpoint(path)          # what `glmctl inspect` prints for SAT and run dirs

Modules: native (safetensors per TP rank, glmctl/checkpoint.py's layout), sat (SwissArmyTransformer
pickles, docs/glm130b.md §6.1), deepspeed (ZeRO shards gathered to fp32), hf (a transformers export
with remote code, and its reader), safetensors_stream (a
safetensors file written tensor by tensor), shapes (a config inferred from shapes).
"""
from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import torch

from glmctl import tp_layout
from glmctl.console import log
from glmctl.errors import InputError, UsageError
from glmctl.formats import sat
from glmctl.formats.deepspeed import ZeroSource, tag_folder
from glmctl.formats.hf import HFSource, is_hf_export
from glmctl.formats.native import NativeSource
from glmctl.formats.sat import SatSource
from glmctl.formats.shapes import INV_FREQ, canonical_order
from glmctl.formats.source import Source

__all__ = ["Source", "NativeSource", "SatSource", "ZeroSource", "HFSource", "detect", "resolve_run", "open_source",
           "describe_checkpoint", "run_steps"]


def detect(path: Path) -> tuple[str, Path]:
    """(kind, resolved path): kind in glmctl, sat, deepspeed, run (a pretrain run dir), hf (a
    transformers export written by ``convert --to hf``)."""
    path = Path(path)
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
    if is_hf_export(path):
        return "hf", path
    if (path / "config.json").exists() or (path / "manifest.json").exists():
        return "glmctl", path
    if any(p.is_dir() and any(p.glob("mp_rank_*_model_states.pt")) for p in path.iterdir()):
        sat.read_latest(path)  # raises: missing `latest`, naming the folders found
    if run_steps(path):
        return "run", path
    raise InputError(f"{path}: unknown checkpoint format (expected a glmctl checkpoint with config.json, a SAT "
                     "checkpoint with `latest` and <iteration>/mp_rank_XX_model_states.pt, a pretrain run dir "
                     "or a DeepSpeed checkpoint folder)")


def run_steps(path: Path) -> list[str]:
    """The step folders of a pretrain run dir (step-N and final)."""
    return sorted(p.name for p in path.iterdir() if p.is_dir() and (re.fullmatch(r"step-\d+", p.name)
                                                                    or p.name == "final"))


def resolve_run(path: Path) -> Path:
    """A pretrain run dir's checkpoint: the step named by ``latest``, else final/, else the newest step."""
    latest = path / "latest"
    if latest.is_file():
        step = path / latest.read_text().strip()
        if not step.is_dir():
            raise InputError(f"{latest} names {step.name!r} but {step} does not exist")
        log(f"convert: {path} is a pretrain run; using its latest checkpoint {step.name}")
        return step
    steps = [s for s in run_steps(path) if (path / s / "manifest.json").exists()]
    if not steps:
        raise InputError(f"{path}: pretrain run without a complete checkpoint (no `latest`, no step with a manifest)")
    pick = "final" if "final" in steps else steps[-1]
    log(f"convert: {path} has no `latest`; using {pick}")
    return path / pick


def open_source(path: Path, *, heads: int | None = None, preset: str | None = None,
                zero_master: bool = False) -> Source:
    """The reader for whatever ``path`` holds. ``heads`` / ``preset``: hyperparameters a SAT or
    DeepSpeed checkpoint does not carry; ``zero_master``: a pretrain step's ZeRO fp32 master
    weights instead of its native ones."""
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
            return ZeroSource(ds, cfg=native.cfg, tokenizer_dir=native.tokenizer_dir, iteration=native.iteration,
                              manifest=native.manifest, heads=heads, preset=preset)
        src = NativeSource(path)
        if ds.is_dir():
            log(f"convert: {path} also holds ZeRO shards; converting the native weights (--zero-master "
                "takes the fp32 master weights instead)")
        if heads is not None and heads != src.cfg.num_attention_heads:
            raise UsageError(f"--num-attention-heads {heads}: {path}/config.json says "
                             f"{src.cfg.num_attention_heads}")
        return src
    if kind == "sat":
        return SatSource(path, heads=heads, preset=preset)
    if kind == "hf":
        if zero_master or heads is not None or preset is not None:
            raise UsageError(f"{path} is a transformers export: its config.json gives every hyperparameter "
                             "(--preset, --num-attention-heads and --zero-master do not apply)")
        return HFSource(path)
    # a DeepSpeed folder: its config lives in the step dir two levels up, when there is one
    step = path.parent.parent if path.parent.name == "trainer" else None
    native = None
    if step is not None and (step / "config.json").exists():
        with contextlib.suppress(InputError):
            native = NativeSource(step)
    if native is None:
        return ZeroSource(path, heads=heads, preset=preset)
    return ZeroSource(path, cfg=native.cfg, tokenizer_dir=native.tokenizer_dir, iteration=native.iteration,
                      heads=heads, preset=preset)


# ---- describe (for `glmctl inspect`) --------------------------------------------------------------
def describe_checkpoint(path) -> dict:
    """Facts about any checkpoint convert reads: format, iteration, TP size, quantization, config
    (inferred from shapes for SAT) and one row per stored tensor (name, rank, shape, dtype)."""
    kind, path = detect(Path(path))
    if kind == "run":
        steps = run_steps(path)
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
        info = _describe_source(src)
        info["trainer"] = {"state": (path / "trainer" / "state.pt").exists(),
                           "deepspeed": (path / "trainer" / "deepspeed").is_dir()}
        info["manifest"] = {k: src.manifest.get(k) for k in ("stage", "glmctl_version", "status", "finished")}
        return info
    if kind == "hf":
        with HFSource(path) as src:
            return _describe_source(src)
    if kind == "sat":
        src = SatSource(path, need_config=False)
        info = _describe_source(src)
        info["iteration"] = src.iteration
        return info
    folder = tag_folder(path)
    optim = sorted(folder.glob("*optim_states.pt"))
    return {"format": "deepspeed", "path": str(path), "tag": folder.name, "zero_partitions": len(optim),
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in sorted(folder.glob("*.pt"))]}


def _describe_source(src: NativeSource | SatSource) -> dict:
    cfg = src.cfg
    shapes = getattr(src, "shapes", None)
    conf = cfg.to_dict() if cfg is not None else shapes.summary_config()  # SAT without a head count
    quant = cfg.quantization if cfg is not None else shapes.quantization()
    params = 0
    for n in src.names:
        if not n.endswith(("_scale", INV_FREQ)):
            k = math.prod(tp_layout.global_shape(n, src.local[n][0], src.tp))
            if quant and quant["bits"] == 4 and src.dtypes[n] == torch.int8:
                k *= 2
            params += k
    raw_local = getattr(src, "raw_local", src.local)
    raw_dtypes = getattr(src, "raw_dtypes", src.dtypes)
    return {"format": src.kind, "path": str(src.path), "tensor_parallel_size": src.tp, "quantization": quant,
            "dtype": str(src.stored_dtype()).replace("torch.", ""), "parameters": params,
            "bytes": src.bytes(), "tensor_count": len(src.names),
            "tokenizer": src.tokenizer_dir is not None, "config": conf,
            "tensors": [{"name": n, "rank": r, "shape": list(raw_local[n][r]),
                         "dtype": str(raw_dtypes[n]).replace("torch.", "")}
                        for n in (canonical_order(src.names, cfg) if cfg is not None else src.names)
                        for r in range(src.tp)]}
