"""A Hugging Face checkpoint folder in the layout of deepseek-ai/DeepSeek-OCR (or -OCR-2), read lazily.

Safetensors files are parsed from their header and read with positioned reads, a block of
rows at a time, so converting a 6.7 GB checkpoint never holds more than one block of one
tensor in memory (mmap would leave every page touched in the resident set).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class ConvertError(Exception):
    """A problem with the user's input or output, reported as one line."""


ARCHITECTURES = ("DeepseekOCRForCausalLM", "DeepseekOCR2ForCausalLM")   # DeepSeek-OCR, DeepSeek-OCR 2
_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    file: "SafetensorsFile"
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int      # absolute byte offset of the data in the file

    @property
    def rows(self) -> int:
        """Rows when viewed as 2-D [prod(shape[:-1]), shape[-1]] (a 1-D tensor is one row)."""
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1

    @property
    def row_length(self) -> int:
        return self.shape[-1] if self.shape else 1

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the 2-D view as float32."""
        return self.file.read(self, start, stop)

    def read(self) -> np.ndarray:
        return self.read_rows(0, self.rows).reshape(self.shape)


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConvertError(f"{self.path}: not a safetensors file (truncated header)")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise ConvertError(f"{self.path}: corrupt or truncated safetensors header")
                header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConvertError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        except OSError as e:
            raise ConvertError(f"{self.path}: cannot read ({e.strerror or e})") from None
        if not isinstance(header, dict):
            raise ConvertError(f"{self.path}: corrupt safetensors header")
        self.tensors: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{self.path}: corrupt header entry for {name!r}") from None
            if dtype not in _DTYPES:
                raise ConvertError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            if end - start != math.prod(shape) * _DTYPES[dtype] or start < 0:
                raise ConvertError(f"{self.path}: corrupt header entry for {name!r} (size mismatch)")
            if 8 + n + end > size:
                raise ConvertError(f"{self.path}: truncated (tensor {name!r} runs past the end of the file)")
            self.tensors[name] = TensorEntry(self, name, dtype, shape, 8 + n + start)

    def read(self, entry: TensorEntry, start: int, stop: int) -> np.ndarray:
        itemsize = _DTYPES[entry.dtype]
        row_bytes = entry.row_length * itemsize
        nbytes = (stop - start) * row_bytes
        buf = np.empty(nbytes, np.uint8)
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [memoryview(buf)], entry.offset + start * row_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            raise ConvertError(f"{self.path}: cannot read tensor {entry.name!r} ({e.strerror or e})") from None
        if got != nbytes:
            raise ConvertError(f"{self.path}: truncated while reading tensor {entry.name!r}")
        if entry.dtype == "BF16":
            out = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif entry.dtype == "F16":
            out = buf.view(np.float16).astype(np.float32)
        else:
            out = buf.view(np.float32)
        return out.reshape(stop - start, entry.row_length)


class Checkpoint:
    """config.json + tokenizer files + safetensors shards of one DeepSeek-OCR (or -OCR-2) checkpoint."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConvertError(f"{self.folder}: no such checkpoint folder")
        self.config = self._read_json("config.json")
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        if not set(ARCHITECTURES) & set(map(str, archs)):
            raise ConvertError(f"{self.folder / 'config.json'}: architecture {', '.join(map(str, archs))} "
                               f"is not DeepSeek-OCR ({' or '.join(ARCHITECTURES)})")
        if not (self.folder / "tokenizer.json").is_file():
            raise ConvertError(f"{self.folder}: tokenizer.json is missing")
        self.files = self._shard_files()
        self.tensors: dict[str, TensorEntry] = {}
        for f in self.files:
            sf = SafetensorsFile(f)
            self.tensors.update(sf.tensors)

    def _read_json(self, name: str, required: bool = True) -> dict:
        path = self.folder / name
        if not path.is_file():
            if required:
                raise ConvertError(f"{self.folder}: {name} is missing")
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{path}: not valid JSON ({e})") from None

    def _shard_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = self._read_json(index.name).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index}: no weight_map")
            names = list(dict.fromkeys(weight_map.values()))
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise ConvertError(f"{self.folder}: shard(s) listed in the index are missing: {', '.join(missing)}")
            return [self.folder / n for n in names]
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single]
        raise ConvertError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")

    def optional_json(self, name: str) -> dict:
        return self._read_json(name, required=False)

    def ordered_names(self) -> list[str]:
        """Tensor names in the order llama.cpp's converter visits them: shard by shard, sorted."""
        order = []
        for f in self.files:
            order += sorted(n for n, e in self.tensors.items() if e.file.path == f)
        return order
