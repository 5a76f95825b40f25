"""Load zilla.yaml: parse, resolve `${{env.NAME}}`, validate, cross-check, and model it.

Nothing here knows of sockets, and nothing here imports a binding, guard, catalog or
metrics module: the types served come in a registry (zillatw.config.plugins.Registry; the built-in
ones: zillatw.runtime.standard.standard_registry()), each giving its schema patch, the stream kinds
it accepts and emits, and its checks.
An invalid file raises ConfigError listing every problem as `path: what was expected`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jsonschema

from zillatw.config.checks import cross_check
from zillatw.config.model import BindingConfig, Config, NamespaceConfig, Route
from zillatw.config.schema import FORBIDDEN, KINDS, engine_schema
from zillatw.config.yamlload import DEFAULT_LIMITS, Limits, read_documents
from zillatw.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from zillatw.config.plugins import Registry

_EXPRESSION = re.compile(r"\$\{\{\s*([a-zA-Z0-9_.\-#]+)\s*\}\}")


def load(source: str | os.PathLike[str] | Mapping[str, Any] | list[Mapping[str, Any]],
         registry: Registry,
         env: Mapping[str, str] | None = None,
         base_dir: str | os.PathLike[str] | None = None,
         limits: Limits = DEFAULT_LIMITS) -> Config:
    """Load a configuration from a file path, a dict, or a list of dicts (namespaces).
    A file is read within `limits` (size, nodes, nesting: zillatw.config.yamlload)."""
    documents, origin, folder = _documents_of(source, base_dir, limits)
    prefix_names = len(documents) > 1
    resolved = _resolve_documents(documents, os.environ if env is None else env, prefix_names)
    _raise_if(_schema_problems(resolved, registry, prefix_names))
    config = _model(resolved, origin, folder)
    _raise_if(list(cross_check(config, registry, prefix_names)))
    return config


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def _documents_of(source: str | os.PathLike[str] | Mapping[str, Any] | list[Mapping[str, Any]],
                  base_dir: str | os.PathLike[str] | None,
                  limits: Limits) -> tuple[list[Any], str, Path]:
    """The documents, where they came from (for messages) and the folder relative paths start in."""
    if isinstance(source, Mapping):
        return [source], "<dict>", Path(base_dir or os.getcwd())
    if isinstance(source, list):
        return list(source), "<dict>", Path(base_dir or os.getcwd())
    path = Path(source)
    return _read_yaml(path, limits), str(path), Path(base_dir or path.resolve().parent)


def _resolve_documents(documents: list[Any], env: Mapping[str, str], prefix_names: bool) -> list[Mapping[str, Any]]:
    """Each document with its `${{env.NAME}}` resolved; every problem of every document at once."""
    problems: list[str] = []
    resolved: list[Mapping[str, Any]] = []
    for index, document in enumerate(documents):
        where = f"documents[{index}]" if prefix_names else ""
        if not isinstance(document, Mapping):
            problems.append(f"{where or 'top level'}: expected a mapping with 'name' and 'bindings', "
                            f"got {_type_name(document)}")
            continue
        resolved.append(_resolve(document, env, where, problems))
    _raise_if(problems)
    return resolved


def _schema_problems(documents: list[Mapping[str, Any]], registry: Registry, prefix_names: bool) -> list[str]:
    """What the engine's schema and the types' patches say of each document, each problem once."""
    validator = jsonschema.Draft202012Validator(engine_schema(
        {t: plugin.schema_patch for t, plugin in registry.bindings.items()},
        {t: plugin.schema_patch for t, plugin in registry.guards.items()},
        {t: plugin.schema_patch for t, plugin in registry.catalogs.items()}))
    problems: list[str] = []
    for index, document in enumerate(documents):
        where = f"{document.get('name', f'documents[{index}]')}: " if prefix_names else ""
        errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
        for error in _reported(errors):
            problem = where + _describe(error, document)
            # The engine's schema and a type's patch may both refuse the same key: say it once.
            if problem not in problems:
                problems.append(problem)
    return problems


def _reported(errors: list[jsonschema.ValidationError]) -> list[jsonschema.ValidationError]:
    """The errors worth a line: of two schemas saying the same thing, the one that applies."""
    enum_paths = [tuple(e.absolute_path) for e in errors if e.validator == "enum"]
    # The engine's schema and a type's patch both refuse an unknown key: report the
    # patch's, whose list of expected keys is the narrower (the one that applies).
    unknown: dict[tuple[tuple[Any, ...], frozenset[Any]], jsonschema.ValidationError] = {}
    for error in errors:
        if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
            known = _schema_of(error).get("properties", {})
            keys = (tuple(error.absolute_path), frozenset(k for k in error.instance if k not in known))
            if keys not in unknown or _served(known) < _served(_schema_of(unknown[keys]).get("properties", {})):
                unknown[keys] = error
    chosen = {id(e) for e in unknown.values()}
    # A key the engine refuses with a reason may also be forbidden by the type: the reason.
    refused = {tuple(e.absolute_path) for e in errors if e.validator == "not" and "x-refused" in _schema_of(e)}
    reported = []
    for error in errors:
        schema, at = _schema_of(error), tuple(error.absolute_path)
        if error.validator == "additionalProperties" and id(error) not in chosen:
            continue
        if error.validator == "not" and "x-refused" not in schema and at in refused:
            continue
        # A kind outside Zilla's fails the engine's enum and the type's narrower one: say it once.
        if error.validator == "enum" and schema.get("enum") == KINDS and enum_paths.count(at) > 1:
            continue
        reported.append(error)
    return reported


def _read_yaml(path: Path, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    documents = [d for d in read_documents(path, limits) if d is not None]
    if not documents:
        raise ConfigError(f"{path}: the configuration is empty (expected at least 'name' and 'bindings')")
    return documents


def _resolve(value: Any, env: Mapping[str, str], path: str, problems: list[str]) -> Any:
    """Replace `${{env.NAME}}` expressions in every string."""
    if isinstance(value, Mapping):
        return {k: _resolve(v, env, _join(path, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${{" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        expression = match.group(1)
        scope, _, name = expression.partition(".")
        if scope != "env":
            problems.append(f"{path}: the resolver '{scope}' in '${{{{{expression}}}}}' is not supported "
                            "(zillatw resolves ${{env.NAME}})")
            return ""
        if name not in env:
            problems.append(f"{path}: environment variable {name} is not set (used as '${{{{env.{name}}}}}')")
            return ""
        return env[name]

    return _EXPRESSION.sub(substitute, value)


# ---------------------------------------------------------------------------- schema errors

def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _path_of(error: jsonschema.ValidationError) -> str:
    path = ""
    for key in error.absolute_path:
        path = _join(path, key)
    return path or "top level"


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _binding_of(error: jsonschema.ValidationError, document: Mapping[str, Any]) -> str:
    """'a ws server binding' for errors under bindings.<name>, else ''."""
    path = list(error.absolute_path)
    if len(path) >= 2 and path[0] == "bindings":
        binding = document.get("bindings", {}).get(path[1], {})
        if isinstance(binding, Mapping) and "type" in binding:
            article = "an" if str(binding.get("type"))[:1] in "aeiou" else "a"
            return f"{article} {binding.get('type')} {binding.get('kind', '')}".rstrip() + " binding"
    return ""


def _served(properties: Mapping[str, Any]) -> int:
    """How many of a schema's keys zillatw takes (refused ones are not offered in errors)."""
    return sum(1 for v in properties.values() if not (isinstance(v, Mapping) and "x-refused" in v))


def _schema_of(error: jsonschema.ValidationError) -> Mapping[str, Any]:
    """The (sub)schema an error is about; a boolean schema (`false`) has no keywords."""
    return error.schema if isinstance(error.schema, Mapping) else {}


def _describe(error: jsonschema.ValidationError, document: Mapping[str, Any]) -> str:
    """One line for one error, `path: what was expected`, worded for the validator that failed."""
    path = _path_of(error)
    describe = _DESCRIBERS.get(str(error.validator))
    line = describe(error, path, document) if describe else None
    return line if line is not None else f"{path}: {error.message}"


def _describe_unknown_keys(error: jsonschema.ValidationError, path: str, document: Mapping[str, Any]) -> str | None:
    if not isinstance(error.instance, Mapping):
        return None
    allowed = [k for k, v in _schema_of(error).get("properties", {}).items()
               if not (isinstance(v, Mapping) and ("x-refused" in v or v == FORBIDDEN))]
    extra = [k for k in error.instance if k not in allowed]
    if len(extra) == 1 and not allowed:
        return f"{_join(path, extra[0])}: not allowed here"
    names = ", ".join(f"'{k}'" for k in extra)
    hint = did_you_mean(extra[0], allowed) if len(extra) == 1 else ""
    return f"{path}: unknown key {names}{hint} (expected one of: {', '.join(allowed)})"


def _describe_missing(error: jsonschema.ValidationError, path: str, document: Mapping[str, Any]) -> str:
    missing = error.message.split("'")[1] if "'" in error.message else error.message
    return f"{path}: missing required key '{missing}'"


def _describe_choice(error: jsonschema.ValidationError, path: str, document: Mapping[str, Any]) -> str:
    options, value = _schema_of(error)["enum"], error.instance
    if path.endswith(".type") and path.startswith("bindings."):
        return (f"{path}: unknown binding type '{value}'{did_you_mean(str(value), options)} "
                f"(zillatw serves: {', '.join(options)})")
    if path.endswith(".kind") and (where := _binding_of(error, document)):
        return (f"{path}: {where.rsplit(' ', 2)[0]} binding cannot be of kind '{value}' "
                f"(expected {' or '.join(options)})")
    return f"{path}: expected one of {', '.join(map(str, options))}, got '{value}'{did_you_mean(str(value), options)}"


def _describe_refused(error: jsonschema.ValidationError, path: str, document: Mapping[str, Any]) -> str | None:
    schema = _schema_of(error)
    if "x-refused" in schema:
        return f"{path}: {schema['x-refused']}"
    if schema == {"not": {}}:
        where = _binding_of(error, document)
        return f"{path}: not allowed" + (f" for {where}" if where else " here")
    return None


def _describe_repeated(error: jsonschema.ValidationError, path: str, document: Mapping[str, Any]) -> str | None:
    value = error.instance
    if isinstance(value, list):
        for index, item in enumerate(value):
            if item in value[:index]:
                return f"{path}[{index}]: {item!r} is listed twice (also at {path}[{value.index(item)}])"
    return None


def _describe_type(error: jsonschema.ValidationError, path: str, document: Mapping[str, Any]) -> str:
    expected = _schema_of(error)["type"]
    expected = " or ".join(expected) if isinstance(expected, list) else expected
    return f"{path}: expected {'an' if expected[0] in 'aeiou' else 'a'} {expected}, got {_type_name(error.instance)}"


def _describe_pattern(error: jsonschema.ValidationError, path: str, document: Mapping[str, Any]) -> str:
    pattern, value = _schema_of(error)["pattern"], error.instance
    if pattern == r"^[a-zA-Z]+[a-zA-Z0-9\._\-]*$":
        return f"{path}: '{value}' is not a valid name (a letter first, then letters, digits, '.', '_' or '-')"
    return f"{path}: '{value}' does not match {pattern}"


def _describe_alternatives(error: jsonschema.ValidationError, path: str, document: Mapping[str, Any]) -> str | None:
    schema = _schema_of(error)
    if "x-expect" in schema:
        deeper = [e for e in error.context or () if e.path]  # e.g. one bad item of a list
        if deeper:
            return _describe(max(deeper, key=jsonschema.exceptions.relevance), document)
        return f"{path}: expected {schema['x-expect']}, got {_type_name(error.instance)} {error.instance!r}"
    if error.context:
        return _describe(jsonschema.exceptions.best_match(error.context), document)
    return None


# How each JSON Schema validator's failure is worded; one not named here (minimum, maxItems,
# propertyNames, ...) says jsonschema's own message, which already reads well.
_DESCRIBERS: dict[str, Callable[[jsonschema.ValidationError, str, Mapping[str, Any]], str | None]] = {
    "additionalProperties": _describe_unknown_keys,
    "required": _describe_missing,
    "enum": _describe_choice,
    "not": _describe_refused,
    "uniqueItems": _describe_repeated,
    "type": _describe_type,
    "pattern": _describe_pattern,
    "anyOf": _describe_alternatives,
    "oneOf": _describe_alternatives,
}


# ---------------------------------------------------------------------------- model

def _qualify(reference: str, namespace: str) -> str:
    return reference if ":" in reference else f"{namespace}:{reference}"


def _model(documents: list[Mapping[str, Any]], origin: str, folder: Path) -> Config:
    namespaces = []
    for document in documents:
        ns = document["name"]
        bindings = {}
        for name, raw in (document.get("bindings") or {}).items():
            routes = []
            for index, r in enumerate(raw.get("routes") or []):
                routes.append(Route(
                    index=index,
                    exit=_qualify(r["exit"], ns) if r.get("exit") else None,
                    when=tuple(MappingProxyType(dict(w)) for w in r.get("when") or ()),
                    guarded=MappingProxyType({g: tuple(roles) for g, roles in (r.get("guarded") or {}).items()}),
                    with_=r.get("with"),
                ))
            exit_ = _qualify(raw["exit"], ns) if raw.get("exit") else None
            if exit_:
                routes.append(Route(index=len(routes), exit=exit_))
            bindings[name] = BindingConfig(
                namespace=ns, name=name, type=raw["type"], kind=raw["kind"],
                options=MappingProxyType(dict(raw.get("options") or {})),
                routes=tuple(routes), exit=exit_, vault=raw.get("vault"),
                telemetry=MappingProxyType(dict(raw.get("telemetry") or {})), base_dir=folder)
        namespaces.append(NamespaceConfig(
            name=ns, bindings=MappingProxyType(bindings),
            telemetry=MappingProxyType(dict(document.get("telemetry") or {})),
            guards=MappingProxyType(dict(document.get("guards") or {})),
            vaults=MappingProxyType(dict(document.get("vaults") or {})),
            catalogs=MappingProxyType(dict(document.get("catalogs") or {}))))
    return Config(tuple(namespaces), origin, folder, tuple(documents))


