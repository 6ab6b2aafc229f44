"""What a request becomes before it reaches the engine (issue 13): the server's views and decoding
parameters from the same settings `dsocr ocr` uses (so `dsocr serve --base-size` counts), 400s for
parameters the server cannot honour, `instructions` echoed, chat-UI conversations (a follow-up turn
reads the latest image; a text-only one is a 400 "image_required"), PDFs as pages (data URLs, file
parts, fetched URLs), and image fetches that connect to the address they checked. Unit level: the
parsers and the page loader, on real PNGs and PDFs made by Pillow and a real loopback HTTP server."""
import asyncio
import base64
import http.server
import io
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from dsocr.cli.commands_ocr import checked_inference
from dsocr.cli.commands_serve import serve_settings
from dsocr.cli.config import Inference, load_settings
from dsocr.cli.main import build_parser
from dsocr.runtime.pdf import render_pages
from dsocr.runtime.preprocess import V1, ViewConfig
from dsocr.sanic_app import images
from dsocr.sanic_app.errors import APIError
from dsocr.sanic_app.images import FetchPolicy, load_request_pages
from dsocr.sanic_app.protocol import response_object
from test_fuzz_requests import parse_chat, parse_responses

from test_config import home  # noqa: F401  (the fixture: config and data folders moved under tmp_path)

SERVER = Inference()                     # the built-in inference settings


def png_bytes(size=(48, 32), color="white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, media_type="image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


PAGE_COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
PAGE_SIZES = [(60, 80), (90, 40), (50, 50)]       # points: Pillow writes the PDF at 72 dpi


def pdf_bytes(n_pages=3) -> bytes:
    pages = [Image.new("RGB", PAGE_SIZES[i % 3], PAGE_COLORS[i % 3]) for i in range(n_pages)]
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return buf.getvalue()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def chat(*content, **body):
    return {"model": "m", "messages": [{"role": "user", "content": list(content)}], **body}


def responses(*content, **body):
    return {"model": "m", "input": [{"role": "user", "content": list(content)}], **body}


PNG_URL = data_url(png_bytes())
OCR = {"type": "text", "text": "Free OCR."}


def refused(parse, body, param, code=None, needle=""):
    with pytest.raises(APIError) as e:
        parse(body, SERVER)
    assert (e.value.status, e.value.param) == (400, param), e.value.message
    assert code is None or e.value.code == code, e.value.code
    assert needle in e.value.message and "\n" not in e.value.message
    return e.value


def load(refs, policy=None):
    policy = policy or FetchPolicy(allow_private=False, max_pixels=10**7, fetch_timeout=10, request_fetch_timeout=10)
    with ThreadPoolExecutor(1) as pool:
        return asyncio.run(load_request_pages(refs, policy, pool))


def load_refused(refs, code, needle, policy=None):
    with pytest.raises(APIError) as e:
        load(refs, policy)
    assert (e.value.status, e.value.code) == (400, code) and needle in e.value.message, e.value.message
    assert "\n" not in e.value.message
    return e.value


# ---------------------------------------------------------------- one settings object: views and decoding

@pytest.mark.parametrize("argv, view", [
    (["--mode", "base", "--base-size", "768"], ViewConfig(768, 1024, False)),
    (["--mode", "gundam", "--base-size", "512"], ViewConfig(512, 640, True)),
    (["--mode", "small", "--image-size", "320"], ViewConfig(640, 320, False)),
    (["--crop-mode", "false"], ViewConfig(1024, 640, False)),
])
def test_serve_view_flags_reach_requests_without_a_mode(home, argv, view):
    """`dsocr serve --base-size` etc. flow through load_settings to the view of a request that names no
    mode (they used to be dropped: the server built its views from the mode alone)."""
    args = build_parser().parse_args(["serve", *argv])
    settings = serve_settings(args)
    parsed = parse_chat(chat(image_part(PNG_URL), OCR), Inference(**settings["inference"]))
    assert parsed.view == view
    assert parse_responses(responses(image_part(PNG_URL)), Inference(**settings["inference"])).view == view


def test_a_request_mode_gets_that_modes_views(home):
    settings = serve_settings(build_parser().parse_args(["serve", "--mode", "base", "--base-size", "768"]))
    inference = Inference(**settings["inference"])
    assert parse_chat(chat(image_part(PNG_URL), mode="tiny"), inference).view == ViewConfig(512, 512, False)
    assert parse_chat(chat(image_part(PNG_URL), mode="base"), inference).view == ViewConfig(1024, 1024, False)
    refused(parse_chat, chat(image_part(PNG_URL), mode="huge"), "mode", needle="unknown mode 'huge'")
    refused(parse_chat, chat(image_part(PNG_URL), mode=3), "mode", needle="'mode' must be a string")


def test_serve_takes_max_pdf_pages(home):
    assert serve_settings(build_parser().parse_args(["serve"]))["server"]["max_pdf_pages"] == 20
    settings = serve_settings(build_parser().parse_args(["serve", "--max-pdf-pages", "3"]))
    assert (settings["server"]["max_pdf_pages"], settings.source("server", "max_pdf_pages")) == (3, "flag")


@pytest.mark.parametrize("config", [
    "",
    "[inference]\nseed = 7\nno_repeat_ngram_size = 0\ntemperature = 0.5\ntop_k = 5\ntop_p = 0.9\n"
    "max_new_tokens = 100\nngram_window = 50\nmode = \"small\"\ncrop_mode = true\n",
])
def test_the_cli_and_the_server_build_the_same_views_and_decoding(home, config):
    """One set of defaults, one conversion: a request with no values of its own decodes and sees exactly
    what `dsocr ocr` would with the same settings (seed < 0 random, n-gram size 0 turning blocking off)."""
    path = home / "config.toml"
    path.write_text(config)
    settings = load_settings(str(path), environ={})
    inference, sampling, _ = checked_inference(settings)
    view = inference.view(layout=V1)
    for parsed in (parse_chat(chat(image_part(PNG_URL)), inference),
                   parse_responses(responses(image_part(PNG_URL)), inference)):
        assert (parsed.view, parsed.sampling) == (view, sampling)
    assert sampling.seed == (7 if config else None)
    assert sampling.ngram_mode == ("off" if config else "window")


def test_request_values_override_the_server_settings():
    parsed = parse_chat(chat(image_part(PNG_URL), temperature=0.3, seed=0, no_repeat_ngram_size=0, top_k=4,
                             max_tokens=9, max_completion_tokens=5, ngram_window=12), Inference(seed=3))
    s = parsed.sampling
    assert (s.temperature, s.seed, s.ngram_mode, s.top_k, s.max_new_tokens, s.ngram_window) == \
        (0.3, 0, "off", 4, 5, 12)
    assert parse_chat(chat(image_part(PNG_URL)), Inference(seed=3)).sampling.seed == 3
    s = parse_responses(responses(image_part(PNG_URL), max_output_tokens=7, no_repeat_ngram_size=20), SERVER).sampling
    assert (s.max_new_tokens, s.no_repeat_ngram_size, s.ngram_mode) == (7, 20, "window")


# ---------------------------------------------------------------- parameters the server cannot honour

CHAT_REFUSED = [("n", 2), ("n", 0), ("logprobs", True), ("top_logprobs", 3),
                ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
                ("tool_choice", "auto"), ("tool_choice", {"type": "function", "function": {"name": "f"}}),
                ("functions", [{"name": "f"}]), ("function_call", "auto"),
                ("response_format", {"type": "json_object"}),
                ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}})]
RESPONSES_REFUSED = [("tools", [{"type": "web_search"}]), ("tool_choice", "required"), ("top_logprobs", 2),
                     ("previous_response_id", "resp_123")]


@pytest.mark.parametrize("key, value", CHAT_REFUSED)
def test_chat_parameters_the_server_cannot_honour_are_400s(key, value):
    refused(parse_chat, chat(image_part(PNG_URL), **{key: value}), key, "unsupported_parameter", f"'{key}'")


@pytest.mark.parametrize("key, value", RESPONSES_REFUSED + [("text", {"format": {"type": "json_object"}})])
def test_responses_parameters_the_server_cannot_honour_are_400s(key, value):
    param = "text.format" if key == "text" else key
    refused(parse_responses, responses(image_part(PNG_URL), **{key: value}), param, "unsupported_parameter",
            f"'{param}'")


def test_parameters_that_ask_for_nothing_extra_are_accepted():
    for body in ({"n": 1}, {"logprobs": False}, {"top_logprobs": None}, {"tools": []}, {"tool_choice": "none"},
                 {"functions": []}, {"response_format": {"type": "text"}}, {"n": None}):
        assert parse_chat(chat(image_part(PNG_URL), **body), SERVER).image_refs
    for body in ({"tools": []}, {"tool_choice": "none"}, {"text": {"format": {"type": "text"}}},
                 {"text": {"verbosity": "low"}}):
        assert parse_responses(responses(image_part(PNG_URL), **body), SERVER).image_refs
    refused(parse_responses, responses(image_part(PNG_URL), text="json"), "text", needle="'text' must be an object")


# ---------------------------------------------------------------- /v1/responses echoes instructions

def test_the_response_object_echoes_instructions():
    parsed = parse_responses(responses(image_part(PNG_URL), instructions="Keep the layout."), SERVER)
    assert parsed.prompt.startswith("Keep the layout.\n<image>")
    for status in ("in_progress", "completed"):
        obj = response_object("resp_1", "msg_1", "m", "text", status, None, parsed, 0)
        assert obj["instructions"] == "Keep the layout."
    plain = parse_responses(responses(image_part(PNG_URL)), SERVER)
    assert response_object("resp_1", "msg_1", "m", "", "completed", None, plain, 0)["instructions"] is None


# ---------------------------------------------------------------- chat UIs (Open WebUI)

SCAN = data_url(png_bytes((64, 40), "gray"))
NEWER_SCAN = data_url(png_bytes((40, 64), "black"))


def open_webui_follow_up(follow_up="What is the total?"):
    """The body Open WebUI sends for a second question in a chat whose first message attached a scan:
    the whole history, the image only in the first user turn, the follow-up as a plain string."""
    return {"model": "deepseek-ocr", "stream": True, "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": "You read documents."},
                {"role": "user", "content": [{"type": "text", "text": "<|grounding|>Convert the document to markdown."},
                                             image_part(SCAN)]},
                {"role": "assistant", "content": "# Invoice\n\n| item | price |\n| --- | --- |\n| tea | 3 |"},
                {"role": "user", "content": follow_up}]}


def test_a_follow_up_turn_reads_the_conversations_latest_image():
    parsed = parse_chat(open_webui_follow_up(), SERVER)
    assert parsed.image_refs == [(SCAN, "messages[1].content")]
    assert parsed.prompt == "You read documents.\n<image>\nWhat is the total?"
    body = open_webui_follow_up()
    body["messages"][1]["content"].append(image_part(NEWER_SCAN))      # the latest image of that turn
    body["messages"][2:2] = [{"role": "user", "content": [image_part(SCAN), {"type": "text", "text": "Free OCR."}]},
                             {"role": "assistant", "content": "tea 3"}]
    assert parse_chat(body, SERVER).image_refs == [(SCAN, "messages[2].content")]    # the most recent turn's
    # a last turn with an image of its own reads only that one
    body["messages"].append({"role": "user", "content": [image_part(NEWER_SCAN)]})
    assert parse_chat(body, SERVER).image_refs == [(NEWER_SCAN, f"messages[{len(body['messages']) - 1}].content")]
    # the same conversation through /v1/responses
    inp = [{"role": "user", "content": [{"type": "input_image", "image_url": SCAN}]},
           {"role": "assistant", "content": "tea 3"}, {"role": "user", "content": "And the date?"}]
    assert parse_responses({"model": "m", "input": inp}, SERVER).image_refs == [(SCAN, "input[0].content")]


OPEN_WEBUI_TITLE_TASK = """### Task:
Generate a concise, 3-5 word title with an emoji summarizing the chat history.
### Guidelines:
- The title should clearly represent the main theme or subject of the conversation.
- Use emojis that enhance understanding of the topic, but avoid quotation marks or special formatting.
### Output:
JSON format: { "title": "your concise title here" }
### Chat History:
<chat_history>
USER: <|grounding|>Convert the document to markdown.
ASSISTANT: # Invoice | item | price | | tea | 3 |
</chat_history>"""


def test_text_only_conversations_are_a_documented_400():
    """Open WebUI's background title/tag/follow-up generation: one user message holding the history as text."""
    title = {"model": "deepseek-ocr", "stream": False, "max_completion_tokens": 1000,
             "messages": [{"role": "user", "content": OPEN_WEBUI_TITLE_TASK}]}
    e = refused(parse_chat, title, "messages", "image_required", "an image is required")
    assert "this conversation has none" in e.message and "image_url" in e.message
    no_image_anywhere = open_webui_follow_up()
    no_image_anywhere["messages"][1]["content"] = "Convert the document to markdown."
    refused(parse_chat, no_image_anywhere, "messages", "image_required")
    refused(parse_responses, {"model": "m", "input": "just text"}, "input", "image_required", "input_image")
    refused(parse_responses, {"model": "m", "input": [{"role": "user", "content": "hi"}]}, "input", "image_required")


# ---------------------------------------------------------------- the page loader: images and PDFs

def test_an_ordinary_request_is_one_page_of_its_images_in_order():
    a, b = png_bytes((48, 32), "red"), png_bytes((20, 70), "blue")
    parsed = parse_chat(chat(image_part(data_url(a)), OCR, image_part(data_url(b))), SERVER)
    pages = load(parsed.image_refs)
    assert len(pages) == 1 and [im.data for im in pages[0]] == [a, b]
    assert [im.size for im in pages[0]] == [(48, 32), (20, 70)]
    assert parsed.prompt.count("<image>") == 2


def pdf_requests(pdf: bytes):
    """The three ways a PDF arrives: an image_url data URL, chat's file part, the responses API's input_file."""
    url = data_url(pdf, "application/pdf")
    return [parse_chat(chat(image_part(url), OCR), SERVER),
            parse_chat(chat({"type": "file", "file": {"file_data": url, "filename": "scan.pdf"}}, OCR), SERVER),
            parse_responses(responses({"type": "input_file", "file_data": url, "filename": "scan.pdf"}), SERVER)]


def test_each_pdf_page_becomes_its_own_ocr_page(tmp_path):
    pdf = pdf_bytes(3)
    (tmp_path / "scan.pdf").write_bytes(pdf)
    cli_pages = [np.asarray(image) for _, image in render_pages(tmp_path / "scan.pdf")]
    for parsed in pdf_requests(pdf):
        assert parsed.prompt.count("<image>") == 1 and len(parsed.image_refs) == 1
        pages = load(parsed.image_refs)
        assert [len(page) for page in pages] == [1, 1, 1]
        # rendered at 144 dpi: twice the points; the queued bytes are an encoded image, not pixels
        assert [page[0].size for page in pages] == [(2 * w, 2 * h) for w, h in PAGE_SIZES]
        assert all(page[0].data[:8] == b"\x89PNG\r\n\x1a\n" for page in pages)
        decoded = [np.asarray(page[0].decode()) for page in pages]
        for pixels, cli, color in zip(decoded, cli_pages, PAGE_COLORS):
            assert np.array_equal(pixels, cli)                   # the pixels `dsocr ocr scan.pdf` OCRs
            assert np.abs(pixels[pixels.shape[0] // 2, pixels.shape[1] // 2].astype(int) - color).max() < 12


def test_a_pdf_must_come_alone():
    url = data_url(pdf_bytes(1), "application/pdf")
    for content in ([image_part(url), image_part(PNG_URL)], [image_part(PNG_URL), image_part(url)],
                    [image_part(url), image_part(url)]):
        load_refused(parse_chat(chat(*content), SERVER).image_refs, "invalid_file", "a PDF must be the request's only")


def test_a_pdf_over_the_page_limit_is_refused_naming_the_limit():
    policy = FetchPolicy(allow_private=False, max_pixels=10**7, fetch_timeout=10, request_fetch_timeout=10,
                         max_pdf_pages=2)
    refs = parse_chat(chat(image_part(data_url(pdf_bytes(3), "application/pdf"))), SERVER).image_refs
    e = load_refused(refs, "too_many_pages", "the PDF has 3 pages; this server takes at most 2", policy)
    assert "max_pdf_pages" in e.message and e.param == "messages[0].content"
    assert len(load(refs, FetchPolicy(**{**policy.__dict__, "max_pdf_pages": 3}))) == 3


def test_bad_pdfs_are_clean_400s():
    good = pdf_bytes(1)
    corrupt = good[:40] + b"\x00garbage" * 20
    for data in (corrupt, b"%PDF-1.7\n%%EOF\n"):
        refs = [(data_url(data, "application/pdf"), "messages[0].content")]
        load_refused(refs, "invalid_file", "messages[0].content: not a readable PDF")
    # a page that would render over the pixel limit: 60x80 points are 120x160 pixels at 144 dpi
    small = FetchPolicy(allow_private=False, max_pixels=120 * 160 - 1, fetch_timeout=10, request_fetch_timeout=10)
    load_refused([(data_url(good, "application/pdf"), "p")], "invalid_file", "page 1 renders over the 19,199-pixel",
                 small)
    assert load([(data_url(good, "application/pdf"), "p")],
                FetchPolicy(**{**small.__dict__, "max_pixels": 120 * 160}))[0][0].size == (120, 160)


def test_malformed_file_parts_are_400s():
    url = data_url(pdf_bytes(1), "application/pdf")
    for part, needle in [({"type": "file", "file": {"file_id": "file-abc"}}, "file_id is not supported"),
                         ({"type": "file", "file": url}, "needs 'file' as an object"),
                         ({"type": "file", "file": {"file_data": base64.b64encode(b"%PDF-").decode()}},
                          "file_data must be a data URL"),
                         ({"type": "file", "file": {"filename": "a.pdf"}}, "needs file_data"),
                         ({"type": "input_file", "file_id": "file-abc"}, "file_id is not supported")]:
        refused(parse_chat, chat(part), "messages[0].content[0]", needle=needle)
    load_refused([(data_url(b"%PDF-", "text/plain"), "p")], "invalid_image", "is not an image or a PDF")


# ---------------------------------------------------------------- fetched URLs: PDFs, and no DNS rebinding

class Files(http.server.BaseHTTPRequestHandler):
    FILES = {"/page.png": ("image/png", png_bytes((30, 20))), "/scan.pdf": ("application/pdf", pdf_bytes(2))}
    hits: list = []

    def do_GET(self):
        Files.hits.append(self.path)
        media_type, body = self.FILES[self.path]
        self.send_response(200)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def files_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Files.hits = []
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_fetched_pdf_becomes_pages(files_server):
    policy = FetchPolicy(allow_private=True, max_pixels=10**7, fetch_timeout=10, request_fetch_timeout=10)
    refs = parse_responses(responses({"type": "input_file", "file_url": f"http://127.0.0.1:{files_server}/scan.pdf"}),
                           SERVER).image_refs
    pages = load(refs, policy)
    assert [page[0].size for page in pages] == [(2 * w, 2 * h) for w, h in PAGE_SIZES[:2]]


def test_a_rebinding_name_never_reaches_the_address_it_turns_to(files_server, monkeypatch):
    """The name answers a "public" address (127.0.0.2, where nothing listens) when it is checked and
    loopback (where the server listens) on any later lookup: the fetch must connect to what was
    checked, so the loopback server sees nothing. A name that stays on loopback shows the setup works."""
    real = socket.getaddrinfo
    lookups = []

    def dns(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host       # anyio passes IDNA-encoded bytes
        if name == "rebind.test":
            lookups.append(name)
            return real("127.0.0.2" if len(lookups) == 1 else "127.0.0.1", port, *args, **kwargs)
        return real("127.0.0.1" if name == "steady.test" else host, port, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    policy = FetchPolicy(allow_private=False, max_pixels=10**7, fetch_timeout=10, request_fetch_timeout=10)

    monkeypatch.setattr(images, "is_public_address", lambda ip: str(ip) == "127.0.0.2")
    load_refused([(f"http://rebind.test:{files_server}/page.png", "p")], "invalid_image", "fetching the image failed",
                 policy)
    assert Files.hits == [] and lookups == ["rebind.test"]

    monkeypatch.setattr(images, "is_public_address", lambda ip: str(ip) == "127.0.0.1")
    pages = load([(f"http://steady.test:{files_server}/page.png", "p")], policy)
    assert pages[0][0].size == (30, 20) and Files.hits == ["/page.png"]


# ---------------------------------------------------------------- the new shapes, fuzzed

def test_file_parts_and_refused_parameters_fuzz():
    """Random file parts, follow-up conversations and values of the refused parameters: a parsed request
    (one <image> per reference) or a one-line 400, never another exception."""
    from hypothesis import given, settings, strategies as st
    from test_fuzz_requests import FUZZ, check_parse, json_values, mostly

    pdf_url = data_url(pdf_bytes(1), "application/pdf")
    good_fields = st.fixed_dictionaries({"file_data": st.just(pdf_url)}, optional={"filename": st.text(max_size=5)})
    file_fields = mostly(good_fields, st.fixed_dictionaries({}, optional={
        "file_data": json_values, "file_url": json_values, "file_id": json_values, "filename": json_values}))
    file_part = st.one_of(st.fixed_dictionaries({"type": st.just("file"), "file": mostly(file_fields, json_values)}),
                          file_fields.map(lambda f: {"type": "input_file", **f}))
    parts = st.lists(st.one_of(file_part, st.just(image_part(PNG_URL)), st.just(OCR)), min_size=1, max_size=2)
    turn = st.fixed_dictionaries({"role": mostly(st.just("user"), st.sampled_from(["assistant", "system"])),
                                  "content": mostly(parts, st.text(max_size=8))})
    refused_values = {key: mostly(st.sampled_from([None, 1, 0, False, "none", [], {"type": "text"}]), json_values)
                      for key in ("n", "logprobs", "top_logprobs", "tools", "tool_choice", "functions",
                                  "function_call", "response_format", "previous_response_id", "text")}

    @settings(FUZZ, max_examples=300)
    @given(st.lists(turn, min_size=1, max_size=4),
           mostly(st.just({}), st.fixed_dictionaries({}, optional=refused_values)), st.booleans())
    def run(messages, extra, chat_route):
        key = "messages" if chat_route else "input"
        check_parse(parse_chat if chat_route else parse_responses, {"model": "m", key: messages, **extra})
    run()
