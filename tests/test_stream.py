"""Tests for zevents.stream: EventStream with threads, asyncio and both at once."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import zevents
from zevents.errors import (
    InvalidEventError,
    StreamClosedError,
    StreamFullError,
    is_stream_closed,
    is_stream_full,
)
from zevents.events import Event, EventType
from zevents.stream import BackpressurePolicy, EventStream, StreamStatistics

BLOCK = BackpressurePolicy.BLOCK
DROP = BackpressurePolicy.DROP
JOIN = 5.0  # seconds any thread or task may take to finish once it is released

needs_asyncio_timeout = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11"
)


def ev(i: int, sender: int = 0) -> Event:
    return Event.new(EventType.TEXT_DELTA, {"text": f"{sender}:{i}", "sender": sender, "i": i})


class Runner(threading.Thread):
    """Run ``fn`` in a daemon thread and keep its result or exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.exc: BaseException | None = None
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:
            self.exc = exc
        finally:
            self.done.set()

    def finish(self, timeout: float = JOIN) -> Any:
        """Wait for the thread; re-raise what it raised, else return its result."""
        self.join(timeout)
        assert not self.is_alive(), "thread did not finish in time"
        if self.exc is not None:
            raise self.exc
        return self.result

    def failure(self, timeout: float = JOIN) -> BaseException:
        """Wait for the thread and return the exception it raised (it must raise)."""
        self.join(timeout)
        assert not self.is_alive(), "thread did not finish in time"
        assert self.exc is not None, f"thread returned {self.result!r} instead of raising"
        return self.exc


async def async_wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.001)


async def within(aw: Awaitable[Any], timeout: float = JOIN) -> Any:
    return await asyncio.wait_for(aw, timeout)


def senders_waiting(s: EventStream, n: int = 1) -> Callable[[], bool]:
    return lambda: s.statistics().waiting_senders == n


def receivers_waiting(s: EventStream, n: int = 1) -> Callable[[], bool]:
    return lambda: s.statistics().waiting_receivers == n


def full_stream(size: int = 1, policy: BackpressurePolicy = BLOCK) -> EventStream:
    s = EventStream(size, policy)
    for i in range(size):
        s.send(ev(i))
    return s


def test_exported_from_package() -> None:
    assert zevents.EventStream is EventStream
    assert zevents.BackpressurePolicy is BackpressurePolicy
    assert zevents.StreamStatistics is StreamStatistics


# -- construction and properties ----------------------------------------------------------


def test_defaults() -> None:
    s = EventStream()
    assert s.buffer_size == 100
    assert s.policy is BLOCK
    assert s.closed is False
    assert s.is_closed() is False
    assert len(s) == 0


@pytest.mark.parametrize("size", [0, -1, -100])
def test_non_positive_buffer_size_means_100(size: int) -> None:
    assert EventStream(size).buffer_size == 100
    assert EventStream(buffer_size=size).buffer_size == 100


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_explicit_buffer_size(size: int) -> None:
    assert EventStream(size).buffer_size == size


def test_default_size_really_holds_100_events() -> None:
    s = EventStream(0, DROP)
    for i in range(100):
        s.send(ev(i))
    with pytest.raises(StreamFullError):
        s.send(ev(100))


def test_policy_argument() -> None:
    assert EventStream(5, DROP).policy is DROP
    assert EventStream(5, policy=BLOCK).policy is BLOCK


def test_len_counts_buffered_events() -> None:
    s = EventStream(10)
    for i in range(4):
        s.send(ev(i))
        assert len(s) == i + 1
    s.receive()
    assert len(s) == 3


# -- send and receive -------------------------------------------------------------------


def test_send_receive_in_order() -> None:
    s = EventStream(10)
    events = [ev(i) for i in range(10)]
    for e in events:
        s.send(e)
    assert [s.receive() for _ in range(10)] == events
    assert len(s) == 0


def test_receive_returns_the_same_event() -> None:
    s = EventStream(2)
    e = Event.usage(1, 2, 3)
    s.send(e)
    assert s.receive() is e


def test_fifo_over_many_wraps_of_a_small_buffer() -> None:
    s = EventStream(3)
    out = []
    for i in range(50):
        s.send(ev(i))
        if len(s) == 3:
            out.append(s.receive())
    while len(s):
        out.append(s.receive())
    assert [e.data["i"] for e in out] == list(range(50))


def test_go_readme_example() -> None:
    s = EventStream(100)
    script = [
        Event.message_start("msg_123"),
        Event.text_delta("Hello "),
        Event.text_delta("World!"),
        Event.message_stop("msg_123", "end_turn"),
    ]
    for e in script:
        s.send(e)
    s.close()
    assert list(s) == script


# -- DROP ---------------------------------------------------------------------------------


def test_drop_raises_stream_full_at_once() -> None:
    s = EventStream(3, DROP)
    kept = [ev(i) for i in range(3)]
    for e in kept:
        s.send(e)
    with pytest.raises(StreamFullError) as info:
        s.send(ev(99))
    err = info.value
    assert err.buffer_size == 3
    assert "3" in str(err).removeprefix(f"stream {err.stream_id}:")
    assert is_stream_full(err)
    assert len(s) == 3
    assert [s.receive() for _ in range(3)] == kept
    assert s.statistics().dropped == 1


def test_drop_ignores_timeout_and_never_waits() -> None:
    s = full_stream(2, DROP)
    start = time.monotonic()
    with pytest.raises(StreamFullError):
        s.send(ev(9), timeout=10)
    assert time.monotonic() - start < 5
    assert s.statistics().waiting_senders == 0


def test_drop_accepts_again_once_room_is_made() -> None:
    s = full_stream(1, DROP)
    with pytest.raises(StreamFullError):
        s.send(ev(1))
    assert s.receive().data["i"] == 0
    s.send(ev(2))
    assert s.receive().data["i"] == 2


def test_stream_full_error_names_the_buffer_size() -> None:
    s = EventStream(37, DROP)
    for i in range(37):
        s.send(ev(i))
    with pytest.raises(StreamFullError) as info:
        s.send(ev(37))
    assert info.value.buffer_size == 37
    assert "37" in str(info.value)


# -- BLOCK: timeouts --------------------------------------------------------------------------


def test_block_send_timeout_raises_builtin_timeout_error() -> None:
    s = full_stream(1)
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        s.send(ev(1), timeout=0.05)
    assert time.monotonic() - start >= 0.04
    assert info.type is TimeoutError
    stats = s.statistics()
    assert stats.waiting_senders == 0
    assert stats.current_load == 1
    # The stream is still usable and the timed-out event was not added.
    assert s.receive().data["i"] == 0
    s.send(ev(2), timeout=1)
    assert s.receive().data["i"] == 2
    assert s.try_receive() is None


@pytest.mark.parametrize("timeout", [0, -1])
def test_block_send_zero_or_negative_timeout_does_not_wait(timeout: float) -> None:
    s = full_stream(1)
    with pytest.raises(TimeoutError):
        s.send(ev(1), timeout=timeout)
    assert s.statistics().waiting_senders == 0


def test_receive_timeout_raises_builtin_timeout_error() -> None:
    s = EventStream(1)
    with pytest.raises(TimeoutError) as info:
        s.receive(timeout=0.05)
    assert info.type is TimeoutError
    assert s.statistics().waiting_receivers == 0
    s.send(ev(1))
    assert s.receive(timeout=1).data["i"] == 1


def test_receive_with_timeout_returns_available_event() -> None:
    s = EventStream(1)
    s.send(ev(1))
    assert s.receive(timeout=0).data["i"] == 1


# -- BLOCK: waiting threads -------------------------------------------------------------------


def test_blocked_sender_is_released_by_receiver(wait_until: Any) -> None:
    s = full_stream(1)
    sender = Runner(s.send, ev(1))
    wait_until(senders_waiting(s))
    assert sender.is_alive()
    assert s.receive().data["i"] == 0
    sender.finish()
    assert s.receive(timeout=JOIN).data["i"] == 1
    assert s.statistics().waiting_senders == 0


def test_blocked_sender_with_timeout_is_released_before_it(wait_until: Any) -> None:
    s = full_stream(1)
    sender = Runner(s.send, ev(1), 30)
    wait_until(senders_waiting(s))
    s.receive()
    sender.finish()
    assert s.receive(timeout=JOIN).data["i"] == 1


def test_many_blocked_senders_all_get_through(wait_until: Any) -> None:
    s = full_stream(1)
    senders = [Runner(s.send, ev(i, sender=i)) for i in range(1, 6)]
    wait_until(senders_waiting(s, 5))
    got = [s.receive(timeout=JOIN) for _ in range(6)]
    for t in senders:
        t.finish()
    assert sorted(e.data["sender"] for e in got) == [0, 1, 2, 3, 4, 5]
    assert s.statistics().waiting_senders == 0


def test_blocked_receiver_is_released_by_sender(wait_until: Any) -> None:
    s = EventStream(1)
    receiver = Runner(s.receive)
    wait_until(receivers_waiting(s))
    assert receiver.is_alive()
    e = ev(7)
    s.send(e)
    assert receiver.finish() is e
    assert s.statistics().waiting_receivers == 0


def test_each_waiting_receiver_gets_one_event(wait_until: Any) -> None:
    s = EventStream(10)
    receivers = [Runner(s.receive) for _ in range(4)]
    wait_until(receivers_waiting(s, 4))
    events = [ev(i) for i in range(4)]
    for e in events:
        s.send(e)
    got = [r.finish() for r in receivers]
    assert sorted(e.data["i"] for e in got) == [0, 1, 2, 3]
    assert len(s) == 0


# -- close ------------------------------------------------------------------------------------


def test_close_sets_closed() -> None:
    s = EventStream()
    s.close()
    assert s.closed is True
    assert s.is_closed() is True


def test_double_close_raises_stream_closed() -> None:
    s = EventStream()
    s.close()
    with pytest.raises(StreamClosedError):
        s.close()
    assert s.closed


def test_send_after_close_raises_stream_closed() -> None:
    s = EventStream()
    s.close()
    with pytest.raises(StreamClosedError) as info:
        s.send(ev(1))
    assert is_stream_closed(info.value)
    with pytest.raises(StreamClosedError):
        s.try_send(ev(1))
    with pytest.raises(StreamClosedError):
        s.send(ev(1), timeout=0.01)
    assert len(s) == 0


def test_send_to_full_closed_stream_raises_stream_closed_not_full() -> None:
    for policy in (BLOCK, DROP):
        s = full_stream(1, policy)
        s.close()
        with pytest.raises(StreamClosedError):
            s.send(ev(1), timeout=0.01)


def test_events_buffered_before_close_can_be_received() -> None:
    s = EventStream(10)
    events = [ev(i) for i in range(3)]
    for e in events:
        s.send(e)
    s.close()
    assert len(s) == 3
    assert [s.receive() for _ in range(3)] == events
    with pytest.raises(StreamClosedError):
        s.receive()
    with pytest.raises(StreamClosedError):
        s.receive(timeout=0.01)
    with pytest.raises(StreamClosedError):
        s.try_receive()


def test_close_releases_waiting_senders_with_stream_closed(wait_until: Any) -> None:
    s = full_stream(1)
    senders = [Runner(s.send, ev(i)) for i in range(1, 4)]
    wait_until(senders_waiting(s, 3))
    s.close()
    for t in senders:
        err = t.failure()
        assert isinstance(err, StreamClosedError), err
    assert s.statistics().waiting_senders == 0
    # The event buffered before close is still there; the blocked ones never got in.
    assert s.receive().data["i"] == 0
    with pytest.raises(StreamClosedError):
        s.receive()


def test_close_releases_waiting_senders_with_timeouts(wait_until: Any) -> None:
    s = full_stream(1)
    sender = Runner(s.send, ev(1), 30)
    wait_until(senders_waiting(s))
    s.close()
    assert isinstance(sender.failure(), StreamClosedError)


def test_close_releases_waiting_receivers_with_stream_closed(wait_until: Any) -> None:
    s = EventStream(5)
    receivers = [Runner(s.receive) for _ in range(3)]
    wait_until(receivers_waiting(s, 3))
    s.close()
    for r in receivers:
        assert isinstance(r.failure(), StreamClosedError)
    assert s.statistics().waiting_receivers == 0


def test_waiting_receivers_drain_before_stream_closed(wait_until: Any) -> None:
    s = EventStream(5)
    receivers = [Runner(s.receive) for _ in range(2)]
    wait_until(receivers_waiting(s, 2))
    e = ev(1)
    s.send(e)
    s.close()  # before the woken receiver had a chance to run
    outcomes = []
    for r in receivers:
        r.join(JOIN)
        assert not r.is_alive()
        outcomes.append(r.result if r.exc is None else r.exc)
    assert sum(o is e for o in outcomes) == 1
    assert sum(isinstance(o, StreamClosedError) for o in outcomes) == 1


def test_receiver_loop_drains_then_sees_closed(wait_until: Any) -> None:
    s = EventStream(2)

    def drain() -> list[Event]:
        got = []
        while True:
            try:
                got.append(s.receive())
            except StreamClosedError:
                return got

    receiver = Runner(drain)
    events = [ev(i) for i in range(20)]
    for e in events:
        s.send(e, timeout=JOIN)
    s.close()
    assert receiver.finish() == events


# -- iteration ---------------------------------------------------------------------------------


def test_for_loop_yields_all_then_ends_after_close() -> None:
    s = EventStream(10)
    events = [ev(i) for i in range(5)]
    for e in events:
        s.send(e)
    s.close()
    assert list(s) == events
    assert list(s) == []


def test_for_loop_in_thread_follows_live_stream() -> None:
    s = EventStream(3)
    consumer = Runner(lambda: list(s))
    events = [ev(i) for i in range(30)]
    for e in events:
        s.send(e, timeout=JOIN)
    s.close()
    assert consumer.finish() == events


async def test_async_for_yields_all_then_ends_after_close() -> None:
    s = EventStream(10)
    events = [ev(i) for i in range(5)]
    for e in events:
        s.send(e)
    s.close()

    async def collect() -> list[Event]:
        return [e async for e in s]

    assert await within(collect()) == events


async def test_async_for_follows_live_stream() -> None:
    s = EventStream(2)

    async def collect() -> list[Event]:
        return [e async for e in s]

    task = asyncio.create_task(collect())
    events = [ev(i) for i in range(20)]
    for e in events:
        await within(s.asend(e))
    s.close()
    assert await within(task) == events


# -- context manager -------------------------------------------------------------------------


def test_context_manager_closes() -> None:
    with EventStream(5) as s:
        assert isinstance(s, EventStream)
        s.send(ev(1))
        assert not s.closed
    assert s.closed
    assert s.receive().data["i"] == 1


def test_context_manager_tolerates_close_inside() -> None:
    with EventStream(5) as s:
        s.close()
    assert s.closed


def test_context_manager_closes_on_exception() -> None:
    s = EventStream(5)
    with pytest.raises(RuntimeError, match="boom"), s:
        raise RuntimeError("boom")
    assert s.closed


# -- policy -------------------------------------------------------------------------------------


def test_policy_setter_and_method() -> None:
    s = EventStream(1)
    s.policy = DROP
    assert s.policy is DROP
    s.set_backpressure_policy(BLOCK)
    assert s.policy is BLOCK
    s.set_backpressure_policy(DROP)
    assert s.policy is DROP
    assert s.statistics().policy is DROP


def test_switching_to_drop_makes_full_sends_fail() -> None:
    s = full_stream(1)
    s.policy = DROP
    with pytest.raises(StreamFullError):
        s.send(ev(1))


def test_switching_to_block_makes_full_sends_wait() -> None:
    s = full_stream(1, DROP)
    s.set_backpressure_policy(BLOCK)
    with pytest.raises(TimeoutError):
        s.send(ev(1), timeout=0.02)


@pytest.mark.parametrize("how", ["setter", "method"])
def test_switching_block_to_drop_releases_blocked_sender(wait_until: Any, how: str) -> None:
    s = full_stream(1)
    senders = [Runner(s.send, ev(i)) for i in (1, 2)]
    wait_until(senders_waiting(s, 2))
    if how == "setter":
        s.policy = DROP
    else:
        s.set_backpressure_policy(DROP)
    for t in senders:
        err = t.failure()
        assert isinstance(err, StreamFullError), err
        assert err.buffer_size == 1
    assert s.statistics().waiting_senders == 0
    assert len(s) == 1
    assert s.receive().data["i"] == 0


def test_setting_block_again_keeps_blocked_sender_waiting(wait_until: Any) -> None:
    s = full_stream(1)
    sender = Runner(s.send, ev(1))
    wait_until(senders_waiting(s))
    s.policy = BLOCK
    # It may wake and re-park, but it must end up waiting again, not fail.
    wait_until(senders_waiting(s))
    assert sender.exc is None
    assert not sender.done.is_set()
    s.receive()
    sender.finish()
    assert s.receive(timeout=JOIN).data["i"] == 1


# -- concurrency ------------------------------------------------------------------------------


def test_ordering_under_concurrent_senders() -> None:
    s = EventStream(8)
    n_senders, per_sender = 4, 250
    start = threading.Barrier(n_senders)

    def produce(sender: int) -> None:
        events = [ev(i, sender) for i in range(per_sender)]
        start.wait(JOIN)
        for e in events:
            s.send(e, timeout=JOIN)

    senders = [Runner(produce, k) for k in range(n_senders)]
    got = [s.receive(timeout=JOIN) for _ in range(n_senders * per_sender)]
    for t in senders:
        t.finish()
    assert len(got) == n_senders * per_sender
    for k in range(n_senders):
        mine = [e.data["i"] for e in got if e.data["sender"] == k]
        assert mine == list(range(per_sender)), f"sender {k} out of order"
    stats = s.statistics()
    assert stats.sent == stats.received == n_senders * per_sender
    assert stats.current_load == 0
    assert stats.waiting_senders == stats.waiting_receivers == 0


def test_concurrent_senders_and_receivers_lose_and_duplicate_nothing() -> None:
    s = EventStream(4)
    n_senders, n_receivers, per_sender = 4, 4, 200

    def produce(sender: int) -> None:
        for i in range(per_sender):
            s.send(ev(i, sender), timeout=JOIN)

    def consume() -> list[Event]:
        got = []
        while True:
            try:
                got.append(s.receive(timeout=JOIN))
            except StreamClosedError:
                return got

    receivers = [Runner(consume) for _ in range(n_receivers)]
    senders = [Runner(produce, k) for k in range(n_senders)]
    for t in senders:
        t.finish(timeout=20)
    s.close()
    per_receiver = [r.finish() for r in receivers]
    seen = [(e.data["sender"], e.data["i"]) for got in per_receiver for e in got]
    assert len(seen) == n_senders * per_sender
    assert set(seen) == {(k, i) for k in range(n_senders) for i in range(per_sender)}
    # FIFO: whatever one receiver saw of one sender, it saw in order.
    for got in per_receiver:
        for k in range(n_senders):
            mine = [e.data["i"] for e in got if e.data["sender"] == k]
            assert mine == sorted(mine)


# -- asyncio ---------------------------------------------------------------------------------


async def test_asend_areceive_in_order() -> None:
    s = EventStream(10)
    events = [ev(i) for i in range(10)]
    for e in events:
        await s.asend(e)
    assert [await s.areceive() for _ in range(10)] == events


async def test_asend_waits_for_areceive() -> None:
    s = full_stream(1)
    task = asyncio.create_task(s.asend(ev(1)))
    await async_wait_until(senders_waiting(s))
    assert not task.done()
    assert (await within(s.areceive())).data["i"] == 0
    await within(task)
    assert (await within(s.areceive())).data["i"] == 1


async def test_areceive_waits_for_asend() -> None:
    s = EventStream(1)
    task = asyncio.create_task(s.areceive())
    await async_wait_until(receivers_waiting(s))
    assert not task.done()
    e = ev(3)
    await s.asend(e)
    assert await within(task) is e


async def test_asend_drop_raises_stream_full() -> None:
    s = full_stream(2, DROP)
    with pytest.raises(StreamFullError) as info:
        await within(s.asend(ev(9)))
    assert info.value.buffer_size == 2


async def test_asend_after_close_raises_stream_closed() -> None:
    s = EventStream(1)
    s.close()
    with pytest.raises(StreamClosedError):
        await within(s.asend(ev(1)))


async def test_areceive_drains_then_raises_stream_closed() -> None:
    s = EventStream(3)
    s.send(ev(1))
    s.close()
    assert (await within(s.areceive())).data["i"] == 1
    with pytest.raises(StreamClosedError):
        await within(s.areceive())


async def test_close_releases_waiting_asend_and_areceive() -> None:
    full = full_stream(1)
    empty = EventStream(1)
    sends = [asyncio.create_task(full.asend(ev(i))) for i in range(2)]
    recvs = [asyncio.create_task(empty.areceive()) for _ in range(2)]
    await async_wait_until(senders_waiting(full, 2))
    await async_wait_until(receivers_waiting(empty, 2))
    full.close()
    empty.close()
    results = await within(asyncio.gather(*sends, *recvs, return_exceptions=True))
    assert all(isinstance(r, StreamClosedError) for r in results), results
    assert full.statistics().waiting_senders == 0
    assert empty.statistics().waiting_receivers == 0
    assert full.receive().data["i"] == 0


async def test_waiting_areceivers_drain_before_stream_closed() -> None:
    s = EventStream(5)
    tasks = [asyncio.create_task(s.areceive()) for _ in range(2)]
    await async_wait_until(receivers_waiting(s, 2))
    e = ev(1)
    s.send(e)
    s.close()
    results = await within(asyncio.gather(*tasks, return_exceptions=True))
    assert sum(r is e for r in results) == 1
    assert sum(isinstance(r, StreamClosedError) for r in results) == 1


async def test_switching_to_drop_releases_waiting_asend() -> None:
    s = full_stream(1)
    task = asyncio.create_task(s.asend(ev(1)))
    await async_wait_until(senders_waiting(s))
    s.set_backpressure_policy(DROP)
    with pytest.raises(StreamFullError):
        await within(task)
    assert len(s) == 1


async def test_cancelled_asend_leaves_stream_consistent() -> None:
    s = full_stream(1)
    task = asyncio.create_task(s.asend(ev(1)))
    await async_wait_until(senders_waiting(s))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    assert s.statistics().waiting_senders == 0
    assert len(s) == 1
    assert s.receive().data["i"] == 0
    await within(s.asend(ev(2)))
    assert s.receive().data["i"] == 2  # the cancelled event never got in
    assert s.try_receive() is None


async def test_cancelled_areceive_leaves_stream_consistent() -> None:
    s = EventStream(2)
    task = asyncio.create_task(s.areceive())
    await async_wait_until(receivers_waiting(s))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    assert s.statistics().waiting_receivers == 0
    e = ev(1)
    s.send(e)
    assert s.try_receive() is e  # not swallowed by the cancelled waiter
    s.send(ev(2))
    assert (await within(s.areceive())).data["i"] == 2


async def test_cancelled_woken_areceive_passes_event_to_next_waiter() -> None:
    s = EventStream(2)
    first = asyncio.create_task(s.areceive())
    await async_wait_until(receivers_waiting(s, 1))
    second = asyncio.create_task(s.areceive())
    await async_wait_until(receivers_waiting(s, 2))
    e = ev(1)
    s.send(e)  # wakes the first waiter...
    first.cancel()  # ...which is cancelled before it runs
    assert await within(second) is e
    with pytest.raises(asyncio.CancelledError):
        await within(first)
    assert len(s) == 0
    assert s.statistics().waiting_receivers == 0


async def test_cancelled_woken_areceive_woken_from_thread_passes_event_on() -> None:
    s = EventStream(2)
    first = asyncio.create_task(s.areceive())
    await async_wait_until(receivers_waiting(s, 1))
    second = asyncio.create_task(s.areceive())
    await async_wait_until(receivers_waiting(s, 2))
    e = ev(1)
    Runner(s.send, e).finish()  # the wake-up arrives from another thread
    first.cancel()
    assert await within(second) is e
    with pytest.raises(asyncio.CancelledError):
        await within(first)


async def test_cancelled_woken_asend_passes_room_to_next_waiter() -> None:
    s = full_stream(1)
    first = asyncio.create_task(s.asend(ev(1)))
    await async_wait_until(senders_waiting(s, 1))
    second = asyncio.create_task(s.asend(ev(2)))
    await async_wait_until(senders_waiting(s, 2))
    assert s.receive().data["i"] == 0  # frees a slot, wakes the first sender...
    first.cancel()  # ...which is cancelled before it runs
    await within(second)
    with pytest.raises(asyncio.CancelledError):
        await within(first)
    assert s.receive().data["i"] == 2
    assert len(s) == 0


async def test_cancelled_woken_areceive_passes_event_to_waiting_thread() -> None:
    s = EventStream(2)
    first = asyncio.create_task(s.areceive())
    await async_wait_until(receivers_waiting(s, 1))
    thread = Runner(s.receive, JOIN)
    await async_wait_until(receivers_waiting(s, 2))
    e = ev(1)
    s.send(e)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(first)
    assert await asyncio.to_thread(thread.finish) is e


@needs_asyncio_timeout
async def test_asyncio_timeout_on_areceive() -> None:
    s = EventStream(1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await s.areceive()
    assert s.statistics().waiting_receivers == 0
    s.send(ev(1))
    assert s.try_receive().data["i"] == 1  # type: ignore[union-attr]


@needs_asyncio_timeout
async def test_asyncio_timeout_on_asend() -> None:
    s = full_stream(1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await s.asend(ev(1))
    assert s.statistics().waiting_senders == 0
    assert len(s) == 1
    assert s.receive().data["i"] == 0
    await within(s.asend(ev(2)))
    assert s.receive().data["i"] == 2


async def test_wait_for_timeout_on_areceive() -> None:
    s = EventStream(1)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(s.areceive(), 0.05)
    assert s.statistics().waiting_receivers == 0


async def test_areceive_timeout_parameter() -> None:
    s = EventStream(1)
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        await within(s.areceive(timeout=0.05))
    assert info.type is TimeoutError
    assert time.monotonic() - start >= 0.04
    assert s.statistics().waiting_receivers == 0
    s.send(ev(1))
    assert (await within(s.areceive(timeout=1))).data["i"] == 1


async def test_asend_timeout_parameter() -> None:
    s = full_stream(1)
    with pytest.raises(TimeoutError) as info:
        await within(s.asend(ev(1), timeout=0.05))
    assert info.type is TimeoutError
    assert s.statistics().waiting_senders == 0
    assert len(s) == 1
    assert s.receive().data["i"] == 0
    await within(s.asend(ev(2), timeout=1))
    assert s.receive().data["i"] == 2


async def test_asend_released_before_its_timeout() -> None:
    s = full_stream(1)
    task = asyncio.create_task(s.asend(ev(1), timeout=30))
    await async_wait_until(senders_waiting(s))
    s.receive()
    await within(task)
    assert s.receive().data["i"] == 1


async def test_ordering_under_concurrent_async_senders() -> None:
    s = EventStream(4)
    n_senders, per_sender = 5, 100

    async def produce(k: int) -> None:
        for i in range(per_sender):
            await s.asend(ev(i, k))

    tasks = [asyncio.create_task(produce(k)) for k in range(n_senders)]
    got = [await within(s.areceive()) for _ in range(n_senders * per_sender)]
    await within(asyncio.gather(*tasks))
    for k in range(n_senders):
        assert [e.data["i"] for e in got if e.data["sender"] == k] == list(range(per_sender))


# -- threads and asyncio together -----------------------------------------------------------


async def test_thread_producer_asyncio_consumer() -> None:
    s = EventStream(4)
    events = [ev(i) for i in range(300)]

    def produce() -> None:
        for e in events:
            s.send(e, timeout=JOIN)
        s.close()

    producer = Runner(produce)
    got = await within(_collect(s), timeout=20)
    await asyncio.to_thread(producer.finish)
    assert got == events


async def _collect(s: EventStream) -> list[Event]:
    return [e async for e in s]


async def test_asyncio_producer_thread_consumer() -> None:
    s = EventStream(4)
    events = [ev(i) for i in range(300)]
    consumer = Runner(lambda: list(s))
    for e in events:
        await within(s.asend(e))
    s.close()
    assert await asyncio.to_thread(consumer.finish) == events


async def test_producer_on_another_event_loop() -> None:
    s = EventStream(3)
    events = [ev(i) for i in range(200)]

    async def produce() -> None:
        for e in events:
            await s.asend(e, timeout=JOIN)
        s.close()

    producer = Runner(asyncio.run, produce())
    got = await within(_collect(s), timeout=20)
    await asyncio.to_thread(producer.finish)
    assert got == events


async def test_thread_sender_blocked_released_by_areceive() -> None:
    s = full_stream(1)
    sender = Runner(s.send, ev(1))
    await async_wait_until(senders_waiting(s))
    assert (await within(s.areceive())).data["i"] == 0
    await asyncio.to_thread(sender.finish)
    assert (await within(s.areceive())).data["i"] == 1


async def test_areceive_released_by_thread_close() -> None:
    s = EventStream(1)
    task = asyncio.create_task(s.areceive())
    await async_wait_until(receivers_waiting(s))
    Runner(s.close).finish()
    with pytest.raises(StreamClosedError):
        await within(task)


# -- statistics, try_send, try_receive ------------------------------------------------------------


def test_statistics() -> None:
    s = EventStream(3, BLOCK)
    stats = s.statistics()
    assert isinstance(stats, StreamStatistics)
    assert stats == StreamStatistics(
        buffer_size=3,
        current_load=0,
        policy=BLOCK,
        closed=False,
        sent=0,
        received=0,
        dropped=0,
        waiting_senders=0,
        waiting_receivers=0,
    )
    for i in range(3):
        s.send(ev(i))
    s.receive()
    s.policy = DROP
    s.send(ev(3))
    with pytest.raises(StreamFullError):
        s.send(ev(4))
    s.close()
    stats = s.statistics()
    assert stats.buffer_size == 3
    assert stats.current_load == 3
    assert stats.policy is DROP
    assert stats.closed is True
    assert stats.sent == 4
    assert stats.received == 1
    assert stats.dropped == 1


def test_statistics_is_a_frozen_snapshot() -> None:
    s = EventStream(3)
    stats = s.statistics()
    s.send(ev(1))
    assert stats.current_load == 0
    assert s.statistics().current_load == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.sent = 5  # type: ignore[misc]


def test_statistics_counts_waiters(wait_until: Any) -> None:
    s = EventStream(1)
    receiver = Runner(s.receive)
    wait_until(receivers_waiting(s))
    assert s.statistics().waiting_receivers == 1
    s.send(ev(0))
    receiver.finish()
    s.send(ev(1))
    sender = Runner(s.send, ev(2))
    wait_until(senders_waiting(s))
    assert s.statistics().waiting_senders == 1
    s.receive()
    sender.finish()
    assert s.statistics().waiting_senders == 0


def test_try_send() -> None:
    s = EventStream(2)
    assert s.try_send(ev(0)) is True
    assert s.try_send(ev(1)) is True
    assert s.try_send(ev(2)) is False  # full under BLOCK: not taken, no wait
    assert len(s) == 2
    assert s.statistics().waiting_senders == 0
    assert [s.receive().data["i"] for _ in range(2)] == [0, 1]


def test_try_send_drop_full_raises_stream_full() -> None:
    s = full_stream(1, DROP)
    with pytest.raises(StreamFullError):
        s.try_send(ev(1))


def test_try_send_wakes_waiting_receiver(wait_until: Any) -> None:
    s = EventStream(1)
    receiver = Runner(s.receive)
    wait_until(receivers_waiting(s))
    e = ev(1)
    assert s.try_send(e) is True
    assert receiver.finish() is e


def test_try_receive() -> None:
    s = EventStream(2)
    assert s.try_receive() is None
    e = ev(1)
    s.send(e)
    assert s.try_receive() is e
    assert s.try_receive() is None
    s.close()
    with pytest.raises(StreamClosedError):
        s.try_receive()


def test_try_receive_wakes_waiting_sender(wait_until: Any) -> None:
    s = full_stream(1)
    sender = Runner(s.send, ev(1))
    wait_until(senders_waiting(s))
    assert s.try_receive().data["i"] == 0  # type: ignore[union-attr]
    sender.finish()
    assert s.receive(timeout=JOIN).data["i"] == 1


# -- invalid events -----------------------------------------------------------------------------


def test_none_event_is_rejected() -> None:
    s = EventStream(2)
    for send in (s.send, s.try_send):
        with pytest.raises(InvalidEventError, match="event cannot be None"):
            send(None)  # type: ignore[arg-type]
    assert len(s) == 0
    assert s.statistics().sent == 0


async def test_none_event_is_rejected_by_asend() -> None:
    s = EventStream(2)
    with pytest.raises(InvalidEventError, match="event cannot be None"):
        await within(s.asend(None))  # type: ignore[arg-type]
    assert len(s) == 0


@pytest.mark.parametrize(
    "bad",
    [
        Event(EventType.TEXT_DELTA, None),  # type: ignore[arg-type]
        Event(EventType.TEXT_DELTA, {}),
        Event(EventType.USAGE, {"prompt_tokens": -1, "completion_tokens": 0, "total_tokens": 0}),
        Event(EventType.TEXT_DELTA, {"text": "x", "b": b"bytes"}),
        {"type": "TextDelta", "data": {"text": "x"}},
        "TextDelta",
    ],
    ids=["data-None", "missing-field", "negative", "bytes-value", "dict", "str"],
)
def test_invalid_event_is_rejected(bad: Any) -> None:
    s = EventStream(2)
    with pytest.raises(InvalidEventError):
        s.send(bad)
    with pytest.raises(InvalidEventError):
        s.try_send(bad)
    assert len(s) == 0
    assert s.statistics().sent == 0


async def test_invalid_event_is_rejected_by_asend() -> None:
    s = EventStream(2)
    with pytest.raises(InvalidEventError):
        await within(s.asend(Event(EventType.TEXT_DELTA, {})))
    assert len(s) == 0


def test_invalid_event_on_full_block_stream_fails_without_waiting() -> None:
    s = full_stream(1)
    start = time.monotonic()
    with pytest.raises(InvalidEventError):
        s.send(Event(EventType.TEXT_DELTA, {}), timeout=10)
    assert time.monotonic() - start < 5
    assert s.statistics().waiting_senders == 0


# -- activity -----------------------------------------------------------------------------------


def test_send_and_receive_update_last_activity() -> None:
    s = EventStream(2)
    s.last_activity = time.monotonic() - 100
    s.send(ev(1))
    assert time.monotonic() - s.last_activity < 50
    s.last_activity = time.monotonic() - 100
    s.receive()
    assert time.monotonic() - s.last_activity < 50
