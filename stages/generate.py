"""Stage `glmctl generate`: fill blanks and continue text with a GLM checkpoint.

Prompts come from arguments, a text file (one per line), a JSON-lines file (``{"id": ...,
"prompt": ...}``), stdin, or an interactive terminal. A prompt with ``[MASK]`` or ``[sMASK]``
has its blanks filled left to right; a prompt without a mask gets ``[gMASK]`` appended and is
continued (docs/glm130b.md §4.3; decoding in ``glmctl.generation``). Prompts are decoded ``batch_size`` at a
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

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from glmctl import console, runtime
from glmctl.artifacts import atomic_open
from glmctl.blanks import Filler, TextStream
from glmctl.errors import InputError, UsageError
from glmctl.generation import GenerationConfig
from glmctl.model import parallel as tp
from glmctl.session import open_model
from glmctl.stage import StageResult

FORMATS = ("auto", "text", "jsonl")
INPUT_FORMATS = ("auto", "text", "jsonl")


@dataclass(frozen=True)
class GenerateConfig:
    model: str
    prompts: tuple[str, ...] = ()
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
    adapter: str | None = None  # a LoRA / P-tuning adapter made on this checkpoint (glmctl finetune)
    compile: bool = False  # torch.compile the decoding step (GLM.compile_decode): pays for long runs only
    interactive: bool | None = None  # None: when no prompts are given and stdin is a terminal
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.format not in FORMATS:
            raise UsageError(f"unknown --format {self.format!r}; choose text or jsonl")
        if self.json and self.output:
            raise UsageError("--json prints one document on stdout; with --output results go to the file as "
                             "JSON lines")
        if self.prompts and self.input:
            raise UsageError("give prompts as arguments or with --input, not both")
        self.generation.validate()


@dataclass
class Prompt:
    index: int  # position in the input (0-based)
    id: object  # the JSON line's id, or the line / argument number
    where: str  # "FILE:LINE" or "argument N", for messages
    text: str | None = None
    error: str | None = None
    tokens: list[int] | None = None


@dataclass
class GenerateResult(StageResult):
    records: list[dict] = field(default_factory=list)
    failed: int = 0
    new_tokens: int = 0
    seconds: float = 0.0


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


def _style_ok(stream) -> bool:
    return (hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"
            and "NO_COLOR" not in os.environ)


UNDERLINE, RESET = "\033[4m", "\033[0m"


# ---- the stage -------------------------------------------------------------------------------
def _error_record(p: Prompt) -> dict:
    return {"id": p.id, "error": p.error}


def collect_prompts(c: GenerateConfig, stdin=None) -> list[Prompt]:
    if c.input:
        return read_input(c.input, c.input_format, stdin)
    if c.prompts:
        return [Prompt(i, i + 1, f"argument {i + 1}", text=t) for i, t in enumerate(c.prompts)]
    return read_input("-", c.input_format, stdin)


def _prepare(f: Filler, p: Prompt) -> None:
    """Encode and check one prompt, setting p.tokens or p.error."""
    if p.error is not None:
        return
    try:
        p.tokens = f.encode(p.text, p.where)
    except InputError as e:
        p.error = str(e)


def _records(f: Filler, prompts: list[Prompt], **callbacks) -> list[dict]:
    recs = f.fill([p.tokens for p in prompts], keys=[p.index for p in prompts], **callbacks)
    return [{"id": p.id, "prompt": p.text, **r} for p, r in zip(prompts, recs)]


def run(c: GenerateConfig, stdin=None, stdout=None) -> GenerateResult:
    """Generate for every prompt; write results; raise InputError (exit 3) at the end when some
    prompts were rejected (the others still ran and were written)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    c.validate()
    rt = runtime.start(device=c.device)
    clean = False
    try:
        interactive = c.interactive
        if interactive is None:
            interactive = rt.broadcast(not c.prompts and not c.input and rt.is_main and stdin.isatty())
        if interactive:
            result = run_interactive(c, rt, stdin, stdout)
        else:
            result = _run(c, rt, stdin, stdout)
        clean = True
        return result
    except InputError:
        clean = True  # every rank saw the same prompts and stops here together
        raise
    finally:
        runtime.stop(rt, clean=clean)


def _open(c: GenerateConfig, rt) -> Filler:
    s = open_model(c.model, dtype=c.dtype, device=rt.device, tokenizer=c.tokenizer, adapter=c.adapter,
                   compile=c.compile)
    return Filler(s, c.generation)


def _run(c: GenerateConfig, rt, stdin, stdout) -> GenerateResult:
    prompts = rt.on_rank0(lambda: collect_prompts(c, stdin))
    t0 = time.monotonic()
    f = _open(c, rt)
    console.log(f"generate: {f.session.describe()}, {len(prompts)} prompt(s), {f.gen.strategy}")
    for p in prompts:
        _prepare(f, p)

    from_file = c.input is not None or not c.prompts
    fmt = c.format if c.format != "auto" else ("jsonl" if from_file else "text")
    if c.json or c.output:
        fmt = None  # nothing on stdout until the end (json) or nothing at all (output file)
    stream = c.stream
    if stream is None:
        stream = fmt == "text" and stdout.isatty()
    if stream and fmt != "text":
        stream = False
    rank0 = rt.is_main
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
            recs = [_stream_one(f, chunk[0], sink, style)]
        else:
            recs = _records(f, chunk)
        for p, rec in zip(chunk, recs):
            records[p.index] = rec
            new_tokens += rec["new_tokens"]
        bar.update(len(chunk), tok_s=round(new_tokens / max(1e-9, time.monotonic() - t0), 1))
        flush_ready()
    bar.close()
    seconds = time.monotonic() - t0
    out = [r for r in records if r is not None]
    if c.json and rank0:
        console.emit_json({"model": str(c.model), "strategy": f.gen.strategy, "precision": f.session.precision,
                           "tensor_parallel_size": tp.tp_size(), "prompts": len(prompts), "failed": failed,
                           "new_tokens": new_tokens, "seconds": round(seconds, 3), "results": out})
    sink.close()
    if c.output and rank0:
        console.log(f"generate: wrote {len(out)} result(s) to {c.output}")
    console.log(f"generate: {len(todo)} prompt(s), {new_tokens} new tokens in {seconds:.1f}s "
                f"({new_tokens / max(seconds, 1e-9):.1f} tokens/s)")
    del f
    if failed:
        raise InputError(f"{failed} of {len(prompts)} prompt(s) failed (errors above); "
                         f"the other results were written")
    summary = {"prompts": len(prompts), "new_tokens": new_tokens, "seconds": round(seconds, 3)}
    return GenerateResult(summary=summary, out=Path(c.output) if c.output else None, records=out, failed=failed,
                          new_tokens=new_tokens, seconds=seconds)


def _styled(rec: dict) -> str:
    text, out, k = rec["text"], [], 0
    for b in rec["blanks"]:
        out += [text[k:b["start"]], UNDERLINE, text[b["start"]:b["end"]], RESET]
        k = b["end"]
    out.append(text[k:])
    return "".join(out)


def _stream_one(f: Filler, p: Prompt, sink: "_Sink", style: bool) -> dict:
    """Generate one prompt, printing its completed text as tokens arrive."""
    ts = TextStream(f.tokenizer.decode, sink.text)
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

    rec = _records(f, [p], on_token=on_token, on_blank_start=on_blank_start)[0]
    close_blank()
    if ts.printed != rec["text"] and rec["text"].startswith(ts.printed):
        sink.text(rec["text"][len(ts.printed):])
    sink.text("\n")
    return rec


def run_interactive(c: GenerateConfig, rt, stdin, stdout) -> GenerateResult:
    """Read prompts from a terminal, one per line, streaming each completion; Ctrl-D ends."""
    f = _open(c, rt)
    rank0 = rt.is_main
    console.log(f"generate: {c.model} ({f.session.precision}, {f.gen.strategy}); type a prompt, [MASK] marks a "
                f"blank, Ctrl-D quits")
    sink = _Sink(stdout if rank0 else None, None)
    style = _style_ok(stdout)
    records, n, new_tokens, failed = [], 0, 0, 0
    t0 = time.monotonic()

    def ask():
        sys.stderr.write("prompt> ")
        sys.stderr.flush()
        line = stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    while True:
        text = rt.broadcast(ask() if rank0 else None)
        if text is None:
            if rank0:
                sys.stderr.write("\n")
            break
        if not text.strip():
            continue
        n += 1
        p = Prompt(n - 1, n, f"prompt {n}", text=text)
        _prepare(f, p)
        if p.error:
            failed += 1
            if rank0:
                print(f"glmctl: error: {p.error}", file=sys.stderr, flush=True)
            continue
        rec = _stream_one(f, p, sink, style)
        records.append(rec)
        new_tokens += rec["new_tokens"]
    del f
    return GenerateResult(summary={"prompts": n, "new_tokens": new_tokens}, records=records, failed=failed,
                          new_tokens=new_tokens, seconds=time.monotonic() - t0)


class _Sink:
    """stdout and/or a JSON-lines file (written under a temporary name, renamed when complete).
    A closed pipe on stdout (``| head``) stops output quietly."""

    def __init__(self, stdout, output: str | None):
        self.stdout = stdout
        self.broken = False
        self._file = None
        self._ctx = None
        if output:
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
