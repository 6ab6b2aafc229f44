"""The language model and tokenizer on the tiny fixture, against the PyTorch goldens.

Tolerances: logits and hidden states of F32 files within 1e-4 of the golden arrays relative to
their largest magnitude (measured: ~6e-7); MoE top-k indices equal; greedy ids equal.
A Q8_0 model's logits move by up to ~0.3 on this tiny random model (measured teacher-forced: Q8_0
error flips near-tied router choices), so it must keep its deviation under Q8_DEVIATION and may
leave the golden ids only at a step whose golden top-2 margin is below its own measured deviation
(doc_portrait_nocrop_640 has a 0.0017 tie at step 10)."""
import codecs
import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from dsocr.runtime.cpu import CPUBackend
from dsocr.runtime.generate import GenerationResult, SamplingParams, banned_ngram_tokens
from dsocr.runtime.scheduler import generate
from dsocr.runtime.gguf_file import GGUFFile
from dsocr.runtime.language import LanguageModel
from dsocr.runtime.tap import Recorder
from dsocr.runtime.tokenizer import TextTokenizer

from conftest import CASES, TINY, check_near_ties, teacher_forced_deviation

Q8_DEVIATION = 0.5
CORPUS = ["<image>\n<|grounding|>Convert the document to markdown.", "<image>\nFree OCR.", "Hello, world!",
          "| a | b |\n|---|---|\n| 1 | 2 |", "<td>x</td><tr></tr>", "日本語のテキストと中文，还有한국어",
          "emoji 😀🎉 and 👩‍👩‍👧", "<|ref|>title<|/ref|><|det|>[[12, 34, 560, 78]]<|/det|>", "12345 678.9 1e10",
          "  spaces\t\ttabs\n\n\r\n", "<｜begin▁of▁sentence｜>x<｜end▁of▁sentence｜>", "café naïve Ελληνικά",
          "```python\nprint('x')\n```", "$$\\frac{a}{b}$$"]

DEEPSEEK_V3_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
    {"type": "Split", "pattern": {"Regex": "[一-龥぀-ゟ゠-ヿ]+"}, "behavior": "Isolated", "invert": False},
    {"type": "Split", "pattern": {"Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}"
                                           "\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


@pytest.fixture(scope="module")
def goldens():
    return {c: np.load(TINY / "golden" / f"{c}.npz") for c in CASES}


def golden_greedy(lm, z, f16_cache=False):
    x = z["inputs_embeds"].copy()
    cache = lm.new_cache(x.shape[0] + 16, f16=f16_cache)
    last = lm.forward(x, 0, cache)[-1]
    ids = []
    for s in range(16):
        ids.append(int(np.argmax(last)))
        last = lm.forward(lm.embed([ids[-1]]), x.shape[0] + s, cache)[-1]
    return ids


@pytest.mark.parametrize("source", ["ours", "llama.cpp"])
def test_f32_model_matches_goldens(converted, llamacpp_file, goldens, source):
    path = converted("f32", "f32")[0] if source == "ours" else llamacpp_file("tiny-dsocr-lm-f32.gguf")
    lm = LanguageModel(GGUFFile(path), CPUBackend())
    # HF's hidden states: each layer's input, then the final norm (of the logits rows, the same rows)
    layer_inputs = ["inp_embd"] + [f"l_out-{i}" for i in range(lm.p.n_layer - 1)]
    for case, z in goldens.items():
        assert np.array_equal(z["hidden_states_rows"], z["logits_rows"]), case
        x = z["inputs_embeds"].copy()
        rec = Recorder(*layer_inputs, "result_norm", "ffn_moe_topk-*", "ffn_moe_weights-*")
        logits = lm.forward(x, 0, lm.new_cache(x.shape[0], f16=False), logits_rows=z["logits_rows"], tap=rec)
        gl = z["logits"]
        assert np.abs(logits - gl).max() / np.abs(gl).max() < 1e-4, case
        hs = np.array([rec.values[name][0][z["hidden_states_rows"]] for name in layer_inputs]
                      + [rec.values["result_norm"][0]])
        assert np.abs(hs - z["hidden_states"]).max() / np.abs(z["hidden_states"]).max() < 1e-4, case
        for layer in (1, 2):
            topk, weights = rec.values[f"ffn_moe_topk-{layer}"][0], rec.values[f"ffn_moe_weights-{layer}"][0]
            assert np.array_equal(topk, z[f"moe_topk_idx_layer{layer}"]), (case, layer)
            assert np.allclose(weights, z[f"moe_topk_weight_layer{layer}"], rtol=1e-4, atol=1e-6)
        assert golden_greedy(lm, z) == list(z["generated_ids"]), case


def test_decode_step_logits_and_f16_cache(converted, goldens):
    lm = LanguageModel(GGUFFile(converted("f32", "f32")[0]), CPUBackend())
    z = goldens["wide_free_ocr_crop"]
    x = z["inputs_embeds"].copy()
    cache = lm.new_cache(x.shape[0] + 16, f16=False)
    last = lm.forward(x, 0, cache)[-1]
    for s in range(16):
        ref = z["step_logits"][s]
        assert np.abs(last - ref).max() / np.abs(ref).max() < 1e-4, s
        last = lm.forward(lm.embed([int(z["generated_ids"][s])]), x.shape[0] + s, cache)[-1]
    assert golden_greedy(lm, z, f16_cache=True) == list(z["generated_ids"])


def test_q8_0_model_follows_goldens_up_to_near_ties(converted, goldens):
    lm = LanguageModel(GGUFFile(converted("q8_0", "q8_0")[0]), CPUBackend())
    deviation = max(teacher_forced_deviation(lm, z["inputs_embeds"].copy(), z) for z in goldens.values())
    assert deviation < Q8_DEVIATION
    check_near_ties({c: golden_greedy(lm, z, f16_cache=True) for c, z in goldens.items()}, goldens, deviation)


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory):
    """The tiny checkpoint with DeepSeek-V3's pre-tokenizer (the real model's), converted."""
    from dsocr.convert import convert_checkpoint
    folder = tmp_path_factory.mktemp("v3tok") / "ckpt"
    shutil.copytree(TINY, folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = DEEPSEEK_V3_PRE_TOKENIZER
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    lm = convert_checkpoint(folder, folder.parent / "out", "f32", "f32", progress=False)[0].path
    return Tokenizer.from_file(str(folder / "tokenizer.json")), GGUFFile(lm)


def test_both_tokenizer_routes_equal_the_original(v3_checkpoint):
    original, f = v3_checkpoint
    embedded, rebuilt = TextTokenizer.from_gguf(f), TextTokenizer.from_gguf(f, prefer_hf_json=False)
    assert (embedded.source, rebuilt.source) == ("tokenizer.huggingface.json", "tokenizer.ggml")
    for text in CORPUS:
        ids = original.encode(text, add_special_tokens=False).ids
        assert embedded.encode(text) == ids, text
        assert rebuilt.encode(text) == ids, text
        assert embedded.decode(ids) == rebuilt.decode(ids) == original.decode(ids, skip_special_tokens=False)


def test_tiny_tokenizer_from_llamacpp_file_gives_golden_prompt_ids(llamacpp_file):
    tok = TextTokenizer.from_gguf(GGUFFile(llamacpp_file("tiny-dsocr-lm-f32.gguf")))
    assert tok.source == "tokenizer.ggml" and tok.token_id("<image>") == 1005
    for case in CASES:
        meta = json.loads((TINY / "golden" / f"{case}.json").read_text())
        ids = np.load(TINY / "golden" / f"{case}.npz")["input_ids"]
        text = meta["formatted_prompt"].split("<image>")[1]
        assert tok.encode(text) == list(ids[1 + meta["num_image_tokens"]:]), case


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable-character table of byte-level BPE (the reference for token bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def reference_deltas(tok: TextTokenizer, ids: list[int]) -> list[str]:
    """Each token's bytes (added tokens: their text) through Python's incremental UTF-8 decoder."""
    chars = {c: b for b, c in gpt2_byte_chars().items()}
    added = set(tok.tok.get_added_tokens_decoder())
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    return [dec.decode(tok.decode([i]).encode() if i in added else bytes(chars[c] for c in tok.tok.id_to_token(i)))
            for i in ids] + [dec.decode(b"", final=True)]


def test_text_stream_deltas_on_the_corpus_and_the_golden_ids(v3_checkpoint):
    """tokenizers' DecodeStream releases exactly what an incremental UTF-8 decoder of the token bytes
    does on multilingual text (split characters, emoji, special tokens). The golden outputs of the
    random-weight model hold stray bytes, which DecodeStream keeps back until a character completes
    (the reference shows U+FFFD at once): there the whole text must agree."""
    original, f = v3_checkpoint
    tok = TextTokenizer.from_gguf(f)
    golden = [[int(i) for i in np.load(TINY / "golden" / f"{c}.npz")["generated_ids"]] for c in CASES]
    for ids in [tok.encode(text) for text in CORPUS] + golden:
        stream = tok.text_stream()
        deltas = [stream.push(i) for i in ids] + [stream.flush()]
        reference = reference_deltas(tok, ids)
        if "\ufffd" not in "".join(reference):
            assert deltas == reference, ids
        assert "".join(deltas) == "".join(reference) == tok.decode(ids), ids


def test_text_stream_never_splits_a_character_and_adds_up_on_invalid_bytes(v3_checkpoint):
    tok = TextTokenizer.from_gguf(v3_checkpoint[1])
    chars = gpt2_byte_chars()
    data = "a日😀é".encode()
    stream = tok.text_stream()
    out = [stream.push(tok.token_id(chars[b])) for b in data]
    assert "".join(out) == "a日😀é" and out.count("") == len(data) - 4
    rng = np.random.default_rng(0)      # random ids: stray continuation bytes, cut characters
    for _ in range(50):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, 40)]
        stream = tok.text_stream()
        assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tok.decode(ids)


def test_no_repeat_ngram_rules():
    hist = [1, 2, 3, 9, 1, 2]
    assert banned_ngram_tokens(hist, 3, 0) == {3}          # 1 2 -> 3 seen before
    assert banned_ngram_tokens(hist, 3, 2) == set()        # outside the window
    assert banned_ngram_tokens(hist, 2, 0) == {3}          # 2 -> 3
    assert banned_ngram_tokens([5, 5, 5], 2, 0) == {5}


@pytest.fixture(scope="module")
def tiny_lm(converted):
    f = GGUFFile(converted("f32", "f32")[0])
    return LanguageModel(f, CPUBackend()), TextTokenizer.from_gguf(f)


def run(tiny_lm, z, **kw):
    lm, tok = tiny_lm
    res = GenerationResult()
    text = "".join(generate(lm, tok, z["inputs_embeds"].copy(), list(z["input_ids"]), SamplingParams(**kw), res))
    return res, text


def test_generate_greedy_reproduces_golden_text_and_counts(tiny_lm, goldens):
    z = goldens["small_cropmode_noslices"]
    res, text = run(tiny_lm, z, max_new_tokens=16, ngram_mode="off")
    assert res.token_ids == list(z["generated_ids"]) and res.finish_reason == "length"
    assert text == res.text == tiny_lm[1].decode(res.token_ids)
    assert res.prompt_tokens == len(z["input_ids"]) and res.timings["prefill_s"] > 0


def test_windowed_ngram_blocking_breaks_the_golden_loop(tiny_lm, goldens):
    """The golden output loops ' Quarterly 166 Date 166 Date ...' (period 4): with 3-grams banned the
    repeat is broken, and no 3-gram repeats inside the window."""
    z = goldens["small_cropmode_noslices"]
    res, _ = run(tiny_lm, z, max_new_tokens=16, no_repeat_ngram_size=3, ngram_window=90)
    ids = res.token_ids
    assert ids != list(z["generated_ids"])
    grams = [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]
    assert len(grams) == len(set(grams))


def test_context_ngram_blocking_counts_the_prompt(tiny_lm, goldens):
    z = goldens["small_cropmode_noslices"]
    res, _ = run(tiny_lm, z, max_new_tokens=12, no_repeat_ngram_size=2, ngram_mode="context")
    seq = list(z["input_ids"]) + res.token_ids
    grams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
    gen_grams = grams[len(z["input_ids"]) - 1:]
    assert all(grams.count(g) == 1 for g in gen_grams)


def test_sampling_is_reproducible_with_a_seed(tiny_lm, goldens):
    z = goldens["doc_portrait_nocrop_640"]
    a, _ = run(tiny_lm, z, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7, ngram_mode="off")
    b, _ = run(tiny_lm, z, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7, ngram_mode="off")
    c, _ = run(tiny_lm, z, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=8, ngram_mode="off")
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_stops_on_eos(tiny_lm, goldens, monkeypatch):
    """With the eos id set to the golden third token, generation stops there with reason 'stop'."""
    lm, tok = tiny_lm
    z = goldens["small_cropmode_noslices"]
    monkeypatch.setattr(tok, "eos_id", int(z["generated_ids"][2]))
    res, _ = run(tiny_lm, z, max_new_tokens=16, ngram_mode="off")
    assert res.finish_reason == "stop" and res.token_ids == list(z["generated_ids"][:2])
