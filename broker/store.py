"""Store: the durable copy of the broker's streams, in SQLite.

Why SQLite: a storage engine that has survived every kind of crash for
twenty years, in the standard library, whose WAL mode gives one writer fast
appends and atomic multi-row transactions.  A hand-written log would have to
re-earn all of that.

The broker writes in *group commits*: :class:`~broker.core.BrokerCore` gathers
what changed (new events, stream settings, closed state, what each producer had
answered) into a :class:`WriteBatch`, this module writes the batch in one
transaction, and only then does the core acknowledge those events to their
producers or publish them.  So an acknowledged event is on disk, and a
subscriber never sees an event a crash could take back.

Compaction is part of every commit: events that left their stream's buffer are
deleted with it, and a removed stream takes its events and producer records
along.  :meth:`Store.maintain` returns freed pages to the file system now and
then and keeps the WAL file from growing.

Only this module touches the database; it never touches a socket.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from dataclasses import dataclass, field

from zevents.errors import ZEventsError

__all__ = ["StoreError", "Store", "StoredStream", "StreamWrite", "WriteBatch"]

log = logging.getLogger("zevents.broker")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    buffer_size INTEGER NOT NULL,
    policy TEXT NOT NULL,
    next_seq INTEGER NOT NULL,
    closed INTEGER NOT NULL,
    ever_subscribed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    stream INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    raw BLOB NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (
    stream INTEGER NOT NULL,
    client BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (stream, client)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS producers (
    stream INTEGER NOT NULL,
    client BLOB NOT NULL,
    pseq INTEGER NOT NULL,
    PRIMARY KEY (stream, client)
) WITHOUT ROWID;
"""


class StoreError(ZEventsError):
    """The data directory cannot be used (not writable, corrupt, a newer schema)."""


@dataclass(slots=True)
class StreamWrite:
    """What changed in one stream since its last commit."""

    name: str
    buffer_size: int
    policy: str
    next_seq: int
    base_seq: int  #: events below this left the buffer: delete them
    closed: bool
    ever_subscribed: bool
    first_seq: int  #: seq of ``events[0]``
    events: list[bytes]
    producers: list[tuple[bytes, int]]  #: (client ID, pseq answered through)
    #: (subscriber client ID, seq acknowledged), as of this write: a cursor that
    #: moved on since only makes a restarted broker keep a little more.  None:
    #: the stored cursors stay as they are.
    cursors: list[tuple[bytes, int]] | None = field(default_factory=list)


@dataclass(slots=True)
class WriteBatch:
    """One group commit: streams changed and streams removed."""

    streams: list[StreamWrite] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.streams or self.removed)


@dataclass(slots=True)
class StoredStream:
    """A stream as a restarted broker finds it."""

    name: str
    buffer_size: int
    policy: str
    next_seq: int
    closed: bool
    ever_subscribed: bool
    events: list[bytes]  #: the buffered events, oldest first, ending at ``next_seq - 1``
    producers: dict[bytes, int]
    cursors: dict[bytes, int]


class Store:
    """The SQLite database in ``data_dir``.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     store = Store(d)
    ...     store.commit(WriteBatch([StreamWrite("s", 10, "block", 2, 1, False, False, 1,
    ...                                          [b"\\x80"], [(b"p" * 16, 1)])]))
    ...     [(s.name, s.next_seq, s.events) for s in store.load()]
    ...     store.close()
    [('s', 2, [b'\\x80'])]
    """

    def __init__(self, data_dir: str, sync: str = "normal") -> None:
        if sync not in ("normal", "full"):
            raise StoreError(f"sync must be 'normal' or 'full', not {sync!r}")
        self._lock_fd = -1
        try:
            os.makedirs(data_dir, mode=0o700, exist_ok=True)  # it holds every user's output
            # One broker per directory: a second one would interleave its writes.
            lock = os.path.join(data_dir, "zevents.lock")
            self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"data directory {data_dir!r} is in use by another broker"
                ) from None
            self.path = os.path.join(data_dir, "zevents.sqlite3")
            if not os.path.exists(self.path):  # SQLite gives its WAL the same mode
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            # Autocommit mode: transactions are explicit (BEGIN ... COMMIT) below.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db = self._db
            # Set before the first table exists; lets maintain() return freed pages.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            # Nobody else writes here (the lock): never stall the loop waiting.
            db.execute("PRAGMA busy_timeout = 100")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: cannot use WAL mode (got {mode!r})")
            # WAL + NORMAL: a commit survives the process crashing (it is in the OS);
            # FULL also syncs each commit to the device, for power loss.
            db.execute(f"PRAGMA synchronous = {sync.upper()}")
            db.execute("PRAGMA journal_size_limit = 67108864")  # WAL shrinks back to 64 MiB
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {row[0]}, this broker reads {SCHEMA_VERSION}"
                )
        except (OSError, sqlite3.Error, StoreError) as exc:
            opened: sqlite3.Connection | None = getattr(self, "_db", None)
            if opened is not None:
                opened.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"data directory {data_dir!r} is not usable: {exc}") from exc
        self._ids: dict[str, int] = {
            name: sid for sid, name in db.execute("SELECT id, name FROM streams")
        }

    def load(self) -> list[StoredStream]:
        """Every stored stream, with its events and producers."""
        db = self._db
        events: dict[int, list[bytes]] = {}
        for sid, raw in db.execute("SELECT stream, raw FROM events ORDER BY stream, seq"):
            events.setdefault(sid, []).append(raw)
        producers: dict[int, dict[bytes, int]] = {}
        for sid, client, pseq in db.execute("SELECT stream, client, pseq FROM producers"):
            producers.setdefault(sid, {})[bytes(client)] = pseq
        cursors: dict[int, dict[bytes, int]] = {}
        for sid, client, seq in db.execute("SELECT stream, client, seq FROM cursors"):
            cursors.setdefault(sid, {})[bytes(client)] = seq
        rows = db.execute(
            "SELECT id, name, buffer_size, policy, next_seq, closed, ever_subscribed FROM streams"
        )
        return [
            StoredStream(
                name,
                size,
                policy,
                next_seq,
                bool(closed),
                bool(ever),
                events.get(sid, []),
                producers.get(sid, {}),
                cursors.get(sid, {}),
            )
            for sid, name, size, policy, next_seq, closed, ever in rows
        ]

    def commit(self, batch: WriteBatch) -> None:
        """Write ``batch`` in one transaction; raises :class:`StoreError` (and
        writes nothing) if it cannot."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                # Removals first: a stream removed and created again in one round
                # is in both lists, and its new rows must not be deleted.
                for name in batch.removed:
                    self._remove(db, name)
                for w in batch.streams:
                    self._write_stream(db, w)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
            # The ids assigned or dropped in the failed transaction: read them again.
            try:
                self._ids = {name: sid for sid, name in db.execute("SELECT id, name FROM streams")}
            except sqlite3.Error:
                pass
            raise StoreError(f"{self.path}: commit failed: {exc}") from exc

    def _write_stream(self, db: sqlite3.Connection, w: StreamWrite) -> None:
        settings = (w.buffer_size, w.policy, w.next_seq, w.closed, w.ever_subscribed)
        sid = self._ids.get(w.name)
        if sid is None:
            cur = db.execute(
                "INSERT INTO streams (name, buffer_size, policy, next_seq, closed, ever_subscribed)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (w.name, *settings),
            )
            sid = self._ids[w.name] = int(cur.lastrowid or 0)
        else:
            db.execute(
                "UPDATE streams SET buffer_size = ?, policy = ?, next_seq = ?, closed = ?,"
                " ever_subscribed = ? WHERE id = ?",
                (*settings, sid),
            )
            db.execute("DELETE FROM events WHERE stream = ? AND seq < ?", (sid, w.base_seq))
        if w.events:
            first = w.first_seq
            db.executemany(
                "INSERT OR REPLACE INTO events VALUES (?, ?, ?)",
                [(sid, first + i, raw) for i, raw in enumerate(w.events)],
            )
        if w.cursors is not None:
            db.execute("DELETE FROM cursors WHERE stream = ?", (sid,))
        if w.cursors:
            db.executemany(
                "INSERT INTO cursors VALUES (?, ?, ?)",
                [(sid, client, seq) for client, seq in w.cursors],
            )
        if w.producers:
            db.executemany(
                "INSERT OR REPLACE INTO producers VALUES (?, ?, ?)",
                [(sid, client, pseq) for client, pseq in w.producers],
            )

    def _remove(self, db: sqlite3.Connection, name: str) -> None:
        sid = self._ids.pop(name, None)
        if sid is None:
            return
        db.execute("DELETE FROM events WHERE stream = ?", (sid,))
        db.execute("DELETE FROM producers WHERE stream = ?", (sid,))
        db.execute("DELETE FROM cursors WHERE stream = ?", (sid,))
        db.execute("DELETE FROM streams WHERE id = ?", (sid,))

    def maintain(self) -> None:
        """Give freed pages back and checkpoint the WAL (call now and then, when idle)."""
        try:
            # executescript: through execute() the pragma frees one page per call.
            self._db.executescript("PRAGMA incremental_vacuum(4096);")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a reader holding the WAL: try again next time
            log.debug("store maintenance skipped: %s", exc)

    def size(self) -> int:
        """Bytes the store takes on disk (database and WAL)."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total

    def close(self) -> None:
        """Checkpoint and close the database (a second call does nothing)."""
        if self._lock_fd < 0:
            return
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self._db.close()
        os.close(self._lock_fd)  # releases the directory
        self._lock_fd = -1
