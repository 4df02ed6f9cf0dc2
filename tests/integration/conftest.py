"""Real broker processes for integration tests, started by pytest-xprocess.

Brokers bind port 0 on loopback and the fixture reads the ports they got
from their start-up log line, so tests never race each other for ports.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from xprocess import ProcessStarter

_LISTENING = re.compile(r"listening: control=(\S+) ingest=(\S+) publish=(\S+)")
_names = itertools.count()


@dataclass
class BrokerProcess:
    """A broker started by xprocess: its endpoints, its process, how to stop it."""

    name: str
    xprocess: Any
    args: list[str]
    control: str = ""
    ingest: str = ""
    publish: str = ""
    extra: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return int(self.xprocess.getinfo(self.name).pid)

    @property
    def log(self) -> str:
        return Path(str(self.xprocess.getinfo(self.name).logpath)).read_text(errors="replace")

    def start(self, args: list[str] | None = None) -> BrokerProcess:
        argv = args or self.args

        class Starter(ProcessStarter):  # type: ignore[misc]
            pattern = "listening: control="
            timeout = 30
            terminate_on_interrupt = True
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # noqa: RUF012

            @property
            def args(self) -> list[str]:  # type: ignore[override]
                return argv

        self.xprocess.ensure(self.name, Starter, restart=True)
        found = _LISTENING.findall(self.log)
        assert found, f"broker {self.name} printed no endpoints:\n{self.log}"
        self.control, self.ingest, self.publish = found[-1]
        return self

    def restart_same_ports(self) -> BrokerProcess:
        """Start again on the endpoints it had (after :meth:`kill`)."""
        args = [*self.args]
        for flag, ep in (
            ("--control", self.control),
            ("--ingest", self.ingest),
            ("--publish", self.publish),
        ):
            args[args.index(flag) + 1] = ep
        return self.start(args)

    def kill(self) -> None:
        """SIGKILL, as a crash would; returns once the process is gone."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)

    def terminate(self) -> None:
        self.xprocess.getinfo(self.name).terminate(timeout=10)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still alive after {timeout}s")


def broker_args(*extra: str) -> list[str]:
    loopback = "tcp://127.0.0.1:0"
    return [
        sys.executable,
        "-m",
        "zevents",
        "broker",
        "--control",
        loopback,
        "--ingest",
        loopback,
        "--publish",
        loopback,
        "--log-level",
        "info",
        *extra,
    ]


@pytest.fixture(scope="session")
def broker(xprocess: Any) -> Iterator[BrokerProcess]:
    """One broker shared by the session (tests use their own stream IDs)."""
    # The pid keeps concurrent pytest runs in one checkout off each other's brokers.
    name = f"zbroker-shared-{os.getpid()}"
    proc = BrokerProcess(name, xprocess, broker_args("--subscriber-timeout", "2"))
    proc.start()
    yield proc
    proc.terminate()


@pytest.fixture
def make_broker(xprocess: Any) -> Iterator[Callable[..., BrokerProcess]]:
    """``make_broker(*flags)``: a broker of this test's own, stopped afterwards."""
    started: list[BrokerProcess] = []

    def make(*extra: str) -> BrokerProcess:
        proc = BrokerProcess(f"zbroker-{os.getpid()}-{next(_names)}", xprocess, broker_args(*extra))
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.terminate()


@pytest.fixture
def stream_id(request: pytest.FixtureRequest) -> str:
    """A stream ID unique to this test."""
    return f"{request.node.name}-{next(_names)}"


@pytest.fixture
def zctx() -> Iterator[Any]:
    """A pyzmq context for raw sockets, destroyed (linger 0) after the test."""
    import zmq

    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)
