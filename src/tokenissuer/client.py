"""
tokenissuer-client: get a token from a tokenissuer over mutual TLS.

It POSTs C{{"audience": ...}} to the issue URL with a client certificate (PEM
files or PKCS#12), checks the server's certificate and host name (Twisted's
C{optionsForClientTLS}, which uses service-identity), and prints the token alone
on stdout, so that C{TOKEN=$(tokenissuer-client ...)} works in a shell.

Every failure is one line on stderr, C{tokenissuer-client: error: ...}, and a
distinct exit status (see L{EXIT_CODES}). No error line contains a key, a
password or a token.

Run it as C{tokenissuer-client} (console script) or C{python -m tokenissuer.client}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from tokenissuer import __version__
from tokenissuer.pemfiles import PemError, readFile

PROG = "tokenissuer-client"
DEFAULT_URL = "https://localhost:4443/jwthmac/issue"
DEFAULT_TIMEOUT = 10.0
P12_PASSWORD_ENV = "TOKENISSUER_P12_PASSWORD"  # noqa: S105 - the name of a variable, not a password
#: The largest answer read from the server; tokenissuer's answers are far smaller.
MAX_ANSWER_BYTES = 64 * 1024

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_SERVER_CERTIFICATE = 4
EXIT_CLIENT_CERTIFICATE = 5
EXIT_HTTP = 6
EXIT_INTERRUPTED = 130

EXIT_CODES = (
    (EXIT_OK, "a token was printed"),
    (EXIT_INTERNAL, "an unexpected failure in the client itself (a bug)"),
    (EXIT_USAGE, "bad usage, or a local file is missing or unusable (wrong key, wrong password)"),
    (EXIT_CONNECTION, "connection refused, host unknown or unreachable, timeout, or not TLS"),
    (EXIT_SERVER_CERTIFICATE, "server certificate not trusted, or not valid for the URL's host"),
    (EXIT_CLIENT_CERTIFICATE, "the server refused the client certificate in the TLS handshake"),
    (EXIT_HTTP, "HTTP error from the server (the line has its error code and message)"),
    (EXIT_INTERRUPTED, "interrupted (SIGINT or SIGTERM) before the answer came"),
)

#: TLS alerts a server sends when it does not accept the client certificate, with a hint for each.
_CLIENT_CERTIFICATE_ALERTS = {
    "unknown ca": "the server does not trust the CA that issued the client certificate",
    "certificate required": "the server requires a client certificate; give --cert and --key, or --p12",
    "certificate expired": "the client certificate has expired or is not yet valid",
    "certificate revoked": "the client certificate has been revoked",
    "bad certificate": "the server does not accept the client certificate",
    "unsupported certificate": "the server does not accept this kind of client certificate",
    "certificate unknown": "the server does not accept the client certificate (is it made for client authentication?)",
    "access denied": "the server denied access to this client certificate",
}


class ClientError(Exception):
    """A failure to report as one line on stderr with exit status C{code}."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _HelpShown(Exception):
    """--help was printed; exit 0."""


def _oneLine(text: str, limit: int = 500) -> str:
    """Collapse control characters and runs of white space; cut long text."""
    flat = re.sub(r"[\x00-\x20\x7f-\x9f]+", " ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --- command line ----------------------------------------------------------


def _epilog() -> str:
    lines = ["exit status:"]
    lines += [f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES]
    lines += [
        "",
        "An error is one line on stderr that starts with 'tokenissuer-client: error:'.",
        f"The PKCS#12 password is read from {P12_PASSWORD_ENV} unless --p12-password",
        "is given; prefer the variable: other local users can see command-line arguments.",
        "",
        "example:",
        "  TOKEN=$(tokenissuer-client --cert client.crt --key client.key --ca ca.pem --audience gschmarri)",
    ]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports instead of exiting, and writes help where it is told."""

    def __init__(self, stdout: IO[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stdout = stdout

    def _print_message(self, message: str, file: Any = None) -> None:
        # Only --help and --version print; errors go through error() instead.
        if message:
            self._stdout.write(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status:
            raise ClientError(EXIT_USAGE, _oneLine(message or "bad usage"))
        raise _HelpShown()

    def error(self, message: str) -> NoReturn:
        raise ClientError(EXIT_USAGE, f"{_oneLine(message)} (see {PROG} --help)")


def _positiveSeconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"the timeout must be more than 0 and at most 3600 seconds, not {value}")
    return seconds


def buildParser(stdout: IO[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        stdout,
        prog=PROG,
        description=(
            "Get a short-lived JWT from a tokenissuer over mutual TLS and print it on stdout.\n"
            "The server certificate and host name are always checked."
        ),
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the issue URL, https only (default: {DEFAULT_URL})")
    parser.add_argument("--audience", required=True, help="the audience (service) the token is for (required)")
    parser.add_argument("--algorithm", help='sent as "algorithm"; the issuer refuses anything but its own (HS256)')
    identity = parser.add_argument_group("client certificate (without one, the issuer answers 401)")
    identity.add_argument("--cert", metavar="FILE", help="PEM client certificate, any intermediates after it")
    identity.add_argument(
        "--key", metavar="FILE", help="unencrypted PEM private key of --cert (default: read it from the --cert file)"
    )
    identity.add_argument(
        "--p12", metavar="FILE", help="PKCS#12 file with the client certificate and key (not with --cert)"
    )
    identity.add_argument(
        "--p12-password", metavar="PASSWORD", help=f"password of --p12 (default: ${P12_PASSWORD_ENV}, else none)"
    )
    parser.add_argument(
        "--ca", metavar="FILE", help="PEM bundle of CA certificates to trust for the server (default: the system's)"
    )
    parser.add_argument(
        "--timeout",
        type=_positiveSeconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up after this long: connect, handshake and answer together (default: {DEFAULT_TIMEOUT:g})",
    )
    output = parser.add_argument_group("output (default: the token alone)")
    output.add_argument("--json", action="store_true", help="print the whole JSON answer instead of the token")
    output.add_argument(
        "--decode",
        action="store_true",
        help="print the token's claims (decoded, NOT verified) as JSON instead of the token, and the expiry on "
        'stderr; with --json, add them to the answer as "claims" and "expires_at"',
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


@dataclass(frozen=True)
class Target:
    """The issue URL, taken apart."""

    url: bytes
    host: str
    port: int

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _redactUrl(url: str) -> str:
    """The URL without any user name and password, for messages."""
    return re.sub(r"//[^/?#]*@", "//...@", url)


def parseUrl(url: str) -> Target:
    """Check the issue URL: https, a host, no user information, and ASCII only."""
    shown = _redactUrl(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError:
        raise ClientError(EXIT_USAGE, f"the URL {shown!r} is not valid") from None
    if parts.username is not None or parts.password is not None:
        raise ClientError(EXIT_USAGE, f"the URL {shown!r} must not contain a user name or password")
    if parts.scheme != "https":
        raise ClientError(EXIT_USAGE, f"the URL {shown!r} must start with https:// (tokens only travel over TLS)")
    if not parts.hostname:
        raise ClientError(EXIT_USAGE, f"the URL {shown!r} has no host")
    try:
        encoded = url.encode("ascii")
    except UnicodeEncodeError:
        raise ClientError(
            EXIT_USAGE, f"the URL {shown!r} must be ASCII; write an international host name in its xn-- form"
        ) from None
    return Target(encoded, parts.hostname, port)


def parseArguments(argv: Sequence[str], stdout: IO[str]) -> argparse.Namespace:
    """
    Parse the command line. Unknown arguments are named by their option names
    only: a mistyped option may be followed by a password.
    """
    parser = buildParser(stdout)
    options, unknown = parser.parse_known_args(list(argv))
    if unknown:
        names = [argument.split("=", 1)[0] for argument in unknown if argument.startswith("-")]
        others = len(unknown) - len(names)
        listed = " ".join(names) if names else "a value"
        more = f" and {others} more value{'s' if others > 1 else ''}" if names and others else ""
        parser.error(f"unrecognized arguments: {listed}{more}")
    return options


# --- local files -------------------------------------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """A client certificate, its private key, and intermediates to send with it."""

    certificate: x509.Certificate
    key: PrivateKeyTypes
    chain: tuple[x509.Certificate, ...] = ()

    def privateCertificate(self) -> PrivateCertificate:
        return PrivateCertificate.fromCertificateAndKeyPair(
            Certificate(crypto.X509.from_cryptography(self.certificate)),
            KeyPair(crypto.PKey.from_cryptography_key(self.key)),  # type: ignore[arg-type]
        )

    def describe(self) -> str:
        return self.certificate.subject.rfc4514_string() or "(empty subject)"


def _read(path: str, what: str) -> bytes:
    try:
        return readFile(path, what)
    except PemError as problem:
        raise ClientError(EXIT_USAGE, str(problem)) from None


def _publicKeyBytes(key: Any) -> bytes:
    data: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _matches(certificate: x509.Certificate, key: PrivateKeyTypes) -> bool:
    return _publicKeyBytes(certificate.public_key()) == _publicKeyBytes(key.public_key())


def _checkUsable(key: PrivateKeyTypes, where: str) -> None:
    try:
        crypto.PKey.from_cryptography_key(key)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ClientError(EXIT_USAGE, f"{where} holds a kind of private key that TLS cannot use here") from None


def loadPemCredentials(certPath: str, keyPath: str | None) -> ClientCredentials:
    """Load a PEM certificate (chain) and its unencrypted PEM key; check that they belong together."""
    certData = _read(certPath, "client certificate")
    try:
        certificates = x509.load_pem_x509_certificates(certData)
    except ValueError:
        certificates = []
    if not certificates:
        raise ClientError(EXIT_USAGE, f"client certificate file {certPath!r} holds no PEM certificate")
    keyPath = keyPath or certPath
    keyData = certData if keyPath == certPath else _read(keyPath, "client key")
    if b"PRIVATE KEY-----" not in keyData:
        if keyPath == certPath:
            raise ClientError(EXIT_USAGE, f"client certificate file {certPath!r} holds no private key; give --key")
        raise ClientError(EXIT_USAGE, f"client key file {keyPath!r} holds no PEM private key")
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except TypeError:
        raise ClientError(
            EXIT_USAGE,
            f"client key file {keyPath!r} is encrypted; give an unencrypted PEM key "
            "(openssl pkey -in KEY -out PLAIN) or a PKCS#12 file with --p12",
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ClientError(EXIT_USAGE, f"client key file {keyPath!r} holds no usable PEM private key") from None
    if not _matches(certificates[0], key):
        raise ClientError(
            EXIT_USAGE, f"client key file {keyPath!r} does not match the first certificate in {certPath!r}"
        )
    _checkUsable(key, f"client key file {keyPath!r}")
    return ClientCredentials(certificates[0], key, tuple(certificates[1:]))


def loadPkcs12Credentials(path: str, password: str | None) -> ClientCredentials:
    """
    Load the certificate and key of a PKCS#12 file. Certificates in it that are
    not self-signed are sent along as intermediates; roots are left out.
    """
    data = _read(path, "PKCS#12")
    candidates: list[bytes | None] = [password.encode("utf-8")] if password is not None else [None, b""]
    for candidate in candidates:
        try:
            key, certificate, others = pkcs12.load_key_and_certificates(data, candidate)
            break
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    else:
        if password is None:
            raise ClientError(
                EXIT_USAGE,
                f"cannot open PKCS#12 file {path!r}: it needs a password (set {P12_PASSWORD_ENV} or give "
                "--p12-password), or it is not a PKCS#12 file",
            )
        raise ClientError(EXIT_USAGE, f"cannot open PKCS#12 file {path!r}: wrong password, or not a PKCS#12 file")
    if key is None or certificate is None:
        raise ClientError(EXIT_USAGE, f"PKCS#12 file {path!r} does not hold both a certificate and its private key")
    if not _matches(certificate, key):  # type: ignore[arg-type]
        raise ClientError(EXIT_USAGE, f"the private key in PKCS#12 file {path!r} does not match its certificate")
    _checkUsable(key, f"PKCS#12 file {path!r}")  # type: ignore[arg-type]
    chain = tuple(other for other in others if other.issuer != other.subject)
    return ClientCredentials(certificate, key, chain)  # type: ignore[arg-type]


def loadTrustRoots(path: str) -> list[x509.Certificate]:
    data = _read(path, "CA bundle")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ClientError(EXIT_USAGE, f"CA bundle file {path!r} holds no PEM certificate")
    return certificates


# --- TLS ---------------------------------------------------------------------


@dataclass
class _HandshakeRecord:
    """What one connection's handshake showed, kept for explaining a failure."""

    connection: SSL.Connection | None = None


@implementer(IOpenSSLClientConnectionCreator)
class _RecordingCreator:
    """Make connections with Twisted's checking creator, and remember them for error messages."""

    def __init__(self, creator: IOpenSSLClientConnectionCreator, record: _HandshakeRecord) -> None:
        self._creator = creator
        self._record = record

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        self._record.connection = connection
        return connection


@implementer(IPolicyForHTTPS)
class ClientTLSPolicy:
    """
    The TLS settings for the issuer: our trust roots (or the system's), our
    client certificate, and host name verification by C{optionsForClientTLS}.
    """

    def __init__(
        self,
        trustRoots: Sequence[x509.Certificate] | None = None,
        credentials: ClientCredentials | None = None,
    ) -> None:
        self.trustRoots = tuple(trustRoots) if trustRoots is not None else None
        self.credentials = credentials
        self.record = _HandshakeRecord()
        self._trustRoot = (
            trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(c)) for c in self.trustRoots])
            if self.trustRoots is not None
            else platformTrust()
        )
        self._clientCertificate = credentials.privateCertificate() if credentials is not None else None
        self._extraChain = [crypto.X509.from_cryptography(c) for c in credentials.chain] if credentials else []

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # an IPv6 address as written in a URL
        creator = optionsForClientTLS(
            host,
            trustRoot=self._trustRoot,
            clientCertificate=self._clientCertificate,
            extraCertificateOptions={"extraCertChain": list(self._extraChain)} if self._extraChain else None,
        )
        self.record = _HandshakeRecord()
        return _RecordingCreator(creator, self.record)


# --- HTTP --------------------------------------------------------------------


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body that is already in memory."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _AnswerTooLarge(Exception):
    pass


class _AnswerCollector(Protocol):
    """Collect a response body of at most C{limit} bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.finished: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def _cancel(self, finished: defer.Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.finished.errback(_AnswerTooLarge())
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


async def _readAnswer(response: IResponse) -> bytes:
    collector = _AnswerCollector(MAX_ANSWER_BYTES)
    response.deliverBody(collector)
    return await collector.finished


def _sslReasons(problem: SSL.Error) -> list[str]:
    reasons: list[str] = []
    for entry in problem.args[0] if problem.args and isinstance(problem.args[0], list) else []:
        if isinstance(entry, tuple) and len(entry) >= 3 and entry[2]:
            reasons.append(str(entry[2]))
    return reasons or [str(problem) or "unknown TLS error"]


def _causes(problem: BaseException) -> list[BaseException]:
    """The exception and everything that Twisted's HTTP client wrapped inside it."""
    found = [problem]
    for reason in getattr(problem, "reasons", None) or ():
        value = getattr(reason, "value", reason)
        if isinstance(value, BaseException):
            found.extend(_causes(value))
    return found


@dataclass(frozen=True)
class Exchange:
    """Everything needed to ask for one token."""

    target: Target
    audience: str
    algorithm: str | None
    policy: ClientTLSPolicy
    trustDescription: str
    timeout: float

    def body(self) -> bytes:
        document = {"audience": self.audience}
        if self.algorithm is not None:
            document["algorithm"] = self.algorithm
        return json.dumps(document).encode("utf-8")


def _describeNames(certificate: x509.Certificate) -> str:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return certificate.subject.rfc4514_string()
    listed = [str(n) for n in names.get_values_for_type(x509.DNSName)]
    listed += [str(n) for n in names.get_values_for_type(x509.IPAddress)]
    return ", ".join(listed) or "no host names"


def _whyUntrusted(connection: SSL.Connection | None, trustRoots: Sequence[x509.Certificate] | None) -> str:
    """Name the server certificate and, when we know the trust roots, OpenSSL's reason for refusing it."""
    chain = connection.get_peer_cert_chain(as_cryptography=True) if connection is not None else None
    if not chain:
        return ""
    leaf = chain[0]
    detail = f": {leaf.subject.rfc4514_string()!r} issued by {leaf.issuer.rfc4514_string()!r}"
    if trustRoots is None:
        return detail
    store = crypto.X509Store()
    for root in trustRoots:
        store.add_cert(crypto.X509.from_cryptography(root))
    untrusted = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    try:
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf), untrusted).verify_certificate()
    except crypto.X509StoreContextError as problem:
        return f"{detail}: {_oneLine(str(problem), 200)}"
    return detail


def explainFailure(problem: BaseException, exchange: Exchange) -> ClientError:
    """Turn what the exchange failed with into an exit status and one line."""
    where = exchange.target.netloc
    record = exchange.policy.record
    causes = _causes(problem)
    for cause in causes:
        if isinstance(cause, VerificationError):
            names = ""
            connection = record.connection
            chain = connection.get_peer_cert_chain(as_cryptography=True) if connection is not None else None
            if chain:
                names = f" (it is for {_describeNames(chain[0])})"
            return ClientError(
                EXIT_SERVER_CERTIFICATE,
                f"the server certificate of {where} is not valid for the host name "
                f"{exchange.target.host!r} in the URL{names}",
            )
    for cause in causes:
        if isinstance(cause, SSL.Error):
            reasons = _sslReasons(cause)
            text = "; ".join(reasons)
            if any("certificate verify failed" in reason for reason in reasons):
                return ClientError(
                    EXIT_SERVER_CERTIFICATE,
                    f"the server certificate of {where} is not trusted by {exchange.trustDescription}"
                    + _whyUntrusted(record.connection, exchange.policy.trustRoots),
                )
            for alert, hint in _CLIENT_CERTIFICATE_ALERTS.items():
                if any("alert" in reason and alert in reason for reason in reasons):
                    presented = (
                        f"client certificate {exchange.policy.credentials.describe()!r}"
                        if exchange.policy.credentials is not None
                        else "no client certificate"
                    )
                    return ClientError(
                        EXIT_CLIENT_CERTIFICATE,
                        f"{where} refused the TLS handshake ({text}) with {presented}: {hint}",
                    )
            hint = ""
            if any(marker in text for marker in ("wrong version number", "record layer failure", "packet length")):
                hint = " (is it an HTTPS server?)"
            return ClientError(EXIT_CONNECTION, f"the TLS handshake with {where} failed: {text}{hint}")
    for cause in causes:
        if isinstance(cause, defer.TimeoutError | error.TimeoutError | defer.CancelledError):
            return ClientError(EXIT_CONNECTION, f"no answer from {where} within {exchange.timeout:g} seconds")
        if isinstance(cause, error.ConnectionRefusedError):
            return ClientError(EXIT_CONNECTION, f"connection to {where} refused (is the issuer running on that port?)")
        if isinstance(cause, error.DNSLookupError):
            return ClientError(EXIT_CONNECTION, f"cannot resolve the host name {exchange.target.host!r}")
        if isinstance(cause, error.ConnectError):
            return ClientError(EXIT_CONNECTION, _oneLine(f"cannot connect to {where}: {cause}"))
        if isinstance(cause, _AnswerTooLarge):
            return ClientError(EXIT_HTTP, f"the answer from {where} is larger than {MAX_ANSWER_BYTES} bytes")
    hint = ""
    connection = record.connection
    if (
        connection is not None
        and exchange.policy.credentials is not None
        and connection.get_protocol_version_name() == "TLSv1.3"
    ):
        # In TLS 1.3 the server checks the client certificate after the client
        # has finished its handshake; if its alert is lost, only the close is seen.
        hint = " (with TLS 1.3 a refused client certificate can look like this; the issuer's log says why)"
    for cause in causes:
        if isinstance(cause, error.ConnectionLost | error.ConnectionDone):
            return ClientError(EXIT_CONNECTION, f"{where} closed the connection without answering{hint}")
    return ClientError(
        EXIT_CONNECTION,
        _oneLine(f"the exchange with {where} failed: {', '.join(type(cause).__name__ for cause in causes)}{hint}"),
    )


def httpError(status: int, phrase: bytes, body: bytes) -> ClientError:
    """C{HTTP <status> <error>: <message>} from a tokenissuer error answer, or as much as there is."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        message = document.get("message")
        line = f"HTTP {status} {document['error']}"
        if isinstance(message, str) and message:
            line += f": {message}"
        return ClientError(EXIT_HTTP, _oneLine(line))
    reason = phrase.decode("latin-1", "replace")
    return ClientError(
        EXIT_HTTP, _oneLine(f"HTTP {status} {reason}: the answer is not a tokenissuer JSON answer; is the URL right?")
    )


async def requestToken(reactor: Any, exchange: Exchange) -> dict[str, Any]:
    """POST the request and return the JSON answer of a successful one; raise L{ClientError} otherwise."""
    agent = Agent(reactor, contextFactory=exchange.policy, connectTimeout=exchange.timeout)

    async def talk() -> tuple[IResponse, bytes]:
        headers = Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Accept": [b"application/json"],
                b"User-Agent": [f"{PROG}/{__version__}".encode("ascii")],
            }
        )
        response = await agent.request(b"POST", exchange.target.url, headers, _BytesProducer(exchange.body()))
        return response, await _readAnswer(response)

    stopping: list[bool] = []
    # On SIGINT or SIGTERM the reactor drops every connection while it shuts
    # down; say so, rather than blame the server for closing.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
    talking = defer.ensureDeferred(talk())
    talking.addTimeout(exchange.timeout, reactor)
    try:
        response, body = await talking
    except Exception as problem:
        if stopping:
            raise ClientError(EXIT_INTERRUPTED, "interrupted") from None
        raise explainFailure(problem, exchange) from None
    finally:
        if not stopping:
            reactor.removeSystemEventTrigger(trigger)
    if not 200 <= response.code < 300:
        raise httpError(response.code, response.phrase, body)
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("token"), str) or not answer["token"]:
        raise ClientError(EXIT_HTTP, f"HTTP {response.code}: the answer holds no token; is the URL right?")
    return answer


# --- output ------------------------------------------------------------------


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {seconds} s"
    return f"{seconds} s"


def describeExpiry(claims: Mapping[str, Any], now: float) -> tuple[str | None, str]:
    """The expiry as ISO 8601 (or None) and as words, relative to C{now}."""
    expiry = claims.get("exp")
    if not isinstance(expiry, int | float) or isinstance(expiry, bool):
        return None, "the token has no expiry time (no exp claim)"
    try:
        when = datetime.datetime.fromtimestamp(expiry, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return None, f"the token's exp claim {expiry!r} is not a usable time"
    left = int(expiry - now)
    relative = f"in {_duration(left)}" if left >= 0 else f"{_duration(-left)} ago"
    iso = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    return iso, f"expires {when:%Y-%m-%d %H:%M:%S} UTC ({relative})"


def decodeClaims(token: str) -> dict[str, Any]:
    """The token's claims, decoded WITHOUT checking the signature (only the issuer's key can do that)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise ClientError(EXIT_HTTP, "the server's answer holds a token that cannot be decoded as a JWT") from None
    return claims


def writeOutput(
    answer: dict[str, Any],
    *,
    showJson: bool,
    decode: bool,
    stdout: IO[str],
    stderr: IO[str],
    now: Callable[[], float] = time.time,
) -> None:
    token: str = answer["token"]
    if not decode:
        stdout.write(json.dumps(answer) + "\n" if showJson else token + "\n")
        return
    claims = decodeClaims(token)
    iso, words = describeExpiry(claims, now())
    if showJson:
        stdout.write(json.dumps({**answer, "claims": claims, "expires_at": iso}, indent=2) + "\n")
    else:
        stdout.write(json.dumps(claims, indent=2) + "\n")
    stderr.write(f"{PROG}: token for {claims.get('sub')!r}, audience {claims.get('aud')!r}, {words}\n")


# --- putting it together -----------------------------------------------------


def prepare(options: argparse.Namespace, environ: Mapping[str, str]) -> Exchange:
    """Check the options and load the local files; raise L{ClientError} (exit 2) on any problem."""
    target = parseUrl(options.url)
    if not options.audience:
        raise ClientError(EXIT_USAGE, "--audience must not be empty")
    if options.p12 is not None and (options.cert is not None or options.key is not None):
        raise ClientError(EXIT_USAGE, "give either --p12 or --cert/--key, not both")
    if options.key is not None and options.cert is None:
        raise ClientError(EXIT_USAGE, "--key needs --cert")
    if options.p12_password is not None and options.p12 is None:
        raise ClientError(EXIT_USAGE, "--p12-password needs --p12")
    credentials: ClientCredentials | None = None
    if options.p12 is not None:
        password = options.p12_password if options.p12_password is not None else environ.get(P12_PASSWORD_ENV)
        credentials = loadPkcs12Credentials(options.p12, password)
    elif options.cert is not None:
        credentials = loadPemCredentials(options.cert, options.key)
    if options.ca is not None:
        roots: list[x509.Certificate] | None = loadTrustRoots(options.ca)
        trustDescription = f"the CA bundle {options.ca!r}"
    else:
        roots = None
        trustDescription = "the system's trust store (give --ca)"
    return Exchange(
        target=target,
        audience=options.audience,
        algorithm=options.algorithm,
        policy=ClientTLSPolicy(roots, credentials),
        trustDescription=trustDescription,
        timeout=options.timeout,
    )


async def run(
    reactor: Any,
    argv: Sequence[str],
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """
    The whole client: parse C{argv}, get a token, print it; return the exit
    status. Never raises: every failure becomes one line on C{stderr}.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    try:
        options = parseArguments(argv, out)
        exchange = prepare(options, os.environ if environ is None else environ)
        answer = await requestToken(reactor, exchange)
        writeOutput(answer, showJson=options.json, decode=options.decode, stdout=out, stderr=err)
        out.flush()
        return EXIT_OK
    except _HelpShown:
        return EXIT_OK
    except ClientError as problem:
        err.write(f"{PROG}: error: {_oneLine(problem.message, 1000)}\n")
        return problem.code
    except Exception as problem:  # a bug: still one line, never a traceback
        err.write(f"{PROG}: error: unexpected {type(problem).__name__}; please report this\n")
        return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: run the client under the default reactor and exit with its status."""
    from twisted.internet.task import react

    arguments = list(sys.argv[1:] if argv is None else argv)
    finished: list[int] = []

    async def reactMain(reactor: Any) -> None:
        finished.append(await run(reactor, arguments))
        raise SystemExit(finished[0])

    try:
        react(reactMain)
    except SystemExit:
        if not finished:
            # The reactor stopped before the client was done: SIGINT or SIGTERM.
            sys.stderr.write(f"{PROG}: error: interrupted\n")
            sys.exit(EXIT_INTERRUPTED)
        raise


if __name__ == "__main__":
    main()
