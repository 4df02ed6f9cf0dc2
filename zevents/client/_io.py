"""The two ways clients move bytes: in the caller's thread, or in asyncio tasks.

Each offers the same three things to the client classes: send a control
frame, wait (with a deadline) until a condition holds while handling whatever
arrives, and connect with a handshake.  The logic they feed lives in
:class:`~zevents.client._base._ClientBase` and the sans-IO protocol objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from ..errors import BrokerUnavailableError
from ..keys import ClientKeys
from ._base import _ClientBase

__all__ = ["AsyncIO", "SyncIO"]

_S = TypeVar("_S", bound="SyncIO")
_A = TypeVar("_A", bound="AsyncIO")


# Plain ints: pyzmq's enum flags cost a Python-level enum operation per test.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _waiting(sock: zmq.Socket[Any]) -> bool:
    """Whether a message is queued on ``sock``.

    Asking is cheaper than a ``recv`` that raises Again (about 1.2 against 3.2
    µs), and at a trickle of events every wake-up would end with one.
    """
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)  # type: ignore[operator]


def _drain(sock: zmq.Socket[Any], handler: Callable[[bytes], None]) -> None:
    """Hand everything queued on ``sock`` to ``handler`` (a bounded number, so one
    busy socket cannot starve the others); the caller knows one is there."""
    recv = sock.recv
    for _ in range(4096):
        try:
            frame = recv(_NOBLOCK)
        except zmq.Again:
            return
        handler(frame)
        if not _waiting(sock):
            return


class SyncIO(_ClientBase):
    """Sockets driven from the caller's thread, during calls.

    A small keepalive thread sends heartbeats while the application is busy
    elsewhere (a paused subscriber still holds its streams back); it shares
    the control socket under ``_io_lock``, which every socket use takes.
    """

    def __init__(
        self,
        broker: str | None,
        timeout: float,
        context: zmq.Context[Any] | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        super().__init__(broker, timeout, keys)
        self._own_ctx = context is None
        self._ctx: zmq.Context[Any] = context or zmq.Context()
        self._ctl = self._ctx.socket(zmq.DEALER)
        self._setup_control(self._ctl)
        self._poller = zmq.Poller()
        self._poller.register(self._ctl, zmq.POLLIN)
        self._data_socks: dict[zmq.Socket[Any], Callable[[bytes], None]] = {}
        self._io_lock = threading.RLock()
        self._stop_keepalive = threading.Event()
        self._keepalive_thread: threading.Thread | None = None

    def _start_keepalive(self) -> None:
        self._keepalive_thread = threading.Thread(
            target=self._keepalive, name="zevents-keepalive", daemon=True
        )
        self._keepalive_thread.start()

    def _keepalive(self) -> None:
        while not self._stop_keepalive.wait(self._session.heartbeat_interval / 2):
            with self._io_lock:
                if self._stop_keepalive.is_set():
                    return
                now = time.monotonic()
                if self._session.heartbeat_due(now):
                    self._send_control(self._session.heartbeat(now))

    def _add_data_socket(self, sock: zmq.Socket[Any], handler: Callable[[bytes], None]) -> None:
        self._data_socks[sock] = handler
        self._poller.register(sock, zmq.POLLIN)

    def _new_socket(self, kind: int) -> zmq.Socket[Any]:
        s: zmq.Socket[Any] = self._ctx.socket(kind)
        self._tune(s)
        return s

    def _send_control(self, frame: bytes) -> None:
        with self._io_lock:
            self._session.sent(time.monotonic())
            try:
                self._ctl.send(frame, zmq.NOBLOCK)
            except zmq.Again:  # no connection to queue on (refused): liveness tells
                pass

    def _connect(self) -> None:
        """Handshake, or :class:`BrokerUnavailableError` within ``timeout``."""
        try:
            self._send_control(self._session.hello(time.monotonic()))
            self._wait(
                lambda: "hello" in self._replies, self.timeout, "the handshake", required=True
            )
            self._take_reply("hello")
        except BrokerUnavailableError as exc:
            refused = self._refused(exc)
            self._close_sockets()
            if refused is exc:
                raise
            raise refused from exc
        except BaseException:
            self._close_sockets()
            raise
        self._close_monitor()
        self._start_keepalive()

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for input, then handle all that is ready."""
        with self._io_lock:
            now = time.monotonic()
            if self._session.heartbeat_due(now):
                self._send_control(self._session.heartbeat(now))
            # Rounded up: rounding down spins on poll(0) below a millisecond.
            ready = self._poller.poll(math.ceil(max(timeout, 0.0) * 1000))
            for sock, _ in ready:
                _drain(sock, self._on_control if sock is self._ctl else self._data_socks[sock])
            self._after_pump()

    def _after_pump(self) -> None:
        pass

    def _wait(
        self,
        pred: Callable[[], bool],
        timeout: float | None,
        what: str,
        *,
        required: bool = False,
    ) -> bool:
        """Handle input until ``pred()`` holds; False at the timeout (None: no timeout).

        Raises :class:`BrokerUnavailableError` if the broker leaves us waiting
        for longer than allowed, or at the timeout when the answer is
        ``required`` (the handshake).
        """
        deadline = _deadline(timeout)
        while not pred():
            step = self._wait_step(deadline, what, required)
            if step is None:
                return False
            self._pump(step)
            self._check_alive(pred, what)
        return True

    # -- lifecycle: the clients override the two hooks, not these ---------------------

    def _before_close(self) -> None:
        """Last words before the sockets close (a subscriber acks what it took)."""

    def _on_clean_exit(self) -> None:
        """What ``with`` does on a clean exit before closing (a producer flushes)."""

    def close(self) -> None:
        """Close the client: tell the broker, close the sockets.  Idempotent."""
        if not self._closed:
            try:
                self._before_close()
            finally:
                self._closed = True
                self._close_sockets()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._on_clean_exit()
        finally:
            self.close()

    def _close_sockets(self) -> None:
        self._stop_keepalive.set()
        if self._keepalive_thread is not None:
            self._keepalive_thread.join(timeout=5)
        with self._io_lock:
            self._bye()
            self._ctl.close(linger=100)  # long enough for the bye to leave
            for sock in self._data_socks:
                sock.close(linger=0)
            self._close_monitor()
        if self._own_ctx:
            self._ctx.term()


class AsyncIO(_ClientBase):
    """Sockets driven by asyncio tasks: a reader per socket and a heartbeat."""

    def __init__(
        self,
        broker: str | None,
        timeout: float,
        context: zmq.asyncio.Context | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        super().__init__(broker, timeout, keys)
        self._own_ctx = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._ctl = self._ctx.socket(zmq.DEALER)
        self._setup_control(self._ctl)
        self._data_socks: list[zmq.asyncio.Socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._task_error: BaseException | None = None  # what ended a reader task

    def _new_socket(self, kind: int) -> zmq.asyncio.Socket:
        s = self._ctx.socket(kind)
        self._tune(s)
        return s

    def _send_control(self, frame: bytes) -> None:
        self._session.sent(time.monotonic())
        try:
            # DEALER: queued at once (never waits at our HWM); with no connection to
            # queue on (the broker refused our key) it is dropped: liveness tells.
            self._ctl.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _notify(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    async def _read(self, sock: zmq.asyncio.Socket, handler: Callable[[bytes], None]) -> None:
        # A sync view of the same socket drains what is queued without a future per message.
        raw: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        try:
            while True:
                frame = await sock.recv()
                handler(frame)
                if _waiting(raw):  # what else is queued, before waking anyone
                    _drain(raw, handler)
                self._after_pump()
                self._notify()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a dead reader must not leave callers waiting
            self._task_error = exc
            self._notify()
            raise

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._session.heartbeat_interval / 2)
            now = time.monotonic()
            if self._session.heartbeat_due(now):
                self._send_control(self._session.heartbeat(now))
            self._on_tick(now)
            self._notify()

    def _on_tick(self, now: float) -> None:
        pass

    def _after_pump(self) -> None:
        pass

    def _start_reader(self, sock: zmq.asyncio.Socket, handler: Callable[[bytes], None]) -> None:
        self._tasks.append(asyncio.ensure_future(self._read(sock, handler)))

    async def _connect(self) -> None:
        self._start_reader(self._ctl, self._on_control)
        try:
            self._send_control(self._session.hello(time.monotonic()))
            await self._wait(
                lambda: "hello" in self._replies, self.timeout, "the handshake", required=True
            )
            self._take_reply("hello")
        except BrokerUnavailableError as exc:
            refused = self._refused(exc)
            await self._close_sockets()
            if refused is exc:
                raise
            raise refused from exc
        except BaseException:
            await self._close_sockets()
            raise
        self._close_monitor()
        self._tasks.append(asyncio.ensure_future(self._heartbeat()))

    async def _wait(
        self,
        pred: Callable[[], bool],
        timeout: float | None,
        what: str,
        *,
        required: bool = False,
    ) -> bool:
        """Await until ``pred()`` holds; False at the timeout (see :meth:`SyncIO._wait`)."""
        deadline = _deadline(timeout)
        while not pred():
            if self._task_error is not None:
                raise self._task_error
            step = self._wait_step(deadline, what, required)
            if step is None:
                return False
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), step)
            self._check_alive(pred, what)
        return True

    # -- lifecycle: the clients override the hooks, not these ------------------------------

    async def connect(self: _A) -> _A:
        """Handshake with the broker; :class:`BrokerUnavailableError` within ``timeout``."""
        await self._connect()
        self._after_connect()
        return self

    def _after_connect(self) -> None:
        """Open the data sockets once the handshake told us where."""

    def _before_close(self) -> None:
        """Last words before the sockets close."""

    async def _on_clean_exit(self) -> None:
        """What ``async with`` does on a clean exit before closing."""

    async def aclose(self) -> None:
        """Close the client: tell the broker, stop the tasks, close the sockets."""
        if not self._closed:
            try:
                self._before_close()
            finally:
                self._closed = True
                await self._close_sockets()

    async def __aenter__(self: _A) -> _A:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                await self._on_clean_exit()
        finally:
            await self.aclose()

    async def _close_sockets(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, BrokerUnavailableError, Exception):
                await task
        self._tasks.clear()
        self._bye()
        self._ctl.close(linger=100)  # long enough for the bye to leave
        for sock in self._data_socks:
            sock.close(linger=0)
        self._close_monitor()
        if self._own_ctx:
            self._ctx.term()
