"""Wire frames of protocol version 1: pure functions from values to bytes and back.

Three sockets (``docs/protocol.md`` is the contract; keep the two in step):

* ingest, PUSH -> PULL, one frame per message::

      stream_id UTF-8 | 0x00 | client_id (16 bytes) | first_pseq (u64 BE) | event | event | ...

* publish, XPUB -> SUB, one frame per message, topic first so ZeroMQ's prefix
  filter on ``stream_id + 0x00`` matches exactly one stream::

      stream_id UTF-8 | 0x00 | "E" | first_seq (u64 BE) | event | event | ...
      stream_id UTF-8 | 0x00 | "X" | last_seq (u64 BE)            (stream closed)

* control, DEALER <-> ROUTER, one frame per message: a msgpack array whose
  first element names the message (``docs/protocol.md``, sections 7-10).

An ``event`` is one msgpack event map exactly as :meth:`Event.to_msgpack`
writes it; a batch is maps back to back, which every msgpack library can read
as a stream.  Nothing here touches a socket.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgpack

from ..errors import InvalidEventError, InvalidStreamIdError, ProtocolError, ZEventsError
from ..events import ONE_STR_FIELD, check_wire_event
from ..ids import MAX_STREAM_ID_BYTES

__all__ = [
    "CLIENT_ID_SIZE",
    "KIND_END",
    "KIND_EVENTS",
    "PROTOCOL_VERSION",
    "IngestHeader",
    "decode_batch",
    "decode_control",
    "decode_ingest_header",
    "decode_publish",
    "encode_control",
    "encode_end",
    "encode_events",
    "encode_ingest",
    "split_events",
    "topic",
]

PROTOCOL_VERSION = 1
CLIENT_ID_SIZE = 16
KIND_EVENTS = 0x45  # "E"
KIND_END = 0x58  # "X"

_U64 = struct.Struct(">Q")
_INGEST_FIXED = CLIENT_ID_SIZE + 8
# A NUL must appear within this many bytes: a stream ID is at most 256 bytes.
_NUL_WITHIN = MAX_STREAM_ID_BYTES + 1


def topic(stream_id: str) -> bytes:
    """The subscription prefix that matches ``stream_id`` and nothing else."""
    return stream_id.encode("utf-8") + b"\x00"


def _split_topic(frame: bytes) -> tuple[str, int]:
    """``(stream_id, index just past the NUL)``; raises on a bad topic."""
    nul = frame.find(b"\x00", 0, _NUL_WITHIN)
    if nul <= 0:
        raise InvalidStreamIdError("frame does not start with a stream ID and NUL")
    try:
        return frame[:nul].decode("utf-8"), nul + 1
    except UnicodeDecodeError as exc:
        raise InvalidStreamIdError("stream ID is not valid UTF-8") from exc


# -- ingest ----------------------------------------------------------------------


class IngestHeader:
    """The fixed part of an ingest frame; ``body_start`` is where the events begin."""

    __slots__ = ("body_start", "client_id", "first_pseq", "stream_id")

    def __init__(self, stream_id: str, client_id: bytes, first_pseq: int, body_start: int) -> None:
        self.stream_id = stream_id
        self.client_id = client_id
        self.first_pseq = first_pseq
        self.body_start = body_start


def encode_ingest(stream_topic: bytes, client_id: bytes, first_pseq: int, events: bytes) -> bytes:
    """An ingest frame: ``topic(stream)``, the producer's ID, its first pseq, the events."""
    return b"".join((stream_topic, client_id, _U64.pack(first_pseq), events))


def decode_ingest_header(frame: bytes) -> IngestHeader:
    """Parse an ingest frame's header; :class:`ProtocolError` or
    :class:`InvalidStreamIdError` if it is malformed."""
    stream_id, pos = _split_topic(frame)
    if len(frame) < pos + _INGEST_FIXED:
        raise ProtocolError(f"ingest frame for {stream_id!r} is truncated ({len(frame)} bytes)")
    client_id = frame[pos : pos + CLIENT_ID_SIZE]
    (first_pseq,) = _U64.unpack_from(frame, pos + CLIENT_ID_SIZE)
    return IngestHeader(stream_id, client_id, first_pseq, pos + _INGEST_FIXED)


def decode_batch(frame: bytes, start: int) -> tuple[list[bytes], dict[int, ZEventsError]]:
    """Split and check the events of ``frame[start:]``.

    Returns every event's raw bytes, exactly as they arrived (kept, never
    re-encoded), and the errors of the invalid ones by index (usually none).
    A tail that is not a whole msgpack object counts as one last, invalid event.
    """
    raws: list[bytes] = []
    errors: dict[int, ZEventsError] = {}
    append = raws.append
    check = check_wire_event
    one_str = ONE_STR_FIELD
    reused = unpacker = _take_unpacker()
    base = start - unpacker.tell()  # its tell() counts every byte it ever took
    unpacker.feed(memoryview(frame)[start:])
    unpack = unpacker.unpack
    tell = unpacker.tell
    pos = start
    end = len(frame)
    while pos < end:
        try:
            obj = unpack()
        except msgpack.OutOfData:
            reused = None  # it holds the tail: not given back
            errors[len(raws)] = InvalidEventError("truncated msgpack at end of batch")
            append(frame[pos:])
            break
        except Exception as exc:
            reused = None
            # Well-formed msgpack that is no event (a non-str key, a timestamp out
            # of range) costs only itself: skip it with a lenient decoder.
            size = _object_size(frame, pos)
            if size is None:  # not msgpack at all: the rest of the frame is garbage
                errors[len(raws)] = InvalidEventError(f"malformed msgpack: {exc}")
                append(frame[pos:])
                break
            errors[len(raws)] = InvalidEventError(f"not an event: {exc}")
            append(frame[pos : pos + size])
            pos = base = pos + size
            unpacker = _event_unpacker(frame, base)
            unpack = unpacker.unpack
            tell = unpacker.tell
            continue
        nxt = base + tell()
        # The common event (a text delta) is checked inline: its one str field
        # makes it valid whatever else check_wire_event would look at.
        if (
            type(obj) is not dict
            or type(name := obj.get("type")) is not str
            or type(data := obj.get("data")) is not dict
            or len(data) != 1
            or type(data.get(one_str.get(name))) is not str
            or type(obj.get("timestamp")) is not datetime
        ):
            try:
                check(obj)
            except InvalidEventError as exc:
                errors[len(raws)] = exc
        append(frame[pos:nxt])
        pos = nxt
    if reused is not None:
        _local.unpacker = reused  # read to the end: empty, ready for the next frame
    return raws, errors


def count_events(frame: bytes, start: int) -> int:
    """How many events ``frame[start:]`` holds, without decoding them (for frames
    refused whole); a tail that is not a whole object counts as one, and so does
    an empty body."""
    unpacker = msgpack.Unpacker(raw=True, timestamp=0, strict_map_key=False)
    unpacker.feed(memoryview(frame)[start:])
    count = 0
    end = len(frame) - start
    while unpacker.tell() < end:
        try:
            unpacker.skip()
        except Exception:
            return count + 1
        count += 1
    return max(count, 1)


_local = threading.local()


def _take_unpacker() -> msgpack.Unpacker:
    """This thread's event Unpacker (making one per frame costs more than decoding
    a one-event frame).  It is taken out while in use and given back
    (``_local.unpacker = ...``) only once read to the end of a frame, so an
    error of any kind, anywhere, leaves nothing half-read for the next frame."""
    unpacker: msgpack.Unpacker | None = getattr(_local, "unpacker", None)
    if unpacker is None:
        return _new_event_unpacker()
    _local.unpacker = None
    return unpacker


def _new_event_unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, timestamp=3, strict_map_key=True)


def _event_unpacker(frame: bytes, start: int) -> msgpack.Unpacker:
    unpacker = _new_event_unpacker()
    unpacker.feed(memoryview(frame)[start:])
    return unpacker


def _object_size(frame: bytes, pos: int) -> int | None:
    """Bytes taken by the msgpack object at ``pos``, decoded leniently; None if none is."""
    lenient = msgpack.Unpacker(raw=True, timestamp=0, strict_map_key=False)
    lenient.feed(memoryview(frame)[pos:])
    try:
        # unpack, not skip: skip() takes an ext 32 declaring 2**32-1 bytes for 5.
        lenient.unpack()
    except Exception:
        return None
    size: int = lenient.tell()
    return size


# -- publish ---------------------------------------------------------------------


def encode_events(stream_topic: bytes, first_seq: int, events: Iterable[bytes]) -> bytes:
    """A publish (or replay) frame carrying ``events`` numbered from ``first_seq``."""
    return b"".join((stream_topic, b"E", _U64.pack(first_seq), *events))


def encode_end(stream_topic: bytes, last_seq: int) -> bytes:
    """The frame announcing that a stream closed after ``last_seq``."""
    return b"".join((stream_topic, b"X", _U64.pack(last_seq)))


def decode_publish(frame: bytes) -> tuple[str, int, int, int]:
    """``(stream_id, kind, seq, body_start)`` of a publish frame.

    ``seq`` is ``first_seq`` for :data:`KIND_EVENTS` and ``last_seq`` for
    :data:`KIND_END`.
    """
    stream_id, pos = _split_topic(frame)
    if len(frame) < pos + 9:
        raise ProtocolError(f"publish frame for {stream_id!r} is truncated")
    kind = frame[pos]
    if kind not in (KIND_EVENTS, KIND_END):
        raise ProtocolError(f"unknown publish kind {kind:#x} for {stream_id!r}")
    (seq,) = _U64.unpack_from(frame, pos + 1)
    return stream_id, kind, seq, pos + 9


def split_events(payload: bytes | memoryview) -> list[dict[str, Any]]:
    """Decode a batch of events (maps back to back) to their maps.

    The broker has already validated them; a broken batch still raises
    :class:`InvalidEventError`, never a msgpack error.
    """
    unpacker = _take_unpacker()
    try:
        unpacker.feed(payload)
        events = list(unpacker)
        # Iteration stops quietly at a truncated tail, even one inside a list or
        # map (tell() counts it as read): a nil fed after it comes back as None
        # only if nothing was left half-read.
        unpacker.feed(b"\xc0")
        if unpacker.unpack() is not None:
            raise msgpack.OutOfData
    except msgpack.OutOfData:
        raise InvalidEventError("truncated event batch") from None
    except Exception as exc:
        raise InvalidEventError(f"malformed event batch: {exc}") from exc
    _local.unpacker = unpacker
    return events


# -- control ---------------------------------------------------------------------


def encode_control(*parts: Any) -> bytes:
    """A control message: a msgpack array of ``parts``."""
    return msgpack.packb(parts, use_bin_type=True)  # type: ignore[no-any-return]


def decode_control(frame: bytes) -> list[Any]:
    """A control message's parts; :class:`ProtocolError` unless a non-empty array
    starting with a str."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:
        raise ProtocolError(f"control message is not msgpack: {exc}") from exc
    if type(msg) is not list or not msg or type(msg[0]) is not str:
        raise ProtocolError("control message must be an array starting with its kind")
    return msg
