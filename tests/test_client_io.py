"""The clients' I/O layer against a scripted fake broker (real sockets, no broker process)."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import zmq

from zevents import AsyncProducer, Event


def _hello_reply(req_id: int, ingest: str) -> bytes:
    limits = {
        "window": 256,
        "max_batch": 1024,
        "max_message_size": 1 << 20,
        "heartbeat_interval": 1.0,
    }
    result = {
        "version": 1,
        "broker_id": "b" * 16,
        "control": "",
        "ingest": ingest,
        "publish": ingest,
        "limits": limits,
    }
    return msgpack.packb(["ok", req_id, result])


async def test_a_reader_that_dies_fails_the_waiting_call_at_once() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    pull = ctx.socket(zmq.PULL)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        ingest_port = pull.bind_to_random_port("tcp://127.0.0.1")
        producer = AsyncProducer(f"tcp://127.0.0.1:{port}", timeout=5)
        connecting = asyncio.ensure_future(producer.connect())
        assert await asyncio.to_thread(router.poll, 5000)
        client, frame = router.recv_multipart()
        op, req_id, _ = msgpack.unpackb(frame)
        assert op == "hello"
        router.send_multipart([client, _hello_reply(req_id, f"tcp://127.0.0.1:{ingest_port}")])
        await asyncio.wait_for(connecting, 5)
        try:
            await producer.send("s", Event.text_delta("x"))
            # A malformed notice from the "broker" breaks the reader task ...
            router.send_multipart([client, msgpack.packb(["dropped", "s", "many", 1])])
            started = time.monotonic()
            # ... and the flush waiting on it fails with that error, not a timeout.
            with pytest.raises(ValueError):
                await producer.flush(timeout=4)
            assert time.monotonic() - started < 2
        finally:
            await producer.aclose()
    finally:
        router.close(linger=0)
        pull.close(linger=0)
        ctx.term()
