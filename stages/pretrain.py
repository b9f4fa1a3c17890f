"""Stage `glmctl pretrain`: train a GLM with GLM-130B's objective and stability recipe
(docs/glm130b.md §4.5, §5).

    validate options -> tokenizer + model config -> data (windows, held-out split, unigram
    baseline, vocab check) -> runtime (one process | torchrun: DDP x TP | DeepSpeed ZeRO 1-3)
    -> glmctl.training.Trainer (DeepNorm init, embedding gradient shrink, AdamW) -> resume
    -> loop: Trainer.train_step (global batch over data-parallel ranks and micro-batches, loss
       normalised over the global batch, non-finite steps skipped and counted, lr by samples)
    -> held-out evaluation, checkpoints (step-N/, latest, keep), metrics.jsonl, loss.png -> final/

The result does not depend on the number of processes: every sample is a pure function of
(seed, global sample index), and the loss is normalised over the global batch. A single-process
fp32 CPU run stopped at any moment (even kill -9) and resumed with ``resume="auto"`` ends with
bit-identical weights: data position, optimizer, loss scale and RNG states are in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from glmctl import console, runtime
from glmctl import train_utils as tu
from glmctl.config import ModelConfig, get_preset
from glmctl.errors import EXIT_INTERRUPTED, GlmctlError, InputError, UsageError
from glmctl.objective import ObjectiveConfig
from glmctl.runtime import Runtime
from glmctl.stage import StageResult
from glmctl.tokenizer import Tokenizer
from glmctl.training import Trainer, engine_problems, resume_point, run_loop



@dataclass(frozen=True)
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
    warmup: float = 0.005  # < 1: share of the run's samples (docs/glm130b.md §5.2: 0.5 %); >= 1: steps
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

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0 or self.deepspeed_config is not None

    def validate(self) -> None:
        """Every problem with the options at once, as one UsageError (before any file is read)."""
        c = self
        p = ["give --steps or --tokens, not both"] if c.steps is not None and c.tokens is not None else []
        p += engine_problems(c, runtime.launcher_env()[0],
                             ("steps", "tokens", "micro_batch_size", "global_batch_size", "seq_len", "save_interval",
                              "eval_interval", "log_interval", "keep", "tensor_parallel", "eval_samples"))
        if c.embedding_init_std is not None and not c.embedding_init_std > 0:
            p.append(f"--embedding-init-std must be positive, got {c.embedding_init_std}")
        if not 0 < c.embedding_grad_shrink <= 1:
            p.append(f"--embedding-grad-shrink must be within (0, 1], got {c.embedding_grad_shrink}")
        if not 0 < c.valid_fraction < 0.5:
            p.append(f"--valid-fraction must be within (0, 0.5), got {c.valid_fraction}")
        p += ObjectiveConfig(seq_len=c.seq_len or 512, mask_ratio=c.mask_ratio, mask_prob=c.mask_prob,
                             span_lambda=c.span_lambda, gmask_min_ratio=c.gmask_min_ratio,
                             samples_per_sequence=c.samples_per_sequence, mip_ratio=c.mip_ratio).problems()
        if p:
            raise UsageError("; ".join(p))


# ---- tokenizer, model config, data -------------------------------------------------------------
def find_tokenizer(c: PretrainConfig):
    """--tokenizer, else the tokenizer files of --init-from or of the data folder, else the
    tokenizer input recorded in the data's manifest. None when there is none."""
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


# ---- the stage ---------------------------------------------------------------------------------
def run(config: PretrainConfig) -> StageResult:
    """Train; the result's summary is the final one (with the checkpoint), ``out`` the final
    checkpoint. Raises GlmctlError(exit 4) after saving a checkpoint when stopped by SIGTERM /
    SIGINT or --max-wall-time."""
    c = config
    c.validate()
    # resolve inputs: tokenizer, model config, data (numpy only: bad input fails in a second)
    if not Path(c.data).exists():
        raise InputError(f"{c.data}: no such token directory (make one with `glmctl tokenize`)")
    tok, tok_dir = find_tokenizer(c)
    mcfg, seq_len = resolve_model_config(c, tok)
    data = tu.TrainData(c.data, seq_len, c.seed, c.valid_data, c.valid_fraction)
    if data.n_train < 1 or not data.valid_index:
        raise InputError(f"{c.data}: {data.dataset.num_tokens} tokens make {len(data.windows)} windows of "
                         f"{seq_len} tokens; need at least 2 (one is held out)")
    check_data_vocab(data, tok, mcfg.vocab_size, c)
    instructions = load_instructions(c.instruction_data, tok) if c.instruction_data else None
    resume = resume_point(c, Path(c.out))
    if tok is None:
        console.warn(f"no tokenizer found for {c.data}: using the special-token ids of the model config")
    rt = runtime.start(device=None, tp=c.tensor_parallel, deepspeed=c.deepspeed)
    clean = False
    try:
        summary, path = _train(c, rt, tok_dir, mcfg, seq_len, data, instructions, resume)
        clean = True
    except GlmctlError as e:
        clean = e.exit_code == EXIT_INTERRUPTED  # every rank stopped at the same step
        raise
    finally:
        runtime.stop(rt, clean=clean)
    return StageResult(summary={**summary, "checkpoint": str(path)}, out=path)


def _train(c: PretrainConfig, rt: Runtime, tok_dir, mcfg, seq_len: int, data, instructions, resume):
    t0 = time.monotonic()
    run_dir = Path(c.out)
    if rt.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tu.remove_stale(run_dir)
    rt.barrier()
    inputs = [p for p in (c.data, tok_dir, c.valid_data, c.instruction_data, c.init_from) if p]
    # build the model and optimizer; resume
    tr = Trainer(c, rt, mcfg, seq_len, data, tok_dir, instructions, run_dir, inputs)
    resolved = tr.begin(resume, dataclasses.asdict(c))
    ds = f", DeepSpeed ZeRO-{tr.engine.zero_optimization_stage()}" if tr.engine else ""
    console.log(f"pretrain: {mcfg.num_parameters() / 1e6:.1f}M parameters, {rt.world} process(es) "
                f"(TP {rt.tp} x DP {rt.dp}{ds}), "
                f"{data.n_train} training / {len(data.valid_index)} held-out windows of {seq_len}, "
                f"{tr.total_steps} steps x {tr.final_batch} sequences, lr {tr.peak_lr:.3g}, {c.precision}")
    summary = run_loop(tr, resolved, t0)
    return summary, tr.save(tu.FINAL, summary, resolved)
