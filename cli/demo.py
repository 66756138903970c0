"""`make demo`: a real call between local daemons, recorded, with its stats and quality report.

Three `3bc daemon` processes on 127.0.0.1 — a public bootstrap node that is also a blind relay,
Alice and Bob — then Alice calls Bob (who answers calls from his contacts) with the test pattern
and tone for 10 seconds, recording both directions. Everything goes through the same CLI and
control socket a person would use. Output: demo-out/call.mkv and demo-out/call-report.png.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path("demo-out")
CALL_SECONDS = 10


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(state: Path, *args: str, timeout: float = 60, as_json: bool = True) -> Any:
    """Run `3bc --state-dir STATE ARGS [--json]` and return its JSON (or its text)."""
    argv = [sys.executable, "-m", "cli.main", "--state-dir", str(state), *args]
    if as_json:
        argv.append("--json")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"demo: `3bc {' '.join(args)}` failed: {done.stderr.strip()}")
    return json.loads(done.stdout) if as_json else done.stdout


def start_daemon(root: Path, name: str, port: int, *args: str) -> tuple[Path, subprocess.Popen]:
    state = root / name
    log = open(OUT / f"{name}.log", "w")  # noqa: SIM115 - open for the daemon's lifetime
    return state, subprocess.Popen(
        daemon_argv(state, port, *args), stdout=log, stderr=subprocess.STDOUT
    )


def daemon_argv(state: Path, port: int, *args: str) -> list[str]:
    """`3bc daemon` on 127.0.0.1:port without ICE (loopback needs none): demo, tests, benchmarks."""
    return [
        sys.executable,
        "-m",
        "cli.main",
        "--state-dir",
        str(state),
        "daemon",
        "--listen",
        f"127.0.0.1:{port}",
        "--no-ice",
        *args,
    ]


def wait_ready(state: Path, proc: subprocess.Popen, peers: int) -> dict[str, Any]:
    from cli.client import ClientError, ControlClient

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: a daemon exited early; see {OUT}/*.log")
        try:
            with ControlClient(state, 5) as client:
                info = client.call("node.info")
            if info["peers"] >= peers:
                return info
        except (ClientError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit("demo: daemons did not come up within 30 s")


def count_recording(path: Path) -> dict[str, Any]:
    import av

    tracks: dict[str, Any] = {}
    with av.open(str(path)) as container:
        for stream in container.streams:
            tracks[str(stream.index)] = {"type": stream.type, "packets": 0, "seconds": 0.0}
        for packet in container.demux():
            if packet.size == 0:
                continue
            track = tracks[str(packet.stream.index)]
            track["packets"] += 1
            if packet.stream.type == "audio" and packet.duration and packet.time_base:
                track["seconds"] += float(packet.duration * packet.time_base)
    return tracks


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()
    procs: list[subprocess.Popen] = []
    root = Path(tempfile.mkdtemp(prefix="3bc-demo-"))
    try:
        step("starting three daemons on 127.0.0.1: a public relay/bootstrap node, Alice, Bob")
        relay_port = free_port()
        relay, p = start_daemon(root, "relay", relay_port, "--relay")
        procs.append(p)
        wait_ready(relay, p, 0)
        boot = f"127.0.0.1:{relay_port}"
        alice, p = start_daemon(root, "alice", free_port(), "--bootstrap", boot)
        procs.append(p)
        bob, p = start_daemon(
            root, "bob", free_port(), "--bootstrap", boot, "--auto-answer", "contacts"
        )
        procs.append(p)
        a_info = wait_ready(alice, procs[1], 1)
        b_info = wait_ready(bob, procs[2], 1)
        print(f"    Alice {a_info['public_key']}  ({' '.join(a_info['safety_words'])})")
        print(f"    Bob   {b_info['public_key']}  ({' '.join(b_info['safety_words'])})")
        cli(bob, "contacts", "add", a_info["public_key"], "alice", as_json=False)
        print("    Bob adds Alice to his contacts and answers his contacts' calls")
        time.sleep(1.5)  # records published with their relay hints

        step("Alice finds Bob by his key in the DHT")
        found = cli(alice, "lookup", b_info["public_key"])
        print(
            f"    signed record seq {found['seq']}: {', '.join(found['addresses'])} "
            f"in {found['latency_ms']} ms ({found['queries']} queries)"
        )

        step("Alice opens an encrypted session to Bob")
        ping = cli(alice, "ping", b_info["public_key"], "--count", "3", "--interval", "0.2")
        print(f"    {ping['path']} path, set up in {ping['setup_ms']} ms, rtt {ping['rtt_ms']} ms")

        step(f"Alice calls Bob for {CALL_SECONDS} s (VP8 640x480@30 + Opus), recording")
        record = OUT / "call.mkv"
        result = cli(
            alice,
            "call",
            b_info["public_key"],
            "--duration",
            str(CALL_SECONDS),
            "--record",
            str(record.resolve()),
            timeout=CALL_SECONDS + 90,
        )
        call = result["call"]
        stats = call["stats"] or {}
        counters = stats.get("counters", {})
        report = Path(call["report_file"]) if call.get("report_file") else None
        if report is not None and report.exists():
            report.rename(OUT / "call-report.png")
        bob_calls = cli(bob, "calls")
        bob_id = next((c["call_id"] for c in bob_calls if c["peer"] == a_info["public_key"]), None)
        bob_call = cli(bob, "stats", bob_id) if bob_id else {}
        bob_counters = (bob_call.get("stats") or {}).get("counters", {})
        print(
            f"    ended: {call['end_reason']} after {call['duration_s']} s over a "
            f"{call['path']} path ({call['codec']} {call['size']})"
        )
        print(f"    Bob was told the call is recorded: {bob_call.get('remote_recording')}")
        print(
            f"    video frames: Alice sent {counters.get('video_frames_sent')}, "
            f"Bob sent {bob_counters.get('video_frames_sent')}, "
            f"Alice rendered {stats.get('frames_rendered')}, "
            f"frozen {stats.get('frozen')} s"
        )
        lat = stats.get("latency_ms") or {}
        print(
            f"    capture to display latency: median {lat.get('median')} ms, "
            f"p95 {lat.get('p95')} ms; rtt {stats.get('rtt_ms')} ms"
        )

        step("checking the recording with PyAV")
        tracks = count_recording(record)
        for index, track in tracks.items():
            extra = f", {track['seconds']:.2f} s" if track["type"] == "audio" else ""
            print(f"    track {index}: {track['type']}, {track['packets']} packets{extra}")
        video = sorted(t["packets"] for t in tracks.values() if t["type"] == "video")
        sent = sorted(
            x
            for x in (counters.get("video_frames_sent"), bob_counters.get("video_frames_sent"))
            if x
        )
        ok = (
            bool(video)
            and len(video) == len(sent)
            and all(v >= 0.95 * s for v, s in zip(video, sent, strict=True))
        )
        print(
            f"    {'OK' if ok else 'SHORT'}: recording holds "
            f"{' and '.join(str(v) for v in video)} video frames of "
            f"{' and '.join(str(s) for s in sent)} sent"
        )
        step("done")
        print(f"    {OUT / 'call.mkv'}\n    {OUT / 'call-report.png'}\n    logs: {OUT}/*.log")
        if not ok:
            raise SystemExit(1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
