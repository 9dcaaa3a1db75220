"""SMTP replies: the ``Reply`` value and every reply the inbound server sends.

A ``Reply`` is a code, an enhanced status code (RFC 3463, ``""`` when there is
none, as in the greeting, the EHLO answer or a remote server that sends none)
and a text that may span several lines (joined with ``"\\n"``).  ``to_bytes``
gives the wire form; ``Reply.parse`` reads the lines a remote server sent, so
the outbound client represents remote answers with the same type.

Every reply text the server can send is a constant (or a small function when
the text names the host) in this module, so texts never come from exceptions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: ``250 2.1.0 Ok``; multi-line when ``text`` holds ``"\\n"``."""

    code: int
    status: str = ""  # enhanced status code ("5.5.1"), "" when there is none
    text: str = ""

    def lines(self) -> list[str]:
        """The text lines, each without code or status."""
        return self.text.split("\n")

    def to_bytes(self) -> bytes:
        """Wire form: ``"250-first\\r\\n250 last\\r\\n"``, status repeated on each line (RFC 2034)."""
        lines = self.lines()
        prefix = f"{self.status} " if self.status else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            line = _CONTROL.sub(" ", line)  # a reply line never carries CR, LF or other controls
            out.append(f"{self.code:03d}{sep}{prefix}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        """One line for logs and DSNs: ``"550 5.1.1 no such user"`` (lines joined by a space)."""
        parts = [str(self.code), self.status, " ".join(self.lines())]
        return " ".join(p for p in parts if p)

    @property
    def positive(self) -> bool:
        """2xx or 3xx."""
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        """4xx: try again later."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        """5xx: do not try again."""
        return 500 <= self.code < 600

    def with_text(self, text: str) -> "Reply":
        """The same code and status with another text."""
        return Reply(self.code, self.status, text)

    @classmethod
    def parse(cls, lines: Iterable[Union[bytes, str]]) -> "Reply":
        """Read the lines of one (possibly multi-line) reply as a remote server sent them.

        Lines may carry their CRLF or not.  The enhanced status code is taken
        from the first line when its class matches the reply code, and removed
        from every line that repeats it.  Raises ValueError on a line that does
        not start with a three-digit code or on lines with different codes.
        """
        texts: list[str] = []
        code = None
        for raw in lines:
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            line = line.rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                raise ValueError(f"malformed reply line {line[:40]!r}")
            this_code = int(line[:3])
            if code is None:
                code = this_code
            elif this_code != code:
                raise ValueError("reply lines carry different codes")
            texts.append(line[4:])
        if code is None:
            raise ValueError("empty reply")
        return cls.from_texts(code, texts)

    @classmethod
    def from_texts(cls, code: int, texts: Sequence[str]) -> "Reply":
        """The reply of ``code`` whose lines, after "NNN-" / "NNN ", are ``texts`` (already split off the wire).

        The enhanced status code is taken from the first line when its class
        matches the reply code, and removed from every line that repeats it.
        """
        status = ""
        kept: list[str] = []
        for number, text in enumerate(texts):
            if number == 0:
                first, _, rest = text.partition(" ")
                match = _STATUS.match(first)
                if match and match.group(1) == str(code)[0]:
                    status = first
                    text = rest
            elif status and (text == status or text.startswith(status + " ")):
                text = text[len(status) + 1:]
            kept.append(text)
        return cls(code, status, "\n".join(kept))


# What the server's command handlers give back: a reply, None (written already
# or none due), or a Deferred firing with the reply.
Answer = Union[Optional[Reply], "Deferred"]


# -- connection and session --------------------------------------------------------


def greeting(hostname: str) -> Reply:
    """The banner; RFC 2034 puts no enhanced status code in it (as Postfix does)."""
    return Reply(220, "", f"{hostname} ESMTP relay")


def too_many_connections(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Too many connections, try again later")


def too_many_client_sessions(hostname: str, address: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many connections from {address}")


def connection_rate_exceeded(hostname: str, address: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many connection attempts from {address}, try again later")


def idle_timeout(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def too_many_errors(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors")


def helo_reply(hostname: str) -> Reply:
    """HELO answer: no enhanced status code (RFC 2034)."""
    return Reply(250, "", hostname)


def ehlo_reply(hostname: str, extensions: Iterable[str]) -> Reply:
    """EHLO answer: the host name then one extension per line, no enhanced status code."""
    return Reply(250, "", "\n".join([hostname, *extensions]))


BYE = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY_REPLY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
BASIC_VERBS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "HELP")


def help_reply(offered: Sequence[str]) -> Reply:
    """The answer to HELP: the basic verbs and those the session ``offered`` now (STARTTLS, AUTH, ETRN...)."""
    return Reply(214, "2.0.0", "Commands: " + " ".join((*BASIC_VERBS, *offered)))


HELP_REPLY = help_reply(("ETRN",))  # a session that offers neither STARTTLS nor AUTH
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


# -- protocol errors (counted towards max_errors) ------------------------------------

UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Error: line too long")
BARE_NEWLINE_COMMAND = Reply(500, "5.5.2", "Error: bare <CR> or <LF> in command")
BAD_UTF8_COMMAND = Reply(500, "5.5.2", "Error: command is not valid UTF-8")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
SYNTAX_HELO = Reply(501, "5.5.4", "Syntax: HELO hostname")
SYNTAX_EHLO = Reply(501, "5.5.4", "Syntax: EHLO hostname")
SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
SYNTAX_DATA = Reply(501, "5.5.4", "Syntax: DATA")
SYNTAX_BDAT = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
BDAT_THEN_DATA = Reply(503, "5.5.1", "Error: DATA after BDAT in one transaction")


def chunk_received(octets: int) -> Reply:
    """The answer to a BDAT chunk that is not the last (RFC 3030 2)."""
    return Reply(250, "2.0.0", f"{octets} octets received")
SYNTAX_RSET = Reply(501, "5.5.4", "Syntax: RSET")
SYNTAX_QUIT = Reply(501, "5.5.4", "Syntax: QUIT")
SYNTAX_STARTTLS = Reply(501, "5.5.4", "Syntax: STARTTLS")
SYNTAX_PARAMS = Reply(501, "5.5.4", "Error: bad parameter syntax")
BAD_SIZE = Reply(501, "5.5.4", "Error: bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4", "Error: BODY must be 7BIT or 8BITMIME")
BAD_SMTPUTF8 = Reply(501, "5.5.4", "Error: SMTPUTF8 takes no value")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NULL_RECIPIENT = Reply(501, "5.1.3", "Error: the null path <> is not a recipient")
BAD_IDN_SENDER = Reply(553, "5.1.7", "Bad sender domain: not a valid internationalized domain name (IDNA 2008)")
BAD_IDN_RECIPIENT = Reply(553, "5.1.3", "Bad recipient domain: not a valid internationalized domain name (IDNA 2008)")
UNSENDABLE_SENDER = Reply(553, "5.1.7", "Sender address cannot be relayed: '<' or '>' in the local part")
UNSENDABLE_RECIPIENT = Reply(553, "5.1.3", "Recipient address cannot be relayed: '<' or '>' in the local part")
BAD_IDN_HELO = Reply(501, "5.5.4", "Error: HELO/EHLO name is not a valid internationalized domain name (IDNA 2008)")
UNSUPPORTED_PARAM = Reply(555, "5.5.4", "Error: unsupported parameter")
# DSN parameters (RFC 3461), checked by relay.smtp.dsn
BAD_RET = Reply(501, "5.5.4", "Error: RET must be FULL or HDRS")
BAD_ENVID = Reply(501, "5.5.4", "Error: bad ENVID parameter (xtext of at most 100 characters)")
BAD_NOTIFY = Reply(501, "5.5.4", "Error: NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
BAD_ORCPT = Reply(501, "5.5.4", "Error: bad ORCPT parameter (addr-type;xtext)")
REPEATED_DSN_PARAM = Reply(501, "5.5.4", "Error: a DSN parameter is given twice")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
ALREADY_TLS = Reply(503, "5.5.1", "Error: TLS already active")

PROTOCOL_ERROR_CODES = frozenset({500, 501, 502, 503, 504, 555})

# -- policy and limits ----------------------------------------------------------------

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later")
QUEUE_WRITE_ERROR = Reply(451, "4.3.0", "Error: queue file write error")

# -- message content, answered at the end of DATA ---------------------------------------

BARE_NEWLINE_DATA = Reply(
    554, "5.6.0", "Error: message refused: bare <CR> or <LF> in message content")
# NUL is not text, and RFC 6152 excludes it from 8BITMIME data too; a next hop
# that drops NULs would read a "\0." line as the end of the data (smuggling).
NUL_IN_DATA = Reply(554, "5.6.0", "Error: message refused: NUL character in message content")
# A text line over 1000 octets (RFC 5321 4.5.3.1.6) is a content-format violation
# (5.6.x), refused permanently like the other content errors rather than as a
# storage-size problem (552): the same message will never become acceptable.
LINE_TOO_LONG_DATA = Reply(
    554, "5.6.0", "Error: message refused: text line longer than 1000 octets")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops (mail loop)")


# -- AUTH, ETRN, submission and shutdown ------------------------------------------------

CHALLENGE_EMPTY = b"334 \r\n"  # AUTH PLAIN without an initial response
CHALLENGE_USERNAME = b"334 VXNlcm5hbWU6\r\n"  # "Username:"
CHALLENGE_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_RATE_LIMITED = Reply(454, "4.7.0", "Error: too many authentication failures from your address, try again later")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Error: invalid base64 data")
AUTH_MALFORMED = Reply(501, "5.5.2", "Error: malformed authentication data")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
AUTH_TWICE = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Error: unsupported authentication mechanism")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
SYNTAX_AUTH = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
ETRN_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
SYNTAX_ETRN = Reply(501, "5.5.4", "Syntax: ETRN domain")
ETRN_BAD_DOMAIN = Reply(501, "5.5.4", "Error: invalid domain name in ETRN")
ETRN_NO_QUEUE_NAMES = Reply(459, "4.3.3", "Error: queue names are not supported")


def too_many_auth_failures(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many authentication failures")


def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, closing transmission channel")


def etrn_started(domain: str) -> Reply:
    return Reply(250, "2.0.0", f"Queuing for node {domain} started")


def etrn_unavailable(domain: str) -> Reply:
    return Reply(458, "4.3.0", f"Unable to queue messages for node {domain}")


def etrn_denied(domain: str) -> Reply:
    return Reply(459, "4.7.1", f"Node {domain} not allowed: access denied")

SENDER_MAP_UNAVAILABLE = Reply(451, "4.3.0", "Error: sender ownership cannot be checked, try again later")


def sender_not_owned(sender: str, user: str) -> Reply:
    return Reply(553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by user {user}")
