"""Presence held by each room's owner and its replica (brokers/presence_holders.py),
on a box of engines: what clients believe (their ``joined.users`` and the
events after it) equals who is there, on holders and non-holders, through
kills and restarts of the owner, the replica and any other shard."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shardchat.brokers.presence_holders import (
    QUERY_RETRY,
    REBUILD_TIMEOUT,
    HolderState,
    Queries,
    answer_of,
    holders_of,
)
from shardchat.core.engine import MAX_DEFERRED
from tests.core.box import Box, Client, config, room_owned_by

W = 4


def belief(client: Client, room: str) -> set[str]:
    """The room's users as ``client`` was told: its last ``joined``, then events."""
    users: set[str] = set()
    for frame in client.frames:
        if frame.get("room") != room:
            continue
        if frame["type"] == "joined":
            users = set(frame["users"])
        elif frame["type"] == "join":
            users.add(frame["sender"])
        elif frame["type"] == "leave":
            users.discard(frame["sender"])
    return users


def truth(box: Box, room: str) -> set[str]:
    """Users with a joined connection in ``room`` on a running shard."""
    return {
        user
        for shard, engine in enumerate(box.engines)
        if shard not in box.stopped
        for user in engine.presence.local.get(room, {})
    }


def events(client: Client) -> list[tuple[str, str]]:
    return [(f["type"], f["sender"]) for f in client.frames if f["type"] in ("join", "leave")]


def join(box: Box, client: Client, room: str) -> dict[str, Any]:
    """Join and wait (moving the clock, as a shard's timer would) for the answer."""
    box.send(client, type="join", room=room)
    box.turn()
    return join_answer(box, client)


def in_room(box: Box, room: str) -> list[Client]:
    return [
        c
        for shard, engine in enumerate(box.engines)
        if shard not in box.stopped
        for c in engine.conns
        if room in engine.conns[c].rooms
    ]


def assert_beliefs(box: Box, room: str) -> None:
    expected = truth(box, room)
    for client in in_room(box, room):
        assert belief(client, room) == expected, (client.name, client.shard)


class TestNonHolders:
    def test_joined_users_and_events_are_exact_and_once_on_every_shard(self) -> None:
        box = Box(W)
        room = room_owned_by(0, W)
        assert holders_of(room, W) == (0, 1)
        # Shards 2 and 3 hold nothing of the room: they ask its owner.
        ann = box.connect(2, "ann")
        assert join(box, ann, room)["users"] == ["ann"]
        bob = box.connect(3, "bob")
        joined = join(box, bob, room)
        assert sorted(joined["users"]) == ["ann", "bob"] and joined["count"] == 2
        cy = box.connect(0, "cy")
        join(box, cy, room)
        bob2 = box.connect(2, "bob")  # bob again, on another shard: no event
        join(box, bob2, room)
        box.turn()
        assert events(ann) == [("join", "bob"), ("join", "cy")]
        assert events(bob) == [("join", "cy")]  # never an event about oneself
        assert events(bob2) == [] and events(cy) == []
        assert box.brokers[2].holders.view.present == {}  # non-holders hold nothing
        assert box.brokers[3].holders.view.present == {}
        box.close(bob)
        box.turn()
        assert ("leave", "bob") not in events(ann)  # bob is still there, on shard 2
        box.close(bob2)
        box.turn()
        assert events(ann)[-1] == ("leave", "bob") and events(cy)[-1] == ("leave", "bob")
        box.send(ann, type="presence", room=room)
        box.turn()
        (presence,) = ann.take("presence")
        assert sorted(presence["users"]) == ["ann", "cy"] and presence["count"] == 2
        assert_beliefs(box, room)

    def test_room_size_counts_users_of_every_shard_from_the_owner(self) -> None:
        box = Box(W, config(limits__room_size=2))
        room = room_owned_by(1, W)
        join(box, box.connect(3, "a"), room)
        join(box, box.connect(0, "b"), room)
        c = box.connect(3, "c")
        assert join(box, c, room)["code"] == "room_full"
        again = box.connect(0, "a")  # a user already present may join again
        assert join(box, again, room)["count"] == 2

    def test_a_long_list_is_cut_to_fit_a_record_and_says_so(self) -> None:
        box = Box(W, config(presence__list_limit=5000))
        room = room_owned_by(0, W)
        names = [f"user-with-a-long-name-{i:04}" for i in range(400)]  # > one record
        for i, name in enumerate(names):
            box.engines[1 + i % 3].presence.local_join(room, name)
            box.brokers[1 + i % 3].announce(room, name, True)
        box.turn()
        asker = box.connect(2, "asker")
        box.send(asker, type="presence", room=room)
        box.turn()
        (presence,) = asker.take("presence")
        assert presence["count"] == 400 and presence["truncated"] is True
        assert 0 < len(presence["users"]) < 400


class TestKills:
    def test_owner_killed_members_get_its_users_leaves_and_it_holds_again(self) -> None:
        box = Box(W)
        room = room_owned_by(0, W)
        watchers = [box.connect(shard, f"w{shard}") for shard in (1, 2, 3)]
        for w in watchers:
            join(box, w, room)
        join(box, box.connect(0, "on-owner"), room)
        box.restart(0)
        box.turn()
        for w in watchers:
            assert events(w).count(("leave", "on-owner")) == 1
        assert_beliefs(box, room)
        late = box.connect(0, "late")  # the restarted owner answers from its rebuilt view
        assert sorted(join(box, late, room)["users"]) == ["late", "w1", "w2", "w3"]
        box.turn()
        for w in watchers:
            assert events(w).count(("join", "late")) == 1
        assert_beliefs(box, room)

    def test_while_the_owner_is_down_the_replica_answers_and_events_catch_up(self) -> None:
        box = Box(W)
        room = room_owned_by(0, W)
        ann = box.connect(2, "ann")
        join(box, ann, room)
        bob = box.connect(3, "bob")
        join(box, bob, room)
        gone = box.connect(0, "gone")
        join(box, gone, room)
        box.stopped.add(0)  # the owner stops reading and answering
        cy = box.connect(2, "cy")
        joined = join(box, cy, room)  # asked of the owner, then of the replica
        assert sorted(joined["users"]) == ["ann", "bob", "cy", "gone"]
        box.close(bob)
        box.restart(0)  # back: members learn what they missed, once
        box.turn()
        assert events(ann).count(("join", "cy")) == 1
        assert events(ann).count(("leave", "bob")) == 1
        assert events(ann).count(("leave", "gone")) == 1
        assert sorted(events(cy)) == [("leave", "bob"), ("leave", "gone")]
        assert_beliefs(box, room)
        # The replica's record of what members were told is empty again.
        assert box.brokers[1].holders.told == {}

    def test_replica_killed_the_owner_refills_it(self) -> None:
        box = Box(W)
        room = room_owned_by(0, W)
        ann = box.connect(2, "ann")
        join(box, ann, room)
        join(box, box.connect(1, "on-replica"), room)
        join(box, box.connect(3, "bob"), room)
        box.restart(1)
        box.turn()
        assert events(ann) == [("join", "on-replica"), ("join", "bob"), ("leave", "on-replica")]
        assert sorted(box.brokers[1].holders.view.users(room)) == ["ann", "bob"]
        box.stopped.add(0)  # now the rebuilt replica must answer alone
        cy = box.connect(3, "cy")
        assert sorted(join(box, cy, room)["users"]) == ["ann", "bob", "cy"]
        box.restart(0)
        box.turn()
        assert_beliefs(box, room)

    def test_another_shard_killed_its_users_leave_once(self) -> None:
        box = Box(W)
        room = room_owned_by(0, W)
        ann = box.connect(2, "ann")
        join(box, ann, room)
        join(box, box.connect(3, "x"), room)
        join(box, box.connect(3, "y"), room)
        box.restart(3)
        box.turn()
        assert sorted(events(ann)) == [("join", "x"), ("join", "y"), ("leave", "x"), ("leave", "y")]
        assert_beliefs(box, room)

    def test_a_rebuild_goes_on_without_a_silent_peer_and_takes_it_late(self) -> None:
        box = Box(W)
        room = room_owned_by(0, W)
        ann = box.connect(2, "ann")
        join(box, ann, room)
        join(box, box.connect(3, "stuck"), room)
        box.stopped.add(3)  # a non-holder that reads nothing for a while
        box.restart(0)
        assert not box.brokers[0].holders.ready  # 3's snapshot is missing
        bob = box.connect(2, "bob")  # answered by the replica meanwhile
        assert sorted(join(box, bob, room)["users"]) == ["ann", "bob", "stuck"]
        box.advance(REBUILD_TIMEOUT)
        assert box.brokers[0].holders.ready
        box.stopped.discard(3)  # back: its snapshot comes late, as announcements
        box.turn()
        assert_beliefs(box, room)
        assert truth(box, room) == {"ann", "bob", "stuck"}

    def test_no_holder_answers_then_unavailable(self) -> None:
        box = Box(W)
        room = room_owned_by(0, W)
        box.stopped |= {0, 1}
        ann = box.connect(2, "ann")
        box.send(ann, type="join", room=room, id="j")
        box.advance(box.config.delivery.publish_timeout + 1)
        (error,) = ann.take("error")
        assert (error["code"], error["id"]) == ("unavailable", "j")
        assert room not in box.engines[2].conns[ann].rooms
        neighbour = box.connect(2, "neighbour")  # the shard serves other rooms
        assert join(box, neighbour, room_owned_by(2, W))["users"] == ["neighbour"]


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("join"), st.integers(0, W - 1), st.sampled_from("abcd"), st.integers(0, 1)
        ),
        st.tuples(st.just("close"), st.integers(0, 50)),
        st.tuples(st.just("kill"), st.integers(0, W - 1)),
        st.tuples(st.just("stop"), st.integers(0, W - 1)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_every_client_believes_the_truth_through_kills(ops: list[tuple[object, ...]]) -> None:
    """Random joins, closes, kills and stops over 4 engines, one shard down at a
    time (a stopped shard is restarted before anything but a join happens): whenever
    no shard is down, every member's belief of each room is who is there."""
    box = Box(W)
    rooms = [room_owned_by(0, W), room_owned_by(3, W)]
    clients: list[Client] = []
    for op in ops:
        if op[0] != "join":
            for down in list(box.stopped):
                box.restart(down)  # back before another shard goes down
            box.turn()
        if op[0] == "join":
            _, on, user, r = op
            assert isinstance(on, int) and isinstance(user, str) and isinstance(r, int)
            if on in box.stopped:
                continue
            client = box.connect(on, user)
            join(box, client, rooms[r])
            clients.append(client)
        elif op[0] == "close":
            live = [c for c in clients if c.closed is None]
            if live:
                assert isinstance(op[1], int)
                box.close(live[op[1] % len(live)])
        elif op[0] == "kill":
            assert isinstance(op[1], int)
            box.restart(op[1])
        else:
            assert isinstance(op[1], int)
            box.stopped.add(op[1])
        box.turn()
        if not box.stopped:
            for room in rooms:
                assert_beliefs(box, room)
    for down in list(box.stopped):
        box.restart(down)
    box.turn()
    for room in rooms:
        assert_beliefs(box, room)


# The pure parts


def test_answers_are_cut_by_limit_and_bytes() -> None:
    assert answer_of(["a", "b", "c"], "b", 2, 1000) == (3, ["a", "b"], True, True, None)
    assert answer_of(["aaaa", "b"], "z", 10, 12) == (2, ["aaaa"], True, False, None)
    assert answer_of([], "z", 10, 10) == (0, [], False, False, None)


def test_the_replica_keeps_only_where_belief_differs_from_its_view() -> None:
    workers = 3
    room = room_owned_by(0, workers)
    replica = HolderState(1, workers)
    assert replica.holds(room) and not replica.owns(room)
    assert replica.announce(2, room, "u", True) == []  # the replica never emits
    assert replica.told == {room: {"u": False}}  # members were not told yet
    assert list(replica.believed(room)) == []
    replica.event(0, room, "u", True)  # the owner's event
    assert replica.told == {}
    assert list(replica.believed(room)) == ["u"]
    owner = HolderState(0, workers)
    assert owner.announce(2, room, "u", True) == [(room, "u", True, 1)]
    assert HolderState(2, workers).announce(1, room, "u", True) == []  # not a holder
    assert HolderState(2, workers).view.present == {}


def test_a_restarted_owner_emits_what_members_missed_once_rebuilt() -> None:
    workers = 3
    room = room_owned_by(0, workers)
    owner = HolderState(0, workers)
    owner.begin_rebuild([1, 2])
    assert owner.answer(room, "x", 10, 100) is None  # not before it is rebuilt
    assert owner.announce(2, room, "early", True) == []  # its snapshot will hold it
    assert owner.snapshot(2, [(room, "stays"), (room, "new")]) == []
    assert owner.snapshot(2, []) == []
    assert owner.snapshot(1, []) == []
    assert owner.told_chunk(2, []) == []  # the owner of the rooms we replicate
    assert owner.told_chunk(1, [(room, "stays"), (room, "left")]) == []  # our replica
    events = owner.told_chunk(1, [])
    assert owner.ready
    assert sorted(events) == [(room, "left", False, 2), (room, "new", True, 2)]
    assert owner.announce(2, room, "later", True) == [(room, "later", True, 3)]


def test_what_comes_after_a_rebuild_gave_up_is_applied_late() -> None:
    workers = 3
    room = room_owned_by(0, workers)
    owner = HolderState(0, workers)
    owner.begin_rebuild([1, 2])
    assert owner.give_up() == [] and owner.ready
    assert owner.snapshot(2, [(room, "there")]) == [(room, "there", True, 1)]
    assert owner.told_chunk(1, [(room, "there"), (room, "gone")]) == [(room, "gone", False, 1)]


def test_queries_go_to_the_owner_then_the_replica_then_fail() -> None:
    queries = Queries(4, timeout=2.0)
    room = room_owned_by(2, 4)
    qid, target = queries.ask(room, "u", 10, now=0.0)
    assert target == 2
    again, failed = queries.due(QUERY_RETRY)
    assert [(q, p.target) for q, p in again] == [(qid, 3)] and failed == []
    assert [q for q, _ in queries.reset(3, now=1.0)] == [qid]
    assert queries.due(2.0) == ([], [qid])
    assert not queries.answered(qid)


def test_a_client_sees_itself_and_its_shard_before_the_owners_events_arrive() -> None:
    """On the replica, answers follow what members were told (the owner's events):
    a `presence` asked right after joining, before the owner's event came back,
    still lists the asker and the other users of its shard."""
    box = Box(W)
    room = room_owned_by(0, W)
    ada, bob = box.connect(1, "ada"), box.connect(1, "bob")  # shard 1: the replica
    carol = box.connect(2, "carol")
    assert join(box, carol, room)["users"] == ["carol"]
    box.send(ada, type="join", room=room)
    box.send(bob, type="join", room=room)
    box.send(bob, type="presence", room=room)  # no turn: the owner has not answered
    # Read, not taken: the beliefs below start from these frames.
    (joined_ada,) = [f for f in ada.frames if f["type"] == "joined"]
    (joined_bob,) = [f for f in bob.frames if f["type"] == "joined"]
    (reply,) = [f for f in bob.frames if f["type"] == "presence"]
    assert sorted(joined_ada["users"]) == ["ada", "carol"]
    assert sorted(joined_bob["users"]) == ["ada", "bob", "carol"]
    assert sorted(reply["users"]) == ["ada", "bob", "carol"] and reply["count"] == 3
    box.turn()
    assert_beliefs(box, room)


def test_requests_sent_while_a_join_waits_are_taken_after_it_in_order() -> None:
    """A join on a shard that holds no presence waits for the owner's answer; a
    message sent right behind it is a member's (acked, delivered), not refused as
    `not_member`. A ping is answered at once: liveness does not wait for a join."""
    box = Box(W)
    room = room_owned_by(0, W)
    reader = box.connect(0, "reader")
    join(box, reader, room)
    writer = box.connect(3, "writer")  # shard 3: neither the owner nor the replica
    box.send(writer, type="join", room=room)
    box.send(writer, type="message", room=room, content="hi", id="m1")
    box.send(writer, type="ping", id="p1")
    assert [f["type"] for f in writer.take()] == ["pong"]  # the rest waits
    box.turn()
    kinds = [f["type"] for f in writer.take() if f["type"] != "message"]
    assert kinds == ["joined", "ack"]
    assert [m["content"] for m in reader.take("message")] == ["hi"]


def test_a_client_flooding_while_its_join_waits_is_refused_beyond_the_bound() -> None:
    box = Box(W, config(limits__rate=1e6, limits__burst=1_000_000))
    room = room_owned_by(0, W)
    box.stopped.add(0)  # the owner stops answering: the join waits for the replica
    client = box.connect(3, "flood")
    box.send(client, type="join", room=room)
    for i in range(MAX_DEFERRED + 10):
        box.send(client, type="message", room=room, content=f"m{i}", id=f"m{i}")
    refused = client.take("error")
    assert [e["id"] for e in refused] == [f"m{i}" for i in range(MAX_DEFERRED, MAX_DEFERRED + 10)]
    assert {e["code"] for e in refused} == {"rate_limited"}
    assert join_answer(box, client)["type"] == "joined"
    box.turn()
    # The owner is stopped: the publishes wait for it; none was refused as not_member.
    assert not client.take("error")


def test_many_joins_that_waited_end_at_once_without_recursion() -> None:
    """Joins held behind a waiting one, each answered at once when taken (this shard
    owns their room), are taken one after another, not one inside another: 200 of
    them, then a request, all answered, and the connection works after."""
    box = Box(W, config(limits__rate=1e6, limits__burst=1_000_000))
    remote = room_owned_by(0, W)
    local = room_owned_by(3, W, prefix="mine")
    client = box.connect(3, "joiner")
    box.send(client, type="join", room=remote)  # waits for shard 0's answer
    for _ in range(200):
        box.send(client, type="join", room=local)
    box.send(client, type="presence", room=local)
    box.turn()
    joined = client.take("joined")
    assert len(joined) == 201 and joined[0]["room"] == remote
    assert [f["users"] for f in client.take("presence")] == [["joiner"]]
    box.send(client, type="message", room=local, content="after", id="a")
    box.turn()
    assert [f["seq"] for f in client.take("ack")] == [1]


class TestInfo:
    """The connect proxy's info, kept by the holders with the user."""

    def test_holders_keep_the_latest_joins_info_until_the_user_is_gone(self) -> None:
        room = room_owned_by(0, W)
        for shard in holders_of(room, W):  # the owner and the replica alike
            state = HolderState(shard, W)
            state.announce(2, room, "ada", True, '{"n":1}')
            state.announce(3, room, "bob", True)
            assert state.infos == {room: {"ada": '{"n":1}'}}
            # A later join elsewhere with other info wins; one without keeps it.
            state.announce(3, room, "ada", True, '{"n":2}')
            state.announce(1, room, "ada", True)
            assert state.infos == {room: {"ada": '{"n":2}'}}
            if state.owns(room):
                answer = state.answer(room, "bob", 10, 10_000)
                assert answer is not None and answer.info == {"ada": '{"n":2}'}
            # One shard's connections leave: still present, info kept.
            state.announce(2, room, "ada", False)
            state.announce(3, room, "ada", False)
            assert state.infos == {room: {"ada": '{"n":2}'}}
            state.drop_shard(1)  # its last connection: gone, and its info
            assert state.infos == {}
            if state.owns(room):
                answer = state.answer(room, "bob", 10, 10_000)
                assert answer is not None and answer.info is None and answer.users == ["bob"]
        # Not a holder of the room: nothing kept.
        other = HolderState(2, W)
        assert not other.holds(room)
        other.announce(3, room, "ada", True, '{"n":1}')
        assert other.infos == {}

    def test_a_restarted_owner_gets_the_info_back_from_its_peers(self) -> None:
        box = Box(W)
        room = room_owned_by(0, W)
        ada = box.connect(1, "ada")
        box.engines[1].conns[ada].presence_info = '{"n":1}'
        join(box, ada, room)
        watcher = box.connect(2, "w")
        join(box, watcher, room)
        box.restart(0)
        box.turn()
        for _ in range(100):
            if box.brokers[0].holders.ready:
                break
            box.advance(QUERY_RETRY)
        late = box.connect(0, "late")  # asks the restarted owner
        joined = join(box, late, room)
        assert sorted(joined["users"]) == ["ada", "late", "w"]
        assert joined["info"] == {"ada": {"n": 1}}

    def test_info_is_listed_only_while_it_fits_the_record(self) -> None:
        big = '{"k":"' + "x" * 500 + '"}'
        infos = {f"u{i}": big for i in range(5)}
        answer = answer_of([f"u{i}" for i in range(5)], "u0", 5, 3000, infos)
        assert answer.users == [f"u{i}" for i in range(5)]
        assert answer.info is not None and 1 <= len(answer.info) < 5
        assert all(answer.info[u] == big for u in answer.info)
        assert answer_of(["a"], "a", 5, 3000, {}).info is None

    def test_the_answer_shows_info_on_every_shard(self) -> None:
        """Through the engines: a presence frame lists info only for users with one;
        a room without any has no ``info`` field."""
        box = Box(W, config())
        room = room_owned_by(0, W)
        ada = box.connect(1, "ada")
        box.engines[1].conns[ada].presence_info = '{"name":"Ada"}'
        bob = box.connect(2, "bob")
        carl = box.connect(3, "carl")
        for client in (ada, bob, carl):
            join(box, client, room)
        join(box, carl, "plain")
        box.send(carl, type="presence", room=room)
        box.send(carl, type="presence", room="plain")
        box.turn()
        for _ in range(100):
            if len([f for f in carl.frames if f["type"] == "presence"]) == 2:
                break
            box.advance(QUERY_RETRY)
        by_room = {f["room"]: f for f in carl.take("presence")}
        with_info, plain = by_room[room], by_room["plain"]
        assert sorted(with_info["users"]) == ["ada", "bob", "carl"]
        assert with_info["info"] == {"ada": {"name": "Ada"}}
        assert "info" not in plain


def join_answer(box: Box, client: Client) -> dict[str, Any]:
    """Move the clock until the join in flight is answered."""
    for _ in range(100):
        got = [f for f in client.frames if f["type"] in ("joined", "error")]
        if got:
            return got[-1]
        box.advance(QUERY_RETRY)
    raise AssertionError("no answer to the join")
