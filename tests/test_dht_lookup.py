"""The lookup state machine on its own: how disjoint paths share out the nodes they query."""

from hypothesis import given
from hypothesis import strategies as st

from overlay.dht.lookup import Lookup
from overlay.dht.record import sign_record
from overlay.identity import Identity

OWNER = Identity(bytes([7]) * 32)
RECORD = sign_record(OWNER, [("203.0.113.7", 7)], [], 1, 2_000_000_000)


def people(n: int, offset: int = 0) -> list[Identity]:
    return [Identity(bytes([offset + i + 1]) * 32) for i in range(n)]


def contact(ident: Identity) -> tuple[bytes, tuple[str, int]]:
    return ident.public_key, ("203.0.113.1", 1000 + ident.seed[0])


def test_record_holders_heard_of_by_two_paths_serve_both():
    """Both paths learn of the same four holders; each path may query the ones the other has not
    queried, so each gets its two records. (Claiming a node when a path first hears of it gave
    all four to one path and left the other searching until it ran out of candidates.)"""
    a, b = people(2)
    holders = people(4, offset=10)
    lk = Lookup(
        1,
        OWNER.node_id,
        [contact(a), contact(b)],
        self_id=bytes(32),
        k=20,
        alpha=2,
        paths=2,
        want_record=True,
        started=0.0,
    )
    first = {c.node_id for c in lk.next_queries()}
    assert first == {a.node_id, b.node_id}
    lk.on_response(a.node_id, [contact(h) for h in holders], None)
    lk.on_response(b.node_id, [contact(h) for h in holders], None)
    asked = lk.next_queries()
    assert len(asked) == 4 and len({c.node_id for c in asked}) == 4, "no holder asked twice"
    for cand in asked:
        lk.on_response(cand.node_id, [], RECORD)
    assert lk.done
    assert lk.record is not None and lk.queries == 6
    assert lk.hops() == 2


@given(st.lists(st.integers(0, 15), min_size=1, max_size=40), st.integers(1, 3))
def test_no_node_is_queried_twice(replies, paths):
    """Whatever the replies say, every node is queried at most once per lookup, by one path."""
    pool = people(16, offset=30)
    lk = Lookup(
        1,
        OWNER.node_id,
        [contact(p) for p in pool[:3]],
        self_id=bytes(32),
        k=8,
        alpha=2,
        paths=paths,
        want_record=False,
        started=0.0,
    )
    queried: list[bytes] = []
    pending = lk.next_queries()
    for pick in replies:
        if not pending:
            break
        cand = pending.pop(0)
        queried.append(cand.node_id)
        lk.on_response(cand.node_id, [contact(p) for p in pool[pick : pick + 4]], None)
        pending.extend(lk.next_queries())
    queried.extend(c.node_id for c in pending)
    assert len(queried) == len(set(queried))
