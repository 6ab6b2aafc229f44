"""The OpenAI-compatible HTTP server: `create_app(worker, settings)`.

Routes: GET /health, GET /metrics (Prometheus), GET /v1/models, GET /v1/models/{id},
POST /v1/chat/completions, POST /v1/responses, GET /openapi.json (HEAD too on the GET routes).
Model logic stays in dsocr.runtime; this package parses requests, fetches images, queues jobs for the
engine worker and streams results (SSE) back. app.py sets the app up (config, listeners, middleware,
error handlers), routes.py holds the handlers, metrics.py the Prometheus metrics.
"""
from dsocr.sanic_app.app import create_app

__all__ = ["create_app"]
