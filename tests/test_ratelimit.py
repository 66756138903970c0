"""Per-key rate limiting: forgetting idle keys must never change an answer."""

from hypothesis import example, given
from hypothesis import strategies as st

from overlay.ratelimit import KeyedLimiter, TokenBucket

gaps = st.one_of(st.just(0.0), st.floats(0, 0.3), st.floats(0.9, 3))
steps = st.lists(st.tuples(st.integers(0, 2), gaps), max_size=300)


@given(steps)
@example([(0, 0.0)] * 4 + [(1, 1.0)] + [(0, 0.0)] * 3)  # drained, then half refilled: still known
def test_forgetting_full_buckets_gives_the_same_answers_as_keeping_all(sequence):
    limiter = KeyedLimiter(rate=2.0, burst=4.0)
    reference: dict[int, TokenBucket] = {}
    now = 0.0
    for key, dt in sequence:
        now += dt
        want = reference.setdefault(key, TokenBucket(2.0, 4.0, now)).allow(now)
        assert limiter.allow(key, now) == want


def test_idle_sources_are_forgotten():
    limiter = KeyedLimiter(rate=50.0, burst=200.0)
    for i in range(1000):
        limiter.allow(("203.0.113.1", i), i * 0.01)  # a new source every 10 ms
    assert len(limiter) <= 410, "only sources heard within one refill time (4 s) are kept"
    assert len(limiter) >= 399
