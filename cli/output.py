"""What the `dsocr` subcommands show and write besides their results: tables, byte sizes, the
conversion summary, the one-time compile notice, and the record of an --output-dir run's files."""
from __future__ import annotations

import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path


def table_text(rows: list[list[str]], indent: str = "") -> str:
    """Rows as left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def print_table(rows: list[list[str]], file=None) -> None:      # None: sys.stdout as it is now
    print(table_text(rows), file=file)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def summarize_written(files, out=None) -> None:
    """The conversion summary: per file its tensor types, size and fallbacks."""
    rows = [["file", "size", "tensors", "types"]]
    for f in files:
        types = ", ".join(f"{k} {v}" for k, v in sorted(Counter(f.types).items()))
        rows.append([str(f.path), human_bytes(f.nbytes), str(len(f.tensors)), types])
    print_table(rows, out)
    for f in files:
        falls = f.fallbacks
        if falls:
            print(f"{f.path.name}: {len(falls)} tensor(s) fell back (rows not a multiple of the block):", file=out)
            by = Counter((t.requested.name, t.qtype.name) for t in falls)
            for (want, got), n in sorted(by.items()):
                names = [t.name for t in falls if t.requested.name == want and t.qtype.name == got]
                print(f"  {want} -> {got}: {n}  ({', '.join(names[:4])}{', ...' if n > 4 else ''})", file=out)


@contextmanager
def compile_notice(enabled: bool = True, file=None):
    """Says once, when numba starts compiling a kernel rather than loading it from its on-disk cache
    (the first run after installing or upgrading), that the next half minute is a one-time cost.
    numba fires "numba:compile" only for real compilation, never for a cache load."""
    from numba.core import event

    class Notice(event.Listener):
        said = False

        def on_start(self, _event):
            if not self.said:
                self.said = True
                print("dsocr: compiling kernels (once, ~30 s)...", file=file or sys.stderr, flush=True)

        def on_end(self, _event):
            pass

    if not enabled:
        yield
        return
    with event.install_listener("numba:compile", Notice()):
        yield


class RunOutputs:
    """The files one `dsocr ocr --output-dir DIR` run writes, listed in DIR/.dsocr-outputs.json as they
    are written, so the next run into DIR first removes exactly those (and the folders they leave
    empty): a shorter document leaves no stale crops or pages behind, and nothing else in DIR is touched."""
    MANIFEST = ".dsocr-outputs.json"

    def __init__(self, root: Path):
        self.root = root
        self.files: list[str] = []

    def clear_previous(self) -> None:
        manifest = self.root / self.MANIFEST
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return     # no (readable) manifest: a first run, or a folder we never wrote
        root = self.root.resolve()
        folders = set()
        for rel in listed if isinstance(listed, list) else []:
            path = (self.root / str(rel)).resolve()
            if path.is_relative_to(root) and path.is_file():      # never anything outside DIR
                path.unlink()
                folders.update(p for p in path.parents if p != root and p.is_relative_to(root))
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:    # not empty: it holds files of the user's own
                pass
        manifest.unlink()

    def add(self, paths) -> None:
        self.files += [str(Path(p).relative_to(self.root)) for p in paths]
        tmp = self.root / (self.MANIFEST + ".part")
        tmp.write_text(json.dumps({"files": self.files}, indent=1), encoding="utf-8")
        tmp.replace(self.root / self.MANIFEST)
