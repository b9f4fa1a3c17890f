"""results.json in lm-evaluation-harness's layout, the terminal table, and the history line.

    {
      "results":        {"mc_en": {"alias": "mc_en", "acc,none": 0.62, "acc_stderr,none": 0.05, ...},
                         "mc_en/test": {...}, ...},                 # groups / files when there are several
      "groups":         {"mc_en": {...}},                           # tasks that have sub-entries
      "group_subtasks": {"mc_en": ["mc_en/test", ...]},
      "configs":        {"mc_en": {"task": "mc_en", "output_type": "multiple_choice", "glm130b": {...}}},
      "versions":       {"mc_en": "1"},
      "n-shot":         {"mc_en": 0},
      "higher_is_better": {"mc_en": {"acc": true, ...}},
      "n-samples":      {"mc_en": {"original": 40, "effective": 40}},
      "config":         {"model": "glmctl", "model_args": "...", "batch_size": 8, "limit": null, ...},
      "task_hashes":    {"mc_en": "<sha256>"},
      "failed":         {"bad_task": "file:line: what is wrong"},   # glmctl: tasks that did not run
      "date": ..., "glmctl_version": ..., "model_name": ..., "total_evaluation_time_seconds": ...
    }

Values that cannot be computed (a standard error over one example) are "N/A", as in lm-eval.
"""
from __future__ import annotations

import math

from glmctl.evaluation.metrics import language_model_metrics
from glmctl.evaluation.runner import TaskOutcome, group_summary, higher_is_better, summarise

FILE_ALIAS = "   - "  # per-file entries: in results.json, not in the table


def _clean(metrics: dict) -> dict:
    return {k: ("N/A" if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v)
            for k, v in metrics.items()}


def task_entries(outcome: TaskOutcome) -> tuple[dict, list[str]]:
    """({entry name: metrics}, sub-entry names) for one task: the task (all examples pooled; with
    several files also the max and median over them), its groups when there are several
    (``TASK/GROUP``), its files when there are several (``TASK[/GROUP]/FILE``), Pile sets."""
    name = outcome.task.name
    entries = {name: {"alias": name, **_clean(group_summary(outcome.records))}}
    subs = []
    groups: dict[str, list] = {}
    for r in outcome.records:
        groups.setdefault(r.group, []).append(r)
    for g, rs in groups.items():
        gname = f"{name}/{g}" if len(groups) > 1 else name
        if len(groups) > 1:
            entries[gname] = {"alias": f" - {g}", **_clean(group_summary(rs))}
            subs.append(gname)
        if len(outcome.records) > 1:
            for r in rs:
                fname = f"{gname}/{r.rel}"
                entries[fname] = {"alias": f"{FILE_ALIAS}{r.rel}", **_clean(summarise([r]))}
                subs.append(fname)
    sets: dict[str, dict] = {}
    for r in outcome.records:
        for s, sums in r.by_set.items():
            acc = sets.setdefault(s, {})
            for k, v in sums.items():
                acc[k] = acc.get(k, 0) + v
    if sets:
        for s, sums in sorted(sets.items()):
            sname = f"{name}/{s}"
            m = language_model_metrics(sums["loss"], sums["tokens"], sums["words"], sums["bytes"])
            entries[sname] = {"alias": f" - {s}", **_clean({f"{k},none": v for k, v in m.items()})}
            subs.append(sname)
    return entries, subs


def build_results(outcomes: list[TaskOutcome], failed: dict[str, str], configs: dict, task_hashes: dict,
                  run_config: dict, meta: dict) -> dict:
    results, groups, group_subtasks = {}, {}, {}
    versions, n_shot, hib, n_samples = {}, {}, {}, {}
    for o in outcomes:
        entries, subs = task_entries(o)
        results.update(entries)
        name = o.task.name
        if subs:
            groups[name] = dict(entries[name])
            group_subtasks[name] = subs
        versions[name] = o.task.version
        n_shot[name] = 0
        hib[name] = {k.split(",", 1)[0]: higher_is_better(k) for k in entries[name]
                     if "," in k and "_stderr" not in k}
        n_samples[name] = {"original": o.n_original, "effective": o.n_effective}
    for name, msg in failed.items():
        results[name] = {"alias": name, "error": msg}
    return {
        "results": results,
        "groups": groups,
        "group_subtasks": group_subtasks,
        "configs": configs,
        "versions": versions,
        "n-shot": n_shot,
        "higher_is_better": hib,
        "n-samples": n_samples,
        "config": run_config,
        "task_hashes": task_hashes,
        "failed": failed,
        **meta,
    }


def main_metrics(entry: dict) -> dict:
    """The metrics of a results entry, without stderr/max/median and non-numbers."""
    return {k: v for k, v in entry.items()
            if "," in k and isinstance(v, (int, float)) and not k.split(",", 1)[0].endswith(("_stderr",))}


def table_rows(results: dict, other: dict | None = None) -> tuple[list[str], list[list]]:
    """lm-eval's table (Tasks, Version, Filter, n-shot, Metric, Value, Stderr); with ``other``
    (another results.json) two more columns: its value and the difference."""
    cols = ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "±", "Stderr"]
    if other is not None:
        cols += ["Other", "Δ"]
    rows = []
    for name, entry in results["results"].items():
        version = results["versions"].get(name.split("/")[0], "")
        alias = entry.get("alias", name)
        if alias.startswith(FILE_ALIAS):
            continue
        if "error" in entry:
            rows.append([alias, version, "", "", "FAILED", "", "", "", ""] + (["", ""] if other is not None else []))
            continue
        first = True
        for key, value in entry.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith(("_stderr", "_max", "_median")):
                continue
            se = entry.get(f"{metric}_stderr,{filt}", "")
            arrow = "↑" if higher_is_better(key) else "↓"
            row = [alias if first else "", version if first else "", filt, 0, metric, arrow,
                   value, "±" if isinstance(se, float) else "", se if isinstance(se, float) else ""]
            if other is not None:
                ov = other.get("results", {}).get(name, {}).get(key)
                if isinstance(ov, (int, float)) and isinstance(value, (int, float)):
                    row += [ov, value - ov]
                else:
                    row += ["", ""]
            rows.append(row)
            first = False
    return cols, rows
