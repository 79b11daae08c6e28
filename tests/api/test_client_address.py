"""The client address of a request (api/client_address.py): the peer, or, behind a trusted proxy, the rightmost
X-Forwarded-For hop that is not a trusted proxy; the header is ignored without ZSS_TRUSTED_PROXIES."""

from __future__ import annotations

from typing import Any

import pytest

from api.client_address import SCOPE_PEER, client_address, trusted_networks
from settings import Settings

PROXY = trusted_networks("10.0.0.0/8, 127.0.0.1, ::1")


def scope(peer: str, *forwarded: str, rewritten: str | None = None) -> dict[str, Any]:
    """A request from ``peer`` with these X-Forwarded-For headers; ``rewritten``: the client uvicorn's proxy-header
    middleware wrote over the peer (BentoML leaves it on)."""
    headers = [(b"x-forwarded-for", f.encode()) for f in forwarded]
    s: dict[str, Any] = {"client": (rewritten or peer, 1234), "headers": headers}
    if rewritten:
        s[SCOPE_PEER] = (peer, 1234)
    return s


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert client_address(scope("127.0.0.1", "203.0.113.9")) == "127.0.0.1"
    assert client_address(scope("198.51.100.4", "203.0.113.9"), PROXY) == "198.51.100.4"  # not a trusted peer


def test_the_recorded_peer_wins_over_uvicorns_rewrite() -> None:
    # uvicorn trusted the loopback peer's header and rewrote the client; without ZSS_TRUSTED_PROXIES it counts not.
    assert client_address(scope("127.0.0.1", "203.0.113.9", rewritten="203.0.113.9")) == "127.0.0.1"
    assert client_address(scope("127.0.0.1", "203.0.113.9", rewritten="203.0.113.9"), PROXY) == "203.0.113.9"


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        (("203.0.113.9",), "203.0.113.9"),
        (("1.2.3.4, 203.0.113.9",), "203.0.113.9"),  # the client wrote 1.2.3.4 itself: only the last hop counts
        (("1.2.3.4", "203.0.113.9, 10.1.2.3"), "203.0.113.9"),  # two headers; a second trusted proxy
        (("10.1.2.3, 10.9.9.9",), "10.1.2.3"),  # only proxies: the leftmost
        (("not-an-address, 203.0.113.9",), "203.0.113.9"),
        (("203.0.113.9, garbage",), "127.0.0.1"),  # garbage from the last hop: the proxy's own address
        (("[2001:db8::1]:443",), "2001:db8::1"),
        (("203.0.113.9:5678",), "203.0.113.9"),
        ((), "127.0.0.1"),
    ],
)
def test_behind_a_trusted_proxy(forwarded: tuple[str, ...], expected: str) -> None:
    assert client_address(scope("127.0.0.1", *forwarded), PROXY) == expected


def test_odd_peers() -> None:
    assert client_address({"client": ("testclient", 50000), "headers": []}) == "testclient"
    assert client_address({"headers": []}) == "unknown"
    assert client_address(scope("::ffff:127.0.0.1", "203.0.113.9"), PROXY) == "203.0.113.9"  # v4-mapped v6


def test_the_setting_is_validated() -> None:
    assert Settings(trusted_proxies="10.0.0.0/8, ::1").trusted_proxies
    with pytest.raises(ValueError):
        Settings(trusted_proxies="10.0.0.0/8, nonsense")
    for bad in ({"auth_failure_limit": -1}, {"auth_failure_window_s": 0}, {"auth_failure_window_s": float("inf")}):
        with pytest.raises(ValueError):
            Settings(**bad)
