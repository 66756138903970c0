"""A session's queue of received datagrams: one producer (the socket task), cheap per datagram.

A trio memory channel costs a KI-protected call and a lock-step hand-off per item, which is most
of what the receive path spends outside crypto at media rates. Here a put is a deque append plus
a wake-up only when the reader is parked; the reader takes everything queued in one checkpoint.
Full means drop, as UDP would: a reader that falls behind loses datagrams, it never blocks the
socket.
"""

from __future__ import annotations

from collections import deque

import trio


class InboxClosed(Exception):
    """The inbox was closed and everything queued before that has been read."""


class Inbox:
    __slots__ = ("_closed", "_items", "_lot", "dropped", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0
        self._items: deque[bytes] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: bytes) -> bool:
        """Queue one datagram; False (and counted) when full or closed."""
        if self._closed or len(self._items) >= self.limit:
            self.dropped += 1
            return False
        self._items.append(item)
        if self._lot:
            self._lot.unpark_all()
        return True

    def close(self) -> None:
        self._closed = True
        self._lot.unpark_all()

    async def get_batch(self, max_count: int) -> list[bytes]:
        """At least one datagram, at most `max_count`, oldest first; InboxClosed at the end."""
        await trio.lowlevel.checkpoint_if_cancelled()
        items = self._items
        if items:
            await trio.lowlevel.cancel_shielded_checkpoint()
        while not items:
            if self._closed:
                raise InboxClosed
            await self._lot.park()
        if len(items) <= max_count:
            out = list(items)
            items.clear()
            return out
        return [items.popleft() for _ in range(max_count)]
