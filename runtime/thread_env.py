"""How the two thread pools share the cores, set in the environment before numpy loads OpenBLAS and
numba starts its OpenMP workers: import this module first (the CLI, the tests and the benches do).

* OpenBLAS's idle workers spin for ~2^28 cycles after each GEMM and fight numba's workers for the
  cores; a short timeout (measured on 2 cores, full-size Q8_0: prefill 6.8 -> 30 tok/s, decode
  11 -> 16 tok/s).
* numba's OpenMP workers (GNU libgomp) spin 300000 rounds by default before they sleep, so during
  vision's BLAS calls they took a core from OpenBLAS; 20000 rounds still covers decode's
  back-to-back launches (the same 25 tok/s; sleeping at once, OMP_WAIT_POLICY=passive, costs
  65 us a launch and halves decode) and a 1024 view's encode went 8.2 -> 6.6 s.
A value already in the environment wins."""
import os

THREAD_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "20000"}

for _name, _value in THREAD_ENV.items():
    os.environ.setdefault(_name, _value)
