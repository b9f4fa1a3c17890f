"""Run the ASGI app with uvicorn on rank 0 while the engine loads and decodes beside it.

    serve_http(state, load_engine, host, port, drain_timeout)

The socket is bound first (a taken port is one clear line, exit 2), then uvicorn serves; /health
answers 503 until ``load_engine()`` (on a thread) has opened the model and started the engine.
SIGTERM or Ctrl-C: uvicorn stops accepting connections, lets in-flight requests finish for up
to ``drain_timeout`` seconds (then cancels them), the engine stops, and the call returns (the
command exits 0). A second signal during the drain ends the drain (uvicorn's force exit); after
it, while the engine stops, signals are ignored.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading

import uvicorn

from glmctl import console
from glmctl.errors import GlmctlError, UsageError
from glmctl.serving.app import ServeState, create_app


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_http(state: ServeState, load_engine, host: str, port: int, drain_timeout: float, log_requests=False):
    """Serve until SIGTERM/SIGINT; raises the loader's error if the model could not be opened."""
    sock = bind(host, port)
    app = create_app(state)
    config = uvicorn.Config(app, log_level="info" if log_requests else "warning", access_log=log_requests,
                            timeout_graceful_shutdown=drain_timeout, lifespan="off")
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def load():
        try:
            state.engine = load_engine()
            state.status = "ok"
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            failure.append(e)
            state.status = "failed"
            server.should_exit = True

    loader = threading.Thread(target=load, name="glmctl-serve-load", daemon=True)
    bound_port = sock.getsockname()[1]
    console.log(f"serve: listening on http://{host if ':' not in host else f'[{host}]'}:{bound_port} "
                f"(loading the model; /health answers 200 once it is ready)")
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers in place
    # that ends nothing, and the command returns normally (exit 0). They stay in place until the
    # process exits: a second SIGTERM while the engine stops must not kill it (exit -15).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    logging.getLogger("uvicorn.error").setLevel(logging.INFO if log_requests else logging.WARNING)
    try:
        loader.start()
        server.run(sockets=[sock])
        state.status = "stopping"
        loader.join()
    finally:
        if state.engine is not None:
            state.engine.stop()
        sock.close()
    if failure:
        e = failure[0]
        if isinstance(e, GlmctlError):
            raise e
        raise GlmctlError(f"could not start the engine: {type(e).__name__}: {e}")
    if state.engine is not None and state.engine.failure is not None:
        raise GlmctlError(f"the engine failed: {state.engine.failure}")
    console.log("serve: stopped")
