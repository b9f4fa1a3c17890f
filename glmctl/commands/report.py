"""`glmctl report`: summarise a pipeline folder (a table on stdout, a Markdown report on disk)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from glmctl.errors import EXIT_CODES_HELP
from glmctl.console import emit_json, print_table
from glmctl.errors import InputError
from glmctl.report import collect, rerun_command, summary_rows, write_report


def register(app: typer.Typer) -> None:
    app.command("report", epilog="Example: glmctl report demo --samples demo/samples.jsonl\n\n"
                + EXIT_CODES_HELP)(report_cmd)


def report_cmd(
    root: Path = typer.Argument(..., help="Folder holding the pipeline's artifacts (searched recursively)."),
    samples: Optional[Path] = typer.Option(None, help="Generated samples (JSON lines from glmctl generate)."),
    markdown: Optional[Path] = typer.Option(None, help="Where to write the report (default ROOT/REPORT.md)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary rows as JSON."),
):
    """Summarise a pipeline: stage, time and key numbers per artifact, and write REPORT.md."""
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    rows = summary_rows(root)
    md = write_report(root, markdown, samples)
    if json_out:
        emit_json({"rows": [dict(zip(["stage", "artifact", "time", "key_numbers", "status"], r)) for r in rows],
                   "report": str(md)})
        return
    print_table(f"pipeline {root}", ["stage", "artifact", "time", "key numbers", "status"], rows)
    print(f"\nreport: {md}")
    print("rerun a stage:")
    for _, m in collect(root):
        print(f"  {rerun_command(m)}")
