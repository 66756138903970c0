"""Token buckets, per source and in total, so no sender can make us work without bound."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class KeyedLimiter:
    """One bucket per key, the least recently used forgotten beyond `max_keys` (bounded memory).

    A bucket idle long enough to have refilled to its burst is the same as a new one, so it is
    forgotten too: a DHT node hears from hundreds of sources, and keeping one bucket each for ever
    cost ~25 kB per node."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._refill = burst / rate if rate > 0 else float("inf")
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            buckets[key] = bucket
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        # The least recently used come first: forget the ones that are full again (two per
        # call at most, which keeps up with one new key per call).
        for _ in range(2):
            oldest = next(iter(buckets.values()))
            if oldest is bucket or now - oldest.stamp < self._refill:
                break
            buckets.popitem(last=False)
        return bucket.allow(now, cost)


class Budget:
    """Two token buckets, packets/s and bytes/s, each bursting one second's worth, refilled
    together. Not two `TokenBucket`s: the relay's DATA path checks one budget per pair and one
    for the whole relay on every packet, and two separate buckets per check (each refilling on
    its own, with a refund when the second refused) cost a third of the forwarding time."""

    __slots__ = ("byte_rate", "bytes", "packet_rate", "packets", "stamp")

    def __init__(self, packet_rate: float, byte_rate: float, now: float) -> None:
        self.packet_rate = packet_rate
        self.byte_rate = byte_rate
        self.packets = packet_rate
        self.bytes = byte_rate
        self.stamp = now

    def allow(self, now: float, size: int) -> bool:
        """Spend one packet and `size` bytes if both are there; spend nothing otherwise."""
        elapsed = now - self.stamp
        self.stamp = now
        packets = self.packets + elapsed * self.packet_rate
        if packets > self.packet_rate:
            packets = self.packet_rate
        bytes_ = self.bytes + elapsed * self.byte_rate
        if bytes_ > self.byte_rate:
            bytes_ = self.byte_rate
        if packets < 1.0 or bytes_ < size:
            self.packets = packets
            self.bytes = bytes_
            return False
        self.packets = packets - 1.0
        self.bytes = bytes_ - size
        return True

    def refund(self, size: int) -> None:
        """Give back what `allow` took (a later check refused the packet)."""
        self.packets += 1.0
        self.bytes += size
