"""Tests for zevents.protocol.subscriber: the cursor that delivers every seq exactly once.

Live batches, replays and fetch replies are fed as the bytes and dicts the broker
sends; time is a plain ``now`` argument, so nothing here sleeps.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zevents.errors import (
    InvalidStreamIdError,
    ProtocolError,
    ReplayUnavailableError,
    StreamNotFoundError,
    ZEventsError,
)
from zevents.events import Event, EventType
from zevents.protocol import frames
from zevents.protocol.subscriber import (
    ACK_STEP_PARKED,
    GAP_GRACE,
    Fetch,
    SubscriberState,
    ack_step,
)

TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)


def raw(seq: int, sid: str = "s") -> bytes:
    return Event(EventType.TEXT_DELTA, {"text": f"{sid}#{seq}"}, TS).to_msgpack()


def live(first: int, n: int, sid: str = "s") -> bytes:
    return frames.encode_events(frames.topic(sid), first, [raw(first + i, sid) for i in range(n)])


def end(last: int, sid: str = "s") -> bytes:
    return frames.encode_end(frames.topic(sid), last)


def replay(
    first: int,
    n: int,
    last: int | None = None,
    *,
    sid: str = "s",
    closed: bool = False,
    buffer_size: int = 100,
) -> dict[str, Any]:
    return {
        "stream": sid,
        "first_seq": first,
        "events": b"".join(raw(first + i, sid) for i in range(n)),
        "count": n,
        "last_seq": first + n - 1 if last is None else last,
        "closed": closed,
        "buffer_size": buffer_size,
        "policy": "block",
    }


def take_all(sub: SubscriberState, sid: str | None = None) -> list[tuple[str, int]]:
    out = []
    while (e := sub.next_event(sid)) is not None:
        assert e.stream_id is not None and e.seq is not None
        assert e.data == {"text": f"{e.stream_id}#{e.seq}"}
        assert e.type is EventType.TEXT_DELTA
        assert e.timestamp == TS
        out.append((e.stream_id, e.seq))
    return out


def seqs(sub: SubscriberState, sid: str | None = None) -> list[int]:
    return [seq for _, seq in take_all(sub, sid)]


def subscribed(
    first: int = 1, n: int = 0, last: int | None = None, sid: str = "s", **kw: Any
) -> SubscriberState:
    sub = SubscriberState()
    sub.add(sid)
    sub.on_replay(replay(first, n, last, sid=sid, **kw), subscribed=True)
    return sub


# -- in order, exactly once ---------------------------------------------------------------


def test_replay_then_live_in_order() -> None:
    sub = subscribed(1, 3)
    sub.on_publish(live(4, 2))
    assert take_all(sub) == [("s", i) for i in range(1, 6)]
    assert sub.take_fetches() == []
    assert not sub.finished("s")


def test_live_events_carry_stream_and_seq() -> None:
    sub = subscribed()
    sub.on_publish(live(1, 1))
    e = sub.next_event("s")
    assert e is not None
    assert (e.stream_id, e.seq) == ("s", 1)
    assert e == Event(EventType.TEXT_DELTA, {"text": "s#1"}, TS)
    assert sub.next_event("s") is None


def test_duplicates_are_dropped() -> None:
    sub = subscribed(1, 5)
    sub.on_publish(live(3, 4))  # 3..6: only 6 is new
    sub.on_publish(live(1, 2))  # all old
    sub.on_publish(live(6, 1))  # 6 again
    assert seqs(sub) == [1, 2, 3, 4, 5, 6]
    assert sub.take_fetches() == []


def test_far_behind_batch_is_ignored() -> None:
    sub = subscribed(1, 500, buffer_size=10)
    sub.on_publish(live(2, 1))
    assert seqs(sub) == list(range(1, 501))


def test_unknown_stream_frames_are_ignored() -> None:
    sub = subscribed()
    sub.on_publish(live(1, 2, sid="other"))
    sub.on_publish(end(2, sid="other"))
    assert sub.next_event() is None
    assert sub.take_fetches() == []


@pytest.mark.parametrize(
    "frame",
    [b"", b"s", b"s\x00", b"s\x00E\x00", b"s\x00Q" + bytes(8), b"\xff\x00E" + bytes(8)],
)
def test_malformed_publish_frames_raise_zevents_errors(frame: bytes) -> None:
    sub = subscribed()
    with pytest.raises((ProtocolError, InvalidStreamIdError)):
        sub.on_publish(frame)


def test_exact_stream_matching() -> None:
    sub = SubscriberState()
    for sid in ("s1", "s10"):
        sub.add(sid)
        sub.on_replay(replay(1, 0, 0, sid=sid), subscribed=True)
    sub.on_publish(live(1, 2, sid="s10"))
    sub.on_publish(live(1, 1, sid="s1"))
    assert take_all(sub, "s1") == [("s1", 1)]
    assert take_all(sub, "s10") == [("s10", 1), ("s10", 2)]


# -- gaps and fetches ------------------------------------------------------------------------


def test_gap_emits_one_fetch_and_reply_fills_it() -> None:
    sub = subscribed(1, 2)
    sub.on_publish(live(5, 2))  # 3, 4 lost at the high-water mark
    assert seqs(sub) == [1, 2]  # nothing past the gap yet
    assert sub.take_fetches() == [Fetch("s", 3)]
    sub.on_publish(live(7, 1))
    assert sub.take_fetches() == []  # one fetch in flight is enough
    sub.on_replay(replay(3, 5, 7))  # the fetch reply: 3..7
    assert seqs(sub) == [3, 4, 5, 6, 7]
    assert sub.take_fetches() == []


def test_fetch_reply_shorter_than_the_gap_fetches_again() -> None:
    sub = subscribed(1, 1)
    assert seqs(sub) == [1]
    sub.on_publish(live(10, 1))
    assert sub.take_fetches() == [Fetch("s", 2)]
    sub.on_replay(replay(2, 3, 10))  # max_batch cut it at 4
    assert seqs(sub) == [2, 3, 4]
    assert sub.take_fetches() == [Fetch("s", 5)]
    sub.on_replay(replay(5, 5, 10))
    assert seqs(sub) == [5, 6, 7, 8, 9, 10]
    assert sub.take_fetches() == []


def test_fetch_reply_drains_several_held_batches() -> None:
    sub = subscribed(1, 1)
    assert seqs(sub) == [1]
    for first in (4, 6, 9):
        sub.on_publish(live(first, 2))  # 4-5, 6-7, 9-10 (8 also lost)
    assert sub.take_fetches() == [Fetch("s", 2)]
    sub.on_replay(replay(2, 2, 10))  # 2, 3
    assert seqs(sub) == list(range(2, 8))
    assert sub.take_fetches() == [Fetch("s", 8)]
    sub.on_replay(replay(8, 3, 10))
    assert seqs(sub) == [8, 9, 10]


def test_overlapping_fetch_reply_has_no_duplicates() -> None:
    sub = subscribed(1, 2)
    assert seqs(sub) == [1, 2]
    sub.on_publish(live(4, 1))
    assert sub.take_fetches() == [Fetch("s", 3)]
    sub.on_publish(live(5, 2))  # held, still past the gap
    sub.on_replay(replay(3, 4, 6))  # 3..6 overlaps the held 4..6
    assert seqs(sub) == [3, 4, 5, 6]


def test_fetch_error_ends_stream_after_earlier_events() -> None:
    sub = subscribed(1, 2)
    sub.on_publish(live(9, 1))
    assert sub.take_fetches() == [Fetch("s", 3)]
    sub.on_error("s", ReplayUnavailableError("s", 3, 5))
    assert sub.has_event("s")
    assert not sub.finished("s")
    assert sub.next_event("s") is not None
    assert sub.next_event("s") is not None
    with pytest.raises(ReplayUnavailableError) as info:
        sub.next_event("s")
    assert (info.value.first_missing, info.value.last_missing) == (3, 5)
    assert sub.next_event("s") is None  # raised once
    assert sub.finished("s")
    assert not sub.has_event("s")


def test_error_through_any_stream_iteration() -> None:
    sub = subscribed(1, 1)
    sub.on_error("s", StreamNotFoundError("s"))
    assert sub.has_event()
    assert sub.next_event() is not None
    with pytest.raises(StreamNotFoundError):
        sub.next_event()
    assert sub.next_event() is None
    assert not sub.has_event()
    assert sub.finished()


def test_error_for_unknown_stream_is_ignored() -> None:
    sub = subscribed()
    sub.on_error("nope", StreamNotFoundError("nope"))
    assert sub.next_event() is None


def test_stream_ended_by_error_stays_ended() -> None:
    sub = subscribed(1, 2)
    sub.on_publish(live(5, 1))
    sub.take_fetches()
    sub.on_error("s", ReplayUnavailableError("s", 3, 4))
    assert [sub.next_event("s").seq for _ in range(2)] == [1, 2]  # type: ignore[union-attr]
    with pytest.raises(ReplayUnavailableError):
        sub.next_event("s")
    assert sub.finished("s")
    sub.on_publish(live(6, 1))
    sub.on_publish(live(3, 4))
    assert sub.take_fetches() == []
    assert sub.next_event("s") is None
    assert sub.finished("s")


# -- the seam between replay and live ---------------------------------------------------------


def test_live_before_subscribe_reply_is_held_then_seamed() -> None:
    sub = SubscriberState()
    sub.add("s")
    sub.on_publish(live(3, 2))  # 3, 4: published after the topic took effect
    sub.on_publish(live(5, 1))
    assert sub.next_event() is None  # nothing before the reply
    assert sub.take_fetches() == []
    sub.on_replay(replay(1, 4), subscribed=True)  # buffered 1..4 when the marker arrived
    assert seqs(sub) == [1, 2, 3, 4, 5]
    assert sub.take_fetches() == []


def test_live_before_reply_of_empty_stream() -> None:
    sub = SubscriberState()
    sub.add("s")
    sub.on_publish(live(1, 2))
    sub.on_replay(replay(1, 0, 0), subscribed=True)
    assert seqs(sub) == [1, 2]


def test_live_before_reply_with_gap_after_replay() -> None:
    sub = SubscriberState()
    sub.add("s")
    sub.on_publish(live(6, 1))  # 4, 5 lost
    sub.on_replay(replay(1, 3), subscribed=True)
    assert seqs(sub) == [1, 2, 3]
    assert sub.take_fetches() == [Fetch("s", 4)]
    sub.on_replay(replay(4, 3, 6))
    assert seqs(sub) == [4, 5, 6]


def test_subscribe_reply_resumes_from_seq() -> None:
    sub = SubscriberState()
    sub.add("s")
    sub.on_replay(replay(5, 2, 6), subscribed=True)  # from_seq=5
    sub.on_publish(live(7, 1))
    assert seqs(sub) == [5, 6, 7]
    assert sub.take_fetches() == []
    assert sub.resume_points() == {"s": 8}


def test_resume_from_seq_beyond_end_of_stream() -> None:
    sub = SubscriberState()
    sub.add("s")
    sub.on_replay(replay(10, 0, 3), subscribed=True)  # asked from 10, stream is at 3
    sub.on_publish(live(4, 6))  # 4..9 are before what we asked for
    assert seqs(sub) == []
    sub.on_publish(live(10, 1))
    assert seqs(sub) == [10]
    assert sub.take_fetches() == []


def test_subscribe_reply_with_oldest_buffered_after_eviction() -> None:
    sub = SubscriberState()
    sub.add("s")
    sub.on_replay(replay(40, 3, 42), subscribed=True)  # from_seq=None: oldest is 40
    assert seqs(sub) == [40, 41, 42]
    assert sub.take_fetches() == []


def test_replay_cut_by_max_batch_fetches_the_rest() -> None:
    sub = subscribed(1, 3, 8)
    assert sub.take_fetches() == [Fetch("s", 4)]
    sub.on_replay(replay(4, 5, 8))
    assert seqs(sub) == list(range(1, 9))


def test_reply_for_unknown_stream_is_ignored() -> None:
    sub = SubscriberState()
    sub.on_replay(replay(1, 2, sid="x"), subscribed=True)
    assert sub.next_event() is None


# -- the end ------------------------------------------------------------------------------------


def test_end_marker_finishes_after_events_are_taken() -> None:
    sub = subscribed(1, 2)
    sub.on_publish(end(2))
    assert not sub.finished("s")  # two events still to take
    assert seqs(sub) == [1, 2]
    assert sub.finished("s")
    assert sub.finished()
    assert sub.resume_points() == {}


def test_end_marker_of_empty_stream() -> None:
    sub = subscribed(1, 0, 0)
    sub.on_publish(end(0))
    assert sub.finished("s")


def test_end_marker_ahead_of_events_fetches_the_rest() -> None:
    sub = subscribed(1, 2)
    sub.on_publish(end(4))  # 3, 4 lost
    assert sub.take_fetches() == [Fetch("s", 3)]
    assert seqs(sub) == [1, 2]
    assert not sub.finished("s")
    sub.on_replay(replay(3, 2, 4, closed=True))
    assert seqs(sub) == [3, 4]
    assert sub.finished("s")


def test_closed_replay_finishes() -> None:
    sub = subscribed(1, 3, closed=True)
    assert not sub.finished("s")
    assert seqs(sub) == [1, 2, 3]
    assert sub.finished("s")


def test_end_marker_before_subscribe_reply() -> None:
    sub = SubscriberState()
    sub.add("s")
    sub.on_publish(end(2))
    assert not sub.finished("s")
    sub.on_replay(replay(1, 2, closed=True), subscribed=True)
    assert seqs(sub) == [1, 2]
    assert sub.finished("s")


def test_add_after_finish_starts_a_new_cursor() -> None:
    sub = subscribed(1, 1, closed=True)
    assert seqs(sub) == [1]
    assert sub.finished("s")
    cursor = sub.add("s")
    assert cursor.next_seq == 1 and not cursor.active
    assert not sub.finished("s")


def test_add_of_followed_stream_keeps_the_cursor() -> None:
    sub = subscribed(1, 3)
    assert sub.next_event() is not None
    cursor = sub.add("s")  # a resubscribe after a broker restart
    assert cursor.next_seq == 4 and cursor.fetching
    assert sub.resume_points() == {"s": 4}


def test_finished_of_unknown_stream() -> None:
    sub = SubscriberState()
    assert sub.finished("nope")
    assert sub.finished()


# -- heads reported by heartbeats ------------------------------------------------------------


def test_head_from_heartbeat_fetches_only_after_grace() -> None:
    sub = subscribed(1, 3)
    assert seqs(sub) == [1, 2, 3]
    sub.on_heads([["s", 5, False]], now=100.0)  # 4, 5 exist; their frames may be in flight
    assert sub.take_fetches() == []
    sub.on_tick(100.0 + GAP_GRACE / 2)
    assert sub.take_fetches() == []
    sub.on_tick(100.0 + GAP_GRACE)
    assert sub.take_fetches() == [Fetch("s", 4)]
    sub.on_tick(100.0 + 10 * GAP_GRACE)
    assert sub.take_fetches() == []


def test_head_reached_within_grace_is_no_fetch() -> None:
    sub = subscribed(1, 3)
    sub.on_heads([["s", 5, False]], now=100.0)
    sub.on_publish(live(4, 2))
    sub.on_tick(100.0 + 2 * GAP_GRACE)
    assert sub.take_fetches() == []
    assert seqs(sub) == [1, 2, 3, 4, 5]


def test_later_heartbeats_do_not_restart_the_grace() -> None:
    sub = subscribed(1, 3)
    sub.on_heads([["s", 4, False]], now=100.0)
    sub.on_heads([["s", 6, False]], now=100.0 + GAP_GRACE * 0.9)
    sub.on_tick(100.0 + GAP_GRACE)
    assert sub.take_fetches() == [Fetch("s", 4)]


def test_closed_head_we_already_have_ends_the_stream() -> None:
    sub = subscribed(1, 3)
    assert seqs(sub) == [1, 2, 3]
    sub.on_heads([["s", 3, True]], now=1.0)  # only the end marker was lost
    assert sub.finished("s")
    assert sub.take_fetches() == []


def test_closed_head_with_missing_events_fetches_after_grace() -> None:
    sub = subscribed(1, 3)
    sub.on_heads([["s", 5, True]], now=1.0)
    assert not sub.finished("s")
    sub.on_tick(1.0 + GAP_GRACE)
    assert sub.take_fetches() == [Fetch("s", 4)]
    sub.on_replay(replay(4, 2, 5, closed=True))
    assert seqs(sub) == [1, 2, 3, 4, 5]
    assert sub.finished("s")


def test_heads_ignore_unknown_inactive_and_malformed_entries() -> None:
    sub = SubscriberState()
    sub.add("pending")  # subscribe reply not in yet
    sub.on_heads([["pending", 9, False], ["nope", 3, False], "junk", [1, 2], None], now=0.0)
    sub.on_tick(10.0)
    assert sub.take_fetches() == []


# -- acknowledgements --------------------------------------------------------------------------


def test_acks_only_what_was_taken() -> None:
    sub = subscribed(1, 5)
    assert sub.acks(100.0, force=True) == []  # nothing taken yet
    sub.next_event()
    sub.next_event()
    assert sub.acks(100.0, force=True) == ["s", 2]
    assert sub.acks(200.0, force=True) == []  # nothing new


def test_ack_force_flush_vs_interval() -> None:
    sub = SubscriberState(ack_interval=0.05)
    sub.add("s")
    sub.on_replay(replay(1, 10), subscribed=True)
    sub.next_event()
    assert sub.acks(100.0, force=True) == ["s", 1]  # sets the interval's start
    sub.next_event()
    assert sub.acks(100.01, force=False) == []  # too soon, below threshold
    assert sub.acks(100.02, force=True) == ["s", 2]  # closing: flush now
    sub.next_event()
    assert sub.acks(100.03, force=False) == []
    assert sub.acks(100.08, force=False) == ["s", 3]  # interval passed


def test_ack_at_half_buffer_even_within_interval() -> None:
    sub = SubscriberState(ack_interval=10.0)
    sub.add("s")
    sub.on_replay(replay(1, 30, buffer_size=20), subscribed=True)
    sub.next_event()
    assert sub.acks(100.0, force=True) == ["s", 1]
    for _ in range(9):
        sub.next_event()
    assert sub.acks(100.001, force=False) == []  # 9 since the last ack: below 20 // 2
    sub.next_event()
    assert sub.acks(100.002, force=False) == ["s", 11]  # 10 taken: half the buffer


@pytest.mark.parametrize(
    ("buffer_size", "parked_window", "step"),
    [
        (100, 0, 50),  # parked events not published: half the buffer
        (1, 0, 0),  # every event
        (100, 4096, ACK_STEP_PARKED),  # published: up to the cap
        (100, 256, 178),  # no more than half of buffer + window
        (100, 2, 51),
        (5000, 4096, 2500),  # never less than half the buffer
        (1, 4096, ACK_STEP_PARKED),
    ],
)
def test_ack_step(buffer_size: int, parked_window: int, step: int) -> None:
    assert ack_step(buffer_size, parked_window) == step


def test_a_broker_publishing_parked_events_is_acked_less_often() -> None:
    # A window past the buffer is readable before anything is acked, so the
    # subscriber need not ack every half buffer (a message and a broker wake-up).
    sub = SubscriberState(ack_interval=10.0, parked_window=4096)
    sub.add("s")
    sub.on_replay(replay(1, 1000, buffer_size=100), subscribed=True)
    sub.next_event()
    assert sub.acks(100.0, force=True) == ["s", 1]
    for _ in range(ACK_STEP_PARKED - 1):
        sub.next_event()
    assert not sub.ack_due
    assert sub.acks(100.001) == []  # 511 taken since the last ack: not yet
    sub.next_event()
    assert sub.ack_due
    assert sub.acks(100.002) == ["s", ACK_STEP_PARKED + 1]
    # The step is the cursor's, fixed by the subscribe reply: a later change of
    # the broker (a reconnection) applies to the next subscribe.
    sub.parked_window = 0
    sub.add("t")
    sub.on_replay(replay(1, 100, sid="t", buffer_size=100), subscribed=True)
    assert (sub.cursors["s"].ack_step, sub.cursors["t"].ack_step) == (ACK_STEP_PARKED, 50)


def test_a_drop_stream_keeps_half_a_buffer_as_its_step() -> None:
    # Nothing parks on a DROP stream, so nothing is published past its buffer.
    sub = SubscriberState(parked_window=4096)
    sub.add("d")
    sub.on_replay({**replay(1, 3, sid="d"), "policy": "drop"}, subscribed=True)
    sub.add("b")
    sub.on_replay(replay(1, 3, sid="b"), subscribed=True)
    assert (sub.cursors["d"].ack_step, sub.cursors["b"].ack_step) == (50, ACK_STEP_PARKED)


def test_a_stream_found_due_is_acked_even_if_more_arrived_since() -> None:
    sub = SubscriberState(ack_interval=10.0, parked_window=4096)
    sub.add("s")
    sub.on_replay(replay(1, 50, last=50, buffer_size=100), subscribed=True)
    for _ in range(50):
        sub.next_event()  # the last one ready: due
    assert sub.ack_due
    sub.on_publish(live(51, 10))  # more is ready before acks() runs
    assert sub.acks(100.0) == ["s", 50]


def test_half_a_buffer_is_acked_once_nothing_more_is_ready() -> None:
    # With a larger ack step, what the subscriber can read may end before a
    # step (a producer keeping fewer events in flight than its window, the end
    # of a burst): once nothing more is ready it acks from half a buffer, so
    # neither waits for the timer, and an application that stops taking leaves
    # at most half a buffer unacknowledged, as before.
    sub = SubscriberState(ack_interval=10.0, parked_window=4096)
    for sid in ("s", "t"):
        sub.add(sid)
    sub.on_replay(replay(1, 60, buffer_size=100), subscribed=True)
    sub.on_replay(replay(1, 30, sid="t", buffer_size=100), subscribed=True)
    sub.next_event("s")
    assert sub.acks(100.0, force=True) == ["s", 1]
    for _ in range(58):
        sub.next_event("s")  # 58 since the last ack, one still ready
    assert not sub.ack_due
    assert sub.acks(100.001) == []
    sub.next_event("s")  # the last one ready: the application will wait now
    assert sub.ack_due
    assert sub.acks(100.002) == ["s", 60]
    for _ in range(30):
        sub.next_event("t")  # all of t, but less than half a buffer
    assert not sub.ack_due
    assert sub.acks(100.003) == []
    assert sub.acks(111.0) == ["t", 30]  # the interval


def test_within_an_interval_only_streams_half_a_buffer_ahead_are_acked() -> None:
    sub = SubscriberState(ack_interval=10.0)
    for sid in ("a", "b", "c"):
        sub.add(sid)
        sub.on_replay(replay(1, 30, sid=sid, buffer_size=20), subscribed=True)
    sub.next_event("a")
    assert sub.acks(100.0, force=True) == ["a", 1]  # starts the interval
    for _ in range(3):
        sub.next_event("a")
    for _ in range(10):
        sub.next_event("b")  # half of 20
    sub.next_event("c")
    assert sub.acks(100.001) == ["b", 10]
    assert sub.acks(100.002) == []  # a and c wait for the interval
    for _ in range(10):
        sub.next_event("c")
    assert sub.acks(100.003) == ["c", 11]
    flat = sub.acks(111.0)  # the interval: everything taken
    assert dict(zip(flat[::2], flat[1::2], strict=True)) == {"a": 4}


def test_acks_cover_many_streams() -> None:
    sub = SubscriberState()
    for sid in ("a", "b", "c"):
        sub.add(sid)
        sub.on_replay(replay(1, 3, sid=sid), subscribed=True)
    take_all(sub, "a")
    sub.next_event("b")
    flat = sub.acks(100.0, force=True)
    assert dict(zip(flat[::2], flat[1::2], strict=True)) == {"a": 3, "b": 1}


def test_resume_does_not_ack_below_from_seq_but_acks_from_there() -> None:
    sub = SubscriberState()
    sub.add("s")
    sub.on_replay(replay(50, 2, 51), subscribed=True)
    assert sub.acks(100.0, force=True) == []
    sub.next_event()
    assert sub.acks(100.0, force=True) == ["s", 50]


# -- many streams on one connection ------------------------------------------------------------


def test_next_event_any_stream_and_has_event() -> None:
    sub = SubscriberState()
    assert not sub.has_event()
    for sid in ("a", "b"):
        sub.add(sid)
        sub.on_replay(replay(1, 0, 0, sid=sid), subscribed=True)
    sub.on_publish(live(1, 2, sid="a"))
    sub.on_publish(live(1, 1, sid="b"))
    assert sub.has_event() and sub.has_event("a") and sub.has_event("b")
    got = take_all(sub)
    assert sorted(got) == [("a", 1), ("a", 2), ("b", 1)]
    assert [x for x in got if x[0] == "a"] == [("a", 1), ("a", 2)]
    assert not sub.has_event()


def test_remove_stops_following() -> None:
    sub = subscribed(1, 0, 0)
    sub.remove("s")
    sub.on_publish(live(1, 2))
    assert sub.next_event() is None
    assert sub.next_event("s") is None
    assert not sub.has_event("s")
    sub.remove("s")  # twice is fine


def test_has_event_after_remove_agrees_with_next_event() -> None:
    sub = subscribed(1, 2)
    sub.remove("s")
    assert not sub.has_event()
    assert sub.next_event() is None


def test_no_acks_for_a_removed_stream() -> None:
    sub = subscribed(1, 3)
    sub.next_event()
    sub.remove("s")
    assert sub.acks(100.0, force=True) == []


def test_resume_points_of_unfinished_streams() -> None:
    sub = SubscriberState()
    for sid, n in (("a", 2), ("b", 0)):
        sub.add(sid)
        sub.on_replay(replay(1, n, sid=sid), subscribed=True)
    take_all(sub, "a")
    sub.add("c")
    assert sub.resume_points() == {"a": 3, "b": 1, "c": 1}


# -- property: any interleaving delivers 1..N exactly once ----------------------------------


class _Broker:
    """Just enough of a broker for one stream: published events, replies, heads."""

    def __init__(self, sid: str, max_batch: int) -> None:
        self.sid = sid
        self.max_batch = max_batch
        self.last = 0
        self.closed = False

    def reply(self, from_seq: int | None) -> dict[str, Any]:
        first = 1 if from_seq is None else from_seq
        n = max(0, min(self.last, first + self.max_batch - 1) - first + 1)
        return replay(first, n, self.last, sid=self.sid, closed=self.closed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_events=st.integers(0, 40),
    max_batch=st.integers(1, 8),
    data=st.data(),
)
def test_any_interleaving_delivers_every_seq_once_in_order(
    n_events: int, max_batch: int, data: st.DataObject
) -> None:
    sid = "s"
    broker = _Broker(sid, max_batch)
    sub = SubscriberState()
    sub.add(sid)
    requests: list[int | None] = [None]  # the subscribe (from_seq None)
    replies: list[tuple[dict[str, Any], bool]] = []
    live_q: list[bytes] = []
    got: list[int] = []
    now = 0.0
    acked = 0
    is_first = True

    def collect() -> None:
        requests.extend(f.from_seq for f in sub.take_fetches())

    def publish(n: int, lost: bool) -> None:
        first = broker.last + 1
        broker.last += n
        if not lost:
            live_q.append(live(first, n))

    steps = data.draw(st.lists(st.integers(0, 6), max_size=60), label="steps")
    for step in steps:
        if step == 0 and broker.last < n_events:
            n = data.draw(st.integers(1, min(3, n_events - broker.last)), label="batch")
            publish(n, lost=data.draw(st.booleans(), label="lost"))
        elif step == 1 and live_q:
            sub.on_publish(live_q.pop(0))
        elif step == 2 and requests:
            from_seq = requests.pop(0)
            replies.append((broker.reply(from_seq), is_first))
            is_first = False
        elif step == 3 and replies:
            result, subscribed_ = replies.pop(0)
            sub.on_replay(result, subscribed=subscribed_)
        elif step == 4:
            got += seqs(sub)
            flat = sub.acks(now, force=True)
            if flat:
                acked = flat[1]
        elif step == 5 and acked < broker.last:
            sub.on_heads([[sid, broker.last, broker.closed]], now)
        elif step == 6:
            now += GAP_GRACE / 2
            sub.on_tick(now)
        collect()
    # the rest of the stream, then its end (whose marker may be lost too)
    while broker.last < n_events:
        publish(1, lost=False)
    broker.closed = True
    if not data.draw(st.booleans(), label="end lost"):
        live_q.append(end(broker.last))
    for _ in range(200):
        while live_q:
            sub.on_publish(live_q.pop(0))
            collect()
        while requests or replies:
            if requests:
                replies.append((broker.reply(requests.pop(0)), is_first))
                is_first = False
            result, subscribed_ = replies.pop(0)
            sub.on_replay(result, subscribed=subscribed_)
            collect()
        got += seqs(sub)
        if sub.finished(sid):
            break
        sub.on_heads([[sid, broker.last, True]], now)
        now += GAP_GRACE
        sub.on_tick(now)
        collect()
    assert got == list(range(1, n_events + 1))
    assert sub.finished(sid)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_on_publish_arbitrary_bytes_raises_only_zevents_errors(data: bytes) -> None:
    sub = subscribed(1, 1)
    for frame in (data, b"s\x00" + data, b"s\x00E" + data):
        try:
            sub.on_publish(frame)
        except ZEventsError:
            pass
