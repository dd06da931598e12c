"""shardchat.configload, the only loader: config.toml's defaults, the precedence of
file, environment and flags, paths beside the file, the CPU count, and errors that
name what the user wrote."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from shardchat.configload import load_config, parse_override
from shardchat.core.config import Config, StorageConfig, to_toml
from shardchat.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_config_toml_holds_every_default() -> None:
    """config.toml at the repo root is exactly the built-in defaults, key for key."""
    assert load_config(ROOT / "config.toml", environ={}) == Config(
        cpu_count=os.cpu_count() or 1, storage=StorageConfig(dir=str(ROOT / "data"))
    )
    in_file = tomllib.loads((ROOT / "config.toml").read_text())
    in_code = tomllib.loads(to_toml(Config()))
    assert {s: set(t) for s, t in in_file.items()} == {s: set(t) for s, t in in_code.items()}


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nport = 1000\nworkers = 2\n[heartbeat]\ninterval = 5\n")
    env = {"SHARDCHAT_SERVER_PORT": "2000", "SHARDCHAT_HEARTBEAT_IDLE_TIMEOUT": "0"}
    config = load_config(path, environ=env, overrides={"server.port": 3000})
    assert config.server.port == 3000  # flag beats env beats file
    assert config.server.workers == 2  # file
    assert config.heartbeat.interval == 5.0  # file
    assert config.heartbeat.idle_timeout == 0.0  # env, a key with an underscore
    assert load_config(path, environ=env).server.port == 2000


def test_storage_dir_is_beside_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data/ beside the file by default, a relative dir from the file's directory
    when the file sets it, from the working directory when a flag does."""
    path = tmp_path / "etc" / "c.toml"
    path.parent.mkdir()
    path.write_text("")
    assert load_config(path, environ={}).storage.dir == str(tmp_path / "etc" / "data")
    path.write_text('[storage]\ndir = "rooms"\n')
    assert load_config(path, environ={}).storage.dir == str(tmp_path / "etc" / "rooms")
    monkeypatch.chdir(tmp_path)
    flagged = load_config(path, environ={}, overrides={"storage.dir": "here"})
    assert flagged.storage.dir == str(tmp_path / "here")


def test_auto_workers_is_the_cpu_count() -> None:
    assert load_config(environ={}).workers == (os.cpu_count() or 1)
    assert load_config(environ={}, overrides={"server.workers": 3}).workers == 3


def test_bad_value_in_file_and_env_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[limits]\nburst = 0\n")
    with pytest.raises(ConfigError, match="limits.burst"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="heartbeat.interval"):
        load_config(environ={"SHARDCHAT_HEARTBEAT_INTERVAL": "soon"})
    path.write_text("[limits\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})


def test_parse_override_reads_toml_values_and_bare_strings() -> None:
    assert parse_override("log.level=debug") == ("log.level", "debug")
    assert parse_override("server.port=81") == ("server.port", 81)
    assert parse_override("limits.rate=2.5") == ("limits.rate", 2.5)
    assert parse_override('server.origins=["http://a"]') == ("server.origins", ["http://a"])
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_env_errors_name_the_variable_the_user_set() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={"SHARDCHAT_HEARTBEAT_INTERVAL": "soon"})
    message = str(caught.value)
    assert "SHARDCHAT_HEARTBEAT_INTERVAL (heartbeat.interval)" in message
    assert caught.value.source == "SHARDCHAT_HEARTBEAT_INTERVAL"
    with pytest.raises(ConfigError, match="did you mean SHARDCHAT_HEARTBEAT_INTERVAL"):
        load_config(environ={"SHARDCHAT_HEARTBEAT_INTERVL": "5"})
