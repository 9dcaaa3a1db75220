"""One next hop of a route as delivery uses it: its label, its session options, its pool key.

This module owns what delivery derives from a ``Target`` (one host and
address of a route's destination, as the resolver found it): the label
logs and outcomes show (``host_label``), why it could not carry the mail
(``unreachable_target``), the options of the SMTP session to it
(``session_options``, with the route's password read from its file by
``read_password``) and the key under which the pool shares connections
between identical sessions (``pool_key``).
"""

from __future__ import annotations

from twisted.python.failure import Failure

from relay.config import Config
from relay.connections import PoolKey
from relay.envelope import TLS_VERIFY, Route
from relay.outcome import Unreachable, unreachable
from relay.routing.mx import Target
from relay.smtp.transaction import ClientOptions
from relay.trust import TrustStore


def host_label(target: Target) -> str:
    """``mx1.example.test[192.0.2.1]``, or the bare address for a literal."""
    if target.host.startswith("[") or target.host == target.address:
        return f"[{target.address}]"
    return f"{target.host}[{target.address}]"


def unreachable_target(target: Target, failure: Failure) -> Unreachable:
    """Why ``target`` could not carry the mail (typed, never the exception's text)."""
    return unreachable(f"{host_label(target)}:{target.port}", host_label(target), failure)


# -- the session to it ------------------------------------------------------------


TEXT_PASSWORD_UNREADABLE = "cannot read password file {path}: {reason}"
TEXT_PASSWORD_EMPTY = "password file {path} is empty"


class PasswordError(Exception):
    """The password file of a route cannot be used; the text names the file only."""


def read_password(path: str) -> str:
    """The first line of ``path``, stripped; PasswordError naming the file (never its content)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError as e:
        raise PasswordError(TEXT_PASSWORD_UNREADABLE.format(path=path, reason=e.strerror or "error")) from None
    try:
        password = first.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise PasswordError(TEXT_PASSWORD_UNREADABLE.format(path=path, reason="not UTF-8")) from None
    if not password:
        raise PasswordError(TEXT_PASSWORD_EMPTY.format(path=path))
    return password


def session_options(
    config: Config, trust: TrustStore, route: Route, target: Target, password: str, verify: bool = False
) -> ClientOptions:
    """The session options: the route's TLS policy (``verify`` forces "verify"), for ``target.host``.

    The certificate is checked against the configured name of the next
    hop (the smart host's or MX host's name), never against an address.
    """
    return ClientOptions(
        hostname=config.hostname,
        tls=TLS_VERIFY if verify else route.tls,
        tls_hostname=target.host,
        ca_file=config.delivery.tls_ca_file,
        trust=trust,
        username=route.username,
        password=password,
        auth_in_clear=route.auth_in_clear,
        source=config.delivery.source_address,
    )


def pool_key(target: Target, options: ClientOptions, route: Route) -> PoolKey:
    """Connections are shared only between identical sessions: same peer, same TLS and AUTH."""
    return (
        target.address,
        target.port,
        options.hostname,
        options.tls,
        options.tls_hostname,
        options.ca_file,
        options.username,
        route.password_file,
        options.auth_in_clear,
        options.starttls,
    )
