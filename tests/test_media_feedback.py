"""Loss recovery: NACK scheduling, retransmission buffer, PLI throttling, and the whole video
path over a simulated lossy, jittery channel driven by a fake clock."""

from __future__ import annotations

import heapq
import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.feedback import (
    DUPLICATE_LOSS,
    NACK_DEADLINE,
    NACK_MAX_LIST,
    NACK_MAX_TRIES,
    NACK_REORDER_WAIT,
    PLI_MIN_INTERVAL,
    RTX_MAX_PACKETS,
    KeyframeGate,
    NackGenerator,
    PliController,
    RetransmissionBuffer,
)
from media.jitter import KeyframeNeeded, VideoJitterBuffer, VideoOut
from media.packetizer import FrameAssembler, Packetizer
from media.stats import CallStats
from media.wiremedia import (
    MediaLocalError,
    MediaPacket,
    NackPacket,
    PliPacket,
    StreamId,
    parse_packet,
)

V = StreamId.VIDEO


def test_a_gap_is_nacked_after_the_reorder_wait() -> None:
    gen = NackGenerator(V, rtt=0.1)
    for seq in (10, 11, 14):
        gen.on_packet(seq, 0.0)
    assert gen.missing == 2
    assert gen.poll(NACK_REORDER_WAIT / 2) is None
    assert gen.poll(NACK_REORDER_WAIT) == NackPacket(V, (12, 13))
    gen.on_packet(12, 0.05)
    assert gen.recovered == 1 and gen.missing == 1


def test_a_lost_tail_of_a_frame_is_noticed_from_its_fragment_count() -> None:
    gen = NackGenerator(V)
    gen.on_packet(100, 0.0, frame_end=102)  # fragment 0 of 3; 101 and 102 lost
    assert gen.poll(NACK_REORDER_WAIT) == NackPacket(V, (101, 102))


def test_reordered_packets_are_not_nacked() -> None:
    gen = NackGenerator(V)
    for seq in (1, 3, 2):
        gen.on_packet(seq, 0.0)
    assert gen.poll(1.0) is None
    assert gen.reordered == 1 and gen.nacks_sent == 0


def test_retries_back_off_with_rtt_and_give_up() -> None:
    gen = NackGenerator(V, rtt=0.1)
    gen.on_packet(0, 0.0)
    gen.on_packet(2, 0.0)
    sent_at = [t / 1000 for t in range(0, 3000) if gen.poll(t / 1000) is not None]
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert gaps[0] == pytest.approx(0.1, abs=0.002)  # one RTT
    assert all(b > a for a, b in itertools.pairwise(gaps))  # backing off
    assert sent_at[-1] <= NACK_DEADLINE and len(sent_at) <= NACK_MAX_TRIES
    assert gen.missing == 0 and gen.given_up == 1 and gen.next_timeout() is None


def test_a_huge_gap_asks_for_a_keyframe_instead_of_nacking() -> None:
    gen = NackGenerator(V)
    gen.on_packet(0, 0.0)
    assert gen.on_packet(NACK_MAX_LIST + 5, 0.0) is True
    assert gen.missing == 0 and gen.overflows == 1


@given(
    st.lists(
        st.tuples(st.integers(0, 0xFFFF), st.floats(0, 10), st.none() | st.integers(0, 0xFFFF)),
        max_size=300,
    )
)
def test_nack_generator_is_bounded_on_any_input(items: list[tuple[int, float, int | None]]) -> None:
    gen = NackGenerator(V)
    for seq, t, frame_end in sorted(items, key=lambda i: i[1]):
        gen.on_packet(seq, t, frame_end)
        assert gen.missing <= NACK_MAX_LIST
        nack = gen.poll(t)
        if nack is not None:
            NackPacket(V, nack.seqs).encode()  # always encodable


def packet(seq: int) -> MediaPacket:
    return MediaPacket(V, seq, 0, seq, 0, 1, b"p")


def test_retransmission_buffer_answers_once_per_rtt_and_forgets() -> None:
    buf = RetransmissionBuffer()
    for seq in range(5):
        buf.store(packet(seq), 0.0)
    out = buf.on_nack(NackPacket(V, (1, 3, 9)), 0.05, rtt=0.1)
    assert [p.seq for p in out] == [1, 3] and all(p.retransmit for p in out)
    assert buf.unavailable == 1
    assert buf.on_nack(NackPacket(V, (1,)), 0.1, rtt=0.1) == []  # crossed our answer
    assert len(buf.on_nack(NackPacket(V, (1,)), 0.2, rtt=0.1)) == 1
    assert buf.on_nack(NackPacket(V, (1,)), 5.0, rtt=0.1) == []  # too old now
    with pytest.raises(MediaLocalError):
        buf.store(out[0], 0.0)


def test_nacks_are_doubled_once_the_stream_loses_packets() -> None:
    gen = NackGenerator(V, rtt=0.1)
    seq, t = 0, 0.0
    for _ in range(1000):  # lossless
        gen.on_packet(seq, t)
        seq, t = seq + 1, t + 0.005
        assert gen.poll(t) is None
    assert gen.loss == 0.0 and gen.copies == 1
    for i in range(1000):  # every 10th packet lost
        if i % 10:
            gen.on_packet(seq % (1 << 16), t)
        seq, t = seq + 1, t + 0.005
        gen.poll(t)
    assert gen.loss == pytest.approx(0.10, abs=0.02)
    assert gen.copies == 2 and DUPLICATE_LOSS < 0.10
    for _ in range(2000):  # the loss is over: back to single NACKs
        gen.on_packet(seq % (1 << 16), t)
        seq, t = seq + 1, t + 0.005
        gen.poll(t)
    assert gen.copies == 1


def test_retransmissions_are_doubled_on_a_lossy_path() -> None:
    buf = RetransmissionBuffer()
    for seq in range(5):
        buf.store(packet(seq), 0.0)
    assert [p.seq for p in buf.on_nack(NackPacket(V, (1, 2)), 0.05, 0.1, loss=0.01)] == [1, 2]
    out = buf.on_nack(NackPacket(V, (3, 4)), 0.05, 0.1, loss=0.10)
    assert [p.seq for p in out] == [3, 3, 4, 4] and all(p.retransmit for p in out)
    assert buf.retransmitted == 4  # packets answered, not copies
    # The receiver's duplicate NACK crosses our answer: not answered again.
    assert buf.on_nack(NackPacket(V, (3, 4)), 0.06, 0.1, loss=0.10) == []


def test_retransmission_buffer_is_bounded() -> None:
    buf = RetransmissionBuffer()
    for seq in range(3 * RTX_MAX_PACKETS):
        buf.store(packet(seq % 65536), seq * 1e-5)
    assert len(buf) == RTX_MAX_PACKETS


def test_pli_is_repeated_but_throttled_until_satisfied() -> None:
    pli = PliController(rtt=0.05)
    assert pli.poll(0.0) is None
    pli.request()
    sent = [t / 1000 for t in range(1000) if pli.poll(t / 1000) is not None]
    assert sent == pytest.approx([i * PLI_MIN_INTERVAL for i in range(5)], abs=0.0015)
    pli.satisfied()
    assert pli.poll(2.0) is None and pli.plis_sent == 5


def test_sender_makes_one_keyframe_for_a_burst_of_plis() -> None:
    gate = KeyframeGate()
    assert [gate.on_pli(t) for t in (0.0, 0.01, 0.05, 0.2)] == [True, False, False, True]


# --- the whole video path over a lossy channel ---------------------------------------------------


class Link:
    """One direction of a datagram path: loss, base delay, jitter (reordering), duplicates."""

    def __init__(self, rnd: random.Random, loss: float, delay: float, jitter: float) -> None:
        self.rnd, self.loss, self.delay, self.jitter = rnd, loss, delay, jitter
        self.queue: list[tuple[float, int, bytes]] = []
        self._n = 0

    def send(self, data: bytes, now: float) -> None:
        copies = 2 if self.rnd.random() < 0.01 else 1
        for _ in range(copies):
            if self.rnd.random() < self.loss:
                continue
            self._n += 1
            at = now + self.delay + self.rnd.uniform(0, self.jitter)
            heapq.heappush(self.queue, (at, self._n, data))

    def deliver(self, now: float) -> list[bytes]:
        out = []
        while self.queue and self.queue[0][0] <= now:
            out.append(heapq.heappop(self.queue)[2])
        return out


@pytest.mark.parametrize("seed", [1, 4, 7])
def test_video_over_a_lossy_jittery_channel_recovers_with_nack_and_pli(seed: int) -> None:
    """10 % loss both ways, 40-70 ms one way (reordering), 1 % duplicates, 20 s of 30 fps."""
    rnd = random.Random(seed)
    forward = Link(rnd, loss=0.10, delay=0.04, jitter=0.03)
    backward = Link(rnd, loss=0.10, delay=0.04, jitter=0.03)
    rtt = 0.11
    # sender
    packetizer, rtx, gate = Packetizer(V), RetransmissionBuffer(), KeyframeGate()
    force_key = True
    # receiver
    assembler, nack = FrameAssembler(V), NackGenerator(V, rtt=rtt)
    jitter, pli = VideoJitterBuffer(rtt=rtt), PliController(V, rtt=rtt)
    stats = CallStats(0.0, codec="vp8", path="direct")
    shown: list[int] = []
    duration, fps = 20.0, 30
    next_frame = 0.0
    frame_no = 0
    for ms in range(int(duration * 1000) + 500):
        now = ms / 1000
        # sender: one frame every 1/30 s; a keyframe every 4 s or on PLI
        if now >= next_frame and now < duration:
            key = force_key or frame_no % (4 * fps) == 0
            force_key = False
            size = 9000 if key else 2500
            for pkt in packetizer.packetize(bytes(size), frame_no / fps, key):
                rtx.store(pkt, now)
                forward.send(pkt.encode(), now)
            frame_no += 1
            next_frame += 1 / fps
        for data in backward.deliver(now):
            msg = parse_packet(data)
            if isinstance(msg, NackPacket):
                for pkt in rtx.on_nack(msg, now, rtt):
                    forward.send(pkt.encode(), now)
            elif isinstance(msg, PliPacket) and gate.on_pli(now):
                force_key = True
        # receiver
        for data in forward.deliver(now):
            pkt = parse_packet(data)
            assert isinstance(pkt, MediaPacket)
            stats.on_received(len(data), now)
            if nack.on_packet(pkt.seq, now, pkt.seq - pkt.frag_index + pkt.frag_count - 1):
                pli.request()
            for frame in assembler.push(pkt, now):
                for ev in jitter.push(frame, now):
                    if isinstance(ev, KeyframeNeeded):
                        pli.request()
        for ev in jitter.pop(now):
            if isinstance(ev, VideoOut):
                shown.append(ev.frame.frame_id)
                stats.on_frame_rendered(now)
                if ev.frame.keyframe:
                    pli.satisfied()
            elif isinstance(ev, KeyframeNeeded):
                pli.request()
        if (n := nack.poll(now)) is not None:
            backward.send(n.encode(), now)
        if (p := pli.poll(now)) is not None:
            backward.send(p.encode(), now)
    assert shown == sorted(set(shown)), "frames delivered in order, each once"
    assert nack.recovered > 100, "NACK brought lost packets back"
    assert len(shown) > 0.85 * frame_no, f"only {len(shown)} of {frame_no} frames shown"
    frozen = stats.frozen_time(duration)
    # Measured over seeds 1-10: 9-19 % frozen, mostly the keyframe round trips after a frame
    # whose packets failed two NACK attempts.
    assert frozen < 0.2 * duration, f"frozen {frozen:.2f} s"
    snap = stats.snapshot(duration)
    assert snap["frames_rendered"] == len(shown)
    assert nack.nacks_sent > 0 and rtx.retransmitted > 0
