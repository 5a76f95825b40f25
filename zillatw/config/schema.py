"""The JSON Schema of zilla.yaml: Zilla's engine schema, narrowed per binding type.

As in Zilla, the engine schema knows the shape common to every binding and each binding
type brings a patch (its module's SCHEMA_PATCH) that narrows kinds, options and routes.
`x-expect` is ours: the phrase an error shows when an anyOf/oneOf does not match.
`x-refused` is ours too: a key Zilla knows that zillatw refuses, with the reason the error
gives (see refused()); docs/config-reference.md lists every key, and a test walks this
schema to keep the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NAME_PATTERN = r"^[a-zA-Z]+[a-zA-Z0-9\._\-]*$"
KINDS = ["client", "server", "proxy", "remote_client", "remote_server", "cache_client", "cache_server"]
# Zilla's exporter types, and health: ours (zillatw.telemetry.health)
EXPORTER_TYPES = ["stdout", "prometheus", "otlp", "syslog", "aws-cloudwatch", "health"]

NAME = {"type": "string", "pattern": NAME_PATTERN}
# A key a binding type forbids. (A bare `false` schema would lose the key from error paths.)
FORBIDDEN: dict[str, Any] = {"not": {}}


def refused(reason: str) -> dict[str, Any]:
    """A key Zilla's schema allows but zillatw does not serve: any value is an error that
    names the key and says why (never accepted and ignored)."""
    return {"not": {}, "x-refused": reason}

PORT = {"type": "integer", "minimum": 0, "maximum": 65535}
PORT_SPEC = {
    "x-expect": "a port number, a string 'N' or 'N-M', or a list of those",
    "anyOf": [
        PORT,
        {"type": "string", "pattern": r"^\d+(-\d+)?$"},
        {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [PORT, {"type": "string", "pattern": r"^\d+(-\d+)?$"}],
                      "x-expect": "a port number or a string 'N' or 'N-M'"},
        },
    ],
}


def named_map(value_schema: Mapping[str, Any]) -> dict[str, Any]:
    """A map whose keys are Zilla names."""
    return {"type": "object", "propertyNames": NAME, "additionalProperties": value_schema}


def route_schema(condition: Mapping[str, Any] | bool = True,
                 with_: Mapping[str, Any] | bool = False,
                 exit_required: bool = True) -> dict[str, Any]:
    """A binding's `routes[]` item, with the type's condition (`when[]` item) schema."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["exit"] if exit_required else [],
        "properties": {
            "exit": {"type": "string"},
            "when": {"type": "array", "items": condition},
            "with": with_ if with_ is not False else FORBIDDEN,
            "guarded": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
        },
    }


def _typed_section(**extra: Mapping[str, Any]) -> dict[str, Any]:
    """guards, vaults, catalogs: `type`, `options` and the keys Zilla's engine adds, no others."""
    return named_map({
        "type": "object",
        "required": ["type"],
        "additionalProperties": False,
        "properties": {"type": {"type": "string"}, "options": {"type": "object"}, **extra},
    })


GUARD_EXTRAS = {
    "kind": refused("not supported by this zillatw (Zilla's engine schema has it; no guard type uses it)"),
    "store": refused("not supported by this zillatw (a jwt guard keeps its sessions in memory)"),
}
CATALOG_EXTRAS = {
    "vault": refused("not supported by this zillatw yet (a registry over https is verified with the "
                     "system's CAs)"),
}
STORES = named_map(refused("not supported by this zillatw yet (no binding served here uses a store)"))


def _guard_section(patches: Mapping[str, Mapping[str, Any]], **extra: Mapping[str, Any]) -> dict[str, Any]:
    section = _typed_section(**extra)
    section["additionalProperties"]["allOf"] = [
        {"if": {"properties": {"type": {"const": name}}, "required": ["type"]}, "then": patch}
        for name, patch in sorted(patches.items())
    ]
    return section


def engine_schema(patches: Mapping[str, Mapping[str, Any]],
                  guard_patches: Mapping[str, Mapping[str, Any]] | None = None,
                  catalog_patches: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The whole zilla.yaml schema, given each binding (guard, catalog) type's schema patch."""
    binding = {
        "type": "object",
        "required": ["type", "kind"],
        "additionalProperties": False,
        "properties": {
            "type": {"type": "string", "enum": sorted(patches)},
            "kind": {"type": "string", "enum": KINDS},
            "vault": {"type": "string"},
            "options": {"type": "object"},
            "routes": {"type": "array", "items": route_schema(exit_required=False)},
            "exit": {"type": "string"},
            "telemetry": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "metrics": {"type": "array", "items": {"type": "string"}},
                    "attributes": {"type": "object"},
                },
            },
            "catalog": {"type": "object"},
            "entry": refused("only for the remote_client and remote_server kinds, which no zillatw binding has"),
        },
        "allOf": [
            {"if": {"properties": {"type": {"const": name}}, "required": ["type"]}, "then": patch}
            for name, patch in sorted(patches.items())
        ],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": NAME,
            "bindings": named_map(binding),
            "guards": _guard_section(guard_patches or {}, **GUARD_EXTRAS),
            "vaults": _typed_section(),
            "catalogs": _guard_section(catalog_patches or {}, **CATALOG_EXTRAS),
            "stores": STORES,
            "telemetry": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "attributes": {"type": "object"},
                    "metrics": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                    "exporters": named_map({
                        "type": "object",
                        "required": ["type"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string", "enum": EXPORTER_TYPES},
                            "options": {"type": "object"},
                            "vault": refused("not supported by this zillatw (no exporter here needs keys)"),
                        },
                    }),
                },
            },
        },
    }
