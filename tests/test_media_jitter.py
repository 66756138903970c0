"""Jitter buffers: audio paced and concealed, video in order with bounded waits, lip sync."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media.jitter import (
    AUDIO_MAX_DELAY,
    AUDIO_MIN_DELAY,
    MAX_AUDIO_FRAMES,
    MAX_SYNC_DELAY,
    MAX_VIDEO_FRAMES,
    RTX_DELAY_HOLD,
    VIDEO_MIN_DELAY,
    AudioConceal,
    AudioJitterBuffer,
    KeyframeNeeded,
    PlayoutClock,
    VideoJitterBuffer,
    VideoOut,
    VideoSkipped,
)
from media.packetizer import AssembledFrame
from media.wiremedia import StreamId

CLOCK_OFFSET = 1000.0  # receiver clock = sender clock + this; the buffers must not care


def audio(fid: int, arrival: float) -> AssembledFrame:
    pts = fid * 0.02
    return AssembledFrame(StreamId.AUDIO, fid, pts, True, b"a", 0, arrival, arrival)


def video(fid: int, arrival: float, key: bool = False) -> AssembledFrame:
    pts = fid / 30
    return AssembledFrame(StreamId.VIDEO, fid, pts, key, b"v", 0, arrival, arrival)


def run_audio(buf: AudioJitterBuffer, arrivals: dict[int, float], end: float) -> list:
    """Push frames at their arrival times and pop every millisecond (a fake clock)."""
    events: list = []
    pending = sorted(arrivals.items(), key=lambda kv: kv[1])
    t = CLOCK_OFFSET
    while t < end:
        while pending and pending[0][1] <= t:
            fid, at = pending.pop(0)
            buf.push(audio(fid, at), at)
        events += buf.pop(t)
        t += 0.001
    return events


def test_steady_audio_plays_in_order_at_minimum_delay() -> None:
    buf = AudioJitterBuffer()
    arrivals = {i: CLOCK_OFFSET + i * 0.02 + 0.03 for i in range(100)}
    events = run_audio(buf, arrivals, CLOCK_OFFSET + 2.2)
    assert [e.frame.frame_id for e in events] == list(range(100))
    assert buf.target_delay == AUDIO_MIN_DELAY
    for e in events:  # played ~ its playout time, 20 ms apart
        assert e.playout == pytest.approx(e.frame.pts + CLOCK_OFFSET + 0.03 + AUDIO_MIN_DELAY)


def test_audio_target_delay_tracks_jitter_within_bounds() -> None:
    rnd = random.Random(1)
    calm, rough = AudioJitterBuffer(), AudioJitterBuffer()
    run_audio(
        calm,
        {i: CLOCK_OFFSET + i * 0.02 + rnd.uniform(0, 0.005) for i in range(200)},
        CLOCK_OFFSET + 4.5,
    )
    run_audio(
        rough,
        {i: CLOCK_OFFSET + i * 0.02 + rnd.uniform(0, 0.08) for i in range(200)},
        CLOCK_OFFSET + 4.5,
    )
    assert AUDIO_MIN_DELAY <= calm.target_delay < rough.target_delay <= AUDIO_MAX_DELAY
    assert rough.target_delay > 0.06  # covers most of the 80 ms spread


def test_lost_audio_frames_are_concealed_in_place() -> None:
    buf = AudioJitterBuffer()
    arrivals = {i: CLOCK_OFFSET + i * 0.02 + 0.01 for i in range(50) if i not in (10, 11, 30)}
    events = run_audio(buf, arrivals, CLOCK_OFFSET + 1.2)
    kinds = [
        (type(e).__name__, e.frame_id if isinstance(e, AudioConceal) else e.frame.frame_id)
        for e in events
    ]
    assert [fid for _, fid in kinds] == list(range(50))
    assert {fid for kind, fid in kinds if kind == "AudioConceal"} == {10, 11, 30}
    conceal = [e for e in events if isinstance(e, AudioConceal)]
    assert conceal[0].pts == pytest.approx(0.2)
    # Opus in-band FEC: the frame after a lost one carries it, when it is already here
    assert [c.fec_source.frame_id if c.fec_source else None for c in conceal] == [None, 12, 31]
    assert buf.concealed == 3


def test_late_and_duplicate_audio_is_dropped() -> None:
    buf = AudioJitterBuffer()
    arrivals = {i: CLOCK_OFFSET + i * 0.02 for i in range(10) if i != 3}
    run_audio(buf, arrivals, CLOCK_OFFSET + 0.3)
    buf.push(audio(3, CLOCK_OFFSET + 0.3), CLOCK_OFFSET + 0.3)
    assert buf.late == 1


@given(st.lists(st.tuples(st.integers(0, 300), st.floats(0, 3)), max_size=200))
def test_audio_buffer_is_bounded_and_never_repeats(items: list[tuple[int, float]]) -> None:
    buf = AudioJitterBuffer()
    seen: list[int] = []
    for fid, at in sorted(items, key=lambda i: i[1]):
        buf.push(audio(fid, at), at)
        assert len(buf._frames) <= MAX_AUDIO_FRAMES
        for e in buf.pop(at):
            seen.append(e.frame_id if isinstance(e, AudioConceal) else e.frame.frame_id)
    for e in buf.pop(1e9):
        seen.append(e.frame_id if isinstance(e, AudioConceal) else e.frame.frame_id)
    assert seen == sorted(set(seen))


def drive_video(buf: VideoJitterBuffer, frames: list[AssembledFrame], end: float) -> list:
    events: list = []
    frames = sorted(frames, key=lambda f: f.completed)
    t = frames[0].completed
    while t < end:
        while frames and frames[0].completed <= t:
            f = frames.pop(0)
            events += buf.push(f, f.completed)
        events += buf.pop(t)
        t += 0.001
    return events


def test_video_waits_for_a_retransmission_then_continues_in_order() -> None:
    buf = VideoJitterBuffer(rtt=0.05)
    frames = [video(i, CLOCK_OFFSET + i / 30, key=(i == 0)) for i in range(10) if i != 4]
    frames.append(video(4, CLOCK_OFFSET + 4 / 30 + 0.08))  # NACKed, back after 80 ms
    events = drive_video(buf, frames, CLOCK_OFFSET + 1)
    assert [e.frame.frame_id for e in events if isinstance(e, VideoOut)] == list(range(10))
    assert not any(isinstance(e, VideoSkipped | KeyframeNeeded) for e in events)


def play_video(buf: VideoJitterBuffer, frames: list[AssembledFrame], end: float) -> list:
    """(release time, VideoOut) of every frame shown, stepping a 1 ms clock."""
    shown = []
    frames = sorted(frames, key=lambda f: f.completed)
    t = frames[0].completed
    while t < end:
        while frames and frames[0].completed <= t:
            f = frames.pop(0)
            buf.push(f, f.completed)
        shown += [(t, e) for e in buf.pop(t) if isinstance(e, VideoOut)]
        t += 0.001
    return shown


def test_video_delay_grows_to_cover_frames_that_needed_two_nack_rounds() -> None:
    """5 % of frames complete 230 ms late (a NACK round failed, the retry came back): the delay
    learns it, so those frames play on time instead of stalling the picture."""
    buf = VideoJitterBuffer(rtt=0.1)
    late = {i for i in range(600) if i % 20 == 7}
    frames = [
        video(i, CLOCK_OFFSET + i / 30 + (0.230 if i in late else 0.0), key=(i == 0))
        for i in range(600)
    ]
    shown = play_video(buf, frames, CLOCK_OFFSET + 21)
    assert [e.frame.frame_id for _, e in shown] == list(range(600))
    assert buf.target_delay >= 0.230
    # After a learning period every frame leaves on time, the late ones included.
    stalled = [e.frame.frame_id for t, e in shown if e.frame.pts > 10 and t > e.playout + 0.002]
    assert stalled == []


def test_video_delay_stays_low_without_loss() -> None:
    buf = VideoJitterBuffer(rtt=0.1)
    frames = [video(i, CLOCK_OFFSET + i / 30, key=(i == 0)) for i in range(600)]
    shown = play_video(buf, frames, CLOCK_OFFSET + 21)
    assert len(shown) == 600
    # Past the start-up caution (RTX_DELAY_HOLD) nothing is late: no NACK budget.
    assert buf.target_delay == VIDEO_MIN_DELAY
    assert all(t - (e.frame.pts + CLOCK_OFFSET) < 0.03 for t, e in shown if e.frame.pts > 15)
    assert RTX_DELAY_HOLD < 15


def test_video_skips_to_the_next_keyframe_after_a_bounded_wait() -> None:
    buf = VideoJitterBuffer(rtt=0.05)
    frames = [video(i, CLOCK_OFFSET + i / 30, key=i in (0, 6)) for i in range(12) if i != 3]
    events = drive_video(buf, frames, CLOCK_OFFSET + 1)
    shown = [e.frame.frame_id for e in events if isinstance(e, VideoOut)]
    assert shown == [0, 1, 2, 6, 7, 8, 9, 10, 11]
    assert VideoSkipped(3, 3) in events
    assert not any(isinstance(e, KeyframeNeeded) for e in events)


def test_video_asks_for_a_keyframe_when_none_is_buffered() -> None:
    buf = VideoJitterBuffer(rtt=0.05)
    frames = [video(i, CLOCK_OFFSET + i / 30, key=i in (0, 20)) for i in range(25) if i != 3]
    events = drive_video(buf, frames, CLOCK_OFFSET + 1.5)
    needed = [i for i, e in enumerate(events) if isinstance(e, KeyframeNeeded)]
    assert len(needed) == 1
    shown = [e.frame.frame_id for e in events if isinstance(e, VideoOut)]
    assert shown == [0, 1, 2, 20, 21, 22, 23, 24]
    assert buf.waiting_for_keyframe is False


def test_video_starting_without_a_keyframe_waits_then_asks_for_one() -> None:
    buf = VideoJitterBuffer(rtt=0.05)
    t = CLOCK_OFFSET
    assert buf.push(video(5, t), t) == []
    assert buf.push(video(6, t + 0.03), t + 0.03) == []
    assert buf.pop(t + 0.1) == []  # the keyframe may just be late (NACK at work)
    assert buf.next_timeout() == pytest.approx(t + buf.max_wait)
    assert buf.pop(t + buf.max_wait) == [KeyframeNeeded()]
    assert buf.pop(t + 1) == []  # asked once; PliController repeats it
    assert buf.push(video(7, t + 1, key=True), t + 1) == []
    assert [e.frame.frame_id for e in buf.pop(t + 2)] == [7]


def test_a_late_starting_keyframe_still_starts_the_stream() -> None:
    buf = VideoJitterBuffer(rtt=0.05)
    t = CLOCK_OFFSET
    buf.push(video(1, t), t)
    buf.push(video(2, t + 0.03), t + 0.03)
    buf.push(video(0, t + 0.1, key=True), t + 0.1)  # retransmitted keyframe
    assert [e.frame.frame_id for e in buf.pop(t + 1)] == [0, 1, 2]


def test_lip_sync_gives_both_streams_the_larger_offset() -> None:
    clock = PlayoutClock()
    abuf, vbuf = AudioJitterBuffer(clock), VideoJitterBuffer(clock)
    # audio arrives 30 ms after capture, video 150 ms (encode + more packets)
    for i in range(20):
        t = CLOCK_OFFSET + i * 0.02
        abuf.push(audio(i, t + 0.03), t + 0.03)
    for i in range(10):
        t = CLOCK_OFFSET + i / 30
        vbuf.push(video(i, t + 0.15, key=i == 0), t + 0.15)
    a_offset, v_offset = clock.offset(StreamId.AUDIO), clock.offset(StreamId.VIDEO)
    assert a_offset == v_offset
    assert v_offset == pytest.approx(CLOCK_OFFSET + 0.15 + vbuf._timing.delay)
    # a frame captured at the same instant plays at the same instant in both streams
    assert abuf._timing.playout(0.2) == vbuf._timing.playout(0.2)


def test_lip_sync_never_delays_a_stream_beyond_the_cap() -> None:
    clock = PlayoutClock()
    clock.propose(StreamId.AUDIO, 0.05)
    clock.propose(StreamId.VIDEO, 3.0)
    assert clock.offset(StreamId.AUDIO) == pytest.approx(0.05 + MAX_SYNC_DELAY)
    assert clock.offset(StreamId.VIDEO) == 3.0


FRAME_IDS = st.integers(0, 2**32 - 1) | st.integers(0, 40)


@given(
    st.lists(
        st.tuples(FRAME_IDS, st.booleans(), st.floats(-1e6, 1e6), st.floats(0, 3)),
        max_size=150,
    )
)
def test_video_buffer_survives_hostile_frames(items: list) -> None:
    buf = VideoJitterBuffer(rtt=0.05)
    shown: list[int] = []
    for fid, key, pts, at in sorted(items, key=lambda i: i[3]):
        frame = AssembledFrame(StreamId.VIDEO, fid, pts, key, b"v", 0, at, at)
        buf.push(frame, at)
        assert len(buf._frames) <= MAX_VIDEO_FRAMES
        shown += [e.frame.frame_id for e in buf.pop(at) if isinstance(e, VideoOut)]
    shown += [e.frame.frame_id for e in buf.pop(1e9) if isinstance(e, VideoOut)]
    assert shown == sorted(set(shown))
