"""Shared helpers of scripts/bench.py: events, tallies, pacing, processes, memory.

Everything here is imported by the spawned worker processes too, so it stays
light (no zevents import at module level).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue as queue_mod
import signal
import socket
import subprocess
import time
import traceback
from array import array
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import msgpack

#: Topic prefix of the throwaway "probe" messages that prove a SUB socket's
#: subscription reached the publisher before a ceiling run starts.
PROBE_TOPIC = b"probe\x00"
#: The payload of a probe (msgpack nil: it decodes like an event would).
PROBE_PAYLOAD = b"\xc0"
#: End-of-run marker for the peers (Redis, NATS).
END = b"END"


# -- events ----------------------------------------------------------------------


def text(i: int) -> str:
    """A 16-character text delta that carries its producer-side index."""
    return f"{i:08d} tok tok"


def index_of(t: str) -> int:
    """The producer-side index :func:`text` put into a delta."""
    return int(t[:8])


_packer = msgpack.Packer(use_bin_type=True, datetime=True)


def encode_event(i: int, t_ns: int | None = None) -> bytes:
    """The same msgpack bytes ``Event.text_delta(text(i)).to_msgpack()`` writes.

    ``t_ns`` (a ``time.perf_counter_ns()`` send timestamp) is added to the data
    for latency runs, as an extra key, like zevents' latency runs do.
    """
    data: dict[str, Any] = {"text": text(i)}
    if t_ns is not None:
        data["t"] = t_ns
    return _packer.pack(
        {"type": "TextDelta", "data": data, "timestamp": datetime.now(timezone.utc)}
    )


class Tally:
    """Counts what a subscriber received, by producer-side index, per stream.

    ``unique`` indexes seen, ``dups`` seen again, ``bad`` out of range.  Loss
    is what the caller expected minus ``unique``.
    """

    __slots__ = ("bad", "dups", "n", "seen", "unique")

    def __init__(self, per_stream: int) -> None:
        self.n = per_stream
        self.seen: dict[Any, bytearray] = {}
        self.unique = 0
        self.dups = 0
        self.bad = 0

    def add(self, key: Any, idx: int) -> None:
        bm = self.seen.get(key)
        if bm is None:
            bm = self.seen[key] = bytearray(self.n)
        if 0 <= idx < self.n:
            if bm[idx]:
                self.dups += 1
            else:
                bm[idx] = 1
                self.unique += 1
        else:
            self.bad += 1


class Latencies:
    """Send timestamps and latencies (ns) of the events of a latency run."""

    def __init__(self) -> None:
        self.sent = array("q")
        self.lat = array("q")

    def add(self, t_send: int, t_recv: int) -> None:
        self.sent.append(t_send)
        self.lat.append(t_recv - t_send)

    def dump(self) -> dict[str, bytes]:
        return {"lat_sent": self.sent.tobytes(), "lat_ns": self.lat.tobytes()}


def percentile(sorted_values: list[int] | list[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of already sorted values (nearest rank)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[k])


# -- pacing ----------------------------------------------------------------------


def paced(rate: float, total: int, send: Callable[[int, int], None]) -> tuple[int, int]:
    """Call ``send(first, end)`` for events ``first..end-1`` as they fall due.

    Event ``k`` is due at ``start + k / rate``.  Waits longer than 60 µs sleep
    (sleep only paces; it never orders anything), shorter ones spin; whatever
    is due when the loop comes round goes in one call, so a late producer
    sends a burst instead of falling further behind.  Returns the start and
    end ``perf_counter_ns``.
    """
    t0 = time.perf_counter()
    start_ns = time.perf_counter_ns()
    sent = 0
    perf = time.perf_counter
    sleep = time.sleep
    while sent < total:
        now = perf()
        due = min(total, int((now - t0) * rate) + 1)
        if due > sent:
            send(sent, due)
            sent = due
            continue
        wait = t0 + sent / rate - now
        if wait > 60e-6:
            sleep(wait - 20e-6)
    return start_ns, time.perf_counter_ns()


# -- processes -------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (best effort)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(fn: Callable[..., None]) -> Callable[..., None]:
    """Wrap a worker entry point: die with the parent, report exceptions on the queue."""

    @functools.wraps(fn)
    def run(q: Any, *args: Any, **kwargs: Any) -> None:
        die_with_parent()
        try:
            fn(q, *args, **kwargs)
        except BaseException as exc:  # report, then exit non-zero
            with contextlib.suppress(Exception):
                q.put(
                    {"role": "error", "error": f"{fn.__name__}: {exc!r}\n{traceback.format_exc()}"}
                )
            raise

    return run


class BenchError(RuntimeError):
    """A run failed (a worker died, timed out, or reported an error)."""


class Run:
    """The processes of one run, stopped at the end whatever happens.

    Workers report dicts with a ``role`` on one queue; :meth:`expect` collects
    them, failing fast if a worker dies or reports an error.
    """

    def __init__(self, ctx: Any, timeout: float) -> None:
        self.ctx = ctx
        self.q = ctx.Queue()
        self.deadline = time.monotonic() + timeout
        self.procs: list[Any] = []
        self.popens: list[subprocess.Popen[bytes]] = []
        self._stash: list[dict[str, Any]] = []

    def spawn(self, target: Callable[..., None], *args: Any, name: str = "") -> Any:
        p = self.ctx.Process(target=target, args=(self.q, *args), daemon=True, name=name)
        p.start()
        self.procs.append(p)
        return p

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, preexec_fn=die_with_parent, **kwargs)
        self.popens.append(p)
        return p

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def expect(
        self, role: str, count: int = 1, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Wait for ``count`` reports of ``role`` (others are kept for later calls)."""
        limit = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        got = [m for m in self._stash if m.get("role") == role][:count]
        for m in got:
            self._stash.remove(m)
        while len(got) < count:
            left = limit - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out waiting for {count - len(got)} {role!r} report(s)")
            try:
                m = self.q.get(timeout=min(left, 0.5))
            except queue_mod.Empty:
                for p in self.procs:
                    if p.exitcode not in (None, 0):
                        self._drain_errors()
                        raise BenchError(f"worker {p.name} exited with {p.exitcode}") from None
                continue
            if m.get("role") == "error":
                raise BenchError(m["error"])
            if m.get("role") == role:
                got.append(m)
            else:
                self._stash.append(m)
        return got

    def _drain_errors(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                m = self.q.get(timeout=0.2)
                if m.get("role") == "error":
                    raise BenchError(m["error"])

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.popens:
            if p.poll() is None:
                p.terminate()
        end = time.monotonic() + 5
        for p in self.procs:
            p.join(max(0.1, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(2)
        for p in self.popens:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(2)
        with contextlib.suppress(Exception):
            self.q.close()
            self.q.join_thread()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- memory ----------------------------------------------------------------------


def rss_mb(pid: int) -> tuple[float, float]:
    """``(current RSS, peak RSS)`` of ``pid`` in MB (VmRSS and VmHWM; psutil if no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        import psutil

        info = psutil.Process(pid).memory_info()
        peak = getattr(info, "peak_wset", None) or info.rss
        return info.rss / 1e6, peak / 1e6
    except Exception:
        return float("nan"), float("nan")


def thread_cpu(pid: int | str = "self") -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid``, summed by thread name
    (``MainThread`` for the main thread, ``ZMQbg/IO/0`` for libzmq's I/O thread)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    main = str(os.getpid() if pid == "self" else pid)
    for tid in tids:
        try:
            with open(f"{base}/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = "MainThread" if tid == main else raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``pred`` until it holds (for servers we start: a port that answers)."""
    end = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if pred():
                return
        if time.monotonic() > end:
            raise BenchError(f"{what} not ready after {timeout:g}s")
        time.sleep(0.02)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` leaves the elapsed seconds in ``t[0]``."""
    out = [0.0]
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out[0] = time.perf_counter() - t0
