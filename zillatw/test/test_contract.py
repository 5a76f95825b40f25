"""The config contract: keys Zilla accepts that zillatw used to accept and ignore are now
either served (http `overrides`, dynamic `guarded` roles) or refused by name; shown through
zillatw.config.loading.load and, for what is served, on the wire."""

from __future__ import annotations

import copy
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from zillatw.config import load
from zillatw.errors import ConfigError
from zillatw.guards import Session, permits, resolve_role
from zillatw.runtime.standard import standard_registry
from zillatw.test.pki import Signer, guarded_config
from zillatw.test.support import (
    chain,
    close_ws,
    connect_ws,
    echo_chain,
    proxy_config,
    raw_exchange,
    start_gateway,
    start_upstream,
    status_of,
    upgrade_request,
)

TYPES = standard_registry()


def problems_of(config: dict[str, Any]) -> list[str]:
    try:
        load(config, TYPES, env={})
    except ConfigError as e:
        return e.problems
    raise AssertionError("the configuration loaded")


def changed(change: Any, base: Any = echo_chain) -> dict[str, Any]:
    config = copy.deepcopy(base())
    change(config)
    return config


def proxied() -> dict[str, Any]:
    return proxy_config(1)


class RefusedByNameTests(unittest.SynchronousTestCase):
    """Each case was accepted and ignored before; now one problem names the key and why."""

    def assertRefused(self, change: Any, path: str, words: str, base: Any = echo_chain) -> None:
        found = problems_of(changed(change, base))
        self.assertEqual(len(found), 1, found)
        self.assertTrue(found[0].startswith(path + ": "), found)
        self.assertIn(words, found[0])

    def test_stores_any_value(self):
        self.assertRefused(lambda c: c.update(stores="bogus"), "stores", "expected an object")
        self.assertRefused(lambda c: c.update(stores={"s": {"type": "memory"}}), "stores.s",
                           "not supported by this zillatw yet")

    def test_unknown_keys_of_guards_vaults_catalogs(self):
        guard = {"type": "jwt", "options": {"issuer": "i", "audience": "a", "keys": []}}
        self.assertRefused(lambda c: c.update(guards={"g": {**guard, "bogus": 1}}), "guards.g", "unknown key 'bogus'")
        self.assertRefused(lambda c: c.update(guards={"g": {**guard, "store": "s"}}), "guards.g.store",
                           "not supported")
        self.assertRefused(lambda c: c.update(vaults={"v": {"type": "filesystem", "opts": {}}}), "vaults.v",
                           "unknown key 'opts' (did you mean 'options'?)")
        catalog = {"type": "inline", "options": {"subjects": {"s": {"schema": "{}"}}}}
        self.assertRefused(lambda c: c.update(catalogs={"c": {**catalog, "bogus": 1}}), "catalogs.c",
                           "unknown key 'bogus'")
        self.assertRefused(lambda c: c.update(catalogs={"c": {**catalog, "vault": "v"}}), "catalogs.c.vault",
                           "not supported by this zillatw yet")

    def test_h2_on_the_server_and_on_the_client(self):
        load(changed(lambda c: c["bindings"]["http0"].update(options={"versions": ["http/1.1", "h2"]})), TYPES)
        load(changed(lambda c: c["bindings"]["http0"].update(options={"versions": ["h2"]})), TYPES)
        load(changed(lambda c: c["bindings"]["south_http_client"].update(options={"versions": ["http/1.1", "h2"]}),
                     base=proxied), TYPES)  # each upstream's version by ALPN (docs/http.md)
        load(changed(lambda c: c["bindings"]["south_http_client"].update(options={"versions": ["h2"]}),
                     base=proxied), TYPES)
        load(changed(lambda c: c["bindings"]["http0"].update(options={"versions": ["http/1.1"]})), TYPES)

    def test_guarded_routes_where_no_session_reaches(self):
        guards = {"g": {"type": "jwt", "options": {"issuer": "i", "audience": "a", "keys": []}}}

        def tcp(config):
            config["guards"] = guards
            config["bindings"]["tcp0"]["routes"] = [{"exit": "http0", "guarded": {"g": ["r"]}}]
        self.assertRefused(tcp, "bindings.tcp0.routes[0].guarded", "a tcp connection carries no credentials")

        def ws_client(config):
            config["guards"] = guards
            config["bindings"]["south_ws_client"]["routes"] = [{"exit": "south_http_client", "guarded": {"g": ["r"]}}]
        self.assertRefused(ws_client, "bindings.south_ws_client.routes[0].guarded",
                           "the routes of a ws client cannot be guarded", base=proxied)

    def test_unknown_role_placeholder(self):
        def route(config):
            config["guards"] = {"g": {"type": "jwt", "options": {"issuer": "i", "audience": "a", "keys": []}}}
            config["bindings"]["ws0"]["routes"] = [{"exit": "echo_server", "guarded": {"g": ["${method}${paht}"]}}]
        self.assertRefused(route, "bindings.ws0.routes[0].guarded.g[0]",
                           "unknown placeholder '${paht}' (did you mean '${path}'?)")

    def test_duplicate_metric_names_name_both_places(self):
        self.assertRefused(lambda c: c.update(telemetry={"metrics": ["stream.opens.received", "stream.active.received",
                                                                     "stream.opens.received"]}),
                           "telemetry.metrics[2]", "listed twice (also at telemetry.metrics[0])")

    def test_backlog_zero(self):
        self.assertRefused(lambda c: c["bindings"]["tcp0"]["options"].update(backlog=0),
                           "bindings.tcp0.options.backlog", "minimum of 1")

    def test_route_level_unknown_key_is_reported_once(self):
        def typo(config):
            config["bindings"]["http0"]["routes"][0]["wen"] = config["bindings"]["http0"]["routes"][0].pop("when")
        found = problems_of(changed(typo))
        self.assertEqual(found, ["bindings.http0.routes[0]: unknown key 'wen' (did you mean 'when'?) "
                                 "(expected one of: exit, when, guarded)"])

    def test_entry_route_with_and_exporter_vault(self):
        self.assertRefused(lambda c: c["bindings"]["ws0"].update(entry="x"), "bindings.ws0.entry", "remote_client")
        self.assertRefused(lambda c: c["bindings"]["tcp0"].update(entry="x"), "bindings.tcp0.entry",
                           "only for the remote_client and remote_server kinds")
        self.assertRefused(lambda c: c["bindings"]["http0"]["routes"][0].update(
            {"with": {"headers": {"overrides": {":path": "/"}}}}), "bindings.http0.routes[0].with", "options.overrides")
        self.assertRefused(lambda c: c.update(telemetry={"exporters": {"e": {"type": "stdout", "vault": "v"}}}),
                           "telemetry.exporters.e.vault", "not supported")

    def test_overrides_that_nothing_would_read(self):
        def server(overrides):
            return lambda c: c["bindings"]["http0"].update(options={"overrides": overrides})
        self.assertRefused(server({"x-tenant": "a"}), "bindings.http0.options.overrides.x-tenant",
                           "reads only :authority, :path, :scheme, origin")
        self.assertRefused(server({"Host": "a"}), "bindings.http0.options.overrides.Host", "override ':authority'")
        self.assertRefused(server({":path": "/a\r\nX: 1"}), "bindings.http0.options.overrides.:path", "CR, LF")

        def client(overrides):
            return lambda c: c["bindings"]["south_http_client"].update(options={"overrides": overrides})
        self.assertRefused(client({"sec-websocket-key": "x"}), "bindings.south_http_client.options.overrides."
                           "sec-websocket-key", "the WebSocket handshake itself", base=proxied)
        self.assertRefused(client({":method": "POST"}), "bindings.south_http_client.options.overrides.:method",
                           "its method is GET", base=proxied)
        self.assertRefused(client({"bad name": "x"}), "bindings.south_http_client.options.overrides.bad name",
                           "not a valid header name", base=proxied)
        load(changed(client({":authority": "up.example:80", "x-tenant": "a"}), proxied), TYPES)


class DynamicRoleTests(unittest.SynchronousTestCase):
    session = Session("ns:g", roles=frozenset({"GET/items", "read"}))

    def test_resolved_against_the_request(self):
        request = {":method": "GET", ":path": "/items?access_token=t"}
        self.assertEqual(resolve_role("${method}${path}", request), "GET/items")
        self.assertTrue(permits({"g": ("${method}${path}", "read")}, self.session, "ns", request))
        self.assertFalse(permits({"g": ("${method}${path}",)}, self.session, "ns",
                                 {":method": "POST", ":path": "/items"}))
        self.assertFalse(permits({"g": ("${method}${path}",)}, self.session, "ns",
                                 {":method": "GET", ":path": "/other"}))

    def test_without_a_request_the_role_stays_as_written(self):
        self.assertEqual(resolve_role("${method}${path}", None), "${method}${path}")
        self.assertFalse(permits({"g": ("${method}${path}",)}, self.session, "ns"))
        self.assertTrue(permits({"g": ("read",)}, self.session, "ns"))


class OverridesOnTheWireTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_server_overrides_reach_ws_routing_and_the_proxied_upstream(self):
        """The http server routes `/outer` on the request as sent, then sets :path and
        :authority: the ws server routes on `/inner`, and the ws client asks the upstream
        for them; the http client adds its own header and sets the upstream :path."""
        upstream, upstream_port = start_upstream(self)
        config = proxy_config(upstream_port)
        config["bindings"]["http0"]["options"] = {"overrides": {":path": "/inner", ":authority": "inner.example:8080"}}
        config["bindings"]["ws0"]["routes"] = [{"when": [{"path": "/inner", "authority": "inner.example:8080"}],
                                                "exit": "south_ws_client"}]
        config["bindings"]["south_http_client"]["options"] = {"overrides": {"x-tenant": "blue", ":path": "/up"}}
        gateway, port = yield start_gateway(self, config)
        client = yield connect_ws(port, "/outer")
        client.sendMessage(b"hello")
        self.assertEqual((yield client.messages.get()), (False, [b"hello"]))
        yield close_ws(client)
        request = upstream.requests[0]
        self.assertEqual(request.path, "/up")
        self.assertEqual(request.headers["host"], "inner.example:8080")
        self.assertEqual(request.headers.get("x-tenant"), "blue")

    @defer.inlineCallbacks
    def test_without_the_override_the_ws_route_does_not_match(self):
        config = chain(ws_routes=[{"when": [{"path": "/inner"}], "exit": "echo"}])
        gateway, port = yield start_gateway(self, config)
        self.assertEqual((yield status_of(port, "/outer"))[0], 404)
        config["bindings"]["http0"]["options"] = {"overrides": {":path": "/inner"}}
        gateway, port = yield start_gateway(self, config)
        client = yield connect_ws(port, "/outer")
        yield close_ws(client)


class DynamicRolesOnTheWireTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.signer = Signer("EC", "k")
        config = guarded_config([self.signer.jwk], roles=["${method}${path}"])
        # a ws route guarded by the path alone, behind the http route guarded by method and path
        config["bindings"]["ws0"]["routes"] = [{"guarded": {"jwt0": ["ws:${path}"]}, "exit": "echo"}]
        self.gateway, self.port = yield start_gateway(self, config)

    def headers(self, scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.signer.token(scope=scope)}"}

    @defer.inlineCallbacks
    def test_role_of_the_request_matched(self):
        client = yield connect_ws(self.port, "/items", headers=self.headers("GET/items ws:/items"))
        yield close_ws(client)
        # the query (here the credentials) is not part of ${path}
        token = self.signer.token(scope="GET/items ws:/items")
        client = yield connect_ws(self.port, f"/items?access_token={token}")
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_wrong_path_or_method_is_refused(self):
        self.assertEqual((yield status_of(self.port, "/other", self.headers("GET/items ws:/items")))[0], 404)
        self.assertEqual((yield status_of(self.port, "/items", self.headers("GET/items")))[0], 404)  # the ws route's
        data = yield self._post("/items", self.headers("GET/items ws:/items"))
        self.assertTrue(data.startswith(b"HTTP/1.1 404 "), data[:40])

    def _post(self, path: str, headers: dict[str, str]) -> Any:
        return raw_exchange(self.port, upgrade_request(path, headers, method="POST"))
