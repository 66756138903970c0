"""DHT message schemas. Requests are plain; every response is signed by the responder over the
requester's random transaction id, which is how a node proves it holds its key."""

from __future__ import annotations

from overlay import wire
from overlay.dht.tokens import TOKEN_SIZE
from overlay.identity import NODE_ID_SIZE, PUBLIC_KEY_SIZE, SIGNATURE_SIZE

KIND_DHT = 0xD0
TX_SIZE = 8
# Requests from an address we hold no token for are padded to this size, so the answer (a full
# NODES reply) can be sent without amplification. 1232 is the DNS flag day 2020 safe UDP size.
PAD_TO = 1232
# Contacts in one reply: the k closest, trimmed to fit MAX_DATAGRAM.
MAX_NODES = 20
RESPONSE_CONTEXT = b"3bc-dht-response-v1"

_tx = wire.blob(TX_SIZE, TX_SIZE)
_pk = wire.blob(PUBLIC_KEY_SIZE, PUBLIC_KEY_SIZE)
_id = wire.blob(NODE_ID_SIZE, NODE_ID_SIZE)
_tok = wire.blob(TOKEN_SIZE, TOKEN_SIZE)
_pad = wire.blob(0, PAD_TO)
_record = wire.array(wire.blob(0, 600), 2)


def _contact(value: object, name: str) -> tuple[bytes, wire.Address]:
    if type(value) is not list or len(value) != 2:
        raise wire.SchemaError(f"{name}: expected [public key, address]")
    pk = value[0]
    if type(pk) is not bytes or len(pk) != PUBLIC_KEY_SIZE:
        raise wire.SchemaError(f"{name}: public key must be {PUBLIC_KEY_SIZE} bytes")
    return pk, wire.check_address(value[1], name)


PING = wire.Schema(
    "ping",
    1,
    (
        wire.Field("tx", _tx),
        wire.Field("pk", _pk),
        wire.Field("tok", _tok, required=False),
        wire.Field("pad", _pad, required=False),
    ),
)
FIND = wire.Schema(
    "find",
    2,
    (
        wire.Field("tx", _tx),
        wire.Field("pk", _pk),
        wire.Field("target", _id),
        wire.Field("rec", wire.boolean()),
        wire.Field("tok", _tok, required=False),
        wire.Field("pad", _pad, required=False),
    ),
)
STORE = wire.Schema(
    "store",
    3,
    (
        wire.Field("tx", _tx),
        wire.Field("pk", _pk),
        wire.Field("tok", _tok),
        wire.Field("rec", _record),
    ),
)
RESPONSE = wire.Schema(
    "response",
    4,
    (
        wire.Field("b", wire.blob(1, wire.MAX_DATAGRAM)),
        wire.Field("s", wire.blob(SIGNATURE_SIZE, SIGNATURE_SIZE)),
    ),
)
# The signed body inside a RESPONSE.
RESPONSE_BODY = wire.Schema(
    "response-body",
    0,
    (
        wire.Field("tx", _tx),
        wire.Field("pk", _pk),
        wire.Field("tok", _tok),
        wire.Field("obs", wire.address()),
        wire.Field("nodes", wire.array(_contact, MAX_NODES), required=False),
        wire.Field("rec", _record, required=False),
        wire.Field("err", wire.text(120), required=False),
        wire.Field("rl", wire.boolean(), required=False),
    ),
)

# --- signalling through the DHT: how a caller reaches a callee behind a NAT -------------------
# A node behind a NAT keeps a mapping open with a few "hint" nodes by announcing to them; its
# record names them. A caller asks a hint to forward a handshake packet to the callee (FWD_REQ);
# the callee answers back through the same hint (FWD_BACK). HyperDHT routes its handshakes the
# same way, through the nodes a server announced to.
ANNOUNCE_CONTEXT = b"3bc-dht-announce-v1"
# A handshake packet (msg1 is 1231 B) and a little room.
MAX_FORWARD_DATA = 1240

ANNOUNCE = wire.Schema(
    "announce",
    5,
    (
        wire.Field("tx", _tx),
        wire.Field("pk", _pk),
        wire.Field("tok", _tok),
        wire.Field("sig", wire.blob(SIGNATURE_SIZE, SIGNATURE_SIZE)),
    ),
)
FWD_REQ = wire.Schema(
    "forward-request",
    6,
    (
        wire.Field("tx", _tx),
        wire.Field("pk", _pk),
        wire.Field("tok", _tok),
        wire.Field("to", _pk),
        wire.Field("data", wire.blob(1, MAX_FORWARD_DATA)),
    ),
)
FWD_BACK = wire.Schema(
    "forward-back",
    7,
    (
        wire.Field("tx", _tx),
        wire.Field("pk", _pk),
        wire.Field("tok", _tok),
        wire.Field("to", wire.address()),
        wire.Field("data", wire.blob(1, MAX_FORWARD_DATA)),
    ),
)
FWD = wire.Schema(
    "forwarded",
    8,
    (
        wire.Field("from", wire.address()),
        wire.Field("data", wire.blob(1, MAX_FORWARD_DATA)),
    ),
)

REQUESTS = (PING, FIND, STORE)
CODEC = wire.Codec(KIND_DHT, [PING, FIND, STORE, RESPONSE, ANNOUNCE, FWD_REQ, FWD_BACK, FWD])
