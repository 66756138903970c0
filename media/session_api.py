"""What the media plane needs from an encrypted peer session, and nothing more.

The overlay (overlay/) owns sessions: handshake, crypto, path selection. The call layer only sends
and receives datagrams on one, so it codes against this Protocol; tests use in-memory fakes, the
daemon hands in its real sessions. Dependencies point down: overlay never imports media.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

# The overlay's own exception, so that its sessions and in-memory fakes raise the same thing.
from overlay.sessions import MAX_APP_DATAGRAM, SessionClosed

# The session carries at most this much plaintext per datagram; media packets (wiremedia
# MAX_PAYLOAD 1100 B + 20 B header) stay below it.
MAX_SESSION_DATAGRAM = MAX_APP_DATAGRAM
PUBLIC_KEY_SIZE = 32  # Ed25519
PATH_KINDS = ("direct", "relayed", "turn")


__all__ = ["MAX_SESSION_DATAGRAM", "PATH_KINDS", "PUBLIC_KEY_SIZE", "PeerSession", "SessionClosed"]


@runtime_checkable
class PeerSession(Protocol):
    """An authenticated, encrypted, unreliable datagram channel to one peer."""

    peer_public_key: bytes  # 32-byte Ed25519 key of the far end (authenticated)
    path_kind: str  # "direct" | "relayed" | "turn"
    path_changes: int  # increments whenever the active path changes
    rtt: float | None  # smoothed RTT of the active path, seconds
    closed: bool

    def send(self, data: bytes) -> None:
        """Send one datagram (<= MAX_SESSION_DATAGRAM); never blocks, may be lost."""
        ...

    async def receive(self) -> bytes:
        """The next datagram from the peer; raises SessionClosed when the session is gone."""
        ...
