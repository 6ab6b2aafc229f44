"""Decoding one sequence: its sampler, budget, text stream and result (runtime/scheduler.py runs the
forwards, several sequences at a time).

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
from dataclasses import dataclass, field

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
    "no_repeat_ngram_size": (lambda v: v is None or v >= 0, "at least 0 (0: no n-gram blocking)"),
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
    no_repeat_ngram_size: int | None = None    # None: the model's recipe (OcrEngine fills it in)
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
        n = self.p.no_repeat_ngram_size or 0       # None, with no model to say: no blocking
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


class Decoder:
    """One sequence's decoding: each forward's logits in, the next token (or the end) out, its text
    deltas and finish reason written to `result` as it goes."""

    def __init__(self, params: SamplingParams, tokenizer: TextTokenizer, prompt_ids: list[int], n_ctx_train: int,
                 result: GenerationResult):
        self.result, self.tokenizer = result, tokenizer
        result.prompt_tokens = len(prompt_ids)
        result.finish_reason = "length"
        self.n_ctx = min(n_ctx_train, len(prompt_ids) + max(0, params.max_new_tokens) + 1)
        self.budget = max(0, min(params.max_new_tokens, self.n_ctx - len(prompt_ids)))
        self.sampler = Sampler(params, tokenizer, prompt_ids)
        self.stream = tokenizer.text_stream()

    def next_token(self, logits: np.ndarray) -> tuple[int | None, str]:
        """(the token to feed next, or None when the sequence ended with this one; the text delta)."""
        ids = self.result.token_ids
        tok = self.sampler(logits, ids)
        if tok == self.tokenizer.eos_id:
            return None, self.end("stop")
        ids.append(tok)
        delta = self.stream.push(tok)
        self.result.text += delta
        if len(ids) == self.budget:
            return None, delta + self.end("length")
        return tok, delta

    def end(self, reason: str) -> str:
        """Ends the sequence: its finish reason, and the text held back for an incomplete character."""
        self.result.finish_reason = reason
        tail = self.stream.flush()
        self.result.text += tail
        return tail
