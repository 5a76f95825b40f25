"""zillatw.fetch: bounded bodies, timeouts on the reactor given, one fetch in flight."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import resource, server

from zillatw import fetch


class _Body(resource.Resource):
    """Answers with `size` bytes, either with a Content-Length or chunked (no length)."""
    isLeaf = True

    def __init__(self, size: int, chunked: bool, code: int = 200):
        super().__init__()
        self.size, self.chunked, self.code = size, chunked, code

    def render_GET(self, request: Any) -> Any:
        request.setResponseCode(self.code)
        if not self.chunked:
            request.setHeader(b"content-length", str(self.size).encode())
        request.write(b"x" * self.size)  # without a length set first, Twisted sends it chunked
        request.finish()
        return server.NOT_DONE_YET


class GetTests(unittest.TestCase):
    def serve(self, size: int, chunked: bool = False, code: int = 200) -> str:
        port: Any = reactor.listenTCP(0, server.Site(_Body(size, chunked, code)),  # type: ignore[arg-type]
                                      interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/"

    def get(self, url: str, max_bytes: int) -> defer.Deferred:
        return fetch.get(fetch.agent(reactor), url, headers={b"Accept": [b"text/plain"]}, max_bytes=max_bytes,
                         timeout=10, reactor=reactor)

    @defer.inlineCallbacks
    def test_a_body_within_its_bound(self):
        self.assertEqual((yield self.get(self.serve(1000), 1000)), b"x" * 1000)
        self.assertEqual((yield self.get(self.serve(1000, chunked=True), 1000)), b"x" * 1000)

    @defer.inlineCallbacks
    def test_a_content_length_over_the_bound_is_refused(self):
        failure = yield self.assertFailure(self.get(self.serve(1001), 1000), fetch.FetchError)
        self.assertIn("larger than 1000 bytes", str(failure))

    @defer.inlineCallbacks
    def test_a_chunked_body_is_cut_off_at_the_bound(self):
        failure = yield self.assertFailure(self.get(self.serve(200_000, chunked=True), 1000), fetch.FetchError)
        self.assertIn("larger than 1000 bytes", str(failure))

    @defer.inlineCallbacks
    def test_a_status_other_than_200_fails_with_it(self):
        failure = yield self.assertFailure(self.get(self.serve(10, code=404), 1000), fetch.FetchError)
        self.assertEqual(str(failure), "HTTP 404")

    def test_an_unanswered_fetch_ends_at_its_timeout(self):
        clock = Clock()

        class Silent:
            def request(self, *args: Any) -> defer.Deferred:
                return defer.Deferred()
        fetching = fetch.get(Silent(), "http://x/", headers={}, max_bytes=1, timeout=5, reactor=clock)
        clock.advance(4.9)
        self.assertNoResult(fetching)
        clock.advance(0.1)
        self.failureResultOf(fetching, defer.TimeoutError)


class SingleFlightTests(unittest.TestCase):
    def test_one_fetch_for_every_caller_at_once(self):
        flight, started = fetch.SingleFlight(), []

        def fetching() -> defer.Deferred:
            started.append(defer.Deferred())
            return started[-1]
        waiters = [flight.join(fetching) for _ in range(3)]
        flight.start(fetching)
        self.assertEqual(len(started), 1)
        self.assertTrue(flight.in_flight)
        for waiter in waiters:
            self.assertNoResult(waiter)
        started[0].errback(ValueError("down"))  # a failed flight: every waiter still hears
        for waiter in waiters:
            self.assertIsNone(self.successResultOf(waiter))
        self.assertFalse(flight.in_flight)
        flight.join(fetching)
        self.assertEqual(len(started), 2)  # the next caller starts the next flight

    def test_a_flight_that_ends_at_once_or_raises(self):
        flight = fetch.SingleFlight()
        self.assertIsNone(self.successResultOf(flight.join(lambda: defer.succeed(1))))

        def broken() -> defer.Deferred:
            raise RuntimeError("bug")
        self.assertIsNone(self.successResultOf(flight.join(broken)))
        self.assertFalse(flight.in_flight)
