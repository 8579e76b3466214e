"""
Shared test fixtures: a throwaway PKI written to a temporary folder, an issuer
started in-process on a free loopback port, and a blocking HTTPS client (the
standard library's, run in a thread) that can present a client certificate and
resume TLS sessions.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import reactor, tcp
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from tokenissuer import devpki
from tokenissuer.config import resolveSettings
from tokenissuer.service import IssuerService, buildService

#: A 48-byte HMAC key for tests; it must never appear in logs.
TEST_HMAC_KEY = "test-hmac-key-that-is-long-enough-for-hs256-0123"


class TestPKI:
    """A CA, a server certificate and a set of good and bad client certificates, as files."""

    def __init__(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        now = datetime.datetime.now(datetime.UTC)
        self.ca = devpki.makeCA("tokenissuer test CA")
        self.otherCA = devpki.makeCA("some other CA")
        self.server = devpki.issueServer(self.ca)
        self.client = devpki.issueClient(self.ca, "Martin2")
        self.untrusted = devpki.issueClient(self.otherCA, "Mallory")
        self.expired = devpki.issueClient(
            self.ca, "Expired", notBefore=now - datetime.timedelta(days=30), notAfter=now - datetime.timedelta(days=1)
        )
        self.notYetValid = devpki.issueClient(
            self.ca, "Early", notBefore=now + datetime.timedelta(days=1), notAfter=now + datetime.timedelta(days=30)
        )
        self.serverAuthOnly = devpki.issue(self.ca, "WrongPurpose", usages=[ExtendedKeyUsageOID.SERVER_AUTH])
        self.noCommonName = devpki.issue(self.ca, "", usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
        self.write("ca.pem", self.ca.certificatePEM())
        self.write("server.crt", self.server.certificatePEM())
        self.write("server.pem", self.server.keyPEM())

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.folder, name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def clientFiles(self, issued: devpki.Issued, name: str) -> tuple[str, str]:
        """Write a client certificate and key; return their paths."""
        return self.write(f"{name}.crt", issued.certificatePEM()), self.write(f"{name}.key", issued.keyPEM())


class LogCapture:
    """Collect twisted.logger events (formatted) for the lifetime of a test."""

    def __init__(self, testCase: Any) -> None:
        from twisted.logger import formatEvent

        self.events: list[dict[str, Any]] = []
        self._format = formatEvent
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def messages(self) -> list[str]:
        return [self._format(event) for event in self.events]

    def issued(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event") == "issued"]

    def text(self) -> str:
        return "\n".join(self.messages())


def startIssuer(
    testCase: Any, pki: TestPKI, environ: dict[str, str] | None = None, **options: Any
) -> tuple[int, IssuerService]:
    """Start an issuer in this process on a free loopback port; stop it on cleanup."""
    values: dict[str, Any] = {
        "listen": "tcp:0:interface=127.0.0.1",
        "admin-listen": "tcp:0:interface=127.0.0.1",
        "cert": pki.path("server.crt"),
        "key": pki.path("server.pem"),
        "client-ca": pki.path("ca.pem"),
        "origins": "http://localhost:8000 https://app.example.org",
        "audiences": "gschmarri dummy",
    }
    values.update(options)
    settings = resolveSettings(values, environ if environ is not None else {"TOK_ISS_HMAC_SECRET": TEST_HMAC_KEY})
    service = buildService(settings, reactor)
    service.startService()
    testCase.addCleanup(_stopIssuer, service)
    assert service.port is not None
    return service.port.getHost().port, service  # type: ignore[attr-defined]


async def _stopIssuer(service: IssuerService) -> None:
    await service.stopService()
    # Drop server-side connections the clients left behind, then let the
    # reactor process the closes so trial sees a clean reactor.
    for selectable in list(reactor.getReaders()) + list(reactor.getWriters()):  # type: ignore[attr-defined]
        if isinstance(selectable, tcp.Server):
            selectable.abortConnection()
    for _ in range(3):
        await deferLater(reactor, 0.01, lambda: None)


@dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    session: ssl.SSLSession | None = None
    sessionReused: bool = False
    tlsVersion: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    """A blocking HTTPS client; run its calls in a thread (deferToThread)."""

    port: int
    caFile: str
    certFile: str | None = None
    keyFile: str | None = None
    maxVersion: ssl.TLSVersion | None = None
    connections: list[http.client.HTTPConnection] = field(default_factory=list)

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.caFile)
        if self.certFile:
            context.load_cert_chain(self.certFile, self.keyFile)
        if self.maxVersion is not None:
            context.maximum_version = self.maxVersion
        return context

    def connect(
        self, session: ssl.SSLSession | None = None, context: ssl.SSLContext | None = None
    ) -> http.client.HTTPConnection:
        """Open one TLS connection (optionally resuming C{session}) for several requests."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        wrapped = (context or self.context()).wrap_socket(raw, server_hostname="localhost", session=session)
        connection = http.client.HTTPConnection("localhost", self.port, timeout=10)
        connection.sock = wrapped
        self.connections.append(connection)
        return connection

    def request(
        self,
        connection: http.client.HTTPConnection,
        method: str = "POST",
        path: str = "/jwthmac/issue",
        body: bytes | None = b'{"audience": "gschmarri"}',
        headers: dict[str, str] | None = None,
    ) -> Response:
        allHeaders = {"Content-Type": "application/json"} if body is not None else {}
        allHeaders.update(headers or {})
        connection.request(method, path, body=body, headers=allHeaders)
        sock = connection.sock  # http.client drops it when the server closes
        assert isinstance(sock, ssl.SSLSocket)
        answer = connection.getresponse()
        data = answer.read()
        return Response(answer.status, answer.headers, data, sock.session, sock.session_reused, sock.version())

    def call(self, **kwargs: Any) -> Response:
        """One request on a new connection, closed afterwards."""
        connection = self.connect()
        try:
            return self.request(connection, **kwargs)
        finally:
            connection.close()

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


#: The twistd command of the Python running the tests (an installed `twistd` script may belong to another one).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def cleanEnviron(**extra: str) -> dict[str, str]:
    """This process's environment without any TOK_ISS_ setting of the caller's, plus C{extra}."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TOK_ISS_")}
    environ.update(extra)
    return environ


def readUntil(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    """Read the child's output until a line contains C{marker} (or it exits / time runs out)."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            break
    return "".join(lines)


@dataclass
class IssuerProcess:
    """A `twistd -n tokenissuer` child process and its log, read continuously in a thread."""

    process: subprocess.Popen[str]
    port: int
    lines: list[str]
    reader: threading.Thread

    def log(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, wait for the exit and the last log line; return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout)
        self.reader.join(10)
        return status


def issuerCommand(pki: TestPKI, *arguments: str) -> list[str]:
    """The real twistd command for the PKI's files on a free loopback port, no admin listener, plus C{arguments}."""
    return [
        *TWISTD,
        "-n",
        "--pidfile=",
        "tokenissuer",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--admin-listen",
        "off",
        "--cert",
        pki.path("server.crt"),
        "--key",
        pki.path("server.pem"),
        "--client-ca",
        pki.path("ca.pem"),
        *arguments,
    ]


def spawnIssuer(testCase: Any, pki: TestPKI, *arguments: str, environ: dict[str, str] | None = None) -> IssuerProcess:
    """
    Start the real command on a free loopback port with the PKI's files and the
    test key (blocking until it is ready: run it in a thread from async tests);
    C{environ} adds variables to its environment.
    """
    process = subprocess.Popen(
        issuerCommand(pki, *arguments),
        env=cleanEnviron(TOK_ISS_HMAC_SECRET=TEST_HMAC_KEY, **(environ or {})),
        cwd=pki.folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    testCase.addCleanup(lambda: process.poll() is None and process.kill())
    output = readUntil(process, "tokenissuer ready", 60)
    match = re.search(r"tokenissuer ready: .*\(port (\d+)\)", output)
    assert match is not None, output
    # Keep reading the log, or the child blocks once the pipe is full.
    lines = [output]
    stdout = process.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(stdout), daemon=True)
    reader.start()
    return IssuerProcess(process, int(match.group(1)), lines, reader)
