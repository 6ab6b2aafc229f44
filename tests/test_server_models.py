"""One `dsocr serve` serving several models, one resident at a time: the pair it starts with and the
config entries whose pairs are on disk (two tiny DeepSeek-OCR pairs of different types, and a tiny
DeepSeek-OCR + DeepSeek-OCR 2 pair, skipped while the latter does not convert). Each request runs on the
model it names and gets the text that model gives alone; a request naming another model than the
resident one switches (counted in /metrics) after the resident model's running sequences finish, in
arrival order; a model whose files fail to load fails its request and the server goes on. The servers
come from test_server.py's helpers."""
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import FIXTURES
from test_server import IMAGE, MODEL, PROMPT_TEXT, data_url, start_serve, start_server, user_message

TINY2 = FIXTURES / "tiny-dsocr2"
Q8 = "tiny-q8"
SHORT = 8                        # tokens: the f32 and q8_0 pairs part at the third (tiny mode, this image)
LONG = 2000                      # tokens of a stream that runs while other requests arrive (no end-of-text)
# numba threads: the tiny model gains nothing from two, and on a loaded machine every parallel launch
# waits for both to be scheduled (a token took 40 ms instead of 1)
ONE_THREAD = ("--threads", "1")
WORDS = "word " * 2100           # 8400 prompt tokens: over the tiny model's 8192


def write_config(tmp, entries: dict, active: str | None = None) -> None:
    """config.toml with these [models.entries.NAME] (name -> (model, mmproj)) and an empty models folder,
    so that the built-in entries are not on disk."""
    lines = ["[models]", f'dir = "{tmp / "models"}"'] + ([f'active = "{active}"'] if active else [])
    for name, (lm, mm) in entries.items():
        lines += [f"[models.entries.{name}]", f'model = "{lm}"', f'mmproj = "{mm}"']
    (tmp / "models").mkdir(exist_ok=True)
    (tmp / "config.toml").write_text("\n".join(lines) + "\n")


def alone(lm, mm, mode: str, max_tokens: int) -> str:
    """The greedy text of one model on IMAGE, run in this process as the server runs a request."""
    from dsocr.cli.config import Inference
    from dsocr.runtime.engine import OcrEngine, OcrRequest
    from dsocr.runtime.preprocess import load_image
    engine = OcrEngine(lm, mm)
    inf = Inference()
    request = OcrRequest([load_image(IMAGE)], "<image>\n" + PROMPT_TEXT, inf.view(mode, layout=engine.layout),
                         inf.sampling(max_new_tokens=max_tokens))
    return engine.run(request).text


def chat(base, model, mode="tiny", max_tokens=SHORT, text=PROMPT_TEXT, **kw):
    return httpx.post(base + "/v1/chat/completions", json={"model": model, "messages": user_message(text),
                                                           "mode": mode, "max_tokens": max_tokens, **kw}, timeout=120)


def switches(base) -> float:
    families = text_string_to_metric_families(httpx.get(base + "/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == "dsocr_model_switches_total")


def health(base) -> dict:
    return httpx.get(base + "/health").json()


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def assert_error(r, status, param, code=None, needle=""):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == param and (code is None or err["code"] == code) and needle in err["message"], err


@pytest.fixture(scope="module")
def pairs(converted, tmp_path_factory):
    """The started pair (f32, served as MODEL), the q8_0 pair (entry Q8), and their texts alone."""
    f32, q8 = converted("f32", "f32"), converted("q8_0", "f16")
    texts = {MODEL: alone(*f32, "tiny", SHORT), Q8: alone(*q8, "tiny", SHORT)}
    assert texts[MODEL] != texts[Q8], texts          # else nothing here could tell the two apart
    return f32, q8, texts


@pytest.fixture(scope="module")
def two(pairs, converted2, tmp_path_factory):
    """A server started on the f32 pair, with entries: Q8 (on disk), the f32 pair again, one whose language
    model is cut short (its mmproj is fine, so it is served, and refused when its header is read), one
    whose files read but do not pair (v1's LM, OCR 2's mmproj: it fails when loaded), one whose mmproj is
    not a GGUF (not served), one not on disk (not served)."""
    (f32_lm, f32_mm), (q8_lm, q8_mm), _ = pairs
    tmp = tmp_path_factory.mktemp("server-models")
    broken = tmp / "broken-Q8_0.gguf"
    broken.write_bytes(q8_lm.read_bytes()[: q8_lm.stat().st_size // 2])
    junk = tmp / "mmproj-junk-F16.gguf"
    junk.write_bytes(b"not a gguf")
    write_config(tmp, {Q8: (q8_lm, q8_mm), "same-f32": (f32_lm, f32_mm), "broken": (broken, q8_mm),
                       "mismatched": (q8_lm, converted2("f32", "f32")[1]), "junk-mmproj": (q8_lm, junk),
                       "absent": (tmp / "absent-Q8_0.gguf", q8_mm)})
    proc, base = start_server(f32_lm, f32_mm, tmp, *ONE_THREAD)
    yield base, tmp / f"server-{base.rsplit(':', 1)[1]}.log"
    proc.terminate()
    proc.wait(timeout=30)


def test_models_lists_each_served_model(two):
    base, log = two
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL, Q8, "broken", "mismatched"]
    for mid in (MODEL, Q8, "broken", "mismatched"):
        assert client.models.retrieve(mid).id == mid
    assert_error(httpx.get(base + "/v1/models/absent"), 404, "model", "model_not_found", "'tiny-ocr', 'tiny-q8'")
    text = log.read_text()
    assert "not serving models.entries.junk-mmproj" in text and "models.entries.same-f32 is the pair served as " \
        f"{MODEL}" in text, text[-3000:]


def test_a_pair_started_from_an_entry_is_served_under_its_name(pairs, tmp_path):
    """Without --model-id the started pair keeps its entry's name (`--model NAME`, or the active entry),
    so every entry is served under its own; --model-id names it."""
    (f32_lm, f32_mm), (q8_lm, q8_mm), _ = pairs
    entries = {"tiny-f32": (f32_lm, f32_mm), Q8: (q8_lm, q8_mm)}
    for active, args, ids in [(None, ["--model", "tiny-f32"], ["tiny-f32", Q8]),
                              (Q8, [], [Q8, "tiny-f32"]),
                              (Q8, ["--model", "tiny-f32", "--model-id", "x"], ["x", Q8])]:
        write_config(tmp_path, entries, active)
        proc, base = start_serve(tmp_path, *args, *ONE_THREAD)
        try:
            assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ids, args
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_each_request_runs_on_the_model_it_names(two, pairs):
    base, _ = two
    texts = pairs[2]
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    before = switches(base)
    order = [MODEL, Q8, Q8, MODEL]
    for mid in order:
        r = client.chat.completions.create(model=mid, messages=user_message(), max_tokens=SHORT,
                                           extra_body={"mode": "tiny"})
        assert (r.model, r.choices[0].message.content) == (mid, texts[mid])
        assert health(base)["model"] == mid
    inp = [{"role": "user", "content": [{"type": "input_image", "image_url": data_url()},
                                        {"type": "input_text", "text": PROMPT_TEXT}]}]
    stream = client.responses.create(model=Q8, input=inp, max_output_tokens=SHORT, stream=True,
                                     extra_body={"mode": "tiny"})
    assert "".join(e.delta for e in stream if e.type == "response.output_text.delta") == texts[Q8]
    assert switches(base) - before == 3          # MODEL -> Q8, Q8 -> MODEL, MODEL -> Q8


def test_unknown_models_and_modes_the_model_lacks(two):
    base, _ = two
    assert_error(chat(base, "nosuch"), 404, "model", "model_not_found", f"'{MODEL}', '{Q8}', 'broken'")
    for mid in (MODEL, Q8):
        assert_error(chat(base, mid, mode="global"), 400, "mode", None, "global")      # DeepSeek-OCR 2's
    assert health(base)["status"] == "ok"


def test_a_switch_waits_for_the_resident_models_sequences_and_keeps_the_order(two, pairs):
    """A long stream on the resident model; meanwhile a job of the other model, then one of the resident
    model: that last one waits behind the other's job though slots are free (no overtaking), the long
    stream ends whole, then the other model is loaded, then the first again."""
    base, _ = two
    texts = pairs[2]
    assert chat(base, MODEL).status_code == 200                       # MODEL resident
    before = switches(base)
    answers = {}

    def ask(key, model):
        answers[key] = chat(base, model)

    with httpx.stream("POST", base + "/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": user_message(), "mode": "tiny", "max_tokens": LONG,
                            "stream": True, "stream_options": {"include_usage": True}}) as long:
        lines = long.iter_lines()
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)   # decoding
        other = threading.Thread(target=ask, args=("other", Q8))
        other.start()
        wait_until(lambda: health(base)["queued"] == 1)
        again = threading.Thread(target=ask, args=("again", MODEL))
        again.start()
        wait_until(lambda: health(base)["queued"] == 2)
        h = health(base)
        assert (h["model"], h["running"], h["parallel"]) == (MODEL, 1, 4), h        # free slots, and it waits
        rest = [line for line in lines if line.startswith("data: ")]
    assert f'"completion_tokens": {LONG}' in rest[-2] and rest[-1] == "data: [DONE]", rest[-3:]
    other.join(120)
    again.join(120)
    assert answers["other"].json()["choices"][0]["message"]["content"] == texts[Q8]
    assert answers["again"].json()["choices"][0]["message"]["content"] == texts[MODEL]
    assert switches(base) - before == 2 and health(base)["model"] == MODEL


def test_a_job_whose_client_left_before_its_switch_loads_nothing(two):
    """A job of the other model waits behind a stream of the resident one; its client leaves, then the
    stream's: nothing is loaded, the resident model stays."""
    base, _ = two
    assert chat(base, MODEL).status_code == 200
    before = switches(base)
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=120,
                      json={"model": MODEL, "messages": user_message(), "mode": "tiny", "max_tokens": LONG,
                            "stream": True}) as long:
        lines = long.iter_lines()        # kept: a dropped iterator closes the response
        next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        with httpx.stream("POST", base + "/v1/chat/completions", timeout=120,
                          json={"model": Q8, "messages": user_message(), "mode": "tiny", "max_tokens": SHORT,
                                "stream": True}):
            wait_until(lambda: health(base)["queued"] == 1)
    wait_until(lambda: health(base)["queued"] == 0 and health(base)["running"] == 0)
    assert switches(base) == before and health(base)["model"] == MODEL


def test_a_model_whose_files_do_not_read_is_refused_before_any_switch(two, pairs):
    base, log = two
    before = switches(base)
    r = chat(base, "broken")
    assert_error(r, 500, "model", "model_load_failed", "'broken' could not be loaded")
    assert str(FIXTURES) not in r.text and "broken-Q8_0.gguf" not in r.text       # the reason is the log's
    wait_until(lambda: "model broken failed to load: ModelError: " in log.read_text())
    assert "broken-Q8_0.gguf" in log.read_text()
    assert health(base)["model"] == MODEL and switches(base) == before
    ok = chat(base, MODEL)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == pairs[2][MODEL]


def test_a_model_that_fails_to_load_fails_its_request_and_the_server_goes_on(two, pairs):
    base, log = two
    before = switches(base)
    r = chat(base, "mismatched", mode="gundam")       # its layout is its mmproj's: OCR 2
    assert_error(r, 500, "model", "model_load_failed", "'mismatched' could not be loaded")
    assert "mmproj-tiny-dsocr2" not in r.text                                    # the reason is the log's
    assert health(base)["model"] is None
    wait_until(lambda: "model mismatched failed to load: ModelError: " in log.read_text())
    assert "not a matching pair" in log.read_text()
    ok = chat(base, MODEL)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == pairs[2][MODEL]
    assert health(base)["model"] == MODEL and switches(base) - before == 2


def test_the_context_check_is_the_requested_models(two):
    """Over the context: refused before queueing on whichever model is asked for, the resident one (its
    engine's check) or another (its tokenizer and context read from its files), streamed or not, and no
    switch is made for a refused request."""
    base, _ = two
    assert chat(base, MODEL).status_code == 200
    before = switches(base)
    for mid in (MODEL, Q8, MODEL):
        assert_error(chat(base, mid, text=WORDS), 400, "messages", "context_length_exceeded", "the prompt is")
    r = httpx.post(base + "/v1/chat/completions", timeout=120,
                   json={"model": Q8, "messages": user_message(WORDS), "mode": "tiny", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert switches(base) == before and health(base)["model"] == MODEL
    assert health(base)["status"] == "ok" and chat(base, MODEL).status_code == 200


def test_a_dropped_engine_frees_its_weights(pairs):
    """What a switch relies on to hold one model at a time: the old engine's models go with it."""
    import gc
    import weakref

    from dsocr.runtime.engine import OcrEngine
    engine = OcrEngine(*pairs[0])
    engine.warm_up()
    models = weakref.ref(engine.lm), weakref.ref(engine.vision)
    del engine
    gc.collect()
    assert [m() for m in models] == [None, None]


# ---------------------------------------------------------------- DeepSeek-OCR beside DeepSeek-OCR 2

@pytest.fixture(scope="module")
def ocr2_pair(tmp_path_factory):
    from dsocr.convert import ConvertError, convert_checkpoint
    try:
        files = convert_checkpoint(TINY2, tmp_path_factory.mktemp("tiny2"), "f32", "f32", progress=False)
    except ConvertError as e:
        pytest.skip(f"tiny-dsocr2 does not convert yet: {e}")
    return files[0].path, files[1].path


def test_deepseek_ocr_and_deepseek_ocr_2_side_by_side(converted, ocr2_pair, tmp_path):
    v1 = converted("f32", "f32")
    texts = {MODEL: alone(*v1, "tiny", SHORT), "ocr2": alone(*ocr2_pair, "global", SHORT)}
    assert texts[MODEL] != texts["ocr2"], texts
    write_config(tmp_path, {"ocr2": ocr2_pair})
    proc, base = start_server(*v1, tmp_path, *ONE_THREAD)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [MODEL, "ocr2"]
        before = switches(base)
        for mid, mode in ((MODEL, "tiny"), ("ocr2", "global"), (MODEL, "tiny")):
            r = client.chat.completions.create(model=mid, messages=user_message(), max_tokens=SHORT,
                                               extra_body={"mode": mode})
            assert (r.model, r.choices[0].message.content) == (mid, texts[mid])
        assert switches(base) - before == 2
        assert_error(chat(base, "ocr2", mode="tiny"), 400, "mode", None, "tiny")
        assert_error(chat(base, MODEL, mode="global"), 400, "mode", None, "global")
        assert switches(base) - before == 2        # refused by their model's modes: nothing loaded
        assert health(base)["model"] == MODEL
    finally:
        proc.terminate()
        proc.wait(timeout=30)
