"""A tiny deterministic in-memory network of DHT cores for tests (fixed latency, fake time)."""

from __future__ import annotations

import heapq
import random

from overlay.dht.core import DhtConfig, DhtCore, Event, LookupDone
from overlay.identity import Identity
from overlay.wire import Address


class MemoryNet:
    def __init__(self, seed: int = 0, latency: float = 0.01) -> None:
        self.rng = random.Random(seed)
        self.latency = latency
        self.now = 1_800_000_000.0
        self.nodes: dict[Address, DhtCore] = {}
        self.queue: list[tuple[float, int, Address, Address, bytes]] = []
        self.seq = 0
        self.events: dict[Address, list[Event]] = {}
        self.sent_to: list[tuple[Address, Address, bytes]] = []  # (src, dst, data), all traffic
        self.sent_at: list[float] = []  # when each of sent_to was sent
        self.drop = lambda src, dst, data: False  # tests set this to lose chosen datagrams

    def add(
        self, address: Address, config: DhtConfig | None = None, identity: Identity | None = None
    ) -> DhtCore:
        core = DhtCore(
            identity or Identity(self.rng.randbytes(32)),
            config,
            rng=random.Random(self.rng.random()),
            now=self.now,
        )
        self.nodes[address] = core
        self.events[address] = []
        return core

    def inject(self, src: Address, dst: Address, data: bytes) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (self.now + self.latency, self.seq, src, dst, data))

    def flush(self, address: Address) -> None:
        core = self.nodes[address]
        for dst, data in core.datagrams_to_send():
            self.sent_to.append((address, dst, data))
            self.sent_at.append(self.now)
            if not self.drop(address, dst, data):
                self.inject(address, dst, data)
        self.events[address].extend(core.events())

    def run_for(self, seconds: float) -> None:
        until = self.now + seconds
        while True:
            next_timer = min((c.next_timeout() for c in self.nodes.values()), default=until)
            next_packet = self.queue[0][0] if self.queue else until
            t = min(next_timer, next_packet, until)
            if t >= until and not (self.queue and self.queue[0][0] <= until):
                self.now = until
                return
            self.now = max(self.now, t)
            while self.queue and self.queue[0][0] <= self.now:
                _, _, src, dst, data = heapq.heappop(self.queue)
                core = self.nodes.get(dst)
                if core is not None:
                    core.receive(data, src, self.now)
                    self.flush(dst)
            for address, core in self.nodes.items():
                if core.next_timeout() <= self.now:
                    core.handle_timeouts(self.now)
                    self.flush(address)

    def lookup(self, address: Address, public_key: bytes, wait: float = 10.0) -> LookupDone:
        core = self.nodes[address]
        lookup_id = core.find_record(public_key, self.now)
        self.flush(address)
        deadline = self.now + wait
        while self.now < deadline:
            self.run_for(0.05)
            for event in self.events[address]:
                if isinstance(event, LookupDone) and event.lookup_id == lookup_id:
                    return event
        raise AssertionError("lookup did not finish")

    def build(
        self, count: int, config: DhtConfig | None = None, settle: float = 30.0
    ) -> list[Address]:
        addresses = [(f"10.0.{i // 250}.{i % 250 + 1}", 4000) for i in range(count)]
        for address in addresses:
            core = self.add(address, config)
            core.set_record_addresses([address], [], self.now)
            if address != addresses[0]:
                core.bootstrap([addresses[0]], self.now)
            self.flush(address)
            self.run_for(0.2)
        self.run_for(settle)
        return addresses
