"""
The TLS side: a pyOpenSSL context that asks for a client certificate and
verifies whatever is presented, and the per-connection answer to "who is this?".

Client authentication is requested at the handshake but, in the default
C{optional} mode, not required there: browsers send CORS preflights without a
certificate, so the certificate is enforced per request by the web layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
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
    3: "no CRL for the certificate's issuer",
    7: "certificate signature failure",
    8: "CRL signature failure",
    9: "certificate not yet valid",
    10: "certificate expired",
    11: "CRL not yet valid",
    12: "CRL has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "issuer not trusted",
    21: "issuer not trusted",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "certificate not allowed for client authentication",
}

_SESSION_ID_CONTEXT = b"tokenissuer"
#: SSL_MODE_NO_AUTO_CHAIN (OpenSSL 1.0.2+); pyOpenSSL has no name for it.
_SSL_MODE_NO_AUTO_CHAIN = 0x00000008

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


#: X509_V_ERR_CRL_HAS_EXPIRED, tolerated only when configured to fail open.
_CRL_HAS_EXPIRED = 12


def _verifyClientCertificate(
    connection: SSL.Connection,
    certificate: crypto.X509,
    errno: int,
    depth: int,
    ok: int,
    *,
    acceptExpiredCRL: bool = False,
) -> bool:
    """
    Accept exactly what OpenSSL's chain validation accepted (trust, dates, the
    clientAuth purpose for the leaf, revocation), and say why when it did not.
    """
    if not ok and acceptExpiredCRL and errno == _CRL_HAS_EXPIRED:
        return True
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
            event="handshake_failure",
            reason_code="client_certificate_rejected",
        )
        return False
    return True


def buildServerContext(
    identity: ServerIdentity,
    clientCAs: list[x509.Certificate],
    clientAuth: str,
    crls: list[x509.CertificateRevocationList] | None = None,
    acceptExpiredCRL: bool = False,
) -> SSL.Context:
    """Make the pyOpenSSL server context for one set of certificate material."""
    if clientAuth not in CLIENT_AUTH_MODES:
        raise ValueError(f"client-auth must be one of {', '.join(CLIENT_AUTH_MODES)}")
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_cipher_list(MOZILLA_INTERMEDIATE_CIPHERS)
    _setGroups(context, MOZILLA_INTERMEDIATE_GROUPS)

    # Serve exactly the chain in the certificate file: without this OpenSSL
    # completes a short chain from the store below, which holds the *client* CAs.
    context.set_mode(_SSL_MODE_NO_AUTO_CHAIN)
    context.use_certificate(identity.leaf)
    for intermediate in identity.chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(identity.key)  # type: ignore[arg-type]
    context.check_privatekey()

    store = context.get_cert_store()
    assert store is not None
    for ca in clientCAs:
        store.add_cert(crypto.X509.from_cryptography(ca))
        # Name it in the CertificateRequest, so browsers only offer matching certificates.
        context.add_client_ca(ca)
    if crls:
        for crl in crls:
            store.add_crl(crl)
        # Check the leaf against its issuer's CRL; a CA without a CRL then fails closed.
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)

    mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
    if clientAuth == "required":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context.set_verify(
        mode,
        lambda connection, certificate, errno, depth, ok: _verifyClientCertificate(
            connection, certificate, errno, depth, ok, acceptExpiredCRL=acceptExpiredCRL
        ),
    )
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
    #: Subjects read from the certificate, by source (see L{subjectFor}).
    _subjects: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    def subjectFor(self, source: str, read: Callable[[x509.Certificate, str], str | None]) -> str | None:
        """C{read(certificate, source)}, read once per connection and source."""
        if self.certificate is None:
            return None
        if source not in self._subjects:
            self._subjects[source] = read(self.certificate, source)
        return self._subjects[source]


_NO_CLIENT = ClientIdentity(None)


def clientIdentityOf(transport: Any) -> ClientIdentity:
    """
    The verified client certificate of the connection behind C{transport}.

    Read per connection, at its first request: a certificate can only be present
    if the verify callback accepted it (or, for a resumed session, accepted it on
    the original handshake): a refused certificate fails the handshake. It
    cannot change later on the same connection (no renegotiation, no
    post-handshake authentication), so later requests reuse it.
    """
    if isinstance(transport, IssuerTLSProtocol):
        if transport.clientIdentity is None:
            transport.clientIdentity = _readClientIdentity(transport)
        return transport.clientIdentity
    return _readClientIdentity(transport)


def _readClientIdentity(transport: Any) -> ClientIdentity:
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return _NO_CLIENT
    connection = getHandle()
    if not isinstance(connection, SSL.Connection):
        return _NO_CLIENT
    certificate = connection.get_peer_certificate(as_cryptography=True)
    if certificate is None:
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
    #: The verified client certificate, once a request asked for it (L{clientIdentityOf}).
    clientIdentity: ClientIdentity | None = None
    _handshakeTimer: Any = None
    _host: Any = None

    def getHost(self) -> Any:
        # Asked once per HTTP request; the local address of a connection never changes.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def makeConnection(self, transport: Any) -> None:
        self.factory.connections.add(self)
        if self.factory.handshakeTimeout and self.factory.reactor is not None:
            self._handshakeTimer = self.factory.reactor.callLater(self.factory.handshakeTimeout, self._handshakeTooSlow)
        super().makeConnection(transport)

    def _handshakeTooSlow(self) -> None:
        """Drop a peer that opened a connection but did not finish the handshake in time."""
        self._handshakeTimer = None
        if not self._handshakeDone:
            self.refusal = "timeout"
            self.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self._handshakeTimer is not None and self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        self._handshakeTimer = None
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
        *,
        onHandshakeFailure: Any = None,
        reactor: Any = None,
        handshakeTimeout: float = 10.0,
        maxConnections: int = 1024,
        onConnectionRefused: Any = None,
    ) -> None:
        super().__init__(creator, False, wrappedFactory)
        self.connections: set[IssuerTLSProtocol] = set()
        self.reactor = reactor
        self.handshakeTimeout = handshakeTimeout
        self.maxConnections = maxConnections
        self._onHandshakeFailure = onHandshakeFailure
        self._onConnectionRefused = onConnectionRefused

    def buildProtocol(self, addr: Any) -> Any:
        if self.maxConnections and len(self.connections) >= self.maxConnections:
            # Returning None makes Twisted close the new connection at once.
            log.warn(
                "refused a connection from {peer}: {count} connections open (max-connections)",
                peer=str(addr),
                count=len(self.connections),
            )
            if self._onConnectionRefused is not None:
                self._onConnectionRefused()
            return None
        return super().buildProtocol(addr)

    def handshakeFailed(self, reason: str, protocol: IssuerTLSProtocol, cause: Any) -> None:
        if reason not in {"client_closed", "client_certificate_rejected"}:
            # Rejected certificates were logged with their details by the verify callback.
            peer = getattr(getattr(protocol, "transport", None), "getPeer", lambda: None)()
            log.info(
                "TLS handshake failed ({reason}) with {peer}",
                reason=reason,
                peer=str(peer),
                event="handshake_failure",
            )
        if self._onHandshakeFailure is not None:
            self._onHandshakeFailure(reason)
