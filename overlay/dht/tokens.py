"""Address tokens: proof that a requester can receive at the address it sends from.

A token is a keyed hash of the requester's address and a time epoch, so checking one needs no
state. It gates the two things a spoofed source must not get: replies larger than the request
(amplification) and writes to our store (tokens are the write permission, as in BitTorrent's BEP 5).
"""

from __future__ import annotations

import hashlib
import os

from overlay.wire import Address, pack_ip

TOKEN_SIZE = 16
# Tokens stay valid for one to two epochs: long enough for an iterative lookup and a store, short
# enough that a token leaked with an address is soon worthless.
TOKEN_EPOCH = 300.0


class TokenIssuer:
    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or os.urandom(32)

    def _mac(self, addr: Address, epoch: int) -> bytes:
        packed = pack_ip(addr[0]) + addr[1].to_bytes(2, "big")
        return hashlib.blake2b(
            packed + epoch.to_bytes(8, "big"), key=self._secret, digest_size=TOKEN_SIZE
        ).digest()

    def issue(self, addr: Address, now: float) -> bytes:
        return self._mac(addr, int(now // TOKEN_EPOCH))

    def check(self, token: bytes | None, addr: Address, now: float) -> bool:
        if not token or len(token) != TOKEN_SIZE:
            return False
        epoch = int(now // TOKEN_EPOCH)
        return token in (self._mac(addr, epoch), self._mac(addr, epoch - 1))
