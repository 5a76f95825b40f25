"""The `inline` catalog: schemas written in the configuration, by subject.

    catalogs:
      my_catalog:
        type: inline
        options:
          subjects:
            my_subject:
              schema: '{"type": "object", ...}'
              version: latest            # the default; models ask for it (or for "latest")
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from zillatw.catalogs import Resolved, SchemaHandle, Unavailable
from zillatw.config.plugins import CatalogType
from zillatw.config.schema import NAME

SCHEMA_PATCH = {
    "required": ["options"],
    "properties": {
        "options": {
            "type": "object",
            "additionalProperties": False,
            "required": ["subjects"],
            "properties": {
                "subjects": {
                    "type": "object",
                    "propertyNames": NAME,
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["schema"],
                        "properties": {"schema": {"type": "string"}, "version": {"type": ["string", "integer"]}},
                    },
                },
            },
        },
    },
}


def check_reference(options: Mapping[str, Any], ref: Mapping[str, Any]) -> str | None:
    if "subject" not in ref:
        return "an inline catalog has subjects only (give 'subject', not 'id' or 'strategy')"
    subjects = (options or {}).get("subjects") or {}
    if ref["subject"] not in subjects:
        from zillatw.errors import did_you_mean
        return f"no subject '{ref['subject']}' in this inline catalog{did_you_mean(ref['subject'], subjects)}"
    wanted = str(ref.get("version", "latest"))
    have = str(subjects[ref["subject"]].get("version", "latest"))
    if wanted not in ("latest", have):
        return f"subject '{ref['subject']}' has version '{have}' in this inline catalog, not '{wanted}'"
    return None


def schema_text(options: Mapping[str, Any], ref: Mapping[str, Any]) -> str | None:
    """For config checks: the text a reference names, when it does."""
    subject = ((options or {}).get("subjects") or {}).get(ref.get("subject"))
    return None if subject is None else subject["schema"]


class InlineCatalog:
    framing = None  # inline schemas have no ids to put in front of a message

    def __init__(self, namespace: str, name: str, options: Mapping[str, Any]):
        self.name = f"{namespace}:{name}"
        self.subjects = {subject: SchemaHandle(f"subject {subject}", None, lambda: 0.0, math.inf,
                                         Resolved(None, item["schema"]))
                         for subject, item in (options.get("subjects") or {}).items()}

    def schema(self, ref: Mapping[str, Any]) -> SchemaHandle:
        try:
            return self.subjects[ref["subject"]]
        except KeyError:  # config checks refuse this; embedders get a clear error
            raise Unavailable(f"no subject {ref.get('subject')!r} in inline catalog {self.name}") from None

    def by_id(self, schema_id: int) -> SchemaHandle:
        raise Unavailable(f"inline catalog {self.name} has no schema ids")


def check(name: str, options: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    return iter(())


def build(namespace: str, name: str, options: Mapping[str, Any], graph: Any, type_: str = "") -> InlineCatalog:
    return InlineCatalog(namespace, name, options)


PLUGIN = CatalogType(("inline",), SCHEMA_PATCH, build, check=check, check_reference=check_reference,
                     schema_text=schema_text)
