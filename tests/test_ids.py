"""Tests for zevents.ids: what makes a valid stream ID."""

from __future__ import annotations

import pytest

import zevents
from zevents.errors import InvalidStreamIdError, ZEventsError
from zevents.ids import MAX_STREAM_ID_BYTES, validate_stream_id


def test_limit_is_256_bytes() -> None:
    assert MAX_STREAM_ID_BYTES == 256
    assert zevents.MAX_STREAM_ID_BYTES == 256
    assert zevents.validate_stream_id is validate_stream_id


@pytest.mark.parametrize(
    "stream_id",
    [
        "a",
        "session-1",
        "user:123/conv 7",
        "a" * 256,
        "é" * 128,  # 2 bytes each: exactly 256
        "€" * 85 + "a",  # 3 * 85 + 1 = 256
        "😀" * 64,  # 4 bytes each: exactly 256
        " ",
        "\t\n",
    ],
    ids=lambda s: f"{len(s)}chars-{len(s.encode())}bytes",
)
def test_valid_ids_are_returned(stream_id: str) -> None:
    assert validate_stream_id(stream_id) is stream_id


@pytest.mark.parametrize(
    "stream_id",
    [
        "a" * 257,
        "é" * 128 + "a",  # 129 chars, 257 bytes
        "€" * 85 + "ab",  # 87 chars, 257 bytes
        "😀" * 64 + "a",  # 65 chars, 257 bytes
        "😀" * 65,
        "a" * 10_000,
    ],
    ids=lambda s: f"{len(s)}chars-{len(s.encode())}bytes",
)
def test_ids_over_256_utf8_bytes_are_rejected(stream_id: str) -> None:
    assert len(stream_id) <= 256 or stream_id.isascii()  # counted in bytes, not chars
    with pytest.raises(InvalidStreamIdError):
        validate_stream_id(stream_id)


def test_empty_id_is_rejected() -> None:
    with pytest.raises(InvalidStreamIdError):
        validate_stream_id("")


@pytest.mark.parametrize("stream_id", ["\x00", "a\x00b", "abc\x00", "\x00abc"])
def test_nul_is_rejected(stream_id: str) -> None:
    with pytest.raises(InvalidStreamIdError):
        validate_stream_id(stream_id)


@pytest.mark.parametrize("stream_id", [None, 5, 1.5, b"abc", bytearray(b"abc"), ["a"], object()])
def test_non_str_is_rejected(stream_id: object) -> None:
    with pytest.raises(InvalidStreamIdError):
        validate_stream_id(stream_id)


def test_lone_surrogate_is_rejected() -> None:
    with pytest.raises(InvalidStreamIdError):
        validate_stream_id("a\ud800b")


def test_error_is_a_value_error_and_zevents_error() -> None:
    with pytest.raises(InvalidStreamIdError) as info:
        validate_stream_id("")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ZEventsError)
