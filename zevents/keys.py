"""CurveZMQ keys: generating them, loading them, putting them on sockets.

Keys are files in ZeroMQ's certificate format (what :func:`zmq.auth.create_certificates`
writes): ``NAME.key`` holds the public key, ``NAME.key_secret`` the public and
the secret key.  A broker has one key pair and a directory of the public keys
of the clients it accepts; a client has its own key pair and the broker's
public key.  The *name* of a key (its file name without the suffix) is what
the broker's permission file refers to.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> public, secret = generate_keys(d, "alice")
>>> keys = ClientKeys.load(secret, public)  # alice talking to a broker whose key is alice's
>>> len(keys.public), len(keys.server)
(40, 40)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from .errors import KeyFileError

__all__ = ["ClientKeys", "generate_keys", "load_public_keys", "load_secret_key"]


def generate_keys(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write a new key pair ``NAME.key`` and ``NAME.key_secret`` in ``directory``
    (created if need be; the secret file readable by its owner only).  Returns
    ``(public file, secret file)``; refuses to overwrite an existing pair."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r} must be a plain file name")
    folder = Path(directory)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise KeyFileError(f"{public} or {secret} exists already; not overwriting a key")
    folder.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return public, secret


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key file {str(path)!r}: {exc}") from exc
    if public is None or len(public) != 40:
        raise KeyFileError(f"{str(path)!r} holds no CurveZMQ public key")
    return public, secret


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` file."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{str(path)!r} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public_keys(path: str | os.PathLike[str]) -> dict[bytes, str]:
    """The public keys in a directory of ``*.key`` files (or in one file), each
    mapped to its name (the file name without ``.key``)."""
    p = Path(path)
    files = sorted(p.glob("*.key")) if p.is_dir() else [p]
    if not files:
        raise KeyFileError(f"no *.key files in {str(p)!r}")
    keys: dict[bytes, str] = {}
    for f in files:
        public, _ = _load(f)
        keys[public] = f.name.removesuffix(".key_secret").removesuffix(".key")
    return keys


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a client needs to talk to a CURVE broker: its own key pair and the
    broker's public key (all Z85)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(
        cls, secret_file: str | os.PathLike[str], server_file: str | os.PathLike[str]
    ) -> ClientKeys:
        """From the client's ``.key_secret`` file and the broker's ``.key`` file."""
        public, secret = load_secret_key(secret_file)
        server, _ = _load(server_file)
        return cls(public, secret, server)

    @classmethod
    def from_env(cls) -> ClientKeys | None:
        """From ``$ZEVENTS_CURVE_KEY`` (the client's secret file) and
        ``$ZEVENTS_CURVE_SERVER`` (the broker's public file); None if unset."""
        secret_file = os.environ.get("ZEVENTS_CURVE_KEY")
        server_file = os.environ.get("ZEVENTS_CURVE_SERVER")
        if not secret_file and not server_file:
            return None
        if not secret_file or not server_file:
            raise KeyFileError("set both ZEVENTS_CURVE_KEY and ZEVENTS_CURVE_SERVER, or neither")
        return cls.load(secret_file, server_file)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of the broker (before it connects)."""
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)
