"""Lookup success, hops, latency and cost of the real DhtCore against network size and churn.

For each size the network is built once (nodes join 50 per virtual second, then settle); each churn
level then runs in a forked copy: churn for `--warmup` virtual seconds so routing tables carry the
steady-state share of dead contacts, then `--lookups` record lookups spread over `--window`.

    python -m simulations.dht_scale --json                      # 1k, churn 0/10/30 %/h
    python -m simulations.dht_scale --sizes 10000 --churn 0.3 --build oracle --json  # ~11 min
    python -m simulations.dht_scale --sizes 100000 --churn 0 --build oracle --warmup 0  # ~45 min
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from overlay.dht.core import DhtConfig
from simulations import dhtrun, whatif
from simulations.netsim import NetConfig, Network

# 1k keeps the default run within a few minutes (10k: README, with `--build oracle`).
DEFAULT_SIZES = (1000,)
DEFAULT_CHURN = (0.0, 0.1, 0.3)
# Ten virtual minutes of churn: enough for dead contacts to build up in routing tables
# (pings of silent contacts run every 15 min, lookups find most of them sooner) and short
# enough to finish before the first republish at 20 min, so records get no help from it.
WARMUP = 600.0
WINDOW = 300.0


def run_size(
    size: int,
    churn: list[float],
    lookups: int,
    warmup: float,
    window: float,
    seed: int,
    paths: int,
    fast_crypto: bool = True,
    build: str = "protocol",
) -> dict[str, Any]:
    started = time.process_time()
    net = Network(NetConfig(seed=seed, fast_crypto=fast_crypto), DhtConfig(paths=paths))
    (dhtrun.build_oracle if build == "oracle" else dhtrun.build)(net, size)
    build_cpu = time.process_time() - started
    print(f"size {size}: built in {build_cpu:.0f} s CPU, {net.datagrams} datagrams", flush=True)

    def job(rate: float) -> dict[str, Any]:
        net.config.churn_per_hour = rate
        if rate > 0:
            for node in list(net.alive):
                net.at(net.now + net.rng.expovariate(rate / 3600.0), lambda n=node: net._depart(n))
        net.run_for(warmup)
        work = dhtrun.run_lookups(net, lookups, window)
        row = dhtrun.summarise(net, work)
        row.update(size=size, churn_per_hour=rate, build_cpu_seconds=round(build_cpu, 1))
        row.update(fast_crypto=fast_crypto, paths=paths, build=build)
        return row

    rows = dhtrun.fork_map([(f"{size}@{r}", lambda r=r: job(r)) for r in churn])
    return rows


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    churns = sorted({r["churn_per_hour"] for r in rows})
    for rate in churns:
        sel = sorted((r for r in rows if r["churn_per_hour"] == rate), key=lambda r: r["size"])
        xs = [r["size"] for r in sel]
        label = f"churn {rate:.0%}/h"
        axes[0].plot(xs, [100 * r["success"] for r in sel], "o-", label=label)
        axes[1].plot(xs, [r["hops_median"] for r in sel], "o-", label=label)
        axes[2].plot(xs, [r["latency_median_s"] for r in sel], "o-", label=label)
        axes[3].plot(xs, [r["bytes_per_lookup_median"] / 1000 for r in sel], "o-", label=label)
    sizes = sorted({r["size"] for r in rows})
    axes[1].plot(sizes, [math.log2(s) / 2 for s in sizes], "k--", label="log2(N)/2 target")
    for ax, title in zip(
        axes,
        ("lookup success %", "median hops", "median latency (s)", "median kB per lookup"),
        strict=True,
    ):
        ax.set_xscale("log")
        ax.set_xlabel("nodes")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    ap.add_argument(
        "--churn",
        type=float,
        nargs="+",
        default=list(DEFAULT_CHURN),
        help="fraction of nodes replaced per hour",
    )
    ap.add_argument("--lookups", type=int, default=500)
    ap.add_argument("--warmup", type=float, default=WARMUP)
    ap.add_argument("--window", type=float, default=WINDOW)
    ap.add_argument("--paths", type=int, default=DhtConfig().paths)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--build",
        choices=("protocol", "oracle"),
        default="protocol",
        help="protocol: every node joins through the DHT (~45 CPU-min at 10k); oracle: start from "
        "converged routing tables, publish records through the DHT (minutes at 10k)",
    )
    ap.add_argument(
        "--real-crypto",
        action="store_true",
        help="real Ed25519 instead of the MAC stand-in (slow; to check the stand-in)",
    )
    ap.add_argument(
        "--what-if",
        choices=whatif.PATCHES,
        default=None,
        help="try a proposed core fix (simulations/whatif.py); off by default",
    )
    ap.add_argument("--json", action="store_true", help="write results/dht_scale.json and .png")
    ap.add_argument("--name", default="dht_scale")
    args = ap.parse_args(argv)
    if args.what_if:
        whatif.install(args.what_if)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        rows.extend(
            run_size(
                size,
                args.churn,
                args.lookups,
                args.warmup,
                args.window,
                args.seed,
                args.paths,
                not args.real_crypto,
                args.build,
            ).values()
        )
    payload = {"scenario": "dht_scale", "what_if": args.what_if, "args": vars(args), "rows": rows}
    if args.json:
        path = dhtrun.write_json(args.name, payload)
        plot([r for r in rows if "error" not in r], str(path.with_suffix(".png")))
        print(f"wrote {path}")
    else:
        print(json.dumps(rows, indent=1))
    return payload


if __name__ == "__main__":
    main()
