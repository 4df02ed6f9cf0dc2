"""Tests for zevents.protocol.producer: windows, acks, nacks, drops, closes, resends."""

from __future__ import annotations

from typing import Any

import pytest

from zevents.errors import (
    InvalidEventError,
    LimitExceededError,
    StreamClosedError,
    StreamFullError,
)
from zevents.protocol import frames
from zevents.protocol.producer import ProducerState, StreamClosed

CID = b"\x01" * 16


def raw(i: int) -> bytes:
    # the producer never looks inside events: any bytes stand for one
    return b"<" + str(i).encode() + b">"


def decode(frame: bytes) -> tuple[str, bytes, int, bytes]:
    hdr = frames.decode_ingest_header(frame)
    return hdr.stream_id, hdr.client_id, hdr.first_pseq, frame[hdr.body_start :]


def ack(*pairs: Any) -> list[Any]:
    return ["ack", "broker-1", list(pairs)]


def nack(
    sid: str, first: int, last: int, code: str, fields: dict[str, Any] | None = None
) -> list[Any]:
    return [
        "nack",
        sid,
        first,
        last,
        code,
        f"stream {sid}: send: no",
        fields or {"stream": sid, "op": "send"},
    ]


def sent(p: ProducerState, sid: str, n: int) -> list[bytes]:
    """Send events 1..n to ``sid`` one frame each; the frames."""
    return [p.encode(sid, [raw(i)]) for i in range(n)]


# -- encoding and windows ----------------------------------------------------------------


def test_encode_numbers_pseqs_per_stream() -> None:
    p = ProducerState(CID)
    f1 = p.encode("a", [raw(1), raw(2)])
    f2 = p.encode("a", [raw(3)])
    f3 = p.encode("b", [raw(9)])
    assert decode(f1) == ("a", CID, 1, raw(1) + raw(2))
    assert decode(f2) == ("a", CID, 3, raw(3))
    assert decode(f3) == ("b", CID, 1, raw(9))


def test_room_shrinks_with_unanswered_events_and_grows_with_acks() -> None:
    p = ProducerState(CID, window=4)
    assert p.room("a") == 4
    p.encode("a", [raw(1), raw(2), raw(3)])
    assert p.room("a") == 1
    assert p.room("b") == 4  # windows are per stream
    assert p.unanswered("a") == 3 and p.unanswered() == 3
    p.on_message(ack("a", 2))
    assert p.room("a") == 3
    assert p.unanswered("a") == 1


def test_sendable_takes_what_fits_but_no_sliver_of_a_full_window() -> None:
    p = ProducerState(CID, window=16)  # a quarter window: 4
    assert p.sendable("a", 40) == 16
    p.encode("a", [raw(i) for i in range(13)])  # room 3
    assert p.sendable("a", 2) == 2  # all of it fits: it goes
    assert p.sendable("a", 3) == 3
    assert p.sendable("a", 10) == 0  # 3 of 10 would be a sliver: wait for 4
    p.on_message(ack("a", 1))  # room 4, a quarter window
    assert p.sendable("a", 10) == 4
    assert p.sendable("a", 10, queued=1) == 0  # 1 of the 4 is queued already
    assert ProducerState(CID, window=2).sendable("a", 5) == 2  # quarter of 2: 1


def test_a_wait_for_room_goes_on_for_a_chunk_or_for_news() -> None:
    p = ProducerState(CID, window=16)
    p.encode("a", [raw(i) for i in range(14)])  # room 2: no chunk of 10
    assert not p.may_go_on("a", 10)
    p.on_message(nack("a", 1, 1, "STREAM_FULL", {"stream": "a", "op": "send", "buffer_size": 1}))
    assert p.sendable("a", 10) == 0  # room 3: still no chunk
    assert p.may_go_on("a", 10)  # but the nack's error is news to raise
    with pytest.raises(StreamFullError):
        p.check("a")
    assert not p.may_go_on("a", 10)


def test_acks_are_cumulative_and_idempotent() -> None:
    p = ProducerState(CID)
    sent(p, "a", 5)
    p.on_message(ack("a", 3))
    assert p.unanswered("a") == 2
    p.on_message(ack("a", 2))  # an older ack changes nothing
    assert p.unanswered("a") == 2
    p.on_message(ack("a", 5))
    assert p.unanswered("a") == 0


def test_ack_carries_many_streams_and_ignores_unknown() -> None:
    p = ProducerState(CID)
    sent(p, "a", 3)
    sent(p, "b", 3)
    assert p.on_message(ack("a", 1, "zzz", 9, "b", 3)) == []
    assert (p.unanswered("a"), p.unanswered("b")) == (2, 0)
    assert p.unanswered("zzz") == 0


def test_empty_or_short_ack_is_harmless() -> None:
    p = ProducerState(CID)
    sent(p, "a", 2)
    p.on_message(["ack"])
    p.on_message(["ack", "b"])
    p.on_message(ack())
    assert p.unanswered("a") == 2


# -- nacks ----------------------------------------------------------------------------------


def test_nack_answers_its_range_and_error_is_raised_once() -> None:
    p = ProducerState(CID)
    sent(p, "a", 5)
    fields = {"stream": "a", "op": "send"}
    p.on_message(["nack", "a", 2, 3, "INVALID_EVENT", "invalid event: data must be a dict", fields])
    assert p.unanswered("a") == 3  # 1, 4, 5
    with pytest.raises(InvalidEventError):
        p.check("a")
    p.check("a")  # once only
    p.on_message(ack("a", 5))  # the cumulative ack passes the nacked range
    assert p.unanswered("a") == 0


def test_nack_range_over_holes() -> None:
    p = ProducerState(CID)
    sent(p, "a", 6)
    p.on_message(nack("a", 3, 3, "INVALID_EVENT", {}))
    # unanswered: 1 2 4 5 6; a nack of 2..5 answers 2, 4 and 5 (3 already was)
    p.on_message(nack("a", 2, 5, "LIMIT_EXCEEDED", {"limit": "max_message_size"}))
    assert p.unanswered("a") == 2
    resent = [decode(f)[2] for f in p.resend()]
    assert resent == [1, 6]
    with pytest.raises(LimitExceededError):
        p.check("a")


def test_nack_for_unknown_stream_is_ignored() -> None:
    p = ProducerState(CID)
    sent(p, "a", 2)
    p.on_message(nack("b", 1, 2, "INVALID_EVENT"))
    assert p.unanswered("a") == 2
    p.check("a")
    p.check("b")


def test_short_nack_is_ignored() -> None:
    p = ProducerState(CID)
    sent(p, "a", 2)
    p.on_message(["nack", "a", 1, 2])
    assert p.unanswered("a") == 2


def test_nack_stream_closed_closes_for_good() -> None:
    p = ProducerState(CID)
    sent(p, "a", 3)
    p.on_message(nack("a", 1, 3, "STREAM_CLOSED"))
    assert p.is_closed("a")
    assert p.unanswered("a") == 0
    for _ in range(3):
        with pytest.raises(StreamClosedError):
            p.check("a")


def test_nack_stream_full_from_parking_limit() -> None:
    p = ProducerState(CID)
    sent(p, "a", 2)
    p.on_message(nack("a", 2, 2, "STREAM_FULL", {"stream": "a", "op": "send", "buffer_size": 7}))
    with pytest.raises(StreamFullError) as info:
        p.check("a")
    assert info.value.buffer_size == 7
    p.check("a")


# -- drops -----------------------------------------------------------------------------------


def test_dropped_raises_stream_full_once() -> None:
    p = ProducerState(CID)
    sent(p, "a", 3)
    p.on_message(ack("a", 3))
    p.on_message(["dropped", "a", 1, 10])
    with pytest.raises(StreamFullError) as info:
        p.check("a")
    assert info.value.stream_id == "a"
    assert info.value.buffer_size == 10
    assert info.value.dropped == 1
    p.check("a")  # raised once
    p.check("b")


def test_dropped_counts_accumulate_until_raised() -> None:
    p = ProducerState(CID)
    sent(p, "a", 5)
    p.on_message(["dropped", "a", 2, 10])
    p.on_message(["dropped", "a", 3, 10])
    with pytest.raises(StreamFullError) as info:
        p.check("a")
    assert info.value.dropped == 5
    p.on_message(["dropped", "a", 1, 10])
    with pytest.raises(StreamFullError) as info:
        p.check("a")
    assert info.value.dropped == 1


def test_dropped_for_unknown_stream_or_short_is_ignored() -> None:
    p = ProducerState(CID)
    sent(p, "a", 1)
    p.on_message(["dropped", "b", 1, 10])
    p.on_message(["dropped", "a", 1])
    p.check("a")
    p.check("b")


# -- closes --------------------------------------------------------------------------------


def test_closed_reports_once_and_raises_every_time() -> None:
    p = ProducerState(CID)
    sent(p, "a", 3)
    assert p.on_message(["closed", "a", 17]) == [StreamClosed("a", 17)]
    assert p.is_closed("a")
    assert p.unanswered("a") == 0
    assert p.on_message(["closed", "a", 17]) == []  # told once
    for _ in range(3):
        with pytest.raises(StreamClosedError) as info:
            p.check("a")
        assert info.value.stream_id == "a" and info.value.op == "send"


def test_closed_beats_a_pending_drop() -> None:
    p = ProducerState(CID)
    sent(p, "a", 1)
    p.on_message(["dropped", "a", 1, 10])
    p.on_message(["closed", "a", 3])
    for _ in range(2):
        with pytest.raises(StreamClosedError):
            p.check("a")


def test_closed_for_a_stream_never_sent_to() -> None:
    p = ProducerState(CID)
    assert p.on_message(["closed", "fresh", 0]) == [StreamClosed("fresh", 0)]
    with pytest.raises(StreamClosedError):
        p.check("fresh")


def test_forget_starts_a_stream_afresh() -> None:
    p = ProducerState(CID)
    sent(p, "a", 2)
    p.on_message(["closed", "a", 2])
    p.forget("a")
    assert not p.is_closed("a")
    p.check("a")
    assert decode(p.encode("a", [raw(1)]))[2] == 1


def test_unknown_message_kind_is_ignored() -> None:
    p = ProducerState(CID)
    sent(p, "a", 1)
    assert p.on_message(["weird", 1, 2]) == []
    assert p.unanswered("a") == 1


# -- resend after a broker restart -----------------------------------------------------------


def test_resend_contiguous_unanswered_as_one_frame_per_stream() -> None:
    p = ProducerState(CID)
    p.encode("a", [raw(1), raw(2)])
    p.encode("a", [raw(3)])
    p.encode("b", [raw(10)])
    p.on_message(ack("a", 1))
    out = sorted(decode(f) for f in p.resend())
    assert out == [("a", CID, 2, raw(2) + raw(3)), ("b", CID, 1, raw(10))]
    # resending does not answer anything or renumber
    assert p.unanswered() == 3
    assert decode(p.encode("a", [raw(4)]))[2] == 4


def test_resend_with_holes_keeps_each_pseq() -> None:
    p = ProducerState(CID)
    p.encode("a", [raw(i) for i in range(1, 6)])
    p.on_message(nack("a", 2, 2, "INVALID_EVENT", {}))
    p.on_message(nack("a", 4, 4, "INVALID_EVENT", {}))
    out = [decode(f) for f in p.resend()]
    assert [(pseq, body) for _, _, pseq, body in out] == [(1, raw(1)), (3, raw(3)), (5, raw(5))]


def test_resend_skips_closed_and_answered_streams() -> None:
    p = ProducerState(CID)
    sent(p, "a", 2)
    sent(p, "b", 2)
    sent(p, "c", 1)
    p.on_message(["closed", "a", 9])
    p.on_message(ack("b", 2))
    assert [decode(f)[0] for f in p.resend()] == ["c"]


def test_resend_nothing_when_all_answered() -> None:
    p = ProducerState(CID)
    sent(p, "a", 2)
    p.on_message(ack("a", 2))
    assert p.resend() == []
