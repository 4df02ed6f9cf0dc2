"""Tests for broker.buffer.StreamBuffer: admission, eviction, cursors and acks."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.buffer import StreamBuffer
from zevents.errors import ReplayUnavailableError, StreamClosedError
from zevents.protocol.frames import topic
from zevents.stream import BackpressurePolicy

A = b"A" * 16
B = b"B" * 16


def buf(size: int = 3, policy: BackpressurePolicy = BackpressurePolicy.BLOCK) -> StreamBuffer:
    return StreamBuffer("s", size, policy)


def fill(b: StreamBuffer, n: int) -> list[int]:
    out = []
    for i in range(n):
        assert b.has_room()
        out.append(b.admit(f"e{b.next_seq}".encode()))
        del i
    return out


def held(b: StreamBuffer) -> list[int]:
    """Seqs the buffer holds, read back through the events themselves."""
    return [int(raw[1:]) for raw in b.events]


# -- basics ---------------------------------------------------------------------------------


def test_new_buffer() -> None:
    b = buf()
    assert b.stream_id == "s" and b.topic == topic("s")
    assert len(b) == 0
    assert b.last_seq == 0 and b.base_seq == 1 and b.next_seq == 1
    assert not b.closed
    assert b.has_room()


def test_admit_numbers_from_one_and_keeps_raw_bytes() -> None:
    b = buf(5)
    assert fill(b, 3) == [1, 2, 3]
    assert list(b.events) == [b"e1", b"e2", b"e3"]
    assert b.last_seq == 3 and len(b) == 3
    assert b.events_in == 3


def test_take_unpublished() -> None:
    b = buf(5)
    fill(b, 2)
    assert b.take_unpublished() == (1, [b"e1", b"e2"])
    assert b.take_unpublished()[1] == []
    fill(b, 1)
    assert b.take_unpublished() == (3, [b"e3"])


def test_close_once() -> None:
    b = buf()
    before = b.last_activity
    b.close()
    assert b.closed
    assert b.last_activity >= before
    with pytest.raises(StreamClosedError):
        b.close()


# -- admission and eviction -----------------------------------------------------------------


def test_no_subscriber_ever_oldest_stays() -> None:
    b = buf(3)
    fill(b, 3)
    assert not b.has_room()
    assert held(b) == [1, 2, 3]


def test_all_subscribers_left_oldest_may_go() -> None:
    b = buf(3)
    fill(b, 3)
    b.add_cursor(A, None)
    assert not b.has_room()
    assert b.remove_cursor(A)
    assert b.has_room()
    assert b.admit(b"e4") == 4
    assert held(b) == [2, 3, 4]
    assert b.base_seq == 2


def test_unacked_oldest_makes_the_buffer_full() -> None:
    b = buf(2)
    b.add_cursor(A, None)
    fill(b, 2)
    assert not b.has_room()
    assert b.ack(A, 1)  # the gate moved
    assert b.has_room()
    b.admit(b"e3")
    assert held(b) == [2, 3]
    assert not b.has_room()


def test_gate_is_the_slowest_cursor() -> None:
    b = buf(2)
    b.add_cursor(A, None)
    b.add_cursor(B, None)
    fill(b, 2)
    assert not b.ack(A, 2)  # B still at 0: the gate does not move
    assert not b.has_room()
    assert b.ack(B, 1)
    assert b.has_room()
    b.admit(b"e3")
    assert not b.has_room()  # B has not acked 2
    assert b.ack(B, 2)
    assert b.has_room()


def test_slow_cursor_leaving_opens_the_gate() -> None:
    b = buf(2)
    b.add_cursor(A, None)
    b.add_cursor(B, None)
    fill(b, 2)
    b.ack(A, 2)
    assert not b.has_room()
    assert b.remove_cursor(B)
    assert b.has_room()
    assert not b.remove_cursor(B)


def test_never_more_than_buffer_size_events() -> None:
    b = buf(3)
    b.add_cursor(A, None)
    for _ in range(20):
        while b.has_room():
            b.admit(f"e{b.next_seq}".encode())
        assert len(b) == 3
        b.ack(A, b.last_seq)
    assert held(b) == [b.last_seq - 2, b.last_seq - 1, b.last_seq]


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 6),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["admit", "ack", "join", "leave"]),
            st.integers(0, 2),
            st.integers(0, 30),
        ),
        max_size=60,
    ),
)
def test_admission_rules_hold_for_any_history(size: int, ops: list[tuple[str, int, int]]) -> None:
    """Never evict what an active cursor has not acked; never hold more than size."""
    b = buf(size)
    clients = [bytes([i + 1]) * 16 for i in range(3)]
    for op, who, n in ops:
        c = clients[who]
        if op == "admit":
            if b.has_room():
                oldest = b.base_seq
                full = len(b) >= size
                b.admit(b"e%d" % b.next_seq)
                if full:
                    assert all(acked >= oldest for acked in b.cursors.values())
                    assert b.ever_subscribed
        elif op == "ack":
            if c in b.cursors:
                before = b.cursors[c]
                b.ack(c, n)
                assert b.cursors[c] >= before
                assert b.cursors[c] <= max(before, b.last_seq)
        elif op == "join":
            from_seq = min(n, b.next_seq) or None  # future from_seq: acks never move it back
            try:
                b.add_cursor(c, from_seq)
            except ReplayUnavailableError:
                assert from_seq is not None and from_seq < b.base_seq
        else:
            b.remove_cursor(c)
        assert len(b) <= size
        assert len(b) == b.next_seq - b.base_seq
        assert held(b) == list(range(b.base_seq, b.next_seq))


# -- cursors ----------------------------------------------------------------------------------


def test_add_cursor_from_oldest_buffered() -> None:
    b = buf(3)
    fill(b, 3)
    b.remove_cursor(A)
    b.add_cursor(A, None)
    b.ack(A, 3)
    fill(b, 2)  # evicts 1, 2
    assert b.add_cursor(B, None) == 3
    assert b.cursors[B] == 2


def test_add_cursor_from_seq() -> None:
    b = buf(5)
    fill(b, 4)
    assert b.add_cursor(A, 3) == 3
    assert b.cursors[A] == 2
    assert b.ever_subscribed
    assert b.slice(3, 10) == [b"e3", b"e4"]


def test_add_cursor_from_zero_or_negative_means_one() -> None:
    b = buf(5)
    fill(b, 2)
    assert b.add_cursor(A, 0) == 1
    assert b.add_cursor(B, -5) == 1


def test_add_cursor_from_future_seq() -> None:
    b = buf(5)
    fill(b, 2)
    assert b.add_cursor(A, 10) == 10


def test_add_cursor_gone_range_names_it() -> None:
    b = buf(2)
    b.add_cursor(A, None)
    fill(b, 2)
    b.ack(A, 2)
    fill(b, 2)  # 1, 2 evicted; holds 3, 4
    assert b.base_seq == 3
    with pytest.raises(ReplayUnavailableError) as info:
        b.add_cursor(B, 2)
    err = info.value
    assert (err.stream_id, err.first_missing, err.last_missing) == ("s", 2, 2)
    with pytest.raises(ReplayUnavailableError) as info:
        b.add_cursor(B, 1)
    assert (info.value.first_missing, info.value.last_missing) == (1, 2)
    assert B not in b.cursors
    assert b.add_cursor(B, 3) == 3


def test_check_available() -> None:
    b = buf(1)
    b.add_cursor(A, None)
    fill(b, 1)
    b.ack(A, 1)
    fill(b, 1)
    b.check_available(2)
    b.check_available(99)
    with pytest.raises(ReplayUnavailableError):
        b.check_available(1)


def test_slice() -> None:
    b = buf(5)
    fill(b, 5)
    assert b.slice(1, 2) == [b"e1", b"e2"]
    assert b.slice(4, 10) == [b"e4", b"e5"]
    assert b.slice(6, 10) == []


# -- acks ------------------------------------------------------------------------------------


def test_ack_clamped_to_last_seq() -> None:
    b = buf(5)
    b.add_cursor(A, None)
    fill(b, 3)
    b.ack(A, 1000)
    assert b.cursors[A] == 3
    fill(b, 1)
    assert b.lagging(A)


def test_ack_never_moves_back() -> None:
    b = buf(5)
    b.add_cursor(A, None)
    fill(b, 3)
    b.ack(A, 2)
    assert not b.ack(A, 1)
    assert b.cursors[A] == 2


def test_ack_of_unknown_client_is_ignored() -> None:
    b = buf(2)
    fill(b, 2)
    assert not b.ack(A, 2)
    assert A not in b.cursors
    assert not b.has_room()


def test_ack_never_moves_back_from_a_future_cursor() -> None:
    b = buf(5)
    b.add_cursor(A, 10)  # cursor at 9 on an empty stream
    b.ack(A, 20)
    assert b.cursors[A] >= 9


def test_lagging() -> None:
    b = buf(5)
    assert not b.lagging(A)
    b.add_cursor(A, None)
    assert not b.lagging(A)
    fill(b, 2)
    assert b.lagging(A)
    b.ack(A, 2)
    assert not b.lagging(A)
    b.close()
    assert b.lagging(A)  # closed: the head (and end) is still worth reporting


# -- publish_parked ---------------------------------------------------------------------


@pytest.mark.parametrize("publish_parked", [False, True])
def test_parked_events_numbered_and_published_as_they_park(publish_parked: bool) -> None:
    # Parked events are admitted in order, so their seqs are known when they park:
    # with publish_parked they are published then (and served to fetches and
    # counted in last_seq), and not again when admitted.
    b = StreamBuffer("s", 2, BackpressurePolicy.BLOCK, publish_parked=publish_parked)
    b.add_cursor(A, 1)
    fill(b, 2)
    b.park(B, 1, b"e3")
    b.park_batch(B, 2, [b"e4", b"e5"])
    first, batch = b.take_unpublished()
    assert (first, batch) == (
        (1, [b"e1", b"e2", b"e3", b"e4", b"e5"]) if publish_parked else (1, [b"e1", b"e2"])
    )
    assert b.last_seq == (5 if publish_parked else 2)
    assert b.slice(2, 10) == ([b"e2", b"e3", b"e4", b"e5"] if publish_parked else [b"e2"])
    assert b.slice(4, 1) == ([b"e4"] if publish_parked else [])
    b.ack(A, 4)  # clamped to last_seq
    assert b.cursors[A] == (4 if publish_parked else 2)
    assert b.lagging(A) is publish_parked  # (4 of 5, or all of 2)
    items = b.unpark_batch(b.room())
    assert b.admit_batch([raw for _, _, raw in items], published=publish_parked) == 2
    assert b.take_unpublished()[1] == ([] if publish_parked else [b"e3", b"e4"])
    assert b.last_seq == (5 if publish_parked else 4)
    b.close()
    if publish_parked:  # (otherwise the broker refuses them: never published)
        nbytes = b.nbytes
        assert [p for _, p, _ in b.admit_parked_closing()] == [3]
        assert (held(b), b.last_seq, b.parked) == ([3, 4, 5], 5, deque())
        assert (b.nbytes, b.held_over) == (nbytes, 1)  # outside the budget, as when parked
