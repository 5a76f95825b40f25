"""conf/http.json.schema.yaml, conf/http.metrics.yaml and conf/http.proxy.jwt.yaml driven as
their Zilla READMEs do, with curl: the files unchanged, on their own ports (7114, 7190; the
upstream `nginx` on 80) in a network namespace of the test's own (zillatw.test.netns), `nginx`
resolved to 127.0.0.1 by a name resolver on the reactor, tokens minted at run time by
conf/jwt/mint-token.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.static import File

from zillatw.test.http_support import sample
from zillatw.test.netns import ExampleNetwork
from zillatw.test.support import CONF, resolve_locally, start_gateway

VALID = b'{\n    "id": 42,\n    "status": "Active"\n}\n'
INVALID = b'{\n    "id": 42,\n    "status": "my status",\n    "name": "test"\n}\n'


def curl(*args: str) -> Any:
    """curl's (stdout, stderr, exit code), as the README runs it (-s: no progress meter)."""
    return getProcessOutputAndValue("curl", ["-s", "-S", "--max-time", "10", *args], env=dict(os.environ),
                                    reactor=reactor)


class HttpJsonSchemaExample(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.network = ExampleNetwork(self)
        resolve_locally(self, "nginx")  # the compose service's name, as written in the example
        self.folder = Path(self.mktemp())
        www = self.folder / "www"
        www.mkdir(parents=True)
        (www / "valid.json").write_bytes(VALID)
        (www / "invalid.json").write_bytes(INVALID)
        site = Site(File(str(www), defaultType="application/octet-stream"))
        site.log = lambda request: None  # type: ignore[method-assign]
        self.nginx = yield TCP4ServerEndpoint(reactor, self.network.port(80), interface="127.0.0.1").listen(site)
        self.addCleanup(self.nginx.stopListening)

    @defer.inlineCallbacks
    def test_as_its_readme_shows(self):
        port = self.network.port(7114)
        gateway, _ = yield start_gateway(self, self.network.config("http.json.schema.yaml"))
        out, err, code = yield curl(f"http://localhost:{port}/valid.json")
        self.assertEqual((code, out), (0, VALID), err)
        out, err, code = yield curl(f"http://localhost:{port}/invalid.json")
        self.assertEqual(code, 18, err)  # curl: (18) transfer closed with 64 bytes remaining to read
        self.assertIn(b"64 bytes remaining", err)
        events = gateway.events_text.getvalue()
        self.assertIn("MODEL_JSON_VALIDATION_FAILED - GET /invalid.json response content: $: "
                      "Additional properties are not allowed", events)
        out, err, code = yield curl("-w", "%{http_code}", f"http://localhost:{port}/missing.json")
        self.assertEqual((code, out[-3:]), (0, b"404"), err)  # twisted.web's 404 page is text/html: not typed


class HttpMetricsExample(unittest.TestCase):
    @defer.inlineCallbacks
    def test_as_its_readme_shows(self):
        network = ExampleNetwork(self)
        port, metrics_port = network.port(7114), network.port(7190)
        gateway, _ = yield start_gateway(self, network.config("http.metrics.yaml"))
        out, err, code = yield curl("-f", "-d", "Hello, Zilla!", f"http://localhost:{port}/items")
        self.assertEqual((code, out), (0, b"Hello, Zilla!"), err)
        yield curl("-f", f"http://localhost:{port}/users")
        yield curl("-f", "-X", "POST", "-d", '{"name":"test"}', f"http://localhost:{port}/items")
        out, err, code = yield curl("-f", f"http://localhost:{metrics_port}/metrics")
        self.assertEqual(code, 0, err)
        text = out.decode()
        post = {"binding": "north_http_server", "namespace": "example", "method": "POST", "path": "/items"}
        self.assertEqual(sample(text, "http_request_size_bytes_bucket", le="8.0", **post), 0)
        self.assertEqual(sample(text, "http_request_size_bytes_bucket", le="16.0", **post), 2)  # 13 and 15 bytes
        self.assertEqual(sample(text, "http_request_size_bytes_sum", **post), 28)
        get = {**post, "method": "GET", "path": "/users"}
        self.assertEqual(sample(text, "http_request_size_bytes_bucket", le="2.0", **get), 1)  # no body: 0
        # response attributes only label response sizes (Zilla's rule): this example has none
        unlabelled = {**post, "method": "", "path": ""}
        self.assertEqual(sample(text, "http_response_size_bytes_count", **unlabelled), 3)
        self.assertEqual(sample(text, "http_response_size_bytes_sum", **unlabelled), 28)
        self.assertEqual(sample(text, "http_duration_milliseconds_count", **post), 2)  # per request, labelled
        self.assertEqual(sample(text, "http_active_requests", **get), 0)
        self.assertIn("# TYPE http_request_size_bytes histogram", text)


class HttpProxyJwtExample(unittest.TestCase):
    @defer.inlineCallbacks
    def test_as_its_readme_shows(self):
        network = ExampleNetwork(self)
        port = network.port(7114)
        gateway, _ = yield start_gateway(self, network.config("http.proxy.jwt.yaml"))
        script = os.path.join(CONF, "jwt", "mint-token.py")
        out, err, code = yield getProcessOutputAndValue(sys.executable, [script, "--scope", "other"],
                                                        env=dict(os.environ), reactor=reactor)
        self.assertEqual(code, 0, err)
        without = out.decode().strip()
        out, err, code = yield getProcessOutputAndValue(sys.executable, [script], env=dict(os.environ),
                                                        reactor=reactor)
        self.assertEqual(code, 0, err)
        with_scope = out.decode().strip()
        url = f"http://localhost:{port}/"
        message = ["-H", "Content-Type: text/plain", "-d", "Hello, world"]
        out, err, code = yield curl("-w", "%{http_code}", url, "-H", f"Authorization: Bearer {without}", *message)
        self.assertEqual((code, out[-3:]), (0, b"404"), err)  # nothing about the failed check
        self.assertNotIn(b"echo:stream", out)
        out, err, code = yield curl(url, "-H", f"Authorization: Bearer {with_scope}", *message)
        self.assertEqual((code, out), (0, b"Hello, world"), err)
        out, err, code = yield curl("-w", "%{http_code}", url, *message)
        self.assertEqual(out[-3:], b"401", err)  # no token at all
        self.assertIn("BINDING_HTTP_REQUEST_ACCEPTED", gateway.events_text.getvalue())
