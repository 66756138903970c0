"""PathSelector: which path a session sends on, fed only ids, kinds and times."""

from overlay.path.selector import PATH_DEAD_AFTER, PathSelector


def test_best_kind_wins_and_equals_do_not_flap_on_rtt():
    sel = PathSelector()
    sel.add("relay:a", "relayed", 0.0, alive=True)
    sel.add("main:x", "direct", 0.1, alive=True)
    assert sel.active == "main:x"
    sel.add("ice:y", "direct", 0.2, alive=True)
    sel.on_rtt("ice:y", 0.001)
    sel.on_rtt("main:x", 0.2)
    sel.tick(0.3)
    assert sel.active == "main:x"  # both alive and direct: keep the one in use


def test_a_dead_path_is_left_within_path_dead_after():
    sel = PathSelector()
    sel.add("main:x", "direct", 0.0, alive=True)
    sel.add("relay:a", "relayed", 0.0, alive=True)
    for t in (0.5, 1.0, 1.5, 2.0):
        sel.on_receive("relay:a", t)
    sel.tick(PATH_DEAD_AFTER + 0.01)
    assert sel.active == "relay:a"


def test_a_peer_at_a_new_address_is_answered_there_at_once():
    """Its NAT rebound: the old path still looks alive for PATH_DEAD_AFTER, but what we send
    there is lost, so the path the peer just showed up on takes over now."""
    sel = PathSelector()
    sel.add("main:old", "direct", 0.0, alive=True)
    sel.add("main:new", "direct", 0.2, alive=True, prefer=True)
    assert sel.active == "main:new"
    sel.on_receive("main:old", 0.3)  # a late packet from the old mapping
    sel.tick(0.4)
    assert sel.active == "main:new"


def test_prefer_never_trades_down_a_kind():
    sel = PathSelector()
    sel.add("main:x", "direct", 0.0, alive=True)
    sel.add("relay:a", "relayed", 0.1, alive=True, prefer=True)
    assert sel.active == "main:x"
    without = PathSelector()
    without.add("main:old", "direct", 0.0, alive=True)
    without.add("main:new", "direct", 0.2, alive=True)
    assert without.active == "main:old"  # the same arrival without prefer keeps the old path
