"""SMTP on the wire: reply values, RFC 5321 address parsing, the inbound server and the outbound client."""
