"""Scalar bit-level helpers for numba kernels, matching ggml bit for bit.

numba has no scalar bitcast, so two tiny LLVM intrinsics provide one. On top of them:
ggml's software fp16 <-> fp32 conversions (the FP16 library algorithm ggml-base uses,
round-to-nearest-even), bf16 rounding, and ggml's `nearest_int`.

numba promotes small integers to int64 in arithmetic, so 32-bit wrap-around is
spelled out with masks.
"""
import platform

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# CPUs that convert half -> float in hardware (vcvtph2ps / fcvt): LLVM lowers fpext to it and
# vectorizes; elsewhere the software conversion below is used.
NATIVE_HALF = platform.machine().lower() in ("aarch64", "arm64") or "+f16c" in llvm.get_host_cpu_features().flatten()


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32 as uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, x):
    """The float32 whose IEEE bits are the low 32 bits of an integer."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())
    return types.float32(x), codegen


_SCALE_TO_INF = np.float32(2.0 ** 112)
_SCALE_TO_ZERO = np.float32(2.0 ** -110)
_EXP_SCALE = np.float32(2.0 ** -112)
_HALF = np.float32(0.5)
_MAGIC_ROUND = np.float32(12582912.0)  # 1.5 * 2**23


@njit(cache=True, inline="always")
def fp32_to_fp16(f):
    """ggml_compute_fp32_to_fp16: float32 -> IEEE half bits (uint16), round to nearest even."""
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = np.int64(f32_bits(f))
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = bits_f32((bias >> 1) + 0x07800000) + base
    b = np.int64(f32_bits(base))
    nonsign = ((b >> 13) & 0x7C00) + (b & 0x0FFF)
    if shl1_w > 0xFF000000:
        nonsign = 0x7E00
    return np.uint16((sign >> 16) | nonsign)


@intrinsic
def _half_bits_to_f32(typingctx, h):
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@njit(cache=True, inline="always")
def _fp16_to_fp32_native(h):
    return _half_bits_to_f32(np.uint16(h))


@njit(cache=True, inline="always")
def _fp16_to_fp32_soft(h):
    """ggml_compute_fp16_to_fp32: IEEE half bits -> float32 (exact)."""
    w = np.int64(h) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    if two_w < (1 << 27):
        v = bits_f32((two_w >> 17) | (126 << 23)) - _HALF
    else:
        v = bits_f32((two_w >> 4) + (0xE0 << 23)) * _EXP_SCALE
    return bits_f32(sign | np.int64(f32_bits(v)))


fp16_to_fp32 = _fp16_to_fp32_native if NATIVE_HALF else _fp16_to_fp32_soft


@njit(cache=True, inline="always")
def load_fp16(raw, offset):
    """Little-endian half at raw[offset:offset+2] (uint8 array) as float32."""
    return fp16_to_fp32(np.uint16(raw[offset]) | (np.uint16(raw[offset + 1]) << 8))


@njit(cache=True, inline="always")
def store_fp16(raw, offset, f):
    h = fp32_to_fp16(f)
    raw[offset] = np.uint8(h & 0xFF)
    raw[offset + 1] = np.uint8(h >> 8)


@njit(cache=True, inline="always")
def fp32_to_bf16(f):
    """ggml_compute_fp32_to_bf16: round to nearest even, NaN forced quiet."""
    u = np.int64(f32_bits(f))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16((u >> 16) | 64)
    return np.uint16((u + (0x7FFF + ((u >> 16) & 1))) >> 16)


@njit(cache=True, inline="always")
def bf16_to_fp32(h):
    return bits_f32(np.int64(h) << 16)


@njit(cache=True, inline="always")
def nearest_int(f):
    """ggml's nearest_int: round half to even through the 1.5*2**23 trick (bit for bit)."""
    v = f + _MAGIC_ROUND
    return np.int64(f32_bits(v) & 0x007FFFFF) - 0x00400000
