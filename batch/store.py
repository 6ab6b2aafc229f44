"""The output folder of `dsocr batch`, and its one writer: every page exactly once, resumable.

    DIR/results.jsonl            one record per page, appended (flushed and fsynced) once its files are in place
    DIR/<document>/page-N/       result.md, result.mmd, boxes.png, images/N.jpg, as `dsocr ocr -o` writes them
    DIR/<document>.md            the document's pages joined, written once every page has a record
    DIR/.dsocr-batch/            the lock, files being written, the model files' sha256 by (path, size, mtime)

Files are written under .dsocr-batch/tmp and renamed into place, a page's folder as a whole, so a page's
folder is complete or absent and holds what its record describes. A run that dies (SIGKILL, power loss)
leaves at most a torn last line in results.jsonl, which the next run drops, and page folders without a
record, which it replaces: it redoes exactly the pages that have no record.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from dsocr.batch.inputs import Document, PageUnit
from dsocr.batch.outcome import PageOutcome
from dsocr.runtime.errors import InputError
from dsocr.runtime.pdf import PAGE_SEPARATOR, page_heading

RESULTS = "results.jsonl"
STATE = ".dsocr-batch"


def page_folder(document: str, page: int) -> str:
    return f"{document}/page-{page}"


class OutputFolder:
    def __init__(self, root: Path, documents: list[Document], resume: bool = True):
        self.root, self.state = root, root / STATE
        self.tmp = self.state / "tmp"
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _lock(self.state / "lock")
        except OSError as e:
            raise InputError(f"--output-dir {root}: cannot write there ({e.strerror or e})") from None
        if self._lock is None:
            raise InputError(f"--output-dir {root}: another dsocr batch is writing there")
        shutil.rmtree(self.tmp, ignore_errors=True)      # what a run that died was writing
        self.tmp.mkdir()
        self.documents = {d.name: d for d in documents}
        records = self._read_records()
        if records and not resume:
            self._discard(records)
            records = []
        self.done: dict[tuple[str, int], bool] = {}      # (document, page) -> failed
        self.models: list[dict] = []                     # the distinct model fields of the records
        for r in records:
            self.done.setdefault((r["document"], r["page"]), bool(r.get("failed")))
            if r.get("model") not in self.models:
                self.models.append(r.get("model"))
        self.results = open(self.root / RESULTS, "ab")
        for doc in documents:                            # a run that died between a last record and its .md
            if self._complete(doc) and not (self.root / f"{doc.name}.md").exists():
                self._write_document(doc)

    # ---- reading what is there

    def _read_records(self) -> list[dict]:
        path = self.root / RESULTS
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        if end < len(data):                  # a torn last line: its page is redone
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        records = []
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                r = json.loads(line)
            except ValueError:
                r = None
            if not isinstance(r, dict) or not isinstance(r.get("document"), str) or not isinstance(r.get("page"), int):
                raise InputError(f"{path} line {n} is not a page record; move the file away to start over")
            records.append(r)
        return records

    def _discard(self, records: list[dict]) -> None:
        """--no-resume: the records go first (an empty results.jsonl in place), then their files."""
        self._write_atomic(self.root / RESULTS, b"")
        root = self.root.resolve()
        for name in dict.fromkeys(r["document"] for r in records):
            folder, md = self.root / name, self.root / f"{name}.md"
            if folder.resolve().is_relative_to(root) and folder.resolve() != root:    # never outside DIR
                md.unlink(missing_ok=True)
                shutil.rmtree(folder, ignore_errors=True)

    def pending(self, units: list[PageUnit]) -> list[PageUnit]:
        return [u for u in units if u.key not in self.done]

    def failed(self, units: list[PageUnit]) -> int:
        return sum(self.done.get(u.key, False) for u in units)

    def check_model(self, model: dict) -> None:
        """Refuses to add pages of another model to a folder of results (their output would differ from one run's)."""
        other = [m for m in self.models if m != model]
        if other:
            names = ", ".join(f["file"] for f in (other[0] or {}).values()) or "unnamed files"
            raise InputError(f"{self.root} holds pages OCR'd with other model files ({names}); use the same model, "
                             f"another --output-dir, or --no-resume to redo every page")

    # ---- writing

    def commit(self, outcome: PageOutcome) -> None:
        """The page's files into place, then its record; then the document's .md if this was its last page."""
        name, page = outcome.key
        folder = self.root / page_folder(name, page)
        if folder.exists():                  # an earlier run's, whose record never landed
            shutil.rmtree(folder)
        if outcome.files:
            staged = self._staged(outcome.files)
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, folder)
            _fsync_dir(folder.parent)
        self.results.write(json.dumps(outcome.record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.results.flush()
        os.fsync(self.results.fileno())
        self.done[outcome.key] = bool(outcome.record["failed"])
        doc = self.documents.get(name)
        if doc is not None and self._complete(doc):
            self._write_document(doc)

    def _staged(self, files: dict[str, bytes]) -> Path:
        folder = self.tmp / uuid.uuid4().hex
        for rel, data in files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_synced(path, data)
        for sub in {(folder / rel).parent for rel in files}:
            _fsync_dir(sub)
        return folder

    def _write_atomic(self, path: Path, data: bytes) -> None:
        staged = self.tmp / uuid.uuid4().hex
        _write_synced(staged, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, path)
        _fsync_dir(path.parent)

    def _complete(self, doc: Document) -> bool:
        return all((doc.name, p) in self.done for p in range(1, doc.pages + 1))

    def _write_document(self, doc: Document) -> None:
        """<name>.md: the pages' result.md (a page without files adds nothing), a PDF's under page headings."""
        texts = []
        for p in range(1, doc.pages + 1):
            page_md = self.root / page_folder(doc.name, p) / "result.md"
            texts.append(page_md.read_text(encoding="utf-8") if page_md.exists() else "")
        joined = PAGE_SEPARATOR.join(page_heading(p) + t for p, t in enumerate(texts, 1)) if doc.pdf else texts[0]
        self._write_atomic(self.root / f"{doc.name}.md", joined.encode("utf-8"))

    # ---- the model files' sha256, cached here by (path, size, mtime)

    def sha256(self, path: Path) -> str:
        from huggingface_hub.utils.sha import sha_fileobj
        cache_path = self.state / "sha256.json"
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
        st, key = path.stat(), str(path.resolve())
        hit = cache.get(key) if isinstance(cache, dict) else None
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        with open(path, "rb") as f:
            digest = sha_fileobj(f).hex()
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._write_atomic(cache_path, json.dumps(cache, indent=1).encode("utf-8"))
        return digest

    def close(self) -> None:
        self.results.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Makes a rename in `path` durable (POSIX; elsewhere a folder cannot be opened, and renames are)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path):
    """An exclusive lock on `path` held by the open file returned (None: another process holds it); the
    system releases it when the process ends, however it ends."""
    f = open(path, "a+b")
    try:
        import fcntl
    except ImportError:                      # Windows: no advisory locks; one writer is then the user's to keep
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f
