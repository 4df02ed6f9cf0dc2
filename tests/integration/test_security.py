"""Security end to end: CURVE encryption and authentication, the permission file,
the ``zevents keys`` / ``--curve-*`` command line, and the start-up warning.

Real broker processes (``make_broker``), keys generated into ``tmp_path``.
Raw sockets are pyzmq with linger 0, always closed; every wait has a deadline,
and "receives nothing" is always judged against a reference that does receive,
so no test sleeps to synchronise.  Waits for a refusal are bounded by a client
timeout of 1 s, and the refused clients of one test wait side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from _sdk_helpers import raw_socket, text_of, texts

from zevents import (
    Admin,
    AsyncAdmin,
    AsyncProducer,
    AsyncSubscriber,
    BrokerUnavailableError,
    ClientKeys,
    Event,
    PermissionDeniedError,
    Producer,
    Subscriber,
    generate_keys,
)
from zevents.protocol import frames

ROOT = Path(__file__).resolve().parents[2]
ZEVENTS = [sys.executable, "-m", "zevents"]
REFUSAL_TIMEOUT = 1.0  # client timeout where a refusal is expected
SLACK = 1.5  # what two busy cores may add to it


# -- keys and brokers ----------------------------------------------------------------


@dataclass
class Keyring:
    """A broker key pair, a directory of authorized client public keys, and each
    client's own key pair (kept apart, as a real deployment would)."""

    root: Path

    @property
    def broker_public(self) -> Path:
        return self.root / "broker" / "broker.key"

    @property
    def broker_secret(self) -> Path:
        return self.root / "broker" / "broker.key_secret"

    @property
    def clients(self) -> Path:
        return self.root / "authorized"

    def secret(self, name: str) -> Path:
        return self.root / "home" / name / f"{name}.key_secret"

    def client(self, name: str) -> ClientKeys:
        return ClientKeys.load(self.secret(name), self.broker_public)


AUTHORIZED = ("alice", "bob", "ops", "carol")


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    ring = Keyring(tmp_path / "keys")
    generate_keys(ring.root / "broker", "broker")
    ring.clients.mkdir(parents=True)
    for name in (*AUTHORIZED, "mallory"):
        public, _ = generate_keys(ring.root / "home" / name, name)
        if name != "mallory":  # mallory has a key pair, but the broker does not know it
            shutil.copy(public, ring.clients / public.name)
    return ring


def curve_broker(make_broker: Callable[..., Any], ring: Keyring, *extra: str) -> Any:
    return make_broker(
        "--curve-secret", str(ring.broker_secret), "--curve-clients", str(ring.clients), *extra
    )


PERMISSIONS = """\
[keys.alice]
produce = ["tenant-a/"]
subscribe = ["tenant-a/"]

[keys.bob]
produce = ["tenant-b/"]
subscribe = ["tenant-b/"]

[keys.ops]
admin = [""]

[keys.ghost]
subscribe = [""]
"""  # carol is authorized but named nowhere: she may connect and do nothing; ghost is
#     named but not authorized: she may not even connect


_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@contextmanager
def refused_socket(
    ctx: zmq.Context[Any], kind: int, endpoint: str, keys: ClientKeys | None = None
) -> Iterator[tuple[zmq.Socket[Any], Callable[[], None]]]:
    """A raw socket the broker should refuse, and a wait (5 s at most) for its
    first failed handshake: "it received nothing" means something only once the
    broker has said no to it."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        keys.apply(sock)
    monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)

    def wait_refused() -> None:
        assert monitor.poll(5000), f"no failed handshake on {endpoint} within 5s"

    sock.connect(endpoint)
    try:
        yield sock, wait_refused
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


def publish_until_seen(producer: Producer, sid: str, sock: zmq.Socket[Any]) -> list[bytes]:
    """Send ticks to ``sid`` until ``sock`` (subscribed to it) receives one: its
    subscription may take a moment to reach the broker."""

    def seen(got: list[bytes]) -> bool:
        if not got:
            producer.send(sid, Event.text_delta("tick"))
        return bool(got)

    got = collect_until(sock, seen)
    producer.flush(timeout=10)
    return got


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def recv_control(sock: zmq.Socket[Any], timeout: float) -> list[Any] | None:
    if not sock.poll(int(timeout * 1000)):
        return None
    return msgpack.unpackb(sock.recv(), raw=False)  # type: ignore[no-any-return]


def request(sock: zmq.Socket[Any], msg: list[Any], timeout: float = 5) -> list[Any]:
    """Send one command; its reply (other messages on the way are skipped)."""
    sock.send(pack(msg))
    deadline = time.monotonic() + timeout
    while True:
        reply = recv_control(sock, max(deadline - time.monotonic(), 0))
        assert reply is not None, f"no reply to {msg!r} within {timeout}s"
        if reply[0] in ("ok", "err") and reply[1] == msg[1]:
            return reply


def new_client_id() -> bytes:
    return b"\x01" + os.urandom(frames.CLIENT_ID_SIZE - 1)


def stream_ids(frames_in: list[bytes]) -> set[str]:
    return {frames.decode_publish(f)[0] for f in frames_in}


def collect_until(
    sock: zmq.Socket[Any], done: Callable[[list[bytes]], bool], timeout: float = 10
) -> list[bytes]:
    """Every frame ``sock`` receives until ``done(frames)`` (bounded by ``timeout``)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        left = deadline - time.monotonic()
        assert left > 0, f"condition not met within {timeout}s; got {got!r}"
        if sock.poll(int(min(left, 0.1) * 1000)):
            got.append(sock.recv())
    return got


def refusals(control: str, keys: ClientKeys) -> int:
    with Admin(control, keys=keys) as admin:
        return admin.stats().bad_input.get("auth", 0)


def side_by_side(*calls: Callable[[], Any]) -> list[tuple[Any, float]]:
    """Run ``calls`` in threads; each one's (result or exception, seconds it took)."""

    def timed(call: Callable[[], Any]) -> tuple[Any, float]:
        start = time.monotonic()
        try:
            result: Any = call()
        except Exception as exc:
            result = exc
        return result, time.monotonic() - start

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(timed, calls))


def connect_and_close(cls: type[Any], control: str, **kwargs: Any) -> Any:
    client = cls(control, **kwargs)
    client.close()
    return "connected"


# -- (1) an authorized key ------------------------------------------------------------


def test_an_authorized_key_produces_and_subscribes_end_to_end(make_broker, keyring, stream_id):
    b = curve_broker(make_broker, keyring)
    alice = keyring.client("alice")
    with Subscriber(b.control, keys=alice, timeout=5) as sub:
        following = sub.subscribe(stream_id, create=True)
        with Producer(b.control, keys=alice) as producer:
            producer.send_many(stream_id, texts(5, "x"))
            producer.flush(timeout=10)
            # a second key works side by side
            with Producer(b.control, keys=keyring.client("bob")) as other:
                other.send(stream_id, Event.text_delta("from bob"))
                other.flush(timeout=10)
        with Admin(b.control, keys=keyring.client("ops")) as admin:
            assert admin.handshake.publish == b.publish
            info = admin.close_stream(stream_id)
            stats = admin.stats()
        got = list(following)  # ends: the stream was closed
    assert text_of(got) == [*(f"x{i}" for i in range(5)), "from bob"]
    assert [e.seq for e in got] == list(range(1, 7))
    assert (info.last_seq, info.closed) == (6, True)
    assert stats.bad_input.get("auth", 0) == 0 and stats.events_in == 6
    assert "refused" not in b.log and "Traceback" not in b.log


async def test_the_asyncio_clients_take_keys_too(make_broker, keyring, stream_id):
    b = curve_broker(make_broker, keyring)
    alice = keyring.client("alice")
    async with (
        AsyncSubscriber(b.control, keys=alice, timeout=5) as sub,
        AsyncProducer(b.control, keys=alice) as producer,
    ):
        following = await sub.subscribe(stream_id, create=True)
        for event in texts(3, "a"):
            await producer.send(stream_id, event)
        await producer.flush(timeout=10)
        got = [await following.next_event(timeout=10) for _ in range(3)]
    assert text_of([e for e in got if e is not None]) == ["a0", "a1", "a2"]

    start = time.monotonic()
    with pytest.raises(PermissionDeniedError, match="refused"):
        async with AsyncAdmin(b.control, keys=keyring.client("mallory"), timeout=REFUSAL_TIMEOUT):
            pass
    assert time.monotonic() - start < REFUSAL_TIMEOUT + SLACK


# -- (2) a key the broker does not know -------------------------------------------------


def test_an_unknown_key_is_refused_quickly_and_gets_no_data(make_broker, keyring, zctx, stream_id):
    b = curve_broker(make_broker, keyring)
    alice, mallory = keyring.client("alice"), keyring.client("mallory")
    before = refusals(b.control, alice)

    # Every client refuses to start, with the reason, within its timeout.
    outcomes = side_by_side(
        *(
            lambda cls=cls: connect_and_close(cls, b.control, keys=mallory, timeout=REFUSAL_TIMEOUT)
            for cls in (Producer, Subscriber, Admin)
        )
    )
    for (result, took), cls in zip(outcomes, ("Producer", "Subscriber", "Admin"), strict=True):
        assert isinstance(result, PermissionDeniedError), (cls, result)
        assert "refused this client's CURVE key" in str(result) and b.control in str(result)
        assert took < REFUSAL_TIMEOUT + SLACK, (cls, took)

    # Raw sockets with that key get nothing and put nothing in.
    with (
        refused_socket(zctx, zmq.SUB, b.publish, keys=mallory) as (spy, spy_refused),
        refused_socket(zctx, zmq.PUSH, b.ingest, keys=mallory) as (push, push_refused),
        raw_socket(zctx, zmq.SUB, b.publish, keys=alice) as reference,
    ):
        spy.subscribe(b"")
        reference.subscribe(frames.topic(stream_id))
        intruder = f"{stream_id}-intruder"
        push.send(
            frames.encode_ingest(
                frames.topic(intruder), new_client_id(), 1, Event.text_delta("x").to_msgpack()
            ),
            zmq.NOBLOCK,
        )
        spy_refused()
        push_refused()
        with Producer(b.control, keys=alice) as producer:
            publish_until_seen(producer, stream_id, reference)
        assert spy.poll(200) == 0, "an unknown key received publish frames"
        with Admin(b.control, keys=alice) as admin:
            assert admin.list_streams() == [stream_id]

    # Counted and logged, but the log is rate-limited: one line for all of them.
    after = refusals(b.control, alice)
    assert after - before >= 5, (before, after)  # three clients and two raw sockets
    lines = [line for line in b.log.splitlines() if "refused a connection" in line]
    assert len(lines) == 1, lines
    assert "bad auth input" in lines[0] and "unknown key" in lines[0]
    assert mallory.public.decode() in lines[0]
    os.kill(b.pid, 0)  # still serving


# -- (3) a client without keys --------------------------------------------------------


def test_a_plain_client_gets_no_answer_from_a_curve_broker(make_broker, keyring, zctx, stream_id):
    b = curve_broker(make_broker, keyring)
    alice = keyring.client("alice")
    outcomes = side_by_side(
        *(
            lambda cls=cls: connect_and_close(cls, b.control, timeout=REFUSAL_TIMEOUT)
            for cls in (Producer, Subscriber, Admin)
        )
    )
    for result, took in outcomes:
        assert type(result) is BrokerUnavailableError, result
        assert took < REFUSAL_TIMEOUT + SLACK

    with (
        refused_socket(zctx, zmq.SUB, b.publish) as (spy, spy_refused),
        refused_socket(zctx, zmq.XSUB, b.publish) as (xspy, xspy_refused),
        refused_socket(zctx, zmq.DEALER, b.control) as (dealer, dealer_refused),
        refused_socket(zctx, zmq.PUSH, b.ingest) as (push, push_refused),
        raw_socket(zctx, zmq.SUB, b.publish, keys=alice) as reference,
    ):
        spy.subscribe(b"")
        xspy.send(b"\x01")  # everything, the XSUB way
        reference.subscribe(frames.topic(stream_id))
        push.send(
            frames.encode_ingest(
                frames.topic(f"{stream_id}-plain"),
                new_client_id(),
                1,
                Event.text_delta("x").to_msgpack(),
            ),
            zmq.NOBLOCK,
        )
        dealer.send(pack(["stats", 1, {}]), zmq.NOBLOCK)
        for refused in (spy_refused, xspy_refused, dealer_refused, push_refused):
            refused()
        with Producer(b.control, keys=alice) as producer:
            publish_until_seen(producer, stream_id, reference)
        assert spy.poll(200) == 0, "a plain SUB received publish frames"
        assert xspy.poll(0) == 0, "a plain XSUB received publish frames"
        assert dealer.poll(0) == 0, "a plain DEALER got an answer"
        with Admin(b.control, keys=alice) as admin:
            assert admin.list_streams() == [stream_id]


def test_a_client_with_keys_gets_no_answer_from_a_plain_broker(make_broker, keyring):
    b = make_broker()
    start = time.monotonic()
    with pytest.raises(BrokerUnavailableError):
        Admin(b.control, keys=keyring.client("alice"), timeout=REFUSAL_TIMEOUT)
    assert time.monotonic() - start < REFUSAL_TIMEOUT + SLACK


# -- (4) the permission file ----------------------------------------------------------


@pytest.fixture
def tenants(make_broker, keyring, tmp_path) -> Any:
    perms = tmp_path / "permissions.toml"
    perms.write_text(PERMISSIONS)
    return curve_broker(make_broker, keyring, "--permissions", str(perms))


def test_a_key_limited_to_its_tenant_cannot_touch_another(tenants, keyring, zctx, stream_id):
    b = tenants
    alice, bob = keyring.client("alice"), keyring.client("bob")
    a_sid, b_sid = f"tenant-a/{stream_id}", f"tenant-b/{stream_id}"

    with Producer(b.control, keys=bob) as producer:
        producer.send_many(b_sid, texts(3, "b"))
        producer.flush(timeout=10)

    # produce: refused, and the refusal is what flush raises
    with Producer(b.control, keys=alice) as producer:
        producer.send(b_sid, Event.text_delta("intruder"))
        with pytest.raises(PermissionDeniedError, match=b_sid):
            producer.flush(timeout=10)
        producer.send_many(a_sid, texts(2, "a"))  # her own tenant still works
        producer.flush(timeout=10)

    # subscribe, info, fetch: refused
    with Subscriber(b.control, keys=alice, timeout=5) as sub:
        with pytest.raises(PermissionDeniedError, match=b_sid):
            sub.subscribe(b_sid)
        with pytest.raises(PermissionDeniedError):
            sub.subscribe(f"tenant-b/{stream_id}-new", create=True)
        mine = sub.subscribe(a_sid)
        assert text_of([mine.next_event(timeout=10) for _ in range(2)]) == ["a0", "a1"]
    with Admin(b.control, keys=alice) as admin:
        with pytest.raises(PermissionDeniedError):
            admin.stream_info(b_sid)
        with pytest.raises(PermissionDeniedError):
            admin.close_stream(b_sid)
        with pytest.raises(PermissionDeniedError):
            admin.create_stream(f"tenant-b/{stream_id}-new")
        assert admin.stream_info(a_sid).last_seq == 2
    with raw_socket(zctx, zmq.DEALER, b.control, keys=alice, routing_id=new_client_id()) as d:
        reply = request(d, ["fetch", 1, {"stream": b_sid, "from_seq": 1}])
        assert reply[0] == "err" and reply[2] == "PERMISSION_DENIED", reply
        reply = request(d, ["fetch", 2, {"stream": a_sid, "from_seq": 1}])
        assert reply[0] == "ok" and reply[2]["count"] == 2, reply

    # bob can do all of it on his own tenant
    with Subscriber(b.control, keys=bob, timeout=5) as sub:
        following = sub.subscribe(b_sid)
        assert text_of([following.next_event(timeout=10) for _ in range(3)]) == ["b0", "b1", "b2"]
    with Admin(b.control, keys=bob) as admin:
        info = admin.stream_info(b_sid)
        assert (info.last_seq, info.rejected) == (3, 0)  # alice's event never got in
        with pytest.raises(PermissionDeniedError):
            admin.stream_info(a_sid)
    with raw_socket(zctx, zmq.DEALER, b.control, keys=bob, routing_id=new_client_id()) as d:
        reply = request(d, ["fetch", 1, {"stream": b_sid, "from_seq": 1}])
        assert reply[0] == "ok" and reply[2]["count"] == 3, reply

    with Admin(b.control, keys=keyring.client("ops")) as admin:
        stats = admin.stats()
    assert stats.limits.get("permissions", 0) >= 8, stats.limits
    assert "Traceback" not in b.log


def test_a_raw_subscription_gets_only_the_topics_its_key_may_read(
    tenants, keyring, zctx, stream_id
):
    b = tenants
    alice, bob = keyring.client("alice"), keyring.client("bob")
    a_sid, b_sid = f"tenant-a/{stream_id}", f"tenant-b/{stream_id}"
    with (
        raw_socket(zctx, zmq.SUB, b.publish, keys=alice) as sub,
        Producer(b.control, keys=alice) as alice_out,
        Producer(b.control, keys=bob) as bob_out,
    ):
        # straight to the publish socket, bypassing the subscribe command
        sub.subscribe(frames.topic(b_sid))
        sub.subscribe(b"")
        sub.subscribe(b"tenant-b/")
        sub.subscribe(frames.topic(a_sid))  # the one it may read, last

        # the broker takes one connection's subscriptions in order: once alice's
        # topic is in effect, every earlier one was decided
        got = publish_until_seen(alice_out, a_sid, sub)
        bob_out.send_many(b_sid, texts(20, "secret"))
        bob_out.flush(timeout=10)  # answered, so published before what comes next
        alice_out.send(a_sid, Event.text_delta("after"))
        alice_out.flush(timeout=10)
        got += collect_until(sub, lambda fs: any(b"after" in f for f in fs))
        assert stream_ids(got) == {a_sid}, [frames.decode_publish(f)[0] for f in got]
        assert not any(b"secret" in f for f in got)

    with Admin(b.control, keys=keyring.client("ops")) as admin:
        assert admin.stream_info(b_sid).last_seq == 20  # bob's events were published
        stats = admin.stats()
    # b_sid is a refusal by the permission file; "" and "tenant-b/" are no topics at all
    assert stats.limits.get("permissions", 0) >= 1
    assert stats.limits.get("permissions", 0) + stats.bad_input.get("publish", 0) >= 3


def test_admin_commands_need_admin_of_every_stream(tenants, keyring, stream_id):
    b = tenants
    with Producer(b.control, keys=keyring.client("alice")) as producer:
        producer.send(f"tenant-a/{stream_id}", Event.text_delta("x"))
        producer.flush(timeout=10)
    for name in ("alice", "bob", "carol"):
        with Admin(b.control, keys=keyring.client(name)) as admin:
            with pytest.raises(PermissionDeniedError):
                admin.stats()
            with pytest.raises(PermissionDeniedError):
                admin.cleanup_inactive(3600)
            assert admin.list_streams() == []  # listing shows only what the key administers
    with Admin(b.control, keys=keyring.client("ops")) as admin:
        assert admin.stats().streams == 1
        assert admin.cleanup_inactive(3600) == 0
        assert admin.list_streams() == [f"tenant-a/{stream_id}"]
        info = admin.close_stream(f"tenant-a/{stream_id}")  # admin of every stream
        assert info.closed


def test_a_key_named_nowhere_may_connect_but_do_nothing(tenants, keyring, stream_id):
    carol = keyring.client("carol")
    with Producer(tenants.control, keys=carol) as producer:  # the handshake is for everyone
        producer.send(f"tenant-a/{stream_id}", Event.text_delta("x"))
        with pytest.raises(PermissionDeniedError):
            producer.flush(timeout=10)
    with Subscriber(tenants.control, keys=carol) as sub, pytest.raises(PermissionDeniedError):
        sub.subscribe(f"tenant-a/{stream_id}", create=True)


def test_the_broker_warns_of_a_permission_for_a_key_it_does_not_accept(tenants):
    warnings = [line for line in tenants.log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings
    assert "'ghost'" in warnings[0] and "not an authorized client" in warnings[0]


def test_another_key_cannot_take_over_a_client_id(tenants, keyring, zctx, stream_id):
    b = tenants
    alice, bob = keyring.client("alice"), keyring.client("bob")
    b_sid = f"tenant-b/{stream_id}"
    victim = new_client_id()
    with (
        raw_socket(zctx, zmq.DEALER, b.control, keys=bob, routing_id=victim) as bob_ctl,
        raw_socket(zctx, zmq.PUSH, b.ingest, keys=bob) as bob_push,
    ):
        assert request(bob_ctl, ["hello", 1, {"version": frames.PROTOCOL_VERSION}])[0] == "ok"

        def send_event(pseq: int) -> None:
            raw = Event.text_delta(f"secret-{pseq}").to_msgpack()
            bob_push.send(frames.encode_ingest(frames.topic(b_sid), victim, pseq, raw))

        send_event(1)
        assert request(bob_ctl, ["sync", 2, {}])[0] == "ok"
        # alice connects with bob's client ID (which she somehow learnt)
        with (
            raw_socket(zctx, zmq.DEALER, b.control, keys=alice, routing_id=victim) as thief,
            Admin(b.control, keys=keyring.client("ops")) as admin,
        ):
            thief.send(pack(["hb", {}]))
            # With CURVE there is no ROUTER handover: her connection with bob's ID is
            # not taken (or, if it got in, the core's ownership check ignores it)...
            assert admin.stats().clients >= 1
            # ...and what the broker sends bob's client ID still reaches bob only.
            send_event(2)
            for_alice = recv_control(thief, 1.0)
            bob_ctl.send(pack(["sync", 3, {}]))
            bob_heard = list(iter(lambda: recv_control(bob_ctl, 1.0), None))
    assert for_alice is None, f"alice got bob's control traffic: {for_alice}"
    assert any(m[:2] == ["ok", 3] for m in bob_heard), bob_heard  # bob still served
    assert any(m[0] == "ack" and m[2] == [b_sid, 2] for m in bob_heard), bob_heard


# -- (5) the command line -------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEVENTS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Ran:
    rc: int
    out: str
    err: str


def run_cli_many(
    *commands: tuple[list[str], dict[str, str] | None], timeout: float = 30
) -> list[Ran]:
    """Run several ``zevents`` commands at once (each bounded by ``timeout``)."""
    procs = [
        subprocess.Popen(
            [*ZEVENTS, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env if env is not None else clean_env(),
            cwd=ROOT,
        )
        for args, env in commands
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(Ran(proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return results


def run_cli(*args: str, env: dict[str, str] | None = None) -> Ran:
    return run_cli_many((list(args), env))[0]


def test_keys_generate_writes_a_pair_and_never_overwrites(tmp_path):
    d = tmp_path / "new" / "dir"  # created if need be
    res = run_cli("keys", "generate", "alice", "--dir", str(d))
    assert res.rc == 0, res.err
    public, secret = d / "alice.key", d / "alice.key_secret"
    assert str(public) in res.out and str(secret) in res.out
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    keys = ClientKeys.load(secret, public)
    assert len(keys.public) == len(keys.secret) == 40
    assert keys.public == keys.server  # the public file is the secret file's public half
    before = (public.read_bytes(), secret.read_bytes())

    again, bad = run_cli_many(
        (["keys", "generate", "alice", "--dir", str(d)], None),
        (["keys", "generate", "../escape", "--dir", str(d)], None),
    )
    assert again.rc != 0 and "exists" in again.err and "Traceback" not in again.err, again.err
    assert len(again.err.strip().splitlines()) == 1, again.err
    assert (public.read_bytes(), secret.read_bytes()) == before
    assert bad.rc != 0 and "Traceback" not in bad.err, bad.err
    assert not (tmp_path / "new" / "escape.key").exists()


def test_cli_clients_work_against_a_curve_broker_with_keys(make_broker, keyring, stream_id):
    b = curve_broker(make_broker, keyring)
    flags = [
        "--broker",
        b.control,
        "--curve-key",
        str(keyring.secret("alice")),
        "--curve-server",
        str(keyring.broker_public),
    ]
    env = clean_env(
        ZEVENTS_BROKER=b.control,
        ZEVENTS_CURVE_KEY=str(keyring.secret("bob")),
        ZEVENTS_CURVE_SERVER=str(keyring.broker_public),
    )
    by_flag, by_env = f"{stream_id}-flags", f"{stream_id}-env"
    sent = run_cli_many(
        (["send", by_flag, "--text", "a", "--text", "b", "--close", *flags], None),
        (["send", by_env, "--text", "c", "--close"], env),
    )
    for res in sent:
        assert res.rc == 0, res.err
    tail_flags, tail_env, stats_flags, stats_env = run_cli_many(
        (["tail", by_flag, "--json", *flags], None),
        (["tail", by_env, "--json"], env),
        (["stats", "--json", *flags], None),
        (["stats", "--json"], env),
    )
    for res in (tail_flags, tail_env, stats_flags, stats_env):
        assert res.rc == 0, res.err
    assert [json.loads(line)["data"]["text"] for line in tail_flags.out.splitlines()] == ["a", "b"]
    assert [json.loads(line)["data"]["text"] for line in tail_env.out.splitlines()] == ["c"]
    assert json.loads(stats_flags.out)["events_in"] == 3
    assert json.loads(stats_env.out)["bad_input"].get("auth", 0) == 0


def test_cli_clients_without_good_keys_fail_clearly(make_broker, keyring, stream_id):
    b = curve_broker(make_broker, keyring)
    server = ["--curve-server", str(keyring.broker_public)]
    common = ["--broker", b.control, "--timeout", str(REFUSAL_TIMEOUT)]
    start = time.monotonic()
    plain_send, plain_tail, plain_stats, refused, half, half_env = run_cli_many(
        (["send", stream_id, "--text", "x", *common], None),
        (["tail", stream_id, *common], None),
        (["stats", *common], None),
        (["stats", *common, "--curve-key", str(keyring.secret("mallory")), *server], None),
        (["stats", *common, *server], None),  # a server key but no client key
        (["stats", *common], clean_env(ZEVENTS_CURVE_KEY=str(keyring.secret("alice")))),
    )
    took = time.monotonic() - start
    for res in (plain_send, plain_tail, plain_stats):
        assert res.rc != 0
        assert b.control in res.err and "did not answer" in res.err, res.err
    assert refused.rc != 0 and "refused this client's CURVE key" in refused.err, refused.err
    for res in (half, half_env):
        assert res.rc != 0 and "ZEVENTS_CURVE_KEY" in res.err, res.err
    for res in (plain_send, plain_tail, plain_stats, refused, half, half_env):
        assert "Traceback" not in res.err and len(res.err.strip().splitlines()) == 1, res.err
    assert took < 15, took  # six interpreters on two cores, each waiting 1 s at most
    with Admin(b.control, keys=keyring.client("alice")) as admin:
        assert admin.list_streams() == []


def test_broker_refuses_security_flags_that_do_not_go_together(keyring, tmp_path):
    perms = tmp_path / "permissions.toml"
    perms.write_text(PERMISSIONS)
    bad_perms = tmp_path / "bad.toml"
    bad_perms.write_text("[keys.alice]\nproduce = 'tenant-a/'\n")
    loopback = ["--control", "tcp://127.0.0.1:0", "--ingest", "tcp://127.0.0.1:0"]
    loopback += ["--publish", "tcp://127.0.0.1:0"]
    secret, clients = str(keyring.broker_secret), str(keyring.clients)
    empty = tmp_path / "no-keys-here"
    empty.mkdir()
    no_secret, no_clients, bad_file, public_as_secret, no_keys = run_cli_many(
        (["broker", *loopback, "--permissions", str(perms)], None),
        (["broker", *loopback, "--curve-secret", secret], None),
        (
            [
                "broker",
                *loopback,
                *("--curve-secret", secret, "--curve-clients", clients),
                *("--permissions", str(bad_perms)),
            ],
            None,
        ),
        (
            [
                "broker",
                *loopback,
                *("--curve-secret", str(keyring.broker_public), "--curve-clients", clients),
            ],
            None,
        ),
        (["broker", *loopback, "--curve-secret", secret, "--curve-clients", str(empty)], None),
        timeout=20,
    )
    assert no_secret.rc != 0 and "--curve-secret" in no_secret.err, no_secret.err
    assert no_clients.rc != 0 and "--curve-clients" in no_clients.err, no_clients.err
    assert bad_file.rc != 0 and str(bad_perms) in bad_file.err, bad_file.err
    assert public_as_secret.rc != 0 and "secret" in public_as_secret.err, public_as_secret.err
    assert no_keys.rc != 0 and str(empty) in no_keys.err, no_keys.err
    for res in (no_secret, no_clients, bad_file, public_as_secret, no_keys):
        assert "Traceback" not in res.err and "listening" not in res.err, res.err


# -- (6) the start-up warning ---------------------------------------------------------


def _can_bind_any() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
    except OSError:
        return False
    return True


ANY = pytest.mark.skipif(not _can_bind_any(), reason="cannot bind 0.0.0.0 on this machine")


@ANY
def test_broker_warns_when_it_listens_beyond_loopback_without_curve(make_broker, keyring):
    b = make_broker("--control", "tcp://0.0.0.0:0")  # only port 0, and stopped at once
    log = b.log
    b.terminate()
    assert b.control.startswith("tcp://0.0.0.0:")
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, log
    assert b.control in warnings[0] and "not loopback" in warnings[0]
    assert "--curve-secret" in warnings[0]

    c = curve_broker(make_broker, keyring, "--control", "tcp://0.0.0.0:0")
    log = c.log
    c.terminate()
    assert c.control.startswith("tcp://0.0.0.0:")
    assert "WARNING" not in log, log


def test_no_warning_on_loopback(make_broker):
    b = make_broker()
    assert "WARNING" not in b.log and "not loopback" not in b.log
