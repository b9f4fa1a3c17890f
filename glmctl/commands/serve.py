"""`glmctl serve`: an OpenAI-compatible HTTP server with GLM blank infilling and a web page."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from glmctl.cli import EXIT_CODES_HELP
from glmctl.stages.serve import API_KEY_ENV, ServeConfig as C, run

EPILOG = (
    "Examples:\n\n"
    "  glmctl serve demo/model\n\n"
    "  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' "
    "-d '{\"model\": \"model\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}'\n\n"
    "  torchrun --nproc_per_node 2 -m glmctl serve model --port 8000   (tensor parallel; rank 0 serves)\n\n"
    "Endpoints: POST /v1/completions (OpenAI), POST /v1/fill (every blank with its offsets), GET /v1/models, "
    "/health, /metrics (Prometheus) and / (a blank-filling page). The server listens on 127.0.0.1 only "
    "unless --host says otherwise; before exposing it, set an API key and read docs/serve.md. SIGTERM "
    "stops accepting requests, lets running ones finish (--drain-timeout) and exits 0.\n\n" + EXIT_CODES_HELP
)


def register(app: typer.Typer) -> None:
    app.command("serve", epilog=EPILOG)(serve_cmd)


def serve_cmd(
    model: Path = typer.Argument(..., help="Checkpoint directory (any precision: fp32/bf16/fp16, INT8/INT4)."),
    host: str = typer.Option(C.host, "--host", help="Address to listen on (0.0.0.0: every interface; see docs)."),
    port: int = typer.Option(C.port, "--port", help="TCP port (0: any free one, printed at start)."),
    model_name: Optional[str] = typer.Option(None, "--model-name",
                                             help="The model name clients send (default: the directory's name)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: as stored)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer",
                                             help="Tokenizer directory (default: the checkpoint's copy)."),
    adapter: Optional[Path] = typer.Option(None, "--adapter",
                                           help="LoRA / P-tuning adapter from `glmctl finetune` (made on MODEL)."),
    max_batch_size: int = typer.Option(C.max_batch_size, "--max-batch-size",
                                       help="Requests decoded together; the others wait in the queue."),
    max_queue: int = typer.Option(C.max_queue, "--max-queue",
                                  help="Requests that may wait for a batch slot; more are answered 429."),
    max_new_tokens_limit: int = typer.Option(C.max_new_tokens_limit, "--max-new-tokens-limit",
                                             help="The largest max_tokens a request may ask for (per blank)."),
    request_timeout: float = typer.Option(C.request_timeout, "--request-timeout",
                                          help="Seconds a request may take from arrival to its last token (504)."),
    drain_timeout: float = typer.Option(C.drain_timeout, "--drain-timeout",
                                        help="On SIGTERM, seconds that running requests may still take."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=API_KEY_ENV,
                                          help=f"Require 'Authorization: Bearer KEY' on /v1/* (or ${API_KEY_ENV})."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file",
                                                help="Read the API key from this file's first line."),
    log_requests: bool = typer.Option(C.log_requests, "--log-requests", help="Log every request on stderr."),
    compile: bool = typer.Option(C.compile, "--compile/--no-compile",
                                 help="torch.compile the decoding step (slower start, faster steps; docs/serve.md)."),
):
    """Serve a model over HTTP: OpenAI-compatible completions, blank infilling, a web page."""
    cfg = C(model=str(model), host=host, port=port, model_name=model_name, dtype=dtype, device=device,
            tokenizer=None if tokenizer is None else str(tokenizer),
            adapter=None if adapter is None else str(adapter), max_batch_size=max_batch_size,
            max_queue=max_queue, max_new_tokens_limit=max_new_tokens_limit, request_timeout=request_timeout,
            drain_timeout=drain_timeout, api_key=api_key,
            api_key_file=None if api_key_file is None else str(api_key_file), log_requests=log_requests,
            compile=compile)
    run(cfg)
