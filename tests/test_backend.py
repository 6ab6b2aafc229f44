"""The backend contract (runtime/backend.py): both backends define every op of the Protocol with
its signature (parameter names, kinds and defaults; a backend may add keyword-only tuning
parameters with defaults), offer no public op outside it, and the model graphs and their drivers
call nothing else on a backend. Read from the classes and the source, so no device is needed."""
import ast
import inspect

import pytest

from dsocr.runtime.backend import Backend
from dsocr.runtime.cpu import CPUBackend
from dsocr.runtime.cuda import CUDABackend

from conftest import REPO

BACKENDS = [CPUBackend, CUDABackend]
# the modules that drive a backend, and the names they hold it by
DRIVERS = ["runtime/language.py", "runtime/vision.py", "runtime/tap.py", "runtime/generate.py", "runtime/engine.py"]
HOLDERS = {"be", "backend"}


def protocol_members() -> dict[str, inspect.Signature | None]:
    """name -> signature without self (None for a data attribute)."""
    members = {name: None for name in Backend.__annotations__}
    for name, value in vars(Backend).items():
        if inspect.isfunction(value) and not name.startswith("_"):   # typing.Protocol adds dunders
            members[name] = drop_self(inspect.signature(value))
    return members


def drop_self(sig: inspect.Signature) -> inspect.Signature:
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def op_signature(cls, name: str) -> inspect.Signature:
    """The op as a graph calls it (without self); staticmethods wrap numba kernels or functions."""
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, staticmethod):
        return inspect.signature(raw.__func__)
    return drop_self(inspect.signature(raw))


def contract_view(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    """(name, kind, default) of each parameter; annotations differ between backends and are ignored."""
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_the_protocol_lists_ops_with_one_line_docs():
    members = protocol_members()
    assert len(members) > 30
    for name, sig in members.items():
        if sig is not None:
            doc = inspect.getdoc(getattr(Backend, name))
            assert doc, name


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_backend_defines_every_op_with_the_protocol_signature(cls):
    for name, want in protocol_members().items():
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        if want is None:
            assert isinstance(getattr(cls, name), str), name
            continue
        got = op_signature(cls, name)
        n = len(want.parameters)
        assert contract_view(got)[:n] == contract_view(want), f"{cls.__name__}.{name}{got} is not {name}{want}"
        for extra in list(got.parameters.values())[n:]:    # tuning knobs only: keyword-only, defaulted
            assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is not extra.empty, \
                f"{cls.__name__}.{name}: {extra.name}"


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_backend_offers_no_public_op_outside_the_protocol(cls):
    public = {name for name in vars(cls) if not name.startswith("_")}
    assert public - set(protocol_members()) == set()


def backend_uses(path) -> dict[str, int]:
    """Attributes read on a backend in a module: `be.x`, `backend.x`, `<anything>.be.x`, `<anything>.backend.x`
    -> the line of their first use."""
    uses: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        holder = node.value
        if (isinstance(holder, ast.Name) and holder.id in HOLDERS) or \
                (isinstance(holder, ast.Attribute) and holder.attr in HOLDERS):
            uses.setdefault(node.attr, node.lineno)
    return uses


def test_graphs_call_nothing_outside_the_protocol():
    members = set(protocol_members())
    used = {}
    for rel in DRIVERS:
        for name, line in backend_uses(REPO / rel).items():
            used.setdefault(name, f"{rel}:{line}")
    assert {"matmul", "attention", "attention_causal", "conv2d", "rope", "embed"} <= set(used)   # it sees the graphs
    outside = {name: where for name, where in used.items() if name not in members}
    assert outside == {}


def test_backends_do_not_import_each_other():
    """Shared host code (rope tables, block layouts) lives in neutral modules, not in a backend."""
    for backend, other in (("cuda", "cpu"), ("cpu", "cuda")):
        for path in sorted((REPO / "runtime" / backend).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                assert not any(n.startswith(f"dsocr.runtime.{other}") for n in names), (path.name, node.lineno)
