"""Tests for broker.auth (the permission file, the ZAP handler) and for how
BrokerCore applies permissions, driven in memory with a fake clock.

No sockets: ZAP requests are frame lists, and the core is fed bytes with the
``user`` (the key's name) the runner would read from each message's User-Id.
"""

from __future__ import annotations

import stat
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.utils.z85

from broker.auth import Grant, Permissions, PermissionsFileError, ZapHandler
from broker.config import BrokerConfig
from broker.core import _COMMAND_ACTIONS, BrokerCore
from zevents.errors import KeyFileError
from zevents.events import Event, EventType
from zevents.keys import ClientKeys, generate_keys, load_public_keys, load_secret_key
from zevents.protocol import frames
from zevents.protocol.records import BrokerStats

TS = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)

DOCUMENTED = """\
[keys.alice]
produce = ["tenant-a/"]          # send events, create, close, rebase
subscribe = ["tenant-a/"]        # subscribe, fetch (replay), unsubscribe, info

[keys.ops]
admin = [""]                     # every command on every stream, list, stats, cleanup

[default]                        # any other authorized key (optional; else: nothing)
subscribe = ["public/"]
"""


# -- Permissions.parse / load -----------------------------------------------------------


def test_parse_accepts_the_documented_format():
    p = Permissions.parse(DOCUMENTED)
    assert p.grants == {
        "alice": Grant(produce=("tenant-a/",), subscribe=("tenant-a/",)),
        "ops": Grant(admin=("",)),
    }
    assert p.default == Grant(subscribe=("public/",))


def test_parse_of_an_empty_file_allows_nothing():
    p = Permissions.parse("")
    assert p.grants == {} and p.default == Grant()
    for action in ("produce", "subscribe", "admin"):
        assert not p.allows("anyone", action, "s")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[users.alice]\nproduce = [''] \n", "unknown tables"),
        ("[keys.alice]\nproduce = ['']\n[extra]\n", "unknown tables"),
        ("[keys.alice]\nwrite = ['a/']\n", "unknown actions"),
        ("[default]\ndelete = ['']\n", "unknown actions"),
        ("[keys.alice]\nproduce = 'tenant-a/'\n", "must be a list"),
        ("[keys.alice]\nproduce = [1, 2]\n", "must be a list"),
        ("[keys.alice]\nsubscribe = true\n", "must be a list"),
        ("[keys.alice]\nadmin = { a = 1 }\n", "must be a list"),
        ("[keys]\nalice = 'everything'\n", "must be a table"),
        ("keys = 3\n", "must be a table"),
        ("default = ['']\n", "must be a table"),
        ("[[keys.alice]]\nproduce = ['']\n", "must be a table"),
        ("[keys.alice\nproduce = ['']\n", "not valid TOML"),
        ("[keys.alice]\nproduce = = ['']\n", "not valid TOML"),
        ("[keys.alice]\nproduce = ['a']\nproduce = ['b']\n", "not valid TOML"),
    ],
)
def test_parse_rejects_what_the_format_does_not_allow(text, why):
    with pytest.raises(PermissionsFileError) as info:
        Permissions.parse(text, "/etc/zevents/perms.toml")
    msg = str(info.value)
    assert msg.startswith("/etc/zevents/perms.toml: "), msg  # names the file
    assert why in msg, msg


def test_load_names_the_file_when_it_is_bad_or_missing(tmp_path: Path):
    good = tmp_path / "good.toml"
    good.write_text(DOCUMENTED)
    assert Permissions.load(str(good)).grants["alice"].produce == ("tenant-a/",)

    bad = tmp_path / "bad.toml"
    bad.write_text("[keys.alice]\nproduce = 'x'\n")
    with pytest.raises(PermissionsFileError, match=str(bad)):
        Permissions.load(str(bad))

    missing = tmp_path / "missing.toml"
    with pytest.raises(PermissionsFileError, match=r"missing\.toml"):
        Permissions.load(str(missing))

    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[keys]\n")
    with pytest.raises(PermissionsFileError, match=r"binary\.toml"):
        Permissions.load(str(binary))


# -- Permissions.allows / admin_everything ---------------------------------------------


def test_allows_is_a_plain_prefix_match_per_action():
    p = Permissions.parse(DOCUMENTED)
    assert p.allows("alice", "produce", "tenant-a/chat-1")
    assert p.allows("alice", "subscribe", "tenant-a/x/y")
    assert p.allows("alice", "produce", "tenant-a/")  # the prefix itself is a stream ID too
    assert not p.allows("alice", "produce", "tenant-b/chat-1")
    assert not p.allows("alice", "produce", "tenant-a")  # shorter than the prefix
    assert not p.allows("alice", "produce", "xtenant-a/1")  # a prefix, not a substring
    assert not p.allows("alice", "admin", "tenant-a/chat-1")  # nothing listed for admin


def test_the_empty_prefix_allows_every_stream_and_an_empty_list_none():
    p = Permissions.parse('[keys.k]\nproduce = [""]\nsubscribe = []\n')
    for sid in ("a", "tenant-b/x", "\u00e9\u00e8", "x" * 255):
        assert p.allows("k", "produce", sid)
        assert not p.allows("k", "subscribe", sid)
        assert not p.allows("k", "admin", sid)  # not listed: same as empty


def test_several_prefixes_any_one_will_do():
    p = Permissions.parse('[keys.k]\nsubscribe = ["a/", "b/"]\n')
    assert p.allows("k", "subscribe", "a/1") and p.allows("k", "subscribe", "b/1")
    assert not p.allows("k", "subscribe", "c/1")


def test_an_unlisted_key_gets_the_default_table_or_nothing():
    with_default = Permissions.parse(DOCUMENTED)
    assert with_default.allows("mallory", "subscribe", "public/news")
    assert not with_default.allows("mallory", "subscribe", "tenant-a/chat-1")
    assert not with_default.allows("mallory", "produce", "public/news")
    # a listed key does not get the default on top of its own grant
    assert not with_default.allows("alice", "subscribe", "public/news")

    without = Permissions.parse('[keys.alice]\nproduce = [""]\n')
    for action in ("produce", "subscribe", "admin"):
        assert not without.allows("mallory", action, "public/news")


def test_an_unauthenticated_connection_gets_nothing_even_with_a_default():
    p = Permissions.parse('[default]\nproduce = [""]\nsubscribe = [""]\nadmin = [""]\n')
    assert p.allows("anyone", "produce", "s")
    for action in ("produce", "subscribe", "admin"):
        assert not p.allows(None, action, "s")
    assert p.grant(None) == Grant()
    assert not p.admin_everything(None)


def test_admin_everything_needs_the_empty_admin_prefix():
    p = Permissions.parse(
        """
        [keys.root]
        admin = ["", "x/"]
        [keys.tenant_admin]
        admin = ["tenant-a/"]
        [keys.producer]
        produce = [""]
        subscribe = [""]
        """
    )
    assert p.admin_everything("root")
    assert not p.admin_everything("tenant_admin")
    assert not p.admin_everything("producer")
    assert not p.admin_everything("stranger")
    assert Permissions.parse('[default]\nadmin = [""]\n').admin_everything("stranger")


# -- ZapHandler ----------------------------------------------------------------------


def curve_key() -> tuple[bytes, bytes]:
    """A (Z85 public key, its 32 raw bytes) pair."""
    public, _ = zmq.curve_keypair()
    return public, zmq.utils.z85.decode(public)


def zap_request(
    mechanism: bytes, *credentials: bytes, request_id: bytes = b"req-7", version: bytes = b"1.0"
) -> list[bytes]:
    return [version, request_id, b"zevents", b"192.0.2.9", b"", mechanism, *credentials]


class Denials:
    def __init__(self) -> None:
        self.why: list[str] = []

    def __call__(self, why: str) -> None:
        self.why.append(why)


def test_zap_lets_an_authorized_key_in_with_its_name_as_user_id():
    alice, alice_raw = curve_key()
    denials = Denials()
    zap = ZapHandler({alice: "alice"}, denials)
    reply = zap.handle(zap_request(b"CURVE", alice_raw, request_id=b"\x00\x01id"))
    assert reply == [b"1.0", b"\x00\x01id", b"200", b"OK", b"alice", b""]
    assert zap.denied == 0 and denials.why == []


def test_zap_refuses_an_unknown_key_and_says_why():
    alice, _ = curve_key()
    mallory, mallory_raw = curve_key()
    denials = Denials()
    zap = ZapHandler({alice: "alice"}, denials)
    reply = zap.handle(zap_request(b"CURVE", mallory_raw, request_id=b"r1"))
    assert reply[:3] == [b"1.0", b"r1", b"400"] and len(reply) == 6
    assert reply[4] == b""  # no user ID for a refused key
    assert zap.denied == 1
    assert len(denials.why) == 1
    assert "192.0.2.9" in denials.why[0] and mallory.decode() in denials.why[0]
    zap.handle(zap_request(b"CURVE", mallory_raw, request_id=b"r2"))
    assert zap.denied == 2 and len(denials.why) == 2


def test_zap_without_a_denial_callback_still_counts():
    _, raw = curve_key()
    zap = ZapHandler({})
    assert zap.handle(zap_request(b"CURVE", raw))[2] == b"400"
    assert zap.denied == 1


@pytest.mark.parametrize(
    "request_frames",
    [
        zap_request(b"NULL"),
        zap_request(b"PLAIN", b"alice", b"secret"),
        zap_request(b"GSSAPI", b"principal"),
        zap_request(b"CURVE"),  # no key frame
        zap_request(b"CURVE", b"k" * 31),  # a key one byte short
        zap_request(b"CURVE", b"k" * 33),
        zap_request(b"CURVE", b"k" * 32, b"extra frame"),
        zap_request(b"curve", b"k" * 32),
    ],
    ids=["NULL", "PLAIN", "GSSAPI", "no-key", "short-key", "long-key", "extra-frame", "lowercase"],
)
def test_zap_refuses_anything_but_a_well_formed_curve_request(request_frames):
    alice, _ = curve_key()
    # even if the bytes happen to be an authorized key's, these are refused
    keys = {alice: "alice", zmq.utils.z85.encode(b"k" * 32): "k"}
    denials = Denials()
    zap = ZapHandler(keys, denials)
    reply = zap.handle(request_frames)
    assert reply[:3] == [b"1.0", b"req-7", b"400"], reply
    assert len(reply) == 6 and reply[4] == b""
    assert zap.denied == 1 and len(denials.why) == 1


@pytest.mark.parametrize(
    ("request_frames", "echo"),
    [
        ([], b""),
        ([b"1.0"], b""),
        ([b"1.0", b"rid-short"], b"rid-short"),
        ([b"1.0", b"rid-5", b"zevents", b"127.0.0.1", b""], b"rid-5"),
        (zap_request(b"CURVE", b"k" * 32, request_id=b"rid-v", version=b"2.0"), b"rid-v"),
        (zap_request(b"CURVE", b"k" * 32, request_id=b"rid-e", version=b""), b"rid-e"),
    ],
    ids=["empty", "version-only", "two-frames", "five-frames", "version-2.0", "no-version"],
)
def test_zap_answers_malformed_requests_with_500_echoing_the_request_id(request_frames, echo):
    # A REP socket must answer every request, or it would stop serving.
    zap = ZapHandler({zmq.utils.z85.encode(b"k" * 32): "k"})
    reply = zap.handle(request_frames)
    assert len(reply) == 6, reply
    assert reply[0] == b"1.0" and reply[1] == echo and reply[2] == b"500", reply
    assert reply[3] and reply[4] == b""  # a reason, no user


def test_zap_knows_the_keys_of_a_clients_directory_by_file_name(tmp_path: Path):
    clients = tmp_path / "clients"
    for name in ("alice", "bob"):
        public, _ = generate_keys(tmp_path / "home", name)
        clients.mkdir(exist_ok=True)
        (clients / public.name).write_bytes(public.read_bytes())
    (clients / "README").write_text("not a key")  # ignored: only *.key files count
    keys = load_public_keys(clients)
    assert sorted(keys.values()) == ["alice", "bob"]
    alice_public, _ = load_secret_key(tmp_path / "home" / "alice.key_secret")
    zap = ZapHandler(keys)
    reply = zap.handle(zap_request(b"CURVE", zmq.utils.z85.decode(alice_public)))
    assert reply[2:5] == [b"200", b"OK", b"alice"]
    assert load_public_keys(clients / "bob.key") == {
        k: v for k, v in keys.items() if v == "bob"
    }  # one file will do too


def test_key_files_that_cannot_serve_are_refused(tmp_path: Path):
    public, secret = generate_keys(tmp_path, "alice")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(KeyFileError, match="exists"):
        generate_keys(tmp_path, "alice")
    for bad_name in ("", "../x", ".hidden"):
        with pytest.raises(KeyFileError):
            generate_keys(tmp_path, bad_name)
    with pytest.raises(KeyFileError, match="secret"):
        load_secret_key(public)  # the public half has no secret key
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError, match="no"):
        load_public_keys(tmp_path / "empty")
    junk = tmp_path / "junk.key"
    junk.write_text("this is no certificate\n")
    with pytest.raises(KeyFileError, match=r"junk\.key"):
        load_public_keys(junk)
    with pytest.raises(KeyFileError, match="missing"):
        ClientKeys.load(tmp_path / "missing.key_secret", public)


def test_client_keys_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _, secret = generate_keys(tmp_path, "alice")
    server, _ = generate_keys(tmp_path, "broker")
    monkeypatch.delenv("ZEVENTS_CURVE_KEY", raising=False)
    monkeypatch.delenv("ZEVENTS_CURVE_SERVER", raising=False)
    assert ClientKeys.from_env() is None
    monkeypatch.setenv("ZEVENTS_CURVE_KEY", str(secret))
    with pytest.raises(KeyFileError, match="both"):
        ClientKeys.from_env()
    monkeypatch.setenv("ZEVENTS_CURVE_SERVER", str(server))
    keys = ClientKeys.from_env()
    assert keys == ClientKeys.load(secret, server)
    assert keys is not None and keys.server == load_public_keys(server).popitem()[0]
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        keys.apply(sock)
        mechanism = sock.getsockopt(zmq.MECHANISM)
        server_role = sock.getsockopt(zmq.CURVE_SERVER)
    finally:
        ctx.destroy(linger=0)
    assert server_role == 0  # a client of the broker
    assert mechanism == zmq.CURVE


# -- BrokerCore with permissions ----------------------------------------------------------


PERMS = """\
[keys.alice]
produce = ["tenant-a/"]
subscribe = ["tenant-a/"]

[keys.bob]
produce = ["tenant-b/"]
subscribe = ["tenant-b/"]

[keys.ops]
admin = [""]

[keys.tadmin]
admin = ["tenant-a/"]

[keys.writer]
produce = ["t/"]

[keys.reader]
subscribe = ["t/"]

[keys.manager]
admin = ["t/"]

[keys.nobody]
"""

P = b"P" * 16  # alice's producer
Q = b"Q" * 16  # bob's producer
S = b"S" * 16
A = b"A" * 16  # an admin (ops)


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ev(i: int) -> bytes:
    return Event(EventType.TEXT_DELTA, {"text": f"t{i}"}, TS).to_msgpack()


class Core:
    """A BrokerCore with a permission file, plus helpers that pass the key's name."""

    def __init__(self, perms: str | None = PERMS, **config: Any) -> None:
        config.setdefault("buffer_size", 100)
        config.setdefault("ack_delay", 0.0)
        self.clock = FakeClock(time.monotonic())
        self.core = BrokerCore(
            BrokerConfig(**config),
            {"control": "tcp://h:1", "ingest": "tcp://h:2", "publish": "tcp://h:3"},
            clock=self.clock,
            permissions=None if perms is None else Permissions.parse(perms),
        )
        self._req = 0

    def flush(self) -> tuple[list[bytes], list[tuple[bytes, list[Any]]]]:
        pub, ctl = self.core.flush()
        return pub, [(c, frames.decode_control(f)) for c, f in ctl]

    def ingest(
        self, user: str | None, sid: str, pseq: int, events: list[bytes], client: bytes = P
    ) -> None:
        frame = frames.encode_ingest(frames.topic(sid), client, pseq, b"".join(events))
        self.core.on_ingest(frame, user)

    def request(
        self, user: str | None, client: bytes, op: str, args: dict[str, Any] | None = None
    ) -> int:
        self._req += 1
        frame = frames.encode_control(op, self._req, {} if args is None else args)
        self.core.on_control(client, frame, user)
        return self._req

    def call(
        self, user: str | None, client: bytes, op: str, args: dict[str, Any] | None = None
    ) -> list[Any]:
        rid = self.request(user, client, op, args)
        _, ctl = self.flush()
        replies = [m for c, m in ctl if c == client and m[0] in ("ok", "err") and m[1] == rid]
        assert len(replies) == 1, ctl
        return replies[0]

    def ok(self, user: str | None, client: bytes, op: str, args: dict[str, Any] | None = None):
        reply = self.call(user, client, op, args)
        assert reply[0] == "ok", reply
        return reply[2]

    def denied(self, user: str | None, client: bytes, op: str, args: dict[str, Any] | None = None):
        reply = self.call(user, client, op, args)
        assert reply[0] == "err" and reply[2] == "PERMISSION_DENIED", reply
        return reply

    def stats(self) -> BrokerStats:
        return self.core.stats()  # directly: the stats command itself needs admin


def permission_refusals(c: Core) -> int:
    return c.stats().limits.get("permissions", 0)


def test_ingest_without_produce_permission_is_nacked_and_admits_nothing():
    c = Core()
    c.ingest("alice", "tenant-b/x", 1, [ev(1), ev(2), ev(3)])
    pub, ctl = c.flush()
    assert pub == []
    assert [m[:6] for _, m in ctl] == [
        ["nack", "tenant-b/x", 1, 3, "PERMISSION_DENIED", ctl[0][1][5]]
    ]
    assert ctl[0][0] == P
    assert "tenant-b/x" in ctl[0][1][5]
    assert "tenant-b/x" not in c.core.streams  # nothing created
    s = c.stats()
    assert (s.streams, s.events_in) == (0, 0)
    assert s.limits == {"permissions": 1}

    # the same producer may still send where it may
    c.ingest("alice", "tenant-a/x", 1, [ev(1)])
    pub, ctl = c.flush()
    assert [frames.decode_publish(f)[0] for f in pub] == ["tenant-a/x"]
    assert [m[0] for _, m in ctl] == ["ack"]
    assert permission_refusals(c) == 1


def test_ingest_to_an_existing_stream_of_another_tenant_is_refused():
    c = Core()
    c.ingest("bob", "tenant-b/x", 1, [ev(1)], client=Q)
    c.flush()
    c.ingest("alice", "tenant-b/x", 1, [ev(2), ev(3)], client=P)
    pub, ctl = c.flush()
    assert pub == []
    assert [(cl, m[0], m[2], m[3], m[4]) for cl, m in ctl] == [
        (P, "nack", 1, 2, "PERMISSION_DENIED")
    ]
    assert c.core.streams.find("tenant-b/x").last_seq == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("user", [None, "nobody", "reader", "manager", "ops", "stranger"])
def test_only_produce_lets_a_key_send_events(user):
    c = Core()
    c.ingest(user, "t/x", 1, [ev(1)], client=S)
    pub, ctl = c.flush()
    assert pub == []
    assert [(m[0], m[4]) for _, m in ctl] == [("nack", "PERMISSION_DENIED")]
    assert len(c.core.streams) == 0


def test_ingest_without_a_permission_file_ignores_the_user():
    c = Core(perms=None)
    c.ingest("whoever", "any/x", 1, [ev(1)])
    pub, ctl = c.flush()
    assert len(pub) == 1 and [m[0] for _, m in ctl] == ["ack"]


# Every command that names a stream, and the actions that let a key run it (the
# module docstring of broker.auth: produce "send events, create, close, rebase";
# subscribe "subscribe, fetch (replay), unsubscribe, info"; admin manages streams).
KEYS_FOR_ACTIONS = {"writer": "produce", "reader": "subscribe", "manager": "admin"}
MAY_RUN = {
    "create": {"produce", "admin"},
    "get_or_create": {"produce", "admin"},
    "close": {"produce", "admin"},
    "rebase": {"produce"},
    "info": {"produce", "subscribe", "admin"},
    "subscribe": {"subscribe"},
    "fetch": {"subscribe"},
    "unsubscribe": {"subscribe"},
}


def command_args(op: str, sid: str) -> dict[str, Any]:
    return {
        "create": {"stream": sid},
        "get_or_create": {"stream": sid},
        "close": {"stream": sid},
        "rebase": {"stream": sid, "pseq": 1},
        "info": {"stream": sid},
        "subscribe": {"stream": sid, "from_seq": None, "token": b"tok"},
        "fetch": {"stream": sid, "from_seq": 1},
        "unsubscribe": {"stream": sid},
    }[op]


def test_the_command_table_covers_every_stream_command():
    assert set(_COMMAND_ACTIONS) == set(MAY_RUN)


@pytest.mark.parametrize("op", sorted(MAY_RUN))
@pytest.mark.parametrize("user", ["writer", "reader", "manager", "nobody", "stranger", None])
def test_stream_commands_need_one_of_their_actions(op, user):
    c = Core()
    c.ingest("writer", "t/s", 1, [ev(1)], client=Q)
    c.ingest("writer", "u/s", 1, [ev(1)], client=Q)
    c.flush()
    c.core.on_subscription(b"\x01\x00tok", user)  # the marker of the subscribe below
    allowed = user in KEYS_FOR_ACTIONS and KEYS_FOR_ACTIONS[user] in MAY_RUN[op]
    before = permission_refusals(c)

    reply = c.call(user, S, op, command_args(op, "t/s"))
    if allowed:
        assert reply[0] == "ok" or reply[2] != "PERMISSION_DENIED", reply
        assert permission_refusals(c) == before
    else:
        assert reply[0] == "err" and reply[2] == "PERMISSION_DENIED", reply
        assert "t/s" in reply[3]
        assert permission_refusals(c) == before + 1
    # outside the key's prefixes nobody may
    reply = c.call(user, S, op, command_args(op, "u/s"))
    assert reply[0] == "err" and reply[2] == "PERMISSION_DENIED", reply


@pytest.mark.parametrize("op", sorted(MAY_RUN))
@pytest.mark.parametrize("stream", [5, None, b"t/s", ["t/s"], "missing"])
def test_a_bad_stream_argument_gets_its_usual_error_not_a_refusal(op, stream):
    c = Core('[keys.k]\nproduce = [""]\nsubscribe = [""]\nadmin = [""]\n')
    args = {**command_args(op, "t/s")}
    if stream == "missing":
        del args["stream"]
    else:
        args["stream"] = stream
    reply = c.call("k", S, op, args)
    assert reply[0] == "err" and reply[2] == "INVALID_STREAM_ID", reply
    # and for a key that may do nothing, the broker does not trip over it either
    reply = c.call("nobody", b"N" * 16, op, args)
    assert reply[0] == "err" and reply[2] in ("INVALID_STREAM_ID", "PERMISSION_DENIED"), reply


def test_a_refused_command_changes_nothing():
    c = Core()
    c.ingest("alice", "tenant-a/x", 1, [ev(1)])
    c.flush()
    c.denied("bob", Q, "close", {"stream": "tenant-a/x"})
    c.denied("bob", Q, "create", {"stream": "tenant-a/new"})
    c.denied("bob", Q, "get_or_create", {"stream": "tenant-a/new2"})
    c.denied("bob", Q, "rebase", {"stream": "tenant-a/x", "pseq": 50})
    c.core.on_subscription(b"\x01\x00tok-b", "bob")
    c.denied("bob", Q, "subscribe", {"stream": "tenant-a/y", "token": b"tok-b", "create": True})
    stream = c.core.streams.find("tenant-a/x")
    assert stream is not None and not stream.closed
    assert Q not in stream.producers and not stream.cursors
    assert sorted(sid for sid, _ in c.core.streams) == ["tenant-a/x"]
    assert permission_refusals(c) == 5


def test_sessionwide_commands_need_no_permission():
    c = Core()
    for user in ("nobody", "stranger"):
        client = b"N" * 15 + user[:1].encode()
        hello = c.ok(user, client, "hello", {"version": frames.PROTOCOL_VERSION})
        assert hello["control"] == "tcp://h:1"
        assert c.ok(user, client, "sync") == {}
        assert c.ok(user, client, "bye") == {}
    assert permission_refusals(c) == 0


def test_list_shows_only_streams_under_the_keys_admin_prefixes():
    c = Core()
    for sid in ("tenant-a/1", "tenant-a/2", "tenant-b/1", "t/1"):
        c.ok("ops", A, "create", {"stream": sid})
    names = lambda infos: [i["stream"] for i in infos]  # noqa: E731
    assert names(c.ok("ops", A, "list")) == ["t/1", "tenant-a/1", "tenant-a/2", "tenant-b/1"]
    assert names(c.ok("tadmin", S, "list")) == ["tenant-a/1", "tenant-a/2"]
    assert names(c.ok("alice", P, "list")) == []  # produce and subscribe do not list
    assert names(c.ok("nobody", b"N" * 16, "list")) == []


@pytest.mark.parametrize("op", ["stats", "cleanup"])
def test_stats_and_cleanup_need_admin_of_every_stream(op):
    c = Core()
    args = {"threshold": 3600} if op == "cleanup" else {}
    c.ok("ops", A, op, args)
    for user, client in (("tadmin", S), ("alice", P), ("nobody", b"N" * 16), (None, b"Z" * 16)):
        c.denied(user, client, op, args)
    assert permission_refusals(c) == 4


def test_stats_report_permission_refusals_to_an_admin():
    c = Core()
    c.ingest("alice", "tenant-b/x", 1, [ev(1)])
    c.denied("alice", P, "info", {"stream": "tenant-b/x"})
    c.flush()
    stats = BrokerStats.from_wire(c.ok("ops", A, "stats"))
    assert stats.limits["permissions"] == 2


# -- live subscriptions (XPUB_MANUAL: on_subscription decides) --------------------------


def topic_sub(sid: str) -> bytes:
    return b"\x01" + frames.topic(sid)


def test_a_whole_topic_of_a_readable_stream_is_let_through():
    c = Core()
    assert c.core.on_subscription(topic_sub("tenant-a/x"), "alice") is True
    assert c.core.on_subscription(topic_sub("tenant-a/"), "alice") is True
    assert c.core.on_subscription(topic_sub("t/x"), "reader") is True
    assert permission_refusals(c) == 0


@pytest.mark.parametrize(
    ("user", "sid"),
    [
        ("alice", "tenant-b/x"),  # another tenant's stream
        ("alice", "tenant-ab/x"),
        ("writer", "t/x"),  # produce is not subscribe
        ("manager", "t/x"),  # nor is admin
        ("ops", "t/x"),
        ("nobody", "t/x"),
        ("stranger", "t/x"),
        (None, "tenant-a/x"),
    ],
)
def test_a_topic_the_key_may_not_read_is_refused(user, sid):
    c = Core()
    assert c.core.on_subscription(topic_sub(sid), user) is False
    assert permission_refusals(c) == 1


def refused_subscriptions(c: Core) -> int:
    """Refusals of live subscriptions, whether counted as a permission refusal or as
    bad input on the publish socket."""
    s = c.stats()
    return s.limits.get("permissions", 0) + s.bad_input.get("publish", 0)


PREFIXES = [
    b"\x01",  # everything
    b"\x01t",  # a prefix: would match tenant-a/ and tenant-b/ alike
    b"\x01tenant-a/",  # a prefix inside the key's own, still a prefix
    b"\x01tenant-a/x",  # a topic without its NUL matches tenant-a/xyz too
    b"\x01\xff\xfe\x00",  # not UTF-8
    b"\x01tenant-a/x\x00y\x00",  # a NUL inside the stream ID
    b"\x01tenant-a/x\x00E",  # more than a topic
]


@pytest.mark.parametrize("frame", PREFIXES)
@pytest.mark.parametrize("user", ["alice", "ops"])
def test_prefixes_and_garbage_topics_are_refused_even_inside_a_readable_prefix(user, frame):
    c = Core()
    assert c.core.on_subscription(frame, user) is False
    assert refused_subscriptions(c) == 1


@pytest.mark.parametrize("frame", [b"", b"\x02tenant-a/x\x00", b"\xff"])
def test_garbage_on_the_publish_socket_is_refused_and_counted(frame):
    c = Core()
    assert c.core.on_subscription(frame, "alice") is False
    assert c.stats().bad_input == {"publish": 1}


@pytest.mark.parametrize("user", ["alice", "ops", None])
def test_markers_are_never_put_into_effect(user):
    c = Core()
    assert c.core.on_subscription(b"\x01\x00" + b"token-1", user) is False
    assert permission_refusals(c) == 0  # not a refusal: a marker carries no data
    assert c.core.on_subscription(b"\x01\x00", user) is False


@pytest.mark.parametrize(
    "frame", [b"\x00", b"\x00" + frames.topic("tenant-b/x"), b"\x00\x00tok", b"\x00\xff"]
)
@pytest.mark.parametrize("user", ["alice", "nobody", None])
def test_unsubscribing_is_always_allowed(frame, user):
    c = Core()
    assert c.core.on_subscription(frame, user) is True
    assert permission_refusals(c) == 0


def test_without_a_permission_file_every_topic_is_let_through():
    c = Core(perms=None)
    assert c.core.on_subscription(topic_sub("any/x"), "anyone") is True
    assert c.core.on_subscription(topic_sub("t"), None) is True
    assert c.core.on_subscription(b"\x01\x00tok", None) is False  # still a marker
    assert c.core.on_subscription(b"\x00", None) is True
    assert c.stats().limits.get("permissions", 0) == 0


def test_a_subscribe_command_for_a_readable_stream_completes_with_its_marker():
    c = Core()
    c.ingest("alice", "tenant-a/x", 1, [ev(1), ev(2)])
    c.flush()
    assert c.core.on_subscription(topic_sub("tenant-a/x"), "alice") is True
    assert c.core.on_subscription(b"\x01\x00tok-a", "alice") is False
    replay = c.ok("alice", S, "subscribe", {"stream": "tenant-a/x", "token": b"tok-a"})
    assert (replay["first_seq"], replay["count"]) == (1, 2)


# -- client IDs belong to the key that used them first ----------------------------------


def test_a_client_id_used_by_another_key_is_ignored():
    c = Core()
    c.ok("alice", P, "hello", {"version": frames.PROTOCOL_VERSION})
    before = c.stats()

    c.request("bob", P, "info", {"stream": "tenant-b/x"})
    c.request("bob", P, "hello", {"version": frames.PROTOCOL_VERSION})
    c.core.on_control(P, frames.encode_control("hb", {}), "bob")
    c.ingest("bob", "tenant-b/x", 1, [ev(1)], client=P)
    pub, ctl = c.flush()
    assert (pub, ctl) == ([], [])  # no reply: it would reach alice's client
    after = c.stats()
    assert after.bad_input.get("auth", 0) - before.bad_input.get("auth", 0) == 4
    assert "tenant-b/x" not in c.core.streams
    assert after.limits.get("permissions", 0) == 0  # not a permission refusal

    # alice's client is untouched
    c.ingest("alice", "tenant-a/x", 1, [ev(1)], client=P)
    pub, ctl = c.flush()
    assert len(pub) == 1 and [m[0] for _, m in ctl] == ["ack"]


def test_a_client_id_is_owned_from_its_first_control_message_and_ingest_only_checks():
    c = Core()
    c.ok("alice", P, "hello", {"version": frames.PROTOCOL_VERSION})
    c.ingest("alice", "tenant-a/x", 1, [ev(1)], client=P)
    c.flush()
    c.request("bob", P, "info", {"stream": "tenant-b/x"})
    c.ingest("bob", "tenant-b/x", 1, [ev(1)], client=P)
    assert c.flush() == ([], [])
    assert c.stats().bad_input["auth"] == 2
    # A client ID seen only on ingest is claimed by nobody: no state is left behind.
    c.ingest("alice", "tenant-a/y", 1, [ev(1)], client=Q)
    c.flush()
    assert Q not in c.core._owners


def test_a_client_id_is_free_again_once_its_client_left():
    c = Core()
    c.ok("alice", P, "hello", {"version": frames.PROTOCOL_VERSION})
    c.ok("alice", P, "bye")
    c.ok("bob", P, "hello", {"version": frames.PROTOCOL_VERSION})
    assert c.stats().bad_input.get("auth", 0) == 0


def test_without_a_user_no_ownership_is_checked():
    # plain mode: the runner passes no user at all
    c = Core(perms=None)
    c.ok(None, P, "hello", {"version": frames.PROTOCOL_VERSION})
    c.ok("alice", P, "hello", {"version": frames.PROTOCOL_VERSION})
    c.ok(None, P, "sync")
    assert c.stats().bad_input == {}


def test_ownership_applies_with_curve_alone():
    # CURVE without a permission file: everything is allowed, but a key still
    # cannot act as another key's client
    c = Core(perms=None)
    c.ok("alice", P, "hello", {"version": frames.PROTOCOL_VERSION})
    c.request("bob", P, "stats")
    assert c.flush() == ([], [])
    assert c.stats().bad_input == {"auth": 1}


# -- found in review ------------------------------------------------------------------------


def test_a_refused_frame_with_the_largest_pseq_gets_an_error_not_a_crash():
    c = Core()
    # pseq 2**64-1 with two events: its range would not fit a nack (u64)
    c.ingest("bob", "tenant-a/x", 2**64 - 1, [ev(1), ev(2)], client=Q)
    _, ctl = c.flush()
    assert [m[2] for _, m in ctl if m[0] == "err"] == ["PROTOCOL_ERROR"]


def test_a_refused_frame_is_nacked_over_all_its_events():
    c = Core()
    c.ingest("bob", "tenant-a/x", 1, [ev(1), ev(2), ev(3)], client=Q)
    _, ctl = c.flush()
    (nack,) = [m for _, m in ctl if m[0] == "nack"]
    assert nack[1:5] == ["tenant-a/x", 1, 3, "PERMISSION_DENIED"]


def test_a_timed_out_client_without_cursors_gives_its_id_back():
    c = Core(subscriber_timeout=5)
    c.ok("alice", P, "hello", {"version": frames.PROTOCOL_VERSION})
    c.clock.t += 6
    c.core.on_tick()
    c.ok("bob", P, "hello", {"version": frames.PROTOCOL_VERSION})  # free again
    assert c.stats().bad_input.get("auth", 0) == 0
    assert c.core._owners == {P: "bob"}
