"""Faults: garbage on every socket, oversized messages, killed producers and brokers.

Raw sockets are pyzmq with linger 0, always closed; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from _sdk_helpers import Follower, raw_socket

from zevents import (
    Admin,
    AsyncSubscriber,
    BrokerUnavailableError,
    Event,
    LimitExceededError,
    Producer,
    StreamNotFoundError,
    Subscriber,
)
from zevents.protocol import frames

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
CLEAR_END = (BrokerUnavailableError, StreamNotFoundError)


# -- helpers -------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def recv_control(sock: zmq.Socket[Any], timeout: float) -> list[Any] | None:
    """The next control message on ``sock``, or None after ``timeout`` seconds."""
    if not sock.poll(int(timeout * 1000)):
        return None
    return msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)  # type: ignore[no-any-return]


def request(sock: zmq.Socket[Any], frame: bytes, timeout: float = 5) -> list[Any]:
    sock.send(frame)
    reply = recv_control(sock, timeout)
    assert reply is not None, f"no reply to {frame!r} within {timeout}s"
    return reply


def endpoints(control: str) -> tuple[str, str]:
    """``(ingest, publish)`` as the broker's handshake gives them."""
    with Admin(control) as admin:
        hs = admin.handshake
    return hs.ingest, hs.publish


def bad_input(control: str) -> dict[str, int]:
    with Admin(control) as admin:
        return dict(admin.stats().bad_input)


def read_until(pipe: Any, text: bytes, timeout: float) -> bytes:
    """What a subprocess wrote to ``pipe`` until ``text`` appeared (bounded by ``timeout``)."""
    got = b""
    deadline = time.monotonic() + timeout
    while text not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} not seen within {timeout}s; got {got!r}"
        ready, _, _ = select.select([pipe], [], [], left)
        if ready:
            chunk = os.read(pipe.fileno(), 4096)
            assert chunk, f"pipe closed before {text!r}; got {got!r}"
            got += chunk
    return got


def client_id() -> bytes:
    return b"\x01" + os.urandom(frames.CLIENT_ID_SIZE - 1)


# -- garbage -------------------------------------------------------------------------


def header_garbage(rnd: random.Random) -> list[bytes]:
    """Ingest frames whose header cannot be parsed (no reply address is known)."""
    return [
        b"",
        b"\x00no-stream-id",
        b"\x01" * 300,  # no NUL where a stream ID must end
        b"\xff\xfe\xfd\x00" + bytes(24),  # stream ID not UTF-8
        frames.topic("garbage") + b"short",  # truncated header
        frames.topic("garbage") + client_id()[:9],
        b"\x00" + rnd.randbytes(rnd.randint(0, 64)),
    ]


def body_garbage(stream: str) -> list[bytes]:
    """Ingest frames with a good header (each from a new producer) and a bad first event."""
    good = Event.text_delta("fine").to_msgpack()
    bodies = [
        b"\xc1",  # never valid msgpack
        good[: len(good) // 2],  # truncated event
        pack([1, 2, 3]),  # not a map
        pack({"type": "TextDelta", "data": {"text": "x"}}),  # no timestamp
        pack({"type": "TextDelta", "data": {"text": 7}, "timestamp": msgpack.Timestamp(1, 0)}),
        pack({"type": "Bogus", "data": {}, "timestamp": msgpack.Timestamp(1, 0)}),
        pack({"type": "TextDelta", "data": None, "timestamp": msgpack.Timestamp(1, 0)}),
        pack({"type": "TextDelta", "data": {"text": "x"}, "timestamp": "yesterday"}),
        pack(
            {
                "type": "Usage",
                "data": {"prompt_tokens": -1, "completion_tokens": 0, "total_tokens": 0},
                "timestamp": msgpack.Timestamp(1, 0),
            }
        ),
        pack({"type": 5, "data": {}, "timestamp": msgpack.Timestamp(1, 0)}),
    ]
    topic = frames.topic(stream)
    return [frames.encode_ingest(topic, client_id(), 1, body) for body in bodies]


def control_garbage(
    next_id: Callable[[], int], valid: str, junk: str
) -> list[tuple[bytes, int, str]]:
    """``(frame, req_id of the reply, error code)`` for control messages the broker must refuse."""
    undecodable = [
        b"",
        b"\xc1\xc1\xc1",
        b"\x92\xa3\xff\xfe\xfd\x01",  # a str that is not UTF-8
        pack({"op": "stats"}),
        pack(42),
        pack("stats"),
        pack([]),
        pack([7, 1, {}]),
        pack([None]),
    ]
    out = [(frame, 0, "PROTOCOL_ERROR") for frame in undecodable]
    for build, code in [
        (lambda r: ["frobnicate", r, {}], "PROTOCOL_ERROR"),
        (lambda r: ["info", r, [1, 2]], "PROTOCOL_ERROR"),
        (lambda r: ["stats", r, "everything"], "PROTOCOL_ERROR"),
        (lambda r: ["info", r, {"stream": 5}], "INVALID_STREAM_ID"),
        (lambda r: ["info", r, {"stream": ""}], "INVALID_STREAM_ID"),
        (lambda r: ["info", r, {"stream": "x" * 300}], "INVALID_STREAM_ID"),
        (lambda r: ["info", r, {}], "INVALID_STREAM_ID"),
        (lambda r: ["create", r, {"stream": b"bytes"}], "INVALID_STREAM_ID"),
        (lambda r: ["create", r, {"stream": junk, "buffer_size": "big"}], "PROTOCOL_ERROR"),
        (lambda r: ["create", r, {"stream": junk, "buffer_size": -3}], "PROTOCOL_ERROR"),
        (lambda r: ["create", r, {"stream": junk, "policy": 5}], "PROTOCOL_ERROR"),
        (lambda r: ["get_or_create", r, {"stream": junk, "policy": [1]}], "PROTOCOL_ERROR"),
        (lambda r: ["fetch", r, {"stream": valid, "from_seq": "x"}], "PROTOCOL_ERROR"),
        (lambda r: ["fetch", r, {"stream": valid, "from_seq": 0}], "PROTOCOL_ERROR"),
        (lambda r: ["subscribe", r, {"stream": valid, "token": 5}], "PROTOCOL_ERROR"),
        (lambda r: ["subscribe", r, {"stream": valid, "token": b""}], "PROTOCOL_ERROR"),
        (lambda r: ["cleanup", r, {"threshold": "soon"}], "PROTOCOL_ERROR"),
        (lambda r: ["hello", r, {"version": 99}], "VERSION_MISMATCH"),
        (lambda r: ["close", r, {"stream": f"{junk}-never"}], "STREAM_NOT_FOUND"),
    ]:
        r = next_id()
        out.append((pack(build(r)), r, code))
    return out


def multi_frame_control_garbage() -> list[list[bytes]]:
    """Control messages of more than one frame (answered with request ID 0)."""
    return [[b"two", b"frames"], [pack(["stats", 1, {}]), b"trailing frame"], [b"", b"", b""]]


def ack_garbage(valid: str) -> list[bytes]:
    """Acks, which get no reply by design: malformed, or stray (from a non-subscriber)."""
    return [
        pack(["ack", "not a list"]),
        pack(["ack", [valid]]),
        pack(["ack", [1, 2]]),
        pack(["ack", [valid, "x"]]),
        pack(["ack", [valid, 0]]),  # stray: this client never subscribed
        pack(["ack", [valid, 2**63]]),
        pack(["ack", ["no-such-stream", 1]]),
        pack(["ack"]),
    ]


def publish_garbage(rnd: random.Random) -> list[bytes]:
    """Messages an XSUB peer may send the XPUB socket that are no valid subscription."""
    return [
        b"",
        b"\x07junk",
        b"\x02",
        bytes([rnd.randint(2, 255)]) + rnd.randbytes(rnd.randint(0, 40)),
        b"\x01\x00" + os.urandom(12),  # a marker nobody asked for
        b"\x01" + frames.topic(f"nobody-{rnd.random()}"),
        b"\x00" + rnd.randbytes(8),  # unsubscribe from what was never subscribed
    ]


def test_garbage_on_every_socket_leaves_the_broker_serving(make_broker, zctx, stream_id):
    b = make_broker("--subscriber-timeout", "10")
    ingest, publish = endpoints(b.control)
    before = bad_input(b.control)
    junk = f"{stream_id}-junk"
    rnd = random.Random(1234)

    follower = Follower(b.control, stream_id)
    sent: list[str] = []
    stop = threading.Event()
    producer_error: list[BaseException] = []

    def produce() -> None:
        try:
            with Producer(b.control, timeout=10) as producer:
                while not stop.is_set() or len(sent) < 1000:
                    batch = [f"v{len(sent) + i}" for i in range(20)]
                    producer.send_many(stream_id, [Event.text_delta(t) for t in batch], 10)
                    sent.extend(batch)
                producer.flush(timeout=20)
            with Admin(b.control) as admin:
                admin.close_stream(stream_id)
        except BaseException as exc:
            producer_error.append(exc)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()

    ids = iter(range(1, 10**9))
    expected: dict[int, str] = {}  # request ID -> the error code its reply must carry
    zero_id_sent = 0  # undecodable requests: answered with request ID 0
    errs: list[list[Any]] = []
    others: list[list[Any]] = []
    counts = {"ingest": 0, "event": 0, "control": 0, "command": 0}

    def answered() -> bool:
        ids_in = {r[1] for r in errs}
        return set(expected) <= ids_in and sum(1 for r in errs if r[1] == 0) >= zero_id_sent

    with (
        raw_socket(zctx, zmq.PUSH, ingest) as push,
        raw_socket(zctx, zmq.DEALER, b.control) as dealer,
        raw_socket(zctx, zmq.XSUB, publish) as xsub,
    ):
        valid_before = len(follower.events)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for frame in header_garbage(rnd):
                push.send(frame)
                counts["ingest"] += 1
            for frame in body_garbage(junk):
                push.send(frame)
                counts["event"] += 1
            push.send(rnd.randbytes(rnd.randint(0, 200)))  # whatever it is, it is not S
            push.send_multipart([b"\x00part one", b"\x00part two"])
            counts["ingest"] += 2
            for frame, req_id, code in control_garbage(lambda: next(ids), stream_id, junk):
                dealer.send(frame)
                if req_id:
                    expected[req_id] = code
                    if code in ("PROTOCOL_ERROR", "INVALID_STREAM_ID"):
                        counts["command"] += 1
                else:
                    zero_id_sent += 1
                    counts["control"] += 1
            for parts in multi_frame_control_garbage():
                dealer.send_multipart(parts)
                zero_id_sent += 1
                counts["control"] += 1
            for frame in ack_garbage(stream_id):
                dealer.send(frame)
            for frame in publish_garbage(rnd):
                xsub.send(frame)
            # pace the garbage by the broker: every refused request is answered
            end = time.monotonic() + 10
            while not answered():
                assert time.monotonic() < end, "error replies missing"
                reply = recv_control(dealer, 0.1)
                if reply is not None:
                    (errs if reply[0] == "err" else others).append(reply)
        valid_during = len(follower.events) - valid_before
        stop.set()
        stopped = time.monotonic()

    producer.join(timeout=30)
    assert not producer.is_alive() and not producer_error, producer_error
    # nothing left the valid stream wedged (a stuck gate would hold it for 10 s)
    assert time.monotonic() - stopped < 5, "the valid producer stalled after the garbage"
    assert follower.join(timeout=30), "the follower did not finish in time"
    assert follower.outcome == "ended", follower.outcome
    # valid traffic lost nothing, in order, with no duplicate
    assert [e.seq for e in follower.events] == list(range(1, len(sent) + 1))
    assert [e.data["text"] for e in follower.events] == sent

    assert valid_during > 0, "valid traffic stalled while the garbage came in"
    assert others == [], others  # garbage is never answered "ok"
    got_codes = {r[1]: r[2] for r in errs if r[1]}
    assert {rid: got_codes[rid] for rid in expected} == expected
    assert all(r[2] == "PROTOCOL_ERROR" for r in errs if r[1] == 0)
    assert all(isinstance(r[3], str) and r[3] for r in errs)  # a message for humans too

    os.kill(b.pid, 0)  # still running
    after = bad_input(b.control)
    for kind in ("ingest", "event", "control", "command"):
        assert after.get(kind, 0) - before.get(kind, 0) >= counts[kind], (kind, before, after)
    assert "Traceback" not in b.log
    with Admin(b.control) as admin:
        info = admin.stream_info(stream_id)
    assert (info.last_seq, info.closed) == (len(sent), True)


def test_multi_frame_control_message_gets_an_error_reply(broker, zctx):
    with raw_socket(zctx, zmq.DEALER, broker.control) as dealer:
        dealer.send_multipart([pack(["stats", 1, {}]), b"trailing frame"])
        reply = recv_control(dealer, 2)
    assert reply is not None, "no reply to a two-frame control message"
    assert reply[0] == "err" and reply[2] == "PROTOCOL_ERROR"


def test_every_malformed_control_request_is_counted(make_broker, zctx, stream_id):
    b = make_broker()
    with Admin(b.control) as admin:
        admin.create_stream(stream_id)
    malformed = [
        ["info", 1, [1, 2]],  # arguments not a map
        ["info", 2, {"stream": 5}],  # invalid stream ID
        ["create", 3, {"stream": f"{stream_id}-new", "buffer_size": "big"}],
        ["fetch", 4, {"stream": stream_id, "from_seq": "x"}],
        ["subscribe", 5, {"stream": stream_id, "token": 5}],
        ["cleanup", 6, {"threshold": "soon"}],
    ]
    before = sum(bad_input(b.control).values())
    with raw_socket(zctx, zmq.DEALER, b.control) as dealer:
        for msg in malformed:
            reply = request(dealer, pack(msg))
            assert reply[:2] == ["err", msg[1]]
            assert reply[2] in ("PROTOCOL_ERROR", "INVALID_STREAM_ID")
    assert sum(bad_input(b.control).values()) - before >= len(malformed)


def test_garbage_on_the_publish_socket_is_counted(make_broker, zctx, wait_until):
    b = make_broker()
    _, publish = endpoints(b.control)
    with raw_socket(zctx, zmq.XSUB, publish) as xsub:
        for frame in (b"", b"\x07junk", b"\x02", b"\xffgarbage"):
            xsub.send(frame)
        wait_until(lambda: sum(bad_input(b.control).values()) >= 4, timeout=2)


def test_a_stray_ack_does_not_make_a_client_gate_the_stream(make_broker, zctx, stream_id):
    b = make_broker("--subscriber-timeout", "10")
    with Admin(b.control) as admin:
        admin.create_stream(stream_id, buffer_size=5)
    follower = Follower(b.control, stream_id)
    with raw_socket(zctx, zmq.DEALER, b.control) as dealer:
        assert request(dealer, pack(["hello", 1, {"version": 1}]))[0] == "ok"
        dealer.send(pack(["ack", [stream_id, 0]]))  # never subscribed to it
        assert request(dealer, pack(["stats", 2, {}]))[0] == "ok"  # the ack was taken
        with Producer(b.control) as producer:
            producer.send_many(stream_id, [Event.text_delta(str(i)) for i in range(20)])
            producer.flush(timeout=2)  # the follower reads and acknowledges everything
        with Admin(b.control) as admin:
            assert admin.stream_info(stream_id).subscribers == 1
            admin.close_stream(stream_id)
    assert follower.join(timeout=10), "the follower did not finish in time"
    assert [e.seq for e in follower.events] == list(range(1, 21))


def test_subscriptions_from_a_raw_xsub_do_not_disturb_a_subscriber(broker, zctx, stream_id):
    _, publish = endpoints(broker.control)
    with raw_socket(zctx, zmq.XSUB, publish) as xsub:
        # a subscription to the stream's prefix, an empty one, stray markers
        for frame in (b"\x01" + stream_id.encode(), b"\x01\x00", b"\x01\x00" + os.urandom(12)):
            xsub.send(frame)
        with Producer(broker.control) as producer, Subscriber(broker.control) as sub:
            following = sub.subscribe(stream_id, create=True)
            producer.send_many(stream_id, [Event.text_delta(str(i)) for i in range(50)])
            got = [following.next_event(timeout=10) for _ in range(50)]
    assert [e.seq for e in got if e is not None] == list(range(1, 51))


# -- oversized -------------------------------------------------------------------------


def test_oversized_ingest_message_gets_a_nack_and_the_broker_keeps_serving(broker, zctx, stream_id):
    ingest, _ = endpoints(broker.control)
    before = bad_input(broker.control).get("oversized", 0)
    cid = client_id()
    big = Event.text_delta("x" * (MIB + MIB // 2)).to_msgpack()  # 1.5 MiB: over 1, under 2
    with (
        raw_socket(zctx, zmq.DEALER, broker.control, routing_id=cid) as dealer,
        raw_socket(zctx, zmq.PUSH, ingest) as push,
    ):
        hello = request(dealer, pack(["hello", 1, {"version": 1}]))
        assert hello[0] == "ok" and hello[2]["limits"]["max_message_size"] == MIB
        push.send(frames.encode_ingest(frames.topic(stream_id), cid, 1, big))
        nack = recv_control(dealer, 5)
    assert nack is not None, "no answer to an oversized message"
    assert nack[:5] == ["nack", stream_id, 1, 1, "LIMIT_EXCEEDED"]
    assert nack[6].get("limit") == "max_message_size"

    # the SDK raises it (from send if it checks itself, else from flush), and the
    # broker keeps serving that stream and producer
    with Producer(broker.control) as producer:
        with pytest.raises(LimitExceededError):
            producer.send(stream_id, Event.text_delta("y" * (MIB + 1000)))
            producer.flush(timeout=10)
        producer.send(stream_id, Event.text_delta("small"))
        producer.flush(timeout=10)
    with Subscriber(broker.control) as sub:
        first = sub.subscribe(stream_id, from_seq=1).next_event(timeout=10)
    assert first is not None and (first.seq, first.data) == (1, {"text": "small"})
    assert bad_input(broker.control).get("oversized", 0) - before >= 1


def test_a_batch_of_small_events_over_max_message_size_is_delivered(broker, stream_id):
    texts = [f"{i:04d}" + "y" * 5000 for i in range(250)]
    with Admin(broker.control) as admin:
        admin.create_stream(stream_id, buffer_size=250)  # room for all: no reader needed
    with Producer(broker.control) as producer:
        producer.send_many(stream_id, [Event.text_delta(t) for t in texts])
        producer.flush(timeout=10)
    with Subscriber(broker.control) as sub:
        following = sub.subscribe(stream_id, from_seq=1)
        got = [following.next_event(timeout=10) for _ in texts]
    assert [e.data["text"] for e in got if e is not None] == texts


def test_an_event_over_twice_max_message_size_is_refused_clearly(broker, stream_id):
    with Producer(broker.control) as producer:
        with pytest.raises(LimitExceededError):
            producer.send(stream_id, Event.text_delta("z" * (3 * MIB)))
            producer.flush(timeout=3)
        producer.send(stream_id, Event.text_delta("after"))
        producer.flush(timeout=10)


# -- answers -------------------------------------------------------------------------


def test_drop_notice_reaches_the_producer_no_later_than_the_ack_answering_it(
    make_broker, zctx, stream_id
):
    b = make_broker("--buffer-size", "2", "--policy", "drop")
    ingest, _ = endpoints(b.control)
    cid = client_id()
    events = b"".join(Event.text_delta(t).to_msgpack() for t in "abc")
    with (
        raw_socket(zctx, zmq.DEALER, b.control, routing_id=cid) as dealer,
        raw_socket(zctx, zmq.PUSH, ingest) as push,
    ):
        assert request(dealer, pack(["hello", 1, {"version": 1}]))[0] == "ok"
        push.send(frames.encode_ingest(frames.topic(stream_id), cid, 1, events))
        seen: list[list[Any]] = []
        while not any(m[0] == "ack" for m in seen):
            msg = recv_control(dealer, 5)
            assert msg is not None, f"no ack; got {seen}"
            seen.append(msg)
        while (msg := recv_control(dealer, 0.2)) is not None:
            seen.append(msg)
    kinds = [m[0] for m in seen]
    assert "dropped" in kinds, seen
    assert kinds.index("dropped") < kinds.index("ack"), seen


# -- killed producers ------------------------------------------------------------------

PRODUCER_SCRIPT = """
import sys
from zevents import Event, Producer
control, stream = sys.argv[1], sys.argv[2]
with Producer(control, timeout=30) as producer:
    for i in range(10**7):
        producer.send(stream, Event.text_delta(f"p-{i}"), timeout=60)
"""


def test_sigkill_of_a_producer_mid_stream_leaves_the_stream_usable(broker, stream_id, wait_until):
    follower = Follower(broker.control, stream_id)
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER_SCRIPT, broker.control, stream_id],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        wait_until(lambda: len(follower.events) >= 300 or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()

    after = [f"after-{i}" for i in range(50)]
    with Producer(broker.control) as producer:
        producer.send_many(stream_id, [Event.text_delta(t) for t in after], timeout=10)
        producer.flush(timeout=15)
    with Admin(broker.control) as admin:
        admin.close_stream(stream_id)
    assert follower.join(timeout=20), "the follower did not finish in time"
    assert follower.outcome == "ended", follower.outcome
    texts = [e.data["text"] for e in follower.events]
    assert [e.seq for e in follower.events] == list(range(1, len(texts) + 1))
    assert texts[-50:] == after
    killed = texts[:-50]
    assert len(killed) >= 300 and killed == [f"p-{i}" for i in range(len(killed))]


SUBSCRIBER_SCRIPT = """
import sys, time
from zevents import Subscriber
control, stream = sys.argv[1], sys.argv[2]
with Subscriber(control, timeout=30) as sub:
    sub.subscribe(stream, create=True)
    print("ready", flush=True)
    time.sleep(120)  # reads nothing: its cursor holds the buffer until it is killed
"""


def _spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def test_sigkill_of_a_subscriber_unblocks_its_producers_after_the_liveness_timeout(
    make_broker, stream_id
):
    b = make_broker("--subscriber-timeout", "1", "--buffer-size", "10")
    proc = _spawn(SUBSCRIBER_SCRIPT, b.control, stream_id)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with Producer(b.control, timeout=5) as producer:
            producer.send_many(stream_id, [Event.text_delta(f"e{i}") for i in range(30)])
            with pytest.raises(TimeoutError):  # 20 events wait for the silent subscriber
                producer.flush(timeout=0.5)
            _kill(proc)
            start = time.monotonic()
            producer.flush(timeout=15)  # its cursor goes after the timeout; room is made
            assert time.monotonic() - start < 10
    finally:
        if proc.poll() is None:
            _kill(proc)
    with Admin(b.control) as admin:
        info = admin.stream_info(stream_id)
    assert (info.last_seq, info.subscribers, info.parked) == (30, 0, 0)


def test_a_stream_whose_producer_was_killed_is_closed_then_removed_when_idle(
    make_broker, stream_id, wait_until
):
    b = make_broker("--idle-timeout", "1")
    proc = _spawn(PRODUCER_SCRIPT, b.control, stream_id)
    try:
        with Admin(b.control) as admin:

            def sent() -> int:
                return (
                    admin.stream_info(stream_id).last_seq
                    if stream_id in admin.list_streams()
                    else 0
                )

            wait_until(lambda: sent() >= 100, timeout=20)
            _kill(proc)
            seen: set[str] = set()

            def state() -> str:
                try:
                    return "closed" if admin.stream_info(stream_id).closed else "open"
                except StreamNotFoundError:
                    return "gone"

            # Idle for 1 s: closed (its followers see the end), idle 1 s more: removed.
            wait_until(lambda: seen.add(state()) or "gone" in seen, timeout=15)
            assert "closed" in seen or b.log.count("closing stream") >= 1
    finally:
        if proc.poll() is None:
            _kill(proc)


# -- killed brokers ----------------------------------------------------------------------


def test_sigkill_of_the_broker_gives_followers_an_error_or_an_end_never_a_hang(
    make_broker, stream_id
):
    b = make_broker()
    with Producer(b.control) as producer:
        producer.send(stream_id, Event.text_delta("before"))
    outcomes: dict[str, tuple[object, float]] = {}
    ready = threading.Barrier(3, timeout=15)
    killed_at: list[float] = []

    def sync_follower() -> None:
        with Subscriber(b.control, timeout=1) as sub:
            following = sub.subscribe(stream_id)
            assert following.next_event(timeout=10) is not None
            ready.wait()
            ready.wait()  # the broker is dead now
            try:
                result: object = following.next_event(timeout=30)
            except Exception as exc:
                result = exc
            outcomes["sync"] = (result, time.monotonic() - killed_at[0])

    async def async_follow() -> None:
        async with AsyncSubscriber(b.control, timeout=1) as sub:
            following = await sub.subscribe(stream_id)
            assert await following.next_event(timeout=10) is not None
            await asyncio.get_running_loop().run_in_executor(None, ready.wait)
            await asyncio.get_running_loop().run_in_executor(None, ready.wait)
            try:
                result: object = await asyncio.wait_for(following.next_event(timeout=30), 40)
            except Exception as exc:
                result = exc
            outcomes["async"] = (result, time.monotonic() - killed_at[0])

    threads = [
        threading.Thread(target=sync_follower, daemon=True),
        threading.Thread(target=lambda: asyncio.run(async_follow()), daemon=True),
    ]
    for t in threads:
        t.start()
    tail = subprocess.Popen(
        [sys.executable, "-m", "zevents", "tail", stream_id, "--broker", b.control],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        read_until(tail.stdout, b"before", timeout=15)  # it is following
        ready.wait()
        b.kill()
        killed_at.append(time.monotonic())
        ready.wait()
        for t in threads:
            t.join(timeout=30)
        _, raw_err = tail.communicate(timeout=30)
        err = raw_err.decode(errors="replace")
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait(timeout=10)
    assert set(outcomes) == {"sync", "async"}, outcomes
    for name, (result, elapsed) in outcomes.items():
        assert result is None or isinstance(result, CLEAR_END), (name, result)
        assert elapsed < 15, (name, elapsed)
    assert tail.returncode != 0 and "broker" in err and "Traceback" not in err, err


def test_followers_of_a_broker_that_restarts_get_an_error_or_an_end(make_broker, stream_id):
    b = make_broker()
    with Producer(b.control) as producer:
        producer.send(stream_id, Event.text_delta("before"))
    with Subscriber(b.control, timeout=2) as sub:
        following = sub.subscribe(stream_id)
        assert following.next_event(timeout=10) is not None
        b.kill()
        b.restart_same_ports()  # a new broker that never heard of the stream
        start = time.monotonic()
        try:
            result: object = following.next_event(timeout=30)
        except Exception as exc:
            result = exc
    assert result is None or isinstance(result, CLEAR_END), result
    assert time.monotonic() - start < 15


def test_producer_reconnects_by_itself_when_its_broker_restarts(make_broker, stream_id):
    b = make_broker()
    with Producer(b.control, timeout=5) as producer:
        producer.send_many(stream_id, [Event.text_delta(f"before-{i}") for i in range(3)])
        producer.flush(timeout=10)
        b.kill()
        b.restart_same_ports()
        after = [f"after-{i}" for i in range(5)]
        producer.send_many(stream_id, [Event.text_delta(t) for t in after], timeout=10)
        producer.flush(timeout=15)
    with Subscriber(b.control) as sub:
        following = sub.subscribe(stream_id, from_seq=1)
        got = [following.next_event(timeout=10) for _ in after]
    assert [(e.seq, e.data["text"]) for e in got if e is not None] == list(
        zip(range(1, 6), after, strict=True)
    )


def test_producer_resends_what_it_sent_while_the_broker_was_down(make_broker, stream_id):
    b = make_broker()
    with Producer(b.control, timeout=5) as producer:
        producer.send(stream_id, Event.text_delta("before"))
        producer.flush(timeout=10)
        b.kill()
        down = [f"down-{i}" for i in range(3)]
        producer.send_many(stream_id, [Event.text_delta(t) for t in down], timeout=5)
        b.restart_same_ports()
        producer.send(stream_id, Event.text_delta("after"), timeout=10)
        producer.flush(timeout=15)
    with Admin(b.control) as admin:
        assert admin.stream_info(stream_id).last_seq == 4
    with Subscriber(b.control) as sub:
        following = sub.subscribe(stream_id, from_seq=1)
        got = [following.next_event(timeout=10) for _ in range(4)]
    assert [e.data["text"] for e in got if e is not None] == [*down, "after"]


def test_producer_that_noticed_an_outage_reconnects_when_the_broker_is_back(
    make_broker, stream_id, wait_until
):
    b = make_broker()
    with Producer(b.control, timeout=1) as producer:
        producer.send(stream_id, Event.text_delta("before"))
        producer.flush(timeout=10)
        old_id = producer.handshake.broker_id
        b.kill()
        producer.send(stream_id, Event.text_delta("down"))
        with pytest.raises(BrokerUnavailableError):  # noticed within a few seconds
            producer.flush(timeout=20)
        b.restart_same_ports()

        def reconnected() -> bool:
            producer.poll(0.05)
            return producer.handshake.broker_id != old_id

        wait_until(reconnected, timeout=10)
        producer.send(stream_id, Event.text_delta("after"), timeout=10)
        producer.flush(timeout=15)
    with Subscriber(b.control) as sub:
        following = sub.subscribe(stream_id, from_seq=1)
        got = [following.next_event(timeout=10) for _ in range(2)]
    assert [e.data["text"] for e in got if e is not None] == ["down", "after"]


def test_producer_idle_through_an_outage_reconnects_on_its_next_send(make_broker, stream_id):
    b = make_broker()
    with Producer(b.control, timeout=1) as producer:
        producer.send(stream_id, Event.text_delta("before"))
        producer.flush(timeout=10)
        b.kill()
        # The scenario, not synchronisation: the broker stays down for a few seconds while
        # the producer makes no call (a provider waiting for its LLM).
        time.sleep(3.5)
        b.restart_same_ports()
        producer.send(stream_id, Event.text_delta("after"), timeout=10)
        producer.flush(timeout=15)
    with Subscriber(b.control) as sub:
        following = sub.subscribe(stream_id, from_seq=1)
        event = following.next_event(timeout=10)
    assert event is not None and event.data["text"] == "after"
