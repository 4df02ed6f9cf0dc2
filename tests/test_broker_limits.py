"""BrokerCore's limits: event size, subscribers per stream, the memory cap, and
the per-limit counters in stats (the other limits are in test_broker_core)."""

from __future__ import annotations

import pytest
from test_broker_core import (
    A,
    Broker,
    FakeClock,
    P,
    Q,
    S,
    T,
    acks_of,
    ev,
    of_kind,
    published,
    texts,
)
from test_broker_core import clock as _clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return _clock.__wrapped__(monkeypatch)  # type: ignore[attr-defined,no-any-return]


def big_ev(n: int) -> bytes:
    from zevents import Event

    return Event.text_delta("x" * n).to_msgpack()


def test_an_event_over_max_event_size_is_refused_alone(clock: FakeClock) -> None:
    b = Broker(clock, max_event_size=200)
    b.ingest("s", 1, [ev(1), big_ev(300), ev(3)])
    pub, ctl = b.flush()
    (nack,) = of_kind(ctl, "nack")
    assert nack[1:5] == ["s", 2, 2, "LIMIT_EXCEEDED"] and nack[6] == {"limit": "max_event_size"}
    assert "bytes is over max_event_size 200" in nack[5]
    assert acks_of(ctl) == [["s", 3]]
    assert [texts for *_, texts in published(pub)] == [["t1", "t3"]]
    stats = b.stats()
    assert stats.limits == {"max_event_size": 1} and stats.rejected == 1
    assert stats.bad_input == {}  # a limit, not garbage


def test_events_under_max_event_size_pass_whatever_the_frame_size(clock: FakeClock) -> None:
    b = Broker(clock, max_event_size=200)
    b.ingest("s", 1, [ev(i) for i in range(1, 51)])  # a frame far over 200 bytes
    _, ctl = b.flush()
    assert of_kind(ctl, "nack") == [] and acks_of(ctl) == [["s", 50]]


def test_max_subscribers_per_stream(clock: FakeClock) -> None:
    b = Broker(clock, max_subscribers=1)
    b.subscribed(S, "s")
    reply = b.subscribe(T, "s")
    assert reply[0] == "err" and reply[2] == "LIMIT_EXCEEDED"
    assert reply[4] == {"limit": "max_subscribers"}
    assert b.subscribe(S, "s")[0] == "ok"  # the same subscriber again is no new one
    b.ok(S, "unsubscribe", {"stream": "s"})
    assert b.subscribe(T, "s")[0] == "ok"  # a place came free
    assert b.stats().limits == {"max_subscribers": 1}


def test_memory_cap_holds_block_events_until_history_may_go(clock: FakeClock) -> None:
    size = len(ev(1))
    b = Broker(clock, max_buffered_bytes=size * 5, buffer_size=100)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(i) for i in range(1, 9)])
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 5]]  # 6..8 wait: the subscriber has acked nothing
    assert [seqs for _, _, seqs, _ in published(pub)] == [1]  # (parked ones published too)
    assert b.stats().buffered_bytes <= size * 5
    assert b.info("s").parked == 3
    b.ack(S, "s", 5)  # now 1..5 are history that may be trimmed
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 8]]
    assert published(pub) == []
    stats = b.stats()
    assert stats.buffered_bytes <= size * 5 and stats.parked == 0
    assert stats.limits["max_buffered_bytes"] >= 1


def test_memory_cap_drops_for_drop_streams(clock: FakeClock) -> None:
    size = len(ev(1))
    b = Broker(clock, max_buffered_bytes=size * 3)
    b.ok(A, "create", {"stream": "d", "policy": "drop"})
    b.subscribed(S, "d")
    b.ingest("d", 1, [ev(i) for i in range(1, 6)])
    _, ctl = b.flush()
    assert acks_of(ctl) == [["d", 5]]
    assert of_kind(ctl, "dropped") == [["dropped", "d", 2, 100]]
    assert b.stats().buffered_bytes == size * 3


def test_memory_cap_trims_other_streams_history(clock: FakeClock) -> None:
    size = len(ev(1))
    b = Broker(clock, max_buffered_bytes=size * 4)
    b.subscribed(S, "old")
    b.ingest("old", 1, [ev(i) for i in range(1, 5)])
    b.flush()
    b.ack(S, "old", 4)  # all read: kept only for replay
    b.flush()
    b.ingest("new", 1, [ev(1), ev(2)], client=P)
    _, ctl = b.flush()
    assert acks_of(ctl) == [["new", 2]]
    assert b.info("old").first_seq == 3 or b.info("old").current_load <= 2
    assert b.stats().buffered_bytes <= size * 4


def test_memory_cap_never_trims_unread_events(clock: FakeClock) -> None:
    size = len(ev(1))
    b = Broker(clock, max_buffered_bytes=size * 2)
    b.ingest("kept", 1, [ev(1), ev(2)])  # no subscriber yet: kept for the first one
    b.ok(A, "close", {"stream": "kept"})
    clock.advance(10)
    b.ingest("other", 1, [ev(1)])
    assert acks_of(b.flush()[1]) == []
    assert b.info("kept").current_load == 2 and b.info("other").parked == 1
    # Removing a stream gives its memory back, and what the cap held goes in.
    b.request(A, "cleanup", {"threshold": 5})
    _, ctl = b.flush()
    assert of_kind(ctl, "ok", A)[0][2] == {"removed": 1}
    assert acks_of(ctl) == [["other", 1]]
    assert b.stats().buffered_bytes == size


def test_stats_count_every_limit_by_name(clock: FakeClock) -> None:
    b = Broker(clock, max_streams=1, max_message_size=300, window=1, buffer_size=1)
    b.ingest("a", 1, [ev(1)])
    b.ingest("b", 1, [ev(1)])  # max_streams
    b.ingest("a", 2, [ev(i) for i in range(2, 40)])  # max_message_size
    b.subscribed(S, "a")
    b.ingest("a", 40, [ev(2), ev(3), ev(4)])  # 40 parks, 41 is over the window of 1
    b.flush()
    limits = {"max_streams": 1, "max_message_size": 1, "window": 2, "buffer_size": 3}
    assert b.stats().limits == limits  # buffer_size: 40, 41, 42 found the stream full
    assert P and A  # the helpers' clients


def test_events_admitted_at_close_stay_outside_the_memory_cap(clock: FakeClock) -> None:
    # Parked events are outside the cap; admitted at close (they were published
    # already) they stay outside it, so a close cannot push other streams over it.
    size = len(ev(1))
    b = Broker(clock, buffer_size=2, max_buffered_bytes=3 * size)
    b.ingest("a", 1, [ev(i) for i in range(1, 6)])  # 2 buffered, 3 parked, no subscriber
    b.flush()
    b.ok(A, "close", {"stream": "a"})
    assert b.stats().buffered_bytes == 2 * size
    b.ok(A, "create", {"stream": "d", "policy": "drop"})
    b.ingest("d", 1, [ev(9)], client=Q)
    _, ctl = b.flush()
    assert of_kind(ctl, "dropped", Q) == [] and acks_of(ctl, Q) == [["d", 1]]
    assert b.stats().buffered_bytes == 3 * size
    reply = b.subscribed(S, "a")  # all five readable, then trimmed like any history
    assert texts(reply["events"]) == [f"t{i}" for i in range(1, 6)]
    b.ack(S, "a", 5)
    b.core.streams.find("a").trim()  # type: ignore[union-attr]
    assert b.stats().buffered_bytes == 1 * size
    assert b.core.streams.find("a").held_over == 0  # type: ignore[union-attr]
