"""zevents: move LLM output between processes, in order and fast.

The core (this package's top level) is the event model, bounded
:class:`EventStream` queues with block-or-drop backpressure and a
:class:`StreamManager` of named streams.  See ``docs/guide.md``.
"""

from .client import (
    Admin,
    AsyncAdmin,
    AsyncProducer,
    AsyncSubscriber,
    AsyncSubscription,
    Producer,
    StreamClosed,
    Subscriber,
    Subscription,
)
from .errors import (
    BrokerUnavailableError,
    InvalidEventError,
    InvalidStreamIdError,
    KeyFileError,
    LimitExceededError,
    PermissionDeniedError,
    ProtocolError,
    ReplayUnavailableError,
    StreamClosedError,
    StreamError,
    StreamExistsError,
    StreamFullError,
    StreamNotFoundError,
    VersionMismatchError,
    ZEventsError,
    is_invalid_event,
    is_stream_closed,
    is_stream_full,
    is_stream_not_found,
)
from .events import Event, EventType
from .ids import MAX_STREAM_ID_BYTES, validate_stream_id
from .keys import ClientKeys, generate_keys
from .manager import StreamInfo, StreamManager
from .protocol.records import BrokerStats, RemoteStreamInfo
from .stream import BackpressurePolicy, EventStream, StreamStatistics

__version__ = "0.1.0"

__all__ = [
    "Admin",
    "AsyncAdmin",
    "AsyncProducer",
    "AsyncSubscriber",
    "AsyncSubscription",
    "BrokerStats",
    "ClientKeys",
    "Producer",
    "RemoteStreamInfo",
    "StreamClosed",
    "Subscriber",
    "Subscription",
    "MAX_STREAM_ID_BYTES",
    "BackpressurePolicy",
    "BrokerUnavailableError",
    "Event",
    "EventStream",
    "EventType",
    "InvalidEventError",
    "InvalidStreamIdError",
    "KeyFileError",
    "LimitExceededError",
    "PermissionDeniedError",
    "ProtocolError",
    "ReplayUnavailableError",
    "StreamClosedError",
    "StreamError",
    "StreamExistsError",
    "StreamFullError",
    "StreamInfo",
    "StreamManager",
    "StreamNotFoundError",
    "StreamStatistics",
    "VersionMismatchError",
    "ZEventsError",
    "is_invalid_event",
    "is_stream_closed",
    "is_stream_full",
    "is_stream_not_found",
    "generate_keys",
    "validate_stream_id",
]
