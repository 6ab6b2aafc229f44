"""ggml block layouts, one definition per format, as ggml-common.h's `block_<type>` structs.

Type ids, (weights, bytes) per block and the K-quant sizes come from gguf
(`GGMLQuantizationType`, `GGML_QUANT_SIZES`, `QK_K`, `K_SCALE_SIZE`); this module names them
and gives each field its byte offset, the fields laid end to end and checked against gguf's
block bytes (ggml-common.h's static_asserts). Every kernel that reads or writes blocks
(quant/rows.py, runtime/cpu, runtime/cuda) takes its numbers from here. They are plain
module-level ints, which numba freezes into its kernels as compile-time constants (so after
changing one, clear numba's on-disk caches: they are keyed on each kernel's own file).
"""
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType as QT
from gguf.quants import Q4_K as _GGUF_Q4_K
from numba import njit

# ---------------------------------------------------------------- type ids (ggml's type codes)

F32, F16, BF16 = int(QT.F32), int(QT.F16), int(QT.BF16)
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = int(QT.Q8_0), int(QT.Q4_0), int(QT.Q4_1), int(QT.Q5_0), int(QT.Q5_1)
Q4_K, Q5_K, Q6_K = int(QT.Q4_K), int(QT.Q5_K), int(QT.Q6_K)

CODES = (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)
"""The storage types every kernel handles."""

HALF = 2            # bytes of a ggml_half (fp16) field
K_SCALE_SIZE = _GGUF_Q4_K.K_SCALE_SIZE   # bytes of the packed 6-bit scales and mins of Q4_K / Q5_K


def _fields(qtype: QT, *sizes: int) -> tuple[int, ...]:
    """Byte offsets of a block's fields laid end to end; their sizes must add up to gguf's block bytes."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += size
    if end != GGML_QUANT_SIZES[qtype][1]:
        raise AssertionError(f"{qtype.name} fields take {end} bytes, gguf says {GGML_QUANT_SIZES[qtype][1]}")
    return tuple(offsets)


# ---------------------------------------------------------------- float types (one weight per "block")

F32_BYTES = GGML_QUANT_SIZES[QT.F32][1]
F16_BYTES = GGML_QUANT_SIZES[QT.F16][1]
BF16_BYTES = GGML_QUANT_SIZES[QT.BF16][1]

# ---------------------------------------------------------------- 32-weight blocks

QK8_0, Q8_0_BYTES = GGML_QUANT_SIZES[QT.Q8_0]
Q8_0_D, Q8_0_QS = _fields(QT.Q8_0, HALF, QK8_0)                      # d; qs[32] int8; w = d*q

QK4_0, Q4_0_BYTES = GGML_QUANT_SIZES[QT.Q4_0]
Q4_0_D, Q4_0_QS = _fields(QT.Q4_0, HALF, QK4_0 // 2)                 # d; qs[16]: weight j low nibble, j+16 high

QK4_1, Q4_1_BYTES = GGML_QUANT_SIZES[QT.Q4_1]
Q4_1_D, Q4_1_M, Q4_1_QS = _fields(QT.Q4_1, HALF, HALF, QK4_1 // 2)   # d; m; qs[16]; w = d*q + m

QK5_0, Q5_0_BYTES = GGML_QUANT_SIZES[QT.Q5_0]
Q5_0_D, Q5_0_QH, Q5_0_QS = _fields(QT.Q5_0, HALF, 4, QK5_0 // 2)     # d; qh (u32, 5th bits); qs[16]

QK5_1, Q5_1_BYTES = GGML_QUANT_SIZES[QT.Q5_1]
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = _fields(QT.Q5_1, HALF, HALF, 4, QK5_1 // 2)   # d; m; qh; qs[16]

# ---------------------------------------------------------------- K-quants (QK_K-weight super-blocks)

# d, dmin; scales: 8 packed 6-bit (scale, min) pairs; qs: 4-bit quants, 64 weights per 32 bytes
Q4_K_BYTES = GGML_QUANT_SIZES[QT.Q4_K][1]
Q4_K_D, Q4_K_DMIN, Q4_K_SCALES, Q4_K_QS = _fields(QT.Q4_K, HALF, HALF, K_SCALE_SIZE, QK_K // 2)

# as Q4_K, plus qh: the 5th bits (bit 2c+h of byte l for weight 64c + 32h + l)
Q5_K_BYTES = GGML_QUANT_SIZES[QT.Q5_K][1]
Q5_K_D, Q5_K_DMIN, Q5_K_SCALES, Q5_K_QH, Q5_K_QS = _fields(QT.Q5_K, HALF, HALF, K_SCALE_SIZE, QK_K // 8, QK_K // 2)

# Q4_K and Q5_K share their head (d, dmin, scales), and the kernels one piece of code for it
if (Q4_K_D, Q4_K_DMIN, Q4_K_SCALES) != (Q5_K_D, Q5_K_DMIN, Q5_K_SCALES):
    raise AssertionError("Q4_K and Q5_K heads differ")

# ql: low 4 bits; qh: high 2 bits; scales: int8, one per 16 weights; d; w = d*sc*(q-32)
Q6_K_BYTES = GGML_QUANT_SIZES[QT.Q6_K][1]
Q6_K_QL, Q6_K_QH, Q6_K_SCALES, Q6_K_D = _fields(QT.Q6_K, QK_K // 2, QK_K // 4, QK_K // 16, HALF)


@njit(cache=True)
def check_code(code):
    """Raise ValueError unless `code` is one of CODES. Kernels call it before their parallel loops:
    a raise inside a prange body would serialise the loop."""
    for known in CODES:
        if code == known:
            return
    raise ValueError("unsupported ggml type code " + str(code))
