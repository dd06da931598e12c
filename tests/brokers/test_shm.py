"""One box's shared-memory broker: what its rings and seq tables promise the
readers, on engines wired by in-memory rings (tests/core/box.py)."""

from __future__ import annotations

from shardchat import stats
from tests.core.box import Box, Client, config, room_owned_by

FAST = {"limits__rate": 100_000.0, "limits__burst": 100_000}
BODY = "y" * 1000  # a message of about 1 KB: a burst crosses the broker's commit size


def burst_ending_in_a_commit(box: Box, alice: Client, room: str, least: int) -> int:
    """Publish at least ``least`` messages in one turn, stopping right after one whose
    write committed the ring (a burst commits every eighth of a ring); the count."""
    writer = box.brokers[alice.shard].writer
    count = 0
    while count < least or writer.uncommitted:
        count += 1
        box.send(alice, type="message", room=room, content=f"{count}:{BODY}")
    return count


class TestSeqTable:
    def test_the_table_names_every_message_a_commit_made_visible(self) -> None:
        box = Box(2, config(**FAST))
        room = room_owned_by(0, 2)
        alice = box.connect(0, "alice")
        box.join(alice, room)
        count = burst_ending_in_a_commit(box, alice, room, 1)
        assert not box.brokers[0].writer.uncommitted  # the last record is in the ring
        # Read by the other shard before the owner's turn ends.
        assert box.brokers[1].latest_seq(room) == count


class TestLappedReader:
    def test_a_lapped_reader_gets_the_last_message_of_a_burst(self) -> None:
        """The reader resumes after the burst, with nothing published after it: the
        fill it asks for runs to the last message."""
        box = Box(2, config(**FAST))
        room = room_owned_by(0, 2)
        alice = box.connect(0, "alice")
        bob = box.connect(1, "bob")
        for client in (alice, bob):
            box.join(client, room)
        box.stopped.add(1)
        count = burst_ending_in_a_commit(box, alice, room, 100)  # about two rings
        box.turn()
        box.stopped.discard(1)
        box.turn()
        assert box.stats[1][stats.Slot.RING_LAPS] >= 1
        assert bob.seqs(room) == list(range(1, count + 1))
        assert not box.engines[1].gaps.parked
