"""The OCR pipeline shared by `dsocr ocr` and the server: images + prompt -> streamed text.

    prompt text --tokenizer--> ids with each <image> expanded to its image's token count
    images --preprocess--> views --VisionModel--> rows, scattered into the <image> positions
    --LanguageModel, decoded by the Scheduler--> text deltas, then token ids, finish reason and timings

Every request is a sequence of the engine's scheduler (runtime/scheduler.py), so the pages of one
run, or the requests of a server's users, decode together: submit() them, then stream() each.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from dsocr.runtime.errors import InputError, ModelError
from dsocr.runtime.generate import GenerationResult, SamplingParams
from dsocr.runtime.gguf_file import GGUFFile
from dsocr.runtime.language import LanguageModel, LMParams, Segment
from dsocr.runtime.preprocess import (Layout, ViewConfig, build_prompt_ids, image_token_count, layout_prompt_ids,
                                      prepare_image, view_grid)
from dsocr.runtime.scheduler import DEFAULT_PARALLEL, Scheduler, Sequence
from dsocr.runtime.tokenizer import TextTokenizer
from dsocr.runtime.vision import VisionModel, run_steps

IMAGE_TOKEN = "<image>"
# The prompts DeepSeek-OCR was trained on (its README); `locate` takes the thing to find.
PROMPTS = {
    "markdown": "<image>\n<|grounding|>Convert the document to markdown.",
    "free": "<image>\nFree OCR.",
    "figure": "<image>\nParse the figure.",
    "describe": "<image>\nDescribe this image in detail.",
    "locate": "<image>\nLocate <|ref|>{}<|/ref|> in the image.",
}
DEFAULT_PROMPT = PROMPTS["markdown"]


def find_model_pair(model: str | Path, mmproj: str | Path | None = None) -> tuple[Path, Path]:
    """The language-model GGUF and its mmproj: `model` is the LM file or a folder holding the pair;
    the mmproj is found beside the LM (mmproj-*.gguf) when not given."""
    model = Path(model).expanduser()
    if model.is_dir():
        lms = sorted(p for p in model.glob("*.gguf") if not p.name.startswith("mmproj"))
        if not lms:
            raise ModelError(f"{model}: no language-model .gguf in this folder")
        if len(lms) > 1:
            raise ModelError(f"{model}: several language models here ({', '.join(p.name for p in lms)}); name one")
        model = lms[0]
    elif not model.is_file():
        raise ModelError(f"{model}: no such model file or folder")
    if mmproj is None:
        beside = sorted(model.parent.glob("mmproj*.gguf"))
        if not beside:
            raise ModelError(f"no mmproj-*.gguf beside {model}; pass --mmproj")
        prefix = f"mmproj-{_stem(model)}-"      # then the mmproj's type alone: -2 is another model's
        named = [p for p in beside if p.name.startswith(prefix) and "-" not in p.name[len(prefix):-len(".gguf")]]
        if not named and len(beside) > 1:
            raise ModelError(f"several mmproj files beside {model.name} and none is {prefix}TYPE.gguf; pass --mmproj")
        mmproj = (named or beside)[0]
    mmproj = Path(mmproj).expanduser()
    if not mmproj.is_file():
        raise ModelError(f"{mmproj}: no such mmproj file")
    return model, mmproj


def _stem(lm: Path) -> str:
    """DeepSeek-OCR-Q8_0.gguf -> DeepSeek-OCR (to pair with mmproj-DeepSeek-OCR-F16.gguf)."""
    return lm.stem.rsplit("-", 1)[0]


def make_backend(device: str = "cpu", threads: int | None = None):
    if device == "cpu":
        from dsocr.runtime.cpu import CPUBackend
        return CPUBackend(threads)
    if device == "cuda":
        from dsocr.runtime.cuda import CUDABackend
        return CUDABackend()
    raise InputError(f"unknown device {device!r} (cpu or cuda)")


@dataclass
class OcrRequest:
    images: list[Image.Image]
    prompt: str = DEFAULT_PROMPT
    view: ViewConfig = field(default_factory=ViewConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)


def normalize_prompt(prompt: str, n_images: int) -> str:
    """A prompt without <image> gets one prepended for a single image; counts must match."""
    count = prompt.count(IMAGE_TOKEN)
    if count == 0 and n_images == 1:
        return IMAGE_TOKEN + "\n" + prompt
    if count != n_images:
        raise InputError(f"the prompt has {count} {IMAGE_TOKEN} marker(s) for {n_images} image(s)")
    return prompt


@dataclass(frozen=True)
class ContextCheck:
    """A model's prompt length check: its tokenizer, layout and language-model settings (their training
    context). It needs neither weights nor pixels, so a server checks requests for a model that is not
    loaded (from_file)."""
    tokenizer: TextTokenizer
    layout: Layout
    lm: LMParams

    @classmethod
    def from_file(cls, lm: Path, layout: Layout) -> ContextCheck:
        """From the language model's header (its tokenizer and settings) and the pair's layout."""
        f = GGUFFile(lm)
        return cls(TextTokenizer.from_gguf(f), layout, LMParams.from_gguf(f))

    def __call__(self, prompt: str, image_sizes: list[tuple[int, int]], view: ViewConfig) -> int:
        """The prompt's token count, each <image> expanded to what an image of that (width, height) takes
        under `view`; refuses a prompt that leaves no room for one new token. Only the text is tokenized,
        so this is cheap enough to run before any pixel work."""
        if view.layout != self.layout:           # (equal, not the same object: views travel to Ray actors)
            raise InputError(f"views of {view.layout.model} asked of {self.layout.model}")
        view.validate()
        prompt = normalize_prompt(prompt, len(image_sizes))
        counts = [image_token_count(view, view_grid(w, h, view)) for w, h in image_sizes]
        n = len(layout_prompt_ids(self.tokenizer, prompt, counts, self.layout, IMAGE_TOKEN)[0])
        n_ctx = self.lm.n_ctx_train
        if n + 1 > n_ctx:
            raise InputError(f"the prompt is {n} tokens; the model's context is {n_ctx} "
                             f"(the prompt and at least one new token must fit)")
        return n


class OcrEngine:
    def __init__(self, model: str | Path, mmproj: str | Path | None = None, device: str = "cpu",
                 threads: int | None = None, parallel: int = DEFAULT_PARALLEL):
        lm_path, mm_path = find_model_pair(model, mmproj)
        self.lm_path, self.mmproj_path = lm_path, mm_path
        self.backend = make_backend(device, threads)
        lm_file, mm_file = GGUFFile(lm_path), GGUFFile(mm_path)
        self.lm = LanguageModel(lm_file, self.backend)
        self.vision = VisionModel(mm_file, self.backend)
        if self.vision.p.n_embd != self.lm.p.n_embd:
            raise ModelError(f"{mm_path.name} projects to width {self.vision.p.n_embd} but {lm_path.name} "
                             f"has width {self.lm.p.n_embd}: not a matching pair")
        self.layout = self.vision.p.layout          # which model's views and token layout (preprocess.Layout)
        self.tokenizer = TextTokenizer.from_gguf(lm_file)
        self.context = ContextCheck(self.tokenizer, self.layout, self.lm.p)
        self.image_id = self.tokenizer.token_id(IMAGE_TOKEN)
        self.scheduler = Scheduler(self.lm, self.tokenizer, parallel)

    def check_context(self, prompt: str, image_sizes: list[tuple[int, int]], view: ViewConfig) -> int:
        """ContextCheck's count for this engine's model."""
        return self.context(prompt, image_sizes, view)

    def submit(self, req: OcrRequest, result: GenerationResult, on_delta=None, on_done=None,
               cancelled=lambda: False, progress=None) -> Sequence:
        """Queues the request as a sequence of the scheduler. Bad parameters and a prompt over the
        context are refused here (InputError), before any pixel work."""
        self._check(req)
        sampling = req.sampling
        if sampling.no_repeat_ngram_size is None:          # the model's own recipe
            sampling = dataclasses.replace(sampling, no_repeat_ngram_size=self.layout.ngram_size)
        return self.scheduler.submit(self._prompt(req, result.timings, progress), sampling, result, on_delta,
                                     on_done, cancelled)

    def prepare(self, req: OcrRequest, timings: dict, progress=None) -> tuple[np.ndarray, list[int]]:
        """Prompt ids and input embeddings (image rows in place) of one request, all at once."""
        self._check(req)
        embeds, ids = run_steps(self._prompt(req, timings, progress))
        return self.backend.to_host(embeds), ids

    def _check(self, req: OcrRequest) -> None:
        req.sampling.validate()
        self.check_context(req.prompt, [img.size for img in req.images], req.view)

    def _prompt(self, req: OcrRequest, timings: dict, progress):
        # the sequence's prompt: ids and input embeddings (image rows in place), yielding between
        # vision blocks so that the scheduler decodes other sequences meanwhile
        t0 = time.perf_counter()
        prompt = normalize_prompt(req.prompt, len(req.images))
        prepared = [prepare_image(img, req.view) for img in req.images]
        req = None                       # its pixels go now (a server's caller keeps no other reference)
        ids, is_image = build_prompt_ids(self.tokenizer, prompt, prepared, self.layout, IMAGE_TOKEN)
        t1 = time.perf_counter()
        rows = []
        for p in prepared:
            rows.append((yield from self.vision.image_embedding_steps(p, progress=progress)))
        t2 = time.perf_counter()
        embeds = np.array(self.backend.to_host(self.lm.embed(ids)))
        if rows:
            embeds[is_image] = np.concatenate(rows)
        timings.update(preprocess_s=t1 - t0, vision_s=t2 - t1)
        return self.backend.asarray(embeds), ids

    def stream(self, req: OcrRequest, result: GenerationResult, cancelled=lambda: False,
               progress=None) -> Iterator[str]:
        """The request's text as it comes (the scheduler runs whatever else was submitted meanwhile)."""
        return self.scheduler.stream(self.submit(req, result, cancelled=cancelled, progress=progress))

    def warm_up(self) -> None:
        """Runs every kernel once (the vision tower on its smallest view, prefill, and a decode step of
        two sequences), so numba compiles them, or loads them from its cache, before a real request has
        to wait for it. The decode steps feed a fixed token: through the scheduler an end-of-text first
        token would skip them."""
        self.backend.warm_up()
        self.vision.warm_up()
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(DEFAULT_PROMPT.replace(IMAGE_TOKEN, ""))
        cache = self.lm.new_cache(len(ids) + 2)
        self.backend.to_host(self.lm.forward(self.lm.embed(ids), 0, cache))
        step = self.lm.embed([self.tokenizer.bos_id] * 2)    # a batch's decode step
        self.backend.to_host(self.lm.forward_batch(step, [Segment(0, 1, len(ids), cache),
                                                          Segment(1, 1, len(ids) + 1, cache)]))

    def run(self, req: OcrRequest) -> GenerationResult:
        result = GenerationResult()
        for _ in self.stream(req, result):
            pass
        return result
