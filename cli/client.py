"""A blocking JSON-RPC client for the control socket: the CLI needs nothing fancier."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from overlay.control import socket_path


class ClientError(Exception):
    """Something a person must be told in one line: no daemon, or the daemon said no."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ControlClient:
    def __init__(self, state_dir: Path, timeout: float = 30.0) -> None:
        self.path = socket_path(state_dir)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._next_id = 1

    def __enter__(self) -> ControlClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise ClientError(
                f"no daemon is running for state dir {self.path.parent} "
                "(start one with `3bc daemon`)"
            ) from None
        except PermissionError:
            sock.close()
            raise ClientError(
                f"not allowed to open {self.path} (it belongs to another user)"
            ) from None
        self._sock = sock
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()

    def call(self, method: str, **params: Any) -> Any:
        assert self._sock is not None
        request = {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params}
        self._next_id += 1
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        reply = self.read()
        if "error" in reply:
            raise ClientError(reply["error"].get("message", "error"), reply["error"].get("code"))
        return reply.get("result")

    def read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise ClientError("the daemon did not answer in time") from None
            if not chunk:
                raise ClientError("the daemon closed the control connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


def call(state_dir: Path, method: str, wait: float = 30.0, **params: Any) -> Any:
    with ControlClient(state_dir, wait) as client:
        return client.call(method, **params)
