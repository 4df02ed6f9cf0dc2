#!/usr/bin/env python3
"""zevents soak test: N producers, M streams, K subscribers against one broker, bounded in time.

    .venv/bin/python scripts/soak.py --producers 2 --streams 20 --subscribers 2 --seconds 3
    .venv/bin/python scripts/soak.py -p 4 -m 200 -k 3 -s 600 --rate 50 --json soak.json
    .venv/bin/python scripts/soak.py -s 60 --policy drop --buffer-size 20
    .venv/bin/python scripts/soak.py -s 60 --broker-arg=--subscriber-timeout --broker-arg=2
    .venv/bin/python scripts/soak.py -s 60 -- --subscriber-timeout 2    # same: after "--"
    .venv/bin/python scripts/soak.py -s 60 --control tcp://127.0.0.1:5555 --broker-pid 1234

Unless ``--control`` names a running broker, the script starts its own
(``python -m zevents broker`` on free loopback ports, plus the ``--broker-arg``
extras and everything after ``--``, verbatim), reads its endpoints from its
start-up line and stops it at the end (SIGTERM, then SIGKILL).

The shape of a run:

* An :class:`~zevents.Admin` creates the M streams ``soak-<run>-<n>`` with
  ``--policy`` (and ``--buffer-size``, else the broker's default).
* K subscriber processes each follow **all** M streams from seq 1 on one
  :class:`~zevents.Subscriber`; N producer processes each write to **all** M
  streams, so every stream has N interleaved writers.  Producers start once
  every process is connected and subscribed.
* Each event is a ``TextDelta`` whose text is ``p<producer>:<counter>``, the
  counter counting that producer's events on that stream from 0.  Per stream
  a subscriber checks that ``seq`` goes up by exactly one, and per
  (stream, producer) that counters only go up: a counter seen again is a
  **duplicate**, one arriving after a later one is **out of order**.  **Loss**
  is what the producers sent minus what the broker reported dropped (DROP)
  minus the distinct events a subscriber got, per stream and subscriber.
* ``--rate R`` paces each stream at R events/s in all (R/N from each
  producer); ``--rate 0`` (the default) sends at full speed, ``--batch``
  events per ``send_many`` per stream.  Under DROP events go one per ``send``
  so that a ``StreamFullError`` tells exactly which event was not taken (it is
  sent again, with the same counter).
* After ``--seconds`` of sending, producers flush; then the Admin reads each
  stream's counters and closes the streams, and subscribers finish once they
  saw the end of every stream.
* Meanwhile the broker's memory is sampled from ``/proc/<pid>/status``
  (VmRSS, and VmHWM for the peak).

Every wait has a deadline: the run ends within ``--seconds + --grace``
seconds whatever happens (2 s later a watchdog kills every child and exits 3
if the script itself got stuck).  Exit status: 0 if everything was delivered once
and in order, 1 if there was loss, a duplicate, an event out of order, a seq
error, or a process failed or timed out, 3 from the watchdog.  ``--json PATH``
writes every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import multiprocessing as mp
import os
import queue as queue_mod
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

LOOPBACK = "tcp://127.0.0.1:0"
LISTENING = re.compile(r"listening: control=(\S+) ingest=(\S+) publish=(\S+)")
PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")
#: Seconds the broker gets to start, and to stop after SIGTERM.
BROKER_START = 20.0
BROKER_STOP = 5.0
#: Seconds kept at the end of ``--grace`` for stopping the children and the broker.
SHUTDOWN_RESERVE = 8.0
#: Seconds any one SDK call may wait for the broker (``timeout=`` of the clients).
CLIENT_TIMEOUT = 10.0
#: Paced runs: at most this many events per stream in one go when a producer is late.
MAX_BURST = 64
#: Gaps in one producer's counters on one stream that a subscriber remembers.
MAX_GAPS = 1024


# -- helpers shared with the workers ------------------------------------------------------


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def payload(producer: int, counter: int) -> str:
    """The text of producer ``producer``'s event number ``counter`` on a stream."""
    return f"p{producer}:{counter}"


def parse_payload(text: Any) -> tuple[int, int] | None:
    """``(producer, counter)`` from :func:`payload`'s text; None if it is not one."""
    if not isinstance(text, str) or not text.startswith("p"):
        return None
    head, sep, tail = text[1:].partition(":")
    if not sep or not head.isdigit() or not tail.isdigit():
        return None
    return int(head), int(tail)


def _report_crash(q: Any, who: str, exc: BaseException) -> None:
    with contextlib.suppress(Exception):
        q.put({"role": "error", "who": who, "error": f"{exc!r}\n{traceback.format_exc()}"})


# -- producers -----------------------------------------------------------------------------


def producer_main(
    q: Any,
    control: str,
    index: int,
    streams: list[str],
    seconds: float,
    rate_per_stream: float,
    batch: int,
    go: Any,
    abort: Any,
    deadline: float,
) -> None:
    """Process entry point of producer ``index`` (see the module docstring).

    ``rate_per_stream`` is this producer's share (events/s per stream, 0 for
    full speed); it starts when ``go`` is set and stops early if ``abort`` is;
    ``deadline`` (``time.monotonic()``, system-wide on Linux) bounds every
    wait.  Reports ``ready``, then ``producer`` with its counts.
    """
    die_with_parent()
    who = f"producer {index}"
    try:
        _produce(
            q, who, control, index, streams, seconds, rate_per_stream, batch, go, abort, deadline
        )
    except BaseException as exc:
        _report_crash(q, who, exc)
        raise SystemExit(1) from None


def _produce(
    q: Any,
    who: str,
    control: str,
    index: int,
    streams: list[str],
    seconds: float,
    rate_per_stream: float,
    batch: int,
    go: Any,
    abort: Any,
    deadline: float,
) -> None:
    from zevents import Event, Producer, StreamFullError, ZEventsError

    monotonic = time.monotonic
    m = len(streams)
    position = {sid: j for j, sid in enumerate(streams)}
    sent = [0] * m
    dropped = [0] * m  # as the producer was told (StreamFullError.dropped)
    text_delta = Event.text_delta
    error: str | None = None

    producer = Producer(control, timeout=CLIENT_TIMEOUT)
    try:

        def left() -> float:
            return max(deadline - monotonic(), 0.001)

        def send(j: int, n: int) -> None:
            """Send the next ``n`` events of stream ``j``; a drop is retried."""
            sid = streams[j]
            first = sent[j]
            events = [text_delta(payload(index, c)) for c in range(first, first + n)]
            if batch == 1:  # one event per call: a StreamFullError means "not taken"
                for event in events:
                    while True:
                        try:
                            producer.send(sid, event, timeout=left())
                            break
                        except StreamFullError as exc:
                            dropped[j] += exc.dropped
                    sent[j] += 1
                return
            # A TimeoutError here may leave part of the batch sent and uncounted:
            # the run has failed by then (a stream stalled until the deadline).
            producer.send_many(sid, events, timeout=left())
            sent[j] += n

        q.put({"role": "ready", "kind": "producer", "index": index})
        if not go.wait(max(deadline - monotonic(), 0)):
            raise TimeoutError("never told to start")
        if abort.is_set():
            return
        t0 = monotonic()
        end = t0 + seconds
        k = 0  # events sent so far, over all streams (pacing)
        j = 0  # the next stream (full speed)
        try:
            if rate_per_stream > 0:
                total_rate = rate_per_stream * m
                while True:
                    now = monotonic()
                    if now >= end or abort.is_set():
                        break
                    due = int((now - t0) * total_rate) + 1
                    if due <= k:  # pacing only: the next event is not due yet
                        time.sleep(min(t0 + k / total_rate - now, end - now))
                        continue
                    n = min(due - k, m * MAX_BURST)
                    # event k + i goes to stream (k + i) % m
                    base, extra = divmod(n, m)
                    for i in range(min(n, m)):
                        count = base + (1 if i < extra else 0)
                        if count:
                            send((k + i) % m, count)
                    k += n
            else:
                while monotonic() < end and not abort.is_set():
                    send(j, batch)
                    j = (j + 1) % m
        except (TimeoutError, ZEventsError) as exc:
            error = f"send: {exc!r}"
        t_sent = monotonic()
        while True:
            try:
                producer.flush(timeout=left())
                break
            except StreamFullError as exc:
                dropped[position.get(exc.stream_id or "", 0)] += exc.dropped
            except (TimeoutError, ZEventsError) as exc:
                error = error or f"flush: {exc!r}"
                break
        t_flushed = monotonic()
    finally:
        producer.close()
    q.put(
        {
            "role": "producer",
            "index": index,
            "sent": sent,
            "dropped": dropped,
            "t0": t0,
            "t_sent": t_sent,
            "t_flushed": t_flushed,
            "error": error,
            "who": who,
        }
    )


# -- subscribers ---------------------------------------------------------------------------


class _Gaps:
    """Counters still missing on one (stream, producer): ``[start, end)`` ranges.

    Only the latest :data:`MAX_GAPS` ranges are kept (a DROP run leaves one per
    burst of drops), so an event arriving later than that counts as a duplicate
    rather than out of order: a failure either way.
    """

    __slots__ = ("ranges",)

    def __init__(self) -> None:
        self.ranges: deque[list[int]] = deque(maxlen=MAX_GAPS)

    def add(self, start: int, end: int) -> None:
        self.ranges.append([start, end])

    def fill(self, c: int) -> bool:
        """Take ``c`` out if it was missing; False if it was not (a duplicate)."""
        for i, (a, b) in enumerate(self.ranges):
            if a <= c < b:
                if a == c and b == c + 1:
                    del self.ranges[i]
                elif a == c:
                    self.ranges[i][0] = c + 1
                elif b == c + 1:
                    self.ranges[i][1] = c
                else:
                    self.ranges[i][1] = c
                    if len(self.ranges) == self.ranges.maxlen:  # forget the oldest
                        self.ranges.popleft()
                        i -= 1
                    self.ranges.insert(i + 1, [c + 1, b])
                return True
        return False


def subscriber_main(
    q: Any, control: str, index: int, streams: list[str], producers: int, deadline: float
) -> None:
    """Process entry point of subscriber ``index``: follow every stream from seq 1
    until each ended (or ``deadline``); reports ``ready``, then ``subscriber``."""
    die_with_parent()
    who = f"subscriber {index}"
    try:
        _consume(q, who, control, index, streams, producers, deadline)
    except BaseException as exc:
        _report_crash(q, who, exc)
        raise SystemExit(1) from None


def _consume(
    q: Any,
    who: str,
    control: str,
    index: int,
    streams: list[str],
    producers: int,
    deadline: float,
) -> None:
    from zevents import Subscriber, ZEventsError

    monotonic = time.monotonic
    m = len(streams)
    position = {sid: j for j, sid in enumerate(streams)}
    last_seq = [0] * m
    delivered = [0] * m
    unique = [0] * m  # distinct (producer, counter) pairs per stream
    nxt = [0] * (m * producers)  # next counter expected per (stream, producer)
    gaps: dict[int, _Gaps] = {}
    duplicates = out_of_order = seq_gaps = seq_back = malformed = 0
    t_first = t_last = 0.0
    ended = timed_out = False
    error: str | None = None

    with Subscriber(control, timeout=CLIENT_TIMEOUT) as sub:
        for sid in streams:
            sub.subscribe(sid, from_seq=1)
        q.put({"role": "ready", "kind": "subscriber", "index": index})
        next_event = sub.next_event
        while True:
            now = monotonic()
            if now >= deadline:
                timed_out = True
                break
            try:
                event = next_event(timeout=deadline - now)
            except TimeoutError:
                timed_out = True
                break
            except ZEventsError as exc:
                error = f"next_event: {exc!r}"
                break
            if event is None:
                ended = True
                break
            t_last = monotonic()
            if not t_first:
                t_first = t_last
            j = position.get(event.stream_id or "", -1)
            if j < 0 or event.seq is None:
                malformed += 1
                continue
            delivered[j] += 1
            seq = event.seq
            prev = last_seq[j]
            if seq == prev + 1:
                last_seq[j] = seq
            elif seq > prev + 1:
                seq_gaps += seq - prev - 1
                last_seq[j] = seq
            else:
                seq_back += 1
            parsed = parse_payload(event.data.get("text"))
            if parsed is None or parsed[0] >= producers:
                malformed += 1
                continue
            key = j * producers + parsed[0]
            c = parsed[1]
            expected = nxt[key]
            if c == expected:
                nxt[key] = c + 1
                unique[j] += 1
            elif c > expected:
                g = gaps.get(key)
                if g is None:
                    g = gaps[key] = _Gaps()
                g.add(expected, c)
                nxt[key] = c + 1
                unique[j] += 1
            else:
                g = gaps.get(key)
                if g is not None and g.fill(c):
                    out_of_order += 1
                    unique[j] += 1
                else:
                    duplicates += 1
        unfinished = len(sub.streams)
    q.put(
        {
            "role": "subscriber",
            "index": index,
            "who": who,
            "delivered": delivered,
            "unique": unique,
            "last_seq": last_seq,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "seq_gaps": seq_gaps,
            "seq_back": seq_back,
            "malformed": malformed,
            "t_first": t_first,
            "t_last": t_last,
            "ended": ended,
            "timed_out": timed_out,
            "unfinished": unfinished,
            "error": error,
        }
    )


# -- the broker ----------------------------------------------------------------------------


@dataclass
class BrokerProcess:
    """The broker this script started: its process, endpoints and log."""

    proc: subprocess.Popen[str]
    endpoints: tuple[str, str, str] | None = None
    started: threading.Event = field(default_factory=threading.Event)
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=200))
    problems: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, extra: Sequence[str]) -> BrokerProcess:
        argv = [
            sys.executable,
            "-m",
            "zevents",
            "broker",
            "--control",
            LOOPBACK,
            "--ingest",
            LOOPBACK,
            "--publish",
            LOOPBACK,
            "--log-level",
            "info",
            *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
            preexec_fn=die_with_parent,  # no other thread exists yet
        )
        broker = cls(proc)
        broker.reader = threading.Thread(target=broker._read, name="broker-log", daemon=True)
        broker.reader.start()
        return broker

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.log_tail.append(line)
            if PROBLEM.search(line) and len(self.problems) < 100:
                self.problems.append(line)
            if self.endpoints is None:
                found = LISTENING.search(line)
                if found:
                    control, ingest, publish = found.groups()
                    self.endpoints = (control, ingest, publish)
                    self.started.set()
        self.started.set()  # EOF: it exited (endpoints stay None if it never started)

    def wait_started(self, timeout: float) -> tuple[str, str, str]:
        if not self.started.wait(max(timeout, 0)) or self.endpoints is None:
            tail = "\n".join(self.log_tail)
            raise RuntimeError(f"the broker did not start (exit {self.proc.poll()}):\n{tail}")
        return self.endpoints

    def stop(self, timeout: float) -> str | None:
        """SIGTERM, then SIGKILL after ``timeout``; a problem, or None if it stopped cleanly."""
        problem = None
        if self.proc.poll() is not None:
            if self.endpoints is not None:  # else wait_started reported it
                problem = f"broker exited early with {self.proc.returncode}"
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=max(timeout, 0.1))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                problem = f"broker ignored SIGTERM for {timeout:g}s: killed"
            else:
                if self.proc.returncode != 0:
                    problem = f"broker exited with {self.proc.returncode} on SIGTERM"
        if self.reader is not None:
            self.reader.join(timeout=2)
        return problem

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()


class MemorySampler:
    """Samples a process's VmRSS and VmHWM from /proc every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float, t0: float) -> None:
        self.pid = pid
        self.interval = interval
        self.t0 = t0
        self.peak_kb = 0
        self.last_kb = 0
        self.samples: list[tuple[float, float]] = []  # (seconds since t0, RSS MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def start(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        fields = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        rss = fields.get("VmRSS", 0)
        self.last_kb = rss
        self.peak_kb = max(self.peak_kb, rss, fields.get("VmHWM", 0))
        self.samples.append((round(time.monotonic() - self.t0, 2), round(rss / 1024, 1)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):  # pacing only
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sample()


# -- the run -------------------------------------------------------------------------------


class Soak:
    """One run: the broker, the workers, the checks, the report."""

    def __init__(self, args: argparse.Namespace, broker_args: list[str]) -> None:
        self.args = args
        self.broker_args = broker_args
        self.run_id = secrets.token_hex(3)
        self.streams = [f"soak-{self.run_id}-{n}" for n in range(args.streams)]
        self.t_start = time.monotonic()
        self.hard_deadline = self.t_start + args.seconds + args.grace
        self.work_deadline = self.hard_deadline - SHUTDOWN_RESERVE
        self.ctx: Any = mp.get_context(args.start_method)
        self.q: Any = None  # made with the workers (no semaphores to leak before)
        self.go: Any = None
        self.abort: Any = None
        self.procs: dict[tuple[str, int], Any] = {}
        self.crashed: set[tuple[str, int]] = set()  # reported an error or died
        self.broker: BrokerProcess | None = None
        self.sampler: MemorySampler | None = None
        self.failures: list[str] = []
        self.stash: list[dict[str, Any]] = []
        self.control = ""
        self.stream_info: dict[str, dict[str, Any]] = {}
        self.broker_stats: dict[str, Any] | None = None
        self.t_go = self.t_produced = self.t_consumed = 0.0
        self.created = self.streams_closed = False
        self.producer_reports: dict[tuple[str, int], Any] = {}
        self.subscriber_reports: dict[tuple[str, int], Any] = {}

    # -- supervision ---------------------------------------------------------------------

    def left(self, deadline: float | None = None) -> float:
        return (self.work_deadline if deadline is None else deadline) - time.monotonic()

    def watchdog(self) -> None:
        """Last resort, at the hard deadline plus a little: kill every child and exit 3."""
        print(
            f"soak: watchdog: still running {self.args.seconds + self.args.grace:g}s after"
            " the start; killing everything",
            file=sys.stderr,
            flush=True,
        )
        try:
            for proc in list(self.procs.values()):
                with contextlib.suppress(Exception):
                    proc.kill()
            if self.broker is not None:
                self.broker.kill()
        finally:
            os._exit(3)

    def spawn(self, kind: str, index: int, target: Any, *args: Any) -> None:
        proc = self.ctx.Process(
            target=target, args=(self.q, *args), name=f"{kind}-{index}", daemon=True
        )
        proc.start()
        self.procs[(kind, index)] = proc

    def collect(self, role: str, who: list[tuple[str, int]]) -> dict[tuple[str, int], Any]:
        """Reports of ``role`` from each of ``who`` until the work deadline.  A process
        that reports an error, dies or stays silent is a failure, and missing."""
        got: dict[tuple[str, int], Any] = {}
        waiting = set(who) - self.crashed

        def take(msg: dict[str, Any]) -> bool:
            key = (str(msg.get("kind") or msg.get("role")), int(msg.get("index", -1)))
            if msg.get("role") == "error":
                self.failures.append(f"{msg.get('who')} crashed: {msg.get('error')}")
                for k in self.procs:
                    if f"{k[0]} {k[1]}" == msg.get("who"):
                        self.crashed.add(k)
                        waiting.discard(k)
                return True
            if msg.get("role") == role and key in waiting:
                got[key] = msg
                waiting.discard(key)
                return True
            return False

        for msg in list(self.stash):
            if take(msg):
                self.stash.remove(msg)
        while waiting:
            left = self.left()
            if left <= 0:
                names = ", ".join(f"{k} {i}" for k, i in sorted(waiting))
                self.failures.append(f"timed out waiting for {role} reports from {names}")
                break
            try:
                msg = self.q.get(timeout=min(left, 0.5))
            except queue_mod.Empty:
                for key in list(waiting):
                    proc = self.procs.get(key)
                    if proc is not None and proc.exitcode is not None:
                        self.crashed.add(key)
                        self.failures.append(
                            f"{key[0]} {key[1]} exited with {proc.exitcode} before its {role}"
                            " report"
                        )
                        waiting.discard(key)
                continue
            if not take(msg):
                self.stash.append(msg)
        return got

    # -- phases --------------------------------------------------------------------------

    def run(self) -> int:
        timer = threading.Timer(self.hard_deadline + 2 - time.monotonic(), self.watchdog)
        timer.daemon = True
        timer.start()
        try:
            self.start_broker()
            self.create_streams()
            self.exercise()
        except Exception as exc:
            self.failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.shutdown()
        report = self.figures()
        self.print_report(report)
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(report, indent=2) + "\n")
        timer.cancel()
        return 0 if report["ok"] else 1

    def start_broker(self) -> None:
        if self.args.control:
            self.control = self.args.control
            pid = self.args.broker_pid
        else:
            self.broker = BrokerProcess.start(self.broker_args)
            self.control = self.broker.wait_started(min(BROKER_START, self.left()))[0]
            pid = self.broker.proc.pid
        if pid:
            interval = 0.25 if self.args.seconds < 60 else 1.0
            self.sampler = MemorySampler(pid, interval, self.t_start).start()

    def create_streams(self) -> None:
        from zevents import Admin

        with Admin(self.control, timeout=min(CLIENT_TIMEOUT, max(self.left(), 1))) as admin:
            for sid in self.streams:
                admin.create_stream(sid, buffer_size=self.args.buffer_size, policy=self.args.policy)
                self.created = True

    def exercise(self) -> None:
        a = self.args
        batch = 1 if a.policy == "drop" else a.batch
        per_producer_rate = a.rate / a.producers if a.rate > 0 else 0.0
        self.q = self.ctx.Queue()
        self.go = self.ctx.Event()
        self.abort = self.ctx.Event()
        for i in range(a.subscribers):
            self.spawn(
                "subscriber",
                i,
                subscriber_main,
                self.control,
                i,
                self.streams,
                a.producers,
                self.work_deadline,
            )
        for i in range(a.producers):
            self.spawn(
                "producer",
                i,
                producer_main,
                self.control,
                i,
                self.streams,
                a.seconds,
                per_producer_rate,
                batch,
                self.go,
                self.abort,
                self.work_deadline,
            )
        everyone = sorted(self.procs)
        ready = self.collect("ready", everyone)
        if len(ready) < len(everyone):
            raise RuntimeError("not every process got ready")
        self.t_go = time.monotonic()
        self.go.set()
        self.producer_reports = self.collect(
            "producer", [("producer", i) for i in range(a.producers)]
        )
        self.t_produced = time.monotonic()
        self.finish_streams()
        self.subscriber_reports = self.collect(
            "subscriber", [("subscriber", i) for i in range(a.subscribers)]
        )
        self.t_consumed = time.monotonic()

    def finish_streams(self) -> None:
        """Read each stream's counters, then close it so subscribers see the end."""
        from zevents import Admin

        timeout = min(CLIENT_TIMEOUT, max(self.left(), 1))
        with Admin(self.control, timeout=timeout) as admin:
            try:
                mine = set(self.streams)
                for info in admin.list_stream_info():
                    if info.stream in mine:
                        self.stream_info[info.stream] = {
                            "last_seq": info.last_seq,
                            "events_in": info.events_in,
                            "dropped": info.dropped,
                            "rejected": info.rejected,
                            "parked": info.parked,
                            "closed": info.closed,
                        }
            except Exception as exc:
                self.failures.append(f"admin: list_stream_info: {exc!r}")
            self.close_streams(admin)
            with contextlib.suppress(Exception):
                stats = admin.stats()
                self.broker_stats = dataclasses.asdict(stats)

    def join_all(self, procs: list[Any], until: float) -> list[Any]:
        """Wait until ``until`` for ``procs`` to exit; those still alive."""
        for proc in procs:
            proc.join(timeout=max(until - time.monotonic(), 0))
        return [proc for proc in procs if proc.exitcode is None]

    def close_streams(self, admin: Any) -> None:
        """Close every stream (a failure per stream that would not close)."""
        for sid in self.streams:
            try:
                admin.close_stream(sid)
            except Exception as exc:
                self.failures.append(f"admin: close {sid}: {exc!r}")
        self.streams_closed = True

    def shutdown(self) -> None:
        """Stop everything, within the hard deadline."""
        if self.go is not None and self.abort is not None:
            if not self.go.is_set():  # a producer still waiting to start gives up at once
                self.abort.set()
                self.go.set()
            if self.failures:  # a failed run: producers stop sending
                self.abort.set()
        if not self.streams_closed and self.control and self.created:
            # A failed run: still end the streams (subscribers finish, an external
            # broker is not left with open streams).
            from zevents import Admin

            with contextlib.suppress(Exception), Admin(self.control, timeout=2) as admin:
                self.close_streams(admin)
        # Workers end by themselves by the work deadline; then SIGTERM, then SIGKILL.
        alive = self.join_all(list(self.procs.values()), self.hard_deadline - BROKER_STOP - 3)
        for (kind, index), proc in self.procs.items():
            if proc in alive:
                self.failures.append(f"{kind} {index} did not exit: terminated")
                proc.terminate()
        killed = self.join_all(alive, time.monotonic() + 1)
        for proc in killed:
            proc.kill()
        self.join_all(killed, time.monotonic() + 1)
        for (kind, index), proc in self.procs.items():
            crashed = (kind, index) in self.crashed  # reported already
            if not crashed and proc.exitcode not in (None, 0, -signal.SIGTERM, -signal.SIGKILL):
                msg = f"{kind} {index} exited with {proc.exitcode}"
                if not any(msg in f for f in self.failures):
                    self.failures.append(msg)
        if self.sampler is not None:
            self.sampler.stop()
        if self.broker is not None:
            problem = self.broker.stop(min(BROKER_STOP, max(self.left(self.hard_deadline), 0.5)))
            if problem:
                self.failures.append(problem)
        if self.q is not None:
            with contextlib.suppress(Exception):
                self.q.close()
                self.q.join_thread()
        # Unlink the queue's and the event's semaphores now, not in interpreter teardown.
        self.q = self.go = self.abort = None
        self.procs.clear()

    # -- figures -------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        a = self.args
        m = len(self.streams)
        prods = self.producer_reports
        subs = self.subscriber_reports
        sent = [0] * m
        dropped_told = [0] * m
        send_seconds = 0.0
        for key in sorted(prods):
            p = prods[key]
            if p["error"]:
                self.failures.append(f"{p['who']}: {p['error']}")
            for j in range(m):
                sent[j] += p["sent"][j]
                dropped_told[j] += p["dropped"][j]
            send_seconds = max(send_seconds, p["t_sent"] - p["t0"])
        # What the broker says it dropped is the truth; the producers' count is a check.
        if len(self.stream_info) == m:
            dropped = [int(self.stream_info[sid]["dropped"]) for sid in self.streams]
            admitted = sum(int(self.stream_info[sid]["last_seq"]) for sid in self.streams)
        else:
            dropped = dropped_told
            admitted = None
        expected = [sent[j] - dropped[j] for j in range(m)]
        total_sent = sum(sent)
        if admitted is not None and admitted != sum(expected):
            self.failures.append(
                f"the broker admitted {admitted} events, producers sent {total_sent}"
                f" and it dropped {sum(dropped)}"
            )

        per_sub: list[dict[str, Any]] = []
        for key in sorted(subs):
            s = subs[key]
            loss = extra = 0
            for j in range(m):
                diff = expected[j] - s["unique"][j]
                if diff > 0:
                    loss += diff
                else:
                    extra -= diff
            seq_errors = s["seq_gaps"] + s["seq_back"]
            elapsed = s["t_last"] - self.t_go if s["t_last"] else 0.0
            delivered = sum(s["delivered"])
            entry = {
                "index": s["index"],
                "delivered": delivered,
                "events_per_s": round(delivered / elapsed) if elapsed > 0 else 0,
                "seconds": round(elapsed, 3),
                "loss": loss,
                "extra": extra,
                "duplicates": s["duplicates"],
                "out_of_order": s["out_of_order"],
                "seq_errors": seq_errors,
                "malformed": s["malformed"],
                "ended": s["ended"],
                "unfinished_streams": s["unfinished"],
            }
            per_sub.append(entry)
            who = s["who"]
            if s["error"]:
                self.failures.append(f"{who}: {s['error']}")
            if s["timed_out"]:
                self.failures.append(
                    f"{who} timed out with {s['unfinished']} of {m} streams unfinished"
                )
            for name in ("loss", "extra", "duplicates", "out_of_order", "seq_errors", "malformed"):
                if entry[name]:
                    self.failures.append(f"{who}: {name} {entry[name]}")
        if self.t_go and total_sent == 0:
            self.failures.append("nothing was sent")

        def total(name: str) -> int:
            return sum(int(e[name]) for e in per_sub)

        delivered_total = total("delivered")
        last = max((subs[k]["t_last"] for k in subs), default=0.0)
        span = last - self.t_go if last and self.t_go else 0.0
        peak = self.sampler.peak_kb / 1024 if self.sampler and self.sampler.peak_kb else None
        end_rss = self.sampler.last_kb / 1024 if self.sampler and self.sampler.last_kb else None
        return {
            "ok": not self.failures,
            "run": self.run_id,
            "config": {
                "producers": a.producers,
                "streams": a.streams,
                "subscribers": a.subscribers,
                "seconds": a.seconds,
                "rate": a.rate,
                "policy": a.policy,
                "buffer_size": a.buffer_size,
                "batch": 1 if a.policy == "drop" else a.batch,
                "broker_args": self.broker_args,
                "control": self.control,
                "external_broker": bool(a.control),
            },
            "sent": total_sent,
            "sent_per_s": round(total_sent / send_seconds) if send_seconds > 0 else 0,
            "send_seconds": round(send_seconds, 3),
            "admitted": admitted,
            "dropped": sum(dropped),
            "dropped_reported_to_producers": sum(dropped_told),
            "delivered": delivered_total,
            "delivered_per_s": round(delivered_total / span) if span > 0 else 0,
            "loss": total("loss"),
            "extra": total("extra"),
            "duplicates": total("duplicates"),
            "out_of_order": total("out_of_order"),
            "seq_errors": total("seq_errors"),
            "subscribers": per_sub,
            "broker": {
                "peak_rss_mb": None if peak is None else round(peak, 1),
                "end_rss_mb": None if end_rss is None else round(end_rss, 1),
                "rss_samples": self.sampler.samples if self.sampler else [],
                "stats": self.broker_stats,
                "log_problems": self.broker.problems if self.broker else [],
            },
            "wall_seconds": round(time.monotonic() - self.t_start, 3),
            "phases": {  # seconds: start-up, sending and flushing, draining after the close
                "startup": round(self.t_go - self.t_start, 3) if self.t_go else None,
                "produce": round(self.t_produced - self.t_go, 3) if self.t_produced else None,
                "drain": round(self.t_consumed - self.t_produced, 3) if self.t_consumed else None,
            },
            "failures": self.failures,
        }

    def print_report(self, r: dict[str, Any]) -> None:
        c = r["config"]
        rate = f"{c['rate']:g} events/s per stream" if c["rate"] else "full speed"
        subs = ", ".join(f"{s['events_per_s']}/s" for s in r["subscribers"]) or "-"
        peak = r["broker"]["peak_rss_mb"]
        end = r["broker"]["end_rss_mb"]
        rss = "n/a" if peak is None else f"peak {peak} MB, at the end {end} MB"
        phases = ", ".join(f"{k} {v:g} s" for k, v in r["phases"].items() if v is not None)
        lines = [
            f"soak {r['run']}: {c['producers']} producers x {c['streams']} streams x"
            f" {c['subscribers']} subscribers, {c['seconds']:g} s, {c['policy']}, {rate}",
            f"  sent          {r['sent']:>10}   {r['sent_per_s']}/s",
            f"  delivered     {r['delivered']:>10}   {r['delivered_per_s']}/s in all"
            f" (per subscriber: {subs})",
            f"  dropped       {r['dropped']:>10}   (broker; producers were told of"
            f" {r['dropped_reported_to_producers']})",
            f"  loss          {r['loss']:>10}",
            f"  duplicates    {r['duplicates']:>10}",
            f"  out of order  {r['out_of_order']:>10}   (seq errors {r['seq_errors']})",
            f"  broker RSS    {rss}",
            f"  wall time     {r['wall_seconds']:>10.1f} s" + (f"   ({phases})" if phases else ""),
        ]
        problems = r["broker"]["log_problems"]
        if problems:
            lines.append(f"  broker log    {len(problems)} warning/error line(s), first:")
            lines += [f"    {p}" for p in problems[:5]]
        if r["failures"]:
            lines.append("  FAILED:")
            lines += [f"    {f}" for f in r["failures"]]
            if self.broker is not None and self.broker.log_tail:
                lines.append("  broker log tail:")
                lines += [f"    {x}" for x in list(self.broker.log_tail)[-15:]]
        else:
            lines.append("  OK")
        print("\n".join(lines), flush=True)


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the broker's extra arguments (``--broker-arg`` and after ``--``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    after: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, after = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Broker flags that start with '-' go as --broker-arg=FLAG, or after '--'.",
    )
    ap.add_argument("-p", "--producers", type=int, default=2, help="producer processes")
    ap.add_argument("-m", "--streams", type=int, default=20, help="streams")
    ap.add_argument("-k", "--subscribers", type=int, default=2, help="subscriber processes")
    ap.add_argument("-s", "--seconds", type=float, default=10.0, help="seconds of sending")
    ap.add_argument(
        "--rate", type=float, default=0.0, help="events/s per stream, in all (0: full speed)"
    )
    ap.add_argument("--policy", choices=["block", "drop"], default="block")
    ap.add_argument("--buffer-size", type=int, default=None, help="per stream (broker default)")
    ap.add_argument(
        "--batch", type=int, default=16, help="events per send_many at full speed (BLOCK)"
    )
    ap.add_argument(
        "--broker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the broker, verbatim (repeatable)",
    )
    ap.add_argument("--control", default=None, help="use this running broker instead")
    ap.add_argument("--broker-pid", type=int, default=None, help="its pid, for RSS (--control)")
    ap.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds beyond --seconds for start-up, draining and shutdown (default 30)",
    )
    ap.add_argument("--start-method", choices=["spawn", "fork", "forkserver"], default="spawn")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the figures here")
    args = ap.parse_args(argv)
    for name in ("producers", "streams", "subscribers", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if args.rate < 0:
        ap.error("--rate must be >= 0")
    if args.grace < SHUTDOWN_RESERVE + 2:
        ap.error(f"--grace must be at least {SHUTDOWN_RESERVE + 2:g}")
    if args.buffer_size is not None and args.buffer_size < 1:
        ap.error("--buffer-size must be at least 1")
    extra = [*args.broker_arg, *after]
    if extra and args.control:
        ap.error("broker arguments make no sense with --control (an external broker)")
    return args, extra


def main(argv: Sequence[str] | None = None) -> int:
    args, broker_args = parse_args(argv)
    return Soak(args, broker_args).run()


if __name__ == "__main__":
    sys.exit(main())
