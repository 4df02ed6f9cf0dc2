"""Tests for broker.core.BrokerCore, driven in memory: bytes in, bytes out, a fake clock.

No sockets: each test feeds ``on_ingest`` / ``on_control`` / ``on_subscription`` /
``on_tick`` and reads what ``flush()`` returns, like h11's tests drive its
connection state machine.

The core threads its ``clock`` through to stream activity (``StreamBuffer.touch``,
``StreamManager.inactive``); the ``clock`` fixture also points those modules'
``time`` at the same fake clock, and two tests check the ``clock`` argument alone
is enough.
"""

from __future__ import annotations

import time
import types
from datetime import datetime, timezone
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import broker.buffer
import zevents.manager
from broker.config import BrokerConfig
from broker.core import BrokerCore
from zevents.errors import InvalidEventError, StreamFullError, StreamNotFoundError
from zevents.events import Event, EventType
from zevents.protocol import frames
from zevents.protocol.frames import KIND_EVENTS, PROTOCOL_VERSION
from zevents.protocol.producer import ProducerState, StreamClosed
from zevents.protocol.records import BrokerStats, RemoteStreamInfo
from zevents.protocol.session import Session
from zevents.protocol.subscriber import SubscriberState

TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
P = b"P" * 16  # a producer
Q = b"Q" * 16  # another producer
S = b"S" * 16  # a subscriber
T = b"T" * 16  # another subscriber
A = b"A" * 16  # an admin
START = 10_000.0
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeClock:
    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    fake_time = types.SimpleNamespace(monotonic=c)
    monkeypatch.setattr(broker.buffer, "time", fake_time)
    monkeypatch.setattr(zevents.manager, "time", fake_time)
    return c


def ev(i: int) -> bytes:
    return Event(EventType.TEXT_DELTA, {"text": f"t{i}"}, TS).to_msgpack()


def bad_ev() -> bytes:
    return msgpack.packb({"type": "TextDelta", "data": {"text": 1}, "timestamp": TS}, datetime=True)  # type: ignore[no-any-return]


def ingest(sid: str, pseq: int, events: list[bytes], client: bytes = P) -> bytes:
    return frames.encode_ingest(frames.topic(sid), client, pseq, b"".join(events))


def texts(batch: bytes) -> list[str]:
    return [m["data"]["text"] for m in frames.split_events(batch)]


class Broker:
    """A BrokerCore plus helpers to talk to it and read what it says."""

    def __init__(self, clock: FakeClock | None = None, **config: Any) -> None:
        config.setdefault("buffer_size", 100)
        config.setdefault("ack_delay", 0.0)  # every flush sends what is owed (tested apart)
        self.clock = clock or FakeClock(time.monotonic())  # same origin as the streams' clock
        self.core = BrokerCore(
            BrokerConfig(**config),
            {
                "control": "tcp://0.0.0.0:7000",
                "ingest": "tcp://0.0.0.0:7001",
                "publish": "tcp://0.0.0.0:7002",
            },
            clock=self.clock,
        )
        self._req = 0
        self._tokens = 0

    # -- output --------------------------------------------------------------------

    def flush(self) -> tuple[list[bytes], list[tuple[bytes, list[Any]]]]:
        pub, ctl = self.core.flush()
        return pub, [(c, frames.decode_control(f)) for c, f in ctl]

    def ctl(self) -> list[tuple[bytes, list[Any]]]:
        pub, ctl = self.flush()
        assert pub == []
        return ctl

    # -- input ---------------------------------------------------------------------

    def ingest(self, sid: str, pseq: int, events: list[bytes], client: bytes = P) -> None:
        self.core.on_ingest(ingest(sid, pseq, events, client))

    def send(self, client: bytes, *parts: Any) -> None:
        self.core.on_control(client, frames.encode_control(*parts))

    def request(self, client: bytes, op: str, args: dict[str, Any] | None = None) -> int:
        self._req += 1
        self.send(client, op, self._req, {} if args is None else args)
        return self._req

    def call(self, client: bytes, op: str, args: dict[str, Any] | None = None) -> list[Any]:
        """A request and its reply (which must come in this round)."""
        rid = self.request(client, op, args)
        _, ctl = self.flush()
        replies = [m for c, m in ctl if c == client and m[0] in ("ok", "err") and m[1] == rid]
        assert len(replies) == 1, ctl
        return replies[0]

    def ok(self, client: bytes, op: str, args: dict[str, Any] | None = None) -> Any:
        reply = self.call(client, op, args)
        assert reply[0] == "ok", reply
        return reply[2]

    def err(
        self, client: bytes, op: str, args: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        reply = self.call(client, op, args)
        assert reply[0] == "err", reply
        assert isinstance(reply[3], str)
        return reply[2], reply[4]

    def token(self) -> bytes:
        self._tokens += 1
        return b"tok-%d" % self._tokens

    def marker(self, token: bytes) -> None:
        self.core.on_subscription(b"\x01\x00" + token)

    def subscribe(
        self, client: bytes, sid: str, from_seq: int | None = None, **extra: Any
    ) -> list[Any]:
        token = self.token()
        self.core.on_subscription(b"\x01" + frames.topic(sid))  # the topic (ignored by the core)
        self.marker(token)
        return self.call(
            client, "subscribe", {"stream": sid, "from_seq": from_seq, "token": token, **extra}
        )

    def subscribed(self, client: bytes, sid: str, from_seq: int | None = None) -> dict[str, Any]:
        """Subscribe (creating the stream with the broker's defaults if need be)."""
        reply = self.subscribe(client, sid, from_seq, create=True)
        assert reply[0] == "ok", reply
        return reply[2]  # type: ignore[no-any-return]

    def ack(self, client: bytes, *flat: Any) -> None:
        self.send(client, "ack", list(flat))

    def stats(self) -> BrokerStats:
        return BrokerStats.from_wire(self.ok(A, "stats"))  # type: ignore[no-any-return]

    def info(self, sid: str) -> RemoteStreamInfo:
        return RemoteStreamInfo.from_wire(self.ok(A, "info", {"stream": sid}))  # type: ignore[no-any-return]


def acks_of(ctl: list[tuple[bytes, list[Any]]], client: bytes = P) -> list[list[Any]]:
    return [m[2] for c, m in ctl if c == client and m[0] == "ack"]


def of_kind(ctl: list[tuple[bytes, list[Any]]], kind: str, client: bytes = P) -> list[list[Any]]:
    return [m for c, m in ctl if c == client and m[0] == kind]


def published(pub: list[bytes]) -> list[tuple[str, str, int, list[str]]]:
    out = []
    for frame in pub:
        sid, kind, seq, start = frames.decode_publish(frame)
        out.append((sid, chr(kind), seq, texts(frame[start:]) if kind == KIND_EVENTS else []))
    return out


@pytest.fixture
def b(clock: FakeClock) -> Broker:
    return Broker(clock)


# -- handshake ---------------------------------------------------------------------------


def test_hello_reply(b: Broker) -> None:
    result = b.ok(A, "hello", {"version": PROTOCOL_VERSION})
    assert result["version"] == PROTOCOL_VERSION
    assert result["broker_id"] == b.core.broker_id
    assert len(result["broker_id"]) == 16
    assert result["ingest"] == "tcp://0.0.0.0:7001"
    assert result["publish"] == "tcp://0.0.0.0:7002"
    assert result["limits"] == b.core.config.limits()
    assert result["limits"]["buffer_size"] == 100


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_hello_version_mismatch(b: Broker, version: Any) -> None:
    code, fields = b.err(A, "hello", {"version": version})
    assert code == "VERSION_MISMATCH"
    assert fields == {}


def test_session_handshake_through_the_core(b: Broker) -> None:
    session = Session("tcp://192.168.1.5:7000")
    b.core.on_control(session.client_id, session.hello(START))
    ((client, frame),) = b.core.flush()[1]
    assert client == session.client_id
    reply = session.on_reply(frames.decode_control(frame))
    assert reply is not None and reply.error is None
    assert session.handshake is not None
    assert session.handshake.broker_id == b.core.broker_id
    assert session.handshake.ingest == "tcp://192.168.1.5:7001"  # wildcard replaced
    assert session.handshake.publish == "tcp://192.168.1.5:7002"
    assert not session.restarted(b.core.broker_id)
    assert session.restarted(Broker().core.broker_id)  # another process, another ID


# -- ingest, acks, publish -----------------------------------------------------------------


def test_acks_are_coalesced_until_a_quarter_window_a_delay_or_a_sync(clock: FakeClock) -> None:
    b = Broker(clock, ack_delay=0.005, window=256)  # a quarter window is 64 events
    b.ingest("s", 1, [ev(1)])
    assert acks_of(b.flush()[1]) == []  # one event owed: it may wait
    clock.advance(0.004)
    b.ingest("s", 2, [ev(2)])
    assert acks_of(b.flush()[1]) == []
    assert b.core.next_deadline() == pytest.approx(clock() + 0.001)
    clock.advance(0.002)  # the first owed ack is now 6 ms old
    assert acks_of(b.flush()[1]) == [["s", 2]]
    assert b.core.next_deadline() is None
    b.ingest("s", 3, [ev(i) for i in range(3, 67)])  # 64 events: a quarter window
    assert acks_of(b.flush()[1]) == [["s", 66]]
    b.ingest("s", 67, [ev(67)])
    b.send(P, "sync", 9, {})  # the producer is about to wait: ack it now
    ctl = b.flush()[1]
    assert acks_of(ctl) == [["s", 67]]
    assert [m for _, m in ctl if m[0] == "ok"] == [["ok", 9, {}]]


def test_sync_acks_again_what_was_answered_but_not_past_a_parked_event(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=2)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])  # 3 is parked: the stream holds 2
    b.ingest("t", 1, [ev(1)])
    (first,) = acks_of(b.flush()[1])
    assert dict(zip(first[::2], first[1::2], strict=True)) == {"s": 2, "t": 1}
    b.send(P, "sync", 4, {})  # as if those acks were lost: they come again
    (ack,) = acks_of(b.flush()[1])
    assert dict(zip(ack[::2], ack[1::2], strict=True)) == {"s": 2, "t": 1}  # never past parked 3
    b.ack(S, "s", 2)  # room: 3 goes in and is acked
    assert acks_of(b.flush()[1]) == [["s", 3]]


def test_ingest_is_acked_with_the_right_pseq_after_flush(b: Broker) -> None:
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])
    pub, ctl = b.flush()
    assert ctl == [(P, ["ack", b.core.broker_id, ["s", 3]])]
    assert pub == [frames.encode_events(frames.topic("s"), 1, [ev(1), ev(2), ev(3)])]
    assert b.flush() == ([], [])  # said once


def test_publish_frame_layout_keeps_event_bytes(b: Broker) -> None:
    # an event in an unusual but valid shape: keys reordered, an extra top-level key
    odd = msgpack.packb(
        {
            "timestamp": msgpack.Timestamp(1, 5),
            "extra": [1, 2],
            "data": {"text": "x", "k": None},
            "type": "TextDelta",
        }
    )
    b.ingest("chat", 1, [odd, ev(2)])
    pub, _ = b.flush()
    assert pub == [b"chat\x00E" + (1).to_bytes(8, "big") + odd + ev(2)]
    reply = b.subscribed(S, "chat")
    assert reply["events"] == odd + ev(2)  # replay: the same bytes, never re-encoded


def test_one_ack_per_producer_per_round_covering_every_stream(b: Broker) -> None:
    b.ingest("a", 1, [ev(1)])
    b.ingest("a", 2, [ev(2), ev(3)])
    b.ingest("b", 1, [ev(1)])
    b.ingest("a", 1, [ev(9)], client=Q)
    pub, ctl = b.flush()
    assert sorted(acks_of(ctl, P)) == [["a", 3, "b", 1]]
    assert acks_of(ctl, Q) == [["a", 1]]
    assert [(sid, seq, t) for sid, _, seq, t in published(pub)] == [
        ("a", 1, ["t1", "t2", "t3", "t9"]),
        ("b", 1, ["t1"]),
    ]


def test_publish_split_at_max_batch(clock: FakeClock) -> None:
    b = Broker(clock, max_batch=2)
    b.ingest("s", 1, [ev(i) for i in range(1, 6)])
    pub, _ = b.flush()
    assert [(seq, t) for _, _, seq, t in published(pub)] == [
        (1, ["t1", "t2"]),
        (3, ["t3", "t4"]),
        (5, ["t5"]),
    ]


def test_producer_state_round_trip(b: Broker) -> None:
    prod = ProducerState(P, window=4)
    frame = prod.encode("s", [ev(1), ev(2)])
    b.core.on_ingest(frame)
    frame = prod.encode("s", [ev(3)])
    b.core.on_ingest(frame)
    assert prod.room("s") == 1
    for client, msg in b.flush()[1]:
        assert client == P
        assert prod.on_message(msg) == []
    assert prod.unanswered() == 0 and prod.room("s") == 4


def test_ingest_frame_with_no_events_is_refused_without_creating(b: Broker) -> None:
    b.ingest("s", 1, [])
    ((_, msg),) = b.flush()[1]
    assert msg[:3] == ["err", 0, "PROTOCOL_ERROR"]
    assert "s" not in b.core.streams
    assert b.stats().bad_input.get("ingest") == 1


def test_pseq_sequence_across_frames_and_streams_is_independent(b: Broker) -> None:
    b.ingest("a", 1, [ev(1)])
    b.ingest("b", 1, [ev(1)])
    b.ingest("a", 2, [ev(2)])
    assert acks_of(b.flush()[1]) == [["a", 2, "b", 1]]


# -- dedup -----------------------------------------------------------------------------------


def test_resent_pseqs_are_acked_not_admitted_again(b: Broker) -> None:
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])
    b.flush()
    b.ingest("s", 2, [ev(2), ev(3), ev(4)])  # a resend of 2, 3 plus a new 4
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 4]]
    assert [(seq, t) for _, _, seq, t in published(pub)] == [(4, ["t4"])]
    b.ingest("s", 1, [ev(1)])  # entirely old
    pub, ctl = b.flush()
    assert pub == []
    assert acks_of(ctl) == [["s", 1]]
    assert b.info("s").events_in == 4


def test_dedup_is_per_producer(b: Broker) -> None:
    b.ingest("s", 1, [ev(1)])
    b.ingest("s", 1, [ev(2)], client=Q)
    pub, _ = b.flush()
    assert published(pub) == [("s", "E", 1, ["t1", "t2"])]


def test_producer_resend_after_broker_restart(clock: FakeClock) -> None:
    old = Broker(clock)
    prod = ProducerState(P)
    old.core.on_ingest(prod.encode("s", [ev(1), ev(2)]))
    for _, msg in old.flush()[1]:
        prod.on_message(msg)
    old.core.on_ingest(prod.encode("s", [ev(3), ev(4)]))  # never answered: the broker died
    new = Broker(clock)
    for frame in prod.resend():
        new.core.on_ingest(frame)
    # pseq 3 with nothing before it: the new broker asks from 1, and takes nothing yet.
    pub, ctl = new.flush()
    assert pub == [] and of_kind(ctl, "resend") == [["resend", "s", 1]]
    rebase = prod.on_resend("s", 1)
    assert rebase == 3  # 1 and 2 were answered by the old broker
    assert new.ok(P, "rebase", {"stream": "s", "pseq": rebase}) == {"next_pseq": 3}
    for frame in prod.resend_stream("s"):
        new.core.on_ingest(frame)
    pub, ctl = new.flush()
    assert published(pub) == [("s", "E", 1, ["t3", "t4"])]
    assert acks_of(ctl) == [["s", 4]]
    for _, msg in ctl:
        prod.on_message(msg)
    assert prod.unanswered() == 0


def test_a_gap_in_a_producers_frames_is_filled_before_anything_after_it(b: Broker) -> None:
    prod = ProducerState(P)
    b.core.on_ingest(prod.encode("s", [ev(1)]))
    prod.encode("s", [ev(2), ev(3)])  # lost on the way (a dropped connection)
    b.core.on_ingest(prod.encode("s", [ev(4)]))
    b.core.on_ingest(prod.encode("s", [ev(5)]))  # already on its way: asks no second time
    pub, ctl = b.flush()
    assert published(pub) == [("s", "E", 1, ["t1"])]
    assert of_kind(ctl, "resend") == [["resend", "s", 2]]
    assert prod.on_resend("s", 2) is None  # 2.. are unanswered: just send them again
    for frame in prod.resend_stream("s"):
        b.core.on_ingest(frame)
    pub, ctl = b.flush()
    assert published(pub) == [("s", "E", 2, ["t2", "t3", "t4", "t5"])]
    assert acks_of(ctl) == [["s", 5]]


def test_rebase_never_moves_a_producer_back(b: Broker) -> None:
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])
    b.flush()
    assert b.ok(P, "rebase", {"stream": "s", "pseq": 2}) == {"next_pseq": 4}
    assert b.err(P, "rebase", {"stream": "s", "pseq": 0})[0] == "PROTOCOL_ERROR"
    # An unknown stream is created, as the producer's events would have created it.
    assert b.ok(P, "rebase", {"stream": "new", "pseq": 5}) == {"next_pseq": 5}
    b.ingest("new", 5, [ev(5)])
    assert acks_of(b.flush()[1]) == [["new", 5]]


# -- invalid events ------------------------------------------------------------------------


def test_invalid_event_is_nacked_and_valid_neighbours_admitted(b: Broker) -> None:
    b.ingest("s", 1, [ev(1), bad_ev(), ev(3)])
    pub, ctl = b.flush()
    (nack,) = of_kind(ctl, "nack")
    assert nack[:5] == ["nack", "s", 2, 2, "INVALID_EVENT"]
    assert nack[5].startswith("invalid event: ")
    assert nack[6] == {}
    assert acks_of(ctl) == [["s", 3]]
    assert published(pub) == [("s", "E", 1, ["t1", "t3"])]
    stats = b.stats()
    assert stats.rejected == 1
    assert stats.bad_input == {"event": 1}
    assert b.info("s").rejected == 1


def test_nack_comes_before_the_ack_that_passes_it(b: Broker) -> None:
    b.ingest("s", 1, [bad_ev(), ev(2)])
    kinds = [m[0] for _, m in b.flush()[1]]
    assert kinds == ["nack", "ack"]


def test_producer_sees_invalid_event_once(b: Broker) -> None:
    prod = ProducerState(P)
    b.core.on_ingest(prod.encode("s", [ev(1), bad_ev(), ev(3)]))
    for _, msg in b.flush()[1]:
        prod.on_message(msg)
    assert prod.unanswered() == 0
    with pytest.raises(InvalidEventError):
        prod.check("s")
    prod.check("s")


def test_truncated_tail_is_one_nacked_pseq(b: Broker) -> None:
    b.ingest("s", 1, [ev(1), ev(2)[:-4]])
    pub, ctl = b.flush()
    (nack,) = of_kind(ctl, "nack")
    assert nack[1:5] == ["s", 2, 2, "INVALID_EVENT"]
    assert acks_of(ctl) == [["s", 2]]
    assert published(pub) == [("s", "E", 1, ["t1"])]


# -- BLOCK -------------------------------------------------------------------------------------


def test_block_parks_when_full_publishes_at_once_and_admits_after_acks(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=2)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2), ev(3), ev(4)])
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 2]]  # 3 and 4 are parked: unanswered...
    assert published(pub) == [("s", "E", 1, ["t1", "t2", "t3", "t4"])]  # ...but published
    info = b.info("s")
    assert (info.current_load, info.parked, info.last_seq) == (2, 2, 4)
    assert b.stats().parked == 2

    b.ack(S, "s", 1)
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 3]]  # admitted, so answered
    assert published(pub) == []
    b.ack(S, "s", 4)  # (a subscriber may ack what is still parked: it has it)
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 4]]
    assert published(pub) == []
    info = b.info("s")
    assert (info.first_seq, info.last_seq, info.parked) == (3, 4, 0)


def test_block_with_no_subscriber_ever_keeps_the_first_events(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=2)
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])
    assert acks_of(b.flush()[1]) == [["s", 2]]
    reply = b.subscribed(S, "s")  # the first subscriber gets the first events (and 3, parked)
    assert (reply["first_seq"], texts(reply["events"]), reply["last_seq"]) == (
        1,
        ["t1", "t2", "t3"],
        3,
    )
    b.ack(S, "s", 2)
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 3]]
    assert published(pub) == []


def test_parked_events_hold_back_later_events_of_every_producer(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=1)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2)])  # 2 parked
    b.ingest("s", 1, [ev(10)], client=Q)  # parked behind P's 2
    b.ingest("s", 3, [ev(3)])  # parked; must not be acked past 2
    pub, ctl = b.flush()
    assert published(pub) == [("s", "E", 1, ["t1", "t2", "t10", "t3"])]  # in the order admitted
    assert acks_of(ctl, P) == [["s", 1]]
    assert acks_of(ctl, Q) == []
    rounds = []
    for seq in (1, 2, 3):
        b.ack(S, "s", seq)  # each ack makes room for one
        pub, ctl = b.flush()
        rounds.append((published(pub), acks_of(ctl, P), acks_of(ctl, Q)))
    assert rounds == [  # admitted in arrival order across producers: P2, Q1, P3
        ([], [["s", 2]], []),
        ([], [], [["s", 1]]),
        ([], [["s", 3]], []),
    ]


def test_block_parked_event_holds_cumulative_ack_past_invalid_ones(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=1)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2), bad_ev()])
    _, ctl = b.flush()
    assert acks_of(ctl) == [["s", 1]]
    assert [m[2:4] for m in of_kind(ctl, "nack")] == [[3, 3]]
    b.ack(S, "s", 1)
    assert acks_of(b.flush()[1]) == [["s", 2]]


def test_max_parked_nacks_stream_full(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=1, max_parked=2)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(i) for i in range(1, 7)])
    _, ctl = b.flush()
    (nack,) = of_kind(ctl, "nack")  # one answer for the run refused, not one per event
    assert nack[1:5] == ["s", 4, 6, "STREAM_FULL"]
    assert nack[6]["buffer_size"] == 1
    assert b.stats().rejected == 3
    assert b.stats().limits.get("max_parked") == 3
    prod = ProducerState(P)
    prod.encode("s", [ev(i) for i in range(6)])
    for _, msg in ctl:
        prod.on_message(msg)
    with pytest.raises(StreamFullError):
        prod.check("s")


@pytest.mark.parametrize("limit", ["none", "window", "max_parked"])
def test_frames_behind_parked_events_park_whole_or_to_the_limit(
    clock: FakeClock, limit: str
) -> None:
    # A frame arriving while events are parked parks in one go (the hot path of a
    # small BLOCK buffer), unless that would pass the window or max_parked: then
    # exactly the events over it are refused, by one nack.
    kw = {"none": {}, "window": {"window": 4}, "max_parked": {"max_parked": 4}}[limit]
    b = Broker(clock, buffer_size=2, **kw)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])  # 3 parked
    b.ingest("s", 4, [ev(i) for i in range(4, 9)])  # 4..8 behind it
    pub, ctl = b.flush()
    kept = 8 if limit == "none" else 6
    assert published(pub) == [("s", "E", 1, [f"t{i}" for i in range(1, kept + 1)])]
    assert acks_of(ctl) == [["s", 2]]
    refused = [m[2:4] for m in of_kind(ctl, "nack")]
    assert refused == ([] if limit == "none" else [[7, 8]])
    assert b.info("s").parked == (6 if limit == "none" else 4)
    assert b.stats().limits.get("buffer_size") == 6
    assert b.stats().limits.get(limit) == (None if limit == "none" else 2)
    b.ack(S, "s", 2)  # room for two: 3 and 4 go in, acked through 4
    pub, ctl = b.flush()
    assert published(pub) == []
    assert acks_of(ctl) == [["s", 4]]


def test_unsubscribe_reply_round_carries_the_admission(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=1)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2)])
    assert published(b.flush()[0]) == [("s", "E", 1, ["t1", "t2"])]
    b.request(S, "unsubscribe", {"stream": "s"})
    pub, ctl = b.flush()
    assert published(pub) == []
    assert acks_of(ctl) == [["s", 2]]
    info = b.info("s")
    assert (info.subscribers, info.parked, info.last_seq) == (0, 0, 2)


# -- DROP ------------------------------------------------------------------------------------


def test_drop_counts_and_reports(b: Broker) -> None:
    info = b.ok(A, "create", {"stream": "d", "buffer_size": 2, "policy": "DROP"})
    assert (info["buffer_size"], info["policy"]) == (2, "drop")
    b.ingest("d", 1, [ev(i) for i in range(1, 6)])
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["d", 5]]  # dropped events are answered too
    assert of_kind(ctl, "dropped") == [["dropped", "d", 3, 2]]
    assert published(pub) == [("d", "E", 1, ["t1", "t2"])]
    assert b.info("d").dropped == 3
    assert b.stats().dropped == 3
    prod = ProducerState(P)
    prod.encode("d", [ev(i) for i in range(1, 6)])
    for _, msg in ctl:
        prod.on_message(msg)
    with pytest.raises(StreamFullError) as err:
        prod.check("d")
    assert err.value.dropped == 3 and err.value.buffer_size == 2
    prod.check("d")


def test_drop_reports_per_round(b: Broker) -> None:
    b.ok(A, "create", {"stream": "d", "buffer_size": 1, "policy": "drop"})
    b.ingest("d", 1, [ev(1), ev(2)])
    assert of_kind(b.flush()[1], "dropped") == [["dropped", "d", 1, 1]]
    b.ingest("d", 3, [ev(3)])
    assert of_kind(b.flush()[1], "dropped") == [["dropped", "d", 1, 1]]
    b.ingest("d", 1, [ev(4)], client=Q)
    _, ctl = b.flush()
    assert of_kind(ctl, "dropped", Q) == [["dropped", "d", 1, 1]]
    assert of_kind(ctl, "dropped", P) == []


def test_drop_keeps_room_once_subscribers_acked(b: Broker) -> None:
    b.ok(A, "create", {"stream": "d", "buffer_size": 2, "policy": "drop"})
    b.subscribed(S, "d")
    b.ingest("d", 1, [ev(1), ev(2)])
    b.ack(S, "d", 2)
    b.ingest("d", 3, [ev(3), ev(4)])
    _, ctl = b.flush()
    assert of_kind(ctl, "dropped") == []
    assert b.info("d").last_seq == 4


# -- subscribe -----------------------------------------------------------------------------


@pytest.mark.parametrize("marker_first", [True, False], ids=["marker-first", "command-first"])
def test_subscribe_handshake_in_either_order(b: Broker, marker_first: bool) -> None:
    b.ingest("s", 1, [ev(1), ev(2)])
    b.flush()
    token = b"abc"
    if marker_first:
        b.marker(token)
    rid = b.request(S, "subscribe", {"stream": "s", "from_seq": None, "token": token})
    if not marker_first:
        assert b.flush() == ([], [])  # no reply before the marker
        assert b.info("s").subscribers == 0
        b.marker(token)
    _, ctl = b.flush()
    assert len(ctl) == 1
    client, (kind, req_id, result) = ctl[0]
    assert (client, kind, req_id) == (S, "ok", rid)
    assert result == {
        "stream": "s",
        "first_seq": 1,
        "events": ev(1) + ev(2),
        "count": 2,
        "last_seq": 2,
        "closed": False,
        "buffer_size": 100,
        "policy": "block",
    }
    assert b.info("s").subscribers == 1


def test_subscriber_state_seam_through_the_core(b: Broker) -> None:
    """Live frames published before the subscribe reply arrives are sorted out."""
    b.ingest("s", 1, [ev(1), ev(2)])
    b.flush()
    sub = SubscriberState()
    sub.add("s")
    token = b"seam"
    b.core.on_subscription(b"\x01" + frames.topic("s"))
    b.request(S, "subscribe", {"stream": "s", "token": token})
    b.ingest("s", 3, [ev(3)])  # same round as the marker: in the replay and live
    b.marker(token)
    b.ingest("s", 4, [ev(4)])
    pub, ctl = b.flush()
    for frame in pub:  # live frames overtake the reply
        sub.on_publish(frame)
    (reply,) = [m for c, m in ctl if c == S]
    sub.on_replay(reply[2], subscribed=True)
    got = []
    while (e := sub.next_event("s")) is not None:
        got.append((e.seq, e.data["text"]))
    assert got == [(1, "t1"), (2, "t2"), (3, "t3"), (4, "t4")]
    assert sub.take_fetches() == []


def test_subscribe_from_seq(b: Broker) -> None:
    b.ingest("s", 1, [ev(i) for i in range(1, 6)])
    b.flush()
    r = b.subscribed(S, "s", from_seq=4)
    assert (r["first_seq"], r["count"], texts(r["events"]), r["last_seq"]) == (
        4,
        2,
        ["t4", "t5"],
        5,
    )
    r = b.subscribed(T, "s", from_seq=9)
    assert (r["first_seq"], r["count"], r["events"]) == (9, 0, b"")


def test_subscribe_replay_is_cut_at_max_batch(clock: FakeClock) -> None:
    b = Broker(clock, max_batch=2)
    b.ingest("s", 1, [ev(i) for i in range(1, 6)])
    b.flush()
    r = b.subscribed(S, "s")
    assert (r["first_seq"], r["count"], r["last_seq"]) == (1, 2, 5)


def test_subscribe_from_evicted_seq_names_the_missing_range(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=2)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(i) for i in range(1, 5)])
    for seq in range(1, 5):
        b.ack(S, "s", seq)
    b.flush()
    assert b.info("s").first_seq == 3
    b.marker(b"late")
    code, fields = b.err(T, "subscribe", {"stream": "s", "from_seq": 1, "token": b"late"})
    assert code == "SEQ_UNAVAILABLE"
    assert (fields["first_missing"], fields["last_missing"], fields["stream"]) == (1, 2, "s")
    r = b.subscribed(T, "s")
    assert r["first_seq"] == 3


def test_subscribe_unknown_stream(b: Broker) -> None:
    reply = b.subscribe(S, "nope")
    assert reply[0] == "err" and reply[2] == "STREAM_NOT_FOUND"
    assert reply[4] == {"stream": "nope", "op": "subscribe"}
    reply = b.subscribe(S, "nope", create=True)
    assert reply[0] == "ok"
    assert reply[2]["count"] == 0 and reply[2]["first_seq"] == 1


@pytest.mark.parametrize(
    "args, code",
    [
        ({"stream": "s", "token": ""}, "PROTOCOL_ERROR"),
        ({"stream": "s", "token": "str-token"}, "PROTOCOL_ERROR"),
        ({"stream": "s"}, "PROTOCOL_ERROR"),
        ({"stream": "", "token": b"t"}, "INVALID_STREAM_ID"),
        ({"stream": 5, "token": b"t"}, "INVALID_STREAM_ID"),
        ({"token": b"t"}, "INVALID_STREAM_ID"),
    ],
)
def test_subscribe_bad_arguments(b: Broker, args: dict[str, Any], code: str) -> None:
    b.ok(A, "create", {"stream": "s"})
    assert b.err(S, "subscribe", args)[0] == code


def test_subscribe_bad_from_seq_after_marker(b: Broker) -> None:
    b.ok(A, "create", {"stream": "s"})
    b.marker(b"t")
    assert (
        b.err(S, "subscribe", {"stream": "s", "token": b"t", "from_seq": "1"})[0]
        == "PROTOCOL_ERROR"
    )
    assert b.info("s").subscribers == 0


def test_subscribe_whose_marker_never_arrives_times_out(b: Broker, clock: FakeClock) -> None:
    b.ok(A, "create", {"stream": "s"})
    rid = b.request(S, "subscribe", {"stream": "s", "token": b"lost"})
    clock.advance(29)
    b.send(S, "hb", {})  # keep the client alive
    b.core.on_tick()
    assert [m[0] for _, m in b.flush()[1]] == ["hb"]
    clock.advance(2)
    b.send(S, "hb", {})
    b.core.on_tick()
    _, ctl = b.flush()
    errs = [m for _, m in ctl if m[0] == "err"]
    assert errs and errs[0][1] == rid and errs[0][2] == "PROTOCOL_ERROR"
    b.marker(b"lost")  # too late: nothing happens
    assert b.flush() == ([], [])
    assert b.info("s").subscribers == 0


def test_stale_marker_is_forgotten(b: Broker, clock: FakeClock) -> None:
    b.ok(A, "create", {"stream": "s"})
    b.marker(b"old")
    clock.advance(31)
    b.core.on_tick()
    b.request(S, "subscribe", {"stream": "s", "token": b"old"})
    assert b.flush()[1] == []  # waits for a marker again


def test_resubscribe_resets_the_cursor(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=2)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])
    b.ack(S, "s", 2)
    b.flush()
    r = b.subscribed(S, "s", from_seq=3)
    assert r["first_seq"] == 3
    assert b.info("s").subscribers == 1


# -- fetch -----------------------------------------------------------------------------------


def test_fetch(clock: FakeClock) -> None:
    b = Broker(clock, max_batch=3)
    b.ingest("s", 1, [ev(i) for i in range(1, 6)])
    b.flush()
    r = b.ok(S, "fetch", {"stream": "s", "from_seq": 2})
    assert (r["first_seq"], r["count"], texts(r["events"]), r["last_seq"], r["closed"]) == (
        2,
        3,
        ["t2", "t3", "t4"],
        5,
        False,
    )
    r = b.ok(S, "fetch", {"stream": "s", "from_seq": 6})
    assert (r["count"], r["events"]) == (0, b"")


@pytest.mark.parametrize("from_seq", [0, -1, None, "2", 1.0, True])
def test_fetch_bad_from_seq(b: Broker, from_seq: Any) -> None:
    b.ingest("s", 1, [ev(1)])
    assert b.err(S, "fetch", {"stream": "s", "from_seq": from_seq})[0] == "PROTOCOL_ERROR"


def test_fetch_evicted_and_unknown(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=1)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1)])
    b.ack(S, "s", 1)
    b.ingest("s", 2, [ev(2)])
    code, fields = b.err(S, "fetch", {"stream": "s", "from_seq": 1})
    assert code == "SEQ_UNAVAILABLE" and (fields["first_missing"], fields["last_missing"]) == (1, 1)
    assert b.err(S, "fetch", {"stream": "x", "from_seq": 1})[0] == "STREAM_NOT_FOUND"


# -- close -------------------------------------------------------------------------------------


def test_close_publishes_pending_then_end_and_tells_producers(b: Broker) -> None:
    b.ingest("s", 1, [ev(1)])
    b.flush()
    b.ingest("s", 2, [ev(2), ev(3)])
    b.ingest("s", 1, [ev(9)], client=Q)
    rid = b.request(A, "close", {"stream": "s"})
    pub, ctl = b.flush()
    assert published(pub) == [("s", "E", 2, ["t2", "t3", "t9"]), ("s", "X", 4, [])]
    assert pub[-1] == b"s\x00X" + (4).to_bytes(8, "big")
    assert of_kind(ctl, "closed", P) == [["closed", "s", 4]]
    assert of_kind(ctl, "closed", Q) == [["closed", "s", 4]]
    (reply,) = [m for c, m in ctl if c == A]
    assert reply[:2] == ["ok", rid] and reply[2]["closed"] is True and reply[2]["last_seq"] == 4
    prod = ProducerState(P)
    prod.encode("s", [ev(1), ev(2), ev(3)])
    notes: list[StreamClosed] = []
    for _, msg in [(c, m) for c, m in ctl if c == P]:
        notes += prod.on_message(msg)
    assert notes == [StreamClosed("s", 4)]


def test_close_admits_parked_and_nacks_later_ingest(clock: FakeClock) -> None:
    # Parked events were published as they parked: at close they are the stream's
    # last events (past the buffer), acked, and the end comes after them.
    b = Broker(clock, buffer_size=1)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])
    assert published(b.flush()[0]) == [("s", "E", 1, ["t1", "t2", "t3"])]
    b.request(A, "close", {"stream": "s"})
    pub, ctl = b.flush()
    assert published(pub) == [("s", "X", 3, [])]
    assert of_kind(ctl, "nack") == []
    assert acks_of(ctl) == [["s", 3]]
    assert [m[0] for c, m in ctl if c == P] == ["ack", "closed"]  # answered, then the end
    info = b.info("s")
    assert (info.first_seq, info.last_seq, info.current_load, info.parked) == (1, 3, 3, 0)
    assert info.rejected == 0
    reply = b.subscribed(T, "s")  # all three still there for a late reader
    assert texts(reply["events"]) == ["t1", "t2", "t3"]
    b.ingest("s", 4, [ev(4), ev(5)])
    _, ctl = b.flush()
    assert [n[1:5] for n in of_kind(ctl, "nack")] == [["s", 4, 5, "STREAM_CLOSED"]]
    assert of_kind(ctl, "nack")[0][6] == {"stream": "s", "op": "send"}
    assert acks_of(ctl) == []


def test_close_twice_and_unknown(b: Broker) -> None:
    b.ok(A, "create", {"stream": "s"})
    b.ok(A, "close", {"stream": "s"})
    assert b.err(A, "close", {"stream": "s"})[0] == "STREAM_CLOSED"
    assert b.err(A, "close", {"stream": "nope"})[0] == "STREAM_NOT_FOUND"


def test_closed_stream_readable_until_cleanup(b: Broker, clock: FakeClock) -> None:
    b.ingest("s", 1, [ev(1), ev(2)])
    b.ok(A, "close", {"stream": "s"})
    r = b.subscribed(S, "s")
    assert (r["closed"], r["last_seq"], texts(r["events"])) == (True, 2, ["t1", "t2"])
    r = b.ok(T, "fetch", {"stream": "s", "from_seq": 2})
    assert (r["closed"], texts(r["events"])) == (True, ["t2"])
    sub = SubscriberState()
    sub.add("s")
    sub.on_replay(b.subscribed(T, "s"), subscribed=True)
    assert [sub.next_event().seq, sub.next_event().seq] == [1, 2]  # type: ignore[union-attr]
    assert sub.finished("s")
    assert b.ok(A, "cleanup", {"threshold": 10}) == {"removed": 0}  # not idle yet
    clock.advance(11)
    assert b.ok(A, "cleanup", {"threshold": 10}) == {"removed": 1}
    assert b.subscribe(S, "s")[2] == "STREAM_NOT_FOUND"
    assert b.err(A, "info", {"stream": "s"})[0] == "STREAM_NOT_FOUND"
    b.ingest("s", 1, [ev(7)], client=Q)  # the name starts again at seq 1
    pub, _ = b.flush()
    assert published(pub) == [("s", "E", 1, ["t7"])]


def test_cleanup_closes_open_idle_streams(b: Broker, clock: FakeClock) -> None:
    b.ingest("old", 1, [ev(1)])
    b.flush()
    clock.advance(20)
    b.ingest("new", 1, [ev(1)])
    b.flush()
    rid = b.request(A, "cleanup", {"threshold": 10})
    pub, ctl = b.flush()
    assert ("old", "X", 1, []) in published(pub)
    assert of_kind(ctl, "closed") == [["closed", "old", 1]]
    assert [m for c, m in ctl if c == A] == [["ok", rid, {"removed": 1}]]
    assert [i["stream"] for i in b.ok(A, "list")] == ["new"]


@pytest.mark.parametrize("threshold", ["10", None, [1]])
def test_cleanup_bad_threshold(b: Broker, threshold: Any) -> None:
    assert b.err(A, "cleanup", {"threshold": threshold})[0] == "PROTOCOL_ERROR"


def test_shutdown_closes_every_open_stream(b: Broker) -> None:
    b.ingest("a", 1, [ev(1)])
    b.ingest("b", 1, [ev(1)])
    b.ok(A, "close", {"stream": "b"})
    b.flush()
    b.core.shutdown()
    pub, ctl = b.flush()
    assert published(pub) == [("a", "X", 1, [])]
    assert of_kind(ctl, "closed") == [["closed", "a", 1]]


# -- idle timeout ------------------------------------------------------------------------------


def test_idle_timeout_closes_then_removes(clock: FakeClock) -> None:
    b = Broker(clock, idle_timeout=60)
    b.ingest("s", 1, [ev(1)])
    b.flush()
    clock.advance(59)
    b.core.on_tick()
    assert b.flush() == ([], [])
    clock.advance(2)
    b.core.on_tick()
    pub, ctl = b.flush()
    assert published(pub) == [("s", "X", 1, [])]
    assert of_kind(ctl, "closed") == [["closed", "s", 1]]
    r = b.subscribed(S, "s")  # closing counts as activity: still readable
    assert r["closed"] and texts(r["events"]) == ["t1"]
    clock.advance(61)
    b.core.on_tick()
    assert b.flush() == ([], [])
    assert b.subscribe(T, "s")[2] == "STREAM_NOT_FOUND"


def test_activity_postpones_idle_close(clock: FakeClock) -> None:
    b = Broker(clock, idle_timeout=60)
    b.ingest("s", 1, [ev(1)])
    b.subscribed(S, "s")
    for _ in range(3):
        clock.advance(40)
        b.ack(S, "s", 1)  # an ack from a subscriber is activity
        b.core.on_tick()
        assert published(b.flush()[0]) == []
    assert not b.info("s").closed


def test_idle_timeout_zero_disables(clock: FakeClock) -> None:
    b = Broker(clock, idle_timeout=0)
    b.ingest("s", 1, [ev(1)])
    clock.advance(1e6)
    b.core.on_tick()
    assert published(b.flush()[0]) == [("s", "E", 1, ["t1"])]
    assert not b.info("s").closed


def test_idle_timeout_with_the_clock_argument_alone() -> None:
    clock = FakeClock(0.0)
    b = Broker(clock, idle_timeout=60)
    b.ingest("s", 1, [ev(1)])
    b.flush()
    clock.advance(61)
    b.core.on_tick()
    pub, _ = b.flush()
    assert published(pub) == [("s", "X", 1, [])]


def test_subscriber_ack_with_the_clock_argument_alone_keeps_stream_open() -> None:
    clock = FakeClock(0.0)
    b = Broker(clock, idle_timeout=1)
    b.ingest("s", 1, [ev(1)])
    b.subscribed(S, "s")
    b.ack(S, "s", 1)
    b.flush()
    assert 0 <= b.info("s").idle < 1
    b.core.on_tick()  # no time has passed
    assert published(b.flush()[0]) == []
    assert not b.info("s").closed


# -- liveness ------------------------------------------------------------------------------------


def test_heartbeat_reply_reports_lagging_heads(b: Broker) -> None:
    b.send(S, "hb", {})
    assert b.flush()[1] == [(S, ["hb", b.core.broker_id, []])]
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2)])
    b.flush()
    b.send(S, "hb", {})
    assert b.ctl() == [(S, ["hb", b.core.broker_id, [["s", 2, False]]])]
    b.ack(S, "s", 2)
    b.send(S, "hb", {})
    assert b.ctl() == [(S, ["hb", b.core.broker_id, []])]
    b.ok(A, "close", {"stream": "s"})
    b.flush()
    b.send(S, "hb", {})
    assert b.ctl() == [(S, ["hb", b.core.broker_id, [["s", 2, True]]])]
    b.send(P, "hb", {})
    assert b.ctl() == [(P, ["hb", b.core.broker_id, []])]


def test_subscriber_timeout_removes_cursor_and_unblocks_parked(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=1, subscriber_timeout=5)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.subscribed(T, "s")
    b.ingest("s", 1, [ev(1), ev(2)])
    assert published(b.flush()[0]) == [("s", "E", 1, ["t1", "t2"])]  # 2 parked, published
    assert b.info("s").parked == 1
    clock.advance(3)
    b.ack(T, "s", 1)  # T is alive and has read everything; S went silent at START
    b.core.on_tick()
    assert acks_of(b.flush()[1]) == []  # S (cursor 0) still gates
    clock.advance(2.5)  # S silent for 5.5 s, T for 2.5 s
    b.core.on_tick()
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 2]]
    assert published(pub) == []
    info = b.info("s")
    assert (info.subscribers, info.parked) == (1, 0)
    b.send(S, "hb", {})
    assert of_kind(b.flush()[1], "hb", S) == [["hb", b.core.broker_id, []]]  # no cursor: no heads


def test_last_subscriber_timing_out_admits_more_parked_than_the_buffer_holds(
    clock: FakeClock,
) -> None:
    b = Broker(clock, buffer_size=2, subscriber_timeout=5)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(i) for i in range(1, 8)])  # 2 admitted, 5 parked
    assert [seqs for *_, seqs in published(b.flush()[0])] == [[f"t{i}" for i in range(1, 8)]]
    assert b.info("s").parked == 5
    clock.advance(6)
    b.core.on_tick()  # S is gone: nobody gates, so every parked event goes in
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 7]]
    assert published(pub) == []
    info = b.info("s")
    assert (info.subscribers, info.parked, info.last_seq, info.first_seq) == (0, 0, 7, 6)


def test_subscriber_timeout_only_after_silence(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=1, subscriber_timeout=5)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2)])
    b.flush()
    for _ in range(4):  # a live subscriber heartbeats and keeps gating
        clock.advance(3)
        b.send(S, "hb", {})
        b.core.on_tick()
        assert acks_of(b.flush()[1]) == []
    assert b.info("s").parked == 1
    clock.advance(5.1)
    b.core.on_tick()
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 2]]
    assert published(pub) == []  # (at once, when it parked)
    info = b.info("s")
    assert (info.subscribers, info.parked) == (0, 0)
    stats = b.stats()
    assert stats.subscribers == 0


def test_timed_out_subscriber_gates_again_from_its_next_ack(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=2, subscriber_timeout=5)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1)])
    clock.advance(6)
    b.core.on_tick()
    assert b.info("s").subscribers == 0
    b.ack(S, "s", 1)  # it was only slow: back, from what it acknowledged
    b.ingest("s", 2, [ev(2), ev(3), ev(4)])
    _, ctl = b.flush()
    assert acks_of(ctl) == [["s", 3]]  # 4 waits for S again (parked, and published)
    assert b.info("s").subscribers == 1
    b.send(S, "hb", {})
    assert of_kind(b.flush()[1], "hb", S) == [["hb", b.core.broker_id, [["s", 4, False]]]]


def test_timed_out_subscriber_whose_position_left_is_not_restored(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=2, subscriber_timeout=5)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    clock.advance(6)
    b.core.on_tick()
    b.ingest("s", 1, [ev(1), ev(2), ev(3), ev(4)])  # no cursor: 1 and 2 leave
    b.ack(S, "s", 1)  # 2 is gone: its stream has a gap for it, it must resubscribe
    b.flush()
    assert b.info("s").subscribers == 0
    b.send(S, "hb", {})
    assert of_kind(b.flush()[1], "hb", S) == [["hb", b.core.broker_id, []]]


def test_ack_after_unsubscribe_does_not_gate_again(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=2)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2)])
    b.ok(S, "unsubscribe", {"stream": "s"})
    b.ack(S, "s", 1)  # sent before the application's unsubscribe took effect locally
    b.send(S, "hb", {})
    b.ingest("s", 3, [ev(3), ev(4), ev(5)])
    _, ctl = b.flush()
    assert b.info("s").subscribers == 0
    assert acks_of(ctl) == [["s", 5]]


def test_clients_counted_while_alive(b: Broker, clock: FakeClock) -> None:
    b.send(S, "hb", {})
    b.send(T, "hb", {})
    b.flush()
    assert b.stats().clients == 3  # S, T and the admin asking
    clock.advance(10)
    b.core.on_tick()
    assert b.stats().clients == 1


# -- lifecycle commands ---------------------------------------------------------------------------


def test_create_get_or_create_info_list(b: Broker) -> None:
    info = b.ok(A, "create", {"stream": "b", "buffer_size": 7, "policy": "drop"})
    assert RemoteStreamInfo.from_wire(info) == RemoteStreamInfo(
        stream="b",
        buffer_size=7,
        policy="drop",
        current_load=0,
        first_seq=1,
        last_seq=0,
        closed=False,
        subscribers=0,
        parked=0,
        events_in=0,
        dropped=0,
        rejected=0,
        idle=0.0,
    )
    assert b.err(A, "create", {"stream": "b"})[0] == "STREAM_EXISTS"
    got = b.ok(A, "get_or_create", {"stream": "b", "buffer_size": 9})
    assert got["created"] is False and got["buffer_size"] == 7
    got = b.ok(A, "get_or_create", {"stream": "a"})
    assert got["created"] is True and got["buffer_size"] == 100 and got["policy"] == "block"
    b.ingest("a", 1, [ev(1)])
    assert [(i["stream"], i["last_seq"]) for i in b.ok(A, "list")] == [("a", 1), ("b", 0)]


@pytest.mark.parametrize(
    "args, code",
    [
        ({"stream": "s", "buffer_size": -1}, "PROTOCOL_ERROR"),
        ({"stream": "s", "buffer_size": "5"}, "PROTOCOL_ERROR"),
        ({"stream": "s", "buffer_size": True}, "PROTOCOL_ERROR"),
        ({"stream": "s", "policy": "sometimes"}, "PROTOCOL_ERROR"),
        ({"stream": "a\x00b"}, "INVALID_STREAM_ID"),
        ({"stream": "x" * 257}, "INVALID_STREAM_ID"),
        ({}, "INVALID_STREAM_ID"),
    ],
)
def test_create_bad_arguments(b: Broker, args: dict[str, Any], code: str) -> None:
    assert b.err(A, "create", args)[0] == code
    assert b.ok(A, "list") == []


def test_require_create(clock: FakeClock) -> None:
    b = Broker(clock, require_create=True)
    b.ingest("s", 1, [ev(1), ev(2)])
    _, ctl = b.flush()
    assert [n[1:5] for n in of_kind(ctl, "nack")] == [["s", 1, 2, "STREAM_NOT_FOUND"]]
    assert b.ok(A, "list") == []
    b.ok(A, "create", {"stream": "s"})
    b.ingest("s", 3, [ev(3)])
    # The stream is new to the broker: it asks from 1, the producer says 1-2 were answered.
    assert of_kind(b.flush()[1], "resend") == [["resend", "s", 1]]
    assert b.ok(P, "rebase", {"stream": "s", "pseq": 3}) == {"next_pseq": 3}
    b.ingest("s", 3, [ev(3)])
    assert acks_of(b.flush()[1]) == [["s", 3]]


def test_max_streams(clock: FakeClock) -> None:
    b = Broker(clock, max_streams=1)
    b.ingest("a", 1, [ev(1)])
    b.ingest("b", 1, [ev(1)])
    _, ctl = b.flush()
    (nack,) = of_kind(ctl, "nack")
    assert nack[1:5] == ["b", 1, 1, "LIMIT_EXCEEDED"] and nack[6] == {"limit": "max_streams"}
    code, fields = b.err(A, "create", {"stream": "c"})
    assert code == "LIMIT_EXCEEDED" and fields == {"limit": "max_streams"}
    assert b.err(A, "get_or_create", {"stream": "c"})[0] == "LIMIT_EXCEEDED"
    assert b.ok(A, "get_or_create", {"stream": "a"})["created"] is False


def test_oversized_ingest_is_nacked(clock: FakeClock) -> None:
    b = Broker(clock, max_message_size=200)
    b.ok(A, "create", {"stream": "s"})
    events = [ev(i) for i in range(10)]
    b.ingest("s", 1, events)
    pub, ctl = b.flush()
    (nack,) = of_kind(ctl, "nack")
    assert nack[1:5] == ["s", 1, 10, "LIMIT_EXCEEDED"] and nack[6] == {"limit": "max_message_size"}
    assert pub == []
    assert b.stats().bad_input == {"oversized": 1}
    b.ingest("s", 11, [ev(11)])
    assert acks_of(b.flush()[1]) == [["s", 11]]


# -- stats and bad input ----------------------------------------------------------------------


def test_stats_counters(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=2)
    assert b.stats() == BrokerStats(0, 0, 0, 1, 0, 0, 0, 0, 0, {})
    b.ok(A, "create", {"stream": "d", "buffer_size": 1, "policy": "drop"})
    b.ingest("d", 1, [ev(1), ev(2), bad_ev()])  # 1 in, 1 dropped, 1 rejected
    b.ok(A, "create", {"stream": "b"})
    b.subscribed(S, "b")
    b.ingest("b", 1, [ev(1), ev(2), ev(3)])  # 2 in, 1 parked
    b.flush()
    b.ok(T, "fetch", {"stream": "b", "from_seq": 1})  # 3 out by replay (the parked one too)
    b.ok(A, "close", {"stream": "d"})
    stats = b.stats()
    assert stats.streams == 2 and stats.open_streams == 1
    assert stats.subscribers == 1
    assert stats.clients == 3  # A, S, T
    assert stats.events_in == 3
    assert stats.events_out == 4 + 3  # published 1 + 3 (parked ones at once), fetched 3
    assert (stats.dropped, stats.rejected, stats.parked) == (1, 1, 1)
    assert stats.bad_input == {"event": 1}


def test_events_in_survives_stream_removal(b: Broker, clock: FakeClock) -> None:
    b.ingest("s", 1, [ev(1), ev(2)])
    clock.advance(5)
    b.ok(A, "cleanup", {"threshold": 1})
    assert b.stats().events_in == 2
    assert b.stats().streams == 0


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x00", b"no-nul", b"s\x00short", b"\xff\x00" + bytes(24)],
)
def test_bad_ingest_header_is_counted_without_answer(b: Broker, frame: bytes) -> None:
    b.core.on_ingest(frame)
    assert b.flush() == ([], [])
    assert b.stats().bad_input == {"ingest": 1}


def test_bad_control_frames(b: Broker) -> None:
    for frame in (
        b"",
        b"\xc1",
        frames.encode_control(1, 2),
        msgpack.packb({"a": 1}),
        msgpack.packb([]),
    ):
        b.core.on_control(S, frame)
    _, ctl = b.flush()
    assert len(ctl) == 5
    for client, msg in ctl:
        assert client == S
        assert msg[:3] == ["err", 0, "PROTOCOL_ERROR"]
    assert b.stats().bad_input == {"control": 5}


def test_unknown_command_and_args_not_a_map(b: Broker) -> None:
    code, _ = b.err(S, "frobnicate", {})
    assert code == "PROTOCOL_ERROR"
    b.send(S, "info", 7, ["not", "a", "map"])
    ((_, msg),) = b.flush()[1]
    assert msg[:3] == ["err", 7, "PROTOCOL_ERROR"]
    b.send(S, "info", "x", {"stream": "nope"})  # req_id not an int: 0
    ((_, msg),) = b.flush()[1]
    assert msg[:3] == ["err", 0, "STREAM_NOT_FOUND"]
    # the unknown command and the non-map arguments are bad input; a missing stream is not
    assert b.stats().bad_input.get("command") == 2


@pytest.mark.parametrize(
    "parts",
    [
        ["ack"],
        ["ack", "s"],
        ["ack", ["s"]],
        ["ack", ["s", "1"]],
        ["ack", [1, 1]],
        ["ack", {"s": 1}],
    ],
)
def test_malformed_ack_is_counted(b: Broker, parts: list[Any]) -> None:
    b.send(S, *parts)
    assert b.flush() == ([], [])
    assert b.stats().bad_input == {"ack": 1}


def test_malformed_ack_applies_pairs_before_the_bad_one(clock: FakeClock) -> None:
    b = Broker(clock, buffer_size=1)
    b.ok(A, "create", {"stream": "s"})
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2)])
    b.flush()
    b.send(S, "ack", ["s", 1, "s", "bad"])
    assert acks_of(b.flush()[1]) == [["s", 2]]
    assert b.stats().bad_input == {"ack": 1}


def test_acks_for_unknown_streams_are_ignored(b: Broker) -> None:
    b.ack(S, "nope", 5)
    assert b.flush() == ([], [])
    assert b.stats().bad_input == {}


# -- robustness: arbitrary input never raises and never wedges ----------------------------------


def assert_still_serving(b: Broker, sid: str = "healthy") -> None:
    pid = b"H" * 16
    b.core.on_ingest(ingest(sid, 1, [ev(1)], client=pid))
    pub, ctl = b.core.flush()
    assert frames.encode_events(frames.topic(sid), 1, [ev(1)]) in pub
    assert (pid, frames.encode_control("ack", b.core.broker_id, [sid, 1])) in ctl
    b.core.on_control(A, frames.encode_control("info", 99, {"stream": sid}))
    (reply,) = [frames.decode_control(f) for c, f in b.core.flush()[1] if c == A]
    assert reply[0] == "ok" and reply[2]["last_seq"] == 1


@FUZZ
@given(st.binary(max_size=300))
def test_on_ingest_arbitrary_bytes(data: bytes) -> None:
    b = Broker()
    b.core.on_ingest(data)
    b.core.on_ingest(b"s\x00" + data)
    b.core.flush()
    b.core.on_tick()
    assert_still_serving(b)


@FUZZ
@given(
    st.sampled_from(["s", "é", "x" * 256]),
    st.integers(1, 2**63),
    st.lists(st.one_of(st.integers(1, 5).map(ev), st.binary(max_size=30)), max_size=5),
    st.booleans(),
)
def test_on_ingest_valid_header_arbitrary_body(
    sid: str, pseq: int, parts: list[bytes], close: bool
) -> None:
    b = Broker(buffer_size=2)
    if close:
        b.core.on_control(A, frames.encode_control("create", 1, {"stream": sid}))
        b.core.on_control(A, frames.encode_control("close", 2, {"stream": sid}))
    b.core.on_ingest(ingest(sid, pseq, parts))
    b.core.on_ingest(ingest(sid, pseq, parts))  # and again: resends
    b.core.flush()
    b.core.on_tick()
    assert_still_serving(b)


@pytest.mark.parametrize("second", [ev(2), b"\x01"], ids=["valid", "invalid"])
def test_ingest_pseq_overflow_does_not_crash_or_wedge(second: bytes) -> None:
    b = Broker()
    try:
        b.core.on_ingest(ingest("s", 2**64 - 1, [ev(1), second]))
        b.core.flush()
    finally:
        assert_still_serving(b)


control_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=10)
    | st.binary(max_size=10)
    | st.sampled_from(["s", "block", "drop"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
OPS = ["hello", "create", "get_or_create", "close", "info", "list", "cleanup", "stats"]
OPS += ["subscribe", "unsubscribe", "fetch", "ack", "hb", "nope", ""]
ARG_KEYS = [
    "stream",
    "from_seq",
    "token",
    "create",
    "buffer_size",
    "policy",
    "threshold",
    "version",
]


@FUZZ
@given(st.binary(max_size=200))
def test_on_control_arbitrary_bytes(data: bytes) -> None:
    b = Broker()
    b.core.on_control(S, data)
    b.core.flush()
    assert_still_serving(b)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(OPS),
            st.one_of(st.integers(-5, 2**64 - 1), control_values),
            st.one_of(
                st.dictionaries(st.sampled_from(ARG_KEYS), control_values, max_size=5),
                control_values,
            ),
            st.lists(control_values, max_size=2),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_on_control_arbitrary_messages(msgs: list[tuple[str, Any, Any, list[Any]]]) -> None:
    b = Broker(buffer_size=2)
    b.core.on_ingest(ingest("s", 1, [ev(1), ev(2), ev(3)]))
    for op, req, args, extra in msgs:
        b.core.on_control(S, frames.encode_control(op, req, args, *extra))
        if isinstance(args, dict) and type(args.get("token")) is bytes:
            b.core.on_subscription(b"\x01\x00" + args["token"])
        b.core.flush()
    b.core.on_tick()
    b.core.flush()
    assert_still_serving(b)


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=5))
def test_on_subscription_arbitrary_bytes(items: list[bytes]) -> None:
    b = Broker()
    b.core.on_control(
        S, frames.encode_control("subscribe", 1, {"stream": "s", "token": b"t", "create": True})
    )
    for data in items:
        b.core.on_subscription(data)
        b.core.on_subscription(b"\x01\x00" + data)
    b.core.flush()
    assert_still_serving(b)


# -- model check: random traffic keeps every promise ------------------------------------------


# -- found in review ------------------------------------------------------------------------


@pytest.mark.parametrize("from_seq", [2**62 + 1, 2**63 + 5])
def test_from_seq_beyond_any_seq_is_refused(b: Broker, from_seq: int) -> None:
    b.subscribed(S, "s")
    reply = b.subscribe(T, "s", from_seq)
    assert reply[0] == "err" and reply[2] == "PROTOCOL_ERROR"
    assert b.err(T, "fetch", {"stream": "s", "from_seq": from_seq})[0] == "PROTOCOL_ERROR"


def test_rebase_of_a_producer_the_stream_never_heard_of(b: Broker) -> None:
    b.ok(A, "create", {"stream": "s"})
    assert b.ok(P, "rebase", {"stream": "s", "pseq": 1}) == {"next_pseq": 1}


def test_a_subscribe_token_already_waiting_is_refused(b: Broker) -> None:
    b.ok(A, "create", {"stream": "s"})
    b.request(S, "subscribe", {"stream": "s", "token": b"same"})
    code, _ = b.err(T, "subscribe", {"stream": "s", "token": b"same"})
    assert code == "PROTOCOL_ERROR"
    b.marker(b"same")  # the first one still gets its reply
    _, ctl = b.flush()
    assert [m[0] for c, m in ctl if c == S] == ["ok"]


def test_a_refused_rebase_answers_the_streams_unanswered_events() -> None:
    prod = ProducerState(P)
    prod.encode("s", [ev(1), ev(2)])
    prod.fail_unanswered("s", StreamNotFoundError("s", "send"))
    assert prod.unanswered() == 0
    with pytest.raises(StreamNotFoundError):
        prod.check("s")
