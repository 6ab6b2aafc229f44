"""The `dsocr` command line.

Thread behaviour is set here, before numpy loads OpenBLAS: OpenBLAS's idle workers otherwise
spin for ~2^28 cycles after each GEMM and fight numba's OpenMP workers for the cores (measured
on 2 cores, full-size Q8_0: prefill 6.8 -> 30 tok/s, decode 11 -> 16 tok/s with a short timeout).
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
