"""Streaming GGUF output: gguf.GGUFWriter writes the header, keys and tensor infos from a
plan; tensor data then follows a block of rows at a time (quantized on the way) with the
writer's alignment. Output goes to `<name>.part` and is renamed into place only when
complete (a pair: when both are), so a failure never leaves a half-written model behind.
"""
from __future__ import annotations

import errno
import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from dsocr import quant
from dsocr.convert.checkpoint import ConvertError

CHUNK_ELEMENTS = 1 << 22    # 16 MB of float32 per block of rows


class TensorSource(Protocol):
    rows: int
    row_length: int

    def read_rows(self, start: int, stop: int) -> np.ndarray: ...


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]          # numpy order
    qtype: QT
    sources: Sequence[TensorSource]  # concatenated along rows
    requested: QT | None = None      # the type asked for, when it fell back

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * quant.get_format(self.qtype).row_bytes(self.shape[-1])


@dataclass
class WrittenFile:
    path: Path
    tensors: list[OutTensor]
    types: Counter = field(default_factory=Counter)
    nbytes: int = 0

    @property
    def fallbacks(self) -> list[OutTensor]:
        return [t for t in self.tensors if t.requested is not None]


def _raw_rows(src: TensorSource, qtype: QT, start: int, stop: int) -> np.ndarray:
    """The rows' bytes in `qtype`: copied when the source already holds them, else quantized."""
    raw = getattr(src, "raw_rows", None)
    if raw is not None and src.qtype == qtype:
        return raw(start, stop)
    return quant.quantize(src.read_rows(start, stop), qtype)


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def write_gguf(path: Path, arch: str, tensors: list[OutTensor], write_keys: Callable[[gguf.GGUFWriter], None],
               progress: bool = True) -> WrittenFile:
    """Write PATH (by way of PATH.part)."""
    return publish([write_gguf_part(path, arch, tensors, write_keys, progress)])[0]


def write_gguf_part(path: Path, arch: str, tensors: list[OutTensor],
                    write_keys: Callable[[gguf.GGUFWriter], None], progress: bool = True) -> WrittenFile:
    """Write PATH.part whole (or remove it and raise); `publish` then renames it to PATH."""
    path = Path(path)
    part = part_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(part, arch)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        write_keys(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        bar = _progress_bar(path.name, sum(t.nbytes for t in tensors), progress)
        for t in tensors:
            writer.write_padding(fout, fout.tell())
            written = 0
            for src in t.sources:
                step = max(1, CHUNK_ELEMENTS // max(1, src.row_length))
                for start in range(0, src.rows, step):
                    raw = _raw_rows(src, t.qtype, start, min(src.rows, start + step))
                    fout.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
                    written += raw.nbytes
                    bar.update(raw.nbytes)
            if written != t.nbytes:
                raise ConvertError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
            writer.write_padding(fout, written)
        bar.close()
        writer.close()
    except OSError as e:
        _remove(part)
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"no space left on the device while writing {path}") from None
        raise ConvertError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _remove(part)
        raise
    out = WrittenFile(path, tensors)
    out.types.update(t.qtype.name for t in tensors)
    out.nbytes = part.stat().st_size
    return out


def publish(files: list[WrittenFile]) -> list[WrittenFile]:
    """Rename complete .part files into place, once all of them are written. Signals wait until
    the renames are done, so Ctrl-C or SIGTERM cannot leave a new LM beside an old mmproj."""
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        for f in files:
            os.replace(part_path(f.path), f.path)
    except OSError as e:
        discard(files)
        raise ConvertError(f"cannot write {f.path}: {e.strerror or e}") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return files


def discard(files: list[WrittenFile]) -> None:
    """Remove the .part files of a write that will not be published."""
    for f in files:
        _remove(part_path(f.path))


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _progress_bar(name: str, total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not enabled, leave=False)
