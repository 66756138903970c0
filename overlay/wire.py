"""The msgpack envelope every overlay message travels in, with strict, size-bounded schemas.

A datagram is `kind byte + msgpack [version, type, body]`. The kind byte lets one UDP socket carry
STUN, DHT, session and relay traffic; the schema check runs before any field reaches protocol
logic, so a hostile datagram can only ever produce a `WireError`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
# The largest datagram we build or accept: below the 1500-byte Ethernet MTU minus IPv6 (40) and
# UDP (8) headers with room for tunnels (WireGuard takes 80 of its own); QUIC uses 1200-1350.
MAX_DATAGRAM = 1400
# Bounds handed to msgpack itself so a tiny datagram cannot declare a huge container.
_MAX_CONTAINER = 64
_MAX_BLOB = MAX_DATAGRAM

Address = tuple[str, int]


class WireError(Exception):
    """A datagram or field from outside is malformed; the daemon drops it and keeps serving."""


class MalformedError(WireError):
    """Not decodable msgpack, or not our envelope shape."""


class VersionError(WireError):
    """An envelope with a protocol version we do not speak."""


class UnknownTypeError(WireError):
    """A message type this layer does not define."""


class SchemaError(WireError):
    """A field is missing, of the wrong type, or out of bounds."""


class OversizeError(WireError):
    """More bytes than any valid message of this kind can have."""


# --- field specs -----------------------------------------------------------------------------


Check = Callable[[Any, str], Any]


def blob(min_len: int = 0, max_len: int = _MAX_BLOB) -> Check:
    def check(value: Any, name: str) -> bytes:
        if not isinstance(value, bytes):
            raise SchemaError(f"{name}: expected bytes, got {type(value).__name__}")
        if not min_len <= len(value) <= max_len:
            raise SchemaError(f"{name}: length {len(value)} outside {min_len}..{max_len}")
        return value

    return check


def integer(lo: int = 0, hi: int = 2**64 - 1) -> Check:
    def check(value: Any, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{name}: expected int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise SchemaError(f"{name}: {value} outside {lo}..{hi}")
        return value

    return check


def boolean() -> Check:
    def check(value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{name}: expected bool")
        return value

    return check


def text(max_len: int = 256) -> Check:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise SchemaError(f"{name}: expected str, got {type(value).__name__}")
        if len(value) > max_len:
            raise SchemaError(f"{name}: longer than {max_len}")
        return value

    return check


def array(item: Check, max_items: int) -> Check:
    def check(value: Any, name: str) -> list[Any]:
        if not isinstance(value, list):
            raise SchemaError(f"{name}: expected list, got {type(value).__name__}")
        if len(value) > max_items:
            raise SchemaError(f"{name}: more than {max_items} items")
        # One name for every item: formatting one per item cost more than checking it.
        each = f"{name}[]"
        return [item(v, each) for v in value]

    return check


def check_address(value: Any, name: str) -> Address:
    """A contact address on the wire: [4- or 16-byte packed ip, port]."""
    if type(value) is not list or len(value) != 2:
        raise SchemaError(f"{name}: expected [ip, port]")
    raw, port = value
    if type(raw) is not bytes or len(raw) not in (4, 16):
        raise SchemaError(f"{name}: ip must be 4 or 16 bytes")
    if type(port) is not int or not 1 <= port <= 65535:
        raise SchemaError(f"{name}: bad port")
    return (_ip_text(raw), port)


def address() -> Check:
    return check_address


# Both caches hold one entry per distinct peer IP seen (~200 B each, so at most ~3 MB): a daemon
# sees a few hundred; the 10k-node simulation runs every node in one process and thrashed 4096.
_IP_CACHE = 16384


@functools.lru_cache(maxsize=_IP_CACHE)
def _ip_text(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


@functools.lru_cache(maxsize=_IP_CACHE)
def pack_ip(ip: str) -> bytes:
    """Packed form of an IPv4 or IPv6 address string (cached: DHT replies repeat contacts)."""
    return ipaddress.ip_address(ip).packed


def pack_address(addr: Address) -> list[Any]:
    return [pack_ip(addr[0]), addr[1]]


@dataclass(frozen=True)
class Field:
    name: str
    check: Check
    required: bool = True


@dataclass(frozen=True)
class Schema:
    """One message type: its number and its fields."""

    name: str
    type_code: int
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        # Every datagram is validated: names and the known-field set are built once, not per call.
        checks = tuple((f.name, f.check, f"{self.name}.{f.name}", f.required) for f in self.fields)
        object.__setattr__(self, "_checks", checks)
        object.__setattr__(self, "_known", frozenset(f.name for f in self.fields))

    def validate(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise SchemaError(f"{self.name}: body must be a map")
        known = self._known  # type: ignore[attr-defined]
        for key in body:
            if key not in known:
                raise SchemaError(f"{self.name}: unknown field {key!r}")
        out: dict[str, Any] = {}
        for key, check, label, required in self._checks:  # type: ignore[attr-defined]
            if key in body:
                out[key] = check(body[key], label)
            elif required:
                raise SchemaError(f"{self.name}: missing field {key!r}")
        return out


def unpack(data: bytes, max_size: int = MAX_DATAGRAM) -> Any:
    """Strict msgpack decoding with every container bounded; any failure is a MalformedError."""
    if len(data) > max_size:
        raise OversizeError(f"{len(data)} bytes exceeds {max_size}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        UnicodeDecodeError,
        RecursionError,
    ) as exc:
        raise MalformedError(f"not msgpack: {exc.__class__.__name__}") from None


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


class Codec:
    """Encodes and decodes one layer's messages behind its kind byte."""

    def __init__(self, kind: int, schemas: list[Schema], max_size: int = MAX_DATAGRAM) -> None:
        self.kind = kind
        self.max_size = max_size
        self._by_code = {s.type_code: s for s in schemas}
        if len(self._by_code) != len(schemas):
            raise ValueError("duplicate type codes")

    def encode(self, schema: Schema, body: Mapping[str, Any]) -> bytes:
        if self._by_code.get(schema.type_code) is not schema:
            raise ValueError(f"{schema.name} is not part of this codec")
        data = bytes([self.kind]) + pack([PROTOCOL_VERSION, schema.type_code, dict(body)])
        if len(data) > self.max_size:
            raise ValueError(f"{schema.name} encodes to {len(data)} B > {self.max_size}")
        return data

    def decode(self, data: bytes) -> tuple[Schema, dict[str, Any]]:
        if not data or data[0] != self.kind:
            raise MalformedError("wrong kind byte")
        envelope = unpack(data[1:], self.max_size)
        if not isinstance(envelope, list) or len(envelope) != 3:
            raise MalformedError("envelope must be [version, type, body]")
        version, type_code, body = envelope
        if version != PROTOCOL_VERSION:
            raise VersionError(f"protocol version {version!r}, we speak {PROTOCOL_VERSION}")
        if not isinstance(type_code, int) or isinstance(type_code, bool):
            raise MalformedError("message type must be an int")
        schema = self._by_code.get(type_code)
        if schema is None:
            raise UnknownTypeError(f"unknown message type {type_code}")
        return schema, schema.validate(body)
