"""ProducerState: a producer's flow control and bookkeeping, sans I/O.

Flow control is a credit window per stream: a producer may have at most
``window`` events per stream that the broker has not answered (acked or
nacked).  The broker answers an event once it is in the stream's buffer (or
dropped, or refused), and under BLOCK a full stream holds events back until
subscribers acknowledge, so a stalled stream stalls only the producers
writing to it, by exactly ``window`` events, and the broker holds a bounded
amount for it.  The events not yet answered are kept here, as encoded bytes,
so they can be sent again if the broker restarts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    LimitExceededError,
    StreamClosedError,
    StreamFullError,
    ZEventsError,
    error_from_wire,
)
from . import frames

__all__ = ["ProducerState", "StreamClosed"]


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The broker says ``stream_id`` was closed after ``last_seq`` (stop generating)."""

    stream_id: str
    last_seq: int


@dataclass(slots=True)
class _Outbound:
    topic: bytes
    next_pseq: int = 1
    unacked: deque[tuple[int, bytes]] = field(default_factory=deque)
    closed: bool = False
    error: ZEventsError | None = None  # raised by the next send or flush


def _report(out: _Outbound, error: ZEventsError) -> None:
    """The broker answered events of ``out`` with ``error``: closed is for good, any
    other error is raised once by the next send or flush."""
    if isinstance(error, StreamClosedError):
        out.closed = True
    else:
        out.error = error


class ProducerState:
    """Per-stream pseq counters, windows, unanswered events and pending errors."""

    def __init__(
        self,
        client_id: bytes,
        window: int = 4096,
        max_batch: int = 1024,
        max_message_size: int = 1 << 20,
    ) -> None:
        self.client_id = client_id
        self.window = window
        self.max_batch = max(max_batch, 1)
        self.max_message_size = max_message_size
        self._streams: dict[str, _Outbound] = {}
        self._unanswered = 0  # over all streams (flush waits on it; no sum per check)

    def _get(self, stream_id: str) -> _Outbound:
        out = self._streams.get(stream_id)
        if out is None:
            out = self._streams[stream_id] = _Outbound(frames.topic(stream_id))
        return out

    # -- sending ----------------------------------------------------------------

    def check(self, stream_id: str) -> None:
        """Raise what the broker told us about ``stream_id``: closed (every time),
        or a drop or refusal (once)."""
        out = self._streams.get(stream_id)
        if out is None:
            return
        if out.closed:
            raise StreamClosedError(stream_id, "send")
        if out.error is not None:
            err, out.error = out.error, None
            raise err

    def room(self, stream_id: str) -> int:
        """How many more events may go to ``stream_id`` before answers come back."""
        out = self._streams.get(stream_id)
        return self.window if out is None else self.window - len(out.unacked)

    def sendable(self, stream_id: str, wanted: int, queued: int = 0) -> int:
        """How many of ``wanted`` events may go to ``stream_id`` now (``queued``: taken
        from the room already, not sent yet).

        All that fit, but no sliver: with less room than a quarter window, and more
        events wanted than that, none.  The window is then full of events the broker
        holds for the stream (parked, under BLOCK), so waiting for a bigger chunk
        delays nothing, and the frames stay few and big instead of following the
        acks' chunks down to a few events each.
        """
        room = self.room(stream_id) - queued
        if room >= wanted:
            return wanted
        return room if room >= max(1, self.window >> 2) else 0

    def has_news(self, stream_id: str) -> bool:
        """Whether :meth:`check` would raise for ``stream_id`` (closed, or an error
        the broker reported): a wait for room must end on it."""
        out = self._streams.get(stream_id)
        return out is not None and (out.closed or out.error is not None)

    def may_go_on(self, stream_id: str, wanted: int, queued: int = 0) -> bool:
        """Whether a send waiting to put ``wanted`` events on ``stream_id`` may stop
        waiting: a chunk may go (:meth:`sendable`), or there is news to raise (a
        nack that freed less than a chunk ends the wait with its error)."""
        return self.sendable(stream_id, wanted, queued) > 0 or self.has_news(stream_id)

    def check_size(self, stream_id: str, raw: bytes) -> None:
        """Raise :class:`LimitExceededError` if one event cannot fit in a message."""
        overhead = len(stream_id.encode()) + 1 + frames.CLIENT_ID_SIZE + 8
        if len(raw) + overhead > self.max_message_size:
            raise LimitExceededError(
                f"stream {stream_id}: send: event of {len(raw)} bytes does not fit in"
                f" max_message_size {self.max_message_size}",
                "max_message_size",
            )

    def encode_all(self, stream_id: str, events: list[bytes]) -> list[bytes]:
        """Ingest frames for ``events``: at most ``max_batch`` events and
        ``max_message_size`` bytes each (the caller checked :meth:`room`)."""
        out = self._get(stream_id)
        budget = self.max_message_size - (len(out.topic) + frames.CLIENT_ID_SIZE + 8)
        result = []
        start = 0
        size = 0
        for i, raw in enumerate(events):
            if i - start >= self.max_batch or (i > start and size + len(raw) > budget):
                result.append(self.encode(stream_id, events[start:i]))
                start, size = i, 0
            size += len(raw)
        if start < len(events):
            result.append(self.encode(stream_id, events[start:]))
        return result

    def encode(self, stream_id: str, events: list[bytes]) -> bytes:
        """One ingest frame for ``events`` (the caller checked :meth:`room` and size)."""
        out = self._get(stream_id)
        first = out.next_pseq
        unacked = out.unacked
        for i, raw in enumerate(events):
            unacked.append((first + i, raw))
        out.next_pseq = first + len(events)
        self._unanswered += len(events)
        return frames.encode_ingest(out.topic, self.client_id, first, b"".join(events))

    def unanswered(self, stream_id: str | None = None) -> int:
        """Events sent but not yet answered (on one stream, or on all)."""
        if stream_id is not None:
            out = self._streams.get(stream_id)
            return 0 if out is None else len(out.unacked)
        return self._unanswered

    def resend(self) -> list[bytes]:
        """Frames carrying every unanswered event again (after a broker restart).

        A broker drops the ones it already has (it remembers each producer's last
        pseq per stream); a fresh one takes them as new.
        """
        return [frame for sid in self._streams for frame in self.resend_stream(sid)]

    def resend_stream(self, stream_id: str) -> list[bytes]:
        """Frames carrying the unanswered events of ``stream_id`` again, in order."""
        out = self._streams.get(stream_id)
        if out is None or not out.unacked or out.closed:
            return []
        # Runs of consecutive pseqs (nacks leave holes), each cut to the same
        # max_batch and max_message_size as a first send.
        budget = self.max_message_size - (len(out.topic) + frames.CLIENT_ID_SIZE + 8)
        result: list[bytes] = []
        run: list[bytes] = []
        first = size = 0
        for p, raw in out.unacked:
            if run and (
                p != first + len(run) or len(run) >= self.max_batch or size + len(raw) > budget
            ):
                result.append(frames.encode_ingest(out.topic, self.client_id, first, b"".join(run)))
                run = []
            if not run:
                first, size = p, 0
            run.append(raw)
            size += len(raw)
        result.append(frames.encode_ingest(out.topic, self.client_id, first, b"".join(run)))
        return result

    def fail_unanswered(self, stream_id: str, error: ZEventsError) -> None:
        """The broker refused to take ``stream_id``'s unanswered events at all (a
        ``rebase`` it could not do): answer them with ``error``, as a nack would."""
        out = self._streams.get(stream_id)
        if out is None:
            return
        self._unanswered -= len(out.unacked)
        out.unacked.clear()
        _report(out, error)

    def on_resend(self, stream_id: str, expected: int) -> int | None:
        """The broker got a frame of ``stream_id`` past a gap: it has our events up
        to ``expected - 1`` only (frames were lost in transit, or it restarted).

        Returns None when :meth:`resend_stream` fills the gap, or the pseq to
        ``rebase`` the broker to first, when everything from ``expected`` up to
        it was already answered (by a broker that has since lost it).
        """
        out = self._streams.get(stream_id)
        if out is None:
            return None
        low = out.unacked[0][0] if out.unacked else out.next_pseq
        return low if low > expected else None

    # -- answers from the broker ----------------------------------------------------

    def on_message(self, msg: list[Any]) -> list[StreamClosed]:
        """Take an ``ack``, ``nack``, ``dropped`` or ``closed`` message; closures to report."""
        kind = msg[0]
        if kind == "ack":
            self._on_ack(msg[2] if len(msg) > 2 else [])
        elif kind == "nack" and len(msg) >= 7:
            self._on_nack(msg)
        elif kind == "dropped" and len(msg) >= 4:
            out = self._streams.get(msg[1])
            if out is not None:
                prior = out.error.dropped if isinstance(out.error, StreamFullError) else 0
                out.error = StreamFullError(msg[1], int(msg[3]), dropped=prior + int(msg[2]))
        elif kind == "closed" and len(msg) >= 3:
            return self._on_closed(msg[1], int(msg[2]))
        return []

    def _on_ack(self, flat: Iterable[Any]) -> None:
        it = iter(flat)
        for sid, through in zip(it, it):  # noqa: B905  (pairs of a flat list)
            out = self._streams.get(sid)
            if out is None:
                continue
            unacked = out.unacked
            before = len(unacked)
            while unacked and unacked[0][0] <= through:
                unacked.popleft()
            self._unanswered -= before - len(unacked)

    def _on_nack(self, msg: list[Any]) -> None:
        _, sid, first, last, code, text, fields = msg[:7]
        out = self._streams.get(sid)
        if out is None:
            return
        before = len(out.unacked)
        out.unacked = deque((p, raw) for p, raw in out.unacked if not first <= p <= last)
        self._unanswered -= before - len(out.unacked)
        _report(out, error_from_wire(code, text, fields if isinstance(fields, dict) else {}))

    def _on_closed(self, sid: str, last_seq: int) -> list[StreamClosed]:
        out = self._get(sid)
        if out.closed:
            return []
        out.closed = True
        self._unanswered -= len(out.unacked)
        out.unacked.clear()
        return [StreamClosed(sid, last_seq)]

    def is_closed(self, stream_id: str) -> bool:
        """Whether the broker told us ``stream_id`` is closed."""
        out = self._streams.get(stream_id)
        return out is not None and out.closed

    def forget(self, stream_id: str) -> None:
        """Drop our state for ``stream_id`` (a new stream of that name starts afresh)."""
        out = self._streams.pop(stream_id, None)
        if out is not None:
            self._unanswered -= len(out.unacked)

    def stream_ids(self) -> list[str]:
        """The streams we have sent to."""
        return list(self._streams)
