"""Property: opening any byte string as a GGUF (GGUFFile, `dsocr info`'s describe_gguf) gives a
result or a one-line error (ModelError, or the CLI's ConvertError), never another exception, within 2 s per example and with the process's
peak RSS growing by less than 256 MB over a whole run. Inputs: truncations of the converted tiny
pair, mutations of its header counts and lengths, and small generated headers."""
import contextlib
import json
import resource
import struct
import time

import pytest
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT
from hypothesis import HealthCheck, given, settings, strategies as st

from dsocr.cli.commands_models import describe_gguf
from dsocr.convert import ConvertError
from dsocr.runtime.errors import ModelError
from dsocr.runtime.gguf_file import GGUFFile

from test_gguf_untrusted import bounded, header_sites, patched

SECONDS_PER_EXAMPLE = 2.0
RSS_GROWTH_MB = 256
FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def pair(converted):
    """(bytes, header sites) of the converted tiny LM and mmproj."""
    return [(p.read_bytes(), list(header_sites(p).values())) for p in converted("f16", "f16")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def rss_growth_below(megabytes: int):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KB on Linux
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) >> 10
    assert grown < megabytes, f"peak RSS grew by {grown} MB"


def open_everywhere(path, data: bytes) -> None:
    path.unlink(missing_ok=True)   # a new file, never one a previous example's mapping still covers
    path.write_bytes(data)
    start = time.perf_counter()
    for opener in (GGUFFile, lambda p: json.dumps(describe_gguf(p))):
        try:
            with bounded(SECONDS_PER_EXAMPLE, RSS_GROWTH_MB):
                opener(path)
        except (ModelError, ConvertError):
            pass
    assert time.perf_counter() - start < SECONDS_PER_EXAMPLE


def test_truncations(pair, workdir):
    @settings(FUZZ, max_examples=100)
    @given(st.data())
    def check(data):
        blob, _ = data.draw(st.sampled_from(pair))
        open_everywhere(workdir / "cut.gguf", blob[:data.draw(st.integers(0, len(blob)))])

    with rss_growth_below(RSS_GROWTH_MB):
        check()


BOUNDARIES = [0, 1, 2, 3, 4, 5, 31, 32, 33, 63, 64, 65, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
              2**40, 2**63 - 1, 2**63, 2**64 - 1]


def test_header_mutations(pair, workdir):
    """Counts, key / string / name lengths, array counts and element types, tensor n_dims, dims,
    types and offsets set to boundary, nearby or random values; or header bytes overwritten."""
    @settings(FUZZ, max_examples=250)
    @given(st.data())
    def check(data):
        blob, sites = data.draw(st.sampled_from(pair))
        for _ in range(data.draw(st.integers(1, 3))):
            if data.draw(st.integers(0, 4)) == 0:   # a stray byte anywhere in the header
                pos = data.draw(st.integers(0, max(s.offset for s in sites) + 8))
                blob = blob[:pos] + bytes([data.draw(st.integers(0, 255))]) + blob[pos + 1:]
                continue
            site = data.draw(st.sampled_from(sites))
            bits = 8 * struct.calcsize(site.fmt)
            old = struct.unpack_from(site.fmt, blob, site.offset)[0]
            value = data.draw(st.one_of(st.sampled_from(BOUNDARIES), st.integers(-64, 64).map(lambda d: old + d),
                                        st.integers(0, 2**bits - 1)))
            blob = patched(blob, site, value % 2**bits)
        open_everywhere(workdir / "mutated.gguf", blob)

    with rss_growth_below(RSS_GROWTH_MB):
        check()


LENGTHS = st.one_of(st.integers(0, 64), st.sampled_from(BOUNDARIES))


def mostly(truth, other=LENGTHS):
    """TRUTH seven times in eight (a header with many lies is refused at its first)."""
    truth = truth if isinstance(truth, st.SearchStrategy) else st.just(truth)
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda honest: truth if honest else other)

KEYS = st.one_of(st.sampled_from(["general.architecture", "general.alignment", "tokenizer.ggml.tokens",
                                  "tokenizer.chat_template", "GGUF.version", "k"]), st.text(max_size=12))
SCALAR_BYTES = {VT.UINT8: 1, VT.INT8: 1, VT.BOOL: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4,
                VT.FLOAT32: 4, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}


@st.composite
def gguf_string(draw, text=st.text(max_size=16)):
    raw = draw(mostly(text.map(str.encode), st.binary(max_size=16)))
    n = draw(mostly(len(raw)))
    return struct.pack("<Q", n) + raw


@st.composite
def gguf_value(draw, vtype, depth=0):
    if vtype in SCALAR_BYTES:
        return draw(st.binary(min_size=SCALAR_BYTES[vtype], max_size=SCALAR_BYTES[vtype]))
    if vtype == VT.STRING:
        return draw(gguf_string())
    if vtype == VT.ARRAY and depth < 2:
        itype = draw(st.sampled_from(list(VT)))
        items = [draw(gguf_value(itype, depth + 1)) for _ in range(draw(st.integers(0, 4)))]
        n = draw(mostly(len(items)))
        return struct.pack("<IQ", itype, n) + b"".join(items)
    return draw(st.binary(max_size=8))


@st.composite
def generated_gguf(draw):
    kvs = []
    for _ in range(draw(st.integers(0, 4))):
        vtype = draw(mostly(st.sampled_from(list(VT)), st.integers(0, 2**32 - 1)))
        kvs.append(draw(gguf_string(KEYS)) + struct.pack("<I", vtype) + draw(gguf_value(vtype)))
    infos, offset = [], 0
    for i in range(draw(st.integers(0, 3))):
        row = draw(mostly(st.sampled_from([32, 64, 256])))
        dims = [row] + draw(mostly(st.lists(st.integers(1, 4), max_size=2), st.lists(LENGTHS, max_size=4)))
        qtype = draw(mostly(st.sampled_from([QT.F32, QT.F16, QT.Q8_0, QT.Q4_K]), st.integers(0, 2**32 - 1)))
        at = draw(mostly(offset))
        infos.append(draw(gguf_string(st.just(f"t{i}"))) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, at))
        offset += 4096
    version = draw(mostly(st.sampled_from([3, 2]), st.sampled_from([1, 0, 4, 3 << 24, 2**32 - 1])))
    n_tensors = draw(mostly(len(infos)))
    n_kv = draw(mostly(len(kvs)))
    magic = draw(mostly(b"GGUF", st.sampled_from([b"GGML", b"FUGG", b"GGU"])))
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    head += bytes(-len(head) % 32)
    return head + bytes(draw(st.sampled_from([0, 1, 4096 * len(infos), 4096 * len(infos) + 7])))


def test_generated_headers(workdir):
    @settings(FUZZ, max_examples=250)
    @given(generated_gguf())
    def check(blob):
        open_everywhere(workdir / "generated.gguf", blob)

    with rss_growth_below(RSS_GROWTH_MB):
        check()
