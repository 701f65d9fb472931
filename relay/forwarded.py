"""The client's address behind trusted proxies (``--trusted-proxies``).

Behind nginx or a cloud balancer every connection comes from the proxy, so the
rate limit, the per-address cap and the logs would see one client. When the
peer is one of the trusted networks, the client is taken from
``X-Forwarded-For``: all its header lines joined in order, walked from the
right (the hop nearest to us) past trusted addresses, and the first untrusted
one is the client. Only where there is no ``X-Forwarded-For`` does
``X-Real-IP`` count. A peer that is not trusted is the client, whatever its
headers claim: anybody can send them.

Unlike Tornado's ``xheaders=True``, which believes these headers from any
peer and prefers ``X-Real-IP``, nothing here is taken from an untrusted hop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tornado.httputil import HTTPHeaders

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(specs: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) into networks; ValueError names a bad one."""
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or CIDR: {spec.strip()!r}") from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    """An address as proxies write it: bare, ``[v6]:port`` or ``v4:port``."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A v4 client seen through a dual-stack socket is that v4 client.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """``client(peer, headers)``: the address the relay treats as the client's."""

    __slots__ = ("_trusted",)

    def __init__(self, trusted: tuple[Network, ...]) -> None:
        self._trusted = trusted

    def _is_trusted(self, address: Address) -> bool:
        return any(address in network for network in self._trusted)

    def __call__(self, peer: str, headers: HTTPHeaders) -> str:
        if not self._trusted:
            return peer
        nearest = _address(peer)
        if nearest is None or not self._is_trusted(nearest):
            return peer
        hops = [hop for line in headers.get_list("X-Forwarded-For") for hop in line.split(",")]
        if not hops:
            real = _address(headers.get("X-Real-IP", ""))
            return str(real) if real is not None else peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                # A trusted proxy would not write this: the last address we can vouch for.
                break
            nearest = address
            if not self._is_trusted(address):
                break
        return str(nearest)
