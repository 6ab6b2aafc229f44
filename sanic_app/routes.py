"""The route handlers. What they share lives in `request.app.ctx` (set up by dsocr.sanic_app.app):
models (id -> ServedModel, what the server serves), model_id (the started model's), inference (the
request defaults), server (its settings), policy (image fetching), admission_decoder (its executor),
worker (the engine worker) and metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from urllib.parse import unquote

from sanic import Sanic, response

from dsocr.runtime.errors import InputError, ModelError
from dsocr.sanic_app.errors import APIError, error_body
from dsocr.sanic_app.images import load_request_pages
from dsocr.sanic_app.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dsocr.sanic_app.openapi import openapi_document
from dsocr.sanic_app.protocol import (ParsedRequest, StopFilter, chat_chunk, chat_completion, new_id, parse_chat,
                                      parse_responses, response_object, usage_chat, usage_responses)
from dsocr.sanic_app.worker import Job, ServedModel, load_failure

log = logging.getLogger("dsocr.server")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data, event: str | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


def add_routes(app: Sanic) -> None:
    def get(handler, uri: str):
        app.add_route(handler, uri, methods=["GET", "HEAD"])     # Sanic drops the body of a HEAD response
    get(health, "/health")
    get(metrics, "/metrics")
    get(openapi, "/openapi.json")
    get(models, "/v1/models")
    get(model, "/v1/models/<mid:path>")
    app.add_route(chat, "/v1/chat/completions", methods=["POST"])
    app.add_route(responses, "/v1/responses", methods=["POST"])


async def health(request):
    w = request.app.ctx.worker
    resident = w.resident if w else None          # the loaded model; None after a failed load
    return response.json({"status": "ok", "model": resident.id if resident else None,
                          "queued": w.waiting if w else 0, "running": w.running if w else 0,
                          "parallel": w.parallel if w else 0, "busy": bool(w and w.busy)})


async def metrics(request):
    return response.raw(request.app.ctx.metrics.exposition(), content_type=METRICS_CONTENT_TYPE)


async def openapi(request):
    return response.json(openapi_document(request.app.ctx.model_id))


def model_object(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "dsocr"}


async def models(request):
    return response.json({"object": "list", "data": [model_object(mid) for mid in request.app.ctx.models]})


def served(request, mid: str) -> ServedModel:
    """The served model named `mid`; else a 404 naming those served."""
    found = request.app.ctx.models.get(mid)
    if found is None:
        raise APIError(404, f"the model {mid!r} does not exist (this server has "
                            f"{', '.join(map(repr, request.app.ctx.models))})", "model", "model_not_found")
    return found


async def model(request, mid: str):
    # clients send a model id's '/' as %2F; Sanic leaves it quoted
    return response.json(model_object(served(request, unquote(mid)).id))


def body_of(request) -> tuple[dict, ServedModel]:
    """The request's JSON object and the model it names."""
    try:
        body = json.loads(request.body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise APIError(400, "'model' is required", "model")
    return body, served(request, body["model"])


async def make_job(request, parsed: ParsedRequest, model: ServedModel, rid: str) -> Job:
    ctx = request.app.ctx
    worker = ctx.worker
    if not worker.reserve():       # before any fetch or decode: a full queue costs nothing
        raise APIError(503, "the server is busy: the request queue is full, retry shortly", None,
                       "queue_full", {"Retry-After": "5"})
    try:
        pages = await load_request_pages(parsed.image_refs, ctx.policy, ctx.admission_decoder)
        # the requested model's tokenizer and context: the resident engine's, or read from its files
        engine = worker.engine_of(model)
        try:
            check = engine.context if engine is not None else await asyncio.to_thread(lambda: model.context)
        except ModelError as e:    # its files do not read: refused here, the resident model stays
            raise load_failure(model, e) from None
        try:
            for page in pages:
                await asyncio.to_thread(check, parsed.prompt, [im.size for im in page], parsed.view)
        except InputError as e:
            raise APIError(400, str(e), parsed.messages_param, "context_length_exceeded") from None
        job = Job(pages, parsed.prompt, parsed.view, parsed.sampling, model, asyncio.get_running_loop(), rid)
    except BaseException:          # a bad image, a cancelled request: the place goes back
        worker.release()
        raise
    worker.submit(job)
    return job


def finish_reason(result, stop: StopFilter | None) -> str:
    if stop is not None and stop.hit:
        return "stop"
    return "stop" if result.finish_reason == "stop" else "length"


def log_job(request, job: Job, route: str, status: str, completion: int):
    """A job's one log line (the request's: app.py logs no other for a request with a job) and its metrics."""
    t = time.perf_counter()
    wait = (job.started or t) - job.enqueued
    ttft = (job.first_token - job.enqueued) if job.first_token else float("nan")
    log.info("req=%s route=%s status=%s prompt_tokens=%d completion_tokens=%d queue_wait=%.3fs ttft=%.3fs "
             "max_token_gap=%.3fs total=%.3fs", job.rid, route, status, job.result.prompt_tokens, completion, wait,
             ttft, job.result.timings.get("max_token_gap_s", float("nan")), t - job.enqueued)
    request.app.ctx.metrics.job_done(job, completion)
    request.app.ctx.metrics.request_done(request, status, t - request.ctx.t0)


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


def end_job(request, job: Job, route: str, status: str) -> None:
    """The job stops (its sequences end at the scheduler's next step), and its one log line and metrics."""
    job.cancelled.set()
    log_job(request, job, route, status, len(job.result.token_ids))


async def collect(request, job: Job, stop: StopFilter | None, route: str):
    """The whole text and the result of a non-streamed job; engine errors become API errors."""
    text, result, status = "", None, "cancelled"       # unless the loop below ends
    try:
        async for kind, value in events(job, stop):
            if kind == "delta":
                text += value
            else:
                result = value
        status = "ok"
    except Exception as e:
        status = "error"
        raise engine_error(e) from None
    finally:
        end_job(request, job, route, status)
    return text, result


async def stream_job(request, job: Job, route: str, write, write_error) -> None:
    """A streamed job's SSE answer: `write(resp)` sends its events. The head is out by then, so an engine
    error becomes a last event, `write_error(resp, api_error)`; a client that goes away cancels it."""
    resp = await request.respond(content_type="text/event-stream", headers=SSE_HEADERS)
    status = "cancelled"                                # unless the writing below ends
    try:
        try:
            await write(resp)
            status = "ok"
        except Exception as e:
            status = "error"
            await write_error(resp, engine_error(e))
        await resp.eof()
    finally:
        end_job(request, job, route, status)


async def chat(request):
    body, model = body_of(request)
    model_id = model.id
    parsed = parse_chat(body, request.app.ctx.inference, model.layout)
    rid = new_id("chatcmpl")
    job = request.ctx.job = await make_job(request, parsed, model, rid)
    stop = StopFilter(parsed.stop) if parsed.stop else None
    if not parsed.stream:
        text, result = await collect(request, job, stop, "chat")
        return response.json(chat_completion(rid, model_id, text, finish_reason(result, stop),
                                             usage_chat(result.prompt_tokens, len(result.token_ids))))
    created = int(time.time())

    async def write(resp):
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

    async def write_error(resp, err: APIError):
        await resp.send(sse(error_body(err.status, err.message, err.param, err.code)))

    await stream_job(request, job, "chat.stream", write, write_error)


async def responses(request):
    body, model = body_of(request)
    model_id = model.id
    parsed = parse_responses(body, request.app.ctx.inference, model.layout)
    rid, msg_id = new_id("resp"), new_id("msg")
    job = request.ctx.job = await make_job(request, parsed, model, rid)
    created = int(time.time())

    def final(text: str, result) -> dict:
        st = "completed" if result.finish_reason == "stop" else "incomplete"
        return response_object(rid, msg_id, model_id, text, st,
                               usage_responses(result.prompt_tokens, len(result.token_ids)), parsed, created)

    if not parsed.stream:
        text, result = await collect(request, job, None, "responses")
        return response.json(final(text, result))
    seq = iter(range(1 << 30))

    async def send(resp, event: str, data: dict):
        await resp.send(sse({"type": event, "sequence_number": next(seq), **data}, event))

    async def write(resp):
        base = response_object(rid, msg_id, model_id, "", "in_progress", None, parsed, created)
        await send(resp, "response.created", {"response": base})
        await send(resp, "response.in_progress", {"response": base})
        item = {"type": "message", "id": msg_id, "status": "in_progress", "role": "assistant", "content": []}
        await send(resp, "response.output_item.added", {"output_index": 0, "item": item})
        part = {"type": "output_text", "text": "", "annotations": []}
        await send(resp, "response.content_part.added", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                         "part": part})
        text, result = "", None
        async for kind, value in events(job, None):
            if kind == "delta":
                text += value
                await send(resp, "response.output_text.delta", {"item_id": msg_id, "output_index": 0,
                                                                "content_index": 0, "delta": value, "logprobs": []})
            else:
                result = value
        await send(resp, "response.output_text.done", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                       "text": text, "logprobs": []})
        done_part = {"type": "output_text", "text": text, "annotations": []}
        await send(resp, "response.content_part.done", {"item_id": msg_id, "output_index": 0, "content_index": 0,
                                                        "part": done_part})
        await send(resp, "response.output_item.done", {"output_index": 0, "item": {**item, "status": "completed",
                                                                                   "content": [done_part]}})
        full = final(text, result)
        await send(resp, "response.completed" if full["status"] == "completed" else "response.incomplete",
                   {"response": full})

    async def write_error(resp, err: APIError):
        await send(resp, "error", {"code": err.code, "message": err.message, "param": err.param})

    await stream_job(request, job, "responses.stream", write, write_error)
