"""Sessions between real daemons on 127.0.0.1: direct, forced through relays, relay failover."""

import contextlib
import dataclasses
import os
import socket

import trio
from hypothesis import given
from hypothesis import strategies as st

from overlay.dht.record import format_address
from overlay.identity import Identity
from overlay.node import Node, NodeOptions
from overlay.path.ice import NativePathSocket, NominatedPath
from overlay.sessions import IcePath, _IceTask, decode_offer, encode_offer
from tests.conftest import free_udp_port


async def start(nursery, tmp_path, name, bootstrap=None, **options):
    state = tmp_path / name
    state.mkdir()
    node = Node(
        Identity.generate(),
        NodeOptions(
            state_dir=state,
            listen=[("127.0.0.1", free_udp_port())],
            bootstrap=[bootstrap.endpoints[0].local] if bootstrap else [],
            handle_signals=False,
            ice=False,
            **options,
        ),
    )
    await nursery.start(node.run)
    return node


async def network(nursery, tmp_path, relays=2, direct=True):
    first = await start(nursery, tmp_path, "r0", relay=True)
    extra = [await start(nursery, tmp_path, f"r{i}", first, relay=True) for i in range(1, relays)]
    a = await start(nursery, tmp_path, "a", first, direct=direct)
    b = await start(nursery, tmp_path, "b", first, direct=direct)
    with trio.fail_after(10):
        while not (a.relay_candidates() and b.relay_candidates() and a._hints and b._hints):
            await trio.sleep(0.05)
    await trio.sleep(0.5)  # records republished with hints
    return [first, *extra], a, b


async def test_direct_session_carries_datagrams_both_ways(tmp_path):
    async with trio.open_nursery() as nursery:
        _, a, b = await network(nursery, tmp_path, relays=1)
        received = []
        b.sessions.incoming = lambda peer: nursery.start_soon(echo, peer, received)
        peer = await a.sessions.connect(b.identity.public_key)
        assert peer.path_kind == "direct"
        for i in range(50):
            peer.send(b"hello %d" % i)
        with trio.fail_after(5):
            answers = [await peer.receive() for _ in range(50)]
        assert answers == [b"HELLO %d" % i for i in range(50)]
        assert peer.peer_public_key == b.identity.public_key
        rtt = await peer.ping()
        assert rtt > 0
        nursery.cancel_scope.cancel()


async def echo(peer, received):
    while True:
        data = await peer.receive()
        received.append(data)
        peer.send(data.upper())


async def test_forced_relay_session_and_failover_to_the_second_relay(tmp_path):
    async with trio.open_nursery() as nursery:
        relays, a, b = await network(nursery, tmp_path, relays=2, direct=False)
        b.sessions.incoming = lambda peer: nursery.start_soon(echo, peer, [])
        peer = await a.sessions.connect(b.identity.public_key)
        assert peer.path_kind == "relayed"
        with trio.fail_after(5):
            while sum(s.alive(a.sessions.now()) for s in peer.selector.paths.values()) < 2:
                await trio.sleep(0.05)
        active = peer.selector.active
        # Kill the relay the session is using: shut its daemon down entirely.
        dead = next(r for r in relays if f"relay:127.0.0.1:{r.endpoints[0].local[1]}" == active)
        dead.shutdown()
        lost_at = trio.current_time()
        answered = None
        with trio.fail_after(10):
            while answered is None:
                peer.send(b"still there?")
                with trio.move_on_after(0.2):
                    answered = await peer.receive()
        assert answered == b"STILL THERE?"
        assert trio.current_time() - lost_at < 3.0
        assert peer.selector.active != active
        assert peer.path_kind == "relayed"
        alive = next(r for r in relays if r is not dead)
        assert alive.info()["relay_stats"]["forwarded_packets"] > 0
        nursery.cancel_scope.cancel()


def native_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return NativePathSocket(sock, ("127.0.0.1", 9), "ufrag", "p" * 22)


class RebindingNat:
    """A symmetric NAT in one process: b sends to `inside`, the world sees `outside`; `rebind`
    forgets the mapping, so the next packet leaves from a new port and answers to the old one are
    dropped, as conntrack -F does on the NAT bed."""

    def __init__(self, world):
        self.world = world
        self.inside = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.outside = None
        self.member = None

    async def start(self, nursery):
        await self.inside.bind(("127.0.0.1", 0))
        await self.rebind(nursery)
        nursery.start_soon(self._out)

    async def rebind(self, nursery):
        if self.outside is not None:
            self.outside.close()
        self.outside = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await self.outside.bind(("127.0.0.1", 0))
        nursery.start_soon(self._back, self.outside)

    async def _out(self):
        while True:
            data, self.member = await self.inside.recvfrom(2048)
            with contextlib.suppress(OSError):
                await self.outside.sendto(data, self.world)

    async def _back(self, outside):
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            while True:
                data, _ = await outside.recvfrom(2048)
                if self.member is not None:  # nothing went out yet: no mapping to answer
                    await self.inside.sendto(data, self.member)


async def test_direct_ice_path_follows_the_peer_to_its_new_nat_mapping(tmp_path):
    """The CI failure this guards: a symmetric NAT rebinds, the peer's ICE packets now come from
    a new port, and we kept answering the old one. Our side saw the path alive (it received), the
    peer never heard back."""
    async with trio.open_nursery() as nursery:
        _, a, b = await network(nursery, tmp_path, relays=1, direct=False)
        accepted = []
        b.sessions.incoming = lambda peer: accepted.append(peer)
        a_peer = await a.sessions.connect(b.identity.public_key)
        with trio.fail_after(5):
            while not accepted:
                await trio.sleep(0.02)
        b_peer = accepted[0]
        a_sock, b_sock = native_socket(), native_socket()
        nat = RebindingNat(a_sock.local_addr)
        await nat.start(nursery)
        b_sock.remote_addr = nat.inside.getsockname()
        a_sock.remote_addr = nat.outside.getsockname()
        for service, peer, sock in ((a.sessions, a_peer, a_sock), (b.sessions, b_peer, b_sock)):
            nominated = NominatedPath(
                sock, sock.local_addr, sock.remote_addr, "direct", "host", "host"
            )
            nursery.start_soon(_IceTask(service, controlling=True)._pump, peer, nominated)
        with trio.fail_after(5):
            while not (a_peer.path_kind == b_peer.path_kind == "direct"):
                await trio.sleep(0.02)
        old = nat.outside.getsockname()
        await nat.rebind(nursery)
        with trio.fail_after(3):
            rtt = await b_peer.ping()  # out on the ICE path from the new port, answer must follow
        assert rtt > 0
        ice = next(p for p in a_peer.paths.values() if isinstance(p, IcePath))
        assert ice.remote == nat.outside.getsockname() != old
        assert ice.path_id == "ice:" + format_address(old)  # the same path, moved
        assert a_peer.path_kind == "direct"
        nursery.cancel_scope.cancel()


async def test_connect_looks_again_when_a_stale_record_gets_no_answer(tmp_path):
    """A record fetched before the callee re-published (here: one without its hints, the only
    way to reach a callee that hides its address) is looked up again instead of failing."""
    async with trio.open_nursery() as nursery:
        _, a, b = await network(nursery, tmp_path, relays=1, direct=False)
        b.sessions.incoming = lambda peer: nursery.start_soon(echo, peer, [])
        real = a.sessions.lookup
        found = []

        async def stale_first(key):
            record = await real(key)
            found.append(record)
            if len(found) == 1:
                return dataclasses.replace(record, addresses=(), relays=(), seq=record.seq - 1)
            return record

        a.sessions.lookup = stale_first
        with trio.fail_after(10):
            peer = await a.sessions.connect(b.identity.public_key)
        assert len(found) >= 2 and found[0].relays
        assert peer.path_kind == "relayed"
        peer.send(b"reached")
        with trio.fail_after(5):
            assert await peer.receive() == b"REACHED"
        nursery.cancel_scope.cancel()


async def test_session_garbage_is_dropped_and_daemon_keeps_serving(tmp_path):
    async with trio.open_nursery() as nursery:
        _, a, b = await network(nursery, tmp_path, relays=1)
        target = b.endpoints[0].local
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(2000):
                kind = bytes([(0x00, 0x01, 0xE1, 0xE2, 0xE3, 0xE4, 0xF1, 0xF4)[i % 8]])
                s.sendto(kind + os.urandom(i % 1300), target)
                if i % 100 == 0:
                    await trio.sleep(0.005)
        await trio.sleep(0.3)
        b.sessions.incoming = lambda peer: nursery.start_soon(echo, peer, [])
        peer = await a.sessions.connect(b.identity.public_key)
        peer.send(b"ok")
        with trio.fail_after(5):
            assert await peer.receive() == b"OK"
        assert sum(e.stats.handler_errors for e in b.endpoints) == 0
        nursery.cancel_scope.cancel()


@given(st.binary(max_size=1100))
def test_offer_parser_gives_value_errors_only(data):
    with contextlib.suppress(ValueError):
        decode_offer(data)


def test_offer_round_trip_and_trimming():
    ice = {
        "ufrag": "abcd",
        "pwd": "x" * 22,
        "candidates": [f"candidate {i}" * 8 for i in range(30)],
    }
    relays = [(bytes([i]) * 32, ("203.0.113.5", 1000 + i)) for i in range(2)]
    data = encode_offer(ice, relays)
    offer = decode_offer(data)
    assert offer["relays"] == relays
    assert 0 < len(offer["ice"]["candidates"]) < 30  # trimmed to fit the handshake
