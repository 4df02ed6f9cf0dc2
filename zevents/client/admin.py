"""Admin clients: :class:`~zevents.StreamManager`'s methods, over the control socket.

>>> with Admin("tcp://127.0.0.1:5555") as admin:          # doctest: +SKIP
...     admin.create_stream("session-1", buffer_size=500)
...     print(admin.stats().events_in)
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import zmq
import zmq.asyncio

from ..ids import validate_stream_id
from ..keys import ClientKeys
from ..protocol.records import BrokerStats, RemoteStreamInfo
from ..stream import BackpressurePolicy
from ._base import DEFAULT_TIMEOUT, _ClientBase
from ._io import AsyncIO, SyncIO

__all__ = ["Admin", "AsyncAdmin"]


def _create_args(
    stream_id: str, buffer_size: int | None, policy: BackpressurePolicy | str | None
) -> dict[str, Any]:
    validate_stream_id(stream_id)
    args: dict[str, Any] = {"stream": stream_id}
    if buffer_size is not None:
        args["buffer_size"] = buffer_size
    if policy is not None:
        args["policy"] = str(BackpressurePolicy.parse(policy))
    return args


def _seconds(threshold: float | timedelta) -> float:
    return threshold.total_seconds() if isinstance(threshold, timedelta) else float(threshold)


class _AdminLogic(_ClientBase):
    _tags = itertools.count(1)

    def _tag(self) -> tuple[str, int]:
        return ("admin", next(self._tags))


class Admin(_AdminLogic, SyncIO):
    """Manage a broker's streams (blocking calls; each waits at most ``timeout``)."""

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.Context[Any] | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        SyncIO.__init__(self, broker, timeout, context, keys)
        self._connect()

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        self._check_open()
        tag = self._tag()
        self._request(op, args, tag)
        if not self._wait(lambda: tag in self._replies, self.timeout, op):
            raise self._unavailable(op)
        return self._take_reply(tag)

    def create_stream(
        self,
        stream_id: str,
        *,
        buffer_size: int | None = None,
        policy: BackpressurePolicy | str | None = None,
    ) -> RemoteStreamInfo:
        """Create a stream; :class:`StreamExistsError` if it exists."""
        info: RemoteStreamInfo = RemoteStreamInfo.from_wire(
            self._call("create", _create_args(stream_id, buffer_size, policy))
        )
        return info

    def get_or_create(
        self,
        stream_id: str,
        *,
        buffer_size: int | None = None,
        policy: BackpressurePolicy | str | None = None,
    ) -> tuple[RemoteStreamInfo, bool]:
        """``(info, created)``."""
        result = self._call("get_or_create", _create_args(stream_id, buffer_size, policy))
        return RemoteStreamInfo.from_wire(result), bool(result.get("created"))

    def close_stream(self, stream_id: str) -> RemoteStreamInfo:
        """Close a stream: subscribers get what is buffered, then the end; producers are told."""
        validate_stream_id(stream_id)
        info: RemoteStreamInfo = RemoteStreamInfo.from_wire(
            self._call("close", {"stream": stream_id})
        )
        return info

    def stream_info(self, stream_id: str) -> RemoteStreamInfo:
        """One stream's info; :class:`StreamNotFoundError` if there is none."""
        validate_stream_id(stream_id)
        info: RemoteStreamInfo = RemoteStreamInfo.from_wire(
            self._call("info", {"stream": stream_id})
        )
        return info

    def list_stream_info(self) -> list[RemoteStreamInfo]:
        """Every stream's info, sorted by ID."""
        return [RemoteStreamInfo.from_wire(d) for d in self._call("list", {})]

    def list_streams(self) -> list[str]:
        """Every stream's ID, sorted."""
        return [info.stream for info in self.list_stream_info()]

    def stream_count(self) -> int:
        """How many streams the broker holds."""
        return self.stats().streams

    def cleanup_inactive(self, threshold: float | timedelta) -> int:
        """Close and remove streams idle longer than ``threshold``; how many."""
        return int(self._call("cleanup", {"threshold": _seconds(threshold)})["removed"])

    def stats(self) -> BrokerStats:
        """The broker's counters."""
        stats: BrokerStats = BrokerStats.from_wire(self._call("stats", {}))
        return stats


class AsyncAdmin(_AdminLogic, AsyncIO):
    """:class:`Admin` for asyncio: ``async with AsyncAdmin(broker) as admin``."""

    def __init__(
        self,
        broker: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        context: zmq.asyncio.Context | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        AsyncIO.__init__(self, broker, timeout, context, keys)

    async def _call(self, op: str, args: dict[str, Any]) -> Any:
        self._check_open()
        tag = self._tag()
        self._request(op, args, tag)
        if not await self._wait(lambda: tag in self._replies, self.timeout, op):
            raise self._unavailable(op)
        return self._take_reply(tag)

    async def create_stream(
        self,
        stream_id: str,
        *,
        buffer_size: int | None = None,
        policy: BackpressurePolicy | str | None = None,
    ) -> RemoteStreamInfo:
        """See :meth:`Admin.create_stream`."""
        result = await self._call("create", _create_args(stream_id, buffer_size, policy))
        info: RemoteStreamInfo = RemoteStreamInfo.from_wire(result)
        return info

    async def get_or_create(
        self,
        stream_id: str,
        *,
        buffer_size: int | None = None,
        policy: BackpressurePolicy | str | None = None,
    ) -> tuple[RemoteStreamInfo, bool]:
        """See :meth:`Admin.get_or_create`."""
        result = await self._call("get_or_create", _create_args(stream_id, buffer_size, policy))
        return RemoteStreamInfo.from_wire(result), bool(result.get("created"))

    async def close_stream(self, stream_id: str) -> RemoteStreamInfo:
        """See :meth:`Admin.close_stream`."""
        validate_stream_id(stream_id)
        info: RemoteStreamInfo = RemoteStreamInfo.from_wire(
            await self._call("close", {"stream": stream_id})
        )
        return info

    async def stream_info(self, stream_id: str) -> RemoteStreamInfo:
        """See :meth:`Admin.stream_info`."""
        validate_stream_id(stream_id)
        info: RemoteStreamInfo = RemoteStreamInfo.from_wire(
            await self._call("info", {"stream": stream_id})
        )
        return info

    async def list_stream_info(self) -> list[RemoteStreamInfo]:
        """See :meth:`Admin.list_stream_info`."""
        return [RemoteStreamInfo.from_wire(d) for d in await self._call("list", {})]

    async def list_streams(self) -> list[str]:
        """See :meth:`Admin.list_streams`."""
        return [info.stream for info in await self.list_stream_info()]

    async def stream_count(self) -> int:
        """See :meth:`Admin.stream_count`."""
        return (await self.stats()).streams

    async def cleanup_inactive(self, threshold: float | timedelta) -> int:
        """See :meth:`Admin.cleanup_inactive`."""
        return int((await self._call("cleanup", {"threshold": _seconds(threshold)}))["removed"])

    async def stats(self) -> BrokerStats:
        """See :meth:`Admin.stats`."""
        stats: BrokerStats = BrokerStats.from_wire(await self._call("stats", {}))
        return stats
