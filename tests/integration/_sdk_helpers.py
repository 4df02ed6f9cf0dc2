"""Small helpers shared by the sync and asyncio SDK integration tests."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from zevents import Event


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
