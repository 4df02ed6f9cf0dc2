"""Peer workers for scripts/bench.py: Redis (redis-py) and NATS (nats-py).

The servers are Debian's ``redis-server`` and ``nats-server`` binaries, started
by bench.py on a free 127.0.0.1 port with a temporary directory and stopped at
the end of each run.  Producers send the same msgpack events the other
scenarios send, then an ``END`` marker; subscribers count by the producer's
index like every other scenario.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from typing import Any

import msgpack
from _bench_common import END, Tally, encode_event, index_of, wait_for, worker

SUBJECT = "session-1"
PIPELINE = 64


def missing() -> dict[str, str]:
    """What each peer lacks: ``{"redis": reason, "nats": reason}`` (absent keys are fine)."""
    out: dict[str, str] = {}
    if shutil.which("redis-server") is None:
        out["redis"] = "redis-server not installed (apt-get install redis-server)"
    else:
        try:
            import redis  # noqa: F401
        except ImportError:
            out["redis"] = "redis-py not installed (pip install 'zevents[bench]')"
    if shutil.which("nats-server") is None:
        out["nats"] = "nats-server not installed (apt-get install nats-server)"
    else:
        try:
            import nats  # noqa: F401
        except ImportError:
            out["nats"] = "nats-py not installed (pip install 'zevents[bench]')"
    return out


def versions() -> dict[str, str]:
    """Versions of the peers' servers and clients (and redis-py's parser)."""
    out: dict[str, str] = {}
    for name, argv in (("redis-server", ["--version"]), ("nats-server", ["--version"])):
        path = shutil.which(name)
        if path:
            try:
                res = subprocess.run([path, *argv], capture_output=True, timeout=10, text=True)
                out[name] = (res.stdout or res.stderr).strip().splitlines()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                out[name] = "unknown"
    try:
        import redis
        from redis.utils import HIREDIS_AVAILABLE

        out["redis-py"] = (
            f"{redis.__version__} ({'hiredis' if HIREDIS_AVAILABLE else 'pure-Python'} parser)"
        )
    except ImportError:
        pass
    try:
        from nats.aio.client import __version__ as nats_version

        out["nats-py"] = nats_version
    except ImportError:
        pass
    return out


# -- servers ------------------------------------------------------------------------------


def _answers(port: int, send: bytes, expect: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        if send:
            s.sendall(send)
        return expect in s.recv(256)


def start_redis(run: Any, port: int, tmpdir: str) -> Any:
    """``redis-server`` on 127.0.0.1:``port``, no persistence, data in ``tmpdir``."""
    argv = [
        shutil.which("redis-server") or "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--protected-mode",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        tmpdir,
        "--logfile",
        os.path.join(tmpdir, "redis.log"),
        "--daemonize",
        "no",
    ]
    p = run.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _answers(port, b"PING\r\n", b"+PONG"), 10, "redis-server")
    return p


def start_nats(run: Any, port: int, tmpdir: str) -> Any:
    """``nats-server`` on 127.0.0.1:``port`` with JetStream storing in ``tmpdir``."""
    argv = [
        shutil.which("nats-server") or "nats-server",
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-js",
        "-sd",
        tmpdir,
    ]
    p = run.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _answers(port, b"", b"INFO"), 10, "nats-server")
    return p


# -- Redis --------------------------------------------------------------------------------


@worker
def redis_sub(q: Any, port: int, kind: str, n: int, maxlen: int, idle: float) -> None:
    """``pubsub``: SUBSCRIBE and read; ``streams``: XREAD BLOCK from the start."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=idle)
    tally = Tally(n)
    add = tally.add
    perf = time.perf_counter_ns
    first = last = 0
    timed_out = False
    cpu0 = time.process_time()
    unpackb = msgpack.unpackb
    try:
        if kind == "pubsub":
            ps = r.pubsub()
            ps.subscribe(SUBJECT)
            while True:  # the confirmation comes once the server registered us
                m = ps.get_message(timeout=idle)
                if m is not None and m["type"] == "subscribe":
                    break
            q.put({"role": "ready", "pid": os.getpid()})
            cpu0 = time.process_time()
            for m in ps.listen():
                if m["type"] != "message":
                    continue
                data = m["data"]
                now = perf()
                if data == END:
                    last = max(last, now)
                    break
                add(0, index_of(unpackb(data)["data"]["text"]))
                if not first:
                    first = now
                last = now
        else:
            r.ping()
            q.put({"role": "ready", "pid": os.getpid()})
            cpu0 = time.process_time()
            last_id = "0-0"
            done = False
            while not done:
                resp = r.xread({SUBJECT: last_id}, count=1000, block=int(idle * 1000))
                if not resp:
                    timed_out = True
                    break
                now = perf()
                for _key, entries in resp:
                    for eid, fields in entries:
                        last_id = eid
                        data = fields[b"d"]
                        if data == END:
                            done = True
                            break
                        add(0, index_of(unpackb(data)["data"]["text"]))
                if not first:
                    first = now
                last = now
    except (redis.TimeoutError, TimeoutError):
        timed_out = True
    q.put(
        {
            "role": "sub",
            "cpu": time.process_time() - cpu0,
            "first": first,
            "last": last,
            "unique": tally.unique,
            "dups": tally.dups,
            "bad": tally.bad,
            "timed_out": timed_out,
        }
    )


@worker
def redis_prod(q: Any, port: int, kind: str, n: int, pipeline: int, maxlen: int, go: Any) -> None:
    """PUBLISH or XADD (MAXLEN ~ ``maxlen``) each event, one per call or ``pipeline`` at a time."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=60)
    r.ping()
    q.put({"role": "ready", "pid": os.getpid()})
    cpu0 = time.process_time()
    if not go.wait(60):
        raise TimeoutError("no go")
    perf = time.perf_counter_ns
    t0 = perf()
    if kind == "pubsub":
        if pipeline <= 1:
            publish = r.publish
            for i in range(n):
                publish(SUBJECT, encode_event(i))
        else:
            for k in range(0, n, pipeline):
                pipe = r.pipeline(transaction=False)
                for i in range(k, min(k + pipeline, n)):
                    pipe.publish(SUBJECT, encode_event(i))
                pipe.execute()
        r.publish(SUBJECT, END)
    else:
        if pipeline <= 1:
            xadd = r.xadd
            for i in range(n):
                xadd(SUBJECT, {"d": encode_event(i)}, maxlen=maxlen, approximate=True)
        else:
            for k in range(0, n, pipeline):
                pipe = r.pipeline(transaction=False)
                for i in range(k, min(k + pipeline, n)):
                    pipe.xadd(SUBJECT, {"d": encode_event(i)}, maxlen=maxlen, approximate=True)
                pipe.execute()
        r.xadd(SUBJECT, {"d": END}, maxlen=maxlen, approximate=True)
    q.put({"role": "prod", "t0": t0, "t1": perf(), "cpu": time.process_time() - cpu0})


# -- NATS ---------------------------------------------------------------------------------


@worker
def nats_sub(q: Any, port: int, jetstream: bool, n: int, maxlen: int, idle: float) -> None:
    """Core: subscribe; JetStream: create the stream (max_msgs ``maxlen``, discard old)
    and follow it with an ordered push consumer from its start."""
    import nats

    async def main() -> dict[str, Any]:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", max_reconnect_attempts=0)
        try:
            tally = Tally(n)
            add = tally.add
            perf = time.perf_counter_ns
            unpackb = msgpack.unpackb
            state = {"first": 0, "last": 0}
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            # A callback, not ``async for msg in sub.messages``: nats-py's
            # iterator costs about three times as much per message.
            async def on_msg(msg: Any) -> None:
                data = msg.data
                now = perf()
                if data == END:
                    state["last"] = max(state["last"], now)
                    if not done.done():
                        done.set_result(None)
                    return
                add(0, index_of(unpackb(data)["data"]["text"]))
                if not state["first"]:
                    state["first"] = now
                state["last"] = now

            limits = {"pending_msgs_limit": n + 1000, "pending_bytes_limit": 1 << 30}
            if jetstream:
                js = nc.jetstream()
                await js.add_stream(
                    name="BENCH", subjects=[SUBJECT], max_msgs=maxlen, discard="old"
                )
                await js.subscribe(SUBJECT, cb=on_msg, ordered_consumer=True, **limits)
            else:
                await nc.subscribe(SUBJECT, cb=on_msg, **limits)
            await nc.flush()  # the server has our subscription
            q.put({"role": "ready", "pid": os.getpid()})
            cpu0 = time.process_time()
            # Give up after ``idle`` seconds without progress.
            timed_out = False
            seen = -1
            while not done.done():
                await asyncio.wait({done}, timeout=idle)
                if not done.done() and tally.unique == seen:
                    timed_out = True
                    break
                seen = tally.unique
            return {
                "role": "sub",
                "cpu": time.process_time() - cpu0,
                "first": state["first"],
                "last": state["last"],
                "unique": tally.unique,
                "dups": tally.dups,
                "bad": tally.bad,
                "timed_out": timed_out,
            }
        finally:
            await nc.close()

    q.put(asyncio.run(main()))


@worker
def nats_prod(q: Any, port: int, mode: str, n: int, window: int, go: Any) -> None:
    """``core``: publish each event; ``js-each``: JetStream publish awaiting every ack;
    ``js-async``: ``publish_async`` with at most ``window`` acks outstanding."""
    import nats

    async def main() -> dict[str, Any]:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", max_reconnect_attempts=0)
        try:
            js = nc.jetstream(publish_async_max_pending=window) if mode != "core" else None
            q.put({"role": "ready", "pid": os.getpid()})
            cpu0 = time.process_time()
            if not go.wait(60):  # blocks the loop briefly; nothing else runs yet
                raise TimeoutError("no go")
            perf = time.perf_counter_ns
            t0 = perf()
            failed = 0
            if mode == "core":
                publish = nc.publish
                for i in range(n):
                    await publish(SUBJECT, encode_event(i))
                await publish(SUBJECT, END)
                await nc.flush()
            elif mode == "js-each":
                assert js is not None
                for i in range(n):
                    await js.publish(SUBJECT, encode_event(i))
                await js.publish(SUBJECT, END)
            else:
                assert js is not None
                futures = []
                for i in range(n):
                    futures.append(await js.publish_async(SUBJECT, encode_event(i)))
                await js.publish_async_completed()
                failed = sum(1 for f in futures if f.done() and f.exception() is not None)
                await js.publish(SUBJECT, END)
            cpu = time.process_time() - cpu0
            return {"role": "prod", "t0": t0, "t1": perf(), "failed": failed, "cpu": cpu}
        finally:
            await nc.close()

    q.put(asyncio.run(main()))
