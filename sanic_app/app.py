"""The Sanic app: its config, what it keeps in `app.ctx`, the listeners that start and stop the engine
worker, the middleware (timing, CORS, the API key, one log line per request) and the error handlers.
The routes are in dsocr.sanic_app.routes."""
from __future__ import annotations

import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from sanic import Sanic, response
from sanic.exceptions import RequestCancelled, SanicException

from dsocr.cli.config import Inference
from dsocr.sanic_app.errors import APIError, error_response
from dsocr.sanic_app.images import FetchPolicy
from dsocr.sanic_app.metrics import CLIENT_GONE, ServerMetrics, outcome
from dsocr.sanic_app.routes import add_routes
from dsocr.sanic_app.worker import EngineWorker

log = logging.getLogger("dsocr.server")
CORS_METHODS = "GET, HEAD, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE = "600"                 # seconds a browser may keep a preflight's answer
CORS_EXPOSED = "Retry-After"         # a browser client may read it from a 503 (the openai SDKs do)


def bearer_token(header: str) -> str | None:
    """The credentials of `Authorization: Bearer ...`; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def cors_origin(allowed: frozenset[str], origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin for a request's Origin; None: no CORS headers."""
    if not origin or not allowed:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin.lower() in allowed else None


def create_app(worker: EngineWorker, settings: dict, name: str = "dsocr") -> Sanic:
    """worker: the engine's worker, ready (EngineWorker.wait_ready), with the models served (the first
    the one it started with); settings: {"server": {...}, "inference": {...}} as merged by
    dsocr.cli.config, which checked their types and ranges."""
    srv, inf = settings["server"], settings["inference"]
    # Sanic's own logging config would print its lines a second time (to stdout) next to the root
    # handler `dsocr serve` sets up; without it they go through that handler once.
    app = Sanic(name, configure_logging=False)
    logging.getLogger("httpx").setLevel(logging.WARNING)    # its INFO line per image fetch: a second line
    app.config.REQUEST_MAX_SIZE = int(srv["max_body_mb"]) << 20
    app.config.RESPONSE_TIMEOUT = 24 * 3600
    app.config.REQUEST_TIMEOUT = 120
    app.config.KEEP_ALIVE_TIMEOUT = 30
    app.config.FALLBACK_ERROR_FORMAT = "json"     # not guessed per request (deprecated in Sanic)
    ctx = app.ctx
    ctx.worker, ctx.server = worker, srv
    ctx.models = {m.id: m for m in worker.models}
    ctx.model_id = worker.models[0].id
    ctx.inference = Inference(**inf)          # the requests' defaults, parsed once
    ctx.policy = FetchPolicy(allow_private=bool(srv["allow_private_urls"]), max_pixels=int(inf["max_pixels"]),
                             fetch_timeout=float(srv["fetch_timeout"]),
                             request_fetch_timeout=float(srv["request_fetch_timeout"]),
                             max_pdf_pages=int(srv["max_pdf_pages"]))
    ctx.admission_decoder = ThreadPoolExecutor(1, "dsocr-admission")   # one image decode at a time at admission
    ctx.metrics = ServerMetrics(ctx)
    api_key = srv.get("api_key")
    cors_allowed = frozenset(o.rstrip("/").lower() for o in srv["cors_origins"])

    @app.after_server_stop
    async def stop_worker(app_):
        app_.ctx.worker.stop()
        app_.ctx.admission_decoder.shutdown(wait=False, cancel_futures=True)

    # request middleware runs in this order; a response returned ends the request there
    @app.on_request
    async def start_clock(request):
        request.ctx.t0 = time.perf_counter()

    @app.on_request
    async def preflight(request):
        """A browser's CORS preflight, answered before the API key is asked for (it never carries one)."""
        if cors_allowed and request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            headers = {}
            if cors_origin(cors_allowed, request.headers.get("origin")):
                # the headers asked for too: the openai SDKs send their own (x-stainless-*)
                asked = request.headers.get("access-control-request-headers", "").strip()
                headers = {"Access-Control-Allow-Methods": CORS_METHODS,
                           "Access-Control-Allow-Headers": ", ".join(filter(None, (CORS_HEADERS, asked))),
                           "Access-Control-Max-Age": CORS_MAX_AGE}
            return response.empty(headers=headers)

    @app.on_request
    async def authenticate(request):
        if api_key and request.path.startswith("/v1/"):
            token = bearer_token(request.headers.get("authorization", ""))
            if token is None or not hmac.compare_digest(token.encode(), api_key.encode()):
                return error_response(401, "invalid or missing API key (Authorization: Bearer ...)", None,
                                      "invalid_api_key")

    @app.on_response
    async def cors_headers(request, resp):
        """On every answer to an allowed origin: errors and SSE streams too (their head passes here)."""
        allow = cors_origin(cors_allowed, request.headers.get("origin"))
        if allow:
            resp.headers["Access-Control-Allow-Origin"] = allow
            resp.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
            if allow != "*":
                resp.headers["Vary"] = "Origin"

    @app.on_response
    async def log_request(request, resp):
        """One line and one count per request; a request that got a job has log_job's line instead
        (written when the job ends, which for a stream is after this head goes out)."""
        if hasattr(request.ctx, "job"):
            return
        seconds = time.perf_counter() - getattr(request.ctx, "t0", time.perf_counter())
        log.info("method=%s path=%s status=%d total=%.3fs", request.method, request.path, resp.status, seconds)
        app.ctx.metrics.request_done(request, outcome(resp.status), seconds)

    @app.exception(APIError)
    async def api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.headers)

    def head_too_large(request):
        """Sanic answers a request head over REQUEST_MAX_HEADER_SIZE with a 413 before parsing it (the
        request it hands over has no headers): a request line that does not end within the limit is a
        URL too long, otherwise the headers are too large."""
        limit = app.config.REQUEST_MAX_HEADER_SIZE
        if b"\r\n" not in bytes(getattr(request.stream, "recv_buffer", b""))[:limit]:
            return error_response(414, f"the URL is too long (the request line is over {limit} bytes)", None,
                                  "uri_too_long")
        return error_response(431, f"the request headers are over {limit} bytes", None, "headers_too_large")

    @app.exception(SanicException)
    async def sanic_error(request, e: SanicException):
        status = getattr(e, "status_code", 500) or 500
        if status == 413 and not request.headers:
            return head_too_large(request)
        messages = {404: (f"no route {request.method} {request.path}", "not_found"),
                    413: (f"request body over {srv['max_body_mb']} MB", "payload_too_large"),
                    405: (f"{request.method} is not allowed on {request.path}", "method_not_allowed")}
        message, code = messages.get(status, (str(e) or "bad request", None))
        return error_response(status, message, None, code, getattr(e, "headers", None))   # 405: Allow

    @app.exception(RequestCancelled)
    async def client_gone(request, e: RequestCancelled):
        """The client went away before any answer: none reaches it, but the request is logged and
        counted as cancelled (a request with a job was, by log_job)."""
        return response.empty(status=CLIENT_GONE)

    @app.exception(Exception)
    async def server_error(request, e: Exception):
        log.exception("internal error on %s", request.path)
        return error_response(500, f"internal error ({type(e).__name__})", None, "internal_error")

    add_routes(app)
    return app
