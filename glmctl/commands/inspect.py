"""`glmctl plan` and `glmctl inspect`: look at a configuration or a checkpoint without running it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from glmctl.artifacts import read_manifest
from glmctl.checkpoint import tensor_table
from glmctl.errors import EXIT_CODES_HELP
from glmctl.config import ModelConfig, get_preset
from glmctl.console import emit_json, human_bytes, parse_size, print_table
from glmctl.errors import UsageError
from glmctl.formats import describe_checkpoint
from glmctl.formats.hf import is_hf_export
from glmctl.planning import plan


def register(app: typer.Typer) -> None:
    app.command("plan", epilog="Example: glmctl plan --preset glm-130b --bits 4 --tp 4 --gpu-memory 24GiB\n\n"
                + EXIT_CODES_HELP)(plan_cmd)
    app.command("inspect", epilog="Example: glmctl inspect run/final --json\n\n" + EXIT_CODES_HELP)(inspect_cmd)


def plan_cmd(
    preset: Optional[str] = typer.Option(None, help="Named configuration (tiny, small, medium, glm-110m ... glm-130b)."),
    model_config: Optional[Path] = typer.Option(None, help="A config.json or checkpoint directory instead of a preset."),
    bits: int = typer.Option(16, help="Weight precision to plan for: 16 (fp16), 8 or 4."),
    tp: int = typer.Option(1, help="Tensor-parallel size (number of GPUs)."),
    gpu_memory: Optional[str] = typer.Option(None, help="Memory of one GPU, e.g. 24GiB; prints whether it fits."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens of KV cache per sequence (default: max length)."),
    batch_size: int = typer.Option(1, help="Sequences decoded at once."),
    group_size: Optional[int] = typer.Option(None, help="Quantization group size (default: one scale per row)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
):
    """Memory plan: parameters, weight memory at fp16/int8/int4, KV cache, per-GPU need at a TP size."""
    if bits not in (16, 8, 4):
        raise UsageError(f"--bits must be 16, 8 or 4, got {bits}")
    if (preset is None) == (model_config is None):
        raise UsageError("give exactly one of --preset or --model-config")
    cfg = get_preset(preset) if preset else ModelConfig.load(model_config)
    if cfg.num_attention_heads % tp or cfg.vocab_size % tp:
        raise UsageError(f"--tp {tp} does not divide the heads ({cfg.num_attention_heads}) "
                         f"and vocab ({cfg.vocab_size})")
    mem = parse_size(gpu_memory) if gpu_memory else None
    p = plan(cfg, None if bits == 16 else bits, tp, mem, seq_len, batch_size, group_size)
    if json_out:
        emit_json(p)
        return
    g = lambda n: f"{n / 1e9:.1f} GB ({human_bytes(n)})"  # noqa: E731
    rows = [["parameters", f"{p['parameters']:,} ({p['parameters'] / 1e9:.2f} B)"],
            ["weights fp16", g(p["weight_bytes"]["fp16"])],
            ["weights int8", g(p["weight_bytes"]["int8"])],
            ["weights int4", g(p["weight_bytes"]["int4"])],
            ["KV cache per token (fp16)", f"{p['kv_cache_bytes_per_token'] / 1e6:.2f} MB"],
            [f"KV cache, {batch_size} x {p['seq_len']} tokens", g(p["kv_cache_bytes"])],
            [f"per GPU at TP={tp}, {p['precision']}: weights", g(p["per_gpu"]["weights"])],
            ["  + KV cache", g(p["per_gpu"]["kv_cache"])],
            ["  + activations (logits, FFN)", g(p["per_gpu"]["activations"])],
            ["  + runtime reserve", g(p["per_gpu"]["reserve"])],
            ["  = total per GPU", g(p["per_gpu"]["total"])]]
    if mem is not None:
        rows.append([f"fits {tp} x {gpu_memory}", "yes" if p["fits"] else "NO"])
    print_table(f"plan: {preset or model_config}", ["quantity", "value"], rows)


def inspect_cmd(
    path: Path = typer.Argument(..., help="A checkpoint directory (native, pretrain run or step, or SAT)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document."),
    tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="List every tensor."),
):
    """Print a checkpoint's config, tensor table (name, shape, dtype), parameter count and manifest."""
    info = describe(path)
    if json_out:
        emit_json(info)
        return
    print_table(f"{path}: {info['format']} checkpoint", ["field", "value"],
                [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                 for k, v in info.items() if k not in ("tensors", "config", "manifest")])
    if info.get("config"):
        print_table("config", ["field", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                                    for k, v in info["config"].items()])
    if info.get("manifest"):
        print_table("manifest", ["field", "value"], [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                                                      for k, v in info["manifest"].items()])
    if tensors and info.get("tensors"):
        print_table("tensors", ["name", "rank", "shape", "dtype"],
                    [[t["name"], t["rank"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"]]
                     for t in info["tensors"]])


def describe(path: Path) -> dict:
    """Facts about a native checkpoint; other formats (SAT, pretrain runs, DeepSpeed) by glmctl.formats."""
    path = Path(path)
    if not (path / "config.json").exists() or is_hf_export(path):  # a transformers export: glmctl.formats
        return describe_checkpoint(path)
    manifest = read_manifest(path)
    cfg = ModelConfig.load(path)
    rows = tensor_table(path)
    return {
        "format": "glmctl",
        "path": str(path),
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "quantization": cfg.quantization,
        "parameters": cfg.num_parameters(),
        "tensor_count": len(rows),
        "tokenizer": (path / "tokenizer.model").exists(),
        "config": cfg.to_dict(),
        "manifest": {k: manifest.get(k) for k in ("stage", "glmctl_version", "status", "started", "finished",
                                                   "config_hash", "summary")},
        "tensors": [{"name": n, "rank": r, "shape": list(s), "dtype": d} for n, r, s, d in rows],
    }
