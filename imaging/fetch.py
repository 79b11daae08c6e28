"""Fetch an image the client named by URL, without letting the URL reach anything but the public internet (SSRF).

How the guard works:

* only ``http``/``https`` URLs without credentials; the host must match the allow-list when one is configured;
* the host is resolved once here, and every address it resolves to must be public: loopback, private, link-local,
  shared (CGNAT), multicast, reserved, unspecified and cloud-metadata addresses are refused, also when hidden inside
  IPv6 (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible, NAT64 ``64:ff9b::/96``, 6to4, Teredo);
* the TCP connection goes to the very address that was checked (no second DNS lookup, so DNS rebinding between check
  and connect cannot swap in an internal address), while the ``Host`` header and the TLS SNI/certificate check use
  the URL's host name, so virtual hosting and HTTPS verification work as usual;
* redirects are followed by hand (at most ``max_redirects``), and every hop goes through all of the above again;
* one deadline covers DNS, connects, every hop and the body (a watchdog closes the socket when it passes, so a server
  trickling bytes cannot stretch it); the body is streamed and abandoned past ``max_bytes``;
* the response must be 2xx with an ``image/*`` Content-Type.

Status codes of :class:`UrlFetchError` (an :class:`~imaging.decode.ImageInputError`):
400 URL refused (scheme, credentials, allow-list, non-public address, too many redirects) or the fetch failed
(DNS, connection, TLS, upstream non-2xx); 413 body larger than ``max_bytes``; 422 not an image (Content-Type) and
timeout. A timeout is 422, not 408: 408 tells a client that *it* was too slow sending its request, and clients and
proxies react to it by retrying on a new connection, which would only repeat the slow fetch.

Proxy environment variables are deliberately ignored (``http.client``, not ``urllib``), so no proxy can be used to
reach what the address check refuses.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

from imaging.decode import ImageInputError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

USER_AGENT = "ZeroShotServer/0.1 (image fetch)"
MAX_URL_LENGTH = 8192
_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

# Instance-metadata endpoints. Most are link-local or private anyway; the ones that Python calls global
# (Oracle's 192.0.0.192) or merely "shared" (Alibaba's 100.100.100.200) make the explicit list worth keeping.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")

# Module attribute (not a direct socket.getaddrinfo call) so tests can point a made-up host name at a local server.
_getaddrinfo = socket.getaddrinfo
_dns_pool: ThreadPoolExecutor | None = None
_dns_pool_lock = threading.Lock()
_tls_context: ssl.SSLContext | None = None


class UrlFetchError(ImageInputError):
    """An image URL was refused or could not be fetched; ``status_code`` is the HTTP status for our client."""


def parse_allow_hosts(value: str) -> set[str] | None:
    """``Settings.url_allow_hosts`` ("a.com, *.b.org") -> a host set for :func:`fetch_image_url`; "" -> None (any)."""
    hosts = {_normalise_host(h.strip()) for h in value.split(",") if h.strip()}
    return hosts or None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted, or None when it is a public unicast address."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address the kernel or a gateway may end up talking to.
        if ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            candidates.append(ip.sixtofour)
        if ip.teredo is not None:
            candidates.extend(ip.teredo)
        if ip in _NAT64 or ip in _IPV4_COMPATIBLE:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for addr in candidates:
        if addr in METADATA_ADDRESSES:
            return "a cloud metadata address"
        if addr.is_loopback:
            return "a loopback address"
        if addr.is_unspecified:
            return "an unspecified address"
        if addr.is_link_local:
            return "a link-local address"
        if addr.is_multicast:
            return "a multicast address"
        if addr.is_private:
            return "a private address"
        if addr.is_reserved:
            return "a reserved address"
        if not addr.is_global:  # e.g. 100.64.0.0/10 (shared/CGNAT), which is neither private nor global
            return "a non-public address"
    return None


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal without brackets
    port: int
    path: str  # path + query, percent-encoded, never empty

    @property
    def default_port(self) -> int:
        return 443 if self.scheme == "https" else 80


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.at = time.monotonic() + timeout_s

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.error()
        return left

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def error(self) -> UrlFetchError:
        return UrlFetchError(f"Timed out fetching the image URL (limit {self.timeout_s:g} s).", 422)


def fetch_image_url(
    url: str,
    *,
    allow_hosts: Collection[str] | None,
    timeout_s: float,
    max_bytes: int,
    max_redirects: int = 3,
    allow_networks: Collection[str] = (),
) -> bytes:
    """GET ``url`` and return the body of an ``image/*`` response, refusing anything that is not a public host.

    ``allow_hosts``: None or empty = any public host; otherwise exact host names, or ``*.example.com`` for any
    subdomain of example.com. Allow-listed hosts must still resolve to public addresses.
    ``allow_networks``: addresses or CIDR networks (``10.1.2.0/24``) the operator trusts although they are not public,
    e.g. an internal image store (``ZSS_URL_ALLOW_NETWORKS``); cloud-metadata addresses stay refused even inside them.
    """
    deadline = _Deadline(timeout_s)
    allowed = {_normalise_host(h) for h in allow_hosts} if allow_hosts else None
    exempt = parse_networks(allow_networks)
    current = url
    for hop in range(max_redirects + 1):
        target = _parse(current, allowed)
        addresses = _resolve_public(target, deadline, exempt)
        location, body = _get(target, addresses, deadline, max_bytes)
        if location is None:
            return body
        current = urljoin(current, location)
        log.debug("image URL redirect %d -> %s", hop + 1, current)
    raise UrlFetchError(f"URL refused: more than {max_redirects} redirects.", 400)


# -- URL checks ------------------------------------------------------------------------------------------------------
def _normalise_host(host: str) -> str:
    host = host.strip().strip("[]").rstrip(".").lower()
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise UrlFetchError(f"URL refused: invalid host name {host!r}.", 400) from exc
    return "*." + host if wildcard else host


def _host_allowed(host: str, allowed: set[str]) -> bool:
    if host in allowed:
        return True
    return any(entry.startswith("*.") and host.endswith(entry[1:]) for entry in allowed)


def _parse(url: str, allowed: set[str] | None) -> _Target:
    if not isinstance(url, str) or not url.strip():
        raise UrlFetchError("URL refused: empty URL.", 400)
    if len(url) > MAX_URL_LENGTH:
        raise UrlFetchError(f"URL refused: longer than {MAX_URL_LENGTH} characters.", 400)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UrlFetchError(f"URL refused: malformed URL ({exc}).", 400) from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlFetchError("URL refused: only http and https URLs are supported.", 400)
    if parts.username is not None or parts.password is not None:
        raise UrlFetchError("URL refused: credentials in URLs are not allowed.", 400)
    if not parts.hostname:
        raise UrlFetchError("URL refused: the URL has no host.", 400)
    host = _normalise_host(parts.hostname)
    if allowed is not None and not _host_allowed(host, allowed):
        raise UrlFetchError(f"URL refused: host {host!r} is not in the allow-list.", 400)
    # Keep existing %XX escapes and reserved characters; escape spaces and other bytes http.client would reject.
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)


def parse_networks(values: Collection[str]) -> list[IPNetwork]:
    """Addresses or CIDR networks -> networks (a bare address is a /32 or /128); a bad entry raises ValueError."""
    return [ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip()]


def _exempt(addr: IPAddress, networks: list[IPNetwork]) -> bool:
    return addr not in METADATA_ADDRESSES and any(addr in n for n in networks if n.version == addr.version)


def _resolve_public(target: _Target, deadline: _Deadline, exempt: list[IPNetwork]) -> list[IPAddress]:
    """All addresses of the host, or UrlFetchError(400) if any of them is not public (no mixing public + private)."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(target.host)
    except ValueError:
        literal = None
    if literal is not None:
        reason = None if _exempt(literal, exempt) else blocked_reason(literal)
        if reason:
            raise UrlFetchError(f"URL refused: {target.host} is {reason}, not a public address.", 400)
        return [literal]
    addresses: list[IPAddress] = []
    for info in _lookup(target.host, target.port, deadline):
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone id
        if addr not in addresses:
            addresses.append(addr)
    for addr in addresses:
        reason = None if _exempt(addr, exempt) else blocked_reason(addr)
        if reason:
            log.info("image URL refused: %s resolves to %s (%s)", target.host, addr, reason)
            break
    else:
        if addresses:
            return addresses
    # One message for "does not resolve" and "resolves to an internal address", so the endpoint cannot be used to
    # probe which internal names exist.
    raise UrlFetchError(f"URL refused: host {target.host!r} does not resolve to a public address.", 400)


def _lookup(host: str, port: int, deadline: _Deadline) -> list[tuple]:
    # getaddrinfo has no timeout of its own; run it on a small pool so the deadline still holds.
    global _dns_pool
    with _dns_pool_lock:
        if _dns_pool is None:
            _dns_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="zss-url-dns")
    future = _dns_pool.submit(_getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        return list(future.result(timeout=deadline.remaining()))
    except FutureTimeout as exc:
        raise deadline.error() from exc
    except (OSError, UnicodeError) as exc:
        log.info("image URL host %r did not resolve: %s", host, exc)
        return []


# -- the request -----------------------------------------------------------------------------------------------------
def _tls() -> ssl.SSLContext:
    global _tls_context
    if _tls_context is None:
        _tls_context = ssl.create_default_context()
    return _tls_context


def _connect(target: _Target, addresses: list[IPAddress], deadline: _Deadline) -> socket.socket:
    errors: list[str] = []
    for addr in addresses:
        try:
            sock = socket.create_connection((str(addr), target.port), timeout=deadline.remaining())
        except TimeoutError as exc:
            if deadline.passed():
                raise deadline.error() from exc
            errors.append(f"{addr}: timed out")
            continue
        except OSError as exc:
            errors.append(f"{addr}: {exc.strerror or exc}")
            continue
        if target.scheme != "https":
            return sock
        try:
            sock.settimeout(deadline.remaining())
            # SNI and certificate verification use the URL's host name, although we connected to the checked address.
            return _tls().wrap_socket(sock, server_hostname=target.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise UrlFetchError(
                f"Could not fetch the image URL: TLS certificate check failed for {target.host!r}.", 400
            ) from exc
        except UrlFetchError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            if deadline.passed():
                raise deadline.error() from exc
            errors.append(f"{addr}: TLS handshake failed ({exc})")
    log.info("image URL connect to %s failed: %s", target.host, "; ".join(errors))
    raise UrlFetchError(f"Could not fetch the image URL: could not connect to {target.host!r}.", 400)


class _Watchdog:
    """Shuts the socket down when the deadline passes: per-read socket timeouts alone cannot bound the total time."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.fired = threading.Event()
        self._sock = sock
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: nothing left to interrupt

    def cancel(self) -> None:
        self._timer.cancel()


def _get(target: _Target, addresses: list[IPAddress], deadline: _Deadline, max_bytes: int) -> tuple[str | None, bytes]:
    """(redirect location, b"") for a redirect, else (None, body)."""
    sock = _connect(target, addresses, deadline)
    conn = http.client.HTTPConnection(target.host, target.port)
    conn.default_port = target.default_port  # type: ignore[misc]  # the Host header omits the scheme's default port
    conn.sock = sock  # connect() is skipped: we already hold a connection to the checked address
    watchdog: _Watchdog | None = None
    try:
        watchdog = _Watchdog(sock, deadline.remaining())
        conn.putrequest("GET", target.path, skip_accept_encoding=True)
        conn.putheader("Accept", "image/*")
        conn.putheader("Accept-Encoding", "identity")  # http.client does not decompress
        conn.putheader("User-Agent", USER_AGENT)
        conn.putheader("Connection", "close")
        conn.endheaders()
        resp = conn.getresponse()
        if watchdog.fired.is_set():  # the watchdog's EOF can end a trickled header block early
            raise deadline.error()
        if resp.status in _REDIRECTS:
            location = resp.getheader("Location")
            if not location:
                raise UrlFetchError(f"Could not fetch the image URL: HTTP {resp.status} without a Location.", 400)
            return location.strip(), b""
        if not 200 <= resp.status < 300:
            raise UrlFetchError(f"Could not fetch the image URL: the server answered HTTP {resp.status}.", 400)
        content_type = (resp.getheader("Content-Type") or "").split(";", 1)[0].strip().lower()
        if not content_type.startswith("image/"):
            raise UrlFetchError(f"The URL did not return an image (Content-Type: {content_type or 'none'}).", 422)
        declared = (resp.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(max_bytes, int(declared))
        return None, _read_body(resp, sock, deadline, max_bytes, watchdog.fired)
    except UrlFetchError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if isinstance(exc, TimeoutError) or deadline.passed() or (watchdog is not None and watchdog.fired.is_set()):
            raise deadline.error() from exc
        log.info("image URL fetch from %s failed: %r", target.host, exc)
        raise UrlFetchError(f"Could not fetch the image URL: {type(exc).__name__}.", 400) from exc
    finally:
        if watchdog is not None:
            watchdog.cancel()
        conn.close()  # also closes sock


def _read_body(
    resp: http.client.HTTPResponse, sock: socket.socket, deadline: _Deadline, max_bytes: int, cut: threading.Event
) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        sock.settimeout(deadline.remaining())
        chunk = resp.read1(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:  # stop reading at once: the rest is never downloaded
            raise _too_large(max_bytes)
        chunks.append(chunk)
    if cut.is_set():  # the EOF came from the watchdog, not from the server finishing
        raise deadline.error()
    if resp.length:  # Content-Length promised more than arrived
        raise UrlFetchError("Could not fetch the image URL: the connection closed before the image was complete.", 400)
    return b"".join(chunks)


def _too_large(max_bytes: int, declared: int | None = None) -> UrlFetchError:
    size = f"{declared} bytes" if declared is not None else "the image"
    return UrlFetchError(f"Image too large: {size} exceeds the limit of {max_bytes} bytes.", 413)
