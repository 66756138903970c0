"""The STUN reflector: silent to small or bad requests, answers padded ones, never amplifies."""

from __future__ import annotations

import contextlib
import struct

import aioice.ice
from aioice import stun
from hypothesis import given
from hypothesis import strategies as st

from overlay.path import stun_reflector as sr
from overlay.path.errors import IceSignalError, StunParseError
from overlay.path.ice import RemoteIceInfo

SOURCE = ("203.0.113.7", 40000)


def bare_request() -> bytes:
    return bytes(stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST))


def test_bare_request_gets_no_answer_because_the_answer_would_be_larger() -> None:
    data = bare_request()
    assert len(data) == 20
    assert sr.is_stun(data)
    assert sr.answer(data, SOURCE) is None


def test_padded_request_gets_the_source_address_back_no_larger_than_the_request() -> None:
    request = sr.padded_binding_request()
    data = bytes(request)
    assert len(data) == sr.PADDED_REQUEST_SIZE
    reply = sr.answer(data, SOURCE)
    assert reply is not None and len(reply) <= len(data)
    message = sr.parse(reply)
    assert message.message_class == stun.Class.RESPONSE
    assert message.transaction_id == request.transaction_id
    assert message.attributes["XOR-MAPPED-ADDRESS"] == SOURCE
    assert "FINGERPRINT" in message.attributes


def test_ipv6_source_fits_in_the_padded_size() -> None:
    reply = sr.answer(bytes(sr.padded_binding_request()), ("2001:db8::1", 5, 0, 0))
    assert reply is not None and len(reply) <= sr.PADDED_REQUEST_SIZE
    assert sr.parse(reply).attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::1", 5)


def test_only_binding_requests_are_answered() -> None:
    for method, cls in (
        (stun.Method.BINDING, stun.Class.INDICATION),
        (stun.Method.BINDING, stun.Class.RESPONSE),
        (stun.Method.ALLOCATE, stun.Class.REQUEST),
    ):
        message = stun.Message(message_method=method, message_class=cls)
        sr.pad_binding_request(message)
        assert sr.answer(bytes(message), SOURCE) is None


def test_other_protocols_are_not_stun() -> None:
    for first in (0xD0, 0xE1, 0xF1):
        assert not sr.is_stun(bytes([first]) + bytes(sr.padded_binding_request())[1:])
    wrong_cookie = bytearray(bytes(sr.padded_binding_request()))
    wrong_cookie[4] ^= 0xFF
    assert not sr.is_stun(bytes(wrong_cookie))


def test_keepalive_indication_is_stun_and_never_answered() -> None:
    data = sr.binding_indication()
    assert sr.is_stun(data) and len(data) == 28
    assert sr.answer(data, SOURCE) is None


def test_ice_check_answered_only_with_our_credentials() -> None:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    request.attributes["USERNAME"] = "ours:theirs"
    request.attributes["PRIORITY"] = 1
    request.attributes["ICE-CONTROLLING"] = 7
    request.add_message_integrity(b"p" * 22)
    data = bytes(request)
    reply = sr.answer_ice_check(data, SOURCE, "ours", "p" * 22)
    assert reply is not None and len(reply) <= len(data)
    response = sr.parse(reply)
    assert response.check_message_integrity(b"p" * 22)
    assert sr.answer_ice_check(data, SOURCE, "ours", "q" * 22) is None  # wrong password
    assert sr.answer_ice_check(data, SOURCE, "other", "p" * 22) is None  # not our ufrag


def test_install_padded_client_is_idempotent_and_wraps_aioice() -> None:
    sr.install_padded_stun_client()
    sr.install_padded_stun_client()
    assert aioice.ice.server_reflexive_candidate is sr._padded_server_reflexive_candidate


@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_reflector(data: bytes) -> None:
    reply = sr.answer(data, SOURCE)
    assert reply is None or len(reply) <= len(data)
    # Without our password nothing can carry a valid MESSAGE-INTEGRITY.
    assert sr.answer_ice_check(data, SOURCE, "ufrg", "p" * 22) is None


@given(st.binary(max_size=120), st.integers(0, 0xFFFF))
def test_random_stun_bodies_give_typed_errors(body: bytes, message_type: int) -> None:
    """Valid header + random attributes: parse either succeeds or raises StunParseError."""
    body = body + bytes(-len(body) % 4)
    data = struct.pack("!HHI12s", message_type & 0x3FFF, len(body), sr.MAGIC_COOKIE, bytes(12))
    data += body
    with contextlib.suppress(StunParseError):
        sr.parse(data)
    reply = sr.answer(data, SOURCE)
    assert reply is None or len(reply) <= len(data)


@given(
    st.dictionaries(
        st.sampled_from(["ufrag", "pwd", "candidates", "x"]),
        st.one_of(
            st.text(max_size=40),
            st.lists(st.text(max_size=60), max_size=4),
            st.integers(),
            st.none(),
        ),
    )
)
def test_remote_ice_info_rejects_garbage_with_a_typed_error(data: dict[str, object]) -> None:
    with contextlib.suppress(IceSignalError):
        RemoteIceInfo.from_dict(data)


@given(st.lists(st.text(alphabet="0123456789abcdef .:typhostrflx", max_size=80), max_size=3))
def test_remote_candidates_garbage_is_typed(lines: list[str]) -> None:
    with contextlib.suppress(IceSignalError):
        RemoteIceInfo.from_dict({"ufrag": "abcd", "pwd": "a" * 22, "candidates": lines})


def test_remote_ice_info_accepts_a_real_description() -> None:
    info = RemoteIceInfo.from_dict(
        {
            "ufrag": "abcd",
            "pwd": "a" * 22,
            "candidates": ["1 1 udp 2130706431 10.0.0.1 5000 typ host"],
        }
    )
    assert info.candidates[0].endswith("typ host")
