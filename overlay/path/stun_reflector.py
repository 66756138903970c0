"""STUN on the daemon's socket: the reflector every daemon runs, and the padded client requests.

Every public daemon answers STUN Binding requests so peers learn their server-reflexive address
without any server of ours. The daemon demultiplexes its single UDP socket by first byte; STUN is
recognised by `is_stun` (first byte 0x00/0x01 and the RFC 5389 magic cookie).

Amplification rule (WireGuard's posture): the reply to an unverified source must never be larger
than the request. A bare 20-byte Binding request would get a 40-byte answer (twice its size, 52
bytes for IPv6), so it gets *no* answer; clients must pad their requests (`pad_binding_request`)
to `PADDED_REQUEST_SIZE`. aioice's own server-reflexive query sends bare requests, so
`install_padded_stun_client` wraps it (see there for why and how).

Also here, sans-IO: `answer_ice_check`, used by the trio-native data path after ICE nomination to
keep answering the peer's authenticated ICE checks (consent freshness) once aioice is gone.
"""

from __future__ import annotations

import struct
from typing import Any

import aioice.ice
from aioice import stun

from overlay.path.errors import StunParseError

Address = tuple[str, int]

STUN_HEADER_SIZE = 20
# RFC 5389 section 6: fixed value at bytes 4..8 that tells STUN apart from other protocols.
MAGIC_COOKIE = 0x2112A442
# RFC 7983 demultiplexing: STUN messages begin with the two top bits zero, so bytes 0x00..0x03;
# only 0x00 (requests/indications) and 0x01 (responses/errors) are used for Binding.
STUN_FIRST_BYTES = (0x00, 0x01)
# A Binding response with XOR-MAPPED-ADDRESS (IPv6: 24 bytes) and FINGERPRINT (8) is at most
# 20 + 24 + 8 = 52 bytes; clients pad to 64 so the answer is never larger, with room to spare.
PADDED_REQUEST_SIZE = 64
# The padding text goes in SOFTWARE (RFC 5389 15.10), which every server, coturn included,
# accepts and ignores; aioice knows no PADDING attribute (RFC 5780) to encode with.
PADDING_SOFTWARE = "3bot-connect"
# RFC 5389 15.10: SOFTWARE must be shorter than 128 characters.
MAX_SOFTWARE_LENGTH = 127
# The largest datagram we even try to parse as STUN: nothing legitimate to a reflector is bigger,
# and parsing is linear in size.
MAX_STUN_SIZE = 1500


def is_stun(data: bytes) -> bool:
    """Cheap check used to demultiplex the daemon socket: STUN first byte, cookie, sane length."""
    if len(data) < STUN_HEADER_SIZE or data[0] not in STUN_FIRST_BYTES:
        return False
    length, cookie = struct.unpack_from("!HI", data, 2)
    return cookie == MAGIC_COOKIE and length % 4 == 0 and len(data) == STUN_HEADER_SIZE + length


def parse(data: bytes) -> stun.Message:
    """Parse a STUN datagram with aioice's codec, turning any failure into `StunParseError`.

    aioice raises ValueError for most bad input but struct.error (short fixed-size attributes) and
    others for some; a parser of outside input must have one typed failure.
    """
    if len(data) > MAX_STUN_SIZE:
        raise StunParseError(f"STUN datagram too large ({len(data)} bytes)")
    if not is_stun(data):
        raise StunParseError("not a STUN message (first byte, cookie or length)")
    try:
        return stun.parse_message(data)
    except (ValueError, struct.error, KeyError, IndexError, TypeError) as exc:
        raise StunParseError(f"malformed STUN message: {exc}") from exc


def _binding_response(request: stun.Message, source: Address) -> stun.Message:
    response = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.RESPONSE,
        transaction_id=request.transaction_id,
    )
    response.attributes["XOR-MAPPED-ADDRESS"] = (source[0], source[1])
    return response


def answer(data: bytes, source_addr: tuple[Any, ...]) -> bytes | None:
    """The reflector: a Binding response telling `source_addr` its address, or None (stay silent).

    Silent for anything that is not a well-formed Binding request, and for requests smaller than
    their answer (no amplification towards a possibly spoofed source).
    """
    try:
        request = parse(data)
    except StunParseError:
        return None
    if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
        return None
    try:
        response = _binding_response(request, (str(source_addr[0]), int(source_addr[1])))
        response.add_fingerprint()
        reply = bytes(response)
    except (ValueError, TypeError, struct.error):
        return None  # an address we cannot encode (not an IP literal)
    if len(reply) > len(data):
        return None
    return reply


def answer_ice_check(
    data: bytes, source_addr: tuple[Any, ...], local_ufrag: str, local_pwd: str
) -> bytes | None:
    """Answer an authenticated ICE connectivity check, as aioice would, or return None.

    After nomination the data path leaves aioice; the peer keeps sending checks (late triggered
    checks, RFC 7675 consent) to the same port and must keep getting answers. Only requests whose
    USERNAME starts with our ufrag and whose MESSAGE-INTEGRITY verifies with our password are
    answered, and never with more bytes than the request.
    """
    try:
        request = parse(data)
    except StunParseError:
        return None
    if request.message_method != stun.Method.BINDING or request.message_class != stun.Class.REQUEST:
        return None
    username = request.attributes.get("USERNAME")
    if not isinstance(username, str) or not username.startswith(local_ufrag + ":"):
        return None
    if not request.check_message_integrity(local_pwd.encode("utf8")):
        return None
    try:
        response = _binding_response(request, (str(source_addr[0]), int(source_addr[1])))
        response.add_message_integrity(local_pwd.encode("utf8"))
        reply = bytes(response)
    except (ValueError, TypeError, struct.error):
        return None
    if len(reply) > len(data):
        return None
    return reply


def binding_indication() -> bytes:
    """A 28-byte Binding indication (RFC 5389 keepalive): refreshes NAT mappings, never answered."""
    message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.INDICATION)
    message.add_fingerprint()
    return bytes(message)


def pad_binding_request(message: stun.Message, size: int = PADDED_REQUEST_SIZE) -> None:
    """Grow `message` with a SOFTWARE attribute so it encodes to at least `size` bytes.

    Must run before MESSAGE-INTEGRITY/FINGERPRINT are added (they cover the padding).
    """
    message.attributes.pop("SOFTWARE", None)
    missing = size - len(bytes(message)) - 4  # 4 = attribute header
    text = PADDING_SOFTWARE
    if missing > len(text):
        text = text + " " * (missing - len(text))
    message.attributes["SOFTWARE"] = text[:MAX_SOFTWARE_LENGTH]


def padded_binding_request() -> stun.Message:
    """A Binding request our own reflectors (and any STUN server) will answer."""
    message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    pad_binding_request(message)
    return message


class _PaddingProtocol:
    """Stands in for aioice's StunProtocol during the server-reflexive query, padding the request.

    aioice's `server_reflexive_candidate` only uses `protocol.request(...)` and
    `protocol.local_candidate`; everything else is delegated to the real protocol.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def request(
        self,
        request: stun.Message,
        addr: Address,
        integrity_key: bytes | None = None,
        retransmissions: int | None = None,
    ) -> tuple[stun.Message, Address]:
        pad_binding_request(request)
        result: tuple[stun.Message, Address] = await self._inner.request(
            request, addr, integrity_key=integrity_key, retransmissions=retransmissions
        )
        return result


_original_server_reflexive_candidate = aioice.ice.server_reflexive_candidate


async def _padded_server_reflexive_candidate(protocol: Any, stun_server: Address) -> Any:
    return await _original_server_reflexive_candidate(_PaddingProtocol(protocol), stun_server)


def install_padded_stun_client() -> None:
    """Make aioice pad its server-reflexive Binding requests (idempotent, process-wide).

    Why a patch: aioice builds a bare 20-byte request inside `aioice.ice.server_reflexive_candidate`
    and offers no hook, and our reflectors (rightly) do not answer requests smaller than the reply.
    `Connection.get_component_candidates` looks the function up in the `aioice.ice` module at call
    time, so replacing that module attribute with a wrapper that hands aioice's own function a
    padding proxy of the protocol changes only the request's size. Padded requests are ordinary
    STUN, so external servers (coturn) keep answering them.
    """
    aioice.ice.server_reflexive_candidate = _padded_server_reflexive_candidate
