"""The one interface every checkpoint reader offers (``Source``), whatever the format.

A source is a set of named tensors split over ``tp`` tensor-parallel ranks, read one tensor of
one rank at a time, so a converter never holds the model:

    cfg            ModelConfig at the source's TP (quantization in glmctl's group form), or None
                   where it cannot be known (a SAT checkpoint without a head count, for inspect)
    tp             tensor-parallel size of the stored files
    names          tensor names in stored order
    local[name]    [shape on rank 0, shape on rank 1, ...] (glmctl form)
    dtypes[name]   torch dtype
    read(name, r)  the tensor of rank r, in glmctl form (quantization scales as group scales)
    release(name)  drop what reading ``name`` made resident (memory-mapped pages)
    tokenizer_dir  a directory holding tokenizer.model / tokenizer.json, or None
    iteration      the training iteration or step, when the format records one
    label          one line for logs ("SAT checkpoint ck (iteration 49300)")
    config_recorded  True when ``cfg`` was read from the checkpoint (config.json, a glmctl
                   manifest), False when it was inferred from shapes and a preset
    close()        release files and handles

Readers: glmctl.formats.native.NativeSource, glmctl.formats.sat.SatSource,
glmctl.formats.deepspeed.ZeroSource. ``glmctl.formats.open_source`` picks one.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from glmctl import tp_layout
from glmctl.checkpoint import stored_dtype
from glmctl.config import ModelConfig
from glmctl.errors import InputError


class Source:
    """Base of the readers (see the module docstring for the protocol)."""
    kind = "?"
    path: Path
    cfg: ModelConfig | None = None
    tp: int = 1
    names: list[str]
    local: dict[str, list[tuple]]
    dtypes: dict[str, torch.dtype]
    tokenizer_dir: Path | None = None
    iteration: str | None = None
    label: str = ""
    manifest: dict | None = None
    config_recorded: bool = True

    def read(self, name: str, rank: int) -> torch.Tensor:
        raise NotImplementedError

    def release(self, name: str, ranks=None) -> None:
        """Drop what reading ``name`` (of ``ranks``, default all) made resident; a no-op here."""

    def close(self) -> None:
        """Release files and handles; a no-op here."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def stored_dtype(self) -> torch.dtype:
        """The float dtype the model is stored in (glmctl.checkpoint.stored_dtype)."""
        return stored_dtype(self.dtypes)

    def bytes(self) -> int:
        """Bytes of all stored tensors, every rank counted."""
        return sum(sum(math.prod(s) for s in self.local[n]) * element_size(self.dtypes[n]) for n in self.names)

    def fp32_bytes(self) -> int:
        """Bytes of the TP=1 model with its float weights in fp32 (what verification builds)."""
        total = 0
        for n in self.names:
            dt = self.dtypes[n]
            el = 4 if dt.is_floating_point and not n.endswith("_scale") else element_size(dt)
            total += sum(math.prod(s) for s in self.local[n]) * el
        return total

    def merged(self, name: str) -> torch.Tensor:
        """The global tensor ``name``: every rank read and merged (glmctl.tp_layout)."""
        return tp_layout.merge_tensors(name, [self.read(name, r) for r in range(self.tp)])

    def state_dict(self, names=None) -> dict[str, torch.Tensor]:
        """``names`` (default all) as one TP=1 state dict, each tensor released once merged."""
        out = {}
        for n in self.names if names is None else names:
            out[n] = self.merged(n)
            self.release(n)
        return out


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def check_same_names(per_rank: list[set], where) -> None:
    """Every rank holds the same tensor names; ``where(rank)`` names the file of a rank."""
    for r, names in enumerate(per_rank[1:], start=1):
        if names != per_rank[0]:
            diff = sorted(per_rank[0] ^ names)[0]
            side = 0 if diff in per_rank[0] else r
            raise InputError(f"{where(side if side else r)}: tensor {diff} is in rank {side} "
                             f"but not in rank {r if side == 0 else 0}")
