"""Getting a model onto disk without the network: a hub cache laid out as huggingface_hub lays it
out (models--org--name/blobs, snapshots/<commit>, refs/main) holding the tiny checkpoint or a GGUF
pair, used when HF_HUB_OFFLINE is set and when the hub cannot be reached (HF_ENDPOINT points at a
closed loopback port, so nothing here ever leaves the machine). Also: local paths against repo
ids, llama.cpp's choice of a GGUF repo's files, the disk-space check before a download,
`dsocr models` and `--model NAME`."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from dsocr.convert import ConvertError, convert_checkpoint
from dsocr.convert.hub import HubRef, choose_gguf_pair, parse_hub_ref

from conftest import TINY, one_line_error

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_REPO = "test-org/tiny-dsocr"
GGUF_REPO = "ggml-org/DeepSeek-OCR-GGUF"
IMAGE = TINY / "images" / "small_note.png"
DiskUsage = namedtuple("DiskUsage", "total used free")
OCR_FLAGS = ["--json", "--mode", "tiny", "--max-new-tokens", "4"]
# ggml-org/DeepSeek-OCR-GGUF as public READMEs and configs name its files
GGML_ORG_FILES = [".gitattributes", "README.md", "DeepSeek-OCR-Q8_0.gguf", "mmproj-DeepSeek-OCR-Q8_0.gguf"]


def fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """huggingface_hub's cache layout: content-addressed blobs, the snapshot as relative symlinks to
    them, refs/main naming the commit. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def tiny_checkpoint_files() -> dict[str, Path]:
    return {p.name: p for p in TINY.iterdir() if p.is_file()}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Home:
    """A tmp HF_HOME, hub cache, models folder and config.toml, and `dsocr` run against them."""

    def __init__(self, root: Path):
        self.root, self.cache, self.models = root, root / "hf" / "hub", root / "models"
        self.config = root / "config.toml"
        self.endpoint = f"http://127.0.0.1:{closed_port()}"
        self.write_config({})

    def write_config(self, entries: dict, active: str = "tiny") -> None:
        lines = ["[models]", f'dir = "{self.models}"', f'active = "{active}"']
        for name, entry in entries.items():
            lines += [f"[models.entries.{name}]"] + [f'{k} = "{v}"' for k, v in entry.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def run(self, *args, offline: bool = False) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DSOCR_", "TRANSFORMERS_"))}
        env.update(HF_HOME=str(self.root / "hf"), HF_HUB_CACHE=str(self.cache), HF_ENDPOINT=self.endpoint,
                   DSOCR_CONFIG=str(self.config), HF_HUB_DISABLE_TELEMETRY="1")
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        return subprocess.run([sys.executable, "-m", "dsocr.cli.main", *map(str, args)], capture_output=True,
                              text=True, env=env, cwd=self.root, timeout=600)


@pytest.fixture
def home(tmp_path):
    return Home(tmp_path)


TINY_ENTRY = {"model": "tiny-Q8_0.gguf", "mmproj": "mmproj-tiny-F16.gguf", "repo": TINY_REPO}


def stderr_lines(r, needle: str) -> list[str]:
    return [line for line in r.stderr.splitlines() if needle in line]


# ---- item 1: the cache, offline or with the hub out of reach

def test_offline_first_run_converts_from_the_cache(home, tmp_path):
    """HF_HUB_OFFLINE=1, an empty models folder and the checkpoint in the hub cache: the first
    `dsocr ocr` converts the cached checkpoint (it used to refuse) into exactly what `dsocr convert`
    makes, says so and how to free the cache copy; the second run just runs."""
    snapshot = fake_hub_cache(home.cache, TINY_REPO, tiny_checkpoint_files())
    home.write_config({"tiny": TINY_ENTRY})
    r = home.run("ocr", IMAGE, *OCR_FLAGS, offline=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] == 4
    [announce] = stderr_lines(r, "using the cached copy")
    assert announce.startswith("dsocr: first run: HF_HUB_OFFLINE is set; using the cached copy of " + TINY_REPO)
    assert f"in {home.cache / 'models--test-org--tiny-dsocr'}" in announce
    assert f"converting it to Q8_0 + F16" in announce and str(home.models) in announce
    assert stderr_lines(r, f"`hf cache rm model/{TINY_REPO}`")
    direct = convert_checkpoint(snapshot, tmp_path / "direct", "q8_0", "f16", name="tiny", progress=False)
    for f in direct:
        assert (home.models / f.path.name).read_bytes() == f.path.read_bytes(), f.path.name
    again = home.run("ocr", IMAGE, *OCR_FLAGS, offline=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["token_ids"] == json.loads(r.stdout)["token_ids"]
    assert not stderr_lines(again, "cached copy") and not stderr_lines(again, "first run")


def test_unreachable_hub_falls_back_to_the_cache_with_a_notice(home):
    """No HF_HUB_OFFLINE, the hub refusing connections: pull and convert use the cache after one
    notice line (they used to fail on the hub's metadata call before looking at the cache)."""
    snapshot = fake_hub_cache(home.cache, TINY_REPO, tiny_checkpoint_files())
    r = home.run("pull", TINY_REPO, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(snapshot)
    [notice] = stderr_lines(r, "cannot reach the Hugging Face Hub")
    assert "ConnectError" in notice and f"using the cached copy of {TINY_REPO}" in notice
    r = home.run("convert", TINY_REPO, "-o", home.root / "out", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert len(stderr_lines(r, "cannot reach the Hugging Face Hub")) == 1
    assert sorted(p.name for p in (home.root / "out").iterdir()) == ["mmproj-tiny-dsocr-F16.gguf",
                                                                     "tiny-dsocr-Q8_0.gguf"]


def test_out_of_reach_and_not_cached_is_one_clear_line(home):
    one_line_error(home.run("pull", "nobody/nothing"), "cannot reach the Hugging Face Hub",
                   "not in the local Hugging Face cache", str(home.cache))
    one_line_error(home.run("pull", "nobody/nothing", offline=True), "HF_HUB_OFFLINE is set",
                   "not in the local Hugging Face cache")
    home.write_config({"tiny": TINY_ENTRY})
    one_line_error(home.run("ocr", IMAGE, *OCR_FLAGS, offline=True), "no model at", "HF_HUB_OFFLINE is set",
                   "--model")
    assert not home.models.exists() or not list(home.models.iterdir())


# ---- item 3: a local path is not a repo id

@pytest.mark.parametrize("src,ref", [
    ("deepseek-ai/DeepSeek-OCR", HubRef("deepseek-ai/DeepSeek-OCR")),
    ("ggml-org/DeepSeek-OCR-GGUF:Q8_0", HubRef(GGUF_REPO, "Q8_0")),
    ("ggml-org/DeepSeek-OCR-GGUF:q4_k_m", HubRef(GGUF_REPO, "Q4_K_M")),
    ("fixtures/tiny", HubRef("fixtures/tiny")),      # also a relative path, but none exists here
    ("./fixtures/tiny", None), ("../fixtures/tiny", None), ("/data/ckpt", None), ("~/ckpt/x", None),
    ("tests/fixtures/tiny", None), ("tiny", None), ("fixtures\\tiny", None),
    ("org/bad--name", None), ("org/bad..name", None), ("org/name:Q8 0", None), ("C:/models", None),
])
def test_path_or_repo_id(src, ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_hub_ref(src) == ref


def test_an_existing_relative_folder_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixtures" / "tiny").mkdir(parents=True)
    assert parse_hub_ref("fixtures/tiny") is None


def test_missing_folders_say_so(home):
    """`dsocr convert fixtures/tiny` without that folder used to report only the unreachable hub."""
    one_line_error(home.run("convert", "fixtures/tiny", "-o", home.root / "out"),
                   "fixtures/tiny: no such folder, and as a hub repo: cannot reach the Hugging Face Hub")
    for src in ("./fixtures/tiny", "tests/fixtures/tiny", "tiny"):
        line = one_line_error(home.run("convert", src, "-o", home.root / "out"), "no such checkpoint folder")
        assert "Hub" not in line
    one_line_error(home.run("pull", "./fixtures/tiny"), "not a hub repo id", "dsocr convert")


# ---- item 2: ready-made GGUFs

def test_gguf_files_of_ggml_org_repo():
    assert choose_gguf_pair(GGML_ORG_FILES, "Q8_0") == ("DeepSeek-OCR-Q8_0.gguf", "mmproj-DeepSeek-OCR-Q8_0.gguf")
    assert choose_gguf_pair(GGML_ORG_FILES, None) == ("DeepSeek-OCR-Q8_0.gguf", "mmproj-DeepSeek-OCR-Q8_0.gguf")
    with pytest.raises(ConvertError, match=r"no Q4_K_M GGUF in this repo \(quant types here: Q8_0\)"):
        choose_gguf_pair(GGML_ORG_FILES, "Q4_K_M")
    with pytest.raises(ConvertError, match="no mmproj GGUF"):
        choose_gguf_pair(["DeepSeek-OCR-Q8_0.gguf"], "Q8_0")


# a repo laid out as llama.cpp's quantizers publish them: one LM per quant, shared projectors
QUANT_REPO = ["README.md", "Model-BF16.gguf", "Model-Q8_0.gguf", "Model-Q6_K.gguf", "Model-Q4_K_M.gguf",
              "Model-Q4_K_S.gguf", "mmproj-BF16.gguf", "mmproj-Q8_0.gguf", "mmproj-F16.gguf", "imatrix.gguf"]


@pytest.mark.parametrize("names,quant,pair", [
    (QUANT_REPO, "Q4_K_M", ("Model-Q4_K_M.gguf", "mmproj-F16.gguf")),           # F16 projector preferred
    (QUANT_REPO, None, ("Model-Q8_0.gguf", "mmproj-F16.gguf")),                 # Q8_0 before Q4_K_M
    (QUANT_REPO, "f16", None),                                                  # F16 is not BF16
    ([n for n in QUANT_REPO if n != "mmproj-F16.gguf"], "Q4_K_M", ("Model-Q4_K_M.gguf", "mmproj-Q8_0.gguf")),
    ([n for n in QUANT_REPO if n != "mmproj-F16.gguf"], "BF16", ("Model-BF16.gguf", "mmproj-BF16.gguf")),
    (["Model-Q5_K_M.gguf", "mmproj-model-f16.gguf"], None, ("Model-Q5_K_M.gguf", "mmproj-model-f16.gguf")),
    # llama.cpp takes the mmproj from the model's folder or above it, the deepest first
    (["Q4/Model-Q4_K_M.gguf", "Q8/Model-Q8_0.gguf", "Q8/mmproj-Q8_0.gguf", "mmproj-F16.gguf"], "Q4_K_M",
     ("Q4/Model-Q4_K_M.gguf", "mmproj-F16.gguf")),
    (["Q4/Model-Q4_K_M.gguf", "Q8/Model-Q8_0.gguf", "Q8/mmproj-Q8_0.gguf", "mmproj-F16.gguf"], "Q8_0",
     ("Q8/Model-Q8_0.gguf", "Q8/mmproj-Q8_0.gguf")),
])
def test_gguf_files_as_llamacpp_picks_them(names, quant, pair):
    if pair is None:
        with pytest.raises(ConvertError, match="quant types here: BF16, Q4_K_M, Q4_K_S, Q6_K, Q8_0"):
            choose_gguf_pair(names, quant)
    else:
        assert choose_gguf_pair(names, quant) == pair


def test_cached_gguf_repo_pulled_offline_runs_by_name(home, converted):
    """`dsocr pull ORG/NAME:QUANT` from the cache with HF_HUB_OFFLINE=1: the pair is hard-linked into
    the models folder (no second copy), listed by `dsocr models`, and runs as `--model NAME`."""
    lm, mm = converted("q8_0", "q8_0")
    fake_hub_cache(home.cache, GGUF_REPO, {"DeepSeek-OCR-Q8_0.gguf": lm, "mmproj-DeepSeek-OCR-Q8_0.gguf": mm,
                                           "README.md": TINY / "README.md"})
    r = home.run("pull", f"{GGUF_REPO}:Q8_0", offline=True)
    assert r.returncode == 0, r.stderr
    placed = [home.models / "DeepSeek-OCR-Q8_0.gguf", home.models / "mmproj-DeepSeek-OCR-Q8_0.gguf"]
    assert r.stdout.split() == [str(p) for p in placed]
    snapshot = home.cache / "models--ggml-org--DeepSeek-OCR-GGUF" / "snapshots" / COMMIT
    for p in placed:
        assert os.path.samefile(p, snapshot / p.name)
    assert stderr_lines(r, "run it: dsocr ocr --model DeepSeek-OCR-Q8_0")
    listing = home.run("models")
    assert listing.returncode == 0, listing.stderr
    row = next(line.split() for line in listing.stdout.splitlines() if line.startswith("DeepSeek-OCR-Q8_0"))
    assert row[2:5] == ["Q8_0", "+", "Q8_0"] and row[-1] == str(placed[0])
    by_name = home.run("ocr", IMAGE, *OCR_FLAGS, "--model", "DeepSeek-OCR-Q8_0")
    by_path = home.run("ocr", IMAGE, *OCR_FLAGS, "--model", lm, "--mmproj", mm)
    assert by_name.returncode == 0 and by_path.returncode == 0, by_name.stderr + by_path.stderr
    assert json.loads(by_name.stdout)["token_ids"] == json.loads(by_path.stdout)["token_ids"]


def test_gguf_entry_is_fetched_on_first_run(home, converted):
    """An entry whose repo is ORG/NAME:QUANT is pulled and linked, not converted."""
    lm, mm = converted("q8_0", "q8_0")
    fake_hub_cache(home.cache, GGUF_REPO, {"DeepSeek-OCR-Q8_0.gguf": lm, "mmproj-DeepSeek-OCR-Q8_0.gguf": mm})
    home.write_config({"gguf": {"model": "DeepSeek-OCR-Q8_0.gguf", "repo": f"{GGUF_REPO}:Q8_0"}}, active="gguf")
    r = home.run("ocr", IMAGE, *OCR_FLAGS)
    assert r.returncode == 0, r.stderr
    [line] = stderr_lines(r, "first run:")
    assert "DeepSeek-OCR-Q8_0.gguf + mmproj-DeepSeek-OCR-Q8_0.gguf" in line and "linking it into" in line
    assert sorted(p.name for p in home.models.iterdir()) == ["DeepSeek-OCR-Q8_0.gguf",
                                                             "mmproj-DeepSeek-OCR-Q8_0.gguf"]


# ---- item 4: room on disk before a download

def test_free_space_is_summed_per_disk(tmp_path, monkeypatch):
    from dsocr.cli import models
    seen = []

    def usage(path):
        seen.append(Path(path))
        return DiskUsage(100 << 30, 90 << 30, 10 << 30)    # 10 GB free
    monkeypatch.setattr(shutil, "disk_usage", usage)
    models.check_free_space({tmp_path / "cache": 6 << 30, tmp_path / "models": 3 << 30})
    assert seen == [tmp_path]          # one disk, asked once, about the folder that exists
    with pytest.raises(ConvertError, match=r"not enough disk space: 12\.0 GB to write into .*cache and .*models, "
                                           r"10\.0 GB free there"):
        models.check_free_space({tmp_path / "cache": 6 << 30, tmp_path / "models": 6 << 30})


def test_first_run_stops_before_writing_when_the_disk_is_full(home, monkeypatch):
    """The conversion's size (here from the cache, offline) is checked before anything is written."""
    from huggingface_hub import constants
    from dsocr.cli.config import load_settings
    from dsocr.cli.models import resolve_model
    from dsocr.runtime.errors import ModelError
    fake_hub_cache(home.cache, TINY_REPO, tiny_checkpoint_files())
    home.write_config({"tiny": TINY_ENTRY})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(1 << 30, 1 << 30, 1000))
    with pytest.raises(ModelError, match=rf"no model at .*tiny-Q8_0.gguf yet: not enough disk space: .* to write "
                                         rf"into {home.models}, 1000 B free there"):
        resolve_model(load_settings(str(home.config), environ={}), progress=False)
    assert not home.models.exists()


def hub_record(name: str, path: Path):
    """What model_info(files_metadata=True) says of a file: size, git blob id, LFS sha256 for weights."""
    from types import SimpleNamespace as NS
    from huggingface_hub.utils.sha import git_hash
    data = path.read_bytes()
    lfs = NS(sha256=hashlib.sha256(data).hexdigest(), size=len(data)) if name.endswith(".safetensors") else None
    return NS(rfilename=name, size=len(data), blob_id=git_hash(data), lfs=lfs)


@pytest.fixture
def online_hub(home, monkeypatch, capsys):
    """The hub as huggingface_hub sees it, in process: model_info lists the tiny checkpoint (plus
    files a conversion does not need); snapshot_download records what it was asked for and lays the
    files into the cache as a download would."""
    import huggingface_hub
    from huggingface_hub import constants
    files = tiny_checkpoint_files()
    records = [hub_record(n, p) for n, p in files.items()] + \
        [hub_record("modeling_deepseekocr.py", TINY / "README.md")]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home.cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, revision=None, files_metadata=False: type("Info", (), {
                            "sha": COMMIT, "siblings": records})())
    calls = []

    def download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        calls.append((repo_id, revision, sorted(allow_patterns), local_files_only))
        snapshot = home.cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / COMMIT
        return str(fake_hub_cache(home.cache, repo_id, {n: files[n] for n in allow_patterns
                                                        if not (snapshot / n).exists()}))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    home.write_config({"tiny": TINY_ENTRY})
    return calls


def test_online_first_run_says_what_it_downloads_and_checks_it(home, online_hub, capsys, monkeypatch):
    from dsocr.cli.config import load_settings
    from dsocr.cli.models import resolve_model
    from dsocr.cli.output import human_bytes
    from dsocr.runtime.errors import ModelError
    settings = load_settings(str(home.config), environ={})
    from huggingface_hub.utils import filter_repo_objects
    from dsocr.convert.hub import PATTERNS
    files = tiny_checkpoint_files()
    needed = sum(files[n].stat().st_size for n in filter_repo_objects(files, allow_patterns=PATTERNS))
    weights = sum(p.stat().st_size for p in TINY.glob("*.safetensors"))
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(1 << 40, 0, needed + weights - 1))
    with pytest.raises(ModelError, match=f"not enough disk space: {human_bytes(needed + weights)} to write into "
                                         f"{home.cache} and {home.models}"):
        resolve_model(settings, progress=False)
    assert online_hub == []                             # refused before downloading anything
    [announce] = capsys.readouterr().err.splitlines()
    assert announce == (f"dsocr: first run: downloading {TINY_REPO} (7 files, {human_bytes(needed)}) into "
                        f"{home.cache / 'models--test-org--tiny-dsocr'}, then converting it to Q8_0 + F16 (about "
                        f"{human_bytes(weights)}) in {home.models}")
    monkeypatch.setattr(shutil, "disk_usage", real_usage)      # the real disk has room
    lm, mm = resolve_model(load_settings(str(home.config), environ={}), progress=False)
    assert (lm.name, mm.name) == ("tiny-Q8_0.gguf", "mmproj-tiny-F16.gguf") and lm.is_file() and mm.is_file()


def test_online_download_is_checked_against_the_hub(home, online_hub):
    """A file that differs from the hub's record is refused with the file named."""
    from dsocr.convert.hub import fetch, plan_download
    d = plan_download(HubRef(TINY_REPO))
    assert d.missing == d.files and "modeling_deepseekocr.py" not in d.files
    folder = fetch(d, progress=False)
    assert online_hub == [(TINY_REPO, "main", sorted(d.files), False)]   # by name: refs/main gets written
    (folder / "config.json").unlink()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match="config.json: checksum mismatch"):
        fetch(plan_download(HubRef(TINY_REPO)), progress=False)


# ---- item 5: `dsocr models` and --model NAME

def test_models_lists_and_removes(home, converted):
    q8, f16mm = converted("q8_0", "f16")
    f16, _ = converted("f16", "f16")
    home.models.mkdir()
    for src, name in [(q8, "tiny-Q8_0.gguf"), (f16, "tiny-F16.gguf"), (f16mm, "mmproj-tiny-F16.gguf")]:
        shutil.copyfile(src, home.models / name)
    home.write_config({"tiny": TINY_ENTRY, "later": {"model": "later-Q4_K_M.gguf", "repo": "org/later"}})
    r = home.run("models")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[0] == ["NAME", "ENTRY", "TYPES", "SIZE", "PATH"]
    size = lambda *names: sum((home.models / n).stat().st_size for n in names)
    from dsocr.cli.output import human_bytes
    assert rows[1] == ["tiny-F16", "-", "F16", "+", "F16", *human_bytes(size("tiny-F16.gguf", "mmproj-tiny-F16.gguf"))
                       .split(), str(home.models / "tiny-F16.gguf")]
    assert rows[2] == ["tiny-Q8_0", "tiny", "*", "Q8_0", "+", "F16",
                       *human_bytes(size("tiny-Q8_0.gguf", "mmproj-tiny-F16.gguf")).split(),
                       str(home.models / "tiny-Q8_0.gguf")]
    assert any(row[:3] == ["-", "later", "Q4_K_M"] and "org/later" in " ".join(row) for row in rows)
    r = home.run("models", "rm", "tiny")            # an entry's name: its LM; the mmproj is shared
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"removed {home.models / 'tiny-Q8_0.gguf'}"
    assert stderr_lines(r, "keeping mmproj-tiny-F16.gguf: tiny-F16 pairs with it too")
    r = home.run("models", "rm", "tiny-F16")
    assert r.returncode == 0, r.stderr
    assert list(home.models.iterdir()) == []
    one_line_error(home.run("models", "rm", "tiny-F16"), "no model 'tiny-F16'", "models there: none")
    one_line_error(home.run("models", "rm", "later"), "models.entries.later", "nothing to remove")


def test_models_rm_keeps_the_config_given_before_it(home):
    other = home.root / "other.toml"
    other.write_text(f'[models]\ndir = "{home.root / "elsewhere"}"\n')
    for argv in (["models", "--config", other, "rm", "x"], ["models", "rm", "x", "--config", other]):
        one_line_error(home.run(*argv), f"no model 'x' in {home.root / 'elsewhere'}")


def test_model_flag_takes_config_entry_names(home, converted, tmp_path):
    lm, mm = converted("q8_0", "f16")
    home.write_config({"elsewhere": {"model": str(lm), "mmproj": str(mm), "repo": TINY_REPO}})
    by_entry = home.run("ocr", IMAGE, *OCR_FLAGS, "-m", "elsewhere")
    by_path = home.run("ocr", IMAGE, *OCR_FLAGS, "--model", lm, "--mmproj", mm)
    assert by_entry.returncode == 0 and by_path.returncode == 0, by_entry.stderr + by_path.stderr
    assert json.loads(by_entry.stdout)["token_ids"] == json.loads(by_path.stdout)["token_ids"]
    one_line_error(home.run("ocr", IMAGE, *OCR_FLAGS, "--model", "nosuch"), "model 'nosuch'",
                   "no models.entries.nosuch", "`dsocr models` lists them")
