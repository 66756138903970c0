"""Crash-safe call recorder: encoded packets (no re-encode) into WebM/Matroska as they arrive.

Crash safety, as measured with PyAV 18 / FFmpeg 8 (tests/test_media_recorder.py SIGKILLs a
recording process and reopens its file):
- ``live=1`` makes the matroska muxer write an unknown-size segment and no seek-back at close, so
  a file cut anywhere is still a valid stream of clusters that the demuxer reads to the end.
- The muxer holds the open cluster in memory, so ``cluster_time_limit`` bounds what a kill loses.
- ``flush_packets=1`` pushes every finished cluster through the IO buffer to the kernel at once.
- ``max_interleave_delta`` stops the interleaver from holding packets of one track while it waits
  for a silent other track (its default waits up to 10 s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import av

from media.codecs import VIDEO_ENCODER_OPTIONS

# Packets' timestamps are wall-clock seconds; Matroska counts milliseconds.
_MS = Fraction(1, 1000)
# A cluster closes after this much media time: a SIGKILL loses at most this much (plus one frame).
CLUSTER_TIME_LIMIT_MS = 500
# The interleaver may hold a packet at most this long waiting for other tracks (microseconds).
MAX_INTERLEAVE_DELTA_US = 500_000
RECORDABLE_CODECS = {"video": ("vp8", "h264", "av1"), "audio": ("opus",)}
# PyAV opens an encoder per output stream to fill the codec-private data (OpusHead, avcC, av1C).
# Opened with our call settings, its headers match the packets we mux; decoders also take the
# in-band ones (SPS/PPS, sequence header), so a mismatch would not break playback.
_MUXER_CODEC = {"vp8": "libvpx", "h264": "libx264", "av1": "libsvtav1", "opus": "libopus"}
# WebM admits VP8/AV1/Opus only; H.264 needs plain Matroska (same muxer, same crash behaviour).
_WEBM_CODECS = {"vp8", "av1", "opus"}
_AUDIO_RATE = 48_000


class RecorderError(Exception):
    """The recording cannot be made or continued (bad track list, unwritable path, closed)."""


@dataclass(frozen=True, slots=True)
class TrackSpec:
    """One track of the recording, e.g. ``TrackSpec("remote-video", "video", "vp8", 640, 480)``."""

    track_id: str
    kind: str  # "video" or "audio"
    codec: str
    width: int = 640
    height: int = 480


class Recorder:
    """Writes encoded frames of several tracks into one WebM file as they arrive.

    ``write`` does a small blocking file write; a trio caller with a slow disk should call it via
    ``trio.to_thread.run_sync``.
    """

    def __init__(self, path: str | os.PathLike[str], tracks: list[TrackSpec]) -> None:
        if not tracks:
            raise RecorderError("a recording needs at least one track")
        ids = [t.track_id for t in tracks]
        if len(set(ids)) != len(ids):
            raise RecorderError(f"track ids must be unique, got {ids}")
        for t in tracks:
            if t.codec not in RECORDABLE_CODECS.get(t.kind, ()):
                raise RecorderError(
                    f"track {t.track_id!r}: cannot record {t.kind} codec {t.codec!r}; "
                    f"supported: {RECORDABLE_CODECS}"
                )
        self.path = os.fspath(path)
        try:
            # FFmpeg opens the file only at the first packet; fail here, where the caller asked.
            with open(self.path, "wb"):
                pass
            self._out = av.open(
                self.path,
                "w",
                format="webm" if {t.codec for t in tracks} <= _WEBM_CODECS else "matroska",
                options={
                    "live": "1",
                    "cluster_time_limit": str(CLUSTER_TIME_LIMIT_MS),
                    "flush_packets": "1",
                },
                container_options={"max_interleave_delta": str(MAX_INTERLEAVE_DELTA_US)},
            )
        except (av.FFmpegError, OSError) as exc:
            raise RecorderError(f"cannot create recording {self.path}: {exc}") from exc
        self._streams: dict[str, av.stream.Stream] = {}
        self._kinds: dict[str, str] = {}
        for t in tracks:
            if t.kind == "video":
                stream = self._out.add_stream(_MUXER_CODEC[t.codec], rate=30)
                stream.width, stream.height = t.width, t.height
                stream.pix_fmt = "yuv420p"
                stream.codec_context.options = dict(VIDEO_ENCODER_OPTIONS[t.codec])
            else:
                stream = self._out.add_stream(_MUXER_CODEC[t.codec], rate=_AUDIO_RATE)
                stream.layout = "mono"
            self._streams[t.track_id] = stream
            self._kinds[t.track_id] = t.kind
        self._t0: float | None = None
        self._last_pts: dict[str, int] = {}
        self._waiting_key = {tid for tid, kind in self._kinds.items() if kind == "video"}
        self._closed = False
        self.frames_written = dict.fromkeys(self._streams, 0)

    def write(self, track_id: str, data: bytes, pts_seconds: float, keyframe: bool) -> None:
        """Append one encoded frame; video before its first keyframe is dropped (undecodable)."""
        if self._closed:
            raise RecorderError(f"recording {self.path} is closed")
        stream = self._streams.get(track_id)
        if stream is None:
            raise RecorderError(f"unknown track {track_id!r}; known: {sorted(self._streams)}")
        if not data:
            return
        if track_id in self._waiting_key:
            if not keyframe:
                return
            self._waiting_key.discard(track_id)
        if self._t0 is None:
            self._t0 = pts_seconds
        # Late packets from before the first one clamp to 0; each track stays strictly increasing.
        pts = max(0, round((pts_seconds - self._t0) * 1000))
        last = self._last_pts.get(track_id)
        if last is not None and pts <= last:
            pts = last + 1
        self._last_pts[track_id] = pts
        packet = av.Packet(data)
        packet.stream = stream
        packet.time_base = _MS
        packet.pts = packet.dts = pts
        packet.is_keyframe = keyframe or self._kinds[track_id] == "audio"
        try:
            self._out.mux(packet)
        except (av.FFmpegError, OSError) as exc:
            raise RecorderError(f"cannot write to recording {self.path}: {exc}") from exc
        self.frames_written[track_id] += 1

    def close(self) -> None:
        """Flush and finish the file (a killed process leaves a readable file too)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._out.close()
        except (av.FFmpegError, OSError) as exc:
            raise RecorderError(f"cannot finish recording {self.path}: {exc}") from exc

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
