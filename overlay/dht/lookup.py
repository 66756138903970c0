"""An iterative lookup over disjoint paths (S/Kademlia), as a plain state machine.

The seeds are dealt round-robin to `paths` independent shortlists. Each path learns contacts only
from the nodes it queried itself, and no node is queried by two paths, so an adversary on one path
cannot steer the others. Each path keeps `alpha` queries in flight and ends when its k closest
candidates have all answered or failed.

A node is claimed by the path that queries it, not by the first path that hears of it: record
holders sit together around the target, and the path that got there first used to claim every one
of them, leaving the others to search on without a record until they ran dry (simulations/README,
finding 12).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from overlay.dht.record import PeerRecord
from overlay.dht.routing import distance
from overlay.identity import node_id_for
from overlay.wire import Address

RECORDS_PER_PATH = 2
_by_distance = operator.attrgetter("distance")


@dataclass
class Candidate:
    public_key: bytes
    address: Address
    depth: int
    distance: int  # XOR distance to the lookup's target: the shortlist's sort key
    node_id: bytes
    state: str = "new"  # new -> asked -> answered | failed; new -> taken (another path asked it)


@dataclass
class _Path:
    candidates: list[Candidate] = field(default_factory=list)
    known: set[bytes] = field(default_factory=set)  # node ids on this path's shortlist
    in_flight: int = 0
    # A record lookup's path ends once RECORDS_PER_PATH holders answered with a valid record
    # (Kademlia stops at the first value): every disjoint path brings its own and the newest
    # wins, so neither one liar nor one stale holder decides the answer.
    satisfied: bool = False
    records: int = 0


class Lookup:
    def __init__(
        self,
        lookup_id: int,
        target: bytes,
        seeds: list[tuple[bytes, Address]],
        *,
        self_id: bytes,
        k: int,
        alpha: int,
        paths: int,
        want_record: bool,
        started: float,
    ) -> None:
        self.id = lookup_id
        self.target = target
        self.self_id = self_id
        self.k = k
        self.alpha = alpha
        self.want_record = want_record
        self.started = started
        self.queries = 0
        self.record: PeerRecord | None = None
        self.record_depth = 0
        self.stale_holders: list[bytes] = []  # node ids that returned an older record
        self._holders: dict[bytes, int] = {}  # node id -> seq it returned
        self._paths = [_Path() for _ in range(max(1, paths))]
        self._asked_by: dict[bytes, int] = {}  # node id -> the path that queried it
        self._target_int = int.from_bytes(target, "big")
        ordered = sorted(seeds, key=lambda s: distance(node_id_for(s[0]), target))
        for i, (pk, addr) in enumerate(ordered):
            self._add(i % len(self._paths), [(pk, addr)], 1)

    def _add(self, path: int, contacts: list[tuple[bytes, Address]], depth: int) -> None:
        p = self._paths[path]
        added = False
        known, asked = p.known, self._asked_by
        for public_key, address in contacts:
            node_id = node_id_for(public_key)
            if node_id == self.self_id or node_id in known or node_id in asked:
                continue
            known.add(node_id)
            dist = int.from_bytes(node_id, "big") ^ self._target_int
            p.candidates.append(Candidate(public_key, address, depth, dist, node_id))
            added = True
        if not added:
            return
        p.candidates.sort(key=_by_distance)
        # Only the closest few matter; forgetting the rest bounds memory under hostile replies.
        limit = 4 * self.k
        if len(p.candidates) > limit:
            for dropped in p.candidates[limit:]:
                if dropped.state == "new":
                    known.discard(dropped.node_id)
            p.candidates = [c for i, c in enumerate(p.candidates) if i < limit or c.state != "new"]

    def next_queries(self) -> list[Candidate]:
        out: list[Candidate] = []
        asked = self._asked_by
        for index, p in enumerate(self._paths):
            if p.satisfied:
                continue
            live = 0  # walks the k closest candidates that have not failed
            for cand in p.candidates:
                if p.in_flight >= self.alpha:
                    break
                state = cand.state
                if state == "new" and cand.node_id in asked:
                    state = cand.state = "taken"
                if state == "failed" or state == "taken":
                    continue
                live += 1
                if live > self.k:
                    break
                if state == "new":
                    asked[cand.node_id] = index
                    cand.state = "asked"
                    p.in_flight += 1
                    self.queries += 1
                    out.append(cand)
        return out

    def _find(self, node_id: bytes) -> tuple[_Path, Candidate] | None:
        path = self._asked_by.get(node_id)
        if path is None:
            return None
        p = self._paths[path]
        for c in p.candidates:
            if c.node_id == node_id and c.state != "taken":
                return p, c
        return None

    def on_response(
        self, node_id: bytes, contacts: list[tuple[bytes, Address]], record: PeerRecord | None
    ) -> None:
        found = self._find(node_id)
        if found is None:
            return
        p, cand = found
        if cand.state != "asked":
            return
        cand.state = "answered"
        p.in_flight -= 1
        self._add(self._asked_by[node_id], contacts, cand.depth + 1)
        if record is not None and record.node_id == self.target:
            p.records += 1
            p.satisfied = p.records >= RECORDS_PER_PATH
            self._holders[node_id] = record.seq
            if self.record is None or record.seq > self.record.seq:
                self.record = record
                self.record_depth = cand.depth
            elif record.seq == self.record.seq and self.record_depth == 0:
                self.record_depth = cand.depth  # our own stored copy, confirmed by the network

    def on_failure(self, node_id: bytes) -> None:
        found = self._find(node_id)
        if found is None:
            return
        p, cand = found
        if cand.state == "asked":
            cand.state = "failed"
            p.in_flight -= 1

    @property
    def done(self) -> bool:
        for p in self._paths:
            if p.satisfied:
                continue
            if p.in_flight:
                return False
            asked = self._asked_by
            live = [
                c
                for c in p.candidates
                if c.state not in ("failed", "taken")
                and not (c.state == "new" and c.node_id in asked)
            ][: self.k]
            if any(c.state == "new" for c in live):
                return False
        return True

    def closest_answered(self) -> list[Candidate]:
        answered = [c for p in self._paths for c in p.candidates if c.state == "answered"]
        answered.sort(key=_by_distance)
        return answered[: self.k]

    def hops(self) -> int:
        if self.record is not None:
            return self.record_depth
        best = self.closest_answered()
        return best[0].depth if best else 0

    def outdated_holders(self) -> list[bytes]:
        """Nodes that answered with no record or an older one: worth a store of the newest."""
        if self.record is None:
            return []
        seq = self.record.seq
        return [
            c.node_id for c in self.closest_answered() if self._holders.get(c.node_id, -1) < seq
        ]
