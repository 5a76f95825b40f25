"""Read zilla.yaml within stated bounds, so that a broken or hostile file fails fast and small.

The file is read up to a byte limit, decoded as strict UTF-8, and turned into Python values
from the YAML parser's event stream by an iterative builder (no recursion, so no depth
reaches Python's recursion limit here) that:
- counts nodes with aliases expanded (an alias counts as many nodes as what it names), so a
  "billion laughs" file is refused after `max_nodes`, long before it costs memory: the
  values it would expand to are never built, and the code after loading (`${{env}}`
  resolution, schema validation) copies or walks at most that many nodes;
- refuses nesting deeper than `max_depth`, well below the recursion limit of the code that
  walks the result recursively (resolution, jsonschema, dumping);
- refuses a mapping key given twice, naming where each was (YAML says keys are unique;
  PyYAML lets the last one win silently);
- refuses tags other than YAML's core ones, and recursive aliases.

Values are what `yaml.safe_load` gives (the same implicit types, merge keys `<<`).
libyaml's parser (PyYAML's CParser) is used when PyYAML was built with it: about 10x faster
than the pure Python one, and the bounds are the same with either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from zillatw.errors import ConfigError

# Zilla's largest examples are a few KB and a generated configuration of 1,000 bindings is
# about 300 KB and 30,000 nodes; these leave an order of magnitude (or more) of room.
MAX_BYTES = 4 * 1024 * 1024
MAX_NODES = 1_000_000
MAX_DEPTH = 64  # the deepest real zilla.yaml paths are about 10 levels


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one configuration file; the flags that override each are in FLAGS."""

    max_bytes: int = MAX_BYTES
    max_nodes: int = MAX_NODES
    max_depth: int = MAX_DEPTH


DEFAULT_LIMITS = Limits()
# Limits field -> command-line flag (`python -m zillatw check`, `twistd zillaws`)
FLAGS = {"max_bytes": "max-config-bytes", "max_nodes": "max-config-nodes", "max_depth": "max-config-depth"}
HELP = {"max_bytes": "refuse a configuration file larger than this many bytes",
        "max_nodes": "refuse a configuration of more YAML nodes than this, each alias counting what it repeats",
        "max_depth": "refuse a configuration nested deeper than this"}


def limits_from(values: Mapping[str, Any]) -> Limits:
    """Limits from command-line options keyed by flag name (None: the default); ValueError
    naming the flag for a value that is not a positive integer."""
    chosen = {}
    for field, flag in FLAGS.items():
        value = values.get(flag)
        if value is None:
            continue
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{flag}: expected a positive integer, got {value!r}")
        chosen[field] = value
    return Limits(**chosen)


def limit_flags(limits: Limits) -> list[str]:
    """The command-line flags that give `limits` (those that are not the default)."""
    flags = []
    for field, flag in FLAGS.items():
        if getattr(limits, field) != getattr(DEFAULT_LIMITS, field):
            flags += [f"--{flag}", str(getattr(limits, field))]
    return flags

LOADER = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader
_TAG = "tag:yaml.org,2002:"
_STR, _MERGE = _TAG + "str", _TAG + "merge"
_SEQUENCE_TAGS = (None, "!", _TAG + "seq")
_MAPPING_TAGS = (None, "!", _TAG + "map")
_SCALAR_TAGS = {_TAG + name for name in ("null", "bool", "int", "float", "str", "binary", "timestamp")}
_NO_KEY = object()
_MERGE_KEY = object()  # a merge key in a mapping being built (never a real key)


def read_documents(path: Path, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """The YAML documents of the file at `path` (None for empty ones); ConfigError otherwise."""
    data = _read_bounded(path, limits.max_bytes)
    return load_text(_decode(path, data), str(path), limits)


def load_text(text: str, name: str, limits: Limits = DEFAULT_LIMITS, loader_class: Any = None) -> list[Any]:
    """The YAML documents in `text`; `name` starts every error message. `loader_class`: a
    PyYAML loader whose parser gives the events (LOADER unless told)."""
    loader = None
    try:
        loader = (loader_class or LOADER)(text)  # the pure Python one checks the characters here
        return _Builder(name, limits).build(loader)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_parse_error(name, e, limits, text)) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, e.g. NUL
        line, column = _position(text, e.position)
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError(f"{name}:{line}:{column}: invalid YAML: the character U+{code:04X} is not allowed "
                          "in a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: invalid YAML: {e}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _flag(field: str) -> str:
    return f"--{FLAGS[field]}"


def _read_bounded(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as file:
            # Read one byte more than allowed rather than trust the size stat() gives: the
            # path may be a pipe or a device, or the file may grow while we read it.
            data = file.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration ({e.strerror or e})") from None
    if len(data) > limit:
        try:
            size = f"{path.stat().st_size:,} bytes"
        except OSError:
            size = "more"
        raise ConfigError(f"{path}: the file is too large ({size}; the limit is {limit:,} bytes, "
                          f"{_flag('max_bytes')})")
    return data


def _decode(path: Path, data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1  # in bytes: the line is not decodable
        raise ConfigError(f"{path}:{line}:{column}: the file is not UTF-8: byte 0x{data[e.start]:02x} at offset "
                          f"{e.start:,} ({e.reason}); zilla.yaml must be UTF-8") from None


def _position(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def _parse_error(name: str, error: yaml.MarkedYAMLError, limits: Limits, text: str) -> str:
    mark = error.problem_mark
    where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
    problem = error.problem or str(error)
    if "maximum nesting depth" in problem:  # libyaml's own bound (1,000 levels), met before ours
        return f"{where}: nesting is deeper than {min(limits.max_depth, 1000)} levels (the limit, {_flag('max_depth')})"
    if mark and "cannot start any token" in problem and _character_at(text, mark.line, mark.column) == "\t":
        problem += " (a tab: YAML indents with spaces only)"
    return f"{where}: invalid YAML: {problem}"


def _character_at(text: str, line: int, column: int) -> str:
    start = 0
    for _ in range(line):
        start = text.find("\n", start) + 1
        if start == 0:
            return ""
    return text[start + column:start + column + 1]


def _at(name: str, mark: Any) -> str:
    return f"{name}:{mark.line + 1}:{mark.column + 1}"


class _Frame:
    """A sequence or mapping being built."""

    __slots__ = ("value", "is_mapping", "start", "anchor", "mark", "slot", "key", "key_mark", "key_text",
                 "key_marks", "merges")

    def __init__(self, value: Any, start: int, anchor: str | None, mark: Any, slot: Any):
        self.value = value
        self.is_mapping = isinstance(value, dict)
        self.start = start  # the node count when it began: its expanded size is counted from there
        self.anchor, self.mark, self.slot = anchor, mark, slot  # slot: its key or index in the parent
        self.key: Any = _NO_KEY
        self.key_mark: Any = None
        self.key_text = ""
        self.key_marks: dict[Any, Any] = {}
        self.merges: list[Mapping[Any, Any]] = []


class _Builder:
    def __init__(self, name: str, limits: Limits):
        self.name, self.limits = name, limits
        self.count = 0
        self.stack: list[_Frame] = []
        self.documents: list[Any] = []
        # anchor -> (value, expanded node count), or the frame while it is still open
        self.anchors: dict[str, Any] = {}
        self.resolver = Resolver()
        self.constructor = SafeConstructor()

    def fail(self, mark: Any, message: str) -> NoReturn:
        path = self.path()
        if len(path) > 80:  # e.g. the path of a nesting too deep: its two ends say enough
            path = f"{path[:40]}...{path[-30:]}"
        raise ConfigError(f"{_at(self.name, mark)}: {message}" + (f" (in {path})" if path else ""))

    def path(self) -> str:
        """The YAML path of the innermost value being built, as config errors name paths."""
        path = ""
        for frame in self.stack[1:]:
            if isinstance(frame.slot, int):
                path += f"[{frame.slot}]"
            else:
                path += f".{frame.slot}" if path else str(frame.slot)
        return path

    def counted(self, nodes: int, mark: Any) -> None:
        self.count += nodes
        if self.count > self.limits.max_nodes:
            self.fail(mark, f"more than {self.limits.max_nodes:,} YAML nodes, counting each alias as the nodes "
                            f"it repeats (the limit, {_flag('max_nodes')})")

    def build(self, loader: Any) -> list[Any]:
        while True:
            event = loader.get_event()
            kind = type(event)
            if kind is ScalarEvent:
                self.counted(1, event.start_mark)
                value, is_merge = self.scalar(event)
                if event.anchor is not None:
                    self.anchors[event.anchor] = (value, 1)
                self.add(value, event.start_mark, is_merge, event.value)
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                self.begin(event, kind is MappingStartEvent)
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                self.end()
            elif kind is AliasEvent:
                self.alias(event)
            elif kind is DocumentStartEvent:
                self.anchors = {}  # an anchor names a node of its own document only
            elif kind is StreamEndEvent:
                return self.documents

    def scalar(self, event: ScalarEvent) -> tuple[Any, bool]:
        tag = event.tag
        if tag is None or tag == "!":
            tag = self.resolver.resolve(ScalarNode, event.value, event.implicit)  # type: ignore[no-untyped-call]  # PyYAML is untyped
        if tag == _STR:
            return event.value, False
        if tag == _MERGE:  # '<<': a merge key where a key is expected, else the string
            return event.value, True
        if tag not in _SCALAR_TAGS:
            self.fail(event.start_mark, f"the tag '{event.tag}' is not supported (YAML's core types only)")
        # The stubs type ScalarNode's marks as the pure-Python parser's Mark; the C parser's
        # (yaml._yaml.Mark) has the same fields, and a node only stores them.
        node = ScalarNode(tag, event.value, event.start_mark, event.end_mark,  # type: ignore[arg-type]
                          event.style)
        try:
            return self.constructor.yaml_constructors[tag](self.constructor, node), False
        except (yaml.YAMLError, ValueError, OverflowError) as e:  # e.g. an integer of 5,000 digits
            shown = (event.value if len(event.value) <= 40
                     else f"{event.value[:40]}... ({len(event.value):,} characters)")
            reason = f": {e.problem}" if isinstance(e, yaml.MarkedYAMLError) and e.problem else ""
            self.fail(event.start_mark, f"'{shown}' is not a valid {tag[len(_TAG):]}{reason}")

    def begin(self, event: Any, is_mapping: bool) -> None:
        self.counted(1, event.start_mark)
        if len(self.stack) >= self.limits.max_depth:
            self.fail(event.start_mark, f"nesting is deeper than {self.limits.max_depth} levels "
                                        f"(the limit, {_flag('max_depth')})")
        if event.tag not in (_MAPPING_TAGS if is_mapping else _SEQUENCE_TAGS):
            self.fail(event.start_mark, f"the tag '{event.tag}' is not supported (YAML's core types only)")
        parent = self.stack[-1] if self.stack else None
        if parent is None:
            slot: Any = None
        elif parent.is_mapping:
            slot = parent.key_text if parent.key is not _NO_KEY else "<key>"
        else:
            slot = len(parent.value)
        frame = _Frame({} if is_mapping else [], self.count, event.anchor, event.start_mark, slot)
        if event.anchor is not None:
            self.anchors[event.anchor] = frame
        self.stack.append(frame)

    def end(self) -> None:
        frame = self.stack[-1]
        value = frame.value
        if frame.merges:  # keys of the mapping itself win, then earlier merged mappings over later ones
            merged: dict[Any, Any] = {}
            for source in reversed(frame.merges):
                merged.update(source)
            merged.update(value)
            value = merged
        if frame.anchor is not None:
            self.anchors[frame.anchor] = (value, self.count - frame.start + 1)
        self.stack.pop()
        self.add(value, frame.mark, False, None)

    def alias(self, event: AliasEvent) -> None:
        target = self.anchors.get(event.anchor) if event.anchor is not None else None
        if target is None:
            self.fail(event.start_mark, f"the alias '*{event.anchor}' names no anchor defined before it")
        if isinstance(target, _Frame):
            self.fail(event.start_mark, f"the alias '*{event.anchor}' is inside the node it names (a recursive alias)")
        value, size = target
        self.counted(size, event.start_mark)
        self.add(value, event.start_mark, False, f"*{event.anchor}")

    def add(self, value: Any, mark: Any, is_merge: bool, text: str | None) -> None:
        if not self.stack:
            self.documents.append(value)
            return
        parent = self.stack[-1]
        if not parent.is_mapping:
            parent.value.append(value)
            return
        if parent.key is _NO_KEY:
            if isinstance(value, (dict, list)):
                self.fail(mark, "a mapping key must be a scalar, not a mapping or a list")
            parent.key = _MERGE_KEY if is_merge else value
            parent.key_mark, parent.key_text = mark, text if text is not None else str(value)
            return
        key, key_mark = parent.key, parent.key_mark
        parent.key = _NO_KEY
        first = parent.key_marks.get(key)
        if first is not None:
            shown = "<<" if key is _MERGE_KEY else parent.key_text
            self.fail(key_mark, f"duplicate key '{shown}' (first at {first.line + 1}:{first.column + 1}, "
                                f"again at {key_mark.line + 1}:{key_mark.column + 1}; a key may appear once)")
        parent.key_marks[key] = key_mark
        if key is _MERGE_KEY:
            sources = value if isinstance(value, list) else [value]
            if not sources or not all(isinstance(source, dict) for source in sources):
                self.fail(key_mark, "the merge key '<<' takes a mapping or a list of mappings")
            parent.merges.extend(sources)
        else:
            parent.value[key] = value
