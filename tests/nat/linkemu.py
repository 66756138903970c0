"""Userspace impaired link: shuttle Ethernet frames between two TAP devices in two namespaces.

Why: this kernel has no ``sch_netem`` (``tc qdisc ... netem`` fails and modules cannot be
loaded), so delay, jitter and loss are added by a small process instead. The bed creates two
*persistent* TAP devices (``ip tuntap add``), configures them like any link, and starts this
script; the link carries frames only while the script runs (no carrier otherwise).

The script imports nothing from the project and is started by file path, so it runs the same
from pytest, from the command line bed and from any working directory::

    python linkemu.py --a NS1:lan --b NS2:eth0 --delay-ms 50 --jitter-ms 5 --loss 0.02

It prints ``ready`` once both TAP devices are attached and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import heapq
import os
import random
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass, field

# From <linux/sched.h>: the namespace type argument of setns(2).
CLONE_NEWNET = 0x40000000
# From <linux/if_tun.h>: _IOW('T', 202, int), and the flags of struct ifreq.ifr_flags.
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
# IFNAMSIZ (16) bytes of name, then a short of flags, padded to sizeof(struct ifreq) == 40.
IFREQ_FORMAT = "16sH22x"

# Largest frame read from a TAP: the devices keep MTU 1500, plus 14 B Ethernet header and an
# optional 4 B VLAN tag; 64 KiB covers offloaded super-frames should the MTU ever be raised.
MAX_FRAME = 65536
# Frames held per direction before tail drop. netem's default ``limit`` is 1000 packets; at the
# 50-200 ms delays tests use that still allows 5k-20k frames/s per direction.
QUEUE_LIMIT = 1000
# EtherType of ARP. Loss is applied to everything else: a lost ARP frame stalls neighbour
# resolution for a whole second (the kernel's retransmit time), which would turn a 2 % loss
# test into a flaky multi-second outage instead of the packet loss that was asked for.
ETHERTYPE_ARP = 0x0806
# Longest sleep of the poll loop when no frame is queued (signals interrupt it anyway).
IDLE_POLL_S = 0.5

_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into the named network namespace."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tap(netns: str, ifname: str) -> int:
    """Attach to the persistent TAP ``ifname`` inside ``netns``; returns a non-blocking fd.

    The device is looked up in the namespace of the process at ``open`` time, hence setns first.
    """
    enter_netns(netns)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    ifr = struct.pack(IFREQ_FORMAT, ifname.encode(), IFF_TAP | IFF_NO_PI)
    fcntl.ioctl(fd, TUNSETIFF, ifr)
    return fd


class _Stop(Exception):
    """Raised by the signal handler to leave the shuttle loop at once."""


@dataclass
class Impairment:
    """What one direction of the link does to each frame."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    reorder: bool = False


@dataclass
class Direction:
    """A one-way delay line: frames with their due time, released in due order."""

    src: int
    dst: int
    impairment: Impairment
    rng: random.Random
    queue: list[tuple[float, int, bytes]] = field(default_factory=list)
    last_due: float = 0.0
    seq: int = 0
    dropped: int = 0
    forwarded: int = 0

    def accept(self, frame: bytes, now: float) -> None:
        """Queue a frame just read from ``src`` (or drop it, as the impairment says)."""
        imp = self.impairment
        ethertype = int.from_bytes(frame[12:14], "big") if len(frame) >= 14 else 0
        lost = imp.loss > 0.0 and ethertype != ETHERTYPE_ARP and self.rng.random() < imp.loss
        if lost or len(self.queue) >= QUEUE_LIMIT:
            self.dropped += 1
            return
        delay = imp.delay_s
        if imp.jitter_s > 0.0:
            delay = max(0.0, delay + self.rng.uniform(-imp.jitter_s, imp.jitter_s))
        due = now + delay
        if not imp.reorder:
            # A wire does not reorder: jitter only stretches the gaps between frames.
            due = max(due, self.last_due)
        self.last_due = due
        self.seq += 1
        heapq.heappush(self.queue, (due, self.seq, frame))

    def release(self, now: float) -> None:
        """Write every frame that is due to ``dst``."""
        while self.queue and self.queue[0][0] <= now:
            _, _, frame = heapq.heappop(self.queue)
            try:
                os.write(self.dst, frame)
                self.forwarded += 1
            except OSError as exc:
                # EIO: the peer device is down; EAGAIN: its queue is full. A link drops then.
                if exc.errno not in (errno.EIO, errno.EAGAIN, errno.EINVAL):
                    raise
                self.dropped += 1

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


def run(a: tuple[str, str], b: tuple[str, str], imp: Impairment, seed: int | None) -> None:
    """Shuttle frames both ways until a terminating signal arrives."""
    fd_a = open_tap(*a)
    fd_b = open_tap(*b)
    rng = random.Random(seed)
    directions = {
        fd_a: Direction(fd_a, fd_b, imp, random.Random(rng.random())),
        fd_b: Direction(fd_b, fd_a, imp, random.Random(rng.random())),
    }

    def stop(_signum: int, _frame: object) -> None:
        # Raise rather than set a flag: PEP 475 resumes an interrupted poll() until its
        # timeout, which would delay every teardown by up to IDLE_POLL_S.
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    poller = select.poll()
    for fd in directions:
        poller.register(fd, select.POLLIN)
    print("ready", flush=True)
    with contextlib.suppress(_Stop):
        while True:
            now = time.monotonic()
            for d in directions.values():
                d.release(now)
            dues = [t for d in directions.values() if (t := d.next_due()) is not None]
            timeout_s = min(dues) - now if dues else IDLE_POLL_S
            events = poller.poll(max(0.0, min(timeout_s, IDLE_POLL_S)) * 1000.0)
            now = time.monotonic()
            for fd, _ in events:
                d = directions[fd]
                while True:
                    try:
                        frame = os.read(fd, MAX_FRAME)
                    except BlockingIOError:
                        break
                    d.accept(frame, now)
    stats = {fd: (d.forwarded, d.dropped) for fd, d in directions.items()}
    # The bed may have stopped reading (the command-line `up` exits): the report is optional.
    with contextlib.suppress(BrokenPipeError):
        print(f"stopped forwarded/dropped a->b={stats[fd_a]} b->a={stats[fd_b]}", flush=True)


def _endpoint(text: str) -> tuple[str, str]:
    netns, sep, ifname = text.partition(":")
    if not sep or not netns or not ifname:
        raise argparse.ArgumentTypeError(f"expected NETNS:IFNAME, got {text!r}")
    return netns, ifname


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=_endpoint, required=True, help="NETNS:TAP of one end")
    parser.add_argument("--b", type=_endpoint, required=True, help="NETNS:TAP of the other end")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- around delay")
    parser.add_argument("--loss", type=float, default=0.0, help="drop probability per frame")
    parser.add_argument("--reorder", action="store_true", help="let jitter reorder frames")
    parser.add_argument("--seed", type=int, default=None, help="random seed (reproducible)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.jitter_ms < 0 or not 0.0 <= args.loss <= 1.0:
        parser.error("delay and jitter must be >= 0 and loss in [0, 1]")
    imp = Impairment(args.delay_ms / 1000.0, args.jitter_ms / 1000.0, args.loss, args.reorder)
    run(args.a, args.b, imp, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
