"""
Assemble the running service from L{Settings}: certificate material, the TLS
context, the signer, the resource tree, the listening endpoints; and run its
life cycle: reload changed material, drain on shutdown.

With --workers N (N > 1) the same service plays one of two roles (see
L{tokenissuer.workers}): the supervisor binds the listening socket but serves
no TLS itself, runs the admin listener and the diagnostic page, and runs a
L{WorkerPool}; a worker adopts the supervisor's socket and runs neither.

Start-up problems end the process with one line on stderr and exit status 1.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from tokenissuer.admin import buildAdminSite
from tokenissuer.config import ConfigError, Settings, argumentsFor, devDirFrom, readHmacKeyFile, resolveSettings
from tokenissuer.metrics import IssuerMetrics, SupervisorMetrics
from tokenissuer.pemfiles import PemError, ServerIdentity, loadClientCAs, loadCRLs, loadServerIdentity, readFile
from tokenissuer.policy import ClientPolicy, PolicyError, loadPolicyFile
from tokenissuer.signer import SignerKeyError, SigningKey, TokenSigner, jwkThumbprint, publicJwk, signingKeyFrom
from tokenissuer.sockets import sendAtOnce
from tokenissuer.tls import IssuerTLSFactory, ServerConnectionCreator, buildServerContext
from tokenissuer.web import IssuePolicy, IssueResource, IssuerSite, buildResourceTree
from tokenissuer.workers import EXIT_GRACE, WorkerPool, WorkerRole, watchParent, workerRoleFrom

log = Logger()

#: A connection that has not sent a request this long after the drain began is closed.
_UNUSED_CONNECTION_GRACE = 1.0
_DRAIN_POLL = 0.05


class StartupError(SystemExit):
    """Stop start-up with one clear line and exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"tokenissuer: error: {message}")


class MaterialError(ValueError):
    """New certificate, key, CA or HMAC key material is unusable (message safe to log)."""


@dataclass(frozen=True)
class Material:
    """Everything read from files that a reload may replace."""

    identity: ServerIdentity
    context: SSL.Context
    hmacKey: bytes
    signingKey: SigningKey | None = None
    audienceKeys: dict[str, SigningKey] = field(default_factory=dict)
    retiredJwks: tuple[dict[str, str], ...] = ()
    clientPolicy: ClientPolicy | None = None
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    clientCAs: tuple[x509.Certificate, ...] = ()


def loadMaterial(settings: Settings) -> Material:
    """Read and check certificate, key, client CAs (and the HMAC key file), build the TLS context."""
    try:
        identity = loadServerIdentity(settings.cert, settings.key)
        clientCAs = loadClientCAs(settings.clientCA)
        crls = loadCRLs(settings.crlFiles, clientCAs)
    except PemError as error:
        raise MaterialError(str(error)) from None
    clientPolicy = None
    if settings.policyFile is not None:
        try:
            clientPolicy = loadPolicyFile(settings.policyFile, readFile(settings.policyFile, "policy"))
        except (PemError, PolicyError) as error:
            raise MaterialError(str(error)) from None
    try:
        context = buildServerContext(
            identity, clientCAs, settings.clientAuth, crls, acceptExpiredCRL=settings.crlExpired == "accept"
        )
    except Exception as error:  # OpenSSL refuses what cryptography accepted
        raise MaterialError(f"the TLS context cannot be built: {error}") from None
    hmacKey = settings.hmacKey
    try:
        if settings.hmacKeyFile is not None:
            hmacKey = readHmacKeyFile(settings.hmacKeyFile)
        where = f"file {settings.hmacKeyFile!r}" if settings.hmacKeyFile else settings.hmacKeySource
        signingKey = signingKeyFrom(settings.algorithm, hmacKey, settings.keyId, where) if hmacKey else None
        audienceKeys = {
            audience: signingKeyFrom(settings.algorithm, material, None, f"the key for {audience!r}")
            for audience, material in settings.audienceKeyMaterial.items()
        }
        retired = tuple(_retiredJwk(path, settings.algorithm) for path in settings.retiredKeyFiles)
    except (ConfigError, SignerKeyError, PemError) as error:
        raise MaterialError(str(error)) from None
    return Material(
        identity=identity,
        context=context,
        hmacKey=hmacKey,
        signingKey=signingKey,
        audienceKeys=audienceKeys,
        retiredJwks=retired,
        clientPolicy=clientPolicy,
        crls=tuple(crls),
        clientCAs=tuple(clientCAs),
    )


def _retiredJwk(path: str, algorithm: str) -> dict[str, str]:
    """The public JWK of a retired key file (a PEM public or private key), kid from its thumbprint."""
    data = readFile(path, "retired key")
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except Exception:
            raise PemError(f"retired key file {path!r} holds no PEM public or private key") from None
    jwk = publicJwk(key, algorithm)
    jwk["kid"] = jwkThumbprint(jwk)
    return jwk


def materialFingerprint(settings: Settings) -> bytes:
    """The current bytes of every watched file (cheap: a few small files), to detect changes."""
    paths = [settings.cert, settings.key, settings.clientCA, *settings.crlFiles, *settings.retiredKeyFiles]
    if settings.policyFile is not None:
        paths.append(settings.policyFile)
    if settings.hmacKeyFile is not None:
        paths.append(settings.hmacKeyFile)
    parts = []
    for path in paths:
        try:
            parts.append(readFile(path, "watched"))
        except PemError:
            parts.append(b"\0missing\0")
    return hashlib.sha256(b"\0\0".join(parts)).digest()


class IssuerService(service.Service):
    """
    Listen when started; log the summary line; reload changed material; on stop,
    turn not-ready, stop accepting, let requests in flight finish, then close.

    With a C{pool} it is the supervisor of --workers, with a C{worker} role one
    of its workers (see the module's docstring).
    """

    name = "tokenissuer"

    def __init__(
        self,
        settings: Settings,
        material: Material,
        reactor: Any,
        handleTermination: bool = False,
        *,
        worker: WorkerRole | None = None,
        pool: WorkerPool | None = None,
    ):
        self.handleTermination = handleTermination
        self.settings = settings
        self.reactor = reactor
        self.worker = worker
        self.pool = pool
        self.metrics = IssuerMetrics(worker=worker is not None)
        self.supervisorMetrics: SupervisorMetrics | None = None
        if pool is not None:
            self.supervisorMetrics = SupervisorMetrics(self.metrics, lambda: pool.metricsFolder)
            pool.onRestart = self.supervisorMetrics.workerRestarts.inc
        self.material = material
        self.metrics.serverCertificateInUse(material.identity.leaf.not_valid_after_utc.timestamp())
        self.signer = TokenSigner(material.signingKey, settings.issuer, settings.ttl, material.audienceKeys)
        self.signer.publishRetired(list(material.retiredJwks))
        self.creator = ServerConnectionCreator(material.context)
        self.policy = IssuePolicy(
            signer=self.signer,
            cors=settings.origins,
            audiences=settings.audiences,
            metrics=self.metrics,
            subjectFrom=settings.subjectFrom,
            bindToken=settings.bindToken,
            clientPolicy=material.clientPolicy,
        )
        self._noteCRLs(material)
        root = buildResourceTree(self.policy)
        self.issueResource: IssueResource = root.issueResource  # type: ignore[attr-defined]
        self.site = IssuerSite(
            root, reactor=reactor, idleTimeout=settings.idleTimeout, requestTimeout=settings.requestTimeout
        )
        self.factory = IssuerTLSFactory(
            self.creator,
            self.site,
            onHandshakeFailure=self.metrics.handshakeFailed,
            reactor=reactor,
            handshakeTimeout=settings.handshakeTimeout,
            maxConnections=settings.maxConnections,
            onConnectionRefused=self.metrics.connectionsRefused.inc,
        )
        self.port: IListeningPort | None = None
        self.adminPort: IListeningPort | None = None
        self.demoPort: IListeningPort | None = None
        self.draining = False
        self._fingerprint = materialFingerprint(settings)
        self._watcher: LoopingCall | None = None
        self._rotator: LoopingCall | None = None
        self._parentWatch: LoopingCall | None = None
        self._previousHangup: Any = None

    # Readiness and reload

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining for shutdown"
        if self.port is None:
            return False, "not listening"
        if self.pool is not None:
            running = self.pool.running()
            if not running:
                return False, f"no worker is running (of {self.pool.count})"
            return True, f"serving with {running} of {self.pool.count} workers"
        return True, "serving"

    def reload(self, force: bool = False) -> bool | None:
        """
        Swap in changed material for new connections (existing ones keep theirs).
        Returns None when nothing changed, else whether the new material was taken.
        """
        fingerprint = materialFingerprint(self.settings)
        if fingerprint == self._fingerprint and not force:
            return None
        # Remember what we looked at, so a broken file is reported once, not every poll.
        self._fingerprint = fingerprint
        try:
            material = loadMaterial(self.settings)
        except MaterialError as error:
            self.metrics.reloaded(False)
            log.error(
                "reload failed, still serving the previous material: {error}",
                error=str(error),
                event="reload",
                outcome="failure",
            )
            return False
        self.creator.context = material.context
        self.policy.clientPolicy = material.clientPolicy
        self._noteCRLs(material)
        keyChanged = self.signer.replaceKeys(material.signingKey, material.audienceKeys)
        self.signer.publishRetired(list(material.retiredJwks))
        self.material = material
        self.metrics.serverCertificateInUse(material.identity.leaf.not_valid_after_utc.timestamp())
        self.metrics.reloaded(True)
        log.info(
            "reloaded: server certificate {certificate}; signing key {keyState}",
            event="reload",
            outcome="success",
            certificate=material.identity.describe(),
            keyState="changed" if keyChanged else "unchanged",
        )
        return True

    def rotateSessionKeys(self) -> None:
        """
        A fresh TLS context for new connections, from the material in use: new
        session-ticket keys and an empty session cache, so a stolen ticket key
        or session opens old sessions for one rotation period at most.
        """
        material = self.material
        try:
            self.creator.context = buildServerContext(
                material.identity,
                list(material.clientCAs),
                self.settings.clientAuth,
                list(material.crls),
                acceptExpiredCRL=self.settings.crlExpired == "accept",
            )
        except Exception:
            # Keep serving with the current context (and keep the rotation schedule).
            log.failure("could not renew the TLS session keys; the current ones stay in use")

    #: Set by L{makeService} when twistd would write its text log to stdout:
    #: then our cheaper observer writes the same lines there instead.
    textLogToStdout = False

    def setServiceParent(self, parent: Any) -> None:
        """
        twistd hands us its Application here. With --log-format json, give it a
        JSON log observer, which twistd then uses instead of its text log; with
        text, when the log goes to stdout anyway, our text observer (same
        format, cheaper per line: every token is logged).
        """
        if hasattr(parent, "setComponent"):
            import sys

            from twisted.logger import ILogObserver

            from tokenissuer.audit import jsonLineObserver, textLineObserver

            # A worker writing the shared log itself tags each line as its own; a
            # relaying worker sends JSON lines to its supervisor, which logs them
            # in the configured format.
            worker = self.worker
            extra: dict[str, Any] | None = None
            tag = ""
            if worker is not None and worker.directLog:
                extra, tag = {"worker": worker.index, "worker_pid": os.getpid()}, worker.tag
            if self.settings.logFormat == "json" or (worker is not None and not worker.directLog):
                parent.setComponent(ILogObserver, jsonLineObserver(sys.stdout, extra=extra))
            elif tag or self.textLogToStdout:
                parent.setComponent(ILogObserver, textLineObserver(sys.stdout, tag=tag))
        super().setServiceParent(parent)

    def _jwks(self) -> dict[str, Any] | None:
        """The JWKS for consumers of asymmetric tokens (None for HMAC: nothing public to publish)."""
        if self.signer.algorithm.startswith("HS"):
            return None
        return self.signer.jwks()

    def _noteCRLs(self, material: Material) -> None:
        """Publish the earliest CRL next-update time; warn about expired CRLs (they fail closed by default)."""
        nextUpdates = [crl.next_update_utc for crl in material.crls if crl.next_update_utc is not None]
        self.metrics.crlNextUpdate(min(nextUpdates).timestamp() if nextUpdates else None)
        now = self.reactor.seconds()
        for crl in material.crls:
            if crl.next_update_utc is not None and crl.next_update_utc.timestamp() < now:
                log.warn(
                    "the CRL of {issuer} expired at {when}: its client certificates are {effect}",
                    issuer=crl.issuer.rfc4514_string(),
                    when=crl.next_update_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    effect="accepted (crl-expired=accept)" if self.settings.crlExpired == "accept" else "refused",
                )

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload, True)
        if self.pool is not None:
            self.reactor.callFromThread(self.pool.signalAll, signal.SIGHUP)

    # Life cycle

    def startService(self) -> None:
        super().startService()
        if self.worker is not None:
            self._adopt(self.worker)
        else:
            self._listen()
        if self.settings.ticketKeyRotation > 0 and self.pool is None:
            self._rotator = LoopingCall(self.rotateSessionKeys)
            self._rotator.clock = self.reactor
            self._rotator.start(self.settings.ticketKeyRotation, now=False)
        if self.settings.reloadInterval > 0:
            self._watcher = LoopingCall(self.reload)
            self._watcher.clock = self.reactor
            self._watcher.start(self.settings.reloadInterval, now=False)
        try:
            self._previousHangup = signal.signal(signal.SIGHUP, self._hangup)
        except ValueError:  # not the main thread (tests): no signal handling
            self._previousHangup = None
        if self.handleTermination:
            # After the reactor's own handlers are in place, replace its SIGTERM
            # handling: twistd would otherwise end by re-raising SIGTERM (exit
            # status 143) even after a clean drain; we stop and exit 0.
            self.reactor.callWhenRunning(self._installTerminationHandler)
        if self.worker is not None:
            self.reactor.callWhenRunning(self._watchSupervisor, self.worker.parentPid)
        self.metrics.ready.set(1)

    def _listen(self) -> None:
        """Listen on the TLS endpoint (the supervisor: for its workers), the admin endpoint, the diagnostic page."""
        from twisted.internet.endpoints import serverFromString

        failures: list[Any] = []
        endpoint = serverFromString(self.reactor, self.settings.listen)
        endpoint.listen(self.factory).addCallbacks(self._listening, failures.append)
        if failures:
            # TCP listening happens at once; failing here keeps the error to one line.
            raise StartupError(f"cannot listen on {self.settings.listen}: {failures[0].getErrorMessage()}")
        if self.pool is not None:
            self._prepareWorkers(self.pool)
        try:
            if self.settings.adminListen is not None:
                registry = self.metrics.registry if self.supervisorMetrics is None else self.supervisorMetrics.registry
                adminEndpoint = serverFromString(self.reactor, self.settings.adminListen)
                adminEndpoint.listen(buildAdminSite(registry, self.readiness, jwks=self._jwks)).addCallbacks(
                    self._adminListening, failures.append
                )
                if failures:
                    raise StartupError(
                        f"cannot listen on the admin endpoint {self.settings.adminListen}: "
                        f"{failures[0].getErrorMessage()}"
                    )
            if self.settings.demoListen is not None:
                self._startDemo(serverFromString(self.reactor, self.settings.demoListen))
        except BaseException:
            if self.pool is not None:
                self.pool.discard()
            raise
        if self.pool is not None:
            assert self.port is not None
            # Once start-up has succeeded and the reactor runs, the workers take the socket.
            self.reactor.callWhenRunning(self.pool.start, self.port.fileno())  # type: ignore[attr-defined]

    def _prepareWorkers(self, pool: WorkerPool) -> None:
        """The supervisor accepts nothing on its socket; its workers get a folder for their metrics."""
        port = self.port
        if getattr(port, "fileno", None) is None or getattr(port, "stopReading", None) is None:
            raise StartupError(f"--workers needs a socket endpoint to share; {self.settings.listen} is not one")
        port.stopReading()  # type: ignore[union-attr]
        try:
            pool.prepare()
        except OSError as error:
            raise StartupError(
                f"cannot create a folder for the workers' metrics in {tempfile.gettempdir()}: {error.strerror} "
                "(set TMPDIR to a writable folder)"
            ) from None

    def _adopt(self, role: WorkerRole) -> None:
        """A worker: serve the listening socket the supervisor passed as file descriptor C{role.fd}."""
        import socket

        try:
            inherited = socket.socket(fileno=role.fd)
        except OSError as error:
            raise StartupError(f"worker: file descriptor {role.fd} is not a socket: {error.strerror}") from None
        try:
            inherited.setblocking(False)
            port = self.reactor.adoptStreamPort(inherited.fileno(), inherited.family, self.factory)
        finally:
            inherited.close()  # the port holds its own duplicate
        self._listening(port)

    def _watchSupervisor(self, parentPid: int) -> None:
        def gone() -> None:
            log.warn("the supervisor (pid {pid}) is gone: draining, then exiting", pid=parentPid)
            try:
                self.reactor.stop()
            except ReactorNotRunning:  # already stopping
                pass

        self._parentWatch = watchParent(self.reactor, parentPid, gone)

    def _installTerminationHandler(self) -> None:
        def terminate(signum: int, frame: Any) -> None:
            log.info("received {name}: draining, then exiting", name=signal.Signals(signum).name)
            self.reactor.callFromThread(self.reactor.stop)

        signal.signal(signal.SIGTERM, terminate)
        if self.pool is not None:
            # The supervisor stops its workers on Ctrl-C too ...
            signal.signal(signal.SIGINT, terminate)
        elif self.worker is not None:
            # ... which is also sent to them (the same process group): they wait for its SIGTERM.
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _adminListening(self, port: IListeningPort) -> None:
        self.adminPort = port

    def _startDemo(self, endpoint: Any) -> None:
        """Serve the diagnostic page; a busy port is fatal unless the page is only dev mode's default."""
        from tokenissuer.demo import FALLBACK_AUDIENCE, buildDemoSite, issuerUrlFor

        assert self.port is not None
        issuerPort = getattr(self.port.getHost(), "port", None)
        audience = sorted(self.settings.audiences)[0] if self.settings.audiences else FALLBACK_AUDIENCE
        site = buildDemoSite(lambda: issuerUrlFor(self.material.identity.leaf, issuerPort), audience)
        failures: list[Any] = []
        endpoint.listen(site).addCallbacks(self._demoListening, failures.append)
        if not failures:
            return
        problem = f"cannot serve the diagnostic page on {self.settings.demoListen}: {failures[0].getErrorMessage()}"
        if not self.settings.demoIsDevDefault:
            raise StartupError(problem)
        log.warn("development mode: {problem}; choose another with --demo-port, or 'off'", problem=problem)

    def _demoListening(self, port: IListeningPort) -> None:
        from tokenissuer.demo import issuerUrlFor, pageUrlFor

        self.demoPort = port
        address = port.getHost()
        url = pageUrlFor(str(getattr(address, "host", "")), getattr(address, "port", 0))
        origin = url.rstrip("/")
        issuerPort = getattr(self.port.getHost(), "port", None) if self.port is not None else None
        log.info(
            "diagnostic page: open {url} in a browser that holds a client certificate; it calls {issuer}{note}",
            url=url,
            issuer=issuerUrlFor(self.material.identity.leaf, issuerPort),
            note=""
            if self.settings.origins.isAllowed(origin)
            else f" (its origin {origin} is not in the allowed origins: add it to TOK_ISS_ALLOWED_ORIGINS)",
        )

    def _listening(self, port: IListeningPort) -> None:
        sendAtOnce(port)
        self.port = port
        settings = self.settings
        if self.worker is not None:
            # The supervisor logged the summary.
            log.info("worker ready: accepting on port {port}", port=getattr(port.getHost(), "port", "?"))
            return
        audiences = " ".join(sorted(settings.audiences)) if settings.audiences else "any"
        log.info(
            "tokenissuer ready: issuer={issuer!r} listen={listen} (port {port}) audiences={audiences} "
            "origins={origins} client-auth={clientAuth} ttl={ttl}s admin={admin} server certificate={certificate}"
            + ("" if self.pool is None else " workers={workers}"),
            issuer=settings.issuer,
            listen=settings.listen,
            port=getattr(port.getHost(), "port", "?"),
            audiences=audiences,
            origins=str(settings.origins),
            clientAuth=settings.clientAuth,
            ttl=settings.ttl,
            admin=settings.adminListen or "off",
            certificate=self.material.identity.describe(),
            workers=settings.workers,
        )
        if settings.dev:
            self._printDevHelp(getattr(port.getHost(), "port", 4443))

    def _printDevHelp(self, port: int) -> None:
        from tokenissuer.devpki import DEV_P12_PASSWORD, DevFiles

        files = DevFiles(self.settings.devDir)
        audience = sorted(self.settings.audiences)[0] if self.settings.audiences else "gschmarri"
        command = " ".join(
            [
                "curl",
                "--cacert",
                shlex.quote(files.caCert),
                "--cert",
                shlex.quote(files.clientCert),
                "--key",
                shlex.quote(files.clientKey),
                "-H",
                shlex.quote("Content-Type: application/json"),
                "-d",
                shlex.quote(f'{{"audience": "{audience}"}}'),
                f"https://localhost:{port}/jwthmac/issue",
            ]
        )
        log.info("development mode: get a token with:\n    {command}", command=command)
        log.info(
            "development mode: import {p12} (password {password!r}) into a browser to call it from a page",
            p12=files.clientP12,
            password=DEV_P12_PASSWORD,
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        self.draining = True
        self.issueResource.draining = True
        self.metrics.ready.set(0)
        if self._watcher is not None and self._watcher.running:
            self._watcher.stop()
        if self._rotator is not None and self._rotator.running:
            self._rotator.stop()
        if self._parentWatch is not None and self._parentWatch.running:
            self._parentWatch.stop()
        if self._previousHangup is not None:
            signal.signal(signal.SIGHUP, self._previousHangup)
        stopping = []
        if self.port is not None:
            port, self.port = self.port, None
            if self.pool is not None:
                # The supervisor accepts nothing: it only shrinks the shared queue before closing its copy.
                _shrinkAcceptQueue(port)
            else:
                # A worker leaves the shared queue's length alone: the others may go on serving.
                _acceptQueued(port, shrink=self.worker is None)
            stopping.append(port.stopListening())
        await DeferredList([d for d in stopping if d is not None])
        if self.pool is not None:
            await self.pool.stop(self.settings.drainSeconds + EXIT_GRACE)
        open_ = len(self.factory.connections)
        if open_:
            log.info(
                "draining {count} connection(s) for up to {seconds:g}s",
                count=open_,
                seconds=self.settings.drainSeconds,
            )
        deadline = self.reactor.seconds() + self.settings.drainSeconds
        drainStarted = self.reactor.seconds()
        while self.factory.connections and self.reactor.seconds() < deadline:
            for connection in list(self.factory.connections):
                channel = connection.wrappedProtocol
                busy = bool(getattr(channel, "requests", None))
                served = getattr(channel, "requestsServed", 0)
                if busy:
                    continue
                if served or self.reactor.seconds() - drainStarted > _UNUSED_CONNECTION_GRACE:
                    # Idle keep-alive (or never used): nothing is in flight. Send
                    # close_notify and close the socket without waiting for the
                    # peer's close_notify, which an idle client may never send.
                    connection.loseConnection()
                    if connection.transport is not None:
                        connection.transport.loseConnection()
            await deferLater(self.reactor, _DRAIN_POLL, lambda: None)
        left = list(self.factory.connections)
        if left:
            log.warn("drain time is up: closing {count} connection(s) still open", count=len(left))
            for connection in left:
                connection.abortConnection()
        if self.adminPort is not None:
            adminPort, self.adminPort = self.adminPort, None
            await adminPort.stopListening()  # type: ignore[misc]
        if self.demoPort is not None:
            demoPort, self.demoPort = self.demoPort, None
            await demoPort.stopListening()  # type: ignore[misc]


def _acceptQueued(port: Any, shrink: bool = True) -> None:
    """
    Take the connections already waiting in the kernel's accept queue before the
    listener closes (closing would reset them), and shrink the queue so that
    connections arriving meanwhile wait and are then refused rather than reset
    (not with C{shrink=False}: a worker shares the queue with the others).
    """
    if shrink:
        _shrinkAcceptQueue(port)
    if getattr(port, "socket", None) is None:
        return
    try:
        port.doRead()
    except OSError:
        pass


def _shrinkAcceptQueue(port: Any) -> None:
    socket_ = getattr(port, "socket", None)
    if socket_ is None:
        return
    try:
        socket_.listen(0)
    except OSError:
        pass


def buildService(
    settings: Settings,
    reactor: Any = None,
    handleTermination: bool = False,
    *,
    worker: WorkerRole | None = None,
    pool: WorkerPool | None = None,
) -> IssuerService:
    """Check all material and build the (not yet listening) service, or raise L{StartupError}."""
    if reactor is None:
        from twisted.internet import reactor as defaultReactor

        reactor = defaultReactor
    from twisted.internet.endpoints import serverFromString

    try:
        material = loadMaterial(settings)
    except MaterialError as error:
        raise StartupError(str(error)) from None
    for what, description in (
        ("listen", settings.listen),
        ("admin-listen", settings.adminListen),
        ("demo-port", settings.demoListen),
    ):
        if description is None:
            continue
        try:
            serverFromString(reactor, description)
        except Exception as error:
            raise StartupError(f"{what} endpoint {description!r} is invalid: {error}") from None
    try:
        return IssuerService(settings, material, reactor, handleTermination, worker=worker, pool=pool)
    except SignerKeyError as error:
        raise StartupError(str(error)) from None


def makeService(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> IssuerService:
    """twistd entry point: resolve settings (creating the dev PKI if asked), then build."""
    if options.get("dev"):
        from tokenissuer.devpki import ensureDevFiles

        devDir = devDirFrom(options, os.environ if environ is None else environ)
        try:
            _, created = ensureDevFiles(devDir)
        except FileExistsError as error:
            raise StartupError(str(error)) from None
        except OSError as error:
            raise StartupError(f"cannot create the development folder {devDir!r}: {error.strerror}") from None
        if created:
            log.info("development mode: created a throwaway PKI and HMAC key in {folder}", folder=devDir)
    try:
        settings = resolveSettings(options, environ)
        worker = workerRoleFrom(options)
    except (ConfigError, ValueError) as error:
        raise StartupError(str(error)) from None
    if worker is not None:
        # The supervisor has warned about the settings already.
        return buildService(settings, handleTermination=True, worker=worker)
    if settings.audiences is None:
        log.warn("TOK_ISS_ALLOWED_AUDIENCES is not set: tokens are issued for any audience a client asks for")
    if settings.ttl > 3600:
        log.warn(
            "token lifetime {ttl}s exceeds 3600s: consumers that check the iat age like the original's "
            "reject tokens after an hour",
            ttl=settings.ttl,
        )
    pool = None
    if settings.workers > 1:
        from twisted.internet import reactor

        textLog = settings.logFormat == "text"
        pool = WorkerPool(
            reactor,
            settings.workers,
            argumentsFor(options),
            textLog=textLog,
            # Our own observer writes the supervisor's log to stdout: then the workers can too.
            directLog=not textLog or twistdLogsToStdout(getattr(options, "parent", None)),
            withMetrics=settings.adminListen is not None,
        )
    built = buildService(settings, handleTermination=True, pool=pool)
    built.textLogToStdout = twistdLogsToStdout(getattr(options, "parent", None))
    return built


def twistdLogsToStdout(twistdOptions: Mapping[str, Any] | None) -> bool:
    """
    Whether twistd (whose options are our options' parent) would write its
    text log to stdout: C{-n} without C{--logfile} (or with C{--logfile -}),
    no C{--syslog}, no C{--logger}.
    """
    if twistdOptions is None:
        return False
    return bool(
        twistdOptions.get("nodaemon")
        and twistdOptions.get("logfile") in (None, "", "-")
        and not twistdOptions.get("syslog")
        and not twistdOptions.get("logger")
    )
