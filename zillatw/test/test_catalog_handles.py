"""zillatw.catalogs.SchemaHandle on a Clock: when a cached schema is refreshed (max-age), how a
failed fetch backs off (1 s, doubling up to max-age) while the stale value serves, and one
fetch shared by everyone waiting. The registries over loopback: test_validation_registries."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from zillatw.catalogs import Resolved, SchemaHandle


class Registry:
    """A fetch the test answers: each call is a Deferred in `pending`."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def fetch(self) -> defer.Deferred:
        self.pending.append(defer.Deferred())
        return self.pending[-1]

    def answer(self, schema_id: int) -> None:
        self.pending.pop(0).callback(Resolved(schema_id, "{}"))

    def fail(self) -> None:
        self.pending.pop(0).errback(ConnectionError("registry down"))


class SchemaHandleTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry()
        self.handle = SchemaHandle("subject order version latest", self.registry.fetch, self.clock.seconds, 10.0)

    def test_one_fetch_for_everyone_waiting(self) -> None:
        waiting = [self.handle.ensure() for _ in range(3)]
        self.assertEqual(len(self.registry.pending), 1)
        self.registry.answer(1)
        self.assertEqual([self.successResultOf(d) for d in waiting], [Resolved(1, "{}")] * 3)
        self.assertEqual(self.handle.fetches, 1)

    def test_a_cached_schema_is_refreshed_after_max_age_and_serves_meanwhile(self) -> None:
        self.handle.ensure()
        self.registry.answer(1)
        self.clock.advance(9.9)
        self.assertEqual(self.handle.current(), Resolved(1, "{}"))
        self.assertEqual(self.registry.pending, [])  # still fresh: no fetch
        self.clock.advance(0.1)
        self.assertEqual(self.handle.current(), Resolved(1, "{}"))  # stale: served, and refreshed
        self.assertEqual(len(self.registry.pending), 1)
        self.handle.current()
        self.assertEqual(len(self.registry.pending), 1)  # one refresh at a time
        self.registry.answer(2)
        self.assertEqual(self.handle.current(), Resolved(2, "{}"))

    def test_a_failed_fetch_backs_off_doubling_up_to_max_age(self) -> None:
        retries = []
        self.handle.ensure()
        for _ in range(6):
            self.registry.fail()
            self.assertIsNone(self.successResultOf(self.handle.ensure()))  # within the backoff: no fetch
            self.assertEqual(self.registry.pending, [])
            started = self.clock.seconds()
            while not self.registry.pending:
                self.clock.advance(0.25)
                self.handle.ensure()
            retries.append(self.clock.seconds() - started)
        self.assertEqual(retries, [1.0, 2.0, 4.0, 8.0, 10.0, 10.0])
        self.assertIn("registry down", self.handle.error or "")

    def test_a_failed_refresh_keeps_the_stale_schema_and_success_ends_the_backoff(self) -> None:
        self.handle.ensure()
        self.registry.answer(1)
        self.clock.advance(10)
        self.handle.current()
        self.registry.fail()
        self.assertEqual(self.handle.current(), Resolved(1, "{}"))  # stale, within the backoff
        self.assertEqual(self.registry.pending, [])
        self.clock.advance(1)
        self.handle.current()
        self.registry.answer(2)
        self.assertIsNone(self.handle.error)
        self.clock.advance(9.9)
        self.handle.current()
        self.assertEqual(self.registry.pending, [])  # fresh for max-age again, no backoff left
