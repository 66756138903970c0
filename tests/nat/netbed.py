"""The project's NAT test bed: namespaces, iptables NAT routers, coturn and impaired links.

Why: NAT traversal only counts when proven against the kernel's real NAT, so the bed builds,
per test, a small internet inside network namespaces (see ``shared/notes/nat-testbed.md``)::

    pub (br0 = "the internet", 203.0.113.1/.2, coturn)
     |-- <name>-r router: wan 203.0.113.10+  --NAT--  lan 10.0.N.1/24 -- <name>: eth0 10.0.N.2
     `-- <name>   public host: eth0 203.0.113.30+

Every name starts with a per-instance prefix (``3bc<pid-hex>x<n>-``) so beds of concurrent runs
never meet, and ``close()`` removes what this instance made (processes by their own pid, then
namespaces), also after a failure half-way. Use it as a context manager::

    with NetBed() as bed:
        relay = bed.add_public_host("relay")
        alice = bed.add_nat_host("alice", nat="symmetric")
        stun = bed.start_coturn(user="alice", password="secret")   # ("203.0.113.1", 3478)
        bed.impair(alice, delay_ms=50, loss=0.02)
        alice.python("import socket; ...")

Command line (the bed stays up between the two calls; ``down`` stops it by the saved pids)::

    python -m tests.nat.netbed up --nat alice:full_cone --nat bob:symmetric --public relay --coturn
    python -m tests.nat.netbed down            # every bed made by `up`, and orphaned ones
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

NatType = Literal["full_cone", "restricted_cone", "symmetric"]
NAT_TYPES: tuple[NatType, ...] = ("full_cone", "restricted_cone", "symmetric")

# Every namespace name starts with this, then the owner's pid in hex, "x", a per-process counter
# and "-": "x" is not a hex digit, so pid 0x1a + bed 23 can never read as pid 0x1a2 + bed 3.
NAME_ROOT = "3bc"
# Documentation range (RFC 5737) playing "the internet"; it exists only inside the namespaces.
INTERNET_PREFIXLEN = 24
BRIDGE_ADDRS = ("203.0.113.1", "203.0.113.2")  # two, so coturn can offer an alternate address
# A gateway that never answers: every namespace on the internet gets a default route to it, with
# a permanent neighbour entry so frames are flooded and silently lost (no ARP failure, no ICMP).
# Without a default route coturn's relay send to a private 10.x candidate fails with ENETUNREACH
# and coturn closes the whole allocation (notes); real routers also forward bogons upstream.
BLACKHOLE_GW = "203.0.113.254"
BLACKHOLE_MAC = "02:00:00:00:00:fe"  # locally administered: never a real card's address
# The bridge gets a fixed address: otherwise it takes its lowest port's MAC as ports come and go,
# and every MAC change flushes the neighbour table, permanent black-hole entry included.
BRIDGE_MAC = "02:00:00:00:00:01"
LINK_MAC_PREFIX = "02:bc:00:00"  # + link index + side (1 upstream, 2 host)
ROUTER_WAN_FIRST, ROUTER_WAN_LAST = 10, 29  # 203.0.113.10-.29: router WAN addresses
PUBLIC_FIRST, PUBLIC_LAST = 30, 99  # 203.0.113.30-.99: hosts directly on the internet
# NAT host n gets LAN 10.0.n.0/24: router .1, host .2.
LAN_ROUTER_OCTET, LAN_HOST_OCTET = 1, 2
# Fixed device names: they live inside private namespaces, so they cannot clash across beds.
BRIDGE, WAN, LAN, HOST_DEV = "br0", "wan", "lan", "eth0"

TURN_PORT = 3478  # IANA STUN/TURN port
TURN_RELAY_PORTS = (49152, 49999)  # coturn's relay range (RFC 8656 suggests 49152-65535)
# Bounds for waits on things we started; generous because CI machines stall, never asserted on.
COMMAND_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 10.0
STOP_GRACE_S = 2.0
POLL_INTERVAL_S = 0.005

STATE_ROOT = Path(tempfile.gettempdir()) / "3bc-netbed"
LINKEMU = Path(__file__).with_name("linkemu.py")

_bed_counter = itertools.count()

# Tells each sender the address it was seen from: the probe every NAT test builds on.
REFLECTOR_SCRIPT = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, (ip, port) = sock.recvfrom(65535)
    sock.sendto(data + f" {ip}:{port}".encode(), (ip, port))
"""


class NetBedError(RuntimeError):
    """The bed could not be built or torn down as asked."""


def _run(argv: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    """Run a setup command; on failure raise with its stderr (the only useful diagnostic)."""
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
    )
    if check and proc.returncode != 0:
        raise NetBedError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _ip_batch(netns: str | None, commands: Sequence[str]) -> None:
    """Run many ``ip`` commands in one process (one exec instead of one per command)."""
    if commands:
        _run(["ip", *(["-n", netns] if netns else []), "-batch", "-"], input="\n".join(commands))


def _ns_exec(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie counts as gone (this container's init may never reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _stop_pid(pid: int, expected_cmdline: Sequence[str] | None) -> None:
    """SIGTERM, wait, SIGKILL one pid, but only if it still runs the command we started.

    The check guards against pid reuse when stopping from a saved state file.
    """
    if expected_cmdline is not None and _cmdline(pid)[: len(expected_cmdline)] != list(
        expected_cmdline
    ):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (state-file teardown): poll for exit
            done = 0 if pid_alive(pid) else pid
        if done:
            return
        time.sleep(POLL_INTERVAL_S)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _stop_proc(proc: subprocess.Popen[Any]) -> None:
    """Stop a process this interpreter started: SIGTERM, a grace period, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Host:
    """A machine of the bed: its own network namespace with one interface ``eth0``."""

    name: str
    netns: str
    ip: str
    public_ip: str
    nat: NatType | None
    router_netns: str | None
    bed: NetBed = field(repr=False, compare=False)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside this host's namespace."""
        return _ns_exec(self.netns, argv)

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run to completion inside the namespace; captures text output, checks, times out."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("check", True)
        kw.setdefault("timeout", COMMAND_TIMEOUT_S)
        return subprocess.run(self.argv(argv), **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start inside the namespace; the bed stops it (by pid) at teardown if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **kw)
        self.bed._track(proc)
        return proc

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet with this interpreter (the venv's) inside the namespace."""
        return self.run([sys.executable, "-c", code, *args], **kw)

    def popen_python(self, code: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start a Python snippet inside the namespace (see ``popen``)."""
        return self.popen([sys.executable, "-c", code, *args], **kw)

    def start_reflector(self, port: int) -> subprocess.Popen[str]:
        """Start a UDP reflector on ``port``: every datagram comes back with `` ip:port`` of
        its sender appended, i.e. the address this host saw (after any NAT on the way)."""
        proc = self.popen_python(REFLECTOR_SCRIPT, str(port), stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":  # EOF if the bind failed
            raise NetBedError(f"reflector on {self.name}:{port} did not start")
        return proc


@dataclass
class _Link:
    """The wire between an upstream namespace (router or internet) and a host's ``eth0``."""

    up_netns: str
    up_dev: str
    host_netns: str
    up_addr: str | None  # "10.0.1.1/24" on a router; None for a bridge port
    host_addr: str  # with prefix length
    gateway: str
    index: int  # unique in the bed: gives both ends fixed MAC addresses
    kind: Literal["veth", "tap"] = "veth"
    emulator: subprocess.Popen[str] | None = None

    def create_commands(self) -> tuple[list[str], list[str]]:
        """``ip`` batch commands for (upstream ns, host ns) that create and configure the link."""
        # Fixed MACs survive the veth -> TAP swap of ``impair``: neighbours' ARP caches stay
        # right, instead of sending to a vanished address until the entry goes stale (~30 s).
        up_mac, host_mac = (f"{LINK_MAC_PREFIX}:{self.index:02x}:{side:02x}" for side in (1, 2))
        up: list[str] = []
        if self.kind == "veth":
            up.append(
                f"link add {self.up_dev} address {up_mac} type veth"
                f" peer name {HOST_DEV} address {host_mac} netns {self.host_netns}"
            )
            host = []
        else:
            up += [
                f"tuntap add dev {self.up_dev} mode tap",
                f"link set {self.up_dev} address {up_mac}",
            ]
            host = [
                f"tuntap add dev {HOST_DEV} mode tap",
                f"link set {HOST_DEV} address {host_mac}",
            ]
        if self.up_addr:
            up.append(f"addr add {self.up_addr} dev {self.up_dev}")
        else:
            up.append(f"link set {self.up_dev} master {BRIDGE}")
        up.append(f"link set {self.up_dev} up")
        host += [
            f"addr add {self.host_addr} dev {HOST_DEV}",
            f"link set {HOST_DEV} up",
            f"route add default via {self.gateway}",
        ]
        if self.gateway == BLACKHOLE_GW:
            host.append(f"neigh add {BLACKHOLE_GW} lladdr {BLACKHOLE_MAC} nud permanent dev eth0")
        return up, host


class NetBed:
    """Builds a NAT topology in network namespaces and tears all of it down again."""

    def __init__(self, state_root: Path = STATE_ROOT, owner: str = "process") -> None:
        self.prefix = f"{NAME_ROOT}{os.getpid():x}x{next(_bed_counter)}-"
        self.pub = self.prefix + "pub"
        self.state_dir = state_root / self.prefix.rstrip("-")
        self.hosts: dict[str, Host] = {}
        self._owner = owner
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._links: dict[str, _Link] = {}
        self._nat_count = 0
        self._public_count = 0
        self._coturn: tuple[str, int] | None = None
        self._closed = False
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> NetBed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the internet namespace (``pub`` with bridge ``br0``); idempotent."""
        if self._started:
            return
        if self._closed:
            raise NetBedError("this bed was closed; make a new NetBed")
        self._started = True
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._add_namespace(self.pub)
        self._sysctl(self.pub, {"net.bridge.bridge-nf-call-iptables": "0"}, optional=True)
        _ip_batch(
            self.pub,
            [
                "link set lo up",
                f"link add {BRIDGE} address {BRIDGE_MAC} type bridge",
                *(f"addr add {a}/{INTERNET_PREFIXLEN} dev {BRIDGE}" for a in BRIDGE_ADDRS),
                f"link set {BRIDGE} up",
                f"route add default via {BLACKHOLE_GW}",
                f"neigh add {BLACKHOLE_GW} lladdr {BLACKHOLE_MAC} nud permanent dev {BRIDGE}",
            ],
        )

    def close(self) -> None:
        """Stop our processes, delete our namespaces; raises if something could not be removed."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            # Keep going on errors: the namespace sweep below kills what is left inside.
            with contextlib.suppress(OSError):
                _stop_proc(proc)
        leftovers = _teardown_namespaces(self._namespaces)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if leftovers:
            raise NetBedError(f"namespaces left behind: {leftovers}")

    # -- topology --------------------------------------------------------------------------

    def add_public_host(self, name: str) -> Host:
        """A host directly on the internet (bootstrap node, STUN reflector, relay)."""
        self.start()
        if self._public_count > PUBLIC_LAST - PUBLIC_FIRST:
            raise NetBedError("out of public addresses")
        ip = _internet_ip(PUBLIC_FIRST + self._public_count)
        self._public_count += 1
        netns = self._new_host_namespace(name)
        link = _Link(
            up_netns=self.pub,
            up_dev=f"p{len(self._links)}",
            host_netns=netns,
            index=len(self._links),
            up_addr=None,
            host_addr=f"{ip}/{INTERNET_PREFIXLEN}",
            gateway=BLACKHOLE_GW,
        )
        self._create_link(link)
        host = Host(name, netns, ip, ip, None, None, self)
        return self._register(host, link)

    def add_nat_host(self, name: str, nat: NatType = "restricted_cone") -> Host:
        """A host behind its own NAT router (``<prefix><name>-r``) of the given type."""
        if nat not in NAT_TYPES:
            raise ValueError(f"nat must be one of {NAT_TYPES}, got {nat!r}")
        self.start()
        if self._nat_count > ROUTER_WAN_LAST - ROUTER_WAN_FIRST:
            raise NetBedError("out of router WAN addresses")
        self._nat_count += 1
        n = self._nat_count
        wan_ip = _internet_ip(ROUTER_WAN_FIRST + n - 1)
        lan_router, lan_host = f"10.0.{n}.{LAN_ROUTER_OCTET}", f"10.0.{n}.{LAN_HOST_OCTET}"
        netns = self._new_host_namespace(name)
        router = self.prefix + name + "-r"
        self._add_namespace(router)
        port = f"p{len(self._links)}w"
        _ip_batch(
            self.pub,
            [
                f"link add {port} type veth peer name {WAN} netns {router}",
                f"link set {port} master {BRIDGE}",
                f"link set {port} up",
            ],
        )
        _ip_batch(
            router,
            [
                "link set lo up",
                f"addr add {wan_ip}/{INTERNET_PREFIXLEN} dev {WAN}",
                f"link set {WAN} up",
                f"route add default via {BLACKHOLE_GW}",
                f"neigh add {BLACKHOLE_GW} lladdr {BLACKHOLE_MAC} nud permanent dev {WAN}",
            ],
        )
        link = _Link(
            up_netns=router,
            up_dev=LAN,
            host_netns=netns,
            index=len(self._links),
            up_addr=f"{lan_router}/24",
            host_addr=f"{lan_host}/24",
            gateway=lan_router,
        )
        self._create_link(link)
        self._sysctl(router, {"net.ipv4.ip_forward": "1"})
        _run(_ns_exec(router, ["iptables-restore"]), input=_router_rules(nat, wan_ip, lan_host))
        host = Host(name, netns, lan_host, wan_ip, nat, router, self)
        return self._register(host, link)

    # -- services and impairments ----------------------------------------------------------

    def start_coturn(
        self, user: str = "alice", password: str = "secret", realm: str = "test"
    ) -> tuple[str, int]:
        """Start coturn (STUN + TURN over UDP) in the internet namespace; returns (ip, port)."""
        self.start()
        if self._coturn is not None:
            raise NetBedError("coturn already runs in this bed")
        argv = [
            "turnserver",
            "-n",  # no configuration file
            *(f"--listening-ip={a}" for a in BRIDGE_ADDRS),
            f"--relay-ip={BRIDGE_ADDRS[0]}",
            f"--listening-port={TURN_PORT}",
            f"--min-port={TURN_RELAY_PORTS[0]}",
            f"--max-port={TURN_RELAY_PORTS[1]}",
            "--no-tls",
            "--no-dtls",
            "--no-tcp-relay",
            "--no-cli",
            "--lt-cred-mech",
            f"--realm={realm}",
            f"--user={user}:{password}",
            "--fingerprint",
            f"--db={self.state_dir / 'turndb'}",
            f"--pidfile={self.state_dir / 'turn.pid'}",
            "--log-file=stdout",
            "--simple-log",
        ]
        log = (self.state_dir / "coturn.log").open("w")
        try:
            proc = subprocess.Popen(
                _ns_exec(self.pub, argv), stdout=log, stderr=subprocess.STDOUT, text=True
            )
        finally:
            log.close()
        self._track(proc)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _udp_port_bound(proc.pid, TURN_PORT):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.state_dir / "coturn.log").read_text(errors="replace")[-2000:]
                raise NetBedError(f"coturn did not start (exit {proc.returncode}):\n{tail}")
            time.sleep(POLL_INTERVAL_S)
        self._coturn = (BRIDGE_ADDRS[0], TURN_PORT)
        self._save_state()
        return self._coturn

    def impair(
        self,
        host: Host,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        *,
        reorder: bool = False,
        seed: int | None = None,
    ) -> None:
        """Put a userspace impaired link (``linkemu.py``) on ``host``'s wire, both directions.

        For a NAT host the wire is router LAN <-> host, for a public host bridge <-> host, so
        the round trip to anywhere gains 2 x delay. Calling again replaces the impairment.
        """
        link = self._links[host.name]
        if link.emulator is not None:
            _stop_proc(link.emulator)
            link.emulator = None
        if link.kind == "veth":
            # Swap the veth pair for two persistent TAPs with the same names and addresses;
            # iptables rules match by name and conntrack by address, so both survive the swap.
            _ip_batch(link.up_netns, [f"link del {link.up_dev}"])
            link.kind = "tap"
            self._create_link(link)
        argv = [
            sys.executable,
            str(LINKEMU),
            f"--a={link.up_netns}:{link.up_dev}",
            f"--b={link.host_netns}:{HOST_DEV}",
            f"--delay-ms={delay_ms}",
            f"--jitter-ms={jitter_ms}",
            f"--loss={loss}",
            *(["--reorder"] if reorder else []),
            *([f"--seed={seed}"] if seed is not None else []),
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self._track(proc)
        link.emulator = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the emulator exits (EOF) if it cannot start
        if line.strip() != "ready":
            _stop_proc(proc)
            raise NetBedError(f"link emulator failed to start for {host.name}: {line!r}")
        self._save_state()

    def set_router_loss(self, host: Host, probability: float) -> None:
        """Drop forwarded packets at random in ``host``'s router, both directions (no delay).

        Cheaper than ``impair``: no extra process, the kernel drops (``-m statistic``).
        """
        router = self._router_of(host)
        rules = ["*mangle", "-F FORWARD"]
        if probability > 0.0:
            for direction in ("-o", "-i"):
                rules.append(
                    f"-A FORWARD {direction} {WAN} -m statistic --mode random "
                    f"--probability {probability} -j DROP"
                )
        rules.append("COMMIT")
        _run(_ns_exec(router, ["iptables-restore", "--noflush"]), input="\n".join(rules) + "\n")

    def set_udp_timeout(self, host: Host, seconds: int) -> None:
        """Set how long ``host``'s NAT keeps an idle UDP binding (conntrack is per namespace)."""
        self._sysctl(
            self._router_of(host),
            {
                "net.netfilter.nf_conntrack_udp_timeout": str(seconds),
                "net.netfilter.nf_conntrack_udp_timeout_stream": str(seconds),
            },
        )

    def flush_conntrack(self, host: Host | None = None) -> None:
        """Forget every NAT binding (of one host's router, or of all routers)."""
        routers = [self._router_of(host)] if host else self._routers()
        for router in routers:
            _run(_ns_exec(router, ["conntrack", "-F"]))

    def conntrack_entries(self, host: Host) -> list[str]:
        """The UDP entries of ``host``'s router, as ``conntrack -L`` prints them."""
        out = _run(_ns_exec(self._router_of(host), ["conntrack", "-L", "-p", "udp"]))
        return [line for line in out.splitlines() if line.strip()]

    def describe(self) -> dict[str, Any]:
        """A JSON-able picture of the bed (for the command line and for failure messages)."""
        return {
            "prefix": self.prefix,
            "owner": self._owner,
            "owner_pid": os.getpid(),
            "namespaces": list(self._namespaces),
            "coturn": self._coturn,
            "hosts": {
                h.name: {
                    "netns": h.netns,
                    "ip": h.ip,
                    "public_ip": h.public_ip,
                    "nat": h.nat,
                    "router_netns": h.router_netns,
                }
                for h in self.hosts.values()
            },
            "pids": [
                {"pid": p.pid, "cmdline": _argv_of(p)} for p in self._procs if p.poll() is None
            ],
        }

    # -- internals -------------------------------------------------------------------------

    def _track(self, proc: subprocess.Popen[Any]) -> None:
        self._procs.append(proc)

    def _register(self, host: Host, link: _Link) -> Host:
        self.hosts[host.name] = host
        self._links[host.name] = link
        self._save_state()
        return host

    def _new_host_namespace(self, name: str) -> str:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"host names are letters, digits, '-' and '_': {name!r}")
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        if name == "pub" or name.endswith("-r"):
            raise ValueError(f"{name!r} would clash with the internet or a router namespace")
        netns = self.prefix + name
        self._add_namespace(netns)
        _ip_batch(netns, ["link set lo up"])
        return netns

    def _add_namespace(self, netns: str) -> None:
        # Recorded before creation, so a failure half-way is still cleaned up by close().
        self._namespaces.append(netns)
        self._save_state()
        _run(["ip", "netns", "add", netns])

    def _create_link(self, link: _Link) -> None:
        up, host = link.create_commands()
        if link.kind == "tap":
            # Both TAPs must exist before either is configured; create the host one first.
            _ip_batch(link.host_netns, host[:2])
            host = host[2:]
        _ip_batch(link.up_netns, up)
        _ip_batch(link.host_netns, host)

    def _sysctl(self, netns: str, values: dict[str, str], optional: bool = False) -> None:
        """Write sysctls inside a namespace (``/proc/sys/net`` is per network namespace)."""
        script = []
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            write = f"echo {value} > {path}"
            script.append(f"if [ -e {path} ]; then {write}; fi" if optional else write)
        _run(_ns_exec(netns, ["sh", "-ec", "; ".join(script)]))

    def _router_of(self, host: Host) -> str:
        if host.router_netns is None:
            raise ValueError(f"{host.name} is a public host: it has no NAT router")
        return host.router_netns

    def _routers(self) -> list[str]:
        return [h.router_netns for h in self.hosts.values() if h.router_netns]

    def _save_state(self) -> None:
        if self.state_dir.exists():
            (self.state_dir / "state.json").write_text(json.dumps(self.describe(), indent=1))


def _internet_ip(last_octet: int) -> str:
    return f"203.0.113.{last_octet}"


def _argv_of(proc: subprocess.Popen[Any]) -> list[str]:
    """The command line ``/proc/<pid>/cmdline`` shows: ``ip netns exec NS`` execs its command."""
    args = proc.args
    argv = [str(a) for a in args] if isinstance(args, list | tuple) else [str(args)]
    return argv[4:] if argv[:3] == ["ip", "netns", "exec"] else argv


def _router_rules(nat: NatType, wan_ip: str, lan_host: str) -> str:
    """iptables-restore input for a router of the given NAT type (see the notes for why)."""
    masquerade = f"-A POSTROUTING -o {WAN} -j MASQUERADE"
    if nat == "symmetric":
        masquerade += " --random-fully"  # a new random port per destination
    full_cone = (
        [f"-A PREROUTING -i {WAN} -d {wan_ip} -p udp -j DNAT --to-destination {lan_host}"]
        if nat == "full_cone"
        else []
    )
    return "\n".join(
        [
            "*filter",
            # INPUT DROP: an unsolicited packet to the router must not leave a *confirmed*
            # conntrack entry, or the host's later outbound flow collides with it and
            # MASQUERADE silently picks another port (a cone turns symmetric).
            ":INPUT DROP [0:0]",
            ":FORWARD DROP [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            "-A INPUT -i lo -j ACCEPT",
            f"-A INPUT -i {LAN} -j ACCEPT",
            "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-A FORWARD -i {LAN} -o {WAN} -j ACCEPT",
            f"-A FORWARD -i {WAN} -o {LAN} -m conntrack --ctstate ESTABLISHED,RELATED,DNAT "
            "-j ACCEPT",
            "COMMIT",
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":INPUT ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]",
            *full_cone,
            masquerade,
            "COMMIT",
            "",
        ]
    )


def _udp_port_bound(pid: int, port: int) -> bool:
    """Whether the namespace of ``pid`` has a UDP socket on ``port`` (no process spawned)."""
    try:
        table = Path(f"/proc/{pid}/net/udp").read_text()
    except OSError:
        return False
    suffix = f":{port:04X}"
    return any(line.split()[1].endswith(suffix) for line in table.splitlines()[1:])


def _teardown_namespaces(namespaces: Sequence[str]) -> list[str]:
    """Kill what still runs inside our namespaces, delete them; returns the ones left."""
    existing = set(list_namespaces())
    ours = [ns for ns in namespaces if ns in existing]
    for netns in ours:
        # Anything still inside a namespace we created was started there by us or by a test.
        out = _run(["ip", "netns", "pids", netns], check=False)
        for pid in (int(p) for p in out.split()):
            _stop_pid(pid, None)
    _run(
        ["ip", "-force", "-batch", "-"],
        input="\n".join(f"netns del {ns}" for ns in ours),
        check=False,
    )
    remaining = set(list_namespaces())
    return [ns for ns in ours if ns in remaining]


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list`` prints ``name (id: n)``)."""
    out = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def teardown_from_state(state_file: Path) -> list[str]:
    """Tear down a bed described by a saved ``state.json`` (its owner process is gone)."""
    state = json.loads(state_file.read_text())
    for entry in state.get("pids", []):
        _stop_pid(int(entry["pid"]), entry["cmdline"])
    leftovers = _teardown_namespaces(state.get("namespaces", []))
    if not leftovers:
        shutil.rmtree(state_file.parent, ignore_errors=True)
    return leftovers


# -- command line ----------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    bed = NetBed(owner="cli")
    try:
        bed.start()
        for spec in args.nat:
            name, _, nat = spec.partition(":")
            bed.add_nat_host(name, nat=nat or "restricted_cone")  # type: ignore[arg-type]
        for name in args.public:
            bed.add_public_host(name)
        if args.coturn:
            bed.start_coturn(user=args.user, password=args.password)
    except BaseException:
        bed.close()
        raise
    picture = bed.describe()
    picture["up_seconds"] = round(time.monotonic() - t0, 3)
    picture["state_file"] = str(bed.state_dir / "state.json")
    print(json.dumps(picture, indent=1))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    failed = False
    for state_file in sorted(STATE_ROOT.glob("*/state.json")):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        wanted = (
            state["prefix"] in {p.rstrip("-") + "-" for p in args.prefix}
            if args.prefix
            else (state.get("owner") == "cli" or not pid_alive(int(state.get("owner_pid", 0))))
        )
        if not wanted:
            continue
        t0 = time.monotonic()
        leftovers = teardown_from_state(state_file)
        took = time.monotonic() - t0
        print(
            f"{state['prefix']}: down in {took:.3f}s" + (f", LEFT {leftovers}" if leftovers else "")
        )
        failed |= bool(leftovers)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.nat.netbed", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a bed and leave it running")
    up.add_argument(
        "--nat",
        action="append",
        default=[],
        metavar="NAME:TYPE",
        help=f"NAT host; TYPE one of {', '.join(NAT_TYPES)}",
    )
    up.add_argument("--public", action="append", default=[], metavar="NAME", help="public host")
    up.add_argument("--coturn", action="store_true", help="start coturn on 203.0.113.1:3478")
    up.add_argument("--user", default="alice")
    up.add_argument("--password", default="secret")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", help="tear down beds made by `up` and orphaned beds")
    down.add_argument("prefix", nargs="*", help="only these prefixes (e.g. 3bc1f2x0-)")
    down.set_defaults(func=_cmd_down)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
