"""Tests for relay.domains: IDNA 2008 conversion and the one address-literal parser."""

from __future__ import annotations

import ipaddress

import pytest

from relay.domains import DomainError, DomainSet, ip_literal, normalize_domain, to_ascii, to_unicode


@pytest.mark.parametrize("name, expected", [
    ("faß.de", "xn--fa-hia.de"),
    ("Faß.DE", "xn--fa-hia.de"),
    ("ς.example", "xn--3xa.example"),
    ("ΣΑΣ.example", "xn--mxa9ab.example"),  # upper-case Σ maps to σ
    ("Bücher.Example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("ｅｘａｍｐｌｅ.test", "example.test"),
    ("bücher。example", "xn--bcher-kva.example"),
    ("XN--FA-HIA.de", "xn--fa-hia.de"),
    ("Example.TEST.", "example.test"),
    ("_mta-sts.example", "_mta-sts.example"),
])
def test_to_ascii_is_idna_2008_nontransitional(name: str, expected: str) -> None:
    """to_ascii gives the lower-case A-label form by UTS #46, nontransitional: ß and ς are kept, not mapped to ss and σ."""
    assert to_ascii(name) == expected


@pytest.mark.parametrize("name", ["😀.example", "☃.example", "xn--ls8h.example", "xn--zz.example", "a..b", "", "."])
def test_to_ascii_refuses_what_idna_2008_refuses(name: str) -> None:
    """Emoji and symbols (valid in IDNA 2003), invalid A-labels and empty labels raise DomainError."""
    with pytest.raises(DomainError):
        to_ascii(name)


def test_to_unicode_round_trip() -> None:
    """to_unicode gives the U-labels of an A-label name, and the input when it cannot be decoded."""
    assert to_unicode("xn--fa-hia.de") == "faß.de"
    assert to_unicode("😀.example") == "😀.example"


def test_normalize_domain_never_raises() -> None:
    """normalize_domain lower-cases literals and names it cannot encode instead of raising."""
    assert normalize_domain(" Faß.de. ") == "xn--fa-hia.de"
    assert normalize_domain("[IPv6:2001:DB8::1]") == "[ipv6:2001:db8::1]"
    assert normalize_domain("😀.Example") == "😀.example"


def test_domain_set_matches_every_spelling() -> None:
    """A relay domain matches its fullwidth, upper-case and A-label spellings, and faß.de is not fass.de."""
    domains = DomainSet(["partner.test", "faß.de"])
    for name in ("partner.test", "PARTNER.test", "ｐａｒｔｎｅｒ.ｔｅｓｔ", "xn--fa-hia.de", "FAß.de"):
        assert domains.matches(name), name
    assert not domains.matches("fass.de")


@pytest.mark.parametrize("text, expected", [
    ("[192.0.2.1]", "192.0.2.1"),
    ("[IPv6:2001:DB8::1]", "2001:db8::1"),
    ("[ipv6:::1]", "::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("IPv6:2001:db8::1", "2001:db8::1"),
    ("192.0.2.1", "192.0.2.1"),
    ("mail.test", None),
])
def test_ip_literal_lenient_forms(text: str, expected) -> None:
    """Without strict, bracketed, tagged and bare addresses are read; a host name is None."""
    address = ip_literal(text)
    assert (None if address is None else str(address)) == expected


@pytest.mark.parametrize("text", ["[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_ip_literal_strict_accepts_rfc_5321_literals(text: str) -> None:
    """Strict parsing accepts the RFC 5321 4.1.3 forms."""
    assert isinstance(ip_literal(text, strict=True), (ipaddress.IPv4Address, ipaddress.IPv6Address))


@pytest.mark.parametrize("text", ["[2001:db8::1]", "[IPv6:192.0.2.1]", "[IPv6:fe80::1%eth0]", "192.0.2.1",
                                  "[tag:x]", "[192.0.2.256]", "[]"])
def test_ip_literal_strict_refuses_the_rest(text: str) -> None:
    """Strict parsing refuses an untagged IPv6, a tagged IPv4, a zone id, a bare address and other tags."""
    with pytest.raises(ValueError):
        ip_literal(text, strict=True)


@pytest.mark.parametrize("text", ["[not-an-address]", "[IPv6:zz]", "IPv6:zz"])
def test_ip_literal_bad_bracketed_text_raises(text: str) -> None:
    """Bracketed or tagged text that is not an address raises ValueError even when lenient."""
    with pytest.raises(ValueError):
        ip_literal(text)
