"""Reloading on SIGHUP (relay.reload): what a reload changes, and what it refuses to change.

The relay is assembled by ``build_relay`` on Twisted's memory reactor from a
real configuration file; the reload reads that file again through the same
``Options`` as start-up.  The SIGHUP handler itself is driven with a real
signal sent to this process (``signal.raise_signal``), then the reactor's
queued call runs.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent

from relay import reload as reload_module
from relay.envelope import ClientInfo, Recipient
from relay.reload import HangupService, RouteReloader, restart_keys
from relay.routing import RouteContext
from relay.tap import Options, build_relay


def write(path: Path, routes: str, extra: str = "") -> None:
    path.write_text(f'hostname = "relay.test"\n{extra}\n{routes}')


SMARTHOST_A = '[[routes]]\ndomains = ["example.net"]\nsmarthost = ["[127.0.0.2]:2525"]\n'
SMARTHOST_B = '[[routes]]\ndomains = ["example.net"]\nsmarthost = ["[127.0.0.3]:2525"]\n'
REJECT = '[[routes]]\ndomains = ["example.net"]\nreject = "closed"\n'


def route_of(relay: Any, address: str = "user@example.net") -> Any:
    results: list = []
    context = RouteContext(sender="a@example.org", client=ClientInfo(address="127.0.0.1"), size=0)
    relay.chain.route(Recipient(address=address), context).addBoth(results.append)
    return results[0]


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    caught: list[dict] = []
    monkeypatch.setattr(reload_module, "log", Logger(namespace="relay.reload", observer=caught.append))
    return caught


def assembled(tmp_path: Path, *args: str) -> tuple[Any, Options, Path]:
    path = tmp_path / "relay.toml"
    write(path, SMARTHOST_A, f'[queue]\ndirectory = "{tmp_path / "q"}"')
    options = Options()
    options.parseOptions(["--config", str(path), *args])
    return build_relay(options.config, MemoryReactorClock()), options, path


def test_reload_swaps_the_routes_of_the_running_chain(tmp_path: Path, events: list[dict]) -> None:
    """After the file changes, the same chain object (shared by delivery and RCPT) answers with the new routes."""
    relay, options, path = assembled(tmp_path)
    chain = relay.chain
    assert route_of(relay).hosts[0].host == "127.0.0.2"
    write(path, SMARTHOST_B, f'[queue]\ndirectory = "{tmp_path / "q"}"')
    assert RouteReloader(relay, options.read_config).reload() is True
    assert relay.chain is chain and relay.delivery._chain is chain
    assert route_of(relay).hosts[0].host == "127.0.0.3"
    assert relay.config.routes[0].smarthost == ("[127.0.0.3]:2525",)
    [line] = [formatEvent(e) for e in events]
    assert line == f"reload: 1 route(s) from {path} in use: routes[0]"


def test_reload_keeps_the_command_line_smarthost_last(tmp_path: Path, events: list[dict]) -> None:
    """--smarthost stays the catch-all after the reloaded file routes, as at start-up."""
    relay, options, path = assembled(tmp_path, "--smarthost", "[127.0.0.9]:25")
    write(path, REJECT, f'[queue]\ndirectory = "{tmp_path / "q"}"')
    assert RouteReloader(relay, options.read_config).reload() is True
    assert route_of(relay).kind == "reject"
    assert route_of(relay, "user@other.test").hosts[0].host == "127.0.0.9"
    assert relay.chain.rules == ("routes[0]", "routes[1]")


def test_a_file_that_does_not_load_changes_nothing(tmp_path: Path, events: list[dict]) -> None:
    """A broken file is one error line naming file and key; the routes in use stay."""
    relay, options, path = assembled(tmp_path)
    path.write_text('[[routes]]\ndomains = ["example.net"]\nsmarthost = ["bad host name!"]\n')
    assert RouteReloader(relay, options.read_config).reload() is False
    assert route_of(relay).hosts[0].host == "127.0.0.2"
    [line] = [formatEvent(e) for e in events]
    assert line.startswith(f"reload: {path}: routes[0].smarthost")
    assert line.endswith("; the routes in use stay as they were")


def test_an_unknown_plugin_changes_nothing(tmp_path: Path, events: list[dict]) -> None:
    """A route naming a plugin that is not installed is refused like at start-up."""
    relay, options, path = assembled(tmp_path)
    write(path, '[[routes]]\ndomains = ["example.net"]\nplugin = "no-such-plugin"\n')
    assert RouteReloader(relay, options.read_config).reload() is False
    assert route_of(relay).hosts[0].host == "127.0.0.2"
    assert "routes[0].plugin" in formatEvent(events[0])


def test_other_changed_keys_are_named_for_a_restart(tmp_path: Path, events: list[dict]) -> None:
    """Keys outside [[routes]] are not applied; the warning names each of them."""
    relay, options, path = assembled(tmp_path)
    write(path, SMARTHOST_A, f'[queue]\ndirectory = "{tmp_path / "elsewhere"}"\n[server]\nmax_recipients = 5\n')
    assert RouteReloader(relay, options.read_config).reload() is True
    assert relay.config.server.max_recipients == 1000
    assert formatEvent(events[-1]) == (
        f"reload: server.max_recipients, queue.directory changed in {path}; "
        "only a restart applies that (systemctl restart relay)")


def test_restart_keys_ignores_routes_and_source(tmp_path: Path) -> None:
    """Only settings other than the routes count as needing a restart."""
    relay, options, path = assembled(tmp_path)
    write(path, REJECT, f'[queue]\ndirectory = "{tmp_path / "q"}"')
    new = options.read_config()
    assert restart_keys(relay.config, new) == []
    path.write_text(f'hostname = "other.test"\n[queue]\ndirectory = "{tmp_path / "q"}"\n{REJECT}')
    assert restart_keys(relay.config, options.read_config()) == ["hostname"]


class ThreadedMemoryReactor(MemoryReactorClock):
    """The memory reactor with callFromThread: the call waits for the next turn of the loop."""

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.callLater(0, f, *args)


def test_sighup_runs_the_action_in_the_reactor_and_stop_restores_the_handler() -> None:
    """A real SIGHUP queues the action for the reactor's thread; after stop SIGHUP's old handler is back."""
    reactor = ThreadedMemoryReactor()
    calls: list[int] = []
    before = signal.getsignal(signal.SIGHUP)
    seen: list[int] = []
    signal.signal(signal.SIGHUP, lambda *_: seen.append(1))
    try:
        service = HangupService(reactor, lambda: calls.append(1))
        service.startService()
        signal.raise_signal(signal.SIGHUP)
        assert calls == []  # nothing runs inside the signal handler
        reactor.advance(0)
        assert calls == [1]
        service.stopService()
        signal.raise_signal(signal.SIGHUP)
        assert seen == [1] and calls == [1]
    finally:
        signal.signal(signal.SIGHUP, before)
