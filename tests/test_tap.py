"""The debug tap (runtime/tap.py): each graph hands out its intermediates under llama.cpp-style
names, once each, in graph order; a tap changes no result; only the values a tap wants come to the
host; the Recorder keeps copies. The golden comparisons through the tap are in test_language.py and
test_ocr.py."""
import numpy as np
import pytest

from dsocr.runtime import tap as tap_module
from dsocr.runtime.cpu import CPUBackend
from dsocr.runtime.gguf_file import GGUFFile
from dsocr.runtime.language import LanguageModel
from dsocr.runtime.tap import Recorder
from dsocr.runtime.vision import VisionModel

ATTENTION = ["attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "attn_out", "ffn_inp", "ffn_norm"]
ROUTER = ["ffn_moe_logits", "ffn_moe_topk", "ffn_moe_weights", "ffn_shexp"]


class CountingBackend(CPUBackend):
    """The CPU backend, counting what comes back to the host."""
    to_host_calls = 0

    def to_host(self, a):
        self.to_host_calls += 1
        return super().to_host(a)


def lm_names(p) -> list[str]:
    names = ["inp_embd"]
    for il in range(p.n_layer):
        ffn = [] if il < p.n_dense else ROUTER
        names += [f"{name}-{il}" for name in ATTENTION + ffn + ["ffn_out", "l_out"]]
    return names + ["result_norm", "result_output"]


def documented(name: str) -> bool:
    base = name.rsplit("-", 1)[0] if name[-1].isdigit() else name
    return f" {base}" in tap_module.__doc__


@pytest.fixture(scope="module")
def lm(converted):
    return LanguageModel(GGUFFile(converted("f32", "f32")[0]), CountingBackend())


@pytest.fixture(scope="module")
def vision(converted):
    return VisionModel(GGUFFile(converted("f32", "f32")[1]), CPUBackend())


def prompt(lm, m: int) -> np.ndarray:
    return np.random.default_rng(m).standard_normal((m, lm.p.n_embd)).astype(np.float32)


def test_language_graph_names_each_intermediate_once_in_graph_order(lm):
    p, m, rows = lm.p, 9, np.array([0, 4, 8])
    x = prompt(lm, m)
    rec = Recorder()
    logits = lm.forward(x.copy(), 0, lm.new_cache(m + 1, f16=False), logits_rows=rows, tap=rec)
    assert list(rec.values) == lm_names(p)
    assert all(len(v) == 1 for v in rec.values.values())
    assert all(documented(name) for name in rec.values), [n for n in rec.values if not documented(n)]
    one = {name: v[0] for name, v in rec.values.items()}
    assert np.array_equal(one["inp_embd"], x)            # a copy: forward adds into its input rows
    assert not np.array_equal(one["ffn_inp-0"], one["l_out-0"])
    assert one["result_norm"].shape == (3, p.n_embd) and np.array_equal(one["result_output"], logits)
    assert one[f"ffn_moe_topk-{p.n_dense}"].shape == (m, p.n_expert_used)
    assert one[f"ffn_moe_logits-{p.n_dense}"].shape == (m, p.n_expert)
    untapped = lm.forward(x.copy(), 0, lm.new_cache(m + 1, f16=False), logits_rows=rows)
    assert np.array_equal(untapped, logits)


def test_decode_step_is_tapped_like_a_prefill(lm):
    """One row takes the other expert path (the token's experts in one launch)."""
    x = prompt(lm, 4)
    cache = lm.new_cache(5, f16=False)
    lm.forward(x[:3].copy(), 0, cache)
    rec = Recorder("ffn_moe_*", "result_output")
    logits = lm.forward(x[3:].copy(), 3, cache, tap=rec)
    il = lm.p.n_dense
    assert list(rec.values) == [f"{name}-{i}" for i in range(il, lm.p.n_layer) for name in ROUTER[:3]] \
        + ["result_output"]
    assert rec.values[f"ffn_moe_topk-{il}"][0].shape == (1, lm.p.n_expert_used)
    assert np.array_equal(rec.values["result_output"][0], logits)


@pytest.mark.parametrize("m", [1, 6])
def test_only_wanted_values_come_to_the_host(lm, m):
    def host_copies(tap):
        lm.be.to_host_calls = 0
        lm.forward(prompt(lm, m), 0, lm.new_cache(m, f16=False), tap=tap)
        return lm.be.to_host_calls
    untapped = host_copies(None)
    assert host_copies(Recorder("no such name")) == untapped
    assert host_copies(Recorder("result_norm", "Qcur-0")) == untapped + 2


def test_vision_graph_names_each_stage_once_per_view(vision):
    p = vision.p
    pixels = np.random.default_rng(0).standard_normal((3, 128, 128)).astype(np.float32)
    rec = Recorder()
    rows = vision.encode_view(pixels, tap=rec)
    assert list(rec.values) == ["sam.inp_embd", *[f"sam.l_out-{i}" for i in range(p.sam_layers)], "sam.neck",
                                "sam.out", "clip.inp_embd", *[f"clip.l_out-{i}" for i in range(p.enc_layers)],
                                "clip.out", "projector.out"]
    assert all(documented(name) for name in rec.values), [n for n in rec.values if not documented(n)]
    one = {name: v[0] for name, v in rec.values.items()}
    assert one["sam.out"].shape == (4, p.enc_width) and one["clip.out"].shape == (5, p.enc_width)
    assert np.array_equal(one["clip.out"], one[f"clip.l_out-{p.enc_layers - 1}"])
    assert np.array_equal(one["projector.out"], rows)
    assert np.array_equal(vision.encode_view(pixels), rows)
    vision.encode_view(pixels, tap=rec)                   # a second view appends
    assert all(len(v) == 2 for v in rec.values.values())


def test_recorder_patterns_match_whole_names():
    rec = Recorder("l_out-*", "*.out")
    assert rec.wants("l_out-3") and rec.wants("sam.out") and rec.wants("clip.out")
    assert not rec.wants("sam.l_out-3") and not rec.wants("result_output") and not rec.wants("sam.outer")
    assert Recorder().wants("anything")
