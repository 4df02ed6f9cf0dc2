"""The broker runner: real ZeroMQ sockets around a :class:`BrokerCore`.

Only I/O lives here: bind, poll, drain what is ready into the core, send what
the core returns.  Run it in the foreground (:meth:`Broker.run`, what
``zevents broker`` does) or in a background thread (:meth:`Broker.start`, for
demos and tests).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from types import TracebackType
from urllib.parse import urlsplit

import zmq

from zevents.errors import ProtocolError

from .config import BrokerConfig
from .core import BrokerCore
from .store import Store, StoreError

__all__ = ["Broker"]

log = logging.getLogger("zevents.broker")

_DRAIN = 2048  # messages taken from one socket per round before the others get a turn
_TICK = 0.1  # seconds between timer passes
_HWM = 100_000
_INGEST_HWM = 1_000
_MAINTAIN = 30.0  # seconds between store maintenance passes


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` is reachable only from this machine."""
    if not endpoint.startswith("tcp://"):
        return True  # ipc:// and inproc:// are local by nature
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a wildcard or an interface name


class Broker:
    """A broker bound to its three endpoints.

    >>> from broker.config import BrokerConfig
    >>> cfg = BrokerConfig(control="tcp://127.0.0.1:0", ingest="tcp://127.0.0.1:0",
    ...                    publish="tcp://127.0.0.1:0")
    >>> with Broker(cfg).start() as b:
    ...     b.endpoints["control"].startswith("tcp://127.0.0.1:")
    True
    """

    def __init__(
        self, config: BrokerConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None
    ) -> None:
        self.config = config
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        maxsize = max(config.max_message_size * 2, 1 << 16)
        self.control = self._socket(zmq.ROUTER, maxsize)
        self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.ingest = self._socket(zmq.PULL, maxsize)
        # Ingest waits in the producers' queues, not ours: a deep queue here only
        # raises the broker's peak memory (the credit window already bounds a stream).
        self.ingest.setsockopt(zmq.RCVHWM, _INGEST_HWM)
        self.publish = self._socket(zmq.XPUB, 1 << 16)
        try:
            self.endpoints = {
                "control": self._bind(self.control, config.control),
                "ingest": self._bind(self.ingest, config.ingest),
                "publish": self._bind(self.publish, config.publish),
            }
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self.core = BrokerCore(config, self.endpoints)
        self.store: Store | None = None
        if config.data_dir is not None:
            try:
                self.store = Store(config.data_dir, config.sync)
                stored = self.store.load()
            except StoreError:
                self._close_sockets()
                raise
            self.core.restore(stored)
            log.info(
                "restored %d streams (%d events) from %s",
                len(stored),
                sum(len(s.events) for s in stored),
                self.store.path,
            )

    def _socket(self, kind: int, maxsize: int) -> zmq.Socket[bytes]:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, _HWM)
        s.setsockopt(zmq.RCVHWM, _HWM)
        s.setsockopt(zmq.MAXMSGSIZE, maxsize)  # refused before allocation
        # ZMTP heartbeats notice a peer that vanished without closing its TCP connection.
        s.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        return s

    @staticmethod
    def _bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            port = sock.bind_to_random_port(endpoint[: -len(":0")])
            return f"{endpoint[: -len(':0')]}:{port}"
        sock.bind(endpoint)
        last = sock.getsockopt(zmq.LAST_ENDPOINT)
        return last.decode() if isinstance(last, bytes) else endpoint

    # -- running --------------------------------------------------------------------

    def run(self) -> None:
        """Serve until :meth:`stop` is called (from a signal handler or another thread)."""
        for name, ep in self.endpoints.items():
            if not is_loopback(ep):
                log.warning("%s endpoint %s is not loopback and traffic is not encrypted", name, ep)
        log.info(
            "zevents broker %s listening: control=%s ingest=%s publish=%s",
            self.core.broker_id,
            self.endpoints["control"],
            self.endpoints["ingest"],
            self.endpoints["publish"],
        )
        try:
            self._loop()
        finally:
            self._shutdown()
            self._done.set()

    def _loop(self) -> None:
        core = self.core
        control, ingest, publish = self.control, self.ingest, self.publish
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(ingest, zmq.POLLIN)
        poller.register(publish, zmq.POLLIN)
        next_tick = time.monotonic() + _TICK
        next_maintain = time.monotonic() + _MAINTAIN
        store = self.store
        noblock = zmq.NOBLOCK
        again = zmq.Again
        while not self._stop.is_set():
            wake = next_tick
            deadline = core.next_deadline()  # owed acks waiting to be coalesced
            if deadline is not None and deadline < wake:
                wake = deadline
            timeout = max(0.0, wake - time.monotonic())
            ready = dict(poller.poll(int(timeout * 1000)))
            if control in ready:
                for _ in range(_DRAIN):
                    try:
                        parts = control.recv_multipart(noblock)
                    except again:
                        break
                    if len(parts) == 2:
                        core.on_control(parts[0], parts[1])
                    else:
                        core.reject_control(
                            parts[0], ProtocolError(f"{len(parts) - 1} frames, expected 1")
                        )
            if ingest in ready:
                recv = ingest.recv
                on_ingest = core.on_ingest
                for _ in range(_DRAIN):
                    try:
                        frame = recv(noblock)
                    except again:
                        break
                    on_ingest(frame)
            if publish in ready:
                for _ in range(_DRAIN):
                    try:
                        core.on_subscription(publish.recv(noblock))
                    except again:
                        break
            now = time.monotonic()
            if now >= next_tick:
                core.on_tick()
                next_tick = now + _TICK
            if store is not None:
                if core.commit_due():
                    self._commit(store)
                if now >= next_maintain:
                    store.maintain()
                    next_maintain = now + _MAINTAIN
            self._send(*core.flush())

    def _commit(self, store: Store) -> bool:
        """One group commit; False (logged, retried next round) if it failed."""
        batch = self.core.take_writes()
        try:
            store.commit(batch)
        except StoreError as exc:
            # Nothing it held is acknowledged or published, so nothing is lost:
            # producers wait (and resend after their timeout) until the disk is back.
            self.core.bad_input("store", exc)
            return False
        self.core.on_committed(batch)
        return True

    def _send(self, pub: list[bytes], ctl: list[tuple[bytes, bytes]]) -> None:
        send = self.publish.send
        for frame in pub:
            send(frame)  # XPUB never blocks: a subscriber over its HWM loses it (and fetches)
        for client, frame in ctl:
            try:
                self.control.send_multipart((client, frame), zmq.NOBLOCK)
            except zmq.Again:  # that client's queue is full: it will resync by heartbeat
                pass

    def _shutdown(self) -> None:
        # Subscribers are told every stream ended, so nothing waits on a dead broker.
        self.core.shutdown()
        if self.store is not None:
            if self._commit(self.store):
                self._send(*self.core.flush())
            self.store.close()
        else:
            self._send(*self.core.flush())
        self.publish.setsockopt(zmq.LINGER, 500)
        self.control.setsockopt(zmq.LINGER, 500)
        self._close_sockets()
        if self._own_ctx:
            self.ctx.term()
        log.info("zevents broker %s stopped", self.core.broker_id)

    def _close_sockets(self) -> None:
        for s in (self.control, self.ingest, self.publish):
            s.close()

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from any thread or a signal handler)."""
        self._stop.set()

    def start(self) -> Broker:
        """Run in a background thread; returns self (use as a context manager)."""
        self._thread = threading.Thread(target=self.run, name="zevents-broker", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Wait for :meth:`run` to finish; True if it did within ``timeout``."""
        return self._done.wait(timeout)

    def __enter__(self) -> Broker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
