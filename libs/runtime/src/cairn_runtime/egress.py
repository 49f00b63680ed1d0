"""The SSRF guard of every outbound HTTP call a job's input can aim (webhooks, http_json pages).

A URL is refused when its host resolves to any address that is not globally routable: loopback,
private (RFC 1918, ULA), link-local (cloud metadata at 169.254.169.254), multicast, reserved, or
an IPv6 address carrying such an IPv4 address (mapped, compatible, 6to4, Teredo, NAT64). A
deployment that fetches from its own network turns the guard off per service
(`CAIRN_HTTP_ALLOW_PRIVATE_NETWORKS` on workers, `CAIRN_WEBHOOK_ALLOW_PRIVATE_NETWORKS` on the
scheduler).

Limit: the HTTP client resolves the host again when it connects, so DNS rebinding (an answer
that changes between the two lookups) can slip past; where that matters, send the traffic through
an egress proxy that enforces the same rule, or firewall the egress.
"""

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Not globally reachable (IANA special-purpose registries), yet `is_global` on the Pythons before
# the CVE-2024-4032 fix (3.11.7 here): local-use NAT64 (RFC 8215, the IPv4 address sits where the
# prefix length puts it), IPv4-translated ::ffff:0:a.b.c.d (SIIT), deprecated site-local.
NOT_GLOBAL = [ipaddress.ip_network(net) for net in ("64:ff9b:1::/48", "::ffff:0:0:0/96", "fec0::/10")]


class RefusedHost(Exception):
    """The host resolves to an address Cairn may not call (the message names host and address)."""


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64):
    `[64:ff9b::7f00:1]` or `[2002:7f00:1::]` reach 127.0.0.1 through a translator, and Python
    calls them global."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found.extend(address.teredo)
    packed = int(address)
    if address in NAT64 or (packed >> 32 == 0 and packed > 0xFFFF):  # NAT64, IPv4-compatible ::a.b.c.d
        found.append(ipaddress.IPv4Address(packed & 0xFFFFFFFF))
    return found


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast, and so is every IPv4 address it carries."""
    if not address.is_global or address.is_multicast or any(address in network for network in NOT_GLOBAL):
        return False
    return all(embedded.is_global for embedded in embedded_ipv4(address))


def check_addresses(host: str, addresses: Iterable[str], setting: str) -> None:
    """Raise `RefusedHost` if any of `addresses` (as getaddrinfo gives them) is not public;
    `setting` names the switch that would allow it, for the message."""
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
        if not is_public(address):
            raise RefusedHost(f"{host} resolves to {address}, not a public address ({setting} is off)")


def _addresses(infos: list) -> list[str]:
    return [str(info[4][0]) for info in infos]


def check_host(host: str, setting: str) -> None:
    """Resolve `host` (blocking) and raise `RefusedHost` if it reaches a non-public address;
    `OSError` if it cannot be resolved (a transient failure: the caller retries)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise OSError(f"cannot resolve {host}: {error}") from None
    check_addresses(host, _addresses(infos), setting)


async def check_host_async(host: str, setting: str) -> None:
    """`check_host` on the running event loop's resolver."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise OSError(f"cannot resolve {host}: {error}") from None
    check_addresses(host, _addresses(infos), setting)
