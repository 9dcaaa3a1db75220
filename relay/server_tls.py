"""The server's TLS contexts, built by relay from certificate and key files.

This module owns the TLS contexts the SMTP server offers:

* ``build_tls_context``: ``[server] tls_certificate`` and ``tls_key`` as the
  context of STARTTLS (the certificate file may hold the chain after the
  server's certificate; the key must not be encrypted; TLS 1.2 the minimum),
  every problem a ConfigError naming the file and key.  The composition
  root builds it once at start-up.
* ``options_context`` and ``listener_context``: the context of an implicit
  TLS listener (``ssl:``, and ``systemd-ssl:`` of ``relay.systemd``) from
  the options of its endpoint string, meaning what Twisted's ``ssl:`` parser
  makes of them, so a worker serving a socket its master bound, and a socket
  systemd passed, get the same TLS as an ``ssl:`` listener.

Certificates are read through ``relay.trust.load_certificates``, the one PEM
loader.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import ssl
from twisted.python.filepath import FilePath

from relay.config import ServerConfig
from relay.config_values import ConfigError
from relay.trust import load_certificates


def _read_bytes(path: str, source: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)
        raise ConfigError(f"{source}: {key}: cannot read {path!r}: {reason}") from None


def build_tls_context(server: ServerConfig, source: str) -> Optional[ssl.CertificateOptions]:
    """The server TLS context from server.tls_certificate and tls_key, or None.

    The certificate file may hold the chain after the server's certificate.
    TLS 1.2 is the minimum.  Any problem is a ConfigError naming the key.
    """
    if not server.tls_certificate:
        return None
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert_key, key_key = "server.tls_certificate", "server.tls_key"
    cert_pem = _read_bytes(server.tls_certificate, source, cert_key)
    try:
        chain = load_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"{source}: {cert_key}: {server.tls_certificate!r} holds no readable PEM certificate") from None
    key_pem = _read_bytes(server.tls_key, source, key_key)
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{source}: {key_key}: {server.tls_key!r} holds no readable PEM private key (it must not be encrypted)"
        ) from None
    try:
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
        options.getContext()
    except Exception:
        raise ConfigError(f"{source}: {key_key}: the key does not match server.tls_certificate") from None
    return options


# -- implicit TLS listeners (ssl:, systemd-ssl:) -------------------------------

SSL_PREFIXES = ("ssl", "systemd-ssl")  # listener types whose connections start with TLS
# The options of Twisted's ssl: endpoint, in the order its positional arguments take (after the port).
SSL_OPTIONS = ("privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain", "dhParameters")
DEFAULT_PRIVATE_KEY = "server.pem"  # ssl:'s default


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def options_context(options: dict[str, str]) -> ssl.CertificateOptions:
    """The server TLS context of the ``ssl:`` options ``options``, as Twisted's ``ssl:`` builds it.

    ``privateKey`` (default ``server.pem``) is the key file, ``certKey``
    (default: the key file) the certificate, ``extraCertChain`` a file of
    chain certificates, ``dhParameters`` a Diffie-Hellman parameter file,
    ``sslmethod`` the name of an ``OpenSSL.SSL`` method; ``interface`` and
    ``backlog`` belong to the socket.  Certificates are read by
    ``relay.trust.load_certificates``.  A file that cannot be read raises
    OSError; an unknown option or unusable content, ValueError.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from OpenSSL import SSL

    unknown = sorted(set(options) - set(SSL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown TLS option {unknown[0]}= (known: {', '.join(SSL_OPTIONS)})")
    private_key = options.get("privateKey", DEFAULT_PRIVATE_KEY)
    cert_key = options.get("certKey", private_key)
    pem = _read_file(cert_key) + b"\n" + _read_file(private_key)
    try:
        certificate = load_certificates(pem)[0]
    except ValueError:
        raise ValueError(f"no readable PEM certificate in {cert_key}") from None
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"no readable PEM private key in {private_key} (it must not be encrypted)") from None
    chain = None
    if "extraCertChain" in options:
        try:
            chain = load_certificates(_read_file(options["extraCertChain"]))
        except ValueError:
            raise ValueError(f"Specified chain file '{options['extraCertChain']}' doesn't contain any "
                             "valid certificates in PEM format.") from None
    extra: dict[str, Any] = {}
    if "sslmethod" in options:
        extra["method"] = getattr(SSL, options["sslmethod"])
    dh = options.get("dhParameters")
    context = ssl.CertificateOptions(
        privateKey=key,
        certificate=certificate,
        extraCertChain=chain,
        dhParameters=ssl.DiffieHellmanParameters.fromFile(FilePath(dh)) if dh is not None else None,
        **extra,
    )
    try:
        context.getContext()
    except SSL.Error:
        raise ValueError(f"the private key in {private_key} does not match the certificate in {cert_key}") from None
    return context


def listener_context(description: str) -> ssl.CertificateOptions:
    """The TLS context of an ``ssl:`` or ``systemd-ssl:`` listener description (a worker serving a
    socket its master bound builds only the TLS); ValueError for another type."""
    from twisted.internet.endpoints import _parse

    args, options = _parse(description)
    kind, positional = args[0].strip(), args[2:]  # ssl: takes the port first
    if kind == "systemd-ssl":
        from relay.systemd import split_options

        options, positional = split_options(options)[1], []
    elif kind != "ssl":
        raise ValueError(f"{description!r} is not an implicit TLS listener")
    named = dict(zip(SSL_OPTIONS, positional))
    return options_context({**named, **options})
