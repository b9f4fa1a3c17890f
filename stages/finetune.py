"""Stage `glmctl finetune`: adapt a checkpoint to a task with LoRA (on an fp or INT8/INT4 base),
P-tuning v2 or full fine-tuning (docs/finetune.md).

    validate options -> data (a JSONL file, or a built-in task written into OUT/data/) -> runtime
    -> open_model(BASE) -> examples (bad lines skipped and reported), packed to --seq-len
    -> adapters attached, base frozen (lora, ptuning) | every weight trains (full)
    -> glmctl.training: the pre-training Trainer and loop (global batch over data-parallel ranks
       and micro-batches, loss over the global batch's target tokens, checkpoints, metrics.jsonl,
       loss.png, --resume auto)
    -> OUT/final: an adapter directory (lora, ptuning) or a native checkpoint (full);
       --merge: OUT/merged, a native checkpoint with the LoRA update folded in

A single-process fp32 CPU run stopped at any moment (even kill -9) and resumed with
``resume="auto"`` ends with bit-identical weights, as pre-training does.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from glmctl import adapters, console, runtime
from glmctl import finetune_data as fd
from glmctl import finetune_tasks
from glmctl import train_utils as tu
from glmctl.artifacts import ArtifactWriter, manifest_hash
from glmctl.checkpoint import save_model
from glmctl.errors import EXIT_INTERRUPTED, GlmctlError, InputError, UsageError
from glmctl.session import open_model
from glmctl.stage import StageResult
from glmctl.training import ModelWeights, Trainer, engine_problems, resume_point, run_loop

METHODS = ("lora", "ptuning", "full")
MERGE_PRECISIONS = adapters.MERGE_PRECISIONS
DEFAULT_LR = {"lora": 2e-3, "ptuning": 1e-2, "full": 5e-4}


@dataclass(frozen=True)
class FinetuneConfig:
    base: str
    data: str  # a .jsonl / .jsonl.zst file, or a built-in task name (glmctl.finetune_tasks.TASKS)
    out: str
    method: str = "lora"
    valid_data: str | None = None  # default: the built-in task's valid split, else 5 % of --data
    epochs: float | None = None  # default 3 unless steps is given
    steps: int | None = None
    lr: float | None = None  # default by method (DEFAULT_LR)
    min_lr: float | None = None  # default: 10 % of lr
    warmup: float = 0.05  # < 1: share of the run's samples; >= 1: steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    micro_batch_size: int = 8
    global_batch_size: int | None = None  # default: micro_batch_size x data-parallel size
    seq_len: int | None = None  # default: the base's max_sequence_length
    precision: str = "fp32"
    dropout: float = 0.0  # the base's attention and hidden dropout while training
    # LoRA
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = adapters.LINEAR_TARGETS
    adapter_dtype: str = "fp32"
    train_norms: bool = False  # adapters: the LayerNorms train too (saved in the adapter)
    train_tokens: bool = False  # adapters: the embedding rows of the training data's tokens train too
    # P-tuning v2
    prefix_length: int = 16
    prefix_projection: int | None = None  # hidden size of the reparameterisation MLP
    # merging (LoRA)
    merge: bool = False
    merge_precision: str = "full"  # quantized base: "full" precision or re-"quantized"
    # engine (as pretrain)
    zero_stage: int = 0
    deepspeed_config: str | None = None
    tensor_parallel: int = 1
    compile: bool = False
    batch_size_rampup: str | None = None
    save_interval: int | None = None  # default: a tenth of the run
    keep: int = 2
    eval_interval: int | None = None
    eval_samples: int = 64
    log_interval: int = 10
    resume: str | None = None
    max_wall_time: float | None = None
    seed: int = 1234
    device: str | None = None

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0 or self.deepspeed_config is not None

    def validate(self) -> None:
        c, p = self, []
        world = runtime.launcher_env()[0]
        if c.method not in METHODS:
            p.append(f"--method must be one of {', '.join(METHODS)}, got {c.method!r}")
        if c.adapter_dtype not in adapters.ADAPTER_DTYPES:
            p.append(f"--adapter-dtype must be fp32 or bf16, got {c.adapter_dtype!r}")
        if c.merge_precision not in MERGE_PRECISIONS:
            p.append(f"--merge-precision must be full or quantized, got {c.merge_precision!r}")
        if c.epochs is not None and c.steps is not None:
            p.append("give --epochs or --steps, not both")
        if c.epochs is not None and not c.epochs > 0:
            p.append(f"--epochs must be positive, got {c.epochs}")
        p += engine_problems(c, world, ("steps", "micro_batch_size", "global_batch_size", "seq_len", "save_interval",
                                        "eval_interval", "log_interval", "keep", "tensor_parallel", "eval_samples",
                                        "lora_rank", "prefix_length", "prefix_projection"))
        bad = [t for t in c.lora_targets if t not in adapters.LORA_TARGETS]
        if bad or not c.lora_targets:
            p.append(f"--lora-targets: choose from {', '.join(adapters.LORA_TARGETS)}, got {', '.join(bad) or 'none'}")
        if not 0 <= c.lora_dropout < 1:
            p.append(f"--lora-dropout must be within [0, 1), got {c.lora_dropout}")
        if c.method != "full" and (c.tensor_parallel > 1 or c.deepspeed):
            p.append("--tensor-parallel and DeepSpeed are for --method full; adapters train with data parallelism")
        if (c.train_norms or c.train_tokens) and c.method == "full":
            p.append("--train-norms / --train-tokens are for adapters (--method lora or ptuning); full fine-tuning "
                     "trains every weight")
        if c.merge and c.method != "lora":
            p.append("--merge folds a LoRA update into the weights; it needs --method lora")
        if p:
            raise UsageError("; ".join(p))

    def adapter_spec(self, token_ids: tuple[int, ...] = ()) -> adapters.AdapterSpec:
        """The adapter; ``token_ids``: the embedding rows that train (with --train-tokens)."""
        common = dict(dtype=self.adapter_dtype, seed=self.seed, norms=self.train_norms, token_ids=token_ids)
        if self.method == "lora":
            return adapters.AdapterSpec("lora", lora=adapters.LoraSpec(self.lora_rank, self.lora_alpha,
                                                                        self.lora_dropout, tuple(self.lora_targets)),
                                        **common)
        return adapters.AdapterSpec("ptuning", prefix=adapters.PrefixSpec(self.prefix_length, self.prefix_projection),
                                    **common)


class AdapterWeights:
    """A checkpoint of an adapter run is an adapter directory (plus trainer/): the base is not copied."""

    def __init__(self, spec: adapters.AdapterSpec, base: str):
        self.spec, self.base = spec, base

    def save(self, glm, path, *, tokenizer, stage, config_extra, inputs, summary, write_extra):
        config = {"adapter": self.spec.to_dict(), "base_manifest_sha256": manifest_hash(self.base),
                  **config_extra}
        with ArtifactWriter(path, stage=stage, config=config, inputs=inputs) as w:
            adapters.write_adapter_files(glm, self.spec, self.base, w.path)
            write_extra(w.path)
            w.summary.update(summary, adapter_bytes=(w.path / adapters.ADAPTER_WEIGHTS).stat().st_size)

    def load(self, glm, path) -> None:
        adapters.check_base(Path(path), adapters.read_adapter_config(Path(path)), self.base)
        adapters.load_adapter_weights(glm, Path(path))


# ---- the stage ---------------------------------------------------------------------------------
def run(config: FinetuneConfig) -> StageResult:
    c = config
    c.validate()
    out = Path(c.out)
    builtin = c.data in finetune_tasks.TASKS and not Path(c.data).exists()
    if not builtin and not Path(c.data).is_file():
        raise InputError(f"{c.data}: no such file (or built-in task: {', '.join(finetune_tasks.TASKS)})")
    resume = resume_point(c, out)
    rt = runtime.start(device=c.device, tp=c.tensor_parallel, deepspeed=c.deepspeed)
    clean = False
    try:
        result = _finetune(c, rt, builtin, resume)
        clean = True
    except GlmctlError as e:
        clean = e.exit_code == EXIT_INTERRUPTED
        raise
    finally:
        runtime.stop(rt, clean=clean)
    return result


def _data_files(c: FinetuneConfig, rt, builtin: bool) -> tuple[str, str | None]:
    if not builtin:
        return c.data, c.valid_data
    d = Path(c.out) / "data"
    if rt.rank == 0:
        finetune_tasks.write_task(c.data, d)
    rt.barrier()
    return str(d / "train.jsonl"), c.valid_data or str(d / "valid.jsonl")


def _finetune(c: FinetuneConfig, rt, builtin: bool, resume) -> StageResult:
    t0 = time.monotonic()
    run_dir = Path(c.out)
    if rt.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tu.remove_stale(run_dir)
    train_file, valid_file = _data_files(c, rt, builtin)
    # the base: fp32 master weights for full fine-tuning; a frozen base in the compute dtype
    if c.method == "full" or c.precision == "fp32":
        dtype = "fp32"
    else:
        dtype = c.precision
    s = open_model(c.base, dtype=dtype, device=rt.device)
    glm, tok, ids = s.model, s.tokenizer, s.ids
    if glm.config.quantization and c.method == "full":
        raise InputError(f"{c.base}: a quantized checkpoint cannot be fully fine-tuned (use --method lora)")
    seq_len = c.seq_len or glm.config.max_sequence_length
    # data
    train = fd.read_examples(train_file, tok, ids, seq_len)
    if valid_file is not None:
        valid_items = fd.read_examples(valid_file, tok, ids, seq_len).items
        train_items = train.items
    else:  # hold out 5 % of the examples (at least one), chosen by the seed
        order = torch.randperm(len(train.items), generator=torch.Generator().manual_seed(c.seed)).tolist()
        k = max(1, len(order) // 20)
        if len(order) < 2:
            raise InputError(f"{train_file}: one usable example; need at least 2 (one is held out) or --valid-data")
        valid_items = [train.items[i] for i in sorted(order[:k])]
        train_items = [train.items[i] for i in sorted(order[k:])]
    source = fd.FinetuneSource(fd.pack_examples(train_items, seq_len, ids, c.seed),
                               fd.pack_examples(valid_items, seq_len, ids, c.seed + 1), c.seed)
    final_batch = c.global_batch_size or c.micro_batch_size * rt.dp
    steps = c.steps or max(1, math.ceil((c.epochs or 3.0) * len(source.train) / final_batch))
    # the model: adapters attached and the base frozen, or every weight trains
    for m in glm.modules():
        if isinstance(m, nn.Dropout):
            m.p = c.dropout
    glm.use_fast_attention(True)
    spec = None
    if c.method != "full":
        rows = {x for prompt, target in train_items for x in prompt + target} | {ids["sop"], ids["eop"]}
        spec = c.adapter_spec(tuple(sorted(rows)) if c.train_tokens else ())
        adapters.attach(glm, spec)
        adapters.freeze_base(glm)
    cc = dataclasses.replace(c, lr=c.lr or DEFAULT_LR[c.method])
    inputs = [p for p in (c.base, train_file, valid_file) if p]
    weights = AdapterWeights(spec, c.base) if spec is not None else ModelWeights()
    tr = Trainer.for_model(cc, rt, glm, seq_len, source, c.base, run_dir, inputs, stage="finetune", steps=steps,
                           weights=weights)
    resolved = tr.begin(resume, dataclasses.asdict(cc), base_manifest_sha256=manifest_hash(c.base))
    console.log(f"finetune ({c.method}): {s.describe()}, {tr.trainable_parameters():,} of "
                f"{sum(p.numel() for p in glm.parameters()):,} parameters train; {len(train_items)} examples "
                f"({train.n_skipped} skipped) in {len(source.train)} sequences of {seq_len}, {len(valid_items)} "
                f"held out; {tr.total_steps} steps x {tr.final_batch} sequences, lr {tr.peak_lr:.3g}, {c.precision}")
    summary = run_loop(tr, resolved, t0)
    summary.update({"method": c.method, "examples": len(train_items), "skipped_lines": train.n_skipped,
                    "held_out_examples": len(valid_items)})
    final = tr.save(tu.FINAL, summary, resolved)
    if spec is not None:
        summary["adapter_bytes"] = (final / adapters.ADAPTER_WEIGHTS).stat().st_size
    if c.merge:
        summary["merged"] = str(_merge(c, glm, run_dir / "merged", inputs, rt))
    return StageResult(summary={**summary, "checkpoint": str(final)}, out=final)


def _merge(c: FinetuneConfig, glm, out: Path, inputs: list, rt) -> Path:
    """OUT/merged: the base with the LoRA update folded in (a quantized base: re-quantized, or in
    full precision, as --merge-precision says)."""
    if rt.rank == 0:
        model = adapters.merged_model(glm, c.merge_precision, where=str(out))
        save_model(model, out, tokenizer=c.base, stage="finetune-merge", inputs=inputs,
                   config_extra={"merge": {"adapter": str(Path(c.out) / tu.FINAL), "precision": c.merge_precision}})
        console.log(f"merged the LoRA update into {out}")
    rt.barrier()
    return out
