"""Validation against schemas a registry serves, end to end: Confluent's and Apicurio's REST
endpoints (validation_support.Registry, on a loopback port), schema ids in the messages, a
registry that is slow, down or answers wrong. (Inline catalogs and the config: test_validation.)"""

from __future__ import annotations

import json

from twisted.internet import defer

from zillatw.catalogs.registry import Framing
from zillatw.test.support import close_ws, connect_ws, eventually, raw_exchange, split_response, upgrade_request, wait
from zillatw.test.validation_support import (
    INVALID_AVRO,
    INVALID_JSON,
    ORDER,
    VALID_AVRO,
    VALID_JSON,
    ValidationCase,
    avro,
    cataloged,
    closed_port_url,
    start_registry,
)


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
