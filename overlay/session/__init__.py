"""Session layer: authenticated handshake and transport crypto, sans-IO (no sockets, no clocks).

Typical flow: the caller's `Initiator(...).message` goes out; the peer's daemon feeds it to its
one `Responder.receive(...)`, which returns `Accepted` (call `.reply(...)`) or, under load, a
`CookieReply`; the initiator's `receive(msg2)` returns `Established`. Both ends then hold a
`Session` with `seal`/`open`; `peek_receiver_index` routes incoming packets to it.
"""

from overlay.session.errors import (
    DropReason,
    LocalProtocolError,
    RemoteProtocolError,
    SessionError,
)
from overlay.session.handshake import (
    Accepted,
    CookieReceived,
    CookieReply,
    Established,
    Initiator,
    Reply,
    Responder,
)
from overlay.session.packets import (
    KIND_COOKIE_REPLY,
    KIND_MSG1,
    KIND_MSG2,
    KIND_TRANSPORT,
    MAX_HANDSHAKE_PAYLOAD,
    SESSION_KINDS,
    TRANSPORT_OVERHEAD,
    peek_receiver_index,
)
from overlay.session.stats import DropStats, HandshakeStats, TransportStats
from overlay.session.transport import Session

__all__ = [
    "KIND_COOKIE_REPLY",
    "KIND_MSG1",
    "KIND_MSG2",
    "KIND_TRANSPORT",
    "MAX_HANDSHAKE_PAYLOAD",
    "SESSION_KINDS",
    "TRANSPORT_OVERHEAD",
    "Accepted",
    "CookieReceived",
    "CookieReply",
    "DropReason",
    "DropStats",
    "Established",
    "HandshakeStats",
    "Initiator",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Reply",
    "Responder",
    "Session",
    "SessionError",
    "TransportStats",
    "peek_receiver_index",
]
