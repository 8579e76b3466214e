"""
The HTTP side: a twisted.web resource tree that answers CORS preflights without a
client certificate and issues tokens only to requests whose own connection
carries a verified one.

Every answer is JSON; every refusal is C{{"error": code, "message": text}} and is
logged once with its reason. Tokens and keys are never logged.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger
from twisted.web import http, resource, server

from tokenissuer.audit import PRERENDERED
from tokenissuer.cors import CorsPolicy
from tokenissuer.metrics import IssuerMetrics
from tokenissuer.policy import ClientPolicy, PolicyRefusal, describeSubjectSource, subjectOf
from tokenissuer.signer import TokenSigner
from tokenissuer.tls import ClientIdentity, clientIdentityOf

#: The largest request body read; anything longer is answered 413 without being kept.
MAX_BODY_BYTES = 4096
#: Longest audience accepted; longer ones are refused before the allow-list check.
MAX_AUDIENCE_LENGTH = 256
#: Seconds an idle connection may stay open between requests.
IDLE_TIMEOUT = 60
#: Seconds from a request's first byte to its last.
REQUEST_TIMEOUT = 10
#: Header limits: the real clients send about ten short headers.
MAX_HEADERS = 64
MAX_HEADER_BYTES = 8192

ISSUE_METHODS = (b"OPTIONS", b"POST")

log = Logger()


class ApiError(Exception):
    """A refusal to be sent as JSON; C{code} is stable, C{message} is for people."""

    def __init__(self, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


@dataclass
class IssuePolicy:
    """What the issue endpoint needs to decide and mint, without any HTTP in it (reload swaps clientPolicy)."""

    signer: TokenSigner
    cors: CorsPolicy
    audiences: frozenset[str] | None  # None: any non-empty audience
    metrics: IssuerMetrics | None = None
    subjectFrom: str = "cn"
    clientPolicy: ClientPolicy | None = None
    #: Bind tokens to the client certificate (RFC 8705 cnf claim).
    bindToken: bool = False


def _rejectConstant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _noDuplicateKeys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


#: Control characters, DEL and lone surrogates.
_FORBIDDEN_IN_AUDIENCE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_BODY_DECODER = json.JSONDecoder(object_pairs_hook=_noDuplicateKeys, parse_constant=_rejectConstant)


def parseIssueBody(body: bytes, algorithm: str) -> str:
    """
    Return the requested audience from a request body, or raise L{ApiError} 400.

    Strict on purpose: UTF-8 only, no duplicate keys, no NaN, a JSON object with
    a non-empty string C{audience}; an C{algorithm}, when given, must match ours.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "body_not_utf8", "The request body is not valid UTF-8; send UTF-8 encoded JSON.") from None
    try:
        document = _BODY_DECODER.decode(text)
    except (ValueError, RecursionError):
        raise ApiError(
            400, "malformed_json", 'The request body is not valid JSON; send {"audience": "<name>"}.'
        ) from None
    if not isinstance(document, dict):
        raise ApiError(400, "body_not_object", 'The request body must be a JSON object like {"audience": "<name>"}.')
    if "audience" not in document:
        raise ApiError(400, "audience_missing", 'The request body has no "audience"; send {"audience": "<name>"}.')
    audience = document["audience"]
    if not isinstance(audience, str):
        raise ApiError(400, "audience_not_string", 'The "audience" must be a JSON string.')
    if not audience:
        raise ApiError(400, "audience_empty", 'The "audience" must not be empty.')
    if len(audience) > MAX_AUDIENCE_LENGTH or _FORBIDDEN_IN_AUDIENCE.search(audience):
        raise ApiError(
            400,
            "audience_invalid",
            f'The "audience" must be at most {MAX_AUDIENCE_LENGTH} characters, '
            "without control characters or lone surrogates.",
        )
    if "algorithm" in document and document["algorithm"] != algorithm:
        raise ApiError(
            400,
            "algorithm_mismatch",
            f'This issuer signs with {algorithm}; send "algorithm": "{algorithm}" or leave it out.',
        )
    return audience


def _isJsonContentType(value: bytes | None) -> bool:
    if value is None:
        return False
    mediaType, _, parameters = value.decode("latin-1").partition(";")
    if mediaType.strip().lower() != "application/json":
        return False
    for parameter in parameters.split(";"):
        name, _, paramValue = parameter.partition("=")
        if name.strip().lower() == "charset" and paramValue.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


class IssuerRequest(server.Request):
    """A request that never keeps more than L{MAX_BODY_BYTES} of its body."""

    bodyTooLarge = False
    _bodyBytes = 0
    _body: BytesIO | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Twisted (25.5 and later honour this) would parse form bodies itself and answer
        # a bad multipart body with a bare 400 before our checks: the body is ours to judge (415).
        self._parsePOSTFormSubmission = False

    def gotLength(self, length: int | None) -> None:
        self.content = self._body = BytesIO()
        self._bodyBytes = 0
        if length is not None and length > MAX_BODY_BYTES:
            self.bodyTooLarge = True

    def _handleStar(self) -> None:
        """
        The server-wide target C{*} (RFC 9110 C{OPTIONS *}): answered like our
        other paths (C{Server: tokenissuer}, JSON errors), not by Twisted's default.
        """
        if self.method == b"OPTIONS":
            body = _send(self, 204, None, [(b"Allow", b"OPTIONS, POST")])
        else:
            body = _send(
                self,
                405,
                {"error": "method_not_allowed", "message": "Only OPTIONS applies to the request target *."},
                [(b"Allow", b"OPTIONS")],
            )
        self.setHeader(b"Content-Length", b"%d" % len(body))
        if body:
            self.write(body)
        self.finish()

    def handleContentChunk(self, data: bytes) -> None:
        if self.bodyTooLarge:
            return
        self._bodyBytes += len(data)
        if self._bodyBytes > MAX_BODY_BYTES:
            self.bodyTooLarge = True
            self.content = self._body = BytesIO()
            return
        assert self._body is not None
        self._body.write(data)


#: Headers on every answer of the issuer's listener (JSON or empty, never to be cached or sniffed).
EVERY_ANSWER_HEADERS = b"Server: tokenissuer\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
_SET_BY_CHANNEL = frozenset({b"Server", b"Cache-Control", b"X-Content-Type-Options"})


class IssuerChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel that answers an oversized declared body at once, keeps
    headers small, and gives each request a deadline from its first byte to its
    last, so a client sending a byte now and then (slowloris) cannot hold it.
    """

    #: Finished requests on this connection (a drain closes idle used connections first).
    requestsServed = 0
    #: Seconds from a request's first byte until its headers and body must be complete.
    requestTimeout: float = REQUEST_TIMEOUT
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES
    _requestDeadline: Any = None
    #: A request has begun (its first byte arrived) and is not yet complete.
    _inRequest = False
    _timedOut = False
    _abortLater: Any = None
    _heldHeaders: list[bytes] | None = None

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request or header line over 16 KiB: 400 and close at once (the
        # default only half-closes while the channel is the TLS producer).
        self._respondToBadRequestAndDisconnect()

    def dataReceived(self, data: bytes) -> None:
        if self._timedOut:
            return  # answered 408 and closing: nothing more is read
        if not self._inRequest and self.requestTimeout:
            self._inRequest = True
            deadline = self._requestDeadline
            if deadline is not None and deadline.active():
                # Still armed from an earlier request on this connection: moving it
                # later is cheaper than a new timer per request.
                deadline.reset(self.requestTimeout)
            else:
                self._requestDeadline = self.callLater(self.requestTimeout, self._requestTooSlow)  # type: ignore[attr-defined]
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        # The deadline stays armed (see dataReceived) but no longer applies.
        self._inRequest = False
        super().allContentReceived()

    def connectionLost(self, reason: Any = None) -> None:
        self._cancelDeadline()
        if self._abortLater is not None and self._abortLater.active():
            self._abortLater.cancel()
        self._abortLater = None
        super().connectionLost(reason)

    def _cancelDeadline(self) -> None:
        if self._requestDeadline is not None and self._requestDeadline.active():
            self._requestDeadline.cancel()
        self._requestDeadline = None

    def _requestTooSlow(self) -> None:
        self._requestDeadline = None
        if not self._inRequest:
            return  # armed for a request that completed in time; none is under way
        self._timedOut = True
        body = json.dumps(
            {
                "error": "request_timeout",
                "message": f"The request was not complete within {self.requestTimeout:g} seconds.",
            },
            separators=(",", ":"),
        ).encode("utf-8")
        log.info(
            "refused slow request from {peer}: {reason}",
            peer=str(self.transport.getPeer()),  # type: ignore[union-attr]
            reason="request_timeout",
            event="refused",
        )
        self.transport.write(  # type: ignore[union-attr]
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.persistent = False
        transport = self.transport
        self.loseConnection()  # unregisters the channel as producer, so the close really happens
        # A slow client may not read our close either: cut it off shortly after.
        self._abortLater = self.callLater(2, lambda: transport.abortConnection() if transport.connected else None)  # type: ignore[attr-defined,union-attr]

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: http.Headers) -> None:
        """
        Hold the status line and headers until the body (or the end of the
        response), so an answer leaves as one TLS record and one write instead
        of two. The bytes are those of C{HTTPChannel.writeHeaders}, with the
        headers every answer carries (L{EVERY_ANSWER_HEADERS}) written here
        once rather than set on each request.
        """
        heldHeaders = [version, b" ", code, b" ", reason, b"\r\n", EVERY_ANSWER_HEADERS]
        for name, values in headers.getAllRawHeaders():
            if name in _SET_BY_CHANNEL:
                continue  # Twisted's own Server header: ours is in EVERY_ANSWER_HEADERS
            for value in values:
                heldHeaders.extend((name, b": ", value, b"\r\n"))
        heldHeaders.append(b"\r\n")
        self._heldHeaders = heldHeaders

    def write(self, data: bytes) -> None:
        self.writeSequence([data])

    def writeSequence(self, iovec: list[bytes]) -> None:
        held, self._heldHeaders = self._heldHeaders, None
        self.transport.writeSequence(held + list(iovec) if held else iovec)  # type: ignore[union-attr]

    def _writeHeldHeaders(self) -> None:
        if self._heldHeaders is not None:
            self.writeSequence([])

    def requestDone(self, request: Any) -> None:
        self._writeHeldHeaders()  # an answer without a body
        self.requestsServed += 1
        super().requestDone(request)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        request = self.requests[-1]
        if getattr(request, "bodyTooLarge", False):
            # Skip the body entirely: answer 413 now and close afterwards,
            # instead of reading data we are going to throw away.
            self.persistent = False
            self.length = 0


def _send(
    request: server.Request,
    status: int,
    document: dict[str, Any] | bytes | None,
    headers: list[tuple[bytes, bytes]],
) -> bytes:
    """Set the status and headers; return the JSON body (C{document}, or its bytes already encoded)."""
    request.setResponseCode(status)
    for name, value in headers:
        request.setHeader(name, value)
    if document is None:
        return b""
    request.setHeader(b"Content-Type", b"application/json")
    if isinstance(document, bytes):
        return document
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _peer(request: server.Request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return f"{host}:{address.port}" if host is not None else str(address)  # type: ignore[attr-defined]


class JsonErrorResource(resource.Resource):
    """A JSON answer for paths and methods that do not exist."""

    isLeaf = True

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        metrics: IssuerMetrics | None = None,
        cors: CorsPolicy | None = None,
    ):
        super().__init__()
        self.status, self.code, self.message = status, code, message
        self.metrics = metrics
        self.cors = cors

    def render(self, request: server.Request) -> bytes:
        if self.metrics is not None:
            self.metrics.refused(self.code)
        log.info(
            "refused {method} {path} from {peer}: {reason}",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1", "replace")[:200],
            peer=_peer(request),
            reason=self.code,
            event="refused",
        )
        headers: list[tuple[bytes, bytes]] = [(b"Vary", b"Origin")]
        origin = request.getHeader(b"origin")
        if origin is not None and self.cors is not None and self.cors.isAllowed(origin.decode("latin-1")):
            headers.extend(self.cors.responseHeaders(origin.decode("latin-1")))
        return _send(request, self.status, {"error": self.code, "message": self.message}, headers)


NOT_FOUND_MESSAGE = "No such endpoint; request tokens with POST /jwthmac/issue or POST /jwt/issue."


class JsonDirectory(resource.Resource):
    """An inner node of the tree whose unknown children answer a JSON 404."""

    def __init__(self, notFound: JsonErrorResource) -> None:
        super().__init__()
        self.notFound = notFound

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return self.notFound

    def render(self, request: server.Request) -> bytes:
        return self.notFound.render(request)


class IssueResource(resource.Resource):
    """
    C{/jwthmac/issue} and C{/jwt/issue}: OPTIONS answers CORS preflights without
    a client certificate; POST mints a token for the connection's verified
    client certificate.
    """

    isLeaf = True
    #: Set while the service shuts down: answers close their connection.
    draining = False

    def __init__(
        self,
        policy: IssuePolicy,
        identify: Callable[[Any], ClientIdentity] = clientIdentityOf,
        clock: Callable[[], float] = time.perf_counter,
    ):
        super().__init__()
        self.policy = policy
        self._identify = identify
        self._clock = clock

    def render(self, request: server.Request) -> bytes:
        started = self._clock()
        if self.draining:
            # Finish this request, then close: the listener is gone and the process is about to exit.
            request.setHeader(b"Connection", b"close")
            request.channel.persistent = False  # type: ignore[attr-defined]
        try:
            return self._answer(request)
        finally:
            if self.policy.metrics is not None:
                self.policy.metrics.requestDuration.observe(self._clock() - started)

    def _answer(self, request: server.Request) -> bytes:
        try:
            return self._render(request)
        except Exception:
            # Never a traceback to the client; the log gets it (no token is in scope here).
            log.failure("internal error while answering {path}", path=request.path.decode("latin-1", "replace")[:200])
            request.responseHeaders = http.Headers()
            if self.policy.metrics is not None:
                self.policy.metrics.refused("internal_error")
            headers: list[tuple[bytes, bytes]] = [(b"Vary", b"Origin")]
            origin = request.getHeader(b"origin")
            if origin is not None and self.policy.cors.isAllowed(origin.decode("latin-1")):
                # Let the calling page read the error too.
                headers.extend(self.policy.cors.responseHeaders(origin.decode("latin-1")))
            return _send(
                request,
                500,
                {"error": "internal_error", "message": "The issuer failed to answer; its log has the details."},
                headers,
            )

    def _render(self, request: server.Request) -> bytes:
        headers: list[tuple[bytes, bytes]] = [(b"Vary", b"Origin")]
        originHeader = request.getHeader(b"origin")
        origin = originHeader.decode("latin-1") if originHeader is not None else None
        context = {"peer": _peer(request), "origin": origin}
        try:
            if request.postpath:
                raise ApiError(404, "not_found", NOT_FOUND_MESSAGE)
            if origin is not None:
                if not self.policy.cors.isAllowed(origin):
                    raise ApiError(
                        403,
                        "origin_not_allowed",
                        f"The origin {origin[:100]} may not call this issuer; "
                        "ask its operator to add it to TOK_ISS_ALLOWED_ORIGINS.",
                    )
                headers.extend(self.policy.cors.responseHeaders(origin))
            if request.method == b"OPTIONS":
                return self._preflight(request, origin, headers)
            if request.method != b"POST":
                raise ApiError(
                    405,
                    "method_not_allowed",
                    "Use POST to request a token (OPTIONS is answered for CORS preflights).",
                    ((b"Allow", b", ".join(ISSUE_METHODS)),),
                )
            return self._issue(request, headers, context)
        except ApiError as refusal:
            log.info(
                "refused {method} {path} from {peer} (origin {origin}, subject {sub}): {reason}",
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1", "replace")[:200],
                reason=refusal.code,
                event="refused",
                sub=context.get("sub") or self._subjectForLog(request),
                **{k: v for k, v in context.items() if k != "sub"},
            )
            if self.policy.metrics is not None:
                self.policy.metrics.refused(refusal.code)
            headers.extend(refusal.headers)
            if refusal.status == 413:
                headers.append((b"Connection", b"close"))
            return _send(request, refusal.status, {"error": refusal.code, "message": refusal.message}, headers)

    def _subjectForLog(self, request: server.Request) -> str | None:
        """The connection's certificate subject, for refusals made before the certificate was looked at."""
        try:
            return self._identify(request.transport).subjectFor(self.policy.subjectFrom, subjectOf)  # type: ignore[attr-defined]
        except Exception:  # logging must never turn a refusal into an error
            return None

    def _preflight(self, request: server.Request, origin: str | None, headers: list[tuple[bytes, bytes]]) -> bytes:
        headers.append((b"Allow", b", ".join(ISSUE_METHODS)))
        if origin is not None and request.getHeader(b"access-control-request-method") is not None:
            headers.extend(self.policy.cors.preflightHeaders())
        return _send(request, 204, None, headers)

    def _issue(self, request: server.Request, headers: list[tuple[bytes, bytes]], context: dict[str, Any]) -> bytes:
        identity = self._identify(request.transport)  # type: ignore[attr-defined]
        if identity.certificate is None:
            hint = (
                " Browsers send it on cross-origin calls only with fetch(..., {credentials: 'include'})."
                if context["origin"] is not None
                else ""
            )
            raise ApiError(
                401,
                "client_certificate_required",
                "This connection carries no verified client certificate; present one issued by a trusted CA." + hint,
            )
        assert identity.certificate is not None
        subject = identity.subjectFor(self.policy.subjectFrom, subjectOf)
        if not subject:
            raise ApiError(
                403,
                "subject_missing",
                f"The client certificate has no {describeSubjectSource(self.policy.subjectFrom)}, "
                "which this issuer uses as the token's subject.",
            )
        context["sub"] = subject
        if not _isJsonContentType(request.getHeader(b"content-type")):
            raise ApiError(415, "unsupported_media_type", "Send the request body as Content-Type: application/json.")
        if getattr(request, "bodyTooLarge", False):
            raise ApiError(413, "body_too_large", f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        body = request.content.read() if request.content is not None else b""  # type: ignore[attr-defined]
        audience = parseIssueBody(body, self.policy.signer.algorithm)
        context["aud"] = audience
        allowed = self.policy.audiences
        if allowed is not None and audience not in allowed:
            raise ApiError(
                403, "audience_not_allowed", f"This issuer does not issue tokens for the audience {audience[:100]!r}."
            )
        flags = 0
        clientPolicy = self.policy.clientPolicy
        if clientPolicy is not None:
            try:
                flags = clientPolicy.decide(subject, audience)
            except PolicyRefusal as refusal:
                raise ApiError(403, refusal.code, refusal.message) from None
        thumbprint = None
        if self.policy.bindToken:
            der = identity.certificate.public_bytes(serialization.Encoding.DER)
            thumbprint = hashlib.sha256(der).digest()
        minted = self.policy.signer.mint(subject=subject, audience=audience, flags=flags, certificateSHA256=thumbprint)
        if self.policy.metrics is not None:
            self.policy.metrics.issued(audience, listed=allowed is not None)
        jti, peer, origin = minted.claims["jti"], context["peer"], context["origin"]
        # One line per token: rendered here, with the fields also kept for --log-format json.
        log.info(
            PRERENDERED,
            text=f"issued token sub={subject!r} aud={audience!r} jti={jti} peer={peer} origin={origin}",
            event="issued",
            sub=subject,
            aud=audience,
            jti=jti,
            peer=peer,
            origin=origin,
        )
        # What json.dumps makes of {"token": ..., "expires_in": ...}: a JWT is base64url and dots only.
        body = b'{"token":"%s","expires_in":%d}' % (minted.token.encode("ascii"), self.policy.signer.ttl)
        return _send(request, 200, body, headers)


def buildResourceTree(
    policy: IssuePolicy, identify: Callable[[Any], ClientIdentity] = clientIdentityOf
) -> resource.Resource:
    """The whole URL space: two issue paths, JSON 404 everywhere else."""
    notFound = JsonErrorResource(404, "not_found", NOT_FOUND_MESSAGE, policy.metrics, policy.cors)
    root = JsonDirectory(notFound)
    issue = IssueResource(policy, identify)
    root.issueResource = issue  # type: ignore[attr-defined]
    for prefix in (b"jwthmac", b"jwt"):
        branch = JsonDirectory(notFound)
        branch.putChild(b"issue", issue)
        root.putChild(prefix, branch)
    return root


class IssuerSite(server.Site):
    """A Site with our request and channel types and no per-request access log (we log events)."""

    requestFactory = IssuerRequest
    protocol = IssuerChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        root: resource.Resource,
        reactor: Any = None,
        idleTimeout: float = IDLE_TIMEOUT,
        requestTimeout: float = REQUEST_TIMEOUT,
    ):
        kwargs = {"reactor": reactor} if reactor is not None else {}
        super().__init__(root, timeout=idleTimeout, **kwargs)
        self.requestTimeout = requestTimeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.requestTimeout = self.requestTimeout
        return channel

    def log(self, request: object) -> None:
        pass
