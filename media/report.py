"""Call quality report: a PNG of bitrate, loss, RTT and frame rate over the call."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a daemon host; must precede pyplot's import

import matplotlib.pyplot as plt

REPORT_FIELDS = ("t", "bitrate_sent", "bitrate_recv", "loss", "rtt_ms", "fps", "frozen")
# 1200x900 at 100 dpi: readable on a laptop screen, ~100 kB.
FIGURE_SIZE_IN = (12.0, 9.0)
FIGURE_DPI = 100
# More points than pixels only slows drawing; a 2 h call at 1 sample/s is 7200.
MAX_SAMPLES = 100_000


class ReportError(ValueError):
    """The stats cannot be turned into a report (missing fields, non-numbers, empty)."""


def _number(sample: Mapping[str, Any], key: str, index: int) -> float:
    value = sample.get(key, 0.0 if key != "t" else None)
    if isinstance(value, bool) and key == "frozen":
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReportError(f"sample {index}: {key} must be a finite number, got {value!r}")
    return float(value)


def _columns(stats: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    if not stats:
        raise ReportError("no stats samples to report")
    if len(stats) > MAX_SAMPLES:
        raise ReportError(f"{len(stats)} samples exceed the report limit of {MAX_SAMPLES}")
    cols: dict[str, list[float]] = {k: [] for k in REPORT_FIELDS}
    for i, sample in enumerate(stats):
        if not isinstance(sample, Mapping):
            raise ReportError(f"sample {i} must be a dict, got {type(sample).__name__}")
        for key in REPORT_FIELDS:
            cols[key].append(_number(sample, key, i))
    t0 = cols["t"][0]
    cols["t"] = [t - t0 for t in cols["t"]]
    return cols


def write_report(
    stats: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str = "Call quality"
) -> None:
    """Write a PNG with four panels: bitrate (kbps), loss (%), RTT (ms), fps with frozen spans.

    ``loss`` is a fraction in [0, 1]; missing fields other than ``t`` count as 0.
    """
    c = _columns(stats)
    t = c["t"]
    fig, axes = plt.subplots(4, 1, figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, sharex=True)
    try:
        fig.suptitle(title)
        ax = axes[0]
        ax.plot(t, [b / 1000 for b in c["bitrate_sent"]], label="sent")
        ax.plot(t, [b / 1000 for b in c["bitrate_recv"]], label="received")
        ax.set_ylabel("bitrate (kbps)")
        ax.legend(loc="upper right")
        axes[1].plot(t, [x * 100 for x in c["loss"]], color="tab:red")
        axes[1].set_ylabel("loss (%)")
        axes[2].plot(t, c["rtt_ms"], color="tab:purple")
        axes[2].set_ylabel("RTT (ms)")
        ax = axes[3]
        ax.plot(t, c["fps"], color="tab:green", label="fps")
        # Shade the spans where the picture was frozen.
        ax.fill_between(
            t,
            0,
            max([*c["fps"], 1.0]),
            where=[f > 0 for f in c["frozen"]],
            color="tab:gray",
            alpha=0.3,
            step="post",
            label="frozen",
        )
        ax.set_ylabel("frames/s")
        ax.set_xlabel("time (s)")
        ax.legend(loc="upper right")
        for a in axes:
            a.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)
