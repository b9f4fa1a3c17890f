"""``glmctl serve``'s core: the continuous-batching engine (engine.py), the ASGI app (app.py),
Prometheus metrics (metrics.py), uvicorn with a bounded drain (server.py) and the web page
(static/index.html, served from the package)."""
