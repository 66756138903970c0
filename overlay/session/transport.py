"""An established session: counter-nonce transport encryption, replay window, silent rekeying.

Wire: kind | receiver index | epoch low byte | counter | secretbox(plaintext). The header needs no
AEAD associated data because every field is bound implicitly: the counter is the nonce, the
epoch selects the key, the index selects the session (hence the key), the kind is checked. So
nothing here depends on addresses, and a session survives path and relay changes untouched.

Rekeying needs no messages: each sender ratchets its key (next = KDF(key)) every
REKEY_AFTER_SECONDS or REKEY_AFTER_MESSAGES; the receiver follows when it authenticates a packet
from the next epoch, keeping only the current and previous keys, so a key stolen mid-call does
not decrypt traffic older than about one epoch.
"""

from __future__ import annotations

from typing import NoReturn

import nacl.bindings
import nacl.exceptions

from overlay.session.errors import DropReason, LocalProtocolError, RemoteProtocolError
from overlay.session.packets import KIND_TRANSPORT, TRANSPORT_HEADER, TRANSPORT_OVERHEAD
from overlay.session.primitives import next_key
from overlay.session.replay import ReplayWindow
from overlay.session.stats import TransportStats

# WireGuard rekeys after 2^60 messages or 120 s; we ratchet far sooner by count (2^20 is ~9 min
# of a 2000 pkt/s call) because a ratchet costs one hash, not a handshake.
REKEY_AFTER_MESSAGES = 2**20
REKEY_AFTER_SECONDS = 120.0
# Counters are never reused within a session (the nonce is the counter); stop well before the
# 64-bit wrap, leaving room for the replay window as WireGuard does (2^64 - 2^13 - 1).
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
# The ratchet gives forward secrecy but never heals a compromise (no fresh DH): a session must be
# replaced by a new handshake within a day; callers should start one at REHANDSHAKE_AFTER_SECONDS.
REJECT_AFTER_SECONDS = 24 * 3600.0
REHANDSHAKE_AFTER_SECONDS = REJECT_AFTER_SECONDS - 600.0
# The previous epoch's key lives this long after the receiver moves on: enough for packets
# reordered around the switch (jitter buffers wait < 1 s), short for forward secrecy.
PREVIOUS_KEY_SECONDS = 10.0
# How many epochs ahead a receiver derives keys for: a sender ratchets at most once per sealed
# packet, so 2 covers a whole lost epoch; the epoch byte stays unambiguous (256 >> 2 + 1).
MAX_EPOCH_LOOKAHEAD = 2
# Largest UDP payload (65507) minus our overhead; callers normally stay near 1200 B.
MAX_PLAINTEXT = 65507 - TRANSPORT_OVERHEAD

# nonce = epoch byte | counter | zeros: unique because counters never repeat
_NONCE_PAD = bytes(15)
_secretbox = nacl.bindings.crypto_secretbox_easy
_secretbox_open = nacl.bindings.crypto_secretbox_open


class _SendState:
    __slots__ = ("counter", "epoch", "epoch_messages", "epoch_started", "key")

    def __init__(self, key: bytes, now: float) -> None:
        self.key = key
        self.epoch = 0
        self.epoch_started = now
        self.epoch_messages = 0
        self.counter = 0


class _ReceiveState:
    __slots__ = ("current", "epoch", "previous", "previous_until")

    def __init__(self, key: bytes) -> None:
        self.epoch = 0
        self.current = key
        self.previous: bytes | None = None
        self.previous_until = 0.0


class Session:
    """One end of an established session; `seal` and `open` are the whole data-path API."""

    def __init__(
        self,
        *,
        local_index: int,
        remote_index: int,
        peer_public_key: bytes,
        send_key: bytes,
        receive_key: bytes,
        now: float,
        is_initiator: bool,
        handshake_hash: bytes = b"",
    ) -> None:
        self.local_index = local_index
        self.remote_index = remote_index
        self.peer_public_key = peer_public_key
        self.is_initiator = is_initiator
        # Unique per session and equal on both ends: usable for channel binding by upper layers.
        self.handshake_hash = handshake_hash
        self.created = now
        self.stats = TransportStats()
        self._send = _SendState(send_key, now)
        self._receive = _ReceiveState(receive_key)
        self._window = ReplayWindow()

    # -- state the shell may read ----------------------------------------------------------

    @property
    def send_epoch(self) -> int:
        return self._send.epoch

    @property
    def receive_epoch(self) -> int:
        return self._receive.epoch

    def receive_keys_held(self) -> int:
        """How many receive keys are in memory (1 or 2): lets tests prove old keys are gone."""
        return 1 + (self._receive.previous is not None)

    def expired(self, now: float) -> bool:
        return now - self.created >= REJECT_AFTER_SECONDS

    def wants_rehandshake(self, now: float) -> bool:
        """True once the caller should build a replacement session by a new handshake."""
        return now - self.created >= REHANDSHAKE_AFTER_SECONDS

    # -- data path --------------------------------------------------------------------------

    def seal(self, plaintext: bytes, now: float) -> bytes:
        """Encrypt one datagram for the peer, ratcheting the send key first when due."""
        send = self._send
        # One combined test on the per-packet path; the rare cases are sorted out below.
        if (
            len(plaintext) > MAX_PLAINTEXT
            or now - self.created >= REJECT_AFTER_SECONDS
            or send.counter >= REJECT_AFTER_MESSAGES
        ):
            self._refuse_seal(plaintext, now)
        if (
            send.epoch_messages >= REKEY_AFTER_MESSAGES
            or now - send.epoch_started >= REKEY_AFTER_SECONDS
        ):
            send.key = next_key(send.key)  # the old send key is dropped here
            send.epoch += 1
            send.epoch_started = now
            send.epoch_messages = 0
            self.stats.send_rekeys += 1
        header = TRANSPORT_HEADER.pack(
            KIND_TRANSPORT, self.remote_index, send.epoch & 0xFF, send.counter
        )
        # secretbox_easy gives the same bytes as secretbox without PyNaCl's zero-padding copy.
        sealed = _secretbox(plaintext, header[5:] + _NONCE_PAD, send.key)
        send.counter += 1
        send.epoch_messages += 1
        self.stats.sent += 1
        return header + sealed

    def _refuse_seal(self, plaintext: bytes, now: float) -> NoReturn:
        if len(plaintext) > MAX_PLAINTEXT:
            raise LocalProtocolError(f"plaintext of {len(plaintext)} B exceeds {MAX_PLAINTEXT}")
        if self.expired(now):
            raise LocalProtocolError("session past REJECT_AFTER_SECONDS: handshake again")
        raise LocalProtocolError("session out of counters: handshake again")

    def open(self, packet: bytes, now: float) -> bytes:
        """Authenticate and decrypt one datagram; any refusal is counted and raised as typed."""
        try:
            plaintext = self._open(packet, now)
        except RemoteProtocolError as e:
            self.stats.drop(e.reason)
            raise
        self.stats.accepted += 1
        return plaintext

    def _open(self, packet: bytes, now: float) -> bytes:
        if len(packet) < TRANSPORT_OVERHEAD:
            if packet and packet[0] != KIND_TRANSPORT:
                raise RemoteProtocolError(DropReason.FOREIGN, "not a transport packet")
            raise RemoteProtocolError(DropReason.TRUNCATED, f"{len(packet)} B transport packet")
        kind, index, wire_epoch, counter = TRANSPORT_HEADER.unpack_from(packet)
        if (
            kind != KIND_TRANSPORT
            or index != self.local_index
            or now - self.created >= REJECT_AFTER_SECONDS
            or counter >= REJECT_AFTER_MESSAGES
        ):
            self._refuse_header(kind, index, counter, now)
        receive = self._receive
        if receive.previous is not None and now >= receive.previous_until:
            receive.previous = None  # grace over: forget the previous epoch's key
        ahead = (wire_epoch - receive.epoch) & 0xFF
        if ahead == 0:
            key = receive.current
        elif ahead == 0xFF and receive.previous is not None:
            key = receive.previous
        elif ahead <= MAX_EPOCH_LOOKAHEAD:
            key = receive.current
            for _ in range(ahead):
                key = next_key(key)
        else:
            raise RemoteProtocolError(DropReason.BAD_EPOCH, f"epoch byte {wire_epoch}")
        try:
            plaintext = _secretbox_open(
                packet[TRANSPORT_HEADER.size :], packet[5 : TRANSPORT_HEADER.size] + _NONCE_PAD, key
            )
        except (nacl.exceptions.CryptoError, ValueError) as e:
            raise RemoteProtocolError(DropReason.TAMPERED, "transport packet does not open") from e
        self._window.accept(counter)
        if 0 < ahead <= MAX_EPOCH_LOOKAHEAD:
            # Authenticated proof the peer moved on: follow it, keep one key back, drop the rest.
            receive.previous = _key_before(receive.current, ahead)
            receive.previous_until = now + PREVIOUS_KEY_SECONDS
            receive.current = key
            receive.epoch += ahead
            self.stats.receive_rekeys += ahead
        return plaintext

    def _refuse_header(self, kind: int, index: int, counter: int, now: float) -> NoReturn:
        if kind != KIND_TRANSPORT:
            raise RemoteProtocolError(DropReason.FOREIGN, f"kind 0x{kind:02x}")
        if index != self.local_index:
            raise RemoteProtocolError(DropReason.UNKNOWN_INDEX, f"index {index} is not ours")
        if self.expired(now):
            raise RemoteProtocolError(DropReason.EXPIRED, "session past REJECT_AFTER_SECONDS")
        raise RemoteProtocolError(DropReason.EXPIRED, "counter beyond the session's limit")


def _key_before(key: bytes, ahead: int) -> bytes:
    """The key of epoch (current + ahead - 1), derived from the current epoch's key."""
    for _ in range(ahead - 1):
        key = next_key(key)
    return key
