"""The convert stage: import, reshard, gather and export checkpoints, streaming, then verify.

    run(ConvertConfig(src="glm-130b-sat", out="glm-130b-tp4", tp=4, preset="glm-130b"))

Sources (glmctl.formats, detected): a native glmctl checkpoint; a SAT checkpoint
(docs/glm130b.md §6.1), fp16 or quantized; a ``glmctl pretrain`` run dir (its ``latest`` step)
or step dir (native weights, or ``zero_master`` for the fp32 ZeRO master weights in
trainer/deepspeed); a DeepSpeed checkpoint folder; a transformers export. Targets: native
(safetensors per TP rank, glmctl/checkpoint.py's layout), SAT (``to="sat"``) or a transformers
directory with remote code (``to="hf"``, TP=1, glmctl.formats.hf).

Streaming: every tensor is read, resharded (glmctl.reshard.Plan) and written on its own into
per-rank files whose headers were laid out from the shapes beforehand, so peak memory is a few
tensors (bench/convert_memory.py), not the model.
Verification runs the same random tokens with [gMASK] and [MASK] through source and result
(each run at TP=1 one block at a time, glmctl.quantization.layerwise_logits) and compares
logits; the output is only moved into place when they agree.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from glmctl import adapters, formats
from glmctl.checkpoint import DEFAULT_MAX_SHARD_BYTES, copy_tokenizer, parse_dtype, save_model
from glmctl.config import ROPE_MODES, ModelConfig
from glmctl.console import human_bytes, log, parse_size, progress, warn
from glmctl.errors import GlmctlError, InputError, UsageError
from glmctl.formats import hf
from glmctl.formats.native import NativeSink, NativeSource
from glmctl.formats.sat import SatSink, SatSource
from glmctl.model import masks
from glmctl.quantization import layerwise_logits
from glmctl.reshard import FORMATS, Plan
from glmctl.session import check_tokenizer, open_model
from glmctl.stage import StageOutput, StageResult
from glmctl.tokenizer import Tokenizer


@dataclass(frozen=True)
class ConvertConfig:
    src: str
    out: str
    tp: int | None = None  # output tensor-parallel size (default: the source's)
    to: str = "glmctl"  # glmctl | sat | hf
    dtype: str | None = None  # fp32 | bf16 | fp16 for floating tensors (default: as stored; scales kept)
    preset: str | None = None  # hyperparameters a SAT/DeepSpeed checkpoint does not carry
    num_attention_heads: int | None = None
    rope: str | None = None  # exact | sat (default: the source's; "sat" for a SAT import)
    tokenizer: str | None = None  # tokenizer (or checkpoint) dir to attach to the output
    verify: bool | None = None  # None: verify when source and result fit in memory
    tolerance: float | None = None  # max |logit difference| allowed (default from the dtypes)
    zero_master: bool = False  # from a pretrain step: take the ZeRO fp32 master weights
    max_shard_size: str | None = None  # split a rank's weights into files of at most this size
    iteration: str | None = None  # SAT export: the iteration folder (default: from the source)
    dequantize: bool = False  # --to hf from a quantized source: export W = q * scale (else refused)
    merge_adapter: str | None = None  # a LoRA adapter (dir or finetune run) to fold into SRC's weights
    merge_precision: str = "full"  # --merge-adapter on a quantized SRC: "full" precision or re-"quantized"
    seed: int = 0  # random probe tokens for verification
    if_stale: bool = False  # skip when OUT was made from the same source and options
    lock: str | None = None  # None, "auto" (.<out>.lock beside OUT) or a lock file path

    def validate(self) -> None:
        if self.to not in FORMATS + ("hf",):
            raise UsageError(f"--to {self.to!r}: choose glmctl, sat or hf")
        if self.to == "hf" and self.tp not in (None, 1):
            raise UsageError(f"--tp {self.tp}: a transformers export is one model (TP=1)")
        if self.dequantize and self.to != "hf":
            raise UsageError("--dequantize applies to --to hf only (other formats keep quantized weights)")
        if self.num_attention_heads is not None and self.num_attention_heads < 1:
            raise UsageError("--num-attention-heads must be positive")
        if self.rope is not None and self.rope not in ROPE_MODES:
            raise UsageError(f"--rope {self.rope!r}: choose {' or '.join(ROPE_MODES)}")
        if self.merge_precision not in adapters.MERGE_PRECISIONS:
            raise UsageError(f"--merge-precision {self.merge_precision!r}: choose full or quantized")
        other = [k for k in ("preset", "num_attention_heads", "zero_master", "iteration", "dequantize")
                 if getattr(self, k)] + ["to"] * (self.to != "glmctl") + ["tp"] * (self.tp not in (None, 1))
        if self.merge_adapter and other:  # the merge writes a TP=1 glmctl checkpoint from a glmctl one
            raise UsageError(f"--merge-adapter: drop --{other[0].replace('_', '-')} (convert the merged checkpoint "
                             "afterwards)")
        parse_dtype(self.dtype)
        if Path(self.out).resolve() == Path(self.src).resolve():
            raise UsageError("OUT must differ from SRC")
        self.max_shard_bytes()

    def max_shard_bytes(self) -> int:
        if self.max_shard_size is None:
            return hf.DEFAULT_MAX_SHARD_BYTES if self.to == "hf" else DEFAULT_MAX_SHARD_BYTES
        try:
            return parse_size(self.max_shard_size)
        except ValueError:
            raise UsageError(f"--max-shard-size {self.max_shard_size!r}: expected a size such as 10GiB") from None

    def options(self) -> dict:
        """The options that make the output (recorded in its manifest)."""
        return {k: v for k, v in asdict(self).items() if k not in ("src", "out", "if_stale", "lock")}


def run(config: ConvertConfig) -> StageResult:
    """Convert ``config.src`` into ``config.out``; the summary also goes into the manifest."""
    config.validate()
    if config.merge_adapter:
        return merge_adapter(config)
    src_path, out = Path(config.src), Path(config.out)
    with StageOutput("convert", out, lock=config.lock, if_stale=config.if_stale) as o, \
            formats.open_source(src_path, heads=config.num_attention_heads, preset=config.preset,
                                zero_master=config.zero_master) as src:
        ids = attach_tokenizer(src, Path(config.tokenizer)) if config.tokenizer else {}
        if config.rope:  # the output's mode, and the one both sides of --verify run (docs/glm130b.md §2.3)
            src.cfg = src.cfg.replace(rope=config.rope)
        to_hf = config.to == "hf"
        if to_hf:
            hf.check_exportable(src.cfg, config.dequantize)
        tp_out = 1 if to_hf else config.tp or src.tp
        plan = Plan(src, tp_out=tp_out, to="glmctl" if to_hf else config.to, dtype=parse_dtype(config.dtype),
                    preset=config.preset, ids=ids)
        out_cfg = plan.cfg_out.replace(quantization=None) if to_hf else plan.cfg_out  # hf: float weights
        tok_dir = Path(config.tokenizer) if config.tokenizer else src.tokenizer_dir
        iteration = str(config.iteration or (src.iteration if src.iteration is not None else "release"))
        log(f"convert: {src.label}, TP={src.tp} -> {config.to} TP={tp_out}, {len(plan.names)} tensors, "
            f"{human_bytes(src.bytes())}; largest tensor {human_bytes(plan.largest_tensor_bytes)}")
        verify = config.verify
        if verify is None:
            need = max(src.fp32_bytes(), 1)
            verify, avail = fits_in_memory(need)
            if not verify:
                log(f"convert: not verifying: a TP=1 fp32 model needs {human_bytes(need)}, "
                    f"{human_bytes(avail)} available (--verify forces it)")

        summary = {"source_format": src.kind, "source": str(src.path), "source_tp": src.tp, "tp": tp_out,
                   "format": config.to, "tensors": plan.tensor_count,
                   "quantization": out_cfg.quantization, "largest_tensor_bytes": plan.largest_tensor_bytes}
        config_doc = {"model": out_cfg.to_dict(), "convert": config.options(),
                      "source": {"format": src.kind, "tensor_parallel_size": src.tp, "iteration": src.iteration}}
        if o.up_to_date(config_doc, [src_path]):
            return o.result
        with o.writer(config_doc, [src_path]) as w:
            if to_hf:
                with progress(len(plan.names), "convert", unit="tensors") as bar:
                    summary["hf"] = hf.export(src, plan, w.path, tokenizer_dir=tok_dir, dequantize=config.dequantize,
                                              max_shard_bytes=config.max_shard_bytes(), progress=bar)
            elif config.to == "sat":
                sink = SatSink(w.path, plan.cfg_out, plan.entries, iteration, check=plan.scales())
                summary["iteration"] = iteration
            else:
                sink = NativeSink(w.path, plan.cfg_out, plan.entries, config.max_shard_bytes())
            if not to_hf:
                with progress(len(plan.names), "convert", unit="tensors") as bar:
                    plan.write(sink, bar)
            if tok_dir is not None and not to_hf:
                copy_tokenizer(tok_dir, w.path)
            elif config.to == "glmctl":
                warn(f"{out}: no tokenizer attached (the source carries none); pass --tokenizer DIR")
            if verify:
                summary["verify"] = verify_output(src, plan, w.path, config)
            w.summary.update(summary)
    return StageResult(summary=summary, out=out)


# ---- the tokenizer ------------------------------------------------------------------------------
def attach_tokenizer(src: formats.Source, tok_dir: Path) -> dict:
    """The special-token ids the output takes from the tokenizer at ``tok_dir``.

    Its padded vocabulary must equal the model's embedding rows. Where the source's config was
    recorded (config.json, a glmctl manifest) it is the model's truth: the tokenizer must agree
    with it (glmctl.session.check_tokenizer, exit 3 otherwise) and nothing changes. Where the
    ids were inferred (SAT or ZeRO shards with a preset or GLM-130B's defaults), the
    tokenizer's ids are taken."""
    cfg = src.cfg
    try:
        tok = Tokenizer.load(tok_dir)
    except GlmctlError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken tokenizer dir is bad input
        raise InputError(f"{tok_dir}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    over = tok.config_overrides()
    if over["vocab_size"] != cfg.vocab_size:
        raise InputError(f"{tok_dir}: the tokenizer's padded vocabulary is {over['vocab_size']} but the model's "
                         f"embedding has {cfg.vocab_size} rows")
    if src.config_recorded:
        check_tokenizer(cfg, tok, tok_dir)
        return {}
    return {k: v for k, v in over.items() if k.endswith("_token_id")}


# ---- verification -------------------------------------------------------------------------------
def probe_inputs(cfg: ModelConfig, seed: int = 0, length: int = 24) -> dict:
    """Two probes built like generation inputs (docs/glm130b.md §4.3, glmctl.model.masks): random
    context + [gMASK] + <sop> + a few tokens, and random text with a [MASK] in the middle + <sop>
    + a span. Returns {name: (tokens [1,s], positions [1,s], mask [1,1,s,s])}."""
    ids = cfg.special_token_ids()
    special = torch.tensor(sorted(v for v in ids.values() if 0 <= v < cfg.vocab_size), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    length = max(8, min(length, cfg.max_sequence_length - 8))

    def rand(k):
        out = []
        while len(out) < k:
            cand = torch.randint(0, cfg.vocab_size, (2 * k + 4,), generator=g)
            out += [int(c) for c in cand if not bool((special == c).any())]
        return out[:k]

    probes = {}
    for name, context in (("[gMASK]", rand(length) + [ids["[gMASK]"]]),
                          ("[MASK]", rand(length // 2) + [ids["[MASK]"]] + rand(length - length // 2))):
        tokens, positions, prefix_len, _, gen_position = masks.generation_input(context, ids)
        extra = rand(6)
        tokens = tokens + extra
        positions = positions + [gen_position(k) for k in range(1, len(extra) + 1)]
        probes[name] = (torch.tensor([tokens]), torch.tensor([positions]),
                        masks.prefix_lm_mask(len(tokens), prefix_len))
    return probes


def model_logits(src: formats.Source, probes: dict, names=None) -> dict:
    """Logits of the model ``src`` holds at TP=1 in fp32 (int8 weights stay int8), run one block
    at a time (glmctl.quantization.layerwise_logits: the whole-model forward's operations), so
    verifying GLM-130B holds one block, not the model."""
    def get(name):
        t = src.merged(name)
        src.release(name)
        return t
    return layerwise_logits(src.cfg, get, probes, dtype=torch.float32)


def auto_tolerance(src_dtype, out_dtype) -> float:
    """Relative to max(1, max |source logit|): identical weights give ~0 (the models run the
    same fp32 code); a narrower output dtype rounds every weight."""
    bits = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
    if bits.get(out_dtype, 23) >= bits.get(src_dtype, 23):
        return 1e-4
    return {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(out_dtype, 1e-3)


def fits_in_memory(nbytes_fp32: int) -> tuple[bool, int]:
    avail = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    if avail is None:
        return True, 0
    return nbytes_fp32 * 2 < avail, avail


def verify_output(src: formats.Source, plan: Plan, out_dir: Path, config: ConvertConfig) -> dict:
    """Compare the logits of ``src`` and of the files written to ``out_dir`` (no manifest yet)."""
    probes = probe_inputs(src.cfg, config.seed)
    ref = model_logits(src, probes, plan.names)
    if config.to == "hf":
        result = hf.HFSource(out_dir)
    elif plan.to == "sat":
        result = SatSource(out_dir, base=src.cfg)
    else:
        result = NativeSource(out_dir, require_manifest=False)
    with result:
        got = model_logits(result, probes)
    scale = max(1.0, max(float(v.abs().max()) for v in ref.values()))
    src_dt = torch.float32 if config.dequantize else src.stored_dtype()  # dequantized: rounded to the output dtype
    tol = config.tolerance if config.tolerance is not None else \
        auto_tolerance(src_dt, plan.out_dtype("x.weight", src_dt)) * scale
    diffs = {k: float((ref[k] - got[k]).abs().max()) for k in ref}
    worst = max(diffs.values())
    detail = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
    if not math.isfinite(worst) or worst > tol:
        raise GlmctlError(f"verification failed: max logit difference {worst:.4g} > tolerance {tol:.3g} "
                          f"({detail}); the output was removed")
    log(f"convert: verified: max logit difference {worst:.3g} ({detail}), tolerance {tol:.3g}")
    return {"max_logit_diff": worst, "per_mask": diffs, "tolerance": tol, "probe_tokens": {
        k: int(v[0].shape[1]) for k, v in probes.items()}}


# ---- --merge-adapter ----------------------------------------------------------------------------
def merge_adapter(config: ConvertConfig) -> StageResult:
    """SRC with the LoRA adapter folded in -> OUT, a TP=1 glmctl checkpoint made by
    glmctl.adapters.merged_model (as `finetune --merge`), in memory, not streamed. --verify (on
    unless --no-verify) compares it with the unmerged SRC + adapter on the probes; a re-quantized
    merge is only gated when --tolerance is given (re-quantizing moves the logits)."""
    adapter = adapters.resolve_adapter_dir(config.merge_adapter)
    inputs = [Path(config.src), adapter]
    with StageOutput("convert", config.out, lock=config.lock, if_stale=config.if_stale) as o:
        s = open_model(config.src, adapter=adapter, need_tokenizer=False)
        src_tp = s.manifest.get("config", {}).get("model", {}).get("tensor_parallel_size", 1)
        extra = {"convert": config.options(), "source": {"format": "glmctl", "tensor_parallel_size": src_tp}}
        if o.up_to_date({"model": adapters.merged_config(s.model, config.merge_precision).to_dict(), **extra},
                        inputs):
            return o.result
        merged = adapters.merged_model(s.model, config.merge_precision, parse_dtype(config.dtype), config.out).eval()
        summary = {"source_format": "glmctl", "source": config.src, "source_tp": src_tp, "tp": 1,
                   "format": "glmctl", "tensors": len(merged.state_dict()), "merged_adapter": str(adapter),
                   "merge_precision": config.merge_precision, "quantization": merged.config.quantization}
        if config.verify is not False:
            summary["verify"] = verify_merge(s.model, merged, config)
        log(f"convert: merged {adapter} into {config.src}")
        save_model(merged, config.out, tokenizer=config.tokenizer or config.src, stage="convert",
                   config_extra=extra, inputs=inputs, summary=summary, max_shard_bytes=config.max_shard_bytes())
    return StageResult(summary=summary, out=Path(config.out))


def verify_merge(adapted, merged, config: ConvertConfig) -> dict:
    probes = probe_inputs(adapted.config, config.seed)
    with torch.no_grad():
        ref = {k: adapted(*p).float() for k, p in probes.items()}
        diffs = {k: float((ref[k] - merged(*p).float()).abs().max()) for k, p in probes.items()}
    scale = max(1.0, max(float(v.abs().max()) for v in ref.values()))
    requantized = merged.config.quantization is not None and adapted.config.quantization is not None
    dtypes = [m.transformer.final_layernorm.weight.dtype for m in (adapted, merged)]
    tol = config.tolerance if config.tolerance is not None else \
        None if requantized else auto_tolerance(*dtypes) * scale
    worst = max(diffs.values())
    if not math.isfinite(worst) or (tol is not None and worst > tol):
        raise GlmctlError(f"verification failed: the merged model's logits differ from SRC + adapter by "
                          f"{worst:.4g} (tolerance {tol}); nothing was written")
    log(f"convert: merged logits vs SRC + adapter: max difference {worst:.3g}"
        + (f", tolerance {tol:.3g}" if tol is not None else " (re-quantized: not gated)"))
    return {"max_logit_diff": worst, "per_mask": diffs, "tolerance": tol}
