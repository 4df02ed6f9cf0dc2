"""The broker's guarantees through the asyncio SDK (``async with`` clients).

Every await that can wait carries a timeout (the SDK's own, or
``asyncio.wait_for``) so a bug fails a test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from _sdk_helpers import free_port, text_of, texts

from zevents import (
    AsyncAdmin,
    AsyncProducer,
    AsyncSubscriber,
    AsyncSubscription,
    BackpressurePolicy,
    BrokerUnavailableError,
    Event,
    ReplayUnavailableError,
    StreamClosed,
    StreamClosedError,
    StreamExistsError,
    StreamFullError,
    StreamNotFoundError,
)

T = 10.0  # seconds any single await may take before the test fails
R = TypeVar("R")


# -- helpers ---------------------------------------------------------------------------


async def within(aw: Awaitable[R], timeout: float = T) -> R:
    return await asyncio.wait_for(aw, timeout)


async def take(source: Any, n: int, timeout: float = T) -> list[Event]:
    """``n`` events from an AsyncSubscriber or AsyncSubscription."""
    out = []
    for _ in range(n):
        event = await source.next_event(timeout=timeout)
        assert event is not None, f"iteration ended after {len(out)} of {n} events"
        out.append(event)
    return out


async def collect(source: AsyncSubscription | AsyncSubscriber, timeout: float = T) -> list[Event]:
    """Everything ``async for`` yields until the end, which must come within ``timeout``."""

    async def run() -> list[Event]:
        return [event async for event in source]

    return await within(run(), timeout)


async def drop_reports(p: AsyncProducer, stream_id: str, expected: int) -> list[StreamFullError]:
    """Flush ``stream_id`` and collect the errors reporting its drops until they add up
    to ``expected`` (a notice may trail the flush that should have raised it: see
    ``test_broker_tells_drops_no_later_than_it_acks_them`` in test_semantics.py)."""
    errors: list[StreamFullError] = []
    deadline = time.monotonic() + T
    while sum(e.dropped for e in errors) < expected:
        told = sum(e.dropped for e in errors)
        assert time.monotonic() < deadline, f"told of {told} of {expected} drops"
        try:
            await p.flush(stream_id, timeout=T)
        except StreamFullError as exc:
            errors.append(exc)
        else:
            await asyncio.sleep(0.01)
    return errors


# -- the basic path ----------------------------------------------------------------------


async def test_events_carry_seq_stream_and_payload(broker, stream_id):
    async with (
        AsyncProducer(broker.control, timeout=T) as p,
        AsyncSubscriber(broker.control, timeout=T) as sub,
    ):
        following = await sub.subscribe(stream_id, create=True)
        assert following.stream_id == stream_id
        events = [
            Event.message_start("m"),
            Event.text_delta("Hi "),
            Event.text_delta("there"),
            Event.usage(1, 2, 3),
            Event.message_stop("m", "end_turn"),
        ]
        await p.send_many(stream_id, events)
        await p.flush(timeout=T)
        async with AsyncAdmin(broker.control, timeout=T) as admin:
            await admin.close_stream(stream_id)
        got = await collect(following)
    assert [e.seq for e in got] == [1, 2, 3, 4, 5]
    assert {e.stream_id for e in got} == {stream_id}
    assert [(e.type, e.data, e.timestamp) for e in got] == [
        (e.type, e.data, e.timestamp) for e in events
    ]


async def test_ack_steps_follow_the_broker_and_the_policy(broker, stream_id):
    # A memory-only broker publishes parked events: BLOCK streams are acked every
    # 512 events (default buffer and window), a DROP stream every half buffer.
    drop = f"{stream_id}-drop"
    async with (
        AsyncAdmin(broker.control, timeout=T) as admin,
        AsyncSubscriber(broker.control, timeout=T) as sub,
    ):
        await admin.create_stream(drop, buffer_size=20, policy="drop")
        assert sub.handshake.limits["publishes_parked"] is True
        await sub.subscribe(stream_id, create=True)
        await sub.subscribe(drop)
        steps = {sid: sub._state.cursors[sid].ack_step for sid in (stream_id, drop)}
    assert steps == {stream_id: 512, drop: 10}


# -- BLOCK and DROP ------------------------------------------------------------------------


async def test_slow_subscriber_block_small_buffer_10000_events_no_loss(broker, stream_id):
    n, size = 10_000, 16
    payload = os.urandom(32768)
    sent = 0
    lag = 0
    async with (
        AsyncAdmin(broker.control, timeout=T) as admin,
        AsyncSubscriber(broker.control, timeout=T) as sub,
        AsyncProducer(broker.control, timeout=T) as p,
    ):
        await admin.create_stream(stream_id, buffer_size=size)
        following = await sub.subscribe(stream_id, from_seq=1)
        window = int(p.handshake.limits["window"])

        async def consume() -> list[Event]:
            nonlocal lag
            got = []
            async for event in following:
                lag = max(lag, sent - event.seq)
                hashlib.sha256(payload).digest()  # some work per event
                if event.seq % 50 == 0:
                    await asyncio.sleep(0)  # and let others run now and then
                got.append(event)
            return got

        consumer = asyncio.ensure_future(consume())
        for i in range(n):
            await p.send(stream_id, Event.text_delta(f"e{i}"), timeout=T)
            sent = i + 1
        await p.flush(timeout=T)
        info = await admin.stream_info(stream_id)
        await admin.close_stream(stream_id)
        got = await within(consumer, 30)
    assert [e.seq for e in got] == list(range(1, n + 1))
    assert text_of(got) == [f"e{i}" for i in range(n)]
    assert (info.events_in, info.dropped, info.rejected) == (n, 0, 0)
    assert info.current_load <= size
    assert lag <= size + window + 64, f"producer ran {lag} events ahead"


async def test_block_send_times_out_and_full_stream_stalls_nothing_else(broker, stream_id):
    other = f"{stream_id}-other"
    async with (
        AsyncAdmin(broker.control, timeout=T) as admin,
        AsyncProducer(broker.control, timeout=T) as p,
    ):
        await admin.create_stream(stream_id, buffer_size=2)
        window = int(p.handshake.limits["window"])
        sent = 0
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            for i in range(window + 100):
                await p.send(stream_id, Event.text_delta(str(i)), timeout=0.5)
                sent += 1
        assert time.monotonic() - started < 5
        assert 2 <= sent <= window + 2
        info = await admin.stream_info(stream_id)
        assert info.current_load == 2 and info.parked <= window
        # Another stream of the same producer flows meanwhile.
        await p.send_many(other, texts(50))
        await p.flush(other, timeout=T)
        assert (await admin.stream_info(other)).events_in == 50
        async with AsyncSubscriber(broker.control, timeout=T) as sub:
            following = await sub.subscribe(stream_id, from_seq=1)
            got = await take(following, sent)
            await p.flush(stream_id, timeout=T)
        assert [e.seq for e in got] == list(range(1, sent + 1))
        assert text_of(got) == [str(i) for i in range(sent)]
        await admin.close_stream(stream_id)
        await admin.close_stream(other)


async def test_drop_stream_raises_stream_full_and_counts(broker, stream_id):
    async with (
        AsyncAdmin(broker.control, timeout=T) as admin,
        AsyncProducer(broker.control, timeout=T) as p,
    ):
        before = (await admin.stats()).dropped
        await admin.create_stream(stream_id, buffer_size=3, policy=BackpressurePolicy.DROP)
        for e in texts(8):
            await p.send(stream_id, e)
        errors = await drop_reports(p, stream_id, 5)
        assert sum(e.dropped for e in errors) == 5
        assert {(e.stream_id, e.buffer_size) for e in errors} == {(stream_id, 3)}
        info = await admin.stream_info(stream_id)
        assert (info.events_in, info.dropped, info.current_load) == (3, 5, 3)
        assert (await admin.stats()).dropped - before >= 5
        await p.send(stream_id, Event.text_delta("dropped too"))
        assert sum(e.dropped for e in await drop_reports(p, stream_id, 1)) == 1
        await p.flush(stream_id, timeout=T)  # reported once, not again
        await admin.close_stream(stream_id)
        async with AsyncSubscriber(broker.control, timeout=T) as sub:
            got = await collect(await sub.subscribe(stream_id, from_seq=1))
        assert text_of(got) == ["0", "1", "2"]


# -- joining late, resuming -------------------------------------------------------------------


async def test_late_join_without_gap_or_overlap(broker, stream_id):
    n = 2000
    async with (
        AsyncAdmin(broker.control, timeout=T) as admin,
        AsyncProducer(broker.control, timeout=T) as p,
    ):
        await admin.create_stream(stream_id, buffer_size=n)
        joined = asyncio.Event()

        async def produce() -> None:
            for i in range(n):
                if i == n * 3 // 4:
                    # Sends on while the subscriber joins, but never finishes first
                    # (the join must be mid-stream for the test to mean anything).
                    await within(joined.wait())
                await p.send(stream_id, Event.text_delta(str(i)), timeout=T)
                if i % 20 == 19:
                    await asyncio.sleep(0)  # a producer among other tasks
            await p.flush(timeout=T)

        producer = asyncio.ensure_future(produce())

        async def half_way() -> None:
            while (await admin.stream_info(stream_id)).last_seq < 300:
                await asyncio.sleep(0.005)

        await within(half_way())
        async with AsyncSubscriber(broker.control, timeout=T) as sub:
            following = await sub.subscribe(stream_id)
            joined_at = (await admin.stream_info(stream_id)).last_seq
            joined.set()
            got = await take(following, n)
            await within(producer)
            await admin.close_stream(stream_id)
            assert await following.next_event(timeout=T) is None
    assert joined_at < n
    assert [e.seq for e in got] == list(range(1, n + 1))
    assert text_of(got) == [str(i) for i in range(n)]


async def test_resume_from_seq_after_subscriber_restart(broker, stream_id):
    async with (
        AsyncAdmin(broker.control, timeout=T) as admin,
        AsyncProducer(broker.control, timeout=T) as p,
    ):
        await admin.create_stream(stream_id, buffer_size=100)
        async with AsyncSubscriber(broker.control, timeout=T) as first:
            following = await first.subscribe(stream_id, from_seq=1)
            await p.send_many(stream_id, texts(25))
            before = await take(following, 17)
        assert [e.seq for e in before] == list(range(1, 18))
        async with AsyncSubscriber(broker.control, timeout=T) as second:
            following = await second.subscribe(stream_id, from_seq=before[-1].seq + 1)
            await p.send_many(stream_id, texts(5, start=25))
            await p.flush(timeout=T)
            await admin.close_stream(stream_id)
            after = await collect(following)
    assert [e.seq for e in after] == list(range(18, 31))
    assert text_of(before + after) == [str(i) for i in range(30)]


async def test_replay_unavailable_names_the_missing_range(broker, stream_id):
    async with (
        AsyncAdmin(broker.control, timeout=T) as admin,
        AsyncProducer(broker.control, timeout=T) as p,
        AsyncSubscriber(broker.control, timeout=T) as reader,
    ):
        await admin.create_stream(stream_id, buffer_size=10)
        following = await reader.subscribe(stream_id, from_seq=1)
        await p.send_many(stream_id, texts(30))
        got = await take(following, 30)  # read past the buffer: 1..20 have left it
        await p.flush(timeout=T)
        assert [e.seq for e in got] == list(range(1, 31))
        info = await admin.stream_info(stream_id)
        assert (info.first_seq, info.last_seq) == (21, 30)
        async with AsyncSubscriber(broker.control, timeout=T) as late:
            with pytest.raises(ReplayUnavailableError) as caught:
                await late.subscribe(stream_id, from_seq=3)
            err = caught.value
            assert (err.stream_id, err.first_missing, err.last_missing) == (stream_id, 3, 20)
            assert "3..20" in str(err)
            resumed = await take(await late.subscribe(stream_id, from_seq=21), 10)
            assert [e.seq for e in resumed] == list(range(21, 31))
        await admin.close_stream(stream_id)


async def test_closed_subscriber_stops_gating_at_once(broker, stream_id):
    async with (
        AsyncAdmin(broker.control, timeout=T) as admin,
        AsyncProducer(broker.control, timeout=T) as p,
    ):
        await admin.create_stream(stream_id, buffer_size=5)
        async with AsyncSubscriber(broker.control, timeout=T) as sub:
            following = await sub.subscribe(stream_id, from_seq=1)
            await p.send_many(stream_id, texts(5))
            await take(following, 2)  # a browser tab closed mid-answer
        await p.send_many(stream_id, texts(20, start=5))
        # The shared broker forgets silent subscribers after 2 s; a closed one must
        # not hold the producer back that long.
        await p.flush(stream_id, timeout=1)


# -- routing -----------------------------------------------------------------------------------


async def test_exact_stream_matching_s1_vs_s10(broker, stream_id):
    s1, s10 = f"{stream_id}-s1", f"{stream_id}-s10"
    async with (
        AsyncProducer(broker.control, timeout=T) as p,
        AsyncSubscriber(broker.control, timeout=T) as sub,
        AsyncAdmin(broker.control, timeout=T) as admin,
    ):
        await admin.create_stream(s10, buffer_size=500)
        following = await sub.subscribe(s1, create=True)
        await p.send_many(s10, texts(300, prefix="ten:"))
        await p.send_many(s1, texts(3, prefix="one:"))
        await p.flush(timeout=T)
        await admin.close_stream(s10)
        await admin.close_stream(s1)
        got = await collect(sub)  # everything this connection receives
        assert await following.next_event(timeout=T) is None
    assert {e.stream_id for e in got} == {s1}
    assert text_of(got) == ["one:0", "one:1", "one:2"]


async def test_fan_out_to_several_subscribers(broker, stream_id):
    n, k = 1500, 4
    async with (
        AsyncAdmin(broker.control, timeout=T) as admin,
        AsyncProducer(broker.control, timeout=T) as p,
    ):
        await admin.create_stream(stream_id, buffer_size=32)
        subs = [await AsyncSubscriber(broker.control, timeout=T).connect() for _ in range(k)]
        try:
            followings = [await s.subscribe(stream_id, from_seq=1) for s in subs]
            readers = [asyncio.ensure_future(collect(f, 30)) for f in followings]
            for i in range(n):
                await p.send(stream_id, Event.text_delta(str(i)), timeout=T)
            await p.flush(timeout=T)
            assert (await admin.stream_info(stream_id)).subscribers == k
            await admin.close_stream(stream_id)
            results = await within(asyncio.gather(*readers), 30)
        finally:
            for s in subs:
                await s.aclose()
    for got in results:
        assert [e.seq for e in got] == list(range(1, n + 1))
        assert text_of(got) == [str(i) for i in range(n)]


async def test_many_producers_many_streams_one_subscriber(broker, stream_id):
    producers, streams_each, n = 4, 5, 200
    sids = {
        pi: [f"{stream_id}-p{pi}-s{si}" for si in range(streams_each)] for pi in range(producers)
    }
    every = [sid for group in sids.values() for sid in group]
    async with AsyncSubscriber(broker.control, timeout=T) as sub:
        subscriptions = {sid: await sub.subscribe(sid, create=True) for sid in every}

        async def produce(pi: int) -> None:
            async with AsyncProducer(broker.control, timeout=T) as p:
                for i in range(n):
                    for sid in sids[pi]:
                        await p.send(sid, Event.text_delta(f"{sid}:{i}"), timeout=T)
                    if i % 10 == 0:
                        await asyncio.sleep(0)
                await p.flush(timeout=T)

        async def read(sid: str) -> list[Event]:
            return await take(subscriptions[sid], n)

        results = await within(
            asyncio.gather(
                *(read(sid) for sid in every), *(produce(pi) for pi in range(producers))
            ),
            40,
        )
        async with AsyncAdmin(broker.control, timeout=T) as admin:
            for sid in every:
                await admin.close_stream(sid)
        assert await collect(sub) == []
        assert sub.streams == []
    for sid, got in zip(every, results, strict=False):
        assert [e.seq for e in got] == list(range(1, n + 1)), sid
        assert text_of(got) == [f"{sid}:{i}" for i in range(n)]
        assert {e.stream_id for e in got} == {sid}


# -- closing ------------------------------------------------------------------------------------


async def test_close_ends_async_for_and_producer_is_told(broker, stream_id):
    closed: list[StreamClosed] = []
    async with (
        AsyncProducer(broker.control, timeout=T) as p,
        AsyncSubscriber(broker.control, timeout=T) as sub,
        AsyncAdmin(broker.control, timeout=T) as admin,
    ):
        p.on_closed(closed.append)
        following = await sub.subscribe(stream_id, create=True)
        reader = asyncio.ensure_future(collect(following))
        await p.send_many(stream_id, texts(40))
        await p.flush(timeout=T)
        assert await p.wait_closed(stream_id, timeout=0.2) is False
        info = await admin.close_stream(stream_id)
        assert info.closed and info.last_seq == 40
        got = await within(reader)
        assert [e.seq for e in got] == list(range(1, 41))
        # The producer hears of it without sending: the awaitable and the callback.
        assert await p.wait_closed(stream_id, timeout=T) is True
        assert closed == [StreamClosed(stream_id, 40)]
        assert p.is_closed(stream_id)
        with pytest.raises(StreamClosedError):
            await p.send(stream_id, Event.text_delta("too late"))
        # A closed stream stays readable: replay, then a clean end.
        async with AsyncSubscriber(broker.control, timeout=T) as again:
            replay = await collect(await again.subscribe(stream_id, from_seq=1))
        assert text_of(replay) == text_of(got)


async def test_closed_stream_readable_until_cleanup(make_broker, stream_id):
    b = make_broker()
    async with (
        AsyncAdmin(b.control, timeout=T) as admin,
        AsyncProducer(b.control, timeout=T) as p,
    ):
        await p.send_many(stream_id, texts(5))
        await p.flush(timeout=T)
        await admin.close_stream(stream_id)
        async with AsyncSubscriber(b.control, timeout=T) as sub:
            got = await collect(await sub.subscribe(stream_id, from_seq=1))
        assert [e.seq for e in got] == [1, 2, 3, 4, 5]
        assert await admin.cleanup_inactive(60) == 0

        async def idle_enough() -> None:
            while (await admin.stream_info(stream_id)).idle <= 0.25:
                await asyncio.sleep(0.01)

        await within(idle_enough())
        assert await admin.cleanup_inactive(0.2) == 1
        with pytest.raises(StreamNotFoundError):
            await admin.stream_info(stream_id)
        async with AsyncSubscriber(b.control, timeout=T) as sub:
            with pytest.raises(StreamNotFoundError):
                await sub.subscribe(stream_id, from_seq=1)


async def test_idle_timeout_closes_stream_and_ends_iteration(make_broker, stream_id):
    b = make_broker("--idle-timeout", "1")
    async with (
        AsyncProducer(b.control, timeout=T) as p,
        AsyncSubscriber(b.control, timeout=T) as sub,
    ):
        following = await sub.subscribe(stream_id, create=True)
        await p.send_many(stream_id, texts(2))
        await p.flush(timeout=T)
        got = await collect(following)  # ends when the broker closes the idle stream
        assert text_of(got) == ["0", "1"]
        assert await p.wait_closed(stream_id, timeout=T)
        with pytest.raises(StreamClosedError):
            await p.send(stream_id, Event.text_delta("x"))


# -- admin, creation rules, reachability ------------------------------------------------------


async def test_admin_operations(make_broker, stream_id):
    b = make_broker()
    a, c = f"{stream_id}-a", f"{stream_id}-c"
    async with AsyncAdmin(b.control, timeout=T) as admin:
        info = await admin.create_stream(a, buffer_size=5, policy="drop")
        assert (info.stream, info.buffer_size, info.policy, info.last_seq) == (a, 5, "drop", 0)
        with pytest.raises(StreamExistsError):
            await admin.create_stream(a)
        same, created = await admin.get_or_create(a)
        assert (created, same.buffer_size) == (False, 5)
        new, created = await admin.get_or_create(c, buffer_size=9)
        assert (created, new.buffer_size, new.policy) == (True, 9, "block")
        assert await admin.list_streams() == sorted([a, c])
        assert [i.stream for i in await admin.list_stream_info()] == sorted([a, c])
        assert await admin.stream_count() == 2
        async with AsyncProducer(b.control, timeout=T) as p:
            await p.send_many(a, texts(7))
            assert sum(e.dropped for e in await drop_reports(p, a, 2)) == 2
            await p.send_many(c, texts(4))
            await p.flush(timeout=T)
        stats = await admin.stats()
        assert (stats.streams, stats.open_streams) == (2, 2)
        assert (stats.events_in, stats.dropped) == (5 + 4, 2)
        closed = await admin.close_stream(c)
        assert closed.closed
        assert (await admin.stats()).open_streams == 1
        with pytest.raises(StreamNotFoundError):
            await admin.stream_info(f"{stream_id}-missing")
        with pytest.raises(StreamNotFoundError):
            await admin.close_stream(f"{stream_id}-missing")


async def test_require_create_refuses_unknown_streams(make_broker, stream_id):
    b = make_broker("--require-create")
    async with (
        AsyncAdmin(b.control, timeout=T) as admin,
        AsyncProducer(b.control, timeout=T) as p,
    ):
        await p.send(stream_id, Event.text_delta("nobody made this stream"))
        with pytest.raises(StreamNotFoundError):
            await p.flush(timeout=T)
        assert await admin.list_streams() == []
        await admin.create_stream(stream_id)
        await p.send(stream_id, Event.text_delta("now it exists"))
        await p.flush(timeout=T)
        assert (await admin.stream_info(stream_id)).events_in == 1


async def test_unreachable_broker_raises_within_timeout():
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    async def attempt(cls: Any) -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            async with cls(endpoint, timeout=1):
                pass
        except BaseException as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    results = await within(
        asyncio.gather(*(attempt(c) for c in (AsyncProducer, AsyncSubscriber, AsyncAdmin)))
    )
    for elapsed, error in results:
        assert isinstance(error, BrokerUnavailableError), repr(error)
        assert endpoint in str(error)
        assert 0.9 <= elapsed < 3, elapsed


# -- liveness -----------------------------------------------------------------------------------


async def test_busy_application_keeps_its_async_clients_alive(make_broker, stream_id):
    # The async clients heartbeat from a task: a subscriber whose application does
    # not read for longer than the subscriber timeout still gates a BLOCK stream, and
    # an admin left alone longer than its timeout still answers.
    b = make_broker("--subscriber-timeout", "2")
    async with (
        AsyncAdmin(b.control, timeout=1) as admin,
        AsyncSubscriber(b.control, timeout=1) as sub,
        AsyncProducer(b.control, timeout=T) as p,
    ):
        await admin.create_stream(stream_id, buffer_size=5)
        following = await sub.subscribe(stream_id, from_seq=1)
        await p.send_many(stream_id, texts(20))
        with pytest.raises(TimeoutError):
            await p.flush(stream_id, timeout=3.5)  # held back all along: nobody read
        info = await admin.stream_info(stream_id)
        assert (info.subscribers, info.current_load, info.parked) == (1, 5, 15)
        got = await take(following, 20)
        await p.flush(stream_id, timeout=T)
        assert [e.seq for e in got] == list(range(1, 21))


async def test_killed_subscriber_stops_blocking_producer(make_broker, stream_id):
    b = make_broker("--subscriber-timeout", "2")
    script = (
        "import sys, asyncio\n"
        "from zevents import AsyncSubscriber\n"
        "async def main():\n"
        "    async with AsyncSubscriber(sys.argv[1], timeout=10) as sub:\n"
        "        following = await sub.subscribe(sys.argv[2], from_seq=1)\n"
        "        print('ready', flush=True)\n"
        "        for _ in range(2):\n"
        "            e = await following.next_event(timeout=10)\n"
        "            print('got', e.seq, flush=True)\n"
        "        await asyncio.sleep(120)\n"  # alive, not reading
        "asyncio.run(main())\n"
    )
    async with (
        AsyncAdmin(b.control, timeout=T) as admin,
        AsyncProducer(b.control, timeout=T) as p,
    ):
        await admin.create_stream(stream_id, buffer_size=10)
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            b.control,
            stream_id,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            assert (await within(child.stdout.readline())).strip() == b"ready"
            await p.send_many(stream_id, texts(2))
            await p.flush(timeout=T)
            for seq in (1, 2):
                assert (await within(child.stdout.readline())).strip() == f"got {seq}".encode()
            await p.send_many(stream_id, texts(30, start=2))
            child.kill()
            await within(child.wait())
            # send_many only queues; the frame leaves with the next loop turn and the
            # control socket may overtake it: wait for the parking.
            deadline = time.monotonic() + 1.5
            info = await admin.stream_info(stream_id)
            while info.parked == 0 and time.monotonic() < deadline:
                info = await admin.stream_info(stream_id)
            assert info.subscribers == 1 and info.parked > 0  # it was holding the producer
            await p.flush(stream_id, timeout=T)  # through once the broker gives up on it
        finally:
            if child.returncode is None:
                child.kill()
                await within(child.wait())
        info = await admin.stream_info(stream_id)
        assert (info.subscribers, info.events_in, info.parked) == (0, 32, 0)


async def test_heartbeating_subscribers_stay_registered_with_a_short_timeout(
    make_broker, stream_id
):
    b = make_broker("--subscriber-timeout", "1")
    async with AsyncAdmin(b.control, timeout=T) as admin:
        await admin.create_stream(stream_id)
        subs = [await AsyncSubscriber(b.control, timeout=T).connect() for _ in range(8)]
        try:
            for sub in subs:
                await sub.subscribe(stream_id)
            fewest = len(subs)
            # The idle period is the stimulus: alive subscribers with nothing to read.
            until = time.monotonic() + 2.5
            while time.monotonic() < until:
                fewest = min(fewest, (await admin.stream_info(stream_id)).subscribers)
                await asyncio.sleep(0.05)
            assert fewest == len(subs)
        finally:
            for sub in subs:
                await sub.aclose()


# -- frames lost and large events ------------------------------------------------------------


async def test_subscriber_recovers_lost_publish_frames(broker, stream_id):
    from zevents.protocol import frames

    n = 200
    lost = []
    sub = AsyncSubscriber(broker.control, timeout=T)
    handler = sub._on_publish

    def lossy(frame: bytes) -> None:  # what a publish socket at its HWM does
        _, kind, seq, start = frames.decode_publish(frame)
        if kind == frames.KIND_EVENTS:
            count = len(frames.split_events(memoryview(frame)[start:]))
            if seq <= 50 < seq + count or seq + count - 1 == n:
                lost.append(seq)
                return
        handler(frame)

    sub._on_publish = lossy  # type: ignore[method-assign]  # fault injection
    async with sub, AsyncProducer(broker.control, timeout=T) as p:
        async with AsyncAdmin(broker.control, timeout=T) as admin:
            await admin.create_stream(stream_id, buffer_size=500)
        following = await sub.subscribe(stream_id)
        for i in range(n):
            await p.send(stream_id, Event.text_delta(str(i)))
            if i % 10 == 9:
                await p.flush(timeout=T)
        got = await take(following, n)
    assert len(lost) == 2, lost
    assert [e.seq for e in got] == list(range(1, n + 1))
    assert text_of(got) == [str(i) for i in range(n)]


async def test_separate_sends_of_large_events_are_delivered(broker, stream_id):
    events = [Event.text_delta(f"{i}:" + "x" * 75_000) for i in range(20)]
    async with (
        AsyncProducer(broker.control, timeout=T) as p,
        AsyncSubscriber(broker.control, timeout=T) as sub,
    ):
        following = await sub.subscribe(stream_id, create=True)
        for event in events:
            await p.send(stream_id, event)
        await p.flush(timeout=5)
        got = await take(following, len(events))
    assert text_of(got) == text_of(events)


async def test_a_refusal_ends_a_wait_for_a_quarter_window(make_broker, stream_id):
    # As in test_semantics: a nack freeing less than a quarter window ends the wait.
    b = make_broker("--buffer-size", "4", "--window", "64", "--max-parked", "50")
    async with (
        AsyncSubscriber(b.control, timeout=T) as sub,
        AsyncProducer(b.control, timeout=T) as p,
    ):
        await within(sub.subscribe(stream_id, create=True))  # never reads
        await within(p.send_many(stream_id, [Event.text_delta(str(i)) for i in range(64)]))
        with pytest.raises(StreamFullError):
            await within(p.send_many(stream_id, [Event.text_delta("more")] * 20, timeout=T / 2))
        await sub.aclose()  # stops gating: what is parked goes in, and the exit flushes
