"""One engine, one worker thread, a bounded FIFO queue.

A request reserves its place in the queue before its images are fetched or decoded, so a full
queue is a 503 at once and costs nothing; the place is released if the request fails before it is
queued. Queued jobs hold their images encoded; the worker decodes a job's images right before
running it, so one job's pixels are alive at a time. Generation runs off the event loop; each job
streams its events back to its handler through an asyncio queue. A job whose client went away is
cancelled: skipped if it has not started, and stopped between tokens if it has, so the next
request is served at once.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from dsocr.runtime.engine import OcrEngine, OcrRequest
from dsocr.runtime.errors import InputError
from dsocr.runtime.generate import GenerationResult, SamplingParams
from dsocr.runtime.preprocess import ViewConfig
from dsocr.sanic_app.errors import APIError
from dsocr.sanic_app.images import EncodedImage

log = logging.getLogger("dsocr.server")


@dataclass
class Job:
    images: list[EncodedImage]
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
    first_token: float | None = None
    finished: float | None = None

    def emit(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class EngineWorker:
    def __init__(self, engine: OcrEngine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0
        self.busy = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="dsocr-engine", daemon=True)
        self.thread.start()

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

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.lock:
                self.waiting -= 1
                self.busy = True
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
            finally:
                with self.lock:
                    self.busy = False

    def _generate(self, job: Job) -> None:
        job.started = time.perf_counter()
        try:
            request = OcrRequest([image.decode() for image in job.images], job.prompt, job.view, job.sampling)
            for delta in self.engine.stream(request, job.result, cancelled=job.cancelled.is_set):
                if job.first_token is None:
                    job.first_token = time.perf_counter()
                job.emit("delta", delta)
            job.emit("done", job.result)
        except Exception as e:  # reported to the client as an error; the server keeps serving
            log.exception("request %s failed", job.rid) if not _user_error(e) else None
            job.emit("error", e)
        finally:
            job.finished = time.perf_counter()


def _user_error(e: Exception) -> bool:
    return isinstance(e, (InputError, APIError))
