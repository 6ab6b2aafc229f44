"""`dsocr batch --ray`: page units OCR'd by Ray actors, each holding one loaded engine; the driver
alone writes the output folder (batch/store.py), so the exactly-once rule is the local run's.

* Model files go by path: the GGUF pair must exist at the same path on every node (a shared folder,
  or the same `dsocr models` data folder on each); so must the inputs, which each actor renders.
* The units go out in chunks of the engine's `parallel` pages, so a chunk decodes together on its
  actor; at most `CHUNKS_PER_WORKER` chunks wait on one actor (back-pressure: a bounded number of
  pages in flight), and results come back chunk by chunk as they finish.
* An actor that dies (a killed process, a lost node) loses only its chunks in flight: they go to
  another actor, and a new actor takes the dead one's place, up to `max_restarts` times in a run.
  Nothing a dead actor did reaches the output folder, so each page is still written once.
"""
from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from dsocr.batch.inputs import PageUnit
from dsocr.batch.outcome import PageOutcome
from dsocr.batch.run import ocr_units
from dsocr.runtime.errors import InputError
from dsocr.runtime.thread_env import THREAD_ENV

CHUNKS_PER_WORKER = 2          # one running, one waiting: an actor never idles between two calls
ACTOR_NAME = "dsocr-batch-{}"  # named, so an operator (or a test) can find one with ray.get_actor


class PageWorker:
    """A Ray actor: one engine (its numba threads the actor's CPUs), OCR'ing a chunk of units per call."""

    def __init__(self, engine_args: dict, run_args: dict):
        from dsocr.runtime.engine import OcrEngine
        self.engine = OcrEngine(**engine_args)
        self.run_args = run_args

    def ocr(self, units: list[PageUnit]) -> list[PageOutcome]:
        return list(ocr_units(self.engine, units, **self.run_args))


@dataclass
class RayCluster:
    address: str | None      # None: a local Ray instance started here; else an existing cluster's
    workers: int
    cpus_per_worker: int
    max_restarts: int = 3


def ray_outcomes(units: list[PageUnit], cluster: RayCluster, engine_args: dict, run_args: dict,
                 say=lambda message: None) -> Iterator[PageOutcome]:
    """Each unit's outcome as its chunk comes back from an actor; `engine_args` are OcrEngine's (the
    model by path), `run_args` ocr_units' keywords; `say` hears of a worker that died."""
    import ray
    from ray.exceptions import RayActorError     # ActorDiedError, ActorUnavailableError are kinds of it
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=cluster.address or "local", include_dashboard=False, log_to_driver=False,
                     num_cpus=None if cluster.address else os.cpu_count(), configure_logging=False)
        except ConnectionError as e:
            raise InputError(f"--ray {cluster.address}: no Ray cluster there ({e})") from None
    actor_class = ray.remote(num_cpus=cluster.cpus_per_worker, max_restarts=0)(PageWorker)
    engine_args = {**engine_args, "threads": cluster.cpus_per_worker}
    names = iter(range(1 << 30))

    def new_actor():
        return actor_class.options(name=ACTOR_NAME.format(next(names)), runtime_env={"env_vars": THREAD_ENV}).remote(
            engine_args, run_args)

    parallel = engine_args["parallel"]
    chunks = deque(units[i:i + parallel] for i in range(0, len(units), parallel))
    actors = [new_actor() for _ in range(cluster.workers)]
    load = {a: 0 for a in actors}           # chunks in flight per actor
    flight: dict = {}                       # object ref -> (actor, chunk)
    restarts = 0
    try:
        while chunks or flight:
            for actor in actors:
                while chunks and load[actor] < CHUNKS_PER_WORKER:
                    chunk = chunks.popleft()
                    flight[actor.ocr.remote(chunk)] = (actor, chunk)
                    load[actor] += 1
            (ref,), _ = ray.wait(list(flight), num_returns=1)
            actor, chunk = flight.pop(ref)
            try:
                outcomes = ray.get(ref)
            except RayActorError:
                chunks.appendleft(chunk)     # redone elsewhere; the dead actor wrote nothing
                if actor in load:
                    actors.remove(actor)
                    del load[actor]
                    if restarts == cluster.max_restarts:
                        if not actors:
                            raise InputError(f"the Ray workers died {restarts + 1} times; stopping") from None
                        continue
                    restarts += 1
                    say(f"a Ray worker died; its pages go to the others and a new worker ({restarts} so far)")
                    actors.append(new_actor())
                    load[actors[-1]] = 0
                continue
            load[actor] -= 1
            yield from outcomes
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
