"""`python -m zillatw check FILE [-v]` run as users run it, in a child process: exit status,
what it prints for a valid file, and the YAML paths it names for an invalid one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from twisted.trial import unittest

from zillatw.test.support import CONF

ROOT = os.path.dirname(CONF)
ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
ENV.pop("ZILLATW_CLI_TEST_HOST", None)

INVALID = """\
name: broken
bindings:
  north_ws_server:
    type: ws
    kind: server
    exit: echo_sever
  echo_server:
    type: echo
    kind: server
  north_tcp_server:
    type: tcp
    kind: server
    options:
      host: 0.0.0.0
      port: 7010-7000
    exit: north_ws_server
"""


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zillatw", "check", *args], capture_output=True, text=True,
                          env=env or ENV, cwd=ROOT, timeout=60)


class CheckCommandTests(unittest.SynchronousTestCase):
    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp() + ".yaml")
        Path(path).write_text(text)
        return path

    def test_valid_file_exits_0_and_says_so(self):
        path = os.path.join(CONF, "ws.echo.yaml")
        result = check(path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"{path}: valid (4 bindings in example)\n")
        self.assertEqual(result.stderr, "")

    def test_valid_file_with_several_namespaces(self):
        path = self.write("name: north\nbindings:\n"
                          "  tcp0: {type: tcp, kind: server, options: {host: 127.0.0.1, port: 7114}, exit: http0}\n"
                          "  http0: {type: http, kind: server, exit: ws0}\n"
                          "  ws0: {type: ws, kind: server, exit: 'south:echo'}\n"
                          "---\nname: south\nbindings:\n  echo: {type: echo, kind: server}\n")
        result = check(path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"{path}: valid (4 bindings in north, south)\n")

    def test_verbose_prints_the_resolved_configuration(self):
        path = self.write(Path(CONF, "ws.echo.yaml").read_text().replace("0.0.0.0", "${{env.ZILLATW_CLI_TEST_HOST}}"))
        result = check(path, "-v", env={**ENV, "ZILLATW_CLI_TEST_HOST": "127.0.0.9"})
        self.assertEqual(result.returncode, 0, result.stderr)
        dumped, _, summary = result.stdout.rpartition(f"{path}: valid")
        self.assertEqual(summary, " (4 bindings in example)\n")
        document = yaml.safe_load(dumped)
        self.assertEqual(document["bindings"]["north_tcp_server"]["options"], {"host": "127.0.0.9", "port": [7114]})
        self.assertEqual(document, {**yaml.safe_load(Path(CONF, "ws.echo.yaml").read_text()),
                                    "bindings": document["bindings"]})
        self.assertEqual(list(document["bindings"]), ["north_tcp_server", "north_http_server",
                                                      "north_ws_server", "north_echo_server"])

    def test_invalid_file_exits_1_naming_every_yaml_path(self):
        path = self.write(INVALID)
        result = check(path)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr.splitlines(), [
            f"{path}: invalid configuration:",
            "3 problems:",
            "  bindings.north_ws_server.exit: no binding named 'echo_sever' (did you mean 'echo_server'?)",
            "  bindings.north_tcp_server.exit: 'north_ws_server' is a ws server, which cannot take the connections "
            "a tcp server hands on",
            "  bindings.north_tcp_server.options.port: range '7010-7000' ends before it starts",
        ])

    def test_invalid_file_with_verbose_prints_no_configuration(self):
        result = check(self.write(INVALID), "-v")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")

    def test_missing_env_var_names_it(self):
        path = self.write(Path(CONF, "ws.echo.yaml").read_text().replace("0.0.0.0", "${{env.ZILLATW_CLI_TEST_HOST}}"))
        result = check(path)
        self.assertEqual(result.returncode, 1)
        self.assertIn("bindings.north_tcp_server.options.host: environment variable ZILLATW_CLI_TEST_HOST is not set",
                      result.stderr)

    def test_invalid_yaml_names_line_and_column(self):
        path = self.write("name: t\nbindings:\n  a: [1\n")
        result = check(path)
        self.assertEqual(result.returncode, 1)
        first, second = result.stderr.splitlines()
        self.assertEqual(first, f"{path}: invalid configuration:")
        self.assertTrue(second.startswith(f"{path}:4:1: invalid YAML: "), second)  # then libyaml's words
        self.assertIn("expected ',' or ']'", second)

    def test_missing_file_exits_1(self):
        path = os.path.abspath(self.mktemp())
        result = check(path)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{path}: cannot read the configuration (No such file or directory)", result.stderr)

    def test_no_file_argument_is_a_usage_error(self):
        result = check()
        self.assertEqual(result.returncode, 2)
        self.assertIn("usage: python -m zillatw check", result.stderr)
        self.assertIn("the following arguments are required: file", result.stderr)
