"""Peer sessions in the daemon: connect by key, accept, and keep every session on its best path.

This trio shell wires the sans-IO cores together: the handshake and transport crypto
(overlay/session), DHT signalling through hint nodes (overlay/dht), ICE via aioice, blind relays
and the STUN reflector (overlay/path), and the path selector. Sessions are found by their
receiver index, never by address, so a packet is accepted from any path — which is what lets a
session move from a relay to a punched path (or to a second relay) without a new handshake.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from overlay import wire
from overlay.dht.record import PeerRecord, format_address
from overlay.endpoint import Endpoint
from overlay.identity import Identity
from overlay.inbox import Inbox, InboxClosed
from overlay.path import relay as relay_mod
from overlay.path import stun_reflector
from overlay.path.errors import PathError
from overlay.path.selector import PathSelector
from overlay.session import (
    KIND_COOKIE_REPLY,
    KIND_MSG1,
    KIND_MSG2,
    KIND_TRANSPORT,
    MAX_HANDSHAKE_PAYLOAD,
    TRANSPORT_OVERHEAD,
    Accepted,
    CookieReceived,
    CookieReply,
    Established,
    Initiator,
    Responder,
    Session,
    SessionError,
    peek_receiver_index,
)

log = logging.getLogger("3bc.sessions")

Address = wire.Address

# Inner message types (first plaintext byte). Below APP_DATA the session layer keeps for itself.
PROBE, PROBE_ACK, PING, PONG, CLOSE = 0x01, 0x02, 0x03, 0x04, 0x05
APP_DATA = 0x10
# The largest datagram an upper layer may send: a sealed packet stays under 1232 B even inside a
# relay DATA header (17 B), the IPv6-minimum-MTU-safe size QUIC and DNS use.
MAX_APP_DATAGRAM = 1150
# Handshake: msg1 is re-sent (freshly built) this often until msg2 arrives.
HANDSHAKE_RETRY = 1.0
# Unanswered for this many handshake retries: look the callee's record up again (bounded), since
# a record fetched just before the callee re-published can lack the hints that reach it.
RELOOKUP_EVERY = 3
RELOOKUP_TIMEOUT = 2.0
CONNECT_TIMEOUT = 15.0
# ICE may take a while on impaired links; a failing pair is given up after this (aioice itself
# would take ~63 s).
ICE_TIMEOUT = 10.0
# A record not found is looked up again this often before giving up (a freshly started callee
# stores its record within a few seconds).
LOOKUP_RETRIES = 2
LOOKUP_RETRY_PAUSE = 1.0
# How many relays a session joins at once: two, so losing one leaves the other already joined.
RELAYS_PER_SESSION = 2
# Sessions nobody sends application data on are closed after this (probes keep paths open but do
# not count as use).
IDLE_TIMEOUT = 120.0
# A session whose every path has been silent this long is declared down.
STRANDED_AFTER = 20.0
# A session that never got a single packet through on any path is closed after this, so a fresh
# attempt can follow (on the NAT bed ICE through TURN did this ~1 in 3 times while aioice's
# aggressive nomination let the two sides pick different pairs; see IceAgent).
NEVER_UP_AFTER = 10.0
# A relay path silent this long is re-joined (once per interval): cheap, and it is how a session
# survives its own NAT rebinding while relayed.
REJOIN_INTERVAL = 1.0
APP_QUEUE = 1024
TICK = 0.1
MAX_SESSIONS = 256
# Hint nodes a daemon announces to (its record's relay hints) and how often (NAT mappings).
HINTS = 3
ANNOUNCE_INTERVAL = 20.0
_PROBE = struct.Struct("!Bd8s")
_RECEIVER_INDEX = struct.Struct("!I")  # at offset 1 of a transport packet
_RELAY_DATA = int(relay_mod.Kind.DATA)  # a plain int: enum member lookups per packet add up
_APP_PREFIX = bytes([APP_DATA])


class SessionClosed(Exception):
    """The session ended (hung up, idle, or every path lost)."""


class ConnectError(Exception):
    """A session could not be opened; the message says why, for a person."""


# --- paths ------------------------------------------------------------------------------------


@dataclass
class MainPath:
    """The daemon socket straight to the peer (public peers, same LAN, full cone, loopback)."""

    endpoint: Endpoint
    address: Address
    kind: str = "direct"

    @property
    def path_id(self) -> str:
        return "main:" + format_address(self.address)

    def send(self, packet: bytes) -> None:
        self.endpoint.send(self.address, packet)


@dataclass(eq=False)
class RelayPath:
    endpoint: Endpoint
    client: relay_mod.RelayClient
    owner: PeerSession
    kind: str = "relayed"
    rejoined: float = 0.0

    @property
    def path_id(self) -> str:
        return "relay:" + format_address(self.client.relay_addr)

    def send(self, packet: bytes) -> None:
        if self.client.joined:
            self.endpoint.send(self.client.relay_addr, self.client.wrap(packet))


@dataclass
class IcePath:
    """A pair nominated by ICE; direct pairs run on a trio-native socket, TURN stays in aioice.

    The id names the nominated remote for the path's whole life, even after `follow` moved it."""

    socket: Any
    kind: str
    remote: Address
    outbox: trio.MemorySendChannel[bytes] | None = None
    path_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.path_id = "ice:" + format_address(self.remote)

    def follow(self, source: Address) -> None:
        """An authentic datagram came from `source`: the peer's NAT rebound, so answer there
        (WireGuard's roaming). Without this, the peer's packets still arrive but ours go to a
        mapping that no longer exists: a one-way path that looks alive from this side."""
        if self.kind == "direct":
            log.info("ICE path %s: peer moved to %s", self.path_id, format_address(source))
            self.remote = self.socket.remote_addr = source

    def send(self, packet: bytes) -> None:
        if self.outbox is not None:
            with contextlib.suppress(
                trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError
            ):
                self.outbox.send_nowait(packet)
        else:
            with contextlib.suppress(PathError):
                self.socket.send_nowait(packet)


AnyPath = MainPath | RelayPath | IcePath


# --- one session ------------------------------------------------------------------------------


@dataclass(eq=False)
class PeerSession:
    """What upper layers (calls, ping) hold: send/receive datagrams to one authenticated peer."""

    service: SessionService
    session: Session
    initiator: bool
    started: float
    selector: PathSelector = field(default_factory=PathSelector)
    paths: dict[str, AnyPath] = field(default_factory=dict)
    relay_list: list[tuple[bytes, Address]] = field(default_factory=list)
    closed: bool = False
    confirmed: bool = False
    last_app: float = 0.0
    setup_ms: float | None = None
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    inbox: Inbox = field(default_factory=lambda: Inbox(APP_QUEUE))
    _pings: dict[bytes, trio.MemorySendChannel[float]] = field(default_factory=dict)
    _probes: dict[bytes, tuple[str, float]] = field(default_factory=dict)
    main_paths: dict[Address, str] = field(default_factory=dict)

    # The interface media/ codes against (media/session_api.py).
    @property
    def peer_public_key(self) -> bytes:
        return self.session.peer_public_key

    @property
    def path_kind(self) -> str:
        return self.selector.active_kind or "none"

    @property
    def path_changes(self) -> int:
        return self.selector.changes

    @property
    def rtt(self) -> float | None:
        return self.selector.active_rtt

    def send(self, data: bytes) -> None:
        if self.closed:
            raise SessionClosed("session closed")
        if len(data) > MAX_APP_DATAGRAM:
            raise ValueError(f"datagram of {len(data)} B exceeds {MAX_APP_DATAGRAM}")
        now = self.service.now()
        self.last_app = now
        self._send_inner(_APP_PREFIX + data, now=now)

    async def receive(self) -> bytes:
        return (await self.receive_batch(1))[0]

    async def receive_batch(self, max_count: int = 256) -> list[bytes]:
        """Everything queued (at least one datagram), with one checkpoint instead of one per
        datagram: a reader at media or benchmark rates keeps up with the socket's bursts."""
        try:
            return await self.inbox.get_batch(max_count)
        except InboxClosed:
            raise SessionClosed("session closed") from None

    async def ping(self) -> float:
        """One round trip on the active path, in seconds."""
        nonce = os.urandom(8)
        send, receive = trio.open_memory_channel[float](1)
        self._pings[nonce] = send
        try:
            self._send_inner(_PROBE.pack(PING, time.perf_counter(), nonce))
            return await receive.receive()
        finally:
            self._pings.pop(nonce, None)

    def close(self, notify: bool = True) -> None:
        if self.closed:
            return
        if notify:
            self._send_inner(bytes([CLOSE]))
        self.closed = True
        self.inbox.close()
        self.cancel.cancel()
        self.service._forget(self)

    def info(self) -> dict[str, Any]:
        now = self.service.now()
        return {
            "peer": self.peer_public_key.hex(),
            "initiator": self.initiator,
            "path": self.path_kind,
            "active": self.selector.active,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 2),
            "paths": [
                {
                    "id": s.path_id,
                    "kind": s.kind,
                    "alive": s.alive(now),
                    "rtt_ms": None if s.rtt is None else round(s.rtt * 1000, 2),
                }
                for s in self.selector.paths.values()
            ],
            "path_changes": self.selector.changes,
            "age_s": round(now - self.started, 1),
            "packets_sent": self.session.stats.sent,
            "packets_received": self.session.stats.accepted,
            "dropped": self.session.stats.total_dropped,
            "setup_ms": self.setup_ms,
        }

    # --- internals -----------------------------------------------------------------------------

    def _send_inner(
        self, plaintext: bytes, path_id: str | None = None, now: float | None = None
    ) -> None:
        path = self.paths.get(path_id or self.selector.active or "")
        if path is None:
            return
        try:
            packet = self.session.seal(plaintext, self.service.now() if now is None else now)
        except SessionError:
            self.close(notify=False)
            return
        path.send(packet)

    def add_path(self, path: AnyPath, alive: bool = False, prefer: bool = False) -> None:
        now = self.service.now()
        before = self.selector.active_kind
        self.paths[path.path_id] = path
        self.selector.add(path.path_id, path.kind, now, alive=alive, prefer=prefer)
        self._probe(path.path_id, now)
        self._after_select(before)

    def add_main_path(self, endpoint: Endpoint, address: Address, prefer: bool = False) -> str:
        """The daemon socket straight to `address`, which just sent us an authentic packet."""
        main = MainPath(endpoint, address)
        self.main_paths[address] = main.path_id
        self.add_path(main, alive=True, prefer=prefer)
        return main.path_id

    def _probe(self, path_id: str, now: float) -> None:
        nonce = os.urandom(8)
        self._probes[nonce] = (path_id, now)
        if len(self._probes) > 64:
            self._probes.pop(next(iter(self._probes)))
        self._send_inner(_PROBE.pack(PROBE, now, nonce), path_id)

    def on_plaintext(self, plaintext: bytes, path_id: str, now: float) -> None:
        state = self.selector.paths.get(path_id)
        if (
            state is not None
            and state.alive(now)
            and self.confirmed
            and plaintext
            and plaintext[0] >= APP_DATA
        ):
            # The per-packet case at media rates: app data on a path already alive, so the
            # selector has nothing to re-choose (its on_receive would only refresh last_rx).
            state.last_rx = now
            self.last_app = now
            self.inbox.put(plaintext[1:])
            return
        changes = self.selector.changes
        before = self.selector.active_kind
        self.selector.on_receive(path_id, now)
        if not self.confirmed:
            self.confirmed = True
            self.service._confirmed(self)
        kind = plaintext[0] if plaintext else 0
        if kind >= APP_DATA:
            self.last_app = now
            self.inbox.put(plaintext[1:])  # a reader that fell behind loses datagrams, as UDP would
            if self.selector.changes != changes:
                self._after_select(before)
            return
        if kind in (PROBE, PING) and len(plaintext) == _PROBE.size:
            _, sent, nonce = _PROBE.unpack(plaintext)
            reply = PROBE_ACK if kind == PROBE else PONG
            self._send_inner(_PROBE.pack(reply, sent, nonce), path_id if kind == PROBE else None)
        elif kind == PROBE_ACK and len(plaintext) == _PROBE.size:
            _, _sent, nonce = _PROBE.unpack(plaintext)
            probe = self._probes.pop(nonce, None)
            if probe is not None and probe[0] == path_id:
                self.selector.on_rtt(path_id, now - probe[1])
        elif kind == PONG and len(plaintext) == _PROBE.size:
            _, sent, nonce = _PROBE.unpack(plaintext)
            waiter = self._pings.get(nonce)
            if waiter is not None:
                waiter.send_nowait(time.perf_counter() - sent)
        elif kind == CLOSE:
            self.close(notify=False)
            return
        self._after_select(before)

    def tick(self, now: float) -> None:
        before = self.selector.active_kind
        for path_id in self.selector.expire(now):
            self.paths.pop(path_id, None)
        self.selector.tick(now)
        for path_id in self.selector.due_probes(now):
            self._probe(path_id, now)
        for path in list(self.paths.values()):
            if isinstance(path, RelayPath):
                state = self.selector.paths.get(path.path_id)
                if (
                    state is not None
                    and path.client.joined
                    and state.last_rx is not None
                    and not state.alive(now)
                    and now - path.rejoined >= REJOIN_INTERVAL
                ):
                    # Silent relay path: our NAT may have rebound (new source port), and the
                    # relay only forwards for the address we joined from. Join again.
                    path.rejoined = now
                    path.endpoint.send(path.client.relay_addr, path.client.rejoin(now))
                out, events = path.client.handle_timeout(now)
                for data in out:
                    path.endpoint.send(path.client.relay_addr, data)
                if any(isinstance(e, relay_mod.JoinFailedEvent) for e in events):
                    self.paths.pop(path.path_id, None)
                    self.selector.remove(path.path_id, now)
        self._after_select(before)
        silent = self.selector.silent_for(now)
        # A session none of whose paths ever carried a packet is given up sooner: a fresh
        # attempt (new handshake, new ICE) is the only thing that can still help it.
        limit = NEVER_UP_AFTER if silent == float("inf") else STRANDED_AFTER
        if min(silent, now - self.started) > limit:
            log.info("session with %s lost every path", self.peer_public_key.hex()[:12])
            self.close(notify=False)
        elif now - max(self.last_app, self.started) > IDLE_TIMEOUT:
            self.close()

    def _after_select(self, before: str | None) -> None:
        after = self.selector.active_kind
        if after != before and after is not None:
            self.service.events.publish(
                "session.path",
                peer=self.peer_public_key.hex(),
                path=after,
                previous=before,
            )


# --- the service ------------------------------------------------------------------------------


@dataclass
class _Route:
    """How a handshake packet reached us, so the answer goes back the same way."""

    endpoint: Endpoint
    address: Address  # the peer's address (as seen by us or by the hint)
    via: Address | None = None  # the hint node, when it came forwarded


@dataclass
class _Pending:
    initiator: Initiator
    done: trio.MemorySendChannel[tuple[Established, _Route]]


class SessionService:
    def __init__(
        self,
        identity: Identity,
        events: Any,
        now: Callable[[], float],
        *,
        relay_server: bool,
        ice: bool,
        direct: bool,
        stun_server: Address | None = None,
        turn_server: Address | None = None,
        turn_username: str | None = None,
        turn_password: str | None = None,
    ) -> None:
        self.identity = identity
        self.events = events
        self.now = now
        self.responder = Responder(identity)
        self.relay = relay_mod.RelayServer() if relay_server else None
        self.ice_enabled = ice
        self.direct_enabled = direct
        self.stun_server = stun_server
        self.turn = (turn_server, turn_username, turn_password)
        self.by_index: dict[int, PeerSession] = {}
        self.by_peer: dict[bytes, PeerSession] = {}
        self.pending: dict[int, _Pending] = {}
        self.relay_clients: dict[Address, list[RelayPath]] = {}
        self.incoming: Callable[[PeerSession], None] | None = None
        self.nursery: trio.Nursery | None = None
        self.endpoints: list[Endpoint] = []
        self.dht: Any = None
        self.lookup: Callable[[bytes], Awaitable[PeerRecord | None]] | None = None
        self.relay_candidates: Callable[[], list[tuple[bytes, Address]]] = list

    # --- wiring --------------------------------------------------------------------------------

    def attach(self, endpoint: Endpoint) -> None:
        self.endpoints.append(endpoint)
        endpoint.route([0x00, 0x01], self._on_stun)
        endpoint.route([KIND_MSG1, KIND_MSG2, KIND_COOKIE_REPLY], self._on_handshake)
        endpoint.route([KIND_TRANSPORT], self._on_transport)
        endpoint.route(list(range(0xF1, 0xF6)), self._on_relay)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(TICK)
                now = self.now()
                for peer in list(self.by_index.values()):
                    peer.tick(now)
                if self.relay is not None:
                    self.relay.handle_timeout(now)

    # --- datagrams in --------------------------------------------------------------------------

    def _on_stun(self, data: bytes, source: Address, endpoint: Endpoint) -> None:
        if stun_reflector.is_stun(data):
            reply = stun_reflector.answer(data, source)
            if reply is not None:
                endpoint.send(source, reply)

    def _on_relay(self, data: bytes, source: Address, endpoint: Endpoint) -> None:
        clients = self.relay_clients.get(source)
        if clients:
            now = self.now()
            for path in clients:
                for event in path.client.receive(data, source, now):
                    if isinstance(event, relay_mod.DataEvent):
                        self._on_transport(event.payload, None, None, path.path_id)
                    elif isinstance(event, relay_mod.JoinedEvent):
                        # Probe at once: the path comes alive one round trip after the second
                        # member joins, not at the next periodic probe.
                        path.owner._probe(path.path_id, now)
                for out in path.client.take_outgoing():
                    endpoint.send(source, out)
            return
        if self.relay is not None:
            if data[0] == _RELAY_DATA:
                other = self.relay.forward(data, source, self.now())
                if other is not None:
                    endpoint.send(other, data)
                return
            for out in self.relay.receive(data, source, self.now()):
                endpoint.send(out.addr, out.data)

    def _on_handshake(self, data: bytes, source: Address, endpoint: Endpoint) -> None:
        self._handshake(data, _Route(endpoint, source))

    def on_forwarded(self, data: bytes, via: Address, origin: Address) -> None:
        """A handshake packet that came through a hint node (DHT `Forwarded` event)."""
        if data and data[0] in (KIND_MSG1, KIND_MSG2, KIND_COOKIE_REPLY):
            self._handshake(data, _Route(self.endpoints[0], origin, via))

    def _handshake(self, data: bytes, route: _Route) -> None:
        """MSG1 starts a responder; MSG2 and cookie replies go to the initiator waiting for them
        (transport packets never come here: the endpoint routes them to `_on_transport`)."""
        if data[0] == KIND_MSG1:
            self._on_msg1(data, route)
        else:
            self._on_msg2(data, route)

    def _on_transport(
        self,
        packet: bytes,
        source: Address | None,
        endpoint: Endpoint | None,
        path_id: str | None = None,
    ) -> None:
        """The per-packet hot path: find the session by index, open, hand over. Its first three
        arguments are an endpoint handler's, so the daemon socket routes transport packets here
        without a dispatcher call in between; relay paths pass their path id, ICE paths their
        path id and the datagram's source."""
        if len(packet) < TRANSPORT_OVERHEAD or packet[0] != KIND_TRANSPORT:
            return
        peer = self.by_index.get(_RECEIVER_INDEX.unpack_from(packet, 1)[0])
        if peer is None or peer.closed:
            return
        now = self.now()
        try:
            plaintext = peer.session.open(packet, now)
        except SessionError:
            return
        if path_id is None:
            if not self.direct_enabled or endpoint is None or source is None:
                return
            path_id = peer.main_paths.get(source)
            if path_id is None or path_id not in peer.paths:
                # Roaming (a new source address), or a source whose path was dropped earlier
                # (expired or dead): without re-adding it, its packets would never revive a path.
                path_id = peer.add_main_path(endpoint, source, prefer=True)
        elif source is not None:
            path = peer.paths.get(path_id)
            if isinstance(path, IcePath) and source != path.remote:
                path.follow(source)  # before the answer this very packet may ask for
        peer.on_plaintext(plaintext, path_id, now)

    # --- handshakes ----------------------------------------------------------------------------

    def _on_msg1(self, data: bytes, route: _Route) -> None:
        if route.via is None and not self.direct_enabled:
            return
        key = f"{route.address[0]}:{route.address[1]}".encode()
        try:
            result = self.responder.receive(
                data, key, self.now(), under_load=len(self.by_index) >= MAX_SESSIONS // 2
            )
        except SessionError:
            return
        if isinstance(result, CookieReply):
            self._send_route(route, result.message)
            return
        if self.nursery is not None:
            self.nursery.start_soon(guarded, self._accept, result, route)

    async def _accept(self, accepted: Accepted, route: _Route) -> None:
        try:
            offer = decode_offer(accepted.payload)
        except ValueError:
            return
        own_relays = self.relay_candidates()[:RELAYS_PER_SESSION]
        ice_task = None
        local_ice = None
        if self.ice_enabled and offer.get("ice") is not None:
            ice_task = _IceTask(self, controlling=False)
            local_ice = await ice_task.gather(self.nursery)
        payload = encode_offer(local_ice, own_relays)
        reply = accepted.reply(payload, self.now())
        self._send_route(route, reply.message)
        relays = own_relays or offer["relays"]
        peer = self._new_peer(reply.session, initiator=False, relays=relays)
        if route.via is None:
            peer.add_main_path(route.endpoint, route.address)
        self._start_paths(peer, offer.get("ice"), ice_task)
        log.info("session accepted from %s", peer.peer_public_key.hex()[:12])

    def _on_msg2(self, data: bytes, route: _Route) -> None:
        try:
            index = peek_receiver_index(data)
        except SessionError:
            return
        pending = self.pending.get(index)
        if pending is None:
            return
        try:
            result = pending.initiator.receive(data, self.now())
        except SessionError:
            return
        if isinstance(result, CookieReceived):
            self._send_route(route, result.message)
            return
        self.pending.pop(index, None)
        with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
            pending.done.send_nowait((result, route))

    def _send_route(self, route: _Route, data: bytes) -> None:
        if route.via is None:
            route.endpoint.send(route.address, data)
        else:
            self.dht.forward_back(route.via, route.address, data, self.now())
            self.flush_dht()

    # --- connect -------------------------------------------------------------------------------

    async def connect(self, public_key: bytes, timeout: float = CONNECT_TIMEOUT) -> PeerSession:
        existing = self.by_peer.get(public_key)
        if existing is not None and not existing.closed:
            return existing
        if public_key == self.identity.public_key:
            raise ConnectError("that is this daemon's own key")
        started = time.perf_counter()
        assert self.lookup is not None and self.nursery is not None
        with trio.move_on_after(timeout) as scope:
            record = await self.lookup(public_key)
            for _ in range(LOOKUP_RETRIES):
                if record is not None:
                    break
                # A callee that has just started may not have stored its record yet.
                await trio.sleep(LOOKUP_RETRY_PAUSE)
                record = await self.lookup(public_key)
            if record is None:
                raise ConnectError(f"nobody with key {public_key.hex()} is in the network")
            log.info(
                "connecting to %s: record seq %d, %d addresses, %d hints",
                public_key.hex()[:12],
                record.seq,
                len(record.addresses),
                len(record.relays),
            )
            ice_task = None
            local_ice = None
            if self.ice_enabled and not _loopback_only(record):
                ice_task = _IceTask(self, controlling=True)
                local_ice = await ice_task.gather(self.nursery)
            own_relays = self.relay_candidates()[:RELAYS_PER_SESSION]
            payload = encode_offer(local_ice, own_relays)
            send, receive = trio.open_memory_channel[tuple[Established, _Route]](1)
            indexes: list[int] = []
            try:
                for attempt in itertools.count(1):
                    initiator = Initiator(
                        self.identity, public_key, payload, self.now(), timestamp_ns=time.time_ns()
                    )
                    self.pending[initiator.local_index] = _Pending(initiator, send)
                    indexes.append(initiator.local_index)
                    self._send_msg1(record, initiator.message)
                    with trio.move_on_after(HANDSHAKE_RETRY):
                        established, route = await receive.receive()
                        break
                    if attempt % RELOOKUP_EVERY == 0:
                        record = await self._fresher_record(record)
            finally:
                for index in indexes:
                    self.pending.pop(index, None)
        if scope.cancelled_caught:
            if ice_task is not None:
                ice_task.cancel()
            raise ConnectError(f"no answer from {public_key.hex()[:16]}… within {timeout:g} s")
        offer = decode_offer(established.payload)
        relays = offer["relays"] or own_relays
        peer = self._new_peer(established.session, initiator=True, relays=relays)
        peer.setup_ms = round((time.perf_counter() - started) * 1000, 2)
        if route.via is None:
            peer.add_main_path(route.endpoint, route.address)
        self._start_paths(peer, offer.get("ice"), ice_task)
        # A session exists as soon as the handshake completes; wait (briefly) for a live path.
        with trio.move_on_after(max(0.5, timeout - (time.perf_counter() - started))):
            while not peer.selector.any_alive(self.now()) and not peer.closed:
                await trio.sleep(0.02)
        return peer

    async def _fresher_record(self, record: PeerRecord) -> PeerRecord:
        """The callee's record again, if the network has a newer one: it may have re-published
        with hints or addresses that our copy lacks (a callee that just started or moved)."""
        assert self.lookup is not None
        with trio.move_on_after(RELOOKUP_TIMEOUT):
            fresh = await self.lookup(record.public_key)
            if fresh is not None and fresh.seq > record.seq:
                log.info("callee's record moved on (seq %d -> %d)", record.seq, fresh.seq)
                return fresh
        return record

    def _send_msg1(self, record: PeerRecord, message: bytes) -> None:
        now = self.now()
        if self.direct_enabled:
            for address in record.addresses:
                endpoint = self._endpoint_for(address)
                if endpoint is not None:
                    endpoint.send(address, message)
        for _pk, hint in record.relays:
            self.dht.forward(hint, record.public_key, message, now)
        self.flush_dht()

    def _endpoint_for(self, address: Address) -> Endpoint | None:
        want_v6 = ":" in address[0]
        for endpoint in self.endpoints:
            if (":" in endpoint.local[0]) == want_v6 or endpoint.local[0] == "::":
                return endpoint
        return None

    # --- session lifecycle ---------------------------------------------------------------------

    def _new_peer(
        self, session: Session, initiator: bool, relays: list[tuple[bytes, Address]]
    ) -> PeerSession:
        peer = PeerSession(self, session, initiator, self.now(), relay_list=relays)
        self.by_index[session.local_index] = peer
        if initiator:
            self._confirmed(peer)
        self.events.publish("session.up", peer=peer.peer_public_key.hex(), initiator=initiator)
        return peer

    def _confirmed(self, peer: PeerSession) -> None:
        """The peer used this session: it becomes the one for that key (older ones are closed)."""
        peer.confirmed = True
        old = self.by_peer.get(peer.peer_public_key)
        self.by_peer[peer.peer_public_key] = peer
        if old is not None and old is not peer:
            old.close(notify=False)
        if not peer.initiator and self.incoming is not None:
            self.incoming(peer)

    def _forget(self, peer: PeerSession) -> None:
        self.by_index.pop(peer.session.local_index, None)
        if self.by_peer.get(peer.peer_public_key) is peer:
            del self.by_peer[peer.peer_public_key]
        for path in peer.paths.values():
            if isinstance(path, RelayPath):
                group = self.relay_clients.get(path.client.relay_addr, [])
                if path in group:
                    group.remove(path)
                if not group:
                    self.relay_clients.pop(path.client.relay_addr, None)
        self.events.publish("session.down", peer=peer.peer_public_key.hex())

    def _start_paths(
        self, peer: PeerSession, remote_ice: dict[str, Any] | None, ice_task: _IceTask | None
    ) -> None:
        now = self.now()
        secret = hashlib.blake2b(
            peer.session.handshake_hash, digest_size=32, person=b"3bc-relay-pair"
        ).digest()
        member = 0 if peer.initiator else 1
        for _pk, address in peer.relay_list[:RELAYS_PER_SESSION]:
            endpoint = self._endpoint_for(address)
            if endpoint is None:
                continue
            client = relay_mod.RelayClient(secret, member, address)
            path = RelayPath(endpoint, client, peer)
            self.relay_clients.setdefault(address, []).append(path)
            peer.paths[path.path_id] = path
            peer.selector.add(path.path_id, "relayed", now)
            endpoint.send(address, client.start(now))
        if ice_task is not None and remote_ice is not None:
            ice_task.start_connect(peer, remote_ice)
        elif ice_task is not None:
            ice_task.cancel()

    def sessions(self) -> list[dict[str, Any]]:
        return [p.info() for p in self.by_index.values() if not p.closed]

    def flush_dht(self) -> None:
        """Set by the node: send what the DHT core queued (signalling goes through it)."""


# --- ICE, one task per session ----------------------------------------------------------------


class _IceTask:
    """Runs one IceAgent for one session: gather first, connect once the peer's info is known,
    then pump datagrams between the nominated socket and the session."""

    def __init__(self, service: SessionService, controlling: bool) -> None:
        self.service = service
        self.controlling = controlling
        self.scope = trio.CancelScope()
        self._gathered = trio.Event()
        self._remote: tuple[PeerSession, dict[str, Any]] | None = None
        self._go = trio.Event()
        self.local: dict[str, Any] | None = None

    async def gather(self, nursery: trio.Nursery | None) -> dict[str, Any] | None:
        assert nursery is not None
        nursery.start_soon(guarded, self._run)
        with trio.move_on_after(5):
            await self._gathered.wait()
        return self.local

    def start_connect(self, peer: PeerSession, remote: dict[str, Any]) -> None:
        self._remote = (peer, remote)
        self._go.set()

    def cancel(self) -> None:
        self.scope.cancel()

    async def _run(self) -> None:
        from overlay.path.ice import IceAgent, RemoteIceInfo

        turn_server, turn_user, turn_password = self.service.turn
        with self.scope:
            try:
                async with IceAgent(
                    controlling=self.controlling,
                    stun_server=self.service.stun_server,
                    turn_server=turn_server,
                    turn_username=turn_user,
                    turn_password=turn_password,
                ) as agent:
                    try:
                        info = await agent.gather()
                        self.local = info.to_dict()
                    finally:
                        self._gathered.set()
                    with trio.move_on_after(CONNECT_TIMEOUT + 5):
                        await self._go.wait()
                    if self._remote is None:
                        return
                    peer, remote = self._remote
                    path = await agent.connect(RemoteIceInfo.from_dict(remote), ICE_TIMEOUT)
                    await self._pump(peer, path)
            except* (PathError, OSError, ValueError) as group:
                # trio-asyncio wraps errors raised inside its loop in exception groups.
                log.info("ICE gave no path: %s", group.exceptions[0])
            finally:
                self._gathered.set()

    async def _pump(self, peer: PeerSession, nominated: Any) -> None:
        kind = "turn" if nominated.kind == "turn" else "direct"
        with peer.cancel:
            async with trio.open_nursery() as nursery:
                outbox = None
                if kind == "turn":
                    outbox, out_receive = trio.open_memory_channel[bytes](256)
                    nursery.start_soon(_turn_sender, nominated.socket, out_receive)
                path = IcePath(nominated.socket, kind, nominated.remote_addr, outbox)
                peer.add_path(path)
                nursery.start_soon(_keepalive, nominated.socket)
                on_transport = self.service._on_transport
                while not peer.closed:
                    batch = await nominated.socket.recv_batch_from()
                    for packet, source in batch:
                        if packet and packet[0] == KIND_TRANSPORT:
                            on_transport(packet, source, None, path.path_id)


async def guarded(fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run a per-session task so that its failure ends that task, never the daemon."""
    try:
        await fn(*args)
    except* Exception as group:
        log.warning("session task %s failed: %r", fn.__name__, group.exceptions)


async def _turn_sender(sock: Any, receive: trio.MemoryReceiveChannel[bytes]) -> None:
    async for packet in receive:
        await sock.send(packet)


async def _keepalive(sock: Any) -> None:
    while True:
        await trio.sleep(15)
        await sock.keepalive()


# --- the connect offer carried in the handshake -----------------------------------------------


def encode_offer(ice: dict[str, Any] | None, relays: list[tuple[bytes, Address]]) -> bytes:
    """msgpack {v, ice, relays}; candidates are trimmed until the offer fits the handshake."""
    ice = dict(ice) if ice else None
    while True:
        body = {
            "v": 1,
            "ice": ice,
            "relays": [[pk, wire.pack_address(a)] for pk, a in relays],
        }
        data = msgpack.packb(body, use_bin_type=True)
        if len(data) <= MAX_HANDSHAKE_PAYLOAD:
            return data
        if ice and ice.get("candidates"):
            ice["candidates"] = ice["candidates"][:-1]
        elif relays:
            relays = relays[:-1]
        else:
            raise ValueError("offer cannot fit the handshake")


def decode_offer(data: bytes) -> dict[str, Any]:
    """Strictly parse the peer's offer; ValueError on anything malformed."""
    try:
        body = wire.unpack(data, MAX_HANDSHAKE_PAYLOAD)
    except wire.WireError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(body, dict) or body.get("v") != 1:
        raise ValueError("unknown offer version")
    ice = body.get("ice")
    if ice is not None and not isinstance(ice, dict):
        raise ValueError("bad ice field")
    raw_relays = body.get("relays", [])
    if not isinstance(raw_relays, list) or len(raw_relays) > 8:
        raise ValueError("bad relays field")
    relays = []
    for item in raw_relays:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], bytes):
            raise ValueError("bad relay entry")
        try:
            relays.append((item[0], wire.address()(item[1], "relay")))
        except wire.WireError as exc:
            raise ValueError(str(exc)) from None
    return {"ice": ice, "relays": relays}


def _loopback_only(record: PeerRecord) -> bool:
    import ipaddress

    return bool(record.addresses) and all(
        ipaddress.ip_address(a[0]).is_loopback for a in record.addresses
    )
