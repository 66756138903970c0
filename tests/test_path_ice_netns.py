"""IceAgent for real, between two network namespaces joined by a veth pair (10.88.0.1 <-> .2).

Each peer runs tests/path_netns_peer.py under `ip netns exec`; this test relays their signalling
lines (the role DHT/handshake messages play in the daemon). aioice is never run outside the
namespaces created here: inside, the only non-loopback address is our veth's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

pytestmark = pytest.mark.nat

PEER = str(Path(__file__).with_name("path_netns_peer.py"))
ROOT = str(Path(__file__).resolve().parent.parent)
ADDR_A, ADDR_B = "10.88.0.1", "10.88.0.2"
REFLECTOR_PORT = 3478
# Every wait on a peer is bounded: a wedged subprocess fails the test instead of hanging CI.
PEER_TIMEOUT = 25.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("NOT RUN: needs root and iproute2 to create network namespaces (CI has both)")
    prefix = f"3bcp{os.getpid()}"
    ns_a, ns_b = f"{prefix}-a", f"{prefix}-b"
    veth_a, veth_b = f"{prefix}va"[-15:], f"{prefix}vb"[-15:]
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip(
            "link",
            "add",
            veth_a,
            "netns",
            ns_a,
            "type",
            "veth",
            "peer",
            "name",
            veth_b,
            "netns",
            ns_b,
        )
        for ns, veth, addr in ((ns_a, veth_a, ADDR_A), (ns_b, veth_b, ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", veth, "up")
        yield ns_a, ns_b
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Peer:
    """A peer subprocess in a namespace, spoken to in JSON lines."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    @classmethod
    async def start(cls, ns: str, *args: str) -> Peer:
        env = {**os.environ, "PYTHONPATH": ROOT}
        process = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", ns, sys.executable, PEER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        return cls(process)

    async def read(self) -> dict[str, object]:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"peer exited early: {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        result: dict[str, object] = json.loads(line)
        return result

    async def read_until(self, key: str) -> dict[str, object]:
        while True:
            message = await self.read()
            if key in message:
                return message

    async def write(self, obj: dict[str, object]) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps(obj).encode() + b"\n")

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


async def run_pair(
    ns_a: str,
    ns_b: str,
    extra_a: tuple[str, ...] = (),
    extra_b: tuple[str, ...] = (),
    bench: float = 0.0,
) -> tuple[dict[str, dict[str, object]], dict[str, dict[str, object]]]:
    """Run controlling (A) and controlled (B) peers to the end; return their reports by key."""
    bench_args = ("--bench", str(bench)) if bench else ()
    a = await Peer.start(ns_a, "ice", "controlling", *extra_a, *bench_args)
    b = await Peer.start(ns_b, "ice", "controlled", *extra_b, *bench_args)
    reports: tuple[dict[str, dict[str, object]], dict[str, dict[str, object]]] = ({}, {})
    try:
        with trio.fail_after(PEER_TIMEOUT):
            local_a, local_b = await a.read_until("local"), await b.read_until("local")
            reports[0]["local"], reports[1]["local"] = local_a, local_b
            await a.write({"remote": local_b["local"]})
            await b.write({"remote": local_a["local"]})

            async def collect(peer: Peer, report: dict[str, dict[str, object]]) -> None:
                while "done" not in report:
                    message = await peer.read()
                    for key in message:
                        report[key] = message

            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, a, reports[0])
                nursery.start_soon(collect, b, reports[1])
            await a.write({"bye": True})
            await b.write({"bye": True})
            await a.process.wait()
            await b.process.wait()
    finally:
        a.kill()
        b.kill()
    return reports


def _ports(local: dict[str, object], typ: str) -> set[int]:
    lines = local["local"]["candidates"]  # type: ignore[index]
    return {int(c.split()[5]) for c in lines if c.split()[7] == typ}  # type: ignore[union-attr]


async def test_ice_connects_and_moves_data_to_a_trio_socket(netns: tuple[str, str]) -> None:
    ra, rb = await run_pair(*netns)
    for report, own in ((ra, ADDR_A), (rb, ADDR_B)):
        connected = report["connected"]
        assert connected["kind"] == "direct"
        assert connected["native"] is True
        # The native socket sits on the same local (ip, port) as a gathered host candidate.
        host, port = connected["local_addr"]  # type: ignore[misc]
        assert host == own
        assert port in _ports(report["local"], "host")
    assert ra["connected"]["remote_addr"][0] == ADDR_B  # type: ignore[index]
    assert ra["pongs"]["pongs"] == 5
    assert rb["pings"]["pings"] == 5
    assert "unexpected" not in rb  # the keepalives (STUN indications) never reached the caller


async def test_reflector_answers_only_padded_requests(netns: tuple[str, str]) -> None:
    ns_a, ns_b = netns
    reflector = await Peer.start(ns_a, "reflector", ADDR_A, str(REFLECTOR_PORT))
    try:
        with trio.fail_after(PEER_TIMEOUT):
            await reflector.read_until("ready")
            probe = await Peer.start(ns_b, "probe", ADDR_A, str(REFLECTOR_PORT))
            result = await probe.read_until("padded")
            await probe.process.wait()
    finally:
        reflector.kill()
    assert result["bare"] is None  # 20-byte request, 40-byte answer: amplification, no reply
    assert result["bare_size"] == 20
    # What the reflector saw is our address (the probe binds the wildcard, so compare parts).
    assert result["padded"] == [ADDR_B, result["local"][1]]  # type: ignore[index]


async def test_ice_gets_server_reflexive_candidate_from_our_reflector(
    netns: tuple[str, str],
) -> None:
    ns_a, ns_b = netns
    reflector = await Peer.start(ns_a, "reflector", ADDR_A, str(REFLECTOR_PORT))
    try:
        with trio.fail_after(PEER_TIMEOUT):
            await reflector.read_until("ready")
            stun = ("--stun", f"{ADDR_A}:{REFLECTOR_PORT}")
            ra, rb = await run_pair(ns_a, ns_b, extra_b=stun)
    finally:
        reflector.kill()
    # aioice's bare request would get no answer; the padded one (our patch) gets the srflx.
    srflx = [c for c in rb["local"]["local"]["candidates"] if " typ srflx " in c]  # type: ignore[index,union-attr]
    assert srflx, rb["local"]
    assert f" {ADDR_B} " in srflx[0]
    assert rb["connected"]["native"] is True
    assert ra["pongs"]["pongs"] == 5


async def test_aioice_data_path_fallback_still_works(netns: tuple[str, str]) -> None:
    ra, rb = await run_pair(*netns, extra_a=("--aioice",), extra_b=("--aioice",))
    assert ra["connected"]["native"] is False
    assert ra["pongs"]["pongs"] == 5
    assert rb["pings"]["pings"] == 5


async def test_measure_native_socket_vs_aioice_send(netns: tuple[str, str]) -> None:
    """Figures, not assertions on speed: run with `-s` to see packets/s of both data paths."""
    figures = {}
    for name, extra in (("native", ()), ("aioice", ("--aioice",))):
        ra, rb = await run_pair(*netns, extra_a=extra, extra_b=extra, bench=1.0)
        figures[name] = (ra["bench_sent"]["send_pps"], rb["bench_received"]["recv_pps"])
        assert rb["bench_received"]["bench_received"] > 0
    print(
        f"\n1200-byte datagrams, 1 s each, veth between namespaces (send pps, recv pps): {figures}"
    )


async def test_external_coturn_still_answers_our_padded_requests(
    netns: tuple[str, str], tmp_path: Path
) -> None:
    """A configured external STUN server (coturn) keeps working with the padding patch."""
    if shutil.which("turnserver") is None:
        pytest.skip("NOT RUN: coturn (turnserver) is not installed (apt-get install coturn)")
    ns_a, ns_b = netns
    port = "3479"
    coturn = await trio.lowlevel.open_process(
        ["ip", "netns", "exec", ns_a, "turnserver", "-n", f"--listening-ip={ADDR_A}",
         f"--listening-port={port}", "--no-tls", "--no-dtls", "--no-tcp-relay", "--no-cli",
         "--fingerprint", f"--db={tmp_path}/turndb", f"--pidfile={tmp_path}/turn.pid",
         "--log-file=stdout", "--simple-log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with trio.fail_after(PEER_TIMEOUT):
            while True:  # readiness: coturn answers a padded probe
                probe = await Peer.start(ns_b, "probe", ADDR_A, port)
                result = await probe.read_until("padded")
                await probe.process.wait()
                if result["padded"] is not None:
                    break
                await trio.sleep(0.05)
            ra, rb = await run_pair(ns_a, ns_b, extra_b=("--stun", f"{ADDR_A}:{port}"))
    finally:
        coturn.kill()
        await coturn.wait()
    srflx = [c for c in rb["local"]["local"]["candidates"] if " typ srflx " in c]  # type: ignore[index,union-attr]
    assert srflx, rb["local"]
    assert ra["pongs"]["pongs"] == 5
