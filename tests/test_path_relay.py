"""The relay's story, in memory: two members join through a token round trip, the relay forwards
ciphertext both ways within its limits, strangers can neither inject nor hijack, idle pairs expire.
"""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.path import relay as r
from overlay.path.errors import LocalPathError, RelayParseError
from overlay.ratelimit import Budget

MAX = r.MAX_DATA_SIZE
RELAY = ("203.0.113.30", 7000)
ALICE = ("203.0.113.10", 40001)
BOB = ("203.0.113.20", 40002)
MALLORY = ("203.0.113.66", 40666)
SECRET = bytes(range(32))


def deliver(server: r.RelayServer, client: r.RelayClient, data: bytes, source, now: float):
    """Send `data` from `source` to the relay; feed replies for `source` back to `client`."""
    events = []
    for out in server.receive(data, source, now):
        if out.addr == source:
            events += client.receive(out.data, RELAY, now)
            for again in client.take_outgoing():
                events += deliver(server, client, again, source, now)
    return events


def joined_pair(now: float = 100.0, **limits):
    server = r.RelayServer(**limits)
    alice = r.RelayClient(SECRET, 0, RELAY)
    bob = r.RelayClient(SECRET, 1, RELAY)
    assert deliver(server, alice, alice.start(now), ALICE, now) == [r.JoinedEvent(False)]
    assert deliver(server, bob, bob.start(now), BOB, now) == [r.JoinedEvent(True)]
    return server, alice, bob


def test_join_needs_a_token_round_trip_and_answers_smaller() -> None:
    server = r.RelayServer()
    alice = r.RelayClient(SECRET, 0, RELAY)
    first = alice.start(0.0)
    out = server.receive(first, ALICE, 0.0)
    assert len(out) == 1 and len(out[0].data) < len(first)
    assert isinstance(r.parse(out[0].data), r.Token)
    assert server.pair_count == 0  # no state before the token comes back
    assert alice.receive(out[0].data, RELAY, 0.0) == []
    (second,) = alice.take_outgoing()
    (reply,) = server.receive(second, ALICE, 0.0)
    assert len(reply.data) < len(second)
    assert alice.receive(reply.data, RELAY, 0.0) == [r.JoinedEvent(False)]
    assert server.members(alice.pair_id) == (ALICE, None)


def test_both_peers_derive_the_same_pair_id() -> None:
    assert (
        r.PairCredentials.derive(SECRET, 0).pair_id == r.PairCredentials.derive(SECRET, 1).pair_id
    )
    assert (
        r.PairCredentials.derive(os.urandom(32), 0).pair_id
        != r.PairCredentials.derive(SECRET, 0).pair_id
    )


def test_data_is_forwarded_both_ways_unchanged() -> None:
    server, alice, bob = joined_pair()
    packet = alice.wrap(b"\xe3sealed")
    (out,) = server.receive(packet, ALICE, 101.0)
    assert out == r.Outgoing(packet, BOB)
    assert bob.receive(out.data, RELAY, 101.0) == [r.DataEvent(b"\xe3sealed")]
    (back,) = server.receive(bob.wrap(b"\xe3reply"), BOB, 101.0)
    assert back.addr == ALICE
    assert alice.receive(back.data, RELAY, 101.0) == [r.DataEvent(b"\xe3reply")]
    assert server.stats.forwarded_packets == 2


def test_a_stranger_cannot_inject_data() -> None:
    server, alice, _ = joined_pair()
    assert server.receive(alice.wrap(b"evil"), MALLORY, 101.0) == []
    assert server.stats.dropped_unknown == 1


def test_a_stranger_cannot_take_a_slot_without_the_member_key() -> None:
    server, alice, _ = joined_pair()
    mallory = r.RelayClient(os.urandom(32), 0, RELAY)
    # Mallory replays Alice's JOIN from her own address: token bound to Alice's address.
    join = r.parse(alice.rejoin(102.0))
    (token_reply,) = server.receive(join.encode(), MALLORY, 102.0)
    token = r.parse(token_reply.data).token
    # With a valid token for her address, she still cannot sign for Alice's slot.
    forged = r.Join(join.pair_id, 0, join.pk0, join.pk1, join.seq + 1, token, join.signature)
    assert server.receive(forged.encode(), MALLORY, 102.0) == []
    # Nor claim the pair id with keys of her own (the id commits to the members' keys).
    own = r.parse(mallory._join(102.0))
    squat = r.Join(alice.pair_id, 0, own.pk0, own.pk1, own.seq, token, own.signature)
    assert server.receive(squat.encode(), MALLORY, 102.0) == []
    assert server.members(alice.pair_id) == (ALICE, BOB)
    assert server.stats.dropped_bad_join == 2


def test_an_old_join_replayed_after_roaming_is_refused() -> None:
    server, alice, bob = joined_pair()
    old_join = alice.take_outgoing() or None
    assert old_join is None
    # Alice's last JOIN as sent (seq s); she then roams to a new address with a higher seq.
    captured = alice._join(103.0)
    server.receive(captured, ALICE, 103.0)
    new_addr = ("203.0.113.11", 41000)
    assert deliver(server, alice, alice.rejoin(104.0), new_addr, 104.0) == [r.JoinedEvent(True)]
    assert server.members(alice.pair_id) == (new_addr, BOB)
    # The captured JOIN (valid token for ALICE, lower seq) cannot move the slot back.
    assert server.receive(captured, ALICE, 104.5) == []
    assert server.members(alice.pair_id) == (new_addr, BOB)
    (out,) = server.receive(bob.wrap(b"x"), BOB, 105.0)
    assert out.addr == new_addr


def test_rate_limits_per_pair() -> None:
    server, alice, _ = joined_pair(pair_packets_per_second=10.0, pair_bytes_per_second=1e9)
    forwarded = sum(len(server.receive(alice.wrap(b"p"), ALICE, 200.0)) for _ in range(50))
    assert forwarded == 10
    assert server.stats.dropped_rate == 40
    # A second later the bucket has refilled.
    assert server.receive(alice.wrap(b"p"), ALICE, 201.0)


def test_byte_limit_per_pair() -> None:
    server, alice, _ = joined_pair(pair_packets_per_second=1e9, pair_bytes_per_second=1000.0)
    big = alice.wrap(bytes(400))
    forwarded = sum(len(server.receive(big, ALICE, 200.0)) for _ in range(5))
    assert forwarded == 2  # 2 x 417 bytes fit in 1000


def test_total_limit_spans_pairs_and_refunds_the_pair() -> None:
    server, alice, _ = joined_pair(
        pair_packets_per_second=1e9,
        pair_bytes_per_second=1e12,
        total_mbit=0.03,  # 6 packets/s
    )
    carol = r.RelayClient(bytes(32), 0, RELAY)
    dave = r.RelayClient(bytes(32), 1, RELAY)
    carol_addr, dave_addr = ("203.0.113.40", 1), ("203.0.113.41", 2)
    deliver(server, carol, carol.start(200.0), carol_addr, 200.0)
    deliver(server, dave, dave.start(200.0), dave_addr, 200.0)
    first = sum(len(server.receive(alice.wrap(b"p"), ALICE, 200.0)) for _ in range(4))
    second = sum(len(server.receive(carol.wrap(b"p"), carol_addr, 200.0)) for _ in range(4))
    assert (first, second) == (4, 2)  # six for the whole relay, whichever pair asks
    assert server.stats.dropped_rate == 2
    pair = server._pairs[carol.pair_id]
    assert pair.budget.packets == pytest.approx(1e9 - 2)  # refused packets cost the pair nothing


@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.integers(17, MAX)), min_size=1, max_size=60))
def test_budget_never_allows_more_than_rate_times_time_plus_burst(steps) -> None:
    budget = Budget(packet_rate=5.0, byte_rate=4000.0, now=0.0)
    now, packets, sent_bytes = 0.0, 0, 0
    for gap, size in steps:
        now += gap
        if budget.allow(now, size):
            packets += 1
            sent_bytes += size
        assert packets <= 5.0 * (1 + now)
        assert sent_bytes <= 4000.0 * (1 + now)
        assert 0 <= budget.packets <= 5.0 and 0 <= budget.bytes <= 4000.0


def test_max_pairs_and_per_ip_limit() -> None:
    server = r.RelayServer(max_pairs=3, max_pairs_per_ip=2)
    for i in range(3):
        client = r.RelayClient(os.urandom(32), 0, RELAY)
        source = ("203.0.113.40", 5000 + i)
        deliver(server, client, client.start(0.0), source, 0.0)
    assert server.pair_count == 2  # the third from the same IP was refused
    other = r.RelayClient(os.urandom(32), 0, RELAY)
    deliver(server, other, other.start(0.0), ("203.0.113.41", 5000), 0.0)
    full = r.RelayClient(os.urandom(32), 0, RELAY)
    assert deliver(server, full, full.start(0.0), ("203.0.113.42", 5000), 0.0) == []
    assert server.pair_count == 3
    assert server.stats.dropped_full == 2


def test_idle_pairs_expire_and_keepalives_keep_them() -> None:
    server, alice, _bob = joined_pair(now=0.0)
    stale = r.RelayClient(os.urandom(32), 0, RELAY)
    deliver(server, stale, stale.start(0.0), MALLORY, 0.0)
    now = 0.0
    while now < 300.0:
        now += r.KEEPALIVE_SECONDS
        out, _ = alice.handle_timeout(now)
        for data in out:
            server.receive(data, ALICE, now)
        deadline = server.poll_timeout()
        if deadline is not None and deadline <= now:
            server.handle_timeout(now)
    assert server.members(alice.pair_id) == (ALICE, BOB)
    assert server.members(stale.pair_id) is None
    assert server.stats.pairs_expired == 1


def test_client_retries_join_then_reports_failure() -> None:
    client = r.RelayClient(SECRET, 1, RELAY)
    client.start(0.0)
    sent, failed = 0, []
    now = 0.0
    while client.poll_timeout() is not None:
        now = client.poll_timeout()  # type: ignore[assignment]
        out, events = client.handle_timeout(now)
        sent += len(out)
        failed += events
    assert sent == r.JOIN_ATTEMPTS - 1
    assert failed == [r.JoinFailedEvent()]


def test_client_ignores_datagrams_not_from_its_relay_or_pair() -> None:
    _, alice, bob = joined_pair()
    packet = alice.wrap(b"x")
    assert bob.receive(packet, MALLORY, 0.0) == []
    other = r.RelayClient(os.urandom(32), 0, RELAY)
    assert bob.receive(other.wrap(b"x"), RELAY, 0.0) == []


def test_misuse_is_a_local_error() -> None:
    for bad in (
        lambda: r.PairCredentials.derive(b"short", 0),
        lambda: r.PairCredentials.derive(SECRET, 2),
        lambda: r.RelayClient(SECRET, 0, RELAY).wrap(bytes(r.MAX_DATA_SIZE)),
    ):
        try:
            bad()
        except LocalPathError:
            continue
        raise AssertionError("expected LocalPathError")


@given(st.binary(max_size=300))
def test_parse_rejects_garbage_with_a_typed_error(data: bytes) -> None:
    try:
        message = r.parse(data)
    except RelayParseError:
        return
    assert message.encode() == data  # whatever parses, re-encodes to the same bytes


@given(st.sampled_from(list(r.Kind)), st.binary(max_size=200))
def test_each_kind_with_random_body(kind: r.Kind, body: bytes) -> None:
    data = bytes([kind]) + body
    with contextlib.suppress(RelayParseError):
        r.parse(data)


@given(st.binary(max_size=300), st.sampled_from([ALICE, MALLORY, ("not an ip", 1)]))
def test_server_survives_anything_and_never_amplifies(data: bytes, source) -> None:
    server, _, _ = joined_pair()
    for out in server.receive(data, source, 150.0):
        # Replies go back to an unverified source only if smaller; forwards are the same size.
        assert len(out.data) <= len(data)
