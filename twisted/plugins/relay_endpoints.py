"""The dropin for relay's endpoint type ``systemd-ssl:`` (implicit TLS on a socket systemd passed)."""

from relay.systemd import SystemdSSLParser

relay_systemd_ssl = SystemdSSLParser()
