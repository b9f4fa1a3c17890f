"""`glmctl pretrain`: train a GLM with the blank-infilling objective, one CPU to DeepSpeed on many GPUs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from glmctl import runtime
from glmctl.errors import EXIT_CODES_HELP
from glmctl.console import emit_json, parse_duration, print_table
from glmctl.errors import UsageError
from glmctl.stages.pretrain import PretrainConfig as C, run

EPILOG = (
    "Examples:\n\n"
    "  glmctl pretrain --data tokens --out run --preset small --steps 300 --micro-batch-size 8\n\n"
    "  glmctl pretrain --data tokens --out run --resume auto          (continue after a stop or a crash)\n\n"
    "  torchrun --nproc_per_node 8 -m glmctl pretrain --data tokens --out run --preset glm-335m "
    "--precision bf16 --global-batch-size 256\n\n"
    "  deepspeed --hostfile hosts --no_local_rank --module glmctl pretrain --data tokens --out run "
    "--preset glm-10b --zero-stage 2 --tensor-parallel 4 --precision fp16\n\n"
    + EXIT_CODES_HELP + " 4: stopped by SIGTERM/SIGINT or --max-wall-time after saving a checkpoint; "
    "rerun with --resume auto."
)


def register(app: typer.Typer) -> None:
    app.command("pretrain", epilog=EPILOG)(pretrain_cmd)


def pretrain_cmd(
    data: Path = typer.Option(..., "--data", help="Tokens directory from `glmctl tokenize` (Megatron .bin/.idx)."),
    out: Path = typer.Option(..., "--out", help="Run directory: step-N/ checkpoints, final/, latest, metrics.jsonl, "
                                                "loss.png."),
    preset: Optional[str] = typer.Option(
        C.preset, "--preset", help="Model preset (default small, 1.9M): tiny, small, medium, glm-110m, glm-335m, "
                                   "glm-2b, glm-10b, glm-130b."),
    model_config: Optional[Path] = typer.Option(C.model_config, "--model-config",
                                                help="ModelConfig JSON instead of a preset."),
    init_from: Optional[Path] = typer.Option(C.init_from, "--init-from", help="Start from this checkpoint's weights "
                                                                              "(fresh optimizer and schedule)."),
    tokenizer: Optional[Path] = typer.Option(
        C.tokenizer, "--tokenizer", help="Tokenizer directory (default: the one the data was tokenized with). Sets "
                                         "the vocabulary and special-token ids."),
    seq_len: Optional[int] = typer.Option(C.seq_len, "--seq-len", help="Sequence length (default: the model's "
                                                                       "maximum)."),
    micro_batch_size: int = typer.Option(C.micro_batch_size, "--micro-batch-size",
                                         help="Sequences per forward pass per process."),
    global_batch_size: Optional[int] = typer.Option(C.global_batch_size, "--global-batch-size",
                                                    help="Sequences per optimizer step over all processes "
                                                         "(default micro x data-parallel size; the rest is "
                                                         "gradient accumulation)."),
    steps: Optional[int] = typer.Option(C.steps, "--steps", help="Optimizer steps (default 1000)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="Train on this many tokens instead (e.g. 5e6)."),
    lr: Optional[float] = typer.Option(C.lr, "--lr", help="Peak learning rate (default by model width: 8e-5 at "
                                                          "GLM-130B's, about 1e-3 for small)."),
    min_lr: Optional[float] = typer.Option(C.min_lr, "--min-lr", help="End of the cosine decay (default lr / 10)."),
    warmup: float = typer.Option(C.warmup, "--warmup", help="Linear warm-up: a share of the run below 1 (GLM-130B: "
                                                            "0.5 %), else a number of steps."),
    weight_decay: float = typer.Option(C.weight_decay, "--weight-decay",
                                       help="AdamW weight decay (not on biases/LayerNorms)."),
    grad_clip: float = typer.Option(C.grad_clip, "--grad-clip", help="Clip the global gradient norm to this."),
    adam_beta2: float = typer.Option(C.adam_betas[1], "--adam-beta2",
                                     help="AdamW beta2 (GLM-130B: 0.95; beta1 is 0.9)."),
    dropout: float = typer.Option(C.dropout, "--dropout", help="Attention and hidden dropout."),
    embedding_grad_shrink: float = typer.Option(C.embedding_grad_shrink, "--embedding-grad-shrink",
                                                help="Embedding gradient shrink alpha (1 = off)."),
    embedding_init_std: Optional[float] = typer.Option(C.embedding_init_std, "--embedding-init-std",
                                                       help="Std of the word embedding at init (default 1/hidden; "
                                                            "GLM-130B's presumed value is 0.0052)."),
    precision: str = typer.Option(C.precision, "--precision",
                                  help="fp32, bf16 or fp16 (fp16 with dynamic loss scaling)."),
    zero_stage: int = typer.Option(C.zero_stage, "--zero-stage", help="DeepSpeed ZeRO stage 1-3 (0: no DeepSpeed)."),
    deepspeed_config: Optional[Path] = typer.Option(C.deepspeed_config, "--deepspeed-config",
                                                    help="DeepSpeed JSON; batch sizes are filled in from the "
                                                         "options."),
    tensor_parallel: int = typer.Option(C.tensor_parallel, "--tensor-parallel",
                                        help="Tensor-parallel size (divides the world size)."),
    activation_checkpointing: bool = typer.Option(C.activation_checkpointing, "--activation-checkpointing",
                                                  help="Recompute each layer in the backward pass (less memory)."),
    exact_attention: bool = typer.Option(C.exact_attention, "--exact-attention",
                                         help="Attention as GLM-130B's explicit fp32-softmax math instead of "
                                              "the fused kernel (same values within float tolerance, slower)."),
    compile_: bool = typer.Option(C.compile, "--compile", envvar="GLMCTL_PRETRAIN_COMPILE",
                                  help="torch.compile the network for training steps: faster steps after a "
                                       "compilation of a minute or two (needs a C++ compiler on CPU)."),
    batch_size_rampup: Optional[str] = typer.Option(C.batch_size_rampup, "--batch-size-rampup",
                                                    metavar="START,STEP,SAMPLES",
                                                    help="Grow the global batch from START by STEP over SAMPLES "
                                                         "samples (GLM-130B: 192,24,5493164)."),
    save_interval: Optional[int] = typer.Option(C.save_interval, "--save-interval",
                                                help="Checkpoint every N steps (default: a tenth of the run)."),
    keep: int = typer.Option(C.keep, "--keep", help="Keep the newest N step checkpoints (final/ is always kept)."),
    eval_interval: Optional[int] = typer.Option(C.eval_interval, "--eval-interval",
                                                help="Held-out loss every N steps (default: the save interval)."),
    eval_samples: int = typer.Option(C.eval_samples, "--eval-samples", help="Held-out sequences per evaluation."),
    log_interval: int = typer.Option(C.log_interval, "--log-interval", help="A metrics.jsonl line every N steps."),
    resume: Optional[str] = typer.Option(C.resume, "--resume", help="auto (newest complete checkpoint in --out, or "
                                                                    "start fresh) or a checkpoint folder."),
    max_wall_time: Optional[str] = typer.Option(None, "--max-wall-time", metavar="DURATION",
                                                help="Save and exit (code 4) after this long, e.g. 90m, 2h."),
    seed: int = typer.Option(C.seed, "--seed", help="Initialisation, data order and objective sampling."),
    valid_data: Optional[Path] = typer.Option(C.valid_data, "--valid-data", help="Held-out tokens directory "
                                                                                 "(default: the last "
                                                                                 "--valid-fraction of --data)."),
    valid_fraction: float = typer.Option(C.valid_fraction, "--valid-fraction",
                                         help="Share of --data's windows held out."),
    instruction_data: Optional[Path] = typer.Option(C.instruction_data, "--instruction-data",
                                                    help="JSON lines of {\"prompt\", \"target\"} mixed in (MIP)."),
    mip_ratio: float = typer.Option(C.mip_ratio, "--mip-ratio", help="Share of sequences from --instruction-data."),
    mask_ratio: float = typer.Option(C.mask_ratio, "--mask-ratio",
                                     help="Share of sequences using [MASK] (the rest [gMASK])."),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as one JSON document."),
):
    """Pre-train a GLM with the [MASK]/[gMASK] blank-infilling objective."""
    try:
        wall = parse_duration(max_wall_time) if max_wall_time is not None else None
        n_tokens = int(float(tokens)) if tokens is not None else None
    except ValueError as e:
        raise UsageError(f"--max-wall-time / --tokens: {e}") from None
    opt = lambda p: None if p is None else str(p)  # noqa: E731
    cfg = C(
        data=str(data), out=str(out), preset=preset, model_config=opt(model_config), init_from=opt(init_from),
        tokenizer=opt(tokenizer), seq_len=seq_len, micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size, steps=steps, tokens=n_tokens, lr=lr, min_lr=min_lr, warmup=warmup,
        weight_decay=weight_decay, grad_clip=grad_clip, adam_betas=(C.adam_betas[0], adam_beta2), dropout=dropout,
        embedding_grad_shrink=embedding_grad_shrink, embedding_init_std=embedding_init_std,
        precision=precision, zero_stage=zero_stage, deepspeed_config=opt(deepspeed_config),
        tensor_parallel=tensor_parallel, activation_checkpointing=activation_checkpointing,
        exact_attention=exact_attention, compile=compile_,
        batch_size_rampup=batch_size_rampup, save_interval=save_interval, keep=keep, eval_interval=eval_interval,
        eval_samples=eval_samples, log_interval=log_interval, resume=resume, max_wall_time=wall, seed=seed,
        valid_data=opt(valid_data), valid_fraction=valid_fraction, instruction_data=opt(instruction_data),
        mip_ratio=mip_ratio, mask_ratio=mask_ratio)
    summary = run(cfg).summary
    if runtime.is_main_process():
        if json_out:
            emit_json(summary)
        else:
            print_table(f"{out}: pre-training done", ["what", "value"], [[k, v] for k, v in summary.items()])
