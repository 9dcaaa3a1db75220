"""Tests for relay.tap and the dropin: options, overrides, start-up errors and the composition root."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.application.service import IServiceMaker
from twisted.internet import ssl
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.plugin import getPlugins

from relay import tap
from relay.config import Config, QueueConfig, RouteConfig, ServerConfig, default_hostname
from relay.config_values import ConfigError
from relay.queue.store import Spool
from relay.server_tls import build_tls_context
from relay.tap import Options, RelayService, build_relay, check_router_plugins

REPO = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def parsed(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def write_pem_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


# -- options -------------------------------------------------------------------


def test_no_options_means_the_defaults() -> None:
    """Without options the relay runs on the built-in defaults (loopback listener, ./relay-queue)."""
    config = parsed().config
    assert config == Config(hostname=default_hostname())
    assert config.server.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.queue.directory == "relay-queue"


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    """--listen (repeated) replaces the file's listeners; --queue and --hostname replace the file's values."""
    path = tmp_path / "relay.toml"
    path.write_text('hostname = "file.example"\n[server]\nlisten = ["tcp:25"]\n[queue]\ndirectory = "/q/file"\n')
    config = parsed(
        "--config", str(path), "--listen", "tcp:2600:interface=127.0.0.1", "--listen", "tcp:2601",
        "--queue", str(tmp_path / "q"), "--hostname", "cli.example",
    ).config
    assert config.server.listen == ("tcp:2600:interface=127.0.0.1", "tcp:2601")
    assert config.queue.directory == str(tmp_path / "q")
    assert config.hostname == "cli.example"
    assert config.source == str(path)


def test_file_values_stand_without_overrides(tmp_path: Path) -> None:
    """Keys the command line does not mention keep the file's values."""
    path = tmp_path / "relay.toml"
    path.write_text('hostname = "file.example"\n[server]\nlisten = ["tcp:25"]\n')
    config = parsed("--config", str(path)).config
    assert (config.hostname, config.server.listen) == ("file.example", ("tcp:25",))


def test_smarthost_option_appends_a_catch_all(tmp_path: Path) -> None:
    """--smarthost adds a "*" smart host route after the file's routes, so their rejects still apply."""
    path = tmp_path / "relay.toml"
    path.write_text('[[routes]]\ndomains = ["blocked.example"]\nreject = "no"\n')
    config = parsed("--config", str(path), "--smarthost", "upstream.example:587").config
    assert config.routes[0].reject == "no"
    assert config.routes[1] == RouteConfig(domains=("*",), smarthost=("upstream.example:587",), index=1)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--listen"], "relay: option --listen requires argument"),
        (["--colour", "blue"], "relay: option --colour not recognized"),
        (["--listen", "nonsense:1"], 'command line: --listen: "nonsense:1" is not a valid endpoint'),
        (["--smarthost", "host:port"], "command line: --smarthost: "),
    ],
)
def test_bad_option_is_one_line_and_status_2(args: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    """A bad option leaves with status 2 and one stderr line, without the usage page."""
    with pytest.raises(SystemExit) as caught:
        parsed(*args)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1 and "Usage" not in err


def test_bad_config_file_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A bad value in the file leaves with status 2 and the loader's one line naming file and key."""
    path = tmp_path / "relay.toml"
    path.write_text('[delivery]\nnameservers = ["dns.example"]\n')
    with pytest.raises(SystemExit) as caught:
        parsed("--config", str(path))
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith(f"{path}: delivery.nameservers[0]: ")


def test_unreadable_certificate_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A certificate file that cannot be read stops start-up with a line naming server.tls_certificate."""
    path = tmp_path / "relay.toml"
    path.write_text(f'[server]\ntls_certificate = "{tmp_path}/none.crt"\ntls_key = "{tmp_path}/none.key"\n')
    with pytest.raises(SystemExit):
        parsed("--config", str(path))
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: server.tls_certificate: cannot read ") and "No such file" in err


# -- TLS -----------------------------------------------------------------------


def test_tls_context_from_certificate_and_chain(tmp_path: Path) -> None:
    """A PEM certificate (followed by its chain) and its key give a TLS context offering TLS 1.2 or newer."""
    cert, key = write_pem_pair(tmp_path, "relay.test")
    chain = tmp_path / "chain.crt"
    chain.write_bytes(cert.read_bytes() + write_pem_pair(tmp_path, "ca.test")[0].read_bytes())
    options = build_tls_context(ServerConfig(tls_certificate=str(chain), tls_key=str(key)), "relay.toml")
    assert isinstance(options, ssl.CertificateOptions)
    assert options.getContext() is not None
    assert build_tls_context(ServerConfig(), "relay.toml") is None


@pytest.mark.parametrize("problem", ["not pem", "wrong key", "key is a certificate"])
def test_bad_tls_files_are_config_errors(tmp_path: Path, problem: str) -> None:
    """Unparseable certificates, keys that are not keys and mismatched pairs are one-line errors naming the key."""
    cert, key = write_pem_pair(tmp_path, "relay.test")
    other_cert, other_key = write_pem_pair(tmp_path, "other.test")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("hello\n")
    server, key_name = {
        "not pem": (ServerConfig(tls_certificate=str(garbage), tls_key=str(key)), "server.tls_certificate"),
        "wrong key": (ServerConfig(tls_certificate=str(cert), tls_key=str(other_key)), "server.tls_key"),
        "key is a certificate": (ServerConfig(tls_certificate=str(cert), tls_key=str(other_cert)), "server.tls_key"),
    }[problem]
    with pytest.raises(ConfigError) as caught:
        build_tls_context(server, "relay.toml")
    assert str(caught.value).startswith(f"relay.toml: {key_name}: ") and "\n" not in str(caught.value)


# -- plugins -------------------------------------------------------------------


def test_dropin_is_found_as_a_service_maker() -> None:
    """twisted.plugin finds the "relay" service maker in the repository's twisted/plugins dropin."""
    assert str(REPO) in [os.path.abspath(p) for p in sys.path]
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "relay" in makers
    assert makers["relay"].options is Options
    assert makers["relay"].makeService is tap.makeService


def test_unknown_router_plugin_stops_start_up() -> None:
    """A route naming a router plugin that is not installed is a one-line error naming routes[N].plugin."""
    config = Config(
        hostname="relay.test", source="relay.toml",
        routes=(RouteConfig(domains=("a.test",), reject="no", index=0),
                RouteConfig(domains=("b.test",), plugin="no-such-router", index=1)),
    )
    with pytest.raises(ConfigError) as caught:
        check_router_plugins(config)
    assert str(caught.value).startswith('relay.toml: routes[1].plugin: no router plugin named "no-such-router"')
    check_router_plugins(Config(hostname="relay.test"))  # no plugin routes: nothing to look up


# -- the composition root ------------------------------------------------------


def test_start_up_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up logs one line with the hostname, the listeners, the queue directory and the route count."""
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(tap, "log", Logger(namespace="relay.tap", observer=events.append))
    config = Config(hostname="relay.test", routes=(RouteConfig(domains=("*",), smarthost=("up.test",)),))
    service = RelayService(config)
    service.startService()
    service.stopService()
    lines = [formatEvent(e) for e in events]
    assert lines == [
        "relay relay.test starting: listening on tcp:2525:interface=127.0.0.1, submission on nothing, "
        "queue relay-queue, 1 configured route(s), source built-in defaults",
        "relay relay.test stopped",
    ]


def test_start_up_freezes_what_exists_and_sets_the_collector() -> None:
    """Once started, the relay's start-up objects are frozen and the young generation waits for 50,000 objects."""
    import gc

    from relay.runtime import GC_THRESHOLDS

    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    service = RelayService(Config(hostname="relay.test"))
    service.startService()
    try:
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        service.stopService()


def test_clean_stop_on_sigterm_exits_zero() -> None:
    """After a clean stop, the SIGTERM twistd would re-raise is cleared (exit 0); other signals are kept."""
    import signal

    class FakeReactor:
        _exitSignal: Any = None

    for received, kept in ((signal.SIGTERM, None), (signal.SIGINT, signal.SIGINT)):
        reactor = FakeReactor()
        service = RelayService(Config(hostname="relay.test"), reactor)
        service.startService()
        reactor._exitSignal = received
        service.stopService()
        assert reactor._exitSignal == kept


def test_build_relay_assembles_spool_then_listeners(tmp_path: Path) -> None:
    """build_relay puts the spool first, then one listener per endpoint, submission ones with their own factory."""
    reactor = MemoryReactorClock()
    config = Config(
        hostname="relay.test",
        server=ServerConfig(listen=("tcp:2525:interface=127.0.0.1", "tcp:2526"),
                            submission_listen=("tcp:2587",), auth_users=str(tmp_path / "users")),
        queue=QueueConfig(directory=str(tmp_path / "q")),
    )
    relay = build_relay(config, reactor)
    children = list(relay)
    assert children[0].name == "spool" and isinstance(relay.spool, Spool)
    assert [name for name, _ in relay.listeners] == ["tcp:2525:interface=127.0.0.1", "tcp:2526", "tcp:2587"]
    # The queue is recovered and the scheduler picks it up before any listener accepts mail;
    # listeners stop first, then the scheduler, then delivery's connections, the spool last.
    assert [s.name for s in children[1:]] == [
        "delivery", "scheduler", "control", "smtp:tcp:2525:interface=127.0.0.1", "smtp:tcp:2526", "submission:tcp:2587"]
    assert relay.policy.recipient_check is not None  # reject routes refuse at RCPT
    for _, listener in relay.listeners:
        listener.privilegedStartService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [(2525, "127.0.0.1"), (2526, ""), (2587, "")]
    factories = [factory for _, factory, _, _ in reactor.tcpServers]
    assert all(f.__class__.__name__ == "SMTPServerFactory" for f in factories)
    assert [f.submission for f in factories] == [False, False, True]
    assert all(f.spool is relay.spool and f.policy is relay.policy and f.clock is reactor for f in factories)
    # the spool's group commit counts the sessions of every listener (new messages wait for their company)
    assert factories[0].counts.admit("192.0.2.1", False) is None and factories[2].counts.admit("192.0.2.2", False) is None
    assert relay.spool._commits.company() == 2


def test_a_worker_of_several_commits_on_its_event_loop(tmp_path: Path) -> None:
    """One process keeps the store's writer thread; a worker with siblings writes on its reactor's thread."""
    config = Config(hostname="relay.test", server=ServerConfig(listen=("tcp:2525",)),
                    queue=QueueConfig(directory=str(tmp_path / "q")))
    alone = build_relay(config, MemoryReactorClock())
    worker = build_relay(config, MemoryReactorClock(), siblings=[str(tmp_path / "q" / "worker-1")])
    assert not alone.spool._threads._write_inline
    assert worker.spool._threads._write_inline


class BusyReactor(MemoryReactorClock):
    """A reactor on which every TCP port is taken."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_listener_that_cannot_bind_stops_start_up(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """A listener whose port is taken ends start-up with status 1 and one line on the original stderr."""
    config = Config(hostname="relay.test", server=ServerConfig(listen=("tcp:2525:interface=127.0.0.1",)),
                    queue=QueueConfig(directory=str(tmp_path / "q")))
    relay = build_relay(config, BusyReactor())
    _, listener = relay.listeners[0]
    with pytest.raises(SystemExit) as caught:
        listener.privilegedStartService()
    assert caught.value.code == 1
    err = capfd.readouterr().err
    assert err.startswith("relay: cannot listen on tcp:2525:interface=127.0.0.1: ") and "already in use" in err
    assert err.count("\n") == 1


def test_endpoint_that_cannot_be_built_is_a_config_error(tmp_path: Path) -> None:
    """A systemd endpoint outside systemd passes the loader but stops assembly with a line naming the key."""
    config = Config(hostname="relay.test", source="relay.toml",
                    server=ServerConfig(listen=("tcp:2525", "systemd:domain=INET:index=7")),
                    queue=QueueConfig(directory=str(tmp_path / "q")))
    with pytest.raises(ConfigError) as caught:
        build_relay(config, MemoryReactorClock())
    assert str(caught.value).startswith("relay.toml: server.listen[1]: 'systemd:domain=INET:index=7' cannot be used: ")


# -- through twistd (real subprocesses) ----------------------------------------


def run_twistd(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*TWISTD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_twistd_help_lists_every_option(tmp_path: Path) -> None:
    """`twistd relay --help` documents --config, --listen, --queue, --hostname and --smarthost."""
    result = run_twistd(["relay", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--config=", "--listen=", "--queue=", "--hostname=", "--smarthost="):
        assert option in result.stdout
    assert "catch-all" in result.stdout


def test_twistd_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    """`twistd -n relay --config bad.toml` exits non-zero with one stderr line naming file and key, no traceback."""
    (tmp_path / "bad.toml").write_text('[server]\nmax_message_size = "lots"\n')
    result = run_twistd(["-n", "relay", "--config", "bad.toml"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == 'bad.toml: server.max_message_size: "lots" is not a size (use e.g. 35MB, 10MiB, 1000000)\n'
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "relay-queue").exists() and not (tmp_path / "twistd.pid").exists()


def test_parts_stop_one_after_another_in_reverse_order() -> None:
    """The relay stops its parts in reverse start order, each only after the previous one has finished."""
    from twisted.application.service import Service
    from twisted.internet.defer import Deferred

    events: list[str] = []
    pending: dict[str, Deferred] = {}

    class Part(Service):
        def stopService(self) -> Deferred:
            super().stopService()
            events.append(f"stop {self.name}")
            pending[self.name] = Deferred()
            return pending[self.name]

    relay = RelayService(Config(hostname="relay.test"))
    for name in ("spool", "scheduler", "listener"):
        part = Part()
        part.setName(name)
        part.setServiceParent(relay)
    relay.startService()
    finished: list = []
    relay.stopService().addBoth(finished.append)
    assert events == ["stop listener"]
    pending["listener"].callback(None)
    assert events == ["stop listener", "stop scheduler"]
    pending["scheduler"].callback(None)
    assert events == ["stop listener", "stop scheduler", "stop spool"] and finished == []
    pending["spool"].callback(None)
    assert finished == [None]
