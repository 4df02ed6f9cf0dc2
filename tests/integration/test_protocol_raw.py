"""The wire protocol of ``docs/protocol.md``, spoken with raw frames.

Only pyzmq and msgpack here: nothing from ``zevents`` is imported, every
constant is the literal value the document gives, so these tests check the
document against a real broker process, not the SDK against itself.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq

TIMEOUT = 5.0  # seconds any single wait may take
TS = msgpack.Timestamp(1767225600, 0)  # 2026-01-01T00:00:00Z, the document's example

# -- the document's worked examples (section 19), byte for byte ----------------------

DOC_BROKER_ID = "265cd86c7f9f31f6"
DOC_CLIENT_ID = bytes(range(1, 17))
DOC_TOKEN = bytes(range(0xA0, 0xAC))


def _hex(text: str) -> bytes:
    return bytes.fromhex(" ".join(text.split()))


DOC_EVENT = _hex(
    """83 a4 74 79 70 65 a9 54 65 78 74 44 65 6c 74 61 a4 64 61 74 61 81 a4 74 65 78 74
    a2 48 69 a9 74 69 6d 65 73 74 61 6d 70 d6 ff 69 55 b9 00"""
)
DOC_INGEST = _hex(
    """73 31 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10 00 00 00 00 00 00 00 01
    83 a4 74 79 70 65 a9 54 65 78 74 44 65 6c 74 61 a4 64 61 74 61 81 a4 74 65 78 74
    a2 48 69 a9 74 69 6d 65 73 74 61 6d 70 d6 ff 69 55 b9 00"""
)
DOC_PUBLISH = _hex(
    """73 31 00 45 00 00 00 00 00 00 00 01
    83 a4 74 79 70 65 a9 54 65 78 74 44 65 6c 74 61 a4 64 61 74 61 81 a4 74 65 78 74
    a2 48 69 a9 74 69 6d 65 73 74 61 6d 70 d6 ff 69 55 b9 00"""
)
DOC_END = _hex("73 31 00 58 00 00 00 00 00 00 00 01")
DOC_ACK = _hex(
    """93 a3 61 63 6b b0 32 36 35 63 64 38 36 63 37 66 39 66 33 31 66 36
    92 a2 73 31 01"""
)
DOC_HELLO = _hex("93 a5 68 65 6c 6c 6f 01 81 a7 76 65 72 73 69 6f 6e 01")
DOC_SUBSCRIBE = _hex(
    """93 a9 73 75 62 73 63 72 69 62 65 02 84 a6 73 74 72 65 61 6d a2 73 31
    a8 66 72 6f 6d 5f 73 65 71 c0 a5 74 6f 6b 65 6e c4 0c a0 a1 a2 a3 a4 a5
    a6 a7 a8 a9 aa ab a6 63 72 65 61 74 65 c2"""
)
DOC_REPLAY = (
    _hex(
        """93 a2 6f 6b 02 88 a6 73 74 72 65 61 6d a2 73 31 a9 66 69 72 73 74 5f 73 65 71 01
        a6 65 76 65 6e 74 73 c4 2e"""
    )
    + DOC_EVENT
    + _hex(
        """a5 63 6f 75 6e 74 01
        a8 6c 61 73 74 5f 73 65 71 01 a6 63 6c 6f 73 65 64 c2
        ab 62 75 66 66 65 72 5f 73 69 7a 65 64 a6 70 6f 6c 69 63 79 a5 62 6c 6f 63 6b"""
    )
)
DOC_FETCH = _hex(
    """93 a5 66 65 74 63 68 03 82 a6 73 74 72 65 61 6d a2 73 31
    a8 66 72 6f 6d 5f 73 65 71 01"""
)
DOC_SUB_ACK = _hex("92 a3 61 63 6b 92 a2 73 31 01")
DOC_HB = _hex("92 a2 68 62 80")
DOC_HB_REPLY = _hex(
    """93 a2 68 62 b0 32 36 35 63 64 38 36 63 37 66 39 66 33 31 66 36
    91 93 a2 73 31 01 c2"""
)
DOC_CLOSED = _hex("93 a6 63 6c 6f 73 65 64 a2 73 31 01")

# -- encoding helpers (what a client in any language would write) --------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, timestamp=0, strict_map_key=False)


def event(type_: str, data: dict[str, Any], ts: Any = TS) -> bytes:
    return pack({"type": type_, "data": data, "timestamp": ts})


def text(t: str) -> bytes:
    return event("TextDelta", {"text": t})


def topic(stream: str) -> bytes:
    return stream.encode() + b"\x00"


def ingest_frame(stream: str, client_id: bytes, first_pseq: int, *events: bytes) -> bytes:
    return topic(stream) + client_id + struct.pack(">Q", first_pseq) + b"".join(events)


def new_client_id() -> bytes:
    raw = bytearray(os.urandom(16))
    raw[0] = raw[0] or 1
    return bytes(raw)


def split_publish(frame: bytes) -> tuple[str, bytes, int, bytes]:
    """``(stream, kind, seq, body)`` of a publish frame."""
    nul = frame.index(b"\x00")
    kind = frame[nul + 1 : nul + 2]
    (seq,) = struct.unpack_from(">Q", frame, nul + 2)
    return frame[:nul].decode(), kind, seq, frame[nul + 10 :]


def batch(body: bytes) -> list[dict[str, Any]]:
    unpacker = msgpack.Unpacker(raw=False, timestamp=0)
    unpacker.feed(body)
    return list(unpacker)


# -- raw sockets -----------------------------------------------------------------------


class Control:
    """A DEALER on the control socket: requests, and a stash of unprompted messages."""

    def __init__(self, sock: zmq.Socket[bytes], client_id: bytes) -> None:
        self.sock = sock
        self.client_id = client_id
        self.inbox: list[tuple[bytes, Any]] = []  # (raw, decoded), oldest first
        self._req = 100
        self.broker_id = ""

    def send(self, *parts: Any) -> None:
        self.sock.send(pack(list(parts)))

    def recv_raw(self, pred: Callable[[Any], bool], timeout: float = TIMEOUT) -> tuple[bytes, Any]:
        """The first message (stashed or new) matching ``pred``; fails at the timeout."""
        for i, (raw, msg) in enumerate(self.inbox):
            if pred(msg):
                del self.inbox[i]
                return raw, msg
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no matching control message within {timeout}s; got {self.inbox}")
            if self.sock.poll(int(left * 1000) + 1):
                raw = self.sock.recv()
                msg = unpack(raw)
                if pred(msg):
                    return raw, msg
                self.inbox.append((raw, msg))

    def recv(self, pred: Callable[[Any], bool], timeout: float = TIMEOUT) -> Any:
        return self.recv_raw(pred, timeout)[1]

    def reply_to(self, req_id: int, timeout: float = TIMEOUT) -> Any:
        return self.recv(lambda m: m[0] in ("ok", "err") and m[1] == req_id, timeout)

    def request(self, op: str, args: dict[str, Any] | None = None) -> Any:
        self._req += 1
        req_id = self._req
        self.send(op, req_id, {} if args is None else args)
        return self.reply_to(req_id)

    def ok(self, op: str, args: dict[str, Any] | None = None) -> Any:
        msg = self.request(op, args)
        assert msg[0] == "ok", msg
        return msg[2]

    def err(self, op: str, args: dict[str, Any] | None = None) -> Any:
        msg = self.request(op, args)
        assert msg[0] == "err", msg
        assert len(msg) == 5 and isinstance(msg[3], str) and isinstance(msg[4], dict)
        return msg

    def hello(self) -> dict[str, Any]:
        result: dict[str, Any] = self.ok("hello", {"version": 1})
        self.broker_id = result["broker_id"]
        return result

    def heartbeat(self) -> list[Any]:
        """Send ``hb`` and return the heads of the reply."""
        self.send("hb", {})
        msg = self.recv(lambda m: m[0] == "hb")
        assert msg[1] == self.broker_id
        heads: list[Any] = msg[2]
        return heads

    def ack_through(self, stream: str, pseq: int) -> Any:
        """Wait for a producer ack that covers ``stream`` through ``pseq``."""

        def covers(m: Any) -> bool:
            if m[0] != "ack":
                return False
            flat = m[2]
            return any(flat[i] == stream and flat[i + 1] >= pseq for i in range(0, len(flat), 2))

        return self.recv(covers)


class Net:
    """Opens sockets on one context and closes every one with linger 0."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket[bytes]] = []

    def socket(self, kind: int) -> zmq.Socket[bytes]:
        s: zmq.Socket[bytes] = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        self.socks.append(s)
        return s

    def control(self, client_id: bytes | None = None, hello: bool = True) -> Control:
        cid = client_id or new_client_id()
        s = self.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, cid)
        s.connect(self.broker.control)
        ctl = Control(s, cid)
        if hello:
            ctl.hello()
        return ctl

    def push(self) -> zmq.Socket[bytes]:
        s = self.socket(zmq.PUSH)
        s.connect(self.broker.ingest)
        return s

    def sub(self) -> zmq.Socket[bytes]:
        s = self.socket(zmq.SUB)
        s.connect(self.broker.publish)
        return s

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()


@pytest.fixture
def net(broker: Any) -> Iterator[Net]:
    n = Net(broker)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def own_net() -> Iterator[Callable[[Any], Net]]:
    """``own_net(broker_process)``: a :class:`Net` for a broker from ``make_broker``."""
    made: list[Net] = []

    def make(proc: Any) -> Net:
        n = Net(proc)
        made.append(n)
        return n

    try:
        yield make
    finally:
        for n in made:
            n.close()


def recv_pub(sub: zmq.Socket[bytes], timeout: float = TIMEOUT) -> bytes:
    if not sub.poll(int(timeout * 1000)):
        pytest.fail(f"no publish frame within {timeout}s")
    return sub.recv()


def subscribe(
    ctl: Control,
    sub: zmq.Socket[bytes],
    stream: str,
    from_seq: int | None = None,
    create: bool = False,
) -> Any:
    """The marker handshake of section 11; returns the reply message."""
    token = os.urandom(12)
    sub.subscribe(topic(stream))
    sub.subscribe(b"\x00" + token)
    msg = ctl.request(
        "subscribe", {"stream": stream, "from_seq": from_seq, "token": token, "create": create}
    )
    sub.unsubscribe(b"\x00" + token)
    return msg


def send_and_ack(push: zmq.Socket[bytes], ctl: Control, stream: str, first: int, *evs: bytes):
    push.send(ingest_frame(stream, ctl.client_id, first, *evs))
    return ctl.ack_through(stream, first + len(evs) - 1)


def wait_info(ctl: Control, stream: str, pred: Callable[[dict[str, Any]], bool]) -> Any:
    """Poll ``info`` until ``pred`` holds (a deadline loop, no sleeps)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = ctl.ok("info", {"stream": stream})
        if pred(info):
            return info
        if time.monotonic() > deadline:
            pytest.fail(f"info of {stream!r} never matched: {info}")
        ctl.sock.poll(10)  # pace the loop on the socket, not on a sleep


INFO_KEYS = {
    "stream",
    "buffer_size",
    "policy",
    "current_load",
    "first_seq",
    "last_seq",
    "closed",
    "subscribers",
    "parked",
    "events_in",
    "dropped",
    "rejected",
    "idle",
}
REPLAY_KEYS = {
    "stream",
    "first_seq",
    "events",
    "count",
    "last_seq",
    "closed",
    "buffer_size",
    "policy",
}

# -- handshake and versioning -----------------------------------------------------------


def test_hello_handshake_returns_endpoints_and_limits(broker, net):
    ctl = net.control(hello=False)
    ctl.send("hello", 1, {"version": 1})
    msg = ctl.reply_to(1)
    assert msg[0] == "ok" and msg[1] == 1
    result = msg[2]
    assert result["version"] == 1
    assert len(result["broker_id"]) == 16 and int(result["broker_id"], 16) >= 0
    assert (result["control"], result["ingest"], result["publish"]) == (
        broker.control,
        broker.ingest,
        broker.publish,
    )
    limits = result["limits"]
    assert limits == {
        "window": 4096,
        "max_message_size": 1048576,
        "max_event_size": 1048576,
        "max_batch": 1024,
        # a third of the shared broker's --subscriber-timeout 2
        "heartbeat_interval": pytest.approx(2 / 3),
        "subscriber_timeout": 2.0,
        "buffer_size": 100,
        "policy": "block",
        "require_create": False,
        "max_subscribers": 1024,
        "idle_timeout": 300.0,
        "durable": False,
        "publishes_parked": True,
    }
    # A heartbeat is answered with the broker ID and no heads (no cursors).
    ctl.broker_id = result["broker_id"]
    assert ctl.heartbeat() == []


def test_version_mismatch(net):
    ctl = net.control(hello=False)
    for args in ({"version": 2}, {"version": 0}, {}):
        ctl.send("hello", 7, args)
        msg = ctl.reply_to(7)
        assert msg[0] == "err" and msg[2] == "VERSION_MISMATCH", msg
        assert "version 1" in msg[3] and msg[4] == {}
    assert ctl.hello()["version"] == 1  # the broker still serves this client


# -- the document's worked examples, byte for byte ---------------------------------------


def test_document_examples_byte_for_byte(make_broker, own_net):
    proc = make_broker()
    net = own_net(proc)
    ctl = net.control(DOC_CLIENT_ID, hello=False)
    ctl.sock.send(DOC_HELLO)
    hello = ctl.reply_to(1)
    assert hello[0] == "ok"
    bid = hello[2]["broker_id"]
    ctl.broker_id = bid

    def with_id(doc: bytes) -> bytes:
        return doc.replace(DOC_BROKER_ID.encode(), bid.encode())

    # The event of section 19 decodes to the map the document describes.
    assert unpack(DOC_EVENT) == {"type": "TextDelta", "data": {"text": "Hi"}, "timestamp": TS}
    assert event("TextDelta", {"text": "Hi"}) == DOC_EVENT
    assert ingest_frame("s1", DOC_CLIENT_ID, 1, DOC_EVENT) == DOC_INGEST

    ctl.ok("create", {"stream": "s1"})
    sub = net.sub()
    sub.subscribe(b"s1\x00")
    sub.subscribe(b"\x00" + DOC_TOKEN)
    ctl.sock.send(DOC_SUBSCRIBE)
    empty = ctl.reply_to(2)
    assert empty[0] == "ok" and empty[2]["count"] == 0 and empty[2]["events"] == b""
    sub.unsubscribe(b"\x00" + DOC_TOKEN)

    push = net.push()
    push.send(DOC_INGEST)
    raw_ack, _ = ctl.recv_raw(lambda m: m[0] == "ack")
    assert raw_ack == with_id(DOC_ACK)
    assert recv_pub(sub) == DOC_PUBLISH

    # Not yet acknowledged: the heartbeat reports the head.
    ctl.sock.send(DOC_HB)
    raw_hb, _ = ctl.recv_raw(lambda m: m[0] == "hb")
    assert raw_hb == with_id(DOC_HB_REPLY)

    # Subscribing again (same SUB, same token, same bytes) now replays the event.
    sub.subscribe(b"\x00" + DOC_TOKEN)
    ctl.sock.send(DOC_SUBSCRIBE)
    raw_replay, _ = ctl.recv_raw(lambda m: m[0] == "ok" and m[1] == 2)
    assert raw_replay == DOC_REPLAY
    sub.unsubscribe(b"\x00" + DOC_TOKEN)

    ctl.sock.send(DOC_SUB_ACK)
    assert ctl.heartbeat() == []  # acknowledged: no longer lagging

    ctl.sock.send(DOC_FETCH)
    fetched = ctl.reply_to(3)
    assert fetched[0] == "ok"
    assert fetched[2]["events"] == DOC_EVENT and fetched[2]["first_seq"] == 1

    ctl.ok("close", {"stream": "s1"})
    assert recv_pub(sub) == DOC_END
    raw_closed, _ = ctl.recv_raw(lambda m: m[0] == "closed")
    assert raw_closed == DOC_CLOSED
    assert ctl.heartbeat() == [["s1", 1, True]]


# -- ingest and producer answers ---------------------------------------------------------


def test_ingest_two_events_acked_to_the_client_id_in_the_frame(net, stream_id):
    producer = net.control()
    bystander = net.control()
    push = net.push()
    push.send(ingest_frame(stream_id, producer.client_id, 1, text("a"), text("b")))
    ack = producer.ack_through(stream_id, 2)
    assert ack == ["ack", producer.broker_id, [stream_id, 2]]
    # pseqs go on per stream: the next frame starts at 3.
    push.send(ingest_frame(stream_id, producer.client_id, 3, text("c")))
    assert producer.ack_through(stream_id, 3)[2] == [stream_id, 3]
    # The other DEALER heard nothing: its heartbeat reply is the first thing it gets.
    assert bystander.heartbeat() == []
    assert bystander.inbox == []
    info = producer.ok("info", {"stream": stream_id})
    assert set(info) == INFO_KEYS
    assert (info["events_in"], info["first_seq"], info["last_seq"]) == (3, 1, 3)
    assert (info["buffer_size"], info["policy"], info["closed"]) == (100, "block", False)


def test_resent_pseqs_are_acked_but_not_admitted_again(net, stream_id):
    ctl = net.control()
    push = net.push()
    send_and_ack(push, ctl, stream_id, 1, text("one"), text("two"))
    send_and_ack(push, ctl, stream_id, 1, text("one"), text("two"))  # a full resend
    send_and_ack(push, ctl, stream_id, 2, text("two"), text("three"))  # overlapping
    info = ctl.ok("info", {"stream": stream_id})
    assert info["events_in"] == 3 and info["last_seq"] == 3
    replay = ctl.ok("fetch", {"stream": stream_id, "from_seq": 1})
    assert [e["data"]["text"] for e in batch(replay["events"])] == ["one", "two", "three"]


def test_invalid_events_are_nacked_one_by_one(net, stream_id):
    ctl = net.control()
    push = net.push()
    frame = ingest_frame(
        stream_id,
        ctl.client_id,
        1,
        text("ok1"),
        event("TextDelta", {"txt": "no text"}),  # 2: missing field
        event("ContentStart", {"index": True}),  # 3: bool is not an int
        event("Usage", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": -1}),  # 4
        pack({"type": "TextDelta", "data": {"text": "x"}, "timestamp": "2026-01-01T00:00:00Z"}),
        event("Bogus", {}),  # 6: unknown type
        event("TextDelta", {"text": "x", "blob": b"\x00"}),  # 7: bin value
        text("ok2"),  # 8
        b"\x83\xa4type",  # 9: truncated tail
    )
    push.send(frame)
    ack = ctl.ack_through(stream_id, 9)
    assert ack[2] == [stream_id, 9]
    # Each nack went out as soon as its event was read, before the round's ack.
    nacks = [m for _, m in ctl.inbox]
    assert [(m[0], m[1], m[2], m[3], m[4]) for m in nacks] == [
        ("nack", stream_id, p, p, "INVALID_EVENT") for p in (2, 3, 4, 5, 6, 7, 9)
    ]
    assert all(m[5].startswith("invalid event: ") and m[6] == {} for m in nacks)
    assert "truncated" in nacks[-1][5]
    info = ctl.ok("info", {"stream": stream_id})
    assert (info["events_in"], info["rejected"]) == (2, 7)


def test_bad_ingest_headers_get_no_answer_and_the_broker_keeps_serving(net, stream_id):
    ctl = net.control()
    before = ctl.ok("stats")["bad_input"].get("ingest", 0)
    push = net.push()
    push.send(b"no nul anywhere")
    push.send(b"\x00leading-nul" + ctl.client_id + bytes(8))
    push.send(topic(stream_id) + ctl.client_id[:10])  # header truncated
    push.send(b"\xff\xfe\x00" + ctl.client_id + struct.pack(">Q", 1) + text("x"))  # not UTF-8
    push.send(ingest_frame(stream_id, ctl.client_id, 1, text("fine")))
    # PUSH frames are processed in order: the good frame's ack is the first answer.
    first = ctl.recv(lambda m: True)
    assert first == ["ack", ctl.broker_id, [stream_id, 1]]
    assert ctl.ok("stats")["bad_input"]["ingest"] >= before + 4


def test_oversized_ingest_frame_is_nacked(net, stream_id):
    ctl = net.control()
    push = net.push()
    big = text("x" * (1048576 + 10))
    push.send(ingest_frame(stream_id, ctl.client_id, 1, big))
    nack = ctl.recv(lambda m: m[0] == "nack")
    assert nack[1:5] == [stream_id, 1, 1, "LIMIT_EXCEEDED"]
    assert nack[6] == {"limit": "max_message_size"}
    # Still serving.  The stream did not exist, so the broker has no record of
    # pseq 1: it asks from 1, and the producer says 1 was answered (section 13).
    push.send(ingest_frame(stream_id, ctl.client_id, 2, text("small")))
    assert ctl.recv(lambda m: m[0] == "resend") == ["resend", stream_id, 1]
    assert ctl.ok("rebase", {"stream": stream_id, "pseq": 2}) == {"next_pseq": 2}
    send_and_ack(push, ctl, stream_id, 2, text("small"))


# -- subscribing, replay, live frames ----------------------------------------------------


def test_subscribe_with_marker_gets_replay(net, stream_id):
    ctl = net.control()
    push = net.push()
    evs = [text(f"e{i}") for i in range(3)]
    send_and_ack(push, ctl, stream_id, 1, *evs)

    sub = net.sub()
    msg = subscribe(ctl, sub, stream_id)
    assert msg[0] == "ok", msg
    replay = msg[2]
    assert set(replay) == REPLAY_KEYS
    assert (replay["stream"], replay["first_seq"], replay["count"]) == (stream_id, 1, 3)
    assert (replay["last_seq"], replay["closed"]) == (3, False)
    assert (replay["buffer_size"], replay["policy"]) == (100, "block")
    assert replay["events"] == b"".join(evs)  # the bytes as they arrived

    sub2 = net.sub()
    later = subscribe(net.control(), sub2, stream_id, from_seq=2)[2]
    assert (later["first_seq"], later["count"]) == (2, 2)
    assert later["events"] == evs[1] + evs[2]

    info = ctl.ok("info", {"stream": stream_id})
    assert info["subscribers"] == 2


def test_subscribe_reply_waits_for_the_marker(net, stream_id):
    ctl = net.control()
    ctl.ok("create", {"stream": stream_id})
    sub = net.sub()
    sub.subscribe(topic(stream_id))
    token = os.urandom(12)
    args = {"stream": stream_id, "from_seq": None, "token": token, "create": False}
    ctl.send("subscribe", 9, args)
    # Processed in order on this connection: no reply yet when the heartbeat is answered.
    ctl.heartbeat()
    assert not [m for _, m in ctl.inbox if m[0] in ("ok", "err")]
    sub.subscribe(b"\x00" + token)
    msg = ctl.reply_to(9)
    assert msg[0] == "ok" and msg[2]["count"] == 0 and msg[2]["last_seq"] == 0


def test_live_publish_frame_layout(net, stream_id):
    ctl = net.control()
    sub = net.sub()
    assert subscribe(ctl, sub, stream_id, create=True)[0] == "ok"
    push = net.push()
    a, b = text("alpha"), text("beta")
    send_and_ack(push, ctl, stream_id, 1, a, b)
    frame = recv_pub(sub)
    assert frame == topic(stream_id) + b"E" + struct.pack(">Q", 1) + a + b
    sid, kind, seq, body = split_publish(frame)
    assert (sid, kind, seq) == (stream_id, b"E", 1)
    assert [e["data"]["text"] for e in batch(body)] == ["alpha", "beta"]
    c = event("Usage", {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    send_and_ack(push, ctl, stream_id, 3, c)
    assert recv_pub(sub) == topic(stream_id) + b"E" + struct.pack(">Q", 3) + c


def test_exact_topic_matching_s1_vs_s10(net, stream_id):
    s1, s10 = f"{stream_id}-s1", f"{stream_id}-s10"
    exact_ctl, exact = net.control(), net.sub()
    assert subscribe(exact_ctl, exact, s1, create=True)[0] == "ok"
    # A bare prefix (no NUL) would match both in ZeroMQ: the broker refuses it
    # (counted as bad publish input) and never puts it into effect.
    before = net.control().ok("stats")["bad_input"].get("publish", 0)
    prefix_ctl, prefix = net.control(), net.sub()
    prefix.subscribe(s1.encode())
    assert subscribe(prefix_ctl, prefix, s10, create=True)[0] == "ok"

    ctl = net.control()
    push = net.push()
    send_and_ack(push, ctl, s1, 1, text("for s1"))  # published before s10's event
    send_and_ack(push, ctl, s10, 1, text("for s10"))
    # Frames reach a SUB in publish order: had s1's matched, it would come first.
    assert split_publish(recv_pub(exact))[0] == s1
    assert split_publish(recv_pub(prefix))[0] == s10
    assert ctl.ok("stats")["bad_input"]["publish"] >= before + 1


def test_fetch(net, stream_id):
    ctl = net.control()
    push = net.push()
    evs = [text(f"f{i}") for i in range(3)]
    send_and_ack(push, ctl, stream_id, 1, *evs)
    got = ctl.ok("fetch", {"stream": stream_id, "from_seq": 2})
    assert set(got) == REPLAY_KEYS
    assert (got["first_seq"], got["count"], got["last_seq"], got["closed"]) == (2, 2, 3, False)
    assert got["events"] == evs[1] + evs[2]
    beyond = ctl.ok("fetch", {"stream": stream_id, "from_seq": 4})
    assert (beyond["first_seq"], beyond["count"], beyond["events"]) == (4, 0, b"")
    for bad in (0, None, "1"):
        err = ctl.err("fetch", {"stream": stream_id, "from_seq": bad})
        assert err[2] == "PROTOCOL_ERROR"
    missing = ctl.err("fetch", {"stream": f"{stream_id}-nope", "from_seq": 1})
    assert missing[2] == "STREAM_NOT_FOUND"
    assert missing[4] == {"stream": f"{stream_id}-nope", "op": "lookup"}
    assert ctl.ok("info", {"stream": stream_id})["subscribers"] == 0  # fetch adds no cursor


def test_replay_is_capped_at_max_batch_and_fetch_gets_the_rest(net, stream_id):
    ctl = net.control()
    ctl.ok("create", {"stream": stream_id, "buffer_size": 1100})
    push = net.push()
    for first in range(1, 1101, 220):
        send_and_ack(
            push, ctl, stream_id, first, *(text(str(i)) for i in range(first, first + 220))
        )
    sub = net.sub()
    replay = subscribe(ctl, sub, stream_id)[2]
    assert (replay["first_seq"], replay["count"], replay["last_seq"]) == (1, 1024, 1100)
    rest = ctl.ok("fetch", {"stream": stream_id, "from_seq": 1025})
    assert (rest["first_seq"], rest["count"]) == (1025, 76)
    texts = [e["data"]["text"] for e in batch(replay["events"] + rest["events"])]
    assert texts == [str(i) for i in range(1, 1101)]


def test_seq_unavailable_names_the_missing_range(net, stream_id):
    ctl = net.control()
    ctl.ok("create", {"stream": stream_id, "buffer_size": 2})
    sub = net.sub()
    assert subscribe(ctl, sub, stream_id)[0] == "ok"
    assert ctl.ok("unsubscribe", {"stream": stream_id}) == {}
    # Everyone left: the oldest event may leave, nothing parks.
    push = net.push()
    send_and_ack(push, ctl, stream_id, 1, *(text(str(i)) for i in range(1, 5)))
    info = ctl.ok("info", {"stream": stream_id})
    assert (info["first_seq"], info["last_seq"], info["current_load"]) == (3, 4, 2)
    for err in (
        ctl.request("fetch", {"stream": stream_id, "from_seq": 1}),
        subscribe(ctl, sub, stream_id, from_seq=1),
    ):
        assert err[0] == "err" and err[2] == "SEQ_UNAVAILABLE", err
        assert err[4] == {
            "stream": stream_id,
            "op": "replay",
            "first_missing": 1,
            "last_missing": 2,
        }
    oldest = subscribe(ctl, sub, stream_id)[2]
    assert (oldest["first_seq"], oldest["count"]) == (3, 2)


def test_heartbeat_heads_report_unacknowledged_streams(net, stream_id):
    ctl = net.control()
    sub = net.sub()
    assert subscribe(ctl, sub, stream_id, create=True)[0] == "ok"
    assert ctl.heartbeat() == []
    push = net.push()
    producer = net.control()
    send_and_ack(push, producer, stream_id, 1, text("a"), text("b"))
    assert ctl.heartbeat() == [[stream_id, 2, False]]
    ctl.send("ack", [stream_id, 1])
    assert ctl.heartbeat() == [[stream_id, 2, False]]
    ctl.send("ack", [stream_id, 99])  # capped at last_seq
    assert ctl.heartbeat() == []
    assert producer.heartbeat() == []  # producers have no heads


# -- buffer admission and flow control --------------------------------------------------


def test_block_parks_events_until_subscribers_acknowledge(net, stream_id):
    ctl = net.control()
    ctl.ok("create", {"stream": stream_id, "buffer_size": 2, "policy": "block"})
    push = net.push()
    # No subscriber ever: the first two stay for the first subscriber; the third parks.
    push.send(ingest_frame(stream_id, ctl.client_id, 1, text("1"), text("2"), text("3")))
    info = wait_info(ctl, stream_id, lambda i: i["parked"] == 1)
    # Parked, yet numbered and published already (seq 3): only its answer waits.
    assert (info["first_seq"], info["last_seq"], info["current_load"]) == (1, 3, 2)
    # The ack may trail the info reply by up to ack_delay (it is coalesced).
    assert ctl.recv(lambda m: m[0] == "ack")[2] == [stream_id, 2]  # pseq 3 is not answered
    assert [m for _, m in ctl.inbox if m[0] == "ack"] == []
    ctl.inbox.clear()

    sub_ctl, sub = net.control(), net.sub()
    replay = subscribe(sub_ctl, sub, stream_id)[2]
    assert (replay["first_seq"], replay["count"], replay["last_seq"]) == (1, 3, 3)
    assert [e["data"]["text"] for e in batch(replay["events"])] == ["1", "2", "3"]
    sub_ctl.send("ack", [stream_id, 1])  # seq 1 may now leave: pseq 3 is admitted
    assert ctl.ack_through(stream_id, 3)[2] == [stream_id, 3]
    info = ctl.ok("info", {"stream": stream_id})
    assert (info["first_seq"], info["last_seq"], info["parked"]) == (2, 3, 0)


def test_drop_policy_acks_and_reports_dropped(net, stream_id):
    ctl = net.control()
    ctl.ok("create", {"stream": stream_id, "buffer_size": 2, "policy": "DROP"})
    push = net.push()
    push.send(ingest_frame(stream_id, ctl.client_id, 1, text("1"), text("2"), text("3")))
    assert ctl.ack_through(stream_id, 3)[2] == [stream_id, 3]
    assert ctl.recv(lambda m: m[0] == "dropped") == ["dropped", stream_id, 1, 2]
    info = ctl.ok("info", {"stream": stream_id})
    assert (info["policy"], info["dropped"], info["last_seq"]) == ("drop", 1, 2)


def test_close_admits_parked_events_and_notifies_producers(net, stream_id):
    ctl = net.control()
    ctl.ok("create", {"stream": stream_id, "buffer_size": 1})
    push = net.push()
    push.send(ingest_frame(stream_id, ctl.client_id, 1, text("kept"), text("parked")))
    wait_info(ctl, stream_id, lambda i: i["parked"] == 1)
    closed = ctl.ok("close", {"stream": stream_id})
    assert closed["closed"] is True and closed["last_seq"] == 2
    assert (closed["parked"], closed["current_load"]) == (0, 2)  # past the buffer: it ends there
    assert ctl.recv(lambda m: m[0] == "closed") == ["closed", stream_id, 2]
    assert ctl.ack_through(stream_id, 2)[2] == [stream_id, 2]
    assert [m for _, m in ctl.inbox if m[0] == "nack"] == []


# -- stream lifecycle ------------------------------------------------------------------


def test_close_publishes_x_frame_and_stays_readable(net, stream_id):
    ctl = net.control()
    sub = net.sub()
    assert subscribe(ctl, sub, stream_id, create=True)[0] == "ok"
    push = net.push()
    a, b = text("a"), text("b")
    send_and_ack(push, ctl, stream_id, 1, a, b)
    assert split_publish(recv_pub(sub))[1:3] == (b"E", 1)
    info = ctl.ok("close", {"stream": stream_id})
    assert info["closed"] is True and info["last_seq"] == 2
    assert recv_pub(sub) == topic(stream_id) + b"X" + struct.pack(">Q", 2)
    assert ctl.recv(lambda m: m[0] == "closed") == ["closed", stream_id, 2]

    push.send(ingest_frame(stream_id, ctl.client_id, 3, text("late"), text("later")))
    nack = ctl.recv(lambda m: m[0] == "nack")
    assert nack[1:5] == [stream_id, 3, 4, "STREAM_CLOSED"]
    again = ctl.err("close", {"stream": stream_id})
    assert again[2] == "STREAM_CLOSED" and again[4] == {"stream": stream_id, "op": "access"}

    late_ctl, late_sub = net.control(), net.sub()
    replay = subscribe(late_ctl, late_sub, stream_id)[2]
    assert (replay["closed"], replay["last_seq"], replay["count"]) == (True, 2, 2)
    assert replay["events"] == a + b


def test_closed_stream_is_removed_by_cleanup(make_broker, own_net):
    proc = make_broker()
    net = own_net(proc)
    ctl = net.control()
    ctl.ok("create", {"stream": "gone"})
    ctl.ok("close", {"stream": "gone"})
    assert ctl.err("cleanup", {})[2] == "PROTOCOL_ERROR"  # the threshold is required
    assert ctl.ok("cleanup", {"threshold": 0}) == {"removed": 0}  # threshold 0: nothing
    assert ctl.ok("info", {"stream": "gone"})["closed"] is True  # still readable
    deadline = time.monotonic() + TIMEOUT
    while ctl.ok("cleanup", {"threshold": 0.001})["removed"] == 0:
        assert time.monotonic() < deadline, "cleanup never removed the idle stream"
        ctl.sock.poll(5)
    assert ctl.err("info", {"stream": "gone"})[2] == "STREAM_NOT_FOUND"
    err = subscribe(ctl, net.sub(), "gone")
    assert err[0] == "err" and err[2] == "STREAM_NOT_FOUND"
    assert err[4] == {"stream": "gone", "op": "subscribe"}
    assert ctl.ok("create", {"stream": "gone"})["last_seq"] == 0  # the name is free again


def test_admin_commands(net, stream_id):
    ctl = net.control()
    created = ctl.ok("create", {"stream": stream_id, "buffer_size": 7, "policy": "drop"})
    assert set(created) == INFO_KEYS
    assert (created["buffer_size"], created["policy"], created["last_seq"]) == (7, "drop", 0)
    exists = ctl.err("create", {"stream": stream_id})
    assert exists[2] == "STREAM_EXISTS" and exists[4] == {"stream": stream_id, "op": "create"}
    got = ctl.ok("get_or_create", {"stream": stream_id, "buffer_size": 50})
    assert got["created"] is False and got["buffer_size"] == 7  # settings unchanged
    other = f"{stream_id}-b"
    made = ctl.ok("get_or_create", {"stream": other})
    assert made["created"] is True and (made["buffer_size"], made["policy"]) == (100, "block")
    listed = ctl.ok("list")
    ids = [i["stream"] for i in listed]
    assert ids == sorted(ids) and {stream_id, other} <= set(ids)
    stats = ctl.ok("stats")
    assert set(stats) == {
        "streams",
        "open_streams",
        "subscribers",
        "clients",
        "events_in",
        "events_out",
        "dropped",
        "rejected",
        "parked",
        "bad_input",
        "limits",
        "buffered_bytes",
    }
    assert stats["streams"] >= 2 and stats["clients"] >= 1
    assert ctl.ok("unsubscribe", {"stream": stream_id}) == {}
    for op, args in (
        ("create", {"stream": f"{stream_id}-c", "buffer_size": -1}),
        ("create", {"stream": f"{stream_id}-c", "policy": "sometimes"}),
        ("cleanup", {"threshold": "soon"}),
    ):
        assert ctl.err(op, args)[2] == "PROTOCOL_ERROR"


def test_require_create_refuses_events_for_unknown_streams(make_broker, own_net):
    proc = make_broker("--require-create")
    net = own_net(proc)
    ctl = net.control()
    push = net.push()
    push.send(ingest_frame("nobody-made-me", ctl.client_id, 1, text("x"), text("y")))
    nack = ctl.recv(lambda m: m[0] == "nack")
    assert nack[1:5] == ["nobody-made-me", 1, 2, "STREAM_NOT_FOUND"]
    assert nack[6] == {"stream": "nobody-made-me", "op": "send"}
    ctl.ok("create", {"stream": "made"})
    send_and_ack(push, ctl, "made", 1, text("x"))


# -- liveness --------------------------------------------------------------------------


def test_silent_subscriber_stops_gating_after_the_timeout(make_broker, own_net):
    proc = make_broker("--subscriber-timeout", "1.5")
    net = own_net(proc)
    producer = net.control()
    producer.ok("create", {"stream": "gated", "buffer_size": 1})
    quiet, sub = net.control(), net.sub()
    assert subscribe(quiet, sub, "gated")[0] == "ok"
    push = net.push()
    push.send(ingest_frame("gated", producer.client_id, 1, text("1"), text("2")))
    wait_info(producer, "gated", lambda i: i["parked"] == 1)
    # The subscriber says nothing more: after 1.5 s it stops gating and the
    # parked event goes in.  (Waiting on the producer's socket, with a deadline.)
    started = time.monotonic()
    assert producer.ack_through("gated", 2)[2] == ["gated", 2]
    assert time.monotonic() - started < TIMEOUT
    info = producer.ok("info", {"stream": "gated"})
    assert (info["subscribers"], info["last_seq"], info["parked"]) == (0, 2, 0)
    # Speaking again does not bring the cursor back: no heads.
    assert quiet.heartbeat() == []


# -- bad control input ---------------------------------------------------------------


def test_control_errors(net, stream_id):
    ctl = net.control()
    unknown = ctl.err("frobnicate", {})
    assert unknown[2] == "PROTOCOL_ERROR" and "unknown command" in unknown[3]
    assert unknown[4] == {}

    for garbage in (b"\xc1", b"", pack({"not": "an array"}), pack([]), pack([1, 2, 3])):
        ctl.sock.send(garbage)
        msg = ctl.recv(lambda m: m[0] == "err" and m[1] == 0)
        assert msg[2] == "PROTOCOL_ERROR", msg

    ctl.send("info", 55, ["not", "a", "map"])
    assert ctl.reply_to(55)[2] == "PROTOCOL_ERROR"

    for bad in ("", "a\x00b", "x" * 257, "é" * 129, 42, None):
        err = ctl.err("info", {"stream": bad})
        assert err[2] == "INVALID_STREAM_ID", (bad, err)
        assert err[3].startswith("invalid stream id: ") and err[4] == {}
    assert ctl.err("info", {"stream": "x" * 256})[2] == "STREAM_NOT_FOUND"  # 256 is fine

    missing = ctl.err("info", {"stream": f"{stream_id}-missing"})
    assert missing[2] == "STREAM_NOT_FOUND"
    assert missing[3] == f"stream {stream_id}-missing: lookup: stream not found"

    token_err = ctl.err("subscribe", {"stream": stream_id, "token": "text, not bin"})
    assert token_err[2] == "PROTOCOL_ERROR"

    # A message of two frames after the routing ID is refused with request ID 0.
    ctl.sock.send_multipart([b"", pack(["info", 56, {"stream": stream_id}])])
    assert ctl.heartbeat() == []
    assert [m for _, m in ctl.inbox if m[0] in ("ok", "err")] == [
        ["err", 0, "PROTOCOL_ERROR", "2 frames, expected 1", {}]
    ]

    assert ctl.hello()["version"] == 1  # still serving
