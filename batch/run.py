"""Page units through one engine: up to `parallel` of them decode together (the engine's continuous
batching), each rendered only when it is about to be submitted, so a run holds at most `parallel`
pages in memory however long its documents are. A failed try is retried at once, `retry_temperature`
hotter than the last (olmOCR's remedy for a page that loops), up to `retries` times.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

from PIL import Image

from dsocr.batch.inputs import PageImages, PageUnit
from dsocr.batch.outcome import PageOutcome, is_failure, page_outcome
from dsocr.runtime.engine import DEFAULT_PROMPT, OcrEngine, OcrRequest
from dsocr.runtime.generate import GenerationResult, SamplingParams
from dsocr.runtime.preprocess import ViewConfig
from dsocr.runtime.scheduler import Sequence


@dataclass
class RetryPolicy:
    retries: int = 1                 # tries after the first
    retry_temperature: float = 0.2   # added to the temperature at each retry

    def temperature(self, base: float, attempt: int) -> float:
        """The temperature of try `attempt` (1 = the first)."""
        return round(base + (attempt - 1) * self.retry_temperature, 6)


@dataclass
class _Try:
    unit: PageUnit
    attempt: int
    temperature: float
    image: Image.Image | None = None
    result: GenerationResult | None = None
    seq: Sequence | None = None


def error_text(e: BaseException) -> str:
    """One line: our own errors say what is wrong already; anything else is named by its type."""
    from dsocr.runtime.errors import InputError, ModelError
    text = str(e) if isinstance(e, (InputError, ModelError)) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def ocr_units(engine: OcrEngine, units: Iterable[PageUnit], model: dict, view: ViewConfig,
              sampling: SamplingParams, policy: RetryPolicy = RetryPolicy(), prompt: str = DEFAULT_PROMPT,
              max_pixels: int = 64_000_000) -> Iterator[PageOutcome]:
    """Each unit's outcome (its last try's), in the order they finish. `model` goes into each record."""
    queue: deque[tuple[PageUnit, int]] = deque((u, 1) for u in units)
    running: list[_Try] = []
    images = PageImages(max_pixels)
    try:
        while queue or running:
            while queue and len(running) < engine.scheduler.parallel:
                unit, attempt = queue.popleft()
                t = _Try(unit, attempt, policy.temperature(sampling.temperature, attempt))
                try:
                    t.image = images.load(unit)
                    t.result = GenerationResult()
                    params = dataclasses.replace(sampling, temperature=t.temperature)
                    t.seq = engine.submit(OcrRequest([t.image], prompt, view, params), t.result)
                    running.append(t)
                except Exception as e:       # an unreadable page or one the engine refuses: this page fails
                    yield from _ended(t, error_text(e), policy, queue, model)
            engine.scheduler.step()
            for t in [t for t in running if t.seq.finished]:
                running.remove(t)
                yield from _ended(t, error_text(t.seq.error) if t.seq.error else None, policy, queue, model)
    finally:
        for t in running:                # a caller that stops early leaves the engine free for other work
            engine.scheduler.cancel(t.seq)
        images.close()


def _ended(t: _Try, error: str | None, policy: RetryPolicy, queue: deque, model: dict) -> Iterator[PageOutcome]:
    """The try's outcome, or its retry put first in the queue."""
    if is_failure(t.result.finish_reason if t.result else None, error) and t.attempt <= policy.retries:
        queue.appendleft((t.unit, t.attempt + 1))
        return
    yield page_outcome(t.unit, t.attempt, t.temperature, model, t.image, t.result, error)
