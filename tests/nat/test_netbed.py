"""The bed behaves like the NATs it claims to be, proven with plain UDP inside the namespaces.

Each probe is a tiny script run by the venv's Python inside a host's namespace; it retransmits
(a lost datagram must not read as a closed NAT) and is bounded by its own deadline.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .netbed import Host, NetBed, NetBedError, list_namespaces, pid_alive

pytestmark = pytest.mark.nat

REFLECTOR_PORT = 7000
OTHER_PORT = 7001
LOCAL_PORT = 40000  # the NAT host's own port: cones keep it on the outside when it is free
DELAY_MS = 50
LOSS = 0.2
BURST = 400  # datagrams for loss estimates: the delivered share has sigma ~ 0.024

# Shared by the probe scripts: send until the reply from `dest` arrives, retransmitting.
_PROBE_LIB = """
import json, socket, sys, time
RETRY_S = 0.1
DEADLINE_S = 10.0

def ask(sock, payload, dest, other=None):
    '''Send payload to dest until it answers; datagrams from anyone else go to `other`.'''
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        sock.sendto(payload, dest)
        sock.settimeout(RETRY_S)
        try:
            while True:
                data, addr = sock.recvfrom(65535)
                if addr == dest and data.startswith(payload):
                    return data[len(payload):].decode().split()[-1]
                if other is not None:
                    other.append([data.decode(errors="replace"), "%s:%d" % addr])
        except socket.timeout:
            pass
    sys.exit("no answer from %s:%d" % dest)

def udp(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    return sock
"""

# argv: local port, then destinations "ip:port"; prints the address each destination saw.
MAPPINGS = (
    _PROBE_LIB
    + """
sock = udp(int(sys.argv[1]))
seen = []
for dest in sys.argv[2:]:
    ip, port = dest.split(":")
    seen.append(ask(sock, b"map", (ip, int(port))))
print(json.dumps(seen))
"""
)

# Learns its mapping via the reflector, prints it, waits for "go" on stdin, then asks the
# reflector once more: whatever arrived before that answer (unsolicited probes sent meanwhile
# by others) is printed. Ordering, not a timeout, decides what counts as "not delivered".
UNSOLICITED = (
    _PROBE_LIB
    + """
sock = udp(int(sys.argv[1]))
ip, port = sys.argv[2].split(":")
reflector = (ip, int(port))
print(ask(sock, b"map", reflector), flush=True)
sys.stdin.readline()
others = []
ask(sock, b"marker", reflector, others)
print(json.dumps(others))
"""
)

# argv: target ip:port, source port, count. Fire-and-forget unsolicited datagrams.
SPRAY = """
import socket, sys
ip, port = sys.argv[1].split(":")
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[2])))
for _ in range(int(sys.argv[3])):
    sock.sendto(b"unsolicited", (ip, int(port)))
"""

# argv: reflector ip:port, count. Sequential pings; prints every round-trip time in seconds.
RTTS = (
    _PROBE_LIB
    + """
ip, port = sys.argv[1].split(":")
sock = udp(0)
rtts = []
for i in range(int(sys.argv[2])):
    start = time.monotonic()
    ask(sock, b"ping%d" % i, (ip, int(port)))
    rtts.append(time.monotonic() - start)
print(json.dumps(rtts))
"""
)

# argv: reflector ip:port, count. Sends a paced burst, then collects echoes until the link has
# been quiet for a while; prints the sequence numbers that came back, in arrival order.
BURST_ECHO = """
import json, socket, sys, time
PACE_S = 0.0005  # spreads the burst so no queue overflows: only the impairment drops
QUIET_S = 1.0    # the last echo is this long ago: everything still in flight has landed
ip, port = sys.argv[1].split(":")
count = int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 0))
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
for i in range(count):
    sock.sendto(b"%d" % i, (ip, int(port)))
    time.sleep(PACE_S)
got = []
sock.settimeout(QUIET_S)
try:
    while len(got) < count:
        got.append(int(sock.recv(65535).split()[0]))
except socket.timeout:
    pass
print(json.dumps(got))
"""

STUN_BINDING = """
import socket, sys
from aioice import stun
ip, port = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 0))
request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
for _ in range(50):
    sock.sendto(bytes(request), (ip, port))
    sock.settimeout(0.2)
    try:
        data, _ = sock.recvfrom(65535)
    except socket.timeout:
        continue
    response = stun.parse_message(data)
    if response.transaction_id == request.transaction_id:
        mapped = response.attributes["XOR-MAPPED-ADDRESS"]
        print(response.message_class.name, "%s:%d" % mapped)
        break
else:
    sys.exit("no STUN answer")
"""


def _json(host: Host, script: str, *args: object) -> Any:
    return json.loads(host.python(script, *map(str, args)).stdout)


def _addr(host: Host, port: int) -> str:
    return f"{host.ip}:{port}"


def _ip(address: str) -> str:
    return address.rsplit(":", 1)[0]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.parametrize("nat", ["full_cone", "restricted_cone", "symmetric"])
def test_nat_host_reaches_public_host_from_its_router_address(netbed: NetBed, nat: str) -> None:
    relay = netbed.add_public_host("relay")
    alice = netbed.add_nat_host("alice", nat=nat)  # type: ignore[arg-type]
    relay.start_reflector(REFLECTOR_PORT)
    [seen] = _json(alice, MAPPINGS, LOCAL_PORT, _addr(relay, REFLECTOR_PORT))
    assert _ip(seen) == alice.public_ip == "203.0.113.10"
    assert alice.ip == "10.0.1.2"


@pytest.mark.parametrize("nat", ["full_cone", "restricted_cone"])
def test_cone_keeps_one_external_port_for_every_destination(netbed: NetBed, nat: str) -> None:
    relay1, relay2 = netbed.add_public_host("relay1"), netbed.add_public_host("relay2")
    alice = netbed.add_nat_host("alice", nat=nat)  # type: ignore[arg-type]
    for relay in (relay1, relay2):
        relay.start_reflector(REFLECTOR_PORT)
    dests = [_addr(relay1, REFLECTOR_PORT), _addr(relay2, REFLECTOR_PORT)]
    seen = _json(alice, MAPPINGS, LOCAL_PORT, *dests)
    assert seen == [f"{alice.public_ip}:{LOCAL_PORT}"] * 2


def test_symmetric_uses_a_new_external_port_per_destination(netbed: NetBed) -> None:
    relay1, relay2 = netbed.add_public_host("relay1"), netbed.add_public_host("relay2")
    alice = netbed.add_nat_host("alice", nat="symmetric")
    relay1.start_reflector(REFLECTOR_PORT)
    relay1.start_reflector(OTHER_PORT)
    relay2.start_reflector(REFLECTOR_PORT)
    dests = [
        _addr(relay1, REFLECTOR_PORT),
        _addr(relay1, OTHER_PORT),
        _addr(relay2, REFLECTOR_PORT),
    ]
    seen = _json(alice, MAPPINGS, LOCAL_PORT, *dests)
    assert {_ip(s) for s in seen} == {alice.public_ip}
    # --random-fully draws each port at random: three equal draws would be ~1 in 10^9.
    assert len({_port(s) for s in seen}) > 1


@pytest.mark.parametrize(
    ("nat", "delivered"), [("full_cone", True), ("restricted_cone", False), ("symmetric", False)]
)
def test_unsolicited_inbound_reaches_only_a_full_cone(
    netbed: NetBed, nat: str, delivered: bool
) -> None:
    relay1, relay2 = netbed.add_public_host("relay1"), netbed.add_public_host("relay2")
    alice = netbed.add_nat_host("alice", nat=nat)  # type: ignore[arg-type]
    relay1.start_reflector(REFLECTOR_PORT)
    probe = alice.popen_python(
        UNSOLICITED,
        str(LOCAL_PORT),
        _addr(relay1, REFLECTOR_PORT),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert probe.stdout is not None and probe.stdin is not None
    mapping = probe.stdout.readline().strip()
    assert _ip(mapping) == alice.public_ip, "the probe could not reach the reflector"
    # A third host, and the contacted host from a port alice never talked to (port-restricted).
    relay2.python(SPRAY, mapping, "7100", "3")
    relay1.python(SPRAY, mapping, "7100", "3")
    out, _ = probe.communicate("go\n", timeout=30)
    assert probe.returncode == 0
    senders = {sender for payload, sender in json.loads(out) if payload == "unsolicited"}
    expected = {_addr(relay2, 7100), _addr(relay1, 7100)} if delivered else set()
    assert senders == expected


def test_coturn_answers_a_stun_binding_request(netbed: NetBed) -> None:
    alice = netbed.add_nat_host("alice", nat="restricted_cone")
    ip, port = netbed.start_coturn(user="alice", password="secret")
    out = alice.python(STUN_BINDING, ip, str(port)).stdout.split()
    assert out[0] == "RESPONSE"
    assert _ip(out[1]) == alice.public_ip
    with pytest.raises(NetBedError):
        netbed.start_coturn()


def test_impaired_link_adds_the_delay_asked_for(netbed: NetBed) -> None:
    relay = netbed.add_public_host("relay")
    alice = netbed.add_nat_host("alice", nat="full_cone")
    relay.start_reflector(REFLECTOR_PORT)
    netbed.impair(alice, delay_ms=DELAY_MS)
    rtts = _json(alice, RTTS, _addr(relay, REFLECTOR_PORT), 5)
    # Each direction of alice's wire waits DELAY_MS; a lower bound only, never an upper one.
    assert min(rtts) >= 2 * DELAY_MS / 1000


def test_jitter_does_not_reorder_unless_asked(netbed: NetBed) -> None:
    relay = netbed.add_public_host("relay")
    alice = netbed.add_nat_host("alice", nat="restricted_cone")
    relay.start_reflector(REFLECTOR_PORT)
    netbed.impair(alice, delay_ms=20, jitter_ms=15, seed=7)
    got = _json(alice, BURST_ECHO, _addr(relay, REFLECTOR_PORT), 200)
    # Jitter of +-15 ms on a 0.5 ms paced burst would shuffle it (dozens of descents). The kernel
    # itself may swap a run once: a veth or tap queues each frame on the sending CPU's backlog,
    # so a process that moves to the other core mid-burst can overtake its own earlier frames
    # (seen once in CI: 61 arrived before 44). That is one descent, not a shuffle.
    assert _descents(got) <= 2, got
    assert len(got) == 200
    netbed.impair(relay, delay_ms=20, jitter_ms=15, reorder=True, seed=7)  # a public host too
    got = _json(alice, BURST_ECHO, _addr(relay, REFLECTOR_PORT), 200)
    assert _descents(got) >= 20, got
    assert sorted(got) == list(range(200))


def _descents(seq: list[int]) -> int:
    """How many times the sequence steps down: 0 for an ordered burst."""
    return sum(1 for a, b in itertools.pairwise(seq) if b < a)


def _delivered_share(alice: Host, relay: Host) -> float:
    got = _json(alice, BURST_ECHO, _addr(relay, REFLECTOR_PORT), BURST)
    return len(set(got)) / BURST


def test_impaired_link_drops_about_the_share_asked_for(netbed: NetBed) -> None:
    relay = netbed.add_public_host("relay")
    alice = netbed.add_nat_host("alice", nat="symmetric")
    relay.start_reflector(REFLECTOR_PORT)
    netbed.impair(alice, loss=LOSS, seed=1)
    # The datagram and its echo each cross the lossy wire: (1 - 0.2)^2 = 0.64 come back.
    assert 0.5 <= _delivered_share(alice, relay) <= 0.78
    netbed.impair(alice)  # a clean wire again: nothing is lost
    assert _delivered_share(alice, relay) == 1.0


def test_router_loss_drops_about_the_share_asked_for(netbed: NetBed) -> None:
    relay = netbed.add_public_host("relay")
    alice = netbed.add_nat_host("alice", nat="restricted_cone")
    relay.start_reflector(REFLECTOR_PORT)
    netbed.set_router_loss(alice, LOSS)
    assert 0.5 <= _delivered_share(alice, relay) <= 0.78
    netbed.set_router_loss(alice, 0.0)
    assert _delivered_share(alice, relay) == 1.0


def test_conntrack_timeout_and_flush_act_on_the_router(netbed: NetBed) -> None:
    relay = netbed.add_public_host("relay")
    alice = netbed.add_nat_host("alice", nat="restricted_cone")
    relay.start_reflector(REFLECTOR_PORT)
    netbed.set_udp_timeout(alice, 5)
    _json(alice, MAPPINGS, LOCAL_PORT, _addr(relay, REFLECTOR_PORT))
    [entry] = netbed.conntrack_entries(alice)
    assert f"sport={LOCAL_PORT}" in entry
    assert int(entry.split()[2]) <= 5  # seconds left on the binding
    netbed.flush_conntrack()
    assert netbed.conntrack_entries(alice) == []
    with pytest.raises(ValueError):
        netbed.set_udp_timeout(relay, 5)


def test_two_beds_coexist_and_teardown_leaves_nothing(netbed_factory: type[NetBed]) -> None:
    links_before = _bed_like_links()
    bed1, bed2 = netbed_factory(), netbed_factory()
    pids = []
    for bed in (bed1, bed2):  # same host names in both: the prefixes keep them apart
        relay = bed.add_public_host("relay")
        alice = bed.add_nat_host("alice", nat="full_cone")
        pids.append(relay.start_reflector(REFLECTOR_PORT).pid)
        pids.append(alice.popen(["sleep", "600"]).pid)
        bed.start_coturn()
        bed.impair(alice, delay_ms=1)
        [seen] = _json(alice, MAPPINGS, LOCAL_PORT, _addr(relay, REFLECTOR_PORT))
        assert _ip(seen) == alice.public_ip
    assert bed1.prefix != bed2.prefix
    made = [ns for ns in list_namespaces() if ns.startswith((bed1.prefix, bed2.prefix))]
    assert len(made) == 2 * 4  # pub, relay, alice, alice-r
    bed1.close()
    bed2.close()
    assert [ns for ns in list_namespaces() if ns.startswith((bed1.prefix, bed2.prefix))] == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not bed1.state_dir.exists()
    # Nothing leaked into the host's own namespace (compare only names the bed uses, since
    # other programs may add links of their own meanwhile).
    assert _bed_like_links() <= links_before


def _bed_like_links() -> set[str]:
    """Links of the host's own namespace named like the ones the bed creates."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return {n for n in names if n in ("br0", "wan", "lan", "eth0") or re.fullmatch(r"p\d+w?", n)}


def test_teardown_after_a_failure_inside_the_bed(netbed_factory: type[NetBed]) -> None:
    with pytest.raises(ZeroDivisionError), netbed_factory() as bed:
        bed.add_nat_host("alice", nat="symmetric")
        prefix = bed.prefix
        _ = 1 / 0
    assert [ns for ns in list_namespaces() if ns.startswith(prefix)] == []


# argv: coturn ip, port, user, password, then targets "ip:port": the first is a reflector,
# the rest are sent to before it (e.g. unreachable private addresses). Prints what the
# reflector saw: the relayed address coturn allocated.
TURN_RELAY = """
import asyncio, sys
from aioice import turn

async def main():
    server, user, password = (sys.argv[1], int(sys.argv[2])), sys.argv[3], sys.argv[4]
    targets = [(t.split(":")[0], int(t.split(":")[1])) for t in sys.argv[5:]]
    echoes = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            echoes.put_nowait(data)

    transport, _ = await turn.create_turn_endpoint(Client, server, user, password)
    try:
        for target in targets[1:]:
            transport.sendto(b"into-the-void", target)
        for _ in range(50):
            transport.sendto(b"via-turn", targets[0])
            try:
                data = await asyncio.wait_for(echoes.get(), 0.2)
            except asyncio.TimeoutError:
                continue
            print(data.split()[-1].decode())
            return
        sys.exit("no echo through the relay")
    finally:
        transport.close()

asyncio.run(main())
"""


def test_coturn_relays_and_survives_a_send_to_a_private_address(netbed: NetBed) -> None:
    relay = netbed.add_public_host("relay")
    alice = netbed.add_nat_host("alice", nat="symmetric")
    bob = netbed.add_nat_host("bob", nat="symmetric")
    relay.start_reflector(REFLECTOR_PORT)
    ip, port = netbed.start_coturn(user="alice", password="secret")
    # Sending to bob's private address first: without pub's black-hole default route coturn
    # gets ENETUNREACH there and drops the whole allocation, so the echo would never come.
    out = alice.python(
        TURN_RELAY,
        ip,
        str(port),
        "alice",
        "secret",
        _addr(relay, REFLECTOR_PORT),
        _addr(bob, 9),
    )
    seen = out.stdout.strip()
    assert _ip(seen) == ip
    assert 49152 <= _port(seen) <= 49999


@pytest.mark.usefixtures("nat_capable")
def test_command_line_up_then_down() -> None:
    """`python -m tests.nat.netbed up` leaves a bed running; `down PREFIX` removes all of it."""
    root = Path(__file__).resolve().parents[2]

    def cli(*args: str) -> str:
        argv = [sys.executable, "-m", "tests.nat.netbed", *args]
        return subprocess.run(argv, cwd=root, capture_output=True, text=True, check=True).stdout

    state = json.loads(cli("up", "--nat", "alice:symmetric", "--public", "relay", "--coturn"))
    prefix = state["prefix"]
    try:
        assert set(state["namespaces"]) <= set(list_namespaces())
        [coturn] = state["pids"]
        assert os.path.exists(f"/proc/{coturn['pid']}")
    finally:
        cli("down", prefix)  # only this bed: never another run's
    assert [ns for ns in list_namespaces() if ns.startswith(prefix)] == []
    assert not pid_alive(coturn["pid"])
    assert not Path(state["state_file"]).exists()
