"""What every client shares: the endpoint, the control socket, the session.

The sync classes do their I/O in the caller's thread, during calls; the
asyncio classes run a reader task.  Both hand every control message to
:meth:`_ClientBase._on_control`, which holds the logic.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..errors import BrokerUnavailableError, PermissionDeniedError, ProtocolError, ZEventsError
from ..keys import ClientKeys
from ..protocol import frames
from ..protocol.session import Handshake, Reply, Session

__all__ = ["DEFAULT_BROKER", "DEFAULT_TIMEOUT", "resolve_broker"]

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
#: Seconds a call waits for the broker to answer before BrokerUnavailableError.
DEFAULT_TIMEOUT = 5.0
_HWM = 100_000


def resolve_broker(broker: str | None) -> str:
    """The control endpoint: the argument, else ``$ZEVENTS_BROKER``, else the default."""
    return broker or os.environ.get("ZEVENTS_BROKER") or DEFAULT_BROKER


class _ClientBase:
    """Session bookkeeping and control-message dispatch shared by every client."""

    _closed: bool

    def __init__(self, broker: str | None, timeout: float, keys: ClientKeys | None = None) -> None:
        self.broker = resolve_broker(broker)
        self.timeout = timeout
        # CURVE: the keys given, else $ZEVENTS_CURVE_KEY/$ZEVENTS_CURVE_SERVER, else plain.
        self.keys = keys if keys is not None else ClientKeys.from_env()
        self._auth_monitor: zmq.Socket[Any] | None = None
        self._session = Session(self.broker)
        self._closed = False
        self._replies: dict[Any, Reply] = {}
        self._restart_pending = False

    @property
    def client_id(self) -> bytes:
        """This client's ID (its routing ID on the control socket)."""
        return self._session.client_id

    @property
    def handshake(self) -> Handshake:
        """What the broker said when we connected."""
        hs = self._session.handshake
        if hs is None:
            raise BrokerUnavailableError(f"not connected to {self.broker}")
        return hs

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def _setup_control(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.ROUTING_ID, self._session.client_id)
        self._tune(sock)
        if self.keys is not None:
            # A broker refusing our key just never answers: watch for why.
            self._auth_monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        sock.connect(self.broker)

    def _refused(self, exc: BrokerUnavailableError) -> ZEventsError:
        """What a handshake that got no answer means: the broker refused our key
        (:class:`PermissionDeniedError`) if it said so, else ``exc``."""
        monitor = self._auth_monitor
        if monitor is None:
            return exc
        raw: zmq.Socket[Any] = zmq.Socket.shadow(monitor.underlying)
        try:
            raw.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            # No refusal either: a wrong broker key fails the handshake silently.
            return BrokerUnavailableError(
                f"{exc} (with CURVE: is the broker's public key, --curve-server or"
                " $ZEVENTS_CURVE_SERVER, the right one, and does the broker use CURVE?)"
            )
        return PermissionDeniedError(
            f"the broker at {self.broker} refused this client's CURVE key (is its public key"
            " in the broker's --curve-clients directory?)"
        )

    def _close_monitor(self) -> None:
        if self._auth_monitor is not None:
            self._auth_monitor.close(linger=0)
            self._auth_monitor = None

    def _tune(self, sock: zmq.Socket[Any]) -> None:
        """What every client socket gets before it connects."""
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        if self.keys is not None:
            self.keys.apply(sock)

    # -- incoming -------------------------------------------------------------------

    def _on_control(self, frame: bytes) -> None:
        """Dispatch one control message from the broker."""
        self._session.heard(time.monotonic())
        try:
            msg = frames.decode_control(frame)
        except ProtocolError:
            return  # a broker never sends this; ignore rather than die
        kind = msg[0]
        if kind in ("ok", "err"):
            reply = self._session.on_reply(msg)
            if reply is None:
                return
            if reply.tag == "hello" and self._restart_pending and reply.error is None:
                self._restart_pending = False
                self._on_reconnected()
            self._on_reply(reply)
        elif kind == "hb":
            if len(msg) > 1 and self._session.restarted(msg[1]):
                self._broker_restarted()
            self._on_heartbeat(msg)
        else:
            if kind == "ack" and len(msg) > 1 and self._session.restarted(msg[1]):
                self._broker_restarted()
            self._on_message(msg)

    def _broker_restarted(self) -> None:
        if self._restart_pending:
            return
        self._restart_pending = True
        self._forget_requests(self._session.forget_pending())
        self._send_control(self._session.hello(time.monotonic()))

    # Hooks the concrete clients override.

    def _on_reply(self, reply: Reply) -> None:
        self._replies[reply.tag] = reply

    def _on_heartbeat(self, msg: list[Any]) -> None:
        pass

    def _on_message(self, msg: list[Any]) -> None:
        pass

    def _on_reconnected(self) -> None:
        pass

    def _forget_requests(self, tags: list[Any]) -> None:
        pass

    def _send_control(self, frame: bytes) -> None:
        raise NotImplementedError

    # -- outgoing helpers --------------------------------------------------------------

    def _request(self, op: str, args: dict[str, Any], tag: Any) -> None:
        self._send_control(self._session.request(op, args, tag, time.monotonic()))

    def _take_reply(self, tag: Any) -> Any:
        """The result of a finished request; raises its error."""
        reply = self._replies.pop(tag)
        if reply.error is not None:
            raise reply.error
        return reply.result

    def _unavailable(self, what: str) -> BrokerUnavailableError:
        return BrokerUnavailableError(
            f"broker at {self.broker} did not answer {what} within {self.timeout:g}s"
        )

    def _wait_step(self, deadline: float | None, what: str, required: bool) -> float | None:
        """How long the next wait inside ``_wait`` may be; None once ``deadline``
        passed (or :class:`BrokerUnavailableError` if the answer was ``required``)."""
        step = self._session.heartbeat_interval
        if deadline is None:
            return step
        left = deadline - time.monotonic()
        if left <= 0:
            if required:
                raise self._unavailable(what)
            return None
        return min(step, left)

    def _check_alive(self, pred: Callable[[], bool], what: str) -> None:
        """After a wait: raise if the broker has left us waiting too long.  Judged
        after pumping, so answers queued while we were away count."""
        if not pred() and self._broker_silent(time.monotonic()):
            raise self._unavailable(what)

    def _broker_silent(self, now: float) -> bool:
        """We have waited long enough for the broker to say anything to call it gone."""
        s = self._session
        return s.silent(now, max(self.timeout, 3 * s.heartbeat_interval))

    def _bye(self) -> None:
        """Tell the broker we are leaving (it stops counting on us at once)."""
        if self._session.handshake is not None:
            try:
                self._request("bye", {}, ("bye",))
            except Exception:  # closing anyway: a socket error here changes nothing
                pass
