"""Validation of WebSocket messages against catalog schemas, end to end: real loopback sockets,
real WebSocket clients, and a registry served by twisted.web in the test (Confluent's and
Apicurio's REST endpoints, answering in the shapes those registries answer in)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Generator
from typing import Any

import fastavro
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web import resource, server

from zillatw.catalogs.models import compile_schema
from zillatw.catalogs.registry import Framing
from zillatw.config import load
from zillatw.errors import ConfigError
from zillatw.runtime.standard import standard_registry
from zillatw.test.support import (
    CONF,
    chain,
    close_ws,
    connect_ws,
    eventually,
    on_ephemeral_port,
    raw_exchange,
    split_response,
    start_gateway,
    upgrade_request,
    wait,
)

ORDER = {"type": "object", "properties": {"id": {"type": "integer"}, "status": {"type": "string"}},
         "required": ["id", "status"], "additionalProperties": False}
ORDER_TEXT = json.dumps(ORDER)
READING = {"type": "record", "name": "Reading", "namespace": "test",
           "fields": [{"name": "sensor", "type": "string"}, {"name": "value", "type": "double"}]}
READING_TEXT = json.dumps(READING)
VALID_JSON = b'{"id": 1, "status": "open"}'
INVALID_JSON = b'{"id": "one", "status": "open"}'


def avro(datum: dict, schema: dict = READING) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), datum)
    return out.getvalue()


VALID_AVRO = avro({"sensor": "t1", "value": 21.5})
INVALID_AVRO = VALID_AVRO[:-3]                    # the double cut short


class Registry(resource.Resource):
    """Confluent Schema Registry and Apicurio Registry v2, the endpoints zillatw reads."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        # id -> (schema text, type); subject -> [ids by version]
        self.schemas = {1: (ORDER_TEXT, "JSON"), 2: (READING_TEXT, "AVRO")}
        self.subjects = {"order": [1], "reading": [2]}
        self.content_ids = {101: 1, 102: 2}  # Apicurio contentId -> globalId
        self.requests: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.hold: defer.Deferred | None = None  # answers wait for it when set
        self.port: Any = None  # the listening port and its URL, once start_registry listens
        self.url = ""

    def render_GET(self, request):  # noqa: N802 - twisted.web's name
        path = request.path.decode()
        self.requests.append(path)
        self.headers.append({k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()})
        if self.hold is None:
            return self.answer(request, path)
        self.hold.addCallback(lambda _: (request.write(self.answer(request, path)), request.finish()))
        return server.NOT_DONE_YET

    def answer(self, request, path: str) -> bytes:
        path = re.sub(r"^/contexts/\.[^/]+", "", path)
        request.setHeader(b"content-type", b"application/vnd.schemaregistry.v1+json")
        if m := re.fullmatch(r"/subjects/([^/]+)/versions/([^/]+)", path):  # Confluent
            subject, version = m.groups()
            if subject not in self.subjects:
                return self.error(request, 40401, f"Subject '{subject}' not found.")
            versions = self.subjects[subject]
            number = len(versions) if version == "latest" else int(version)
            schema_id = versions[number - 1]
            text, kind = self.schemas[schema_id]
            document = {"subject": subject, "version": number, "id": schema_id, "schema": text}
            if kind != "AVRO":
                document["schemaType"] = kind  # Confluent leaves it out for Avro
            return json.dumps(document).encode()
        if m := re.fullmatch(r"/schemas/ids/(\d+)", path):
            schema_id = int(m.group(1))
            if schema_id not in self.schemas:
                return self.error(request, 40403, "Schema not found")
            return json.dumps({"schema": self.schemas[schema_id][0]}).encode()
        if m := re.fullmatch(r"/apis/registry/v2/groups/([^/]+)/artifacts/([^/]+)(?:/versions/([^/]+))?/meta", path):
            group, artifact, version = m.groups()
            if artifact not in self.subjects:
                request.setResponseCode(404)
                return json.dumps({"error_code": 404, "message": f"No artifact with ID '{artifact}' in group "
                                   f"'{group}' was found.", "name": "ArtifactNotFoundException"}).encode()
            versions = self.subjects[artifact]
            number = len(versions) if version is None else int(version)
            global_id = versions[number - 1]
            content_id = next(c for c, g in self.content_ids.items() if g == global_id)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"groupId": group, "id": artifact, "version": str(number),
                               "type": self.schemas[global_id][1], "globalId": global_id, "contentId": content_id,
                               "state": "ENABLED", "createdBy": "", "createdOn": "2026-11-25T12:00:00+0000"}).encode()
        if m := re.fullmatch(r"/apis/registry/v2/ids/(globalIds|contentIds)/(\d+)", path):
            kind, number = m.group(1), int(m.group(2))
            found = number if kind == "globalIds" else self.content_ids.get(number)
            if found is None or found not in self.schemas:
                request.setResponseCode(404)
                return json.dumps({"error_code": 404, "message": f"No artifact with ID '{number}' was found."}).encode()
            request.setHeader(b"content-type", b"application/json")
            return self.schemas[found][0].encode()  # the artifact's content itself
        request.setResponseCode(404)
        return b'{"error_code": 404, "message": "HTTP 404 Not Found"}'

    @staticmethod
    def error(request, code: int, message: str) -> bytes:
        request.setResponseCode(404)
        return json.dumps({"error_code": code, "message": message}).encode()


@defer.inlineCallbacks
def start_registry(case: unittest.TestCase, registry: Registry | None = None):
    registry = registry or Registry()
    site = server.Site(registry)
    site.noisy = False
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    case.addCleanup(port.stopListening)
    registry.port = port
    registry.url = f"http://127.0.0.1:{port.getHost().port}"
    return registry


@defer.inlineCallbacks
def closed_port_url():
    """A URL nothing listens on (a port bound, then closed)."""
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(resource.Resource()))
    number = port.getHost().port
    yield port.stopListening()
    return f"http://127.0.0.1:{number}"


def config(catalogs: dict, messages: list, apps: dict | None = None) -> dict:
    c = chain(ws_options={"messages": messages}, apps=apps)
    c["catalogs"] = catalogs
    return c


def inline(**subjects: str) -> dict:
    return {"type": "inline", "options": {"subjects": {k: {"schema": v} for k, v in subjects.items()}}}


def cataloged(model: str, catalog: str = "cat", **ref) -> dict:
    return {"model": model, "catalog": {catalog: [ref]}}


class ValidationCase(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, catalogs: dict, messages: list, apps: dict | None = None):
        self.gateway, self.port = yield start_gateway(self, config(catalogs, messages, apps))

    def events(self) -> str:
        return self.gateway.events_text.getvalue()

    @defer.inlineCallbacks
    def assertEchoed(self, client, payload: bytes, binary: bool):
        client.sendMessage(payload, isBinary=binary)
        got_binary, frames = yield client.messages.get()
        self.assertEqual((got_binary, b"".join(frames)), (binary, payload))

    @defer.inlineCallbacks
    def refused_status(self, path: str = "/") -> Generator[Any, Any, str]:
        """The refusal's status line and its body's first line, as 'HTTP/1.1 503 ...: body'."""
        data = yield raw_exchange(self.port, upgrade_request(path))
        status, _, body = split_response(data)
        return f"{status}: {body.decode().strip()}" if body else status


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


class ConfluentTests(ValidationCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.registry = yield start_registry(self)
        catalog = {"type": "schema-registry", "options": {
            "url": self.registry.url, "context": "tenant1",
            "credentials": {"headers": {"authorization": "Basic dXNlcjpwYXNz"}}}}
        yield self.start({"cat": catalog},
                         [{"protocol": "orders", "content": cataloged("json", subject="order")},
                          {"protocol": "readings", "content": cataloged("avro", subject="reading", version=1)},
                          {"protocol": "framed", "content": cataloged("avro", strategy="encoded")}])

    @defer.inlineCallbacks
    def test_json_by_subject(self):
        client = yield connect_ws(self.port, protocols=["orders"])
        yield self.assertEchoed(client, VALID_JSON, False)
        client.sendMessage(INVALID_JSON)
        _, code, _ = yield client.closed
        self.assertEqual(code, 1007)
        self.assertEqual(self.registry.requests, ["/contexts/.tenant1/subjects/order/versions/latest"])
        self.assertEqual(self.registry.headers[0]["authorization"], "Basic dXNlcjpwYXNz")

    @defer.inlineCallbacks
    def test_avro_by_subject_version(self):
        client = yield connect_ws(self.port, protocols=["readings"])
        yield self.assertEchoed(client, VALID_AVRO, True)
        client.sendMessage(INVALID_AVRO, isBinary=True)
        _, code, reason = yield client.closed
        self.assertEqual(code, 1007)
        self.assertIn("Avro", reason)
        self.assertIn("MODEL_AVRO_VALIDATION_FAILED", self.events())

    @defer.inlineCallbacks
    def test_avro_framed_with_the_schema_id(self):
        framing = Framing(4)
        client = yield connect_ws(self.port, protocols=["framed"])
        yield self.assertEchoed(client, b"\x00\x00\x00\x00\x02" + VALID_AVRO, True)
        self.assertEqual(framing.frame(2, VALID_AVRO)[:5], b"\x00\x00\x00\x00\x02")
        self.assertEqual(self.registry.requests, ["/contexts/.tenant1/schemas/ids/2"])
        yield self.assertEchoed(client, framing.frame(2, VALID_AVRO), True)  # cached: no second request
        self.assertEqual(len(self.registry.requests), 1)
        client.sendMessage(framing.frame(2, INVALID_AVRO), isBinary=True)
        _, code, _ = yield client.closed
        self.assertEqual(code, 1007)

    @defer.inlineCallbacks
    def test_messages_behind_one_whose_schema_is_fetched_wait_in_order(self):
        self.registry.hold = defer.Deferred()
        client = yield connect_ws(self.port, protocols=["framed"])
        framed = [Framing(4).frame(2, avro({"sensor": f"s{i}", "value": float(i)})) for i in range(5)]
        for message in framed[:3]:
            client.sendMessage(message, isBinary=True)
        client.send_frames(2, [framed[3][:4], framed[3][4:]])  # fragmented, queued whole
        client.sendMessage(framed[4], isBinary=True)
        yield eventually(lambda: self.registry.requests)
        yield wait(0.05)
        self.assertEqual(client.received, 0)  # all held while schema id 2 is fetched
        hold, self.registry.hold = self.registry.hold, None
        hold.callback(None)
        got = []
        for _ in framed:
            binary, frames = yield client.messages.get()
            got.append(frames)
        self.assertEqual([b"".join(f) for f in got], framed)
        self.assertEqual(got[3], [framed[3][:4], framed[3][4:]])
        self.assertEqual(self.registry.requests, ["/contexts/.tenant1/schemas/ids/2"])
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_framed_message_with_an_unknown_id_or_no_frame(self):
        client = yield connect_ws(self.port, protocols=["framed"])
        client.sendMessage(Framing(4).frame(99, VALID_AVRO), isBinary=True)
        _, code, reason = yield client.closed
        self.assertEqual(code, 1007)
        self.assertIn("schema id 99 unavailable (HTTP 404", reason)
        self.assertIn("CATALOG_SCHEMA_REGISTRY_UNRETRIEVABLE_SCHEMA_ID Unable to fetch schema id 99", self.events())
        client = yield connect_ws(self.port, protocols=["framed"])
        client.sendMessage(VALID_AVRO, isBinary=True)  # starts with "\x04t1": no magic byte
        _, code, reason = yield client.closed
        self.assertEqual(code, 1007)
        self.assertIn("not framed with a schema id", reason)

    @defer.inlineCallbacks
    def test_unknown_subject_refuses_the_upgrade(self):
        self.registry.subjects.pop("order")
        data = yield raw_exchange(self.port, upgrade_request(headers={"Sec-WebSocket-Protocol": "orders"}))
        self.assertIn("503", split_response(data)[0])
        self.assertIn("CATALOG_SCHEMA_REGISTRY_UNRETRIEVABLE_SCHEMA_SUBJECT_VERSION Unable to fetch schema for "
                      "subject order with version latest (HTTP 404", self.events())


class ApicurioTests(ValidationCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.registry = yield start_registry(self)

    def catalog(self, **options):
        return {"type": "apicurio-registry", "options": {"url": self.registry.url, "group-id": "sensors", **options}}

    @defer.inlineCallbacks
    def test_avro_and_json_by_artifact(self):
        yield self.start({"cat": self.catalog()},
                         [{"protocol": "readings", "content": cataloged("avro", subject="reading")},
                          {"protocol": "orders", "content": cataloged("json", subject="order", version=1)}])
        client = yield connect_ws(self.port, protocols=["readings"])
        yield self.assertEchoed(client, VALID_AVRO, True)
        client.sendMessage(VALID_AVRO + b"\x00", isBinary=True)
        _, code, reason = yield client.closed
        self.assertEqual((code, reason), (1007, "invalid message: 1 bytes after the Avro datum"))
        self.assertEqual(self.registry.requests, ["/apis/registry/v2/groups/sensors/artifacts/reading/meta",
                                                  "/apis/registry/v2/ids/globalIds/2"])
        client = yield connect_ws(self.port, protocols=["orders"])
        yield self.assertEchoed(client, VALID_JSON, False)
        client.sendMessage(INVALID_JSON)
        _, code, _ = yield client.closed
        self.assertEqual(code, 1007)
        self.assertIn("/apis/registry/v2/groups/sensors/artifacts/order/versions/1/meta", self.registry.requests)

    @defer.inlineCallbacks
    def test_framed_ids_default_legacy_and_content_ids(self):
        yield self.start({"cat": self.catalog(), "legacy": self.catalog(**{"id-encoding": "legacy"}),
                          "content": self.catalog(**{"use-id": "contentId"})},
                         [{"protocol": "default", "content": cataloged("avro", strategy="encoded")},
                          {"protocol": "legacy", "content": cataloged("avro", "legacy", strategy="encoded")},
                          {"protocol": "content", "content": cataloged("avro", "content", subject="reading")}])
        client = yield connect_ws(self.port, protocols=["default"])
        yield self.assertEchoed(client, b"\x00" + (2).to_bytes(8, "big") + VALID_AVRO, True)
        client.sendMessage(b"\x00" + (2).to_bytes(4, "big") + VALID_AVRO, isBinary=True)  # a legacy frame here
        _, code, _ = yield client.closed
        self.assertEqual(code, 1007)
        client = yield connect_ws(self.port, protocols=["legacy"])
        yield self.assertEchoed(client, b"\x00" + (2).to_bytes(4, "big") + VALID_AVRO, True)
        yield close_ws(client)
        client = yield connect_ws(self.port, protocols=["content"])
        yield self.assertEchoed(client, VALID_AVRO, True)
        yield close_ws(client)
        self.assertIn("/apis/registry/v2/ids/contentIds/102", self.registry.requests)

    @defer.inlineCallbacks
    def test_unknown_artifact_refuses_the_upgrade_with_an_event(self):
        yield self.start({"cat": self.catalog()}, [{"content": cataloged("avro", subject="missing")}])
        status = yield self.refused_status()
        self.assertIn("503", status)
        self.assertIn("CATALOG_APICURIO_REGISTRY_UNRETRIEVABLE_ARTIFACT_SUBJECT_VERSION Unable to fetch artifact "
                      "for subject missing with version latest", self.events())


class RegistryAvailabilityTests(ValidationCase):
    @defer.inlineCallbacks
    def test_registry_down_without_cache_refuses_with_an_event(self):
        url = yield closed_port_url()
        yield self.start({"cat": {"type": "schema-registry", "options": {"url": url}}},
                         [{"content": cataloged("json", subject="order")}])
        status = yield self.refused_status()
        self.assertEqual(status, "HTTP/1.1 503 Service Unavailable: schema unavailable")
        self.assertIn("CATALOG_SCHEMA_REGISTRY_UNRETRIEVABLE_SCHEMA_SUBJECT_VERSION Unable to fetch schema for "
                      "subject order with version latest", self.events())

    @defer.inlineCallbacks
    def test_a_failed_fetch_is_retried_after_a_backoff_not_per_connection(self):
        registry = yield start_registry(self)
        registry.subjects.clear()  # every lookup is a 404
        yield self.start({"cat": {"type": "schema-registry", "options": {"url": registry.url}}},
                         [{"content": cataloged("json", subject="order")}])
        for _ in range(3):
            status = yield self.refused_status()
            self.assertEqual(status, "HTTP/1.1 503 Service Unavailable: schema unavailable")
        self.assertEqual(len(registry.requests), 1)
        self.assertEqual(self.events().count("UNRETRIEVABLE_SCHEMA_SUBJECT_VERSION"), 1)  # once per outage
        registry.subjects["order"] = [1]
        yield wait(1.1)
        client = yield connect_ws(self.port)
        yield self.assertEchoed(client, VALID_JSON, False)
        self.assertEqual(len(registry.requests), 2)
        self.assertIn("CATALOG_SCHEMA_REGISTRY_RETRIEVED_SCHEMA_SUBJECT_VERSION Successfully fetched schema for "
                      "subject order with version latest.", self.events())
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_registry_down_with_cache_keeps_serving_the_cached_schema(self):
        registry = yield start_registry(self)
        yield self.start({"cat": {"type": "schema-registry", "options": {"url": registry.url, "max-age": 0.2}}},
                         [{"content": cataloged("json", subject="order")}])
        client = yield connect_ws(self.port)
        yield self.assertEchoed(client, VALID_JSON, False)
        yield registry.port.stopListening()
        yield wait(0.3)  # the cached schema is now older than max-age
        yield self.assertEchoed(client, VALID_JSON, False)  # starts a refresh, which fails
        yield eventually(lambda: "STALE_SCHEMA" in self.events())
        self.assertIn("CATALOG_SCHEMA_REGISTRY_UNRETRIEVABLE_SCHEMA_SUBJECT_VERSION_STALE_SCHEMA Unable to fetch "
                      "schema for subject order with version latest; using stale schema with id 1.", self.events())
        other = yield connect_ws(self.port)  # a new connection gets the cached schema too
        yield self.assertEchoed(other, VALID_JSON, False)
        other.sendMessage(INVALID_JSON)
        _, code, _ = yield other.closed
        self.assertEqual(code, 1007)
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_concurrent_first_requests_fetch_once(self):
        registry = yield start_registry(self)
        registry.hold = defer.Deferred()
        yield self.start({"cat": {"type": "schema-registry", "options": {"url": registry.url}}},
                         [{"content": cataloged("json", subject="order")}])
        connecting = [connect_ws(self.port) for _ in range(20)]
        yield eventually(lambda: registry.requests)
        yield wait(0.1)  # every upgrade has arrived and waits for the one fetch
        hold, registry.hold = registry.hold, None
        hold.callback(None)
        clients = yield defer.gatherResults(connecting)
        self.assertEqual(registry.requests, ["/subjects/order/versions/latest"])
        for client in clients:
            yield self.assertEchoed(client, VALID_JSON, False)
        clients[0].sendMessage(INVALID_JSON)
        _, code, _ = yield clients[0].closed
        self.assertEqual(code, 1007)
        yield defer.gatherResults([close_ws(c) for c in clients[1:]])
        self.assertEqual(len(registry.requests), 1)

    @defer.inlineCallbacks
    def test_a_refresh_picks_up_a_new_latest_version(self):
        registry = yield start_registry(self)
        yield self.start({"cat": {"type": "schema-registry", "options": {"url": registry.url, "max-age": 0.1}}},
                         [{"content": cataloged("json", subject="order")}])
        client = yield connect_ws(self.port)
        yield self.assertEchoed(client, b'{"id": 1, "status": "x"}', False)
        loose = dict(ORDER, required=["id"])
        registry.schemas[3] = (json.dumps(loose), "JSON")
        registry.subjects["order"].append(3)
        yield wait(0.2)
        yield self.assertEchoed(client, VALID_JSON, False)  # still version 1; refreshes meanwhile
        yield eventually(lambda: len(registry.requests) == 2)
        yield wait(0.05)
        yield self.assertEchoed(client, b'{"id": 5}', False)  # valid under version 2 only
        yield close_ws(client)


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
        import os

        import yaml
        with open(os.path.join(CONF, "ws.echo.validation.yaml")) as f:
            example = on_ephemeral_port(yaml.safe_load(f), "north_tcp_server")
        self.gateway, self.port = yield start_gateway(self, example)
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
        import hashlib

        from zillatw.test.support import buffered, client_frame, parse_server_frames, raw_ws
        gateway, port = yield start_gateway(self, config({}, [{"content": "string", "server-content": "string"}]))
        client, start = yield raw_ws(port)
        client.transport.pauseProducing()
        count, size = 400, 64 * 1024  # as test_flow's: 64 KiB needs the 8-byte length form
        payloads = [bytes([65 + i % 26]) * size for i in range(count)]
        client.transport.writeSequence([client_frame(0x2, p) for p in payloads])
        ws = gateway.binding("ws0")
        yield eventually(lambda: len(ws.connections) == 1)
        server = next(iter(ws.connections))
        yield eventually(lambda: server.transport not in reactor.getReaders(), timeout=10)
        self.assertLess(buffered(server.transport), 1024 * 1024)
        self.assertGreater(buffered(client.transport), 0, "the sender was not held back")
        client.transport.resumeProducing()
        yield client.until(start + count * (10 + size))
        frames = parse_server_frames(client.data[start:])
        self.assertEqual(len(frames), count)
        self.assertEqual(hashlib.sha256(b"".join(f[2] for f in frames)).digest(),
                         hashlib.sha256(b"".join(payloads)).digest())
        client.transport.loseConnection()
        yield client.done
