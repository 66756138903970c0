"""A one-minute call across the NAT bed with 50 ms of delay and ~10 % loss end to end.

Full cone <-> restricted cone (a direct, punched path), each side's link delayed 25 ms with 5 %
random loss, 640x480 at 30 fps VP8 + Opus. Reports frozen video seconds per minute and what
NACK and Opus concealment recovered. Needs root (the NAT bed); says so where it cannot run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECONDS = 60.0


def main(seconds: float = SECONDS) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.nat.conftest import missing_capability

    reason = missing_capability()
    if reason is not None:
        print(f"NAT call benchmark did not run: {reason}")
        return {"skipped": reason}
    from tests.nat.daemons import cone_call_pair
    from tests.nat.netbed import NetBed

    with NetBed() as bed, tempfile.TemporaryDirectory(prefix="3bc-natcall-") as tmp:
        _relay, a, b = cone_call_pair(bed, Path(tmp))
        time.sleep(2)
        bed.impair(a.host, delay_ms=25, loss=0.05)
        bed.impair(b.host, delay_ms=25, loss=0.05)
        import subprocess

        argv = [
            sys.executable,
            "-m",
            "cli.main",
            "--state-dir",
            str(a.state),
            "call",
            b.public_key,
            "--duration",
            str(seconds),
            "--json",
        ]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=root, timeout=seconds + 120)
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        call = json.loads(done.stdout)["call"]
    stats = call["stats"]
    counters = stats["counters"]
    minutes = call["duration_s"] / 60
    result = {
        "path": call["path"],
        "duration_s": call["duration_s"],
        "loss_measured": stats["call_loss"],
        "frozen_s": stats["frozen"],
        "frozen_s_per_minute": round(stats["frozen"] / minutes, 2),
        "freezes": stats["freezes"],
        "fps_rendered_avg": round(stats["frames_rendered"] / call["duration_s"], 1),
        "nack_recovered_per_minute": round(counters["nack_recovered"] / minutes),
        "audio_plc_per_minute": round(counters["plc_concealed"] / minutes),
        "send_rung": stats.get("quality_rung"),
        "target_bitrate": stats.get("target_bitrate"),
        "frames_sent_by_far_end_est": counters.get("video_frames_sent"),
        "frames_rendered": stats["frames_rendered"],
        "nack_recovered": counters["nack_recovered"],
        "nacks_sent": counters["nacks_sent"],
        "plis_sent": counters["plis_sent"],
        "audio_plc_concealed": counters["plc_concealed"],
        "audio_fec_recovered": counters["fec_recovered"],
        "rtt_ms": stats["rtt_ms"],
        "latency_ms": stats.get("latency_ms"),
    }
    print(
        f"call across the NAT bed, 50 ms + ~10 % loss: {result['frozen_s_per_minute']} s frozen "
        f"per minute, NACK recovered {result['nack_recovered']} packets, Opus PLC concealed "
        f"{result['audio_plc_concealed']} frames (path {result['path']})"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else SECONDS)
