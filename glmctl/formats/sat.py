"""SwissArmyTransformer (SAT) checkpoints, the layout GLM-130B ships in (docs/glm130b.md §6.1-6.2).

    ROOT/latest                                    text: the iteration ("49300") or "release"
    ROOT/<iteration>/mp_rank_XX_model_states.pt    one torch pickle per tensor-parallel rank, XX = 00, 01, ...
                                                   {'module': state_dict, ...other entries ignored}

Shards are foreign pickles: they are read with ``torch.load(weights_only=True)`` only (plus
``argparse.Namespace``, which SAT's training code stores and which runs no code), memory-mapped
so tensors page in lazily; anything that needs more is refused with the globals it asks for.
Writing is streamed: ``ShardWriter`` emits the pickle first, then each tensor's bytes as it
arrives, so a 32 GB shard never sits in memory. The file is the one ``torch.save`` writes
(zip of data.pkl + data/<key> records), so SAT, FasterTransformer's converter and torch read it.
``SatSource`` reads a SAT checkpoint through the glmctl.formats ``Source`` interface (SAT's
per-rank row scales re-expressed as group scales) and ``SatSink`` writes one; resharding
lives in glmctl/reshard.py.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import io
import json
import mmap
import pickle
import re
import sys
from pathlib import Path

import torch

from glmctl import tp_layout
from glmctl.artifacts import atomic_write_text
from glmctl.config import ModelConfig
from glmctl.console import warn
from glmctl.errors import InputError, UsageError
from glmctl.formats.shapes import ShapeFacts, regroup_shape
from glmctl.formats.source import Source, check_same_names

SHARD_RE = re.compile(r"^mp_rank_(\d{2})_model_states\.pt$")
# Globals beyond torch's weights_only set that are safe to rebuild: plain attribute bags.
EXTRA_SAFE_GLOBALS = [argparse.Namespace]


def shard_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


def read_latest(root: Path) -> str:
    """The iteration folder named by ROOT/latest, checked to exist."""
    latest = root / "latest"
    if not latest.is_file():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("mp_rank_*_model_states.pt")))
        hint = f"; it should name the iteration folder (found {', '.join(found)}/)" if found else ""
        raise InputError(f"{root}: SAT checkpoint has no `latest` file{hint}")
    it = latest.read_text().strip()
    if not it:
        raise InputError(f"{latest}: empty; it should hold the iteration number or 'release'")
    if not (root / it).is_dir():
        raise InputError(f"{latest} names iteration {it!r} but {root / it} does not exist")
    return it


def looks_like_sat(root: Path) -> bool:
    """ROOT/latest names a folder holding mp_rank_XX files and no DeepSpeed ZeRO optimizer shards."""
    try:
        it = (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False
    d = root / it
    return bool(it) and d.is_dir() and any(d.glob("mp_rank_*_model_states.pt")) \
        and not any(d.glob("*optim_states.pt"))


def shard_files(folder: Path) -> list[Path]:
    """mp_rank_00 ... mp_rank_NN in rank order; a gap in the numbering is an error."""
    ranks = {}
    for p in folder.iterdir():
        m = SHARD_RE.match(p.name)
        if m:
            ranks[int(m.group(1))] = p
    if not ranks:
        raise InputError(f"{folder}: no mp_rank_XX_model_states.pt files")
    missing = [r for r in range(max(ranks) + 1) if r not in ranks]
    if missing:
        raise InputError(f"{folder}: missing rank file {shard_name(missing[0])} "
                         f"(found ranks {', '.join(f'{r:02d}' for r in sorted(ranks))})")
    return [ranks[r] for r in range(len(ranks))]


def load_shard(path: Path, mmap_: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """(the 'module' state dict of one shard, whether its tensors are memory-mapped from the file:
    paged in when touched; False for legacy pre-zip pickles, which are read whole)."""
    if not path.is_file():
        raise InputError(f"{path}: missing rank file")
    try:
        with torch.serialization.safe_globals(EXTRA_SAFE_GLOBALS):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_)
                mapped = mmap_
            except RuntimeError as e:
                if mmap_ and "mmap" in str(e):  # legacy (pre-zip) pickle: cannot be mapped
                    warn(f"{path}: legacy torch format, loading the whole shard into memory")
                    obj = torch.load(path, map_location="cpu", weights_only=True)
                    mapped = False
                else:
                    raise
    except pickle.UnpicklingError as e:
        raise InputError(_refusal(path, e)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict) or "module" not in obj:
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"{path}: no 'module' state dict (found {keys}); not a SAT model shard")
    sd = obj["module"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise InputError(f"{path}: 'module' is not a mapping of tensor names to tensors")
    return dict(sd), mapped


def _refusal(path: Path, err: Exception) -> str:
    try:
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                  if g not in {f"{c.__module__}.{c.__name__}" for c in EXTRA_SAFE_GLOBALS}]
    except Exception:  # noqa: BLE001 - best effort: the message below still explains
        unsafe = []
    what = f"it needs {', '.join(unsafe[:4])}" if unsafe else str(err).splitlines()[0]
    return (f"{path}: refused to unpickle ({what}); glmctl loads SAT shards with torch.load(weights_only=True) "
            "only, which never runs code from the file. If you trust it, re-save it as "
            "torch.save({'module': torch.load(f, weights_only=False)['module']}, f) and convert again")


def drop_pages(t: torch.Tensor) -> None:
    """Release the resident pages of a memory-mapped, never-written tensor (Linux madvise).

    Only for tensors from ``load_shard(...)`` with mapped=True: on ordinary (anonymous) memory
    MADV_DONTNEED would zero the data.
    They come back from the file if touched again, so this only bounds the RSS of a stream
    that reads a file once, tensor by tensor. A no-op where madvise is unavailable.
    """
    if not sys.platform.startswith("linux") or t.numel() == 0:
        return
    try:
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        page = mmap.PAGESIZE
        start = ptr & ~(page - 1)
        end = (ptr + n + page - 1) & ~(page - 1)
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


# ---- writing ----------------------------------------------------------------------------------
class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    def __init__(self, storage: _StorageRef, shape: tuple):
        self.storage, self.shape = storage, tuple(int(s) for s in shape)


def _contiguous_stride(shape: tuple) -> tuple:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


class _Pickler(pickle.Pickler):
    """Pickles {'module': OrderedDict(name -> _TensorRef)} exactly as torch.save pickles tensors."""

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_cls = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_cls, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _TensorRef):
            return (torch._utils._rebuild_tensor_v2,
                    (obj.storage, 0, obj.shape, _contiguous_stride(obj.shape), False, collections.OrderedDict()))
        return NotImplemented


class ShardWriter:
    """Stream one SAT shard: declare every (name, shape, dtype) up front, then ``write`` each tensor
    in that order. The result loads with ``torch.load(weights_only=True)`` as {'module': ...}."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple, torch.dtype]]):
        self.path = Path(path)
        self.entries = list(entries)
        self.next = 0
        refs = collections.OrderedDict()
        for i, (name, shape, dtype) in enumerate(self.entries):
            numel = 1
            for s in shape:
                numel *= int(s)
            refs[name] = _TensorRef(_StorageRef(str(i), dtype, numel), shape)
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump({"module": refs})
        data = buf.getvalue()
        try:
            self._zip = torch._C.PyTorchFileWriter(str(self.path), torch.serialization.get_crc32_options(),
                                                   torch.serialization._get_storage_alignment())
        except (AttributeError, TypeError):  # older torch: default crc/alignment
            self._zip = torch._C.PyTorchFileWriter(str(self.path))
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        align = str(torch.serialization._get_storage_alignment())
        self._zip.write_record(".storage_alignment", align, len(align))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))

    def write(self, name: str, t: torch.Tensor) -> None:
        if self.next >= len(self.entries):
            raise ValueError(f"{self.path}: unexpected tensor {name}")
        want, shape, dtype = self.entries[self.next]
        if name != want or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"{self.path}: expected {want} {tuple(shape)} {dtype}, got {name} "
                             f"{tuple(t.shape)} {t.dtype}")
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if t.storage_offset() or t.untyped_storage().nbytes() != nbytes:
            t = t.clone()  # a view into a larger storage: write only its own bytes
        self._zip.write_record(f"data/{self.next}", t.untyped_storage() if nbytes else b"", nbytes)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.entries):
            raise ValueError(f"{self.path}: {len(self.entries) - self.next} tensors were never written")
        self._zip.write_end_of_file()
        del self._zip


def write_latest(root: Path, iteration: str) -> None:
    atomic_write_text(root / "latest", f"{iteration}\n")


# ---- the Source and the sink ------------------------------------------------------------------
class SatSource(Source):
    """A SAT checkpoint. Its config comes from the shapes plus the head count: ``heads``, the
    ``preset``, SAT's inv_freq buffers, or ``base`` (a config whose other fields are kept); a
    checkpoint glmctl exported records its config in manifest.json, used when none of these is
    given. ``need_config=False`` (inspect) leaves ``cfg`` None when the head count is unknown."""
    kind = "sat"

    def __init__(self, root: Path, *, heads: int | None = None, preset: str | None = None,
                 base: ModelConfig | None = None, need_config: bool = True):
        self.path = root = Path(root)
        self.iteration = read_latest(root)
        folder = root / self.iteration
        self.files = shard_files(folder)
        self.label = f"SAT checkpoint {root} (iteration {self.iteration})"
        loaded = [load_shard(f) for f in self.files]
        self.shards = [sd for sd, _ in loaded]
        self.mapped = [mapped for _, mapped in loaded]
        self.tp = len(self.files)
        check_same_names([set(s) for s in self.shards], lambda r: str(self.files[r]))
        self.raw_local = {k: [tuple(s[k].shape) for s in self.shards] for k in self.shards[0]}
        self.raw_dtypes = {k: self.shards[0][k].dtype for k in self.shards[0]}
        for k, shapes in self.raw_local.items():
            for r, s in enumerate(shapes[1:], start=1):
                if s != shapes[0] or self.shards[r][k].dtype != self.raw_dtypes[k]:
                    dt = lambda t: str(t).replace("torch.", "")  # noqa: E731
                    raise InputError(f"{folder}: {k} is {list(shapes[0])} {dt(self.raw_dtypes[k])} in "
                                     f"{self.files[0].name} but {list(s)} {dt(self.shards[r][k].dtype)} in "
                                     f"{self.files[r].name}")
        self.shapes = ShapeFacts(self.raw_local, self.raw_dtypes, self.tp, str(folder))
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
        self.config_recorded = base is not None
        if base is None and self.manifest and not preset and heads is None:
            with contextlib.suppress(Exception):  # a foreign or damaged manifest: infer instead
                base = ModelConfig.from_dict(self.manifest["config"]["model"])
                self.config_recorded = True
        try:
            self.cfg = self.shapes.model_config(heads=heads, preset=preset, base=base)
            if not self.config_recorded:  # SAT's own rotary rule, unless glmctl recorded the config
                self.cfg = self.cfg.replace(rope="sat")  # docs/glm130b.md §2.3
        except UsageError:
            if need_config:
                raise

    def read(self, name, rank):
        t = self.shards[rank][name]
        if not name.endswith("weight_scale"):
            return t
        return tp_layout.regroup_scale(name, t, self.shapes.in_features(name, local=True), None, self.group)

    def release(self, name, ranks=None):
        for r in range(self.tp) if ranks is None else ranks:
            if self.mapped[r]:  # only file-backed pages: on anonymous memory MADV_DONTNEED zeroes data
                drop_pages(self.shards[r][name])


class SatSink:
    """SAT shards of ``cfg`` (at its TP) from ``entries[rank]`` = [(name, shape, dtype)] in glmctl
    form: glmctl group scales become SAT's one scale per output row per rank. ``check`` yields
    (name, scale tensor of one output rank): each is converted before any file is written, so a
    model SAT cannot hold stops before the output is half written."""

    def __init__(self, directory: Path, cfg: ModelConfig, entries: list[list[tuple]], iteration: str, check=()):
        self.dir, self.cfg, self.iteration = directory, cfg, iteration
        self.tp = cfg.tensor_parallel_size
        self.group = (cfg.quantization or {}).get("group_size")
        for n, t in check:
            self.to_sat(n, t)
        (directory / iteration).mkdir(parents=True)
        self.writers = []
        for r, rank_entries in enumerate(entries):
            sat_entries = [(n, regroup_shape(shape, self.in_local(n), None) if n.endswith("weight_scale") else shape,
                            dt) for n, shape, dt in rank_entries]
            self.writers.append(ShardWriter(directory / iteration / shard_name(r), sat_entries))

    def in_local(self, name: str) -> int:
        n = tp_layout.linear_in_features(name, self.cfg.hidden_size, self.cfg.inner_hidden_size)
        return n // self.tp if tp_layout.classify(name) == tp_layout.ROW else n

    def to_sat(self, name, t):
        if not name.endswith("weight_scale"):
            return t
        try:
            return tp_layout.regroup_scale(name, t, self.in_local(name), self.group, None)
        except tp_layout.LayoutError as e:
            raise UsageError(f"cannot write SAT at TP={self.tp} without requantising: {e}; SAT keeps one "
                             "scale per output row per rank (export at the TP the model was quantized for, or "
                             "quantize the fp16 model at this TP)") from None

    def write(self, rank, name, t) -> None:
        self.writers[rank].write(name, self.to_sat(name, t))

    def close(self) -> None:
        for w in self.writers:
            w.close()
        write_latest(self.dir, self.iteration)
