"""Fetch one image URL without becoming an SSRF proxy.

Rules (each hop of a redirect chain gets all of them):

- only `http` and `https`, no credentials in the URL, no `localhost`/`*.localhost` names;
- numeric hosts in every spelling browsers accept (`2130706433`, `0x7f000001`, `127.1`, `0177.0.0.1`) are
  parsed here, so no resolver quirk decides what they mean;
- names are resolved once (with the overall deadline) and *every* answer must be a public address; the
  connection then goes to that checked address (no second lookup, so DNS rebinding cannot swap it);
- private, loopback, link-local (cloud metadata), CGNAT, multicast, reserved and unspecified addresses are
  refused, including IPv4 embedded in IPv6 (mapped, compatible, NAT64, 6to4, Teredo);
- at most `MAX_REDIRECTS` redirects; one overall deadline for DNS, connect, TLS, headers and body (a
  watchdog closes the socket, so a slow-drip server cannot stretch it); the body is streamed and reading
  stops past the byte cap.

Proxies from the environment are deliberately not used: a proxy would do its own resolution.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from blip_tools.errors import InvalidImage, PayloadTooLarge, UrlNotAllowed

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressCheck = Callable[[IPAddress], bool]

MAX_REDIRECTS = 5
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_USER_AGENT = "blip-tools (image fetch)"
# A numeric IPv4 label as WHATWG URL / inet_aton read it: decimal, 0x-hex or 0-octal.
_NUM_LABEL = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")
# Ranges `ipaddress` does not flag as non-global on every Python version, refused explicitly.
_EXTRA_BLOCKED = (
    ipaddress.ip_network("100.64.0.0/10"),  # CGNAT; also Alibaba's metadata 100.100.100.200
    ipaddress.ip_network("192.0.0.0/24"),
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("64:ff9b:1::/48"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def safe_url_label(url: str) -> str:
    """`scheme://host[:port]/…` — enough to recognise a URL in a message without leaking its path or query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "URL (unparseable)"
    if ":" in host:
        host = f"[{host}]"
    scheme = parts.scheme.lower() or "?"
    return _printable(f"{scheme}://{host}{port}/…", 120)


def _printable(text: str, limit: int) -> str:
    """Replace control characters and cut to `limit` characters, for messages and logs."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    packed = ip.packed
    if ip in _NAT64:
        return ipaddress.IPv4Address(packed[-4:])
    if packed[:12] == bytes(12) and packed[12:] not in (bytes(4), b"\x00\x00\x00\x01"):
        return ipaddress.IPv4Address(packed[-4:])  # deprecated IPv4-compatible ::a.b.c.d
    return None


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses (the default address check)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public_address(inner):
            return False
        if inner is not None and (ip.ipv4_mapped is not None or ip in _NAT64):
            # These forms reach exactly the embedded IPv4 address (NAT64: via the local translator), so
            # that address decides; Python versions disagree on their is_private/is_global flags.
            return True
    if (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    ):
        return False
    return not any(ip.version == net.version and ip in net for net in _EXTRA_BLOCKED)


def address_allowed(ip: IPAddress) -> bool:
    """The address policy `fetch_url` applies by default; tests replace this to let a loopback canary in."""
    return is_public_address(ip)


def parse_ip_host(host: str) -> IPAddress | None:
    """Parse `host` as an IP literal in any spelling a browser or `inet_aton` accepts; None for a name.

    Raises UrlNotAllowed for a host that looks numeric but is not a valid address (e.g. `1.2.3.4.5`),
    because resolvers disagree about such names.
    """
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not labels or not _NUM_LABEL.match(labels[-1]):
        return None
    # WHATWG URL: a host whose last label is numeric must be an IPv4 address.
    if len(labels) > 4 or not all(_NUM_LABEL.match(label) for label in labels):
        raise UrlNotAllowed(f"Host {_printable(host, 80)!r} is neither a valid IP address nor a name.")
    try:
        values = [_int_label(label) for label in labels]
    except ValueError as exc:
        raise UrlNotAllowed(f"Host {_printable(host, 80)!r} is not a valid IPv4 address.") from exc
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise UrlNotAllowed(f"Host {_printable(host, 80)!r} is not a valid IPv4 address.")
    number = last
    for i, value in enumerate(head):
        number += value << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _int_label(label: str) -> int:
    """One numeric IPv4 label: `0x`-hex, octal with a leading zero (`0177`), or decimal."""
    if label[:2].lower() == "0x":
        return int(label[2:] or "0", 16)
    if label.startswith("0") and len(label) > 1:
        return int(label, 8)
    return int(label, 10)


class _Deadline:
    """One overall deadline for a whole fetch, redirects included."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s

    def expired(self, label: str) -> InvalidImage:
        """The error for a fetch that ran out of time."""
        return InvalidImage(
            f"Fetching {label} took longer than the {self.timeout_s:g} s limit (BLIP_URL_TIMEOUT_S); "
            "download the image and pass it as a file or base64."
        )

    def remaining(self, label: str) -> float:
        """Seconds left; raises the timeout error when none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.expired(label)
        return left


def _resolve(host: str, port: int, deadline: _Deadline, label: str) -> list[IPAddress]:
    """Resolve `host` once, bounded by the deadline (getaddrinfo has no timeout of its own)."""
    answers: list[tuple[object, ...]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            answers.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            errors.append(exc)

    worker = threading.Thread(target=work, name="blip-dns", daemon=True)
    worker.start()
    worker.join(deadline.remaining(label))
    if worker.is_alive():
        raise deadline.expired(label)
    if errors:
        raise InvalidImage(f"Could not resolve the host of {label}: {_printable(str(errors[0]), 200)}")
    addresses: list[IPAddress] = []
    for info in answers:
        sockaddr = info[4]
        raw = str(sockaddr[0] if isinstance(sockaddr, tuple) else sockaddr).split("%", 1)[0]
        try:
            address = ipaddress.ip_address(raw)
        except ValueError:
            continue
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidImage(f"The host of {label} has no usable address.")
    return addresses


@functools.lru_cache(maxsize=1)
def _default_tls() -> ssl.SSLContext:
    """The system trust store with hostname checks, built once (loading CA files costs milliseconds)."""
    return ssl.create_default_context()


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to an already-checked IP; Host header and TLS name stay the URL's host."""

    def __init__(self, host: str, port: int, ip: IPAddress, timeout: float, tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip
        self._tls = tls

    def connect(self) -> None:
        """Connect to the pinned address (never re-resolving the name), then wrap in TLS if asked."""
        sock = socket.create_connection((str(self._ip), self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock  # visible to the watchdog during the TLS handshake too
        if self._tls is not None:
            try:
                self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise


class _Watchdog:
    """Shuts a connection's socket at the deadline, so no single blocking read can outlive it."""

    def __init__(self, conn: _PinnedConnection, seconds: float) -> None:
        self._conn = conn
        self.fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self._conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        """Stop the timer (the fetch finished in time)."""
        self._timer.cancel()


def _check_target(url: str, check: AddressCheck) -> tuple[str, str, int, str, IPAddress | None]:
    """Validate one hop's URL; returns (scheme, host, port, request target, IP if the host is numeric)."""
    label = safe_url_label(url)
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise UrlNotAllowed(f"The URL {label} contains spaces or control characters; percent-encode them.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlNotAllowed(f"The URL {label} is malformed: {exc}.") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlNotAllowed(f"Only http and https image URLs are allowed, not {scheme or 'no scheme'}:.")
    if parts.username is not None or parts.password is not None:
        raise UrlNotAllowed(f"The URL {label} carries credentials (user@host); they are not allowed.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlNotAllowed(f"The URL {label} has no host.")
    if host == "localhost" or host.endswith(".localhost"):
        raise UrlNotAllowed(f"The URL {label} points at this machine (localhost); that is refused.")
    ip = parse_ip_host(host)
    if ip is not None and not check(ip):
        raise UrlNotAllowed(
            f"The URL {label} points at a private, loopback, link-local or reserved address; "
            "only public addresses may be fetched."
        )
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), target, ip


def fetch_url(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    address_check: AddressCheck | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> bytes:
    """Download `url` under the rules in this module's docstring and return the body bytes.

    Raises:
        UrlNotAllowed: a scheme, host, address or redirect target is refused.
        PayloadTooLarge: the body (declared or streamed) is larger than `max_bytes`.
        InvalidImage: the fetch failed (DNS, connection, TLS, HTTP status, too many redirects, deadline).
    """
    check = address_check if address_check is not None else address_allowed
    deadline = _Deadline(timeout_s)
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        label = safe_url_label(current)
        scheme, host, port, target, ip = _check_target(current, check)
        if ip is None:
            addresses = _resolve(host, port, deadline, label)
            refused = [a for a in addresses if not check(a)]
            if refused:
                raise UrlNotAllowed(
                    f"The host of {label} resolves to a private, loopback, link-local or reserved address; "
                    "only public addresses may be fetched."
                )
            ip = addresses[0]
        tls = None
        if scheme == "https":
            tls = tls_context if tls_context is not None else _default_tls()
        status, location, body = _one_request(host, port, ip, target, tls, deadline, max_bytes, label)
        if status in _REDIRECT_CODES:
            if not location:
                raise InvalidImage(f"{label} answered a redirect ({status}) without a Location.")
            current = urljoin(current, location)
            logger.debug("following redirect %s -> %s", label, safe_url_label(current))
            continue
        return body
    raise InvalidImage(f"{safe_url_label(url)} redirected more than {MAX_REDIRECTS} times.")


def _one_request(
    host: str,
    port: int,
    ip: IPAddress,
    target: str,
    tls: ssl.SSLContext | None,
    deadline: _Deadline,
    max_bytes: int,
    label: str,
) -> tuple[int, str | None, bytes]:
    """One GET to a pinned address; returns (status, Location, body) with the body only for 200."""
    conn = _PinnedConnection(host, port, ip, deadline.remaining(label), tls)
    watchdog = _Watchdog(conn, deadline.remaining(label))
    response: http.client.HTTPResponse | None = None
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.putheader("User-Agent", _USER_AGENT)
        conn.putheader("Accept", "image/*")
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()
        if response.status in _REDIRECT_CODES:
            return response.status, response.getheader("Location"), b""
        if response.status != 200:
            raise InvalidImage(f"{label} answered HTTP {response.status} {response.reason}; no image fetched.")
        ctype = (response.getheader("Content-Type") or "").lower()
        if ctype.startswith("text/"):
            raise InvalidImage(f"{label} returned {_printable(ctype, 60)}, not an image.")
        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
            raise PayloadTooLarge(
                f"{label} declares {int(declared)} bytes, over the {max_bytes}-byte limit (BLIP_MAX_IMAGE_BYTES)."
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(deadline.remaining(label))
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(
                    f"{label} sent more than the {max_bytes}-byte limit (BLIP_MAX_IMAGE_BYTES); stopped reading."
                )
            chunks.append(chunk)
            deadline.remaining(label)
        if watchdog.fired:  # the watchdog's shutdown can read as a clean end of body
            raise deadline.expired(label)
        return response.status, None, b"".join(chunks)
    except (OSError, http.client.HTTPException) as exc:
        deadline.remaining(label)  # a socket closed by the watchdog reads as a timeout
        if watchdog.fired:
            raise deadline.expired(label) from exc
        raise InvalidImage(f"Could not fetch {label}: {_printable(str(exc) or type(exc).__name__, 200)}") from exc
    finally:
        watchdog.cancel()
        if response is not None:
            response.close()
        conn.close()
