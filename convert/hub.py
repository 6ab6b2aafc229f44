"""Fetching a checkpoint from the Hugging Face Hub (huggingface_hub honours HF_HOME, HF_TOKEN,
HF_ENDPOINT and HF_HUB_OFFLINE), then checking every file against the hub's own record:
sha256 for LFS files (the weights), the git blob sha1 for small ones."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from dsocr.convert.checkpoint import ConvertError

DEFAULT_REPO = "deepseek-ai/DeepSeek-OCR"
# what conversion reads; the repo's Python code and images are not needed
PATTERNS = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "processor_config.json", "generation_config.json", "model.safetensors.index.json", "*.safetensors"]


def looks_like_repo_id(src: str) -> bool:
    return not Path(src).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", src) is not None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _file_digest(path: Path, algo: str, git_blob: bool = False) -> str:
    h = hashlib.new(algo)
    if git_blob:
        h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def verify_snapshot(folder: Path, siblings) -> int:
    """Compare each downloaded file with the hub's metadata; returns how many were checked."""
    checked = 0
    for s in siblings:
        path = folder / s.rfilename
        if not path.is_file():
            continue
        if s.lfs is not None:
            want, got = s.lfs.sha256, _file_digest(path, "sha256")
        elif s.blob_id:
            want, got = s.blob_id, _file_digest(path, "sha1", git_blob=True)
        else:
            continue
        if want != got:
            raise ConvertError(f"{s.rfilename}: checksum mismatch (hub {want[:12]}…, local {got[:12]}…); "
                               f"delete {path.resolve()} and pull again")
        checked += 1
    return checked


def pull(repo_id: str, revision: str | None = None, progress: bool = True) -> Path:
    """Download (or find in the cache) the checkpoint files; returns the local snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        if offline():
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS,
                                            local_files_only=True))
            return folder
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        folder = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=PATTERNS))
    except hf_errors.LocalEntryNotFoundError:
        raise ConvertError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                           "pass a local checkpoint folder or a GGUF instead") from None
    except hf_errors.GatedRepoError:
        raise ConvertError(f"{repo_id} is gated: accept its terms on the hub and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise ConvertError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise ConvertError(f"{repo_id}: no revision {revision!r} on the hub") from None
    except hf_errors.HfHubHTTPError as e:
        raise ConvertError(f"the Hugging Face Hub answered with an error for {repo_id}: {str(e).splitlines()[0]}") from None
    except (OSError, ConnectionError) as e:
        raise ConvertError(f"cannot reach the Hugging Face Hub ({type(e).__name__}); check the network, "
                           "or set HF_HUB_OFFLINE=1 to use the cache, or pass a local checkpoint folder") from None
    except Exception as e:  # httpx / hub client errors of other kinds: report, do not trace
        if type(e).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")):
            raise ConvertError(f"cannot reach the Hugging Face Hub ({type(e).__name__}); check the network, "
                               "or set HF_HUB_OFFLINE=1 to use the cache, or pass a local checkpoint folder") from None
        raise
    verify_snapshot(folder, info.siblings or [])
    return folder
