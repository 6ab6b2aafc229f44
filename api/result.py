"""What one OCR'd page gives back: the result object of the Python API, `dsocr ocr --json` and
`dsocr batch`'s results.jsonl (its `record()`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from dsocr.runtime.generate import GenerationResult
from dsocr.runtime.grounding import clean_markdown, parse


@dataclass
class OcrResult:
    text: str                      # as the model wrote it, grounding tags included
    markdown: str                  # without grounding tags; figures as images/N.jpg links
    regions: list[dict]            # per box: label, pixel box of the page, the model's 0-999 box
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str             # "stop", "length" (the token limit), "cancelled"
    image_size: tuple[int, int]    # (width, height) of the page the boxes are in
    timings: dict = field(default_factory=dict)
    page: int | None = None        # the PDF page it is (1-based); None for an image

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @classmethod
    def of(cls, result: GenerationResult, width: int, height: int, page: int | None = None) -> OcrResult:
        regions = parse(result.text, width, height)
        return cls(result.text, clean_markdown(result.text, regions),
                   [record for r in regions for record in r.records()], list(result.token_ids), result.prompt_tokens,
                   result.finish_reason, (width, height),
                   {k: v for k, v in result.timings.items() if k != "first_token_at"}, page)

    def record(self) -> dict:
        """The JSON object of this page (timings rounded to 0.1 ms)."""
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason,
                "timings": {k: round(v, 4) for k, v in self.timings.items()}, "image_size": list(self.image_size),
                "regions": self.regions}
