"""Is a webhook URL safe to send to? Only https, and only public addresses: the host is
resolved and every address it has must be global (no private, loopback, link-local, shared,
reserved or multicast address), so a tenant cannot make the service probe its own network.
Checked when a URL is registered or named by a job, and again at every send, where the
request then goes to the address that was checked (DNS cannot change it in between)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import httpx

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeTarget(ValueError):
    """The URL may not receive webhooks; the message says why (never a stack trace)."""


@dataclass(frozen=True)
class Target:
    url: httpx.URL
    addresses: tuple[str, ...]  # every address the host resolved to, all of them allowed


def _public(ip: IpAddress) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:10.0.0.1 is 10.0.0.1
    ip = mapped or ip
    return ip.is_global and not ip.is_multicast


def _resolve(host: str, port: int) -> tuple[str, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as e:  # ValueError: a NUL in the host
        raise UnsafeTarget(f"cannot resolve {host!r} ({e})") from None
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


def check(url: str, *, allow_http: bool = False, allow_private: bool = False) -> Target:
    """The URL and the addresses to send to, or UnsafeTarget naming the problem."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as e:
        raise UnsafeTarget(f"not a URL ({e})") from None
    schemes = ("https", "http") if allow_http else ("https",)
    if parsed.scheme not in schemes:
        raise UnsafeTarget(f"must be an https URL, not {parsed.scheme or 'a relative'} one")
    if not parsed.host:
        raise UnsafeTarget("has no host")
    if parsed.userinfo:
        raise UnsafeTarget("must not carry a user name or password")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = _resolve(parsed.host, port)
    if not allow_private:
        for address in addresses:
            if not _public(ipaddress.ip_address(address.split("%", 1)[0])):
                raise UnsafeTarget(
                    f"{parsed.host} resolves to {address}, a private, loopback or link-local "
                    "address; webhooks go to public endpoints"
                )
    return Target(parsed, addresses)
