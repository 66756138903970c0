"""Typed errors of the path layer, split like h11's: misuse of the API versus garbage from outside.

The daemon catches `RemotePathError` per datagram and keeps serving; a `LocalPathError` is a bug
in the caller and should surface loudly.
"""

from __future__ import annotations


class PathError(Exception):
    """Base of every error raised by `overlay.path`."""


class LocalPathError(PathError):
    """The caller misused the API (wrong state, bad argument): a bug on our side."""


class RemotePathError(PathError):
    """Input from outside (a datagram, a signalling message) is malformed or unacceptable."""


class StunParseError(RemotePathError):
    """A datagram that claimed to be STUN could not be parsed."""


class RelayParseError(RemotePathError):
    """A relay datagram is malformed (bad kind, bad length, bad field)."""


class IceSignalError(RemotePathError):
    """The remote ICE description (ufrag, pwd, candidates) received by signalling is invalid."""


class IceFailed(PathError):
    """No candidate pair could be nominated within the allowed time."""
