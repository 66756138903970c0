"""The simulator and every scenario at toy sizes: each must run and give sane, true answers.

Sizes are small so the whole file stays well under a minute; the figures in
simulations/results/ come from the scenarios' default (larger) runs.
"""

from __future__ import annotations

import pytest

from overlay.dht.record import RecordError, parse_record, sign_record
from overlay.identity import Identity
from simulations import adversary, connectivity, dht_attack, dhtrun, fastcrypto
from simulations.netsim import NetConfig, Network

SMALL = 150


@pytest.fixture(scope="module")
def small_net() -> Network:
    net = Network(NetConfig(seed=11))
    dhtrun.build(net, SMALL, settle=35.0)
    return net


def test_lookups_succeed_without_attack(small_net: Network) -> None:
    work = dhtrun.run_lookups(small_net, 60, 20.0)
    row = dhtrun.summarise(small_net, work)
    assert row["lookups"] == 60
    assert row["success"] >= 0.95
    assert row["found_too_late"] == 0.0
    assert row["hops_median"] <= 3
    assert 0 < row["latency_median_s"] < 5.0
    assert row["bytes_per_lookup_median"] > 0
    assert row["records_per_node_mean"] >= 1  # every node holds at least its own record


def test_a_lookup_past_the_deadline_counts_as_late_not_found(
    small_net: Network, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dhtrun, "LOOKUP_DEADLINE", 0.0)  # every lookup takes longer than this
    row = dhtrun.summarise(small_net, dhtrun.run_lookups(small_net, 30, 10.0))
    assert row["success"] == 0.0 and row["current_record"] == 0.0
    assert row["found_too_late"] >= 0.9


def test_churn_keeps_population_and_lookups_work() -> None:
    net = Network(NetConfig(seed=12, churn_per_hour=3.0))  # extreme: 300 % per hour
    dhtrun.build(net, 100, settle=35.0)
    net.run_for(300.0)
    assert net.departures > 10
    assert len(net.alive) == 100
    row = dhtrun.summarise(net, dhtrun.run_lookups(net, 40, 20.0))
    assert row["success"] >= 0.85


def test_timer_heap_is_not_a_scan(small_net: Network) -> None:
    """A quiet second costs only the wake-ups due in it, not one per node."""
    before = small_net.datagrams
    small_net.run_for(1.0)
    assert small_net.datagrams - before < SMALL


def test_fast_crypto_still_refuses_forgeries() -> None:
    fastcrypto.install()
    victim, attacker = Identity(bytes(range(32))), Identity(bytes(range(1, 33)))
    fastcrypto.public_key_for(victim.seed)
    fastcrypto.public_key_for(attacker.seed)
    genuine = sign_record(victim, [("10.0.0.1", 1)], [], 5, 2_000_000_000)
    assert parse_record(genuine.to_wire()).seq == 5
    forged = sign_record(attacker, [("10.0.0.2", 2)], [], 6, 2_000_000_000)
    body = forged.body.replace(attacker.public_key, victim.public_key)
    with pytest.raises(RecordError):
        parse_record([body, attacker.sign(b"3bc-peer-record-v1" + body)])
    with pytest.raises(RecordError):
        parse_record([genuine.body, bytes(64)])


def test_attack_scenario_small() -> None:
    payload = dht_attack.main(
        ["--nodes", "150", "--fractions", "0.25", "--lookups", "30", "--window", "15"]
    )
    rows = {(r["mode"], r["paths"]): r for r in payload["rows"]}
    assert not any("error" in r for r in rows.values())
    for paths in dht_attack.PATHS:
        poison = rows[(adversary.POISON, paths)]
        assert poison["forged_accepted"] == 0  # signatures hold whatever the paths
        assert poison["forged_served"] > 0  # ...and forgeries really were offered
    # With a quarter of the nodes hostile, disjoint-path lookups still find the record.
    for mode in (adversary.ECLIPSE, adversary.DROP, adversary.POISON):
        assert rows[(mode, max(dht_attack.PATHS))]["success"] >= 0.9, mode


def test_connectivity_pairs() -> None:
    shares = connectivity.DEFAULT_SHARES
    pairs = connectivity.pair_shares(shares)
    assert pairs["direct"] + pairs["relay"] == pytest.approx(1.0)
    none = connectivity.simulate(2000, shares, 0.0, 10, 0.1, 1)
    assert none["calls"]["failed_no_relay"] == pytest.approx(none["calls"]["failed_no_relay"])
    assert none["calls"]["relay"] == 0
    assert none["calls"]["failed_no_relay"] > 0.3
    all_public = connectivity.simulate(500, {connectivity.PUBLIC: 1.0}, 1.0, 10, 0.2, 1)
    assert all_public["calls"]["direct"] == 1.0
    some = connectivity.simulate(2000, shares, 0.5, 10, 0.1, 1)
    assert some["calls"]["failed_no_relay"] == 0
    assert some["relay_load_calls_max"] <= 10


def test_baseline_small_on_loopback() -> None:
    from simulations import baseline

    payload = baseline.main(["--nodes", "8", "--lookups", "5"])
    ours, theirs = payload["ours"], payload["kademlia"]
    assert ours["success"] == 1.0
    assert ours["forged_value"]["verdict"] == "refused"
    assert ours["forged_value"]["forged_stores_rejected"] > 0
    assert ours["malformed"]["still_serving"]
    assert theirs["forged_value"]["verdict"] == "ACCEPTED"
    assert ours["bytes_per_lookup"] > 0


def test_oracle_build_fills_every_bucket_from_the_live_population() -> None:
    """The oracle start gives each node min(k, nodes in range) contacts per bucket (checked
    against a brute-force scan), publishes every record through the protocol, and lookups work."""
    from overlay.dht.routing import bucket_index

    net = Network(NetConfig(seed=13))
    dhtrun.build_oracle(net, SMALL, settle=35.0)
    for node in net.alive[:20]:
        table = node.core.table
        per_bucket: dict[int, int] = {}
        for other in net.alive:
            if other is not node:
                index = bucket_index(table.self_id, other.core.node_id)
                per_bucket[index] = per_bucket.get(index, 0) + 1
        for index, count in per_bucket.items():
            assert len(table.buckets[index].contacts) == min(count, table.k), index
        assert len(table) == sum(min(c, table.k) for c in per_bucket.values())
    held = [n.core.store.get(net.alive[0].core.node_id, net.now) for n in net.alive]
    assert sum(r is not None for r in held) >= 15, "the first node's record reached its replicas"
    row = dhtrun.summarise(net, dhtrun.run_lookups(net, 40, 10.0))
    assert row["success"] >= 0.95
