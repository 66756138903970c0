"""Blind relay for peers that cannot punch: sans-IO server and client halves.

A daemon started with `--relay` forwards sealed session packets between two members of a *pair*.
It sees only ciphertext and learns nothing that helps it read traffic.

Credentials. Both peers get a 32-byte `pair_secret` inside their encrypted handshake. From it each
derives two Ed25519 signing keys, one per member slot (0 = handshake initiator, 1 = responder),
and the pair id `BLAKE2b-128(pk0 || pk1)`. The pair id therefore *commits* to both public keys:
nobody can squat a pair id with keys of their own, and the relay, which only ever sees the public
keys, can check every JOIN without learning anything secret (the keys are one-way derived from the
secret with a domain-separated BLAKE2b, independent of the session keys).

Join, WireGuard-style (no state and no reply larger than the request before a token round trip):

    peer  -> relay   JOIN(pair_id, member, pk0, pk1, seq, token=0.., sig)
    relay -> peer    TOKEN(token)            token = MAC(relay_secret, time slot, source ip, port)
    peer  -> relay   JOIN(..., token, sig)   sig = Ed25519_member(pair_id | member | seq | token)
    relay -> peer    JOINED(pair_id, member, peer_present)

The token ties the signed JOIN to the source address; `seq` (strictly increasing per member,
e.g. milliseconds) stops replays of old JOINs. A valid JOIN from a new address moves that member's
slot there (roaming); a third party can neither inject into a pair (DATA is only accepted from a
bound member address) nor take a slot (needs that member's signing key).

Data: `DATA(pair_id, payload)` from a bound member is forwarded unchanged to the other member's
bound address: same size, to an address that proved it is reachable. Per-pair and relay-wide
token buckets (packets/s and bytes/s), a total pair limit, a per-IP pair limit and idle expiry
bound the cost.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions
import nacl.signing

from overlay.path.errors import LocalPathError, RelayParseError
from overlay.ratelimit import Budget

Address = tuple[str, int]


class Kind(enum.IntEnum):
    """First byte of every relay datagram (the daemon routes 0xF0..0xFF here)."""

    JOIN = 0xF1
    TOKEN = 0xF2
    JOINED = 0xF3
    DATA = 0xF4
    KEEPALIVE = 0xF5


PAIR_ID_SIZE = 16
TOKEN_SIZE = 16
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
PAIR_SECRET_SIZE = 32
MEMBERS = 2
# An all-zero token means "I have none yet"; real tokens are MACs, zero only with 2^-128 chance.
NO_TOKEN = bytes(TOKEN_SIZE)

_JOIN = struct.Struct(f"!B{PAIR_ID_SIZE}sB{PUBLIC_KEY_SIZE}s{PUBLIC_KEY_SIZE}sQ{TOKEN_SIZE}s")
JOIN_SIZE = _JOIN.size + SIGNATURE_SIZE  # 170 bytes
_TOKEN = struct.Struct(f"!B{PAIR_ID_SIZE}s{TOKEN_SIZE}s")  # 33 bytes
_JOINED = struct.Struct(f"!B{PAIR_ID_SIZE}sBB")  # 19 bytes
_DATA_HEADER = struct.Struct(f"!B{PAIR_ID_SIZE}s")  # 17 bytes
_KEEPALIVE = _DATA_HEADER  # 17 bytes, nothing but the pair id

# Largest DATA datagram accepted: a 1200-byte session packet (the usual path-MTU-safe payload,
# as QUIC uses) plus headers fits well; anything above the IPv4 minimum reassembly size is not
# something a real session sends.
MAX_DATA_SIZE = 1500
# Token time slot: a token is valid in its slot and the next, so 30-60 s — long enough for a JOIN
# round trip over any path, short enough that a captured token is soon useless elsewhere.
TOKEN_SLOT_SECONDS = 30.0
# Pairs with no traffic from either member for this long are forgotten. NAT UDP mappings last
# ~30 s to a few minutes and clients keep alive every 15 s, so 120 s only drops dead pairs.
IDLE_TIMEOUT = 120.0
# A relay daemon on a small VPS: 1000 pairs x 2 addresses is a few hundred kB of state.
DEFAULT_MAX_PAIRS = 1000
# One IP (one person's NAT) should need a handful of relayed calls, not the whole relay.
DEFAULT_MAX_PAIRS_PER_IP = 8
# Per pair, both directions together: a 720p VP8 call plus audio is ~2.5 Mbit/s each way; allow
# ~8 Mbit/s and 1000 packets/s (1200-byte packets), bursting one second's worth.
DEFAULT_PAIR_PACKETS_PER_SECOND = 1000.0
DEFAULT_PAIR_BYTES_PER_SECOND = 1_000_000.0
# All pairs together: 100 Mbit/s out of a small VPS's uplink, whatever the number of pairs
# (`3bc daemon --relay-mbit`).
DEFAULT_TOTAL_MBIT = 100.0
# Client: JOIN is retried on this period until JOINED, up to JOIN_ATTEMPTS times (~10 s total).
JOIN_RETRY_SECONDS = 1.0
JOIN_ATTEMPTS = 10
# Client: keepalive period once joined, well under common NAT UDP timeouts (30 s on many CPEs).
KEEPALIVE_SECONDS = 15.0

_MEMBER_KEY_PERSON = b"3bc-relay-member"
_TOKEN_PERSON = b"3bc-relay-token"


def _addr_bytes(addr: Address) -> bytes:
    return ipaddress.ip_address(addr[0]).packed + struct.pack("!H", addr[1])


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    pair_id: bytes
    member: int
    pk0: bytes
    pk1: bytes
    seq: int
    token: bytes
    signature: bytes

    def signed_part(self) -> bytes:
        """What the member signs: everything but the signature (and the public keys' commitment)."""
        return _JOIN.pack(
            Kind.JOIN, self.pair_id, self.member, self.pk0, self.pk1, self.seq, self.token
        )

    def encode(self) -> bytes:
        return self.signed_part() + self.signature


@dataclass(frozen=True, slots=True)
class Token:
    pair_id: bytes
    token: bytes

    def encode(self) -> bytes:
        return _TOKEN.pack(Kind.TOKEN, self.pair_id, self.token)


@dataclass(frozen=True, slots=True)
class Joined:
    pair_id: bytes
    member: int
    peer_present: bool

    def encode(self) -> bytes:
        return _JOINED.pack(Kind.JOINED, self.pair_id, self.member, int(self.peer_present))


@dataclass(frozen=True, slots=True)
class Data:
    pair_id: bytes
    payload: bytes

    def encode(self) -> bytes:
        return _DATA_HEADER.pack(Kind.DATA, self.pair_id) + self.payload


@dataclass(frozen=True, slots=True)
class Keepalive:
    pair_id: bytes

    def encode(self) -> bytes:
        return _KEEPALIVE.pack(Kind.KEEPALIVE, self.pair_id)


RelayMessage = Join | Token | Joined | Data | Keepalive


def parse(data: bytes) -> RelayMessage:
    """Decode one relay datagram; any malformation raises `RelayParseError`."""
    if not data:
        raise RelayParseError("empty datagram")
    if len(data) > MAX_DATA_SIZE:
        raise RelayParseError(f"datagram too large ({len(data)} > {MAX_DATA_SIZE})")
    try:
        kind = Kind(data[0])
    except ValueError:
        raise RelayParseError(f"unknown relay kind 0x{data[0]:02x}") from None
    if kind is Kind.JOIN:
        if len(data) != JOIN_SIZE:
            raise RelayParseError(f"JOIN must be {JOIN_SIZE} bytes, got {len(data)}")
        _, pair_id, member, pk0, pk1, seq, token = _JOIN.unpack_from(data)
        if member >= MEMBERS:
            raise RelayParseError(f"member slot {member} out of range")
        return Join(pair_id, member, pk0, pk1, seq, token, data[_JOIN.size :])
    if kind is Kind.TOKEN:
        if len(data) != _TOKEN.size:
            raise RelayParseError(f"TOKEN must be {_TOKEN.size} bytes")
        _, pair_id, token = _TOKEN.unpack(data)
        return Token(pair_id, token)
    if kind is Kind.JOINED:
        if len(data) != _JOINED.size:
            raise RelayParseError(f"JOINED must be {_JOINED.size} bytes")
        _, pair_id, member, present = _JOINED.unpack(data)
        if member >= MEMBERS or present > 1:
            raise RelayParseError("JOINED member or flag out of range")
        return Joined(pair_id, member, bool(present))
    if kind is Kind.KEEPALIVE:
        if len(data) != _KEEPALIVE.size:
            raise RelayParseError(f"KEEPALIVE must be {_KEEPALIVE.size} bytes")
        return Keepalive(_KEEPALIVE.unpack(data)[1])
    if len(data) < _DATA_HEADER.size:
        raise RelayParseError("DATA shorter than its header")
    return Data(data[1 : 1 + PAIR_ID_SIZE], data[_DATA_HEADER.size :])


# --- credentials ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairCredentials:
    """What one member derives from the handshake's pair secret."""

    pair_id: bytes
    member: int
    public_keys: tuple[bytes, bytes]
    signing_key: nacl.signing.SigningKey

    @classmethod
    def derive(cls, pair_secret: bytes, member: int) -> PairCredentials:
        if len(pair_secret) != PAIR_SECRET_SIZE:
            raise LocalPathError(f"pair secret must be {PAIR_SECRET_SIZE} bytes")
        if member not in range(MEMBERS):
            raise LocalPathError("member must be 0 (initiator) or 1 (responder)")
        keys = [
            nacl.signing.SigningKey(
                hashlib.blake2b(
                    bytes([slot]), key=pair_secret, person=_MEMBER_KEY_PERSON, digest_size=32
                ).digest()
            )
            for slot in range(MEMBERS)
        ]
        pks = (bytes(keys[0].verify_key), bytes(keys[1].verify_key))
        return cls(pair_id_for(*pks), member, pks, keys[member])


def pair_id_for(pk0: bytes, pk1: bytes) -> bytes:
    """The pair id commits to both members' public keys, so nobody can squat someone's pair."""
    return hashlib.blake2b(pk0 + pk1, digest_size=PAIR_ID_SIZE).digest()


# --- server -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pair:
    public_keys: tuple[bytes, bytes]
    owner_ip: str
    members: list[Address | None]
    last_seq: list[int]
    budget: Budget
    last_active: float


@dataclass(slots=True)
class RelayStats:
    tokens_sent: int = 0
    joins: int = 0
    pairs_created: int = 0
    pairs_expired: int = 0
    forwarded_packets: int = 0
    forwarded_bytes: int = 0
    dropped_malformed: int = 0
    dropped_bad_token: int = 0
    dropped_bad_join: int = 0
    dropped_replay: int = 0
    dropped_full: int = 0
    dropped_unknown: int = 0
    dropped_no_peer: int = 0
    dropped_rate: int = 0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A datagram the shell must send."""

    data: bytes
    addr: Address


@dataclass
class RelayServer:
    """The relay's state machine: `receive(data, source, now) -> [Outgoing]`, `handle_timeout(now)`.

    Unauthenticated input costs a MAC at most and gets at most a smaller reply; pair state is only
    created by a signed JOIN carrying a token that proves the source address.
    """

    secret: bytes = field(default_factory=lambda: os.urandom(32))
    max_pairs: int = DEFAULT_MAX_PAIRS
    max_pairs_per_ip: int = DEFAULT_MAX_PAIRS_PER_IP
    pair_packets_per_second: float = DEFAULT_PAIR_PACKETS_PER_SECOND
    pair_bytes_per_second: float = DEFAULT_PAIR_BYTES_PER_SECOND
    total_mbit: float = DEFAULT_TOTAL_MBIT
    idle_timeout: float = IDLE_TIMEOUT
    stats: RelayStats = field(default_factory=RelayStats)
    _total: Budget = field(init=False)
    # pair_id -> pair, oldest activity first (so expiry only looks at the front).
    _pairs: OrderedDict[bytes, _Pair] = field(default_factory=OrderedDict)
    _pairs_per_ip: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.limit_total_mbit(self.total_mbit)

    def limit_total_mbit(self, mbit: float) -> None:
        """The operator's total: `mbit` Mbit/s and, for packets averaging 625 bytes, as many
        packets (small packets cost a relay per packet, not per byte). Starts full: a budget
        stamped at time 0 refills to its cap on the first packet."""
        self.total_mbit = mbit
        self._total = Budget(packet_rate=mbit * 200, byte_rate=mbit * 125_000, now=0.0)

    @property
    def pair_count(self) -> int:
        return len(self._pairs)

    def members(self, pair_id: bytes) -> tuple[Address | None, ...] | None:
        pair = self._pairs.get(pair_id)
        return None if pair is None else tuple(pair.members)

    def token_for(self, addr: Address, now: float, slot_offset: int = 0) -> bytes:
        slot = int(now // TOKEN_SLOT_SECONDS) + slot_offset
        return hashlib.blake2b(
            struct.pack("!q", slot) + _addr_bytes(addr),
            key=self.secret,
            person=_TOKEN_PERSON,
            digest_size=TOKEN_SIZE,
        ).digest()

    def _token_valid(self, token: bytes, addr: Address, now: float) -> bool:
        return any(
            hmac.compare_digest(token, self.token_for(addr, now, offset)) for offset in (0, -1)
        )

    def receive(self, data: bytes, source: Address, now: float) -> list[Outgoing]:
        """Handle one datagram from `source`; returns what to send (possibly nothing)."""
        try:
            message = parse(data)
        except RelayParseError:
            self.stats.dropped_malformed += 1
            return []
        if isinstance(message, Join):
            return self._on_join(message, source, now)
        if isinstance(message, Data):
            other = self.forward(data, source, now)
            return [] if other is None else [Outgoing(data, other)]
        if isinstance(message, Keepalive):
            pair = self._pairs.get(message.pair_id)
            if pair is not None and source in pair.members:
                self._touch(message.pair_id, pair, now)
            else:
                self.stats.dropped_unknown += 1
            return []
        # TOKEN and JOINED only ever travel relay -> client.
        self.stats.dropped_malformed += 1
        return []

    def _on_join(self, join: Join, source: Address, now: float) -> list[Outgoing]:
        try:
            _addr_bytes(source)
        except (ValueError, struct.error):
            self.stats.dropped_malformed += 1
            return []
        if not self._token_valid(join.token, source, now):
            # Stateless answer, 33 bytes for a 170-byte request: no amplification.
            self.stats.tokens_sent += 1
            return [Outgoing(Token(join.pair_id, self.token_for(source, now)).encode(), source)]
        if pair_id_for(join.pk0, join.pk1) != join.pair_id:
            self.stats.dropped_bad_join += 1
            return []
        member_key = (join.pk0, join.pk1)[join.member]
        try:
            nacl.bindings.crypto_sign_open(join.signature + join.signed_part(), member_key)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
            self.stats.dropped_bad_join += 1
            return []
        pair = self._pairs.get(join.pair_id)
        if pair is None:
            if len(self._pairs) >= self.max_pairs:
                self.stats.dropped_full += 1
                return []
            if self._pairs_per_ip.get(source[0], 0) >= self.max_pairs_per_ip:
                self.stats.dropped_full += 1
                return []
            pair = _Pair(
                public_keys=(join.pk0, join.pk1),
                owner_ip=source[0],
                members=[None, None],
                last_seq=[-1, -1],
                budget=Budget(self.pair_packets_per_second, self.pair_bytes_per_second, now),
                last_active=now,
            )
            self._pairs[join.pair_id] = pair
            self._pairs_per_ip[source[0]] = self._pairs_per_ip.get(source[0], 0) + 1
            self.stats.pairs_created += 1
        if join.seq < pair.last_seq[join.member]:
            self.stats.dropped_replay += 1
            return []
        # An equal seq is a retransmission of the JOIN that bound this slot: answer it again.
        if join.seq == pair.last_seq[join.member] and pair.members[join.member] != source:
            self.stats.dropped_replay += 1
            return []
        pair.last_seq[join.member] = join.seq
        pair.members[join.member] = source
        self._touch(join.pair_id, pair, now)
        self.stats.joins += 1
        peer_present = pair.members[1 - join.member] is not None
        return [Outgoing(Joined(join.pair_id, join.member, peer_present).encode(), source)]

    def forward(self, data: bytes, source: Address, now: float) -> Address | None:
        """The DATA hot path: where to send `data` unchanged, or None to drop it. Same checks as
        `receive`, without building message objects per packet."""
        size = len(data)
        if size < _DATA_HEADER.size or size > MAX_DATA_SIZE:
            self.stats.dropped_malformed += 1
            return None
        pair_id = data[1 : 1 + PAIR_ID_SIZE]
        pair = self._pairs.get(pair_id)
        if pair is None:
            self.stats.dropped_unknown += 1
            return None
        members = pair.members
        if source == members[0]:
            other = members[1]
        elif source == members[1]:
            other = members[0]
        else:
            self.stats.dropped_unknown += 1
            return None
        self._touch(pair_id, pair, now)
        if other is None:
            self.stats.dropped_no_peer += 1
            return None
        if not pair.budget.allow(now, size):
            self.stats.dropped_rate += 1
            return None
        if not self._total.allow(now, size):
            pair.budget.refund(size)
            self.stats.dropped_rate += 1
            return None
        stats = self.stats
        stats.forwarded_packets += 1
        stats.forwarded_bytes += size
        return other

    def _touch(self, pair_id: bytes, pair: _Pair, now: float) -> None:
        pair.last_active = now
        self._pairs.move_to_end(pair_id)

    def poll_timeout(self) -> float | None:
        """When `handle_timeout` next has work (the oldest pair's expiry), or None."""
        for pair in self._pairs.values():
            return pair.last_active + self.idle_timeout
        return None

    def handle_timeout(self, now: float) -> None:
        """Forget pairs idle for `idle_timeout`."""
        while self._pairs:
            pair_id, pair = next(iter(self._pairs.items()))
            if pair.last_active + self.idle_timeout > now:
                break
            del self._pairs[pair_id]
            left = self._pairs_per_ip[pair.owner_ip] - 1
            if left:
                self._pairs_per_ip[pair.owner_ip] = left
            else:
                del self._pairs_per_ip[pair.owner_ip]
            self.stats.pairs_expired += 1


# --- client -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinedEvent:
    peer_present: bool


@dataclass(frozen=True, slots=True)
class DataEvent:
    payload: bytes


@dataclass(frozen=True, slots=True)
class JoinFailedEvent:
    """The relay never confirmed the JOIN: it is down, full, or refuses us."""


RelayEvent = JoinedEvent | DataEvent | JoinFailedEvent


class RelayClient:
    """One member's view of a relayed pair: builds JOIN/DATA/KEEPALIVE, parses what comes back.

    `receive(data, source, now)` returns events and puts any datagram to send into `outbox`
    (drained by the shell with `take_outgoing()`); `handle_timeout(now)` retries JOIN and sends
    keepalives.
    """

    def __init__(self, pair_secret: bytes, member: int, relay_addr: Address) -> None:
        self.credentials = PairCredentials.derive(pair_secret, member)
        self.relay_addr = relay_addr
        self.joined = False
        self._token = NO_TOKEN
        self._seq = 0
        self._attempts = 0
        self._next_timer: float | None = None
        self._outbox: list[bytes] = []
        self._failed = False

    @property
    def pair_id(self) -> bytes:
        return self.credentials.pair_id

    def _join(self, now: float) -> bytes:
        # seq must grow across restarts too, so it is the clock in ms, bumped if the clock stalls.
        self._seq = max(self._seq + 1, int(now * 1000))
        c = self.credentials
        unsigned = Join(c.pair_id, c.member, *c.public_keys, self._seq, self._token, b"")
        signature = c.signing_key.sign(unsigned.signed_part()).signature
        return Join(c.pair_id, c.member, *c.public_keys, self._seq, self._token, signature).encode()

    def start(self, now: float) -> bytes:
        """The first JOIN (without token; the relay answers with one)."""
        self._attempts = 1
        self._next_timer = now + JOIN_RETRY_SECONDS
        return self._join(now)

    def rejoin(self, now: float) -> bytes:
        """JOIN again, e.g. after our address changed (roaming); keeps the token if still valid."""
        self.joined = False
        return self.start(now)

    def wrap(self, payload: bytes) -> bytes:
        """A DATA datagram carrying `payload` (a sealed session packet) to the other member."""
        if len(payload) + _DATA_HEADER.size > MAX_DATA_SIZE:
            raise LocalPathError("payload too large for the relay")
        return Data(self.pair_id, payload).encode()

    def receive(self, data: bytes, source: Address, now: float) -> list[RelayEvent]:
        """Handle a datagram from the relay; anything not from it or not for our pair is ignored."""
        if source != self.relay_addr:
            return []
        try:
            message = parse(data)
        except RelayParseError:
            return []
        if getattr(message, "pair_id", None) != self.pair_id:
            return []
        if isinstance(message, Token):
            self._token = message.token
            self._outbox.append(self._join(now))
            return []
        if isinstance(message, Joined):
            if message.member != self.credentials.member:
                return []
            first = not self.joined
            self.joined = True
            self._next_timer = now + KEEPALIVE_SECONDS
            return [JoinedEvent(message.peer_present)] if first else []
        if isinstance(message, Data):
            return [DataEvent(message.payload)]
        return []

    def take_outgoing(self) -> list[bytes]:
        """Datagrams produced by `receive` for the relay (e.g. the JOIN with a fresh token)."""
        out, self._outbox = self._outbox, []
        return out

    def poll_timeout(self) -> float | None:
        return self._next_timer

    def handle_timeout(self, now: float) -> tuple[list[bytes], list[RelayEvent]]:
        """Retry JOIN until JOINED (then report failure), or send a keepalive once joined."""
        if self._next_timer is None or now < self._next_timer:
            return [], []
        if self.joined:
            self._next_timer = now + KEEPALIVE_SECONDS
            return [Keepalive(self.pair_id).encode()], []
        if self._attempts >= JOIN_ATTEMPTS:
            self._next_timer = None
            return [], [JoinFailedEvent()]
        self._attempts += 1
        self._next_timer = now + JOIN_RETRY_SECONDS
        return [self._join(now)], []
