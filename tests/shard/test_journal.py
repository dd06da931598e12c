"""The journal a shard keeps for its successor: what it left open, read back after a
kill (a line cut short included), compaction, and ids that repeat per report."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardchat.shard import journal as journal_module
from shardchat.shard.journal import Journal, Leftover, read_leftovers


def test_leftovers_are_the_connections_left_open_with_their_rooms(tmp_path: Path) -> None:
    path = tmp_path / "shardchat.1.hooks.0"
    journal = Journal(path)
    journal.record("connect", 1, "ada", None)
    journal.record("join", 1, "ada", "lobby")
    journal.record("join", 1, "ada", "team")
    journal.record("leave", 1, "ada", "team")
    journal.record("connect", 2, "bob", None)
    journal.record("join", 2, "bob", "lobby")
    journal.record("leave", 2, "bob", "lobby")
    journal.record("disconnect", 2, "bob", None)
    journal.record("message", 1, "ada", "lobby")  # not journaled
    with path.open("ab") as cut:
        cut.write(b'["o", 3, "cu')  # the kill came mid-line
    pid, node, left = read_leftovers(path)
    assert pid == journal.pid and node == ""
    assert left == [Leftover(1, "ada", ("lobby",))]
    # A report made twice (or by two readers) carries the same ids.
    first = left[0].event_id(pid, node, "leave", "lobby")
    assert first == left[0].event_id(pid, node, "leave", "lobby")
    assert first != left[0].event_id(pid, node, "disconnect")
    journal.close(remove=True)
    assert not path.exists()
    assert read_leftovers(path) == (0, "", [])


def test_compaction_rewrites_the_live_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_AT", 200)
    path = tmp_path / "shardchat.1.hooks.0"
    journal = Journal(path)
    due = False
    for i in range(20):
        due |= journal.record("connect", i, f"u{i}", None)
        due |= journal.record("disconnect", i, f"u{i}", None)
    assert due
    journal.compact([(7, "live", ("r",))])
    assert path.stat().st_size < 200
    journal.record("join", 7, "live", "s")
    assert read_leftovers(path)[2] == [Leftover(7, "live", ("r", "s"))]
    journal.close(remove=False)
