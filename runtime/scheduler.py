"""Continuous batching: the sequences of many requests share each forward of the language model.

A sequence holds a slot (its own KV cache, sampler and budget) from admission to its end; at most
`parallel` sequences do, the rest wait in order. One step of the scheduler:
  1. ends the sequences whose client went away (a slot is free at once);
  2. gives free slots to waiting sequences, oldest first;
  3. admits: units of admission work for the oldest admitted sequences still reading their prompts,
     for as long as the last decode step took (at least one unit). A unit is one step of a prompt
     (the engine's prompt yields between vision blocks: a SAM or CLIP layer of one view) or one
     prefill chunk of `prefill_chunk` tokens; the chunk that ends a prompt samples its first token;
  4. runs one decode step: one forward over the newest token of every decoding sequence (weight
     products over all their rows, attention per sequence over its own cache), then each samples.
Admission and decoding thus share the time half and half while both have work, and a decoding
stream waits at most a decode step plus one unit longer than its own step between two tokens
(bench/server_load.py measures the worst gap). A sequence's prefill chunks depend only on itself, and a decode step
computes each row on its own (the backend's GEMV row by row, routed experts per token) up to the
backend's GEMV row count, so greedy ids do not depend on what else ran (tests/test_batching.py).
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from dsocr.runtime.generate import Decoder, GenerationResult, SamplingParams
from dsocr.runtime.language import LanguageModel, Segment

DEFAULT_PARALLEL = 4     # sequences decoding together (each KV cache is committed only as it fills)
PREFILL_CHUNK = 256      # prompt tokens per prefill forward: ~1 s on two cores, the longest pause a stream sees

WAITING, ADMITTING, DECODING, DONE = "waiting", "admitting", "decoding", "done"
T = TypeVar("T")


class Sequence:
    """One request's sequence. `prompt` is (embeddings, ids), or a generator that yields between units
    of work and returns them. Text deltas go to `on_delta`, or wait in `unread` for Scheduler.stream."""

    def __init__(self, prompt, params: SamplingParams, result: GenerationResult,
                 on_delta: Callable[[str], None] | None, on_done: Callable[[Sequence], None] | None,
                 cancelled: Callable[[], bool]):
        self.prompt, self.params, self.result = prompt, params, result
        self.on_delta, self.on_done, self.cancelled = on_delta, on_done, cancelled
        self.state = WAITING
        self.unread: deque[str] = deque()
        self.error: BaseException | None = None
        self.embeds = self.ids = self.cache = self.decoder = None
        self.pos = 0                     # prompt rows in the cache, then the position of `next`
        self.next: int | None = None     # the sampled token the next decode step feeds
        self.prefill_s = 0.0
        self.decode_t0 = 0.0
        self.last_token_t = 0.0
        self.max_token_gap_s = 0.0       # the longest wait between two of its tokens

    @property
    def finished(self) -> bool:
        return self.state == DONE


class Scheduler:
    def __init__(self, lm: LanguageModel, tokenizer, parallel: int = DEFAULT_PARALLEL,
                 prefill_chunk: int = PREFILL_CHUNK):
        if parallel < 1 or prefill_chunk < 1:
            raise ValueError("parallel and prefill_chunk must be at least 1")
        self.lm, self.tokenizer, self.be = lm, tokenizer, lm.be
        self.parallel, self.prefill_chunk = parallel, prefill_chunk
        self.queue: deque[Sequence] = deque()
        self.slots: list[Sequence] = []
        self.decode_step_s = 0.0         # the last decode step's time: admission's share of the next step
        # per batch size: decode steps run and their seconds (what /metrics and bench/server_load.py read)
        self.decode_steps: dict[int, int] = {}
        self.decode_seconds: dict[int, float] = {}

    def submit(self, prompt, params: SamplingParams, result: GenerationResult, on_delta=None, on_done=None,
               cancelled: Callable[[], bool] = lambda: False) -> Sequence:
        seq = Sequence(prompt, params, result, on_delta, on_done, cancelled)
        self.queue.append(seq)
        return seq

    def submit_ahead(self, items: Iterable[T], submit: Callable[[T], Sequence]) -> Iterator[tuple[T, Sequence]]:
        """(item, submit(item)) for each of `items`, in order, `parallel` of them submitted before the first
        is handed out: the caller streams each to its end, then asks for the next, and only then is one more
        item read and submitted. So the submitted ones decode together while `items` (a PDF's pages,
        rendered as they are read) is read at most `parallel` ahead of the one being streamed. Sequences
        not streamed to their end when the caller stops (or an item or a submit fails) are cancelled."""
        window: deque[tuple[T, Sequence]] = deque()
        try:
            for item in items:
                window.append((item, submit(item)))
                if len(window) == self.parallel:
                    yield window[0]
                    window.popleft()
            while window:
                yield window[0]
                window.popleft()
        finally:
            for _, seq in window:
                self.cancel(seq)

    def cancel(self, seq: Sequence) -> None:
        """Ends a sequence nobody will read any more (finish reason "cancelled"): its slot is free at once."""
        if not seq.finished:
            self._end(seq, "cancelled")

    @property
    def running(self) -> int:
        return len(self.slots)

    @property
    def idle(self) -> bool:
        return not self.slots and not self.queue

    def stream(self, seq: Sequence) -> Iterator[str]:
        """Steps the scheduler until `seq` ends, yielding its text as it comes (other sequences run too)."""
        while True:
            while seq.unread:
                yield seq.unread.popleft()
            if seq.finished:
                if seq.error is not None:
                    raise seq.error
                return
            self.step()

    def step(self) -> None:
        for seq in [s for s in (*self.slots, *self.queue) if s.cancelled()]:
            self._end(seq, "cancelled")
        while self.queue and len(self.slots) < self.parallel:
            seq = self.queue.popleft()
            seq.state = ADMITTING
            self.slots.append(seq)
        t_end = time.perf_counter() + self.decode_step_s
        while (admitting := next((s for s in self.slots if s.state == ADMITTING), None)) is not None:
            self._guarded([admitting], self._admission_unit, admitting)
            if time.perf_counter() >= t_end:
                break
        decoding = [s for s in self.slots if s.state == DECODING]
        self.decode_step_s = 0.0
        if decoding:
            t0 = time.perf_counter()
            self._guarded(decoding, self._decode_step, decoding)
            self.decode_step_s = time.perf_counter() - t0
            n = len(decoding)
            self.decode_steps[n] = self.decode_steps.get(n, 0) + 1
            self.decode_seconds[n] = self.decode_seconds.get(n, 0.0) + self.decode_step_s

    def _guarded(self, seqs: list[Sequence], work, *args) -> None:
        # a failure ends the sequences it touched (their clients get the error), not the scheduler
        try:
            work(*args)
        except Exception as e:
            for seq in seqs:
                if not seq.finished:
                    seq.error = e
                    self._end(seq, "error")

    def _admission_unit(self, seq: Sequence) -> None:
        if seq.ids is None:
            if isinstance(seq.prompt, tuple):
                seq.embeds, seq.ids = seq.prompt
            else:
                try:
                    next(seq.prompt)
                    return
                except StopIteration as done:
                    seq.embeds, seq.ids = done.value
            seq.prompt = None
            seq.decoder = Decoder(seq.params, self.tokenizer, seq.ids, self.lm.p.n_ctx_train, seq.result)
            if seq.decoder.budget == 0:
                self._end(seq, "length")
                return
            seq.cache = self.lm.new_cache(seq.decoder.n_ctx)
        a = seq.pos
        b = min(len(seq.ids), a + self.prefill_chunk)
        t0 = time.perf_counter()
        logits = self.lm.forward(self.be.rows(seq.embeds, a, b), a, seq.cache)
        last = self.be.to_host(logits)[-1] if b == len(seq.ids) else None
        seq.prefill_s += time.perf_counter() - t0
        seq.pos = b
        if last is not None:
            seq.embeds = None
            seq.state = DECODING
            seq.decode_t0 = time.perf_counter()
            self._sample(seq, last)

    def _decode_step(self, seqs: list[Sequence]) -> None:
        x = self.lm.embed([s.next for s in seqs])
        logits = self.be.to_host(self.lm.forward_batch(x, [Segment(i, 1, s.pos, s.cache) for i, s in enumerate(seqs)]))
        for seq, row in zip(seqs, logits):
            seq.pos += 1
            self._sample(seq, row)

    def _sample(self, seq: Sequence, logits: np.ndarray) -> None:
        now = time.perf_counter()
        if seq.last_token_t:
            seq.max_token_gap_s = max(seq.max_token_gap_s, now - seq.last_token_t)
        else:
            seq.result.timings["first_token_at"] = now       # perf_counter time, for time-to-first-token
        seq.last_token_t = now
        tok, delta = seq.decoder.next_token(logits)
        self._emit(seq, delta)
        if tok is None:
            self._end(seq)
        else:
            seq.next = tok

    def _emit(self, seq: Sequence, delta: str) -> None:
        if not delta:
            return
        if seq.on_delta is not None:
            seq.on_delta(delta)
        else:
            seq.unread.append(delta)

    def _end(self, seq: Sequence, reason: str | None = None) -> None:
        """Frees the sequence's slot; `reason` (cancelled, error, length before decoding) overrides the
        decoder's own."""
        if seq in self.slots:
            self.slots.remove(seq)
        elif seq in self.queue:
            self.queue.remove(seq)
        if reason is not None:
            self._emit(seq, seq.decoder.end(reason) if seq.decoder else "")
            seq.result.finish_reason = reason
        if seq.decoder is not None:
            n, prefill = len(seq.result.token_ids), max(seq.prefill_s, 1e-9)
            decode = time.perf_counter() - seq.decode_t0 if seq.decode_t0 else 0.0
            seq.result.timings.update(prefill_s=seq.prefill_s, decode_s=decode, prefill_tok_s=len(seq.ids) / prefill,
                                      decode_tok_s=max(n - 1, 0) / max(decode, 1e-9),
                                      max_token_gap_s=seq.max_token_gap_s)
        if isinstance(seq.prompt, Iterator):
            seq.prompt.close()           # a prompt still encoding its views lets them go
        seq.prompt = seq.embeds = seq.cache = None
        seq.state = DONE
        if seq.on_done is not None:
            seq.on_done(seq)


def generate(lm: LanguageModel, tokenizer, prompt_embeds, prompt_ids: list[int], params: SamplingParams,
             result: GenerationResult | None = None, cancelled=lambda: False) -> Iterator[str]:
    """Yields text deltas of one sequence from its prompt embeddings; `result` (if given) is filled in as
    decoding goes (ids, text, reason, timings): a scheduler with this one sequence."""
    scheduler = Scheduler(lm, tokenizer, parallel=1)
    seq = scheduler.submit((prompt_embeds, prompt_ids), params,
                           result if result is not None else GenerationResult(), cancelled=cancelled)
    yield from scheduler.stream(seq)
