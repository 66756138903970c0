"""The Kademlia routing table: k-buckets of verified contacts, by XOR distance of node ids.

Only contacts that answered a signed response to our random transaction id get in, so every entry
is a key holder that was reachable at that address. Full buckets keep a replacement cache and
prefer long-lived contacts, as in the Kademlia paper (old nodes are the likeliest to stay).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from overlay.identity import NODE_ID_SIZE, node_id_for
from overlay.wire import Address, pack_address

K = 20  # bucket size and replication factor (Kademlia paper; BitTorrent's 8 is for far more churn)
ID_BITS = NODE_ID_SIZE * 8
# A contact that missed this many queries in a row is taken as gone.
MAX_FAILURES = 2
# A contact that answers pings but keeps ignoring lookups is useless (or hostile: the "drop"
# Sybil of simulations/dht_attack.py); after this many unanswered FINDs it leaves lookups.
MAX_LOOKUP_FAILURES = 3


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def bucket_index(self_id: bytes, other: bytes) -> int:
    """Bucket i holds ids at distance [2^i, 2^(i+1))."""
    return distance(self_id, other).bit_length() - 1


@dataclass(slots=True)  # one per table entry, thousands per node at scale: no per-instance dict
class Contact:
    public_key: bytes
    address: Address
    last_seen: float
    failures: int = 0
    lookup_failures: int = 0
    rtt: float | None = None
    relay: bool = False  # it serves as a blind relay (said in its signed replies)
    node_id: bytes = field(init=False)
    id_int: int = field(init=False)  # node_id as an int: every FIND we answer sorts by XOR
    _wire: list[Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.node_id = node_id_for(self.public_key)
        self.id_int = int.from_bytes(self.node_id, "big")

    def wire_entry(self) -> list[Any]:
        """[public key, packed address] as a FIND reply carries it; built once per address."""
        if self._wire is None:
            self._wire = [self.public_key, pack_address(self.address)]
        return self._wire

    def observe_rtt(self, sample: float) -> None:
        self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample


@dataclass
class Bucket:
    contacts: list[Contact] = field(default_factory=list)  # least recently seen first
    replacements: list[Contact] = field(default_factory=list)
    last_touched: float = 0.0


# Stands in for every bucket that was never written: a node uses ~log2(N) + a few of its 256
# buckets, and 256 empty buckets per table (~50 kB) were most of a node's memory. Never mutated:
# writers go through `RoutingTable._bucket`.
_UNUSED = Bucket()


class RoutingTable:
    def __init__(self, self_id: bytes, k: int = K) -> None:
        self.self_id = self_id
        self.k = k
        self.buckets = [_UNUSED] * ID_BITS
        self._used: list[int] = []  # indices of the real buckets, ascending: closest() walks them
        self._size = 0

    def _bucket(self, index: int) -> Bucket:
        """Bucket `index`, made real (not the shared placeholder) so that it can be written."""
        bucket = self.buckets[index]
        if bucket is _UNUSED:
            bucket = self.buckets[index] = Bucket()
            bisect.insort(self._used, index)
        return bucket

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Contact]:
        buckets = self.buckets
        for i in self._used:
            yield from buckets[i].contacts

    def get(self, node_id: bytes) -> Contact | None:
        if node_id == self.self_id:
            return None
        for c in self.buckets[bucket_index(self.self_id, node_id)].contacts:
            if c.node_id == node_id:
                return c
        return None

    def verified(
        self,
        public_key: bytes,
        address: Address,
        now: float,
        rtt: float | None,
        lookup: bool = False,
    ) -> None:
        """A key proved itself at `address`: insert or refresh it. (A bucket counts as refreshed
        only when a lookup went through it — `touch` — so new contacts do not stop refreshes.)"""
        node_id = node_id_for(public_key)
        if node_id == self.self_id:
            return
        bucket = self._bucket(bucket_index(self.self_id, node_id))
        for c in bucket.contacts:
            if c.node_id == node_id:
                if c.address != address:
                    c.address, c._wire = address, None
                c.last_seen, c.failures = now, 0
                if lookup:
                    c.lookup_failures = 0
                if rtt is not None:
                    c.observe_rtt(rtt)
                bucket.contacts.remove(c)
                bucket.contacts.append(c)
                return
        contact = Contact(public_key, address, now)
        if rtt is not None:
            contact.observe_rtt(rtt)
        if len(bucket.contacts) < self.k:
            bucket.contacts.append(contact)
            self._size += 1
            return
        # Full: evict a contact known to be failing, else keep the newcomer in reserve.
        for c in bucket.contacts:
            if c.failures >= MAX_FAILURES:
                bucket.contacts.remove(c)
                bucket.contacts.append(contact)
                return
        bucket.replacements = [r for r in bucket.replacements if r.node_id != node_id]
        bucket.replacements.append(contact)
        del bucket.replacements[: -self.k]

    def failed(self, node_id: bytes, lookup: bool = False) -> None:
        """A query to this contact timed out; after MAX_FAILURES, replace it from the cache."""
        bucket = (
            self.buckets[bucket_index(self.self_id, node_id)] if node_id != self.self_id else None
        )
        if bucket is None or bucket is _UNUSED:
            return
        for c in bucket.contacts:
            if c.node_id == node_id:
                c.failures += 1
                if lookup:
                    c.lookup_failures += 1
                if c.failures >= MAX_FAILURES and bucket.replacements:
                    bucket.contacts.remove(c)
                    bucket.contacts.append(bucket.replacements.pop())
                return
        bucket.replacements = [r for r in bucket.replacements if r.node_id != node_id]

    def has_room(self, node_id: bytes) -> bool:
        """Whether a newcomer with this id could enter (free slot or a failing contact)."""
        if node_id == self.self_id:
            return False
        bucket = self.buckets[bucket_index(self.self_id, node_id)]
        return len(bucket.contacts) < self.k or any(
            c.failures >= MAX_FAILURES for c in bucket.contacts
        )

    def is_full(self, index: int) -> bool:
        """Bucket `index` holds k contacts, none failing: a refresh could only add reserves."""
        contacts = self.buckets[index].contacts
        return len(contacts) >= self.k and all(c.failures < MAX_FAILURES for c in contacts)

    def remove(self, node_id: bytes) -> None:
        if node_id == self.self_id:
            return
        bucket = self.buckets[bucket_index(self.self_id, node_id)]
        if bucket is _UNUSED:
            return
        kept = [c for c in bucket.contacts if c.node_id != node_id]
        self._size -= len(bucket.contacts) - len(kept)
        bucket.contacts = kept

    def closest(
        self, target: bytes, count: int | None = None, *, live_only: bool = True
    ) -> list[Contact]:
        """The `count` contacts nearest `target`, nearest first.

        Answered for every FIND we receive, so it does not sort the whole table: with b the bucket
        `target` falls in, bucket b holds everything within 2^b of it, buckets below b are all
        at [2^b, 2^(b+1)), and each bucket i above b is at [2^i, 2^(i+1)). Walking those groups in
        that order and sorting only within a group gives the same list as sorting everything."""
        count = self.k if count is None else count
        t = int.from_bytes(target, "big")
        b = (int.from_bytes(self.self_id, "big") ^ t).bit_length() - 1
        buckets = self.buckets
        used = self._used
        below = [buckets[i] for i in used if i < b]
        groups: Iterable[Iterable[Bucket]] = ((buckets[b],), below) if b >= 0 else ()
        above = ((buckets[i],) for i in used if i > b)
        out: list[Contact] = []
        for group in (*groups, *above):
            pool = [
                c
                for bucket in group
                for c in bucket.contacts
                if not live_only
                or (c.failures < MAX_FAILURES and c.lookup_failures < MAX_LOOKUP_FAILURES)
            ]
            if pool:
                pool.sort(key=lambda c: c.id_int ^ t)
                out.extend(pool)
                if len(out) >= count:
                    break
        return out[:count]

    def stale_buckets(self, now: float, interval: float) -> list[int]:
        """Non-empty buckets nobody touched within `interval`: due for a refresh lookup."""
        buckets = self.buckets
        return [
            i
            for i in self._used
            if buckets[i].contacts and now - buckets[i].last_touched >= interval
        ]

    def touch(self, target: bytes, now: float) -> None:
        if target != self.self_id:
            self._bucket(bucket_index(self.self_id, target)).last_touched = now

    def refreshed(self, index: int, now: float) -> None:
        """Bucket `index` counts as refreshed now (as if a lookup had gone through it)."""
        self._bucket(index).last_touched = now

    def random_id_in_bucket(self, index: int, rand: int) -> bytes:
        """An id at distance [2^index, 2^(index+1)) from ours; `rand` supplies the low bits."""
        dist = (1 << index) | (rand & ((1 << index) - 1))
        value = int.from_bytes(self.self_id, "big") ^ dist
        return value.to_bytes(NODE_ID_SIZE, "big")
