"""A GGUF file opened by mmap (gguf.GGUFReader): keys, and tensors as views of their ggml
blocks. Nothing is dequantized or copied at load time; pages are read when a kernel first
touches them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT, GGUFReader

from dsocr import quant
from dsocr.runtime.errors import ModelError


class _Reader(GGUFReader):
    """gguf's reader over a plain ndarray view of its mapping: np.memmap's per-slice subclass
    hooks cost more than the parsing itself for the ~260k tokenizer strings (6.0 s -> 2.7 s)."""

    @property
    def data(self):
        return self._data

    @data.setter
    def data(self, value):
        self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


@dataclass
class Tensor:
    name: str
    qtype: QT
    shape: tuple[int, ...]       # numpy order: (..., rows, row_length)
    raw: np.ndarray              # uint8 (..., rows, row_bytes), a view into the mapped file

    @property
    def code(self) -> int:
        return int(self.qtype)

    @property
    def rows2d(self) -> np.ndarray:
        """The weight as a GEMM operand, uint8 [out, in * bytes]: a 2-D matrix as it is, a conv
        weight [Cout, Cin, k, k] with its (Cin, k, k) flattened into one row."""
        return self.raw.reshape(self.shape[0], -1)

    def floats(self) -> np.ndarray:
        """The tensor as float32 (a copy for quantized types; for small tensors: norms, biases, tables)."""
        return quant.dequantize(self.raw, self.qtype).reshape(self.shape)


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: no such file")
        try:
            self.reader = _Reader(self.path, "r")
        except Exception as e:  # gguf raises ValueError/struct errors/... for non-GGUF input
            raise ModelError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors: dict[str, Tensor] = {}
        for t in self.reader.tensors:
            qtype = QT(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape))
            if qtype not in quant.SUPPORTED_TYPES:
                raise ModelError(f"{self.path}: tensor {t.name} has unsupported type {qtype.name}")
            row_bytes = quant.get_format(qtype).row_bytes(shape[-1])
            raw = np.asarray(t.data).view(np.uint8).reshape(*shape[:-1], row_bytes)
            self.tensors[t.name] = Tensor(t.name, qtype, shape, raw)

    @property
    def architecture(self) -> str | None:
        return self.get("general.architecture")

    def get(self, key: str, default=None):
        f = self.reader.get_field(key)
        return default if f is None else f.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ModelError(f"{self.path}: key {key} is missing")
        return value

    def tensor(self, name: str) -> Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise ModelError(f"{self.path}: tensor {name} is missing")
        return t

    def has(self, name: str) -> bool:
        return name in self.tensors
