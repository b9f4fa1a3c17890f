"""Stage `glmctl pretrain`: train a GLM with GLM-130B's objective and stability recipe (spec §4.5, §5).

    validate options -> runtime (one process | torchrun: DDP x TP | DeepSpeed ZeRO 1-3)
    -> tokenizer + model config -> data (windows, held-out split, unigram baseline, vocab check)
    -> model (DeepNorm init, embedding gradient shrink), AdamW -> resume
    -> loop: global batch = samples [c, c + B) built on the fly by glmctl.objective, split over
       data-parallel ranks and micro-batches; loss = sum of Part-B token losses / their count in
       the global batch; non-finite steps skipped and counted; lr by consumed samples
    -> held-out evaluation, checkpoints (step-N/, latest, keep), metrics.jsonl, loss.png -> final/

The result does not depend on the number of processes: every sample is a pure function of
(seed, global sample index), and the loss is normalised over the global batch. A single-process
fp32 CPU run stopped at any moment (even kill -9) and resumed with ``resume="auto"`` ends with
bit-identical weights: data position, optimizer, loss scale and RNG states are in every checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmctl import console
from glmctl.errors import EXIT_INTERRUPTED, GlmctlError, InputError, UsageError

PRECISIONS = ("fp32", "bf16", "fp16")
STATE_FORMAT = "glmctl-pretrain-state"
EVAL_SEED_OFFSET = 7919  # held-out samples use their own generator stream, fixed for the whole run


@dataclass
class PretrainConfig:
    data: str
    out: str
    preset: str | None = None  # default "small" unless model_config / init_from is given
    model_config: str | None = None
    init_from: str | None = None  # start from a native checkpoint's weights (fresh optimizer)
    tokenizer: str | None = None
    seq_len: int | None = None  # default: the model's max_sequence_length
    micro_batch_size: int = 4
    global_batch_size: int | None = None  # default: micro_batch_size x data-parallel size
    steps: int | None = None  # default 1000 unless tokens is given
    tokens: int | None = None
    lr: float | None = None  # default: train_utils.default_lr(hidden size)
    min_lr: float | None = None  # default: 10 % of lr
    warmup: float = 0.005  # < 1: share of the run's samples (spec: 0.5 %); >= 1: steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    dropout: float = 0.1
    embedding_grad_shrink: float = 0.1
    embedding_init_std: float | None = None  # default 1/hidden_size (GLM.init_weights explains why)
    precision: str = "fp32"
    zero_stage: int = 0
    deepspeed_config: str | None = None
    tensor_parallel: int = 1
    activation_checkpointing: bool = False
    exact_attention: bool = False  # the explicit fp32-softmax math instead of the fused kernel
    compile: bool = False  # torch.compile the network for training steps (not under DeepSpeed)
    batch_size_rampup: str | None = None  # "START,INCREMENT,SAMPLES"
    save_interval: int | None = None  # default: a tenth of the run
    keep: int = 2
    eval_interval: int | None = None  # default: save_interval
    eval_samples: int = 64
    log_interval: int = 10
    resume: str | None = None  # "auto" or a checkpoint folder
    max_wall_time: float | None = None  # seconds
    seed: int = 1234
    valid_data: str | None = None
    valid_fraction: float = 0.02
    instruction_data: str | None = None
    mip_ratio: float = 0.05
    mask_ratio: float = 0.3
    mask_prob: float = 0.15
    span_lambda: float = 3.0
    gmask_min_ratio: float = 0.2
    samples_per_sequence: int = 4
    fault_nan_steps: tuple[int, ...] = field(default=())  # testing aid: make these steps' loss NaN


# ---- validation ------------------------------------------------------------------------------
def validate(c: PretrainConfig, world: int) -> None:
    """Every problem with the options at once, as one UsageError (before any file is read)."""
    p = []
    if c.steps is not None and c.tokens is not None:
        p.append("give --steps or --tokens, not both")
    for name in ("steps", "tokens", "micro_batch_size", "global_batch_size", "seq_len", "save_interval",
                 "eval_interval", "log_interval", "keep", "tensor_parallel", "eval_samples"):
        v = getattr(c, name)
        if v is not None and v < 1:
            p.append(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if c.precision not in PRECISIONS:
        p.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {c.precision!r}")
    if c.zero_stage not in (0, 1, 2, 3):
        p.append(f"--zero-stage must be 0, 1, 2 or 3, got {c.zero_stage}")
    if c.lr is not None and c.lr <= 0 or c.min_lr is not None and c.min_lr < 0:
        p.append("--lr must be positive and --min-lr non-negative")
    if c.lr is not None and c.min_lr is not None and c.min_lr > c.lr:
        p.append(f"--min-lr {c.min_lr} is above --lr {c.lr}")
    if c.warmup < 0 or c.weight_decay < 0 or c.grad_clip <= 0:
        p.append("--warmup and --weight-decay must be non-negative and --grad-clip positive")
    if not 0 <= c.dropout < 1:
        p.append(f"--dropout must be within [0, 1), got {c.dropout}")
    if c.embedding_init_std is not None and not c.embedding_init_std > 0:
        p.append(f"--embedding-init-std must be positive, got {c.embedding_init_std}")
    if not 0 < c.embedding_grad_shrink <= 1:
        p.append(f"--embedding-grad-shrink must be within (0, 1], got {c.embedding_grad_shrink}")
    if not 0 < c.valid_fraction < 0.5:
        p.append(f"--valid-fraction must be within (0, 0.5), got {c.valid_fraction}")
    if c.tensor_parallel >= 1 and world % c.tensor_parallel:
        p.append(f"world size {world} is not divisible by --tensor-parallel {c.tensor_parallel}")
    dp = max(1, world // max(1, c.tensor_parallel))
    unit = c.micro_batch_size * dp
    if c.global_batch_size is not None and unit >= 1 and c.global_batch_size % unit:
        p.append(f"--global-batch-size {c.global_batch_size} is not divisible by --micro-batch-size "
                 f"{c.micro_batch_size} x {dp} data-parallel processes")
    if c.batch_size_rampup is not None:
        from glmctl.train_utils import Rampup
        try:
            r = Rampup.parse(c.batch_size_rampup)
            final = c.global_batch_size or unit
            if r.start % unit or r.increment % unit or r.start < 1 or r.increment < 1 or r.samples < 1:
                p.append(f"--batch-size-rampup: start and increment must be positive multiples of "
                         f"micro batch x data-parallel size = {unit}")
            elif final > r.start and (final - r.start) % r.increment:
                p.append(f"--batch-size-rampup: global batch {final} - start {r.start} is not a multiple "
                         f"of the increment {r.increment}")
        except ValueError as e:
            p.append(f"--batch-size-rampup: {e}")
    if c.resume not in (None, "auto") and not Path(c.resume).is_dir():
        p.append(f"--resume: {c.resume} is not a checkpoint folder (use 'auto' or a step-N folder)")
    if c.deepspeed_config is not None and not Path(c.deepspeed_config).is_file():
        p.append(f"--deepspeed-config: {c.deepspeed_config}: no such file")
    from glmctl.objective import ObjectiveConfig
    p += ObjectiveConfig(seq_len=c.seq_len or 512, mask_ratio=c.mask_ratio, mask_prob=c.mask_prob,
                         span_lambda=c.span_lambda, gmask_min_ratio=c.gmask_min_ratio,
                         samples_per_sequence=c.samples_per_sequence, mip_ratio=c.mip_ratio).problems()
    if p:
        raise UsageError("; ".join(p))


# ---- runtime -----------------------------------------------------------------------------------
@dataclass
class Runtime:
    """Process layout: world = tensor-parallel size x data-parallel size; ``owns_group`` when
    this stage created the process group (and must tear it down)."""
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    tp: int = 1
    device: object = "cpu"
    deepspeed: bool = False
    owns_group: bool = False

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def all_reduce(self, t, op="sum", group=None):
        """In place on a CPU tensor (through the device for NCCL)."""
        if self.world > 1:
            import torch.distributed as dist
            x = t.to(self.device)
            dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
            t.copy_(x.cpu())
        return t

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def start_runtime(c: PretrainConfig) -> Runtime:
    import torch
    import torch.distributed as dist
    from glmctl.model import parallel as tp
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_ds = c.zero_stage > 0 or c.deepspeed_config is not None
    rt = Runtime(world=world, rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 tp=c.tensor_parallel, deepspeed=use_ds)
    rt.device = torch.device(f"cuda:{rt.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    elif world > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores between local ranks
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if (world > 1 or use_ds) and not dist.is_initialized():
        backend = "nccl" if rt.device.type == "cuda" else "gloo"
        if use_ds:
            for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
                os.environ.setdefault(k, v)
            if "MASTER_PORT" not in os.environ:
                import socket
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    os.environ["MASTER_PORT"] = str(s.getsockname()[1])
            import deepspeed
            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend)
        rt.owns_group = True
    tp.init_tensor_parallel(rt.tp)
    return rt


def stop_runtime(rt: Runtime) -> None:
    from glmctl.model import parallel as tp
    tp.reset_tensor_parallel()
    if rt.owns_group:
        import torch.distributed as dist
        gc.collect()  # DDP / DeepSpeed hold the group; release them before tearing it down
        dist.barrier()
        dist.destroy_process_group()


# ---- tokenizer, model config, data -------------------------------------------------------------
def find_tokenizer(c: PretrainConfig):
    """--tokenizer, else the tokenizer files of --init-from or of the data folder, else the
    tokenizer input recorded in the data's manifest. None when there is none."""
    from glmctl.tokenizer import Tokenizer
    if c.tokenizer is not None:
        return Tokenizer.load(c.tokenizer), c.tokenizer
    cands = [c.init_from, c.data]
    try:
        m = json.loads((Path(c.data) / "manifest.json").read_text())
        cands += [i.get("path") for i in m.get("inputs", [])]
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    for d in cands:
        if d and (Path(d) / "tokenizer.json").is_file() and (Path(d) / "tokenizer.model").is_file():
            return Tokenizer.load(d), str(d)
    return None, None


def resolve_model_config(c: PretrainConfig, tok):
    from glmctl.config import ModelConfig, get_preset
    if c.init_from is not None:
        base, source = ModelConfig.load(c.init_from), str(c.init_from)
        if base.quantization:
            raise InputError(f"{c.init_from}: a quantized checkpoint cannot be trained")
    elif c.model_config is not None:
        base, source = ModelConfig.load(c.model_config), str(c.model_config)
    else:
        base, source = get_preset(c.preset or "small"), f"preset {c.preset or 'small'}"
    cfg = base.replace(tensor_parallel_size=1)
    if tok is not None:
        over = tok.config_overrides()
        if c.init_from is not None or c.model_config is not None:
            if base.vocab_size < over["vocab_size"]:
                raise InputError(f"tokenizer {tok.source} has {over['vocab_size']} ids but the model's vocab_size "
                                 f"is {base.vocab_size} ({source})")
            over["vocab_size"] = base.vocab_size  # a larger embedding only adds padding rows
        cfg = cfg.replace(**over)
    seq_len = c.seq_len or cfg.max_sequence_length
    return cfg.replace(hidden_dropout=c.dropout, attention_dropout=c.dropout,
                       max_sequence_length=max(cfg.max_sequence_length, seq_len)), seq_len


def check_data_vocab(data, tok, vocab_size: int, c: PretrainConfig) -> None:
    """Every token id of the training and held-out data must be below the model's vocabulary."""
    sets = [(c.data, data.dataset)] + ([(c.valid_data, data.valid_dataset)] if c.valid_data else [])
    for where, ds in sets:
        made_with = ds.meta.get("vocab_size")
        if tok is not None and made_with not in (None, tok.vocab_size):
            raise InputError(f"{where} was tokenized with a {made_with}-id vocabulary, but the tokenizer "
                             f"{tok.source} has {tok.vocab_size} ids (pass the tokenizer the data was made with)")
        if made_with is not None and made_with <= vocab_size:
            continue  # every id is below the vocabulary the shards were written with
        top = max((int(s.tokens().max()) for s in ds.shards if s.num_tokens), default=-1)
        if top >= vocab_size:
            raise InputError(f"{where}: token id {top} is outside the model's vocabulary of {vocab_size} ids "
                             f"(tokenizer / model mismatch)")


def load_instructions(path: str, tok) -> list[tuple[list[int], list[int]]]:
    """MIP data: JSON lines with string fields "prompt" and "target"."""
    if tok is None:
        raise UsageError("--instruction-data needs a tokenizer (--tokenizer DIR) to encode the prompts")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            prompt, target = r["prompt"], r["target"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{p}:{n}: expected a JSON object with string fields \"prompt\" and \"target\"") from None
        if not isinstance(prompt, str) or not isinstance(target, str) or not target:
            raise InputError(f"{p}:{n}: \"prompt\" and \"target\" must be strings, target non-empty")
        out.append((tok.encode(prompt), tok.encode(target, allow_special=False)))
    if not out:
        raise InputError(f"{p}: no instruction samples")
    return out


# ---- the network with its loss ----------------------------------------------------------------
def objective_module(glm):
    """GLM + cross-entropy summed over the scored (Part B) tokens; the logits are computed for
    those tokens only. One module so that DDP / DeepSpeed wrap forward and loss together.
    ``compiled`` (a torch.compile of the GLM, static shapes) serves the training forward only."""
    import torch.nn.functional as F
    from torch import nn
    from glmctl.model import parallel as tp

    class GLMObjective(nn.Module):
        def __init__(self):
            super().__init__()
            self.glm = glm
            self.compiled = []  # a list: a compiled module stored as an attribute would be a submodule

        def forward(self, tokens, positions, attention_mask, targets, loss_mask):
            body = self.compiled[0] if self.compiled and self.training else self.glm
            h = body(tokens, positions, attention_mask, return_hidden=True)[loss_mask]
            logits = tp.gather_last_dim(F.linear(tp.copy_to_tp(h), self.glm.transformer.word_embeddings.weight))
            return F.cross_entropy(logits.float(), targets[loss_mask], reduction="sum")

    return GLMObjective()


def _rng_state() -> dict:
    import torch
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}


# ---- the trainer -------------------------------------------------------------------------------
class Trainer:
    """The model, optimizer and counters of one run, and the three things done with them:
    ``train_step``, ``evaluate`` and ``save`` / ``load`` (checkpoints)."""

    def __init__(self, c: PretrainConfig, rt: Runtime, mcfg, seq_len: int, data, tok_dir, instructions, run_dir: Path,
                 inputs: list):
        import torch
        from glmctl import objective as obj
        from glmctl import train_utils as tu
        from glmctl.model import GLM
        from glmctl.model import parallel as tp
        self.c, self.rt, self.data, self.tok_dir, self.instructions = c, rt, data, tok_dir, instructions
        self.run_dir, self.inputs, self.seq_len = run_dir, inputs, seq_len
        self.ocfg = obj.ObjectiveConfig(seq_len=seq_len, mask_ratio=c.mask_ratio, mask_prob=c.mask_prob,
                                        span_lambda=c.span_lambda, gmask_min_ratio=c.gmask_min_ratio,
                                        samples_per_sequence=c.samples_per_sequence,
                                        mip_ratio=c.mip_ratio if instructions else 0.0)
        self.ids = obj.SpecialIds.from_dict(mcfg.special_token_ids())
        # model: fp32 master weights, DeepNorm init (spec §2.7), embedding gradient shrink (§5.3)
        self.glm = GLM(mcfg).init_weights(c.seed, embedding_std=c.embedding_init_std)
        self.glm.embedding_grad_shrink = c.embedding_grad_shrink
        self.glm.activation_checkpointing = c.activation_checkpointing
        self.glm.use_fast_attention(not c.exact_attention)  # same values, fused kernels (SelfAttention._sdpa)
        if c.init_from is not None:
            from glmctl.checkpoint import read_state_dict
            self.glm.load_state_dict(read_state_dict(c.init_from, tp.tp_size(), tp.tp_rank())[1])
        self.glm.to(rt.device)
        self.module = objective_module(self.glm)
        if c.compile and not rt.deepspeed:  # fuses RoPE, DeepNorm, GeGLU...; compiles at the first step
            self.module.compiled.append(torch.compile(self.glm))
        torch.manual_seed(c.seed * 1000 + rt.dp_rank)  # dropout: same in a TP group, different across DP
        # schedule, counted in samples (spec §5.2)
        self.final_batch = c.global_batch_size or c.micro_batch_size * rt.dp
        self.rampup = tu.Rampup.parse(c.batch_size_rampup) if c.batch_size_rampup else None
        self.total_steps, total_samples = tu.plan_steps(
            steps=c.steps if c.steps is not None or c.tokens is not None else 1000,
            samples=-(-c.tokens // seq_len) if c.tokens is not None else None,
            final_batch=self.final_batch, rampup=self.rampup)
        self.peak_lr = c.lr or tu.default_lr(mcfg.hidden_size)
        self.min_lr = c.min_lr if c.min_lr is not None else 0.1 * self.peak_lr
        warm = (c.warmup * total_samples if c.warmup < 1 else
                tu.plan_steps(steps=int(c.warmup), samples=None, final_batch=self.final_batch, rampup=self.rampup)[1])
        self.lr_kw = dict(peak=self.peak_lr, min_lr=self.min_lr, warmup_samples=int(warm), decay_samples=total_samples)
        # optimizer: AdamW, no weight decay on biases and LayerNorms
        params = [p for p in self.glm.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": c.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        adam = dict(lr=self.peak_lr, betas=tuple(c.adam_betas), eps=c.adam_eps)
        self.engine = self.ddp = None
        if rt.deepspeed:
            import deepspeed
            self.engine, self.opt, _, _ = deepspeed.initialize(
                model=self.module, optimizer=torch.optim.AdamW(groups, **adam), config=self.deepspeed_config(),
                mpu=_DeepSpeedMPU() if rt.tp > 1 else None)
            if self.engine.zero_optimization_stage() == 3:  # the tied output layer reads the embedding
                deepspeed.zero.register_external_parameter(self.module, self.glm.transformer.word_embeddings.weight)
            self.fwd = self.engine
        else:
            self.opt = torch.optim.AdamW(groups, **adam, fused=True)
            if rt.dp > 1:
                self.ddp = torch.nn.parallel.DistributedDataParallel(self.module, process_group=tp.dp_group())
            self.fwd = self.ddp or self.module
        self.scaler = tu.LossScaler(enabled=c.precision == "fp16" and not rt.deepspeed)
        self.step = self.consumed = self.skipped = 0
        self.elapsed_before = 0.0
        self.eval_seqs, self.unigram_loss = self.held_out()

    def deepspeed_config(self) -> dict:
        c, rt = self.c, self.rt
        ds = json.loads(Path(c.deepspeed_config).read_text()) if c.deepspeed_config else {}
        want = {"train_batch_size": self.final_batch, "train_micro_batch_size_per_gpu": c.micro_batch_size,
                "gradient_accumulation_steps": self.final_batch // (c.micro_batch_size * rt.dp)}
        for k, v in want.items():
            if k in ds and ds[k] != v:
                raise UsageError(f"--deepspeed-config: {k} = {ds[k]} disagrees with the batch options ({v})")
            ds[k] = v
        ds.setdefault("gradient_clipping", c.grad_clip)
        ds.setdefault("zero_optimization", {"stage": c.zero_stage})
        if c.precision == "fp16":  # GLM-130B's dynamic loss scale (spec §5.2)
            ds.setdefault("fp16", {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                                   "loss_scale_window": 2000, "hysteresis": 2, "min_loss_scale": 1})
        elif c.precision == "bf16":
            ds.setdefault("bf16", {"enabled": True})
        ds.setdefault("steps_per_print", 1 << 30)
        return ds

    # ---- batches ---------------------------------------------------------------------------
    def batch(self, indices, kind=None, valid=False) -> dict:
        from glmctl import objective as obj
        if valid:
            seqs = [obj.build_sequence(self.data.valid_chunk(k), obj.sample_rng(self.c.seed + EVAL_SEED_OFFSET, k),
                                       self.ocfg, self.ids, kind=obj.GMASK) for k in indices]
        else:
            chunks = self.data.train_chunks(indices)
            seqs = [obj.build_sequence(ch, obj.sample_rng(self.c.seed, i), self.ocfg, self.ids, self.instructions)
                    for ch, i in zip(chunks, indices)]
        return seqs

    def held_out(self):
        """This rank's held-out sequences ([gMASK], fixed for the run) and the unigram baseline's
        loss on exactly the tokens the model is scored on (all ranks' sequences)."""
        import numpy as np
        from glmctl import objective as obj
        from glmctl.train_utils import unigram_logprobs
        n_valid = len(self.data.valid_index)
        n = max(self.rt.dp, min(self.c.eval_samples, n_valid) // self.rt.dp * self.rt.dp)  # equal share per rank
        ks = [k % n_valid for k in range(n)]
        seqs = self.batch(ks, valid=True)
        logp = unigram_logprobs(self.data.unigram_counts(self.glm.config.vocab_size))
        scored = np.concatenate([s.targets[s.loss] for s in seqs])
        return seqs[self.rt.dp_rank::self.rt.dp], float(-logp[scored].mean())

    def autocast(self):
        import torch
        if self.rt.deepspeed or self.c.precision == "fp32":
            return contextlib.nullcontext()
        half = torch.bfloat16 if self.c.precision == "bf16" else torch.float16
        return torch.autocast(self.rt.device.type, dtype=half)

    # ---- one optimizer step ----------------------------------------------------------------
    def train_step(self) -> dict:
        import torch
        from glmctl import objective as obj
        from glmctl import train_utils as tu
        from glmctl.model import parallel as tp
        c, rt = self.c, self.rt
        gb = tu.global_batch_at(self.consumed, self.final_batch, self.rampup)
        accum = gb // (c.micro_batch_size * rt.dp)
        if self.engine is not None and self.engine.train_batch_size() != gb:
            self.engine.set_train_batch_size(gb)
        # micro-batch j of this rank: global samples consumed + (j * dp + dp_rank) * micro + [0, micro)
        micro = []
        for j in range(accum):
            start = self.consumed + (j * rt.dp + rt.dp_rank) * c.micro_batch_size
            micro.append(obj.collate(self.batch(list(range(start, start + c.micro_batch_size))), rt.device))
        count = rt.all_reduce(torch.tensor([float(sum(int(b["loss_mask"].sum()) for b in micro))]),
                              group=tp.dp_group())
        lr = tu.lr_at(self.consumed + gb, **self.lr_kw)
        for g in self.opt.param_groups:
            g["lr"] = lr
        # the loss is the mean over the global batch's scored tokens; DDP / DeepSpeed average over
        # data-parallel ranks (x dp) and DeepSpeed divides by the accumulation steps (x accum)
        factor = rt.dp / float(count) * (accum if self.engine is not None else self.scaler.scale)
        fault = (self.step + 1) in c.fault_nan_steps
        loss_sum = torch.zeros((), dtype=torch.float64)
        for j, b in enumerate(micro):
            sync = self.ddp.no_sync() if self.ddp is not None and j < accum - 1 else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    s = self.fwd(b["tokens"], b["positions"], b["attention_mask"], b["targets"], b["loss_mask"])
                loss_sum += s.detach().double().cpu()
                loss = s * factor * (float("nan") if fault else 1.0)
                if self.engine is not None:
                    self.engine.backward(loss)
                    self.engine.step()
                else:
                    loss.backward()
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
            skipped_before, self.skipped = self.skipped, int(self.engine.skipped_steps)
            ok = self.skipped == skipped_before
            scale = float(getattr(self.opt, "cur_scale", 1.0)) if c.precision == "fp16" else 1.0
        else:
            params = [p for g in self.opt.param_groups for p in g["params"]]
            if self.scaler.enabled:
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0 / self.scaler.scale)
            norm = float(tu.grad_norm(self.glm.named_parameters(), tp.tp_group(), tp.tp_size(), tp.tp_rank()))
            ok = math.isfinite(norm)
            if ok:
                tu.clip_grads_(params, norm, c.grad_clip)
                self.opt.step()
            else:
                self.skipped += 1
            scale = self.scaler.scale
            self.scaler.update(overflow=not ok)
            self.opt.zero_grad(set_to_none=True)
        loss_sum = rt.all_reduce(loss_sum, group=tp.dp_group())
        self.step += 1
        self.consumed += gb
        return {"loss": float(loss_sum) / float(count), "lr": lr, "grad_norm": norm, "loss_scale": scale,
                "skipped": not ok, "batch_size": gb, "scored_tokens": int(count)}

    def evaluate(self) -> float:
        """Mean loss per scored token on the held-out [gMASK] sequences (all ranks together)."""
        import torch
        from glmctl import objective as obj
        from glmctl.model import parallel as tp
        fwd = self.engine if self.engine is not None else self.module
        self.module.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        mb = self.c.micro_batch_size
        with torch.no_grad():
            for i in range(0, len(self.eval_seqs), mb):
                b = obj.collate(self.eval_seqs[i:i + mb], self.rt.device)
                with self.autocast():
                    s = fwd(b["tokens"], b["positions"], b["attention_mask"], b["targets"], b["loss_mask"])
                tot += torch.tensor([float(s), float(b["loss_mask"].sum())], dtype=torch.float64)
        self.module.train()
        tot = self.rt.all_reduce(tot, group=tp.dp_group())
        return float(tot[0] / tot[1])

    # ---- checkpoints -----------------------------------------------------------------------
    def state(self, rngs: list) -> dict:
        keep_opt = self.engine is None and self.rt.tp == 1
        return {"format": STATE_FORMAT, "version": 1, "step": self.step, "consumed_samples": self.consumed,
                "skipped_steps": self.skipped, "elapsed_s": self.elapsed(), "seed": self.c.seed,
                "seq_len": self.seq_len, "global_batch_size": self.final_batch, "world_size": self.rt.world,
                "tensor_parallel": self.rt.tp, "loss_scaler": self.scaler.state_dict(), "rng": rngs,
                "optimizer": self.opt.state_dict() if keep_opt else None}

    @contextlib.contextmanager
    def full_weights(self):
        """The model with whole (gathered) tensors: under ZeRO-3 each rank holds only a slice."""
        if self.engine is not None and self.engine.zero_optimization_stage() == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.glm.parameters()), modifier_rank=None):
                yield self.glm
        else:
            yield self.glm

    def save(self, name: str, summary: dict, config: dict) -> Path:
        """Write RUN/<name>/ (native weights + trainer/), then `latest`, the plot, and prune."""
        import torch
        from glmctl import train_utils as tu
        from glmctl.artifacts import atomic_open
        from glmctl.checkpoint import save_model
        from glmctl.model import parallel as tp
        rt, path = self.rt, self.run_dir / name
        staging = None
        if self.engine is not None:  # collective: every rank writes its ZeRO partition
            staging = self.run_dir / f".ds-{name}"
            if rt.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            rt.barrier()
            self.engine.save_checkpoint(str(staging), tag="ds")
            rt.barrier()
        state = self.state(rt.gather_objects(_rng_state()))

        def extra(d):
            t = Path(d) / "trainer"
            t.mkdir(exist_ok=True)
            if tp.tp_rank() == 0:
                if staging is not None:
                    os.replace(staging, t / "deepspeed")
                with atomic_open(t / "state.pt") as f:
                    torch.save(state, f)
            if self.engine is None and rt.tp > 1:
                with atomic_open(t / f"optimizer-tp{tp.tp_rank():02d}.pt") as f:
                    torch.save(self.opt.state_dict(), f)

        with self.full_weights() as weights:
            if rt.dp_rank == 0:
                save_model(weights, path, tokenizer=self.tok_dir, stage="pretrain", config_extra={"pretrain": config},
                           inputs=self.inputs, summary={"step": self.step, **summary}, write_extra=extra)
        rt.barrier()
        if rt.rank == 0:
            tu.write_latest(self.run_dir, name)
            tu.prune_checkpoints(self.run_dir, self.c.keep)
            tu.write_loss_plot(tu.read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "loss.png",
                               title=f"glmctl pretrain {self.run_dir.name}", unigram_loss=self.unigram_loss)
        return path

    def load(self, path: Path) -> None:
        import torch
        from glmctl.checkpoint import read_state_dict
        from glmctl.model import parallel as tp
        f = path / "trainer" / "state.pt"
        if not f.is_file():
            raise InputError(f"{path}: no trainer/state.pt (not a pretrain checkpoint; "
                             f"use --init-from for weights only)")
        try:
            st = torch.load(f, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch raises several types for damaged files
            raise InputError(f"{f}: unreadable trainer state ({str(e).splitlines()[0]})") from None
        if st.get("format") != STATE_FORMAT:
            raise InputError(f"{f}: not a glmctl pretrain state (format {st.get('format')!r})")
        if st["seq_len"] != self.seq_len or st["global_batch_size"] != self.final_batch or st["seed"] != self.c.seed:
            console.warn(f"{path} was trained with seq_len {st['seq_len']}, global batch {st['global_batch_size']}, "
                         f"seed {st['seed']}; continuing with {self.seq_len}, {self.final_batch}, {self.c.seed}")
        if self.engine is not None:
            ds_dir = path / "trainer" / "deepspeed"
            if not ds_dir.is_dir():
                raise InputError(f"{path}: no trainer/deepspeed (written without DeepSpeed; resume without "
                                 f"--zero-stage / --deepspeed-config)")
            loaded, _ = self.engine.load_checkpoint(str(ds_dir), tag="ds", load_lr_scheduler_states=False)
            if loaded is None:
                raise InputError(f"{ds_dir}: DeepSpeed could not load the checkpoint")
        else:
            self.glm.load_state_dict(read_state_dict(path, tp.tp_size(), tp.tp_rank())[1])
            opt = st["optimizer"]
            if opt is None:
                of = path / "trainer" / f"optimizer-tp{tp.tp_rank():02d}.pt"
                if not of.is_file():
                    raise InputError(f"{path}: optimizer state was saved by DeepSpeed or another tensor-parallel "
                                     f"size; resume with the same --zero-stage / --tensor-parallel")
                opt = torch.load(of, weights_only=True, map_location="cpu")
            self.opt.load_state_dict(opt)
        self.scaler.load_state_dict(st["loss_scaler"])
        self.step, self.consumed, self.skipped = st["step"], st["consumed_samples"], st["skipped_steps"]
        self.elapsed_before = st["elapsed_s"]
        rngs = st["rng"]
        if len(rngs) != self.rt.world:
            console.warn(f"{path} was written by {len(rngs)} processes, now {self.rt.world}: dropout streams restart")
        mine = rngs[self.rt.rank] if len(rngs) == self.rt.world else rngs[0]
        torch.set_rng_state(mine["cpu"])
        if mine.get("cuda") is not None and self.rt.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"])

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t_start)


class _DeepSpeedMPU:
    """The model-parallel interface DeepSpeed asks for, over glmctl's tensor-parallel groups."""

    def get_model_parallel_rank(self):
        from glmctl.model import parallel as tp
        return tp.tp_rank()

    def get_model_parallel_world_size(self):
        from glmctl.model import parallel as tp
        return tp.tp_size()

    def get_model_parallel_group(self):
        from glmctl.model import parallel as tp
        return tp.tp_group()

    def get_data_parallel_group(self):
        from glmctl.model import parallel as tp
        return tp.dp_group()

    def get_data_parallel_rank(self):
        import torch.distributed as dist
        return dist.get_rank(group=self.get_data_parallel_group())

    def get_data_parallel_world_size(self):
        import torch.distributed as dist
        return dist.get_world_size(group=self.get_data_parallel_group())

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


# ---- the stage ---------------------------------------------------------------------------------
def is_main_process() -> bool:
    """Rank 0 (or no launcher): the one process that prints results."""
    return os.environ.get("RANK", "0") == "0"


def run(config: PretrainConfig) -> dict:
    """Train; returns the final summary. Raises GlmctlError(exit 4) after saving a checkpoint
    when stopped by SIGTERM / SIGINT or --max-wall-time."""
    c = config
    validate(c, int(os.environ.get("WORLD_SIZE", "1")))
    # resolve inputs: tokenizer, model config, data (numpy only: bad input fails in a second)
    if not Path(c.data).exists():
        raise InputError(f"{c.data}: no such token directory (make one with `glmctl tokenize`)")
    from glmctl import train_utils as tu
    tok, tok_dir = find_tokenizer(c)
    mcfg, seq_len = resolve_model_config(c, tok)
    data = tu.TrainData(c.data, seq_len, c.seed, c.valid_data, c.valid_fraction)
    if data.n_train < 1 or not data.valid_index:
        raise InputError(f"{c.data}: {data.dataset.num_tokens} tokens make {len(data.windows)} windows of "
                         f"{seq_len} tokens; need at least 2 (one is held out)")
    check_data_vocab(data, tok, mcfg.vocab_size, c)
    instructions = load_instructions(c.instruction_data, tok) if c.instruction_data else None
    resume = _resume_point(c, Path(c.out))
    if tok is None:
        console.warn(f"no tokenizer found for {c.data}: using the special-token ids of the model config")
    rt = start_runtime(c)
    was_quiet = console._quiet
    console.set_quiet(was_quiet or rt.rank != 0)
    clean = False
    try:
        out = _train(c, rt, tok_dir, mcfg, seq_len, data, instructions, resume)
        clean = True
        return out
    except GlmctlError as e:
        clean = e.exit_code == EXIT_INTERRUPTED  # every rank stopped at the same step
        raise
    finally:
        console.set_quiet(was_quiet)
        if clean:
            stop_runtime(rt)
        elif rt.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(c: PretrainConfig, rt: Runtime, tok_dir, mcfg, seq_len: int, data, instructions, resume) -> dict:
    from glmctl import train_utils as tu
    t0 = time.monotonic()
    run_dir = Path(c.out)
    if rt.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tu.remove_stale(run_dir)
    rt.barrier()
    inputs = [p for p in (c.data, tok_dir, c.valid_data, c.instruction_data, c.init_from) if p]
    # build the model and optimizer; resume
    tr = Trainer(c, rt, mcfg, seq_len, data, tok_dir, instructions, run_dir, inputs)
    if resume is not None:
        tr.load(resume)
        console.log(f"resumed from {resume} at step {tr.step} ({tr.consumed} samples)")
    if rt.rank == 0:
        tu.truncate_metrics(run_dir / "metrics.jsonl", tr.step)
    resolved = {**{k: v for k, v in dataclasses.asdict(c).items() if k not in ("out", "resume", "fault_nan_steps")},
                "seq_len": seq_len, "lr": tr.peak_lr, "min_lr": tr.min_lr, "global_batch_size": tr.final_batch,
                "steps": tr.total_steps, "warmup_samples": tr.lr_kw["warmup_samples"], "world_size": rt.world}
    ds = f", DeepSpeed ZeRO-{tr.engine.zero_optimization_stage()}" if tr.engine else ""
    console.log(f"pretrain: {mcfg.num_parameters() / 1e6:.1f}M parameters, {rt.world} process(es) "
                f"(TP {rt.tp} x DP {rt.dp}{ds}), "
                f"{data.n_train} training / {len(data.valid_index)} held-out windows of {seq_len}, "
                f"{tr.total_steps} steps x {tr.final_batch} sequences, lr {tr.peak_lr:.3g}, {c.precision}")
    # loop
    summary = _loop(tr, resolved, t0)
    # final checkpoint
    path = tr.save(tu.FINAL, summary, resolved)
    return {**summary, "checkpoint": str(path)}


def _resume_point(c: PretrainConfig, run_dir: Path) -> Path | None:
    from glmctl.artifacts import read_manifest
    from glmctl.train_utils import complete_checkpoints
    found = complete_checkpoints(run_dir)
    if c.resume is None:
        if found:
            raise UsageError(f"{run_dir} already holds checkpoints ({found[-1][1].name}); continue it with "
                             f"--resume auto, or choose another --out")
        return None
    if c.resume == "auto":
        if not found:
            console.log(f"--resume auto: no checkpoint in {run_dir}, starting from scratch")
            return None
        return found[-1][1]
    read_manifest(c.resume)  # exit 3 for an incomplete folder
    return Path(c.resume)


def _loop(tr: Trainer, resolved: dict, t0: float) -> dict:
    """Steps until the planned number, with logging, evaluation, checkpoints and stop requests."""
    import torch
    from glmctl import train_utils as tu
    c, rt = tr.c, tr.rt
    save_every = c.save_interval or max(1, tr.total_steps // 10)
    eval_every = c.eval_interval or save_every
    metrics = tr.run_dir / "metrics.jsonl"
    tr.t_start = time.monotonic()
    window = {"loss": [], "time": 0.0, "tokens": 0, "scored": 0}
    last = {}
    train_time, train_tokens = 0.0, 0

    def record(r: dict):
        if rt.rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(r) + "\n")

    def summary(eval_loss: float) -> dict:
        return {"step": tr.step, "samples": tr.consumed, "tokens": tr.consumed * tr.seq_len,
                "train_loss": last.get("loss"), "eval_loss": eval_loss, "eval_ppl": math.exp(min(50.0, eval_loss)),
                "unigram_ppl": math.exp(tr.unigram_loss), "skipped_steps": tr.skipped,
                "tokens_per_s": round(train_tokens / train_time, 1) if train_time else None,
                "wall_s": round(tr.elapsed(), 1), "parameters": tr.glm.config.num_parameters()}

    with tu.StopSignals() as sig, console.progress(tr.total_steps - tr.step, "pretrain", "step") as bar:
        while tr.step < tr.total_steps:
            ts = time.monotonic()
            m = tr.train_step()
            dt = time.monotonic() - ts
            train_time += dt
            train_tokens += m["batch_size"] * tr.seq_len
            window["time"] += dt
            window["tokens"] += m["batch_size"] * tr.seq_len
            window["scored"] += m["scored_tokens"]
            if math.isfinite(m["loss"]):
                window["loss"].append(m["loss"])
            if tr.step % c.log_interval == 0 or tr.step == tr.total_steps:
                loss = sum(window["loss"]) / len(window["loss"]) if window["loss"] else float("nan")
                last = {"step": tr.step, "samples": tr.consumed, "tokens": tr.consumed * tr.seq_len, "loss": loss,
                        "lr": m["lr"], "grad_norm": m["grad_norm"], "loss_scale": m["loss_scale"],
                        "skipped_steps": tr.skipped, "batch_size": m["batch_size"], "scored_tokens": window["scored"],
                        "tokens_per_s": round(window["tokens"] / window["time"], 1),
                        "elapsed_s": round(tr.elapsed(), 2)}
                record(last)
                window = {"loss": [], "time": 0.0, "tokens": 0, "scored": 0}
            bar.update(1, loss=m["loss"], lr=m["lr"], gnorm=m["grad_norm"], scale=m["loss_scale"],
                       tok_s=round(m["batch_size"] * tr.seq_len / dt))
            done = tr.step == tr.total_steps
            if tr.step % eval_every == 0 and not done:
                ev = tr.evaluate()
                record({"step": tr.step, "eval_loss": ev, "eval_ppl": math.exp(min(50.0, ev)),
                        "unigram_ppl": math.exp(tr.unigram_loss)})
            saved = tr.step % save_every == 0 and not done
            if saved:
                tr.save(tu.step_name(tr.step), summary(float("nan")), resolved)
            # stop requests: a signal on any rank, or the wall-clock budget (all ranks agree)
            flag = 2 if c.max_wall_time is not None and time.monotonic() - t0 >= c.max_wall_time else 0
            flag = max(flag, 1 if sig.received else 0)
            flag = int(rt.all_reduce(torch.tensor([flag]), op="max")[0])
            if flag and not done:
                why = "--max-wall-time reached" if flag == 2 else f"{sig.received or 'signal'} received"
                path = tr.run_dir / tu.step_name(tr.step)
                if not saved:
                    path = tr.save(tu.step_name(tr.step), summary(float("nan")), resolved)
                raise GlmctlError(f"{why}: checkpoint saved at {path}; continue with --resume auto",
                                  EXIT_INTERRUPTED)
    ev = tr.evaluate()
    out = summary(ev)
    record({"step": tr.step, "eval_loss": ev, "eval_ppl": out["eval_ppl"], "unigram_ppl": out["unigram_ppl"],
            "final": True})
    console.log(f"pretrain: step {tr.step}, held-out ppl {out['eval_ppl']:.2f} vs unigram {out['unigram_ppl']:.2f}, "
                f"{out['skipped_steps']} skipped steps, {out['tokens_per_s']} tokens/s")
    return out
