"""The media pipelines end to end over an in-memory PeerSession pair (real codecs, real clock).

Calls are short and small (320x240) so the file stays well inside its time budget; assertions are
about counts and order, never about how long something took.
"""

from __future__ import annotations

import random
from pathlib import Path

import av
import pytest
import trio
import trio.testing

from media.callstate import CallParams
from media.pipeline import (
    TRACK_LOCAL_VIDEO,
    TRACK_REMOTE_AUDIO,
    TRACK_REMOTE_VIDEO,
    MediaOptions,
    MediaPipeline,
    PipelineError,
    open_recorder,
    open_sources,
)
from media.session_api import PeerSession
from media.wiremedia import FeedbackPacket, Flags, MediaPacket, NackPacket, PliPacket, StreamId
from tests.media_link import pump, session_pair, start_virtual_call

# How long receivers keep running after senders stop, so frames in flight are played out.
DRAIN = 0.6


PARAMS = CallParams("vp8", 320, 240, 15)
OPTIONS = MediaOptions(width=320, height=240, fps=15)


async def run_call(
    seconds: float,
    *,
    link: dict[str, float] | None = None,
    record_a: Path | None = None,
    params: CallParams = PARAMS,
) -> tuple[MediaPipeline, MediaPipeline]:
    a, b = session_pair(**(link or {}))
    recorder = None
    if record_a is not None:
        recorder = open_recorder(str(record_a), params, local_video=True, local_audio=True)
    pa = MediaPipeline(a, params, open_sources(OPTIONS), recorder=recorder)
    pb = MediaPipeline(b, params, open_sources(OPTIONS))
    async with trio.open_nursery() as nursery:
        for s, p in ((a, pa), (b, pb)):
            nursery.start_soon(p.run)
            nursery.start_soon(pump, s, p)
        await trio.sleep(seconds)
        pa.stop_sending()
        pb.stop_sending()
        await trio.sleep(DRAIN)
        nursery.cancel_scope.cancel()
    return pa, pb


def test_fake_session_satisfies_the_protocol() -> None:
    a, _ = session_pair()
    assert isinstance(a, PeerSession)


async def test_round_trip_frames_in_order_and_audio_complete() -> None:
    pa, pb = await run_call(2.5)
    for sender, receiver in ((pa, pb), (pb, pa)):
        sink = receiver.video_sink
        assert sender.video_frames_sent >= 20
        # Every frame arrived, decoded, carried a readable stamp, and in capture order.
        assert sink.counters == list(range(sender.video_frames_sent))
        assert sink.stamp_errors == 0
        assert len(sink.latencies) == len(sink.counters)
        # Audio: every 20 ms frame sent was played (none concealed on a lossless link).
        assert receiver.audio_sink.frames == sender.audio_frames_sent
        assert receiver.audio_sink.concealed == 0
        assert receiver.audio_sink.seconds == pytest.approx(sender.audio_frames_sent * 0.020)
        snap = receiver.snapshot()
        assert snap["codec"] == "vp8"
        assert snap["path"] == "direct"
        assert snap["counters"]["nack_recovered"] == 0


async def test_loss_and_jitter_are_repaired_by_nack_or_concealed_by_plc() -> None:
    pa, pb = await run_call(3.5, link={"loss": 0.10, "delay": 0.010, "jitter": 0.020})
    for sender, receiver in ((pa, pb), (pb, pa)):
        counters = receiver.snapshot()["counters"]
        assert counters["nack_recovered"] > 0
        # Lost audio came back by NACK (the playout delay covers a round trip once loss shows)
        # or, when too late, was concealed.
        assert receiver.nack[StreamId.AUDIO].recovered + counters["plc_concealed"] > 0
        assert counters["fec_recovered"] == 0  # FFmpeg's libopus decoder cannot do FEC
        assert sender.rtx.retransmitted > 0
        # The call kept going: most video made it, in order, and audio played on time.
        got = receiver.video_sink.counters
        assert got == sorted(got)
        assert len(got) >= 0.6 * sender.video_frames_sent
        assert receiver.audio_sink.frames >= 0.9 * sender.audio_frames_sent


async def test_recording_holds_both_directions(tmp_path: Path) -> None:
    path = tmp_path / "call.webm"
    pa, pb = await run_call(2.5, record_a=path)
    assert pa.recorder_error is None
    counts: dict[str, int] = {}
    with av.open(str(path)) as container:
        names = [s.metadata.get("title") or str(s.index) for s in container.streams]
        for packet in container.demux():
            if packet.size:
                key = f"{packet.stream.type}{packet.stream.index}"
                counts[key] = counts.get(key, 0) + 1
    assert pa.recorder is not None
    written = pa.recorder.frames_written
    assert written[TRACK_REMOTE_VIDEO] >= 0.95 * pb.video_frames_sent
    assert written[TRACK_LOCAL_VIDEO] >= 0.95 * pa.video_frames_sent
    assert written[TRACK_REMOTE_AUDIO] >= 0.95 * pb.audio_frames_sent
    # What PyAV reads back from the file matches what was written, track by track.
    assert sorted(counts.values()) == sorted(written.values()), names


def test_bad_source_specs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no camera"):
        open_sources(MediaOptions(video="/dev/video99", audio="none"))
    with pytest.raises(PipelineError, match="cannot open media file"):
        open_sources(MediaOptions(video=str(tmp_path / "missing.mkv"), audio="none"))
    with pytest.raises(PipelineError, match="codec"):
        MediaOptions(codec="mpeg2")
    with pytest.raises(PipelineError, match="width"):
        MediaOptions(width=321)


async def test_hostile_datagrams_are_dropped_never_raised() -> None:
    """Random and structurally valid-but-absurd packets from the peer: no exception escapes."""
    a, _ = session_pair()
    p = MediaPipeline(a, PARAMS)
    rng = random.Random(7)
    kinds = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 1300))),
        lambda: MediaPacket(
            stream=rng.choice(list(StreamId)),
            seq=rng.randrange(1 << 16),
            timestamp=rng.randrange(1 << 32),
            frame_id=rng.randrange(1 << 32),
            frag_index=0,
            frag_count=rng.randrange(1, 4),
            payload=bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 50))),
            flags=Flags(rng.randrange(8)),
            transport_seq=rng.randrange(1 << 16),
        ).encode(),
        lambda: FeedbackPacket(
            rng.randrange(256),
            rng.randrange(1 << 16),
            rng.randrange(1 << 32),
            rng.randrange(1 << 16),
            (*(rng.randrange(-0x8000, 0x8000) for _ in range(rng.randrange(0, 20))), 1),
        ).encode(),
        lambda: NackPacket(
            rng.choice(list(StreamId)), tuple(rng.randrange(1 << 16) for _ in range(5))
        ).encode(),
        lambda: PliPacket().encode(),
    ]
    now = trio.current_time()
    for _ in range(3000):
        now += rng.random() * 0.01
        p.handle_datagram(rng.choice(kinds)(), now)
        p._service(now)
    assert p.wire_errors > 0


async def test_ten_percent_loss_keeps_the_frame_rate_and_doubles_repairs(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A call over a 10 % loss, 50 ms link in virtual time (codec time is free, runs repeat):
    the random loss is not taken for congestion, NACKs and their answers go twice, and the video
    delay grows past one NACK round so that repaired frames still play in order."""
    seconds = 20.0
    a, b = session_pair(seed=3, loss=0.10, delay=0.050)
    pipes = [
        MediaPipeline(s, PARAMS, open_sources(OPTIONS), stamp_clock=trio.current_time)
        for s in (a, b)
    ]
    async with trio.open_nursery() as nursery:
        await start_virtual_call(nursery, (a, b), pipes, mock_clock)
        await trio.sleep(seconds)
        for p in pipes:
            p.stop_sending()
        await trio.sleep(DRAIN)
        nursery.cancel_scope.cancel()
    for sender, receiver in ((pipes[0], pipes[1]), (pipes[1], pipes[0])):
        assert sender.rc.call_loss > 0.05
        # Not stepped down for random loss: (nearly) every frame of the call was sent. The rung
        # at one instant is not asserted: smoothed loss near 10 % may briefly cross the ladder.
        assert sender.video_frames_sent >= 0.85 * seconds * PARAMS.fps, sender.video_frames_sent
        assert sender.rc.target_bitrate >= 0.8 * sender.rc.max_bitrate
        assert receiver.nack[StreamId.VIDEO].copies == 2
        assert sender.rtx.suppressed > 0  # the second copy of a NACK, crossing our answer
        # The delay covers a NACK round trip (100 ms) and the retransmission's own loss.
        assert receiver.vbuf.target_delay > 0.100
        got = receiver.video_sink.counters
        assert got == sorted(got)
        assert len(got) >= 0.95 * sender.video_frames_sent
