"""The configuration's pure validation (shardchat.core.config.resolve), with a clear
error for each kind of mistake; the loader's own tests are tests/test_configload.py."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from shardchat.cli import main
from shardchat.configload import load_config
from shardchat.core.config import resolve, to_toml
from shardchat.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent.parent


def test_resolve_reads_nothing_of_the_machine(tmp_path: Path) -> None:
    """The pure half: the CPU count and the file test are what it is given, not the
    machine's (the loader hands in os.cpu_count() and Path.is_file)."""
    real = tmp_path / "cert.pem"
    real.write_text("x")
    asked: list[str] = []

    def is_file(path: str) -> bool:
        asked.append(path)
        return path == "/given/cert.pem"

    tls = {"server.tls_cert": "/given/cert.pem", "server.tls_key": "/given/cert.pem"}
    config = resolve(tls, cpu_count=37, is_file=is_file)
    assert config.workers == 37 and config.server.tls_cert == "/given/cert.pem"
    assert asked == ["/given/cert.pem", "/given/cert.pem"]
    with pytest.raises(ConfigError, match="path of a readable file"):
        resolve({"server.tls_cert": str(real)}, cpu_count=1, is_file=is_file)
    # The loader's own file test: a file there is one, a missing one is not.
    assert load_config(environ={}, overrides={"auth.jwks_file": str(real)})
    with pytest.raises(ConfigError, match="path of a readable file"):
        load_config(environ={}, overrides={"auth.jwks_file": str(tmp_path / "gone")})
    env = {"SHARDCHAT_AUTH_JWKS_FILE": str(tmp_path / "gone")}
    with pytest.raises(ConfigError) as caught:
        load_config(environ=env)
    assert caught.value.source == "SHARDCHAT_AUTH_JWKS_FILE"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("server.nope", 1, "unknown key"),
        ("nosection.port", 1, "unknown key"),
        ("server.port", "8080x", "integer from 1 to 65535"),
        ("server.port", 0, "integer from 1 to 65535"),
        ("server.port", 65536, "integer from 1 to 65535"),
        ("server.workers", 0, '"auto" or an integer'),
        ("server.workers", "many", '"auto" or an integer'),
        ("server.workers", True, '"auto" or an integer'),
        ("limits.rate", "fast", "a number > 0"),
        ("limits.rate", 0, "a number > 0"),
        ("heartbeat.idle_timeout", -1, "a number >= 0"),
        ("ring.bytes", 100_000, "power of two"),
        ("log.level", "loud", "one of"),
        ("server.origins", "https://x", "list of origin strings"),
        ("server.backlog", 0, "integer from 1 to 65535"),
        ("server.backlog", 65536, "integer from 1 to 65535"),
        ("server.backlog", "deep", "integer from 1 to 65535"),
        ("overload.forwards", 0, "integer >= 1"),
        ("overload.forwards", "many", "integer >= 1"),
        ("overload.backlog", 100, "integer >= 4096"),
        ("overload.pipeline", 0, "integer >= 1"),
        ("overload.pipeline", 1.5, "integer >= 1"),
        ("overload.turn_bytes", 4095, "integer >= 4096"),
        ("overload.store", 0, "integer >= 1"),
        ("overload.retry_after", 0, "a number > 0"),
        ("overload.retry_after", "soon", "a number > 0"),
        ("storage.kind", "disk", "one of 'sqlite', 'memory'"),
        ("storage.dir", 5, "a string"),
        ("storage.fsync", "sometimes", "one of 'always', 'batch', 'off'"),
        ("storage.max_bytes", -1, "integer >= 0"),
        ("storage.max_bytes", "1G", "integer >= 0"),
        ("storage.write_every", -0.01, "a number >= 0"),
        ("storage.write_every", "soon", "a number >= 0"),
        ("delivery.history_ttl", -5, "a number >= 0"),
        ("delivery.history_memory", 0, "integer from 1 to 1000000"),
        ("delivery.history_memory", "all", "integer from 1 to 1000000"),
        ("delivery.gap_give_up", 0, "a number > 0"),
        ("api.host", "not a host!", "host name or an IP address"),
        ("api.port", 70000, "integer from 0 to 65535"),
        ("api.sender", "two words", "a user name"),
        ("api.sender", "", "a user name"),
    ],
)
def test_each_mistake_names_key_value_and_allowed(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, overrides={key: value})
    message = str(info.value)
    assert key in message and repr(value) in message and words in message
    assert "\n" not in message


def test_api_key_is_checked_and_never_printed() -> None:
    for bad in ("short", "x" * 257, "sixteen chars ok but spaces"):
        with pytest.raises(ConfigError) as info:
            load_config(environ={}, overrides={"api.key": bad})
        assert "api.key" in str(info.value) and bad not in str(info.value)
    env = {"SHARDCHAT_API_KEY": "k" * 20}
    config = load_config(environ=env)
    assert config.api.key == "k" * 20
    assert "k" * 20 not in to_toml(config)
    with pytest.raises(ConfigError, match="set together"):
        load_config(environ={}, overrides={"api.host": "127.0.0.1"})
    with pytest.raises(ConfigError, match="set together"):
        load_config(environ={}, overrides={"api.port": 9000})
    with pytest.raises(ConfigError, match="must differ"):
        load_config(environ={}, overrides={"api.host": "127.0.0.1", "api.port": 8080})


def test_max_frame_must_fit_the_ring() -> None:
    with pytest.raises(ConfigError, match="limits.max_frame"):
        load_config(environ={}, overrides={"ring.bytes": 1 << 16, "limits.max_frame": 65536})


@given(
    port=st.integers(1, 65535),
    rate=st.floats(0.01, 1e6),
    history=st.integers(0, 1_000_000),
    origins=st.lists(st.text("abc:/.", min_size=1, max_size=10), max_size=3),
)
def test_printed_config_round_trips(
    port: int, rate: float, history: int, origins: list[str]
) -> None:
    """`shardchat config` output loads back to the same configuration."""
    config = load_config(
        environ={},
        overrides={
            "server.port": port,
            "limits.rate": rate,
            "delivery.history": history,
            "server.origins": origins,
        },
    )
    values = tomllib.loads(to_toml(config))
    flat = {f"{s}.{k}": v for s, table in values.items() for k, v in table.items()}
    assert load_config(environ={}, overrides=flat) == config


def test_cli_config_command_and_exit_code() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["config", "--workers", "3", "--set", "log.level=debug"], env={})
    assert result.exit_code == 0
    printed = tomllib.loads(result.output)
    assert printed["server"]["workers"] == 3 and printed["log"]["level"] == "debug"
    result = runner.invoke(main, ["config", "--set", "limits.burst=-1"])
    assert result.exit_code == 2


def test_broker_and_redis_settings() -> None:
    assert load_config(environ={}).broker.kind == "shm"
    config = load_config(
        environ={},
        overrides={
            "broker.kind": "redis",
            "redis.url": "rediss://:hunter2@10.0.0.5:6380/1",
            "redis.cluster": ["10.0.0.5:7000", "redis-b:7001"],
            "presence.ttl": 5,
        },
    )
    assert config.broker.kind == "redis"
    assert config.redis.cluster == ("10.0.0.5:7000", "redis-b:7001")
    assert config.presence.ttl == 5.0
    printed = to_toml(config)
    assert "hunter2" not in printed and "10.0.0.5:6380/1" in printed
    for key, value, words in [
        ("broker.kind", "kafka", "'shm', 'redis'"),
        ("redis.url", "http://x", "redis://"),
        ("redis.cluster", ["nohost"], "host:port"),
        ("redis.prefix", "a{b}", "no braces"),
        ("presence.ttl", 0, ">= 0.5"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(environ={}, overrides={key: value})
        assert key in str(info.value) and words in str(info.value)


def test_unknown_keys_get_a_did_you_mean_not_every_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"heartbeat.intervall": 5})
    message = str(caught.value)
    assert "did you mean heartbeat.interval" in message and len(message) < 200
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, overrides={"zzz.qqq": 5})
    assert "shardchat config" in str(caught.value) and len(str(caught.value)) < 200
