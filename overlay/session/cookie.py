"""Stateless return-routability cookies: under load, a msg1 costs the responder one MAC.

The cookie is a MAC, under a secret that rotates with the clock, over the time epoch and the
source address; the responder stores nothing per source. A spoofed source never sees its
cookie, so it cannot make the responder do public-key work (WireGuard's cookie reply, simplified).
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import nacl.bindings
import nacl.exceptions

from overlay.session.errors import DropReason, RemoteProtocolError
from overlay.session.packets import (
    COOKIE_NONCE_SIZE,
    COOKIE_REPLY_SIZE,
    INDEX,
    INDEX_SIZE,
    KIND_COOKIE_REPLY,
    MSG1_MAC1,
    MSG1_MAC2,
    check_kind,
)
from overlay.session.primitives import KEY_SIZE, MAC_SIZE, hash_, mac

# WireGuard's COOKIE_SECRET_MAX_AGE: a cookie stays usable for one to two epochs, long enough for
# a retry across a slow path, short enough that a harvested cookie soon stops working.
COOKIE_EPOCH_SECONDS = 120.0
MAC1_LABEL = b"3bc-session mac1"
COOKIE_LABEL = b"3bc-session cookie"


def source_bytes(source: Hashable) -> bytes:
    """The caller's opaque source address as bytes (bytes as-is; tuples by their stable repr)."""
    if isinstance(source, bytes):
        return source
    return repr(source).encode()


def mac1_key(responder_public_key: bytes) -> bytes:
    """mac1 proves the sender knows whom it addresses, so scanners get silence, not work."""
    return hash_(MAC1_LABEL, responder_public_key)


def _reply_key(responder_public_key: bytes, msg1_mac1: bytes) -> bytes:
    # Bound to the msg1 it answers, so a cookie reply cannot be replayed against another msg1.
    return mac(hash_(COOKIE_LABEL, responder_public_key), msg1_mac1, KEY_SIZE)


class CookieChecker:
    """Responder side: makes cookies, checks msg1's mac2, and builds cookie replies."""

    def __init__(self, secret: bytes, responder_public_key: bytes) -> None:
        self._secret = secret
        self._public_key = responder_public_key

    def cookie(self, source: Hashable, epoch: int) -> bytes:
        return mac(
            self._secret, (epoch % 2**64).to_bytes(8, "big") + source_bytes(source), MAC_SIZE
        )

    def has_valid_mac2(self, msg1: bytes, source: Hashable, now: float) -> bool:
        """True when mac2 was made with this source's cookie from this epoch or the previous one."""
        epoch = math.floor(now / COOKIE_EPOCH_SECONDS)
        signed, mac2 = msg1[:MSG1_MAC2], msg1[MSG1_MAC2:]
        return any(
            nacl.bindings.sodium_memcmp(mac(self.cookie(source, e), signed), mac2)
            for e in (epoch, epoch - 1)
        )

    def reply(self, msg1: bytes, source: Hashable, now: float, nonce: bytes) -> bytes:
        """A 61-byte cookie reply to the msg1's sender index: far smaller than the msg1."""
        cookie = self.cookie(source, math.floor(now / COOKIE_EPOCH_SECONDS))
        key = _reply_key(self._public_key, msg1[MSG1_MAC1:MSG1_MAC2])
        sealed = nacl.bindings.crypto_secretbox(cookie, nonce, key)
        packet = bytes([KIND_COOKIE_REPLY]) + msg1[1 : 1 + INDEX_SIZE] + nonce + sealed
        assert len(packet) == COOKIE_REPLY_SIZE
        return packet


def open_cookie_reply(packet: bytes, responder_public_key: bytes, msg1: bytes) -> bytes:
    """Initiator side: the cookie inside a reply to our `msg1`, or a typed drop."""
    check_kind(packet, KIND_COOKIE_REPLY, COOKIE_REPLY_SIZE)
    if packet[1 : 1 + INDEX_SIZE] != msg1[1 : 1 + INDEX_SIZE]:
        index = INDEX.unpack_from(packet, 1)[0]
        raise RemoteProtocolError(DropReason.UNKNOWN_INDEX, f"cookie reply for index {index}")
    nonce = packet[1 + INDEX_SIZE : 1 + INDEX_SIZE + COOKIE_NONCE_SIZE]
    key = _reply_key(responder_public_key, msg1[MSG1_MAC1:MSG1_MAC2])
    try:
        return nacl.bindings.crypto_secretbox_open(
            packet[1 + INDEX_SIZE + COOKIE_NONCE_SIZE :], nonce, key
        )
    except (nacl.exceptions.CryptoError, ValueError) as e:
        raise RemoteProtocolError(DropReason.TAMPERED, "cookie reply does not open") from e


def add_mac2(msg1: bytes, cookie: bytes | None) -> bytes:
    """msg1 with mac2 set from `cookie` (zeros without one: the responder ignores it unloaded)."""
    signed = msg1[:MSG1_MAC2]
    return signed + (mac(cookie, signed) if cookie is not None else bytes(MAC_SIZE))
