"""TLS for outgoing SMTP (RFC 3207 STARTTLS), beyond qmail-remote(8), which has none.

`control/tlspolicy` holds `domain:mode` lines, looked up like smtproutes
(domain, `.suffix`, then the empty key as the default):

    none      never STARTTLS
    may       STARTTLS when offered, certificate not checked (the default, as MTAs do)
    encrypt   TLS required, certificate not checked
    verify    TLS required with a certificate that a trusted CA issued for the
              exchanger's name (the MX host name, or the smtproutes relay)

Where TLS is required there is no cleartext fallback: a host that does not
offer STARTTLS, or fails the handshake or the check, is skipped, and with no
host left the message is deferred. An unknown mode counts as `verify`, so a
typing error never lowers security. `control/tlsca.pem` may add CA
certificates to the system's for `verify` (a private CA, or tests).
"""

from __future__ import annotations

import enum
import ssl

from smarthost.remote.routing import DomainMap


class TlsMode(enum.Enum):
    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    VERIFY = "verify"

    @classmethod
    def from_text(cls, text: str) -> "TlsMode":
        try:
            return cls(text.strip().lower())
        except ValueError:
            return cls.VERIFY


class TlsPolicy:
    def __init__(self, lines: list[str] | None):
        self.map = DomainMap(lines)

    def mode(self, domain: str) -> TlsMode:
        value = self.map.lookup(domain)
        return TlsMode.MAY if value is None else TlsMode.from_text(value)


def opportunistic_context() -> ssl.SSLContext:
    """Encryption without authentication: any certificate, any name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def verifying_context(cafile: str | None) -> ssl.SSLContext:
    """The system's trusted CAs, plus `cafile`; the name must match."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if cafile:
        ctx.load_verify_locations(cafile=cafile)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
