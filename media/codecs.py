"""Video and audio codecs over PyAV, tuned for one-frame-in, one-packet-out real-time calls.

What was measured on PyAV 18 / FFmpeg 8 (see tests/test_media_codecs.py):
- libvpx ignores ``bit_rate`` changed on an open context, so ``set_bitrate`` reopens the encoder,
  and a reopened encoder starts with a keyframe. Small changes (< ``BITRATE_HYSTERESIS``) are
  ignored to avoid keyframe bursts.
- libsvtav1 gives zero frame lag only with ``svtav1-params rc=2:pred-struct=1`` (CBR, low delay).
- FFmpeg's libopus decoder never asks libopus for in-band FEC (decode_fec is always 0), so a lost
  packet is concealed by PLC: decoding a one-byte TOC-only packet makes libopus conceal one frame.
  An empty packet must never be sent: FFmpeg reads it as end-of-stream and the decoder goes EOF.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, TypeVar

import av
import trio

from media.sources import (
    AUDIO_FRAME_MS,
    AUDIO_FRAME_SAMPLES,
    AUDIO_RATE,
    AUDIO_TIME_BASE,
    VIDEO_TIME_BASE,
)

VIDEO_CODECS = ("vp8", "h264", "av1")
AUDIO_CODECS = ("opus",)
# FFmpeg encoder and decoder per codec. VP8 is the default (libx264 is GPL). FFmpeg's own av1
# decoder needs a hardware accelerator, so AV1 decodes with dav1d.
_VIDEO_ENCODERS = {"vp8": "libvpx", "h264": "libx264", "av1": "libsvtav1"}
_VIDEO_DECODERS = {"vp8": "vp8", "h264": "h264", "av1": "libdav1d"}
VIDEO_ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    # realtime + cpu-used 16: in realtime mode libvpx's VP8 picks its speed step per frame so that
    # encoding takes at most (16 - cpu-used)/16 of the frame interval; 16 asks for its fastest
    # steps. Measured 640x480 test pattern at 450 kb/s: cpu-used 8 ≈ 3.6-4.1 ms/frame, 16 ≈
    # 1.7-2.1 ms/frame, same size, and decoding the result is cheaper too (0.7 vs 1.2 ms).
    # lag 0: no look-ahead delay; error-resilient: decoding continues past a lost frame; no
    # alt-ref: no hidden frames that delay output.
    "vp8": {
        "deadline": "realtime",
        "cpu-used": "16",
        "lag-in-frames": "0",
        "error-resilient": "1",
        "auto-alt-ref": "0",
        "static-thresh": "0",
    },
    # zerolatency: no B-frames, no look-ahead; forced-idr: a forced keyframe is a real IDR that a
    # fresh decoder can start from (SPS/PPS are repeated in-band with each IDR).
    "h264": {"preset": "ultrafast", "tune": "zerolatency", "forced-idr": "1"},
    "av1": {"preset": "10", "svtav1-params": "rc=2:pred-struct=1"},
}
# dav1d otherwise buffers frames across threads, adding latency.
_VIDEO_DECODER_OPTIONS: dict[str, dict[str, str]] = {"av1": {"max_frame_delay": "1"}}

# One thread per codec. Measured (VP8 640x480, 2 busy cores, best of 5): 1 thread 4.7 ms/frame,
# 2 threads 16.6 ms/frame: libvpx's row-sync threads wait on each other when the cores are shared
# with the other codecs and the network. Parallelism comes from running codecs side by side.
CODEC_THREADS = 1
# A keyframe every minute bounds how long a decoder stays broken if every PLI is lost, while
# keeping the usual recovery on-demand (PLI -> force_keyframe).
KEYFRAME_INTERVAL_S = 60
# Bitrate steps smaller than this fraction do not reopen the encoder: each reopen costs a keyframe
# (several times a delta frame), which would feed the congestion it reacts to.
BITRATE_HYSTERESIS = 0.15
MIN_VIDEO_BITRATE = 30_000  # WebRTC's default video floor; below it, drop resolution instead
MAX_VIDEO_BITRATE = 20_000_000  # far above any P2P uplink; guards against unit mistakes (kbps/bps)
MIN_AUDIO_BITRATE = 6_000  # libopus's own minimum
MAX_AUDIO_BITRATE = 510_000  # libopus's own maximum
MAX_VIDEO_DIMENSION = 4096  # bounds decoder memory for a peer-declared size
MAX_FPS = 120
# An encoded frame bigger than this is garbage, not video: a 4K keyframe at high quality is ~1 MB.
MAX_ENCODED_FRAME = 4 * 1024 * 1024
# Opus TOC for SILK wideband 20 ms (RFC 6716 §3.1 config 9), used for PLC before any packet.
_DEFAULT_OPUS_TOC = 9 << 3


def _toc_20ms(toc: int) -> int:
    """The TOC byte of a one-frame, 20 ms packet in the same mode and bandwidth as ``toc``.

    Decoding that byte alone makes libopus conceal exactly 20 ms (RFC 6716 §3.1 config table:
    SILK 0-11 in fours of 10/20/40/60 ms, Hybrid 12-15 in pairs of 10/20, CELT 16-31 in fours of
    2.5/5/10/20 ms). Code 0 (one frame), mono.
    """
    config = toc >> 3
    if config < 12:
        config = config // 4 * 4 + 1
    elif config < 16:
        config = 12 + (config - 12) // 2 * 2 + 1
    else:
        config = 16 + (config - 16) // 4 * 4 + 3
    return config << 3


class CodecError(Exception):
    """Base class for codec failures."""


class CodecParamsError(CodecError, ValueError):
    """Codec parameters are invalid (from our API or a peer's offer)."""


class EncodeError(CodecError):
    """The encoder failed on our own input (local error)."""


class DecodeError(CodecError):
    """The peer's bitstream could not be decoded (remote error); the decoder stays usable."""


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One encoded frame. ``pts`` is in ticks of 90 kHz (video) or 48 kHz (audio)."""

    data: bytes
    pts: int
    keyframe: bool


def _require_int(key: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise CodecParamsError(f"{key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _require_choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise CodecParamsError(f"{key} must be one of {choices}, got {value!r}")
    return value


def _require_keys(kind: str, d: object, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise CodecParamsError(f"{kind} params must be a dict, got {type(d).__name__}")
    extra, missing = set(d) - set(keys), set(keys) - set(d)
    if extra:
        raise CodecParamsError(f"unknown {kind} params: {sorted(map(repr, extra))}")
    if missing:
        raise CodecParamsError(f"missing {kind} params: {sorted(missing)}")
    return d


@dataclass(frozen=True, slots=True)
class VideoParams:
    """Video codec parameters as exchanged in a call offer; invalid values raise on creation."""

    codec: str = "vp8"
    width: int = 640
    height: int = 480
    fps: int = 30
    bitrate: int = 500_000

    def __post_init__(self) -> None:
        _require_choice("codec", self.codec, VIDEO_CODECS)
        _require_int("width", self.width, 2, MAX_VIDEO_DIMENSION)
        _require_int("height", self.height, 2, MAX_VIDEO_DIMENSION)
        if self.width % 2 or self.height % 2:
            raise CodecParamsError(
                f"width and height must be even (yuv420p): {self.width}x{self.height}"
            )
        _require_int("fps", self.fps, 1, MAX_FPS)
        _require_int("bitrate", self.bitrate, MIN_VIDEO_BITRATE, MAX_VIDEO_BITRATE)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> VideoParams:
        """Parse a peer's dict; raises ``CodecParamsError`` on anything missing or out of range."""
        return cls(**_require_keys("video", d, ("codec", "width", "height", "fps", "bitrate")))


_AUDIO_FIXED = {"sample_rate": AUDIO_RATE, "channels": 1, "frame_ms": AUDIO_FRAME_MS}


@dataclass(frozen=True, slots=True)
class AudioParams:
    """Audio codec parameters as exchanged in a call offer (48 kHz mono Opus, 20 ms, fixed)."""

    codec: str = "opus"
    bitrate: int = 32_000
    fec: bool = True
    packet_loss_pct: int = 10  # expected loss; libopus spends more on in-band FEC as it rises

    def __post_init__(self) -> None:
        _require_choice("codec", self.codec, AUDIO_CODECS)
        _require_int("bitrate", self.bitrate, MIN_AUDIO_BITRATE, MAX_AUDIO_BITRATE)
        if type(self.fec) is not bool:
            raise CodecParamsError(f"fec must be a bool, got {self.fec!r}")
        _require_int("packet_loss_pct", self.packet_loss_pct, 0, 100)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **_AUDIO_FIXED}

    @classmethod
    def from_dict(cls, d: object) -> AudioParams:
        """Parse a peer's dict; raises ``CodecParamsError`` on anything missing or out of range."""
        keys = ("codec", "bitrate", "fec", "packet_loss_pct", *_AUDIO_FIXED)
        fields = dict(_require_keys("audio", d, keys))
        for key, fixed in _AUDIO_FIXED.items():
            # Fixed by design; a peer offering anything else is not speaking our protocol.
            _require_int(key, fields.pop(key), fixed, fixed)
        return cls(**fields)


class VideoEncoder:
    """Real-time video encoder: one frame in, at most one packet out, keyframes on demand."""

    def __init__(
        self,
        codec: str = "vp8",
        width: int = 640,
        height: int = 480,
        fps: int = 30,
        bitrate: int = 500_000,
    ) -> None:
        self.params = VideoParams(codec, width, height, fps, bitrate)
        self.reopen_count = 0
        self._last_pts = -1
        self._ctx = self._open()
        self._fresh = True  # a new context emits a keyframe first anyway

    def _open(self) -> av.VideoCodecContext:
        p = self.params
        ctx = av.CodecContext.create(_VIDEO_ENCODERS[p.codec], "w")
        ctx.width, ctx.height = p.width, p.height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = VIDEO_TIME_BASE
        ctx.framerate = Fraction(p.fps)
        ctx.bit_rate = p.bitrate
        ctx.gop_size = p.fps * KEYFRAME_INTERVAL_S
        ctx.max_b_frames = 0
        ctx.thread_count = CODEC_THREADS
        ctx.options = dict(VIDEO_ENCODER_OPTIONS[p.codec])
        try:
            ctx.open()
        except av.FFmpegError as exc:
            raise EncodeError(f"cannot open {p.codec} encoder for {p}: {exc}") from exc
        return ctx

    def _reopen(self, **changes: Any) -> None:
        p = self.params
        self.params = VideoParams(**{**p.to_dict(), **changes})
        self._ctx = self._open()
        self._fresh = True
        self.reopen_count += 1

    def set_bitrate(self, bps: int) -> bool:
        """Change the target bitrate; returns True if the encoder was reopened (next is a key)."""
        bps = max(MIN_VIDEO_BITRATE, min(MAX_VIDEO_BITRATE, int(bps)))
        if abs(bps - self.params.bitrate) < BITRATE_HYSTERESIS * self.params.bitrate:
            return False
        self._reopen(bitrate=bps)
        return True

    def set_resolution(self, width: int, height: int) -> None:
        """Reopen at a new size; frames of another size are scaled to it by swscale."""
        if (width, height) != (self.params.width, self.params.height):
            self._reopen(width=width, height=height)

    def set_fps(self, fps: int) -> None:
        if fps != self.params.fps:
            self._reopen(fps=fps)

    def encode(self, frame: av.VideoFrame, force_keyframe: bool = False) -> list[EncodedFrame]:
        """Encode one frame. Its pts (90 kHz) is raised if needed to stay strictly increasing.

        A frame of another size or pixel format is converted by swscale first.
        """
        p = self.params
        if frame.width != p.width or frame.height != p.height or frame.format.name != "yuv420p":
            src_pts = frame.pts
            frame = frame.reformat(width=p.width, height=p.height, format="yuv420p")
            frame.pts = src_pts
        pts = frame.pts if frame.pts is not None else self._last_pts + 1
        pts = max(pts, self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        want_key = force_keyframe or self._fresh
        frame.pict_type = (
            av.video.frame.PictureType.I if want_key else av.video.frame.PictureType.NONE
        )
        try:
            packets = self._ctx.encode(frame)
        except av.FFmpegError as exc:
            raise EncodeError(f"{p.codec} encoder failed: {exc}") from exc
        finally:
            frame.pict_type = av.video.frame.PictureType.NONE
        self._fresh = False
        return [EncodedFrame(bytes(pk), int(pk.pts or pts), bool(pk.is_keyframe)) for pk in packets]


class VideoDecoder:
    """Video decoder for a peer's bitstream; bad input raises ``DecodeError`` and is survivable.

    After an error, ``needs_keyframe`` is True until a keyframe decodes: the caller sends a PLI.
    """

    def __init__(self, codec: str = "vp8") -> None:
        if codec not in VIDEO_CODECS:
            raise CodecParamsError(f"video codec must be one of {VIDEO_CODECS}, got {codec!r}")
        self.codec = codec
        self.needs_keyframe = True  # nothing decodes before the first keyframe
        self._ctx = self._open()

    def _open(self) -> av.VideoCodecContext:
        ctx = av.CodecContext.create(_VIDEO_DECODERS[self.codec], "r")
        ctx.thread_count = CODEC_THREADS
        ctx.thread_type = "SLICE"  # frame threading would add a frame of latency per thread
        ctx.options = dict(_VIDEO_DECODER_OPTIONS.get(self.codec, {}))
        return ctx

    def decode(self, data: bytes, pts: int | None = None) -> list[av.VideoFrame]:
        """Decode one encoded frame (pts in 90 kHz ticks, optional) into 0 or 1 pictures."""
        if not data:
            # FFmpeg reads an empty packet as end-of-stream and the decoder would go EOF.
            raise DecodeError("empty video frame")
        if len(data) > MAX_ENCODED_FRAME:
            raise DecodeError(f"video frame of {len(data)} bytes exceeds {MAX_ENCODED_FRAME}")
        try:
            frames = list(self._ctx.decode(self._packet(data, pts)))
        except av.error.EOFError:
            self._ctx = self._open()
            self.needs_keyframe = True
            raise DecodeError(f"{self.codec} decoder was at end of stream; reset") from None
        except (av.FFmpegError, ValueError) as exc:
            frames = self._retry_fresh(data, pts, exc)
        if any(f.key_frame for f in frames):
            self.needs_keyframe = False
        return frames

    @staticmethod
    def _packet(data: bytes, pts: int | None) -> av.Packet:
        packet = av.Packet(data)
        if pts is not None:
            packet.pts = pts
            packet.time_base = VIDEO_TIME_BASE
        return packet

    def _retry_fresh(self, data: bytes, pts: int | None, exc: Exception) -> list[av.VideoFrame]:
        """An error may be an earlier packet's: dav1d reports a corrupt frame on the *next* send,
        so the keyframe a PLI brought would be lost too, and another PLI round trip spent. A
        fresh decoder gets this packet once more; only a keyframe is taken from it."""
        self._ctx = self._open()
        self.needs_keyframe = True
        problem = f"undecodable {self.codec} frame ({len(data)} bytes): {exc}"
        try:
            frames = list(self._ctx.decode(self._packet(data, pts)))
        except (av.FFmpegError, ValueError):
            raise DecodeError(problem) from exc
        if not any(f.key_frame for f in frames):
            raise DecodeError(problem) from exc
        return frames

    def reset(self) -> None:
        """Drop all decoder state (e.g. after a codec change); next frame should be a key."""
        self._ctx = self._open()
        self.needs_keyframe = True


class AudioEncoder:
    """Opus encoder: 48 kHz mono s16 in 20 ms frames, in-band FEC, settable loss and bitrate."""

    def __init__(self, params: AudioParams | None = None) -> None:
        self.params = params or AudioParams()
        self._samples = 0
        self._ctx = self._open()

    def _open(self) -> av.AudioCodecContext:
        p = self.params
        ctx = av.CodecContext.create("libopus", "w")
        ctx.sample_rate = AUDIO_RATE
        ctx.layout = "mono"
        ctx.format = "s16"
        ctx.bit_rate = p.bitrate
        ctx.time_base = AUDIO_TIME_BASE
        ctx.options = {
            "application": "voip",
            "frame_duration": str(AUDIO_FRAME_MS),
            "fec": "1" if p.fec else "0",
            "packet_loss": str(p.packet_loss_pct),
        }
        try:
            ctx.open()
        except av.FFmpegError as exc:
            raise EncodeError(f"cannot open opus encoder for {p}: {exc}") from exc
        return ctx

    def set_bitrate(self, bps: int) -> None:
        """Reopen at a new bitrate (Opus state is small: a reopen costs one frame's quality)."""
        bps = max(MIN_AUDIO_BITRATE, min(MAX_AUDIO_BITRATE, int(bps)))
        if bps != self.params.bitrate:
            self.params = AudioParams(
                self.params.codec, bps, self.params.fec, self.params.packet_loss_pct
            )
            self._ctx = self._open()

    def set_packet_loss(self, percent: int) -> None:
        """Tell Opus the loss to expect: it then spends more on in-band FEC."""
        percent = max(0, min(100, int(percent)))
        if percent != self.params.packet_loss_pct:
            self.params = AudioParams(
                self.params.codec, self.params.bitrate, self.params.fec, percent
            )
            self._ctx = self._open()

    def encode(self, frame: av.AudioFrame) -> list[EncodedFrame]:
        if (
            frame.samples != AUDIO_FRAME_SAMPLES
            or frame.sample_rate != AUDIO_RATE
            or frame.format.name != "s16"
            or frame.layout.nb_channels != 1
        ):
            raise EncodeError(
                f"opus encoder wants {AUDIO_FRAME_SAMPLES} mono s16 samples at {AUDIO_RATE} Hz, "
                f"got {frame.samples} {frame.layout.name} {frame.format.name} "
                f"at {frame.sample_rate}"
            )
        try:
            packets = self._ctx.encode(frame)
        except av.FFmpegError as exc:
            raise EncodeError(f"opus encoder failed: {exc}") from exc
        # libopus emits one packet per 20 ms frame; its pts are shifted by the encoder's pre-skip,
        # so stamp the input frame's sample count instead (what the far end's clock counts).
        pts = frame.pts if frame.pts is not None else self._samples
        self._samples = pts + AUDIO_FRAME_SAMPLES
        return [EncodedFrame(bytes(pk), pts, True) for pk in packets]


class AudioDecoder:
    """Opus decoder with loss concealment (PLC) for frames that never arrived."""

    def __init__(self) -> None:
        self._toc = _DEFAULT_OPUS_TOC
        self._ctx = self._open()

    @staticmethod
    def _open() -> av.AudioCodecContext:
        ctx = av.CodecContext.create("libopus", "r")
        ctx.sample_rate = AUDIO_RATE
        ctx.layout = "mono"
        return ctx

    def decode(self, data: bytes) -> list[av.AudioFrame]:
        if not data:
            raise DecodeError("empty opus packet")
        if len(data) > MAX_ENCODED_FRAME:
            raise DecodeError(f"opus packet of {len(data)} bytes is too large")
        try:
            frames = list(self._ctx.decode(av.Packet(data)))
        except av.error.EOFError:
            self._ctx = self._open()
            raise DecodeError("opus decoder was at end of stream; reset") from None
        except (av.FFmpegError, ValueError) as exc:
            raise DecodeError(f"undecodable opus packet ({len(data)} bytes): {exc}") from exc
        self._toc = _toc_20ms(data[0])
        return frames

    def conceal(self) -> list[av.AudioFrame]:
        """Audio for one lost 20 ms packet via libopus PLC (a TOC-only packet means 'conceal')."""
        return self.decode(bytes([self._toc]))


T = TypeVar("T")

# Two codec threads at once: the machine class has 2 cores, and the trio loop needs the rest.
DEFAULT_CODEC_CONCURRENCY = 2
_default_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("codec_limiter")


def default_codec_limiter() -> trio.CapacityLimiter:
    """The limiter shared by all codec workers of this trio run."""
    try:
        return _default_limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(DEFAULT_CODEC_CONCURRENCY)
        _default_limiter.set(limiter)
        return limiter


class CodecWorker:
    """Runs one codec's calls in worker threads, one at a time, under a shared limiter.

    FFmpeg contexts are not thread-safe, so calls on the same codec are serialised by a lock; the
    shared ``CapacityLimiter`` bounds how many codec threads run at once across the whole call.
    """

    def __init__(self, limiter: trio.CapacityLimiter | None = None) -> None:
        self._limiter = limiter
        self._lock = threading.Lock()
        self._trio_lock = trio.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        limiter = self._limiter or default_codec_limiter()
        async with self._trio_lock:

            def call() -> T:
                with self._lock:
                    return fn(*args)

            return await trio.to_thread.run_sync(call, limiter=limiter)
