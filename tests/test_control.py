"""The control socket: owner only, JSON-RPC 2.0, bad input answered and survived."""

import json
import os
import socket
import stat
from pathlib import Path

import trio
from hypothesis import given
from hypothesis import strategies as st

from overlay.control import MAX_LINE, ControlServer, socket_path
from overlay.events import EventBus
from overlay.identity import Identity
from overlay.node import Node, NodeOptions
from tests.conftest import free_udp_port


async def start(nursery, tmp_path):
    node = Node(
        Identity.generate(),
        NodeOptions(
            state_dir=tmp_path, listen=[("127.0.0.1", free_udp_port())], handle_signals=False
        ),
    )
    await nursery.start(node.run)
    return node


async def converse(path, *lines, read=None):
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        for line in lines:
            await stream.send_all(line)
        buffer = b""
        want = len(lines) if read is None else read
        with trio.fail_after(5):
            while buffer.count(b"\n") < want:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
    return [json.loads(x) for x in buffer.splitlines()]


async def test_socket_is_owner_only(tmp_path):
    async with trio.open_nursery() as nursery:
        await start(nursery, tmp_path)
        mode = stat.S_IMODE(os.stat(socket_path(tmp_path)).st_mode)
        assert mode == 0o600
        nursery.cancel_scope.cancel()


async def test_bad_requests_get_json_rpc_errors_and_the_daemon_keeps_serving(tmp_path):
    async with trio.open_nursery() as nursery:
        node = await start(nursery, tmp_path)
        path = socket_path(tmp_path)
        replies = await converse(
            path,
            b"this is not json\n",
            b'["jsonrpc", "2.0"]\n',
            b'{"jsonrpc": "2.0", "id": 1, "method": "no.such"}\n',
            b'{"jsonrpc": "2.0", "id": 2, "method": "dht.lookup", "params": {"public_key": 5}}\n',
            b'{"jsonrpc": "2.0", "id": 3, "method": "dht.lookup", '
            b'"params": {"public_key": "zz"}}\n',
            b'{"jsonrpc": "2.0", "id": 4, "method": "node.info", "params": []}\n',
            b'{"jsonrpc": "2.0", "id": 5, "method": "node.info"}\n',
        )
        codes = [r.get("error", {}).get("code") for r in replies]
        assert codes == [-32700, -32600, -32601, -32602, -32602, -32602, None]
        assert replies[-1]["result"]["public_key"] == node.identity.public_key.hex()
        # An oversized line is refused and the connection closed ...
        big = b'{"jsonrpc": "2.0", "id": 6, "method": "node.info", "x": "' + b"a" * (MAX_LINE + 10)
        replies = await converse(path, big + b'"}\n', read=1)
        assert replies[0]["error"]["code"] == -32600
        # ... and the daemon still answers others.
        replies = await converse(path, b'{"jsonrpc": "2.0", "id": 7, "method": "node.info"}\n')
        assert replies[0]["result"]["listen"]
        nursery.cancel_scope.cancel()


async def test_events_subscription_sees_peers_join(tmp_path):
    async with trio.open_nursery() as nursery:
        a = await start(nursery, tmp_path / "a" if (tmp_path / "a").mkdir() is None else None)
        stream = await trio.open_unix_socket(str(socket_path(tmp_path / "a")))
        await stream.send_all(b'{"jsonrpc": "2.0", "id": 1, "method": "events.subscribe"}\n')
        (tmp_path / "b").mkdir()
        b = Node(
            Identity.generate(),
            NodeOptions(
                state_dir=tmp_path / "b",
                listen=[("127.0.0.1", free_udp_port())],
                bootstrap=[a.endpoints[0].local],
                handle_signals=False,
            ),
        )
        await nursery.start(b.run)
        buffer = b""
        with trio.fail_after(5):
            while b"peer.added" not in buffer:
                buffer += await stream.receive_some(65536)
        lines = [json.loads(x) for x in buffer.splitlines() if x.strip()]
        assert lines[0]["result"] == {"subscribed": True}
        events = [x["params"] for x in lines[1:]]
        assert any(
            e["type"] == "peer.added" and e["public_key"] == b.identity.public_key.hex()
            for e in events
        )
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_second_daemon_on_same_state_dir_is_refused(tmp_path):
    async with trio.open_nursery() as nursery:
        await start(nursery, tmp_path)
        other = Node(
            Identity.generate(),
            NodeOptions(
                state_dir=tmp_path, listen=[("127.0.0.1", free_udp_port())], handle_signals=False
            ),
        )
        try:
            await other.run()
        except OSError as exc:
            assert "already running" in str(exc)
        else:
            raise AssertionError("second daemon started")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(socket_path(tmp_path)))  # the first one still serves
        nursery.cancel_scope.cancel()


@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
async def test_any_line_gets_an_answer_or_nothing_never_an_exception(line):
    server = ControlServer(Path("/nonexistent"), EventBus())

    @server.method("echo")
    async def _echo(params):
        return params

    reply, subscribe = await server._handle(line)
    assert reply is None or reply.get("jsonrpc") == "2.0"
    assert isinstance(subscribe, bool)
