"""`dsocr serve`: the OpenAI-compatible server, one engine resident at a time."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dsocr.cli.commands_ocr import add_inference_flags, cli_overrides
from dsocr.cli.output import compile_notice


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve OpenAI-compatible /v1/chat/completions and /v1/responses")
    g = p.add_argument_group("server")
    g.add_argument("--host")
    g.add_argument("--port", type=int)
    g.add_argument("--model-id", help="the name clients use as `model`")
    g.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/*")
    g.add_argument("--max-queue", type=int, help="requests allowed to wait; more get 503")
    g.add_argument("--max-body-mb", type=int, help="largest request body (images are inline)")
    g.add_argument("--allow-private-urls", action="store_true", default=None,
                   help="let image URLs resolve to private, loopback or link-local addresses")
    g.add_argument("--fetch-timeout", type=float, metavar="SECONDS", help="the most time one image URL may take")
    g.add_argument("--request-fetch-timeout", type=float, metavar="SECONDS",
                   help="the most time all of one request's image URLs may take")
    g.add_argument("--max-pdf-pages", type=int, metavar="N", help="the most pages a PDF in a request may have")
    g.add_argument("--cors-origins", nargs="+", metavar="ORIGIN",
                   help="let browser pages from these origins call the API (CORS; * allows any)")
    add_inference_flags(p)
    p.set_defaults(run=cmd_serve)


def serve_settings(args):
    """The settings `dsocr serve` runs with: its flags over the environment, config.toml and defaults."""
    from dsocr.cli.config import Server, load_settings
    over = cli_overrides(args)
    over["server"] = {k: getattr(args, k, None) for k in Server.model_fields}    # a flag has its setting's name
    return load_settings(args.config, over)


def served_models(settings, progress: bool) -> list:
    """The ServedModels of `dsocr serve`: the pair it starts with (--model, else the active entry; fetched
    if missing) first, then every other config entry whose pair is on disk, each under its entry's name.
    The started pair's id is server.model_id when set, else the name of the entry it was started from.
    Each mmproj's header says its model's layout (a few ms); no weights are read."""
    from dsocr.cli.models import entries_on_disk, resolve_model, say
    from dsocr.runtime.engine import find_model_pair
    from dsocr.runtime.errors import ModelError
    from dsocr.runtime.vision import read_layout
    from dsocr.sanic_app.worker import ServedModel

    def model(mid: str, files: tuple[Path, Path]) -> ServedModel:
        return ServedModel(mid, *files, read_layout(files[1]))

    started = tuple(p.resolve() for p in find_model_pair(*resolve_model(settings, progress)))
    on_disk = {name: tuple(p.resolve() for p in pair) for name, pair in entries_on_disk(settings).items()}
    m = settings["models"]
    named = m.get("model") or m.get("active")          # --model NAME, or the active entry
    from_entry = on_disk.get(named) == started and settings.source("server", "model_id") == "default"
    mid = named if from_entry else settings["server"]["model_id"]
    models = [model(mid, started)]
    for name, files in on_disk.items():
        if files == started:                           # the started pair itself
            if name != mid:
                say(f"models.entries.{name} is the pair served as {mid}")
            continue
        if name == mid:
            say(f"not serving models.entries.{name}: its name is the started model's id (--model-id)")
            continue
        try:
            models.append(model(name, files))
        except ModelError as e:
            say(f"not serving models.entries.{name}: {e}")
    return models


def cmd_serve(args) -> int:
    from dsocr.cli.commands_ocr import checked_inference
    from dsocr.runtime.engine import OcrEngine
    from dsocr.sanic_app import create_app
    from dsocr.sanic_app.worker import EngineWorker
    settings = serve_settings(args)
    inf, srv = settings["inference"], settings["server"]
    # the server's ranges were checked by load_settings, the request defaults here: before the model
    # loads, so a useless server fails at once
    _, _, threads = checked_inference(settings)
    models = served_models(settings, progress=not args.quiet)
    with compile_notice(enabled=not args.quiet):
        t0 = time.perf_counter()
        worker = EngineWorker(lambda m: OcrEngine(m.lm, m.mmproj, device=inf["device"], threads=threads,
                                                  parallel=inf["parallel"]), models, int(srv["max_queue"]))
        worker.wait_ready()              # the first built and warmed up on its own thread, before "serving"
    if not args.quiet:
        print(f"dsocr: warmed up in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    app = create_app(worker, settings.data)
    pairs = ", ".join(f"{m.id} ({m.lm.name} + {m.mmproj.name})" for m in models)

    @app.after_server_start
    async def announce(app_):        # once listening: a taken port never prints "serving"
        print(f"dsocr: serving {pairs} on http://{srv['host']}:{srv['port']}"
              + (f"; {models[0].id} is loaded, another is loaded in its place when a request names it"
                 if len(models) > 1 else ""), file=sys.stderr, flush=True)

    app.run(host=srv["host"], port=int(srv["port"]), single_process=True, access_log=False, motd=False)
    return 0
