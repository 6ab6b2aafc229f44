"""The built-in config entry `deepseek-ocr-2` beside `deepseek-ocr`: `dsocr pull deepseek-ai/DeepSeek-OCR-2`,
`dsocr convert` of what it pulled, `dsocr models` and `--model deepseek-ocr-2` work for it as for
DeepSeek-OCR. The hub is a local cache holding the tiny DeepSeek-OCR 2 checkpoint under the real repo's
id, with the real config's `_name_or_path` (which names the converted files); nothing leaves the machine
(test_models_cli's Home)."""
import json
import shutil

import pytest

from dsocr.cli.config import load_settings
from dsocr.cli.models import conversion_of, installed
from dsocr.convert.hub import DEFAULT_REPO

from conftest import FIXTURES
from test_models_cli import Home, fake_hub_cache

TINY2 = FIXTURES / "tiny-dsocr2"
REPO2 = "deepseek-ai/DeepSeek-OCR-2"
IMAGE2 = TINY2 / "images" / "wide_banner.png"
FILES = {"deepseek-ocr": ("DeepSeek-OCR-Q8_0.gguf", "mmproj-DeepSeek-OCR-F16.gguf"),
         "deepseek-ocr-2": ("DeepSeek-OCR-2-Q8_0.gguf", "mmproj-DeepSeek-OCR-2-F16.gguf")}


def test_the_builtin_entries(tmp_path):
    entries = load_settings(environ={"DSOCR_CONFIG": str(tmp_path / "none.toml")})["models"]["entries"]
    assert {name: (e["model"], e["mmproj"]) for name, e in entries.items()} == FILES
    assert (entries["deepseek-ocr"]["repo"], entries["deepseek-ocr-2"]["repo"]) == (DEFAULT_REPO, REPO2)
    # what a first run converts the checkpoint into: exactly the entry's names
    lm, mm = (tmp_path / f for f in FILES["deepseek-ocr-2"])
    assert conversion_of("deepseek-ocr-2", lm, mm, tmp_path / "none.toml") == ("DeepSeek-OCR-2", "q8_0", "f16")


@pytest.fixture
def home2(tmp_path):
    """A Home whose hub cache holds the tiny DeepSeek-OCR 2 checkpoint as deepseek-ai/DeepSeek-OCR-2, its
    config.json naming itself as the real one does; skipped while that checkpoint does not convert."""
    from dsocr.convert import ConvertError, convert_checkpoint
    try:
        convert_checkpoint(TINY2, tmp_path / "probe", "q8_0", "f16", progress=False)
    except ConvertError as e:
        pytest.skip(f"tiny-dsocr2 does not convert yet: {e}")
    shutil.rmtree(tmp_path / "probe")
    real = json.loads((FIXTURES / "real-config-ocr2" / "config.json").read_text())
    config = json.loads((TINY2 / "config.json").read_text())
    config["_name_or_path"] = real["_name_or_path"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    files = {p.name: p for p in TINY2.iterdir() if p.is_file()}
    files["config.json"] = tmp_path / "config.json"
    (tmp_path / "home").mkdir()
    home = Home(tmp_path / "home")
    home.snapshot = fake_hub_cache(home.cache, REPO2, files)
    home.write_config({}, active="deepseek-ocr-2")
    return home


def test_pull_convert_list_and_run_deepseek_ocr_2(home2):
    r = home2.run("pull", REPO2, "--no-progress", offline=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(home2.snapshot)
    r = home2.run("convert", r.stdout.strip(), "-o", home2.models, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in home2.models.iterdir()) == sorted(FILES["deepseek-ocr-2"])
    r = home2.run("models")
    assert r.returncode == 0, r.stderr
    [row] = [line.split() for line in r.stdout.splitlines()[1:] if "deepseek-ocr-2" in line]
    assert row[:6] == ["DeepSeek-OCR-2-Q8_0", "deepseek-ocr-2", "*", "Q8_0", "+", "F16"], row
    ocr = home2.run("ocr", IMAGE2, "--model", "deepseek-ocr-2", "--mode", "global", "--max-new-tokens", "4",
                    "--json", offline=True)
    assert ocr.returncode == 0, ocr.stderr
    assert json.loads(ocr.stdout)["completion_tokens"] == 4


def test_a_first_run_of_deepseek_ocr_2_converts_it_into_the_entrys_files(home2):
    r = home2.run("ocr", IMAGE2, "--model", "deepseek-ocr-2", "--mode", "global", "--max-new-tokens", "4",
                  "--json", offline=True)
    assert r.returncode == 0, r.stderr
    assert "converting it to Q8_0 + F16" in r.stderr
    assert sorted(p.name for p in home2.models.iterdir()) == sorted(FILES["deepseek-ocr-2"])


def test_both_builtin_pairs_in_one_models_folder_keep_their_own_mmproj(tmp_path):
    for pair in FILES.values():
        for name in pair:
            (tmp_path / name).touch()
    assert {m.lm.name: m.mmproj.name for m in installed(tmp_path)} == dict(FILES.values())
