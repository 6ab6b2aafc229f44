"""Continuous batching (runtime/scheduler.py) on the tiny fixture: three requests of different
lengths and modes give the same greedy ids side by side as alone, while really sharing decode
steps; a full house waits, a cancelled sequence frees its slot at the next step, and a decoding
stream keeps getting tokens while another page is admitted (one admission unit per step)."""
import json

import numpy as np
import pytest

from dsocr.runtime.engine import DEFAULT_PROMPT, OcrEngine, OcrRequest
from dsocr.runtime.generate import GenerationResult, SamplingParams
from dsocr.runtime.language import Segment
from dsocr.runtime.preprocess import ViewConfig, read_image_file
from dsocr.runtime.scheduler import DECODING

from conftest import TINY
from test_ocr import case, view_of

# different prompt lengths (912, 278 and 120 tokens: 4, 2 and 1 prefill chunks of 256) and modes
# (tiles, a crop-mode image that fits one tile, a 640 view), each its own token budget: the first
# decodes while the other two are admitted (one unit per step), then all three decode together
REQUESTS = [("doc_portrait_crop", 120), ("small_cropmode_noslices", 60), ("doc_portrait_nocrop_640", 40)]


def request(name: str, max_new: int) -> OcrRequest:
    meta, _ = case(name)
    return OcrRequest([read_image_file(TINY / meta["image"])], meta["prompt"], view_of(meta),
                      SamplingParams(max_new_tokens=max_new))


def record_batches(engine) -> list[int]:
    """The number of sequences in each decode step from now on."""
    sizes, step = [], engine.scheduler._decode_step
    engine.scheduler._decode_step = lambda seqs: (sizes.append(len(seqs)), step(seqs))
    return sizes


@pytest.mark.parametrize("types", [("f32", "f32"), ("q8_0", "f16")], ids=["f32", "q8_0"])
def test_batched_greedy_ids_equal_each_request_alone(converted, types):
    engine = OcrEngine(*converted(*types), parallel=3)
    alone = [engine.run(request(*r)).token_ids for r in REQUESTS]
    if types == ("f32", "f32"):      # the F32 pair alone reproduces the PyTorch goldens' 16 tokens
        assert [a[:16] == list(case(name)[1]["generated_ids"]) for a, (name, _) in zip(alone, REQUESTS)] == [True] * 3
    sizes = record_batches(engine)
    results = [GenerationResult() for _ in REQUESTS]
    seqs = [engine.submit(request(*r), res) for r, res in zip(REQUESTS, results)]
    texts = ["".join(engine.scheduler.stream(s)) for s in seqs]
    assert max(sizes) == 3 and sizes.count(3) >= 4          # the three really decoded together
    assert [r.token_ids for r in results] == alone
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert texts == [r.text for r in results]


def test_full_house_waits_and_a_cancelled_sequence_frees_its_slot(converted):
    engine = OcrEngine(*converted("f32", "f32"), parallel=2)
    alone = engine.run(request("doc_portrait_nocrop_640", 8)).token_ids
    cancel = {"now": False}
    results = [GenerationResult() for _ in range(3)]
    first = engine.submit(request("small_cropmode_noslices", 200), results[0], cancelled=lambda: cancel["now"])
    second = engine.submit(request("doc_portrait_nocrop_640", 8), results[1])
    third = engine.submit(request("doc_portrait_nocrop_640", 8), results[2])
    sched = engine.scheduler
    while not (first.state == DECODING and len(results[0].token_ids) >= 2):
        sched.step()
    assert third in sched.queue and sched.running == 2      # two slots: the third waits
    cancel["now"] = True
    sched.step()
    assert first.finished and results[0].finish_reason == "cancelled" and first.cache is None
    assert third not in sched.queue                        # admitted in the step that freed the slot
    for s in (second, third):
        list(sched.stream(s))
    assert results[1].token_ids == results[2].token_ids == alone
    assert sched.idle


def test_a_decoding_stream_keeps_its_pace_while_a_page_is_admitted(converted):
    """Policy: each step spends on admission (vision blocks, prefill chunks) about as long as the last
    decode step took, never more than that plus one unit, then decodes: a running stream gets a token
    every step while another page is encoded."""
    import time
    engine = OcrEngine(*converted("f32", "f32"), parallel=2)
    sched = engine.scheduler
    running = engine.submit(request("doc_portrait_nocrop_640", 200), GenerationResult())
    while running.state != DECODING:
        sched.step()
    units, unit = [], sched._admission_unit

    def timed_unit(seq):
        t = time.perf_counter()
        unit(seq)
        units.append(time.perf_counter() - t)
    sched._admission_unit = timed_unit
    admitted = engine.submit(request("doc_portrait_crop", 4), GenerationResult())
    steps = 0
    while admitted.state != DECODING and not admitted.finished:
        before, budget, n_units = len(running.result.token_ids), sched.decode_step_s, len(units)
        sched.step()
        steps += 1
        assert running.finished or len(running.result.token_ids) == before + 1   # a token every step
        spent = units[n_units:]
        assert len(spent) >= 1 and sum(spent[:-1]) < budget                    # the last unit may overrun
    assert not running.finished and steps > 4       # 7 views' blocks and 4 chunks, spread over steps


def test_forward_batch_rows_equal_separate_forwards(converted):
    """The model's batched forward: two sequences' rows (a prefill chunk and a decode row) in one
    forward give each sequence's logits as its own forward does, within float rounding."""
    engine = OcrEngine(*converted("f32", "f32"))
    lm = engine.lm
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, lm.p.n_embd)).astype(np.float32) * 0.1 for n in (5, 3))
    ca, cb = lm.new_cache(16), lm.new_cache(16)
    lm.forward(a[:4].copy(), 0, ca)                       # a: 4 rows already in its cache
    want = np.concatenate([lm.forward(a[4:].copy(), 4, ca, "all"), lm.forward(b.copy(), 0, cb, "all")])
    ca2, cb2 = lm.new_cache(16), lm.new_cache(16)
    lm.forward(a[:4].copy(), 0, ca2)
    got = lm.forward_batch(np.concatenate([a[4:], b]), [Segment(0, 1, 4, ca2), Segment(1, 3, 0, cb2)],
                           np.arange(4))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_the_pages_of_one_pdf_decode_together_in_dsocr_ocr(converted, tmp_path, monkeypatch, capsys):
    """`dsocr ocr doc.pdf` submits every page before streaming the first, so the pages share decode
    steps; each page's ids are still what it gives alone, and the text comes out in page order."""
    from dsocr.cli.main import main
    from dsocr.runtime import scheduler
    from dsocr.runtime.pdf import render_pages
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "config.toml"))
    src = read_image_file(TINY / "images" / "small_note.png")
    pdf = tmp_path / "doc.pdf"
    src.save(pdf, save_all=True, append_images=[src.rotate(90, expand=True), src.resize((300, 200))], resolution=72)
    lm, mm = converted("f32", "f32")
    sizes, step = [], scheduler.Scheduler._decode_step
    monkeypatch.setattr(scheduler.Scheduler, "_decode_step", lambda self, seqs: (sizes.append(len(seqs)),
                                                                                 step(self, seqs)))
    args = ["ocr", str(pdf), "--model", str(lm), "--mmproj", str(mm), "--mode", "tiny", "-n", "40", "--json", "-q"]
    assert main(args + ["--parallel", "3"]) == 0
    pages = json.loads(capsys.readouterr().out)["pages"]
    assert max(sizes) == 3
    engine = OcrEngine(lm, mm)
    alone = [engine.run(OcrRequest([img], DEFAULT_PROMPT, ViewConfig.from_mode("tiny"),
                                   SamplingParams(max_new_tokens=40))).token_ids
             for _, img in render_pages(pdf, None, 10**8)]
    assert [p["page"] for p in pages] == [1, 2, 3] and [p["token_ids"] for p in pages] == alone
