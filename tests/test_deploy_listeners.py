"""``systemd:`` listeners at assembly: the socket systemd passed, or one line saying what is wrong.

Twisted's ``systemd:`` parser reads ``LISTEN_FDS`` once, at import; these
tests give it descriptors of their own (``ListenFDs``) instead of an
environment, and assemble the relay (one process) or the master of worker
processes on the memory reactor.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterator

import pytest
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, _SystemdParser
from twisted.internet.testing import MemoryReactorClock
from twisted.python.systemd import ListenFDs

from relay.config import Config, QueueConfig, ServerConfig
from relay.config_values import ConfigError
from relay.tap import build_master, build_relay


def config_for(tmp_path: Path, *listen: str, workers: int = 1) -> Config:
    return Config(hostname="relay.test", source="relay.toml",
                  server=ServerConfig(listen=listen, workers=workers),
                  queue=QueueConfig(directory=str(tmp_path / "q")))


@pytest.fixture
def passed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Descriptors 'passed by systemd': append to the list before assembling."""
    fds: list[int] = []

    class Passed(ListenFDs):
        def inheritedDescriptors(self) -> list[int]:
            return list(fds)

        def inheritedNamedDescriptors(self) -> dict[str, int]:
            return {"smtp": fds[0]} if fds else {}

    monkeypatch.setattr(_SystemdParser, "_sddaemon", Passed([]))
    yield fds


def test_a_passed_socket_of_the_named_family_is_adopted(tmp_path: Path, passed: list[int]) -> None:
    """domain=INET for an IPv4 socket: the listener adopts exactly that descriptor."""
    with socket.socket(socket.AF_INET) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        passed.append(s.fileno())
        relay = build_relay(config_for(tmp_path, "systemd:domain=INET:index=0"), MemoryReactorClock())
        [(description, listener)] = relay.listeners
        assert description == "systemd:domain=INET:index=0"
        assert isinstance(listener.endpoint, AdoptedStreamServerEndpoint)
        assert listener.endpoint.fileno == s.fileno()


def test_a_socket_of_another_family_is_a_config_error(tmp_path: Path, passed: list[int]) -> None:
    """An IPv6 socket read as domain=INET would garble addresses: one line naming the key and the fix."""
    try:
        s = socket.socket(socket.AF_INET6)
    except OSError as e:
        pytest.skip(f"no IPv6 sockets: {e}")
    with s:
        passed.append(s.fileno())
        with pytest.raises(ConfigError) as caught:
            build_relay(config_for(tmp_path, "systemd:domain=INET:index=0"), MemoryReactorClock())
    assert str(caught.value) == (
        "relay.toml: server.listen[0]: 'systemd:domain=INET:index=0' cannot be used: systemd passed an "
        "AF_INET6 socket (write domain=INET6; ListenStream=25 gives INET6 where IPv6 is on)")


def test_a_descriptor_that_is_no_socket_is_a_config_error(tmp_path: Path, passed: list[int]) -> None:
    """A descriptor that is not a socket at all is named in the line."""
    read, write = os.pipe()
    try:
        passed.append(read)
        with pytest.raises(ConfigError) as caught:
            build_relay(config_for(tmp_path, "systemd:domain=INET:index=0"), MemoryReactorClock())
        assert str(caught.value).startswith(
            f"relay.toml: server.listen[0]: 'systemd:domain=INET:index=0' cannot be used: descriptor {read}: ")
    finally:
        os.close(read)
        os.close(write)


def test_no_passed_socket_says_how_to_start_the_relay(tmp_path: Path, passed: list[int]) -> None:
    """Started without systemd's socket, the line says so instead of 'list index out of range'."""
    with pytest.raises(ConfigError) as caught:
        build_relay(config_for(tmp_path, "systemd:domain=INET:index=0"), MemoryReactorClock())
    assert "systemd passed no socket at that index (start the relay through its .socket unit" in str(caught.value)


def test_no_socket_of_that_name(tmp_path: Path, passed: list[int]) -> None:
    """A name= that systemd did not pass names FileDescriptorName=."""
    with pytest.raises(ConfigError) as caught:
        build_relay(config_for(tmp_path, "systemd:domain=INET:name=submission"), MemoryReactorClock())
    assert "systemd passed no socket named 'submission' (FileDescriptorName=" in str(caught.value)


def test_master_of_workers_refuses_the_same_way(tmp_path: Path, passed: list[int]) -> None:
    """With workers, the master builds its endpoints at assembly: the same one-line error, before any worker."""
    with pytest.raises(ConfigError) as caught:
        build_master(config_for(tmp_path, "systemd:domain=INET:index=0", workers=2), MemoryReactorClock(), [])
    assert str(caught.value).startswith("relay.toml: server.listen[0]: 'systemd:domain=INET:index=0' cannot be used: "
                                        "systemd passed no socket at that index")


def test_master_adopts_the_passed_socket(tmp_path: Path, passed: list[int]) -> None:
    """The master's endpoint for a systemd: listener is the passed descriptor (handed to workers once bound)."""
    with socket.socket(socket.AF_INET) as s:
        passed.append(s.fileno())
        master = build_master(config_for(tmp_path, "systemd:domain=INET:index=0", workers=2),
                              MemoryReactorClock(), [])
        [(description, endpoint)] = master.getServiceNamed("workers").endpoints
        assert description == "systemd:domain=INET:index=0"
        assert isinstance(endpoint, AdoptedStreamServerEndpoint) and endpoint.fileno == s.fileno()


# -- systemd-ssl: (relay.systemd) ---------------------------------------------------------


def test_systemd_ssl_adopts_the_socket_and_wraps_it_in_tls(tmp_path: Path, passed: list[int]) -> None:
    """systemd-ssl: is the passed socket with the TLS context ssl: builds from the same options."""
    from certs import make_certificate
    from relay.systemd import SystemdSSLEndpoint

    cert, key = make_certificate(tmp_path, "relay.test")
    with socket.socket(socket.AF_INET) as s:
        passed.append(s.fileno())
        description = f"systemd-ssl:domain=INET:index=0:privateKey={key}:certKey={cert}"
        relay = build_relay(config_for(tmp_path, description), MemoryReactorClock())
        [(_, listener)] = relay.listeners
        endpoint = listener.endpoint
        assert isinstance(endpoint, SystemdSSLEndpoint)
        assert endpoint.fileno == s.fileno() and endpoint.addressFamily == socket.AF_INET
        assert endpoint.context.getContext() is not None


def test_systemd_ssl_with_a_missing_key_file_is_refused_when_loading(tmp_path: Path) -> None:
    """The certificate is read while the file is loaded, even though no socket was passed yet."""
    from relay.config import config_from_mapping

    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"server": {"listen": [f"systemd-ssl:domain=INET6:index=0:privateKey={tmp_path}/no.pem"]}},
                            "relay.toml")
    assert str(caught.value).startswith("relay.toml: server.listen[0]: ")
    assert "No such file or directory" in str(caught.value)


def test_systemd_ssl_without_a_socket_loads_and_says_so_at_assembly(tmp_path: Path, passed: list[int]) -> None:
    """With a readable certificate but no socket, loading passes and assembly names the missing socket."""
    from certs import make_certificate
    from relay.config import config_from_mapping

    cert, key = make_certificate(tmp_path, "relay.test")
    description = f"systemd-ssl:domain=INET6:index=0:privateKey={key}:certKey={cert}"
    config = config_from_mapping({"server": {"listen": [description]},
                                  "queue": {"directory": str(tmp_path / "q")}}, "relay.toml")
    with pytest.raises(ConfigError) as caught:
        build_relay(config, MemoryReactorClock())
    assert "systemd passed no socket at that index" in str(caught.value)


def test_systemd_ssl_needs_a_domain() -> None:
    """Without domain= the string is not a valid endpoint, said in one line."""
    from relay.config_values import endpoint_problem

    assert endpoint_problem("systemd-ssl:index=0:privateKey=key.pem") == (
        "is not a valid endpoint: systemd-ssl needs domain= (INET or INET6, as for systemd:)")
