"""The HTTP side of ``glmctl serve``: a Starlette ASGI app (run by uvicorn).

    POST /v1/completions       OpenAI-compatible completions (stream: server-sent events)
    POST /v1/fill              GLM blank infilling: every blank's text, tokens and offsets
    POST /v1/chat/completions  404: glmctl models are not chat-tuned (docs/serve.md)
    GET  /v1/models            the served model
    GET  /health               200 once the model is loaded and the engine runs, else 503
    GET  /metrics              Prometheus text format (glmctl.serving.metrics)
    GET  /                     the blank-filling page (static/index.html, no CDN, no build step)

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad JSON, bad
fields, a prompt too long or max_tokens over the limit; 401 a missing or wrong API key (when one
is set; /v1/* only); 404 an unknown model or path; 429 a full queue (with Retry-After); 503 not
ready; 504 the request timed out (inside a stream: an error event, then the stream ends).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from glmctl.blanks import MASK_SPELLINGS, Filler
from glmctl.errors import GlmctlError
from glmctl.generation import GenerationConfig, derive_seed
from glmctl.serving.engine import Engine, Finished, Job, QueueFull
from glmctl.serving.metrics import Metrics

DISCONNECT_POLL_S = 0.5


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- request bodies -------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # OpenAI's sampling fields
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    # GLM extensions (docs/serve.md)
    strategy: Literal["greedy", "sample", "beam"] | None = None
    top_k: int | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    min_tokens: int | None = None


class CompletionBody(_Body):
    model: str
    prompt: str | list[str]
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    logprobs: int | None = None
    stream_options: dict | None = None
    # accepted at their neutral values only
    echo: bool = False
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    suffix: str | None = None
    user: str | None = None


class FillBody(_Body):
    model: str | None = None
    prompt: str | list[str]


def _parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({getattr(e, 'msg', e)})", code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "body"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise APIError(400, f"{where}: {msg}", code="invalid_value", param=where) from None


# ---- the server's state ------------------------------------------------------------------------
@dataclass
class ServeState:
    model_name: str
    api_key: str | None = None
    max_new_tokens_limit: int = 512
    request_timeout: float | None = 600.0
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None  # set once the model is loaded
    info: dict = field(default_factory=dict)  # precision, tensor_parallel_size, max_sequence_length
    status: str = "loading"  # loading | ok | stopping | failed
    created: int = field(default_factory=lambda: int(time.time()))

    def ready_engine(self) -> Engine:
        e = self.engine
        if self.status != "ok" or e is None or not e.alive:
            raise APIError(503, f"the server is not ready ({'failed' if e is not None and not e.alive else self.status})",
                           "server_error", "not_ready", headers={"Retry-After": "1"})
        return e


def _generation(b: _Body, limit: int) -> GenerationConfig:
    """The body's decoding settings. Default: greedy (as glmctl generate); a temperature > 0 or a
    top_p < 1 without a strategy means sampling; temperature 0 means greedy."""
    strategy = b.strategy
    if strategy is None:
        sampling = (b.temperature is not None and b.temperature > 0) or (b.top_p is not None and b.top_p < 1)
        strategy = "sample" if sampling else "greedy"
    if b.max_tokens is not None and b.max_tokens > limit:
        raise APIError(400, f"max_tokens {b.max_tokens} is over this server's limit {limit} (--max-new-tokens-limit)",
                       code="max_tokens_over_limit", param="max_tokens")
    d = GenerationConfig()
    temperature = b.temperature if b.temperature is not None and b.temperature > 0 else d.temperature
    gen = GenerationConfig(
        strategy=strategy, max_new_tokens=b.max_tokens if b.max_tokens is not None else min(d.max_new_tokens, limit),
        temperature=temperature, top_p=0.0 if b.top_p is None or b.top_p >= 1 else b.top_p,
        top_k=b.top_k if b.top_k is not None else d.top_k,
        num_beams=b.num_beams if b.num_beams is not None else d.num_beams,
        length_penalty=b.length_penalty if b.length_penalty is not None else d.length_penalty,
        no_repeat_ngram_size=b.no_repeat_ngram_size if b.no_repeat_ngram_size is not None else d.no_repeat_ngram_size,
        min_new_tokens=b.min_tokens if b.min_tokens is not None else d.min_new_tokens, seed=b.seed)
    try:
        return gen.validate()
    except GlmctlError as e:
        raise APIError(400, str(e).replace("-", "_"), code="invalid_value") from None


def _unsupported(b: CompletionBody) -> None:
    checks = [(b.echo, "echo"), (b.best_of not in (None, b.n), "best_of"), (b.presence_penalty != 0, "presence_penalty"),
              (b.frequency_penalty != 0, "frequency_penalty"), (bool(b.logit_bias), "logit_bias"),
              (b.suffix is not None, "suffix"), (bool(b.logprobs), "logprobs")]
    for bad, name in checks:
        if bad:
            raise APIError(400, f"{name} is not supported by glmctl serve (docs/serve.md)", code="unsupported",
                           param=name)
    if b.n < 1 or b.n > 16:
        raise APIError(400, "n must be between 1 and 16", code="invalid_value", param="n")


class _Run:
    """The jobs of one HTTP request and the events the engine sends back for them."""

    def __init__(self, state: ServeState, engine: Engine, jobs: list[Job], prompt_tokens: int, stream: bool):
        self.state, self.engine, self.jobs = state, engine, jobs
        self.prompt_tokens = prompt_tokens
        self.index = {j.id: i for i, j in enumerate(jobs)}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished = set(self.index)
        self.deadline = None if state.request_timeout is None else time.monotonic() + state.request_timeout
        loop = asyncio.get_running_loop()
        held: dict[int, list[str]] = {}  # not streamed: text deltas kept on the engine's side until the end

        def post(job_id, event):
            # the engine hands a step's events over back to back, holding the GIL: the loop wakes
            # once for all of them (glmctl.serving.engine)
            loop.call_soon_threadsafe(self.queue.put_nowait, (self.index[job_id], job_id, event))

        def sink(job_id, event):  # the engine thread
            if not stream and event[0] == "delta":  # waking the event loop for every token costs ~1 ms
                held.setdefault(job_id, []).append(event[1])
                return
            if held.get(job_id):
                post(job_id, ("delta", "".join(held.pop(job_id))))
            post(job_id, event)
        try:
            engine.submit(jobs, sink)
        except QueueFull as e:
            raise APIError(429, f"{e}; retry later", "rate_limit_error", "queue_full",
                           headers={"Retry-After": "1"}) from None

    async def events(self, request: Request | None = None):
        """(choice index, event) until every job is done; APIError 504 at the deadline. With
        ``request`` (not streamed), polls it for a disconnect every DISCONNECT_POLL_S; a stream
        learns of one from the ASGI server. The deadline is one timer, not a timeout per event
        (a stream gets an event per token)."""
        timer = None
        if self.deadline is not None:
            timer = asyncio.get_running_loop().call_later(max(0.0, self.deadline - time.monotonic()),
                                                          self.queue.put_nowait, (None, None, ("timeout",)))
        try:
            while self.unfinished:
                if request is None:
                    i, jid, event = await self.queue.get()
                else:
                    try:
                        i, jid, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                if event[0] == "timeout":
                    raise APIError(504, f"the request took longer than {self.state.request_timeout:g} s "
                                        f"(--request-timeout)", "timeout_error", "request_timeout")
                if event[0] in ("done", "error"):
                    self.unfinished.discard(jid)
                if event[0] == "error":
                    raise APIError(500, event[1], "server_error", "engine_error")
                yield i, event
        finally:
            if timer is not None:
                timer.cancel()
            if self.unfinished:
                self.engine.cancel(list(self.unfinished))


def _jobs(state: ServeState, engine: Engine, b: _Body, prompts: list[str], n: int, gen: GenerationConfig,
          stop: tuple[str, ...], record: bool) -> tuple[list[Job], list[int]]:
    filler = Filler(engine.session, gen)
    jobs, lens = [], []
    for i, text in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        try:
            tokens = filler.encode(text, where)
        except GlmctlError as e:
            raise APIError(400, str(e), code="invalid_prompt", param="prompt") from None
        lens.append(len(tokens))
        explicit_mask = any(m in text for m in MASK_SPELLINGS)
        for j in range(n):
            if b.seed is not None:
                seed = derive_seed(b.seed, i * n + j)  # as glmctl generate --seed for prompt i (n = 1)
            else:
                seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
            jobs.append(Job(engine.new_id(), tokens, gen, seed, stop, continuation=not explicit_mask,
                            record=record))
    return jobs, lens


def _check_model(state: ServeState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       code="model_not_found", param="model")


# ---- endpoints -----------------------------------------------------------------------------------
async def completions(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    b = _parse(CompletionBody, await request.body())
    _check_model(state, b.model)
    _unsupported(b)
    engine = state.ready_engine()
    prompts = [b.prompt] if isinstance(b.prompt, str) else list(b.prompt)
    if not prompts:
        raise APIError(400, "prompt: an empty list", code="invalid_value", param="prompt")
    gen = _generation(b, state.max_new_tokens_limit)
    if gen.strategy == "beam" and b.n > 1:
        raise APIError(400, "n > 1 needs sampling (beam search returns one best text per prompt)",
                       code="invalid_value", param="n")
    stop = (b.stop,) if isinstance(b.stop, str) else tuple(b.stop or ())
    if len(stop) > 4:
        raise APIError(400, "stop: at most 4 sequences", code="invalid_value", param="stop")
    jobs, lens = _jobs(state, engine, b, prompts, b.n, gen, stop, record=True)
    run = _Run(state, engine, jobs, sum(lens), stream=b.stream)
    state.metrics.tokens(sum(lens), 0)
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": state.model_name}

    def choice(i, text, fin: Finished | None):
        c = {"index": i, "text": text, "logprobs": None, "finish_reason": fin.finish_reason if fin else None}
        if fin is not None and fin.record is not None and not jobs[i].continuation:
            c["blanks"] = fin.record["blanks"]  # GLM extension: the filled spans' offsets in "text"
        return c

    def usage(completion):
        return {"prompt_tokens": sum(lens), "completion_tokens": completion, "total_tokens": sum(lens) + completion}

    if b.stream:
        include_usage = bool((b.stream_options or {}).get("include_usage"))

        async def sse():
            completion = 0
            try:
                async for i, ev in run.events():
                    if ev[0] == "delta":
                        chunk = {**head, "choices": [choice(i, ev[1], None)]}
                    else:
                        completion += ev[1].completion_tokens
                        chunk = {**head, "choices": [choice(i, "", ev[1])]}
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
                return
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(completion)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    texts = [""] * len(jobs)
    fins: list[Finished | None] = [None] * len(jobs)
    async for i, ev in run.events(request):
        if ev[0] == "delta":
            texts[i] += ev[1]
        else:
            fins[i] = ev[1]
    if any(f is None for f in fins):  # the client went away
        return Response(status_code=499)
    return JSONResponse({**head, "choices": [choice(i, texts[i], fins[i]) for i in range(len(jobs))],
                         "usage": usage(sum(f.completion_tokens for f in fins))})


async def fill(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    b = _parse(FillBody, await request.body())
    _check_model(state, b.model)
    engine = state.ready_engine()
    prompts = [b.prompt] if isinstance(b.prompt, str) else list(b.prompt)
    if not prompts:
        raise APIError(400, "prompt: an empty list", code="invalid_value", param="prompt")
    gen = _generation(b, state.max_new_tokens_limit)
    jobs, lens = _jobs(state, engine, b, prompts, 1, gen, (), record=True)
    run = _Run(state, engine, jobs, sum(lens), stream=False)
    state.metrics.tokens(sum(lens), 0)
    fins: list[Finished | None] = [None] * len(jobs)
    async for i, ev in run.events(request):
        if ev[0] == "done":
            fins[i] = ev[1]
    if any(f is None for f in fins):
        return Response(status_code=499)
    results = [{"index": i, "prompt": p, **f.record} for i, (p, f) in enumerate(zip(prompts, fins))]
    completion = sum(f.completion_tokens for f in fins)
    return JSONResponse({"object": "fill", "model": state.model_name, "strategy": gen.strategy, "results": results,
                         "usage": {"prompt_tokens": sum(lens), "completion_tokens": completion,
                                   "total_tokens": sum(lens) + completion}})


async def chat(request: Request) -> Response:
    raise APIError(404, "/v1/chat/completions is not served: glmctl models are pre-trained for blank filling, not "
                        "chat-tuned, and no prompt template would make a chat honest. Use /v1/completions (the text "
                        "is continued, or its [MASK] blanks filled) or /v1/fill (docs/serve.md).",
                   code="unsupported_endpoint")


async def models(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    return JSONResponse({"object": "list", "data": [{"id": state.model_name, "object": "model",
                                                     "created": state.created, "owned_by": "glmctl", **state.info}]})


async def health(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    ok = state.status == "ok" and state.engine is not None and state.engine.alive
    status = state.status if state.status != "ok" or ok else "failed"
    return JSONResponse({"status": status, "model": state.model_name}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


async def index(request: Request) -> Response:
    return HTMLResponse(resources.files("glmctl.serving").joinpath("static/index.html").read_text(encoding="utf-8"))


ENDPOINTS = {"/v1/completions": completions, "/v1/fill": fill, "/v1/chat/completions": chat}


class _Guard:
    """Outermost ASGI layer: the API key on /v1/*, OpenAI-shaped errors, requests counted by status."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        known = path in ENDPOINTS or path in ("/v1/models", "/health", "/metrics", "/")
        endpoint = path if known else "other"
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if path.startswith("/v1/") and self.state.api_key is not None:
                headers = dict(scope.get("headers") or [])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not given or not hmac.compare_digest(given.encode(), self.state.api_key.encode()):
                    raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                   "authentication_error", "invalid_api_key")
            await self.app(scope, receive, counted_send)
        except APIError as e:
            await e.response()(scope, receive, counted_send)
        finally:
            if path != "/metrics":
                self.state.metrics.request(endpoint, status["code"])


async def _api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: Request, exc) -> Response:
    code = getattr(exc, "status_code", 500)
    msg = {404: f"no such endpoint: {request.method} {request.url.path}",
           405: f"method {request.method} not allowed on {request.url.path}"}.get(code, str(getattr(exc, "detail", exc)))
    return APIError(code, msg, code="not_found" if code == 404 else None).response()


def create_app(state: ServeState):
    routes = [Route(p, fn, methods=["POST"]) for p, fn in ENDPOINTS.items()]
    routes += [Route("/v1/models", models), Route("/health", health), Route("/metrics", metrics), Route("/", index)]
    app = Starlette(routes=routes, exception_handlers={APIError: _api_error, 404: _http_error, 405: _http_error})
    app.state.serve = state
    return _Guard(app, state)
