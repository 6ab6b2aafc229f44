"""The `dsocr` command. Each subcommand parses its flags and calls into convert/ or runtime/;
user-facing failures become one line on stderr and a non-zero exit (tracebacks only with
--verbose)."""
from __future__ import annotations

import argparse
import copy
import functools
import os
import signal
import sys
from importlib.metadata import version

from dsocr.cli import commands_batch, commands_config, commands_models, commands_ocr, commands_serve

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


EXAMPLES = """\
examples:
  dsocr ocr page.png               markdown of one page (the model is fetched and converted on first use)
  dsocr ocr scan.pdf -o out        every page; out/result.md, boxes.png and image crops per page
  dsocr serve --port 8080          an OpenAI-compatible server
  dsocr batch scans/ -o out        a whole folder, resumable; --ray for a Ray cluster
  dsocr ocr --help                 modes, prompts and every flag with its default"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends to each flag that a setting backs its default in effect (built in, from config.toml or
    from a DSOCR_* variable), read only when help is shown. Epilogs keep their lines."""
    SECTIONS = ("inference", "server", "models")     # a flag's dest is its key in one of these
    SECRET = ("api_key",)

    def __init__(self, prog, settings, **kwargs):
        super().__init__(prog, **kwargs)
        self.settings = settings

    def default_text(self, action) -> str:
        settings = self.settings()
        section = next((s for s in self.SECTIONS if action.dest in settings[s]), None)
        if section is None or action.dest in self.SECRET or not action.option_strings:
            return ""
        value = settings[section][action.dest]
        if value is None or value == "":
            return ""
        source = settings.source(section, action.dest)
        where = {"default": "", "file": f", from {settings.path.name}"}.get(
            source, f", from {settings.where(section, action.dest)}")
        return f"default: {str(value).lower() if isinstance(value, bool) else value}{where}"

    def _format_action(self, action):
        default = self.default_text(action).replace("%", "%%")     # help strings are %-formatted
        if default:
            action = copy.copy(action)
            action.help = f"{action.help} ({default})" if action.help else default
        return super()._format_action(action)


def help_settings(argv: list[str] | None):
    """() -> the settings help shows, loaded once on first use from the --config in argv (parsed ahead of
    the real parse, which has not run when help is printed); a broken config shows the built-in values."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--config")
    try:
        config = pre.parse_known_args(argv)[0].config
    except argparse.ArgumentError:        # e.g. --config without a value: the real parse says so
        config = None

    @functools.cache
    def load():
        from dsocr.cli.config import DEFAULTS, ConfigError, Settings, config_path, load_settings
        try:
            return load_settings(config)
        except ConfigError:
            return Settings(DEFAULTS, config_path(config))
    return load


def add_common_flags(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("--verbose", action="store_true", default=default, help="show tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="results only: no progress lines on stderr (errors still show)")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    formatter = functools.partial(HelpFormatter, settings=help_settings(argv))
    parser = argparse.ArgumentParser(prog="dsocr", description="DeepSeek-OCR on a laptop: convert, quantize, run.",
                                     epilog=EXAMPLES, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('dsocr')}")
    add_common_flags(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands_models.register(sub)
    commands_ocr.register(sub)
    commands_batch.register(sub)
    commands_serve.register(sub)
    commands_config.register(sub)
    for p in sub.choices.values():
        p.formatter_class = formatter
        add_common_flags(p, argparse.SUPPRESS)    # also after the command; unset there keeps the value before it
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
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
        return getattr(args, "error_status", EXIT_ERROR)     # a command may set its own (batch: 1 means failed pages)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
