"""Validation of WebSocket messages against catalog schemas, end to end: real loopback sockets,
real WebSocket clients; inline catalogs, the messages a server sends, a proxied stream, the
example, the config's checks, back-pressure through the filter. (Registries:
test_validation_registries; the registry served in the tests: validation_support.)"""

from __future__ import annotations

import json
import re

from twisted.internet import defer
from twisted.trial import unittest

from zillatw.catalogs.models import compile_schema
from zillatw.config import load
from zillatw.errors import ConfigError
from zillatw.runtime.standard import standard_registry
from zillatw.test.netns import ExampleNetwork
from zillatw.test.support import (
    assert_echoed_under_back_pressure,
    close_ws,
    connect_ws,
    eventually,
    start_gateway,
)
from zillatw.test.validation_support import (
    INVALID_AVRO,
    INVALID_JSON,
    ORDER_TEXT,
    READING_TEXT,
    VALID_AVRO,
    VALID_JSON,
    ValidationCase,
    cataloged,
    config,
    inline,
)


class InlineTests(ValidationCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield self.start({"cat": inline(order=ORDER_TEXT, reading=READING_TEXT)},
                         [{"path": "/drop*", "content": cataloged("json", subject="order"), "invalid": "drop"},
                          {"path": "/orders*", "content": cataloged("json", subject="order")},
                          {"path": "/readings", "content": cataloged("avro", subject="reading")}])

    @defer.inlineCallbacks
    def test_avro(self):
        client = yield connect_ws(self.port, "/readings")
        yield self.assertEchoed(client, VALID_AVRO, True)
        client.sendMessage(INVALID_AVRO, isBinary=True)
        _, code, reason = yield client.closed
        self.assertEqual((code, reason), (1007, "invalid message: Avro datum ends early"))
        self.assertIn("MODEL_AVRO_VALIDATION_FAILED - /readings client message closes the connection: Avro datum "
                      "ends early", self.events())

    @defer.inlineCallbacks
    def test_valid_json_passes_text_and_binary(self):
        client = yield connect_ws(self.port, "/orders")
        yield self.assertEchoed(client, VALID_JSON, False)
        yield self.assertEchoed(client, VALID_JSON, True)
        yield close_ws(client)
        self.assertNotIn("VALIDATION_FAILED", self.events())

    @defer.inlineCallbacks
    def test_invalid_json_closes_1007_with_the_reason(self):
        client = yield connect_ws(self.port, "/orders")
        yield self.assertEchoed(client, VALID_JSON, False)
        client.sendMessage(INVALID_JSON)
        was_clean, code, reason = yield client.closed
        self.assertEqual((was_clean, code), (True, 1007))
        self.assertEqual(reason, 'invalid message: $.id: "one" is not of type "integer"')
        self.assertEqual(client.received, 1)  # the invalid one never came back
        failed = re.search(r"test:ws0 \[.*?\] \[(\w+)\] MODEL_JSON_VALIDATION_FAILED - /orders client message closes "
                           r"the connection: \$\.id: \"one\" is not of type \"integer\"", self.events())
        self.assertIsNotNone(failed, self.events())
        accepted = re.search(r"test:http0 \[.*?\] \[(\w+)\] BINDING_HTTP_REQUEST_ACCEPTED", self.events())
        self.assertEqual(failed.group(1), accepted.group(1))  # the upgrade request's trace id

    @defer.inlineCallbacks
    def test_not_json_closes_1007(self):
        client = yield connect_ws(self.port, "/orders")
        client.sendMessage(b"{not json")
        _, code, reason = yield client.closed
        self.assertEqual(code, 1007)
        self.assertTrue(reason.startswith("invalid message: not JSON"), reason)

    @defer.inlineCallbacks
    def test_compressed_messages_are_checked_after_inflating(self):
        client = yield connect_ws(self.port, "/orders", compress=True)
        self.assertEqual(len(client.websocket_extensions_in_use), 1)
        yield self.assertEchoed(client, VALID_JSON, False)
        client.sendMessage(INVALID_JSON)
        _, code, _ = yield client.closed
        self.assertEqual(code, 1007)

    @defer.inlineCallbacks
    def test_json_is_strict(self):
        for payload in (b'{"id": NaN, "status": "x"}', b'{"id": 1, "status": "x",}', b'{"id": 1, "status": "x"} {}'):
            client = yield connect_ws(self.port, "/orders")
            client.sendMessage(payload)
            _, code, reason = yield client.closed
            self.assertEqual(code, 1007, payload)
            self.assertTrue(reason.startswith("invalid message: not JSON"), reason)

    @defer.inlineCallbacks
    def test_drop_policy_drops_and_reports(self):
        client = yield connect_ws(self.port, "/drop")
        client.sendMessage(INVALID_JSON)
        client.sendMessage(b'{"id": 2}')        # missing status: dropped too
        yield self.assertEchoed(client, VALID_JSON, False)
        self.assertEqual(client.received, 1)
        self.assertEqual(client.state, client.STATE_OPEN)
        events = [line for line in self.events().splitlines() if "VALIDATION_FAILED" in line]
        # at most one event a second per connection: the second drop is counted, not written
        self.assertEqual(len(events), 1, events)
        self.assertIn("MODEL_JSON_VALIDATION_FAILED - /drop client message dropped: $.id", events[0])
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_fragmented_message_checked_whole_and_passed_on_fragment_by_fragment(self):
        client = yield connect_ws(self.port, "/orders")
        client.send_frames(1, [b'{"id": 7, ', b'"status": ', b'"fragmented"}'])
        binary, frames = yield client.messages.get()
        self.assertEqual((binary, frames), (False, [b'{"id": 7, ', b'"status": ', b'"fragmented"}']))
        client.send_frames(1, [b'{"id": 7, ', b'"status": 8}'])
        _, code, reason = yield client.closed
        self.assertEqual(code, 1007)
        self.assertIn("$.status", reason)

    @defer.inlineCallbacks
    def test_streams_no_rule_matches_are_not_validated(self):
        client = yield connect_ws(self.port, "/elsewhere")
        yield self.assertEchoed(client, b"anything at all", False)
        yield close_ws(client)


class ServerContentTests(ValidationCase):
    """server-content checks what the exit sends; echo sends back what the client sent, which
    `content: string` lets through."""

    @defer.inlineCallbacks
    def setUp(self):
        yield self.start({"cat": inline(order=ORDER_TEXT)},
                         [{"path": "/drop", "content": "string", "server-content": cataloged("json", subject="order"),
                           "invalid": "drop"},
                          {"content": "string", "server-content": cataloged("json", subject="order")}])

    @defer.inlineCallbacks
    def test_invalid_server_message_closes_the_client_with_1011(self):
        client = yield connect_ws(self.port, "/")
        yield self.assertEchoed(client, VALID_JSON, False)
        client.sendMessage(INVALID_JSON)
        _, code, reason = yield client.closed
        self.assertEqual((code, reason), (1011, "the server sent an invalid message"))
        self.assertIn("server message closes the connection", self.events())

    @defer.inlineCallbacks
    def test_invalid_server_message_dropped(self):
        client = yield connect_ws(self.port, "/drop")
        client.sendMessage(INVALID_JSON)
        yield self.assertEchoed(client, VALID_JSON, False)
        self.assertEqual(client.received, 1)
        self.assertIn("MODEL_JSON_VALIDATION_FAILED - /drop server message dropped", self.events())
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_string_model_refuses_bad_utf8_in_binary_messages(self):
        client = yield connect_ws(self.port, "/")
        client.sendMessage(b"\xff\xfe", isBinary=True)
        _, code, reason = yield client.closed
        self.assertEqual((code, reason), (1007, "invalid message: not utf-8 at byte 0"))
        self.assertIn("MODEL_CORE_VALIDATION_FAILED", self.events())


class ProxiedTests(ValidationCase):
    """A ws client exit opens later (a Deferred, once the upstream has answered 101)."""

    @defer.inlineCallbacks
    def test_validated_through_a_proxy(self):
        from zillatw.test.support import proxy_config, start_upstream
        upstream, upstream_port = start_upstream(self)
        c = proxy_config(upstream_port)
        c["bindings"]["ws0"]["options"] = {"messages": [{"content": cataloged("json", subject="order"),
                                                         "server-content": cataloged("json", subject="order")}]}
        c["catalogs"] = {"cat": inline(order=ORDER_TEXT)}
        self.gateway, self.port = yield start_gateway(self, c)
        client = yield connect_ws(self.port, "/orders")
        yield self.assertEchoed(client, VALID_JSON, False)
        client.sendMessage(INVALID_JSON)
        _, code, _ = yield client.closed
        self.assertEqual(code, 1007)
        yield eventually(lambda: upstream.closes)
        self.assertEqual(upstream.closes[0][0], 1007)  # the upstream was told why
        self.assertEqual(upstream.received, len(VALID_JSON))  # and never saw the invalid message


class ExampleTests(ValidationCase):
    @defer.inlineCallbacks
    def test_conf_ws_echo_validation(self):
        """The file unchanged, on 7114 in a network namespace of the test's own (zillatw.test.netns)."""
        network = ExampleNetwork(self)
        self.gateway, _ = yield start_gateway(self, network.config("ws.echo.validation.yaml"))
        self.port = network.port(7114)
        client = yield connect_ws(self.port, protocols=["echo"])
        yield self.assertEchoed(client, VALID_JSON, False)
        client.sendMessage(b'{"id": 1}')
        _, code, reason = yield client.closed
        self.assertEqual((code, reason), (1007, 'invalid message: $: "status" is a required property'))
        self.assertIn("example:north_ws_server", self.events())


class ConfigTests(unittest.TestCase):
    def problems(self, catalogs: dict, messages: list) -> list[str]:
        try:
            load(config(catalogs, messages), standard_registry())
        except ConfigError as e:
            return e.problems
        return []

    def test_errors_name_the_yaml_path(self):
        problems = self.problems(
            {"cat": inline(order=ORDER_TEXT, bad='{"type": "object", "properties": 5}'),
             "reg": {"type": "schema-registry", "options": {"url": "ftp://x"}},
             "apic": {"type": "apicurio-registry", "options": {"url": "http://x", "id-encoding": "short"}}},
            [{"content": cataloged("json", subject="ordr")},
             {"content": cataloged("json", "nope", subject="order")},
             {"content": {"model": "protobuf"}},
             {"content": cataloged("avro", subject="order")},
             {"content": cataloged("json", subject="bad")},
             {"content": cataloged("json", id=3)},
             {"content": cataloged("avro", "reg", strategy="topic")},
             {"invalid": "drop"}])
        self.assertEqual(problems, [
            "catalogs.apic.options.id-encoding: expected one of default, legacy, got 'short'"])
        problems = self.problems(
            {"cat": inline(order=ORDER_TEXT, bad='{"type": "object", "properties": 5}'),
             "reg": {"type": "schema-registry", "options": {"url": "ftp://x"}}},
            [{"content": cataloged("json", subject="ordr")},
             {"content": cataloged("json", "nope", subject="order")},
             {"content": {"model": "protobuf"}},
             {"content": cataloged("avro", subject="order")},
             {"content": cataloged("json", subject="bad")},
             {"content": cataloged("json", id=3)},
             {"content": cataloged("avro", "reg", strategy="topic")},
             {"invalid": "drop"},
             {"content": {"model": "json"}}])
        self.assertEqual(problems, [
            "catalogs.reg.options.url: 'ftp://x' is not an http(s) URL",
            "bindings.ws0.options.messages[0].content.catalog.cat[0]: no subject 'ordr' in this inline catalog "
            "(did you mean 'order'?)",
            "bindings.ws0.options.messages[1].content.catalog: no catalog named 'nope'",
            "bindings.ws0.options.messages[2].content.model: model 'protobuf' is not supported by this zillatw yet "
            "(supported: json, avro, string)",
            "bindings.ws0.options.messages[3].content.catalog.cat[0]: the avro schema of subject 'order' is not a "
            "valid Avro schema (unknown type 'object')",
            "bindings.ws0.options.messages[4].content.catalog.cat[0]: the json schema of subject 'bad' is not a valid "
            "JSON Schema (5 is not of type \"object\")",
            "bindings.ws0.options.messages[5].content.catalog.cat[0]: an inline catalog has subjects only (give "
            "'subject', not 'id' or 'strategy')",
            "bindings.ws0.options.messages[6].content.catalog.reg[0]: strategy 'topic' names a Kafka topic; a "
            "WebSocket message has none (use 'subject' or 'id')",
            "bindings.ws0.options.messages[7]: a rule needs 'content' (messages from the client) or "
            "'server-content' (to it), or both",
            "bindings.ws0.options.messages[8].content.catalog: model 'json' needs one catalog with one schema "
            "(e.g. my_catalog: [{subject: my_subject}])",
        ])

    def test_unknown_option_of_a_rule(self):
        problems = self.problems({"cat": inline(order=ORDER_TEXT)},
                                 [{"content": "string", "on-invalid": "drop"}])
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("bindings.ws0.options.messages[0]: unknown key 'on-invalid'"),
                        problems)

    def test_remote_refs_are_refused(self):
        with self.assertRaises(Exception) as caught:
            compile_schema("json", json.dumps({"$ref": "http://127.0.0.1:9/other.json"}))
        self.assertIn("not fetched while validating", str(caught.exception))


class FlowTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_back_pressure_passes_through_the_filter(self):
        """As test_flow's echo test, with every message checked: a client that does not read
        stops being read, and nothing is lost once it reads again."""
        gateway, port = yield start_gateway(self, config({}, [{"content": "string", "server-content": "string"}]))
        payloads = [bytes([65 + i % 26]) * 64 * 1024 for i in range(400)]  # as test_flow's
        yield assert_echoed_under_back_pressure(self, gateway, port, payloads)
