"""`glmctl evaluate`: GLM-130B task protocols, lm-eval-compatible results, built for cron."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from glmctl.errors import EXIT_CODES_HELP
from glmctl.console import emit_json, parse_duration, print_table, stdout_is_tty
from glmctl.errors import UsageError
from glmctl.evaluation.results import table_rows
from glmctl.runtime import is_main_process
from glmctl.stages.evaluate import EvaluateConfig as C, load_results, run

EPILOG = ("Examples:\n\n"
          "  glmctl evaluate model builtin --out eval/fp\n\n"
          "  glmctl evaluate model-int4 tasks/ --data-path data --out eval/int4 --compare eval/fp\n\n"
          "  cron: glmctl evaluate model tasks/ --data-path data --out eval/latest --lock --if-stale "
          "--history eval/history.jsonl --fail-below mmlu:acc=0.40\n\n"
          "TASK is a GLM-130B task YAML, a folder of them (searched recursively), a built-in task "
          "(cloze_en, cloze_zh, mc_en, mc_zh, ppl_en, ppl_zh) or `builtin` for all of them.\n\n"
          + EXIT_CODES_HELP + " Also: 3 when a task could not run (bad YAML or data; the other tasks "
          "still ran and results.json lists it under `failed`), 5 when a --fail-below/--fail-above "
          "gate tripped (results are still written).")


class _OptionalLockValue(TyperCommand):
    """``--lock`` takes an optional value: bare ``--lock`` uses the default path; a path is given
    as ``--lock=PATH`` (or ``--lock PATH`` when PATH ends in .lock)."""

    def parse_args(self, ctx, args):
        fixed, i = [], 0
        while i < len(args):
            a = args[i]
            if a == "--lock":
                if i + 1 < len(args) and args[i + 1].endswith(".lock"):
                    fixed.append(f"--lock={args[i + 1]}")
                    i += 2
                    continue
                fixed.append("--lock=auto")
            else:
                fixed.append(a)
            i += 1
        return super().parse_args(ctx, fixed)


def register(app: typer.Typer) -> None:
    app.command("evaluate", cls=_OptionalLockValue, epilog=EPILOG)(evaluate_cmd)


def evaluate_cmd(
    model: Path = typer.Argument(..., help="Checkpoint directory (native; fp or quantized)."),
    tasks: List[str] = typer.Argument(..., help="Task YAML files, folders of them, built-in task names, or `builtin`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact directory for results.json and "
                                       "samples.jsonl (needed for resume and for --if-stale without --history)."),
    data_path: Optional[Path] = typer.Option(None, "--data-path", help="Root that the YAML `path` fields are "
                                             "relative to (default: each YAML's own folder)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N examples per data file (LM: N "
                                        "documents); for quick checks."),
    batch_size: int = typer.Option(C.batch_size, "--batch-size", "-b", help="Requests per forward pass. Scores do not "
                                   "depend on it."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: as stored)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="LoRA / P-tuning adapter from `glmctl "
                                           "finetune` (made on MODEL)."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json as one JSON document."),
    lock: Optional[str] = typer.Option(None, "--lock", metavar="[=PATH]",
                                       help="Advisory lock against overlapping runs (default path: "
                                            "<out>/../.<out>.lock). Held by another run: exit 75."),
    lock_timeout: str = typer.Option("0", "--lock-timeout", help="Wait this long for the lock (90, 10m) "
                                     "instead of exiting 75 at once."),
    history: Optional[Path] = typer.Option(None, "--history", help="Append one JSON line per task run "
                                           "(time, model manifest hash, task hash, metrics)."),
    if_stale: bool = typer.Option(False, "--if-stale", help="Skip when results for this model and these "
                                  "tasks already exist (--out manifest, else --history)."),
    fail_below: List[str] = typer.Option([], "--fail-below", help="[TASK:]METRIC=VALUE: exit 5 when a metric "
                                         "is below VALUE (repeatable), e.g. acc=0.5 or mc_en:acc_norm,none=0.3."),
    fail_above: List[str] = typer.Option([], "--fail-above", help="[TASK:]METRIC=VALUE: exit 5 when a metric "
                                         "is above VALUE, e.g. ppl_en:bits_per_byte=1.2."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Another run's results.json (or its --out "
                                           "folder): print its values and the difference side by side."),
):
    """Evaluate a checkpoint on GLM-130B-format tasks; write lm-eval-compatible results.json."""
    try:
        timeout = parse_duration(lock_timeout)
    except ValueError as e:
        raise UsageError(f"--lock-timeout: {e}") from None
    other = load_results(compare) if compare is not None else None
    res = run(C(model=str(model), tasks=tuple(tasks), out=str(out) if out else None,
                             data_path=str(data_path) if data_path else None, limit=limit, batch_size=batch_size,
                             dtype=dtype, device=device, lock=lock, lock_timeout=timeout,
                             adapter=str(adapter) if adapter else None,
                             history=str(history) if history else None, if_stale=if_stale,
                             fail_below=tuple(fail_below), fail_above=tuple(fail_above)))
    if not is_main_process():
        res.raise_for_status()
        return
    if json_out:
        doc = dict(res.results or {})
        doc["glmctl"] = {"status": "up-to-date" if res.skipped else ("failed" if res.failed else "complete"),
                         "out": str(res.out) if res.out else None, "gate_failures": res.gate_failures,
                         "resumed_requests": res.resumed}
        emit_json(doc)
    elif res.results is not None:
        cols, rows = table_rows(res.results, other)
        title = f"{model}" + (f" vs {compare}" if compare is not None else "")
        if stdout_is_tty() and res.out is not None:
            title += f"  ->  {res.out}/results.json"
        print_table(title, cols, rows)
    res.raise_for_status()
