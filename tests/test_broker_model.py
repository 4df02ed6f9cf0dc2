"""A model of what BrokerCore may say, checked against random traffic.

Whatever mix of producers (valid and invalid events, over the window and
``max_parked``, resends), subscribers (from any seq, acks reaching into the
parked range, fetches, unsubscribe, bye, timeouts), closes, idle expiry,
cleanup and memory caps:

* each stream's publish frames carry seqs 1, 2, 3, ... once each, then at most
  one end frame at the last seq;
* a replay or fetch gives for every seq the very event published with it (no
  seq is ever given to another event);
* no event is both published and refused; an ack covers only events that were
  published and admitted;
* the buffers add up to the budget, which never passes its cap;
* at shutdown every event a producer sent has been answered.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from test_broker_core import TS, A, Broker, FakeClock, P, Q, S, T, bad_ev, texts

from zevents.events import Event, EventType
from zevents.protocol import frames
from zevents.protocol.frames import KIND_END
from zevents.protocol.producer import ProducerState

OPS = ["send", "send", "send", "sub", "ack", "ack", "unsub", "close", "cleanup", "tick"]
OPS += ["fetch", "bye", "resend"]


class Model:
    """What the broker said so far, and the checks on each new thing it says."""

    def __init__(self, b: Broker, max_parked: int, cap: int) -> None:
        self.b = b
        self.max_parked = max_parked
        self.cap = cap
        self.producers = {P: ProducerState(P), Q: ProducerState(Q)}
        self.text_of: dict[tuple[bytes, str, int], str] = {}  # (producer, stream, pseq)
        self.content: dict[tuple[str, int], str] = {}  # (stream, seq) -> text published
        self.seq_of: dict[tuple[str, str], int] = {}  # (stream, text) -> seq
        self.nacked: set[tuple[str, str]] = set()  # (stream, text)
        self.ended: dict[str, int] = {}
        self.next_seq: dict[str, int] = {}
        self.resends: list[tuple[bytes, str, int]] = []

    def forget_removed(self, sid: str, who: bytes) -> None:
        """A removed stream comes back new, from seq 1."""
        if sid in self.ended and self.b.core.streams.find(sid) is None:
            for key in [k for k in self.content if k[0] == sid]:
                del self.seq_of[(sid, self.content.pop(key))]
            del self.ended[sid]
            self.next_seq.pop(sid, None)
            self.producers[who].forget(sid)

    def pump(self) -> None:
        pub, ctl = self.b.flush()
        for frame in pub:
            self.on_publish(frame)
        for client, msg in ctl:
            if client in self.producers:
                self.on_producer_message(client, msg)
            elif msg[0] == "ok" and isinstance(msg[2], dict) and "events" in msg[2]:
                self.on_replay(msg[2])
        while self.resends:  # as the SDK answers a resend request
            client, sid, expected = self.resends.pop(0)
            rebase = self.producers[client].on_resend(sid, expected)
            if rebase is not None:
                self.b.request(client, "rebase", {"stream": sid, "pseq": rebase})
            for frame in self.producers[client].resend_stream(sid):
                self.b.core.on_ingest(frame)
            self.pump()
        core = self.b.core
        for _, s in core.streams:
            assert s.base_seq + len(s.events) == s.next_seq
            assert len(s.parked) <= self.max_parked
        assert core.budget.used == sum(s.nbytes for _, s in core.streams)
        assert core.budget.used <= self.cap, "over the memory cap"

    def on_publish(self, frame: bytes) -> None:
        sid, kind, seq, start = frames.decode_publish(frame)
        expected = self.next_seq.get(sid, 1)
        if kind == KIND_END:
            assert seq == expected - 1, (sid, seq, expected)
            self.ended[sid] = seq
            return
        assert sid not in self.ended, "a frame after the end"
        assert seq == expected, (sid, seq, expected)
        batch = texts(frame[start:])
        self.next_seq[sid] = seq + len(batch)
        for i, text in enumerate(batch):
            assert (sid, text) not in self.seq_of, ("published twice", sid, text)
            assert (sid, text) not in self.nacked, ("published after a nack", sid, text)
            self.content[(sid, seq + i)] = text
            self.seq_of[(sid, text)] = seq + i

    def on_producer_message(self, client: bytes, msg: list[Any]) -> None:
        if msg[0] == "nack":
            _, sid, first, last = msg[:4]
            for pseq in range(first, last + 1):
                text = self.text_of.get((client, sid, pseq))
                if text is not None:
                    assert (sid, text) not in self.seq_of, ("nack of a published event", msg)
                    self.nacked.add((sid, text))
        elif msg[0] == "ack":
            flat = msg[2]
            for sid, through in zip(flat[::2], flat[1::2], strict=True):
                stream = self.b.core.streams.find(sid)
                for pseq in range(1, through + 1):
                    text = self.text_of.get((client, sid, pseq))
                    if text is None or (sid, text) in self.nacked or sid == "d":
                        continue  # (DROP: an ack also answers a dropped event)
                    assert (sid, text) in self.seq_of, ("acked, never published", sid, text)
                    if stream is not None:
                        assert self.seq_of[(sid, text)] < stream.next_seq, "acked, not admitted"
        if msg[0] in ("ack", "nack", "dropped", "closed"):
            self.producers[client].on_message(msg)
        elif msg[0] == "resend":
            self.resends.append((client, msg[1], msg[2]))

    def on_replay(self, reply: dict[str, Any]) -> None:
        sid, first, count = reply["stream"], reply["first_seq"], reply["count"]
        got = texts(reply["events"]) if count else []
        assert len(got) == count
        for i, text in enumerate(got):
            assert self.content.get((sid, first + i)) == text, ("replay differs", sid, first + i)
        if count:
            assert reply["last_seq"] >= first + count - 1


@pytest.mark.parametrize(
    ("buffer_size", "max_parked", "window", "max_batch"), [(2, 4, 3, 3), (1, 3, 2, 1)]
)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_traffic_keeps_the_model(
    data: st.DataObject, buffer_size: int, max_parked: int, window: int, max_batch: int
) -> None:
    clock = FakeClock(time.monotonic())
    cap = data.draw(st.sampled_from([1 << 30, 300, 600]), label="cap")
    b = Broker(
        clock,
        buffer_size=buffer_size,
        max_parked=max_parked,
        window=window,
        max_batch=max_batch,
        subscriber_timeout=5,
        idle_timeout=data.draw(st.sampled_from([0, 4.0]), label="idle_timeout"),
        max_buffered_bytes=cap,
    )
    b.ok(A, "create", {"stream": "d", "policy": "drop"})
    m = Model(b, max_parked, cap)
    sent = {P: 0, Q: 0}
    for _ in range(data.draw(st.integers(1, 50), label="steps")):
        op = data.draw(st.sampled_from(OPS))
        sid = data.draw(st.sampled_from(["a", "b", "d"]), label="stream")
        who = data.draw(st.sampled_from([P, Q]), label="producer")
        reader = data.draw(st.sampled_from([S, T]), label="subscriber")
        m.forget_removed(sid, who)
        prod = m.producers[who]
        if op == "send" and not prod.is_closed(sid):
            events, made = [], {}
            for i in range(data.draw(st.integers(1, 4), label="n")):
                if data.draw(st.integers(0, 9), label="valid"):
                    sent[who] += 1
                    made[i] = text = f"{who[:1].decode()}{sent[who]}"
                    events.append(Event(EventType.TEXT_DELTA, {"text": text}, TS).to_msgpack())
                else:
                    events.append(bad_ev())
            frame = prod.encode(sid, events)
            first = frames.decode_ingest_header(frame).first_pseq
            for i, text in made.items():
                m.text_of[(who, sid, first + i)] = text
            b.core.on_ingest(frame)
        elif op == "sub":
            from_seq = data.draw(st.one_of(st.none(), st.integers(1, 12)), label="from_seq")
            token = b.token()
            b.marker(token)
            args = {"stream": sid, "from_seq": from_seq, "token": token, "create": True}
            b.request(reader, "subscribe", args)
        elif op == "ack":
            b.ack(reader, sid, data.draw(st.integers(0, 14), label="seq"))
        elif op == "unsub":
            b.request(reader, "unsubscribe", {"stream": sid})
        elif op == "close":
            b.request(A, "close", {"stream": sid})
        elif op == "fetch":
            from_seq = data.draw(st.integers(1, 14), label="fetch_from")
            b.request(reader, "fetch", {"stream": sid, "from_seq": from_seq})
        elif op == "cleanup":
            b.request(A, "cleanup", {"threshold": data.draw(st.sampled_from([0.5, 3.0]))})
        elif op == "bye":
            b.request(reader, "bye", {})
        elif op == "tick":
            clock.advance(data.draw(st.sampled_from([0.1, 2.0, 6.0]), label="dt"))
            if data.draw(st.booleans(), label="hb"):
                b.send(reader, "hb", {})
            b.core.on_tick()
        else:
            for frame in prod.resend():
                b.core.on_ingest(frame)
        note(f"{op} {sid} {who[:1]!r} {reader[:1]!r}")
        m.pump()
    b.core.shutdown()
    m.pump()
    for prod in m.producers.values():
        assert prod.unanswered() == 0
