"""`dsocr batch --ray` on a local Ray instance (2 CPUs, loopback): the same records and files as the
local run, page for page; an actor killed mid-run loses nothing and duplicates nothing."""
import threading
import time

import pytest

from dsocr.cli.main import main

from test_batch import NOTE, PORTRAIT, RESULTS, by_page, folder_files, make_pdf, records, run_batch, without_timings

ray = pytest.importorskip("ray")
from PIL import Image  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A 10-page PDF and an image: 11 units, 3 chunks of the default 4 pages."""
    src = tmp_path_factory.mktemp("ray-inputs")
    note, portrait = Image.open(NOTE).convert("RGB"), Image.open(PORTRAIT).convert("RGB")
    make_pdf(src / "book.pdf", [note, portrait.resize((300, 420)), note.rotate(90, expand=True)] * 3 + [note])
    portrait.save(src / "cover.png")
    return src


@pytest.fixture(scope="module")
def local_run(converted, collection, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    r = run_batch(collection, "-o", out, "-n", 12, "--retries", 0, "-q", model=converted("f32", "f32"))
    assert r.returncode == 1, r.stderr           # the tiny model never stops: every page ends at the limit
    return out


def ray_batch(converted, collection, out, monkeypatch, *extra):
    lm, mm = converted("f32", "f32")
    monkeypatch.setenv("DSOCR_CONFIG", str(out.parent / "none.toml"))
    return main(["batch", str(collection), "-o", str(out), "-m", str(lm), "--mmproj", str(mm), "--mode", "tiny",
                 "-n", "12", "--retries", "0", "--ray", "--workers", "2", *extra])


def test_ray_run_equals_the_local_run_page_for_page(cluster, converted, collection, local_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert ray_batch(converted, collection, out, monkeypatch, "-q") == 1
    assert len(records(out)) == 11
    assert without_timings(by_page(out)) == without_timings(by_page(local_run))
    assert folder_files(out) == folder_files(local_run)


def test_a_killed_actor_loses_and_duplicates_no_page(cluster, converted, collection, local_run, tmp_path, monkeypatch,
                                                      capsys):
    out = tmp_path / "out"

    def kill_one_once_a_page_is_written():
        deadline = time.monotonic() + 300
        while not ((out / RESULTS).is_file() and records(out)) and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(ray.get_actor("dsocr-batch-0"))    # it holds a chunk in flight: one waited behind the first
    killer = threading.Thread(target=kill_one_once_a_page_is_written)
    killer.start()
    assert ray_batch(converted, collection, out, monkeypatch) == 1       # the CLI on the main thread (signals)
    killer.join()
    assert "a Ray worker died" in capsys.readouterr().err
    assert without_timings(by_page(out)) == without_timings(by_page(local_run))      # each page exactly once
    assert folder_files(out) == folder_files(local_run)
