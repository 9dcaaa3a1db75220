"""Domain names, address literals and domain patterns: the one place that converts them.

``to_ascii`` turns a domain into its A-label form by IDNA 2008 (the ``idna``
package, UTS #46 mapping, nontransitional: ``faß.de`` is
``xn--fa-hia.de``, never ``fass.de``); every other module that converts a
domain calls it.  ``ip_literal`` reads an address literal (``[192.0.2.1]``,
``[IPv6:2001:db8::1]``) for every parser of one.

Patterns, as used by relay_domains and [[routes]]: ``"a.test"`` matches that
domain only; ``".a.test"`` matches its subdomains only; ``"*"`` matches
every domain.  Matching is case-insensitive and IDNA-aware: U-labels,
UTS #46 spellings (fullwidth letters, upper case) and A-labels of the same
name are equal.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Optional, Union

import idna

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class DomainError(ValueError):
    """A name that is not a domain under IDNA 2008; ``str()`` is a short reason, safe to log and reply."""


def to_ascii(domain: str) -> str:
    """The lower-case A-label form of ``domain``, without a final dot (IDNA 2008, UTS #46).

    ``"Faß.DE"`` -> ``"xn--fa-hia.de"``; ``"ｅｘａｍｐｌｅ.test"`` -> ``"example.test"``.
    An ASCII name is only lower-cased (its ``xn--`` labels are checked), so
    names such as ``_mta-sts.example`` pass.  Raises DomainError for a name
    IDNA 2008 refuses (an emoji, a bad A-label, an empty label).
    """
    text = domain[:-1] if domain.endswith(".") else domain
    if text.isascii():
        name = text.lower()
        if "xn--" in name:
            _check_a_labels(name)
        elif not name or "" in name.split("."):
            raise DomainError("empty label in domain")
        return name
    return _encode(text)


@lru_cache(maxsize=4096)
def _encode(text: str) -> str:
    try:
        name = idna.encode(text, uts46=True, transitional=False).decode("ascii")
    except idna.IDNAError as e:
        raise DomainError(f"not a valid internationalized domain name ({_reason(e)})") from None
    except UnicodeError:
        raise DomainError("not a valid internationalized domain name") from None
    return name.lower().rstrip(".")


@lru_cache(maxsize=4096)
def _check_a_labels(name: str) -> None:
    for label in name.split("."):
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError) as e:
                raise DomainError(f"bad A-label {label!r} ({_reason(e)})") from None
        elif not label:
            raise DomainError("empty label in domain")


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text.encode("ascii", "backslashreplace").decode("ascii")[:120] or type(error).__name__


def to_unicode(domain: str) -> str:
    """The U-label form of ``domain`` (lower case, UTS #46 mapped); the input unchanged when it cannot be decoded."""
    try:
        return _decode(to_ascii(domain))
    except (idna.IDNAError, UnicodeError, DomainError):
        return domain


@lru_cache(maxsize=4096)
def _decode(name: str) -> str:
    return idna.decode(name) if "xn--" in name else name


def normalize_domain(domain: str) -> str:
    """Lower-case A-label form of a domain (``"Bücher.Example"`` -> ``"xn--bcher-kva.example"``).

    Address literals (``[192.0.2.1]``) and names that cannot be encoded are
    returned lower-cased as they are, so matching never raises.
    """
    text = domain.strip().rstrip(".").lower()
    if not text or text.startswith("["):
        return text
    try:
        return to_ascii(text)
    except DomainError:
        return text


# -- address literals ---------------------------------------------------------------


@lru_cache(maxsize=4096)
def parsed_ip(text: str) -> Optional[IPAddress]:
    """``ipaddress.ip_address(text)``, or None for text that is not an address.

    Remembered: the same few client and next-hop addresses are parsed for
    every message, and the standard library's parser (IPv4, then IPv6 after
    an exception) is most of the cost of a policy check.
    """
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def ip_literal(text: str, strict: bool = False) -> Optional[IPAddress]:
    """The IP address written in ``text``; None when ``text`` is not written as one.

    ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3) always; unless
    ``strict``, also ``[2001:db8::1]``, the bare addresses and the tag
    without brackets (how configuration and host lists write them).  Text
    in brackets that is not an address literal raises ValueError; so does
    anything but an RFC 5321 literal when ``strict``.
    """
    body = text.strip()
    bracketed = body.startswith("[") and body.endswith("]")
    if bracketed:
        body = body[1:-1]
    elif strict:
        raise ValueError("bad address literal")
    tagged = body[:5].lower() == "ipv6:"
    if tagged:
        body = body[5:]
    address = parsed_ip(body)
    if address is None:
        if bracketed or strict or tagged:
            raise ValueError("bad address literal")
        return None
    if strict and ("%" in body or tagged != (address.version == 6)):
        raise ValueError("bad address literal")
    return address


# -- patterns ---------------------------------------------------------------------


@dataclass(frozen=True)
class DomainPattern:
    """One compiled pattern."""

    text: str  # as written in the configuration

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise ValueError("empty domain pattern")

    def matches(self, domain: str) -> bool:
        pattern = self.text.strip()
        if pattern == "*":
            return True
        name = normalize_domain(domain)
        if pattern.startswith("."):
            suffix = "." + normalize_domain(pattern[1:])
            return name.endswith(suffix) and len(name) > len(suffix)
        return name == normalize_domain(pattern)


class DomainSet:
    """A list of patterns; matches when any pattern does."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(DomainPattern(p) for p in patterns)

    def matches(self, domain: str) -> bool:
        return any(p.matches(domain) for p in self.patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)
