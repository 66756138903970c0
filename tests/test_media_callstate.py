"""Call state machine stories: ring/answer/hangup, reject, busy, timeouts, lost datagrams."""

from __future__ import annotations

import contextlib
import random

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from media.callstate import (
    CONTROL_TIMEOUT,
    PATH_GRACE,
    RING_TIMEOUT,
    TRANSITIONS,
    Ack,
    Answer,
    Busy,
    Call,
    CallAnswered,
    CallEnded,
    CallParams,
    CallProtocolError,
    CallState,
    CallUsageError,
    EndReason,
    Hangup,
    IncomingCall,
    Input,
    Keepalive,
    MediaCaps,
    Offer,
    RecordingNotice,
    Reject,
    RemoteRecording,
    Ringing,
    busy_reply,
    decode_message,
    encode_message,
    negotiate,
)
from media.wiremedia import ControlPacket, parse_packet

CID = bytes(range(16))


class Pair:
    """Two calls joined by a datagram path that may drop; a fake clock in 10 ms steps."""

    def __init__(
        self,
        caller_caps: MediaCaps | None = None,
        callee_caps: MediaCaps | None = None,
        loss: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.a, self.b = Call(caller_caps), Call(callee_caps)
        self.now = 0.0
        self.loss = loss
        self.rnd = random.Random(seed)
        self.events: dict[str, list] = {"a": [], "b": []}
        self.link_up = True

    def deliver(self) -> None:
        for _ in range(10):  # until quiet
            moved = False
            for src, dst, name in ((self.a, self.b, "b"), (self.b, self.a, "a")):
                for data in src.datagrams():
                    if not self.link_up or self.rnd.random() < self.loss:
                        continue
                    pkt = parse_packet(data)
                    assert isinstance(pkt, ControlPacket)
                    self.events[name] += dst.receive(pkt.payload, self.now)
                    moved = True
            if not moved:
                return

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + 0.01, 6)
            self.events["a"] += self.a.handle_timeout(self.now)
            self.events["b"] += self.b.handle_timeout(self.now)
            self.deliver()


def started(**kw) -> Pair:
    pair = Pair(**kw)
    pair.a.dial(CID, pair.now)
    pair.deliver()
    return pair


def test_ring_answer_hangup() -> None:
    pair = started(callee_caps=MediaCaps(("vp9", "vp8"), 640, 480, 25))
    assert pair.a.state is CallState.OUTGOING and pair.b.state is CallState.INCOMING
    assert pair.events["a"] == [Ringing()]
    (incoming,) = pair.events["b"]
    assert isinstance(incoming, IncomingCall)
    assert incoming.params == CallParams("vp8", 640, 480, 25)
    assert pair.b.answer(pair.now) == [CallAnswered(incoming.params)]
    pair.deliver()
    assert pair.events["a"][-1] == CallAnswered(CallParams("vp8", 640, 480, 25))
    assert pair.a.state is pair.b.state is CallState.ANSWERED
    pair.run(30.0)  # keepalives keep an idle call up
    assert pair.a.state is pair.b.state is CallState.ANSWERED
    assert pair.a.hangup(pair.now, "bye") == [CallEnded(EndReason.HANGUP_LOCAL, "")]
    pair.deliver()
    assert pair.events["b"][-1] == CallEnded(EndReason.HANGUP_REMOTE, "bye")
    assert pair.a.finished and pair.b.finished
    assert pair.a.hangup(pair.now) == []  # twice is harmless


def test_reject() -> None:
    pair = started()
    pair.b.reject(pair.now, "not now")
    pair.deliver()
    assert pair.events["a"][-1] == CallEnded(EndReason.REJECTED, "not now")
    assert pair.b.end_reason is EndReason.DECLINED and pair.a.finished and pair.b.finished


def test_busy() -> None:
    a = Call()
    a.dial(CID, 0.0)
    (offer_dgram,) = a.datagrams()
    offer = decode_message(parse_packet(offer_dgram).payload)  # type: ignore[union-attr]
    assert isinstance(offer, Offer)
    reply = parse_packet(busy_reply(offer))
    assert a.receive(reply.payload, 0.1) == [CallEnded(EndReason.BUSY)]  # type: ignore[union-attr]
    assert a.finished


def test_unanswered_call_times_out_on_both_sides() -> None:
    pair = started()
    pair.run(RING_TIMEOUT + 1)
    assert pair.events["a"][-1] == CallEnded(EndReason.TIMED_OUT, "no answer")
    assert pair.events["b"][-1] == CallEnded(EndReason.HANGUP_REMOTE, "no answer")  # missed


def test_callee_stops_ringing_when_the_caller_vanishes() -> None:
    pair = started()
    pair.link_up = False
    pair.run(RING_TIMEOUT + 10)
    assert pair.b.end_reason is EndReason.TIMED_OUT
    assert pair.a.end_reason is EndReason.TIMED_OUT


def test_unreachable_callee_fails_after_retransmissions() -> None:
    pair = Pair()
    pair.link_up = False
    pair.a.dial(CID, 0.0)
    pair.run(CONTROL_TIMEOUT + 1)
    assert pair.events["a"] == [CallEnded(EndReason.FAILED, "peer does not answer")]
    assert pair.a.retransmissions >= 4


def test_lost_control_packets_are_retransmitted_until_acknowledged() -> None:
    retransmissions = 0
    for seed in range(5):
        pair = started(loss=0.3, seed=seed)
        pair.run(6.0)
        assert pair.b.state is CallState.INCOMING, seed
        pair.b.answer(pair.now, recording=True)
        pair.run(5.0)
        assert pair.a.state is CallState.ANSWERED, seed
        assert RemoteRecording(True) in pair.events["a"]
        assert sum(isinstance(e, IncomingCall) for e in pair.events["b"]) == 1  # once only
        pair.b.hangup(pair.now)
        pair.run(5.0)
        assert pair.a.end_reason is EndReason.HANGUP_REMOTE, seed
        assert pair.a.finished and pair.b.finished
        retransmissions += pair.a.retransmissions + pair.b.retransmissions
    assert retransmissions > 5


def test_recording_notice_reaches_the_far_end() -> None:
    pair = started()
    pair.b.answer(pair.now)
    pair.deliver()
    pair.a.set_recording(True, pair.now)
    pair.deliver()
    assert pair.events["b"][-1] == RemoteRecording(True) and pair.b.remote_recording
    pair.a.set_recording(False, pair.now)
    pair.deliver()
    assert pair.events["b"][-1] == RemoteRecording(False)


def test_recording_flag_in_the_offer_is_known_while_ringing() -> None:
    pair = Pair()
    pair.a.dial(CID, 0.0, recording=True)
    pair.deliver()
    assert pair.b.remote_recording


def test_path_lost_in_a_call_fails_it_after_the_grace_period() -> None:
    pair = started()
    pair.b.answer(pair.now)
    pair.deliver()
    pair.link_up = False
    pair.run(PATH_GRACE - 1)
    assert pair.a.state is CallState.ANSWERED  # a path switch may still save it
    pair.run(2)
    assert pair.a.end_reason is EndReason.FAILED and pair.a.end_detail == "path lost"


def test_media_counts_as_a_sign_of_life() -> None:
    pair = started()
    pair.b.answer(pair.now)
    pair.deliver()
    pair.link_up = False
    for _ in range(int(PATH_GRACE * 2)):
        pair.run(1.0)
        pair.a.on_peer_activity(pair.now)
    assert pair.a.state is CallState.ANSWERED


def test_no_common_codec_is_rejected_automatically() -> None:
    pair = started(caller_caps=MediaCaps(("av1",)), callee_caps=MediaCaps(("vp8",)))
    assert pair.events["b"] == [CallEnded(EndReason.FAILED, "no common codec")]
    assert pair.events["a"][-1] == CallEnded(EndReason.REJECTED, "no common codec")


def test_negotiation_picks_first_common_codec_and_the_smaller_format() -> None:
    offer = Offer(CID, 1, ("h264", "vp9", "vp8"), 1920, 1080, 60)
    assert negotiate(offer, MediaCaps(("vp8", "vp9"), 1280, 720, 30)) == CallParams(
        "vp9", 1280, 720, 30
    )
    assert negotiate(offer, MediaCaps(("opus",))) is None


def test_misuse_is_a_local_error_and_nonsense_a_remote_one() -> None:
    call = Call()
    with pytest.raises(CallUsageError):
        call.answer(0.0)
    with pytest.raises(CallProtocolError):
        call.receive(Hangup(CID, 1), 0.0)  # no such call
    call.dial(CID, 0.0)
    with pytest.raises(CallUsageError):
        call.dial(CID, 0.0)
    with pytest.raises(CallProtocolError):
        call.receive(Offer(CID, 9, ("vp8",), 640, 480, 30), 0.0)  # we are the caller


def test_transition_table_has_no_exit_from_ended_but_hangup() -> None:
    assert [i for (s, i) in TRANSITIONS if s is CallState.ENDED] == [Input.HANGUP]
    assert all(new is not CallState.IDLE for new in TRANSITIONS.values())


MSG_ID = st.integers(1, 2**32 - 1)
DIM = st.integers(1, 4096)
FPS = st.integers(1, 120)
CODECS = st.lists(st.sampled_from(["vp8", "vp9", "h264"]), min_size=1, max_size=8).map(tuple)
messages = st.one_of(
    st.builds(Offer, st.just(CID), MSG_ID, CODECS, DIM, DIM, FPS, st.booleans()),
    st.builds(
        Answer, st.just(CID), MSG_ID, st.sampled_from(["vp8", "av1"]), DIM, DIM, FPS, st.booleans()
    ),
    st.builds(Reject, st.just(CID), MSG_ID, st.text(max_size=20)),
    st.builds(Busy, st.just(CID)),
    st.builds(Hangup, st.just(CID), MSG_ID, st.text(max_size=20)),
    st.builds(RecordingNotice, st.just(CID), MSG_ID, st.booleans()),
    st.builds(Keepalive, st.just(CID)),
    st.builds(Ack, st.just(CID), MSG_ID),
)


@given(messages)
def test_messages_round_trip(msg: object) -> None:
    data = encode_message(msg)  # type: ignore[arg-type]
    assert decode_message(parse_packet(data).payload) == msg  # type: ignore[union-attr]


@given(st.binary(max_size=300))
def test_garbage_control_payloads_are_typed_errors(data: bytes) -> None:
    with contextlib.suppress(CallProtocolError):
        decode_message(data)


ANY_VALUE = st.one_of(
    st.integers(-5, 2**33),
    st.booleans(),
    st.binary(max_size=17),
    st.text(max_size=70),
    st.lists(st.one_of(st.text(max_size=17), st.integers(-(2**63), 2**64 - 1)), max_size=9),
    st.none(),
    st.sampled_from(["offer", "answer", "reject", "busy", "hangup", "rec", "ka", "ack"]),
)
KEYS = ["v", "k", "c", "m", "a", "codecs", "codec", "w", "h", "fps", "rec", "why", "on", "x"]


@given(messages, st.sampled_from(KEYS), st.one_of(st.just("delete"), ANY_VALUE))
def test_a_valid_message_with_one_field_spoiled_is_a_typed_error(
    msg: object, key: str, value: object
) -> None:
    body = msgpack.unpackb(parse_packet(encode_message(msg)).payload)  # type: ignore
    if value == "delete":
        body.pop(key, None)
    else:
        body[key] = value
    try:
        decoded = decode_message(msgpack.packb(body, use_bin_type=True))
    except CallProtocolError:
        return
    assert decode_message(parse_packet(encode_message(decoded)).payload) == decoded  # type: ignore


@given(st.lists(st.tuples(messages, st.floats(0, 100)), max_size=30), st.booleans())
def test_any_message_sequence_only_raises_protocol_errors(items: list, caller: bool) -> None:
    call = Call()
    if caller:
        call.dial(CID, 0.0)
    for msg, t in sorted(items, key=lambda i: i[1]):
        with contextlib.suppress(CallProtocolError):
            call.receive(msg, t)
        call.handle_timeout(t)
        for data in call.datagrams():
            parse_packet(data)


# --- the trio shell pattern: the sans-IO Call driven by real tasks on a mock clock ---------------


async def _drive(call: Call, inbox, outbox, script) -> list:  # type: ignore[no-untyped-def]
    """A minimal trio shell: feed datagrams and time to the core, send what it wants sent."""
    events: list = []
    while not call.finished:
        # Wake for the core's next timer, or after 100 ms to let the "user" (script) act; a real
        # shell would also wait on a channel of user commands here.
        tick = trio.current_time() + 0.1
        deadline = call.next_timeout()
        with trio.move_on_at(tick if deadline is None else min(deadline, tick)):
            data = await inbox.receive()
            pkt = parse_packet(data)
            if isinstance(pkt, ControlPacket):
                events += call.receive(pkt.payload, trio.current_time())
        now = trio.current_time()
        events += call.handle_timeout(now)
        events += script(call, events, now)
        for dgram in call.datagrams():
            await outbox.send(dgram)
    return events


async def test_a_call_driven_by_trio_tasks(autojump_clock: trio.testing.MockClock) -> None:
    a_to_b_send, a_to_b_recv = trio.open_memory_channel[bytes](16)
    b_to_a_send, b_to_a_recv = trio.open_memory_channel[bytes](16)
    caller, callee = Call(), Call()
    caller.dial(CID, trio.current_time())
    results: dict[str, list] = {}
    t0 = trio.current_time()

    def caller_script(call: Call, events: list, now: float) -> list:
        if call.state is CallState.ANSWERED and now - t0 >= 10:
            return call.hangup(now)
        return []

    def callee_script(call: Call, events: list, now: float) -> list:
        if call.state is CallState.INCOMING and now - t0 >= 3:  # rings for 3 s
            return call.answer(now)
        return []

    async def run(name: str, call: Call, inbox, outbox, script) -> None:  # type: ignore[no-untyped-def]
        results[name] = await _drive(call, inbox, outbox, script)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a", caller, b_to_a_recv, a_to_b_send, caller_script)
        nursery.start_soon(run, "b", callee, a_to_b_recv, b_to_a_send, callee_script)
    assert results["a"][0] == Ringing()
    assert isinstance(results["a"][1], CallAnswered)
    assert results["a"][-1] == CallEnded(EndReason.HANGUP_LOCAL)
    assert isinstance(results["b"][0], IncomingCall)
    assert results["b"][-1] == CallEnded(EndReason.HANGUP_REMOTE)
    assert trio.current_time() - t0 == pytest.approx(10, abs=0.5)
