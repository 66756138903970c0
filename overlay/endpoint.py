"""The daemon's UDP socket: one socket, drained in bursts, demultiplexed by the first byte.

A plain non-blocking socket read until EAGAIN and then `wait_readable` moves ~5x more datagrams
per second than one trio `recvfrom` per await on this machine (see DESIGN.md), and sends never
block: UDP may drop, so a full send buffer drops too and is counted.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from overlay.wire import Address

log = logging.getLogger("3bc.endpoint")

# Large buffers absorb bursts (a video keyframe is dozens of datagrams).
SOCKET_BUFFER = 4 * 1024 * 1024
RECV_SIZE = 65535
# Datagrams handled before yielding to other tasks, so one flood cannot starve the control socket.
BURST = 256

Handler = Callable[[bytes, Address, "Endpoint"], None]


def parse_hostport(text: str, default_port: int | None = None) -> Address:
    """'1.2.3.4:5', '[::1]:5', 'host' (with a default port) -> (host, port)."""
    text = text.strip()
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad address {text!r}")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest.startswith(":"):
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"address {text!r} needs a port")
        port = default_port
    else:
        if not port_text.isdigit():
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return (host or "0.0.0.0", port)


def normalize(addr: tuple) -> Address:
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    if "%" in host:
        host = host.split("%", 1)[0]
    return (host, addr[1])


@dataclass
class EndpointStats:
    received: int = 0
    sent: int = 0
    send_dropped: int = 0
    unknown_kind: int = 0
    handler_errors: int = 0
    by_kind: dict[int, int] = field(default_factory=dict)


class Endpoint:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.local: Address = normalize(sock.getsockname())
        self.family = sock.family
        # Read for every datagram sent: plain attributes, not enum compares and bound lookups.
        self._v6 = sock.family == socket.AF_INET6
        self._sendto = sock.sendto
        self.handlers: dict[int, Handler] = {}
        self.stats = EndpointStats()

    @classmethod
    def bind(cls, address: Address) -> Endpoint:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def route(self, kinds: range | list[int], handler: Handler) -> None:
        for kind in kinds:
            self.handlers[kind] = handler

    def send(self, address: Address, data: bytes) -> bool:
        dest: tuple = address
        if self._v6:
            if ":" not in address[0]:
                dest = ("::ffff:" + address[0], address[1])
        elif ":" in address[0]:
            self.stats.send_dropped += 1
            return False
        try:
            self._sendto(data, dest)
        except (BlockingIOError, InterruptedError):
            self.stats.send_dropped += 1
            return False
        except OSError as exc:
            # Unreachable networks and ICMP errors from earlier sends land here; UDP shrugs.
            if exc.errno not in (
                errno.ENETUNREACH,
                errno.EHOSTUNREACH,
                errno.ECONNREFUSED,
                errno.EPERM,
                errno.EINVAL,
                errno.EAFNOSUPPORT,
            ):
                log.warning("send to %s failed: %s", address, exc)
            self.stats.send_dropped += 1
            return False
        self.stats.sent += 1
        return True

    async def serve(self) -> None:
        sock = self.sock
        v4 = not self._v6  # IPv4 sockets already give plain (host, port)
        got = 0
        while True:
            # Only an empty socket waits for epoll: a busy one is read again after the other
            # tasks had their turn, which costs one EAGAIN at most instead of an epoll round trip
            # (two epoll_ctl and a scheduler pass) per burst.
            if not got:
                await trio.lowlevel.wait_readable(sock)
            got = 0
            for _ in range(BURST):
                try:
                    data, addr = sock.recvfrom(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # ICMP errors surface as recv errors on Linux
                got += 1
                self.stats.received += 1
                if not data:
                    continue
                handler = self.handlers.get(data[0])
                if handler is None:
                    self.stats.unknown_kind += 1
                    continue
                try:
                    handler(data, addr if v4 else normalize(addr), self)
                except Exception:  # a handler bug must not take the daemon down
                    self.stats.handler_errors += 1
                    log.exception("handler for kind 0x%02x failed", data[0])
            await trio.lowlevel.checkpoint()

    def close(self) -> None:
        self.sock.close()
