"""Who can call whom: direct, through a relay, or not at all, for a population's NAT mix.

Per-pair outcomes are the ones our NAT test bed showed (shared/notes/nat-testbed.md, aioice with
real iptables NATs and coturn): cone<->cone direct, full cone<->restricted direct, full
cone<->symmetric direct, restricted<->symmetric relay, symmetric<->symmetric relay,
anything<->public direct.

Default NAT mix (shares of all hosts; change with --public/--full-cone/--restricted/--symmetric).
NATCracker (Roverso, El-Ansary, Haridi, 2012; figures as quoted in the Macula "NAT types explained"
guide) found endpoint-independent mapping (cone) at ~52 % of NATs and host- or port-dependent
mapping (symmetric in RFC 3489 terms) at ~48 %. Halkes and Pouwelse ("UDP NAT and firewall
puncturing in the wild", TU Delft PDS-2010-007, ~4.5k Tribler peers) found ~64 % of peers behind a
NAT or firewall that allows hole punching. We assume 10 % public hosts (an assumption: no survey
above splits this out for home users), and split the NATed 90 % as 48 % symmetric, and the cone part
into 10 % full cone (endpoint-independent filtering, rare in home routers) and the rest restricted.
The full-cone share is the least certain number here; the scenario sweeps it in the JSON output.

Relays: only public hosts can relay, and only those that volunteer (`--relay-volunteer`, share of
public hosts). Every NATed host keeps mappings open with MAX_RELAY_HINTS random volunteers and lists
them in its record (overlay.dht.record.MAX_RELAYS); a call that needs a relay uses the first of the
callee's hints (then the caller's) with capacity left.

    python -m simulations.connectivity --json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import dataclass
from typing import Any

from overlay.dht.record import MAX_RELAYS
from simulations import dhtrun

PUBLIC, FULL, RESTRICTED, SYMMETRIC = "public", "full_cone", "restricted_cone", "symmetric"
TYPES = (PUBLIC, FULL, RESTRICTED, SYMMETRIC)
DIRECT, RELAY = "direct", "relay"
MAX_RELAY_HINTS = MAX_RELAYS
# Concurrent relayed calls a volunteer carries: a 640x480 VP8 call is ~1 Mbit/s each way, a home
# uplink 10-20 Mbit/s: ten calls leaves room for the volunteer's own use.
RELAY_CAPACITY = 10
# Share of the population in a call at the busy hour (two people per call).
BUSY_HOUR_IN_CALL = 0.10

DEFAULT_SHARES = {PUBLIC: 0.10, FULL: 0.10, RESTRICTED: 0.32, SYMMETRIC: 0.48}


def outcome(a: str, b: str) -> str:
    """The test bed's verdict for one pair of NAT types."""
    if PUBLIC in (a, b) or FULL in (a, b):
        return DIRECT
    if a == RESTRICTED and b == RESTRICTED:
        return DIRECT
    return RELAY  # restricted<->symmetric, symmetric<->symmetric


@dataclass
class Host:
    kind: str
    volunteer: bool = False
    hints: tuple[int, ...] = ()
    load: int = 0


def pair_shares(shares: dict[str, float]) -> dict[str, float]:
    """Exact share of ordered pairs per outcome, from the type shares alone."""
    out = {DIRECT: 0.0, RELAY: 0.0}
    for a, pa in shares.items():
        for b, pb in shares.items():
            out[outcome(a, b)] += pa * pb
    return out


def simulate(
    nodes: int, shares: dict[str, float], volunteer: float, capacity: int, in_call: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    kinds = list(shares)
    weights = [shares[k] for k in kinds]
    hosts = [Host(rng.choices(kinds, weights)[0]) for _ in range(nodes)]
    relays = [i for i, h in enumerate(hosts) if h.kind == PUBLIC and rng.random() < volunteer]
    for h in hosts:
        h.volunteer = False
    for i in relays:
        hosts[i].volunteer = True
    for h in hosts:
        if h.kind != PUBLIC and relays:
            h.hints = tuple(rng.sample(relays, min(MAX_RELAY_HINTS, len(relays))))
    calls = int(nodes * in_call / 2)
    order = list(range(nodes))
    rng.shuffle(order)
    counts = {DIRECT: 0, RELAY: 0, "failed_no_relay": 0, "failed_relays_full": 0}
    for c in range(calls):
        a, b = hosts[order[2 * c]], hosts[order[2 * c + 1]]
        if outcome(a.kind, b.kind) == DIRECT:
            counts[DIRECT] += 1
            continue
        hints = b.hints + a.hints
        if not hints:
            counts["failed_no_relay"] += 1
            continue
        chosen = next((r for r in hints if hosts[r].load < capacity), None)
        if chosen is None:
            counts["failed_relays_full"] += 1
            continue
        hosts[chosen].load += 1
        counts[RELAY] += 1
    loads = [hosts[i].load for i in relays]
    clients = {i: 0 for i in relays}
    for h in hosts:
        for r in h.hints:
            clients[r] += 1
    analytic = pair_shares(shares)
    return {
        "nodes": nodes,
        "shares": shares,
        "relay_volunteer_share_of_public": volunteer,
        "relays": len(relays),
        "busy_hour_calls": calls,
        "pairs_direct": analytic[DIRECT],
        "pairs_need_relay": analytic[RELAY],
        "pairs_unreachable": analytic[RELAY] if not relays else 0.0,
        "calls": {k: v / max(1, calls) for k, v in counts.items()},
        "relay_load_calls_mean": statistics.fmean(loads) if loads else 0.0,
        "relay_load_calls_max": max(loads, default=0),
        "relay_load_at_capacity": sum(1 for x in loads if x >= capacity),
        "relay_hint_clients_mean": statistics.fmean(clients.values()) if clients else 0.0,
        "relay_hint_clients_max": max(clients.values(), default=0),
    }


def plot(rows: list[dict[str, Any]], sweep: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{r['relay_volunteer_share_of_public']:.0%}" for r in rows]
    bottom = [0.0] * len(rows)
    for key, color in (
        (DIRECT, "tab:green"),
        (RELAY, "tab:blue"),
        ("failed_relays_full", "tab:orange"),
        ("failed_no_relay", "tab:red"),
    ):
        vals = [100 * r["calls"][key] for r in rows]
        ax1.bar(labels, vals, bottom=bottom, color=color, label=key)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax1.set_xlabel("public hosts volunteering as relay")
    ax1.set_ylabel("% of busy-hour calls")
    ax1.set_title("how calls connect")
    ax1.legend(fontsize=8)
    xs = [100 * s["shares"][SYMMETRIC] for s in sweep]
    ax2.plot(xs, [100 * s["pairs_need_relay"] for s in sweep], "o-", label="pairs needing a relay")
    ax2.set_xlabel("symmetric NAT share %")
    ax2.set_ylabel("% of pairs")
    ax2.set_title("relay need vs symmetric share (rest split as default)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--public", type=float, default=DEFAULT_SHARES[PUBLIC])
    ap.add_argument("--full-cone", type=float, default=DEFAULT_SHARES[FULL])
    ap.add_argument("--restricted", type=float, default=DEFAULT_SHARES[RESTRICTED])
    ap.add_argument("--symmetric", type=float, default=DEFAULT_SHARES[SYMMETRIC])
    ap.add_argument(
        "--relay-volunteer",
        type=float,
        nargs="+",
        default=[0.0, 0.1, 0.25, 0.5, 1.0],
        help="share of public hosts that volunteer as relays (one run each)",
    )
    ap.add_argument("--relay-capacity", type=int, default=RELAY_CAPACITY)
    ap.add_argument("--in-call", type=float, default=BUSY_HOUR_IN_CALL)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--name", default="connectivity")
    args = ap.parse_args(argv)
    shares = {
        PUBLIC: args.public,
        FULL: args.full_cone,
        RESTRICTED: args.restricted,
        SYMMETRIC: args.symmetric,
    }
    total = sum(shares.values())
    shares = {k: v / total for k, v in shares.items()}
    rows = [
        simulate(args.nodes, shares, v, args.relay_capacity, args.in_call, args.seed)
        for v in args.relay_volunteer
    ]
    sweep = []
    for sym in (0.2, 0.3, 0.4, 0.48, 0.6, 0.7):
        rest = 1 - sym
        base = 1 - shares[SYMMETRIC]
        s = {k: (v * rest / base if k != SYMMETRIC else sym) for k, v in shares.items()}
        sweep.append({"shares": s, **pair_shares(s), "pairs_need_relay": pair_shares(s)[RELAY]})
    for r in rows:
        c = r["calls"]
        print(
            f"volunteers {r['relay_volunteer_share_of_public']:>5.0%} ({r['relays']:>5} relays): "
            f"direct {c[DIRECT]:.1%}  relay {c[RELAY]:.1%}  failed "
            f"{c['failed_no_relay'] + c['failed_relays_full']:.1%}  relay load mean "
            f"{r['relay_load_calls_mean']:.2f} max {r['relay_load_calls_max']} calls"
        )
    payload = {
        "scenario": "connectivity",
        "args": vars(args),
        "rows": rows,
        "symmetric_sweep": sweep,
    }
    if args.json:
        path = dhtrun.write_json(args.name, payload)
        plot(rows, sweep, str(path.with_suffix(".png")))
        print(f"wrote {path}")
    else:
        print(json.dumps(rows, indent=1))
    return payload


if __name__ == "__main__":
    main()
