"""zillatw.bindings.tcp.upstreams, sans-IO: selection (smooth weighted round-robin, weighted
least-connections), the health state machine, and membership across reloads."""

from __future__ import annotations

from collections import Counter

from twisted.trial import unittest

from zillatw.bindings.tcp.upstreams import (
    MAX_UPSTREAMS,
    Balance,
    Health,
    HealthCheck,
    HealthSettings,
    Pool,
    PoolStates,
    Transition,
    Upstream,
)

A, B, C = Upstream("10.0.0.1", 80), Upstream("10.0.0.2", 80), Upstream("10.0.0.3", 80)


def picks(pool: Pool, count: int, hold: bool = False) -> list[str]:
    """The hosts `count` new streams go to; with `hold`, each stays open (least-connections)."""
    chosen = []
    for _ in range(count):
        upstream = pool.choose()
        assert upstream is not None
        if hold:
            pool.acquire(upstream)
        chosen.append(upstream.host)
    return chosen


class RoundRobinTests(unittest.SynchronousTestCase):
    def test_equal_weights_take_turns_in_order(self):
        self.assertEqual(picks(Pool([A, B, C]), 6), [A.host, B.host, C.host] * 2)

    def test_weights_interleave_smoothly_as_nginx(self):
        """nginx's example: weights 5, 1, 1 give a a b a c a a, not five a's in a row."""
        pool = Pool([Upstream("a", 1, 5), Upstream("b", 1, 1), Upstream("c", 1, 1)])
        self.assertEqual(picks(pool, 14), list("aabacaa") * 2)

    def test_weights_share_streams_in_proportion(self):
        pool = Pool([Upstream("a", 1, 1), Upstream("b", 1, 2)])
        self.assertEqual(Counter(picks(pool, 300)), {"a": 100, "b": 200})

    def test_a_down_upstream_is_skipped_and_the_others_keep_turns(self):
        settings = HealthSettings(fails=1)
        pool = Pool([A, B, C], settings=settings)
        self.assertEqual(pool.connect_failed(B), Transition.WENT_DOWN)
        self.assertEqual(picks(pool, 4), [A.host, C.host] * 2)

    def test_excluded_upstreams_are_not_chosen_and_none_is_left(self):
        pool = Pool([A, B])
        for _ in range(4):
            self.assertEqual(pool.choose([A.key]), B)
        self.assertIsNone(pool.choose([A.key, B.key]))

    def test_all_down_none_is_chosen(self):
        pool = Pool([A, B], settings=HealthSettings(fails=1))
        pool.connect_failed(A)
        pool.connect_failed(B)
        self.assertIsNone(pool.choose())
        self.assertEqual(pool.available(), [])


class LeastConnectionsTests(unittest.SynchronousTestCase):
    def test_one_hundred_long_streams_split_evenly(self):
        pool = Pool([A, B], Balance.LEAST_CONNECTIONS)
        self.assertEqual(Counter(picks(pool, 100, hold=True)), {A.host: 50, B.host: 50})

    def test_weights_one_to_two_split_a_third_to_two_thirds(self):
        pool = Pool([Upstream("a", 1, 1), Upstream("b", 1, 2)], Balance.LEAST_CONNECTIONS)
        counts = Counter(picks(pool, 100, hold=True))
        self.assertEqual(counts, {"a": 33, "b": 67})
        self.assertEqual(pool.state(Upstream("b", 1, 2)).active, 67)

    def test_the_least_loaded_gets_the_next_stream(self):
        pool = Pool([A, B, C], Balance.LEAST_CONNECTIONS)
        picks(pool, 6, hold=True)  # two each
        pool.release(B)
        self.assertEqual(pool.choose(), B)
        pool.acquire(B)
        pool.release(C)
        pool.release(C)
        self.assertEqual(picks(pool, 2, hold=True), [C.host, C.host])

    def test_ties_are_broken_by_round_robin(self):
        pool = Pool([A, B, C], Balance.LEAST_CONNECTIONS)
        self.assertEqual(picks(pool, 6), [A.host, B.host, C.host] * 2)  # none held: always a tie

    def test_release_never_goes_below_zero(self):
        pool = Pool([A])
        pool.release(A)
        self.assertEqual(pool.state(A).active, 0)


class HealthCheckTests(unittest.SynchronousTestCase):
    settings = HealthSettings(fails=2, passes=2)

    def test_fails_in_a_row_take_it_down_a_success_between_resets(self):
        check = HealthCheck()
        self.assertEqual(check.failed(self.settings), Transition.NONE)
        self.assertEqual(check.passed(self.settings), Transition.NONE)
        self.assertEqual(check.failed(self.settings), Transition.NONE)
        self.assertEqual(check.state, Health.UP)
        self.assertEqual(check.failed(self.settings), Transition.WENT_DOWN)
        self.assertEqual(check.state, Health.DOWN)
        self.assertEqual(check.failed(self.settings), Transition.NONE)  # down stays down

    def test_passes_in_a_row_bring_it_up_a_failure_between_resets(self):
        check = HealthCheck()
        check.failed(self.settings)
        check.failed(self.settings)
        self.assertEqual(check.passed(self.settings), Transition.NONE)
        self.assertEqual(check.failed(self.settings), Transition.NONE)
        self.assertEqual(check.passed(self.settings), Transition.NONE)
        self.assertEqual(check.passed(self.settings), Transition.WENT_UP)
        self.assertEqual(check.state, Health.UP)
        # up again, it needs `fails` failures anew
        self.assertEqual(check.failed(self.settings), Transition.NONE)

    def test_rejoin_brings_a_down_one_back_and_leaves_an_up_one(self):
        check = HealthCheck()
        self.assertEqual(check.rejoin(), Transition.NONE)
        check.failed(HealthSettings(fails=1))
        self.assertEqual(check.rejoin(), Transition.WENT_UP)
        self.assertEqual(check.state, Health.UP)

    def test_pool_counts_failures_and_downs(self):
        pool = Pool([A], settings=HealthSettings(fails=2))
        pool.connect_failed(A)
        pool.probe_failed(A)  # probes and real connects count toward the same run
        state = pool.state(A)
        self.assertEqual((state.up, state.connect_failures, state.downs), (False, 1, 1))


class MembershipTests(unittest.SynchronousTestCase):
    def test_a_removed_upstream_drains_keeps_its_count_and_is_forgotten_when_idle(self):
        states = PoolStates()
        old = Pool([A, B], states=states)
        states.adopt([A.key, B.key])
        old.acquire(B)
        old.acquire(B)
        new = Pool([A], states=states)
        self.assertEqual(states.adopt([A.key]), [B.key])
        self.assertTrue(states.state(B.key).draining)
        self.assertEqual(states.state(B.key).active, 2)
        # the old configuration's pool sends no new stream there either
        self.assertEqual({old.choose().host for _ in range(4)}, {A.host})
        self.assertEqual(new.choose(), A)
        old.release(B)
        self.assertIn(B.key, states.known())
        old.release(B)
        self.assertEqual(states.known(), [A.key])
        # forgotten, it stays out of the old pool's choices and is not known again
        self.assertEqual({old.choose().host for _ in range(4)}, {A.host})
        self.assertEqual(states.known(), [A.key])

    def test_health_and_load_carry_over_to_the_next_configuration(self):
        states = PoolStates()
        old = Pool([A, B], Balance.LEAST_CONNECTIONS, HealthSettings(fails=1), states)
        old.connect_failed(A)
        old.acquire(B)
        new = Pool([A, B, C], Balance.LEAST_CONNECTIONS, HealthSettings(fails=1), states)
        states.adopt([A.key, B.key, C.key])
        self.assertFalse(new.state(A).up)
        self.assertEqual(new.choose(), C)  # B has a live stream, A is down

    def test_a_relisted_upstream_stops_draining(self):
        states = PoolStates()
        Pool([A, B], states=states).acquire(B)
        states.adopt([A.key])
        states.adopt([A.key, B.key])
        self.assertFalse(states.state(B.key).draining)


class BoundsTests(unittest.SynchronousTestCase):
    def test_pool_size_is_bounded_and_an_upstream_is_listed_once(self):
        self.assertRaises(ValueError, Pool, [])
        self.assertRaises(ValueError, Pool, [Upstream("h", p) for p in range(1, MAX_UPSTREAMS + 2)])
        self.assertRaises(ValueError, Pool, [A, Upstream(A.host, A.port, 3)])

    def test_address_brackets_ipv6(self):
        self.assertEqual(Upstream("::1", 8080).address, "[::1]:8080")
        self.assertEqual(A.address, "10.0.0.1:80")
