"""Media sources: test pattern, tone, file and capture device.

Every source is pull-based: the caller owns the clock and asks for the next frame with
``next_frame(now)``. Nothing here sleeps, so trio code (or a simulated clock) sets the pace.

The test pattern stamps each frame with its counter and send time as big black/white blocks that
survive lossy compression, so the far end can measure latency and loss from decoded pictures.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Video pts use the 90 kHz clock of RTP video (RFC 3551): fine enough for any frame rate and the
# same unit the packetizer carries on the wire.
VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_RATE)
# Audio runs at Opus's native 48 kHz, so pts count samples.
AUDIO_RATE = 48_000
AUDIO_TIME_BASE = Fraction(1, AUDIO_RATE)
# 20 ms is Opus's default frame and WebRTC's: a good trade between header overhead and delay.
AUDIO_FRAME_MS = 20
AUDIO_FRAME_SAMPLES = AUDIO_RATE * AUDIO_FRAME_MS // 1000

DEFAULT_WIDTH = 640
DEFAULT_HEIGHT = 480
DEFAULT_FPS = 30

# --- The stamp -----------------------------------------------------------------------------
# 32-bit frame counter + 32-bit send time in ms (wraps after 49 days; the reader unwraps against
# its own clock) + CRC-16 so a read corrupted by compression is rejected rather than trusted.
STAMP_COUNTER_BITS = 32
STAMP_TIME_BITS = 32
STAMP_CRC_BITS = 16
STAMP_BITS = STAMP_COUNTER_BITS + STAMP_TIME_BITS + STAMP_CRC_BITS
# 20 blocks a row, 4 rows: a 16 px block grid (aligned to VP8/H.264 macroblocks) fills 320x64.
STAMP_COLUMNS = 20
STAMP_ROWS = STAMP_BITS // STAMP_COLUMNS
# 16 px matches the codecs' macroblock, so a block never straddles two quantised blocks.
STAMP_MAX_BLOCK = 16
# Below 4 px the block means blur into each other at low bitrates.
STAMP_MIN_BLOCK = 4
# Luma levels of limited-range video (BT.601): the widest contrast a codec keeps exactly.
LUMA_BLACK = 16
LUMA_WHITE = 235
LUMA_THRESHOLD = (LUMA_BLACK + LUMA_WHITE) // 2
CHROMA_NEUTRAL = 128
_STAMP_LEVELS = np.array([LUMA_BLACK, LUMA_WHITE], np.uint8)  # bit 0 → black, 1 → white


class SourceError(Exception):
    """A source cannot deliver media (no device, unreadable file, bad parameters)."""


class StampError(ValueError):
    """A decoded frame carries no readable stamp (blurred, cropped or not a test pattern)."""


@dataclass(frozen=True, slots=True)
class Stamp:
    """What the test pattern writes into each frame."""

    counter: int
    send_time_ms: int  # caller's clock in ms, modulo 2**32

    def send_time(self, now: float) -> float:
        """The full send time in seconds: the value congruent to ``send_time_ms`` nearest ``now``.

        The stamp keeps 32 bits of ms (49 days), so any receiver clock within ±24 days of the
        sender's unwraps it exactly.
        """
        wrap = 1 << STAMP_TIME_BITS
        now_ms = round(now * 1000)
        delta = (self.send_time_ms - now_ms) % wrap
        if delta >= wrap // 2:
            delta -= wrap
        return (now_ms + delta) / 1000


def stamp_block_size(width: int, height: int) -> int:
    """Block edge in px for a frame size: as big as fits, capped at a macroblock, even."""
    block = min(STAMP_MAX_BLOCK, width // STAMP_COLUMNS, height // (STAMP_ROWS * 2))
    block -= block % 2
    if block < STAMP_MIN_BLOCK:
        raise SourceError(
            f"frame {width}x{height} is too small for the stamp: need at least "
            f"{STAMP_COLUMNS * STAMP_MIN_BLOCK}x{STAMP_ROWS * STAMP_MIN_BLOCK * 2} px"
        )
    return block


def _crc16(payload: int) -> int:
    return zlib.crc32(payload.to_bytes(8, "big")) & 0xFFFF


def _stamp_bits(counter: int, send_time_ms: int) -> np.ndarray:
    counter &= (1 << STAMP_COUNTER_BITS) - 1
    send_time_ms &= (1 << STAMP_TIME_BITS) - 1
    payload = (counter << STAMP_TIME_BITS) | send_time_ms
    word = (payload << STAMP_CRC_BITS) | _crc16(payload)
    # 80 bits are 10 whole bytes, most significant bit first.
    return np.unpackbits(np.frombuffer(word.to_bytes(STAMP_BITS // 8, "big"), np.uint8))


def write_stamp(luma: np.ndarray, counter: int, send_time_ms: int) -> None:
    """Paint the stamp into the top-left corner of a luma plane, in place."""
    height, width = luma.shape
    block = stamp_block_size(width, height)
    grid = _stamp_bits(counter, send_time_ms).reshape(STAMP_ROWS, 1, STAMP_COLUMNS, 1)
    # One broadcast assignment through a (row, y, column, x) view of the corner: no temporaries.
    corner = luma[: STAMP_ROWS * block, : STAMP_COLUMNS * block]
    corner.reshape(STAMP_ROWS, block, STAMP_COLUMNS, block)[:] = _STAMP_LEVELS[grid]


def read_stamp(frame: av.VideoFrame) -> Stamp:
    """Read the stamp back from a decoded frame by thresholding each block's inner mean."""
    if frame.format.name in ("yuv420p", "yuvj420p", "gray"):
        # The luma plane as is, no copy: converting the whole picture cost ~1.5 ms at 640x480,
        # more than decoding it; only the stamp corner is read below.
        plane = frame.planes[0]
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        luma = rows[:, : plane.width]
    else:
        luma = frame.reformat(format="gray").to_ndarray()
    height, width = luma.shape
    block = stamp_block_size(width, height)
    cells = luma[: STAMP_ROWS * block, : STAMP_COLUMNS * block].reshape(
        STAMP_ROWS, block, STAMP_COLUMNS, block
    )
    # Skip a quarter block at each edge: ringing from the neighbours lives there. Integer sums
    # against a scaled threshold: the same test as mean > LUMA_THRESHOLD, without a float copy.
    margin = block // 4
    inner = cells[:, margin : block - margin, :, margin : block - margin]
    sums = inner.sum(axis=(1, 3), dtype=np.uint32).reshape(-1)
    bits = sums > LUMA_THRESHOLD * (block - 2 * margin) ** 2
    word = int.from_bytes(np.packbits(bits).tobytes(), "big")
    payload = word >> STAMP_CRC_BITS
    if _crc16(payload) != word & 0xFFFF:
        raise StampError("stamp checksum mismatch: frame too degraded or not a test pattern")
    return Stamp(
        counter=payload >> STAMP_TIME_BITS,
        send_time_ms=payload & ((1 << STAMP_TIME_BITS) - 1),
    )


def _check_video_params(width: int, height: int, fps: float) -> None:
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise SourceError(f"video size must be positive and even for yuv420p, got {width}x{height}")
    if not 0 < fps <= 240:
        raise SourceError(f"fps must be in (0, 240], got {fps}")


class TestPatternSource:
    """A moving pattern (scrolling bars and a bouncing square) with a readable stamp.

    The motion keeps the encoder honest (a still picture costs no bits), and the stamp lets the far
    end read back the counter and send time after lossy coding.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(
        self, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT, fps: float = DEFAULT_FPS
    ) -> None:
        _check_video_params(width, height, fps)
        stamp_block_size(width, height)
        self.width, self.height, self.fps = width, height, fps
        self.counter = 0
        self._start: float | None = None
        # Everything that does not depend on time is computed once: drawing a frame is then a
        # few slice copies into the frame's own planes (no intermediate picture, no from_ndarray
        # copy). Measured at 640x480: 0.52 ms → 0.1 ms per frame.
        # One period of bars twice as wide as the frame; each frame is a slice of it.
        x = np.arange(width * 2)
        bars = (np.sin(x * (2 * np.pi / 96)) * 70 + 126).astype(np.uint8)
        gradient = np.linspace(0, 40, height, dtype=np.float32)[:, None]
        self._bars = np.clip(bars[None, :] + gradient, LUMA_BLACK, LUMA_WHITE).astype(np.uint8)
        # The U row repeated twice over, so that a scrolled row is a slice, not an np.roll.
        cw, ch = width // 2, height // 2
        cx = np.arange(cw)
        u_row = ((np.sin(cx * (2 * np.pi / 160)) * 50) + CHROMA_NEUTRAL).astype(np.uint8)
        self._u2 = np.concatenate([u_row, u_row])
        self._square = max(8, min(width, height) // 6)
        block = stamp_block_size(width, height)
        # Neutral chroma under the stamp keeps it pure black/white after conversion.
        self._stamp_chroma = (STAMP_ROWS * block // 2, STAMP_COLUMNS * block // 2)
        self._chroma_size = (ch, cw)

    @staticmethod
    def _plane(frame: av.VideoFrame, index: int, width: int, height: int) -> np.ndarray:
        """A writable numpy view of one plane of ``frame`` (rows may be padded)."""
        plane = frame.planes[index]
        rows = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        return rows[:height, :width]

    def next_frame(self, now: float) -> av.VideoFrame:
        """The frame for ``now`` (seconds, caller's clock), stamped with its counter and ``now``."""
        if self._start is None:
            self._start = now
        elapsed = now - self._start
        w, h = self.width, self.height
        ch, cw = self._chroma_size
        shift = int(elapsed * 120) % w  # 120 px/s scroll
        frame = av.VideoFrame(w, h, "yuv420p")
        luma = self._plane(frame, 0, w, h)
        luma[:] = self._bars[:, shift : shift + w]
        # Bouncing square: motion that is not a pure translation of the whole picture.
        s = self._square
        span_x, span_y = max(1, w - s), max(1, h - s)
        px = int(abs((elapsed * 200) % (2 * span_x) - span_x))
        py = int(abs((elapsed * 150) % (2 * span_y) - span_y))
        luma[py : py + s, px : px + s] = LUMA_WHITE - 20
        write_stamp(luma, self.counter, round(now * 1000))
        u = self._plane(frame, 1, cw, ch)
        cshift = (shift // 2) % cw
        u[:] = self._u2[None, cshift : cshift + cw]
        v = self._plane(frame, 2, cw, ch)
        v[:] = CHROMA_NEUTRAL
        sy, sx = self._stamp_chroma
        u[:sy, :sx] = CHROMA_NEUTRAL
        frame.time_base = VIDEO_TIME_BASE
        frame.pts = round(elapsed * VIDEO_CLOCK_RATE)
        self.counter += 1
        return frame

    def close(self) -> None:
        """Nothing to release; present so all sources share one shape."""


class ToneSource:
    """A sine tone in 20 ms mono s16 frames at 48 kHz; pts count samples, so loss is visible."""

    def __init__(self, frequency: float = 440.0, amplitude: float = 0.3) -> None:
        if not 0 < frequency < AUDIO_RATE / 2:
            raise SourceError(f"tone frequency must be in (0, {AUDIO_RATE // 2}) Hz: {frequency}")
        if not 0 < amplitude <= 1:
            raise SourceError(f"tone amplitude must be in (0, 1], got {amplitude}")
        self.frequency = frequency
        self.amplitude = amplitude
        self.sample_counter = 0
        # The wave repeats exactly after `period` samples when frequency × period / rate is a
        # whole number (440 Hz: 48000 samples, 1 s). Such a tone is computed once and sliced;
        # otherwise each frame is computed (sin of 960 samples + conversion ≈ 50 µs).
        self._table: np.ndarray | None = None
        period = AUDIO_RATE
        cycles = frequency * period / AUDIO_RATE
        if cycles == int(cycles):
            wave = self._wave(np.arange(period + AUDIO_FRAME_SAMPLES))
            self._table, self._period = wave, period

    def _wave(self, n: np.ndarray) -> np.ndarray:
        wave = np.sin(n * (2 * np.pi * self.frequency / AUDIO_RATE)) * self.amplitude * 32767
        return wave.astype(np.int16)

    def next_frame(self, now: float) -> av.AudioFrame:
        """The next 20 ms; ``now`` is accepted for a uniform API (audio is paced by its count)."""
        if self._table is not None:
            start = self.sample_counter % self._period
            samples = self._table[start : start + AUDIO_FRAME_SAMPLES]
        else:
            n = np.arange(self.sample_counter, self.sample_counter + AUDIO_FRAME_SAMPLES)
            samples = self._wave(n)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.time_base = AUDIO_TIME_BASE
        frame.pts = self.sample_counter
        self.sample_counter += AUDIO_FRAME_SAMPLES
        return frame

    def close(self) -> None:
        """Nothing to release; present so all sources share one shape."""


def dominant_frequency(samples: np.ndarray, rate: int = AUDIO_RATE) -> float:
    """The strongest frequency in a block of samples (to check a tone survived the codec)."""
    data = samples.astype(np.float64).reshape(-1)
    spectrum = np.abs(np.fft.rfft(data * np.hanning(data.size)))
    return float(np.argmax(spectrum[1:]) + 1) * rate / data.size


class _AudioChunker:
    """Regroups resampled audio into exact 20 ms mono s16 frames with a sample-count pts."""

    def __init__(self) -> None:
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        self._pending = np.zeros(0, np.int16)
        self.sample_counter = 0

    def push(self, frame: av.AudioFrame | None) -> None:
        for out in self._resampler.resample(frame):
            self._pending = np.concatenate([self._pending, out.to_ndarray().reshape(-1)])

    def ready(self) -> bool:
        return self._pending.size >= AUDIO_FRAME_SAMPLES

    def pop(self) -> av.AudioFrame:
        chunk, self._pending = (
            self._pending[:AUDIO_FRAME_SAMPLES],
            self._pending[AUDIO_FRAME_SAMPLES:],
        )
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.time_base = AUDIO_TIME_BASE
        frame.pts = self.sample_counter
        self.sample_counter += AUDIO_FRAME_SAMPLES
        return frame


class FileSource:
    """Reads any container PyAV opens, looped forever; video scaled by swscale, audio to 48 kHz.

    ``next_video_frame(now)`` returns the file's frame due at ``now`` (frames are dropped or
    repeated to follow the caller's clock); ``next_audio_frame(now)`` returns the next 20 ms.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int = DEFAULT_WIDTH,
        height: int = DEFAULT_HEIGHT,
    ) -> None:
        _check_video_params(width, height, DEFAULT_FPS)
        self.path = Path(path)
        self.width, self.height = width, height
        try:
            probe = av.open(str(self.path))
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot open media file {self.path}: {exc}") from exc
        with probe:
            self.has_video = bool(probe.streams.video)
            self.has_audio = bool(probe.streams.audio)
        if not (self.has_video or self.has_audio):
            raise SourceError(f"media file {self.path} has neither audio nor video")
        self._video_iter: Iterator[av.VideoFrame] | None = None
        self._video_container: av.container.InputContainer | None = None
        self._audio_container: av.container.InputContainer | None = None
        self._audio_iter: Iterator[av.AudioFrame] | None = None
        self._audio = _AudioChunker()
        self._start: float | None = None
        self._loop_offset = 0.0  # seconds of file played in earlier loops
        self._current: av.VideoFrame | None = None
        self._current_time = -1.0
        self._next: av.VideoFrame | None = None

    # Video and audio use separate demuxers so that pulling one never buffers the other.
    def _open(self, kind: str) -> tuple[av.container.InputContainer, Iterator]:
        try:
            container = av.open(str(self.path))
        except (av.FFmpegError, OSError) as exc:
            raise SourceError(f"cannot reopen media file {self.path}: {exc}") from exc
        stream = container.streams.video[0] if kind == "video" else container.streams.audio[0]
        stream.thread_count = 1
        return container, container.decode(stream)

    def _pull_video(self) -> av.VideoFrame | None:
        """Next decoded frame, pts on the looped timeline, or None if the file is empty."""
        for _attempt in range(2):
            if self._video_iter is None:
                self._video_container, self._video_iter = self._open("video")
            try:
                frame = next(self._video_iter)
            except StopIteration:
                self._loop_offset = self._current_time + 1 / DEFAULT_FPS
                self._close_video()
                continue
            except av.FFmpegError as exc:
                raise SourceError(f"cannot decode video from {self.path}: {exc}") from exc
            t = float(frame.time or 0.0) + self._loop_offset
            out = frame.reformat(width=self.width, height=self.height, format="yuv420p")
            out.pts = round(t * VIDEO_CLOCK_RATE)
            out.time_base = VIDEO_TIME_BASE
            return out
        return None

    def next_video_frame(self, now: float) -> av.VideoFrame:
        """The file's frame due at ``now``, scaled to the source size, pts on the caller's clock."""
        if not self.has_video:
            raise SourceError(f"media file {self.path} has no video stream")
        if self._start is None:
            self._start = now
        elapsed = now - self._start
        while self._current is None or (self._next_time() <= elapsed):
            nxt = self._next if self._next is not None else self._pull_video()
            self._next = None
            if nxt is None:
                raise SourceError(f"media file {self.path} has no decodable video frames")
            self._current, self._current_time = nxt, nxt.pts / VIDEO_CLOCK_RATE
            self._next = self._pull_video()
            if self._next is None:
                break
        out = self._current.reformat(format="yuv420p")  # a copy the caller may keep
        out.pts = round(elapsed * VIDEO_CLOCK_RATE)
        out.time_base = VIDEO_TIME_BASE
        return out

    def _next_time(self) -> float:
        return float("inf") if self._next is None else self._next.pts / VIDEO_CLOCK_RATE

    def next_audio_frame(self, now: float) -> av.AudioFrame:
        """The next 20 ms of the file's audio (48 kHz mono s16), looping at the end."""
        if not self.has_audio:
            raise SourceError(f"media file {self.path} has no audio stream")
        loops_without_audio = 0
        while not self._audio.ready():
            if self._audio_iter is None:
                self._audio_container, self._audio_iter = self._open("audio")
            try:
                self._audio.push(next(self._audio_iter))
                loops_without_audio = 0
            except StopIteration:
                self._close_audio()
                loops_without_audio += 1
                if loops_without_audio > 1:
                    raise SourceError(f"media file {self.path} has no decodable audio") from None
            except av.FFmpegError as exc:
                raise SourceError(f"cannot decode audio from {self.path}: {exc}") from exc
        return self._audio.pop()

    def _close_video(self) -> None:
        if self._video_container is not None:
            self._video_container.close()
        self._video_container, self._video_iter = None, None

    def _close_audio(self) -> None:
        if self._audio_container is not None:
            self._audio_container.close()
        self._audio_container, self._audio_iter = None, None

    def close(self) -> None:
        self._close_video()
        self._close_audio()


# Capture-device defaults for Linux: v4l2 cameras and ALSA/PulseAudio microphones.
DEFAULT_CAMERA = "/dev/video0"
DEFAULT_MICROPHONE = "default"


class CameraSource:
    """A v4l2 camera through PyAV. Raises ``SourceError`` with the device name when absent.

    Frames are read when asked for; the newest frame is returned with pts on the caller's clock.
    Capture blocks until the device delivers, so call it from a worker thread.
    """

    def __init__(
        self,
        device: str = DEFAULT_CAMERA,
        width: int = DEFAULT_WIDTH,
        height: int = DEFAULT_HEIGHT,
        fps: float = DEFAULT_FPS,
    ) -> None:
        _check_video_params(width, height, fps)
        self.device, self.width, self.height = device, width, height
        if not os.path.exists(device):
            raise SourceError(f"no camera at {device}: device file does not exist")
        options = {"video_size": f"{width}x{height}", "framerate": str(fps)}
        try:
            self._container = av.open(device, format="v4l2", options=options)
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise SourceError(f"no camera at {device}: {exc}") from exc
        self._frames = self._container.decode(video=0)
        self._start: float | None = None

    def next_frame(self, now: float) -> av.VideoFrame:
        if self._start is None:
            self._start = now
        try:
            frame = next(self._frames)
        except (StopIteration, av.FFmpegError) as exc:
            raise SourceError(f"camera {self.device} stopped delivering frames: {exc}") from exc
        out = frame.reformat(width=self.width, height=self.height, format="yuv420p")
        out.pts = round((now - self._start) * VIDEO_CLOCK_RATE)
        out.time_base = VIDEO_TIME_BASE
        return out

    def close(self) -> None:
        self._container.close()


class MicrophoneSource:
    """A microphone through PyAV's alsa or pulse input, regrouped into 20 ms 48 kHz mono frames."""

    def __init__(self, device: str = DEFAULT_MICROPHONE, backend: str = "alsa") -> None:
        if backend not in ("alsa", "pulse"):
            raise SourceError(f"audio capture backend must be 'alsa' or 'pulse', got {backend!r}")
        self.device, self.backend = device, backend
        try:
            self._container = av.open(device, format=backend)
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise SourceError(f"no microphone {device!r} via {backend}: {exc}") from exc
        self._frames = self._container.decode(audio=0)
        self._chunker = _AudioChunker()

    def next_frame(self, now: float) -> av.AudioFrame:
        while not self._chunker.ready():
            try:
                self._chunker.push(next(self._frames))
            except (StopIteration, av.FFmpegError) as exc:
                raise SourceError(f"microphone {self.device!r} stopped: {exc}") from exc
        return self._chunker.pop()

    def close(self) -> None:
        with contextlib.suppress(av.FFmpegError):
            self._container.close()
