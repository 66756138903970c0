from hypothesis import given
from hypothesis import strategies as st

from overlay.dht.routing import MAX_FAILURES, RoutingTable, bucket_index, distance
from overlay.identity import Identity

SELF = Identity(bytes(32))
keys = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=120, unique=True)


def public_keys(seeds):
    return [Identity(s).public_key for s in seeds]


@given(keys, st.integers(1, 20))
def test_table_invariants(seeds, k):
    table = RoutingTable(SELF.node_id, k)
    for i, pk in enumerate(public_keys(seeds)):
        table.verified(pk, ("203.0.113.1", 1000 + i), float(i), 0.01)
    seen = set()
    for index, bucket in enumerate(table.buckets):
        assert len(bucket.contacts) <= k
        for c in bucket.contacts:
            assert bucket_index(SELF.node_id, c.node_id) == index
            assert c.node_id not in seen
            seen.add(c.node_id)
    assert len(table) == len(seen)
    target = Identity(seeds[0]).node_id
    closest = table.closest(target, 10)
    dists = [distance(c.node_id, target) for c in closest]
    assert dists == sorted(dists)
    assert all(distance(c.node_id, target) >= dists[-1] for c in table if c not in closest)


def test_failing_contact_replaced_from_cache():
    table = RoutingTable(SELF.node_id, 1)
    pks = [Identity(bytes([i]) * 32).public_key for i in range(1, 60)]
    # Find two keys that land in the same bucket.
    by_bucket = {}
    for pk in pks:
        from overlay.identity import node_id_for

        by_bucket.setdefault(bucket_index(SELF.node_id, node_id_for(pk)), []).append(pk)
    a, b = next(v for v in by_bucket.values() if len(v) >= 2)[:2]
    table.verified(a, ("203.0.113.1", 1), 0.0, None)
    table.verified(b, ("203.0.113.1", 2), 1.0, None)
    assert [c.public_key for c in table] == [a]
    from overlay.identity import node_id_for

    for _ in range(MAX_FAILURES):
        table.failed(node_id_for(a))
    assert [c.public_key for c in table] == [b]


def test_self_never_enters():
    table = RoutingTable(SELF.node_id)
    table.verified(SELF.public_key, ("203.0.113.1", 1), 0.0, None)
    assert len(table) == 0


@given(keys, st.binary(min_size=32, max_size=32), st.integers(1, 60), st.data())
def test_closest_equals_sorting_the_whole_table(seeds, target, count, data):
    """`closest` walks buckets in distance order; it must give exactly the full sort's answer,
    failing contacts excluded, for targets anywhere (our own id and our bucket neighbours too)."""
    table = RoutingTable(SELF.node_id, 20)
    for i, pk in enumerate(public_keys(seeds)):
        table.verified(pk, ("203.0.113.1", 1000 + i), float(i), 0.01)
    for c in table:
        c.failures = data.draw(st.sampled_from([0, 0, 0, MAX_FAILURES]))
    near = data.draw(st.sampled_from([target, SELF.node_id, *[c.node_id for c in table][:3]]))
    for live_only in (True, False):
        pool = [c for c in table if not live_only or c.failures < MAX_FAILURES]
        want = sorted(pool, key=lambda c: distance(c.node_id, near))[:count]
        assert table.closest(near, count, live_only=live_only) == want
