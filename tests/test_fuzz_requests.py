"""Property-based request bodies: random JSON shaped like the route schemas (and not). Whatever comes
in, the answer is a valid result or a clear OpenAI-style 4xx error naming the parameter where there
is one: never a 500, never another exception, never a long wait. The parsers are fuzzed directly
(fast, many examples); a smaller number goes through real HTTP so JSON decoding and routing count.
"""
import base64
import io
import json
import time
from functools import partial

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from test_server import KEY, MODEL, data_url, server  # noqa: F401

from dsocr.cli.config import DEFAULTS
from dsocr.runtime.preprocess import V1
from dsocr.sanic_app import protocol
from dsocr.sanic_app.errors import APIError

parse_chat = partial(protocol.parse_chat, layout=V1)            # the tiny fixture's model
parse_responses = partial(protocol.parse_responses, layout=V1)

FUZZ = settings(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


def _tiny_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), "white").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# Text with the awkward cases st.text() leaves out: lone surrogates (JSON's \ud800), markers, NULs.
texts = st.one_of(st.text(max_size=12),
                  st.sampled_from(["", "<image>", "a<image>b", "\ud800", "x\udfffy", "\x00", "Free OCR.", "é" * 5]))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**20),
                         st.integers(max_value=-10**20), st.floats(), texts)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(texts, inner, max_size=3), max_leaves=8)


# Mostly well-formed, so that examples get past the first check and reach the deep ones; every piece
# is sometimes replaced by random JSON.
def mostly(good: st.SearchStrategy, *bad: st.SearchStrategy) -> st.SearchStrategy:
    """`good` four times in five (st.one_of does not weigh repeated branches)."""
    bad_one = st.one_of(*bad)
    return st.integers(0, 4).flatmap(lambda i: good if i else bad_one)


good_urls = st.sampled_from([data_url(), _tiny_png(), data_url().replace("data:image/png", "DATA:IMAGE/PNG")])
bad_urls = st.one_of(st.sampled_from(["DATA:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,@@",
                                      "data:text/plain;base64,QUJD", "data:image/png,raw", "http://127.0.0.1:9/x.png",
                                      "http://[::ffff:127.0.0.1]/x.png", "http://[64:ff9b::7f00:1]/x.png",
                                      "http://127.0.0.1:18500:80/", "http://[::1/x", "file:///etc/passwd",
                                      "/etc/passwd", "ftp://example.com/x.png", ""]), texts)
urls = mostly(good_urls, bad_urls)
image_part = st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_image"]),
                                    "image_url": st.one_of(urls, st.fixed_dictionaries({"url": urls}))})
text_part = st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text"]), "text": texts})
bad_part = st.one_of(st.fixed_dictionaries({"type": texts | json_values}, optional={"text": json_values,
                                                                                     "image_url": json_values}),
                     json_values)
any_part = st.one_of(image_part, text_part, bad_part)
parts = st.lists(any_part, min_size=1, max_size=4)
# a content list with an image among other parts, as a valid request has
image_parts = st.tuples(st.lists(any_part, max_size=2), image_part, st.lists(any_part, max_size=2)).map(
    lambda t: t[0] + [t[1]] + t[2])
user = st.fixed_dictionaries({"role": st.just("user"), "content": mostly(image_parts, parts, texts, json_values)})
other = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "assistant", "tool", "bogus"])},
                              optional={"content": st.one_of(texts, parts, json_values)})
conversation = st.tuples(st.lists(st.one_of(other, user), max_size=2), user, st.lists(other, max_size=1)).map(
    lambda t: t[0] + [t[1]] + t[2])
messages = mostly(conversation, st.lists(st.one_of(user, other), max_size=3), json_values)


def number(sane):
    return mostly(sane, st.integers(), st.floats(), st.sampled_from([1e400, -1e400, 10**30, -1]), json_values)


COMMON = {"temperature": number(st.floats(0, 2)), "top_p": number(st.floats(0, 1)),
          "top_k": number(st.integers(0, 50)), "seed": number(st.integers(0, 2**64)),
          "mode": mostly(st.sampled_from(["tiny", "gundam"]), texts, json_values),
          "no_repeat_ngram_size": number(st.integers(0, 30)), "ngram_window": number(st.integers(1, 100)),
          "stream": mostly(st.booleans(), json_values)}
MODELS = mostly(st.just(MODEL), texts, json_values)
max_tokens = number(st.integers(1, 3))


def bodies(shape: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the route's shape, sometimes any JSON at all."""
    return mostly(shape, json_values)


def chat_bodies(max_tokens=max_tokens):
    return bodies(st.fixed_dictionaries(
        {"model": MODELS, "messages": messages},
        optional={**COMMON, "max_tokens": max_tokens, "max_completion_tokens": max_tokens,
                  "stop": mostly(st.lists(st.text(min_size=1, max_size=3), max_size=4), texts,
                                 st.lists(texts, max_size=5), json_values),
                  "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
                                           json_values)}))


def responses_bodies(max_tokens=max_tokens):
    return bodies(st.fixed_dictionaries(
        {"model": MODELS, "input": mostly(messages, texts)},
        optional={**COMMON, "max_output_tokens": max_tokens,
                  "instructions": mostly(st.text(max_size=12), texts, json_values)}))


def check_parse(parse, body):
    try:
        parsed = parse(body, DEFAULTS["inference"])
    except APIError as e:
        assert e.status == 400 and e.message and "\n" not in e.message
        assert e.param is None or isinstance(e.param, str)
        event(f"400 {e.param} {e.message[:40]}")
        return
    event("parsed")
    parsed.prompt.encode("utf-8")                    # the tokenizer can take it
    assert parsed.image_refs and all(isinstance(u, str) and isinstance(p, str) for u, p in parsed.image_refs)
    assert parsed.prompt.count("<image>") == len(parsed.image_refs)
    parsed.sampling.validate()                       # what the parser accepts, decoding accepts


@settings(FUZZ, max_examples=400)
@given(chat_bodies())
def test_parse_chat_fuzz(body):
    check_parse(parse_chat, body)


@settings(FUZZ, max_examples=400)
@given(responses_bodies())
def test_parse_responses_fuzz(body):
    check_parse(parse_responses, body)


# ---------------------------------------------------------------- through HTTP

# Generations must stay short: token limits are tiny or not numbers at all (a float like 1e9 is an integer).
small_limits = mostly(st.integers(1, 2), st.integers(-1, 0), st.none(), texts, st.booleans(),
                      st.lists(st.integers(), max_size=2))
ROUTES = {"/v1/chat/completions": chat_bodies(small_limits), "/v1/responses": responses_bodies(small_limits)}


def check_http(base, route, body) -> int:
    raw = json.dumps(body).encode()                  # NaN, Infinity and \ud800 escapes as Python writes them
    t = time.perf_counter()
    r = httpx.post(base + route, content=raw, timeout=120,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    text = r.read().decode("utf-8", "replace")
    assert time.perf_counter() - t < 60, (route, raw[:300])
    assert r.status_code in (200, 400, 404, 413), (r.status_code, text[:300], raw[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    elif r.headers["content-type"].startswith("text/event-stream"):
        last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
        assert last == "data: [DONE]" or json.loads(last[6:])["type"] in ("response.completed", "response.incomplete")
    else:
        assert r.json()["object"] in ("chat.completion", "response")
    return r.status_code


@pytest.mark.parametrize("route", list(ROUTES))
def test_http_fuzz(server, route):
    statuses = []

    @settings(FUZZ, max_examples=30)
    @given(ROUTES[route])
    def run(body):
        statuses.append(check_http(server[0], route, body))
    run()
    assert {200, 400} <= set(statuses), statuses       # both results and errors were exercised
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
