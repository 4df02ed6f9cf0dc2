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
    # name: (streams, events per frame, rounds)
    "1 stream, 64 events/frame": (1, 64, 2000),
    "1,000 streams, 10 events/frame": (1000, 10, 50),
    "1,000 streams, 1 event/frame": (1000, 1, 50),
}


def measure(streams: int, per_frame: int, rounds: int, repeats: int) -> float:
    """Best µs per frame over ``repeats`` fresh cores."""
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
        core = BrokerCore(BrokerConfig(buffer_size=10**9, idle_timeout=0))
        on_ingest, flush = core.on_ingest, core.flush
        start = time.perf_counter()
        for batch in batches:
            for frame in batch:
                on_ingest(frame)
            flush()
        best = min(best, (time.perf_counter() - start) / (rounds * streams) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh cores per shape (best of)")
    args = parser.parse_args()
    for name, (streams, per_frame, rounds) in SHAPES.items():
        us = measure(streams, per_frame, rounds, args.repeats)
        print(f"{name:32}  {us:7.2f} µs/frame  {us / per_frame:6.3f} µs/event")


if __name__ == "__main__":
    main()
