"""Media benchmark: a 1:1 call between two processes over a lossless, zero-delay local link.

Each end runs in its own process (as two daemons would; PyAV's encoders hold the GIL, so two ends
in one process would block each other and overstate jitter), joined by a Unix datagram socket
pair wrapped as a PeerSession. Both send the test pattern (640×480, 30 fps, VP8) and a tone
(Opus) and decode each other. Measured:
- stack-added latency: capture (the stamp's send time, CLOCK_MONOTONIC, shared by processes) →
  decoded picture; the link adds no delay of its own, so this is all ours: encode, packetize,
  jitter buffer (lip-synced to audio), decode, thread hand-offs. Median and p95 over both
  directions, after a short warm-up.
- CPU seconds per call-minute for both ends together: the two processes' CPU time over the call,
  scaled to 60 s. It includes generating the test pattern (a camera costs a colour conversion).

Run: ``.venv/bin/python -m benchmarks.media [SECONDS]`` (default 40 s).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import resource
import socket
import sys
import time
from typing import Any

import trio

from media.callstate import CallParams
from media.pipeline import MediaOptions, MediaPipeline, open_sources
from media.session_api import SessionClosed

DEFAULT_SECONDS = 40.0
# Latency samples from the first seconds are left out: the encoder's first keyframe and the
# jitter buffer's start-up caution are not the steady state a call lives in.
WARMUP_SECONDS = 2.0
# The video jitter buffer budgets one NACK round trip for its first 10 s (jitter.RTX_DELAY_HOLD,
# "start cautious"); samples after this mark show the steady state of a loss-free call.
STEADY_SECONDS = 12.0
WIDTH, HEIGHT, FPS, CODEC = 640, 480, 30, "vp8"
LINK_DELAY = 0.0  # the fake link's one-way delay, subtracted from measured latency
LATENCY_TARGET_MS = 25.0
CPU_TARGET_S_PER_MIN = 13.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan  # e.g. a run with video off
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class _SocketSession:
    """A PeerSession over one end of a Unix datagram socket pair (no crypto: a local link)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._raw = sock  # a plain non-blocking socket: sends never wait, receives drain
        self.peer_public_key = bytes(32)
        self.path_kind = "direct"
        self.path_changes = 0
        self.rtt: float | None = None
        self.closed = False
        self.dropped = 0

    def send(self, data: bytes) -> None:
        try:
            self._raw.send(data)
        except BlockingIOError:
            self.dropped += 1  # a full socket buffer is loss, as on a real link

    async def receive(self) -> bytes:
        return (await self.receive_batch(1))[0]

    async def receive_batch(self, max_count: int = 256) -> list[bytes]:
        """What is queued (at least one datagram), read until EAGAIN with one wait at most, as
        overlay.sessions.PeerSession.receive_batch does for the daemon's sessions."""
        out: list[bytes] = []
        while True:
            try:
                while len(out) < max_count:
                    out.append(self._raw.recv(2048))
            except BlockingIOError:
                pass
            except OSError as exc:
                raise SessionClosed(str(exc)) from None
            if out:
                return out
            await trio.lowlevel.wait_readable(self._raw)


async def _end(sock: socket.socket, seconds: float, start_at: float) -> dict[str, Any]:
    """One end of the call: send, receive, and measure for `seconds` from `start_at`."""
    params = CallParams(CODEC, WIDTH, HEIGHT, FPS)
    session = _SocketSession(sock)
    pipeline = MediaPipeline(
        session, params, open_sources(MediaOptions(width=WIDTH, height=HEIGHT, fps=FPS))
    )
    await trio.sleep(max(0.0, start_at - time.monotonic()))

    async def pump() -> None:
        while True:
            batch = await session.receive_batch()
            now = trio.current_time()
            for data in batch:
                pipeline.handle_datagram(data, now)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipeline.run)
        nursery.start_soon(pump)
        cpu0, main0, wall0 = time.process_time(), time.thread_time(), time.monotonic()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        stages0 = dict(pipeline.cpu)
        await trio.sleep(WARMUP_SECONDS)
        warm = len(pipeline.video_sink.latencies)
        await trio.sleep(max(0.0, STEADY_SECONDS - WARMUP_SECONDS))
        steady = len(pipeline.video_sink.latencies)
        await trio.sleep(max(0.0, seconds - STEADY_SECONDS))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        main_cpu = time.thread_time() - main0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        stages = {k: v - stages0[k] for k, v in pipeline.cpu.items()}
        snap = pipeline.snapshot()
        nursery.cancel_scope.cancel()
    return {
        "cpu": cpu,
        "main_cpu": main_cpu,
        # Voluntary context switches: how often the process slept and was woken. On the 2-core
        # VM this was measured on, a bare trio sleep/wake loop cost 0.15-0.4 ms of CPU per
        # wake-up (trio.sleep(0): 11 µs; time.sleep: 63 µs), so wake-ups are a cost of their own.
        "wakeups": ru.ru_nvcsw - ru0.ru_nvcsw,
        "stages": stages,
        "inline_max": pipeline.inline_max,
        "wall": wall,
        "latencies": [x - LINK_DELAY for x in list(pipeline.video_sink.latencies)[warm:]],
        "steady": steady - warm,
        "sent": pipeline.video_frames_sent,
        "decoded": pipeline.video_sink.frames,
        "bitrate_sent": snap["bitrate_sent"],
        "send_size": snap["send_size"],
        "link_drops": session.dropped,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _child(sock: socket.socket, seconds: float, start_at: float, out: Any) -> None:
    out.send(trio.run(_end, sock, seconds, start_at))
    out.close()


def _call(seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    socks = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    start_at = time.monotonic() + 1.0  # both ends start together, after forking
    pipes, procs = [], []
    for sock in socks:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(sock, seconds, start_at, send))
        proc.start()
        pipes.append(recv)
        procs.append(proc)
    ends = [p.recv() for p in pipes]
    for proc in procs:
        proc.join()
    latencies = [x for e in ends for x in e["latencies"]]
    steady = [x for e in ends for x in e["latencies"][e["steady"] :]] or [math.nan]
    wall = max(e["wall"] for e in ends)
    per_min = 60 / wall
    stages = {k: sum(e["stages"][k] for e in ends) * per_min for k in ends[0]["stages"]}
    total = sum(e["cpu"] for e in ends) * per_min
    return {
        "setup": f"{WIDTH}x{HEIGHT}@{FPS} {CODEC} + opus, both directions, two processes, "
        "lossless 0-delay link",
        "call_seconds": round(wall, 1),
        "latency_ms_median": round(1000 * _percentile(latencies, 0.5), 1),
        "latency_ms_p95": round(1000 * _percentile(latencies, 0.95), 1),
        "latency_samples": len(latencies),
        "latency_ms_median_after_12s": round(1000 * _percentile(steady, 0.5), 1),
        "latency_ms_p95_after_12s": round(1000 * _percentile(steady, 0.95), 1),
        "latency_target_ms": LATENCY_TARGET_MS,
        "cpu_s_per_call_minute": round(total, 2),
        "cpu_target_s_per_minute": CPU_TARGET_S_PER_MIN,
        # Where it went, CPU-s per call-minute for both ends, measured as thread CPU time around
        # each stage (wherever it ran); "rest" is everything else: packetizing, wire parsing,
        # jitter buffers, NACK/feedback/rate control, stats, socket calls, trio's scheduler,
        # worker hand-offs, and the interpreter's own threads.
        "cpu_by_stage_s_per_call_minute": {
            **{k: round(v, 2) for k, v in stages.items()},
            "rest": round(total - sum(stages.values()), 2),
        },
        # Of the total, the trio thread's share (with codecs inline: nearly all of it).
        "cpu_trio_thread_s_per_call_minute": round(sum(e["main_cpu"] for e in ends) * per_min, 2),
        # The longest codec call made on the trio thread: how long it held up packets and timers.
        "inline_codec_max_ms": round(1000 * max(e["inline_max"] for e in ends), 2),
        "wakeups_per_s_per_end": round(sum(e["wakeups"] for e in ends) / wall / len(ends)),
        "video_frames_sent": sum(e["sent"] for e in ends),
        "video_frames_decoded": sum(e["decoded"] for e in ends),
        "link_drops": sum(e["link_drops"] for e in ends),
        "bitrate_sent_bps": [e["bitrate_sent"] for e in ends],
        "send_sizes": [e["send_size"] for e in ends],
        "max_rss_mb_per_end": [e["max_rss_mb"] for e in ends],
    }


def main(seconds: float = DEFAULT_SECONDS) -> dict[str, Any]:
    """Run the call, print the figures as JSON and return them."""
    result = _call(seconds)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SECONDS)
