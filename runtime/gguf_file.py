"""A GGUF file opened by mmap (gguf.GGUFReader): keys, and tensors as views of their ggml
blocks. Nothing is dequantized or copied at load time; pages are read when a kernel first
touches them.

gguf.GGUFReader believes every count and length a header declares (an array claiming 2**40
elements in a 170-byte file is walked element by element), so every GGUF is opened through
`open_gguf`: one bounds-checked pass over the header first, the reader only if it passes."""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType as QT, GGUFReader
from gguf import GGUFValueType as VT
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from dsocr import quant
from dsocr.runtime.errors import ModelError
from dsocr.runtime.tensor_specs import Shape, shape_problem

# Limits of llama.cpp's loader (gguf.cpp), which the reader lacks.
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64       # a tensor name is shorter than this, in bytes
# Sane caps on what a header may declare. The reader builds numpy views per array element
# (~0.7 KB per number, ~1.3 KB per string, measured), so the elements of all arrays together
# are capped: DeepSeek-OCR's 129,280-token vocabulary (tokens, types, merges) needs ~0.4 M.
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
MAX_ARRAY_ELEMENTS = 1 << 20

_SCALAR_BYTES = {t: np.dtype(d).itemsize for t, d in GGUFReader.gguf_scalar_to_np.items()}
_STRING_MIN = 8                        # its uint64 length
_KV_MIN = _STRING_MIN + 4 + 1          # key, value type, the smallest value
_TENSOR_INFO_MIN = _STRING_MIN + 4 + 8 + 4 + 8   # name, n_dims, one dim, type, offset
_READER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")   # names the reader adds itself


class _HeaderScan:
    """One pass over a GGUF header in which every declared count and length is checked against
    the bytes left in the file (and the caps above) before anything is read."""

    def __init__(self, buf, path: Path):
        self.buf, self.size, self.pos, self.path = buf, len(buf), 0, path
        self.elements = 0

    def fail(self, what: str):
        raise ModelError(f"{self.path}: truncated or corrupt GGUF: {what}")

    def left(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> int:
        if n > self.left():
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, {self.left()} left")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buf, self.skip(struct.calcsize(fmt), what))

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        start = self.skip(n, what)
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, vtype: int, what: str) -> None:
        if vtype in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[vtype], what)
        elif vtype == VT.STRING:
            self.string(what)
        elif vtype == VT.ARRAY:
            self.array(what)
        else:
            self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str) -> None:
        itype, n = self.u32(what), self.u64(what)
        if itype == VT.ARRAY:   # gguf's reader flattens them (a FIXME there); llama.cpp refuses them
            self.fail(f"{what} is an array of arrays")
        if itype != VT.STRING and itype not in _SCALAR_BYTES:
            self.fail(f"{what} has unknown array element type {itype}")
        least = n * _SCALAR_BYTES.get(itype, _STRING_MIN)
        if least > self.left():
            self.fail(f"{what} declares {n} {VT(itype).name} elements (at least {least} bytes) at offset "
                      f"{self.pos}, {self.left()} left")
        self.elements += n
        if self.elements > MAX_ARRAY_ELEMENTS:
            self.fail(f"{what} brings the metadata arrays to {self.elements} elements, over {MAX_ARRAY_ELEMENTS}")
        if itype == VT.STRING:
            for _ in range(n):
                self.string(what)
        else:
            self.skip(least, what)

    def count(self, n: int, least_each: int, cap: int, what: str) -> None:
        if n > cap or n * least_each > self.left():
            self.fail(f"the header declares {n} {what} (at most {cap}, at least {least_each} bytes each) "
                      f"and {self.left()} bytes are left")

    def run(self) -> None:
        if bytes(self.buf[:4]) != struct.pack("<I", GGUF_MAGIC):
            raise ModelError(f"{self.path}: not a GGUF file (it starts with {bytes(self.buf[:4])!r}, not b'GGUF')")
        self.pos = 4
        version = self.u32("the version")
        if version not in READER_SUPPORTED_VERSIONS:   # a big-endian file's 3 reads as 3 << 24 here
            raise ModelError(f"{self.path}: GGUF version {version} is not supported (little-endian "
                             f"versions {', '.join(map(str, READER_SUPPORTED_VERSIONS))})")
        n_tensors, n_kv = self.u64("the tensor count"), self.u64("the key count")
        self.count(n_kv, _KV_MIN, MAX_KEYS, "keys")
        self.count(n_tensors, _TENSOR_INFO_MIN, MAX_TENSORS, "tensors")
        alignment = GGUF_DEFAULT_ALIGNMENT
        keys = set(_READER_FIELDS)
        for i in range(n_kv):
            key = self.string(f"key #{i}")
            if key in keys:
                self.fail(f"key {key} appears twice")
            keys.add(key)
            vtype = self.u32(f"key {key}")
            if key == "general.alignment":
                if vtype != VT.UINT32:
                    self.fail("general.alignment is not a UINT32")
                alignment = self.u32(key)
                if alignment == 0 or alignment & (alignment - 1):
                    self.fail(f"general.alignment {alignment} is not a power of two")
            else:
                self.value(vtype, f"key {key}")
        self.count(n_tensors, _TENSOR_INFO_MIN, MAX_TENSORS, "tensors")   # again, with the keys behind
        tensors = {}
        for i in range(n_tensors):
            name = self.string(f"tensor #{i}'s name")
            if len(name.encode()) >= GGML_MAX_NAME:
                self.fail(f"tensor name {name[:GGML_MAX_NAME]}... is {GGML_MAX_NAME} bytes or longer")
            if name in tensors:
                self.fail(f"tensor {name} appears twice")
            n_dims = self.u32(f"tensor {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                self.fail(f"tensor {name} has {n_dims} dimensions (1 to {GGML_MAX_DIMS})")
            dims = self.unpack(f"<{n_dims}Q", f"tensor {name}")
            if min(dims) < 1:
                self.fail(f"tensor {name} has an empty dimension {list(dims)}")
            raw_type = self.u32(f"tensor {name}")
            if raw_type not in GGML_QUANT_SIZES:
                self.fail(f"tensor {name} has unknown ggml type {raw_type}")
            block, type_bytes = GGML_QUANT_SIZES[QT(raw_type)]
            if dims[0] % block:
                self.fail(f"tensor {name}'s rows of {dims[0]} are not whole {QT(raw_type).name} blocks of {block}")
            offset = self.u64(f"tensor {name}")
            if offset % alignment:
                self.fail(f"tensor {name}'s data offset {offset} is not a multiple of the alignment {alignment}")
            tensors[name] = (offset, math.prod(dims) // block * type_bytes)
        data_start = self.pos + (-self.pos % alignment)
        for name, (offset, nbytes) in tensors.items():
            if data_start + offset + nbytes > self.size:
                self.fail(f"tensor {name}'s {nbytes} bytes at offset {data_start + offset} run past the end "
                          f"of the file ({self.size} bytes)")


def check_gguf(path: Path) -> None:
    """Raise ModelError unless PATH's header is one gguf's reader can parse without trusting it."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) < 4:
                raise ModelError(f"{path}: not a GGUF file ({f.tell()} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _HeaderScan(buf, path).run()
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None


def open_gguf(path: str | Path) -> GGUFReader:
    """gguf's reader over PATH once its header passed `check_gguf`; ModelError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    check_gguf(path)
    try:
        return _Reader(path, "r")
    except (ValueError, KeyError, IndexError) as e:  # the reader's refusals, should the scan miss one
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


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
        self.reader = open_gguf(self.path)
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

    def tensor(self, name: str, expected: Shape) -> Tensor:
        """The tensor `name`, refused unless its shape is `expected` (a runtime.tensor_specs table's
        entry): the kernels trust the shapes they are handed."""
        t = self.tensors.get(name)
        if t is None:
            raise ModelError(f"{self.path}: tensor {name} is missing")
        problem = shape_problem(name, t.shape, expected)
        if problem:
            raise ModelError(f"{self.path}: {problem}")
        return t

    def has(self, name: str) -> bool:
        return name in self.tensors
