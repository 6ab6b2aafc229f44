"""Decoding: prefill the prompt, then one token at a time with the KV cache.

Greedy by default (temperature 0, or top_p 0); temperature / top-k / top-p sampling with a seed.
Loops are blocked by a no-repeat n-gram rule, in two variants:
* "window" (default): DeepSeek-OCR's official vLLM recipe - over the last `ngram_window`
  generated tokens, a token that would repeat an n-gram of size `no_repeat_ngram_size` is
  banned unless whitelisted (`<td>`, `</td>`: tables repeat legitimately);
* "context": Hugging Face's no_repeat_ngram_size, over the whole sequence, prompt included.
Text comes out as deltas decoded incrementally from token bytes, never splitting a UTF-8
character and never re-decoding the whole output.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from dsocr.runtime.errors import InputError
from dsocr.runtime.tokenizer import TextTokenizer

NGRAM_MODES = ("window", "context", "off")

# the values decoding accepts, per field: (test, the rule in words); NaN fails every comparison
SAMPLING_RANGES = {
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "temperature": (lambda v: 0 <= v < math.inf, "a finite number >= 0 (0: greedy)"),
    "top_p": (lambda v: 0 <= v <= 1, "between 0 and 1 (0: greedy)"),
    "top_k": (lambda v: v >= 0, "at least 0 (0: no top-k cut)"),
    "seed": (lambda v: v is None or v >= 0, "at least 0"),
    "no_repeat_ngram_size": (lambda v: v >= 0, "at least 0 (0: no n-gram blocking)"),
    "ngram_window": (lambda v: v >= 0, "at least 0"),
    "ngram_mode": (lambda v: v in NGRAM_MODES, " or ".join(NGRAM_MODES)),
}


@dataclass
class SamplingParams:
    max_new_tokens: int = 8192
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    no_repeat_ngram_size: int = 30
    ngram_window: int = 90
    ngram_mode: str = "window"           # "window" | "context" | "off"
    ngram_whitelist: tuple[str, ...] = ("<td>", "</td>")

    def validate(self, name=lambda field: field) -> None:
        """Refuses a value outside SAMPLING_RANGES with InputError; `name(field)` is how the caller spells
        the field in the message (e.g. the command-line flag)."""
        for f, (ok, rule) in SAMPLING_RANGES.items():
            v = getattr(self, f)
            if not ok(v):
                raise InputError(f"{name(f)} must be {rule}, not {v!r}")

    @property
    def greedy(self) -> bool:
        """top_p 0 keeps only the likeliest token, as temperature 0 does."""
        return self.temperature <= 0 or self.top_p <= 0


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    timings: dict = field(default_factory=dict)


def banned_ngram_tokens(history: list[int], n: int, start: int) -> set[int]:
    """Tokens t such that history[-(n-1):] + [t] already occurs as an n-gram in history[start:]."""
    if n <= 0 or len(history) - start < n:
        return set()
    prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
    banned = set()
    for i in range(start, len(history) - n + 1):
        if tuple(history[i:i + n - 1]) == prefix:
            banned.add(history[i + n - 1])
    return banned


class Sampler:
    def __init__(self, params: SamplingParams, tokenizer: TextTokenizer, prompt_ids: list[int]):
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.prompt = list(prompt_ids)
        self.whitelist = {i for t in params.ngram_whitelist if (i := tokenizer.tok.token_to_id(t)) is not None}

    def banned(self, generated: list[int]) -> set[int]:
        n = self.p.no_repeat_ngram_size
        if self.p.ngram_mode == "window":
            return banned_ngram_tokens(generated, n, max(0, len(generated) - self.p.ngram_window)) - self.whitelist
        if self.p.ngram_mode == "context":
            return banned_ngram_tokens(self.prompt + generated, n, 0)
        return set()

    def __call__(self, logits: np.ndarray, generated: list[int]) -> int:
        logits = np.array(logits, dtype=np.float64)
        for t in self.banned(generated):
            if t < logits.size:
                logits[t] = -np.inf
        if self.p.greedy:
            return int(np.argmax(logits))
        with np.errstate(over="ignore"):   # shifted first: the top logit is 0, a tiny temperature sends the rest to -inf
            z = (logits - logits.max()) / self.p.temperature
        if self.p.top_k > 0 and self.p.top_k < z.size:
            kth = np.partition(z, -self.p.top_k)[-self.p.top_k]
            z[z < kth] = -np.inf
        probs = np.exp(z)
        probs /= probs.sum()
        if self.p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            keep = np.cumsum(probs[order]) - probs[order] < self.p.top_p
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


def generate(lm, tokenizer: TextTokenizer, prompt_embeds, prompt_ids: list[int], params: SamplingParams,
             result: GenerationResult | None = None, cancelled=lambda: False) -> Iterator[str]:
    """Yields text deltas; `result` (if given) is filled in as decoding goes (ids, text, reason, timings)."""
    result = result if result is not None else GenerationResult()
    result.prompt_tokens = len(prompt_ids)
    n_ctx = min(lm.p.n_ctx_train, len(prompt_ids) + max(0, params.max_new_tokens) + 1)
    budget = max(0, min(params.max_new_tokens, n_ctx - len(prompt_ids)))
    cache = lm.new_cache(n_ctx)
    sampler = Sampler(params, tokenizer, prompt_ids)
    stream = tokenizer.text_stream()
    t0 = time.perf_counter()
    logits = lm.be.to_host(lm.forward(prompt_embeds, 0, cache))[-1] if budget else None
    t1 = time.perf_counter()
    result.finish_reason = "length"
    pos = len(prompt_ids)
    for _ in range(budget):
        if cancelled():
            result.finish_reason = "cancelled"
            break
        tok = sampler(logits, result.token_ids)
        if tok == tokenizer.eos_id:
            result.finish_reason = "stop"
            break
        result.token_ids.append(tok)
        delta = stream.push(tok)
        if delta:
            result.text += delta
            yield delta
        if len(result.token_ids) == budget:
            break
        logits = lm.be.to_host(lm.forward(lm.embed([tok]), pos, cache))[-1]
        pos += 1
    tail = stream.flush()
    if tail:
        result.text += tail
        yield tail
    t2 = time.perf_counter()
    n = len(result.token_ids)
    result.timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, prefill_tok_s=len(prompt_ids) / max(t1 - t0, 1e-9),
                          decode_tok_s=max(n - 1, 0) / max(t2 - t1, 1e-9))
