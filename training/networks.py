"""Where simulated traffic comes from: real IPv4 blocks, countries and time zones.

keywatch geolocates every source address itself (geoip2fast), so a simulated address
is only useful if it lands where the story says it is: a mobile app's users in
residential and mobile-carrier networks of one country, a backend in one cloud region,
an attacker on a VPS on another continent. Inventing addresses would give the detector
(and the people judging it) nonsense countries and ASNs, so the simulator draws every
address from `ip_blocks.csv`, a small curated table of real blocks.

The table was curated from geoip2fast's own database: blocks whose country and ASN
are constant across the whole block, labelled by network type (`cloud`, `hosting`,
`residential`, `mobile`) and provider. `tests/test_simulator.py` samples every block
and checks that it still geolocates to the intended country and ASN, so a data-file
update that moves a block fails loudly instead of silently mislabelling traffic.
"""

from __future__ import annotations

import csv
import ipaddress
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

IP_BLOCKS_CSV = Path(__file__).with_name("ip_blocks.csv")

NETWORK_TYPES = ("cloud", "hosting", "residential", "mobile")
"""cloud: hyperscaler regions; hosting: VPS and dedicated-server providers (where
leaked keys are typically abused from); residential: fixed broadband ISPs;
mobile: mobile carriers."""


@dataclass(frozen=True)
class Country:
    """A country the simulation places tenants or attackers in."""

    code: str
    name: str
    continent: str
    timezones: tuple[str, ...]
    lat: float
    lon: float


COUNTRIES: dict[str, Country] = {
    c.code: c
    for c in (
        Country(
            "US",
            "United States",
            "NA",
            ("America/New_York", "America/Chicago", "America/Los_Angeles"),
            39.0,
            -95.0,
        ),
        Country("CA", "Canada", "NA", ("America/Toronto", "America/Vancouver"), 45.4, -75.7),
        Country("BR", "Brazil", "SA", ("America/Sao_Paulo",), -23.5, -46.6),
        Country("MX", "Mexico", "NA", ("America/Mexico_City",), 19.4, -99.1),
        Country("GB", "United Kingdom", "EU", ("Europe/London",), 51.5, -0.1),
        Country("DE", "Germany", "EU", ("Europe/Berlin",), 50.1, 8.7),
        Country("FR", "France", "EU", ("Europe/Paris",), 48.9, 2.4),
        Country("NL", "Netherlands", "EU", ("Europe/Amsterdam",), 52.4, 4.9),
        Country("ES", "Spain", "EU", ("Europe/Madrid",), 40.4, -3.7),
        Country("IT", "Italy", "EU", ("Europe/Rome",), 45.5, 9.2),
        Country("SE", "Sweden", "EU", ("Europe/Stockholm",), 59.3, 18.1),
        Country("PL", "Poland", "EU", ("Europe/Warsaw",), 52.2, 21.0),
        Country("RO", "Romania", "EU", ("Europe/Bucharest",), 44.4, 26.1),
        Country("IN", "India", "AS", ("Asia/Kolkata",), 19.1, 72.9),
        Country("JP", "Japan", "AS", ("Asia/Tokyo",), 35.7, 139.7),
        Country("KR", "South Korea", "AS", ("Asia/Seoul",), 37.6, 127.0),
        Country("SG", "Singapore", "AS", ("Asia/Singapore",), 1.35, 103.8),
        Country("ID", "Indonesia", "AS", ("Asia/Jakarta",), -6.2, 106.8),
        Country("AU", "Australia", "OC", ("Australia/Sydney",), -33.9, 151.2),
        Country("ZA", "South Africa", "AF", ("Africa/Johannesburg",), -26.2, 28.0),
    )
}

CLOUD_HOME: dict[str, str] = {"MX": "US", "PL": "DE", "RO": "DE"}
"""Countries without a cloud region in the table host their backends in a neighbour's."""


@dataclass(frozen=True)
class IpBlock:
    """One curated CIDR block: all its addresses geolocate to `country` / an ASN
    whose name contains `asn_token`."""

    cidr: str
    country: str
    network: str
    provider: str
    asn_token: str

    @property
    def first(self) -> int:
        return int(ipaddress.ip_network(self.cidr).network_address)

    @property
    def size(self) -> int:
        return ipaddress.ip_network(self.cidr).num_addresses


@cache
def load_ip_blocks(path: Path = IP_BLOCKS_CSV) -> tuple[IpBlock, ...]:
    """The curated table, validated: known countries and network types, real CIDRs."""
    blocks = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            block = IpBlock(**{k: row[k].strip() for k in IpBlock.__dataclass_fields__})
            ipaddress.ip_network(block.cidr)  # raises on a malformed row
            if block.country not in COUNTRIES:
                raise ValueError(f"{path.name}: unknown country {block.country!r}")
            if block.network not in NETWORK_TYPES:
                raise ValueError(f"{path.name}: unknown network type {block.network!r}")
            blocks.append(block)
    return tuple(blocks)


def blocks_for(
    country: str | None = None,
    network: str | tuple[str, ...] | None = None,
    provider: str | None = None,
) -> list[IpBlock]:
    """Blocks matching a country, network type(s) and/or provider."""
    networks = (network,) if isinstance(network, str) else network
    return [
        b
        for b in load_ip_blocks()
        if (country is None or b.country == country)
        and (networks is None or b.network in networks)
        and (provider is None or b.provider == provider)
    ]


def countries_with(network: str) -> list[str]:
    """Country codes that have at least one block of this network type."""
    return sorted({b.country for b in load_ip_blocks() if b.network == network})


def sample_ips(rng: np.random.Generator, blocks: list[IpBlock], n: int) -> np.ndarray:
    """`n` distinct-ish host addresses (uint32) drawn from `blocks`.

    Blocks are chosen in proportion to the square root of their size, so one huge
    block does not crowd out the small ones; the last octet avoids .0 and .255,
    which look odd as client addresses.
    """
    if not blocks:
        raise ValueError("no IP blocks to sample from")
    sizes = np.array([b.size for b in blocks], dtype=np.float64)
    firsts = np.array([b.first for b in blocks], dtype=np.int64)
    weights = np.sqrt(sizes) / np.sqrt(sizes).sum()
    which = rng.choice(len(blocks), size=n, p=weights)
    offsets = (rng.random(n) * (sizes[which] - 2)).astype(np.int64) + 1
    addresses = firsts[which] + offsets
    last_octet = addresses & 0xFF
    fix = (last_octet == 0) | (last_octet == 255)
    addresses[fix] = (addresses[fix] & ~0xFF) | rng.integers(1, 255, size=int(fix.sum()))
    return addresses.astype(np.uint32)


def ip_strings(addresses: np.ndarray) -> list[str]:
    """Dotted-quad strings for uint32 addresses."""
    a = addresses.astype(np.int64)
    parts = [(a >> shift) & 0xFF for shift in (24, 16, 8, 0)]
    return [
        f"{p0}.{p1}.{p2}.{p3}" for p0, p1, p2, p3 in zip(*(p.tolist() for p in parts), strict=True)
    ]


def distance_km(a: Country, b: Country) -> float:
    """Great-circle distance between two countries' reference cities."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a.lat, a.lon, b.lat, b.lon))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371.0 * math.asin(math.sqrt(h))
