"""The two-message handshake: Noise-IK-shaped key schedule plus Ed25519 transcript signatures.

msg1 (initiator -> responder): sender index, ephemeral E_i, AEAD(initiator Ed25519 key) under
es, AEAD(timestamp, payload, signature) under es+ss, mac1, mac2. msg2: sender and receiver
index, ephemeral E_r, AEAD(payload, signature) under es+ss+ee+se. Transport keys come from the
final chaining key, so they depend on ee (forward secrecy) and on both static keys.

Why signatures on top of IK: in plain IK the responder authenticates msg1 only through es and ss,
both of which the responder's own private key can compute, so a thief of the responder's key can
forge msg1 "from" anyone to it (key-compromise impersonation, Tox's c-toxcore #426). The
initiator's signature covers the transcript and the plaintext body, which that thief cannot
produce. The responder signs too (defence in depth; IK's msg2 is already KCI-safe through es).
Signatures travel inside the AEAD so observers cannot test guesses of who is calling.

msg1 replays are refused by a per-initiator newest-timestamp table (WireGuard's TAI64N rule),
touched only after the signature verifies. Under load, a msg1 without a valid cookie gets only a
cookie reply and costs a MAC, no state and no public-key work.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import nacl.bindings

from overlay.identity import Identity, verify
from overlay.session.cookie import CookieChecker, add_mac2, mac1_key, open_cookie_reply
from overlay.session.errors import DropReason, LocalProtocolError, RemoteProtocolError
from overlay.session.packets import (
    COOKIE_NONCE_SIZE,
    COOKIE_SIZE,
    INDEX,
    KIND_COOKIE_REPLY,
    KIND_MSG1,
    KIND_MSG2,
    LENGTH_SIZE,
    MAX_HANDSHAKE_PAYLOAD,
    MSG1_BODY,
    MSG1_BODY_SIZE,
    MSG1_EPHEMERAL,
    MSG1_MAC1,
    MSG1_MAC2,
    MSG1_SIZE,
    MSG1_STATIC,
    MSG2_BODY,
    MSG2_BODY_SIZE,
    MSG2_EPHEMERAL,
    MSG2_SIZE,
    PUBLIC_KEY_SIZE,
    TIMESTAMP_SIZE,
    check_kind,
)
from overlay.session.primitives import (
    aead_decrypt,
    aead_encrypt,
    dh,
    ed25519_to_x25519,
    hash_,
    kdf2,
    mac,
)
from overlay.session.stats import HandshakeStats
from overlay.session.transport import Session

PROTOCOL_NAME = b"3bc-session-v1 IK X25519 XChaCha20Poly1305 BLAKE2b +Ed25519 transcript sigs"
MSG1_SIGNATURE_LABEL = b"3bc-session msg1 signature"
MSG2_SIGNATURE_LABEL = b"3bc-session msg2 signature"
# An initiator accepts msg2 this long after sending msg1: a relayed path adds well under a second;
# after this the caller starts a fresh handshake (new ephemeral, new timestamp) instead.
HANDSHAKE_TIMEOUT_SECONDS = 30.0
# Newest msg1 timestamps remembered (about 100 B each, ~6 MB at most). Past this the least
# recently seen initiator is forgotten and its old msg1s could be replayed once: an attacker must
# first complete this many signed handshakes with distinct keys, which load mode throttles.
MAX_TRACKED_INITIATORS = 65536
MAX_TIMESTAMP = 2**64 - 1

RandomBytes = Callable[[int], bytes]


def _initial_state(responder_public_key: bytes) -> tuple[bytes, bytes]:
    """(chaining key, transcript hash) before msg1: bound to the protocol and the responder."""
    h = hash_(PROTOCOL_NAME)
    return h, hash_(h, responder_public_key)


def _pad(payload: bytes) -> bytes:
    return len(payload).to_bytes(LENGTH_SIZE, "big") + payload.ljust(MAX_HANDSHAKE_PAYLOAD, b"\0")


def _unpad(padded: bytes) -> bytes:
    """Strict: the length must fit and the padding must be zeros, so one plaintext, one packet."""
    length = int.from_bytes(padded[:LENGTH_SIZE], "big")
    if length > MAX_HANDSHAKE_PAYLOAD:
        raise RemoteProtocolError(DropReason.MALFORMED, f"payload length {length}")
    if any(padded[LENGTH_SIZE + length :]):
        raise RemoteProtocolError(DropReason.MALFORMED, "non-zero padding")
    return padded[LENGTH_SIZE : LENGTH_SIZE + length]


def _check_payload(payload: bytes) -> None:
    if len(payload) > MAX_HANDSHAKE_PAYLOAD:
        raise LocalProtocolError(
            f"handshake payload of {len(payload)} B exceeds {MAX_HANDSHAKE_PAYLOAD}"
        )


def _new_index(random: RandomBytes, local_index: int | None) -> int:
    if local_index is None:
        return INDEX.unpack(random(INDEX.size))[0]
    if not 0 <= local_index < 2**32:
        raise LocalProtocolError("a session index is an unsigned 32-bit integer")
    return local_index


def _build_msg1(
    *,
    sender_index: int,
    ephemeral_public: bytes,
    es: bytes,
    ss: bytes,
    static_public_key: bytes,
    responder_public_key: bytes,
    timestamp_ns: int,
    payload: bytes,
    sign: Callable[[bytes], bytes],
) -> tuple[bytes, bytes, bytes]:
    """msg1 without mac2, plus (chaining key, hash) after it. DH results come in as arguments."""
    ck, h = _initial_state(responder_public_key)
    header = bytes([KIND_MSG1]) + INDEX.pack(sender_index)
    h = hash_(h, header, ephemeral_public)
    ck, k = kdf2(ck, es)
    encrypted_static = aead_encrypt(k, static_public_key, h)
    h = hash_(h, encrypted_static)
    ck, k = kdf2(ck, ss)
    body = timestamp_ns.to_bytes(TIMESTAMP_SIZE, "big") + _pad(payload)
    signature = sign(MSG1_SIGNATURE_LABEL + h + hash_(body))
    encrypted_body = aead_encrypt(k, body + signature, h)
    h = hash_(h, encrypted_body)
    message = header + ephemeral_public + encrypted_static + encrypted_body
    message += mac(mac1_key(responder_public_key), message)
    assert len(message) == MSG1_MAC2
    return message, ck, h


@dataclass(frozen=True)
class Established:
    """The initiator's result: a ready session and the responder's handshake payload."""

    session: Session
    payload: bytes


@dataclass(frozen=True)
class CookieReceived:
    """The responder is under load: send `message` (msg1 with mac2) again; cache `cookie`."""

    message: bytes
    cookie: bytes


class Initiator:
    """One handshake attempt towards a known key. Build anew (fresh ephemeral) to retry."""

    def __init__(
        self,
        identity: Identity,
        peer_public_key: bytes,
        payload: bytes,
        now: float,
        *,
        timestamp_ns: int,
        cookie: bytes | None = None,
        local_index: int | None = None,
        random: RandomBytes = os.urandom,
    ) -> None:
        """`now` is the session clock (monotonic); `timestamp_ns` is wall-clock time.

        They differ because the timestamp is compared across reboots of this machine by the
        responder (so it must be wall-clock and increasing), while session timers want a clock
        that never jumps.
        """
        _check_payload(payload)
        if not 0 <= timestamp_ns <= MAX_TIMESTAMP:
            raise LocalProtocolError("timestamp_ns must fit 64 unsigned bits")
        if cookie is not None and len(cookie) != COOKIE_SIZE:
            raise LocalProtocolError(f"a cookie is {COOKIE_SIZE} bytes")
        if len(peer_public_key) != PUBLIC_KEY_SIZE:
            raise LocalProtocolError("peer public key must be 32 bytes")
        try:
            self._peer_x25519 = ed25519_to_x25519(peer_public_key)
        except RemoteProtocolError:
            raise LocalProtocolError("peer public key is not a valid Ed25519 key") from None
        self.peer_public_key = peer_public_key
        self.local_index = _new_index(random, local_index)
        self.created = now
        self._identity = identity
        self._static_private = identity.x25519_private
        self._ephemeral_private = random(32)
        ephemeral_public = nacl.bindings.crypto_scalarmult_base(self._ephemeral_private)
        self._without_mac2, self._ck, self._h = _build_msg1(
            sender_index=self.local_index,
            ephemeral_public=ephemeral_public,
            es=dh(self._ephemeral_private, self._peer_x25519),
            ss=dh(self._static_private, self._peer_x25519),
            static_public_key=identity.public_key,
            responder_public_key=peer_public_key,
            timestamp_ns=timestamp_ns,
            payload=payload,
            sign=identity.sign,
        )
        self.cookie = cookie
        self.message = add_mac2(self._without_mac2, cookie)
        self._done = False

    def receive(self, packet: bytes, now: float) -> Established | CookieReceived:
        """Consume msg2 (-> Established) or a cookie reply (-> CookieReceived); else raise."""
        if self._done:
            raise LocalProtocolError("this handshake already completed")
        if packet[:1] == bytes([KIND_COOKIE_REPLY]):
            cookie = open_cookie_reply(packet, self.peer_public_key, self._without_mac2)
            self.cookie = cookie
            self.message = add_mac2(self._without_mac2, cookie)
            return CookieReceived(self.message, cookie)
        check_kind(packet, KIND_MSG2, MSG2_SIZE)
        receiver_index = INDEX.unpack_from(packet, 1 + INDEX.size)[0]
        if receiver_index != self.local_index:
            raise RemoteProtocolError(DropReason.UNKNOWN_INDEX, f"msg2 for {receiver_index}")
        if now - self.created > HANDSHAKE_TIMEOUT_SECONDS:
            raise RemoteProtocolError(DropReason.EXPIRED, "msg2 after the handshake timed out")
        responder_ephemeral = packet[MSG2_EPHEMERAL:MSG2_BODY]
        h = hash_(self._h, packet[:MSG2_EPHEMERAL], responder_ephemeral)
        ck, _ = kdf2(self._ck, dh(self._ephemeral_private, responder_ephemeral))
        ck, k = kdf2(ck, dh(self._static_private, responder_ephemeral))
        plaintext = aead_decrypt(k, packet[MSG2_BODY:], h)
        body, signature = plaintext[:MSG2_BODY_SIZE], plaintext[MSG2_BODY_SIZE:]
        if not verify(self.peer_public_key, MSG2_SIGNATURE_LABEL + h + hash_(body), signature):
            raise RemoteProtocolError(DropReason.BAD_SIGNATURE, "msg2 transcript signature")
        payload = _unpad(body)
        initiator_to_responder, responder_to_initiator = kdf2(ck, b"")
        self._done = True
        self._ephemeral_private = b""  # forward secrecy: the ephemeral has done its work
        session = Session(
            local_index=self.local_index,
            remote_index=INDEX.unpack_from(packet, 1)[0],
            peer_public_key=self.peer_public_key,
            send_key=initiator_to_responder,
            receive_key=responder_to_initiator,
            now=now,
            is_initiator=True,
            handshake_hash=hash_(h, packet[MSG2_BODY:]),
        )
        return Established(session, payload)


@dataclass(frozen=True)
class Reply:
    """What `Accepted.reply` produces: msg2 for the initiator and our end of the session."""

    message: bytes
    session: Session


@dataclass
class _PendingReply:
    sign: Callable[[bytes], bytes]
    random: RandomBytes
    chaining_key: bytes
    transcript: bytes
    initiator_ephemeral: bytes
    initiator_x25519: bytes
    initiator_index: int
    used: bool = False


@dataclass(frozen=True)
class Accepted:
    """An authenticated msg1: who calls and what they sent. Call `reply` to answer, or ignore."""

    peer_public_key: bytes
    payload: bytes
    timestamp_ns: int
    remote_index: int
    _pending: _PendingReply = field(repr=False)

    def reply(self, payload: bytes, now: float, *, local_index: int | None = None) -> Reply:
        """Build msg2 (never larger than msg1) carrying `payload`, and the responder's session."""
        _check_payload(payload)
        pending = self._pending
        if pending.used:
            raise LocalProtocolError("this msg1 was already answered")
        index = _new_index(pending.random, local_index)
        pending.used = True
        ephemeral_private = pending.random(32)
        ephemeral_public = nacl.bindings.crypto_scalarmult_base(ephemeral_private)
        header = bytes([KIND_MSG2]) + INDEX.pack(index) + INDEX.pack(pending.initiator_index)
        h = hash_(pending.transcript, header, ephemeral_public)
        ck, _ = kdf2(pending.chaining_key, dh(ephemeral_private, pending.initiator_ephemeral))
        ck, k = kdf2(ck, dh(ephemeral_private, pending.initiator_x25519))
        body = _pad(payload)
        signature = pending.sign(MSG2_SIGNATURE_LABEL + h + hash_(body))
        encrypted = aead_encrypt(k, body + signature, h)
        message = header + ephemeral_public + encrypted
        assert len(message) == MSG2_SIZE
        initiator_to_responder, responder_to_initiator = kdf2(ck, b"")
        session = Session(
            local_index=index,
            remote_index=pending.initiator_index,
            peer_public_key=self.peer_public_key,
            send_key=responder_to_initiator,
            receive_key=initiator_to_responder,
            now=now,
            is_initiator=False,
            handshake_hash=hash_(h, encrypted),
        )
        return Reply(message, session)


@dataclass(frozen=True)
class CookieReply:
    """Under load: send `message` back to the source instead of doing any handshake work."""

    message: bytes


@dataclass(frozen=True)
class _Msg1Contents:
    initiator_public_key: bytes
    initiator_x25519: bytes
    body: bytes
    signature: bytes
    signed: bytes  # exactly what the signature must cover
    chaining_key: bytes
    transcript: bytes


def _open_msg1(packet: bytes, static_private: bytes, responder_public_key: bytes) -> _Msg1Contents:
    """Decrypt msg1 with the responder's static key; the signature is NOT checked here."""
    ck, h = _initial_state(responder_public_key)
    ephemeral = packet[MSG1_EPHEMERAL:MSG1_STATIC]
    h = hash_(h, packet[:MSG1_EPHEMERAL], ephemeral)
    ck, k = kdf2(ck, dh(static_private, ephemeral))
    encrypted_static = packet[MSG1_STATIC:MSG1_BODY]
    initiator_public_key = aead_decrypt(k, encrypted_static, h)
    h = hash_(h, encrypted_static)
    initiator_x25519 = ed25519_to_x25519(initiator_public_key)
    ck, k = kdf2(ck, dh(static_private, initiator_x25519))
    encrypted_body = packet[MSG1_BODY:MSG1_MAC1]
    plaintext = aead_decrypt(k, encrypted_body, h)
    body, signature = plaintext[:MSG1_BODY_SIZE], plaintext[MSG1_BODY_SIZE:]
    return _Msg1Contents(
        initiator_public_key=initiator_public_key,
        initiator_x25519=initiator_x25519,
        body=body,
        signature=signature,
        signed=MSG1_SIGNATURE_LABEL + h + hash_(body),
        chaining_key=ck,
        transcript=hash_(h, encrypted_body),
    )


class Responder:
    """The daemon's one responder: answers msg1s for its identity, remembers only timestamps."""

    def __init__(
        self,
        identity: Identity,
        *,
        random: RandomBytes = os.urandom,
        max_tracked_initiators: int = MAX_TRACKED_INITIATORS,
    ) -> None:
        self.identity = identity
        self.public_key = identity.public_key
        self.stats = HandshakeStats()
        self._static_private = identity.x25519_private
        self._mac1_key = mac1_key(self.public_key)
        self._random = random
        self._cookies = CookieChecker(random(32), self.public_key)
        self._latest: OrderedDict[bytes, int] = OrderedDict()
        self._max_tracked = max_tracked_initiators

    def receive(
        self, packet: bytes, source: Hashable, now: float, under_load: bool = False
    ) -> Accepted | CookieReply:
        """Authenticate a msg1 from `source` (opaque address, used only for cookies).

        Raises RemoteProtocolError (counted in `stats`) for anything not accepted.
        """
        try:
            result = self._receive(packet, source, now, under_load)
        except RemoteProtocolError as e:
            self.stats.drop(e.reason)
            raise
        if isinstance(result, CookieReply):
            self.stats.cookie_replies += 1
        else:
            self.stats.accepted += 1
        return result

    def _receive(
        self, packet: bytes, source: Hashable, now: float, under_load: bool
    ) -> Accepted | CookieReply:
        check_kind(packet, KIND_MSG1, MSG1_SIZE)
        expected_mac1 = mac(self._mac1_key, packet[:MSG1_MAC1])
        if not nacl.bindings.sodium_memcmp(expected_mac1, packet[MSG1_MAC1:MSG1_MAC2]):
            raise RemoteProtocolError(DropReason.BAD_MAC1, "msg1 not addressed to our key")
        if under_load and not self._cookies.has_valid_mac2(packet, source, now):
            nonce = self._random(COOKIE_NONCE_SIZE)
            return CookieReply(self._cookies.reply(packet, source, now, nonce))
        contents = _open_msg1(packet, self._static_private, self.public_key)
        if not verify(contents.initiator_public_key, contents.signed, contents.signature):
            raise RemoteProtocolError(DropReason.BAD_SIGNATURE, "msg1 transcript signature")
        timestamp = int.from_bytes(contents.body[:TIMESTAMP_SIZE], "big")
        payload = _unpad(contents.body[TIMESTAMP_SIZE:])
        self._check_fresh(contents.initiator_public_key, timestamp)
        return Accepted(
            peer_public_key=contents.initiator_public_key,
            payload=payload,
            timestamp_ns=timestamp,
            remote_index=INDEX.unpack_from(packet, 1)[0],
            _pending=_PendingReply(
                sign=self.identity.sign,
                random=self._random,
                chaining_key=contents.chaining_key,
                transcript=contents.transcript,
                initiator_ephemeral=packet[MSG1_EPHEMERAL:MSG1_STATIC],
                initiator_x25519=contents.initiator_x25519,
                initiator_index=INDEX.unpack_from(packet, 1)[0],
            ),
        )

    def _check_fresh(self, initiator: bytes, timestamp: int) -> None:
        """Refuse a msg1 not newer than the last accepted one from that key; then remember it."""
        latest = self._latest.get(initiator)
        if latest is not None and timestamp <= latest:
            raise RemoteProtocolError(DropReason.REPLAYED, "msg1 timestamp not newer than last")
        self._latest[initiator] = timestamp
        self._latest.move_to_end(initiator)
        while len(self._latest) > self._max_tracked:
            self._latest.popitem(last=False)
