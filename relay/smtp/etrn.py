"""ETRN (RFC 1985): a client asks for the delivery of the mail queued for a domain.

``etrn`` reads the argument (a domain, ``@domain`` for its subdomains too;
``#queue`` names are not supported), refuses a client that is neither
trusted nor authenticated, and calls the listener's hook, which starts the
deliveries (``relay.queue.scheduler``'s flush, in every worker).  The
session decides when ETRN is allowed at all (after HELO, outside a
transaction).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure

from relay.config_values import domain_problem
from relay.domains import normalize_domain
from relay.log import Logger
from relay.smtp.replies import (
    ETRN_BAD_DOMAIN,
    ETRN_NO_QUEUE_NAMES,
    SYNTAX_ETRN,
    Answer,
    Reply,
    etrn_denied,
    etrn_started,
    etrn_unavailable,
)

# The sessions' own namespace: operators filter the inbound listener's lines by it.
log = Logger(namespace="relay.smtp.server")

EtrnHook = Callable[[str, bool], Any]  # (domain, subdomains) -> messages scheduled


def etrn(argument: str, allowed: bool, hook: Optional[EtrnHook], peer: str) -> Answer:
    """The answer to ``ETRN argument`` from ``peer`` (``allowed``: trusted or authenticated)."""
    node = argument.strip()
    if not node or " " in node:
        return SYNTAX_ETRN
    if node.startswith("#"):
        return ETRN_NO_QUEUE_NAMES
    subdomains = node.startswith("@")
    name = node[1:] if subdomains else node
    if domain_problem(name) is not None:
        return ETRN_BAD_DOMAIN
    if not allowed:
        return etrn_denied(name)
    if hook is None:
        return etrn_unavailable(name)
    domain = normalize_domain(name)
    started = maybeDeferred(hook, domain, subdomains)
    return started.addCallbacks(_started, _failed, callbackArgs=(name, subdomains, peer), errbackArgs=(name, peer))


def _started(count: Any, name: str, subdomains: bool, peer: str) -> Reply:
    log.info("ETRN {node} from {peer}: {count} message(s) scheduled now",
             node=("@" if subdomains else "") + name, peer=peer, count=count)
    return etrn_started(name)


def _failed(failure: Failure, name: str, peer: str) -> Reply:
    log.failure("ETRN {node} from {peer} failed", failure, node=name, peer=peer)
    return etrn_unavailable(name)
