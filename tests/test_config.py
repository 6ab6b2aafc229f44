"""config.toml, DSOCR_* variables and flags (issue 11, items 9 and 10): a --config that does not
exist, unknown keys (with the nearest known one), wrong types and out-of-range values are one-line
errors naming the file, the variable or the flag; reading never writes; the layers stack as
default < file < environment < flag; `dsocr config` shows each setting and where it came from."""
import json
import os

import pytest

from dsocr.cli.config import DEFAULTS, ConfigError, load_settings, template, tomllib
from dsocr.cli.main import main

from conftest import TINY, one_line_error

NOTE = TINY / "images" / "small_note.png"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """The platform config and data folders moved under tmp_path (empty), no DSOCR_* variable set."""
    for name in list(os.environ):
        if name.startswith("DSOCR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    return tmp_path


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def cli(home, capsys):
    """cli(*argv) -> (exit status, stdout, stderr) of `dsocr` run in this process."""
    def run(*argv):
        rc = main([str(a) for a in argv])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


def command(name, home):
    """argv of `dsocr ocr` / `dsocr serve` on a model that does not exist: a config error must come first."""
    nope = home / "nope.gguf"
    return ["ocr", NOTE, "--model", nope] if name == "ocr" else ["serve", "--model", nope]


# ---------------------------------------------------------------- item 9: a missing --config, reading never writes

@pytest.mark.parametrize("name", ["ocr", "serve"])
def test_a_missing_config_file_is_an_error_and_is_not_created(cli, home, name):
    missing = home / "sub" / "config.toml"
    one_line_error(cli(*command(name, home), "--config", missing), f"{missing}: no such config file")
    assert not missing.exists() and not missing.parent.exists()


@pytest.mark.parametrize("name", ["ocr", "serve"])
def test_reading_the_config_never_writes_it(cli, home, name):
    """No file at the default location (nor at $DSOCR_CONFIG): built-in defaults, nothing written."""
    one_line_error(cli(*command(name, home)), "nope.gguf")
    assert files_under(home / "xdg-config") == []
    s = load_settings(environ={"DSOCR_CONFIG": str(home / "elsewhere.toml")})
    assert s.data == DEFAULTS and not (home / "elsewhere.toml").exists()
    assert files_under(home / "xdg-config") == []


def test_the_default_model_entry_needs_no_file(home):
    """What the first run resolves: the built-in entry, without a config.toml having been written."""
    s = load_settings(environ={})
    assert s.active_entry()["model"] == "DeepSeek-OCR-Q8_0.gguf"
    assert s.active_entry()["mmproj"] == "mmproj-DeepSeek-OCR-F16.gguf"
    assert s.source("models", "entries") == "default" and not s.path.exists()


# ---------------------------------------------------------------- item 9: unknown keys, wrong types, ranges

BAD_FILES = [
    ("[inference]\nmax_new_token = 100\n", "inference.max_new_token: unknown key; did you mean max_new_tokens?"),
    ('[infrence]\nmode = "base"\n', "infrence: unknown key; did you mean inference?"),
    ("[server]\nthreads = 2\n", "server.threads: unknown key; did you mean inference.threads?"),
    ("max_new_tokens = 5\n", "max_new_tokens: unknown key; did you mean inference.max_new_tokens?"),
    ('[models.entries.mine]\nmodel = "a.gguf"\nmmporj = "b.gguf"\n',
     "models.entries.mine.mmporj: unknown key; did you mean mmproj?"),
    ('[models.entries.mine]\nmmproj = "b.gguf"\n', "models.entries.mine.model: Field required"),
    ('[inference]\nmax_new_tokens = "abc"\n', "inference.max_new_tokens: Input should be a valid integer (got 'abc')"),
    ('[inference]\ncrop_mode = "maybe"\n', "inference.crop_mode: Input should be a valid boolean (got 'maybe')"),
    ('[server]\nport = "abc"\n', "server.port: Input should be a valid integer (got 'abc')"),
    ('[inference]\nthreads = "two"\n', "inference.threads: Input should be a valid integer (got 'two')"),
    ("inference = 5\n", "inference: Input should be a table ([inference])"),
    ("[inference]\nmax_pixels = 1.5\n", "inference.max_pixels: Input should be a valid integer (got 1.5)"),
    ("[inference]\nmax_pixels = 0\n", "inference.max_pixels: Input should be greater than or equal to 1 (got 0)"),
    ("[inference]\nmax_new_tokens = true\n", "inference.max_new_tokens: Input should be a valid integer (got True)"),
    ("[server]\nport = 70000\n", "server.port: Input should be less than or equal to 65535 (got 70000)"),
    ("[server]\nmax_queue = 0\n", "server.max_queue: Input should be greater than or equal to 1 (got 0)"),
    ("[server]\nmax_pdf_pages = 0\n", "server.max_pdf_pages: Input should be greater than or equal to 1 (got 0)"),
    ("[server]\nrequest_fetch_timeout = inf\n", "server.request_fetch_timeout: Input should be a finite number"),
    ("[server]\nallow_private_urls = 1\n", "server.allow_private_urls: Input should be a valid boolean (got 1)"),
    ("[server\nport = 1\n", "not valid TOML"),
]


@pytest.mark.parametrize("name", ["ocr", "serve"])
@pytest.mark.parametrize("text, needle", BAD_FILES)
def test_bad_config_values_are_one_line_errors_naming_file_and_key(cli, home, name, text, needle):
    config = home / "config.toml"
    config.write_text(text)
    before = files_under(home)
    one_line_error(cli(*command(name, home), "--config", config), f"dsocr: error: {config}: ", needle)
    assert files_under(home) == before and config.read_text() == text


def test_every_bad_key_of_a_file_is_named_on_the_one_line(home):
    config = home / "config.toml"
    config.write_text('[inference]\nmax_new_token = 100\ntop_k = "3"\n')
    with pytest.raises(ConfigError) as e:
        load_settings(str(config), environ={})
    assert str(e.value) == (f"{config}: inference.top_k: Input should be a valid integer (got '3'); "
                            "inference.max_new_token: unknown key; did you mean max_new_tokens?")


@pytest.mark.parametrize("name", ["ocr", "serve"])
@pytest.mark.parametrize("variable, value, needle", [
    ("DSOCR_PORT", "abc", "DSOCR_PORT=abc: Input should be a valid integer, unable to parse string as an integer"),
    ("DSOCR_THREADS", "two", "DSOCR_THREADS=two: Input should be a valid integer"),
    ("DSOCR_MAX_NEW_TOKENS", "1.5", "DSOCR_MAX_NEW_TOKENS=1.5: Input should be a valid integer"),
    ("DSOCR_MAX_QUEUE", "0", "DSOCR_MAX_QUEUE=0: Input should be greater than or equal to 1"),
])
def test_bad_environment_values_name_the_variable(cli, home, monkeypatch, name, variable, value, needle):
    monkeypatch.setenv(variable, value)
    one_line_error(cli(*command(name, home)), needle)
    assert files_under(home / "xdg-config") == []


@pytest.mark.parametrize("argv, needle", [
    (["ocr", NOTE, "--max-pixels", "0"], "--max-pixels 0: Input should be greater than or equal to 1"),
    (["serve", "--fetch-timeout", "0"], "--fetch-timeout 0.0: Input should be greater than 0"),
    (["serve", "--request-fetch-timeout", "nan"], "--request-fetch-timeout nan: Input should be a finite number"),
])
def test_out_of_range_flags_name_the_flag(cli, home, argv, needle):
    one_line_error(cli(*argv, "--model", home / "nope.gguf"), needle)


def test_range_errors_after_loading_name_the_source(cli, home, monkeypatch):
    """Decoding ranges stay in runtime/generate.py; their message names the layer the value came from."""
    config = home / "config.toml"
    config.write_text("[inference]\ntop_p = 2.0\ntop_k = -1\n")
    argv = command("ocr", home) + ["--config", config]
    one_line_error(cli(*argv), f"inference.top_p in {config} must be between 0 and 1")
    monkeypatch.setenv("DSOCR_MAX_NEW_TOKENS", "0")
    one_line_error(cli(*argv, "--top-p", "0.5"), "DSOCR_MAX_NEW_TOKENS must be at least 1")
    one_line_error(cli(*argv, "--top-p", "0.5", "--max-new-tokens", "4"), f"inference.top_k in {config} must be")
    one_line_error(cli(*argv, "--top-p", "0.5", "--max-new-tokens", "4", "--top-k", "-2"), "--top-k must be")


# ---------------------------------------------------------------- precedence and sources

def test_precedence_default_file_environment_flag(home):
    config = home / "config.toml"
    config.write_text('[inference]\nmax_new_tokens = 100\ntemperature = 1\nmode = "base"\n'
                      '[server]\nport = 9001\n[models.entries.deepseek-ocr]\nmodel = "mine.gguf"\n')
    env = {"DSOCR_MAX_NEW_TOKENS": "200", "DSOCR_PORT": "9002", "DSOCR_MODE": ""}   # empty: not set
    flags = {"inference": {"max_new_tokens": 300, "mode": None, "top_k": None}, "server": {"port": None}}
    s = load_settings(str(config), flags, environ=env)
    expected = {("inference", "max_new_tokens"): (300, "flag", "--max-new-tokens"),
                ("server", "port"): (9002, "environment", "DSOCR_PORT"),
                ("inference", "mode"): ("base", "file", f"inference.mode in {config}"),
                ("inference", "temperature"): (1.0, "file", f"inference.temperature in {config}"),
                ("inference", "top_k"): (0, "default", "inference.top_k (default)")}
    for (section, key), (value, source, where) in expected.items():
        assert (s[section][key], s.source(section, key), s.where(section, key)) == (value, source, where)
    assert isinstance(s["inference"]["temperature"], float)     # the file's 1 is the float 1.0
    # a file entry overrides the built-in one key by key
    entry = s.active_entry()
    assert entry["model"] == "mine.gguf" and entry["mmproj"] == "mmproj-DeepSeek-OCR-F16.gguf"
    assert s.source("models", "entries.deepseek-ocr.model") == "file"
    assert s.source("models", "entries.deepseek-ocr.mmproj") == "default"
    assert s.source("models", "entries") == "file"


def test_environment_strings_are_parsed_by_type(home):
    s = load_settings(environ={"DSOCR_THREADS": "3", "DSOCR_PORT": " 8123 ", "DSOCR_MODEL": "/m/x.gguf"})
    assert (s["inference"]["threads"], s["server"]["port"], s["models"]["model"]) == (3, 8123, "/m/x.gguf")


def test_the_template_is_every_default(home):
    """The file `dsocr config --init` writes reads back as exactly the built-in settings."""
    config = home / "config.toml"
    config.write_text(template())
    s = load_settings(str(config), environ={})
    assert s.data == DEFAULTS
    assert tomllib.loads(template())["server"]["port"] == DEFAULTS["server"]["port"]


# ---------------------------------------------------------------- item 10: `dsocr config`

def test_dsocr_config_shows_each_value_and_its_source(cli, home, monkeypatch):
    config = home / "config.toml"
    config.write_text('[inference]\nmode = "base"\n[server]\napi_key = "sekrit"\n')
    monkeypatch.setenv("DSOCR_PORT", "9005")
    rc, out, err = cli("config", "--config", config)
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert str(config) in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line.strip()}
    assert rows["key"] == ["value", "source"]
    assert rows["inference.mode"] == ['"base"', "file"]
    assert rows["server.port"] == ["9005", "environment", "(DSOCR_PORT)"]
    assert rows["inference.top_p"] == ["1.0", "default"]
    assert rows["models.entries.deepseek-ocr.model"] == ['"DeepSeek-OCR-Q8_0.gguf"', "default"]
    assert "sekrit" not in out and rows["server.api_key"][1] == "file"

    rc, out, _ = cli("config", "--config", config, "--json")
    report = json.loads(out)
    assert rc == 0 and report["path"] == str(config) and report["exists"] is True
    assert report["settings"]["server.port"] == {"value": 9005, "source": "environment", "variable": "DSOCR_PORT"}
    assert report["settings"]["inference.mode"] == {"value": "base", "source": "file"}
    assert report["settings"]["inference.max_new_tokens"] == {"value": 8192, "source": "default"}
    assert "sekrit" not in out


def test_dsocr_config_checks_like_ocr_does(cli, home, monkeypatch):
    config = home / "config.toml"
    config.write_text("[inference]\nmax_new_token = 1\n")
    one_line_error(cli("config", "--config", config), "did you mean max_new_tokens?")
    one_line_error(cli("config", "--config", home / "none.toml"), "no such config file")
    monkeypatch.setenv("DSOCR_PORT", "abc")
    one_line_error(cli("config"), "DSOCR_PORT=abc")


def test_dsocr_config_init_writes_the_template_once(cli, home):
    rc, out, err = cli("config", "--init")
    written = home / "xdg-config" / "dsocr" / "config.toml"
    assert rc == 0 and written.read_text() == template() and str(written) in err + out
    one_line_error(cli("config", "--init"), f"{written}: already exists")
    assert written.read_text() == template()
    elsewhere = home / "a" / "b.toml"
    rc, _, _ = cli("config", "--init", "--config", elsewhere)
    assert rc == 0 and elsewhere.read_text() == template()
    rc, out, _ = cli("config", "--config", elsewhere, "--json")
    assert rc == 0 and json.loads(out)["settings"]["server.port"] == {"value": 8000, "source": "file"}
