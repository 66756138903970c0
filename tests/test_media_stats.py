"""Call statistics: rolling rates, freeze accounting, JSON-ready snapshots and series."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.report import REPORT_FIELDS
from media.stats import FREEZE_MIN_INCREASE, FREEZE_MIN_SAMPLES, MAX_SERIES, CallStats


def test_rates_cover_the_last_second() -> None:
    s = CallStats(0.0)
    for i in range(100):
        s.on_sent(1250, i * 0.01)  # 1 Mb/s
        s.on_received(625, i * 0.01)
    snap = s.snapshot(0.995)
    assert snap["bitrate_sent"] == pytest.approx(1_000_000, rel=0.02)
    assert snap["bitrate_recv"] == pytest.approx(500_000, rel=0.02)
    assert s.snapshot(5.0)["bitrate_sent"] == 0


def test_smooth_video_is_never_frozen() -> None:
    s = CallStats(0.0)
    for i in range(300):
        s.on_frame_rendered(i / 30)
    assert s.frozen_time(10.0) == 0.0
    assert s.snapshot(9.99)["fps"] == pytest.approx(30, abs=1)


def test_a_gap_over_the_threshold_counts_whole() -> None:
    s = CallStats(0.0)
    for i in range(30):
        s.on_frame_rendered(i / 30)
    s.on_frame_rendered(29 / 30 + 0.15)  # 150 ms: a hiccup, not a freeze
    assert s.frozen_time(1.15) == 0.0
    last = 29 / 30 + 0.15 + 0.5
    s.on_frame_rendered(last)  # 500 ms: frozen
    assert s.frozen_time(last) == pytest.approx(0.5) and s.freezes == 1
    # a freeze still going on counts too
    assert s.frozen_time(last + 1.0) == pytest.approx(1.5)


def test_slow_video_uses_three_frame_intervals() -> None:
    s = CallStats(0.0)
    for i in range(20):
        s.on_frame_rendered(i * 0.25)  # 4 fps
    assert s.freeze_threshold == pytest.approx(0.75)
    assert s.frozen_time(19 * 0.25) == 0.0
    assert s.freeze_threshold > 0.25 + FREEZE_MIN_INCREASE


def test_fast_video_needs_150_ms_over_the_average() -> None:
    """At 30 fps, 3 frames (100 ms) is not yet a freeze: WebRTC also asks for average + 150 ms."""
    s = CallStats(0.0)
    t = 0.0
    for _ in range(30):
        t += 1 / 30
        s.on_frame_rendered(t)
    assert s.freeze_threshold == pytest.approx(1 / 30 + 0.150)
    t += 0.170  # over 3 intervals, under average + 150 ms
    s.on_frame_rendered(t)
    assert s.freezes == 0 and s.frozen_time(t) == 0.0
    t += 0.190
    s.on_frame_rendered(t)
    assert s.freezes == 1 and s.frozen_time(t) == pytest.approx(0.190)


def test_the_first_intervals_only_learn_the_frame_rate() -> None:
    s = CallStats(0.0)
    t = 0.0
    s.on_frame_rendered(t)
    for _ in range(FREEZE_MIN_SAMPLES - 1):
        t += 1 / 30
        s.on_frame_rendered(t)
    t += 0.5  # the decoder's start-up: too few intervals known to call it a freeze
    s.on_frame_rendered(t)
    assert s.freezes == 0 and s.frozen_time(t) == 0.0
    t += 0.5  # now the rate is known (and this gap is far above it)
    s.on_frame_rendered(t)
    assert s.freezes == 1


def test_snapshot_is_json_and_feeds_the_report() -> None:
    s = CallStats(100.0, codec="vp8", path="relay")
    s.rtt, s.loss, s.jitter = 0.052, 0.031, 0.004
    s.set_path("direct")
    s.set_counter("nack_recovered", 12)
    s.count("plis_sent")
    snap = s.sample(101.0)
    assert json.loads(json.dumps(snap)) == snap
    assert snap["rtt_ms"] == 52.0 and snap["path"] == "direct" and snap["path_changes"] == 1
    assert snap["counters"] == {"nack_recovered": 12, "plis_sent": 1}
    for key in REPORT_FIELDS:
        assert isinstance(snap[key], int | float)
    assert s.series() == [snap]


def test_series_stays_bounded() -> None:
    s = CallStats(0.0)
    for i in range(MAX_SERIES + 10):
        s.sample(float(i))
    series = s.series()
    assert len(series) <= MAX_SERIES
    times = [x["t"] for x in series]
    assert times == sorted(times) and times[-1] == MAX_SERIES + 9


@given(st.lists(st.floats(0, 0.5), max_size=200))
def test_frozen_time_never_exceeds_elapsed_time(gaps: list[float]) -> None:
    s = CallStats(0.0)
    t = 0.0
    s.on_frame_rendered(t)
    for gap in gaps:
        t += gap
        s.on_frame_rendered(t)
    assert 0.0 <= s.frozen_time(t) <= t + 1e-9
