"""`dsocr config`: the settings in effect and where each came from; `--init` writes the template."""
from __future__ import annotations

import argparse
import json
import sys

HIDDEN = "<hidden>"       # what stands for a set api_key: the output gets pasted into bug reports


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the settings in effect and where each comes from (default, file, "
                                      "environment, flag)")
    p.add_argument("--config", help="config.toml (default: $DSOCR_CONFIG or the user config dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--init", action="store_true",
                   help="write the commented config.toml (every key at its default) there, then stop")
    p.set_defaults(run=cmd_config)


def cmd_config(args) -> int:
    from dsocr.cli.config import config_path, load_settings
    if args.init:
        return write_template(config_path(args.config))
    settings = load_settings(args.config)
    rows = effective_settings(settings)
    if args.json:
        print(json.dumps({"path": str(settings.path), "exists": settings.path.is_file(), "settings": rows},
                         ensure_ascii=False))
        return 0
    from dsocr.cli.output import print_table
    state = "" if settings.path.is_file() else " (no such file: built-in defaults)"
    print(f"config file: {settings.path}{state}")
    print_table([["key", "value", "source"]] +
                [[key, json.dumps(row["value"], ensure_ascii=False),
                  row["source"] + (f" ({row['variable']})" if "variable" in row else "")] for key, row in rows.items()],
                sys.stdout)
    return 0


def effective_settings(settings) -> dict:
    """{"section.key[.sub]": {"value", "source"[, "variable"]}} for every setting."""
    from dsocr.cli.config import env_name, leaves
    rows = {}
    for leaf, value in leaves(settings.data).items():
        section, key = leaf.split(".", 1)
        row = {"value": HIDDEN if leaf == "server.api_key" and value else value,
               "source": settings.source(section, key)}
        if row["source"] == "environment":
            row["variable"] = env_name(section, key)
        rows[leaf] = row
    return rows


def write_template(path) -> int:
    from dsocr.cli.config import ConfigError, template
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:     # "x": never over a file someone edited
            f.write(template())
    except FileExistsError:
        raise ConfigError(f"{path}: already exists (edit it, or remove it first)") from None
    print(f"dsocr: wrote {path}", file=sys.stderr)
    return 0
