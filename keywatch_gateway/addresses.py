"""Which address made the call: `X-Forwarded-For`, trusted only from proxies you name.

Anyone can send an `X-Forwarded-For` header, so believing it from every peer lets a
caller pick the address keywatch bans or learns from. The header is read only when the
peer that connected is one of the configured proxy addresses (or networks), and then
from the right: each hop appended by a trusted proxy is skipped, and the first address
that is not a trusted proxy is the client. With no trusted proxies the peer is the
client, whatever the header says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str | None) -> IPAddress | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


class ClientAddress:
    """Resolves the calling address from the peer and `X-Forwarded-For`."""

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        networks: list[IPNetwork] = []
        for entry in trusted_proxies:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(f"trusted proxy {entry!r} is not an IP address or "
                                 "network (CIDR)") from None
        self.trusted = tuple(networks)

    def is_trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.trusted)

    def resolve(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address as text, or None if there is no usable IP address."""
        current = _address(peer)
        if current is None or not forwarded_for or not self.is_trusted(current):
            return str(current) if current is not None else None
        for hop in reversed(forwarded_for.split(",")):
            previous = _address(hop)
            if previous is None:  # garbage where an address should be: stop believing
                break
            current = previous
            if not self.is_trusted(current):
                break
        return str(current)
