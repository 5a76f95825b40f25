"""docs/config-reference.md against the code: the table lists exactly the keys our JSON Schema
has (walked here), every key the table says works is read by the function it names, every
key it says is refused is refused with the message it quotes, and every key's documented
outcome is what zillatw.config.loading.load does with a valid and with an invalid value."""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from zillatw.config import load
from zillatw.config.schema import engine_schema
from zillatw.errors import ConfigError
from zillatw.runtime.standard import standard_registry
from zillatw.test.reference_samples import BASES, SAMPLES

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
TYPES = standard_registry()
SCHEMA = engine_schema({t: plugin.schema_patch for t, plugin in TYPES.bindings.items()},
                       {t: plugin.schema_patch for t, plugin in TYPES.guards.items()},
                       {t: plugin.schema_patch for t, plugin in TYPES.catalogs.items()})
# Keys documented generically (section "bindings"), not again under each type.
GENERIC = {"type", "kind", "options", "routes", "routes[].exit", "routes[].when", "routes[].guarded", "exit",
           "telemetry", "telemetry.metrics", "telemetry.attributes"}
# Subtrees the table describes in one row (their own reference: README's Validation, RFC 7517).
COLLAPSED = {"ws": ("options.messages",), "http": ("options.requests",), "guard jwt": ("options.keys",)}
# Sections whose options our schema leaves to code (the module that checks them is named).
BEYOND_SCHEMA = ("vault filesystem", "exporter prometheus", "exporter health", "exporter stdout", "exporter otlp")
OUTCOMES = ("works", "differs", "ours", "refused")


def keys_of(schema: Any, path: str = "", stop: tuple[str, ...] = ()) -> set[str]:
    """Every key path a schema describes: `a.b`, `<name>` for map keys, `[]` for items."""
    found: set[str] = set()
    if not isinstance(schema, dict) or path in stop:
        return found
    for key, sub in (schema.get("properties") or {}).items():
        child = f"{path}.{key}" if path else key
        found.add(child)
        found |= keys_of(sub, child, stop)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and extra and path:
        found |= keys_of(extra, f"{path}.<name>", stop) | ({f"{path}.<name>"} if "x-refused" in extra else set())
    if isinstance(schema.get("items"), dict):
        found |= keys_of(schema["items"], path + "[]", stop)
    for combinator in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(combinator) or ():
            if "if" not in sub:  # the engine's per-type patches are sections of their own
                found |= keys_of(sub, path, stop)
    for branch in ("then", "else"):
        found |= keys_of(schema.get(branch), path, stop)
    return found


def schema_sections() -> dict[str, set[str]]:
    binding = SCHEMA["properties"]["bindings"]["additionalProperties"]
    sections = {
        "top level": keys_of({"properties": {k: v for k, v in SCHEMA["properties"].items()}},
                             stop=("bindings.<name>", "guards.<name>.options", "catalogs.<name>.options")),
        "bindings": keys_of(binding),
    }
    for name, binding_type in TYPES.bindings.items():
        keys = keys_of(binding_type.schema_patch)
        sections[name] = _collapse(keys - GENERIC | (keys & _forbidden(binding_type.schema_patch)),
                                   COLLAPSED.get(name, ()))
    for name, guard_type in TYPES.guards.items():
        sections[f"guard {name}"] = _collapse(keys_of(guard_type.schema_patch), COLLAPSED.get(f"guard {name}", ()))
    for catalog_type in {id(c): c for c in TYPES.catalogs.values()}.values():  # aliases share a section
        sections[f"catalog {catalog_type.names[0]}"] = keys_of(catalog_type.schema_patch)
    return sections


def _forbidden(patch: Mapping[str, Any]) -> set[str]:
    """The binding keys a type's patch (or one of its kinds) forbids."""
    found = set()
    for schema in (patch, patch.get("then") or {}, patch.get("else") or {}):
        for key, sub in (schema.get("properties") or {}).items():
            if isinstance(sub, dict) and sub.get("not") == {}:
                found.add(key)
    return found


def _collapse(keys: set[str], roots: tuple[str, ...]) -> set[str]:
    return {k for k in keys if not any(k.startswith(root) and k != root for root in roots)}


class Row:
    def __init__(self, section: str, cells: list[str]):
        self.section = section
        self.key = cells[0].strip("` ")
        self.kinds = [k.strip() for k in cells[1].split(",") if k.strip() and k.strip() != "-"]
        self.zilla = cells[2]
        self.ours = cells[3]
        self.outcome = self.ours.split(":")[0].strip("* ").split(" ")[0]
        message = re.search(r"refused: `([^`]+)`", self.ours)
        self.message = message.group(1) if message else None
        self.read_by = cells[4].strip("` ") if len(cells) > 4 else ""

    def __repr__(self) -> str:
        return f"{self.section}: {self.key}"


def table() -> list[Row]:
    rows, section = [], None
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section = line[3:].strip().strip("`")
        elif line.startswith("| `") and section is not None:
            rows.append(Row(section, [c.strip() for c in line.strip().strip("|").split(" | ")]))
    return rows


class TableMatchesSchemaTests(unittest.SynchronousTestCase):
    def test_every_schema_key_has_a_row_and_every_row_a_key(self):
        documented: dict[str, set[str]] = {}
        for row in table():
            documented.setdefault(row.section, set()).add(row.key)
        for section, keys in schema_sections().items():
            self.assertEqual(sorted(keys - documented.get(section, set())), [],
                             f"keys of section '{section}' the table lacks")
            self.assertEqual(sorted(documented.get(section, set()) - keys), [],
                             f"rows of section '{section}' the schema does not have")
        extra = set(documented) - set(schema_sections()) - set(BEYOND_SCHEMA)
        self.assertEqual(extra, set(), "sections the schema does not have")

    def test_every_row_says_an_outcome(self):
        for row in table():
            self.assertIn(row.outcome, OUTCOMES, row)
            if row.outcome == "refused":
                self.assertIsNotNone(row.message, f"{row}: a refused key quotes its message")

    def test_every_key_served_is_read_by_the_function_named(self):
        """The claim 'refused by name, never accepted and ignored': each key the table says
        is served names the code that reads it, which exists and mentions the key."""
        for row in table():
            if row.outcome == "refused":
                continue
            self.assertTrue(row.read_by, f"{row}: which function reads it?")
            module_name, _, attribute = row.read_by.rpartition(".")
            target: Any = None
            while module_name:
                try:
                    target = importlib.import_module(module_name)
                    break
                except ImportError:
                    module_name, _, outer = module_name.rpartition(".")
                    attribute = f"{outer}.{attribute}"
            for part in attribute.split("."):
                target = getattr(target, part)
            word = re.split(r"[.\[\]]+", row.key.replace("<name>", ""))
            last = [w for w in word if w][-1]
            self.assertFalse(inspect.ismodule(target), f"{row}: name the function, not the module")
            source = (inspect.getsource(target) if inspect.isroutine(target) or inspect.isclass(target)
                      else repr(target))  # a module's table of names, e.g. ws._FIELDS
            self.assertTrue(f'"{last}"' in source or f"'{last}'" in source or f".{last}" in source,
                            f"{row}: {row.read_by} does not mention '{last}'")


def _problems(config: dict[str, Any]) -> list[str] | None:
    try:
        load(config, TYPES, env={})
    except ConfigError as e:
        return e.problems
    return None


def _put(config: dict[str, Any], root: list[Any], key: str, value: Any) -> str:
    """Set `key` (a table key: a.b, routes[].when[].port, x.<name>.y) under `root` of config;
    returns the YAML path that errors name."""
    node: Any = config
    for part in root:
        node = node.setdefault(part, {}) if isinstance(part, str) else node[part]
    path = ".".join(str(p) for p in root)
    parts = re.findall(r"[^.\[\]]+|\[\]", key)
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        following = parts[index + 1] if not last else None
        if part == "[]":
            continue
        name = "n" if part == "<name>" else part
        empty: Any = [{}] if following == "[]" else {}
        if last:
            node[name] = value
        else:
            if following == "[]":
                existing = node.get(name)
                node[name] = existing if isinstance(existing, list) and existing else [{}]
                node = node[name][0]
            else:
                node = node.setdefault(name, empty) if isinstance(node.get(name), dict) or name not in node \
                    else node[name]
        path = f"{path}.{name}" if path else name
        if following == "[]":
            path += "[0]"
    return path


class DocumentedOutcomeTests(unittest.SynchronousTestCase):
    """Every row's key through load: a valid value gives the outcome the table says, an
    invalid one a problem at that key."""

    def _cases(self) -> Any:
        for row in table():
            if row.section in BEYOND_SCHEMA and row.section.startswith("vault"):
                continue  # vaults open at build time; zillatw.test.test_tls covers their keys
            kinds: list[str | None] = list(row.kinds) or [None]
            for kind in kinds:
                base, root = BASES[(row.section, kind)] if (row.section, kind) in BASES else BASES[(row.section, None)]
                yield row, kind, base, root

    def test_valid_values(self):
        failures = []
        for row, kind, base, root in self._cases():
            sample = SAMPLES.get((row.section, row.key), SAMPLES.get((row.section, row.key, kind)))
            if sample is None:
                failures.append(f"{row} ({kind}): no sample value in reference_samples")
                continue
            config = copy.deepcopy(base())
            if callable(sample):
                path = sample(config, root)
            else:
                path = _put(config, root, row.key, sample)
            problems = _problems(config)
            if row.outcome == "refused":
                if not problems or not any(p.startswith(path) and row.message in p for p in problems):
                    failures.append(f"{row} ({kind}): expected '{path}: ...{row.message}...', got {problems}")
            elif problems:
                failures.append(f"{row} ({kind}): documented as {row.outcome}, refused: {problems}")
        self.assertEqual(failures, [])

    def test_invalid_values(self):
        failures = []
        for row, kind, base, root in self._cases():
            if row.outcome == "refused" or (row.section, row.key) in UNCONSTRAINED:
                continue
            config = copy.deepcopy(base())
            path = _put(config, root, row.key, INVALID)
            problems = _problems(config)
            if not problems or not any(p.startswith(path) or path.startswith(p.split(":")[0]) for p in problems):
                failures.append(f"{row} ({kind}): {INVALID!r} accepted at {path} ({problems})")
        self.assertEqual(failures, [])


# A value no key takes: not a string, number, boolean, list of strings or mapping of them.
INVALID: Any = [[{"\x00": None}]]
# Keys whose value our schema leaves free (checked nowhere by type): none should be, but the
# ones here hold whatever YAML the user writes for a purpose documented in the table.
UNCONSTRAINED: set[tuple[str, str]] = set()
