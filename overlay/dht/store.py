"""The records this node holds for others: newest valid record per key, with quotas.

Quotas are per source IP and in total, so one host cannot fill our memory; a record is kept
only if signed, unexpired and newer (by sequence number) than what we hold.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from overlay.dht.record import PeerRecord, RecordError, check_fresh

# Each record is under 600 B: 8192 of them cap a node's store near 5 MB.
MAX_RECORDS = 8192
# A /32 (or one IPv6 host) may place this many records with us; honest nodes store their own
# record plus the ones they republish for lookups they made.
MAX_RECORDS_PER_SOURCE = 64


class StoreRejected(RecordError):
    """A valid record we will not keep (stale, over quota); the reason goes back to the sender."""


@dataclass
class _Entry:
    record: PeerRecord
    source_ip: str


class RecordStore:
    def __init__(
        self, max_records: int = MAX_RECORDS, max_per_source: int = MAX_RECORDS_PER_SOURCE
    ) -> None:
        self.max_records = max_records
        self.max_per_source = max_per_source
        self._entries: dict[bytes, _Entry] = {}
        self._per_source: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, record: PeerRecord, source_ip: str, now: float) -> None:
        check_fresh(record, now)
        key = record.node_id
        old = self._entries.get(key)
        if old is not None:
            if old.record.expires <= now:
                self._drop(key)
                old = None
            elif record.seq < old.record.seq:
                raise StoreRejected(f"older sequence {record.seq} < {old.record.seq}")
            elif record.seq == old.record.seq:
                if record.body == old.record.body:
                    return
                raise StoreRejected("same sequence, different content")
        if old is None:
            if len(self._entries) >= self.max_records:
                self.expire(now)
                if len(self._entries) >= self.max_records:
                    raise StoreRejected("store full")
            if self._per_source[source_ip] >= self.max_per_source:
                raise StoreRejected("per-source quota reached")
        else:
            self._drop(key)
        self._entries[key] = _Entry(record, source_ip)
        self._per_source[source_ip] += 1

    def get(self, node_id: bytes, now: float) -> PeerRecord | None:
        entry = self._entries.get(node_id)
        if entry is None:
            return None
        if entry.record.expires <= now:
            self._drop(node_id)
            return None
        return entry.record

    def expire(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if e.record.expires <= now]:
            self._drop(key)

    def records(self) -> list[PeerRecord]:
        return [e.record for e in self._entries.values()]

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self._per_source[entry.source_ip] -= 1
        if self._per_source[entry.source_ip] <= 0:
            del self._per_source[entry.source_ip]
