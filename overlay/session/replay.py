"""Sliding replay window over transport counters (RFC 6479's idea, as a Python int bitmap).

Fed only counters of packets that already decrypted, so forged packets can never move the window
or mark a counter as seen.
"""

from __future__ import annotations

from overlay.session.errors import DropReason, RemoteProtocolError

# 2048 packets is ~1 s of a 720p call at ~2000 pkt/s: reordering on real paths (multipath, relay
# switch) stays far below that, and WireGuard uses the same order (8192 bits in Linux, 2048 in Go).
REPLAY_WINDOW = 2048
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1
_TRIM_AT = 2 * REPLAY_WINDOW


class ReplayWindow:
    """Accepts each counter at most once; counters behind the window are refused as too old."""

    __slots__ = ("_bitmap", "_top")

    def __init__(self) -> None:
        self._top = -1  # highest counter accepted so far; -1: none yet
        self._bitmap = 0  # bit i set: counter (top - i) was accepted

    @property
    def highest(self) -> int:
        return self._top

    def check(self, counter: int) -> None:
        """Raise if `counter` was seen or is too old, without changing anything."""
        if counter > self._top:
            return
        offset = self._top - counter
        if offset >= REPLAY_WINDOW:
            raise RemoteProtocolError(DropReason.TOO_OLD, f"counter {counter} behind the window")
        if self._bitmap >> offset & 1:
            raise RemoteProtocolError(DropReason.REPLAYED, f"counter {counter} already seen")

    def accept(self, counter: int) -> None:
        """Check and record `counter`; call only for authenticated packets."""
        top = self._top
        if counter > top:
            shift = counter - top
            # A jump past the whole window clears it; never shift by an attacker-sized amount.
            if shift >= REPLAY_WINDOW:
                self._bitmap = 1
            else:
                bitmap = (self._bitmap << shift) | 1
                # Bits past the window are never read (check() refuses those offsets first), so
                # trimming them can wait until they double the bitmap: one big-int op, not two,
                # on the per-packet path.
                if bitmap.bit_length() > _TRIM_AT:
                    bitmap &= _WINDOW_MASK
                self._bitmap = bitmap
            self._top = counter
            return
        self.check(counter)
        self._bitmap |= 1 << (top - counter)
