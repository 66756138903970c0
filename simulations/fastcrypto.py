"""A fast, still unforgeable stand-in for Ed25519 inside the simulation process only.

Why: every DHT response is signed by its sender and verified by its receiver, and every record is
verified when parsed. With real Ed25519 (sign ~26 us, verify ~60 us on this machine, measured by
`python -m simulations.fastcrypto`) crypto is most of the CPU of a 10k-node run. The protocol
logic only needs the *predicate* "this signature was made by the holder of this key": we replace
the primitive by a keyed BLAKE2b MAC whose key is the node's secret seed. The simulator knows every
honest seed (it created the nodes) and registers `public key -> seed`; `verify` recomputes the MAC
with the claimed key's seed. An adversary that signs with its own seed, replays a signature over
other bytes, or invents one fails exactly as it would with Ed25519, because it does not hold the
victim's seed. Signature sizes stay 64 bytes, so every datagram has the same length as for real.

Public keys stay real Ed25519 keys (derived once per identity and cached), so the core's
`is_valid_public_key` check keeps its meaning.

`install()` patches `overlay.identity` (and the modules that imported `verify` by name) in this
process; `uninstall()` restores the originals. Nothing on disk changes.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import nacl.signing

import overlay.dht.core as dht_core
import overlay.dht.record as dht_record
import overlay.identity as identity_mod
from overlay.identity import Identity

SIGNATURE_SIZE = 64

# public key -> seed (the MAC key); seed -> public key (to skip re-deriving Ed25519 keys).
_SEED_OF: dict[bytes, bytes] = {}
_PK_OF: dict[bytes, bytes] = {}
_originals: dict[str, Any] = {}


def public_key_for(seed: bytes) -> bytes:
    """The real Ed25519 public key of `seed`, derived once."""
    pk = _PK_OF.get(seed)
    if pk is None:
        pk = bytes(nacl.signing.SigningKey(seed).verify_key)
        _PK_OF[seed] = pk
        _SEED_OF[pk] = seed
    return pk


def _mac(seed: bytes, message: bytes) -> bytes:
    return hashlib.blake2b(message, key=seed, digest_size=SIGNATURE_SIZE).digest()


def _fast_sign(self: Identity, message: bytes) -> bytes:
    return _mac(self.seed, message)


def _fast_public_key(self: Identity) -> bytes:
    return public_key_for(self.seed)


def _fast_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    if len(signature) != SIGNATURE_SIZE or len(public_key) != identity_mod.PUBLIC_KEY_SIZE:
        return False
    seed = _SEED_OF.get(public_key)
    if seed is None:
        return False  # nobody in this simulation holds that key: nobody can have signed
    return hmac.compare_digest(_mac(seed, message), signature)


def _fast_valid_key(raw: bytes) -> bool:
    return raw in _SEED_OF or _originals["is_valid_public_key"](raw)


def install() -> None:
    """Swap the signature primitive for the MAC stand-in (idempotent)."""
    if _originals:
        return
    _originals["sign"] = Identity.sign
    _originals["public_key"] = Identity.public_key
    _originals["verify"] = identity_mod.verify
    _originals["is_valid_public_key"] = identity_mod.is_valid_public_key
    Identity.sign = _fast_sign  # type: ignore[method-assign]
    Identity.public_key = property(_fast_public_key)  # type: ignore[method-assign,assignment]
    for module in (identity_mod, dht_core, dht_record):
        if hasattr(module, "verify"):
            module.verify = _fast_verify  # type: ignore[attr-defined]
    dht_record.is_valid_public_key = _fast_valid_key


def uninstall() -> None:
    if not _originals:
        return
    Identity.sign = _originals["sign"]  # type: ignore[method-assign]
    Identity.public_key = _originals["public_key"]  # type: ignore[method-assign]
    for module in (identity_mod, dht_core, dht_record):
        if hasattr(module, "verify"):
            module.verify = _originals["verify"]  # type: ignore[attr-defined]
    dht_record.is_valid_public_key = _originals["is_valid_public_key"]
    _originals.clear()


def _rate(fn: Callable[[], object], seconds: float = 0.5) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            fn()
        count += 100
    return count / (time.perf_counter() - start)


def benchmark() -> dict[str, float]:
    """Operations per second of the real primitive and of the stand-in, on this machine."""
    ident = Identity(bytes(range(32)))
    message = bytes(300)
    key = nacl.signing.SigningKey(ident.seed)
    sig = key.sign(message).signature
    vk = nacl.signing.VerifyKey(bytes(key.verify_key))
    pk = public_key_for(ident.seed)
    fast_sig = _mac(ident.seed, message)
    return {
        "ed25519_sign_per_s": _rate(lambda: key.sign(message)),
        "ed25519_verify_per_s": _rate(lambda: vk.verify(message, sig)),
        "identity_sign_per_s (rebuilds SigningKey each call)": _rate(
            lambda: _originals.get("sign", Identity.sign)(ident, message)
        ),
        "mac_sign_per_s": _rate(lambda: _mac(ident.seed, message)),
        "mac_verify_per_s": _rate(lambda: _fast_verify(pk, message, fast_sig)),
    }


if __name__ == "__main__":
    for name, value in benchmark().items():
        print(f"{name:55s} {value:12,.0f}")
