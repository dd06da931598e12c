"""Forwards to a room's owner: kept, sent again in paced batches, given up."""

from __future__ import annotations

from shardchat.brokers.forwarding import FORWARD_PACE, FORWARD_RETRY, Forwarder


def test_forwards_are_sent_again_a_budget_at_a_time_oldest_first() -> None:
    """All of a shard's unanswered forwards at once would lap the owner's reader
    again (they were lost to a lap): at most the budget's bytes per batch."""
    forwarder = Forwarder(give_up=30.0)
    for i in range(10):
        forwarder.add(f"m{i}", "lobby", 0, b"x" * 1000, 0.0)
    again, failed = forwarder.due(FORWARD_RETRY, budget=3000)
    assert [p.msg_id for p in again] == ["m0", "m1", "m2"] and failed == []
    assert forwarder.next_deadline() == FORWARD_RETRY + FORWARD_PACE
    again, _ = forwarder.due(FORWARD_RETRY + FORWARD_PACE, budget=3000)
    assert [p.msg_id for p in again] == ["m3", "m4", "m5"]


def test_a_forward_larger_than_the_budget_still_goes() -> None:
    forwarder = Forwarder(give_up=30.0)
    forwarder.add("big", "lobby", 0, b"x" * 5000, 0.0)
    again, _ = forwarder.due(FORWARD_RETRY, budget=3000)
    assert [p.msg_id for p in again] == ["big"]


def test_a_forward_is_given_up_after_the_publish_timeout() -> None:
    forwarder = Forwarder(give_up=30.0)
    forwarder.add("m", "lobby", 0, b"x", 0.0)
    again, failed = forwarder.due(30.0, budget=3000)
    assert again == [] and [p.msg_id for p in failed] == ["m"]
    assert forwarder.in_flight(0) == 0 and forwarder.next_deadline() is None
