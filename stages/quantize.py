"""Quantize a native checkpoint to INT8/INT4 (docs/glm130b.md §7.1) and report its quality against the parent.

    run(QuantizeConfig(src="model", out="model-int4", bits=4, group_size=128, method="gptq",
                       calibration="tokens", tp=4))  -> QuantizeResult(report, gate_passed, ...)

Format (docs/glm130b.md §7.1, kernels/reference.py): only the four linear weights of every layer are
quantized; ``….weight`` becomes int8 (INT4: two per byte, even column in the high nibble) and
``….weight_scale`` (fp16) is one scale per output row, or per row and group of G input columns.
Embeddings, LayerNorms and biases are copied unchanged (biases kept, unlike GLM-130B's
on-the-fly path), unless ``embedding_bits`` (--embedding-bits) asks for the tied embedding/output
too: then its rows are RTN-quantized the same way (``embedding_group_size``: per row, or groups;
each rank's vocabulary rows on their own, so any TP in and out), and the report scores that
quantized embedding. ``rtn`` with no group size is GLM-130B's scheme bit for bit: the weight in
fp16, s = fp16(absmax / (2^(b-1)-1)), q = round_half_even(w / s) on the fp16 quotient.

Memory (glmctl/quantization.py): nothing holds the model. RTN goes tensor by tensor, each output
rank's slice read from the parent's files and written into that rank's file; GPTQ goes block by
block with the calibration activations of one layer boundary (in memory up to
``activation_memory``, memory-mapped files beyond); the quality report runs the parent and each
quantized model block by block.

Choices:
* Output TP (``tp``, default the source's): any TP in, any TP out. Per-row scales are per output
  rank, as GLM-130B quantizes for its serving TP: a row-parallel layer's scale covers that
  rank's in/TP columns (recorded as group scales of gcd(hidden/TP, inner/TP)); at TP=1 they are
  whole rows. With --group-size G (G dividing in/TP) the output is the TP=1 quantization sliced.
  GPTQ with per-row scales needs TP=1 (it runs on whole rows).
* Scales are fp16, as GLM-130B stores them, unless a weight is too large for fp16 (|w| or the
  scale above 65504): then that checkpoint's scales are fp32 (recorded in the report).
* Quality is measured on GLM's LM windows (docs/glm130b.md §4.4, ``masks.lm_window``): per window the
  first ``eval_prefix`` tokens are a bidirectional prefix, then [gMASK] <sop> and the rest of
  the window is scored causally; positions arange. Calibration windows have the same layout.
  Parent and quantized model see the same windows in the same compute dtype. ``report=False``
  (--no-report) skips it; the manifest says so.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from glmctl import console, runtime
from glmctl.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, copy_tokenizer, parse_dtype, stored_dtype
from glmctl.console import parse_size
from glmctl.errors import InputError, UsageError
from glmctl.formats.native import NativeSink
from glmctl.model.glm import EMBEDDING_KEY
from glmctl.quantization import GPTQ, METHODS, RTN, OutputLayout, ScaleOverflow, SpillSink, Variant, \
    check_variant, embedding_name, embedding_spec, layerwise_report, linear_keys, output_group, parse_variant, \
    select_windows, write_quantized
from glmctl.stage import COMPLETE, FAILED_GATE, StageOutput, StageResult


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
    tp: int | None = None  # output tensor-parallel size (default: the source's)
    embedding_bits: int | None = None  # quantize the tied embedding/output too (8 or 4); None: fp, GLM-130B's
    embedding_group_size: int | None = None  # None: per row (8 bits), largest G <= 128 dividing h (4); 0: per row
    report: bool = True  # False (--no-report): no quality report (the manifest says so)
    activation_memory: str = "2GiB"  # activations kept in memory; memory-mapped files beyond
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
        if self.tp is not None and self.tp < 1:
            raise UsageError(f"--tp must be at least 1, got {self.tp}")
        if self.embedding_bits is not None and self.embedding_bits not in (4, 8):
            raise UsageError(f"--embedding-bits {self.embedding_bits}: unsupported bit width; choose 4 or 8")
        if self.embedding_group_size is not None:
            if self.embedding_bits is None:
                raise UsageError("--embedding-group-size needs --embedding-bits 8 or 4")
            if self.embedding_group_size < 0:
                raise UsageError(f"--embedding-group-size must be >= 0 (0: one scale per row), "
                                 f"got {self.embedding_group_size}")
        try:
            parse_size(self.activation_memory)
        except ValueError:
            raise UsageError(f"--activation-memory {self.activation_memory!r}: expected a size such as 2GiB") from None


@dataclass
class QuantizeResult(StageResult):
    gate_passed: bool | None = None  # None: no gate

    @property
    def report(self) -> dict:
        return self.summary


# ---- the stage ------------------------------------------------------------------------------
def main_variant(c: QuantizeConfig, cfg) -> Variant:
    """The variant written: linears as --bits/--method/--group-size, the embedding as --embedding-*."""
    return Variant(c.bits, c.method, c.group_size,
                   embedding_spec(c.embedding_bits, c.embedding_group_size, cfg.hidden_size))


def resolve(c: QuantizeConfig, cfg) -> QuantizeConfig:
    """Fill defaults that depend on the model, and check the options that do (UsageError)."""
    c = replace(c, method=c.method.lower(), compare=tuple(c.compare or ()))
    check_variant(main_variant(c, cfg), cfg, f"--bits {c.bits} --method {c.method}"
                  + (f" --group-size {c.group_size}" if c.group_size else "")
                  + (f" --embedding-bits {c.embedding_bits}" if c.embedding_bits else ""))
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
    for k in ("src", "out", "device", "if_stale", "lock", "activation_memory"):
        d.pop(k)
    if c.embedding_bits is None:  # the default: manifests written before the option stay up to date
        d.pop("embedding_bits"), d.pop("embedding_group_size")
    d["compare"] = list(d["compare"])
    return d


def run(c: QuantizeConfig) -> QuantizeResult:
    c.validate()
    with StageOutput("quantize", c.out, lock=c.lock, if_stale=c.if_stale) as output:
        return _run(c, output)


def _run(c: QuantizeConfig, output: StageOutput) -> QuantizeResult:
    src = Path(c.src)
    device = runtime.resolve_device(c.device)
    reader = CheckpointReader(src)  # headers only; tensors are read slice by slice as needed
    cfg0 = reader.cfg
    if cfg0.quantization:
        q = cfg0.quantization
        raise InputError(f"{src}: already quantized (int{q.get('bits')} {q.get('method', 'rtn')}); "
                         "quantize its floating-point parent instead")
    c = resolve(c, cfg0)
    main = main_variant(c, cfg0)
    tp_out = c.tp or cfg0.tensor_parallel_size
    where = f"--bits {c.bits} --method {c.method}" + (f" --group-size {c.group_size}" if c.group_size else "")
    group_out = output_group(main, cfg0, tp_out, where)
    others = []
    for spec in c.compare:
        v = parse_variant(spec, c.bits, main.embedding, cfg0.hidden_size)
        check_variant(v, cfg0, f"--compare {spec}")
        if v != main and v not in others:
            others.append(v)
    variants = [main] + others
    needs_gptq = any(v.method == "gptq" for v in variants)
    has_data = c.calibration is not None or c.eval is not None
    if not c.report and (c.max_ppl_increase is not None or others):
        raise UsageError("--no-report skips the evaluation that --max-ppl-increase and --compare need")
    if c.max_ppl_increase is not None and not has_data:
        raise UsageError("--max-ppl-increase needs evaluation tokens: pass --eval or --calibration TOKENS_DIR")
    if others and not has_data:
        raise UsageError("--compare needs evaluation tokens: pass --eval or --calibration TOKENS_DIR")
    reader.check_model()

    stored = stored_dtype(reader.dtypes)
    out_cfg = OutputLayout(cfg0, main, tp_out, stored, torch.float16, group_out).cfg
    inputs = [str(p) for p in (c.src, c.calibration, c.eval) if p is not None]
    stage_cfg = {"quantize": run_config(c)}
    if c.out is not None and output.up_to_date({"model": out_cfg.to_dict(), **stage_cfg}, inputs):
        report = output.result.summary.get("quantize", {})
        gate = report.get("gate")
        return QuantizeResult(summary=report, out=output.out, status=output.result.status,
                              gate_passed=None if gate is None else gate.get("passed"))

    dtype = parse_dtype(c.dtype)
    if cfg0.tensor_parallel_size != tp_out:
        console.log(f"{src}: stored at TP={cfg0.tensor_parallel_size}; each rank's slices are read for TP={tp_out}")
    calib, evals = select_windows(c, cfg0, needs_gptq, need_eval=c.report)
    if evals is None and c.report:
        console.warn("no evaluation tokens (--eval / --calibration): writing the artifact without a quality report")
    budget = parse_size(c.activation_memory)
    spill_root = Path(tempfile.mkdtemp(prefix=".quantize-spill-", dir=Path(c.out).parent if c.out else None))
    try:
        return _quantize(c, reader, variants, tp_out, group_out, calib, evals, dtype, device, budget, spill_root,
                         output, inputs, stage_cfg, stored)
    finally:
        shutil.rmtree(spill_root, ignore_errors=True)


def _quantize(c, reader, variants, tp_out, group_out, calib, evals, dtype, device, budget, spill_root, output,
              inputs, stage_cfg, stored) -> QuantizeResult:
    main = variants[0]
    if c.out is None:
        report, gate_passed = _produce(c, reader, variants, tp_out, group_out, calib, evals, dtype, device, budget,
                                       spill_root, stored, None)
    else:
        doc = {"model": OutputLayout(reader.cfg, main, tp_out, stored, torch.float16, group_out).cfg.to_dict(),
               **stage_cfg}
        with output.writer(doc, inputs) as w:
            report, gate_passed = _produce(c, reader, variants, tp_out, group_out, calib, evals, dtype, device,
                                           budget, spill_root, stored, w.path)
            w.status = FAILED_GATE if gate_passed is False else COMPLETE
            w.summary["quantize"] = report
        console.log(f"wrote {c.out}" + (" (marked failed-gate)" if gate_passed is False else ""))
    return QuantizeResult(summary=report, out=None if c.out is None else Path(c.out),
                          status=FAILED_GATE if gate_passed is False else COMPLETE, gate_passed=gate_passed)


def _produce(c, reader, variants, tp_out, group_out, calib, evals, dtype, device, budget, spill_root, stored,
             out_dir: Path | None) -> tuple[dict, bool | None]:
    """Write the main variant into ``out_dir`` (None: nowhere), quantize the compared ones into
    spill files, evaluate them all layer by layer; (report, gate passed or None)."""
    main = variants[0]
    keys = linear_keys(reader.cfg)
    report = {"source": str(c.src), "output": None if c.out is None else str(c.out), "bits": main.bits,
              "group_size": main.group_size, "method": main.method, "tensor_parallel_size": tp_out,
              "embedding": main.block().get("embedding")}  # None: full precision (GLM-130B's)
    parent_get = lambda n: reader.read(n, 1, 0)  # noqa: E731 - the parent's TP=1 tensors
    gets, layouts = [], []
    for i, v in enumerate(variants):
        if v is main and out_dir is not None:
            console.log(f"quantizing: {v.name} -> {c.out} at TP={tp_out}")
            layout = quantize_into(c, reader, v, tp_out, group_out, stored, calib, dtype, device, budget, spill_root,
                                   lambda o: NativeSink(out_dir, o.cfg, o.entries, DEFAULT_MAX_SHARD_BYTES))
            copy_tokenizer(c.src, out_dir)
            written = CheckpointReader(out_dir, require_manifest=False)
            gets.append((lambda n, r=written: r.read(n, 1, 0), layout.cfg))
        elif evals is not None:
            console.log(f"quantizing: {v.name} (compared, not written)")
            spill = SpillSink(spill_root / f"variant{i}")
            layout = quantize_into(c, reader, v, 1, v.group_size, stored, calib, dtype, device, budget, spill_root,
                                   lambda o, spill=spill: spill)
            gets.append((lambda n, spill=spill: spill.get(n, parent_get), layout.cfg))
        else:
            continue
        layouts.append(layout)
    if layouts:
        report["scale_dtype"] = str(layouts[0].scale_dtype).replace("torch.", "")
    report["quantized_tensors"] = len(keys)
    report["linear_weight_bytes"] = {"parent": sum(math.prod(reader.global_shape(k)) * reader.dtypes[k].itemsize
                                                   for k in keys)}
    report["embedding_bytes"] = {"parent": math.prod(reader.global_shape(EMBEDDING_KEY))
                                 * reader.dtypes[EMBEDDING_KEY].itemsize}
    if out_dir is not None:
        report["linear_weight_bytes"]["quantized"] = layouts[0].linear_bytes()
        report["embedding_bytes"]["quantized"] = layouts[0].embedding_bytes()
    if evals is None:
        if calib is not None:
            report["calibration"] = {"source": calib.source, "windows": len(calib.tokens), "seq_len": c.seq_len}
        if not c.report:
            report["report"] = "skipped (--no-report)"
        return report, None
    console.log(f"evaluating on {len(evals.tokens)} windows of {c.seq_len} tokens from {evals.source} "
                "(layer by layer)")
    parent_row, rows = layerwise_report(reader.cfg, parent_get, gets, evals, batch_size=c.batch_size, dtype=dtype,
                                        device=device, budget=budget, spill_dir=spill_root / "eval")
    report["eval"] = {"source": evals.source, "windows": len(evals.tokens), "seq_len": c.seq_len,
                      "prefix": c.eval_prefix, "scored_tokens": parent_row["tokens"],
                      "layout": "lm_window: prefix (bidirectional) + [gMASK] <sop> + scored text"}
    if calib is not None:
        report["calibration"] = {"source": calib.source, "windows": len(calib.tokens), "seq_len": c.seq_len}
    report["parent"] = {"ppl": parent_row["ppl"]}
    report["quantized"] = {"name": main.name, **rows[0]}
    report["compare"] = [{"name": v.name, **v.block(), **r} for v, r in zip(variants[1:], rows[1:])]
    gate_passed = None
    if c.max_ppl_increase is not None:
        gate_passed = rows[0]["ppl_increase_pct"] <= c.max_ppl_increase
        report["gate"] = {"max_ppl_increase_pct": c.max_ppl_increase, "passed": gate_passed}
    return report, gate_passed


def quantize_into(c, reader, v, tp, group, stored, calib, dtype, device, budget, spill_root, make_sink):
    """Variant ``v`` at ``tp`` written through ``make_sink(layout)``: fp16 scales, or fp32 (a
    fresh sink) when a weight or scale overflows fp16. Returns the OutputLayout written."""
    for scale_dtype in (torch.float16, torch.float32):
        out = OutputLayout(reader.cfg, v, tp, stored, scale_dtype, group)
        sink = make_sink(out)
        qz = None
        try:
            with console.progress(len(out.linears), f"{v.method} {v.name}", "matrices") as bar:
                if v.method == "gptq":
                    qz = GPTQ(reader, out, calib, batch_size=c.batch_size, dtype=dtype, device=device,
                              block_size=c.block_size, damp=c.damp, act_order=c.act_order, budget=budget,
                              spill_dir=spill_root / "gptq", progress=bar)
                else:
                    qz = RTN(reader, out, progress=bar)
                write_quantized(reader, out, qz, sink.write)
                sink.close()
        except ScaleOverflow:
            console.warn(f"{v.name}: a weight exceeds the fp16 range: storing fp32 scales")
            continue
        finally:
            if isinstance(qz, GPTQ):
                qz.close()
        if isinstance(qz, GPTQ) and qz.max_damp > c.damp:
            console.warn(f"gptq: raised dampening up to {qz.max_damp:g} where a Hessian was singular")
        return out
    raise AssertionError("fp32 scales cannot overflow")


def report_rows(report: dict) -> list[list]:
    """The comparison table: parent, the written variant (*), the --compare variants."""
    if "parent" not in report:
        return []
    def emb(block):
        e = block.get("embedding")
        return embedding_name(e and (e["bits"], e["group_size"])).removeprefix("embedding ")
    rows = [["fp parent", "-", "-", "-", "fp", report["parent"]["ppl"], "-", "-", "-"]]
    q = report["quantized"]
    rows.append([q["name"] + (" *" if report.get("output") else ""), report["bits"],
                 report["group_size"] or "row", report["method"], emb(report), q["ppl"],
                 f"{q['ppl_increase_pct']:+.3f}", q["kl_mean"], q["top1_agreement"]])
    for r in report.get("compare", []):
        rows.append([r["name"], r["bits"], r["group_size"] or "row", r["method"], emb(r), r["ppl"],
                     f"{r['ppl_increase_pct']:+.3f}", r["kl_mean"], r["top1_agreement"]])
    return rows


REPORT_COLUMNS = ["variant", "bits", "group", "method", "embedding", "ppl", "ppl +%", "KL mean", "top-1 agree"]
