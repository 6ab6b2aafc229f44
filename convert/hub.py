"""The Hugging Face Hub side: a DeepSeek-OCR checkpoint (converted afterwards) or a ready-made GGUF
pair (picked as llama.cpp's `-hf repo:quant` picks it).

huggingface_hub honours HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE. The hub
cache answers instead of the hub when HF_HUB_OFFLINE is set (huggingface_hub's own is_offline_mode)
and whenever the hub cannot be reached. What is downloaded is checked against the hub's record
with huggingface_hub's own hashes: sha256 for LFS files (the weights), the git blob sha1 for small
ones. A pull is planned first (which files, how many bytes, whether the cache has them) so the
command line can say what it will download and check the disk before it does."""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from dsocr.convert.checkpoint import ConvertError

DEFAULT_REPO = "deepseek-ai/DeepSeek-OCR"
# what conversion reads; the repo's Python code and images are not needed
PATTERNS = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "processor_config.json", "generation_config.json", "model.safetensors.index.json", "*.safetensors"]
# llama.cpp's -hf tries Q4_K_M, then Q8_0 when no :quant is given; dsocr's own default is Q8_0
# (DeepSeek-OCR's 4-bit builds degrade), so Q8_0 comes first here.
DEFAULT_QUANTS = ("Q8_0", "Q4_K_M")
# GGUF names that are not a language model (llama.cpp's gguf_filename_is_model, the kinds dsocr meets)
_NOT_A_MODEL = ("mmproj", "imatrix")
# exceptions of the HTTP clients huggingface_hub has used (requests, httpx, httpx2) mean "no answer"
_HTTP_CLIENTS = ("requests", "urllib3", "httpx", "httpx2", "httpcore")


@dataclass(frozen=True)
class HubRef:
    """`org/name`, or `org/name:QUANT` for a GGUF repo (llama.cpp's `-hf repo:quant`)."""
    repo_id: str
    quant: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f":{self.quant}" if self.quant else "")


def parse_hub_ref(src: str) -> HubRef | None:
    """SRC as a hub reference, or None when it names a local path: anything that exists, or that a
    repo id cannot be (a leading ./ ../ / or ~, a backslash, no / or more than one). `a/b` is both a
    relative path and a repo id; when no such folder exists it is a repo id if the hub's rules allow."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if src.startswith(("./", "../", "/", "~")) or "\\" in src or src.count("/") != 1 or Path(src).exists():
        return None
    repo_id, _, quant = src.partition(":")
    if quant and not re.fullmatch(r"[A-Za-z0-9_]+", quant):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubRef(repo_id, quant.upper() or None)


def looks_like_repo_id(src: str) -> bool:
    return parse_hub_ref(src) is not None


def cache_dir() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def repo_cache_folder(repo_id: str) -> Path:
    """Where huggingface_hub keeps REPO_ID (models--org--name)."""
    from huggingface_hub.file_download import repo_folder_name
    return cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


# ---- choosing the files of a GGUF repo, as llama.cpp's common/download.cpp does

def quant_tag(name: str) -> str:
    """DeepSeek-OCR-Q8_0.gguf -> Q8_0 (llama.cpp's get_gguf_split_info tag)."""
    m = re.search(r"[-.]([A-Za-z0-9_]+)$", posixpath.basename(name).removesuffix(".gguf"))
    return m.group(1).upper() if m else ""


def quant_bits(name: str) -> int:
    """Q4_K_M -> 4, F16 -> 16 (llama.cpp's extract_quant_bits); 0 when the name has none."""
    m = re.search(r"\d+", quant_tag(name))
    return int(m.group()) if m else 0


def _has_quant(name: str, quant: str) -> bool:
    # llama.cpp matches `QUANT[.-]` anywhere; the leading separator keeps F16 from matching BF16
    return re.search(rf"(?:^|[-._/]){re.escape(quant)}[-.]", name, re.IGNORECASE) is not None


def _folder(name: str) -> str:
    """a/b/x.gguf -> "a/b/", x.gguf -> "" (so a folder's prefix test covers the repo root)."""
    d = posixpath.dirname(name)
    return d + "/" if d else ""


def choose_gguf_pair(names: list[str], quant: str | None) -> tuple[str, str]:
    """(language model, mmproj) among a repo's files. The model: the first with QUANT in its name
    (without one: Q8_0, then Q4_K_M, then the first model file). The mmproj: one in the model's
    folder or above it, the deepest; then F16 (dsocr keeps the vision tower at 16 bits); then, as
    llama.cpp, the one whose bit count is closest to the model's."""
    ggufs = [n for n in names if n.endswith(".gguf")]
    models = [n for n in ggufs if not any(k in posixpath.basename(n).lower() for k in _NOT_A_MODEL)]
    wanted = [quant] if quant else list(DEFAULT_QUANTS)
    lm = next((n for q in wanted for n in models if _has_quant(n, q)), None)
    if lm is None and not quant and models:
        lm = models[0]
    if lm is None:
        have = ", ".join(sorted({quant_tag(n) for n in models})) or "none"
        raise ConvertError(f"no {quant or 'language-model'} GGUF in this repo (quant types here: {have})")
    beside = [n for n in ggufs if "mmproj" in posixpath.basename(n).lower() and _folder(lm).startswith(_folder(n))]
    if not beside:
        raise ConvertError(f"no mmproj GGUF (the vision tower) beside {lm} in this repo")
    mmproj = max(beside, key=lambda n: (n.count("/"), quant_tag(n) == "F16", -abs(quant_bits(n) - quant_bits(lm))))
    return lm, mmproj


# ---- planning and fetching

@dataclass
class Download:
    """One pull: FILES of the repo at COMMIT (what REVISION named) with their SIZES, those the cache
    lacks (MISSING), and the hub's records to check them against (empty when the cache answers
    instead of the hub: OFFLINE_REASON says why)."""
    ref: HubRef
    revision: str
    commit: str
    files: list[str]
    sizes: dict[str, int]
    missing: list[str]
    records: dict
    gguf: bool
    offline_reason: str | None = None

    @property
    def download_bytes(self) -> int:
        return sum(self.sizes[f] for f in self.missing)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes[f] for f in self.files)

    @property
    def weight_bytes(self) -> int:
        return sum(self.sizes[f] for f in self.files if f.endswith((".safetensors", ".gguf")))


def _is_gguf_repo(ref: HubRef, names: list[str]) -> bool:
    return ref.quant is not None or ("config.json" not in names and any(n.endswith(".gguf") for n in names))


def _select(ref: HubRef, names: list[str]) -> tuple[list[str], bool]:
    from huggingface_hub.utils import filter_repo_objects
    if _is_gguf_repo(ref, names):
        try:
            return list(choose_gguf_pair(names, ref.quant)), True
        except ConvertError as e:
            raise ConvertError(f"{ref}: {e}") from None
    files = list(filter_repo_objects(names, allow_patterns=PATTERNS))
    if not any(f.endswith(".safetensors") for f in files):
        raise ConvertError(f"{ref.repo_id} holds neither a DeepSeek-OCR checkpoint (config.json, *.safetensors) "
                           "nor GGUF files")
    return files, False


def _unreachable(e: BaseException) -> bool:
    """The hub gave no answer (no network, DNS, refused, timeout, offline mode) or is down (5xx):
    the cache may answer instead, as snapshot_download itself decides."""
    from huggingface_hub.errors import HfHubHTTPError
    if isinstance(e, HfHubHTTPError):
        return e.response is not None and e.response.status_code >= 500
    return isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in _HTTP_CLIENTS


def _hub_error(ref: HubRef, revision: str | None, e: BaseException) -> BaseException:
    """The hub's refusal as one line (other errors are left as they are)."""
    from huggingface_hub import errors as hf_errors
    if isinstance(e, hf_errors.GatedRepoError):
        return ConvertError(f"{ref.repo_id} is gated: accept its terms on the hub and set HF_TOKEN")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return ConvertError(f"{ref.repo_id}: no such model on the Hugging Face Hub (or it is private: set HF_TOKEN)")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return ConvertError(f"{ref.repo_id}: no revision {revision!r} on the hub")
    if isinstance(e, hf_errors.HfHubHTTPError):
        return ConvertError(f"the Hugging Face Hub answered with an error for {ref.repo_id}: {str(e).splitlines()[0]}")
    return e


def _cached_files(ref: HubRef, revision: str | None, reason: str) -> tuple[str, dict[str, int]]:
    """(commit, {file: size}) of REVISION (default main) of the repo in the hub cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound
    try:
        repos = scan_cache_dir(cache_dir()).repos
    except CacheNotFound:
        repos = frozenset()
    want = revision or "main"
    for repo in repos:
        if repo.repo_id != ref.repo_id or repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if want in rev.refs or rev.commit_hash == want:
                return rev.commit_hash, {f.file_path.relative_to(rev.snapshot_path).as_posix(): f.size_on_disk
                                         for f in rev.files}
    raise ConvertError(f"{reason} and {ref.repo_id} is not in the local Hugging Face cache ({cache_dir()}); "
                       "check the network, or pass a local checkpoint folder or a GGUF instead")


def plan_download(ref: HubRef, revision: str | None = None) -> Download:
    """Ask the hub what REF holds (the cache, when offline or the hub cannot be reached)."""
    from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache
    reason = "HF_HUB_OFFLINE is set" if is_offline_mode() else None
    if reason is None:
        try:
            info = HfApi().model_info(ref.repo_id, revision=revision, files_metadata=True)
        except Exception as e:
            if not _unreachable(e):
                raise _hub_error(ref, revision, e) from None
            reason = f"cannot reach the Hugging Face Hub ({type(e).__name__})"
        else:
            records = {s.rfilename: s for s in info.siblings or []}
            files, gguf = _select(ref, list(records))
            missing = [f for f in files
                       if not isinstance(try_to_load_from_cache(ref.repo_id, f, revision=info.sha), str)]
            return Download(ref, revision or "main", info.sha, files, {f: records[f].size or 0 for f in files},
                            missing, {f: records[f] for f in files}, gguf)
    commit, cached = _cached_files(ref, revision, reason)
    files, gguf = _select(ref, list(cached))
    return Download(ref, revision or "main", commit, files, {f: cached[f] for f in files}, [], {}, gguf, reason)


def _digest(path: Path, lfs: bool) -> str:
    from huggingface_hub.utils.sha import git_hash, sha_fileobj
    with open(path, "rb") as f:
        return sha_fileobj(f).hex() if lfs else git_hash(f.read())   # non-LFS files are small


def verify_snapshot(folder: Path, siblings) -> int:
    """Compare each downloaded file with the hub's metadata; returns how many were checked."""
    checked = 0
    for s in siblings:
        path = folder / s.rfilename
        if not path.is_file():
            continue
        if s.lfs is not None:
            want, got = s.lfs.sha256, _digest(path, lfs=True)
        elif s.blob_id:
            want, got = s.blob_id, _digest(path, lfs=False)
        else:
            continue
        if want != got:
            raise ConvertError(f"{s.rfilename}: checksum mismatch (hub {want[:12]}…, local {got[:12]}…); "
                               f"delete {path.resolve()} and pull again")
        checked += 1
    return checked


def fetch(d: Download, progress: bool = True) -> Path:
    """Download what D lacks (or find it all in the cache) and check it; returns the snapshot folder."""
    from huggingface_hub import errors as hf_errors, snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    (enable_progress_bars if progress else disable_progress_bars)()
    offline = d.offline_reason is not None
    try:
        # Online by the revision's name, not the commit: huggingface_hub then records refs/<revision>,
        # which later offline runs (and other tools sharing the cache) look the commit up by.
        folder = Path(snapshot_download(d.ref.repo_id, revision=d.commit if offline else d.revision,
                                        allow_patterns=d.files, local_files_only=offline))
    except hf_errors.LocalEntryNotFoundError as e:
        raise ConvertError(f"{d.offline_reason or 'the download failed'} and the cached copy of {d.ref.repo_id} "
                           f"is incomplete ({str(e).splitlines()[0]})") from None
    except Exception as e:
        if _unreachable(e):
            raise ConvertError(f"the download of {d.ref} broke off ({type(e).__name__}); run the command again "
                               "to resume it") from None
        raise _hub_error(d.ref, d.commit, e) from None
    verify_snapshot(folder, d.records.values())
    return folder


def pull(repo_id: str, revision: str | None = None, progress: bool = True) -> Path:
    """Download (or find in the cache) a checkpoint's files; returns the local snapshot folder."""
    ref = parse_hub_ref(repo_id)
    if ref is None:
        raise ConvertError(f"{repo_id}: not a Hugging Face Hub repo id (org/name)")
    d = plan_download(ref, revision)
    if d.gguf:
        raise ConvertError(f"{ref} holds GGUF files, not a checkpoint: `dsocr pull {ref}` fetches them ready-made")
    return fetch(d, progress)
