"""The `dsocr` command. Each subcommand parses its flags and calls into convert/ or runtime/;
user-facing failures become one line on stderr and a non-zero exit (tracebacks only with
--verbose)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections import Counter
from dsocr.cli import commands_models, commands_ocr, commands_serve

EXIT_ERROR = 1


class CliError(Exception):
    """Bad input found by the command line itself."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where the command is so its cleanup (e.g. of .part files) runs,
    as for Ctrl-C. A BaseException for the same reason KeyboardInterrupt is one."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def _user_errors() -> tuple[type[BaseException], ...]:
    from dsocr.convert import ConvertError
    errors: list[type[BaseException]] = [CliError, ConvertError, OSError]
    from dsocr.cli.config import ConfigError
    from dsocr.runtime.errors import InputError, ModelError
    errors += [ModelError, InputError, ConfigError]
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsocr", description="DeepSeek-OCR on a laptop: convert, quantize, run.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands_models.register(sub)
    commands_ocr.register(sub)
    commands_serve.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Sanic shuts the server down on SIGTERM itself.
    previous = {} if args.command == "serve" else \
        {signum: signal.signal(signum, _raise_stopped) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("dsocr: interrupted", file=sys.stderr)
        return 130
    except Stopped as e:
        print(f"dsocr: stopped by {e}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:   # e.g. `dsocr info ... | head`: the reader went away, nothing to report
        sys.stdout = open(os.devnull, "w")
        return 0
    except _user_errors() as e:
        if args.verbose:
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"dsocr: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def print_table(rows: list[list[str]], file=sys.stdout) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=file)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def summarize_written(files, out=sys.stdout) -> None:
    """The conversion summary: per file its tensor types, size and fallbacks."""
    rows = [["file", "size", "tensors", "types"]]
    for f in files:
        types = ", ".join(f"{k} {v}" for k, v in sorted(Counter(f.types).items()))
        rows.append([str(f.path), human_bytes(f.nbytes), str(len(f.tensors)), types])
    print_table(rows, out)
    for f in files:
        falls = f.fallbacks
        if falls:
            print(f"{f.path.name}: {len(falls)} tensor(s) fell back (rows not a multiple of the block):", file=out)
            by = Counter((t.requested.name, t.qtype.name) for t in falls)
            for (want, got), n in sorted(by.items()):
                names = [t.name for t in falls if t.requested.name == want and t.qtype.name == got]
                print(f"  {want} -> {got}: {n}  ({', '.join(names[:4])}{', ...' if n > 4 else ''})", file=out)


if __name__ == "__main__":
    sys.exit(main())
