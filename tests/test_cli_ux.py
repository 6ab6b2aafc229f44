"""A newcomer's first hour: the one-time compile notice and the server's warm-up, --version, -q,
--verbose after the command, llama.cpp's short flags, help with each flag's default in effect, the
mode table and the official prompts, reversed page ranges, an --output-dir run removing exactly what
the previous run wrote there, boxes.png labels sized with the page and kept apart, and --json with
the input names and the grounding regions."""
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from numba import njit
from PIL import Image, ImageDraw, ImageFont

from dsocr.cli.commands_ocr import chosen_prompt, json_report
from dsocr.cli.main import build_parser, main
from dsocr.cli.output import RunOutputs, compile_notice, human_bytes, table_text
from dsocr.result import OcrResult
from dsocr.runtime.engine import PROMPTS
from dsocr.runtime.errors import InputError
from dsocr.runtime.generate import GenerationResult
from dsocr.runtime.grounding import label_px, parse, place_labels, save_outputs
from dsocr.runtime.pdf import parse_pages
from dsocr.runtime.preprocess import LAYOUTS, ViewConfig, candidate_grids, image_token_count

from conftest import TINY, one_line_error
from test_server import free_port

NOTE = TINY / "images" / "small_note.png"          # 500x360: one view in every mode
PORTRAIT = TINY / "images" / "doc_portrait.png"    # tiles in gundam mode
NOTICE = "dsocr: compiling kernels (once, ~30 s)"
GROUNDED = ("<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Report\n"
            "<|ref|>image<|/ref|><|det|>[[0, 200, 499, 600], [500, 200, 999, 600]]<|/det|>\n"
            "<|ref|>text<|/ref|><|det|>[[100.5, 700, 900, 800], [1, 2, bad]]<|/det|>\nBody.\n")


def run_cli(*args, env=None, config=os.devnull + ".toml"):
    return subprocess.run([sys.executable, "-m", "dsocr.cli.main", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "DSOCR_CONFIG": str(config), **(env or {})})


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """cli(*argv) -> (exit status, stdout, stderr) of `dsocr` in this process, without a config file."""
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "none.toml"))

    def run(*argv):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:        # --help, --version and argparse's own errors
            rc = e.code
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


@pytest.fixture(scope="module")
def three_page_pdf(tmp_path_factory):
    path = tmp_path_factory.mktemp("pdf") / "doc.pdf"
    src = Image.open(NOTE).convert("RGB")
    src.save(path, save_all=True, append_images=[src.rotate(90, expand=True), src.resize((300, 200))], resolution=72)
    return path


# ---------------------------------------------------------------- item 6: compile notice, warm-up

def test_compile_notice_only_when_numba_compiles():
    said = io.StringIO()
    with compile_notice(file=said):
        first = njit(lambda x: x + 1)      # new functions: numba must compile them
        first(1)
        njit(lambda x: x * 2)(2)           # said once per run, not once per kernel
        first(3)                           # compiled already: nothing
    assert said.getvalue() == NOTICE + "...\n"
    quiet = io.StringIO()
    with compile_notice(enabled=False, file=quiet):
        njit(lambda x: x - 1)(1)
    with compile_notice(file=quiet):
        first(4)
    assert quiet.getvalue() == ""


def test_cold_cache_is_announced_and_the_server_warms_up_before_serving(converted, tmp_path, monkeypatch):
    """With numba's cache empty the server says it compiles, warms up, and only then says it serves;
    its warm-up leaves nothing to compile for a real request (tiles, prefill, decode) in a later
    process, which therefore prints no notice."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba-cache"))
    lm, mm = converted("f32", "f32")
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dsocr.cli.main", "serve", "-m", lm, "--mmproj", mm,
                                 "--port", str(free_port())], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "DSOCR_CONFIG": str(tmp_path / "none.toml")})
    try:
        deadline = time.monotonic() + 600          # a cold compile on two busy cores takes minutes at worst
        while "dsocr: serving" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        lines = log.read_text().splitlines()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    said = [next((i for i, line in enumerate(lines) if line.startswith(s)), None)
            for s in (NOTICE, "dsocr: warmed up in", "dsocr: serving")]
    assert None not in said and said == sorted(said), lines
    r = run_cli("ocr", PORTRAIT, "-m", lm, "--mmproj", mm, "-n", 2, "--mode", "gundam")
    assert r.returncode == 0, r.stderr
    assert NOTICE not in r.stderr and "vision 7/7 views" in r.stderr, r.stderr


# ---------------------------------------------------------------- item 7: flags and help

def test_version(cli):
    rc, out, _ = cli("--version")
    assert rc == 0 and out.strip() == f"dsocr {importlib.metadata.version('dsocr')}"


def test_verbose_and_quiet_before_or_after_the_command():
    parse = build_parser().parse_args
    assert (parse(["ocr", "x.png"]).verbose, parse(["ocr", "x.png"]).quiet) == (False, False)
    for argv in (["--verbose", "-q", "ocr", "x.png"], ["ocr", "x.png", "--verbose", "--quiet"],
                 ["-q", "info", "f.gguf", "--verbose"], ["serve", "--verbose", "-q"]):
        args = parse(argv)
        assert args.verbose and args.quiet, argv


def test_verbose_after_the_command_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.png"
    one_line_error(run_cli("ocr", missing), "no such file")
    r = run_cli("ocr", missing, "--verbose")
    assert r.returncode == 1 and "Traceback" in r.stderr and "InputError" in r.stderr


def test_llamacpp_short_flags():
    parse = build_parser().parse_args
    a = parse(["ocr", "x.png", "-m", "lm.gguf", "-p", "Free OCR.", "-n", "5", "-t", "2", "-o", "out"])
    assert (a.model, a.prompt, a.max_new_tokens, a.threads, a.output_dir) == ("lm.gguf", "Free OCR.", 5, 2, "out")
    a = parse(["serve", "-m", "lm.gguf", "-n", "7", "-t", "3"])
    assert (a.model, a.max_new_tokens, a.threads) == ("lm.gguf", 7, 3)
    assert parse(["convert", "ckpt", "-o", "models"]).outdir == "models"


def test_tasks_are_the_official_prompts():
    parse = build_parser().parse_args
    assert chosen_prompt(parse(["ocr", "x.png"])) == PROMPTS["markdown"] == \
        "<image>\n<|grounding|>Convert the document to markdown."
    assert chosen_prompt(parse(["ocr", "x.png", "--task", "free"])) == "<image>\nFree OCR."
    assert chosen_prompt(parse(["ocr", "x.png", "--task", "figure"])) == "<image>\nParse the figure."
    assert chosen_prompt(parse(["ocr", "x.png", "--task", "describe"])) == "<image>\nDescribe this image in detail."
    assert chosen_prompt(parse(["ocr", "x.png", "--locate", "the total"])) == \
        "<image>\nLocate <|ref|>the total<|/ref|> in the image."


def test_one_prompt_source_at_a_time(cli):
    rc, _, err = cli("ocr", "x.png", "--task", "free", "-p", "Free OCR.")
    assert rc == 2 and "not allowed with argument" in err


def test_help_lists_modes_prompts_and_examples(cli):
    rc, out, _ = cli("ocr", "--help")
    assert rc == 0
    for layout in LAYOUTS.values():
        rows = {}                   # a row: the model's name, then the mode's
        for line in out.splitlines():
            if line.startswith("  " + layout.model + " "):
                rest = line[len("  " + layout.model):].split()
                if rest and rest[0] in layout.modes:
                    rows[rest[0]] = line
        assert set(rows) == set(layout.modes), layout.model
        for name, (base, size, crop) in layout.modes.items():
            view = ViewConfig(base, size, crop, layout)
            assert f"{image_token_count(view, (1, 1))} " in rows[name] + " " and f"{size}x{size}" in rows[name]
        tiled = [image_token_count(ViewConfig.from_mode("gundam", layout), g)
                 for g in candidate_grids(layout.min_crops, layout.max_crops)]
        assert f"{min(tiled)}-{max(tiled)} tokens" in rows["gundam"]
    for prompt in PROMPTS.values():
        assert json.dumps(prompt.replace("{}", "TEXT")) in out
    assert "examples:" in out and "dsocr ocr scan.pdf --pages 1-3 -o out" in out


def flat(text: str) -> str:
    return " ".join(text.split())       # help with its wrapped lines joined


def test_help_shows_the_defaults_in_effect(cli, tmp_path, monkeypatch):
    rc, out, _ = cli("ocr", "--help")
    assert rc == 0 and "--mode {tiny,small,base,large,gundam,global} view sizes, see `modes` below (default: gundam)" \
        in flat(out)
    assert "--max-new-tokens N the most tokens to generate, at least 1 (default: 8192)" in flat(out)
    config = tmp_path / "mine.toml"
    config.write_text('[inference]\nmode = "base"\n[server]\nport = 9123\napi_key = "s3cret"\n')
    monkeypatch.setenv("DSOCR_THREADS", "3")
    rc, out, _ = cli("ocr", "--config", config, "--help")
    assert "view sizes, see `modes` below (default: base, from mine.toml)" in flat(out)
    assert "all cores) (default: 3, from DSOCR_THREADS)" in flat(out)
    rc, out, _ = cli("serve", "--help", "--config", config)
    assert "--port PORT default: 9123, from mine.toml" in flat(out) and "s3cret" not in out
    config.write_text("[inference\n")                    # broken: help still works, with the built-in values
    rc, out, _ = cli("ocr", "--config", config, "--help")
    assert rc == 0 and "view sizes, see `modes` below (default: gundam)" in flat(out)


# ---------------------------------------------------------------- item 8: pages, output helpers

def test_reversed_page_range_says_so(three_page_pdf):
    with pytest.raises(InputError, match=r"'3-1' is reversed \(write 1-3\)"):
        parse_pages("3-1", 4)
    assert parse_pages("3-", 4) == [2, 3]                # open-ended is not reversed
    with pytest.raises(InputError, match="outside 1-4"):
        parse_pages("5-", 4)
    one_line_error(run_cli("ocr", three_page_pdf, "--pages", "1,3-2", "-m", "unused.gguf"), "'3-2' is reversed")


def test_output_helpers_have_their_own_module():
    r = subprocess.run([sys.executable, "-c", "import sys, dsocr.cli.commands_models; "
                        "print('dsocr.cli.main' in sys.modules)"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    assert (human_bytes(512), human_bytes(1536), human_bytes(3 * 1024 ** 3)) == ("512 B", "1.5 KB", "3.0 GB")
    assert table_text([["a", "bb"], ["ccc", "d"]], "  ") == "  a    bb\n  ccc  d"


# ---------------------------------------------------------------- item 11: --output-dir reruns

def page(size=(1000, 2000)):
    return Image.new("RGB", size, "white")


def test_a_rerun_removes_what_the_last_run_wrote_and_nothing_else(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "logo.png").write_bytes(b"mine")
    first = RunOutputs(tmp_path)
    first.clear_previous()
    first.add(save_outputs(tmp_path, page(), GROUNDED))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["0.jpg", "1.jpg", "logo.png"]
    second = RunOutputs(tmp_path)
    second.clear_previous()
    second.add(save_outputs(tmp_path, page(), "no images this time"))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["logo.png"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / RunOutputs.MANIFEST).read_text())["files"] == ["result.mmd", "result.md", "boxes.png"]
    (tmp_path / "images" / "logo.png").unlink()
    third = RunOutputs(tmp_path)
    third.clear_previous()
    third.add(save_outputs(tmp_path / "page-1", page(), GROUNDED))
    fourth = RunOutputs(tmp_path)
    fourth.clear_previous()                        # the folders it emptied go too, the user's empty one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "notes.txt"]


def test_a_tampered_manifest_removes_nothing_outside_the_folder(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "keep.txt"
    out.mkdir()
    outside.write_text("keep")
    (out / RunOutputs.MANIFEST).write_text(json.dumps({"files": ["../keep.txt", str(outside), "."]}))
    RunOutputs(out).clear_previous()
    assert outside.read_text() == "keep" and out.is_dir()
    (out / RunOutputs.MANIFEST).write_text("not json")
    RunOutputs(out).clear_previous()                          # unreadable: left alone, no error


def test_cli_rerun_into_the_same_output_dir(converted, three_page_pdf, tmp_path):
    lm, mm = converted("f32", "f32")
    out = tmp_path / "out"
    common = ["-m", lm, "--mmproj", mm, "-n", 1, "--mode", "tiny", "-o", out, "-q"]
    r = run_cli("ocr", three_page_pdf, *common)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert sorted(p.name for p in out.glob("page-*")) == ["page-1", "page-2", "page-3"]
    (out / "mine.txt").write_text("mine")
    r = run_cli("ocr", three_page_pdf, "--pages", "2", *common)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [RunOutputs.MANIFEST, "mine.txt", "page-2", "result.md"]
    assert (out / "result.md").read_text().startswith("<!-- page 2 -->")


# ---------------------------------------------------------------- item 12: boxes.png labels

def test_label_font_grows_with_the_page():
    sizes = [(400, 300), (1240, 1754), (2480, 3508)]          # small image, A4 at 150 and 300 dpi
    px = [label_px(s) for s in sizes]
    assert px == sorted(px) and px[0] >= 12 and px[-1] >= 40 > 11
    heights = []
    for s in sizes:
        box = ImageDraw.Draw(page((1, 1))).textbbox((0, 0), "text", font=ImageFont.load_default(size=label_px(s)))
        heights.append(box[3] - box[1])
    assert heights == sorted(heights) and heights[-1] > 2 * heights[0]


def spans(label, boxes) -> str:
    return "".join(f"<|ref|>{label}<|/ref|><|det|>[{list(b)}]<|/det|>" for b in boxes)


def test_labels_do_not_overlap_on_a_crowded_page():
    """Two columns side by side, lines stacked closer than a label is tall, a box the model repeated,
    cells narrower than their labels: every label's background stays on the page, clear of the others."""
    size = (2480, 3508)
    text = spans("text", [(60, 100, 480, 160), (520, 101, 940, 160)])
    text += spans("text", [(100, 300 + 8 * i, 900, 306 + 8 * i) for i in range(8)])
    text += spans("title", [(100, 500, 900, 560)] * 4)
    text += spans("table_cell", [(100 + 50 * i, 700, 145 + 50 * i, 760) for i in range(8)])
    regions = parse(text, *size)
    placed = place_labels(regions, ImageFont.load_default(size=label_px(size)), size)
    rects = [rect for _, _, rect in placed]
    assert len(rects) == 22
    for i, a in enumerate(rects):
        assert 0 <= a[0] < a[2] <= size[0] and 0 <= a[1] < a[3] <= size[1], a
        for b in rects[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_labels_are_drawn_at_their_places(tmp_path):
    image = page((2480, 3508))
    written = save_outputs(tmp_path, image, GROUNDED)
    boxes = np.asarray(Image.open(tmp_path / "boxes.png"))
    regions = parse(GROUNDED, *image.size)
    for label, _, (x1, y1, x2, y2) in place_labels(regions, ImageFont.load_default(size=label_px(image.size)),
                                                   image.size):
        ink = boxes[y1:y2, x1:x2]
        assert (ink.min(axis=2) < 128).any(), label        # the label's letters are there, dark on white
    assert [p.name for p in written] == ["result.mmd", "result.md", "boxes.png", "0.jpg", "1.jpg"]


# ---------------------------------------------------------------- item 13: --json

def test_json_has_the_inputs_and_the_regions():
    result = GenerationResult(text=GROUNDED, token_ids=[1, 2], prompt_tokens=9, finish_reason="stop")
    out = json_report([OcrResult.of(result, 1000, 2000)], ["scan.png"])
    assert out["inputs"] == ["scan.png"] and out["image_size"] == [1000, 2000]
    assert out["regions"] == [
        {"label": "title", "box": [100, 100, 900, 240], "model_box": [100, 50, 900, 120]},
        {"label": "image", "box": [0, 400, 499, 1201], "model_box": [0, 200, 499, 600]},
        {"label": "image", "box": [500, 400, 1000, 1201], "model_box": [500, 200, 999, 600]},
        {"label": "text", "box": [100, 1401, 900, 1601], "model_box": [100.5, 700, 900, 800]}]
    paged = json_report([OcrResult.of(result, 500, 500, page=2), OcrResult.of(GenerationResult(), 1000, 2000, page=5)],
                        ["doc.pdf"])
    assert paged["inputs"] == ["doc.pdf"] and [p["page"] for p in paged["pages"]] == [2, 5]
    assert paged["pages"][0]["regions"][0]["box"] == [50, 25, 450, 60] and paged["pages"][1]["regions"] == []


def test_cli_json_shape_and_quiet(converted, three_page_pdf):
    lm, mm = converted("f32", "f32")
    r = run_cli("ocr", NOTE, "-m", lm, "--mmproj", mm, "-n", 2, "--mode", "tiny", "--json")
    assert r.returncode == 0, r.stderr
    assert "dsocr: vision 1/1 views" in r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"inputs", "text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason",
                        "timings", "image_size", "regions"}
    assert out["inputs"] == [str(NOTE)] and out["image_size"] == [500, 360] and isinstance(out["regions"], list)
    r = run_cli("ocr", three_page_pdf, "-m", lm, "--mmproj", mm, "-n", 1, "--mode", "tiny", "--pages", "3", "--json",
                "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = json.loads(r.stdout)
    assert out["inputs"] == [str(three_page_pdf)] and [p["page"] for p in out["pages"]] == [3]
    assert out["pages"][0]["image_size"] == [600, 400] and "regions" in out["pages"][0]
