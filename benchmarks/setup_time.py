"""Session setup time: loopback, and across the NAT bed with 50 ms of added delay.

Setup = from `3bc ping`'s connect (DHT lookup of the callee's record, handshake through a hint
node or straight to the callee, first live path) to the session being usable. Needs root and the
NAT bed for the second figure; where the bed cannot be built this says so and reports loopback only.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cli.client import ClientError, ControlClient

REPEATS = 5


def loopback(repeats: int = REPEATS) -> dict[str, Any]:
    samples = []
    for _ in range(repeats):
        samples.append(_one_loopback())
    return {"samples_ms": samples, "median_ms": round(statistics.median(samples), 1)}


def _one_loopback() -> float:
    from benchmarks.dht import _free_ports, _wait_socket
    from cli.demo import daemon_argv

    with tempfile.TemporaryDirectory(prefix="3bc-setup-") as root:
        ports = _free_ports(3)
        procs = []
        try:
            states = []
            for i, port in enumerate(ports):
                state = Path(root) / f"n{i}"
                args = daemon_argv(state, port, "--log-level", "warning")
                if i == 0:
                    args.append("--relay")
                else:
                    args += ["--bootstrap", f"127.0.0.1:{ports[0]}"]
                procs.append(
                    subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
                states.append(state)
                _wait_socket(state)
            time.sleep(2.5)
            with ControlClient(states[2]) as c:
                key = c.call("node.info")["public_key"]
            with ControlClient(states[1], 60) as c:
                return c.call("session.ping", public_key=key, count=1, interval=0)["setup_ms"]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)


def nat_bed(repeats: int = REPEATS, delay_ms: int = 50) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.nat.conftest import missing_capability

    reason = missing_capability()
    if reason is not None:
        return {"skipped": f"NAT bed not available here: {reason}"}
    from tests.nat.daemons import start_daemon, wait_ready
    from tests.nat.netbed import NetBed

    out: dict[str, Any] = {"delay_ms_each_nat_host": delay_ms}
    for a_kind, b_kind, label in (
        ("restricted_cone", "restricted_cone", "cone_to_cone_direct"),
        ("symmetric", "symmetric", "symmetric_to_symmetric_relayed"),
    ):
        samples, paths, failures = [], [], []
        for _ in range(repeats):
            with NetBed() as bed, tempfile.TemporaryDirectory(prefix="3bc-setup-") as tmp:
                relay_host = bed.add_public_host("relay")
                relay = start_daemon(relay_host, Path(tmp), "--relay")
                wait_ready(relay, peers=0)
                a = start_daemon(
                    bed.add_nat_host("a", nat=a_kind), Path(tmp), "--bootstrap", relay.address
                )
                b = start_daemon(
                    bed.add_nat_host("b", nat=b_kind), Path(tmp), "--bootstrap", relay.address
                )
                wait_ready(a)
                wait_ready(b)
                bed.impair(a.host, delay_ms=delay_ms)
                bed.impair(b.host, delay_ms=delay_ms)
                _wait_findable(a, b.public_key)
                try:
                    result = a.call("session.ping", public_key=b.public_key, count=1, interval=0)
                except ClientError as exc:  # a failed setup is a result too, not a crash
                    failures.append(str(exc))
                    continue
                samples.append(result["setup_ms"])
                paths.append(result["path"])
        out[label] = {
            "samples_ms": samples,
            "median_ms": round(statistics.median(samples), 1) if samples else None,
            "paths": paths,
            "failures": failures,
        }
    return out


def _wait_findable(caller: Any, key: str) -> None:
    """Until the callee's record is stored in the network: setup time is about the session."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            caller.call("dht.lookup", public_key=key, timeout=2.0)
            return
        except ClientError:
            time.sleep(0.5)
    raise RuntimeError("the callee's record never became findable")


def main() -> dict[str, Any]:
    result = {"loopback": loopback(), "nat_bed_50ms": nat_bed()}
    print(f"session setup on loopback: median {result['loopback']['median_ms']} ms")
    bed = result["nat_bed_50ms"]
    if "skipped" in bed:
        print(bed["skipped"])
    else:
        for key in ("cone_to_cone_direct", "symmetric_to_symmetric_relayed"):
            print(
                f"session setup across the NAT bed (+50 ms each side), {key}: "
                f"median {bed[key]['median_ms']} ms, paths {bed[key]['paths']}, "
                f"failed {len(bed[key]['failures'])} of {REPEATS}"
            )
    return result


if __name__ == "__main__":
    main()
