"""Lookup success under Sybil/eclipse attack and record poisoning, paths=1 against disjoint paths.

A share of the population (default 10 % and 25 %) are colluding Sybils (simulations/adversary.py):
they answer pings honestly, so they sit in honest routing tables, and on FIND they either
  eclipse - return only the Sybils closest to the target and never a record,
  drop    - stay silent, or
  poison  - return honest contacts plus a replayed old-sequence record of the target or a forged
            "newer" one (victim's key, attacker's addresses, attacker's signature).
For poisoning, every callee republishes (new sequence) after the Sybils captured its first record.
The network is built once per Sybil share; each (mode, paths) runs in a forked copy.

    python -m simulations.dht_attack --json
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

from overlay.dht.core import DhtConfig, LookupDone
from overlay.identity import Identity
from simulations import adversary, dhtrun
from simulations.netsim import NetConfig, Network, SimNode

DEFAULT_SIZE = 1000
DEFAULT_FRACTIONS = (0.10, 0.25)
PATHS = (1, 3)
# Callees for the poisoning runs: each must republish (a lookup plus k stores), so keep them few.
POISON_TARGETS = 100


def build(size: int, fraction: float, seed: int) -> tuple[Network, adversary.Coalition]:
    net = Network(NetConfig(seed=seed), DhtConfig())
    coalition = adversary.Coalition()

    def sybil(
        ident: Identity, cfg: DhtConfig, rng: random.Random, now: float
    ) -> adversary.SybilCore:
        return adversary.SybilCore(ident, cfg, rng, now, coalition)

    pick = random.Random(seed + 1)
    net.add_node(bootstrap=[])
    for _ in range(size - 1):
        if pick.random() < fraction:
            node = net.add_node(core_factory=sybil, honest=False)
            coalition.members.append((node.core.node_id, node.core.public_key, node.address))
        else:
            net.add_node()
        net.run_for(dhtrun.JOIN_SPACING)
    net.run_for(60.0)
    return net, coalition


def job(
    net: Network, coalition: adversary.Coalition, mode: str, paths: int, lookups: int, window: float
) -> dict[str, Any]:
    coalition.mode = mode
    net.dht_config.paths = paths  # one config object is shared by every core
    targets: list[SimNode] | None = None
    forged_accepted = 0
    stale = 0
    if mode == adversary.POISON:
        targets = net.sample_alive(POISON_TARGETS, honest_only=True)
        for node in targets:
            assert node.core.own_record is not None
            coalition.old_records[node.core.node_id] = node.core.own_record
            node.core.publish(net.now)
            net._flush(node)
            net.run_for(0.05)
        net.run_for(10.0)

    def judge(target: SimNode, ev: LookupDone) -> tuple[bool, bool]:
        nonlocal forged_accepted, stale
        rec = ev.record
        if rec is None:
            return False, False
        own = target.core.own_record
        old = coalition.old_records.get(target.core.node_id)
        genuine = (own is not None and rec.body == own.body) or (
            old is not None and rec.body == old.body
        )
        if not genuine:
            forged_accepted += 1
            return False, False
        current = own is not None and rec.body == own.body
        stale += not current
        return True, current

    work = dhtrun.run_lookups(net, lookups, window, judge, targets=targets)
    row = dhtrun.summarise(net, work)
    row.update(
        mode=mode,
        paths=paths,
        sybil_fraction=sum(not n.honest for n in net.alive) / len(net.alive),
        forged_accepted=forged_accepted,
        stale_returned=stale,
        forged_served=coalition.forged_served,
        replays_served=coalition.replays_served,
        bad_records_dropped=sum(
            n.core.stats.dropped.get("bad-record", 0) for n in net.alive if n.honest
        ),
    )
    return row


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [md for md in adversary.MODES if any(r["mode"] == md for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for paths in PATHS:
            sel = sorted(
                (r for r in rows if r["mode"] == mode and r["paths"] == paths),
                key=lambda r: r["sybil_fraction"],
            )
            ax.plot(
                [100 * r["sybil_fraction"] for r in sel],
                [100 * r["success"] for r in sel],
                "o-",
                label=f"paths={paths} found",
            )
            if mode == adversary.POISON:
                ax.plot(
                    [100 * r["sybil_fraction"] for r in sel],
                    [100 * r["current_record"] for r in sel],
                    "x--",
                    label=f"paths={paths} newest record",
                )
        ax.set_title(f"{mode}: lookup success %")
        ax.set_xlabel("Sybil share of nodes %")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=DEFAULT_SIZE)
    ap.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS))
    ap.add_argument("--modes", nargs="+", default=list(adversary.MODES), choices=adversary.MODES)
    ap.add_argument("--lookups", type=int, default=300)
    ap.add_argument("--window", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--name", default="dht_attack")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for fraction in args.fractions:
        net, coalition = build(args.nodes, fraction, args.seed)
        print(f"built {args.nodes} nodes, {fraction:.0%} Sybil", flush=True)
        jobs = [
            (
                f"{fraction}/{mode}/paths={paths}",
                lambda md=mode, p=paths, n=net, c=coalition: job(
                    n, c, md, p, args.lookups, args.window
                ),
            )
            for mode in args.modes
            for paths in PATHS
        ]
        for name, row in dhtrun.fork_map(jobs).items():
            row["job"] = name
            row["size"] = args.nodes
            rows.append(row)
    payload = {"scenario": "dht_attack", "args": vars(args), "rows": rows}
    if args.json:
        path = dhtrun.write_json(args.name, payload)
        plot([r for r in rows if "error" not in r], str(path.with_suffix(".png")))
        print(f"wrote {path}")
    else:
        print(json.dumps(rows, indent=1))
    return payload


if __name__ == "__main__":
    main()
