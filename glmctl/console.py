"""Terminal output: results on stdout, everything else on stderr.

* ``log(msg)``: one line on stderr.
* ``progress(...)``: a rich bar on an interactive terminal; on a pipe or in a log, one plain
  line every ``GLMCTL_PROGRESS_INTERVAL`` seconds (default 10) and a final one.
* ``emit_json(obj)``: the one JSON document of ``--json`` on stdout.
* ``print_table(...)``: a rich table on a terminal, aligned plain text otherwise (stdout).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RP
from rich.table import Table


def stderr_is_tty() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def stdout_is_tty() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


_quiet = False


def set_quiet(q: bool) -> None:
    """Silence log lines and progress (the other ranks of a distributed run; benchmarks)."""
    global _quiet
    _quiet = q


def is_quiet() -> bool:
    return _quiet


def log(msg: str) -> None:
    if not _quiet:
        print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"glmctl: warning: {msg}", file=sys.stderr, flush=True)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(title: str | None, columns: list[str], rows: list[list], file=None) -> None:
    file = file or sys.stdout
    if file.isatty():
        t = Table(title=title)
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*[_fmt(v) for v in r])
        Console(file=file).print(t)
        return
    cells = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if title:
        print(title, file=file)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), file=file)
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip(), file=file)
    file.flush()


class Progress:
    """progress(total, desc, unit) -> .update(advance, **fields) / .close(). Fields are shown as k=v."""

    def __init__(self, total: float | None, desc: str, unit: str = "it", interval: float | None = None,
                 enabled: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0.0
        self.fields: dict = {}
        self.start = time.monotonic()
        self.interval = interval if interval is not None else float(os.environ.get("GLMCTL_PROGRESS_INTERVAL", "10"))
        self.last = self.start
        self.enabled = enabled and not _quiet
        self._rich = None
        if self.enabled and stderr_is_tty():
            self._rich = RP(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=Console(file=sys.stderr), transient=False)
            self._rich.start()
            self._task = self._rich.add_task(desc, total=total, info="")

    def _info(self) -> str:
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())

    def update(self, advance: float = 1, **fields) -> None:
        self.n += advance
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=advance, info=self._info())
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def _line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        tot = f"/{_fmt(self.total)}" if self.total else ""
        eta = ""
        if self.total and rate > 0 and not final:
            eta = f" eta={max(0.0, (self.total - self.n) / rate):.0f}s"
        status = "done" if final else ""
        print(f"{self.desc}: {_fmt(self.n)}{tot} {self.unit} {rate:.3g} {self.unit}/s "
              f"elapsed={elapsed:.0f}s{eta} {self._info()} {status}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        else:
            self._line(final=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def progress(total=None, desc: str = "", unit: str = "it", **kw) -> Progress:
    return Progress(total, desc, unit, **kw)


def parse_size(text: str) -> int:
    """'24GiB', '512MB', '1e9' -> bytes."""
    s = str(text).strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30,
             "t": 2**40, "b": 1}
    low = s.lower()
    for u in sorted(units, key=len, reverse=True):
        if low.endswith(u):
            return int(float(low[: -len(u)].strip()) * units[u])
    return int(float(low))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '1h30m' -> seconds."""
    s = str(text).strip().lower()
    if re.fullmatch(r"[\d.]+", s):
        return float(s)
    total, matched = 0.0, False
    for num, unit in re.findall(r"([\d.]+)\s*([smhd])", s):
        total += float(num) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
        matched = True
    if not matched:
        raise ValueError(f"cannot parse duration {text!r}")
    return total
