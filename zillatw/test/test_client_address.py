"""zillatw.bindings.http.clientaddress: the peer's address, or the one a trusted proxy states (Forwarded per
RFC 7239, X-Forwarded-For), read from the right; CIDR matching with ipaddress."""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial import unittest

from zillatw.bindings.http.clientaddress import (
    UNIX_PEER,
    TrustedProxies,
    check,
    client_address,
    forwarded_elements,
    from_forwarded,
    from_x_forwarded_for,
    normalize,
    peer_host,
)

TRUSTED = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48", "192.0.2.1"])
PROXY = IPv4Address("TCP", "10.1.2.3", 40000)


def seen(headers: dict[str, str], peer=PROXY, trusted=TRUSTED) -> str:
    return client_address(peer, headers, trusted)


class AddressTests(unittest.SynchronousTestCase):
    def test_normalize(self):
        self.assertEqual(normalize("198.51.100.7"), "198.51.100.7")
        self.assertEqual(normalize("2001:DB8:0:0::1"), "2001:db8::1")
        self.assertEqual(normalize("::ffff:198.51.100.7"), "198.51.100.7")  # a dual-stack socket's IPv4 peer
        self.assertIsNone(normalize("example.com"))
        self.assertIsNone(normalize("_hidden"))

    def test_peer_host(self):
        self.assertEqual(peer_host(IPv4Address("TCP", "127.0.0.1", 1)), "127.0.0.1")
        self.assertEqual(peer_host(IPv6Address("TCP", "::ffff:127.0.0.1", 1)), "127.0.0.1")
        self.assertEqual(peer_host(UNIXAddress(None)), UNIX_PEER)
        self.assertEqual(peer_host(None), UNIX_PEER)

    def test_cidr_matching(self):
        self.assertIn("10.200.0.1", TRUSTED)
        self.assertIn("192.0.2.1", TRUSTED)  # a bare address is one host
        self.assertNotIn("192.0.2.2", TRUSTED)
        self.assertIn("2001:db8:ffff:1::9", TRUSTED)
        self.assertNotIn("2001:db8:fffe::9", TRUSTED)
        self.assertIn("::ffff:10.0.0.1", TRUSTED)  # IPv4-mapped matches the IPv4 block
        self.assertNotIn("not an address", TRUSTED)
        self.assertNotIn("_obfuscated", TRUSTED)

    def test_check_names_the_entry(self):
        self.assertEqual(check(["10.0.0.0/8", "::1"]), [])
        problems = check(["10.0.0.0/8", "10.0.0.0/33", "proxy.example"])
        self.assertEqual([where for where, _ in problems],
                         ["options.trusted-proxies[1]", "options.trusted-proxies[2]"])


class ForwardedGrammarTests(unittest.SynchronousTestCase):
    def test_elements_pairs_quoted_strings(self):
        self.assertEqual(forwarded_elements('for=192.0.2.43, For="[2001:db8:cafe::17]:4711";proto=https , '
                                            'for=198.51.100.17;by=203.0.113.60;host="a,b"'),
                         [{"for": "192.0.2.43"}, {"for": "[2001:db8:cafe::17]:4711", "proto": "https"},
                          {"for": "198.51.100.17", "by": "203.0.113.60", "host": "a,b"}])

    def test_escapes_and_empty_list_elements(self):
        self.assertEqual(forwarded_elements(r'for="_a\"b", ,for=unknown'), [{"for": '_a"b'}, {"for": "unknown"}])

    def test_malformed_values_raise(self):
        for value in ('for="192.0.2.1', "for", "for=", "=1.2.3.4", "for=1.2.3.4 x", "for=1;for=2",
                      "for=[2001:db8::1]", 'for="1.2.3.4"junk', 'for="abc\\'):
            self.assertRaises(ValueError, forwarded_elements, value)


class ForwardedTests(unittest.SynchronousTestCase):
    def test_the_rightmost_untrusted_address(self):
        self.assertEqual(seen({"forwarded": "for=203.0.113.9"}), "203.0.113.9")
        self.assertEqual(seen({"forwarded": "for=198.51.100.1, for=203.0.113.9, for=10.9.9.9"}), "203.0.113.9")

    def test_what_the_client_wrote_left_of_it_is_never_read(self):
        self.assertEqual(seen({"forwarded": 'for=spoof!!, for="[2001:db8::bad", for=203.0.113.9'}), "203.0.113.9")

    def test_quoted_ipv4_with_port_and_ipv6_forms(self):
        self.assertEqual(seen({"forwarded": 'for="203.0.113.9:4711"'}), "203.0.113.9")
        self.assertEqual(seen({"forwarded": 'for="[2001:DB8:cafe::17]:4711"'}), "2001:db8:cafe::17")
        self.assertEqual(seen({"forwarded": 'for="[2001:db8:cafe::17]"'}), "2001:db8:cafe::17")
        self.assertEqual(seen({"forwarded": 'for="[::ffff:203.0.113.9]"'}), "203.0.113.9")
        self.assertEqual(seen({"forwarded": 'for="203.0.113.9:_port1"'}), "203.0.113.9")

    def test_an_obfuscated_identifier_is_the_client(self):
        self.assertEqual(seen({"forwarded": "for=_hidden, for=10.0.0.2"}), "_hidden")
        self.assertEqual(seen({"forwarded": 'for="_SEVKISEK:_4711"'}), "_SEVKISEK")

    def test_unknown_is_the_proxy_that_said_it(self):
        self.assertEqual(seen({"forwarded": "for=unknown"}), "10.1.2.3")  # the peer said it
        self.assertEqual(seen({"forwarded": "for=unknown, for=10.0.0.2"}), "10.0.0.2")
        self.assertEqual(seen({"forwarded": "proto=https"}), "10.1.2.3")  # an element without `for`

    def test_every_hop_trusted_gives_the_leftmost(self):
        self.assertEqual(seen({"forwarded": "for=10.0.0.5, for=10.0.0.6"}), "10.0.0.5")

    def test_trusted_ipv6_proxies(self):
        peer = IPv6Address("TCP", "2001:db8:ffff::1", 443)
        self.assertEqual(seen({"forwarded": 'for="[2001:db8::77]", for="[2001:db8:ffff::2]"'}, peer), "2001:db8::77")

    def test_malformed_headers_give_the_peer(self):
        for value in ('for="203.0.113.9', "for=203.0.113.9;;for=1", "for=example.com", "for=203.0.113",
                      'for="[2001:db8::1]:http"', 'for="[2001:db8::1"', "for=2001:db8::1", "for=1.2.3.4:99999999"):
            self.assertEqual(seen({"forwarded": value}), "10.1.2.3", value)

    def test_from_forwarded_raises_on_what_it_reads(self):
        self.assertRaises(ValueError, from_forwarded, "10.1.2.3", "for=nonsense", TRUSTED)


class XForwardedForTests(unittest.SynchronousTestCase):
    def test_the_rightmost_untrusted_address(self):
        self.assertEqual(seen({"x-forwarded-for": "198.51.100.1, 203.0.113.9, 10.0.0.7"}), "203.0.113.9")
        self.assertEqual(seen({"x-forwarded-for": "203.0.113.9"}), "203.0.113.9")

    def test_left_of_it_anything_goes(self):
        self.assertEqual(seen({"x-forwarded-for": "<script>, 203.0.113.9"}), "203.0.113.9")

    def test_ipv6_bare_or_bracketed_ports_unknown(self):
        self.assertEqual(seen({"x-forwarded-for": "2001:db8::9"}), "2001:db8::9")
        self.assertEqual(seen({"x-forwarded-for": "[2001:db8::9]:1234"}), "2001:db8::9")
        self.assertEqual(seen({"x-forwarded-for": "203.0.113.9:1234"}), "203.0.113.9")
        self.assertEqual(seen({"x-forwarded-for": "unknown, 10.0.0.8"}), "10.0.0.8")

    def test_malformed_gives_the_peer(self):
        for value in ("", " , ", "garbage", "203.0.113.9, evil.example", "10.0.0.1 10.0.0.2"):
            self.assertEqual(seen({"x-forwarded-for": value}), "10.1.2.3", value)
        self.assertRaises(ValueError, from_x_forwarded_for, "10.1.2.3", "", TRUSTED)


class WhoIsBelievedTests(unittest.SynchronousTestCase):
    def test_a_spoofed_header_from_an_untrusted_peer_is_ignored(self):
        client = IPv4Address("TCP", "198.51.100.50", 5000)
        self.assertEqual(seen({"x-forwarded-for": "203.0.113.9", "forwarded": "for=203.0.113.9"}, client),
                         "198.51.100.50")

    def test_without_trusted_proxies_headers_are_never_read(self):
        self.assertEqual(seen({"x-forwarded-for": "203.0.113.9"}, trusted=None), "10.1.2.3")
        self.assertEqual(seen({"x-forwarded-for": "203.0.113.9"}, trusted=TrustedProxies([])), "10.1.2.3")

    def test_a_trusted_peer_without_headers_is_the_client(self):
        self.assertEqual(seen({}), "10.1.2.3")

    def test_both_headers_must_agree(self):
        self.assertEqual(seen({"forwarded": "for=203.0.113.9", "x-forwarded-for": "203.0.113.9"}), "203.0.113.9")
        # a proxy writes one; the client's copy of the other passes unchanged: believe neither
        self.assertEqual(seen({"forwarded": "for=203.0.113.66", "x-forwarded-for": "203.0.113.9"}), "10.1.2.3")
        self.assertEqual(seen({"forwarded": "for=203.0.113.9", "x-forwarded-for": "junk"}), "10.1.2.3")
