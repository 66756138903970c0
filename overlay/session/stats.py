"""Counters the shell exports for monitoring: what was accepted, and every drop by its reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from overlay.session.errors import DropReason


@dataclass
class DropStats:
    """Per-reason drop counts plus the accepted total; drops never raise past the shell."""

    accepted: int = 0
    dropped: Counter[DropReason] = field(default_factory=Counter)

    def drop(self, reason: DropReason) -> None:
        self.dropped[reason] += 1

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())


@dataclass
class TransportStats(DropStats):
    """Transport counters: `sent`/`accepted` packets and key epochs crossed in each direction."""

    sent: int = 0
    send_rekeys: int = 0
    receive_rekeys: int = 0


@dataclass
class HandshakeStats(DropStats):
    """Responder counters: accepted msg1s, cookie replies sent instead of work under load."""

    cookie_replies: int = 0
