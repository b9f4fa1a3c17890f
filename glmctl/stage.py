"""The stage contract (docs/architecture.md): what every ``glmctl.stages.<name>`` module offers.

    @dataclass(frozen=True)
    class XConfig:                 # owns every default; the CLI reads its defaults from here
        out: str
        if_stale: bool = False
        lock: str | None = None    # None, "auto" (.<out>.lock beside OUT) or a lock file path
        def validate(self) -> None: ...   # UsageError (exit 2) on bad options, before any input is read

    def run(config: XConfig) -> StageResult

``StageOutput`` is the one wrapper around the artifact writer that applies ``--lock`` and
``--if-stale``:

    with StageOutput("quantize", c.out, lock=c.lock, if_stale=c.if_stale) as o:
        if o.up_to_date(config_doc, inputs):
            return o.result                       # status "up-to-date", the old manifest's summary
        with o.writer(config_doc, inputs) as w:   # glmctl.artifacts.ArtifactWriter
            ... write into w.path, fill w.summary ...
    return StageResult(summary=..., out=...)

Under torchrun only rank 0 takes the lock; every rank learns whether it got it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from glmctl import console
from glmctl.artifacts import ArtifactWriter, file_lock, is_up_to_date, read_manifest
from glmctl.errors import EXIT_GATE, GlmctlError, InputError, LockHeld, UsageError

COMPLETE, UP_TO_DATE, FAILED_GATE = "complete", "up-to-date", "failed-gate"


@dataclass
class StageResult:
    """What a stage returns: ``status`` (complete | up-to-date | failed-gate), the summary that
    also goes into the manifest, and the artifact written (None for stdout-only stages)."""
    summary: dict = field(default_factory=dict)
    out: Path | None = None
    status: str = COMPLETE

    @property
    def up_to_date(self) -> bool:
        return self.status == UP_TO_DATE

    def raise_for_status(self) -> None:
        """The error that the CLI turns into an exit code (a tripped quality gate: 5)."""
        if self.status == FAILED_GATE:
            raise GlmctlError(self.summary.get("gate_message") or f"{self.out}: a quality gate failed", EXIT_GATE)


def default_lock_path(out: str | Path) -> Path:
    """``--lock`` without a path: a hidden file beside OUT, so replacing OUT never removes it."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def lock_path(out: str | Path | None, lock: str | None) -> Path | None:
    if lock is None:
        return None
    if lock == "auto":
        if out is None:
            raise UsageError("--lock without a PATH needs --out (the lock goes next to it)")
        return default_lock_path(out)
    return Path(lock)


class StageOutput:
    """Lock (optional), --if-stale check and the artifact writer of one stage run."""

    def __init__(self, stage: str, out: str | Path | None, *, lock: str | None = None, lock_timeout: float = 0.0,
                 if_stale: bool = False, runtime=None):
        self.stage, self.if_stale, self.runtime = stage, if_stale, runtime
        self.out = None if out is None else Path(out)
        self.lock = lock_path(self.out, lock)
        self.lock_timeout = lock_timeout
        self.result: StageResult | None = None
        self._held = contextlib.ExitStack()

    def __enter__(self) -> "StageOutput":
        if self.lock is None:
            return self
        main = self.runtime is None or self.runtime.is_main
        err = None
        if main:
            try:
                self._held.enter_context(file_lock(self.lock, timeout=self.lock_timeout))
            except LockHeld as e:
                err = str(e)
        if self.runtime is not None:
            err = self.runtime.broadcast(err)
        if err is not None:
            raise LockHeld(err)
        return self

    def __exit__(self, *exc) -> bool:
        self._held.close()
        return False

    def up_to_date(self, config: dict, inputs: list) -> bool:
        """--if-stale: True (and ``self.result`` set) when OUT was made from this config and inputs."""
        if not self.if_stale or self.out is None or not is_up_to_date(self.out, self.stage, config, inputs):
            return False
        summary = read_manifest(self.out).get("summary", {})
        console.log(f"{self.out}: up to date")
        self.result = StageResult(summary=summary, out=self.out, status=UP_TO_DATE)
        return True

    def writer(self, config: dict, inputs: list, **kw) -> ArtifactWriter:
        if self.out is None:
            raise InputError(f"{self.stage}: no output directory")
        return ArtifactWriter(self.out, stage=self.stage, config=config, inputs=inputs, **kw)
