"""The fused decode GEMV (matmul.gemv_products: several weights, inputs and outputs in one launch) and
the CPU backend's matmul_many over it, against gguf's dequantize + float64 numpy on the same q8
activation the kernel makes (as tests/test_kernels.py: 2e-5 of the output's magnitude; float
weights see the float activation). Mixed types in one launch, inputs of different widths (their
q8 blocks packed one after another), routed experts from a shared input row, and every task split
(one task, more tasks than rows) give the same products."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from dsocr import quant
from dsocr.runtime.cpu import CPUBackend, matmul as mm
from dsocr.runtime.gguf_file import Tensor

from test_kernels import q8_activation, rel_err


def tensor(qtype, shape, rng):
    raw = quant.quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), qtype)
    return Tensor("w", qtype, shape, raw), dequantize(raw, qtype).astype(np.float64).reshape(shape)


def want(qtype, wd, x):
    xx = x.astype(np.float64) if qtype in (QT.F32, QT.F16, QT.BF16) else q8_activation(x)[0]
    return wd @ xx


@pytest.mark.parametrize("m", [1, 3])
def test_matmul_many_mixed_types_in_one_launch(m):
    """Decode's router + shared gate/up: an F32 and two quantized weights of one activation."""
    rng = np.random.default_rng(m)
    ts = [tensor(QT.F32, (64, 512), rng), tensor(QT.Q4_K, (96, 512), rng), tensor(QT.Q6_K, (96, 512), rng),
          tensor(QT.Q8_0, (5, 512), rng)]
    x = rng.standard_normal((m, 512)).astype(np.float32)
    got = CPUBackend().matmul_many(x, [t for t, _ in ts])
    for (t, wd), y in zip(ts, got):
        assert y.shape == (m, t.shape[0])
        for i in range(m):
            assert rel_err(y[i], want(t.qtype, wd, x[i])) < 2e-5, t.qtype.name


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_K, QT.Q5_0, QT.F16], ids=lambda t: t.name)
def test_matmul_many_routed_experts_from_one_row(qtype):
    """Gate and up of one token's routed experts (ids repeated) in one launch, x's only row for each."""
    rng = np.random.default_rng(int(qtype))
    (g, gd), (u, ud) = tensor(qtype, (6, 40, 256), rng), tensor(qtype, (6, 40, 256), rng)
    experts = np.array([4, 0, 4, 5], np.int64)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    yg, yu = CPUBackend().matmul_many(x, (g, u), experts)
    for y, wd in ((yg, gd), (yu, ud)):
        assert y.shape == (4, 40)
        assert rel_err(y, np.stack([want(qtype, wd[e], x[0]) for e in experts])) < 2e-5


@pytest.mark.parametrize("tasks", [1, 3, 16, 1000])
def test_gemv_products_inputs_of_different_widths_and_any_task_split(tasks):
    """Decode's down projections: shared experts (1792-wide input) and routed ones (896-wide rows) in one
    launch; an odd-width float input (77) among them. Rows go to tasks by bytes, none twice or never."""
    rng = np.random.default_rng(tasks)
    (sh, shd), (ex, exd) = tensor(QT.Q6_K, (30, 1792), rng), tensor(QT.Q8_0, (4, 30, 896), rng)
    (fl, fld) = tensor(QT.F16, (7, 77), rng)
    xs = rng.standard_normal((1, 1792)).astype(np.float32)
    xe = rng.standard_normal((3, 896)).astype(np.float32)
    xf = rng.standard_normal((2, 77)).astype(np.float32)
    ys, ye, yf = np.full((1, 30), np.nan, np.float32), np.full((3, 30), np.nan, np.float32), \
        np.full((2, 7), np.nan, np.float32)
    experts = [2, 0, 3]
    products = np.array([[0, 0, 0, 0, 0, 0]] + [[1, e, 1, i, 1, i] for i, e in enumerate(experts)]
                        + [[2, 0, 2, 1, 2, 0], [2, 0, 2, 0, 2, 1]], np.int64)
    mm.gemv_products(np.array([int(QT.Q6_K), int(QT.Q8_0), int(QT.F16)]), (sh.raw[None], ex.raw, fl.raw[None]),
                     (xs, xe, xf), (ys, ye, yf), products, tasks, mm.PREFETCH_BYTES)
    assert rel_err(ys[0], want(QT.Q6_K, shd, xs[0])) < 2e-5
    for i, e in enumerate(experts):
        assert rel_err(ye[i], want(QT.Q8_0, exd[e], xe[i])) < 2e-5
    assert rel_err(yf, np.stack([want(QT.F16, fld, xf[1]), want(QT.F16, fld, xf[0])])) < 1e-5
