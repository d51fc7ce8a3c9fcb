"""Geolocation: real databases (geoip2fast, countryinfo), no mocks."""

from __future__ import annotations

import pytest

from features.geo import (
    GeoLocator,
    country_centroid,
    country_name,
    haversine_km,
    is_hosting_asn,
    normalise_asn,
)


@pytest.fixture(scope="module")
def geo() -> GeoLocator:
    return GeoLocator()


def test_public_addresses_get_country_asn_and_a_centroid(geo: GeoLocator) -> None:
    g = geo.lookup("81.2.69.160")
    assert (g.country, g.country_name) == ("GB", "United Kingdom")
    assert g.located and g.source == "country" and not g.is_private
    v6 = geo.lookup("2001:4860:4860::8888")
    assert v6.country == "US" and v6.asn
    assert geo.lookup("::ffff:81.2.69.160").country == "GB"


@pytest.mark.parametrize("ip", ["10.1.2.3", "192.168.0.9", "127.0.0.1", "100.64.0.1", "::1",
                                "fe80::1", "fd00::5", "224.0.0.1", "198.51.100.7", "0.0.0.0"])
def test_private_and_reserved_addresses_have_no_location(geo: GeoLocator, ip: str) -> None:
    g = geo.lookup(ip)
    assert g.is_private and not g.located and g.country is None


def test_unknown_or_missing_addresses_are_empty_not_errors(geo: GeoLocator) -> None:
    assert not geo.lookup(None).located
    assert not geo.lookup("").located
    assert not geo.lookup("not-an-ip").located


def test_hosting_networks_are_flagged(geo: GeoLocator) -> None:
    assert geo.lookup("52.94.76.1").hosting  # Amazon
    assert geo.lookup("5.9.0.1").hosting  # Hetzner
    assert not geo.lookup("81.2.69.160").hosting  # a UK ISP
    assert is_hosting_asn("AS16509") and is_hosting_asn("14061")
    assert is_hosting_asn(None, "OVH SAS") and is_hosting_asn(None, "Contabo GmbH")
    assert not is_hosting_asn("AS3320", "Deutsche Telekom AG")
    assert not is_hosting_asn(None, "Google Fiber Inc.")


def test_gateway_fields_take_precedence(geo: GeoLocator) -> None:
    g = geo.locate("8.8.8.8", country="de")
    assert g.country == "DE" and (g.lat, g.lon) == country_centroid("DE")
    g = geo.locate("10.0.0.1", lat=1.5, lon=103.8, country="SG")
    assert (g.lat, g.lon, g.source) == (1.5, 103.8, "event")
    g = geo.locate("81.2.69.160", asn="16509")
    assert g.asn == "AS16509" and g.hosting and g.country == "GB"
    assert normalise_asn(" as3320 ") == "AS3320" and normalise_asn("Example") == "Example"


def test_country_table_and_distances() -> None:
    assert country_name("GB") == "United Kingdom"  # not "Wales" (a countryinfo quirk)
    assert country_centroid("XK") is not None and country_centroid("ZZ") is None
    sg, de = country_centroid("SG"), country_centroid("DE")
    assert sg and de
    assert 10_000 < haversine_km(*sg, *de) < 10_400
    assert haversine_km(*de, *de) == 0.0


def test_lookups_are_cached(geo: GeoLocator) -> None:
    geo.lookup("81.2.69.161")
    hits = geo.lookup.cache_info().hits
    for _ in range(100):
        geo.lookup("81.2.69.161")
    assert geo.lookup.cache_info().hits == hits + 100
