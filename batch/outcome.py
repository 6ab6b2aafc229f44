"""What OCR'ing one page unit gives the output folder: its results.jsonl record and its files' bytes.

A page fails when it ends in an error (an unreadable image or PDF page, a failure inside the engine) or
at the token limit (finish_reason "length": on a document page that is a loop the n-gram blocking did
not catch, or a page far longer than the limit); it is then retried, and what still fails is recorded
as failed, its text and files kept when it has some.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from dsocr.batch.inputs import PageUnit
from dsocr.result import OcrResult
from dsocr.runtime.generate import GenerationResult
from dsocr.runtime.grounding import output_files


@dataclass
class PageOutcome:
    record: dict                                            # one line of results.jsonl
    files: dict[str, bytes] = field(default_factory=dict)   # by path in the page's folder; none on an error

    @property
    def key(self) -> tuple[str, int]:
        return self.record["document"], self.record["page"]


def is_failure(finish_reason: str | None, error: str | None) -> bool:
    return error is not None or finish_reason == "length"


def page_outcome(unit: PageUnit, attempts: int, temperature: float, model: dict, image: Image.Image | None = None,
                 result: GenerationResult | None = None, error: str | None = None) -> PageOutcome:
    """The outcome of a unit's last try (`attempts` tries made, the last at `temperature`): its result and
    the page it read, or the error that ended it. `model` names the model files and their sha256."""
    record = {"document": unit.document.name, "page": unit.page, "path": str(unit.document.path)}
    files = {}
    if error is None:
        record.update(OcrResult.of(result, image.width, image.height).record())
        files = output_files(image, result.text)
    record.update(attempts=attempts, temperature=temperature, failed=is_failure(record.get("finish_reason"), error),
                  error=error, model=model)
    return PageOutcome(record, files)
