"""Model-file subcommands: convert, quantize, info, pull, models."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsocr.cli.output import human_bytes, print_table, summarize_written


def register(sub: argparse._SubParsersAction) -> None:
    from dsocr.convert.hub import DEFAULT_REPO
    from dsocr.convert.policy import LM_OUTTYPES, MMPROJ_OUTTYPES

    p = sub.add_parser("convert", help="Hugging Face checkpoint (folder or hub id) -> GGUF pair")
    p.add_argument("src", help="checkpoint folder in the deepseek-ai/DeepSeek-OCR layout, or a hub repo id")
    p.add_argument("-o", "--outdir", required=True, help="output folder")
    p.add_argument("--outtype", default="q8_0", type=str.lower, help=f"language model: {', '.join(LM_OUTTYPES)}")
    p.add_argument("--mmproj-outtype", default="f16", type=str.lower,
                   help=f"vision tower: {', '.join(MMPROJ_OUTTYPES)} (default f16)")
    p.add_argument("--name", help="file name stem (default: the model's name)")
    p.add_argument("--revision", help="hub revision when SRC is a repo id")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("quantize", help="re-quantize a GGUF (language model or mmproj)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("type", type=str.lower, help=f"{', '.join(LM_OUTTYPES)} (mmproj: {', '.join(MMPROJ_OUTTYPES)})")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("info", help="architecture, hyper-parameters and tensors of a GGUF")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("pull", help="download a checkpoint, or a ready-made GGUF pair, from the Hugging Face Hub",
                       description="Download from the Hugging Face Hub into its cache and verify the files. A "
                       f"checkpoint repo (default {DEFAULT_REPO}; DeepSeek-OCR 2 is deepseek-ai/DeepSeek-OCR-2) is "
                       "then converted with `dsocr convert`; a GGUF repo, ORG/NAME:QUANT as llama.cpp's -hf takes "
                       "it, is linked into the models folder, "
                       "ready to run. The cache answers when HF_HUB_OFFLINE=1 is set or the hub cannot be reached.",
                       epilog="example: dsocr pull ggml-org/DeepSeek-OCR-GGUF:Q8_0")
    p.add_argument("repo", nargs="?", default=None, metavar="REPO[:QUANT]",
                   help=f"hub repo id (default {DEFAULT_REPO}); :QUANT picks a GGUF repo's files")
    p.add_argument("--revision", help="branch, tag or commit")
    p.add_argument("--config", metavar="FILE", help="config.toml, for the models folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=cmd_pull)

    p = sub.add_parser("models", help="list the models in the models folder (`models rm NAME` removes one)",
                       description="The GGUF pairs in the models folder (config.toml's [models] dir) and the "
                       "config entries; ENTRY marks the active one with *. A NAME here works as --model NAME.")
    p.add_argument("--config", metavar="FILE", help="config.toml (default: $DSOCR_CONFIG or the user config dir)")
    p.set_defaults(run=cmd_models)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    rm = actions.add_parser("rm", help="remove a model (its LM file, and its mmproj unless another model uses it)")
    rm.add_argument("name", metavar="NAME", help="a NAME or ENTRY from `dsocr models`")
    # SUPPRESS: without it rm's unset --config would undo `dsocr models --config FILE rm NAME`'s
    rm.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                    help="config.toml (default: $DSOCR_CONFIG or the user config dir)")
    rm.set_defaults(run=cmd_models_rm)


def cmd_convert(args) -> int:
    from dsocr.cli.models import cache_hint, fetch_checkpoint, say
    from dsocr.convert import ConvertError, convert_checkpoint
    from dsocr.convert.hub import parse_hub_ref, plan_download
    src, download, ref = args.src, None, parse_hub_ref(args.src)
    if ref is not None:
        try:
            download = plan_download(ref, args.revision)
        except ConvertError as e:   # `a/b` is also a relative path: say that it is not one either
            raise ConvertError(f"{args.src}: no such folder, and as a hub repo: {e}") from None
        src = fetch_checkpoint(download, not args.no_progress, f"converting it into {args.outdir}", Path(args.outdir))
    files = convert_checkpoint(src, args.outdir, args.outtype, args.mmproj_outtype, args.name,
                               progress=not args.no_progress)
    summarize_written(files)
    if download:
        say(cache_hint(download))
    return 0


def cmd_quantize(args) -> int:
    from dsocr.convert import requantize
    summarize_written([requantize(args.input, args.output, args.type, progress=not args.no_progress)])
    return 0


def _settings(args):
    from dsocr.cli.config import load_settings
    return load_settings(args.config)


def cmd_pull(args) -> int:
    from dsocr.cli.models import fetch_checkpoint, pull_gguf, say
    from dsocr.convert import ConvertError, DEFAULT_REPO
    from dsocr.convert.hub import parse_hub_ref, plan_download
    src = args.repo or DEFAULT_REPO
    ref = parse_hub_ref(src)
    if ref is None:
        raise ConvertError(f"{src}: not a hub repo id (ORG/NAME, or ORG/NAME:QUANT for a GGUF repo); "
                           "a local checkpoint folder goes to `dsocr convert` instead")
    download = plan_download(ref, args.revision)
    progress = not args.no_progress
    if download.gguf:
        lm, mm = pull_gguf(download, _settings(args).models_dir(), progress)
        print(lm)
        print(mm)
        say(f"run it: dsocr ocr --model {lm.stem} IMAGE")
    else:
        folder = fetch_checkpoint(download, progress)
        print(folder)
        say(f"convert it: dsocr convert {folder} -o MODELS_DIR")
    return 0


def cmd_models(args) -> int:
    from dsocr.cli.models import model_rows
    settings = _settings(args)
    rows = model_rows(settings)
    if len(rows) == 1:
        print(f"no models in {settings.models_dir()} yet; `dsocr pull ggml-org/DeepSeek-OCR-GGUF:Q8_0`, or the "
              "first `dsocr ocr`, fetches one")
        return 0
    print_table(rows)
    return 0


def cmd_models_rm(args) -> int:
    from dsocr.cli.models import remove_model
    removed = remove_model(_settings(args), args.name)
    print(f"removed {', '.join(str(p) for p in removed)}")
    return 0


_SUMMARIZED = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
               "tokenizer.huggingface.json", "tokenizer.chat_template")


def describe_gguf(path: Path) -> dict:
    from dsocr.runtime.gguf_file import open_gguf
    reader = open_gguf(path)
    metadata = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        if key in _SUMMARIZED and isinstance(value, (list, str)):
            value = f"<{len(value)} {'entries' if isinstance(value, list) else 'chars'}>"
        metadata[key] = value
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape],
                "bytes": int(t.n_bytes)} for t in reader.tensors]
    return {"path": str(path), "architecture": metadata.get("general.architecture"),
            "file_size": path.stat().st_size, "n_tensors": len(tensors), "metadata": metadata, "tensors": tensors}


def cmd_info(args) -> int:
    info = describe_gguf(Path(args.file))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['path']}: {info['architecture']}, {info['n_tensors']} tensors, {human_bytes(info['file_size'])}")
    for key, value in info["metadata"].items():
        print(f"  {key} = {value}")
    rows = [["tensor", "type", "shape (ggml ne)", "bytes"]]
    rows += [[t["name"], t["type"], "x".join(map(str, t["shape"])), human_bytes(t["bytes"])] for t in info["tensors"]]
    print_table(rows)
    return 0
