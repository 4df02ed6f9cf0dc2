"""The broker's hot path without sockets: ingest frames fed to ``BrokerCore``.

The core is sans-IO, so its cost per frame and per event can be measured
alone, precisely, and compared between two checkouts (run this file from
each; the numbers are best-of-N, which is what survives a noisy machine)::

    python scripts/bench_core.py                 # this checkout
    git worktree add /tmp/before HEAD~3
    PYTHONPATH=/tmp/before python scripts/bench_core.py

Each shape ingests pre-built frames (so encoding them is not counted) into a
fresh core whose streams are big enough never to evict, then flushes once per
round, which encodes the publish frames and the acks as the runner would.
Loops are bounded: a few rounds of a few thousand frames, a few seconds in all.
"""

from __future__ import annotations

import argparse
import time

from broker.config import BrokerConfig
from broker.core import BrokerCore
from zevents import Event
from zevents.protocol import frames

SHAPES = {
    # name: (streams, events per frame, rounds, buffer size: 0 never full)
    "1 stream, 64 events/frame": (1, 64, 2000, 0),
    "1 stream, 64 events/frame, BLOCK buffer 100": (1, 64, 2000, 100),
    "1,000 streams, 10 events/frame": (1000, 10, 50, 0),
    "1,000 streams, 1 event/frame": (1000, 1, 50, 0),
}
SUBSCRIBER = b"S" * 16


def measure(streams: int, per_frame: int, rounds: int, buffer: int, repeats: int) -> float:
    """Best µs per frame over ``repeats`` fresh cores.  With a ``buffer`` size,
    a subscriber follows every stream and, after each round, acks all but the
    last 40 events, so part of each frame parks (BLOCK) until the next ack."""
    raw = Event.text_delta("0123456789abcdef").to_msgpack()  # ~16 characters, as LLMs send
    body = raw * per_frame
    client = b"P" * 16
    topics = [frames.topic(f"session-{i}") for i in range(streams)]
    batches = [
        [frames.encode_ingest(t, client, 1 + per_frame * r, body) for t in topics]
        for r in range(rounds)
    ]
    best = float("inf")
    for _ in range(repeats):
        core = BrokerCore(BrokerConfig(buffer_size=buffer or 10**9, idle_timeout=0))
        sids = [t[:-1].decode() for t in topics]
        acks = []
        if buffer:
            for i, sid in enumerate(sids):
                token = b"t%d" % i
                core.on_subscription(b"\x01\x00" + token)
                args = {"stream": sid, "token": token, "create": True}
                core.on_control(SUBSCRIBER, frames.encode_control("subscribe", i + 1, args))
            acks = [
                # Lagging 40 behind: some of each frame has to park.
                frames.encode_control("ack", [sid, per_frame * (r + 1) - 40])
                for r in range(rounds)
                for sid in sids
            ]
            core.flush()
        on_ingest, flush, on_control = core.on_ingest, core.flush, core.on_control
        start = time.perf_counter()
        for r, batch in enumerate(batches):
            for frame in batch:
                on_ingest(frame)
            flush()
            for ack in acks[r * streams : (r + 1) * streams]:
                on_control(SUBSCRIBER, ack)
            flush()
        best = min(best, (time.perf_counter() - start) / (rounds * streams) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh cores per shape (best of)")
    args = parser.parse_args()
    for name, (streams, per_frame, rounds, buffer) in SHAPES.items():
        us = measure(streams, per_frame, rounds, buffer, args.repeats)
        print(f"{name:44}  {us:7.2f} µs/frame  {us / per_frame:6.3f} µs/event")


if __name__ == "__main__":
    main()
