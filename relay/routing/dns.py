"""The DNS query layer of outbound routing: dnspython queries and what their failures mean.

This module owns the queries themselves: ``make_resolver`` (the configured
nameservers, or the system's), one query of one type (``lookup``), the A
then AAAA addresses of a host (``host_addresses``), TXT records
(``resolve_txt``, for DKIM and MTA-STS), the TTLs of answers (capped at
``MAX_TTL``; negative answers at ``NEGATIVE_TTL_MAX``) and the
``ResolutionError`` every DNS failure becomes, with fixed texts (never
dnspython's own).  The MX rules built on these queries (null MX, implicit
MX, preferences) and the asynchronous resolver are ``relay.routing.mx``'s.

Choice of DNS client: dnspython's blocking ``Resolver``, run in a small
thread pool of its own (see ``relay.routing.mx``).  The Resolver already
does everything a correct stub resolver must: CNAME chains, retry over
several nameservers, TCP after a truncated UDP answer, negative TTLs from
the SOA, /etc/resolv.conf.  Doing the same over Twisted UDP/TCP with the
message API would save a few threads at the price of re-implementing all of
that.

Failures: NXDOMAIN is permanent (5.1.2) for a mail domain and transient for
a host named in the configuration; SERVFAIL, refused, timeout, no
nameserver and an unreadable resolv.conf are transient (4.4.3).
"""

from __future__ import annotations

from typing import Any, Optional

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from relay.envelope import OUTCOME_PERMANENT
from relay.outcome import status_kind

# Enhanced status codes (RFC 3463).
STATUS_NO_DOMAIN = "5.1.2"  # NXDOMAIN: bad destination system address
STATUS_DNS_TRANSIENT = "4.4.3"  # directory server failure

PER_SERVER_TIMEOUT = 2.0  # seconds for one query to one nameserver
MAX_TTL = 86400.0
NEGATIVE_TTL_MAX = 300.0


class ResolutionError(Exception):
    """A next hop could not be resolved; its enhanced ``status`` says whether to bounce.

    The bucket follows the status (5.x.x permanent, 4.x.x transient), decided
    by ``relay.outcome``; ``permanent`` is that decision.
    """

    def __init__(self, status: str, text: str, ttl: float = 0.0) -> None:
        super().__init__(text)
        self.status = status  # enhanced status code
        self.text = text  # one line for logs, relay-route and DSNs
        self.ttl = ttl  # how long a permanent answer may be cached

    @property
    def permanent(self) -> bool:
        return status_kind(self.status) == OUTCOME_PERMANENT

    def __repr__(self) -> str:
        return f"ResolutionError({self.status!r}, {self.text!r})"


# -- errors ----------------------------------------------------------------------


def transient_error(text: str) -> ResolutionError:
    return ResolutionError(STATUS_DNS_TRANSIENT, text)


def not_found_error(name: str, mx: bool, ttl: float) -> ResolutionError:
    """NXDOMAIN (or an unusable name): permanent for a mail domain, transient for a host."""
    if mx:
        return ResolutionError(STATUS_NO_DOMAIN, f"domain {name} does not exist", ttl)
    return transient_error(f"host {name} does not exist")


def _failure_text(error: dns.exception.DNSException) -> str:
    """A fixed description of a dnspython failure (never its own text)."""
    if isinstance(error, dns.exception.Timeout):
        return "timed out"
    if isinstance(error, dns.resolver.NoNameservers):
        return "no nameserver answered (SERVFAIL or refused)"
    if isinstance(error, dns.resolver.NoResolverConfiguration):
        return "no resolver configured"
    return "DNS error"


# -- queries (blocking: they run in the resolver's pool) --------------------------


def make_resolver(
    nameservers: tuple[tuple[str, int], ...] = (), timeout: float = 10.0
) -> dns.resolver.Resolver:
    """A dnspython Resolver for ``nameservers``, or the system's when empty.

    Reads /etc/resolv.conf when ``nameservers`` is empty and raises
    ``dns.resolver.NoResolverConfiguration`` (or OSError) if it cannot.
    """
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
    else:
        resolver = dns.resolver.Resolver()
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, PER_SERVER_TIMEOUT)
    return resolver


def dns_name(name: str) -> Optional[dns.name.Name]:
    """The absolute DNS name for ``name``, or None when it is not a valid name.

    ``name`` comes through ``normalize_domain``: text still not ASCII is a
    name IDNA 2008 refused, never handed to another IDNA conversion.
    """
    if not name.isascii():
        return None
    try:
        qname = dns.name.from_text(name)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None
    return None if qname == dns.name.root else qname


def _negative_ttl(error: dns.resolver.NXDOMAIN) -> float:
    """The negative TTL of an NXDOMAIN answer (SOA minimum), capped."""
    try:
        response = next(iter(error.responses().values()))
        ttl = float(response.resolve_chaining().minimum_ttl)
    except Exception:  # a malformed answer: fall back to the cap
        ttl = NEGATIVE_TTL_MAX
    return min(ttl, NEGATIVE_TTL_MAX)


def lookup(
    resolver: dns.resolver.Resolver, qname: dns.name.Name, rdtype: str, mx: bool
) -> tuple[Optional[Any], float]:
    """One query: ``(rrset or None for NODATA, ttl)``; raises ResolutionError."""
    name = qname.to_text(omit_final_dot=True)
    try:
        answer = resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
    except dns.resolver.NXDOMAIN as e:
        raise not_found_error(name, mx, _negative_ttl(e)) from None
    except dns.exception.DNSException as e:
        raise transient_error(f"DNS lookup of {name} {rdtype} failed: {_failure_text(e)}") from None
    ttl = float(answer.chaining_result.minimum_ttl)
    if answer.rrset is None:
        return None, min(ttl, NEGATIVE_TTL_MAX)
    return answer.rrset, min(ttl, MAX_TTL)


def host_addresses(
    resolver: dns.resolver.Resolver, qname: dns.name.Name
) -> tuple[tuple[str, ...], float, Optional[ResolutionError]]:
    """A then AAAA addresses of a host, the smallest TTL, and the first failure met."""
    found: list[str] = []
    ttl = MAX_TTL
    failure: Optional[ResolutionError] = None
    for rdtype in ("A", "AAAA"):
        try:
            rrset, rrttl = lookup(resolver, qname, rdtype, mx=True)
        except ResolutionError as e:
            failure = failure or e
            continue
        ttl = min(ttl, rrttl)
        for rdata in rrset or ():
            if rdata.address not in found:
                found.append(rdata.address)
    return tuple(found), ttl, failure

def resolve_txt(resolver: dns.resolver.Resolver, name: str) -> list[str]:
    """The TXT records of ``name`` (blocking), each one's strings joined; [] for none.

    NXDOMAIN and NODATA give []; any other failure raises a transient
    ResolutionError.
    """
    qname = dns_name(name)
    if qname is None:
        return []
    try:
        rrset, _ = lookup(resolver, qname, "TXT", mx=True)
    except ResolutionError as e:
        if e.permanent:  # NXDOMAIN
            return []
        raise
    records = []
    for rdata in rrset or ():
        records.append(b"".join(rdata.strings).decode("utf-8", "replace"))
    return records
