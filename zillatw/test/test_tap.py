"""`twistd -n zillaws -c FILE` as users run it, in a child process."""

from __future__ import annotations

import signal

import yaml
from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from zillatw.test.netns import ExampleNetwork
from zillatw.test.process_support import ENV, ROOT, TWISTD, Collect
from zillatw.test.support import close_ws, connect_ws, eventually


class TwistdTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_invalid_config_exits_non_zero_naming_the_path(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("name: t\nbindings:\n  ws0:\n    type: ws\n    kind: server\n    exit: echo_sever\n"
                    "  echo_server:\n    type: echo\n    kind: server\n")
        out, err, code = yield getProcessOutputAndValue(
            TWISTD[0], TWISTD[1:] + ["-n", "--pidfile=", "zillaws", "-c", path], env=ENV)
        self.assertEqual(code, 1)
        self.assertIn(b"bindings.ws0.exit: no binding named 'echo_sever' (did you mean 'echo_server'?)", out + err)

    @defer.inlineCallbacks
    def test_serves_ws_echo_example_then_stops_on_sigterm(self):
        """conf/ws.echo.yaml unchanged, on 7114 in a network namespace of the test's own
        (zillatw.test.netns: the child is forked inside)."""
        network = ExampleNetwork(self)
        port, path = network.port(7114), network.config("ws.echo.yaml")
        child = Collect()
        process = reactor.spawnProcess(child, TWISTD[0], TWISTD + ["-n", "--pidfile=", "zillaws", "-v", "-c", path],
                                       env=ENV, path=ROOT)
        try:
            yield eventually(lambda: b"ENGINE_STARTED" in child.out or child.ended.called, timeout=20)
            self.assertIn(b"ENGINE_STARTED", child.out, child.out)
            self.assertEqual(yaml.safe_load(child.out.split(b"---", 1)[-1].split(b"\n20")[0])["name"], "example")
            client = yield connect_ws(port, protocols=["echo"])
            client.sendMessage(b"via twistd")
            self.assertEqual((yield client.messages.get()), (False, [b"via twistd"]))
            yield close_ws(client)
            # Event lines are Zilla's, on stdout as they are, not wrapped by twistd's log.
            self.assertRegex(child.out, rb"(?m)^example:north_http_server \[[^]]+\] \[[0-9a-f]{16}d\] "
                                        rb"BINDING_HTTP_REQUEST_ACCEPTED - GET http://127.0.0.1:\d+/$")
        finally:
            if not child.ended.called:
                process.signalProcess(signal.SIGTERM)
        code, signal_number = yield child.ended
        # zillatw's handler drains and exits 0 (twistd's own would re-raise SIGTERM); see test_shutdown.
        self.assertIn(b"Main loop terminated.", child.out)
        self.assertEqual((code, signal_number), (0, None))
