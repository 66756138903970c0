"""Stories of the call service over in-memory sessions: ringing, answering, policy, hanging up,
recording notices and path changes. Media is off in the state-machine stories (so trio's
MockClock runs them instantly); one story runs real media, a recording and its report."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import pytest
import trio
import trio.testing

from media.callservice import (
    HISTORY,
    REPORT_SUFFIX,
    Busy,
    CallOptions,
    CallService,
    CallServiceError,
    NoSuchCall,
    PeerUnreachable,
    register_control_methods,
)
from media.contacts import Contacts
from media.pipeline import MediaOptions
from media.session_api import SessionClosed
from overlay.control import ControlServer, RpcError
from overlay.events import EventBus
from tests.media_link import KEY_A, KEY_B, FakeSession, session_pair

NO_MEDIA = CallOptions(MediaOptions(video="none", audio="none"))
SMALL_MEDIA = MediaOptions(width=320, height=240, fps=15)


class Phone:
    """A call service plus the events it emitted."""

    def __init__(self, service: CallService) -> None:
        self.service = service
        self.events: list[tuple[str, dict[str, Any]]] = []
        service.add_listener(lambda t, f: self.events.append((t, f)))

    def types(self) -> list[str]:
        return [t for t, _ in self.events]

    def event(self, kind: str) -> dict[str, Any]:
        return next(f for t, f in self.events if t == kind)


class World:
    """Alice (KEY_A) and Bob (KEY_B), each with a call service; Alice dials Bob."""

    def __init__(self, tmp: Path, link: dict[str, float] | None = None) -> None:
        self.link = link or {}
        self.sessions: list[tuple[FakeSession, FakeSession]] = []
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        self.contacts_b = Contacts(tmp / "b")
        self.alice = Phone(CallService(self._connect, answer_options=NO_MEDIA))
        self.bob = Phone(
            CallService(self._refuse, contacts=self.contacts_b, answer_options=NO_MEDIA)
        )

    async def _connect(self, key: bytes) -> FakeSession:
        if key != KEY_B:
            raise PeerUnreachable("nobody there")
        a, b = session_pair(**self.link)
        self.sessions.append((a, b))
        self.bob.service.on_incoming_session(b)
        return a

    async def _refuse(self, key: bytes) -> FakeSession:
        raise OSError("bob never dials in these stories")

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.alice.service.run)
        await nursery.start(self.bob.service.run)


async def until(cond: Callable[[], bool], limit: float = 120.0) -> None:
    """Wait (bounded) until `cond` holds; under MockClock this costs no real time."""
    with trio.fail_after(limit):
        while not cond():
            await trio.sleep(0.01)


def state(phone: Phone) -> str:
    calls = phone.service.calls()
    return calls[-1]["state"] if calls else ""


async def test_contact_rings_and_is_answered_by_hand(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    w = World(tmp_path)
    w.contacts_b.add(KEY_A.hex(), "Alice")
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        cid = await w.alice.service.place_call(KEY_B, NO_MEDIA)
        await until(lambda: "call.ringing" in w.alice.types())
        incoming = w.bob.event("call.incoming")
        assert incoming["call_id"] == cid
        assert incoming["peer_name"] == "Alice"
        assert incoming["auto_answer"] is False
        await trio.sleep(5)  # it keeps ringing until someone acts
        assert state(w.bob) == "incoming ringing"
        assert state(w.alice) == "outgoing ringing"
        await w.bob.service.answer()
        await until(lambda: "call.answered" in w.alice.types())
        assert state(w.alice) == state(w.bob) == "answered"
        await trio.sleep(20)  # keepalives hold a call without media up
        assert state(w.bob) == "answered"
        w.alice.service.hangup(cid)
        await until(lambda: "call.ended" in w.bob.types())
        assert w.bob.event("call.ended")["reason"] == "remote hung up"
        assert w.alice.event("call.ended")["reason"] == "hung up"
        assert w.bob.service.calls()[-1]["duration_s"] == pytest.approx(20, abs=1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("policy", ["contacts", "all"])
async def test_auto_answer_by_policy(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, policy: str
) -> None:
    w = World(tmp_path)
    if policy == "contacts":
        w.contacts_b.add(KEY_A.hex(), "Alice")
    w.bob.service.set_policy(policy)
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        await w.alice.service.place_call(KEY_B, NO_MEDIA)
        await until(lambda: "call.answered" in w.alice.types())
        assert w.bob.event("call.incoming")["auto_answer"] is True
        assert state(w.bob) == "answered"
        # The callee hangs up this time.
        w.bob.service.hangup()
        await until(lambda: "call.ended" in w.alice.types())
        assert w.alice.event("call.ended")["reason"] == "remote hung up"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("policy", ["none", "contacts"])
async def test_unknown_caller_is_refused(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, policy: str
) -> None:
    w = World(tmp_path)
    w.bob.service.set_policy(policy)
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        await w.alice.service.place_call(KEY_B, NO_MEDIA)
        await until(lambda: "call.ended" in w.alice.types())
        assert w.alice.event("call.ended")["reason"] == "rejected"
        assert w.alice.event("call.ended")["detail"] == "not accepting calls"
        assert "call.incoming" not in w.bob.types()
        assert w.bob.event("call.refused")["reason"] == "unknown caller"
        with pytest.raises(NoSuchCall):
            await w.bob.service.answer()
        nursery.cancel_scope.cancel()


async def test_callee_declines_and_caller_gives_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    w = World(tmp_path)
    w.contacts_b.add(KEY_A.hex(), "Alice")
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        await w.alice.service.place_call(KEY_B, NO_MEDIA)
        await until(lambda: "call.incoming" in w.bob.types())
        w.bob.service.reject()
        await until(lambda: "call.ended" in w.alice.types())
        assert w.alice.event("call.ended")["reason"] == "rejected"
        # Next call: the caller cancels while it rings; the callee records a missed call.
        w.alice.events.clear()
        w.bob.events.clear()
        cid = await w.alice.service.place_call(KEY_B, NO_MEDIA)
        await until(lambda: "call.incoming" in w.bob.types())
        w.alice.service.hangup(cid)
        await until(lambda: "call.ended" in w.bob.types())
        assert w.bob.event("call.ended")["reason"] == "remote hung up"
        assert len(w.alice.service.calls()) == 2 <= HISTORY
        nursery.cancel_scope.cancel()


async def test_second_call_is_refused_while_busy_and_errors_are_typed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    w = World(tmp_path)
    w.bob.service.set_policy("all")
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        with pytest.raises(PeerUnreachable):
            await w.bob.service.place_call(KEY_A, NO_MEDIA)
        with pytest.raises(CallServiceError, match="no camera"):
            await w.bob.service.place_call(
                KEY_A, CallOptions(MediaOptions(video="/dev/video99", audio="none"))
            )
        with pytest.raises(CallServiceError, match="duration"):
            CallOptions(duration=-1)
        with pytest.raises(CallServiceError, match="no such directory"):
            CallOptions.from_params({"record": str(tmp_path / "missing" / "x.webm")})
        await w.alice.service.place_call(KEY_B, NO_MEDIA)
        with pytest.raises(Busy, match="hang up first"):
            await w.alice.service.place_call(KEY_B, NO_MEDIA)
        with pytest.raises(NoSuchCall):
            w.alice.service.hangup("00" * 16)
        await until(lambda: state(w.bob) == "answered")
        # A second caller reaching Bob during the call hears "busy".
        carol_events: list[str] = []
        carol = CallService(w._connect, answer_options=NO_MEDIA)
        carol.add_listener(lambda t, f: carol_events.append(f.get("reason", t)))
        await nursery.start(carol.run)
        await carol.place_call(KEY_B, NO_MEDIA)
        await until(lambda: "busy" in carol_events)
        assert state(w.bob) == "answered"
        nursery.cancel_scope.cancel()


async def test_session_loss_and_duration_end_the_call(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    w = World(tmp_path)
    w.bob.service.set_policy("all")
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        await w.alice.service.place_call(KEY_B, NO_MEDIA)
        await until(lambda: state(w.alice) == "answered")
        w.sessions[-1][0].close()
        await until(lambda: "call.ended" in w.alice.types() and "call.ended" in w.bob.types())
        assert w.bob.event("call.ended")["detail"] == "session closed"
        w.alice.events.clear()
        timed = CallOptions(NO_MEDIA.media, duration=30)
        await w.alice.service.place_call(KEY_B, timed)
        await until(lambda: "call.ended" in w.alice.types())
        assert w.alice.service.calls()[-1]["duration_s"] == pytest.approx(30, abs=1)
        nursery.cancel_scope.cancel()


async def test_path_change_resets_rate_control(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    w = World(tmp_path)
    w.bob.service.set_policy("all")
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        await w.alice.service.place_call(KEY_B, NO_MEDIA)
        await until(lambda: w.alice.service.stats()["stats"] is not None)
        await until(lambda: w.bob.service.calls() and state(w.bob) == "answered")
        await trio.sleep(1)
        w.sessions[-1][0].switch_path("relayed")
        await until(lambda: "call.path" in w.alice.types() and "call.path" in w.bob.types())
        assert w.alice.event("call.path") | w.bob.event("call.path") == w.bob.event("call.path")
        assert w.bob.event("call.path")["path"] == "relayed"
        for phone in (w.alice, w.bob):
            stats = phone.service.stats()["stats"]
            assert stats["counters"]["path_resets"] == 1
            assert stats["path"] == "relayed"
        nursery.cancel_scope.cancel()


async def test_recorded_call_notifies_far_end_and_writes_recording_and_report(
    tmp_path: Path,
) -> None:
    """Real media (320x240), real clock: the recording is readable and the report is there."""
    w = World(tmp_path)
    w.bob.service.set_policy("all")
    w.bob.service.answer_options = CallOptions(SMALL_MEDIA)
    record = tmp_path / "alice.webm"
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        cid = await w.alice.service.place_call(KEY_B, CallOptions(SMALL_MEDIA, str(record)))
        await until(lambda: "call.recording" in w.bob.types(), 30)
        notice = w.bob.event("call.recording")
        assert notice == {**notice, "recording": True, "by": "remote", "call_id": cid}
        assert w.bob.service.calls()[-1]["remote_recording"] is True
        assert w.alice.service.calls()[-1]["recording"] is True
        rendered = lambda: (w.alice.service.stats()["stats"] or {}).get("frames_rendered", 0)  # noqa: E731
        await until(lambda: rendered() > 20, 30)
        w.alice.service.hangup()
        await until(lambda: "call.report" in w.alice.types(), 30)
        nursery.cancel_scope.cancel()
    info = w.alice.service.calls()[-1]
    assert info["report_file"] == str(record) + REPORT_SUFFIX
    assert Path(info["report_file"]).read_bytes().startswith(b"\x89PNG")
    for private in (record, Path(info["report_file"])):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    final = w.alice.service.stats(cid)["stats"]
    with av.open(str(record)) as container:
        assert len(container.streams.video) == 2 and len(container.streams.audio) == 2
        packets = sum(1 for p in container.demux() if p.size)
    assert packets > final["frames_rendered"]


async def test_control_methods(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    w = World(tmp_path)
    bus = EventBus()
    server = ControlServer(tmp_path, bus)
    register_control_methods(server, w.alice.service)
    events = bus.subscribe()
    alice_contacts = Contacts(tmp_path / "a")
    w.alice.service.contacts = alice_contacts
    m = server.methods
    async with trio.open_nursery() as nursery:
        await w.start(nursery)
        added = await m["contacts.add"]({"public_key": KEY_B.hex(), "name": "Bob"})
        assert added["created"] is True
        assert await m["contacts.list"]({}) == [{"public_key": KEY_B.hex(), "name": "Bob"}]
        with pytest.raises(RpcError, match="bad public key"):
            await m["contacts.add"]({"public_key": "zz", "name": "X"})
        with pytest.raises(RpcError, match="unknown call options"):
            await m["call.place"]({"public_key": KEY_B.hex(), "colour": "red"})
        w.bob.service.set_policy("all")
        placed = await m["call.place"](
            {"public_key": KEY_B.hex(), "video": "none", "audio": "none"}
        )
        assert placed["peer_name"] == "Bob"
        await until(lambda: state(w.alice) == "answered")
        listed = await m["call.list"]({})
        assert [c["call_id"] for c in listed] == [placed["call_id"]]
        assert (await m["call.stats"]({}))["state"] == "answered"
        assert (await m["call.policy"]({"auto_answer": "contacts"}))["auto_answer"] == "contacts"
        await m["call.hangup"]({"call_id": placed["call_id"]})
        with pytest.raises(RpcError, match="no call in progress"):
            await m["call.hangup"]({})
        removed = await m["contacts.remove"]({"public_key": KEY_B.hex()})
        assert removed["name"] == "Bob"
        nursery.cancel_scope.cancel()
    seen = []
    while True:
        try:
            seen.append(events.receive_nowait()["type"])
        except trio.WouldBlock:
            break
    assert seen[:3] == ["call.dialing", "call.ringing", "call.answered"]
    assert "call.ended" in seen


def test_session_closed_is_an_exception() -> None:
    assert issubclass(SessionClosed, Exception)
