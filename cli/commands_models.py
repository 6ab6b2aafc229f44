"""Model-file subcommands: convert, quantize, info, pull."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
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

    p = sub.add_parser("pull", help="download a checkpoint from the Hugging Face Hub and verify it")
    p.add_argument("repo", nargs="?", default=None, help="hub repo id (default deepseek-ai/DeepSeek-OCR)")
    p.add_argument("--revision")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=cmd_pull)


def cmd_convert(args) -> int:
    from dsocr.cli.main import summarize_written
    from dsocr.convert import convert_checkpoint
    files = convert_checkpoint(args.src, args.outdir, args.outtype, args.mmproj_outtype, args.name,
                               args.revision, progress=not args.no_progress)
    summarize_written(files)
    return 0


def cmd_quantize(args) -> int:
    from dsocr.cli.main import summarize_written
    from dsocr.convert import requantize
    summarize_written([requantize(args.input, args.output, args.type, progress=not args.no_progress)])
    return 0


def cmd_pull(args) -> int:
    from dsocr.convert import DEFAULT_REPO, pull
    print(pull(args.repo or DEFAULT_REPO, args.revision, progress=not args.no_progress))
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
    from dsocr.cli.main import human_bytes, print_table
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
