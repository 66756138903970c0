"""The `3bc` command as a person uses it: real daemon processes, real CLI processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.demo import daemon_argv
from tests.conftest import free_udp_port

ROOT = Path(__file__).resolve().parent.parent


def tbc(state, *args, check=True):
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def start(state, port, *args):
    return subprocess.Popen(
        daemon_argv(state, port, "--log-level", "warning", *args),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(state, peers):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = tbc(state, "status", "--json", check=False)
        if done.returncode == 0 and json.loads(done.stdout)["peers"] >= peers:
            return json.loads(done.stdout)
        time.sleep(0.1)
    raise AssertionError(f"daemon in {state} not ready")


@pytest.fixture
def three(tmp_path):
    ports = [free_udp_port() for _ in range(3)]
    procs = [start(tmp_path / "a", ports[0])]
    wait_for(tmp_path / "a", 0)
    procs += [
        start(tmp_path / n, p, "--bootstrap", f"127.0.0.1:{ports[0]}")
        for n, p in (("b", ports[1]), ("c", ports[2]))
    ]
    yield tmp_path, ports, procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(10)


def test_id_creates_then_shows_the_same_identity(tmp_path):
    first = json.loads(tbc(tmp_path, "id", "--json").stdout)
    again = json.loads(tbc(tmp_path, "id", "--json").stdout)
    assert first["created"] and not again["created"]
    assert first["public_key"] == again["public_key"] and len(first["public_key"]) == 64
    assert oct(os.stat(tmp_path / "identity.key").st_mode & 0o777) == "0o600"


def test_lookup_through_three_daemons(three):
    root, ports, _ = three
    wait_for(root / "b", 1)
    wait_for(root / "c", 1)
    status = json.loads(tbc(root / "a", "status", "--json").stdout)
    assert status["listen"] == [f"127.0.0.1:{ports[0]}"]
    time.sleep(0.5)
    found = json.loads(tbc(root / "c", "lookup", status["public_key"], "--json").stdout)
    assert found["public_key"] == status["public_key"]
    assert found["addresses"] == [f"127.0.0.1:{ports[0]}"]
    assert found["seq"] > 0 and found["record"]["signature"]
    ping = json.loads(tbc(root / "c", "ping", status["public_key"], "-c", "2", "--json").stdout)
    assert ping["path"] == "direct" and ping["rtt_ms"] is not None


def test_errors_are_one_line_and_nonzero(three, tmp_path):
    root, _, _ = three
    wait_for(root / "c", 1)
    for args, needle in (
        (("lookup", "abcd"), "64 hex characters"),
        (("lookup", "zz" * 32), "hex"),
        (("lookup", "ab" * 32), "not a valid Ed25519"),
    ):
        done = tbc(root / "c", *args, check=False)
        assert done.returncode == 1 and needle in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    unknown = json.loads(tbc(tmp_path / "x", "id", "--json").stdout)["public_key"]
    done = tbc(root / "c", "lookup", unknown, "--timeout", "3", check=False)
    assert done.returncode == 1 and "no record" in done.stderr
    done = tbc(tmp_path / "nobody", "status", check=False)
    assert done.returncode == 1 and "no daemon is running" in done.stderr


def test_sigterm_saves_the_routing_table(three):
    root, _, procs = three
    wait_for(root / "b", 1)
    procs[1].send_signal(signal.SIGTERM)
    assert procs[1].wait(10) == 0
    saved = json.loads((root / "b" / "routing.json").read_text())
    assert saved and len(saved[0]["public_key"]) == 64
    assert not (root / "b" / "control.sock").exists()


def test_relay_daemon_states_its_limit_and_counters(tmp_path):
    proc = start(tmp_path, free_udp_port(), "--relay", "--relay-mbit", "5")
    try:
        info = wait_for(tmp_path, 0)
        assert info["relay"] is True and info["relay_mbit"] == 5
        assert info["relay_stats"]["forwarded_packets"] == 0
        shown = tbc(tmp_path, "status").stdout
        assert "0 pairs, 0 packets forwarded, 0 over the limits (5 Mbit/s in total)" in shown
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
