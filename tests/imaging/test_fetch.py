"""imaging.fetch: SSRF guard, redirects, content type, size and time limits.

Nothing here reaches the network: host names are answered by a fake resolver, and the only server is a local one on
127.0.0.1, reachable only because the tests trust that address (``allow_networks``, ZSS_URL_ALLOW_NETWORKS).
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from imaging import fetch as urlfetch
from imaging.decode import ImageInputError
from imaging.fetch import UrlFetchError, blocked_reason, fetch_image_url, parse_allow_hosts
from testing.server import local_http_server
from tests import bad_inputs

PNG = bad_inputs.png(8, 8)
LOCAL = ("127.0.0.1",)
MAX = 100_000


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hosts_seen: list[str] = []

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str | None = "image/png", **headers: str) -> None:
        self.send_response(status)
        if ctype is not None:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        _Handler.hosts_seen.append(self.headers.get("Host", ""))
        path, _, query = self.path.partition("?")
        try:
            self._route(path, query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (size or time limit)

    def _route(self, path: str, query: str) -> None:
        if path == "/img.png":
            self._send(200, PNG)
        elif path == "/img-params":
            self._send(200, PNG, ctype="IMAGE/PNG; charset=binary")
        elif path == "/html":
            self._send(200, b"<html></html>", ctype="text/html; charset=utf-8")
        elif path == "/no-type":
            self._send(200, PNG, ctype=None)
        elif path == "/missing":
            self._send(404, b"not here", ctype="text/plain")
        elif path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(MAX + 1))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * 10)
        elif path in ("/big-stream", "/big-chunked"):
            chunked = path == "/big-chunked"
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b"y" * 16_384
            while True:  # endless: only a client that stops at its size limit gets an answer (else a hang)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        elif path == "/short":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"z" * 10)
            self.close_connection = True
        elif path == "/slow-body":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):  # 1 byte every 50 ms: each read is quick, the whole is 5 s
                self.wfile.write(b"s")
                self.wfile.flush()
                time.sleep(0.05)
        elif path == "/slow-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(100):
                self.wfile.write(b"X-Slow: a\r\n")
                self.wfile.flush()
                time.sleep(0.05)
        elif path.startswith("/hops/"):
            n = int(path.rsplit("/", 1)[1])  # n redirects, then the image
            if n == 0:
                self._send(200, PNG)
            else:
                self._send(302, b"", ctype=None, Location=f"/hops/{n - 1}")
        elif path == "/redirect":
            status = int(query.split("status=")[1].split("&")[0]) if "status=" in query else 302
            target = query.split("to=", 1)[1]
            self._send(status, b"", ctype=None, Location=target)
        elif path == "/redirect-no-location":
            self._send(302, b"", ctype=None)
        else:
            self._send(404, b"", ctype="text/plain")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with local_http_server(_Handler) as port:
        yield f"127.0.0.1:{port}"


def _fake_dns(table: dict[str, list[str]]) -> Callable[..., list[tuple]]:
    real = socket.getaddrinfo

    def resolve(host: str, port: int, *args: object, **kw: object) -> list[tuple]:
        if host in table:
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]
            ]
        if host[:1].isdigit():  # numeric forms such as 2130706433 or 0x7f.1: parsed locally, never sent to DNS
            return real(host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP, socket.AI_NUMERICHOST)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    return resolve


@pytest.fixture(autouse=True)
def no_real_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    table = {"img.test": ["127.0.0.1"], "localhost": ["127.0.0.1", "::1"]}
    monkeypatch.setattr(urlfetch, "_getaddrinfo", _fake_dns(table))


def fetch(url: str, **kw: object) -> bytes:
    args: dict[str, object] = {"allow_hosts": None, "timeout_s": 5.0, "max_bytes": MAX}
    args.update(kw)
    return fetch_image_url(url, **args)  # type: ignore[arg-type]


def refused(url: str, status: int = 400, **kw: object) -> UrlFetchError:
    with pytest.raises(UrlFetchError) as err:
        fetch(url, **kw)
    assert err.value.status_code == status, err.value.message
    assert isinstance(err.value, ImageInputError)
    return err.value


# -- address checks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "169.254.170.2",
        "100.64.0.1",
        "100.100.100.200",
        "192.0.0.192",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "240.0.0.1",
        "198.18.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "2002:7f00:1::",
        "2001:db8::1",
    ],
)
def test_non_public_addresses_are_blocked(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450::1"])
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/img.png",
        "http://10.0.0.1/img.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/img.png",
        "http://localhost/img.png",
        "http://LOCALHOST./img.png",
        "http://[::ffff:127.0.0.1]/img.png",
        "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://0.0.0.0/img.png",
        "http://2130706433/img.png",  # 127.0.0.1 as one decimal number
        "http://0x7f.1/img.png",
        "https://127.0.0.1/img.png",
    ],
)
def test_private_urls_are_refused_by_default(url: str) -> None:
    refused(url)


def test_the_local_server_itself_is_refused_without_the_test_exemption(server: str) -> None:
    assert fetch(f"http://{server}/img.png", allow_networks=LOCAL) == PNG
    err = refused(f"http://{server}/img.png")
    assert "loopback" in err.message


def test_a_host_resolving_to_any_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urlfetch, "_getaddrinfo", _fake_dns({"mixed.test": ["8.8.8.8", "10.0.0.1"]}))
    err = refused("http://mixed.test/img.png")
    assert "10.0.0.1" not in err.message  # the resolved internal address is not revealed
    # same answer as for a name that does not resolve, so the endpoint cannot probe internal DNS
    assert refused("http://nowhere.test/img.png").message.replace("nowhere", "mixed") == err.message


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://img.test/img.png",
        "gopher://img.test:70/",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
        "//img.test/img.png",
        "http:///img.png",
        "http://user:pw@img.test/img.png",
        "http://user@img.test/img.png",
        "http://img.test:99999/img.png",
        "",
        "http://img.test/" + "a" * 9000,
    ],
)
def test_bad_urls_are_400(url: str) -> None:
    refused(url, allow_networks=LOCAL)


# -- allow-list ----------------------------------------------------------------------------------------------------
def test_allow_list(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    ok = fetch(f"http://img.test:{port}/img.png", allow_hosts={"img.test"}, allow_networks=LOCAL)
    assert ok == PNG
    assert fetch(f"http://IMG.test.:{port}/img.png", allow_hosts={"img.test"}, allow_networks=LOCAL) == PNG
    refused(f"http://img.test:{port}/img.png", allow_hosts={"other.test"}, allow_networks=LOCAL)
    refused(f"http://{server}/img.png", allow_hosts={"img.test"}, allow_networks=LOCAL)


def test_allow_list_wildcard_and_parsing(monkeypatch: pytest.MonkeyPatch, server: str) -> None:
    port = server.rsplit(":", 1)[1]
    monkeypatch.setattr(urlfetch, "_getaddrinfo", _fake_dns({"a.img.test": ["127.0.0.1"]}))
    hosts = parse_allow_hosts(" *.img.test , Other.Test. ")
    assert hosts == {"*.img.test", "other.test"}
    assert fetch(f"http://a.img.test:{port}/img.png", allow_hosts=hosts, allow_networks=LOCAL) == PNG
    refused(f"http://img.test:{port}/img.png", allow_hosts=hosts, allow_networks=LOCAL)
    refused(f"http://evilimg.test:{port}/img.png", allow_hosts=hosts, allow_networks=LOCAL)
    assert parse_allow_hosts("") is None and parse_allow_hosts(" , ") is None


def test_allow_listed_host_must_still_be_public(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urlfetch, "_getaddrinfo", _fake_dns({"intranet.test": ["10.1.2.3"]}))
    refused("http://intranet.test/img.png", allow_hosts={"intranet.test"})


# -- pinned connection, Host header, DNS rebinding -----------------------------------------------------------------
def test_connects_to_the_checked_address_and_sends_the_host_name(monkeypatch: pytest.MonkeyPatch, server: str) -> None:
    port = server.rsplit(":", 1)[1]
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])  # a rebinding DNS server: public-looking first, internal next
    calls: list[str] = []

    def rebinding(host: str, port: int, *args: object, **kw: object) -> list[tuple]:
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in next(answers)]

    monkeypatch.setattr(urlfetch, "_getaddrinfo", rebinding)
    _Handler.hosts_seen.clear()
    assert fetch(f"http://rebind.test:{port}/img.png", allow_networks=LOCAL) == PNG
    assert calls == ["rebind.test"]  # resolved once; the connection went to that answer
    assert _Handler.hosts_seen == [f"rebind.test:{port}"]


def test_default_port_is_omitted_from_host_header() -> None:
    target = urlfetch._parse("http://img.test:80/a b?q=1 2#frag", None)
    assert (target.host, target.port, target.path) == ("img.test", 80, "/a%20b?q=1%202")
    assert urlfetch._parse("HTTPS://Bücher.example/x", None).host == "xn--bcher-kva.example"


# -- responses -----------------------------------------------------------------------------------------------------
def test_fetches_an_image(server: str) -> None:
    assert fetch(f"http://{server}/img.png", allow_networks=LOCAL) == PNG
    assert fetch(f"http://{server}/img-params", allow_networks=LOCAL) == PNG


@pytest.mark.parametrize("path", ["/html", "/no-type"])
def test_non_image_content_type_is_422(server: str, path: str) -> None:
    err = refused(f"http://{server}{path}", 422, allow_networks=LOCAL)
    assert "Content-Type" in err.message


def test_upstream_error_status_is_400(server: str) -> None:
    err = refused(f"http://{server}/missing", allow_networks=LOCAL)
    assert "404" in err.message


@pytest.mark.parametrize("path", ["/big-declared", "/big-stream", "/big-chunked"])
def test_too_large_is_413(server: str, path: str) -> None:
    # The streams never end: a fetch that read on past the limit would hang (pytest-timeout), not pass late.
    err = refused(f"http://{server}{path}", 413, allow_networks=LOCAL)
    assert str(MAX) in err.message


def test_exact_size_limit(server: str) -> None:
    assert fetch(f"http://{server}/img.png", max_bytes=len(PNG), allow_networks=LOCAL) == PNG
    refused(f"http://{server}/img.png", 413, max_bytes=len(PNG) - 1, allow_networks=LOCAL)


def test_short_body_is_400(server: str) -> None:
    refused(f"http://{server}/short", allow_networks=LOCAL)


@pytest.mark.parametrize("path", ["/slow-body", "/slow-headers"])
def test_total_time_is_capped(server: str, path: str) -> None:
    # Every read is quick (a byte or a header line each 50 ms) and the whole answer comes after 5 s: only a cap on the
    # total time gives "Timed out" (per-read timeouts never fire). A clock can only make it later, never earlier.
    t0 = time.monotonic()
    err = refused(f"http://{server}{path}", 422, timeout_s=0.5, allow_networks=LOCAL)
    assert "Timed out" in err.message
    assert time.monotonic() - t0 >= 0.5


def test_slow_dns_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The resolver does not answer until the fetch has given up: only a fetch that stops waiting on DNS after its
    timeout returns at all (a gate, not a sleep; its own deadline only keeps a broken fetch from hanging)."""
    answered = threading.Event()

    def slow(*args: object, **kw: object) -> list[tuple]:
        answered.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "slow")

    monkeypatch.setattr(urlfetch, "_getaddrinfo", slow)
    try:
        err = refused("http://slow.test/img.png", 422, timeout_s=0.3)
        assert not answered.is_set() and "Timed out" in err.message
    finally:
        answered.set()


def test_connection_refused_is_400() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused(f"http://127.0.0.1:{port}/img.png", allow_networks=LOCAL)


# -- redirects -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hops", [0, 1, 3])
def test_up_to_three_redirects_are_followed(server: str, hops: int) -> None:
    assert fetch(f"http://{server}/hops/{hops}", allow_networks=LOCAL) == PNG


def test_more_than_three_redirects_are_refused(server: str) -> None:
    err = refused(f"http://{server}/hops/4", allow_networks=LOCAL)
    assert "redirect" in err.message


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_statuses(server: str, status: int) -> None:
    url = f"http://{server}/redirect?status={status}&to=http://{server}/img.png"
    assert fetch(url, allow_networks=LOCAL) == PNG


@pytest.mark.parametrize(
    "target",
    [
        "http://10.0.0.1/img.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/img.png",
        "http://[::ffff:10.0.0.1]/img.png",
        "http://internal.test/img.png",
        "file:///etc/passwd",
        "http://127.0.0.2:{port}/img.png",
    ],
)
def test_redirect_to_a_private_address_is_refused(server: str, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urlfetch, "_getaddrinfo", _fake_dns({"internal.test": ["192.168.0.10"]}))
    port = server.rsplit(":", 1)[1]
    url = f"http://{server}/redirect?to={target.format(port=port)}"
    refused(url, allow_networks=LOCAL)


def test_redirect_hops_are_checked_against_the_allow_list(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    url = f"http://img.test:{port}/redirect?to=http://{server}/img.png"
    err = refused(url, allow_hosts={"img.test"}, allow_networks=LOCAL)
    assert "allow-list" in err.message


def test_redirect_without_location_is_400(server: str) -> None:
    refused(f"http://{server}/redirect-no-location", allow_networks=LOCAL)


# -- TLS -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, list[str | None]]]:
    assert shutil.which("openssl"), "the openssl CLI makes the test certificate (Debian's openssl package)"
    d: Path = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=img.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    names: list[str | None] = []
    ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment, func-returns-value]
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass  # the client rejects our self-signed certificate, as it should

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1], names
    finally:
        listener.close()


def test_https_uses_the_host_name_for_sni_and_verifies_the_certificate(
    tls_server: tuple[int, list[str | None]],
) -> None:
    port, names = tls_server
    err = refused(f"https://img.test:{port}/img.png", allow_networks=LOCAL)
    assert "certificate" in err.message
    assert names and names[-1] == "img.test"  # SNI carried the name although we connected to 127.0.0.1


def test_trusted_networks_admit_private_hosts_but_never_cloud_metadata(server: str) -> None:
    assert fetch(f"http://{server}/img.png", allow_networks=["127.0.0.0/8"]) == PNG
    refused(f"http://{server}/img.png", allow_networks=["10.0.0.0/8"])  # another network: still refused
    # The metadata endpoint stays refused inside a trusted network (no connection is attempted: refused at the check).
    refused("http://169.254.169.254/latest/meta-data/", allow_networks=["169.254.0.0/16"])
