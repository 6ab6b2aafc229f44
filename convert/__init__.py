"""Hugging Face checkpoint -> the llama.cpp-compatible GGUF pair, and GGUF -> GGUF re-quantization.

    convert_checkpoint("deepseek-ai/DeepSeek-OCR", "models", outtype="q8_0")
    -> models/DeepSeek-OCR-Q8_0.gguf, models/mmproj-DeepSeek-OCR-F16.gguf
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from dsocr import quant
from dsocr.convert import deepseek_ocr as dso
from dsocr.convert.checkpoint import Checkpoint, ConvertError
from dsocr.convert.gguf_out import OutTensor, WrittenFile, discard, publish, write_gguf, write_gguf_part
from dsocr.convert.hub import DEFAULT_REPO, looks_like_repo_id, pull
from dsocr.convert.policy import LM_OUTTYPES, MMPROJ_OUTTYPES, OutType, lm_tensor_type, mmproj_tensor_type
from dsocr.runtime.gguf_file import open_gguf

__all__ = ["convert_checkpoint", "requantize", "pull", "ConvertError", "LM_OUTTYPES", "MMPROJ_OUTTYPES",
           "DEFAULT_REPO", "output_names"]


def _outtype(name: str, table: dict[str, OutType], what: str) -> OutType:
    try:
        return table[name.lower()]
    except KeyError:
        raise ConvertError(f"unknown {what} type {name!r}; choose one of: {', '.join(table)}") from None


def output_names(name: str, outtype: str, mmproj_outtype: str) -> tuple[str, str]:
    return f"{name}-{outtype.upper()}.gguf", f"mmproj-{name}-{mmproj_outtype.upper()}.gguf"


def resolve_checkpoint(src: str | Path, revision: str | None = None, progress: bool = True) -> Checkpoint:
    src = str(src)
    if looks_like_repo_id(src):
        return Checkpoint(pull(src, revision, progress))
    return Checkpoint(Path(src).expanduser())


def convert_checkpoint(src: str | Path, outdir: str | Path, outtype: str = "q8_0", mmproj_outtype: str = "f16",
                       name: str | None = None, revision: str | None = None,
                       progress: bool = True) -> list[WrittenFile]:
    """Write OUTDIR/NAME-TYPE.gguf (language model) and OUTDIR/mmproj-NAME-TYPE.gguf (vision)."""
    lm_out = _outtype(outtype, LM_OUTTYPES, "language-model output")
    mm_out = _outtype(mmproj_outtype, MMPROJ_OUTTYPES, "mmproj output")
    ckpt = resolve_checkpoint(src, revision, progress)
    stem = name or dso.default_name(ckpt)
    lm_name, mm_name = output_names(stem, lm_out.name, mm_out.name)
    lm_plan = dso.plan_lm(ckpt, lm_out)
    mm_plan = dso.plan_mmproj(ckpt, mm_out)
    outdir = Path(outdir).expanduser()
    # Both files are written as .part before either replaces a file of an earlier pair.
    lm = write_gguf_part(outdir / lm_name, dso.LM_ARCH, lm_plan,
                         lambda w: dso.write_lm_keys(ckpt, w, lm_out, name), progress)
    try:
        mm = write_gguf_part(outdir / mm_name, dso.MMPROJ_ARCH, mm_plan,
                             lambda w: dso.write_mmproj_keys(ckpt, w, mm_out, name), progress)
    except BaseException:
        discard([lm])
        raise
    return publish([lm, mm])


class GGUFTensorSource:
    """A tensor of an existing GGUF file as rows of float32 (or its raw blocks)."""

    def __init__(self, t):
        self.qtype = QT(t.tensor_type)
        self.data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
        self.rows = self.data.shape[0]
        self.row_length = int(t.shape[0])          # ggml ne[0]

    def raw_rows(self, start: int, stop: int) -> np.ndarray:
        return self.data[start:stop].view(np.uint8)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return quant.dequantize(self.raw_rows(start, stop), self.qtype)


REQUANT_SOURCES = {QT.F32, QT.F16, QT.BF16, QT.Q8_0}


def _count_key(reader: gguf.GGUFReader, src: Path, key: str) -> int:
    f = reader.get_field(key)
    value = None if f is None else f.contents()
    if not isinstance(value, int):
        raise ConvertError(f"{src}: key {key} is {'missing' if f is None else 'not an integer'}")
    return value


def requantize(src: str | Path, dst: str | Path, outtype: str, progress: bool = True) -> WrittenFile:
    """Re-quantize a GGUF of either kind (language model or mmproj) with the conversion rules."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ConvertError("the output must be a different file from the input")
    reader = open_gguf(src)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field else None
    if arch == dso.LM_ARCH:
        out = _outtype(outtype, LM_OUTTYPES, "language-model output")
        n_layer, n_expert = (_count_key(reader, src, f"{arch}.{k}") for k in ("block_count", "expert_count"))
        choose = lambda n, s: lm_tensor_type(n, s, out, n_layer, n_expert)
    elif arch == dso.MMPROJ_ARCH:
        out = _outtype(outtype, MMPROJ_OUTTYPES, "mmproj output")
        choose = lambda n, s: mmproj_tensor_type(n, s, out)
    else:
        raise ConvertError(f"{src}: architecture {arch!r} is not a DeepSeek-OCR file "
                           f"({dso.LM_ARCH} or an mmproj)")
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        source = GGUFTensorSource(t)
        qtype, requested = choose(t.name, shape)
        if qtype == QT.F32 and source.qtype != QT.F32:   # never-quantized tensors stay as they are
            qtype = source.qtype
        if qtype != source.qtype and source.qtype not in REQUANT_SOURCES:
            raise ConvertError(f"{src}: tensor {t.name} is {source.qtype.name}; re-quantize from an "
                               "F32, F16, BF16 or Q8_0 file")
        tensors.append(OutTensor(t.name, shape, qtype, [source], requested))

    def copy_keys(w: gguf.GGUFWriter) -> None:
        for key, f in reader.fields.items():
            if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
                continue
            if key == gguf.Keys.General.FILE_TYPE:
                w.add_file_type(out.ftype)
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), vtype, sub_type=sub)

    return write_gguf(dst, arch, tensors, copy_keys, progress)
