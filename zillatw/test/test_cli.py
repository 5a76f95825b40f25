"""`python -m zillatw check FILE [-v]` run as users run it, in a child process: exit status,
what it prints for a valid file, and the YAML paths it names for an invalid one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from twisted.trial import unittest

from zillatw.test.support import CONF, alias_bomb, nine_megabytes

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
            "a tcp server hands on (bindings that can: echo_server)",  # echo takes byte streams too
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


# Runs `python -m zillatw check ...` as users do, and writes the process's peak RSS (VmHWM
# of /proc/self/status, of this process alone: getrusage's maxrss would include the RSS of
# the test process it was forked from) to the file PEAK_FILE names.
MEASURED = ("import atexit, os, runpy, sys\n"
            "def peak():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmHWM:'):\n"
            "            open(os.environ['PEAK_FILE'], 'w').write(line.split()[1])\n"
            "atexit.register(peak)\n"
            "sys.argv = ['zillatw'] + sys.argv[1:]\n"
            "runpy.run_module('zillatw', run_name='__main__', alter_sys=True)\n")
PEAK_RSS_CAP = 150 * 1024 * 1024  # check of ws.echo.yaml peaks at about 60 MB; the attacks took 3 GB
SECONDS_CAP = 10.0  # a check starts in about 0.5 s; the attacks took 17 to 21 s


class HostileFileTests(unittest.SynchronousTestCase):
    """Each file of issue 12 gives one line naming its problem, exit 1 and no traceback, in
    bounded time and memory."""

    def refused(self, content: str | bytes, *flags: str) -> str:
        path = os.path.abspath(self.mktemp() + ".yaml")
        Path(path).write_bytes(content.encode() if isinstance(content, str) else content)
        peak_file = os.path.abspath(self.mktemp())
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-c", MEASURED, "check", path, *flags], capture_output=True,
                                text=True, env={**ENV, "PEAK_FILE": peak_file}, cwd=ROOT, timeout=60)
        elapsed = time.monotonic() - started
        peak = int(Path(peak_file).read_text()) * 1024
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertNotIn("Traceback", result.stderr)
        header, problem = result.stderr.splitlines()  # one line for the one problem
        self.assertEqual(header, f"{path}: invalid configuration:")
        self.assertLess(elapsed, SECONDS_CAP)
        self.assertLess(peak, PEAK_RSS_CAP)
        return problem.replace(path, "FILE")

    def test_a_9_megabyte_file(self):
        self.assertEqual(self.refused(nine_megabytes()), "FILE: the file is too large (9,000,001 bytes; the limit "
                                                         "is 4,194,304 bytes, --max-config-bytes)")

    def test_an_alias_bomb(self):
        self.assertEqual(self.refused(alias_bomb()),
                         "FILE:8:10: more than 1,000,000 YAML nodes, counting each "
                         "alias as the nodes it repeats (the limit, --max-config-nodes) (in a6)")

    def test_50000_deep_nesting(self):
        self.assertRegex(self.refused("[" * 50_000 + "]" * 50_000),
                         r"^FILE:1:\d+: nesting is deeper than 64 levels \(the limit, --max-config-depth\)$")

    def test_a_file_that_is_not_utf8(self):
        self.assertEqual(self.refused(b"name: caf\xe9\n"), "FILE:1:10: the file is not UTF-8: byte 0xe9 at offset 9 "
                                                           "(invalid continuation byte); zilla.yaml must be UTF-8")

    def test_kind_server_then_kind_client(self):
        text = Path(CONF, "ws.echo.yaml").read_text().replace(
            "    kind: server\n", "    kind: server\n    kind: client\n", 1)
        self.assertEqual(self.refused(text), "FILE:7:5: duplicate key 'kind' (first at 6:5, again at 7:5; a key may "
                                             "appear once) (in bindings.north_tcp_server)")

    def test_a_configuration_that_listens_on_nothing(self):
        text = "name: quiet\nbindings:\n  echo:\n    type: echo\n    kind: server\n"
        self.assertEqual(self.refused(text), "bindings: no binding listens (namespaces: quiet): a tcp server binding "
                                             "is needed (type: tcp, kind: server, with options host and port)")

    def test_limits_given_as_flags(self):
        text = Path(CONF, "ws.echo.yaml").read_text()
        self.assertIn("more than 10 YAML nodes", self.refused(text, "--max-config-nodes", "10"))
        self.assertIn("the limit is 100 bytes", self.refused(text, "--max-config-bytes", "100"))
        result = check(os.path.join(CONF, "ws.echo.yaml"), "--max-config-depth", "0")
        self.assertEqual(result.returncode, 2)
        self.assertIn("--max-config-depth: expected a positive integer, got 0", result.stderr)
        # as deep as it goes
        self.assertEqual(check(os.path.join(CONF, "ws.echo.yaml"), "--max-config-depth", "8").returncode, 0)
