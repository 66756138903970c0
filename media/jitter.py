"""Adaptive jitter buffers: audio played at a steady pace, video released in decodable order.

Both map the sender's media clock to receiver time as `playout = pts + offset`, where
`offset = base + delay`: `base` is the smallest recent (arrival − pts), i.e. clock offset plus the
fastest transit, and `delay` follows measured jitter. The two clocks never need to agree.

Lip sync: audio and video timestamps come from one sender clock, so giving both streams the same
offset (the larger of the two they want) plays them in sync; `PlayoutClock` holds that offset.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from media.packetizer import AssembledFrame, ReferenceChain
from media.wiremedia import MediaLocalError, StreamId

# RFC 3550 §6.4.1 smooths jitter with gain 1/16.
JITTER_GAIN = 1 / 16
# Target delay = JITTER_MULTIPLIER × RFC 3550 jitter. For delay spread uniformly over [0, X] the
# RFC estimate is X/3; 4× covers the whole spread with margin (NetEq aims at its 95th percentile).
JITTER_MULTIPLIER = 4.0
# Audio target delay bounds: 20 ms is one Opus frame; past 200 ms conversation suffers
# (ITU-T G.114 puts one-way mouth-to-ear delay above 150 ms as noticeably worse).
AUDIO_MIN_DELAY = 0.020
AUDIO_MAX_DELAY = 0.200
# Video needs less smoothing of its own (a late frame shows as a tiny stall, not a click).
VIDEO_MIN_DELAY = 0.010
VIDEO_MAX_DELAY = 0.400
# Once frames have needed a retransmission, video also budgets one NACK round trip
# (RTT + feedback.NACK_REORDER_WAIT) so a recovered frame is still on time, as WebRTC's jitter
# estimator adds RTT when NACK is on; kept for this long after the last late frame (and at the
# start of a call, before we know whether the path loses packets).
RTX_DELAY_EXTRA = 0.015
RTX_DELAY_HOLD = 10.0
# While retransmissions are at work the video delay also covers the RTX_LATE_QUANTILE of how late
# recent frames became complete (completion − pts − base, over the last RTX_LATE_HISTORY frames):
# at 10 % loss one NACK round in five fails (the NACK or its answer lost), so a one-RTT budget
# freezes on every second round; the quantile measures how many rounds this path's loss actually
# takes, RTT and NACK retry timing included, as NetEq sizes its buffer from a delay histogram.
# Without loss no frame is late and the budget stays at one round (then nothing, see above).
RTX_LATE_QUANTILE = 0.98
RTX_LATE_HISTORY = 300  # 10 s at 30 fps
# The applied delay follows the target at most this fast (seconds per second of media): 10 %
# time-stretch is inaudible for speech, similar to NetEq's accelerate/preemptive-expand steps.
DELAY_SLEW_RATE = 0.10
# Window of the minimum-transit estimate: long enough to see a quiet moment, short enough to
# follow a path switch (relay → direct) within a couple of seconds.
BASE_WINDOW = 2.0
# Audio frames held at most: 1 s of 20 ms frames, five times the largest target delay.
MAX_AUDIO_FRAMES = 50
# A run of missing audio frames longer than this (200 ms) is an outage, not loss: skip it
# instead of emitting one concealment per frame.
MAX_CONCEAL_RUN = 10
# Audio frame duration assumed before two frames have been seen (Opus default, RFC 7587).
DEFAULT_AUDIO_FRAME = 0.020
# Video frames held at most: 2 s at 30 fps.
MAX_VIDEO_FRAMES = 60
# How long video waits for a missing frame before skipping to a keyframe:
# NACK_WAIT_RTTS round trips (a NACK and its answer, plus one retry), within these bounds.
NACK_WAIT_RTTS = 4.0
MIN_VIDEO_WAIT = 0.050
MAX_VIDEO_WAIT = 0.500
# Lip sync never delays a stream more than this beyond what it wants itself; past half a second
# a conversation is worse off than slightly out of sync (ITU-R BT.1359 tolerates ~185 ms lag).
MAX_SYNC_DELAY = 0.500


# --- events ---


@dataclass(frozen=True, slots=True)
class AudioOut:
    """Play this frame now."""

    frame: AssembledFrame
    playout: float


@dataclass(frozen=True, slots=True)
class AudioConceal:
    """Frame `frame_id` is lost: let the decoder conceal it. When the following frame is already
    here, `fec_source` is it: Opus can rebuild the lost frame from its in-band FEC (RFC 6716
    §2.1.7); otherwise the decoder falls back to packet loss concealment."""

    frame_id: int
    pts: float
    playout: float
    fec_source: AssembledFrame | None = None


@dataclass(frozen=True, slots=True)
class VideoOut:
    """Decode and render this frame now; the reference chain is intact."""

    frame: AssembledFrame
    playout: float


@dataclass(frozen=True, slots=True)
class VideoSkipped:
    """Frames first_id..first_id+count-1 were given up (lost or undecodable)."""

    first_id: int
    count: int


@dataclass(frozen=True, slots=True)
class KeyframeNeeded:
    """Nothing more is decodable until a keyframe arrives: send a PLI."""


AudioEvent = AudioOut | AudioConceal
VideoEvent = VideoOut | VideoSkipped | KeyframeNeeded


# --- shared playout clock ---


class PlayoutClock:
    """One offset for all streams of a call, so audio and video play in sync."""

    def __init__(self) -> None:
        self._wanted: dict[StreamId, float] = {}

    def propose(self, stream: StreamId, offset: float) -> None:
        self._wanted[stream] = offset

    def offset(self, stream: StreamId) -> float:
        own = self._wanted.get(stream)
        if own is None:
            raise MediaLocalError("offset asked before the stream proposed one")
        return min(max(self._wanted.values()), own + MAX_SYNC_DELAY)


class _Timing:
    """Minimum-transit base, RFC 3550 jitter and a slewed target delay for one stream."""

    def __init__(self, stream: StreamId, lo: float, hi: float, clock: PlayoutClock | None) -> None:
        self.stream = stream
        self._lo, self._hi = lo, hi
        self._clock = clock or PlayoutClock()
        self._mins: deque[tuple[float, float]] = deque()  # (arrival, transit), increasing transit
        self._prev: tuple[float, float] | None = None  # (arrival, pts) of the previous frame
        self.jitter = 0.0
        self.delay = lo
        self.extra = 0.0  # added to the jitter-based target (the video's NACK budget)
        self.floor = 0.0  # the target is at least this (the video's measured NACK budget)
        self._last_update: float | None = None

    def observe(self, arrival: float, pts: float) -> None:
        transit = arrival - pts
        while self._mins and self._mins[-1][1] >= transit:
            self._mins.pop()
        self._mins.append((arrival, transit))
        while self._mins[0][0] < arrival - BASE_WINDOW:
            self._mins.popleft()
        if self._prev is not None and pts > self._prev[1]:
            d = (arrival - self._prev[0]) - (pts - self._prev[1])
            self.jitter += (abs(d) - self.jitter) * JITTER_GAIN
        if self._prev is None or pts > self._prev[1]:
            self._prev = (arrival, pts)
        target = self.target
        if self._last_update is None:
            self.delay = target
        else:
            step = DELAY_SLEW_RATE * max(0.0, arrival - self._last_update)
            self.delay += max(-step, min(step, target - self.delay))
        self._last_update = arrival
        self._clock.propose(self.stream, self._mins[0][1] + self.delay)

    @property
    def target(self) -> float:
        wanted = max(JITTER_MULTIPLIER * self.jitter + self.extra, self.floor)
        return max(self._lo, min(self._hi, wanted))

    @property
    def base(self) -> float:
        """The smallest recent transit (arrival − pts); only after a first `observe`."""
        return self._mins[0][1]

    def playout(self, pts: float) -> float:
        return pts + self._clock.offset(self.stream)


# --- audio ---


class AudioJitterBuffer:
    """Releases audio frames at their playout time; reports lost ones for concealment."""

    def __init__(self, clock: PlayoutClock | None = None) -> None:
        self._timing = _Timing(StreamId.AUDIO, AUDIO_MIN_DELAY, AUDIO_MAX_DELAY, clock)
        self._frames: dict[int, AssembledFrame] = {}
        self._next: int | None = None
        self._last: tuple[int, float] | None = None  # (frame id, pts) last played or concealed
        self.late = 0
        self.duplicates = 0
        self.concealed = 0
        self.overflows = 0

    @property
    def jitter(self) -> float:
        return self._timing.jitter

    @property
    def target_delay(self) -> float:
        return self._timing.target

    @property
    def delay(self) -> float:
        return self._timing.delay

    def push(self, frame: AssembledFrame, now: float) -> None:
        if frame.stream != StreamId.AUDIO:
            raise MediaLocalError("video frame given to the audio buffer")
        if self._next is not None and frame.frame_id < self._next:
            self.late += 1
            return
        if frame.frame_id in self._frames:
            self.duplicates += 1
            return
        self._timing.observe(now, frame.pts)
        self._frames[frame.frame_id] = frame
        while len(self._frames) > MAX_AUDIO_FRAMES:
            oldest = min(self._frames)
            del self._frames[oldest]
            self.overflows += 1
            self._next = min(self._frames)

    def pop(self, now: float) -> list[AudioEvent]:
        out: list[AudioEvent] = []
        while (step := self._due(now)) is not None:
            out.append(step)
        return out

    def next_timeout(self) -> float | None:
        """Receiver time at which `pop` will have something, if known."""
        plan = self._plan()
        return None if plan is None else plan[1]

    def _plan(self) -> tuple[int, float, float] | None:
        """(frame id, playout time, pts) of the next frame to play or conceal."""
        if not self._frames:
            return None
        if self._next is None:
            self._next = min(self._frames)
        frame = self._frames.get(self._next)
        if frame is not None:
            return self._next, self._timing.playout(frame.pts), frame.pts
        later = min(self._frames)
        if later - self._next > MAX_CONCEAL_RUN:
            self._next = later  # an outage: start again at the next frame we have
            self._last = None
            return self._plan()
        nxt = self._frames[later]
        if self._last is not None and self._last[0] < self._next:
            last_id, last_pts = self._last
            pts = last_pts + (nxt.pts - last_pts) * (self._next - last_id) / (later - last_id)
        else:
            pts = nxt.pts - (later - self._next) * DEFAULT_AUDIO_FRAME
        return self._next, self._timing.playout(pts), pts

    def _due(self, now: float) -> AudioEvent | None:
        plan = self._plan()
        if plan is None or plan[1] > now:
            return None
        fid, playout, pts = plan
        self._next = fid + 1
        self._last = (fid, pts)
        frame = self._frames.pop(fid, None)
        if frame is None:
            self.concealed += 1
            return AudioConceal(fid, pts, playout, self._frames.get(fid + 1))
        return AudioOut(frame, playout)


# --- video ---


class VideoJitterBuffer:
    """Releases complete video frames in order; waits a bounded time for a missing one, then
    skips to the next keyframe (asking for one when none is buffered).

    While there is no decodable starting point (start of call, or after a skip with no keyframe
    buffered) frames are still kept, since the keyframe may only be late (a NACK at work); a
    keyframe is asked for only after the same bounded wait.
    """

    def __init__(self, clock: PlayoutClock | None = None, rtt: float = 0.1) -> None:
        self._timing = _Timing(StreamId.VIDEO, VIDEO_MIN_DELAY, VIDEO_MAX_DELAY, clock)
        self._frames: dict[int, AssembledFrame] = {}
        self._chain = ReferenceChain()
        self._next: int | None = None  # None: waiting for a keyframe
        self._floor = 0  # frames below this id were released or given up: late if they come
        self._asked = False
        self._gap_since: float | None = None
        self.rtt = rtt
        self._highest: int | None = None
        self._rtx_until = float("-inf")
        self._lateness: deque[float] = deque(maxlen=RTX_LATE_HISTORY)
        self.late = 0
        self.duplicates = 0
        self.skipped = 0
        self.released = 0

    @property
    def waiting_for_keyframe(self) -> bool:
        return self._next is None

    @property
    def max_wait(self) -> float:
        return max(MIN_VIDEO_WAIT, min(MAX_VIDEO_WAIT, NACK_WAIT_RTTS * self.rtt))

    def set_rtt(self, rtt: float) -> None:
        self.rtt = rtt

    @property
    def rtx_budget(self) -> float:
        """How late (RTX_LATE_QUANTILE) recent frames completed: the delay that lets them play."""
        if not self._lateness:
            return 0.0
        ordered = sorted(self._lateness)
        return ordered[min(len(ordered) - 1, int(RTX_LATE_QUANTILE * len(ordered)))] + (
            RTX_DELAY_EXTRA
        )

    @property
    def target_delay(self) -> float:
        return self._timing.target

    def push(self, frame: AssembledFrame, now: float) -> list[VideoEvent]:
        if frame.stream != StreamId.VIDEO:
            raise MediaLocalError("audio frame given to the video buffer")
        if frame.frame_id < self._floor:
            self.late += 1
            return []
        if frame.frame_id in self._frames:
            self.duplicates += 1
            return []
        if self._highest is None:
            self._rtx_until = now + RTX_DELAY_HOLD  # start cautious; relax if nothing is late
        elif frame.frame_id < self._highest:
            self._rtx_until = now + RTX_DELAY_HOLD  # it overtook: a retransmission at work
        self._highest = max(frame.frame_id, self._highest or 0)
        timing = self._timing
        if now < self._rtx_until:
            timing.extra = self.rtt + RTX_DELAY_EXTRA
            timing.floor = self.rtx_budget
        else:
            timing.extra = timing.floor = 0.0
        timing.observe(now, frame.pts)
        self._lateness.append(now - frame.pts - timing.base)
        self._frames[frame.frame_id] = frame
        if self._next is None:
            if frame.keyframe:
                self.skipped += self._start_at(
                    min(f for f, fr in self._frames.items() if fr.keyframe)
                )
            elif self._gap_since is None:
                self._gap_since = now
        elif frame.frame_id != self._next and self._gap_since is None:
            self._gap_since = now
        if len(self._frames) > MAX_VIDEO_FRAMES:
            if self._next is None:
                del self._frames[min(self._frames)]
                self.skipped += 1
                return []
            return self._give_up()
        return []

    def pop(self, now: float) -> list[VideoEvent]:
        out: list[VideoEvent] = []
        while self._frames:
            if self._next is None:
                if self._gap_since is None:
                    self._gap_since = now
                if not self._asked and now >= self._gap_since + self.max_wait:
                    self._asked = True
                    out.append(KeyframeNeeded())
                break
            frame = self._frames.get(self._next)
            if frame is not None:
                playout = self._timing.playout(frame.pts)
                if playout > now:
                    break
                del self._frames[self._next]
                self._chain.accept(frame.frame_id, frame.keyframe)
                self._next += 1
                self._floor = self._next
                self._gap_since = None if self._next in self._frames or not self._frames else now
                self.released += 1
                out.append(VideoOut(frame, playout))
                continue
            if self._gap_since is None:
                self._gap_since = now
            if now < self._gap_since + self.max_wait:
                break
            out.extend(self._give_up())
        return out

    def next_timeout(self) -> float | None:
        if not self._frames:
            return None
        since = self._gap_since if self._gap_since is not None else 0.0
        if self._next is None:
            return None if self._asked else since + self.max_wait
        frame = self._frames.get(self._next)
        if frame is not None:
            return self._timing.playout(frame.pts)
        return since + self.max_wait

    def _start_at(self, key_id: int) -> int:
        """Resume at keyframe `key_id`; returns how many buffered frames before it were dropped."""
        older = [f for f in self._frames if f < key_id]
        for fid in older:
            del self._frames[fid]
        self._next = self._floor = key_id
        self._asked = False
        self._gap_since = None
        self._chain.skip_to(key_id)
        return len(older)

    def _give_up(self) -> list[VideoEvent]:
        """Skip the missing frame(s): resume at the next buffered keyframe, or ask for one."""
        assert self._next is not None
        first = self._next
        keys = [fid for fid, f in self._frames.items() if f.keyframe and fid > first]
        if keys:
            resume = min(keys)
            self._start_at(resume)
            self.skipped += resume - first
            return [VideoSkipped(first, resume - first)]
        # No keyframe buffered: nothing here is decodable; drop it all and ask for a keyframe.
        dropped = max(self._frames) + 1 - first
        self._frames.clear()
        self.skipped += dropped
        self._floor = first + dropped
        self._next = None
        self._asked = True
        self._gap_since = None
        return [VideoSkipped(first, dropped), KeyframeNeeded()]
