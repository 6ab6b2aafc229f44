"""Which model `dsocr ocr` and `dsocr serve` run, and getting it onto disk.

--model (or DSOCR_MODEL) is a GGUF file or a folder holding the pair, the name of a config entry,
or a model in the models folder by the name `dsocr models` shows. Without it the active config
entry runs. An entry not on disk yet is fetched once: a checkpoint repo is pulled and converted
into the models folder, a GGUF repo (`org/name:QUANT`) is pulled and linked there. Before any
download this says what it fetches, how much and where, and checks the free disk space.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from dsocr.cli.output import human_bytes
from dsocr.convert import ConvertError, DEFAULT_REPO, LM_OUTTYPES, MMPROJ_OUTTYPES, convert_checkpoint, output_names
from dsocr.convert.gguf_out import part_path
from dsocr.convert.hub import (Download, cache_dir, fetch, parse_hub_ref, plan_download, quant_tag,
                               repo_cache_folder)
from dsocr.runtime.errors import ModelError

MODEL_FLAG_HINT = "pass --model: a GGUF, a folder holding the pair, or a name `dsocr models` lists"


def say(message: str) -> None:
    print(f"dsocr: {message}", file=sys.stderr, flush=True)


# ---- what will be downloaded, and room for it

def describe(d: Download, then: str = "") -> str:
    """One line: what the pull fetches (or finds in the cache), how much, where, and what follows."""
    what = " + ".join(posixpath.basename(f) for f in d.files) if d.gguf else f"{len(d.files)} files"
    where = repo_cache_folder(d.ref.repo_id)
    if d.offline_reason:
        line = f"{d.offline_reason}; using the cached copy of {d.ref} ({what}, {human_bytes(d.total_bytes)}) in {where}"
    elif not d.missing:
        line = f"using the cached copy of {d.ref} ({what}, {human_bytes(d.total_bytes)}) in {where}"
    else:
        line = f"downloading {d.ref} ({what}, {human_bytes(d.download_bytes)}) into {where}"
    return line + (f", then {then}" if then else "")


def _existing(folder: Path) -> Path:
    folder = folder.expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def same_disk(a: Path, b: Path) -> bool:
    return _existing(a).stat().st_dev == _existing(b).stat().st_dev


def check_free_space(needs: dict[Path, int]) -> None:
    """Refuse before anything is written when a disk lacks room for NEEDS (bytes to write into each
    folder; folders on one disk are summed)."""
    per_disk: dict[int, list] = {}
    for folder, n in needs.items():
        if n > 0:
            anchor = _existing(folder)
            entry = per_disk.setdefault(anchor.stat().st_dev, [anchor, [], 0])
            entry[1].append(str(folder))
            entry[2] += n
    for anchor, folders, n in per_disk.values():
        free = shutil.disk_usage(anchor).free
        if n > free:
            raise ConvertError(f"not enough disk space: {human_bytes(n)} to write into {' and '.join(folders)}, "
                               f"{human_bytes(free)} free there; free some space, or point HF_HUB_CACHE or the "
                               "config's [models] dir at a larger disk")


def cache_hint(d: Download) -> str:
    return (f"{d.ref.repo_id} stays in the Hugging Face cache ({human_bytes(d.total_bytes)} in "
            f"{repo_cache_folder(d.ref.repo_id)}); once you no longer need it, `hf cache rm model/{d.ref.repo_id}` "
            "(or deleting that folder) frees the space")


# ---- pulling

def fetch_checkpoint(d: Download, progress: bool, then: str = "", converted_dir: Path | None = None,
                     first_run: bool = False) -> Path:
    """Announce D, check the disk (the download, and as much again in CONVERTED_DIR when it is
    converted afterwards), fetch; returns the snapshot folder."""
    if d.gguf:
        raise ConvertError(f"{d.ref} holds GGUF files, not a checkpoint: `dsocr pull {d.ref}` fetches them ready-made")
    say(("first run: " if first_run else "") + describe(d, then))
    # The converted pair is at most the checkpoint's size: its BF16 weights become Q8_0 or F16.
    check_free_space({cache_dir(): d.download_bytes, **({converted_dir: d.weight_bytes} if converted_dir else {})})
    return fetch(d, progress)


def link_or_copy(src: Path, dst: Path) -> bool:
    """Put SRC at DST by way of DST.part: a hard link (no second copy on disk, and it outlives the
    cache copy), else a copy. Returns whether it linked."""
    src = src.resolve()
    if dst.exists() and os.path.samefile(src, dst):
        return True
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dst)
    part.unlink(missing_ok=True)
    try:
        try:
            os.link(src, part)
            linked = True
        except OSError:   # another disk, or a file system without hard links
            shutil.copyfile(src, part)
            linked = False
        os.replace(part, dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return linked


def pull_gguf(d: Download, models_dir: Path, progress: bool, lm: Path | None = None,
              mm: Path | None = None, first_run: bool = False) -> tuple[Path, Path]:
    """Fetch a GGUF pair into the hub cache and link it into MODELS_DIR (as LM and MM when given)."""
    src_lm, src_mm = d.files
    lm = lm or models_dir / posixpath.basename(src_lm)
    mm = mm or models_dir / posixpath.basename(src_mm)
    say(("first run: " if first_run else "") + describe(d, f"linking it into {models_dir}"))
    copies = 0 if same_disk(cache_dir(), models_dir) else d.total_bytes
    check_free_space({cache_dir(): d.download_bytes, models_dir: copies})
    folder = fetch(d, progress)
    linked = [link_or_copy(folder / src_lm, lm), link_or_copy(folder / src_mm, mm)]
    if not all(linked):
        say(cache_hint(d))
    return lm, mm


# ---- config entries and the models folder

def entry_paths(name: str, entry: dict, models_dir: Path, config: Path) -> tuple[Path, Path | None]:
    """An entry's language model and mmproj (relative to the models folder unless absolute)."""
    if not entry.get("model"):
        raise ModelError(f"models.entries.{name} in {config} has no `model = \"FILE.gguf\"`")

    def place(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else models_dir / path
    return place(entry["model"]), place(entry["mmproj"]) if entry.get("mmproj") else None


def conversion_of(name: str, lm: Path, mm: Path | None, config: Path) -> tuple[str, str, str]:
    """(stem, LM type, mmproj type) that `convert` turns into exactly the entry's file names."""
    stem, _, kind = lm.stem.rpartition("-")
    lm_type = kind.lower()
    if stem and lm_type in LM_OUTTYPES:
        mm_type = "f16" if mm is None else \
            next((t for t in MMPROJ_OUTTYPES if mm.name == output_names(stem, lm_type, t)[1]), None)
        if mm_type and (mm is None or mm.parent == lm.parent) and lm.name == output_names(stem, lm_type, mm_type)[0]:
            return stem, lm_type, mm_type
    example = output_names("DeepSeek-OCR", "q8_0", "f16")
    raise ModelError(f"models.entries.{name} in {config}: to be converted on first use its files must be named "
                     f"NAME-TYPE.gguf and mmproj-NAME-TYPE.gguf in one folder (e.g. {example[0]}, {example[1]})")


def fetch_entry(settings, name: str, entry: dict, lm: Path, mm: Path | None, progress: bool) -> tuple[Path, Path]:
    """Fetch entry NAME once: a GGUF repo is pulled and linked, a checkpoint pulled and converted."""
    src = entry.get("repo", DEFAULT_REPO)
    ref = parse_hub_ref(src)
    if ref is None:
        raise ModelError(f"models.entries.{name}.repo = {src!r} in {settings.path}: not a hub repo id "
                         "(org/name, or org/name:QUANT for a GGUF repo)")
    try:
        d = plan_download(ref, entry.get("revision"))
        if d.gguf:
            return pull_gguf(d, lm.parent, progress, lm, mm, first_run=True)
        stem, lm_type, mm_type = conversion_of(name, lm, mm, settings.path)
        then = (f"converting it to {lm_type.upper()} + {mm_type.upper()} (about {human_bytes(d.weight_bytes)}) "
                f"in {lm.parent}")
        folder = fetch_checkpoint(d, progress, then, lm.parent, first_run=True)
        files = convert_checkpoint(folder, lm.parent, lm_type, mm_type, name=stem, progress=progress)
    except ConvertError as e:
        raise ModelError(f"no model at {lm} yet: {e} (or {MODEL_FLAG_HINT})") from None
    say(cache_hint(d))
    return files[0].path, files[1].path


def entry_model(settings, name: str, entry: dict, progress: bool) -> tuple[Path, Path | None]:
    lm, mm = entry_paths(name, entry, settings.models_dir(), settings.path)
    if lm.is_file() and (mm is None or mm.is_file()):
        return lm, mm
    return fetch_entry(settings, name, entry, lm, mm, progress)


def entries_on_disk(settings) -> dict[str, tuple[Path, Path]]:
    """Config entry name -> its (language model, mmproj), for the entries whose pair is on disk: what
    `dsocr serve` serves besides the pair it starts with. Nothing is fetched."""
    from dsocr.runtime.engine import find_model_pair
    found = {}
    for name, entry in (settings["models"].get("entries") or {}).items():
        try:
            found[name] = find_model_pair(*entry_paths(name, entry, settings.models_dir(), settings.path))
        except ModelError:           # not there (yet): `--model NAME` or a first `dsocr ocr` fetches it
            continue
    return found


@dataclass
class Installed:
    """A language model in the models folder and the mmproj the engine pairs it with."""
    name: str
    lm: Path
    mmproj: Path | None

    @property
    def types(self) -> str:
        return " + ".join(quant_tag(p.name) or "?" for p in (self.lm, self.mmproj) if p)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in (self.lm, self.mmproj) if p)


def installed(models_dir: Path) -> list[Installed]:
    from dsocr.runtime.engine import find_model_pair
    found = []
    for lm in sorted(models_dir.glob("*.gguf")) if models_dir.is_dir() else []:
        if lm.name.startswith("mmproj"):
            continue
        try:
            mm = find_model_pair(lm)[1]
        except ModelError:
            mm = None
        found.append(Installed(lm.stem, lm, mm))
    return found


def model_by_name(settings, name: str, progress: bool) -> tuple[Path, Path | None]:
    """--model NAME: a path (one that exists, or that names a folder or .gguf), else a config entry
    (fetched on first use), else a model in the models folder."""
    path = Path(name).expanduser()
    if path.exists() or "/" in name or os.sep in name or name.endswith(".gguf"):
        return path, None       # the engine says what is wrong with a path
    entries = settings["models"].get("entries") or {}
    if name in entries:
        return entry_model(settings, name, entries[name], progress)
    for model in installed(settings.models_dir()):
        if model.name == name:
            return model.lm, model.mmproj
    raise ModelError(f"model {name!r}: no such file or folder, no models.entries.{name} in {settings.path}, and "
                     f"no {name}.gguf in {settings.models_dir()} (`dsocr models` lists them)")


def resolve_model(settings, progress: bool = True) -> tuple[Path, Path | None]:
    """--model / DSOCR_MODEL, else the configured active entry (fetched once if missing); --mmproj
    / DSOCR_MMPROJ replaces the mmproj either way."""
    m = settings["models"]
    mmproj = Path(m["mmproj"]).expanduser() if m.get("mmproj") else None
    if m.get("model"):
        lm, mm = model_by_name(settings, m["model"], progress)
        return lm, mmproj or mm
    entry = settings.active_entry()
    if not entry:
        raise ModelError(f"no --model given and no models.entries.{m.get('active')} in {settings.path}")
    lm, mm = entry_model(settings, m.get("active"), entry, progress)
    return lm, mmproj or mm


# ---- `dsocr models`

def entry_names_by_file(settings) -> dict[Path, list[str]]:
    """Language-model file -> the config entries naming it (the active one marked with *)."""
    out: dict[Path, list[str]] = {}
    m = settings["models"]
    for name, entry in (m.get("entries") or {}).items():
        if entry.get("model"):
            lm, _ = entry_paths(name, entry, settings.models_dir(), settings.path)
            out.setdefault(lm.absolute(), []).append(name + (" *" if name == m.get("active") else ""))
    return out


def model_rows(settings) -> list[list[str]]:
    """`dsocr models`: the pairs in the models folder, then the config entries not on disk yet."""
    rows = [["NAME", "ENTRY", "TYPES", "SIZE", "PATH"]]
    names = entry_names_by_file(settings)
    for model in installed(settings.models_dir()):
        rows.append([model.name, ", ".join(names.pop(model.lm.absolute(), [])) or "-", model.types,
                     human_bytes(model.size), str(model.lm)])
    entries = settings["models"].get("entries") or {}
    for lm, entry_names in names.items():
        entry = entries[entry_names[0].removesuffix(" *")]
        where = "" if lm.is_file() else f"not on disk: fetched from {entry.get('repo', DEFAULT_REPO)} on first use"
        rows.append(["-", ", ".join(entry_names), quant_tag(lm.name) or "?", "-",
                     str(lm) + (f" ({where})" if where else "")])
    return rows


def remove_model(settings, name: str) -> list[Path]:
    """`dsocr models rm NAME`: the pair (a model's name or an entry's) from the models folder; an
    mmproj another model there still pairs with stays. Returns the files removed."""
    models_dir = settings.models_dir()
    here = installed(models_dir)
    entries = settings["models"].get("entries") or {}
    target = next((m for m in here if m.name == name), None)
    if name in entries:
        lm, mm = entry_paths(name, entries[name], models_dir, settings.path)
        target = next((m for m in here if m.lm.absolute() == lm.absolute()), None)
        if target is None:
            raise ModelError(f"models.entries.{name} ({lm}) is not in {models_dir}; nothing to remove")
        target.mmproj = mm if mm and mm.is_file() else target.mmproj
    if target is None:
        known = ", ".join(m.name for m in here) or "none"
        raise ModelError(f"no model {name!r} in {models_dir} (models there: {known})")
    removed = [target.lm]
    if target.mmproj and target.mmproj.parent.absolute() == models_dir.absolute():
        others = [m.name for m in here if m is not target and m.mmproj and os.path.samefile(m.mmproj, target.mmproj)]
        if others:
            say(f"keeping {target.mmproj.name}: {', '.join(others)} pairs with it too")
        else:
            removed.append(target.mmproj)
    for p in removed:
        p.unlink()
    return removed
