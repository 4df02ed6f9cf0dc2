"""Tests for zevents.errors: the hierarchy, messages, fields, helpers and wire codes."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import msgpack
import pytest

import zevents
from zevents.errors import (
    WIRE_CODES,
    BrokerUnavailableError,
    InvalidEventError,
    InvalidStreamIdError,
    LimitExceededError,
    PermissionDeniedError,
    ProtocolError,
    ReplayUnavailableError,
    StreamClosedError,
    StreamError,
    StreamExistsError,
    StreamFullError,
    StreamNotFoundError,
    VersionMismatchError,
    ZEventsError,
    error_from_wire,
    is_invalid_event,
    is_stream_closed,
    is_stream_full,
    is_stream_not_found,
)

# One instance of every error class, with fields that differ from the defaults.
SAMPLES: list[ZEventsError] = [
    StreamError("s-1", "frobnicate", "went wrong"),
    StreamClosedError("s-closed"),
    StreamNotFoundError("s-missing"),
    StreamFullError("s-full", 37),
    StreamFullError("s-full-many", 8, dropped=5),
    StreamExistsError("s-exists"),
    ReplayUnavailableError("s-replay", 11, 42),
    InvalidEventError("text must be str"),
    InvalidStreamIdError("must not be empty"),
    ProtocolError("bad frame"),
    VersionMismatchError("peer speaks v9"),
    LimitExceededError("too many streams", "max_streams"),
    PermissionDeniedError("key may not publish"),
]

WIRE_CLASSES = [
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
]


def _fields(err: BaseException) -> dict[str, object]:
    names = (
        "stream_id",
        "op",
        "reason",
        "buffer_size",
        "dropped",
        "first_missing",
        "last_missing",
        "limit",
    )
    return {n: getattr(err, n) for n in names if hasattr(err, n)}


def _id(err: object) -> str:
    return type(err).__name__


# -- hierarchy -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (StreamError, (ZEventsError,)),
        (StreamClosedError, (StreamError, ZEventsError)),
        (StreamNotFoundError, (StreamError, ZEventsError)),
        (StreamFullError, (StreamError, ZEventsError)),
        (StreamExistsError, (StreamError, ZEventsError)),
        (InvalidEventError, (ZEventsError, ValueError)),
        (InvalidStreamIdError, (ZEventsError, ValueError)),
        (ZEventsError, (Exception,)),
    ],
)
def test_hierarchy(cls: type, bases: tuple[type, ...]) -> None:
    for base in bases:
        assert issubclass(cls, base)


@pytest.mark.parametrize(
    "cls", [StreamClosedError, StreamNotFoundError, StreamFullError, StreamExistsError]
)
def test_stream_errors_are_not_value_errors(cls: type) -> None:
    assert not issubclass(cls, ValueError)


def test_stream_error_kinds_are_distinct() -> None:
    kinds = [StreamClosedError, StreamNotFoundError, StreamFullError, StreamExistsError]
    for a in kinds:
        for b in kinds:
            if a is not b:
                assert not issubclass(a, b)


def test_errors_are_exported_from_package() -> None:
    for name in (
        "ZEventsError",
        "StreamError",
        "StreamClosedError",
        "StreamNotFoundError",
        "StreamFullError",
        "StreamExistsError",
        "InvalidEventError",
        "InvalidStreamIdError",
        "is_stream_closed",
        "is_stream_not_found",
        "is_stream_full",
        "is_invalid_event",
    ):
        assert getattr(zevents, name) is getattr(zevents.errors, name)


# -- messages and fields ----------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "op"),
    [
        (StreamClosedError("abc"), "access"),
        (StreamNotFoundError("abc"), "lookup"),
        (StreamFullError("abc", 5), "send"),
        (StreamExistsError("abc"), "create"),
    ],
    ids=_id,
)
def test_stream_error_default_op_and_str(err: StreamError, op: str) -> None:
    assert err.stream_id == "abc"
    assert err.op == op
    assert str(err).startswith(f"stream abc: {op}: ")
    reason = str(err).removeprefix(f"stream abc: {op}: ")
    assert reason  # a non-empty reason follows


def test_stream_error_str_format_with_explicit_op_and_reason() -> None:
    err = StreamError("sess-9", "replay", "nothing to see")
    assert str(err) == "stream sess-9: replay: nothing to see"
    assert (err.stream_id, err.op, err.reason) == ("sess-9", "replay", "nothing to see")


def test_stream_closed_error_accepts_custom_op() -> None:
    err = StreamClosedError("x", "send")
    assert err.op == "send"
    assert str(err).startswith("stream x: send: ")


def test_stream_full_error_fields_and_message() -> None:
    err = StreamFullError("abc", 37)
    assert err.buffer_size == 37
    assert err.stream_id == "abc"
    assert err.op == "send"
    assert "37" in str(err)
    assert str(err).startswith("stream abc: send: ")


def test_stream_full_error_message_counts_dropped() -> None:
    err = StreamFullError("abc", 4, dropped=9)
    assert err.dropped == 9
    assert "4" in str(err)
    assert "9" in str(err)


def test_invalid_event_error_message() -> None:
    err = InvalidEventError("data cannot be None")
    assert "data cannot be None" in str(err)
    assert err.reason == "data cannot be None"


def test_invalid_stream_id_error_message() -> None:
    err = InvalidStreamIdError("must not be empty")
    assert "must not be empty" in str(err)
    assert err.reason == "must not be empty"


def test_timeout_is_not_shadowed() -> None:
    assert not hasattr(zevents, "TimeoutError")
    assert not hasattr(zevents.errors, "TimeoutError")


# -- helpers ---------------------------------------------------------------------------

Helper = Callable[[BaseException | None], bool]
HELPERS: list[tuple[Helper, ZEventsError]] = [
    (is_stream_closed, StreamClosedError("s")),
    (is_stream_not_found, StreamNotFoundError("s")),
    (is_stream_full, StreamFullError("s", 3)),
    (is_invalid_event, InvalidEventError("bad")),
]
HELPER_IDS = [h.__name__ for h, _ in HELPERS]


@pytest.mark.parametrize(("helper", "err"), HELPERS, ids=HELPER_IDS)
def test_helper_true_for_the_error_itself(helper: Helper, err: ZEventsError) -> None:
    assert helper(err) is True


@pytest.mark.parametrize(("helper", "err"), HELPERS, ids=HELPER_IDS)
def test_helper_true_via_cause(helper: Helper, err: ZEventsError) -> None:
    try:
        try:
            raise err
        except ZEventsError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert outer.__cause__ is err
        assert helper(outer) is True


@pytest.mark.parametrize(("helper", "err"), HELPERS, ids=HELPER_IDS)
def test_helper_true_via_context(helper: Helper, err: ZEventsError) -> None:
    try:
        try:
            raise err
        except ZEventsError:
            raise KeyError("while handling")  # noqa: B904 (implicit __context__ on purpose)
    except KeyError as outer:
        assert outer.__cause__ is None
        assert outer.__context__ is err
        assert helper(outer) is True


@pytest.mark.parametrize(("helper", "err"), HELPERS, ids=HELPER_IDS)
def test_helper_true_deep_in_mixed_chain(helper: Helper, err: ZEventsError) -> None:
    a = OSError("a")
    b = ValueError("b")
    c = RuntimeError("c")
    a.__cause__ = b
    b.__context__ = c
    c.__cause__ = err
    assert helper(a) is True


@pytest.mark.parametrize(("helper", "err"), HELPERS, ids=HELPER_IDS)
def test_helper_false_for_other_errors(helper: Helper, err: ZEventsError) -> None:
    assert helper(None) is False
    assert helper(RuntimeError("x")) is False
    assert helper(ValueError("x")) is False
    for _, other in HELPERS:
        if type(other) is not type(err):
            assert helper(other) is False
            wrapped = RuntimeError("w")
            wrapped.__cause__ = other
            wrapped.__context__ = KeyError("k")
            assert helper(wrapped) is False


def test_helpers_distinguish_base_stream_error() -> None:
    err = StreamError("s", "op", "reason")
    for helper, _ in HELPERS:
        assert helper(err) is False


def test_helper_terminates_on_cyclic_chain() -> None:
    a = RuntimeError("a")
    b = RuntimeError("b")
    a.__context__ = b
    b.__context__ = a
    assert is_stream_closed(a) is False
    b.__cause__ = StreamClosedError("s")
    assert is_stream_closed(a) is True


# -- wire codes --------------------------------------------------------------------


def test_wire_codes_are_one_to_one() -> None:
    codes = [cls.code for cls in WIRE_CLASSES]
    assert all(isinstance(c, str) and c for c in codes)
    assert len(set(codes)) == len(codes)
    assert set(codes) == set(WIRE_CODES)
    for cls in WIRE_CLASSES:
        assert cls.code is not None
        assert type(error_from_wire(cls.code, "msg", {"stream": "s"})) is cls


def test_broker_unavailable_has_no_wire_code() -> None:
    assert BrokerUnavailableError.code is None
    assert issubclass(BrokerUnavailableError, ConnectionError)


@pytest.mark.parametrize("err", SAMPLES, ids=_id)
def test_error_from_wire_round_trip(err: ZEventsError) -> None:
    assert err.code is not None
    back = error_from_wire(err.code, str(err), err.wire_fields())
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert _fields(back) == _fields(err)


@pytest.mark.parametrize("err", SAMPLES, ids=_id)
def test_error_from_wire_round_trip_through_msgpack(err: ZEventsError) -> None:
    assert err.code is not None
    packed = msgpack.packb({"code": err.code, "message": str(err), "fields": err.wire_fields()})
    d = msgpack.unpackb(packed)
    back = error_from_wire(d["code"], d["message"], d["fields"])
    assert type(back) is type(err)
    assert _fields(back) == _fields(err)


def test_error_from_wire_unknown_code_is_protocol_error() -> None:
    err = error_from_wire("NO_SUCH_CODE", "something", {})
    assert type(err) is ProtocolError
    assert "NO_SUCH_CODE" in str(err)
    assert "something" in str(err)


def test_error_from_wire_stream_error_without_stream_field_does_not_crash() -> None:
    err = error_from_wire("STREAM_CLOSED", "closed", None)
    assert isinstance(err, ZEventsError)


def test_error_from_wire_bad_field_types_do_not_crash() -> None:
    err = error_from_wire("STREAM_FULL", "full", {"stream": "s", "buffer_size": "many"})
    assert isinstance(err, ZEventsError)


# -- pickling ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "err", [*SAMPLES, BrokerUnavailableError("no broker at tcp://x:1")], ids=_id
)
def test_pickle_round_trip(err: ZEventsError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.args == err.args
    assert _fields(back) == _fields(err)
