import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay import wire
from overlay.dht import messages as m

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=2000))
def test_random_bytes_give_typed_errors(data):
    with contextlib.suppress(wire.WireError):
        m.CODEC.decode(data)


@given(msgpack_values)
def test_random_msgpack_after_kind_byte_gives_typed_errors(value):
    data = bytes([m.KIND_DHT]) + msgpack.packb(value, use_bin_type=True)
    with contextlib.suppress(wire.WireError):
        m.CODEC.decode(data)


@given(st.integers(0, 4), msgpack_values)
def test_wrong_body_for_a_real_type(type_code, body):
    data = bytes([m.KIND_DHT]) + msgpack.packb([wire.PROTOCOL_VERSION, type_code, body])
    with contextlib.suppress(wire.WireError):
        m.CODEC.decode(data)


def test_round_trip_and_strictness():
    body = {"tx": b"12345678", "pk": bytes(32), "target": bytes(32), "rec": True}
    data = m.CODEC.encode(m.FIND, body)
    schema, decoded = m.CODEC.decode(data)
    assert schema is m.FIND and decoded == body
    with pytest.raises(wire.VersionError):
        m.CODEC.decode(bytes([m.KIND_DHT]) + msgpack.packb([2, 2, body]))
    with pytest.raises(wire.UnknownTypeError):
        m.CODEC.decode(bytes([m.KIND_DHT]) + msgpack.packb([1, 99, body]))
    with pytest.raises(wire.SchemaError, match="unknown field"):
        m.CODEC.decode(bytes([m.KIND_DHT]) + msgpack.packb([1, 2, {**body, "evil": 1}]))
    with pytest.raises(wire.SchemaError, match="length"):
        m.CODEC.decode(m.CODEC.encode(m.FIND, {**body, "tx": b"short"}))
    with pytest.raises(wire.OversizeError):
        m.CODEC.decode(bytes([m.KIND_DHT]) + bytes(wire.MAX_DATAGRAM + 1))
    with pytest.raises(wire.MalformedError):
        m.CODEC.decode(b"\x00garbage")


@given(st.binary(min_size=0, max_size=20), st.integers(-5, 70000))
def test_address_field(raw, port):
    check = wire.address()
    try:
        host, p = check([raw, port], "a")
    except wire.SchemaError:
        assert len(raw) not in (4, 16) or not 1 <= port <= 65535
        return
    assert wire.pack_address((host, p)) == [raw, port]
