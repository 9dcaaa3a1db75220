"""The SASL exchanges of AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN.

An ``AuthExchange`` decodes the client's response lines and says what comes
next: the next challenge, a refusal, or the ``Credentials`` to check.  It
neither checks them nor knows the session; the server asks its portal and
applies the failure limits.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Optional, Union

from relay.smtp.replies import (
    AUTH_BAD_BASE64,
    AUTH_CANCELLED,
    AUTH_MALFORMED,
    CHALLENGE_EMPTY,
    CHALLENGE_PASSWORD,
    CHALLENGE_USERNAME,
    Reply,
)

MAX_AUTH_LINE = 12288  # octets including CRLF of AUTH lines and responses (RFC 4954 4)
AUTH_MECHANISMS = ("PLAIN", "LOGIN")


@dataclass(frozen=True)
class Credentials:
    """What the client offered; ``password`` None: refused without asking (PLAIN with another authzid)."""

    username: bytes
    password: Optional[bytes]


Step = Union[bytes, Reply, Credentials]  # the next challenge (wire form), a refusal, or what to check


class AuthExchange:
    """One AUTH exchange: the mechanism and what the client has said so far."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism
        self.username: Optional[bytes] = None  # LOGIN: given, waiting for the password

    def first_challenge(self) -> bytes:
        """The challenge to an AUTH command without an initial response."""
        return CHALLENGE_EMPTY if self.mechanism == "PLAIN" else CHALLENGE_USERNAME

    def respond(self, line: bytes, initial: bool = False) -> Step:
        """One client response (or the initial response): what the session does next."""
        if line == b"*" and not initial:
            return AUTH_CANCELLED
        if line == b"=" and initial:
            data = b""
        else:
            try:
                data = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                return AUTH_BAD_BASE64
        if self.mechanism == "PLAIN":
            parts = data.split(b"\0")
            if len(parts) != 3:
                return AUTH_MALFORMED
            authzid, username, password = parts
            if authzid and authzid != username:
                return Credentials(username, None)
            return Credentials(username, password)
        if self.username is None:
            self.username = data
            return CHALLENGE_PASSWORD
        return Credentials(self.username, data)
