"""The daemon: one trio nursery wiring the UDP socket, the DHT core and the control socket.

Everything protocol-shaped lives in sans-IO cores; this module only moves datagrams and time
between them and the socket, and answers the control socket.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
import trio.testing

from overlay import control
from overlay.control import ControlServer, RpcError, param
from overlay.dht.core import (
    ContactVerified,
    DhtConfig,
    DhtCore,
    Forwarded,
    LookupDone,
    PublicAddressObserved,
)
from overlay.dht.messages import KIND_DHT
from overlay.dht.record import PeerRecord, format_address
from overlay.endpoint import Endpoint
from overlay.events import EventBus
from overlay.identity import Identity, IdentityError, parse_public_key, safety_words
from overlay.path.relay import DEFAULT_TOTAL_MBIT
from overlay.sessions import ANNOUNCE_INTERVAL, HINTS, ConnectError, SessionService, guarded
from overlay.wire import Address

log = logging.getLogger("3bc.node")

# The documented default UDP port: 0x3BC = 956 is privileged, so 30956.
DEFAULT_PORT = 30956
ROUTING_FILE = "routing.json"
# How long a lookup may take before the control socket answers "timed out".
LOOKUP_TIMEOUT = 10.0
# Saved contacts tried at start-up (the closest and most recently seen are kept).
MAX_SAVED_CONTACTS = 200


class Clock:
    """Wall-anchored time on trio's clock: the DHT compares record expiry across machines, and
    tests can still run under trio's MockClock."""

    def __init__(self) -> None:
        self.offset = time.time() - trio.current_time()
        if not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
            # trio's own clock is perf_counter plus a constant: read perf_counter directly. This
            # runs for every packet sent and received, where trio.current_time() cost ~5 % of a
            # sender's time in benchmarks.session.
            delta = self.offset + trio.current_time() - time.perf_counter()
            perf_counter = time.perf_counter

            def now() -> float:
                return perf_counter() + delta

            self.now = now  # type: ignore[method-assign]

    def now(self) -> float:
        return trio.current_time() + self.offset

    def to_trio(self, t: float) -> float:
        return t - self.offset


@dataclass
class NodeOptions:
    state_dir: Path
    listen: list[Address] = field(default_factory=lambda: [("0.0.0.0", DEFAULT_PORT)])
    bootstrap: list[Address] = field(default_factory=list)
    relay: bool = False
    relay_mbit: float = DEFAULT_TOTAL_MBIT  # all relayed pairs together
    # ICE through aioice; off for loopback-only use (aioice gathers every interface address).
    ice: bool = True
    # Direct paths on the daemon socket; off forces relays (tests, demos, privacy of one's IP).
    direct: bool = True
    stun: Address | None = None
    turn: Address | None = None
    turn_username: str | None = None
    turn_password: str | None = None
    # Who may ring us: none (contacts ring, a person answers), contacts (auto-answer contacts),
    # all (auto-answer everyone). Unknown keys are refused unless `all`.
    auto_answer: str = "none"
    dht: DhtConfig = field(default_factory=DhtConfig)
    handle_signals: bool = True


class Node:
    def __init__(self, identity: Identity, options: NodeOptions) -> None:
        self.identity = identity
        self.options = options
        self.events = EventBus()
        self.control = ControlServer(options.state_dir, self.events)
        self.endpoints: list[Endpoint] = []
        self.dht: DhtCore | None = None
        self.clock: Clock | None = None
        self.started = time.time()
        self._wake = trio.Event()
        self._sleep_until = float("inf")
        self._lookup_waiters: dict[int, trio.MemorySendChannel[LookupDone]] = {}
        self._observed: list[Address] = []
        self._cancel: trio.CancelScope | None = None
        self._hints: list[tuple[bytes, Address]] = []
        self._nursery: trio.Nursery | None = None
        self.calls: Any = None
        self._calls_lock = trio.Lock()
        self._call_methods: dict[str, Any] = {}
        self.options.dht.relay = options.relay
        self.sessions = SessionService(
            identity,
            self.events,
            self._now,
            relay_server=options.relay,
            ice=options.ice,
            direct=options.direct,
            stun_server=options.stun,
            turn_server=options.turn,
            turn_username=options.turn_username,
            turn_password=options.turn_password,
        )
        if self.sessions.relay is not None:
            self.sessions.relay.limit_total_mbit(options.relay_mbit)
        self._register_methods()

    def _now(self) -> float:
        assert self.clock is not None
        return self.clock.now()

    # --- lifecycle -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        Path(self.options.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.clock = Clock()
        self.sessions.now = self.clock.now  # the per-packet clock, without a wrapper call
        now = self.clock.now()
        self.dht = DhtCore(self.identity, self.options.dht, now=now)
        for address in self.options.listen:
            endpoint = Endpoint.bind(address)
            endpoint.route([KIND_DHT], self._on_dht)
            self.sessions.attach(endpoint)
            self.endpoints.append(endpoint)
        self.sessions.dht = self.dht
        self.sessions.flush_dht = self._flush  # type: ignore[method-assign]
        self.sessions.lookup = self._lookup_record
        self.sessions.relay_candidates = self.relay_candidates
        self.control.bind()
        try:
            with trio.CancelScope() as scope:
                self._cancel = scope
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.sessions.incoming = self._on_incoming_session
                    for endpoint in self.endpoints:
                        nursery.start_soon(endpoint.serve)
                    nursery.start_soon(self._timers)
                    await nursery.start(self.sessions.run)
                    nursery.start_soon(self._announce_loop)
                    nursery.start_soon(self.control.serve)
                    if self.options.handle_signals:
                        nursery.start_soon(self._signals)
                    self._start_dht(now)
                    log.info(
                        "daemon up key=%s listen=%s",
                        self.identity.public_key.hex(),
                        ",".join(format_address(e.local) for e in self.endpoints),
                    )
                    self.events.publish("daemon.up", public_key=self.identity.public_key.hex())
                    task_status.started()
        finally:
            self.save_routing_table()
            for endpoint in self.endpoints:
                endpoint.close()
            log.info("daemon down")

    def shutdown(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal %s: shutting down", signal.Signals(signum).name)
                self.shutdown()
                return

    def _start_dht(self, now: float) -> None:
        assert self.dht is not None
        for public_key, address in self._load_routing_table():
            self.dht.add_candidate(public_key, address, now)
        own = [e.local for e in self.endpoints]
        self.dht.bootstrap([a for a in self.options.bootstrap if a not in own], now)
        self.dht.set_record_addresses(self.record_addresses(), [], now)
        self._flush()

    # --- datagrams and time --------------------------------------------------------------------

    def _on_dht(self, data: bytes, source: Address, endpoint: Endpoint) -> None:
        assert self.dht is not None and self.clock is not None
        self.dht.receive(data, source, self.clock.now())
        self._flush()

    def _flush(self) -> None:
        """Send what the core queued, hand its events out, and re-arm the timer if needed."""
        assert self.dht is not None
        for address, data in self.dht.datagrams_to_send():
            self._endpoint_for(address).send(address, data)
        for event in self.dht.events():
            self._on_event(event)
        if self.dht.next_timeout() < self._sleep_until:
            self._wake.set()

    def _endpoint_for(self, address: Address) -> Endpoint:
        want_v6 = ":" in address[0]
        for endpoint in self.endpoints:
            if (":" in endpoint.local[0]) == want_v6 or ":" in endpoint.local[0]:
                return endpoint
        return self.endpoints[0]

    async def _timers(self) -> None:
        assert self.dht is not None and self.clock is not None
        while True:
            self._sleep_until = self.dht.next_timeout()
            with trio.move_on_at(self.clock.to_trio(self._sleep_until)):
                await self._wake.wait()
            self._wake = trio.Event()
            self.dht.handle_timeouts(self.clock.now())
            self._flush()

    def _on_event(self, event: object) -> None:
        if isinstance(event, LookupDone):
            waiter = self._lookup_waiters.pop(event.lookup_id, None)
            if waiter is not None:
                waiter.send_nowait(event)
        elif isinstance(event, ContactVerified):
            self.events.publish(
                "peer.added",
                public_key=event.public_key.hex(),
                address=format_address(event.address),
            )
        elif isinstance(event, PublicAddressObserved):
            self._on_observed(event.address)
        elif isinstance(event, Forwarded):
            self.sessions.on_forwarded(event.data, event.via, event.origin)

    def relay_candidates(self) -> list[tuple[bytes, Address]]:
        """Relay-capable contacts, fastest first: offered to peers for relayed paths."""
        assert self.dht is not None
        relays = [c for c in self.dht.table if c.relay and c.failures == 0]
        relays.sort(key=lambda c: c.rtt if c.rtt is not None else 1.0)
        return [(c.public_key, c.address) for c in relays]

    async def _announce_loop(self) -> None:
        """Keep NAT mappings open with a few hint nodes and name them in our record, so callers
        can reach us through them (relay-capable contacts first)."""
        assert self.dht is not None and self.clock is not None
        while True:
            contacts = [c for c in self.dht.table if c.failures == 0]
            # Keep the hints we have while they live (a new set means a new record to publish);
            # fill up with relay-capable, then fastest contacts.
            live = {(c.public_key, c.address) for c in contacts}
            hints = [h for h in self._hints if h in live]
            contacts.sort(key=lambda c: (not c.relay, c.rtt if c.rtt is not None else 1.0))
            for c in contacts:
                if len(hints) >= HINTS:
                    break
                if (c.public_key, c.address) not in hints:
                    hints.append((c.public_key, c.address))
            now = self.clock.now()
            for _pk, address in hints:
                self.dht.announce(address, now)
            if hints != self._hints:
                self._hints = hints
                self.dht.set_record_addresses(self.record_addresses(), hints, now)
            if self.options.stun is None:
                relays = self.relay_candidates()
                self.sessions.stun_server = (
                    relays[0][1] if relays else (hints[0][1] if hints else None)
                )
            self._flush()
            await trio.sleep(ANNOUNCE_INTERVAL if hints else 1.0)

    def _on_observed(self, address: Address) -> None:
        """Peers agree on how they see us: add a public address to our record if it is new."""
        assert self.dht is not None and self.clock is not None
        if address in self._observed or address in [e.local for e in self.endpoints]:
            return
        self._observed = [address, *self._observed][:2]
        self.events.publish("address.observed", address=format_address(address))
        self.dht.set_record_addresses(self.record_addresses(), self._hints, self.clock.now())

    def record_addresses(self) -> list[Address]:
        """Where others can reach us: bound addresses (wildcards expanded), then observed ones."""
        out: list[Address] = []
        for endpoint in self.endpoints:
            host, port = endpoint.local
            if host in ("0.0.0.0", "::"):
                out.extend((ip, port) for ip in _interface_addresses(with_v6=host == "::"))
            else:
                out.append((host, port))
        for address in self._observed:
            if address not in out:
                out.insert(0, address)
        return out[:4]

    # --- operations used by the control socket -----------------------------------------------

    async def lookup(self, public_key: bytes, timeout: float = LOOKUP_TIMEOUT) -> LookupDone:
        assert self.dht is not None and self.clock is not None
        send, receive = trio.open_memory_channel[LookupDone](1)
        lookup_id = self.dht.find_record(public_key, self.clock.now())
        self._lookup_waiters[lookup_id] = send
        self._flush()
        try:
            with trio.fail_after(timeout):
                return await receive.receive()
        finally:
            self._lookup_waiters.pop(lookup_id, None)

    # --- calls (media/ is loaded on first use: PyAV and numpy cost ~60 MB of RSS) --------------

    async def ensure_calls(self) -> Any:
        async with self._calls_lock:
            if self.calls is None:
                from media.callservice import CallService, register_control_methods
                from media.contacts import Contacts

                service = CallService(
                    self.sessions.connect,
                    contacts=Contacts(self.options.state_dir),
                    auto_answer=self.options.auto_answer,
                )
                assert self._nursery is not None
                await self._nursery.start(service.run)
                collector = _MethodCollector(self.events)
                register_control_methods(collector, service)
                self._call_methods = collector.methods
                self.calls = service
        return self.calls

    def _on_incoming_session(self, peer: Any) -> None:
        async def hand_over() -> None:
            service = await self.ensure_calls()
            service.on_incoming_session(peer)

        assert self._nursery is not None
        self._nursery.start_soon(guarded, hand_over)

    async def _lookup_record(self, public_key: bytes) -> PeerRecord | None:
        done = await self.lookup(public_key)
        return done.record

    def info(self) -> dict[str, Any]:
        assert self.dht is not None
        record = self.dht.own_record
        return {
            "api_version": control.API_VERSION,
            "public_key": self.identity.public_key.hex(),
            "node_id": self.identity.node_id.hex(),
            "safety_words": safety_words(self.identity.public_key),
            "listen": [format_address(e.local) for e in self.endpoints],
            "addresses": [format_address(a) for a in record.addresses] if record else [],
            "relay": self.options.relay,
            "peers": len(self.dht.table),
            "records_stored": len(self.dht.store),
            "uptime_s": round(time.time() - self.started, 1),
            "sessions": self.sessions.sessions(),
            "relay_pairs": self.sessions.relay.pair_count if self.sessions.relay else 0,
            "relay_mbit": self.options.relay_mbit if self.sessions.relay else 0,
            "relay_stats": asdict(self.sessions.relay.stats) if self.sessions.relay else {},
            "pid": os.getpid(),
            "dht": {
                "received": self.dht.stats.received,
                "sent": self.dht.stats.sent,
                "bytes_received": self.dht.stats.bytes_received,
                "bytes_sent": self.dht.stats.bytes_sent,
                "dropped": self.dht.stats.dropped,
            },
        }

    def peers(self) -> list[dict[str, Any]]:
        assert self.dht is not None and self.clock is not None
        now = self.clock.now()
        return [
            {
                "public_key": c.public_key.hex(),
                "address": format_address(c.address),
                "last_seen_s": round(now - c.last_seen, 1),
                "rtt_ms": None if c.rtt is None else round(c.rtt * 1000, 2),
                "failures": c.failures,
            }
            for c in sorted(self.dht.table, key=lambda c: c.node_id)
        ]

    def _register_methods(self) -> None:
        method = self.control.method

        @method("node.info")
        async def _info(params: dict[str, Any]) -> Any:
            return self.info()

        @method("dht.peers")
        async def _peers(params: dict[str, Any]) -> Any:
            return self.peers()

        @method("dht.lookup")
        async def _lookup(params: dict[str, Any]) -> Any:
            try:
                public_key = parse_public_key(param(params, "public_key", str))
            except IdentityError as exc:
                raise RpcError(control.INVALID_PARAMS, str(exc)) from None
            timeout = param(params, "timeout", float, LOOKUP_TIMEOUT)
            if not 0 < timeout <= 60:
                raise RpcError(control.INVALID_PARAMS, "timeout must be in (0, 60] seconds")
            started = time.perf_counter()
            try:
                done = await self.lookup(public_key, timeout)
            except trio.TooSlowError:
                raise RpcError(control.TIMEOUT, f"lookup timed out after {timeout:g} s") from None
            if done.record is None:
                raise RpcError(
                    control.NOT_FOUND,
                    f"no record for {public_key.hex()} (asked {done.queries} nodes)",
                    {"queries": done.queries},
                )
            result = done.record.to_json()
            result.update(
                {
                    "record": {
                        "body": done.record.body.hex(),
                        "signature": done.record.signature.hex(),
                    },
                    "hops": done.hops,
                    "queries": done.queries,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                }
            )
            return result

        @method("session.list")
        async def _sessions(params: dict[str, Any]) -> Any:
            return self.sessions.sessions()

        @method("session.ping")
        async def _ping(params: dict[str, Any]) -> Any:
            try:
                public_key = parse_public_key(param(params, "public_key", str))
            except IdentityError as exc:
                raise RpcError(control.INVALID_PARAMS, str(exc)) from None
            count = param(params, "count", int, 4)
            interval = param(params, "interval", float, 0.5)
            if not 1 <= count <= 1000 or not 0 <= interval <= 10:
                raise RpcError(control.INVALID_PARAMS, "count 1..1000, interval 0..10 s")
            try:
                peer = await self.sessions.connect(public_key)
            except ConnectError as exc:
                raise RpcError(control.UNAVAILABLE, str(exc)) from None
            rtts: list[float | None] = []
            paths = []
            for i in range(count):
                if i:
                    await trio.sleep(interval)
                with trio.move_on_after(2.0):
                    rtts.append(round(await peer.ping() * 1000, 3))
                    paths.append(peer.path_kind)
                    continue
                rtts.append(None)
                paths.append(peer.path_kind)
            answered = sorted(r for r in rtts if r is not None)
            return {
                "peer": public_key.hex(),
                "path": peer.path_kind,
                "paths": paths,
                "rtt_ms": answered[len(answered) // 2] if answered else None,
                "rtts_ms": rtts,
                "lost": sum(1 for r in rtts if r is None),
                "setup_ms": peer.setup_ms,
            }

        for name in CALL_METHODS:

            async def delegate(params: dict[str, Any], name: str = name) -> Any:
                await self.ensure_calls()
                return await self._call_methods[name](params)

            method(name)(delegate)

        @method("daemon.shutdown")
        async def _shutdown(params: dict[str, Any]) -> Any:
            self.shutdown()
            return {"stopping": True}

    # --- persistence ---------------------------------------------------------------------------

    def save_routing_table(self) -> None:
        if self.dht is None:
            return
        contacts = sorted(self.dht.table, key=lambda c: -c.last_seen)[:MAX_SAVED_CONTACTS]
        data = [{"public_key": c.public_key.hex(), "address": list(c.address)} for c in contacts]
        path = Path(self.options.state_dir) / ROUTING_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def _load_routing_table(self) -> list[tuple[bytes, Address]]:
        path = Path(self.options.state_dir) / ROUTING_FILE
        try:
            data = json.loads(path.read_text())
            return [
                (
                    parse_public_key(entry["public_key"]),
                    (str(entry["address"][0]), int(entry["address"][1])),
                )
                for entry in data[:MAX_SAVED_CONTACTS]
            ]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError, IndexError, IdentityError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return []


# Registered at start-up, served by media/callservice.py once it is loaded.
CALL_METHODS = (
    "call.place",
    "call.answer",
    "call.reject",
    "call.hangup",
    "call.list",
    "call.stats",
    "call.policy",
    "contacts.add",
    "contacts.list",
    "contacts.remove",
)


class _MethodCollector:
    """Stands in for the control server while media/ registers its methods."""

    def __init__(self, events: EventBus) -> None:
        self.methods: dict[str, Any] = {}
        self.events = events

    def method(self, name: str) -> Any:
        def register(fn: Any) -> Any:
            self.methods[name] = fn
            return fn

        return register


def _interface_addresses(with_v6: bool) -> list[str]:
    """Non-loopback addresses of this host's interfaces (for a wildcard-bound socket)."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                addr = ipaddress.ip_address(text)
            except ValueError:
                continue
            if addr.is_loopback or addr.is_link_local or (addr.version == 6 and not with_v6):
                continue
            out.append(str(addr))
    return out
