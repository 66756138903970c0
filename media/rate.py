"""Congestion control in the spirit of Google Congestion Control (draft-ietf-rmcat-gcc-02).

The receiver reports, every FEEDBACK_INTERVAL, when each transport-wide sequence number arrived
(`TransportFeedbackGenerator`). The sender (`RateController`) knows when it sent each one, so it
sees queues building in the network before they overflow: a rising one-way delay gradient
(trendline filter) → over-use detector → AIMD rate controller. A loss-based controller runs beside
it; the video encoder gets the smaller of the two, less the fixed audio rate. The same feedback
gives RTT samples. State is per path: `reset_for_new_path` starts over when the session moves.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass

from media.wiremedia import (
    FEEDBACK_MISSING,
    FEEDBACK_TICK,
    MAX_FEEDBACK_ENTRIES,
    FeedbackPacket,
    MediaPacket,
    SeqUnwrapper,
)

# --- limits and tuning (figures from GCC and WebRTC's implementation) ---

# Report arrivals every 50 ms: WebRTC sends transport feedback every 50-100 ms (scaled by rate),
# fast enough for the delay detector, ~1-2 % of a 1 Mb/s stream in reports.
FEEDBACK_INTERVAL = 0.050
# WebRTC's default start bitrate (kDefaultStartBitrate 300 kb/s): safe on nearly any path.
START_BITRATE = 300_000
MIN_BITRATE = 80_000  # below this even 160×120 video is a slideshow; audio still flows
MAX_BITRATE = 2_500_000  # 720p30 VP8 looks good at ~1.5-2.5 Mb/s; more buys little in a call
# Audio is not rate controlled: Opus at 32 kb/s plus ~50 packets/s of headers.
AUDIO_BITRATE = 40_000
MIN_VIDEO_BITRATE = 30_000
# Sent-packet history the feedback can refer to: 2 s (feedback arrives within ~1 RTT + 50 ms).
HISTORY_AGE = 2.0
# Packets sent within 5 ms form one group (GCC §5.2, WebRTC kTimestampGroupLengthMs = 5): a burst
# leaves the sender at once, so only groups say something about the network.
GROUP_SPAN = 0.005
# Trendline filter (WebRTC TrendlineEstimator): smoothing 0.9, regression over 20 groups,
# gain 4, at most 60 deltas counted.
TREND_SMOOTHING = 0.9
TREND_WINDOW = 20
TREND_GAIN = 4.0
TREND_MAX_DELTAS = 60
# Adaptive threshold γ (GCC §5.4): start 12.5 ms, k_up 0.0087, k_down 0.039, within [6, 600] ms.
THRESHOLD_START = 12.5
THRESHOLD_K_UP = 0.0087
THRESHOLD_K_DOWN = 0.039
THRESHOLD_MIN = 6.0
THRESHOLD_MAX = 600.0
# Over-use must last this long (GCC: 10 ms) and the trend must not be falling.
OVERUSE_TIME = 10.0  # ms
# AIMD: decrease to 0.85 × measured receive rate (GCC β); multiplicative increase of 8 % per
# second far from the last congestion point, additive (one packet per response time) near it.
BETA = 0.85
INCREASE_PER_SECOND = 1.08
ADDITIVE_PACKET_BITS = 1200 * 8
RESPONSE_EXTRA = 0.100  # response time = RTT + 100 ms (WebRTC)
# Until the first sign of congestion on a path, grow 30 %/s instead of 8 %/s (TCP slow start's
# idea; WebRTC reaches the same end with probe packets). Safe because the target never runs
# ahead of RECEIVE_HEADROOM × what actually got through: 300 kb/s → 1.5 Mb/s in ~6 s.
STARTUP_INCREASE_PER_SECOND = 1.30
# Never aim higher than 1.5 × what the receiver actually gets (GCC §5.5).
RECEIVE_HEADROOM = 1.5
RATE_WINDOW = 0.5  # receive-rate measurement window (WebRTC: 0.5-1 s)
# Loss-based controller (GCC §6): above 10 % loss decrease by half the loss, below 2 % grow 5 %.
LOSS_HIGH = 0.10
LOSS_LOW = 0.02
LOSS_INCREASE = 1.05
# Loss is judged over at least this much time and this many packets, so one burst does not
# swing it.
LOSS_WINDOW = 0.5
LOSS_MIN_PACKETS = 20
# The controller compares with the thresholds a smoothed loss (EWMA of window losses, gain 0.3:
# ~1.5 s memory) less the path's inherent loss: the lowest smoothed loss of the last
# INHERENT_LOSS_WINDOW, up to INHERENT_LOSS_MAX. Loss that stays whatever the rate is (a lossy
# radio, a lossy link) is not congestion: cutting the rate does not lower it, it only starves the
# video (with 10 % random loss, raw 0.5 s windows cross 10 % half the time, and GCC's "hold"
# band then ratchets the rate down to the floor). Congestion loss comes and goes with the rate,
# so the minimum stays low and GCC's thresholds apply as before; past INHERENT_LOSS_MAX random
# loss is cut for again (fewer, smaller packets per frame survive better). This is the idea of
# WebRTC's LossBasedBweV2 "inherent loss", in its simplest form.
LOSS_SMOOTHING = 0.3
INHERENT_LOSS_WINDOW = 10.0
INHERENT_LOSS_MAX = 0.10
# The loss-based estimate may run at most this far above the delay-based one: it only exists to
# pull the target down, and must not take seconds to come down when loss appears.
LOSS_HEADROOM = 1.5
# No feedback for this long while sending: the path is congested to death or gone; halve the
# rate (once per FEEDBACK_TIMEOUT) rather than keep pushing blind. WebRTC reacts after ~0.5-1 s.
FEEDBACK_TIMEOUT = 1.0
# RTT smoothing as TCP (RFC 6298: α = 1/8).
RTT_GAIN = 1 / 8
DEFAULT_RTT = 0.1
# Quality ladder: step up only with this much margin over a rung's floor, to avoid flapping.
UPGRADE_MARGIN = 1.25
# Heavy loss: step down one more rung so frames (fewer, smaller packets) survive.
HEAVY_LOSS = 0.15


class Usage(enum.Enum):
    NORMAL = "normal"
    OVERUSE = "overuse"
    UNDERUSE = "underuse"


class RateState(enum.Enum):
    HOLD = "hold"
    INCREASE = "increase"
    DECREASE = "decrease"


# GCC §5.5 table: (detector signal, state) → next state.
AIMD_TRANSITIONS: dict[tuple[Usage, RateState], RateState] = {
    (Usage.OVERUSE, RateState.HOLD): RateState.DECREASE,
    (Usage.OVERUSE, RateState.INCREASE): RateState.DECREASE,
    (Usage.OVERUSE, RateState.DECREASE): RateState.DECREASE,
    (Usage.NORMAL, RateState.HOLD): RateState.INCREASE,
    (Usage.NORMAL, RateState.INCREASE): RateState.INCREASE,
    (Usage.NORMAL, RateState.DECREASE): RateState.HOLD,
    (Usage.UNDERUSE, RateState.HOLD): RateState.HOLD,
    (Usage.UNDERUSE, RateState.INCREASE): RateState.HOLD,
    (Usage.UNDERUSE, RateState.DECREASE): RateState.HOLD,
}


@dataclass(frozen=True, slots=True)
class VideoQuality:
    width: int
    height: int
    fps: int
    min_bitrate: int  # below this, step down to the next rung


# Rungs after WebRTC's VP8 resolution/bitrate tables (e.g. 640×360 ≈ 300-800 kb/s).
QUALITY_LADDER: tuple[VideoQuality, ...] = (
    VideoQuality(1280, 720, 30, 1_200_000),
    VideoQuality(960, 540, 30, 700_000),
    VideoQuality(640, 360, 30, 300_000),
    VideoQuality(480, 270, 20, 150_000),
    VideoQuality(320, 180, 15, 60_000),
    VideoQuality(160, 120, 10, 0),
)


# --- receiver side ---


class TransportFeedbackGenerator:
    """Collects arrival times by transport sequence number and reports them periodically."""

    def __init__(self, interval: float = FEEDBACK_INTERVAL) -> None:
        self.interval = interval
        self._unwrap = SeqUnwrapper()
        self._base: int | None = None
        self._arrivals: dict[int, float] = {}
        self._last_sent: float | None = None
        self._count = 0
        self.too_late = 0  # arrivals for sequence numbers already reported

    def on_packet(self, transport_seq: int, now: float) -> None:
        ext = self._unwrap.unwrap(transport_seq)
        if self._base is None:
            self._base = ext
        if ext < self._base or ext in self._arrivals:
            self.too_late += 1
            return
        if ext - self._base >= 8 * MAX_FEEDBACK_ENTRIES:
            # A jump this large is a restart or garbage: report from here on.
            self._arrivals.clear()
            self._base = ext
        self._arrivals[ext] = now

    def next_timeout(self) -> float | None:
        if not self._arrivals:
            return None
        return 0.0 if self._last_sent is None else self._last_sent + self.interval

    def poll(self, now: float) -> FeedbackPacket | None:
        if not self._arrivals or self._base is None:
            return None
        full = max(self._arrivals) - self._base >= MAX_FEEDBACK_ENTRIES
        if not full and self._last_sent is not None and now < self._last_sent + self.interval:
            return None
        if min(self._arrivals) >= self._base + MAX_FEEDBACK_ENTRIES:
            # Over a report's worth of packets lost in a row: those go unreported.
            self._base = min(self._arrivals)
        base = self._base
        end = max(s for s in self._arrivals if s < base + MAX_FEEDBACK_ENTRIES)
        end_time = self._arrivals[end]
        deltas: list[int] = []
        prev: int | None = None
        reference = 0
        for seq in range(base, end + 1):
            t = self._arrivals.pop(seq, None)
            if t is None:
                deltas.append(FEEDBACK_MISSING)
                continue
            tick = round(t / FEEDBACK_TICK)
            if prev is None:
                reference, prev = tick, tick
                deltas.append(0)
                continue
            d = max(-0x7FFF, min(0x7FFF, tick - prev))
            deltas.append(d)
            prev += d  # follow what the sender will reconstruct, so clamping never drifts
        hold = round((now - end_time) / FEEDBACK_TICK)
        self._base = end + 1
        self._last_sent = now
        packet = FeedbackPacket(
            feedback_count=self._count,
            base_seq=base & 0xFFFF,
            reference=reference % (1 << 32),
            hold=max(0, min(0xFFFF, hold)),
            deltas=tuple(deltas),
        )
        self._count = (self._count + 1) % 256
        return packet


# --- sender side ---


@dataclass(slots=True)
class _Sent:
    at: float
    size: int


@dataclass(slots=True)
class _Group:
    first_send: float
    last_send: float
    last_arrival: float


class _Trendline:
    """Delay-gradient trend over recent packet groups, and the adaptive over-use detector."""

    def __init__(self) -> None:
        self._accumulated = 0.0
        self._smoothed = 0.0
        self._first_arrival: float | None = None
        self._window: deque[tuple[float, float]] = deque(maxlen=TREND_WINDOW)
        self._deltas = 0
        self.trend = 0.0
        self._prev_trend = 0.0
        self.threshold = THRESHOLD_START
        self._over_time = -1.0
        self._last_update: float | None = None
        self.usage = Usage.NORMAL

    def update(self, delay_delta_ms: float, send_delta_ms: float, arrival_ms: float) -> Usage:
        self._deltas = min(self._deltas + 1, TREND_MAX_DELTAS)
        if self._first_arrival is None:
            self._first_arrival = arrival_ms
        self._accumulated += delay_delta_ms
        self._smoothed = (
            TREND_SMOOTHING * self._smoothed + (1 - TREND_SMOOTHING) * self._accumulated
        )
        self._window.append((arrival_ms - self._first_arrival, self._smoothed))
        if len(self._window) == TREND_WINDOW:
            self.trend = _slope(self._window)
        self._detect(send_delta_ms, arrival_ms)
        return self.usage

    def _detect(self, send_delta_ms: float, now_ms: float) -> None:
        modified = min(self._deltas, TREND_MAX_DELTAS) * self.trend * TREND_GAIN
        if modified > self.threshold:
            if self._over_time < 0:
                self._over_time = send_delta_ms / 2
            else:
                self._over_time += send_delta_ms
            if self._over_time > OVERUSE_TIME and self.trend >= self._prev_trend:
                self._over_time = 0.0
                self.usage = Usage.OVERUSE
        elif modified < -self.threshold:
            self._over_time = -1.0
            self.usage = Usage.UNDERUSE
        else:
            self._over_time = -1.0
            self.usage = Usage.NORMAL
        self._prev_trend = self.trend
        self._adapt_threshold(modified, now_ms)

    def _adapt_threshold(self, modified: float, now_ms: float) -> None:
        if self._last_update is None:
            self._last_update = now_ms
        if abs(modified) > self.threshold + 15.0:
            # A sudden spike (e.g. a path change) must not drag the threshold up (WebRTC).
            self._last_update = now_ms
            return
        k = THRESHOLD_K_DOWN if abs(modified) < self.threshold else THRESHOLD_K_UP
        dt = min(now_ms - self._last_update, 100.0)
        self.threshold += k * (abs(modified) - self.threshold) * dt
        self.threshold = max(THRESHOLD_MIN, min(THRESHOLD_MAX, self.threshold))
        self._last_update = now_ms


def _slope(points: deque[tuple[float, float]]) -> float:
    """Least-squares slope in one pass (it runs for every packet group); the sums are taken
    relative to the first point, so they stay small however long the call has run."""
    n = len(points)
    x0, y0 = points[0]
    sx = sy = sxx = sxy = 0.0
    for x, y in points:
        x -= x0
        y -= y0
        sx += x
        sy += y
        sxx += x * x
        sxy += x * y
    den = sxx - sx * sx / n
    return (sxy - sx * sy / n) / den if den > 0 else 0.0


class RateController:
    """Sender side: stamps transport sequence numbers, digests feedback, yields a target bitrate."""

    def __init__(
        self,
        start_bitrate: int = START_BITRATE,
        *,
        min_bitrate: int = MIN_BITRATE,
        max_bitrate: int = MAX_BITRATE,
        audio_bitrate: int = AUDIO_BITRATE,
        max_quality: VideoQuality | None = None,
    ) -> None:
        self.min_bitrate = min_bitrate
        self.max_bitrate = max_bitrate
        self.audio_bitrate = audio_bitrate
        self._ladder = _ladder_for(max_quality)
        self._next_tseq = 0
        self._sent: dict[int, _Sent] = {}
        self._ref = SeqUnwrapper(32)
        self.srtt: float | None = None
        self.feedbacks = 0
        self.path_resets = 0
        # Over the whole call, across path resets: what the end-of-call report states as loss
        # (the windowed `loss` is what the controller acts on, and one window may see none).
        self.packets_lost = 0
        self.packets_reported = 0
        self._rung = 0
        self._start(start_bitrate)

    def _start(self, bitrate: int) -> None:
        self.delay_rate = float(bitrate)
        self.loss_rate = float(bitrate)
        self.state = RateState.INCREASE
        self.startup = True
        self._trend = _Trendline()
        self._group: _Group | None = None
        self._prev_group: _Group | None = None
        self._received: deque[tuple[float, int]] = deque()
        # Running sum of the sizes in _received and its newest arrival: the receive rate is read
        # for every packet group, and summing the window each time cost more than the rest of
        # the controller.
        self._received_bytes = 0
        self._newest_arrival = -math.inf
        self._last_increase: float | None = None
        self._last_decrease: float | None = None
        self._capacity: float | None = None  # receive rate at recent decreases (link capacity)
        self._capacity_var = 0.0
        self._loss_lost = 0
        self._loss_total = 0
        self._loss_since: float | None = None
        self._last_feedback: float | None = None
        self.feedback_timeouts = 0
        self.loss = 0.0  # the last window's loss fraction
        self.smoothed_loss = 0.0
        self._smoothed_history: deque[tuple[float, float]] = deque()  # (time, smoothed loss)
        self._rung = self._quality_index(self.video_bitrate, self.loss, self._rung)

    # --- sending ---

    def on_packet_sent(self, size: int, now: float) -> int:
        """Allocate the next transport sequence number (16 bit) for a packet of `size` bytes."""
        seq = self._next_tseq
        self._next_tseq += 1
        self._sent[seq] = _Sent(now, size)
        while self._sent:
            oldest = next(iter(self._sent))
            if now - self._sent[oldest].at <= HISTORY_AGE:
                break
            del self._sent[oldest]
        return seq & 0xFFFF

    def prepare(self, pkt: MediaPacket, now: float) -> bytes:
        """Stamp a fresh transport sequence number on `pkt` and encode it for sending."""
        size = len(pkt.payload) + 20
        return pkt.encode(self.on_packet_sent(size, now))

    # --- feedback ---

    def on_feedback(self, fb: FeedbackPacket, now: float) -> None:
        self.feedbacks += 1
        self._last_feedback = now
        last = self._next_tseq - 1
        base = last - ((last - fb.base_seq) % (1 << 16))
        tick = self._ref.unwrap(fb.reference)
        received: list[tuple[_Sent, float]] = []
        lost = 0
        last_received: tuple[_Sent, float] | None = None
        for i, delta in enumerate(fb.deltas):
            sent = self._sent.get(base + i)
            if delta == FEEDBACK_MISSING:
                if sent is not None:
                    lost += 1
                continue
            tick += delta
            if sent is None:
                continue  # before a path reset, or long forgotten
            item = (sent, tick * FEEDBACK_TICK)
            received.append(item)
            last_received = item
        if last_received is not None and base + len(fb.deltas) - 1 in self._sent:
            sample = now - last_received[0].at - fb.hold * FEEDBACK_TICK
            if sample > 0:
                self.srtt = (
                    sample if self.srtt is None else self.srtt + RTT_GAIN * (sample - self.srtt)
                )
        window = self._received
        for sent, arrival in received:
            window.append((arrival, sent.size))
            self._received_bytes += sent.size
            if arrival > self._newest_arrival:
                self._newest_arrival = arrival
            self._on_arrival(sent, arrival, now)
        oldest = self._newest_arrival - RATE_WINDOW
        while window and window[0][0] < oldest:
            self._received_bytes -= window.popleft()[1]
        self._on_loss(lost, len(received), now)
        self._rung = self._quality_index(self.video_bitrate, self.smoothed_loss, self._rung)

    def _on_arrival(self, sent: _Sent, arrival: float, now: float) -> None:
        group = self._group
        if group is None or sent.at - group.first_send > GROUP_SPAN:
            prev = self._prev_group
            if group is not None and prev is not None:
                send_delta = group.last_send - prev.last_send
                arrival_delta = group.last_arrival - prev.last_arrival
                if arrival_delta >= 0:
                    usage = self._trend.update(
                        1000 * (arrival_delta - send_delta),
                        1000 * send_delta,
                        1000 * group.last_arrival,
                    )
                    self._aimd(usage, now)
            if group is not None:
                self._prev_group = group
            self._group = _Group(sent.at, sent.at, arrival)
        else:
            group.last_send = max(group.last_send, sent.at)
            group.last_arrival = max(group.last_arrival, arrival)

    def _aimd(self, usage: Usage, now: float) -> None:
        self.state = AIMD_TRANSITIONS[(usage, self.state)]
        measured = self.receive_rate
        if self.state is RateState.DECREASE:
            interval = max(0.010, min(0.200, self.rtt))
            if self._last_decrease is not None and now - self._last_decrease < interval:
                return
            if measured > 0:
                self._note_capacity(measured)
                self.delay_rate = min(self.delay_rate, BETA * measured)
            else:
                self.delay_rate *= BETA
            self._last_decrease = now
            self._last_increase = now
            self.startup = False
            self.state = RateState.HOLD  # one cut per detection, as WebRTC does
        elif self.state is RateState.INCREASE:
            dt = 0.0 if self._last_increase is None else min(1.0, now - self._last_increase)
            self._last_increase = now
            if self._near_capacity(measured):
                response = self.rtt + RESPONSE_EXTRA
                self.delay_rate += ADDITIVE_PACKET_BITS * dt / response
            else:
                growth = STARTUP_INCREASE_PER_SECOND if self.startup else INCREASE_PER_SECOND
                self.delay_rate *= growth**dt
            if measured > 0:
                self.delay_rate = min(self.delay_rate, RECEIVE_HEADROOM * measured + 10_000)
        else:
            self._last_increase = now
        self.delay_rate = max(self.min_bitrate, min(self.max_bitrate, self.delay_rate))

    def _note_capacity(self, measured: float) -> None:
        if (
            self._capacity is None
            or abs(measured - self._capacity)
            > 3 * math.sqrt(self._capacity_var) + 0.1 * self._capacity
        ):
            self._capacity = measured
            self._capacity_var = (0.05 * measured) ** 2
            return
        err = measured - self._capacity
        self._capacity += 0.05 * err
        self._capacity_var = 0.95 * self._capacity_var + 0.05 * err * err

    def _near_capacity(self, measured: float) -> bool:
        if self._capacity is None:
            return False
        spread = 3 * math.sqrt(self._capacity_var) + 0.05 * self._capacity
        if measured > self._capacity + spread:
            self._capacity = None  # the link got faster: explore multiplicatively again
            return False
        return self.delay_rate >= self._capacity - spread

    def _on_loss(self, lost: int, received: int, now: float) -> None:
        self.packets_lost += lost
        self.packets_reported += lost + received
        if self._loss_since is None:
            self._loss_since = now
        self._loss_lost += lost
        self._loss_total += lost + received
        if now - self._loss_since < LOSS_WINDOW or self._loss_total < LOSS_MIN_PACKETS:
            return
        self.loss = self._loss_lost / self._loss_total
        if self._smoothed_history:
            self.smoothed_loss += LOSS_SMOOTHING * (self.loss - self.smoothed_loss)
        else:
            self.smoothed_loss = self.loss
        history = self._smoothed_history
        while history and history[-1][1] >= self.smoothed_loss:
            history.pop()  # kept increasing in loss: the first is the window's minimum
        history.append((now, self.smoothed_loss))
        while history[0][0] < now - INHERENT_LOSS_WINDOW:
            history.popleft()
        excess = self.congestion_loss
        if excess > LOSS_HIGH:
            self.loss_rate *= 1 - 0.5 * excess
            self.startup = False
        elif excess < LOSS_LOW:
            # Without loss this controller must not be what holds the rate back: follow the
            # delay-based rate as far as the receiver's measured rate vouches for it.
            vouched = RECEIVE_HEADROOM * self.receive_rate
            self.loss_rate = max(self.loss_rate * LOSS_INCREASE, min(self.delay_rate, vouched))
        self.loss_rate = min(self.loss_rate, LOSS_HEADROOM * self.delay_rate)
        self.loss_rate = max(self.min_bitrate, min(self.max_bitrate, self.loss_rate))
        self._loss_lost = self._loss_total = 0
        self._loss_since = now

    @property
    def call_loss(self) -> float:
        """Fraction of packets lost over the whole call, as feedback reported them."""
        return self.packets_lost / self.packets_reported if self.packets_reported else 0.0

    def next_timeout(self) -> float | None:
        """When to call handle_timeout: the moment feedback would be overdue."""
        if not self._sent:
            return None
        since = self._last_feedback
        if since is None:
            since = next(iter(self._sent.values())).at
        return since + FEEDBACK_TIMEOUT

    def handle_timeout(self, now: float) -> None:
        """Feedback overdue while we are sending: halve the rate, and again a second later."""
        deadline = self.next_timeout()
        if deadline is None or now < deadline:
            return
        self.feedback_timeouts += 1
        self.startup = False
        self.delay_rate = max(self.min_bitrate, self.delay_rate / 2)
        self.loss_rate = max(self.min_bitrate, self.loss_rate / 2)
        self.state = RateState.HOLD
        self._last_feedback = now
        self._rung = self._quality_index(self.video_bitrate, self.smoothed_loss, self._rung)

    # --- outputs ---

    @property
    def rtt(self) -> float:
        return DEFAULT_RTT if self.srtt is None else self.srtt

    @property
    def receive_rate(self) -> float:
        """Bits per second the receiver got over the last RATE_WINDOW; 0 while unknown (less than
        half a window of arrivals, when a rate would be a guess from a handful of packets)."""
        if len(self._received) < 2:
            return 0.0
        span = self._received[-1][0] - self._received[0][0]
        if span < RATE_WINDOW / 2:
            return 0.0
        return 8 * self._received_bytes / span

    @property
    def inherent_loss(self) -> float:
        """Loss the path has whatever we send (see INHERENT_LOSS_WINDOW)."""
        if not self._smoothed_history:
            return 0.0
        return min(INHERENT_LOSS_MAX, self._smoothed_history[0][1])

    @property
    def congestion_loss(self) -> float:
        """Smoothed loss above the path's inherent loss: what the loss controller acts on."""
        return max(0.0, self.smoothed_loss - self.inherent_loss)

    @property
    def target_bitrate(self) -> int:
        rate = min(self.delay_rate, self.loss_rate)
        return int(max(self.min_bitrate, min(self.max_bitrate, rate)))

    @property
    def video_bitrate(self) -> int:
        """What the video encoder should aim at: the target less the fixed audio rate."""
        return max(MIN_VIDEO_BITRATE, self.target_bitrate - self.audio_bitrate)

    @property
    def quality(self) -> VideoQuality:
        """Suggested capture resolution and frame rate for the current rate and loss."""
        return self._ladder[self._rung]

    def _quality_index(self, video_bps: int, loss: float, current: int) -> int:
        fits = next(i for i, q in enumerate(self._ladder) if video_bps >= q.min_bitrate)
        if loss > HEAVY_LOSS:
            fits = min(fits + 1, len(self._ladder) - 1)
        if fits < current:
            # Step up one rung at a time, and only with margin.
            up = current - 1
            if video_bps >= self._ladder[up].min_bitrate * UPGRADE_MARGIN and loss <= HEAVY_LOSS:
                return up
            return current
        return fits

    def reset_for_new_path(self, now: float) -> None:
        """The session moved (e.g. relay → direct): what we learnt is about the old path.

        Forget sent history (feedback about old-path packets is ignored), delay and loss state,
        and RTT; restart from at most START_BITRATE and ramp up again.
        """
        self.path_resets += 1
        self._sent.clear()
        self.srtt = None
        self._start(min(self.target_bitrate, START_BITRATE))


def _ladder_for(max_quality: VideoQuality | None) -> tuple[VideoQuality, ...]:
    if max_quality is None:
        return QUALITY_LADDER
    rungs = tuple(
        VideoQuality(q.width, q.height, min(q.fps, max_quality.fps), q.min_bitrate)
        for q in QUALITY_LADDER
        if q.width <= max_quality.width and q.height <= max_quality.height
    )
    return rungs or (QUALITY_LADDER[-1],)
