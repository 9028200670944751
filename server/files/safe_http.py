"""Sending HTTP requests to URLs that callers chose, from inside the server's own network.

Input fetching (`server.files.fetch`) and webhooks (`server.jobs.webhooks`) both connect to a URL a
caller gave, from wherever the server runs. A plain client would let anyone reach cloud metadata
(169.254.169.254) or internal services through them (SSRF). Both therefore go through this module,
which:

* takes http(s) only (`HTTP_SCHEMES`);
* resolves the host itself (`resolve`) and refuses it when *any* of its addresses is not public
  (`vetted_addresses`, `is_public_address`), unless the name or the address is listed in the
  caller's allowed hosts (`is_allowed_host`: an on-prem server, or 127.0.0.1 in tests);
* then connects to a vetted address, not to the name (`pinned_request`), so that DNS rebinding
  cannot swap the address between the check and the connection, with no proxy from the
  environment and no redirect followed (a caller that follows redirects vets every hop itself).

Failures are this module's own exceptions, so that each caller can decide what they mean: an
`Unreachable` host may come back (worth a retry, or a "could not download" for an input), a
`Refused` one will not (no retry helps). Both carry a `reason` written for the person who gave the
URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from typing import Any

import httpx

HTTP_SCHEMES = ("http", "https")  # the only schemes sent anywhere: file:, ftp: etc. would bypass the checks here

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class VettingError(Exception):
    """A host that must not be, or cannot be, connected to; `reason` says why, for the URL's owner."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Unreachable(VettingError):
    """The host name does not resolve, or the lookup timed out: it may work later."""


class Refused(VettingError):
    """The host has a private or local address: no retry can make it acceptable."""


def is_public_address(address: str) -> bool:
    """True for globally routable unicast addresses only.

    Refused: loopback, RFC 1918 and fc00::/7 private, link-local (169.254/16 with the cloud
    metadata service, fe80::/10), CGNAT 100.64/10, multicast, unspecified, reserved and
    documentation ranges; IPv6 forms that embed an IPv4 address (mapped, 6to4, NAT64) are judged
    by that address, since a connection to them lands on it.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address):
        nat64 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None
        embedded = ip.ipv4_mapped or ip.sixtofour or nat64
        if embedded is not None:
            return is_public_address(str(embedded))
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def is_ip_literal(host: str) -> bool:
    """True when `host` is an IPv4 or IPv6 address rather than a name.

    An address can be judged from the URL's text alone (no DNS), and an https request to one sends
    no SNI name.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_allowed_host(host_or_address: str, allowed_hosts: AbstractSet[str]) -> bool:
    """True when the host name or address is listed in `allowed_hosts`, exempt from the private-address refusal.

    The exemption is for deployments that must reach their own network on purpose (an on-prem media
    server or webhook receiver, 127.0.0.1 in tests). Names compare without case and trailing dot,
    as DNS does.
    """
    return host_or_address.lower().rstrip(".") in {h.lower().rstrip(".") for h in allowed_hosts}


async def resolve(host: str, port: int) -> list[str]:
    """Every address the name resolves to (A and AAAA), in the resolver's preferred order.

    Resolved here, once, so that the addresses vetted are the addresses connected to.
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


async def vetted_addresses(url: httpx.URL, *, allowed_hosts: AbstractSet[str], lookup_timeout: float) -> list[str]:
    """The addresses of `url`'s host, all of them public or allowed.

    Raises `Unreachable` if the name does not resolve within `lookup_timeout` seconds, `Refused` if
    *any* address is neither public nor in `allowed_hosts` (a host listed by name passes with any
    address). All records must pass, not just the first: otherwise a name with one public and one
    private record would pass the check and still let the connection land on the private one.
    """
    host = url.raw_host.decode("ascii")
    try:
        addresses = await asyncio.wait_for(resolve(host, url.port or _default_port(url)), lookup_timeout)
    except asyncio.TimeoutError:
        raise Unreachable(f"could not reach {url.host}: the name lookup timed out") from None
    except (OSError, UnicodeError):
        addresses = []
    if not addresses:
        raise Unreachable(f"could not reach {url.host}: the host name does not resolve")
    if is_allowed_host(host, allowed_hosts):
        return addresses
    for address in addresses:
        if not is_allowed_host(address, allowed_hosts) and not is_public_address(address):
            raise Refused(f"points to a private or local network address ({address}), which is not allowed")
    return addresses


@asynccontextmanager
async def pinned_request(
    method: str,
    url: httpx.URL,
    addresses: list[str],
    *,
    headers: Mapping[str, str],
    timeout: httpx.Timeout,
    content: bytes | None = None,
    verify: ssl.SSLContext | bool = True,
) -> AsyncIterator[httpx.Response]:
    """Send one request for `url` to the first of `addresses` (from `vetted_addresses`) that accepts a connection.

    Use as `async with pinned_request(...) as response:`; the body can be streamed inside the block,
    and the response and its connection are closed on leaving it. Raises `httpx.TransportError`
    (the last `ConnectError` when no address accepts a connection).

    The request goes to the IP itself, so nothing resolves the name again (no DNS rebinding), while
    the `Host` header (set here, replacing any in `headers`) keeps the original name and port, and
    for https the `sni_hostname` extension makes httpcore send the original name as SNI *and*
    verify the certificate against it. It goes straight to a transport, not through an
    `httpx.AsyncClient`: a client would follow redirects and parse `Location` (and fail on odd
    ones), and could pick up proxies from the environment, which would resolve the name again.

    A fresh transport for every request (each redirect hop, each webhook attempt): its connection
    pool is keyed by IP, so a shared one could reuse a TLS connection made with another host's SNI
    and certificate.
    """
    if not addresses:
        raise ValueError("no addresses to connect to")
    host = url.raw_host.decode("ascii")
    sent_headers = {"Host": url.netloc.decode("ascii")}
    sent_headers.update((name, value) for name, value in headers.items() if name.lower() != "host")
    extensions: dict[str, Any] = {"timeout": timeout.as_dict()}
    if url.scheme == "https" and not is_ip_literal(host):
        extensions["sni_hostname"] = host
    async with httpx.AsyncHTTPTransport(verify=verify) as transport:
        response = await _first_connecting(transport, method, url, addresses, sent_headers, extensions, content)
        try:
            yield response
        finally:
            await response.aclose()


async def _first_connecting(
    transport: httpx.AsyncHTTPTransport,
    method: str,
    url: httpx.URL,
    addresses: list[str],
    headers: dict[str, str],
    extensions: dict[str, Any],
    content: bytes | None,
) -> httpx.Response:
    failure: httpx.ConnectError | None = None
    for address in addresses:
        request = httpx.Request(
            method, url.copy_with(host=address), headers=headers, content=content, extensions=extensions
        )
        try:
            return await transport.handle_async_request(request)
        except httpx.ConnectError as error:  # e.g. an IPv6 address on a host without IPv6 routing
            failure = error
    raise failure


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80
