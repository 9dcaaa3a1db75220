"""SIGHUP: the running relay re-reads its routes (``systemctl reload relay``).

This module owns what a reload does.  On SIGHUP the relay reads its
configuration file again, exactly as at start-up (the command-line options
still apply, ``--smarthost`` included), and when the whole file is valid it
replaces the rules of its router chain with the new ``[[routes]]``: the
next RCPT check and the next delivery attempt of every queued message use
them (an attempt already in flight finishes on the route it has).  A file
that does not load, or a route that cannot be built, changes nothing: one
error line says why, and the routes in use stay.

Every other key (listeners, TLS, AUTH, trusted networks, the queue,
delivery limits, workers) is fixed at start-up: a reload that finds one of
them changed names it in a warning, and a restart applies it (SIGTERM is
graceful and the queue is on disk, so a restart loses nothing).

The master of worker processes passes SIGHUP on to every worker; each
worker reloads its own chain.
"""

from __future__ import annotations

import signal
from dataclasses import fields, is_dataclass, replace
from typing import Any, Callable, Optional

from twisted.application.service import Service

from relay.config import COMMAND_LINE, Config
from relay.config_values import ConfigError
from relay.log import Logger

log = Logger(namespace="relay.reload")

NOT_RELOADED = ("routes", "source")  # routes are what a reload applies; source is not a setting


def restart_keys(old: Config, new: Config) -> list[str]:
    """The keys other than ``[[routes]]`` whose values differ between ``old`` and ``new``."""
    changed = []
    for top in fields(Config):
        if top.name in NOT_RELOADED:
            continue
        before, after = getattr(old, top.name), getattr(new, top.name)
        if is_dataclass(before) and is_dataclass(after):
            changed += [f"{top.name}.{f.name}" for f in fields(before)
                        if getattr(before, f.name) != getattr(after, f.name, None)]
        elif before != after:
            changed.append(top.name)
    return changed


class RouteReloader:
    """Re-reads the configuration with ``read_config`` and swaps the routes of ``relay``'s chain.

    ``baseline`` is the configuration as read at start-up (before a worker's
    share of the limits was taken), against which changed keys are named.
    """

    def __init__(self, relay: Any, read_config: Callable[[], Config], baseline: Optional[Config] = None) -> None:
        self.relay = relay
        self.read_config = read_config
        self.baseline = baseline if baseline is not None else relay.config

    def reload(self) -> bool:
        """Apply the file's routes now; False (and one error line) when it cannot be."""
        from relay.routing import build_chain
        from relay.tap import check_router_plugins

        source = self.baseline.source or COMMAND_LINE
        try:
            new = self.read_config()
            candidate = replace(self.relay.config, routes=new.routes)
            check_router_plugins(candidate)
            chain = build_chain(candidate)
        except ConfigError as e:
            log.error("reload: {error}; the routes in use stay as they were", error=str(e))
            return False
        except Exception:
            log.failure("reload: reading {source} failed; the routes in use stay as they were", source=source)
            return False
        self.relay.chain.replace_rules(chain)
        self.relay.config = candidate
        restart = restart_keys(self.baseline, new)
        self.baseline = replace(self.baseline, routes=new.routes)
        log.info("reload: {count} route(s) from {source} in use: {rules}", count=len(new.routes),
                 source=source, rules=", ".join(chain.rules) or "direct MX for every domain")
        if restart:
            log.warn("reload: {keys} changed in {source}; only a restart applies that (systemctl restart relay)",
                     keys=", ".join(restart), source=source)
        return True


class HangupService(Service):
    """While running, every SIGHUP calls ``action`` in the reactor's thread.

    Without it SIGHUP would end the process at once, bypassing the graceful stop.
    """

    name = "reload"

    def __init__(self, reactor: Any, action: Callable[[], Any]) -> None:
        self.reactor = reactor
        self.action = action
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._received)

    def _received(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._act)  # nothing else in a signal handler

    def _act(self) -> None:
        log.info("SIGHUP received: reloading the routes")
        self.action()

    def stopService(self) -> None:
        super().stopService()
        previous, self._previous = self._previous, None
        signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)
