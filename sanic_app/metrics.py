"""The server's Prometheus metrics, served at GET /metrics in the text format.

Each app has a registry of its own (not prometheus_client's global one), so that several apps in one
process do not collide. Every request is counted once, by route and status: "ok", "error" (a 5xx, or a
generation that failed), "cancelled" (the client went away) or, for a refused request, its HTTP status
("400", "404", "503", ...).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

CONTENT_TYPE = CONTENT_TYPE_LATEST
# An OCR answer's first token comes after the vision encoder: seconds on a CPU, not milliseconds.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
DURATION_BUCKETS = (0.01, 0.05, 0.25, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
CLIENT_GONE = 499        # nginx's "client closed request": what a request whose client went away is answered


def outcome(http_status: int) -> str:
    """A response's status label: "ok", "cancelled", a refusal's own code (4xx, and 503 for a full queue),
    or "error"."""
    if http_status < 400:
        return "ok"
    if http_status == CLIENT_GONE:
        return "cancelled"
    return str(http_status) if http_status < 500 or http_status == 503 else "error"


def route_name(request) -> str:
    """The handler's name ("chat", "health", ...), "preflight" for a CORS preflight, "none" when no route
    matched: a bounded label, never the path."""
    if request.route:
        return request.route.name.rsplit(".", 1)[-1]
    return "preflight" if request.method == "OPTIONS" else "none"


class ServerMetrics:
    def __init__(self, ctx):
        """ctx: the app's ctx; its `worker` is read at each scrape (it exists once the server starts)."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dsocr_requests", "Requests by route and status (ok, error, cancelled, or the "
                                "HTTP status of a refused one)", ["route", "status"], registry=r)
        self.duration = Histogram("dsocr_request_duration_seconds", "From a request's arrival to its last byte",
                                  ["route"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("dsocr_time_to_first_token_seconds", "From a job's queueing to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dsocr_prompt_tokens", "Prompt tokens (image and text) of the jobs served",
                                     registry=r)
        self.completion_tokens = Counter("dsocr_completion_tokens", "Tokens generated", registry=r)
        for name, doc, attr in (("dsocr_queue_depth", "Jobs waiting for a slot", "waiting"),
                                ("dsocr_running_sequences", "Sequences being served now", "running"),
                                ("dsocr_parallel_slots", "Sequences the engine serves at once", "parallel")):
            gauge = Gauge(name, doc, registry=r)
            gauge.set_function(lambda attr=attr: getattr(ctx.worker, attr) if ctx.worker else 0)

        r.register(DecodeSteps(ctx))
        r.register(ModelSwitches(ctx))

    def request_done(self, request, status: str, seconds: float) -> None:
        route = route_name(request)
        self.requests.labels(route, status).inc()
        self.duration.labels(route).observe(seconds)

    def job_done(self, job, completion_tokens: int) -> None:
        self.prompt_tokens.inc(job.result.prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        if job.first_token is not None:
            self.ttft.observe(job.first_token - job.enqueued)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class DecodeSteps:
    """The decode steps by batch size (of every model the worker has run), read at each scrape: their count
    and seconds, so that N * steps / seconds is the throughput of N sequences decoding together."""

    def __init__(self, ctx):
        self.ctx = ctx

    def collect(self):
        steps = CounterMetricFamily("dsocr_decode_steps", "Decode steps by the number of sequences in them",
                                    labels=["batch"])
        seconds = CounterMetricFamily("dsocr_decode_step_seconds", "Seconds spent in decode steps, by batch size",
                                      labels=["batch"])
        counts, times = self.ctx.worker.decode_steps() if self.ctx.worker else ({}, {})
        for n in sorted(counts):
            steps.add_metric([str(n)], counts[n])
            seconds.add_metric([str(n)], times[n])
        yield steps
        yield seconds


class ModelSwitches:
    """Times the resident model was replaced by another (a load and a warm-up each), read at each scrape."""

    def __init__(self, ctx):
        self.ctx = ctx

    def collect(self):
        yield CounterMetricFamily("dsocr_model_switches", "Times another model was loaded in place of the "
                                  "resident one (a load and a warm-up each)",
                                  value=self.ctx.worker.switches if self.ctx.worker else 0)
