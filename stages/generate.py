"""Stage `glmctl generate`: fill blanks and continue text with a GLM checkpoint.

Prompts come from arguments, a text file (one per line), a JSON-lines file (``{"id": ...,
"prompt": ...}``), stdin, or an interactive terminal. A prompt with ``[MASK]`` or ``[sMASK]``
has its blanks filled left to right; a prompt without a mask gets ``[gMASK]`` appended and is
continued (spec §4.3; decoding in ``glmctl.generation``). Prompts are decoded ``batch_size`` at a
time (padding does not change results); results come out in input order.

Outputs:
    text    completed texts on stdout (streamed token by token on a terminal, blanks underlined)
    jsonl   one record per prompt, in input order, ids kept (stdout or ``output``)
    json    one document {"results": [...], ...} on stdout

Record: {"id", "prompt", "text", "mask", "blanks": [{"text", "tokens", "start", "end", "stop"}],
"new_tokens"} - ``start``/``end`` are character offsets of the blank in ``text``
(``text[start:end] == blank["text"]``, surrounding whitespace left outside). A prompt that cannot
run gives {"id", "error"} in its place, one line on stderr, and the run exits 3 at the end.

Under torchrun every rank joins a tensor-parallel group, rank 0 reads the prompts and sends them
to the others, every rank decodes (sampling seeds are shared), and only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmctl import console
from glmctl.errors import InputError, UsageError
from glmctl.generation import GenerationConfig

STAGE = "generate"
MASK_SPELLINGS = ("[MASK]", "[sMASK]", "[gMASK]")
_MASK_SPLIT = re.compile(r"(\[(?:MASK|sMASK|gMASK)\])")
_MASK_LIKE = re.compile(r"\[[^\[\]\s]{0,24}\]")
FORMATS = ("auto", "text", "jsonl")
INPUT_FORMATS = ("auto", "text", "jsonl")


@dataclass
class GenerateConfig:
    model: str
    prompts: list[str] = field(default_factory=list)
    input: str | None = None  # a file, or "-" for stdin
    input_format: str = "auto"  # auto: jsonl when the file ends in .jsonl/.ndjson or its first line is "{..."
    output: str | None = None  # JSON-lines file, written atomically
    format: str = "auto"  # stdout: text | jsonl; auto: jsonl when prompts come from a file/stdin
    json: bool = False  # one JSON document on stdout instead
    stream: bool | None = None  # None: when printing text to a terminal
    batch_size: int = 8
    dtype: str | None = None  # fp32 | bf16 | fp16 (default: as stored)
    device: str | None = None  # cpu | cuda (default: cuda when available)
    tokenizer: str | None = None  # default: the checkpoint's copy
    interactive: bool | None = None  # None: when no prompts are given and stdin is a terminal
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class Prompt:
    index: int  # position in the input (0-based)
    id: object  # the JSON line's id, or the line / argument number
    where: str  # "FILE:LINE" or "argument N", for messages
    text: str | None = None
    error: str | None = None
    tokens: list[int] | None = None


@dataclass
class GenerateResult:
    records: list[dict]
    failed: int
    new_tokens: int
    seconds: float


# ---- reading prompts --------------------------------------------------------------------------
def _looks_jsonl(name: str, first_line: str | None) -> bool:
    if name.lower().endswith((".jsonl", ".ndjson", ".jsonl.txt")):
        return True
    return first_line is not None and first_line.lstrip().startswith("{")


def parse_prompt_lines(lines: list[str], source: str, fmt: str = "auto") -> list[Prompt]:
    """Prompts of a text or JSON-lines input; a bad line becomes a Prompt with ``error`` set.
    Blank lines are skipped (line numbers still count them)."""
    if fmt not in INPUT_FORMATS:
        raise UsageError(f"unknown input format {fmt!r}; choose auto, text or jsonl")
    first = next((ln for ln in lines if ln.strip()), None)
    if first is None:
        raise InputError(f"{source}: no prompts (the input is empty)")
    jsonl = fmt == "jsonl" or (fmt == "auto" and _looks_jsonl(source, first))
    out: list[Prompt] = []
    for n, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        where = f"{source}:{n}"
        if not jsonl:
            out.append(Prompt(len(out), n, where, text=line))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            out.append(Prompt(len(out), n, where, error=f"{where}: malformed JSON line ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(rec, dict):
            out.append(Prompt(len(out), n, where, error=f"{where}: expected a JSON object with a \"prompt\" string"))
            continue
        pid = rec.get("id", n)
        if not isinstance(rec.get("prompt"), str):
            out.append(Prompt(len(out), pid, where,
                              error=f"{where}: JSON line has no \"prompt\" string (keys: {', '.join(rec) or 'none'})"))
            continue
        out.append(Prompt(len(out), pid, where, text=rec["prompt"]))
    return out


def read_input(path: str, fmt: str = "auto", stdin=None) -> list[Prompt]:
    if path == "-":
        stream = stdin or sys.stdin
        return parse_prompt_lines(stream.read().splitlines(keepends=True), "<stdin>", fmt)
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a prompt file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise InputError(f"{p}:{line}: not valid UTF-8") from None
    return parse_prompt_lines(text.splitlines(keepends=True), str(p), fmt)


def encode_prompt(text: str, tokenizer, ids: dict, where: str) -> list[int]:
    """Prompt text -> ids: exact [MASK] / [sMASK] / [gMASK] become the model's mask ids; any other
    bracketed word containing "mask" is rejected (a typo would otherwise be read as text)."""
    for m in _MASK_LIKE.finditer(text):
        word = m.group(0)
        if "mask" in word.lower() and word not in MASK_SPELLINGS:
            raise InputError(f"{where}: unknown mask token {word!r} at character {m.start() + 1}; "
                             f"use [MASK], [sMASK] or [gMASK]")
    out: list[int] = []
    for part in _MASK_SPLIT.split(text):
        if part in MASK_SPELLINGS:
            out.append(ids[part])
        elif part:
            out.extend(tokenizer.encode(part, allow_special=False))
    return out


# ---- incremental detokenization -------------------------------------------------------------
class TextStream:
    """Print the text of a growing token list as it grows, without splitting a multi-byte
    character: a trailing U+FFFD (an incomplete UTF-8 sequence of byte pieces) is held back until
    the next token completes it, or until ``flush``."""

    def __init__(self, decode, write):
        self.decode, self.write = decode, write
        self.printed = ""

    def update(self, tokens, final: bool = False) -> None:
        text = self.decode(tokens)
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > len(self.printed):
            # a lossless tokenizer only appends; if an earlier character changed, print from the change
            k = len(self.printed) if text.startswith(self.printed) else 0
            if k == 0 and self.printed:
                k = len(os.path.commonprefix([text, self.printed]))
                if k < len(self.printed):
                    k = len(self.printed)
            self.write(text[k:])
            self.printed = text

    def reset(self) -> None:
        self.printed = ""


def _style_ok(stream) -> bool:
    return (hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"
            and "NO_COLOR" not in os.environ)


UNDERLINE, RESET = "\033[4m", "\033[0m"


# ---- distributed helpers -----------------------------------------------------------------------
def _init_distributed(device: str | None) -> str:
    """Under torchrun: join the process group and split the model over all ranks (TP)."""
    import torch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown device {device!r}; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if device == "cuda" and world > 1:
        device = f"cuda:{local}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if world > 1:
        import torch.distributed as dist
        from glmctl.model import parallel as tp
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if tp.tp_size() == 1:
            tp.init_tensor_parallel(dist.get_world_size())
    return device


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast(obj):
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _on_rank0(fn):
    """Run ``fn`` on rank 0 and give every rank its value (or its GlmctlError)."""
    from glmctl.errors import GlmctlError
    value = err = None
    if _rank() == 0:
        try:
            value = fn()
        except GlmctlError as e:
            err = (type(e), str(e), e.exit_code)
    value, err = _broadcast((value, err))
    if err is not None:
        cls, msg, code = err
        raise cls(msg, code)
    return value


# ---- the stage -------------------------------------------------------------------------------
class Generator:
    """A loaded model + tokenizer that turns prompts into records (used by run and interactive)."""

    def __init__(self, c: GenerateConfig, device: str):
        import torch
        from glmctl.checkpoint import load_model
        from glmctl.tokenizer import Tokenizer
        self.c = c
        self.gen = c.generation.validate()
        self.tokenizer = Tokenizer.load(c.tokenizer or c.model)
        self.model = load_model(c.model, dtype=c.dtype, device=device)
        cfg = self.model.config
        self.ids = cfg.special_token_ids()
        tok_ids = self.tokenizer.special_ids
        for name in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "eos", "eod"):  # eod ends a span too
            if name in tok_ids and tok_ids[name] != self.ids[name]:
                raise InputError(f"{c.model}: the tokenizer's {name} id {tok_ids[name]} differs from config.json's "
                                 f"{self.ids[name]} (tokenizer and checkpoint do not belong together)")
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise InputError(f"{c.model}: the tokenizer has {self.tokenizer.vocab_size} ids but the model only "
                             f"{cfg.vocab_size} embedding rows")
        self.max_len = cfg.max_sequence_length
        self.device = device
        dtype = next((p.dtype for n, p in self.model.named_parameters() if p.is_floating_point()), torch.float32)
        q = cfg.quantization
        self.precision = (f"int{q['bits']}" if q else "") + ("+" if q else "") + str(dtype).replace("torch.", "")

    def prepare(self, p: Prompt) -> None:
        """Encode and check one prompt, setting p.tokens or p.error."""
        from glmctl.model.masks import prepare_prompt
        if p.error is not None:
            return
        try:
            toks = encode_prompt(p.text, self.tokenizer, self.ids, p.where)
        except InputError as e:
            p.error = str(e)
            return
        full = prepare_prompt(toks, self.ids)
        if len(full) + 2 > self.max_len:  # + <sop> + at least one new token
            p.error = (f"{p.where}: prompt is {len(toks)} tokens; with its mask, <sop> and one new token that is "
                       f"longer than the model's maximum length {self.max_len}")
            return
        p.tokens = toks

    def run_batch(self, prompts: list[Prompt], on_token=None, on_blank_start=None) -> list[dict]:
        from glmctl.generation import derive_seed, fill_batch
        seeds = None
        if self.gen.seed is not None:
            seeds = [derive_seed(self.gen.seed, p.index) for p in prompts]
        results = fill_batch(self.model, [p.tokens for p in prompts], self.ids, self.gen, on_token=on_token,
                             seeds=seeds, on_blank_start=on_blank_start)
        return [self.record(p, r) for p, r in zip(prompts, results)]

    def record(self, p: Prompt, r) -> dict:
        tok = self.tokenizer
        text = tok.decode(r.tokens)
        names = {v: k for k, v in self.ids.items() if k in MASK_SPELLINGS}
        blanks = []
        for (start, span), hyps in zip(r.spans, r.hypotheses):
            a = len(tok.decode(r.tokens[:start]))
            b = len(tok.decode(r.tokens[:start + len(span)]))
            seg = text[a:b]
            a += len(seg) - len(seg.lstrip())
            b -= len(seg) - len(seg.rstrip())
            if b < a:
                b = a
            stop = hyps[0].stop_token if hyps else None
            stop_name = "length" if stop is None else next((k for k, v in self.ids.items() if v == stop), str(stop))
            blank = {"text": text[a:b], "tokens": len(span), "start": a, "end": b, "stop": stop_name}
            if self.gen.strategy == "beam" and hyps:
                blank["score"] = round(hyps[0].score, 6)
            blanks.append(blank)
        return {"id": p.id, "prompt": p.text, "text": text, "mask": names.get(r.mask_id, "[gMASK]"),
                "blanks": blanks, "new_tokens": sum(len(s) for _, s in r.spans)}


def _error_record(p: Prompt) -> dict:
    return {"id": p.id, "error": p.error}


def collect_prompts(c: GenerateConfig, stdin=None) -> list[Prompt]:
    if c.prompts and c.input:
        raise UsageError("give prompts as arguments or with --input, not both")
    if c.input:
        return read_input(c.input, c.input_format, stdin)
    if c.prompts:
        return [Prompt(i, i + 1, f"argument {i + 1}", text=t) for i, t in enumerate(c.prompts)]
    return read_input("-", c.input_format, stdin)


def _validate(c: GenerateConfig) -> None:
    if c.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if c.format not in FORMATS:
        raise UsageError(f"unknown --format {c.format!r}; choose text or jsonl")
    if c.json and c.output:
        raise UsageError("--json prints one document on stdout; with --output results go to the file as JSON lines")
    c.generation.validate()


def run(c: GenerateConfig, stdin=None, stdout=None) -> GenerateResult:
    """Generate for every prompt; write results; raise InputError (exit 3) at the end when some
    prompts were rejected (the others still ran and were written)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    _validate(c)
    device = _init_distributed(c.device)
    try:
        return _run(c, device, stdin, stdout)
    finally:
        _teardown()


def _run(c: GenerateConfig, device: str, stdin, stdout) -> GenerateResult:
    if _rank() != 0:
        console.set_quiet(True)
    interactive = c.interactive
    if interactive is None:
        interactive = not c.prompts and not c.input and _rank() == 0 and stdin.isatty()
        interactive = bool(_broadcast(interactive))
    if interactive:
        return run_interactive(c, device, stdin, stdout)

    prompts = _on_rank0(lambda: collect_prompts(c, stdin))
    t0 = time.monotonic()
    g = Generator(c, device)
    console.log(f"generate: {c.model} ({g.model.config.num_layers} layers, {g.precision}, "
                f"TP={_tp_size()}, {device}), {len(prompts)} prompt(s), {g.gen.strategy}")
    for p in prompts:
        g.prepare(p)

    from_file = c.input is not None or not c.prompts
    fmt = c.format if c.format != "auto" else ("jsonl" if from_file else "text")
    if c.json or c.output:
        fmt = None  # nothing on stdout until the end (json) or nothing at all (output file)
    stream = c.stream
    if stream is None:
        stream = fmt == "text" and stdout.isatty()
    if stream and fmt != "text":
        stream = False
    rank0 = _rank() == 0
    sink = _Sink(stdout if rank0 else None, c.output if rank0 else None)
    style = fmt == "text" and _style_ok(stdout)

    records: list[dict | None] = [None] * len(prompts)
    failed = 0
    new_tokens = 0
    todo = [p for p in prompts if p.error is None]
    for p in prompts:
        if p.error is not None:
            failed += 1
            if rank0:
                print(f"glmctl: error: {p.error}", file=sys.stderr, flush=True)
    show_progress = fmt != "text" and len(todo) > 1
    bar = console.progress(total=len(todo), desc="generate", unit="prompts", enabled=rank0 and show_progress)
    next_out = 0

    def flush_ready():
        nonlocal next_out
        while next_out < len(prompts) and (records[next_out] is not None or prompts[next_out].error is not None):
            rec = records[next_out] if records[next_out] is not None else _error_record(prompts[next_out])
            records[next_out] = rec
            if fmt == "jsonl":
                sink.line(json.dumps(rec, ensure_ascii=False))
            elif fmt == "text" and "error" not in rec and not stream:
                sink.text(_styled(rec) if style else rec["text"])
                sink.text("\n")
            sink.record(rec)
            next_out += 1

    flush_ready()
    batch = 1 if stream else c.batch_size
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        if stream:
            recs = [_stream_one(g, chunk[0], sink, style)]
        else:
            recs = g.run_batch(chunk)
        for p, rec in zip(chunk, recs):
            records[p.index] = rec
            new_tokens += rec["new_tokens"]
        bar.update(len(chunk), tok_s=round(new_tokens / max(1e-9, time.monotonic() - t0), 1))
        flush_ready()
    bar.close()
    seconds = time.monotonic() - t0
    out = [r for r in records if r is not None]
    if c.json and rank0:
        console.emit_json({"model": str(c.model), "strategy": g.gen.strategy, "precision": g.precision,
                           "tensor_parallel_size": _tp_size(), "prompts": len(prompts), "failed": failed,
                           "new_tokens": new_tokens, "seconds": round(seconds, 3), "results": out})
    sink.close()
    if c.output and rank0:
        console.log(f"generate: wrote {len(out)} result(s) to {c.output}")
    console.log(f"generate: {len(todo)} prompt(s), {new_tokens} new tokens in {seconds:.1f}s "
                f"({new_tokens / max(seconds, 1e-9):.1f} tokens/s)")
    del g
    if failed:
        raise InputError(f"{failed} of {len(prompts)} prompt(s) failed (errors above); "
                         f"the other results were written")
    return GenerateResult(out, failed, new_tokens, seconds)


def _styled(rec: dict) -> str:
    text, out, k = rec["text"], [], 0
    for b in rec["blanks"]:
        out += [text[k:b["start"]], UNDERLINE, text[b["start"]:b["end"]], RESET]
        k = b["end"]
    out.append(text[k:])
    return "".join(out)


def _stream_one(g: Generator, p: Prompt, sink: "_Sink", style: bool) -> dict:
    """Generate one prompt, printing its completed text as tokens arrive."""
    ts = TextStream(g.tokenizer.decode, sink.text)
    state = {"prefix": None, "gen": [], "open": False}

    def close_blank():
        if state["open"]:
            ts.update(state["prefix"] + state["gen"], final=True)
            if style:
                sink.text(RESET)
            state["open"] = False

    def on_blank_start(_i, _b, current, mask_index):
        close_blank()
        state["prefix"], state["gen"] = list(current[:mask_index]), []
        ts.update(state["prefix"], final=True)
        if style:
            sink.text(UNDERLINE)
        state["open"] = True

    def on_token(_i, _b, token):
        state["gen"].append(token)
        ts.update(state["prefix"] + state["gen"])

    rec = g.run_batch([p], on_token=on_token, on_blank_start=on_blank_start)[0]
    close_blank()
    if ts.printed != rec["text"] and rec["text"].startswith(ts.printed):
        sink.text(rec["text"][len(ts.printed):])
    sink.text("\n")
    return rec


def run_interactive(c: GenerateConfig, device: str, stdin, stdout) -> GenerateResult:
    """Read prompts from a terminal, one per line, streaming each completion; Ctrl-D ends."""
    g = Generator(c, device)
    rank0 = _rank() == 0
    console.log(f"generate: {c.model} ({g.precision}, {g.gen.strategy}); type a prompt, [MASK] marks a blank, "
                f"Ctrl-D quits")
    sink = _Sink(stdout if rank0 else None, None)
    style = _style_ok(stdout)
    records, n, new_tokens, failed = [], 0, 0, 0
    t0 = time.monotonic()
    while True:
        def ask():
            sys.stderr.write("prompt> ")
            sys.stderr.flush()
            line = stdin.readline()
            return None if line == "" else line.rstrip("\r\n")
        text = _broadcast(ask() if rank0 else None)
        if text is None:
            if rank0:
                sys.stderr.write("\n")
            break
        if not text.strip():
            continue
        n += 1
        p = Prompt(n - 1, n, f"prompt {n}", text=text)
        g.prepare(p)
        if p.error:
            failed += 1
            if rank0:
                print(f"glmctl: error: {p.error}", file=sys.stderr, flush=True)
            continue
        rec = _stream_one(g, p, sink, style)
        records.append(rec)
        new_tokens += rec["new_tokens"]
    del g
    return GenerateResult(records, failed, new_tokens, time.monotonic() - t0)


class _Sink:
    """stdout and/or a JSON-lines file (written under a temporary name, renamed when complete).
    A closed pipe on stdout (``| head``) stops output quietly."""

    def __init__(self, stdout, output: str | None):
        self.stdout = stdout
        self.broken = False
        self._file = None
        self._ctx = None
        if output:
            from glmctl.artifacts import atomic_open
            self._ctx = atomic_open(Path(output), "wb")
            self._file = self._ctx.__enter__()

    def text(self, s: str) -> None:
        if self.stdout is None or self.broken or not s:
            return
        try:
            self.stdout.write(s)
            self.stdout.flush()
        except BrokenPipeError:
            self.broken = True
            try:  # keep Python from complaining about the closed pipe at exit
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):
                pass

    def line(self, s: str) -> None:
        self.text(s + "\n")

    def record(self, rec: dict) -> None:
        if self._file is not None:
            self._file.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None


def _tp_size() -> int:
    from glmctl.model import parallel as tp
    return tp.tp_size()


def _teardown() -> None:
    """Leave the process group cleanly (a rank that exits without this may abort)."""
    import gc
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and dist.is_initialized():
        from glmctl.model import parallel as tp
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        tp.reset_tensor_parallel()


def config_dict(c: GenerateConfig) -> dict:
    return dataclasses.asdict(c)
