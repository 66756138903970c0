"""A deterministic lossy call: two pipelines in one process over an in-memory link, virtual time.

The same media stack as a real call (test pattern 640×480 at 30 fps, VP8 + Opus, NACK, PLI, rate
control) joined by a link with a fixed one-way delay and seeded random loss, run on trio's
MockClock (autojump): codec time costs no virtual time and a seed fixes the loss pattern, so a
change to loss recovery can be judged in a minute instead of across noisy NAT-bed runs. Not
bit-exact: the codecs run in worker threads, so which frame a loss hits can shift between runs
(seed 1, 60 s: 0.0 and 0.27 s frozen per minute in two runs of the same tree).
``benchmarks.nat_call`` stays the real-network check.

Run: ``.venv/bin/python -m benchmarks.lossy_call [SECONDS] [--loss 0.10] [--delay 0.05]
[--seed 1] [--json]`` (defaults: 60 s, 10 % loss each way, 50 ms one way, seed 1).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio
import trio.testing

from media.callstate import CallParams
from media.pipeline import MediaOptions, MediaPipeline, open_sources
from tests.media_link import session_pair, start_virtual_call

WIDTH, HEIGHT, FPS, CODEC = 640, 480, 30, "vp8"
DRAIN = 1.0


def _instrument(p: MediaPipeline, log: list[str]) -> None:
    """Log, on `p`'s receive side, each freeze and what happened around it (--verbose)."""
    stats, vbuf, pli = p.stats, p.vbuf, p.pli
    on_rendered, video_events, pli_poll = stats.on_frame_rendered, p._video_events, pli.poll
    vbuf_push = vbuf.push

    def rendered(now: float) -> None:
        before = stats.freezes
        last = stats._last_render
        on_rendered(now)
        if stats.freezes > before and last is not None:
            log.append(f"{now:8.3f} FREEZE {now - last:.3f}s")

    def events(evs: list[Any]) -> None:
        for ev in evs:
            log.append(f"{trio.current_time():8.3f} {type(ev).__name__} {ev}")
        video_events(evs)

    def poll(now: float) -> Any:
        out = pli_poll(now)
        if out is not None:
            log.append(f"{now:8.3f} PLI sent")
        return out

    def push(frame: Any, now: float) -> Any:
        if frame.keyframe:
            log.append(f"{now:8.3f} keyframe {frame.frame_id} complete")
        return vbuf_push(frame, now)

    stats.on_frame_rendered = rendered  # type: ignore[method-assign]
    p._video_events = events  # type: ignore[method-assign]
    pli.poll = poll  # type: ignore[method-assign]
    vbuf.push = push  # type: ignore[method-assign]


async def _call(
    clock: trio.testing.MockClock,
    seconds: float,
    loss: float,
    delay: float,
    seed: int,
    verbose: bool,
) -> dict[str, Any]:
    a, b = session_pair(seed, loss=loss, delay=delay)
    params = CallParams(CODEC, WIDTH, HEIGHT, FPS)
    options = MediaOptions(width=WIDTH, height=HEIGHT, fps=FPS)
    pipes = [
        MediaPipeline(s, params, open_sources(options), stamp_clock=trio.current_time)
        for s in (a, b)
    ]
    fps_samples: list[list[float]] = [[], []]
    trace: list[list[str]] = [[], []]
    if verbose:
        for i, p in enumerate(pipes):
            _instrument(p, trace[i])

    async def sample_fps() -> None:
        while True:
            await trio.sleep(1.0)
            for i, p in enumerate(pipes):
                fps_samples[i].append(p.rc.quality.fps if p._ladder_active else FPS)

    async with trio.open_nursery() as nursery:
        await start_virtual_call(nursery, (a, b), pipes, clock)
        nursery.start_soon(sample_fps)
        await trio.sleep(seconds)
        snaps = [p.snapshot() for p in pipes]
        for p in pipes:
            p.stop_sending()
        await trio.sleep(DRAIN)
        nursery.cancel_scope.cancel()
    minutes = seconds / 60
    out: dict[str, Any] = {"seconds": seconds, "loss": loss, "delay": delay, "seed": seed}
    for name, rx, tx in (("a", pipes[0], pipes[1]), ("b", pipes[1], pipes[0])):
        snap = snaps[pipes.index(rx)]
        if verbose:
            out[name + "_trace"] = trace[pipes.index(rx)]
        c = snap["counters"]
        out[name] = {
            "frozen_s_per_min": round(snap["frozen"] / minutes, 2),
            "freezes": snap["freezes"],
            "frames_sent_by_peer": tx.video_frames_sent,
            "frames_rendered": snap["frames_rendered"],
            "avg_rendered_fps": round(snap["frames_rendered"] / seconds, 1),
            "peer_rung_fps_mean": round(
                sum(fps_samples[pipes.index(tx)]) / max(1, len(fps_samples[pipes.index(tx)])), 1
            ),
            "nack_recovered_per_min": round(c["nack_recovered"] / minutes),
            "nacks_sent": c["nacks_sent"],
            "plis_sent": c["plis_sent"],
            "keyframes_forced_by_peer": tx.gate.keyframes_forced,
            "video_frames_skipped": c.get("video_frames_skipped", 0),
            "decode_errors": c["video_decode_errors"],
            "plc_concealed_per_min": round(c["plc_concealed"] / minutes),
            "peer_target_kbps_end": round(tx.rc.target_bitrate / 1000),
            "peer_loss_seen": round(tx.rc.call_loss, 3),
            "rtt_ms": snap["rtt_ms"],
            "latency_ms": snap["latency_ms"],
        }
    return out


def run(
    seconds: float = 60.0,
    loss: float = 0.10,
    delay: float = 0.050,
    seed: int = 1,
    verbose: bool = False,
) -> dict[str, Any]:
    clock = trio.testing.MockClock()
    return trio.run(_call, clock, seconds, loss, delay, seed, verbose, clock=clock)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seconds", type=float, nargs="?", default=60.0)
    ap.add_argument("--loss", type=float, default=0.10)
    ap.add_argument("--delay", type=float, default=0.050)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="log each freeze and its context")
    args = ap.parse_args()
    result = run(args.seconds, args.loss, args.delay, args.seed, args.verbose)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name in ("a", "b"):
        if args.verbose:
            print("\n".join(result[name + "_trace"]))
        r = result[name]
        print(
            f"{name}: frozen {r['frozen_s_per_min']} s/min ({r['freezes']} freezes), "
            f"{r['avg_rendered_fps']} fps rendered (peer rung {r['peer_rung_fps_mean']}), "
            f"NACK recovered {r['nack_recovered_per_min']}/min, PLIs {r['plis_sent']}, "
            f"skipped {r['video_frames_skipped']}, PLC {r['plc_concealed_per_min']}/min, "
            f"peer target {r['peer_target_kbps_end']} kb/s, latency {r['latency_ms']}"
        )


if __name__ == "__main__":
    main()
