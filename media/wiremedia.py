"""Binary formats of the media plane: media fragments, transport feedback, NACK, PLI, call control.

These packets travel inside an already authenticated, encrypted datagram session, so the format
carries no crypto; it only has to be small (every byte is paid ~50 times a second per stream) and
strict (a peer's bug must become a typed error, never a crash). Media headers use `struct`, not
msgpack, because they are on the hot path; call control is rare and uses msgpack with bounds.

Layout: the first byte of every packet is `version << 4 | type`. Sequence numbers are 16 bit on the
wire (as in RTP, RFC 3550) and widened by `SeqUnwrapper` at the receiver.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# --- errors: local misuse vs remote garbage (h11's split) ---


class MediaError(Exception):
    """Base of every media-plane error."""


class MediaLocalError(MediaError):
    """This process misused the API (a value out of range, an illegal call); a bug here."""


class MediaRemoteError(MediaError):
    """The peer sent something unacceptable; drop it, count it, keep serving."""


class MediaWireError(MediaRemoteError):
    """A datagram does not parse as a media-plane packet."""


# --- limits ---

WIRE_VERSION = 1
# The session leaves ~1200 B per datagram (QUIC's 1200 B minimum path MTU, RFC 9000 §14, after
# IPv6+UDP+session overhead on a 1280 B IPv6 minimum link). The media header is 20 B; we keep
# payloads at 1100 B so a header, retransmission flag and any future extension still fit.
MAX_DATAGRAM = 1200
MAX_PAYLOAD = 1100
# A 1100 B payload × 1024 fragments ≈ 1.1 MB per frame: far above a 4K VP8 keyframe at call
# bitrates (~100-300 kB), low enough that a hostile count cannot make us reserve absurd memory.
MAX_FRAGMENTS = 1024
# Timestamps go on the wire in 90 kHz ticks, RTP's video clock (RFC 3551 §5): 11 µs resolution,
# and a 32-bit counter wraps after 13.25 h, which the unwrapper handles.
TIMESTAMP_RATE = 90_000
SEQ_BITS = 16
TIMESTAMP_BITS = 32
# One NACK packet lists at most this many 16-bit sequence numbers: 2 B each plus a 4 B header stay
# under MAX_DATAGRAM. RFC 4585's generic NACK packs 17 per FCI; we keep a plain list, it is simpler.
MAX_NACK_SEQS = 512
# Transport feedback entries are 2 B each (see FeedbackPacket); the header is 12 B.
MAX_FEEDBACK_ENTRIES = 512
# Arrival deltas in 250 µs units, the unit of transport-wide CC
# (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1.5).
FEEDBACK_TICK = 0.000_25
FEEDBACK_MISSING = -0x8000  # i16 sentinel: "not received"
# Call control payloads are msgpack maps of a few short fields; 1 kB leaves room for a codec list.
MAX_CONTROL_PAYLOAD = 1024


class PacketType(enum.IntEnum):
    MEDIA = 1
    FEEDBACK = 2  # transport-wide arrival report, for the sender's bandwidth estimator
    NACK = 3
    PLI = 4  # picture loss indication: "send a keyframe"
    CONTROL = 5  # call control (msgpack), see callstate.py


class StreamId(enum.IntEnum):
    AUDIO = 0
    VIDEO = 1


class Flags(enum.IntFlag):
    NONE = 0
    MARKER = 0x01  # last fragment of a frame (RTP's marker bit)
    KEYFRAME = 0x02  # the frame decodes without earlier frames
    RETRANSMIT = 0x04  # a resend answering a NACK


_KNOWN_FLAGS = int(Flags.MARKER | Flags.KEYFRAME | Flags.RETRANSMIT)


def _first_byte(ptype: PacketType) -> int:
    return (WIRE_VERSION << 4) | int(ptype)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise MediaLocalError(what)


def seconds_to_ticks(seconds: float) -> int:
    """Sender clock seconds → 32-bit 90 kHz wire timestamp (wrapping)."""
    return round(seconds * TIMESTAMP_RATE) % (1 << TIMESTAMP_BITS)


# --- media ---

# version/type, stream, flags, codec, seq, transport seq, timestamp, frame id, frag index, count
_MEDIA = struct.Struct("!BBBBHHIIHH")
MEDIA_HEADER_SIZE = _MEDIA.size


@dataclass(frozen=True, slots=True)
class MediaPacket:
    """One fragment of one encoded frame."""

    stream: StreamId
    seq: int  # per-stream, 16 bit on the wire; drives NACK
    timestamp: int  # 90 kHz ticks of the sender clock, 32 bit
    frame_id: int  # per-stream frame counter, 32 bit; consecutive ids reveal lost frames
    frag_index: int
    frag_count: int
    payload: bytes
    flags: Flags = Flags.NONE
    codec: int = 0  # codec number agreed in the call offer/answer
    transport_seq: int = 0  # transport-wide, 16 bit; set at send time for bandwidth estimation

    @property
    def keyframe(self) -> bool:
        return bool(self.flags & Flags.KEYFRAME)

    @property
    def marker(self) -> bool:
        return bool(self.flags & Flags.MARKER)

    @property
    def retransmit(self) -> bool:
        return bool(self.flags & Flags.RETRANSMIT)

    def encode(self, transport_seq: int | None = None) -> bytes:
        """The packet's bytes; `transport_seq`, if given, replaces the packet's own on the wire
        (the rate controller stamps one per send without copying the packet)."""
        tseq = self.transport_seq if transport_seq is None else transport_seq
        _check(0 <= self.seq < 1 << 16, "seq out of range")
        _check(0 <= tseq < 1 << 16, "transport_seq out of range")
        _check(0 <= self.timestamp < 1 << 32, "timestamp out of range")
        _check(0 <= self.frame_id < 1 << 32, "frame_id out of range")
        _check(0 <= self.codec < 256, "codec out of range")
        _check(not int(self.flags) & ~_KNOWN_FLAGS, "unknown flag bits")
        _check(1 <= self.frag_count <= MAX_FRAGMENTS, "frag_count out of range")
        _check(0 <= self.frag_index < self.frag_count, "frag_index out of range")
        _check(len(self.payload) <= MAX_PAYLOAD, "payload larger than MAX_PAYLOAD")
        header = _MEDIA.pack(
            _MEDIA_FIRST_BYTE,
            self.stream,
            self.flags,
            self.codec,
            self.seq,
            tseq,
            self.timestamp,
            self.frame_id,
            self.frag_index,
            self.frag_count,
        )
        return header + self.payload


# Enum members by wire value, looked up without calling the enum classes (hot path).
_STREAMS = {int(s): s for s in StreamId}
_FLAGS = tuple(Flags(i) for i in range(_KNOWN_FLAGS + 1))
_MEDIA_FIRST_BYTE = (WIRE_VERSION << 4) | PacketType.MEDIA


def _parse_media(data: bytes) -> MediaPacket:
    if len(data) < MEDIA_HEADER_SIZE:
        raise MediaWireError("media packet shorter than its header")
    _, stream, flags, codec, seq, tseq, ts, frame_id, index, count = _MEDIA.unpack_from(data)
    stream_id = _STREAMS.get(stream)
    if stream_id is None:
        raise MediaWireError(f"unknown stream id {stream}")
    if flags & ~_KNOWN_FLAGS:
        raise MediaWireError(f"unknown flag bits {flags:#x}")
    if not 1 <= count <= MAX_FRAGMENTS:
        raise MediaWireError(f"fragment count {count} out of range")
    if index >= count:
        raise MediaWireError("fragment index beyond count")
    payload = data[MEDIA_HEADER_SIZE:]
    if len(payload) > MAX_PAYLOAD:
        raise MediaWireError("payload larger than MAX_PAYLOAD")
    return MediaPacket(
        stream_id, seq, ts, frame_id, index, count, bytes(payload), _FLAGS[flags], codec, tseq
    )


# --- transport-wide feedback ---

# version/type, feedback count, base transport seq, entry count, hold delay ticks, reference ticks
_FEEDBACK = struct.Struct("!BBHHHI")
_I16 = struct.Struct("!h")


@dataclass(frozen=True, slots=True)
class FeedbackPacket:
    """Arrival times of transport sequence numbers base..base+len(deltas)-1.

    `deltas[i]` is the arrival time of packet base+i minus that of the previous *received* packet
    in this report, in FEEDBACK_TICK units (the first received one is relative to `reference`), or
    FEEDBACK_MISSING. `hold` is how long the receiver held the last packet before reporting, so the
    sender can subtract it from its RTT sample (like RTCP's DLSR, RFC 3550 §6.4.1).
    """

    feedback_count: int  # 8-bit counter, lets the sender notice lost feedback
    base_seq: int
    reference: int  # receiver clock, FEEDBACK_TICK units, 32 bit wrapping
    hold: int  # FEEDBACK_TICK units
    deltas: tuple[int, ...]

    def encode(self) -> bytes:
        _check(0 <= self.feedback_count < 256, "feedback_count out of range")
        _check(0 <= self.base_seq < 1 << 16, "base_seq out of range")
        _check(0 <= self.reference < 1 << 32, "reference out of range")
        _check(0 <= self.hold < 1 << 16, "hold out of range")
        _check(1 <= len(self.deltas) <= MAX_FEEDBACK_ENTRIES, "entry count out of range")
        _check(all(-0x8000 <= d < 0x8000 for d in self.deltas), "delta out of i16 range")
        _check(self.deltas[-1] != FEEDBACK_MISSING, "a report ends with a received packet")
        head = _FEEDBACK.pack(
            _first_byte(PacketType.FEEDBACK),
            self.feedback_count,
            self.base_seq,
            len(self.deltas),
            self.hold,
            self.reference,
        )
        return head + struct.pack(f"!{len(self.deltas)}h", *self.deltas)


def _parse_feedback(data: bytes) -> FeedbackPacket:
    if len(data) < _FEEDBACK.size:
        raise MediaWireError("feedback shorter than its header")
    _, fbc, base, count, hold, ref = _FEEDBACK.unpack_from(data)
    if not 1 <= count <= MAX_FEEDBACK_ENTRIES:
        raise MediaWireError(f"feedback entry count {count} out of range")
    if len(data) != _FEEDBACK.size + 2 * count:
        raise MediaWireError("feedback length does not match its entry count")
    deltas = struct.unpack_from(f"!{count}h", data, _FEEDBACK.size)
    if deltas[-1] == FEEDBACK_MISSING:
        raise MediaWireError("feedback ends with a missing packet")
    return FeedbackPacket(fbc, base, ref, hold, tuple(deltas))


# --- NACK and PLI ---

_NACK = struct.Struct("!BBH")  # version/type, stream, count; then count × u16 seq
_PLI = struct.Struct("!BB")  # version/type, stream


@dataclass(frozen=True, slots=True)
class NackPacket:
    """The receiver asks for these per-stream sequence numbers again."""

    stream: StreamId
    seqs: tuple[int, ...]

    def encode(self) -> bytes:
        _check(1 <= len(self.seqs) <= MAX_NACK_SEQS, "NACK seq count out of range")
        _check(all(0 <= s < 1 << 16 for s in self.seqs), "NACK seq out of range")
        head = _NACK.pack(_first_byte(PacketType.NACK), int(self.stream), len(self.seqs))
        return head + struct.pack(f"!{len(self.seqs)}H", *self.seqs)


def _parse_nack(data: bytes) -> NackPacket:
    if len(data) < _NACK.size:
        raise MediaWireError("NACK shorter than its header")
    _, stream, count = _NACK.unpack_from(data)
    if stream not in StreamId._value2member_map_:
        raise MediaWireError(f"unknown stream id {stream}")
    if not 1 <= count <= MAX_NACK_SEQS:
        raise MediaWireError(f"NACK count {count} out of range")
    if len(data) != _NACK.size + 2 * count:
        raise MediaWireError("NACK length does not match its count")
    return NackPacket(StreamId(stream), struct.unpack_from(f"!{count}H", data, _NACK.size))


@dataclass(frozen=True, slots=True)
class PliPacket:
    """The receiver cannot decode until the next keyframe: please send one now."""

    stream: StreamId = StreamId.VIDEO

    def encode(self) -> bytes:
        return _PLI.pack(_first_byte(PacketType.PLI), int(self.stream))


def _parse_pli(data: bytes) -> PliPacket:
    if len(data) != _PLI.size:
        raise MediaWireError("PLI has the wrong length")
    stream = data[1]
    if stream not in StreamId._value2member_map_:
        raise MediaWireError(f"unknown stream id {stream}")
    return PliPacket(StreamId(stream))


# --- call control envelope ---


@dataclass(frozen=True, slots=True)
class ControlPacket:
    """An opaque call-control payload (msgpack, parsed by callstate.decode_message)."""

    payload: bytes

    def encode(self) -> bytes:
        _check(1 <= len(self.payload) <= MAX_CONTROL_PAYLOAD, "control payload size out of range")
        return bytes([_first_byte(PacketType.CONTROL)]) + self.payload


def _parse_control(data: bytes) -> ControlPacket:
    if not 2 <= len(data) <= 1 + MAX_CONTROL_PAYLOAD:
        raise MediaWireError("control payload size out of range")
    return ControlPacket(bytes(data[1:]))


Packet = MediaPacket | FeedbackPacket | NackPacket | PliPacket | ControlPacket

_PARSERS = {
    PacketType.MEDIA: _parse_media,
    PacketType.FEEDBACK: _parse_feedback,
    PacketType.NACK: _parse_nack,
    PacketType.PLI: _parse_pli,
    PacketType.CONTROL: _parse_control,
}


def parse_packet(data: bytes) -> Packet:
    """Parse one datagram of the media plane; raise MediaWireError on anything malformed."""
    if not data:
        raise MediaWireError("empty datagram")
    if len(data) > MAX_DATAGRAM:
        raise MediaWireError("datagram larger than MAX_DATAGRAM")
    version, ptype = data[0] >> 4, data[0] & 0x0F
    if version != WIRE_VERSION:
        raise MediaWireError(f"unsupported media wire version {version}")
    parser = _PARSERS.get(ptype)
    if parser is None:
        raise MediaWireError(f"unknown packet type {ptype}")
    return parser(data)


# --- sequence unwrapping ---


class SeqUnwrapper:
    """Widens a wrapping N-bit counter to an unbounded int, choosing the value nearest the last.

    A jump of more than half the range is read as going the other way (RFC 3550 Appendix A.1),
    so old reordered packets unwrap to values below the current one instead of far above it.
    """

    def __init__(self, bits: int = SEQ_BITS) -> None:
        self._mod = 1 << bits
        self._half = self._mod >> 1
        self._last: int | None = None

    def unwrap(self, value: int) -> int:
        if not 0 <= value < self._mod:
            raise MediaLocalError("value out of the counter's range")
        if self._last is None:
            self._last = value
            return value
        diff = (value - self._last) % self._mod
        if diff >= self._half:
            diff -= self._mod
        extended = self._last + diff
        if diff > 0:
            self._last = extended
        return extended

    def peek(self, value: int) -> int:
        """Like unwrap, without moving the reference point."""
        if self._last is None:
            return value
        diff = (value - self._last) % self._mod
        if diff >= self._half:
            diff -= self._mod
        return self._last + diff
