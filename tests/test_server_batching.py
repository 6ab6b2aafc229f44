"""The server on the batching engine, over real HTTP with the official `openai` client: concurrent
requests of different lengths and modes get the text each gets alone (in-process engine run of
the same pair), a PDF's pages come back in order under their headings, a chat UI's follow-up turn
reads the conversation's image, and /health reports the slots."""
import base64
import io
import threading

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from dsocr.runtime.engine import OcrEngine, OcrRequest
from dsocr.runtime.generate import SamplingParams
from dsocr.runtime.pdf import PAGE_SEPARATOR, page_heading, render_pages
from dsocr.runtime.preprocess import ViewConfig, read_image_file

from conftest import TINY
from test_server import IMAGE, MODEL, start_server

DOC = TINY / "images" / "doc_portrait.png"
# (image, mode, max_tokens): a tiled page, a 640 view and a small one, each its own budget
CASES = [(DOC, "gundam", 40), (DOC, "small", 24), (IMAGE, "tiny", 8)]


def data_url(path, kind="image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def served(converted, tmp_path_factory):
    lm, mm = converted("f32", "f32")
    tmp = tmp_path_factory.mktemp("batching")
    proc, base = start_server(lm, mm, tmp, "--parallel", "3", "--max-queue", "4", "--no-repeat-ngram-size", "0")
    yield base, OcrEngine(lm, mm), tmp
    proc.terminate()
    proc.wait(timeout=30)


def alone(engine, path, mode, n, prompt="<image>\nFree OCR."):
    req = OcrRequest([read_image_file(path)], prompt, ViewConfig.from_mode(mode),
                     SamplingParams(max_new_tokens=n, no_repeat_ngram_size=0, ngram_mode="off"))
    return engine.run(req).text


def test_concurrent_requests_get_their_alone_text(served):
    base, engine, _ = served
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    got, peak, done = [None] * len(CASES), [0], threading.Event()

    def ask(i, path, mode, n):
        r = client.chat.completions.create(model=MODEL, max_tokens=n, extra_body={"mode": mode}, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(path)}},
                                         {"type": "text", "text": "Free OCR."}]}])
        got[i] = (r.choices[0].message.content, r.usage.completion_tokens)

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], httpx.get(base + "/health").json()["running"])
    threads = [threading.Thread(target=ask, args=(i, *c)) for i, c in enumerate(CASES)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert peak[0] >= 2                                  # they ran side by side
    assert [g[0] for g in got] == [alone(engine, *c) for c in CASES]
    assert [g[1] for g in got] == [n for _, _, n in CASES] and all(g[0].strip() for g in got)
    health = httpx.get(base + "/health").json()
    assert health["status"] == "ok" and health["parallel"] == 3 and health["running"] == 0
    steps = {s.labels["batch"]: s.value for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)
             if f.name == "dsocr_decode_steps" for s in f.samples if s.name.endswith("_total")}
    assert sum(v for b, v in steps.items() if int(b) >= 2) >= 1          # decode steps shared by streams
    assert sum(steps.values()) >= max(n for _, _, n in CASES) - 1


def test_a_pdf_streams_its_pages_in_order(served, tmp_path):
    base, engine, _ = served
    src = Image.open(IMAGE).convert("RGB")
    pdf = tmp_path / "doc.pdf"
    src.save(pdf, save_all=True, append_images=[src.rotate(90, expand=True)], resolution=72)
    want = PAGE_SEPARATOR.join(
        page_heading(i + 1) + engine.run(OcrRequest([img], "<image>\nFree OCR.", ViewConfig.from_mode("tiny"),
                                                    SamplingParams(max_new_tokens=12, no_repeat_ngram_size=0,
                                                                   ngram_mode="off"))).text
        for i, (_, img) in enumerate(render_pages(pdf, None, 10**8)))
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=12, stream=True, extra_body={"mode": "tiny"},
        messages=[{"role": "user", "content": [
            {"type": "file", "file": {"file_data": data_url(pdf, "application/pdf"), "filename": "doc.pdf"}},
            {"type": "text", "text": "Free OCR."}]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_a_chat_ui_follow_up_reads_the_conversations_image(served):
    """Open WebUI's second turn: the image was in the first user message, the follow-up is text."""
    base, engine, _ = served
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "text", "text": "What does this say?"},
                                             {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]},
                {"role": "assistant", "content": "Some text."},
                {"role": "user", "content": "Free OCR."}]
    r = client.chat.completions.create(model=MODEL, max_tokens=8, messages=messages, extra_body={"mode": "tiny"})
    assert r.choices[0].message.content == alone(engine, IMAGE, "tiny", 8,
                                                 "You are a helpful assistant.\n<image>\nFree OCR.")
    with pytest.raises(openai.BadRequestError) as e:     # a background task (title): no image anywhere
        client.chat.completions.create(model=MODEL, max_tokens=8, messages=[
            {"role": "user", "content": "### Task:\nGenerate a concise title for the chat history.\n"
                                        "<chat_history>USER: hi</chat_history>"}])
    assert e.value.body["code"] == "image_required"
