#!/usr/bin/env python3
"""zevents benchmark suite: zevents against the ceilings and the peers, as ratios in one run.

    .venv/bin/python scripts/bench.py --quick            # about a minute
    .venv/bin/python scripts/bench.py --json out.json    # the full run (~10 minutes)
    .venv/bin/python scripts/bench.py --only proxy --only "zevents 1p1s"
    .venv/bin/python scripts/bench.py --profile /tmp/prof   # py-spy on 1p1s BLOCK

Every scenario runs its producer, broker (or relay, or server) and
subscriber(s) as separate processes (multiprocessing, spawn) on 127.0.0.1,
with events shaped like LLM output: a 16-character TextDelta per event,
stream IDs ``session-<n>``.  Each scenario runs several times; the table shows
the median and the spread (min..max).  Loss and duplicates are counted at
the subscriber by the producer's own index, which each event's text carries.
See docs/performance.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_ceilings as ceil
import _bench_peers as peers
import _bench_zevents as zv
from _bench_common import (
    BenchError,
    Run,
    cpu_delta,
    free_port,
    percentile,
    rss_mb,
    thread_cpu,
)

#: Buffer of the minimal relay's deque, the peers' length limits (MAXLEN ~,
#: max_msgs) and zevents' default stream buffer.
BUFFER = 100
#: Seconds a subscriber waits for the next event before it gives up (and reports loss).
IDLE = 10.0


# -- running -----------------------------------------------------------------------------


@dataclass
class Ctx:
    """What every scenario function gets."""

    mp: Any
    quick: bool
    run_timeout: float
    peer_maxlen: int = BUFFER

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def run(self) -> Run:
        return Run(self.mp, self.run_timeout)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (nan if unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def summarize(
    events: int,
    expected: list[int],
    prods: list[dict[str, Any]],
    subs: list[dict[str, Any]],
    server_pid: int | None = None,
    server_cpu0: float = float("nan"),
    warmup: float = 0.0,
) -> dict[str, Any]:
    """One run's figures from its workers' reports.

    ``events``: events produced (the throughput's numerator); ``expected``:
    what each subscriber should have received (loss is the shortfall).
    Throughput is ``events`` over the time from the first send to the last
    event received by any subscriber.  Latency percentiles skip the first
    ``warmup`` seconds of sending.
    """
    t0 = min(p["t0"] for p in prods)
    t_end = max(max(s["last"] for s in subs), max(p["t1"] for p in prods))
    elapsed = max(t_end - t0, 1) / 1e9
    loss = sum(max(0, e - s["unique"]) for e, s in zip(expected, subs, strict=True))
    out: dict[str, Any] = {
        "events_per_s": events / elapsed,
        "p50_us": None,
        "p99_us": None,
        "loss": loss,
        "dups": sum(s["dups"] + s.get("bad", 0) for s in subs),
        "rss_mb": None,
        "elapsed_s": elapsed,
        "send_s": (max(p["t1"] for p in prods) - t0) / 1e9,
    }
    errors = sum(s.get("seq_errors", 0) + s.get("order_errors", 0) for s in subs)
    if any("seq_errors" in s for s in subs):
        out["order_errors"] = errors
    if any(s.get("timed_out") for s in subs):
        out["timed_out"] = True
    # CPU µs per event of each role (all its processes, their libzmq threads included):
    # on 2 cores, throughput is about 2 s / the sum of these.
    per = 1e6 / max(events, 1)
    if all("cpu" in p for p in prods):
        out["producer_cpu_us_per_event"] = sum(p["cpu"] for p in prods) * per
    if all("cpu" in s for s in subs):
        out["subscriber_cpu_us_per_event"] = sum(s["cpu"] for s in subs) * per
    if server_pid is not None:
        out["rss_mb"] = rss_mb(server_pid)[1]
        out["server_cpu_us_per_event"] = (_cpu_s(server_pid) - server_cpu0) * per
    if any("lat_ns" in s for s in subs):
        cut = t0 + int(warmup * 1e9)
        lat: list[int] = []
        for s in subs:
            sent = array("q")
            sent.frombytes(s["lat_sent"])
            ns = array("q")
            ns.frombytes(s["lat_ns"])
            lat.extend(v for t, v in zip(sent, ns, strict=True) if t >= cut)
        lat.sort()
        out["p50_us"] = percentile(lat, 50) / 1000
        out["p99_us"] = percentile(lat, 99) / 1000
        out["p999_us"] = percentile(lat, 99.9) / 1000
        out["max_us"] = (lat[-1] / 1000) if lat else None
        out["latency_samples"] = len(lat)
    return out


# -- ceilings ------------------------------------------------------------------------------


def ceiling(c: Ctx, server: str, mode: str, n: int, rate: float | None = None) -> dict[str, Any]:
    """Raw PUSH/PULL (``server == "none"``), the Python relay, or zmq.proxy, in ``mode``."""
    latency = rate is not None
    with c.run() as run:
        go = c.mp.Event()
        probe_ok = c.mp.Event()
        if server == "none":
            run.spawn(ceil.consumer, None, mode, n, probe_ok, latency, IDLE, name="consumer")
            srv = run.expect("server")[0]
            run.spawn(ceil.producer, srv["ingest"], mode, n, None, go, rate, name="producer")
            server_pid = None
        else:
            relay_mode = f"proxy-{mode}" if server == "proxy" else mode
            run.spawn(ceil.relay, relay_mode, BUFFER, name=server)
            srv = run.expect("server")[0]
            server_pid = srv["pid"]
            run.spawn(
                ceil.consumer, srv["publish"], mode, n, probe_ok, latency, IDLE, name="consumer"
            )
            run.spawn(ceil.producer, srv["ingest"], mode, n, probe_ok, go, rate, name="producer")
        run.expect("ready")
        cpu0 = _cpu_s(server_pid) if server_pid else float("nan")
        go.set()
        prods = run.expect("prod")
        subs = run.expect("sub")
        return summarize(n, [n], prods, subs, server_pid, cpu0, warmup=0.2 if latency else 0)


# -- zevents -------------------------------------------------------------------------------


def zevents_run(
    c: Ctx,
    *,
    streams: int = 1,
    producers: int = 1,
    subscribers: int = 1,
    per_stream: int,
    batch: int = 64,
    buffer_size: int = BUFFER,
    policy: str = "block",
    rate: float | None = None,
    fanout: bool = False,
    create: bool = True,
    hardened: str = "",
) -> dict[str, Any]:
    """One zevents run: a broker, ``producers`` and ``subscribers`` processes.
    ``hardened``: "durable" (a data directory) or "curve" (CURVE on every socket)."""
    with _hardening(hardened) as opts:
        return _zevents_run(
            c, streams, producers, subscribers, per_stream, batch, buffer_size, policy, rate,
            fanout, create, opts,
        )  # fmt: skip


@contextlib.contextmanager
def _hardening(kind: str) -> Iterator[dict[str, Any]]:
    """Broker options (and client environment) for a hardened run, cleaned up after."""
    if not kind:
        yield {}
        return
    with tempfile.TemporaryDirectory(prefix="zevents-bench-") as tmp:
        if kind == "durable":
            yield {"data_dir": tmp}
            return
        from zevents.keys import generate_keys

        _, broker_secret = generate_keys(f"{tmp}/broker", "broker")
        _, client_secret = generate_keys(f"{tmp}/clients", "bench")
        env = {
            "ZEVENTS_CURVE_KEY": str(client_secret),
            "ZEVENTS_CURVE_SERVER": f"{tmp}/broker/broker.key",
        }
        os.environ.update(env)  # the client processes inherit it
        try:
            yield {"curve_secret": str(broker_secret), "curve_clients": f"{tmp}/clients"}
        finally:
            for key in env:
                os.environ.pop(key, None)


def _zevents_run(
    c: Ctx,
    streams: int,
    producers: int,
    subscribers: int,
    per_stream: int,
    batch: int,
    buffer_size: int,
    policy: str,
    rate: float | None,
    fanout: bool,
    create: bool,
    opts: dict[str, Any],
) -> dict[str, Any]:
    from zevents import Admin

    names = [f"session-{i + 1}" for i in range(streams)]
    latency = rate is not None
    started = time.monotonic()
    with c.run() as run:
        run.spawn(zv.broker, buffer_size, opts, name="broker")
        srv = run.expect("server")[0]
        ctl = srv["control"]
        with Admin(ctl, timeout=30) as admin:
            if create:
                for s in names:
                    admin.create_stream(s, buffer_size=buffer_size, policy=policy)
            sub_sets = (
                [names] * subscribers
                if fanout
                else [names[k::subscribers] for k in range(subscribers)]
            )
            for k, mine in enumerate(sub_sets):
                run.spawn(zv.subscriber, ctl, mine, per_stream, latency, IDLE, name=f"sub{k}")
            run.expect("ready", subscribers)
            subscribed = time.monotonic()
            go = c.mp.Event()
            for k in range(producers):
                mine = names[k::producers]
                each = None if rate is None else rate / producers
                run.spawn(zv.producer, ctl, mine, per_stream, batch, go, each, name=f"prod{k}")
            run.expect("ready", producers)
            cpu0 = _cpu_s(srv["pid"])
            go.set()
            prods = run.expect("prod", producers)
            if policy == "drop":  # the subscriber stops at the end marker, whatever was dropped
                for s in names:
                    admin.close_stream(s)
            subs = run.expect("sub", subscribers)
            stats = admin.stats()
        expected = [len(s_) * per_stream for s_ in sub_sets]
        out = summarize(
            streams * per_stream,
            expected,
            prods,
            subs,
            srv["pid"],
            cpu0,
            warmup=0.2 if latency else 0,
        )
        out["setup_s"] = subscribed - started  # broker start, creates, subscribes
        if fanout:
            out["deliveries_per_s"] = out["events_per_s"] * subscribers
        out["broker_dropped"] = stats.dropped
        out["producer_dropped"] = sum(p["dropped"] for p in prods)
        if policy == "drop":  # every event lost must be one the broker said it dropped
            out["delivered"] = sum(s["unique"] for s in subs)
            out["unexplained_loss"] = out["loss"] - stats.dropped
        return out


def zevents_rss(c: Ctx, streams: int, per_stream: int = 10, producers: int = 4) -> dict[str, Any]:
    """Broker memory holding ``streams`` streams of ``per_stream`` events (no subscriber)."""
    from zevents import Admin

    names = [f"session-{i + 1}" for i in range(streams)]
    with c.run() as run:
        run.spawn(zv.broker, BUFFER, name="broker")
        srv = run.expect("server")[0]
        pid = srv["pid"]
        with Admin(srv["control"], timeout=30) as admin:
            admin.stats()  # the broker is serving: its baseline
            base = rss_mb(pid)[0]
            go = c.mp.Event()
            for k in range(producers):
                run.spawn(
                    zv.producer, srv["control"], names[k::producers], per_stream, per_stream, go,
                    name=f"prod{k}",
                )  # fmt: skip
            run.expect("ready", producers)
            go.set()
            prods = run.expect("prod", producers)
            stats = admin.stats()
        now, peak = rss_mb(pid)
        t0 = min(p["t0"] for p in prods)
        t1 = max(p["t1"] for p in prods)
        held = stats.events_in
        return {
            "events_per_s": streams * per_stream / ((t1 - t0) / 1e9),
            "p50_us": None,
            "p99_us": None,
            "loss": streams * per_stream - held,
            "dups": max(0, held - streams * per_stream),
            "rss_mb": peak,
            "rss_now_mb": now,
            "rss_baseline_mb": base,
            "bytes_per_stream": (now - base) * 1024 * 1024 / streams,
            # What the target is stated for, projected linearly when fewer streams ran.
            "rss_100k_mb": base + (peak - base) * 100_000 / streams,
            "streams_held": stats.streams,
        }


def inproc(c: Ctx, variant: str, n: int) -> dict[str, Any]:
    out = zv.inproc(variant, n, BUFFER)
    out.update({"p50_us": None, "p99_us": None, "rss_mb": None})
    return out


# -- peers ---------------------------------------------------------------------------------


def redis_run(c: Ctx, kind: str, pipeline: int, n: int) -> dict[str, Any]:
    with c.run() as run, tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        port = free_port()
        server = peers.start_redis(run, port, tmp)
        run.spawn(peers.redis_sub, port, kind, n, c.peer_maxlen, IDLE, name="sub")
        run.expect("ready")
        go = c.mp.Event()
        run.spawn(peers.redis_prod, port, kind, n, pipeline, c.peer_maxlen, go, name="prod")
        run.expect("ready")
        cpu0 = _cpu_s(server.pid)
        go.set()
        prods = run.expect("prod")
        subs = run.expect("sub")
        return summarize(n, [n], prods, subs, server.pid, cpu0)


def nats_run(c: Ctx, mode: str, n: int, window: int = 0) -> dict[str, Any]:
    with c.run() as run, tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp:
        port = free_port()
        server = peers.start_nats(run, port, tmp)
        js = mode != "core"
        run.spawn(peers.nats_sub, port, js, n, c.peer_maxlen, IDLE, name="sub")
        run.expect("ready")
        go = c.mp.Event()
        run.spawn(peers.nats_prod, port, mode, n, window, go, name="prod")
        run.expect("ready")
        cpu0 = _cpu_s(server.pid)
        go.set()
        prods = run.expect("prod")
        subs = run.expect("sub")
        out = summarize(n, [n], prods, subs, server.pid, cpu0)
        out["failed_acks"] = prods[0].get("failed", 0)
        return out


# -- the scenarios -----------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    group: str
    fn: Callable[[Ctx], dict[str, Any]]
    repeats: int = 3
    quick_repeats: int = 3  # 0: not run in --quick
    needs: str | None = None  # "redis" or "nats"
    note: str = ""
    quick_note: str = ""


def scenarios(c: Ctx) -> list[Scenario]:
    n = c.n
    lat_s = 1.0 if c.quick else 4.0
    out = [
        Scenario("ceiling raw PUSH/PULL 1/msg", "ceiling",
                 lambda c: ceiling(c, "none", "raw", n(400_000, 60_000)), quick_repeats=1),
        Scenario("ceiling raw PUSH/PULL batch64", "ceiling",
                 lambda c: ceiling(c, "none", "raw-batch", n(1_500_000, 200_000))),
        Scenario("ceiling py-relay single-frame", "ceiling",
                 lambda c: ceiling(c, "relay", "single", n(400_000, 60_000))),
        Scenario("ceiling py-relay two-frame", "ceiling",
                 lambda c: ceiling(c, "relay", "multi", n(200_000, 30_000)), quick_repeats=1),
        Scenario("ceiling py-relay batch64", "ceiling",
                 lambda c: ceiling(c, "relay", "batch", n(1_000_000, 150_000)), quick_repeats=1),
        Scenario("ceiling zmq.proxy single-frame", "ceiling",
                 lambda c: ceiling(c, "proxy", "single", n(500_000, 80_000))),
        Scenario("ceiling zmq.proxy two-frame", "ceiling",
                 lambda c: ceiling(c, "proxy", "multi", n(300_000, 40_000)), quick_repeats=1),
        Scenario("ceiling zmq.proxy batch64", "ceiling",
                 lambda c: ceiling(c, "proxy", "batch", n(1_500_000, 200_000)), quick_repeats=1),
        Scenario("ceiling py-relay latency @10k/s", "ceiling",
                 lambda c: ceiling(c, "relay", "single", int(10_000 * lat_s), rate=10_000)),
        Scenario("ceiling py-relay latency @50k/s", "ceiling",
                 lambda c: ceiling(c, "relay", "single", int(50_000 * lat_s), rate=50_000),
                 quick_repeats=0),
        Scenario("ceiling zmq.proxy latency @10k/s", "ceiling",
                 lambda c: ceiling(c, "proxy", "single", int(10_000 * lat_s), rate=10_000),
                 quick_repeats=0),
        # -- peers
        Scenario("redis pubsub PUBLISH each", "peer",
                 lambda c: redis_run(c, "pubsub", 1, n(20_000, 2_500)), needs="redis"),
        Scenario("redis pubsub pipelined64", "peer",
                 lambda c: redis_run(c, "pubsub", 64, n(200_000, 30_000)), needs="redis"),
        Scenario("redis streams XADD each", "peer",
                 lambda c: redis_run(c, "streams", 1, n(15_000, 2_000)), needs="redis",
                 quick_repeats=1),
        Scenario("redis streams XADD pipelined64", "peer",
                 lambda c: redis_run(c, "streams", 64, n(150_000, 25_000)), needs="redis"),
        Scenario("nats core pubsub", "peer",
                 lambda c: nats_run(c, "core", n(300_000, 40_000)), needs="nats"),
        Scenario("nats jetstream publish (await each ack)", "peer",
                 lambda c: nats_run(c, "js-each", n(8_000, 1_500)), needs="nats",
                 quick_repeats=1),
        Scenario("nats jetstream publish_async window256", "peer",
                 lambda c: nats_run(c, "js-async", n(60_000, 10_000), window=256),
                 needs="nats"),
        # -- zevents
        Scenario("zevents 1p1s BLOCK send_many64 buf100", "zevents",
                 lambda c: zevents_run(c, per_stream=n(300_000, 60_000), batch=64)),
        Scenario("zevents 1p1s BLOCK send_many64 buf1000", "zevents",
                 lambda c: zevents_run(c, per_stream=n(300_000, 60_000), batch=64,
                                       buffer_size=1000), quick_repeats=1),
        Scenario("zevents 1p1s BLOCK send_many64 buf100 durable", "zevents",
                 lambda c: zevents_run(c, per_stream=n(300_000, 60_000), batch=64,
                                       hardened="durable"), quick_repeats=1),
        Scenario("zevents 1p1s BLOCK send_many64 buf100 CURVE", "zevents",
                 lambda c: zevents_run(c, per_stream=n(300_000, 60_000), batch=64,
                                       hardened="curve"), quick_repeats=1),
        Scenario("zevents latency @10k/s durable", "zevents",
                 lambda c: zevents_run(c, per_stream=int(10_000 * lat_s), rate=10_000,
                                       buffer_size=1000, hardened="durable"), quick_repeats=0),
        Scenario("zevents 1p1s BLOCK send buf100", "zevents",
                 lambda c: zevents_run(c, per_stream=n(150_000, 30_000), batch=1),
                 quick_repeats=1),
        Scenario("zevents 1p1s BLOCK send buf1000", "zevents",
                 lambda c: zevents_run(c, per_stream=n(150_000, 30_000), batch=1,
                                       buffer_size=1000), quick_repeats=0),
        Scenario("zevents 1p1s DROP send_many64 buf100", "zevents",
                 lambda c: zevents_run(c, per_stream=n(300_000, 60_000), batch=64,
                                       policy="drop"), quick_repeats=1),
        Scenario("zevents 1k streams 4p/4s send_many10", "zevents",
                 lambda c: zevents_run(c, streams=1_000, producers=4, subscribers=4,
                                       per_stream=n(200, 20), batch=10, create=False),
                 quick_repeats=1),
        Scenario("zevents 10k streams 4p/4s send_many10", "zevents",
                 lambda c: zevents_run(c, streams=10_000, producers=4, subscribers=4,
                                       per_stream=n(30, 10), batch=10, create=False),
                 quick_repeats=1),
        Scenario("zevents fan-out 1 stream to 10 subs", "zevents",
                 lambda c: zevents_run(c, subscribers=10, fanout=True,
                                       per_stream=n(100_000, 10_000), batch=64,
                                       buffer_size=1000),
                 quick_repeats=1),
        Scenario("zevents latency @10k/s", "zevents",
                 lambda c: zevents_run(c, per_stream=int(10_000 * lat_s), rate=10_000,
                                       buffer_size=1000)),
        Scenario("zevents latency @50k/s", "zevents",
                 lambda c: zevents_run(c, per_stream=int(50_000 * lat_s), rate=50_000,
                                       buffer_size=1000), quick_repeats=1),
        Scenario("zevents 10k streams @10/s each latency", "zevents",
                 lambda c: zevents_run(c, streams=10_000, producers=4, subscribers=4,
                                       per_stream=30, rate=100_000, create=False),
                 quick_repeats=0, quick_note="needs ~10 s per run"),
        Scenario("zevents broker RSS 100k streams x10", "zevents",
                 lambda c: zevents_rss(c, n(100_000, 20_000)), quick_repeats=1,
                 quick_note="20,000 streams in --quick"),
    ]  # fmt: skip
    for variant, label in (
        ("es-thread", "EventStream thread->thread"),
        ("queue-thread", "queue.Queue thread->thread"),
        ("es-async", "EventStream thread->asyncio"),
        ("aqueue-async", "asyncio.Queue thread->asyncio"),
        ("es-task", "EventStream task->task"),
        ("aqueue-task", "asyncio.Queue task->task"),
    ):
        out.append(
            Scenario(
                f"inproc {label}",
                "inproc",
                lambda c, v=variant: inproc(c, v, n(200_000, 40_000)),
                quick_repeats=1,
            )
        )
    return out


# -- targets -------------------------------------------------------------------------------

HEADLINE = "zevents 1p1s BLOCK send_many64 buf100"


@dataclass
class Target:
    """``num.metric / den.metric`` compared with ``bound`` (or ``num.metric`` alone)."""

    label: str
    num: str
    metric: str
    op: str  # ">=", "<=", "<"
    bound: float
    den: str | None = None
    den_metric: str | None = None

    def evaluate(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        value = _median(results.get(self.num), self.metric)
        den = _median(results.get(self.den), self.den_metric or self.metric) if self.den else None
        out: dict[str, Any] = {
            "target": self.label,
            "zevents": self.num,
            "metric": self.metric,
            "value": value,
            "reference": self.den,
            "reference_value": den,
            "op": self.op,
            "bound": self.bound,
        }
        figure = value if self.den is None else (value / den if value and den else None)
        out["figure"] = figure
        if figure is None:
            out["met"] = None
        elif self.op == ">=":
            out["met"] = figure >= self.bound
        elif self.op == "<=":
            out["met"] = figure <= self.bound
        else:
            out["met"] = figure < self.bound
        return out


def targets() -> list[Target]:
    h = HEADLINE
    out = []
    for z in (h, "zevents 1p1s BLOCK send_many64 buf1000"):
        out.append(Target("throughput >= zmq.proxy single-frame", z, "events_per_s", ">=", 1.0,
                          "ceiling zmq.proxy single-frame"))  # fmt: skip
    out += [
        Target(">= 20x Redis pub/sub one PUBLISH per event", h, "events_per_s", ">=", 20,
               "redis pubsub PUBLISH each"),
        Target(">= 1.5x Redis pub/sub pipelined", h, "events_per_s", ">=", 1.5,
               "redis pubsub pipelined64"),
        Target(">= 1.5x NATS core pub/sub (nats-py)", h, "events_per_s", ">=", 1.5,
               "nats core pubsub"),
        Target(">= 2x Redis Streams pipelined", h, "events_per_s", ">=", 2,
               "redis streams XADD pipelined64"),
        Target(">= 5x NATS JetStream publish_async", h, "events_per_s", ">=", 5,
               "nats jetstream publish_async window256"),
        Target("p50 @10k/s <= 1.2x the Python relay's", "zevents latency @10k/s", "p50_us",
               "<=", 1.2, "ceiling py-relay latency @10k/s"),
        Target("p99 @10k/s < 1000 us", "zevents latency @10k/s", "p99_us", "<", 1000),
        Target("broker RSS, 100k streams x 10 events < 400 MB (projected if fewer ran)",
               "zevents broker RSS 100k streams x10", "rss_100k_mb", "<", 400),
        Target("10k streams @10/s: p99 < 5000 us", "zevents 10k streams @10/s each latency",
               "p99_us", "<", 5000),
    ]  # fmt: skip
    return out


#: Informative ratios (no target): the headline against every ceiling.
INFO_RATIOS = [
    (HEADLINE, "ceiling raw PUSH/PULL batch64"),
    (HEADLINE, "ceiling py-relay single-frame"),
    (HEADLINE, "ceiling py-relay two-frame"),
    (HEADLINE, "ceiling py-relay batch64"),
    (HEADLINE, "ceiling zmq.proxy two-frame"),
    (HEADLINE, "ceiling zmq.proxy batch64"),
    ("zevents 1p1s BLOCK send buf100", "ceiling zmq.proxy single-frame"),
    ("zevents 1p1s BLOCK send buf100", "ceiling py-relay single-frame"),
    ("inproc EventStream thread->thread", "inproc queue.Queue thread->thread"),
    ("inproc EventStream thread->asyncio", "inproc asyncio.Queue thread->asyncio"),
    ("inproc EventStream task->task", "inproc asyncio.Queue task->task"),
]


# -- aggregation and printing ------------------------------------------------------------

METRICS = ("events_per_s", "p50_us", "p99_us", "loss", "dups", "rss_mb")


def _median(rec: dict[str, Any] | None, metric: str) -> float | None:
    if not rec or not rec.get("summary"):
        return None
    s = rec["summary"].get(metric)
    return None if s is None else s["median"]


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of every numeric figure over the successful runs."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {}
    keys = sorted({k for r in ok for k, v in r.items() if isinstance(v, (int, float))})
    for k in keys:
        vals = [r[k] for r in ok if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"


def fmt_spread(s: dict[str, float] | None, f: Callable[[float | None], str]) -> str:
    if s is None:
        return "-"
    if s["min"] == s["max"]:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}..{f(s['max'])})"


def print_table(records: list[dict[str, Any]]) -> None:
    head = ("scenario", "runs", "events/s median (min..max)", "p50 µs", "p99 µs", "loss", "dups",
            "peak RSS MB")  # fmt: skip
    rows = [head]
    for rec in records:
        if rec.get("skipped"):
            rows.append((rec["name"], "-", f"skipped: {rec['skipped']}", "", "", "", "", ""))
            continue
        s = rec["summary"]
        if not s:
            rows.append((rec["name"], f"0/{len(rec['runs'])}", "FAILED (see above)", "", "", "",
                         "", ""))  # fmt: skip
            continue
        ok = len([r for r in rec["runs"] if "error" not in r])
        rows.append(
            (
                rec["name"],
                f"{ok}/{len(rec['runs'])}",
                fmt_spread(s.get("events_per_s"), fmt_rate),
                fmt_spread(s.get("p50_us"), fmt_us),
                fmt_spread(s.get("p99_us"), fmt_us),
                _fmt_max(s.get("loss")),
                _fmt_max(s.get("dups")),
                "-" if s.get("rss_mb") is None else f"{s['rss_mb']['max']:.0f}",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt_max(s: dict[str, float] | None) -> str:
    return "-" if s is None else f"{s['max']:.0f}"


def print_targets(records: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    by_name = {r["name"]: r for r in records}
    evaluated = []
    print("\nTargets (ratios of medians within this run):")
    for t in targets():
        e = t.evaluate(by_name)
        evaluated.append(e)
        if e["figure"] is None:
            why = "not measured in this run"
            missing = [n for n in (t.num, t.den) if n and not (by_name.get(n) or {}).get("summary")]
            if missing:
                why = "not measured: " + "; ".join(_why_missing(by_name.get(n), n) for n in missing)
            print(f"  [ n/a ] {t.label}: {why}")
            continue
        mark = "MET    " if e["met"] else "NOT MET"
        if t.den:
            unit = "x"
            print(
                f"  [{mark}] {t.num} / {t.den} = {e['figure']:.2f}{unit} "
                f"(target {t.op} {t.bound:g}{unit}; {_fmt_metric(t.metric, e['value'])} vs "
                f"{_fmt_metric(t.den_metric or t.metric, e['reference_value'])})"
            )
        else:
            held = _median(by_name.get(t.num), "streams_held") or 100_000
            note = f" (projected from {held:,.0f} streams)" if held < 100_000 else ""
            print(
                f"  [{mark}] {t.num}: {_fmt_metric(t.metric, e['figure'])}{note} "
                f"(target {t.op} {t.bound:g})"
            )
    zero = [
        r["name"]
        for r in records
        if r["group"] == "zevents" and "DROP" not in r["name"] and r.get("summary")
        and ((r["summary"].get("loss", {}).get("max") or 0) > 0
             or (r["summary"].get("dups", {}).get("max") or 0) > 0
             or (r["summary"].get("order_errors", {}).get("max") or 0) > 0)
    ]  # fmt: skip
    measured = [
        r
        for r in records
        if r["group"] == "zevents" and "DROP" not in r["name"] and r.get("summary")
    ]
    ok = None if not measured else not zero
    evaluated.append(
        {"target": "zero loss, duplicates and order errors under BLOCK", "met": ok,
         "failing": zero, "scenarios": [r["name"] for r in measured]}
    )  # fmt: skip
    if ok is None:
        print(
            "  [ n/a ] zero loss, duplicates and order errors under BLOCK: no zevents scenario ran"
        )
    else:
        mark = "MET    " if ok else "NOT MET"
        detail = (
            f"failing: {', '.join(zero)}" if zero else f"{len(measured)} zevents BLOCK scenarios"
        )
        print(f"  [{mark}] zero loss, duplicates and order errors under BLOCK ({detail})")
    print("\nOther ratios (no target):")
    for num, den in INFO_RATIOS:
        a, b = _median(by_name.get(num), "events_per_s"), _median(by_name.get(den), "events_per_s")
        if a and b:
            print(f"  {num} / {den} = {a / b:.2f}x ({fmt_rate(a)} vs {fmt_rate(b)} events/s)")
    if quick:
        print("\n(--quick: fewer events and repeats; see docs/performance.md for a full run)")
    return evaluated


def _why_missing(rec: dict[str, Any] | None, name: str) -> str:
    if rec is None:
        return f"{name} not selected"
    if rec.get("skipped"):
        return f"{name} {rec['skipped']}"
    return f"{name} failed"


def _fmt_metric(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric == "events_per_s":
        return f"{fmt_rate(v)} events/s"
    if metric.endswith("_us"):
        return f"{v:,.0f} µs"
    if metric.endswith("_mb"):
        return f"{v:.0f} MB"
    return f"{v:g}"


def run_line(r: dict[str, Any], secs: float) -> str:
    if "error" in r:
        return f"FAILED: {r['error'].splitlines()[0]} ({secs:.1f}s)"
    parts = [f"{fmt_rate(r.get('events_per_s'))} ev/s"]
    if r.get("p50_us") is not None:
        parts.append(f"p50 {fmt_us(r['p50_us'])} µs p99 {fmt_us(r['p99_us'])} µs")
    parts.append(f"loss {r.get('loss', 0)} dups {r.get('dups', 0)}")
    if r.get("order_errors"):
        parts.append(f"ORDER ERRORS {r['order_errors']}")
    if r.get("rss_mb") is not None:
        parts.append(f"rss {r['rss_mb']:.0f} MB")
    cpu = [
        f"{role} {r[f'{role}_cpu_us_per_event']:.1f}"
        for role in ("producer", "server", "subscriber")
        if r.get(f"{role}_cpu_us_per_event") is not None
    ]
    if cpu:
        parts.append(f"cpu µs/ev: {' '.join(cpu)}")
    if r.get("timed_out"):
        parts.append("TIMED OUT waiting for events")
    return ", ".join(parts) + f" ({secs:.1f}s)"


# -- profiling ---------------------------------------------------------------------------


def profile(c: Ctx, outdir: Path, n: int, rate: int, extra: list[str]) -> None:
    """Run 1p1s BLOCK (send_many 64, buffer 100) under py-spy, one recorder per process."""
    from zevents import Admin

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    outdir.mkdir(parents=True, exist_ok=True)
    with c.run() as run, contextlib.ExitStack() as logs:
        run.spawn(zv.broker, BUFFER, name="broker")
        srv = run.expect("server")[0]
        with Admin(srv["control"], timeout=30) as admin:
            admin.create_stream("session-1", buffer_size=BUFFER, policy="block")
        run.spawn(zv.subscriber, srv["control"], ["session-1"], n, False, IDLE, name="sub")
        sub_pid = run.expect("ready")[0]["pid"]
        go = c.mp.Event()
        run.spawn(zv.producer, srv["control"], ["session-1"], n, 64, go, None, name="prod")
        prod_pid = run.expect("ready")[0]["pid"]
        spies = {}
        for role, pid in (("producer", prod_pid), ("broker", srv["pid"]), ("subscriber", sub_pid)):
            spies[role] = run.popen(
                [pyspy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                 "--output", str(outdir / f"{role}.txt"), *extra],
                stdout=logs.enter_context((outdir / f"{role}.log").open("wb")),
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        time.sleep(1.5)  # let the recorders attach (pacing only: the run waits for "go")
        cpu0 = _cpu_s(srv["pid"])
        threads0 = thread_cpu(srv["pid"])
        go.set()
        prods = run.expect("prod")
        subs = run.expect("sub")
        res = summarize(n, [n], prods, subs, srv["pid"], cpu0)
        threads = {
            "producer": prods[0]["threads"],
            "broker": cpu_delta(threads0, thread_cpu(srv["pid"])),
            "subscriber": subs[0]["threads"],
        }
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)
        for spy in spies.values():
            with contextlib.suppress(Exception):
                spy.wait(20)
    report = [f"1p1s BLOCK send_many64 buf100, {n} events, py-spy {rate} Hz {' '.join(extra)}\n"]
    report.append(f"{run_line(res, res['elapsed_s'])}\n\nCPU µs per event by thread:\n")
    for role, per_thread in threads.items():
        busy = {k: v for k, v in per_thread.items() if v > 0}
        report.append(
            f"  {role}: "
            + ", ".join(f"{k} {v * 1e6 / n:.2f}" for k, v in sorted(busy.items()))
            + "\n"
        )
    for role in spies:
        path = outdir / f"{role}.txt"
        if not path.exists():
            report.append(f"\n{role}: no profile written (see {role}.log)\n")
            continue
        total, rows = top_self(path)
        report.append(f"\n{role}: {total} samples (active only)\n")
        report.append(f"{'self %':>7} {'total %':>8}  function\n")
        for name, self_n, incl in rows:
            report.append(f"{100 * self_n / total:7.1f} {100 * incl / total:8.1f}  {name}\n")
    text = "".join(report)
    (outdir / "summary.txt").write_text(text)
    print(text)


_LINE = re.compile(r":\d+\)$")


def _short(frame: str) -> str:
    frame = _LINE.sub(")", frame)
    frame = re.sub(r"\(/.*?/site-packages/", "(", frame)
    frame = re.sub(r"\(/.*?/lib/python3\.\d+/", "(", frame)
    return frame.replace(str(Path(__file__).resolve().parents[1]) + "/", "")


def top_self(path: Path, k: int = 18) -> tuple[int, list[tuple[str, int, int]]]:
    """``(samples, [(function, self samples, inclusive samples)])`` from py-spy raw output."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    return total, [(f, c, incl_c[f]) for f, c in self_c.most_common(k)]


# -- main ------------------------------------------------------------------------------------


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it."""
    root = Path(__file__).resolve().parents[1]
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "zevents", "broker"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            out["zevents_or_broker_modified"] = bool(dirty.stdout.strip())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer events and repeats (~1 minute)")
    ap.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    ap.add_argument("--only", metavar="SUBSTRING", action="append", default=[],
                    help="run scenarios whose name contains SUBSTRING (repeatable)")  # fmt: skip
    ap.add_argument("--repeats", type=int, help="runs per scenario (overrides the defaults)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--peer-maxlen", type=int, default=BUFFER,
                    help="Redis Streams MAXLEN ~, JetStream max_msgs (%(default)s)")  # fmt: skip
    ap.add_argument("--profile", metavar="DIR", help="profile 1p1s BLOCK with py-spy into DIR")
    ap.add_argument("--profile-events", type=int, default=1_000_000)
    ap.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too)")
    ap.add_argument("--profile-gil", action="store_true", help="py-spy --gil (GIL holder only)")
    args = ap.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    c = Ctx(mp.get_context("spawn"), args.quick, 60.0 if args.quick else 300.0, args.peer_maxlen)
    if args.profile:
        c.run_timeout = 600
        extra = ["--native"] if args.profile_native else ["--nonblocking"]
        if args.profile_gil:
            extra.append("--gil")
        profile(c, Path(args.profile), args.profile_events, 250, extra)
        return 0
    chosen = scenarios(c)
    if args.only:
        chosen = [s for s in chosen if any(o.lower() in s.name.lower() for o in args.only)]
    if args.list:
        for s in chosen:
            print(
                f"{s.group:8} {s.name}  (runs: {s.repeats}, quick: {s.quick_repeats or 'skipped'})"
            )
        return 0
    load0 = os.getloadavg()
    lacking = peers.missing()
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    import msgpack
    import zmq

    vers = {
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        **peers.versions(),
        **git_state(),
    }
    print(f"zevents bench{' --quick' if args.quick else ''}: {len(chosen)} scenarios, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("  " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    if "pure-Python" in vers.get("redis-py", ""):
        print("  note: redis-py runs without hiredis here; with hiredis its Redis figures are"
              " about twice as high (pip install hiredis)")  # fmt: skip
    try:
        for s in chosen:
            rec: dict[str, Any] = {"name": s.name, "group": s.group, "runs": [], "summary": {}}
            records.append(rec)
            repeats = args.repeats or (s.quick_repeats if args.quick else s.repeats)
            if s.needs and s.needs in lacking:
                rec["skipped"] = lacking[s.needs]
                print(f"{s.name}: skipped: {lacking[s.needs]}")
                continue
            if repeats <= 0:
                why = s.quick_note or "kept short"
                rec["skipped"] = f"not run in --quick ({why})"
                print(f"{s.name}: skipped in --quick ({why})")
                continue
            if args.quick and s.quick_note:
                rec["note"] = s.quick_note
            print(f"{s.name}:")
            for i in range(repeats):
                t = time.monotonic()
                try:
                    r = s.fn(c)
                except BenchError as exc:
                    r = {"error": str(exc)}
                secs = time.monotonic() - t
                r["wall_s"] = secs
                rec["runs"].append(r)
                print(f"  run {i + 1}/{repeats}: {run_line(r, secs)}", flush=True)
            rec["summary"] = aggregate(rec["runs"])
    except KeyboardInterrupt:
        print("\ninterrupted: reporting what ran", file=sys.stderr)
    total = time.monotonic() - started
    print(f"\nResults ({total:.0f}s; medians of the runs, spread in brackets; loss and dups: "
          f"worst run; RSS: the broker's/server's peak)\n")  # fmt: skip
    print_table(records)
    evaluated = print_targets(records, args.quick)
    if args.json:
        doc = {
            "meta": {
                "quick": args.quick,
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "seconds": total,
                "buffer": BUFFER,
                "peer_maxlen": args.peer_maxlen,
                "versions": vers,
                "load_average_at_start": load0,
                "load_average_at_end": os.getloadavg(),
            },
            "scenarios": [
                {
                    "name": r["name"],
                    "group": r["group"],
                    "skipped": r.get("skipped"),
                    "note": r.get("note"),
                    "runs": r["runs"],
                    "summary": r["summary"],
                    **{m: (r["summary"].get(m) or {}).get("median") for m in METRICS},
                    "broker_peak_rss_mb": (r["summary"].get("rss_mb") or {}).get("max"),
                }
                for r in records
            ],
            "targets": evaluated,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
