"""Records the broker reports over the control socket, as frozen dataclasses.

Both sides use them: the broker builds them and writes :meth:`to_wire`, the
admin client reads them back with :meth:`from_wire`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ProtocolError

__all__ = ["BrokerStats", "RemoteStreamInfo"]


class _Wire:
    @classmethod
    def from_wire(cls, d: Any) -> Any:
        """The record a broker sent as the map ``d`` (unknown keys are ignored, so a
        newer broker can add fields); :class:`ProtocolError` if it is not one."""
        if not isinstance(d, dict):
            raise ProtocolError(f"{cls.__name__}: expected a map, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as exc:
            raise ProtocolError(f"{cls.__name__}: {exc}") from exc

    def to_wire(self) -> dict[str, Any]:
        """The record as the map the broker sends."""
        return asdict(self)  # type: ignore[call-overload,no-any-return]


@dataclass(frozen=True, slots=True)
class RemoteStreamInfo(_Wire):
    """A broker stream, as ``info`` and ``list`` report it.

    ``first_seq``..``last_seq`` is what the buffer still holds (empty when
    ``first_seq > last_seq``); ``idle`` is seconds since the last activity.
    """

    stream: str
    buffer_size: int
    policy: str
    current_load: int
    first_seq: int
    last_seq: int
    closed: bool
    subscribers: int
    parked: int
    events_in: int
    dropped: int
    rejected: int
    idle: float

    @property
    def id(self) -> str:
        """The stream ID (StreamInfo's name for it)."""
        return self.stream

    @property
    def is_closed(self) -> bool:
        """StreamInfo's name for :attr:`closed`."""
        return self.closed


@dataclass(frozen=True, slots=True)
class BrokerStats(_Wire):
    """The broker's counters, as ``stats`` reports them."""

    streams: int
    open_streams: int
    subscribers: int
    clients: int
    events_in: int
    events_out: int
    dropped: int
    rejected: int
    parked: int
    bad_input: dict[str, int] = field(default_factory=dict)
    #: How many times each limit refused or held something back, by limit name.
    limits: dict[str, int] = field(default_factory=dict)
    buffered_bytes: int = 0  #: bytes of events buffered across all streams
