"""Which address a request comes from, for the per-address budget of failed API keys (api/auth.py).

The address is the connection's peer, unless that peer is a proxy named in ``ZSS_TRUSTED_PROXIES`` (addresses or
networks, e.g. the load balancer of deploy/haproxy/haproxy.cfg, which adds ``X-Forwarded-For``): then it is the
rightmost ``X-Forwarded-For`` entry that is not itself a trusted proxy (each proxy appends the address it saw, so
entries left of the last trusted one are whatever the client wrote and prove nothing). Without the setting the header
is ignored: anyone could write it.

The peer is read before uvicorn's own proxy-header middleware, which BentoML 1.4 leaves on with uvicorn's default
(it trusts ``X-Forwarded-For`` from any loopback peer and rewrites the request's ``client``, a setting BentoML does not
expose): api/connections.py's protocol records the connection's real peer under :data:`SCOPE_PEER`, and that is what
is used here. In-process (tests) the request's ``client`` is the peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

SCOPE_PEER = "zss.peer"  # (host, port) of the connection, recorded before any proxy-header rewrite
UNKNOWN = "unknown"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(setting: str) -> tuple[Network, ...]:
    """The networks of a comma-separated ``ZSS_TRUSTED_PROXIES`` (a bare address is a /32 or /128); ValueError names
    a bad entry."""
    out = []
    for item in setting.split(","):
        if item.strip():
            out.append(ipaddress.ip_network(item.strip(), strict=False))
    return tuple(out)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # "[v6]:port"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "v4:port"
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def _trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: Iterable[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


def client_address(scope: dict[str, Any], trusted: tuple[Network, ...] = ()) -> str:
    """The request's client address (see the module's docstring), as text; ``unknown`` when there is none."""
    peer = scope.get(SCOPE_PEER) or scope.get("client")
    host = str(peer[0]) if peer else ""
    ip = _ip(host) if host else None
    if ip is None:
        return host or UNKNOWN
    if not trusted or not _trusted(ip, trusted):
        return str(ip)
    forwarded = [
        part
        for name, value in scope.get("headers", ())
        if name.lower() == b"x-forwarded-for"
        for part in value.decode("latin-1").split(",")
    ]
    for entry in reversed(forwarded):
        hop = _ip(entry)
        if hop is None:  # garbage in the header: the last trusted hop is the best we know
            return str(ip)
        if not _trusted(hop, trusted):
            return str(hop)
        ip = hop
    return str(ip)  # every hop a trusted proxy (or no header): the leftmost one
