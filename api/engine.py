"""dsocr.load() and the Engine it gives: one model pair, run with the settings `dsocr ocr` would use.

The model, the views and the decoding defaults come from the same settings as the command line's
(config.toml, DSOCR_* variables, then load()'s arguments, as flags are); each call may override the
mode and the decoding values.
"""
from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path
from typing import Iterator

from PIL import Image

from dsocr.cli.commands_ocr import checked_inference, thread_count
from dsocr.cli.config import Inference, load_settings
from dsocr.cli.models import resolve_model
from dsocr.result import OcrResult
from dsocr.runtime.engine import DEFAULT_PROMPT, PROMPTS, OcrEngine, OcrRequest
from dsocr.runtime.errors import InputError
from dsocr.runtime.generate import GenerationResult
from dsocr.runtime.pdf import PdfPages, is_pdf
from dsocr.runtime.preprocess import load_image, read_image_file

ImageInput = Image.Image | str | os.PathLike


def load(model: str | os.PathLike | None = None, mmproj: str | os.PathLike | None = None, device: str | None = None,
         threads: int | None = None, parallel: int | None = None, config: str | os.PathLike | None = None,
         progress: bool = True) -> Engine:
    """Loads a model pair. `model`: a language-model GGUF, a folder holding the pair, a config entry or a
    name `dsocr models` lists (None: the configured one, fetched and converted on first use, as `dsocr ocr`
    does); `mmproj`: its vision GGUF (None: the one beside the model). `device` "cpu" or "cuda", `threads`
    (CPU, at least 1), `parallel` (PDF pages decoded together) and `config` (a config.toml that must exist)
    are `dsocr ocr`'s --device, --threads, --parallel and --config; None leaves each to the config.
    `progress`: download and conversion notices on stderr."""
    overrides = {"models": {"model": _text(model), "mmproj": _text(mmproj)},
                 "inference": {"device": device, "threads": threads, "parallel": parallel}}
    settings = load_settings(_text(config), overrides)
    checked_inference(settings)          # a bad setting is refused before a model is fetched
    return Engine(settings, *resolve_model(settings, progress=progress))


def _text(path: str | os.PathLike | None) -> str | None:
    return None if path is None else os.fspath(path)


class Engine:
    """A loaded model pair (made by dsocr.load()): `lm_path` and `mmproj_path` are its files,
    `ocr_engine` the runtime's OcrEngine (its scheduler decodes the sequences submitted to it together).
    One call at a time: it is not thread-safe.

    ocr() and ocr_pages() take `prompt` (any; an <image> is put first when it has none) or `task` (an
    official prompt by name: markdown, the default, free, figure, describe; see dsocr.PROMPTS), `mode`
    (DeepSeek-OCR: tiny, small, base, large, gundam; DeepSeek-OCR 2: gundam, global; None: the configured views) and decoding values as keywords:
    max_new_tokens, temperature, top_p, top_k, seed, no_repeat_ngram_size, ngram_window (None or left out:
    the configured value)."""

    def __init__(self, settings, lm: Path, mmproj: Path | None):
        self.inference = Inference(**settings["inference"])
        self.ocr_engine = OcrEngine(lm, mmproj, device=self.inference.device, threads=thread_count(settings),
                                    parallel=self.inference.parallel)
        self.lm_path, self.mmproj_path = self.ocr_engine.lm_path, self.ocr_engine.mmproj_path

    def ocr(self, image: ImageInput, prompt: str | None = None, *, task: str | None = None, mode: str | None = None,
            **decoding) -> OcrResult:
        """OCR of one image: a PIL image or an image file's path (a PDF's pages go to ocr_pages)."""
        image = self._image(image)
        request = self._request(prompt, task, mode, decoding)
        return OcrResult.of(self.ocr_engine.run(request([image])), *image.size)

    def ocr_pages(self, pdf: str | os.PathLike, pages: str | None = None, prompt: str | None = None, *,
                  task: str | None = None, mode: str | None = None, **decoding) -> Iterator[OcrResult]:
        """One OcrResult per selected page ("1-3,7", "3-"; None: all), in page order, each with its `page`.
        The PDF is checked page by page first (a bad range or page is refused before any work); then pages
        are rendered as they are needed: `parallel` of them decode together, and page i + parallel is
        rendered once page i is done, so a long book is never held in memory. Stopping early cancels the
        pages still decoding."""
        request = self._request(prompt, task, mode, decoding)
        engine = self.ocr_engine

        def submit(item):
            return engine.submit(request([item[1]]), GenerationResult())

        # closing(): the pages still decoding are cancelled before the document closes
        with PdfPages(pdf, pages, self.inference.max_pixels) as doc, \
                closing(engine.scheduler.submit_ahead(doc, submit)) as submitted:
            for (number, image), seq in submitted:
                for _ in engine.scheduler.stream(seq):
                    pass
                yield OcrResult.of(seq.result, *image.size, page=number)

    def _image(self, image: ImageInput) -> Image.Image:
        if isinstance(image, Image.Image):
            return load_image(image, self.inference.max_pixels)
        if not isinstance(image, (str, os.PathLike)):
            raise TypeError(f"an image is a PIL image or a file's path, not {type(image).__name__}")
        if Path(image).is_file() and is_pdf(image):
            raise InputError(f"{image}: a PDF; ocr_pages() reads its pages")
        return read_image_file(image, self.inference.max_pixels)

    def _request(self, prompt: str | None, task: str | None, mode: str | None, decoding: dict):
        """images -> the OcrRequest of these arguments (checked here, before any image work)."""
        if task is not None:
            if prompt is not None:
                raise InputError("give a prompt or a task, not both")
            if task not in PROMPTS or task == "locate":
                raise InputError(f"unknown task {task!r}; choose one of: "
                                 f"{', '.join(t for t in PROMPTS if t != 'locate')} (to locate something: "
                                 "prompt=dsocr.PROMPTS['locate'].format('the thing'))")
            prompt = PROMPTS[task]
        text = DEFAULT_PROMPT if prompt is None else prompt
        view = self.inference.view(mode, layout=self.ocr_engine.layout)
        sampling = self.inference.sampling(**decoding)
        sampling.validate()
        return lambda images: OcrRequest(images, text, view, sampling)
