"""Every pair from {public, full cone, restricted cone, symmetric} connects, with the path type
the NAT test bed says is possible: direct wherever a punch can work, relayed otherwise."""

from __future__ import annotations

import itertools
import time

import pytest

from cli.client import ClientError

from .daemons import Daemon, start_daemon, wait_ready

pytestmark = pytest.mark.nat

KINDS = ("public", "full_cone", "restricted_cone", "symmetric")
# From shared/notes/nat-testbed.md (aioice on this bed) and the NAT types' definitions.
RELAY_NEEDED = {frozenset({"restricted_cone", "symmetric"}), frozenset({"symmetric"})}
SETTLE_TIMEOUT = 20.0
# TURN: a session whose ICE pair never comes alive is dropped after NEVER_UP_AFTER and redialled.
TURN_SETTLE_TIMEOUT = 40.0


def expected_path(a: str, b: str) -> str:
    return "relayed" if frozenset({a, b}) in RELAY_NEEDED else "direct"


@pytest.fixture
def matrix(netbed, tmp_path):
    relay_host = netbed.add_public_host("relay")
    relay = start_daemon(relay_host, tmp_path, "--relay")
    wait_ready(relay, peers=0)
    daemons: dict[str, list[Daemon]] = {}
    for kind in KINDS:
        for i in range(2):
            name = f"{kind[:4]}{i}"
            host = (
                netbed.add_public_host(name)
                if kind == "public"
                else netbed.add_nat_host(name, nat=kind)
            )
            daemons.setdefault(kind, []).append(
                start_daemon(host, tmp_path, "--bootstrap", relay.address)
            )
    for group in daemons.values():
        for d in group:
            wait_ready(d, peers=1)
    time.sleep(1.5)  # first announcements, observed addresses and records published
    return relay, daemons


def settle(caller: Daemon, callee: Daemon, want: str, timeout: float = SETTLE_TIMEOUT) -> dict:
    """Ping until the session shows the path we expect (ICE may need a moment after a relay)."""
    deadline = time.monotonic() + timeout
    result: dict = {}
    while time.monotonic() < deadline:
        try:
            result = caller.call(
                "session.ping", public_key=callee.public_key, count=2, interval=0.2
            )
        except ClientError as exc:  # e.g. the callee's record not yet stored: try again
            result = {"error": str(exc)}
            time.sleep(0.5)
            continue
        if result["path"] == want and result["lost"] == 0:
            return result
        time.sleep(0.3)
    return result


def test_symmetric_pair_uses_a_configured_turn_server(netbed, tmp_path):
    """No relay daemon anywhere: two symmetric NATs fall back to coturn through ICE.

    First in the module: it needs no matrix, and with the matrix's 16 daemons probing in the
    background ICE through TURN sometimes missed its 10 s (ICE is not retried; see the note)."""
    turn_ip, turn_port = netbed.start_coturn(user="alice", password="secret")
    boot = start_daemon(netbed.add_public_host("boot"), tmp_path)
    wait_ready(boot, peers=0)
    turn = ["--turn", f"{turn_ip}:{turn_port}", "--turn-user", "alice", "--turn-password", "secret"]
    a = start_daemon(
        netbed.add_nat_host("a", nat="symmetric"), tmp_path, "--bootstrap", boot.address, *turn
    )
    b = start_daemon(
        netbed.add_nat_host("b", nat="symmetric"), tmp_path, "--bootstrap", boot.address, *turn
    )
    wait_ready(a)
    wait_ready(b)
    time.sleep(1.5)
    result = settle(a, b, "turn", TURN_SETTLE_TIMEOUT)
    assert result.get("path") == "turn", f"{result}\n{a.log()}"
    assert result["rtt_ms"] is not None


def test_nat_matrix(matrix):
    _relay, daemons = matrix
    failures = []
    report = []
    for a, b in itertools.combinations_with_replacement(KINDS, 2):
        caller = daemons[a][0]
        callee = daemons[b][1]
        want = expected_path(a, b)
        result = settle(caller, callee, want)
        report.append(
            f"{a:>15} -> {b:<15} {result.get('path')!s:>8} "
            f"rtt={result.get('rtt_ms')} setup={result.get('setup_ms')}"
        )
        if result.get("path") != want or result.get("rtt_ms") is None:
            failures.append(f"{a} -> {b}: wanted {want}, got {result}")
    print("\n".join(report))
    assert not failures, "\n".join(failures) + "\n" + caller.log()


def test_relayed_session_moves_to_direct_when_punching_succeeds(matrix):
    """full cone <-> symmetric: the relay path comes first, the ICE pair later, without a new
    handshake (the session's index stays the same)."""
    _relay, daemons = matrix
    caller, callee = daemons["symmetric"][0], daemons["full_cone"][1]
    first = caller.call("session.ping", public_key=callee.public_key, count=1, interval=0)
    result = settle(caller, callee, "direct")
    assert result["path"] == "direct", result
    sessions = [s for s in caller.call("session.list") if s["peer"] == callee.public_key]
    assert len(sessions) == 1
    kinds = {p["kind"] for p in sessions[0]["paths"]}
    assert {"direct", "relayed"} <= kinds, sessions[0]
    assert first["setup_ms"] == result["setup_ms"]  # same session, no second handshake


def test_session_survives_nat_rebinding_within_3_seconds(matrix, netbed):
    """The symmetric NAT forgets every mapping (conntrack flushed): the next packets leave from
    new ports. The session must carry traffic again within 3 s, on whatever path still works."""
    _relay, daemons = matrix
    caller, callee = daemons["symmetric"][1], daemons["full_cone"][0]
    assert settle(caller, callee, "direct").get("path") == "direct"
    netbed.flush_conntrack(caller.host)
    flushed = time.monotonic()
    recovered = None
    while time.monotonic() - flushed < 10:
        result = caller.call("session.ping", public_key=callee.public_key, count=1, interval=0)
        if result["lost"] == 0:
            recovered = time.monotonic() - flushed
            break
    print(f"recovered after {recovered} s on {result.get('path')}")
    assert recovered is not None and recovered <= 3.0, (recovered, result)
    # And it stays up once the old mappings' paths die (PATH_DEAD_AFTER): before paths followed
    # the peer, the callee could keep answering on a one-way ICE path that only looked alive.
    later = caller.call("session.ping", public_key=callee.public_key, count=6, interval=0.5)
    assert later["lost"] == 0, later
