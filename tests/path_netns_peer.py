"""Helper run by tests/test_path_ice_netns.py *inside* a network namespace (`ip netns exec`).

Modes (one JSON object per stdout line; the test process relays lines between two peers):
  reflector HOST PORT        trio UDP server answering STUN with overlay.path.stun_reflector
  probe HOST PORT            send a bare and a padded Binding request, report what came back
  ice ROLE [--stun H:P] [--aioice] [--bench SECONDS]
                             IceAgent: print local info, read the peer's, connect, ping-pong,
                             optionally measure packets/s (sender = controlling side)
Never run outside a namespace you created: aioice gathers every non-loopback interface address.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import trio

from overlay.path import stun_reflector
from overlay.path.ice import IceAgent, RemoteIceInfo

PING_COUNT = 5
CONNECT_TIMEOUT = 10.0
PAYLOAD = b"\xe4" + bytes(1199)  # a 1200-byte "session packet"
BATCH = 64
END = b"\xe4END"


def emit(obj: dict[str, object]) -> None:
    print(json.dumps(obj), flush=True)


async def read_line() -> dict[str, object]:
    line = await trio.to_thread.run_sync(sys.stdin.readline)
    result: dict[str, object] = json.loads(line)
    return result


async def reflector(host: str, port: int) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((host, port))
    emit({"ready": True})
    while True:
        data, addr = await sock.recvfrom(2048)
        if stun_reflector.is_stun(data):
            reply = stun_reflector.answer(data, addr)
            if reply is not None:
                await sock.sendto(reply, addr)


async def probe(host: str, port: int) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("0.0.0.0", 0))
    result: dict[str, object] = {}
    for name, request in (
        (
            "bare",
            stun_reflector.stun.Message(
                message_method=stun_reflector.stun.Method.BINDING,
                message_class=stun_reflector.stun.Class.REQUEST,
            ),
        ),
        ("padded", stun_reflector.padded_binding_request()),
    ):
        data = bytes(request)
        answer = None
        for _ in range(3):  # retransmit: one lost datagram must not read as "no answer"
            await sock.sendto(data, (host, port))
            with trio.move_on_after(0.3):
                reply, _ = await sock.recvfrom(2048)
                answer = stun_reflector.parse(reply).attributes["XOR-MAPPED-ADDRESS"]
                break
        result[name] = answer
        result[name + "_size"] = len(data)
    result["local"] = sock.getsockname()
    emit(result)


async def ice(args: argparse.Namespace) -> None:
    controlling = args.role == "controlling"
    stun_server = None
    if args.stun:
        host, port = args.stun.split(":")
        stun_server = (host, int(port))
    async with IceAgent(
        controlling, stun_server=stun_server, keep_aioice_path=args.aioice
    ) as agent:
        local = await agent.gather()
        emit({"local": local.to_dict()})
        remote = RemoteIceInfo.from_dict((await read_line())["remote"])
        started = time.monotonic()
        path = await agent.connect(remote, timeout=CONNECT_TIMEOUT)
        emit(
            {
                "connected": True,
                "seconds": round(time.monotonic() - started, 4),
                "kind": path.kind,
                "local_addr": list(path.local_addr),
                "remote_addr": list(path.remote_addr),
                "native": type(path.socket).__name__ == "NativePathSocket",
            }
        )
        sock = path.socket
        # Ping-pong, with retransmission (a lost ping must not read as a failure).
        if controlling:
            pongs = 0
            for i in range(PING_COUNT):
                await sock.keepalive()  # must be swallowed by the other side
                for _ in range(10):
                    await sock.send(b"\xe4PING%d" % i)
                    with trio.move_on_after(0.5):
                        while (await sock.recv()) != b"\xe4PONG%d" % i:
                            pass
                        pongs += 1
                        break
            emit({"pongs": pongs})
        else:
            answered = 0
            with trio.move_on_after(CONNECT_TIMEOUT):
                while answered < PING_COUNT:
                    data = await sock.recv()
                    if data.startswith(b"\xe4PING"):
                        await sock.send(b"\xe4PONG" + data[5:])
                        if data == b"\xe4PING%d" % answered:
                            answered += 1
                    else:
                        emit({"unexpected": data.hex()})
            emit({"pings": answered})
            # Keep answering retransmitted pings until the sender is done.
            with trio.move_on_after(0.6):
                while True:
                    data = await sock.recv()
                    if data.startswith(b"\xe4PING"):
                        await sock.send(b"\xe4PONG" + data[5:])
        if args.bench:
            await bench(sock, controlling, args.bench)
        # Wait for the peer to finish before closing our side.
        emit({"done": True})
        await read_line()


async def bench(sock: object, sender: bool, seconds: float) -> None:
    native = type(sock).__name__ == "NativePathSocket"
    if sender:
        await trio.sleep(1.0)  # let the receiver finish the ping phase first
        sent = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if native:
                await sock.send_batch([PAYLOAD] * BATCH)  # type: ignore[attr-defined]
                sent += BATCH
            else:
                await sock.send(PAYLOAD)  # type: ignore[attr-defined]
                sent += 1
        elapsed = time.monotonic() - start
        for _ in range(20):
            await sock.send(END)  # type: ignore[attr-defined]
            await trio.sleep(0.01)
        emit({"bench_sent": sent, "send_pps": round(sent / elapsed)})
    else:
        received = 0
        first = last = 0.0
        with trio.move_on_after(seconds + 5):
            while True:
                batch = [d for d, _ in await sock.recv_batch_from(BATCH)]
                if END in batch:
                    break
                if not received:
                    first = time.monotonic()
                received += len(batch)
                last = time.monotonic()
        pps = round(received / (last - first)) if last > first else 0
        emit({"bench_received": received, "recv_pps": pps})


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("reflector", "probe"):
        p = sub.add_parser(mode)
        p.add_argument("host")
        p.add_argument("port", type=int)
    p = sub.add_parser("ice")
    p.add_argument("role", choices=["controlling", "controlled"])
    p.add_argument("--stun")
    p.add_argument("--aioice", action="store_true")
    p.add_argument("--bench", type=float, default=0.0)
    args = parser.parse_args()
    if args.mode == "reflector":
        trio.run(reflector, args.host, args.port)
    elif args.mode == "probe":
        trio.run(probe, args.host, args.port)
    else:
        trio.run(ice, args)


if __name__ == "__main__":
    main()
