"""Typed failures of the session layer, split like h11: our own misuse versus the peer's garbage.

A `RemoteProtocolError` always carries a `DropReason`, so the shell can count and log drops by
cause without parsing messages, and so tests can assert *why* a packet was refused.
"""

from __future__ import annotations

import enum


class DropReason(enum.Enum):
    """Why an incoming packet was refused; every refusal has exactly one."""

    TRUNCATED = "truncated"  # shorter than its kind's fixed layout
    FOREIGN = "foreign"  # not a packet kind (or size) this module owns
    UNKNOWN_INDEX = "unknown_index"  # receiver index names no session / pending handshake here
    BAD_EPOCH = "bad_epoch"  # key epoch neither previous, current nor a few ahead
    TAMPERED = "tampered"  # authentication failed: altered, forged or for another key
    REPLAYED = "replayed"  # authentic, but already seen (transport counter or msg1 timestamp)
    TOO_OLD = "too_old"  # authentic, but behind the replay window
    EXPIRED = "expired"  # the session or pending handshake is past its hard age limit
    BAD_MAC1 = "bad_mac1"  # msg1 not addressed to our key: dropped before any public-key work
    BAD_KEY = "bad_key"  # a public key that is not a usable curve point
    BAD_SIGNATURE = "bad_signature"  # Ed25519 signature over the transcript does not verify
    MALFORMED = "malformed"  # decrypted fine but the plaintext breaks the layout rules


class SessionError(Exception):
    """Base of every error this package raises."""


class LocalProtocolError(SessionError):
    """The caller misused the API (payload too large, replying twice, sealing on a dead session)."""


class RemoteProtocolError(SessionError):
    """The peer (or someone pretending to be it) sent something we refuse; `reason` says why."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
