"""The `schema-registry` catalog (also `confluent-schema-registry`, `karapace-schema-registry`):
Confluent Schema Registry's REST API, as Zilla's SchemaRegistryCatalogHandler uses it.

- a subject and version: `GET /subjects/{subject}/versions/{version}`, whose `id` and
  `schema` are the schema's;
- an id: `GET /schemas/ids/{id}`, whose `schema` is the text.

`context` other than `default` puts the requests under `/contexts/.{context}`.
`credentials.headers.authorization` is sent as the `Authorization` header.
Framed messages (`strategy: encoded`): a zero magic byte, then the id in 4 bytes, big-endian.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred

from zillatw.catalogs import Resolved, registry
from zillatw.catalogs.registry import MAX_AGE, Framing, RegistryCatalog, RegistryError
from zillatw.config.plugins import CatalogType

# A model's reference to this catalog, checked with the configuration; schemas come at run time.
check_reference = registry.check_reference
schema_text = registry.schema_text

SCHEMA_PATCH = {
    "required": ["options"],
    "properties": {
        "options": {
            "type": "object",
            "additionalProperties": False,
            "required": ["url"],
            "properties": {
                "url": {"type": "string"},
                "context": {"type": "string"},
                "max-age": MAX_AGE,
                "tls": {"type": "object"},
                "credentials": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"headers": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"authorization": {"type": "string"}},
                    }},
                },
            },
        },
    },
}


def check(name: str, options: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if urlsplit(options.get("url", "")).scheme not in ("http", "https"):
        yield "options.url", f"'{options.get('url')}' is not an http(s) URL"
    if "tls" in options:
        yield "options.tls", "not supported by this zillatw yet (the system's CAs verify an https registry)"


class SchemaRegistryCatalog(RegistryCatalog):
    framing = Framing(4)

    def __init__(self, namespace: str, name: str, options: Mapping[str, Any], type_: str = "schema-registry",
                 **kwargs: Any):
        super().__init__(namespace, name, options, **kwargs)
        self.EVENT_PREFIX = {"confluent-schema-registry": "CATALOG_CONFLUENT_SCHEMA_REGISTRY_",
                             "karapace-schema-registry": "CATALOG_KARAPACE_SCHEMA_REGISTRY_"}.get(
                                 type_, "CATALOG_SCHEMA_REGISTRY_")
        context = options.get("context", "default")
        self.prefix = "" if context == "default" else "/contexts/" + self.quote("." + context.lstrip("."))
        self.headers[b"Accept"] = [b"application/vnd.schemaregistry.v1+json, application/json"]
        authorization = ((options.get("credentials") or {}).get("headers") or {}).get("authorization")
        if authorization:
            self.headers[b"Authorization"] = [authorization.encode("latin-1")]

    def fetch_subject(self, subject: str, version: str) -> Deferred:
        path = f"{self.prefix}/subjects/{self.quote(subject)}/versions/{self.quote(version)}"

        def found(document: Any) -> Resolved:
            if not isinstance(document, dict) or not isinstance(document.get("id"), int) \
                    or not isinstance(document.get("schema"), str):
                raise RegistryError(f"{path}: no 'id' and 'schema' in the answer")
            self._known(document["id"], document["schema"])
            return Resolved(document["id"], document["schema"])

        return self.get(path).addCallback(found)

    def fetch_id(self, schema_id: int) -> Deferred:
        path = f"{self.prefix}/schemas/ids/{schema_id}"

        def found(document: Any) -> str:
            if not isinstance(document, dict) or not isinstance(document.get("schema"), str):
                raise RegistryError(f"{path}: no 'schema' in the answer")
            return document["schema"]

        return self.get(path).addCallback(found)


def build(namespace: str, name: str, options: Mapping[str, Any], graph: Any,
          type_: str = "schema-registry") -> SchemaRegistryCatalog:
    return SchemaRegistryCatalog(namespace, name, options, type_, events=graph.events(namespace),
                                 reactor=graph.reactor)


PLUGIN = CatalogType(("schema-registry", "confluent-schema-registry", "karapace-schema-registry"), SCHEMA_PATCH,
                     build, check=check, check_reference=check_reference, schema_text=schema_text)
