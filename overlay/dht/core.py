"""The DHT protocol as a sans-IO state machine: datagrams and time in, datagrams and events out.

The trio shell (overlay/node.py) and the simulator (simulations/) drive this same class; nothing
here reads a clock or touches a socket. `now` is seconds on a wall-anchored clock, because record
expiry is compared across machines.
"""

from __future__ import annotations

import heapq
import os
import random
from dataclasses import dataclass, field
from typing import Any

from overlay import wire
from overlay.dht import messages as m
from overlay.dht.lookup import Lookup
from overlay.dht.record import PeerRecord, RecordError, check_fresh, parse_record, sign_record
from overlay.dht.routing import K, RoutingTable
from overlay.dht.store import RecordStore
from overlay.dht.tokens import TokenIssuer
from overlay.identity import Identity, node_id_for, verify
from overlay.ratelimit import KeyedLimiter, TokenBucket

Address = wire.Address


@dataclass
class DhtConfig:
    k: int = K
    alpha: int = 2  # queries in flight per path
    paths: int = 3  # disjoint paths per lookup (S/Kademlia uses d = 4..8 for k = 8..16)
    # Per-query wait before a contact counts as failed: 4 x its smoothed RTT, within these bounds.
    query_timeout: float = 1.0
    min_query_timeout: float = 0.25
    max_query_timeout: float = 2.0
    refresh_interval: float = 3600.0  # Kademlia paper: refresh buckets untouched for an hour
    ping_interval: float = 900.0  # liveness check of contacts we have not heard from
    republish_interval: float = 1200.0  # three chances before the one-hour record expiry
    record_ttl: int = 3600
    bootstrap_retry: float = 2.0
    bootstrap_retry_max: float = 60.0
    # Incoming requests: per source address and in total. An honest node sends a handful per
    # lookup; 50/s leaves room for bursts of many lookups through one node.
    per_source_rate: float = 50.0
    per_source_burst: float = 200.0
    total_rate: float = 5000.0
    total_burst: float = 10000.0
    max_pending: int = 2048
    max_lookups: int = 256
    # Advertised in every reply: this node forwards for others as a blind relay (--relay).
    relay: bool = False


@dataclass(frozen=True)
class LookupDone:
    lookup_id: int
    target: bytes
    contacts: list[tuple[bytes, Address]]
    record: PeerRecord | None
    hops: int
    queries: int
    duration: float


@dataclass(frozen=True)
class ContactVerified:
    public_key: bytes
    address: Address
    new: bool


@dataclass(frozen=True)
class PublicAddressObserved:
    address: Address


@dataclass(frozen=True)
class Forwarded:
    """A handshake packet that reached us through a hint node; `origin` is the sender's address
    as the hint saw it, and answers go back through `via`."""

    data: bytes
    via: Address
    origin: Address


Event = LookupDone | ContactVerified | PublicAddressObserved | Forwarded

# An announcement keeps us reachable through a hint for this long; owners re-announce every 20 s
# (NAT UDP mappings last 30 s or more: RFC 4787 REQ-5 asks for at least 2 minutes, many do 30 s).
ANNOUNCE_TTL = 60.0
# A caller's return route through a hint lives as long as a handshake may take.
BACK_ROUTE_TTL = 30.0
MAX_ANNOUNCED = 4096
# A store is sent up to this many times when no answer comes back.
STORE_ATTEMPTS = 3
# Our copy of a peer's address token is used for this long: it ages out before the issuer stops
# accepting it (tokens are valid for one to two 300 s epochs, overlay/dht/tokens.py).
PEER_TOKEN_TTL = 240.0
# Bucket refresh lookups started per maintenance round (every ~5 s): a joining node refreshes
# all its buckets within a minute or so instead of all at once.
REFRESHES_PER_ROUND = 2


@dataclass
class _Pending:
    tx: bytes
    address: Address
    node_id: bytes | None
    sent: float
    deadline: float
    purpose: str  # "ping", "find", "store"
    lookup_id: int | None = None
    record: PeerRecord | None = None  # what a store carries, to send it again if lost
    attempt: int = 1


@dataclass
class DhtStats:
    received: int = 0
    sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class DhtCore:
    def __init__(
        self,
        identity: Identity,
        config: DhtConfig | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        self.identity = identity
        self.public_key = identity.public_key
        self.node_id = identity.node_id
        self.config = config or DhtConfig()
        self.rng = rng or random.Random(os.urandom(16))
        self.table = RoutingTable(self.node_id, self.config.k)
        self.store = RecordStore()
        self.stats = DhtStats()
        self._tokens = TokenIssuer(self.rng.randbytes(32))
        self._peer_tokens: dict[Address, tuple[bytes, float]] = {}
        self._tokens_pruned_at = now
        self._pending: dict[bytes, _Pending] = {}
        self._deadlines: list[tuple[float, bytes]] = []
        self._lookups: dict[int, Lookup] = {}
        self._refreshing: dict[int, int] = {}  # refresh lookup id -> the bucket it fills
        self._next_lookup = 1
        self._out: list[tuple[Address, bytes]] = []
        self._events: list[Event] = []
        self._limiter = KeyedLimiter(self.config.per_source_rate, self.config.per_source_burst)
        self._total = TokenBucket(self.config.total_rate, self.config.total_burst, now)
        self._bootstrap: list[Address] = []
        self._bootstrap_active = False
        self._bootstrap_at: float | None = None
        self._bootstrap_backoff = self.config.bootstrap_retry
        self._record_addresses: list[Address] = []
        self._record_relays: list[tuple[bytes, Address]] = []
        self.own_record: PeerRecord | None = None
        self._republish_at: float | None = None
        self._publish_lookup: int | None = None
        self._maintenance_at = now + 5.0
        self._observed: dict[Address, int] = {}
        self._announced: dict[bytes, tuple[Address, float]] = {}  # public key -> (addr, when)
        self._back_routes: dict[tuple[bytes, Address], float] = {}  # (callee pk, caller) -> until
        self._forward_peers: dict[Address, float] = {}  # hints we use -> until
        self._waiting_token: dict[Address, list[tuple[wire.Schema, dict[str, Any]]]] = {}

    # --- outputs -------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def next_timeout(self) -> float:
        candidates = [self._maintenance_at]
        if self._deadlines:
            candidates.append(self._deadlines[0][0])
        if self._bootstrap_at is not None:
            candidates.append(self._bootstrap_at)
        if self._republish_at is not None:
            candidates.append(self._republish_at)
        return min(candidates)

    # --- API -----------------------------------------------------------------------------------

    def bootstrap(self, addresses: list[Address], now: float) -> None:
        """Ping the given addresses (keys unknown); a signed answer admits them to the table."""
        self._bootstrap = list(addresses)
        self._bootstrap_active = bool(addresses)
        self._bootstrap_backoff = self.config.bootstrap_retry
        self._do_bootstrap(now)

    def add_candidate(self, public_key: bytes, address: Address, now: float) -> None:
        """A contact we heard of (saved table, a peer's record): ping before trusting it."""
        if self.table.get(node_id_for(public_key)) is None:
            self._request(m.PING, {}, address, node_id_for(public_key), now, "ping")

    def lookup(self, target: bytes, now: float, want_record: bool = False) -> int:
        lookup_id = self._next_lookup
        self._next_lookup += 1
        seeds = [(c.public_key, c.address) for c in self.table.closest(target, self.config.k)]
        lk = Lookup(
            lookup_id,
            target,
            seeds,
            self_id=self.node_id,
            k=self.config.k,
            alpha=self.config.alpha,
            paths=self.config.paths,
            want_record=want_record,
            started=now,
        )
        if want_record:
            local = self.store.get(target, now)
            if local is not None:
                lk.record = local
        if len(self._lookups) >= self.config.max_lookups:
            oldest = min(self._lookups)
            self._finish(self._lookups[oldest], now)
        self._lookups[lookup_id] = lk
        self.table.touch(target, now)
        self._advance(lk, now)
        return lookup_id

    def find_record(self, public_key: bytes, now: float) -> int:
        return self.lookup(node_id_for(public_key), now, want_record=True)

    def set_record_addresses(
        self, addresses: list[Address], relays: list[tuple[bytes, Address]], now: float
    ) -> None:
        """Sign a new record for ourselves and publish it when the addresses changed."""
        if addresses == self._record_addresses and relays == self._record_relays:
            return
        self._record_addresses = list(addresses)
        self._record_relays = list(relays)
        self.publish(now)

    def publish(self, now: float) -> None:
        seq = int(now * 1000)
        if self.own_record is not None and seq <= self.own_record.seq:
            seq = self.own_record.seq + 1
        self.own_record = sign_record(
            self.identity,
            self._record_addresses,
            self._record_relays,
            seq,
            int(now) + self.config.record_ttl,
        )
        self.store.put(self.own_record, "self", now)
        self._republish_at = now + self.config.republish_interval
        self._publish_lookup = self.lookup(self.node_id, now)

    def announce(self, address: Address, now: float) -> None:
        """Tell a hint node we can be reached through it (signed, bound to its address token)."""
        self._forward_peers[address] = now + ANNOUNCE_TTL
        self._with_token(m.ANNOUNCE, {}, address, now)

    def forward(self, hint: Address, callee: bytes, data: bytes, now: float) -> None:
        """Ask `hint` to pass a handshake packet to `callee`, who announced to it."""
        self._forward_peers[hint] = now + BACK_ROUTE_TTL
        self._with_token(m.FWD_REQ, {"to": callee, "data": data}, hint, now)

    def forward_back(self, hint: Address, caller: Address, data: bytes, now: float) -> None:
        """Answer a forwarded packet through the hint it came by."""
        self._with_token(m.FWD_BACK, {"to": wire.pack_address(caller), "data": data}, hint, now)

    # --- signalling ----------------------------------------------------------------------------

    def _with_token(
        self, schema: wire.Schema, body: dict[str, Any], address: Address, now: float
    ) -> None:
        """Send a token-gated request now, or after a ping has fetched the token."""
        token = self._peer_token(address, now)
        if token is None:
            queue = self._waiting_token.setdefault(address, [])
            if len(queue) < 8:
                queue.append((schema, body))
            if not any(p.address == address for p in self._pending.values()):
                self._request(m.PING, {}, address, None, now, "ping")
            return
        tx = self.rng.randbytes(m.TX_SIZE)
        full = {"tx": tx, "pk": self.public_key, "tok": token, **body}
        if schema is m.ANNOUNCE:
            full["sig"] = self.identity.sign(m.ANNOUNCE_CONTEXT + tx + token)
        self._emit(address, m.CODEC.encode(schema, full))

    def _on_signalling(
        self, schema: wire.Schema, body: dict[str, Any], source: Address, now: float
    ) -> None:
        if not self._tokens.check(body["tok"], source, now):
            self.stats.drop("signalling-without-token")
            return
        if schema is m.ANNOUNCE:
            if not verify(body["pk"], m.ANNOUNCE_CONTEXT + body["tx"] + body["tok"], body["sig"]):
                self.stats.drop("bad-announce")
                return
            self._announced.pop(body["pk"], None)
            self._announced[body["pk"]] = (source, now)
            while len(self._announced) > MAX_ANNOUNCED:
                del self._announced[next(iter(self._announced))]
            return
        if schema is m.FWD_REQ:
            target = self._announced.get(body["to"])
            if target is None or now - target[1] >= ANNOUNCE_TTL:
                contact = self.table.get(node_id_for(body["to"]))
                if contact is None:
                    self.stats.drop("forward-unknown-target")
                    return
                target = (contact.address, now)
            if len(self._back_routes) > MAX_ANNOUNCED:
                self._back_routes = {k: t for k, t in self._back_routes.items() if t > now}
            self._back_routes[(body["to"], source)] = now + BACK_ROUTE_TTL
            self._emit(
                target[0],
                m.CODEC.encode(m.FWD, {"from": wire.pack_address(source), "data": body["data"]}),
            )
            return
        caller = body["to"]
        until = self._back_routes.get((body["pk"], caller))
        announced = self._announced.get(body["pk"])
        if until is None or until < now or announced is None or announced[0] != source:
            self.stats.drop("forward-back-without-route")
            return
        self._emit(
            caller, m.CODEC.encode(m.FWD, {"from": wire.pack_address(source), "data": body["data"]})
        )

    def _on_forwarded(self, body: dict[str, Any], source: Address, now: float) -> None:
        until = self._forward_peers.get(source)
        if until is None or until < now:
            self.stats.drop("forwarded-from-stranger")
            return
        self._events.append(Forwarded(body["data"], source, body["from"]))

    # --- input ---------------------------------------------------------------------------------

    def receive(self, data: bytes, source: Address, now: float) -> None:
        self.stats.received += 1
        self.stats.bytes_received += len(data)
        try:
            schema, body = m.CODEC.decode(data)
        except wire.WireError as exc:
            self.stats.drop(type(exc).__name__)
            return
        if schema is m.RESPONSE:
            self._on_response(body, source, now)
            return
        if schema is m.FWD:
            self._on_forwarded(body, source, now)
            return
        if not self._total.allow(now) or not self._limiter.allow(source, now):
            self.stats.drop("rate-limited")
            return
        if schema in (m.ANNOUNCE, m.FWD_REQ, m.FWD_BACK):
            self._on_signalling(schema, body, source, now)
            return
        self._on_request(schema, body, source, len(data), now)

    def handle_timeouts(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, tx = heapq.heappop(self._deadlines)
            pending = self._pending.pop(tx, None)
            if pending is not None:
                self._on_timeout(pending, now)
        if self._bootstrap_at is not None and now >= self._bootstrap_at:
            self._do_bootstrap(now)
        if self._republish_at is not None and now >= self._republish_at:
            self.publish(now)
        if now >= self._maintenance_at:
            self._maintain(now)

    # --- requests ------------------------------------------------------------------------------

    def _on_request(
        self, schema: wire.Schema, body: dict[str, Any], source: Address, size: int, now: float
    ) -> None:
        verified = self._tokens.check(body.get("tok"), source, now)
        reply: dict[str, Any] = {
            "tx": body["tx"],
            "pk": self.public_key,
            "tok": self._tokens.issue(source, now),
            "obs": wire.pack_address(source),
        }
        if self.config.relay:
            reply["rl"] = True
        if schema is m.FIND:
            target = body["target"]
            reply["nodes"] = [
                c.wire_entry()
                for c in self.table.closest(target, self.config.k)
                if c.address != source
            ]
            if body["rec"]:
                rec = self.store.get(target, now)
                if rec is not None:
                    reply["rec"] = rec.to_wire()
        elif schema is m.STORE:
            if not verified:
                reply["err"] = "bad token"
            else:
                try:
                    record = parse_record(body["rec"])
                    self.store.put(record, source[0], now)
                except RecordError as exc:
                    self.stats.drop("record-rejected")
                    reply["err"] = str(exc)[:120]
        self._send_response(reply, source, size if not verified else wire.MAX_DATAGRAM)
        self._consider_requester(body["pk"], source, size, verified, now)

    def _send_response(self, reply: dict[str, Any], dest: Address, limit: int) -> None:
        """Sign and send, trimming contacts and record until the reply fits `limit` bytes."""
        while True:
            inner = wire.pack(reply)
            sig = self.identity.sign(m.RESPONSE_CONTEXT + inner)
            try:
                data = m.CODEC.encode(m.RESPONSE, {"b": inner, "s": sig})
            except ValueError:
                data = b""
            if data and len(data) <= limit:
                self._emit(dest, data)
                return
            if reply.get("nodes"):
                reply["nodes"] = reply["nodes"][:-1]
            elif "rec" in reply:
                del reply["rec"]
            else:
                self.stats.drop("reply-would-amplify")
                return

    def _consider_requester(
        self, public_key: bytes, source: Address, size: int, verified: bool, now: float
    ) -> None:
        """A requester may belong in our table; it gets in only by answering our own ping."""
        node_id = node_id_for(public_key)
        known = self.table.get(node_id)
        if known is not None:
            if known.address == source:
                known.last_seen = now
            return
        if not self.table.has_room(node_id):
            return  # a full bucket of live contacts: no need to challenge a newcomer
        if any(p.node_id == node_id for p in self._pending.values()):
            return
        # Our ping is small but must not exceed what the source sent us unless it is verified.
        if verified or size >= m.PAD_TO:
            self._request(m.PING, {}, source, node_id, now, "ping")

    # --- responses -----------------------------------------------------------------------------

    def _on_response(self, body: dict[str, Any], source: Address, now: float) -> None:
        try:
            inner = m.RESPONSE_BODY.validate(wire.unpack(body["b"]))
        except wire.WireError as exc:
            self.stats.drop(type(exc).__name__)
            return
        pending = self._pending.get(inner["tx"])
        if pending is None or pending.address != source:
            self.stats.drop("unexpected-response")
            return
        public_key = inner["pk"]
        node_id = node_id_for(public_key)
        if pending.node_id is not None and pending.node_id != node_id:
            self.stats.drop("wrong-responder")
            return
        if not verify(public_key, m.RESPONSE_CONTEXT + body["b"], body["s"]):
            self.stats.drop("bad-signature")
            return
        del self._pending[inner["tx"]]
        self._peer_tokens[source] = (inner["tok"], now)
        for schema, waiting in self._waiting_token.pop(source, []):
            self._with_token(schema, waiting, source, now)
        self._observe(inner["obs"])
        is_new = self.table.get(node_id) is None
        self.table.verified(
            public_key, source, now, now - pending.sent, lookup=pending.purpose == "find"
        )
        contact = self.table.get(node_id)
        if contact is not None:
            contact.relay = bool(inner.get("rl", False))
        if is_new and self.table.get(node_id) is not None:
            self._events.append(ContactVerified(public_key, source, True))
        if pending.purpose == "ping" and self._bootstrap_active and len(self.table) > 0:
            self._bootstrap_done(now)
        if pending.purpose == "store" and "err" in inner:
            self.stats.drop("store-refused")
        if pending.lookup_id is not None:
            lk = self._lookups.get(pending.lookup_id)
            if lk is not None:
                record = None
                if "rec" in inner:
                    try:
                        record = parse_record(inner["rec"])
                        check_fresh(record, now)
                    except RecordError:
                        self.stats.drop("bad-record")
                        record = None
                lk.on_response(node_id, inner.get("nodes", []), record)
                bucket = self._refreshing.get(lk.id)
                if bucket is not None and self.table.is_full(bucket):
                    self._finish(lk, now)  # the refresh did its job: stop querying
                else:
                    self._advance(lk, now)

    def _on_timeout(self, pending: _Pending, now: float) -> None:
        self._waiting_token.pop(pending.address, None)
        if pending.record is not None and pending.attempt < STORE_ATTEMPTS and pending.node_id:
            # A lost store would leave a record missing from a replica until the next republish
            # (20 min): send it again.
            self._store_to(
                pending.address, pending.node_id, pending.record, now, pending.attempt + 1
            )
        if pending.node_id is not None:
            self.table.failed(pending.node_id, lookup=pending.purpose == "find")
        if pending.lookup_id is not None:
            lk = self._lookups.get(pending.lookup_id)
            if lk is not None and pending.node_id is not None:
                lk.on_failure(pending.node_id)
                self._advance(lk, now)

    # --- lookups -------------------------------------------------------------------------------

    def _advance(self, lk: Lookup, now: float) -> None:
        for cand in lk.next_queries():
            body = {"target": lk.target, "rec": lk.want_record}
            self._request(m.FIND, body, cand.address, cand.node_id, now, "find", lk.id)
        if lk.done:
            self._finish(lk, now)

    def _finish(self, lk: Lookup, now: float) -> None:
        self._lookups.pop(lk.id, None)
        self._refreshing.pop(lk.id, None)
        closest = lk.closest_answered()
        if lk.record is not None:
            # Cache-on-path repair: holders of no or an older record get the newest one.
            for node_id in lk.outdated_holders()[:3]:
                contact = self.table.get(node_id)
                address = (
                    contact.address
                    if contact
                    else next((c.address for c in closest if c.node_id == node_id), None)
                )
                if address is not None:
                    self._store_to(address, node_id, lk.record, now)
        if lk.id == self._publish_lookup and self.own_record is not None:
            self._publish_lookup = None
            for cand in closest:
                self._store_to(cand.address, cand.node_id, self.own_record, now)
            if not closest:
                # Nobody reached (a lost query right after joining): try again soon instead of
                # staying unfindable until the next republish.
                self._republish_at = now + self.config.bootstrap_retry
        self._events.append(
            LookupDone(
                lk.id,
                lk.target,
                [(c.public_key, c.address) for c in closest],
                lk.record,
                lk.hops(),
                lk.queries,
                now - lk.started,
            )
        )

    def _store_to(
        self, address: Address, node_id: bytes, record: PeerRecord, now: float, attempt: int = 1
    ) -> None:
        if node_id == self.node_id:
            return
        token = self._peer_token(address, now)
        if token is None:
            return
        pending = self._request(
            m.STORE, {"rec": record.to_wire(), "tok": token}, address, node_id, now, "store"
        )
        if pending is not None:
            pending.record, pending.attempt = record, attempt

    # --- sending -------------------------------------------------------------------------------

    def _peer_token(self, address: Address, now: float) -> bytes | None:
        entry = self._peer_tokens.get(address)
        if entry is None:
            return None
        token, when = entry
        # Our copy ages out before the issuer stops accepting it (valid 1-2 epochs).
        if now - when > PEER_TOKEN_TTL:
            del self._peer_tokens[address]
            return None
        return token

    def _request(
        self,
        schema: wire.Schema,
        body: dict[str, Any],
        address: Address,
        node_id: bytes | None,
        now: float,
        purpose: str,
        lookup_id: int | None = None,
    ) -> _Pending | None:
        if len(self._pending) >= self.config.max_pending:
            self.stats.drop("too-many-pending")
            if lookup_id is not None and node_id is not None:
                self._lookups[lookup_id].on_failure(node_id)
            return None
        tx = self.rng.randbytes(m.TX_SIZE)
        body = {"tx": tx, "pk": self.public_key, **body}
        token = self._peer_token(address, now)
        if token is not None and "tok" not in body:
            body["tok"] = token
        data = m.CODEC.encode(schema, body)
        if "tok" not in body:
            # Pad so the full answer can come back without amplifying (see PAD_TO).
            # The pad field costs its own header: 4 bytes of key and 1-3 of length.
            pad = m.PAD_TO - len(data) - 7
            if pad > 0:
                body["pad"] = bytes(pad)
                data = m.CODEC.encode(schema, body)
        timeout = self.config.query_timeout
        contact = self.table.get(node_id) if node_id is not None else None
        if contact is not None and contact.rtt is not None:
            timeout = min(
                self.config.max_query_timeout, max(self.config.min_query_timeout, 4 * contact.rtt)
            )
        pending = _Pending(tx, address, node_id, now, now + timeout, purpose, lookup_id)
        self._pending[tx] = pending
        heapq.heappush(self._deadlines, (pending.deadline, tx))
        self._emit(address, data)
        return pending

    def _emit(self, address: Address, data: bytes) -> None:
        self.stats.sent += 1
        self.stats.bytes_sent += len(data)
        self._out.append((address, data))

    # --- maintenance ---------------------------------------------------------------------------

    def _do_bootstrap(self, now: float) -> None:
        if not self._bootstrap_active:
            self._bootstrap_at = None
            return
        for address in self._bootstrap:
            self._request(m.PING, {}, address, None, now, "ping")
        self._bootstrap_at = now + self._bootstrap_backoff
        self._bootstrap_backoff = min(self.config.bootstrap_retry_max, self._bootstrap_backoff * 2)

    def _bootstrap_done(self, now: float) -> None:
        self._bootstrap_at = None
        self._bootstrap_active = False
        if self.own_record is not None:
            self.publish(now)  # the first publish had nobody to store to
        else:
            self.lookup(self.node_id, now)

    def _maintain(self, now: float) -> None:
        self._maintenance_at = now + 5.0 + self.rng.random()
        self._forward_peers = {a: t for a, t in self._forward_peers.items() if t > now}
        self.store.expire(now)
        if now - self._tokens_pruned_at > PEER_TOKEN_TTL:
            # Tokens of every peer that ever answered us would otherwise stay forever.
            self._tokens_pruned_at = now
            self._peer_tokens = {
                a: e for a, e in self._peer_tokens.items() if now - e[1] <= PEER_TOKEN_TTL
            }
        # Bucket refresh (Kademlia: a lookup for a random id in every bucket no lookup went
        # through for an hour; for a joining node, every bucket). Bounded so that a joining node
        # does not flood the network: two per round, none for a bucket already full of live
        # contacts (it could only gain reserves; pings keep its contacts checked), and each
        # refresh lookup stops as soon as its bucket is full.
        refreshes = 0
        for index in self.table.stale_buckets(now, self.config.refresh_interval):
            if self.table.is_full(index):
                self.table.refreshed(index, now)
            elif refreshes < REFRESHES_PER_ROUND:
                refreshes += 1
                target = self.table.random_id_in_bucket(index, self.rng.getrandbits(256))
                lookup_id = self.lookup(target, now)
                if lookup_id in self._lookups:
                    self._refreshing[lookup_id] = index
        stale = [c for c in self.table if now - c.last_seen >= self.config.ping_interval]
        pinging = {p.node_id for p in self._pending.values()}
        for contact in stale[:8]:
            if contact.node_id not in pinging:
                self._request(m.PING, {}, contact.address, contact.node_id, now, "ping")
                contact.last_seen = now - self.config.ping_interval / 2  # no re-ping next round
        if len(self.table) == 0 and not self._bootstrap_active and self._bootstrap:
            self.bootstrap(self._bootstrap, now)

    def _observe(self, address: Address) -> None:
        """Count how peers see us; report an address once two peers agree (NAT discovery)."""
        count = self._observed.get(address, 0) + 1
        if len(self._observed) > 64:
            self._observed.clear()
        self._observed[address] = count
        if count == 2:
            self._events.append(PublicAddressObserved(address))
