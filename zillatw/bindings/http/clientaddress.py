"""The client's address: the peer's, or the one a trusted proxy states.

One function decides it (`client_address`), called by the http server for every request;
the ws server is handed the result. The peer is what the transport says: the socket's
peer, or under a tcp server with `proxy-protocol` the source its PROXY header stated (the
header is read below TLS, so a tls server changes nothing).

When the peer is one of the http server's `trusted-proxies`, the request's `Forwarded`
(RFC 7239) or `X-Forwarded-For` header is believed, read from the right: each trusted
proxy appends the address it got the request from, so the first address from the right
that is not a trusted proxy is the client's; what lies left of it was written by the
client and is never read. A peer that is not trusted is the client, whatever its headers
say. Rules for what a header can hold (all tested in zillatw.test.test_client_address):

- `for=unknown` (or an element without `for`): the proxy did not know its peer: the client
  is that proxy, the address read just before it.
- an obfuscated identifier (`for=_gazonk`, §6.3): the proxy's name for the client, used as
  the client's address as it is.
- every address trusted: the leftmost (the chain's origin).
- a header that cannot be parsed, or whose element read is not a node: the peer.
- both headers present: each is read; the same answer from both is the client's, else the
  peer (a proxy that writes one passes the client's copy of the other along unchanged: a
  client could otherwise choose its address by sending the header its proxy does not write).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
UNIX_PEER = "unix"  # the client address of a peer without one (a unix socket, no PROXY header)
_UNKNOWN = None     # a node `unknown`: the proxy did not know
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_OBFUSCATED = re.compile(r"_[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")


def normalize(host: str) -> str | None:
    """`host` as one canonical text if it is an IP address (IPv4-mapped IPv6 as IPv4,
    IPv6 compressed), else None."""
    try:
        ip: IPAddress = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def peer_host(peer: Any) -> str:
    """The client address of a transport's peer (an IAddress): its IP, or UNIX_PEER."""
    host = getattr(peer, "host", None)
    normalized = normalize(host) if isinstance(host, str) else None
    return normalized if normalized is not None else UNIX_PEER


class TrustedProxies:
    """The http server's `options.trusted-proxies`: CIDR blocks (a bare address is one host)."""

    __slots__ = ("networks",)

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)

    def __contains__(self, address: str) -> bool:
        try:
            ip: IPAddress = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == network.version and ip in network for network in self.networks)


def check(cidrs: Any, where: str = "options.trusted-proxies") -> list[tuple[str, str]]:
    """Problems with a trusted-proxies list, as (sub-path, message)."""
    problems = []
    for index, cidr in enumerate(cidrs or ()):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as e:
            problems.append((f"{where}[{index}]", f"not an address or CIDR block ({e})"))
    return problems


# ---------------------------------------------------------------------------- Forwarded

def _node(text: str) -> str | None:
    """A Forwarded `for` node (RFC 7239 §6): the address (normalized), an obfuscated
    identifier, or _UNKNOWN; ValueError if it is none of those."""
    if text.lower() == "unknown":
        return _UNKNOWN
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError("unclosed [")
        name, rest = text[1:close], text[close + 1:]
        address = normalize(name) if ":" in name else None
    else:
        name, colon, port = text.partition(":")
        rest = colon + port
        if _OBFUSCATED.fullmatch(name):
            address = name
        elif name.count(".") == 3:
            address = normalize(name)
        else:
            address = None
    if address is None:
        raise ValueError(f"not a node: {text!r}")
    if rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:])):
        raise ValueError(f"bad port: {rest!r}")
    return address


def _skip_spaces(value: str, i: int) -> int:
    while i < len(value) and value[i] in " \t":
        i += 1
    return i


def _quoted(value: str, i: int) -> tuple[str, int]:
    """The quoted-string starting at value[i] (its opening quote), unescaped, and where it ends."""
    chars: list[str] = []
    i += 1
    while i < len(value):
        c = value[i]
        if c == '"':
            return "".join(chars), i + 1
        if c == "\\":
            i += 1
            if i >= len(value):
                break
            c = value[i]
        chars.append(c)
        i += 1
    raise ValueError("unterminated quoted string")


def _pair(value: str, i: int) -> tuple[str, str, int]:
    """The forwarded-pair `token=value` at value[i]: its lower-cased name, value, and end."""
    match = _TOKEN.match(value, i)
    if match is None:
        raise ValueError(f"a parameter name expected at {i}")
    name, i = match.group().lower(), match.end()
    if i >= len(value) or value[i] != "=":
        raise ValueError(f"'=' expected after {name}")
    i += 1
    if i < len(value) and value[i] == '"':
        text, i = _quoted(value, i)
    else:
        match = _TOKEN.match(value, i)
        if match is None:
            raise ValueError(f"a value expected for {name}")
        text, i = match.group(), match.end()
    return name, text, i


def forwarded_elements(value: str) -> list[dict[str, str]]:
    """The elements of a Forwarded value (RFC 7239 §4), each its parameters (names
    lower-cased, values unquoted); ValueError if the value breaks the grammar."""
    elements: list[dict[str, str]] = [{}]
    i = _skip_spaces(value, 0)
    while i < len(value):
        if value[i] == ",":
            elements.append({})
        elif value[i] != ";":
            name, text, i = _pair(value, i)
            if name in elements[-1]:
                raise ValueError(f"'{name}' twice in one element")
            elements[-1][name] = text
            i = _skip_spaces(value, i)
            if i < len(value) and value[i] not in ",;":
                raise ValueError(f"',' or ';' expected at {i}")
            continue
        i = _skip_spaces(value, i + 1)
    return [element for element in elements if element]  # 1#: empty list elements are allowed


def _rightmost_untrusted(peer: str, nodes: list[str], trusted: TrustedProxies) -> str:
    """The client, from the nodes read right to left (see the module's rules). `nodes`
    holds raw texts: each is parsed only when reached (ValueError if not a node)."""
    last = peer
    for text in reversed(nodes):
        node = _node(text) if text else _UNKNOWN
        if node is _UNKNOWN:
            return last
        if node.startswith("_") or node not in trusted:
            return node
        last = node
    return last


def from_forwarded(peer: str, value: str, trusted: TrustedProxies) -> str:
    """The client by a Forwarded header (ValueError when malformed)."""
    return _rightmost_untrusted(peer, [element.get("for", "") for element in forwarded_elements(value)], trusted)


def from_x_forwarded_for(peer: str, value: str, trusted: TrustedProxies) -> str:
    """The client by an X-Forwarded-For header: addresses separated by commas, IPv6 bare
    or bracketed, with or without a port (ValueError when malformed where read)."""
    nodes = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" in item and normalize(item) is not None:  # a bare IPv6 address (its colons are not a port)
            item = f"[{item}]"
        nodes.append(item)
    if not nodes:
        raise ValueError("no address")
    return _rightmost_untrusted(peer, nodes, trusted)


def client_address(peer: Any, headers: Mapping[str, str], trusted: TrustedProxies | None) -> str:
    """The client's address for a request from `peer` (the transport's IAddress) with
    `headers` (lower-cased names), believing the headers only from `trusted` peers."""
    host = peer_host(peer)
    if trusted is None or host not in trusted:
        return host
    forwarded, x_forwarded_for = headers.get("forwarded"), headers.get("x-forwarded-for")
    try:
        if forwarded is not None:
            client = from_forwarded(host, forwarded, trusted)
            if x_forwarded_for is not None and from_x_forwarded_for(host, x_forwarded_for, trusted) != client:
                return host
            return client
        if x_forwarded_for is not None:
            return from_x_forwarded_for(host, x_forwarded_for, trusted)
    except ValueError:
        return host
    return host
