"""ggml block formats: one small class per type, a registry keyed by gguf.GGMLQuantizationType.

`gguf.quants` is the numpy reference (and the oracle in the tests); these classes add numba
fast paths, parallel over rows, for every format, and the K-quant quantizers gguf lacks
(whose plain-numpy reference, for the tests and benches, is devtools/kquant_reference.py).

    raw = quantize(x, GGMLQuantizationType.Q4_K)     # float32 [..., k] -> uint8 [..., row_bytes]
    x2 = dequantize(raw, GGMLQuantizationType.Q4_K)  # uint8 [..., row_bytes] -> float32 [..., k]
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dsocr.quant import rows

QT = GGMLQuantizationType


class QuantFormat:
    """A ggml storage type: `block_size` weights stored in `type_size` bytes."""
    qtype: GGMLQuantizationType
    block_size: int
    type_size: int
    formats: dict[GGMLQuantizationType, type[QuantFormat]] = {}

    def __init_subclass__(cls, qtype: GGMLQuantizationType):
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        QuantFormat.formats[qtype] = cls

    @classmethod
    def fits(cls, row_length: int) -> bool:
        return row_length % cls.block_size == 0

    @classmethod
    def row_bytes(cls, row_length: int) -> int:
        return row_length // cls.block_size * cls.type_size

    @classmethod
    def quantize(cls, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """float32 [..., k] -> uint8 [..., row_bytes(k)] (into `out` when given: no page faults)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not cls.fits(x.shape[-1]):
            raise ValueError(f"row length {x.shape[-1]} is not a multiple of the "
                             f"{cls.qtype.name} block size {cls.block_size}")
        flat = x.reshape(-1, x.shape[-1])
        shape = (*x.shape[:-1], cls.row_bytes(x.shape[-1]))
        out = np.empty(shape, np.uint8) if out is None else out
        if flat.shape[0]:
            rows.quantize_rows(int(cls.qtype), flat, out.reshape(flat.shape[0], -1))
        return out

    @classmethod
    def dequantize(cls, raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 [..., row_bytes] -> float32 [..., k] (into `out` when given)."""
        raw = np.ascontiguousarray(raw).view(np.uint8)
        if raw.shape[-1] % cls.type_size:
            raise ValueError(f"{raw.shape[-1]} bytes per row is not a whole number of "
                             f"{cls.qtype.name} blocks ({cls.type_size} bytes)")
        flat = raw.reshape(-1, raw.shape[-1])
        k = raw.shape[-1] // cls.type_size * cls.block_size
        out = np.empty((*raw.shape[:-1], k), np.float32) if out is None else out
        if flat.shape[0]:
            rows.dequantize_rows(int(cls.qtype), flat, out.reshape(flat.shape[0], k))
        return out


class F32(QuantFormat, qtype=QT.F32):
    """IEEE single precision."""


class F16(QuantFormat, qtype=QT.F16):
    """IEEE half precision, round to nearest even."""


class BF16(QuantFormat, qtype=QT.BF16):
    """bfloat16: the top half of a float32, round to nearest even."""


class Q8_0(QuantFormat, qtype=QT.Q8_0):
    """32 weights: fp16 scale d, int8 q; w = d*q."""


class Q4_0(QuantFormat, qtype=QT.Q4_0):
    """32 weights: fp16 scale d, 4-bit q; w = d*(q-8)."""


class Q4_1(QuantFormat, qtype=QT.Q4_1):
    """32 weights: fp16 scale d and min m, 4-bit q; w = d*q + m."""


class Q5_0(QuantFormat, qtype=QT.Q5_0):
    """32 weights: fp16 scale d, 5-bit q; w = d*(q-16)."""


class Q5_1(QuantFormat, qtype=QT.Q5_1):
    """32 weights: fp16 scale d and min m, 5-bit q; w = d*q + m."""


class Q4_K(QuantFormat, qtype=QT.Q4_K):
    """256 weights in 8 sub-blocks of 32 with 6-bit scales and mins; 4-bit q."""


class Q5_K(QuantFormat, qtype=QT.Q5_K):
    """256 weights in 8 sub-blocks of 32 with 6-bit scales and mins; 5-bit q."""


class Q6_K(QuantFormat, qtype=QT.Q6_K):
    """256 weights in 16 sub-blocks of 16 with int8 scales; 6-bit q; w = d*sc*(q-32)."""


def get_format(qtype: GGMLQuantizationType | int) -> type[QuantFormat]:
    try:
        return QuantFormat.formats[QT(qtype)]
    except (KeyError, ValueError):
        raise ValueError(f"unsupported ggml type {qtype!r}") from None


def quantize(x: np.ndarray, qtype: GGMLQuantizationType, out: np.ndarray | None = None) -> np.ndarray:
    return get_format(qtype).quantize(x, out)


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, out: np.ndarray | None = None) -> np.ndarray:
    return get_format(qtype).dequantize(raw, out)


SUPPORTED_TYPES = tuple(QuantFormat.formats)
