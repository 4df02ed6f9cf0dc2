"""Tests for zevents.protocol.session: request/reply matching, hello, liveness, restarts."""

from __future__ import annotations

from typing import Any

import pytest

from zevents.errors import (
    ProtocolError,
    ReplayUnavailableError,
    StreamFullError,
    StreamNotFoundError,
    VersionMismatchError,
)
from zevents.protocol import frames
from zevents.protocol.frames import CLIENT_ID_SIZE, PROTOCOL_VERSION
from zevents.protocol.session import Handshake, Reply, Session, new_client_id

CONTROL = "tcp://10.1.2.3:5555"


def hello_result(**over: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "broker_id": "b1",
        "control": CONTROL,
        "ingest": "tcp://10.1.2.3:5556",
        "publish": "tcp://10.1.2.3:5557",
        "limits": {"window": 256, "heartbeat_interval": 0.25},
    }
    result.update(over)
    return result


def req_id_of(frame: bytes) -> int:
    msg = frames.decode_control(frame)
    assert type(msg[1]) is int
    return msg[1]  # type: ignore[no-any-return]


def shaken(control: str = CONTROL, **over: Any) -> Session:
    s = Session(control)
    rid = req_id_of(s.hello(0.0))
    reply = s.on_reply(["ok", rid, hello_result(**over)])
    assert reply is not None and reply.tag == "hello"
    return s


# -- client IDs ---------------------------------------------------------------------------


def test_new_client_id_shape() -> None:
    ids = {new_client_id() for _ in range(200)}
    assert len(ids) == 200
    for cid in ids:
        assert len(cid) == CLIENT_ID_SIZE
        assert cid[0] != 0


def test_new_client_id_first_byte_never_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("zevents.protocol.session.os.urandom", lambda n: bytes(n))
    cid = new_client_id()
    assert cid[0] != 0 and len(cid) == CLIENT_ID_SIZE


def test_session_keeps_given_client_id() -> None:
    cid = b"\x07" * 16
    assert Session(CONTROL, cid).client_id == cid
    assert len(Session(CONTROL).client_id) == CLIENT_ID_SIZE


# -- requests and replies -------------------------------------------------------------------


def test_request_frame_layout_and_increasing_ids() -> None:
    s = Session(CONTROL)
    f1 = s.request("info", {"stream": "a"}, "t1", now=5.0)
    f2 = s.request("list", {}, "t2", now=6.0)
    assert frames.decode_control(f1) == ["info", 1, {"stream": "a"}]
    assert frames.decode_control(f2) == ["list", 2, {}]
    assert s.last_sent == 6.0


def test_replies_match_their_requests_in_any_order() -> None:
    s = Session(CONTROL)
    r1 = req_id_of(s.request("info", {"stream": "a"}, ("info", "a"), 0.0))
    r2 = req_id_of(s.request("stats", {}, "stats-tag", 0.0))
    second = s.on_reply(["ok", r2, {"streams": 3}])
    first = s.on_reply(["ok", r1, {"stream": "a"}])
    assert second == Reply("stats-tag", {"streams": 3}, None)
    assert first == Reply(("info", "a"), {"stream": "a"}, None)


def test_reply_is_matched_once() -> None:
    s = Session(CONTROL)
    rid = req_id_of(s.request("list", {}, "x", 0.0))
    assert s.on_reply(["ok", rid, []]) is not None
    assert s.on_reply(["ok", rid, []]) is None  # a duplicate reply matches nothing


@pytest.mark.parametrize(
    "msg",
    [["ok"], ["ok", 99, {}], ["ok", "1", {}], ["ok", None], ["err", 99, "STREAM_FULL", "x", {}]],
    ids=["no-id", "unknown-id", "str-id", "nil-id", "err-unknown-id"],
)
def test_unmatched_replies_are_none_and_keep_pending(msg: list[Any]) -> None:
    s = Session(CONTROL)
    rid = req_id_of(s.request("list", {}, "x", 0.0))
    assert s.on_reply(msg) is None
    assert s.on_reply(["ok", rid, []]) == Reply("x", [], None)


def test_ok_without_result() -> None:
    s = Session(CONTROL)
    rid = req_id_of(s.request("unsubscribe", {"stream": "a"}, "u", 0.0))
    assert s.on_reply(["ok", rid]) == Reply("u", None, None)


def test_err_reply_rebuilds_the_error_class() -> None:
    s = Session(CONTROL)
    rid = req_id_of(s.request("fetch", {"stream": "a", "from_seq": 1}, "f", 0.0))
    fields = {"stream": "a", "op": "replay", "first_missing": 1, "last_missing": 4}
    reply = s.on_reply(["err", rid, "SEQ_UNAVAILABLE", "stream a: replay: gone", fields])
    assert reply is not None and reply.result is None
    assert isinstance(reply.error, ReplayUnavailableError)
    assert (reply.error.first_missing, reply.error.last_missing) == (1, 4)
    assert reply.error.stream_id == "a"


def test_err_reply_stream_full_fields() -> None:
    s = Session(CONTROL)
    rid = req_id_of(s.request("x", {}, "t", 0.0))
    reply = s.on_reply(["err", rid, "STREAM_FULL", "m", {"stream": "a", "buffer_size": 9}])
    assert reply is not None
    assert isinstance(reply.error, StreamFullError) and reply.error.buffer_size == 9


@pytest.mark.parametrize(
    "msg",
    [["err", "ID"], ["err", "ID", 5], ["err", "ID", "NO_SUCH_CODE", "boom", {}]],
    ids=["bare", "int-code", "unknown-code"],
)
def test_err_reply_malformed_or_unknown_code_is_protocol_error(msg: list[Any]) -> None:
    s = Session(CONTROL)
    rid = req_id_of(s.request("x", {}, "t", 0.0))
    msg = [rid if p == "ID" else p for p in msg]
    reply = s.on_reply(msg)
    assert reply is not None
    assert type(reply.error) is ProtocolError


def test_err_reply_not_found_and_version_mismatch() -> None:
    s = Session(CONTROL)
    r1 = req_id_of(s.request("info", {"stream": "a"}, 1, 0.0))
    r2 = req_id_of(s.request("hello", {"version": 9}, 2, 0.0))
    e1 = s.on_reply(["err", r1, "STREAM_NOT_FOUND", "stream a: lookup: nope", {"stream": "a"}])
    e2 = s.on_reply(["err", r2, "VERSION_MISMATCH", "speak 1", {}])
    assert e1 is not None and isinstance(e1.error, StreamNotFoundError)
    assert e2 is not None and isinstance(e2.error, VersionMismatchError)


def test_forget_pending_returns_tags_and_clears() -> None:
    s = Session(CONTROL)
    r1 = req_id_of(s.request("a", {}, "t1", 0.0))
    s.request("b", {}, "t2", 0.0)
    assert sorted(s.forget_pending()) == ["t1", "t2"]
    assert s.forget_pending() == []
    assert s.on_reply(["ok", r1, {}]) is None
    # ids keep increasing: a late reply to an old request can never match a new one
    assert req_id_of(s.request("c", {}, "t3", 0.0)) == 3


# -- hello -----------------------------------------------------------------------------------


def test_hello_frame() -> None:
    s = Session(CONTROL)
    msg = frames.decode_control(s.hello(1.5))
    assert msg == ["hello", 1, {"version": PROTOCOL_VERSION}]
    assert s.last_sent == 1.5


def test_hello_reply_sets_handshake_and_heartbeat_interval() -> None:
    s = shaken()
    assert s.handshake == Handshake(
        broker_id="b1",
        ingest="tcp://10.1.2.3:5556",
        publish="tcp://10.1.2.3:5557",
        limits={"window": 256, "heartbeat_interval": 0.25},
    )
    assert s.heartbeat_interval == 0.25


def test_hello_without_heartbeat_interval_keeps_default() -> None:
    s = shaken(limits={"window": 8})
    assert s.heartbeat_interval == 1.0
    assert s.handshake is not None and s.handshake.limits == {"window": 8}


@pytest.mark.parametrize(
    "result",
    [
        None,
        "hello",
        [],
        {"broker_id": "b"},
        hello_result(limits=None),
        hello_result(limits=5),
        hello_result(limits={"heartbeat_interval": "soon"}),
        {k: v for k, v in hello_result().items() if k != "ingest"},
    ],
    ids=["nil", "str", "list", "partial", "limits-nil", "limits-int", "bad-interval", "no-ingest"],
)
def test_malformed_hello_reply_raises_protocol_error(result: Any) -> None:
    s = Session(CONTROL)
    rid = req_id_of(s.hello(0.0))
    with pytest.raises(ProtocolError):
        s.on_reply(["ok", rid, result])


def test_failed_hello_leaves_no_handshake() -> None:
    s = Session(CONTROL)
    rid = req_id_of(s.hello(0.0))
    with pytest.raises(ProtocolError):
        s.on_reply(["ok", rid, hello_result(limits={"heartbeat_interval": "soon"})])
    assert s.handshake is None
    assert s.heartbeat_interval == 1.0


def test_ok_reply_to_other_request_is_not_a_hello() -> None:
    s = Session(CONTROL)
    rid = req_id_of(s.request("stats", {}, "stats", 0.0))
    s.on_reply(["ok", rid, {"broker_id": "zzz"}])
    assert s.handshake is None


# -- wildcard endpoints --------------------------------------------------------------------


@pytest.mark.parametrize(
    "control, advertised, expected",
    [
        ("tcp://10.1.2.3:5555", "tcp://0.0.0.0:6000", "tcp://10.1.2.3:6000"),
        ("tcp://10.1.2.3:5555", "tcp://*:6000", "tcp://10.1.2.3:6000"),
        ("tcp://10.1.2.3:5555", "tcp://[::]:6000", "tcp://10.1.2.3:6000"),
        ("tcp://[::1]:5555", "tcp://*:6000", "tcp://[::1]:6000"),
        ("tcp://broker.local:5555", "tcp://0.0.0.0:6000", "tcp://broker.local:6000"),
        ("tcp://10.1.2.3:5555", "tcp://10.9.9.9:6000", "tcp://10.9.9.9:6000"),
        ("ipc:///tmp/ctl", "ipc:///tmp/ingest", "ipc:///tmp/ingest"),
        ("ipc:///tmp/ctl", "tcp://*:6000", "tcp://*:6000"),
    ],
)
def test_wildcard_endpoint_substitution(control: str, advertised: str, expected: str) -> None:
    s = shaken(control, ingest=advertised, publish=advertised)
    assert s.handshake is not None
    assert s.handshake.ingest == expected
    assert s.handshake.publish == expected


# -- liveness and restarts --------------------------------------------------------------------


def test_heartbeat_due_follows_last_sent() -> None:
    s = shaken()  # interval 0.25
    s.request("list", {}, "t", now=10.0)
    assert not s.heartbeat_due(10.2)
    assert s.heartbeat_due(10.25)
    frame = s.heartbeat(10.3)
    assert frames.decode_control(frame) == ["hb", {}]
    assert s.last_sent == 10.3
    assert not s.heartbeat_due(10.5)
    assert s.heartbeat_due(10.56)


def test_heard_records_time() -> None:
    s = Session(CONTROL)
    s.heard(42.0)
    assert s.last_heard == 42.0


def test_restarted() -> None:
    s = Session(CONTROL)
    assert not s.restarted("other")  # no handshake yet: nothing to compare with
    s = shaken()
    assert not s.restarted("b1")
    assert s.restarted("b2")
    assert not s.restarted(None)
    assert not s.restarted(12)


@pytest.mark.parametrize(
    ("limits", "window"),
    [
        ({"window": 4096, "publishes_parked": True}, 4096),  # memory only
        ({"window": 4096, "publishes_parked": False}, 0),  # durable
        ({"window": 4096}, 0),  # a broker that does not say
    ],
)
def test_parked_window_comes_from_the_limits(limits: dict[str, Any], window: int) -> None:
    assert Handshake("b" * 16, "tcp://i", "tcp://p", limits).parked_window == window
