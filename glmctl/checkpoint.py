"""Native checkpoints: config.json + safetensors per tensor-parallel rank + tokenizer + manifest.json.

    model/
      config.json                      ModelConfig (tensor_parallel_size, quantization block)
      model.safetensors                TP = 1
      model-tp00-of-02.safetensors     TP > 1, one per rank (rank-local shapes, docs/glm130b.md §6.3)
      model.safetensors.index.json     only when a rank's weights are split into several files
      tokenizer.model, tokenizer.json  copied in when known, so a checkpoint is self-contained
      manifest.json                    written last

``save_model`` and ``load_model`` are the one way weights are written and read. A checkpoint
saved at TP=k loads at any TP: each rank reads only the bytes of its own slices
(``CheckpointReader``: its own file at the stored TP; rows/columns of one or more stored files
otherwise), straight onto its device one tensor at a time.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
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
from glmctl.model.glm import GLMBlock
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


def split_by_size(items: list, max_bytes: int, nbytes) -> list[list]:
    """``items`` cut, in order, into runs of at most ``max_bytes`` (``nbytes(item)`` each); an item
    larger than that gets a run of its own. How every writer splits a rank into shard files."""
    parts, cur, size = [], [], 0
    for item in items:
        nb = nbytes(item)
        if cur and size + nb > max_bytes:
            parts.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += nb
    parts.append(cur)
    return parts


def write_rank_files(directory: Path, sd: dict, rank: int, tp: int,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict[str, str]:
    """Write one rank's state dict; returns {tensor name: file name}."""
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    parts = [dict(p) for p in split_by_size(list(sd.items()), max_shard_bytes,
                                            lambda kv: kv[1].numel() * kv[1].element_size())]
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


class CheckpointReader:
    """A native checkpoint read by slices: the safetensors headers are parsed up front and each
    read is ``os.preadv`` of exactly the bytes a rank needs (no mmap, no whole shard), so a rank
    of a TP=8 checkpoint loaded at TP=4 reads its own rows/columns from two stored files and
    nothing else. ``bytes_read`` counts what was read. ``require_manifest=False`` reads a
    directory still being written (a stage's own output before its manifest)."""

    def __init__(self, path: str | Path, *, require_manifest: bool = True):
        self.path = Path(path)
        if require_manifest:
            read_manifest(self.path)
        self.cfg = ModelConfig.load(self.path)
        self.tp = self.cfg.tensor_parallel_size
        files = rank_files(self.path, self.cfg)
        if sorted(files) != list(range(self.tp)):
            raise InputError(f"{self.path}: config.json says TP={self.tp} but the files hold ranks {sorted(files)}")
        # entries[rank][name] = (file, absolute byte offset, local shape, dtype)
        self.entries: list[dict] = []
        for rank in range(self.tp):
            ent = {}
            for fname in files[rank]:
                ent.update(_safetensors_header(self.path / fname))
            self.entries.append(ent)
        self.names = list(self.entries[0])
        for r, ent in enumerate(self.entries[1:], start=1):
            if set(ent) != set(self.names):
                missing = sorted(set(self.names) ^ set(ent))[0]
                raise InputError(f"{self.path}: rank {r} and rank 0 hold different tensors (e.g. {missing})")
        self.dtypes = {n: self.entries[0][n][3] for n in self.names}
        self.bytes_read = 0

    def check_model(self) -> None:
        """The stored tensors are those config.json describes, at their global shapes (InputError)."""
        expected = build_model(self.cfg.replace(tensor_parallel_size=1), device="meta").state_dict()
        for n, t in expected.items():
            if n not in self.dtypes:
                raise InputError(f"{self.path}: missing tensor {n} (checkpoint does not match its config.json)")
            if self.global_shape(n) != tuple(t.shape):
                raise InputError(f"{self.path}: tensor {n} has shape {self.global_shape(n)}, config.json implies "
                                 f"{tuple(t.shape)}")
        extra = sorted(n for n in set(self.names) - set(expected) if not n.endswith("rotary_emb.inv_freq"))
        if extra:  # SAT's rotary buffers are recomputed (model_from_state_dict drops them)
            raise InputError(f"{self.path}: unexpected tensor {extra[0]} (checkpoint does not match its config.json)")

    def global_shape(self, name: str) -> tuple:
        try:
            return tp_layout.global_shape(name, self.entries[0][name][2], self.tp)
        except KeyError:
            raise InputError(f"{self.path}: no tensor {name}") from None

    def local_shape(self, name: str, tp_out: int) -> tuple:
        shape = list(self.global_shape(name))
        dim, ranges = tp_layout.rank_ranges(name, tuple(shape), tp_out, 0)
        if dim is not None:
            shape[dim] = sum(b - a for a, b in ranges)
        return tuple(shape)

    def read(self, name: str, tp_out: int | None = None, rank: int = 0) -> torch.Tensor:
        """Tensor ``name`` as rank ``rank`` of ``tp_out`` (default: as stored) holds it."""
        tp_out = self.tp if tp_out is None else tp_out
        if tp_out == self.tp:
            return self._read_local(rank, name, None, None)
        gshape = self.global_shape(name)
        kind = tp_layout.classify(name)
        if kind == tp_layout.REPLICATED:  # every rank stores it: rank 0's copy
            return self._read_local(0, name, None, None)
        try:
            dim, ranges = tp_layout.rank_ranges(name, gshape, tp_out, rank)
            if dim is None:  # tp_out == 1: the global tensor, merged from the stored ranks
                dim = 1 if kind == tp_layout.ROW else 0
                ranges = [(0, gshape[dim])]
            parts = [self._read_local(s, name, dim, (a, b))
                     for start, stop in ranges for s, a, b in tp_layout.locate(name, gshape, self.tp, start, stop)]
        except tp_layout.LayoutError as e:
            raise InputError(f"{self.path}: cannot reshard {name} from TP={self.tp} to TP={tp_out}: {e}") from None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def _read_local(self, rank: int, name: str, dim, span) -> torch.Tensor:
        """Stored rank ``rank``'s tensor, or its [a, b) range along ``dim``."""
        f, offset, shape, dtype = self.entries[rank][name]
        el = _element_size(dtype)
        shape = list(shape)
        if dim is None or (span[0] == 0 and span[1] == shape[dim]):
            runs = [(offset, math.prod(shape) * el)]
        elif dim == 0:
            row = math.prod(shape[1:]) * el
            runs = [(offset + span[0] * row, (span[1] - span[0]) * row)]
            shape[0] = span[1] - span[0]
        else:  # dim 1 of a 2-D tensor: one run per row
            n, k = shape
            w = (span[1] - span[0]) * el
            runs = [(offset + (i * k + span[0]) * el, w) for i in range(n)]
            shape[1] = span[1] - span[0]
        total = sum(n for _, n in runs)
        buf = torch.empty(total, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd = os.open(f, os.O_RDONLY)
        try:
            pos = 0
            for off, n in runs:
                while n:
                    got = os.preadv(fd, [view[pos:pos + n]], off)
                    if got <= 0:
                        raise InputError(f"{f}: damaged safetensors file (truncated in {name})")
                    pos, off, n = pos + got, off + got, n - got
        finally:
            os.close(fd)
        self.bytes_read += total
        return buf.view(dtype).reshape(shape) if total else torch.empty(shape, dtype=dtype)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _safetensors_header(f: Path) -> dict:
    """{name: (file, absolute data offset, shape, dtype)} from a .safetensors header."""
    if not f.exists():
        raise InputError(f"{f}: missing checkpoint file")
    try:
        size = f.stat().st_size
        with open(f, "rb") as h:
            (n,) = struct.unpack("<Q", h.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(h.read(n))
        out = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            a, b = e["data_offsets"]
            dtype = _ST_DTYPES[e["dtype"]]
            if b - a != math.prod(e["shape"]) * _element_size(dtype) or 8 + n + b > size:
                raise ValueError(f"tensor {name} lies outside the file")
            out[name] = (f, 8 + n + a, tuple(e["shape"]), dtype)
        return out
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise InputError(f"{f}: damaged safetensors file ({str(e).splitlines()[0]})") from None


def read_state_dict(path: str | Path, tp_out: int = 1, rank: int = 0) -> tuple[ModelConfig, dict]:
    """The state dict of ``rank`` at tensor-parallel size ``tp_out``: only the slices that rank
    holds are read (CheckpointReader), never whole shards of another TP."""
    reader = CheckpointReader(path)
    return reader.cfg.replace(tensor_parallel_size=tp_out), {n: reader.read(n, tp_out, rank) for n in reader.names}


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
    return _assign(build_model(cfg, dtype=dtype, device="meta"), sd, dtype, device, where)


def layer_from_state_dict(cfg: ModelConfig, index: int, sd: dict, dtype=None, device=None,
                          where: str = "checkpoint"):
    """Block ``index`` of the GLM ``cfg`` alone (what a layer-by-layer pass builds, one at a time),
    from its tensors named without the ``transformer.layers.N.`` prefix; the same checks and
    casts as ``model_from_state_dict`` (which, given a config with ``num_layers=0``, builds the
    other end of such a pass: embedding, final LayerNorm and the tied output)."""
    dtype = parse_dtype(dtype) or stored_dtype({k: v.dtype for k, v in sd.items()})
    return _assign(GLMBlock(cfg, index, device="meta", dtype=dtype), sd, dtype, device, where)


def _assign(module, sd: dict, dtype, device, where: str):
    expected = module.state_dict()
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
    module.load_state_dict(sd, strict=True, assign=True)
    if device is not None:
        module = module.to(device)
    return module.eval()


def load_model(path: str | Path, dtype=None, device=None) -> GLM:
    """Load a native checkpoint for the current tensor-parallel layout (glmctl.model.parallel).

    dtype: torch dtype or 'fp32'/'bf16'/'fp16' for the float tensors (default: as stored);
    int8 quantized weights stay int8. Each tensor is read as this rank's slice (only its bytes),
    cast and moved to ``device`` on its own, so the host holds one tensor at a time, not a
    second copy of the model. Load time, bytes read and peak host/device memory: ``LOAD_STATS``.
    """
    t0 = time.perf_counter()
    reader = CheckpointReader(path)
    tp_out, rank = tp.tp_size(), tp.tp_rank()
    dtype = parse_dtype(dtype) or stored_dtype(reader.dtypes)
    sd = {}
    for name in reader.names:
        t = reader.read(name, tp_out, rank)
        if is_float_weight(name, t) and t.dtype != dtype:
            t = t.to(dtype)
        sd[name] = t if device is None else t.to(device)
    model = model_from_state_dict(reader.cfg.replace(tensor_parallel_size=tp_out), sd, dtype, device,
                                  where=str(path))
    LOAD_STATS.clear()
    LOAD_STATS.update(memory_stats(device), path=str(path), rank=rank, tp=tp_out, seconds=time.perf_counter() - t0,
                      bytes_read=reader.bytes_read, stored_tp=reader.tp)
    return model


# What the last load_model did: path, rank, tp, seconds, bytes_read, peak_rss_bytes, peak_device_bytes.
LOAD_STATS: dict = {}


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (VmHWM), or None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_stats(device=None) -> dict:
    """{'peak_rss_bytes': VmHWM, 'peak_device_bytes': CUDA peak allocated (None off CUDA)}."""
    dev = None if device is None else torch.device(device)
    peak_dev = torch.cuda.max_memory_allocated(dev) if dev is not None and dev.type == "cuda" else None
    return {"peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_dev}
