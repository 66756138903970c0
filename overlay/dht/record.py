"""Signed peer records: how a key says where it can be reached.

Every record is signed by the key it describes and carries a sequence number and an expiry, so a
store can keep exactly one answer per key — the newest valid one — instead of trusting a vote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from overlay import wire
from overlay.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    is_valid_public_key,
    node_id_for,
    verify,
)

# Domain separation: a record signature can never be replayed as any other signed object.
_SIGN_CONTEXT = b"3bc-peer-record-v1"
# A person's reachable addresses: LAN, public IPv4, IPv6 and one spare; more is a waste of every
# store's memory.
MAX_ADDRESSES = 4
# Relay hints: the nodes the owner keeps NAT mappings open with (HyperDHT announces to ~20;
# a handful is enough to be reached and keeps records under one datagram).
MAX_RELAYS = 4
# Records live one hour; owners republish well before (see DhtConfig.republish_interval).
MAX_TTL = 3600
# Clocks of honest peers disagree by minutes, not hours.
CLOCK_SKEW = 300
MAX_RECORD_BYTES = 600


class RecordError(wire.WireError):
    """A record is malformed, forged, expired or otherwise unusable."""


@dataclass(frozen=True)
class PeerRecord:
    public_key: bytes
    addresses: tuple[wire.Address, ...]
    relays: tuple[tuple[bytes, wire.Address], ...]
    seq: int
    expires: int
    body: bytes = field(repr=False, compare=False, default=b"")
    signature: bytes = field(repr=False, compare=False, default=b"")

    @property
    def node_id(self) -> bytes:
        return node_id_for(self.public_key)

    def to_wire(self) -> list[bytes]:
        return [self.body, self.signature]

    def to_json(self) -> dict[str, Any]:
        return {
            "public_key": self.public_key.hex(),
            "addresses": [format_address(a) for a in self.addresses],
            "relays": [
                {"public_key": pk.hex(), "address": format_address(a)} for pk, a in self.relays
            ],
            "seq": self.seq,
            "expires": self.expires,
        }


def format_address(addr: wire.Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sign_record(
    identity: Identity,
    addresses: list[wire.Address],
    relays: list[tuple[bytes, wire.Address]],
    seq: int,
    expires: int,
) -> PeerRecord:
    body = wire.pack(
        {
            "pk": identity.public_key,
            "addrs": [wire.pack_address(a) for a in addresses[:MAX_ADDRESSES]],
            "relays": [[pk, wire.pack_address(a)] for pk, a in relays[:MAX_RELAYS]],
            "seq": seq,
            "exp": expires,
        }
    )
    signature = identity.sign(_SIGN_CONTEXT + body)
    return parse_record([body, signature])


def _relay(value: Any, name: str) -> tuple[bytes, wire.Address]:
    if not isinstance(value, list) or len(value) != 2:
        raise RecordError(f"{name}: expected [public key, address]")
    pk = wire.blob(PUBLIC_KEY_SIZE, PUBLIC_KEY_SIZE)(value[0], name)
    return pk, wire.address()(value[1], name)


_BODY = wire.Schema(
    "record",
    0,
    (
        wire.Field("pk", wire.blob(PUBLIC_KEY_SIZE, PUBLIC_KEY_SIZE)),
        wire.Field("addrs", wire.array(wire.address(), MAX_ADDRESSES)),
        wire.Field("relays", wire.array(_relay, MAX_RELAYS)),
        wire.Field("seq", wire.integer(0, 2**63 - 1)),
        wire.Field("exp", wire.integer(0, 2**40)),
    ),
)


def parse_record(value: Any) -> PeerRecord:
    """Check shape and signature; freshness is the store's and the reader's business."""
    if not isinstance(value, list) or len(value) != 2:
        raise RecordError("a record is [body, signature]")
    body, signature = value
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise RecordError("record body and signature must be bytes")
    if len(body) > MAX_RECORD_BYTES:
        raise RecordError("record too large")
    if len(signature) != SIGNATURE_SIZE:
        raise RecordError("bad signature length")
    try:
        fields = _BODY.validate(wire.unpack(body, MAX_RECORD_BYTES))
    except wire.WireError as exc:
        raise RecordError(f"bad record body: {exc}") from None
    pk = fields["pk"]
    if not is_valid_public_key(pk):
        raise RecordError("record key is not a valid Ed25519 key")
    if not verify(pk, _SIGN_CONTEXT + body, signature):
        raise RecordError("record signature does not verify")
    return PeerRecord(
        public_key=pk,
        addresses=tuple(fields["addrs"]),
        relays=tuple(fields["relays"]),
        seq=fields["seq"],
        expires=fields["exp"],
        body=body,
        signature=signature,
    )


def check_fresh(record: PeerRecord, now: float) -> None:
    """Reject records that have expired or claim a lifetime no honest owner would give."""
    if record.expires <= now:
        raise RecordError("record expired")
    if record.expires > now + MAX_TTL + CLOCK_SKEW:
        raise RecordError("record expiry too far in the future")
