"""Evaluate a checkpoint on GLM-130B-format tasks; write lm-eval-compatible results (docs/glm130b.md §9).

    run(EvaluateConfig(model="model-int4", tasks=["builtin"], out="eval/int4",
                       history="eval/history.jsonl", fail_below=["mc_en:acc=0.3"]))
      -> EvaluateResult(results=<results.json>, failed={...}, gate_failures=[...])

Outputs (``out``, an artifact directory written atomically, manifest last):
    results.json    lm-eval's layout (see glmctl.evaluation.results)
    samples.jsonl   one line per example (LM: per document): inputs, per-choice scores, prediction, target
History (``history``): one JSON line per task run, appended: time, model manifest hash, task hash,
metrics — a series a cron job can plot or diff.

Built for cron:
* ``lock``: an advisory lock (default ``<out>/../.<out name>.lock``); held by another run -> exit 75
  at once, or wait up to ``lock_timeout`` seconds.
* ``if_stale``: skip when ``out`` already holds results of this model (its manifest hash) and these
  tasks (their hashes: resolved YAML + data files) with the same options; without ``out``, skip
  each task that ``history`` already records for this model.
* resume: every scored request is appended to ``<out>/../.<out name>.cache/<model>-<dtype>.jsonl`` as
  batches finish; a run that was killed picks up from there. The cache is removed on success.
* ``fail_below`` / ``fail_above``: ``[TASK:]METRIC=VALUE`` gates; a tripped gate -> exit 5 (results
  are still written). METRIC is ``acc`` (any filter) or ``acc,none``; without TASK every task that
  reports the metric is checked.
* a task that cannot run (bad YAML, bad data line, missing folder) is reported with its file and
  line, recorded under ``failed`` in results.json, and the other tasks still run (exit 3).

Tensor parallelism: under ``torchrun --nproc_per_node N`` the model is split N ways
(``init_tensor_parallel``; each rank loads its shard). Every rank scores every request; rank 0
writes. Quantized checkpoints load and run the same way.
"""
from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmctl import __version__, console, runtime
from glmctl.adapters import resolve_adapter_dir
from glmctl.artifacts import is_up_to_date, manifest_hash, read_manifest
from glmctl.errors import EXIT_BAD_INPUT, EXIT_GATE, GateFailed, GlmctlError, InputError, UsageError
from glmctl.evaluation.results import build_results, main_metrics
from glmctl.evaluation.runner import Evaluator
from glmctl.evaluation.scoring import RequestCache
from glmctl.evaluation.tasks import find_tasks, load_task
from glmctl.model import parallel as tp
from glmctl.session import open_model
from glmctl.stage import COMPLETE, FAILED_GATE, UP_TO_DATE, StageOutput, StageResult

STAGE = "evaluate"
PROTOCOL_VERSION = 1  # bump when scoring changes so --if-stale re-runs old results


@dataclass(frozen=True)
class EvaluateConfig:
    model: str
    tasks: tuple[str, ...]
    out: str | None = None
    data_path: str | None = None
    limit: int | None = None             # at most N examples (LM: documents) per data file
    batch_size: int = 8
    dtype: str | None = None             # fp32 | bf16 | fp16 (default: as stored)
    adapter: str | None = None           # a LoRA / P-tuning adapter made on this model (glmctl finetune)
    device: str | None = None            # default: cuda when available, else cpu
    lock: str | None = None              # a path, or "auto" for the default next to ``out``
    lock_timeout: float = 0.0
    history: str | None = None
    if_stale: bool = False
    fail_below: tuple[str, ...] = ()
    fail_above: tuple[str, ...] = ()
    show_progress: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1, got {self.limit}")
        if self.if_stale and self.out is None and self.history is None:
            raise UsageError("--if-stale needs --out or --history (where earlier results are)")
        if self.lock == "auto" and self.out is None:
            raise UsageError("--lock without a PATH needs --out (the lock goes next to it)")
        self.gates()

    def gates(self) -> list["Gate"]:
        return parse_gates(list(self.fail_below), True) + parse_gates(list(self.fail_above), False)


@dataclass
class EvaluateResult(StageResult):
    results: dict | None = None
    failed: dict = field(default_factory=dict)        # task -> message
    failed_codes: dict = field(default_factory=dict)  # task -> exit code
    gate_failures: list = field(default_factory=list)
    resumed: int = 0

    @property
    def skipped(self) -> bool:
        return self.up_to_date

    @property
    def exit_code(self) -> int:
        if self.failed_codes:
            return max(self.failed_codes.values(), key=lambda c: (c == EXIT_BAD_INPUT, c))
        return EXIT_GATE if self.gate_failures else 0

    def raise_for_status(self) -> None:
        """Raise the error that the CLI turns into the exit code (tasks failed: 3/1; gate: 5)."""
        if self.failed_codes:
            n = len(self.failed)
            raise GlmctlError(f"{n} task{'s' if n > 1 else ''} failed: {', '.join(self.failed)}", self.exit_code)
        if self.gate_failures:
            raise GateFailed("; ".join(self.gate_failures))


# ---- gates -----------------------------------------------------------------------------------
@dataclass
class Gate:
    task: str | None
    metric: str          # "acc" or "acc,none"
    value: float
    below: bool          # True: fail when the result is below value
    text: str


def parse_gates(specs: list[str], below: bool) -> list[Gate]:
    flag = "--fail-below" if below else "--fail-above"
    out = []
    for s in specs:
        if "=" not in s:
            raise UsageError(f"{flag} {s!r}: expected [TASK:]METRIC=VALUE, e.g. acc=0.5")
        lhs, rhs = s.rsplit("=", 1)
        try:
            value = float(rhs)
        except ValueError:
            raise UsageError(f"{flag} {s!r}: {rhs!r} is not a number") from None
        task, metric = (lhs.split(":", 1) if ":" in lhs else (None, lhs))
        if not metric:
            raise UsageError(f"{flag} {s!r}: no metric name")
        out.append(Gate(task or None, metric, value, below, s))
    return out


def check_gates(gates: list[Gate], results: dict) -> list[str]:
    failures = []
    for g in gates:
        entries = ({g.task: results["results"].get(g.task)} if g.task is not None
                   else {n: results["results"][n] for n in results.get("versions", {})})
        checked = 0
        for name, entry in entries.items():
            if not entry:
                continue
            for key, v in entry.items():
                if "," not in key:
                    continue
                if not (key == g.metric or ("," not in g.metric and key.split(",", 1)[0] == g.metric)):
                    continue
                checked += 1
                bad = not isinstance(v, (int, float)) or (v < g.value if g.below else v > g.value)
                if bad:
                    rel = "below" if g.below else "above"
                    failures.append(f"{name} {key} = {v if not isinstance(v, float) else f'{v:.4g}'} "
                                    f"is {rel} {g.value:g}")
        if not checked:
            where = f"task {g.task}" if g.task else "any task"
            failures.append(f"{'--fail-below' if g.below else '--fail-above'} {g.text}: "
                            f"{where} reported no metric {g.metric}")
    return failures


# ---- helpers -------------------------------------------------------------------------------
def cache_path(out: Path, model_hash: str, dtype: str | None) -> Path:
    return out.parent / f".{out.name}.cache" / f"{model_hash[:16]}-{dtype or 'stored'}.jsonl"


def load_results(path: str | Path) -> dict:
    """A results.json (or an evaluate artifact directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise InputError(f"{p}: no such results file")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: malformed JSON ({e})") from None


def read_history(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def append_history(path: Path, records: list[dict]) -> None:
    """Append one line per record (O_APPEND, fsync), so concurrent or killed runs never interleave."""
    if not records:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _history_key(model_hash, task_hash, limit, dtype) -> tuple:
    return (model_hash, task_hash, limit, dtype, PROTOCOL_VERSION)


# ---- the stage -----------------------------------------------------------------------------
def run(c: EvaluateConfig) -> EvaluateResult:
    c.validate()
    rt = runtime.start(device=c.device)
    clean = False
    try:
        with StageOutput(STAGE, c.out, lock=c.lock, lock_timeout=c.lock_timeout, if_stale=c.if_stale,
                         runtime=rt) as o:
            res = _run(c, rt, o)
        clean = True
        return res
    finally:
        runtime.stop(rt, clean=clean)


def _run(c: EvaluateConfig, rt, output: StageOutput) -> EvaluateResult:
    gates = c.gates()
    out = output.out
    started = time.time()
    model_dir = Path(c.model)
    read_manifest(model_dir)  # a clear error for a missing or incomplete checkpoint
    model_hash = manifest_hash(model_dir)
    if c.adapter is not None:  # results, caches and history belong to the model with its adapter
        both = f"{model_hash}+{manifest_hash(resolve_adapter_dir(c.adapter))}"
        model_hash = hashlib.sha256(both.encode()).hexdigest()

    # Tasks: every failure is recorded against the task and the others still run.
    failed, failed_codes, tasks, task_hashes = {}, {}, [], {}
    for spec in find_tasks(list(c.tasks)):
        name = spec.yaml.stem
        try:
            t = load_task(spec.yaml, c.data_path, builtin=spec.builtin)
            name = t.name
            if name in task_hashes or name in failed:
                raise InputError(f"{t.where('name')}: task name {name!r} is used by another task file")
            for note in t.notes:
                console.warn(note)
            task_hashes[name] = t.task_hash()
            tasks.append(t)
        except GlmctlError as e:
            name = name if name not in failed else f"{name} ({spec.yaml})"
            failed[name], failed_codes[name] = str(e), e.exit_code
            console.log(f"glmctl: error: task {name}: {e}")

    stale_config = {"tasks": task_hashes, "limit": c.limit, "dtype": c.dtype, "protocol_version": PROTOCOL_VERSION,
                    **({"model_with_adapter": model_hash} if c.adapter is not None else {})}
    if c.if_stale and not failed:
        if out is not None:
            if is_up_to_date(out, STAGE, stale_config, [model_dir]):
                prev = load_results(out)
                if not prev.get("failed"):
                    console.log(f"{out}: up to date (model {model_hash[:12]}, {len(tasks)} tasks)")
                    return EvaluateResult(out=out, status=UP_TO_DATE, results=prev,
                                          gate_failures=check_gates(gates, prev))
        elif c.history is not None:
            done = {_history_key(r.get("model_manifest_sha256"), r.get("task_hash"), r.get("limit"), r.get("dtype"))
                    for r in read_history(Path(c.history)) if r.get("status") == "ok"}
            keep = [t for t in tasks
                    if _history_key(model_hash, task_hashes[t.name], c.limit, c.dtype) not in done]
            for t in tasks:
                if t not in keep:
                    console.log(f"{t.name}: up to date in {c.history}")
            tasks = keep
            if not tasks:
                return EvaluateResult(status=UP_TO_DATE)

    session = open_model(model_dir, dtype=c.dtype, device=rt.device, adapter=c.adapter)
    model = session.model
    cache = None
    if out is not None:
        cache = RequestCache(cache_path(out, model_hash, c.dtype), write=rt.is_main)
        if cache.loaded:
            console.log(f"resuming: {cache.loaded} cached requests from {cache.path}")
    rt.barrier()
    ev = Evaluator(model, session.tokenizer, session.ids, c.batch_size, cache, c.limit, c.show_progress and rt.is_main)
    console.log(f"evaluate: {session.describe()}, {len(tasks)} tasks")

    outcomes, configs = [], {}
    for t in tasks:
        t0 = time.time()
        try:
            with torch.no_grad():
                o = ev.run_task(t)
        except GlmctlError as e:
            failed[t.name], failed_codes[t.name] = str(e), e.exit_code
            console.log(f"glmctl: error: task {t.name}: {e}")
            continue
        outcomes.append(o)
        configs[t.name] = {**t.to_dict(), "effective": o.settings}
        console.log(f"{t.name}: {o.n_effective} {'documents' if t.type == 'lm' else 'examples'} "
                    f"in {time.time() - t0:.1f}s")
    for name in failed:
        configs.setdefault(name, {"task": name, "error": failed[name]})

    now = _dt.datetime.now(_dt.timezone.utc)
    run_config = {"model": "glmctl", "model_args": str(model_dir), "model_manifest_sha256": model_hash,
                  "batch_size": c.batch_size, "limit": c.limit, "dtype": c.dtype or "stored", "adapter": c.adapter,
                  "device": str(rt.device), "tensor_parallel_size": tp.tp_size(),
                  "quantization": model.config.quantization}
    meta = {"date": now.timestamp(), "date_iso": now.isoformat(), "glmctl_version": __version__,
            "model_name": str(model_dir), "model_name_sanitized": _sanitize(str(model_dir)),
            "git_hash": None, "total_evaluation_time_seconds": str(round(time.time() - started, 3))}
    results = build_results(outcomes, failed, configs, task_hashes, run_config, meta)
    gate_failures = check_gates(gates, results)
    res = EvaluateResult(out=out, status=FAILED_GATE if gate_failures else COMPLETE, results=results, failed=failed,
                         failed_codes=failed_codes, gate_failures=gate_failures,
                         resumed=cache.loaded if cache else 0)

    if rt.is_main:
        if out is not None:
            _write_artifact(output, results, outcomes, stale_config, model_dir, res)
            if cache is not None and not failed:
                cache.remove()
                try:
                    cache.path.parent.rmdir()
                except OSError:
                    pass
        if c.history is not None:
            recs = []
            for o in outcomes:
                recs.append({"time": now.isoformat(), "model": str(model_dir), "model_manifest_sha256": model_hash,
                             "task": o.task.name, "task_hash": task_hashes[o.task.name], "status": "ok",
                             "metrics": main_metrics(results["results"][o.task.name]),
                             "n_samples": o.n_effective, "limit": c.limit, "dtype": c.dtype,
                             "quantization": model.config.quantization, "glmctl_version": __version__,
                             "protocol_version": PROTOCOL_VERSION, "out": str(out) if out else None})
            for name, msg in failed.items():
                recs.append({"time": now.isoformat(), "model": str(model_dir), "model_manifest_sha256": model_hash,
                             "task": name, "task_hash": task_hashes.get(name), "status": "failed", "error": msg,
                             "limit": c.limit, "dtype": c.dtype, "glmctl_version": __version__,
                             "protocol_version": PROTOCOL_VERSION})
            append_history(Path(c.history), recs)
    for msg in res.gate_failures:
        console.log(f"glmctl: gate: {msg}")
    del model, ev, cache, session
    gc.collect()
    rt.barrier()
    return res


def _sanitize(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "__" for ch in name)


def _write_artifact(output: StageOutput, results: dict, outcomes, stale_config: dict, model_dir: Path,
                    res) -> None:
    with output.writer(stale_config, [model_dir]) as w:
        (w.path / "results.json").write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n",
                                             encoding="utf-8")
        with open(w.path / "samples.jsonl", "w", encoding="utf-8") as f:
            for o in outcomes:
                for s in o.samples:
                    f.write(json.dumps(s, ensure_ascii=False, default=str) + "\n")
        w.summary.update({name: main_metrics(results["results"][name]) for name in results["versions"]})
        if res.failed:
            w.summary["failed"] = dict(res.failed)
        if res.gate_failures:
            w.summary["gate_failures"] = list(res.gate_failures)
            w.status = "failed-gate"
