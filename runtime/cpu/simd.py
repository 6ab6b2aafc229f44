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

On AVX-512 VNNI hosts (features.AVX512_VNNI) the Q8_0, Q5_0, Q4_K and Q6_K kernels call vpdpbusd explicitly
(LLVM does not form it from the portable IR): 64 unsigned x signed bytes -> 16 int32 lanes of
4-byte sums, two 32-weight blocks per instruction, lanes 0-7 from the first and 8-15 from the
second, scaled per block in float and accumulated into 16-lane slots; the K-quants a whole
super-block per call, scales decoded as vectors. They read the activation as int8 (xb). Q8_0
weights are signed: ggml's sign trick, |w| x (x with w's sign); Q6_K's -32 offset is a second
vpdpbusd of 32s with x.
"""
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from dsocr.quant.layout import (Q4_0_D, Q4_0_QS, Q4_1_D, Q4_1_QS, Q4_K_D, Q4_K_DMIN, Q4_K_QS, Q4_K_SCALES,
                                Q5_0_BYTES, Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_1_D, Q5_1_QS, Q6_K_D, Q6_K_QH, Q6_K_QL,
                                Q6_K_SCALES, Q8_0_BYTES, Q8_0_D, Q8_0_QS)
from dsocr.runtime.cpu.features import AVX512_VNNI

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


@intrinsic
def sum32(typingctx, acc):
    """The sum of the 32 floats of acc as a halving tree (log-depth; a scalar loop is a 31-add chain)."""
    def codegen(context, builder, signature, args):
        v = _load(context, builder, signature.args[0], args[0], ir.Constant(I64, 0), _vec(F32, 32), 4)
        for n in (32, 16, 8, 4, 2):
            v = _fold(builder, v, n, False)
        return builder.extract_element(v, ir.Constant(I32, 0))
    return types.float32(acc), codegen


@intrinsic
def prefetch(typingctx, src, off):
    """Ask for the cache line of src[off] ahead of its use (llvm.prefetch: read, keep in all levels)."""
    def codegen(context, builder, signature, args):
        p8 = I8.as_pointer()
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        p = builder.bitcast(builder.gep(data, [args[1]]), p8)
        fn = builder.module.globals.get("llvm.prefetch.p0i8") or \
            ir.Function(builder.module, ir.FunctionType(ir.VoidType(), [p8, I32, I32, I32]), "llvm.prefetch.p0i8")
        builder.call(fn, [p, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])
        return context.get_dummy_value()
    return types.void(src, off), codegen


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


# ---------------------------------------------------------------- AVX-512 VNNI: two blocks per vpdpbusd

def _require_vnni():
    if not AVX512_VNNI:
        raise TypingError("vpdpbusd kernels need an AVX-512 VNNI host")


def _pair16(builder, a, b, t):
    """<16 x t>: a in lanes 0-7, b in lanes 8-15."""
    v = builder.insert_element(ir.Constant(_vec(t, 16), None), a, ir.Constant(I32, 0))
    v = builder.insert_element(v, b, ir.Constant(I32, 8))
    return _shuffle(builder, v, [0] * 8 + [8] * 8)


def _concat(builder, lo, hi):
    n = lo.type.count
    return builder.shuffle_vector(lo, hi, ir.Constant(_vec(I32, 2 * n), list(range(2 * n))))


def _dpbusd(builder, u64, s64):
    """vpdpbusd from zero, as float: lane i = sum of u64[4i:4i+4] (unsigned) * s64[4i:4i+4] (signed)."""
    v16, name = _vec(I32, 16), "llvm.x86.avx512.vpdpbusd.512"
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(v16, [v16] * 3), name)
    p = builder.call(fn, [ir.Constant(v16, None), builder.bitcast(u64, v16), builder.bitcast(s64, v16)])
    return builder.sitofp(p, _vec(F32, 16))


def _accumulate16(context, builder, accty, acc, slot, v16):
    data = context.make_array(accty)(context, builder, acc).data
    p = builder.bitcast(builder.gep(data, [builder.mul(slot, ir.Constant(I64, 16))]), _vec(F32, 16).as_pointer())
    builder.store(builder.fadd(builder.load(p, align=4), v16, flags=FAST), p, align=4)


def _half(context, builder, srcty, src, byte_offset):
    return builder.fpext(builder.bitcast(_load(context, builder, srcty, src, byte_offset, I16, 1), F16), F32)


@intrinsic
def block_q8_0_pair_vnni(typingctx, acc, slot, src, off, xb, xo, s0, s1):
    """acc[16*slot:][:16] += two consecutive Q8_0 blocks (quants of the first at byte `off`) times the
    int8 activation xb[xo:xo+64], scaled by their fp16 d times s0, s1. ggml's sign trick: |w| times
    x carrying w's sign (|-128| = 128 as an unsigned byte; activation quants are within +-127)."""
    _require_vnni()
    sig = types.void(acc, slot, src, off, xb, xo, s0, s1)

    def codegen(context, builder, signature, args):
        acc_a, slot_v, src_a, off_v, xb_a, xo_v, s0_v, s1_v = args
        srcty = signature.args[2]
        second = builder.add(off_v, ir.Constant(I64, Q8_0_BYTES))
        w = _concat(builder, _bytes(context, builder, srcty, src_a, off_v, 32),
                    _bytes(context, builder, srcty, src_a, second, 32))
        x = _load(context, builder, signature.args[4], xb_a, xo_v, _vec(I8, 64), 1)
        zero = ir.Constant(_vec(I8, 64), None)
        neg = builder.icmp_signed("<", w, zero)
        p = _dpbusd(builder, builder.select(neg, builder.sub(zero, w), w), builder.select(neg, builder.sub(zero, x), x))
        at = ir.Constant(I64, Q8_0_D - Q8_0_QS)
        d = _pair16(builder, _load(context, builder, srcty, src_a, builder.add(off_v, at), I16, 1),
                    _load(context, builder, srcty, src_a, builder.add(second, at), I16, 1), I16)
        scale = builder.fmul(builder.fpext(builder.bitcast(d, _vec(F16, 16)), _vec(F32, 16)),
                             _pair16(builder, s0_v, s1_v, F32), flags=FAST)
        _accumulate16(context, builder, signature.args[0], acc_a, slot_v, builder.fmul(p, scale, flags=FAST))
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def block_q5_0_pair_vnni(typingctx, acc, slot, src, off, xb, xo, s0, s1):
    """acc[16*slot:][:16] += two consecutive Q5_0 blocks (the first at byte `off`) times the int8
    activation xb[xo:xo+64], scaled by their fp16 d times s0, s1: the 5-bit quants (nibble | qh's
    bit j << 4, unsigned 0-31) in one vpdpbusd, the -16 offset a second one of 16s with x."""
    _require_vnni()
    sig = types.void(acc, slot, src, off, xb, xo, s0, s1)

    def codegen(context, builder, signature, args):
        acc_a, slot_v, src_a, off_v, xb_a, xo_v, s0_v, s1_v = args
        srcty = signature.args[2]
        at = lambda o, n: builder.add(o, ir.Constant(I64, n))   # noqa: E731

        def quants(o):
            b = _bytes(context, builder, srcty, src_a, at(o, Q5_0_QS), 16)
            lo = _concat(builder, _nibbles(builder, b, 0), _nibbles(builder, b, 4))
            qh = _splat(builder, _load(context, builder, srcty, src_a, at(o, Q5_0_QH), I32, 1), I32, 32)
            bits = builder.and_(builder.lshr(qh, ir.Constant(_vec(I32, 32), list(range(32)))),
                                ir.Constant(_vec(I32, 32), [1] * 32))
            hi = builder.shl(builder.trunc(bits, _vec(I8, 32)), ir.Constant(_vec(I8, 32), [4] * 32))
            return builder.or_(lo, hi)
        second = at(off_v, Q5_0_BYTES)
        x = _load(context, builder, signature.args[4], xb_a, xo_v, _vec(I8, 64), 1)
        p = builder.fsub(_dpbusd(builder, _concat(builder, quants(off_v), quants(second)), x),
                         _dpbusd(builder, ir.Constant(_vec(I8, 64), [16] * 64), x), flags=FAST)
        d = _pair16(builder, _load(context, builder, srcty, src_a, at(off_v, Q5_0_D), I16, 1),
                    _load(context, builder, srcty, src_a, at(second, Q5_0_D), I16, 1), I16)
        scale = builder.fmul(builder.fpext(builder.bitcast(d, _vec(F16, 16)), _vec(F32, 16)),
                             _pair16(builder, s0_v, s1_v, F32), flags=FAST)
        _accumulate16(context, builder, signature.args[0], acc_a, slot_v, builder.fmul(p, scale, flags=FAST))
        return context.get_dummy_value()
    return sig, codegen


def _scales_mins_k4(builder, q):
    """get_scale_min_k4 for all 8 sub-blocks at once: the 12 packed bytes (of <16 x i8> q) ->
    (scales, mins) as <8 x i8>."""
    def pick(idx):
        return _shuffle(builder, q, idx)

    def c8(v):
        return ir.Constant(_vec(I8, 8), [v] * 8)
    low = ir.Constant(_vec(ir.IntType(1), 8), [1] * 4 + [0] * 4)
    a, b = pick([0, 1, 2, 3, 8, 9, 10, 11]), pick([0, 1, 2, 3] * 2)
    c, e = pick([4, 5, 6, 7, 8, 9, 10, 11]), pick([4, 5, 6, 7] * 2)
    top = builder.shl(builder.lshr(b, c8(6)), c8(4))
    sc = builder.select(low, builder.and_(a, c8(63)), builder.or_(builder.and_(a, c8(15)), top))
    top = builder.shl(builder.lshr(e, c8(6)), c8(4))
    m = builder.select(low, builder.and_(c, c8(63)), builder.or_(builder.lshr(c, c8(4)), top))
    return sc, m


@intrinsic
def block_q4_k_vnni(typingctx, acc, slot, src, off, xb, xd, xs, sb):
    """acc[16*slot:][:16] += one Q4_K super-block at byte `off` times the int8 activation from
    sub-block sb on (xb, scales xd, sums xs): per 32-byte chunk one load, its low nibbles sub-block
    2c and its high nibbles 2c+1 in one vpdpbusd; scales and mins of the 8 sub-blocks decoded as
    vectors, the mins subtracted in lanes 0-7."""
    _require_vnni()
    sig = types.void(acc, slot, src, off, xb, xd, xs, sb)

    def codegen(context, builder, signature, args):
        acc_a, slot_v, src_a, off_v, xb_a, xd_a, xs_a, sb_v = args
        srcty = signature.args[2]
        at = lambda n: builder.add(off_v, ir.Constant(I64, n))   # noqa: E731
        f8 = _vec(F32, 8)
        sc, m = _scales_mins_k4(builder, _bytes(context, builder, srcty, src_a, at(Q4_K_SCALES), 16))
        xd8 = _load(context, builder, signature.args[5], xd_a, sb_v, f8, 4)
        xs8 = _load(context, builder, signature.args[6], xs_a, sb_v, f8, 4)
        d = _splat(builder, _half(context, builder, srcty, src_a, at(Q4_K_D)), F32, 8)
        dmin = _splat(builder, _half(context, builder, srcty, src_a, at(Q4_K_DMIN)), F32, 8)
        scale8 = builder.fmul(builder.fmul(builder.uitofp(sc, f8), d, flags=FAST), xd8, flags=FAST)
        mins8 = builder.fmul(builder.fmul(builder.uitofp(m, f8), dmin, flags=FAST), xs8, flags=FAST)
        total = builder.fsub(ir.Constant(_vec(F32, 16), None), _concat(builder, mins8, ir.Constant(f8, None)),
                             flags=FAST)
        xo = builder.mul(sb_v, ir.Constant(I64, BLOCK))
        for c in range(4):
            b = _bytes(context, builder, srcty, src_a, at(Q4_K_QS + 32 * c), 32)
            x = _load(context, builder, signature.args[4], xb_a, builder.add(xo, ir.Constant(I64, 64 * c)),
                      _vec(I8, 64), 1)
            p = _dpbusd(builder, _concat(builder, _nibbles(builder, b, 0), _nibbles(builder, b, 4)), x)
            total = builder.fadd(total, builder.fmul(p, _shuffle(builder, scale8, [2 * c] * 8 + [2 * c + 1] * 8),
                                                     flags=FAST), flags=FAST)
        _accumulate16(context, builder, signature.args[0], acc_a, slot_v, total)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def block_q6_k_vnni(typingctx, acc, slot, src, off, xb, xd, sb):
    """acc[16*slot:][:16] += one Q6_K super-block at byte `off` times the int8 activation from
    sub-block sb on (xb, scales xd): per 128-weight half, ql's two 32-byte rows and qh's one give
    the 6-bit weights 0-63 and 64-127 (unsigned, 0-63) for two vpdpbusd; the -32 offset is one more
    vpdpbusd of 32s with the activation. Each 4-lane group is one 16-weight sub-block (int8 scale)."""
    _require_vnni()
    sig = types.void(acc, slot, src, off, xb, xd, sb)

    def codegen(context, builder, signature, args):
        acc_a, slot_v, src_a, off_v, xb_a, xd_a, sb_v = args
        srcty = signature.args[2]
        at = lambda n: builder.add(off_v, ir.Constant(I64, n))   # noqa: E731
        f16 = _vec(F32, 16)
        d = _splat(builder, _half(context, builder, srcty, src_a, at(Q6_K_D)), F32, 16)
        sc = builder.fmul(builder.sitofp(_bytes(context, builder, srcty, src_a, at(Q6_K_SCALES), 16), f16), d,
                          flags=FAST)
        xd8 = _load(context, builder, signature.args[5], xd_a, sb_v, _vec(F32, 8), 4)
        xo = builder.mul(sb_v, ir.Constant(I64, BLOCK))
        thirty_two = ir.Constant(_vec(I8, 64), [32] * 64)

        def six(lo, hi, shift):
            h = builder.and_(builder.lshr(hi, ir.Constant(_vec(I8, 32), [shift] * 32)),
                             ir.Constant(_vec(I8, 32), [3] * 32))
            return builder.or_(lo, builder.shl(h, ir.Constant(_vec(I8, 32), [4] * 32)))
        total = None
        for half in range(2):
            a = _bytes(context, builder, srcty, src_a, at(Q6_K_QL + 64 * half), 32)
            b = _bytes(context, builder, srcty, src_a, at(Q6_K_QL + 64 * half + 32), 32)
            h = _bytes(context, builder, srcty, src_a, at(Q6_K_QH + 32 * half), 32)
            for j, (lo, hi) in enumerate(((six(_nibbles(builder, a, 0), h, 0), six(_nibbles(builder, b, 0), h, 2)),
                                          (six(_nibbles(builder, a, 4), h, 4), six(_nibbles(builder, b, 4), h, 6)))):
                g = 2 * half + j                     # 64-weight group of the super-block
                x = _load(context, builder, signature.args[4], xb_a, builder.add(xo, ir.Constant(I64, 64 * g)),
                          _vec(I8, 64), 1)
                p = builder.fsub(_dpbusd(builder, _concat(builder, lo, hi), x), _dpbusd(builder, thirty_two, x),
                                 flags=FAST)
                scale = builder.fmul(_shuffle(builder, sc, [4 * g + lane // 4 for lane in range(16)]),
                                     _shuffle(builder, xd8, [2 * g + lane // 8 for lane in range(16)]), flags=FAST)
                t = builder.fmul(p, scale, flags=FAST)
                total = t if total is None else builder.fadd(total, t, flags=FAST)
        _accumulate16(context, builder, signature.args[0], acc_a, slot_v, total)
        return context.get_dummy_value()
    return sig, codegen
