"""`3bc` call and contact commands: thin clients of the daemon's call.* and contacts.* methods.

Attach with ``register(cli)`` from cli/main.py (the helpers of cli.main are imported lazily, so
either module may import the other first).
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from overlay.control import socket_path

# The live stats line and `stats --watch` refresh once a second (the daemon samples that often).
REFRESH_S = 1.0
# After Ctrl-C (hangup), wait this long for the daemon's "ended" event before giving up.
HANGUP_WAIT_S = 5.0
# The end-of-call report (a matplotlib PNG) takes a second or two to draw; wait at most this long.
REPORT_WAIT_S = 15.0
# Source specs passed through as they are; anything else is a file path made absolute here,
# because the daemon's working directory is not ours.
_LITERAL_SOURCES = ("testpattern", "tone", "none")
_DEVICE_PREFIXES = ("/dev/", "alsa:", "pulse:")
_ENDS_OK = ("hung up", "remote hung up")


def _main() -> Any:
    from cli import main

    return main


def _source(spec: str) -> str:
    if spec in _LITERAL_SOURCES or spec.startswith(_DEVICE_PREFIXES):
        return spec
    return os.path.abspath(spec)


class _Events:
    """A subscription to the daemon's event stream, read with a timeout."""

    def __init__(self, ctx: click.Context) -> None:
        m = _main()
        path = socket_path(m.state_dir(ctx))
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            m.fail(
                f"no daemon is running for state dir {path.parent} (start one with `3bc daemon`)"
            )
        self._buffer = b""
        request = {"jsonrpc": "2.0", "id": 1, "method": "events.subscribe"}
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        self._line(timeout=10.0)  # the subscription's acknowledgement

    def _line(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                return None
            chunk = self._sock.recv(65536)
            if not chunk:
                _main().fail("the daemon closed the event stream")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self, timeout: float) -> Iterator[dict[str, Any]]:
        """Events that arrive within `timeout` seconds."""
        message = self._line(timeout)
        while message is not None:
            if message.get("method") == "event":
                yield message["params"]
            message = self._line(0)

    def close(self) -> None:
        self._sock.close()


def _resolve_key(ctx: click.Context, key: str) -> str:
    """A 64-hex key as typed, or the key of the contact with that name."""
    cleaned = key.strip().lower()
    if len(cleaned) == 64 and all(c in "0123456789abcdef" for c in cleaned):
        return cleaned
    matches = [
        c for c in _main().rpc(ctx, "contacts.list") if c["name"].casefold() == key.casefold()
    ]
    if len(matches) != 1:
        _main().fail(f"{key!r} is neither a 64-hex public key nor exactly one contact's name")
    return matches[0]["public_key"]


def _who(info: dict[str, Any]) -> str:
    name = info.get("peer_name")
    short = info["peer"][:16]
    return f"{name} ({short}…)" if name else f"{short}…"


def _stats_line(info: dict[str, Any]) -> str:
    s = info.get("stats") or {}
    c = s.get("counters", {})
    lat = (s.get("latency_ms") or {}).get("median")
    return (
        f"{info['state']:<10} {info['duration_s']:>6.0f} s  {s.get('path', info['path'])}  "
        f"rtt {s.get('rtt_ms', 0):.0f} ms  loss {100 * s.get('loss', 0):.1f} %  "
        f"sent {s.get('bitrate_sent', 0) / 1000:.0f} kb/s  "
        f"recv {s.get('bitrate_recv', 0) / 1000:.0f}"
        f" kb/s  {s.get('fps', 0):.0f} fps  {s.get('recv_size', '-')}  frozen "
        f"{s.get('frozen', 0):.1f} s  nack-rec {c.get('nack_recovered', 0)}  "
        f"plc {c.get('plc_concealed', 0)}" + (f"  latency {lat:.0f} ms" if lat is not None else "")
    )


def _final_lines(info: dict[str, Any]) -> list[str]:
    s = info.get("stats") or {}
    c = s.get("counters", {})
    lines = [
        f"call {info['call_id']} with {_who(info)}: {info['end_reason'] or info['state']}"
        + (f" ({info['end_detail']})" if info.get("end_detail") else ""),
        f"  duration {info['duration_s']} s   codec {info.get('codec')} {info.get('size')}"
        f"   path {info['path']}",
    ]
    if s:
        lines += [
            f"  video frames received {s.get('frames_rendered', 0)}   frozen {s.get('frozen', 0)} s"
            f" in {s.get('freezes', 0)} freezes   audio {s.get('audio_received_s', 0)} s",
            f"  NACK recovered {c.get('nack_recovered', 0)}   PLC concealed "
            f"{c.get('plc_concealed', 0)}   FEC recovered {c.get('fec_recovered', 0)} "
            "(FFmpeg's Opus decoder has no FEC)   PLIs sent {0}".format(c.get("plis_sent", 0)),
        ]
        lat = s.get("latency_ms") or {}
        if lat.get("median") is not None:
            lines.append(
                f"  capture→display latency median {lat['median']} ms, p95 {lat['p95']} ms"
            )
    if info.get("record_file"):
        lines.append(f"  recording {info['record_file']}")
    if info.get("report_file"):
        lines.append(f"  report    {info['report_file']}")
    return lines


def _describe(event: dict[str, Any]) -> str | None:
    kind = event.get("type")
    who = event.get("peer_name") or event.get("peer", "")[:16]
    if kind == "call.ringing":
        return f"ringing {who}…"
    if kind == "call.answered":
        return f"answered by {who} ({event.get('codec')} {event.get('size')})"
    if kind == "call.recording":
        state = "is recording this call" if event.get("recording") else "stopped recording"
        return f"NOTICE: {who} {state}"
    if kind == "call.path":
        return f"path changed to {event.get('path')}"
    if kind == "call.ended":
        detail = f" ({event['detail']})" if event.get("detail") else ""
        return f"call ended: {event.get('reason')}{detail}"
    return None


def register(group: click.Group) -> None:
    """Add the call and contact commands to the `3bc` group."""
    m = _main()

    @group.command("call")
    @m.state_dir_option
    @click.argument("key")
    @click.option(
        "--video",
        default="testpattern",
        show_default=True,
        help="testpattern | FILE | /dev/videoN | none",
    )
    @click.option(
        "--audio",
        default="tone",
        show_default=True,
        help="tone | FILE | alsa:DEV | pulse:DEV | none",
    )
    @click.option(
        "--codec", type=click.Choice(["vp8", "h264", "av1"]), default="vp8", show_default=True
    )
    @click.option("--size", default="640x480", show_default=True, help="WIDTHxHEIGHT to send.")
    @click.option("--fps", default=30, show_default=True, type=click.IntRange(1, 120))
    @click.option(
        "--record",
        type=click.Path(dir_okay=False),
        help="Record both sides to FILE (.webm/.mkv); the far end is told.",
    )
    @click.option(
        "--duration", type=click.FloatRange(min=0, min_open=True), help="Hang up after S seconds."
    )
    @m.json_option
    @click.pass_context
    def call_command(
        ctx: click.Context,
        key: str,
        video: str,
        audio: str,
        codec: str,
        size: str,
        fps: int,
        record: str | None,
        duration: float | None,
        as_json: bool,
    ) -> None:
        """Call KEY (a public key or a contact's name); Ctrl-C hangs up."""
        try:
            width, height = (int(x) for x in size.lower().split("x"))
        except ValueError:
            m.fail(f"--size must look like 640x480, got {size!r}")
            return
        public_key = _resolve_key(ctx, key)
        params: dict[str, Any] = {
            "public_key": public_key,
            "video": _source(video),
            "audio": _source(audio),
            "codec": codec,
            "width": width,
            "height": height,
            "fps": fps,
        }
        if record:
            params["record"] = os.path.abspath(record)
        if duration:
            params["duration"] = duration
        events = _Events(ctx)
        info = m.rpc(ctx, "call.place", 60.0, **params)
        cid = info["call_id"]
        say = (lambda text: None) if as_json else (lambda text: click.echo(text))
        say(f"calling {_who(info)} (call {cid})" + (f", recording to {record}" if record else ""))
        log: list[dict[str, Any]] = []
        live = sys.stdout.isatty() and not as_json
        ended = False
        try:
            while not ended:
                for event in events.poll(REFRESH_S):
                    if event.get("call_id") != cid:
                        continue
                    log.append(event)
                    text = _describe(event)
                    if text:
                        if live:
                            click.echo("\r\033[K", nl=False)
                        say(text)
                    ended = ended or event.get("type") == "call.ended"
                if not ended and live:
                    line = _stats_line(m.rpc(ctx, "call.stats", call_id=cid))
                    click.echo("\r\033[K" + line[: os.get_terminal_size().columns - 1], nl=False)
        except KeyboardInterrupt:
            if live:
                click.echo()
            m.rpc(ctx, "call.hangup", call_id=cid)
            deadline = time.monotonic() + HANGUP_WAIT_S
            while not ended and time.monotonic() < deadline:
                for event in events.poll(0.2):
                    if event.get("call_id") == cid and event.get("type") == "call.ended":
                        ended = True
        if live:
            click.echo("\r\033[K", nl=False)
        # The report is drawn just after the end: wait (bounded) for its event.
        if record and ended:
            deadline = time.monotonic() + REPORT_WAIT_S
            while time.monotonic() < deadline and not any(
                e.get("type") == "call.report" for e in log
            ):
                log.extend(e for e in events.poll(0.2) if e.get("call_id") == cid)
        events.close()
        final = m.rpc(ctx, "call.stats", call_id=cid)
        if as_json:
            m.emit_json({"call": final, "events": log})
        else:
            for line in _final_lines(final):
                click.echo(line)
        if final.get("answered") is False or final.get("end_reason") not in _ENDS_OK:
            sys.exit(1)

    @group.command("answer")
    @m.state_dir_option
    @click.argument("call_id", required=False)
    @click.option(
        "--record",
        type=click.Path(dir_okay=False),
        help="Record the call to FILE (the caller is told).",
    )
    @m.json_option
    @click.pass_context
    def answer_command(
        ctx: click.Context, call_id: str | None, record: str | None, as_json: bool
    ) -> None:
        """Answer the ringing call (or CALL_ID)."""
        params: dict[str, Any] = {"call_id": call_id} if call_id else {}
        if record:
            params["record"] = os.path.abspath(record)
        info = m.rpc(ctx, "call.answer", **params)
        if as_json:
            m.emit_json(info)
        else:
            click.echo(f"answered call {info['call_id']} from {_who(info)}")
            if info.get("remote_recording"):
                click.echo("NOTICE: the caller is recording this call")

    @group.command("reject")
    @m.state_dir_option
    @click.argument("call_id", required=False)
    @click.pass_context
    def reject_command(ctx: click.Context, call_id: str | None) -> None:
        """Decline the ringing call (or CALL_ID)."""
        info = m.rpc(ctx, "call.reject", **({"call_id": call_id} if call_id else {}))
        click.echo(f"declined call {info['call_id']} from {_who(info)}")

    @group.command("hangup")
    @m.state_dir_option
    @click.argument("call_id", required=False)
    @click.pass_context
    def hangup_command(ctx: click.Context, call_id: str | None) -> None:
        """Hang up the current call (or CALL_ID)."""
        info = m.rpc(ctx, "call.hangup", **({"call_id": call_id} if call_id else {}))
        click.echo(f"hung up call {info['call_id']} with {_who(info)}")

    @group.command("calls")
    @m.state_dir_option
    @m.json_option
    @click.pass_context
    def calls_command(ctx: click.Context, as_json: bool) -> None:
        """Current and recent calls."""
        result = m.rpc(ctx, "call.list")
        if as_json:
            m.emit_json(result)
            return
        if not result:
            click.echo("no calls")
            return
        m._print_table(
            [
                [
                    c["call_id"][:12],
                    c["direction"],
                    _who(c),
                    c["state"],
                    f"{c['duration_s']} s",
                    ("rec" if c["recording"] else "")
                    + (" REMOTE-REC" if c["remote_recording"] else ""),
                    c["end_reason"] or "",
                ]
                for c in result
            ],
            ["call", "dir", "peer", "state", "duration", "recording", "ended"],
        )

    @group.command("stats")
    @m.state_dir_option
    @click.argument("call_id", required=False)
    @click.option("--watch", is_flag=True, help="Refresh every second until the call ends.")
    @m.json_option
    @click.pass_context
    def stats_command(ctx: click.Context, call_id: str | None, watch: bool, as_json: bool) -> None:
        """Statistics of the current call (or CALL_ID)."""
        params = {"call_id": call_id} if call_id else {}
        if as_json:
            m.emit_json(m.rpc(ctx, "call.stats", **params))
            return
        if not watch:
            from rich.console import Console

            Console().print(_stats_table(m.rpc(ctx, "call.stats", **params)))
            return
        from rich.live import Live

        info = m.rpc(ctx, "call.stats", **params)
        params = {"call_id": info["call_id"]}
        try:
            with Live(_stats_table(info), refresh_per_second=2) as live:
                while info["state"] != "ended":
                    time.sleep(REFRESH_S)
                    info = m.rpc(ctx, "call.stats", **params)
                    live.update(_stats_table(info))
        except KeyboardInterrupt:
            pass

    @group.command("auto-answer")
    @m.state_dir_option
    @click.argument("policy", required=False, type=click.Choice(["none", "contacts", "all"]))
    @click.pass_context
    def auto_answer_command(ctx: click.Context, policy: str | None) -> None:
        """Show or set who is answered automatically (unknown keys ring only with `all`)."""
        result = m.rpc(ctx, "call.policy", **({"auto_answer": policy} if policy else {}))
        click.echo(f"auto-answer: {result['auto_answer']}")

    @group.group("contacts")
    def contacts_group() -> None:
        """The people allowed to ring you."""

    @contacts_group.command("add")
    @m.state_dir_option
    @click.argument("key")
    @click.argument("name")
    @click.pass_context
    def contacts_add(ctx: click.Context, key: str, name: str) -> None:
        """Add KEY as NAME (renames a known key)."""
        result = m.rpc(ctx, "contacts.add", public_key=key, name=name)
        verb = "added" if result["created"] else "renamed"
        click.echo(f"{verb} {result['name']} ({result['public_key']})")

    @contacts_group.command("list")
    @m.state_dir_option
    @m.json_option
    @click.pass_context
    def contacts_list(ctx: click.Context, as_json: bool) -> None:
        """List contacts."""
        result = m.rpc(ctx, "contacts.list")
        if as_json:
            m.emit_json(result)
        elif not result:
            click.echo("no contacts yet (3bc contacts add KEY NAME)")
        else:
            m._print_table([[c["name"], c["public_key"]] for c in result], ["name", "public key"])

    @contacts_group.command("remove")
    @m.state_dir_option
    @click.argument("key")
    @click.pass_context
    def contacts_remove(ctx: click.Context, key: str) -> None:
        """Remove the contact with KEY (or that name)."""
        result = m.rpc(ctx, "contacts.remove", public_key=_resolve_key(ctx, key))
        click.echo(f"removed {result['name']} ({result['public_key']})")


def _stats_table(info: dict[str, Any]) -> Any:
    from rich.table import Table

    s = info.get("stats") or {}
    c = s.get("counters", {})
    lat = s.get("latency_ms") or {}
    table = Table(
        title=f"call {info['call_id'][:12]} with {_who(info)}",
        box=None,
        show_header=False,
        pad_edge=False,
    )
    rows = [
        (
            "state",
            f"{info['state']}  {info['duration_s']} s"
            + (f"  ({info['end_reason']})" if info.get("end_reason") else ""),
        ),
        ("path", f"{s.get('path', info['path'])}  changes {s.get('path_changes', 0)}"),
        ("codec", f"{info.get('codec')}  send {s.get('send_size')}  recv {s.get('recv_size')}"),
        (
            "rtt / loss / jitter",
            f"{s.get('rtt_ms', 0)} ms / {100 * s.get('loss', 0):.1f} % "
            f"(call {100 * s.get('call_loss', 0):.1f} %) / "
            f"{s.get('jitter_ms', 0)} ms",
        ),
        (
            "bitrate",
            f"sent {s.get('bitrate_sent', 0) / 1000:.0f} kb/s  recv "
            f"{s.get('bitrate_recv', 0) / 1000:.0f} kb/s  target "
            f"{s.get('target_bitrate', 0) / 1000:.0f} kb/s",
        ),
        (
            "video",
            f"{s.get('fps', 0)} fps  {s.get('frames_rendered', 0)} frames  frozen "
            f"{s.get('frozen', 0)} s ({s.get('freezes', 0)}x)",
        ),
        (
            "recovery",
            f"NACK recovered {c.get('nack_recovered', 0)}  PLC concealed "
            f"{c.get('plc_concealed', 0)}  FEC {c.get('fec_recovered', 0)}  "
            f"PLI {c.get('plis_sent', 0)}",
        ),
        (
            "latency",
            "-" if lat.get("median") is None else f"median {lat['median']} ms  p95 {lat['p95']} ms",
        ),
        (
            "recording",
            ("local " if info.get("recording") else "")
            + ("REMOTE" if info.get("remote_recording") else "")
            or "no",
        ),
    ]
    for name, value in rows:
        table.add_row(f"[bold]{name}[/bold]", value)
    return table
