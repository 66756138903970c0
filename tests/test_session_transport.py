"""The transport's story: sealed datagrams open once, in any order, across key epochs; nothing
altered, replayed, stale or foreign is ever accepted, and every refusal is counted."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.identity import Identity
from overlay.session import (
    KIND_TRANSPORT,
    TRANSPORT_OVERHEAD,
    Accepted,
    DropReason,
    Established,
    Initiator,
    LocalProtocolError,
    RemoteProtocolError,
    Responder,
    Session,
    peek_receiver_index,
    transport,
)
from overlay.session.replay import REPLAY_WINDOW, ReplayWindow

ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))
SETTINGS = settings(max_examples=60, deadline=None)


def pair(now: float = 0.0, index: int | None = None) -> tuple[Session, Session]:
    """A fresh (initiator, responder) session pair from a real handshake."""
    initiator = Initiator(ALICE, BOB.public_key, b"", now, timestamp_ns=1, local_index=index)
    accepted = Responder(BOB).receive(initiator.message, "src", now)
    assert isinstance(accepted, Accepted)
    reply = accepted.reply(b"", now, local_index=index)
    established = initiator.receive(reply.message, now)
    assert isinstance(established, Established)
    return established.session, reply.session


def drop_reason(session: Session, packet: bytes, now: float = 0.0) -> DropReason:
    with pytest.raises(RemoteProtocolError) as info:
        session.open(packet, now)
    return info.value.reason


def test_round_trip_both_directions_and_sizes():
    a, b = pair()
    for size in (0, 1, 1200, transport.MAX_PLAINTEXT):
        data = random.Random(size).randbytes(size)
        packet = a.seal(data, 0.0)
        assert len(packet) == size + TRANSPORT_OVERHEAD and packet[0] == KIND_TRANSPORT
        assert b.open(packet, 0.0) == data
        assert a.open(b.seal(data, 0.0), 0.0) == data
    with pytest.raises(LocalProtocolError):
        a.seal(bytes(transport.MAX_PLAINTEXT + 1), 0.0)
    assert a.stats.sent == 4 and b.stats.accepted == 4 and b.stats.total_dropped == 0


def test_peek_receiver_index_routes_every_kind_but_msg1():
    initiator = Initiator(ALICE, BOB.public_key, b"", 0.0, timestamp_ns=1, local_index=77)
    with pytest.raises(RemoteProtocolError):
        peek_receiver_index(initiator.message)  # msg1 goes to the Responder, not by index
    responder = Responder(BOB)
    cookie = responder.receive(initiator.message, "src", 0.0, under_load=True)
    assert peek_receiver_index(cookie.message) == 77
    accepted = Responder(BOB).receive(initiator.message, "src", 0.0)
    assert isinstance(accepted, Accepted)
    reply = accepted.reply(b"", 0.0, local_index=5)
    assert peek_receiver_index(reply.message) == 77
    established = initiator.receive(reply.message, 0.0)
    assert isinstance(established, Established)
    assert peek_receiver_index(established.session.seal(b"x", 0.0)) == 5
    assert peek_receiver_index(reply.session.seal(b"x", 0.0)) == 77


@SETTINGS
@given(st.binary(max_size=64))
def test_peek_never_crashes(data: bytes):
    try:
        index = peek_receiver_index(data)
    except RemoteProtocolError as e:
        assert e.reason in (DropReason.FOREIGN, DropReason.TRUNCATED)
    else:
        assert 0 <= index < 2**32


def test_reordering_within_window_is_accepted_exactly_once():
    a, b = pair()
    packets = [a.seal(i.to_bytes(4, "big"), 0.0) for i in range(300)]
    order = list(range(300))
    random.Random(1).shuffle(order)
    assert [b.open(packets[i], 0.0) for i in order] == [i.to_bytes(4, "big") for i in order]
    for i in order[:20]:
        assert drop_reason(b, packets[i]) is DropReason.REPLAYED
    assert b.stats.accepted == 300 and b.stats.dropped[DropReason.REPLAYED] == 20


@SETTINGS
@given(st.lists(st.integers(0, 63), min_size=1, max_size=150))
def test_any_delivery_sequence_accepts_each_packet_at_most_once(deliveries: list[int]):
    a, b = pair()
    packets = [a.seal(bytes([i]), 0.0) for i in range(64)]
    seen: set[int] = set()
    for i in deliveries:
        if i in seen:
            assert drop_reason(b, packets[i]) is DropReason.REPLAYED
        else:
            assert b.open(packets[i], 0.0) == bytes([i])
            seen.add(i)
    assert b.stats.accepted == len(seen)
    assert b.stats.dropped[DropReason.REPLAYED] == len(deliveries) - len(seen)


def test_packets_behind_the_window_are_too_old():
    a, b = pair()
    first = a.seal(b"early", 0.0)
    for _ in range(REPLAY_WINDOW):
        b.open(a.seal(b"", 0.0), 0.0)
    assert drop_reason(b, first) is DropReason.TOO_OLD


@SETTINGS
@given(position=st.integers(0, 1200 + TRANSPORT_OVERHEAD - 1), flip=st.integers(1, 255))
def test_any_altered_packet_is_dropped_and_the_original_still_opens(position: int, flip: int):
    a, b = pair()
    packet = a.seal(bytes(1200), 0.0)
    altered = bytearray(packet)
    altered[position] ^= flip
    reason = drop_reason(b, bytes(altered))
    assert reason in (
        DropReason.FOREIGN,  # kind byte
        DropReason.UNKNOWN_INDEX,  # receiver index
        DropReason.BAD_EPOCH,  # epoch byte far off
        DropReason.TAMPERED,  # epoch byte nearby, counter, ciphertext
    )
    assert b.stats.dropped[reason] == 1 and b.receive_epoch == 0
    assert b.open(packet, 0.0) == bytes(1200)  # a forgery never marks a counter as seen


@SETTINGS
@given(st.binary(max_size=200), st.integers(0, 200))
def test_random_and_truncated_packets_are_dropped(data: bytes, cut: int):
    a, b = pair()
    with pytest.raises(RemoteProtocolError):
        b.open(data, 0.0)
    with pytest.raises(RemoteProtocolError):
        b.open(bytes([KIND_TRANSPORT]) + data, 0.0)
    packet = a.seal(b"hello", 0.0)
    if cut < len(packet):
        assert drop_reason(b, packet[:cut]) in (DropReason.TRUNCATED, DropReason.TAMPERED)
    assert b.stats.accepted == 0 and b.stats.total_dropped == 2 + (cut < len(packet))


def test_packet_of_another_session_with_the_same_index_is_tampered():
    _, b = pair(index=9)
    other_a, _ = pair(index=9)
    assert drop_reason(b, other_a.seal(b"x", 0.0)) is DropReason.TAMPERED


def test_reflected_packets_are_refused():
    a, _ = pair()
    assert drop_reason(a, a.seal(b"x", 0.0)) is DropReason.UNKNOWN_INDEX
    c, _ = pair(index=9)  # both ends picked index 9: the index matches, the key does not
    assert drop_reason(c, c.seal(b"x", 0.0)) is DropReason.TAMPERED


def test_rekey_by_time_receiver_follows_and_old_keys_go():
    a, b = pair()
    epoch0 = a.seal(b"epoch 0", 0.0)
    late0 = a.seal(b"epoch 0, delayed", 0.0)
    assert b.open(epoch0, 0.0) == b"epoch 0"
    t1 = transport.REKEY_AFTER_SECONDS
    epoch1 = a.seal(b"epoch 1", t1)
    assert a.send_epoch == 1 and a.stats.send_rekeys == 1
    assert b.open(epoch1, t1) == b"epoch 1"
    assert b.receive_epoch == 1 and b.receive_keys_held() == 2
    assert b.open(late0, t1 + 1) == b"epoch 0, delayed"  # reordered across the switch: fine
    straggler = a.seal(b"x", t1)  # same epoch 1
    t2 = 2 * t1
    b.open(a.seal(b"epoch 2", t2), t2)
    assert b.receive_epoch == 2
    b.open(straggler, t2)  # epoch 1 is the previous key now
    assert b.receive_keys_held() == 2
    assert drop_reason(b, epoch0, t2) is DropReason.BAD_EPOCH  # key of epoch 0 is gone
    assert b.stats.receive_rekeys == 2


def test_previous_key_is_wiped_after_its_grace_period():
    a, b = pair()
    t1 = transport.REKEY_AFTER_SECONDS
    before = a.seal(b"old", t1 - 1)
    b.open(a.seal(b"new", t1), t1)
    assert b.receive_keys_held() == 2
    later = t1 + transport.PREVIOUS_KEY_SECONDS
    assert drop_reason(b, before, later) is DropReason.BAD_EPOCH
    assert b.receive_keys_held() == 1


def test_rekey_by_message_count(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(transport, "REKEY_AFTER_MESSAGES", 4)
    a, b = pair()
    for i in range(12):
        assert b.open(a.seal(bytes([i]), 0.0), 0.0) == bytes([i])
    assert a.send_epoch == 2 and b.receive_epoch == 2


def test_receiver_catches_up_over_lost_epochs_but_not_too_far():
    a, b = pair()
    period = transport.REKEY_AFTER_SECONDS
    for k in range(1, transport.MAX_EPOCH_LOOKAHEAD + 1):
        a.seal(b"lost", k * period)
    assert b.open(a.seal(b"arrives", 2 * period + 1), 2 * period + 1) == b"arrives"
    assert b.receive_epoch == transport.MAX_EPOCH_LOOKAHEAD
    for k in range(3, 3 + transport.MAX_EPOCH_LOOKAHEAD + 1):
        a.seal(b"lost", k * period)
    now = (3 + transport.MAX_EPOCH_LOOKAHEAD) * period
    assert drop_reason(b, a.seal(b"too far", now), now) is DropReason.BAD_EPOCH


def test_forged_packet_cannot_move_the_receiver_epoch():
    a, b = pair()
    packet = bytearray(a.seal(b"x", 0.0))
    packet[5] = 1  # claim epoch 1
    assert drop_reason(b, bytes(packet)) is DropReason.TAMPERED
    assert b.receive_epoch == 0 and b.receive_keys_held() == 1


def test_epoch_byte_wraps_around_in_long_calls():
    a, b = pair()
    period = transport.REKEY_AFTER_SECONDS
    for k in range(300):
        assert b.open(a.seal(b"tick", k * period), k * period) == b"tick"
    assert a.send_epoch == b.receive_epoch == 299


def test_hard_limits_refuse_to_send_and_to_receive(monkeypatch: pytest.MonkeyPatch):
    a, b = pair()
    end = transport.REJECT_AFTER_SECONDS
    packet = a.seal(b"x", end - 1)
    assert not a.wants_rehandshake(transport.REHANDSHAKE_AFTER_SECONDS - 1)
    assert a.wants_rehandshake(transport.REHANDSHAKE_AFTER_SECONDS)
    with pytest.raises(LocalProtocolError):
        a.seal(b"x", end)
    assert drop_reason(b, packet, end) is DropReason.EXPIRED
    monkeypatch.setattr(transport, "REJECT_AFTER_MESSAGES", 2)
    c, d = pair()
    d.open(c.seal(b"1", 0.0), 0.0)
    d.open(c.seal(b"2", 0.0), 0.0)
    with pytest.raises(LocalProtocolError):
        c.seal(b"3", 0.0)


# -- the replay window against a model ------------------------------------------------------


def test_replay_window_in_order_stream_past_the_trim_point():
    """In-order counters (the per-packet case) grow the bitmap until it is trimmed: the window's
    edges must hold on both sides of every trim."""
    window = ReplayWindow()
    for counter in range(3 * REPLAY_WINDOW + 7):
        window.accept(counter)
        if counter % 509 == 0 or counter > 3 * REPLAY_WINDOW:
            for seen in (counter, counter - REPLAY_WINDOW + 1):
                if seen >= 0:
                    with pytest.raises(RemoteProtocolError) as info:
                        window.check(seen)
                    assert info.value.reason is DropReason.REPLAYED
            if counter >= REPLAY_WINDOW:
                with pytest.raises(RemoteProtocolError) as info:
                    window.check(counter - REPLAY_WINDOW)
                assert info.value.reason is DropReason.TOO_OLD


@SETTINGS
@given(st.lists(st.integers(0, 6000) | st.integers(0, 2**64 - 1), max_size=200))
def test_replay_window_matches_a_simple_model(counters: list[int]):
    window = ReplayWindow()
    seen: set[int] = set()
    for counter in counters:
        top = max(seen, default=-1)
        try:
            window.accept(counter)
        except RemoteProtocolError as e:
            if counter in seen:
                assert e.reason in (DropReason.REPLAYED, DropReason.TOO_OLD)
            else:
                assert e.reason is DropReason.TOO_OLD and counter <= top - REPLAY_WINDOW
        else:
            assert counter not in seen and counter > top - REPLAY_WINDOW
            seen.add(counter)
    assert window.highest == max(seen, default=-1)
