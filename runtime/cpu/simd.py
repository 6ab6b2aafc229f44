"""Per-block SIMD dot products for the decode GEMV, as numba intrinsics in portable LLVM
vector IR (no x86-only intrinsics: the same IR becomes AVX2 here and NEON on ARM).

Why intrinsics: numba keeps LLVM's SLP vectorizer off and its loop vectorizer either
vectorizes across ggml blocks with byte gathers or reduces horizontally once per block;
both stay near 5 GB/s. ggml's answer is to keep 8 lanes of partial sums across blocks and
reduce once per row; numba has no vector types, so these intrinsics do one block's work in
vector IR and accumulate into one of four 8-float slots of a small scratch array (rotating
slots keeps the store->load chains of consecutive blocks independent).

Every kernel has the same shape:

    acc[slot] += fold8( float(fold16(w32 * x32)) * scale16 )

where w32 is the block's 32 weights decoded to integers (format specific) and x32 the
activation block as int16 (quantized once per GEMV, ggml's q8 trick). Pairwise folding of
int32 products is the shape LLVM lowers to vpmaddwd. The scale is s0 for the whole block,
times the block's own fp16 scale when the format stores one at a fixed offset (loaded with a
vector broadcast: a scalar fp16 load would be merged into a live register by vpinsrw, a false
dependency that chained every block); Q6_K's 16-weight sub-blocks take s0 and s1 for the two
halves. Float weights (F32/F16/BF16) use the same accumulation against a float activation.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from dsocr.quant.layout import (Q4_0_D, Q4_0_QS, Q4_1_D, Q4_1_QS, Q5_0_D, Q5_0_QS, Q5_1_D, Q5_1_QS, Q8_0_D,
                                Q8_0_QS)

BLOCK = 32   # weights per kernel call: a legacy block, a K-quant sub-block (the vector IR is written for 32)

F32, F16 = ir.FloatType(), ir.HalfType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
FAST = ("fast",)


def _vec(t, n):
    return ir.VectorType(t, n)


def _shuffle(builder, v, idx):
    return builder.shuffle_vector(v, v, ir.Constant(_vec(I32, len(idx)), idx))


def _splat(builder, scalar, t, n):
    v = builder.insert_element(ir.Constant(_vec(t, n), None), scalar, ir.Constant(I32, 0))
    return _shuffle(builder, v, [0] * n)


def _load(context, builder, aryty, ary, index, vtype, align):
    """Load `vtype` from &ary[index] (index in elements of the array)."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.load(builder.bitcast(builder.gep(data, [index]), vtype.as_pointer()), align=align)


def _fold(builder, v, n, integer):
    """Sum an n-lane vector down to n/2 lanes: adjacent pairs for ints (vpmaddwd), halves for floats."""
    if integer:
        lo, hi = _shuffle(builder, v, list(range(0, n, 2))), _shuffle(builder, v, list(range(1, n, 2)))
        return builder.add(lo, hi)
    lo, hi = _shuffle(builder, v, list(range(n // 2))), _shuffle(builder, v, list(range(n // 2, n)))
    return builder.fadd(lo, hi, flags=FAST)


def _accumulate(context, builder, accty, acc, slot, v8):
    data = context.make_array(accty)(context, builder, acc).data
    p = builder.bitcast(builder.gep(data, [builder.mul(slot, ir.Constant(I64, 8))]), _vec(F32, 8).as_pointer())
    builder.store(builder.fadd(builder.load(p, align=4), v8, flags=FAST), p, align=4)


def _half_splat8(context, builder, srcty, src, byte_offset):
    """The fp16 at src[byte_offset] as 8 float lanes (vpbroadcastw + vcvtph2ps)."""
    h = _load(context, builder, srcty, src, byte_offset, I16, 1)
    return builder.fpext(builder.bitcast(_splat(builder, h, I16, 8), _vec(F16, 8)), _vec(F32, 8))


def quant_block_kernel(decode, half_scale_at=None, split_scale=False):
    """An intrinsic  k(acc, slot, src, off, aux0, aux1, xq, xo, s0, s1)  for one 32-weight block:
    `decode(context, builder, srcty, src, off, aux0, aux1)` returns its weights as <32 x i32>;
    xq is the int16 activation and xo the block's first index. The block's scale is s0, times the
    fp16 at byte off+half_scale_at when given; with split_scale, s0 and s1 scale weights 0-15, 16-31."""
    @intrinsic
    def kernel(typingctx, acc, slot, src, off, aux0, aux1, xq, xo, s0, s1):
        sig = types.void(acc, slot, src, off, aux0, aux1, xq, xo, s0, s1)

        def codegen(context, builder, signature, args):
            acc_a, slot_v, src_a, off_v, a0, a1, xq_a, xo_v, s0_v, s1_v = args
            w = decode(context, builder, signature.args[2], src_a, off_v, a0, a1)
            x = builder.sext(_load(context, builder, signature.args[6], xq_a, xo_v, _vec(I16, 32), 2), _vec(I32, 32))
            p16 = _fold(builder, builder.mul(w, x), 32, True)       # 16 x i32: lanes 0-7 from weights 0-15
            if split_scale:
                lo = builder.fmul(builder.sitofp(_shuffle(builder, p16, list(range(8))), _vec(F32, 8)),
                                  _splat(builder, s0_v, F32, 8), flags=FAST)
                hi = builder.fmul(builder.sitofp(_shuffle(builder, p16, list(range(8, 16))), _vec(F32, 8)),
                                  _splat(builder, s1_v, F32, 8), flags=FAST)
                v8 = builder.fadd(lo, hi, flags=FAST)
            else:
                scale = _splat(builder, s0_v, F32, 8)
                if half_scale_at is not None:
                    at = builder.add(off_v, ir.Constant(I64, half_scale_at))
                    scale = builder.fmul(scale, _half_splat8(context, builder, signature.args[2], src_a, at), flags=FAST)
                v8 = builder.fmul(builder.sitofp(_fold(builder, p16, 16, True), _vec(F32, 8)), scale, flags=FAST)
            _accumulate(context, builder, signature.args[0], acc_a, slot_v, v8)
            return context.get_dummy_value()
        return sig, codegen
    return kernel


def float_block_kernel(load32):
    """An intrinsic  k(acc, slot, src, off, x, xo, s)  : acc[slot] += s * fold8(w32 * x32) for float
    weights; `load32(context, builder, srcty, src, off)` returns 32 weights as <32 x float>."""
    @intrinsic
    def kernel(typingctx, acc, slot, src, off, x, xo, s):
        sig = types.void(acc, slot, src, off, x, xo, s)

        def codegen(context, builder, signature, args):
            acc_a, slot_v, src_a, off_v, x_a, xo_v, s_v = args
            w = load32(context, builder, signature.args[2], src_a, off_v)
            xv = _load(context, builder, signature.args[4], x_a, xo_v, _vec(F32, 32), 4)
            v = builder.fmul(w, xv, flags=FAST)
            v = _fold(builder, _fold(builder, v, 32, False), 16, False)
            v = builder.fmul(v, _splat(builder, s_v, F32, 8), flags=FAST)
            _accumulate(context, builder, signature.args[0], acc_a, slot_v, v)
            return context.get_dummy_value()
        return sig, codegen
    return kernel


# ---------------------------------------------------------------- weight decoders (32 weights each)

def _bytes(context, builder, srcty, src, off, n):
    return _load(context, builder, srcty, src, off, _vec(I8, n), 1)


def _nibbles(builder, b, shift):
    """(b >> shift) & 15 on an unsigned byte vector."""
    n = b.type.count
    if shift:
        b = builder.lshr(b, ir.Constant(_vec(I8, n), [shift] * n))
    return builder.and_(b, ir.Constant(_vec(I8, n), [15] * n))


def _to_i32(builder, b, bias=0):
    v = builder.zext(b, _vec(I32, b.type.count))
    return builder.sub(v, ir.Constant(_vec(I32, b.type.count), [bias] * b.type.count)) if bias else v


def _concat16(builder, lo, hi):
    return builder.shuffle_vector(lo, hi, ir.Constant(_vec(I32, 32), list(range(32))))


def _decode_i8(context, builder, srcty, src, off, aux0, aux1):
    """Q8_0: 32 signed bytes."""
    return builder.sext(_bytes(context, builder, srcty, src, off, 32), _vec(I32, 32))


def _decode_nib16(bias):
    """Q4_0 / Q4_1: 16 bytes; low nibbles are weights 0-15, high nibbles 16-31."""
    def decode(context, builder, srcty, src, off, aux0, aux1):
        b = _bytes(context, builder, srcty, src, off, 16)
        return _to_i32(builder, builder.shuffle_vector(_nibbles(builder, b, 0), _nibbles(builder, b, 4),
                                                       ir.Constant(_vec(I32, 32), list(range(32)))), bias)
    return decode


def _decode_q5_32(bias):
    """Q5_0 / Q5_1: 16 nibble bytes as Q4_0, plus bit j of the 32-bit qh (aux0) as weight j's 5th bit."""
    def decode(context, builder, srcty, src, off, aux0, aux1):
        b = _bytes(context, builder, srcty, src, off, 16)
        lo = builder.shuffle_vector(_nibbles(builder, b, 0), _nibbles(builder, b, 4),
                                    ir.Constant(_vec(I32, 32), list(range(32))))
        qh = _splat(builder, builder.trunc(aux0, I32), I32, 32)
        bits = builder.and_(builder.lshr(qh, ir.Constant(_vec(I32, 32), list(range(32)))),
                            ir.Constant(_vec(I32, 32), [1] * 32))
        v = builder.or_(builder.zext(lo, _vec(I32, 32)), builder.shl(bits, ir.Constant(_vec(I32, 32), [4] * 32)))
        return builder.sub(v, ir.Constant(_vec(I32, 32), [bias] * 32)) if bias else v
    return decode


def _decode_kbits(low_shift, hi_mask, bias):
    """K-quants on 32 consecutive bytes: ((ql >> low_shift) & 15) | (((qh >> aux1) & hi_mask) << 4) - bias,
    with ql at `off` and qh at byte offset aux0 (hi_mask 0: no high bits, Q4_K)."""
    def decode(context, builder, srcty, src, off, aux0, aux1):
        v = _to_i32(builder, _nibbles(builder, _bytes(context, builder, srcty, src, off, 32), low_shift))
        if hi_mask:
            h = builder.zext(_bytes(context, builder, srcty, src, aux0, 32), _vec(I32, 32))
            h = builder.and_(builder.lshr(h, _splat(builder, builder.trunc(aux1, I32), I32, 32)),
                             ir.Constant(_vec(I32, 32), [hi_mask] * 32))
            v = builder.or_(v, builder.shl(h, ir.Constant(_vec(I32, 32), [4] * 32)))
        return builder.sub(v, ir.Constant(_vec(I32, 32), [bias] * 32)) if bias else v
    return decode


# `off` is the byte offset of the block's quants; the fp16 scale d sits at off + half_scale_at
block_q8_0 = quant_block_kernel(_decode_i8, half_scale_at=Q8_0_D - Q8_0_QS)
block_q4_0 = quant_block_kernel(_decode_nib16(8), half_scale_at=Q4_0_D - Q4_0_QS)
block_q4_1 = quant_block_kernel(_decode_nib16(0), half_scale_at=Q4_1_D - Q4_1_QS)
block_q5_0 = quant_block_kernel(_decode_q5_32(16), half_scale_at=Q5_0_D - Q5_0_QS)
block_q5_1 = quant_block_kernel(_decode_q5_32(0), half_scale_at=Q5_1_D - Q5_1_QS)
block_q4_k_lo = quant_block_kernel(_decode_kbits(0, 0, 0))
block_q4_k_hi = quant_block_kernel(_decode_kbits(4, 0, 0))
block_q5_k_lo = quant_block_kernel(_decode_kbits(0, 1, 0))
block_q5_k_hi = quant_block_kernel(_decode_kbits(4, 1, 0))
block_q6_k_lo = quant_block_kernel(_decode_kbits(0, 3, 32), split_scale=True)
block_q6_k_hi = quant_block_kernel(_decode_kbits(4, 3, 32), split_scale=True)


def _load_f32(context, builder, srcty, src, off):
    return _load(context, builder, srcty, src, off, _vec(F32, 32), 4)


def _load_f16(context, builder, srcty, src, off):
    return builder.fpext(_load(context, builder, srcty, src, off, _vec(F16, 32), 2), _vec(F32, 32))


def _load_bf16(context, builder, srcty, src, off):
    h = builder.zext(_load(context, builder, srcty, src, off, _vec(I16, 32), 2), _vec(I32, 32))
    return builder.bitcast(builder.shl(h, ir.Constant(_vec(I32, 32), [16] * 32)), _vec(F32, 32))


block_f32 = float_block_kernel(_load_f32)
block_f16 = float_block_kernel(_load_f16)
block_bf16 = float_block_kernel(_load_bf16)
