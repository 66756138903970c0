"""Codecs: one frame in, one packet out; keyframes on demand; bad input is a typed error."""

from __future__ import annotations

import contextlib
import threading

import av
import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from media.codecs import (
    AudioDecoder,
    AudioEncoder,
    AudioParams,
    CodecParamsError,
    CodecWorker,
    DecodeError,
    EncodeError,
    VideoDecoder,
    VideoEncoder,
    VideoParams,
)
from media.sources import AUDIO_FRAME_SAMPLES, TestPatternSource, ToneSource, read_stamp


@pytest.mark.parametrize("codec", ["vp8", "h264", "av1"])
def test_video_roundtrip_low_delay_and_forced_keyframe(codec: str) -> None:
    # 640x480: at 320x240 SVT-AV1 quantises every other frame so coarsely the stamp is lost.
    src = TestPatternSource(640, 480)
    enc, dec = VideoEncoder(codec, 640, 480, 30, 400_000), VideoDecoder(codec)
    keys = []
    for i in range(20):
        out = enc.encode(src.next_frame(i / 30), force_keyframe=i == 12)
        assert len(out) == 1, "real-time encoders must not hold frames back"
        keys.append(out[0].keyframe)
        frames = dec.decode(out[0].data)
        assert len(frames) == 1
        assert read_stamp(frames[0]).counter == i
    assert [i for i, k in enumerate(keys) if k] == [0, 12]


def test_set_bitrate_reopens_with_keyframe_and_hysteresis() -> None:
    src = TestPatternSource(320, 240)
    enc, dec = VideoEncoder("vp8", 320, 240, 30, 50_000), VideoDecoder("vp8")
    sizes_low, sizes_high = [], []
    for i in range(60):
        if i == 30:
            assert enc.set_bitrate(1_000_000) is True
            assert enc.set_bitrate(1_050_000) is False  # within hysteresis
        (ef,) = enc.encode(src.next_frame(i / 30))
        assert ef.keyframe == (i in (0, 30))
        (sizes_low if i < 30 else sizes_high).append(len(ef.data))
        assert read_stamp(dec.decode(ef.data)[0]).counter == i
    assert sum(sizes_high[1:]) > 2 * sum(sizes_low[1:])
    assert enc.reopen_count == 1


def test_resolution_change_scales_input() -> None:
    src = TestPatternSource(640, 480)
    enc, dec = VideoEncoder("vp8", 640, 480), VideoDecoder("vp8")
    enc.set_resolution(320, 240)
    enc.set_fps(15)
    (ef,) = enc.encode(src.next_frame(0.0))
    (frame,) = dec.decode(ef.data)
    assert (frame.width, frame.height) == (320, 240)
    assert ef.keyframe
    assert enc.params == VideoParams("vp8", 320, 240, 15, 500_000)


def test_pts_kept_increasing() -> None:
    src = TestPatternSource(320, 240)
    enc = VideoEncoder("vp8", 320, 240)
    a = enc.encode(src.next_frame(1.0))[0].pts
    b = enc.encode(src.next_frame(1.0))[0].pts  # same clock reading twice
    assert b > a


def test_decoder_survives_garbage_and_recovers() -> None:
    src = TestPatternSource(320, 240)
    enc, dec = VideoEncoder("vp8", 320, 240), VideoDecoder("vp8")
    (first,) = enc.encode(src.next_frame(0.0))
    dec.decode(first.data)
    with pytest.raises(DecodeError):
        dec.decode(b"\x00garbage" * 10)
    assert dec.needs_keyframe
    with pytest.raises(DecodeError, match="empty"):
        dec.decode(b"")
    (key,) = enc.encode(src.next_frame(0.1), force_keyframe=True)
    assert read_stamp(dec.decode(key.data)[0]).counter == 1
    assert not dec.needs_keyframe


def test_decoder_survives_missing_frames() -> None:
    src = TestPatternSource(320, 240)
    enc, dec = VideoEncoder("vp8", 320, 240), VideoDecoder("vp8")
    decoded = 0
    for i in range(20):
        (ef,) = enc.encode(src.next_frame(i / 30), force_keyframe=i == 15)
        if i in (5, 6, 11):
            continue  # lost in the network: later delta frames decode with artefacts
        frames = dec.decode(ef.data)
        decoded += len(frames)
        if i == 15:  # the keyframe the receiver asked for: clean picture again
            assert read_stamp(frames[0]).counter == 15
    assert decoded == 17


_ENCODED: dict[str, list[bytes]] = {}


def _encoded(codec: str) -> list[bytes]:
    """A keyframe and a delta frame per codec, made once for the fuzz tests below."""
    if codec not in _ENCODED:
        src = TestPatternSource(320, 240) if codec != "av1" else TestPatternSource()
        enc = VideoEncoder(codec, src.width, src.height)
        _ENCODED[codec] = [enc.encode(src.next_frame(i / 30))[0].data for i in range(2)]
    return _ENCODED[codec]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["vp8", "h264", "av1"]),
    st.integers(0, 1),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=20),
)
def test_video_decoder_corrupt_frames_are_typed(
    codec: str, which: int, flips: list[tuple[int, int]]
) -> None:
    """Real frames with bytes overwritten: either a frame or DecodeError, never a crash."""
    data = bytearray(_encoded(codec)[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    dec = VideoDecoder(codec)
    with contextlib.suppress(DecodeError):
        dec.decode(_encoded(codec)[0])
        dec.decode(bytes(data))
    # The decoder is still usable: a keyframe decodes.
    assert len(dec.decode(_encoded(codec)[0])) <= 1


@pytest.mark.parametrize("codec", ["vp8", "h264", "av1"])
def test_the_keyframe_after_a_corrupt_frame_decodes(codec: str) -> None:
    """CI found it (av1, first byte of the delta frame set to 30): dav1d reported the corrupt
    frame's error on the next packet, so the keyframe a PLI brought was lost as well."""
    key, delta = _encoded(codec)
    dec = VideoDecoder(codec)
    assert len(dec.decode(key)) == 1
    with contextlib.suppress(DecodeError):
        dec.decode(bytes([30]) + delta[1:])
    assert len(dec.decode(key)) == 1
    assert not dec.needs_keyframe


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=2000), st.sampled_from(["vp8", "h264", "av1"]))
def test_video_decoder_garbage_is_typed(data: bytes, codec: str) -> None:
    dec = VideoDecoder(codec)
    try:
        frames = dec.decode(data)
    except DecodeError:
        return
    assert all(isinstance(f, av.VideoFrame) for f in frames)


def test_params_roundtrip() -> None:
    vp = VideoParams("av1", 1280, 720, 25, 1_500_000)
    assert VideoParams.from_dict(vp.to_dict()) == vp
    ap = AudioParams(bitrate=24_000, fec=False, packet_loss_pct=3)
    assert AudioParams.from_dict(ap.to_dict()) == ap
    with pytest.raises(CodecParamsError):
        VideoParams("mpeg2")
    with pytest.raises(CodecParamsError, match="even"):
        VideoParams.from_dict({**vp.to_dict(), "width": 641})


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["codec", "width", "height", "fps", "bitrate", "x"]),
        st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=5), st.none(), st.booleans()),
    )
    | st.none()
    | st.integers()
)
def test_video_params_bad_input_is_typed(d: object) -> None:
    try:
        p = VideoParams.from_dict(d)
    except CodecParamsError:
        return
    assert VideoParams.from_dict(p.to_dict()) == p


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            k: st.one_of(st.integers(-10, 600_000), st.booleans(), st.text(max_size=4))
            for k in ("codec", "bitrate", "fec", "packet_loss_pct", "sample_rate", "channels")
        },
    )
)
def test_audio_params_bad_input_is_typed(d: dict) -> None:
    try:
        p = AudioParams.from_dict(d)
    except CodecParamsError:
        return
    assert AudioParams.from_dict(p.to_dict()) == p


def test_opus_roundtrip_and_plc() -> None:
    tone, enc, dec = ToneSource(440.0), AudioEncoder(), AudioDecoder()
    packets = [ef for _ in range(10) for ef in enc.encode(tone.next_frame(0.0))]
    assert len(packets) == 10
    assert [p.pts for p in packets] == [i * AUDIO_FRAME_SAMPLES for i in range(10)]
    for p in packets[:5]:
        (frame,) = dec.decode(p.data)
        assert frame.samples == AUDIO_FRAME_SAMPLES
    # Packet 5 lost: PLC gives 20 ms of non-silent audio and the decoder carries on.
    (concealed,) = dec.conceal()
    assert concealed.samples == AUDIO_FRAME_SAMPLES
    assert np.abs(concealed.to_ndarray()).max() > 1000
    for p in packets[6:]:
        assert dec.decode(p.data)[0].samples == AUDIO_FRAME_SAMPLES


def test_opus_plc_before_any_packet() -> None:
    (frame,) = AudioDecoder().conceal()
    assert frame.samples == AUDIO_FRAME_SAMPLES


def test_opus_settings_and_bad_frames() -> None:
    enc = AudioEncoder(AudioParams(bitrate=16_000, packet_loss_pct=0))
    enc.set_bitrate(48_000)
    enc.set_packet_loss(25)
    assert enc.params.bitrate == 48_000 and enc.params.packet_loss_pct == 25
    assert len(enc.encode(ToneSource().next_frame(0.0))) == 1
    short = av.AudioFrame.from_ndarray(np.zeros((1, 100), np.int16), format="s16", layout="mono")
    short.sample_rate = 48_000
    with pytest.raises(EncodeError, match="960"):
        enc.encode(short)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=1500))
def test_opus_decoder_garbage_is_typed(data: bytes) -> None:
    dec = AudioDecoder()
    with contextlib.suppress(DecodeError):
        dec.decode(data)
    assert dec.conceal()[0].samples == AUDIO_FRAME_SAMPLES  # still usable, always 20 ms


@pytest.mark.parametrize("toc", range(256))
def test_plc_is_20ms_after_any_mode(toc: int) -> None:
    dec = AudioDecoder()
    with contextlib.suppress(DecodeError):
        dec.decode(bytes([toc]))  # a TOC-only packet of every configuration
    assert dec.conceal()[0].samples == AUDIO_FRAME_SAMPLES


async def test_codec_worker_runs_off_loop() -> None:
    src = TestPatternSource(320, 240)
    enc = VideoEncoder("vp8", 320, 240)
    limiter = trio.CapacityLimiter(1)
    worker = CodecWorker(limiter)
    results: list[int] = []

    async def one(i: int) -> None:
        out = await worker.run(enc.encode, src.next_frame(i / 30))
        results.append(len(out))

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
    assert results == [1] * 6
    assert limiter.borrowed_tokens == 0


async def test_codec_worker_default_limiter_and_errors() -> None:
    worker = CodecWorker()
    with pytest.raises(DecodeError):
        await worker.run(VideoDecoder("vp8").decode, b"")
    assert await worker.run(lambda: 7) == 7


async def test_codec_worker_keeps_trio_loop_running() -> None:
    """A codec call blocked in its thread still lets trio tasks run (here: the one freeing it)."""
    released = threading.Event()

    def blocking_codec_call() -> bool:
        return released.wait(timeout=10)

    async def release() -> None:
        await trio.sleep(0)
        released.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release)
        assert await CodecWorker().run(blocking_codec_call) is True
