"""A .safetensors file written tensor by tensor: the header (every name, shape, dtype and
offset) first, then each tensor's bytes in declaration order, so a writer holds one tensor at a
time. The bytes are laid out as safetensors' own writer lays them out."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from glmctl.errors import InputError
from glmctl.formats.source import element_size

ST_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
            "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_FROM_CODE = {code: getattr(torch, name) for name, code in ST_CODES.items()}


def dtype_from_code(code: str, where) -> torch.dtype:
    """The torch dtype of a safetensors dtype code ("F16", "I8", ...)."""
    if code not in _FROM_CODE:
        raise InputError(f"{where}: unsupported tensor dtype {code}")
    return _FROM_CODE[code]


class SafetensorsFile:
    """One .safetensors file streamed: declare ``entries`` [(name, shape, dtype)] up front, then
    ``write`` each tensor in that order and ``close``."""

    def __init__(self, path: Path, entries, metadata: dict):
        self.path, self.entries, self.next = path, list(entries), 0
        header, off = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, 0
        for name, shape, dtype in self.entries:
            nbytes = math.prod(shape) * element_size(dtype)
            header[name] = {"dtype": ST_CODES[str(dtype).replace("torch.", "")], "shape": list(shape),
                            "data_offsets": [off, off + nbytes]}
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)

    @property
    def done(self) -> bool:
        return self.next == len(self.entries)

    def write(self, name, t) -> None:
        want, shape, dtype = self.entries[self.next]
        if name != want or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise AssertionError(f"{self.path}: expected {want} {shape} {dtype}, got {name} {tuple(t.shape)} {t.dtype}")
        t = t.detach().contiguous().cpu()
        if t.numel():
            self.f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> None:
        assert self.done, f"{self.path}: {len(self.entries) - self.next} tensors not written"
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
