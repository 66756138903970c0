"""The media pipelines of one call: trio shells around the sans-IO media cores.

Sender: source → encoder (worker thread) → packetizer → retransmission buffer → rate controller
(transport seq) → session. Feedback from the far end steers it: transport feedback → bitrate and
quality rung (resolution/fps), NACK → retransmission, PLI → keyframe.

Receiver: datagram → NACK/transport-feedback bookkeeping → frame assembly → jitter buffers (one
playout clock: lip sync) → decoders (worker threads) → sinks. The video sink reads the test
pattern's stamp, so a same-machine call measures capture→decoded latency (CLOCK_MONOTONIC is shared
by processes) and sees lost or reordered frames.

Audio loss: FFmpeg's libopus decoder never asks for in-band FEC (see media/codecs.py), so every
lost audio frame is concealed by libopus PLC; ``fec_recovered`` stays 0 and is reported as such.

All timing uses ``trio.current_time()``, so the cores run on trio's clock; only the stamp (which
crosses processes) uses ``time.monotonic()``.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
import trio

from media.callstate import CallParams
from media.codecs import (
    VIDEO_CODECS,
    AudioDecoder,
    AudioEncoder,
    CodecError,
    CodecWorker,
    DecodeError,
    EncodedFrame,
    VideoDecoder,
    VideoEncoder,
)
from media.feedback import KeyframeGate, NackGenerator, PliController, RetransmissionBuffer
from media.jitter import (
    AudioConceal,
    AudioJitterBuffer,
    AudioOut,
    KeyframeNeeded,
    PlayoutClock,
    VideoJitterBuffer,
    VideoOut,
    VideoSkipped,
)
from media.packetizer import AssembledFrame, FrameAssembler, Packetizer
from media.rate import (
    QUALITY_LADDER,
    RateController,
    TransportFeedbackGenerator,
    VideoQuality,
)
from media.recorder import Recorder, RecorderError, TrackSpec
from media.session_api import PeerSession, SessionClosed
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
    read_stamp,
)
from media.stats import CallStats
from media.wiremedia import (
    ControlPacket,
    FeedbackPacket,
    MediaPacket,
    MediaRemoteError,
    NackPacket,
    Packet,
    PliPacket,
    StreamId,
    parse_packet,
)

AUDIO_FRAME_S = AUDIO_FRAME_SAMPLES / AUDIO_RATE
# The receive timer sleeps at most this long between checks (path changes, rate timeouts) and at
# least MIN_TIMER_SLEEP, so a core whose deadline is already past cannot make the loop spin.
MAX_TIMER_SLEEP = 0.100
MIN_TIMER_SLEEP = 0.001
# Decoder queue for video decoded in a worker thread: a few frames (a longer queue only adds
# latency; overflowing means the CPU cannot keep up, and dropping + PLI is the honest answer).
# Audio, and video decoded inline (INLINE_VIDEO_MAX_PIXELS), are decoded as the jitter buffer
# releases them: no queue, no task switch per frame.
VIDEO_DECODE_QUEUE = 4
# Recorder queue: a couple of seconds of all four tracks; a stalled disk drops, not blocks.
RECORDER_QUEUE = 512
# The sender skips capture slots it is late for by more than this many frame intervals instead of
# bursting to catch up (a burst is congestion and stale pictures).
MAX_CAPTURE_LAG_FRAMES = 1.0
# Stats are sampled for the report once a second (CallStats.MAX_SERIES holds two hours).
STATS_INTERVAL = 1.0
# Sink history bounds: counters of every received frame (≈ 55 min at 30 fps), latency samples.
MAX_COUNTER_HISTORY = 100_000
MAX_LATENCY_SAMPLES = 20_000
# Video bitrate cap per pixel per frame: VP8 talking-head video looks good at ~0.1 bit/px/frame
# (640×480@30 → 0.9 Mb/s); more only costs CPU and air time. Floor of the cap: the ladder's
# top-rung minimum, so the rate controller can always reach its top rung.
MAX_BITS_PER_PIXEL = 0.1
# Opus work runs on the trio thread, not in a worker: measured here, a worker-thread hand-off
# costs ~310 µs of CPU, while decoding a 20 ms Opus frame costs ~40 µs and encoding one ~270 µs
# (so the loop is blocked < 0.3 ms per 20 ms). With threads, audio alone cost 13 CPU-s per
# call-minute. Encoding stays in a worker when the source itself may block (device, file).
INLINE_AUDIO_SOURCES = ("tone",)
# Video codecs run on the trio thread too when they cannot block and are fast at the call size:
# measured at 640x480 (VP8, cpu-used 16) encoding takes ~2 ms, decoding ~0.7 ms and drawing the
# test pattern ~0.1 ms, against ~310 µs of CPU per worker hand-off (two hand-offs per frame per
# direction); the loop stalls at most one encode, far below a frame interval. Capture devices
# and files can block, and bigger calls take longer per frame: those keep their worker threads.
INLINE_VIDEO_SOURCES = ("testpattern",)
INLINE_VIDEO_MAX_PIXELS = 640 * 480
# The quality ladder (smaller pictures, fewer frames) is followed only once the path loses at
# least this fraction of packets (rate.LOSS_LOW: where the loss controller stops growing), and
# until the ladder climbs back to its top. Without loss, a low target is usually the encoder
# undershooting (GCC caps the target at 1.5 × what arrives), not a congested path: stepping down
# then would shrink an idle call's picture for nothing.
QUALITY_LOSS_TRIGGER = 0.02

# Where the pipeline's CPU goes, by stage (seconds of thread CPU time, summed): lets the
# benchmark and the call report say how much is codecs and how much is everything else.
CPU_STAGES = (
    "video_capture",
    "video_encode",
    "video_decode",
    "stamp_read",
    "audio_capture",
    "audio_encode",
    "audio_decode",
)

VIDEO_SOURCES_HELP = "testpattern | FILE | /dev/videoN | none"
AUDIO_SOURCES_HELP = "tone | FILE | alsa:DEV | pulse:DEV | none"


class PipelineError(Exception):
    """The pipeline cannot start (bad source spec, unopenable device or file, codec failure)."""


@dataclass(frozen=True, slots=True)
class MediaOptions:
    """What to send in a call; validated on creation so the CLI/RPC user gets a clear error."""

    video: str = "testpattern"
    audio: str = "tone"
    codec: str = "vp8"
    width: int = 640
    height: int = 480
    fps: int = 30

    def __post_init__(self) -> None:
        if self.codec not in VIDEO_CODECS:
            raise PipelineError(f"codec must be one of {VIDEO_CODECS}, got {self.codec!r}")
        if not (isinstance(self.video, str) and self.video):
            raise PipelineError(f"video source must be {VIDEO_SOURCES_HELP}")
        if not (isinstance(self.audio, str) and self.audio):
            raise PipelineError(f"audio source must be {AUDIO_SOURCES_HELP}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if type(value) is not int or not 16 <= value <= 4096 or value % 2:
                raise PipelineError(f"{name} must be an even integer in [16, 4096], got {value!r}")
        if type(self.fps) is not int or not 1 <= self.fps <= 120:
            raise PipelineError(f"fps must be an integer in [1, 120], got {self.fps!r}")


# --- sources ---


class _VideoInput:
    """One video source behind a uniform ``grab(now)``; ``now`` is the stamp clock (monotonic)."""

    def __init__(self, spec: str, width: int, height: int, fps: int) -> None:
        self.spec = spec
        try:
            if spec == "testpattern":
                self._src: Any = TestPatternSource(width, height, fps)
                self._grab = self._src.next_frame
            elif spec.startswith("/dev/video"):
                self._src = CameraSource(spec, width, height, fps)
                self._grab = self._src.next_frame
            else:
                self._src = FileSource(spec, width, height)
                if not self._src.has_video:
                    self._src.close()
                    raise PipelineError(f"media file {spec} has no video (use --video none)")
                self._grab = self._src.next_video_frame
        except SourceError as exc:
            raise PipelineError(str(exc)) from exc

    def grab(self, now: float) -> av.VideoFrame:
        return self._grab(now)

    def close(self) -> None:
        self._src.close()


class _AudioInput:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        try:
            if spec == "tone":
                self._src: Any = ToneSource()
                self._grab = self._src.next_frame
            elif spec.startswith(("alsa:", "pulse:")):
                backend, _, device = spec.partition(":")
                self._src = MicrophoneSource(device or "default", backend)
                self._grab = self._src.next_frame
            else:
                self._src = FileSource(spec)
                if not self._src.has_audio:
                    self._src.close()
                    raise PipelineError(f"media file {spec} has no audio (use --audio none)")
                self._grab = self._src.next_audio_frame
        except SourceError as exc:
            raise PipelineError(str(exc)) from exc

    def grab(self, now: float) -> av.AudioFrame:
        return self._grab(now)

    def close(self) -> None:
        self._src.close()


def open_sources(options: MediaOptions) -> tuple[_VideoInput | None, _AudioInput | None]:
    """Open the sources named in ``options`` (blocking: call from a thread for devices)."""
    video = None
    if options.video != "none":
        video = _VideoInput(options.video, options.width, options.height, options.fps)
    audio = None
    if options.audio != "none":
        try:
            audio = _AudioInput(options.audio)
        except PipelineError:
            if video is not None:
                video.close()
            raise
    return video, audio


# --- sinks ---


@dataclass
class VideoSink:
    """Counts decoded pictures and reads the test-pattern stamp from each."""

    read_stamps: bool = True
    frames: int = 0
    stamp_errors: int = 0
    counters: list[int] = field(default_factory=list)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_LATENCY_SAMPLES))
    last_size: tuple[int, int] = (0, 0)

    def on_picture(self, stamp_counter: int | None, latency: float | None, size: tuple[int, int]):
        self.frames += 1
        self.last_size = size
        if stamp_counter is None:
            if self.read_stamps:
                self.stamp_errors += 1
            return
        if len(self.counters) < MAX_COUNTER_HISTORY:
            self.counters.append(stamp_counter)
        if latency is not None:
            self.latencies.append(latency)

    def latency_ms(self) -> dict[str, float | None]:
        """Median and 95th percentile of capture→decoded latency, ms (None before any sample)."""
        if not self.latencies:
            return {"median": None, "p95": None}
        ordered = sorted(self.latencies)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return {
            "median": round(statistics.median(ordered) * 1000, 2),
            "p95": round(p95 * 1000, 2),
        }


@dataclass
class AudioSink:
    """Counts decoded audio; a playback device could hang here later."""

    samples: int = 0
    frames: int = 0
    concealed: int = 0

    @property
    def seconds(self) -> float:
        return self.samples / AUDIO_RATE


# --- recording ---

TRACK_LOCAL_VIDEO = "local-video"
TRACK_LOCAL_AUDIO = "local-audio"
TRACK_REMOTE_VIDEO = "remote-video"
TRACK_REMOTE_AUDIO = "remote-audio"


def open_recorder(path: str, params: CallParams, *, local_video: bool, local_audio: bool):
    """A Recorder for a call: what we send (local) and what we receive (remote), no re-encode."""
    tracks = [
        TrackSpec(TRACK_REMOTE_VIDEO, "video", params.codec, params.width, params.height),
        TrackSpec(TRACK_REMOTE_AUDIO, "audio", "opus"),
    ]
    if local_video:
        tracks.append(
            TrackSpec(TRACK_LOCAL_VIDEO, "video", params.codec, params.width, params.height)
        )
    if local_audio:
        tracks.append(TrackSpec(TRACK_LOCAL_AUDIO, "audio", "opus"))
    return Recorder(path, tracks)


# --- the pipeline ---


def _ladder_top(width: int, height: int) -> VideoQuality:
    """The ladder rung the rate controller starts its ladder at for this call size."""
    for q in QUALITY_LADDER:
        if q.width <= width and q.height <= height:
            return q
    return QUALITY_LADDER[-1]


def _scaled_size(params: CallParams, quality: VideoQuality) -> tuple[int, int]:
    """The call size scaled as far down as the rung is below the ladder's top (even numbers)."""
    top = _ladder_top(params.width, params.height)
    scale = min(1.0, quality.width / top.width)
    w = max(2, int(params.width * scale) // 2 * 2)
    h = max(2, int(params.height * scale) // 2 * 2)
    return w, h


class MediaPipeline:
    """Both directions of one call's media over one PeerSession.

    ``run()`` runs the tasks until cancelled; ``handle_datagram`` (or ``handle_packet``) is fed by
    whoever reads the session (the call service routes control packets elsewhere).
    """

    def __init__(
        self,
        session: PeerSession,
        params: CallParams,
        sources: tuple[_VideoInput | None, _AudioInput | None] = (None, None),
        *,
        stats: CallStats | None = None,
        recorder: Recorder | None = None,
        limiter: trio.CapacityLimiter | None = None,
        on_path_change: Callable[[str, int], None] | None = None,
        stamp_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.params = params
        self.video_in, self.audio_in = sources
        self.recorder = recorder
        self.on_path_change = on_path_change
        self._stamp_clock = stamp_clock
        now = trio.current_time()
        self.stats = stats or CallStats(now, codec=params.codec, path=session.path_kind)
        self._path_changes_seen = session.path_changes
        codec_no = VIDEO_CODECS.index(params.codec)
        # sender
        top = VideoQuality(params.width, params.height, params.fps, 0)
        cap = max(
            _ladder_top(params.width, params.height).min_bitrate,
            int(MAX_BITS_PER_PIXEL * params.width * params.height * params.fps),
        )
        self.rc = RateController(max_quality=top, max_bitrate=cap)
        self.rtx = RetransmissionBuffer()
        self.gate = KeyframeGate()
        self._pz_video = Packetizer(StreamId.VIDEO, codec_no)
        self._pz_audio = Packetizer(StreamId.AUDIO, 0)
        self._video_enc: VideoEncoder | None = None
        self._audio_enc: AudioEncoder | None = None
        self._enc_video_worker = CodecWorker(limiter)
        self._enc_audio_worker = CodecWorker(limiter)
        self._force_key = False
        self._ladder_active = False
        self.video_frames_sent = 0
        self.audio_frames_sent = 0
        self.capture_skipped = 0
        self._sending = trio.CancelScope()
        self._t0 = now
        # receiver
        self.twcc_gen = TransportFeedbackGenerator()
        self.nack = {s: NackGenerator(s) for s in StreamId}
        self.pli = PliController()
        self.asm = {s: FrameAssembler(s) for s in StreamId}
        clock = PlayoutClock()
        self.abuf = AudioJitterBuffer(clock)
        self.vbuf = VideoJitterBuffer(clock)
        self._video_dec = VideoDecoder(params.codec)
        self._audio_dec = AudioDecoder()
        self._dec_video_worker = CodecWorker(limiter)
        inline_size = params.width * params.height <= INLINE_VIDEO_MAX_PIXELS
        self._inline_video_encode = inline_size and (
            self.video_in is not None and self.video_in.spec in INLINE_VIDEO_SOURCES
        )
        self._inline_video_decode = inline_size
        # Thread CPU seconds per stage (CPU_STAGES); `inline_max` is the longest codec call made
        # on the trio thread (how long it stalled the loop).
        self.cpu = dict.fromkeys(CPU_STAGES, 0.0)
        self.inline_max = 0.0
        self._timer_deadline = -math.inf
        self.video_sink = VideoSink()
        self.audio_sink = AudioSink()
        self.wire_errors = 0
        self.video_decode_errors = 0
        self.decode_overflows = 0
        self.recorder_dropped = 0
        self.recorder_error: str | None = None
        self._wake = trio.Event()
        self._vq_send, self._vq_recv = trio.open_memory_channel[AssembledFrame](VIDEO_DECODE_QUEUE)
        self._rec_send, self._rec_recv = trio.open_memory_channel[tuple[str, bytes, float, bool]](
            RECORDER_QUEUE
        )

    # --- lifetime ---

    async def run(self) -> None:
        """Run every task of the call's media until cancelled."""
        if self.video_in is not None:
            self._video_enc = await self._enc_video_worker.run(self._open_video_encoder)
        if self.audio_in is not None:
            self._audio_enc = await self._enc_audio_worker.run(AudioEncoder)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._senders)
                nursery.start_soon(self._receive_timer)
                if not self._inline_video_decode:
                    nursery.start_soon(self._decode_video)
                nursery.start_soon(self._sample_stats)
                if self.recorder is not None:
                    nursery.start_soon(self._record)
        finally:
            with trio.CancelScope(shield=True):
                await self._close()

    def stop_sending(self) -> None:
        """Stop capturing and encoding; the receiver keeps running (lets the far end drain)."""
        self._sending.cancel()

    async def _close(self) -> None:
        for src in (self.video_in, self.audio_in):
            if src is not None:
                with contextlib.suppress(SourceError, OSError, av.FFmpegError):
                    await trio.to_thread.run_sync(src.close)
        if self.recorder is not None:
            # Write what is still queued, then finish the file.
            pending = []
            while True:
                try:
                    pending.append(self._rec_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            await trio.to_thread.run_sync(self._write_batch, pending)
            try:
                await trio.to_thread.run_sync(self.recorder.close)
            except RecorderError as exc:
                self.recorder_error = str(exc)

    def _open_video_encoder(self) -> VideoEncoder:
        p = self.params
        return VideoEncoder(p.codec, p.width, p.height, p.fps, self.rc.video_bitrate)

    # --- sending ---

    def _send(self, data: bytes, now: float) -> None:
        try:
            self.session.send(data)
        except SessionClosed:
            return  # the session reader ends the call
        self.stats.on_sent(len(data), now)

    def _send_media(self, frames: list[EncodedFrame], stream: StreamId, pts: float) -> None:
        pz = self._pz_video if stream is StreamId.VIDEO else self._pz_audio
        now = trio.current_time()
        for ef in frames:
            for pkt in pz.packetize(ef.data, pts, ef.keyframe):
                self.rtx.store(pkt, now)
                self._send(self.rc.prepare(pkt, now), now)
            if self.recorder is not None:
                track = TRACK_LOCAL_VIDEO if stream is StreamId.VIDEO else TRACK_LOCAL_AUDIO
                self._queue_record(track, ef.data, now, ef.keyframe)

    async def _senders(self) -> None:
        with self._sending:
            async with trio.open_nursery() as nursery:
                if self._video_enc is not None:
                    nursery.start_soon(self._send_video)
                if self._audio_enc is not None:
                    nursery.start_soon(self._send_audio)

    async def _send_video(self) -> None:
        assert self._video_enc is not None and self.video_in is not None
        next_t = trio.current_time()
        while True:
            await trio.sleep_until(next_t)
            now = trio.current_time()
            q = self._quality()
            fps = min(self.params.fps, q.fps)
            interval = 1 / fps
            if now - next_t > MAX_CAPTURE_LAG_FRAMES * interval:
                self.capture_skipped += int((now - next_t) / interval)
                next_t = now
            size = _scaled_size(self.params, q)
            bitrate = self.rc.video_bitrate
            force, self._force_key = self._force_key, False
            pts = now - self._t0

            try:
                if self._inline_video_encode:
                    frames = self._capture_encode_video(pts, force, size, fps, bitrate)
                else:
                    frames = await self._enc_video_worker.run(
                        self._capture_encode_video, pts, force, size, fps, bitrate
                    )
            except (CodecError, SourceError) as exc:
                raise PipelineError(f"video sender stopped: {exc}") from exc
            self.video_frames_sent += len(frames)
            self._send_media(frames, StreamId.VIDEO, pts)
            next_t += interval

    def _quality(self) -> VideoQuality:
        """The rung to send at: the call's full size unless loss put us on the ladder."""
        q = self.rc.quality
        top = _ladder_top(self.params.width, self.params.height)
        if self._ladder_active and (q.width, q.height) >= (top.width, top.height):
            self._ladder_active = False
        elif not self._ladder_active and self.rc.loss >= QUALITY_LOSS_TRIGGER:
            self._ladder_active = True
        if self._ladder_active:
            return q
        return VideoQuality(self.params.width, self.params.height, self.params.fps, 0)

    def _capture_encode_video(
        self, pts: float, force: bool, size: tuple[int, int], fps: int, bitrate: int
    ) -> list[EncodedFrame]:
        """Apply the rate controller's choices, grab and encode one frame (worker or inline)."""
        assert self._video_enc is not None and self.video_in is not None
        enc = self._video_enc
        t0 = time.thread_time()
        enc.set_resolution(*size)
        enc.set_fps(fps)
        enc.set_bitrate(bitrate)
        frame = self.video_in.grab(self._stamp_clock())
        frame.pts = round(pts * VIDEO_CLOCK_RATE)
        t1 = time.thread_time()
        out = enc.encode(frame, force)
        t2 = time.thread_time()
        cpu = self.cpu
        cpu["video_capture"] += t1 - t0
        cpu["video_encode"] += t2 - t1
        if self._inline_video_encode:
            self.inline_max = max(self.inline_max, t2 - t0)
        return out

    async def _send_audio(self) -> None:
        assert self._audio_enc is not None and self.audio_in is not None
        enc, src = self._audio_enc, self.audio_in
        start = trio.current_time()
        n = 0
        while True:
            due = start + n * AUDIO_FRAME_S
            await trio.sleep_until(due)
            now = trio.current_time()
            if now - due > AUDIO_FRAME_S * 5:
                # Starved (the machine stalled): restart the pace rather than burst.
                self.capture_skipped += 1
                start, n = now, 0
            pts = start - self._t0 + n * AUDIO_FRAME_S
            samples = round(pts * AUDIO_RATE)

            def capture_encode(samples: int = samples) -> list[EncodedFrame]:
                t0 = time.thread_time()
                frame = src.grab(self._stamp_clock())
                frame.pts = samples
                t1 = time.thread_time()
                out = enc.encode(frame)
                cpu = self.cpu
                cpu["audio_capture"] += t1 - t0
                cpu["audio_encode"] += time.thread_time() - t1
                return out

            try:
                if self.audio_in.spec in INLINE_AUDIO_SOURCES:
                    frames = capture_encode()
                else:  # a device or file read can block: keep it off the trio thread
                    frames = await self._enc_audio_worker.run(capture_encode)
            except (CodecError, SourceError) as exc:
                raise PipelineError(f"audio sender stopped: {exc}") from exc
            self.audio_frames_sent += len(frames)
            self._send_media(frames, StreamId.AUDIO, pts)
            n += 1

    # --- receiving ---

    def handle_datagram(self, data: bytes, now: float) -> ControlPacket | None:
        """Feed one datagram; returns a control packet for the caller to route, else None."""
        try:
            pkt = parse_packet(data)
        except MediaRemoteError:
            self.wire_errors += 1
            return None
        if isinstance(pkt, ControlPacket):
            return pkt
        self.handle_packet(pkt, len(data), now)
        return None

    def handle_packet(self, pkt: Packet, nbytes: int, now: float) -> None:
        """Feed one parsed non-control packet of this call."""
        self.stats.on_received(nbytes, now)
        # The receive timer is woken only when this packet may have moved its deadline earlier
        # (a frame completed, a gap to NACK, a PLI wanted, a feedback report started): waking
        # it for every packet cost more than all the cores together. Feedback, NACK and PLI
        # only move the sender's state, whose one deadline (feedback timeout) moves later.
        if isinstance(pkt, MediaPacket):
            if self._on_media(pkt, now):
                self._wake.set()
        elif isinstance(pkt, FeedbackPacket):
            self.rc.on_feedback(pkt, now)
        elif isinstance(pkt, NackPacket):
            for r in self.rtx.on_nack(pkt, now, self.rc.rtt, self.rc.smoothed_loss):
                self._send(self.rc.prepare(r, now), now)
        elif isinstance(pkt, PliPacket) and self.gate.on_pli(now):
            self._force_key = True

    def _on_media(self, pkt: MediaPacket, now: float) -> bool:
        """Feed one media packet to the receive cores; True if the timer must look again."""
        twcc = self.twcc_gen
        twcc.on_packet(pkt.transport_seq, now)
        wake = (twcc.next_timeout() or 0.0) < self._timer_deadline
        nack = self.nack[pkt.stream]
        missing = nack.missing
        frame_end = pkt.seq - pkt.frag_index + pkt.frag_count - 1
        try:
            if nack.on_packet(pkt.seq, now, frame_end) and (pkt.stream is StreamId.VIDEO):
                self.pli.request()
                wake = True
            frames = self.asm[pkt.stream].push(pkt, now)
        except MediaRemoteError:
            self.wire_errors += 1
            return True
        if nack.missing > missing:
            wake = True
        for frame in frames:
            wake = True
            if frame.stream is StreamId.AUDIO:
                self.abuf.push(frame, now)
            else:
                if frame.keyframe:
                    self.pli.satisfied()
                self._video_events(self.vbuf.push(frame, now))
        return wake

    def _video_events(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, KeyframeNeeded):
                self.pli.request()
            elif isinstance(ev, VideoSkipped):
                self.stats.count("video_frames_skipped", ev.count)

    def _service(self, now: float) -> None:
        """Run every receive-side core whose time has come; send their feedback."""
        if self.session.path_changes != self._path_changes_seen:
            self._path_changes_seen = self.session.path_changes
            self.rc.reset_for_new_path(now)
            self.stats.set_path(self.session.path_kind)
            if self.on_path_change is not None:
                self.on_path_change(self.session.path_kind, self.session.path_changes)
        rtt = self.rc.srtt if self.rc.srtt is not None else self.session.rtt
        if rtt is not None:
            for gen in self.nack.values():
                gen.set_rtt(rtt)
            self.vbuf.set_rtt(rtt)
            self.pli.set_rtt(rtt)
        self.rc.handle_timeout(now)
        for aev in self.abuf.pop(now):
            if isinstance(aev, AudioOut):
                self._play_audio(aev.frame.data)
                if self.recorder is not None:
                    self._queue_record(TRACK_REMOTE_AUDIO, aev.frame.data, now, True)
            elif isinstance(aev, AudioConceal):
                self._play_audio(None)
        for vev in self.vbuf.pop(now):
            if isinstance(vev, VideoOut):
                if self._inline_video_decode:
                    self._show_video(vev.frame.data)
                else:
                    try:
                        self._vq_send.send_nowait(vev.frame)
                    except trio.WouldBlock:
                        # Decoding cannot keep up: the chain is broken now, ask for a keyframe.
                        self.decode_overflows += 1
                        self.pli.request()
                if self.recorder is not None:
                    data, key = vev.frame.data, vev.frame.keyframe
                    self._queue_record(TRACK_REMOTE_VIDEO, data, now, key)
            else:
                self._video_events([vev])
        fb = self.twcc_gen.poll(now)
        if fb is not None:
            self._send(fb.encode(), now)
        for gen in self.nack.values():
            nack = gen.poll(now)
            if nack is not None:
                data = nack.encode()
                for _ in range(gen.copies):  # twice on a lossy path: see feedback.DUPLICATE_LOSS
                    self._send(data, now)
        pli = self.pli.poll(now)
        if pli is not None:
            self._send(pli.encode(), now)

    def _next_deadline(self, now: float) -> float:
        times = [
            self.abuf.next_timeout(),
            self.vbuf.next_timeout(),
            self.twcc_gen.next_timeout(),
            self.pli.next_timeout(),
            self.rc.next_timeout(),
            *(g.next_timeout() for g in self.nack.values()),
        ]
        deadline = min((t for t in times if t is not None), default=now + MAX_TIMER_SLEEP)
        return max(now + MIN_TIMER_SLEEP, min(deadline, now + MAX_TIMER_SLEEP))

    async def _receive_timer(self) -> None:
        while True:
            now = trio.current_time()
            self._service(now)
            self._timer_deadline = self._next_deadline(now)
            with trio.move_on_at(self._timer_deadline):
                await self._wake.wait()
            self._wake = trio.Event()

    def _decode_video_frame(
        self, data: bytes
    ) -> list[tuple[int | None, float | None, tuple[int, int]]]:
        """Decode one frame and read the stamps of its pictures (trio thread or worker)."""
        sink, cpu = self.video_sink, self.cpu
        width, height = self.params.width, self.params.height
        out = []
        t0 = time.thread_time()
        pictures = self._video_dec.decode(data)
        t1 = time.thread_time()
        cpu["video_decode"] += t1 - t0
        if self._inline_video_decode:
            self.inline_max = max(self.inline_max, t1 - t0)
        for picture in pictures:
            counter = latency = None
            size = (picture.width, picture.height)
            if sink.read_stamps:
                if size != (width, height):
                    # Sent smaller (quality ladder): the stamp is laid out for the call size.
                    picture = picture.reformat(width=width, height=height)
                try:
                    stamp = read_stamp(picture)
                except (StampError, ValueError):
                    pass
                else:
                    done = self._stamp_clock()
                    counter, latency = stamp.counter, done - stamp.send_time(done)
            out.append((counter, latency, size))
        cpu["stamp_read"] += time.thread_time() - t1
        return out

    def _render(self, pictures: list[tuple[int | None, float | None, tuple[int, int]]]) -> None:
        now = trio.current_time()
        for counter, latency, size in pictures:
            self.video_sink.on_picture(counter, latency, size)
            self.stats.on_frame_rendered(now)

    def _show_video(self, data: bytes) -> None:
        """Decode and render one frame on the trio thread (see INLINE_VIDEO_MAX_PIXELS)."""
        try:
            pictures = self._decode_video_frame(data)
        except DecodeError:
            self.video_decode_errors += 1
            self.pli.request()
            return
        self._render(pictures)

    async def _decode_video(self) -> None:
        """Decode in a worker thread, fed by the jitter buffer through a short queue."""
        async for frame in self._vq_recv:
            try:
                pictures = await self._dec_video_worker.run(self._decode_video_frame, frame.data)
            except DecodeError:
                self.video_decode_errors += 1
                self.pli.request()
                continue
            self._render(pictures)

    def _play_audio(self, data: bytes | None) -> None:
        """Decode (or conceal, for None) one audio frame inline: see INLINE_AUDIO_SOURCES."""
        t0 = time.thread_time()
        try:
            frames = self._audio_dec.conceal() if data is None else self._audio_dec.decode(data)
        except DecodeError:
            self.stats.count("audio_decode_errors")
            return
        finally:
            self.cpu["audio_decode"] += time.thread_time() - t0
        sink = self.audio_sink
        sink.samples += sum(f.samples for f in frames)
        sink.frames += 1
        if data is None:
            sink.concealed += 1

    # --- recording ---

    def _queue_record(self, track: str, data: bytes, now: float, key: bool) -> None:
        try:
            self._rec_send.send_nowait((track, data, now, key))
        except trio.WouldBlock:
            self.recorder_dropped += 1

    def _write_batch(self, batch: list[tuple[str, bytes, float, bool]]) -> None:
        assert self.recorder is not None
        if self.recorder_error is not None:
            return
        try:
            for track, data, pts, key in batch:
                self.recorder.write(track, data, pts, key)
        except RecorderError as exc:
            self.recorder_error = str(exc)

    async def _record(self) -> None:
        """Write recorded frames in batches, off the trio thread (file writes can block)."""
        async for first in self._rec_recv:
            batch = [first]
            while True:
                try:
                    batch.append(self._rec_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            await trio.to_thread.run_sync(self._write_batch, batch)

    # --- stats ---

    async def _sample_stats(self) -> None:
        while True:
            await trio.sleep(STATS_INTERVAL)
            self.stats.sample(self._update_stats(trio.current_time()))

    def _update_stats(self, now: float) -> float:
        s = self.stats
        s.rtt = self.rc.srtt if self.rc.srtt is not None else self.session.rtt
        s.loss = self.rc.loss
        s.call_loss = self.rc.call_loss
        s.jitter = self.abuf.jitter
        s.target_bitrate = self.rc.target_bitrate
        s.set_path(self.session.path_kind)
        counters = {
            "video_frames_sent": self.video_frames_sent,
            "audio_frames_sent": self.audio_frames_sent,
            "capture_skipped": self.capture_skipped,
            "video_frames_decoded": self.video_sink.frames,
            "audio_frames_decoded": self.audio_sink.frames,
            "nack_recovered": sum(g.recovered for g in self.nack.values()),
            "nacks_sent": sum(g.nacks_sent for g in self.nack.values()),
            "retransmitted": self.rtx.retransmitted,
            "plc_concealed": self.audio_sink.concealed,
            # libopus in-band FEC is unreachable through FFmpeg's decoder: always 0, see docstring.
            "fec_recovered": 0,
            "plis_sent": self.pli.plis_sent,
            "keyframes_forced": self.gate.keyframes_forced,
            "video_decode_errors": self.video_decode_errors,
            "decode_overflows": self.decode_overflows,
            "stamp_errors": self.video_sink.stamp_errors,
            "wire_errors": self.wire_errors,
            "path_resets": self.rc.path_resets,
            "recorder_dropped": self.recorder_dropped,
        }
        for name, value in counters.items():
            s.set_counter(name, value)
        return now

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready stats of the call now (CallStats plus sink figures)."""
        now = self._update_stats(trio.current_time())
        snap = self.stats.snapshot(now)
        enc = self._video_enc
        snap.update(
            {
                "send_size": f"{enc.params.width}x{enc.params.height}" if enc else None,
                "recv_size": "x".join(map(str, self.video_sink.last_size)),
                "latency_ms": self.video_sink.latency_ms(),
                "audio_received_s": round(self.audio_sink.seconds, 2),
                "quality_rung": f"{self.rc.quality.width}x{self.rc.quality.height}"
                f"@{self.rc.quality.fps}",
                "recorder_error": self.recorder_error,
            }
        )
        return snap
