"""Per-call statistics: counters, rolling rates, freeze time; snapshots as plain dicts for JSON.

Frozen video is measured as WebRTC's freeze metric (webrtc-stats `totalFreezesDuration`,
VideoQualityObserver) does: once FREEZE_MIN_SAMPLES intervals are known, a gap between rendered
frames of at least max(3 × the average interval, average + 150 ms) over the last 30 intervals
counts, for its whole length, as frozen.
"""

from __future__ import annotations

from collections import deque

from media.wiremedia import MediaLocalError

# A freeze is a render gap of at least max(FREEZE_FRAMES × average interval, average +
# FREEZE_MIN_INCREASE) (WebRTC: 3 frames, 150 ms), judged once FREEZE_MIN_SAMPLES intervals are
# known (WebRTC kMinFrameSamplesToDetectFreeze = 5).
FREEZE_FRAMES = 3
FREEZE_MIN_INCREASE = 0.150
FREEZE_MIN_SAMPLES = 5
# Rates (bitrate, fps) average over this window: 1 s, like browsers' getStats-based meters.
RATE_WINDOW = 1.0
# Frame intervals averaged for the freeze threshold (WebRTC: the last 30 rendered frames).
INTERVAL_HISTORY = 30
# Samples kept for the report: one per second for two hours; older samples are thinned.
MAX_SERIES = 7200


class _Rolling:
    """Sum of values over the last RATE_WINDOW seconds."""

    def __init__(self) -> None:
        self._items: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def add(self, now: float, value: float) -> None:
        self._items.append((now, value))
        self.total += value

    def per_second(self, now: float) -> float:
        while self._items and self._items[0][0] <= now - RATE_WINDOW:
            self._items.popleft()
        return sum(v for _, v in self._items) / RATE_WINDOW


class CallStats:
    """Everything the UI and the end-of-call report want to know about one call."""

    def __init__(self, start: float, *, codec: str = "", path: str = "unknown") -> None:
        self.start = start
        self.codec = codec
        self.path = path  # "direct" / "relay" / ...
        self.rtt: float | None = None
        self.loss = 0.0  # fraction in the last window, as the sender's rate controller measured it
        self.call_loss = 0.0  # fraction over the whole call so far
        self.jitter = 0.0  # seconds, audio jitter buffer's estimate
        self.target_bitrate = 0
        self.counters: dict[str, int] = {}
        self._sent = _Rolling()
        self._received = _Rolling()
        self._frames = _Rolling()
        self._last_render: float | None = None
        self._intervals: deque[float] = deque(maxlen=INTERVAL_HISTORY)
        self._frozen = 0.0
        self.freezes = 0
        self.frames_rendered = 0
        self._series: list[dict[str, object]] = []
        self._path_changes = 0

    # --- inputs ---

    def on_sent(self, nbytes: int, now: float) -> None:
        self._sent.add(now, 8 * nbytes)

    def on_received(self, nbytes: int, now: float) -> None:
        self._received.add(now, 8 * nbytes)

    def on_frame_rendered(self, now: float) -> None:
        if self._last_render is not None:
            gap = now - self._last_render
            if gap < 0:
                raise MediaLocalError("time went backwards")
            # The first gaps only teach us the frame rate: they cannot be judged yet.
            if len(self._intervals) >= FREEZE_MIN_SAMPLES and gap >= self.freeze_threshold:
                self._frozen += gap
                self.freezes += 1
            self._intervals.append(gap)
        self._last_render = now
        self.frames_rendered += 1
        self._frames.add(now, 1)

    def set_path(self, path: str) -> None:
        if path != self.path:
            self._path_changes += 1
            self.path = path

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def set_counter(self, name: str, value: int) -> None:
        """Mirror a counter kept elsewhere (e.g. NackGenerator.recovered)."""
        self.counters[name] = value

    # --- outputs ---

    @property
    def freeze_threshold(self) -> float:
        """The render gap that counts as a freeze now (before any interval is known: 150 ms)."""
        mean = sum(self._intervals) / len(self._intervals) if self._intervals else 0.0
        return max(FREEZE_FRAMES * mean, mean + FREEZE_MIN_INCREASE)

    def frozen_time(self, now: float) -> float:
        """Seconds of frozen video so far, counting a freeze still going on."""
        ongoing = 0.0
        if self._last_render is not None and len(self._intervals) >= FREEZE_MIN_SAMPLES:
            gap = now - self._last_render
            if gap >= self.freeze_threshold:
                ongoing = gap
        return self._frozen + ongoing

    def snapshot(self, now: float) -> dict[str, object]:
        """A JSON-ready view of the call now."""
        return {
            "t": round(now - self.start, 3),
            "path": self.path,
            "path_changes": self._path_changes,
            "codec": self.codec,
            "rtt_ms": 0.0
            if self.rtt is None
            else round(self.rtt * 1000, 1),  # report wants numbers
            "loss": round(self.loss, 4),
            "call_loss": round(self.call_loss, 4),
            "jitter_ms": round(self.jitter * 1000, 1),
            "target_bitrate": self.target_bitrate,
            "bitrate_sent": round(self._sent.per_second(now)),
            "bitrate_recv": round(self._received.per_second(now)),
            "fps": round(self._frames.per_second(now), 1),
            "frames_rendered": self.frames_rendered,
            "frozen": round(self.frozen_time(now), 3),
            "freezes": self.freezes,
            "counters": dict(self.counters),
        }

    def sample(self, now: float) -> dict[str, object]:
        """Take a snapshot and append it to the time series (call about once a second)."""
        snap = self.snapshot(now)
        self._series.append(snap)
        if len(self._series) > MAX_SERIES:
            # Keep the shape of a long call: drop every other old sample, keep the recent half.
            half = MAX_SERIES // 2
            self._series = self._series[:half:2] + self._series[half:]
        return snap

    def series(self) -> list[dict[str, object]]:
        return list(self._series)
