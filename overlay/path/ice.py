"""Trio shell over aioice: gather, connect, then move the data path to a trio-native socket.

aioice (asyncio, via trio-asyncio) is good at finding and nominating a candidate pair, but sending
through it costs one asyncio round trip per datagram (≈ 3-5k pkt/s here). So after nomination:

* direct pairs (host/srflx/prflx local candidate): we take over the *same* kernel socket — stop
  asyncio reading it, `dup()` its fd, close aioice. Same socket means same local (ip, port), so the
  NAT mapping the checks opened stays valid, and no datagram is lost to a close/rebind gap. The new
  socket keeps answering the peer's authenticated ICE checks (late checks, RFC 7675 consent),
  which aioice used to answer.
* relayed local candidate (TURN): the allocation, its refreshes and channel bindings live inside
  aioice, so data keeps flowing through aioice's send/recv behind the same `PathSocket` interface.

trio-asyncio pitfalls handled here: the loop's exception handler is replaced (its default
re-raises any asyncio error into our nursery), end-of-candidates is always signalled, and every
wait is bounded by a trio timeout (aioice gives up on an impossible pair only after ~63 s).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

import aioice
import trio
import trio_asyncio

from overlay.path.errors import IceFailed, IceSignalError, LocalPathError
from overlay.path.stun_reflector import (
    answer_ice_check,
    binding_indication,
    install_padded_stun_client,
    is_stun,
)

logger = logging.getLogger(__name__)

Address = tuple[str, int]

# aioice waits 5 s for STUN/TURN answers while gathering; leave room for the TURN allocation.
GATHER_TIMEOUT = 10.0
# Send a keepalive this often: below the 30 s UDP timeout of many home routers (RFC 4787 asks
# for >= 2 min, but RFC 8445 15 s keepalives exist because real NATs are shorter).
KEEPALIVE_INTERVAL = 15.0
# RFC 8839 section 5.4: ice-ufrag is 4-256 ice-chars, ice-pwd 22-256.
MIN_UFRAG, MAX_UFRAG = 4, 256
MIN_PWD, MAX_PWD = 22, 256
# Hosts rarely have more than a few interfaces; 32 candidates bound the checks a peer asks of us.
MAX_REMOTE_CANDIDATES = 32
# An SDP candidate line is ~100 characters; refuse absurd ones before splitting them.
MAX_CANDIDATE_LENGTH = 512
# Receive buffer: bigger than any UDP payload we accept on a path, so nothing is truncated.
RECV_SIZE = 2048
# Batch size for `recv_batch_from`: drains the kernel queue without starving other tasks for long.
DEFAULT_BATCH = 64
_ICE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")

PathKind = Literal["direct", "turn"]


# --- signalling -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalIceInfo:
    """What we send to the peer by signalling (inside the encrypted handshake / DHT message)."""

    ufrag: str
    pwd: str
    candidates: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"ufrag": self.ufrag, "pwd": self.pwd, "candidates": list(self.candidates)}


def _check_ice_string(value: object, name: str, low: int, high: int) -> str:
    if not isinstance(value, str) or not low <= len(value) <= high:
        raise IceSignalError(f"{name} must be a string of {low}-{high} characters")
    if not set(value) <= _ICE_CHARS:
        raise IceSignalError(f"{name} has characters outside ice-char")
    return value


def _parse_candidate(line: object) -> aioice.Candidate:
    if not isinstance(line, str) or len(line) > MAX_CANDIDATE_LENGTH:
        raise IceSignalError("candidate must be a string of bounded length")
    try:
        candidate = aioice.Candidate.from_sdp(line)
        ipaddress.ip_address(candidate.host)  # no mDNS names: they would trigger lookups
    except (ValueError, IndexError) as exc:
        raise IceSignalError(f"bad candidate {line[:80]!r}: {exc}") from exc
    if candidate.component != 1 or candidate.transport.lower() != "udp":
        raise IceSignalError("only UDP candidates of component 1 are used")
    if not 0 < candidate.port < 65536:
        raise IceSignalError("candidate port out of range")
    if candidate.type not in ("host", "srflx", "prflx", "relay"):
        raise IceSignalError(f"unknown candidate type {candidate.type!r}")
    return candidate


@dataclass(frozen=True, slots=True)
class RemoteIceInfo:
    """The peer's ICE description, validated: build it with `from_dict` from signalling input."""

    ufrag: str
    pwd: str
    candidates: tuple[str, ...]

    @classmethod
    def from_dict(cls, data: object) -> RemoteIceInfo:
        if not isinstance(data, dict):
            raise IceSignalError("ICE info must be a mapping")
        ufrag = _check_ice_string(data.get("ufrag"), "ufrag", MIN_UFRAG, MAX_UFRAG)
        pwd = _check_ice_string(data.get("pwd"), "pwd", MIN_PWD, MAX_PWD)
        lines = data.get("candidates")
        if not isinstance(lines, list) or len(lines) > MAX_REMOTE_CANDIDATES:
            raise IceSignalError(f"candidates must be a list of at most {MAX_REMOTE_CANDIDATES}")
        for line in lines:
            _parse_candidate(line)
        return cls(ufrag, pwd, tuple(lines))

    @classmethod
    def from_local(cls, info: LocalIceInfo) -> RemoteIceInfo:
        return cls.from_dict(info.to_dict())


# --- data path --------------------------------------------------------------------------------


class PathClosed(IceFailed):
    """The path's socket or aioice connection is gone."""


class PathSocket(Protocol):
    """What the session layer uses: datagrams to and from the nominated peer address."""

    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    async def recv_batch_from(
        self, max_count: int = DEFAULT_BATCH
    ) -> list[tuple[bytes, Address]]: ...
    async def keepalive(self) -> None: ...
    def close(self) -> None: ...


class NativePathSocket:
    """The nominated socket, taken over from aioice: plain non-blocking UDP driven by trio.

    Receives drain the kernel queue until EAGAIN before waiting (≈ 5x faster than one await per
    datagram); STUN datagrams are handled here (ICE checks answered, the rest dropped) and never
    reach the caller.
    """

    def __init__(
        self, sock: socket.socket, remote_addr: Address, local_ufrag: str, local_pwd: str
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        # Datagrams aioice had already queued before the takeover, delivered first.
        self._pending: list[bytes] = []
        self.remote_addr = remote_addr
        self._ufrag = local_ufrag
        self._pwd = local_pwd
        self.checks_answered = 0

    @property
    def local_addr(self) -> Address:
        host, port = self._sock.getsockname()[:2]
        return (host, port)

    def fileno(self) -> int:
        return self._sock.fileno()

    def send_nowait(self, data: bytes) -> bool:
        """Send without waiting; False if the kernel buffer is full (caller may drop or wait)."""
        try:
            self._sock.sendto(data, self.remote_addr)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.EBADF:
                raise PathClosed("path socket closed") from exc
            return True  # ICMP errors (ECONNREFUSED...) mean loss, like any UDP loss
        return True

    async def send(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.send_nowait(data):
            await trio.lowlevel.wait_writable(self._sock)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_batch(self, datagrams: list[bytes]) -> None:
        """Send many datagrams with one checkpoint, waiting only when the kernel buffer is full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        for data in datagrams:
            while not self.send_nowait(data):
                await trio.lowlevel.wait_writable(self._sock)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _filter(self, data: bytes, addr: Any) -> bool:
        """True if `data` is for the caller; STUN is consumed here."""
        if not is_stun(data):
            return True
        reply = answer_ice_check(data, addr, self._ufrag, self._pwd)
        if reply is not None:
            self.checks_answered += 1
            # A lost check answer is a lost datagram: the peer retries.
            with contextlib.suppress(OSError):
                self._sock.sendto(reply, addr[:2])
        return False

    def recv_nowait_from(self, max_count: int = DEFAULT_BATCH) -> list[tuple[bytes, Address]]:
        """Whatever is queued in the kernel right now (up to `max_count`), without waiting, with
        each datagram's source: the session layer follows a peer whose NAT rebound (new source
        port) once a datagram from there proves authentic."""
        pending, self._pending = self._pending[:max_count], self._pending[max_count:]
        out = [(data, self.remote_addr) for data in pending]
        while len(out) < max_count:
            try:
                data, addr = self._sock.recvfrom(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise PathClosed("path socket closed") from exc
                continue  # ICMP error reported on a UDP socket: skip it
            if self._filter(data, addr):
                out.append((data, addr[:2]))
        return out

    async def recv_batch_from(self, max_count: int = DEFAULT_BATCH) -> list[tuple[bytes, Address]]:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            out = self.recv_nowait_from(max_count)
            if out:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return out
            await trio.lowlevel.wait_readable(self._sock)

    async def recv(self) -> bytes:
        return (await self.recv_batch_from(1))[0][0]

    async def keepalive(self) -> None:
        await self.send(binding_indication())

    def close(self) -> None:
        self._sock.close()


class AioicePathSocket:
    """Data through aioice, for a relayed (TURN) local candidate whose allocation lives there."""

    def __init__(self, loop: Any, connection: aioice.Connection, remote_addr: Address) -> None:
        self._loop = loop
        self._conn = connection
        self.remote_addr = remote_addr

    async def send(self, data: bytes) -> None:
        try:
            await self._loop.run_aio_coroutine(self._conn.send(data))
        except ConnectionError as exc:
            raise PathClosed(str(exc)) from exc

    async def send_batch(self, datagrams: list[bytes]) -> None:
        for data in datagrams:
            await self.send(data)

    async def recv(self) -> bytes:
        while True:
            try:
                data: bytes = await self._loop.run_aio_coroutine(self._conn.recv())
            except ConnectionError as exc:
                raise PathClosed(str(exc)) from exc
            if not is_stun(data):
                return data

    async def recv_batch_from(self, max_count: int = DEFAULT_BATCH) -> list[tuple[bytes, Address]]:
        """aioice hides the source; through TURN it is always the relayed peer address."""
        return [(await self.recv(), self.remote_addr)]

    async def keepalive(self) -> None:
        await self.send(binding_indication())

    def close(self) -> None:
        """aioice is closed with the agent (the TURN allocation is released there)."""


@dataclass(frozen=True, slots=True)
class NominatedPath:
    """The outcome of ICE: where to send, from where, and how ("direct" or via "turn")."""

    socket: NativePathSocket | AioicePathSocket
    local_addr: Address
    remote_addr: Address
    kind: PathKind
    local_type: str
    remote_type: str


async def run_keepalive(path: NominatedPath, interval: float = KEEPALIVE_INTERVAL) -> None:
    """Keep the NAT mapping (and a TURN permission) open: one tiny packet every `interval`."""
    while True:
        await trio.sleep(interval)
        try:
            await path.socket.keepalive()
        except PathClosed:
            return


# --- agent ------------------------------------------------------------------------------------


def _log_asyncio_error(loop: Any, context: dict[str, Any]) -> None:
    # trio-asyncio's default handler re-raises into the nursery; aioice's stray errors (a
    # failed retransmission on a closed socket, ...) are not fatal to the daemon.
    logger.debug("asyncio: %s", context.get("message"), exc_info=context.get("exception"))


class IceAgent:
    """One ICE negotiation, used as `async with IceAgent(controlling=True) as agent:`.

    The agent owns a trio-asyncio loop for aioice; the returned `NominatedPath` is valid until the
    `async with` block ends (a TURN path needs the loop; a direct path's socket is closed too).
    """

    def __init__(
        self,
        controlling: bool,
        stun_server: Address | None = None,
        turn_server: Address | None = None,
        turn_username: str | None = None,
        turn_password: str | None = None,
        *,
        keep_aioice_path: bool = False,
    ) -> None:
        install_padded_stun_client()
        self.controlling = controlling
        # Keep data on aioice even for direct pairs: a fallback, and the baseline for benchmarks.
        self._keep_aioice_path = keep_aioice_path
        self._conn = aioice.Connection(
            ice_controlling=controlling,
            stun_server=stun_server,
            turn_server=turn_server,
            turn_username=turn_username,
            turn_password=turn_password,
        )
        # Regular nomination, which aioice does for a lite peer: the controlling side nominates
        # the first pair that works with one extra check, and the controlled side takes exactly
        # that pair. With aioice's default aggressive nomination each side completes on the first
        # nominated pair *it* sees, and they may differ: on the NAT bed ~1 in 3 symmetric pairs
        # through TURN ended with A sending host->B's relay and B host->A's relay, both allocations
        # unread after the takeover, and nothing ever arrived (redialled after NEVER_UP_AFTER).
        self._conn.remote_is_lite = True
        self._stack = AsyncExitStack()
        self._loop: Any = None
        self._gathered: LocalIceInfo | None = None
        self._path: NominatedPath | None = None
        self._conn_closed = False

    async def __aenter__(self) -> IceAgent:
        self._loop = await self._stack.enter_async_context(trio_asyncio.open_loop())
        self._loop.set_exception_handler(_log_asyncio_error)
        self._stack.push_async_callback(self._close)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            if self._path is not None:
                self._path.socket.close()
            await self._close_conn()

    async def _close_conn(self) -> None:
        if not self._conn_closed:
            self._conn_closed = True
            with trio.move_on_after(GATHER_TIMEOUT):
                await self._loop.run_aio_coroutine(self._conn.close())

    def _require_loop(self) -> None:
        if self._loop is None:
            raise LocalPathError("use IceAgent as `async with IceAgent(...) as agent`")

    async def gather(self) -> LocalIceInfo:
        """Gather host, server-reflexive (padded STUN) and relayed candidates."""
        self._require_loop()
        with trio.move_on_after(GATHER_TIMEOUT) as scope:
            await self._loop.run_aio_coroutine(self._conn.gather_candidates())
        if scope.cancelled_caught:
            raise IceFailed("candidate gathering timed out")
        self._gathered = LocalIceInfo(
            ufrag=self._conn.local_username,
            pwd=self._conn.local_password,
            candidates=[c.to_sdp() for c in self._conn.local_candidates],
        )
        return self._gathered

    async def connect(self, remote: RemoteIceInfo, timeout: float) -> NominatedPath:
        """Run the checks against `remote` for at most `timeout` seconds; raises `IceFailed`."""
        self._require_loop()
        if self._gathered is None:
            raise LocalPathError("gather() before connect()")
        if self._path is not None:
            raise LocalPathError("connect() already succeeded")
        conn = self._conn
        conn.remote_username = remote.ufrag
        conn.remote_password = remote.pwd
        with trio.move_on_after(timeout) as scope:
            for line in remote.candidates:
                await self._loop.run_aio_coroutine(
                    conn.add_remote_candidate(_parse_candidate(line))
                )
            # End-of-candidates: without it a failing connect() waits forever.
            await self._loop.run_aio_coroutine(conn.add_remote_candidate(None))
            try:
                await self._loop.run_aio_coroutine(conn.connect())
            except ConnectionError as exc:
                raise IceFailed(f"ICE failed: {exc}") from exc
        if scope.cancelled_caught:
            raise IceFailed(f"ICE did not nominate a pair within {timeout} s")
        self._path = await self._take_path()
        return self._path

    def _drain_aioice_queue(self) -> list[bytes]:
        """Data aioice received before we stopped its reading (private `_queue`; best effort)."""
        queue = getattr(self._conn, "_queue", None)
        out: list[bytes] = []
        while queue is not None and not queue.empty():
            item = queue.get_nowait()
            if item is not None and not is_stun(item[0]):
                out.append(item[0])
        return out

    async def _take_path(self) -> NominatedPath:
        # aioice has no public accessor for the nominated pair; `_nominated` maps component -> pair.
        nominated = getattr(self._conn, "_nominated", None)
        if not isinstance(nominated, dict) or 1 not in nominated:
            raise LocalPathError("aioice changed: cannot find the nominated pair")
        pair = nominated[1]
        local, remote = pair.local_candidate, pair.remote_candidate
        kind: PathKind = "turn" if "relay" in (local.type, remote.type) else "direct"
        remote_addr = (pair.remote_addr[0], pair.remote_addr[1])
        if local.type == "relay" or self._keep_aioice_path:
            return NominatedPath(
                socket=AioicePathSocket(self._loop, self._conn, remote_addr),
                local_addr=(local.host, local.port),
                remote_addr=remote_addr,
                kind=kind,
                local_type=local.type,
                remote_type=remote.type,
            )
        transport = pair.protocol.transport
        # Stop asyncio reading first, so from here every datagram stays in the kernel for us.
        transport.pause_reading()
        raw = transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        native = NativePathSocket(
            sock, remote_addr, self._conn.local_username, self._conn.local_password
        )
        local_addr = native.local_addr
        native._pending = self._drain_aioice_queue()
        # aioice closes its own fd of the socket; ours (the dup) keeps the socket alive.
        await self._close_conn()
        return NominatedPath(
            socket=native,
            local_addr=local_addr,
            remote_addr=remote_addr,
            kind=kind,
            local_type=local.type,
            remote_type=remote.type,
        )
