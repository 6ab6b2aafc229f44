"""Helpers for the tests and the benchmarks, not part of the installed package: random-weight
checkpoints and GGUF pairs of DeepSeek-OCR's real shapes (synthetic.py) and plain-numpy reference
quantizers for the K-quants (kquant_reference.py). tests/conftest.py and bench/common.py put the
repository root on sys.path, so `from devtools import ...` works from a checkout without installing."""
