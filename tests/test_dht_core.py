"""The DHT core's story, on an in-memory network under a fake clock."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import wire
from overlay.dht import messages as m
from overlay.dht.record import sign_record
from overlay.identity import Identity, node_id_for
from tests.dhtnet import MemoryNet


def test_every_sampled_node_finds_every_other_by_key():
    net = MemoryNet(seed=1)
    addrs = net.build(50)
    keys = {a: net.nodes[a].public_key for a in addrs}
    rng = random.Random(2)
    hops = []
    for src in rng.sample(addrs, 10):
        for dst in rng.sample(addrs, 10):
            if src == dst:
                continue
            done = net.lookup(src, keys[dst])
            assert done.record is not None, f"{src} could not find {dst}"
            assert done.record.addresses == (dst,)
            hops.append(done.hops)
    assert max(hops) <= 4


def test_records_are_replicated_to_the_k_closest():
    net = MemoryNet(seed=3)
    addrs = net.build(40)
    target = net.nodes[addrs[7]]
    net.run_for(1300)  # one republish interval: late joiners closer to the key get it too
    holders = [a for a in addrs if net.nodes[a].store.get(target.node_id, net.now)]
    assert len(holders) >= 18  # k = 20 of 40 (the owner's own copy counts)


def test_no_reply_larger_than_a_tokenless_request():
    net = MemoryNet(seed=4)
    addrs = net.build(30)
    victim = ("10.9.9.9", 53)  # spoofed source, never verified
    body = {
        "tx": b"\x01" * 8,
        "pk": Identity.generate().public_key,
        "target": bytes(32),
        "rec": True,
    }
    small = m.CODEC.encode(m.FIND, body)
    net.inject(victim, addrs[3], small)
    net.run_for(0.1)
    assert not [d for s, dst, d in net.sent_to if dst == victim], "even the bare reply is larger"
    # A request padded to 400 bytes gets a reply trimmed to fit, and nothing else.
    padded = m.CODEC.encode(m.FIND, {**body, "pad": bytes(400 - len(small) - 7)})
    net.inject(victim, addrs[3], padded)
    net.run_for(0.1)
    replies = [d for s, dst, d in net.sent_to if dst == victim]
    assert len(replies) == 1
    assert len(replies[0]) <= len(padded)
    _schema, reply = m.CODEC.decode(replies[0])
    inner = m.RESPONSE_BODY.validate(wire.unpack(reply["b"]))
    assert 0 < len(inner["nodes"]) < 20  # trimmed, not refused


def test_padded_request_gets_full_reply_and_token_then_no_padding():
    net = MemoryNet(seed=5)
    net.build(30)
    replied: dict[tuple, float] = {}  # (requester, responder) -> when the first reply was sent
    checked = 0
    for when, (src, dst, data) in zip(net.sent_at, net.sent_to, strict=True):
        schema = m.CODEC.decode(data)[0]
        if schema is m.RESPONSE:
            replied.setdefault((dst, src), when)
            continue
        first_reply = replied.get((src, dst))
        if first_reply is not None and when > first_reply + net.latency:
            # The requester holds the responder's token (sent in every reply): no padding.
            assert len(data) < m.PAD_TO, schema.name
            checked += 1
        elif first_reply is None and schema in (m.PING, m.FIND):
            assert len(data) >= m.PAD_TO  # first contact: padded so the reply can be full
    assert checked > 50


def test_requester_enters_table_only_after_proving_its_key():
    net = MemoryNet(seed=6)
    addrs = net.build(20)
    honest = net.nodes[addrs[5]]
    liar_pk = Identity.generate().public_key  # claimed, but the liar holds no such key
    liar = ("10.7.7.7", 7000)
    body = {
        "tx": b"\x02" * 8,
        "pk": liar_pk,
        "target": bytes(32),
        "rec": False,
        "pad": bytes(m.PAD_TO),
    }
    net.inject(liar, addrs[5], m.CODEC.encode(m.FIND, body))
    net.run_for(0.1)
    pings = [d for s, dst, d in net.sent_to if dst == liar and m.CODEC.decode(d)[0] is m.PING]
    assert pings, "the honest node challenges the requester"
    # The liar answers with a response signed by a different key: it must not get in.
    _, ping = m.CODEC.decode(pings[0])
    impostor = Identity.generate()
    inner = wire.pack(
        {"tx": ping["tx"], "pk": liar_pk, "tok": bytes(16), "obs": wire.pack_address(addrs[5])}
    )
    forged = m.CODEC.encode(
        m.RESPONSE, {"b": inner, "s": impostor.sign(m.RESPONSE_CONTEXT + inner)}
    )
    net.inject(liar, addrs[5], forged)
    net.run_for(3)
    assert honest.table.get(node_id_for(liar_pk)) is None
    assert honest.stats.dropped.get("bad-signature", 0) >= 1


def test_store_needs_a_token_bound_to_the_address():
    net = MemoryNet(seed=7)
    addrs = net.build(20)
    owner = Identity.generate()
    rec = sign_record(owner, [("10.5.5.5", 1)], [], 1, int(net.now) + 600)
    body = {"tx": b"\x03" * 8, "pk": owner.public_key, "tok": bytes(16), "rec": rec.to_wire()}
    net.inject(("10.5.5.5", 1), addrs[2], m.CODEC.encode(m.STORE, body))
    net.run_for(0.1)
    assert net.nodes[addrs[2]].store.get(owner.node_id, net.now) is None
    # A token issued to another address does not work from this one either.
    token = net.nodes[addrs[2]]._tokens.issue(("10.5.5.6", 1), net.now)
    body["tok"] = token
    net.inject(("10.5.5.5", 1), addrs[2], m.CODEC.encode(m.STORE, body))
    net.run_for(0.1)
    assert net.nodes[addrs[2]].store.get(owner.node_id, net.now) is None
    body["tok"] = net.nodes[addrs[2]]._tokens.issue(("10.5.5.5", 1), net.now)
    net.inject(("10.5.5.5", 1), addrs[2], m.CODEC.encode(m.STORE, body))
    net.run_for(0.1)
    assert net.nodes[addrs[2]].store.get(owner.node_id, net.now) == rec


def test_lookup_returns_newest_record_not_a_majority():
    net = MemoryNet(seed=8)
    addrs = net.build(30)
    owner_addr = addrs[9]
    owner = net.nodes[owner_addr]
    old = owner.own_record
    # The owner moves: a newer record reaches only a few nodes; the rest still hold the old one.
    owner.set_record_addresses([("10.99.0.1", 4000)], [], net.now)
    net.flush(owner_addr)
    net.run_for(5)
    newest = owner.own_record
    assert newest.seq > old.seq
    for a in addrs:
        if a != owner_addr and net.nodes[a].store.get(owner.node_id, net.now):
            net.nodes[a].store._entries.pop(owner.node_id)
            net.nodes[a].store.put(old, "10.0.0.1", net.now)
    net.nodes[addrs[0]].store._entries.pop(owner.node_id, None)
    net.nodes[addrs[0]].store.put(newest, "10.0.0.1", net.now)
    done = net.lookup(addrs[15], owner.public_key)
    assert done.record.seq == newest.seq


def test_forged_record_in_a_reply_is_ignored():
    net = MemoryNet(seed=9)
    addrs = net.build(25)
    victim = net.nodes[addrs[4]]
    mallory = Identity.generate()
    rec = victim.own_record
    forged_sig = mallory.sign(b"3bc-peer-record-v1" + rec.body)
    # Every other node holds a forged copy: the lookup must still not accept it.
    for a in addrs:
        store = net.nodes[a].store
        if a != addrs[4] and store.get(victim.node_id, net.now) is not None:
            entry = store._entries[victim.node_id]
            entry.record = type(rec)(
                rec.public_key,
                (("10.66.6.6", 6),),
                (),
                rec.seq + 1,
                rec.expires,
                rec.body,
                forged_sig,
            )
    done = net.lookup(addrs[11], victim.public_key)
    assert done.record is None or done.record.signature == rec.signature
    assert net.nodes[addrs[11]].stats.dropped.get("bad-record", 0) >= 1


@settings(max_examples=100)
@given(st.lists(st.binary(max_size=1500), min_size=1, max_size=30))
def test_garbage_is_dropped_and_the_node_keeps_serving(garbage):
    net = MemoryNet(seed=10)
    addrs = net.build(8, settle=5)
    for i, data in enumerate(garbage):
        net.inject(("10.3.3.3", 1000 + i), addrs[1], bytes([m.KIND_DHT]) + data)
    net.run_for(0.1)
    done = net.lookup(addrs[1], net.nodes[addrs[6]].public_key)
    assert done.record is not None


def test_rate_limit_per_source():
    net = MemoryNet(seed=11)
    addrs = net.build(5, settle=5)
    flood = ("10.4.4.4", 4444)
    body = {"tx": b"\x04" * 8, "pk": Identity.generate().public_key}
    for _ in range(1000):
        net.inject(flood, addrs[0], m.CODEC.encode(m.PING, body))
    net.run_for(0.1)
    assert net.nodes[addrs[0]].stats.dropped.get("rate-limited", 0) >= 700


def test_a_lost_store_is_sent_again():
    net = MemoryNet(seed=12)
    addrs = net.build(10, settle=10)
    owner_addr = addrs[4]
    owner = net.nodes[owner_addr]
    lost = []

    def drop_first_stores(src, dst, data):
        if src == owner_addr and m.CODEC.decode(data)[0] is m.STORE and dst not in lost:
            lost.append(dst)
            return True
        return False

    net.drop = drop_first_stores
    owner.publish(net.now)
    net.flush(owner_addr)
    net.run_for(10)
    assert lost, "the publish sent stores"
    for holder in lost:
        assert net.nodes[holder].store.get(owner.node_id, net.now).seq == owner.own_record.seq


def test_bucket_refresh_is_bounded():
    """A joining node refreshes its buckets two per round, none that is full already, and a
    refresh lookup stops once its bucket is full: a joining node must not flood the network."""
    from overlay.dht.core import REFRESHES_PER_ROUND, DhtCore
    from overlay.dht.routing import bucket_index

    T = 1_800_000_000.0  # a wall-clock time: every bucket of a new table is an hour stale
    rng = random.Random(9)
    core = DhtCore(Identity(rng.randbytes(32)), rng=random.Random(1), now=T)
    by_bucket: dict[int, list[Identity]] = {}
    while min(len(by_bucket.get(i, [])) for i in (253, 254, 255)) < 20:
        ident = Identity(rng.randbytes(32))
        by_bucket.setdefault(bucket_index(core.node_id, ident.node_id), []).append(ident)
    address = {}
    for index, count in ((255, 20), (254, 2), (253, 2)):
        for ident in by_bucket[index][:count]:
            address[ident.public_key] = ("10.0.0.1", 1000 + len(address))
            core.table.verified(ident.public_key, address[ident.public_key], T, 0.05)
    core.handle_timeouts(T + 10)  # the first maintenance round: every non-empty bucket is stale
    assert len(core._refreshing) == REFRESHES_PER_ROUND
    assert 255 not in core._refreshing.values()  # full: counted as refreshed, no lookup
    assert core.table.buckets[255].last_touched == T + 10
    refresh_254 = next((lid for lid, i in core._refreshing.items() if i == 254), None)
    assert refresh_254 is not None
    core.datagrams_to_send()
    # Bucket 254 fills up (other traffic); the next answer to its refresh ends the lookup.
    for ident in by_bucket[254][2:20]:
        core.table.verified(ident.public_key, ("10.0.1.1", len(address)), T + 10, 0.05)
        address[ident.public_key] = ("10.0.1.1", len(address))
    pending = next(p for p in core._pending.values() if p.lookup_id == refresh_254)
    ident = next(i for i in address if node_id_for(i) == pending.node_id)
    signer = next(i for b in by_bucket.values() for i in b if i.public_key == ident)
    inner = wire.pack(
        {"tx": pending.tx, "pk": ident, "tok": bytes(16), "obs": wire.pack_address(("10.0.0.9", 1))}
    )
    sig = signer.sign(m.RESPONSE_CONTEXT + inner)
    core.receive(m.CODEC.encode(m.RESPONSE, {"b": inner, "s": sig}), pending.address, T + 10.1)
    assert not core.stats.dropped, core.stats.dropped
    assert refresh_254 not in core._lookups and refresh_254 not in core._refreshing
    assert not [d for _, d in core.datagrams_to_send() if m.CODEC.decode(d)[0] is m.FIND]
