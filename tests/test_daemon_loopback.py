"""Real daemons on real UDP sockets on 127.0.0.1."""

import os
import socket
import time

import pytest
import trio

from overlay.dht.core import DhtConfig
from overlay.identity import Identity
from overlay.node import Clock, Node, NodeOptions
from tests.conftest import free_udp_port


async def start_nodes(nursery, tmp_path, count, config=None):
    nodes = []
    ports = [free_udp_port() for _ in range(count)]
    for i, port in enumerate(ports):
        state = tmp_path / f"n{i}"
        state.mkdir()
        node = Node(
            Identity.generate(),
            NodeOptions(
                state_dir=state,
                listen=[("127.0.0.1", port)],
                bootstrap=[("127.0.0.1", ports[0])] if i else [],
                handle_signals=False,
                dht=config or DhtConfig(),
            ),
        )
        await nursery.start(node.run)
        nodes.append(node)
    return nodes


async def test_thirty_daemons_find_every_other_by_key(tmp_path):
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, tmp_path, 30)
        await trio.sleep(3)  # joins and first publishes
        failures = []
        for a in nodes:
            for b in nodes:
                if a is b:
                    continue
                done = await a.lookup(b.identity.public_key, timeout=5)
                if done.record is None or done.record.addresses != (b.endpoints[0].local,):
                    failures.append(
                        (a.identity.public_key.hex()[:8], b.identity.public_key.hex()[:8])
                    )
        assert not failures, f"{len(failures)} of 870 lookups failed: {failures[:5]}"
        nursery.cancel_scope.cancel()


async def test_garbage_datagrams_then_lookups_still_work(tmp_path):
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, tmp_path, 4)
        await trio.sleep(1)
        target = nodes[1].endpoints[0].local
        rng = os.urandom
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(3000):
                size = 1 + i % 1400
                data = rng(size)
                if i % 3 == 0:
                    data = b"\xd0" + data  # looks like DHT, is not
                s.sendto(data, target)
                if i % 200 == 0:
                    await trio.sleep(0.01)
        await trio.sleep(0.5)
        done = await nodes[3].lookup(nodes[1].identity.public_key, timeout=5)
        assert done.record is not None
        done = await nodes[1].lookup(nodes[2].identity.public_key, timeout=5)
        assert done.record is not None
        assert sum(nodes[1].dht.stats.dropped.values()) >= 900
        nursery.cancel_scope.cancel()


async def test_routing_table_is_saved_and_reused(tmp_path):
    async with trio.open_nursery() as nursery:
        nodes = await start_nodes(nursery, tmp_path, 5)
        await trio.sleep(1.5)
        last = nodes[-1]
        assert len(last.dht.table) >= 3
        known = {c.public_key for c in last.dht.table}
        last.shutdown()
        await trio.sleep(0.2)
        assert (last.options.state_dir / "routing.json").exists()
        # Restart with no bootstrap at all: the saved table alone must bring it back.
        again = Node(
            last.identity,
            NodeOptions(
                state_dir=last.options.state_dir,
                listen=[last.endpoints[0].local],
                handle_signals=False,
            ),
        )
        await nursery.start(again.run)
        await trio.sleep(1.5)
        assert {c.public_key for c in again.dht.table} & known
        done = await again.lookup(nodes[0].identity.public_key, timeout=5)
        assert done.record is not None
        nursery.cancel_scope.cancel()


async def test_ipv6_daemons_find_each_other(tmp_path):
    async with trio.open_nursery() as nursery:
        nodes = []
        for i in range(3):
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                s.bind(("::1", 0))
                port = s.getsockname()[1]
            (tmp_path / f"v{i}").mkdir()
            node = Node(
                Identity.generate(),
                NodeOptions(
                    state_dir=tmp_path / f"v{i}",
                    listen=[("::1", port)],
                    bootstrap=[nodes[0].endpoints[0].local] if nodes else [],
                    handle_signals=False,
                ),
            )
            await nursery.start(node.run)
            nodes.append(node)
        await trio.sleep(1.5)
        done = await nodes[2].lookup(nodes[1].identity.public_key, timeout=5)
        assert done.record is not None
        assert done.record.addresses == (("::1", nodes[1].endpoints[0].local[1]),)
        assert {c.address[0] for c in nodes[2].dht.table} == {"::1"}
        nursery.cancel_scope.cancel()


async def test_clock_reads_perf_counter_on_the_system_clock_and_trio_under_a_mock():
    """The per-packet clock: wall-anchored, equal to trio's clock plus the offset either way."""
    clock = Clock()
    for _ in range(3):
        await trio.sleep(0.01)
        assert abs(clock.now() - (trio.current_time() + clock.offset)) < 1e-3
        assert abs(clock.now() - time.time()) < 0.05


async def test_clock_follows_a_mock_clock(autojump_clock):
    clock = Clock()
    before = clock.now()
    await trio.sleep(3600)  # jumps at once under the mock
    assert clock.now() - before == pytest.approx(3600, abs=1e-6)
    assert clock.to_trio(clock.now()) == pytest.approx(trio.current_time())
