"""Session and relay throughput on loopback, each against a "limit loop" measured in the same run.

* Session: one-way 1200-byte datagrams from one daemon to another through an established session
  (seal, daemon socket, demux by index, open, hand to the app), against two plain processes doing
  only sendto + crypto_secretbox / recvfrom + crypto_secretbox_open.
* Relay: datagrams forwarded by a `--relay` daemon's relay server between two joined members,
  against a plain recvfrom/sendto forwarding loop. Senders blast; a sink drains and counts.
Each side runs in its own process (2 cores: sender and receiver, or sender/forwarder/sink).

A 2-core machine shared with other jobs makes any single 3 s run swing by ±30 %, so each pair is
measured ROUNDS times, alternating (limit, ours, limit, ours, ...), and the ratio is taken of the
medians; every round's own ratio is reported too.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import nacl.bindings as sodium

PAYLOAD = 1200
DURATION = 3.0
BURST = 64
ROUNDS = 5


# --- limit loops --------------------------------------------------------------------------------


def _plain_receiver(port_q: Any, result_q: Any, key: bytes, duration: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    port_q.put(sock.getsockname()[1])
    sock.settimeout(1.0)
    count, first, last = 0, None, None
    while True:
        try:
            data = sock.recv(2048)
        except TimeoutError:
            break
        sodium.crypto_secretbox_open(data[24:], data[:24], key)
        count += 1
        last = time.perf_counter()
        if first is None:
            first = last
    result_q.put((count, (last or 0) - (first or 0)))


def _plain_sender(port: int, key: bytes, duration: float) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    payload = os.urandom(PAYLOAD)
    end = time.perf_counter() + duration
    n = 0
    while time.perf_counter() < end:
        for _ in range(BURST):
            nonce = struct.pack("!Q", n).rjust(24, b"\0")
            box = sodium.crypto_secretbox_easy(payload, nonce, key)  # the session's binding too
            sock.sendto(nonce + box, ("127.0.0.1", port))
            n += 1
    return n


def limit_loop(duration: float = DURATION) -> dict[str, float]:
    key = os.urandom(32)
    port_q, result_q = mp.Queue(), mp.Queue()
    rx = mp.Process(target=_plain_receiver, args=(port_q, result_q, key, duration))
    rx.start()
    sent = _plain_sender(port_q.get(), key, duration)
    count, span = result_q.get()
    rx.join()
    return {"sent": sent, "received": count, "pkt_per_s": count / span if span else 0.0}


# --- sessions between daemons ----------------------------------------------------------------


def _daemon(state: str, port: int, bootstrap: int | None, role: str, q: Any, extra: dict) -> None:
    import trio

    from overlay.identity import Identity
    from overlay.node import Node, NodeOptions

    async def main() -> None:
        options = NodeOptions(
            state_dir=Path(state),
            listen=[("127.0.0.1", port)],
            bootstrap=[("127.0.0.1", bootstrap)] if bootstrap else [],
            handle_signals=False,
            ice=False,
            relay=role == "relay",
            direct=extra.get("direct", True),
        )
        node = Node(Identity.generate(), options)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            if node.sessions.relay is not None:
                # Measure capacity, not the policy limits per pair and in total.
                relay = node.sessions.relay
                relay.pair_packets_per_second = 1e9
                relay.pair_bytes_per_second = 1e12
                relay.limit_total_mbit(1e6)
            q.put(("up", role, node.identity.public_key))
            if role == "receiver":
                counts: list[float] = []

                def on_incoming(peer: Any) -> None:
                    nursery.start_soon(_count, peer, counts, q)

                node.sessions.incoming = on_incoming
            elif role == "sender":
                target = extra["target"]()
                await trio.sleep(1.5)
                peer = await node.sessions.connect(target)
                await trio.sleep(0.5)
                # The largest app datagram that seals under 1232 B (1200 B is the limit loop's).
                payload = os.urandom(PAYLOAD - 50)
                end = trio.current_time() + extra["duration"]
                sent = 0
                while trio.current_time() < end:
                    for _ in range(BURST):
                        peer.send(payload)
                    sent += BURST
                    await trio.sleep(0)
                q.put(("sent", sent, peer.path_kind))
                await trio.sleep(3)
                nursery.cancel_scope.cancel()
            await trio.sleep_forever()

    trio.run(main)


async def _count(peer: Any, counts: list[float], q: Any) -> None:
    import time as _time

    import trio

    n, first, last = 0, None, None
    while True:
        with trio.move_on_after(1.5) as scope:
            batch = await peer.receive_batch()
        if scope.cancelled_caught:
            if n > 100:
                q.put(("received", n, (last or 0) - (first or 0)))
                return
            continue
        n += len(batch)
        last = _time.perf_counter()
        if first is None:
            first = last


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_throughput(duration: float = DURATION) -> dict[str, Any]:
    q: Any = mp.Queue()
    with tempfile.TemporaryDirectory(prefix="3bc-bench-") as root:
        rport, sport = _free_port(), _free_port()
        keys: dict[str, bytes] = {}
        target_q: Any = mp.Queue()
        receiver = mp.Process(
            target=_daemon, args=(f"{root}/r", rport, None, "receiver", q, {}), daemon=True
        )
        receiver.start()
        msg = q.get(timeout=30)
        keys[msg[1]] = msg[2]
        target_q.put(keys["receiver"])
        sender = mp.Process(
            target=_daemon,
            args=(
                f"{root}/s",
                sport,
                rport,
                "sender",
                q,
                {"target": target_q.get, "duration": duration},
            ),
            daemon=True,
        )
        sender.start()
        results: dict[str, Any] = {}
        while "received" not in results or "sent" not in results:
            msg = q.get(timeout=60)
            results[msg[0]] = msg[1:]
        for p in (sender, receiver):
            p.kill()
    received, span = results["received"]
    return {
        "sent": results["sent"][0],
        "received": received,
        "path": results["sent"][1],
        "pkt_per_s": received / span if span else 0.0,
    }


# --- relay forwarding ----------------------------------------------------------------------


def _sink(port_q: Any, result_q: Any) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    port_q.put(sock.getsockname()[1])
    _drain_socket(sock, result_q)


def _plain_forwarder(port_q: Any, dest: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    port_q.put(sock.getsockname()[1])
    while True:
        data = sock.recv(2048)
        sock.sendto(data, ("127.0.0.1", dest))


def _blast(sock: socket.socket, addr: tuple[str, int], make: Any, duration: float) -> int:
    end = time.perf_counter() + duration
    n = 0
    while time.perf_counter() < end:
        for _ in range(BURST):
            with contextlib.suppress(BlockingIOError):
                sock.sendto(make(), addr)
            n += 1
    return n


def plain_forwarding(duration: float = DURATION) -> dict[str, float]:
    port_q, result_q = mp.Queue(), mp.Queue()
    sink = mp.Process(target=_sink, args=(port_q, result_q), daemon=True)
    sink.start()
    sink_port = port_q.get()
    fwd = mp.Process(target=_plain_forwarder, args=(port_q, sink_port), daemon=True)
    fwd.start()
    fwd_port = port_q.get()
    payload = os.urandom(PAYLOAD)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = _blast(sock, ("127.0.0.1", fwd_port), lambda: payload, duration)
    count, span = result_q.get()
    fwd.kill()
    return {"sent": sent, "forwarded": count, "pkt_per_s": count / span if span else 0.0}


def relay_forwarding(duration: float = DURATION) -> dict[str, Any]:
    """Two members joined to a real `--relay` daemon; one blasts DATA, the other only drains."""
    from overlay.path.relay import RelayClient

    q: Any = mp.Queue()
    with tempfile.TemporaryDirectory(prefix="3bc-bench-") as root:
        relay_port = _free_port()
        relay = mp.Process(
            target=_daemon, args=(f"{root}/relay", relay_port, None, "relay", q, {}), daemon=True
        )
        relay.start()
        q.get(timeout=30)
        secret = os.urandom(32)
        relay_addr = ("127.0.0.1", relay_port)
        socks = []
        for member in (0, 1):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(2.0)
            client = RelayClient(secret, member, relay_addr)
            sock.sendto(client.start(time.time()), relay_addr)
            while not client.joined:
                data, src = sock.recvfrom(2048)
                client.receive(data, (src[0], src[1]), time.time())
                for out in client.take_outgoing():
                    sock.sendto(out, relay_addr)
            socks.append((sock, client))
        (a_sock, a_client), (b_sock, _b) = socks
        result_q = mp.Queue()
        # The sink is member B's own socket, drained in a child process.
        sink = mp.Process(target=_drain_socket, args=(b_sock, result_q), daemon=True)
        sink.start()
        payload = a_client.wrap(os.urandom(PAYLOAD))
        a_sock.setblocking(False)
        sent = _blast(a_sock, relay_addr, lambda: payload, duration)
        count, span = result_q.get()
        relay.kill()
    return {"sent": sent, "forwarded": count, "pkt_per_s": count / span if span else 0.0}


def _drain_socket(sock: socket.socket, result_q: Any) -> None:
    sock.settimeout(1.5)
    count, first, last = 0, None, None
    while True:
        try:
            sock.recv(2048)
        except TimeoutError:
            if count > 100:
                break
            continue
        count += 1
        last = time.perf_counter()
        if first is None:
            first = last
    result_q.put((count, (last or 0) - (first or 0)))


def _paired(ours: Any, limit: Any, rounds: int) -> dict[str, Any]:
    """Alternate the limit loop and ours `rounds` times; medians, their ratio, per-round ratios."""
    limits, runs = [], []
    for _ in range(rounds):
        limits.append(limit())
        runs.append(ours())
    ratios = [
        run["pkt_per_s"] / base["pkt_per_s"] if base["pkt_per_s"] else 0.0
        for run, base in zip(runs, limits, strict=True)
    ]
    ours_median = statistics.median(run["pkt_per_s"] for run in runs)
    limit_median = statistics.median(base["pkt_per_s"] for base in limits)
    return {
        "runs": runs,
        "limit_runs": limits,
        "round_ratios": [round(x, 3) for x in ratios],
        "pkt_per_s": ours_median,
        "limit_pkt_per_s": limit_median,
        "ratio": round(ours_median / limit_median, 3) if limit_median else 0.0,
    }


def main(rounds: int = ROUNDS) -> dict[str, Any]:
    mp.set_start_method("fork", force=True)
    session = _paired(session_throughput, limit_loop, rounds)
    relayed = _paired(relay_forwarding, plain_forwarding, rounds)
    result = {
        "rounds": rounds,
        "session": session,
        "session_ratio": session["ratio"],
        "relay": relayed,
        "relay_ratio": relayed["ratio"],
        "paths": sorted({r["path"] for r in session["runs"]}),
    }
    print(
        f"session: {session['pkt_per_s']:.0f} pkt/s vs limit loop {session['limit_pkt_per_s']:.0f}"
        f" (medians of {rounds}) -> ratio {session['ratio']} (target >= 0.7); "
        f"per round {session['round_ratios']}"
    )
    print(
        f"relay:   {relayed['pkt_per_s']:.0f} pkt/s vs plain forwarder "
        f"{relayed['limit_pkt_per_s']:.0f} (medians of {rounds}) -> ratio {relayed['ratio']} "
        f"(target >= 0.5); per round {relayed['round_ratios']}"
    )
    return result


if __name__ == "__main__":
    main()
