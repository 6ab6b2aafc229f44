"""config.toml, shared by `dsocr ocr` and `dsocr serve`.

Where: --config FILE, else $DSOCR_CONFIG, else the platform's user config dir
(platformdirs: ~/.config/dsocr/config.toml on Linux). Created with commented defaults on first
use. Precedence, highest first: request body (server) > command-line flags > environment
(DSOCR_*) > the file > built-in defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from platformdirs import user_config_path, user_data_path

DEFAULTS = {
    "models": {"dir": "", "active": "deepseek-ocr", "entries": {}},
    "inference": {"mode": "gundam", "base_size": 0, "image_size": 0, "crop_mode": "", "max_new_tokens": 8192,
                  "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": -1, "no_repeat_ngram_size": 30,
                  "ngram_window": 90, "threads": 0, "device": "cpu", "max_pixels": 64_000_000},
    "server": {"host": "127.0.0.1", "port": 8000, "model_id": "deepseek-ocr", "api_key": "", "max_queue": 8,
               "max_body_mb": 50, "allow_private_urls": False, "fetch_timeout": 20.0, "request_fetch_timeout": 60.0},
}

TEMPLATE = """\
# dsocr configuration (created on first use; edit freely).
# Precedence: request body (server) > command-line flags > DSOCR_* environment > this file > built-in defaults.

[models]
# Folder of converted GGUF files; empty: {data_dir}
dir = ""
# The entry `dsocr ocr` and `dsocr serve` use when no --model is given.
active = "deepseek-ocr"

# Named models: language-model GGUF and its mmproj (paths relative to `dir` or absolute).
# An entry that is not on disk yet is pulled from the hub and converted (Q8_0 + F16) on first use.
[models.entries.deepseek-ocr]
model = "DeepSeek-OCR-Q8_0.gguf"
mmproj = "mmproj-DeepSeek-OCR-F16.gguf"
repo = "deepseek-ai/DeepSeek-OCR"

[inference]
mode = "gundam"              # tiny | small | base | large | gundam
max_new_tokens = 8192
temperature = 0.0            # 0 = greedy
top_p = 1.0
top_k = 0
seed = -1                    # -1 = random
no_repeat_ngram_size = 30    # windowed n-gram blocking (the official vLLM recipe); 0 disables
ngram_window = 90
threads = 0                  # 0 = all cores (also DSOCR_THREADS)
device = "cpu"               # cpu | cuda
max_pixels = 64000000        # decompression-bomb guard

[server]
host = "127.0.0.1"
port = 8000
model_id = "deepseek-ocr"
api_key = ""                 # empty: no authentication
max_queue = 8
max_body_mb = 50
allow_private_urls = false   # image URLs resolving to private/loopback addresses are refused unless true
fetch_timeout = 20.0         # seconds to fetch one image URL, however slowly the server sends it
request_fetch_timeout = 60.0 # seconds to fetch all of one request's image URLs
"""

# environment variables -> (section, key, type)
ENV = {"DSOCR_MODELS": ("models", "dir", str), "DSOCR_MODEL": ("models", "model", str),
       "DSOCR_MMPROJ": ("models", "mmproj", str), "DSOCR_THREADS": ("inference", "threads", int),
       "DSOCR_DEVICE": ("inference", "device", str), "DSOCR_MODE": ("inference", "mode", str),
       "DSOCR_MAX_NEW_TOKENS": ("inference", "max_new_tokens", int),
       "DSOCR_HOST": ("server", "host", str), "DSOCR_PORT": ("server", "port", int),
       "DSOCR_API_KEY": ("server", "api_key", str), "DSOCR_MODEL_ID": ("server", "model_id", str),
       "DSOCR_MAX_QUEUE": ("server", "max_queue", int)}


class ConfigError(Exception):
    pass


def config_path(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("DSOCR_CONFIG"):
        return Path(os.environ["DSOCR_CONFIG"]).expanduser()
    return user_config_path("dsocr") / "config.toml"


def default_models_dir() -> Path:
    return user_data_path("dsocr") / "models"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Settings:
    data: dict
    path: Path

    def __getitem__(self, section: str) -> dict:
        return self.data[section]

    def models_dir(self) -> Path:
        return Path(self.data["models"]["dir"]).expanduser() if self.data["models"]["dir"] else default_models_dir()

    def active_entry(self) -> dict:
        m = self.data["models"]
        return m.get("entries", {}).get(m.get("active", ""), {})


def load_settings(explicit: str | None = None, cli: dict | None = None, environ=os.environ,
                  create: bool = True) -> Settings:
    """defaults < file < environment < cli ({section: {key: value}}, None values ignored)."""
    path = config_path(explicit)
    if not path.exists():
        if explicit or environ.get("DSOCR_CONFIG"):
            if not create:
                raise ConfigError(f"{path}: no such config file")
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(TEMPLATE.format(data_dir=default_models_dir()), encoding="utf-8")
            except OSError:
                pass   # an unwritable config dir must not stop the command; defaults apply
    file_data: dict = {}
    if path.exists():
        try:
            file_data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    data = _merge(DEFAULTS, file_data)
    env: dict = {}
    for name, (section, key, typ) in ENV.items():
        if environ.get(name, "") != "":
            try:
                env.setdefault(section, {})[key] = typ(environ[name])
            except ValueError:
                raise ConfigError(f"{name}={environ[name]!r} is not a valid {typ.__name__}") from None
    data = _merge(data, env)
    for section, values in (cli or {}).items():
        data = _merge(data, {section: {k: v for k, v in values.items() if v is not None}})
    return Settings(data, path)
