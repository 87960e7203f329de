"""Settings: defaults, environment, file, and their documentation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from paragate.config import SETTINGS, ConfigError, Settings, load

DOCS = Path(__file__).parent.parent / "docs" / "configuration.md"


def test_defaults_agree_with_the_table() -> None:
    defaults = Settings()
    assert [f.name for f in dataclasses.fields(Settings)] == [s.name for s in SETTINGS]
    for s in SETTINGS:
        assert getattr(defaults, s.name) == s.default
    assert load({}) == defaults


def test_environment_and_file(tmp_path: Path) -> None:
    path = tmp_path / "paragate.toml"
    path.write_text('port = 9000\nupstream_read_timeout = 30\naccess_log = true\n')
    s = load({"PARAGATE_CONFIG": str(path), "PARAGATE_PORT": "9100",
              "PARAGATE_LOG_LEVEL": "debug", "OTHER": "x"})
    assert (s.port, s.upstream_read_timeout, s.access_log, s.log_level) == (
        9100, 30.0, True, "debug")


@pytest.mark.parametrize(("env", "words"), [
    ({"PARAGATE_PORTT": "1"}, "unknown environment variable PARAGATE_PORTT"),
    ({"PARAGATE_PORT": "eighty"}, "port: expected int"),
    ({"PARAGATE_ACCESS_LOG": "perhaps"}, "access_log: expected bool"),
    ({"PARAGATE_LOG_LEVEL": "loud"}, "log_level"),
    ({"PARAGATE_WORKERS": "0"}, "workers"),
    ({"PARAGATE_REFRESH_INTERVAL": "0"}, "refresh_interval"),
    ({"PARAGATE_CONFIG": "/nonexistent.toml"}, "cannot read"),
])
def test_mistakes_are_errors(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load(env)


def test_unknown_file_key(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load({"PARAGATE_CONFIG": str(path)})


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    for s in SETTINGS:
        assert f"`{s.env}`" in text, f"{s.env} is missing from docs/configuration.md"
