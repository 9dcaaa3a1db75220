"""HELO and EHLO of an inbound session: the client's name, and what the session offers.

``read_helo`` reads the name a client gives (RFC 5321 4.1.1.1) as it will
go into our Received header: one word, A-labels for a name with U-labels;
what it refuses raises ``relay.smtp.inbound.Refusal``.  ``extensions`` is
the list EHLO advertises, from what the session can offer now (STARTTLS
before TLS, AUTH with a portal); ``offered_verbs`` is the part of it that
HELP names as verbs.
"""

from __future__ import annotations

from relay.domains import DomainError, to_ascii
from relay.smtp.inbound import Refusal
from relay.smtp.replies import BAD_IDN_HELO, SYNTAX_EHLO
from relay.smtp.sasl import AUTH_MECHANISMS

_EXTENSION_VERBS = ("STARTTLS", "AUTH", "ETRN")  # EHLO keywords that are verbs HELP names when offered


def read_helo(argument: str) -> str:
    """The client's name as it goes into Received: A-labels for a name with U-labels.

    A non-ASCII name that is not a domain under IDNA 2008 is refused, so
    only ASCII ever reaches the header of a message that may travel 7-bit.
    """
    name = argument.strip()
    if not _valid_helo(name):
        raise Refusal(SYNTAX_EHLO)
    if name.isascii():
        return name
    try:
        return to_ascii(name)
    except DomainError as e:
        raise Refusal(BAD_IDN_HELO, str(e)) from None


def extensions(max_message_size: int, starttls: bool, auth: bool) -> list[str]:
    """The EHLO keywords, STARTTLS and AUTH only when ``starttls`` and ``auth`` say they are offered."""
    offered = ["PIPELINING", f"SIZE {max_message_size}"]
    offered.append("CHUNKING")
    if starttls:
        offered.append("STARTTLS")
    if auth:
        offered.append("AUTH " + " ".join(AUTH_MECHANISMS))
    offered += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "DSN", "ETRN"]
    return offered


def offered_verbs(extensions: list[str]) -> list[str]:
    """The verbs beyond the basic ones a session accepts now: those of the extensions EHLO advertises.

    BDAT is a basic verb: CHUNKING is always offered.
    """
    keywords = [extension.split(" ", 1)[0] for extension in extensions]
    return [keyword for keyword in keywords if keyword in _EXTENSION_VERBS]


def _valid_helo(name: str) -> bool:
    """A HELO/EHLO argument: one non-empty word of printable characters."""
    # The only printable white space is U+0020: no other needs a look of its own.
    return bool(name) and name.isprintable() and " " not in name
