"""Small helpers shared by the sync and asyncio SDK integration tests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import zmq

from zevents import ClientKeys, Event, Subscriber


def texts(n: int, prefix: str = "", start: int = 0) -> list[Event]:
    """``n`` text deltas ``prefix + i`` for i from ``start``."""
    return [Event.text_delta(f"{prefix}{i}") for i in range(start, start + n)]


def text_of(events: Iterable[Event]) -> list[str]:
    """The texts of ``events``, in order."""
    return [e.data["text"] for e in events]


def free_port() -> int:
    """A loopback port nobody listens on (for unreachable-broker tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Follower:
    """A real Subscriber in a thread, following one stream to its end:
    ``events`` so far, ``outcome`` ("ended" or the exception that ended it)."""

    def __init__(self, control: str, stream: str, timeout: float = 5) -> None:
        self.events: list[Event] = []
        self.outcome: object = None
        self._sub = Subscriber(control, timeout=timeout)
        self._following = self._sub.subscribe(stream, create=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._following:
                self.events.append(event)
            self.outcome = "ended"
        except Exception as exc:
            self.outcome = exc
        finally:
            self._sub.close()

    def join(self, timeout: float) -> bool:
        """Wait for the end; whether it came within ``timeout`` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


@contextmanager
def raw_socket(
    ctx: zmq.Context[Any],
    kind: int,
    endpoint: str,
    routing_id: bytes | None = None,
    keys: ClientKeys | None = None,
) -> Iterator[zmq.Socket[Any]]:
    """A plain pyzmq socket connected to ``endpoint`` (CURVE with ``keys``),
    linger 0, closed on exit."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(linger=0)
