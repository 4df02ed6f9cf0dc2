"""Who may connect, and what each key may do: the ZAP handler and the permission file.

Both are plain Python with no socket: the runner (:mod:`broker.server`) feeds
ZAP requests to :meth:`ZapHandler.handle` from its own poll loop and sends the
reply back, and :class:`~broker.core.BrokerCore` asks :meth:`Permissions.allows`
on every path a key can touch a stream by (ingest, commands, replay, live
subscriptions).

The permission file is TOML; a key is named by its certificate's file name
(``alice.key`` is ``alice``), and each action lists the stream-ID prefixes the
key may use it on (``""`` is every stream)::

    [keys.alice]
    produce = ["tenant-a/"]          # send events, create, close, rebase
    subscribe = ["tenant-a/"]        # subscribe, fetch (replay), unsubscribe, info

    [keys.ops]
    admin = [""]                     # create, close, info on every stream; list, stats, cleanup

    [default]                        # any other authorized key (optional; else: nothing)
    subscribe = ["public/"]
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq.utils.z85

from zevents.errors import ZEventsError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ACTIONS", "Grant", "Permissions", "PermissionsFileError", "ZapHandler"]

log = logging.getLogger("zevents.broker")

ACTIONS = ("produce", "subscribe", "admin")


class PermissionsFileError(ZEventsError):
    """The permission file cannot be read or says something it may not."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One key's stream-ID prefixes, per action."""

    produce: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()


_NOTHING = Grant()


class Permissions:
    """Per-key grants; a key not listed gets ``default`` (nothing, unless the file
    has a ``[default]`` table).

    >>> p = Permissions.parse('[keys.alice]\\nproduce = ["tenant-a/"]\\n')
    >>> p.allows("alice", "produce", "tenant-a/chat-1"), p.allows("alice", "produce", "b/1")
    (True, False)
    >>> p.allows("mallory", "subscribe", "tenant-a/chat-1")
    False
    """

    def __init__(self, grants: dict[str, Grant], default: Grant = _NOTHING) -> None:
        self.grants = grants
        self.default = default

    @classmethod
    def load(cls, path: str) -> Permissions:
        """Read a permission file; :class:`PermissionsFileError` if it is not valid."""
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PermissionsFileError(f"cannot read permission file {path!r}: {exc}") from exc
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, source: str = "<permissions>") -> Permissions:
        """Permissions from TOML text (see the module docstring for the format)."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PermissionsFileError(f"{source}: not valid TOML: {exc}") from exc
        unknown = set(doc) - {"keys", "default"}
        if unknown:
            raise PermissionsFileError(f"{source}: unknown tables {sorted(unknown)}")
        keys = doc.get("keys", {})
        if not isinstance(keys, dict):
            raise PermissionsFileError(f"{source}: 'keys' must be a table of key names")
        grants = {name: _grant(source, f"keys.{name}", t) for name, t in keys.items()}
        default = _grant(source, "default", doc["default"]) if "default" in doc else _NOTHING
        return cls(grants, default)

    def grant(self, user: str | None) -> Grant:
        """What ``user`` may do (nothing for an unauthenticated connection)."""
        if user is None:
            return _NOTHING
        return self.grants.get(user, self.default)

    def allows(self, user: str | None, action: str, stream_id: str) -> bool:
        """Whether ``user`` may ``action`` (produce, subscribe, admin) ``stream_id``."""
        prefixes: tuple[str, ...] = getattr(self.grant(user), action)
        return bool(prefixes) and stream_id.startswith(prefixes)

    def admin_everything(self, user: str | None) -> bool:
        """Whether ``user`` may use broker-wide commands (stats, cleanup)."""
        return "" in self.grant(user).admin


def _grant(source: str, where: str, table: Any) -> Grant:
    if not isinstance(table, dict):
        raise PermissionsFileError(f"{source}: [{where}] must be a table")
    unknown = set(table) - set(ACTIONS)
    if unknown:
        raise PermissionsFileError(
            f"{source}: [{where}] has unknown actions {sorted(unknown)} (known: {list(ACTIONS)})"
        )
    values: dict[str, tuple[str, ...]] = {}
    for action in ACTIONS:
        prefixes = table.get(action, [])
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise PermissionsFileError(
                f"{source}: [{where}] {action} must be a list of stream-ID prefixes"
            )
        values[action] = tuple(prefixes)
    return Grant(**values)


class ZapHandler:
    """Answers ZeroMQ's ZAP requests (RFC 27): a CURVE client whose public key is
    authorized is let in, with its key's name as the User-Id every message from
    it then carries; any other is refused, and ``on_denied`` is told why."""

    def __init__(
        self, keys: dict[bytes, str], on_denied: Callable[[str], None] | None = None
    ) -> None:
        self.keys = keys  # Z85 public key -> name
        self.on_denied = on_denied
        self.denied = 0

    def handle(self, request: list[bytes]) -> list[bytes]:
        """The reply frames for one ZAP request's frames."""
        if len(request) < 6:
            return self._reply(request[1] if len(request) > 1 else b"", b"500", "malformed request")
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        if version != b"1.0":
            return self._reply(request_id, b"500", "unsupported ZAP version")
        if mechanism != b"CURVE" or len(request) != 7 or len(request[6]) != 32:
            return self._deny(request_id, address, f"mechanism {mechanism!r} is not CURVE")
        public = zmq.utils.z85.encode(request[6])
        name = self.keys.get(public)
        if name is None:
            return self._deny(request_id, address, f"unknown key {public.decode()}")
        return self._reply(request_id, b"200", "OK", name)

    def _deny(self, request_id: bytes, address: bytes, why: str) -> list[bytes]:
        self.denied += 1
        if self.on_denied is not None:
            self.on_denied(f"refused a connection from {address.decode(errors='replace')}: {why}")
        return self._reply(request_id, b"400", why)

    @staticmethod
    def _reply(request_id: bytes, status: bytes, text: str, user: str = "") -> list[bytes]:
        return [b"1.0", request_id, status, text.encode(), user.encode(), b""]
