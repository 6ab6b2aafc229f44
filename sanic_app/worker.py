"""One engine at a time, one thread driving its scheduler, a bounded queue in front of it.

A request reserves its place in the queue before its images are fetched or decoded, so a full
queue is a 503 at once and costs nothing; the place is released if the request fails before it is
queued. Queued jobs hold their images encoded. The worker thread moves a job into the engine's
scheduler when a slot is free, decoding its images then, so only the running jobs' pixels are
alive; between moves it steps the scheduler, which decodes every running sequence together
(runtime/scheduler.py). Each job streams its events back to its handler through an asyncio queue.
A job whose client went away is cancelled: skipped if it has not started, and its sequences ended
at the next step if it has, which frees their slots.

A job of several pages (a PDF) runs each page as its own sequence; their text reaches the client
in page order, each page after a heading, a page that finishes early waiting for those before it.

The server may serve several models (ServedModel), one resident at a time. Jobs are taken in their
order whatever their model: when the next one names another model, the worker takes no more, lets
the resident model's sequences finish, drops its engine, builds and warms up the other model's, and
goes on from that job. A model that fails to load fails that job; the next job loads its own model.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from dsocr.runtime.engine import ContextCheck, OcrEngine, OcrRequest
from dsocr.runtime.errors import InputError
from dsocr.runtime.generate import GenerationResult, SamplingParams
from dsocr.runtime.pdf import PAGE_SEPARATOR, page_heading
from dsocr.runtime.preprocess import Layout, ViewConfig
from dsocr.sanic_app.errors import APIError
from dsocr.sanic_app.images import EncodedImage

log = logging.getLogger("dsocr.server")


@dataclass(frozen=True)
class ServedModel:
    """A model the server answers for: the id clients send as `model`, its GGUF pair (resolved paths),
    and its preprocess.Layout, read from the mmproj's header at start so that a request is checked
    against its model's modes before that model is loaded."""
    id: str
    lm: Path
    mmproj: Path
    layout: Layout

    @property
    def files(self) -> tuple[Path, Path]:
        return self.lm, self.mmproj

    @cached_property
    def context(self) -> ContextCheck:
        """Its prompt-length check, read from its language model's header on first use: a request for a model
        not loaded is refused before it is queued, without a switch."""
        return ContextCheck.from_file(self.lm, self.layout)


def load_failure(model: ServedModel, e: Exception) -> APIError:
    """A model whose files do not load. The reason names server paths: it goes to the log, the client
    gets the model and where to look."""
    log.error("model %s failed to load: %s: %s", model.id, type(e).__name__, e)
    return APIError(500, f"the model {model.id!r} could not be loaded (the server's log says why)", "model",
                    "model_load_failed")


@dataclass
class Job:
    pages: list[list[EncodedImage]]      # each page: the images of one sequence
    prompt: str
    view: ViewConfig
    sampling: SamplingParams
    model: ServedModel
    loop: asyncio.AbstractEventLoop
    rid: str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: GenerationResult = field(default_factory=GenerationResult)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    finished: float | None = None

    @property
    def first_token(self) -> float | None:
        """When its first token was sampled (perf_counter), shown or not."""
        return self.result.timings.get("first_token_at")

    def emit(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class PagedJob:
    """A running job's pages: their text to the client in page order, then one merged result."""

    def __init__(self, job: Job):
        n = len(job.pages)
        self.job, self.current = job, 0
        self.results = [job.result] if n == 1 else [GenerationResult() for _ in range(n)]
        self.held: list[list[str]] = [[] for _ in range(n)]
        self.ended = [False] * n
        self.error: BaseException | None = None
        self._heading(0)

    def _heading(self, i: int) -> None:
        if len(self.results) > 1:
            self.job.emit("delta", (PAGE_SEPARATOR if i else "") + page_heading(i + 1))

    def delta(self, i: int, text: str) -> None:
        if i == self.current:
            self.job.emit("delta", text)
        else:
            self.held[i].append(text)

    def done(self, i: int, seq=None) -> None:
        self.ended[i] = True
        self.error = self.error or (seq.error if seq is not None else None)
        while self.current < len(self.ended) and self.ended[self.current]:
            self.current += 1
            if self.current < len(self.ended) and self.error is None:
                self._heading(self.current)
                for text in self.held[self.current]:
                    self.job.emit("delta", text)
                self.held[self.current] = []
        if self.current == len(self.ended):
            self._finish()

    def _finish(self) -> None:
        job = self.job
        job.finished = time.perf_counter()
        if self.error is not None:
            if not _user_error(self.error):
                log.error("request %s failed", job.rid, exc_info=self.error)
            job.emit("error", self.error)
            return
        if len(self.results) > 1:
            r = job.result
            r.token_ids = [t for p in self.results for t in p.token_ids]
            r.text = PAGE_SEPARATOR.join(page_heading(i + 1) + p.text for i, p in enumerate(self.results))
            r.prompt_tokens = sum(p.prompt_tokens for p in self.results)
            r.timings.update(first_token_at=min(p.timings.get("first_token_at", math.inf) for p in self.results),
                             max_token_gap_s=max(p.timings.get("max_token_gap_s", 0.0) for p in self.results))
            r.finish_reason = "stop" if all(p.finish_reason == "stop" for p in self.results) else \
                next(p.finish_reason for p in self.results if p.finish_reason != "stop")
        job.emit("done", job.result)


class EngineWorker:
    """The engine's own thread: it builds each engine, warms it up and then serves, so that every
    numba launch comes from this one thread. (Parallel kernels launched from two threads make two
    OpenMP teams, more threads than cores, and libgomp then spins 1000 rounds instead of
    GOMP_SPINCOUNT before sleeping: each small launch paid a wake-up, and decode in the server ran at
    17 tok/s where `dsocr ocr` ran at 25. numba's thread count is per thread too.)

    `models`: what the server serves, the first loaded at start; `load(model)` builds its engine."""

    def __init__(self, load: Callable[[ServedModel], OcrEngine], models: list[ServedModel], max_queue: int):
        self.load, self.models, self.max_queue = load, models, max_queue
        # the resident model and its engine, one reference so that a reader never pairs one with the
        # other's; None after a failed load
        self.loaded: tuple[ServedModel, OcrEngine] | None = None
        self.scheduler = None
        self.parallel = 0                 # slots, once the first engine is built
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.switch_to: Job | None = None  # a job taken whose model is not resident: it waits for the drain
        self.switches = 0                 # loads of another model after the first
        self.waiting = 0                  # reserved and queued jobs (a job waiting for its model included)
        self.running = 0                  # sequences holding a slot of the scheduler
        # decode steps by batch size, of the engines dropped so far (each scheduler counts its own)
        self.past_steps: dict[int, int] = {}
        self.past_seconds: dict[int, float] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dsocr-engine", daemon=True)
        self.thread.start()

    def wait_ready(self) -> None:
        """Returns once the first engine is built and warmed up on the worker thread; re-raises its failure."""
        self.ready.wait()
        if self.failure is not None:
            raise self.failure

    @property
    def busy(self) -> bool:
        return self.running > 0

    @property
    def engine(self) -> OcrEngine | None:
        loaded = self.loaded
        return loaded[1] if loaded else None

    @property
    def resident(self) -> ServedModel | None:
        loaded = self.loaded
        return loaded[0] if loaded else None

    def engine_of(self, model: ServedModel) -> OcrEngine | None:
        """The engine serving `model` now (a model of the same files counts), or None when another model
        is resident, or none is."""
        loaded = self.loaded
        return loaded[1] if loaded and loaded[0].files == model.files else None

    def decode_steps(self) -> tuple[dict[int, int], dict[int, float]]:
        """Decode steps and their seconds by batch size, over every engine this worker has run."""
        steps, seconds = dict(self.past_steps), dict(self.past_seconds)
        sched = self.scheduler
        if sched is not None:
            for n, count in list(sched.decode_steps.items()):
                steps[n] = steps.get(n, 0) + count
            for n, s in list(sched.decode_seconds.items()):
                seconds[n] = seconds.get(n, 0.0) + s
        return steps, seconds

    def reserve(self) -> bool:
        """A place in the queue for a job about to be made; False when the queue is full."""
        with self.lock:
            if self.waiting >= self.max_queue:
                return False
            self.waiting += 1
        return True

    def release(self) -> None:
        """Gives back a reserved place whose job was never submitted (or has left the queue)."""
        with self.lock:
            self.waiting -= 1

    def submit(self, job: Job) -> None:
        """Queues a job into the place reserved for it."""
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self) -> None:
        try:
            self._load(self.models[0])
        except BaseException as e:       # a bad model: wait_ready raises it on the caller's thread
            self.failure = e
            return
        finally:
            self.ready.set()
        while not self.stopping:
            self._take_jobs()
            if self.stopping:
                return
            if self.switch_to is not None and self._idle():      # the resident model's sequences are done
                self._switch()
                continue
            try:
                self.scheduler.step()
            except Exception:            # the scheduler ends failed sequences itself; this is a bug in it
                log.exception("scheduler step failed")
            self.running = self.scheduler.running

    def _load(self, model: ServedModel) -> None:
        engine = self.load(model)
        engine.warm_up()                 # every kernel compiled (or loaded from numba's cache) before serving
        self.loaded, self.scheduler, self.parallel = (model, engine), engine.scheduler, engine.scheduler.parallel

    def _unload(self) -> None:
        """Drops the resident engine (its weights, caches and buffers), keeping its scheduler's counts."""
        if self.scheduler is not None:
            self.past_steps, self.past_seconds = self.decode_steps()
        self.loaded = self.scheduler = None
        self.running = 0
        gc.collect()                     # its memory goes before the next model's is taken, cycles included

    def _switch(self) -> None:
        """Runs the job that waited for its model: that model replaces the resident one (a job cancelled
        meanwhile loads nothing); a failed load fails the job, and leaves no model resident."""
        job, self.switch_to = self.switch_to, None
        if job.cancelled.is_set():
            self.release()
            return
        old = self.resident.id if self.resident else "none"
        log.info("model switch: %s -> %s (req=%s)", old, job.model.id, job.rid)
        self.switches += 1
        self._unload()
        t0 = time.perf_counter()
        failure = None
        try:
            self._load(job.model)
        except Exception as e:           # a bad file: this job fails, the server stays up with no model
            failure = e
        self.release()
        if failure is not None:
            gc.collect()                 # what the failed load had built
            job.finished = time.perf_counter()
            job.emit("error", load_failure(job.model, failure))
            return
        log.info("model %s loaded and warmed up in %.1fs", job.model.id, time.perf_counter() - t0)
        self._start(job)
        self.running = self.scheduler.running

    def _idle(self) -> bool:
        return self.scheduler is None or self.scheduler.idle

    def _take_jobs(self) -> None:
        """Moves queued jobs into the scheduler while it has free slots, waiting for one when idle; stops
        at a job of a model not resident, which then waits in `switch_to`."""
        while self.switch_to is None and (self.scheduler is None or
                                          self.scheduler.running + len(self.scheduler.queue) < self.parallel):
            try:
                job = self.jobs.get(block=self._idle())
            except queue.Empty:
                return
            if job is None:
                self.stopping = True
                return
            if job.cancelled.is_set():
                self.release()
            elif self.engine_of(job.model) is None:
                self.switch_to = job
            else:
                self.release()
                self._start(job)
                self.running = self.scheduler.running

    def _start(self, job: Job) -> None:
        job.started = time.perf_counter()
        paged = PagedJob(job)
        submitted = 0
        try:
            for i, images in enumerate(job.pages):
                request = OcrRequest([image.decode() for image in images], job.prompt, job.view, job.sampling)
                self.engine.submit(request, paged.results[i], on_delta=lambda text, i=i: paged.delta(i, text),
                                   on_done=lambda seq, i=i: paged.done(i, seq), cancelled=job.cancelled.is_set)
                submitted += 1
        except Exception as e:           # a bad image or parameter: this job fails, the others run on
            job.cancelled.set()          # its pages already submitted end at the next step
            paged.error = e
            for i in range(submitted, len(job.pages)):
                paged.done(i)


def _user_error(e: BaseException) -> bool:
    return isinstance(e, (InputError, APIError))
