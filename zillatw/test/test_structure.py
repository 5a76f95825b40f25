"""The package's structure: no import cycles, function-level imports included; no layer
imports one above it; no test module imports another (shared helpers live in support)."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial import unittest

import zillatw

PACKAGE = Path(zillatw.__file__).parent


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The package's modules `path` imports anywhere in it (a function's body too), but
    under `if TYPE_CHECKING:`, which never runs. A package's own __init__, which importing
    one of its modules runs first, is not counted: only what is imported from it by name."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module, a name: pkg
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    paths = [p for p in root.rglob("*.py") if "test" not in p.relative_to(root).parts]
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imports_of(p, modules, root) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                connect(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return found


def imports_between_test_modules(tests: Path = PACKAGE / "test") -> list[tuple[str, str]]:
    """(importer, imported) for each test module that imports another test module anywhere in
    it: what two test modules share belongs in support.py (or pki.py), which trial does not run."""
    paths = sorted(tests.glob("*.py"))
    root = tests.parent
    modules = {module_name(p, root) for p in paths}
    found = []
    for path in paths:
        for imported in sorted(imports_of(path, modules, root)):
            if imported.rpartition(".")[2].startswith("test_"):
                found.append((module_name(path, root), imported))
    return found


class ImportCycleTests(unittest.TestCase):
    def test_the_package_has_no_import_cycle(self):
        graph = import_graph()
        self.assertIn("zillatw.runtime.gateway", graph)
        self.assertEqual(cycles(graph), [])

    def test_the_config_model_imports_no_plug_in_or_metrics(self):
        imported = import_graph()["zillatw.config.loading"]
        self.assertEqual({m for m in imported if m.startswith(("zillatw.bindings", "zillatw.guards",
                                                                "zillatw.catalogs", "zillatw.telemetry.metrics",
                                                                "zillatw.runtime.gateway"))}, set())

    def test_no_layer_imports_a_layer_above_it(self):
        """wire/ is sans-IO and stands alone; config/ knows no binding, telemetry or runtime;
        nothing below runtime/ imports it; guards, catalogs, vaults and telemetry know no
        binding (a binding hands its counters to telemetry, not the other way round)."""
        allowed = {
            "zillatw.wire": ("zillatw.wire",),
            "zillatw.config": ("zillatw.config", "zillatw.errors", "zillatw.matching"),
        }
        below_runtime = ("zillatw.config", "zillatw.wire", "zillatw.bindings", "zillatw.guards",
                         "zillatw.catalogs", "zillatw.vaults", "zillatw.telemetry", "zillatw.stream")
        no_bindings = ("zillatw.guards", "zillatw.catalogs", "zillatw.vaults", "zillatw.telemetry")
        graph = import_graph()
        self.assertIn("zillatw.bindings.ws.binding", graph)
        upward = []
        for module, imported in sorted(graph.items()):
            for layer, permitted in allowed.items():
                if module.startswith(layer):
                    upward += [(module, m) for m in imported if not m.startswith(permitted)]
            if module.startswith(below_runtime):
                upward += [(module, m) for m in imported if m.startswith("zillatw.runtime")]
            if module.startswith(no_bindings):
                upward += [(module, m) for m in imported if m.startswith("zillatw.bindings")]
        self.assertEqual(upward, [])

    def test_a_cycle_through_a_function_level_import_is_found(self):
        root = Path(self.mktemp()) / "zillatw"
        (root / "sub").mkdir(parents=True)
        (root / "__init__.py").write_text("")
        (root / "a.py").write_text("from zillatw.sub import b\n")
        (root / "sub" / "__init__.py").write_text("")
        (root / "sub" / "b.py").write_text("def later():\n    from .. import a\n")
        (root / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from zillatw import a\n")
        graph = import_graph(root)
        self.assertEqual(graph["zillatw.c"], set())  # under TYPE_CHECKING: never imported
        self.assertEqual(cycles(graph), [["zillatw.a", "zillatw.sub.b"]])



class TestModuleTests(unittest.TestCase):
    def test_no_test_module_imports_another(self):
        self.assertTrue((PACKAGE / "test" / "support.py").exists())
        self.assertEqual(imports_between_test_modules(), [])

    def test_an_import_of_a_test_module_is_found_in_a_function_too(self):
        tests = Path(self.mktemp()) / "zillatw" / "test"
        tests.mkdir(parents=True)
        (tests.parent / "__init__.py").write_text("")
        (tests / "__init__.py").write_text("")
        (tests / "support.py").write_text("HELPER = 1\n")
        (tests / "test_a.py").write_text("from zillatw.test.support import HELPER\n")
        (tests / "test_b.py").write_text("def later():\n    from zillatw.test.test_a import HELPER\n")
        (tests / "test_c.py").write_text("from . import test_a\n")
        self.assertEqual(imports_between_test_modules(tests),
                         [("zillatw.test.test_b", "zillatw.test.test_a"),
                          ("zillatw.test.test_c", "zillatw.test.test_a")])


class ModuleSizeTests(unittest.TestCase):
    def test_every_module_reads_in_one_sitting(self):
        """At most 600 lines a module, tests and support included (the house rule)."""
        long = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
                if (n := len(path.read_text().splitlines())) > 600}
        self.assertEqual(long, {})
