"""Stage `glmctl serve`: an HTTP server for a GLM checkpoint (docs/serve.md).

OpenAI-compatible completions (streamed as server-sent events), GLM blank infilling (/v1/fill),
/v1/models, /health, /metrics and a blank-filling web page, with continuous batching: requests
join the running batch at the next decoding step and leave it as soon as they finish
(glmctl.serving.engine on glmctl.generation). Greedy output equals `glmctl generate`'s.

Under torchrun the model is tensor parallel: rank 0 serves HTTP and runs the engine; the other
ranks follow its decoding steps (rank 0 broadcasts each step's admissions and cancellations).
SIGTERM drains in-flight requests (bounded by ``drain_timeout``) and the command exits 0; under
torchrun the signal goes to rank 0's process (torchrun itself, signalled, ends every rank at once).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from glmctl import console, runtime
from glmctl.errors import InputError, UsageError
from glmctl.model import parallel as tp
from glmctl.serving.app import ServeState
from glmctl.serving.engine import Engine
from glmctl.serving.server import serve_http
from glmctl.session import open_model
from glmctl.stage import StageResult

API_KEY_ENV = "GLMCTL_SERVE_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    model: str
    host: str = "127.0.0.1"  # loopback only; docs/serve.md says what exposing the server means
    port: int = 8000
    model_name: str | None = None  # the name clients send as "model" (default: the directory's name)
    dtype: str | None = None  # fp32 | bf16 | fp16 (default: as stored)
    device: str | None = None  # cpu | cuda (default: cuda when available)
    tokenizer: str | None = None  # default: the checkpoint's copy
    adapter: str | None = None  # a LoRA / P-tuning adapter from `glmctl finetune`, made on ``model``
    compile: bool = False  # torch.compile the decoding step (GLM.compile_decode)
    max_batch_size: int = 8  # requests decoded together (a beam-search request counts once)
    max_queue: int = 64  # requests waiting for a slot; more get 429
    max_new_tokens_limit: int = 512  # the largest max_tokens a request may ask for
    request_timeout: float | None = 600.0  # seconds from arrival to the last token (None: no limit)
    drain_timeout: float = 30.0  # SIGTERM: how long in-flight requests may still run
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    api_key_file: str | None = None
    log_requests: bool = False  # uvicorn's access log on stderr

    def validate(self) -> None:
        checks = [(1 <= self.port <= 65535 or self.port == 0, "--port must be between 1 and 65535"),
                  (self.max_batch_size >= 1, "--max-batch-size must be at least 1"),
                  (self.max_queue >= 1, "--max-queue must be at least 1"),
                  (self.max_new_tokens_limit >= 1, "--max-new-tokens-limit must be at least 1"),
                  (self.request_timeout is None or self.request_timeout > 0, "--request-timeout must be positive"),
                  (self.drain_timeout >= 0, "--drain-timeout must be 0 or positive"),
                  (not (self.api_key and self.api_key_file), "give --api-key or --api-key-file, not both")]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


def resolve_api_key(c: ServeConfig) -> str | None:
    """--api-key, else --api-key-file's first line, else $GLMCTL_SERVE_API_KEY, else none."""
    if c.api_key:
        return c.api_key
    if c.api_key_file:
        p = Path(c.api_key_file)
        try:
            key = p.read_text(encoding="utf-8").strip().splitlines()
        except OSError as e:
            raise InputError(f"{p}: cannot read the API key file ({e.strerror})") from None
        if not key or not key[0].strip():
            raise InputError(f"{p}: the API key file is empty")
        return key[0].strip()
    return os.environ.get(API_KEY_ENV) or None


def run(c: ServeConfig) -> StageResult:
    c.validate()
    api_key = resolve_api_key(c)
    rt = runtime.start(device=c.device)
    clean = False
    try:
        def load() -> Engine:
            s = open_model(c.model, dtype=c.dtype, device=rt.device, tokenizer=c.tokenizer, adapter=c.adapter,
                           compile=c.compile)
            state.info = {"max_sequence_length": s.config.max_sequence_length, "precision": s.precision,
                          "tensor_parallel_size": tp.tp_size()}
            engine = Engine(s, rt, c.max_batch_size, c.max_queue, metrics=state.metrics if rt.is_main else None)
            console.log(f"serve: {s.describe()} ready as model {state.model_name!r}, "
                        f"batches of up to {c.max_batch_size}")
            if rt.is_main:
                engine.start()
            return engine

        state = ServeState(model_name=c.model_name or Path(c.model).resolve().name, api_key=api_key,
                           max_new_tokens_limit=c.max_new_tokens_limit, request_timeout=c.request_timeout)
        if rt.is_main:
            serve_http(state, load, c.host, c.port, c.drain_timeout, c.log_requests)
        else:
            # the other ranks stop when rank 0 says so, after its drain: a Ctrl-C or a SIGTERM
            # sent to the whole process group must not end them first
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                load().follow()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        clean = True
        return StageResult(summary={"model": str(c.model), "host": c.host, "port": c.port})
    finally:
        runtime.stop(rt, clean=clean)
