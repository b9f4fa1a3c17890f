"""Processes and devices: the one place that starts and stops torch.distributed.

Every stage that runs a model calls ``start`` once and ``stop`` at the end:

    rt = runtime.start(device=c.device)          # one process, torchrun, or DeepSpeed's launcher
    try:
        ... rt.rank, rt.broadcast(obj), rt.barrier() ...
    finally:
        runtime.stop(rt, clean=...)

Launchers: a plain process (WORLD_SIZE unset) runs alone; under ``torchrun`` or DeepSpeed's
launcher the environment names RANK / WORLD_SIZE / LOCAL_RANK and every process joins one group
(gloo on CPU, NCCL on CUDA). ``deepspeed=True`` lets DeepSpeed create that group (it also works
in a single process). Tensor parallelism: ``tp`` ranks in a row form one tensor-parallel group
(glmctl.model.parallel); inference and evaluation put every rank into it (``tp=None``).

Device policy (one for every stage): ``None`` means CUDA when it is available, else the CPU;
``cuda`` without a usable CUDA device, or on a card that this torch build has no kernels for, is a
usage error (one line, exit 2). Under a launcher, ``cuda`` means this process's local GPU.
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glmctl import console
from glmctl.errors import GlmctlError, UsageError
from glmctl.model import parallel as tp_state

# A clean teardown waits this long for the other ranks before giving up on them.
TEARDOWN_TIMEOUT = _dt.timedelta(seconds=60)


def resolve_device(request: str | None, local_rank: int = 0) -> torch.device:
    """The device a stage runs on (the policy above)."""
    if request is None:
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request != "cpu" and request != "cuda" and not request.startswith("cuda:"):
        raise UsageError(f"unknown device {request!r}; choose cpu or cuda")
    if request == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {request}: no CUDA device is available")
    device = torch.device(f"cuda:{local_rank}" if request == "cuda" else request)
    index = device.index
    major, minor = torch.cuda.get_device_capability(index)
    archs = torch.cuda.get_arch_list()
    if archs and not any(a.startswith("sm_") and a[3:].isdigit() and int(a[3:]) // 10 == major
                         and int(a[3:]) % 10 <= minor for a in archs):
        raise UsageError(f"--device {request}: {torch.cuda.get_device_name(index)} is sm_{major}{minor}, which this "
                         f"torch build has no kernels for (it has {', '.join(archs)})")
    return device


@dataclass
class Runtime:
    """This process's place in the run: world = tensor-parallel size x data-parallel size."""
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    tp: int = 1
    device: torch.device = torch.device("cpu")
    deepspeed: bool = False
    owns_group: bool = False  # this runtime created the process group and tears it down

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1 and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (the object itself in one process)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_rank0(self, fn):
        """Run ``fn`` on rank 0 only and give every rank its value, or raise its GlmctlError on
        every rank (so all ranks stop together on bad input)."""
        value = err = None
        if self.is_main:
            try:
                value = fn()
            except GlmctlError as e:
                err = (type(e), str(e), e.exit_code)
        value, err = self.broadcast((value, err))
        if err is not None:
            cls, msg, code = err
            raise cls(msg, code)
        return value

    def all_reduce(self, t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
        """In place on a CPU tensor (through the device for NCCL)."""
        if self.distributed:
            x = t.to(self.device)
            dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
            t.copy_(x.cpu())
        return t

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def launcher_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun or DeepSpeed's launcher set them (1, 0, 0 alone)."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """Rank 0, or no launcher: the one process that prints results."""
    return launcher_env()[1] == 0


def start(device: str | None = None, tp: int | None = None, deepspeed: bool = False) -> Runtime:
    """Join the run: resolve the device, create the process group when launched with several
    processes (or for DeepSpeed), and set up tensor parallelism (``tp=None``: all ranks)."""
    world, rank, local = launcher_env()
    rt = Runtime(world=world, rank=rank, local_rank=local, tp=world if tp is None else tp, deepspeed=deepspeed)
    if world % rt.tp:
        raise UsageError(f"world size {world} is not divisible by the tensor-parallel size {rt.tp}")
    rt.device = resolve_device(device, local)
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    elif world > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores between local ranks
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if (world > 1 or deepspeed) and not dist.is_initialized():
        backend = "nccl" if rt.device.type == "cuda" else "gloo"
        if deepspeed:
            _single_process_rendezvous()
            import deepspeed as ds  # lazy: an optional dependency, and slow to import
            ds.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend)
        rt.owns_group = True
    if rank != 0:
        console.set_quiet(True)
    tp_state.init_tensor_parallel(rt.tp)
    return rt


def _single_process_rendezvous() -> None:
    """DeepSpeed in one process without a launcher still needs a rendezvous address."""
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def stop(rt: Runtime, clean: bool = True) -> None:
    """Leave the run. ``clean``: every rank got here at the same point, so wait for the others
    (bounded by TEARDOWN_TIMEOUT on gloo) before destroying the group; otherwise (an error on
    this rank) destroy it at once, since the other ranks may never arrive."""
    tp_state.reset_tensor_parallel()
    if rt.rank != 0:
        console.set_quiet(False)
    if not (rt.owns_group and dist.is_initialized()):
        return
    gc.collect()  # DDP / DeepSpeed hold the group; release them before tearing it down
    if clean:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=TEARDOWN_TIMEOUT)
            else:
                dist.barrier()
        except RuntimeError as e:  # another rank is gone: nothing left to wait for
            console.warn(f"teardown: {str(e).splitlines()[0]}")
    dist.destroy_process_group()
