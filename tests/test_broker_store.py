"""Tests for broker.store (the SQLite store) and BrokerCore's durability.

The store is driven directly (batches in, rows out, checked with plain sqlite3
queries on ``store.path``); the core is driven in memory as in test_broker_core,
with ``BrokerConfig(data_dir=...)`` and the runner's group commit done by hand:
``take_writes()``, ``Store.commit``, ``on_committed()``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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

from broker.store import Store, StoredStream, StoreError, StreamWrite, WriteBatch


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return _clock.__wrapped__(monkeypatch)  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def open_store() -> Iterator[Callable[..., Store]]:
    """``open_store(dir, sync=...)``: a Store, closed at the end of the test."""
    opened: list[Store] = []

    def _open(data_dir: Path | str, sync: str = "normal") -> Store:
        for earlier in opened:  # it "crashed": its process would have let go of the lock
            if Path(earlier.path).parent == Path(data_dir) and earlier._lock_fd >= 0:
                fcntl.flock(earlier._lock_fd, fcntl.LOCK_UN)
        store = Store(str(data_dir), sync)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        try:
            store.close()
        except sqlite3.Error:
            pass


def write(
    name: str = "s",
    *,
    next_seq: int,
    base_seq: int = 1,
    first_seq: int | None = None,
    events: list[bytes] | None = None,
    producers: list[tuple[bytes, int]] | None = None,
    cursors: list[tuple[bytes, int]] | None = None,
    closed: bool = False,
    ever: bool = False,
    size: int = 10,
    policy: str = "block",
) -> StreamWrite:
    events = events or []
    return StreamWrite(
        name,
        size,
        policy,
        next_seq,
        base_seq,
        closed,
        ever,
        next_seq - len(events) if first_seq is None else first_seq,
        events,
        producers or [],
        cursors or [],
    )


def rows(store: Store, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """A query on the store's file through a connection of its own."""
    db = sqlite3.connect(store.path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def by_name(stored: list[StoredStream]) -> dict[str, StoredStream]:
    return {s.name: s for s in stored}


# -- Store: round trips ------------------------------------------------------------------


def test_store_commit_then_load_round_trips_everything(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    assert store.load() == []
    store.commit(
        WriteBatch(
            [
                write(
                    "a",
                    next_seq=4,
                    events=[b"a1", b"a2", b"a3"],
                    producers=[(P, 3), (Q, 7)],
                    cursors=[(S, 2), (T, 0)],
                    ever=True,
                    size=5,
                ),
                write("b", next_seq=1, closed=True, size=100, policy="drop"),
            ]
        )
    )
    assert by_name(store.load()) == {
        "a": StoredStream(
            "a", 5, "block", 4, False, True, [b"a1", b"a2", b"a3"], {P: 3, Q: 7}, {S: 2, T: 0}
        ),
        "b": StoredStream("b", 100, "drop", 1, True, False, [], {}, {}),
    }


def test_store_events_load_in_seq_order_across_commits(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("z", next_seq=3, events=[b"z1", b"z2"])]))
    store.commit(WriteBatch([write("a", next_seq=2, events=[b"a1"])]))
    store.commit(WriteBatch([write("z", next_seq=5, first_seq=3, events=[b"z3", b"z4"])]))
    store.commit(WriteBatch([write("a", next_seq=3, first_seq=2, events=[b"a2"])]))
    loaded = by_name(store.load())
    assert loaded["z"].events == [b"z1", b"z2", b"z3", b"z4"]
    assert loaded["a"].events == [b"a1", b"a2"]
    assert (loaded["z"].next_seq, loaded["a"].next_seq) == (5, 3)


def test_store_settings_are_updated_by_a_later_write(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("s", next_seq=2, events=[b"e1"])]))
    store.commit(
        WriteBatch([write("s", next_seq=2, closed=True, ever=True, size=7, policy="drop")])
    )
    (s,) = store.load()
    assert (s.buffer_size, s.policy, s.closed, s.ever_subscribed, s.events) == (
        7,
        "drop",
        True,
        True,
        [b"e1"],
    )
    assert rows(store, "SELECT count(*) FROM streams") == [(1,)]  # updated, not added


def test_store_compacts_events_below_a_higher_base_seq(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("s", next_seq=6, events=[b"e%d" % i for i in range(1, 6)])]))
    store.commit(WriteBatch([write("s", next_seq=7, base_seq=4, first_seq=6, events=[b"e6"])]))
    (s,) = store.load()
    assert s.events == [b"e4", b"e5", b"e6"] and s.next_seq == 7
    assert rows(store, "SELECT seq FROM events ORDER BY seq") == [(4,), (5,), (6,)]
    # Everything gone: base_seq == next_seq, no events left.
    store.commit(WriteBatch([write("s", next_seq=7, base_seq=7)]))
    assert store.load()[0].events == []
    assert rows(store, "SELECT count(*) FROM events") == [(0,)]


def test_store_producers_are_kept_and_cursors_replaced_by_each_write(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("s", next_seq=1, producers=[(P, 3)], cursors=[(S, 1), (T, 2)])]))
    store.commit(WriteBatch([write("s", next_seq=1, producers=[(Q, 1)], cursors=[(S, 4)])]))
    (s,) = store.load()
    assert s.producers == {P: 3, Q: 1}  # a producer not in this write is still known
    assert s.cursors == {S: 4}  # cursors are as of the last write: T unsubscribed
    store.commit(WriteBatch([write("s", next_seq=1, producers=[(P, 9)])]))
    (s,) = store.load()
    assert s.producers == {P: 9, Q: 1} and s.cursors == {}


def test_store_removed_deletes_every_row_of_the_stream(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    full = {
        "events": [b"e1", b"e2"],
        "producers": [(P, 2)],
        "cursors": [(S, 1)],
    }
    store.commit(WriteBatch([write("gone", next_seq=3, **full), write("kept", next_seq=3, **full)]))
    ((gone_id,),) = rows(store, "SELECT id FROM streams WHERE name = 'gone'")
    store.commit(WriteBatch(removed=["gone", "never-stored"]))  # an unknown name is a no-op
    assert [s.name for s in store.load()] == ["kept"]
    for table in ("events", "producers", "cursors"):
        assert rows(store, f"SELECT count(*) FROM {table} WHERE stream = ?", gone_id) == [(0,)]
        assert rows(store, f"SELECT count(*) FROM {table}") != [(0,)]  # kept's rows stay
    assert rows(store, "SELECT name FROM streams") == [("kept",)]
    # The name can be stored again afterwards, from scratch.
    store.commit(WriteBatch([write("gone", next_seq=2, events=[b"new"])]))
    assert by_name(store.load())["gone"].events == [b"new"]


def test_store_reopened_sees_the_same_data_and_keeps_writing_to_it(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("s", next_seq=3, events=[b"e1", b"e2"], producers=[(P, 2)])]))
    before = store.load()
    store.close()
    again = open_store(tmp_path)
    assert again.path == store.path
    assert again.load() == before
    # The reopened store knows the stream's row: a write updates it, not a second row.
    again.commit(WriteBatch([write("s", next_seq=4, first_seq=3, events=[b"e3"])]))
    (s,) = again.load()
    assert s.events == [b"e1", b"e2", b"e3"]
    assert rows(again, "SELECT count(*) FROM streams") == [(1,)]


def test_store_commit_survives_without_close(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    """As after a crash: no close, no checkpoint; the next process reads the WAL."""
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("s", next_seq=2, events=[b"e1"])]))
    assert os.path.getsize(store.path + "-wal") > 0  # still only in the WAL
    other = open_store(tmp_path)
    assert [(s.name, s.events) for s in other.load()] == [("s", [b"e1"])]


def test_write_batch_truth() -> None:
    assert not WriteBatch()
    assert WriteBatch(removed=["s"])
    assert WriteBatch([write(next_seq=1)])


# -- Store: opening --------------------------------------------------------------------


def test_store_uses_wal_and_incremental_auto_vacuum(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path / "new" / "dir")  # created, parents too
    assert store.path == str(tmp_path / "new" / "dir" / "zevents.sqlite3")
    assert rows(store, "PRAGMA journal_mode") == [("wal",)]
    assert rows(store, "PRAGMA auto_vacuum") == [(2,)]  # incremental
    assert rows(store, "SELECT value FROM meta WHERE key = 'schema'") == [(1,)]


@pytest.mark.parametrize(("sync", "level"), [("normal", 1), ("full", 2)])
def test_store_sync_setting(
    tmp_path: Path, open_store: Callable[..., Store], sync: str, level: int
) -> None:
    store = open_store(tmp_path, sync)
    assert store._db.execute("PRAGMA synchronous").fetchone() == (level,)


@pytest.mark.parametrize("sync", ["off", "FULL", "", "extra"])
def test_store_bad_sync_value(tmp_path: Path, sync: str) -> None:
    with pytest.raises(StoreError, match="sync must be"):
        Store(str(tmp_path / "d"), sync)
    assert not (tmp_path / "d").exists()  # refused before touching the disk


def test_store_newer_schema_is_refused(tmp_path: Path, open_store: Callable[..., Store]) -> None:
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("s", next_seq=2, events=[b"e1"])]))
    store.close()
    db = sqlite3.connect(store.path)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99") as info:
        Store(str(tmp_path))
    assert store.path in str(info.value)


def test_store_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "zevents.sqlite3").write_bytes(b"not a database, " * 256)
    with pytest.raises(StoreError, match="not usable") as info:
        Store(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_store_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = blocker / "data"
    with pytest.raises(StoreError) as info:
        Store(str(bad))
    assert str(bad) in str(info.value) and "not usable" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


# -- Store: failed commits ----------------------------------------------------------------


def test_store_failed_commit_writes_nothing_and_can_go_on(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("a", next_seq=2, events=[b"a1"], producers=[(P, 1)])]))
    before = store.load()
    bad = WriteBatch(
        [
            write("a", next_seq=3, first_seq=2, events=[b"a2"], producers=[(P, 2)]),
            write("b", next_seq=2, events=[b"b1"]),  # a new stream, its row rolled back
            write("c", next_seq=2, events=[None]),  # type: ignore[list-item]  # NOT NULL
        ],
        removed=["a"],
    )
    with pytest.raises(StoreError, match="commit failed") as info:
        store.commit(bad)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert store.load() == before
    assert rows(store, "SELECT name FROM streams") == [("a",)]
    # The store still works, and "b" (whose id died with the failed transaction) is
    # stored under a live row, not the dead one.
    store.commit(WriteBatch([write("b", next_seq=2, events=[b"b1"])]))
    loaded = by_name(store.load())
    assert loaded["b"].events == [b"b1"] and loaded["a"] == before[0]
    assert rows(store, "SELECT count(*) FROM events WHERE stream NOT IN (SELECT id FROM streams)")[
        0
    ] == (0,)


def test_store_commit_fails_while_another_writer_holds_the_lock(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    """A second process writing the same file: the commit fails, and once the lock
    is gone the very same batch commits."""
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("s", next_seq=2, events=[b"e1"])]))
    store._db.execute("PRAGMA busy_timeout = 50")  # the default waits 5 s
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    batch = WriteBatch([write("s", next_seq=3, first_seq=2, events=[b"e2"])])
    try:
        with pytest.raises(StoreError, match="locked"):
            store.commit(batch)
        assert store.load()[0].events == [b"e1"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.commit(batch)
    assert store.load()[0].events == [b"e1", b"e2"]


def test_store_commit_on_a_broken_connection_raises_store_error(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    store.commit(WriteBatch([write("s", next_seq=2, events=[b"e1"])]))
    store._db.close()  # stands for a connection no statement can use any more
    with pytest.raises(StoreError):
        store.commit(WriteBatch([write("s", next_seq=3, first_seq=2, events=[b"e2"])]))


# -- Store: maintenance and size ------------------------------------------------------------


def _store_with_freed_pages(store: Store) -> None:
    big = [os.urandom(4000) for _ in range(300)]
    store.commit(WriteBatch([write("s", next_seq=301, events=big, size=1000)]))
    store.commit(WriteBatch([write("s", next_seq=301, base_seq=301, size=1000)]))  # all gone


def test_store_size_counts_database_and_wal(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    empty = store.size()
    assert empty > 0
    _store_with_freed_pages(store)
    wal = os.path.getsize(store.path + "-wal")
    assert wal > 300 * 4000
    assert store.size() == os.path.getsize(store.path) + wal


def test_store_maintain_checkpoints_and_truncates_the_wal(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    _store_with_freed_pages(store)
    store.commit(WriteBatch([write("t", next_seq=2, events=[b"t1"])]))
    before = store.size()
    store.maintain()
    assert os.path.getsize(store.path + "-wal") == 0
    assert store.size() == os.path.getsize(store.path) < before
    assert by_name(store.load())["t"].events == [b"t1"]  # nothing lost on the way
    store.maintain()  # idempotent
    assert by_name(store.load())["s"].next_seq == 301


def test_store_maintain_gives_freed_pages_back(
    tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    _store_with_freed_pages(store)
    ((free,),) = rows(store, "PRAGMA freelist_count")
    assert free > 250  # the 300 deleted 4 kB events left that many pages free
    store.maintain()
    assert rows(store, "PRAGMA freelist_count") == [(0,)]


# -- BrokerCore: group commits ------------------------------------------------------------


class Durable(Broker):
    """A durable BrokerCore; ``flush()`` first commits what changed, as the runner's
    round does once ``commit_due()``, to ``store`` if there is one."""

    def __init__(
        self, clock: FakeClock, data_dir: Path, store: Store | None = None, **config: Any
    ) -> None:
        super().__init__(clock, data_dir=str(data_dir), **config)
        self.store = store

    def commit(self) -> WriteBatch:
        batch = self.core.take_writes()
        if self.store is not None:
            self.store.commit(batch)
        self.core.on_committed(batch)
        return batch

    def flush(self) -> tuple[list[bytes], list[tuple[bytes, list[Any]]]]:
        self.commit()
        return self.sent()

    def sent(self) -> tuple[list[bytes], list[tuple[bytes, list[Any]]]]:
        """What the core sends now, committing nothing."""
        return super().flush()


def restart(
    clock: FakeClock, data_dir: Path, open_store: Callable[..., Store], **config: Any
) -> Durable:
    """A new broker process on ``data_dir``: a new Store, a new core restored from it."""
    store = open_store(data_dir)
    b = Durable(clock, data_dir, store, **config)
    b.core.restore(store.load())
    return b


def test_durable_core_holds_acks_and_publishes_until_committed(
    clock: FakeClock, tmp_path: Path
) -> None:
    b = Durable(clock, tmp_path)
    assert b.core.durable
    b.ingest("s", 1, [ev(1), ev(2)])
    assert b.core.flush() == ([], [])
    clock.advance(10)  # however long it takes
    assert b.core.flush() == ([], [])
    batch = b.core.take_writes()
    assert b.core.flush() == ([], [])  # taken is not committed
    b.core.on_committed(batch)
    pub, ctl = b.sent()
    assert acks_of(ctl) == [["s", 2]]
    assert published(pub) == [("s", "E", 1, ["t1", "t2"])]
    assert b.sent() == ([], [])
    assert not b.core.take_writes()


def test_durable_core_holds_control_replies_too(clock: FakeClock, tmp_path: Path) -> None:
    b = Durable(clock, tmp_path)
    rid = b.request(A, "create", {"stream": "s", "buffer_size": 5})
    assert b.core.flush() == ([], [])  # the new stream is not on disk yet
    (w,) = b.core.take_writes().streams
    assert (w.name, w.buffer_size, w.next_seq, w.events) == ("s", 5, 1, [])
    _, ctl = b.flush()
    assert [m[:2] for c, m in ctl if c == A] == [["ok", rid]]
    # A request that changes nothing is answered at once.
    rid = b.request(A, "info", {"stream": "s"})
    assert [m[:2] for c, m in b.sent()[1] if c == A] == [["ok", rid]]
    rid = b.request(A, "get_or_create", {"stream": "s"})
    assert [m[:2] for c, m in b.sent()[1] if c == A] == [["ok", rid]]
    rid = b.request(A, "get_or_create", {"stream": "t", "policy": "drop"})
    assert b.core.flush() == ([], [])
    (w,) = b.core.take_writes().streams
    assert (w.name, w.policy) == ("t", "drop")
    _, ctl = b.flush()
    assert [(m[:2], m[2]["created"]) for c, m in ctl if c == A] == [(["ok", rid], True)]


def test_durable_parked_events_are_published_only_once_admitted_and_stored(
    clock: FakeClock, tmp_path: Path
) -> None:
    # Without a store a parked event is published as it parks (its seq is known);
    # with one, nothing is published before it is on disk, and parked events are
    # not: they wait to be admitted, and a close refuses them.
    b = Durable(clock, tmp_path, buffer_size=2)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(i) for i in range(1, 5)])  # 3 and 4 park
    pub, ctl = b.flush()
    assert published(pub) == [("s", "E", 1, ["t1", "t2"])]
    info = b.info("s")
    assert (info.last_seq, info.parked) == (2, 2)
    assert texts(b.ok(T, "fetch", {"stream": "s", "from_seq": 1})["events"]) == ["t1", "t2"]
    b.ack(S, "s", 1)
    pub, ctl = b.flush()
    assert published(pub) == [("s", "E", 3, ["t3"])] and acks_of(ctl) == [["s", 3]]
    b.request(A, "close", {"stream": "s"})
    pub, ctl = b.flush()
    assert published(pub) == [("s", "X", 3, [])]
    assert [m[2:5] for m in of_kind(ctl, "nack")] == [[4, 4, "STREAM_CLOSED"]]


def test_take_writes_has_new_events_answered_pseqs_and_cursors(
    clock: FakeClock, tmp_path: Path
) -> None:
    b = Durable(clock, tmp_path, buffer_size=3)
    b.subscribed(S, "s")  # creates it (committed by the helper's flush)
    b.ingest("s", 1, [ev(i) for i in range(1, 6)])  # 4 and 5 park: S acked nothing
    batch = b.core.take_writes()
    assert batch.removed == []
    (w,) = batch.streams
    assert (w.name, w.buffer_size, w.policy, w.closed, w.ever_subscribed) == (
        "s",
        3,
        "block",
        False,
        True,
    )
    assert (w.next_seq, w.base_seq, w.first_seq) == (4, 1, 1)
    assert w.events == [ev(1), ev(2), ev(3)]
    assert w.producers == [(P, 3)]  # answered through 3: not past parked 4
    assert w.cursors == [(S, 0)]
    assert b.core.take_writes() == batch  # nothing moves until on_committed
    b.core.on_committed(batch)
    pub, ctl = b.sent()
    assert acks_of(ctl) == [["s", 3]]
    assert published(pub) == [("s", "E", 1, ["t1", "t2", "t3"])]

    b.ack(S, "s", 3)  # room: 4 and 5 go in, 1 and 2 leave the buffer
    assert b.core.commit_due()  # the producer waits for that ack: at once
    (w,) = b.core.take_writes().streams
    assert (w.next_seq, w.base_seq, w.first_seq, w.events) == (6, 3, 4, [ev(4), ev(5)])
    assert w.producers == [(P, 5)] and w.cursors == [(S, 3)]
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 5]]
    assert published(pub) == [("s", "E", 4, ["t4", "t5"])]
    assert not b.core.take_writes()
    assert not b.core.commit_due()


def test_subscribing_first_time_is_a_change_acks_are_not(clock: FakeClock, tmp_path: Path) -> None:
    b = Durable(clock, tmp_path)
    b.ingest("s", 1, [ev(1)])
    b.flush()
    b.core.on_subscription(b"\x01\x00tok-s")
    b.send(S, "subscribe", 98, {"stream": "s", "token": b"tok-s"})
    assert b.core.flush() == ([], [])  # the reply waits: ever_subscribed must be on disk
    (w,) = b.core.take_writes().streams
    assert (w.ever_subscribed, w.cursors, w.events) == (True, [(S, 0)], [])
    _, ctl = b.flush()
    assert [m[:2] for c, m in ctl if c == S] == [["ok", 98]]
    b.core.on_subscription(b"\x01\x00tok-t")
    b.send(T, "subscribe", 99, {"stream": "s", "token": b"tok-t"})
    assert not b.core.take_writes()  # a second subscriber changes nothing stored
    b.ack(S, "s", 1)
    assert not b.core.take_writes()  # a cursor moving does not wait for a commit
    assert not b.core.commit_due()
    assert [m[:2] for c, m in b.sent()[1] if c == T] == [["ok", 99]]


def test_commit_due_and_next_deadline(clock: FakeClock, tmp_path: Path) -> None:
    b = Durable(clock, tmp_path, commit_interval=0.01, ack_delay=1.0, window=8)  # ack every 2
    assert not b.core.commit_due()
    assert b.core.next_deadline() is None
    t0 = clock()
    b.ingest("s", 1, [ev(1)])  # one event owed: its ack may wait
    assert not b.core.commit_due()
    assert b.core.next_deadline() == pytest.approx(t0 + 0.01)  # before the ack's t0 + 1
    clock.advance(0.009)
    assert not b.core.commit_due()
    clock.advance(0.001)
    assert b.core.commit_due()
    b.commit()
    assert not b.core.commit_due()
    assert b.core.next_deadline() == pytest.approx(t0 + 1.0)  # only the owed ack is left
    pub, ctl = b.sent()  # committed: the event goes out, its ack waits for company
    assert published(pub) == [("s", "E", 1, ["t1"])] and ctl == []
    b.ingest("s", 2, [ev(2)])  # a quarter window owed: the producer waits for it
    assert b.core.commit_due()  # no waiting for commit_interval
    assert b.core.next_deadline() == pytest.approx(t0 + 0.01)  # already due
    _, ctl = b.flush()
    assert acks_of(ctl) == [["s", 2]]
    assert b.core.next_deadline() is None


def test_sync_makes_a_commit_due(clock: FakeClock, tmp_path: Path) -> None:
    b = Durable(clock, tmp_path, commit_interval=0.01)
    b.ingest("s", 1, [ev(1)])
    assert not b.core.commit_due()
    b.send(P, "sync", 3, {})  # the producer is about to wait
    assert b.core.commit_due()
    _, ctl = b.flush()
    assert acks_of(ctl) == [["s", 1]] and of_kind(ctl, "ok") == [["ok", 3, {}]]


def test_a_failed_commit_is_tried_again_and_nothing_leaks_before(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    b = Durable(clock, tmp_path, store)
    b.ingest("s", 1, [ev(1)])
    b.flush()
    store._db.execute("PRAGMA busy_timeout = 10")
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    b.ingest("s", 2, [ev(2)])
    with pytest.raises(StoreError):
        b.commit()  # as the runner does: take_writes, commit fails, no on_committed
    assert b.sent() == ([], [])
    b.ingest("s", 3, [ev(3)])
    other.execute("ROLLBACK")
    other.close()
    (w,) = b.commit().streams  # everything since the last good commit
    assert (w.first_seq, w.events) == (2, [ev(2), ev(3)])
    pub, ctl = b.sent()
    assert acks_of(ctl) == [["s", 3]]
    assert published(pub) == [("s", "E", 2, ["t2", "t3"])]
    assert store.load()[0].events == [ev(1), ev(2), ev(3)]


def test_close_and_cleanup_are_committed(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    b = Durable(clock, tmp_path, store)
    b.ingest("s", 1, [ev(1)])
    b.subscribed(S, "s")
    b.ingest("keep", 1, [ev(1)])
    b.flush()
    b.request(A, "close", {"stream": "s"})
    assert b.core.flush() == ([], [])  # not even the end frame before the commit
    (w,) = b.core.take_writes().streams
    assert (w.name, w.closed, w.events) == ("s", True, [])
    pub, _ = b.flush()
    assert published(pub) == [("s", "X", 1, [])]
    assert by_name(store.load())["s"].closed

    clock.advance(20)
    b.ingest("keep", 2, [ev(2)])
    b.flush()
    t = clock()
    rid = b.request(A, "cleanup", {"threshold": 10})
    assert b.core.flush() == ([], [])
    assert b.core.next_deadline() == pytest.approx(t + b.core.config.commit_interval)
    batch = b.core.take_writes()
    assert (batch.streams, batch.removed) == ([], ["s"])
    _, ctl = b.flush()
    assert [m for c, m in ctl if c == A] == [["ok", rid, {"removed": 1}]]
    assert [s.name for s in store.load()] == ["keep"]
    assert rows(store, "SELECT count(*) FROM events") == [(2,)]  # keep's only
    assert rows(store, "SELECT count(*) FROM cursors") == [(0,)]  # S's cursor went with s
    assert rows(store, "SELECT count(*) FROM producers") == [(1,)]
    assert not b.core.take_writes()


def test_events_leaving_the_buffer_leave_the_store(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    b = Durable(clock, tmp_path, store, buffer_size=2)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(1), ev(2)])
    b.flush()
    b.ack(S, "s", 2)
    b.ingest("s", 3, [ev(3), ev(4)])  # 1 and 2 leave
    b.ack(S, "s", 4)
    b.ingest("s", 5, [ev(5), ev(6)])  # 3 and 4 leave before any commit
    (w,) = b.commit().streams
    assert (w.base_seq, w.first_seq, w.events) == (5, 5, [ev(5), ev(6)])  # 3, 4 never stored
    (s,) = store.load()
    assert s.events == [ev(5), ev(6)] and s.next_seq == 7
    assert rows(store, "SELECT seq FROM events ORDER BY seq") == [(5,), (6,)]


def test_durable_shutdown_keeps_streams_open(clock: FakeClock, tmp_path: Path) -> None:
    b = Durable(clock, tmp_path)
    b.ingest("s", 1, [ev(1)])
    b.subscribed(S, "s")
    b.flush()
    b.core.shutdown()
    assert not b.core.take_writes()  # nothing changed
    pub, ctl = b.flush()
    assert pub == [] and of_kind(ctl, "closed") == []
    assert b.info("s").closed is False


def test_memory_only_core_is_unaffected(clock: FakeClock) -> None:
    b = Broker(clock)
    assert not b.core.durable
    b.ingest("s", 1, [ev(1)])
    assert not b.core.commit_due()
    assert not b.core.take_writes()
    pub, ctl = b.flush()  # at once
    assert published(pub) == [("s", "E", 1, ["t1"])] and acks_of(ctl) == [["s", 1]]
    b.ok(A, "create", {"stream": "t"})
    assert not b.core.take_writes()
    assert b.core.next_deadline() is None
    b.core.shutdown()
    pub, _ = b.flush()
    assert sorted(published(pub)) == [("s", "X", 1, []), ("t", "X", 0, [])]
    assert not b.core.take_writes()


# -- BrokerCore: restarting from the store ----------------------------------------------------


def test_restart_restores_streams_events_and_closed_state(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    b = Durable(clock, tmp_path, open_store(tmp_path), buffer_size=10)
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])
    b.ingest("c", 1, [ev(1)], client=Q)
    b.ok(A, "close", {"stream": "c"})
    b.ok(A, "create", {"stream": "d", "policy": "drop", "buffer_size": 4})
    b.flush()

    b2 = restart(clock, tmp_path, open_store)  # default buffer_size: 100
    assert b2.flush() == ([], [])  # nothing is published again
    s, c, d = (b2.info(name) for name in ("s", "c", "d"))
    assert (s.last_seq, s.first_seq, s.current_load, s.closed, s.buffer_size) == (
        3,
        1,
        3,
        False,
        10,
    )
    assert (c.last_seq, c.closed) == (1, True)
    assert (d.last_seq, d.policy, d.buffer_size) == (0, "drop", 4)
    r = b2.ok(T, "fetch", {"stream": "s", "from_seq": 1})
    assert (r["first_seq"], texts(r["events"]), r["last_seq"]) == (1, ["t1", "t2", "t3"], 3)
    reply = b2.subscribe(T, "c")
    assert reply[0] == "ok" and reply[2]["closed"] is True and texts(reply[2]["events"]) == ["t1"]
    b2.ingest("c", 2, [ev(2)], client=Q)
    assert of_kind(b2.flush()[1], "nack", Q)[0][1:5] == ["c", 2, 2, "STREAM_CLOSED"]
    assert b2.core.stats().buffered_bytes == 4 * len(ev(1))


def test_restart_dedups_a_resend_and_admits_new_pseqs(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    b = Durable(clock, tmp_path, open_store(tmp_path))
    b.ingest("s", 1, [ev(1), ev(2), ev(3)])
    b.flush()

    b2 = restart(clock, tmp_path, open_store)
    b2.send(P, "sync", 1, {})  # a resuming producer asks what was answered
    assert acks_of(b2.flush()[1]) == [["s", 3]]
    b2.ingest("s", 2, [ev(2), ev(3)])  # no ack reached it: it resends
    (w,) = b2.core.take_writes().streams
    assert (w.first_seq, w.events) == (4, [])  # what was restored is not written again
    pub, ctl = b2.flush()
    assert acks_of(ctl) == [["s", 3]] and pub == []
    assert b2.info("s").last_seq == 3
    b2.ingest("s", 3, [ev(3), ev(4)])  # one old, one new
    (w,) = b2.core.take_writes().streams
    assert (w.first_seq, w.events, w.producers) == (4, [ev(4)], [(P, 4)])  # the rest is stored
    pub, ctl = b2.flush()
    assert acks_of(ctl) == [["s", 4]]
    assert published(pub) == [("s", "E", 4, ["t4"])]
    b2.ingest("s", 1, [ev(9)], client=Q)  # another producer starts at pseq 1
    assert published(b2.flush()[0]) == [("s", "E", 5, ["t9"])]

    b3 = restart(clock, tmp_path, open_store)  # and once more, after writing to it
    r = b3.ok(T, "fetch", {"stream": "s", "from_seq": 1})
    assert texts(r["events"]) == ["t1", "t2", "t3", "t4", "t9"]
    b3.ingest("s", 4, [ev(4)])
    b3.ingest("s", 1, [ev(9)], client=Q)
    pub, ctl = b3.flush()
    assert pub == [] and acks_of(ctl) == [["s", 4]] and acks_of(ctl, Q) == [["s", 1]]


def _parked_before_restart(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> Durable:
    """s holds 3; S subscribed and acked nothing; P sent 1..5: 4 and 5 parked."""
    b = Durable(clock, tmp_path, open_store(tmp_path), buffer_size=3)
    b.subscribed(S, "s")
    b.ingest("s", 1, [ev(i) for i in range(1, 6)])
    assert acks_of(b.flush()[1]) == [["s", 3]]
    b2 = restart(clock, tmp_path, open_store)
    (s,) = b2.store.load()  # type: ignore[union-attr]
    assert s.producers == {P: 3} and s.cursors == {S: 0}
    b2.ingest("s", 4, [ev(4), ev(5)])  # never acked: resent; S's cursor still gates
    pub, ctl = b2.flush()
    assert pub == [] and acks_of(ctl) == [["s", 3]]  # not past the parked 4
    assert b2.info("s").parked == 2
    return b2


def test_restored_cursor_gates_until_its_subscriber_acks(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    b = _parked_before_restart(clock, tmp_path, open_store)
    b.ack(S, "s", 3)
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 5]]
    assert published(pub) == [("s", "E", 4, ["t4", "t5"])]


def test_restored_cursor_is_forgotten_after_subscriber_timeout(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    b = _parked_before_restart(clock, tmp_path, open_store)
    clock.advance(4.9)
    b.core.on_tick()
    assert acks_of(b.flush()[1]) == []
    assert b.info("s").parked == 2
    clock.advance(0.2)  # 5.1 s of silence: over subscriber_timeout
    b.core.on_tick()
    pub, ctl = b.flush()
    assert acks_of(ctl) == [["s", 5]]
    assert published(pub) == [("s", "E", 4, ["t4", "t5"])]


def test_restored_cursor_that_fell_behind_the_buffer_is_not_restored(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    store = open_store(tmp_path)
    store.commit(
        WriteBatch(
            [write("s", next_seq=6, base_seq=4, events=[b"x", b"y"], cursors=[(S, 1), (T, 3)])]
        )
    )
    b = restart(clock, tmp_path, open_store)
    assert b.info("s").subscribers == 1  # T's; S's cursor points before the buffer
    assert b.core.streams.find("s").cursors == {T: 3}  # type: ignore[union-attr]


def test_stream_removed_and_created_again_in_one_commit_survives_a_restart(
    clock: FakeClock, tmp_path: Path, open_store: Callable[..., Store]
) -> None:
    b = Durable(clock, tmp_path, open_store(tmp_path))
    b.ingest("s", 1, [ev(1), ev(2)])
    b.flush()
    clock.advance(20)
    b.request(A, "cleanup", {"threshold": 10})  # "s" goes...
    b.ingest("s", 1, [ev(7)], client=Q)  # ...and comes back in the same round
    batch = b.core.take_writes()
    assert batch.removed == ["s"] and [w.name for w in batch.streams] == ["s"]
    _, ctl = b.flush()
    assert acks_of(ctl, Q) == [["s", 1]]  # Q was told its event is on disk
    b2 = restart(clock, tmp_path, open_store)
    assert [(s.name, s.next_seq, s.events) for s in b2.store.load()] == [  # type: ignore[union-attr]
        ("s", 2, [ev(7)])
    ]


def test_a_second_store_on_one_directory_is_refused(tmp_path: Path) -> None:
    first = Store(str(tmp_path))
    with pytest.raises(StoreError, match="in use by another broker"):
        Store(str(tmp_path))
    first.close()
    Store(str(tmp_path)).close()  # free again once the first let go


def test_take_writes_has_only_the_producers_whose_record_moved(
    clock: FakeClock, tmp_path: Path
) -> None:
    b = Durable(clock, tmp_path)
    b.ingest("s", 1, [ev(1)])
    b.ingest("s", 1, [ev(2)], client=Q)
    b.flush()  # committed: both records stored
    b.ingest("s", 2, [ev(3)], client=Q)
    (w,) = b.core.take_writes().streams
    assert w.producers == [(Q, 2)]  # P's record did not move: not written again
