"""Quantize a native checkpoint to INT8/INT4 (docs/glm130b.md §7.1) and report its quality against the parent.

    run(QuantizeConfig(src="model", out="model-int4", bits=4, group_size=128, method="gptq",
                       calibration="tokens"))  -> QuantizeResult(report, gate_passed, ...)

Format (docs/glm130b.md §7.1, kernels/reference.py): only the four linear weights of every layer are
quantized; ``….weight`` becomes int8 (INT4: two per byte, even column in the high nibble) and
``….weight_scale`` (fp16) is one scale per output row, or per row and group of G input columns.
Embeddings, LayerNorms and biases are copied unchanged (biases kept, unlike GLM-130B's
on-the-fly path). ``rtn`` with no group size is GLM-130B's scheme bit for bit: the weight in
fp16, s = fp16(absmax / (2^(b-1)-1)), q = round_half_even(w / s) on the fp16 quotient.

Choices:
* The model is quantized at TP=1 (the logical matrices) and written at TP=1, whatever the TP of
  the source. Per-row scales then span whole rows; with --group-size G (G dividing in/TP) the
  output reshards to TP without requantising (G = in/TP is GLM-130B's per-slice scale).
* Scales are fp16, as GLM-130B stores them, unless a weight is too large for fp16 (|w| or the
  scale above 65504): then that checkpoint's scales are fp32 (recorded in the report).
* Quality is measured on GLM's LM windows (docs/glm130b.md §4.4, ``masks.lm_window``): per window the
  first ``eval_prefix`` tokens are a bidirectional prefix, then [gMASK] <sop> and the rest of
  the window is scored causally; positions arange. Calibration windows have the same layout.
  Parent and quantized model see the same windows in the same compute dtype.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from glmctl import console, runtime
from glmctl.checkpoint import model_from_state_dict, parse_dtype, save_model
from glmctl.data import TokenDataset
from glmctl.errors import InputError, UsageError
from glmctl.gptq import LINEAR_NAMES, gptq_model
from glmctl.kernels import quantize_rtn
from glmctl.model.masks import lm_window
from glmctl.session import open_model
from glmctl.stage import COMPLETE, FAILED_GATE, StageOutput, StageResult

METHODS = ("rtn", "gptq")
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizeConfig:
    src: str
    out: str | None = None  # None: only evaluate (with ``compare``), write nothing
    bits: int = 4
    group_size: int | None = None
    method: str = "rtn"
    calibration: str | None = None  # tokens artifact (Megatron .bin/.idx shards)
    eval: str | None = None  # tokens artifact for the report (default: held-out tail of calibration)
    max_ppl_increase: float | None = None  # percent; the quality gate
    compare: tuple[str, ...] = ()  # further variants, e.g. ("rtn", "rtn:g128", "int8")
    seq_len: int | None = None  # window length (default min(512, max_sequence_length))
    eval_prefix: int | None = None  # bidirectional prefix per window (default seq_len // 4)
    calibration_samples: int = 128
    eval_samples: int = 64
    batch_size: int = 8
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True  # measured: about half the KL of plain GPTQ at the same format (docs)
    dtype: str = "fp32"  # compute dtype for calibration and evaluation
    device: str | None = None  # default: cuda when available, else cpu
    if_stale: bool = False
    lock: str | None = None  # "auto": .<out>.lock beside OUT

    def validate(self) -> None:
        """Option checks that do not need the model (``resolve`` adds those that do)."""
        if self.method.lower() not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose rtn or gptq")
        for name in ("calibration_samples", "eval_samples", "batch_size", "block_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.damp < 0:
            raise UsageError(f"--damp must be >= 0, got {self.damp}")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise UsageError(f"--max-ppl-increase must be >= 0, got {self.max_ppl_increase}")


@dataclass
class Variant:
    bits: int
    method: str
    group_size: int | None

    @property
    def name(self) -> str:
        return f"int{self.bits} {self.method} {'g' + str(self.group_size) if self.group_size else 'per-row'}"

    def block(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "method": self.method}


@dataclass
class QuantizeResult(StageResult):
    gate_passed: bool | None = None  # None: no gate

    @property
    def report(self) -> dict:
        return self.summary


# ---- validation -----------------------------------------------------------------------------
def parse_variant(spec: str, default_bits: int) -> Variant:
    """'rtn', 'gptq:g128', 'int8', 'int4:rtn:g64', '8:rtn', 'rtn:row' -> Variant."""
    bits, method, group = default_bits, "rtn", None
    for tok in [t for t in spec.strip().lower().split(":") if t]:
        if tok in METHODS:
            method = tok
        elif tok in ("int4", "int8", "4", "8"):
            bits = int(tok[-1])
        elif tok in ("row", "per-row"):
            group = None
        elif tok.startswith("g") and tok[1:].isdigit() and int(tok[1:]) > 0:
            group = int(tok[1:])
        else:
            raise UsageError(f"--compare {spec!r}: cannot read {tok!r} (use e.g. rtn, gptq:g128, int8:rtn, rtn:row)")
    return Variant(bits, method, group)


def check_variant(v: Variant, cfg, where: str) -> None:
    if v.bits not in (4, 8):
        raise UsageError(f"{where}: unsupported bit width {v.bits}; choose 4 or 8")
    if v.method not in METHODS:
        raise UsageError(f"{where}: unknown method {v.method!r}; choose rtn or gptq")
    if v.group_size is not None:
        if v.group_size <= 0:
            raise UsageError(f"{where}: group size must be positive, got {v.group_size}")
        for name, k in (("query_key_value/attention.dense/dense_h_to_4h", cfg.hidden_size),
                        ("dense_4h_to_h", cfg.inner_hidden_size)):
            if k % v.group_size:
                raise UsageError(f"{where}: group size {v.group_size} does not divide the {k} input columns "
                                 f"of {name}")


def linear_keys(cfg) -> list[str]:
    return [f"transformer.layers.{i}.{n}.weight" for i in range(cfg.num_layers) for n in LINEAR_NAMES]


# ---- token windows --------------------------------------------------------------------------
def open_windows(path: str | Path, width: int):
    """Non-overlapping windows of ``width`` tokens of a tokens artifact (or Megatron prefix), in
    storage order (glmctl.data.TokenWindows; windows never cross a shard boundary)."""
    return TokenDataset.open(path).windows(width, stride=width)


def spread(slots: list, n: int) -> list:
    """``n`` slots evenly spread over ``slots`` (all of them when there are fewer)."""
    if n >= len(slots):
        return list(slots)
    return [slots[(i * len(slots)) // n] for i in range(n)]


@dataclass
class Windows:
    tokens: torch.Tensor  # int64 [N, seq_len]
    positions: torch.Tensor  # [seq_len]
    mask: torch.Tensor  # bool [1, 1, seq_len, seq_len]
    target_positions: torch.Tensor  # [T]
    targets: torch.Tensor  # int64 [N, T]
    source: str

    def batches(self, batch_size: int, device):
        for i in range(0, len(self.tokens), batch_size):
            tok = self.tokens[i:i + batch_size].to(device)
            yield (tok, self.positions.to(device).expand(tok.shape[0], -1), self.mask.to(device),
                   self.targets[i:i + batch_size].to(device))


def make_windows(windows, slots, seq_len: int, prefix: int, cfg, source: str) -> Windows:
    """GLM LM inputs (``masks.lm_window``) from the token windows with storage indices ``slots``."""
    rows, tgts = [], []
    for i in slots:
        seg = np.asarray(windows[i]).astype(np.int64)
        if seg.size and (seg.min() < 0 or seg.max() >= cfg.vocab_size):
            bad = int(seg.max() if seg.max() >= cfg.vocab_size else seg.min())
            raise InputError(f"{source}: token id {bad} (window {i} of {seq_len - 1} tokens) is outside the "
                             f"model's vocabulary of {cfg.vocab_size}")
        toks, pos, mask, tpos, targets = lm_window(seg[:prefix].tolist(), seg[prefix:].tolist(),
                                                   cfg.gmask_token_id, cfg.sop_token_id)
        rows.append(toks)
        tgts.append(targets)
    return Windows(torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long), mask,
                   torch.tensor(tpos, dtype=torch.long), torch.tensor(tgts, dtype=torch.long), source)


def select_windows(c: QuantizeConfig, cfg, need_calibration: bool):
    """(calibration Windows or None, eval Windows or None); disjoint when from the same source."""
    seq_len, prefix = c.seq_len, c.eval_prefix
    width = seq_len - 1
    calib = evals = None
    same = c.eval is None or (c.calibration is not None and Path(c.eval).resolve() == Path(c.calibration).resolve())
    cal_shards = open_windows(c.calibration, width) if c.calibration else None
    if c.eval is not None and not same:
        ev_shards = open_windows(c.eval, width)
        ev_slots = spread(list(range(len(ev_shards))), c.eval_samples)
        if not ev_slots:
            raise InputError(f"{c.eval}: fewer than {width} tokens, not one window of --seq-len {seq_len}")
        evals = make_windows(ev_shards, ev_slots, seq_len, prefix, cfg, c.eval)
        cal_slots = list(range(len(cal_shards))) if cal_shards is not None else []
    elif cal_shards is not None:  # eval = held-out tail of the calibration data
        slots = list(range(len(cal_shards)))
        if len(slots) < 2:
            raise InputError(f"{c.calibration}: needs at least two windows of {width} tokens for calibration "
                             "and a held-out evaluation slice; pass --eval or a smaller --seq-len")
        n_eval = min(c.eval_samples, len(slots) // 2)
        ev_slots, cal_slots = slots[len(slots) - n_eval:], slots[:len(slots) - n_eval]
        evals = make_windows(cal_shards, ev_slots, seq_len, prefix, cfg, f"{c.calibration} (held-out tail)")
    else:
        cal_slots = []
    if need_calibration:
        if cal_shards is None:
            raise UsageError("gptq needs calibration tokens: pass --calibration TOKENS_DIR")
        cal_slots = spread(cal_slots, c.calibration_samples)
        if not cal_slots:
            raise InputError(f"{c.calibration}: no calibration window of {width} tokens left")
        if len(cal_slots) < c.calibration_samples:
            console.warn(f"{c.calibration}: only {len(cal_slots)} calibration windows of {seq_len} tokens "
                         f"(asked for {c.calibration_samples})")
        calib = make_windows(cal_shards, cal_slots, seq_len, prefix, cfg, c.calibration)
    if evals is not None and len(evals.tokens) < c.eval_samples:
        console.warn(f"{evals.source}: only {len(evals.tokens)} evaluation windows (asked for {c.eval_samples})")
    return calib, evals


# ---- quantization ---------------------------------------------------------------------------
def choose_scale_dtype(sd: dict, keys: list[str], bits: int) -> torch.dtype:
    """fp16 (GLM-130B) unless some weight or scale would overflow it; then fp32."""
    qmax = 2 ** (bits - 1) - 1
    for k in keys:
        if sd[k].abs().max().item() > FP16_MAX or sd[k].abs().max().item() / qmax > FP16_MAX:
            return torch.float32
    return torch.float16


def quantize_rtn_state_dict(sd: dict, keys: list[str], v: Variant, scale_dtype) -> dict:
    """{weight key: (qweight, scale)} by round-to-nearest (docs/glm130b.md §7.1)."""
    out = {}
    for k in keys:
        w = sd[k]
        # GLM-130B quantizes the fp16 weight: absmax, the division by qmax and the quotient in fp16.
        w = w.to(torch.float16) if scale_dtype == torch.float16 else w.to(torch.float32)
        out[k] = quantize_rtn(w, v.bits, v.group_size, scale_dtype=scale_dtype)
    return out


def quantized_state_dict(sd: dict, q: dict) -> dict:
    out = dict(sd)
    for k, (qw, s) in q.items():
        out[k] = qw.cpu()
        out[k + "_scale"] = s.cpu()
    return out


def quantize_variant(v: Variant, cfg, sd: dict, calib: Windows | None, c: QuantizeConfig, dtype, device,
                     scale_dtype) -> dict:
    keys = linear_keys(cfg)
    if v.method == "rtn":
        return quantize_rtn_state_dict(sd, keys, v, scale_dtype)
    # gptq_model overwrites the model's weights in place: never let them share storage with ``sd``.
    model = model_from_state_dict(cfg, {k: v.clone() for k, v in sd.items()}, dtype, device)
    total = len(keys)
    with console.progress(total, f"gptq {v.name}", "matrices") as bar:
        res = gptq_model(model, [b[:3] for b in calib.batches(c.batch_size, device)], v.bits, v.group_size,
                         block_size=c.block_size, damp=c.damp, act_order=c.act_order, scale_dtype=scale_dtype,
                         progress=lambda done: bar.update(1))
    damps = {r.damp for r in res.values()}
    if max(damps) > c.damp:
        console.warn(f"gptq: raised dampening up to {max(damps):g} where a Hessian was singular")
    del model
    return {k: (r.qweight, r.scale) for k, r in res.items()}


# ---- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(parent, variants: list, windows: Windows, batch_size: int, device) -> tuple[dict, list[dict]]:
    """Perplexity of the parent and of each quantized model, mean KL(parent || quantized) of the
    next-token distributions and top-1 agreement, over the scored tokens of ``windows``."""
    n = 0
    nll_p = 0.0
    acc = [{"nll": 0.0, "kl": 0.0, "agree": 0} for _ in variants]
    tpos = windows.target_positions.to(device)
    nb = math.ceil(len(windows.tokens) / batch_size)
    with console.progress(nb, "evaluate", "batches") as bar:
        for tokens, positions, mask, targets in windows.batches(batch_size, device):
            lp = torch.log_softmax(parent(tokens, positions, mask)[:, tpos].float(), dim=-1)
            nll_p += -lp.gather(-1, targets[..., None]).sum().item()
            top_p = lp.argmax(-1)
            p = lp.exp()
            for a, m in zip(acc, variants):
                lq = torch.log_softmax(m(tokens, positions, mask)[:, tpos].float(), dim=-1)
                a["nll"] += -lq.gather(-1, targets[..., None]).sum().item()
                a["kl"] += (p * (lp - lq)).sum().item()
                a["agree"] += (lq.argmax(-1) == top_p).sum().item()
            n += targets.numel()
            bar.update(1)
    ppl_p = math.exp(nll_p / n)
    parent_row = {"ppl": ppl_p, "nll": nll_p / n, "tokens": n}
    rows = []
    for a in acc:
        ppl = math.exp(a["nll"] / n)
        rows.append({"ppl": ppl, "ppl_increase_pct": 100.0 * (ppl / ppl_p - 1.0), "kl_mean": a["kl"] / n,
                     "top1_agreement": a["agree"] / n})
    return parent_row, rows


# ---- the stage ------------------------------------------------------------------------------
def resolve(c: QuantizeConfig, cfg) -> QuantizeConfig:
    """Fill defaults that depend on the model, and check the options that do (UsageError)."""
    c = replace(c, method=c.method.lower(), compare=tuple(c.compare or ()))
    check_variant(Variant(c.bits, c.method, c.group_size), cfg, f"--bits {c.bits} --method {c.method}"
                  + (f" --group-size {c.group_size}" if c.group_size else ""))
    seq_len = c.seq_len or min(512, cfg.max_sequence_length)
    if not 4 <= seq_len <= cfg.max_sequence_length:
        raise UsageError(f"--seq-len {seq_len}: must be between 4 and the model's max_sequence_length "
                         f"{cfg.max_sequence_length}")
    prefix = seq_len // 4 if c.eval_prefix is None else c.eval_prefix
    if not 0 <= prefix <= seq_len - 3:
        raise UsageError(f"--eval-prefix {prefix}: must be between 0 and seq_len - 3 = {seq_len - 3}")
    return replace(c, seq_len=seq_len, eval_prefix=prefix)


def run_config(c: QuantizeConfig) -> dict:
    """What goes into the manifest as the stage's config (and decides --if-stale)."""
    d = asdict(c)
    for k in ("src", "out", "device", "if_stale", "lock"):
        d.pop(k)
    d["compare"] = list(d["compare"])
    return d


def run(c: QuantizeConfig) -> QuantizeResult:
    c.validate()
    with StageOutput("quantize", c.out, lock=c.lock, if_stale=c.if_stale) as output:
        return _run(c, output)


def _run(c: QuantizeConfig, output: StageOutput) -> QuantizeResult:
    src = Path(c.src)
    device = runtime.resolve_device(c.device)
    parent = open_model(src, device="cpu", need_tokenizer=False)  # as stored, merged to TP=1 in one process
    cfg0 = parent.config
    if cfg0.quantization:
        q = cfg0.quantization
        raise InputError(f"{src}: already quantized (int{q.get('bits')} {q.get('method', 'rtn')}); "
                         "quantize its floating-point parent instead")
    c = resolve(c, cfg0)
    main = Variant(c.bits, c.method, c.group_size)
    others = []
    for spec in c.compare:
        v = parse_variant(spec, c.bits)
        check_variant(v, cfg0, f"--compare {spec}")
        if v != main and v not in others:
            others.append(v)
    variants = [main] + others
    needs_gptq = any(v.method == "gptq" for v in variants)
    has_data = c.calibration is not None or c.eval is not None
    if c.max_ppl_increase is not None and not has_data:
        raise UsageError("--max-ppl-increase needs evaluation tokens: pass --eval or --calibration TOKENS_DIR")
    if others and not has_data:
        raise UsageError("--compare needs evaluation tokens: pass --eval or --calibration TOKENS_DIR")

    qblock = main.block()
    out_cfg = cfg0.replace(quantization=qblock, tensor_parallel_size=1)
    inputs = [str(p) for p in (c.src, c.calibration, c.eval) if p is not None]
    stage_cfg = {"quantize": run_config(c)}
    if c.out is not None and output.up_to_date({"model": out_cfg.to_dict(), **stage_cfg}, inputs):
        report = output.result.summary.get("quantize", {})
        gate = report.get("gate")
        return QuantizeResult(summary=report, out=output.out, status=output.result.status,
                              gate_passed=None if gate is None else gate.get("passed"))

    dtype = parse_dtype(c.dtype)
    stored = parent.dtype
    if cfg0.tensor_parallel_size > 1:
        console.log(f"{src}: stored at TP={cfg0.tensor_parallel_size}; quantizing the merged (TP=1) matrices, "
                    "output at TP=1")
        if c.group_size is None:
            console.warn("per-row scales of the row-parallel layers cannot be resharded: the output runs at TP=1 "
                         "only (use --group-size dividing in/TP to keep TP>1 possible)")
    calib, evals = select_windows(c, cfg0, needs_gptq)
    if evals is None:
        console.warn("no evaluation tokens (--eval / --calibration): writing the artifact without a quality report")

    cfg = cfg0.replace(tensor_parallel_size=1)
    sd = parent.model.state_dict()
    del parent
    keys = linear_keys(cfg)
    scale_dtype = choose_scale_dtype(sd, keys, main.bits)
    if scale_dtype != torch.float16:
        console.warn("a weight exceeds the fp16 range: storing fp32 scales")
    quantized: dict[str, dict] = {}
    for v in variants:
        console.log(f"quantizing: {v.name}")
        sdt = choose_scale_dtype(sd, keys, v.bits)
        quantized[v.name] = quantized_state_dict(sd, quantize_variant(v, cfg, sd, calib, c, dtype, device, sdt))

    report = {
        "source": str(src), "output": None if c.out is None else str(c.out),
        "bits": main.bits, "group_size": main.group_size, "method": main.method,
        "scale_dtype": str(scale_dtype).replace("torch.", ""),
        "quantized_tensors": len(keys),
        "linear_weight_bytes": {"parent": _nbytes(sd, keys),
                                "quantized": _nbytes(quantized[main.name], keys + [k + "_scale" for k in keys])},
    }
    gate_passed = None
    if evals is not None:
        console.log(f"evaluating on {len(evals.tokens)} windows of {c.seq_len} tokens from {evals.source}")
        parent_model = model_from_state_dict(cfg, sd, dtype, device)
        qmodels = [model_from_state_dict(cfg.replace(quantization=v.block()), quantized[v.name], dtype, device)
                   for v in variants]
        parent_row, rows = evaluate(parent_model, qmodels, evals, c.batch_size, device)
        del parent_model, qmodels
        report["eval"] = {"source": evals.source, "windows": len(evals.tokens), "seq_len": c.seq_len,
                          "prefix": c.eval_prefix, "scored_tokens": parent_row["tokens"],
                          "layout": "lm_window: prefix (bidirectional) + [gMASK] <sop> + scored text"}
        if calib is not None:
            report["calibration"] = {"source": calib.source, "windows": len(calib.tokens), "seq_len": c.seq_len}
        report["parent"] = {"ppl": parent_row["ppl"]}
        report["quantized"] = {"name": main.name, **rows[0]}
        report["compare"] = [{"name": v.name, **v.block(), **r} for v, r in zip(others, rows[1:])]
        if c.max_ppl_increase is not None:
            gate_passed = rows[0]["ppl_increase_pct"] <= c.max_ppl_increase
            report["gate"] = {"max_ppl_increase_pct": c.max_ppl_increase, "passed": gate_passed}
    elif calib is not None:
        report["calibration"] = {"source": calib.source, "windows": len(calib.tokens), "seq_len": c.seq_len}

    status = FAILED_GATE if gate_passed is False else COMPLETE
    if c.out is not None:
        model = model_from_state_dict(out_cfg, quantized[main.name], stored, "cpu")
        save_model(model, c.out, tokenizer=src, stage="quantize", config_extra=stage_cfg, inputs=inputs,
                   summary={"quantize": report}, status=status)
        console.log(f"wrote {c.out}" + (" (marked failed-gate)" if gate_passed is False else ""))
    return QuantizeResult(summary=report, out=None if c.out is None else Path(c.out), status=status,
                          gate_passed=gate_passed)


def _nbytes(sd: dict, keys: list[str]) -> int:
    return sum(sd[k].numel() * sd[k].element_size() for k in keys)


def report_rows(report: dict) -> list[list]:
    """The comparison table: parent, the written variant (*), the --compare variants."""
    if "parent" not in report:
        return []
    rows = [["fp parent", "-", "-", "-", report["parent"]["ppl"], "-", "-", "-"]]
    q = report["quantized"]
    rows.append([q["name"] + (" *" if report.get("output") else ""), report["bits"],
                 report["group_size"] or "row", report["method"], q["ppl"], f"{q['ppl_increase_pct']:+.3f}",
                 q["kl_mean"], q["top1_agreement"]])
    for r in report.get("compare", []):
        rows.append([r["name"], r["bits"], r["group_size"] or "row", r["method"], r["ppl"],
                     f"{r['ppl_increase_pct']:+.3f}", r["kl_mean"], r["top1_agreement"]])
    return rows


REPORT_COLUMNS = ["variant", "bits", "group", "method", "ppl", "ppl +%", "KL mean", "top-1 agree"]
