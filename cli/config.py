"""config.toml, shared by `dsocr ocr`, `dsocr serve` and `dsocr config`.

Where: --config FILE (it must exist), else $DSOCR_CONFIG, else the platform's user config dir
(platformdirs: ~/.config/dsocr/config.toml on Linux); no file at those two means the built-in
defaults. Reading never writes: `dsocr config --init` writes the commented template. Precedence,
highest first: request body (server) > command-line flags > environment (DSOCR_*) > the file >
built-in defaults.

The pydantic models below state each key once: its type, default, range and meaning. Each layer is
validated on its own, so that an error names the file, the variable or the flag the bad value came
from: file values strictly (1.5 is not an integer, "abc" is not a number, 1 is not a boolean),
environment values parsed from their strings, flags as argparse typed them. The decoding ranges
live in runtime/generate.py (SAMPLING_RANGES), the view sizes in runtime/preprocess.py.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args, get_origin

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from platformdirs import user_config_path, user_data_path
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dsocr.convert.hub import DEFAULT_REPO
from dsocr.runtime.errors import InputError
from dsocr.runtime.preprocess import DEFAULT_MODE, LAYOUTS
from dsocr.runtime.scheduler import DEFAULT_PARALLEL


class ConfigError(InputError):
    """A config file, variable or setting that cannot be used: input, to the CLI and the Python API alike."""


class Section(BaseModel):
    # a misspelt key is an error, not silently ignored; `model_id` is a key here, not pydantic's namespace
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelEntry(Section):
    model: str = Field(description="language-model GGUF (relative to models.dir, or absolute)")
    mmproj: str = Field("", description="its vision GGUF (empty: the mmproj-*.gguf beside the model)")
    repo: str = Field(DEFAULT_REPO, description="hub repo it is fetched from when missing")
    revision: str | None = Field(None, description="hub revision: branch, tag or commit (unset: the default "
                                                   "branch)", examples=["main"])


def _builtin_entries() -> dict[str, ModelEntry]:
    return {"deepseek-ocr": ModelEntry(model="DeepSeek-OCR-Q8_0.gguf", mmproj="mmproj-DeepSeek-OCR-F16.gguf"),
            "deepseek-ocr-2": ModelEntry(model="DeepSeek-OCR-2-Q8_0.gguf", mmproj="mmproj-DeepSeek-OCR-2-F16.gguf",
                                         repo="deepseek-ai/DeepSeek-OCR-2")}


class Models(Section):
    dir: str = Field("", description="folder of converted GGUF files (empty: the platform data folder)")
    active: str = Field("deepseek-ocr", description="the entry `dsocr ocr` and `dsocr serve` use when no --model "
                                                    "is given")
    model: str = Field("", description="a language-model GGUF (or a folder with the pair) used instead of the "
                                       "active entry")
    mmproj: str = Field("", description="the vision GGUF for `model` (empty: the mmproj-*.gguf beside it)")
    entries: dict[str, ModelEntry] = Field(
        default_factory=_builtin_entries,
        description="named models; one not on disk yet is fetched from its hub repo on first use")


class Inference(Section):
    mode: str = Field(DEFAULT_MODE, description="DeepSeek-OCR: tiny | small | base | large | gundam; "
                                            "DeepSeek-OCR 2: gundam | global")
    base_size: int = Field(0, description="global view size in pixels (0: the mode's)")
    image_size: int = Field(0, description="tile size in pixels (0: the mode's)")
    crop_mode: bool | None = Field(None, description="cut the image into tiles (unset: the mode's)", examples=[True])
    max_new_tokens: int = Field(8192, description="the most tokens one answer may have")
    temperature: float = Field(0.0, description="0 = greedy")
    top_p: float = Field(1.0, description="0 to 1; 0 is greedy")
    top_k: int = Field(0, description="0 keeps every token")
    seed: int = Field(-1, description="-1 = random")
    no_repeat_ngram_size: int | None = Field(
        None, examples=[20], description="windowed n-gram blocking size (unset: the model's official recipe, "
        + ", ".join(f"{layout.ngram_size} for {layout.model}" for layout in LAYOUTS.values()) + "); 0 disables")
    ngram_window: int = Field(90, description="tokens the n-gram blocking looks back over")
    threads: int = Field(0, description="CPU threads; 0 = all cores")
    device: str = Field("cpu", description="cpu | cuda")
    parallel: int = Field(DEFAULT_PARALLEL, ge=1, description="sequences decoded together: pages of one run, "
                                                              "requests of a server's users")
    max_pixels: int = Field(64_000_000, ge=1, description="larger images are refused (decompression-bomb guard)")

    # The one way from these settings to what the runtime takes; `dsocr ocr` and the server both use it.
    def view(self, mode: str | None = None, *, layout):
        """The ViewConfig of `mode` for the model whose preprocess.Layout is `layout`, or with None, these
        settings' own: their mode, with base_size and image_size (0: the mode's) and crop_mode (None: the
        mode's) over it. InputError for a mode that model lacks or sizes its views cannot take."""
        from dsocr.runtime.preprocess import ViewConfig
        if mode is not None:
            return ViewConfig.from_mode(mode, layout)
        view = ViewConfig.from_mode(self.mode, layout)
        view.base_size = self.base_size or view.base_size
        view.image_size = self.image_size or view.image_size
        view.crop_mode = view.crop_mode if self.crop_mode is None else self.crop_mode
        view.validate()
        return view

    def check_mode(self) -> None:
        """Refuses a mode no model has, before the model (and so which modes it has) is known."""
        from dsocr.runtime.preprocess import check_mode_name
        check_mode_name(self.mode)

    def sampling(self, **overrides):
        """The SamplingParams of these settings with `overrides` (decoding keys of this table; None: not
        given) over them: a seed < 0 is a random one, an n-gram size of 0 turns the blocking off. Ranges
        are SamplingParams.validate's to check."""
        from dsocr.runtime.generate import SamplingParams
        unknown = set(overrides) - set(DECODING_KEYS)
        if unknown:
            raise TypeError(f"not decoding settings: {sorted(unknown)}")
        s = self.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, seed=None if s.seed < 0 else s.seed,
                              no_repeat_ngram_size=s.no_repeat_ngram_size, ngram_window=s.ngram_window,
                              ngram_mode="off" if s.no_repeat_ngram_size == 0 else "window")


DECODING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "no_repeat_ngram_size", "ngram_window")


class Server(Section):
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    model_id: str = Field("deepseek-ocr", description="the name clients use as `model`")
    api_key: str = Field("", description="required as Authorization: Bearer KEY on /v1/* (empty: no "
                                         "authentication)")
    max_queue: int = Field(8, ge=1, description="requests allowed to wait; more get 503")
    max_body_mb: int = Field(50, ge=1, description="largest request body in MB (images are inline)")
    allow_private_urls: bool = Field(False, description="let image URLs resolve to private, loopback or "
                                                        "link-local addresses")
    fetch_timeout: float = Field(20.0, gt=0, allow_inf_nan=False,
                                 description="seconds to fetch one image URL, however slowly the server sends it")
    request_fetch_timeout: float = Field(60.0, gt=0, allow_inf_nan=False,
                                         description="seconds to fetch all of one request's image URLs")
    max_pdf_pages: int = Field(20, ge=1, description="the most pages a PDF sent to the server may have (each is "
                                                     "OCR'd as its own page)")
    cors_origins: list[str] = Field(default_factory=list, description="origins browser pages may call the API "
                                    "from (CORS), e.g. \"https://app.example\"; \"*\" allows any; empty: no CORS")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: Models = Field(default_factory=Models)
    inference: Inference = Field(default_factory=Inference)
    server: Server = Field(default_factory=Server)


DEFAULTS = Config().model_dump()
LAYERS = ("default", "file", "environment", "flag")      # lowest precedence first

# environment variable -> (section, key); the key's type parses the string
ENV = {"DSOCR_MODELS": ("models", "dir"), "DSOCR_MODEL": ("models", "model"), "DSOCR_MMPROJ": ("models", "mmproj"),
       "DSOCR_THREADS": ("inference", "threads"), "DSOCR_DEVICE": ("inference", "device"),
       "DSOCR_MODE": ("inference", "mode"), "DSOCR_MAX_NEW_TOKENS": ("inference", "max_new_tokens"),
       "DSOCR_HOST": ("server", "host"), "DSOCR_PORT": ("server", "port"), "DSOCR_API_KEY": ("server", "api_key"),
       "DSOCR_MODEL_ID": ("server", "model_id"), "DSOCR_MAX_QUEUE": ("server", "max_queue")}


def env_name(section: str, key: str) -> str | None:
    return next((var for var, place in ENV.items() if place == (section, key)), None)


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def config_path(explicit: str | None = None, environ=os.environ) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    if environ.get("DSOCR_CONFIG"):
        return Path(environ["DSOCR_CONFIG"]).expanduser()
    return user_config_path("dsocr") / "config.toml"


def default_models_dir() -> Path:
    return user_data_path("dsocr") / "models"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def leaves(tree: dict, prefix: str = "") -> dict:
    """{"section.key[.sub]": value} for every non-table value of `tree`."""
    out = {}
    for k, v in tree.items():
        out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


@dataclass
class Settings:
    data: dict
    path: Path
    sources: dict = field(default_factory=dict)     # "section.key[.sub]" -> the layer that set it (not defaults)

    def __getitem__(self, section: str) -> dict:
        return self.data[section]

    def models_dir(self) -> Path:
        return Path(self.data["models"]["dir"]).expanduser() if self.data["models"]["dir"] else default_models_dir()

    def active_entry(self) -> dict:
        m = self.data["models"]
        return m.get("entries", {}).get(m.get("active", ""), {})

    def source(self, section: str, key: str) -> str:
        """"default", "file", "environment" or "flag": where section.key (a dotted key inside the section
        is fine) came from; for a table, the highest layer that set anything in it."""
        path = f"{section}.{key}"
        found = [layer for leaf, layer in self.sources.items() if leaf == path or leaf.startswith(path + ".")]
        return max(found, key=LAYERS.index, default="default")

    def where(self, section: str, key: str) -> str:
        """section.key as an error message names it: its flag, its variable, or the key and the file."""
        source = self.source(section, key)
        if source == "flag":
            return flag_name(key)
        if source == "environment":
            return env_name(section, key)
        return f"{section}.{key} in {self.path}" if source == "file" else f"{section}.{key} (default)"


def _fields_at(loc: tuple) -> list[str]:
    """The keys the config allows at `loc` (a table's path), e.g. ("models", "entries", "x") -> ModelEntry's."""
    node = Config
    for part in loc:
        node = get_args(node)[1] if get_origin(node) is dict else node.model_fields[part].annotation
    return list(node.model_fields)


def _problem(err: dict, show_input: bool) -> str:
    """One pydantic error in words; an unknown key gets the nearest known one."""
    loc = err["loc"]
    if err["type"] == "extra_forbidden":
        here = _fields_at(loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), here, n=1)
        if not near and len(loc) <= 2:       # a key of another section, or outside any
            everywhere = [f"{s}.{k}" for s in Config.model_fields for k in _fields_at((s,))]
            bare = difflib.get_close_matches(str(loc[-1]), [k.split(".")[1] for k in everywhere], n=1)
            near = [k for k in everywhere if bare and k.endswith("." + bare[0])]
        return f"unknown key; did you mean {near[0]}?" if near else f"unknown key (known: {', '.join(here)})"
    if err["type"] == "model_type":
        return f"Input should be a table ([{'.'.join(map(str, loc))}])"
    got = f" (got {err['input']!r})" if show_input and err["type"] != "missing" else ""
    return err["msg"] + got


def _validated(raw: dict, prefix: str, label, strings: bool = False, strict: bool = False,
               show_input: bool = False, whole: bool = False) -> dict:
    """`raw` checked against Config, as {section: {key: value}}: every key if `whole`, else those `raw`
    sets. Else one ConfigError line: prefix + "label(loc, value): problem" for every bad key."""
    try:
        checked = Config.model_validate_strings(raw) if strings else Config.model_validate(raw, strict=strict)
    except ValidationError as e:
        raise ConfigError(prefix + "; ".join(f"{label(err['loc'], err['input'])}: {_problem(err, show_input)}"
                                             for err in e.errors())) from None
    return checked.model_dump(exclude_unset=not whole)


def read_file(path: Path, must_exist: bool) -> dict:
    """The TOML at `path`, {} when there is none (and none was asked for by name)."""
    if not path.exists():
        if must_exist:
            raise ConfigError(f"{path}: no such config file (`dsocr config --init --config {path}` writes one)")
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_settings(explicit: str | None = None, cli: dict | None = None, environ=os.environ) -> Settings:
    """defaults < file < environment < cli ({section: {key: value}}, None values ignored)."""
    path = config_path(explicit, environ)
    in_file = read_file(path, must_exist=bool(explicit))
    # merged over the defaults before the check, so a file may override one key of a built-in entry
    data = _validated(_merge(DEFAULTS, in_file), f"{path}: ", lambda loc, _: ".".join(map(str, loc)),
                      strict=True, show_input=True, whole=True)
    in_env: dict = {}
    for var, (section, key) in ENV.items():
        if environ.get(var, "") != "":
            in_env.setdefault(section, {})[key] = environ[var]
    env = _validated(in_env, "", lambda loc, value: f"{env_name(*loc[:2])}={value}", strings=True)
    flags = {section: {k: v for k, v in values.items() if v is not None} for section, values in (cli or {}).items()}
    flags = _validated(flags, "", lambda loc, value: f"{flag_name(str(loc[-1]))} {value}")
    sources = dict.fromkeys(leaves(in_file), "file")
    for layer, values in (("environment", env), ("flag", flags)):
        sources.update(dict.fromkeys(leaves(values), layer))
        data = _merge(data, values)
    return Settings(data, path, sources)


def _toml(value) -> str:
    return json.dumps(value)      # JSON's strings, numbers and booleans are TOML's too


def _key_lines(model: type[BaseModel], values: dict, section: str) -> list[str]:
    """Each key of one table, its meaning above it; a key without a default is written commented out."""
    lines = []
    for key, f in model.model_fields.items():
        if key in values and not isinstance(values[key], dict):
            var = env_name(section, key)
            lines.append(f"# {f.description}" + (f"; also {var}" if var else ""))
            value = values[key]
            lines.append(f"{key} = {_toml(value)}" if value is not None else f"# {key} = {_toml(f.examples[0])}")
    return lines


def template() -> str:
    """The commented config.toml `dsocr config --init` writes: every key at its built-in default."""
    lines = ["# dsocr configuration: every key at its built-in default; edit freely.",
             "# Precedence: request body (server) > command-line flags > DSOCR_* environment > this file > "
             "built-in defaults.",
             "# `dsocr config` shows the settings in effect and where each one comes from."]
    for section, info in Config.model_fields.items():
        lines += ["", f"[{section}]"] + _key_lines(info.annotation, DEFAULTS[section], section)
        if section == "models":
            lines += ["", f"# {Models.model_fields['entries'].description}"]
            for name, entry in DEFAULTS["models"]["entries"].items():
                lines += [f"[models.entries.{name}]"] + _key_lines(ModelEntry, entry, "")
    return "\n".join(lines) + "\n"
