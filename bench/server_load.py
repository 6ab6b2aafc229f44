"""Server under load: `dsocr serve` started here on loopback, N concurrent streaming clients.

For each --parallel N the server runs with N slots and N clients each send --requests requests
one after another (a page, streamed, with usage). Printed per N: completed / lost (a 200 stream
without [DONE]) / rejected (503) / failed requests, requests/s, p50/p95 latency and time to
first token, the worst wait between two tokens of one stream (the server's max_token_gap per
request, which covers tokens that show no text: random weights write many), and decode
throughput two ways: "all-N" is N sequences' tokens per second in the decode steps that ran all
N together (from /metrics: dsocr_decode_steps and dsocr_decode_step_seconds), "overall" is
completion tokens over the whole run. The last column is all-N over N = 1's (the speed-up of
batching). /health must answer ok after each run.

    python bench/server_load.py                                    # the tiny fixture model
    python bench/server_load.py --model models/bench/random-DeepSeek-OCR-Q8_0.gguf \\
        --mmproj models/bench/mmproj-random-DeepSeek-OCR-F16.gguf --parallel 1,2,4,8 --max-tokens 400
"""
import os

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny-dsocr"


def tiny_pair(tmp: Path) -> tuple[Path, Path]:
    from dsocr.convert import convert_checkpoint
    lm, mm = (f.path for f in convert_checkpoint(TINY, tmp, "q8_0", "f16", progress=False))
    return lm, mm


def start(tmp: Path, lm: Path, mm: Path, parallel: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / f"server-{parallel}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dsocr.cli.main", "serve", "--model", str(lm), "--mmproj", str(mm),
                             "--port", str(port), "--model-id", "bench", "--max-queue", str(max_queue),
                             "--parallel", str(parallel)],
                            stdout=subprocess.DEVNULL, stderr=log,
                            env={**os.environ, "DSOCR_CONFIG": str(tmp / "config.toml")})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit("server did not start: " + (tmp / f"server-{parallel}.log").read_text()[-2000:])


async def client(base: str, body: dict, requests: int, out: list) -> None:
    async with httpx.AsyncClient(timeout=3600) as http:
        for _ in range(requests):
            t0 = time.perf_counter()
            rec = {"status": 0, "done": False, "tokens": 0}
            try:
                async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
                    rec["status"] = r.status_code
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            rec["done"] = True
                            break
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            rec["tokens"] = chunk["usage"]["completion_tokens"]
            except httpx.HTTPError:
                pass
            rec["t0"], rec["t1"] = t0, time.perf_counter()
            out.append(rec)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def decode_rate(metrics_text: str, n: int) -> float:
    """Tokens per second of the decode steps that ran n sequences together."""
    found = {(f.name, s.labels.get("batch")): s.value for f in text_string_to_metric_families(metrics_text)
             for s in f.samples if s.name.endswith("_total")}
    seconds = found.get(("dsocr_decode_step_seconds", str(n)), 0.0)
    return n * found.get(("dsocr_decode_steps", str(n)), 0.0) / seconds if seconds else float("nan")


def server_log(log_path: Path, key: str) -> list[float]:
    """The values of `key` in the server's request lines (ttft, max_token_gap: its own clock)."""
    return [float(m) for m in re.findall(rf" {key}=([0-9.]+)s", log_path.read_text())]


def run_level(tmp: Path, lm: Path, mm: Path, n: int, body: dict, requests: int) -> dict:
    proc, base = start(tmp, lm, mm, n, max_queue=n)
    try:
        out: list = []
        t0 = time.perf_counter()

        async def run_all():
            await asyncio.gather(*[client(base, body, requests, out) for _ in range(n)])
        asyncio.run(run_all())
        wall = time.perf_counter() - t0
        health = httpx.get(base + "/health", timeout=10).json()
        metrics = httpx.get(base + "/metrics", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ok = [r for r in out if r["status"] == 200 and r["done"]]
    log = tmp / f"server-{n}.log"
    gaps, ttft = server_log(log, "max_token_gap"), server_log(log, "ttft")
    return {"parallel": n, "requests": len(out), "completed": len(ok),
            "lost": sum(r["status"] == 200 and not r["done"] for r in out),
            "rejected": sum(r["status"] == 503 for r in out),
            "failed": sum(r["status"] not in (200, 503) for r in out),
            "requests_per_s": len(ok) / wall,
            "p50_latency_s": pct([r["t1"] - r["t0"] for r in ok], 0.5),
            "p95_latency_s": pct([r["t1"] - r["t0"] for r in ok], 0.95),
            "p50_ttft_s": pct(ttft, 0.5), "p95_ttft_s": pct(ttft, 0.95),
            "worst_gap_s": max(gaps, default=float("nan")),
            "decode_all_n_tok_s": decode_rate(metrics, n),
            "decode_overall_tok_s": sum(r["tokens"] for r in ok) / wall,
            "mean_tokens": sum(r["tokens"] for r in ok) / max(len(ok), 1), "health_after": health["status"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="language-model GGUF (default: the tiny fixture, converted here)")
    ap.add_argument("--mmproj", help="its mmproj (default: beside the model)")
    ap.add_argument("--parallel", default="1,2,4,8", help="slot counts to run, each with as many clients")
    ap.add_argument("--requests", type=int, default=1, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mode", default="tiny", help="the requests' vision mode")
    ap.add_argument("--image", default=str(TINY / "images" / "small_note.png"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    image = "data:image/png;base64," + base64.b64encode(Path(args.image).read_bytes()).decode()
    body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, "mode": args.mode,
            "max_tokens": args.max_tokens, "no_repeat_ngram_size": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": "Free OCR."}]}]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            from dsocr.runtime.engine import find_model_pair
            lm, mm = find_model_pair(args.model, args.mmproj)
        else:
            lm, mm = tiny_pair(tmp)
        rows = [run_level(tmp, lm, mm, int(n), body, args.requests) for n in args.parallel.split(",")]
    base = rows[0]["decode_all_n_tok_s"] if rows[0]["parallel"] == 1 else float("nan")
    for r in rows:
        r["speedup_vs_1"] = r["decode_all_n_tok_s"] / base
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"model {lm.name} + {mm.name}, mode {args.mode}, {args.max_tokens} tokens, {args.requests} request(s) "
          f"per client, CPU threads {os.cpu_count()}")
    cols = ["parallel", "completed", "lost", "rejected", "failed", "requests_per_s", "p50_latency_s", "p95_latency_s",
            "p50_ttft_s", "p95_ttft_s", "worst_gap_s", "decode_all_n_tok_s", "decode_overall_tok_s",
            "speedup_vs_1", "health_after"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
