"""Which of a session's paths carries its packets: liveness by probes, preference by kind.

A session may hold several paths at once — the daemon socket straight to the peer, an ICE pair,
blind relays, a TURN allocation. Each is probed; a path is alive while authenticated packets
arrive on it. The active path is the best alive one (direct before TURN before relays, then
lowest RTT), so a relayed session moves to direct as soon as a punch succeeds, and a dead relay is
left within PATH_DEAD_AFTER — inside the 3 s the product promises.
"""

from __future__ import annotations

from dataclasses import dataclass

# Probe every path twice a second: ~60 B per probe, cheap next to media, and fast enough that a
# dead path is noticed in 1.5 s (three missed probes) and the switch happens well within 3 s.
PROBE_INTERVAL = 0.5
PATH_DEAD_AFTER = 1.5
# A fresh path that never answered is given up after this long (a relay that never joins).
PATH_SETUP_GRACE = 10.0
KIND_PREFERENCE = {"direct": 0, "turn": 1, "relayed": 2}


@dataclass
class PathState:
    path_id: str
    kind: str
    created: float
    last_rx: float | None = None
    last_probe: float | None = None
    rtt: float | None = None

    def alive(self, now: float) -> bool:
        return self.last_rx is not None and now - self.last_rx < PATH_DEAD_AFTER


class PathSelector:
    def __init__(self) -> None:
        self.paths: dict[str, PathState] = {}
        self.active: str | None = None
        self.changes = 0

    def add(
        self, path_id: str, kind: str, now: float, alive: bool = False, prefer: bool = False
    ) -> None:
        """`prefer` (with `alive`): take this path now over an alive one of the same kind — the
        peer just showed up at a new address (its NAT rebound), so the old one is likely dead,
        and waiting PATH_DEAD_AFTER to find out would lose what we send meanwhile."""
        if kind not in KIND_PREFERENCE:
            raise ValueError(f"unknown path kind {kind!r}")
        if path_id not in self.paths:
            self.paths[path_id] = PathState(path_id, kind, now)
        if alive:
            self.paths[path_id].last_rx = now
            current = self.paths.get(self.active) if self.active else None
            if (
                prefer
                and self.active != path_id
                and (current is None or KIND_PREFERENCE[kind] <= KIND_PREFERENCE[current.kind])
            ):
                self.active = path_id
                self.changes += 1
        self._choose(now)

    def remove(self, path_id: str, now: float) -> None:
        self.paths.pop(path_id, None)
        self._choose(now)

    def on_receive(self, path_id: str, now: float) -> None:
        """Called per authenticated packet: cheap unless the path just came (back) alive."""
        state = self.paths.get(path_id)
        if state is not None:
            was_alive = state.alive(now)
            state.last_rx = now
            if not was_alive:
                self._choose(now)

    def on_rtt(self, path_id: str, sample: float) -> None:
        state = self.paths.get(path_id)
        if state is not None:
            state.rtt = sample if state.rtt is None else 0.8 * state.rtt + 0.2 * sample

    def due_probes(self, now: float) -> list[str]:
        due = []
        for state in self.paths.values():
            if state.last_probe is None or now - state.last_probe >= PROBE_INTERVAL:
                state.last_probe = now
                due.append(state.path_id)
        return due

    def expire(self, now: float) -> list[str]:
        """Drop paths that never came alive within the grace period; returns their ids."""
        gone = [
            s.path_id
            for s in self.paths.values()
            if s.last_rx is None and now - s.created > PATH_SETUP_GRACE
        ]
        for path_id in gone:
            del self.paths[path_id]
        if gone:
            self._choose(now)
        return gone

    def tick(self, now: float) -> None:
        self._choose(now)

    def any_alive(self, now: float) -> bool:
        return any(s.alive(now) for s in self.paths.values())

    def silent_for(self, now: float) -> float:
        """How long since any path carried anything: the session is stranded beyond a limit."""
        heard = [s.last_rx for s in self.paths.values() if s.last_rx is not None]
        return now - max(heard) if heard else float("inf")

    @property
    def active_kind(self) -> str | None:
        state = self.paths.get(self.active) if self.active else None
        return state.kind if state else None

    @property
    def active_rtt(self) -> float | None:
        state = self.paths.get(self.active) if self.active else None
        return state.rtt if state else None

    def _choose(self, now: float) -> None:
        alive = [s for s in self.paths.values() if s.alive(now)]
        if alive:
            best = min(
                alive, key=lambda s: (KIND_PREFERENCE[s.kind], s.rtt if s.rtt is not None else 1.0)
            )
            current = self.paths.get(self.active) if self.active else None
            if (
                current is not None
                and current.alive(now)
                and KIND_PREFERENCE[current.kind] == KIND_PREFERENCE[best.kind]
            ):
                best = current  # no flapping between equals (two relays) on RTT noise
            choice: str | None = best.path_id
        elif self.active in self.paths:
            choice = self.active  # nothing better: keep trying the last one
        else:
            heard = [s for s in self.paths.values() if s.last_rx is not None]
            pool = heard or list(self.paths.values())
            choice = max(pool, key=lambda s: s.last_rx or s.created).path_id if pool else None
        if choice != self.active:
            self.active = choice
            self.changes += 1
