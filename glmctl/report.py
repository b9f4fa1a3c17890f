"""A pipeline's summary: one row per artifact (stage, time, key numbers, rerun command) and a
Markdown report with the loss curve, the fp-vs-quantized comparison and generated samples.

It only reads manifests and the files stages already wrote; it never reruns anything.
"""
from __future__ import annotations

import datetime as dt
import json
import shlex
import shutil
from pathlib import Path

STAGE_ORDER = ["sample-corpus", "tokenizer", "tokenize", "pretrain", "convert", "quantize", "finetune", "evaluate"]


def _seconds(m: dict) -> float | None:
    s = m.get("summary", {})
    if "wall_s" in s:  # pretrain: the whole run, not the final save
        return float(s["wall_s"])
    try:
        a, b = dt.datetime.fromisoformat(m["started"]), dt.datetime.fromisoformat(m["finished"])
        return (b - a).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def _g(x, fmt="{:.4g}"):
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)


def key_numbers(m: dict) -> str:
    s, stage = m.get("summary", {}), m.get("stage")
    if stage == "sample-corpus":
        mb = sum(sum(src.get("bytes", {}).values()) for src in s.get("sources", [])) / 1e6
        langs = sorted({src.get("language") for src in s.get("sources", [])})
        return f"{mb:.1f} MB of text ({'+'.join(langs)}), {len(s.get('sources', []))} sources"
    if stage == "tokenizer":
        return f"{s.get('model_type')} {s.get('num_text_tokens')} pieces, vocab {s.get('vocab_size')}"
    if stage == "tokenize":
        return f"{s.get('documents'):,} docs, {s.get('tokens'):,} tokens, {_g(s.get('mb_per_s'))} MB/s"
    if stage == "pretrain":
        return (f"step {s.get('step')}, train loss {_g(s.get('train_loss'))}, held-out ppl "
                f"{_g(s.get('eval_ppl'))} (unigram {_g(s.get('unigram_ppl'))}), {_g(s.get('tokens_per_s'))} tok/s")
    if stage == "convert":
        v = s.get("verify") or {}
        ver = f", max logit diff {_g(v.get('max_logit_diff'))}" if v else ""
        return f"TP {s.get('source_tp')} -> {s.get('tp')} ({s.get('format')}){ver}"
    if stage == "quantize":
        q = s.get("quantize", {})
        qq = q.get("quantized", {})
        return (f"{qq.get('name')}: ppl {_g(q.get('parent', {}).get('ppl'))} -> {_g(qq.get('ppl'))} "
                f"({_g(qq.get('ppl_increase_pct'), '{:+.2f}')}%), top-1 agree {_g(qq.get('top1_agreement'))}")
    if stage == "finetune":
        size = f", adapter {s['adapter_bytes'] / 1024:.0f} KiB" if s.get("adapter_bytes") else ""
        return (f"{s.get('method')}: step {s.get('step')}, held-out loss {_g(s.get('eval_loss'))}, "
                f"{s.get('trainable_parameters', 0):,} trainable parameters{size}")
    if stage == "evaluate":
        parts = []
        for task, metrics in s.items():
            if not isinstance(metrics, dict):
                continue
            for k in ("acc,none", "acc,glm130b_beam_first_word", "exact_match,none", "bits_per_byte,none"):
                if k in metrics:
                    parts.append(f"{task} {k.split(',')[0]} {_g(metrics[k])}")
                    break
        return ", ".join(parts)
    return ""


def collect(root: Path) -> list[tuple[Path, dict]]:
    found = []
    for mpath in sorted(root.rglob("manifest.json")):
        if any(p.startswith(".") for p in mpath.relative_to(root).parts):
            continue
        if mpath.parent.name.startswith("step-"):
            continue
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            continue
        found.append((mpath.parent, m))
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(found, key=lambda pm: (order.get(pm[1].get("stage"), 99), pm[1].get("finished") or ""))


def rerun_command(m: dict) -> str:
    argv = list(m.get("argv") or [])
    if argv and argv[0].endswith("glmctl"):
        argv[0] = "glmctl"
    return shlex.join(argv)


def summary_rows(root: Path) -> list[list]:
    rows = []
    for path, m in collect(root):
        secs = _seconds(m)
        rows.append([m.get("stage"), str(path.relative_to(root.parent) if root.parent != path else path),
                     f"{secs:.0f}s" if secs is not None else "-", key_numbers(m), m.get("status")])
    return rows


def write_report(root: Path, out: Path | None = None, samples: Path | None = None) -> Path:
    out = out or root / "REPORT.md"
    items = collect(root)
    lines = [f"# glmctl pipeline report: {root}", "", "| stage | artifact | time | key numbers |",
             "| --- | --- | --- | --- |"]
    for path, m in items:
        secs = _seconds(m)
        lines.append(f"| {m.get('stage')} | `{path.relative_to(root)}` | "
                     f"{f'{secs:.0f} s' if secs is not None else '-'} | {key_numbers(m)} |")
    # loss curve
    for path, m in items:
        if m.get("stage") == "pretrain":
            png = path.parent / "loss.png"
            if png.exists():
                shutil.copy2(png, root / "loss.png")
                s = m.get("summary", {})
                lines += ["", "## Pre-training", "", "![loss curve](loss.png)", "",
                          f"Held-out perplexity {_g(s.get('eval_ppl'))} after {s.get('step')} steps "
                          f"({s.get('tokens'):,} tokens); a unigram model of the same corpus: "
                          f"{_g(s.get('unigram_ppl'))}."]
    # quantization
    quant = [(p, m) for p, m in items if m.get("stage") == "quantize"]
    if quant:
        lines += ["", "## Quantization (held-out tokens, against the fp parent)", "",
                  "| checkpoint | variant | ppl | ppl +% | mean KL | top-1 agreement |", "| --- | --- | --- | --- | --- | --- |"]
        for p, m in quant:
            q = m["summary"].get("quantize", {})
            lines.append(f"| `{p.name}` | fp parent | {_g(q.get('parent', {}).get('ppl'))} | | | |")
            for v in [q.get("quantized", {})] + q.get("compare", []):
                star = " (written)" if v is q.get("quantized") else ""
                lines.append(f"| `{p.name}` | {v.get('name')}{star} | {_g(v.get('ppl'))} | "
                             f"{_g(v.get('ppl_increase_pct'), '{:+.3f}')} | {_g(v.get('kl_mean'))} | "
                             f"{_g(v.get('top1_agreement'))} |")
    # evaluation side by side
    evals = [(p, m) for p, m in items if m.get("stage") == "evaluate"]
    if evals:
        keys = []
        for _, m in evals:
            for task, metrics in m["summary"].items():
                if isinstance(metrics, dict):
                    keys += [(task, k) for k in metrics if not (k.split(",")[0].endswith(("_max", "_median")))
                             and (task, k) not in keys]
        lines += ["", "## Evaluation", "", "| task | metric | " + " | ".join(f"`{p.name}`" for p, _ in evals) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in evals) + " |"]
        for task, k in keys:
            vals = [_g(m["summary"].get(task, {}).get(k, "")) for _, m in evals]
            lines.append(f"| {task} | {k} | " + " | ".join(vals) + " |")
    if samples and samples.exists():
        lines += ["", "## Generated samples", ""]
        for line in samples.read_text().splitlines():
            r = json.loads(line)
            lines += [f"- prompt: `{r.get('prompt')}`", f"  - output ({r.get('mask')}): {r.get('text')!r}"]
    lines += ["", "## Rerun a stage", "", "```bash"] + [rerun_command(m) for _, m in items] + ["```", ""]
    out.write_text("\n".join(lines))
    return out
