"""Ceiling workers for scripts/bench.py: raw pyzmq, a minimal Python relay, zmq.proxy.

Wire formats (``mode``):

* ``raw``: PUSH -> PULL, one msgpack event per message, no topic.
* ``raw-batch``: PUSH -> PULL, 64 events back to back in one frame.
* ``single``: ``topic\\0payload`` in one frame, through a relay to SUB.
* ``multi``: two frames ``[topic\\0, payload]``, through a relay to SUB.
* ``batch``: ``topic\\0`` + 64 events back to back in one frame, through a relay.

Every high-water mark is 0 (unbounded) so that nothing is dropped: the
ceilings measure how fast the bytes move, with nothing else done.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import zmq
from _bench_common import (
    PROBE_PAYLOAD,
    PROBE_TOPIC,
    Latencies,
    Tally,
    encode_event,
    index_of,
    paced,
    worker,
)

TOPIC = b"session-1\x00"
BATCH = 64
LOOPBACK = "tcp://127.0.0.1"


def _sock(ctx: zmq.Context[Any], kind: int, linger: int = 0) -> zmq.Socket[Any]:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, linger)
    s.setsockopt(zmq.SNDHWM, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    return s


# -- the relays --------------------------------------------------------------------


@worker
def relay(q: Any, mode: str, buffer_size: int) -> None:
    """PULL -> decode -> deque -> PUB in Python, or ``zmq.proxy`` (``mode == "proxy-*"``)."""
    ctx = zmq.Context()
    pull = _sock(ctx, zmq.PULL)
    pub = _sock(ctx, zmq.PUB)
    pin = pull.bind_to_random_port(LOOPBACK)
    pout = pub.bind_to_random_port(LOOPBACK)
    q.put(
        {
            "role": "server",
            "pid": os.getpid(),
            "ingest": f"{LOOPBACK}:{pin}",
            "publish": f"{LOOPBACK}:{pout}",
        }
    )
    if mode.startswith("proxy"):
        zmq.proxy(pull, pub)  # C all the way; ends when the process is terminated
        return
    kept: deque[Any] = deque(maxlen=buffer_size)
    append = kept.append
    unpackb = msgpack.unpackb
    recv = pull.recv
    send = pub.send
    if mode == "single":
        while True:
            f = recv()
            unpackb(memoryview(f)[f.find(b"\x00") + 1 :])
            append(f)
            send(f)
    elif mode == "multi":
        recv_multipart = pull.recv_multipart
        more = zmq.SNDMORE
        while True:
            topic, payload = recv_multipart()
            unpackb(payload)
            append(payload)
            send(topic, more)
            send(payload)
    elif mode == "batch":
        Unpacker = msgpack.Unpacker
        while True:
            f = recv()
            u = Unpacker()
            u.feed(memoryview(f)[f.find(b"\x00") + 1 :])
            for _ in u:
                pass
            append(f)
            send(f)
    else:
        raise ValueError(mode)


# -- subscriber / consumer ------------------------------------------------------------


def _events(sock: zmq.Socket[Any], mode: str, on_probe: Callable[[], None]) -> Iterator[Any]:
    """Decoded event maps as they arrive (probes are reported, not yielded)."""
    recv = sock.recv
    unpackb = msgpack.unpackb
    if mode == "raw":
        while True:
            yield unpackb(recv())
    elif mode == "raw-batch":
        Unpacker = msgpack.Unpacker
        while True:
            u = Unpacker()
            u.feed(recv())
            yield from u
    elif mode == "single":
        while True:
            f = recv()
            if f.startswith(PROBE_TOPIC):
                on_probe()
                continue
            yield unpackb(memoryview(f)[f.find(b"\x00") + 1 :])
    elif mode == "multi":
        recv_multipart = sock.recv_multipart
        while True:
            topic, payload = recv_multipart()
            if topic == PROBE_TOPIC:
                on_probe()
                continue
            yield unpackb(payload)
    elif mode == "batch":
        Unpacker = msgpack.Unpacker
        while True:
            f = recv()
            if f.startswith(PROBE_TOPIC):
                on_probe()
                continue
            u = Unpacker()
            u.feed(memoryview(f)[f.find(b"\x00") + 1 :])
            yield from u
    else:
        raise ValueError(mode)


@worker
def consumer(
    q: Any,
    publish: str | None,
    mode: str,
    n: int,
    probe_ok: Any,
    latency: bool,
    idle: float,
) -> None:
    """SUB (through a relay) or a bound PULL (``raw*``): count, check and time ``n`` events."""
    ctx = zmq.Context()
    if mode.startswith("raw"):
        sock = _sock(ctx, zmq.PULL)
        port = sock.bind_to_random_port(LOOPBACK)
        q.put({"role": "server", "pid": os.getpid(), "ingest": f"{LOOPBACK}:{port}"})
    else:
        assert publish is not None
        sock = _sock(ctx, zmq.SUB)
        sock.connect(publish)
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC)
        sock.setsockopt(zmq.SUBSCRIBE, PROBE_TOPIC)
    sock.setsockopt(zmq.RCVTIMEO, int(idle * 1000))

    def on_probe() -> None:
        if not probe_ok.is_set():
            probe_ok.set()

    tally = Tally(n)
    add = tally.add
    lat = Latencies() if latency else None
    perf = time.perf_counter_ns
    first = last = 0
    timed_out = False
    cpu0 = time.process_time()
    try:
        for d in _events(sock, mode, on_probe):
            now = perf()
            data = d["data"]
            add(0, index_of(data["text"]))
            if lat is not None:
                lat.add(data["t"], now)
            if not first:
                first = now
            last = now
            if tally.unique >= n:
                break
    except zmq.Again:
        timed_out = True
    result = {
        "role": "sub",
        "first": first,
        "last": last,
        "unique": tally.unique,
        "dups": tally.dups,
        "bad": tally.bad,
        "timed_out": timed_out,
        "pid": os.getpid(),
        "cpu": time.process_time() - cpu0,
    }
    if lat is not None:
        result.update(lat.dump())
    q.put(result)
    sock.close(0)
    ctx.term()


# -- producer ----------------------------------------------------------------------------


@worker
def producer(
    q: Any,
    ingest: str,
    mode: str,
    n: int,
    probe_ok: Any,
    go: Any,
    rate: float | None,
) -> None:
    """PUSH ``n`` events in ``mode``'s format, at full speed or paced at ``rate``/s."""
    ctx = zmq.Context()
    sock = _sock(ctx, zmq.PUSH, linger=30_000)  # let queued messages out at close
    sock.connect(ingest)
    send = sock.send
    more = zmq.SNDMORE
    if probe_ok is not None:  # prove the SUB's subscription is in effect end to end
        while not probe_ok.is_set():
            if mode == "multi":
                send(PROBE_TOPIC, more)
                send(PROBE_PAYLOAD)
            else:
                send(PROBE_TOPIC + PROBE_PAYLOAD)
            probe_ok.wait(0.005)
    q.put({"role": "ready", "pid": os.getpid()})
    cpu0 = time.process_time()
    if not go.wait(60):
        raise TimeoutError("no go")
    perf = time.perf_counter_ns

    def nothing() -> None:
        return None

    stamp = perf if rate else nothing  # a send timestamp per event, in latency runs

    def send_range(a: int, b: int) -> None:
        if mode == "raw":
            for i in range(a, b):
                send(encode_event(i, stamp()))
        elif mode == "single":
            for i in range(a, b):
                send(TOPIC + encode_event(i, stamp()))
        elif mode == "multi":
            for i in range(a, b):
                send(TOPIC, more)
                send(encode_event(i, stamp()))
        elif mode in ("raw-batch", "batch"):
            prefix = b"" if mode == "raw-batch" else TOPIC
            for k in range(a, b, BATCH):
                events = [encode_event(i, stamp()) for i in range(k, min(k + BATCH, b))]
                send(prefix + b"".join(events))
        else:
            raise ValueError(mode)

    if rate:
        t0, t1 = paced(rate, n, send_range)
    else:
        t0 = perf()
        for k in range(0, n, BATCH):
            send_range(k, min(k + BATCH, n))
        t1 = perf()
    q.put({"role": "prod", "t0": t0, "t1": t1, "cpu": time.process_time() - cpu0})
    sock.close()
    ctx.term()
