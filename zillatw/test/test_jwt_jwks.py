"""The jwt guard's keys from a URL (a JWKS served by twisted.web on loopback): key rotation,
an unknown kid refetching at most once per interval, one fetch shared by concurrent requests
that wait for it, an unreachable JWKS; and JwksKeys' intervals on a Clock.
(Tokens, roles and routes: test_jwt.)"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH

from zillatw.guards.jwt import JwksKeys
from zillatw.test.pki import Signer, guarded_config
from zillatw.test.support import (
    client_frame,
    close_ws,
    connect_raw,
    connect_ws,
    parse_server_frames,
    split_response,
    start_gateway,
    status_of,
    upgrade_request,
    wait,
)


class Jwks(resource.Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.keys: list[dict[str, Any]] = []
        self.requests = 0

        self.delay = 0.0

    def render_GET(self, request):
        self.requests += 1
        request.setHeader(b"content-type", b"application/json")
        body = json.dumps({"keys": self.keys}).encode()
        if not self.delay:
            return body
        reactor.callLater(self.delay, lambda: (request.write(body), request.finish()))
        return server.NOT_DONE_YET


class JwksUrlTests(unittest.TestCase):
    """`keys` as a URL, served by a twisted.web server on loopback."""

    @defer.inlineCallbacks
    def setUp(self):
        self.jwks = Jwks()
        site = server.Site(self.jwks)
        site.noisy = False
        self.listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.listening.stopListening)
        url = f"http://127.0.0.1:{self.listening.getHost().port}/.well-known/jwks.json"
        self.gateway, self.port = yield start_gateway(self, guarded_config(url))
        self.keys = self.gateway.graph.guard("test:jwt0").keys

    @defer.inlineCallbacks
    def _status(self, signer: Signer) -> Any:
        status, _ = yield status_of(self.port, headers={"Authorization": f"Bearer {signer.token()}"})
        return status

    @defer.inlineCallbacks
    def test_rotation_picks_up_a_new_key(self):
        old, new = Signer("RSA", "2026-01"), Signer("EC", "2026-02")
        self.jwks.keys = [old.jwk]
        self.assertEqual(self.jwks.requests, 0)  # fetched on first use
        client = yield connect_ws(self.port, headers={"Authorization": f"Bearer {old.token()}"})
        yield close_ws(client)
        self.assertEqual((yield self._status(old)), 101)
        self.assertEqual(self.jwks.requests, 1)  # cached
        self.keys.min_refresh = 0
        self.jwks.keys = [new.jwk]
        self.assertEqual((yield self._status(new)), 101)  # unknown kid: fetched again
        self.assertEqual(self.jwks.requests, 2)
        self.assertEqual((yield self._status(old)), 403)  # rotated out
        self.assertEqual(self.jwks.requests, 3)

    @defer.inlineCallbacks
    def test_unknown_kids_refetch_at_most_once_per_interval(self):
        known, unknown = Signer("EC", "a"), Signer("EC", "b")
        self.jwks.keys = [known.jwk]
        self.assertEqual((yield self._status(known)), 101)
        self.keys.min_refresh = 60
        self.assertEqual((yield self._status(unknown)), 403)
        self.assertEqual(self.jwks.requests, 1)

    @defer.inlineCallbacks
    def test_concurrent_requests_share_one_fetch(self):
        signer = Signer("EC", "a")
        self.jwks.keys = [signer.jwk]
        statuses = yield defer.gatherResults([self._status(signer) for _ in range(5)])
        self.assertEqual(statuses, [101] * 5)
        self.assertEqual(self.jwks.requests, 1)

    @defer.inlineCallbacks
    def test_request_waits_for_the_fetch_and_keeps_its_bytes(self):
        """While the JWKS is fetched the request waits (the reactor does not): bytes the
        client sends meanwhile reach the WebSocket; a client that leaves meanwhile is no error."""
        signer = Signer("EC", "a")
        self.jwks.keys, self.jwks.delay = [signer.jwk], 0.3
        leaving = yield connect_raw(self.port)
        leaving.transport.write(upgrade_request(headers={"Authorization": f"Bearer {signer.token()}"}))
        client = yield connect_raw(self.port)
        client.transport.write(upgrade_request(headers={"Authorization": f"Bearer {signer.token()}"}))
        yield wait(0.1)
        leaving.transport.loseConnection()
        self.assertEqual(client.data, b"")  # still fetching
        client.transport.write(client_frame(0x1, b"sent while waiting") + client_frame(0x8, b"\x03\xe8"))
        data = yield client.done
        status, _, rest = split_response(data)
        self.assertIn("101", status)
        self.assertEqual([f[2] for f in parse_server_frames(rest)], [b"sent while waiting", b"\x03\xe8"])
        self.assertEqual(self.jwks.requests, 1)

    @defer.inlineCallbacks
    def test_unreachable_jwks_is_403_and_named(self):
        yield self.listening.stopListening()
        self.assertEqual((yield self._status(Signer("EC", "a"))), 403)
        self.assertIn("unknown kid 'a' (JWKS fetch failed:", self.gateway.events_text.getvalue())


class _Answer:
    """A JWKS answer as twisted.web.client's Agent gives one (enough for readBody)."""
    code, phrase, length = 200, b"OK", UNKNOWN_LENGTH

    def __init__(self, body: bytes):
        self.body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class JwksOnAClockTests(unittest.TestCase):
    """JwksKeys' intervals, on the reactor it is given (a Clock), with an agent that answers
    at once (`answer`) or never (None)."""

    def keys(self, answer: bytes | None) -> tuple[Clock, JwksKeys]:
        clock = Clock()

        class Agent:
            def request(self, method: bytes, url: bytes, headers: Any = None) -> defer.Deferred:
                return defer.succeed(_Answer(answer)) if answer is not None else defer.Deferred()
        return clock, JwksKeys("http://keys.example/jwks.json", clock, Agent(), timeout=10, min_refresh=30)

    def test_a_fetch_is_not_repeated_before_min_refresh(self):
        signer = Signer("EC", "a")
        clock, keys = self.keys(json.dumps({"keys": [signer.jwk]}).encode())
        self.successResultOf(keys.refresh())
        self.assertEqual((keys.fetches, list(keys.keys)), (1, ["a"]))
        clock.advance(29.9)
        self.assertFalse(keys.can_refresh())  # an unknown kid meanwhile is refused without a fetch
        clock.advance(0.1)
        self.assertTrue(keys.can_refresh())

    def test_a_fetch_that_is_not_answered_ends_at_the_timeout(self):
        clock, keys = self.keys(None)
        fetched = keys.refresh()
        clock.advance(9.99)
        self.assertNoResult(fetched)
        clock.advance(0.01)
        self.assertIsNone(self.successResultOf(fetched))  # never fails: the error is kept
        self.assertIn("10", keys.error)
