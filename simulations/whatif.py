"""Proposed DHT-core fixes, tried in the simulation process only and OFF by default.

The rule is that scenarios run the project's DhtCore unchanged; these patches exist so the lead can
see what a proposed change would buy before making it in overlay/. Every result produced with one
records its name in the JSON (`what_if`).

publish-retry: `DhtCore._finish` stores our own record to the closest nodes the publish lookup
reached. When that lookup reached nobody (the first bootstrap contact answered a ping, the
publish lookup's single query was then lost), nothing stores the record until the next republish,
20 minutes later: the person is unreachable meanwhile. The patch re-runs the publish 2 s later.
"""

from __future__ import annotations

from overlay.dht.core import DhtCore
from overlay.dht.lookup import Lookup

# Matches DhtConfig.bootstrap_retry: the same pause the core already uses before trying again.
RETRY_AFTER = 2.0
PATCHES = ("publish-retry",)
_original_finish = DhtCore._finish


def _finish_with_retry(self: DhtCore, lk: Lookup, now: float) -> None:
    publishing = lk.id == self._publish_lookup and self.own_record is not None
    reached = len(lk.closest_answered())
    _original_finish(self, lk, now)
    if publishing and reached == 0:
        self._republish_at = now + RETRY_AFTER


def install(name: str) -> None:
    if name == "publish-retry":
        DhtCore._finish = _finish_with_retry  # type: ignore[method-assign]
    else:
        raise ValueError(f"unknown what-if patch {name!r}; known: {PATCHES}")
