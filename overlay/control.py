"""The local control socket: JSON-RPC 2.0, one JSON document per line, owner only.

Frontends (the `3bc` CLI, later a web page) drive the daemon only through this socket. It is a
Unix socket of mode 0600 in the state dir, and every connection's peer uid is checked, because
whoever speaks here can place calls as the owner. The API is documented in docs/control-api.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from overlay.events import EventBus

log = logging.getLogger("3bc.control")

API_VERSION = 1
SOCKET_NAME = "control.sock"
# One request line at most; a lookup or call request is well under 1 KiB.
MAX_LINE = 64 * 1024
# Linux sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
MAX_CLIENTS = 64

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Application errors (JSON-RPC reserves -32000..-32099 for servers).
NOT_FOUND = -32004
TIMEOUT = -32005
UNAVAILABLE = -32006
REFUSED = -32007


class RpcError(Exception):
    """An error the method returns to the client as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


Method = Callable[[dict[str, Any]], Awaitable[Any]]


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _error(req_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": req_id, "error": err}


class ControlServer:
    def __init__(self, state_dir: Path, events: EventBus) -> None:
        self.path = socket_path(state_dir)
        self.events = events
        self.methods: dict[str, Method] = {}
        self._listener: trio.socket.SocketType | None = None
        self._clients = 0

    def method(self, name: str) -> Callable[[Method], Method]:
        def register(fn: Method) -> Method:
            self.methods[name] = fn
            return fn

        return register

    def bind(self) -> None:
        """Create the socket file with mode 0600, refusing to steal a live daemon's socket."""
        path = str(self.path)
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise OSError(f"control socket path too long for Unix sockets: {path}")
        if self.path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                self.path.unlink()  # stale socket from a daemon that died
            else:
                raise OSError(f"a daemon is already running on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is born 0600: no window where others can connect
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(16)
        self._listener = trio.socket.from_stdlib_socket(sock)

    async def serve(self) -> None:
        assert self._listener is not None, "bind() first"
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await self._listener.accept()
                    nursery.start_soon(self._client, conn)
        finally:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _client(self, conn: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(conn)
        async with stream:
            if peer_uid(conn) != os.getuid():
                await self._write(stream, _error(None, REFUSED, "not the daemon's owner"))
                return
            if self._clients >= MAX_CLIENTS:
                await self._write(stream, _error(None, UNAVAILABLE, "too many control clients"))
                return
            self._clients += 1
            try:
                await self._conversation(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self._clients -= 1

    async def _conversation(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\n" not in buffer:
                if len(buffer) > MAX_LINE:
                    await self._write(stream, _error(None, INVALID_REQUEST, "line too long"))
                    return
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buffer += chunk
            line, buffer = buffer.split(b"\n", 1)
            if len(line) > MAX_LINE:
                await self._write(stream, _error(None, INVALID_REQUEST, "line too long"))
                return
            if not line.strip():
                continue
            reply, subscribe = await self._handle(line)
            if reply is not None:
                await self._write(stream, reply)
            if subscribe:
                await self._stream_events(stream)
                return

    async def _handle(self, line: bytes) -> tuple[dict[str, Any] | None, bool]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return _error(None, PARSE_ERROR, "not JSON"), False
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0":
            return _error(None, INVALID_REQUEST, "expected a JSON-RPC 2.0 object"), False
        req_id = request.get("id")
        if req_id is not None and not isinstance(req_id, str | int):
            return _error(None, INVALID_REQUEST, "id must be a string or integer"), False
        name = request.get("method")
        if not isinstance(name, str):
            return _error(req_id, INVALID_REQUEST, "method must be a string"), False
        params = request.get("params", {})
        if not isinstance(params, dict):
            return _error(req_id, INVALID_PARAMS, "params must be an object"), False
        if name == "events.subscribe":
            return {"jsonrpc": "2.0", "id": req_id, "result": {"subscribed": True}}, True
        fn = self.methods.get(name)
        if fn is None:
            return _error(req_id, METHOD_NOT_FOUND, f"no method {name!r}"), False
        try:
            result = await fn(params)
        except RpcError as exc:
            return _error(req_id, exc.code, exc.message, exc.data), False
        except Exception as exc:
            log.exception("control method %s failed", name)
            return _error(req_id, INTERNAL_ERROR, f"internal error: {exc}"), False
        if req_id is None:
            return None, False  # a notification: no reply
        return {"jsonrpc": "2.0", "id": req_id, "result": result}, False

    async def _stream_events(self, stream: trio.SocketStream) -> None:
        receive = self.events.subscribe()
        async with receive:
            async for event in receive:
                await self._write(stream, {"jsonrpc": "2.0", "method": "event", "params": event})

    @staticmethod
    async def _write(stream: trio.SocketStream, message: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(message).encode() + b"\n")


def param(params: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """Fetch and type-check one parameter, raising INVALID_PARAMS for the client."""
    if name not in params:
        if default is ...:
            raise RpcError(INVALID_PARAMS, f"missing parameter {name!r}")
        return default
    value = params[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RpcError(INVALID_PARAMS, f"parameter {name!r} must be {kind.__name__}")
    return value
