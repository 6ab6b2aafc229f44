"""One engine, one thread driving its scheduler, a bounded queue in front of it.

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
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from dsocr.runtime.engine import OcrEngine, OcrRequest
from dsocr.runtime.errors import InputError
from dsocr.runtime.generate import GenerationResult, SamplingParams
from dsocr.runtime.pdf import PAGE_SEPARATOR, page_heading
from dsocr.runtime.preprocess import ViewConfig
from dsocr.sanic_app.errors import APIError
from dsocr.sanic_app.images import EncodedImage

log = logging.getLogger("dsocr.server")


@dataclass
class Job:
    pages: list[list[EncodedImage]]      # each page: the images of one sequence
    prompt: str
    view: ViewConfig
    sampling: SamplingParams
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
    """The engine's own thread: it builds the engine, warms it up and then serves, so that every
    numba launch of the engine comes from this one thread. (Parallel kernels launched from two
    threads make two OpenMP teams, more threads than cores, and libgomp then spins 1000 rounds
    instead of GOMP_SPINCOUNT before sleeping: each small launch paid a wake-up, and decode in the
    server ran at 17 tok/s where `dsocr ocr` ran at 25. numba's thread count is per thread too.)"""

    def __init__(self, make_engine: Callable[[], OcrEngine], max_queue: int):
        self.max_queue = max_queue
        self.engine: OcrEngine | None = None
        self.scheduler = None
        self.parallel = 0                 # slots, once the engine is built
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0                  # reserved and queued jobs
        self.running = 0                  # sequences holding a slot of the scheduler
        self.lock = threading.Lock()
        self.stopping = False
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(make_engine,), name="dsocr-engine", daemon=True)
        self.thread.start()

    def wait_ready(self) -> OcrEngine:
        """The engine, once built and warmed up on the worker thread; its failure re-raised here."""
        self.ready.wait()
        if self.failure is not None:
            raise self.failure
        return self.engine

    @property
    def busy(self) -> bool:
        return self.running > 0

    def reserve(self) -> bool:
        """A place in the queue for a job about to be made; False when the queue is full."""
        with self.lock:
            if self.waiting >= self.max_queue:
                return False
            self.waiting += 1
        return True

    def release(self) -> None:
        """Gives back a reserved place whose job was never submitted."""
        with self.lock:
            self.waiting -= 1

    def submit(self, job: Job) -> None:
        """Queues a job into the place reserved for it."""
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)

    def _run(self, make_engine) -> None:
        try:
            self.engine = make_engine()
            self.engine.warm_up()        # every kernel compiled (or loaded from numba's cache) before serving
            self.scheduler, self.parallel = self.engine.scheduler, self.engine.scheduler.parallel
        except BaseException as e:       # a bad model: wait_ready raises it on the caller's thread
            self.failure = e
            return
        finally:
            self.ready.set()
        while not self.stopping:
            self._take_jobs()
            if self.stopping:
                return
            try:
                self.scheduler.step()
            except Exception:            # the scheduler ends failed sequences itself; this is a bug in it
                log.exception("scheduler step failed")
            self.running = self.scheduler.running

    def _take_jobs(self) -> None:
        """Moves queued jobs into the scheduler while it has free slots; waits for one when idle."""
        sched = self.scheduler
        while sched.running + len(sched.queue) < self.parallel:
            try:
                job = self.jobs.get(block=sched.idle)
            except queue.Empty:
                return
            if job is None:
                self.stopping = True
                return
            with self.lock:
                self.waiting -= 1
            if not job.cancelled.is_set():
                self._start(job)
            self.running = sched.running

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
