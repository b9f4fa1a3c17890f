"""`glmctl quantize`: INT8/INT4 checkpoint (RTN or GPTQ) with a quality report and gate."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from glmctl.errors import EXIT_CODES_HELP
from glmctl.console import emit_json, print_table
from glmctl.errors import GateFailed
from glmctl.stages.quantize import REPORT_COLUMNS, QuantizeConfig as C, report_rows, run

EPILOG = (
    "Examples:\n\n"
    "  glmctl quantize model model-int8 --bits 8 --eval tokens\n\n"
    "  glmctl quantize model model-int4 --bits 4 --group-size 128 --method gptq --calibration tokens "
    "--compare rtn:row,rtn:g128,int8 --max-ppl-increase 5\n\n"
    "  glmctl quantize model model-int4-e8 --bits 4 --group-size 128 --embedding-bits 8 --eval tokens "
    "--compare embfp\n\n"
    + EXIT_CODES_HELP + " 5: the quality gate (--max-ppl-increase) tripped; the artifact is written and "
    "marked failed-gate in its manifest."
)


def register(app: typer.Typer) -> None:
    app.command("quantize", epilog=EPILOG)(quantize_cmd)


def quantize_cmd(
    src: Path = typer.Argument(..., help="Floating-point native checkpoint."),
    out: Path = typer.Argument(..., help="Output checkpoint directory (written atomically)."),
    bits: int = typer.Option(C.bits, "--bits", help="Weight bits: 8 or 4."),
    group_size: Optional[int] = typer.Option(None, "--group-size",
                                             help="One scale per row and group of G input columns "
                                                  "(default: one per row, GLM-130B's scheme)."),
    method: str = typer.Option(C.method, "--method", help="rtn (round to nearest) or gptq (error-compensating, "
                                                        "needs --calibration)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration",
                                               help="Tokens directory for GPTQ (its tail is held out for the "
                                                    "report when --eval is not given)."),
    eval_tokens: Optional[Path] = typer.Option(None, "--eval", help="Tokens directory for the quality report."),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", metavar="PCT",
                                                     help="Quality gate: exit 5 when perplexity rises by more "
                                                          "than PCT percent over the parent."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", metavar="VARIANTS",
                                                help="Also evaluate these variants side by side (not written), "
                                                     "comma-separated: rtn, gptq, int8, rtn:row, gptq:g128, "
                                                     "int4:rtn:g64 ..."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Window length (default min(512, max length))."),
    eval_prefix: Optional[int] = typer.Option(None, "--eval-prefix",
                                              help="Bidirectional prefix tokens per window (default seq_len/4)."),
    calibration_samples: int = typer.Option(C.calibration_samples, "--calibration-samples", help="Calibration windows for GPTQ."),
    eval_samples: int = typer.Option(C.eval_samples, "--eval-samples", help="Evaluation windows."),
    batch_size: int = typer.Option(C.batch_size, "--batch-size", help="Windows per forward pass."),
    damp: float = typer.Option(C.damp, "--damp", help="GPTQ dampening, a fraction of the mean Hessian diagonal."),
    block_size: int = typer.Option(C.block_size, "--block-size", help="GPTQ lazy-update block (columns)."),
    act_order: bool = typer.Option(C.act_order, "--act-order/--no-act-order",
                                   help="GPTQ: visit columns by decreasing Hessian diagonal, group scales fixed up front [default: on]."),
    dtype: str = typer.Option(C.dtype, "--dtype", help="Compute dtype for calibration and evaluation."),
    embedding_bits: Optional[int] = typer.Option(None, "--embedding-bits",
                                                 help="Quantize the tied embedding/output layer too: 8 or 4 "
                                                      "(default: kept in full precision, as GLM-130B)."),
    embedding_group_size: Optional[int] = typer.Option(None, "--embedding-group-size", metavar="G",
                                                       help="Embedding scales per row and group of G columns "
                                                            "(default: per row for 8 bits, the largest G <= 128 "
                                                            "dividing the hidden size for 4; 0: per row)."),
    tp: Optional[int] = typer.Option(None, "--tp", help="Output tensor-parallel size (default: the source's). "
                                                        "Per-row scales are per output rank, as GLM-130B's."),
    report: bool = typer.Option(C.report, "--report/--no-report",
                                help="Evaluate parent vs quantized (layer by layer); --no-report skips it and the "
                                     "manifest says so."),
    activation_memory: str = typer.Option(C.activation_memory, "--activation-memory", metavar="SIZE",
                                          help="Calibration/evaluation activations kept in memory; beyond this "
                                               "they go to memory-mapped files beside OUT."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    if_stale: bool = typer.Option(False, "--if-stale", help="Do nothing when OUT was made from the same inputs "
                                                            "and options."),
    lock: bool = typer.Option(False, "--lock", help="Hold .OUT.lock beside OUT while running (exit 75 if another "
                                                    "run holds it)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON document."),
):
    """Quantize a checkpoint to INT8/INT4 and report its quality against the parent."""
    specs = [s for item in (compare or []) for s in item.split(",") if s.strip()]
    cfg = C(
        src=str(src), out=str(out), bits=bits, group_size=group_size, method=method,
        calibration=None if calibration is None else str(calibration),
        eval=None if eval_tokens is None else str(eval_tokens), max_ppl_increase=max_ppl_increase, compare=tuple(specs),
        seq_len=seq_len, eval_prefix=eval_prefix, calibration_samples=calibration_samples,
        eval_samples=eval_samples, batch_size=batch_size, damp=damp, block_size=block_size, act_order=act_order,
        dtype=dtype, tp=tp, embedding_bits=embedding_bits, embedding_group_size=embedding_group_size, report=report, activation_memory=activation_memory, device=device, if_stale=if_stale, lock="auto" if lock else None)
    result = run(cfg)
    report = result.report
    if json_out:
        emit_json({"status": "failed-gate" if result.gate_passed is False else "complete",
                   "skipped": result.up_to_date, **report})
    else:
        rows = report_rows(report)
        if rows:
            ev = report["eval"]
            print_table(f"{out}: quality on {ev['scored_tokens']} tokens ({ev['windows']} windows of "
                        f"{ev['seq_len']}) from {ev['source']}", REPORT_COLUMNS, rows)
        else:
            why = "--no-report" if not report else "no evaluation tokens"
            print(f"{out}: written without a quality report ({why})")
        if report.get("gate"):
            g = report["gate"]
            print(f"gate: ppl increase {report['quantized']['ppl_increase_pct']:+.3f}% "
                  f"{'<=' if g['passed'] else '>'} {g['max_ppl_increase_pct']}%: "
                  f"{'passed' if g['passed'] else 'FAILED'}")
    if result.gate_passed is False:
        raise GateFailed(f"{out}: perplexity increase {report['quantized']['ppl_increase_pct']:.3f}% exceeds "
                         f"--max-ppl-increase {report['gate']['max_ppl_increase_pct']}% (artifact kept, "
                         "marked failed-gate)")
