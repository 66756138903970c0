"""Packet kinds and fixed layouts of the session layer, and the receiver-index peek for demux.

The daemon's one UDP socket demultiplexes on the first byte (STUN 0x00/0x01, DHT 0xD0, relays
0xF*); the 0xE* range belongs here. Every layout is fixed-size (transport: fixed header), so a
parser is a length check plus slicing, and sizes leak nothing about payloads.
"""

from __future__ import annotations

import struct

from overlay.session.errors import DropReason, RemoteProtocolError
from overlay.session.primitives import AEAD_TAG_SIZE, MAC_SIZE

KIND_MSG1 = 0xE1  # initiator -> responder: first handshake message
KIND_MSG2 = 0xE2  # responder -> initiator: second handshake message
KIND_TRANSPORT = 0xE3  # either way: encrypted session data
KIND_COOKIE_REPLY = 0xE4  # responder under load -> initiator: retry msg1 with this cookie
SESSION_KINDS = frozenset({KIND_MSG1, KIND_MSG2, KIND_TRANSPORT, KIND_COOKIE_REPLY})

INDEX_SIZE = 4  # WireGuard's 32-bit random session index: demux without trusting addresses
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
TIMESTAMP_SIZE = 8  # wall-clock nanoseconds, big-endian: compares as an integer
LENGTH_SIZE = 2
# Handshake payloads carry a connect request and ICE candidates. 1024 B keeps msg1 at 1231 B,
# inside the 1232 B that IPv6's 1280 B minimum MTU leaves for a UDP payload (QUIC's rule too).
MAX_HANDSHAKE_PAYLOAD = 1024

INDEX = struct.Struct("!I")

# msg1: kind | sender index | ephemeral | AEAD(static Ed25519 pk) | AEAD(body + sig) | mac1 | mac2
# body = timestamp | payload length | payload | zero padding to MAX_HANDSHAKE_PAYLOAD
MSG1_BODY_SIZE = TIMESTAMP_SIZE + LENGTH_SIZE + MAX_HANDSHAKE_PAYLOAD
MSG1_EPHEMERAL = 1 + INDEX_SIZE
MSG1_STATIC = MSG1_EPHEMERAL + PUBLIC_KEY_SIZE
MSG1_BODY = MSG1_STATIC + PUBLIC_KEY_SIZE + AEAD_TAG_SIZE
MSG1_MAC1 = MSG1_BODY + MSG1_BODY_SIZE + SIGNATURE_SIZE + AEAD_TAG_SIZE
MSG1_MAC2 = MSG1_MAC1 + MAC_SIZE
MSG1_SIZE = MSG1_MAC2 + MAC_SIZE

# msg2: kind | sender index | receiver index | ephemeral | AEAD(body + sig)
# body = payload length | payload | zero padding to MAX_HANDSHAKE_PAYLOAD
MSG2_BODY_SIZE = LENGTH_SIZE + MAX_HANDSHAKE_PAYLOAD
MSG2_EPHEMERAL = 1 + 2 * INDEX_SIZE
MSG2_BODY = MSG2_EPHEMERAL + PUBLIC_KEY_SIZE
MSG2_SIZE = MSG2_BODY + MSG2_BODY_SIZE + SIGNATURE_SIZE + AEAD_TAG_SIZE

# cookie reply: kind | receiver index | nonce | secretbox(cookie)
COOKIE_NONCE_SIZE = 24
COOKIE_SIZE = MAC_SIZE
COOKIE_REPLY_SIZE = 1 + INDEX_SIZE + COOKIE_NONCE_SIZE + COOKIE_SIZE + 16

# transport: kind | receiver index | epoch (low byte) | counter | secretbox(payload)
TRANSPORT_HEADER = struct.Struct("!BIBQ")
TRANSPORT_OVERHEAD = TRANSPORT_HEADER.size + 16

# Never amplify: an unverified source gets back no more bytes than it sent (WireGuard, QUIC).
assert MSG2_SIZE <= MSG1_SIZE
assert COOKIE_REPLY_SIZE <= MSG1_SIZE
# Fits IPv6's minimum-MTU UDP payload, so the handshake never depends on fragmentation.
assert MSG1_SIZE <= 1232


def check_kind(packet: bytes, kind: int, size: int) -> None:
    """Refuse a packet that is not exactly `size` bytes of `kind` (fixed layouts: no parsing)."""
    if not packet or packet[0] != kind:
        raise RemoteProtocolError(DropReason.FOREIGN, f"expected kind 0x{kind:02x}")
    if len(packet) != size:
        reason = DropReason.TRUNCATED if len(packet) < size else DropReason.FOREIGN
        raise RemoteProtocolError(reason, f"kind 0x{kind:02x} is {size} B, got {len(packet)}")


def peek_receiver_index(packet: bytes) -> int:
    """The local index a msg2, cookie reply or transport packet is for: the shell's demux key.

    Addresses are not used: a session keeps its index across paths and relays.
    """
    if not packet or packet[0] not in SESSION_KINDS or packet[0] == KIND_MSG1:
        raise RemoteProtocolError(DropReason.FOREIGN, "not a packet addressed to an index")
    offset = 1 + INDEX_SIZE if packet[0] == KIND_MSG2 else 1
    if len(packet) < offset + INDEX_SIZE:
        raise RemoteProtocolError(DropReason.TRUNCATED, "too short for a receiver index")
    return INDEX.unpack_from(packet, offset)[0]
