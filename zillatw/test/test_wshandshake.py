"""zillatw.wire.handshake without sockets: check_upgrade's status and reason for each kind of bad
opening handshake (RFC 6455 §4.2.1), offered_protocols parsing, Zilla's select_route rule and
accept_key against the RFC's example."""

from __future__ import annotations

from twisted.trial import unittest

from zillatw.wire.http1 import HttpError, Request, RequestHeadParser, Response
from zillatw.wire.handshake import (
    HandshakeRefused,
    accept_key,
    check_response,
    check_upgrade,
    client_request,
    new_key,
    offered_protocols,
    select_route,
    server_response,
)

VALID = {
    "host": "localhost:7114",
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    "sec-websocket-version": "13",
}


def request(changes: dict[str, str | None] | None = None, method: str = "GET",
            version: tuple[int, int] = (1, 1)) -> Request:
    """A valid upgrade request with some headers changed (None removes one)."""
    headers = dict(VALID)
    for name, value in (changes or {}).items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return Request(method, "/echo", version, headers)


class CheckUpgradeTests(unittest.SynchronousTestCase):
    def refusal(self, req: Request) -> HttpError:
        with self.assertRaises(HttpError) as caught:
            check_upgrade(req)
        return caught.exception

    def assertRefused(self, req: Request, status: int, reason: str) -> None:
        error = self.refusal(req)
        self.assertEqual((error.status, error.reason), (status, reason))

    def test_valid_request_passes(self):
        self.assertIsNone(check_upgrade(request()))

    def test_token_lists_and_case_accepted(self):
        self.assertIsNone(check_upgrade(request({"upgrade": "WebSocket", "connection": "keep-alive, UPGRADE"})))
        self.assertIsNone(check_upgrade(request({"upgrade": "foo/1, websocket"})))

    def test_later_http_1_minor_versions_accepted(self):
        self.assertIsNone(check_upgrade(request(version=(1, 2))))

    def test_missing_upgrade_header_is_400(self):
        self.assertRefused(request({"upgrade": None}), 400,
                           "not a WebSocket request: the Upgrade header is missing")

    def test_upgrade_to_something_else_is_400(self):
        self.assertRefused(request({"upgrade": "h2c"}), 400, "Upgrade: h2c is not websocket")
        self.assertRefused(request({"upgrade": "websockets"}), 400, "Upgrade: websockets is not websocket")

    def test_method_other_than_get_is_400(self):
        self.assertRefused(request(method="POST"), 400, "a WebSocket handshake must use GET, not POST")
        self.assertRefused(request(method="HEAD"), 400, "a WebSocket handshake must use GET, not HEAD")

    def test_http_1_0_is_400(self):
        self.assertRefused(request(version=(1, 0)), 400, "a WebSocket handshake needs HTTP/1.1 or later")

    def test_missing_host_is_400(self):
        self.assertRefused(request({"host": None}), 400, "the Host header is missing")

    def test_connection_without_upgrade_is_400(self):
        reason = "the Connection header must include 'upgrade'"
        self.assertRefused(request({"connection": None}), 400, reason)
        self.assertRefused(request({"connection": "keep-alive"}), 400, reason)
        self.assertRefused(request({"connection": "upgrades"}), 400, reason)

    def test_request_with_a_body_is_400(self):
        reason = "an upgrade request must not have a body"
        self.assertRefused(request({"content-length": "0"}), 400, reason)
        self.assertRefused(request({"transfer-encoding": "chunked"}), 400, reason)

    def test_wrong_version_is_426_naming_13(self):
        error = self.refusal(request({"sec-websocket-version": "8"}))
        self.assertEqual((error.status, error.reason), (426, "Sec-WebSocket-Version 13 is required, got 8"))
        self.assertEqual(error.headers, (("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")))

    def test_missing_version_is_426_naming_13(self):
        error = self.refusal(request({"sec-websocket-version": None}))
        self.assertEqual((error.status, error.reason), (426, "Sec-WebSocket-Version 13 is required"))
        self.assertEqual(error.headers, (("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")))

    def test_version_list_is_426(self):
        self.assertEqual(self.refusal(request({"sec-websocket-version": "13, 8"})).status, 426)

    def test_missing_key_is_400(self):
        error = self.refusal(request({"sec-websocket-key": None}))
        self.assertEqual((error.status, error.reason), (400, "the Sec-WebSocket-Key header is missing"))
        self.assertEqual(error.headers, ())

    def test_invalid_keys_are_400(self):
        reason = "Sec-WebSocket-Key must be 16 bytes in base64"
        for key in ("", "c2hvcnQ=",                     # 5 bytes
                    "AAAAAAAAAAAAAAAAAAAAAAAA",          # 18 bytes
                    "dGhlIHNhbXBsZSBub25jZQ",            # unpadded
                    "dGhlIHNhbXBsZSBub25jZQ=!",          # not base64
                    "dGhlIHNhbXBs ZSBub25jZQ==",         # space inside
                    "dGhlIHNhbXBsZSBub25jZQ\u00e9="):    # not ASCII
            self.assertRefused(request({"sec-websocket-key": key}), 400, reason)

    def test_any_16_byte_key_accepted(self):
        self.assertIsNone(check_upgrade(request({"sec-websocket-key": "AAAAAAAAAAAAAAAAAAAAAA=="})))
        self.assertIsNone(check_upgrade(request({"sec-websocket-key": "/////////////////////w=="})))

    def test_only_the_first_problem_is_reported_in_a_fixed_order(self):
        # Upgrade, method, version, Host, Connection, body, Sec-WebSocket-Version, key.
        everything_wrong = request({"host": None, "connection": None, "sec-websocket-version": None,
                                    "sec-websocket-key": None}, method="POST", version=(1, 0))
        self.assertEqual(self.refusal(everything_wrong).reason, "a WebSocket handshake must use GET, not POST")
        self.assertEqual(self.refusal(request({"sec-websocket-version": "8", "sec-websocket-key": None})).status,
                         426)
        self.assertEqual(self.refusal(request({"host": None, "sec-websocket-version": "8"})).reason,
                         "the Host header is missing")


class OfferedProtocolsTests(unittest.SynchronousTestCase):
    def test_nothing_offered(self):
        self.assertEqual(offered_protocols(None), [])
        self.assertEqual(offered_protocols(""), [])
        self.assertEqual(offered_protocols("  \t "), [])

    def test_one_protocol(self):
        self.assertEqual(offered_protocols("echo"), ["echo"])

    def test_commas_with_or_without_spaces(self):
        self.assertEqual(offered_protocols("chat,superchat"), ["chat", "superchat"])
        self.assertEqual(offered_protocols("chat, superchat"), ["chat", "superchat"])
        self.assertEqual(offered_protocols("  chat \t,\t superchat  ,v2.echo "), ["chat", "superchat", "v2.echo"])

    def test_empty_items_dropped(self):
        self.assertEqual(offered_protocols("chat,,superchat,"), ["chat", "superchat"])
        self.assertEqual(offered_protocols(", , ,"), [])

    def test_order_and_case_kept(self):
        self.assertEqual(offered_protocols("B, a, Chat"), ["B", "a", "Chat"])

    def test_space_alone_does_not_separate(self):
        self.assertEqual(offered_protocols("chat superchat"), ["chat superchat"])


def resolver(routes: list[tuple[str | None, str]]):
    """Zilla's per-protocol resolution over (protocol pattern or None for any, name) routes:
    the first route whose protocol matches; a configured protocol never matches None."""
    calls: list[str | None] = []

    def resolve(protocol: str | None):
        calls.append(protocol)
        for index, (pattern, name) in enumerate(routes):
            if pattern is None or pattern == protocol:
                return index, name
        return None

    return resolve, calls


class SelectRouteTests(unittest.SynchronousTestCase):
    def test_nothing_offered_resolves_once_with_none(self):
        resolve, calls = resolver([("echo", "echo_route"), (None, "any_route")])
        self.assertEqual(select_route([], resolve), ("any_route", None))
        self.assertEqual(calls, [None])

    def test_nothing_offered_never_matches_a_protocol_route(self):
        resolve, _ = resolver([("echo", "echo_route")])
        self.assertIsNone(select_route([], resolve))

    def test_first_route_wins_over_offer_order(self):
        resolve, calls = resolver([("echo", "echo_route"), ("chat", "chat_route")])
        self.assertEqual(select_route(["chat", "echo"], resolve), ("echo_route", "echo"))
        self.assertEqual(calls, ["chat", "echo"])

    def test_earlier_offer_breaks_a_tie_on_one_route(self):
        resolve, _ = resolver([(None, "any_route")])
        self.assertEqual(select_route(["chat", "echo"], resolve), ("any_route", "chat"))

    def test_unrouted_offers_ignored(self):
        resolve, _ = resolver([("echo", "echo_route")])
        self.assertEqual(select_route(["mqtt", "echo", "chat"], resolve), ("echo_route", "echo"))

    def test_no_offer_routed_is_none(self):
        resolve, calls = resolver([("echo", "echo_route")])
        self.assertIsNone(select_route(["chat", "mqtt"], resolve))
        self.assertEqual(calls, ["chat", "mqtt"])  # never resolved with None once something is offered

    def test_route_index_not_list_position_decides(self):
        # resolve may return any route index; only the index counts, not which offer came first.
        indexes = {"a": (5, "r5"), "b": (2, "r2"), "c": (2, "r2-again")}
        self.assertEqual(select_route(["a", "b", "c"], indexes.get), ("r2", "b"))


class AcceptKeyTests(unittest.SynchronousTestCase):
    def test_rfc_6455_example(self):
        self.assertEqual(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_other_key(self):
        # the example in Wikipedia's WebSocket article
        self.assertEqual(accept_key("x3JJHMbDL1EzLkh9GBhXDw=="), "HSmrc0sMlYUkAGmm5OPpG2HaGWk=")


class OwnHeadsTests(unittest.SynchronousTestCase):
    """The heads zillatw writes (a server's 101, a client's upgrade) and the check of an
    upstream's answer."""

    def test_the_101(self):
        head = server_response("dGhlIHNhbXBsZSBub25jZQ==", "chat", "permessage-deflate").decode()
        self.assertEqual(head, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                               "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n"
                               "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
        self.assertNotIn("Sec-WebSocket-Protocol", server_response("a2V5", None, None).decode())

    def test_the_upgrade_request(self):
        key = new_key()
        self.assertNotEqual(key, new_key())
        request = RequestHeadParser().feed(client_request("/a?b=1", "up.example:8080", key, ("x", "y"),
                                                          "permessage-deflate", {"origin": "https://o.example"}))
        check_upgrade(request)  # what we send passes our own server's checks
        self.assertEqual((request.target, request.headers["host"], request.headers["sec-websocket-protocol"],
                          request.headers["origin"]), ("/a?b=1", "up.example:8080", "x, y", "https://o.example"))
        self.assertNotIn("user-agent", request.headers)
        with self.assertRaises(HttpError):
            client_request("/", "h", key, headers={"x": "caf\u00e9"})

    def answer(self, key: str, **headers: str) -> Response:
        fields = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-accept": accept_key(key), **headers}
        return Response(101, "Switching Protocols", (1, 1), {k: v for k, v in fields.items() if v})

    def test_the_check_of_an_answer(self):
        key = new_key()
        self.assertIsNone(check_response(self.answer(key), key, ()))
        self.assertEqual(check_response(self.answer(key, **{"sec-websocket-protocol": "y"}), key, ("x", "y")), "y")
        for response, why in [(Response(200, "OK", (1, 1), {}), "answered 200 OK"),
                              (self.answer(key, upgrade=""), "Upgrade"),
                              (self.answer(key, connection="keep-alive"), "Connection"),
                              (self.answer(new_key()), "Accept"),
                              (self.answer(key, **{"sec-websocket-protocol": "z"}), "'z'")]:
            with self.assertRaises(HandshakeRefused) as raised:
                check_response(response, key, ("x", "y"))
            self.assertIn(why, str(raised.exception))
