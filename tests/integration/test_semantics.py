"""The broker's guarantees, through the sync SDK against real broker processes.

Every blocking call carries a timeout so a bug fails a test instead of hanging
it; waits are on conditions with deadlines (``wait_until``), never on sleeps.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq
from _sdk_helpers import free_port, text_of, texts

from zevents import (
    Admin,
    BackpressurePolicy,
    BrokerUnavailableError,
    Event,
    EventType,
    InvalidStreamIdError,
    Producer,
    ReplayUnavailableError,
    StreamClosed,
    StreamClosedError,
    StreamExistsError,
    StreamFullError,
    StreamNotFoundError,
    Subscriber,
    ZEventsError,
)

T = 10.0  # seconds any single blocking call may take before the test fails


# -- helpers ---------------------------------------------------------------------------


def take(source: Any, n: int, timeout: float = T) -> list[Event]:
    """``n`` events from a Subscriber or Subscription, each within ``timeout``."""
    out = []
    for _ in range(n):
        event = source.next_event(timeout=timeout)
        assert event is not None, f"iteration ended after {len(out)} of {n} events"
        out.append(event)
    return out


def take_to_end(source: Any, timeout: float = T, limit: int = 1_000_000) -> list[Event]:
    """Every event until iteration ends (each within ``timeout``)."""
    out = []
    while True:
        event = source.next_event(timeout=timeout)
        if event is None:
            return out
        out.append(event)
        assert len(out) <= limit, f"more than {limit} events"


class Worker(threading.Thread):
    """A thread whose exception (or result) is handed back by :meth:`result`."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = 30.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"thread still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.value


def idle(seconds: float) -> None:
    """The application leaves its clients alone for ``seconds``.

    This is the stimulus under test (a provider between two chats), not a way to
    wait for something to happen: nothing is expected to happen meanwhile.
    """
    time.sleep(seconds)


def busy_work(data: bytes, rounds: int = 2) -> bytes:
    """Real CPU work per event (releases the GIL, as a parser or renderer might not)."""
    digest = b""
    for _ in range(rounds):
        digest = hashlib.sha256(data).digest()
    return digest


# -- BLOCK: nothing lost, producers held back ---------------------------------------------


def test_ack_steps_follow_the_broker_and_the_policy(broker, stream_id):
    # A memory-only broker publishes parked events: BLOCK streams are acked every
    # 512 events (default buffer and window), a DROP stream every half buffer.
    drop = f"{stream_id}-drop"
    with Admin(broker.control) as admin, Subscriber(broker.control) as sub:
        admin.create_stream(drop, buffer_size=20, policy="drop")
        assert sub.handshake.limits["publishes_parked"] is True
        sub.subscribe(stream_id, create=True)
        sub.subscribe(drop)
        steps = {sid: sub._state.cursors[sid].ack_step for sid in (stream_id, drop)}
    assert steps == {stream_id: 512, drop: 10}


def test_slow_subscriber_block_small_buffer_10000_events_no_loss(broker, stream_id):
    n = 10_000
    size = 16
    payload = os.urandom(65536)
    sent = [0]
    lag = [0]
    with Admin(broker.control, timeout=T) as admin, Subscriber(broker.control, timeout=T) as sub:
        info = admin.create_stream(stream_id, buffer_size=size)
        assert (info.buffer_size, info.policy) == (size, "block")
        following = sub.subscribe(stream_id, from_seq=1)

        def consume() -> list[Event]:
            got = []
            while True:
                event = following.next_event(timeout=T)
                if event is None:
                    return got
                lag[0] = max(lag[0], sent[0] - event.seq)
                busy_work(payload)
                got.append(event)

        consumer = Worker(consume)
        with Producer(broker.control, timeout=T) as p:
            window = int(p.handshake.limits["window"])
            for i in range(n):
                p.send(stream_id, Event.text_delta(f"e{i}"), timeout=T)
                sent[0] = i + 1
            p.flush(stream_id, timeout=T)
        info = admin.stream_info(stream_id)
        admin.close_stream(stream_id)
        got = consumer.result(timeout=60)

    seqs = [e.seq for e in got]
    assert len(seqs) == n, f"lost {n - len(set(seqs))}, duplicated {len(seqs) - len(set(seqs))}"
    assert seqs == list(range(1, n + 1))
    assert text_of(got) == [f"e{i}" for i in range(n)]
    assert {e.stream_id for e in got} == {stream_id}
    assert (info.events_in, info.dropped, info.rejected) == (n, 0, 0)
    assert info.current_load <= size
    # The producer was held back by the slow subscriber: it never ran further ahead
    # of it than the buffer, its credit window and a batch of not-yet-sent acks.
    assert lag[0] <= size + window + 64, f"producer ran {lag[0]} events ahead"


def test_block_send_times_out_when_full_and_nobody_reads(broker, stream_id):
    other = f"{stream_id}-other"
    with Admin(broker.control, timeout=T) as admin, Producer(broker.control, timeout=T) as p:
        admin.create_stream(stream_id, buffer_size=2)
        window = int(p.handshake.limits["window"])
        sent = 0
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            for i in range(window + 100):
                p.send(stream_id, Event.text_delta(str(i)), timeout=0.5)
                sent += 1
        assert time.monotonic() - started < 5
        # Only the buffer and one credit window were taken; the rest waited in send.
        assert 2 <= sent <= window + 2
        info = admin.stream_info(stream_id)
        assert info.current_load == 2
        assert info.parked <= window  # the broker holds a bounded amount for it
        # A full stream stalls neither other streams of this producer nor the broker.
        p.send_many(other, texts(50))
        p.flush(other, timeout=T)
        assert admin.stream_info(other).events_in == 50
        with Producer(broker.control, timeout=T) as q:  # nor other producers
            q.send_many(other, texts(50, start=50))
            q.flush(timeout=T)
        assert admin.stream_info(other).events_in == 100
        with pytest.raises(TimeoutError):
            p.flush(stream_id, timeout=0.3)
        # Once someone reads, everything that waited goes through, in order.
        with Subscriber(broker.control, timeout=T) as sub:
            following = sub.subscribe(stream_id, from_seq=1)
            got = take(following, sent)
            p.flush(stream_id, timeout=T)
        assert [e.seq for e in got] == list(range(1, sent + 1))
        assert text_of(got) == [str(i) for i in range(sent)]
        admin.close_stream(stream_id)
        admin.close_stream(other)


def test_a_refusal_ends_a_wait_for_a_quarter_window(make_broker, stream_id):
    # A producer whose window is nearly full waits for a quarter of it (it sends no
    # slivers); a nack that frees less than that must still end the wait with its
    # error. Here max_parked refuses 10 of the first 64 events of a stalled stream.
    b = make_broker("--buffer-size", "4", "--window", "64", "--max-parked", "50")
    with Subscriber(b.control, timeout=T) as sub, Producer(b.control, timeout=T) as p:
        sub.subscribe(stream_id, create=True)  # subscribed, never reads: the stream stalls
        p.send_many(stream_id, texts(64))  # 4 admitted, 50 parked, 10 refused
        started = time.monotonic()
        with pytest.raises(StreamFullError):
            p.send_many(stream_id, texts(20, start=64), timeout=T)
        assert time.monotonic() - started < T / 2
        sub.close()  # stops gating: what is parked goes in, and the producer's exit flushes


# -- DROP ------------------------------------------------------------------------------


def drop_reports(p: Producer, stream_id: str, expected: int) -> list[StreamFullError]:
    """Flush ``stream_id`` and collect the errors reporting its drops until they add up
    to ``expected``.

    The broker sends a drop notice before the ack answering the dropped event
    (``test_broker_tells_drops_no_later_than_it_acks_them``), so the flush that
    waits for that ack raises it; the loop also takes notices split over calls.
    """
    errors: list[StreamFullError] = []
    deadline = time.monotonic() + T
    while sum(e.dropped for e in errors) < expected:
        told = sum(e.dropped for e in errors)
        assert time.monotonic() < deadline, f"told of {told} of {expected} drops"
        try:
            p.flush(stream_id, timeout=T)
        except StreamFullError as exc:
            errors.append(exc)
        else:
            p.poll(0.01)
    return errors


def test_drop_stream_raises_stream_full_and_counts(broker, stream_id):
    with Admin(broker.control, timeout=T) as admin, Producer(broker.control, timeout=T) as p:
        before = admin.stats().dropped
        admin.create_stream(stream_id, buffer_size=4, policy="drop")
        p.send_many(stream_id, texts(10))
        errors = drop_reports(p, stream_id, 6)
        assert sum(e.dropped for e in errors) == 6
        assert {(e.stream_id, e.buffer_size) for e in errors} == {(stream_id, 4)}
        info = admin.stream_info(stream_id)
        assert (info.events_in, info.dropped, info.current_load) == (4, 6, 4)
        assert admin.stats().dropped - before >= 6
        p.flush(stream_id, timeout=T)  # reported once, not again
        # Nothing else was lost: the first buffer_size events are there, in order.
        admin.close_stream(stream_id)
        with Subscriber(broker.control, timeout=T) as sub:
            got = take_to_end(sub.subscribe(stream_id, from_seq=1))
        assert [e.seq for e in got] == [1, 2, 3, 4]
        assert text_of(got) == ["0", "1", "2", "3"]


def test_drop_stream_with_live_subscriber_loses_only_what_it_counts(broker, stream_id):
    n = 3000  # at least; more until a send has raised (below)
    with Admin(broker.control, timeout=T) as admin, Subscriber(broker.control, timeout=T) as sub:
        admin.create_stream(stream_id, buffer_size=8, policy=BackpressurePolicy.DROP)
        following = sub.subscribe(stream_id, from_seq=1)
        consumer = Worker(lambda: take_to_end(following))
        reported = 0  # drops the producer was told about
        refused = 0  # sends that raised at once (those events were not sent)
        with Producer(broker.control, timeout=T) as p:
            # A window holds all n: nothing makes the producer wait for the broker,
            # so on a busy machine every drop notice may still be on its way when
            # n were sent.  Go on (bounded) until one has come back and a send raised.
            deadline = time.monotonic() + T
            i = 0
            while i < n or (refused == 0 and i < 20 * n and time.monotonic() < deadline):
                try:
                    p.send(stream_id, Event.text_delta(str(i)), timeout=T)
                except StreamFullError as exc:
                    reported += exc.dropped
                    refused += 1
                i += 1
            n = i
            try:
                p.flush(stream_id, timeout=T)
            except StreamFullError as exc:
                reported += exc.dropped
            info = admin.stream_info(stream_id)  # final: every event was answered
            reported += sum(e.dropped for e in drop_reports(p, stream_id, info.dropped - reported))
        admin.close_stream(stream_id)
        got = consumer.result()
    # Admitted events get consecutive seqs; the subscriber sees every one of them.
    assert [e.seq for e in got] == list(range(1, info.events_in + 1))
    numbers = [int(t) for t in text_of(got)]
    assert numbers == sorted(numbers)
    # What was sent and not admitted was dropped, counted, and reported to the producer.
    assert info.dropped > 0
    assert refused > 0  # sends after a drop notice raised at once
    assert info.events_in + info.dropped + refused == n
    assert reported == info.dropped


def test_broker_tells_drops_no_later_than_it_acks_them(broker, stream_id):
    from zevents.protocol import frames
    from zevents.protocol.session import new_client_id

    with Admin(broker.control, timeout=T) as admin:
        admin.create_stream(stream_id, buffer_size=2, policy="drop")
    ctx = zmq.Context()
    try:
        client_id = new_client_id()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, client_id)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(broker.control)
        dealer.send(frames.encode_control("hello", 1, {"version": frames.PROTOCOL_VERSION}))
        assert dealer.poll(int(T * 1000))
        assert frames.decode_control(dealer.recv())[0] == "ok"
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(broker.ingest)
        raws = b"".join(Event.text_delta(str(i)).to_msgpack() for i in range(5))
        push.send(frames.encode_ingest(frames.topic(stream_id), client_id, 1, raws))
        kinds: list[str] = []
        while not {"ack", "dropped"} <= set(kinds):
            assert dealer.poll(int(T * 1000)), f"only {kinds} arrived"
            kinds.append(frames.decode_control(dealer.recv())[0])
        assert kinds.index("dropped") < kinds.index("ack"), kinds
    finally:
        ctx.destroy(linger=0)


# -- joining late, resuming, replay limits ------------------------------------------------


def test_late_join_gets_buffered_then_live_without_gap_or_overlap(broker, stream_id, wait_until):
    n = 3000
    with Admin(broker.control, timeout=T) as admin:
        admin.create_stream(stream_id, buffer_size=n)
        joined = threading.Event()

        def produce() -> None:
            with Producer(broker.control, timeout=T) as p:
                for i in range(n):
                    if i == n * 3 // 4:
                        # Sends on while the subscriber joins, but never finishes
                        # first (the join must be mid-stream to mean anything).
                        assert joined.wait(T), "the subscriber never joined"
                    p.send(stream_id, Event.text_delta(str(i)), timeout=T)
                p.flush(timeout=T)

        producer = Worker(produce)
        # Join while the producer is mid-stream: part is buffered, part still to come.
        wait_until(lambda: admin.stream_info(stream_id).last_seq >= 500, timeout=T)
        with Subscriber(broker.control, timeout=T) as sub:
            following = sub.subscribe(stream_id)  # from the oldest still buffered
            head = admin.stream_info(stream_id).last_seq
            joined.set()
            got = take(following, n)
            producer.result()
            admin.close_stream(stream_id)
            assert following.next_event(timeout=T) is None
    assert head < n, "the subscriber joined after the producer had finished"
    assert [e.seq for e in got] == list(range(1, n + 1))
    assert text_of(got) == [str(i) for i in range(n)]


def test_resume_from_seq_after_subscriber_restart(broker, stream_id):
    with Admin(broker.control, timeout=T) as admin, Producer(broker.control, timeout=T) as p:
        admin.create_stream(stream_id, buffer_size=500)
        p.send_many(stream_id, texts(100))
        p.flush(timeout=T)
        with Subscriber(broker.control, timeout=T) as first:
            before = take(first.subscribe(stream_id, from_seq=1), 30)
        assert [e.seq for e in before] == list(range(1, 31))
        resume = before[-1].seq + 1
        with Subscriber(broker.control, timeout=T) as second:
            following = second.subscribe(stream_id, from_seq=resume)
            p.send_many(stream_id, texts(50, start=100))
            p.flush(timeout=T)
            admin.close_stream(stream_id)
            after = take_to_end(following)
    assert [e.seq for e in after] == list(range(31, 151))
    assert text_of(before + after) == [str(i) for i in range(150)]


def test_replay_unavailable_names_the_missing_range(broker, stream_id):
    with Admin(broker.control, timeout=T) as admin, Producer(broker.control, timeout=T) as p:
        admin.create_stream(stream_id, buffer_size=10)
        with Subscriber(broker.control, timeout=T) as reader:
            following = reader.subscribe(stream_id, from_seq=1)
            p.send_many(stream_id, texts(30))  # more than the buffer: held until read
            got = take(following, 30)
            p.flush(stream_id, timeout=T)
            assert [e.seq for e in got] == list(range(1, 31))
            info = admin.stream_info(stream_id)
            assert (info.first_seq, info.last_seq) == (21, 30)
            with Subscriber(broker.control, timeout=T) as late:
                with pytest.raises(ReplayUnavailableError) as caught:
                    late.subscribe(stream_id, from_seq=5)
                err = caught.value
                assert (err.stream_id, err.first_missing, err.last_missing) == (stream_id, 5, 20)
                assert "5..20" in str(err)
                # The oldest still buffered is available, and so is "from the oldest".
                assert [e.seq for e in take(late.subscribe(stream_id, from_seq=21), 10)] == list(
                    range(21, 31)
                )
            with Subscriber(broker.control, timeout=T) as oldest:
                assert take(oldest.subscribe(stream_id), 1)[0].seq == 21
        admin.close_stream(stream_id)


def test_no_slow_joiner_loss(broker, stream_id):
    with Producer(broker.control, timeout=T) as p:
        for i in range(30):
            sid = f"{stream_id}-{i}"
            with Subscriber(broker.control, timeout=T) as sub:
                following = sub.subscribe(sid, create=True)
                p.send(sid, Event.text_delta("first"))
                event = following.next_event(timeout=T)
                assert event is not None
                assert (event.seq, event.data["text"], event.stream_id) == (1, "first", sid)


# -- routing ------------------------------------------------------------------------------


def test_exact_stream_matching_s1_vs_s10(broker, stream_id):
    s1, s10, s100 = f"{stream_id}-s1", f"{stream_id}-s10", f"{stream_id}-s100"
    with Subscriber(broker.control, timeout=T) as sub, Producer(broker.control, timeout=T) as p:
        following = sub.subscribe(s1, create=True)
        for sid in (s10, s100):
            with Admin(broker.control, timeout=T) as admin:
                admin.create_stream(sid, buffer_size=500)
            p.send_many(sid, texts(200, prefix=f"{sid}:"))
        p.send_many(s1, texts(5, prefix=f"{s1}:"))
        p.flush(timeout=T)
        with Admin(broker.control, timeout=T) as admin:
            for sid in (s10, s100, s1):
                admin.close_stream(sid)
        got = take_to_end(sub)  # the subscriber as a whole: only s1 may show up
        assert following.next_event(timeout=T) is None
    assert {e.stream_id for e in got} == {s1}
    assert text_of(got) == [f"{s1}:{i}" for i in range(5)]
    assert [e.seq for e in got] == [1, 2, 3, 4, 5]


def test_fan_out_every_subscriber_gets_every_event(broker, stream_id):
    n, k = 2000, 4
    with Admin(broker.control, timeout=T) as admin:
        admin.create_stream(stream_id, buffer_size=64)
        subs = [Subscriber(broker.control, timeout=T) for _ in range(k)]
        try:
            followings = [s.subscribe(stream_id, from_seq=1) for s in subs]
            readers = [Worker(lambda f=f: take_to_end(f)) for f in followings]
            with Producer(broker.control, timeout=T) as p:
                for i in range(n):
                    p.send(stream_id, Event.text_delta(str(i)), timeout=T)
                p.flush(timeout=T)
            assert admin.stream_info(stream_id).subscribers == k
            admin.close_stream(stream_id)
            results = [r.result() for r in readers]
        finally:
            for s in subs:
                s.close()
    for got in results:
        assert [e.seq for e in got] == list(range(1, n + 1))
        assert text_of(got) == [str(i) for i in range(n)]


def test_many_producers_many_streams_one_subscriber_connection(broker, stream_id):
    producers, streams_each, n = 4, 6, 250
    shared = f"{stream_id}-shared"
    sids = [f"{stream_id}-p{p}-s{s}" for p in range(producers) for s in range(streams_each)]
    with Subscriber(broker.control, timeout=T) as sub:
        for sid in [*sids, shared]:
            sub.subscribe(sid, create=True)

        def produce(pi: int) -> None:
            mine = [sid for sid in sids if f"-p{pi}-" in sid]
            with Producer(broker.control, timeout=T) as p:
                for i in range(n):
                    for sid in mine:  # interleaved across this producer's streams
                        p.send(sid, Event.text_delta(f"{sid}:{i}"), timeout=T)
                    p.send(shared, Event.text_delta(f"p{pi}:{i}"), timeout=T)
                p.flush(timeout=T)

        workers = [Worker(lambda pi=pi: produce(pi)) for pi in range(producers)]
        by_stream: dict[str, list[Event]] = {sid: [] for sid in [*sids, shared]}
        total = len(sids) * n + producers * n
        for _ in range(total):
            event = sub.next_event(timeout=T)
            assert event is not None
            by_stream[event.stream_id].append(event)
        for w in workers:
            w.result()
        with Admin(broker.control, timeout=T) as admin:
            for sid in by_stream:
                admin.close_stream(sid)
        assert take_to_end(sub) == []
        assert sub.streams == []
    for sid in sids:
        assert [e.seq for e in by_stream[sid]] == list(range(1, n + 1)), sid
        assert text_of(by_stream[sid]) == [f"{sid}:{i}" for i in range(n)]
    # Several producers on one stream: seqs dense, each producer's order kept.
    mixed = by_stream[shared]
    assert [e.seq for e in mixed] == list(range(1, producers * n + 1))
    for pi in range(producers):
        assert [t for t in text_of(mixed) if t.startswith(f"p{pi}:")] == [
            f"p{pi}:{i}" for i in range(n)
        ]


def test_one_subscriber_many_streams_iterated_per_subscription(broker, stream_id):
    sids = [f"{stream_id}-{c}" for c in "abc"]
    with Subscriber(broker.control, timeout=T) as sub, Producer(broker.control, timeout=T) as p:
        subscriptions = {sid: sub.subscribe(sid, create=True) for sid in sids}
        for i in range(100):
            for sid in sids:
                p.send(sid, Event.text_delta(f"{sid}:{i}"), timeout=T)
        p.flush(timeout=T)
        with Admin(broker.control, timeout=T) as admin:
            for sid in sids:
                admin.close_stream(sid)
        # Read the last stream first: the others' events wait for their own iteration.
        for sid in reversed(sids):
            following = subscriptions[sid]
            assert following.stream_id == sid
            got = []
            deadline = time.monotonic() + T
            for event in following:  # ends by itself at the stream's end
                got.append(event)
                assert time.monotonic() < deadline
            assert [e.seq for e in got] == list(range(1, 101))
            assert text_of(got) == [f"{sid}:{i}" for i in range(100)]
            assert {e.stream_id for e in got} == {sid}


def test_one_subscriber_connection_follows_more_streams_than_sockets_allow(make_broker, stream_id):
    b = make_broker()  # its own: these streams are left open
    n = 1100  # more than ZeroMQ's default 1,023 sockets per context
    sids = [f"{stream_id}-{i}" for i in range(n)]
    with Subscriber(b.control, timeout=T) as sub, Producer(b.control, timeout=T) as p:
        for sid in sids:
            sub.subscribe(sid, create=True)
        for sid in sids:
            p.send(sid, Event.text_delta(sid), timeout=T)
        p.flush(timeout=T)
        got = take(sub, n)
    assert sorted(e.stream_id for e in got) == sorted(sids)
    assert all(e.seq == 1 and e.data["text"] == e.stream_id for e in got)


# -- closing ------------------------------------------------------------------------------


def test_close_ends_iteration_cleanly_after_buffered_events(broker, stream_id, wait_until):
    with Subscriber(broker.control, timeout=T) as sub, Producer(broker.control, timeout=T) as p:
        following = sub.subscribe(stream_id, create=True)
        reader = Worker(lambda: list(following))  # plain iteration: ends at the close
        p.send_many(stream_id, texts(500))
        p.flush(timeout=T)
        with Admin(broker.control, timeout=T) as admin:
            info = admin.close_stream(stream_id)
            assert info.closed and info.last_seq == 500
        got = reader.result(timeout=T)
        assert [e.seq for e in got] == list(range(1, 501))
        assert sub.streams == []
        assert sub.next_event(timeout=T) is None  # stays ended


def test_closed_stream_stays_readable_until_cleanup(make_broker, stream_id, wait_until):
    b = make_broker()
    n = 1500  # more than one replay batch
    with Admin(b.control, timeout=T) as admin, Producer(b.control, timeout=T) as p:
        admin.create_stream(stream_id, buffer_size=2000)
        p.send_many(stream_id, texts(n))
        p.flush(timeout=T)
        admin.close_stream(stream_id)
        for _ in range(2):  # a browser reconnecting after the answer finished, twice
            with Subscriber(b.control, timeout=T) as sub:
                got = take_to_end(sub.subscribe(stream_id, from_seq=1))
            assert [e.seq for e in got] == list(range(1, n + 1))
            assert text_of(got) == [str(i) for i in range(n)]
        with Subscriber(b.control, timeout=T) as sub:
            assert take_to_end(sub.subscribe(stream_id, from_seq=n + 1)) == []
        info = admin.stream_info(stream_id)
        assert info.closed
        assert stream_id in admin.list_streams()
        threshold = 0.3
        assert admin.cleanup_inactive(60) == 0  # not idle long enough: kept
        wait_until(lambda: admin.stream_info(stream_id).idle > threshold + 0.05, timeout=T)
        assert admin.cleanup_inactive(threshold) == 1
        with pytest.raises(StreamNotFoundError):
            admin.stream_info(stream_id)
        assert stream_id not in admin.list_streams()
        with Subscriber(b.control, timeout=T) as sub, pytest.raises(StreamNotFoundError):
            sub.subscribe(stream_id, from_seq=1)


def test_producer_learns_about_closure(broker, stream_id):
    seen: list[StreamClosed] = []
    with Producer(broker.control, timeout=T) as p:
        p.on_closed(seen.append)
        p.send_many(stream_id, texts(3))
        p.flush(timeout=T)
        assert not p.is_closed(stream_id)
        assert p.wait_closed(stream_id, timeout=0.2) is False
        with Admin(broker.control, timeout=T) as admin:
            admin.close_stream(stream_id)  # a user pressed stop
        assert p.wait_closed(stream_id, timeout=T) is True  # told without sending
        assert seen == [StreamClosed(stream_id, 3)]
        assert p.is_closed(stream_id)
        with pytest.raises(StreamClosedError) as caught:
            p.send(stream_id, Event.text_delta("too late"))
        assert caught.value.stream_id == stream_id
        with pytest.raises(StreamClosedError):
            p.send(stream_id, Event.text_delta("still too late"))
        # Other streams of the same producer are unaffected.
        p.send(f"{stream_id}-next", Event.text_delta("fine"))
        p.flush(f"{stream_id}-next", timeout=T)
        assert seen == [StreamClosed(stream_id, 3)]


def test_events_waiting_at_close_end_the_stream_not_lost(broker, stream_id):
    with Admin(broker.control, timeout=T) as admin, Producer(broker.control, timeout=T) as p:
        admin.create_stream(stream_id, buffer_size=5)
        p.send_many(stream_id, texts(20))  # 5 admitted, 15 wait for room
        with pytest.raises(TimeoutError):
            p.flush(stream_id, timeout=0.3)
        admin.close_stream(stream_id)
        assert p.wait_closed(stream_id, timeout=T)
        p.flush(stream_id, timeout=T)  # everything answered
        assert p.unanswered(stream_id) == 0
        with pytest.raises(StreamClosedError):
            p.send(stream_id, Event.text_delta("x"))
        with Subscriber(broker.control, timeout=T) as sub:
            got = take_to_end(sub.subscribe(stream_id, from_seq=1))
        # The waiting ones were published as they arrived: the stream ends after them.
        assert text_of(got) == [str(i) for i in range(20)]


def test_unsubscribe_stops_gating_at_once(broker, stream_id):
    with Admin(broker.control, timeout=T) as admin, Producer(broker.control, timeout=T) as p:
        admin.create_stream(stream_id, buffer_size=5)
        with Subscriber(broker.control, timeout=T) as sub:
            following = sub.subscribe(stream_id, from_seq=1)
            p.send_many(stream_id, texts(5))
            take(following, 2)
            assert admin.stream_info(stream_id).subscribers == 1
            sub.unsubscribe(stream_id)
            assert sub.streams == []
            p.send_many(stream_id, texts(20, start=5))
            p.flush(stream_id, timeout=1)  # well inside the broker's 2 s timeout
        info = admin.stream_info(stream_id)
        assert (info.subscribers, info.events_in) == (0, 25)
        admin.close_stream(stream_id)


def test_closed_subscriber_stops_gating_at_once(broker, stream_id):
    with Admin(broker.control, timeout=T) as admin, Producer(broker.control, timeout=T) as p:
        admin.create_stream(stream_id, buffer_size=5)
        with Subscriber(broker.control, timeout=T) as sub:
            following = sub.subscribe(stream_id, from_seq=1)
            p.send_many(stream_id, texts(5))
            take(following, 2)  # a browser tab closed mid-answer
        p.send_many(stream_id, texts(20, start=5))
        # The shared broker forgets silent subscribers after 2 s; a closed one must
        # not hold the producer back that long.
        p.flush(stream_id, timeout=1)


def test_idle_timeout_closes_stream_by_itself(make_broker, stream_id, wait_until):
    b = make_broker("--idle-timeout", "1")
    with Subscriber(b.control, timeout=T) as sub, Producer(b.control, timeout=T) as p:
        following = sub.subscribe(stream_id, create=True)
        p.send_many(stream_id, texts(3))
        p.flush(timeout=T)
        started = time.monotonic()
        got = take_to_end(following)  # ends once the broker closes the idle stream
        assert time.monotonic() - started >= 0.5
        assert text_of(got) == ["0", "1", "2"]
        assert p.wait_closed(stream_id, timeout=T)
        with pytest.raises(StreamClosedError):
            p.send(stream_id, Event.text_delta("x"))
    with Admin(b.control, timeout=T) as admin:
        # Closed, then removed once idle again for the timeout.
        def gone() -> bool:
            try:
                admin.stream_info(stream_id)
            except StreamNotFoundError:
                return True
            return False

        wait_until(gone, timeout=T)


# -- creation rules and admin ---------------------------------------------------------------


def test_require_create_refuses_events_for_unknown_streams(make_broker, stream_id):
    b = make_broker("--require-create")
    with Admin(b.control, timeout=T) as admin, Producer(b.control, timeout=T) as p:
        assert p.handshake.limits["require_create"] is True
        p.send_many(stream_id, texts(3))
        with pytest.raises(StreamNotFoundError) as caught:
            p.flush(stream_id, timeout=T)
        assert caught.value.stream_id == stream_id
        assert stream_id not in admin.list_streams()
        assert admin.stats().rejected >= 3
        with Subscriber(b.control, timeout=T) as sub, pytest.raises(StreamNotFoundError):
            sub.subscribe(stream_id)
        # Created explicitly, the same producer's events are taken.
        admin.create_stream(stream_id)
        p.send_many(stream_id, texts(2, start=10))
        p.flush(stream_id, timeout=T)
        info = admin.stream_info(stream_id)
        assert (info.events_in, info.last_seq) == (2, 2)
        admin.close_stream(stream_id)
        with Subscriber(b.control, timeout=T) as sub:
            assert text_of(take_to_end(sub.subscribe(stream_id, from_seq=1))) == ["10", "11"]


def test_first_event_creates_stream_with_broker_defaults(make_broker, stream_id):
    b = make_broker("--buffer-size", "7", "--policy", "drop")
    with Admin(b.control, timeout=T) as admin, Producer(b.control, timeout=T) as p:
        p.send(stream_id, Event.text_delta("hi"))
        p.flush(timeout=T)
        info = admin.stream_info(stream_id)
        assert (info.buffer_size, info.policy, info.events_in) == (7, "drop", 1)


def test_admin_operations(make_broker, stream_id):
    b = make_broker()
    a, c = f"{stream_id}-a", f"{stream_id}-c"
    with Admin(b.control, timeout=T) as admin:
        zero = admin.stats()
        assert (zero.streams, zero.events_in, zero.dropped, zero.rejected) == (0, 0, 0, 0)
        info = admin.create_stream(a, buffer_size=7, policy="drop")
        assert (info.stream, info.id, info.buffer_size, info.policy) == (a, a, 7, "drop")
        assert (info.current_load, info.first_seq, info.last_seq) == (0, 1, 0)
        assert not info.closed and not info.is_closed
        with pytest.raises(StreamExistsError) as exists:
            admin.create_stream(a)
        assert exists.value.stream_id == a
        again, created = admin.get_or_create(a, buffer_size=99)
        assert (created, again.buffer_size, again.policy) == (False, 7, "drop")
        new, created = admin.get_or_create(c, buffer_size=33, policy=BackpressurePolicy.BLOCK)
        assert (created, new.buffer_size, new.policy) == (True, 33, "block")
        assert admin.list_streams() == sorted([a, c])
        assert [i.stream for i in admin.list_stream_info()] == sorted([a, c])
        assert admin.stream_count() == 2
        with Producer(b.control, timeout=T) as p, Subscriber(b.control, timeout=T) as sub:
            following = sub.subscribe(c)
            p.send_many(c, texts(10))
            p.send_many(a, texts(9))
            assert sum(e.dropped for e in drop_reports(p, a, 2)) == 2
            p.flush(timeout=T)
            take(following, 10)
            stats = admin.stats()
            assert (stats.streams, stats.open_streams, stats.subscribers) == (2, 2, 1)
            assert stats.events_in == 10 + 7
            assert stats.events_out >= 10
            assert stats.dropped == 2
            assert stats.clients >= 3
            info_c = admin.stream_info(c)
            assert (info_c.events_in, info_c.last_seq, info_c.subscribers) == (10, 10, 1)
            closed = admin.close_stream(c)
            assert closed.closed and closed.last_seq == 10
            assert admin.stats().open_streams == 1
        for missing in (admin.stream_info, admin.close_stream):
            with pytest.raises(StreamNotFoundError) as nf:
                missing(f"{stream_id}-missing")
            assert nf.value.stream_id == f"{stream_id}-missing"
        with pytest.raises(InvalidStreamIdError):
            admin.create_stream("")
        assert admin.stats().streams == 2


def test_unreachable_broker_raises_within_timeout():
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there

    def attempt(make: Callable[..., Any]) -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            make(endpoint, timeout=1).close()
        except BaseException as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    attempts = {
        make: Worker(lambda make=make: attempt(make)) for make in (Producer, Subscriber, Admin)
    }
    for make, worker in attempts.items():
        elapsed, error = worker.result(timeout=T)
        assert isinstance(error, BrokerUnavailableError), f"{make.__name__}: {error!r}"
        assert isinstance(error, ConnectionError)
        assert endpoint in str(error)
        assert 0.9 <= elapsed < 3, f"{make.__name__} took {elapsed:.2f}s"


# -- liveness --------------------------------------------------------------------------------

_SUBSCRIBER_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from zevents import Subscriber

    control, stream = sys.argv[1], sys.argv[2]
    sub = Subscriber(control, timeout=10)
    following = sub.subscribe(stream, from_seq=1)
    print("ready", flush=True)
    for _ in range(3):
        event = following.next_event(timeout=10)
        print("got", event.seq, flush=True)
    threading.Event().wait(120)  # alive, silent, holding its cursor
    """
)


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_killed_subscriber_stops_blocking_producer_after_timeout(make_broker, stream_id):
    b = make_broker("--subscriber-timeout", "2")
    with Admin(b.control, timeout=T) as admin, Producer(b.control, timeout=T) as p:
        admin.create_stream(stream_id, buffer_size=10)
        child = subprocess.Popen(
            [sys.executable, "-c", _SUBSCRIBER_SCRIPT, b.control, stream_id],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            lines = _lines(child)
            assert lines.get(timeout=T) == "ready"
            p.send_many(stream_id, texts(3))
            p.flush(timeout=T)
            assert [lines.get(timeout=T) for _ in range(3)] == ["got 1", "got 2", "got 3"]
            p.send_many(stream_id, texts(30, start=3))  # more than the buffer holds
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=T)
            # The control socket may overtake the ingest socket: wait for the parking.
            deadline = time.monotonic() + 1.5
            info = admin.stream_info(stream_id)
            while info.parked == 0 and time.monotonic() < deadline:
                info = admin.stream_info(stream_id)
            assert info.subscribers == 1  # still gating: the broker has not noticed yet
            assert info.parked > 0
            p.flush(stream_id, timeout=T)  # gets through once the timeout passes
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=T)
        info = admin.stream_info(stream_id)
        assert (info.subscribers, info.events_in, info.parked) == (0, 33, 0)
        admin.close_stream(stream_id)
        with Subscriber(b.control, timeout=T) as sub:
            got = take_to_end(sub.subscribe(stream_id))
        assert [e.seq for e in got] == list(range(24, 34))
        assert text_of(got) == [str(i) for i in range(23, 33)]


def test_sync_clients_keep_working_after_idling(broker, stream_id):
    with (
        Admin(broker.control, timeout=1) as admin,
        Producer(broker.control, timeout=1) as p,
        Subscriber(broker.control, timeout=1) as sub,
    ):
        admin.create_stream(stream_id)
        idle(3.5)  # longer than max(timeout, 3 heartbeat intervals)
        errors: list[BaseException] = []
        for call in (
            lambda: admin.stats(),
            lambda: sub.subscribe(stream_id, from_seq=1),
            lambda: (p.send(stream_id, Event.text_delta("x")), p.flush(timeout=T)),
        ):
            try:
                call()
            except ZEventsError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        assert sub.next_event(timeout=T) is not None


def test_paused_sync_subscriber_keeps_gating_block_stream(broker, stream_id):
    with (
        Admin(broker.control, timeout=T) as admin,
        Producer(broker.control, timeout=T) as p,
        Subscriber(broker.control, timeout=T) as sub,
    ):
        admin.create_stream(stream_id, buffer_size=5)
        following = sub.subscribe(stream_id, from_seq=1)
        p.send_many(stream_id, texts(20))
        # The application is busy (not calling the subscriber) for 3 s, longer than
        # the shared broker's 2 s subscriber timeout: the subscriber is alive and must
        # keep holding the producer back.
        with pytest.raises(TimeoutError):
            p.flush(stream_id, timeout=3)
        got = take(following, 20)
        p.flush(stream_id, timeout=T)
        assert [e.seq for e in got] == list(range(1, 21))


# -- payloads and lost publish frames --------------------------------------------------------


def test_event_types_and_payloads_survive_the_trip(broker, stream_id):
    big = "é" * 200_000  # a large event: handed to ZeroMQ without copying
    events = [
        Event.message_start("m1"),
        Event.thinking("hmm"),
        Event.content_start(0),
        Event.text_delta("Hello, "),
        Event.text_delta(big),
        Event.text_delta("🙂"),
        Event.content_end(0),
        Event.usage(1, 2, 3),
        Event.error("boom"),
        Event.message_stop("m1", "end_turn"),
    ]
    with Subscriber(broker.control, timeout=T) as sub, Producer(broker.control, timeout=T) as p:
        following = sub.subscribe(stream_id, create=True)
        for e in events:
            p.send(stream_id, e)
        p.flush(timeout=T)
        got = take(following, len(events))
    assert [e.type for e in got] == [e.type for e in events]
    assert [e.data for e in got] == [e.data for e in events]
    assert [e.timestamp for e in got] == [e.timestamp for e in events]
    assert got[4].type is EventType.TEXT_DELTA and got[4].data["text"] == big


def _lossy(handler: Callable[[bytes], None], lose: Callable[[int, int], bool]) -> Any:
    """Wrap a SUB-socket handler so it loses the event frames ``lose(first, count)`` picks.

    This is what a publish socket at its high-water mark does to a slow subscriber:
    whole frames vanish, and the subscriber must notice the gap by seq and fetch.
    """
    from zevents.protocol import frames

    def handle(frame: bytes) -> None:
        _, kind, seq, start = frames.decode_publish(frame)
        if kind == frames.KIND_EVENTS:
            count = len(frames.split_events(memoryview(frame)[start:]))
            if lose(seq, count):
                return
        handler(frame)

    return handle


def test_subscriber_recovers_publish_frames_lost_on_the_way(broker, stream_id):
    n = 300
    lost: list[tuple[int, int]] = []

    def lose(first: int, count: int) -> bool:
        # Lose a frame in the middle (the next one shows the gap) and the very last
        # one (nothing follows it: only the broker's heartbeat reports the head).
        if (first <= 100 < first + count) or first + count - 1 == n:
            lost.append((first, count))
            return True
        return False

    with Subscriber(broker.control, timeout=T) as sub, Producer(broker.control, timeout=T) as p:
        sock = sub._sub  # fault injection at the receiving end of the publish socket
        sub._data_socks[sock] = _lossy(sub._data_socks[sock], lose)
        with Admin(broker.control, timeout=T) as admin:
            admin.create_stream(stream_id, buffer_size=1000)  # room for all: read later
        following = sub.subscribe(stream_id)
        for i in range(n):
            p.send(stream_id, Event.text_delta(str(i)), timeout=T)
            if i % 10 == 9:
                p.flush(timeout=T)  # a few events per publish frame
        p.flush(timeout=T)
        got = take(following, n)
    assert len(lost) == 2, lost
    assert [e.seq for e in got] == list(range(1, n + 1))
    assert text_of(got) == [str(i) for i in range(n)]
