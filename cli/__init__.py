"""The `dsocr` command line.

Thread behaviour is set first, before numpy loads (runtime/thread_env.py).
"""
import dsocr.runtime.thread_env  # noqa: F401
