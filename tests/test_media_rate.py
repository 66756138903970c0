"""Rate control: feedback format and generator, RTT, delay- and loss-based control over a
simulated bottleneck, quality ladder, and path reset."""

from __future__ import annotations

import heapq
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.rate import (
    AIMD_TRANSITIONS,
    MAX_BITRATE,
    MIN_BITRATE,
    QUALITY_LADDER,
    START_BITRATE,
    RateController,
    RateState,
    TransportFeedbackGenerator,
    Usage,
    VideoQuality,
)
from media.wiremedia import (
    FEEDBACK_MISSING,
    FeedbackPacket,
    MediaPacket,
    StreamId,
    parse_packet,
)


def test_feedback_reports_arrivals_and_losses() -> None:
    gen = TransportFeedbackGenerator()
    for seq, t in ((65534, 10.0), (65535, 10.001), (1, 10.004)):
        gen.on_packet(seq, t)
    fb = gen.poll(10.010)
    assert fb is not None
    assert fb.base_seq == 65534
    assert fb.deltas == (0, 4, FEEDBACK_MISSING, 12)
    assert fb.hold == 24  # 6 ms in 250 µs ticks
    assert parse_packet(fb.encode()) == fb
    assert gen.poll(10.011) is None  # nothing new
    gen.on_packet(0, 10.02)  # too late: already reported missing
    assert gen.too_late == 1


def test_feedback_waits_for_its_interval() -> None:
    gen = TransportFeedbackGenerator(interval=0.05)
    gen.on_packet(0, 0.0)
    assert gen.poll(0.0) is not None
    gen.on_packet(1, 0.01)
    assert gen.poll(0.03) is None
    assert gen.next_timeout() == pytest.approx(0.05)
    assert gen.poll(0.05) is not None


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.floats(0, 100)), max_size=300))
def test_feedback_generator_always_emits_valid_reports(items: list[tuple[int, float]]) -> None:
    gen = TransportFeedbackGenerator()
    for seq, t in sorted(items, key=lambda i: i[1]):
        gen.on_packet(seq, t)
        fb = gen.poll(t)
        if fb is not None:
            assert parse_packet(fb.encode()) == fb


@given(st.lists(st.integers(-0x8000, 0x7FFF), min_size=1, max_size=512), st.integers(0, 0xFFFF))
def test_controller_digests_any_feedback(deltas: list[int], base: int) -> None:
    if deltas[-1] == FEEDBACK_MISSING:
        deltas[-1] = 1
    rc = RateController()
    for i in range(600):
        rc.on_packet_sent(1200, i * 0.001)
    rc.on_feedback(FeedbackPacket(0, base, 123456, 10, tuple(deltas)), 1.0)
    assert MIN_BITRATE <= rc.target_bitrate <= MAX_BITRATE


def test_rtt_comes_from_feedback_minus_hold_time() -> None:
    rc = RateController()
    seqs = [rc.on_packet_sent(1200, t) for t in (0.0, 0.001)]
    fb = FeedbackPacket(0, seqs[0], 0, 40, (0, 4))  # receiver held the last one 10 ms
    rc.on_feedback(fb, 0.001 + 0.080 + 0.010)
    assert rc.rtt == pytest.approx(0.080)


def test_prepare_stamps_consecutive_transport_sequence_numbers() -> None:
    rc = RateController()
    pkt = MediaPacket(StreamId.AUDIO, 5, 0, 0, 0, 1, b"x")
    a, b = (parse_packet(rc.prepare(pkt, 0.0)) for _ in range(2))
    assert isinstance(a, MediaPacket) and isinstance(b, MediaPacket)
    assert (a.transport_seq, b.transport_seq) == (0, 1)


def test_aimd_table_follows_gcc() -> None:
    assert AIMD_TRANSITIONS[(Usage.OVERUSE, RateState.INCREASE)] is RateState.DECREASE
    assert AIMD_TRANSITIONS[(Usage.NORMAL, RateState.DECREASE)] is RateState.HOLD
    assert AIMD_TRANSITIONS[(Usage.UNDERUSE, RateState.INCREASE)] is RateState.HOLD
    assert len(AIMD_TRANSITIONS) == len(Usage) * len(RateState)


# --- a simulated bottleneck -------------------------------------------------------------------


class Bottleneck:
    """Sender → FIFO queue served at `capacity` b/s (drop-tail) → propagation → receiver, with
    feedback coming straight back. Video is sent as one burst per frame at 30 fps."""

    def __init__(self, rc: RateController, capacity: float, loss: float = 0.0, seed: int = 1):
        self.rc = rc
        self.capacity = capacity
        self.loss = loss
        self.rnd = random.Random(seed)
        self.gen = TransportFeedbackGenerator()
        self.busy_until = 0.0
        self.delay = 0.025  # each way
        self.max_queue = 0.3  # seconds of queue before drop-tail
        self.to_receiver: list[tuple[float, int, int]] = []
        self.to_sender: list[tuple[float, int, bytes]] = []
        self.now = 0.0
        self.credit = 0.0
        self.queue_delays: list[float] = []
        self._n = 0

    def run(self, until: float) -> list[tuple[float, int]]:
        trace = []
        next_frame = self.now
        while self.now < until:
            now = self.now
            if now >= next_frame:
                self.credit += self.rc.target_bitrate / 8 / 30  # an encoder hitting its target
                while self.credit >= 1200:
                    self.credit -= 1200
                    self._send(self.rc.on_packet_sent(1200, now), now)
                next_frame += 1 / 30
            while self.to_receiver and self.to_receiver[0][0] <= now:
                _, _, tseq = heapq.heappop(self.to_receiver)
                self.gen.on_packet(tseq, now)
            fb = self.gen.poll(now)
            if fb is not None:
                self._n += 1
                heapq.heappush(self.to_sender, (now + self.delay, self._n, fb.encode()))
            while self.to_sender and self.to_sender[0][0] <= now:
                data = heapq.heappop(self.to_sender)[2]
                msg = parse_packet(data)
                assert isinstance(msg, FeedbackPacket)
                self.rc.on_feedback(msg, now)
            if int(now * 1000) % 500 == 0:
                trace.append((round(now, 1), self.rc.target_bitrate))
            self.now = round(now + 0.001, 6)
        return trace

    def _send(self, tseq: int, now: float) -> None:
        if self.rnd.random() < self.loss:
            return
        start = max(now, self.busy_until)
        if start - now > self.max_queue:
            return  # queue full
        self.busy_until = start + 1200 * 8 / self.capacity
        self.queue_delays.append(self.busy_until - now)
        self._n += 1
        heapq.heappush(self.to_receiver, (self.busy_until + self.delay, self._n, tseq))


def window(trace: list[tuple[float, int]], start: float, end: float) -> list[int]:
    return [rate for t, rate in trace if start <= t < end]


def test_rate_converges_under_a_bottleneck_and_recovers_after() -> None:
    rc = RateController(start_bitrate=2_000_000)
    net = Bottleneck(rc, capacity=800_000)
    trace = net.run(20.0)
    settled = window(trace, 10, 20)
    assert max(settled) < 1_000_000, trace
    assert sum(settled) / len(settled) > 400_000, trace  # uses the link, not starving
    delays = net.queue_delays[-300:]
    assert sum(delays) / len(delays) < 0.15  # the queue does not stay full
    net.capacity = 2_500_000
    trace = net.run(60.0)
    assert max(window(trace, 45, 60)) > 1_500_000, trace
    assert 0.05 < rc.rtt < 0.4


def test_heavy_random_loss_pulls_the_rate_down_and_low_loss_lets_it_rise() -> None:
    rc = RateController(start_bitrate=1_500_000)
    net = Bottleneck(rc, capacity=10_000_000, loss=0.25)
    trace = net.run(15.0)
    assert rc.loss > 0.05
    assert window(trace, 10, 15)[-1] < 600_000, trace
    net.loss = 0.0
    trace = net.run(60.0)
    assert window(trace, 55, 60)[-1] > 1_000_000, trace


def test_call_loss_counts_every_window_and_survives_a_path_reset() -> None:
    """The end-of-call figure: a last window without loss must not report a lossless call."""
    rc = RateController(start_bitrate=1_000_000)
    net = Bottleneck(rc, capacity=10_000_000, loss=0.10, seed=3)
    net.run(10.0)
    lossy = rc.call_loss
    assert 0.07 < lossy < 0.13, (rc.packets_lost, rc.packets_reported)
    rc.reset_for_new_path(net.now)
    net.loss = 0.0
    net.run(12.0)
    assert rc.loss == 0.0  # the windowed figure forgot the loss
    assert 0.6 * lossy < rc.call_loss < lossy  # diluted by the lossless seconds, not reset


def test_ten_percent_random_loss_is_not_taken_for_congestion() -> None:
    """Loss that stays whatever the rate (a lossy link, not a full queue) must not ratchet the
    rate down: windows above GCC's 10 % come half the time at 10 % loss, and cutting on each
    starved the video to the floor (and the ladder to 160×120@10)."""
    rc = RateController(max_quality=VideoQuality(640, 480, 30, 0))
    net = Bottleneck(rc, capacity=10_000_000, loss=0.10)
    trace = net.run(60.0)
    assert rc.loss > 0.05 and rc.inherent_loss > 0.05
    assert min(window(trace, 40, 60)) > 1_500_000, trace
    assert rc.quality.fps == 30


def test_congestion_on_a_randomly_lossy_link_still_pulls_the_rate_down() -> None:
    rc = RateController(start_bitrate=2_000_000)
    net = Bottleneck(rc, capacity=800_000, loss=0.05)
    trace = net.run(20.0)
    settled = window(trace, 10, 20)
    assert max(settled) < 1_000_000, trace
    assert sum(settled) / len(settled) > 300_000, trace


def test_quality_steps_down_with_bandwidth_and_up_with_margin() -> None:
    rc = RateController(start_bitrate=MAX_BITRATE)
    assert rc.quality == QUALITY_LADDER[0]
    net = Bottleneck(rc, capacity=250_000)
    net.run(20.0)
    low = rc.quality
    assert low.width <= 480 and low.fps <= 20
    net.capacity = 5_000_000
    net.run(60.0)
    assert rc.quality.width > low.width


def test_negotiated_maximum_caps_the_ladder() -> None:
    rc = RateController(max_quality=VideoQuality(640, 480, 15, 0))
    assert rc.quality.width <= 640 and rc.quality.fps <= 15


def test_path_reset_starts_again_from_a_safe_rate() -> None:
    rc = RateController(start_bitrate=MAX_BITRATE)
    old = [rc.on_packet_sent(1200, 0.0) for _ in range(10)]
    rc.reset_for_new_path(0.01)
    assert rc.target_bitrate == START_BITRATE and rc.srtt is None
    # feedback about old-path packets is ignored: no RTT sample, no rate change
    rc.on_feedback(FeedbackPacket(0, old[0], 0, 0, (0,) * 10), 0.5)
    assert rc.srtt is None and rc.target_bitrate == START_BITRATE
    net = Bottleneck(rc, capacity=3_000_000)
    net.now = 1.0
    trace = net.run(30.0)
    assert trace[-1][1] > 1_000_000, trace  # and it climbs on the new path


def test_startup_ramp_finds_the_link_without_a_standing_queue() -> None:
    rc = RateController()  # 300 kb/s
    net = Bottleneck(rc, capacity=1_000_000)
    trace = net.run(30.0)
    assert max(window(trace, 0, 8)) > 800_000, trace  # found the link within seconds
    assert min(window(trace, 15, 30)) > 600_000 and max(window(trace, 15, 30)) < 1_200_000
    late = net.queue_delays[len(net.queue_delays) // 2 :]
    assert sum(late) / len(late) < 0.06  # ~ a few tens of ms of queue, not the 300 ms buffer
    assert not rc.startup and rc.loss == 0.0


def test_silence_from_the_receiver_halves_the_rate_each_second() -> None:
    rc = RateController(start_bitrate=2_000_000)
    for i in range(100):
        rc.on_packet_sent(1200, i * 0.01)
    assert rc.next_timeout() == pytest.approx(1.0)
    rc.handle_timeout(0.5)
    assert rc.target_bitrate == 2_000_000
    rc.handle_timeout(1.0)
    assert rc.target_bitrate == 1_000_000
    assert rc.next_timeout() == pytest.approx(2.0)
    for t in range(2, 10):
        rc.handle_timeout(float(t))
    assert rc.target_bitrate == MIN_BITRATE
