"""The http server's access-control (Zilla's `options.access-control`): the decisions of
zillatw.bindings.http.accesscontrol on header dicts, then the policy end to end over loopback sockets,
including the cross-site WebSocket hijacking it exists to stop."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from zillatw import ConfigError, build_gateway
from zillatw.bindings.http.accesscontrol import AccessControl, Policy, normalise_origin
from zillatw.test.pki import Signer, guarded_config
from zillatw.test.support import (
    ReactorTimer,
    RecordingClient,
    chain,
    client_frame,
    close_ws,
    raw_exchange,
    split_response,
    start_gateway,
    upgrade_request,
    when_opened,
)


def request(origin: str | None = None, scheme: str = "http", authority: str = "app.example.com:80",
            method: str = "GET", **headers: str) -> dict[str, str]:
    """zillatw's view of a request (as pseudo_headers() makes it), with an Origin or none."""
    result = {":method": method, ":scheme": scheme, ":authority": authority, ":path": "/",
              **{name.replace("_", "-"): value for name, value in headers.items()}}
    if origin is not None:
        result["origin"] = origin
    return result


def cross_origin(**access: Any) -> AccessControl:
    return AccessControl({"policy": "cross-origin", **access})


class NormaliseOriginTests(unittest.TestCase):
    def test_default_ports_are_made_explicit_and_case_is_folded(self):
        for origin, expected in [("https://App.Example.COM", "https://app.example.com:443"),
                                 ("http://app.example.com", "http://app.example.com:80"),
                                 ("http://app.example.com:80", "http://app.example.com:80"),
                                 ("http://app.example.com:8080", "http://app.example.com:8080"),
                                 ("https://app.example.com:0443", "https://app.example.com:443"),
                                 ("http://[::1]", "http://[::1]:80"),
                                 ("http://[::1]:9000", "http://[::1]:9000"),
                                 ("HTTP://[FE80::1]:8080", "http://[fe80::1]:8080"),
                                 ("null", "null"), ("NULL", "null"),
                                 ("https://a.example/path", "https://a.example/path"),
                                 ("chrome-extension://abcdef", "chrome-extension://abcdef")]:
            self.assertEqual(normalise_origin(origin), expected, origin)


class SameOriginTests(unittest.TestCase):
    """The default policy: only the request's own scheme and authority."""

    def setUp(self):
        self.access = AccessControl(None)

    def test_absent_options_mean_same_origin(self):
        self.assertIs(self.access.policy, Policy.SAME_ORIGIN)
        self.assertIs(AccessControl({}).policy, Policy.SAME_ORIGIN)

    def test_a_request_without_origin_is_not_affected(self):
        self.assertTrue(self.access.allows(request(None)))
        self.assertIsNone(self.access.refusal(request(None)))

    def test_the_requests_own_origin_passes_with_default_ports_and_any_case(self):
        for origin, scheme, authority in [("http://app.example.com", "http", "app.example.com:80"),
                                          ("http://app.example.com:80", "http", "app.example.com:80"),
                                          ("HTTP://APP.example.com", "http", "app.example.com:80"),
                                          ("http://app.example.com", "http", "App.Example.Com:80"),
                                          ("https://app.example.com", "https", "app.example.com:443"),
                                          ("https://app.example.com:443", "https", "app.example.com:443"),
                                          ("http://app.example.com:8080", "http", "app.example.com:8080"),
                                          ("http://[::1]:8080", "http", "[::1]:8080"),
                                          ("http://[::1]", "http", "[::1]:80"),
                                          ("http://127.0.0.1:9000", "http", "127.0.0.1:9000")]:
            headers = request(origin, scheme, authority)
            self.assertTrue(self.access.allows(headers), (origin, scheme, authority))
            self.assertTrue(self.access.is_same_origin(headers))

    def test_any_other_origin_is_refused(self):
        for origin, scheme, authority in [("https://evil.example.net", "http", "app.example.com:80"),
                                          ("https://app.example.com", "http", "app.example.com:80"),  # scheme
                                          ("http://app.example.com", "https", "app.example.com:443"),
                                          ("http://app.example.com:8080", "http", "app.example.com:80"),  # port
                                          ("http://app.example.com", "http", "app.example.com:8080"),
                                          ("http://app.example.com.evil.net", "http", "app.example.com:80"),
                                          ("http://[::2]:8080", "http", "[::1]:8080"),
                                          ("http://app.example.com/", "http", "app.example.com:80"),  # a path
                                          ("null", "http", "app.example.com:80")]:
            headers = request(origin, scheme, authority)
            self.assertFalse(self.access.allows(headers), (origin, scheme, authority))
            self.assertEqual(self.access.refusal(headers),
                             f"origin {origin} is not allowed (access-control policy same-origin)")

    def test_an_origin_on_a_request_without_host_is_refused(self):
        headers = request("http://app.example.com")
        del headers[":authority"]
        self.assertFalse(self.access.allows(headers))

    def test_a_long_origin_is_shortened_in_the_refusal(self):
        refusal = self.access.refusal(request("https://" + "a" * 5000 + ".example"))
        self.assertLess(len(refusal), 300)
        self.assertIn("...", refusal)

    def test_same_origin_answers_carry_no_cors_headers(self):
        self.assertEqual(self.access.response_headers(request("http://app.example.com"), ["x-custom"]), [])
        self.assertEqual(self.access.response_headers(request(None), ["x-custom"]), [])


class CrossOriginTests(unittest.TestCase):
    def test_without_a_list_every_origin_is_allowed_null_included(self):
        access = cross_origin()
        for origin in ("https://anywhere.example.net", "null", "http://localhost:3000"):
            self.assertTrue(access.allows(request(origin)), origin)

    def test_listed_origins_only_with_default_ports_case_and_wildcards(self):
        access = cross_origin(allow={"origins": ["https://app.example.com", "http://localhost:8080",
                                                 "https://*.example.org", "http://127.0.0.1:*"]})
        for origin in ("https://app.example.com", "https://app.example.com:443", "HTTPS://App.Example.Com",
                       "http://localhost:8080", "https://chat.example.org", "https://a.b.example.org",
                       "http://127.0.0.1:5173", "http://127.0.0.1",
                       "http://app.example.com"):  # the request's own origin needs no listing
            self.assertTrue(access.allows(request(origin)), origin)
        for origin in ("https://app.example.com:8443", "http://localhost", "http://localhost:8081",
                       "https://example.org", "https://chat.example.org:8443", "https://app.example.com.evil.net",
                       "https://evil.net", "null"):
            self.assertFalse(access.allows(request(origin)), origin)
            self.assertIn("policy cross-origin", access.refusal(request(origin)))

    def test_two_origins_are_not_one_a_pattern_could_name(self):
        access = cross_origin(allow={"origins": ["http://localhost:*", "https://*.example.org"]})
        for origin in ("http://localhost:1, https://evil.net", "https://evil.net, https://a.example.org",
                       "http://localhost:1 https://evil.net"):
            self.assertFalse(access.allows(request(origin)), origin)
        self.assertFalse(AccessControl().allows(request("http://app.example.com, http://app.example.com")))

    def test_null_is_allowed_when_listed(self):
        access = cross_origin(allow={"origins": ["null"]})
        self.assertTrue(access.allows(request("null")))
        self.assertFalse(access.allows(request("https://evil.net")))

    def test_a_star_entry_allows_every_origin(self):
        self.assertTrue(cross_origin(allow={"origins": ["*"]}).allows(request("https://evil.net")))

    def test_answer_headers_wildcard_without_a_list(self):
        access = cross_origin()
        self.assertEqual(access.response_headers(request("https://other.example"), ["content-type", "x-trace"]),
                         [("Access-Control-Allow-Origin", "*"), ("Access-Control-Expose-Headers", "*")])
        self.assertEqual(access.response_headers(request("https://other.example"), ["content-type", "date"]),
                         [("Access-Control-Allow-Origin", "*")])

    def test_answer_headers_name_a_listed_origin_and_vary_on_it(self):
        access = cross_origin(allow={"origins": ["https://other.example"]}, expose={"headers": ["x-trace"]})
        self.assertEqual(access.response_headers(request("https://other.example"),
                                                 ["content-type", "x-trace", "x-internal", ":status"]),
                         [("Access-Control-Allow-Origin", "https://other.example"),
                          ("Access-Control-Expose-Headers", "x-trace"),
                          ("Vary", "Origin")])

    def test_answer_headers_with_credentials(self):
        access = cross_origin(allow={"credentials": True})
        self.assertEqual(access.response_headers(request("https://other.example"), ["x-trace", "X-Other"]),
                         [("Access-Control-Allow-Origin", "https://other.example"),
                          ("Access-Control-Allow-Credentials", "true"),
                          ("Access-Control-Expose-Headers", "x-trace, x-other"),
                          ("Vary", "Origin")])

    def test_no_answer_headers_for_a_refused_or_same_origin_request(self):
        access = cross_origin(allow={"origins": ["https://other.example"]})
        self.assertEqual(access.response_headers(request("https://evil.example")), [])
        self.assertEqual(access.response_headers(request("http://app.example.com")), [])


class PreflightTests(unittest.TestCase):
    def preflight(self, origin: str | None = "https://other.example", **headers: str) -> dict[str, str]:
        return request(origin, method="OPTIONS", **headers)

    def test_what_is_a_preflight(self):
        self.assertTrue(AccessControl.is_preflight(self.preflight(access_control_request_method="PUT")))
        self.assertTrue(AccessControl.is_preflight(self.preflight(access_control_request_headers="x-a")))
        self.assertFalse(AccessControl.is_preflight(self.preflight()))  # a plain OPTIONS
        self.assertFalse(AccessControl.is_preflight(self.preflight(None, access_control_request_method="PUT")))
        self.assertFalse(AccessControl.is_preflight(request("https://other.example",
                                                            access_control_request_method="PUT")))

    def test_allow_all_answers_with_wildcards_and_max_age(self):
        access = cross_origin(**{"max-age": 600})
        status, headers = access.preflight(self.preflight(access_control_request_method="PUT",
                                                          access_control_request_headers="X-A, x-b"))
        self.assertEqual(status, 204)
        self.assertEqual(headers, [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", "*"),
                                   ("Access-Control-Allow-Headers", "*"), ("Access-Control-Max-Age", "600")])

    def test_explicit_lists_echo_what_was_asked(self):
        access = cross_origin(allow={"origins": ["https://other.example"], "methods": ["GET", "PUT"],
                                     "headers": ["X-A", "x-b"]})
        status, headers = access.preflight(self.preflight(access_control_request_method="PUT",
                                                          access_control_request_headers="x-a,X-B"))
        self.assertEqual(status, 204)
        self.assertEqual(headers, [("Access-Control-Allow-Origin", "https://other.example"),
                                   ("Access-Control-Allow-Methods", "PUT"),
                                   ("Access-Control-Allow-Headers", "x-a, x-b"), ("Vary", "Origin")])

    def test_credentials_are_named_on_the_preflight_answer(self):
        access = cross_origin(allow={"credentials": True})
        status, headers = access.preflight(self.preflight(access_control_request_method="POST"))
        self.assertEqual(status, 204)
        self.assertEqual(headers, [("Access-Control-Allow-Origin", "https://other.example"),
                                   ("Access-Control-Allow-Credentials", "true"),
                                   ("Access-Control-Allow-Methods", "POST"), ("Vary", "Origin")])

    def test_refused_preflights(self):
        access = cross_origin(allow={"origins": ["https://other.example"], "methods": ["GET"], "headers": ["x-a"]})
        for headers in (self.preflight("https://evil.example", access_control_request_method="GET"),
                        self.preflight(access_control_request_method="DELETE"),
                        self.preflight(access_control_request_method="get"),  # methods are case-sensitive
                        self.preflight(access_control_request_headers="x-a, x-evil")):  # every header must be
            self.assertEqual(access.preflight(headers), (403, []), headers)

    def test_same_origin_refuses_a_foreign_preflight(self):
        access = AccessControl()
        self.assertEqual(access.preflight(self.preflight(access_control_request_method="PUT")), (403, []))
        status, headers = access.preflight(self.preflight("http://app.example.com",
                                                          access_control_request_method="PUT"))
        self.assertEqual(status, 204)
        self.assertEqual(headers[0], ("Access-Control-Allow-Origin", "http://app.example.com"))


def with_access(config: dict[str, Any], access: dict[str, Any] | None) -> dict[str, Any]:
    if access is not None:
        config["bindings"]["http0"].setdefault("options", {})["access-control"] = access
    return config


class ConfigTests(unittest.TestCase):
    def problems(self, config: dict[str, Any]) -> str:
        with self.assertRaises(ConfigError) as raised:
            build_gateway(config)
        return "\n".join(raised.exception.problems)

    def test_zillas_shapes_are_accepted(self):
        for access in ({"policy": "same-origin"}, {"policy": "cross-origin"},
                       {"policy": "cross-origin", "allow": {"origins": ["https://a.example", "null"],
                                                            "methods": ["GET"], "headers": ["x-a"],
                                                            "credentials": True},
                        "max-age": 10, "expose": {"headers": ["x-b"]}}):
            build_gateway(with_access(chain(), access))

    def test_bad_shapes_are_refused_by_name(self):
        for access, path in [({"policy": "any-origin"}, "bindings.http0.options.access-control.policy"),
                             ({"policy": "cross-origin", "allow": {"origin": ["x"]}},
                              "bindings.http0.options.access-control.allow"),
                             ({"policy": "cross-origin", "max-age": -1},
                              "bindings.http0.options.access-control.max-age"),
                             ({"policy": "cross-origin", "allow": {"origins": ["https://a.example/"]}},
                              "bindings.http0.options.access-control.allow.origins[0]"),
                             ({"policy": "cross-origin", "allow": {"origins": ["a.example"]}},
                              "bindings.http0.options.access-control.allow.origins[0]"),
                             ({"allow": {"origins": ["https://a.example"]}},
                              "bindings.http0.options.access-control.allow: only with policy: cross-origin"),
                             ({"policy": "same-origin", "max-age": 5},
                              "bindings.http0.options.access-control.max-age: only with policy: cross-origin")]:
            self.assertIn(path, self.problems(with_access(chain(), access)), access)

    def test_the_ws_servers_allowed_origins_is_refused_with_where_it_went(self):
        problems = self.problems(chain(ws_options={"allowed-origins": ["https://a.example"]}))
        self.assertIn("bindings.ws0.options.allowed-origins: no longer supported: use the http server's "
                      "options.access-control: policy cross-origin with allow.origins", problems)


def connect(port: int, origin: str | None = None, headers: dict[str, str] | None = None) -> defer.Deferred:
    """An open Autobahn client sending this Origin (as a browser page would), or a failure."""
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}/", origin=origin, headers=headers or {})
    factory.protocol = RecordingClient
    factory._batched_timer = ReactorTimer()
    d = TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    return d.addCallback(when_opened)


@defer.inlineCallbacks
def upgrade(port: int, headers: dict[str, str]) -> Any:
    """(status code, response headers, body) of a raw upgrade request with these headers."""
    data = yield raw_exchange(port, upgrade_request(headers=headers) + client_frame(0x8, b"\x03\xe8"))
    status, response_headers, body = split_response(data)
    return int(status.split(" ")[1]), response_headers, body


class EndToEndTests(unittest.TestCase):
    """Real upgrades through tcp -> http -> ws -> echo on loopback."""

    @defer.inlineCallbacks
    def start(self, access: dict[str, Any] | None = None) -> Any:
        self.gateway, self.port = yield start_gateway(self, with_access(chain(), access))
        return self.port

    @defer.inlineCallbacks
    def echoes(self, origin: str | None) -> Any:
        client = yield connect(self.port, origin)
        client.sendMessage(b"hello")
        self.assertEqual((yield client.messages.get()), (False, [b"hello"]))
        self.assertEqual((yield close_ws(client))[:2], (True, 1000))

    @defer.inlineCallbacks
    def refused(self, origin: str, headers: dict[str, str] | None = None) -> Any:
        status, _, body = yield upgrade(self.port, {"Host": f"127.0.0.1:{self.port}", "Origin": origin,
                                                    **(headers or {})})
        self.assertEqual(status, 403)
        self.assertIn(f"origin {origin} is not allowed".encode(), body)
        self.assertIn(f"BINDING_HTTP_REQUEST_REJECTED - 403 origin {origin} is not allowed",
                      self.gateway.events_text.getvalue())
        with self.assertRaises(ConnectionError):  # and a real client is refused as well
            yield connect(self.port, origin, headers)

    @defer.inlineCallbacks
    def test_a_cross_site_origin_is_refused_by_default(self):
        yield self.start()
        yield self.refused("https://evil.example.net")
        self.assertNotIn("BINDING_HTTP_REQUEST_ACCEPTED", self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_the_same_origin_and_no_origin_pass(self):
        port = yield self.start()
        yield self.echoes(f"http://127.0.0.1:{port}")
        yield self.echoes(None)

    @defer.inlineCallbacks
    def test_null_is_refused_by_default_and_allowed_when_the_policy_allows_it(self):
        yield self.start()
        yield self.refused("null")
        yield self.start({"policy": "cross-origin", "allow": {"origins": ["null"]}})
        yield self.echoes("null")  # Autobahn's own null check no longer answers first
        yield self.refused("https://evil.example.net")

    @defer.inlineCallbacks
    def test_a_cross_origin_policy_lets_its_origins_in(self):
        yield self.start({"policy": "cross-origin", "allow": {"origins": ["https://app.example.com",
                                                                          "http://localhost:*"]}})
        yield self.echoes("https://app.example.com")
        yield self.echoes("http://localhost:5173")
        yield self.refused("https://evil.example.net")
        yield self.start({"policy": "cross-origin"})
        yield self.echoes("https://anywhere.example.net")

    @defer.inlineCallbacks
    def test_a_cross_site_page_cannot_use_the_visitors_cookie(self):
        # The hijacking attack: the visitor is signed in (a cookie holding a valid token);
        # a page elsewhere opens a WebSocket to the gateway and the browser adds the cookie.
        signer = Signer("RSA", "rsa-1")
        config = guarded_config([signer.jwk])
        cookie = {"Cookie": f"access_token={signer.token()}"}
        self.gateway, self.port = yield start_gateway(self, config)
        yield self.refused("https://evil.example.net", cookie)
        own = yield connect(self.port, f"http://127.0.0.1:{self.port}", cookie)  # the gateway's own page
        yield close_ws(own)
        # Opening to listed sites keeps the others out, cookie or not.
        config = with_access(guarded_config([signer.jwk]),
                             {"policy": "cross-origin", "allow": {"origins": ["https://app.example.com"],
                                                                  "credentials": True}})
        self.gateway, self.port = yield start_gateway(self, config)
        yield self.refused("https://evil.example.net", cookie)
        app = yield connect(self.port, "https://app.example.com", cookie)
        app.sendMessage(b"hello")
        self.assertEqual((yield app.messages.get()), (False, [b"hello"]))
        yield close_ws(app)
