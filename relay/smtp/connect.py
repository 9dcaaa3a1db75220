"""Connecting to a next hop: the TCP connection, its local address, the ready session.

This module owns the connecting side of the outbound client: ``connect``
opens a TCP connection (IPv4 or IPv6) from the configured source address of
the target's IP version (``source_for``), builds the protocol through
``SMTPClientFactory`` and fires once the session can carry mail, turning a
connection that could not be made into a ``SessionError`` of stage
"connect" with a typed reason.  The pool (``relay.connections``) calls it.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from relay.log import Logger
from relay.outcome import NETWORK_TEXT, STAGE_CONNECT, network_reason
from relay.smtp.client import SMTPClientProtocol
from relay.smtp.transaction import ClientOptions, SessionError

log = Logger()


class SMTPClientFactory(Factory):
    """Builds the protocol for one outbound connection."""

    noisy = False  # no "Starting factory" / "Stopping factory" lines per connection

    def __init__(self, options: ClientOptions, host: str, clock: IReactorTime) -> None:
        self.options = options
        self.host = host
        self.clock = clock

    def buildProtocol(self, addr) -> SMTPClientProtocol:
        protocol = SMTPClientProtocol(self.options, self.host, self.clock)
        protocol.factory = self
        return protocol


def source_for(address: str, sources: tuple[str, ...]) -> str:
    """The local address of ``sources`` of the same IP version as ``address``, or "" (the system's choice)."""
    try:
        version = ipaddress.ip_address(address).version
    except ValueError:
        return ""
    for source in sources:
        if ipaddress.ip_address(source).version == version:
            return source
    return ""


def connect(reactor, address: str, port: int, host: str, options: ClientOptions) -> Deferred:
    """Connect to ``address``:``port`` (IPv4 or IPv6) for ``host``; fires when the session is ready.

    Fires with the ``SMTPClientProtocol`` once its ``ready`` fired (this
    consumes ``ready``), or errbacks with ``SessionError`` (stage "connect"
    when no TCP connection could be made within the connect timeout).
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

    try:
        ipv6 = ipaddress.ip_address(address).version == 6
    except ValueError:
        ipv6 = False
    endpoint_type = TCP6ClientEndpoint if ipv6 else TCP4ClientEndpoint
    bind = source_for(address, options.source)
    endpoint = endpoint_type(reactor, address, port, timeout=options.timeouts.connect,
                             bindAddress=(bind, 0) if bind else None)
    d = endpoint.connect(SMTPClientFactory(options, host, reactor))

    def connected(protocol: SMTPClientProtocol) -> Deferred:
        return protocol.ready

    def not_connected(failure: Failure) -> Failure:
        if failure.check(SessionError):
            return failure
        reason = network_reason(failure.value)
        log.info("cannot connect to {host} [{address}]:{port}: {error}", host=host, address=address, port=port, error=failure.getErrorMessage(), event="connect_failed")
        raise SessionError(None, True, STAGE_CONNECT, f"cannot connect to {host} [{address}]:{port}: {NETWORK_TEXT.get(reason, reason.value)}", reason)

    d.addCallback(connected)
    d.addErrback(not_connected)
    return d
