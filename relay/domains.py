"""Domain names and domain patterns, as used by relay_domains and [[routes]].

``"a.test"`` matches that domain only; ``".a.test"`` matches its subdomains
only; ``"*"`` matches every domain.  Matching is case-insensitive and
IDNA-aware: U-labels and A-labels of the same name are equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


def normalize_domain(domain: str) -> str:
    """Lower-case A-label form of a domain (``"Bücher.Example"`` -> ``"xn--bcher-kva.example"``).

    Address literals (``[192.0.2.1]``) and names that cannot be encoded are
    returned lower-cased as they are, so matching never raises.
    """
    text = domain.strip().rstrip(".").lower()
    if not text or text.startswith("["):
        return text
    try:
        return text.encode("idna").decode("ascii")
    except UnicodeError:
        return text


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
