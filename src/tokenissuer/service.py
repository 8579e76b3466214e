"""
Assemble the running service from L{Settings}: certificate material, the TLS
context, the signer, the resource tree and the listening endpoint.

Start-up problems end the process with one line on stderr and exit status 1.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from typing import Any

from twisted.application import service
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from tokenissuer.config import ConfigError, Settings, devDirFrom, resolveSettings
from tokenissuer.pemfiles import PemError, loadClientCAs, loadServerIdentity
from tokenissuer.signer import HmacTokenSigner, SignerKeyError
from tokenissuer.tls import ServerConnectionCreator, buildServerContext
from tokenissuer.web import IssuePolicy, IssuerSite, buildResourceTree

log = Logger()


class StartupError(SystemExit):
    """Stop start-up with one clear line and exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"tokenissuer: error: {message}")


class IssuerService(service.Service):
    """Listen on the endpoint when started, log the summary line, stop listening when stopped."""

    name = "tokenissuer"

    def __init__(self, endpoint: Any, factory: Any, settings: Settings, certificateSummary: str):
        self.endpoint = endpoint
        self.factory = factory
        self.settings = settings
        self.certificateSummary = certificateSummary
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        failures: list[Any] = []
        self.endpoint.listen(self.factory).addCallbacks(self._listening, failures.append)
        if failures:
            # TCP listening happens at once; failing here keeps the error to one line.
            raise StartupError(f"cannot listen on {self.settings.listen}: {failures[0].getErrorMessage()}")

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        settings = self.settings
        audiences = " ".join(sorted(settings.audiences)) if settings.audiences else "any"
        log.info(
            "tokenissuer ready: issuer={issuer!r} listen={listen} (port {port}) audiences={audiences} "
            "origins={origins} client-auth={clientAuth} ttl={ttl}s server certificate={certificate}",
            issuer=settings.issuer,
            listen=settings.listen,
            port=getattr(port.getHost(), "port", "?"),
            audiences=audiences,
            origins=str(settings.origins),
            clientAuth=settings.clientAuth,
            ttl=settings.ttl,
            certificate=self.certificateSummary,
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

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def buildService(settings: Settings, reactor: Any = None) -> IssuerService:
    """Check all material and build the (not yet listening) service, or raise L{StartupError}."""
    if reactor is None:
        from twisted.internet import reactor as defaultReactor

        reactor = defaultReactor
    from twisted.internet.endpoints import serverFromString

    try:
        identity = loadServerIdentity(settings.cert, settings.key)
        clientCAs = loadClientCAs(settings.clientCA)
    except PemError as error:
        raise StartupError(str(error)) from None
    try:
        context = buildServerContext(identity, clientCAs, settings.clientAuth)
    except Exception as error:  # OpenSSL refuses what cryptography accepted
        raise StartupError(f"the TLS context cannot be built: {error}") from None
    try:
        signer = HmacTokenSigner(settings.hmacKey, settings.issuer, settings.ttl)
    except SignerKeyError as error:
        raise StartupError(str(error)) from None
    try:
        endpoint = serverFromString(reactor, settings.listen)
    except Exception as error:
        raise StartupError(f"listen endpoint {settings.listen!r} is invalid: {error}") from None

    policy = IssuePolicy(signer=signer, cors=settings.origins, audiences=settings.audiences)
    site = IssuerSite(buildResourceTree(policy), reactor=reactor)
    factory = TLSMemoryBIOFactory(ServerConnectionCreator(context), False, site)
    factory.noisy = False
    return IssuerService(endpoint, factory, settings, identity.describe())


def makeService(options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> IssuerService:
    """twistd entry point: resolve settings (creating the dev PKI if asked), then build."""
    if options.get("dev"):
        from tokenissuer.devpki import ensureDevFiles

        devDir = devDirFrom(options, os.environ if environ is None else environ)
        try:
            _, created = ensureDevFiles(devDir)
        except OSError as error:
            raise StartupError(f"cannot create the development folder {devDir!r}: {error.strerror}") from None
        if created:
            log.info("development mode: created a throwaway PKI and HMAC key in {folder}", folder=devDir)
    try:
        settings = resolveSettings(options, environ)
    except ConfigError as error:
        raise StartupError(str(error)) from None
    if settings.audiences is None:
        log.warn("TOK_ISS_ALLOWED_AUDIENCES is not set: tokens are issued for any audience a client asks for")
    if settings.ttl > 3600:
        log.warn(
            "token lifetime {ttl}s exceeds 3600s: consumers that check the iat age like the original's "
            "reject tokens after an hour",
            ttl=settings.ttl,
        )
    return buildService(settings)
