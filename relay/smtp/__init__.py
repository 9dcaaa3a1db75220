"""SMTP on the wire: reply values, RFC 5321 address parsing, the inbound server and the outbound client."""

from typing import Any


def set_nodelay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP transport (others are left alone).

    A command, a reply or the end of data must not wait for the peer's
    delayed ACK of the previous segment (some 40 ms a transaction).
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass
