"""EventStream: a bounded, ordered, in-process event queue with backpressure.

One stream is safe to use from threads and from asyncio tasks on any event
loop at the same time: a worker thread producing while an asyncio task
consumes is the normal case.  State lives under one lock; a party that must
wait parks a *waiter* (a lock for a thread, a future for a task) and is woken
by whoever changes the state it waits on.  Nothing polls.

Why bounded: an LLM produces tokens faster than a slow client can show them,
and an unbounded queue turns that into unbounded memory.  ``BLOCK`` (the
default) makes the producer wait for room, so nothing is lost; ``DROP`` never
waits and raises :class:`StreamFullError` instead, for callers that prefer
fresh data to complete data.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any

from .errors import InvalidEventError, StreamClosedError, StreamFullError
from .events import Event

__all__ = ["DEFAULT_BUFFER_SIZE", "BackpressurePolicy", "EventStream", "StreamStatistics"]

#: Buffer size used when none (or a non-positive one) is given.
DEFAULT_BUFFER_SIZE = 100


class BackpressurePolicy(str, Enum):
    """What a send does when the buffer is full."""

    BLOCK = "block"  #: wait for room (the default): nothing is lost
    DROP = "drop"  #: raise StreamFullError at once: the event is not taken

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: BackpressurePolicy | str) -> BackpressurePolicy:
        """The policy named ``value`` (``"block"`` or ``"drop"``, any case)."""
        if isinstance(value, BackpressurePolicy):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown backpressure policy {value!r}: use block or drop") from None


@dataclass(frozen=True, slots=True)
class StreamStatistics:
    """A snapshot of one stream's counters."""

    buffer_size: int
    current_load: int
    policy: BackpressurePolicy
    closed: bool
    sent: int
    received: int
    dropped: int
    waiting_senders: int
    waiting_receivers: int


class _ThreadWaiter:
    """A parked thread: a lock taken at birth, released to wake it."""

    __slots__ = ("_lock", "notified")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.notified = False

    def wake(self) -> None:
        self.notified = True
        self._lock.release()

    def wait(self, timeout: float | None) -> bool:
        return self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))


class _TaskWaiter:
    """A parked asyncio task: a future on its loop, resolved thread-safely."""

    __slots__ = ("future", "loop", "notified")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.notified = False

    def wake(self) -> None:
        self.notified = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            _resolve(self.future)
        else:
            try:
                self.loop.call_soon_threadsafe(_resolve, self.future)
            except RuntimeError:  # that loop is closed: its task is gone
                pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _time_out(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


_Waiter = _ThreadWaiter | _TaskWaiter


class EventStream:
    """A bounded, ordered queue of :class:`Event` with block-or-drop backpressure.

    >>> with EventStream(buffer_size=10) as s:
    ...     s.send(Event.text_delta("Hello "))
    ...     s.send(Event.text_delta("World!"))
    >>> [e.data["text"] for e in s]
    ['Hello ', 'World!']
    """

    def __init__(
        self,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        policy: BackpressurePolicy = BackpressurePolicy.BLOCK,
        *,
        stream_id: str = "<anonymous>",
    ) -> None:
        self._buffer_size = buffer_size if buffer_size > 0 else DEFAULT_BUFFER_SIZE
        self._policy = BackpressurePolicy.parse(policy)
        self.stream_id = stream_id
        self._lock = threading.Lock()
        self._buf: deque[Event] = deque()
        self._closed = False
        self._senders: deque[_Waiter] = deque()
        self._receivers: deque[_Waiter] = deque()
        self._sent = 0
        self._received = 0
        self._dropped = 0
        #: ``time.monotonic()`` of the last send or receive (or creation).
        self.last_activity = time.monotonic()

    # -- properties ----------------------------------------------------------

    @property
    def buffer_size(self) -> int:
        """How many events the buffer holds at most."""
        return self._buffer_size

    @property
    def policy(self) -> BackpressurePolicy:
        """What a send does on a full buffer; settable at any time."""
        return self._policy

    @policy.setter
    def policy(self, policy: BackpressurePolicy) -> None:
        with self._lock:
            self._policy = BackpressurePolicy.parse(policy)
            # Blocked senders re-check: under DROP they now fail at once.
            self._wake_all(self._senders)

    def set_backpressure_policy(self, policy: BackpressurePolicy) -> None:
        """Set :attr:`policy` (the Go original's spelling)."""
        self.policy = policy

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def is_closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<EventStream {self.stream_id} {state} {len(self._buf)}/{self._buffer_size}"
            f" {self._policy}>"
        )

    def statistics(self) -> StreamStatistics:
        """A frozen snapshot of this stream's counters."""
        with self._lock:
            return StreamStatistics(
                buffer_size=self._buffer_size,
                current_load=len(self._buf),
                policy=self._policy,
                closed=self._closed,
                sent=self._sent,
                received=self._received,
                dropped=self._dropped,
                waiting_senders=len(self._senders),
                waiting_receivers=len(self._receivers),
            )

    # -- waking (call with the lock held) -------------------------------------

    @staticmethod
    def _wake_one(waiters: deque[_Waiter]) -> None:
        if waiters:
            waiters.popleft().wake()

    @staticmethod
    def _wake_all(waiters: deque[_Waiter]) -> None:
        while waiters:
            waiters.popleft().wake()

    def _abandon(self, waiter: _Waiter, waiters: deque[_Waiter]) -> None:
        """A waiter gives up (timeout, cancel): unpark it, or pass its wake-up on."""
        with self._lock:
            if waiter.notified:
                # It was woken for a slot it will not use: the next waiter gets it.
                self._wake_one(waiters)
            else:
                try:
                    waiters.remove(waiter)
                except ValueError:
                    pass

    # -- sending ----------------------------------------------------------------

    @staticmethod
    def _check(event: Event | None) -> Event:
        if event is None:
            raise InvalidEventError("event cannot be None")
        if not isinstance(event, Event):
            raise InvalidEventError(f"expected an Event, not {type(event).__name__}")
        event.validate()
        return event

    def _try_put(self, event: Event) -> bool:
        """Append if there is room; raise if closed or DROP-full.  Lock held."""
        if self._closed:
            raise StreamClosedError(self.stream_id)
        if len(self._buf) < self._buffer_size:
            self._buf.append(event)
            self._sent += 1
            self.last_activity = time.monotonic()
            self._wake_one(self._receivers)
            return True
        if self._policy is BackpressurePolicy.DROP:
            self._dropped += 1
            raise StreamFullError(self.stream_id, self._buffer_size)
        return False

    def try_send(self, event: Event) -> bool:
        """Send without waiting: False if the buffer is full under BLOCK.

        Raises like :meth:`send` otherwise (``StreamFullError`` under DROP).
        """
        event = self._check(event)
        with self._lock:
            return self._try_put(event)

    def send(self, event: Event, timeout: float | None = None) -> None:
        """Append ``event``, waiting for room under BLOCK.

        Raises :class:`InvalidEventError` for a bad event,
        :class:`StreamClosedError` if the stream is (or becomes, while we wait)
        closed, :class:`StreamFullError` at once under DROP, and the builtin
        :class:`TimeoutError` when ``timeout`` seconds pass without room.
        """
        event = self._check(event)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._try_put(event):
                    return
                waiter = _ThreadWaiter()
                self._senders.append(waiter)
            remaining = None if deadline is None else deadline - time.monotonic()
            if not waiter.wait(remaining):
                self._abandon(waiter, self._senders)
                if not waiter.notified:
                    raise TimeoutError(f"stream {self.stream_id}: send: timed out")

    async def asend(self, event: Event, timeout: float | None = None) -> None:
        """:meth:`send` for asyncio: awaits room instead of blocking the thread.

        Cancellation (and ``asyncio.timeout``) leaves the stream consistent.
        """
        event = self._check(event)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                if self._try_put(event):
                    return
                waiter = _TaskWaiter(loop)
                self._senders.append(waiter)
            await self._park(waiter, self._senders, deadline, "send")

    async def _park(
        self, waiter: _TaskWaiter, waiters: deque[_Waiter], deadline: float | None, op: str
    ) -> None:
        handle = None
        if deadline is not None:
            handle = waiter.loop.call_at(deadline, _time_out, waiter.future)
        try:
            await waiter.future
        except TimeoutError:
            self._abandon(waiter, waiters)
            raise TimeoutError(f"stream {self.stream_id}: {op}: timed out") from None
        except BaseException:  # cancelled: unpark, then let the cancellation through
            self._abandon(waiter, waiters)
            raise
        finally:
            if handle is not None:
                handle.cancel()

    # -- receiving ----------------------------------------------------------------

    def _try_get(self) -> Event | None:
        """Pop the oldest event; None if empty and open; raise if closed and drained."""
        if self._buf:
            event = self._buf.popleft()
            self._received += 1
            self.last_activity = time.monotonic()
            self._wake_one(self._senders)
            return event
        if self._closed:
            raise StreamClosedError(self.stream_id)
        return None

    def try_receive(self) -> Event | None:
        """The next event without waiting, or None if none is buffered.

        Raises :class:`StreamClosedError` once the stream is closed and drained.
        """
        with self._lock:
            return self._try_get()

    def receive(self, timeout: float | None = None) -> Event:
        """The next event in order, waiting for one.

        Raises :class:`StreamClosedError` once the stream is closed and drained,
        and :class:`TimeoutError` when ``timeout`` seconds pass.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                event = self._try_get()
                if event is not None:
                    return event
                waiter = _ThreadWaiter()
                self._receivers.append(waiter)
            remaining = None if deadline is None else deadline - time.monotonic()
            if not waiter.wait(remaining):
                self._abandon(waiter, self._receivers)
                if not waiter.notified:
                    raise TimeoutError(f"stream {self.stream_id}: receive: timed out")

    async def areceive(self, timeout: float | None = None) -> Event:
        """:meth:`receive` for asyncio."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                event = self._try_get()
                if event is not None:
                    return event
                waiter = _TaskWaiter(loop)
                self._receivers.append(waiter)
            await self._park(waiter, self._receivers, deadline, "receive")

    def __iter__(self) -> Iterator[Event]:
        """Every event in order; ends when the stream is closed and drained."""
        while True:
            try:
                yield self.receive()
            except StreamClosedError:
                return

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        while True:
            try:
                event = await self.areceive()
            except StreamClosedError:
                return
            yield event

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Close the stream: sends fail from now on, buffered events can still be received.

        Waiting senders get :class:`StreamClosedError`; waiting receivers get
        the buffered events, then :class:`StreamClosedError`.  Closing twice
        raises :class:`StreamClosedError`, as the Go original does.
        """
        with self._lock:
            if self._closed:
                raise StreamClosedError(self.stream_id)
            self._closed = True
            self.last_activity = time.monotonic()
            self._wake_all(self._senders)
            self._wake_all(self._receivers)

    def touch(self) -> None:
        """Record activity now (the manager calls this on lookups)."""
        self.last_activity = time.monotonic()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closed:
            try:
                self.close()
            except StreamClosedError:  # closed by another thread meanwhile
                pass

    def __reduce__(self) -> Any:
        raise TypeError("EventStream cannot be pickled")
