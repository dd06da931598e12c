"""The only configuration loader: what the configuration reads of the machine.

Precedence, lowest first: built-in defaults < config file (``--config PATH``,
else ``./config.toml`` when present) < ``SHARDCHAT_<SECTION>_<KEY>``
environment variables < command-line overrides. The values, the CPU count
(``server.workers = "auto"``) and a file test for the TLS and key paths go
to :func:`shardchat.core.config.resolve`, whose frozen :class:`Config` is
resolved once in the supervisor and inherited by the shards through fork.
Every wrong value raises :class:`ConfigError` naming the key, the value and
what is allowed (and the environment variable, when one set it).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

from shardchat.core.config import ENV_PREFIX, SECTIONS, Config, resolve
from shardchat.core.errors import ConfigError

__all__ = ["DEFAULT_CONFIG_FILE", "load_config", "parse_override"]

DEFAULT_CONFIG_FILE = "config.toml"


def parse_override(text: str) -> tuple[str, object]:
    """Parse ``section.key=value`` (a ``--set`` flag) into the key and its value.

    The value is read as a TOML value when it is one (``3``, ``1.5``,
    ``["a", "b"]``, ``true``) and taken as a plain string otherwise, so that
    ``--set log.level=debug`` needs no quotes.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(text, text, "--set takes section.key=value")
    return key.strip(), _parse_scalar(raw.strip())


def _parse_scalar(raw: str) -> object:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, object]]:
    """``section.key`` -> (the variable that set it, its value)."""
    out: dict[str, tuple[str, object]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS:
            # SHARDCHAT_* variables of other tools (e.g. SHARDCHAT_TEST_*) are not ours.
            continue
        out[f"{section}.{key}"] = (name, _parse_scalar(raw))
    return out


def _file_values(path: Path) -> dict[str, object]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("--config", str(path), f"cannot be read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"is not valid TOML ({exc})") from exc
    out: dict[str, object] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(section, table, "must be a [section] table")
        for key, value in table.items():
            out[f"{section}.{key}"] = value
    return out


def _is_file(path: str) -> bool:
    return Path(path).is_file()


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Resolve the effective configuration.

    Args:
        path: the config file; ``None`` reads ``./config.toml`` when it exists.
        overrides: ``section.key`` values from command-line flags.
        environ: the environment to read ``SHARDCHAT_*`` from (``os.environ``).

    Raises:
        ConfigError: an unknown key, a wrong type or an out-of-range value.
    """
    values: dict[str, object] = {}
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        values.update(_file_values(Path(path)))
    in_file = values.get("storage.dir")
    sources: dict[str, str] = {}  # keys set by an environment variable: its name
    for key, (variable, value) in _env_overrides(
        os.environ if environ is None else environ
    ).items():
        values[key] = value
        sources[key] = variable
    for key, value in (overrides or {}).items():
        values[key] = value
        sources.pop(key, None)
    # storage.dir: "" is data/ beside the configuration file (the working
    # directory without one); a relative one is taken from the file's directory
    # when the file set it, else from the working directory.
    storage_dir = values.get("storage.dir", "")
    if isinstance(storage_dir, str):
        beside = path is not None and (not storage_dir or storage_dir == in_file)
        base = Path(path).resolve().parent if beside and path is not None else Path.cwd()
        values["storage.dir"] = str(base / (storage_dir or "data"))
    return resolve(values, sources=sources, cpu_count=os.cpu_count() or 1, is_file=_is_file)
