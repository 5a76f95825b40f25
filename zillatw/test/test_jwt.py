"""The jwt guard and the http server's authorization, end to end: keys and tokens minted at
run time, every case through a real handshake over loopback. (Keys from a URL: test_jwt_jwks.)"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor
from twisted.internet.base import DelayedCall
from twisted.internet.task import Clock
from twisted.trial import unittest

from zillatw.errors import ConfigError
from zillatw.guards import Rejected
from zillatw.guards.jwt import JwtGuard
from zillatw.runtime.gateway import load_config
from zillatw.test.netns import ExampleNetwork
from zillatw.test.pki import AUDIENCE, CREDENTIALS, ISSUER, ROLE, Signer, b64, guarded_config
from zillatw.test.support import (
    CONF,
    OnAClock,
    close_ws,
    connect_ws,
    eventually,
    parse_server_frames,
    start_gateway,
    status_of,
    upgrade_request,
)


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None = None) -> str:
    """A token built by hand: `alg: none` (no key) or HS256 with the given bytes as secret."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def session_timers() -> list[Any]:
    return [c for c in reactor.getDelayedCalls()
            if isinstance(c, DelayedCall) and getattr(c.func, "__name__", "") == "_session_expired"]


class JwtHandshakeTests(unittest.TestCase):
    """One RSA key inline; the http route is guarded by ROLE."""

    @defer.inlineCallbacks
    def setUp(self):
        self.signer = Signer("RSA", "rsa-1")
        self.gateway, self.port = yield start_gateway(self, guarded_config([self.signer.jwk]))

    def events(self) -> str:
        return self.gateway.events_text.getvalue()

    @defer.inlineCallbacks
    def _echoes(self, path: str = "/", headers: dict[str, str] | None = None):
        client = yield connect_ws(self.port, path, headers=headers)
        client.sendMessage(b"hello")
        self.assertEqual((yield client.messages.get()), (False, [b"hello"]))
        result = yield close_ws(client)
        self.assertEqual(result[:2], (True, 1000))

    @defer.inlineCallbacks
    def _refused(self, expected: int, token: str | None = None, where: str = "header") -> Any:
        headers, path = {}, "/"
        if token is not None and where == "header":
            headers["Authorization"] = f"Bearer {token}"
        elif token is not None and where == "query":
            path = f"/?access_token={token}"
        status, response_headers = yield status_of(self.port, path, headers)
        self.assertEqual(status, expected)
        return response_headers

    def test_good_token_in_header(self):
        return self._echoes(headers={"Authorization": f"Bearer {self.signer.token()}"})

    def test_good_token_in_query(self):
        return self._echoes(path=f"/?x=1&access_token={self.signer.token()}")

    def test_good_token_in_cookie(self):
        return self._echoes(headers={"Cookie": f"theme=dark; access_token={self.signer.token()}"})

    @defer.inlineCallbacks
    def test_identity_and_events(self):
        seen = []
        echo = self.gateway.binding("echo")
        original = echo.open
        echo.open = lambda info, peer: seen.append(info) or original(info, peer)
        token = self.signer.token(sub="bob")
        yield self._echoes(headers={"Authorization": f"Bearer {token}"})
        self.assertEqual([info.identity for info in seen], ["bob"])
        self.assertIn("BINDING_HTTP_REQUEST_ACCEPTED bob GET http://127.0.0.1:", self.events())
        self.assertNotIn(token, self.events())

    @defer.inlineCallbacks
    def test_missing_credentials_is_401(self):
        headers = yield self._refused(401)
        self.assertEqual(headers["www-authenticate"], "Bearer")
        # a header that does not fit the pattern is no credentials either
        status, _ = yield status_of(self.port, headers={"Authorization": f"Basic {self.signer.token()}"})
        self.assertEqual(status, 401)

    @defer.inlineCallbacks
    def test_expired_is_403(self):
        yield self._refused(403, self.signer.token(exp=int(time.time()) - 5))
        self.assertIn("GUARD_JWT_AUTHORIZATION_FAILED JWT token authorization failed for identity (alice). "
                      "token expired", self.events())

    @defer.inlineCallbacks
    def test_not_yet_valid_is_403(self):
        yield self._refused(403, self.signer.token(nbf=int(time.time()) + 60), where="query")
        self.assertIn("token not yet valid", self.events())

    @defer.inlineCallbacks
    def test_wrong_issuer_is_403(self):
        yield self._refused(403, self.signer.token(iss="https://evil.example.com"))
        self.assertIn("issuer does not match", self.events())

    @defer.inlineCallbacks
    def test_missing_issuer_is_403(self):
        yield self._refused(403, self.signer.token(iss=None))
        self.assertIn("missing claim 'iss'", self.events())

    @defer.inlineCallbacks
    def test_wrong_audience_is_403(self):
        yield self._refused(403, self.signer.token(aud=["https://other.example.com"]))
        self.assertIn("audience does not match", self.events())

    @defer.inlineCallbacks
    def test_audience_list_containing_ours_is_accepted(self):
        token = self.signer.token(aud=["https://other.example.com", AUDIENCE])
        yield self._echoes(headers={"Authorization": f"Bearer {token}"})

    @defer.inlineCallbacks
    def test_unknown_kid_is_403(self):
        other = Signer("RSA", "rsa-2")
        yield self._refused(403, other.token())
        self.assertIn("unknown kid 'rsa-2'", self.events())

    @defer.inlineCallbacks
    def test_key_of_another_signer_under_our_kid_is_403(self):
        other = Signer("RSA", "rsa-1")
        yield self._refused(403, other.token())
        self.assertIn("signature does not verify", self.events())

    @defer.inlineCallbacks
    def test_alg_none_is_403(self):
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "scope": ROLE, "exp": int(time.time()) + 60}
        yield self._refused(403, unsigned_token({"alg": "none", "kid": "rsa-1", "typ": "JWT"}, payload))
        self.assertIn("identity (mallory). alg 'none' is not the alg of key 'rsa-1'", self.events())

    @defer.inlineCallbacks
    def test_hs256_signed_with_the_rsa_public_pem_is_403(self):
        pem = self.signer.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "scope": ROLE, "exp": int(time.time()) + 60}
        yield self._refused(403, unsigned_token({"alg": "HS256", "kid": "rsa-1"}, payload, key=pem))
        self.assertIn("alg 'HS256' is not the alg of key 'rsa-1' (RS256)", self.events())

    @defer.inlineCallbacks
    def test_tampered_payload_is_403(self):
        header, payload, signature = self.signer.token(scope="reader").split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["scope"] = ROLE
        yield self._refused(403, ".".join([header, b64(json.dumps(claims).encode()), signature]))
        self.assertIn("signature does not verify", self.events())

    @defer.inlineCallbacks
    def test_garbage_is_403(self):
        yield self._refused(403, "not.a.token")
        self.assertIn("identity (-). malformed token", self.events())

    @defer.inlineCallbacks
    def test_missing_role_is_404(self):
        yield self._refused(404, self.signer.token(scope="other"))
        yield self._refused(404, self.signer.token(scope=None))
        self.assertNotIn("GUARD_JWT_AUTHORIZATION_FAILED", self.events())

    def test_expiry_closes_an_open_connection_with_1008(self):
        on = OnAClock(guarded_config([self.signer.jwk]))
        on.clock.advance(time.time())  # a session ends at its token's exp, in epoch seconds
        exp = int(on.clock.seconds()) + 2
        connection, transport = on.connect()
        connection.dataReceived(upgrade_request(headers={"Authorization": f"Bearer {self.signer.token(exp=exp)}"}))
        self.assertIn(b"101 Switching Protocols", transport.value())
        opened = len(transport.value())
        timers = [c for c in on.clock.getDelayedCalls() if c.func.__name__ == "_session_expired"]
        self.assertEqual([timer.getTime() for timer in timers], [exp])
        on.clock.advance(exp - on.clock.seconds() - 0.001)
        self.assertEqual(transport.value()[opened:], b"")  # open until exp...
        on.clock.advance(0.001)
        self.assertEqual(parse_server_frames(transport.value()[opened:]),  # ...and closed then
                         [(0x8, True, (1008).to_bytes(2, "big") + b"token expired")])

    @defer.inlineCallbacks
    def test_closing_before_expiry_cancels_the_timer(self):
        client = yield connect_ws(self.port, headers={"Authorization": f"Bearer {self.signer.token(exp=None)}"})
        self.assertEqual(session_timers(), [])  # no exp: no timer at all
        yield close_ws(client)
        client = yield connect_ws(self.port, headers={"Authorization": f"Bearer {self.signer.token()}"})
        self.assertEqual(len(session_timers()), 1)
        yield close_ws(client)
        yield eventually(lambda: not session_timers())


class KeyTypeTests(unittest.TestCase):
    """EC, OKP (EdDSA) and HMAC keys beside RSA; a key verifies only its own alg."""

    @defer.inlineCallbacks
    def test_each_key_type_verifies_its_tokens(self):
        signers = [Signer("RSA", "r"), Signer("EC", "e"), Signer("OKP", "o"), Signer("oct", "h")]
        gateway, port = yield start_gateway(self, guarded_config([s.jwk for s in signers]))
        for signer in signers:
            client = yield connect_ws(port, headers={"Authorization": f"Bearer {signer.token(sub=signer.kid)}"})
            client.sendMessage(signer.alg.encode())
            self.assertEqual((yield client.messages.get()), (False, [signer.alg.encode()]))
            yield close_ws(client)
        self.assertEqual(gateway.events_text.getvalue().count("BINDING_HTTP_REQUEST_ACCEPTED"), 4)
        # An ES256 token under the RSA key's kid is refused before any signature check.
        ec_key = signers[1]
        ec_key.kid = "r"
        status, _ = yield status_of(port, headers={"Authorization": f"Bearer {ec_key.token()}"})
        self.assertEqual(status, 403)


class RolesAndRoutesTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_dotted_roles_claim_list_and_identity_claim(self):
        signer = Signer("EC", "k")
        config = guarded_config([signer.jwk], roles=["admin", "user"],
                                guard_options={"roles": "realm_access.roles", "identity": "email"})
        gateway, port = yield start_gateway(self, config)
        seen = []
        echo = gateway.binding("echo")
        original = echo.open
        echo.open = lambda info, peer: seen.append(info.identity) or original(info, peer)
        token = signer.token(realm_access={"roles": ["user", "admin"]}, email="a@example.com")
        client = yield connect_ws(port, headers={"Authorization": f"Bearer {token}"})
        yield close_ws(client)
        self.assertEqual(seen, ["a@example.com"])
        # every role listed must be there
        token = signer.token(realm_access={"roles": ["user"]})
        self.assertEqual((yield status_of(port, headers={"Authorization": f"Bearer {token}"}))[0], 404)

    @defer.inlineCallbacks
    def test_guarded_ws_routes_fall_through_to_the_next(self):
        """Routes guarded at the ws server: a token lacking `admin` falls through to the
        `echo:stream` route; no token gets 401 at the ws server too."""
        signer = Signer("OKP", "k")
        ws_routes = [{"guarded": {"jwt0": ["admin"]}, "exit": "echo_admin"},
                     {"guarded": {"jwt0": [ROLE]}, "exit": "echo"}]
        apps = {"echo": {"type": "echo", "kind": "server"}, "echo_admin": {"type": "echo", "kind": "server"}}
        config = guarded_config([signer.jwk], ws_routes=ws_routes, apps=apps, http_guarded=False)
        gateway, port = yield start_gateway(self, config)
        opened = []

        def recording(name: str, original: Any) -> Any:
            def open_and_record(info: Any, peer: Any) -> Any:
                opened.append((name, info.identity))
                return original(info, peer)
            return open_and_record

        for name in apps:
            binding = gateway.binding(name)
            binding.open = recording(name, binding.open)
        for scope, sub in ((f"admin {ROLE}", "root"), (ROLE, "alice")):
            client = yield connect_ws(port, headers={"Cookie": f"access_token={signer.token(scope=scope, sub=sub)}"})
            yield close_ws(client)
        self.assertEqual(opened, [("echo_admin", "root"), ("echo", "alice")])
        self.assertEqual((yield status_of(port))[0], 401)
        self.assertEqual((yield status_of(port, "/?access_token=x.y.z"))[0], 403)
        self.assertEqual((yield status_of(port, headers={"Cookie": f"access_token={signer.token(scope='x')}"}))[0],
                         404)

    @defer.inlineCallbacks
    def test_unguarded_route_serves_without_credentials(self):
        """As in Zilla, credentials are only needed by guarded routes; a later unguarded
        route takes requests that have none (with no identity)."""
        signer = Signer("EC", "k")
        config = guarded_config([signer.jwk])
        config["bindings"]["http0"]["routes"].append({"when": [{"headers": {":path": "/public*"}}], "exit": "ws0"})
        gateway, port = yield start_gateway(self, config)
        client = yield connect_ws(port, "/public")
        yield close_ws(client)
        self.assertEqual((yield status_of(port, "/private"))[0], 401)
        self.assertIn("BINDING_HTTP_REQUEST_ACCEPTED - GET", gateway.events_text.getvalue())


class GuardUnitTests(unittest.TestCase):
    def _guard(self, signer: Signer, **options: Any) -> JwtGuard:
        return JwtGuard("ns", "g", {"issuer": ISSUER, "audience": AUDIENCE, "keys": [signer.jwk], **options},
                        reactor=Clock())

    def test_session(self):
        signer = Signer("EC", "k")
        exp = int(time.time()) + 100
        session = self._guard(signer).authorize(signer.token(exp=exp, scope="a b  c"))
        self.assertEqual((session.guard, session.identity, session.roles, session.expires_at),
                         ("ns:g", "alice", frozenset({"a", "b", "c"}), float(exp)))

    def test_leeway_accepts_a_just_expired_token_and_extends_the_session(self):
        signer = Signer("EC", "k")
        exp = int(time.time()) - 2
        self.assertRaises(Rejected, self._guard(signer).authorize, signer.token(exp=exp))
        session = self._guard(signer, leeway=30).authorize(signer.token(exp=exp))
        self.assertEqual(session.expires_at, exp + 30)

    def test_key_without_alg_never_verifies(self):
        signer = Signer("EC", "k")
        del signer.jwk["alg"]
        rejected = self.assertRaises(Rejected, self._guard(signer).authorize, signer.token())
        self.assertIn("unknown kid", rejected.reason)


class ConfigTests(unittest.TestCase):
    def _problems(self, config: dict[str, Any]) -> str:
        with self.assertRaises(ConfigError) as caught:
            load_config(config)
        return str(caught.exception)

    def test_errors_name_the_yaml_path(self):
        signer = Signer("EC", "k")
        config = guarded_config([signer.jwk, {**signer.jwk, "kid": "x", "alg": "RS256"}],
                                guard_options={"leeway": -1})
        config["bindings"]["http0"]["options"]["authorization"]["jwt0"]["credentials"]["query"]["t"] = "token"
        problems = self._problems(config)
        self.assertIn("guards.jwt0.options.leeway: -1 is less than the minimum of 0", problems)
        config["guards"]["jwt0"]["options"]["leeway"] = 1
        problems = self._problems(config)
        self.assertIn("guards.jwt0.options.keys[1]: alg 'RS256' does not fit a key of kty 'EC'", problems)
        self.assertIn("bindings.http0.options.authorization.jwt0.credentials.query.t: 'token' must contain "
                      "{credentials} once", problems)

    def test_unknown_guard_and_missing_issuer(self):
        config = guarded_config("https://auth.example.com/jwks.json")
        config["bindings"]["http0"]["options"]["authorization"] = {"jwt1": {"credentials": CREDENTIALS}}
        del config["guards"]["jwt0"]["options"]["issuer"]
        problems = self._problems(config)
        self.assertIn("bindings.http0.options.authorization.jwt1: no guard named 'jwt1' (did you mean 'jwt0'?)",
                      problems)
        self.assertIn("guards.jwt0.options.issuer: required", problems)

    def test_one_guard_per_http_server(self):
        config = guarded_config("https://auth.example.com/jwks.json")
        config["guards"]["jwt1"] = copy.deepcopy(config["guards"]["jwt0"])
        config["bindings"]["http0"]["options"]["authorization"]["jwt1"] = {"credentials": CREDENTIALS}
        self.assertIn("bindings.http0.options.authorization: one guard only, got 2: jwt0, jwt1",
                      self._problems(config))

    def test_keys_url_must_be_http(self):
        problems = self._problems(guarded_config("file:///etc/jwks.json"))
        self.assertIn("guards.jwt0.options.keys: 'file:///etc/jwks.json' is not an http(s) URL", problems)


class ExampleTests(unittest.TestCase):
    """conf/ws.echo.jwt.yaml unchanged, on 7114 in a network namespace of the test's own
    (zillatw.test.netns), with a token from conf/jwt/mint-token.py."""

    @defer.inlineCallbacks
    def test_example_and_token_script(self):
        network = ExampleNetwork(self)
        gateway, _ = yield start_gateway(self, network.config("ws.echo.jwt.yaml"))
        port = network.port(7114)
        script = os.path.join(CONF, "jwt", "mint-token.py")
        token = subprocess.run([sys.executable, script, "--sub", "carol", "--ttl", "60"], check=True,
                               capture_output=True, text=True).stdout.strip()
        client = yield connect_ws(port, f"/?access_token={token}")
        client.sendMessage(b"hi")
        self.assertEqual((yield client.messages.get()), (False, [b"hi"]))
        yield close_ws(client)
        self.assertIn("BINDING_HTTP_REQUEST_ACCEPTED carol GET", gateway.events_text.getvalue())
        self.assertEqual((yield status_of(port))[0], 401)
        short = subprocess.run([sys.executable, script, "--scope", "other"], check=True,
                               capture_output=True, text=True).stdout.strip()
        self.assertEqual((yield status_of(port, f"/?access_token={short}"))[0], 404)
