"""DHT benchmark: 30 real `3bc daemon` processes on loopback.

Measures lookup latency and hops (every node looks up a sample of others through the CLI's
control socket), idle RSS per daemon, and idle traffic per daemon over a real window. Because the
daemon's maintenance timers run on a 15-60 minute scale, idle traffic is also computed over two
simulated hours of the same DhtCore and config (tests/dhtnet.py), which a short real window
cannot show.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cli.client import ControlClient

NODES = 30
IDLE_WINDOW = 60.0
# Joining refreshes every bucket once (Kademlia's join rule) and publishes: idle is after that.
SETTLE = 30.0
SIMULATED_IDLE = 7200.0


def _free_ports(count: int) -> list[int]:
    import socket

    socks, ports = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_socket(state: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state / "control.sock").exists():
            try:
                with ControlClient(state, 2) as c:
                    c.call("node.info")
                return
            except Exception:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"daemon in {state} did not come up")


def real_daemons(nodes: int = NODES, idle_window: float = IDLE_WINDOW) -> dict[str, Any]:
    exe = [sys.executable, "-m", "cli.main"]
    with tempfile.TemporaryDirectory(prefix="3bc-bench-") as root:
        ports = _free_ports(nodes)
        procs = []
        states = []
        try:
            for i, port in enumerate(ports):
                state = Path(root) / f"n{i}"
                args = [
                    *exe,
                    "--state-dir",
                    str(state),
                    "daemon",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--log-level",
                    "warning",
                ]
                if i:
                    args += ["--bootstrap", f"127.0.0.1:{ports[0]}"]
                procs.append(
                    subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
                states.append(state)
                _wait_socket(state)
            time.sleep(3)
            keys = []
            for state in states:
                with ControlClient(state) as c:
                    keys.append(c.call("node.info")["public_key"])
            latencies, hops, queries, ok, total = [], [], [], 0, 0
            for i, state in enumerate(states):
                with ControlClient(state) as c:
                    for j in range(1, 6):
                        key = keys[(i + j * 5) % nodes]
                        if key == keys[i]:
                            continue
                        total += 1
                        t0 = time.perf_counter()
                        try:
                            r = c.call("dht.lookup", public_key=key, timeout=5.0)
                        except Exception:
                            continue
                        latencies.append((time.perf_counter() - t0) * 1000)
                        ok += 1
                        hops.append(r["hops"])
                        queries.append(r["queries"])
            time.sleep(SETTLE)  # start-up bucket refreshes and first announcements done
            before = []
            for state in states:
                with ControlClient(state) as c:
                    d = c.call("node.info")["dht"]
                before.append(d["bytes_sent"] + d["bytes_received"])
            t0 = time.monotonic()
            time.sleep(idle_window)
            elapsed = time.monotonic() - t0
            after = []
            for state in states:
                with ControlClient(state) as c:
                    d = c.call("node.info")["dht"]
                after.append(d["bytes_sent"] + d["bytes_received"])
            rss = [_rss_mb(p.pid) for p in procs]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    traffic = [(a - b) / elapsed for a, b in zip(after, before, strict=True)]
    latencies.sort()
    return {
        "nodes": nodes,
        "lookups": total,
        "lookup_success": ok / total if total else 0.0,
        "lookup_ms_median": round(statistics.median(latencies), 2),
        "lookup_ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
        "hops_median": statistics.median(hops),
        "hops_max": max(hops),
        "queries_median": statistics.median(queries),
        "idle_rss_mb_median": round(statistics.median(rss), 1),
        "idle_rss_mb_max": round(max(rss), 1),
        "idle_window_s": round(elapsed, 1),
        "idle_traffic_bytes_per_s_median": round(statistics.median(traffic), 1),
        "idle_traffic_bytes_per_s_max": round(max(traffic), 1),
    }


def simulated_idle(nodes: int = NODES, seconds: float = SIMULATED_IDLE) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.dhtnet import MemoryNet

    net = MemoryNet(seed=42)
    addrs = net.build(nodes)
    before = {a: net.nodes[a].stats.bytes_sent + net.nodes[a].stats.bytes_received for a in addrs}
    net.run_for(seconds)
    rates = [
        (net.nodes[a].stats.bytes_sent + net.nodes[a].stats.bytes_received - before[a]) / seconds
        for a in addrs
    ]
    return {
        "nodes": nodes,
        "simulated_s": seconds,
        "idle_traffic_bytes_per_s_median": round(statistics.median(rates), 1),
        "idle_traffic_bytes_per_s_max": round(max(rates), 1),
    }


def main() -> dict[str, Any]:
    result = {"real": real_daemons(), "simulated_idle": simulated_idle()}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
