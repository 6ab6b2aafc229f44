"""`dsocr batch` (issue 14, part 2): inputs expanded into page units, the output folder (results.jsonl,
per page the files `dsocr ocr -o` writes, per document its .md), exactly once across a SIGKILL, retries
at a higher temperature, failed pages recorded and the run going on, exit codes, --quiet.

The tiny random-weight model never writes its end-of-text token, so every page runs to the token limit
(a failure, retried); `stopping_model` is the same model with the end-of-text id moved to a token it
writes early on NOTE, so that NOTE's pages end with "stop"."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from gguf import GGUFValueType as VT
from PIL import Image

from dsocr.batch.inputs import expand_inputs, page_units
from dsocr.batch.store import RESULTS, OutputFolder
from dsocr.runtime.errors import InputError

from conftest import TINY
from test_shapes import rewrite_gguf

NOTE = TINY / "images" / "small_note.png"          # 500x360
PORTRAIT = TINY / "images" / "doc_portrait.png"
WIDE = TINY / "images" / "wide_line.png"
RECORD_KEYS = {"document", "page", "path", "text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason",
               "timings", "image_size", "regions", "attempts", "temperature", "failed", "error", "model"}
ERROR_RECORD_KEYS = {"document", "page", "path", "attempts", "temperature", "failed", "error", "model"}


def run_batch(*args, model, mode="tiny", wait=True, **kwargs):
    cmd = [sys.executable, "-m", "dsocr.cli.main", "batch", *map(str, args), "-m", model[0], "--mmproj", model[1],
           "--mode", mode]
    env = {**os.environ, "DSOCR_CONFIG": os.devnull + ".toml"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def records(out):
    return [json.loads(line) for line in (out / RESULTS).read_text(encoding="utf-8").splitlines()]


def by_page(out):
    recs = records(out)
    keyed = {(r["document"], r["page"]): r for r in recs}
    assert len(keyed) == len(recs), "a page has two records"
    return keyed


def folder_files(out):
    """Every file of the output folder but its internals, by relative path -> bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".dsocr-batch" not in p.parts and p.name != RESULTS}


def without_timings(recs):
    return {key: {k: v for k, v in r.items() if k != "timings"} for key, r in recs.items()}


def make_pdf(path, images):
    images = [im.copy() for im in images]      # Pillow keeps what an image was last saved with, appended pages too
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72)
    return path


@pytest.fixture(scope="module")
def model(converted):
    return converted("f32", "f32")


@pytest.fixture(scope="module")
def stopping_model(model, tmp_path_factory):
    """The f32 pair, its end-of-text id being the first token greedy decoding writes on NOTE (tiny mode)
    from the third on that it had not written before: NOTE then ends with "stop" after a few tokens."""
    from dsocr.runtime.engine import OcrEngine, OcrRequest
    from dsocr.runtime.generate import SamplingParams
    from dsocr.runtime.preprocess import ViewConfig
    ids = OcrEngine(*model).run(OcrRequest([Image.open(NOTE).convert("RGB")], view=ViewConfig.from_mode("tiny"),
                                           sampling=SamplingParams(max_new_tokens=12))).token_ids
    k = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])
    lm = rewrite_gguf(model[0], tmp_path_factory.mktemp("stopping") / "tiny-stop.gguf",
                      keys={"tokenizer.ggml.eos_token_id": (ids[k], VT.UINT32)})
    return lm, model[1]


@pytest.fixture
def tree(tmp_path):
    """in/a/x.png (NOTE), in/b/x.png (NOTE too: same stem, another folder), in/a/doc.pdf (3 pages of NOTE)."""
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    shutil.copy(NOTE, src / "a" / "x.png")
    shutil.copy(NOTE, src / "b" / "x.png")
    note = Image.open(NOTE).convert("RGB")
    make_pdf(src / "a" / "doc.pdf", [note] * 3)
    return src


# ---------------------------------------------------------------- inputs

def test_inputs_files_folders_globs_and_manifests(tree, tmp_path, monkeypatch):
    (tree / "a" / ".hidden.png").write_bytes(NOTE.read_bytes())          # hidden: skipped
    (tree / "a" / "notes.txt").write_text("a/x.png\n")                   # in a folder a .txt is no manifest
    (tree / "out").mkdir()
    (tree / "out" / "boxes.png").write_bytes(NOTE.read_bytes())          # the output folder is never input
    (tree / "c").mkdir()
    shutil.copy(WIDE, tree / "c" / "w.png")
    shutil.copy(PORTRAIT, tree / "c" / "p.jpg.png")
    (tree / "list.txt").write_text("# pages to do\n\nc/w.png\n" + str(tree / "a" / "x.png") + "\n")
    (tree / "list.jsonl").write_text(json.dumps({"path": "c/p.jpg.png", "id": 7}) + "\n")

    docs = expand_inputs([str(tree)], exclude=tree / "out")
    assert [(d.name, d.pdf, d.pages) for d in docs] == [
        ("a/doc.pdf", True, 3), ("a/x.png", False, 1), ("b/x.png", False, 1), ("c/p.jpg.png", False, 1),
        ("c/w.png", False, 1)]
    assert [u.key for u in page_units(docs)][:4] == [("a/doc.pdf", 1), ("a/doc.pdf", 2), ("a/doc.pdf", 3),
                                                     ("a/x.png", 1)]
    # names are relative to the deepest folder holding every input: one file alone is its own name
    assert [d.name for d in expand_inputs([str(tree / "b" / "x.png")])] == ["x.png"]
    monkeypatch.chdir(tree)
    assert [d.name for d in expand_inputs(["*/x.png"])] == ["a/x.png", "b/x.png"]
    assert [d.name for d in expand_inputs(["list.txt", "list.jsonl"])] == ["a/x.png", "c/p.jpg.png", "c/w.png"]
    (tmp_path / "lists").mkdir()       # names come from the listed files' folders, not the manifest's
    (tmp_path / "lists" / "c.txt").write_text(str(tree / "c" / "w.png") + "\n")
    assert [d.name for d in expand_inputs([str(tmp_path / "lists" / "c.txt")])] == ["w.png"]
    assert [d.name for d in expand_inputs(["a/doc.pdf", "a/x.png", "./a/x.png"])] == ["doc.pdf", "x.png"]

    (tree / "nested.txt").write_text("list.jsonl\n")
    (tree / "bad.jsonl").write_text('{"path": "a/x.png"}\n{"file": "b/x.png"}\n')
    (tree / "data.bin").write_bytes(b"\0" * 64)
    for inputs, needle in [([], "no input given"), (["nope/"], "nope/: no such file or folder"),
                           (["*.tif"], "*.tif: no file matches"), (["nested.txt"], "lists another manifest"),
                           (["bad.jsonl"], 'bad.jsonl line 2: no "path" string'),
                           (["data.bin"], "data.bin: not an image, a PDF or a manifest"),
                           (["a/notes.txt"], "a/x.png (listed in"), (["out"], "no images or PDFs in out")]:
        with pytest.raises(InputError, match=None) as e:
            expand_inputs(inputs, exclude=tree / "out")
        assert needle in str(e.value) and "\n" not in str(e.value), (inputs, str(e.value))


def test_input_errors_exit_2_with_one_line(model, tree, tmp_path):
    for args, needle in [([tree / "nope.png"], "nope.png: no such file or folder"),
                         ([tree, "--retries", -1], "--retries must be at least 0"),
                         ([tree, "--retry-temperature", "nan"], "--retry-temperature must be a finite number")]:
        r = run_batch(*args, "-o", tmp_path / "out", model=model)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("dsocr: error: ") and needle in lines[0], \
            r.stderr
    assert not (tmp_path / "out" / RESULTS).exists()


# ---------------------------------------------------------------- the output folder

def test_records_page_files_and_document_markdown(stopping_model, tree, tmp_path):
    out = tmp_path / "out"
    r = run_batch(tree, "-o", out, "-n", 12, model=stopping_model)
    assert r.returncode == 0, r.stderr
    assert "dsocr: 5 pages in 3 documents: 0 done already, 5 to do" in r.stderr
    assert "dsocr: 5 pages ok, 0 failed" in r.stderr
    recs = by_page(out)
    assert set(recs) == {("a/doc.pdf", 1), ("a/doc.pdf", 2), ("a/doc.pdf", 3), ("a/x.png", 1), ("b/x.png", 1)}
    for (doc, page), rec in recs.items():
        assert set(rec) == RECORD_KEYS
        assert rec["finish_reason"] == "stop" and not rec["failed"] and rec["error"] is None, rec
        assert rec["attempts"] == 1 and rec["temperature"] == 0.0
        assert rec["completion_tokens"] == len(rec["token_ids"]) >= 1 and rec["prompt_tokens"] > 0
        assert rec["path"] == str(tree / doc) and {"vision_s", "prefill_s", "decode_s"} <= set(rec["timings"])
        assert sorted(rec["model"]) == ["lm", "mmproj"]
        assert rec["model"]["lm"]["file"] == "tiny-stop.gguf" and len(rec["model"]["lm"]["sha256"]) == 64
        assert sorted(p.name for p in (out / doc / f"page-{page}").iterdir()) == ["boxes.png", "result.md",
                                                                                   "result.mmd"]
        assert (out / doc / f"page-{page}" / "result.mmd").read_text(encoding="utf-8") == rec["text"]
    assert recs[("a/x.png", 1)]["image_size"] == [500, 360] and recs[("a/doc.pdf", 1)]["image_size"] == [1000, 720]

    # the files of a page are the ones `dsocr ocr -o` writes, byte for byte
    ocr_out = tmp_path / "ocr"
    r = subprocess.run([sys.executable, "-m", "dsocr.cli.main", "ocr", tree / "a" / "x.png", "-m", stopping_model[0],
                        "--mmproj", stopping_model[1], "--mode", "tiny", "-n", "12", "-o", ocr_out, "-q"],
                       capture_output=True, text=True, env={**os.environ, "DSOCR_CONFIG": os.devnull + ".toml"})
    assert r.returncode == 0, r.stderr
    for name in ["result.md", "result.mmd", "boxes.png"]:
        assert (ocr_out / name).read_bytes() == (out / "a/x.png/page-1" / name).read_bytes(), name

    pages = [(out / f"a/doc.pdf/page-{n}/result.md").read_text(encoding="utf-8") for n in (1, 2, 3)]
    assert (out / "a/doc.pdf.md").read_text(encoding="utf-8") == "\n\n".join(
        f"<!-- page {n} -->\n{t}" for n, t in enumerate(pages, 1))
    assert (out / "b/x.png.md").read_text(encoding="utf-8") == (out / "b/x.png/page-1/result.md").read_text(
        encoding="utf-8")
    assert sorted(p.name for p in (out / ".dsocr-batch").iterdir()) == ["lock", "sha256.json"]   # no temporaries


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(model, tmp_path):
    """30 pages that each run to the token limit and are retried (sampled, seeded), killed once at least
    2 records are in, resumed: exactly one record per page, the same records (timings aside), files and
    .md files as a run that was never interrupted, and the same exit status."""
    src = tmp_path / "in"
    src.mkdir()
    note, wide, portrait = (Image.open(p).convert("RGB") for p in (NOTE, WIDE, PORTRAIT))
    make_pdf(src / "long.pdf", [note, wide, portrait] * 4)
    make_pdf(src / "other.pdf", [wide, note] * 4)
    for i in range(10):
        shutil.copy([NOTE, WIDE, PORTRAIT][i % 3], src / f"scan{i}.png")
    flags = ["-n", 8, "--seed", 0, "-q"]
    whole = run_batch(src, "-o", tmp_path / "whole", *flags, model=model)
    assert whole.returncode == 1 and whole.stderr == "", whole.stderr
    assert len(by_page(tmp_path / "whole")) == 30

    out = tmp_path / "killed"
    proc = run_batch(src, "-o", out, *flags, model=model, wait=False)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / RESULTS).exists() and (out / RESULTS).read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    at_kill = (out / RESULTS).read_bytes().count(b"\n")
    assert 2 <= at_kill < 30, at_kill

    resumed = run_batch(src, "-o", out, *flags, model=model)
    assert resumed.returncode == whole.returncode and resumed.stderr == "", resumed.stderr
    assert len(records(out)) == 30
    assert without_timings(by_page(out)) == without_timings(by_page(tmp_path / "whole"))
    assert folder_files(out) == folder_files(tmp_path / "whole")
    assert len([f for f in folder_files(out) if f.endswith(".md") and "/page-" not in f]) == 12


def test_a_torn_last_line_and_a_page_folder_without_record_are_redone(stopping_model, tree, tmp_path):
    out = tmp_path / "out"
    assert run_batch(tree, "-o", out, "-n", 12, "-q", model=stopping_model).returncode == 0
    whole, files = by_page(out), folder_files(out)
    lines = (out / RESULTS).read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1])
    # as a SIGKILL leaves it: the last record half written, an earlier page's folder in place but its record lost
    lost = json.loads(lines[0])
    (out / RESULTS).write_bytes(b"".join(lines[1:-1]) + lines[-1][:40])
    (out / lost["document"] / f"page-{lost['page']}" / "stale.txt").write_text("from a run that died")
    (out / f"{lost['document']}.md").unlink()

    r = run_batch(tree, "-o", out, "-n", 12, model=stopping_model)
    assert r.returncode == 0, r.stderr
    assert "5 pages in 3 documents: 3 done already, 2 to do" in r.stderr
    assert without_timings(by_page(out)) == without_timings(whole)
    assert folder_files(out) == files                      # stale.txt gone, the .md back
    assert {(last["document"], last["page"]), (lost["document"], lost["page"])} <= set(by_page(out))


def test_resume_skips_done_pages(stopping_model, tree, tmp_path):
    out = tmp_path / "out"
    assert run_batch(tree, "-o", out, "-n", 12, "-q", model=stopping_model).returncode == 0
    before = (out / RESULTS).read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".dsocr-batch" not in p.parts}
    r = run_batch(tree, "-o", out, "-n", 12, model=stopping_model)
    assert r.returncode == 0 and "5 pages in 3 documents: 5 done already, 0 to do" in r.stderr, r.stderr
    assert (out / RESULTS).read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes          # no page was written again

    # a new file in the folder: only its page runs
    shutil.copy(NOTE, tree / "b" / "y.png")
    r = run_batch(tree, "-o", out, "-n", 12, model=stopping_model)
    assert r.returncode == 0 and "6 pages in 4 documents: 5 done already, 1 to do" in r.stderr, r.stderr
    assert records(out)[:5] == [json.loads(line) for line in before.splitlines()] and len(records(out)) == 6

    # --no-resume: every page again, one record each
    r = run_batch(tree, "-o", out, "-n", 12, "--no-resume", model=stopping_model)
    assert r.returncode == 0 and "6 pages in 4 documents: 0 done already, 6 to do" in r.stderr, r.stderr
    assert len(by_page(out)) == 6


def test_another_model_is_refused_and_one_writer_at_a_time(model, stopping_model, tree, tmp_path):
    out = tmp_path / "out"
    assert run_batch(tree / "a" / "x.png", "-o", out, "-n", 2, "-q", "--retries", 0, model=model).returncode == 1
    r = run_batch(tree / "a" / "x.png", "-o", out, "-n", 2, model=stopping_model)
    assert r.returncode == 2 and "OCR'd with other model files (tiny-dsocr-F32.gguf, mmproj-tiny-dsocr-F32.gguf)" \
        in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    docs = expand_inputs([str(tree / "a" / "x.png")])
    first = OutputFolder(out, docs)
    try:
        with pytest.raises(InputError, match="another dsocr batch is writing there"):
            OutputFolder(out, docs)
    finally:
        first.close()
    OutputFolder(out, docs).close()                  # free again once the first writer is done


def test_no_resume_removes_nothing_outside_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.png"
    (victim / "page-1").mkdir(parents=True)
    (tmp_path / "victim.png.md").write_text("mine")
    (out / RESULTS).write_text("".join(json.dumps({"document": name, "page": 1, "failed": False}) + "\n"
                                       for name in ("../victim.png", ".", "")))
    OutputFolder(out, [], resume=False).close()
    assert (victim / "page-1").is_dir() and (tmp_path / "victim.png.md").read_text() == "mine"
    assert (out / RESULTS).read_bytes() == b""


# ---------------------------------------------------------------- failures, retries, exit status, quiet

def test_a_corrupt_image_is_recorded_and_the_run_goes_on(stopping_model, tree, tmp_path):
    (tree / "b" / "broken.png").write_bytes(NOTE.read_bytes()[:200])          # a truncated PNG
    out = tmp_path / "out"
    r = run_batch(tree, "-o", out, "-n", 12, model=stopping_model)
    assert r.returncode == 1, r.stderr
    assert "dsocr: 5 pages ok, 1 failed" in r.stderr
    recs = by_page(out)
    bad = recs[("b/broken.png", 1)]
    assert set(bad) == ERROR_RECORD_KEYS and bad["failed"] and bad["attempts"] == 2
    assert "broken.png: corrupt or unreadable image" in bad["error"]
    assert not (out / "b/broken.png").exists() and (out / "b/broken.png.md").read_text() == ""
    assert all(not r["failed"] for key, r in recs.items() if key != ("b/broken.png", 1)) and len(recs) == 6


def test_the_token_limit_is_retried_hotter_and_recorded(model, stopping_model, tmp_path):
    r = run_batch(WIDE, "-o", tmp_path / "out", "-n", 8, "--retries", 2, "--retry-temperature", 0.3, "--seed", 1,
                  "-q", model=model)
    assert r.returncode == 1 and r.stderr == "", r.stderr
    (rec,) = records(tmp_path / "out")
    assert rec["finish_reason"] == "length" and rec["failed"] and rec["error"] is None
    assert rec["attempts"] == 3 and rec["temperature"] == 0.6 and rec["completion_tokens"] == 8
    assert (tmp_path / "out" / "wide_line.png/page-1/result.mmd").read_text(encoding="utf-8") == rec["text"]
    # the last try did sample at 0.6: `dsocr ocr` at that temperature and seed writes the same tokens, greedy others
    ocr = [sys.executable, "-m", "dsocr.cli.main", "ocr", WIDE, "-m", model[0], "--mmproj", model[1], "--mode", "tiny",
           "-n", "8", "--seed", "1", "--json", "-q"]
    env = {**os.environ, "DSOCR_CONFIG": os.devnull + ".toml"}
    hot, greedy = (json.loads(subprocess.run(ocr + ["--temperature", t], capture_output=True, text=True, env=env,
                                             check=True).stdout)["token_ids"] for t in ("0.6", "0"))
    assert rec["token_ids"] == hot != greedy
    # a page that stops is not retried
    r = run_batch(NOTE, "-o", tmp_path / "ok", "-n", 12, "--retries", 2, "-q", model=stopping_model)
    (rec,) = records(tmp_path / "ok")
    assert r.returncode == 0 and rec["finish_reason"] == "stop" and rec["attempts"] == 1 and rec["temperature"] == 0


def test_quiet_prints_nothing_on_stderr(stopping_model, tree, tmp_path):
    r = run_batch(tree, "-o", tmp_path / "out", "-n", 12, "-q", model=stopping_model)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr
    r = run_batch(tree, "-o", tmp_path / "loud", "-n", 12, model=stopping_model)
    assert "5/5" in r.stderr and "page/s" in r.stderr           # the progress bar


def test_pages_decode_together_and_are_rendered_only_as_slots_free(model, tmp_path, monkeypatch):
    from dsocr.batch.inputs import PageImages
    from dsocr.batch.run import RetryPolicy, ocr_units
    from dsocr.runtime.engine import OcrEngine
    from dsocr.runtime.generate import SamplingParams
    from dsocr.runtime.preprocess import ViewConfig
    make_pdf(tmp_path / "doc.pdf", [Image.open(NOTE).convert("RGB")] * 7)
    units = page_units(expand_inputs([str(tmp_path / "doc.pdf")]))
    engine = OcrEngine(*model, parallel=3)
    rendered, done, held = [], [], []
    load = PageImages.load

    def counting_load(self, unit):
        rendered.append(unit.page)
        held.append(len(rendered) - len(done))            # pages rendered and not yet handed out
        return load(self, unit)
    monkeypatch.setattr(PageImages, "load", counting_load)
    for outcome in ocr_units(engine, units, {}, ViewConfig.from_mode("tiny"), SamplingParams(max_new_tokens=40),
                             RetryPolicy(retries=0)):
        done.append(outcome.key[1])
    assert sorted(done) == rendered == list(range(1, 8)) and max(held) == 3
    assert max(engine.scheduler.decode_steps) == 3           # three pages in one decode step


def test_the_prompt_flags_are_dsocr_ocrs(model, tmp_path):
    """--task free on a page gives the ids `dsocr ocr --task free` gives (and not the default prompt's)."""
    out = tmp_path / "out"
    assert run_batch(NOTE, "-o", out, "-n", 6, "--retries", 0, "--task", "free", "-q", model=model).returncode == 1
    [rec] = records(out)
    ocr = subprocess.run([sys.executable, "-m", "dsocr.cli.main", "ocr", NOTE, "-m", model[0], "--mmproj", model[1],
                          "--mode", "tiny", "-n", "6", "--task", "free", "--json", "-q"], capture_output=True, text=True,
                         env={**os.environ, "DSOCR_CONFIG": os.devnull + ".toml"})
    assert ocr.returncode == 0, ocr.stderr
    assert rec["token_ids"] == json.loads(ocr.stdout)["token_ids"]
    assert rec["prompt_tokens"] != records_of_default(model, tmp_path)["prompt_tokens"]


def records_of_default(model, tmp_path):
    out = tmp_path / "default"
    run_batch(NOTE, "-o", out, "-n", 1, "--retries", 0, "-q", model=model)
    return records(out)[0]
