"""The files in contrib/systemd: systemd accepts them, and they say what the README promises.

``systemd-analyze verify`` (Debian package systemd) checks the units as
systemd would load them, drop-in included; it needs no running systemd.
ExecStart names ``/opt/relay/.venv/bin/twistd``, which verify requires to
exist, so the check runs on a copy that names this test run's twistd.  Any
line verify prints (an unknown key is only a warning to it) fails the test.
The other tests read the units as text: the hardening, the stop and
reload signals, the sockets, and that ExecStart's options and the shipped
relay.toml are accepted by the relay itself.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import load_config
from relay.tap import Options
from relayproc import REPO

UNITS = REPO / "contrib" / "systemd"
INSTALLED_TWISTD = "/opt/relay/.venv/bin/twistd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def unit_lines(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given (keys repeat in unit files), comments left out."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def local_copy(tmp_path: Path) -> Path:
    """contrib/systemd copied with ExecStart naming the twistd next to this Python."""
    target = tmp_path / "units"
    shutil.copytree(UNITS, target)
    twistd = Path(sys.executable).parent / "twistd"
    if not twistd.exists():
        pytest.skip(f"no twistd next to {sys.executable}")
    service = target / "relay.service"
    service.write_text(service.read_text().replace(INSTALLED_TWISTD, str(twistd)))
    return target


def verify(units: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:", SYSTEMD_LOG_LEVEL="notice")
    return subprocess.run([SYSTEMD_ANALYZE, "verify", str(units / "relay.service"), str(units / "relay.socket")],
                          env=env, capture_output=True, text=True, timeout=120)


needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)")


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """relay.service (with the socket-activation drop-in) and relay.socket verify with no complaint at all."""
    result = verify(local_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_systemd_analyze_verify_finds_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key in the drop-in is reported."""
    units = local_copy(tmp_path)
    dropin = units / "relay.service.d" / "socket-activation.conf"
    dropin.write_text(dropin.read_text() + "AmbientCapabilites=\n")
    result = verify(units)
    assert "AmbientCapabilites" in result.stdout + result.stderr


def test_service_runs_unprivileged_and_hardened() -> None:
    """The service: user relay, CAP_NET_BIND_SERVICE only, read-only system but the spool, private /tmp."""
    service = unit_lines(UNITS / "relay.service")
    assert service["Service.User"] == ["relay"] and service["Service.Group"] == ["relay"]
    assert service["Service.CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert service["Service.AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert service["Service.NoNewPrivileges"] == ["yes"]
    assert service["Service.ProtectSystem"] == ["strict"]
    assert service["Service.ReadWritePaths"] == ["/var/spool/relay"]
    assert service["Service.PrivateTmp"] == ["yes"]
    assert set(service["Service.RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["Service.Restart"] == ["on-failure"]
    assert service["Service.RestartPreventExitStatus"] == ["2"]  # a configuration error


def test_stop_is_sigterm_to_the_main_process_and_reload_is_sighup() -> None:
    """systemctl stop sends SIGTERM to twistd only (it stops its workers itself); reload sends SIGHUP."""
    service = unit_lines(UNITS / "relay.service")
    assert service["Service.KillSignal"] == ["SIGTERM"]
    assert service["Service.KillMode"] == ["mixed"]
    assert service["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert float(service["Service.TimeoutStopSec"][0]) > 30 + 10  # workers' stop timeout, then the drain


def test_exec_start_options_are_the_relays(tmp_path: Path) -> None:
    """ExecStart runs twistd in the foreground without a pid file, with options relay accepts."""
    [command] = unit_lines(UNITS / "relay.service")["Service.ExecStart"]
    argv = shlex.split(command)
    assert argv[0] == INSTALLED_TWISTD
    assert "--nodaemon" in argv and "--pidfile=" in argv
    relay_args = argv[argv.index("relay") + 1:]
    assert relay_args[relay_args.index("--config") + 1] == "/etc/relay/relay.toml"
    config = tmp_path / "relay.toml"
    shutil.copy(UNITS / "relay.toml", config)
    relay_args[relay_args.index("--config") + 1] = str(config)
    options = Options()
    options.parseOptions(relay_args)
    assert options.config is not None and options.config.queue.directory == "/var/spool/relay"


def test_socket_unit_passes_smtp_and_submission_in_order() -> None:
    """relay.socket listens on 25 then 587 (descriptors 3 and 4, index 0 and 1) and starts relay.service."""
    sockets = unit_lines(UNITS / "relay.socket")
    assert sockets["Socket.ListenStream"] == ["25", "587"]
    assert sockets["Socket.Accept"] == ["no"]
    assert sockets["Socket.Service"] == ["relay.service"]


def test_socket_activation_dropin_takes_every_capability_away() -> None:
    """With the drop-in, the service needs relay.socket and keeps no capability."""
    dropin = unit_lines(UNITS / "relay.service.d" / "socket-activation.conf")
    assert dropin["Service.CapabilityBoundingSet"] == [""]
    assert dropin["Service.AmbientCapabilities"] == [""]
    assert dropin["Unit.Requires"] == ["relay.socket"]


def test_shipped_configuration_loads_and_names_the_spool() -> None:
    """contrib/systemd/relay.toml is a valid configuration whose queue is the unit's writable path."""
    config = load_config(str(UNITS / "relay.toml"))
    service = unit_lines(UNITS / "relay.service")
    assert config.queue.directory in service["Service.ReadWritePaths"]
    assert config.server.listen == ("tcp:25",)


def test_sysusers_and_tmpfiles_make_the_user_and_the_spool() -> None:
    """sysusers.d makes the user relay; tmpfiles.d makes /var/spool/relay owned by it, closed to others."""
    users = [line.split() for line in (UNITS / "relay.sysusers").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert users[0][:2] == ["u", "relay"]
    dirs = {fields[1]: fields for fields in (line.split() for line in (UNITS / "relay.tmpfiles").read_text().splitlines()
                                             if line.strip() and not line.startswith("#"))}
    assert dirs["/var/spool/relay"][:5] == ["d", "/var/spool/relay", "0750", "relay", "relay"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers or systemd-tmpfiles is not installed (Debian package systemd)")
def test_sysusers_and_tmpfiles_run_in_a_scratch_root(tmp_path: Path) -> None:
    """Applied with --root to an empty tree, the two files make the user relay and its closed spool."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for command in (["systemd-sysusers", f"--root={root}", str(UNITS / "relay.sysusers")],
                    ["systemd-tmpfiles", f"--root={root}", "--create", str(UNITS / "relay.tmpfiles")]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    [entry] = [line.split(":") for line in (root / "etc" / "passwd").read_text().splitlines()
               if line.startswith("relay:")]
    uid, gid, home, shell = int(entry[2]), int(entry[3]), entry[5], entry[6]
    assert uid != 0 and home == "/var/spool/relay" and shell.endswith("nologin")
    spool = (root / "var" / "spool" / "relay").stat()
    assert (spool.st_uid, spool.st_gid, spool.st_mode & 0o777) == (uid, gid, 0o750)
    etc = (root / "etc" / "relay").stat()
    assert (etc.st_uid, etc.st_gid, etc.st_mode & 0o777) == (0, gid, 0o750)
