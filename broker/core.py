"""BrokerCore: the broker's policy, sans I/O.

The runner (:mod:`broker.server`) feeds it what arrives on the three sockets
(:meth:`on_ingest`, :meth:`on_control`, :meth:`on_subscription`), ticks it
(:meth:`on_tick`), and after each round sends what :meth:`flush` returns.
Nothing here touches a socket or blocks, so it can be driven by a test as
easily as by the daemon.

Round structure (why batching never adds latency): the runner drains every
message that is ready, then flushes.  When traffic is quiet a round holds one
message and it goes out at once; when it is busy a round holds many and each
stream's new events leave as one publish frame, each producer's acks as one
message.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

from zevents.errors import (
    InvalidEventError,
    InvalidStreamIdError,
    LimitExceededError,
    PermissionDeniedError,
    ProtocolError,
    StreamClosedError,
    StreamFullError,
    StreamNotFoundError,
    VersionMismatchError,
    ZEventsError,
)
from zevents.ids import validate_stream_id
from zevents.manager import StreamManager
from zevents.protocol import frames
from zevents.protocol.frames import PROTOCOL_VERSION
from zevents.protocol.records import BrokerStats, RemoteStreamInfo
from zevents.stream import BackpressurePolicy

from .auth import Permissions
from .buffer import Budget, StreamBuffer
from .config import BrokerConfig
from .store import StoredStream, StreamWrite, WriteBatch

__all__ = ["BrokerCore", "BrokerStats"]

log = logging.getLogger("zevents.broker")

_LOG_EVERY = 10.0  # seconds between log lines for one kind of bad input
_MARKER_TTL = 30.0  # seconds a subscription marker or pending subscribe is kept
_MAX_HEADS = 512  # lagging streams reported in one heartbeat reply
_LAPSE_TTL = 300.0  # seconds a timed-out subscriber may come back and gate again
_MAX_PENDING = 65536  # subscribe commands waiting for their markers, at most
_MAX_TOKEN = 64  # bytes of a subscribe token (its marker must fit the publish socket's limit)
_RECLAIM_EVERY = 1.0  # seconds between scans of every stream for history to trim (memory cap)
_COMMIT_RETRY = 0.5  # seconds between attempts to commit while the store fails


class BrokerCore:
    """The broker's state machine: streams, subscribers, producers, flow control."""

    def __init__(
        self,
        config: BrokerConfig,
        endpoints: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        permissions: Permissions | None = None,
    ) -> None:
        self.config = config
        # Authorization: None lets every connection do everything (plain mode, or
        # CURVE without a permission file).  With it, every path checks the key.
        self.permissions = permissions
        self._owners: dict[bytes, str] = {}  # client ID -> the key that uses it
        self._user: str | None = None  # the key of the control request being handled
        self.clock = clock
        self.broker_id = secrets.token_hex(8)
        eps = endpoints or {}
        self.endpoints = {
            "control": eps.get("control", config.control),
            "ingest": eps.get("ingest", config.ingest),
            "publish": eps.get("publish", config.publish),
        }
        self.budget = Budget(config.max_buffered_bytes)
        self.durable = config.data_dir is not None  # (see _unstored below)
        self.streams: StreamManager[StreamBuffer] = StreamManager(
            config.buffer_size,
            config.policy,
            # Parked events are published as they park, except with a durable store
            # (nothing is published before it is on disk, and parked events are not).
            factory=lambda sid, size, policy: StreamBuffer(
                sid, size, policy, clock, self.budget, publish_parked=not self.durable
            ),
            clock=clock,
        )
        # BLOCK streams holding events because the memory cap was reached.
        self._mem_blocked: dict[str, StreamBuffer] = {}
        self._reclaim_after = 0.0  # no scan of every stream for memory before this
        self._limit_hits: dict[str, int] = {}  # limit name -> times it refused or held
        # Durability (with a data directory): what changed since the last commit.
        # Until it is committed, flush() holds everything back (acks and publishes).
        self._unstored: dict[str, StreamBuffer] = {}
        self._unstored_removed: list[str] = []
        self._unstored_producers: dict[str, set[bytes]] = {}  # stream -> records to write
        self._cursors_stored: dict[str, float] = {}  # stream -> when its cursors were written
        self._unstored_since = 0.0
        self._commit_hold = 0.0  # after a failed commit, no retry before this
        self._clients: dict[bytes, float] = {}  # client ID -> last heard (clock)
        self._ids: dict[bytes, bytes] = {}  # interned producer client IDs
        self._producing: dict[bytes, set[str]] = {}  # producer -> streams it sent to
        self._subs: dict[bytes, set[str]] = {}  # client ID -> streams it has cursors on
        # Timed-out subscribers: (when, streams); an ack from one re-registers its cursor.
        self._lapsed: dict[bytes, tuple[float, set[str]]] = {}
        self._pending_subs: dict[bytes, tuple[bytes, int, dict[str, Any], float]] = {}
        self._markers: dict[bytes, float] = {}
        self._dirty: dict[str, StreamBuffer] = {}  # streams with unpublished events
        self._acks: dict[bytes, dict[str, int]] = {}  # producer -> stream -> through pseq
        self._ack_since: dict[bytes, float] = {}  # producer -> when its oldest owed ack was
        self._ack_owed: dict[bytes, int] = {}  # producer -> events answered, not yet acked
        self._acks_due: set[bytes] = set()  # producers to ack at the next flush
        self._ack_every = max(config.window // 4, 1)
        self._drops: dict[bytes, dict[str, int]] = {}  # producer -> stream -> dropped
        self._pub: list[bytes] = []
        self._ctl: list[tuple[bytes, bytes]] = []
        self._events_out = 0
        self._dropped = 0
        self._rejected = 0
        self._removed_in = 0  # events_in of streams already removed
        self._bad: dict[str, int] = {}
        self._bad_logged: dict[str, float] = {}
        self._last_tick = clock()
        self._handlers: dict[str, Callable[[bytes, int, dict[str, Any]], Any]] = {
            "hello": self._op_hello,
            "create": self._op_create,
            "get_or_create": self._op_get_or_create,
            "close": self._op_close,
            "info": self._op_info,
            "list": self._op_list,
            "cleanup": self._op_cleanup,
            "stats": self._op_stats,
            "subscribe": self._op_subscribe,
            "unsubscribe": self._op_unsubscribe,
            "fetch": self._op_fetch,
            "bye": self._op_bye,
            "sync": self._op_sync,
            "rebase": self._op_rebase,
        }
        # (producer, stream) -> (pseq asked for, when): one resend request per gap.
        self._resend_asked: dict[tuple[bytes, str], tuple[int, float]] = {}

    # -- output ---------------------------------------------------------------------

    def flush(self) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
        """What to send now: ``(publish frames, [(client ID, control frame)])``.

        With a durable store, nothing while changes wait to be committed: no
        producer hears of an event, and no subscriber sees one, before it is on disk.
        """
        if self.durable and (self._unstored or self._unstored_removed):
            return [], []
        for stream in self._dirty.values():
            self._publish_pending(stream)
        self._dirty.clear()
        # Drops first: a producer must know of them before an ack says it was answered.
        for client, drops in self._drops.items():
            for sid, count in drops.items():
                found = self.streams.find(sid)
                size = found.buffer_size if found is not None else 0
                self._ctl.append((client, frames.encode_control("dropped", sid, count, size)))
        self._drops.clear()
        if self._acks:
            self._flush_acks()
        pub, ctl = self._pub, self._ctl
        self._pub, self._ctl = [], []
        return pub, ctl

    def _flush_acks(self) -> None:
        late = self.clock() - self.config.ack_delay
        due = self._acks_due
        for client in [c for c, since in self._ack_since.items() if c in due or since <= late]:
            flat: list[Any] = []
            for sid, pseq in self._acks.pop(client).items():
                flat.append(sid)
                flat.append(pseq)
            del self._ack_since[client]
            self._ack_owed.pop(client, None)
            self._ctl.append((client, frames.encode_control("ack", self.broker_id, flat)))
        due.clear()

    def _publish_pending(self, stream: StreamBuffer) -> None:
        if not stream.unpublished:
            return
        first, batch = stream.take_unpublished()
        step = self.config.max_batch
        for i in range(0, len(batch), step):
            self._pub.append(frames.encode_events(stream.topic, first + i, batch[i : i + step]))
        self._events_out += len(batch)

    def _send(self, client: bytes, *parts: Any) -> None:
        self._ctl.append((client, frames.encode_control(*parts)))

    def _reply_error(self, client: bytes, req_id: int, exc: ZEventsError) -> None:
        self._send(client, "err", req_id, exc.code or "PROTOCOL_ERROR", str(exc), exc.wire_fields())

    # -- bad input and limits -----------------------------------------------------------

    def _hit(self, limit: str, n: int = 1) -> None:
        self._limit_hits[limit] = self._limit_hits.get(limit, 0) + n

    def bad_input(self, kind: str, exc: BaseException) -> None:
        """Count bad input of ``kind`` and log it, at most once per kind every few seconds."""
        n = self._bad.get(kind, 0) + 1
        self._bad[kind] = n
        now = self.clock()
        if now - self._bad_logged.get(kind, -_LOG_EVERY) >= _LOG_EVERY:
            self._bad_logged[kind] = now
            log.warning("bad %s input (%d so far): %s", kind, n, exc)

    # -- ingest -----------------------------------------------------------------------

    def on_ingest(self, frame: bytes, user: str | None = None) -> None:
        """Take one ingest frame from a producer (``user``: its key's name, with CURVE)."""
        try:
            hdr = frames.decode_ingest_header(frame)
        except ZEventsError as exc:  # no reply address is known: count and log
            self.bad_input("ingest", exc)
            return
        sid = hdr.stream_id
        client = hdr.client_id
        if user is not None and not self._owns(client, user, claim=False):
            return  # another key's client ID: no answer (it would reach that client)
        if not 1 <= hdr.first_pseq <= MAX_PSEQ or hdr.body_start >= len(frame):
            err: ZEventsError = ProtocolError(
                f"stream {sid}: ingest frame needs 1 <= first_pseq <= 2**62 and at least one event"
            )
            self.bad_input("ingest", err)
            self._reply_error(client, 0, err)
            return
        if self.permissions is not None and not self.permissions.allows(user, "produce", sid):
            denied = self._denied(user, "produce", sid)
            count = frames.count_events(frame, hdr.body_start)
            self._nack(client, sid, hdr.first_pseq, hdr.first_pseq + count - 1, denied)
            return
        if len(frame) > self.config.max_message_size:
            err = LimitExceededError(
                f"stream {sid}: ingest message of {len(frame)} bytes is over"
                f" max_message_size {self.config.max_message_size}",
                "max_message_size",
            )
            self.bad_input("oversized", err)
            self._hit("max_message_size")
            self._nack_all(
                client, sid, hdr.first_pseq, frames.count_events(frame, hdr.body_start), err
            )
            return
        raws, errors = frames.decode_batch(frame, hdr.body_start)
        body = len(frame) - hdr.body_start
        if body > self.config.max_event_size:  # only then can one event be too big
            self._check_event_sizes(sid, raws, errors)
        stream = self.streams.find(sid)
        if stream is None:
            if len(errors) == len(raws):
                # Nothing valid: answer it, but garbage does not get to create streams.
                for i, err in errors.items():
                    self._refuse_event(client, sid, hdr.first_pseq + i, err)
                self._ack(client, sid, hdr.first_pseq + len(raws) - 1, len(raws))
                return
            if hdr.first_pseq > 1:  # what came before is missing (section 13): ask first
                self._ask_resend(client, sid, 1)
                return
            try:
                stream = self._create_on_ingest(sid)
            except ZEventsError as exc:
                self._nack_all(client, sid, hdr.first_pseq, len(raws), exc)
                return
        if stream.closed:
            self._nack_all(client, sid, hdr.first_pseq, len(raws), StreamClosedError(sid, "send"))
            return
        # One bytes object per client ID, however many streams remember it (and
        # only for frames that get this far: refused ones leave nothing behind).
        client = self._ids.setdefault(client, client)
        self._ingest_events(stream, client, hdr.first_pseq, raws, errors, body)

    def _ask_resend(self, client: bytes, sid: str, expected: int) -> None:
        """Ask ``client`` to send ``sid`` again from pseq ``expected`` (once a second
        at most: the frames already on their way after the gap ask again too)."""
        key = (client, sid)
        now = self.clock()
        asked = self._resend_asked.get(key)
        if asked is not None and asked[0] == expected and now - asked[1] < 1.0:
            return
        self._resend_asked[key] = (expected, now)
        self._send(client, "resend", sid, expected)

    def _owns(self, client: bytes, user: str, claim: bool = True) -> bool:
        """Whether ``user`` may use the client ID ``client``: the first key to use
        one on the control socket (``claim``) owns it while the broker knows the
        client.  (Ingest only checks: client IDs it made up leave nothing behind.)"""
        owner = self._owners.setdefault(client, user) if claim else self._owners.get(client, user)
        if owner == user:
            return True
        self.bad_input(
            "auth", PermissionDeniedError(f"key {user!r} used the client ID of {owner!r}")
        )
        return False

    def _denied(self, user: str | None, action: str, sid: str) -> PermissionDeniedError:
        self._hit("permissions")
        err = PermissionDeniedError(f"stream {sid}: {action}: key {user!r} may not")
        log.debug("%s", err)
        return err

    def _check_stream_permission(self, kind: str, args: dict[str, Any]) -> None:
        """Raise :class:`PermissionDeniedError` unless the current request's key
        may run command ``kind`` with ``args``."""
        perms = self.permissions
        assert perms is not None
        user = self._user
        actions = _COMMAND_ACTIONS.get(kind)
        if actions is None:  # broker-wide: list (filtered), stats, cleanup
            if kind in ("stats", "cleanup") and not perms.admin_everything(user):
                raise self._denied(user, kind, "*")
            return
        sid = args.get("stream")
        if type(sid) is not str:
            return  # the command refuses it on its own, with a clearer error
        if not any(perms.allows(user, action, sid) for action in actions):
            raise self._denied(user, kind, sid)

    def _check_event_sizes(
        self, sid: str, raws: list[bytes], errors: dict[int, ZEventsError]
    ) -> None:
        limit = self.config.max_event_size
        for i, raw in enumerate(raws):
            if len(raw) > limit and i not in errors:
                self._hit("max_event_size")
                errors[i] = LimitExceededError(
                    f"stream {sid}: event of {len(raw)} bytes is over max_event_size {limit}",
                    "max_event_size",
                )

    def _create_on_ingest(self, sid: str) -> StreamBuffer:
        if self.config.require_create:
            raise StreamNotFoundError(sid, "send", "stream not found (create it first)")
        validate_stream_id(sid)
        self._check_stream_limit()
        return self.streams.create_stream(sid)

    def _check_stream_limit(self) -> None:
        if len(self.streams) >= self.config.max_streams:
            self._hit("max_streams")
            raise LimitExceededError(
                f"broker holds {len(self.streams)} streams, its max_streams", "max_streams"
            )

    def _ingest_events(
        self,
        stream: StreamBuffer,
        client: bytes,
        first: int,
        raws: list[bytes],
        errors: dict[int, ZEventsError],
        body: int,
    ) -> None:
        # Answers: a cumulative ack through the last pseq dealt with here, a nack
        # per refused event.  A parked (BLOCK, full) event is answered when it is
        # admitted, so the cumulative ack must not pass a parked event of this client.
        last = stream.producers.get(client, 0)
        if first > last + 1:
            # Frames of this producer were lost on the way (a dropped connection, a
            # restart): taking this one would make the missing ones look like dups.
            self._ask_resend(client, stream.stream_id, last + 1)
            return
        if self._resend_asked:
            self._resend_asked.pop((client, stream.stream_id), None)
        budget = self.budget
        if not errors and first > last and budget.used + body <= budget.cap:
            # The common case: all new, all valid (and the frame's body is exactly
            # the events, back to back).  Admitted at once unless others wait ahead.
            if stream.parked:
                admitted = through = 0  # behind them, and not past them
            else:
                admitted = stream.admit_batch(raws, body)
                through = first + admitted - 1
            rest = len(raws) - admitted
            if rest:
                self._hit("buffer_size", rest)
                if not self._park_all(stream, client, first + admitted, raws, admitted):
                    for i in range(admitted, len(raws)):
                        through = self._full(stream, client, first + i, raws[i], through)
        else:
            through = self._ingest_slowly(stream, client, first, last, raws, errors)
        end = first + len(raws) - 1
        if end > last:
            if not last:  # this producer's first events here
                self._producing.setdefault(client, set()).add(stream.stream_id)
            stream.producers[client] = end
        stream.touch()
        if stream.unpublished:
            self._dirty[stream.stream_id] = stream
        if self.durable:  # (checked here too: the hot path makes no call without a store)
            self._changed(stream, (client,))
        if through:
            self._ack(client, stream.stream_id, through, len(raws))

    def _ingest_slowly(
        self,
        stream: StreamBuffer,
        client: bytes,
        first: int,
        last: int,
        raws: list[bytes],
        errors: dict[int, ZEventsError],
    ) -> int:
        """Event by event: resends, invalid events, others parked ahead.  Returns
        the pseq the cumulative ack may cover (0: none)."""
        through = 0
        for i, raw in enumerate(raws):
            pseq = first + i
            holding = client in stream.parked_by
            if pseq <= last:  # a resend of something already dealt with
                if not holding:
                    through = pseq
            elif i in errors:
                stream.rejected += 1
                self._refuse_event(client, stream.stream_id, pseq, errors[i])
                if not holding:
                    through = pseq
            elif stream.parked or not stream.has_room():
                self._hit("buffer_size")
                through = self._full(stream, client, pseq, raw, through)
            elif self._fits(stream, len(raw)):
                stream.admit(raw)
                if not holding:
                    through = pseq
            else:
                through = self._full(stream, client, pseq, raw, through, memory=True)
        return through

    def _park_all(
        self, stream: StreamBuffer, client: bytes, pseq: int, raws: list[bytes], start: int
    ) -> bool:
        """Park ``raws[start:]`` (numbered from ``pseq``) in one go, BLOCK only: as
        many as the window and ``max_parked`` allow, the rest refused by one nack
        (one answer for the run, not one per event, so the producer hears of it
        once).  False under DROP, where :meth:`_full` deals with each event."""
        if stream.policy is BackpressurePolicy.DROP:
            return False
        n = len(raws) - start
        room, over = self._park_room(stream, client)
        if room >= n:
            stream.park_batch(client, pseq, raws[start:] if start else raws)
            return True
        if room:
            stream.park_batch(client, pseq, raws[start : start + room])
        self._refuse_parking(stream, client, pseq + room, pseq + n - 1, over)
        return True

    def _refuse_parking(
        self, stream: StreamBuffer, client: bytes, first: int, last: int, over: str
    ) -> None:
        """Nack ``first..last``: parking them would pass the limit ``over``."""
        n = last - first + 1
        stream.rejected += n
        self._rejected += n
        self._hit(over, n)
        self._nack(client, stream.stream_id, first, last, _parked_full(stream, self.config.window))

    def _park_room(self, stream: StreamBuffer, client: bytes) -> tuple[int, str]:
        """How many more of ``client``'s events may park on ``stream``, and the limit
        that bounds it (``"window"`` or ``"max_parked"``)."""
        by_window = self.config.window - stream.parked_by.get(client, 0)
        by_cap = self.config.max_parked - len(stream.parked)
        if by_window <= by_cap:
            return max(by_window, 0), "window"
        return max(by_cap, 0), "max_parked"

    def _fits(self, stream: StreamBuffer, n: int) -> bool:
        """Whether ``n`` more bytes fit under the memory cap, trimming acknowledged
        history (this stream's first, then, at most once a second, every stream's)
        to make them fit."""
        fits = self.budget.fits
        if fits(n):
            return True
        if stream.trim():
            self._changed(stream)
        if fits(n):
            return True
        now = self.clock()
        if now >= self._reclaim_after:
            # A scan of every stream: at most once a second (there may be a million).
            self._reclaim_after = now + _RECLAIM_EVERY
            for _, other in self.streams:
                if other.trim():
                    self._changed(other)
        return fits(n)

    def _full(
        self,
        stream: StreamBuffer,
        client: bytes,
        pseq: int,
        raw: bytes,
        through: int,
        memory: bool = False,
    ) -> int:
        """Event ``pseq`` found the stream full, others waiting or (``memory``) the
        broker's memory cap reached: park, drop or refuse it.  Returns the pseq the
        cumulative ack may now cover."""
        sid = stream.stream_id
        if memory:
            self._hit("max_buffered_bytes")
        if stream.policy is BackpressurePolicy.DROP:
            stream.dropped += 1
            self._dropped += 1
            per = self._drops.setdefault(client, {})
            per[sid] = per.get(sid, 0) + 1
            return through if client in stream.parked_by else pseq
        room, over = self._park_room(stream, client)
        if not room:
            # (The SDK keeps its window: only max_parked, shared, refuses it.)
            self._refuse_parking(stream, client, pseq, pseq, over)
            return through
        stream.park(client, pseq, raw)
        if memory:
            self._mem_blocked[sid] = stream
        return through

    def _ack(self, client: bytes, sid: str, pseq: int, n: int) -> None:
        """Owe ``client`` a cumulative ack through ``pseq`` (``n`` events answered).

        Acks are coalesced: they go once a quarter of a window is owed (so a
        producer never waits on them), when the client asks (``sync``, before
        it waits), or ``config.ack_delay`` after the first one owed.  At a trickle of
        events that is one ack message per few milliseconds instead of one per
        event, which saves every process a wake-up per event.
        """
        per = self._acks.get(client)
        if per is None:
            per = self._acks[client] = {}
            self._ack_since[client] = self.clock()
        if per.get(sid, 0) < pseq:
            per[sid] = pseq
        owed = self._ack_owed.get(client, 0) + n
        self._ack_owed[client] = owed
        if owed >= self._ack_every:
            self._acks_due.add(client)

    def next_deadline(self) -> float | None:
        """When :meth:`flush` (or :meth:`commit_due`) will next have something to do
        on its own (clock time)."""
        deadline = None
        if self._ack_since:
            deadline = min(self._ack_since.values()) + self.config.ack_delay
        if self._unstored or self._unstored_removed:
            due = max(self._unstored_since + self.config.commit_interval, self._commit_hold)
            if deadline is None or due < deadline:
                deadline = due
        return deadline

    def _refuse_event(self, client: bytes, sid: str, pseq: int, err: ZEventsError) -> None:
        """One invalid (or too big) event: counted, logged (rate-limited) and nacked."""
        self._rejected += 1
        if isinstance(err, InvalidEventError):
            self.bad_input("event", err)
        self._nack(client, sid, pseq, pseq, err)

    def _nack(self, client: bytes, sid: str, first: int, last: int, exc: ZEventsError) -> None:
        # A nack answers first..last on its own; it does not move the cumulative ack.
        self._send(client, "nack", sid, first, last, exc.code, str(exc), exc.wire_fields())

    def _nack_all(self, client: bytes, sid: str, first: int, count: int, exc: ZEventsError) -> None:
        """Refuse a whole frame of ``count`` events."""
        self._rejected += count
        last = first + max(count, 1) - 1
        stream = self.streams.find(sid)
        if stream is not None:
            stream.rejected += count
            # Answered, so the producer's next frame follows on with no gap.
            known = stream.producers.get(client, 0)
            if first <= known + 1 <= last:
                client = self._ids.setdefault(client, client)
                stream.producers[client] = last
                if not known:
                    self._producing.setdefault(client, set()).add(sid)
                self._changed(stream, (client,))
        self._nack(client, sid, first, last, exc)

    def _admit_parked(self, stream: StreamBuffer) -> None:
        """Room was made: admit held events, in order, as many as fit, in one batch."""
        latest: dict[bytes, int] = {}
        while stream.parked:
            # Room is counted before admitting; evicting what everyone acked may make more.
            n = self._parked_fit(stream, stream.room())
            items = stream.unpark_batch(n)
            if not items:
                break
            raws = [raw for _, _, raw in items]
            admitted = stream.admit_batch(raws, published=stream.publish_parked)
            # room() counts exactly what admit_batch takes: nothing unparked is left
            # over (it would lose events whose seqs subscribers may have seen).
            assert admitted == len(items)
            for client, pseq, _ in items:
                latest[client] = pseq  # pseqs rise per client: the last one answers all
        if not latest:
            return
        for client, pseq in latest.items():
            self._ack(client, stream.stream_id, pseq, self.config.window)  # wanted: ack now
        self._dirty[stream.stream_id] = stream
        self._changed(stream, latest)

    def _parked_fit(self, stream: StreamBuffer, n: int) -> int:
        """How many of the first ``n`` parked events fit under the memory cap."""
        budget = self.budget
        if n <= 0 or budget.cap - budget.used >= n * self.config.max_event_size:
            return n  # the usual case: plenty of room, no need to count bytes
        size = 0
        k = 0
        for _, _, raw in islice(stream.parked, n):
            if not self._fits(stream, size + len(raw)):
                self._mem_blocked[stream.stream_id] = stream
                break
            size += len(raw)
            k += 1
        return k

    def _retry_blocked(self) -> None:
        """Memory may have been freed: admit what the cap held back."""
        for sid, stream in list(self._mem_blocked.items()):
            del self._mem_blocked[sid]
            if stream.parked and not stream.closed:
                self._admit_parked(stream)

    # -- subscriptions on the publish socket ------------------------------------------

    def on_subscription(self, frame: bytes, user: str | None = None) -> bool:
        """Take one (un)subscription message from the XPUB socket; returns whether
        the runner should put it into effect (the socket is manual: a subscription
        takes effect only for a whole topic, stream ID + NUL, of a stream the key
        may subscribe to; garbage and prefixes that would match several streams
        never reach libzmq's subscription trie, where they would cost memory).

        A subscriber announces each ``subscribe`` command by also subscribing
        to ``0x00 + token``: the SUB socket sends subscriptions in order, so
        when the marker arrives here the stream's topic is already in effect
        and the replay can start with no gap at the seam.
        """
        if not frame or frame[0] > 1:  # neither a subscription nor an unsubscription
            self.bad_input("publish", ProtocolError(f"not a subscription: {frame[:16]!r}"))
            return False
        if len(frame) >= 2 and frame[0] == 1 and frame[1] == 0:
            token = bytes(frame[2:])
            pending = self._pending_subs.pop(token, None)
            if pending is None:
                if len(self._markers) >= _MAX_PENDING:  # nobody asked for them: a flood
                    self.bad_input("publish", ProtocolError("too many markers waiting"))
                    return False
                self._markers[token] = self.clock()
            else:
                client, req_id, args, _ = pending
                self._activate(client, req_id, args)
            return False  # a marker carries nothing to deliver
        if frame[0] == 0:
            return True  # unsubscribing is always allowed
        try:
            if frame[-1:] != b"\x00":
                raise InvalidStreamIdError("a subscription must be a stream ID and a NUL")
            sid = validate_stream_id(frame[1:-1].decode("utf-8"))
        except (UnicodeDecodeError, InvalidStreamIdError) as exc:
            self.bad_input("publish", ProtocolError(f"not a topic: {frame[:40]!r}: {exc}"))
            return False
        if self.permissions is not None and not self.permissions.allows(user, "subscribe", sid):
            self._denied(user, "subscribe", sid)
            return False
        return True

    # -- control ---------------------------------------------------------------------

    def on_control(self, client: bytes, frame: bytes, user: str | None = None) -> None:
        """Take one control message from ``client`` (its ROUTER routing ID; ``user``:
        its key's name, with CURVE)."""
        if user is not None and not self._owns(client, user):
            return
        self._user = user
        self._clients[client] = self.clock()
        try:
            msg = frames.decode_control(frame)
        except ProtocolError as exc:
            self.bad_input("control", exc)
            self._reply_error(client, 0, exc)
            return
        kind = msg[0]
        if kind == "ack":
            self._on_acks(client, msg)
            return
        if kind == "hb":
            self._send(client, "hb", self.broker_id, self._heads(client))
            return
        req_id = msg[1] if len(msg) > 1 and type(msg[1]) is int else 0
        handler = self._handlers.get(kind)
        if handler is None:
            unknown = ProtocolError(f"unknown command {kind!r}")
            self.bad_input("command", unknown)
            self._reply_error(client, req_id, unknown)
            return
        args = msg[2] if len(msg) > 2 else {}
        try:
            if type(args) is not dict:
                raise ProtocolError(f"{kind}: arguments must be a map")
            if self.permissions is not None:
                self._check_stream_permission(kind, args)
            result = handler(client, req_id, args)
        except ZEventsError as exc:
            if isinstance(exc, (ProtocolError, InvalidStreamIdError)):
                self.bad_input("command", exc)
            self._reply_error(client, req_id, exc)
            return
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            err = ProtocolError(f"{kind}: bad arguments: {exc!r}")
            self.bad_input("command", err)
            self._reply_error(client, req_id, err)
            return
        if result is not _DEFERRED:
            self._send(client, "ok", req_id, result)

    def reject_control(self, client: bytes, exc: ProtocolError) -> None:
        """A control message from ``client`` that is not even a message (wrong frame
        count): answered, but no sign of life (a REQ-style peer keeps no cursors)."""
        self.bad_input("control", exc)
        self._reply_error(client, 0, exc)

    def _stream_arg(self, args: dict[str, Any]) -> str:
        sid = args.get("stream")
        return validate_stream_id(sid)

    def _get(self, args: dict[str, Any]) -> StreamBuffer:
        sid = self._stream_arg(args)
        stream = self.streams.find(sid)
        if stream is None:
            raise StreamNotFoundError(sid)
        return stream

    def _info(self, stream: StreamBuffer) -> dict[str, Any]:
        return RemoteStreamInfo(
            stream=stream.stream_id,
            buffer_size=stream.buffer_size,
            policy=str(stream.policy),
            current_load=len(stream.events),
            first_seq=stream.base_seq,
            last_seq=stream.last_seq,
            closed=stream.closed,
            subscribers=len(stream.cursors),
            parked=len(stream.parked),
            events_in=stream.events_in,
            dropped=stream.dropped,
            rejected=stream.rejected,
            idle=round(max(self.clock() - stream.last_activity, 0.0), 3),
        ).to_wire()

    def _op_hello(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        version = args.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"broker speaks protocol version {PROTOCOL_VERSION}, client asked for {version!r}"
            )
        return {
            "version": PROTOCOL_VERSION,
            "broker_id": self.broker_id,
            "control": self.endpoints["control"],
            "ingest": self.endpoints["ingest"],
            "publish": self.endpoints["publish"],
            "limits": self.config.limits(),
        }

    def _create_args(self, args: dict[str, Any]) -> tuple[int | None, BackpressurePolicy | None]:
        size = args.get("buffer_size")
        if size is not None and (type(size) is not int or size < 0):
            raise ProtocolError("buffer_size must be a non-negative int")
        policy = args.get("policy")
        return size or None, BackpressurePolicy.parse(policy) if policy is not None else None

    def _op_create(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        sid = self._stream_arg(args)
        size, policy = self._create_args(args)
        self._check_stream_limit()
        stream = self.streams.create_stream(sid, buffer_size=size, policy=policy)
        self._changed(stream)
        return self._info(stream)

    def _op_get_or_create(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        sid = self._stream_arg(args)
        size, policy = self._create_args(args)
        if sid not in self.streams:
            self._check_stream_limit()
        stream, created = self.streams.get_or_create(sid, buffer_size=size, policy=policy)
        if created:
            self._changed(stream)
        return {**self._info(stream), "created": created}

    def close_stream(self, stream: StreamBuffer) -> None:
        """Close ``stream``: publish what is pending, then the end; tell its producers."""
        stream.close()
        self._publish_pending(stream)
        self._dirty.pop(stream.stream_id, None)
        sid = stream.stream_id
        held = set(stream.parked_by)  # their answered pseqs move on: store them
        if stream.publish_parked:
            # Published already: they are the stream's last events, and acked
            # before the closed notice says where the stream ended.
            latest = {client: pseq for client, pseq, _ in stream.admit_parked_closing()}
            for client, pseq in latest.items():
                self._ack(client, sid, pseq, self.config.window)
            if latest:
                self._flush_acks()
        while stream.parked:  # never admitted: their producers learn it was closed
            client, pseq, _ = stream.unpark()
            stream.rejected += 1
            self._rejected += 1
            self._nack(client, sid, pseq, pseq, StreamClosedError(sid, "send"))
        self._pub.append(frames.encode_end(stream.topic, stream.last_seq))
        for producer in stream.producers:
            self._send(producer, "closed", sid, stream.last_seq)
        self._changed(stream, held)

    def _op_close(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        stream = self._get(args)
        self.close_stream(stream)
        return self._info(stream)

    def _op_info(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        return self._info(self._get(args))

    def _op_list(self, client: bytes, req_id: int, args: dict[str, Any]) -> list[dict[str, Any]]:
        perms, user = self.permissions, self._user
        return [
            self._info(s)
            for sid, s in sorted(self.streams, key=lambda kv: kv[0])
            if perms is None or perms.allows(user, "admin", sid)
        ]

    def _op_cleanup(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        threshold = args.get("threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise ProtocolError("threshold must be a number of seconds")
        return {"removed": self.cleanup(float(threshold))}

    def _op_stats(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        return self.stats().to_wire()

    def _op_subscribe(self, client: bytes, req_id: int, args: dict[str, Any]) -> object:
        sid = self._stream_arg(args)
        token = args.get("token")
        if type(token) is not bytes or not 1 <= len(token) <= _MAX_TOKEN:
            raise ProtocolError(f"subscribe needs a binary token of 1 to {_MAX_TOKEN} bytes")
        if sid not in self.streams:
            if not args.get("create"):
                raise StreamNotFoundError(sid, "subscribe")
            self._check_stream_limit()
            stream, created = self.streams.get_or_create(sid)
            if created:
                self._changed(stream)
        if self._markers.pop(token, None) is not None:
            self._activate(client, req_id, args)
        else:
            if token in self._pending_subs:
                raise ProtocolError("subscribe token already waiting for its marker")
            if len(self._pending_subs) >= _MAX_PENDING:
                self._hit("pending_subscribes")
                raise LimitExceededError(
                    f"stream {sid}: {_MAX_PENDING} subscribe commands wait for their markers",
                    "pending_subscribes",
                )
            # Only what _activate reads: the rest of the map need not wait in memory.
            kept: dict[str, Any] = {k: args[k] for k in ("stream", "from_seq") if k in args}
            self._pending_subs[token] = (client, req_id, kept, self.clock())
        return _DEFERRED

    def _activate(self, client: bytes, req_id: int, args: dict[str, Any]) -> None:
        """Both the command and its marker are in: register the cursor, reply with the replay."""
        try:
            stream = self._get(args)
            from_seq = args.get("from_seq")
            if from_seq is not None and (type(from_seq) is not int or from_seq > MAX_PSEQ):
                raise ProtocolError("from_seq must be an int up to 2**62, or nil")
            limit = self.config.max_subscribers
            if len(stream.cursors) >= limit and client not in stream.cursors:
                self._hit("max_subscribers")
                raise LimitExceededError(
                    f"stream {stream.stream_id}: {len(stream.cursors)} subscribers already,"
                    f" its max_subscribers",
                    "max_subscribers",
                )
            ever = stream.ever_subscribed
            first = stream.add_cursor(client, from_seq)
        except ZEventsError as exc:
            self._reply_error(client, req_id, exc)
            return
        if not ever:
            self._changed(stream)
        if stream.parked:  # a subscriber coming back may move its own cursor on
            self._admit_parked(stream)
        self._subs.setdefault(client, set()).add(stream.stream_id)
        stream.touch()
        self._send(client, "ok", req_id, self._replay(stream, first))

    def _replay(self, stream: StreamBuffer, first: int) -> dict[str, Any]:
        batch = stream.slice(first, self.config.max_batch) if first <= stream.last_seq else []
        self._events_out += len(batch)
        return {
            "stream": stream.stream_id,
            "first_seq": first,
            "events": b"".join(batch),
            "count": len(batch),
            "last_seq": stream.last_seq,
            "closed": stream.closed,
            "buffer_size": stream.buffer_size,
            "policy": str(stream.policy),
        }

    def _op_unsubscribe(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        stream = self._get(args)
        self._drop_cursor(client, stream)
        return {}

    def _drop_cursor(self, client: bytes, stream: StreamBuffer) -> None:
        if stream.remove_cursor(client):
            subs = self._subs.get(client)
            if subs is not None:
                subs.discard(stream.stream_id)
            if stream.parked:
                self._admit_parked(stream)

    def _op_fetch(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        stream = self._get(args)
        from_seq = args.get("from_seq")
        if type(from_seq) is not int or not 1 <= from_seq <= MAX_PSEQ:
            raise ProtocolError("fetch needs 1 <= from_seq <= 2**62")
        stream.check_available(from_seq)
        stream.touch()
        return self._replay(stream, from_seq)

    def _op_sync(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        """A producer is about to wait for answers: ack everything answered so far,
        on every stream it sent to (owed or not: an ack lost on the way is repaired)."""
        for sid in self._producing.get(client, ()):
            stream = self.streams.find(sid)
            if stream is None:
                continue
            through = stream.answered_through(client)
            if through > 0:
                self._ack(client, sid, through, 0)
        if client in self._acks:
            self._acks_due.add(client)
        # A resend request lost on the way (sent before the client reconnected, say)
        # would leave it waiting for acks that cannot come: ask again.
        for (asked, sid), (expected, _) in list(self._resend_asked.items()):
            if asked == client:
                self._resend_asked[(asked, sid)] = (expected, self.clock())
                self._send(client, "resend", sid, expected)
        return {}

    def _op_rebase(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        """A producer answers ``resend``: everything of its own before ``pseq`` was
        answered already (by a broker that lost it); expect ``pseq`` next."""
        sid = self._stream_arg(args)
        pseq = args.get("pseq")
        if type(pseq) is not int or not 1 <= pseq <= MAX_PSEQ:
            raise ProtocolError("rebase needs 1 <= pseq <= 2**62")
        stream = self.streams.find(sid)
        if stream is None:  # as its events would have created it
            stream = self._create_on_ingest(sid)
            self._changed(stream)
        client = self._ids.setdefault(client, client)
        if stream.producers.get(client, 0) < pseq - 1:
            stream.producers[client] = pseq - 1
            self._producing.setdefault(client, set()).add(sid)
            self._changed(stream, (client,))
        return {"next_pseq": stream.producers.get(client, 0) + 1}

    def _op_bye(self, client: bytes, req_id: int, args: dict[str, Any]) -> dict[str, Any]:
        """A client closes: it stops gating at once (no waiting for its timeout)."""
        self.forget_client(client, lapse=False)
        return {}

    def _on_acks(self, client: bytes, msg: list[Any]) -> None:
        flat = msg[1] if len(msg) > 1 else None
        if type(flat) is not list or len(flat) % 2:
            self.bad_input("ack", ProtocolError("ack needs [stream, seq, ...]"))
            return
        find = self.streams.find
        for i in range(0, len(flat), 2):
            sid, seq = flat[i], flat[i + 1]
            if type(sid) is not str or type(seq) is not int:
                self.bad_input("ack", ProtocolError("ack entries are [str, int]"))
                return
            stream = find(sid)
            if stream is None:
                continue
            stream.touch()
            if client not in stream.cursors:
                # Coming back from a timeout re-attaches a cursor: only for a key
                # that may read the stream (a client ID can change hands by then).
                if self.permissions is None or self.permissions.allows(
                    self._user, "subscribe", sid
                ):
                    self._relapse(client, stream, seq)
                continue
            if stream.ack(client, seq) and stream.parked:
                self._admit_parked(stream)
        if self._mem_blocked:  # acknowledged history may now be trimmed for them
            self._retry_blocked()

    def _relapse(self, client: bytes, stream: StreamBuffer, seq: int) -> None:
        """A subscriber we had timed out acks again: it gates the buffer again from
        what it acknowledged, if that is still buffered.  (An ack for a stream the
        client unsubscribed from is just late, and ignored.)"""
        lapsed = self._lapsed.get(client)
        sid = stream.stream_id
        if lapsed is None or sid not in lapsed[1] or seq < stream.base_seq - 1:
            return
        lapsed[1].discard(sid)
        if not lapsed[1]:
            del self._lapsed[client]
        stream.add_cursor(client, min(seq, stream.last_seq) + 1)
        self._subs.setdefault(client, set()).add(sid)

    def _heads(self, client: bytes) -> list[list[Any]]:
        heads: list[list[Any]] = []
        for sid in self._subs.get(client, ()):
            stream = self.streams.find(sid)
            if stream is not None and stream.lagging(client):
                heads.append([sid, stream.last_seq, stream.closed])
                if len(heads) >= _MAX_HEADS:
                    break
        return heads

    # -- time -----------------------------------------------------------------------

    def on_tick(self) -> None:
        """Expire silent clients, idle streams and stale subscription handshakes."""
        now = self.clock()
        self._last_tick = now
        dead_after = now - self.config.subscriber_timeout
        for client in [c for c, seen in self._clients.items() if seen < dead_after]:
            self.forget_client(client)
        stale = now - _MARKER_TTL
        for token in [t for t, seen in self._markers.items() if seen < stale]:
            del self._markers[token]
        if self._resend_asked:
            old = now - _MARKER_TTL
            for key in [k for k, (_, when) in self._resend_asked.items() if when < old]:
                del self._resend_asked[key]
        lapse_end = now - _LAPSE_TTL
        for client in [c for c, (when, _) in self._lapsed.items() if when < lapse_end]:
            del self._lapsed[client]
            if client not in self._clients:
                self._owners.pop(client, None)
        for token, (client, req_id, args, seen) in list(self._pending_subs.items()):
            if seen < stale:
                del self._pending_subs[token]
                err = ProtocolError(
                    f"subscribe {args.get('stream')!r}: the SUB socket's marker never arrived"
                )
                self._reply_error(client, req_id, err)
        if self.config.idle_timeout > 0:
            self._expire_idle(self.config.idle_timeout)
        if self._mem_blocked:
            self._retry_blocked()

    def forget_client(self, client: bytes, lapse: bool = True) -> None:
        """A client went silent (or said bye): it stops gating every stream it
        subscribed to.  A silent one may come back by acking (``lapse``)."""
        self._clients.pop(client, None)
        sids = self._subs.pop(client, set())
        if not (sids and lapse):  # a lapsed subscriber keeps its ID while it may come back
            self._owners.pop(client, None)
        for sid in sids:
            stream = self.streams.find(sid)
            if stream is not None:
                self._drop_cursor(client, stream)
        if sids and lapse:
            self._lapsed[client] = (self.clock(), sids)

    def _expire_idle(self, threshold: float) -> None:
        for sid in self.streams.inactive(threshold):
            stream = self.streams.find(sid)
            if stream is None:
                continue
            if stream.closed:
                self._remove(sid)
            else:
                log.info("closing stream %s: idle for %.0fs", sid, threshold)
                self.close_stream(stream)

    def cleanup(self, threshold: float) -> int:
        """Close and remove streams idle for longer than ``threshold`` seconds; how many."""
        removed = 0
        for sid in self.streams.inactive(threshold):
            stream = self.streams.find(sid)
            if stream is None:
                continue
            if not stream.closed:
                self.close_stream(stream)
            self._remove(sid)
            removed += 1
        if removed and self._mem_blocked:
            self._retry_blocked()
        return removed

    def _remove(self, sid: str) -> None:
        stream = self.streams.remove_stream(sid)
        if stream is None:
            return
        self._removed_in += stream.events_in
        stream.release()
        self._mem_blocked.pop(sid, None)
        if self.durable:
            self._note_unstored()
            self._unstored.pop(sid, None)
            self._unstored_producers.pop(sid, None)
            self._cursors_stored.pop(sid, None)
            self._unstored_removed.append(sid)
        for client in stream.producers:
            producing = self._producing.get(client)
            if producing is not None:
                producing.discard(sid)
                if not producing:
                    del self._producing[client]
                    self._ids.pop(client, None)
        for client in stream.cursors:
            subs = self._subs.get(client)
            if subs is not None:
                subs.discard(sid)
        self._dirty.pop(sid, None)

    def shutdown(self) -> None:
        """Close every open stream so subscribers are told the end.

        A durable broker keeps its streams open instead: they are on disk, and
        its clients resume them when it is back."""
        if self.durable:
            return
        for _, stream in self.streams:
            if not stream.closed:
                self.close_stream(stream)

    # -- durability --------------------------------------------------------------

    def _changed(self, stream: StreamBuffer, producers: Iterable[bytes] = ()) -> None:
        """``stream`` has something the durable store does not (and so have the
        records of ``producers``: only those are written again).  Nothing without
        a store."""
        if not self.durable:
            return
        self._note_unstored()
        sid = stream.stream_id
        self._unstored[sid] = stream
        if producers:
            self._unstored_producers.setdefault(sid, set()).update(producers)

    def _note_unstored(self) -> None:
        if not self._unstored and not self._unstored_removed:
            self._unstored_since = self.clock()  # the first change a commit will take

    def commit_due(self) -> bool:
        """Whether the runner should commit :meth:`take_writes` now: a change has
        waited ``commit_interval``, or a producer is owed acks it waits for."""
        if not self._unstored and not self._unstored_removed:
            return False
        if self._commit_hold and self.clock() < self._commit_hold:
            return False
        return bool(self._acks_due) or (
            self.clock() - self._unstored_since >= self.config.commit_interval
        )

    def take_writes(self) -> WriteBatch:
        """What changed since the last commit (state is unchanged until
        :meth:`on_committed`, so a failed commit can simply be tried again)."""
        batch = WriteBatch(removed=list(self._unstored_removed))
        now = self.clock()
        for stream in self._unstored.values():
            sid = stream.stream_id
            # Cursors are a hint for after a restart (one that lags only keeps a
            # little more): a few are written each time, many at most once a second.
            cursors: list[tuple[bytes, int]] | None = None
            if len(stream.cursors) <= 16 or now - self._cursors_stored.get(sid, -2.0) >= 1.0:
                cursors = list(stream.cursors.items())
            first = max(stream.stored_seq + 1, stream.base_seq)
            last = stream.last_seq
            events = stream.slice(first, last - first + 1) if first <= last else []
            batch.streams.append(
                StreamWrite(
                    stream.stream_id,
                    stream.buffer_size,
                    str(stream.policy),
                    stream.next_seq,
                    stream.base_seq,
                    stream.closed,
                    stream.ever_subscribed,
                    first,
                    events,
                    [
                        (c, stream.answered_through(c))
                        for c in self._unstored_producers.get(sid, ())
                    ],
                    cursors,
                )
            )
        return batch

    def on_commit_failed(self) -> None:
        """The store could not take the batch: try again in a while, not every round."""
        self._commit_hold = self.clock() + _COMMIT_RETRY

    def on_committed(self, batch: WriteBatch) -> None:
        """``batch`` is durable: what waited for it may now be sent."""
        now = self.clock()
        for w in batch.streams:
            stream = self._unstored.pop(w.name, None)
            self._unstored_producers.pop(w.name, None)
            if w.cursors is not None:
                self._cursors_stored[w.name] = now
            if stream is not None:
                stream.stored_seq = w.next_seq - 1
        del self._unstored_removed[: len(batch.removed)]

    def restore(self, stored: list[StoredStream]) -> None:
        """Load the streams a durable store kept (at start, before any traffic)."""
        for s in stored:
            stream = self.streams.create_stream(
                s.name, buffer_size=s.buffer_size, policy=BackpressurePolicy.parse(s.policy)
            )
            stream.restore(s.next_seq - len(s.events), s.next_seq, s.events)
            stream.stored_seq = s.next_seq - 1
            stream.closed = s.closed
            stream.ever_subscribed = s.ever_subscribed
            for client, pseq in s.producers.items():
                client = self._ids.setdefault(client, client)
                stream.producers[client] = pseq
                self._producing.setdefault(client, set()).add(s.name)
            # Subscribers gate again as they did, until they resubscribe (moving
            # their cursor) or stay silent for subscriber_timeout (forgotten).
            now = self.clock()
            for client, seq in s.cursors.items():
                if seq >= stream.base_seq - 1:
                    stream.add_cursor(client, min(seq, stream.last_seq) + 1)
                    self._subs.setdefault(client, set()).add(s.name)
                    self._clients[client] = now

    # -- stats ---------------------------------------------------------------------

    def stats(self) -> BrokerStats:
        """A frozen snapshot of the broker's counters."""
        streams = [s for _, s in self.streams]
        return BrokerStats(
            streams=len(streams),
            open_streams=sum(1 for s in streams if not s.closed),
            subscribers=sum(len(s.cursors) for s in streams),
            clients=len(self._clients),
            events_in=self._removed_in + sum(s.events_in for s in streams),
            events_out=self._events_out,
            dropped=self._dropped,
            rejected=self._rejected,
            parked=sum(len(s.parked) for s in streams),
            bad_input=dict(self._bad),
            limits=dict(self._limit_hits),
            buffered_bytes=self.budget.used,
        )


def _parked_full(stream: StreamBuffer, window: int) -> StreamFullError:
    return StreamFullError(
        stream.stream_id,
        stream.buffer_size,
        "send",
        f"buffer full (size {stream.buffer_size}) and over the window of {window} events"
        " waiting for room",
    )


#: Highest first pseq an ingest frame may carry: leaves room for any batch below 2**64.
MAX_PSEQ = 2**62


_DEFERRED = object()  # a handler that replies later (subscribe waits for its marker)

#: Which permissions let a key run a stream command (any one of them will do).
#: Commands not listed act on no stream (hello, hb, sync, bye: everyone) or on
#: the whole broker (list: filtered to the key's admin prefixes; stats, cleanup:
#: admin of every stream).
_COMMAND_ACTIONS: dict[str, tuple[str, ...]] = {
    "create": ("produce", "admin"),
    "get_or_create": ("produce", "admin"),
    "close": ("produce", "admin"),
    "rebase": ("produce",),
    "info": ("produce", "subscribe", "admin"),
    "subscribe": ("subscribe",),
    "fetch": ("subscribe",),
    "unsubscribe": ("subscribe",),
}
