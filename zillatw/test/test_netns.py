"""zillatw.test.netns: a test's own network namespace, so Zilla's examples run on their ports."""

from __future__ import annotations

import glob
import os
import re
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from zillatw.test import netns
from zillatw.test.support import CONF, connect_raw


class FakeCase:
    """What ExampleNetwork asks of a test case, with the cleanups run when the test says."""

    def __init__(self, folder: str) -> None:
        self.cleanups: list[Any] = []
        self.folder = folder

    def addCleanup(self, function: Any, *args: Any) -> None:
        self.cleanups.append((function, args))

    def run_cleanups(self) -> None:
        while self.cleanups:
            function, args = self.cleanups.pop()
            function(*args)

    def fail(self, message: str) -> None:
        raise unittest.FailTest(message)

    def mktemp(self) -> str:
        return self.folder

    def id(self) -> str:
        return "fake"


def fell_back(case: unittest.TestCase, network: netns.ExampleNetwork, before: int) -> bool:
    """Whether `network` is the fallback, checking it is what it should be then: where no
    namespace can be made (not root: the suite run as an embedder runs it; never in CI, where
    ExampleNetwork fails the test), the thread stays where it was and the ports are free ones.
    These tests then check that much, and the namespace's tests run where it can be made."""
    if network.isolated:
        return False
    case.assertFalse(os.environ.get("CI"))
    case.assertEqual(netns.namespace_inode(), before)
    case.assertNotEqual(network.port(7114), 7114)
    return True


class PrivateNamespaceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != netns.FORCE_FALLBACK})

    def test_a_port_taken_outside_is_free_inside_and_the_thread_gets_back(self) -> None:
        before = netns.namespace_inode()
        outside = socket.socket()
        self.addCleanup(outside.close)
        outside.bind(("0.0.0.0", 0))
        outside.listen()
        port = outside.getsockname()[1]
        case = FakeCase(self.mktemp())
        network = netns.ExampleNetwork(case)
        if fell_back(self, network, before):
            return
        try:
            self.assertNotEqual(netns.namespace_inode(), before)
            self.assertEqual(network.port(port), port)
            inside = socket.socket()
            self.addCleanup(inside.close)
            inside.bind(("0.0.0.0", port))  # no EADDRINUSE: another namespace's port
            inside.listen()
            client = socket.create_connection(("localhost", port), timeout=5)
            self.addCleanup(client.close)
            accepted, _ = inside.accept()
            self.addCleanup(accepted.close)
        finally:
            case.run_cleanups()
        self.assertEqual(netns.namespace_inode(), before)
        # sockets made inside still work from outside; the outside listener never saw the client
        client.sendall(b"ping")
        self.assertEqual(accepted.recv(4), b"ping")
        outside.setblocking(False)
        self.assertRaises(BlockingIOError, outside.accept)

    def test_the_test_fails_if_the_thread_cannot_get_back(self) -> None:
        fd = os.open(netns.THREAD_NAMESPACE, os.O_RDONLY)  # the way back, for this test
        self.addCleanup(os.close, fd)
        case = FakeCase(self.mktemp())
        if fell_back(self, netns.ExampleNetwork(case), netns.namespace_inode()):
            return
        real = netns._set_namespace
        self.patch(netns, "_set_namespace", lambda fd: None)
        (leave, _), pool = case.cleanups[0], case.cleanups[1:]
        for function, args in reversed(pool):
            function(*args)
        self.assertRaises(AssertionError, leave)
        real(fd)

    def test_a_pool_thread_still_busy_after_the_test_fails_it_without_hanging(self) -> None:
        self.patch(netns, "POOL_STOP_TIMEOUT", 0.05)
        case = FakeCase(self.mktemp())
        if fell_back(self, netns.ExampleNetwork(case), netns.namespace_inode()):
            return
        release = threading.Event()
        reactor.getThreadPool().callInThread(release.wait)  # type: ignore[attr-defined]
        (leave, _), (restore, _) = case.cleanups
        try:
            self.assertRaises(AssertionError, restore)
        finally:
            release.set()
            for thread in threading.enumerate():
                if thread.name == "netns-test-pool-stop":
                    thread.join()
            leave()


class InsideTests(unittest.TestCase):
    """What the test makes inside is inside: listeners, clients, children, pool threads."""

    def setUp(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != netns.FORCE_FALLBACK})
        self.outside = netns.namespace_inode()
        # registered first, so it runs last: after the network's own cleanups
        self.addCleanup(lambda: self.assertEqual(netns.namespace_inode(), self.outside))
        self.network = netns.ExampleNetwork(self)
        self.fell_back = fell_back(self, self.network, self.outside)
        self.inside = netns.namespace_inode()

    @defer.inlineCallbacks
    def test_the_reactor_listens_and_connects_inside(self) -> Any:
        if self.fell_back:  # checked in setUp
            return
        factory: Any = ServerFactory.forProtocol(Protocol)
        port = reactor.listenTCP(7114, factory, interface="0.0.0.0")
        self.addCleanup(port.stopListening)
        client = yield connect_raw(7114)
        self.assertEqual(client.transport.getPeer().port, 7114)
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_children_and_pool_threads_are_inside(self) -> Any:
        if self.fell_back:  # checked in setUp
            return
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-c", "import os; print(os.stat('/proc/self/ns/net').st_ino)"], reactor=reactor)
        self.assertEqual(code, 0, err)
        self.assertEqual(int(out), self.inside)
        thread_namespace = yield threads.deferToThread(netns.namespace_inode)
        self.assertEqual(thread_namespace, self.inside)
        self.assertNotEqual(self.inside, self.outside)


class FallbackTests(unittest.TestCase):
    def test_forced_fallback_rewrites_the_file_onto_free_ports(self) -> None:
        self.patch(os, "environ", {**os.environ, netns.FORCE_FALLBACK: "1", "CI": ""})
        before = netns.namespace_inode()
        network = netns.ExampleNetwork(self)
        self.assertFalse(network.isolated)
        self.assertEqual(netns.namespace_inode(), before)
        path = network.config("http.echo.yaml")
        text = Path(path).read_text()
        self.assertNotIn("0.0.0.0", text)
        for written in (7114, 7143):
            self.assertNotEqual(network.port(written), written)
            self.assertIn(f"localhost:{network.port(written)}", text)
            self.assertNotIn(f"localhost:{written}\n", text)

    def test_in_ci_a_missing_namespace_fails_the_test(self) -> None:
        self.patch(os, "environ", {**os.environ, "CI": "true"})
        os.environ.pop(netns.FORCE_FALLBACK, None)

        def refuse(case: Any) -> None:
            raise netns.NamespaceUnavailable("unshare(CLONE_NEWNET): Operation not permitted")
        self.patch(netns, "enter_private_namespace", refuse)
        error = self.assertRaises(unittest.FailTest, netns.ExampleNetwork, FakeCase(self.mktemp()))
        self.assertIn("Operation not permitted", str(error))

    def test_the_rewrite_replaces_whole_port_numbers_only(self) -> None:
        text = "host: 0.0.0.0\nport: 80\nurl: http://backend:8080/x\nratio: 1.80\n"
        self.assertEqual(netns.rewritten(text, {80: 4000, 8080: 4001}),
                         "host: 127.0.0.1\nport: 4000\nurl: http://backend:4001/x\nratio: 1.80\n")


class ShippedFileTests(unittest.TestCase):
    def test_a_config_with_relative_paths_is_the_shipped_file_itself(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != netns.FORCE_FALLBACK})
        network = netns.ExampleNetwork(self)
        if fell_back(self, network, netns.namespace_inode()):
            self.assertNotEqual(Path(network.config("tcp.echo.yaml")).read_text(),
                                Path(CONF, "tcp.echo.yaml").read_text())
            return
        self.assertEqual(network.config("tcp.echo.yaml"), os.path.join(CONF, "tcp.echo.yaml"))
        folder = Path(self.mktemp())
        linked = network.config("http.echo.yaml", folder)
        self.assertTrue(os.path.samefile(linked, os.path.join(CONF, "http.echo.yaml")))
        self.assertEqual(Path(linked).resolve().parent, folder.resolve())

    def test_every_port_an_example_writes_is_known(self) -> None:
        written: set[int] = set()

        def walk(node: Any, key: str = "") -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, str(k))
            elif isinstance(node, list):
                for item in node:
                    walk(item, key)
            elif key == "port" and isinstance(node, int):
                written.add(node)
            elif isinstance(node, str):
                written.update(int(p) for p in re.findall(r"^(?:\w+://)?[\w.-]+:(\d+)(?:/|$)", node))
        for path in glob.glob(os.path.join(CONF, "*.yaml")):
            walk(yaml.safe_load(Path(path).read_text()))
        self.assertIn(7114, written)
        self.assertIn(6379, written)
        self.assertLessEqual(written, netns.KNOWN_PORTS)
