"""Subscribers: follow streams on a broker, in order, resuming where they left off.

One subscriber (one pair of sockets) follows any number of streams.  Iterate
the subscriber for the events of all of them, or the :class:`Subscription`
that :meth:`Subscriber.subscribe` returns for one.  Iteration ends when the
stream (or every stream) has closed and been read to its end.

>>> with Subscriber("tcp://127.0.0.1:5555") as sub:         # doctest: +SKIP
...     for event in sub.subscribe("session-1", from_seq=1):
...         print(event.seq, event.type, event.data)
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import zmq
import zmq.asyncio

from ..errors import ProtocolError, StreamNotFoundError, ZEventsError
from ..events import Event
from ..ids import validate_stream_id
from ..keys import ClientKeys
from ..protocol import frames
from ..protocol.session import Reply
from ..protocol.subscriber import SubscriberState
from ._base import DEFAULT_TIMEOUT, _ClientBase
from ._io import AsyncIO, SyncIO

__all__ = ["AsyncSubscriber", "AsyncSubscription", "Subscriber", "Subscription"]


class _SubscriberLogic(_ClientBase):
    """What both subscribers share: subscribe requests, replies, gaps, acks, restarts."""

    _state: SubscriberState
    _sub: Any  # the SUB socket (sync or asyncio)

    def _init_subscriber(self) -> None:
        self._state = SubscriberState()
        self._markers: dict[str, bytes] = {}

    def _subscribe_request(
        self, stream_id: str, from_seq: int | None, create: bool, tag_kind: str
    ) -> tuple[str, str, bytes]:
        token = os.urandom(12)
        # (Each time: a reconnection may have found another broker.)
        self._state.parked_window = self.handshake.parked_window
        self._state.add(stream_id)
        self._sub.subscribe(frames.topic(stream_id))
        self._sub.subscribe(b"\x00" + token)  # after the topic: see BrokerCore.on_subscription
        self._markers[stream_id] = token
        tag = (tag_kind, stream_id, token)
        args = {"stream": stream_id, "from_seq": from_seq, "token": token, "create": create}
        self._request("subscribe", args, tag)
        return tag

    def _end_marker(self, stream_id: str, token: bytes) -> None:
        self._sub.unsubscribe(b"\x00" + token)
        if self._markers.get(stream_id) == token:
            del self._markers[stream_id]

    def _on_publish(self, frame: bytes) -> None:
        try:
            self._state.on_publish(frame)
        except ZEventsError:
            pass  # the broker never sends this; a gap, if any, is fetched

    def _on_reply(self, reply: Reply) -> None:
        tag = reply.tag
        if not isinstance(tag, tuple):
            super()._on_reply(reply)
            return
        kind, sid = tag[0], tag[1]
        if kind == "fetch":
            self._take_replay(sid, reply, subscribed=False)
        elif kind == "resubscribe":
            self._end_marker(sid, tag[2])
            self._take_replay(sid, reply, subscribed=True)
        elif kind == "unsubscribed":
            pass  # nothing waits for it; a stream already gone is fine too
        else:
            super()._on_reply(reply)

    def _take_replay(self, sid: str, reply: Reply, subscribed: bool) -> None:
        if reply.error is not None:
            self._state.on_error(sid, reply.error)
            return
        try:
            self._state.on_replay(reply.result, subscribed=subscribed)
        except (KeyError, TypeError, ValueError, ZEventsError) as exc:
            self._state.on_error(sid, ProtocolError(f"malformed replay for {sid!r}: {exc!r}"))

    def _on_heartbeat(self, msg: list[Any]) -> None:
        if len(msg) > 2 and isinstance(msg[2], list):
            self._state.on_heads(msg[2], time.monotonic())

    def _on_reconnected(self) -> None:
        # A new broker process.  One that keeps its streams lets us resume where we
        # are; a memory-only one lost them, and must not pass its new stream of the
        # same name (numbered from 1 again) off as the rest of ours.
        durable = bool(self.handshake.limits.get("durable"))
        for sid, next_seq in self._state.resume_points().items():
            if not durable:
                self._state.on_error(
                    sid,
                    StreamNotFoundError(
                        sid,
                        "resume",
                        f"the broker restarted without durable storage and lost this stream"
                        f" (events after seq {next_seq - 1} are gone)",
                    ),
                )
                continue
            self._state.cursors[sid].active = False
            self._subscribe_request(sid, next_seq, False, "resubscribe")

    def _forget_requests(self, tags: list[Any]) -> None:
        for tag in tags:
            if isinstance(tag, tuple):
                cursor = self._state.cursors.get(tag[1])
                if cursor is not None:
                    cursor.fetching = False

    def _after_pump(self) -> None:
        now = time.monotonic()
        self._state.on_tick(now)
        self._send_pending(now, force=False)

    def _send_pending(self, now: float, force: bool = False) -> None:
        for sid in self._state.take_completed():
            # Its end (or error) is in: stop listening, stop gating its buffer.
            self._sub.unsubscribe(frames.topic(sid))
            self._request("unsubscribe", {"stream": sid}, ("unsubscribed", sid))
        for fetch in self._state.take_fetches():
            args = {"stream": fetch.stream_id, "from_seq": fetch.from_seq}
            self._request("fetch", args, ("fetch", fetch.stream_id))
        flat = self._state.acks(now, force)
        if flat:
            self._send_control(frames.encode_control("ack", flat))

    def _finish_subscribe(self, tag: tuple[str, str, bytes]) -> None:
        """The subscribe reply is in: start the cursor, or raise the broker's refusal."""
        _, sid, token = tag
        self._end_marker(sid, token)
        reply = self._replies.pop(tag)
        if reply.error is not None:
            self._state.remove(sid)
            self._sub.unsubscribe(frames.topic(sid))
            raise reply.error
        self._state.on_replay(reply.result, subscribed=True)

    def _drop(self, stream_id: str) -> None:
        cursor = self._state.cursors.get(stream_id)
        self._state.remove(stream_id)
        if cursor is not None and not cursor.retired:
            self._sub.unsubscribe(frames.topic(stream_id))
            self._request("unsubscribe", {"stream": stream_id}, ("unsubscribed", stream_id))

    @property
    def streams(self) -> list[str]:
        """The streams followed and not yet finished."""
        return [sid for sid, c in self._state.cursors.items() if not c.finished]


class Subscription:
    """One stream followed by a :class:`Subscriber`; iterate it for that stream's events."""

    def __init__(self, owner: Subscriber, stream_id: str) -> None:
        self.owner = owner
        self.stream_id = stream_id

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.owner.next_event(self.stream_id)
            if event is None:
                return
            yield event

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event of this stream; None once it ended (see :meth:`Subscriber.next_event`)."""
        return self.owner.next_event(self.stream_id, timeout)


class Subscriber(_SubscriberLogic, SyncIO):
    """Follows streams on a broker; blocking calls, in the caller's thread."""

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.Context[Any] | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        SyncIO.__init__(self, broker, timeout, context, keys)
        self._init_subscriber()
        self._connect()
        self._sub = self._new_socket(zmq.SUB)
        # Connect before any subscription so they reach the broker in call order.
        self._sub.connect(self.handshake.publish)
        self._add_data_socket(self._sub, self._on_publish)

    def subscribe(
        self,
        stream_id: str,
        from_seq: int | None = None,
        *,
        create: bool = False,
        timeout: float | None = None,
    ) -> Subscription:
        """Follow ``stream_id`` from ``from_seq`` (None: the oldest event still buffered).

        Raises :class:`StreamNotFoundError` if there is no such stream (unless
        ``create``), :class:`ReplayUnavailableError` if ``from_seq`` already
        left the buffer, :class:`BrokerUnavailableError` if the broker does not
        answer within ``timeout`` (default: the subscriber's).
        """
        self._check_open()
        validate_stream_id(stream_id)
        tag = self._subscribe_request(stream_id, from_seq, create, "subscribe")
        wait = self.timeout if timeout is None else timeout
        if not self._wait(lambda: tag in self._replies, wait, "subscribe"):
            self._state.remove(stream_id)
            raise self._unavailable(f"subscribe {stream_id!r}")
        self._finish_subscribe(tag)
        return Subscription(self, stream_id)

    def unsubscribe(self, stream_id: str) -> None:
        """Stop following ``stream_id`` (it stops gating that stream's buffer)."""
        self._check_open()
        self._drop(stream_id)

    def next_event(
        self, stream_id: str | None = None, timeout: float | None = None
    ) -> Event | None:
        """The next event (of ``stream_id``, or of any followed stream).

        Returns None once the stream (or every stream) ended; raises
        :class:`TimeoutError` after ``timeout`` seconds without one, and a
        stream's error (say :class:`ReplayUnavailableError`) where it occurs.
        """
        if self._closed:
            self._check_open()
        state = self._state
        deadline = None  # set when first needed: an event already here needs no clock
        while True:
            event = state.next_event(stream_id)
            if event is not None:
                if state.ack_due:
                    flat = state.acks(time.monotonic(), force=False)
                    if flat:
                        self._send_control(frames.encode_control("ack", flat))
                return event
            if state.finished(stream_id):
                self._send_pending(time.monotonic())
                return None
            now = time.monotonic()
            if deadline is None and timeout is not None:
                deadline = now + timeout
            self._send_pending(now)
            step = self._session.heartbeat_interval / 2
            if state.acks_pending():  # wake up in time to send them
                step = min(step, state.ack_interval)
            if deadline is not None:
                if now >= deadline:
                    raise TimeoutError("next_event: timed out")
                step = min(step, deadline - now)
            self._pump(step)
            if self._broker_silent(time.monotonic()):
                raise self._unavailable("heartbeats")

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.next_event()
            if event is None:
                return
            yield event

    def _before_close(self) -> None:
        self._send_pending(time.monotonic(), force=True)  # acknowledge what was taken


class AsyncSubscription:
    """One stream followed by an :class:`AsyncSubscriber`: ``async for`` its events."""

    def __init__(self, owner: AsyncSubscriber, stream_id: str) -> None:
        self.owner = owner
        self.stream_id = stream_id

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.owner.next_event(self.stream_id)
            if event is None:
                return
            yield event

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event of this stream; None once it ended."""
        return await self.owner.next_event(self.stream_id, timeout)


class AsyncSubscriber(_SubscriberLogic, AsyncIO):
    """:class:`Subscriber` for asyncio: ``async with AsyncSubscriber(broker) as sub``."""

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.asyncio.Context | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        AsyncIO.__init__(self, broker, timeout, context, keys)
        self._init_subscriber()

    def _after_connect(self) -> None:
        self._sub = self._new_socket(zmq.SUB)
        self._data_socks.append(self._sub)
        self._sub.connect(self.handshake.publish)
        self._start_reader(self._sub, self._on_publish)

    def _on_tick(self, now: float) -> None:
        self._state.on_tick(now)
        self._send_pending(now, force=False)

    async def subscribe(
        self,
        stream_id: str,
        from_seq: int | None = None,
        *,
        create: bool = False,
        timeout: float | None = None,
    ) -> AsyncSubscription:
        """Follow ``stream_id`` (see :meth:`Subscriber.subscribe`)."""
        self._check_open()
        validate_stream_id(stream_id)
        tag = self._subscribe_request(stream_id, from_seq, create, "subscribe")
        wait = self.timeout if timeout is None else timeout
        if not await self._wait(lambda: tag in self._replies, wait, "subscribe"):
            self._state.remove(stream_id)
            raise self._unavailable(f"subscribe {stream_id!r}")
        self._finish_subscribe(tag)
        return AsyncSubscription(self, stream_id)

    async def unsubscribe(self, stream_id: str) -> None:
        """Stop following ``stream_id``."""
        self._check_open()
        self._drop(stream_id)

    async def next_event(
        self, stream_id: str | None = None, timeout: float | None = None
    ) -> Event | None:
        """The next event (see :meth:`Subscriber.next_event`)."""
        self._check_open()
        state = self._state
        while True:
            event = state.next_event(stream_id)
            if event is not None:
                if state.ack_due:
                    flat = state.acks(time.monotonic(), force=False)
                    if flat:
                        self._send_control(frames.encode_control("ack", flat))
                return event
            self._send_pending(time.monotonic())
            if state.finished(stream_id):
                return None

            def ready() -> bool:
                return state.has_event(stream_id) or state.finished(stream_id)

            if not await self._wait(ready, timeout, "next_event"):
                raise TimeoutError("next_event: timed out")

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            event = await self.next_event()
            if event is None:
                return
            yield event

    def _before_close(self) -> None:
        self._send_pending(time.monotonic(), force=True)  # acknowledge what was taken
