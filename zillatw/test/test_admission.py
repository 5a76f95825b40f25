"""zillatw.bindings.ws.ratelimits, sans-IO: token buckets and the per-client table, with plain numbers."""

from __future__ import annotations

from twisted.trial import unittest

from zillatw.bindings.ws.ratelimits import ADMITTED, MAX_CLIENTS, Admission, Refusal, TokenBucket, Verdict


class TokenBucketTests(unittest.SynchronousTestCase):
    def test_a_full_bucket_gives_its_burst_then_refills_at_its_rate(self):
        bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
        self.assertEqual([bucket.take(100.0) for _ in range(4)], [True, True, True, False])
        self.assertFalse(bucket.take(100.4))  # 0.8 of a token
        self.assertTrue(bucket.take(100.5))   # 1.0
        self.assertFalse(bucket.take(100.5))

    def test_it_never_holds_more_than_its_burst(self):
        bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
        self.assertEqual([bucket.take(3600.0) for _ in range(3)], [True, True, False])

    def test_retry_after_is_whole_seconds_to_the_next_token(self):
        bucket = TokenBucket(rate=0.25, burst=1, now=0.0)  # one token every 4 s
        self.assertTrue(bucket.take(0.0))
        self.assertFalse(bucket.take(1.0))
        self.assertEqual(bucket.retry_after(), 3)
        self.assertFalse(bucket.take(3.5))
        self.assertEqual(bucket.retry_after(), 1)  # 0.5 s, rounded up
        fast = TokenBucket(rate=100.0, burst=1, now=0.0)
        fast.take(0.0)
        fast.take(0.0)
        self.assertEqual(fast.retry_after(), 1)  # never 0: a client told 0 comes straight back

    def test_a_clock_set_back_neither_refills_nor_drains_and_counts_on_from_there(self):
        bucket = TokenBucket(rate=1.0, burst=2, now=50.0)
        self.assertTrue(bucket.take(50.0))
        self.assertTrue(bucket.take(10.0))  # 40 s back: the token left is still there
        self.assertFalse(bucket.take(10.0))
        self.assertFalse(bucket.take(10.5))
        self.assertTrue(bucket.take(11.0))  # a second after the step, as if nothing had happened

    def test_a_bucket_needs_a_rate_and_a_burst(self):
        self.assertRaises(ValueError, TokenBucket, 0.0, 1, 0.0)
        self.assertRaises(ValueError, TokenBucket, 1.0, 0, 0.0)


class PerClientCapTests(unittest.SynchronousTestCase):
    def test_the_cap_counts_open_connections_of_each_client(self):
        admission = Admission(max_connections=2)
        for _ in range(2):
            self.assertEqual(admission.admit("198.51.100.1", 0.0), ADMITTED)
            self.assertTrue(admission.opened("198.51.100.1"))
        self.assertEqual(admission.admit("198.51.100.1", 0.0), Verdict(Refusal.CONNECTIONS))
        self.assertEqual(admission.admit("198.51.100.2", 0.0), ADMITTED)  # another client is not affected
        admission.closed("198.51.100.1")
        self.assertEqual(admission.admit("198.51.100.1", 0.0), ADMITTED)
        self.assertEqual(admission.refused[Refusal.CONNECTIONS], 1)
        self.assertEqual(Refusal.CONNECTIONS.status, 503)

    def test_counts_never_go_negative_and_closed_clients_leave_the_table(self):
        admission = Admission(max_connections=1)
        admission.opened("a")
        admission.closed("a")
        admission.closed("a")  # a second end of the same connection: nothing below zero
        admission.closed("never-opened")
        self.assertEqual(admission.open_count("a"), 0)
        self.assertEqual(len(admission), 0)  # no bucket to remember: the entry is gone
        admission.opened("a")
        self.assertEqual(admission.admit("a", 0.0), Verdict(Refusal.CONNECTIONS))


class HandshakeRateTests(unittest.SynchronousTestCase):
    def test_each_client_has_its_own_bucket(self):
        admission = Admission(handshake_rate=1.0, handshake_burst=2)
        self.assertEqual([admission.admit("a", 10.0).refusal for _ in range(3)],
                         [None, None, Refusal.HANDSHAKE_RATE])
        self.assertEqual(admission.admit("b", 10.0), ADMITTED)
        self.assertEqual(admission.admit("a", 10.0), Verdict(Refusal.HANDSHAKE_RATE, 1))
        self.assertEqual(admission.admit("a", 11.0), ADMITTED)
        self.assertEqual(admission.refused[Refusal.HANDSHAKE_RATE], 2)
        self.assertEqual(Refusal.HANDSHAKE_RATE.status, 429)

    def test_retry_after_follows_the_rate(self):
        admission = Admission(handshake_rate=0.1, handshake_burst=1)  # one every 10 s
        admission.admit("a", 0.0)
        self.assertEqual(admission.admit("a", 2.0), Verdict(Refusal.HANDSHAKE_RATE, 8))

    def test_a_refused_handshake_takes_no_token(self):
        admission = Admission(handshake_rate=1.0, handshake_burst=1)
        admission.admit("a", 0.0)
        for _ in range(5):
            admission.admit("a", 0.5)
        self.assertEqual(admission.admit("a", 1.0), ADMITTED)

    def test_rate_and_cap_together(self):
        admission = Admission(max_connections=1, handshake_rate=10.0, handshake_burst=10)
        admission.admit("a", 0.0)
        admission.opened("a")
        self.assertEqual(admission.admit("a", 0.0), Verdict(Refusal.CONNECTIONS))
        admission.closed("a")
        self.assertIn("a", admission.clients())  # idle, its bucket kept
        self.assertEqual(admission.admit("a", 0.0), ADMITTED)


class BoundedTableTests(unittest.SynchronousTestCase):
    def test_the_default_bound(self):
        self.assertEqual(Admission().max_clients, MAX_CLIENTS)
        self.assertEqual(MAX_CLIENTS, 65_536)

    def test_many_addresses_never_grow_the_table_beyond_its_bound(self):
        admission = Admission(handshake_rate=1.0, handshake_burst=1, max_clients=100)
        for n in range(10_000):
            self.assertEqual(admission.admit(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", float(n)), ADMITTED)
            self.assertLessEqual(len(admission), 100)
        self.assertEqual(len(admission), 100)
        self.assertEqual(admission.dropped, 9_900)

    def test_the_oldest_idle_entry_is_dropped_first(self):
        admission = Admission(handshake_rate=1.0, handshake_burst=1, max_clients=3)
        for client in ("a", "b", "c"):
            admission.admit(client, 0.0)
        admission.admit("a", 0.1)  # refused, but used: "b" is now the oldest
        admission.admit("d", 0.2)
        self.assertEqual(sorted(admission.clients()), ["a", "c", "d"])
        # "b" lost its (empty) bucket: it starts again with a full one
        self.assertEqual(admission.admit("b", 0.3), ADMITTED)
        self.assertEqual(sorted(admission.clients()), ["a", "b", "d"])

    def test_entries_with_open_connections_are_never_dropped(self):
        admission = Admission(max_connections=5, handshake_rate=1.0, handshake_burst=5, max_clients=2)
        admission.admit("a", 0.0)
        admission.opened("a")
        for n in range(50):  # other clients come and go through the one free slot
            client = f"other{n}"
            self.assertEqual(admission.admit(client, 0.0), ADMITTED)
        self.assertIn("a", admission.clients())
        self.assertEqual(admission.open_count("a"), 1)
        admission.closed("a")
        self.assertEqual(admission.open_count("a"), 0)

    def test_a_table_full_of_busy_clients_refuses_new_ones(self):
        admission = Admission(max_connections=1, handshake_rate=1.0, handshake_burst=1, max_clients=2)
        for client in ("a", "b"):
            admission.admit(client, 0.0)
            admission.opened(client)
        self.assertEqual(admission.admit("c", 0.0), Verdict(Refusal.TOO_MANY_CLIENTS))
        self.assertEqual(len(admission), 2)
        admission.closed("a")
        self.assertEqual(admission.admit("c", 0.0), ADMITTED)  # "a" was idle: dropped for "c"
        self.assertEqual(sorted(admission.clients()), ["b", "c"])

    def test_without_a_rate_only_busy_clients_are_held(self):
        admission = Admission(max_connections=3, max_clients=2)
        for client in ("a", "b"):
            self.assertEqual(admission.admit(client, 0.0), ADMITTED)
            admission.opened(client)
        self.assertEqual(admission.admit("c", 0.0), Verdict(Refusal.TOO_MANY_CLIENTS))
        self.assertFalse(admission.opened("c"))  # not counted: the caller must not close it
        self.assertEqual(admission.refused[Refusal.TOO_MANY_CLIENTS], 2)
        admission.closed("c")
        self.assertEqual(sorted(admission.clients()), ["a", "b"])
        admission.closed("a")
        self.assertTrue(admission.opened("c"))
