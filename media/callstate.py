"""The call state machine: offer, ring, answer or reject, hang up; sans-IO, over lossy datagrams.

Control messages are small msgpack maps inside wiremedia CONTROL packets. Datagrams get lost, so
every message that changes state carries a message id and is retransmitted with backoff until the
peer acknowledges it; the receiver acknowledges every copy and acts on the first only. Legal
transitions live in TRANSITIONS; an input missing from it is a local misuse (CallUsageError) or a
peer's protocol violation (CallProtocolError), never silently guessed at.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import msgpack

from media.wiremedia import ControlPacket, MediaLocalError, MediaRemoteError

CONTROL_VERSION = 1
CALL_ID_SIZE = 16  # random, so two calls between the same people never mix up
# First retransmission after 250 ms (≈ a slow intercontinental RTT), doubling up to 2 s:
# SIP's T1/T2 scheme (RFC 3261 §17.1.1.2) with a T1 suited to an already-open session.
RETRANSMIT_INITIAL = 0.25
RETRANSMIT_MAX = 2.0
# An unacknowledged message after this long means the peer is gone. SIP's Timer B is 32 s for a
# cold start; our session is already established, so 10 s is plenty.
CONTROL_TIMEOUT = 10.0
# Ringing ends after 45 s, as phones commonly do (carriers ring 30-60 s).
RING_TIMEOUT = 45.0
# The callee waits a little longer than the caller, so the caller's own timeout (and hangup)
# normally decides, and a vanished caller still cannot leave us ringing forever.
RING_TIMEOUT_MARGIN = 5.0
# In a call, say something at least every second (media usually does it for us), and declare the
# path lost after 15 s of silence: enough for the session to switch path (relay ↔ direct), close
# to ICE's 'disconnected'→'failed' times in browsers.
KEEPALIVE_INTERVAL = 1.0
PATH_GRACE = 15.0
# Decoding bounds: a few short fields, a list of at most 8 codec names.
MAX_CODECS = 8
MAX_NAME = 16
MAX_REASON = 64
MAX_DIMENSION = 4096
MAX_FPS = 120
MAX_MSG_ID = (1 << 32) - 1
# Remember this many recently handled message ids of the peer, to drop retransmitted copies.
SEEN_IDS = 64


class CallUsageError(MediaLocalError):
    """The application asked for something the call's state does not allow."""


class CallProtocolError(MediaRemoteError):
    """The peer sent a malformed control message or one its state does not allow."""


# --- messages ---


@dataclass(frozen=True, slots=True)
class Offer:
    call_id: bytes
    msg_id: int
    codecs: tuple[str, ...]
    width: int
    height: int
    fps: int
    recording: bool = False


@dataclass(frozen=True, slots=True)
class Answer:
    call_id: bytes
    msg_id: int
    codec: str
    width: int
    height: int
    fps: int
    recording: bool = False


@dataclass(frozen=True, slots=True)
class Reject:
    call_id: bytes
    msg_id: int
    reason: str = "declined"


@dataclass(frozen=True, slots=True)
class Busy:
    """Sent (unreliably) for each copy of an offer while the callee is in another call."""

    call_id: bytes


@dataclass(frozen=True, slots=True)
class Hangup:
    call_id: bytes
    msg_id: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RecordingNotice:
    """The sender starts or stops recording the call: the other side must be told."""

    call_id: bytes
    msg_id: int
    recording: bool


@dataclass(frozen=True, slots=True)
class Keepalive:
    call_id: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    call_id: bytes
    acked: int


ControlMessage = Offer | Answer | Reject | Busy | Hangup | RecordingNotice | Keepalive | Ack
_RELIABLE = (Offer, Answer, Reject, Hangup, RecordingNotice)

# kind → (class, {wire key: (field, type)}); version, kind and call id are common to all.
_SCHEMA: dict[str, tuple[type, dict[str, tuple[str, type]]]] = {
    "offer": (
        Offer,
        {
            "m": ("msg_id", int),
            "codecs": ("codecs", list),
            "w": ("width", int),
            "h": ("height", int),
            "fps": ("fps", int),
            "rec": ("recording", bool),
        },
    ),
    "answer": (
        Answer,
        {
            "m": ("msg_id", int),
            "codec": ("codec", str),
            "w": ("width", int),
            "h": ("height", int),
            "fps": ("fps", int),
            "rec": ("recording", bool),
        },
    ),
    "reject": (Reject, {"m": ("msg_id", int), "why": ("reason", str)}),
    "busy": (Busy, {}),
    "hangup": (Hangup, {"m": ("msg_id", int), "why": ("reason", str)}),
    "rec": (RecordingNotice, {"m": ("msg_id", int), "on": ("recording", bool)}),
    "ka": (Keepalive, {}),
    "ack": (Ack, {"a": ("acked", int)}),
}
_KIND_OF = {cls: kind for kind, (cls, _) in _SCHEMA.items()}


def encode_message(msg: ControlMessage) -> bytes:
    """The datagram (wiremedia CONTROL packet) carrying `msg`."""
    _validate(msg, CallUsageError)
    kind = _KIND_OF[type(msg)]
    body: dict[str, object] = {"v": CONTROL_VERSION, "k": kind, "c": msg.call_id}
    for key, (name, _) in _SCHEMA[kind][1].items():
        value = getattr(msg, name)
        body[key] = list(value) if isinstance(value, tuple) else value
    return ControlPacket(msgpack.packb(body, use_bin_type=True)).encode()


def decode_message(payload: bytes) -> ControlMessage:
    """Parse the payload of a CONTROL packet; CallProtocolError on anything unexpected."""
    try:
        body = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_REASON,
            max_bin_len=CALL_ID_SIZE,
            max_array_len=MAX_CODECS,
            max_map_len=16,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CallProtocolError(f"control message is not valid msgpack: {exc}") from None
    except Exception as exc:  # msgpack raises a few unlisted types on hostile input
        raise CallProtocolError(f"control message is not valid msgpack: {exc!r}") from None
    if not isinstance(body, dict):
        raise CallProtocolError("control message is not a map")
    if body.get("v") != CONTROL_VERSION:
        raise CallProtocolError("unsupported control message version")
    kind = body.get("k")
    if not isinstance(kind, str) or kind not in _SCHEMA:
        raise CallProtocolError("unknown control message kind")
    cls, fields = _SCHEMA[kind]
    if set(body) != {"v", "k", "c", *fields}:
        raise CallProtocolError(f"{kind}: wrong set of fields")
    args: dict[str, object] = {"call_id": body["c"]}
    for key, (name, typ) in fields.items():
        value = body[key]
        # bool is an int subclass: check exact types so True never passes as a number.
        if type(value) is not typ:
            raise CallProtocolError(f"{kind}.{key} has the wrong type")
        args[name] = tuple(value) if typ is list else value
    msg = cls(**args)
    _validate(msg, CallProtocolError)
    return msg


def _validate(msg: ControlMessage, error: type[Exception]) -> None:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise error(f"{type(msg).__name__}: {what}")

    need(type(msg.call_id) is bytes and len(msg.call_id) == CALL_ID_SIZE, "bad call id")
    if isinstance(msg, _RELIABLE):
        need(type(msg.msg_id) is int and 0 < msg.msg_id <= MAX_MSG_ID, "bad message id")
    if isinstance(msg, Ack):
        need(type(msg.acked) is int and 0 < msg.acked <= MAX_MSG_ID, "bad acked id")
    if isinstance(msg, Offer | Answer):
        need(type(msg.width) is int and 1 <= msg.width <= MAX_DIMENSION, "bad width")
        need(type(msg.height) is int and 1 <= msg.height <= MAX_DIMENSION, "bad height")
        need(type(msg.fps) is int and 1 <= msg.fps <= MAX_FPS, "bad fps")
        need(type(msg.recording) is bool, "bad recording flag")
    if isinstance(msg, Offer):
        need(1 <= len(msg.codecs) <= MAX_CODECS, "bad codec count")
        need(all(_is_name(c) for c in msg.codecs), "bad codec name")
    if isinstance(msg, Answer):
        need(_is_name(msg.codec), "bad codec name")
    if isinstance(msg, Reject | Hangup):
        need(type(msg.reason) is str and len(msg.reason) <= MAX_REASON, "bad reason")
    if isinstance(msg, RecordingNotice):
        need(type(msg.recording) is bool, "bad recording flag")


def _is_name(name: object) -> bool:
    return (
        type(name) is str and 1 <= len(name) <= MAX_NAME and name.isascii() and name.isprintable()
    )


# --- negotiation ---


@dataclass(frozen=True, slots=True)
class MediaCaps:
    """What this side can do, best first."""

    codecs: tuple[str, ...] = ("vp8",)
    width: int = 1280
    height: int = 720
    fps: int = 30


@dataclass(frozen=True, slots=True)
class CallParams:
    codec: str
    width: int
    height: int
    fps: int


def negotiate(offer: Offer, caps: MediaCaps) -> CallParams | None:
    """First offered codec we support; the smaller resolution (by pixels) and frame rate."""
    codec = next((c for c in offer.codecs if c in caps.codecs), None)
    if codec is None:
        return None
    if offer.width * offer.height <= caps.width * caps.height:
        width, height = offer.width, offer.height
    else:
        width, height = caps.width, caps.height
    return CallParams(codec, width, height, min(offer.fps, caps.fps))


# --- states, inputs and the transition table ---


class CallState(enum.Enum):
    IDLE = "idle"
    OUTGOING = "outgoing ringing"
    INCOMING = "incoming ringing"
    ANSWERED = "answered"
    ENDED = "ended"


class Input(enum.Enum):
    # local (the application)
    DIAL = "dial"
    ACCEPT = "accept"
    DECLINE = "decline"
    HANGUP = "hangup"
    SET_RECORDING = "set recording"
    # remote (the peer)
    GOT_OFFER = "got offer"
    GOT_ANSWER = "got answer"
    GOT_REJECT = "got reject"
    GOT_BUSY = "got busy"
    GOT_HANGUP = "got hangup"
    GOT_RECORDING = "got recording"
    GOT_KEEPALIVE = "got keepalive"
    # timers
    RING_TIMEOUT = "ring timeout"
    CONTROL_LOST = "control lost"
    PATH_LOST = "path lost"


_LOCAL = {Input.DIAL, Input.ACCEPT, Input.DECLINE, Input.HANGUP, Input.SET_RECORDING}

_S, _I = CallState, Input
TRANSITIONS: dict[tuple[CallState, Input], CallState] = {
    (_S.IDLE, _I.DIAL): _S.OUTGOING,
    (_S.IDLE, _I.GOT_OFFER): _S.INCOMING,
    # caller, ringing
    (_S.OUTGOING, _I.GOT_ANSWER): _S.ANSWERED,
    (_S.OUTGOING, _I.GOT_REJECT): _S.ENDED,
    (_S.OUTGOING, _I.GOT_BUSY): _S.ENDED,
    (_S.OUTGOING, _I.HANGUP): _S.ENDED,  # cancel
    (_S.OUTGOING, _I.RING_TIMEOUT): _S.ENDED,
    (_S.OUTGOING, _I.CONTROL_LOST): _S.ENDED,
    (_S.OUTGOING, _I.SET_RECORDING): _S.OUTGOING,
    (_S.OUTGOING, _I.GOT_KEEPALIVE): _S.OUTGOING,  # callee answered; its answer is on the way
    (_S.OUTGOING, _I.GOT_RECORDING): _S.OUTGOING,
    # callee, ringing
    (_S.INCOMING, _I.ACCEPT): _S.ANSWERED,
    (_S.INCOMING, _I.DECLINE): _S.ENDED,
    (_S.INCOMING, _I.HANGUP): _S.ENDED,  # same as declining
    (_S.INCOMING, _I.GOT_HANGUP): _S.ENDED,  # the caller gave up: a missed call
    (_S.INCOMING, _I.RING_TIMEOUT): _S.ENDED,
    (_S.INCOMING, _I.CONTROL_LOST): _S.ENDED,
    (_S.INCOMING, _I.GOT_RECORDING): _S.INCOMING,
    (_S.INCOMING, _I.GOT_KEEPALIVE): _S.INCOMING,
    # in the call
    (_S.ANSWERED, _I.HANGUP): _S.ENDED,
    (_S.ANSWERED, _I.GOT_HANGUP): _S.ENDED,
    (_S.ANSWERED, _I.PATH_LOST): _S.ENDED,
    (_S.ANSWERED, _I.CONTROL_LOST): _S.ENDED,
    (_S.ANSWERED, _I.SET_RECORDING): _S.ANSWERED,
    (_S.ANSWERED, _I.GOT_RECORDING): _S.ANSWERED,
    (_S.ANSWERED, _I.GOT_KEEPALIVE): _S.ANSWERED,
    # hanging up twice is harmless
    (_S.ENDED, _I.HANGUP): _S.ENDED,
}


class EndReason(enum.Enum):
    HANGUP_LOCAL = "hung up"
    HANGUP_REMOTE = "remote hung up"
    REJECTED = "rejected"  # the callee declined
    DECLINED = "declined"  # we declined
    BUSY = "busy"
    TIMED_OUT = "timed out"
    FAILED = "failed"


# --- events ---


@dataclass(frozen=True, slots=True)
class IncomingCall:
    offer: Offer
    params: CallParams


@dataclass(frozen=True, slots=True)
class Ringing:
    """The callee got our offer and is ringing."""


@dataclass(frozen=True, slots=True)
class CallAnswered:
    params: CallParams


@dataclass(frozen=True, slots=True)
class RemoteRecording:
    """The far end started (True) or stopped (False) recording this call."""

    recording: bool


@dataclass(frozen=True, slots=True)
class CallEnded:
    reason: EndReason
    detail: str = ""


CallEvent = IncomingCall | Ringing | CallAnswered | RemoteRecording | CallEnded


@dataclass(slots=True)
class _Pending:
    data: bytes
    next_send: float
    interval: float
    deadline: float
    msg: ControlMessage = field(repr=False)


def busy_reply(offer: Offer) -> bytes:
    """Stateless answer to an offer that arrives while we are in another call."""
    return encode_message(Busy(offer.call_id))


class Call:
    """One call, either direction. Feed it messages and time; take datagrams from `datagrams()`."""

    def __init__(self, caps: MediaCaps | None = None) -> None:
        self.caps = caps or MediaCaps()
        self.state = CallState.IDLE
        self.call_id: bytes | None = None
        self.params: CallParams | None = None
        self.end_reason: EndReason | None = None
        self.end_detail = ""
        self.local_recording = False
        self.remote_recording = False
        self._outbox: list[bytes] = []
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._seen: deque[int] = deque(maxlen=SEEN_IDS)
        self._ring_deadline: float | None = None
        self._last_heard = 0.0
        self._last_sent = 0.0
        self.retransmissions = 0

    # --- application inputs ---

    def dial(self, call_id: bytes, now: float, *, recording: bool = False) -> None:
        self._go(Input.DIAL)
        self.call_id = call_id
        self.local_recording = recording
        caps = self.caps
        offer = Offer(
            call_id, self._take_id(), caps.codecs, caps.width, caps.height, caps.fps, recording
        )
        self._send_reliable(offer, now)
        self._ring_deadline = now + RING_TIMEOUT
        self._last_heard = now

    def answer(self, now: float, *, recording: bool = False) -> list[CallEvent]:
        self._go(Input.ACCEPT)
        assert self.params is not None and self.call_id is not None
        self.local_recording = recording
        p = self.params
        msg = Answer(self.call_id, self._take_id(), p.codec, p.width, p.height, p.fps, recording)
        self._send_reliable(msg, now)
        self._last_heard = now
        return [CallAnswered(p)]

    def reject(self, now: float, reason: str = "declined") -> list[CallEvent]:
        self._go(Input.DECLINE)
        return self._end_sending(
            Reject(self._cid(), self._take_id(), reason), now, EndReason.DECLINED
        )

    def hangup(self, now: float, reason: str = "") -> list[CallEvent]:
        was = self.state
        self._go(Input.HANGUP)
        if was is CallState.ENDED:
            return []
        if was is CallState.INCOMING:
            reject = Reject(self._cid(), self._take_id(), reason or "declined")
            return self._end_sending(reject, now, EndReason.DECLINED)
        return self._end_sending(
            Hangup(self._cid(), self._take_id(), reason), now, EndReason.HANGUP_LOCAL
        )

    def set_recording(self, recording: bool, now: float) -> None:
        """Start/stop recording locally; the peer is told (it must know it is being recorded)."""
        self._go(Input.SET_RECORDING)
        if recording != self.local_recording:
            self.local_recording = recording
            self._send_reliable(RecordingNotice(self._cid(), self._take_id(), recording), now)

    def on_peer_activity(self, now: float) -> None:
        """Any authenticated packet of this call from the peer (media too) proves the path."""
        self._last_heard = max(self._last_heard, now)

    # --- network input ---

    def receive(self, msg: ControlMessage | bytes, now: float) -> list[CallEvent]:
        """Handle one control message (decoded, or a CONTROL payload)."""
        if isinstance(msg, bytes | bytearray):
            msg = decode_message(bytes(msg))
        if self.call_id is None:
            if not isinstance(msg, Offer):
                raise CallProtocolError(f"{type(msg).__name__} for a call we do not know")
            self.call_id = msg.call_id
        if msg.call_id != self.call_id:
            raise CallUsageError("message routed to the wrong call")
        self._last_heard = max(self._last_heard, now)
        if isinstance(msg, Ack):
            return self._on_ack(msg)
        if isinstance(msg, _RELIABLE):
            self._queue(encode_message(Ack(self.call_id, msg.msg_id)), now)
            if msg.msg_id in self._seen:
                return []
            self._seen.append(msg.msg_id)
        if self.state is CallState.ENDED:
            return []  # late copies after the end: acknowledged above, otherwise ignored
        return self._dispatch(msg, now)

    def _dispatch(self, msg: ControlMessage, now: float) -> list[CallEvent]:
        if isinstance(msg, Offer):
            self._go(Input.GOT_OFFER)
            params = negotiate(msg, self.caps)
            self.remote_recording = msg.recording
            if params is None:
                self._go(Input.DECLINE)
                reject = Reject(msg.call_id, self._take_id(), "no common codec")
                return self._end_sending(reject, now, EndReason.FAILED, "no common codec")
            self.params = params
            self._ring_deadline = now + RING_TIMEOUT + RING_TIMEOUT_MARGIN
            return [IncomingCall(msg, params)]
        if isinstance(msg, Answer):
            self._go(Input.GOT_ANSWER)
            self._settle_offer()
            self.params = CallParams(msg.codec, msg.width, msg.height, msg.fps)
            if msg.codec not in self.caps.codecs:
                hangup = Hangup(self._cid(), self._take_id(), "bad answer")
                detail = f"answer chose codec {msg.codec!r} we did not offer"
                return self._end_sending(hangup, now, EndReason.FAILED, detail)
            events: list[CallEvent] = [CallAnswered(self.params)]
            if msg.recording:
                self.remote_recording = True
                events.append(RemoteRecording(True))
            return events
        if isinstance(msg, Reject):
            self._go(Input.GOT_REJECT)
            return self._end(EndReason.REJECTED, msg.reason)
        if isinstance(msg, Busy):
            self._go(Input.GOT_BUSY)
            return self._end(EndReason.BUSY)
        if isinstance(msg, Hangup):
            self._go(Input.GOT_HANGUP)
            return self._end(EndReason.HANGUP_REMOTE, msg.reason)
        if isinstance(msg, RecordingNotice):
            self._go(Input.GOT_RECORDING)
            if msg.recording == self.remote_recording:
                return []
            self.remote_recording = msg.recording
            return [RemoteRecording(msg.recording)]
        self._go(Input.GOT_KEEPALIVE)
        return []

    # --- time ---

    def next_timeout(self) -> float | None:
        times = [min(p.next_send, p.deadline) for p in self._pending.values()]
        if self.state in (CallState.OUTGOING, CallState.INCOMING) and self._ring_deadline:
            times.append(self._ring_deadline)
        if self.state is CallState.ANSWERED:
            times.append(self._last_sent + KEEPALIVE_INTERVAL)
            times.append(self._last_heard + PATH_GRACE)
        return min(times, default=None)

    def handle_timeout(self, now: float) -> list[CallEvent]:
        events: list[CallEvent] = []
        for mid, p in list(self._pending.items()):
            if mid not in self._pending or min(p.next_send, p.deadline) > now:
                continue
            if now >= p.deadline:
                del self._pending[mid]
                if self.state is not CallState.ENDED:
                    self._go(Input.CONTROL_LOST)
                    events += self._end(EndReason.FAILED, "peer does not answer")
                continue
            self._queue(p.data, now)
            self.retransmissions += 1
            p.interval = min(2 * p.interval, RETRANSMIT_MAX)
            p.next_send = now + p.interval
        ringing = self.state in (CallState.OUTGOING, CallState.INCOMING)
        if ringing and self._ring_deadline is not None and now >= self._ring_deadline:
            was = self.state
            self._go(Input.RING_TIMEOUT)
            # Tell the other side: the caller cancels, the callee reports nobody picked up.
            if was is CallState.OUTGOING:
                msg: ControlMessage = Hangup(self._cid(), self._take_id(), "no answer")
            else:
                msg = Reject(self._cid(), self._take_id(), "no answer")
            events += self._end_sending(msg, now, EndReason.TIMED_OUT, "no answer")
        if self.state is CallState.ANSWERED:
            if now >= self._last_heard + PATH_GRACE:
                self._go(Input.PATH_LOST)
                events += self._end(EndReason.FAILED, "path lost")
            elif now >= self._last_sent + KEEPALIVE_INTERVAL:
                self._queue(encode_message(Keepalive(self._cid())), now)
        return events

    # --- outputs ---

    def datagrams(self) -> list[bytes]:
        """Datagrams to send now, in order."""
        out, self._outbox = self._outbox, []
        return out

    @property
    def finished(self) -> bool:
        """Ended, and nothing left to retransmit: the shell may forget this call."""
        return self.state is CallState.ENDED and not self._pending

    # --- internals ---

    def _go(self, inp: Input) -> None:
        new = TRANSITIONS.get((self.state, inp))
        if new is None:
            err = CallUsageError if inp in _LOCAL else CallProtocolError
            raise err(f"{inp.value!r} is not allowed in state {self.state.value!r}")
        self.state = new

    def _cid(self) -> bytes:
        assert self.call_id is not None
        return self.call_id

    def _take_id(self) -> int:
        mid = self._next_id
        self._next_id += 1
        return mid

    def _queue(self, data: bytes, now: float) -> None:
        self._outbox.append(data)
        self._last_sent = now

    def _send_reliable(self, msg: ControlMessage, now: float) -> None:
        data = encode_message(msg)
        self._queue(data, now)
        assert isinstance(msg, _RELIABLE)
        self._pending[msg.msg_id] = _Pending(
            data, now + RETRANSMIT_INITIAL, RETRANSMIT_INITIAL, now + CONTROL_TIMEOUT, msg
        )

    def _on_ack(self, ack: Ack) -> list[CallEvent]:
        pending = self._pending.pop(ack.acked, None)
        if pending is not None and isinstance(pending.msg, Offer) and self.state is _S.OUTGOING:
            return [Ringing()]
        return []

    def _settle_offer(self) -> None:
        """An answer implies the offer arrived, even if its ack was lost."""
        for mid, p in list(self._pending.items()):
            if isinstance(p.msg, Offer):
                del self._pending[mid]

    def _end(self, reason: EndReason, detail: str = "") -> list[CallEvent]:
        self.end_reason, self.end_detail = reason, detail
        self._pending.clear()  # nothing about a finished call is worth retransmitting
        return [CallEnded(reason, detail)]

    def _end_sending(
        self, msg: ControlMessage, now: float, reason: EndReason, detail: str = ""
    ) -> list[CallEvent]:
        events = self._end(reason, detail)
        self._send_reliable(msg, now)
        return events
