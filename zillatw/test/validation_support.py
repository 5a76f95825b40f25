"""Support for the validation tests (test_validation, test_validation_registries): schemas and
messages, a schema registry served by twisted.web in the test (Confluent's and Apicurio's REST
endpoints, answering in the shapes those registries answer in), and the gateway they start."""

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

from zillatw.test.support import chain, raw_exchange, split_response, start_gateway, upgrade_request

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
