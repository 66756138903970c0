"""Media wire format: round trips, strict parsing, sequence unwrapping."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.wiremedia import (
    FEEDBACK_MISSING,
    MAX_DATAGRAM,
    MAX_FRAGMENTS,
    MAX_PAYLOAD,
    MEDIA_HEADER_SIZE,
    ControlPacket,
    FeedbackPacket,
    Flags,
    MediaLocalError,
    MediaPacket,
    MediaWireError,
    NackPacket,
    PliPacket,
    SeqUnwrapper,
    StreamId,
    parse_packet,
)

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def media_packets(draw: st.DrawFn) -> MediaPacket:
    count = draw(st.integers(1, MAX_FRAGMENTS))
    return MediaPacket(
        stream=draw(st.sampled_from(StreamId)),
        seq=draw(u16),
        timestamp=draw(u32),
        frame_id=draw(u32),
        frag_index=draw(st.integers(0, count - 1)),
        frag_count=count,
        payload=draw(st.binary(max_size=MAX_PAYLOAD)),
        flags=Flags(draw(st.integers(0, 7))),
        codec=draw(st.integers(0, 255)),
        transport_seq=draw(u16),
    )


@st.composite
def feedback_packets(draw: st.DrawFn) -> FeedbackPacket:
    deltas = draw(st.lists(st.integers(-0x8000, 0x7FFF), min_size=1, max_size=512))
    if deltas[-1] == FEEDBACK_MISSING:
        deltas[-1] = 0
    return FeedbackPacket(draw(st.integers(0, 255)), draw(u16), draw(u32), draw(u16), tuple(deltas))


packets = st.one_of(
    media_packets(),
    feedback_packets(),
    st.builds(
        NackPacket, st.sampled_from(StreamId), st.lists(u16, min_size=1, max_size=512).map(tuple)
    ),
    st.builds(PliPacket, st.sampled_from(StreamId)),
    st.builds(ControlPacket, st.binary(min_size=1, max_size=1024)),
)


@given(packets)
def test_every_packet_round_trips(pkt: object) -> None:
    data = pkt.encode()  # type: ignore[attr-defined]
    assert len(data) <= MAX_DATAGRAM
    assert parse_packet(data) == pkt


@given(st.binary(max_size=1300))
def test_garbage_is_a_typed_error_or_a_faithful_packet(data: bytes) -> None:
    try:
        pkt = parse_packet(data)
    except MediaWireError:
        return
    assert pkt.encode() == data


@given(packets, st.data())
def test_truncation_and_bit_flips_never_crash(pkt: object, data: st.DataObject) -> None:
    raw = bytearray(pkt.encode())  # type: ignore[attr-defined]
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw[:cut]), bytes(raw) + b"\x00"):
        with contextlib.suppress(MediaWireError):
            parse_packet(candidate)
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(MediaWireError):
        parse_packet(bytes(raw))


def test_media_header_is_compact() -> None:
    pkt = MediaPacket(StreamId.VIDEO, 1, 2, 3, 0, 1, b"x" * MAX_PAYLOAD, Flags.MARKER)
    assert MEDIA_HEADER_SIZE == 20
    assert len(pkt.encode()) == MEDIA_HEADER_SIZE + MAX_PAYLOAD


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes([0x21]) + bytes(30),  # version 2
        bytes([0x1F]),  # unknown type
        bytes([0x11, 7]) + bytes(18),  # unknown stream
        bytes([0x11, 1, 0x80]) + bytes(17),  # unknown flag
        bytes([0x14, 1, 0]),  # PLI too long
        bytes([0x13, 1, 0, 2, 0, 1]),  # NACK count says 2, carries 1
    ],
)
def test_specific_garbage_is_rejected(data: bytes) -> None:
    with pytest.raises(MediaWireError):
        parse_packet(data)


def test_local_misuse_is_a_local_error() -> None:
    with pytest.raises(MediaLocalError):
        MediaPacket(StreamId.AUDIO, 70_000, 0, 0, 0, 1, b"").encode()
    with pytest.raises(MediaLocalError):
        MediaPacket(StreamId.AUDIO, 0, 0, 0, 0, 1, b"x" * (MAX_PAYLOAD + 1)).encode()
    with pytest.raises(MediaLocalError):
        NackPacket(StreamId.VIDEO, ()).encode()


def test_unwrapper_follows_wraps_and_reordering() -> None:
    u = SeqUnwrapper(16)
    got = [u.unwrap(s) for s in (65534, 65535, 0, 1, 65535, 2)]
    assert got == [65534, 65535, 65536, 65537, 65535, 65538]


@given(st.integers(0, 2**20), st.lists(st.integers(-1000, 1000), max_size=200))
def test_unwrapper_recovers_true_values(start: int, steps: list[int]) -> None:
    u = SeqUnwrapper(16)
    true = start
    assert u.unwrap(true % 65536) - true == -(true - true % 65536)
    offset = true - true % 65536
    for step in steps:
        true = max(0, true + step)
        assert u.unwrap(true % 65536) + offset == true
