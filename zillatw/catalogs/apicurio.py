"""The `apicurio-registry` catalog (alias `apicurio`): Apicurio Registry's v2 REST API, as
Zilla's ApicurioCatalogHandler uses it.

- a subject (an artifact of `group-id`) and version: `GET /apis/registry/v2/groups/{group}/
  artifacts/{artifact}/meta` (version `latest`) or `.../versions/{version}/meta`, whose
  `globalId` or `contentId` (`use-id`) is the schema's id;
- an id: `GET /apis/registry/v2/ids/globalIds/{id}` (or `contentIds`), the schema text itself.

Framed messages (`strategy: encoded`): a zero byte, then the id as 8 bytes (`id-encoding:
default`) or 4 (`legacy`), big-endian.
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
                "group-id": {"type": "string"},
                "use-id": {"enum": ["globalId", "contentId"]},
                "id-encoding": {"enum": ["default", "legacy"]},
                "max-age": MAX_AGE,
            },
        },
    },
}


def check(name: str, options: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if urlsplit(options.get("url", "")).scheme not in ("http", "https"):
        yield "options.url", f"'{options.get('url')}' is not an http(s) URL"


class ApicurioCatalog(RegistryCatalog):
    EVENT_PREFIX = "CATALOG_APICURIO_REGISTRY_"
    WORD = "ARTIFACT"

    def __init__(self, namespace: str, name: str, options: Mapping[str, Any], **kwargs: Any):
        super().__init__(namespace, name, options, **kwargs)
        self.group = options.get("group-id", "default")
        self.use_id = options.get("use-id", "globalId")
        self.framing = Framing(4 if options.get("id-encoding", "default") == "legacy" else 8)
        self._ids_path = "/apis/registry/v2/ids/" + ("contentIds" if self.use_id == "contentId" else "globalIds")

    def fetch_subject(self, subject: str, version: str) -> Deferred:
        base = f"/apis/registry/v2/groups/{self.quote(self.group)}/artifacts/{self.quote(subject)}"
        path = f"{base}/meta" if version == "latest" else f"{base}/versions/{self.quote(version)}/meta"

        def meta(document: Any) -> Deferred:
            schema_id = document.get(self.use_id) if isinstance(document, dict) else None
            if not isinstance(schema_id, int):
                raise RegistryError(f"{path}: no '{self.use_id}' in the artifact's metadata")
            return self.by_id(schema_id).ensure().addCallback(text, schema_id)

        def text(value: Resolved | None, schema_id: int) -> Resolved:
            if value is None:
                raise RegistryError(f"artifact id {schema_id}: {self.by_id(schema_id).error}")
            return value

        return self.get(path).addCallback(meta)

    def fetch_id(self, schema_id: int) -> Deferred:
        return self.get(f"{self._ids_path}/{schema_id}", parse_json=False)


def build(namespace: str, name: str, options: Mapping[str, Any], graph: Any, type_: str = "") -> ApicurioCatalog:
    return ApicurioCatalog(namespace, name, options, events=graph.events(namespace), reactor=graph.reactor)


PLUGIN = CatalogType(("apicurio-registry", "apicurio"), SCHEMA_PATCH, build, check=check,
                     check_reference=check_reference, schema_text=schema_text)
