"""`dsocr serve` as a subprocess on 127.0.0.1 with the tiny model, talked to by the official openai
client (happy paths) and raw httpx (every error). Streaming text must equal non-streaming text
and the CLI's text for the same request; after each bad request the server still answers."""
import base64
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import TINY

KEY = "test-secret"
MODEL = "tiny-ocr"
PROMPT_TEXT = "Free OCR."
IMAGE = TINY / "images" / "small_note.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path=IMAGE) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def start_server(lm, mm, tmp_path, *extra):
    return start_serve(tmp_path, "--model", lm, "--mmproj", mm, "--model-id", MODEL, *extra)


def start_serve(tmp_path, *args):
    """`dsocr serve ARGS` on a free port with tmp_path/config.toml, once /health answers; its log is
    tmp_path/server-PORT.log. The data folder is tmp_path's: no models of the user's are served."""
    port = free_port()
    log = open(tmp_path / f"server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dsocr.cli.main", "serve", "--port", str(port),
                             "--max-new-tokens", "16", *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "DSOCR_CONFIG": str(tmp_path / "config.toml"),
                                 "XDG_DATA_HOME": str(tmp_path / "data")})
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((tmp_path / f"server-{port}.log").read_text())
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    lm, mm = converted("f32", "f32")
    tmp = tmp_path_factory.mktemp("server")
    # one slot and one queued job: the queue tests fill the house with two requests
    proc, base = start_server(lm, mm, tmp, "--api-key", KEY, "--parallel", "1", "--max-queue", "1",
                              "--max-body-mb", "1")
    yield base, lm, mm, tmp
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def user_message(text=PROMPT_TEXT, url=None):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url()}},
                                         {"type": "text", "text": text}]}]


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.fixture(scope="module")
def chat_text(client):
    r = client.chat.completions.create(model=MODEL, messages=user_message(), max_tokens=16)
    return r


def test_chat_non_streaming_reproduces_golden_ids(chat_text, converted):
    from dsocr.runtime.gguf_file import GGUFFile
    from dsocr.runtime.tokenizer import TextTokenizer
    import numpy as np
    z = np.load(TINY / "golden" / "small_cropmode_noslices.npz")
    tok = TextTokenizer.from_gguf(GGUFFile(converted("f32", "f32")[0]))
    r = chat_text
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 278 and r.usage.completion_tokens == 16 and r.usage.total_tokens == 294
    assert r.choices[0].message.content == tok.decode(list(z["generated_ids"])).encode("utf-8", "replace").decode()


def test_chat_streaming_equals_non_streaming(client, chat_text):
    chunks = list(client.chat.completions.create(model=MODEL, messages=user_message(), max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat_text.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_responses_non_streaming_and_streaming(client, chat_text):
    inp = [{"role": "user", "content": [{"type": "input_image", "image_url": data_url()},
                                        {"type": "input_text", "text": PROMPT_TEXT}]}]
    r = client.responses.create(model=MODEL, input=inp, max_output_tokens=16)
    assert r.output_text == chat_text.choices[0].message.content
    assert r.usage.input_tokens == 278 and r.usage.output_tokens == 16 and r.status == "incomplete"
    events = list(client.responses.create(model=MODEL, input=inp, max_output_tokens=16, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.done" in types
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text


def test_instructions_and_system_messages_precede_the_user_turn(client):
    """A system message's text goes first: the prompt and so the token count change predictably."""
    base = client.chat.completions.create(model=MODEL, messages=user_message(), max_tokens=1)
    msgs = [{"role": "system", "content": "Read it."}] + user_message()
    with_sys = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    assert with_sys.usage.prompt_tokens > base.usage.prompt_tokens


def test_cli_text_equals_server_text(server, chat_text):
    _, lm, mm, tmp = server
    r = subprocess.run([sys.executable, "-m", "dsocr.cli.main", "ocr", str(IMAGE), "--model", str(lm), "--mmproj",
                        str(mm), "--prompt", "<image>\n" + PROMPT_TEXT, "--max-new-tokens", "16", "--json"],
                       capture_output=True, text=True, env={**os.environ, "DSOCR_CONFIG": str(tmp / "cli.toml")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == chat_text.choices[0].message.content


def test_stop_sequences(client, chat_text):
    full = chat_text.choices[0].message.content
    stop = full[5:8]
    r = client.chat.completions.create(model=MODEL, messages=user_message(), max_tokens=16, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == full[:full.index(stop)]
    s = client.chat.completions.create(model=MODEL, messages=user_message(), max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == full[:full.index(stop)]


def test_openapi_document(server):
    doc = httpx.get(server[0] + "/openapi.json").json()
    assert doc["openapi"].startswith("3.") and {"/v1/chat/completions", "/v1/responses", "/v1/models"} <= set(doc["paths"])


# ---------------------------------------------------------------- errors, each followed by a health check

def post(base, path, body, key=KEY, raw=None, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(base + path, content=raw, headers={**headers, "Content-Type": "application/json"},
                          timeout=timeout)
    return httpx.post(base + path, json=body, headers=headers, timeout=timeout)


def chat_body(**kw):
    return {"model": MODEL, "messages": user_message(), "max_tokens": 2, **kw}


def assert_error(r, status, *needles, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for n in needles:
        assert n in err["message"], (n, err)
    if param is not None:
        assert err["param"] == param


def still_serving(base):
    assert httpx.get(base + "/health").json()["status"] == "ok"
    assert post(base, "/v1/chat/completions", chat_body()).status_code == 200


@pytest.mark.parametrize("make,status,needles,param", [
    (lambda: dict(raw=b"{not json"), 400, ["not valid JSON"], None),
    (lambda: dict(raw=b"[1, 2]"), 400, ["JSON object"], None),
    (lambda: dict(body=chat_body(temperature="hot")), 400, ["'temperature' must be a number"], "temperature"),
    (lambda: dict(body=chat_body(max_tokens=0)), 400, ["'max_tokens'"], "max_tokens"),
    (lambda: dict(body=chat_body(stream="yes")), 400, ["'stream'"], "stream"),
    (lambda: dict(body=chat_body(mode="huge")), 400, ["unknown mode"], "mode"),
    (lambda: dict(body={"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}), 400,
     ["an image is required"], "messages"),
    (lambda: dict(body={"model": MODEL, "messages": []}), 400, ["non-empty list"], "messages"),
    (lambda: dict(body=chat_body(messages=user_message(url="data:image/png;base64,@@@"))), 400, ["base64"], None),
    (lambda: dict(body=chat_body(messages=user_message(url="data:image/png;base64," + base64.b64encode(b"junk").decode()))),
     400, ["not a readable image"], None),
    (lambda: dict(body=chat_body(messages=user_message(url="file:///etc/passwd"))), 400, ["local paths"], None),
    (lambda: dict(body=chat_body(messages=user_message(url="/etc/passwd"))), 400, ["local paths"], None),
    (lambda: dict(body=chat_body(messages=user_message(url="http://127.0.0.1:9/x.png"))), 400, ["non-public"], None),
    (lambda: dict(body=chat_body(messages=user_message(url="http://169.254.169.254/latest"))), 400, ["non-public"], None),
    (lambda: dict(body=chat_body(model="gpt-4o")), 404, ["does not exist"], "model"),
    (lambda: dict(body=chat_body(), key="wrong"), 401, ["API key"], None),
    (lambda: dict(body=chat_body(), key=None), 401, ["API key"], None),
], ids=["malformed-json", "not-object", "bad-temperature", "bad-max-tokens", "bad-stream", "bad-mode", "no-image",
        "no-messages", "bad-base64", "not-an-image", "file-url", "bare-path", "loopback-url", "link-local-url",
        "unknown-model", "wrong-key", "no-key"])
def test_bad_requests(server, make, status, needles, param):
    base = server[0]
    kw = make()
    r = post(base, "/v1/chat/completions", kw.get("body"), key=kw.get("key", KEY), raw=kw.get("raw"))
    assert_error(r, status, *needles, param=param)
    still_serving(base)


def test_unknown_route_and_method(server):
    base = server[0]
    assert_error(httpx.get(base + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404, "no route")
    assert_error(httpx.get(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)
    still_serving(base)


def test_body_too_large(server):
    base = server[0]
    big = chat_body(messages=user_message(url="data:image/png;base64," + "A" * (1 << 21)))
    assert_error(post(base, "/v1/chat/completions", big), 413, "over 1 MB")
    still_serving(base)


def test_responses_errors(server):
    base = server[0]
    assert_error(post(base, "/v1/responses", {"model": MODEL, "input": "just text"}), 400, "image is required")
    assert_error(post(base, "/v1/responses", {"model": MODEL, "input": [], "instructions": 3}), 400, "instructions")
    still_serving(base)


def stream_open(base, max_tokens):
    """A streaming request whose response is read lazily (the caller closes it)."""
    client = httpx.Client(timeout=120)
    req = client.build_request("POST", base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                               json=chat_body(max_tokens=max_tokens, stream=True, no_repeat_ngram_size=0))
    return client, client.send(req, stream=True)


def test_queue_full_gets_503_then_recovers(server):
    base = server[0]
    c1, r1 = stream_open(base, 4000)            # running
    lines1 = r1.iter_lines()                    # kept alive: dropping the iterator closes the stream
    next(lines1)
    c2, r2 = stream_open(base, 4000)            # waiting (max-queue 1)
    r3 = post(base, "/v1/chat/completions", chat_body())
    assert_error(r3, 503, "queue is full")
    assert r3.headers.get("retry-after") == "5"
    for c, r in ((c1, r1), (c2, r2)):
        r.close()
        c.close()
    deadline = time.time() + 60
    while httpx.get(base + "/health").json()["busy"] and time.time() < deadline:
        time.sleep(0.1)
    still_serving(base)


def test_disconnect_cancels_the_generation(server):
    """A client dropping a long stream frees the engine: the next request does not wait for it."""
    base = server[0]
    c, r = stream_open(base, 6000)
    lines = r.iter_lines()
    for _ in range(5):
        next(lines)
    r.close()
    c.close()
    t = time.perf_counter()
    ok = post(base, "/v1/chat/completions", chat_body(max_tokens=4), timeout=60)
    assert ok.status_code == 200 and time.perf_counter() - t < 10


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/page.png":
            data = IMAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/page.png")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html></html>")

    def log_message(self, *args):
        pass


def test_http_image_urls_when_private_addresses_are_allowed(converted, tmp_path):
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}"
    lm, mm = converted("f32", "f32")
    proc, base = start_server(lm, mm, tmp_path, "--allow-private-urls")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        a = client.chat.completions.create(model=MODEL, messages=user_message(url=url + "/redirect"), max_tokens=8)
        b = client.chat.completions.create(model=MODEL, messages=user_message(), max_tokens=8)
        assert a.choices[0].message.content == b.choices[0].message.content
        assert_error(post(base, "/v1/chat/completions", chat_body(messages=user_message(url=url + "/index.html")),
                          key=None), 400, "not an image")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        images.shutdown()


def test_config_precedence(tmp_path, monkeypatch):
    from dsocr.cli.config import ConfigError, load_settings
    cfg = tmp_path / "c.toml"
    cfg.write_text('[inference]\nmax_new_tokens = 100\ntemperature = 0.5\nmode = "base"\n'
                   '[server]\nport = 9001\nmax_queue = 3\n')
    s = load_settings(str(cfg), environ={})
    assert (s["inference"]["max_new_tokens"], s["server"]["port"], s["inference"]["top_p"]) == (100, 9001, 1.0)
    env = {"DSOCR_MAX_NEW_TOKENS": "200", "DSOCR_PORT": "9002"}
    s = load_settings(str(cfg), environ=env)
    assert (s["inference"]["max_new_tokens"], s["server"]["port"], s["inference"]["temperature"]) == (200, 9002, 0.5)
    s = load_settings(str(cfg), cli={"inference": {"max_new_tokens": 300, "mode": None}, "server": {"port": None}},
                      environ=env)
    assert (s["inference"]["max_new_tokens"], s["server"]["port"], s["inference"]["mode"]) == (300, 9002, "base")
    fresh = tmp_path / "new" / "config.toml"     # named but missing: an error, and nothing is written
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(str(fresh), environ={})
    assert not fresh.parent.exists()
