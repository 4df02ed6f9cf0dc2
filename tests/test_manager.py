"""Tests for zevents.manager: StreamManager and StreamInfo."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

import zevents
from zevents.errors import (
    InvalidStreamIdError,
    StreamClosedError,
    StreamExistsError,
    StreamFullError,
    StreamNotFoundError,
    is_stream_not_found,
)
from zevents.events import Event
from zevents.manager import StreamInfo, StreamManager
from zevents.stream import BackpressurePolicy, EventStream

BLOCK = BackpressurePolicy.BLOCK
DROP = BackpressurePolicy.DROP
JOIN = 5.0
INVALID_IDS = ["", "a\x00b", "x" * 257, "é" * 129, None, 5, b"bytes"]


@pytest.fixture
def manager() -> Iterator[StreamManager[EventStream]]:
    m = StreamManager(buffer_size=10)
    yield m
    m.close_all()


@pytest.fixture
def racy() -> Iterator[None]:
    """Switch threads as often as possible to shake out races."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def make_old(stream: EventStream, seconds: float = 100) -> None:
    stream.last_activity = time.monotonic() - seconds


def run_threads(n: int, fn: Any) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released together; their results or exceptions."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def body(i: int) -> None:
        barrier.wait(JOIN)
        try:
            results[i] = fn(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
        assert not t.is_alive()
    return results


def test_exported_from_package() -> None:
    assert zevents.StreamManager is StreamManager
    assert zevents.StreamInfo is StreamInfo


# -- create and get ---------------------------------------------------------------------


def test_create_stream(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("session-1")
    assert isinstance(s, EventStream)
    assert s.buffer_size == 10
    assert s.policy is BLOCK
    assert not s.closed
    assert manager.get_stream("session-1") is s


def test_create_duplicate_raises_stream_exists(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("a")
    with pytest.raises(StreamExistsError) as info:
        manager.create_stream("a")
    assert info.value.stream_id == "a"
    assert info.value.op == "create"
    assert manager.get_stream("a") is s
    assert len(manager) == 1


def test_get_missing_raises_stream_not_found(manager: StreamManager[EventStream]) -> None:
    with pytest.raises(StreamNotFoundError) as info:
        manager.get_stream("nonexistent")
    assert info.value.stream_id == "nonexistent"
    assert info.value.op == "lookup"
    assert is_stream_not_found(info.value)


def test_streams_are_independent(manager: StreamManager[EventStream]) -> None:
    s1 = manager.create_stream("session-user-123")
    s2 = manager.create_stream("session-user-456")
    assert s1 is not s2
    s1.send(Event.text_delta("Hello user 123"))
    s2.send(Event.text_delta("Hello user 456"))
    assert s1.receive().data["text"] == "Hello user 123"
    assert s2.receive().data["text"] == "Hello user 456"


def test_get_or_create(manager: StreamManager[EventStream]) -> None:
    s, created = manager.get_or_create("x")
    assert created is True
    assert isinstance(s, EventStream)
    again, created_again = manager.get_or_create("x")
    assert again is s
    assert created_again is False
    assert len(manager) == 1


def test_get_or_create_finds_stream_made_by_create(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("x")
    assert manager.get_or_create("x") == (s, False)


def test_manager_defaults() -> None:
    with StreamManager() as m:
        s = m.create_stream("a")
        assert s.buffer_size == 100
        assert s.policy is BLOCK


@pytest.mark.parametrize("size", [0, -5])
def test_manager_non_positive_buffer_size_means_100(size: int) -> None:
    with StreamManager(size) as m:
        assert m.create_stream("a").buffer_size == 100


def test_manager_policy_applies_to_streams() -> None:
    with StreamManager(2, DROP) as m:
        s = m.create_stream("a")
        assert s.policy is DROP
        s.send(Event.text_delta("1"))
        s.send(Event.text_delta("2"))
        with pytest.raises(StreamFullError):
            s.send(Event.text_delta("3"))


def test_create_stream_per_stream_options(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("small", buffer_size=3, policy=DROP)
    assert s.buffer_size == 3
    assert s.policy is DROP
    for i in range(3):
        s.send(Event.text_delta(str(i)))
    with pytest.raises(StreamFullError) as info:
        s.send(Event.text_delta("x"))
    assert info.value.buffer_size == 3
    # Options are per stream: the manager's defaults are unchanged.
    other = manager.create_stream("default")
    assert other.buffer_size == 10
    assert other.policy is BLOCK


def test_create_stream_only_one_option(manager: StreamManager[EventStream]) -> None:
    a = manager.create_stream("a", buffer_size=4)
    b = manager.create_stream("b", policy=DROP)
    assert (a.buffer_size, a.policy) == (4, BLOCK)
    assert (b.buffer_size, b.policy) == (10, DROP)


def test_stream_knows_its_id(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("named")
    s.close()
    with pytest.raises(StreamClosedError) as info:
        s.send(Event.text_delta("x"))
    assert info.value.stream_id == "named"


# -- close --------------------------------------------------------------------------------


def test_close_stream_closes_and_removes(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("a")
    s.send(Event.text_delta("left over"))
    manager.close_stream("a")
    assert s.closed
    assert "a" not in manager
    assert len(manager) == 0
    with pytest.raises(StreamNotFoundError):
        manager.get_stream("a")
    with pytest.raises(StreamClosedError):
        s.send(Event.text_delta("x"))
    assert s.receive().data["text"] == "left over"  # buffered events survive close


def test_close_missing_raises_stream_not_found(manager: StreamManager[EventStream]) -> None:
    with pytest.raises(StreamNotFoundError):
        manager.close_stream("nope")
    manager.create_stream("a")
    manager.close_stream("a")
    with pytest.raises(StreamNotFoundError):
        manager.close_stream("a")


def test_close_stream_already_closed_by_user(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("a")
    s.close()
    manager.close_stream("a")
    assert "a" not in manager


def test_id_can_be_reused_after_close(manager: StreamManager[EventStream]) -> None:
    old = manager.create_stream("a")
    manager.close_stream("a")
    new = manager.create_stream("a")
    assert new is not old
    assert not new.closed


def test_close_all(manager: StreamManager[EventStream]) -> None:
    streams = [manager.create_stream(f"s{i}") for i in range(5)]
    streams[0].close()
    manager.close_all()
    assert all(s.closed for s in streams)
    assert len(manager) == 0
    assert manager.list_streams() == []
    manager.close_all()  # nothing left: still fine


def test_close_stream_releases_blocked_receiver(
    manager: StreamManager[EventStream], wait_until: Any
) -> None:
    s = manager.create_stream("a")
    done = threading.Event()
    result: list[BaseException] = []

    def receive() -> None:
        try:
            s.receive()
        except BaseException as exc:
            result.append(exc)
        done.set()

    threading.Thread(target=receive, daemon=True).start()
    wait_until(lambda: s.statistics().waiting_receivers == 1)
    manager.close_stream("a")
    assert done.wait(JOIN)
    assert isinstance(result[0], StreamClosedError)


def test_context_manager_closes_all() -> None:
    with StreamManager(5) as m:
        assert isinstance(m, StreamManager)
        a = m.create_stream("a")
        b, _ = m.get_or_create("b")
    assert a.closed and b.closed
    assert len(m) == 0


def test_context_manager_closes_all_on_exception() -> None:
    m = StreamManager(5)
    with pytest.raises(RuntimeError), m:
        s = m.create_stream("a")
        raise RuntimeError("boom")
    assert s.closed
    assert len(m) == 0


# -- listing and counting ------------------------------------------------------------------


def test_list_count_len_contains(manager: StreamManager[EventStream]) -> None:
    assert manager.list_streams() == []
    assert manager.stream_count() == 0
    assert len(manager) == 0
    assert "b" not in manager
    for sid in ("b", "c", "a"):
        manager.create_stream(sid)
    assert manager.list_streams() == ["a", "b", "c"]
    assert manager.stream_count() == 3
    assert len(manager) == 3
    assert "b" in manager
    assert "z" not in manager
    manager.close_stream("b")
    assert manager.list_streams() == ["a", "c"]
    assert manager.stream_count() == 2
    assert len(manager) == 2
    assert "b" not in manager


def test_list_streams_is_a_copy(manager: StreamManager[EventStream]) -> None:
    manager.create_stream("a")
    ids = manager.list_streams()
    ids.append("b")
    assert manager.list_streams() == ["a"]


# -- invalid IDs --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", INVALID_IDS, ids=repr)
@pytest.mark.parametrize(
    "op", ["create_stream", "get_stream", "get_or_create", "close_stream", "stream_info"]
)
def test_invalid_ids_raise(manager: StreamManager[EventStream], op: str, bad: Any) -> None:
    with pytest.raises(InvalidStreamIdError):
        getattr(manager, op)(bad)
    assert len(manager) == 0


def test_longest_valid_ids_work(manager: StreamManager[EventStream]) -> None:
    for sid in ("x" * 256, "é" * 128, "😀" * 64):
        manager.create_stream(sid)
        assert sid in manager
        manager.close_stream(sid)


# -- concurrency ---------------------------------------------------------------------------


@pytest.mark.usefixtures("racy")
def test_get_or_create_concurrently_creates_exactly_once() -> None:
    calls: list[str] = []
    calls_lock = threading.Lock()
    second_call: dict[str, threading.Event] = {}

    def factory(sid: str, size: int, policy: BackpressurePolicy) -> EventStream:
        # Widen the race window: the first creator lingers until another creation of
        # the same ID starts (which must never happen) or 50 ms pass.
        with calls_lock:
            calls.append(sid)
            first = calls.count(sid) == 1
            event = second_call.setdefault(sid, threading.Event())
        if first:
            event.wait(0.05)
        else:
            event.set()
        return EventStream(size, policy, stream_id=sid)

    with StreamManager(4, factory=factory) as m:
        for round_ in range(6):
            sid = f"race-{round_}"
            results = run_threads(8, lambda i, sid=sid: m.get_or_create(sid))
            assert not [r for r in results if isinstance(r, BaseException)], results
            created = [r for r in results if r[1]]
            assert len(created) == 1
            assert len({id(r[0]) for r in results}) == 1
            assert results[0][0] is m.get_stream(sid)
        assert sorted(calls) == sorted(f"race-{r}" for r in range(6))
        assert len(m) == 6


@pytest.mark.usefixtures("racy")
def test_create_stream_concurrently_one_wins(manager: StreamManager[EventStream]) -> None:
    for round_ in range(20):
        sid = f"c-{round_}"
        results = run_threads(8, lambda i, sid=sid: manager.create_stream(sid))
        streams = [r for r in results if isinstance(r, EventStream)]
        errors = [r for r in results if isinstance(r, StreamExistsError)]
        assert len(streams) == 1
        assert len(errors) == 7
        assert manager.get_stream(sid) is streams[0]


@pytest.mark.usefixtures("racy")
def test_concurrent_mixed_operations_keep_count_right(
    manager: StreamManager[EventStream],
) -> None:
    def work(i: int) -> int:
        made = 0
        for j in range(50):
            _, created = manager.get_or_create(f"s-{(i * 50 + j) % 100}")
            made += created
        return made

    results = run_threads(8, work)
    assert sum(results) == 100
    assert len(manager) == 100
    assert manager.list_streams() == sorted(f"s-{k}" for k in range(100))


# -- inactivity ------------------------------------------------------------------------------


def test_cleanup_inactive_seconds(manager: StreamManager[EventStream]) -> None:
    old = manager.create_stream("old")
    fresh = manager.create_stream("fresh")
    make_old(old)
    assert manager.cleanup_inactive(50) == 1
    assert old.closed
    assert not fresh.closed
    assert manager.list_streams() == ["fresh"]
    assert manager.cleanup_inactive(50) == 0


def test_cleanup_inactive_timedelta(manager: StreamManager[EventStream]) -> None:
    a = manager.create_stream("a")
    b = manager.create_stream("b")
    manager.create_stream("c")
    make_old(a, 3 * 3600)
    make_old(b, 2 * 3600)
    assert manager.cleanup_inactive(timedelta(hours=2.5)) == 1
    assert manager.list_streams() == ["b", "c"]
    assert manager.cleanup_inactive(timedelta(minutes=90)) == 1
    assert manager.list_streams() == ["c"]
    assert a.closed and b.closed


def test_cleanup_inactive_removes_many(manager: StreamManager[EventStream]) -> None:
    streams = [manager.create_stream(f"s{i}") for i in range(6)]
    for s in streams[::2]:
        make_old(s)
    assert manager.cleanup_inactive(10.0) == 3
    assert manager.list_streams() == ["s1", "s3", "s5"]


@pytest.mark.parametrize("threshold", [0, -1, 0.0, -3.5, timedelta(0), timedelta(seconds=-5)])
def test_cleanup_non_positive_threshold_returns_0(
    manager: StreamManager[EventStream], threshold: Any
) -> None:
    s = manager.create_stream("a")
    make_old(s, 10_000)
    assert manager.cleanup_inactive(threshold) == 0
    assert not s.closed
    assert "a" in manager


def test_cleanup_of_stream_closed_by_user(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("a")
    s.close()
    make_old(s)
    assert manager.cleanup_inactive(1) == 1
    assert "a" not in manager


@pytest.mark.parametrize(
    "activity",
    [
        lambda m, s: m.get_stream("a"),
        lambda m, s: m.get_or_create("a"),
        lambda m, s: s.send(Event.text_delta("x")),
        lambda m, s: (s.send(Event.text_delta("x")), make_old(s), s.receive()),
        lambda m, s: s.try_send(Event.text_delta("x")),
        lambda m, s: (s.send(Event.text_delta("x")), make_old(s), s.try_receive()),
    ],
    ids=["get", "get_or_create", "send", "receive", "try_send", "try_receive"],
)
def test_activity_keeps_stream_alive(manager: StreamManager[EventStream], activity: Any) -> None:
    s = manager.create_stream("a")
    make_old(s)
    activity(manager, s)
    assert manager.cleanup_inactive(50) == 0
    assert "a" in manager
    make_old(s)
    assert manager.cleanup_inactive(50) == 1  # and without activity it would have gone


def test_create_counts_as_activity(manager: StreamManager[EventStream]) -> None:
    manager.create_stream("a")
    assert manager.cleanup_inactive(50) == 0
    assert "a" in manager


def test_inspection_is_not_activity(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("a")
    make_old(s)
    manager.stream_info("a")
    manager.list_stream_info()
    manager.list_streams()
    assert "a" in manager
    assert manager.cleanup_inactive(50) == 1


# -- StreamInfo ---------------------------------------------------------------------------


def test_stream_info(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("a", buffer_size=5)
    s.send(Event.text_delta("1"))
    s.send(Event.text_delta("2"))
    before = datetime.now(timezone.utc)
    info = manager.stream_info("a")
    after = datetime.now(timezone.utc)
    assert isinstance(info, StreamInfo)
    assert info.id == "a"
    assert info.buffer_size == 5
    assert info.current_load == 2
    assert info.is_closed is False
    assert isinstance(info.last_activity, datetime)
    assert info.last_activity.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=5) <= info.last_activity <= after


def test_stream_info_last_activity_reflects_monotonic_age(
    manager: StreamManager[EventStream],
) -> None:
    s = manager.create_stream("a")
    make_old(s, 3600)
    info = manager.stream_info("a")
    age = datetime.now(timezone.utc) - info.last_activity
    assert timedelta(minutes=59) < age < timedelta(minutes=61)


def test_stream_info_of_closed_stream(manager: StreamManager[EventStream]) -> None:
    s = manager.create_stream("a")
    s.send(Event.text_delta("1"))
    s.close()
    info = manager.stream_info("a")
    assert info.is_closed is True
    assert info.current_load == 1


def test_stream_info_is_frozen(manager: StreamManager[EventStream]) -> None:
    manager.create_stream("a")
    info = manager.stream_info("a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.current_load = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.id = "b"  # type: ignore[misc]


def test_stream_info_missing_raises_stream_not_found(manager: StreamManager[EventStream]) -> None:
    with pytest.raises(StreamNotFoundError):
        manager.stream_info("nope")


def test_list_stream_info(manager: StreamManager[EventStream]) -> None:
    assert manager.list_stream_info() == []
    manager.create_stream("b", buffer_size=2)
    manager.create_stream("a", buffer_size=3)
    manager.get_stream("a").send(Event.text_delta("x"))
    infos = manager.list_stream_info()
    assert [i.id for i in infos] == ["a", "b"]
    assert [(i.buffer_size, i.current_load, i.is_closed) for i in infos] == [
        (3, 1, False),
        (2, 0, False),
    ]
    assert all(isinstance(i, StreamInfo) for i in infos)
