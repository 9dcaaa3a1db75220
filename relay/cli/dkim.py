"""``relay-dkim``: make DKIM keys and check them against the published records.

This module owns the command::

    relay-dkim genkey DOMAIN SELECTOR [--type rsa|ed25519] [--bits N] [--out FILE]
    relay-dkim check --config FILE [--nameserver IP[:PORT]]...

``genkey`` writes a new private key (PEM, mode 0600; an existing file is
never overwritten) and prints the TXT record to publish at
``SELECTOR._domainkey.DOMAIN`` and the ``[[dkim]]`` entry to configure.
``check`` loads every ``[[dkim]]`` key as the daemon does, looks up its
selector record through ``[delivery] nameservers`` (or ``--nameserver``;
the system resolver when neither is set) and says whether the published
key is the configured one.

Exit status: 0 when everything is in order, 1 when ``check`` found a
missing or different record, a DNS failure or an unusable key, 2 for a bad
option or configuration (one line on stderr).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from typing import NoReturn, Optional, Sequence, TextIO

from relay.config import load_config
from relay.config_values import ConfigError, domain_problem, selector_problem
from relay.domains import normalize_domain
from relay.dkim import ED25519, RSA, WEAK_RSA_BITS, DKIMKeyError, SigningKey, key_from_pem, load_key

PROG = "relay-dkim"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
FILE_MODE = 0o600
DEFAULT_RSA_BITS = 2048
TXT_STRING = 255  # octets of one character-string in a TXT record
RECORD_TTL = 3600


class UsageError(Exception):
    """A bad option or argument; ``str(error)`` is the one line to print."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Make DKIM keys and check them against DNS.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    genkey = commands.add_parser("genkey", help="write a new key and print the TXT record to publish")
    genkey.add_argument("domain", metavar="DOMAIN", help="the signing domain (d=)")
    genkey.add_argument("selector", metavar="SELECTOR", help="the selector (s=)")
    genkey.add_argument("--type", choices=(RSA, ED25519), default=RSA, help="key type (default rsa)")
    genkey.add_argument("--bits", type=int, default=DEFAULT_RSA_BITS, help="RSA key size (default 2048)")
    genkey.add_argument("--out", metavar="FILE", help="key file to create (default DOMAIN.SELECTOR.pem)")
    check = commands.add_parser("check", help="compare each configured key with its published record")
    check.add_argument("--config", metavar="FILE", required=True, help="the relay's TOML configuration")
    check.add_argument("--nameserver", metavar="IP[:PORT]", action="append", default=[],
                       help="DNS server to ask (repeatable); overrides [delivery] nameservers")
    return parser


# -- genkey ----------------------------------------------------------------------------


def generate_pem(kind: str, bits: int) -> bytes:
    """A new private key as unencrypted PKCS#8 PEM."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if kind == ED25519:
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())


def write_private(path: str, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never replacing a file) and make it durable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        raise UsageError(f"{path} exists; choose another --out (keys are never overwritten)") from None
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def zone_line(key: SigningKey) -> str:
    """The TXT record as a zone file line, split into strings of at most 255 octets."""
    value = key.txt_record()
    strings = [value[i:i + TXT_STRING] for i in range(0, len(value), TXT_STRING)]
    quoted = " ".join(f'"{part}"' for part in strings)
    return f"{key.record_name}. {RECORD_TTL} IN TXT ( {quoted} )"


def genkey(domain: str, selector: str, kind: str, bits: int, out: Optional[str], stdout: TextIO) -> int:
    problem = domain_problem(domain)
    if problem:
        raise UsageError(f"{domain!r} {problem}")
    domain, selector = normalize_domain(domain), selector.strip().lower()
    problem = selector_problem(selector)
    if problem:
        raise UsageError(f"{selector!r} {problem}")
    if kind == RSA and not 1024 <= bits <= 8192:
        raise UsageError(f"--bits {bits}: an RSA key for DKIM has 1024 to 8192 bits (2048 recommended)")
    path = out or f"{domain}.{selector}.pem"
    pem = generate_pem(kind, bits)
    key = key_from_pem(pem, domain, selector, path)
    write_private(path, pem)
    size = f"{key.bits}-bit " if kind == RSA else ""
    stdout.write(
        f"Wrote a new {size}{kind} key to {path} (mode 0600).\n"
        f"Publish this TXT record in the DNS zone of {domain}:\n\n"
        f"{zone_line(key)}\n\n"
        f"(in a DNS provider's form: name {key.record_name}, type TXT, value {key.txt_record()})\n\n"
        f"Then add to the relay's configuration and restart it:\n\n"
        f"[[dkim]]\n"
        f'domain = "{domain}"\n'
        f'selector = "{selector}"\n'
        f'private_key = "{os.path.abspath(path)}"\n'
    )
    return EXIT_OK


# -- check -----------------------------------------------------------------------------


def parse_record(text: str) -> dict[str, str]:
    """The tags of a DKIM key record (RFC 6376 3.6.1); {} when it is not one."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        if not equals:
            if part.strip():
                return {}
            continue
        tags[name.strip()] = "".join(value.split())
    if "v" in tags and tags["v"] != "DKIM1":
        return {}
    return tags if "p" in tags else {}


def _public_forms(key: SigningKey) -> set[bytes]:
    """The raw p= values that are this key (RSA: SubjectPublicKeyInfo or bare RSAPublicKey)."""
    forms = {base64.b64decode(key.public)}
    if key.kind == RSA:
        from cryptography.hazmat.primitives import serialization as s

        public = s.load_der_public_key(base64.b64decode(key.public))
        forms.add(public.public_bytes(s.Encoding.DER, s.PublicFormat.PKCS1))
    return forms


def compare(key: SigningKey, records: Sequence[str]) -> tuple[bool, str]:
    """Whether ``records`` (the TXT strings at the selector name) publish ``key``, and what to say."""
    tagged = [tags for tags in (parse_record(r) for r in records) if tags]
    if not tagged:
        return False, f"no DKIM key record found; publish: {key.txt_record()}"
    for tags in tagged:
        try:
            published = base64.b64decode(tags["p"], validate=True)
        except ValueError:
            continue
        if tags.get("k", RSA) == key.kind and published in _public_forms(key):
            hashes = tags.get("h")
            if hashes and "sha256" not in hashes.split(":"):
                return False, f"the record allows only h={hashes}; relay signs with sha256"
            return True, f"the published {key.kind} key matches {key.path}"
    if any(tags["p"] == "" for tags in tagged):
        return False, "the published key is revoked (empty p=)"
    return False, f"the published key is not the key in {key.path}; publish: {key.txt_record()}"


def check(config_path: str, nameservers: Sequence[tuple[str, int]], stdout: TextIO) -> int:
    from relay.routing.dns import ResolutionError, make_resolver, resolve_txt

    config = load_config(config_path)
    if not config.dkim:
        stdout.write(f"{config_path}: no [[dkim]] entries to check\n")
        return EXIT_FAILED
    resolver = make_resolver(tuple(nameservers) or config.delivery.nameservers)
    status = EXIT_OK
    for entry in config.dkim:
        name = f"{entry.selector}._domainkey.{entry.domain}"
        try:
            key = load_key(entry.private_key, entry.domain, entry.selector)
        except DKIMKeyError as e:
            stdout.write(f"FAIL {name}: dkim[{entry.index}].private_key {entry.private_key!r}: {e}\n")
            status = EXIT_FAILED
            continue
        try:
            records = resolve_txt(resolver, name)
        except ResolutionError as e:
            stdout.write(f"FAIL {name}: {e.text}\n")
            status = EXIT_FAILED
            continue
        ok, text = compare(key, records)
        stdout.write(f"{'ok  ' if ok else 'FAIL'} {name}: {text}\n")
        if key.kind == RSA and key.bits < WEAK_RSA_BITS:
            stdout.write(f"warn {name}: a {key.bits}-bit RSA key is weak; use {WEAK_RSA_BITS} bits or more\n")
        status = status if ok else EXIT_FAILED
    return status


# -- the command ---------------------------------------------------------------------


def run(argv: Sequence[str], stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> int:
    """Run ``relay-dkim argv``; return the exit status."""
    from relay.cli.route import UsageError as NameserverError, parse_nameserver

    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    try:
        options = _parser().parse_args(list(argv))
        if options.command == "genkey":
            return genkey(options.domain, options.selector, options.type, options.bits, options.out, stdout)
        nameservers = [parse_nameserver(n) for n in options.nameserver]
        return check(options.config, nameservers, stdout)
    except (UsageError, ConfigError, NameserverError) as e:
        stderr.write(f"{PROG}: {' '.join(str(e).split())}\n")
        return EXIT_USAGE


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Console entry point ``relay-dkim``."""
    raise SystemExit(run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
