"""DeepSpeed ZeRO checkpoints: fp32 master weights gathered with deepspeed.utils.zero_to_fp32.

DeepSpeed's gatherer unpickles its files fully (weights_only=False), so every file of the tag
folder is scanned first (``check_deepspeed_pickles``): only torch's safe globals and the exact
names in ``DEEPSPEED_SAFE_GLOBALS`` are allowed, so no code from the files can run.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from glmctl.config import ModelConfig
from glmctl.errors import InputError, UsageError
from glmctl.formats.shapes import ShapeFacts
from glmctl.formats.source import Source

# Globals DeepSpeed's checkpoints reference beyond torch's weights_only set: plain enums and
# records of its own (deepspeed 0.14-0.19). Exact names only: a prefix would admit callables.
DEEPSPEED_SAFE_GLOBALS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "argparse.Namespace",
}


def check_deepspeed_pickles(folder: Path) -> None:
    """Refuse a file of ``folder`` whose pickle references a global beyond torch's safe set and
    DEEPSPEED_SAFE_GLOBALS (read without executing anything)."""
    for f in sorted(folder.glob("*.pt")):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{f}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
        bad = [g for g in unsafe if g not in DEEPSPEED_SAFE_GLOBALS]
        if bad:
            raise InputError(f"{f}: refused to unpickle (it needs {', '.join(bad[:4])}); glmctl gathers only "
                             "DeepSpeed checkpoints made of tensors, plain containers and DeepSpeed's own "
                             "enums and records (glmctl/formats/deepspeed.py DEEPSPEED_SAFE_GLOBALS)")


def tag_folder(ds_dir: Path) -> Path:
    """The folder ``ds_dir/latest`` names."""
    tag = (ds_dir / "latest").read_text().strip() if (ds_dir / "latest").is_file() else None
    if not tag or not (ds_dir / tag).is_dir():
        raise InputError(f"{ds_dir}: DeepSpeed checkpoint without a valid `latest` tag file")
    return ds_dir / tag


def common_prefix(names: list[str]) -> str:
    """'module.' / 'model.' wrappers around the GLM's own names ('transformer.…')."""
    firsts = {n.split("transformer.", 1)[0] for n in names if "transformer." in n}
    return firsts.pop() if len(firsts) == 1 else ""


class ZeroSource(Source):
    """fp32 master weights of a ZeRO checkpoint folder (TP=1). ``cfg``, ``tokenizer_dir``,
    ``iteration`` and ``manifest`` come from the pretrain step the folder belongs to, when there is
    one; without ``cfg`` the config is inferred from the shapes with ``heads`` or ``preset``."""
    kind = "deepspeed"

    def __init__(self, ds_dir: Path, *, cfg: ModelConfig | None = None, tokenizer_dir: Path | None = None,
                 iteration: str | None = None, manifest: dict | None = None, heads: int | None = None,
                 preset: str | None = None):
        self.path = ds_dir
        self.tp = 1
        self.tokenizer_dir, self.iteration, self.manifest = tokenizer_dir, iteration, manifest
        folder = tag_folder(ds_dir)
        self.label = f"DeepSpeed ZeRO checkpoint {folder}"
        check_deepspeed_pickles(folder)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:  # lazy: DeepSpeed is optional (pip install glmctl[deepspeed]) and slow to import
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as e:
            raise UsageError(f"gathering ZeRO shards needs DeepSpeed ({e}); pip install deepspeed") from None
        try:
            with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints progress on stdout
                sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=folder.name, lazy_mode=True)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise InputError(f"{folder}: cannot gather ZeRO shards ({str(e).splitlines()[0]})") from None
        prefix = common_prefix(list(sd))
        self.lazy = {k[len(prefix):]: v for k, v in sd.items()}
        self.local = {k: [tuple(v.shape)] for k, v in self.lazy.items()}
        self.dtypes = {k: getattr(v, "dtype", torch.float32) for k, v in self.lazy.items()}
        self.names = list(self.lazy)
        self.shapes = ShapeFacts(self.local, self.dtypes, 1, str(folder))
        if cfg is not None and cfg.tensor_parallel_size != 1:
            raise InputError(f"{ds_dir}: ZeRO shards of a tensor-parallel run (TP={cfg.tensor_parallel_size}) "
                             "cannot be gathered; convert the native weights instead")
        self.config_recorded = cfg is not None
        if cfg is None:
            cfg = self.shapes.model_config(heads=heads, preset=preset)
        self.cfg = cfg.replace(tensor_parallel_size=1)

    def read(self, name, rank):
        t = self.lazy[name]
        t = t.contiguous() if not isinstance(t, torch.Tensor) else t
        return t.float() if t.is_floating_point() else t
