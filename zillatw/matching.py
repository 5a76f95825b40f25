"""Zilla's route wildcards: `*` matches anything, everything else is literal, whole value.

Zilla turns a pattern into a Java regex by escaping only `.`; we escape every other regex
character too, so `/a+b` means the path `/a+b` and not a regex. The configs Zilla ships
mean the same under both rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Matcher = Callable[[str | None], bool]


def wildcard(pattern: str, *, named_groups: bool = False, query_tail: bool = False) -> re.Pattern[str]:
    """Compile a Zilla pattern. `named_groups` turns `{name}` into a capture (http headers);
    `query_tail` lets a pattern not ending in `*` also match a trailing `?query` (http :path)."""
    parts = re.split(r"(\*|\{[a-zA-Z_][a-zA-Z0-9_]*\})", pattern) if named_groups else re.split(r"(\*)", pattern)
    regex = []
    names: set[str] = set()
    for part in parts:
        if part == "*":
            regex.append(".*")
        elif named_groups and part.startswith("{") and part.endswith("}"):
            # A name used twice captures once (a regex cannot define a group name twice).
            regex.append(".+?" if part in names else f"(?P<{part[1:-1]}>.+?)")
            names.add(part)
        else:
            regex.append(re.escape(part))
    if query_tail and not pattern.endswith("*"):
        regex.append(r"(?:\?.*)?")
    return re.compile("".join(regex), re.DOTALL)


def matcher(pattern: str | None, **flags: bool) -> Matcher:
    """A predicate for one condition field: unconfigured matches anything, a configured
    field never matches a missing value."""
    if pattern is None:
        return lambda value: True
    if "*" not in pattern and "{" not in pattern and not flags.get("query_tail"):
        return lambda value: value == pattern
    compiled = wildcard(pattern, **flags)
    return lambda value: value is not None and compiled.fullmatch(value) is not None
