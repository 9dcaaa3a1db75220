"""RFC 5321 paths and ESMTP parameters, parsed from command arguments.

Pure functions, no I/O and no Twisted.  ``split_argument`` separates the path
of a ``MAIL FROM:``/``RCPT TO:`` argument from its parameters,
``parse_path`` validates the path (RFC 5321 section 4.1.2, extended by RFC
6531 when SMTPUTF8 is in effect) and ``parse_params`` reads the ESMTP
``keyword[=value]`` parameters.  Every rejection is a ``ValueError`` whose text
is a short reason, safe to log.

The null path ``<>`` parses to a ``Path`` whose mailbox is ``""``; it is a
valid reverse-path only, and the server refuses it as a recipient.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Optional

from relay.domains import ip_literal, to_ascii, to_unicode

MAX_LOCAL_PART = 64  # octets (RFC 5321 4.5.3.1.1)
MAX_DOMAIN = 255  # octets (RFC 5321 4.5.3.1.2)
MAX_PATH = 256  # octets including the angle brackets (RFC 5321 4.5.3.1.3)
MAX_LABEL = 63

# atext of RFC 5322 (ASCII part): what a Dot-string atom may hold.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_KEYWORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
# Unicode categories never allowed in an address: controls, surrogates, private
# use, unassigned code points, line and paragraph separators, spaces other than ASCII's.
_REFUSED_CATEGORIES = frozenset(("Cc", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
# Format characters that reorder or hide text (bidirectional controls, BOM, word joiners).
_REFUSED_FORMAT = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064"
                            "\u2066\u2067\u2068\u2069\ufeff\ufff9\ufffa\ufffb")
# What the client refuses to put on a command line: never accepted in a path either.
UNSENDABLE = frozenset("<>")


@dataclass(frozen=True)
class Path:
    """A parsed reverse- or forward-path.

    ``mailbox`` is ``"local@domain"`` as sent (quoted local parts keep their
    quotes, domains keep their case and U-labels), ``""`` for ``<>``.
    ``source_route`` holds the ``@hop`` domains of ``<@a,@b:user@dom>`` in order.
    """

    mailbox: str
    source_route: tuple[str, ...] = ()

    @property
    def is_null(self) -> bool:
        return self.mailbox == ""

    def wire(self) -> str:
        """The path as it goes on the wire: ``<@a,@b:user@dom>``, ``<user@dom>`` or ``<>``."""
        route = ",".join("@" + hop for hop in self.source_route)
        return f"<{route}:{self.mailbox}>" if route else f"<{self.mailbox}>"


# -- splitting a MAIL/RCPT argument ------------------------------------------------------


def split_argument(text: str) -> tuple[str, str]:
    """Split ``"<path> PARAMS"`` (what follows ``FROM:`` or ``TO:``) into path and parameters.

    One space before the path is tolerated (``MAIL FROM: <x>``, sent by many
    clients); the angle brackets are required.  A ``>`` inside a quoted local
    part does not end the path.  The parameter text is returned without its
    leading space.
    """
    if text.startswith(" "):
        text = text[1:]
    if not text.startswith("<"):
        raise ValueError("the path must be enclosed in angle brackets")
    end = _closing_bracket(text)
    path, rest = text[: end + 1], text[end + 1:]
    if rest and not rest.startswith(" "):
        raise ValueError("garbage after the path")
    return path, rest.lstrip(" ")


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` closing the path that starts at ``text[0]``."""
    if '"' not in text:  # nothing quoted: the first ">" closes it
        end = text.find(">", 1)
        if end < 0:
            raise ValueError("missing closing angle bracket")
        return end
    return _closing_bracket_scanned(text)


def _closing_bracket_scanned(text: str) -> int:
    """``_closing_bracket`` by a scan of every character (quotes and backslashes)."""
    quoted = False
    i = 1
    while i < len(text):
        char = text[i]
        if quoted and char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
        i += 1
    raise ValueError("missing closing angle bracket")


# -- paths ---------------------------------------------------------------------------


def parse_path(text: str, smtputf8: bool) -> Path:
    """Parse ``<mailbox>``, ``<@hop,...:mailbox>`` or ``<>``.

    Non-ASCII text (UTF-8 local parts, U-label domains) is accepted only when
    ``smtputf8`` is true; A-label domains always are.  Raises ValueError with
    a short reason.
    """
    _check_characters(text, smtputf8)
    if len(text.encode("utf-8")) > MAX_PATH:
        raise ValueError("path longer than 256 octets")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise ValueError("the path must be enclosed in angle brackets")
    inner = text[1:-1]
    if inner == "":
        return Path("")
    route: tuple[str, ...] = ()
    if inner.startswith("@"):
        route_text, colon, inner = inner.partition(":")
        if not colon:
            raise ValueError("source route without ':'")
        route = _parse_route(route_text, smtputf8)
    return Path(parse_mailbox(inner, smtputf8), route)


def parse_mailbox(text: str, smtputf8: bool) -> str:
    """Validate ``local@domain`` (no brackets) and return it unchanged.

    Raises DomainError (a ValueError) for a domain IDNA 2008 refuses and
    UnsendableAddress (a ValueError) for a local part that cannot be relayed.
    """
    _check_characters(text, smtputf8)
    local, domain = _split_mailbox(text)
    _check_local_part(local)
    check_sendable(local)
    if domain.startswith("["):
        check_address_literal(domain)
    else:
        check_domain(domain, smtputf8)
    return text


def _check_characters(text: str, smtputf8: bool) -> None:
    if text.isascii() and text.isprintable():  # no control character, nothing beyond ASCII
        return
    _check_each_character(text, smtputf8)


def _check_each_character(text: str, smtputf8: bool) -> None:
    """``_check_characters`` character by character: controls, non-ASCII without SMTPUTF8, refused categories."""
    for char in text:
        code = ord(char)
        if code < 0x20 or code == 0x7F:
            raise ValueError("control character in address")
        if code > 0x7F:
            if not smtputf8:
                raise ValueError("non-ASCII address without SMTPUTF8")
            if unicodedata.category(char) in _REFUSED_CATEGORIES or char in _REFUSED_FORMAT:
                raise ValueError(f"character U+{code:04X} not allowed in address")


def _parse_route(text: str, smtputf8: bool) -> tuple[str, ...]:
    hops = []
    for part in text.split(","):
        if not part.startswith("@"):
            raise ValueError("bad source route")
        hop = part[1:]
        check_domain(hop, smtputf8)
        hops.append(hop)
    return tuple(hops)


def _split_mailbox(text: str) -> tuple[str, str]:
    """Split at the ``@`` that ends the local part (a quoted local part may contain ``@``)."""
    if text.startswith('"'):
        i = 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                break
            i += 1
        else:
            raise ValueError("unterminated quoted local part")
        local, rest = text[: i + 1], text[i + 1:]
        if not rest.startswith("@"):
            raise ValueError("missing '@' after the local part")
        return local, rest[1:]
    local, at, domain = text.rpartition("@")
    if not at:
        raise ValueError("missing '@domain'")
    return local, domain


def _check_local_part(local: str) -> None:
    if not local:
        raise ValueError("empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise ValueError("local part longer than 64 octets")
    if local.startswith('"'):
        _check_quoted_string(local)
        return
    for atom in local.split("."):
        if not atom:
            raise ValueError("empty atom in local part")
        for char in atom:
            if char not in _ATEXT and ord(char) < 0x80:
                raise ValueError(f"character {char!r} not allowed in local part")


def _check_quoted_string(text: str) -> None:
    if len(text) < 2 or not text.endswith('"'):
        raise ValueError("unterminated quoted local part")
    body = text[1:-1]
    i = 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            if i + 1 >= len(body) or not 0x20 <= ord(body[i + 1]) <= 0x7E:
                raise ValueError("bad quoted pair in local part")
            i += 2
            continue
        if char == '"':
            raise ValueError("unescaped quote in local part")
        i += 1


# -- domains -----------------------------------------------------------------------


def check_domain(domain: str, smtputf8: bool) -> None:
    """Validate a domain name: LDH labels, A-labels, U-labels only with ``smtputf8``.

    Names with U-labels or A-labels must be valid under IDNA 2008
    (``relay.domains.to_ascii``); those that are not raise DomainError.
    """
    if not domain:
        raise ValueError("empty domain")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise ValueError("domain longer than 255 octets")
    if not domain.isascii():
        if not smtputf8:
            raise ValueError("non-ASCII domain without SMTPUTF8")
        domain = to_ascii(domain)
        if len(domain) > MAX_DOMAIN:
            raise ValueError("domain longer than 255 octets")
    elif "xn--" in domain.lower():
        to_ascii(domain)
    for label in domain.split("."):
        _check_label(label)


def _check_label(label: str) -> None:
    if not label:
        raise ValueError("empty label in domain")
    if len(label) > MAX_LABEL:
        raise ValueError("domain label longer than 63 octets")
    if not _LDH.issuperset(label) or label[0] == "-" or label[-1] == "-":
        raise ValueError("bad domain")


def check_address_literal(literal: str) -> None:
    """Validate ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``; other tags are refused."""
    ip_literal(literal, strict=True)


def check_sendable(mailbox: str) -> None:
    """Refuse a mailbox the client would not put on a command line (``<`` or ``>`` in a quoted local part)."""
    if not UNSENDABLE.isdisjoint(mailbox):
        raise UnsendableAddress("'<' or '>' in the local part cannot be relayed")


class UnsendableAddress(ValueError):
    """A syntactically valid address that cannot be relayed (the next hop's command line would break)."""


def normalized_domain(domain: str) -> str:
    """A non-ASCII domain in its normalised spelling: UTS #46 mapped, as U-labels (ASCII ones as sent).

    ``ｐａｒｔｎｅｒ.test`` -> ``partner.test``; ``Bücher.Example`` ->
    ``bücher.example``; ``faß.de`` stays ``faß.de`` (IDNA 2008, nontransitional).
    """
    return domain if domain.isascii() else to_unicode(to_ascii(domain))


def normalized_mailbox(mailbox: str) -> str:
    """``mailbox`` with its domain in normalised spelling (see ``normalized_domain``); the local part as sent.

    Call on a mailbox ``parse_mailbox`` accepted.
    """
    local, _, domain = mailbox.rpartition("@")
    if not local or domain.isascii():
        return mailbox
    return f"{local}@{normalized_domain(domain)}"


def normalized_path(path: Path) -> Path:
    """``path`` with the domains of the mailbox and the source-route hops in normalised spelling."""
    if path.is_null or (path.mailbox.rpartition("@")[2].isascii() and all(h.isascii() for h in path.source_route)):
        return path
    return Path(normalized_mailbox(path.mailbox), tuple(normalized_domain(h) for h in path.source_route))


# -- ESMTP parameters -------------------------------------------------------------------


def parse_params(text: str) -> list[tuple[str, Optional[str]]]:
    """Parse ``KEY[=VALUE] ...``; keywords are upper-cased, values (xtext) kept as sent.

    Raises ValueError on a malformed keyword or value, an empty value after
    ``=``, or a keyword given twice.
    """
    params: list[tuple[str, Optional[str]]] = []
    seen: set[str] = set()
    for item in text.split(" "):
        if not item:
            continue
        keyword, eq, value = item.partition("=")
        if not keyword or not keyword[0].isascii() or not keyword[0].isalnum():
            raise ValueError("bad parameter keyword")
        if not all(c in _KEYWORD for c in keyword):
            raise ValueError("bad parameter keyword")
        if eq and not value:
            raise ValueError(f"empty value for {keyword.upper()}")
        for char in value:
            code = ord(char)
            if code <= 0x20 or code == 0x3D or code == 0x7F or 0x80 <= code < 0xA0:
                raise ValueError(f"bad value for {keyword.upper()}")
            if 0xD800 <= code <= 0xDFFF:
                raise ValueError(f"bad value for {keyword.upper()}")
        keyword = keyword.upper()
        if keyword in seen:
            raise ValueError(f"{keyword} given twice")
        seen.add(keyword)
        params.append((keyword, value if eq else None))
    return params
