"""The broker runner: real ZeroMQ sockets around a :class:`BrokerCore`.

Only I/O lives here: bind, poll, drain what is ready into the core, send what
the core returns.  Run it in the foreground (:meth:`Broker.run`, what
``zevents broker`` does) or in a background thread (:meth:`Broker.start`, for
demos and tests).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit

import zmq

from zevents.errors import KeyFileError, PermissionDeniedError, ProtocolError
from zevents.keys import load_public_keys, load_secret_key

from .auth import Permissions, ZapHandler
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
_MAX_SUBSCRIPTION = 300  # bytes (a topic is at most 258); ZeroMQ drops a peer sending more
# Plain ints for the hot path: pyzmq's enum flags cost a Python-level enum
# operation each time they are combined or tested (0.6 µs per test).
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)


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


def _drained(sock: zmq.Socket[bytes]) -> bool:
    """Whether ``sock`` has no message waiting (see ``Broker._drain_control``)."""
    return not sock.getsockopt(_EVENTS) & _POLLIN  # type: ignore[operator]


def _user_of(frame: zmq.Frame) -> str | None:
    """The name of the key a message came with (None if it came with none)."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user if isinstance(user, str) and user else None


def _frame_count_error(parts: list[bytes]) -> ProtocolError:
    return ProtocolError(f"{len(parts) - 1} frames, expected 1")


def _load_security(
    config: BrokerConfig,
) -> tuple[Permissions | None, bytes | None, dict[bytes, str]]:
    """The permission file, the broker's secret key and the authorized client keys
    the config names; :class:`ZEventsError` subclasses if any is missing or bad."""
    if config.curve_secret is None:
        if config.curve_clients is not None or config.permissions is not None:
            raise KeyFileError(
                "--curve-clients and --permissions need --curve-secret (the broker's key)"
            )
        return None, None, {}
    if config.curve_clients is None:
        raise KeyFileError(
            "--curve-secret needs --curve-clients: the public keys of the clients to accept"
        )
    _, secret = load_secret_key(config.curve_secret)
    clients = load_public_keys(config.curve_clients)
    permissions = Permissions.load(config.permissions) if config.permissions else None
    if permissions is not None:
        names = set(clients.values())
        for name in sorted(set(permissions.grants) - names):
            log.warning("permission file names key %r, which is not an authorized client", name)
    return permissions, secret, clients


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
        self.permissions, self._server_key, client_keys = _load_security(config)
        self.zap: ZapHandler | None = None
        self._zap_sock: zmq.Socket[bytes] | None = None
        if self._server_key is not None:
            # The ZAP handler must be bound before the sockets it guards accept anyone.
            self.zap = ZapHandler(client_keys, self._on_denied)
            self._zap_sock = self.ctx.socket(zmq.REP)
            self._zap_sock.setsockopt(zmq.LINGER, 0)
            self._zap_sock.bind("inproc://zeromq.zap.01")
        maxsize = max(config.max_message_size * 2, 1 << 16)
        self.control = self._socket(zmq.ROUTER, maxsize)
        if self._server_key is None:
            # A client reconnecting takes its routing ID over at once.  Not with
            # CURVE: another key knowing that ID could take its answers over too
            # (a reconnecting client waits for the stale connection's heartbeat
            # timeout instead, 6 s at most).
            self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.ingest = self._socket(zmq.PULL, maxsize)
        # Ingest waits in the producers' queues, not ours: a deep queue here only
        # raises the broker's peak memory (the credit window already bounds a stream).
        self.ingest.setsockopt(zmq.RCVHWM, _INGEST_HWM)
        # Subscriptions are at most a topic (258 bytes) or a marker: anything much
        # longer only costs memory in libzmq's subscription trie.
        self.publish = self._socket(zmq.XPUB, _MAX_SUBSCRIPTION)
        # Manual: a subscription takes effect only once the core allowed it.
        self.publish.setsockopt(zmq.XPUB_MANUAL, 1)
        try:
            self.endpoints = {
                "control": self._bind(self.control, config.control),
                "ingest": self._bind(self.ingest, config.ingest),
                "publish": self._bind(self.publish, config.publish),
            }
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self.core = BrokerCore(config, self.endpoints, permissions=self.permissions)
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
        if self._server_key is not None:
            s.setsockopt(zmq.CURVE_SERVER, 1)
            s.setsockopt(zmq.CURVE_SECRETKEY, self._server_key)
            s.setsockopt(zmq.ZAP_DOMAIN, b"zevents")
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
            if not is_loopback(ep) and self._server_key is None:
                log.warning(
                    "%s endpoint %s is not loopback and traffic is neither encrypted nor"
                    " authenticated (give the broker --curve-secret)",
                    name,
                    ep,
                )
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
        control = self.control
        secure = self._server_key is not None
        # (socket, what drains it): with CURVE each message is read with its key's
        # name; the plain ingest drain, the hot path, stays free of that cost.
        drains: list[tuple[zmq.Socket[bytes], Callable[[], None]]] = [
            (self.control, self._drain_control),
            (self.ingest, self._drain_ingest_secure if secure else self._drain_ingest),
            (self.publish, self._drain_publish),
        ]
        if self._zap_sock is not None:
            drains.insert(0, (self._zap_sock, self._drain_zap))
        poller = zmq.Poller()
        for sock, _ in drains:
            poller.register(sock, zmq.POLLIN)
        next_tick = time.monotonic() + _TICK
        next_maintain = time.monotonic() + _MAINTAIN
        store = self.store
        while not self._stop.is_set():
            wake = next_tick
            deadline = core.next_deadline()  # owed acks waiting to be coalesced, a commit
            if deadline is not None and deadline < wake:
                wake = deadline
            # Whole milliseconds, rounded up: rounding down spun on poll(0) for the
            # last millisecond before every deadline.
            timeout_ms = math.ceil(max(0.0, wake - time.monotonic()) * 1000)
            ready = dict(poller.poll(timeout_ms))
            for sock, drain in drains:
                if sock in ready:
                    drain()
                    if sock is control:
                        # What the control messages released (a subscriber's ack
                        # admits parked events) goes out before the ingest backlog.
                        self._send(*core.flush())
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

    # Each drain takes what one socket has ready, up to _DRAIN messages, so the
    # others get their turn, and stops when the socket says nothing is left:
    # asking is cheaper than a recv raising Again (about 1.2 against 3.2 µs), and
    # at a trickle of events every wake-up would end with one.

    def _drain_control(self) -> None:
        control, core = self.control, self.core
        secure = self._server_key is not None  # then read each message with its key
        recv = control.recv
        for _ in range(_DRAIN):
            try:
                # (recv_multipart, by hand: it asks for RCVMORE with an enum per frame)
                received = [recv(_NOBLOCK, copy=False)]
                while received[-1].more:
                    received.append(recv(_NOBLOCK, copy=False))
            except zmq.Again:
                return
            user = _user_of(received[-1]) if secure else None
            parts = [f.bytes for f in received]
            try:
                if len(parts) == 2:
                    core.on_control(parts[0], parts[1], user)
                else:
                    core.reject_control(parts[0], _frame_count_error(parts))
            except Exception as exc:
                self._internal_error(exc)
            if _drained(control):
                return

    def _drain_ingest(self) -> None:
        # The hot path: no per-message branch for CURVE (see _drain_ingest_secure).
        recv, on_ingest, option = self.ingest.recv, self.core.on_ingest, self.ingest.getsockopt
        noblock, again, events, pollin = _NOBLOCK, zmq.Again, _EVENTS, _POLLIN
        for _ in range(_DRAIN):
            try:
                frame = recv(noblock)
            except again:
                return
            try:
                on_ingest(frame)
            except Exception as exc:
                self._internal_error(exc)
            if not option(events) & pollin:  # type: ignore[operator]  # _drained, inlined
                return

    def _drain_ingest_secure(self) -> None:
        ingest, core = self.ingest, self.core
        for _ in range(_DRAIN):
            try:
                frame = ingest.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                core.on_ingest(frame.bytes, _user_of(frame))
            except Exception as exc:
                self._internal_error(exc)
            if _drained(ingest):
                return

    def _drain_publish(self) -> None:
        publish, core = self.publish, self.core
        secure = self._server_key is not None
        for _ in range(_DRAIN):
            try:
                frame = publish.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            try:
                if core.on_subscription(data, _user_of(frame) if secure else None):
                    # XPUB_MANUAL: this applies to the connection the message came from.
                    publish.setsockopt(zmq.SUBSCRIBE if data[0] == 1 else zmq.UNSUBSCRIBE, data[1:])
            except Exception as exc:
                self._internal_error(exc)

    def _drain_zap(self) -> None:
        zap_sock, zap = self._zap_sock, self.zap
        assert zap_sock is not None and zap is not None
        for _ in range(_DRAIN):
            try:
                request = zap_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            zap_sock.send_multipart(zap.handle(request))

    def _internal_error(self, exc: Exception) -> None:
        """A message the core failed on (a bug): counted and logged, and the broker
        goes on with the next one rather than die with every client's streams."""
        self.core.bad_input("internal", exc)
        log.debug("internal error handling a message", exc_info=exc)

    def _on_denied(self, why: str) -> None:
        self.core.bad_input("auth", PermissionDeniedError(why))

    def _commit(self, store: Store) -> bool:
        """One group commit; False (logged, retried next round) if it failed."""
        batch = self.core.take_writes()
        try:
            store.commit(batch)
        except StoreError as exc:
            # Nothing it held is acknowledged or published, so nothing is lost:
            # clients wait (their calls time out) until the disk is back.
            self.core.bad_input("store", exc)
            self.core.on_commit_failed()
            return False
        self.core.on_committed(batch)
        return True

    def _send(self, pub: list[bytes], ctl: list[tuple[bytes, bytes]]) -> None:
        send = self.publish.send
        for frame in pub:
            send(frame)  # XPUB never blocks: a subscriber over its HWM loses it (and fetches)
        send = self.control.send
        for client, frame in ctl:
            try:
                # (send_multipart, by hand: it would combine enum flags per frame)
                send(client, _MORE_NOBLOCK)
                send(frame, _NOBLOCK)  # never Again: a ROUTER message goes whole or not at all
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
        if self._zap_sock is not None:
            self._zap_sock.close()

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
