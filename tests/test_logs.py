"""shardchat.logs: one JSON object per line with a stable ``event`` and its fields;
``shard`` appears on shards' lines only, always an integer."""

from __future__ import annotations

import logging

import orjson
import pytest

from shardchat.logs import ConsoleFormatter, JsonFormatter, log_event, set_process_role


def record(event: str, **fields: object) -> logging.LogRecord:
    out = logging.LogRecord("t", logging.INFO, __file__, 1, event, None, None)
    out.fields = fields
    return out


@pytest.fixture(autouse=True)
def supervisor() -> None:
    set_process_role(None)


def test_a_line_is_one_json_object_with_the_event_and_its_fields() -> None:
    line = JsonFormatter().format(record("conn_open", conn=7, user="ada"))
    obj = orjson.loads(line)
    assert "\n" not in line
    assert obj["event"] == "conn_open" and obj["conn"] == 7 and obj["user"] == "ada"
    assert obj["level"] == "info" and obj["process"] == "supervisor" and "shard" not in obj
    assert obj["message"] == "conn_open conn=7 user=ada"
    assert obj["ts"].endswith("Z")


def test_a_shards_lines_carry_its_id_as_an_integer() -> None:
    set_process_role(2)
    obj = orjson.loads(JsonFormatter().format(record("shard_start")))
    assert obj["process"] == "shard" and obj["shard"] == 2
    assert "[2] shard_start" in ConsoleFormatter().format(record("shard_start"))


def test_long_values_stay_out_of_the_message_but_not_out_of_the_line() -> None:
    config = "x" * 200
    obj = orjson.loads(JsonFormatter().format(record("config", config=config)))
    assert obj["message"] == "config" and obj["config"] == config


def test_a_disabled_level_builds_no_record(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("shardchat.test_logs")
    with caplog.at_level(logging.INFO, logger="shardchat.test_logs"):
        log_event(logger, logging.DEBUG, "noisy", n=1)
        log_event(logger, logging.INFO, "kept", n=2)
    assert [(r.getMessage(), r.fields) for r in caplog.records] == [("kept", {"n": 2})]  # type: ignore[attr-defined]
