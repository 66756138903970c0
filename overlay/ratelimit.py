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
    """One bucket per key, the least recently used forgotten beyond `max_keys` (bounded memory)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def allow(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
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
