"""Configuration values: reading one value, and the error that names its file and key.

This module owns what a configuration value may be, independent of the
section it stands in: the typed readers (strings, integers, arrays, tables,
choices, durations, sizes, domain names and patterns, ``host[:port]``, name
servers, source addresses, networks, Twisted endpoints, CA files), the
checks the command-line tools share (``parse_duration``, ``parse_size``,
``parse_hostport``, ``domain_problem``, ``domain_pattern_problem``,
``endpoint_problem``, ``selector_problem``) and ``ConfigError``.  A reader
takes the value and a ``_Where`` (file and dotted key) and either returns the
value checked and normalised or raises a ``ConfigError`` whose one line names
the file, the key and what is wrong.  The readers are named with a leading
underscore: they are the tools of the loader (``relay.config``, which knows
the sections and keys), not an interface for the rest of relay.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar, Union

from relay.domains import DomainError, DomainPattern, ip_literal, to_ascii

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(Exception):
    """A configuration problem; ``str(error)`` is the one line to show."""


# -- value parsers shared by the loader and the command line ------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``.

    Raises ValueError with a short reason.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        unit = text[-1:] if text[-1:] in _DURATION_UNITS else "s"
        number = text[:-1] if text[-1:] in _DURATION_UNITS else text
        try:
            seconds = float(number) * _DURATION_UNITS[unit]
        except ValueError:
            raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 4h, 5d)") from None
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"{value!r} is not a positive duration")
    return seconds


def parse_size(value: Any) -> int:
    """Octets from a number or a string like ``"10MB"`` (10**7) or ``"10MiB"`` (10 * 2**20)."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        octets = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        i = len(text)
        while i and not text[i - 1].isdigit() and text[i - 1] != ".":
            i -= 1
        number, unit = text[:i], text[i:]
        if unit not in _SIZE_UNITS or not number:
            raise ValueError(f"{value!r} is not a size (use e.g. 35MB, 10MiB, 1000000)")
        try:
            octets = int(float(number) * _SIZE_UNITS[unit])
        except ValueError:
            raise ValueError(f"{value!r} is not a size (use e.g. 35MB, 10MiB, 1000000)") from None
    else:
        raise ValueError(f"expected a size, got {type(value).__name__}")
    if octets < 0:
        raise ValueError(f"{value!r} is not a positive size")
    return octets


def parse_hostport(value: str, default_port: Optional[int] = None) -> tuple[str, Optional[int]]:
    """Split ``host[:port]``; ``[v6]:port`` and bare IPv6 literals are understood."""
    text = value.strip()
    if not text:
        raise ValueError("empty host")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']'")
        if not rest:
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        return text, default_port  # a bare name or a bare IPv6 address
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{value!r}: port {port} out of range")
    return host, port


# -- where a value stands, and how an error shows it ---------------------------

_T = TypeVar("_T")

DNS_PORT = 53

_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "a boolean",
    list: "an array", dict: "a table",
}
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _show(value: Any) -> str:
    """A value as an operator wrote it in TOML, shortened for one line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value: Any) -> str:
    for kind in (bool, str, int, float, list, dict):
        if isinstance(value, kind):
            return _TYPE_NAMES[kind]
    return "a " + type(value).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Where:
    """The file and the dotted key of one value, so errors can name both."""

    def __init__(self, source: str, key: str = "") -> None:
        self.source = source
        self.key = key

    def child(self, name: str) -> "_Where":
        return _Where(self.source, f"{self.key}.{name}" if self.key else name)

    def item(self, index: int) -> "_Where":
        return _Where(self.source, f"{self.key}[{index}]")

    def fail(self, what: str) -> NoReturn:
        prefix = f"{self.source}: {self.key}: " if self.key else f"{self.source}: "
        raise ConfigError(_one_line(prefix + what))


# -- typed values --------------------------------------------------------------


def _string(value: Any, where: _Where, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        where.fail(f"expected a string, got {_type_name(value)} {_show(value)}")
    if not allow_empty and not value.strip():
        where.fail("must not be empty")
    return value


def _integer(value: Any, where: _Where, low: int = 1, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        where.fail(f"expected an integer, got {_type_name(value)} {_show(value)}")
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        where.fail(f"{value} is out of range (must be {bounds})")
    return value


def _array(value: Any, where: _Where, non_empty: bool = False) -> list:
    if not isinstance(value, list):
        where.fail(f"expected an array, got {_type_name(value)} {_show(value)}")
    if non_empty and not value:
        where.fail("must not be an empty array")
    return value


def _each(value: Any, where: _Where, parse: Callable[[Any, _Where], _T], non_empty: bool = False) -> tuple[_T, ...]:
    return tuple(parse(item, where.item(i)) for i, item in enumerate(_array(value, where, non_empty)))


def _table(value: Any, where: _Where, known: Sequence[str]) -> dict:
    if not isinstance(value, dict):
        where.fail(f"expected a table, got {_type_name(value)} {_show(value)}")
    for key in value:
        if key not in known:
            where.child(key).fail(f"unknown key (known keys here: {', '.join(known)})")
    return value


def _choice(value: Any, where: _Where, choices: Sequence[str]) -> str:
    text = _string(value, where)
    if text not in choices:
        where.fail(f"{_show(value)} is not one of {', '.join(choices)}")
    return text


def _requote(message: str, value: Any) -> str:
    """Show the value in a parser's message as TOML writes it."""
    return message.replace(repr(value), _show(value)) if isinstance(value, str) else message


def _duration(value: Any, where: _Where) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        where.fail(_requote(str(e), value))
    if not math.isfinite(seconds) or seconds <= 0:
        where.fail(f"{_show(value)} must be a positive, finite duration")
    return seconds


def _size(value: Any, where: _Where) -> int:
    try:
        octets = parse_size(value)
    except ValueError as e:
        where.fail(_requote(str(e), value))
    if octets <= 0:
        where.fail(f"{_show(value)} must be a positive size")
    return octets


def _positive(value: Any, where: _Where) -> int:
    return _integer(value, where, low=1)


def _port(value: Any, where: _Where) -> int:
    return _integer(value, where, low=1, high=65535)


# -- names, addresses, endpoints -----------------------------------------------


def domain_problem(name: str) -> Optional[str]:
    """Why ``name`` is not a usable domain name, or None when it is."""
    text = name.strip().rstrip(".")
    if not text:
        return "is an empty domain name"
    try:
        ascii_name = to_ascii(text)
    except DomainError as e:
        return f"is not a valid domain name: {e}"
    if len(ascii_name) > 253:
        return "is longer than 253 characters"
    if not all(_LABEL.match(label) for label in ascii_name.split(".")):
        return "is not a valid domain name"
    return None


def _address_literal_problem(text: str) -> Optional[str]:
    try:
        if ip_literal(text) is None:
            raise ValueError(text)
    except ValueError:
        return "is not a valid address literal (use e.g. [192.0.2.1] or [IPv6:2001:db8::1])"
    return None


def domain_pattern_problem(text: str) -> Optional[str]:
    """Why ``text`` is not a domain pattern ("a.test", ".a.test", "*"), or None."""
    pattern = text.strip()
    if pattern == "*":
        return None
    if pattern.startswith("*"):
        return 'is not a domain pattern (write ".a.test" for the subdomains of a.test, "*" for every domain)'
    if pattern.startswith("["):
        return _address_literal_problem(pattern)
    return domain_problem(pattern[1:] if pattern.startswith(".") else pattern)


def _checked_text(value: Any, where: _Where, problem_of: Callable[[str], Optional[str]]) -> str:
    """A non-empty string, stripped, that ``problem_of`` finds nothing wrong with (else it names the key)."""
    text = _string(value, where, allow_empty=False).strip()
    problem = problem_of(text)
    if problem:
        where.fail(f"{_show(value)} {problem}")
    return text


def _pattern(value: Any, where: _Where) -> str:
    return DomainPattern(_checked_text(value, where, domain_pattern_problem)).text


def _hostname(value: Any, where: _Where) -> str:
    return _checked_text(value, where, domain_problem)


def _host_problem(host: str) -> Optional[str]:
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return domain_problem(host)


def _hostport(value: Any, where: _Where, port_allowed: bool = True) -> str:
    """A ``host[:port]`` string, checked and returned stripped."""
    text = _string(value, where, allow_empty=False).strip()
    try:
        host, port = parse_hostport(text)
    except ValueError as e:
        where.fail(_requote(str(e), text))
    problem = _host_problem(host)
    if problem:
        where.fail(f"{_show(value)}: host {_show(host)} {problem}")
    if port is not None and not port_allowed:
        where.fail(f"{_show(value)}: a port is only possible on the first hop")
    return text


def _nameserver(value: Any, where: _Where) -> tuple[str, int]:
    text = _string(value, where, allow_empty=False).strip()
    try:
        host, port = parse_hostport(text, DNS_PORT)
        address = ipaddress.ip_address(host)
    except ValueError:
        where.fail(f"{_show(value)} is not a name server (use an IP address, e.g. 192.0.2.53, 192.0.2.53:5353 or [2001:db8::53]:53)")
    return str(address), port if port is not None else DNS_PORT


def _source_address(value: Any, where: _Where) -> str:
    text = _string(value, where, allow_empty=False).strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        where.fail(f"{_show(value)} is not an IP address (use e.g. 192.0.2.25 or 2001:db8::25)")
    return str(address)


def _source_addresses(value: Any, where: _Where) -> tuple[str, ...]:
    """One local address or a list of them, at most one per IP version."""
    addresses = (_source_address(value, where),) if isinstance(value, str) else _each(value, where, _source_address)
    versions = [ipaddress.ip_address(a).version for a in addresses]
    if len(set(versions)) != len(versions):
        where.fail("give at most one IPv4 and one IPv6 address")
    return addresses


def _network(value: Any, where: _Where) -> IPNetwork:
    text = _string(value, where, allow_empty=False).strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        where.fail(f"{_show(value)} is not an IP network (use e.g. 192.0.2.0/24, 2001:db8::/32 or 192.0.2.7)")
    where.fail(f"{_show(value)} has host bits set (did you mean {loose}?)")


_PARSE_ONLY = object()  # endpoints are parsed, never listened on, while loading


def endpoint_problem(description: str) -> Optional[str]:
    """Why ``description`` is not a Twisted server endpoint string, or None.

    The endpoint is built (files such as ``ssl:`` certificates are read) but
    nothing listens.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(_PARSE_ONLY, description)
    except (IndexError, KeyError) as e:  # systemd: finds no socket by index (or by name)
        from relay.systemd import is_passed_socket

        if is_passed_socket(description):
            return None  # the socket is only there when systemd starts the relay
        if isinstance(e, KeyError):
            return f"is not a valid endpoint: {e} is not known"
        return "is not a valid endpoint: an index is out of range"
    except Exception as e:  # any failure of a parser plugin means a bad string
        return f"is not a valid endpoint: {_one_line(str(e)) or type(e).__name__}"
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"is not a valid endpoint: port {port} out of range"
    return None


def _endpoint(value: Any, where: _Where) -> str:
    return _checked_text(value, where, endpoint_problem)


# -- readers of the shapes the sections use ------------------------------------

_Parser = Callable[[Any, _Where], Any]


def _endpoints(value: Any, where: _Where) -> tuple[str, ...]:
    return _each(value, where, _endpoint)


def _networks(value: Any, where: _Where) -> tuple[IPNetwork, ...]:
    return _each(value, where, _network)


def _patterns(value: Any, where: _Where) -> tuple[str, ...]:
    return _each(value, where, _pattern)


def _nameservers(value: Any, where: _Where) -> tuple[tuple[str, int], ...]:
    return _each(value, where, _nameserver)


def _path(value: Any, where: _Where) -> str:
    return _string(value, where)


def _bool_value(value: Any, where: _Where) -> bool:
    if not isinstance(value, bool):
        where.fail(f"expected true or false, got {_type_name(value)} {_show(value)}")
    return value


def _ca_file(value: Any, where: _Where) -> str:
    """A readable PEM bundle holding at least one certificate, or "" (the system store)."""
    path = _string(value, where)
    if not path:
        return path
    try:
        with open(path, "rb") as f:
            content = f.read(16 * 1024 * 1024)
    except OSError as e:
        where.fail(f"{_show(value)}: cannot read: {_os_error_text(e)}")
    if b"-----BEGIN CERTIFICATE-----" not in content:
        where.fail(f"{_show(value)} holds no PEM certificate")
    return path


def selector_problem(selector: str) -> Optional[str]:
    """Why ``selector`` cannot be a DKIM selector (s=), or None when it can."""
    if not all(_LABEL.match(label) for label in selector.lower().split(".")):
        return "is not a selector (DNS labels of letters, digits, '-' and '_', with dots between them)"
    return None


def _os_error_text(error: OSError) -> str:
    if error.errno is not None and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error)
