"""SMTP on the wire: reply values, RFC 5321 address parsing, the inbound server and the outbound client."""

import functools
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


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data``; on a plain TCP transport with nothing buffered, send it at once.

    Twisted's ``write`` buffers and asks the reactor to watch the socket for
    writing (an epoll_ctl), sends on the next turn and stops watching
    (another): for one SMTP reply or command that is two system calls and a
    reactor turn more than one send.  Whatever cannot go out now, and
    everything on a TLS or otherwise wrapped transport, takes the usual way.
    """
    if (
        type(transport) in _plain_tcp()
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and transport.producer is None
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        sent = transport.writeSomeData(data)
        if not isinstance(sent, int):  # the connection is lost: the transport finds out itself
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)


@functools.lru_cache(maxsize=None)
def _plain_tcp() -> tuple:
    from twisted.internet import tcp

    return (tcp.Server, tcp.Client)
