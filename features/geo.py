"""IP geolocation: where a call came from (country, network, coordinates) and whether
that network is a hosting provider.

Why it exists: a leaked key shows up from another continent or from a rented server, and
"impossible travel" (Singapore, then Frankfurt six minutes later) is the strongest single
sign of a stolen credential. Travel must be measured between *places*, never between
addresses: a key served by a pool of NAT gateways in one region changes IP on every call
and must give ~0 km.

Sources, in order of precedence:

1. Fields the gateway already put in the event (`country`, `asn`, `lat`, `lon`): the
   gateway often knows better (its own CDN geo headers) and it costs nothing.
2. An optional MaxMind `.mmdb` database (GeoLite2/GeoIP2 City and/or ASN, read with the
   `maxminddb` package): city-level coordinates and the AS number and organisation.
3. The `geoip2fast` database bundled with that package (country and AS name, IPv4 and
   IPv6), with the country's centroid from the `countryinfo` package as coordinates.
   Country-centroid precision is the right grain for velocity: all addresses of a
   country sit at one point, so a change of IP inside a country is 0 km; a change of
   country is the distance between centroids (Singapore → Germany ≈ 10,200 km).

Private, loopback, link-local, shared (CGNAT), reserved and multicast addresses have no
location: they never produce travel (a request through an internal proxy is not a trip).
An address no database knows gives an empty `GeoInfo`, never an exception.

Lookups are cached per address (`functools.lru_cache`, bounded), because a key's traffic
comes from few addresses; a cached lookup costs well under a microsecond.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GEOIP2FAST_DATA_FILE = "geoip2fast-asn-ipv6.dat.gz"
"""The geoip2fast database with AS names and IPv6 (shipped inside the package)."""

EARTH_RADIUS_KM = 6371.0088

HOSTING_ASN_KEYWORDS: tuple[str, ...] = (
    # hyperscalers
    "amazon", "aws", "google cloud", "google-cloud", "googlecloud", "microsoft", "azure",
    "alibaba", "aliyun", "oracle", "tencent", "huawei cloud", "huaweicloud",
    # VPS and dedicated-server providers
    "digitalocean", "digital ocean", "ovh", "hetzner", "linode", "akamai", "vultr",
    "choopa", "contabo", "scaleway", "online s.a.s", "leaseweb", "m247", "hostinger",
    "ionos", "1&1", "godaddy", "rackspace", "upcloud", "kamatera", "hostwinds",
    "colocrossing", "psychz", "quadranet", "servers.com", "hivelocity", "netcup",
    "liquid web", "dreamhost", "zenlayer", "gcore", "g-core", "selectel", "timeweb",
    "packet host", "equinix", "datacamp", "cloudflare", "fastly", "ikoula", "aruba s.p.a",
    "interserver", "buyvm", "frantech", "nforce", "worldstream", "serverius", "dedipath",
    "tzulo", "cloudsigma", "exoscale", "ucloud", "kingsoft", "baidu", "stackpath",
    # generic words that AS names of hosting networks use
    "hosting", "datacenter", "data center", "data-center", "dedicated", "vps", "colo",
    "cloud", "server",
)
"""Curated substrings (lower case) of AS names that belong to cloud, VPS and hosting
providers. End users do not browse from these networks, so an API key used from one is
being used by a machine somebody rented: normal for server-side integrations, a warning
sign for a key that used to come from residential or office networks."""

HOSTING_ASN_EXACT: frozenset[str] = frozenset({"google", "google-cloud-platform"})
"""Whole AS names that are hosting but too short to use as a substring."""

HOSTING_ASN_EXCLUDE: tuple[str, ...] = ("google fiber", "google-fiber", "microsoft corp-msn")
"""AS names that match a keyword but are consumer access networks."""

HOSTING_ASN_NUMBERS: frozenset[int] = frozenset({
    16509, 14618, 8987, 7224,  # Amazon
    15169, 396982, 19527, 36040, 43515,  # Google / Google Cloud
    8075, 8068, 8069, 12076,  # Microsoft / Azure
    14061,  # DigitalOcean
    16276, 35540,  # OVH
    24940, 213230,  # Hetzner
    63949, 20940, 16625,  # Linode / Akamai
    20473,  # Vultr / Choopa
    51167,  # Contabo
    45102, 37963, 45103,  # Alibaba
    31898,  # Oracle
    132203, 45090,  # Tencent
    12876,  # Scaleway
    60781, 28753, 16265,  # Leaseweb
    9009,  # M247
    13335, 54113,  # Cloudflare, Fastly
    47583,  # Hostinger
    8560,  # IONOS
})
"""Well-known AS numbers of the same providers, for gateways that send only `AS16509`."""

_HOSTING_RE = re.compile("|".join(re.escape(k) for k in HOSTING_ASN_KEYWORDS))
_ASN_NUMBER_RE = re.compile(r"^(?:as)?\s*(\d{1,10})$", re.IGNORECASE)

# countryinfo has no or wrong coordinates for a few codes; centroids from the CIA factbook.
_CENTROID_FALLBACK: dict[str, tuple[tuple[float, float], str]] = {
    "GB": ((54.0, -2.0), "United Kingdom"),
    "AX": ((60.12, 19.9), "Åland Islands"),
    "BL": ((17.9, -62.83), "Saint Barthélemy"),
    "BQ": ((12.18, -68.24), "Caribbean Netherlands"),
    "CW": ((12.17, -68.98), "Curaçao"),
    "MF": ((18.07, -63.05), "Saint Martin"),
    "SX": ((18.04, -63.07), "Sint Maarten"),
    "TC": ((21.75, -71.58), "Turks and Caicos Islands"),
    "VG": ((18.43, -64.62), "British Virgin Islands"),
    "VI": ((18.34, -64.93), "United States Virgin Islands"),
    "XK": ((42.6, 20.9), "Kosovo"),
    "PS": ((31.9, 35.2), "Palestine"),
    "UM": ((19.28, 166.6), "United States Minor Outlying Islands"),
    "BV": ((-54.43, 3.4), "Bouvet Island"),
    "AN": ((12.25, -68.75), "Netherlands Antilles"),
    "AQ": ((-75.0, 0.0), "Antarctica"),
}


@functools.lru_cache(maxsize=1)
def country_table() -> dict[str, tuple[tuple[float, float] | None, str]]:
    """ISO alpha-2 code → (centroid (lat, lon) or None, English name), built once."""
    table: dict[str, tuple[tuple[float, float] | None, str]] = {}
    try:
        from countryinfo import all_countries

        for info in all_countries():
            try:
                code = str(info.iso(2)).upper()
                name = str(info.name())
                latlng = info.latlng()
            except Exception:  # incomplete record in the package: skip it
                continue
            point = (float(latlng[0]), float(latlng[1])) if latlng and len(latlng) == 2 else None
            held = table.get(code)
            if held is None or (held[0] is None and point is not None):
                table[code] = (point, name)
    except Exception:  # the package is missing or broken: centroids from the fallback only
        table = {}
    for code, (point, name) in _CENTROID_FALLBACK.items():
        held = table.get(code)
        if held is None or held[0] is None or code == "GB":
            table[code] = (point, name)
    return table


def country_centroid(code: str | None) -> tuple[float, float] | None:
    if not code:
        return None
    entry = country_table().get(code.upper())
    return entry[0] if entry else None


def country_name(code: str | None) -> str | None:
    if not code:
        return None
    entry = country_table().get(code.upper())
    return entry[1] if entry else code.upper()


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


@functools.lru_cache(maxsize=4096)
def is_hosting_asn(asn: str | None, asn_name: str | None = None) -> bool:
    """True when the AS number or name belongs to a cloud/VPS/hosting provider."""
    for text in (asn, asn_name):
        if not text:
            continue
        number = _ASN_NUMBER_RE.match(text.strip())
        if number is not None:
            if int(number.group(1)) in HOSTING_ASN_NUMBERS:
                return True
            continue
        low = text.lower()
        if low.strip() in HOSTING_ASN_EXACT:
            return True
        if any(x in low for x in HOSTING_ASN_EXCLUDE):
            continue
        if _HOSTING_RE.search(low):
            return True
    return False


def normalise_asn(value: str | int | None) -> str | None:
    """`16509`, `"16509"`, `"as16509"` → `"AS16509"`; names are kept as given."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    number = _ASN_NUMBER_RE.match(text)
    return f"AS{int(number.group(1))}" if number else text


def _public_address(ip: str) -> str | None:
    """The address to look up, or None when it is not a place on the Internet
    (private, loopback, link-local, CGNAT, documentation, multicast, unparsable).
    IPv4-mapped IPv6 addresses are looked up as the IPv4 address they carry."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if (not addr.is_global) or addr.is_multicast or addr.is_unspecified:
        return None
    return str(addr)


@dataclass(frozen=True, slots=True)
class GeoInfo:
    """Where one call came from. Every field may be unknown (None)."""

    country: str | None = None
    """ISO 3166-1 alpha-2, upper case."""
    country_name: str | None = None
    asn: str | None = None
    """`AS<number>` when the number is known, else the AS name (novelty is on this)."""
    asn_name: str | None = None
    lat: float | None = None
    lon: float | None = None
    is_private: bool = False
    hosting: bool = False
    source: str | None = None
    """Where the coordinates came from: `event`, `mmdb`, `country` (centroid) or None."""

    @property
    def located(self) -> bool:
        return self.lat is not None and self.lon is not None


NO_GEO = GeoInfo()
PRIVATE_GEO = GeoInfo(is_private=True)


class GeoLocator:
    """Looks addresses up (MaxMind `.mmdb` first when given, then geoip2fast), cached.

    Parameters
    ----------
    mmdb_paths:
        Optional MaxMind database path(s): a City database gives city coordinates and
        the country, an ASN database gives the AS number and organisation. Several can
        be given; the first that knows a field wins.
    use_geoip2fast:
        Fall back to the bundled geoip2fast database (country and AS name).
    cache_size:
        Addresses kept in the lookup cache.
    """

    def __init__(
        self,
        mmdb_paths: str | Path | Sequence[str | Path] | None = None,
        *,
        use_geoip2fast: bool = True,
        cache_size: int = 65_536,
    ) -> None:
        if isinstance(mmdb_paths, str | Path):
            mmdb_paths = [mmdb_paths]
        self.mmdb_paths = [Path(p) for p in (mmdb_paths or [])]
        self.use_geoip2fast = use_geoip2fast
        self._readers: list[Any] | None = None
        self._fast: Any = None
        self._load_lock = threading.Lock()
        self.lookup = functools.lru_cache(maxsize=cache_size)(self._lookup_uncached)

    # ---- databases, opened on first use (loading geoip2fast takes ~0.3 s) ---------------
    def _open(self) -> None:
        with self._load_lock:
            if self._readers is not None:
                return
            readers = []
            for path in self.mmdb_paths:
                import maxminddb

                readers.append(maxminddb.open_database(str(path)))
            if self.use_geoip2fast:
                self._fast = _shared_geoip2fast()
            self._readers = readers

    def _lookup_uncached(self, ip: str | None) -> GeoInfo:
        if not ip:
            return NO_GEO
        public = _public_address(ip)
        if public is None:
            return PRIVATE_GEO
        ip = public
        if self._readers is None:
            self._open()
        country = asn = asn_name = None
        lat = lon = None
        source = None
        for reader in self._readers or ():
            try:
                rec = reader.get(ip)
            except Exception:
                rec = None
            if not isinstance(rec, dict):
                continue
            if country is None:
                c = (rec.get("country") or rec.get("registered_country") or {}).get("iso_code")
                country = c.upper() if isinstance(c, str) and c else None
            loc = rec.get("location") or {}
            if lat is None and loc.get("latitude") is not None and loc.get("longitude") is not None:
                lat, lon, source = float(loc["latitude"]), float(loc["longitude"]), "mmdb"
            if asn is None and rec.get("autonomous_system_number") is not None:
                asn = f"AS{int(rec['autonomous_system_number'])}"
            if asn_name is None and rec.get("autonomous_system_organization"):
                asn_name = str(rec["autonomous_system_organization"])
        if self._fast is not None and (country is None or asn_name is None):
            try:
                fast = self._fast.lookup(ip).to_dict()
            except Exception:
                fast = {}
            if fast.get("is_private"):
                return PRIVATE_GEO
            cc = fast.get("country_code") or ""
            if country is None and len(cc) == 2 and cc.isalpha():
                country = cc.upper()
            if asn_name is None and fast.get("asn_name"):
                asn_name = str(fast["asn_name"])
        if lat is None and country is not None:
            point = country_centroid(country)
            if point is not None:
                lat, lon, source = point[0], point[1], "country"
        return GeoInfo(
            country=country,
            country_name=country_name(country),
            asn=asn or asn_name,
            asn_name=asn_name,
            lat=lat,
            lon=lon,
            hosting=is_hosting_asn(asn, asn_name),
            source=source,
        )

    # ---- an event: its own geo fields first ---------------------------------------------
    def locate(
        self,
        ip: str | None,
        *,
        country: str | None = None,
        asn: str | None = None,
        lat: float | None = None,
        lon: float | None = None,
    ) -> GeoInfo:
        """Geo of one event: fields the gateway supplied win over the address lookup.

        Coordinates from the lookup are used only when they belong to the same country
        as the event says (else the event's country centroid), so that a gateway's
        country is never paired with a database's coordinates in another country.
        """
        found = self.lookup(ip)
        if country is None and asn is None and lat is None:
            return found
        cc = country.upper() if country else found.country
        if lat is not None and lon is not None:
            point: tuple[float, float] | None = (float(lat), float(lon))
            source: str | None = "event"
        elif found.located and cc == found.country:
            point, source = (found.lat, found.lon), found.source  # type: ignore[assignment]
        else:
            point = country_centroid(cc)
            source = "country" if point is not None else None
        if asn is not None:
            the_asn = normalise_asn(asn)
            name = found.asn_name if the_asn == found.asn else (
                None if the_asn and the_asn.startswith("AS") and the_asn[2:].isdigit()
                else the_asn)
        else:
            the_asn, name = found.asn, found.asn_name
        return GeoInfo(
            country=cc,
            country_name=country_name(cc),
            asn=the_asn,
            asn_name=name,
            lat=point[0] if point else None,
            lon=point[1] if point else None,
            is_private=found.is_private,
            hosting=is_hosting_asn(the_asn, name),
            source=source,
        )

    def close(self) -> None:
        for reader in self._readers or ():
            with contextlib.suppress(Exception):
                reader.close()
        self._readers = None
        self.lookup.cache_clear()


@functools.lru_cache(maxsize=1)
def _shared_geoip2fast() -> Any:
    """One geoip2fast database per process (it holds ~100 MB of tables)."""
    from geoip2fast import GeoIP2Fast

    return GeoIP2Fast(geoip2fast_data_file=GEOIP2FAST_DATA_FILE)


@functools.lru_cache(maxsize=1)
def default_locator() -> GeoLocator:
    """The process-wide locator used when none is configured."""
    return GeoLocator()
