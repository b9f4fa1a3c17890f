"""The pre-training state of one process and what is done with it: ``Trainer`` (model, optimizer,
counters; ``train_step``, ``evaluate``, ``save`` / ``load``), the network-with-loss module that
DDP / DeepSpeed wrap, and the RNG state carried in checkpoints. ``glmctl.stages.pretrain`` drives
it; ``bench/pretrain.py`` drives it step by step.

One optimizer step (docs/glm130b.md §5.2): global batch = samples [c, c + B) built on the fly by
glmctl.objective, split over data-parallel ranks and micro-batches; loss = sum of Part-B token
losses / their count in the global batch; a step whose gradient norm is not finite is skipped and
counted; lr by consumed samples. Every sample is a pure function of (seed, global sample index),
so the result does not depend on the number of processes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glmctl import console
from glmctl import objective as obj
from glmctl import train_utils as tu
from glmctl.artifacts import atomic_open, read_manifest
from glmctl.checkpoint import read_state_dict, save_model
from glmctl.errors import EXIT_INTERRUPTED, GlmctlError, InputError, UsageError
from glmctl.model import GLM
from glmctl.model import parallel as tp
from glmctl.runtime import Runtime

STATE_FORMAT = "glmctl-pretrain-state"
PRECISIONS = ("fp32", "bf16", "fp16")
EVAL_SEED_OFFSET = 7919  # held-out samples use their own generator stream, fixed for the whole run


def engine_problems(c, world: int, positive: tuple[str, ...]) -> list[str]:
    """Option problems shared by every stage that trains on this engine (pretrain, finetune):
    ``c`` has their common fields (precision, lr, batch sizes, parallelism, resume, DeepSpeed);
    ``positive`` names the integer options that must be at least 1."""
    p = []
    for name in positive:
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
    if c.tensor_parallel >= 1 and world % c.tensor_parallel:
        p.append(f"world size {world} is not divisible by --tensor-parallel {c.tensor_parallel}")
    dp = max(1, world // max(1, c.tensor_parallel))
    unit = c.micro_batch_size * dp
    if c.global_batch_size is not None and unit >= 1 and c.global_batch_size % unit:
        p.append(f"--global-batch-size {c.global_batch_size} is not divisible by --micro-batch-size "
                 f"{c.micro_batch_size} x {dp} data-parallel processes")
    if c.batch_size_rampup is not None:
        try:
            r = tu.Rampup.parse(c.batch_size_rampup)
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
    return p


# ---- the network with its loss ----------------------------------------------------------------
class GLMObjective(nn.Module):
    """GLM + cross-entropy summed over the scored (Part B) tokens; the logits are computed for
    those tokens only. One module so that DDP / DeepSpeed wrap forward and loss together.
    ``compiled`` (a torch.compile of the GLM, static shapes) serves the training forward only."""

    def __init__(self, glm: GLM):
        super().__init__()
        self.glm = glm
        self.compiled = []  # a list: a compiled module stored as an attribute would be a submodule

    def forward(self, tokens, positions, attention_mask, targets, loss_mask):
        body = self.compiled[0] if self.compiled and self.training else self.glm
        h = body(tokens, positions, attention_mask, return_hidden=True)[loss_mask]
        return F.cross_entropy(self.glm.logits(h).float(), targets[loss_mask], reduction="sum")


# ---- RNG state (dropout streams) ----------------------------------------------------------------
def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


class DeepSpeedMPU:
    """The model-parallel interface DeepSpeed asks for, over glmctl's tensor-parallel groups."""

    def get_model_parallel_rank(self):
        return tp.tp_rank()

    def get_model_parallel_world_size(self):
        return tp.tp_size()

    def get_model_parallel_group(self):
        return tp.tp_group()

    def get_data_parallel_group(self):
        return tp.dp_group()

    def get_data_parallel_rank(self):
        return dist.get_rank(group=self.get_data_parallel_group())

    def get_data_parallel_world_size(self):
        return dist.get_world_size(group=self.get_data_parallel_group())

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


# ---- where batches come from, where weights go -------------------------------------------------
class PretrainSource:
    """Pre-training sequences: global sample i is built on the fly from training window i by the
    objective (glmctl.objective), seeded by (seed, i); held-out windows use [gMASK]."""

    def __init__(self, data: tu.TrainData, ocfg: obj.ObjectiveConfig, ids: obj.SpecialIds, seed: int,
                 vocab_size: int, instructions=None):
        self.data, self.ocfg, self.ids, self.seed, self.instructions = data, ocfg, ids, seed, instructions
        self.vocab_size = vocab_size

    def batch(self, indices) -> list:
        chunks = self.data.train_chunks(indices)
        return [obj.build_sequence(ch, obj.sample_rng(self.seed, i), self.ocfg, self.ids, self.instructions)
                for ch, i in zip(chunks, indices)]

    def held_out(self, dp: int, dp_rank: int, eval_samples: int):
        """This rank's held-out sequences ([gMASK], fixed for the run) and the unigram baseline's
        loss on exactly the tokens the model is scored on (all ranks' sequences)."""
        n_valid = len(self.data.valid_index)
        n = max(dp, min(eval_samples, n_valid) // dp * dp)  # equal share per rank
        seqs = [obj.build_sequence(self.data.valid_chunk(k % n_valid),
                                   obj.sample_rng(self.seed + EVAL_SEED_OFFSET, k % n_valid), self.ocfg, self.ids,
                                   kind=obj.GMASK) for k in range(n)]
        logp = tu.unigram_logprobs(self.data.unigram_counts(self.vocab_size))
        scored = np.concatenate([s.targets[s.loss] for s in seqs])
        return seqs[dp_rank::dp], float(-logp[scored].mean())


class ModelWeights:
    """A checkpoint's weights are the whole model (checkpoint.save_model / read_state_dict)."""

    def save(self, glm: GLM, path: Path, **kw) -> None:
        save_model(glm, path, **kw)

    def load(self, glm: GLM, path: Path) -> None:
        glm.load_state_dict(read_state_dict(path, tp.tp_size(), tp.tp_rank())[1])


# ---- the trainer -------------------------------------------------------------------------------
class Trainer:
    """The model, optimizer and counters of one run, and the three things done with them:
    ``train_step``, ``evaluate`` and ``save`` / ``load`` (checkpoints).

    ``Trainer(c, rt, mcfg, ...)`` is pre-training: ``c`` a ``glmctl.stages.pretrain.PretrainConfig``
    (read, never changed), ``data`` a ``train_utils.TrainData``, ``instructions`` the MIP
    (prompt, target) id pairs or None. ``Trainer.for_model`` trains a GLM built elsewhere (fine-
    tuning): only its parameters with ``requires_grad`` go to the optimizer, batches come from a
    ``source`` (``batch(indices)``, ``held_out(dp, dp_rank, n)``), and ``weights`` says how a
    checkpoint's weights are written and read (default: the whole model, ``save_model``)."""

    def __init__(self, c, rt: Runtime, mcfg, seq_len: int, data: tu.TrainData, tok_dir, instructions,
                 run_dir: Path, inputs: list):
        self.data, self.instructions = data, instructions
        # model: fp32 master weights, DeepNorm init (docs/glm130b.md §2.7), embedding gradient shrink (§5.3)
        glm = GLM(mcfg).init_weights(c.seed, embedding_std=c.embedding_init_std)
        glm.embedding_grad_shrink = c.embedding_grad_shrink
        glm.activation_checkpointing = c.activation_checkpointing
        glm.use_fast_attention(not c.exact_attention)  # same values, fused kernels (SelfAttention._sdpa)
        if c.init_from is not None:
            glm.load_state_dict(read_state_dict(c.init_from, tp.tp_size(), tp.tp_rank())[1])
        ocfg = obj.ObjectiveConfig(seq_len=seq_len, mask_ratio=c.mask_ratio, mask_prob=c.mask_prob,
                                   span_lambda=c.span_lambda, gmask_min_ratio=c.gmask_min_ratio,
                                   samples_per_sequence=c.samples_per_sequence,
                                   mip_ratio=c.mip_ratio if instructions else 0.0)
        source = PretrainSource(data, ocfg, obj.SpecialIds.from_dict(mcfg.special_token_ids()), c.seed,
                                mcfg.vocab_size, instructions)
        self._setup(c, rt, glm, seq_len, source, tok_dir, run_dir, inputs, stage="pretrain", weights=None,
                    steps=None)

    @classmethod
    def for_model(cls, c, rt: Runtime, glm: GLM, seq_len: int, source, tok_dir, run_dir: Path, inputs: list, *,
                  stage: str, steps: int, weights=None) -> "Trainer":
        """A trainer for ``glm`` as it is (loaded, adapters attached, frozen where it should be)."""
        self = cls.__new__(cls)
        self._setup(c, rt, glm, seq_len, source, tok_dir, run_dir, inputs, stage=stage, weights=weights,
                    steps=steps)
        return self

    def _setup(self, c, rt, glm, seq_len, source, tok_dir, run_dir, inputs, *, stage, weights, steps):
        self.c, self.rt, self.tok_dir, self.source, self.stage = c, rt, tok_dir, source, stage
        self.run_dir, self.inputs, self.seq_len = run_dir, inputs, seq_len
        self.weights = weights or ModelWeights()
        self.glm = glm.to(rt.device).train()
        self.module = GLMObjective(self.glm)
        if c.compile and not rt.deepspeed:  # fuses RoPE, DeepNorm, GeGLU...; compiles at the first step
            self.module.compiled.append(torch.compile(self.glm))
        torch.manual_seed(c.seed * 1000 + rt.dp_rank)  # dropout: same in a TP group, different across DP
        # schedule, counted in samples (docs/glm130b.md §5.2)
        self.final_batch = c.global_batch_size or c.micro_batch_size * rt.dp
        self.rampup = tu.Rampup.parse(c.batch_size_rampup) if c.batch_size_rampup else None
        samples = None
        if steps is None:  # pretrain: --steps or --tokens
            steps = c.steps if c.steps is not None or c.tokens is not None else 1000
            samples = -(-c.tokens // seq_len) if c.tokens is not None else None
        self.total_steps, total_samples = tu.plan_steps(steps=steps, samples=samples, final_batch=self.final_batch,
                                                        rampup=self.rampup)
        self.peak_lr = c.lr or tu.default_lr(glm.config.hidden_size)
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
            import deepspeed  # lazy: an optional dependency (--zero-stage / --deepspeed-config), slow to import
            self.engine, self.opt, _, _ = deepspeed.initialize(
                model=self.module, optimizer=torch.optim.AdamW(groups, **adam), config=self.deepspeed_config(),
                mpu=DeepSpeedMPU() if rt.tp > 1 else None)
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
        self.t_start = time.monotonic()
        self.eval_seqs, self.unigram_loss = self.source.held_out(rt.dp, rt.dp_rank, c.eval_samples)

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
        if c.precision == "fp16":  # GLM-130B's dynamic loss scale (docs/glm130b.md §5.2)
            ds.setdefault("fp16", {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                                   "loss_scale_window": 2000, "hysteresis": 2, "min_loss_scale": 1})
        elif c.precision == "bf16":
            ds.setdefault("bf16", {"enabled": True})
        ds.setdefault("steps_per_print", 1 << 30)
        return ds

    # ---- batches ---------------------------------------------------------------------------
    def batch(self, indices) -> list:
        """The sequences of global training samples ``indices``."""
        return self.source.batch(indices)

    def autocast(self):
        if self.rt.deepspeed or self.c.precision == "fp32":
            return contextlib.nullcontext()
        half = torch.bfloat16 if self.c.precision == "bf16" else torch.float16
        return torch.autocast(self.rt.device.type, dtype=half)

    # ---- one optimizer step ----------------------------------------------------------------
    def micro_loss(self, b: dict) -> torch.Tensor:
        """Summed loss of one training micro-batch (the wrapped module's forward)."""
        with self.autocast():
            return self.fwd(b["tokens"], b["positions"], b["attention_mask"], b["targets"], b["loss_mask"])

    def train_step(self) -> dict:
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
        loss_sum = torch.zeros((), dtype=torch.float64)
        for j, b in enumerate(micro):
            sync = self.ddp.no_sync() if self.ddp is not None and j < accum - 1 else contextlib.nullcontext()
            with sync:
                s = self.micro_loss(b)
                loss_sum += s.detach().double().cpu()
                loss = s * factor
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
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.glm.parameters() if p.requires_grad)

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
            import deepspeed  # lazy: optional and slow to import; only here when DeepSpeed runs
            with deepspeed.zero.GatheredParameters(list(self.glm.parameters()), modifier_rank=None):
                yield self.glm
        else:
            yield self.glm

    def save(self, name: str, summary: dict, config: dict) -> Path:
        """Write RUN/<name>/ (native weights + trainer/), then `latest`, the plot, and prune."""
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
        state = self.state(rt.gather_objects(rng_state()))

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
                self.weights.save(weights, path, tokenizer=self.tok_dir, stage=self.stage,
                                  config_extra={self.stage: config}, inputs=self.inputs,
                                  summary={"step": self.step, **summary}, write_extra=extra)
        rt.barrier()
        if rt.rank == 0:
            tu.write_latest(self.run_dir, name)
            tu.prune_checkpoints(self.run_dir, self.c.keep)
            tu.write_loss_plot(tu.read_metrics(self.run_dir / "metrics.jsonl"), self.run_dir / "loss.png",
                               title=f"glmctl {self.stage} {self.run_dir.name}", unigram_loss=self.unigram_loss)
        return path

    def begin(self, resume: Path | None, options: dict, **extra) -> dict:
        """Resume from ``resume`` (None: a fresh run), cut metrics.jsonl back to this step, and
        return the resolved options every checkpoint of the run records."""
        if resume is not None:
            self.load(resume)
            console.log(f"resumed from {resume} at step {self.step} ({self.consumed} samples)")
        if self.rt.rank == 0:
            tu.truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        return {**{k: v for k, v in options.items() if k not in ("out", "resume")},
                "seq_len": self.seq_len, "lr": self.peak_lr, "min_lr": self.min_lr,
                "global_batch_size": self.final_batch, "steps": self.total_steps,
                "warmup_samples": self.lr_kw["warmup_samples"], "world_size": self.rt.world, **extra}

    def load(self, path: Path) -> None:
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
            self.weights.load(self.glm, path)
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
        set_rng_state(rngs[self.rt.rank] if len(rngs) == self.rt.world else rngs[0], self.rt.device)

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t_start)


# ---- the training loop (pretrain, finetune) ------------------------------------------------------
def resume_point(c, run_dir: Path) -> Path | None:
    """The checkpoint ``c.resume`` names (auto: the newest complete one in ``run_dir``), or None."""
    found = tu.complete_checkpoints(run_dir)
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


def run_loop(tr: Trainer, resolved: dict, t0: float) -> dict:
    """Steps until the planned number, with logging, evaluation, checkpoints and stop requests."""
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
                **({"unigram_ppl": math.exp(tr.unigram_loss)} if tr.unigram_loss is not None else {}),
                "skipped_steps": tr.skipped,
                "tokens_per_s": round(train_tokens / train_time, 1) if train_time else None,
                "wall_s": round(tr.elapsed(), 1), "parameters": tr.glm.config.num_parameters(),
                **({"trainable_parameters": tr.trainable_parameters()} if tr.stage != "pretrain" else {})}

    with tu.StopSignals() as sig, console.progress(tr.total_steps - tr.step, tr.stage, "step") as bar:
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
                        **({"unigram_ppl": math.exp(tr.unigram_loss)} if tr.unigram_loss is not None else {})})
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
    record({"step": tr.step, "eval_loss": ev, "eval_ppl": out["eval_ppl"],
            **({"unigram_ppl": out["unigram_ppl"]} if "unigram_ppl" in out else {}), "final": True})
    vs = f" vs unigram {out['unigram_ppl']:.2f}" if "unigram_ppl" in out else ""
    console.log(f"{tr.stage}: step {tr.step}, held-out ppl {out['eval_ppl']:.2f}{vs}, "
                f"{out['skipped_steps']} skipped steps, {out['tokens_per_s']} tokens/s")
    return out
