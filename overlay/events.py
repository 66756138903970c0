"""Fan-out of daemon events to control-socket subscribers, never blocking the daemon."""

from __future__ import annotations

import time
from typing import Any

import trio

# A subscriber that falls this far behind loses events (and is told so) rather than slowing us.
SUBSCRIBER_BUFFER = 256


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[trio.MemorySendChannel[dict[str, Any]]] = set()

    def publish(self, event_type: str, **fields: Any) -> None:
        event = {"type": event_type, "time": time.time(), **fields}
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)

    def subscribe(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        send, receive = trio.open_memory_channel[dict[str, Any]](SUBSCRIBER_BUFFER)
        self._subscribers.add(send)
        return receive
