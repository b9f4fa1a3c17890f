"""Artifact directories: manifest.json (written last), atomic writes, staleness, locks.

An artifact is a directory whose ``manifest.json`` records what made it (the README's Artifacts section).
A directory without a manifest is incomplete and no stage reads it. ``ArtifactWriter`` builds
the directory under a temporary sibling name and renames it into place when complete, so a
crash at any moment leaves either the old artifact or nothing, never a half-written one.

    with ArtifactWriter(out, stage="quantize", config=cfg, inputs=[src]) as w:
        save_things(w.path)          # write into the temporary directory
        w.summary["ppl"] = 12.3      # free-form results recorded in the manifest
    # -> out/manifest.json exists, out/ is complete
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from glmctl import __version__
from glmctl.errors import InputError, LockHeld

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# When the command started (set by the CLI): a manifest's "started" covers the whole stage run,
# not only the final write.
RUN_STARTED: _dt.datetime | None = None


# ---- atomic files ----------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    """Write a file under a temporary name; it appears at ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ---- hashing ---------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def config_hash(config) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def file_entry(path: Path, root: Path) -> dict:
    return {"path": str(path.relative_to(root)), "size": path.stat().st_size, "sha256": sha256_file(path)}


# ---- manifests -------------------------------------------------------------------------------
def read_manifest(path: str | Path, stage: str | None = None) -> dict:
    """The manifest of a complete artifact, or InputError naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    mpath = path / MANIFEST if path.is_dir() else path
    if not mpath.exists():
        raise InputError(f"{path}: incomplete artifact (no {MANIFEST})")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{mpath}: malformed manifest ({e})") from None
    if m.get("status") not in ("complete", "failed-gate"):
        raise InputError(f"{mpath}: artifact status is {m.get('status')!r}, not complete")
    if stage is not None and m.get("stage") != stage:
        raise InputError(f"{path}: expected a {stage} artifact, found {m.get('stage')!r}")
    return m


def manifest_hash(path: str | Path) -> str | None:
    mpath = Path(path) / MANIFEST
    if not mpath.exists():
        return None
    return hashlib.sha256(mpath.read_bytes()).hexdigest()


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform()}
    torch = sys.modules.get("torch")  # never import torch just to describe it (slow start-up)
    if torch is not None:
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
    else:
        try:
            env["torch"] = metadata.version("torch")
        except Exception:  # noqa: BLE001
            pass
    env["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    return env


def input_entry(path: str | Path) -> dict:
    """Describe an input: its own manifest hash when it is an artifact, else size (+sha256 for files)."""
    p = Path(path)
    entry = {"path": str(p)}
    if p.is_dir():
        entry["manifest_sha256"] = manifest_hash(p)
    elif p.exists():
        entry["size"] = p.stat().st_size
        entry["sha256"] = sha256_file(p)
    return entry


def is_up_to_date(out: str | Path, stage: str, config: dict, inputs: list) -> bool:
    """--if-stale: True when ``out`` is a complete artifact made from the same config and inputs."""
    try:
        m = read_manifest(out, stage)
    except InputError:
        return False
    if m.get("config_hash") != config_hash(config):
        return False
    want = [input_entry(p) for p in inputs]
    have = [{k: v for k, v in e.items() if k in ("path", "manifest_sha256", "size", "sha256")}
            for e in m.get("inputs", [])]
    return want == have


class ArtifactWriter:
    """Build an artifact directory atomically; manifest.json is written last."""

    def __init__(self, out: str | Path, stage: str, config: dict, inputs: list | None = None,
                 argv: list[str] | None = None, hash_outputs: bool = True, staging: str | Path | None = None,
                 started: _dt.datetime | None = None):
        """``staging``: adopt a directory built elsewhere (by every tensor-parallel rank, or kept
        across resumed runs) instead of making a fresh temporary one; ``finish`` moves it into
        place, and a failure leaves it where it is. ``started``: when the work began (default:
        when this command started)."""
        self.out = Path(out)
        self.stage = stage
        self.config = config
        self.inputs = list(inputs or [])
        self.argv = argv if argv is not None else list(sys.argv)
        self.hash_outputs = hash_outputs
        self.summary: dict = {}
        self.status = "complete"
        self.adopted = staging is not None
        self.path = Path(staging) if staging is not None else self.out.with_name(f".{self.out.name}.tmp{os.getpid()}")
        self.started = started or RUN_STARTED or _dt.datetime.now(_dt.timezone.utc)

    def __enter__(self):
        if not self.adopted:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if not self.adopted:
                shutil.rmtree(self.path, ignore_errors=True)
            return False
        self.finish()
        return False

    def manifest(self) -> dict:
        outputs = []
        for p in sorted(self.path.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                outputs.append(file_entry(p, self.path) if self.hash_outputs
                               else {"path": str(p.relative_to(self.path)), "size": p.stat().st_size})
        return {
            "schema_version": SCHEMA_VERSION,
            "stage": self.stage,
            "glmctl_version": __version__,
            "argv": self.argv,
            "config": self.config,
            "config_hash": config_hash(self.config),
            "inputs": [input_entry(p) for p in self.inputs],
            "outputs": outputs,
            "environment": environment(),
            "started": self.started.isoformat() if self.started else None,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "status": self.status,
            "summary": self.summary,
        }

    def finish(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest())
        fsync_dir(self.path)
        replace_dir(self.path, self.out)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename a complete directory into place; an existing one is moved aside first, then removed."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- locks -----------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float = 0.0):
    """Advisory lock (flock). Held by another process: wait up to ``timeout`` s, then LockHeld (exit 75)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockHeld(f"{path}: lock held by another run") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)  # closing releases the flock
