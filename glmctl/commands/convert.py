"""`glmctl convert`: import SAT / gather DeepSpeed / reshard TP / export SAT, verified by logits."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from glmctl.errors import EXIT_CODES_HELP
from glmctl.console import emit_json
from glmctl.stages.convert import ConvertConfig as C, run

EPILOG = (
    "Examples:\n\n"
    "  glmctl convert glm-130b-sat glm-130b --preset glm-130b\n\n"
    "  glmctl convert glm-130b glm-130b-tp4 --tp 4\n\n"
    "  glmctl convert runs/small model --tp 2\n\n"
    "  glmctl convert model model-sat --to sat\n\n"
    "  glmctl convert model model-hf --to hf --max-shard-size 5GB\n\n"
    "  glmctl convert model-hf model-back\n\n"
    "  glmctl convert model-int4 model-ft --merge-adapter ft-lora --merge-precision quantized\n\n"
    + EXIT_CODES_HELP + " A failed --verify exits 1 and leaves no output."
)


def register(app: typer.Typer) -> None:
    app.command("convert", epilog=EPILOG)(convert_cmd)


def convert_cmd(
    src: Path = typer.Argument(..., help="glmctl checkpoint, SAT checkpoint (latest + <iter>/mp_rank_XX_"
                                         "model_states.pt), pretrain run or step dir, DeepSpeed folder, or "
                                         "transformers export (convert --to hf)."),
    out: Path = typer.Argument(..., help="Output directory (built under a temporary name, manifest last)."),
    tp: Optional[int] = typer.Option(C.tp, "--tp", help="Output tensor-parallel size (default: the source's)."),
    to: str = typer.Option(C.to, "--to", help="Output format: glmctl, sat, or hf (a transformers directory "
                                              "with remote code, TP=1; docs/convert.md)."),
    dtype: Optional[str] = typer.Option(C.dtype, "--dtype", help="fp32, bf16 or fp16 for floating tensors "
                                                                 "(default: as stored; quantization scales are kept)."),
    preset: Optional[str] = typer.Option(C.preset, "--preset", help="Hyperparameters a SAT/DeepSpeed checkpoint "
                                                                    "lacks (head count, ids); must match its shapes."),
    num_attention_heads: Optional[int] = typer.Option(C.num_attention_heads, "--num-attention-heads",
                                                      help="Head count, when not given by --preset."),
    rope: Optional[str] = typer.Option(C.rope, "--rope",
                                       help="Rotary angles: exact (fp32; models trained with glmctl) or sat (SAT "
                                            "0.2.x's rule; the default for SAT imports). Default: the source's."),
    tokenizer: Optional[Path] = typer.Option(C.tokenizer, "--tokenizer",
                                             help="Tokenizer (or checkpoint) directory to attach; its padded vocab "
                                                  "must match (and its ids a recorded config.json's)."),
    verify: Optional[bool] = typer.Option(C.verify, "--verify/--no-verify",
                                          help="Compare source and result logits on random tokens with [gMASK] and "
                                               "[MASK] (default: when a TP=1 fp32 model fits in memory)."),
    tolerance: Optional[float] = typer.Option(C.tolerance, "--tolerance",
                                              help="Largest logit difference accepted by --verify (default: from "
                                                   "the dtypes)."),
    zero_master: bool = typer.Option(C.zero_master, "--zero-master",
                                     help="From a DeepSpeed pretrain step: take the fp32 ZeRO master weights, not "
                                          "the native ones."),
    max_shard_size: Optional[str] = typer.Option(C.max_shard_size, "--max-shard-size",
                                                 help="Split each rank's weights into files of at most this "
                                                      "size (default 10GiB; --to hf: 5GB)."),
    dequantize: bool = typer.Option(C.dequantize, "--dequantize",
                                    help="--to hf from a quantized checkpoint: export W = q * scale as float weights "
                                         "(--dtype picks the precision); without it such a source is refused."),
    merge_adapter: Optional[Path] = typer.Option(C.merge_adapter, "--merge-adapter",
                                                 help="Fold this LoRA adapter (adapter dir or finetune run, made on "
                                                      "SRC) into the weights: OUT is a TP=1 glmctl checkpoint "
                                                      "(docs/finetune.md). Wrong base: exit 3."),
    merge_precision: str = typer.Option(C.merge_precision, "--merge-precision",
                                        help="--merge-adapter on an INT8/INT4 SRC: merge into a 'full'-precision "
                                             "or re-'quantized' checkpoint."),
    iteration: Optional[str] = typer.Option(C.iteration, "--iteration", help="--to sat: the iteration written to "
                                                                             "`latest` (default: the source's, else "
                                                                             "'release')."),
    if_stale: bool = typer.Option(C.if_stale, "--if-stale", help="Do nothing when OUT was made from the same inputs "
                                                                 "and options."),
    lock: bool = typer.Option(False, "--lock", help="Hold .OUT.lock beside OUT while running (exit 75 if another "
                                                    "run holds it)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON document."),
):
    """Convert a checkpoint between formats and tensor-parallel sizes, streaming, with a logits check."""
    result = run(C(
        src=str(src), out=str(out), tp=tp, to=to, dtype=dtype, preset=preset,
        num_attention_heads=num_attention_heads, rope=rope,
        tokenizer=None if tokenizer is None else str(tokenizer),
        verify=verify, tolerance=tolerance, zero_master=zero_master, max_shard_size=max_shard_size,
        iteration=iteration, dequantize=dequantize,
        merge_adapter=None if merge_adapter is None else str(merge_adapter), merge_precision=merge_precision,
        if_stale=if_stale, lock="auto" if lock else None))
    if json_out:
        emit_json({"up_to_date": True, "out": str(out)} if result.up_to_date else {**result.summary, "out": str(out)})
        return
    if result.up_to_date:
        print(f"{out}: up to date")
        return
    summary = result.summary
    v = summary.get("verify")
    if "merged_adapter" in summary:
        check = f"max logit difference {v['max_logit_diff']:.3g} vs SRC + adapter" if v else "not verified"
        print(f"{out}: {summary['merged_adapter']} merged into {src} ({summary['merge_precision']} precision); {check}")
        return
    check = (f"max logit difference {v['max_logit_diff']:.3g} (tolerance {v['tolerance']:.3g})" if v
             else "not verified")
    q = summary.get("quantization")
    qtxt = f", int{q['bits']} {'per-row' if not q.get('group_size') else 'g' + str(q['group_size'])}" if q else ""
    print(f"{out}: {summary['format']} TP={summary['tp']}{qtxt}, {summary['tensors']} tensors from "
          f"{summary['source_format']} TP={summary['source_tp']}; {check}")
