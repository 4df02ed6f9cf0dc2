"""Producers: push events into broker streams, with the broker's flow control.

>>> from zevents import Event, Producer                     # doctest: +SKIP
>>> with Producer("tcp://127.0.0.1:5555") as p:              # doctest: +SKIP
...     p.send("session-1", Event.text_delta("Hello"))
...     p.flush()

``send`` returns once the event is on its way and the stream's window had
room; under BLOCK it waits (up to ``timeout``) while the stream is full.
``flush`` waits until the broker has answered every event sent.  Errors the
broker reports later (a DROP stream dropped events, the stream was closed)
are raised by the next ``send`` or ``flush`` on that stream.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import zmq
import zmq.asyncio

from ..errors import InvalidEventError
from ..events import Event
from ..ids import validate_stream_id
from ..keys import ClientKeys
from ..protocol.producer import ProducerState, StreamClosed
from ..protocol.session import Reply
from ._base import DEFAULT_TIMEOUT, _ClientBase
from ._io import _EVENTS, _POLLIN, AsyncIO, SyncIO

__all__ = ["AsyncProducer", "Producer", "StreamClosed"]

ClosedCallback = Callable[[StreamClosed], None]
_SYNC = ("sync",)
_RESYNC = 3  # heartbeats between two syncs while waiting for answers

_LOOK_EVERY = 0.0005  # seconds: how often send looks for the broker's answers


class _ProducerLogic(_ClientBase):
    """What both producers share: encoding, answers, restarts, close notices."""

    _state: ProducerState
    _callbacks: list[ClosedCallback]
    _closed_streams: dict[str, StreamClosed]

    def _init_producer(self) -> None:
        limits = self.handshake.limits
        self._state = ProducerState(
            self._session.client_id,
            int(limits["window"]),
            int(limits.get("max_batch", 1024)),
            int(limits.get("max_message_size", 1 << 20)),
        )
        self._callbacks = []
        self._closed_streams = {}

    def _encode(self, stream_id: str, events: Iterable[Event]) -> list[bytes]:
        raws = []
        for event in events:
            if event is None:
                raise InvalidEventError("event cannot be None")
            if not isinstance(event, Event):
                raise InvalidEventError(f"expected an Event, not {type(event).__name__}")
            raw = event.to_msgpack()  # validates
            if len(raw) > 65536:  # only big events can break the size limit
                self._state.check_size(stream_id, raw)
            raws.append(raw)
        return raws

    def _on_reply(self, reply: Reply) -> None:
        tag = reply.tag
        if tag == _SYNC:  # nothing waits for a sync's reply: the acks are the point
            return
        if isinstance(tag, tuple) and tag[0] == "rebase":
            if reply.error is not None:  # it will not take this stream (gone, say)
                self._state.fail_unanswered(tag[1], reply.error)
                return
            # The broker skipped what was answered before: now fill the gap.
            for frame in self._state.resend_stream(tag[1]):
                self._push_frame(frame)
            return
        super()._on_reply(reply)

    def _sync(self) -> None:
        """About to wait for answers: ask the broker for the acks it is coalescing."""
        self._request("sync", {}, _SYNC)

    def _answer_waits(self, pred: Callable[[], bool], timeout: float | None) -> Iterator[float]:
        """The waits of a wait for answers: each asks for them first (``sync``), so
        an ack lost on the way costs a few heartbeats, never a hang."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not pred():
            self._sync()
            step = _RESYNC * self._session.heartbeat_interval
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    return
            yield step

    def _on_message(self, msg: list[Any]) -> None:
        if msg[0] == "resend":
            self._on_resend(msg)
            return
        for closed in self._state.on_message(msg):
            self._closed_streams[closed.stream_id] = closed
            for callback in list(self._callbacks):
                callback(closed)

    def _on_resend(self, msg: list[Any]) -> None:
        if len(msg) < 3 or type(msg[1]) is not str or type(msg[2]) is not int:
            return
        sid, expected = msg[1], msg[2]
        rebase = self._state.on_resend(sid, expected)
        if rebase is None:
            for frame in self._state.resend_stream(sid):
                self._push_frame(frame)
        else:
            self._request("rebase", {"stream": sid, "pseq": rebase}, ("rebase", sid))

    def _on_reconnected(self) -> None:
        # A new broker process: send again what the old one never answered.
        for frame in self._state.resend():
            self._push_frame(frame)

    def _push_frame(self, frame: bytes) -> None:
        raise NotImplementedError

    def on_closed(self, callback: ClosedCallback) -> None:
        """Call ``callback(StreamClosed)`` when the broker says one of our streams closed.

        Use it to cancel the LLM call when a user pressed stop.  (The sync
        producer calls it from inside its own calls: ``send``, ``flush``, ``poll``.)
        """
        self._callbacks.append(callback)

    def is_closed(self, stream_id: str) -> bool:
        """Whether the broker told us ``stream_id`` was closed."""
        return self._state.is_closed(stream_id)

    def unanswered(self, stream_id: str | None = None) -> int:
        """Events sent that the broker has not answered yet."""
        return self._state.unanswered(stream_id)


class Producer(_ProducerLogic, SyncIO):
    """Sends events to streams on a broker; blocking calls, in the caller's thread.

    ``broker`` is the control endpoint (default ``$ZEVENTS_BROKER`` or
    ``tcp://127.0.0.1:5555``); ``timeout`` bounds how long any call waits for
    the broker to answer before :class:`BrokerUnavailableError`.
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.Context[Any] | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        SyncIO.__init__(self, broker, timeout, context, keys)
        self._connect()
        self._push = self._new_socket(zmq.PUSH)
        self._data_socks[self._push] = lambda frame: None
        self._push.connect(self.handshake.ingest)
        self._init_producer()
        self._look_after = 0.0  # when send next looks at the control socket

    def _push_frame(self, frame: bytes) -> None:
        self._session.sent(time.monotonic())  # answers come back on the control socket
        # copy=False: pyzmq copies small frames anyway and keeps a reference to
        # large ones; frames are fresh immutable bytes, so nothing can mutate them.
        self._push.send(frame, copy=False)

    def send(self, stream_id: str, event: Event, timeout: float | None = None) -> None:
        """Send one event to ``stream_id`` (see :meth:`send_many`)."""
        self.send_many(stream_id, (event,), timeout)

    def send_many(
        self, stream_id: str, events: Iterable[Event], timeout: float | None = None
    ) -> None:
        """Send ``events`` to ``stream_id`` in order, batched into few messages.

        Waits while the stream's window is used up (a full BLOCK stream),
        raising :class:`TimeoutError` after ``timeout`` seconds.  Raises
        :class:`StreamClosedError` if the stream was closed and what the broker
        reported since the last call (:class:`StreamFullError` for drops).
        """
        self._check_open()
        validate_stream_id(stream_id)
        raws = self._encode(stream_id, events)
        state = self._state
        now = time.monotonic()
        if now >= self._look_after:
            # What the broker said (acks, drops, closures), looked at once per
            # _LOOK_EVERY at most: asking ZeroMQ costs a syscall, and a caller
            # sending one event at a time would pay it per event.
            self._look_after = now + _LOOK_EVERY
            with self._io_lock:  # the keepalive thread shares the control socket
                waiting = self._ctl.getsockopt(_EVENTS) & _POLLIN  # type: ignore[operator]
            if waiting:  # cheaper than a poll per send
                self._pump(0)
        state.check(stream_id)
        deadline = None if timeout is None else now + timeout
        i = 0
        while i < len(raws):
            n = state.sendable(stream_id, len(raws) - i)
            if n <= 0:
                left = None if deadline is None else deadline - time.monotonic()
                rest = len(raws) - i
                ready = functools.partial(state.may_go_on, stream_id, rest)
                if not self._wait_answers(ready, left, "send"):
                    raise TimeoutError(f"stream {stream_id}: send: timed out waiting for room")
                state.check(stream_id)
                continue
            for frame in state.encode_all(stream_id, raws[i : i + n]):
                self._push_frame(frame)
            i += n

    def flush(self, stream_id: str | None = None, timeout: float | None = None) -> None:
        """Wait until the broker answered every event sent (to one stream, or all).

        Raises what the broker reported (drops, closure), :class:`TimeoutError`
        after ``timeout`` seconds.
        """
        self._check_open()
        state = self._state
        if not self._wait_answers(lambda: state.unanswered(stream_id) == 0, timeout, "flush"):
            raise TimeoutError(f"flush: {state.unanswered(stream_id)} events still unanswered")
        for sid in [stream_id] if stream_id is not None else state.stream_ids():
            if not state.is_closed(sid):
                state.check(sid)

    def poll(self, timeout: float = 0.0) -> None:
        """Handle what the broker sent (acks, close notices) for up to ``timeout`` seconds."""
        self._check_open()
        self._pump(timeout)

    def wait_closed(self, stream_id: str, timeout: float | None = None) -> bool:
        """Wait until the broker says ``stream_id`` closed; False at the timeout."""
        self._check_open()
        return self._wait(lambda: self._state.is_closed(stream_id), timeout, "wait_closed")

    def _wait_answers(self, pred: Callable[[], bool], timeout: float | None, what: str) -> bool:
        """Wait for answers (see :meth:`_ProducerLogic._answer_waits`)."""
        for step in self._answer_waits(pred, timeout):
            self._wait(pred, step, what)
        return pred()

    def _on_clean_exit(self) -> None:
        self.flush(timeout=self.timeout)


class AsyncProducer(_ProducerLogic, AsyncIO):
    """:class:`Producer` for asyncio: ``async with AsyncProducer(broker) as p``.

    ``send`` queues the event and returns once the stream's window has room;
    everything sent in one turn of the event loop leaves as one message per
    stream (batched when busy, at once when quiet).
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.asyncio.Context | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        AsyncIO.__init__(self, broker, timeout, context, keys)
        self._pending: dict[str, list[bytes]] = {}
        self._flush_scheduled = False
        self._push: zmq.asyncio.Socket | None = None

    def _after_connect(self) -> None:
        self._push = self._new_socket(zmq.PUSH)
        self._data_socks.append(self._push)
        self._push.connect(self.handshake.ingest)
        self._init_producer()

    def _push_frame(self, frame: bytes) -> None:
        assert self._push is not None
        self._session.sent(time.monotonic())
        self._push.send(frame, copy=False)

    def _queued(self, stream_id: str) -> int:
        """Events taken from ``stream_id``'s room, not sent yet (this loop turn's)."""
        return len(self._pending.get(stream_id, ()))

    def _flush_pending(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for sid, raws in pending.items():
            for frame in self._state.encode_all(sid, raws):
                self._push_frame(frame)

    async def send(self, stream_id: str, event: Event, timeout: float | None = None) -> None:
        """Queue one event for ``stream_id`` (see :meth:`send_many`)."""
        await self.send_many(stream_id, (event,), timeout)

    async def send_many(
        self, stream_id: str, events: Iterable[Event], timeout: float | None = None
    ) -> None:
        """Queue ``events`` for ``stream_id``, awaiting room in its window (BLOCK)."""
        self._check_open()
        validate_stream_id(stream_id)
        raws = self._encode(stream_id, events)
        self._state.check(stream_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        i = 0
        while i < len(raws):
            rest = len(raws) - i
            n = self._state.sendable(stream_id, rest, self._queued(stream_id))
            if n <= 0:
                if self._pending:
                    self._flush_pending()
                left = None if deadline is None else deadline - loop.time()

                if not await self._wait_answers(
                    lambda: self._state.may_go_on(stream_id, rest, self._queued(stream_id)),  # noqa: B023
                    left,
                    "send",
                ):
                    raise TimeoutError(f"stream {stream_id}: send: timed out waiting for room")
                self._state.check(stream_id)
                continue
            self._pending.setdefault(stream_id, []).extend(raws[i : i + n])
            i += n
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_pending)

    async def flush(self, stream_id: str | None = None, timeout: float | None = None) -> None:
        """Await until the broker answered every event sent; raises what it reported."""
        self._check_open()
        self._flush_pending()
        state = self._state
        if not await self._wait_answers(lambda: state.unanswered(stream_id) == 0, timeout, "flush"):
            raise TimeoutError(f"flush: {state.unanswered(stream_id)} events still unanswered")
        for sid in [stream_id] if stream_id is not None else state.stream_ids():
            if not state.is_closed(sid):
                state.check(sid)

    async def wait_closed(self, stream_id: str, timeout: float | None = None) -> bool:
        """Await the broker's word that ``stream_id`` closed; False at the timeout."""
        self._check_open()
        return await self._wait(lambda: self._state.is_closed(stream_id), timeout, "wait_closed")

    async def _wait_answers(
        self, pred: Callable[[], bool], timeout: float | None, what: str
    ) -> bool:
        """Await answers (see :meth:`_ProducerLogic._answer_waits`)."""
        for step in self._answer_waits(pred, timeout):
            await self._wait(pred, step, what)
        return pred()

    def _before_close(self) -> None:
        if self._pending:
            self._flush_pending()

    async def _on_clean_exit(self) -> None:
        await self.flush(timeout=self.timeout)
