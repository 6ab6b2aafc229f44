"""GGUF files as untrusted input: every declared count and length is checked against the file
before gguf's reader sees it (runtime/gguf_file.check_gguf, used by GGUFFile, `dsocr info` and
`dsocr quantize`); a re-converted pair replaces the old one whole or not at all; SIGTERM and
SIGHUP during `dsocr convert` leave no .part behind."""
import contextlib
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

from dsocr import quant
from dsocr.cli.commands_models import describe_gguf
from dsocr.cli.main import main
from dsocr.convert import ConvertError, convert_checkpoint, requantize
from dsocr.runtime.errors import ModelError
from dsocr.runtime.gguf_file import MAX_ARRAY_ELEMENTS, GGUFFile, check_gguf

from conftest import TINY, one_line_error


class RanAway(BaseException):
    """Raised by `bounded`'s alarm; a BaseException so that no `except Exception` turns it into a refusal."""


@contextlib.contextmanager
def bounded(seconds: float = 2.0, megabytes: int = 1024):
    """A runaway parse fails here (RanAway, MemoryError) instead of hanging or taking the
    machine's memory: an alarm after SECONDS and an address-space limit MEGABYTES above now."""
    def timeout(signum, frame):
        raise RanAway(f"still running after {seconds} s")
    mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + (megabytes << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------- where a valid file keeps its counts

@dataclass
class Site:
    """A count or length in a GGUF header: its file offset and struct format."""
    offset: int
    fmt: str
    what: str


def header_sites(path) -> dict[str, Site]:
    """Every header count and length of a valid GGUF (offsets from gguf's reader, which parses it)."""
    r = gguf.GGUFReader(path)
    sites = [Site(8, "<Q", "tensor count"), Site(16, "<Q", "key count"), Site(4, "<I", "version")]
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        sites.append(Site(f.offset, "<Q", f"{name}: key length"))
        pos = f.offset + 8 + len(name.encode())
        sites.append(Site(pos, "<I", f"{name}: value type"))
        pos += 4
        if f.types[0] == VT.UINT32:
            sites.append(Site(pos, "<I", f"{name}: value"))
        elif f.types[0] == VT.STRING:
            sites.append(Site(pos, "<Q", f"{name}: string length"))
        elif f.types[0] == VT.ARRAY:
            sites += [Site(pos, "<I", f"{name}: element type"), Site(pos + 4, "<Q", f"{name}: element count")]
            if f.types[-1] == VT.STRING:
                pos += 12
                for i, part in enumerate(f.data[:3]):
                    sites.append(Site(pos, "<Q", f"{name}: string {i} length"))
                    pos += 8 + f.parts[part].nbytes
    for t in r.tensors:
        pos = t.field.offset
        sites.append(Site(pos, "<Q", f"{t.name}: name length"))
        pos += 8 + len(t.name.encode())
        sites.append(Site(pos, "<I", f"{t.name}: n_dims"))
        sites += [Site(pos + 4 + 8 * j, "<Q", f"{t.name}: dim {j}") for j in range(len(t.shape))]
        pos += 4 + 8 * len(t.shape)
        sites += [Site(pos, "<I", f"{t.name}: type"), Site(pos + 4, "<Q", f"{t.name}: data offset")]
    return {s.what: s for s in sites}


def patched(data: bytes, site: Site, value: int) -> bytes:
    width = struct.calcsize(site.fmt)
    return data[:site.offset] + struct.pack(site.fmt, value) + data[site.offset + width:]


def replaced(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


# ---------------------------------------------------------------- a small valid file and its corruptions

def write_small_gguf(path, tensor_names=("t.a", "t.b")):
    """Keys of every kind, an F32 and a Q8_0 tensor, written by gguf's own writer."""
    w = gguf.GGUFWriter(path, "deepseek2-ocr")
    w.add_custom_alignment(32)
    w.add_string("test.aa", "hello")
    w.add_uint32("test.ab", 7)
    w.add_string("test.version", "v")
    w.add_array("test.ac", ["x", "yz"])
    w.add_array("test.ad", [1, 2, 3])
    w.add_tensor(tensor_names[0], np.ones((4, 32), np.float32))
    q8 = quant.quantize(np.ones((2, 64), np.float32), QT.Q8_0)
    w.add_tensor(tensor_names[1], q8, raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = write_small_gguf(tmp_path_factory.mktemp("small") / "small.gguf")
    return path.read_bytes(), header_sites(path)


HUGE = 1 << 40
CORRUPTIONS = {   # name: (corrupt(data, sites) -> bytes, the error's words)
    "magic": (lambda d, s: b"GGML" + d[4:], "not a GGUF file"),
    "version 1": (lambda d, s: patched(d, s["version"], 1), "version 1 is not supported"),
    "big-endian": (lambda d, s: patched(d, s["version"], 3 << 24), "is not supported .little-endian"),
    "key count": (lambda d, s: patched(d, s["key count"], HUGE), f"declares {HUGE} keys"),
    "tensor count": (lambda d, s: patched(d, s["tensor count"], HUGE), f"declares {HUGE} tensors"),
    "key length": (lambda d, s: patched(d, s["test.aa: key length"], HUGE), f"needs {HUGE} bytes"),
    "string length": (lambda d, s: patched(d, s["test.aa: string length"], HUGE), f"test.aa needs {HUGE} bytes"),
    "array count": (lambda d, s: patched(d, s["test.ad: element count"], HUGE),
                    f"test.ad declares {HUGE} INT32 elements .at least {4 * HUGE} bytes"),
    "string array count": (lambda d, s: patched(d, s["test.ac: element count"], HUGE),
                           f"test.ac declares {HUGE} STRING elements"),
    "string in array": (lambda d, s: patched(d, s["test.ac: string 1 length"], HUGE), f"test.ac needs {HUGE} bytes"),
    "value type": (lambda d, s: patched(d, s["test.ab: value type"], 13), "test.ab has unknown value type 13"),
    "element type": (lambda d, s: patched(d, s["test.ad: element type"], 13), "unknown array element type 13"),
    "array of arrays": (lambda d, s: patched(d, s["test.ad: element type"], VT.ARRAY), "test.ad is an array of arrays"),
    "duplicate key": (lambda d, s: replaced(d, b"test.ab", b"test.aa"), "key test.aa appears twice"),
    "reader's own key": (lambda d, s: replaced(d, b"test.version", b"GGUF.version"), "key GGUF.version appears twice"),
    "string not UTF-8": (lambda d, s: replaced(d, b"hello", b"\xffello"), "key test.aa is not UTF-8"),
    "key not UTF-8": (lambda d, s: replaced(d, b"test.ab", b"test.\xffb"), "key #.* is not UTF-8"),
    "alignment": (lambda d, s: patched(d, s["general.alignment: value"], 48), "general.alignment 48 is not a power of two"),
    "alignment type": (lambda d, s: patched(d, s["general.alignment: value type"], VT.UINT64),
                       "general.alignment is not a UINT32"),
    "n_dims 5": (lambda d, s: patched(d, s["t.a: n_dims"], 5), "t.a has 5 dimensions"),
    "n_dims 0": (lambda d, s: patched(d, s["t.a: n_dims"], 0), "t.a has 0 dimensions"),
    "empty dim": (lambda d, s: patched(d, s["t.a: dim 1"], 0), "t.a has an empty dimension"),
    "ggml type": (lambda d, s: patched(d, s["t.b: type"], 4), "t.b has unknown ggml type 4"),
    "partial block": (lambda d, s: patched(d, s["t.b: dim 0"], 33), "rows of 33 are not whole Q8_0 blocks of 32"),
    "misaligned": (lambda d, s: patched(d, s["t.b: data offset"], 1 + struct.unpack_from(
        "<Q", d, s["t.b: data offset"].offset)[0]), "offset 513 is not a multiple of the alignment 32"),
    "data past the end": (lambda d, s: patched(d, s["t.a: dim 1"], HUGE), "t.a's .* run past the end of the file"),
    "dims overflow int64": (lambda d, s: patched(patched(d, s["t.a: dim 0"], 1 << 63), s["t.a: dim 1"], 1 << 63),
                            "t.a's .* run past the end"),
    "duplicate tensor": (lambda d, s: replaced(d, b"t.b", b"t.a"), "tensor t.a appears twice"),
    "cut in the data": (lambda d, s: d[:-32], "t.b's 136 bytes .* run past the end of the file"),
}


def test_the_small_file_is_valid(small, tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(small[0])
    f = GGUFFile(path)
    assert sorted(f.tensors) == ["t.a", "t.b"] and f.get("test.ac") == ["x", "yz"]
    assert [t["shape"] for t in describe_gguf(path)["tensors"]] == [[32, 4], [64, 2]]


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_headers_are_refused_by_every_opener(small, tmp_path, case):
    corrupt, words = CORRUPTIONS[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(corrupt(*small))
    for opener in (GGUFFile, describe_gguf, lambda p: requantize(p, tmp_path / "out.gguf", "q8_0", progress=False)):
        with pytest.raises(ModelError, match=words), bounded():
            opener(path)
    assert not (tmp_path / "out.gguf").exists()


def test_long_tensor_names_are_refused(tmp_path):
    """llama.cpp refuses names of GGML_MAX_NAME (64) bytes or more; so do we."""
    path = write_small_gguf(tmp_path / "long.gguf", ("t." + "x" * 62, "t.b"))
    with pytest.raises(ModelError, match="is 64 bytes or longer"):
        GGUFFile(path)
    GGUFFile(write_small_gguf(tmp_path / "ok.gguf", ("t." + "x" * 61, "t.b")))


def raw_gguf(kvs: list[bytes], n_tensors: int = 0, size: int | None = None) -> bytes:
    data = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)
    return data + bytes(max(0, (size or 0) - len(data)))


def gguf_str(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def array_kv(key: str, itype: VT, count: int, payload: bytes = b"") -> bytes:
    return gguf_str(key) + struct.pack("<IIQ", VT.ARRAY, itype, count) + payload


ARCH_KV = gguf_str("general.architecture") + struct.pack("<I", VT.STRING) + gguf_str("deepseek2-ocr")


def run_limited(*args, memory=3 << 30, timeout=60):
    """`dsocr ARGS` in a child that may map at most MEMORY bytes (so a runaway parse fails fast here)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    return subprocess.run([sys.executable, "-m", "dsocr.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)


@pytest.mark.parametrize("itype,count", [(VT.UINT8, 1 << 22), (VT.UINT8, 1 << 40), (VT.FLOAT64, 1 << 61),
                                         (VT.STRING, 1 << 40)])
def test_declared_array_larger_than_the_file_is_refused_at_once(tmp_path, itype, count):
    """The issue's 170-byte file: a 2**22-element array took `dsocr info` 27 s and 4.1 GB; 2**40, over 16.9 GB."""
    path = tmp_path / "liar.gguf"
    path.write_bytes(raw_gguf([ARCH_KV, array_kv("test.array", itype, count)], size=170))
    assert path.stat().st_size == 170
    start = time.perf_counter()
    one_line_error(run_limited("info", path), f"test.array declares {count} {itype.name} elements")
    assert time.perf_counter() - start < 15     # the child's start-up (numba's import) included
    with pytest.raises(ModelError, match="declares"), bounded(seconds=0.1):
        GGUFFile(path)


def test_metadata_arrays_are_capped_in_total(tmp_path):
    """Arrays that fit in the file but would cost the reader ~0.7 KB of numpy views per element."""
    half = MAX_ARRAY_ELEMENTS // 2
    path = tmp_path / "many.gguf"
    path.write_bytes(raw_gguf([ARCH_KV, array_kv("test.a", VT.UINT8, half, bytes(half)),
                               array_kv("test.b", VT.UINT8, half + 1, bytes(half + 1))]))
    with pytest.raises(ModelError, match=f"test.b brings the metadata arrays to {2 * half + 1} elements"), bounded():
        GGUFFile(path)


@pytest.fixture(scope="module")
def lm_bytes(converted):
    return converted("f16", "f16")[0].read_bytes()


@pytest.mark.parametrize("size", [0, 4, 24, 100, 1000, 60000])
@pytest.mark.parametrize("command", ["info", "quantize"])
def test_cut_gguf_is_a_one_line_error(lm_bytes, tmp_path, capsys, command, size):
    path = tmp_path / "cut.gguf"
    path.write_bytes(lm_bytes[:size])
    out = tmp_path / "out.gguf"
    argv = ["info", str(path)] if command == "info" else ["quantize", str(path), str(out), "q8_0", "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dsocr: error: {path}: "), err
    assert ("not a GGUF file" if size < 4 else "truncated or corrupt GGUF") in err[0]
    assert not out.exists() and not out.with_name("out.gguf.part").exists()


def test_cut_gguf_through_the_cli_has_no_traceback(lm_bytes, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(lm_bytes[:1000])
    one_line_error(run_limited("quantize", path, tmp_path / "out.gguf", "q8_0"), "truncated or corrupt GGUF")


def test_real_files_still_open(converted, llamacpp_file):
    """Everything we convert and everything llama.cpp's converter made passes the scan unchanged."""
    paths = [*converted("f16", "f16"), *converted("q8_0", "q8_0")]
    paths += [llamacpp_file(n) for n in ("tiny-dsocr-lm-f16.gguf", "tiny-dsocr-mmproj-f16.gguf")]
    for path in paths:
        check_gguf(path)
        theirs = gguf.GGUFReader(path)
        ours = GGUFFile(path)
        assert [t.name for t in theirs.tensors] == list(ours.tensors)
        assert json.dumps(describe_gguf(path))


def test_requantize_names_a_missing_key(converted, tmp_path):
    lm = converted("f16", "f16")[0]
    path = tmp_path / "nokey.gguf"
    path.write_bytes(replaced(lm.read_bytes(), b"deepseek2-ocr.block_count", b"deepseek2-ocr.blockXcount"))
    with pytest.raises(ConvertError, match="key deepseek2-ocr.block_count is missing"):
        requantize(path, tmp_path / "out.gguf", "q8_0", progress=False)


# ---------------------------------------------------------------- the pair is replaced whole

def test_failed_mmproj_write_keeps_the_old_pair(tmp_path):
    from devtools.synthetic import write_random_checkpoint
    out = tmp_path / "out"
    old = {f.path: f.path.read_bytes() for f in convert_checkpoint(TINY, out, "f16", "f16", name="m", progress=False)}
    other = write_random_checkpoint(tmp_path / "other", TINY, TINY, seed=1)   # same shapes, other weights
    (out / "mmproj-m-F16.gguf.part").mkdir()   # the mmproj cannot be written
    with pytest.raises(ConvertError, match="mmproj-m-F16.gguf"):
        convert_checkpoint(other, out, "f16", "f16", name="m", progress=False)
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(p.name for p in out.iterdir()) == ["m-F16.gguf", "mmproj-m-F16.gguf", "mmproj-m-F16.gguf.part"]
    (out / "mmproj-m-F16.gguf.part").rmdir()
    new = convert_checkpoint(other, out, "f16", "f16", name="m", progress=False)
    assert sorted(f.path for f in new) == sorted(old) and all(p.read_bytes() != b for p, b in old.items())
    assert sorted(p.name for p in out.iterdir()) == ["m-F16.gguf", "mmproj-m-F16.gguf"]


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """The tiny checkpoint with 128x wider experts and a 128x wider CLIP MLP (~90 MB): both files take a while to write,
    so a signal sent when a .part appears lands while that file is written, not after the pair is committed."""
    from devtools.synthetic import write_random_checkpoint
    import shutil
    folder = tmp_path_factory.mktemp("slow")
    cfg = json.loads((TINY / "config.json").read_text())
    for c in (cfg, cfg["language_config"]):
        c["moe_intermediate_size"], c["intermediate_size"] = 4096, 16384
    cfg["vision_config"]["width"]["clip-l-14-224"]["ffn_hidden_size"] = 65536
    (folder / "config").mkdir()
    (folder / "config" / "config.json").write_text(json.dumps(cfg))
    shutil.copy(TINY / "model.safetensors.index.json", folder / "config")
    return write_random_checkpoint(folder / "ckpt", folder / "config", TINY)


# SIGTERM while the LM is written; SIGHUP while the mmproj is, the complete LM waiting as .part.
@pytest.mark.parametrize("signum,part", [(signal.SIGTERM, "tiny-dsocr-Q8_0.gguf.part"),
                                         (signal.SIGHUP, "mmproj-tiny-dsocr-F16.gguf.part")])
def test_signal_during_convert_leaves_no_part(slow_checkpoint, tmp_path, signum, part):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dsocr.cli.main", "convert", str(slow_checkpoint), "-o", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / part).exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.002)
    os.kill(proc.pid, signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert stderr.strip().splitlines() == [f"dsocr: stopped by {signal.Signals(signum).name}"]
    assert list(out.iterdir()) == []
