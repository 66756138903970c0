"""Shared DHT workload: build a population, run timed lookups, summarise, fork grid points.

Building a 10k network costs most of a run, so scenarios build once and `fork_map` runs each grid
point (churn level, attack mode, paths) in a forked child that inherits the built network.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlay.dht.core import LookupDone
from simulations.netsim import LOOKUP_DEADLINE, Network, SimNode, TrackedLookup

RESULTS = Path(__file__).parent / "results"
# Join spacing while building: 50 joins per virtual second, a flash crowd the DHT must absorb.
JOIN_SPACING = 0.02
# A callee is picked among nodes that have been up this long: their first publish is done.
MIN_TARGET_AGE = 30.0
# Oracle build: records are published 500 per virtual second, and each full bucket also gets this
# many contacts in reserve (a protocol-built 1k network held 3.8 per full bucket; see README).
ORACLE_PUBLISH_SPACING = 0.002
ORACLE_REPLACEMENTS = 4


@dataclass
class LookupResult:
    found: bool
    current: bool
    hops: int
    duration: float
    queries: int
    messages: int
    bytes: int
    late: bool = False  # found the record, but after LOOKUP_DEADLINE (counted as not found)


@dataclass
class Workload:
    results: list[LookupResult] = field(default_factory=list)
    initiator_left: int = 0


def build(net: Network, size: int, spacing: float = JOIN_SPACING, settle: float = 60.0) -> None:
    """Every node joins through the protocol: bootstrap, its own lookup, bucket refreshes."""
    net.add_node(bootstrap=[])
    net.grow(size - 1, spacing=spacing)
    net.run_for(settle)


def build_oracle(
    net: Network,
    size: int,
    spacing: float = ORACLE_PUBLISH_SPACING,
    settle: float = 60.0,
    replacements: int = ORACLE_REPLACEMENTS,
) -> None:
    """Start from the routing tables the protocol converges to, then publish every record through
    the protocol. Bucket refreshes are most of the ~920 datagrams a join costs at 10k nodes; this
    skips them. Each node gets, per bucket, up to k random live nodes of that bucket's range as
    contacts (RTT: the pair's simulated RTT) and up to `replacements` more in reserve, every
    bucket counts as refreshed now, and the records go out one per `spacing` virtual seconds.
    Churn, lookups and every later join then run through the protocol as usual; dht_scale's
    `--build oracle` runs and their 1k and 10k cross-checks against `build` are in the README."""
    nodes = [net.add_node(bootstrap=[], publish=False, churn=False) for _ in range(size)]
    ranked = sorted(nodes, key=lambda n: n.core.table.self_id)
    ids = [int.from_bytes(n.core.table.self_id, "big") for n in ranked]

    def with_prefix(prefix: int, shift: int) -> tuple[int, int]:
        """Positions in `ids` of the ids whose bits above `shift` are `prefix`."""
        return bisect.bisect_left(ids, prefix << shift), bisect.bisect_left(
            ids, (prefix + 1) << shift
        )

    for node in nodes:
        table = node.core.table
        own = int.from_bytes(table.self_id, "big")
        for index in range(len(table.buckets) - 1, -1, -1):
            lo, hi = with_prefix(own >> (index + 1), index + 1)
            if hi - lo == 1:
                break  # nobody else shares our bits above `index`: it and deeper are empty
            # Bucket `index`: ids that share our bits above it and differ at it.
            start, stop = with_prefix((own >> index) ^ 1, index)
            if start == stop:
                continue
            picks = net.rng.sample(range(start, stop), min(stop - start, table.k + replacements))
            for pos in picks:
                peer = ranked[pos]
                rtt = 2 * net.one_way(node.index, peer.index)
                table.verified(peer.core.public_key, peer.address, net.now, rtt)
            table.refreshed(index, net.now)
    started = net.now
    for i, node in enumerate(nodes):
        net.at(started + i * spacing, lambda n=node: net.publish(n))
    net.run_for(size * spacing + settle)


def run_lookups(
    net: Network,
    count: int,
    duration: float,
    judge: Callable[[SimNode, LookupDone], tuple[bool, bool]] | None = None,
    targets: list[SimNode] | None = None,
) -> Workload:
    """`count` lookups from random honest nodes for random honest, settled nodes' records."""
    work = Workload()
    gap = duration / max(1, count)
    callees = targets
    targets_of: dict[int, SimNode] = {}

    def default_judge(target: SimNode, ev: LookupDone) -> tuple[bool, bool]:
        rec = ev.record
        if rec is None or rec.public_key != target.core.public_key:
            return False, False
        own = target.core.own_record
        return True, own is not None and rec.seq == own.seq and rec.body == own.body

    check = judge or default_judge

    def done(tracked: TrackedLookup, ev: LookupDone) -> None:
        target = targets_of.pop(id(tracked))
        found, current = check(target, ev)
        late = found and ev.duration > LOOKUP_DEADLINE
        found = found and not late
        work.results.append(
            LookupResult(
                found,
                current and found,
                ev.hops,
                ev.duration,
                ev.queries,
                tracked.messages_used,
                tracked.bytes_used,
                late,
            )
        )

    for _ in range(count):
        pair = _pick_pair(net, callees)
        if pair is not None:
            src, dst = pair
            tracked = net.start_lookup(src, dst.core.public_key, done)
            targets_of[id(tracked)] = dst
        net.run_for(gap)
    net.run_for(LOOKUP_DEADLINE * 3)
    work.initiator_left = len(targets_of)
    return work


def _pick_pair(net: Network, callees: list[SimNode] | None) -> tuple[SimNode, SimNode] | None:
    for _ in range(100):
        src, dst = net.sample_alive(2, honest_only=True)
        if callees:
            dst = callees[net.rng.randrange(len(callees))]
        if net.now - dst.joined >= MIN_TARGET_AGE and src is not dst:
            return src, dst
    return None


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(net: Network, work: Workload) -> dict[str, Any]:
    res = work.results
    honest = [n for n in net.alive if n.honest]
    stored = [len(n.core.store) for n in honest]
    table = [len(n.core.table) for n in honest]
    n = max(1, len(res))
    return {
        "lookups": len(res),
        "success": sum(r.found for r in res) / n,
        "current_record": sum(r.current for r in res) / n,
        # Of the failures, those that did find the record, too slowly: a faster lookup would
        # have saved them; the rest ended without it.
        "found_too_late": sum(r.late for r in res) / n,
        "hops_median": statistics.median([r.hops for r in res]) if res else None,
        "hops_p95": pct([r.hops for r in res], 0.95),
        "latency_median_s": statistics.median([r.duration for r in res]) if res else None,
        "latency_p95_s": pct([r.duration for r in res], 0.95),
        "queries_median": statistics.median([r.queries for r in res]) if res else None,
        "messages_per_lookup_median": statistics.median([r.messages for r in res]) if res else None,
        "bytes_per_lookup_median": statistics.median([r.bytes for r in res]) if res else None,
        "initiator_left_before_done": work.initiator_left,
        "records_per_node_mean": statistics.fmean(stored) if stored else 0,
        "records_per_node_max": max(stored) if stored else 0,
        "routing_contacts_mean": statistics.fmean(table) if table else 0,
        "departures": net.departures,
        "datagrams_total": net.datagrams,
        "virtual_seconds": net.now - net.nodes[0].joined,
    }


def fork_map(jobs: list[tuple[str, Callable[[], dict[str, Any]]]], workers: int = 2) -> dict:
    """Run each job in a forked child (copy-on-write of the built network), `workers` at once."""
    if len(jobs) == 1:
        # One job needs no copy: a forked child would dirty (copy) most of a 100k network's pages.
        name, fn = jobs[0]
        row = _timed(fn)
        print(f"  done {name}: {_brief(row)}", flush=True)
        return {name: row}
    out: dict[str, Any] = {}
    running: dict[int, tuple[str, str]] = {}
    queue = list(jobs)
    while queue or running:
        while queue and len(running) < workers:
            name, fn = queue.pop(0)
            fd, path = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    value = _timed(fn)
                    Path(path).write_text(json.dumps(value))
                except BaseException as exc:  # report, never fall back into the parent's loop
                    Path(path).write_text(json.dumps({"error": repr(exc)}))
                    code = 1
                finally:
                    sys.stdout.flush()
                    os._exit(code)
            running[pid] = (name, path)
        pid, _ = os.wait()
        name, path = running.pop(pid)
        out[name] = json.loads(Path(path).read_text() or "{}")
        Path(path).unlink()
        print(f"  done {name}: {_brief(out[name])}", flush=True)
    return {name: out[name] for name, _ in jobs}


def _timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    cpu, wall = time.process_time(), time.perf_counter()
    value = fn()
    value["cpu_seconds"] = round(time.process_time() - cpu, 1)
    value["wall_seconds"] = round(time.perf_counter() - wall, 1)
    return value


def _brief(row: dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    keys = ("success", "found_too_late", "hops_median", "latency_median_s", "queries_median")
    return ", ".join(f"{k}={row.get(k)!r:.6}" for k in keys if k in row)


def core_fingerprint() -> str:
    """SHA-256 over overlay/dht/*.py: ties a result file to the exact core it ran."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent.parent / "overlay" / "dht").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# Taken when the scenario starts: the core files may change on disk while a long run goes on.
_FINGERPRINT_AT_START = core_fingerprint()


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    payload = {"overlay_dht_sha256_16": _FINGERPRINT_AT_START, **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
