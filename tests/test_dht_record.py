import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay import wire
from overlay.dht.record import (
    MAX_TTL,
    RecordError,
    check_fresh,
    parse_record,
    sign_record,
)
from overlay.dht.store import RecordStore, StoreRejected
from overlay.identity import Identity

NOW = 1_800_000_000
ALICE = Identity(bytes(range(32)))
MALLORY = Identity(bytes(range(1, 33)))


def record(seq=1, expires=NOW + 600, addrs=(("203.0.113.5", 30956),), who=ALICE):
    return sign_record(who, list(addrs), [(MALLORY.public_key, ("::1", 9))], seq, expires)


def test_round_trip_ipv4_ipv6_and_relays():
    rec = record(addrs=(("203.0.113.5", 1), ("2001:db8::1", 2)))
    again = parse_record(rec.to_wire())
    assert again == rec
    assert again.addresses == (("203.0.113.5", 1), ("2001:db8::1", 2))
    assert again.relays == ((MALLORY.public_key, ("::1", 9)),)


def test_forged_record_is_rejected():
    rec = record()
    # Mallory signs a body that names Alice's key: the signature is Mallory's, not Alice's.
    forged_sig = MALLORY.sign(b"3bc-peer-record-v1" + rec.body)
    with pytest.raises(RecordError, match="signature"):
        parse_record([rec.body, forged_sig])


@given(st.integers(0, 200), st.integers(0, 255))
def test_any_tampered_byte_is_rejected(position, value):
    rec = record()
    blob = bytearray(rec.body + rec.signature)
    position %= len(blob)
    if blob[position] == value:
        value ^= 1
    blob[position] = value
    body, sig = bytes(blob[: len(rec.body)]), bytes(blob[len(rec.body) :])
    with pytest.raises(RecordError):
        parse_record([body, sig])


@given(st.lists(st.binary(max_size=700), max_size=3))
def test_random_records_give_typed_errors(value):
    with pytest.raises(RecordError):
        parse_record(value)


def test_expired_and_far_future_records_rejected():
    with pytest.raises(RecordError, match="expired"):
        check_fresh(record(expires=NOW - 1), NOW)
    with pytest.raises(RecordError, match="future"):
        check_fresh(record(expires=NOW + MAX_TTL + 3600), NOW)
    check_fresh(record(), NOW)


def test_store_keeps_newest_and_rejects_replays():
    store = RecordStore()
    store.put(record(seq=5), "203.0.113.9", NOW)
    with pytest.raises(StoreRejected, match="older"):
        store.put(record(seq=4), "203.0.113.9", NOW)
    with pytest.raises(StoreRejected, match="same sequence"):
        store.put(record(seq=5, addrs=(("203.0.113.66", 1),)), "203.0.113.9", NOW)
    store.put(record(seq=5), "203.0.113.9", NOW)  # the same record again is fine
    store.put(record(seq=6, addrs=(("203.0.113.7", 7),)), "203.0.113.10", NOW)
    assert store.get(ALICE.node_id, NOW).seq == 6
    assert store.get(ALICE.node_id, NOW + 601) is None
    with pytest.raises(RecordError, match="expired"):
        store.put(record(seq=9, expires=NOW - 5), "203.0.113.9", NOW)


def test_store_quota_per_source_and_total():
    store = RecordStore(max_records=3, max_per_source=2)
    people = [Identity(bytes([i]) * 32) for i in range(5)]
    store.put(record(who=people[0]), "203.0.113.1", NOW)
    store.put(record(who=people[1]), "203.0.113.1", NOW)
    with pytest.raises(StoreRejected, match="quota"):
        store.put(record(who=people[2]), "203.0.113.1", NOW)
    store.put(record(who=people[2]), "203.0.113.2", NOW)
    with pytest.raises(StoreRejected, match="full"):
        store.put(record(who=people[3]), "203.0.113.3", NOW)
    assert len(store) == 3


def test_address_count_is_bounded():
    rec = record(addrs=tuple(("203.0.113.1", p) for p in range(1, 10)))
    assert len(rec.addresses) == 4
    with pytest.raises(RecordError):
        body = wire.pack(
            {
                "pk": ALICE.public_key,
                "addrs": [[bytes(4), 1]] * 9,
                "relays": [],
                "seq": 1,
                "exp": NOW,
            }
        )
        parse_record([body, ALICE.sign(b"3bc-peer-record-v1" + body)])
