"""Session: a client's control-channel state, sans I/O.

It numbers requests and matches replies to them, runs the handshake, decides
when a heartbeat is due and notices when the broker restarted (its ID
changed) or went silent.  Producer, subscriber and admin clients, sync and
asyncio alike, each hold one and only move its bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError, ZEventsError, error_from_wire
from . import frames
from .frames import CLIENT_ID_SIZE, PROTOCOL_VERSION

__all__ = ["Handshake", "Reply", "Session", "new_client_id"]


def new_client_id() -> bytes:
    """A random 16-byte client ID (first byte non-zero: ZeroMQ reserves 0 there)."""
    raw = bytearray(os.urandom(CLIENT_ID_SIZE))
    raw[0] = raw[0] or 1
    return bytes(raw)


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the broker said in its ``hello`` reply."""

    broker_id: str
    ingest: str
    publish: str
    limits: dict[str, Any]

    @property
    def parked_window(self) -> int:
        """How far past a full BLOCK buffer a producer's events are published: its
        window when the broker publishes parked events (memory only), else 0
        (a durable broker, or one that does not say)."""
        if not self.limits.get("publishes_parked"):
            return 0
        return int(self.limits.get("window", 0))


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply matched to its request: ``tag`` is what the caller attached to it."""

    tag: Any
    result: Any
    error: ZEventsError | None


def _connectable(endpoint: str, control: str) -> str:
    """Replace a wildcard host in an advertised endpoint by the control endpoint's host."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wildcard) and control.startswith("tcp://"):
            host = control[len("tcp://") :].rsplit(":", 1)[0]
            return f"tcp://{host}:{endpoint[len(wildcard) :]}"
    return endpoint


class Session:
    """One client's view of its control channel."""

    def __init__(self, control: str, client_id: bytes | None = None) -> None:
        self.control = control
        self.client_id = client_id or new_client_id()
        self.handshake: Handshake | None = None
        self.heartbeat_interval = 1.0
        self._next_req = 1
        self._pending: dict[int, Any] = {}
        self.last_heard = 0.0
        self.last_sent = 0.0
        # When we started waiting for the broker to say anything (None: not waiting).
        self.awaiting_since: float | None = None

    # -- requests -------------------------------------------------------------------

    def request(self, op: str, args: dict[str, Any], tag: Any, now: float) -> bytes:
        """A request frame for ``op``; its reply will carry ``tag``."""
        req_id = self._next_req
        self._next_req += 1
        self._pending[req_id] = tag
        self.last_sent = now
        return frames.encode_control(op, req_id, args)

    def hello(self, now: float) -> bytes:
        """The handshake request (its reply's tag is ``"hello"``)."""
        return self.request("hello", {"version": PROTOCOL_VERSION}, "hello", now)

    def forget_pending(self) -> list[Any]:
        """Drop every unanswered request (the broker restarted); their tags."""
        tags = list(self._pending.values())
        self._pending.clear()
        return tags

    # -- replies --------------------------------------------------------------------

    def on_reply(self, msg: list[Any]) -> Reply | None:
        """Match an ``ok`` or ``err`` message to its request; None if it matches none."""
        req_id = msg[1] if len(msg) > 1 else None
        tag = self._pending.pop(req_id, None) if isinstance(req_id, int) else None
        if tag is None:
            return None
        if msg[0] == "ok":
            result = msg[2] if len(msg) > 2 else None
            if tag == "hello":
                self._on_hello(result)
            return Reply(tag, result, None)
        code = msg[2] if len(msg) > 2 and isinstance(msg[2], str) else "PROTOCOL_ERROR"
        text = msg[3] if len(msg) > 3 and isinstance(msg[3], str) else "error"
        fields = msg[4] if len(msg) > 4 and isinstance(msg[4], dict) else {}
        return Reply(tag, None, error_from_wire(code, text, fields))

    def _on_hello(self, result: Any) -> None:
        try:
            limits = dict(result["limits"])
            handshake = Handshake(
                broker_id=str(result["broker_id"]),
                ingest=_connectable(str(result["ingest"]), self.control),
                publish=_connectable(str(result["publish"]), self.control),
                limits=limits,
            )
            interval = float(limits.get("heartbeat_interval", 1.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed hello reply: {exc!r}") from exc
        self.handshake = handshake
        self.heartbeat_interval = interval

    # -- liveness -------------------------------------------------------------------

    def heard(self, now: float) -> None:
        """Anything arrived from the broker at ``now``."""
        self.last_heard = now
        self.awaiting_since = None

    def sent(self, now: float) -> None:
        """We sent something the broker will answer (a request, events, a heartbeat)."""
        if self.awaiting_since is None:
            self.awaiting_since = now

    def silent(self, now: float, limit: float) -> bool:
        """Whether the broker has left us waiting for more than ``limit`` seconds."""
        return self.awaiting_since is not None and now - self.awaiting_since > limit

    def heartbeat_due(self, now: float) -> bool:
        """Whether we have been quiet long enough that a heartbeat should go."""
        return now - self.last_sent >= self.heartbeat_interval

    def heartbeat(self, now: float) -> bytes:
        """A heartbeat frame."""
        self.last_sent = now
        return frames.encode_control("hb", {})

    def restarted(self, broker_id: object) -> bool:
        """Whether ``broker_id`` (from an ack or heartbeat) shows a new broker process."""
        return (
            self.handshake is not None
            and isinstance(broker_id, str)
            and broker_id != self.handshake.broker_id
        )
