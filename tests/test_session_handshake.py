"""The handshake's story: who may open a session with whom, and what every attacker gets back."""

from __future__ import annotations

import nacl.bindings
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.identity import Identity
from overlay.session import (
    MAX_HANDSHAKE_PAYLOAD,
    Accepted,
    CookieReceived,
    CookieReply,
    DropReason,
    Established,
    Initiator,
    LocalProtocolError,
    RemoteProtocolError,
    Responder,
)
from overlay.session import handshake as hs
from overlay.session.cookie import COOKIE_EPOCH_SECONDS, mac1_key
from overlay.session.packets import (
    COOKIE_REPLY_SIZE,
    MSG1_EPHEMERAL,
    MSG1_MAC1,
    MSG1_SIZE,
    MSG1_STATIC,
    MSG2_SIZE,
)
from overlay.session.primitives import dh, mac

ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))
CAROL = Identity(bytes(range(2, 34)))
MALLORY = Identity(bytes(range(3, 35)))
SOURCE = ("192.0.2.10", 40000)  # an opaque address: only cookies look at it
T0 = 1_800_000_000 * 10**9  # a wall-clock timestamp in nanoseconds

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def initiate(
    initiator: Identity = ALICE,
    responder: Identity = BOB,
    payload: bytes = b"call me",
    timestamp_ns: int = T0,
    **kwargs: object,
) -> Initiator:
    return Initiator(
        initiator, responder.public_key, payload, 0.0, timestamp_ns=timestamp_ns, **kwargs
    )


def accept(responder: Responder, message: bytes, **kwargs: object) -> Accepted:
    result = responder.receive(message, SOURCE, 0.0, **kwargs)
    assert isinstance(result, Accepted)
    return result


def drop_reason(call: object, *args: object, **kwargs: object) -> DropReason:
    with pytest.raises(RemoteProtocolError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value.reason


# -- the happy path -------------------------------------------------------------------------


@pytest.mark.parametrize(("caller", "callee"), [(ALICE, BOB), (BOB, ALICE)])
def test_full_handshake_both_ways_gives_matching_sessions(caller: Identity, callee: Identity):
    initiator = initiate(caller, callee, payload=b"ice: host 10.0.0.1")
    responder = Responder(callee)
    accepted = accept(responder, initiator.message)
    assert accepted.peer_public_key == caller.public_key
    assert accepted.payload == b"ice: host 10.0.0.1"
    reply = accepted.reply(b"ice: srflx 198.51.100.7", 0.1)
    established = initiator.receive(reply.message, 0.2)
    assert isinstance(established, Established)
    assert established.payload == b"ice: srflx 198.51.100.7"
    mine, theirs = established.session, reply.session
    assert mine.peer_public_key == callee.public_key and theirs.peer_public_key == caller.public_key
    assert (mine.local_index, mine.remote_index) == (theirs.remote_index, theirs.local_index)
    assert mine.handshake_hash == theirs.handshake_hash != b""
    assert theirs.open(mine.seal(b"ping", 1.0), 1.0) == b"ping"
    assert mine.open(theirs.seal(b"pong", 1.0), 1.0) == b"pong"
    assert responder.stats.accepted == 1


def test_each_handshake_has_fresh_keys():
    first = initiate(timestamp_ns=T0)
    second = initiate(timestamp_ns=T0 + 1)
    responder = Responder(BOB)
    s1 = first.receive(accept(responder, first.message).reply(b"", 0.0).message, 0.0)
    s2 = second.receive(accept(responder, second.message).reply(b"", 0.0).message, 0.0)
    assert isinstance(s1, Established) and isinstance(s2, Established)
    assert s1.session.handshake_hash != s2.session.handshake_hash
    assert s1.session.seal(b"same", 0.0) != s2.session.seal(b"same", 0.0)


@pytest.mark.parametrize("size", [0, 1, 500, MAX_HANDSHAKE_PAYLOAD])
def test_messages_have_fixed_sizes_and_never_amplify(size: int):
    initiator = initiate(payload=bytes([7]) * size)
    assert len(initiator.message) == MSG1_SIZE <= 1232
    accepted = accept(Responder(BOB), initiator.message)
    assert accepted.payload == bytes([7]) * size
    reply = accepted.reply(bytes([9]) * size, 0.0)
    assert len(reply.message) == MSG2_SIZE <= len(initiator.message)
    cookie = Responder(BOB).receive(initiator.message, SOURCE, 0.0, under_load=True)
    assert isinstance(cookie, CookieReply)
    assert len(cookie.message) == COOKIE_REPLY_SIZE < len(initiator.message)


# -- who is refused -------------------------------------------------------------------------


def test_msg1_for_another_key_is_dropped_before_any_public_key_work():
    initiator = initiate(ALICE, CAROL)  # Alice thinks she talks to Carol, but Bob receives it
    responder = Responder(BOB)
    assert drop_reason(responder.receive, initiator.message, SOURCE, 0.0) is DropReason.BAD_MAC1
    assert responder.stats.dropped[DropReason.BAD_MAC1] == 1 and responder.stats.accepted == 0


def test_msg1_encrypted_to_another_key_fails_even_with_a_valid_mac1():
    initiator = initiate(ALICE, CAROL)
    message = bytearray(initiator.message[:MSG1_MAC1])
    message += mac(mac1_key(BOB.public_key), bytes(message)) + bytes(16)
    reason = drop_reason(Responder(BOB).receive, bytes(message), SOURCE, 0.0)
    assert reason is DropReason.TAMPERED


def test_msg2_from_the_wrong_responder_is_refused():
    initiator = initiate(ALICE, BOB)
    other = initiate(ALICE, CAROL, local_index=initiator.local_index)
    reply = accept(Responder(CAROL), other.message).reply(b"", 0.0)  # Carol answers, same index
    assert drop_reason(initiator.receive, reply.message, 0.0) is DropReason.TAMPERED
    genuine = accept(Responder(BOB), initiator.message).reply(b"", 0.0)
    assert isinstance(initiator.receive(genuine.message, 0.0), Established)


def test_msg2_must_carry_the_responders_signature():
    initiator = initiate()
    accepted = accept(Responder(BOB), initiator.message)
    accepted._pending.sign = MALLORY.sign  # right keys, wrong signer
    reply = accepted.reply(b"", 0.0)
    assert drop_reason(initiator.receive, reply.message, 0.0) is DropReason.BAD_SIGNATURE


def forge_msg1_as_alice_with_bobs_key(sign, ephemeral_private: bytes = bytes([5]) * 32) -> bytes:
    """Mallory stole Bob's private key and builds a msg1 that claims to come from Alice."""
    ephemeral_public = nacl.bindings.crypto_scalarmult_base(ephemeral_private)
    message, _, _ = hs._build_msg1(
        sender_index=1,
        ephemeral_public=ephemeral_public,
        es=dh(ephemeral_private, BOB.x25519_public),
        ss=dh(BOB.x25519_private, ALICE.x25519_public),  # computable with Bob's key alone
        static_public_key=ALICE.public_key,
        responder_public_key=BOB.public_key,
        timestamp_ns=T0,
        payload=b"it's alice, pick up",
        sign=sign,
    )
    return message + bytes(16)


def test_kci_a_stolen_responder_key_cannot_impersonate_an_initiator():
    responder = Responder(BOB)
    for signer in (MALLORY.sign, BOB.sign):
        forged = forge_msg1_as_alice_with_bobs_key(signer)
        assert drop_reason(responder.receive, forged, SOURCE, 0.0) is DropReason.BAD_SIGNATURE
    assert responder.stats.dropped[DropReason.BAD_SIGNATURE] == 2
    # Control: everything else in the forgery is right, so only Alice's signature is missing.
    assert accept(responder, forge_msg1_as_alice_with_bobs_key(ALICE.sign)).payload


def test_kci_re_encrypting_a_captured_msg1_with_new_content_fails():
    captured = initiate(ALICE, BOB, payload=b"hello").message
    # With Bob's key Mallory can open Alice's msg1 and reuse her ephemeral and signature...
    contents = hs._open_msg1(captured, BOB.x25519_private, BOB.public_key)
    ephemeral = captured[MSG1_EPHEMERAL:MSG1_STATIC]
    forged, _, _ = hs._build_msg1(
        sender_index=2,
        ephemeral_public=ephemeral,
        es=dh(BOB.x25519_private, ephemeral),
        ss=dh(BOB.x25519_private, ALICE.x25519_public),
        static_public_key=ALICE.public_key,
        responder_public_key=BOB.public_key,
        timestamp_ns=T0 + 10**9,  # ...with a newer timestamp and her own payload
        payload=b"transfer the funds",
        sign=lambda _: contents.signature,
    )
    responder = Responder(BOB)
    reason = drop_reason(responder.receive, forged + bytes(16), SOURCE, 0.0)
    assert reason is DropReason.BAD_SIGNATURE


def test_replayed_or_older_msg1_is_refused_and_newer_accepted():
    responder = Responder(BOB)
    first = initiate(timestamp_ns=T0)
    accept(responder, first.message)
    assert drop_reason(responder.receive, first.message, SOURCE, 1.0) is DropReason.REPLAYED
    older = initiate(timestamp_ns=T0 - 1)
    assert drop_reason(responder.receive, older.message, SOURCE, 1.0) is DropReason.REPLAYED
    accept(responder, initiate(timestamp_ns=T0 + 1).message)
    accept(responder, initiate(CAROL, BOB, timestamp_ns=T0 - 5).message)  # per initiator
    assert responder.stats.dropped[DropReason.REPLAYED] == 2


def test_timestamp_table_is_bounded_and_forgets_least_recent():
    responder = Responder(BOB, max_tracked_initiators=2)
    replay = initiate(ALICE, BOB).message
    accept(responder, replay)
    accept(responder, initiate(CAROL, BOB).message)
    accept(responder, initiate(MALLORY, BOB).message)  # Alice is forgotten...
    assert len(responder._latest) == 2
    accept(responder, replay)  # ...so her replay gets through: the documented limit


def test_low_order_ephemeral_is_refused_typed():
    for point in (bytes(32), (1).to_bytes(32, "little")):
        message = bytearray(initiate().message[:MSG1_MAC1])
        message[MSG1_EPHEMERAL:MSG1_STATIC] = point
        message += mac(mac1_key(BOB.public_key), bytes(message)) + bytes(16)
        assert (
            drop_reason(Responder(BOB).receive, bytes(message), SOURCE, 0.0) is DropReason.BAD_KEY
        )


def test_msg2_timeouts_wrong_index_and_double_use():
    initiator = initiate()
    accepted = accept(Responder(BOB), initiator.message)
    reply = accepted.reply(b"", 0.0)
    with pytest.raises(LocalProtocolError):
        accepted.reply(b"", 0.0)
    late = hs.HANDSHAKE_TIMEOUT_SECONDS + 1
    assert drop_reason(initiator.receive, reply.message, late) is DropReason.EXPIRED
    stranger = initiate()
    assert drop_reason(stranger.receive, reply.message, 0.0) is DropReason.UNKNOWN_INDEX
    assert isinstance(initiator.receive(reply.message, 1.0), Established)
    with pytest.raises(LocalProtocolError):
        initiator.receive(reply.message, 1.0)


def test_local_misuse_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        initiate(payload=bytes(MAX_HANDSHAKE_PAYLOAD + 1))
    with pytest.raises(LocalProtocolError):
        Initiator(ALICE, bytes(31), b"", 0.0, timestamp_ns=T0)
    with pytest.raises(LocalProtocolError):
        Initiator(ALICE, bytes(32), b"", 0.0, timestamp_ns=T0)  # not a valid Ed25519 point
    with pytest.raises(LocalProtocolError):
        initiate(timestamp_ns=-1)
    with pytest.raises(LocalProtocolError):
        initiate(cookie=b"short")
    with pytest.raises(LocalProtocolError):
        initiate(local_index=2**32)
    accepted = accept(Responder(BOB), initiate().message)
    with pytest.raises(LocalProtocolError):
        accepted.reply(bytes(MAX_HANDSHAKE_PAYLOAD + 1), 0.0)


# -- cookies under load ---------------------------------------------------------------------


def test_cookie_round_trip_under_load_keeps_no_state():
    responder = Responder(BOB)
    initiator = initiate()
    result = responder.receive(initiator.message, SOURCE, 0.0, under_load=True)
    assert isinstance(result, CookieReply)
    assert responder._latest == {} and responder.stats.accepted == 0
    assert responder.stats.cookie_replies == 1
    retry = initiator.receive(result.message, 0.1)
    assert isinstance(retry, CookieReceived) and retry.message == initiator.message
    accepted = accept(responder, retry.message, under_load=True)
    established = initiator.receive(accepted.reply(b"ok", 0.2).message, 0.3)
    assert isinstance(established, Established) and established.payload == b"ok"


def test_cookie_is_bound_to_source_and_expires():
    responder = Responder(BOB)
    first = initiate()
    reply = responder.receive(first.message, SOURCE, 0.0, under_load=True)
    assert isinstance(reply, CookieReply)
    cookie = first.receive(reply.message, 0.0)
    assert isinstance(cookie, CookieReceived)
    elsewhere = responder.receive(cookie.message, ("198.51.100.1", 1), 0.0, under_load=True)
    assert isinstance(elsewhere, CookieReply)  # from another address the cookie is worthless
    # A cached cookie works for a new handshake in the next epoch, not two epochs later.
    later = initiate(timestamp_ns=T0 + 1, cookie=cookie.cookie)
    assert isinstance(
        responder.receive(later.message, SOURCE, COOKIE_EPOCH_SECONDS, under_load=True), Accepted
    )
    stale = initiate(timestamp_ns=T0 + 2, cookie=cookie.cookie)
    result = responder.receive(stale.message, SOURCE, 2 * COOKIE_EPOCH_SECONDS, under_load=True)
    assert isinstance(result, CookieReply)


def test_cookie_reply_for_someone_else_or_tampered_is_refused():
    responder = Responder(BOB)
    initiator = initiate()
    reply = responder.receive(initiator.message, SOURCE, 0.0, under_load=True)
    assert isinstance(reply, CookieReply)
    stranger = initiate()
    assert drop_reason(stranger.receive, reply.message, 0.0) is DropReason.UNKNOWN_INDEX
    tampered = bytearray(reply.message)
    tampered[-1] ^= 1
    assert drop_reason(initiator.receive, bytes(tampered), 0.0) is DropReason.TAMPERED
    assert drop_reason(initiator.receive, reply.message[:-1], 0.0) is DropReason.TRUNCATED


def test_without_load_mac2_is_ignored():
    initiator = initiate(cookie=bytes(16))  # a junk cookie: mac2 is wrong
    assert isinstance(Responder(BOB).receive(initiator.message, SOURCE, 0.0), Accepted)


# -- garbage never gets in ------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=MSG1_SIZE + 8))
def test_random_bytes_to_responder_are_dropped_typed(data: bytes):
    responder = Responder(BOB)
    with pytest.raises(RemoteProtocolError):
        responder.receive(data, SOURCE, 0.0)
    assert responder.stats.total_dropped == 1 and responder.stats.accepted == 0


GENUINE_MSG1 = initiate(timestamp_ns=T0).message


@SETTINGS
@given(
    position=st.integers(0, MSG1_SIZE - 1),
    flip=st.integers(1, 255),
    fix_mac1=st.booleans(),
    under_load=st.booleans(),
)
def test_any_altered_msg1_is_dropped(position: int, flip: int, fix_mac1: bool, under_load: bool):
    message = bytearray(GENUINE_MSG1)
    message[position] ^= flip
    if fix_mac1 and position < MSG1_MAC1:  # an attacker who knows Bob's key can redo mac1
        message[MSG1_MAC1 : MSG1_MAC1 + 16] = mac(
            mac1_key(BOB.public_key), bytes(message[:MSG1_MAC1])
        )
    responder = Responder(BOB)
    if position >= MSG1_MAC1 + 16 and not under_load:  # mac2 is ignored without load
        assert isinstance(responder.receive(bytes(message), SOURCE, 0.0), Accepted)
        return
    try:
        result = responder.receive(bytes(message), SOURCE, 0.0, under_load=under_load)
    except RemoteProtocolError as e:
        assert responder.stats.dropped[e.reason] == 1
        return
    # The only non-error outcome for an altered message is a cookie reply (no state, no work).
    assert isinstance(result, CookieReply) and under_load and responder._latest == {}


@SETTINGS
@given(cut=st.integers(0, MSG1_SIZE - 1), extra=st.binary(min_size=1, max_size=16))
def test_truncated_or_extended_msg1_is_dropped(cut: int, extra: bytes):
    responder = Responder(BOB)
    assert drop_reason(responder.receive, GENUINE_MSG1[:cut], SOURCE, 0.0) in (
        DropReason.TRUNCATED,
        DropReason.FOREIGN,
    )
    assert drop_reason(responder.receive, GENUINE_MSG1 + extra, SOURCE, 0.0) is DropReason.FOREIGN


@SETTINGS
@given(
    mutation=st.one_of(
        st.binary(max_size=MSG2_SIZE + 4),
        st.tuples(st.integers(0, MSG2_SIZE - 1), st.integers(1, 255)),
        st.integers(0, MSG2_SIZE - 1),
    )
)
def test_garbage_msg2_is_dropped_and_the_genuine_one_still_works(mutation: object):
    initiator = initiate(timestamp_ns=T0)
    genuine = accept(Responder(BOB), initiator.message).reply(b"yes", 0.0).message
    if isinstance(mutation, bytes):
        bad = mutation
    elif isinstance(mutation, tuple):
        position, flip = mutation
        altered = bytearray(genuine)
        altered[position] ^= flip
        bad = bytes(altered)
    else:
        bad = genuine[:mutation]
    with pytest.raises(RemoteProtocolError):
        initiator.receive(bad, 0.0)
    established = initiator.receive(genuine, 0.0)
    assert isinstance(established, Established) and established.payload == b"yes"


@SETTINGS
@given(st.binary(max_size=COOKIE_REPLY_SIZE + 4))
def test_garbage_cookie_reply_is_dropped_and_changes_nothing(data: bytes):
    initiator = initiate()
    before = initiator.message
    with pytest.raises(RemoteProtocolError):
        initiator.receive(bytes([0xE4]) + data, 0.0)
    assert initiator.message == before and initiator.cookie is None
