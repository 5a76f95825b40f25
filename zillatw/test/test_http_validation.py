"""Zilla's http `requests` validation (zillatw.bindings.http.validation): typed requests on
the http server (headers, path and query parameters, bodies) and typed responses on the http
client, over loopback sockets with raw HTTP/1.1 clients."""

from __future__ import annotations

import copy
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from zillatw.errors import ConfigError
from zillatw.runtime.gateway import build_gateway
from zillatw.test.http_support import connect_http, plain_chain, request
from zillatw.test.support import start_gateway

ITEM = ('{"type": "object", "properties": {"id": {"type": "integer"}, "status": {"type": "string"}},'
        ' "required": ["id", "status"], "additionalProperties": false}')
CATALOGS = {"my_catalog": {"type": "inline", "options": {"subjects": {
    "item": {"schema": ITEM}, "number": {"schema": '{"type": "integer"}'}}}}}
JSON_ITEM = {"model": "json", "catalog": {"my_catalog": [{"subject": "item"}]}}
JSON_NUMBER = {"model": "json", "catalog": {"my_catalog": [{"subject": "number"}]}}


def typed_chain(requests: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    config = plain_chain({"requests": requests, **options})
    config["catalogs"] = copy.deepcopy(CATALOGS)
    return config


class RequestValidationTests(unittest.TestCase):
    @defer.inlineCallbacks
    def exchange(self, config: dict[str, Any], raw: bytes, count: int = 1) -> Any:
        gateway, port = yield start_gateway(self, config)
        self.gateway = gateway
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(raw)
        replies = yield client.responses(count)
        return replies

    def events(self) -> str:
        return self.gateway.events_text.getvalue()

    @defer.inlineCallbacks
    def test_valid_body_passes_and_invalid_is_400_with_an_event(self):
        config = typed_chain([{"path": "/items", "method": "POST", "content-type": ["application/json"],
                               "content": JSON_ITEM}])
        good = b'{"id": 42, "status": "Active"}'
        bad = b'{"id": "forty-two", "status": "Active"}'
        headers = {"Content-Type": "application/json"}
        ok, refused = yield self.exchange(config, request("POST", "/items", good, headers)
                                          + request("POST", "/items", bad, headers), count=2)
        self.assertEqual((ok.status, ok.body), (200, good))
        self.assertEqual(refused.status, 400)
        self.assertEqual(refused.body, b"invalid request\n")  # the gateway's own, no detail
        events = self.events()
        self.assertIn("MODEL_JSON_VALIDATION_FAILED - POST /items content: $.id:", events)
        self.assertIn("BINDING_HTTP_REQUEST_REJECTED - 400 invalid request (content: $.id:", events)

    @defer.inlineCallbacks
    def test_chunked_body_held_then_checked_whole(self):
        config = typed_chain([{"path": "/items", "content": JSON_ITEM}])
        body = b'{"id": 7, "status": "ok"}'
        raw = request("POST", "/items", None, {"Transfer-Encoding": "chunked"}) \
            + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
        (reply,) = yield self.exchange(config, raw)
        self.assertEqual((reply.status, reply.body), (200, body))
        self.assertEqual(reply.headers.get("content-length"), str(len(body)))  # held: its length known

    @defer.inlineCallbacks
    def test_body_over_the_held_bound_is_413(self):
        config = typed_chain([{"path": "/items", "content": JSON_ITEM}], **{"max-request-body": 64})
        body = b'{"id": 7, "status": "' + b"x" * 100 + b'"}'
        raw = request("POST", "/items", None, {"Transfer-Encoding": "chunked"}) + b"%x\r\n%s\r\n0\r\n\r\n" % (
            len(body), body)
        (reply,) = yield self.exchange(config, raw)
        self.assertEqual(reply.status, 400)  # chunked: found over the bound while held
        (reply,) = yield self.exchange(config, request("POST", "/items", body))
        self.assertIn(reply.status, (413,))  # Content-Length says more than may be held

    @defer.inlineCallbacks
    def test_a_request_without_content_type_matches_and_a_bodiless_one_passes(self):
        config = typed_chain([{"path": "/valid.json", "method": "GET", "content-type": ["application/json"],
                               "content": JSON_ITEM}])
        (reply,) = yield self.exchange(config, request("GET", "/valid.json"))
        self.assertEqual(reply.status, 200)

    @defer.inlineCallbacks
    def test_another_content_type_is_not_typed(self):
        config = typed_chain([{"path": "/items", "content-type": ["application/json"], "content": JSON_ITEM}])
        (reply,) = yield self.exchange(config, request("POST", "/items", b"not json", {"Content-Type": "text/plain"}))
        self.assertEqual((reply.status, reply.body), (200, b"not json"))

    @defer.inlineCallbacks
    def test_path_and_query_parameters(self):
        config = typed_chain([{"path": "/items/{id}", "params": {"path": {"id": JSON_NUMBER},
                                                                 "query": {"page": JSON_NUMBER}}}])
        replies = yield self.exchange(config, request("GET", "/items/42?page=2") + request("GET", "/items/42/")
                                      + request("GET", "/items/abc"), count=3)
        self.assertEqual([r.status for r in replies], [200, 200, 400])
        self.assertIn("path parameter id: not JSON", self.events())
        (reply,) = yield self.exchange(config, request("GET", "/items/1?page=two"))
        self.assertEqual(reply.status, 400)
        self.assertIn("query parameter page: not JSON", self.events())

    @defer.inlineCallbacks
    def test_header_models(self):
        config = typed_chain([{"path": "/{name}", "headers": {"x-count": JSON_NUMBER}}])
        replies = yield self.exchange(config, request("GET", "/a", headers={"X-Count": "3"})
                                      + request("GET", "/b", headers={"X-Count": "three"}), count=2)
        self.assertEqual([r.status for r in replies], [200, 400])
        self.assertIn("MODEL_JSON_VALIDATION_FAILED - GET /b header x-count: not JSON", self.events())

    @defer.inlineCallbacks
    def test_an_invalid_credential_is_not_shown_in_the_event(self):
        config = typed_chain([{"path": "/{name}", "headers": {"authorization": JSON_NUMBER},
                               "params": {"query": {"access_token": JSON_NUMBER}}}])
        (reply,) = yield self.exchange(config, request("GET", "/a", headers={"Authorization": "Bearer s3cret-token"}))
        self.assertEqual(reply.status, 400)
        self.assertIn("header authorization: invalid (the value is a credential: not shown)", self.events())
        self.assertNotIn("s3cret", self.events())
        (reply,) = yield self.exchange(config, request("GET", "/b?access_token=s3cret-query"))
        self.assertEqual(reply.status, 400)
        self.assertIn("query parameter access_token: invalid (the value is a credential: not shown)", self.events())
        self.assertNotIn("s3cret", self.events())

    @defer.inlineCallbacks
    def test_string_model_checks_as_the_body_streams(self):
        config = typed_chain([{"path": "/text", "content": "string"}])
        raw = request("POST", "/text", None, {"Transfer-Encoding": "chunked"}) + b"5\r\nhello\r\n"
        gateway, port = yield start_gateway(self, config)
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(raw)
        yield _until(lambda: b"hello" in client.raw)  # passed on before the body ended
        client.send(b"2\r\n\xff\xfe\r\n0\r\n\r\n")
        yield _until(lambda: client.is_closed)
        self.assertIn("MODEL_CORE_VALIDATION_FAILED - POST /text content: not utf-8", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_a_schema_the_registry_cannot_give_is_503(self):
        from zillatw.test.support import free_port
        config = typed_chain([{"path": "/items", "content": {"model": "json", "catalog": {
            "registry": [{"subject": "item"}]}}}])
        config["catalogs"]["registry"] = {"type": "schema-registry",
                                          "options": {"url": f"http://127.0.0.1:{free_port()}"}}  # nothing listens
        gateway, port = yield start_gateway(self, config)
        yield _until(lambda: "UNRETRIEVABLE" in gateway.events_text.getvalue())
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("POST", "/items", b'{"id": 1, "status": "ok"}'))
        (reply,) = yield client.responses(1)
        self.assertEqual((reply.status, reply.body), (503, b"schema unavailable\n"))

    def test_config_errors_name_the_key(self):
        cases = [
            ([{"path": "/a", "responses": [{"status": 200, "content": "string"}]}], "options.requests[0].responses"),
            ([{"path": "/a", "content": {"model": "json", "catalog": {"nope": [{"subject": "item"}]}}}],
             "options.requests[0].content.catalog: no catalog named 'nope'"),
            ([{"path": "/a", "headers": {"x-a": "protobuf"}}], "options.requests[0].headers.x-a.model"),
            ([{"path": "/a"}], "options.requests[0]: a request type needs headers, params or content"),
            ([{"path": "/a", "content": {"model": "json", "catalog": {"my_catalog": [{"strategy": "encoded"}]}}}],
             "strategy 'encoded' is not supported on http bodies"),
        ]
        for requests, expected in cases:
            with self.assertRaises(ConfigError) as caught:
                build_gateway(typed_chain(requests))
            self.assertIn(expected, str(caught.exception))


def _until(predicate: Any, timeout: float = 5.0) -> Any:
    from zillatw.test.support import eventually
    return eventually(predicate, timeout)


def client_chain(upstream_port: int, requests: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "test", "catalogs": copy.deepcopy(CATALOGS), "bindings": {
        "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": 0}, "exit": "http0"},
        "http0": {"type": "http", "kind": "server", "exit": "client0"},
        "client0": {"type": "http", "kind": "client", "options": {"requests": requests}, "exit": "tcp1"},
        "tcp1": {"type": "tcp", "kind": "client", "options": {"host": "127.0.0.1", "port": upstream_port}},
    }, "telemetry": {"exporters": {"stdout": {"type": "stdout"}}}}


class ResponseValidationTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        root = Resource()
        root.putChild(b"valid.json", Data(b'{"id": 42, "status": "Active"}', "application/json"))
        root.putChild(b"invalid.json", Data(b'{"id": 42, "status": "x", "name": "test"}', "application/json"))
        root.putChild(b"bad-header", _WithHeader(b"x-count", b"many"))
        root.putChild(b"text", Data(b"\xff not text", "text/plain"))
        site = Site(root)
        site.log = lambda request: None  # type: ignore[method-assign]
        self.upstream = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(self.upstream.stopListening)

    @defer.inlineCallbacks
    def fetch(self, requests: list[dict[str, Any]], raw: bytes) -> Any:
        gateway, port = yield start_gateway(self, client_chain(self.upstream.getHost().port, requests))
        self.gateway = gateway
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(raw)
        return client

    @defer.inlineCallbacks
    def test_valid_response_whole_and_invalid_cut_off_mid_body(self):
        typed = [{"path": path, "method": "GET", "responses": [
            {"status": 200, "content-type": ["application/json"], "content": JSON_ITEM}]}
            for path in ("/valid.json", "/invalid.json")]
        client = yield self.fetch(typed, request("GET", "/valid.json"))
        (reply,) = yield client.responses(1)
        self.assertEqual((reply.status, reply.body), (200, b'{"id": 42, "status": "Active"}'))
        client = yield self.fetch(typed, request("GET", "/invalid.json"))
        yield _until(lambda: client.is_closed)
        head, _, body = client.raw.partition(b"\r\n\r\n")
        self.assertIn(b"200 OK", head)
        self.assertIn(b"Content-Length: 41", head)
        self.assertEqual(body, b"")  # the head went at once; the body never: the client sees it cut off
        self.assertIn("MODEL_JSON_VALIDATION_FAILED - GET /invalid.json response content: $:",
                      self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_head_requests_and_empty_bodies_are_not_checked(self):
        typed = [{"path": "/valid.json", "responses": [{"content": {"model": "json", "catalog": {
            "my_catalog": [{"subject": "number"}]}}}]}]  # valid.json is not a number: a GET is cut off
        client = yield self.fetch(typed, request("HEAD", "/valid.json") + request("HEAD", "/valid.json"))
        client.head_only = True  # before the answers arrive
        replies = yield client.responses(2)  # neither checked: the connection stays, both answered
        self.assertEqual([(r.status, r.headers.get("content-length")) for r in replies], [(200, "30")] * 2)
        self.assertNotIn("VALIDATION_FAILED", self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_invalid_response_header_is_502(self):
        typed = [{"path": "/bad-header", "responses": [{"headers": {"x-count": JSON_NUMBER}}]}]
        client = yield self.fetch(typed, request("GET", "/bad-header"))
        (reply,) = yield client.responses(1)
        self.assertEqual((reply.status, reply.body), (502, b"invalid response from the upstream\n"))

    @defer.inlineCallbacks
    def test_the_last_matching_response_type_applies(self):
        typed = [{"path": "/text", "responses": [{"status": [200], "content": "string"},
                                                 {"content-type": ["text/html"], "content": JSON_ITEM}]}]
        client = yield self.fetch(typed, request("GET", "/text"))
        yield _until(lambda: client.is_closed)
        self.assertIn("MODEL_CORE_VALIDATION_FAILED - GET /text response content: not utf-8",
                      self.gateway.events_text.getvalue())


class _WithHeader(Resource):
    isLeaf = True

    def __init__(self, name: bytes, value: bytes):
        super().__init__()
        self.name, self.value = name, value

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(self.name, self.value)
        return b"ok"
