"""Tests for zevents.events: EventType, Event, validation and the JSON/msgpack encodings."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zevents
from zevents.errors import InvalidEventError, ZEventsError
from zevents.events import Event, EventType

UTC = timezone.utc
TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")

WIRE_NAMES = {
    EventType.TEXT_DELTA: "TextDelta",
    EventType.CONTENT_START: "ContentStart",
    EventType.CONTENT_END: "ContentEnd",
    EventType.MESSAGE_START: "MessageStart",
    EventType.MESSAGE_STOP: "MessageStop",
    EventType.ERROR: "Error",
    EventType.USAGE: "Usage",
    EventType.THINKING: "Thinking",
}

# A minimal valid data dict per type.
VALID_DATA: dict[EventType, dict[str, Any]] = {
    EventType.TEXT_DELTA: {"text": "Hello"},
    EventType.CONTENT_START: {"index": 0},
    EventType.CONTENT_END: {"index": 3},
    EventType.MESSAGE_START: {"message_id": "msg_1"},
    EventType.MESSAGE_STOP: {"message_id": "msg_1", "stop_reason": "end_turn"},
    EventType.ERROR: {"error": "boom"},
    EventType.USAGE: {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
    EventType.THINKING: {"thinking": "hmm"},
}
STR_FIELDS = [(t, k) for t, d in VALID_DATA.items() for k, v in d.items() if type(v) is str]
INT_FIELDS = [(t, k) for t, d in VALID_DATA.items() for k, v in d.items() if type(v) is int]
ALL_FIELDS = STR_FIELDS + INT_FIELDS


def _field_id(p: Any) -> str:
    return str(p)


def valid_event(t: EventType = EventType.USAGE, ts: datetime = TS) -> Event:
    return Event(t, dict(VALID_DATA[t]), ts)


def assert_same(a: Any, b: Any) -> None:
    """Equal *and* of the same types all the way down (1 == 1.0 == True in Python)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, float):
        assert a == b
        assert math.copysign(1.0, a) == math.copysign(1.0, b)
    else:
        assert a == b


def pack_map(type_: Any, data: Any, ts: Any) -> bytes:
    return msgpack.packb({"type": type_, "data": data, "timestamp": ts}, use_bin_type=True)


# -- EventType -------------------------------------------------------------------------


def test_event_type_values_are_wire_names() -> None:
    assert {t: t.value for t in EventType} == WIRE_NAMES
    assert len(EventType) == 8


@pytest.mark.parametrize("t", list(EventType), ids=str)
def test_event_type_str_and_parse(t: EventType) -> None:
    assert str(t) == WIRE_NAMES[t]
    assert f"{t}" == WIRE_NAMES[t]
    assert EventType.parse(WIRE_NAMES[t]) is t


def test_str_usage() -> None:
    assert str(EventType.USAGE) == "Usage"
    assert EventType.parse("Usage") is EventType.USAGE


@pytest.mark.parametrize("name", ["Nope", "", "usage", "USAGE", "text_delta", " Usage", None, 5])
def test_event_type_parse_unknown_raises_invalid_event(name: Any) -> None:
    with pytest.raises(InvalidEventError):
        EventType.parse(name)


# -- Event basics ------------------------------------------------------------------------


def test_exported_from_package() -> None:
    assert zevents.Event is Event
    assert zevents.EventType is EventType


@pytest.mark.parametrize("explicit_none", [False, True])
def test_timestamp_defaults_to_aware_utc_now(explicit_none: bool) -> None:
    before = datetime.now(UTC)
    if explicit_none:
        e = Event(EventType.TEXT_DELTA, {"text": "x"}, None)  # type: ignore[arg-type]
    else:
        e = Event(EventType.TEXT_DELTA, {"text": "x"})
    after = datetime.now(UTC)
    assert isinstance(e.timestamp, datetime)
    assert e.timestamp.tzinfo is not None
    assert e.timestamp.utcoffset() == timedelta(0)
    assert before <= e.timestamp <= after


def test_events_compare_by_value() -> None:
    a = Event(EventType.USAGE, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, TS)
    b = Event(EventType.USAGE, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, TS)
    assert a is not b
    assert a == b
    assert (a != b) is False


def test_equal_instants_in_other_zones_compare_equal() -> None:
    other = TS.astimezone(timezone(timedelta(hours=-7)))
    assert valid_event(ts=TS) == valid_event(ts=other)


@pytest.mark.parametrize(
    "other",
    [
        Event(EventType.THINKING, {"thinking": "a"}, TS),
        Event(EventType.TEXT_DELTA, {"text": "b"}, TS),
        Event(EventType.TEXT_DELTA, {"text": "a", "extra": 1}, TS),
        Event(EventType.TEXT_DELTA, {"text": "a"}, TS + timedelta(microseconds=1)),
    ],
    ids=["type", "data", "extra-key", "timestamp"],
)
def test_events_differing_in_one_field_are_not_equal(other: Event) -> None:
    assert Event(EventType.TEXT_DELTA, {"text": "a"}, TS) != other


def test_construction_does_not_validate() -> None:
    broken = [
        Event(EventType.TEXT_DELTA, None),  # type: ignore[arg-type]
        Event(EventType.USAGE, {"prompt_tokens": -1}),
        Event("TextDelta", {"text": "x"}),  # type: ignore[arg-type]
        Event(EventType.TEXT_DELTA, {"text": "x"}, datetime(2024, 1, 1)),
        Event(EventType.TEXT_DELTA, {"text": b"bytes"}),
    ]
    for e in broken:
        with pytest.raises(InvalidEventError):
            e.validate()


@pytest.mark.parametrize("t", list(EventType), ids=str)
def test_minimal_valid_data_validates(t: EventType) -> None:
    assert valid_event(t).validate() is None


# -- factories --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "t", "data"),
    [
        (lambda: Event.text_delta("Hello "), EventType.TEXT_DELTA, {"text": "Hello "}),
        (lambda: Event.content_start(0), EventType.CONTENT_START, {"index": 0}),
        (lambda: Event.content_end(2), EventType.CONTENT_END, {"index": 2}),
        (
            lambda: Event.message_start("msg_123"),
            EventType.MESSAGE_START,
            {"message_id": "msg_123"},
        ),
        (
            lambda: Event.message_stop("msg_123", "end_turn"),
            EventType.MESSAGE_STOP,
            {"message_id": "msg_123", "stop_reason": "end_turn"},
        ),
        (
            lambda: Event.error("Connection timeout"),
            EventType.ERROR,
            {"error": "Connection timeout"},
        ),
        (
            lambda: Event.usage(100, 50, 150),
            EventType.USAGE,
            {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
        ),
        (lambda: Event.thinking("Analyzing..."), EventType.THINKING, {"thinking": "Analyzing..."}),
        (
            lambda: Event.new(EventType.USAGE, {**VALID_DATA[EventType.USAGE], "cached": 3}),
            EventType.USAGE,
            {**VALID_DATA[EventType.USAGE], "cached": 3},
        ),
    ],
    ids=[
        "text_delta",
        "content_start",
        "content_end",
        "message_start",
        "message_stop",
        "error",
        "usage",
        "thinking",
        "new",
    ],
)
def test_factories(make: Any, t: EventType, data: dict[str, Any]) -> None:
    before = datetime.now(UTC)
    e = make()
    after = datetime.now(UTC)
    assert isinstance(e, Event)
    assert e.type is t
    assert_same(e.data, data)
    assert e.timestamp.utcoffset() == timedelta(0)
    assert before <= e.timestamp <= after
    e.validate()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Event.text_delta(5),
        lambda: Event.text_delta(None),
        lambda: Event.content_start(-1),
        lambda: Event.content_start(True),
        lambda: Event.content_start(1.0),
        lambda: Event.content_end("0"),
        lambda: Event.message_start(1),
        lambda: Event.message_stop("m", None),
        lambda: Event.message_stop(None, "end_turn"),
        lambda: Event.error(None),
        lambda: Event.usage(1, -1, 0),
        lambda: Event.usage(1, 2, False),
        lambda: Event.thinking(b"x"),
        lambda: Event.new(EventType.TEXT_DELTA, {}),
        lambda: Event.new(EventType.TEXT_DELTA, None),
        lambda: Event.new("NoSuchType", {"text": "x"}),
    ],
)
def test_factories_validate(make: Any) -> None:
    with pytest.raises(InvalidEventError):
        make()


# -- validation rules ---------------------------------------------------------------------


@pytest.mark.parametrize(("t", "key"), ALL_FIELDS, ids=_field_id)
def test_missing_required_field(t: EventType, key: str) -> None:
    data = dict(VALID_DATA[t])
    del data[key]
    with pytest.raises(InvalidEventError):
        Event(t, data, TS).validate()


@pytest.mark.parametrize(("t", "key"), STR_FIELDS, ids=_field_id)
@pytest.mark.parametrize("bad", [5, None, 1.5, True, b"x", ["x"], {"x": "y"}])
def test_str_field_wrong_type(t: EventType, key: str, bad: Any) -> None:
    with pytest.raises(InvalidEventError):
        Event(t, {**VALID_DATA[t], key: bad}, TS).validate()


@pytest.mark.parametrize(("t", "key"), INT_FIELDS, ids=_field_id)
@pytest.mark.parametrize("bad", ["1", 1.0, None, [1], {"n": 1}])
def test_int_field_wrong_type(t: EventType, key: str, bad: Any) -> None:
    with pytest.raises(InvalidEventError):
        Event(t, {**VALID_DATA[t], key: bad}, TS).validate()


@pytest.mark.parametrize(("t", "key"), INT_FIELDS, ids=_field_id)
@pytest.mark.parametrize("bad", [True, False])
def test_bool_is_not_an_int(t: EventType, key: str, bad: bool) -> None:
    with pytest.raises(InvalidEventError):
        Event(t, {**VALID_DATA[t], key: bad}, TS).validate()


@pytest.mark.parametrize(("t", "key"), INT_FIELDS, ids=_field_id)
@pytest.mark.parametrize("bad", [-1, -(2**40)])
def test_int_field_negative(t: EventType, key: str, bad: int) -> None:
    with pytest.raises(InvalidEventError):
        Event(t, {**VALID_DATA[t], key: bad}, TS).validate()


@pytest.mark.parametrize(("t", "key"), INT_FIELDS, ids=_field_id)
@pytest.mark.parametrize("good", [0, 1, 2**31, 2**53 + 1])
def test_int_field_non_negative_accepted(t: EventType, key: str, good: int) -> None:
    Event(t, {**VALID_DATA[t], key: good}, TS).validate()


@pytest.mark.parametrize(("t", "key"), STR_FIELDS, ids=_field_id)
def test_empty_str_field_accepted(t: EventType, key: str) -> None:
    Event(t, {**VALID_DATA[t], key: ""}, TS).validate()


@pytest.mark.parametrize("t", list(EventType), ids=str)
def test_data_none_is_rejected_with_reason(t: EventType) -> None:
    with pytest.raises(InvalidEventError, match="data cannot be None"):
        Event(t, None, TS).validate()  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [[], ["text"], "text", 5, (("text", "x"),)])
def test_data_must_be_a_dict(data: Any) -> None:
    with pytest.raises(InvalidEventError):
        Event(EventType.TEXT_DELTA, data, TS).validate()


@pytest.mark.parametrize(
    "data",
    [
        {"text": "x", 1: "one"},
        {"text": "x", None: "none"},
        {"text": "x", b"k": "bytes"},
        {"text": "x", ("a",): "tuple"},
        {"text": "x", "nested": {1: "one"}},
        {"text": "x", "nested": [{"ok": 1}, {2: "two"}]},
    ],
    ids=["int", "None", "bytes", "tuple", "nested", "in-list"],
)
def test_non_str_keys_are_rejected(data: dict[Any, Any]) -> None:
    with pytest.raises(InvalidEventError):
        Event(EventType.TEXT_DELTA, data, TS).validate()


@pytest.mark.parametrize(
    "value",
    [
        b"bytes",
        bytearray(b"ba"),
        {1, 2},
        frozenset(),
        float("nan"),
        float("inf"),
        float("-inf"),
        complex(1, 2),
        object(),
        datetime(2024, 1, 1, tzinfo=UTC),
        (1, 2),
        [1, b"nested"],
        {"deep": {"deeper": [float("nan")]}},
        2**64,
        -(2**63) - 1,
    ],
    ids=lambda v: type(v).__name__ + (f"({v!r})" if isinstance(v, (float, int)) else ""),
)
def test_non_json_values_are_rejected(value: Any) -> None:
    with pytest.raises(InvalidEventError):
        Event(EventType.TEXT_DELTA, {"text": "x", "extra": value}, TS).validate()


def test_extra_keys_with_json_values_are_allowed() -> None:
    extra = {
        "none": None,
        "bool": True,
        "int": -5,
        "big": 2**63,
        "float": 1.5,
        "str": "s",
        "list": [1, "a", None, [2.5, {"x": False}]],
        "dict": {"a": {"b": [1, 2, 3]}},
        "empty": {},
    }
    for t in EventType:
        Event(t, {**VALID_DATA[t], **extra}, TS).validate()


def test_naive_timestamp_is_rejected() -> None:
    with pytest.raises(InvalidEventError):
        Event(EventType.TEXT_DELTA, {"text": "x"}, datetime(2024, 1, 1, 12)).validate()


@pytest.mark.parametrize("ts", ["2024-01-01T00:00:00Z", 1700000000.0, 1700000000, object()])
def test_timestamp_must_be_a_datetime(ts: Any) -> None:
    with pytest.raises(InvalidEventError):
        Event(EventType.TEXT_DELTA, {"text": "x"}, ts).validate()


def test_aware_non_utc_timestamp_is_valid() -> None:
    ts = datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=9)))
    Event(EventType.TEXT_DELTA, {"text": "x"}, ts).validate()


@pytest.mark.parametrize("t", ["TextDelta", None, 0, "Nope"])
def test_type_must_be_an_event_type(t: Any) -> None:
    with pytest.raises(InvalidEventError):
        Event(t, {"text": "x"}, TS).validate()


def test_invalid_event_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        Event(EventType.TEXT_DELTA, {}, TS).validate()


@pytest.mark.parametrize(
    "bad",
    [
        Event(EventType.TEXT_DELTA, None),  # type: ignore[arg-type]
        Event(EventType.TEXT_DELTA, {"text": b"x"}),
        Event(EventType.TEXT_DELTA, {"text": "x"}, datetime(2024, 1, 1)),
    ],
    ids=["data-None", "bytes", "naive-timestamp"],
)
def test_encoders_refuse_invalid_events(bad: Event) -> None:
    with pytest.raises(InvalidEventError):
        bad.to_json()
    with pytest.raises(InvalidEventError):
        bad.to_msgpack()


# -- dict and JSON --------------------------------------------------------------------


def test_to_dict() -> None:
    e = Event.usage(100, 50, 150)
    e.timestamp = TS
    d = e.to_dict()
    assert set(d) == {"type", "data", "timestamp"}
    assert d["type"] == "Usage"
    assert type(d["type"]) is str
    assert_same(d["data"], {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150})
    assert isinstance(d["timestamp"], str)
    assert RFC3339_UTC.fullmatch(d["timestamp"])


@pytest.mark.parametrize("t", list(EventType), ids=str)
def test_dict_round_trip(t: EventType) -> None:
    e = valid_event(t)
    back = Event.from_dict(e.to_dict())
    assert back == e
    assert back.type is t


def test_from_dict_survives_json_module() -> None:
    e = valid_event()
    assert Event.from_dict(json.loads(json.dumps(e.to_dict()))) == e


def test_to_json_format() -> None:
    e = Event.usage(100, 50, 150)
    e.timestamp = TS
    text = e.to_json()
    assert isinstance(text, str)
    obj = json.loads(text)
    assert set(obj) == {"type", "data", "timestamp"}
    assert obj["type"] == "Usage"
    assert_same(obj["data"], {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150})
    ts = obj["timestamp"]
    assert RFC3339_UTC.fullmatch(ts), ts
    assert ts.endswith("Z")
    parsed = datetime.fromisoformat(ts[:-1] + "+00:00")
    assert parsed == TS


def test_to_json_converts_other_zones_to_utc() -> None:
    ts = datetime(2024, 5, 6, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    obj = json.loads(Event(EventType.TEXT_DELTA, {"text": "x"}, ts).to_json())
    assert obj["timestamp"].startswith("2024-05-06T06:30:00.123456")
    assert obj["timestamp"].endswith("Z")


@pytest.mark.parametrize("t", list(EventType), ids=str)
def test_json_round_trip_str_and_bytes(t: EventType) -> None:
    e = valid_event(t)
    text = e.to_json()
    for payload in (text, text.encode("utf-8")):
        back = Event.from_json(payload)
        assert back == e
        assert back.type is t
        assert_same(back.data, e.data)
        assert back.timestamp.utcoffset() == timedelta(0)


def test_json_round_trip_keeps_ints_ints_and_floats_floats() -> None:
    e = Event(EventType.TEXT_DELTA, {"text": "x", "i": 1, "f": 1.0, "b": True, "n": None}, TS)
    back = Event.from_json(e.to_json())
    assert_same(back.data, e.data)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-02T03:04:05Z", datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2024-01-02T03:04:05.5Z", datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
        ("2024-01-02T03:04:05.123456Z", datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2024-01-02T05:04:05.000001+02:00", datetime(2024, 1, 2, 3, 4, 5, 1, tzinfo=UTC)),
        ("2024-01-01T23:30:00-04:00", datetime(2024, 1, 2, 3, 30, tzinfo=UTC)),
    ],
)
def test_from_json_accepts_rfc3339_timestamps(text: str, expected: datetime) -> None:
    payload = json.dumps({"type": "TextDelta", "data": {"text": "x"}, "timestamp": text})
    e = Event.from_json(payload)
    assert e.timestamp == expected
    assert e.timestamp.utcoffset() == timedelta(0)


def test_from_json_accepts_go_nanosecond_timestamps() -> None:
    # Go's time.Time marshals as RFC 3339 with up to 9 fractional digits.
    payload = (
        '{"type":"TextDelta","data":{"text":"x"},"timestamp":"2024-01-02T03:04:05.123456789Z"}'
    )
    e = Event.from_json(payload)
    assert e.timestamp.replace(microsecond=0) == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert e.timestamp.microsecond in (123456, 123457)


def test_to_json_pre_1000_year_is_rfc3339() -> None:
    e = Event(EventType.TEXT_DELTA, {"text": "x"}, datetime(1000, 1, 1, tzinfo=UTC))
    assert RFC3339_UTC.fullmatch(json.loads(e.to_json())["timestamp"])
    assert Event.from_json(e.to_json()) == e


def test_to_json_year_below_1000_round_trips() -> None:
    # strftime("%Y") does not zero-pad years below 1000 on glibc.
    e = Event(EventType.TEXT_DELTA, {"text": "x"}, datetime(999, 1, 1, tzinfo=UTC))
    assert RFC3339_UTC.fullmatch(json.loads(e.to_json())["timestamp"])
    assert Event.from_json(e.to_json()) == e


# -- msgpack -------------------------------------------------------------------------


def test_to_msgpack_format() -> None:
    e = Event.usage(100, 50, 150)
    e.timestamp = TS
    payload = e.to_msgpack()
    assert isinstance(payload, bytes)
    obj = msgpack.unpackb(payload, timestamp=0)
    assert set(obj) == {"type", "data", "timestamp"}
    assert obj["type"] == "Usage"
    assert_same(obj["data"], {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150})
    assert isinstance(obj["timestamp"], msgpack.Timestamp)
    assert obj["timestamp"] == msgpack.Timestamp.from_datetime(TS)
    assert obj["timestamp"].to_datetime() == TS


@pytest.mark.parametrize("text", ["", "tok", "é" * 40, "x" * 70_000])
@pytest.mark.parametrize(
    "factory", [Event.text_delta, Event.thinking, Event.error, Event.message_start]
)
def test_to_msgpack_of_one_str_field_events_is_the_generic_encoding(
    factory: Any, text: str
) -> None:
    # These are encoded from pre-encoded pieces (the hot path): byte for byte what
    # msgpack writes for the same map.
    e = factory(text)
    packer = msgpack.Packer(use_bin_type=True, datetime=True)
    expected = packer.pack({"type": e.type.value, "data": e.data, "timestamp": e.timestamp})
    assert e.to_msgpack() == expected


@pytest.mark.parametrize(
    "change",
    [
        lambda e: setattr(e, "data", {"text": 5}),
        lambda e: setattr(e, "data", {"text": "a", "n": float("nan")}),
        lambda e: setattr(e, "timestamp", datetime(2024, 1, 1)),
        lambda e: setattr(e, "type", "TextDelta"),
        lambda e: e.data.update(text="\ud800"),
    ],
    ids=["not-str", "extra-nan", "naive-timestamp", "type-not-a-member", "lone-surrogate"],
)
def test_to_msgpack_hot_path_still_refuses_what_validate_refuses(change: Any) -> None:
    e = Event.text_delta("ok")
    change(e)
    with pytest.raises(InvalidEventError):
        e.to_msgpack()


def test_to_msgpack_of_text_delta_with_other_timezone_or_extra_keys() -> None:
    e = Event.text_delta("ok")
    e.timestamp = datetime(2024, 1, 1, 3, tzinfo=timezone(timedelta(hours=2)))
    e.data["t"] = 7
    back = Event.from_msgpack(e.to_msgpack())
    assert back.data == {"text": "ok", "t": 7} and back.timestamp == e.timestamp


def test_to_msgpack_timestamp_is_ext_type_minus_1() -> None:
    payload = valid_event().to_msgpack()
    key = msgpack.packb("timestamp")
    assert key in payload
    after = payload[payload.index(key) + len(key) :]
    # fixext 4, fixext 8 or ext 8 with 12 bytes, each followed by the type byte -1 (0xff)
    assert after[:2] in (b"\xd6\xff", b"\xd7\xff") or after[:3] == b"\xc7\x0c\xff"
    assert after.startswith(msgpack.packb(msgpack.Timestamp.from_datetime(TS)))
    # and without timestamp decoding msgpack hands the raw ext -1 back
    raw = msgpack.unpackb(payload, timestamp=0, ext_hook=msgpack.ExtType)
    assert isinstance(raw["timestamp"], msgpack.Timestamp)


@pytest.mark.parametrize("t", list(EventType), ids=str)
def test_msgpack_round_trip(t: EventType) -> None:
    e = valid_event(t)
    back = Event.from_msgpack(e.to_msgpack())
    assert back == e
    assert back.type is t
    assert_same(back.data, e.data)
    assert back.timestamp.utcoffset() == timedelta(0)


def test_msgpack_round_trip_keeps_ints_ints_and_floats_floats() -> None:
    data = {"text": "x", "i": 1, "f": 1.0, "b": True, "n": None, "u": 2**64 - 1, "neg": -(2**63)}
    e = Event(EventType.TEXT_DELTA, data, TS)
    assert_same(Event.from_msgpack(e.to_msgpack()).data, data)


def test_from_msgpack_reads_other_producers() -> None:
    # What another language's msgpack library (or msgpack-python itself) would write.
    payload = msgpack.packb(
        {"type": "TextDelta", "data": {"text": "hi"}, "timestamp": TS}, datetime=True
    )
    e = Event.from_msgpack(payload)
    assert e == Event(EventType.TEXT_DELTA, {"text": "hi"}, TS)


def test_from_msgpack_truncates_nanoseconds_to_microseconds() -> None:
    payload = pack_map("TextDelta", {"text": "x"}, msgpack.Timestamp(1_700_000_000, 123_456_789))
    e = Event.from_msgpack(payload)
    assert e.timestamp.utcoffset() == timedelta(0)
    assert e.timestamp.replace(microsecond=0) == datetime.fromtimestamp(1_700_000_000, UTC)
    assert e.timestamp.microsecond in (123456, 123457)


@pytest.mark.parametrize(
    "ts",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
        datetime(1900, 6, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2106, 2, 7, 6, 28, 16, tzinfo=UTC),  # past 32-bit seconds
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
    ],
    ids=str,
)
def test_msgpack_round_trip_extreme_timestamps(ts: datetime) -> None:
    e = Event(EventType.TEXT_DELTA, {"text": "x"}, ts)
    assert Event.from_msgpack(e.to_msgpack()).timestamp == ts


# -- malformed input: always InvalidEventError -----------------------------------------

GOOD_TS = msgpack.Timestamp.from_datetime(TS)
MALFORMED_MSGPACK = {
    "empty": b"",
    "garbage": b"\xc1\xc1\xc1",
    "ascii": b"hello world",
    "nil": msgpack.packb(None),
    "int": msgpack.packb(5),
    "str": msgpack.packb("TextDelta"),
    "list": msgpack.packb(["TextDelta", {"text": "x"}, GOOD_TS]),
    "bin": msgpack.packb(b"\x83"),
    "empty-map": msgpack.packb({}),
    "missing-type": msgpack.packb({"data": {"text": "x"}, "timestamp": GOOD_TS}),
    "missing-data": msgpack.packb({"type": "TextDelta", "timestamp": GOOD_TS}),
    "missing-timestamp": msgpack.packb({"type": "TextDelta", "data": {"text": "x"}}),
    "unknown-type": pack_map("Nope", {"text": "x"}, GOOD_TS),
    "type-int": pack_map(3, {"text": "x"}, GOOD_TS),
    "type-nil": pack_map(None, {"text": "x"}, GOOD_TS),
    "type-bin": pack_map(b"TextDelta", {"text": "x"}, GOOD_TS),
    "type-list": pack_map(["TextDelta"], {"text": "x"}, GOOD_TS),
    "data-nil": pack_map("TextDelta", None, GOOD_TS),
    "data-list": pack_map("TextDelta", ["x"], GOOD_TS),
    "data-missing-field": pack_map("TextDelta", {}, GOOD_TS),
    "data-wrong-type": pack_map("TextDelta", {"text": 5}, GOOD_TS),
    "data-negative": pack_map("ContentStart", {"index": -1}, GOOD_TS),
    "data-bool-int": pack_map("ContentStart", {"index": True}, GOOD_TS),
    "data-bin-value": pack_map("TextDelta", {"text": "x", "b": b"\x00"}, GOOD_TS),
    "data-int-key": pack_map("TextDelta", {"text": "x", 1: 2}, GOOD_TS),
    "data-nested-int-key": pack_map("TextDelta", {"text": "x", "n": {1: 2}}, GOOD_TS),
    "data-nan": pack_map("TextDelta", {"text": "x", "f": float("nan")}, GOOD_TS),
    "data-ext": pack_map("TextDelta", {"text": "x", "e": msgpack.ExtType(5, b"x")}, GOOD_TS),
    "data-bad-utf8": b"\x83\xa4type\xa9TextDelta\xa4data\x81\xa4text\xa2\xff\xfe\xa9timestamp"
    + msgpack.packb(GOOD_TS),
    "timestamp-str": pack_map("TextDelta", {"text": "x"}, "2024-01-01T00:00:00Z"),
    "timestamp-int": pack_map("TextDelta", {"text": "x"}, 1_700_000_000),
    "timestamp-float": pack_map("TextDelta", {"text": "x"}, 1.7e9),
    "timestamp-nil": pack_map("TextDelta", {"text": "x"}, None),
    "timestamp-other-ext": pack_map("TextDelta", {"text": "x"}, msgpack.ExtType(1, b"\0" * 8)),
    # ext 8 of type -1 (0xff) with a 5-byte body: no such timestamp format
    "timestamp-bad-ext-len": b"\x83\xa4type\xa9TextDelta\xa4data\x81\xa4text\xa1x"
    + b"\xa9timestamp\xc7\x05\xff\x00\x00\x00\x00\x00",
    "map-int-key": msgpack.packb({1: "TextDelta"}),
    "trailing-bytes": pack_map("TextDelta", {"text": "x"}, GOOD_TS) + b"\xc0",
    "two-events": pack_map("TextDelta", {"text": "x"}, GOOD_TS) * 2,
    "deeply-nested-garbage": b"\x91" * 100_000,
}


@pytest.mark.parametrize("payload", MALFORMED_MSGPACK.values(), ids=MALFORMED_MSGPACK.keys())
def test_from_msgpack_malformed_raises_invalid_event(payload: bytes) -> None:
    with pytest.raises(InvalidEventError):
        Event.from_msgpack(payload)


@pytest.mark.parametrize("payload", ["a str", None, 5, ["list"], {"type": "TextDelta"}])
def test_from_msgpack_non_bytes_raises_invalid_event(payload: Any) -> None:
    with pytest.raises(InvalidEventError):
        Event.from_msgpack(payload)


def test_from_msgpack_every_truncation_raises_invalid_event() -> None:
    payload = Event(
        EventType.TEXT_DELTA, {"text": "hello", "extra": [1, 2.5, "x"]}, TS
    ).to_msgpack()
    for n in range(len(payload)):
        with pytest.raises(InvalidEventError):
            Event.from_msgpack(payload[:n])


def _nested_data_msgpack(depth: int) -> bytes:
    # {"type": "TextDelta", "timestamp": ..., "data": {"text": "x", "n": [[[...nil...]]]}}
    return (
        b"\x83"
        + msgpack.packb("type")
        + msgpack.packb("TextDelta")
        + msgpack.packb("timestamp")
        + msgpack.packb(GOOD_TS)
        + msgpack.packb("data")
        + b"\x82"
        + msgpack.packb("text")
        + msgpack.packb("x")
        + msgpack.packb("n")
        + b"\x91" * depth
        + b"\xc0"
    )


def test_from_msgpack_deeply_nested_data_raises_invalid_event() -> None:
    # Nested ~1000 deep: within msgpack's own stack limit, deep enough for a
    # recursive validator to hit RecursionError.
    payload = _nested_data_msgpack(1000)
    try:
        Event.from_msgpack(payload)
    except InvalidEventError:
        pass  # rejecting the depth is fine, so is accepting it


@pytest.mark.parametrize("seconds", [2**40, -(2**40)])
def test_from_msgpack_out_of_range_timestamp_raises_invalid_event(seconds: int) -> None:
    payload = pack_map("TextDelta", {"text": "x"}, msgpack.Timestamp(seconds, 0))
    with pytest.raises(InvalidEventError):
        Event.from_msgpack(payload)


def _j(**overrides: Any) -> str:
    base: dict[str, Any] = {
        "type": "TextDelta",
        "data": {"text": "x"},
        "timestamp": "2024-01-01T00:00:00Z",
    }
    base.update(overrides)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP})


_DROP = object()

MALFORMED_JSON: dict[str, str | bytes] = {
    "empty": "",
    "whitespace": "   ",
    "garbage": "{not json",
    "truncated": _j()[:-1],
    "bad-utf8-bytes": b'{"type":"TextDelta","data":{"text":"\xff\xfe"},"timestamp":"x"}',
    "binary": b"\x00\x01\x02\xff",
    "null": "null",
    "number": "5",
    "string": '"TextDelta"',
    "array": '["TextDelta", {"text": "x"}, "2024-01-01T00:00:00Z"]',
    "empty-object": "{}",
    "missing-type": _j(type=_DROP),
    "missing-data": _j(data=_DROP),
    "missing-timestamp": _j(timestamp=_DROP),
    "unknown-type": _j(type="Nope"),
    "type-lowercase": _j(type="textdelta"),
    "type-int": _j(type=1),
    "type-null": _j(type=None),
    "type-list": _j(type=["TextDelta"]),
    "type-object": _j(type={"name": "TextDelta"}),
    "data-null": _j(data=None),
    "data-list": _j(data=["x"]),
    "data-str": _j(data="x"),
    "data-missing-field": _j(data={}),
    "data-wrong-type": _j(data={"text": 5}),
    "usage-negative": _j(
        type="Usage", data={"prompt_tokens": -1, "completion_tokens": 0, "total_tokens": 0}
    ),
    "usage-float": _j(
        type="Usage", data={"prompt_tokens": 1.0, "completion_tokens": 0, "total_tokens": 0}
    ),
    "usage-bool": _j(
        type="Usage", data={"prompt_tokens": True, "completion_tokens": 0, "total_tokens": 0}
    ),
    "data-nan": '{"type":"TextDelta","data":{"text":"x","f":NaN},'
    '"timestamp":"2024-01-01T00:00:00Z"}',
    "data-infinity": '{"type":"TextDelta","data":{"text":"x","f":-Infinity},'
    '"timestamp":"2024-01-01T00:00:00Z"}',
    "data-float-overflow": '{"type":"TextDelta","data":{"text":"x","f":1e400},'
    '"timestamp":"2024-01-01T00:00:00Z"}',
    "data-huge-int": '{"type":"TextDelta","data":{"text":"x","n":' + "9" * 30 + "},"
    '"timestamp":"2024-01-01T00:00:00Z"}',
    "data-int-too-many-digits": '{"type":"TextDelta","data":{"text":"x","n":' + "9" * 5000 + "},"
    '"timestamp":"2024-01-01T00:00:00Z"}',
    "timestamp-number": _j(timestamp=1_700_000_000),
    "timestamp-list": _j(timestamp=[2024, 1, 1]),
    "timestamp-words": _j(timestamp="yesterday"),
    "timestamp-empty": _j(timestamp=""),
    "timestamp-naive": _j(timestamp="2024-01-01T00:00:00"),
    "timestamp-date-only": _j(timestamp="2024-01-01"),
    "timestamp-month-13": _j(timestamp="2024-13-01T00:00:00Z"),
    "timestamp-feb-30": _j(timestamp="2024-02-30T00:00:00Z"),
    "timestamp-hour-25": _j(timestamp="2024-01-01T25:00:00Z"),
    "timestamp-year-0": _j(timestamp="0000-01-01T00:00:00Z"),
    "timestamp-bad-offset": _j(timestamp="2024-01-01T00:00:00+25:00"),
    "timestamp-trailing": _j(timestamp="2024-01-01T00:00:00Zjunk"),
}


@pytest.mark.parametrize("payload", MALFORMED_JSON.values(), ids=MALFORMED_JSON.keys())
def test_from_json_malformed_raises_invalid_event(payload: str | bytes) -> None:
    with pytest.raises(InvalidEventError):
        Event.from_json(payload)


@pytest.mark.parametrize("payload", [None, 5, ["x"], {"type": "TextDelta"}])
def test_from_json_non_text_raises_invalid_event(payload: Any) -> None:
    with pytest.raises(InvalidEventError):
        Event.from_json(payload)


def test_from_json_every_truncation_raises_invalid_event() -> None:
    text = Event(EventType.TEXT_DELTA, {"text": "hello", "extra": [1, 2.5, "x"]}, TS).to_json()
    for n in range(len(text)):
        with pytest.raises(InvalidEventError):
            Event.from_json(text[:n])


def test_from_json_deeply_nested_raises_invalid_event() -> None:
    # json.loads raises RecursionError here, which is not a ValueError.
    with pytest.raises(InvalidEventError):
        Event.from_json("[" * 100_000)


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_from_json_out_of_range_offset_raises_invalid_event(ts: str) -> None:
    with pytest.raises(InvalidEventError):
        Event.from_json(_j(timestamp=ts))


def test_from_json_null_timestamp_raises_invalid_event() -> None:
    # Not silently stamped "now" (Event(..., timestamp=None) means now).
    with pytest.raises(InvalidEventError):
        Event.from_json(_j(timestamp=None))


MALFORMED_DICTS: dict[str, Any] = {
    "none": None,
    "list": ["TextDelta", {"text": "x"}, "2024-01-01T00:00:00Z"],
    "str": "TextDelta",
    "empty": {},
    "missing-type": {"data": {"text": "x"}, "timestamp": "2024-01-01T00:00:00Z"},
    "missing-data": {"type": "TextDelta", "timestamp": "2024-01-01T00:00:00Z"},
    "missing-timestamp": {"type": "TextDelta", "data": {"text": "x"}},
    "unknown-type": {"type": "Nope", "data": {"text": "x"}, "timestamp": "2024-01-01T00:00:00Z"},
    "unhashable-type": {"type": ["x"], "data": {"text": "x"}, "timestamp": "2024-01-01T00:00:00Z"},
    "bad-data": {"type": "TextDelta", "data": {"text": 1}, "timestamp": "2024-01-01T00:00:00Z"},
    "bytes-value": {
        "type": "TextDelta",
        "data": {"text": "x", "b": b"x"},
        "timestamp": "2024-01-01T00:00:00Z",
    },
    "bad-timestamp": {"type": "TextDelta", "data": {"text": "x"}, "timestamp": "soon"},
    "naive-datetime": {
        "type": "TextDelta",
        "data": {"text": "x"},
        "timestamp": datetime(2024, 1, 1),
    },
    "timestamp-number": {"type": "TextDelta", "data": {"text": "x"}, "timestamp": 17e8},
}


@pytest.mark.parametrize("d", MALFORMED_DICTS.values(), ids=MALFORMED_DICTS.keys())
def test_from_dict_malformed_raises_invalid_event(d: Any) -> None:
    with pytest.raises(InvalidEventError):
        Event.from_dict(d)


# -- property-based tests ---------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)
counts = st.integers(min_value=0, max_value=2**64 - 1)
REQUIRED = {
    EventType.TEXT_DELTA: st.fixed_dictionaries({"text": st.text()}),
    EventType.CONTENT_START: st.fixed_dictionaries({"index": counts}),
    EventType.CONTENT_END: st.fixed_dictionaries({"index": counts}),
    EventType.MESSAGE_START: st.fixed_dictionaries({"message_id": st.text()}),
    EventType.MESSAGE_STOP: st.fixed_dictionaries(
        {"message_id": st.text(), "stop_reason": st.text()}
    ),
    EventType.ERROR: st.fixed_dictionaries({"error": st.text()}),
    EventType.USAGE: st.fixed_dictionaries(
        {"prompt_tokens": counts, "completion_tokens": counts, "total_tokens": counts}
    ),
    EventType.THINKING: st.fixed_dictionaries({"thinking": st.text()}),
}
zones = st.sampled_from(
    [
        UTC,
        timezone(timedelta(hours=5, minutes=30)),
        timezone(timedelta(hours=-8)),
        timezone(timedelta(hours=14)),
    ]
)
# A day of margin keeps every offset's UTC instant inside datetime's range.
timestamps = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=zones
)


@st.composite
def events(draw: st.DrawFn) -> Event:
    t = draw(st.sampled_from(list(EventType)))
    required = draw(REQUIRED[t])
    extra = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
    return Event(t, {**extra, **required}, draw(timestamps))


PROPS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(events())
def test_property_json_round_trip_is_lossless(e: Event) -> None:
    e.validate()
    back = Event.from_json(e.to_json())
    assert back == e
    assert back.type is e.type
    assert_same(back.data, e.data)
    assert back.timestamp == e.timestamp
    assert back.timestamp.utcoffset() == timedelta(0)
    assert Event.from_json(e.to_json().encode("utf-8")) == e


@PROPS
@given(events())
def test_property_msgpack_round_trip_is_lossless(e: Event) -> None:
    e.validate()
    back = Event.from_msgpack(e.to_msgpack())
    assert back == e
    assert back.type is e.type
    assert_same(back.data, e.data)
    assert back.timestamp == e.timestamp
    assert back.timestamp.utcoffset() == timedelta(0)


@PROPS
@given(events())
def test_property_json_and_msgpack_agree(e: Event) -> None:
    via_json = Event.from_json(e.to_json())
    assert Event.from_msgpack(via_json.to_msgpack()) == e


@PROPS
@given(st.binary(max_size=200))
def test_property_from_msgpack_arbitrary_bytes(payload: bytes) -> None:
    try:
        e = Event.from_msgpack(payload)
    except InvalidEventError:
        return
    e.validate()


@PROPS
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_property_from_json_arbitrary_input(payload: str | bytes) -> None:
    try:
        e = Event.from_json(payload)
    except InvalidEventError:
        return
    e.validate()


@PROPS
@given(events(), st.data())
def test_property_from_msgpack_mutated_payload(e: Event, data: st.DataObject) -> None:
    payload = bytearray(e.to_msgpack())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    try:
        back = Event.from_msgpack(bytes(payload[:cut]))
    except InvalidEventError:
        return
    back.validate()


@PROPS
@given(events(), st.data())
def test_property_from_json_mutated_payload(e: Event, data: st.DataObject) -> None:
    payload = bytearray(e.to_json().encode("utf-8"))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    try:
        back = Event.from_json(bytes(payload))
    except InvalidEventError:
        return
    back.validate()


# Wire-level values a broken or hostile producer could send, including timestamps
# outside datetime's range (years 1..9999).
wire_timestamps = st.builds(
    msgpack.Timestamp,
    st.integers(min_value=-62_135_596_800, max_value=253_402_300_799)
    | st.integers(min_value=-(2**62), max_value=2**62),
    st.integers(min_value=0, max_value=999_999_999),
)
wire_leaves = (
    json_leaves
    | st.binary(max_size=8)
    | wire_timestamps
    | st.sampled_from([t.value for t in EventType])
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))
)
wire_values = st.recursive(
    wire_leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["text", "index", "message_id", "stop_reason", "error", "x"])
            | st.integers(-2, 2),
            children,
            max_size=4,
        )
    ),
    max_leaves=10,
)
wire_maps = st.dictionaries(
    st.sampled_from(["type", "data", "timestamp", "extra"]), wire_values, max_size=4
)


@PROPS
@given(wire_maps)
def test_property_from_msgpack_structured_garbage(obj: dict[str, Any]) -> None:
    payload = msgpack.packb(obj, use_bin_type=True)
    try:
        e = Event.from_msgpack(payload)
    except InvalidEventError:
        return
    e.validate()
    assert Event.from_msgpack(e.to_msgpack()) == e


def test_decoders_raise_nothing_but_zevents_errors_for_known_edge_cases() -> None:
    # Belt and braces on top of the parametrized cases: none of them leaks another type.
    for payload in MALFORMED_MSGPACK.values():
        with pytest.raises(ZEventsError):
            Event.from_msgpack(payload)
    for text in MALFORMED_JSON.values():
        with pytest.raises(ZEventsError):
            Event.from_json(text)
