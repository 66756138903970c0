"""An in-memory PeerSession pair with seeded loss, delay and jitter: media tests and the
deterministic lossy-call benchmark (benchmarks/lossy_call.py) run pipelines over it."""

from __future__ import annotations

import heapq
import itertools
import math
import random

import trio
import trio.testing

from media.pipeline import MediaPipeline
from media.session_api import MAX_SESSION_DATAGRAM, SessionClosed
from overlay.identity import Identity


class FakeSession:
    """One end of an in-memory datagram link with loss, delay and jitter (so also reordering)."""

    def __init__(
        self,
        peer_key: bytes,
        rng: random.Random,
        *,
        loss: float = 0.0,
        delay: float = 0.0,
        jitter: float = 0.0,
    ) -> None:
        self.peer_public_key = peer_key
        self.path_kind = "direct"
        self.path_changes = 0
        self.rtt: float | None = None
        self.closed = False
        self.peer: FakeSession | None = None
        self.loss, self.delay, self.jitter = loss, delay, jitter
        self._rng = rng
        self._inbox: list[tuple[float, int, bytes]] = []
        self._order = itertools.count()
        self._event = trio.Event()
        self.sent = 0
        self.dropped = 0

    def send(self, data: bytes) -> None:
        if self.closed:
            raise SessionClosed("closed")
        assert len(data) <= MAX_SESSION_DATAGRAM
        self.sent += 1
        peer = self.peer
        assert peer is not None
        if peer.closed:
            return
        if self._rng.random() < self.loss:
            self.dropped += 1
            return
        at = trio.current_time() + self.delay + self._rng.uniform(0, self.jitter)
        heapq.heappush(peer._inbox, (at, next(self._order), bytes(data)))
        peer._event.set()

    async def receive(self) -> bytes:
        while True:
            if self.closed:
                raise SessionClosed("closed")
            now = trio.current_time()
            if self._inbox and self._inbox[0][0] <= now:
                return heapq.heappop(self._inbox)[2]
            deadline = self._inbox[0][0] if self._inbox else math.inf
            with trio.move_on_at(deadline):
                await self._event.wait()
            self._event = trio.Event()

    def close(self) -> None:
        for s in (self, self.peer):
            assert s is not None
            s.closed = True
            s._event.set()

    def switch_path(self, kind: str) -> None:
        """The overlay moved the session to another path (both ends see it)."""
        for s in (self, self.peer):
            assert s is not None
            s.path_kind = kind
            s.path_changes += 1


KEY_A = Identity(bytes([1]) * 32).public_key
KEY_B = Identity(bytes([2]) * 32).public_key


def session_pair(seed: int = 1, **link: float) -> tuple[FakeSession, FakeSession]:
    """Two connected ends: `a` (whose peer is B) and `b` (whose peer is A). Each direction draws
    its loss from its own seeded generator, so one end's traffic does not shift the other's."""
    a = FakeSession(KEY_B, random.Random(seed), **link)
    b = FakeSession(KEY_A, random.Random(seed + 1000), **link)
    a.peer, b.peer = b, a
    return a, b


async def pump(session: FakeSession, pipeline: MediaPipeline) -> None:
    """What the call service does for media: read the session, feed the pipeline."""
    try:
        while True:
            data = await session.receive()
            pipeline.handle_datagram(data, trio.current_time())
    except SessionClosed:
        pass


async def start_virtual_call(
    nursery: trio.Nursery,
    sessions: tuple[FakeSession, FakeSession],
    pipes: list[MediaPipeline],
    clock: trio.testing.MockClock,
) -> None:
    """Start both pipelines and their pumps under a MockClock, then let virtual time run. The
    encoders open in worker threads: time is held still until they are up (an autojump would
    otherwise skip the whole call while the threads work)."""
    for s, p in zip(sessions, pipes, strict=True):
        nursery.start_soon(p.run)
        nursery.start_soon(pump, s, p)
    while any(p._video_enc is None or p._audio_enc is None for p in pipes):
        await trio.sleep(0)
    clock.autojump_threshold = 0
