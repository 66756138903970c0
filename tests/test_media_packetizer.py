"""Packetizer and frame assembly: MTU-safe cuts, any-order reassembly, bounded memory."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.packetizer import (
    ASSEMBLY_HORIZON,
    MAX_PENDING_BYTES,
    MAX_PENDING_FRAMES,
    FrameAssembler,
    FrameTooLarge,
    Packetizer,
    ReferenceChain,
)
from media.wiremedia import (
    MAX_DATAGRAM,
    MAX_FRAGMENTS,
    MAX_PAYLOAD,
    MediaLocalError,
    MediaPacket,
    StreamId,
    parse_packet,
)


@given(st.binary(min_size=1, max_size=40_000), st.booleans(), st.randoms(use_true_random=False))
def test_frames_survive_any_order_and_duplicates(
    frame: bytes, key: bool, rnd: random.Random
) -> None:
    pz = Packetizer(StreamId.VIDEO, first_seq=65530)
    packets = pz.packetize(frame, 12.5, key)
    for p in packets:
        assert len(p.encode()) <= MAX_DATAGRAM
        assert len(p.payload) <= MAX_PAYLOAD
    assert packets[-1].marker and not any(p.marker for p in packets[:-1])
    shuffled = packets + rnd.sample(packets, k=min(3, len(packets)))
    rnd.shuffle(shuffled)
    asm = FrameAssembler(StreamId.VIDEO)
    out = []
    for p in shuffled:
        out += asm.push(parse_packet(p.encode()), 0.0)  # type: ignore[arg-type]
    assert len(out) == 1
    assert out[0].data == frame and out[0].keyframe == key
    assert out[0].pts == pytest.approx(12.5, abs=1e-4)
    assert asm.pending_frames == 0 and asm.pending_bytes == 0


def test_sequence_and_frame_ids_are_consecutive_and_wrap() -> None:
    pz = Packetizer(StreamId.VIDEO, first_seq=65534)
    a = pz.packetize(b"x" * 2500, 0.0, True)
    b = pz.packetize(b"y", 0.033, False)
    assert [p.seq for p in a + b] == [65534, 65535, 0, 1]
    assert [p.frame_id for p in a + b] == [0, 0, 0, 1]
    # near-equal fragment sizes: no tiny trailing packet
    sizes = [len(p.payload) for p in a]
    assert max(sizes) - min(sizes) <= 2


def test_oversized_and_empty_frames_are_local_errors() -> None:
    pz = Packetizer(StreamId.VIDEO)
    with pytest.raises(FrameTooLarge):
        pz.packetize(b"x" * (MAX_PAYLOAD * MAX_FRAGMENTS + 1), 0.0, True)
    with pytest.raises(MediaLocalError):
        pz.packetize(b"", 0.0, True)


def test_incomplete_frames_expire_after_the_horizon() -> None:
    pz = Packetizer(StreamId.VIDEO)
    asm = FrameAssembler(StreamId.VIDEO)
    first = pz.packetize(b"a" * 3000, 0.0, True)
    asm.push(first[0], 0.0)
    assert asm.pending_frames == 1
    asm.push(pz.packetize(b"b", 0.1, False)[0], ASSEMBLY_HORIZON + 0.01)
    assert asm.pending_frames == 0 and asm.frames_abandoned == 1
    assert asm.push(first[1], ASSEMBLY_HORIZON + 0.02) == []


def test_memory_stays_bounded_under_a_flood_of_partial_frames() -> None:
    asm = FrameAssembler(StreamId.VIDEO)
    for fid in range(5000):
        pkt = MediaPacket(StreamId.VIDEO, fid % 65536, fid, fid, 0, 1000, b"z" * MAX_PAYLOAD)
        asm.push(pkt, fid * 1e-4)
        assert asm.pending_frames <= MAX_PENDING_FRAMES
        assert asm.pending_bytes <= MAX_PENDING_BYTES


def test_disagreeing_fragments_are_not_mixed() -> None:
    asm = FrameAssembler(StreamId.VIDEO)
    asm.push(MediaPacket(StreamId.VIDEO, 0, 90, 7, 0, 2, b"a"), 0.0)
    assert asm.push(MediaPacket(StreamId.VIDEO, 1, 91, 7, 1, 2, b"b"), 0.0) == []
    assert asm.mismatches == 1


@st.composite
def hostile_packets(draw: st.DrawFn) -> MediaPacket:
    count = draw(st.integers(1, 8))
    return MediaPacket(
        StreamId.VIDEO,
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, 3)),
        draw(st.integers(0, 5)),
        draw(st.integers(0, count - 1)),
        count,
        draw(st.binary(max_size=20)),
    )


@given(st.lists(st.tuples(hostile_packets(), st.floats(0, 5)), max_size=60))
def test_assembler_never_crashes_on_hostile_fragments(items: list) -> None:
    asm = FrameAssembler(StreamId.VIDEO)
    for pkt, t in sorted(items, key=lambda i: i[1]):
        for frame in asm.push(pkt, t):
            assert frame.stream is StreamId.VIDEO
        assert asm.pending_bytes >= 0


def test_reference_chain_breaks_on_a_lost_frame_until_a_keyframe() -> None:
    chain = ReferenceChain()
    assert not chain.accept(0, False)  # nothing before the first keyframe decodes
    assert chain.accept(1, True)
    assert chain.accept(2, False)
    assert not chain.accept(4, False) and chain.broken  # frame 3 lost
    assert not chain.accept(5, False)
    assert chain.accept(6, True) and not chain.broken
