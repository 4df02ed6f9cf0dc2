"""The event model: what an LLM response is made of, its rules and its encodings.

An :class:`Event` is a type, a data dict and a timestamp.  Building one does
not validate it (so a broken event can exist and be rejected later);
:meth:`Event.validate` applies the rules, and every decoder applies them too.

Encodings (see ``docs/protocol.md``):

* JSON: ``{"type": "Usage", "data": {...}, "timestamp": "<RFC 3339, UTC>"}``.
* msgpack: a map with the same three keys, the timestamp as msgpack's standard
  timestamp extension (type -1), so any language's msgpack library reads it.

>>> e = Event.text_delta("Hello")
>>> Event.from_msgpack(e.to_msgpack()) == e
True
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

import msgpack

from .errors import InvalidEventError

__all__ = ["Event", "EventType", "check_wire_event", "utc_now"]


class EventType(str, Enum):
    """The kinds of event; each value is the name used on the wire."""

    TEXT_DELTA = "TextDelta"
    CONTENT_START = "ContentStart"
    CONTENT_END = "ContentEnd"
    MESSAGE_START = "MessageStart"
    MESSAGE_STOP = "MessageStop"
    ERROR = "Error"
    USAGE = "Usage"
    THINKING = "Thinking"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: object) -> EventType:
        """The member whose wire name is ``name``; :class:`InvalidEventError` if none.

        >>> EventType.parse("Usage")
        <EventType.USAGE: 'Usage'>
        """
        try:
            return _BY_NAME[name]  # type: ignore[index]
        except (KeyError, TypeError):
            raise InvalidEventError(f"unknown event type {name!r}") from None


_BY_NAME: dict[str, EventType] = {t.value: t for t in EventType}

# Each type's own fields: (name, expected type, must be >= 0).  Extra keys are allowed.
_FIELDS: dict[str, tuple[tuple[str, type, bool], ...]] = {
    "TextDelta": (("text", str, False),),
    "ContentStart": (("index", int, True),),
    "ContentEnd": (("index", int, True),),
    "MessageStart": (("message_id", str, False),),
    "MessageStop": (("message_id", str, False), ("stop_reason", str, False)),
    "Error": (("error", str, False),),
    "Usage": (
        ("prompt_tokens", int, True),
        ("completion_tokens", int, True),
        ("total_tokens", int, True),
    ),
    "Thinking": (("thinking", str, False),),
}

#: Event types whose data is one str field, and that field (a text delta's "text").
ONE_STR_FIELD: dict[str, str] = {
    name: fields[0][0]
    for name, fields in _FIELDS.items()
    if len(fields) == 1 and fields[0][1] is str
}

# The same, keyed by member (a str Enum hashes by name, so it cannot share the dict).
_FIELDS_OF: dict[EventType, tuple[tuple[str, type, bool], ...]] = {
    t: _FIELDS[t.value] for t in EventType
}

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


_datetime_now = datetime.now  # the hot factories call it directly (one call less)
_UTC = timezone.utc


def utc_now() -> datetime:
    """Now, as a timezone-aware UTC datetime."""
    return _datetime_now(_UTC)


#: Deepest nesting of lists and dicts allowed in event data.
MAX_DEPTH = 64


def _json_ok(value: Any, depth: int = 0) -> bool:
    """The rule of :func:`_check_value` without the error message: the hot path
    (every event is checked once at the broker) builds no strings."""
    t = type(value)
    if t is str or t is bool or value is None:
        return True
    if t is int:
        return _INT_MIN <= value <= _INT_MAX  # type: ignore[no-any-return]
    if t is float:
        return math.isfinite(value)
    if depth >= MAX_DEPTH:
        return False
    if t is dict:
        for k, v in value.items():
            if type(k) is not str or not _json_ok(v, depth + 1):
                return False
        return True
    if t is list:
        for v in value:
            if not _json_ok(v, depth + 1):
                return False
        return True
    return False


def _check_value(value: Any, path: str, depth: int = 0) -> None:
    # Values must survive JSON and msgpack alike: no bytes, no NaN, no huge ints.
    t = type(value)
    if t is str or t is bool or value is None:
        return
    if t is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidEventError(f"{path}: integer out of 64-bit range")
        return
    if t is float:
        if not math.isfinite(value):
            raise InvalidEventError(f"{path}: {value} is not JSON-compatible")
        return
    if depth >= MAX_DEPTH and (t is dict or t is list):
        raise InvalidEventError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise InvalidEventError(f"{path}: key {k!r} is not a str")
            _check_value(v, f"{path}.{k}", depth + 1)
        return
    if t is list:
        for i, v in enumerate(value):
            _check_value(v, f"{path}[{i}]", depth + 1)
        return
    raise InvalidEventError(f"{path}: {t.__name__} is not JSON-compatible")


def _check_data(type_name: str, data: Any, fields: tuple[tuple[str, type, bool], ...]) -> None:
    if type(data) is dict and len(data) == 1 and len(fields) == 1:
        # The common case (a text delta): one required field and nothing else.
        name, kind, nonneg = fields[0]
        v = data.get(name)
        if type(v) is kind:
            if kind is str:
                return
            low = 0 if nonneg else _INT_MIN
            if low <= v <= _INT_MAX:  # type: ignore[operator]
                return
    if data is None:
        raise InvalidEventError("data cannot be None")
    if type(data) is not dict:
        raise InvalidEventError(f"data must be a dict, not {type(data).__name__}")
    for name, kind, nonneg in fields:
        if name not in data:
            raise InvalidEventError(f"{type_name} needs data[{name!r}]")
        v = data[name]
        if type(v) is not kind:  # exact: bool is not an int here
            raise InvalidEventError(
                f"{type_name} data[{name!r}] must be {kind.__name__}, not {type(v).__name__}"
            )
        if nonneg and v < 0:  # type: ignore[operator]
            raise InvalidEventError(f"{type_name} data[{name!r}] must be >= 0, got {v}")
    if not _json_ok(data):
        _check_value(data, "data")  # raises, saying where


def check_wire_event(obj: Any) -> None:
    """Validate a decoded msgpack event map (decoded with ``timestamp=3``: the
    timestamp extension becomes an aware UTC datetime, anything else stays what it is).

    This is the one check the broker runs on ingest; :meth:`Event.from_msgpack`
    runs it too, so both sides apply the same rules.
    """
    if type(obj) is not dict:
        raise InvalidEventError(f"event must be a map, not {type(obj).__name__}")
    try:
        type_name = obj["type"]
        data = obj["data"]
        ts = obj["timestamp"]
    except KeyError as exc:
        raise InvalidEventError(f"event map lacks {exc.args[0]!r}") from None
    if type(type_name) is not str or type_name not in _FIELDS:
        raise InvalidEventError(f"unknown event type {type_name!r}")
    if type(ts) is not datetime:
        raise InvalidEventError("timestamp must be a msgpack timestamp (ext type -1)")
    _check_data(type_name, data, _FIELDS[type_name])


@dataclass(slots=True)
class Event:
    """One event of an LLM response.

    ``seq`` and ``stream_id`` are set on events received from a broker; they do
    not take part in equality.

    >>> Event.usage(10, 4, 14).data
    {'prompt_tokens': 10, 'completion_tokens': 4, 'total_tokens': 14}
    """

    type: EventType
    data: dict[str, Any]
    timestamp: datetime = field(default_factory=utc_now)
    seq: int | None = field(default=None, compare=False, kw_only=True)
    stream_id: str | None = field(default=None, compare=False, kw_only=True)

    def __post_init__(self) -> None:
        # Events compare by value; a None timestamp means "now", as documented.
        if self.timestamp is None:
            self.timestamp = utc_now()

    __hash__ = None  # type: ignore[assignment]  # mutable data: not hashable

    # -- validation --------------------------------------------------------

    def validate(self) -> None:
        """Raise :class:`InvalidEventError` with a reason if this event breaks a rule."""
        if not isinstance(self.type, EventType):
            raise InvalidEventError(f"type must be an EventType, not {self.type!r}")
        ts = self.timestamp
        if not isinstance(ts, datetime):
            raise InvalidEventError(f"timestamp must be a datetime, not {type(ts).__name__}")
        if ts.tzinfo is None or ts.tzinfo.utcoffset(ts) is None:
            raise InvalidEventError("timestamp must be timezone-aware")
        kind = self.type
        _check_data(kind, self.data, _FIELDS_OF[kind])

    # -- factories ----------------------------------------------------------

    @classmethod
    def new(cls, type: EventType | str, data: dict[str, Any]) -> Event:
        """A validated event of ``type`` (a member or its wire name) stamped now."""
        if not isinstance(type, EventType):
            type = EventType.parse(type)
        event = cls(type, data)
        event.validate()
        return event

    @classmethod
    def _text_event(cls, kind: EventType, key: str, text: str) -> Event:
        # The hot factories: a str makes the event valid by construction, so it is
        # checked alone and the event built without a second, full validation.
        if type(text) is not str:
            raise InvalidEventError(
                f"{kind.value} data[{key!r}] must be str, not {type(text).__name__}"
            )
        event = cls.__new__(cls)
        event.type = kind
        event.data = {key: text}
        event.timestamp = _datetime_now(_UTC)  # utc_now(), inlined
        event.seq = None
        event.stream_id = None
        return event

    @classmethod
    def text_delta(cls, text: str) -> Event:
        """An incremental chunk of answer text."""
        return cls._text_event(EventType.TEXT_DELTA, "text", text)

    @classmethod
    def content_start(cls, index: int) -> Event:
        """The start of content block ``index``."""
        return cls.new(EventType.CONTENT_START, {"index": index})

    @classmethod
    def content_end(cls, index: int) -> Event:
        """The end of content block ``index``."""
        return cls.new(EventType.CONTENT_END, {"index": index})

    @classmethod
    def message_start(cls, message_id: str) -> Event:
        """The start of message ``message_id``."""
        return cls.new(EventType.MESSAGE_START, {"message_id": message_id})

    @classmethod
    def message_stop(cls, message_id: str, stop_reason: str) -> Event:
        """The end of message ``message_id`` and why it stopped (``end_turn``, ...)."""
        return cls.new(
            EventType.MESSAGE_STOP, {"message_id": message_id, "stop_reason": stop_reason}
        )

    @classmethod
    def error(cls, message: str) -> Event:
        """An error reported in the stream (the provider failed, say)."""
        return cls.new(EventType.ERROR, {"error": message})

    @classmethod
    def usage(cls, prompt_tokens: int, completion_tokens: int, total_tokens: int) -> Event:
        """Token usage of the response."""
        return cls.new(
            EventType.USAGE,
            {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": total_tokens,
            },
        )

    @classmethod
    def thinking(cls, text: str) -> Event:
        """A chunk of the model's extended thinking."""
        return cls._text_event(EventType.THINKING, "thinking", text)

    # -- dict and JSON ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """``{"type": <wire name>, "data": ..., "timestamp": <RFC 3339 str>}``."""
        return {
            "type": str(self.type),
            "data": self.data,
            "timestamp": format_timestamp(self.timestamp),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Event:
        """The event described by ``d`` (the shape of :meth:`to_dict`), validated."""
        if not isinstance(d, dict):
            raise InvalidEventError(f"event must be an object, not {type(d).__name__}")
        for key in ("type", "data", "timestamp"):
            if key not in d:
                raise InvalidEventError(f"event lacks {key!r}")
        ts = d["timestamp"]
        if isinstance(ts, str):
            ts = parse_timestamp(ts)
        elif not isinstance(ts, datetime):
            raise InvalidEventError(f"timestamp must be an RFC 3339 string, not {ts!r}")
        event = cls(EventType.parse(d["type"]), d["data"], ts)
        event.validate()
        return event

    def to_json(self) -> str:
        """The event as compact JSON (validated first, like :meth:`to_msgpack`)."""
        self.validate()
        try:
            return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidEventError(f"cannot encode as JSON: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        """Decode :meth:`to_json` output (str or UTF-8 bytes)."""
        try:
            d = json.loads(text)
        except (ValueError, TypeError, RecursionError) as exc:  # incl. JSONDecodeError
            raise InvalidEventError(f"malformed JSON: {exc}") from exc
        return cls.from_dict(d)

    # -- msgpack ------------------------------------------------------------

    def to_msgpack(self) -> bytes:
        """The event as a msgpack map (timestamp as the standard extension type -1)."""
        kind = self.type
        head = _ONE_STR_HEAD.get(kind) if type(kind) is EventType else None
        if head is not None:
            # The hot path (every text delta): one str field and a UTC timestamp
            # are valid as they stand, and the map's fixed parts are pre-encoded.
            data = self.data
            ts = self.timestamp
            if (
                type(data) is dict
                and len(data) == 1
                and type(text := data.get(head[1])) is str
                and type(ts) is datetime
                and ts.tzinfo is _UTC
            ):
                try:
                    pack = _local.packer.pack
                except AttributeError:
                    pack = _packer().pack
                try:
                    return head[0] + pack(text) + _TIMESTAMP_KEY + pack(ts)  # type: ignore[no-any-return]
                except ValueError as exc:  # a lone surrogate is no UTF-8
                    raise InvalidEventError(f"cannot encode as msgpack: {exc}") from exc
        self.validate()
        try:
            # The member is a str (its wire name): msgpack packs it as one, no .value lookup.
            return _pack({"type": self.type, "data": self.data, "timestamp": self.timestamp})
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidEventError(f"cannot encode as msgpack: {exc}") from exc

    @classmethod
    def from_msgpack(cls, payload: bytes) -> Event:
        """Decode :meth:`to_msgpack` output; malformed input raises :class:`InvalidEventError`."""
        obj = unpack_event(payload)
        return cls._from_checked(obj)

    @classmethod
    def _received(
        cls, obj: dict[str, Any], seq: int | None = None, stream_id: str | None = None
    ) -> Event:
        """An event from a checked wire map, built without ``__init__`` (hot path)."""
        event = cls.__new__(cls)
        event.type = _BY_NAME[obj["type"]]
        event.data = obj["data"]
        event.timestamp = obj["timestamp"]
        event.seq = seq
        event.stream_id = stream_id
        return event

    @classmethod
    def _from_checked(cls, obj: dict[str, Any]) -> Event:
        # obj has passed check_wire_event: build without validating again.
        return cls(_BY_NAME[obj["type"]], obj["data"], obj["timestamp"])


_local = threading.local()

# Event types whose data is one str field: (the encoded map up to that field's
# value, the field's name).  Key order is that of to_msgpack's dict.
_ONE_STR_HEAD: dict[EventType, tuple[bytes, str]] = {
    t: (
        b"\x83"
        + msgpack.packb("type")
        + msgpack.packb(t.value)
        + msgpack.packb("data")
        + b"\x81"
        + msgpack.packb(fields[0][0]),
        fields[0][0],
    )
    for t, fields in _FIELDS_OF.items()
    if t.value in ONE_STR_FIELD
}
_TIMESTAMP_KEY: bytes = msgpack.packb("timestamp")


def _packer() -> msgpack.Packer:
    # One Packer per thread: a Packer is not thread-safe, and building one per
    # call costs more than the packing.  datetime=True writes aware datetimes as
    # the timestamp extension (type -1) in C.
    try:
        packer: msgpack.Packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, datetime=True)
    return packer


def _pack(obj: Any) -> bytes:
    return _packer().pack(obj)  # type: ignore[no-any-return]


def unpack_event(payload: bytes) -> dict[str, Any]:
    """Decode and check one msgpack event map; :class:`InvalidEventError` if malformed."""
    try:
        obj = msgpack.unpackb(payload, raw=False, timestamp=3, strict_map_key=True)
    except Exception as exc:  # msgpack raises many kinds; all mean malformed input
        raise InvalidEventError(f"malformed msgpack: {exc}") from exc
    check_wire_event(obj)
    return obj  # type: ignore[no-any-return]


_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)\Z"
)


def format_timestamp(ts: datetime) -> str:
    """RFC 3339 in UTC with microseconds, e.g. ``2026-11-24T07:08:01.123456Z``."""
    t = ts.astimezone(timezone.utc)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        f".{t.microsecond:06d}Z"
    )


def parse_timestamp(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (any offset; digits past microseconds are cut) to UTC."""
    m = _RFC3339.match(text)
    if m is None:
        raise InvalidEventError(f"timestamp {text!r} is not RFC 3339")
    year, month, day, hour, minute, second, frac, off = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        if off in ("Z", "z"):
            tz = timezone.utc
        else:
            sign = 1 if off[0] == "+" else -1
            tz = timezone(sign * timedelta(hours=int(off[1:3]), minutes=int(off[4:6])))
        ts = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tz
        )
        return ts.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:
        raise InvalidEventError(f"timestamp {text!r}: {exc}") from exc
