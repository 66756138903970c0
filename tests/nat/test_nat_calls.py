"""Calls across the NAT bed: direct through lossy, delayed links; relayed through a relay that
dies mid-call. The call must keep going without anyone redialling."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .daemons import Daemon, cone_call_pair, start_daemon, wait_ready
from .test_nat_matrix import settle

pytestmark = pytest.mark.nat

CALL_ARGS = ("--size", "320x240", "--fps", "15")


def place_call(caller: Daemon, callee: Daemon, seconds: float) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "cli.main",
        "--state-dir",
        str(caller.state),
        "call",
        callee.public_key,
        "--duration",
        str(seconds),
        *CALL_ARGS,
        "--json",
    ]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out)["call"]


def test_direct_call_through_lossy_delayed_links(netbed, tmp_path):
    _relay, a, b = cone_call_pair(netbed, tmp_path)
    time.sleep(1.5)
    assert settle(a, b, "direct").get("path") == "direct"
    # 25 ms and 5 % loss on each side's link: 50 ms one way and about 10 % loss end to end.
    netbed.impair(a.host, delay_ms=25, loss=0.05)
    netbed.impair(b.host, delay_ms=25, loss=0.05)
    call = finish(place_call(a, b, 12))
    stats, counters = call["stats"], call["stats"]["counters"]
    assert call["end_reason"] == "hung up", call
    assert call["path"] == "direct"
    assert stats["call_loss"] > 0.02, stats  # the links really lost packets
    assert counters["nack_recovered"] > 0, counters
    # Audio never stopped: every 20 ms of the far end's audio was played, whether it arrived,
    # was recovered by NACK, or (too late) was concealed by PLC.
    assert counters["audio_frames_decoded"] >= 0.8 * counters["audio_frames_sent"], counters
    assert stats["frames_rendered"] >= 0.5 * counters["video_frames_sent"], stats


def test_relayed_call_survives_its_relay_dying(netbed, tmp_path):
    relays = []
    for name in ("relay0", "relay1"):
        d = start_daemon(
            netbed.add_public_host(name),
            tmp_path,
            "--relay",
            *(["--bootstrap", relays[0].address] if relays else []),
        )
        wait_ready(d, peers=1 if relays else 0)
        relays.append(d)
    boot = relays[0].address
    a = start_daemon(netbed.add_nat_host("a", nat="symmetric"), tmp_path, "--bootstrap", boot)
    b = start_daemon(
        netbed.add_nat_host("b", nat="symmetric"),
        tmp_path,
        "--bootstrap",
        boot,
        "--auto-answer",
        "all",
    )
    wait_ready(a, peers=2)
    wait_ready(b, peers=2)
    time.sleep(2)
    assert settle(a, b, "relayed").get("path") == "relayed"
    proc = place_call(a, b, 14)
    time.sleep(6)
    session = next(s for s in a.call("session.list") if s["peer"] == b.public_key)
    active = session["active"]
    victim = next(r for r in relays if active == f"relay:{r.host.ip}:30956")
    victim.proc.kill()
    try:
        call = finish(proc)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ncaller log:\n{a.log()}") from None
    stats = call["stats"]
    assert call["end_reason"] == "hung up", call  # nobody redialled, the call just went on
    assert stats["path"] == "relayed"
    assert stats["counters"]["path_resets"] >= 1, stats  # media saw the move to the other relay
    # Resumed within 3 s: no freeze longer than that (all freezes together stay under it).
    assert stats["frozen"] <= 3.0, stats
    assert stats["frames_rendered"] >= 0.6 * stats["counters"]["video_frames_sent"], stats
