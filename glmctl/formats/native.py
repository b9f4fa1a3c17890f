"""Native glmctl checkpoints (glmctl/checkpoint.py's layout) read and written one tensor at a time.

``NativeSource`` reads the safetensors headers up front and each tensor on demand (safe_open per
tensor, so its pages are unmapped again on close). ``NativeSink`` writes per-rank files laid out
from the shapes beforehand (glmctl.formats.safetensors_stream), split at ``max_shard_bytes`` with
model.safetensors.index.json as ``glmctl.checkpoint.save_model`` does.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

from glmctl.artifacts import atomic_write_json, read_manifest
from glmctl.checkpoint import INDEX, TOKENIZER_FILES, open_safetensors, rank_files, shard_filename, split_by_size
from glmctl.config import ModelConfig
from glmctl.errors import InputError
from glmctl.formats.safetensors_stream import SafetensorsFile, dtype_from_code
from glmctl.formats.source import Source, check_same_names, element_size


class NativeSource(Source):
    """A glmctl checkpoint. ``require_manifest=False`` reads a directory still being built
    (convert's verification of its own output, before the manifest is written)."""
    kind = "glmctl"

    def __init__(self, path: Path, *, require_manifest: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(path) if require_manifest else {}
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
                with open_safetensors(path / fname) as h:
                    for k in h.keys():
                        sl = h.get_slice(k)
                        self.files[(k, rank)] = path / fname
                        self.local.setdefault(k, [None] * self.tp)[rank] = tuple(sl.get_shape())
                        self.dtypes[k] = dtype_from_code(sl.get_dtype(), path / fname)
                        seen.add(k)
            per_rank.append(seen)
        check_same_names(per_rank, lambda r: str(path / files[r][0]))
        self.names = list(self.local)
        if any((path / f).exists() for f in TOKENIZER_FILES):
            self.tokenizer_dir = path
        m = re.fullmatch(r"step-0*(\d+)", path.name)
        step = (self.manifest.get("summary") or {}).get("step")  # pretrain records its step (also final/)
        self.iteration = m.group(1) if m else str(step) if isinstance(step, int) else (
            (self.manifest.get("config") or {}).get("source", {}).get("iteration"))

    def read(self, name, rank):
        f = self.files[(name, rank)]
        try:
            with safe_open(str(f), framework="pt") as h:  # opened per tensor: pages are unmapped on close
                return h.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types
            raise InputError(f"{f}: damaged safetensors file ({str(e).splitlines()[0]})") from None


class NativeSink:
    """Per-rank safetensors files of ``cfg`` (at its TP), from ``entries[rank]`` = [(name, shape,
    dtype)] in writing order; ``write(rank, name, tensor)`` in that order, then ``close()``, which
    writes config.json (and the index when a rank has several files)."""

    def __init__(self, directory: Path, cfg: ModelConfig, entries: list[list[tuple]], max_shard_bytes: int):
        self.dir, self.cfg = directory, cfg
        tp = cfg.tensor_parallel_size
        self.maps, self.layout = {}, []
        for r, rank_entries in enumerate(entries):
            parts = split_by_size(rank_entries, max_shard_bytes, lambda e: math.prod(e[1]) * element_size(e[2]))
            self.layout.append([(shard_filename(r, tp, i, len(parts)), p) for i, p in enumerate(parts)])
            self.maps[r] = {e[0]: fn for fn, p in self.layout[-1] for e in p}
        self.active: list[SafetensorsFile | None] = [None] * tp
        self.cursor = [0] * tp

    def write(self, rank: int, name: str, t: torch.Tensor) -> None:
        if self.active[rank] is None:
            fn, entries = self.layout[rank][self.cursor[rank]]
            self.active[rank] = SafetensorsFile(self.dir / fn, entries, {
                "format": "pt", "tp_rank": rank, "tp_size": self.cfg.tensor_parallel_size})
        f = self.active[rank]
        f.write(name, t)
        if f.done:
            f.close()
            self.active[rank] = None
            self.cursor[rank] += 1

    def close(self) -> None:
        assert all(a is None for a in self.active)
        atomic_write_json(self.dir / "config.json", self.cfg.to_dict())
        if any(len(parts) > 1 for parts in self.layout):
            atomic_write_json(self.dir / INDEX, {"tensor_parallel_size": self.cfg.tensor_parallel_size,
                                                 "weight_map": {str(r): m for r, m in self.maps.items()}})
