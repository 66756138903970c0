"""Our DHT against the `kademlia` package (2.2.3) on real UDP sockets on 127.0.0.1.

The same workload for both: N nodes join one by one through the first node, every node publishes
"where to reach me" under its own key (ours: the signed record the daemon publishes itself;
kademlia: `set(name, "127.0.0.1:port")`), then L lookups from random nodes for random other nodes'
keys, one at a time so the bytes on the sockets during a lookup belong to it. Then two abuse
checks on each: a forged value (an attacker overwrites someone's key) and malformed datagrams
(does the node keep serving?).

Ours runs as real `overlay.node.Node` daemons (real Ed25519, real sockets) inside one trio process;
kademlia runs as asyncio `kademlia.network.Server`s in one asyncio loop, afterwards, in the same
process. Loopback has no propagation delay: latencies here are protocol rounds times processing
on a shared 2-core machine, not internet latencies (see dht_scale for those).

    python -m simulations.baseline --json            # 100 nodes each
    python -m simulations.baseline --nodes 300 --json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from overlay import endpoint as endpoint_mod
from overlay import wire
from overlay.dht.record import PeerRecord
from overlay.identity import Identity
from overlay.node import Node, NodeOptions
from simulations import dhtrun

HOST = "127.0.0.1"  # the only address this scenario ever uses
DEFAULT_NODES = 100
DEFAULT_LOOKUPS = 100
# Time for the network to settle after the last join: refresh lookups and publishes finish.
SETTLE = 5.0
LOOKUP_TIMEOUT = 10.0

# Datagrams that have broken parsers before: random bytes, a too-short frame, msgpack of the wrong
# shape, an unknown RPC name, a known RPC with wrong arguments, and deeply nested msgpack.
_ID = bytes(20)


def garbage() -> list[bytes]:
    import umsgpack  # kademlia's (rpcudp's) msgpack: craft frames its parser will accept

    rng = random.Random(7)
    return [
        rng.randbytes(200),
        b"\x00" * 5,
        b"\x00" + _ID + b"\xc1\xc1\xc1",
        b"\x00" + _ID + umsgpack.packb(["no_such_rpc", [1, 2]]),
        b"\x00" + _ID + umsgpack.packb(["find_node", [1]]),
        b"\x00" + _ID + umsgpack.packb(["store", [b"x" * 20, "k", "v", "extra"]]),
        b"\x00" + _ID + umsgpack.packb(7),
        b"\x00" + _ID + b"\x91" * 3000 + b"\x00",
        b"\xd0" + b"\x91" * 3000 + b"\x00",
        b"\xd0" + rng.randbytes(300),
    ]


def _send_garbage(port: int) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for data in garbage():
            s.sendto(data, (HOST, port))
    return len(garbage())


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _summary(latencies: list[float], ok: int, lookups: int, sent_bytes: int) -> dict[str, Any]:
    return {
        "lookups": lookups,
        "success": ok / max(1, lookups),
        "latency_median_ms": 1000 * statistics.median(latencies) if latencies else None,
        "latency_p95_ms": 1000 * dhtrun.pct(latencies, 0.95) if latencies else None,
        "bytes_per_lookup": sent_bytes / max(1, lookups),
    }


# --- ours -------------------------------------------------------------------------------------


class _Counter:
    bytes = 0

    @classmethod
    def install(cls) -> None:
        original = endpoint_mod.Endpoint.send

        def send(self: endpoint_mod.Endpoint, address: wire.Address, data: bytes) -> bool:
            ok = original(self, address, data)
            if ok:
                cls.bytes += len(data)
            return ok

        endpoint_mod.Endpoint.send = send  # type: ignore[method-assign]


def _forged_copy(attacker: Identity, victim: PeerRecord) -> PeerRecord:
    """The victim's key, the attacker's address, a higher sequence, the attacker's signature."""
    body = wire.unpack(victim.body)
    body["addrs"] = [wire.pack_address((HOST, 9))]
    body["seq"] = victim.seq + 1000
    packed = wire.pack(body)
    sig = attacker.sign(b"3bc-peer-record-v1" + packed)
    return PeerRecord(victim.public_key, ((HOST, 9),), (), body["seq"], victim.expires, packed, sig)


async def run_ours(nodes: int, lookups: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ports = _free_ports(nodes + 1)
    tmp = tempfile.TemporaryDirectory(prefix="3bc-baseline-")
    started = time.perf_counter()
    daemons: list[Node] = []
    async with trio.open_nursery() as nursery:
        for i in range(nodes + 1):  # the last one is the attacker
            boot = [(HOST, ports[j]) for j in range(min(i, 3))]
            state = Path(tmp.name) / f"n{i}"
            state.mkdir(mode=0o700)
            node = Node(
                Identity(rng.randbytes(32)),
                NodeOptions(state, listen=[(HOST, ports[i])], bootstrap=boot, handle_signals=False),
            )
            await nursery.start(node.run)
            daemons.append(node)
            await trio.sleep(0.02)
        attacker, honest = daemons[-1], daemons[:-1]
        await trio.sleep(SETTLE)
        join_seconds = time.perf_counter() - started
        before = _Counter.bytes
        latencies, ok = [], 0
        for _ in range(lookups):
            src, dst = rng.sample(honest, 2)
            t0 = time.perf_counter()
            try:
                done = await src.lookup(dst.identity.public_key, LOOKUP_TIMEOUT)
                rec = done.record
                if rec is not None and rec.public_key == dst.identity.public_key:
                    ok += 1
            except Exception:  # a timeout counts as a failed lookup
                pass
            latencies.append(time.perf_counter() - t0)
        row = _summary(latencies, ok, lookups, _Counter.bytes - before)
        row["join_and_settle_s"] = round(join_seconds, 1)

        # Forged value: the attacker finds the victim's record holders and stores a forgery.
        victim, reader = rng.sample(honest, 2)
        assert attacker.dht is not None and victim.dht is not None and victim.dht.own_record
        found = await attacker.lookup(victim.identity.public_key, LOOKUP_TIMEOUT)
        forged = _forged_copy(attacker.identity, victim.dht.own_record)
        rejected_before = _rejections(honest)
        now = attacker.clock.now() if attacker.clock else time.time()
        for pk, addr in found.contacts:
            attacker.dht._store_to(addr, _node_id(pk), forged, now)
        attacker._flush()
        await trio.sleep(1.0)
        forged_rejected = _rejections(honest) - rejected_before
        # The old-sequence replay: the victim republishes, the attacker replays the old record.
        old = victim.dht.own_record
        victim.dht.publish(victim.clock.now() if victim.clock else time.time())
        victim._flush()
        await trio.sleep(1.0)
        for pk, addr in found.contacts:
            attacker.dht._store_to(addr, _node_id(pk), old, now)
        attacker._flush()
        await trio.sleep(1.0)
        rejected = _rejections(honest)
        after = await reader.lookup(victim.identity.public_key, LOOKUP_TIMEOUT)
        genuine = after.record is not None and after.record.body == victim.dht.own_record.body
        row["forged_value"] = {
            "forged_stores_sent": len(found.contacts),
            "forged_stores_rejected": forged_rejected,
            "replay_stores_sent": len(found.contacts),
            "replay_stores_rejected": rejected - rejected_before - forged_rejected,
            "lookup_returns_genuine_newest": genuine,
            "verdict": "refused" if genuine else "ACCEPTED",
        }

        # Malformed datagrams to one node, then check it still answers a lookup for itself.
        target = honest[1]
        assert target.dht is not None
        sent = _send_garbage(target.endpoints[0].local[1])
        await trio.sleep(0.5)
        answered = target.dht.stats.sent
        check = await honest[2].lookup(target.identity.public_key, LOOKUP_TIMEOUT)
        row["malformed"] = {
            "datagrams": sent,
            "dropped_by_reason": dict(target.dht.stats.dropped),
            "still_serving": check.record is not None and target.dht.stats.sent > answered,
            "endpoint_handler_errors": target.endpoints[0].stats.handler_errors,
        }
        row["implementation"] = "ours (overlay.node.Node, signed records, 3 disjoint paths)"
        for d in daemons:
            d.shutdown()
    tmp.cleanup()
    return row


def _rejections(daemons: list[Node]) -> int:
    return sum(d.dht.stats.dropped.get("record-rejected", 0) for d in daemons if d.dht)


def _node_id(public_key: bytes) -> bytes:
    from overlay.identity import node_id_for

    return node_id_for(public_key)


def _sha1(key: str) -> bytes:
    from kademlia.utils import digest

    return digest(key)


# --- kademlia ---------------------------------------------------------------------------------


class _AsyncioCounter:
    bytes = 0

    @classmethod
    def install(cls) -> None:
        from asyncio import selector_events

        transport = selector_events._SelectorDatagramTransport
        original = transport.sendto

        def sendto(self: Any, data: bytes, addr: Any = None) -> None:
            cls.bytes += len(data)
            original(self, data, addr)

        transport.sendto = sendto  # type: ignore[method-assign]


async def run_kademlia(nodes: int, lookups: int, seed: int) -> dict[str, Any]:
    from kademlia.network import Server

    rng = random.Random(seed)
    ports = _free_ports(nodes + 1)
    started = time.perf_counter()
    servers: list[Server] = []
    errors: list[str] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda loop, ctx: errors.append(repr(ctx.get("exception") or ctx.get("message")))
    )
    for i in range(nodes + 1):
        server = Server(ksize=20, alpha=3)
        await server.listen(ports[i], interface=HOST)
        if i:
            await server.bootstrap([(HOST, ports[0])])
        servers.append(server)
    attacker, honest = servers[-1], servers[:-1]
    for i, server in enumerate(honest):
        await server.set(f"user-{i}", f"{HOST}:{ports[i]}")
    await asyncio.sleep(1.0)
    join_seconds = time.perf_counter() - started
    before = _AsyncioCounter.bytes
    latencies, ok, local, remote = [], 0, 0, []
    for _ in range(lookups):
        a, b = rng.sample(range(len(honest)), 2)
        is_local = honest[a].storage.get(_sha1(f"user-{b}")) is not None
        local += is_local
        t0 = time.perf_counter()
        try:
            value = await asyncio.wait_for(honest[a].get(f"user-{b}"), LOOKUP_TIMEOUT)
            ok += value == f"{HOST}:{ports[b]}"
        except TimeoutError:
            pass
        latencies.append(time.perf_counter() - t0)
        if not is_local:
            remote.append(latencies[-1])
    row = _summary(latencies, ok, lookups, _AsyncioCounter.bytes - before)
    row["join_and_settle_s"] = round(join_seconds, 1)
    row["answered_from_local_store"] = local
    row["latency_median_ms_network_only"] = 1000 * statistics.median(remote) if remote else None

    victim, reader = rng.sample(range(len(honest)), 2)
    await attacker.set(f"user-{victim}", f"{HOST}:9")
    value = await honest[reader].get(f"user-{victim}")
    row["forged_value"] = {
        "stores_attempted": "set() to the k closest",
        "lookup_returns": value,
        "verdict": "ACCEPTED" if value == f"{HOST}:9" else "refused",
    }

    target = 1
    errors_before = len(errors)
    sent = _send_garbage(ports[target])
    await asyncio.sleep(0.5)
    pong = await honest[2].protocol.ping((HOST, ports[target]), honest[2].node.id)
    # A key the node does not hold itself, so the get has to go over the network (if any).
    remote_keys = [
        i
        for i in range(len(honest))
        if i != target and honest[target].storage.get(_sha1(f"user-{i}")) is None
    ]
    other = remote_keys[0] if remote_keys else (target + 1) % len(honest)
    value = await honest[target].get(f"user-{other}")
    row["malformed"] = {
        "datagrams": sent,
        "unhandled_exceptions_logged": len(errors) - errors_before,
        "examples": sorted(set(errors[errors_before:]))[:4],
        "ping_answered": bool(pong[0]),
        "get_through_it_ok": value == f"{HOST}:{ports[other]}",
        "still_serving": bool(pong[0]),
    }
    row["implementation"] = "kademlia 2.2.3 (asyncio, unsigned values)"
    for server in servers:
        server.stop()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    ap.add_argument("--lookups", type=int, default=DEFAULT_LOOKUPS)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--name", default="baseline")
    args = ap.parse_args(argv)
    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
    logging.getLogger("3bc").setLevel(logging.CRITICAL)
    _Counter.install()
    _AsyncioCounter.install()
    ours = trio.run(run_ours, args.nodes, args.lookups, args.seed)
    theirs = asyncio.run(run_kademlia(args.nodes, args.lookups, args.seed))
    header = f"{'':10s} {'success':>8s} {'median ms':>10s} {'p95 ms':>8s} {'B/lookup':>9s}"
    header += "  forged  garbage"
    print(header)
    for name, row in (("ours", ours), ("kademlia", theirs)):
        print(
            f"{name:10s} {row['success']:8.1%} {row['latency_median_ms']:10.1f} "
            f"{row['latency_p95_ms']:8.1f} {row['bytes_per_lookup']:9.0f}  "
            f"{row['forged_value']['verdict']:8s} "
            f"{'serving' if row['malformed']['still_serving'] else 'DOWN'}"
        )
    payload = {"scenario": "baseline", "args": vars(args), "ours": ours, "kademlia": theirs}
    if args.json:
        path = dhtrun.write_json(args.name, payload)
        print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
