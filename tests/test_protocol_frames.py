"""Tests for zevents.protocol.frames: the wire frames, byte for byte, and malformed input.

Every decoder must raise only zevents errors (ProtocolError, InvalidStreamIdError,
InvalidEventError) on bad input, never a msgpack, struct or Unicode error.
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zevents.errors import (
    InvalidEventError,
    InvalidStreamIdError,
    ProtocolError,
    ZEventsError,
)
from zevents.events import Event, EventType
from zevents.ids import validate_stream_id
from zevents.protocol import frames
from zevents.protocol.frames import (
    CLIENT_ID_SIZE,
    KIND_END,
    KIND_EVENTS,
    decode_batch,
    decode_control,
    decode_ingest_header,
    decode_publish,
    encode_control,
    encode_end,
    encode_events,
    encode_ingest,
    split_events,
    topic,
)

TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
CLIENT = bytes(range(1, 17))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def iter_checked_events(frame: bytes, start: int) -> list[tuple[bytes, Any]]:
    """``decode_batch`` as ``(raw, error or None)`` pairs, in order."""
    raws, errors = decode_batch(frame, start)
    return [(raw, errors.get(i)) for i, raw in enumerate(raws)]


def ev(i: int = 0, t: EventType = EventType.TEXT_DELTA) -> bytes:
    if t is EventType.TEXT_DELTA:
        return Event(t, {"text": f"tok{i}"}, TS).to_msgpack()
    return Event(EventType.CONTENT_START, {"index": i}, TS).to_msgpack()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def only_zevents_errors(fn: Any, *args: Any) -> Any:
    """Call ``fn``; a raised error must be a ZEventsError (anything else fails the test)."""
    try:
        return fn(*args)
    except ZEventsError:
        return None


def _as_datetime(ts: Any) -> datetime:
    return ts.to_datetime() if isinstance(ts, msgpack.Timestamp) else ts


# -- topic -----------------------------------------------------------------------------


def test_topic_is_utf8_id_plus_nul() -> None:
    assert topic("s1") == b"s1\x00"
    assert topic("é") == "é".encode() + b"\x00"


def test_topic_of_s1_is_not_a_prefix_of_s10_frames() -> None:
    frame = encode_events(topic("s10"), 1, [ev()])
    assert not frame.startswith(topic("s1"))
    assert frame.startswith(topic("s10"))


# -- ingest ------------------------------------------------------------------------------


def test_ingest_layout_byte_for_byte() -> None:
    body = ev(1) + ev(2)
    frame = encode_ingest(topic("chat-1"), CLIENT, 7, body)
    assert frame == b"chat-1\x00" + CLIENT + struct.pack(">Q", 7) + body


def test_ingest_header_round_trip() -> None:
    body = ev(1) + ev(2)
    frame = encode_ingest(topic("chat-1"), CLIENT, 2**64 - 1, body)
    hdr = decode_ingest_header(frame)
    assert hdr.stream_id == "chat-1"
    assert hdr.client_id == CLIENT
    assert hdr.first_pseq == 2**64 - 1
    assert frame[hdr.body_start :] == body


def test_ingest_header_with_empty_body() -> None:
    frame = encode_ingest(topic("s"), CLIENT, 1, b"")
    hdr = decode_ingest_header(frame)
    assert hdr.body_start == len(frame)
    assert list(iter_checked_events(frame, hdr.body_start)) == []


def test_ingest_header_unicode_stream_id() -> None:
    sid = "séance-✓"
    hdr = decode_ingest_header(encode_ingest(topic(sid), CLIENT, 1, ev()))
    assert hdr.stream_id == sid


def test_ingest_stream_id_of_256_bytes_is_accepted_257_is_not() -> None:
    ok = "a" * 256
    assert decode_ingest_header(encode_ingest(topic(ok), CLIENT, 1, ev())).stream_id == ok
    with pytest.raises(InvalidStreamIdError):
        decode_ingest_header(encode_ingest(b"a" * 257 + b"\x00", CLIENT, 1, ev()))


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00",
        b"\x00" + CLIENT + bytes(8),  # empty stream ID
        b"no-nul-anywhere" + CLIENT + b"\x01" * 8,
        b"\xff\xfe\x00" + CLIENT + bytes(8),  # stream ID not UTF-8
        b"\xed\xa0\x80\x00" + CLIENT + bytes(8),  # a UTF-8-encoded surrogate
    ],
    ids=["empty", "nul-only", "empty-id", "no-nul", "bad-utf8", "surrogate"],
)
def test_ingest_bad_topic_raises_invalid_stream_id(frame: bytes) -> None:
    with pytest.raises(InvalidStreamIdError):
        decode_ingest_header(frame)


@pytest.mark.parametrize("cut", [0, 1, CLIENT_ID_SIZE, CLIENT_ID_SIZE + 7])
def test_ingest_truncated_header_raises_protocol_error(cut: int) -> None:
    frame = b"s\x00" + (CLIENT + bytes(8))[:cut]
    with pytest.raises(ProtocolError):
        decode_ingest_header(frame)


@FUZZ
@given(st.binary(max_size=400))
def test_decode_ingest_header_arbitrary_bytes(data: bytes) -> None:
    hdr = only_zevents_errors(decode_ingest_header, data)
    if hdr is not None:
        assert validate_stream_id(hdr.stream_id) == hdr.stream_id
        assert len(hdr.client_id) == CLIENT_ID_SIZE
        assert 0 <= hdr.first_pseq < 2**64
        assert hdr.body_start <= len(data)


@FUZZ
@given(
    st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s),
    st.binary(min_size=16, max_size=16),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=50),
)
def test_ingest_round_trip_property(sid: str, client: bytes, pseq: int, body: bytes) -> None:
    try:
        validate_stream_id(sid)
    except InvalidStreamIdError:
        return
    hdr = decode_ingest_header(encode_ingest(topic(sid), client, pseq, body))
    assert (hdr.stream_id, hdr.client_id, hdr.first_pseq) == (sid, client, pseq)


# -- iter_checked_events ----------------------------------------------------------------


def _body_frame(body: bytes) -> tuple[bytes, int]:
    frame = encode_ingest(topic("s"), CLIENT, 1, body)
    return frame, decode_ingest_header(frame).body_start


def test_iter_checked_events_keeps_raw_bytes_of_valid_events() -> None:
    events = [ev(1), ev(2, EventType.CONTENT_START), ev(3)]
    frame, start = _body_frame(b"".join(events))
    out = list(iter_checked_events(frame, start))
    assert [raw for raw, _ in out] == events
    assert all(err is None for _, err in out)


def test_iter_checked_events_invalid_event_between_valid_ones() -> None:
    bad = pack({"type": "TextDelta", "data": {"text": 5}, "timestamp": msgpack.Timestamp(1, 0)})
    frame, start = _body_frame(ev(1) + bad + ev(2))
    out = list(iter_checked_events(frame, start))
    assert [raw for raw, _ in out] == [ev(1), bad, ev(2)]
    assert out[0][1] is None and out[2][1] is None
    assert isinstance(out[1][1], InvalidEventError)


@pytest.mark.parametrize(
    "bad",
    [
        pack(1),
        pack([1, 2]),
        pack({"type": "TextDelta", "data": {"text": "x"}}),  # no timestamp
        pack({"type": "Nope", "data": {}, "timestamp": msgpack.Timestamp(1, 0)}),
        pack({"type": "TextDelta", "data": {"text": "x"}, "timestamp": 12}),
        pack({"type": "ContentStart", "data": {"index": -1}, "timestamp": msgpack.Timestamp(1, 0)}),
        pack({"type": "TextDelta", "data": None, "timestamp": msgpack.Timestamp(1, 0)}),
    ],
    ids=["int", "list", "no-ts", "bad-type", "ts-int", "negative-index", "data-none"],
)
def test_iter_checked_events_flags_each_invalid_event(bad: bytes) -> None:
    frame, start = _body_frame(bad + ev(1))
    out = list(iter_checked_events(frame, start))
    assert len(out) == 2
    assert out[0][0] == bad and isinstance(out[0][1], InvalidEventError)
    assert out[1] == (ev(1), None)


def test_iter_checked_events_truncated_tail_is_one_error_item() -> None:
    full = ev(2)
    frame, start = _body_frame(ev(1) + full[:-3])
    out = list(iter_checked_events(frame, start))
    assert out[0] == (ev(1), None)
    assert len(out) == 2
    assert out[1][0] == full[:-3]
    assert isinstance(out[1][1], InvalidEventError)


def test_iter_checked_events_garbage_ends_iteration_with_rest_of_frame() -> None:
    frame, start = _body_frame(ev(1) + b"\xc1" + ev(2))  # 0xc1 is never valid msgpack
    out = list(iter_checked_events(frame, start))
    assert out[0] == (ev(1), None)
    assert len(out) == 2
    assert out[1][0] == b"\xc1" + ev(2)
    assert isinstance(out[1][1], InvalidEventError)


def test_iter_checked_events_non_str_map_key_is_invalid_not_crash() -> None:
    bad = b"\x81\x01\x02"  # {1: 2}: strict_map_key refuses it
    frame, start = _body_frame(bad)
    out = list(iter_checked_events(frame, start))
    assert len(out) == 1
    assert isinstance(out[0][1], InvalidEventError)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 40))
def test_iter_checked_events_arbitrary_bytes(data: bytes, start: int) -> None:
    start = min(start, len(data))
    out = list(iter_checked_events(data, start))  # must not raise at all
    assert b"".join(raw for raw, _ in out) == data[start:]
    for raw, err in out:
        assert err is None or isinstance(err, InvalidEventError)
        assert raw  # no empty items


@FUZZ
@given(st.lists(st.integers(0, 2), max_size=8), st.binary(max_size=20))
def test_iter_checked_events_valid_events_then_garbage(kinds: list[int], tail: bytes) -> None:
    events = [
        ev(i, EventType.TEXT_DELTA if k else EventType.CONTENT_START) for i, k in enumerate(kinds)
    ]
    frame, start = _body_frame(b"".join(events) + tail)
    out = list(iter_checked_events(frame, start))
    assert [raw for raw, _ in out[: len(events)]] == events
    assert all(err is None for _, err in out[: len(events)])


def _deep_event(depth: int) -> bytes:
    # data = {"text": "x", "n": [[[...nil...]]]}: nesting msgpack itself accepts
    return (
        b"\x83"
        + pack("type")
        + pack("TextDelta")
        + pack("data")
        + b"\x82"
        + pack("text")
        + pack("x")
        + pack("n")
        + b"\x91" * depth
        + b"\xc0"
        + pack("timestamp")
        + pack(msgpack.Timestamp(1, 0))
    )


def test_iter_checked_events_deeply_nested_event_is_not_a_crash() -> None:
    frame, start = _body_frame(_deep_event(1015) + ev(1))
    out = only_zevents_errors(lambda: list(iter_checked_events(frame, start)))
    assert out is not None
    assert isinstance(out[0][1], InvalidEventError) or out[0][1] is None
    assert out[-1] == (ev(1), None)


def test_iter_checked_events_flags_timestamp_out_of_datetime_range() -> None:
    bad = pack(
        {"type": "TextDelta", "data": {"text": "x"}, "timestamp": msgpack.Timestamp(2**40, 0)}
    )
    # year ~36800: no reader can turn it into a datetime, so the broker must refuse it
    frame, start = _body_frame(bad)
    ((raw, err),) = list(iter_checked_events(frame, start))
    assert raw == bad
    assert isinstance(err, InvalidEventError)


def _bad_timestamp_event() -> bytes:
    return pack(
        {"type": "TextDelta", "data": {"text": "x"}, "timestamp": msgpack.Timestamp(2**40, 0)}
    )


def test_out_of_range_timestamp_does_not_take_its_neighbours_down() -> None:
    bad = _bad_timestamp_event()
    frame, start = _body_frame(ev(1) + bad + ev(2))
    out = list(iter_checked_events(frame, start))
    assert [raw for raw, _ in out] == [ev(1), bad, ev(2)]
    assert [err is None for _, err in out] == [True, False, True]


# -- publish -------------------------------------------------------------------------------


def test_events_frame_layout_byte_for_byte() -> None:
    frame = encode_events(topic("s1"), 5, [ev(1), ev(2)])
    assert frame == b"s1\x00E" + struct.pack(">Q", 5) + ev(1) + ev(2)


def test_end_frame_layout_byte_for_byte() -> None:
    assert encode_end(topic("s1"), 9) == b"s1\x00X" + struct.pack(">Q", 9)


def test_publish_round_trip_events() -> None:
    frame = encode_events(topic("s1"), 42, [ev(1), ev(2)])
    sid, kind, seq, start = decode_publish(frame)
    assert (sid, kind, seq) == ("s1", KIND_EVENTS, 42)
    assert frame[start:] == ev(1) + ev(2)
    maps = split_events(frame[start:])
    assert [m["data"]["text"] for m in maps] == ["tok1", "tok2"]
    assert [m["type"] for m in maps] == ["TextDelta", "TextDelta"]
    assert [_as_datetime(m["timestamp"]) for m in maps] == [TS, TS]


def test_publish_round_trip_end() -> None:
    sid, kind, seq, start = decode_publish(encode_end(topic("s1"), 0))
    assert (sid, kind, seq) == ("s1", KIND_END, 0)
    assert start == len(encode_end(topic("s1"), 0))


def test_split_events_accepts_memoryview() -> None:
    frame = encode_events(topic("s"), 1, [ev(1), ev(2)])
    start = decode_publish(frame)[3]
    assert split_events(memoryview(frame)[start:]) == split_events(frame[start:])


def test_split_events_empty() -> None:
    assert split_events(b"") == []


@pytest.mark.parametrize(
    "frame, exc",
    [
        (b"", InvalidStreamIdError),
        (b"\x00E" + bytes(8), InvalidStreamIdError),
        (b"s1E" + b"\x01" * 8, InvalidStreamIdError),
        (b"\x80\x00E" + bytes(8), InvalidStreamIdError),
        (b"s1\x00", ProtocolError),
        (b"s1\x00E" + bytes(7), ProtocolError),
        (b"s1\x00Z" + bytes(8), ProtocolError),
        (b"s1\x00e" + bytes(8), ProtocolError),
    ],
    ids=["empty", "empty-id", "no-nul", "bad-utf8", "no-kind", "short-seq", "kind-Z", "kind-e"],
)
def test_decode_publish_malformed(frame: bytes, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        decode_publish(frame)


@pytest.mark.parametrize("body", [b"\xc1", b"\x81\x01\x02"], ids=["c1", "intkey"])
def test_split_events_malformed_raises_invalid_event(body: bytes) -> None:
    with pytest.raises(InvalidEventError):
        split_events(ev(1) + body)


def test_split_events_truncated_batch_raises() -> None:
    with pytest.raises(InvalidEventError):
        split_events(ev(1) + ev(2)[:-2])


@pytest.mark.parametrize(
    "tail",
    [b"\x93\x01", b"\x83\xa4type", b"\xa5ab", b"\xd7\xff\x00"],
    ids=["inside-a-list", "inside-a-map", "inside-a-str", "inside-an-ext"],
)
def test_split_events_truncated_anywhere_raises_and_leaves_nothing_behind(tail: bytes) -> None:
    # msgpack's iteration stops quietly inside a truncated list or map (and its
    # tell() counts the bytes as read): it must still raise, and the decoder it
    # reuses between frames must not carry the half-read object into the next one.
    with pytest.raises(InvalidEventError, match="truncated"):
        split_events(ev(1) + tail)
    assert split_events(ev(2) + ev(3)) == [msgpack.unpackb(ev(i), timestamp=3) for i in (2, 3)]


@pytest.mark.parametrize(
    "bad",
    [ev(2)[:-3], b"\xc1" * 4, pack({1: 2}), b"\x93\x01"],
    ids=["truncated", "garbage", "non-str-key", "truncated-list"],
)
def test_decode_batch_after_a_bad_frame_decodes_the_next_one_whole(bad: bytes) -> None:
    frame, start = _body_frame(ev(1) + bad)
    assert iter_checked_events(frame, start)[-1][1] is not None
    frame, start = _body_frame(ev(4) + ev(5))
    assert iter_checked_events(frame, start) == [(ev(4), None), (ev(5), None)]


def test_an_error_of_any_kind_mid_frame_leaves_nothing_for_the_next_frame(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The decoder is reused between frames: a failure after it was fed (here the
    # check, as a MemoryError would) must not leave the rest of that frame in it.
    calls = []

    def failing_check(obj: Any) -> None:
        calls.append(obj)
        raise MemoryError("simulated")

    monkeypatch.setattr(frames, "check_wire_event", failing_check)
    frame, start = _body_frame(ev(1, EventType.CONTENT_START) + ev(2) + ev(3))
    with pytest.raises(MemoryError):
        decode_batch(frame, start)
    monkeypatch.undo()
    assert calls
    frame, start = _body_frame(ev(4) + ev(5))
    assert iter_checked_events(frame, start) == [(ev(4), None), (ev(5), None)]
    assert split_events(ev(6)) == [msgpack.unpackb(ev(6), timestamp=3)]


def test_decode_batch_one_str_field_fast_check_agrees_with_check_wire_event() -> None:
    # The inline check of text-delta-shaped events must refuse what the full one does.
    ts = msgpack.Timestamp(1, 0)
    bad = [
        pack({"type": "TextDelta", "data": {"text": 5}, "timestamp": ts}),
        pack({"type": "TextDelta", "data": {"index": "x"}, "timestamp": ts}),
        pack({"type": "TextDelta", "data": {"text": "x"}, "timestamp": 5}),
        pack({"type": "ContentStart", "data": {"index": "x"}, "timestamp": ts}),
        pack({"type": "Nope", "data": {"text": "x"}, "timestamp": ts}),
        pack({"type": ["TextDelta"], "data": {"text": "x"}, "timestamp": ts}),
        pack({"data": {"text": "x"}, "timestamp": ts}),
    ]
    good = [
        pack({"type": "Thinking", "data": {"thinking": "x"}, "timestamp": ts}),
        pack({"type": "TextDelta", "data": {"text": "x", "more": [1]}, "timestamp": ts}),
    ]
    frame, start = _body_frame(b"".join(bad + good))
    out = iter_checked_events(frame, start)
    assert [err is None for _, err in out] == [False] * len(bad) + [True] * len(good)


@FUZZ
@given(st.binary(max_size=300))
def test_decode_publish_arbitrary_bytes(data: bytes) -> None:
    out = only_zevents_errors(decode_publish, data)
    if out is not None:
        sid, kind, seq, start = out
        validate_stream_id(sid)
        assert kind in (KIND_EVENTS, KIND_END)
        assert 0 <= seq < 2**64
        assert start <= len(data)


@FUZZ
@given(st.binary(max_size=300))
def test_split_events_arbitrary_bytes(data: bytes) -> None:
    out = only_zevents_errors(split_events, data)
    assert out is None or isinstance(out, list)


# -- control ------------------------------------------------------------------------------


def test_control_round_trip() -> None:
    frame = encode_control("subscribe", 3, {"stream": "s", "token": b"\x01\x02", "from_seq": None})
    assert frame == pack(["subscribe", 3, {"stream": "s", "token": b"\x01\x02", "from_seq": None}])
    assert decode_control(frame) == [
        "subscribe",
        3,
        {"stream": "s", "token": b"\x01\x02", "from_seq": None},
    ]


def test_control_single_part() -> None:
    assert decode_control(encode_control("hb")) == ["hb"]


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        pack([]),
        pack({"a": 1}),
        pack("hello"),
        pack([1, 2]),
        pack([None]),
        pack([b"hello", 1]),
        pack(["hb"]) + b"\x00",  # trailing bytes
        pack(["hb", 1])[:-1],  # truncated
        b"\x92\xa2hb\x81\x91\x01\x02",  # a map with an (unhashable) list key
    ],
    ids=[
        "empty",
        "c1",
        "empty-list",
        "map",
        "str",
        "int-kind",
        "nil-kind",
        "bin-kind",
        "trailing",
        "truncated",
        "list-key",
    ],
)
def test_decode_control_malformed_raises_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_control(frame)


@FUZZ
@given(st.binary(max_size=300))
def test_decode_control_arbitrary_bytes(data: bytes) -> None:
    out = only_zevents_errors(decode_control, data)
    if out is not None:
        assert type(out) is list and out and type(out[0]) is str


def test_module_exports_exist() -> None:
    for name in frames.__all__:
        assert hasattr(frames, name), name


def test_count_events_counts_without_decoding() -> None:
    one = Event.text_delta("x").to_msgpack()
    assert frames.count_events(b"..." + one * 3, 3) == 3
    assert frames.count_events(b"..." + one * 2 + one[:-2], 3) == 3  # a cut tail is one
    assert frames.count_events(b"...", 3) == 1  # an empty body still names one pseq
    assert frames.count_events(b"..." + b"\xc1" * 5, 3) == 1  # not msgpack at all
