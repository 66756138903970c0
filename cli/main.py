"""`3bc`: the command line. Every command but `id` and `daemon` is a thin control-socket client."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import platformdirs

from cli.client import ClientError, call
from overlay import identity as ident
from overlay.endpoint import parse_hostport
from overlay.path.relay import DEFAULT_TOTAL_MBIT

STATE_ENV = "THREEBC_STATE_DIR"


def default_state_dir() -> Path:
    return Path(platformdirs.user_data_dir("3bc", appauthor=False))


def state_dir_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--state-dir is accepted before or after the command name."""

    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            ctx.ensure_object(dict)["state_dir"] = Path(value)
            root = ctx.find_root()
            root.ensure_object(dict)["state_dir"] = Path(value)

    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False),
        envvar=STATE_ENV,
        expose_value=False,
        callback=remember,
        is_eager=True,
        help=f"Where the key, routing table and control socket live (env {STATE_ENV}).",
    )(fn)


def state_dir(ctx: click.Context) -> Path:
    obj = ctx.find_root().obj or {}
    return obj.get("state_dir") or default_state_dir()


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(fn)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def fail(message: str) -> None:
    click.echo(f"3bc: {message}", err=True)
    sys.exit(1)


def rpc(ctx: click.Context, method: str, wait: float = 30.0, **params: Any) -> Any:
    try:
        return call(state_dir(ctx), method, wait, **params)
    except ClientError as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@state_dir_option
@click.pass_context
def cli(ctx: click.Context) -> None:
    """3Bot Connect: private, serverless, peer-to-peer calls.

    Start `3bc daemon`, then drive it with the other commands.
    """
    ctx.ensure_object(dict)


@cli.command("id")
@state_dir_option
@click.option("--import-words", is_flag=True, help="Import a 3Bot identity from its 24 words.")
@click.option("--show-words", is_flag=True, help="Print the 24-word backup phrase of this key.")
@json_option
@click.pass_context
def id_command(ctx: click.Context, import_words: bool, show_words: bool, as_json: bool) -> None:
    """Create (first time) or show this machine's 3Bot identity."""
    directory = state_dir(ctx)
    try:
        if import_words:
            if ident.key_path(directory).exists():
                fail(
                    f"an identity already exists at {ident.key_path(directory)}; "
                    "move it away first to import another"
                )
            phrase = (
                click.prompt("24 words", hide_input=True)
                if sys.stdin.isatty()
                else sys.stdin.read()
            )
            identity = ident.Identity.from_words(phrase)
            ident.save(directory, identity)
            created = True
        else:
            identity, created = ident.load_or_create(directory)
    except (ident.IdentityError, OSError) as exc:
        fail(str(exc))
        return
    info = {
        "public_key": identity.public_key.hex(),
        "node_id": identity.node_id.hex(),
        "safety_words": identity.safety_words(),
        "key_file": str(ident.key_path(directory)),
        "created": created,
    }
    if show_words:
        info["words"] = identity.to_words()
    if as_json:
        emit_json(info)
        return
    if created:
        click.echo(f"Created a new identity in {directory}")
    click.echo(f"public key    {info['public_key']}")
    click.echo(f"safety words  {' '.join(info['safety_words'])}")
    click.echo(f"key file      {info['key_file']}")
    if show_words:
        click.echo(f"backup words  {info['words']}")


@cli.command()
@state_dir_option
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="HOST:PORT",
    help="UDP address to bind (repeatable). Default 0.0.0.0:30956.",
)
@click.option(
    "--bootstrap",
    "bootstrap",
    multiple=True,
    metavar="HOST:PORT",
    help="A known daemon to join through (repeatable).",
)
@click.option("--relay", is_flag=True, help="Also serve as a blind relay for others' sessions.")
@click.option(
    "--relay-mbit",
    type=click.FloatRange(min=0.1),
    default=DEFAULT_TOTAL_MBIT,
    show_default=True,
    metavar="MBIT",
    help="With --relay: most Mbit/s forwarded for all pairs together (each pair gets 8).",
)
@click.option(
    "--ice/--no-ice",
    default=True,
    show_default=True,
    help="Punch through NATs with ICE (aioice). Off for loopback-only use.",
)
@click.option(
    "--direct/--no-direct",
    default=True,
    show_default=True,
    help="Allow direct paths; --no-direct forces relays (hides your address from peers).",
)
@click.option("--stun", metavar="HOST:PORT", help="STUN server (default: a relay daemon).")
@click.option("--turn", metavar="HOST:PORT", help="TURN server (e.g. coturn) for relayed ICE.")
@click.option("--turn-user", metavar="USER", help="TURN username.")
@click.option(
    "--turn-password",
    metavar="PASSWORD",
    envvar="THREEBC_TURN_PASSWORD",
    help="TURN password (env THREEBC_TURN_PASSWORD).",
)
@click.option(
    "--auto-answer",
    default="none",
    show_default=True,
    type=click.Choice(["none", "contacts", "all"]),
    help="none: contacts ring and you answer; contacts: answer contacts; all: answer anyone. "
    "Calls from unknown keys are refused unless `all`.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.pass_context
def daemon(
    ctx: click.Context,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    relay: bool,
    relay_mbit: float,
    ice: bool,
    direct: bool,
    stun: str | None,
    turn: str | None,
    turn_user: str | None,
    turn_password: str | None,
    auto_answer: str,
    log_level: str,
) -> None:
    """Run the daemon in the foreground (Ctrl-C stops it cleanly)."""
    import trio

    from overlay.node import DEFAULT_PORT, Node, NodeOptions

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    directory = state_dir(ctx)
    try:
        identity, created = ident.load_or_create(directory)
        listen_addrs = [parse_hostport(t, DEFAULT_PORT) for t in listen] or [
            ("0.0.0.0", DEFAULT_PORT)
        ]
        boot = [parse_hostport(t, DEFAULT_PORT) for t in bootstrap]
        stun_addr = parse_hostport(stun, 3478) if stun else None
        turn_addr = parse_hostport(turn, 3478) if turn else None
    except (ident.IdentityError, ValueError) as exc:
        fail(str(exc))
        return
    if created:
        click.echo(f"Created a new identity in {directory}", err=True)
    node = Node(
        identity,
        NodeOptions(
            state_dir=directory,
            listen=listen_addrs,
            bootstrap=boot,
            relay=relay,
            relay_mbit=relay_mbit,
            ice=ice,
            direct=direct,
            stun=stun_addr,
            turn=turn_addr,
            turn_username=turn_user,
            turn_password=turn_password,
            auto_answer=auto_answer,
        ),
    )
    try:
        trio.run(node.run)
    except OSError as exc:
        fail(f"cannot start the daemon: {exc}")
    except KeyboardInterrupt:
        pass


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@cli.command()
@state_dir_option
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """What the daemon is: key, addresses, peers, traffic."""
    info = rpc(ctx, "node.info")
    if as_json:
        emit_json(info)
        return
    click.echo(f"public key    {info['public_key']}")
    click.echo(f"safety words  {' '.join(info['safety_words'])}")
    click.echo(f"listening on  {', '.join(info['listen'])}")
    click.echo(f"reachable at  {', '.join(info['addresses']) or '(unknown yet)'}")
    click.echo(f"peers         {info['peers']}    records held {info['records_stored']}")
    click.echo(f"relay         {'yes' if info['relay'] else 'no'}    uptime {info['uptime_s']} s")
    if info["relay"]:
        stats = info.get("relay_stats", {})
        click.echo(
            f"relaying      {info['relay_pairs']} pairs, "
            f"{stats.get('forwarded_packets', 0)} packets forwarded, "
            f"{stats.get('dropped_rate', 0)} over the limits "
            f"({info.get('relay_mbit', 0):g} Mbit/s in total)"
        )
    sessions = info.get("sessions", [])
    click.echo(f"sessions      {len(sessions)}")
    for s in sessions:
        rtt = "-" if s["rtt_ms"] is None else f"{s['rtt_ms']} ms"
        click.echo(f"  {s['peer'][:16]}…  {s['path']:<8} rtt {rtt}  {s['age_s']} s old")


@cli.command()
@state_dir_option
@json_option
@click.pass_context
def peers(ctx: click.Context, as_json: bool) -> None:
    """The verified contacts in the daemon's routing table."""
    result = rpc(ctx, "dht.peers")
    if as_json:
        emit_json(result)
        return
    if not result:
        click.echo("no peers yet (is a --bootstrap daemon reachable?)")
        return
    _print_table(
        [
            [
                p["public_key"],
                p["address"],
                f"{p['last_seen_s']} s",
                "-" if p["rtt_ms"] is None else f"{p['rtt_ms']} ms",
            ]
            for p in result
        ],
        ["public key", "address", "seen", "rtt"],
    )


@cli.command()
@state_dir_option
@click.argument("key")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to search.")
@json_option
@click.pass_context
def lookup(ctx: click.Context, key: str, timeout: float, as_json: bool) -> None:
    """Find a person's signed record by their public key."""
    try:
        ident.parse_public_key(key)
    except ident.IdentityError as exc:
        fail(f"bad key: {exc}")
    result = rpc(ctx, "dht.lookup", timeout + 5, public_key=key, timeout=timeout)
    if as_json:
        emit_json(result)
        return
    click.echo(f"public key  {result['public_key']}")
    click.echo(f"addresses   {', '.join(result['addresses']) or '(none)'}")
    if result["relays"]:
        click.echo(f"relays      {', '.join(r['address'] for r in result['relays'])}")
    click.echo(f"seq         {result['seq']}")
    click.echo(
        f"found in    {result['latency_ms']} ms, {result['hops']} hops, {result['queries']} queries"
    )


@cli.command()
@state_dir_option
@click.argument("key")
@click.option("--count", "-c", default=4, show_default=True, help="Round trips to measure.")
@click.option("--interval", default=0.5, show_default=True, help="Seconds between them.")
@json_option
@click.pass_context
def ping(ctx: click.Context, key: str, count: int, interval: float, as_json: bool) -> None:
    """Open an encrypted session to KEY and measure round trips; says which path it took."""
    try:
        ident.parse_public_key(key)
    except ident.IdentityError as exc:
        fail(f"bad key: {exc}")
    result = rpc(
        ctx,
        "session.ping",
        30 + count * (interval + 2),
        public_key=key,
        count=count,
        interval=interval,
    )
    if as_json:
        emit_json(result)
        return
    click.echo(f"session to {key[:16]}… up in {result['setup_ms']} ms over a {result['path']} path")
    for i, (rtt, path) in enumerate(zip(result["rtts_ms"], result["paths"], strict=True)):
        click.echo(f"  seq={i} {'lost' if rtt is None else f'rtt={rtt} ms'} path={path}")
    click.echo(f"median rtt {result['rtt_ms']} ms, {result['lost']} of {count} lost")


def main() -> None:
    from cli.calls import register

    register(cli)
    cli(prog_name="3bc")


if __name__ == "__main__":
    main()
