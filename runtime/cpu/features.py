"""What the host CPU can execute, as LLVM names it (`llvmlite.binding.get_host_cpu_features()`).
numba compiles for this CPU and its on-disk cache index carries the CPU name and features, so a
kernel built here with an x86-only intrinsic is never loaded on a host that lacks it.

DSOCR_CPU_FEATURES_OFF="avx512vnni,..." hides features from dsocr's kernels (to run and test the
portable paths on a host that has them). numba's cache does not know about it: use it with a
NUMBA_CACHE_DIR of its own."""
import os

from llvmlite import binding

HIDDEN = frozenset(filter(None, os.environ.get("DSOCR_CPU_FEATURES_OFF", "").replace(" ", "").split(",")))
HOST = frozenset(name for name, on in binding.get_host_cpu_features().items() if on) - HIDDEN

# vpdpbusd on 512-bit vectors (AVX-512 VNNI), with BW's byte masks for the sign trick
AVX512_VNNI = {"avx512f", "avx512bw", "avx512vl", "avx512vnni"} <= HOST
