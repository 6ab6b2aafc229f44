"""Continuous batching (runtime/scheduler.py) on the tiny fixture: three requests of different
lengths and modes give the same greedy ids side by side as alone, while really sharing decode
steps; a full house waits, a cancelled sequence frees its slot at the next step, and a decoding
stream keeps getting tokens while another page is admitted (one admission unit per step)."""
import numpy as np
import pytest

from dsocr.runtime.engine import OcrEngine, OcrRequest
from dsocr.runtime.generate import GenerationResult, SamplingParams
from dsocr.runtime.language import Segment
from dsocr.runtime.preprocess import read_image_file
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
    """Policy: each step does one admission unit (a vision block, or a prefill chunk) and then one
    decode step, so a running stream gets a token per step while another page is encoded."""
    engine = OcrEngine(*converted("f32", "f32"), parallel=2)
    events = []
    running = engine.submit(request("doc_portrait_nocrop_640", 60), GenerationResult(),
                            on_delta=lambda d: events.append("running"))
    sched = engine.scheduler
    while running.state != DECODING:
        sched.step()
    late = GenerationResult()
    admitted = engine.submit(request("doc_portrait_crop", 4), late, on_delta=lambda d: events.append("admitted"))
    steps = 0
    while admitted.state != DECODING and not admitted.finished:
        before = len(running.result.token_ids)
        sched.step()
        steps += 1
        assert running.finished or len(running.result.token_ids) == before + 1   # a token every step
    # 7 views x (SAM + CLIP blocks) + 4 prefill chunks of 912 tokens: many steps, each one unit
    n_blocks = len(engine.vision.sam_blocks) + len(engine.vision.clip_blocks)
    assert steps >= min(7 * n_blocks + 4, 60 - 1) - 1
    assert events and events[0] == "running"


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
