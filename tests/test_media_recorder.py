"""Recorder: packets go into WebM unchanged, and a SIGKILLed recording is still readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import pytest

from media.codecs import AudioEncoder, VideoEncoder
from media.recorder import Recorder, RecorderError, TrackSpec
from media.sources import TestPatternSource, ToneSource, read_stamp

TRACKS = [
    TrackSpec("local-video", "video", "vp8", 320, 240),
    TrackSpec("local-audio", "audio", "opus"),
    TrackSpec("remote-video", "video", "vp8", 320, 240),
    TrackSpec("remote-audio", "audio", "opus"),
]


def _count(path: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.size:
                counts[packet.stream.index] = counts.get(packet.stream.index, 0) + 1
    return counts


def test_records_all_tracks_without_reencoding(tmp_path: Path) -> None:
    path = tmp_path / "call.webm"
    src, tone = TestPatternSource(320, 240), ToneSource()
    venc, aenc = VideoEncoder("vp8", 320, 240), AudioEncoder()
    sent = []
    with Recorder(path, TRACKS) as rec:
        for i in range(30):
            t = 1000.0 + i / 30
            (ef,) = venc.encode(src.next_frame(t))
            sent.append(ef.data)
            rec.write("local-video", ef.data, t, ef.keyframe)
            rec.write("remote-video", ef.data, t + 0.05, ef.keyframe)
            for _ in range(2):
                (af,) = aenc.encode(tone.next_frame(t))
                rec.write("local-audio", af.data, t, True)
                rec.write("remote-audio", af.data, t + 0.01, True)
    assert _count(path) == {0: 30, 1: 60, 2: 30, 3: 60}
    with av.open(str(path)) as container:
        got = [bytes(p) for p in container.demux(video=0) if p.size]
        assert got == sent  # byte-identical: no re-encode
    with av.open(str(path)) as container:
        stamps = [read_stamp(f).counter for f in container.decode(video=1)]
        assert stamps == list(range(30))


@pytest.mark.parametrize("codec", ["h264", "av1"])
def test_records_h264_and_av1(tmp_path: Path, codec: str) -> None:
    path = tmp_path / f"{codec}.mkv"
    src, enc = TestPatternSource(), VideoEncoder(codec)
    with Recorder(path, [TrackSpec("v", "video", codec), TrackSpec("a", "audio", "opus")]) as rec:
        for i in range(15):
            (ef,) = enc.encode(src.next_frame(i / 30), force_keyframe=i == 10)
            rec.write("v", ef.data, i / 30, ef.keyframe)
    with av.open(str(path)) as container:
        stamps = [read_stamp(f).counter for f in container.decode(video=0)]
    assert stamps == list(range(15))


def test_timestamps_monotonic_and_video_waits_for_keyframe(tmp_path: Path) -> None:
    path = tmp_path / "odd.webm"
    src = TestPatternSource(320, 240)
    venc = VideoEncoder("vp8", 320, 240)
    frames = [venc.encode(src.next_frame(i / 30))[0] for i in range(5)]
    with Recorder(path, TRACKS[:1]) as rec:
        rec.write("local-video", frames[1].data, 10.0, False)  # before any keyframe: dropped
        rec.write("local-video", frames[0].data, 10.0, True)
        rec.write("local-video", frames[1].data, 9.0, False)  # clock went back
        rec.write("local-video", frames[2].data, 9.0, False)  # and stayed
        rec.write("local-video", frames[3].data, 10.5, False)
        assert rec.frames_written == {"local-video": 4}
    with av.open(str(path)) as container:
        pts = [p.pts for p in container.demux(video=0) if p.size]
    assert pts == sorted(set(pts)) and len(pts) == 4
    assert pts[-1] == 500


def test_bad_use_is_typed(tmp_path: Path) -> None:
    with pytest.raises(RecorderError, match="at least one"):
        Recorder(tmp_path / "a.webm", [])
    with pytest.raises(RecorderError, match="cannot record"):
        Recorder(tmp_path / "a.webm", [TrackSpec("v", "video", "vp9")])
    with pytest.raises(RecorderError, match="unique"):
        Recorder(tmp_path / "a.webm", [TRACKS[0], TRACKS[0]])
    with pytest.raises(RecorderError, match="cannot create"):
        Recorder(tmp_path / "no" / "such" / "dir.webm", TRACKS)
    rec = Recorder(tmp_path / "b.webm", TRACKS)
    with pytest.raises(RecorderError, match="unknown track"):
        rec.write("nope", b"x", 0.0, True)
    rec.close()
    with pytest.raises(RecorderError, match="closed"):
        rec.write("local-audio", b"x", 0.0, True)


_CHILD = textwrap.dedent(
    """
    import sys, time
    from media.codecs import AudioEncoder, VideoEncoder
    from media.recorder import Recorder, TrackSpec
    from media.sources import TestPatternSource, ToneSource
    rec = Recorder(sys.argv[1], [TrackSpec("v", "video", "vp8", 320, 240),
                                 TrackSpec("a", "audio", "opus")])
    src, tone = TestPatternSource(320, 240), ToneSource()
    venc, aenc = VideoEncoder("vp8", 320, 240), AudioEncoder()
    # Media time runs 30 fps regardless of wall time, so the count is exact.
    for i in range(100000):
        t = i / 30
        (ef,) = venc.encode(src.next_frame(t))
        rec.write("v", ef.data, t, ef.keyframe)
        for _ in range(2):
            (af,) = aenc.encode(tone.next_frame(t))
            rec.write("a", af.data, t, True)
        print(i, flush=True)
        time.sleep(0.005)
    """
)


def test_sigkill_leaves_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.webm"
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert child.stdout is not None
    written = -1
    deadline = time.monotonic() + 20  # bounded: the child writes ~100 frames/s
    while written < 90 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        written = int(line)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert written >= 90, "child did not record"
    counts = _count(path)
    # Everything older than one cluster (0.5 s = 15 frames) before the kill must be there.
    assert counts[0] >= written + 1 - 16
    assert counts[1] >= 2 * (written + 1 - 16)
    with av.open(str(path)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert decoded == counts[0]
