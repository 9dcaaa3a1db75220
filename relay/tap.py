"""twistd glue and the composition root: ``twistd -n relay [options]``.

This module owns the command-line options of the ``relay`` twistd plugin,
the merge of those options over the configuration file, and the assembly
of the running relay from its parts.  It is the only place that chooses the
reactor (and with it the clock); every other module has them injected.

A bad configuration file or a bad option ends the command with exit status
2 and one line on stderr naming the file (or option), the key and what is
wrong: twistd's own handling of ``usage.UsageError`` would print the whole
usage text first, so ``Options.parseOptions`` turns the error into that
single line and ``SystemExit`` itself.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn, Optional, Sequence

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet import ssl
from twisted.internet.endpoints import serverFromString
from relay.log import Logger, daemon_observer, filtered, set_level
from twisted.python import usage

from relay.config import (
    COMMAND_LINE,
    Config,
    apply_overrides,
    load_config,
)
from relay.config_values import ConfigError
from relay.server_tls import build_tls_context
from relay.services import Closing, Listener, StoreService
from relay.runtime import tune_collector
from relay.trust import load_trust

log = Logger()

EXIT_USAGE = 2  # bad configuration or option
PROGRAM = "relay"


def _exit_with(line: str) -> NoReturn:
    """Print one line to stderr and leave with the usage exit status."""
    sys.stderr.write(" ".join(line.split()) + "\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USAGE)


class Options(usage.Options):
    """Options of ``twistd relay``; after parsing, ``self.config`` is the merged Config."""

    synopsis = "[--config FILE] [--listen ENDPOINT]... [--queue DIR] [--hostname NAME] [--smarthost HOST[:PORT]]"
    longdesc = (
        "A mail transfer agent: accepts mail over SMTP, spools it durably and "
        "relays it by direct MX, a smart host or a source route. Without any "
        "option it listens on tcp:2525:interface=127.0.0.1, spools to "
        "./relay-queue and relays for loopback clients. Options given here "
        "override the configuration file."
    )
    optParameters = [
        ["config", None, None,
         "TOML configuration file; without it every key has its default."],
        ["queue", None, None,
         "Spool directory (overrides [queue] directory; default ./relay-queue)."],
        ["hostname", None, None,
         "Host name used in the banner, EHLO and Received headers "
         "(overrides hostname; default: the machine's FQDN)."],
        ["smarthost", None, None,
         "Send all mail to HOST[:PORT] (A/AAAA, never MX): a catch-all route "
         "appended after the file's [[routes]], so it takes only the recipients "
         "that no configured route matched."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.config: Optional[Config] = None

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint string to accept SMTP on, e.g. tcp:25 or tcp:2525:interface=127.0.0.1; repeat for several; when given, replaces [server] listen."""
        self["listen"].append(endpoint)

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Parse, or leave the process with one line on stderr and status 2."""
        self.args = list(sys.argv[1:] if options is None else options)  # handed on to worker processes
        try:
            super().parseOptions(options)
        except ConfigError as e:
            _exit_with(str(e))
        except usage.UsageError as e:
            _exit_with(f"{PROGRAM}: {e} (see twistd {PROGRAM} --help)")

    def postOptions(self) -> None:
        """Load the file, apply the command-line overrides and check what start-up needs."""
        config = self.read_config()
        build_tls_context(config.server, config.source or COMMAND_LINE)
        from relay.auth import check_files

        check_files(config.server, config.source or COMMAND_LINE)
        check_router_plugins(config)
        check_dkim_keys(config)
        self.config = config

    def read_config(self) -> Config:
        """The configuration file with the command-line options over it (at start-up and on SIGHUP)."""
        path = self["config"]
        config = load_config(path) if path else Config()
        return apply_overrides(
            config,
            listen=self["listen"] or None,
            queue=self["queue"],
            hostname=self["hostname"],
            smarthost=self["smarthost"],
        )


# -- start-up checks -----------------------------------------------------------


def check_router_plugins(config: Config) -> None:
    """Every ``plugin = "NAME"`` route names an installed, well-formed router plugin."""
    wanted = [route for route in config.routes if route.plugin]
    if not wanted:
        return
    from relay.routing.plugins import PluginError, find_router_factory

    for route in wanted:
        try:
            find_router_factory(route.plugin)
        except PluginError as e:
            raise ConfigError(f"{config.source or COMMAND_LINE}: routes[{route.index}].plugin: {e}") from None


def check_dkim_keys(config: Config) -> None:
    """Every ``[[dkim]]`` key is readable, private to its owner and usable (ConfigError otherwise)."""
    if config.dkim:
        from relay.dkim import load_keys

        load_keys(config)


# -- the composition root ------------------------------------------------------


class RelayService(MultiService):
    """The running relay: its parts as attributes, their services as children.

    Children start in the order they were added (the spool first, so the
    queue is recovered before any listener accepts mail) and stop in reverse.
    """

    def __init__(self, config: Config, reactor: Any = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.spool: Any = None
        self.inbound: Any = None  # the spool as the listeners write into it (DKIM-signing with [[dkim]])
        self.policy: Any = None
        self.tls_context: Optional[ssl.CertificateOptions] = None
        self.listeners: list[tuple[str, Listener]] = []
        self.chain: Any = None
        self.resolver: Any = None
        self.delivery: Any = None
        self.scheduler: Any = None
        self.metrics: Any = None  # relay.metrics.Metrics while metrics are counted
        self.log_observer: Any = None  # the daemon's text log, offered to twistd
        self.inherited: dict = {}  # listener description -> socket handed down (a worker)
        self.siblings: list[str] = []  # the other workers' parts of the queue (a worker)

    def setServiceParent(self, parent: Any) -> None:
        """Join twistd's application, offering it the relay's own text log observer."""
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        config = self.config
        log.info(
            "relay {hostname} starting: listening on {listen}, submission on {submission}, "
            "queue {queue}, {routes} configured route(s), source {source}",
            hostname=config.hostname,
            listen=", ".join(config.server.listen) or "nothing",
            submission=", ".join(config.server.submission_listen) or "nothing",
            queue=config.queue.directory,
            routes=len(config.routes),
            source=config.source or "built-in defaults",
        )
        super().startService()
        tune_collector()  # what start-up made stays; the collector walks only what comes after

    def stopService(self) -> Any:
        """Stop the parts one after another, in reverse start order.

        MultiService would stop every child at once; here the listeners
        finish their sessions (a commit in flight still gets its 250 or 451)
        before the scheduler drains, delivery closes its connections, and the
        spool, last, waits for its pending disk work.
        """
        Service.stopService(self)
        d: Deferred = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(lambda _, child=child: maybeDeferred(child.stopService))
            d.addErrback(self._stop_failed, child)
        d.addCallback(self._stopped_cleanly)
        return d

    @staticmethod
    def _stop_failed(failure: Any, child: Any) -> None:
        log.failure("stopping {name} failed", failure, name=getattr(child, "name", child))

    def _stopped_cleanly(self, result: Any) -> Any:
        """After a clean stop on SIGTERM, exit 0.

        twistd re-raises the terminating signal once the reactor has stopped,
        so the exit status would say "killed by SIGTERM".  For an MTA, SIGTERM
        is the ordinary way to stop (init systems send it), and every part
        has stopped in order by now: nothing was lost, so the status is 0.
        """
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        log.info("relay {hostname} stopped", hostname=self.config.hostname)
        return result


def _add_metrics(relay: RelayService, reactor: Any) -> None:
    """Metrics first: counting starts before any other part logs, and the endpoint stops last."""
    from relay.metrics import add_metrics

    add_metrics(relay, reactor)


def _add_spool(relay: RelayService, reactor: Any) -> None:
    from relay.queue.store import Spool

    # A worker of several commits on its event loop (relay.queue.threads): measured with two
    # workers, the writer thread's hand-offs cost more CPU than the other worker's turn while one waits.
    relay.spool = Spool(relay.config.queue.directory, clock=reactor, write_inline=bool(relay.siblings))
    service = StoreService(relay.spool)
    service.setName("spool")
    service.setServiceParent(relay)


def _endpoint(reactor: Any, description: str, where: str, inherited: Optional[dict] = None) -> Any:
    """The server endpoint for ``description``; a failure is a ConfigError at ``where``.

    In a worker process, a listener the master bound is the socket it handed down.
    """
    if inherited and description in inherited:
        from relay.workers import InheritedEndpoint

        return InheritedEndpoint(reactor, inherited[description], description)
    from relay import systemd

    passed = systemd.is_passed_socket(description)
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:
        if passed and isinstance(e, (IndexError, KeyError)):
            reason = systemd.no_socket_reason(e)
        else:
            reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{where}: {description!r} cannot be used: {reason}") from None
    if passed:
        systemd.check_family(endpoint, f"{where}: {description!r} cannot be used")
    return endpoint


def _add_routing(relay: RelayService, reactor: Any) -> None:
    """The router chain (built now, so a bad plugin or option stops start-up) and DNS."""
    from relay.routing import build_chain
    from relay.routing.mx import MXResolver

    config = relay.config
    relay.chain = build_chain(config)
    relay.resolver = MXResolver(config.delivery.nameservers, clock=reactor)


def _add_delivery(relay: RelayService, reactor: Any) -> None:
    """Delivery and the scheduler: every committed message is attempted at once."""
    from relay.delivery import Delivery
    from relay.queue.scheduler import Scheduler

    trust = load_trust(relay.config)
    relay.delivery = Delivery(relay.config, relay.chain, relay.resolver, relay.spool, reactor, trust=trust)
    closing = Closing(relay.delivery)
    closing.setName("delivery")
    closing.setServiceParent(relay)
    relay.scheduler = Scheduler(
        relay.spool, relay.delivery, reactor, config=relay.config.queue, hostname=relay.config.hostname
    )
    relay.scheduler.setName("scheduler")
    relay.scheduler.setServiceParent(relay)
    relay.spool.on_commit(relay.scheduler.enqueue)


def _add_control(relay: RelayService, reactor: Any) -> None:
    """The control socket in the spool directory: relay-queue reaches the scheduler through it."""
    from relay.control import ControlService

    service = ControlService(relay.spool.directory, relay.scheduler, reactor)
    service.setName("control")
    service.setServiceParent(relay)


def _auth_parts(config: Config, reactor: Any) -> tuple[Any, Any]:
    """The AUTH portal and the sender login map of [server], each None when not configured.

    Password checks (scrypt) and file reads run in the reactor's thread pool.
    """
    from twisted.internet.threads import deferToThreadPool

    from relay.auth import SenderLoginMap, build_portal

    def runner(f: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    server = config.server
    portal = build_portal(server.auth_users, runner) if server.auth_users else None
    sender_logins = SenderLoginMap(server.sender_login_map, runner) if server.sender_login_map else None
    return portal, sender_logins


def _add_signing(relay: RelayService, reactor: Any) -> None:
    """DKIM signing of mail as it enters the queue, in a thread of its own (see relay.dkim)."""
    from relay.dkim import SigningThread, signing_spool

    thread = SigningThread(reactor)
    relay.inbound = signing_spool(relay.spool, relay.config, thread)
    if relay.inbound is not relay.spool:
        closing = Closing(thread)  # stops after the listeners, whose commits wait for their signatures
        closing.setName("dkim")
        closing.setServiceParent(relay)


def _add_listeners(relay: RelayService, reactor: Any) -> None:
    from relay.policy import RelayPolicy
    from relay.routing import rcpt_check
    from relay.smtp.limits import ClientLimits
    from relay.smtp.factory import SMTPServerFactory

    config = relay.config
    portal, sender_logins = _auth_parts(config, reactor)
    limits = ClientLimits(config.server, reactor)  # connection rate and AUTH failures, across listeners
    relay.policy = RelayPolicy(config.server, recipient_check=rcpt_check(relay.chain, config.hostname),
                               sender_logins=sender_logins)
    relay.tls_context = build_tls_context(config.server, config.source or COMMAND_LINE)
    etrn = getattr(relay.scheduler, "flush", None)  # (domain, subdomains) -> messages scheduled
    if etrn is not None and relay.siblings:
        etrn = _flush_everywhere(etrn, relay.siblings)
    factories = []
    relay.spool.watch_sessions(lambda: sum(factory.sessions for factory in factories))
    for submission, endpoints in ((False, config.server.listen), (True, config.server.submission_listen)):
        key = "server.submission_listen" if submission else "server.listen"
        for index, description in enumerate(endpoints):
            endpoint = _endpoint(reactor, description, f"{config.source or COMMAND_LINE}: {key}[{index}]",
                                 relay.inherited)
            factory = SMTPServerFactory(
                config.hostname, config.server, relay.inbound or relay.spool, relay.policy, reactor,
                tls_context=relay.tls_context, submission=submission, portal=portal, etrn=etrn,
                limits=limits,
            )
            factories.append(factory)
            service = Listener(description, endpoint, factory)
            service.setName(("submission:" if submission else "smtp:") + description)
            service.setServiceParent(relay)
            relay.listeners.append((description, service))


def _flush_everywhere(flush: Any, siblings: Sequence[str]) -> Any:
    """ETRN in one worker: flush here, and ask the daemons of the other parts of the queue to flush too."""
    from twisted.internet.threads import deferToThread

    from relay import control

    def everywhere(domain: Optional[str] = None, subdomains: bool = False) -> int:
        for directory in siblings:
            d = deferToThread(control.call, directory, control.Flush, domain=domain, subdomains=subdomains)
            d.addErrback(lambda f, directory=directory: log.warn(
                "ETRN: cannot reach the worker of {directory}: {error}", directory=directory, error=f.getErrorMessage()))
        return flush(domain, subdomains)

    return everywhere


def build_relay(config: Config, reactor: Any, inherited: Optional[dict] = None,
                siblings: Sequence[str] = ()) -> RelayService:
    """Assemble the relay from ``config``; ``reactor`` is also the clock.

    Each part is added by one small function, in start-up order; later parts
    (scheduler, routing, delivery) are further functions in this list.  In a
    worker process, ``inherited`` maps listener descriptions to the sockets
    the master handed down, and ``siblings`` are the other workers' parts of
    the queue (ETRN reaches them too).
    """
    relay = RelayService(config, reactor)
    relay.inherited = inherited or {}
    relay.siblings = list(siblings)
    for add in (_add_metrics, _add_spool, _add_routing, _add_delivery, _add_control, _add_signing, _add_listeners):
        add(relay, reactor)
    return relay


def makeService(options: Options) -> IService:
    """twistd's entry point: the relay on the global reactor."""
    from twisted.internet import reactor

    config = options.config if options.config is not None else Config()
    set_level(config.log.level)
    observer = daemon_observer(getattr(options, "parent", None), reactor, config.log.format)
    try:
        if config.server.workers > 1:
            return build_master(config, reactor, getattr(options, "args", []), observer)
        relay = build_relay(config, reactor)
    except ConfigError as e:
        _exit_with(str(e))
    relay.log_observer = filtered(observer) if observer is not None else None
    add_reload(relay, reactor, options)
    return relay


def add_reload(relay: RelayService, reactor: Any, options: Options, baseline: Optional[Config] = None) -> None:
    """SIGHUP re-reads the routes of ``relay`` from the file ``options`` name (relay.reload)."""
    from relay.reload import HangupService, RouteReloader

    reloader = RouteReloader(relay, options.read_config, baseline)
    HangupService(reactor, reloader.reload).setServiceParent(relay)


def build_master(config: Config, reactor: Any, relay_args: Sequence[str], observer: Any = None) -> RelayService:
    """The master of ``[server] workers`` processes: it binds the listeners and supervises the workers."""
    from relay.metrics import add_master_metrics
    from relay.workers import Supervisor

    master = RelayService(config, reactor)
    master.log_observer = filtered(observer) if observer is not None else None
    try:
        metrics_dir = add_master_metrics(master, reactor)
    except ConfigError as e:
        _exit_with(str(e))
    supervisor = Supervisor(config, reactor, relay_args, observer, metrics_dir=metrics_dir)
    supervisor.setServiceParent(master)
    from relay.reload import HangupService

    HangupService(reactor, supervisor.hangup).setServiceParent(master)
    return master
