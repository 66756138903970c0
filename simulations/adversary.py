"""Sybil/eclipse and record-poisoning nodes: DhtCore subclasses that lie only where it hurts.

They answer pings honestly (so they get into routing tables like anyone else) and misbehave on
FIND, the request that steers lookups. All Sybils collude through one shared `Coalition`.
Honest nodes keep running the unchanged DhtCore.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from overlay import wire
from overlay.dht import messages as m
from overlay.dht.core import DhtConfig, DhtCore
from overlay.dht.record import PeerRecord, sign_record
from overlay.dht.routing import distance
from overlay.identity import Identity

ECLIPSE = "eclipse"  # answer FIND with the Sybils closest to the target, never a record
DROP = "drop"  # never answer FIND (answer pings, so they stay in tables)
POISON = "poison"  # honest contacts, but attach a forged or replayed (old-sequence) record
MODES = (ECLIPSE, DROP, POISON)


@dataclass
class Coalition:
    mode: str = ECLIPSE
    members: list[tuple[bytes, bytes, wire.Address]] = field(default_factory=list)  # id, pk, addr
    old_records: dict[bytes, PeerRecord] = field(default_factory=dict)  # target id -> captured
    forged_served: int = 0
    replays_served: int = 0

    def closest(self, target: bytes, count: int) -> list[tuple[bytes, wire.Address]]:
        ranked = sorted(self.members, key=lambda mb: distance(mb[0], target))[:count]
        return [(pk, addr) for _, pk, addr in ranked]


class SybilCore(DhtCore):
    """A colluding node; `coalition.mode` picks the attack."""

    coalition: Coalition

    def __init__(
        self,
        identity: Identity,
        config: DhtConfig | None,
        rng: random.Random,
        now: float,
        coalition: Coalition,
    ) -> None:
        super().__init__(identity, config, rng=rng, now=now)
        self.coalition = coalition

    def _on_request(
        self, schema: wire.Schema, body: dict[str, Any], source: wire.Address, size: int, now: float
    ) -> None:
        if schema is not m.FIND:
            super()._on_request(schema, body, source, size, now)
            return
        mode = self.coalition.mode
        if mode == DROP:
            return
        target = body["target"]
        reply: dict[str, Any] = {
            "tx": body["tx"],
            "pk": self.public_key,
            "tok": self._tokens.issue(source, now),
            "obs": wire.pack_address(source),
        }
        if mode == ECLIPSE:
            reply["nodes"] = [
                [pk, wire.pack_address(addr)]
                for pk, addr in self.coalition.closest(target, self.config.k)
                if addr != source
            ]
        else:
            reply["nodes"] = [
                [c.public_key, wire.pack_address(c.address)]
                for c in self.table.closest(target, self.config.k)
                if c.address != source
            ]
            if body["rec"]:
                reply["rec"] = self._poisoned(target, now)
        self._send_response(reply, source, wire.MAX_DATAGRAM)

    def _poisoned(self, target: bytes, now: float) -> list[bytes]:
        """Alternate a replay of the target's captured old record and a forgery of a newer one."""
        old = self.coalition.old_records.get(target)
        if old is not None and self.rng.random() < 0.5:
            self.coalition.replays_served += 1
            return old.to_wire()
        self.coalition.forged_served += 1
        # A "newer" record for the victim's key, signed with our own key: the strongest forgery
        # available without the victim's secret.
        victim_pk = old.public_key if old is not None else self.public_key
        forged = sign_record(self.identity, [("10.250.0.1", 666)], [], 2**62, int(now) + 3000)
        body = wire.unpack(forged.body)
        body["pk"] = victim_pk
        packed = wire.pack(body)
        return [packed, self.identity.sign(b"3bc-peer-record-v1" + packed)]
