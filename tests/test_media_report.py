"""Report: a PNG of the call's quality is written and is a sensible image."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.report import FIGURE_DPI, FIGURE_SIZE_IN, ReportError, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stats(n: int = 120) -> list[dict[str, float | bool]]:
    return [
        {
            "t": 1000.0 + i * 0.5,
            "bitrate_sent": 400_000 + 100_000 * math.sin(i / 10),
            "bitrate_recv": 380_000 + 90_000 * math.sin(i / 10),
            "loss": 0.02 if 40 <= i < 60 else 0.0,
            "rtt_ms": 40 + 10 * math.cos(i / 7),
            "fps": 0.0 if 50 <= i < 55 else 30.0,
            "frozen": 50 <= i < 55,
        }
        for i in range(n)
    ]


def test_png_written_with_sensible_size(tmp_path: Path) -> None:
    out = tmp_path / "report.png"
    write_report(_stats(), out, title="test call")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert 10_000 < len(data) < 2_000_000
    image = mpimg.imread(out)
    height, width = image.shape[:2]
    assert (width, height) == (FIGURE_SIZE_IN[0] * FIGURE_DPI, FIGURE_SIZE_IN[1] * FIGURE_DPI)
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_single_sample_and_missing_optional_fields(tmp_path: Path) -> None:
    out = tmp_path / "one.png"
    write_report([{"t": 0.0, "bitrate_sent": 1e5}], out)
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_bad_stats_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no stats"):
        write_report([], tmp_path / "x.png")
    with pytest.raises(ReportError, match="t must be"):
        write_report([{"bitrate_sent": 1}], tmp_path / "x.png")
    with pytest.raises(ReportError, match="finite"):
        write_report([{"t": 0, "rtt_ms": float("nan")}], tmp_path / "x.png")


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["t", "bitrate_sent", "loss", "rtt_ms", "frozen", "junk"]),
            st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3), st.none()),
            max_size=6,
        ),
        max_size=4,
    )
)
def test_arbitrary_stats_give_png_or_typed_error(tmp_path_factory, stats: list) -> None:
    out = tmp_path_factory.mktemp("r") / "r.png"
    try:
        write_report(stats, out)
    except ReportError:
        return
    assert out.read_bytes().startswith(PNG_MAGIC)
