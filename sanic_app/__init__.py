"""The OpenAI-compatible HTTP server: `create_app(engine, settings)`.

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions,
POST /v1/responses, GET /openapi.json (HEAD too on the GET routes). Model logic stays in
dsocr.runtime; this package parses requests, fetches images, queues jobs for the single engine
worker and streams results (SSE) back.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

from sanic import Sanic, response
from sanic.exceptions import SanicException

from dsocr.runtime.engine import OcrEngine, normalize_prompt
from dsocr.runtime.errors import InputError
from dsocr.runtime.preprocess import ViewConfig
from dsocr.sanic_app.errors import APIError, error_body, error_response
from dsocr.sanic_app.images import FetchPolicy, load_request_images
from dsocr.sanic_app.openapi import openapi_document
from dsocr.sanic_app.protocol import (ParsedRequest, StopFilter, chat_chunk, chat_completion, new_id, parse_chat,
                                      parse_responses, response_object, usage_chat, usage_responses)
from dsocr.sanic_app.worker import EngineWorker, Job

log = logging.getLogger("dsocr.server")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def bearer_token(header: str) -> str | None:
    """The credentials of `Authorization: Bearer ...`; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def sse(data, event: str | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


def create_app(engine: OcrEngine, settings: dict, name: str = "dsocr") -> Sanic:
    """settings: {"server": {...}, "inference": {...}} as merged by dsocr.cli.config, which checked their
    types and ranges."""
    srv, inf = settings["server"], settings["inference"]
    app = Sanic(name)
    app.config.REQUEST_MAX_SIZE = int(srv["max_body_mb"]) << 20
    app.config.RESPONSE_TIMEOUT = 24 * 3600
    app.config.REQUEST_TIMEOUT = 120
    app.config.KEEP_ALIVE_TIMEOUT = 30
    model_id = srv["model_id"]
    policy = FetchPolicy(allow_private=bool(srv["allow_private_urls"]), max_pixels=int(inf["max_pixels"]),
                         fetch_timeout=float(srv["fetch_timeout"]),
                         request_fetch_timeout=float(srv["request_fetch_timeout"]))
    admission_decoder = ThreadPoolExecutor(1, "dsocr-admission")   # one image decode at a time at admission
    state = {"worker": None}

    @app.before_server_start
    async def start_worker(app_, _loop):
        state["worker"] = EngineWorker(engine, int(srv["max_queue"]))

    @app.after_server_stop
    async def stop_worker(app_, _loop):
        if state["worker"]:
            state["worker"].stop()
        admission_decoder.shutdown(wait=False, cancel_futures=True)

    @app.on_request
    async def authenticate(request):
        request.ctx.t0 = time.perf_counter()
        key = srv.get("api_key")
        if key and request.path.startswith("/v1/"):
            token = bearer_token(request.headers.get("authorization", ""))
            if token is None or not hmac.compare_digest(token.encode(), key.encode()):
                return error_response(401, "invalid or missing API key (Authorization: Bearer ...)", None,
                                      "invalid_api_key")

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

    @app.exception(Exception)
    async def server_error(request, e: Exception):
        log.exception("internal error on %s", request.path)
        return error_response(500, f"internal error ({type(e).__name__})", None, "internal_error")

    def get(uri: str):
        return app.route(uri, methods=["GET", "HEAD"])     # Sanic drops the body of a HEAD response

    @get("/health")
    async def health(request):
        w = state["worker"]
        return response.json({"status": "ok", "model": model_id, "queued": w.waiting if w else 0,
                              "busy": bool(w and w.busy)})

    @get("/openapi.json")
    async def openapi(request):
        return response.json(openapi_document(model_id))

    @get("/v1/models")
    async def models(request):
        return response.json({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                          "owned_by": "dsocr"}]})

    @get("/v1/models/<mid:path>")
    async def model(request, mid: str):
        mid = unquote(mid)                  # clients send a model id's '/' as %2F; Sanic leaves it quoted
        if mid != model_id:
            raise APIError(404, f"the model {mid!r} does not exist", "model", "model_not_found")
        return response.json({"id": model_id, "object": "model", "created": 0, "owned_by": "dsocr"})

    def body_of(request) -> dict:
        try:
            body = json.loads(request.body or b"")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") != model_id:
            if not isinstance(body.get("model"), str):
                raise APIError(400, "'model' is required", "model")
            raise APIError(404, f"the model {body['model']!r} does not exist (this server has {model_id!r})",
                           "model", "model_not_found")
        return body

    async def make_job(request, parsed: ParsedRequest, rid: str) -> Job:
        try:
            view = ViewConfig.from_mode(parsed.mode)
            view.validate()
            prompt = normalize_prompt(parsed.prompt, len(parsed.image_refs))
        except InputError as e:
            raise APIError(400, str(e), "mode") from None
        worker = state["worker"]
        if not worker.reserve():       # before any fetch or decode: a full queue costs nothing
            raise APIError(503, "the server is busy: the request queue is full, retry shortly", None,
                           "queue_full", {"Retry-After": "5"})
        try:
            images = await load_request_images(parsed.image_refs, policy, admission_decoder)
            try:
                await asyncio.to_thread(engine.check_context, prompt, [im.size for im in images], view)
            except InputError as e:
                raise APIError(400, str(e), parsed.messages_param, "context_length_exceeded") from None
            job = Job(images, prompt, view, parsed.sampling, asyncio.get_running_loop(), rid)
        except BaseException:          # a bad image, a cancelled request: the place goes back
            worker.release()
            raise
        worker.submit(job)
        return job

    def finish_reason(result, stop: StopFilter | None) -> str:
        if stop is not None and stop.hit:
            return "stop"
        return "stop" if result.finish_reason == "stop" else "length"

    def log_job(job: Job, route: str, status: str, completion: int):
        t = time.perf_counter()
        wait = (job.started or t) - job.enqueued
        ttft = (job.first_token - job.enqueued) if job.first_token else float("nan")
        log.info("req=%s route=%s status=%s prompt_tokens=%d completion_tokens=%d queue_wait=%.3fs ttft=%.3fs "
                 "total=%.3fs", job.rid, route, status, job.result.prompt_tokens, completion, wait, ttft,
                 t - job.enqueued)

    async def events(job: Job, stop: StopFilter | None):
        """Yields ("delta", text) until ("done", result); errors raise."""
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                text = stop.push(value) if stop else value
                if stop and stop.hit:
                    job.cancelled.set()
                if text:
                    yield "delta", text
            elif kind == "done":
                tail = stop.flush() if stop else ""
                if tail:
                    yield "delta", tail
                yield "done", value
                return
            else:
                raise value if isinstance(value, Exception) else RuntimeError(str(value))

    def engine_error(e: Exception) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, InputError):
            return APIError(400, str(e))
        log.error("generation failed: %s", e)
        return APIError(500, f"generation failed ({type(e).__name__})", None, "internal_error")

    async def collect(job: Job, stop: StopFilter | None):
        """The whole text and the result of a non-streamed job; engine errors become API errors."""
        text, result = "", None
        try:
            async for kind, value in events(job, stop):
                if kind == "delta":
                    text += value
                else:
                    result = value
        except Exception as e:
            raise engine_error(e) from None
        finally:
            job.cancelled.set()
        return text, result

    @app.post("/v1/chat/completions")
    async def chat(request):
        parsed = parse_chat(body_of(request), inf)
        rid = new_id("chatcmpl")
        job = await make_job(request, parsed, rid)
        stop = StopFilter(parsed.stop) if parsed.stop else None
        if not parsed.stream:
            text, result = await collect(job, stop)
            n = len(result.token_ids)
            log_job(job, "chat", "ok", n)
            return response.json(chat_completion(rid, model_id, text, finish_reason(result, stop),
                                                 usage_chat(result.prompt_tokens, n)))
        created = int(time.time())
        resp = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
        status = "ok"
        try:
            await resp.send(sse(chat_chunk(rid, model_id, created, {"role": "assistant", "content": ""})))
            result = None
            async for kind, value in events(job, stop):
                if kind == "delta":
                    await resp.send(sse(chat_chunk(rid, model_id, created, {"content": value})))
                else:
                    result = value
            await resp.send(sse(chat_chunk(rid, model_id, created, {}, finish_reason(result, stop))))
            if parsed.include_usage:
                await resp.send(sse(chat_chunk(rid, model_id, created, None,
                                               usage=usage_chat(result.prompt_tokens, len(result.token_ids)))))
            await resp.send(sse("[DONE]"))
            await resp.eof()
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as e:
            status = "error"
            err = engine_error(e)
            await resp.send(sse(error_body(err.status, err.message, err.param, err.code)))
            await resp.eof()
        finally:
            job.cancelled.set()
            log_job(job, "chat.stream", status, len(job.result.token_ids))

    @app.post("/v1/responses")
    async def responses(request):
        parsed = parse_responses(body_of(request), inf)
        rid, msg_id = new_id("resp"), new_id("msg")
        job = await make_job(request, parsed, rid)
        created = int(time.time())

        def final(text: str, result) -> dict:
            st = "completed" if result.finish_reason == "stop" else "incomplete"
            return response_object(rid, msg_id, model_id, text, st,
                                   usage_responses(result.prompt_tokens, len(result.token_ids)), parsed, created)

        if not parsed.stream:
            text, result = await collect(job, None)
            log_job(job, "responses", "ok", len(result.token_ids))
            return response.json(final(text, result))
        resp = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
        seq = iter(range(1 << 30))
        status = "ok"

        async def send(event: str, data: dict):
            await resp.send(sse({"type": event, "sequence_number": next(seq), **data}, event))

        try:
            base = response_object(rid, msg_id, model_id, "", "in_progress", None, parsed, created)
            await send("response.created", {"response": base})
            await send("response.in_progress", {"response": base})
            item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
            await send("response.output_item.added", {"output_index": 0, "item": item})
            part = {"type": "output_text", "text": "", "annotations": []}
            await send("response.content_part.added", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                       "part": part})
            text, result = "", None
            async for kind, value in events(job, None):
                if kind == "delta":
                    text += value
                    await send("response.output_text.delta", {"item_id": msg_id, "output_index": 0,
                                                              "content_index": 0, "delta": value, "logprobs": []})
                else:
                    result = value
            await send("response.output_text.done", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                     "text": text, "logprobs": []})
            done_part = {"type": "output_text", "text": text, "annotations": []}
            await send("response.content_part.done", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                      "part": done_part})
            await send("response.output_item.done", {"output_index": 0, "item": {**item, "status": "completed",
                                                                                 "content": [done_part]}})
            full = final(text, result)
            await send("response.completed" if full["status"] == "completed" else "response.incomplete",
                       {"response": full})
            await resp.eof()
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except Exception as e:
            status = "error"
            err = engine_error(e)
            await send("error", {"code": err.code, "message": err.message, "param": err.param})
            await resp.eof()
        finally:
            job.cancelled.set()
            log_job(job, "responses.stream", status, len(job.result.token_ids))

    return app
