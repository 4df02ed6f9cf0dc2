"""zevents workers for scripts/bench.py: the broker, producers, subscribers, in-process handoff.

Each worker runs in its own spawned process and reports on the run's queue.
Producers build every event the way an application does
(``Event.text_delta(...)``, or ``Event.new`` with a send timestamp for latency
runs) and send through the SDK; subscribers take events through the SDK and
check them: per stream, ``seq`` must go up by exactly one and the producer's
index (carried in the text) must only go up; loss and duplicates are counted
by that index.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
import time
from typing import Any

from _bench_common import Latencies, Tally, cpu_delta, index_of, paced, text, thread_cpu, worker

LOOPBACK = "tcp://127.0.0.1:0"


@worker
def broker(q: Any, buffer_size: int, opts: dict[str, Any] | None = None) -> None:
    """A zevents broker on free loopback ports; stops cleanly on SIGTERM.  ``opts``:
    more :class:`BrokerConfig` fields (a data directory, CURVE keys)."""
    from broker.config import BrokerConfig
    from broker.server import Broker

    b = Broker(
        BrokerConfig(
            control=LOOPBACK,
            ingest=LOOPBACK,
            publish=LOOPBACK,
            buffer_size=buffer_size,
            **(opts or {}),
        )
    )
    signal.signal(signal.SIGTERM, lambda *_: b.stop())
    q.put({"role": "server", "pid": os.getpid(), **b.endpoints})
    b.run()


@worker
def subscriber(
    q: Any,
    control: str,
    streams: list[str],
    per_stream: int,
    latency: bool,
    idle: float,
) -> None:
    """Follow ``streams`` from seq 1 on one connection until ``per_stream`` events each
    arrived, the streams ended (closed), or nothing came for ``idle`` seconds."""
    from zevents import Subscriber

    perf = time.perf_counter_ns
    with Subscriber(control, timeout=30) as sub:
        subs = [sub.subscribe(s, from_seq=1, create=True) for s in streams]
        q.put({"role": "ready", "pid": os.getpid()})
        cpu0 = time.process_time()
        threads0 = thread_cpu()
        nxt = subs[0].next_event if len(subs) == 1 else sub.next_event
        expected = len(streams) * per_stream
        tally = Tally(per_stream)
        add = tally.add
        lat = Latencies() if latency else None
        # Per stream: the last seq and producer index seen (seq must go up by one,
        # the index must go up).
        last: dict[str, list[int]] = {s: [0, -1] for s in streams}
        seq_errors = order_errors = 0
        first = t_last = 0
        timed_out = ended = False
        while tally.unique < expected:
            try:
                ev = nxt(timeout=idle)
            except TimeoutError:
                timed_out = True
                break
            if ev is None:
                ended = True
                break
            now = perf()
            data = ev.data
            sid = ev.stream_id
            idx = index_of(data["text"])
            prev = last[sid]
            if ev.seq != prev[0] + 1:
                seq_errors += 1
            if idx <= prev[1]:
                order_errors += 1
            prev[0] = ev.seq
            prev[1] = idx
            add(sid, idx)
            if lat is not None:
                lat.add(data["t"], now)
            if not first:
                first = now
            t_last = now
        result = {
            "role": "sub",
            "first": first,
            "last": t_last,
            "unique": tally.unique,
            "dups": tally.dups,
            "bad": tally.bad,
            "seq_errors": seq_errors,
            "order_errors": order_errors,
            "timed_out": timed_out,
            "ended": ended,
            "pid": os.getpid(),
            "cpu": time.process_time() - cpu0,
            "threads": cpu_delta(threads0, thread_cpu()),
        }
        if lat is not None:
            result.update(lat.dump())
    q.put(result)


@worker
def producer(
    q: Any,
    control: str,
    streams: list[str],
    per_stream: int,
    batch: int,
    go: Any,
    rate: float | None = None,
) -> None:
    """Send ``per_stream`` events to each of ``streams``, then flush.

    Full speed: round-robin over the streams, ``batch`` events per call
    (``send`` when 1, else ``send_many``).  Paced (``rate`` events/s in all):
    event ``k`` goes to ``streams[k % len(streams)]`` with a send timestamp,
    whatever is due for one stream in one call.
    """
    from zevents import Event, EventType, Producer, StreamFullError

    perf = time.perf_counter_ns
    dropped = 0
    p = Producer(control, timeout=30)
    try:

        def send(stream: str, events: list[Any]) -> None:
            nonlocal dropped
            while True:
                try:
                    if len(events) == 1:
                        p.send(stream, events[0])
                    else:
                        p.send_many(stream, events)
                    return
                except StreamFullError as exc:  # DROP: earlier events were dropped
                    dropped += exc.dropped  # this batch was not sent: send it again

        q.put({"role": "ready", "pid": os.getpid()})
        cpu0 = time.process_time()
        threads0 = thread_cpu()
        if not go.wait(120):
            raise TimeoutError("no go")
        if rate:
            m = len(streams)
            td = EventType.TEXT_DELTA
            new = Event.new

            def send_range(a: int, b: int) -> None:
                if m == 1:
                    evs = [new(td, {"text": text(i), "t": perf()}) for i in range(a, b)]
                    send(streams[0], evs)
                else:
                    for k in range(a, b):
                        send(streams[k % m], [new(td, {"text": text(k // m), "t": perf()})])

            t0, _ = paced(rate, m * per_stream, send_range)
        else:
            t0 = perf()
            text_delta = Event.text_delta
            for start in range(0, per_stream, batch):
                rng = range(start, min(start + batch, per_stream))
                for s in streams:
                    send(s, [text_delta(text(i)) for i in rng])
        while True:
            try:
                p.flush(timeout=120)
                break
            except StreamFullError as exc:
                dropped += exc.dropped
        t1 = perf()
        cpu = time.process_time() - cpu0
        threads = cpu_delta(threads0, thread_cpu())
        q.put(
            {"role": "prod", "t0": t0, "t1": t1, "dropped": dropped, "cpu": cpu, "threads": threads}
        )
    finally:
        p.close()


# -- in-process handoff ----------------------------------------------------------------


def inproc(variant: str, n: int, buffer_size: int = 100) -> dict[str, Any]:
    """Hand ``n`` ready-made events from a producer to a consumer in one process.

    ``es-thread``/``queue-thread``: a thread sends, the main thread receives
    (EventStream vs ``queue.Queue(maxsize)``).  ``es-async``/``aqueue-async``:
    a thread sends, an asyncio task receives (EventStream's ``async for`` vs an
    unbounded ``asyncio.Queue`` fed with ``call_soon_threadsafe``, the usual
    way to cross into a loop).  ``es-task``/``aqueue-task``: two tasks of one
    loop (``asend``/``async for`` vs ``asyncio.Queue(maxsize)``).
    """
    from zevents import Event, EventStream

    events = [Event.text_delta(text(i)) for i in range(n)]
    got: list[Any] = []
    take = got.append

    def run_thread(target: Any) -> threading.Thread:
        t = threading.Thread(target=target, daemon=True)
        t.start()
        return t

    t0 = time.perf_counter()
    if variant == "es-thread":
        es = EventStream(buffer_size=buffer_size)

        def produce_es() -> None:
            with es:
                for e in events:
                    es.send(e)

        th = run_thread(produce_es)
        for e in es:
            take(e)
        th.join()
    elif variant == "queue-thread":
        qq: queue.Queue[Any] = queue.Queue(maxsize=buffer_size)

        def produce_q() -> None:
            for e in events:
                qq.put(e)
            qq.put(None)

        th = run_thread(produce_q)
        while (e := qq.get()) is not None:
            take(e)
        th.join()
    elif variant == "es-async":
        es = EventStream(buffer_size=buffer_size)

        async def consume_es() -> None:
            with es:  # closes even if the consumer fails
                pass_through = run_thread(lambda: _send_all_and_close(es, events))
                async for e in es:
                    take(e)
                pass_through.join()

        asyncio.run(consume_es())
    elif variant == "aqueue-async":

        async def consume_aq() -> None:
            loop = asyncio.get_running_loop()
            aq: asyncio.Queue[Any] = asyncio.Queue()

            def produce() -> None:
                put = aq.put_nowait
                soon = loop.call_soon_threadsafe
                for e in events:
                    soon(put, e)
                soon(put, None)

            th = run_thread(produce)
            while (e := await aq.get()) is not None:
                take(e)
            th.join()

        asyncio.run(consume_aq())
    elif variant == "es-task":
        es = EventStream(buffer_size=buffer_size)

        async def both_es() -> None:
            async def produce() -> None:
                with es:
                    for e in events:
                        await es.asend(e)

            task = asyncio.ensure_future(produce())
            async for e in es:
                take(e)
            await task

        asyncio.run(both_es())
    elif variant == "aqueue-task":

        async def both_aq() -> None:
            aq: asyncio.Queue[Any] = asyncio.Queue(maxsize=buffer_size)

            async def produce() -> None:
                for e in events:
                    await aq.put(e)
                await aq.put(None)

            task = asyncio.ensure_future(produce())
            while (e := await aq.get()) is not None:
                take(e)
            await task

        asyncio.run(both_aq())
    else:
        raise ValueError(variant)
    elapsed = time.perf_counter() - t0
    in_order = all(a is b for a, b in zip(got, events, strict=False))
    return {
        "events_per_s": n / elapsed,
        "loss": n - len(got),
        "dups": max(0, len(got) - n) + (0 if in_order else 1),
    }


def _send_all_and_close(es: Any, events: list[Any]) -> None:
    try:
        for e in events:
            es.send(e)
    finally:
        if not es.closed:
            es.close()
