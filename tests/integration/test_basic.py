"""The basic path through a real broker process: produce, follow, close."""

from __future__ import annotations

import threading

from zevents import Admin, Event, Producer, Subscriber


def test_events_arrive_in_order_with_seq_and_stream(broker, stream_id):
    with Producer(broker.control) as p, Subscriber(broker.control) as s:
        with Admin(broker.control) as admin:  # room for all 200: nobody reads until the end
            admin.create_stream(stream_id, buffer_size=256)
        following = s.subscribe(stream_id)
        p.send_many(stream_id, [Event.text_delta(f"t{i}") for i in range(200)])
        p.flush(timeout=10)
        with Admin(broker.control) as admin:
            admin.close_stream(stream_id)
        got = list(following)
    assert [e.seq for e in got] == list(range(1, 201))
    assert [e.data["text"] for e in got] == [f"t{i}" for i in range(200)]
    assert {e.stream_id for e in got} == {stream_id}


def test_producer_thread_and_subscriber(broker, stream_id):
    n = 2000
    with Subscriber(broker.control) as s:
        following = s.subscribe(stream_id, create=True)

        def produce() -> None:
            with Producer(broker.control) as p:
                for i in range(n):
                    p.send(stream_id, Event.text_delta(str(i)), timeout=10)
            with Admin(broker.control) as admin:
                admin.close_stream(stream_id)

        t = threading.Thread(target=produce)
        t.start()
        seqs = [e.seq for e in following]
        t.join(timeout=10)
        assert not t.is_alive()
    assert seqs == list(range(1, n + 1))
