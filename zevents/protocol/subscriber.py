"""SubscriberState: one subscriber connection's streams, in order, sans I/O.

Events reach a subscriber two ways: live on the publish socket and, on
request, as replies on the control socket (the replay when it subscribes, and
fetches).  Each stream has a cursor that delivers every seq exactly once, in
order, whichever way it came:

* a batch that starts at or before ``next_seq`` is delivered from ``next_seq``
  (what came before is a duplicate);
* a batch that starts after it is held in ``ahead`` and the missing range is
  fetched; a gap is noticed from a later batch, from the stream's end marker,
  or from the head the broker reports in heartbeats;
* delivered events wait in ``ready`` until the application takes them;
  taking them is what is acknowledged, so a slow application slows the
  producer (BLOCK) rather than growing memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import ZEventsError
from ..events import Event
from . import frames

__all__ = ["ACK_STEP_PARKED", "Cursor", "Fetch", "SubscriberState", "ack_step"]

#: How long a broker-reported head may stay ahead of us before we fetch (seconds).
GAP_GRACE = 0.5
#: Live batches held while a gap is being filled, per stream.
MAX_AHEAD = 256
#: Events taken between two acks of a stream when the broker publishes parked
#: events (see :func:`ack_step`): fewer acks, each a message and a broker wake-up.
ACK_STEP_PARKED = 512


def ack_step(buffer_size: int, parked_window: int = 0) -> int:
    """How many events of a stream to take before acknowledging them at once.

    Half the stream's buffer: an ack lets the broker admit what waits for
    room, so a blocked producer never waits on the ack timer.  A broker that
    publishes parked events (``parked_window``: its producers' window) lets
    the subscriber read up to a window past the buffer before anything is
    acknowledged, so it may ack less often, up to :data:`ACK_STEP_PARKED`,
    and no more than half of buffer and window together (what one producer
    can have published ahead of our last ack).

    >>> ack_step(100), ack_step(100, 4096), ack_step(100, 256), ack_step(5000, 4096)
    (50, 512, 178, 2500)
    """
    half = buffer_size >> 1
    if parked_window <= 0:
        return half
    return max(half, min(ACK_STEP_PARKED, (buffer_size + parked_window) >> 1))


def _ack_now(cursor: Cursor, taken: int) -> bool:
    """Whether ``taken`` events of ``cursor`` since its last ack are to be acked now:
    an ack step of them, or half a buffer once nothing more is ready (the
    application is about to wait, and a producer keeping fewer events in flight
    than its window allows must not wait for the timer)."""
    return taken >= cursor.ack_step or (taken >= cursor.buffer_size >> 1 and not cursor.ready)


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask the broker for events of ``stream_id`` from ``from_seq`` on."""

    stream_id: str
    from_seq: int


@dataclass(slots=True)
class Cursor:
    """One followed stream."""

    stream_id: str
    next_seq: int = 1  # the next seq to deliver
    head: int = 0  # the highest seq known to exist
    end_seq: int | None = None  # last seq, once the stream is known closed
    active: bool = False  # the subscribe reply has arrived
    fetching: bool = True  # a subscribe or fetch is in flight
    ahead: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    ready: deque[Event] = field(default_factory=deque)
    taken: int = 0  # seq of the last event the application took
    acked: int = 0  # seq of the last ack sent
    error: ZEventsError | None = None
    buffer_size: int = 100
    ack_step: int = 50  # events taken between acks (see ack_step())
    reported: tuple[int, float] | None = None  # (head from a heartbeat, when)
    failed: bool = False  # its error was raised: nothing more comes
    retired: bool = False  # reported by take_completed (the client unsubscribed)

    @property
    def complete(self) -> bool:
        """Everything up to the end (or the error) has arrived; the taking may be left."""
        if self.failed or self.error is not None:
            return True
        return self.end_seq is not None and self.next_seq > self.end_seq

    @property
    def finished(self) -> bool:
        """True once every event up to the end was taken, or an error awaits."""
        if self.ready:
            return False
        return self.complete


class SubscriberState:
    """Cursors by stream ID, plus what to fetch and what to acknowledge."""

    def __init__(self, ack_interval: float = 0.02, parked_window: int = 0) -> None:
        self.cursors: dict[str, Cursor] = {}
        self.ack_interval = ack_interval
        #: The producers' window if the broker publishes parked events, else 0
        #: (from the handshake: ``publishes_parked`` and ``window``).
        self.parked_window = parked_window
        self._last_ack = 0.0
        self._fetches: list[Fetch] = []
        self.order: deque[Cursor] = deque()  # cursors that may have ready events
        self._unacked: dict[str, Cursor] = {}  # cursors with taken > acked
        self._due: dict[str, Cursor] = {}  # of those, the ones to ack now (see _take)
        self._reported: dict[str, Cursor] = {}  # cursors with a heartbeat head pending
        self._ending: dict[str, Cursor] = {}  # cursors that learnt their end or an error
        #: A stream is to be acked now (see :meth:`acks`): acks() has work.
        self.ack_due = False

    # -- subscribing ------------------------------------------------------------------

    def add(self, stream_id: str) -> Cursor:
        """Start following ``stream_id`` (its subscribe request is about to go)."""
        cursor = self.cursors.get(stream_id)
        if cursor is None or cursor.finished:
            cursor = self.cursors[stream_id] = Cursor(stream_id)
        cursor.fetching = True
        return cursor

    def remove(self, stream_id: str) -> None:
        """Stop following ``stream_id`` (nothing more is delivered or acknowledged)."""
        self.cursors.pop(stream_id, None)
        self._unacked.pop(stream_id, None)

    def take_completed(self) -> list[str]:
        """Streams that reached their end or failed since the last call: the client
        stops listening to them (their remaining events stay to be taken)."""
        done = []
        for sid, cursor in list(self._ending.items()):
            if self.cursors.get(sid) is not cursor or cursor.retired:
                del self._ending[sid]
            elif cursor.active and cursor.complete:
                cursor.retired = True
                del self._ending[sid]
                done.append(sid)
        return done

    def on_replay(self, result: dict[str, Any], subscribed: bool = False) -> None:
        """Take the reply to a subscribe (``subscribed``) or a fetch."""
        cursor = self.cursors.get(result["stream"])
        if cursor is None:
            return
        cursor.fetching = False
        first = int(result["first_seq"])
        if subscribed:
            cursor.active = True
            cursor.buffer_size = int(result.get("buffer_size", 100))
            # Only BLOCK streams park: a DROP stream never publishes past its buffer.
            parked = self.parked_window if result.get("policy", "block") == "block" else 0
            cursor.ack_step = ack_step(cursor.buffer_size, parked)
            if not cursor.taken and not cursor.ready and first > cursor.next_seq:
                cursor.next_seq = first  # resumed at from_seq (or the oldest buffered)
            cursor.taken = max(cursor.taken, first - 1)
            cursor.acked = max(cursor.acked, first - 1)
        last = int(result["last_seq"])
        if result.get("closed"):
            cursor.end_seq = last
            self._ending[cursor.stream_id] = cursor
        self._raise_head(cursor, last)
        if result.get("count"):
            self._batch(cursor, first, frames.split_events(result["events"]))
        else:
            self._drain_ahead(cursor)
        self._need(cursor)

    def on_error(self, stream_id: str, error: ZEventsError) -> None:
        """A subscribe or fetch for ``stream_id`` failed: the stream ends with ``error``."""
        cursor = self.cursors.get(stream_id)
        if cursor is not None:
            cursor.fetching = False
            cursor.error = error
            self._ending[stream_id] = cursor
            self._wake(cursor)

    # -- live traffic -------------------------------------------------------------------

    def on_publish(self, frame: bytes) -> None:
        """Take one frame from the SUB socket."""
        stream_id, kind, seq, start = frames.decode_publish(frame)
        cursor = self.cursors.get(stream_id)
        if cursor is None or cursor.error is not None or cursor.failed:
            return
        if kind == frames.KIND_END:
            cursor.end_seq = seq
            self._ending[stream_id] = cursor
            self._raise_head(cursor, seq)
            self._need(cursor)
            self._wake(cursor)
            return
        if seq + cursor.buffer_size * 4 < cursor.next_seq:
            return  # far behind us: a duplicate, not worth decoding
        events = frames.split_events(memoryview(frame)[start:])
        self._raise_head(cursor, seq + len(events) - 1)
        self._batch(cursor, seq, events)
        self._need(cursor)

    def on_heads(self, heads: list[Any], now: float) -> None:
        """Take the lagging heads a heartbeat reply reports: ``[stream, last_seq, closed]``."""
        for entry in heads:
            try:
                sid, last, closed = entry
            except (TypeError, ValueError):
                continue
            cursor = self.cursors.get(sid)
            if cursor is None or not cursor.active:
                continue
            if closed and cursor.end_seq is None and cursor.next_seq > last:
                cursor.end_seq = last  # we have it all; only the end marker was lost
                self._ending[sid] = cursor
                self._wake(cursor)
            elif cursor.next_seq <= last and cursor.reported is None:
                cursor.reported = (last, now)
                self._reported[sid] = cursor

    def _batch(self, cursor: Cursor, first: int, events: list[dict[str, Any]]) -> None:
        if not events or not cursor.active:
            if events and not cursor.active and len(cursor.ahead) < MAX_AHEAD:
                cursor.ahead[first] = events  # live before the subscribe reply: hold
            return
        if first > cursor.next_seq:
            if len(cursor.ahead) < MAX_AHEAD:
                cursor.ahead[first] = events
            return
        self._deliver(cursor, first, events)
        self._drain_ahead(cursor)

    def _drain_ahead(self, cursor: Cursor) -> None:
        while cursor.ahead:
            nxt = min(cursor.ahead)
            if nxt > cursor.next_seq:
                break
            self._deliver(cursor, nxt, cursor.ahead.pop(nxt))

    def _deliver(self, cursor: Cursor, first: int, events: list[dict[str, Any]]) -> None:
        skip = cursor.next_seq - first
        if skip >= len(events):
            return
        sid = cursor.stream_id
        append = cursor.ready.append
        received = Event._received
        seq = cursor.next_seq
        for obj in events[skip:] if skip else events:
            append(received(obj, seq, sid))
            seq += 1
        cursor.next_seq = seq
        if cursor.reported is not None and seq > cursor.reported[0]:
            cursor.reported = None
        self._wake(cursor)

    def _wake(self, cursor: Cursor) -> None:
        self.order.append(cursor)

    @staticmethod
    def _raise_head(cursor: Cursor, seq: int) -> None:
        if seq > cursor.head:
            cursor.head = seq

    def _need(self, cursor: Cursor) -> None:
        """Fetch if something we know exists has not arrived and nothing is on its way."""
        if not cursor.active or cursor.fetching or cursor.error is not None:
            return
        if cursor.next_seq <= cursor.head:
            cursor.fetching = True
            self._fetches.append(Fetch(cursor.stream_id, cursor.next_seq))

    # -- timers ----------------------------------------------------------------------

    def on_tick(self, now: float) -> None:
        """Turn heads reported long enough ago (and still not reached) into fetches."""
        if not self._reported:
            return
        for sid, cursor in list(self._reported.items()):
            rep = cursor.reported
            if rep is None:
                del self._reported[sid]
            elif now - rep[1] >= GAP_GRACE:
                cursor.reported = None
                del self._reported[sid]
                if cursor.next_seq <= rep[0] and self.cursors.get(sid) is cursor:
                    self._raise_head(cursor, rep[0])
                    self._need(cursor)

    def take_fetches(self) -> list[Fetch]:
        """Fetches to send now."""
        out, self._fetches = self._fetches, []
        return out

    # -- the application's side ---------------------------------------------------------

    def next_event(self, stream_id: str | None = None) -> Event | None:
        """The next event for the application (from one stream, or any); None if none.

        Raises a stream's error once its events before the error are taken.
        """
        if stream_id is not None:
            cursor = self.cursors.get(stream_id)
            return None if cursor is None else self._take(cursor)
        order = self.order
        while order:
            cursor = order[0]
            if self.cursors.get(cursor.stream_id) is not cursor:
                order.popleft()
                continue
            event = self._take(cursor)
            if event is not None:
                return event
            order.popleft()
        return None

    def _take(self, cursor: Cursor) -> Event | None:
        if cursor.ready:
            event = cursor.ready.popleft()
            acked = cursor.acked
            if cursor.taken <= acked:  # the first take since its last ack
                self._unacked[cursor.stream_id] = cursor
            taken = cursor.taken = event.seq or cursor.taken
            if _ack_now(cursor, taken - acked):
                self._due[cursor.stream_id] = cursor
                self.ack_due = True
            return event
        if cursor.error is not None:
            err, cursor.error = cursor.error, None
            cursor.failed = True
            raise err
        return None

    def has_event(self, stream_id: str | None = None) -> bool:
        """Whether :meth:`next_event` would return (or raise) at once."""
        if stream_id is not None:
            cursor = self.cursors.get(stream_id)
            return cursor is not None and (bool(cursor.ready) or cursor.error is not None)
        order = self.order
        cursors = self.cursors
        while order and (
            cursors.get(order[0].stream_id) is not order[0]
            or (not order[0].ready and order[0].error is None)
        ):
            order.popleft()
        return bool(order)

    def finished(self, stream_id: str | None = None) -> bool:
        """Whether one stream (or every followed stream) has ended and been drained."""
        if stream_id is not None:
            cursor = self.cursors.get(stream_id)
            return cursor is None or cursor.finished
        return all(c.finished for c in self.cursors.values())

    def acks(self, now: float, force: bool = False) -> list[Any]:
        """``[stream, seq, ...]`` to acknowledge now, or ``[]``.

        A stream is acked at once when its ack step (:func:`ack_step`: half a
        buffer, or more when the broker publishes parked events) was taken
        since its last ack, or half a buffer and nothing more of it is ready
        (so a blocked producer never waits on a timer); otherwise what was
        taken is acked at most every ``ack_interval``, one message for every
        stream.  ``force`` acks everything now (closing).
        """
        due = force or now - self._last_ack >= self.ack_interval
        flat: list[Any] = []
        unacked = self._unacked
        # Between intervals only the streams _take found due: a subscriber
        # following thousands of streams does not look at every one.  (Each
        # qualified when taken, and acks() runs right after; what arrived since
        # does not take it back.)
        candidates = list((unacked if due else self._due).items())
        self._due.clear()
        for sid, cursor in candidates:
            if unacked.get(sid) is not cursor:
                continue  # acked already, or removed
            taken = cursor.taken
            if taken > cursor.acked:
                flat.append(sid)
                flat.append(taken)
                cursor.acked = taken
            del unacked[sid]
        if flat:
            self._last_ack = now
        self.ack_due = False
        return flat

    def acks_pending(self) -> bool:
        """Whether something taken is not acknowledged yet."""
        return bool(self._unacked)

    def resume_points(self) -> dict[str, int]:
        """Where each stream not yet complete resumes after a reconnect: its next seq."""
        return {sid: c.next_seq for sid, c in self.cursors.items() if not c.complete}
