"""The room engine, Sans-I/O: requests, records and times in; frames, records and
closes out. Several engines wired by in-memory rings stand for the shards of one
box (tests/core/box.py), in the manner of websockets' tests/integration/test_protocol.py."""

from __future__ import annotations

import time
from typing import Any

from shardchat import stats
from shardchat.auth import make_token
from shardchat.brokers.forwarding import FORWARD_RETRY
from shardchat.brokers.presence_holders import holders_of
from shardchat.core.admission import Refusal
from shardchat.core.engine import EVICT_EVERY
from shardchat.core.errors import ErrorCode
from shardchat.core.gapfill import GAP_GIVE_UP, GAP_TIMEOUT
from shardchat.core.outputs import Close
from shardchat.hooks import Reject
from tests.core.box import (
    Box,
    Client,
    config,
    covered,
    owner_and_peer,
    published_room,
    room_owned_by,
)

FAST = {"limits__rate": 100_000.0, "limits__burst": 100_000}


def messages(client: Client, room: str | None = None) -> list[dict[str, Any]]:
    return [f for f in client.frames if f["type"] == "message" and room in (None, f["room"])]


def errors(client: Client) -> list[str]:
    return [f["code"] for f in client.take("error")]


def error_count(box: Box, shard: int, code: ErrorCode) -> int:
    return box.stats[shard][stats.error_slot(code)]


# Sequencing


class TestSequencing:
    def test_owner_sequences_publishes_from_every_shard_in_one_order(self) -> None:
        box = Box(3)
        room = room_owned_by(0, 3)
        clients = [box.connect(shard, f"u{shard}") for shard in (0, 1, 2)]
        for client in clients:
            box.join(client, room)
        for i, client in enumerate(clients * 2):
            box.send(client, type="message", room=room, content=f"m{i}", id=f"r{i}")
            box.turn()
        acks = [(a["id"], a["seq"]) for c in clients for a in c.take("ack")]
        assert sorted(seq for _, seq in acks) == [1, 2, 3, 4, 5, 6]
        contents = [[m["content"] for m in messages(c, room)] for c in clients]
        assert contents[0] == [f"m{i}" for i in range(6)]
        assert contents[0] == contents[1] == contents[2]
        assert [c.seqs(room) for c in clients] == [[1, 2, 3, 4, 5, 6]] * 3

    def test_the_ack_follows_the_commit_of_the_record(self) -> None:
        box = Box(2)
        room = room_owned_by(0, 2)
        alice = box.connect(0, "alice")
        box.join(alice, room)
        box.send(alice, type="message", room=room, content="hi")
        assert alice.take("ack") == []  # sequenced, not yet in the ring
        assert box.brokers[0].commit_due
        box.turn()
        (ack,) = alice.take("ack")
        assert ack["seq"] == 1
        assert box.brokers[0].writer.tail > 0

    def test_seq_continues_after_the_owner_restarts(self) -> None:
        box = Box(2)
        room, _, bob = owner_and_peer(box, None)
        box.publish(bob, room, 3)
        box.turn()
        box.restart(0)
        box.turn()
        alice = box.connect(0, "alice")
        joined = box.join(alice, room, since=0)
        assert joined["seq"] == 3 and joined["recovered"]
        assert [m["content"] for m in messages(alice, room)] == ["0", "1", "2"]
        box.send(alice, type="message", room=room, content="after")
        box.turn()
        assert bob.seqs(room) == [1, 2, 3, 4]
        assert alice.seqs(room) == [1, 2, 3, 4]

    def test_seq_continues_from_the_seq_table_when_the_ring_forgot(self) -> None:
        box = Box(2, config(**FAST))
        room = room_owned_by(0, 2)
        other = room_owned_by(0, 2, prefix="filler")
        alice = box.connect(0, "alice", query=f"room={room}&room={other}")
        box.turn()
        box.send(alice, type="message", room=room, content="first")
        box.turn()
        # Enough traffic in another room to overwrite the whole ring.
        for i in range(400):
            box.send(alice, type="message", room=other, content="x" * 300, id=str(i))
            box.turn()
        box.restart(0)
        carol = box.connect(0, "carol")
        joined = box.join(carol, room, since=0)
        assert joined["seq"] == 1  # from the seq table: the ring no longer holds it
        assert not joined["recovered"]
        box.send(carol, type="message", room=room, content="second")
        box.turn()
        assert carol.seqs(room) == [2]


# Forwarding


class TestForwarding:
    def test_a_forward_is_retried_and_sequenced_once(self) -> None:
        box = Box(2)
        room, watcher, bob = owner_and_peer(box)
        box.stopped.add(0)  # the owner does not read: the forward waits
        box.send(bob, type="message", room=room, content="once", id="p1")
        box.advance(FORWARD_RETRY)  # forwarded again
        assert box.stats[1][stats.Slot.FORWARDS_RETRIED] == 1
        box.stopped.discard(0)
        box.turn()  # the owner reads both copies
        assert [m["content"] for m in messages(watcher, room)] == ["once"]
        assert [m["content"] for m in messages(bob, room)] == ["once"]
        assert [(a["id"], a["seq"]) for a in bob.take("ack")] == [("p1", 1)]
        assert box.stats[0][stats.Slot.MESSAGES_SEQUENCED] == 1

    def test_a_retry_after_the_sequenced_copy_was_read_gets_the_same_seq(self) -> None:
        box = Box(2)
        room, _, bob = owner_and_peer(box, None)
        box.send(bob, type="message", room=room, content="x", id="p1")
        box.turn()
        (ack,) = bob.take("ack")
        # The owner answers a duplicate (a lost answer) with the seq it gave.
        seen = box.brokers[0].sequencer.seen(messages(bob)[0]["id"])
        assert seen == (room, ack["seq"])

    def test_an_owner_that_never_answers_gives_unavailable(self) -> None:
        box = Box(2)
        room, _, bob = owner_and_peer(box, None)
        box.stopped.add(0)
        box.send(bob, type="message", room=room, content="lost", id="p1")
        timeout = box.config.delivery.publish_timeout
        box.advance(timeout / 2)
        assert bob.take("error") == []
        box.advance(timeout / 2)
        (error,) = bob.take("error")
        assert (error["code"], error["id"]) == ("unavailable", "p1")
        assert error_count(box, 1, ErrorCode.UNAVAILABLE) == 1
        assert bob.closed is None

    def test_a_forward_whose_sender_left_is_still_sequenced(self) -> None:
        box = Box(2)
        room, watcher, bob = owner_and_peer(box)
        box.stopped.add(0)
        box.send(bob, type="message", room=room, content="bye")
        box.close(bob)
        box.stopped.discard(0)
        box.turn()
        assert [m["content"] for m in messages(watcher, room)] == ["bye"]

    def test_a_publish_retried_with_its_key_is_sequenced_once(self) -> None:
        box = Box(2)
        room = room_owned_by(0, 2)
        for shard in (0, 1):  # on the owner, and forwarded
            client = box.connect(shard, f"retry{shard}")
            box.join(client, room)
            box.send(client, type="message", room=room, content="once", key=f"k{shard}")
            box.turn()
            box.send(client, type="message", room=room, content="once", key=f"k{shard}")
            box.turn()
            acks = [a["seq"] for a in client.take("ack")]
            assert len(acks) == 2 and acks[0] == acks[1]
            assert [m["seq"] for m in messages(client)].count(acks[0]) == 1
        other = box.connect(1, "other")  # the key is per user: the same key is new
        box.join(other, room)
        box.send(other, type="message", room=room, content="mine", key="k1")
        box.turn()
        assert [a["seq"] for a in other.take("ack")] == [3]

    def test_a_reused_request_id_is_never_taken_for_a_retry(self) -> None:
        """``id`` is a request id: a client numbering its requests per connection
        reuses "1" in another room and on a new connection, and every message is
        delivered, each ack naming the room of its own request."""
        box = Box(2)
        room_a, room_b = room_owned_by(0, 2), room_owned_by(1, 2)
        ada = box.connect(0, "ada")
        box.join(ada, room_a)
        box.send(ada, type="message", room=room_a, content="first in A", id="1")
        box.turn()
        assert ada.take("ack") == [{"type": "ack", "room": room_a, "seq": 1, "id": "1"}]
        for shard in (0, 1):
            again = box.connect(shard, "ada")
            bob = box.connect(1 - shard, "bob")
            box.join(again, room_b)
            box.join(bob, room_b)
            box.send(again, type="message", room=room_b, content=f"hello B{shard}", id="1")
            box.turn()
            (ack,) = again.take("ack")
            assert ack["room"] == room_b and ack["id"] == "1"
            assert [m["content"] for m in messages(bob, room_b)][-1] == f"hello B{shard}"
            box.close(bob)
        box.send(ada, type="message", room=room_a, content="again in A", id="1")
        box.turn()
        assert [a["seq"] for a in ada.take("ack")] == [2]

    def test_the_same_key_in_another_room_is_a_new_message(self) -> None:
        box = Box(2)
        rooms = [room_owned_by(0, 2), room_owned_by(1, 2)]
        ada = box.connect(0, "ada")
        for room in rooms:
            box.join(ada, room)
            box.send(ada, type="message", room=room, content="x", key="k")
            box.turn()
        acks = ada.take("ack")
        assert [(a["room"], a["seq"]) for a in acks] == [(rooms[0], 1), (rooms[1], 1)]

    def test_a_retry_after_unavailable_is_delivered_once(self) -> None:
        box = Box(2)
        room, watcher, bob = owner_and_peer(box)
        box.stopped.add(0)
        box.send(bob, type="message", room=room, content="x", id="p1", key="p1")
        box.advance(box.config.delivery.publish_timeout)
        assert [e["code"] for e in bob.take("error")] == ["unavailable"]
        box.stopped.discard(0)  # the owner reads the forwards after all
        box.send(bob, type="message", room=room, content="x", id="p1", key="p1")
        box.turn()
        assert [m["content"] for m in messages(watcher, room)] == ["x"]
        assert [a["seq"] for a in bob.take("ack")] == [1]

    def test_acked_messages_survive_a_kill_in_the_acking_turn(self) -> None:
        box = Box(2)
        room = room_owned_by(0, 2)
        pub = box.connect(0, "pub")
        box.join(pub, room)
        box.publish(pub, room, 10)
        box.commit(0)  # the end of the turn's commit: the acks leave now
        acked = [a["seq"] for a in pub.take("ack")]
        box.send(pub, type="message", room=room, content="not acked")
        box.restart(0)  # killed before the next commit
        assert acked == list(range(1, 11))
        watcher = box.connect(1, "watcher")
        joined = box.join(watcher, room, since=0, epoch="epoch-1")
        assert joined["recovered"] and joined["seq"] == 10
        assert watcher.seqs(room) == acked
        writer = box.connect(0, "writer")
        box.join(writer, room)
        box.send(writer, type="message", room=room, content="next")
        box.turn()
        # The unacked record was padded over and its seq never reached the table:
        # the room goes on at 11, with no gap anyone has to give up on.
        assert watcher.seqs(room) == [*acked, 11]
        assert box.stats[1][stats.Slot.GAPS_LOST] == 0

    def test_recent_forwards_are_sequenced_by_a_restarted_owner(self) -> None:
        box = Box(2)
        room, _, bob = owner_and_peer(box, None)
        box.stopped.add(0)
        box.send(bob, type="message", room=room, content="while down", id="p1")
        box.turn()
        box.restart(0)  # its replacement finds the forward in bob's ring
        box.turn()
        assert [(a["id"], a["seq"]) for a in bob.take("ack")] == [("p1", 1)]
        assert bob.seqs(room) == [1]


# Gap fill


class TestGapFill:
    def test_a_lapped_reader_fills_the_gap_from_the_owner(self) -> None:
        box = Box(2, config(**FAST))
        room, alice, bob = owner_and_peer(box, "alice")
        count = 300
        box.lap(1, alice, room, count)  # bob's shard does not read meanwhile
        box.turn()
        assert box.stats[1][stats.Slot.RING_LAPS] >= 1
        assert bob.seqs(room) == list(range(1, count + 1))
        assert box.stats[1][stats.Slot.GAPS_LOST] == 0

    def test_what_the_owner_no_longer_holds_is_given_up(self) -> None:
        box = Box(2, config(delivery__history=10, **FAST))
        room, alice, bob = owner_and_peer(box, "alice")
        box.lap(1, alice, room, 300)
        box.turn()
        seqs = bob.seqs(room)
        assert seqs[-10:] == list(range(291, 301))
        assert seqs == sorted(set(seqs))  # in order, no duplicates
        assert box.stats[1][stats.Slot.GAPS_LOST] >= 1
        # Each range given up is announced in its place: every seq accounted for.
        assert covered(bob, room) == list(range(1, 301))

    def test_a_fill_is_asked_again_and_given_up_only_without_progress(self) -> None:
        box = Box(2)
        room, _, bob = owner_and_peer(box, None)
        engine = box.engines[1]
        engine.advance(box.now, box.wall)
        engine.inbox.on_message(
            room, 5, "m5", b'{"type":"message","room":"%s","seq":5}' % room.encode(), 0
        )
        box.stopped.add(0)
        box.turn()
        assert bob.seqs(room) == []  # parked behind the gap
        asked = box.brokers[1].writer.tail
        box.advance(GAP_TIMEOUT)
        assert box.brokers[1].writer.tail > asked  # asked again, not given up
        assert bob.seqs(room) == [] and box.stats[1][stats.Slot.GAPS_LOST] == 0
        for _ in range(int(GAP_GIVE_UP)):
            box.advance(1.0)
        assert bob.seqs(room) == [5]
        assert box.stats[1][stats.Slot.GAPS_LOST] == 1

    def test_rooms_restored_at_start_are_not_dropped_as_idle_at_once(self) -> None:
        box = Box(2, config(delivery__room_idle=60.0))
        room, alice, bob = owner_and_peer(box, "alice")
        box.send(alice, type="message", room=room, content="kept")
        box.turn()
        box.advance(100.0)  # longer than room_idle: bob is a member, nothing dropped
        box.restart(1)  # bob's shard comes back with a copy from the owner's ring
        box.advance(1.0)
        box.advance(EVICT_EVERY)
        assert len(box.engines[1].logs[room]) == 1  # restored now: not idle yet
        box.advance(60.0)
        assert room not in box.engines[1].logs  # idle for room_idle: dropped

    def test_a_join_with_since_fetches_a_dropped_room_from_the_owner(self) -> None:
        box = Box(2, config(delivery__room_idle=60.0))
        room, alice, bob = owner_and_peer(box, "alice")
        box.publish(alice, room, 5)
        box.turn()
        box.send(bob, type="leave", room=room)
        box.advance(61.0)
        box.advance(31.0)
        assert room not in box.engines[1].logs  # dropped: idle, no members, not owned
        assert room in box.engines[0].logs  # the owner keeps it
        carol = box.connect(1, "carol")
        joined = box.join(carol, room, since=2, epoch="epoch-1")
        assert joined["seq"] == 5 and joined["recovered"]
        assert carol.seqs(room) == [3, 4, 5]


# Presence


class TestPresence:
    def test_one_join_and_one_leave_per_user_across_shards(self) -> None:
        box = Box(3)
        room = "lobby"
        watcher = box.connect(2, "watcher")
        box.join(watcher, room)
        a1 = box.connect(0, "ann")
        a2 = box.connect(1, "ann")
        box.join(a1, room)
        box.join(a2, room)
        box.turn()
        assert [(e["type"], e["sender"]) for e in watcher.take("join")] == [("join", "ann")]
        box.send(watcher, type="presence", room=room)
        (presence,) = watcher.take("presence")
        assert sorted(presence["users"]) == ["ann", "watcher"] and presence["count"] == 2
        box.close(a1)
        box.turn()
        assert watcher.take("leave") == []  # ann is still here on shard 1
        box.close(a2)
        box.turn()
        assert [e["sender"] for e in watcher.take("leave")] == ["ann"]

    def test_a_peer_reset_removes_exactly_its_users(self) -> None:
        box = Box(3)
        room = "lobby"
        watcher = box.connect(0, "watcher")
        box.join(watcher, room)
        both0 = box.connect(0, "both")
        both1 = box.connect(1, "both")
        only1 = box.connect(1, "only")
        for client in (both0, both1, only1):
            box.join(client, room)
        watcher.take()
        box.restart(1)
        box.turn()
        assert [e["sender"] for e in watcher.take("leave")] == ["only"]
        assert both1.closed is not None
        # The room's holders (owner and replica: the restarted shard may be one,
        # which learns who is where from the others' snapshots) agree.
        for shard in holders_of(room, 3):
            assert sorted(box.brokers[shard].holders.view.users(room)) == ["both", "watcher"]
        newcomer = box.connect(1, "newcomer")
        joined = box.join(newcomer, room)
        assert joined["count"] == 3

    def test_room_full_counts_users_on_every_shard(self) -> None:
        box = Box(2, config(limits__room_size=2))
        room = "small"
        box.join(box.connect(0, "a"), room)
        box.join(box.connect(1, "b"), room)
        c = box.connect(1, "c")
        box.send(c, type="join", room=room, id="j")
        (error,) = c.take("error")
        assert (error["code"], error["id"]) == ("room_full", "j")
        again = box.connect(0, "a")  # a user already present may join again
        assert box.join(again, room)["count"] == 2


# Reliable delivery


class TestReliable:
    def setup_room(self, box: Box) -> tuple[Client, Client, str]:
        room = room_owned_by(0, 2)
        pub = box.connect(0, "pub")
        box.join(pub, room)
        reader = box.connect(1, "reader")
        box.join(reader, room)
        box.send(reader, type="ack", room=room, seq=0)
        return pub, reader, room

    def test_unacked_messages_are_resent_with_backoff_then_4409(self) -> None:
        box = Box(2, config(delivery__ack_timeout=1.0, delivery__ack_retries=3))
        pub, reader, room = self.setup_room(box)
        box.send(pub, type="message", room=room, content="important")
        box.turn()
        assert reader.seqs(room) == [1]
        resent_at: list[int] = []
        for step in range(1, 16):
            box.advance(1.0)
            if len(reader.seqs(room)) > 1 + len(resent_at):
                resent_at.append(step)
            if reader.closed is not None:
                break
        # Resent after 1 s, then 2 s and 4 s later; closed 8 s after the third.
        assert resent_at == [1, 3, 7]
        assert reader.seqs(room) == [1, 1, 1, 1]
        assert reader.closed == Close(4409, "ack timeout")
        assert box.stats[1][stats.Slot.RESENDS] == 3

    def test_a_resend_the_log_no_longer_holds_closes_4409_at_once(self) -> None:
        """Messages past the log's capacity since the ack: a resend would skip the
        oldest, so the reader is closed with 4409 (it resumes with `since`)."""
        box = Box(2, config(delivery__ack_timeout=1.0, delivery__history=3))
        pub, reader, room = self.setup_room(box)
        for i in range(5):
            box.send(pub, type="message", room=room, content=f"m{i}")
        box.turn()
        assert reader.seqs(room) == [1, 2, 3, 4, 5]
        box.advance(1.0)
        assert reader.seqs(room) == [1, 2, 3, 4, 5]  # nothing resent
        assert reader.closed == Close(4409, "ack timeout")

    def test_an_ack_stops_the_resends(self) -> None:
        box = Box(2, config(delivery__ack_timeout=1.0))
        pub, reader, room = self.setup_room(box)
        box.publish(pub, room, 3)
        box.turn()
        box.send(reader, type="ack", room=room, seq=2)
        box.advance(1.0)
        assert reader.seqs(room) == [1, 2, 3, 3]  # only what was not acked
        box.send(reader, type="ack", room=room, seq=3)
        for _ in range(10):
            box.advance(1.0)
        assert reader.seqs(room) == [1, 2, 3, 3] and reader.closed is None


# Rate limiting and errors


class TestErrors:
    def test_rate_limited_past_the_burst_and_the_neighbour_is_unharmed(self) -> None:
        box = Box(1, config(limits__rate=1.0, limits__burst=3))
        room = "r"
        spammer = box.connect(0, "spammer")
        neighbour = box.connect(0, "neighbour")
        box.join(spammer, room)
        box.join(neighbour, room)
        for i in range(5):
            box.send(spammer, type="message", room=room, content=str(i), id=str(i))
        box.turn()
        assert [(e["code"], e["id"]) for e in spammer.take("error")] == [
            ("rate_limited", "3"),
            ("rate_limited", "4"),
        ]
        assert box.stats[0][stats.Slot.RATE_LIMITED] == 2
        box.advance(1.0)  # one token back
        box.send(spammer, type="message", room=room, content="later")
        box.send(neighbour, type="message", room=room, content="mine")
        box.turn()
        assert [m["content"] for m in messages(neighbour)] == ["0", "1", "2", "later", "mine"]
        assert spammer.closed is None

    def test_malformed_requests(self) -> None:
        box = Box(1, config(limits__max_content=10))
        c = box.connect(0, "c")
        box.send_raw(c, b"{not json")
        box.send(c, type="join")
        box.send(c, type="fly", id="f")
        box.send(c, type="message", room="r", content="x" * 11, id="big")
        box.send(c, type="message", room="r", content="x", id="nm")
        box.send(c, type="ack", room="r", seq=1)
        box.send(c, type="leave", room="r")
        assert errors(c) == [
            "bad_json",
            "bad_request",
            "unknown_type",
            "too_large",
            "not_member",
            "not_member",
            "not_member",
        ]
        for code, n in [(ErrorCode.BAD_JSON, 1), (ErrorCode.NOT_MEMBER, 3)]:
            assert error_count(box, 0, code) == n
        assert c.closed is None

    def test_max_errors_in_a_row_close_1008(self) -> None:
        box = Box(1, config(limits__max_errors=3))
        c = box.connect(0, "c")
        box.send(c, type="fly")
        box.send(c, type="fly")
        box.send(c, type="ping")  # a good request resets the count
        box.send(c, type="fly")
        box.send(c, type="fly")
        assert c.closed is None
        box.send(c, type="fly")
        assert c.closed == Close(1008, "too many errors", fail=True)

    def test_policy_refusals_do_not_count_towards_1008(self) -> None:
        box = Box(1, config(limits__max_errors=2, limits__rate=0.001, limits__burst=1))
        c = box.connect(0, "c")
        box.join(c, "r")
        for _ in range(5):
            box.send(c, type="message", room="r", content="x")
        assert errors(c) == ["rate_limited"] * 4
        assert c.closed is None

    def test_invalid_utf8_fails_1007(self) -> None:
        box = Box(1)
        c = box.connect(0, "c")
        box.send_raw(c, b'{"type": "ping", "x": "\xff"}')
        assert c.closed == Close(1007, "invalid UTF-8", fail=True)

    def test_unauthorized_room_of_the_token(self) -> None:
        box = Box(1, config(auth__secret="s3cret-s3cret-s3cret-s3cret-s3cret"))
        token = make_token(
            "s3cret-s3cret-s3cret-s3cret-s3cret", {"sub": "ann", "rooms": ["allowed"]}
        )
        c = box.connect(0, "", query=f"token={token}")
        assert box.join(c, "allowed")["room"] == "allowed"
        box.send(c, type="join", room="other", id="j")
        (error,) = c.take("error")
        assert (error["code"], error["id"]) == ("unauthorized", "j")

    def test_the_rooms_claim_covers_every_request_naming_a_room(self) -> None:
        secret = "s3cret-s3cret-s3cret-s3cret-s3cret"
        box = Box(1, config(auth__secret=secret))
        token = make_token(secret, {"sub": "ann", "rooms": ["allowed"]})
        c = box.connect(0, "", query=f"token={token}")
        for kind, extra in [("presence", {}), ("history", {}), ("message", {"content": "x"})]:
            box.send(c, type=kind, room="other", id=kind, **extra)
        assert [(e["code"], e["id"]) for e in c.take("error")] == [
            ("unauthorized", "presence"),
            ("unauthorized", "history"),
            ("unauthorized", "message"),
        ]
        box.send(c, type="ping", id="p")  # names no room
        assert c.take("pong")

    def test_a_token_that_expires_closes_4401(self) -> None:
        secret = "s3cret-s3cret-s3cret-s3cret-s3cret"
        box = Box(1, config(auth__secret=secret, auth__leeway=0.0))
        # PyJWT checks exp against the real clock: the box's wall clock follows it.
        box.wall = float(int(time.time()))
        token = make_token(secret, {"sub": "ann", "exp": int(box.wall) + 10})
        c = box.connect(0, "", query=f"token={token}")
        box.advance(5.0)
        assert c.closed is None
        box.advance(6.0)
        assert c.closed == Close(4401, "token expired")

    def test_rejected_by_the_on_message_hook(self) -> None:
        class App:
            def on_message(self, conn: object, room: str, content: str) -> str | None:
                if "spam" in content:
                    raise Reject("no spam")
                return content.upper()

        box = Box(1, app=App())
        c = box.connect(0, "c")
        box.join(c, "r")
        box.send(c, type="message", room="r", content="spam!", id="s")
        box.send(c, type="message", room="r", content="hello")
        box.turn()
        (error,) = c.take("error")
        assert (error["code"], error["reason"], error["id"]) == ("rejected", "no spam", "s")
        assert [m["content"] for m in messages(c)] == ["HELLO"]

    def test_every_error_code_is_counted_once(self) -> None:
        assert len(stats.ERROR_CODES) == len(set(stats.ERROR_CODES)) == len(ErrorCode)
        malformed = {c for c in ErrorCode if c.malformed}
        assert malformed == {"bad_json", "bad_request", "unknown_type", "too_large", "not_member"}


# Admission


class TestAdmission:
    def refusal(self, box: Box, **kw: Any) -> tuple[int, str]:
        result = box.upgrade(0, **kw)
        assert isinstance(result, Refusal), result
        return result.status, result.text

    def test_refusals_in_protocol_order(self) -> None:
        box = Box(1, config(server__origins=("https://ok.example",), server__max_per_ip=1))
        assert self.refusal(box, user="a b")[0] == 400
        assert self.refusal(box, user="a", headers={"origin": "https://evil.example"}) == (
            403,
            "origin not allowed\n",
        )
        box.connect(0, "a", headers={"Origin": "https://ok.example"})
        assert self.refusal(box, user="b")[1] == "too many connections from this address\n"
        box.connect(0, "c", peer="127.0.0.2")  # no Origin: not a browser
        box.engines[0].draining = True
        assert self.refusal(box, user="d", peer="127.0.0.3") == (503, "server is shutting down\n")
        assert box.stats[0][stats.Slot.HTTP_REFUSED] == 4

    def test_a_token_is_required_when_auth_is_on(self) -> None:
        box = Box(1, config(auth__secret="k" * 32))
        assert self.refusal(box, user="")[0] == 401
        assert self.refusal(box, user="", headers={"Authorization": "Bearer junk"})[0] == 401
        token = make_token("k" * 32, {"sub": "zed"})
        c = box.connect(0, "", headers={"Authorization": f"Bearer {token}"})
        assert c in box.engines[0].conns and box.engines[0].conns[c].user == "zed"

    def test_on_connect_refuses_with_its_reason(self) -> None:
        class App:
            def on_connect(self, info: Any) -> str | None:
                return "banned" if info.user == "troll" else None

        box = Box(1, app=App())
        assert self.refusal(box, user="troll") == (403, "banned\n")
        box.connect(0, "fine")

    def test_rooms_of_the_query_are_joined_at_open(self) -> None:
        box = Box(2)
        c = box.connect(0, "q", query="room=one&room=two")
        assert [f["room"] for f in c.take("joined")] == ["one", "two"]


# Fan-out


class TestFanout:
    def test_a_turns_frames_go_out_joined_once_per_room(self) -> None:
        box = Box(1)
        room = "r"
        members = [box.connect(0, f"m{i}") for i in range(3)]
        for member in members:
            box.join(member, room)
        box.publish(members[0], room, 4)
        engine = box.engines[0]
        box.brokers[0].commit()
        engine.deliver()  # the acks the commit released
        engine.take_outputs()
        out = engine.flush()
        assert len(out) == 1  # one buffer for the room
        conns, buf = out[0]
        assert set(conns) == set(members)
        assert isinstance(buf, bytes) and buf.count(b'"type":"message"') == 4

    def test_join_seq_is_the_last_seq_the_joiner_does_not_get_live(self) -> None:
        box = Box(2)
        room = room_owned_by(1, 2)
        pub = box.connect(1, "pub")
        box.join(pub, room)
        box.send(pub, type="message", room=room, content="before")
        joiner = box.connect(0, "joiner")  # the record is in the ring, not yet read
        box.brokers[1].commit()
        joined = box.join(joiner, room)
        assert joined["seq"] == 1
        box.send(pub, type="message", room=room, content="after")
        box.turn()
        assert joiner.seqs(room) == [2]

    def test_history_pages_the_latest_and_before(self) -> None:
        box = Box(2)
        room, c = published_room(box, 10)
        c.frames = []
        box.send(c, type="history", room=room, limit=3)
        assert [m["seq"] for m in messages(c)] == [8, 9, 10]
        c.frames = []
        box.send(c, type="history", room=room, limit=3, before=8)
        assert [m["seq"] for m in messages(c)] == [5, 6, 7]
        assert c.take("history_end")[0]["seq"] == 7

    def test_history_replays_held_messages(self) -> None:
        box = Box(2)
        room, c = published_room(box, 5)
        c.frames = []
        box.send(c, type="history", room=room, since=1, limit=2)
        assert [m["seq"] for m in messages(c)] == [2, 3]
        (end,) = c.take("history_end")
        assert end["seq"] == 3
