"""SSRF hardening of image URLs (issue 9), checked against a canary HTTP server on loopback.

Refused spellings must never reach the canary (zero hits). For the positive paths (a good download,
slow-drip and oversize bodies, redirect re-checks) a fixture widens the address policy to let
127.0.0.1 — and only it — through, since no test may reach the internet.
"""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from blip_tools import _fetch
from blip_tools.errors import BlipError, InvalidImage, PayloadTooLarge, UrlNotAllowed
from blip_tools.images import load_image
from blip_tools.settings import BlipSettings


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


PNG = _tiny_png()


@dataclass
class Canary:
    """Records every request it receives; `port` (IPv4) and `port6` (IPv6 ::1, 0 if unavailable)."""

    hits: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    port6: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(canary: Canary) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: bytes = b"", ctype: str = "image/png", **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def _drip(self, data: bytes, every_s: float) -> None:
            for i in range(len(data)):
                if canary.stop.wait(every_s):
                    return
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()

        def do_GET(self) -> None:
            with canary.lock:
                canary.hits.append((self.path, self.headers.get("Host", "")))
            parts = urlsplit(self.path)
            route, query = parts.path, parse_qs(parts.query)
            try:
                if route == "/good.png":
                    self._send(200, PNG)
                elif route == "/redirect":
                    self._send(int(query.get("code", ["302"])[0]), b"", Location=query["to"][0])
                elif route == "/loop":
                    self._send(302, b"", Location="/loop")
                elif route == "/html":
                    self._send(200, b"<html></html>", ctype="text/html")
                elif route == "/missing.png":
                    self._send(404, b"no")
                elif route == "/chunked.png":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(PNG), 7):
                        piece = PNG[i : i + 7]
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                elif route == "/slow-body":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.flush()
                    self._drip(b"x" * 100000, 0.02)
                elif route == "/slow-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    self._drip(b"X-Slow: " + b"a" * 10000, 0.02)
                elif route == "/endless":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    block = b"\0" * 65536
                    for _ in range(4000):  # 256 MB at most, if nobody stops reading
                        if canary.stop.is_set():
                            return
                        self.wfile.write(block)
                elif route == "/declared-huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10**12))
                    self.end_headers()
                    self.wfile.write(PNG)
                else:
                    self._send(404, b"")
            except OSError:
                pass  # the client hung up (that is what most of these tests want)

    return Handler


@pytest.fixture
def canary() -> Iterator[Canary]:
    state = Canary()
    servers: list[http.server.ThreadingHTTPServer] = []
    handler = _handler(state)
    v4 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    servers.append(v4)
    state.port = v4.server_address[1]
    try:

        class V6Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6

        v6 = V6Server(("::1", 0), handler)
        servers.append(v6)
        state.port6 = v6.server_address[1]
    except OSError:
        state.port6 = 0
    threads = []
    for server in servers:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        threads.append(thread)
    yield state
    state.stop.set()
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(5)


@pytest.fixture
def allow_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widen the address policy by exactly one address, 127.0.0.1, for the canary."""
    canary_ip = ipaddress.ip_address("127.0.0.1")
    monkeypatch.setattr(_fetch, "address_allowed", lambda ip: ip == canary_ip or _fetch.is_public_address(ip))


def url_settings(**overrides: Any) -> BlipSettings:
    return BlipSettings(allow_urls=True, **({"url_timeout_s": 3.0} | overrides))


def outcome(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    try:
        result: Any = fn()
    except BlipError as exc:
        result = exc
    return result, time.perf_counter() - start


def expect(fn: Callable[[], Any], kind: type[BlipError], limit_s: float = 1.0) -> BlipError:
    result, seconds = outcome(fn)
    assert isinstance(result, kind), f"expected {kind.__name__}, got {result!r}"
    assert seconds < limit_s, f"took {seconds:.3f}s"
    return result


# ---------------------------------------------------------------------------------- refused, zero hits


def _loopback_spellings(canary: Canary) -> list[str]:
    p = canary.port
    urls = [
        f"http://127.0.0.1:{p}/good.png",
        f"http://127.0.0.1.:{p}/good.png",
        f"http://localhost:{p}/good.png",
        f"http://LOCALHOST.:{p}/good.png",
        f"http://foo.localhost:{p}/good.png",
        f"http://2130706433:{p}/good.png",
        f"http://0x7f000001:{p}/good.png",
        f"http://0x7f.1:{p}/good.png",
        f"http://127.1:{p}/good.png",
        f"http://127.0.1:{p}/good.png",
        f"http://0177.0.0.1:{p}/good.png",
        f"http://017700000001:{p}/good.png",
        f"http://127.000.000.001:{p}/good.png",
        f"http://0:{p}/good.png",
        f"http://0.0.0.0:{p}/good.png",
        f"http://[::]:{p}/good.png",
        f"http://[::1]:{p}/good.png",
        f"http://[::ffff:127.0.0.1]:{p}/good.png",
        f"http://[::ffff:7f00:1]:{p}/good.png",
        f"http://[0:0:0:0:0:ffff:127.0.0.1]:{p}/good.png",
        f"http://[::127.0.0.1]:{p}/good.png",
        f"http://[64:ff9b::127.0.0.1]:{p}/good.png",
        f"http://[2002:7f00:1::]:{p}/good.png",
        f"http://127。0。0。1:{p}/good.png",  # ideographic full stops (IDNA maps them to '.')
        f"http://127.0.0.①:{p}/good.png",  # NFKC maps ① to 1
        f"http://①②⑦.0.0.1:{p}/good.png",
        f"http://user:pw@127.0.0.1:{p}/good.png",
        f"http://example.com@127.0.0.1:{p}/good.png",
        f"http://127.0.0.1:{p}\\@example.com/good.png",
        f"http://127.0.0.1:{p}#@example.com/good.png",
        f"https://127.0.0.1:{p}/good.png",
        f"HTTP://127.0.0.1:{p}/good.png",
    ]
    if canary.port6:
        urls += [f"http://[::1]:{canary.port6}/good.png", f"http://[0:0:0:0:0:0:0:1]:{canary.port6}/good.png"]
    return urls


def test_loopback_spellings_are_refused_and_the_canary_gets_zero_hits(canary: Canary) -> None:
    s = url_settings()
    for url in _loopback_spellings(canary):
        result, seconds = outcome(lambda url=url: load_image(url, s))  # type: ignore[misc]
        assert isinstance(result, UrlNotAllowed), (url, result)
        assert seconds < 1.0, (url, seconds)
    assert canary.hits == []


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.1",
        "10.255.255.255",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.100.100.200",  # Alibaba metadata (CGNAT range)
        "100.64.0.1",
        "192.0.0.1",
        "198.18.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "240.0.0.1",
        "0.1.2.3",
        "[fd00:ec2::254]",  # AWS IPv6 metadata
        "[fe80::1]",
        "[fe80::1%25eth0]",
        "[fc00::1]",
        "[ff02::1]",
        "[::ffff:10.0.0.1]",
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a9fe:a9fe]",
        "[2001:db8::1]",
        "0xa9fea9fe",  # 169.254.169.254 in hex
        "2852039166",  # …and in decimal
        "0251.0376.0251.0376",  # …and in octal
        "1.2.3.4.5",  # numeric but not an address
        "256.0.0.1",
        "1.2.3.0x100",
    ],
)
def test_private_and_special_addresses_are_refused_without_connecting(host: str) -> None:
    expect(lambda: load_image(f"http://{host}/x.png", url_settings()), UrlNotAllowed)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/cat.png",
        "gopher://example.com:70/_GET%20/",
        "file:///etc/passwd",  # file:// is a *path*; outside allowed dirs it is refused there
        "dict://example.com:11211/stat",
        "jar:http://example.com/x.jar!/a.png",
        "ldap://example.com/",
        "javascript://alert(1)",
    ],
)
def test_non_http_schemes_are_refused(url: str, tmp_path: Any) -> None:
    s = url_settings(allowed_dirs=[tmp_path])
    err = expect(lambda: load_image(url, s), InvalidImage)
    assert isinstance(err, (UrlNotAllowed, InvalidImage))
    if not url.startswith("file:"):
        assert isinstance(err, UrlNotAllowed)


def test_urls_off_by_default_even_for_public_hosts(canary: Canary) -> None:
    s = BlipSettings()
    err = expect(lambda: load_image(canary.url("/good.png"), s), UrlNotAllowed)
    assert "BLIP_ALLOW_URLS" in str(err)
    assert canary.hits == []


# ------------------------------------------------------------------------------------------------- DNS


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Answer chosen names from a table (and count lookups); delegate every other name to the real resolver."""
    real = socket.getaddrinfo
    state: dict[str, Any] = {"table": {}, "lookups": [], "release": threading.Event()}

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name in state["table"]:
            state["lookups"].append(name)
            answer = state["table"][name]
            if callable(answer):
                answer = answer()
            if isinstance(answer, BaseException):
                raise answer
            return [
                (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answer
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield state
    state["release"].set()


def test_dns_answers_pointing_inside_are_refused(canary: Canary, fake_dns: dict[str, Any]) -> None:
    fake_dns["table"].update(
        {
            "evil.example": ["127.0.0.1"],
            "mixed.example": ["8.8.8.8", "127.0.0.1"],  # one bad answer is enough to refuse
            "mapped.example": ["::ffff:127.0.0.1"],
            "meta.example": ["169.254.169.254"],
            "v6.example": ["::1"],
        }
    )
    s = url_settings()
    for name in fake_dns["table"]:
        url = f"http://{name}:{canary.port}/good.png"
        expect(partial(load_image, url, s), UrlNotAllowed)
    assert canary.hits == []


def test_a_redirect_to_a_name_resolving_inside_is_refused(
    canary: Canary, fake_dns: dict[str, Any], allow_loopback: None
) -> None:
    fake_dns["table"]["evil.example"] = ["10.0.0.7"]
    to = quote(f"http://evil.example:{canary.port}/good.png", safe="")
    expect(lambda: load_image(canary.url(f"/redirect?to={to}"), url_settings()), UrlNotAllowed)
    assert [path for path, _ in canary.hits] == [f"/redirect?to={to}"]


def test_the_checked_address_is_the_one_connected_no_rebinding(
    canary: Canary, fake_dns: dict[str, Any], allow_loopback: None
) -> None:
    answers = iter([["127.0.0.1"]])

    def rebinding() -> list[str]:
        return next(answers, ["10.0.0.1"])  # a second lookup would get a private address

    fake_dns["table"]["rebind.example"] = rebinding
    loaded = load_image(f"http://rebind.example:{canary.port}/good.png", url_settings())
    assert loaded.image.size == (3, 2)
    assert fake_dns["lookups"] == ["rebind.example"]
    assert canary.hits == [("/good.png", f"rebind.example:{canary.port}")]  # Host header kept the name


def test_dns_failures_and_hangs_are_typed_and_bounded(fake_dns: dict[str, Any]) -> None:
    fake_dns["table"]["gone.example"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def hang() -> list[str]:
        fake_dns["release"].wait(10)
        return []

    fake_dns["table"]["hang.example"] = hang
    fake_dns["table"]["empty.example"] = []
    s = url_settings(url_timeout_s=0.5)
    err = expect(lambda: load_image("http://gone.example/x.png", s), InvalidImage)
    assert "resolve" in str(err)
    err = expect(lambda: load_image("http://hang.example/x.png", s), InvalidImage, 2.0)
    assert "took longer" in str(err)
    expect(lambda: load_image("http://empty.example/x.png", s), InvalidImage)


# ----------------------------------------------------------------------------------- allowed (canary) paths


def test_good_download(canary: Canary, allow_loopback: None) -> None:
    loaded = load_image(canary.url("/good.png?size=large&token=secret"), url_settings())
    assert loaded.image.size == (3, 2) and loaded.image.getpixel((0, 0)) == (10, 200, 30)
    assert loaded.info.source == f"http://127.0.0.1:{canary.port}/…"  # no path or query in the source
    assert len(canary.hits) == 1
    chunked = load_image(canary.url("/chunked.png"), url_settings())
    assert chunked.sha256 == loaded.sha256


def test_redirects_are_followed_and_rechecked_hop_by_hop(canary: Canary, allow_loopback: None) -> None:
    s = url_settings()
    for code in (301, 302, 303, 307, 308):
        assert load_image(canary.url(f"/redirect?code={code}&to=/good.png"), s).image.size == (3, 2)
    canary.hits.clear()
    for target in (
        "http://10.0.0.1/x.png",
        "http://169.254.169.254/latest/meta-data/",
        f"http://localhost:{canary.port}/good.png",
        f"http://[::1]:{canary.port}/good.png",
        f"http://2130706433:{canary.port}/good.png".replace("2130706433", "167772161"),  # 10.0.0.1
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "ftp://example.com/x.png",
    ):
        canary.hits.clear()
        to = quote(target, safe="")
        expect(partial(load_image, canary.url(f"/redirect?to={to}"), s), UrlNotAllowed)
        assert len(canary.hits) == 1, (target, canary.hits)


def test_redirect_chains_are_capped(canary: Canary, allow_loopback: None) -> None:
    err = expect(lambda: load_image(canary.url("/loop"), url_settings()), InvalidImage)
    assert "redirected more than 5" in str(err)
    assert len(canary.hits) == 1 + _fetch.MAX_REDIRECTS


def test_slow_drip_body_hits_the_overall_deadline(canary: Canary, allow_loopback: None) -> None:
    s = url_settings(url_timeout_s=0.6)
    result, seconds = outcome(lambda: load_image(canary.url("/slow-body"), s))
    assert isinstance(result, InvalidImage) and "took longer" in str(result), result
    assert 0.5 < seconds < 2.5, seconds


def test_slow_drip_headers_hit_the_overall_deadline(canary: Canary, allow_loopback: None) -> None:
    s = url_settings(url_timeout_s=0.6)
    result, seconds = outcome(lambda: load_image(canary.url("/slow-headers"), s))
    assert isinstance(result, InvalidImage) and "took longer" in str(result), result
    assert 0.5 < seconds < 2.5, seconds


def test_oversize_bodies_stop_at_the_cap(canary: Canary, allow_loopback: None) -> None:
    s = url_settings(max_image_bytes=100_000, url_timeout_s=5.0)
    # An endless body: only stopping at the cap (not the 5 s deadline) gives PayloadTooLarge this fast.
    err = expect(lambda: load_image(canary.url("/endless"), s), PayloadTooLarge, 2.0)
    assert "stopped reading" in str(err)
    err = expect(lambda: load_image(canary.url("/declared-huge"), s), PayloadTooLarge)
    assert "declares" in str(err)


def test_http_errors_and_wrong_content_are_typed(canary: Canary, allow_loopback: None) -> None:
    s = url_settings()
    assert "404" in str(expect(lambda: load_image(canary.url("/missing.png"), s), InvalidImage))
    assert "text/html" in str(expect(lambda: load_image(canary.url("/html"), s), InvalidImage))
    # TLS to a plain-HTTP server: the handshake fails, typed.
    expect(lambda: load_image(f"https://127.0.0.1:{canary.port}/good.png", s), InvalidImage)
    # Nothing listening.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    expect(lambda: load_image(f"http://127.0.0.1:{free_port}/x.png", s), InvalidImage)


# ------------------------------------------------------------------------------------ the address policy


@pytest.mark.parametrize(
    "host,expected",
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("1.2.3.4.", "1.2.3.4"),
        ("::1", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
        ("example.com", None),
        ("1e100.net", None),
        ("xn--nxasmq6b.example", None),
    ],
)
def test_parse_ip_host(host: str, expected: str | None) -> None:
    parsed = _fetch.parse_ip_host(host)
    assert (str(parsed) if parsed is not None else None) == expected


@pytest.mark.parametrize("host", ["1.2.3.4.5", "256.1.1.1", "1.16777216", "08.0.0.1", "example.123", "4294967296"])
def test_parse_ip_host_refuses_ambiguous_numbers(host: str) -> None:
    with pytest.raises(UrlNotAllowed):
        _fetch.parse_ip_host(host)


@pytest.mark.parametrize(
    "address,public",
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("169.254.169.254", False),
        ("100.100.100.200", False),
        ("::ffff:8.8.8.8", True),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::808:808", True),
        ("64:ff9b::a00:1", False),
        ("2002:a00:1::", False),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo
        ("::", False),
        ("ff02::1", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert _fetch.is_public_address(ipaddress.ip_address(address)) is public


def test_deflate_bomb_body_is_just_bytes() -> None:
    # We never send Accept-Encoding and never inflate: a gzip "image" is opaque bytes → not an image.
    data = zlib.compress(b"\0" * 1_000_000)
    expect(lambda: load_image(data, url_settings()), InvalidImage)
