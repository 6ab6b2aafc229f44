"""Server under load: N concurrent streaming clients for T seconds against `dsocr serve` with the
tiny model (started here, on loopback). Every request must complete with [DONE]; prints
completed/lost counts, p50/p95 latency, time to first token and throughput.

    python bench/server_load.py [--clients 8] [--seconds 30] [--max-tokens 32] [--json]
"""
import os

import dsocr.runtime.thread_env  # noqa: E402,F401  (first: before numpy loads OpenBLAS)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny-dsocr"


def start(tmp: Path, max_queue: int) -> tuple[subprocess.Popen, str]:
    from dsocr.convert import convert_checkpoint
    lm, mm = (f.path for f in convert_checkpoint(TINY, tmp, "q8_0", "f16", progress=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsocr.cli.main", "serve", "--model", str(lm), "--mmproj", str(mm),
                             "--port", str(port), "--model-id", "tiny", "--max-queue", str(max_queue)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"),
                            env={**os.environ, "DSOCR_CONFIG": str(tmp / "config.toml")})
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not start: " + (tmp / "server.log").read_text()[-2000:])


async def client_loop(base: str, body: dict, until: float, out: list) -> None:
    async with httpx.AsyncClient(timeout=600) as http:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            ttft, tokens, done, status = None, 0, False, 0
            try:
                async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
                    status = r.status_code
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        chunk = json.loads(line[6:])
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            ttft = ttft or time.perf_counter() - t0
                            tokens += 1
            except httpx.HTTPError:
                pass
            out.append({"status": status, "done": done, "latency": time.perf_counter() - t0, "ttft": ttft,
                        "chunks": tokens})
            if status == 503:
                await asyncio.sleep(0.5)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    image = "data:image/png;base64," + base64.b64encode((TINY / "images" / "small_note.png").read_bytes()).decode()
    body = {"model": "tiny", "stream": True, "max_tokens": args.max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Free OCR."}]}]}
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start(Path(tmp), max_queue=args.clients)
        try:
            out: list = []
            t0 = time.perf_counter()

            async def run_all():
                await asyncio.gather(*[client_loop(base, body, t0 + args.seconds, out) for _ in range(args.clients)])
            asyncio.run(run_all())
            wall = time.perf_counter() - t0
            health = httpx.get(base + "/health").json()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ok = [r for r in out if r["status"] == 200 and r["done"]]
    res = {"clients": args.clients, "seconds": round(wall, 1), "requests": len(out), "completed": len(ok),
           "lost": len([r for r in out if r["status"] == 200 and not r["done"]]),
           "rejected_503": len([r for r in out if r["status"] == 503]),
           "p50_latency_s": round(pct([r["latency"] for r in ok], 0.5), 3),
           "p95_latency_s": round(pct([r["latency"] for r in ok], 0.95), 3),
           "p50_ttft_s": round(pct([r["ttft"] for r in ok if r["ttft"]], 0.5), 3),
           "requests_per_s": round(len(ok) / wall, 2),
           "tokens_per_s": round(sum(r["chunks"] for r in ok) / wall, 1),
           "mean_chunks": round(statistics.mean([r["chunks"] for r in ok]), 1) if ok else 0,
           "health_after": health["status"]}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for k, v in res.items():
            print(f"{k:>16}: {v}")


if __name__ == "__main__":
    main()
