"""The register-tiled int8 micro-kernel of the quantized GEMM (`qgemm.py`), as one numba intrinsic
emitting its whole loop in LLVM vector IR (numba has no vector types, so accumulators that must
live in registers across the K loop can only be written this way).

It multiplies a weight panel of TILE_N = 16*NRG rows by mr <= MR_MAX activation rows over all of K
(one loop per mr in the IR, picked by a switch: their accumulators are registers):

    out[i, r] = sum_g  scale[r, g] * xd[i, g] * sum_{j in g} u[r, j] * xq[i, j]  -  beta[r, g] * xs[i, g]

u are the weights' unsigned codes (the stored quants, 0..255), w = scale*u - beta per group of G
weights (G = 32, or 16 for Q6_K's sub-blocks); xq the activation's int8 quants with the per-group
scale xd of its 32-block and xs = xd * sum(xq over the group). The panel interleaves 16 rows 4
bytes at a time (ggml's CPU "repack" layout, built on the fly by qgemm's decoders), so one 64-byte
load holds 4 consecutive codes of 16 rows and vpdpbusd against 4 activation bytes broadcast to
every lane gives 16 rows' partial sums at once:

    codes  [groups, NRG, G/4, 16 rows, 4 bytes]    scales, betas  [groups, NRG, 16] float32

Per group and tile: G/4 * NRG loads, G/4 * NRG * MR vpdpbusd (int32, exact), then per row vector
one int->float conversion and two FMAs. Without AVX-512 VNNI the same IR spells vpdpbusd out
(zero/sign extension, products, sums of 4) and LLVM lowers it with what the host has.
"""
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from dsocr.runtime.cpu.features import AVX512_VNNI
from dsocr.runtime.cpu.simd import F32, FAST, I8, I32, I64, _shuffle, _vec

LANES = 16                 # weight rows per vector: 16 int32 lanes of a 512-bit register
NRG = 2                    # row vectors per tile
TILE_N = LANES * NRG       # weight rows per tile
MR_MAX = 4                 # activation rows per tile
STEP = 4                   # weights per lane per vpdpbusd


def _dpbusd(builder, acc, u, s):
    """acc (<16 x i32>) + sums of 4 adjacent unsigned bytes of u times signed bytes of s."""
    v16 = _vec(I32, LANES)
    if AVX512_VNNI:
        name = "llvm.x86.avx512.vpdpbusd.512"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(v16, [v16] * 3), name)
        return builder.call(fn, [acc, u, s])
    n = 4 * LANES
    p = builder.mul(builder.zext(builder.bitcast(u, _vec(I8, n)), _vec(I32, n)),
                    builder.sext(builder.bitcast(s, _vec(I8, n)), _vec(I32, n)))
    for k in range(4):
        acc = builder.add(acc, _shuffle(builder, p, list(range(k, n, 4))))
    return acc


def _ptr(context, builder, aryty, ary, elt):
    return builder.bitcast(context.make_array(aryty)(context, builder, ary).data, elt.as_pointer())


def _emit_tile(context, builder, signature, args, group: int, mr: int):
    """The tile's loop for `mr` activation rows, from the current block; ends in its own last block."""
    steps = group // STEP
    codes_a, scales_a, betas_a, xq_a, xd_a, xs_a, xrow0_v, groups_v, k_v, out_a = args[:10]
    ty = signature.args
    v16i, v16f = _vec(I32, LANES), _vec(F32, LANES)
    codes_p = _ptr(context, builder, ty[0], codes_a, v16i)
    scales_p = _ptr(context, builder, ty[1], scales_a, v16f)
    betas_p = _ptr(context, builder, ty[2], betas_a, v16f)
    xq_p = _ptr(context, builder, ty[3], xq_a, I8)
    xd_p = _ptr(context, builder, ty[4], xd_a, F32)
    xs_p = _ptr(context, builder, ty[5], xs_a, F32)
    out_p = _ptr(context, builder, ty[9], out_a, v16f)
    c = lambda n: ir.Constant(I64, n)   # noqa: E731
    zero_f = ir.Constant(v16f, None)

    entry = builder.block
    loop = builder.append_basic_block("tile.loop")
    done = builder.append_basic_block("tile.done")
    builder.branch(loop)
    builder.position_at_end(loop)
    g = builder.phi(I64)
    g.add_incoming(c(0), entry)
    facc = [[builder.phi(v16f) for _ in range(NRG)] for _ in range(mr)]
    for row in facc:
        for phi in row:
            phi.add_incoming(zero_f, entry)

    gn = builder.mul(g, c(NRG))
    iacc = [[ir.Constant(v16i, None)] * NRG for _ in range(mr)]
    xrows = [builder.add(builder.mul(builder.add(xrow0_v, c(i)), k_v), builder.mul(g, c(group)))
             for i in range(mr)]
    for s in range(steps):
        w = [builder.load(builder.gep(codes_p, [builder.add(builder.mul(builder.add(gn, c(rg)), c(steps)),
                                                            c(s))]), align=1) for rg in range(NRG)]
        for i in range(mr):
            xp = builder.bitcast(builder.gep(xq_p, [builder.add(xrows[i], c(STEP * s))]), I32.as_pointer())
            x4 = builder.load(xp, align=1)
            xv = _shuffle(builder, builder.insert_element(ir.Constant(v16i, None), x4, ir.Constant(I32, 0)),
                          [0] * LANES)
            for rg in range(NRG):
                iacc[i][rg] = _dpbusd(builder, iacc[i][rg], w[rg], xv)
    scale = [builder.load(builder.gep(scales_p, [builder.add(gn, c(rg))]), align=4) for rg in range(NRG)]
    beta = [builder.load(builder.gep(betas_p, [builder.add(gn, c(rg))]), align=4) for rg in range(NRG)]
    nxt = []
    for i in range(mr):
        at = builder.add(builder.mul(builder.add(xrow0_v, c(i)), groups_v), g)
        splat = lambda p: _shuffle(builder, builder.insert_element(   # noqa: E731
            ir.Constant(v16f, None), builder.load(builder.gep(p, [at]), align=4), ir.Constant(I32, 0)),
            [0] * LANES)
        xdv, xsv = splat(xd_p), splat(xs_p)
        row = []
        for rg in range(NRG):
            t = builder.fmul(builder.sitofp(iacc[i][rg], v16f), builder.fmul(scale[rg], xdv, flags=FAST),
                             flags=FAST)
            t = builder.fsub(t, builder.fmul(beta[rg], xsv, flags=FAST), flags=FAST)
            row.append(builder.fadd(facc[i][rg], t, flags=FAST))
        nxt.append(row)
    g1 = builder.add(g, c(1))
    here = builder.block
    g.add_incoming(g1, here)
    for i in range(mr):
        for rg in range(NRG):
            facc[i][rg].add_incoming(nxt[i][rg], here)
    builder.cbranch(builder.icmp_signed("<", g1, groups_v), loop, done)

    builder.position_at_end(done)
    for i in range(mr):
        for rg in range(NRG):
            builder.store(nxt[i][rg], builder.gep(out_p, [c(i * NRG + rg)]), align=4)


def _make_tile(group: int):
    @intrinsic
    def tile(typingctx, codes, scales, betas, xq, xd, xs, xrow0, groups, k, out, mr):
        """out[i*TILE_N + r] = the tile's product for activation rows xrow0..xrow0+mr-1, 1 <= mr <= MR_MAX
        (codes, scales, betas: the panel; xq [rows*k] int8; xd, xs [rows*groups]); all arrays flat and
        C-contiguous. One loop is emitted per row count (its accumulators are registers), picked by a switch."""
        sig = types.void(codes, scales, betas, xq, xd, xs, xrow0, groups, k, out, mr)

        def codegen(context, builder, signature, args):
            end = builder.append_basic_block("tile.end")
            switch = builder.switch(args[10], end)
            for rows in range(1, MR_MAX + 1):
                case = builder.append_basic_block(f"tile.rows{rows}")
                switch.add_case(ir.Constant(args[10].type, rows), case)
                builder.position_at_end(case)
                _emit_tile(context, builder, signature, args, group, rows)
                builder.branch(end)
            builder.position_at_end(end)
            return context.get_dummy_value()
        return sig, codegen
    return tile


# the kernels for groups of 32 weights and of 16 (Q6_K)
tile32, tile16 = _make_tile(32), _make_tile(16)


@intrinsic
def load_u32(typingctx, src, byte_offset):
    """The little-endian uint32 at byte `byte_offset` of a uint8 array, as one unaligned load (four byte
    loads and shifts would be vectorized, if at all, as four byte gathers)."""
    def codegen(context, builder, signature, args):
        base = _ptr(context, builder, signature.args[0], args[0], I8)
        return builder.load(builder.bitcast(builder.gep(base, [args[1]]), I32.as_pointer()), align=1)
    return types.uint32(src, byte_offset), codegen
