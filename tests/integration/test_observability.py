"""/metrics (parsed with prometheus-client's own parser), /status, `shardchat status`,
and logs that follow one message across shards."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.helpers import (
    SHARDCHAT,
    Server,
    clients_on_shards,
    closing,
    room_owned_by,
    running_server,
    scrape,
)


def total(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
    return sum(metrics.get(name, {}).values())


async def test_metrics_count_a_known_workload() -> None:
    """10 clients in one room on 3 shards, 100 messages: published 100, delivered 1000,
    connections per shard sum to 10; after kill -9 of a shard, restarts = 1."""
    with running_server(workers=3) as srv:
        clients = await clients_on_shards(srv.url, [0, 1, 2] * 3 + [0], prefix="m")
        async with closing(clients):
            for client in clients:
                await client.join("metered")
            for i in range(100):
                sender = clients[i % 10]
                await sender.send(type="message", room="metered", content=f"m{i}", id=f"m{i}")
            for client in clients:
                got = 0
                while got < 100:
                    if (await client.recv())["type"] == "message":
                        got += 1
            metrics = scrape(srv)
            assert total(metrics, "shardchat_messages_published_total") == 100
            assert total(metrics, "shardchat_messages_sequenced_total") == 100
            assert total(metrics, "shardchat_frames_delivered_total") == 100 * 10
            assert total(metrics, "shardchat_connections") == 10
            per_shard = metrics["shardchat_connections"]
            assert {dict(k)["shard"]: v for k, v in per_shard.items()} == {"0": 4, "1": 3, "2": 3}
            assert total(metrics, "shardchat_joins_total") == 10
            assert metrics["shardchat_delivery_latency_seconds_count"][()] >= 100
            # /status's per-shard means: the summed histogram's mean lies between them.
            means = [shard["latency_ms"] for shard in srv.status()["shards"]]
            mean = metrics["shardchat_delivery_latency_seconds_sum"][()] * 1000
            mean /= metrics["shardchat_delivery_latency_seconds_count"][()]
            assert all(m > 0 for m in means), means
            assert min(means) - 0.001 <= mean <= max(means) + 0.001, (means, mean)
            assert total(metrics, "shardchat_ring_records_read_total") > 0
            os.kill(srv.shard_pids()[1], signal.SIGKILL)
            srv.wait_started(4)
            after = scrape(srv)
            assert total(after, "shardchat_shard_restarts_total") == 1
            assert after["shardchat_shard_restarts_total"][(("shard", "1"),)] == 1
            assert total(after, "shardchat_connections") == 7


async def test_error_and_close_codes_are_counted() -> None:
    with running_server(workers=1) as srv:
        (client,) = await clients_on_shards(srv.url, [0], prefix="e")
        await client.ws.send("not json")
        await client.recv_type("error")
        await client.close()
        srv.wait_for_log(lambda ev: any(e.get("event") == "conn_close" for e in ev))
        metrics = scrape(srv)
        assert metrics["shardchat_errors_total"][(("code", "bad_json"),)] == 1
        assert metrics["shardchat_connections_closed_total"][(("code", "1000"),)] == 1


def test_status_lists_every_shard_with_a_live_pid(server: Server) -> None:
    status = server.status()
    assert [s["id"] for s in status["shards"]] == [0, 1, 2]
    for shard in status["shards"]:
        assert shard["alive"] and shard["pid"] > 0
        os.kill(shard["pid"], 0)  # a live process
        # Read from the shard's own stats block: it started after the supervisor.
        assert 0 < shard["uptime"] <= status["uptime"] and shard["restarts"] == 0
    result = subprocess.run(
        [SHARDCHAT, "status", "--admin", f"http://127.0.0.1:{server.admin_port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["shard", "pid", "alive"]
    assert lines[1].split()[-2:] == ["latency", "ms"]
    for shard in status["shards"]:
        assert any(line.split()[:2] == [str(shard["id"]), str(shard["pid"])] for line in lines)
    # host:port works as well as a URL.
    plain = subprocess.run(
        [SHARDCHAT, "status", "--admin", f"127.0.0.1:{server.admin_port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert plain.returncode == 0 and plain.stdout.splitlines()[1:][:1] == lines[1:2]


async def test_debug_logs_follow_a_message_across_shards() -> None:
    """Published on a shard that does not own the room: the same message id appears in
    the log lines of the publishing shard and of the owner."""
    with running_server(workers=3, settings=["log.level=debug"]) as srv:
        room = room_owned_by(2, prefix="trace")
        (sender,) = await clients_on_shards(srv.url, [0], prefix="t")
        async with closing([sender]):
            await sender.join(room)
            await sender.send(type="message", room=room, content="follow me", id="f")
            message = await sender.recv_type("message")
        msg_id = message["id"]
        events = srv.wait_for_log(
            lambda ev: {e["shard"] for e in ev if e.get("msg") == msg_id} >= {0, 2}
        )
        lines = [e for e in events if e.get("msg") == msg_id]
        assert {(e["shard"], e["event"]) for e in lines} >= {(0, "publish"), (2, "sequenced")}
        for line in lines:
            assert {"ts", "level", "shard", "event", "room"} <= set(line)
        opens = [e for e in events if e.get("event") == "conn_open"]
        assert opens and {"conn", "user", "peer"} <= set(opens[0])
        await asyncio.sleep(0)


def test_metrics_follow_prometheus_conventions(server: Server) -> None:
    """Every counter sample ends in _total, units come last, and there are build info
    and process metrics for the supervisor and each shard."""
    url = f"http://127.0.0.1:{server.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    counters = [f for f in families if f.type == "counter"]
    assert len(counters) >= 20
    for family in counters:
        for sample in family.samples:
            assert sample.name.endswith(("_total", "_created")), sample.name
    names = {s.name for f in families for s in f.samples}
    assert "shardchat_delivered_bytes_total" in names and "shardchat_bytes_out_total" not in names
    build = next(f for f in families if f.name.startswith("shardchat_build"))
    # (the text format writes an info metric as a gauge of 1 with the labels)
    assert build.samples[0].name == "shardchat_build_info" and build.samples[0].value == 1
    assert build.samples[0].labels["version"]
    by_name = {f.name: f for f in families}
    expected = {"supervisor", "shard-0", "shard-1", "shard-2"}
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds"):
        samples = by_name[name].samples
        assert {s.labels["process"] for s in samples} == expected, name
        assert all(s.value > 0 for s in samples if name != "process_cpu_seconds"), name
    rss = {s.labels["process"]: s.value for s in by_name["process_resident_memory_bytes"].samples}
    assert all(value > 1 << 20 for value in rss.values())  # at least a MiB: a real reading


def test_log_lines_have_a_message_and_one_type_of_shard(server: Server) -> None:
    events = server.log_events()
    assert {e["process"] for e in events} == {"supervisor", "shard"}
    for event in events:
        assert isinstance(event["message"], str) and event["message"].startswith(event["event"])
        if event["process"] == "shard":
            assert type(event["shard"]) is int
        else:
            assert "shard" not in event
    start = next(e for e in events if e["event"] == "supervisor_start")
    assert f"pid={start['pid']}" in start["message"]
