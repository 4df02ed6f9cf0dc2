"""StreamBuffer: one broker stream's rules, in one place.

A stream is a bounded deque of events kept as the bytes they arrived in;
``events[i]`` has seq ``base_seq + i`` (the deque of ``(seq, event)`` pairs of
the design, with the seq implied by position instead of stored: a tuple and an
int per event would cost more memory than the event itself).

The rules:

* Admission: an event is appended if the deque holds fewer than
  ``buffer_size`` events, or if its oldest event may leave, which it may once
  every active subscriber has acknowledged it.  With no subscriber ever, the
  oldest stays (kept for the first one); once all subscribers have left, it
  may go.  Otherwise the stream is *full*.
* A full BLOCK stream parks events in ``parked`` (FIFO, bounded by the
  caller) and admits them as acknowledgements make room; a full DROP stream
  drops the event and counts it.  Parked events are admitted in order, so
  their seqs are known when they park: with ``publish_parked`` (a broker
  without a durable store) they are numbered and published at once, and
  served to replays and fetches from ``parked``, so subscribers need not wait
  for the room a round trip of acks makes; their producers still hear of them
  only once they are admitted (flow control is unchanged).
* Every subscriber has a cursor: the last seq it acknowledged.  Acks only move
  cursors forward and never past the last seq.
* Every buffer charges the bytes it holds to one :class:`Budget` shared by the
  broker's streams, so the broker can cap its memory (the policy for when the
  cap is reached is the core's; the buffer only counts and trims).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from itertools import count, islice, repeat

from zevents.errors import ReplayUnavailableError, StreamClosedError
from zevents.protocol.frames import topic
from zevents.stream import BackpressurePolicy

__all__ = ["Budget", "StreamBuffer"]


class Budget:
    """Bytes of events buffered across streams (``used``) against a cap (``cap``)."""

    __slots__ = ("cap", "used")

    def __init__(self, cap: int = 1 << 62) -> None:
        self.cap = cap
        self.used = 0

    def fits(self, n: int) -> bool:
        """Whether ``n`` more bytes stay within the cap."""
        return self.used + n <= self.cap


# Shared stand-ins for a stream that never parked anything (never mutated).
_NO_PARKED: deque[tuple[bytes, int, bytes]] = deque(maxlen=0)
_NO_PARKED_BY: dict[bytes, int] = {}


class StreamBuffer:
    """The broker's state for one stream (see the module docstring for the rules)."""

    __slots__ = (
        "_gate",
        "base_seq",
        "budget",
        "buffer_size",
        "clock",
        "closed",
        "cursors",
        "dropped",
        "events",
        "events_in",
        "ever_subscribed",
        "held_over",
        "last_activity",
        "nbytes",
        "next_seq",
        "parked",
        "parked_by",
        "policy",
        "producers",
        "publish_parked",
        "rejected",
        "stored_seq",
        "stream_id",
        "topic",
        "unpublished",
        "unpublished_seq",
    )

    def __init__(
        self,
        stream_id: str,
        buffer_size: int,
        policy: BackpressurePolicy,
        clock: Callable[[], float] = time.monotonic,
        budget: Budget | None = None,
        publish_parked: bool = False,
    ) -> None:
        self.clock = clock
        self.publish_parked = publish_parked
        self.budget = budget if budget is not None else Budget()
        self.nbytes = 0  # bytes held in events (charged to the budget)
        self.stream_id = stream_id
        self.topic = topic(stream_id)
        self.buffer_size = buffer_size
        self.policy = policy
        self.events: deque[bytes] = deque()
        self.base_seq = 1  # seq of events[0] (or of the next event, when empty)
        self.next_seq = 1  # seq the next admitted event gets
        self.closed = False
        self.cursors: dict[bytes, int] = {}  # subscriber client ID -> last acked seq
        self.ever_subscribed = False
        self._gate = 0  # min(cursors.values()), kept current by _regate
        # BLOCK events waiting for room: (producer client ID, pseq, raw event).
        # Both made on first use: most streams never park, and an empty deque is 760 bytes.
        self.parked: deque[tuple[bytes, int, bytes]] = _NO_PARKED
        self.parked_by: dict[bytes, int] = _NO_PARKED_BY  # producer -> its parked events
        self.producers: dict[bytes, int] = {}  # producer client ID -> last pseq processed
        self.unpublished: list[bytes] = []  # admitted since the last publish
        self.unpublished_seq = 0  # seq of unpublished[0]
        self.stored_seq = 0  # last seq a durable store has (0: none, or no store)
        self.held_over = 0  # the last events, admitted at close: not in nbytes
        self.events_in = 0
        self.dropped = 0
        self.rejected = 0
        self.last_activity = clock()

    # -- the ManagedStream protocol ---------------------------------------------

    def __len__(self) -> int:
        return len(self.events)

    def touch(self) -> None:
        """Record activity now (idle expiry counts from here)."""
        self.last_activity = self.clock()

    def close(self) -> None:
        """Mark closed: no more events are admitted; what is buffered stays readable."""
        if self.closed:
            raise StreamClosedError(self.stream_id)
        self.closed = True
        self.touch()

    @property
    def last_seq(self) -> int:
        """Seq of the newest event subscribers may have: admitted, or parked and
        published (``publish_parked``); 0 if none."""
        if self.publish_parked:
            return self.next_seq - 1 + len(self.parked)
        return self.next_seq - 1

    # -- admission ----------------------------------------------------------------

    def _oldest_may_leave(self) -> bool:
        if not self.cursors:
            return self.ever_subscribed
        return self._gate >= self.base_seq

    def has_room(self) -> bool:
        """Whether :meth:`admit` would take an event now."""
        return len(self.events) < self.buffer_size or self._oldest_may_leave()

    def admit(self, raw: bytes) -> int:
        """Append ``raw`` (the caller checked :meth:`has_room`) and return its seq."""
        events = self.events
        delta = len(raw)
        if len(events) >= self.buffer_size:
            delta -= len(events.popleft())
            self.base_seq += 1
        events.append(raw)
        self.nbytes += delta
        self.budget.used += delta
        seq = self.next_seq
        self.next_seq = seq + 1
        if not self.unpublished:
            self.unpublished_seq = seq
        self.unpublished.append(raw)
        self.events_in += 1
        return seq

    def admit_batch(self, raws: list[bytes], nbytes: int = -1, published: bool = False) -> int:
        """Admit from the front of ``raws`` while there is room; how many were.
        ``nbytes``: their total size, if the caller knows it; ``published``: they
        were published when they parked."""
        events = self.events
        free = self.buffer_size - len(events)
        n = len(raws)
        if free >= n:  # the common case: room for all, one extend
            events.extend(raws)
            delta = nbytes if nbytes >= 0 else sum(map(len, raws))
        else:
            n = delta = 0
            for raw in raws:
                if len(events) >= self.buffer_size:
                    if not self._oldest_may_leave():
                        break
                    delta -= len(events.popleft())
                    self.base_seq += 1
                events.append(raw)
                delta += len(raw)
                n += 1
            if n == 0:
                return 0
            if n < len(raws):
                raws = raws[:n]
        self.nbytes += delta
        self.budget.used += delta
        if not published:
            if not self.unpublished:
                self.unpublished_seq = self.next_seq
            self.unpublished.extend(raws)
        self.next_seq += n
        self.events_in += n
        return n

    def admit_parked_closing(self) -> list[tuple[bytes, int, bytes]]:
        """The stream is closing: admit every parked event (published already, so
        they are part of the stream), past ``buffer_size`` and, as while they were
        parked, not charged to the budget (``held_over``).  Returns what was parked."""
        assert self.publish_parked  # otherwise they were never published: refuse them
        items = self.unpark_batch(len(self.parked))
        self.events.extend(raw for _, _, raw in items)
        self.held_over += len(items)
        self.next_seq += len(items)
        self.events_in += len(items)
        return items

    def trim(self) -> int:
        """Evict the oldest events that may leave (every subscriber acknowledged
        them: history kept only for replay); the bytes freed."""
        events = self.events
        freed = 0
        while events and self._oldest_may_leave():
            if len(events) <= self.held_over:  # admitted at close, never charged
                events.popleft()
                self.held_over -= 1
            else:
                freed += len(events.popleft())
            self.base_seq += 1
        self.nbytes -= freed
        self.budget.used -= freed
        return freed

    def release(self) -> None:
        """The stream is being removed: give its bytes back to the budget."""
        self.budget.used -= self.nbytes
        self.nbytes = 0

    def restore(self, base_seq: int, next_seq: int, events: list[bytes]) -> None:
        """Load state kept by a durable store: ``events`` are seqs ``base_seq``...;
        ``next_seq`` is what the next admitted event gets."""
        self.events = deque(events)
        self.base_seq = base_seq
        self.next_seq = next_seq
        delta = sum(map(len, events)) - self.nbytes
        self.nbytes += delta
        self.budget.used += delta

    def answered_through(self, client_id: bytes) -> int:
        """The pseq through which everything ``client_id`` sent here was dealt with
        (admitted, dropped or refused): its last one, or just before its first parked."""
        through = self.producers.get(client_id, 0)
        if client_id in self.parked_by:
            through = next(p for c, p, _ in self.parked if c == client_id) - 1
        return through

    def take_unpublished(self) -> tuple[int, list[bytes]]:
        """``(first seq, events)`` admitted since the last call."""
        batch = self.unpublished
        self.unpublished = []
        return self.unpublished_seq, batch

    # -- subscribers --------------------------------------------------------------

    def check_available(self, from_seq: int) -> None:
        """Raise :class:`ReplayUnavailableError` if ``from_seq`` has left the buffer."""
        if from_seq < self.base_seq:
            raise ReplayUnavailableError(self.stream_id, from_seq, self.base_seq - 1)

    def add_cursor(self, client_id: bytes, from_seq: int | None) -> int:
        """Register a subscriber that wants events from ``from_seq`` (None: the oldest
        buffered); returns the effective first seq."""
        first = self.base_seq if from_seq is None else max(from_seq, 1)
        self.check_available(first)
        self.cursors[client_id] = first - 1
        self.ever_subscribed = True
        self._regate()
        return first

    def remove_cursor(self, client_id: bytes) -> bool:
        """Forget a subscriber; True if it had a cursor here."""
        if self.cursors.pop(client_id, None) is None:
            return False
        self._regate()
        return True

    def ack(self, client_id: bytes, seq: int) -> bool:
        """Move ``client_id``'s cursor to ``seq``; True if the gate moved."""
        current = self.cursors.get(client_id)
        if current is None:
            return False
        seq = min(seq, self.last_seq)  # nobody can have received more than exists
        if seq <= current:
            return False
        self.cursors[client_id] = seq
        if current == self._gate:
            old = self._gate
            self._regate()
            return self._gate != old
        return False

    def _regate(self) -> None:
        self._gate = min(self.cursors.values()) if self.cursors else 0

    def lagging(self, client_id: bytes) -> bool:
        """Whether ``client_id`` has not acknowledged everything (or has, of a closed
        stream: it may not know the end; the SDK unsubscribes once it does)."""
        acked = self.cursors.get(client_id)
        return acked is not None and (acked < self.last_seq or self.closed)

    def park(self, client_id: bytes, pseq: int, raw: bytes) -> None:
        """Hold a BLOCK event until there is room."""
        self.park_batch(client_id, pseq, [raw])

    def park_batch(self, client_id: bytes, first_pseq: int, raws: list[bytes]) -> None:
        """Hold BLOCK events until there is room: ``raws``, numbered from ``first_pseq``
        (published now, with ``publish_parked``: their seqs are known)."""
        if self.parked is _NO_PARKED:
            self.parked = deque()
            self.parked_by = {}
        if self.publish_parked:
            if not self.unpublished:
                self.unpublished_seq = self.next_seq + len(self.parked)
            self.unpublished.extend(raws)
        self.parked.extend(zip(repeat(client_id), count(first_pseq), raws))
        self.parked_by[client_id] = self.parked_by.get(client_id, 0) + len(raws)

    def room(self) -> int:
        """How many events :meth:`admit_batch` would take now."""
        events = len(self.events)
        free = self.buffer_size - events
        if not self.cursors:
            return free + events if self.ever_subscribed else free
        return free + min(max(self._gate - self.base_seq + 1, 0), events)

    def unpark_batch(self, n: int) -> list[tuple[bytes, int, bytes]]:
        """The ``n`` oldest held events."""
        parked = self.parked
        popleft = parked.popleft
        items = [popleft() for _ in range(min(n, len(parked)))]
        by = self.parked_by
        for client, _, _ in items:
            left = by[client] - 1
            if left:
                by[client] = left
            else:
                del by[client]
        return items

    def unpark(self) -> tuple[bytes, int, bytes]:
        """The oldest held event."""
        item = self.parked.popleft()
        client = item[0]
        left = self.parked_by[client] - 1
        if left:
            self.parked_by[client] = left
        else:
            del self.parked_by[client]
        return item

    def slice(self, from_seq: int, limit: int) -> list[bytes]:
        """Up to ``limit`` events starting at ``from_seq`` (checked available): buffered,
        then parked and published (``publish_parked``)."""
        start = max(from_seq - self.base_seq, 0)
        out = list(islice(self.events, start, start + limit))
        if len(out) < limit and self.publish_parked and self.parked:
            start = max(start - len(self.events), 0)
            out.extend(raw for _, _, raw in islice(self.parked, start, start + limit - len(out)))
        return out
