"""zillatw.config.yamlload and load_config against the files of issue 12 (findings 5 and 12): a
9 MB file, a 1 KB alias bomb, 50,000-deep nesting, a file that is not UTF-8, a key given
twice, a configuration that listens on nothing. Each is refused fast, small, and with an
error naming the limit or both places; what a real zilla.yaml holds still loads the same."""

from __future__ import annotations

import glob
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import yaml
from twisted.trial import unittest

from zillatw import build_gateway, load_config
from zillatw.config import load
from zillatw.config.yamlload import (
    DEFAULT_LIMITS,
    MAX_BYTES,
    MAX_DEPTH,
    MAX_NODES,
    Limits,
    limit_flags,
    limits_from,
    load_text,
)
from zillatw.errors import ConfigError
from zillatw.runtime.standard import standard_registry
from zillatw.test.support import CONF, alias_bomb, chain, nine_megabytes

ECHO = Path(CONF, "ws.echo.yaml").read_text()


def generated(bindings: int) -> str:
    """A generated configuration: `bindings` tcp -> http -> ws chains to one echo."""
    out = ["name: generated", "bindings:"]
    for i in range(bindings):
        out += [f"  tcp{i}:", "    type: tcp", "    kind: server", "    options:", "      host: 127.0.0.1",
                f"      port: {10000 + i}", f"    exit: http{i}",
                f"  http{i}:", "    type: http", "    kind: server", "    routes:", "      - when:",
                "          - headers:", "              upgrade: websocket", f"        exit: ws{i}",
                f"  ws{i}:", "    type: ws", "    kind: server", "    exit: echo"]
    return "\n".join(out + ["  echo:", "    type: echo", "    kind: server"]) + "\n"


class Files(unittest.SynchronousTestCase):
    loader: Any = None  # zillatw.config.yamlload.LOADER (libyaml's parser when PyYAML has it)

    def write(self, content: str | bytes) -> str:
        path = os.path.abspath(self.mktemp() + ".yaml")
        Path(path).write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def refused(self, content: str | bytes, limits: Limits = DEFAULT_LIMITS, seconds: float = 2.0) -> str:
        """The one problem loading `content` gives, checked to come within `seconds`."""
        if self.loader is not None:
            self.patch(sys.modules["zillatw.config.yamlload"], "LOADER", self.loader)
        path = self.write(content)
        started = time.perf_counter()
        with self.assertRaises(ConfigError) as caught:
            load_config(path, limits=limits)
        elapsed = time.perf_counter() - started
        self.assertLess(elapsed, seconds)
        self.assertEqual(len(caught.exception.problems), 1, caught.exception.problems)
        return caught.exception.problems[0].replace(path, "FILE")


class BoundsTests(Files):
    def test_a_9_megabyte_file_is_refused_before_it_is_parsed(self):
        problem = self.refused(nine_megabytes(), seconds=0.5)
        self.assertEqual(problem, f"FILE: the file is too large (9,000,001 bytes; the limit is {MAX_BYTES:,} bytes, "
                                  "--max-config-bytes)")

    def test_an_endless_file_is_read_only_up_to_the_limit(self):
        started = time.perf_counter()
        with self.assertRaises(ConfigError) as caught:
            load_config("/dev/zero", limits=Limits(max_bytes=1000))
        self.assertLess(time.perf_counter() - started, 0.5)
        self.assertIn("/dev/zero: the file is too large", str(caught.exception))
        self.assertIn("the limit is 1,000 bytes, --max-config-bytes", str(caught.exception))

    def test_an_alias_bomb_is_refused_by_counting_not_by_running_out_of_memory(self):
        bomb = alias_bomb()
        self.assertLess(len(bomb), 1024)
        tracemalloc.start()
        try:
            problem = self.refused(bomb, seconds=0.5)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 10 * 1024 * 1024)  # 387 million strings would be some 3 GB
        # a0 to a5 are 664,300 nodes, and the first alias in a6 repeats 597,871 more.
        self.assertEqual(problem, "FILE:8:10: more than 1,000,000 YAML nodes, counting each alias as the nodes "
                                  "it repeats (the limit, --max-config-nodes) (in a6)")

    def test_aliases_within_the_limit_load_as_shared_values(self):
        documents = load_text("a: &a [1, 2]\nb: [*a, *a]\n", "f")
        self.assertEqual(documents, [{"a": [1, 2], "b": [[1, 2], [1, 2]]}])
        # The root, its two keys, b's list and three times the 3-node list [1, 2]: 13 nodes.
        self.assertEqual(load_text("a: &a [1, 2]\nb: [*a, *a]\n", "f", Limits(max_nodes=13)), documents)
        with self.assertRaises(ConfigError) as caught:
            load_text("a: &a [1, 2]\nb: [*a, *a]\n", "f", Limits(max_nodes=12))
        self.assertEqual(str(caught.exception), "f:2:9: more than 12 YAML nodes, counting each alias as the nodes "
                                                "it repeats (the limit, --max-config-nodes) (in b)")

    def test_50000_deep_nesting_is_refused_naming_the_limit(self):
        problem = self.refused("[" * 50_000 + "]" * 50_000)
        self.assertRegex(problem, rf"^FILE:1:\d+: nesting is deeper than {MAX_DEPTH} levels "
                                  r"\(the limit, --max-config-depth\)")

    def test_deep_block_nesting_is_refused_at_the_limit(self):
        text = "".join("  " * level + f"k{level}:\n" for level in range(MAX_DEPTH + 1)) + "  " * (MAX_DEPTH + 1) + "x\n"
        problem = self.refused(text)
        # The mapping 65 levels down is k63's value, on line 65.
        self.assertEqual(problem, f"FILE:{MAX_DEPTH + 1}:{2 * MAX_DEPTH + 1}: nesting is deeper than {MAX_DEPTH} "
                                  "levels (the limit, --max-config-depth) (in k0.k1.k2.k3.k4.k5.k6.k7.k8.k9.k10.k11.k1"
                                  "...55.k56.k57.k58.k59.k60.k61.k62)")

    def test_nesting_at_the_limit_goes_through_loading_without_recursion_errors(self):
        # The code after the YAML (env resolution, the schema, the error text) recurses:
        # the depth limit keeps it far from Python's recursion limit, in a thread too.
        nested = "[" * (MAX_DEPTH - 4) + "1" + "]" * (MAX_DEPTH - 4)
        text = ECHO.replace("      host: 0.0.0.0\n", f"      host: 0.0.0.0\n      extra: {nested}\n")
        problems: list[str] = []
        thread = threading.Thread(target=lambda: problems.append(self.refused(text)))  # as a reload loads
        thread.start()
        thread.join(10)
        [problem] = problems
        self.assertTrue(problem.startswith("bindings.north_tcp_server.options: unknown key 'extra'"), problem)

    def test_a_file_that_is_not_utf8_names_the_line_and_byte(self):
        text = ECHO.encode().replace(b"north_echo_server:", "north_écho_server:".encode("latin-1"))
        problem = self.refused(text)
        self.assertEqual(problem, "FILE:30:9: the file is not UTF-8: byte 0xe9 at offset 525 "
                                  "(invalid continuation byte); zilla.yaml must be UTF-8")

    def test_a_utf8_byte_order_mark_is_allowed(self):
        config = load_config(self.write(b"\xef\xbb\xbf" + ECHO.encode()))
        self.assertEqual(config.namespaces[0].name, "example")

    def test_a_key_given_twice_names_both_places(self):
        text = ECHO.replace("    type: tcp\n    kind: server\n", "    type: tcp\n    kind: server\n    kind: client\n")
        problem = self.refused(text)
        self.assertEqual(problem, "FILE:7:5: duplicate key 'kind' (first at 6:5, again at 7:5; a key may appear "
                                  "once) (in bindings.north_tcp_server)")

    def test_a_binding_given_twice_names_both_places(self):
        text = ECHO.replace("telemetry:\n", "  north_tcp_server:\n    type: echo\n    kind: server\ntelemetry:\n")
        self.assertEqual(self.refused(text), "FILE:33:3: duplicate key 'north_tcp_server' (first at 4:3, again at "
                                             "33:3; a key may appear once) (in bindings)")

    def test_what_yaml_cannot_mean_here_is_refused_naming_it(self):
        self.assertEqual(self.refused("name: t\na: &a [*a]\n"),
                         "FILE:2:8: the alias '*a' is inside the node it names (a recursive alias) (in a)")
        self.assertEqual(self.refused("name: t\na: *b\n"), "FILE:2:4: the alias '*b' names no anchor defined before it")
        self.assertEqual(self.refused("name: t\na: !!python/object:os.system x\n"),
                         "FILE:2:4: the tag 'tag:yaml.org,2002:python/object:os.system' is not supported "
                         "(YAML's core types only)")
        self.assertEqual(self.refused("name: t\n? [a]\n: 1\n"),
                         "FILE:2:3: a mapping key must be a scalar, not a mapping or a list")
        self.assertEqual(self.refused("name: t\nport: " + "9" * 5000 + "\n"),
                         "FILE:2:7: '9999999999999999999999999999999999999999... (5,000 characters)' "
                         "is not a valid int")
        self.assertEqual(self.refused("name: t\nbindings:\n\tx: 1\n"),
                         "FILE:3:1: invalid YAML: found character that cannot start any token (a tab: YAML "
                         "indents with spaces only)" if self.loader in (None, yaml.CSafeLoader) else
                         "FILE:3:1: invalid YAML: found character '\\t' that cannot start any token (a tab: YAML "
                         "indents with spaces only)")

    def test_limits_can_be_lowered_and_raised(self):
        self.assertIn("the limit is 100 bytes", self.refused(ECHO, Limits(max_bytes=100)))
        self.assertIn("nesting is deeper than 3 levels", self.refused(ECHO, Limits(max_depth=3)))
        self.assertIn("more than 10 YAML nodes", self.refused(ECHO, Limits(max_nodes=10)))
        text = ECHO.replace("      host: 0.0.0.0\n", "      host: 0.0.0.0\n      extra: " + "[" * 70 + "]" * 70 + "\n")
        self.assertIn("unknown key 'extra'", self.refused(text, Limits(max_depth=80)))
        self.assertEqual(limits_from({"max-config-depth": 80, "max-config-bytes": None}), Limits(max_depth=80))
        self.assertRaisesRegex(ValueError, "--max-config-nodes: expected a positive integer, got 0",
                               limits_from, {"max-config-nodes": 0})
        # What the supervisor of -w passes on to its workers.
        self.assertEqual(limit_flags(Limits(max_depth=80)), ["--max-config-depth", "80"])
        self.assertEqual(limit_flags(DEFAULT_LIMITS), [])


class PurePythonParserBoundsTests(BoundsTests):
    """The same bounds when PyYAML has no libyaml (its own parser gives the events)."""

    loader = yaml.SafeLoader


class SameValuesTests(Files):
    def test_the_example_configurations_load_as_yaml_safe_load_reads_them(self):
        paths = sorted(glob.glob(os.path.join(CONF, "**", "*.yaml"), recursive=True))
        self.assertGreater(len(paths), 8)
        for path in paths:
            text = Path(path).read_text()
            self.assertEqual(load_text(text, path), list(yaml.safe_load_all(text)), path)
            self.assertEqual(load_text(text, path, loader_class=yaml.SafeLoader), list(yaml.safe_load_all(text)), path)

    def test_scalars_merges_and_documents_are_yaml_safe_load_s(self):
        text = ("a: [1, 0x1f, 1.5, .inf, true, no, null, ~, '3', 2024-01-02, 1_000, !!str 7]\n"
                "base: &base {x: 1, y: 2}\n"
                "merged: {<<: *base, y: 3}\n"
                "listed: {<<: [{a: 1}, {a: 2, b: 2}], c: 3}\n"
                "---\n---\nb: |\n  text\n")
        self.assertEqual(load_text(text, "f"), list(yaml.safe_load_all(text)))

    def test_a_generated_configuration_of_1000_bindings_loads(self):
        text = generated(1000)
        self.assertLess(len(text), MAX_BYTES / 10)
        config = load_config(self.write(text))
        self.assertEqual(len(config.namespaces[0].bindings), 3001)

    def test_a_configuration_at_the_size_limit_is_within_the_node_limit(self):
        # As many bindings as fit in MAX_BYTES: the node limit must not be the tighter one.
        text = generated(int(0.95 * 1000 * MAX_BYTES / len(generated(1000))))  # longer names further on
        self.assertLess(len(text), MAX_BYTES)
        documents = load_text(text, "f")
        self.assertGreater(len(documents[0]["bindings"]), 30_000)
        self.assertGreater(MAX_NODES, len(text) / 8)  # about 7.5 bytes a node in such a file


class NoListenerTests(Files):
    def test_a_configuration_without_a_tcp_server_is_refused(self):
        text = ECHO.replace("    type: tcp\n    kind: server\n", "    type: tcp\n    kind: client\n")
        problem = self.refused(text)
        self.assertEqual(problem, "bindings: no binding listens (namespaces: example): a tcp server binding is "
                                  "needed (type: tcp, kind: server, with options host and port)")

    def test_dicts_and_several_namespaces_are_checked_as_a_whole(self):
        config = chain()
        del config["bindings"]["tcp0"]
        with self.assertRaises(ConfigError) as caught:
            build_gateway(config)
        self.assertIn("bindings: no binding listens (namespaces: test)", str(caught.exception))
        north = {"name": "north", "bindings": {"echo": {"type": "echo", "kind": "server"}}}
        listening = chain()
        self.assertEqual([ns.name for ns in load_config([north, listening]).namespaces], ["north", "test"])
        # config.load itself models fragments (as tests of one binding type do).
        self.assertEqual(len(load(north, standard_registry()).namespaces[0].bindings), 1)
