"""The ``shardchat`` command line: a thin shim over the package.

Loads the configuration once and turns :class:`ShardchatError` into exit
codes: 2 for a configuration mistake, 1 for a server that cannot run.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from shardchat import __version__
from shardchat.configload import load_config, parse_override
from shardchat.core.config import Config, to_toml
from shardchat.core.errors import ConfigError, HookError, ShardchatError

__all__ = ["main"]


@dataclass(frozen=True, slots=True)
class ConfigFlags:
    """The flags every command that reads the configuration takes."""

    path: str | None
    workers: str | None
    host: str | None
    port: int | None
    app: str | None
    settings: tuple[str, ...]

    def load(self) -> Config:
        """The effective configuration; a mistake exits 2 with one line."""
        overrides: dict[str, object] = {}
        try:
            for item in self.settings:
                key, value = parse_override(item)
                overrides[key] = value
            if self.workers is not None:
                workers = self.workers
                overrides["server.workers"] = int(workers) if workers.isdigit() else workers
            if self.host is not None:
                overrides["server.host"] = self.host
            if self.port is not None:
                overrides["server.port"] = self.port
            if self.app is not None:
                overrides["server.app"] = self.app
            return load_config(self.path, overrides=overrides)
        except ConfigError as exc:
            click.echo(f"shardchat: {exc}", err=True)
            sys.exit(2)


def _config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the config flags to a command, handed to it as one ``flags`` argument."""

    @functools.wraps(func)
    def command(
        *args: Any,
        config_path: str | None,
        workers: str | None,
        host: str | None,
        port: int | None,
        app: str | None,
        settings: tuple[str, ...],
        **kwargs: Any,
    ) -> Any:
        flags = ConfigFlags(config_path, workers, host, port, app, settings)
        return func(*args, flags=flags, **kwargs)

    options = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False),
            help="Config file (default: ./config.toml when present).",
        ),
        click.option("--workers", help='Number of shards, or "auto" (one per CPU).'),
        click.option("--host", help="Listen address."),
        click.option("--port", type=int, help="WebSocket + HTTP port."),
        click.option("--app", help='Lifecycle hooks to load, "module:object".'),
        click.option(
            "--set",
            "settings",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="Set any config key; repeatable (e.g. --set heartbeat.interval=1).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group()
@click.version_option(__version__, prog_name="shardchat")
def main() -> None:
    """shardchat: a real-time WebSocket chat server, one shard per core."""


@main.command()
@_config_options
def start(flags: ConfigFlags) -> None:
    """Start the supervisor and its shards; SIGTERM or Ctrl-C drains and stops."""
    config = flags.load()
    from shardchat.logs import configure_logging
    from shardchat.supervisor.supervisor import Supervisor

    configure_logging(config.log.level, config.log.format)
    try:
        code = Supervisor(config).run()
    except (HookError, ConfigError) as exc:
        click.echo(f"shardchat: {exc}", err=True)
        sys.exit(2)
    except ShardchatError as exc:
        click.echo(f"shardchat: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


@main.command("config")
@_config_options
def show_config(flags: ConfigFlags) -> None:
    """Print the effective configuration as TOML (secrets redacted)."""
    click.echo(to_toml(flags.load()), nl=False)


@main.command()
@click.option(
    "--admin",
    "admin_url",
    help="The supervisor's admin address, host:port or a URL "
    "(default: server.host:server.admin_port of the configuration).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@_config_options
def status(admin_url: str | None, as_json: bool, flags: ConfigFlags) -> None:
    """Show each shard's pid, uptime, restarts, connections, rooms and mean delivery
    latency."""
    import json
    import urllib.error
    import urllib.request

    config = flags.load()
    if admin_url is None:
        admin_url = f"http://{config.server.admin_host}:{config.server.admin_port}"
    if "://" not in admin_url:
        admin_url = "http://" + admin_url  # host:port
    url = admin_url.rstrip("/") + "/status"
    request = urllib.request.Request(url)
    if config.server.admin_token:
        request.add_header("Authorization", f"Bearer {config.server.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            data = json.loads(response.read())
    except (urllib.error.URLError, OSError) as exc:
        click.echo(f"shardchat: cannot read {url}: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"supervisor pid {data['pid']}  epoch {data['epoch']}  up {data['uptime']:.0f} s")
    click.echo(
        f"{'shard':>5} {'pid':>8} {'alive':>5} {'uptime s':>9} {'restarts':>8} "
        f"{'conns':>7} {'rooms':>6} {'latency ms':>10}"
    )
    for shard in data["shards"]:
        click.echo(
            f"{shard['id']:>5} {shard['pid'] or '-':>8} {'yes' if shard['alive'] else 'no':>5} "
            f"{shard['uptime']:>9.0f} {shard['restarts']:>8} {shard['connections']:>7} "
            f"{shard['rooms']:>6} {shard['latency_ms']:>10.3f}"
        )
    totals = data["totals"]
    click.echo(
        f"total: {totals['connections']} connections, {totals['messages_published']} messages "
        f"published, {totals['frames_delivered']} frames delivered, {totals['restarts']} restarts"
    )
    broker = data.get("broker", {"kind": "shm", "healthy": True})
    if broker["kind"] == "redis":
        click.echo(
            f"broker redis {broker['redis']}  {'healthy' if broker['healthy'] else 'UNHEALTHY'}"
            f" ({broker['shards_connected']} shards connected)  rooms subscribed"
            f" {broker['subscribed_rooms']}  round trips {broker['round_trips']}  batch size"
            f" {broker['batch_size']}  errors {broker['errors']}  reconnects"
            f" {broker['reconnects']}"
        )
    else:
        click.echo(f"broker {broker['kind']}")


@main.command()
@click.option("--user", required=True, help="Your name (1-64 of [A-Za-z0-9_.:-]).")
@click.option("--room", required=True, help="The room to join.")
@click.option("--token", help="A signed token, when the server requires one.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Give up when the server cannot be reached for this many seconds.",
)
@click.option(
    "--cafile",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM CA bundle to verify a wss:// server with (default: the system's).",
)
@click.argument("url", required=False)
@_config_options
def chat(
    user: str,
    room: str,
    token: str | None,
    timeout: float,
    cafile: str | None,
    url: str | None,
    flags: ConfigFlags,
) -> None:
    """Chat in a room from the terminal: lines you type are sent, messages are printed.

    URL defaults to the server of the effective configuration (--config, the
    environment, --host/--port), e.g. ws://127.0.0.1:8080/ws (wss:// when the
    configuration has a TLS certificate). A wss:// URL connects over TLS.
    """
    from shardchat.client.terminal import run_chat

    if url is None:
        url = server_url(flags.load())
    sys.exit(run_chat(url, user, room, token, timeout, cafile))


def server_url(config: Config) -> str:
    """The WebSocket URL of the configured server, as a local client reaches it."""
    host = config.server.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    scheme = "wss" if config.server.tls_cert else "ws"
    return f"{scheme}://{host}:{config.server.port}/ws"


# Fields a `key=value` argument of `shardchat api` gives as a number, a flag or a list.
_API_INTS = frozenset({"limit", "since", "before"})
_API_FLAGS = frozenset({"reconnect"})
_API_LISTS = frozenset({"rooms"})


def api_params(args: tuple[str, ...]) -> dict[str, object]:
    """``key=value`` (a string; a number for limit/since/before, true/false for
    reconnect, comma-separated for rooms) and ``key:=JSON`` (any JSON value)."""
    import orjson

    params: dict[str, object] = {}
    for arg in args:
        if ":=" in arg and arg.index(":=") < arg.index("=") + 1:
            key, _, raw = arg.partition(":=")
            try:
                params[key] = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise click.BadParameter(f"{arg!r}: not JSON after :=") from None
            continue
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{arg!r}: expected key=value or key:=JSON")
        if key in _API_INTS and value.lstrip("-").isdigit():
            params[key] = int(value)
        elif key in _API_FLAGS and value.lower() in ("true", "false"):
            params[key] = value.lower() == "true"
        elif key in _API_LISTS:
            params[key] = [item for item in value.split(",") if item]
        else:
            params[key] = value
    return params


def api_url(config: Config) -> str:
    """The server API's base URL as a local client reaches it."""
    host, port = config.server.host, config.server.port
    if config.api.port:
        host, port = config.api.host, config.api.port
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"{'https' if config.server.tls_cert else 'http'}://{host}:{port}"


@main.command("api", context_settings={"ignore_unknown_options": True})
@click.argument("method")
@click.argument("params", nargs=-1)
@click.option("--url", help="The server's base URL (default: from the configuration).")
@_config_options
def api_command(method: str, params: tuple[str, ...], url: str | None, flags: ConfigFlags) -> None:
    """Call the server API: shardchat api METHOD key=value ... (key:=JSON for JSON).

    The key comes from the configuration (api.key, or SHARDCHAT_API_KEY). E.g.
    shardchat api publish room=lobby content="deploy at 5";
    shardchat api disconnect user=mallory; shardchat api presence room=lobby.
    Prints the result as JSON; a refusal prints its code and message and exits 1.
    """
    import orjson

    from shardchat.api import ApiClient, ApiError

    config = flags.load()
    if not config.api.key:
        click.echo("shardchat: api.key is not set (SHARDCHAT_API_KEY)", err=True)
        sys.exit(2)
    body = api_params(params)
    try:
        with ApiClient(url or api_url(config), config.api.key) as client:
            result = client.call(method, body)
    except ApiError as exc:
        click.echo(f"shardchat: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"shardchat: cannot reach the server: {exc}", err=True)
        sys.exit(1)
    click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


@main.command()
@click.option(
    "--compact",
    is_flag=True,
    help="Rewrite every store file to give back the space of deleted messages "
    "(VACUUM; the server must be stopped).",
)
@_config_options
def storage(flags: ConfigFlags, compact: bool) -> None:
    """Show the room store of storage.dir: its size, rooms, messages and oldest message."""
    from datetime import UTC, datetime
    from pathlib import Path

    from shardchat.storage.boxdir import compact as compact_dir
    from shardchat.storage.boxdir import describe

    config = flags.load()
    directory = Path(config.storage.dir)
    if config.storage.kind != "sqlite":
        click.echo(f"storage.kind is {config.storage.kind!r}: nothing is stored")
        return
    if not directory.is_dir():
        click.echo(f"{directory}: no store yet (made at the first start)")
        return
    if compact:
        try:
            freed = compact_dir(directory)
        except ShardchatError as exc:
            click.echo(f"shardchat: {exc}", err=True)
            sys.exit(1)
        click.echo(f"compacted: {freed:,} bytes given back")
    meta, files = describe(directory)
    click.echo(f"storage.dir {directory}  epoch {meta.get('epoch')}  workers {meta.get('workers')}")
    for f in files:
        oldest = (
            "-"
            if f.oldest is None
            else datetime.fromtimestamp(f.oldest, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        )
        click.echo(
            f"{f.name}: {f.bytes:,} bytes, {f.rooms:,} rooms, {f.messages:,} messages,"
            f" oldest {oldest}"
        )
    total = sum(f.bytes for f in files)
    rooms = sum(f.rooms for f in files)
    messages = sum(f.messages for f in files)
    click.echo(f"total: {total:,} bytes, {rooms:,} rooms, {messages:,} messages")


@main.command()
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Also the rings of a crashed server with a room store (the messages its"
    " store lacks: its next start would store them).",
)
@_config_options
def cleanup(flags: ConfigFlags, everything: bool) -> None:
    """Remove shared memory left in /dev/shm by supervisors that are gone, and the
    store files a start set aside as unreadable (storage.dir)."""
    from pathlib import Path

    from shardchat.brokers.segments import sweep_stale
    from shardchat.storage.boxdir import set_aside

    removed = [f"/dev/shm/{name}" for name in sweep_stale(keep_stored=not everything)]
    config = flags.load()
    if config.storage.kind == "sqlite":
        for path in set_aside(Path(config.storage.dir)):
            path.unlink(missing_ok=True)
            removed.append(str(path))
    for name in removed:
        click.echo(f"removed {name}")
    if not removed:
        click.echo("nothing to remove")


if __name__ == "__main__":
    main()
