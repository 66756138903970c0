"""A discrete-event network that runs the project's unchanged DhtCore at internet scale.

One heap holds every future event: datagram deliveries, per-node timer wake-ups (each node has at
most one live wake-up, re-armed from `next_timeout()` after every call into its core) and scenario
actions. Nothing ever scans all nodes, so a step costs O(log events) plus the core's own work.

Latency model. Round-trip times between hosts are log-normal: the King data set (Gummadi, Saroiu
and Gribble, "King: estimating latency between arbitrary Internet end hosts", IMW 2002) and the
Meridian/PeerWise measurements built on it show medians of 60-80 ms with a long tail to several
hundred ms. We use a median RTT of 70 ms and sigma 0.6 (p95 ~190 ms, p99 ~280 ms), a property of
the pair (drawn from a hash of the two hosts, so it is stable and needs no N^2 matrix), plus a small
exponential per-packet jitter and independent per-packet loss. These are chosen to match those
published medians and tails, not fitted to a trace.

Churn. Each honest node draws an exponential session time with mean 1/rate (so "30 % per hour"
means departures at 0.3 N per hour, memoryless); a departing node vanishes silently (its queued
and future datagrams are dropped) and a fresh node with a new key and address joins in its place,
so the population stays at N.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

from overlay.dht.core import DhtConfig, DhtCore, LookupDone
from overlay.identity import Identity
from overlay.wire import Address
from simulations import fastcrypto

# A virtual start time near today's wall clock: records carry absolute expiry times.
EPOCH = 1_800_000_000.0
# Resolution of the RTT quantile table: 4096 steps keep the distribution smooth to <0.1 %.
_RTT_TABLE_SIZE = 4096
# Bootstrap contacts a joining node is given: several, as a daemon ships with a list and a saved
# routing table; any live node serves (every public daemon is a bootstrap node).
BOOTSTRAP_CONTACTS = 3
# A lookup slower than this counts as failed, as the daemon's control socket gives up then
# (overlay.node.LOOKUP_TIMEOUT).
LOOKUP_DEADLINE = 10.0

_DELIVER, _TIMER, _ACTION = 0, 1, 2


@dataclass
class NetConfig:
    median_rtt: float = 0.070
    rtt_sigma: float = 0.6
    jitter: float = 0.002  # mean of the exponential per-packet extra delay, seconds
    loss: float = 0.01  # per datagram; 1 % is a typical residential path (e.g. RIPE Atlas)
    churn_per_hour: float = 0.0  # fraction of the population replaced per hour
    fast_crypto: bool = True
    seed: int = 1


@dataclass
class TrackedLookup:
    node: SimNode
    target_pk: bytes
    started: float
    bytes_before: int
    messages_before: int
    callback: Callable[[TrackedLookup, LookupDone], None] | None = None
    done: LookupDone | None = None
    bytes_used: int = 0
    messages_used: int = 0


@dataclass(eq=False)
class SimNode:
    index: int
    address: Address
    core: DhtCore
    joined: float
    alive: bool = True
    honest: bool = True
    timer_at: float = math.inf
    tags: dict[str, object] = field(default_factory=dict)


class Network:
    def __init__(self, config: NetConfig | None = None, dht: DhtConfig | None = None) -> None:
        self.config = config or NetConfig()
        self.dht_config = dht or DhtConfig()
        if self.config.fast_crypto:
            fastcrypto.install()
        else:
            fastcrypto.uninstall()
        self.rng = random.Random(self.config.seed)
        self.now = EPOCH
        self._heap: list[tuple[float, int, int, object, object, object]] = []
        self._seq = 0
        self.nodes: list[SimNode] = []
        self.by_address: dict[Address, SimNode] = {}
        self.alive: list[SimNode] = []  # swap-remove list for O(1) random choice
        self._alive_pos: dict[int, int] = {}
        self._lookups: dict[tuple[int, int], TrackedLookup] = {}
        self.datagrams = 0
        self.bytes = 0
        self.lost = 0
        self.departures = 0
        nd = NormalDist(math.log(self.config.median_rtt), self.config.rtt_sigma)
        self._one_way = [nd.inv_cdf((i + 0.5) / _RTT_TABLE_SIZE) for i in range(_RTT_TABLE_SIZE)]
        self._one_way = [math.exp(v) / 2 for v in self._one_way]
        self.node_factory: Callable[[Identity, DhtConfig, random.Random, float], DhtCore] = (
            lambda ident, cfg, rng, now: DhtCore(ident, cfg, rng=rng, now=now)
        )

    # --- population ----------------------------------------------------------------------------

    def new_identity(self) -> Identity:
        ident = Identity(self.rng.randbytes(32))
        if self.config.fast_crypto:
            fastcrypto.public_key_for(ident.seed)
        return ident

    def add_node(
        self,
        *,
        bootstrap: list[Address] | None = None,
        core_factory: Callable[[Identity, DhtConfig, random.Random, float], DhtCore] | None = None,
        honest: bool = True,
        churn: bool = True,
        publish: bool = True,
    ) -> SimNode:
        """Create a node, publish its record and bootstrap it from live nodes. (`publish=False`:
        no record and no bootstrap yet; the caller fills its table and publishes it later.)"""
        index = len(self.nodes)
        address = (
            f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}",
            4000 + (index >> 24),
        )
        factory = core_factory or self.node_factory
        core = factory(
            self.new_identity(), self.dht_config, random.Random(self.rng.random()), self.now
        )
        node = SimNode(index, address, core, self.now, honest=honest)
        if bootstrap is None:
            bootstrap = [n.address for n in self.sample_alive(BOOTSTRAP_CONTACTS)]
        self.nodes.append(node)
        self.by_address[address] = node
        self._alive_pos[index] = len(self.alive)
        self.alive.append(node)
        if publish:
            core.set_record_addresses([address], [], self.now)
        if bootstrap:
            core.bootstrap(bootstrap, self.now)
        self._flush(node)
        rate = self.config.churn_per_hour / 3600.0
        if churn and honest and rate > 0:
            self.at(self.now + self.rng.expovariate(rate), lambda n=node: self._depart(n))
        return node

    def publish(self, node: SimNode) -> None:
        """Sign and publish the node's record (its address) now."""
        node.core.set_record_addresses([node.address], [], self.now)
        self._flush(node)

    def remove_node(self, node: SimNode) -> None:
        """The node vanishes silently: no goodbye, datagrams to it are lost."""
        if not node.alive:
            return
        node.alive = False
        del self.by_address[node.address]
        pos = self._alive_pos.pop(node.index)
        last = self.alive.pop()
        if last is not node:
            self.alive[pos] = last
            self._alive_pos[last.index] = pos

    def _depart(self, node: SimNode) -> None:
        if not node.alive:
            return
        self.departures += 1
        self.remove_node(node)
        self.add_node()

    def sample_alive(self, count: int, honest_only: bool = False) -> list[SimNode]:
        pool = self.alive
        if not pool:
            return []
        out: list[SimNode] = []
        for _ in range(count * 20):
            node = pool[self.rng.randrange(len(pool))]
            if node not in out and (node.honest or not honest_only):
                out.append(node)
                if len(out) == count:
                    break
        return out

    def grow(self, count: int, spacing: float = 0.05, **kwargs: object) -> list[SimNode]:
        """Add `count` nodes `spacing` virtual seconds apart, running the network between joins."""
        added = []
        for _ in range(count):
            added.append(self.add_node(**kwargs))  # type: ignore[arg-type]
            self.run_for(spacing)
        return added

    # --- scheduling ----------------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, _ACTION, action, None, None))

    def _arm(self, node: SimNode) -> None:
        t = node.core.next_timeout()
        if t < node.timer_at or node.timer_at < self.now:
            node.timer_at = max(t, self.now)
            self._seq += 1
            heapq.heappush(self._heap, (node.timer_at, self._seq, _TIMER, node, None, None))

    def _flush(self, node: SimNode) -> None:
        core = node.core
        out = core.datagrams_to_send()
        if out:
            rng = self.rng
            loss = self.config.loss
            jitter = self.config.jitter
            for dest, data in out:
                self.datagrams += 1
                self.bytes += len(data)
                target = self.by_address.get(dest)
                if target is None or (loss and rng.random() < loss):
                    self.lost += 1
                    continue
                delay = self.one_way(node.index, target.index)
                if jitter:
                    delay += rng.expovariate(1.0 / jitter)
                self._seq += 1
                heapq.heappush(
                    self._heap, (self.now + delay, self._seq, _DELIVER, target, node.address, data)
                )
        events = core.events()
        if events and self._lookups:
            for ev in events:
                if isinstance(ev, LookupDone):
                    tracked = self._lookups.pop((node.index, ev.lookup_id), None)
                    if tracked is not None:
                        tracked.done = ev
                        tracked.bytes_used = (
                            core.stats.bytes_sent + core.stats.bytes_received - tracked.bytes_before
                        )
                        tracked.messages_used = (
                            core.stats.sent + core.stats.received - tracked.messages_before
                        )
                        if tracked.callback is not None:
                            tracked.callback(tracked, ev)
        self._arm(node)

    def one_way(self, a: int, b: int) -> float:
        """The stable one-way delay between hosts `a` and `b` (half their RTT, no jitter)."""
        if a > b:
            a, b = b, a
        h = (a * 0x9E3779B97F4A7C15 + b * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return self._one_way[(h >> 40) % _RTT_TABLE_SIZE]

    def run_until(self, until: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until:
            when, _, kind, a, b, c = heapq.heappop(heap)
            self.now = when
            if kind == _DELIVER:
                node: SimNode = a  # type: ignore[assignment]
                if node.alive:
                    node.core.receive(c, b, when)  # type: ignore[arg-type]
                    self._flush(node)
            elif kind == _TIMER:
                node = a  # type: ignore[assignment]
                if node.alive and node.timer_at == when:
                    node.timer_at = math.inf
                    node.core.handle_timeouts(when)
                    self._flush(node)
            else:
                a()  # type: ignore[operator]
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # --- measurements --------------------------------------------------------------------------

    def start_lookup(
        self,
        node: SimNode,
        target_pk: bytes,
        callback: Callable[[TrackedLookup, LookupDone], None] | None = None,
    ) -> TrackedLookup:
        stats = node.core.stats
        tracked = TrackedLookup(
            node,
            target_pk,
            self.now,
            stats.bytes_sent + stats.bytes_received,
            stats.sent + stats.received,
            callback,
        )
        lookup_id = node.core.find_record(target_pk, self.now)
        self._lookups[(node.index, lookup_id)] = tracked
        self._flush(node)
        return tracked

    def pending_lookups(self) -> int:
        return len(self._lookups)
