"""dsocr: DeepSeek-OCR in Python. The command line, the server and `dsocr batch` are built on this.

    import dsocr
    engine = dsocr.load()                        # the model `dsocr ocr` would use (config.toml, DSOCR_*)
    page = engine.ocr("scan.png")                # an OcrResult: .markdown, .text, .regions, .token_ids, ...
    for page in engine.ocr_pages("book.pdf", pages="1-3"):   # rendered as they are needed
        print(page.page, page.markdown)

Bad input (an unreadable image or PDF, a bad page range, prompt or setting) raises InputError, a model
file that cannot be used ModelError; both with a one-line message.

The names below load on first use: `import dsocr` (and so every `import dsocr.<folder>`) stays light.
"""
import importlib
from importlib.metadata import version

import dsocr.runtime.thread_env  # noqa: F401  (first: before numpy loads OpenBLAS)
from dsocr.runtime.errors import InputError, ModelError

__version__ = version("dsocr")

_LAZY = {"load": "dsocr.engine", "Engine": "dsocr.engine", "OcrResult": "dsocr.result",
         "PROMPTS": "dsocr.runtime.engine"}
__all__ = ["__version__", "InputError", "ModelError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsocr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
