"""
The TLS side: a pyOpenSSL context that asks for a client certificate and
verifies whatever is presented, and the per-connection answer to "who is this?".

Client authentication is requested at the handshake but, in the default
C{optional} mode, not required there: browsers send CORS preflights without a
certificate, so the certificate is enforced per request by the web layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from tokenissuer.pemfiles import ServerIdentity

#: Mozilla's "intermediate" TLS 1.2 cipher suites (server-side configuration
#: guidelines, version 5.7), without the finite-field DHE suites: ECDHE only.
#: TLS 1.3 suites are OpenSSL's defaults, which are the same three Mozilla lists.
MOZILLA_INTERMEDIATE_CIPHERS = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
#: Key-exchange groups of the same profile.
MOZILLA_INTERMEDIATE_GROUPS = b"X25519:P-256:P-384"

CLIENT_AUTH_MODES = ("optional", "required")

#: OpenSSL X509_V_ERR codes a person is likely to meet, in words.
_VERIFY_REASONS = {
    2: "issuer certificate not found",
    7: "certificate signature failure",
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "issuer not trusted",
    21: "issuer not trusted",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "certificate not allowed for client authentication",
}

_SESSION_ID_CONTEXT = b"tokenissuer"

log = Logger()


def describeVerifyError(errno: int) -> str:
    return _VERIFY_REASONS.get(errno, f"verification error {errno}")


def _setGroups(context: SSL.Context, groups: bytes) -> None:
    """
    Limit key exchange to the profile's groups. pyOpenSSL has no public call for
    a list of groups, so use the OpenSSL binding it ships with.
    """
    from OpenSSL._util import lib  # noqa: PLC0415 - private but stable binding

    if lib.SSL_CTX_set1_curves_list(context._context, groups) != 1:  # type: ignore[attr-defined]
        raise ValueError(f"OpenSSL refused the key exchange groups {groups!r}")


def _verifyClientCertificate(
    connection: SSL.Connection, certificate: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    """
    Accept exactly what OpenSSL's chain validation accepted (trust, dates, the
    clientAuth purpose for the leaf), and say why when it did not.
    """
    if not ok:
        protocol = connection.get_app_data()
        if isinstance(protocol, IssuerTLSProtocol):
            protocol.refusal = "client_certificate_rejected"
        peer = getattr(getattr(protocol, "transport", None), "getPeer", lambda: None)()
        subject = certificate.to_cryptography().subject.rfc4514_string()
        log.info(
            "TLS handshake refused: client certificate {subject!r} at depth {depth}: {reason} (peer {peer})",
            subject=subject,
            depth=depth,
            reason=describeVerifyError(errno),
            peer=str(peer),
        )
        return False
    return True


def buildServerContext(identity: ServerIdentity, clientCAs: list[x509.Certificate], clientAuth: str) -> SSL.Context:
    """Make the pyOpenSSL server context for one set of certificate material."""
    if clientAuth not in CLIENT_AUTH_MODES:
        raise ValueError(f"client-auth must be one of {', '.join(CLIENT_AUTH_MODES)}")
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(MOZILLA_INTERMEDIATE_CIPHERS)
    _setGroups(context, MOZILLA_INTERMEDIATE_GROUPS)

    context.use_certificate(crypto.X509.from_cryptography(identity.leaf))
    for intermediate in identity.chain[1:]:
        context.add_extra_chain_cert(crypto.X509.from_cryptography(intermediate))
    context.use_privatekey(crypto.PKey.from_cryptography_key(identity.key))  # type: ignore[arg-type]
    context.check_privatekey()

    store = context.get_cert_store()
    assert store is not None
    caNames = []
    for ca in clientCAs:
        certificate = crypto.X509.from_cryptography(ca)
        store.add_cert(certificate)
        caNames.append(certificate.get_subject())
    # Tell clients which CAs we accept, so browsers only offer matching certificates.
    context.set_client_ca_list(caNames)

    mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
    if clientAuth == "required":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context.set_verify(mode, _verifyClientCertificate)
    context.set_verify_depth(8)
    # Required for session resumption whenever peers are verified; the resumed
    # session carries the verified client certificate with it.
    context.set_session_id(_SESSION_ID_CONTEXT)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnectionCreator:
    """
    Hand each new TLS connection the current context. Holding the context in one
    attribute lets a reload swap it for new connections while old ones finish.
    """

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


@dataclass(frozen=True)
class ClientIdentity:
    """The verified client certificate of one connection (or none)."""

    certificate: x509.Certificate | None

    @property
    def commonName(self) -> str | None:
        if self.certificate is None:
            return None
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            return None
        value = names[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")


_NO_CLIENT = ClientIdentity(None)


def clientIdentityOf(transport: Any) -> ClientIdentity:
    """
    The verified client certificate of the connection behind C{transport}.

    Read per connection, at request time: a certificate can only be present if
    the verify callback accepted it (or, for a resumed session, accepted it on
    the original handshake), and OpenSSL's verify result must still say so.
    """
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return _NO_CLIENT
    connection = getHandle()
    if not isinstance(connection, SSL.Connection):
        return _NO_CLIENT
    certificate = connection.get_peer_certificate(as_cryptography=True)
    if certificate is None:
        return _NO_CLIENT
    from OpenSSL._util import lib  # noqa: PLC0415 - no public call for the verify result

    if lib.SSL_get_verify_result(connection._ssl) != 0:  # type: ignore[attr-defined]
        return _NO_CLIENT
    return ClientIdentity(certificate)


def _classifyHandshakeFailure(protocol: IssuerTLSProtocol, reason: Any) -> str:
    """Name why a handshake did not complete, for metrics and logs."""
    if protocol.refusal is not None:
        return protocol.refusal
    value = getattr(reason, "value", reason)
    if isinstance(value, SSL.Error):
        text = str(value).lower()
        if "peer did not return a certificate" in text or "certificate required" in text:
            return "client_certificate_missing"
        if "http request" in text or "wrong version number" in text or "record layer failure" in text:
            return "not_tls"
        if any(
            marker in text
            for marker in (
                "unsupported protocol",
                "no shared cipher",
                "version too low",
                "no suitable",
                "no shared group",
            )
        ):
            return "protocol_mismatch"
        return "other"
    # The peer closed before finishing: Chromium does this when first asked
    # for a certificate, and so do port scanners and TCP health checks.
    return "client_closed"


class IssuerTLSProtocol(TLSMemoryBIOProtocol):
    """A server-side TLS connection that reports why its handshake failed, if it did."""

    factory: IssuerTLSFactory
    refusal: str | None = None
    openedAt: float = 0.0

    def makeConnection(self, transport: Any) -> None:
        self.openedAt = self.factory.clock()
        self.factory.connections.add(self)
        super().makeConnection(transport)

    @property
    def handshakeDone(self) -> bool:
        return self._handshakeDone

    def connectionLost(self, reason: Any = None) -> None:
        factory = self.factory
        factory.connections.discard(self)
        if not self._handshakeDone:
            cause = self._reason or reason
            factory.handshakeFailed(_classifyHandshakeFailure(self, cause), self, cause)
        super().connectionLost(reason)


class IssuerTLSFactory(TLSMemoryBIOFactory):
    """Wrap the web site in TLS, keep the set of open connections, report handshake failures."""

    protocol = IssuerTLSProtocol
    noisy = False

    def __init__(
        self,
        creator: ServerConnectionCreator,
        wrappedFactory: Any,
        onHandshakeFailure: Any = None,
        clock: Any = None,
    ) -> None:
        super().__init__(creator, False, wrappedFactory)
        import time

        self.connections: set[IssuerTLSProtocol] = set()
        self.clock = clock if clock is not None else time.monotonic
        self._onHandshakeFailure = onHandshakeFailure

    def handshakeFailed(self, reason: str, protocol: IssuerTLSProtocol, cause: Any) -> None:
        if reason not in {"client_closed", "client_certificate_rejected"}:
            # Rejected certificates were logged with their details by the verify callback.
            peer = getattr(getattr(protocol, "transport", None), "getPeer", lambda: None)()
            log.info("TLS handshake failed ({reason}) with {peer}", reason=reason, peer=str(peer))
        if self._onHandshakeFailure is not None:
            self._onHandshakeFailure(reason)
