"""StreamManager: named streams, created, found, closed and expired in one place.

The manager is generic over the stream it holds: in-process code gets
:class:`~zevents.EventStream` objects, the broker plugs in its own buffered
stream type through ``factory``.  Whatever the type, the rules for naming,
creating, looking up and expiring streams are the ones written here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, overload

from .errors import StreamClosedError, StreamExistsError, StreamNotFoundError
from .ids import validate_stream_id
from .stream import DEFAULT_BUFFER_SIZE, BackpressurePolicy, EventStream

__all__ = ["ManagedStream", "StreamInfo", "StreamManager"]


class ManagedStream(Protocol):
    """What the manager needs of a stream."""

    last_activity: float  # the manager's clock (time.monotonic) at the last activity

    @property
    def buffer_size(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...

    def touch(self) -> None: ...


S = TypeVar("S", bound=ManagedStream)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A snapshot of one managed stream."""

    id: str
    buffer_size: int
    current_load: int
    is_closed: bool
    last_activity: datetime  # wall-clock, UTC


def _seconds(threshold: float | timedelta) -> float:
    if isinstance(threshold, timedelta):
        return threshold.total_seconds()
    return float(threshold)


def _wall_time(ts: float, clock: Callable[[], float]) -> datetime:
    # Activity is timed on a monotonic clock (immune to clock jumps) and shown as wall time.
    return datetime.now(timezone.utc) - timedelta(seconds=clock() - ts)


class StreamManager(Generic[S]):
    """Streams by ID, safe for concurrent use from threads and tasks.

    >>> with StreamManager(buffer_size=10) as m:
    ...     s, created = m.get_or_create("session-1")
    ...     created, "session-1" in m, len(m)
    (True, True, 1)
    """

    @overload
    def __init__(
        self: StreamManager[EventStream],
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        policy: BackpressurePolicy = BackpressurePolicy.BLOCK,
    ) -> None: ...

    @overload
    def __init__(
        self,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        policy: BackpressurePolicy = BackpressurePolicy.BLOCK,
        *,
        factory: Callable[[str, int, BackpressurePolicy], S],
        clock: Callable[[], float] = ...,
    ) -> None: ...

    def __init__(
        self,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        policy: BackpressurePolicy = BackpressurePolicy.BLOCK,
        *,
        factory: Callable[[str, int, BackpressurePolicy], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock  # the clock streams' last_activity is read on
        self.buffer_size = buffer_size if buffer_size > 0 else DEFAULT_BUFFER_SIZE
        self.policy = BackpressurePolicy.parse(policy)
        self._factory: Callable[[str, int, BackpressurePolicy], Any] = (
            factory if factory is not None else _event_stream
        )
        self._streams: dict[str, S] = {}
        self._lock = threading.RLock()

    # -- create and find --------------------------------------------------------

    def _new(self, stream_id: str, buffer_size: int | None, policy: BackpressurePolicy | None) -> S:
        size = buffer_size if buffer_size is not None and buffer_size > 0 else self.buffer_size
        pol = BackpressurePolicy.parse(policy) if policy is not None else self.policy
        stream: S = self._factory(stream_id, size, pol)
        self._streams[stream_id] = stream
        return stream

    def create_stream(
        self,
        stream_id: str,
        *,
        buffer_size: int | None = None,
        policy: BackpressurePolicy | None = None,
    ) -> S:
        """Create stream ``stream_id``; :class:`StreamExistsError` if it exists.

        ``buffer_size`` and ``policy`` default to the manager's.
        """
        validate_stream_id(stream_id)
        with self._lock:
            if stream_id in self._streams:
                raise StreamExistsError(stream_id)
            return self._new(stream_id, buffer_size, policy)

    def get_stream(self, stream_id: str) -> S:
        """The stream ``stream_id``; :class:`StreamNotFoundError` if there is none."""
        validate_stream_id(stream_id)
        with self._lock:
            stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFoundError(stream_id)
        stream.touch()
        return stream

    def find(self, stream_id: str) -> S | None:
        """The stream ``stream_id`` or None, without validating or touching (hot paths)."""
        return self._streams.get(stream_id)

    def get_or_create(
        self,
        stream_id: str,
        *,
        buffer_size: int | None = None,
        policy: BackpressurePolicy | None = None,
    ) -> tuple[S, bool]:
        """``(stream, created)``: exactly one of many concurrent callers creates it."""
        validate_stream_id(stream_id)
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None:
                return self._new(stream_id, buffer_size, policy), True
        stream.touch()
        return stream, False

    # -- close and remove ---------------------------------------------------------

    def close_stream(self, stream_id: str) -> None:
        """Close and remove ``stream_id``; :class:`StreamNotFoundError` if there is none."""
        validate_stream_id(stream_id)
        with self._lock:
            stream = self._streams.pop(stream_id, None)
        if stream is None:
            raise StreamNotFoundError(stream_id)
        _close_quietly(stream)

    def remove_stream(self, stream_id: str) -> S | None:
        """Remove ``stream_id`` without closing it; the stream, or None if there was none."""
        with self._lock:
            return self._streams.pop(stream_id, None)

    def close_all(self) -> None:
        """Close and remove every stream."""
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            _close_quietly(stream)

    def inactive(self, threshold: float | timedelta) -> list[str]:
        """IDs of streams with no activity for more than ``threshold`` (seconds or timedelta)."""
        seconds = _seconds(threshold)
        if seconds <= 0:
            return []
        cutoff = self.clock() - seconds
        with self._lock:
            return [sid for sid, s in self._streams.items() if s.last_activity < cutoff]

    def cleanup_inactive(self, threshold: float | timedelta) -> int:
        """Close and remove streams idle for longer than ``threshold``; how many.

        ``threshold`` is seconds or a :class:`~datetime.timedelta`; ``<= 0`` does nothing.
        """
        count = 0
        for sid in self.inactive(threshold):
            stream = self.remove_stream(sid)
            if stream is not None:
                _close_quietly(stream)
                count += 1
        return count

    # -- inspection -----------------------------------------------------------

    def list_streams(self) -> list[str]:
        """The IDs of all streams, sorted."""
        with self._lock:
            return sorted(self._streams)

    def stream_count(self) -> int:
        """How many streams there are."""
        return len(self._streams)

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._streams

    def __iter__(self) -> Iterator[tuple[str, S]]:
        """``(id, stream)`` pairs, a snapshot taken now."""
        with self._lock:
            return iter(list(self._streams.items()))

    def stream_info(self, stream_id: str) -> StreamInfo:
        """A :class:`StreamInfo` snapshot of ``stream_id`` (does not count as activity)."""
        validate_stream_id(stream_id)
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamNotFoundError(stream_id)
        return _info(stream_id, stream, self.clock)

    def list_stream_info(self) -> list[StreamInfo]:
        """:class:`StreamInfo` of every stream, sorted by ID."""
        with self._lock:
            items = sorted(self._streams.items())
        return [_info(sid, s, self.clock) for sid, s in items]

    def __enter__(self) -> StreamManager[S]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close_all()


def _event_stream(stream_id: str, buffer_size: int, policy: BackpressurePolicy) -> EventStream:
    return EventStream(buffer_size, policy, stream_id=stream_id)


def _info(stream_id: str, stream: ManagedStream, clock: Callable[[], float]) -> StreamInfo:
    return StreamInfo(
        id=stream_id,
        buffer_size=stream.buffer_size,
        current_load=len(stream),
        is_closed=stream.closed,
        last_activity=_wall_time(stream.last_activity, clock),
    )


def _close_quietly(stream: ManagedStream) -> None:
    if not stream.closed:
        try:
            stream.close()
        except StreamClosedError:  # closed concurrently
            pass
