"""Sources: the stamp survives VP8, the tone has its frequency, files loop, devices fail clearly."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.codecs import AudioDecoder, AudioEncoder, VideoDecoder, VideoEncoder
from media.sources import (
    AUDIO_FRAME_SAMPLES,
    AUDIO_RATE,
    VIDEO_CLOCK_RATE,
    CameraSource,
    FileSource,
    MicrophoneSource,
    SourceError,
    StampError,
    TestPatternSource,
    ToneSource,
    dominant_frequency,
    read_stamp,
)


def test_pattern_stamp_reads_back_raw() -> None:
    src = TestPatternSource()
    for i in range(5):
        frame = src.next_frame(1000.0 + i / 30)
        assert (frame.width, frame.height, frame.format.name) == (640, 480, "yuv420p")
        stamp = read_stamp(frame)
        assert stamp.counter == i
        assert stamp.send_time_ms == round((1000.0 + i / 30) * 1000)
        assert frame.pts == round(i / 30 * VIDEO_CLOCK_RATE)


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1e9), st.floats(-3600, 3600))
def test_send_time_unwraps_against_receiver_clock(sent: float, latency: float) -> None:
    frame = TestPatternSource(160, 120).next_frame(sent)
    assert read_stamp(frame).send_time(sent + latency) == pytest.approx(round(sent * 1000) / 1000)


def test_pattern_moves() -> None:
    src = TestPatternSource(320, 240)
    a = src.next_frame(0.0).to_ndarray()
    b = src.next_frame(0.5).to_ndarray()
    assert np.mean(a[100:] != b[100:]) > 0.3


def test_stamp_survives_vp8_at_300_kbps() -> None:
    src = TestPatternSource()
    enc, dec = VideoEncoder("vp8", bitrate=300_000), VideoDecoder("vp8")
    read = 0
    frames = 60
    for i in range(frames):
        for ef in enc.encode(src.next_frame(5.0 + i / 30)):
            for decoded in dec.decode(ef.data):
                stamp = read_stamp(decoded)
                assert stamp.counter == i
                read += 1
    assert read == frames


@pytest.mark.parametrize("size", [(160, 120), (320, 240), (1280, 720), (642, 362)])
def test_pattern_any_size(size: tuple[int, int]) -> None:
    src = TestPatternSource(*size, fps=15)
    frame = src.next_frame(0.0)
    assert (frame.width, frame.height) == size
    assert read_stamp(frame).counter == 0


def test_pattern_too_small_is_clear() -> None:
    with pytest.raises(SourceError, match="too small"):
        TestPatternSource(64, 48)
    with pytest.raises(SourceError, match="even"):
        TestPatternSource(641, 480)


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=0, max_size=160 * 120 * 3 // 2))
def test_read_stamp_rejects_garbage(data: bytes) -> None:
    plane = np.frombuffer(data.ljust(160 * 120 * 3 // 2, b"\x00"), np.uint8).reshape(180, 160)
    frame = av.VideoFrame.from_ndarray(plane.copy(), format="yuv420p")
    try:
        stamp = read_stamp(frame)
    except StampError:
        return
    assert 0 <= stamp.counter < 2**32  # a CRC-16 collision is possible, never a crash


def test_tone_frequency_and_counter() -> None:
    tone = ToneSource(1000.0)
    frames = [tone.next_frame(0.0) for _ in range(10)]
    assert [f.pts for f in frames] == [i * AUDIO_FRAME_SAMPLES for i in range(10)]
    assert all(f.samples == AUDIO_FRAME_SAMPLES and f.sample_rate == AUDIO_RATE for f in frames)
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    assert abs(dominant_frequency(pcm) - 1000.0) < 10


def test_tone_survives_opus() -> None:
    tone, enc, dec = ToneSource(440.0), AudioEncoder(), AudioDecoder()
    out = []
    for _ in range(25):
        for ef in enc.encode(tone.next_frame(0.0)):
            out.extend(f.to_ndarray().reshape(-1) for f in dec.decode(ef.data))
    pcm = np.concatenate(out)[AUDIO_FRAME_SAMPLES * 5 :]
    assert abs(dominant_frequency(pcm) - 440.0) < 10


def test_bad_tone_parameters() -> None:
    with pytest.raises(SourceError):
        ToneSource(30_000)
    with pytest.raises(SourceError):
        ToneSource(440, amplitude=2)


def _make_clip(path: Path, seconds: float = 0.5, fps: int = 10) -> None:
    """A short VP8+Opus WebM at 44.1 kHz stereo, so the source must resample and scale."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libvpx", rate=fps)
        vs.width, vs.height, vs.pix_fmt = 320, 240, "yuv420p"
        aus = out.add_stream("libopus", rate=48000)
        aus.layout = "stereo"
        src = TestPatternSource(320, 240, fps)
        for i in range(int(seconds * fps)):
            frame = src.next_frame(i / fps)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(vs.encode(frame))
        n = int(seconds * 44100)
        t = np.arange(n) / 44100
        pcm = (np.sin(2 * np.pi * 600 * t) * 8000).astype(np.int16)
        stereo = np.repeat(pcm[None, :], 2, axis=0).T.reshape(1, -1).copy()
        frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
        frame.sample_rate = 44100
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=48000, frame_size=960)
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            out.mux(aus.encode(chunk))
        out.mux(vs.encode(None))
        out.mux(aus.encode(None))


def test_file_source_loops_and_converts(tmp_path: Path) -> None:
    clip = tmp_path / "clip.webm"
    _make_clip(clip)
    src = FileSource(clip, 160, 120)
    seen = set()
    for i in range(40):  # 1.33 s of caller time over a 0.5 s clip: loops twice
        frame = src.next_video_frame(i / 30)
        assert (frame.width, frame.height, frame.format.name) == (160, 120, "yuv420p")
        seen.add(read_stamp(frame.reformat(width=320, height=240)).counter)
    assert seen == set(range(5))
    audio = [src.next_audio_frame(0.0) for _ in range(60)]  # 1.2 s: loops past the end
    assert all(f.samples == AUDIO_FRAME_SAMPLES and f.sample_rate == AUDIO_RATE for f in audio)
    assert audio[-1].pts == 59 * AUDIO_FRAME_SAMPLES
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in audio[2:20]])
    assert abs(dominant_frequency(pcm) - 600.0) < 15
    src.close()


def test_file_source_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot open media file"):
        FileSource(tmp_path / "nope.mkv")
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(b"not a video" * 100)
    with pytest.raises(SourceError):
        FileSource(junk)


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=0, max_size=4096), st.integers(0, 3000))
def test_file_source_garbage_is_typed(tmp_path_factory, data: bytes, cut: int) -> None:
    """Random bytes, or a real clip cut short: a typed error or frames, never a crash."""
    folder = tmp_path_factory.mktemp("junk")
    clip = folder / "clip.webm"
    _make_clip(clip, seconds=0.2)
    path = folder / "junk.webm"
    path.write_bytes(clip.read_bytes()[:cut] + data if cut else data)
    try:
        src = FileSource(path, 160, 120)
        if src.has_video:
            src.next_video_frame(0.0)
        if src.has_audio:
            src.next_audio_frame(0.0)
        src.close()
    except SourceError:
        pass


def test_camera_absent_is_clear() -> None:
    with pytest.raises(SourceError, match="no camera at /dev/video-absent-3bc"):
        CameraSource("/dev/video-absent-3bc")
    with pytest.raises(SourceError, match="no camera at /dev/null"):
        CameraSource("/dev/null")


def test_microphone_absent_is_clear() -> None:
    with pytest.raises(SourceError, match="no microphone"):
        MicrophoneSource("hw:99,0", backend="alsa")
    with pytest.raises(SourceError, match="backend"):
        MicrophoneSource(backend="oss")
