"""The ``zevents`` command line, end to end, through real subprocesses and real brokers.

Every subprocess call has a timeout; output that arrives while a command runs
(``tail``, ``broker``) is read by a thread into a list the test polls with a
deadline, so nothing here sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

import pytest

from zevents import (
    Admin,
    BrokerUnavailableError,
    Event,
    Producer,
    StreamNotFoundError,
    Subscriber,
)
from zevents.cli import SCRIPTED_ANSWER, scripted_events
from zevents.events import format_timestamp, parse_timestamp

ROOT = Path(__file__).resolve().parents[2]
ZEVENTS = [sys.executable, "-m", "zevents"]
LISTENING = re.compile(r"listening: control=(\S+) ingest=(\S+) publish=(\S+)")
LOOPBACK0 = "tcp://127.0.0.1:0"
JSON_KEYS = {"stream", "seq", "type", "data", "timestamp"}


# -- helpers -------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any ZEVENTS_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEVENTS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run ``zevents ARGS`` to completion (bounded by ``timeout``)."""
    return subprocess.run(
        [*ZEVENTS, *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=ROOT,
        timeout=timeout,
    )


class Lines:
    """Reads a text pipe line by line in a thread; the test waits on what has arrived."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            with self._lock:
                self.lines.append(line)

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    @property
    def text(self) -> str:
        return "".join(self.snapshot())

    def wait_for(self, pred: Callable[[list[str]], bool], timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.snapshot()
            if pred(lines):
                return lines
            if time.monotonic() > deadline:
                pytest.fail(f"output condition not met within {timeout}s; got:\n{''.join(lines)}")
            time.sleep(0.005)

    def join(self, timeout: float = 10) -> None:
        self._thread.join(timeout)


class Spawned:
    """A long-running ``zevents`` subprocess with its merged output read by a thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [*ZEVENTS, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env if env is not None else clean_env(),
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        self.out = Lines(self.proc.stdout)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.out.join()
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.out.join()
            self.proc.stdout.close()


class DaemonBroker(Spawned):
    """``zevents broker`` run by the test itself (to signal it or set its environment)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(["broker", *args], env)
        lines = self.out.wait_for(
            lambda ls: any("listening:" in line for line in ls) or self.proc.poll() is not None,
            timeout=30,
        )
        found = [m for line in lines if (m := LISTENING.search(line))]
        assert found, f"broker printed no endpoints:\n{''.join(lines)}"
        self.control, self.ingest, self.publish = found[0].groups()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Any]]:
    """``spawn(cls, args, env=None)``: a subprocess killed at teardown if still running."""
    started: list[Spawned] = []

    def make(cls: type[Spawned], args: list[str], env: dict[str, str] | None = None) -> Any:
        proc = cls(args, env)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


def read_events(control: str, stream: str, count: int, from_seq: int = 1) -> list[Event]:
    """``count`` events of ``stream`` from ``from_seq`` (each wait bounded)."""
    with Subscriber(control, timeout=5) as sub:
        following = sub.subscribe(stream, from_seq)
        return [_next(following) for _ in range(count)]


def _next(following: Any) -> Event:
    event = following.next_event(timeout=10)
    assert event is not None, "stream ended early"
    return event


def json_lines(stdout: str) -> list[dict[str, Any]]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    """A loopback TCP endpoint nothing listens on (the port is held, so none will)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


# -- send ----------------------------------------------------------------------------


def test_send_text_exits_0_and_the_events_are_there(broker, stream_id):
    res = run_cli(
        "send", stream_id, "--text", "Hello, ", "--text", "wörld ✓", "--broker", broker.control
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    events = read_events(broker.control, stream_id, 2)
    assert [(e.seq, str(e.type), e.data) for e in events] == [
        (1, "TextDelta", {"text": "Hello, "}),
        (2, "TextDelta", {"text": "wörld ✓"}),
    ]
    with Admin(broker.control) as admin:
        info = admin.stream_info(stream_id)
    assert info.last_seq == 2 and not info.closed  # exactly two, and send does not close


def test_send_json_lines_from_stdin_reports_bad_lines_and_sends_the_good_ones(broker, stream_id):
    given_ts = "2024-05-06T07:08:09.123456Z"
    stdin = "\n".join(
        [
            '{"type": "MessageStart", "data": {"message_id": "m1"}}',  # 1: no timestamp
            json.dumps({"type": "TextDelta", "data": {"text": "one"}, "timestamp": given_ts}),
            '{"type": "TextDelta", "data": {"text": ',  # 3: broken JSON
            '{"type": "TextDelta", "data": {"text": "two"}}',  # 4
            '{"type": "NoSuchType", "data": {}}',  # 5: unknown type
            "",  # 6: blank lines are skipped, not errors
            '{"type": "TextDelta", "data": {"text": 5}}',  # 7: invalid data
            '{"type": "MessageStop", "data": {"message_id": "m1", "stop_reason": "end_turn"}}',
        ]
    )
    before = datetime.now(timezone.utc)
    res = run_cli("send", stream_id, "--broker", broker.control, input=stdin + "\n")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    named = {int(n) for n in re.findall(r"\bline (\d+):", res.stderr)}
    assert named == {3, 5, 7}, res.stderr  # each bad line named, no good one
    assert "NoSuchType" in res.stderr  # and why

    events = read_events(broker.control, stream_id, 4)
    assert [(e.seq, str(e.type), e.data) for e in events] == [
        (1, "MessageStart", {"message_id": "m1"}),
        (2, "TextDelta", {"text": "one"}),
        (3, "TextDelta", {"text": "two"}),
        (4, "MessageStop", {"message_id": "m1", "stop_reason": "end_turn"}),
    ]
    assert events[1].timestamp == parse_timestamp(given_ts)  # a given timestamp is kept
    for e in (events[0], events[2], events[3]):  # a missing one is "now"
        assert before - timedelta(seconds=1) <= e.timestamp <= datetime.now(timezone.utc)
    with Admin(broker.control) as admin:
        assert admin.stream_info(stream_id).last_seq == 4


def test_send_all_good_lines_with_close_exits_0(broker, stream_id):
    stdin = "".join(Event.text_delta(t).to_json() + "\n" for t in ("a", "b", "c"))
    res = run_cli("send", stream_id, "--close", "--broker", broker.control, input=stdin)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    with Admin(broker.control) as admin:
        info = admin.stream_info(stream_id)
    assert (info.last_seq, info.closed) == (3, True)


def test_send_to_a_full_drop_stream_fails_clearly(make_broker, stream_id, wait_until):
    # The broker's --buffer-size and --policy make new streams DROP streams of two events.
    # Fed one line at a time, the drop is known before the last line is sent.
    b = make_broker("--buffer-size", "2", "--policy", "drop")
    proc = subprocess.Popen(
        [*ZEVENTS, "send", stream_id, "--broker", b.control],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdin is not None
        for text in "abc":
            proc.stdin.write(Event.text_delta(text).to_json() + "\n")
        proc.stdin.flush()
        with Admin(b.control) as admin:

            def dropped() -> int:
                try:
                    return admin.stream_info(stream_id).dropped
                except StreamNotFoundError:
                    return 0

            wait_until(lambda: dropped() == 1, timeout=10)
        _, err = proc.communicate(Event.text_delta("d").to_json() + "\n", timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode != 0  # not every event was taken
    assert "full" in err.lower() and stream_id in err and "Traceback" not in err, err
    with Admin(b.control) as admin:
        info = admin.stream_info(stream_id)
    assert (info.buffer_size, info.policy, info.last_seq) == (2, "drop", 2)

    # all at once: the drop is only known from the answers send waits for at the end
    other = f"{stream_id}-at-once"
    res = run_cli("send", other, "--text", "a", "--text", "b", "--text", "c", "--broker", b.control)
    assert res.returncode != 0
    assert "full" in res.stderr.lower() and "Traceback" not in res.stderr, res.stderr


# -- tail ----------------------------------------------------------------------------


def test_tail_json_follows_live_and_exits_when_the_stream_is_closed(broker, stream_id, spawn):
    sent = [
        Event.message_start("m7"),
        Event.thinking("hmm"),
        Event.text_delta("héllo ✓"),
        Event.usage(3, 4, 7),
        Event.message_stop("m7", "end_turn"),
    ]
    with Admin(broker.control) as admin:
        admin.create_stream(stream_id)
    with Producer(broker.control) as producer:
        producer.send(stream_id, sent[0])
        producer.flush(timeout=10)
        tail = spawn(Spawned, ["tail", stream_id, "--json", "--broker", broker.control])
        tail.out.wait_for(lambda ls: len(ls) >= 1)  # it is following
        producer.send_many(stream_id, sent[1:])  # these arrive live
        producer.flush(timeout=10)
    tail.out.wait_for(lambda ls: len(ls) >= len(sent))
    assert tail.proc.poll() is None, "tail must keep following an open stream"

    res = run_cli("close", stream_id, "--broker", broker.control)
    assert res.returncode == 0, res.stderr
    assert stream_id in res.stdout and "5" in res.stdout

    assert tail.wait(timeout=15) == 0, tail.out.text
    objs = json_lines(tail.out.text)
    assert all(set(o) == JSON_KEYS for o in objs), objs
    assert [o["seq"] for o in objs] == [1, 2, 3, 4, 5]
    assert {o["stream"] for o in objs} == {stream_id}
    assert [(o["type"], o["data"]) for o in objs] == [(str(e.type), e.data) for e in sent]
    for o, e in zip(objs, sent, strict=True):
        assert parse_timestamp(o["timestamp"]) == e.timestamp
        assert o["timestamp"] == format_timestamp(e.timestamp)


def test_tail_plain_prints_text_deltas_as_flowing_text(broker, stream_id):
    with Producer(broker.control) as producer:
        producer.send_many(
            stream_id,
            [
                Event.message_start("msg-42"),
                Event.content_start(0),
                Event.text_delta("Hel"),
                Event.text_delta("lo, "),
                Event.text_delta("world"),
                Event.content_end(0),
                Event.usage(11, 3, 14),
                Event.message_stop("msg-42", "end_turn"),
            ],
        )
        producer.flush(timeout=10)
    with Admin(broker.control) as admin:
        admin.close_stream(stream_id)
    res = run_cli("tail", stream_id, "--broker", broker.control)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "Hello, world" in out  # deltas joined, nothing between them
    assert "{" not in out  # not the JSON form
    lines = out.splitlines()
    text_line = next(line for line in lines if "Hello, world" in line)
    assert "msg-42" not in text_line  # other events get lines of their own
    assert any("msg-42" in line for line in lines[: lines.index(text_line)])
    after = "\n".join(lines[lines.index(text_line) + 1 :])
    assert "end_turn" in after and "14" in after


def test_tail_from_seq(broker, stream_id):
    with Producer(broker.control) as producer:
        producer.send_many(stream_id, [Event.text_delta(c) for c in "abcde"])
    with Admin(broker.control) as admin:
        admin.close_stream(stream_id)
    res = run_cli("tail", stream_id, "--from-seq", "3", "--json", "--broker", broker.control)
    assert res.returncode == 0, res.stderr
    objs = json_lines(res.stdout)
    assert [(o["seq"], o["data"]["text"]) for o in objs] == [(3, "c"), (4, "d"), (5, "e")]

    res = run_cli("tail", stream_id, "--from-seq", "4", "--broker", broker.control)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "de"


def test_tail_from_a_seq_no_longer_buffered_names_the_missing_range(broker, stream_id):
    with Admin(broker.control) as admin:
        admin.create_stream(stream_id, buffer_size=3)
    with Producer(broker.control) as producer, Subscriber(broker.control) as sub:
        following = sub.subscribe(stream_id)
        producer.send_many(stream_id, [Event.text_delta(str(i)) for i in range(10)])
        assert [_next(following).seq for _ in range(10)] == list(range(1, 11))
        producer.flush(timeout=10)  # all ten admitted: the first seven left the buffer
    with Admin(broker.control) as admin:
        assert admin.stream_info(stream_id).first_seq == 8
    res = run_cli(
        "tail", stream_id, "--from-seq", "2", "--broker", broker.control, "--timeout", "2"
    )
    assert res.returncode != 0
    assert "2..7" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_tail_of_an_unknown_stream_fails_clearly(broker, stream_id):
    res = run_cli("tail", stream_id, "--broker", broker.control)
    assert res.returncode != 0
    assert stream_id in res.stderr and "not found" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


# -- streams, stats, close -------------------------------------------------------------


def test_streams_table_and_json(broker, stream_id):
    open_id, closed_id = f"{stream_id}-open", f"{stream_id}-closed"
    with Producer(broker.control) as producer:
        producer.send_many(open_id, [Event.text_delta("x"), Event.text_delta("y")])
        producer.send(closed_id, Event.text_delta("z"))
    res = run_cli("close", closed_id, "--broker", broker.control)
    assert res.returncode == 0, res.stderr

    res = run_cli("streams", "--broker", broker.control)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:2] == ["STREAM", "POLICY"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert {"block", "2/100", "1..2", "open"} <= set(rows[open_id])
    assert {"block", "1/100", "1..1", "closed"} <= set(rows[closed_id])

    res = run_cli("streams", "--json", "--broker", broker.control)
    assert res.returncode == 0, res.stderr
    infos = {o["stream"]: o for o in json_lines(res.stdout)}
    assert (infos[open_id]["last_seq"], infos[open_id]["closed"]) == (2, False)
    assert (infos[closed_id]["last_seq"], infos[closed_id]["closed"]) == (1, True)
    assert infos[open_id]["buffer_size"] == 100 and infos[open_id]["policy"] == "block"


def test_stats_plain_and_json(make_broker, stream_id):
    b = make_broker()
    res = run_cli(
        "send", stream_id, "--text", "a", "--text", "b", "--text", "c", "--broker", b.control
    )
    assert res.returncode == 0, res.stderr

    res = run_cli("stats", "--broker", b.control)
    assert res.returncode == 0, res.stderr
    plain = dict(line.split(": ", 1) for line in res.stdout.splitlines() if line.strip())
    assert plain["streams"] == "1" and plain["open_streams"] == "1"
    assert plain["events_in"] == "3" and plain["dropped"] == "0"
    assert {"events_out", "rejected", "subscribers", "bad_input"} <= set(plain)

    res = run_cli("stats", "--json", "--broker", b.control)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    assert (stats["streams"], stats["events_in"], stats["dropped"]) == (1, 3, 0)
    assert isinstance(stats["bad_input"], dict)


def test_close_of_an_unknown_stream_fails_clearly(broker, stream_id):
    res = run_cli("close", stream_id, "--broker", broker.control)
    assert res.returncode != 0
    assert "not found" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_zevents_broker_env_var_stands_in_for_the_flag(broker, stream_id, dead_endpoint):
    env = clean_env(ZEVENTS_BROKER=broker.control)
    res = run_cli("send", stream_id, "--text", "via env", env=env)
    assert res.returncode == 0, res.stderr
    res = run_cli("streams", env=env)
    assert res.returncode == 0 and stream_id in res.stdout, res.stderr
    res = run_cli("stats", "--json", env=env)
    assert res.returncode == 0 and json.loads(res.stdout)["events_in"] >= 1, res.stderr
    res = run_cli("close", stream_id, env=env)
    assert res.returncode == 0, res.stderr
    res = run_cli("tail", stream_id, "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert [o["data"]["text"] for o in json_lines(res.stdout)] == ["via env"]
    # --broker wins over the environment
    res = run_cli("stats", "--broker", broker.control, env=clean_env(ZEVENTS_BROKER=dead_endpoint))
    assert res.returncode == 0, res.stderr


def test_unreachable_broker_gives_a_clear_message_and_non_zero_exit_quickly(dead_endpoint):
    commands = {
        "send": ["send", "s1", "--text", "x"],
        "send-stdin": ["send", "s1"],
        "tail": ["tail", "s1"],
        "tail-json": ["tail", "s1", "--json", "--from-seq", "1"],
        "streams": ["streams"],
        "stats": ["stats"],
        "close": ["close", "s1"],
        "demo": ["demo"],
    }
    start = time.monotonic()
    procs = {
        name: subprocess.Popen(
            [*ZEVENTS, *args, "--broker", dead_endpoint, "--timeout", "1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=ROOT,
        )
        for name, args in commands.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            stdin = Event.text_delta("x").to_json() + "\n" if name == "send-stdin" else ""
            _, err = proc.communicate(stdin, timeout=20)
            results[name] = (proc.returncode, err, time.monotonic() - start)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    for name, (rc, err, elapsed) in results.items():
        assert rc != 0, name
        assert dead_endpoint in err and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)  # one clear line
        # eight interpreters start at once on two cores: allow for that, but no hang
        assert elapsed < 10, (name, elapsed)


# -- demo ----------------------------------------------------------------------------


def test_demo_runs_its_own_broker_and_prints_the_scripted_answer():
    res = run_cli("demo", timeout=60)
    assert res.returncode == 0, res.stderr
    assert "".join(SCRIPTED_ANSWER) in res.stdout
    assert "end_turn" in res.stdout
    assert "Traceback" not in res.stderr


def test_demo_against_a_running_broker(make_broker):
    b = make_broker()
    res = run_cli("demo", env=clean_env(ZEVENTS_BROKER=b.control), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "".join(SCRIPTED_ANSWER) in res.stdout
    with Admin(b.control) as admin:
        infos = admin.list_stream_info()
    assert len(infos) == 1  # it used this broker, not one of its own
    assert infos[0].closed and infos[0].last_seq == len(list(scripted_events()))


# -- the broker daemon -----------------------------------------------------------------


def test_broker_help_lists_its_options():
    res = run_cli("broker", "--help")
    assert res.returncode == 0, res.stderr
    for option in (
        "--control",
        "--ingest",
        "--publish",
        "--buffer-size",
        "--policy",
        "--idle-timeout",
        "--log-level",
    ):
        assert option in res.stdout, option
    for var in ("ZEVENTS_CONTROL", "ZEVENTS_INGEST", "ZEVENTS_PUBLISH"):
        assert var in res.stdout, var

    script = Path(sys.executable).with_name("zevents")
    if script.exists():  # the console script the package installs
        res = subprocess.run(
            [str(script), "--help"], capture_output=True, text=True, timeout=30, env=clean_env()
        )
        assert res.returncode == 0, res.stderr
        for command in ("broker", "send", "tail", "streams", "stats", "close", "demo"):
            assert command in res.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_broker_stops_on_signal_and_followers_are_told(signum, spawn, stream_id, wait_until):
    b = spawn(DaemonBroker, ["--control", LOOPBACK0, "--ingest", LOOPBACK0, "--publish", LOOPBACK0])
    got: list[Event] = []
    outcome: list[object] = []

    def follow() -> None:
        try:
            with Subscriber(b.control, timeout=5) as sub:
                for event in sub.subscribe(stream_id, create=True):
                    got.append(event)
            outcome.append("ended")
        except Exception as exc:
            outcome.append(exc)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    with Admin(b.control) as admin:

        def subscribed() -> bool:  # the follower's cursor is registered
            try:
                return admin.stream_info(stream_id).subscribers == 1
            except StreamNotFoundError:
                return False

        wait_until(subscribed, timeout=10)
    with Producer(b.control) as producer:
        producer.send_many(stream_id, [Event.text_delta(str(i)) for i in range(3)])
        producer.flush(timeout=10)
        other = f"{stream_id}-tail"
        producer.send(other, Event.text_delta("t"))
        producer.flush(timeout=10)
    tail = spawn(Spawned, ["tail", other, "--json", "--broker", b.control])
    tail.out.wait_for(lambda ls: len(ls) >= 1)
    wait_until(lambda: len(got) >= 3, timeout=10)

    start = time.monotonic()
    b.proc.send_signal(signum)
    assert b.wait(timeout=10) == 0, b.out.text
    assert time.monotonic() - start < 5, "broker took too long to stop"
    assert "Traceback" not in b.out.text

    follower.join(timeout=10)
    assert not follower.is_alive(), "the follower's iteration did not end"
    assert outcome == ["ended"]
    assert [e.seq for e in got] == [1, 2, 3]
    assert tail.wait(timeout=10) == 0, tail.out.text
    assert [o["seq"] for o in json_lines(tail.out.text)] == [1]


def test_broker_takes_its_endpoints_from_the_environment(spawn, tmp_path, stream_id):
    env = clean_env(
        ZEVENTS_CONTROL=LOOPBACK0,
        ZEVENTS_INGEST=f"ipc://{tmp_path}/in.ipc",
        ZEVENTS_PUBLISH=LOOPBACK0,
    )
    b = spawn(DaemonBroker, ["--log-level", "info"], env)
    ports = [int(ep.rsplit(":", 1)[1]) for ep in (b.control, b.publish)]
    assert b.control.startswith("tcp://127.0.0.1:") and b.publish.startswith("tcp://127.0.0.1:")
    assert not {5555, 5556, 5557} & set(ports) and ports[0] != ports[1]
    assert b.ingest == f"ipc://{tmp_path}/in.ipc"
    with Admin(b.control) as admin:
        assert (admin.handshake.ingest, admin.handshake.publish) == (b.ingest, b.publish)
    res = run_cli("send", stream_id, "--text", "env", "--close", "--broker", b.control)
    assert res.returncode == 0, res.stderr
    res = run_cli("tail", stream_id, "--broker", b.control)
    assert (res.returncode, res.stdout) == (0, "env"), res.stderr


def test_broker_log_level_warning_hides_the_start_line(spawn, tmp_path):
    eps = {name: f"ipc://{tmp_path}/{name}.ipc" for name in ("control", "ingest", "publish")}
    args = ["broker", "--log-level", "warning"]
    for name, ep in eps.items():
        args += [f"--{name}", ep]
    proc = spawn(Spawned, args)
    with Admin(eps["control"], timeout=15) as admin:  # it is up: it answers
        assert admin.stats().streams == 0
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "listening" not in proc.out.text and "INFO" not in proc.out.text


def test_broker_idle_timeout_closes_idle_streams_and_ends_tail(make_broker, stream_id, spawn):
    b = make_broker("--idle-timeout", "1.5")
    res = run_cli("send", stream_id, "--text", "only", "--broker", b.control)
    assert res.returncode == 0, res.stderr
    tail = spawn(Spawned, ["tail", stream_id, "--json", "--broker", b.control])
    assert tail.wait(timeout=15) == 0, tail.out.text  # the broker closed the idle stream
    assert [o["data"]["text"] for o in json_lines(tail.out.text)] == ["only"]


def test_ipc_endpoints_work_for_send_and_tail(make_broker, tmp_path, stream_id, spawn):
    eps = {name: f"ipc://{tmp_path}/{name}.ipc" for name in ("control", "ingest", "publish")}
    b = make_broker(*[arg for name, ep in eps.items() for arg in (f"--{name}", ep)])
    assert (b.control, b.ingest, b.publish) == (eps["control"], eps["ingest"], eps["publish"])
    res = run_cli("send", stream_id, "--text", "over ", "--text", "ipc", "--broker", b.control)
    assert res.returncode == 0, res.stderr
    tail = spawn(Spawned, ["tail", stream_id, "--json", "--broker", b.control])
    tail.out.wait_for(lambda ls: len(ls) >= 2)
    res = run_cli("send", stream_id, "--text", "!", "--close", "--broker", b.control)
    assert res.returncode == 0, res.stderr
    assert tail.wait(timeout=15) == 0, tail.out.text
    objs = json_lines(tail.out.text)
    assert [(o["seq"], o["data"]["text"]) for o in objs] == [(1, "over "), (2, "ipc"), (3, "!")]
    with pytest.raises(BrokerUnavailableError):
        Admin(f"ipc://{tmp_path}/nothing-here.ipc", timeout=0.5)
