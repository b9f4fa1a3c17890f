"""Pieces of the pre-training loop that do not need the loop: schedules, the fp16 loss scaler,
gradient norms under tensor parallelism, the unigram baseline, the run folder and the loss plot.

Run folder (``glmctl pretrain --out RUN``), read by ``glmctl convert`` and every other stage:

    RUN/step-00000500/   native checkpoint (checkpoint.save_model) + trainer/ (state, DeepSpeed)
    RUN/final/           the same, at the end
    RUN/latest           name of the newest complete checkpoint folder (written atomically)
    RUN/metrics.jsonl    one JSON line per logged step and per held-out evaluation
    RUN/loss.png         the loss curve, redrawn at each checkpoint
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from glmctl.artifacts import MANIFEST, atomic_write_text
from glmctl.data import TokenDataset, feistel_permute
from glmctl.tp_layout import REPLICATED, classify

STEP_RE = re.compile(r"step-(\d{8})")
FINAL = "final"


# ---- learning rate and batch size ------------------------------------------------------------
def lr_at(samples: int, *, peak: float, min_lr: float, warmup_samples: int, decay_samples: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup_samples``, then cosine down to ``min_lr`` at
    ``decay_samples`` (docs/glm130b.md §5.2, counted in samples like Megatron). ``samples`` is the number
    consumed once the step being taken is done, so the first step already has a small lr."""
    if warmup_samples > 0 and samples < warmup_samples:
        return peak * samples / warmup_samples
    span = max(1, decay_samples - warmup_samples)
    progress = min(1.0, max(0.0, (samples - warmup_samples) / span))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Rampup:
    """Batch-size warm-up (Megatron's ``--rampup-batch-size START INCREMENT SAMPLES``): the
    global batch grows from ``start`` by ``increment`` at even intervals until it reaches the
    final size after ``samples`` samples (GLM-130B: 192, 24, 5,493,164 towards 4224)."""
    start: int
    increment: int
    samples: int

    @classmethod
    def parse(cls, text: str) -> "Rampup":
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"expected START,INCREMENT,SAMPLES (three integers), got {text!r}")
        return cls(*map(int, parts))


def global_batch_at(consumed: int, final: int, rampup: Rampup | None) -> int:
    if rampup is None or final <= rampup.start:
        return final
    increments = (final - rampup.start) // rampup.increment
    per_increment = rampup.samples / increments
    return min(final, rampup.start + rampup.increment * int(consumed / per_increment))


def plan_steps(*, steps: int | None, samples: int | None, final_batch: int, rampup: Rampup | None) -> tuple[int, int]:
    """(number of steps, samples they consume) for --steps, or for a sample budget (--tokens)."""
    if rampup is None:
        n = steps if steps is not None else -(-samples // final_batch)
        return n, n * final_batch
    n = consumed = 0
    while (steps is not None and n < steps) or (steps is None and consumed < samples):
        consumed += global_batch_at(consumed, final_batch, rampup)
        n += 1
    return n, consumed


def default_lr(hidden_size: int) -> float:
    """Peak lr for a model of this width when --lr is not given: GLM-130B's 8e-5 at d = 12288,
    growing as d^-0.75 for narrower models (about GPT-3's table: 6e-4 at d = 768), at most 6e-4.

    The cap is measured (docs/pretrain.md): DeepNorm is Post-LN, and the ``medium`` preset
    (d = 384) at 1e-3 (the rule's value) fell to 6.9 by step 40 and then climbed back to the
    unigram loss; 6e-4 and 4e-4 did so less often. For a 4 x 192 model 6e-4 gave a held-out
    loss of 5.52 after 1050 steps where 1.2e-3 gave 6.16 and 3e-4 5.73."""
    return min(6e-4, 8e-5 * (12288 / hidden_size) ** 0.75)


# ---- fp16 dynamic loss scaling -------------------------------------------------------------
class LossScaler:
    """Dynamic loss scale with hysteresis (Megatron / Apex O2 as GLM-130B used it, docs/glm130b.md §5.2):
    after ``hysteresis`` overflowing steps the scale halves (not below ``min_scale``); after
    ``window`` clean steps in a row it doubles and the hysteresis budget is restored.
    ``enabled=False`` (fp32, bf16) keeps the scale at 1."""

    def __init__(self, enabled: bool, initial: float = 2.0 ** 16, window: int = 2000, hysteresis: int = 2,
                 min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = float(initial) if enabled else 1.0
        self.window, self.hysteresis, self.min_scale = window, hysteresis, min_scale
        self.good_steps = 0
        self.hysteresis_left = hysteresis

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.good_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.min_scale, self.scale / 2)
            return
        self.good_steps += 1
        if self.good_steps == self.window:
            self.good_steps = 0
            self.hysteresis_left = self.hysteresis
            self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.good_steps, self.hysteresis_left = float(d["scale"]), int(d["good_steps"]), \
            int(d["hysteresis_left"])


# ---- gradients -----------------------------------------------------------------------------
def grad_norm(named_params, tp_group=None, tp_size: int = 1, tp_rank: int = 0):
    """Global L2 norm of the gradients (fp32 tensor). Under tensor parallelism the sharded
    tensors' squares are summed over the TP group and replicated ones are counted once."""
    grads = [p.grad for name, p in named_params
             if p.grad is not None and not (tp_size > 1 and tp_rank != 0 and classify(name) == REPLICATED)]
    sq = torch.zeros(())
    if grads:  # one fused pass over all tensors instead of one reduction each
        sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).pow(2).sum()
    if tp_size > 1:
        dist.all_reduce(sq, group=tp_group)
    return sq.sqrt()


def clip_grads_(params, norm, max_norm: float) -> None:
    """Scale gradients so their global norm is at most max_norm (torch's clip_grad_norm_ rule)."""
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, coef)


# ---- unigram baseline ----------------------------------------------------------------------
def unigram_logprobs(counts: np.ndarray) -> np.ndarray:
    """log p(token) with add-one (Laplace) smoothing over the whole vocabulary."""
    c = counts.astype(np.float64) + 1.0
    return np.log(c / c.sum())


# ---- run folder ----------------------------------------------------------------------------
def step_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint (step-N/ and final/ with a manifest), oldest first."""
    out = []
    if not run_dir.is_dir():
        return out
    for p in run_dir.iterdir():
        if not p.is_dir() or not (p / MANIFEST).is_file():
            continue
        if STEP_RE.fullmatch(p.name):
            out.append((int(p.name[5:]), 0, p))
        elif p.name == FINAL:
            try:
                step = int(json.loads((p / MANIFEST).read_text())["summary"]["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            out.append((step, 1, p))  # at equal steps final/ is the newer one
    return [(s, p) for s, _, p in sorted(out)]


def write_latest(run_dir: Path, name: str) -> None:
    atomic_write_text(run_dir / "latest", name + "\n")


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Remove the oldest complete step-N/ folders beyond ``keep`` (final/ is never removed).
    Called only after the newest one is complete, so a crash never leaves fewer than ``keep``."""
    steps = [p for _, p in complete_checkpoints(run_dir) if p.name != FINAL]
    gone = steps[: max(0, len(steps) - keep)]
    for p in gone:
        tmp = p.with_name(f".{p.name}.removing")
        os.replace(p, tmp)  # the name disappears atomically, then the files
        shutil.rmtree(tmp, ignore_errors=True)
    return gone


def remove_stale(run_dir: Path) -> None:
    """Leftovers of a killed run: half-written checkpoints and DeepSpeed staging folders."""
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name.startswith(".") and (".tmp" in p.name or p.name.startswith(".ds-") or p.name.endswith(".removing")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run repeats those steps)."""
    if path.is_file():
        keep = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(k + "\n" for k in keep))


def write_loss_plot(metrics: list[dict], path: Path, title: str = "", unigram_loss: float | None = None) -> None:
    """Training and held-out loss against step as a PNG (matplotlib Agg), written atomically."""
    import matplotlib  # lazy: an optional dependency (glmctl[plot]) and slow to import; only rank 0 draws
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r and r["loss"] is not None
             and math.isfinite(r["loss"])]
    held = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="training loss", lw=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss ([gMASK])", ms=3)
    if unigram_loss is not None:
        ax.axhline(unigram_loss, ls="--", color="grey", lw=1, label="unigram model (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


# ---- stopping on signals -------------------------------------------------------------------
class StopSignals:
    """Within the block, SIGTERM / SIGINT set ``.received`` (the loop saves and exits) instead
    of killing the process; a second SIGINT interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# ---- training data ---------------------------------------------------------------------------
class TrainData:
    """``seq_len``-token windows of a tokens dir (glmctl.data), split into training and held-out.

    Held-out: the windows of ``valid_data`` when given, else the last ``valid_fraction`` of the
    windows in storage order (the tail of the corpus, so no training window overlaps it).
    Global training sample i is window ``perm_e(i mod n)`` of epoch e = i div n, with perm_e the
    keyed permutation of glmctl.data for (seed, e): the order depends on nothing but the seed,
    so every process count and every restart sees the same sequence.
    """

    UNIGRAM_MAX_TOKENS = 1 << 28  # the unigram baseline counts at most this many training tokens

    def __init__(self, data: str, seq_len: int, seed: int, valid_data: str | None = None,
                 valid_fraction: float = 0.02):
        self.seed = int(seed)
        self.seq_len = seq_len
        self.dataset = TokenDataset.open(data)
        self.windows = self.dataset.windows(seq_len, stride=seq_len, seed=seed)
        n = len(self.windows)
        if valid_data is not None:
            self.valid_dataset = TokenDataset.open(valid_data)
            self.valid_windows = self.valid_dataset.windows(seq_len, stride=seq_len, seed=seed)
            self.n_train, self.valid_index = n, list(range(len(self.valid_windows)))
        else:
            self.valid_dataset, self.valid_windows = self.dataset, self.windows
            n_valid = max(1, round(valid_fraction * n))
            self.n_train, self.valid_index = n - n_valid, list(range(n - n_valid, n))

    def train_chunks(self, indices) -> list[np.ndarray]:
        """Windows of global training samples ``indices`` (int64 copies)."""
        idx = np.asarray(indices, dtype=np.int64)
        epochs, pos = np.divmod(idx, self.n_train)
        out = [None] * len(idx)
        for e in np.unique(epochs).tolist():
            sel = np.flatnonzero(epochs == e)
            for k, j in zip(sel, feistel_permute(pos[sel], self.n_train, key=(self.seed, e))):
                out[k] = self.windows[int(j)].astype(np.int64)
        return out

    def valid_chunk(self, k: int) -> np.ndarray:
        return self.valid_windows[self.valid_index[k]].astype(np.int64)

    def unigram_counts(self, vocab_size: int) -> np.ndarray:
        """Token frequencies of the training windows (storage order, up to UNIGRAM_MAX_TOKENS)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        limit = min(self.n_train, max(1, self.UNIGRAM_MAX_TOKENS // self.seq_len))
        for j in range(0, limit, 256):
            block = np.concatenate([self.windows[i] for i in range(j, min(limit, j + 256))])
            counts += np.bincount(block.astype(np.int64), minlength=vocab_size)[:vocab_size]
        return counts
