"""`make bench`: every benchmark, results printed and written to bench-out/results.json.

Benchmarks measure; tests never assert timings. Each entry records the command that reproduces
it on its own (`python -m benchmarks.<name>`).
"""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path("bench-out")
SUITES = ["session", "setup_time", "dht", "media", "nat_call"]


def main(argv: list[str] | None = None) -> None:
    mp.set_start_method("fork", force=True)
    names = (argv if argv is not None else sys.argv[1:]) or SUITES
    OUT.mkdir(exist_ok=True)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": mp.cpu_count()},
    }
    for name in names:
        print(f"== {name} (python -m benchmarks.{name})", flush=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            results[name] = {"error": f"not available: {exc}"}
            print(f"   skipped: {exc}")
            continue
        results[name] = module.main()
        results[name + "_seconds"] = round(time.perf_counter() - started, 1)
        (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results written to {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
