"""The zevents error hierarchy.

Every error zevents raises on purpose derives from :class:`ZEventsError`.
Errors that concern one stream carry its ID and the operation that failed;
their ``str()`` reads ``stream <id>: <op>: <reason>``::

    ZEventsError
    ├── StreamError                    (.stream_id, .op)
    │   ├── StreamClosedError          op "access"      STREAM_CLOSED
    │   ├── StreamNotFoundError        op "lookup"      STREAM_NOT_FOUND
    │   ├── StreamFullError            op "send"        STREAM_FULL      (.buffer_size)
    │   ├── StreamExistsError          op "create"      STREAM_EXISTS
    │   └── ReplayUnavailableError     op "replay"      SEQ_UNAVAILABLE
    │                                  (.first_missing, .last_missing)
    ├── InvalidEventError (ValueError)                  INVALID_EVENT
    ├── InvalidStreamIdError (ValueError)               INVALID_STREAM_ID
    ├── ProtocolError                                   PROTOCOL_ERROR
    │   └── VersionMismatchError                        VERSION_MISMATCH
    ├── LimitExceededError             (.limit)         LIMIT_EXCEEDED
    ├── PermissionDeniedError                           PERMISSION_DENIED
    ├── BrokerUnavailableError (ConnectionError)        (local only: never on the wire)
    └── KeyFileError                                    (local only: a CURVE key file)

The right-hand column is the stable wire error code (see ``docs/protocol.md``);
:func:`error_from_wire` and :attr:`ZEventsError.code` map codes and classes
one to one.  Waiting too long raises the builtin :class:`TimeoutError`: we do
not shadow it.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BrokerUnavailableError",
    "InvalidEventError",
    "InvalidStreamIdError",
    "KeyFileError",
    "LimitExceededError",
    "PermissionDeniedError",
    "ProtocolError",
    "ReplayUnavailableError",
    "StreamClosedError",
    "StreamError",
    "StreamExistsError",
    "StreamFullError",
    "StreamNotFoundError",
    "VersionMismatchError",
    "ZEventsError",
    "error_from_wire",
    "is_invalid_event",
    "is_stream_closed",
    "is_stream_full",
    "is_stream_not_found",
]


class ZEventsError(Exception):
    """Base class of every error zevents raises on purpose."""

    #: Stable wire code; ``None`` for errors that never cross the wire.
    code: ClassVar[str | None] = None

    def wire_fields(self) -> dict[str, Any]:
        """The structured fields sent beside the code and message."""
        return {}


class StreamError(ZEventsError):
    """An operation on one stream failed."""

    code = "STREAM_ERROR"
    default_op: ClassVar[str] = "access"
    default_reason: ClassVar[str] = "stream error"

    def __init__(self, stream_id: str, op: str | None = None, reason: str | None = None) -> None:
        self.stream_id = stream_id
        self.op = op if op is not None else self.default_op
        self.reason = reason if reason is not None else self.default_reason
        super().__init__(f"stream {stream_id}: {self.op}: {self.reason}")

    def wire_fields(self) -> dict[str, Any]:
        return {"stream": self.stream_id, "op": self.op}

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stream_id, self.op, self.reason))


class StreamClosedError(StreamError):
    """The stream is closed (and, for receivers, drained)."""

    code = "STREAM_CLOSED"
    default_op = "access"
    default_reason = "stream is closed"


class StreamNotFoundError(StreamError):
    """No stream has this ID."""

    code = "STREAM_NOT_FOUND"
    default_op = "lookup"
    default_reason = "stream not found"


class StreamExistsError(StreamError):
    """A stream with this ID already exists."""

    code = "STREAM_EXISTS"
    default_op = "create"
    default_reason = "stream already exists"


class StreamFullError(StreamError):
    """The stream's buffer is full and its policy is DROP: the event was not taken."""

    code = "STREAM_FULL"
    default_op = "send"

    def __init__(
        self,
        stream_id: str,
        buffer_size: int = 0,
        op: str | None = None,
        reason: str | None = None,
        *,
        dropped: int = 1,
    ) -> None:
        self.buffer_size = buffer_size
        self.dropped = dropped
        if reason is None:
            reason = f"buffer full (size {buffer_size})"
            if dropped > 1:
                reason += f", {dropped} events dropped"
        super().__init__(stream_id, op, reason)

    def wire_fields(self) -> dict[str, Any]:
        return {**super().wire_fields(), "buffer_size": self.buffer_size, "dropped": self.dropped}

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_full,
            (self.stream_id, self.buffer_size, self.op, self.reason, self.dropped),
        )


def _rebuild_full(
    stream_id: str, buffer_size: int, op: str, reason: str, dropped: int
) -> StreamFullError:
    return StreamFullError(stream_id, buffer_size, op, reason, dropped=dropped)


class ReplayUnavailableError(StreamError):
    """Events a subscriber asked for have already left the stream's buffer.

    ``first_missing`` to ``last_missing`` (inclusive) is the range that is gone.
    """

    code = "SEQ_UNAVAILABLE"
    default_op = "replay"

    def __init__(
        self,
        stream_id: str,
        first_missing: int = 0,
        last_missing: int = 0,
        op: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.first_missing = first_missing
        self.last_missing = last_missing
        if reason is None:
            reason = f"events {first_missing}..{last_missing} are no longer buffered"
        super().__init__(stream_id, op, reason)

    def wire_fields(self) -> dict[str, Any]:
        return {
            **super().wire_fields(),
            "first_missing": self.first_missing,
            "last_missing": self.last_missing,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.stream_id, self.first_missing, self.last_missing, self.op, self.reason),
        )


class InvalidEventError(ZEventsError, ValueError):
    """An event (or its encoding) breaks the event model's rules."""

    code = "INVALID_EVENT"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid event: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


class InvalidStreamIdError(ZEventsError, ValueError):
    """A stream ID is not a non-empty str of at most 256 UTF-8 bytes without NUL."""

    code = "INVALID_STREAM_ID"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid stream id: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


class ProtocolError(ZEventsError):
    """A peer sent something the wire protocol does not allow."""

    code = "PROTOCOL_ERROR"


class VersionMismatchError(ProtocolError):
    """The peer speaks a protocol version we do not."""

    code = "VERSION_MISMATCH"


class LimitExceededError(ZEventsError):
    """A request went over one of the broker's limits (``.limit`` names which)."""

    code = "LIMIT_EXCEEDED"

    def __init__(self, message: str, limit: str = "") -> None:
        self.limit = limit
        super().__init__(message)

    def wire_fields(self) -> dict[str, Any]:
        return {"limit": self.limit}

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.limit))


class PermissionDeniedError(ZEventsError):
    """The client's key may not do this."""

    code = "PERMISSION_DENIED"


class KeyFileError(ZEventsError):
    """A CURVE key file is missing, unreadable or not a ZeroMQ certificate."""


class BrokerUnavailableError(ZEventsError, ConnectionError):
    """The broker did not answer in time (not running, wrong endpoint, network down)."""


_BY_CODE: dict[str, type[ZEventsError]] = {
    cls.code: cls
    for cls in (
        StreamError,
        StreamClosedError,
        StreamNotFoundError,
        StreamFullError,
        StreamExistsError,
        ReplayUnavailableError,
        InvalidEventError,
        InvalidStreamIdError,
        ProtocolError,
        VersionMismatchError,
        LimitExceededError,
        PermissionDeniedError,
    )
    if cls.code is not None
}

WIRE_CODES: frozenset[str] = frozenset(_BY_CODE)


def error_from_wire(code: str, message: str, fields: dict[str, Any] | None = None) -> ZEventsError:
    """Rebuild the exception a broker reported as ``code`` with ``message`` and ``fields``.

    Unknown codes become a plain :class:`ProtocolError` so a newer broker
    never crashes an older client.
    """
    f = fields or {}
    cls = _BY_CODE.get(code)
    stream = f.get("stream")
    op = f.get("op")
    try:
        if cls is not None and issubclass(cls, StreamError) and isinstance(stream, str):
            if cls is StreamFullError:
                return StreamFullError(
                    stream, int(f.get("buffer_size", 0)), op, dropped=int(f.get("dropped", 1))
                )
            if cls is ReplayUnavailableError:
                return ReplayUnavailableError(
                    stream, int(f.get("first_missing", 0)), int(f.get("last_missing", 0)), op
                )
            return cls(stream, op, _reason(message, stream, op))
        if cls in (InvalidEventError, InvalidStreamIdError):
            prefix = "invalid event: " if cls is InvalidEventError else "invalid stream id: "
            return cls(message.removeprefix(prefix))
        if cls is LimitExceededError:
            return LimitExceededError(message, str(f.get("limit", "")))
        if cls is not None and not issubclass(cls, StreamError):
            return cls(message)
    except (TypeError, ValueError):
        pass
    return ProtocolError(f"{code}: {message}")


def _reason(message: str, stream: str, op: Any) -> str:
    return message.removeprefix(f"stream {stream}: {op}: ")


def _chain_has(err: BaseException | None, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        todo.append(e.__cause__)
        todo.append(e.__context__)
    return False


def is_stream_closed(err: BaseException | None) -> bool:
    """True if ``err`` or anything on its cause/context chain is a :class:`StreamClosedError`."""
    return _chain_has(err, StreamClosedError)


def is_stream_not_found(err: BaseException | None) -> bool:
    """True if ``err`` or anything on its cause/context chain is a :class:`StreamNotFoundError`."""
    return _chain_has(err, StreamNotFoundError)


def is_stream_full(err: BaseException | None) -> bool:
    """True if ``err`` or anything on its cause/context chain is a :class:`StreamFullError`."""
    return _chain_has(err, StreamFullError)


def is_invalid_event(err: BaseException | None) -> bool:
    """True if ``err`` or anything on its cause/context chain is an :class:`InvalidEventError`."""
    return _chain_has(err, InvalidEventError)
