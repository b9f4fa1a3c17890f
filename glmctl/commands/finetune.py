"""`glmctl finetune`: adapt a checkpoint to a task with LoRA, P-tuning v2 or full fine-tuning."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from glmctl import runtime
from glmctl.console import emit_json, parse_duration, print_table
from glmctl.errors import EXIT_CODES_HELP, UsageError
from glmctl.stages.finetune import FinetuneConfig as C, run

EPILOG = (
    "Examples:\n\n"
    "  glmctl finetune model --data numerals_zh --out ft-lora --method lora --epochs 20\n\n"
    "  glmctl finetune model-int4 --data train.jsonl --valid-data valid.jsonl --out ft-q --lora-rank 16\n\n"
    "  glmctl finetune model --data train.jsonl.zst --out ft-full --method full --resume auto\n\n"
    "  glmctl evaluate model glmctl/tasks/finetune/numerals_zh.yaml --adapter ft-lora\n\n"
    "Data: JSON lines {\"prompt\", \"target\"} or GLM-130B's task format (inputs_pretokenized, "
    "targets_pretokenized), optionally .jsonl.zst; unusable lines are skipped, counted and reported. "
    "LoRA and P-tuning write adapter directories (OUT/final), full fine-tuning native checkpoints.\n\n"
    + EXIT_CODES_HELP + " 4: stopped by SIGTERM/SIGINT or --max-wall-time after saving a checkpoint; "
    "rerun with --resume auto."
)


def register(app: typer.Typer) -> None:
    app.command("finetune", epilog=EPILOG)(finetune_cmd)


def finetune_cmd(
    base: Path = typer.Argument(..., help="Checkpoint to adapt (fp32/bf16/fp16; INT8/INT4 with LoRA or P-tuning)."),
    data: str = typer.Option(..., "--data", help="Training JSON lines (.jsonl / .jsonl.zst), or a built-in task: "
                                                 "numerals_zh."),
    out: Path = typer.Option(..., "--out", help="Run directory: step-N/, final/, latest, metrics.jsonl, loss.png "
                                                "(merged/ with --merge)."),
    method: str = typer.Option(C.method, "--method", help="lora, ptuning (P-tuning v2) or full."),
    valid_data: Optional[Path] = typer.Option(C.valid_data, "--valid-data",
                                              help="Held-out JSON lines (default: 5 % of --data; a built-in "
                                                   "task's valid split)."),
    epochs: Optional[float] = typer.Option(C.epochs, "--epochs", help="Passes over the data (default 3)."),
    steps: Optional[int] = typer.Option(C.steps, "--steps", help="Optimizer steps instead of --epochs."),
    lr: Optional[float] = typer.Option(C.lr, "--lr", help="Peak learning rate (default: lora 2e-3, ptuning 1e-2, "
                                                          "full 5e-4)."),
    min_lr: Optional[float] = typer.Option(C.min_lr, "--min-lr", help="End of the cosine decay (default lr / 10)."),
    warmup: float = typer.Option(C.warmup, "--warmup", help="Linear warm-up: a share of the run below 1, else "
                                                            "steps."),
    weight_decay: float = typer.Option(C.weight_decay, "--weight-decay", help="AdamW weight decay."),
    micro_batch_size: int = typer.Option(C.micro_batch_size, "--micro-batch-size",
                                         help="Packed sequences per forward pass per process."),
    global_batch_size: Optional[int] = typer.Option(C.global_batch_size, "--global-batch-size",
                                                    help="Sequences per optimizer step over all processes."),
    seq_len: Optional[int] = typer.Option(C.seq_len, "--seq-len", help="Packed sequence length (default: the "
                                                                       "base's maximum)."),
    precision: str = typer.Option(C.precision, "--precision", help="fp32, bf16 or fp16 (adapters: the frozen base "
                                                                   "is held in this dtype)."),
    dropout: float = typer.Option(C.dropout, "--dropout", help="The base's attention and hidden dropout."),
    lora_rank: int = typer.Option(C.lora_rank, "--lora-rank", help="LoRA rank r."),
    lora_alpha: float = typer.Option(C.lora_alpha, "--lora-alpha", help="LoRA alpha (the update is scaled by "
                                                                        "alpha / r)."),
    lora_dropout: float = typer.Option(C.lora_dropout, "--lora-dropout", help="Dropout on the LoRA input."),
    lora_targets: str = typer.Option(",".join(C.lora_targets), "--lora-targets",
                                     help="Comma-separated: query_key_value, dense, dense_h_to_4h, dense_4h_to_h, "
                                          "word_embeddings (the tied embedding / output matrix)."),
    adapter_dtype: str = typer.Option(C.adapter_dtype, "--adapter-dtype", help="fp32 or bf16 adapter weights."),
    train_norms: bool = typer.Option(C.train_norms, "--train-norms",
                                     help="LoRA / P-tuning: the LayerNorms' gains and biases train too (saved in "
                                          "the adapter, applied on load and merge)."),
    train_tokens: bool = typer.Option(C.train_tokens, "--train-tokens",
                                      help="LoRA / P-tuning: the (tied) embedding rows of the tokens in the training "
                                           "data train too (a delta per row, saved in the adapter)."),
    prefix_length: int = typer.Option(C.prefix_length, "--prefix-length", help="P-tuning v2 prefix tokens."),
    prefix_projection: Optional[int] = typer.Option(C.prefix_projection, "--prefix-projection",
                                                    help="Reparameterise the prefix through an MLP of this width."),
    merge: bool = typer.Option(C.merge, "--merge", help="Also write OUT/merged: a full checkpoint with the LoRA "
                                                        "update folded in."),
    merge_precision: str = typer.Option(C.merge_precision, "--merge-precision",
                                        help="Quantized base: merge into a 'full'-precision or re-'quantized' "
                                             "checkpoint."),
    zero_stage: int = typer.Option(C.zero_stage, "--zero-stage", help="DeepSpeed ZeRO stage 1-3 (full only)."),
    deepspeed_config: Optional[Path] = typer.Option(C.deepspeed_config, "--deepspeed-config",
                                                    help="DeepSpeed JSON (full only)."),
    tensor_parallel: int = typer.Option(C.tensor_parallel, "--tensor-parallel",
                                        help="Tensor-parallel size (full only)."),
    save_interval: Optional[int] = typer.Option(C.save_interval, "--save-interval",
                                                help="Checkpoint every N steps (default: a tenth of the run)."),
    keep: int = typer.Option(C.keep, "--keep", help="Keep the newest N step checkpoints."),
    eval_interval: Optional[int] = typer.Option(C.eval_interval, "--eval-interval",
                                                help="Held-out loss every N steps (default: the save interval)."),
    log_interval: int = typer.Option(C.log_interval, "--log-interval", help="A metrics.jsonl line every N steps."),
    resume: Optional[str] = typer.Option(C.resume, "--resume", help="auto or a checkpoint folder."),
    max_wall_time: Optional[str] = typer.Option(None, "--max-wall-time", metavar="DURATION",
                                                help="Save and exit (code 4) after this long, e.g. 30m."),
    seed: int = typer.Option(C.seed, "--seed", help="Adapter init, data order and packing."),
    device: Optional[str] = typer.Option(C.device, "--device", help="cpu or cuda (default: cuda when available)."),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as one JSON document."),
):
    """Fine-tune a checkpoint on a task: LoRA (fp or INT8/INT4 base), P-tuning v2 or every weight."""
    try:
        wall = parse_duration(max_wall_time) if max_wall_time is not None else None
    except ValueError as e:
        raise UsageError(f"--max-wall-time: {e}") from None
    opt = lambda p: None if p is None else str(p)  # noqa: E731
    cfg = C(base=str(base), data=data, out=str(out), method=method, valid_data=opt(valid_data), epochs=epochs,
            steps=steps, lr=lr, min_lr=min_lr, warmup=warmup, weight_decay=weight_decay,
            micro_batch_size=micro_batch_size, global_batch_size=global_batch_size, seq_len=seq_len,
            precision=precision, dropout=dropout, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()),
            adapter_dtype=adapter_dtype, train_norms=train_norms, train_tokens=train_tokens,
            prefix_length=prefix_length, prefix_projection=prefix_projection,
            merge=merge, merge_precision=merge_precision, zero_stage=zero_stage,
            deepspeed_config=opt(deepspeed_config), tensor_parallel=tensor_parallel, save_interval=save_interval,
            keep=keep, eval_interval=eval_interval, log_interval=log_interval, resume=resume, max_wall_time=wall,
            seed=seed, device=device)
    summary = run(cfg).summary
    if runtime.is_main_process():
        if json_out:
            emit_json(summary)
        else:
            print_table(f"{out}: fine-tuning done", ["what", "value"], [[k, v] for k, v in summary.items()])
