"""Run real `3bc daemon` processes inside the bed's hosts and drive them by their control sockets.

The control socket is a filesystem Unix socket, so the test (in the host's own namespace) talks
to a daemon living in any bed namespace.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.client import ClientError, ControlClient

from .netbed import Host

DAEMON_PORT = 30956
START_TIMEOUT = 30.0


@dataclass
class Daemon:
    host: Host
    state: Path
    proc: subprocess.Popen[Any]
    public_key: str = ""

    def call(self, method: str, wait: float = 60.0, **params: Any) -> Any:
        with ControlClient(self.state, wait) as client:
            return client.call(method, **params)

    @property
    def address(self) -> str:
        return f"{self.host.ip}:{DAEMON_PORT}"

    def log(self) -> str:
        path = self.state / "daemon.log"
        return path.read_text()[-4000:] if path.exists() else ""


def start_daemon(host: Host, root: Path, *args: str) -> Daemon:
    state = root / host.name
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / "daemon.log", "w")  # noqa: SIM115 - lives as long as the daemon
    argv = [
        sys.executable,
        "-m",
        "cli.main",
        "--state-dir",
        str(state),
        "daemon",
        "--listen",
        f"0.0.0.0:{DAEMON_PORT}",
        "--log-level",
        "info",
        *args,
    ]
    proc = host.popen(
        argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2]
    )
    return Daemon(host, state, proc)


def wait_ready(daemon: Daemon, peers: int = 1) -> None:
    """Until the control socket answers and the daemon has verified `peers` contacts."""
    deadline = time.monotonic() + START_TIMEOUT
    last: Any = None
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon on {daemon.host.name} exited:\n{daemon.log()}")
        try:
            info = daemon.call("node.info", wait=5)
            daemon.public_key = info["public_key"]
            last = info
            if info["peers"] >= peers:
                return
        except (ClientError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"daemon on {daemon.host.name} not ready: {last}\n{daemon.log()}")


def cone_call_pair(bed: Any, root: Path) -> tuple[Daemon, Daemon, Daemon]:
    """A public relay/bootstrap daemon, caller `a` behind a full cone and callee `b` behind a
    restricted cone answering every call: the bed of the lossy direct-call test and benchmark."""
    relay = start_daemon(bed.add_public_host("relay"), root, "--relay")
    wait_ready(relay, peers=0)
    a = start_daemon(bed.add_nat_host("a", nat="full_cone"), root, "--bootstrap", relay.address)
    b = start_daemon(
        bed.add_nat_host("b", nat="restricted_cone"),
        root,
        "--bootstrap",
        relay.address,
        "--auto-answer",
        "all",
    )
    wait_ready(a)
    wait_ready(b)
    return relay, a, b
