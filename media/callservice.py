"""The call service: the trio shell that runs Call state machines and media over peer sessions.

One reader task per session routes datagrams: call control to the Call it names (a new offer makes
a new incoming call), everything else to the media pipeline of the live call on that session. One
driver task per call runs its control timers, starts media when the call is answered, stops it at
the end, and lingers briefly so the final hangup/reject is acknowledged.

Policy (who may ring us), ``auto_answer``:
- ``none``: contacts ring and wait for a person to ``answer``; unknown keys are refused.
- ``contacts``: contacts are answered automatically; unknown keys are refused.
- ``all``: everyone is answered automatically.
Refusing an unknown key still costs one small reject datagram on an already authenticated
session; nothing rings.

One live call at a time (a 1:1 video call is what two cores can carry); an offer arriving during
a call gets Busy. Ended calls stay listed (``HISTORY``) so their final stats can be read.

Recording: a call placed or answered with ``record`` tells the far end (the offer/answer carries
the flag; the far end gets a ``call.recording`` event and ``remote_recording`` in its call info).
At the end of a recorded call the quality report is written beside the recording as
``<record>.report.png``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from media.callstate import (
    Call,
    CallAnswered,
    CallEnded,
    CallEvent,
    CallParams,
    CallProtocolError,
    CallState,
    CallUsageError,
    IncomingCall,
    MediaCaps,
    Offer,
    RemoteRecording,
    Ringing,
    busy_reply,
    decode_message,
)
from media.codecs import VIDEO_CODECS
from media.contacts import Contacts, ContactsError, parse_key
from media.pipeline import (
    MediaOptions,
    MediaPipeline,
    PipelineError,
    open_recorder,
    open_sources,
)
from media.recorder import RecorderError
from media.report import ReportError, write_report
from media.session_api import PUBLIC_KEY_SIZE, PeerSession, SessionClosed
from media.wiremedia import ControlPacket, MediaError, MediaRemoteError, parse_packet

log = logging.getLogger("3bc.calls")

AUTO_ANSWER_POLICIES = ("none", "contacts", "all")
# Ended calls kept for `calls`/`stats`: enough for "what just happened", bounded for a daemon.
HISTORY = 32
# After the end, keep retransmitting our hangup/reject this long for its ack: covers the first
# four retransmissions (0.25 + 0.5 + 1 s) of callstate's backoff, so a lossy path still hears it.
HANGUP_LINGER = 3.0
# The control timer wakes at least this often (the Call machine's keepalive interval).
MAX_CONTROL_SLEEP = 1.0
# The longest call `duration` accepted: a day; beyond that it is a typo.
MAX_DURATION = 86_400.0
REPORT_SUFFIX = ".report.png"
REFUSED_REASON = "not accepting calls"

Connect = Callable[[bytes], Awaitable[PeerSession]]
Listener = Callable[[str, dict[str, Any]], None]


class CallServiceError(Exception):
    """A call request cannot be carried out; the message is for the person who asked."""


class NoSuchCall(CallServiceError):
    """No call with that id (or no call in progress when no id was given)."""


class PeerUnreachable(CallServiceError):
    """The session to the callee could not be opened."""


class Busy(CallServiceError):
    """A call is already in progress."""


@dataclass(frozen=True, slots=True)
class CallOptions:
    """What a call sends and does: media sources and codec, recording path, duration limit."""

    media: MediaOptions = field(default_factory=MediaOptions)
    record: str | None = None
    duration: float | None = None

    def __post_init__(self) -> None:
        if self.record is not None and (not isinstance(self.record, str) or not self.record):
            raise CallServiceError("record must be a file path")
        if self.duration is not None and (
            isinstance(self.duration, bool)
            or not isinstance(self.duration, int | float)
            or not 0 < self.duration <= MAX_DURATION
        ):
            raise CallServiceError(f"duration must be in (0, {MAX_DURATION:.0f}] seconds")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CallOptions:
        """Options from an RPC request; unknown fields and bad values raise CallServiceError."""
        media_keys = {"video", "audio", "codec", "width", "height", "fps"}
        known = media_keys | {"record", "duration"}
        extra = set(params) - known
        if extra:
            raise CallServiceError(f"unknown call options: {sorted(extra)}")
        try:
            media = MediaOptions(**{k: v for k, v in params.items() if k in media_keys})
        except PipelineError as exc:
            raise CallServiceError(str(exc)) from None
        record = params.get("record")
        if isinstance(record, str) and record:
            record = os.path.abspath(record)
            if not os.path.isdir(os.path.dirname(record)):
                raise CallServiceError(f"cannot record to {record}: no such directory")
        return cls(media, record, params.get("duration"))


class _CallHandle:
    """Everything the service knows about one call."""

    def __init__(
        self, call: Call, session: PeerSession, direction: str, options: CallOptions | None
    ) -> None:
        self.machine = call
        self.session = session
        self.direction = direction  # "outgoing" | "incoming"
        self.options = options
        self.peer = bytes(session.peer_public_key)
        self.started = trio.current_time()
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self.end_detail = ""
        self.sources: Any = None
        self.pipeline: MediaPipeline | None = None
        self.final_stats: dict[str, Any] | None = None
        self.report_path: str | None = None
        self.auto_answer = False
        self.settled = trio.Event()  # answered or ended
        self.ended = trio.Event()
        self.finished = trio.Event()  # ended and nothing left to retransmit
        self.wake = trio.Event()

    @property
    def call_id(self) -> bytes:
        assert self.machine.call_id is not None
        return self.machine.call_id

    @property
    def id(self) -> str:
        return self.call_id.hex()

    @property
    def live(self) -> bool:
        return self.machine.state is not CallState.ENDED


class CallService:
    """Places, answers and ends calls over peer sessions; see the module docstring for policy."""

    def __init__(
        self,
        connect: Connect,
        *,
        contacts: Contacts | None = None,
        auto_answer: str = "none",
        answer_options: CallOptions | None = None,
        on_event: Listener | None = None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self._connect = connect
        self.contacts = contacts
        self.set_policy(auto_answer)
        self.answer_options = answer_options or CallOptions()
        self._listeners: list[Listener] = [on_event] if on_event else []
        self._limiter = limiter
        self._calls: OrderedDict[bytes, _CallHandle] = OrderedDict()
        self._reading: set[int] = set()  # id() of sessions that have a reader task
        self._nursery: trio.Nursery | None = None
        self.dropped_datagrams = 0

    # --- lifetime ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the service (use ``await nursery.start(service.run)``); cancel to stop."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is None:
            raise CallServiceError("the call service is not running")
        self._nursery.start_soon(fn, *args)

    # --- configuration and listeners ---

    def set_policy(self, policy: str) -> None:
        if policy not in AUTO_ANSWER_POLICIES:
            raise CallServiceError(f"auto-answer policy must be one of {AUTO_ANSWER_POLICIES}")
        self.auto_answer = policy

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _emit(self, event_type: str, h: _CallHandle, **fields: Any) -> None:
        payload = {
            "call_id": h.id,
            "peer": h.peer.hex(),
            "peer_name": self._name(h.peer),
            "direction": h.direction,
            **fields,
        }
        for listener in list(self._listeners):
            try:
                listener(event_type, payload)
            except Exception:
                log.exception("call event listener failed on %s", event_type)

    def _name(self, key: bytes) -> str | None:
        contact = self.contacts.get(key) if self.contacts is not None else None
        return None if contact is None else contact.name

    # --- the API ---

    async def place_call(self, public_key: bytes, options: CallOptions | None = None) -> str:
        """Dial a peer; returns the call id (hex) as soon as the offer is sent."""
        if self._nursery is None:
            raise CallServiceError("the call service is not running")
        if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_SIZE:
            raise CallServiceError(f"a public key is {PUBLIC_KEY_SIZE} bytes")
        options = options or CallOptions()
        self._ensure_idle()
        # Open sources first: a missing camera is the caller's error, reported before ringing.
        try:
            sources = await _open_sources(options.media)
        except PipelineError as exc:
            raise CallServiceError(str(exc)) from None
        try:
            try:
                session = await self._connect(public_key)
            except Exception as exc:  # connect is the daemon's: any failure means unreachable
                raise PeerUnreachable(f"cannot reach {public_key.hex()}: {exc}") from None
            self._ensure_idle()  # an incoming call may have arrived meanwhile
        except BaseException:
            await trio.to_thread.run_sync(_close_sources, sources)
            raise
        m = options.media
        codecs = (m.codec, *(c for c in VIDEO_CODECS if c != m.codec))
        call = Call(MediaCaps(codecs, m.width, m.height, m.fps))
        h = _CallHandle(call, session, "outgoing", options)
        h.sources = sources
        call.dial(os.urandom(16), trio.current_time(), recording=options.record is not None)
        self._register(h)
        self._flush(h)
        self._read(session)
        self._spawn(self._drive, h)
        self._emit("call.dialing", h, recording=options.record is not None)
        return h.id

    async def answer(self, call_id: str | None = None, options: CallOptions | None = None) -> dict:
        """Answer a ringing incoming call (the only one, when no id is given)."""
        h = self._find(call_id, ringing=True)
        await self._answer(h, options or self.answer_options)
        return self.info(h)

    def reject(self, call_id: str | None = None, reason: str = "declined") -> dict:
        h = self._find(call_id, ringing=True)
        self._apply(h, lambda now: h.machine.reject(now, reason))
        return self.info(h)

    def hangup(self, call_id: str | None = None, reason: str = "") -> dict:
        """End a call in any state (a ringing incoming one is declined)."""
        h = self._find(call_id)
        self._apply(h, lambda now: h.machine.hangup(now, reason))
        return self.info(h)

    def calls(self) -> list[dict[str, Any]]:
        return [self.info(h) for h in self._calls.values()]

    def stats(self, call_id: str | None = None) -> dict[str, Any]:
        h = self._find(call_id, include_ended=True)
        info = self.info(h)
        if h.pipeline is not None and h.final_stats is None:
            info["stats"] = h.pipeline.snapshot()
        else:
            info["stats"] = h.final_stats
        return info

    def info(self, h: _CallHandle) -> dict[str, Any]:
        now = trio.current_time()
        params = h.machine.params
        end = h.ended_at if h.ended_at is not None else now
        return {
            "call_id": h.id,
            "peer": h.peer.hex(),
            "peer_name": self._name(h.peer),
            "direction": h.direction,
            "state": h.machine.state.value,
            "codec": params.codec if params else None,
            "size": f"{params.width}x{params.height}@{params.fps}" if params else None,
            "path": h.session.path_kind,
            "recording": h.machine.local_recording,
            "remote_recording": h.machine.remote_recording,
            "record_file": h.options.record if h.options else None,
            "report_file": h.report_path,
            "duration_s": round(end - h.answered_at, 1) if h.answered_at is not None else 0.0,
            "age_s": round(now - h.started, 1),
            "end_reason": h.end_reason,
            "end_detail": h.end_detail,
        }

    # --- incoming ---

    def on_incoming_session(self, session: PeerSession) -> None:
        """The daemon hands over a fresh incoming session; its first datagram is a call offer."""
        self._read(session)

    def _on_offer(self, session: PeerSession, offer: Offer, now: float) -> None:
        if any(h.live for h in self._calls.values()):
            _send(session, busy_reply(offer))
            return
        call = Call(_answer_caps(self.answer_options))
        events = call.receive(offer, now)
        h = _CallHandle(call, session, "incoming", None)
        self._register(h)
        known = self.contacts is not None and h.peer in self.contacts
        allowed = known or self.auto_answer == "all"
        if any(isinstance(ev, IncomingCall) for ev in events) and not allowed:
            events = call.reject(now, REFUSED_REASON)
            h.end_detail = "unknown caller refused"
            self._emit("call.refused", h, reason="unknown caller")
        elif any(isinstance(ev, IncomingCall) for ev in events):
            h.auto_answer = self.auto_answer == "all" or (self.auto_answer == "contacts" and known)
            self._emit("call.incoming", h, recording=offer.recording, auto_answer=h.auto_answer)
            if offer.recording:
                self._emit("call.recording", h, recording=True, by="remote")
        self._handle_events(h, events)
        self._flush(h)
        self._spawn(self._drive, h)

    async def _answer(self, h: _CallHandle, options: CallOptions) -> None:
        try:
            sources = await _open_sources(options.media)
        except PipelineError as exc:
            raise CallServiceError(str(exc)) from None
        if h.machine.state is not CallState.INCOMING:
            await trio.to_thread.run_sync(_close_sources, sources)
            raise NoSuchCall(f"call {h.id} is no longer ringing")
        h.options, h.sources = options, sources
        recording = options.record is not None
        self._apply(h, lambda now: h.machine.answer(now, recording=recording))

    async def _auto_answer(self, h: _CallHandle) -> None:
        try:
            await self._answer(h, self.answer_options)
        except CallServiceError as exc:
            log.warning("auto-answer of %s failed: %s", h.id, exc)
            if h.live:
                self._apply(h, lambda now: h.machine.hangup(now, "cannot answer"))

    # --- session reading ---

    def _read(self, session: PeerSession) -> None:
        if id(session) not in self._reading:
            self._reading.add(id(session))
            self._spawn(self._read_session, session)

    async def _read_session(self, session: PeerSession) -> None:
        # A session that can hand over everything queued at once (overlay.sessions.PeerSession
        # does) costs one checkpoint per burst instead of one per datagram.
        receive_batch = getattr(session, "receive_batch", None)
        try:
            while True:
                if receive_batch is not None:
                    batch = await receive_batch()
                else:
                    batch = [await session.receive()]
                for data in batch:
                    self._on_datagram(session, data, trio.current_time())
        except Exception as exc:
            # SessionClosed is the normal end; anything else is the session's bug, and must end
            # its calls, not the service.
            if not isinstance(exc, SessionClosed):
                log.exception("session to %s failed", bytes(session.peer_public_key).hex())
            now = trio.current_time()
            for h in list(self._calls.values()):
                if h.session is session and h.live:
                    h.end_detail = "session closed"
                    self._apply(h, lambda now, h=h: h.machine.hangup(now, "session closed"), now)
        finally:
            self._reading.discard(id(session))

    def _on_datagram(self, session: PeerSession, data: bytes, now: float) -> None:
        try:
            pkt = parse_packet(data)
        except MediaRemoteError:
            self.dropped_datagrams += 1
            return
        if isinstance(pkt, ControlPacket):
            try:
                msg = decode_message(pkt.payload)
            except CallProtocolError:
                self.dropped_datagrams += 1
                return
            h = self._calls.get(msg.call_id)
            if h is None or h.session is not session:
                if isinstance(msg, Offer) and h is None:
                    self._on_offer(session, msg, now)
                else:
                    self.dropped_datagrams += 1  # late traffic of a forgotten call
                return
            try:
                events = h.machine.receive(msg, now)
            except (CallProtocolError, CallUsageError):
                self.dropped_datagrams += 1
                self._flush(h)
                return
            self._handle_events(h, events)
            self._flush(h)
            return
        for h in self._calls.values():
            if h.session is session and h.live:
                h.machine.on_peer_activity(now)
                if h.pipeline is not None:
                    try:
                        h.pipeline.handle_packet(pkt, len(data), now)
                    except MediaError:
                        self.dropped_datagrams += 1  # the peer's garbage; keep serving
                return
        self.dropped_datagrams += 1

    # --- per-call driving ---

    async def _drive(self, h: _CallHandle) -> None:
        try:
            await self._drive_call(h)
        except Exception:
            # A bug in one call must not take the daemon's other work down with it.
            log.exception("call %s failed", h.id)
            h.end_reason, h.end_detail = h.end_reason or "failed", "internal error"
            h.ended.set()
        finally:
            if h.sources is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_close_sources, h.sources)
                h.sources = None
            self._forget_old()

    async def _drive_call(self, h: _CallHandle) -> None:
        """Ring → (answer → media) → end → linger for the final ack."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._control_timer, h)
            if h.auto_answer:
                nursery.start_soon(self._auto_answer, h)
            await h.settled.wait()
            media_done = trio.Event()
            media_scope = trio.CancelScope()
            if h.live:
                nursery.start_soon(self._run_media, h, media_scope, media_done)
                if h.options is not None and h.options.duration is not None:
                    nursery.start_soon(self._duration_limit, h, h.options.duration)
            else:
                media_done.set()
            await h.ended.wait()
            media_scope.cancel()
            await media_done.wait()
            await self._finish(h)
            with trio.move_on_after(HANGUP_LINGER):
                await h.finished.wait()
            nursery.cancel_scope.cancel()

    async def _control_timer(self, h: _CallHandle) -> None:
        while True:
            now = trio.current_time()
            due = h.machine.next_timeout()
            if due is not None and due <= now:
                self._handle_events(h, h.machine.handle_timeout(now))
                self._flush(h)
                due = h.machine.next_timeout()
            if h.machine.finished:
                h.finished.set()
            deadline = now + MAX_CONTROL_SLEEP if due is None else min(due, now + MAX_CONTROL_SLEEP)
            with trio.move_on_at(deadline):
                await h.wake.wait()
            h.wake = trio.Event()

    async def _duration_limit(self, h: _CallHandle, seconds: float) -> None:
        await trio.sleep(seconds)
        if h.live:
            self._apply(h, lambda now: h.machine.hangup(now, "duration reached"))

    async def _run_media(self, h: _CallHandle, scope: trio.CancelScope, done: trio.Event) -> None:
        """Run the call's pipeline; a media failure ends the call, never the service."""
        try:
            with scope:
                params = h.machine.params
                assert params is not None and h.options is not None
                sources, h.sources = h.sources or (None, None), None
                recorder = None
                if h.options.record is not None:
                    try:
                        recorder = await trio.to_thread.run_sync(
                            lambda: open_recorder(
                                h.options.record,  # type: ignore[union-attr,arg-type]
                                params,
                                local_video=sources[0] is not None,
                                local_audio=sources[1] is not None,
                            )
                        )
                    except RecorderError as exc:
                        await trio.to_thread.run_sync(_close_sources, sources)
                        raise CallServiceError(f"cannot record: {exc}") from None
                    _make_private(h.options.record)
                h.pipeline = MediaPipeline(
                    h.session,
                    _local_params(params, h.options.media),
                    sources,
                    recorder=recorder,
                    limiter=self._limiter,
                    on_path_change=lambda kind, n: self._emit(
                        "call.path", h, path=kind, path_changes=n
                    ),
                )
                await h.pipeline.run()
        except Exception as exc:
            log.warning("media of call %s failed: %s", h.id, exc)
            h.end_detail = f"media failed: {exc}"
            if h.live:
                self._apply(h, lambda now: h.machine.hangup(now, "media failed"))
        finally:
            done.set()

    async def _finish(self, h: _CallHandle) -> None:
        """Freeze the final stats; write the report beside a recording."""
        p = h.pipeline
        if p is None:
            return
        now = trio.current_time()
        p.stats.sample(now)
        h.final_stats = p.snapshot()
        if h.options is not None and h.options.record is not None:
            path = h.options.record + REPORT_SUFFIX
            title = f"Call with {self._name(h.peer) or h.peer.hex()[:16]}"
            try:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(write_report, p.stats.series(), path, title)
                h.report_path = path
                _make_private(path)
            except (ReportError, OSError) as exc:
                log.warning("cannot write call report %s: %s", path, exc)
            self._emit("call.report", h, record_file=h.options.record, report_file=h.report_path)

    # --- helpers ---

    def _apply(
        self, h: _CallHandle, action: Callable[[float], list[CallEvent] | None], now: float = -1
    ) -> None:
        """Run a local action on the call's machine; turn misuse into a clear error."""
        if now < 0:
            now = trio.current_time()
        try:
            events = action(now) or []
        except CallUsageError as exc:
            raise CallServiceError(f"call {h.id}: {exc}") from None
        self._handle_events(h, events)
        self._flush(h)

    def _handle_events(self, h: _CallHandle, events: list[CallEvent]) -> None:
        for ev in events:
            if isinstance(ev, Ringing):
                self._emit("call.ringing", h)
            elif isinstance(ev, CallAnswered):
                h.answered_at = trio.current_time()
                p = ev.params
                self._emit("call.answered", h, codec=p.codec, size=f"{p.width}x{p.height}@{p.fps}")
                h.settled.set()
            elif isinstance(ev, RemoteRecording):
                self._emit("call.recording", h, recording=ev.recording, by="remote")
            elif isinstance(ev, CallEnded):
                h.ended_at = trio.current_time()
                h.end_reason = ev.reason.value
                h.end_detail = h.end_detail or ev.detail
                self._emit("call.ended", h, reason=h.end_reason, detail=h.end_detail)
                h.settled.set()
                h.ended.set()
        h.wake.set()

    def _flush(self, h: _CallHandle) -> None:
        for d in h.machine.datagrams():
            _send(h.session, d)
        h.wake.set()

    def _register(self, h: _CallHandle) -> None:
        self._calls[h.call_id] = h
        self._forget_old()

    def _forget_old(self) -> None:
        ended = [cid for cid, h in self._calls.items() if not h.live and h.ended.is_set()]
        for cid in ended[: max(0, len(ended) - HISTORY)]:
            del self._calls[cid]

    def _ensure_idle(self) -> None:
        for h in self._calls.values():
            if h.live:
                raise Busy(f"already in call {h.id} ({h.machine.state.value}); hang up first")

    def _find(
        self, call_id: str | None, *, ringing: bool = False, include_ended: bool = False
    ) -> _CallHandle:
        if call_id is not None:
            try:
                h = self._calls.get(bytes.fromhex(call_id))
            except (ValueError, TypeError):
                h = None
            if h is None:
                raise NoSuchCall(f"no call {call_id}")
            if ringing and h.machine.state is not CallState.INCOMING:
                raise NoSuchCall(f"call {call_id} is not ringing ({h.machine.state.value})")
            return h
        want = [h for h in self._calls.values() if h.live]
        if ringing:
            want = [h for h in want if h.machine.state is CallState.INCOMING]
        if not want and include_ended and self._calls:
            want = [next(reversed(self._calls.values()))]
        if not want:
            raise NoSuchCall("no ringing call" if ringing else "no call in progress")
        return want[-1]


def _make_private(path: str) -> None:
    """Recordings and reports of a private call are the owner's only (like the key file)."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)


def _send(session: PeerSession, data: bytes) -> None:
    # A closed session is noticed (and the call ended) by its reader task.
    with contextlib.suppress(SessionClosed):
        session.send(data)


async def _open_sources(media: MediaOptions) -> Any:
    """Open sources; devices and files in a worker thread (opening them can block)."""
    if media.video in ("none", "testpattern") and media.audio in ("none", "tone"):
        return open_sources(media)  # synthetic: nothing to wait for
    return await trio.to_thread.run_sync(open_sources, media)


def _close_sources(sources: Any) -> None:
    for src in sources or ():
        if src is not None:
            try:
                src.close()
            except Exception:  # a device that fails to close must not stop the others
                log.exception("closing a media source failed")


def _answer_caps(options: CallOptions) -> MediaCaps:
    m = options.media
    codecs = (m.codec, *(c for c in VIDEO_CODECS if c != m.codec))
    return MediaCaps(codecs, m.width, m.height, m.fps)


def _local_params(params: CallParams, media: MediaOptions) -> CallParams:
    """The negotiated parameters, never above what this side asked to send."""
    if media.width * media.height < params.width * params.height:
        return CallParams(params.codec, media.width, media.height, min(media.fps, params.fps))
    return CallParams(params.codec, params.width, params.height, min(media.fps, params.fps))


# --- the control socket ---


def register_control_methods(server: Any, service: CallService) -> None:
    """Expose the service on an overlay.control.ControlServer and publish its events there."""
    # Imported here: media depends on overlay only where the daemon wires the two together.
    from overlay.control import INVALID_PARAMS, NOT_FOUND, REFUSED, UNAVAILABLE, RpcError, param

    service.add_listener(lambda event_type, fields: server.events.publish(event_type, **fields))

    def rpc_error(exc: Exception) -> RpcError:
        if isinstance(exc, NoSuchCall):
            return RpcError(NOT_FOUND, str(exc))
        if isinstance(exc, PeerUnreachable):
            return RpcError(UNAVAILABLE, str(exc))
        if isinstance(exc, Busy):
            return RpcError(REFUSED, str(exc))
        return RpcError(INVALID_PARAMS, str(exc))

    def call_id(params: dict[str, Any]) -> str | None:
        return param(params, "call_id", str, None)

    def contacts() -> Contacts:
        if service.contacts is None:
            raise RpcError(UNAVAILABLE, "this daemon keeps no contact list")
        return service.contacts

    @server.method("call.place")
    async def place(params: dict[str, Any]) -> dict[str, Any]:
        try:
            key = parse_key(param(params, "public_key", str))
            options = CallOptions.from_params(
                {k: v for k, v in params.items() if k != "public_key"}
            )
            cid = await service.place_call(key, options)
        except (CallServiceError, ContactsError) as exc:
            raise rpc_error(exc) from None
        return service.stats(cid)

    @server.method("call.answer")
    async def answer(params: dict[str, Any]) -> dict[str, Any]:
        try:
            extra = {k: v for k, v in params.items() if k != "call_id"}
            options = CallOptions.from_params(extra) if extra else None
            return await service.answer(call_id(params), options)
        except CallServiceError as exc:
            raise rpc_error(exc) from None

    @server.method("call.reject")
    async def reject(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return service.reject(call_id(params))
        except CallServiceError as exc:
            raise rpc_error(exc) from None

    @server.method("call.hangup")
    async def hangup(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return service.hangup(call_id(params))
        except CallServiceError as exc:
            raise rpc_error(exc) from None

    @server.method("call.list")
    async def list_calls(params: dict[str, Any]) -> list[dict[str, Any]]:
        return service.calls()

    @server.method("call.stats")
    async def stats(params: dict[str, Any]) -> dict[str, Any]:
        try:
            return service.stats(call_id(params))
        except CallServiceError as exc:
            raise rpc_error(exc) from None

    @server.method("call.policy")
    async def policy(params: dict[str, Any]) -> dict[str, Any]:
        new = param(params, "auto_answer", str, None)
        if new is not None:
            try:
                service.set_policy(new)
            except CallServiceError as exc:
                raise rpc_error(exc) from None
        return {"auto_answer": service.auto_answer}

    @server.method("contacts.add")
    async def contacts_add(params: dict[str, Any]) -> dict[str, Any]:
        book = contacts()
        try:
            key, name = param(params, "public_key", str), param(params, "name", str)
            contact, created = book.add(key, name)
        except ContactsError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        return {**contact.to_dict(), "created": created}

    @server.method("contacts.list")
    async def contacts_list(params: dict[str, Any]) -> list[dict[str, str]]:
        return [c.to_dict() for c in contacts().list()]

    @server.method("contacts.remove")
    async def contacts_remove(params: dict[str, Any]) -> dict[str, str]:
        book = contacts()
        try:
            return book.remove(param(params, "public_key", str)).to_dict()
        except ContactsError as exc:
            code = NOT_FOUND if str(exc).startswith("no contact") else INVALID_PARAMS
            raise RpcError(code, str(exc)) from None
