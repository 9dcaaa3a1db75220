"""A small authoritative DNS server on loopback, serving a test zone given as data.

Integration tests resolve mail domains against this server with dnspython,
so routing and delivery are exercised over real UDP and TCP sockets without
touching the outside world.

Run it as a process::

    python tests/dnsserver.py ZONEFILE

``ZONEFILE`` is JSON mapping names to their records::

    {
      "example.test": {"MX": [[10, "mx1.example.test"], [20, "mx2.example.test"]]},
      "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"], "TTL": 60},
      "alias.test": {"CNAME": "example.test"},
      "nullmx.test": {"MX": [[0, "."]]},
      "servfail.test": "SERVFAIL",
      "slow.test": "TIMEOUT"
    }

Record types are ``A``, ``AAAA``, ``MX`` (``[preference, exchange]`` pairs;
``"."`` is the root, for a null MX), ``TXT`` (strings, one record each; a
string over 255 octets is sent as several character-strings of one record) and
``CNAME`` (one target).  ``TTL``
(seconds, default ``DEFAULT_TTL``) applies to every record of the name.  A
name mapped to ``"SERVFAIL"`` answers SERVFAIL; ``"TIMEOUT"`` never answers.
Names absent from the data answer NXDOMAIN; a name present without the asked
type answers NOERROR with an empty answer and an SOA whose minimum is the
name's TTL (NODATA, negatively cacheable for that TTL).  A CNAME is answered
together with the records of its target found in the zone, as a recursive
resolver would.  Every query is written to stderr as ``query NAME TYPE``.

The server listens on 127.0.0.1, UDP and TCP on the same ephemeral port,
prints that port on its first stdout line and runs until SIGTERM.

Tests use ``start_dns_server(zone, directory)`` (or the ``dns_server``
context manager), which runs the process and returns ``(port, stop)``.
This module does not import pytest, so it also runs on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Union

DEFAULT_TTL = 300
START_TIMEOUT = 10.0  # seconds to wait for the port line
STOP_TIMEOUT = 5.0  # seconds to wait for exit after SIGTERM
BIND_ATTEMPTS = 20

SERVFAIL = "SERVFAIL"
TIMEOUT = "TIMEOUT"

Zone = dict[str, Union[str, dict[str, Any]]]


# -- the test-side helper ---------------------------------------------------------


class DNSServerError(RuntimeError):
    """The DNS server process did not start."""


def start_dns_server(zone: Zone, directory: Union[str, Path]) -> tuple[int, Callable[[], None]]:
    """Start the server for ``zone`` and return ``(port, stop)``.

    The zone is written as JSON into ``directory`` (a test's ``tmp_path``),
    along with the server's stderr (``dnsserver.log``, one line per query).
    Waits at most ``START_TIMEOUT`` seconds for the port and raises
    ``DNSServerError`` with the server's stderr otherwise.  ``stop()`` ends
    the process by its PID; calling it again does nothing.
    """
    directory = Path(directory)
    zone_file = directory / "zone.json"
    zone_file.write_text(json.dumps(zone), encoding="utf-8")
    log_path = directory / "dnsserver.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(zone_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )

    def stop() -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        if process.stdout is not None and not process.stdout.closed:
            process.stdout.close()

    try:
        port = _read_port(process, START_TIMEOUT)
    except DNSServerError as e:
        stop()
        raise DNSServerError(f"{e}; server stderr:\n{_tail(log_path)}") from None
    return port, stop


@contextlib.contextmanager
def dns_server(zone: Zone, directory: Union[str, Path]) -> Iterator[int]:
    """Run the server for ``zone`` for the duration of a ``with`` block; yields the port."""
    port, stop = start_dns_server(zone, directory)
    try:
        yield port
    finally:
        stop()


def _read_port(process: subprocess.Popen, timeout: float) -> int:
    """Read the first stdout line of ``process`` within ``timeout`` seconds."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DNSServerError(f"no port line within {timeout:g} s")
            if not selector.select(remaining):
                continue
            chunk = os.read(process.stdout.fileno(), 64)
            if not chunk:
                raise DNSServerError(f"server exited with status {process.wait()}")
            line += chunk
    try:
        return int(line.strip())
    except ValueError:
        raise DNSServerError(f"unexpected first line {line!r}") from None


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# -- the server ------------------------------------------------------------------


def _name(text: str) -> str:
    """Lower-case, dot-free key for a name of the zone."""
    return text.strip().rstrip(".").lower()


def _wire_name(text: str) -> bytes:
    """The name as bytes for twisted.names; ``"."`` is the root."""
    name = _name(text)
    return name.encode("idna") if name else b""


def _character_strings(text: str) -> list[bytes]:
    """A TXT value as the character-strings of one record (at most 255 octets each)."""
    data = text.encode("utf-8")
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def _records(zone: Zone, name: str, qtype: int, depth: int = 0) -> list:
    """The RRHeaders answering ``name``/``qtype``, following CNAMEs inside the zone."""
    from twisted.names import dns

    entry = zone.get(name)
    if not isinstance(entry, dict) or depth > 8:
        return []
    ttl = int(entry.get("TTL", DEFAULT_TTL))
    owner = _wire_name(name)
    if "CNAME" in entry and qtype != dns.CNAME:
        target = entry["CNAME"]
        target = target[0] if isinstance(target, list) else target
        header = dns.RRHeader(owner, dns.CNAME, dns.IN, ttl, dns.Record_CNAME(_wire_name(target), ttl))
        return [header] + _records(zone, _name(target), qtype, depth + 1)
    makers = {
        dns.A: ("A", lambda v: dns.Record_A(v, ttl)),
        dns.AAAA: ("AAAA", lambda v: dns.Record_AAAA(v, ttl)),
        dns.MX: ("MX", lambda v: dns.Record_MX(int(v[0]), _wire_name(v[1]), ttl)),
        dns.CNAME: ("CNAME", lambda v: dns.Record_CNAME(_wire_name(v), ttl)),
        dns.TXT: ("TXT", lambda v: dns.Record_TXT(*_character_strings(v), ttl=ttl)),
    }
    if qtype not in makers:
        return []
    key, make = makers[qtype]
    values = entry.get(key, [])
    if isinstance(values, str):
        values = [values]
    return [dns.RRHeader(owner, qtype, dns.IN, ttl, make(v)) for v in values]


def _soa(zone: Zone, name: str) -> list:
    """The SOA sent with a NODATA answer: its TTL and minimum are the name's TTL."""
    from twisted.names import dns

    entry = zone.get(name)
    ttl = int(entry.get("TTL", DEFAULT_TTL)) if isinstance(entry, dict) else DEFAULT_TTL
    soa = dns.Record_SOA(b"ns.test", b"hostmaster.test", 1, 3600, 600, 86400, ttl, ttl)
    return [dns.RRHeader(_wire_name(name), dns.SOA, dns.IN, ttl, soa, auth=True)]


def make_resolver(zone: Zone):
    """An authority for twisted.names.server answering from ``zone``."""
    from twisted.internet import defer
    from twisted.names import common, error

    zone = {_name(k): v for k, v in zone.items()}

    class ServerFailure(Exception):
        """Answered as SERVFAIL (twisted.names maps DomainError subclasses to NXDOMAIN)."""

    class ZoneAuthority(common.ResolverBase):
        def _lookup(self, name, cls, type, timeout):
            key = _name(name.decode("ascii", "replace") if isinstance(name, bytes) else str(name))
            print(f"query {key} {type}", file=sys.stderr, flush=True)
            entry = zone.get(key)
            if entry == SERVFAIL:
                return defer.fail(ServerFailure(key))
            if entry == TIMEOUT:
                return defer.Deferred()
            if entry is None:
                return defer.fail(error.AuthoritativeDomainError(key))
            answers = _records(zone, key, type)
            return defer.succeed((answers, [] if answers else _soa(zone, key), []))

    return ZoneAuthority()


def _listen(reactor, factory) -> int:
    """Bind UDP on an ephemeral port of 127.0.0.1, then TCP on the same number."""
    from twisted.internet.error import CannotListenError
    from twisted.names import dns

    for _ in range(BIND_ATTEMPTS):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        return port
    raise SystemExit(f"could not bind UDP and TCP on one port in {BIND_ATTEMPTS} attempts")


def main(argv: list[str]) -> int:
    """Serve the zone named on the command line until SIGTERM."""
    if len(argv) != 2:
        print("usage: dnsserver.py ZONEFILE", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        zone = json.load(f)

    from twisted.internet import reactor
    from twisted.names import server

    factory = server.DNSServerFactory(authorities=[make_resolver(zone)])
    factory.noisy = False
    port = _listen(reactor, factory)
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
