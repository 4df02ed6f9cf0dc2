"""BrokerConfig: every knob of the broker, with its default, in one frozen record."""

from __future__ import annotations

from dataclasses import dataclass

from zevents.stream import DEFAULT_BUFFER_SIZE, BackpressurePolicy

__all__ = ["DEFAULT_CONTROL", "DEFAULT_INGEST", "DEFAULT_PUBLISH", "BrokerConfig"]

DEFAULT_CONTROL = "tcp://127.0.0.1:5555"
DEFAULT_INGEST = "tcp://127.0.0.1:5556"
DEFAULT_PUBLISH = "tcp://127.0.0.1:5557"


@dataclass(frozen=True)
class BrokerConfig:
    """How a broker binds and behaves.  Times are seconds."""

    control: str = DEFAULT_CONTROL
    ingest: str = DEFAULT_INGEST
    publish: str = DEFAULT_PUBLISH
    buffer_size: int = DEFAULT_BUFFER_SIZE  #: default per-stream buffer
    policy: BackpressurePolicy = BackpressurePolicy.BLOCK  #: default per-stream policy
    idle_timeout: float = 300.0  #: close idle streams, then remove closed idle ones
    subscriber_timeout: float = 5.0  #: a silent client stops gating buffers after this
    heartbeat_interval: float = 1.0  #: what clients are told to heartbeat at
    require_create: bool = False  #: refuse events for streams nobody created
    window: int = 4096  #: unacknowledged events a producer may have per stream
    max_parked: int = 65536  #: BLOCK events waiting for room, per stream (memory guard)
    max_message_size: int = 1 << 20  #: largest message accepted, bytes
    max_event_size: int = 1 << 20  #: largest single event accepted, bytes (as encoded)
    max_batch: int = 1024  #: events per publish frame or replay reply
    max_streams: int = 1_000_000  #: streams the broker holds at most
    max_subscribers: int = 1024  #: subscribers one stream may have at once
    #: Bytes of events buffered across all streams at most (a memory cap: when it is
    #: reached, acknowledged history is trimmed first, then BLOCK streams push back
    #: and DROP streams drop).  Parked events are bounded by ``window``/``max_parked``.
    max_buffered_bytes: int = 1 << 30
    ack_delay: float = 0.005  #: how long an owed producer ack may wait to be coalesced
    #: Durability: a directory for the SQLite store (None: memory only, the default).
    data_dir: str | None = None
    commit_interval: float = 0.002  #: group commit: how long a write may wait for company
    sync: str = "normal"  #: SQLite ``synchronous``: "normal" survives a crash, "full" power loss
    #: Security: the broker's CURVE secret key file (None: plain, unauthenticated).
    curve_secret: str | None = None
    curve_clients: str | None = None  #: a directory (or file) of authorized client public keys
    permissions: str | None = None  #: TOML file of per-key permissions (None: all allowed)

    def limits(self) -> dict[str, object]:
        """What the handshake tells clients."""
        return {
            "window": self.window,
            "max_message_size": self.max_message_size,
            "max_event_size": self.max_event_size,
            "max_batch": self.max_batch,
            # Three heartbeats fit in the timeout, so one lost or late is not fatal.
            "heartbeat_interval": min(self.heartbeat_interval, self.subscriber_timeout / 3),
            "subscriber_timeout": self.subscriber_timeout,
            "buffer_size": self.buffer_size,
            "policy": str(self.policy),
            "require_create": self.require_create,
            "max_subscribers": self.max_subscribers,
            "idle_timeout": self.idle_timeout,
            # Memory only, a restarted broker has lost its streams (clients must not resume).
            "durable": self.data_dir is not None,
            # Memory only, BLOCK events are published as they park (protocol.md
            # section 12): a subscriber may read a window past the buffer.
            "publishes_parked": self.data_dir is None,
        }
