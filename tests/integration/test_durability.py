"""Durability: a broker with ``--data-dir`` loses nothing it acknowledged to
``kill -9``, delivers nothing twice after it, and keeps its store compact."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from _sdk_helpers import text_of, texts

from zevents import Admin, Event, Producer, Subscriber


def db_rows(data_dir: Path, sql: str) -> Any:
    with sqlite3.connect(f"file:{data_dir / 'zevents.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


def test_acknowledged_events_and_closed_state_survive_kill_9(make_broker, stream_id, tmp_path):
    b = make_broker("--data-dir", str(tmp_path), "--buffer-size", "500")
    with Producer(b.control) as producer:
        producer.send_many(stream_id, texts(300))
        producer.send(f"{stream_id}-done", Event.text_delta("last"))
        producer.flush(timeout=10)  # acknowledged: durable from here on
    with Admin(b.control) as admin:
        admin.close_stream(f"{stream_id}-done")
    b.kill()
    b.restart_same_ports()
    with Admin(b.control) as admin:
        info = admin.stream_info(stream_id)
        assert (info.last_seq, info.current_load, info.closed) == (300, 300, False)
        assert admin.stream_info(f"{stream_id}-done").closed is True
    with Subscriber(b.control) as sub:
        following = sub.subscribe(stream_id, from_seq=1)
        got = [following.next_event(timeout=10) for _ in range(300)]
    assert text_of(e for e in got if e is not None) == [str(i) for i in range(300)]
    assert [e.seq for e in got if e is not None] == list(range(1, 301))


def test_kill_9_mid_stream_loses_nothing_and_delivers_nothing_twice(
    make_broker, stream_id, tmp_path
):
    n = 3000
    b = make_broker("--data-dir", str(tmp_path), "--subscriber-timeout", "10")
    producer_error: list[BaseException] = []

    def produce() -> None:
        try:
            with Producer(b.control, timeout=30) as producer:
                for i in range(n):
                    producer.send(stream_id, Event.text_delta(str(i)), timeout=30)
                producer.flush(timeout=30)
            with Admin(b.control, timeout=30) as admin:
                admin.close_stream(stream_id)
        except BaseException as exc:
            producer_error.append(exc)

    with Subscriber(b.control, timeout=30) as sub:
        following = sub.subscribe(stream_id, create=True)
        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        got: list[Event] = []
        deadline = time.monotonic() + 60
        killed = False
        while time.monotonic() < deadline:
            event = following.next_event(timeout=30)
            if event is None:
                break
            got.append(event)
            if len(got) == n // 3 and not killed:
                b.kill()  # with events in flight both ways
                b.restart_same_ports()
                killed = True
        thread.join(timeout=60)
    assert killed and not producer_error, producer_error
    assert [e.seq for e in got] == list(range(1, n + 1))
    assert text_of(got) == [str(i) for i in range(n)]


def test_sigterm_keeps_durable_streams_open_for_after_the_restart(make_broker, stream_id, tmp_path):
    b = make_broker("--data-dir", str(tmp_path))
    with Producer(b.control) as producer:
        producer.send_many(stream_id, texts(5))
        producer.flush(timeout=10)
    b.terminate()
    b.restart_same_ports()
    with Producer(b.control) as producer:
        producer.send_many(stream_id, texts(5, start=5))
        producer.flush(timeout=10)
    with Subscriber(b.control) as sub:
        following = sub.subscribe(stream_id, from_seq=1)
        got = [following.next_event(timeout=10) for _ in range(10)]
    assert text_of(e for e in got if e is not None) == [str(i) for i in range(10)]


def test_the_store_forgets_what_left_the_buffer_and_removed_streams(
    make_broker, stream_id, tmp_path, wait_until
):
    b = make_broker("--data-dir", str(tmp_path), "--buffer-size", "10")
    n = 2000
    with Subscriber(b.control) as sub:
        following = sub.subscribe(stream_id, create=True)

        def produce() -> None:
            with Producer(b.control) as producer:
                producer.send_many(stream_id, texts(n), timeout=30)
                producer.flush(timeout=30)
            with Admin(b.control) as admin:
                admin.close_stream(stream_id)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        got = []
        while (event := following.next_event(timeout=30)) is not None:
            got.append(event)
        thread.join(timeout=30)
    assert len(got) == n
    # At most the buffer (and the events of the last commit) are kept on disk.
    (count,) = db_rows(tmp_path, "SELECT count(*) FROM events")[0]
    assert count <= 10
    with Admin(b.control) as admin:
        wait_until(lambda: admin.stream_info(stream_id).idle > 0.05, timeout=10)
        assert admin.cleanup_inactive(0.05) >= 1

    def gone() -> bool:
        streams = db_rows(tmp_path, "SELECT count(*) FROM streams")[0][0]
        return streams == 0 and db_rows(tmp_path, "SELECT count(*) FROM events")[0][0] == 0

    wait_until(gone, timeout=10)
    assert db_rows(tmp_path, "SELECT count(*) FROM producers")[0][0] == 0


def test_a_durable_broker_does_not_publish_parked_events_so_subscribers_ack_each_half_buffer(
    make_broker, stream_id, tmp_path
):
    # Nothing is published before it is stored, and parked events are not: a
    # subscriber acking less often than half a buffer would stall its producers.
    b = make_broker("--data-dir", str(tmp_path))
    with Subscriber(b.control) as sub:
        assert sub.handshake.limits["publishes_parked"] is False
        following = sub.subscribe(stream_id, create=True)
        assert sub._state.cursors[stream_id].ack_step == 50  # buffer 100
        with Producer(b.control) as producer:
            producer.send_many(stream_id, texts(1000))
            got = [following.next_event(timeout=10) for _ in range(1000)]
            producer.flush(timeout=10)
    assert text_of(e for e in got if e is not None) == [str(i) for i in range(1000)]
