"""The few primitives the session layer uses, each wrapped once so failures become typed drops.

BLAKE2b (hashlib) is the hash, the MAC and — in keyed mode, which is a PRF — the HKDF-style chain
that every key comes from. X25519 is the DH; XChaCha20-Poly1305 is the handshake AEAD because the
handshake needs associated data (the transcript hash); transport uses XSalsa20-Poly1305 secretbox,
which is faster here and whose header needs no AD (see transport.py).
"""

from __future__ import annotations

import hashlib

import nacl.bindings
import nacl.exceptions

from overlay.session.errors import DropReason, RemoteProtocolError

HASH_SIZE = 32
KEY_SIZE = 32
# 128-bit MACs (WireGuard's mac1/mac2 size): forging one blindly takes 2^128 tries, and they are
# only DoS filters, never the authentication itself.
MAC_SIZE = 16
AEAD_TAG_SIZE = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
# Handshake keys are fresh per message (derived from a new ephemeral DH), so each key encrypts
# once and a constant nonce is safe; the nonce is 24 bytes because that is XChaCha20's size.
HANDSHAKE_NONCE = bytes(nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)


def hash_(*parts: bytes) -> bytes:
    """Transcript hash: BLAKE2b-256 of the concatenation (fixed-size parts keep it unambiguous)."""
    h = hashlib.blake2b(digest_size=HASH_SIZE)
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes, size: int = MAC_SIZE) -> bytes:
    """Keyed BLAKE2b: a PRF, so it serves as MAC and as the KDF's building block."""
    return hashlib.blake2b(data, key=key, digest_size=size).digest()


def kdf2(chaining_key: bytes, input_key_material: bytes) -> tuple[bytes, bytes]:
    """HKDF shape (extract, then two expands) with keyed BLAKE2b as the PRF instead of HMAC."""
    prk = mac(chaining_key, input_key_material, KEY_SIZE)
    first = mac(prk, b"\x01", KEY_SIZE)
    second = mac(prk, first + b"\x02", KEY_SIZE)
    return first, second


def next_key(key: bytes) -> bytes:
    """One-way ratchet for rekeying: holding the new key reveals nothing about the old one."""
    return mac(key, b"3bc-session rekey", KEY_SIZE)


def dh(private: bytes, public: bytes) -> bytes:
    """X25519; a low-order peer point (all-zero result) is a remote error, not a crash."""
    try:
        return nacl.bindings.crypto_scalarmult(private, public)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, ValueError) as e:
        raise RemoteProtocolError(DropReason.BAD_KEY, "unusable X25519 point") from e


def ed25519_to_x25519(public_key: bytes) -> bytes:
    """The X25519 twin of an Ed25519 key, so one 3Bot key authenticates both signatures and DH."""
    try:
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.ValueError, ValueError) as e:
        raise RemoteProtocolError(DropReason.BAD_KEY, "not an Ed25519 point") from e


def x25519_keypair(random_bytes: bytes) -> tuple[bytes, bytes]:
    """An ephemeral key pair from caller-supplied randomness (cores take randomness injected)."""
    return random_bytes, nacl.bindings.crypto_scalarmult_base(random_bytes)


def aead_encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, associated, HANDSHAKE_NONCE, key
    )


def aead_decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    try:
        return nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext, associated, HANDSHAKE_NONCE, key
        )
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as e:
        raise RemoteProtocolError(DropReason.TAMPERED, "handshake AEAD failed") from e
