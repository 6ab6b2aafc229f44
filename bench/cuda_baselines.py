"""Device baselines for the GPU benchmarks: memory bandwidth from a copy kernel, and the FP32 GEMM
peak from a register-tiled SGEMM. numba.cuda has no path to tensor cores or cuBLAS, so this is the
best GEMM a numba kernel reaches; it is checked against numpy before it is timed."""
import time

import numpy as np
from numba import cuda, float32

BM, BK, T = 64, 16, 16          # SGEMM: 64x64 output tile per block of 16x16 threads, 4x4 outputs each


@cuda.jit
def copy_kernel(src, dst):
    for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
        dst[i] = src[i]


@cuda.jit
def sgemm_tiled(A, B, C):
    # C = A @ B for square sizes divisible by 64; threads own rows ty + 16 i, columns tx + 16 j
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid = ty * T + tx
    row0, col0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BM
    As = cuda.shared.array((BK, BM), float32)
    Bs = cuda.shared.array((BK, BM), float32)
    acc = cuda.local.array((4, 4), float32)
    a = cuda.local.array(4, float32)
    b = cuda.local.array(4, float32)
    for i in range(4):
        for j in range(4):
            acc[i, j] = 0.0
    for k0 in range(0, A.shape[1], BK):
        for l in range(4):
            e = tid + l * T * T
            As[e % BK, e // BK] = A[row0 + e // BK, k0 + e % BK]
            Bs[e // BM, e % BM] = B[k0 + e // BM, col0 + e % BM]
        cuda.syncthreads()
        for kk in range(BK):
            for i in range(4):
                a[i] = As[kk, ty + T * i]
                b[i] = Bs[kk, tx + T * i]
            for i in range(4):
                for j in range(4):
                    acc[i, j] += a[i] * b[j]
        cuda.syncthreads()
    for i in range(4):
        for j in range(4):
            C[row0 + ty + T * i, col0 + tx + T * j] = acc[i, j]


def best_of(reps: int, launch) -> float:
    launch()
    cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        launch()
        cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """GB/s, bytes read + written, of a grid-stride float32 copy."""
    src = cuda.to_device(np.ones(n_bytes // 4, np.float32))
    dst = cuda.device_array_like(src)
    blocks = min(4096, src.size // 256)               # grid-stride: enough blocks to fill any GPU
    return 2 * src.nbytes / best_of(10, lambda: copy_kernel[blocks, 256](src, dst)) / 1e9


def sgemm_peak(n: int = 4096) -> float:
    """GFLOP/s of sgemm_tiled on n x n x n."""
    def operands(m):
        rng = np.random.default_rng(0)
        A, B = rng.random((m, m), dtype=np.float32), rng.random((m, m), dtype=np.float32)
        return A, B, cuda.to_device(A), cuda.to_device(B), cuda.device_array((m, m), np.float32)

    A, B, dA, dB, dC = operands(128)
    sgemm_tiled[(2, 2), (T, T)](dA, dB, dC)
    if not np.allclose(dC.copy_to_host(), A @ B, rtol=1e-4, atol=1e-3):
        raise SystemExit("the baseline SGEMM kernel gives wrong results")
    _, _, dA, dB, dC = operands(n)
    return 2.0 * n ** 3 / best_of(5, lambda: sgemm_tiled[(n // BM, n // BM), (T, T)](dA, dB, dC)) / 1e9
