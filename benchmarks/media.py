"""Media benchmark: a 1:1 call in one process over an in-memory, lossless, zero-delay session.

Both ends send the test pattern (640×480, 30 fps, VP8) and a tone (Opus), and decode each other.
Measured:
- stack-added latency: capture (the stamp's send time) → decoded picture, read back from the
  stamp; the fake link adds no delay, so this is all ours: encode, packetize, jitter buffer
  (with lip sync to audio), decode, thread hand-offs. Median and p95 over both directions, after a
  short warm-up.
- CPU seconds per call-minute for both ends together: process CPU time over the call, scaled to
  60 s. It includes generating the test pattern (a camera costs a colour conversion instead).

Run: ``.venv/bin/python -m benchmarks.media [SECONDS]`` (default 40 s).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import trio

from media.callstate import CallParams
from media.pipeline import MediaOptions, MediaPipeline, open_sources
from tests.test_media_pipeline import pump, session_pair

DEFAULT_SECONDS = 40.0
# Latency samples from the first seconds are left out: the encoder's first keyframe and the
# jitter buffer's start-up caution are not the steady state a call lives in.
WARMUP_SECONDS = 2.0
WIDTH, HEIGHT, FPS, CODEC = 640, 480, 30, "vp8"
LINK_DELAY = 0.0  # the fake link's one-way delay, subtracted from measured latency
LATENCY_TARGET_MS = 25.0
CPU_TARGET_S_PER_MIN = 13.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _call(seconds: float) -> dict[str, Any]:
    params = CallParams(CODEC, WIDTH, HEIGHT, FPS)
    options = MediaOptions(width=WIDTH, height=HEIGHT, fps=FPS)
    a, b = session_pair(delay=LINK_DELAY)
    pa = MediaPipeline(a, params, open_sources(options))
    pb = MediaPipeline(b, params, open_sources(options))
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    warm: dict[int, int] = {}
    async with trio.open_nursery() as nursery:
        for session, pipeline in ((a, pa), (b, pb)):
            nursery.start_soon(pipeline.run)
            nursery.start_soon(pump, session, pipeline)
        await trio.sleep(WARMUP_SECONDS)
        warm = {id(p): len(p.video_sink.latencies) for p in (pa, pb)}
        await trio.sleep(seconds - WARMUP_SECONDS)
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        snaps = [pa.snapshot(), pb.snapshot()]
        nursery.cancel_scope.cancel()
    latencies = [
        x - LINK_DELAY for p in (pa, pb) for x in list(p.video_sink.latencies)[warm[id(p)] :]
    ]
    sent = pa.video_frames_sent + pb.video_frames_sent
    decoded = pa.video_sink.frames + pb.video_sink.frames
    return {
        "setup": f"{WIDTH}x{HEIGHT}@{FPS} {CODEC} + opus, both directions, lossless 0-delay link",
        "call_seconds": round(wall, 1),
        "latency_ms_median": round(1000 * _percentile(latencies, 0.5), 1),
        "latency_ms_p95": round(1000 * _percentile(latencies, 0.95), 1),
        "latency_samples": len(latencies),
        "latency_target_ms": LATENCY_TARGET_MS,
        "cpu_s_per_call_minute": round(cpu * 60 / wall, 2),
        "cpu_target_s_per_minute": CPU_TARGET_S_PER_MIN,
        "video_frames_sent": sent,
        "video_frames_decoded": decoded,
        "bitrate_sent_bps": [s["bitrate_sent"] for s in snaps],
        "send_sizes": [s["send_size"] for s in snaps],
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(seconds: float = DEFAULT_SECONDS) -> dict[str, Any]:
    """Run the call, print the figures as JSON and return them."""
    result = trio.run(_call, seconds)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SECONDS)
