"""The server's plumbing (issue 13) against a real `dsocr serve` on 127.0.0.1 with the tiny model: CORS,
/metrics, one log line per request, a quiet start, a first request that compiles nothing, and the JSON
it returns checked against the openai package's own pydantic types. The servers come from
test_server.py's helpers."""
import json
import time
import uuid
from typing import get_args

import httpx
import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, TypeAdapter, ValidationError

from test_server import KEY, MODEL, PROMPT_TEXT, chat_body, data_url, post, server, start_server  # noqa: F401

ORIGIN = "https://app.example"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app_server(converted, tmp_path_factory):
    """A server with an API key and two allowed CORS origins (ORIGIN one), and its log (stdout and
    stderr). NUMBA_DEBUG_CACHE makes numba print a line for every kernel it loads or compiles, so a
    kernel first needed by a request, not by the warm-up, shows in the log after "serving"."""
    lm, mm = converted("f32", "f32")
    tmp = tmp_path_factory.mktemp("server-app")
    # as people write them: the host's case and a trailing slash do not matter
    (tmp / "config.toml").write_text('[server]\ncors_origins = ["https://App.example/", "http://localhost:3000"]\n')
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NUMBA_DEBUG_CACHE", "1")
        env.setenv("PYTHONUNBUFFERED", "1")          # numba prints to stdout: in order with stderr
        proc, base = start_server(lm, mm, tmp, "--api-key", KEY)
    yield base, tmp / f"server-{base.rsplit(':', 1)[1]}.log"
    proc.terminate()
    proc.wait(timeout=30)


def responses_body(**kw):
    inp = [{"role": "user", "content": [{"type": "input_image", "image_url": data_url()},
                                        {"type": "input_text", "text": PROMPT_TEXT}]}]
    return {"model": MODEL, "input": inp, "max_output_tokens": 3, **kw}


def sse_events(base, path, body, headers=None):
    """(event name or None, data string) of each SSE event of a streamed request, and its response."""
    with httpx.stream("POST", base + path, json=body, headers={**AUTH, **(headers or {})}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        events, name = [], None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, line[len("data: "):]))
                name = None
    return events, r


# ---------------------------------------------------------------- CORS

def cors_headers(r) -> dict:
    return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def preflight(base, origin, path="/v1/chat/completions"):
    return httpx.options(base + path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                               "Access-Control-Request-Headers": "authorization, content-type, "
                                                                                 "x-stainless-os"})


def test_preflight_from_an_allowed_origin_needs_no_api_key(app_server):
    base, _ = app_server
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/models"):
        r = preflight(base, ORIGIN, path)           # no Authorization: browsers never send it on a preflight
        assert r.status_code == 204, (path, r.status_code, r.text)
        h = cors_headers(r)
        assert h["access-control-allow-origin"] == ORIGIN and r.headers["vary"] == "Origin", h
        assert {"POST", "GET", "OPTIONS"} <= {m.strip() for m in h["access-control-allow-methods"].split(",")}, h
        assert {"authorization", "content-type", "x-stainless-os"} <= {   # what the openai SDK for JS sends
            x.strip().lower() for x in h["access-control-allow-headers"].split(",")}, h
        assert int(h["access-control-max-age"]) > 0


def test_preflight_from_another_origin_gets_no_cors_headers(app_server):
    base, _ = app_server
    for origin in ("https://evil.example", "https://app.example.evil", "http://app.example"):
        r = preflight(base, origin)
        assert r.status_code == 204 and cors_headers(r) == {}, (origin, r.headers)


def test_cors_headers_on_answers_and_errors_for_the_allowed_origin_only(app_server):
    base, _ = app_server
    cases = [("GET", "/v1/models", AUTH, 200), ("GET", "/v1/models", {}, 401), ("GET", "/v1/nothing", AUTH, 404),
             ("GET", "/health", {}, 200), ("POST", "/v1/chat/completions", AUTH, 400)]
    for method, path, headers, status in cases:
        allowed = httpx.request(method, base + path, headers={**headers, "Origin": ORIGIN}, content=b"{")
        assert allowed.status_code == status, (path, allowed.text)
        assert cors_headers(allowed) == {"access-control-allow-origin": ORIGIN,
                                         "access-control-expose-headers": "Retry-After"}, (path, allowed.headers)
        other = httpx.request(method, base + path, headers={**headers, "Origin": "https://evil.example"},
                              content=b"{")
        no_origin = httpx.request(method, base + path, headers=headers, content=b"{")
        assert other.status_code == no_origin.status_code == status
        assert cors_headers(other) == cors_headers(no_origin) == {}, (path, other.headers)


def test_cors_headers_on_a_streamed_response(app_server):
    base, _ = app_server
    events, r = sse_events(base, "/v1/chat/completions", chat_body(stream=True), {"Origin": ORIGIN})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["access-control-allow-origin"] == ORIGIN and r.headers["vary"] == "Origin"
    assert events[-1][1] == "[DONE]" and len(events) >= 3


def test_allowed_origin_rule():
    from dsocr.sanic_app.app import cors_origin
    listed = frozenset({"https://app.example", "http://localhost:3000"})
    assert cors_origin(listed, "https://app.example") == "https://app.example"
    assert cors_origin(listed, "HTTPS://APP.EXAMPLE") == "HTTPS://APP.EXAMPLE"      # echoed as sent
    assert cors_origin(listed, "http://localhost:3000") == "http://localhost:3000"
    for other in ("http://localhost:3001", "https://app.example.com", "null", "", None):
        assert cors_origin(listed, other) is None, other
    assert cors_origin(frozenset({"*"}), "https://anything.example") == "*"
    assert cors_origin(frozenset(), "https://app.example") is None and cors_origin(frozenset({"*"}), None) is None


def test_no_cors_unless_configured(server):
    """The default (no cors_origins): no CORS headers, and OPTIONS is no preflight (the key is asked for)."""
    base = server[0]
    r = httpx.get(base + "/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert r.status_code == 200 and cors_headers(r) == {}
    r = preflight(base, ORIGIN)
    assert r.status_code == 401 and cors_headers(r) == {}, r.text


# ---------------------------------------------------------------- /metrics

def scrape(base) -> dict:
    """{(sample name, sorted labels): value} of GET /metrics, which needs no API key."""
    r = httpx.get(base + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def delta(before: dict, after: dict, name: str) -> dict:
    """The change of each `name` sample: {labels as a dict's items: change}, unchanged ones left out."""
    out = {}
    for (n, labels), v in after.items():
        if n == name and v != before.get((n, labels), 0):
            out[labels] = v - before.get((n, labels), 0)
    return out


def test_metrics_count_what_was_sent(app_server):
    base, _ = app_server
    before = scrape(base)
    ok = post(base, "/v1/chat/completions", chat_body(max_tokens=3))
    assert ok.status_code == 200, ok.text
    events, _ = sse_events(base, "/v1/chat/completions", chat_body(max_tokens=2, stream=True,
                                                                   stream_options={"include_usage": True}))
    usage = [ok.json()["usage"], json.loads(events[-2][1])["usage"]]
    assert post(base, "/v1/chat/completions", None, raw=b"{").status_code == 400
    assert post(base, "/v1/chat/completions", chat_body(model="gpt-4o")).status_code == 404
    after = scrape(base)
    assert delta(before, after, "dsocr_requests_total") == {
        (("route", "chat"), ("status", "ok")): 2, (("route", "chat"), ("status", "400")): 1,
        (("route", "chat"), ("status", "404")): 1, (("route", "metrics"), ("status", "ok")): 1}
    assert delta(before, after, "dsocr_prompt_tokens_total") == {(): sum(u["prompt_tokens"] for u in usage)}
    assert delta(before, after, "dsocr_completion_tokens_total") == {(): sum(u["completion_tokens"] for u in usage)}
    assert delta(before, after, "dsocr_time_to_first_token_seconds_count") == {(): 2}
    assert delta(before, after, "dsocr_request_duration_seconds_count") == {(("route", "chat"),): 4,
                                                                           (("route", "metrics"),): 1}
    slots = after[("dsocr_parallel_slots", ())]
    assert slots >= 1 and after[("dsocr_queue_depth", ())] == 0 and after[("dsocr_running_sequences", ())] == 0


def test_metrics_gauges_follow_a_running_stream(app_server):
    base, _ = app_server
    with httpx.Client(timeout=120) as client:
        req = client.build_request("POST", base + "/v1/chat/completions", headers=AUTH,
                                   json=chat_body(max_tokens=4000, stream=True, no_repeat_ngram_size=0))
        r = client.send(req, stream=True)
        data = (line for line in r.iter_lines() if line.startswith("data: "))
        next(data)
        next(data)                                    # a token came: the job holds a slot
        during = scrape(base)
        r.close()
    assert during[("dsocr_running_sequences", ())] == 1 and during[("dsocr_queue_depth", ())] == 0, during
    deadline = time.time() + 30
    while scrape(base)[("dsocr_running_sequences", ())] and time.time() < deadline:
        time.sleep(0.1)
    assert scrape(base)[("dsocr_running_sequences", ())] == 0


# ---------------------------------------------------------------- logging

def log_lines(log, start: int) -> list[str]:
    """The server's log lines written after byte `start`, numba's cache lines left out."""
    return [line for line in log.read_text()[start:].splitlines() if not line.startswith("[cache]")]


def test_one_log_line_per_request(app_server):
    base, log = app_server
    start = len(log.read_text())
    missing = f"/v1/nothing-{uuid.uuid4().hex[:8]}"
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + missing, headers=AUTH).status_code == 404
    assert post(base, "/v1/chat/completions", None, raw=b"{").status_code == 400
    assert post(base, "/v1/chat/completions", chat_body(), key=None).status_code == 401
    assert preflight(base, ORIGIN, "/v1/responses").status_code == 204
    chat = post(base, "/v1/chat/completions", chat_body()).json()["id"]
    stream = json.loads(sse_events(base, "/v1/chat/completions", chat_body(stream=True))[0][0][1])["id"]
    events, _ = sse_events(base, "/v1/responses", responses_body(stream=True))
    resp = json.loads(events[0][1])["response"]["id"]
    expected = ["method=GET path=/health status=200 ", f"method=GET path={missing} status=404 ",
                "method=POST path=/v1/chat/completions status=400 ",
                "method=POST path=/v1/chat/completions status=401 ", "method=OPTIONS path=/v1/responses status=204 ",
                f"req={chat} route=chat status=ok ", f"req={stream} route=chat.stream status=ok ",
                f"req={resp} route=responses.stream status=ok "]
    deadline = time.time() + 10                       # a stream's line is written once its last byte went out
    while len(log_lines(log, start)) < len(expected) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)                                   # a doubled line would have come with the first
    lines = log_lines(log, start)
    assert len(lines) == len(expected), lines
    for line, needle in zip(lines, expected):
        assert " dsocr.server " in line and needle in line and " total=" in line, (needle, line)


def test_start_is_quiet_and_printed_once(app_server):
    """No deprecation warnings, no traceback, and each of Sanic's start lines once (its own logging
    config would print them a second time, to stdout)."""
    _, log = app_server
    text = "\n".join(log_lines(log, 0))
    assert "Warning" not in text and "Traceback" not in text, text[-3000:]
    assert text.count("Starting worker") == 1 and text.count("dsocr: serving") == 1, text[-3000:]


# ---------------------------------------------------------------- the JSON, against the openai types

def extra_fields(m, path="$") -> list[str]:
    """The paths of fields the openai types do not declare (they allow extras, so a misspelt field
    would pass validation while the real one defaults)."""
    out = []
    if isinstance(m, BaseModel):
        out += [f"{path}.{k}" for k in m.model_extra or {}]
        for k in type(m).model_fields:
            out += extra_fields(getattr(m, k), f"{path}.{k}")
    elif isinstance(m, list):
        for i, x in enumerate(m):
            out += extra_fields(x, f"{path}[{i}]")
    return out


STREAM_EVENTS = TypeAdapter(ResponseStreamEvent)
EVENT_TYPES = {get_args(cls.model_fields["type"].annotation)[0]: cls
               for cls in get_args(get_args(ResponseStreamEvent)[0])}          # Annotated[Union[...], ...]


def strictly(validate, data: dict):
    """`data` validated in pydantic's strict mode (required fields present, no type coerced) with no
    undeclared field anywhere."""
    m = validate(data)
    assert extra_fields(m) == [], extra_fields(m)
    return m


def stream_event(data: dict):
    try:
        m = strictly(lambda d: STREAM_EVENTS.validate_python(d, strict=True), data)
    except ValidationError:                           # the union's error lists every member: show this one's
        EVENT_TYPES[data.get("type")].model_validate(data, strict=True)
        raise
    assert m.type == data["type"]
    return m


def chat_completion(d):
    return ChatCompletion.model_validate(d, strict=True)


def test_the_strict_check_catches_slips(app_server):
    """What the schema tests below would miss if their check were lax: a missing required field, a
    wrong type, a misspelt field; on a real answer of the server."""
    data = post(app_server[0], "/v1/chat/completions", chat_body()).json()
    strictly(chat_completion, data)
    missing = json.loads(json.dumps(data))
    del missing["choices"][0]["index"]
    wrong_type = {**data, "created": str(data["created"])}
    misspelt = json.loads(json.dumps(data))
    misspelt["choices"][0]["logprob"] = misspelt["choices"][0].pop("logprobs")     # optional: only extras show it
    for bad in (missing, wrong_type):
        with pytest.raises(ValidationError):
            strictly(chat_completion, bad)
    with pytest.raises(AssertionError, match=r"choices\[0\]\.logprob"):
        strictly(chat_completion, misspelt)
    with pytest.raises(ValidationError):
        stream_event({"type": "response.output_text.delta", "sequence_number": 0, "item_id": "m",
                      "output_index": 0, "content_index": 0, "logprobs": []})        # no delta


def test_models_match_the_openai_types(app_server):
    base, _ = app_server
    listed = httpx.get(base + "/v1/models", headers=AUTH).json()
    assert listed["object"] == "list"
    for item in listed["data"] + [httpx.get(base + f"/v1/models/{MODEL}", headers=AUTH).json()]:
        strictly(lambda d: Model.model_validate(d, strict=True), item)


def test_chat_completion_and_chunks_match_the_openai_types(app_server):
    base, _ = app_server
    r = strictly(chat_completion, post(base, "/v1/chat/completions", chat_body(max_tokens=3)).json())
    assert r.usage.completion_tokens == 3
    events, _ = sse_events(base, "/v1/chat/completions", chat_body(max_tokens=3, stream=True,
                                                                   stream_options={"include_usage": True}))
    assert events[-1] == (None, "[DONE]")
    chunks = [strictly(lambda d: ChatCompletionChunk.model_validate(d, strict=True), json.loads(data))
              for _, data in events[:-1]]
    assert len({c.id for c in chunks}) == 1 and chunks[-1].usage.completion_tokens == 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_response_and_stream_events_match_the_openai_types(app_server):
    base, _ = app_server
    r = strictly(lambda d: Response.model_validate(d, strict=True),
                 post(base, "/v1/responses", responses_body()).json())
    assert r.usage.output_tokens == 3
    events, _ = sse_events(base, "/v1/responses", responses_body(stream=True))
    parsed = []
    for name, data in events:
        event = stream_event(json.loads(data))
        assert event.type == name                     # the SSE event name is the event's type
        parsed.append(event)
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    assert parsed[0].type == "response.created" and parsed[-1].type in ("response.completed", "response.incomplete")
    assert parsed[-1].response.output_text == r.output_text


# ---------------------------------------------------------------- warm-up

def test_first_requests_after_start_compile_nothing(app_server):
    """`dsocr serve` warms up before it says "serving": no request after that loads or compiles a
    kernel (each would print a numba [cache] line). The requests above ran first; these cover each route."""
    base, log = app_server
    assert post(base, "/v1/chat/completions", chat_body(max_tokens=3)).status_code == 200
    sse_events(base, "/v1/responses", responses_body(stream=True))
    text = log.read_text()
    after_start = text[text.index("dsocr: serving"):]
    assert "[cache]" in text[:text.index("dsocr: serving")]      # numba's cache log is on: the check can see
    assert [line for line in after_start.splitlines() if line.startswith("[cache]")] == []
