"""Listening sockets that systemd passed: the checks on them, and the ``systemd-ssl:`` endpoint type.

A ``systemd:`` (Twisted's) or ``systemd-ssl:`` listener adopts a socket
that systemd passed (``LISTEN_FDS``).  ``no_socket_reason`` says in the
administrator's terms why there was none; ``check_family`` refuses a socket
of another family than ``domain=`` names (read as the wrong family, client
addresses come out garbled and trusted_networks would not match them).

Implicit TLS:

Twisted's ``systemd:`` endpoint adopts a listening socket that systemd (a
``.socket`` unit) passed to the relay, but it carries no TLS, so on its own
it cannot serve SMTP over implicit TLS (submission on port 465).
``systemd-ssl:`` is the two together::

    systemd-ssl:domain=INET6:index=2:privateKey=/etc/relay/key.pem:certKey=/etc/relay/cert.pem

``domain``, ``index`` and ``name`` are those of ``systemd:``; every other
option is an option of ``ssl:`` (``privateKey``, ``certKey``,
``extraCertChain``, ``dhParameters``, ``sslmethod``), read by
``relay.server_tls.options_context`` as Twisted's ``ssl:`` parser reads
them, so both strings mean the same TLS.  The TLS
context is built before the socket is looked up: a bad certificate is
reported even where no socket was passed (when the configuration is
loaded).

The dropin ``twisted/plugins/relay_endpoints.py`` registers the parser with
Twisted, so ``serverFromString`` knows the prefix.  Twisted's plugin scan
imports this module, so it imports nothing of relay at its top.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

PREFIX = "systemd-ssl"
PASSED_SOCKET_TYPES = ("systemd", PREFIX)
SOCKET_OPTIONS = ("domain", "index", "name")  # those of systemd:, the rest are ssl:'s


def is_passed_socket(description: str) -> bool:
    """Whether the endpoint string ``description`` adopts a socket that systemd passed."""
    return description.split(":", 1)[0].strip() in PASSED_SOCKET_TYPES


def no_socket_reason(error: Exception) -> str:
    """Why a ``systemd:`` endpoint found no socket (its IndexError or KeyError), in the administrator's terms."""
    if isinstance(error, KeyError):
        return f"systemd passed no socket named {error} (FileDescriptorName= of the socket unit)"
    return ("systemd passed no socket at that index (start the relay through its .socket unit; "
            "LISTEN_FDS and LISTEN_PID must name this process)")


def check_family(endpoint: Any, where: str) -> None:
    """ConfigError (``where``: ...) unless the passed socket is of the family ``domain=`` names."""
    import os
    import socket

    from relay.config_values import ConfigError

    fd, family = getattr(endpoint, "fileno", None), getattr(endpoint, "addressFamily", None)
    if not isinstance(fd, int) or family is None:
        return
    try:
        copy = os.dup(fd)
        try:
            probe = socket.socket(fileno=copy)
        except OSError:
            os.close(copy)
            raise
    except OSError as e:
        raise ConfigError(f"{where}: descriptor {fd}: {e.strerror or e}") from None
    actual = probe.family
    probe.close()
    if actual != family:
        raise ConfigError(f"{where}: systemd passed an {actual.name} socket "
                          f"(write domain={actual.name[3:]}; ListenStream=25 gives INET6 where IPv6 is on)")


def split_options(options: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(the socket's options, the TLS options) of a ``systemd-ssl:`` endpoint."""
    socket = {key: value for key, value in options.items() if key in SOCKET_OPTIONS}
    tls = {key: value for key, value in options.items() if key not in SOCKET_OPTIONS}
    return socket, tls


@implementer(IStreamServerEndpoint)
class SystemdSSLEndpoint:
    """Listens with TLS on a socket systemd passed (``adopted``: Twisted's endpoint for it)."""

    def __init__(self, adopted: Any, context: Any) -> None:
        self.adopted = adopted
        self.context = context

    @property
    def fileno(self) -> int:
        return self.adopted.fileno

    @property
    def addressFamily(self) -> Any:
        return self.adopted.addressFamily

    def listen(self, factory: Any) -> Deferred:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return self.adopted.listen(TLSMemoryBIOFactory(self.context, False, factory))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class SystemdSSLParser:
    """``systemd-ssl:domain=...:index=...|name=...:privateKey=...[:certKey=...]``."""

    prefix = PREFIX

    def parseStreamServer(self, reactor: Any, *args: Any, **options: str) -> SystemdSSLEndpoint:
        from twisted.internet.endpoints import _SystemdParser

        if args:
            raise ValueError(f"{PREFIX} takes only key=value options (domain=, index= or name=, and those of ssl:)")
        from relay.server_tls import options_context

        socket, tls = split_options(options)
        if "domain" not in socket:
            raise ValueError(f"{PREFIX} needs domain= (INET or INET6, as for systemd:)")
        context = options_context(tls)
        return SystemdSSLEndpoint(_SystemdParser()._parseServer(reactor, **socket), context)
