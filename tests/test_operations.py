"""
Operations: the admin listener (probes and metrics), hot reload of certificate
material the way the kubelet swaps mounted secrets, SIGHUP, and draining on
shutdown, in-process and as a real twistd process under SIGTERM.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import ssl
import threading
import time
from typing import Any

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tokenissuer import devpki

from .consumer import consumerVerify
from .support import TEST_HMAC_KEY, Client, LogCapture, TestPKI, spawnIssuer, startIssuer


def adminGet(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read().decode("utf-8")
    finally:
        connection.close()


def metricValue(text: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample in exposition text, or None."""
    labelText = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(labelText) + r"\}" if labels else "") + r" (\S+)"
    match = re.search("^" + pattern + "$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def peerSerial(port: int, caFile: str) -> int:
    """Handshake (without client certificate) and return the server certificate's serial number."""
    context = ssl.create_default_context(cafile=caFile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as wrapped:
            der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class KubeletVolume:
    """
    A folder laid out like a mounted Secret: visible names are symlinks into
    ..data, which points at a timestamped folder; an update writes a new folder
    and renames a new ..data symlink over the old one (one atomic step).
    """

    def __init__(self, folder: str, files: dict[str, bytes]) -> None:
        self.folder = folder
        os.makedirs(folder)
        self.generation = 0
        self.update(files)
        for name in files:
            os.symlink(os.path.join("..data", name), os.path.join(folder, name))

    def update(self, files: dict[str, bytes]) -> None:
        self.generation += 1
        version = f"..2026_12_03_{self.generation:04d}"
        os.makedirs(os.path.join(self.folder, version))
        for name, data in files.items():
            with open(os.path.join(self.folder, version, name), "wb") as handle:
                handle.write(data)
        temporary = os.path.join(self.folder, "..data_tmp")
        os.symlink(version, temporary)
        os.rename(temporary, os.path.join(self.folder, "..data"))

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)


class AdminListenerTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.port, self.service = startIssuer(self, self.pki)
        assert self.service.adminPort is not None
        self.adminPort = self.service.adminPort.getHost().port  # type: ignore[attr-defined]

    async def test_probesAnswerOverPlainHTTP(self) -> None:
        self.assertEqual((await deferToThread(adminGet, self.adminPort, "/healthz"))[0], 200)
        status, body = await deferToThread(adminGet, self.adminPort, "/readyz")
        self.assertEqual(status, 200, body)
        self.assertEqual((await deferToThread(adminGet, self.adminPort, "/nope"))[0], 404)

    async def test_metricsFollowIssuesAndRefusals(self) -> None:
        status, before = await deferToThread(adminGet, self.adminPort, "/metrics")
        self.assertEqual(status, 200)
        self.assertIsNone(metricValue(before, "tokenissuer_tokens_issued_total", audience="gschmarri"))
        expiry = metricValue(before, "tokenissuer_server_certificate_expiry_seconds")
        assert expiry is not None
        self.assertGreater(expiry, 800 * 86400)

        certFile, keyFile = self.pki.clientFiles(self.pki.client, "good")
        good = Client(self.port, self.pki.path("ca.pem"), certFile, keyFile)
        anonymous = Client(self.port, self.pki.path("ca.pem"))
        untrustedCert, untrustedKey = self.pki.clientFiles(self.pki.untrusted, "bad")
        untrusted = Client(self.port, self.pki.path("ca.pem"), untrustedCert, untrustedKey)
        self.assertEqual((await deferToThread(good.call)).status, 200)
        self.assertEqual((await deferToThread(good.call)).status, 200)
        self.assertEqual((await deferToThread(anonymous.call)).status, 401)
        self.assertEqual((await deferToThread(good.call, body=b'{"audience": "x"}')).status, 403)
        with self.assertRaises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
            await deferToThread(untrusted.call)
        await deferLater(reactor, 0.1, lambda: None)

        _, after = await deferToThread(adminGet, self.adminPort, "/metrics")
        self.assertEqual(metricValue(after, "tokenissuer_tokens_issued_total", audience="gschmarri"), 2.0)
        self.assertEqual(metricValue(after, "tokenissuer_refusals_total", reason="client_certificate_required"), 1.0)
        self.assertEqual(metricValue(after, "tokenissuer_refusals_total", reason="audience_not_allowed"), 1.0)
        self.assertEqual(
            metricValue(after, "tokenissuer_tls_handshake_failures_total", reason="client_certificate_rejected"), 1.0
        )
        self.assertEqual(metricValue(after, "tokenissuer_request_duration_seconds_count"), 4.0)
        self.assertEqual(metricValue(after, "tokenissuer_ready"), 1.0)
        self.assertNotIn(TEST_HMAC_KEY, after)

    async def test_abandonedHandshakeCountedNotLoggedAsError(self) -> None:
        """Chromium hangs up when first asked for a certificate; that is counted as client_closed."""
        logs = LogCapture(self)

        def abandon() -> None:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                hello = ssl.MemoryBIO()
                outgoing = ssl.MemoryBIO()
                tls = context.wrap_bio(hello, outgoing, server_hostname="localhost")
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                raw.sendall(outgoing.read())
                raw.recv(65536)  # the server's flight, with the CertificateRequest; then hang up

        await deferToThread(abandon)
        await deferLater(reactor, 0.2, lambda: None)
        _, text = await deferToThread(adminGet, self.adminPort, "/metrics")
        self.assertEqual(metricValue(text, "tokenissuer_tls_handshake_failures_total", reason="client_closed"), 1.0)
        errors = [
            event
            for event in logs.events
            if event.get("log_level") is not None and event["log_level"].name in ("error", "critical")
        ]
        self.assertEqual(errors, [])


class ReloadTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.logs = LogCapture(self)
        self.volume = KubeletVolume(
            os.path.abspath(self.mktemp()),
            {"tls.crt": self.pki.server.certificatePEM(), "tls.key": self.pki.server.keyPEM()},
        )
        self.clientCert, self.clientKey = self.pki.clientFiles(self.pki.client, "good")

    def start(self, **options: Any) -> None:
        self.port, self.service = startIssuer(
            self, self.pki, cert=self.volume.path("tls.crt"), key=self.volume.path("tls.key"), **options
        )

    def load(self, stop: threading.Event, results: list[Any]) -> None:
        """New connection per token until told to stop (at most 2,000 requests or 30 s)."""
        client = Client(self.port, self.pki.path("ca.pem"), self.clientCert, self.clientKey)
        deadline = time.monotonic() + 30
        while not stop.is_set() and len(results) < 2000 and time.monotonic() < deadline:
            connection = client.connect()
            try:
                der = connection.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
                response = client.request(connection)
                results.append((response.status, x509.load_der_x509_certificate(der).serial_number))
            except Exception as error:  # noqa: BLE001 - every failure is a finding
                results.append(("error", repr(error)))
            finally:
                connection.close()

    async def test_kubeletSwapUnderLoadServesNewCertificateWithoutFailures(self) -> None:
        self.start()
        oldSerial = self.pki.server.certificate.serial_number
        stop, results = threading.Event(), []  # type: ignore[var-annotated]
        loader = deferToThread(self.load, stop, results)
        await deferLater(reactor, 0.5, lambda: None)
        renewed = devpki.issueServer(self.pki.ca)
        self.volume.update({"tls.crt": renewed.certificatePEM(), "tls.key": renewed.keyPEM()})
        newSerial = renewed.certificate.serial_number
        # The issue's bound: new handshakes present the new certificate within 5 seconds.
        for _ in range(50):
            await deferLater(reactor, 0.1, lambda: None)
            if results and results[-1][1] == newSerial:
                break
        seenInTime = bool(results) and results[-1][1] == newSerial
        await deferLater(reactor, 0.5, lambda: None)
        stop.set()
        await loader
        failures = [r for r in results if r[0] != 200]
        self.assertEqual(failures, [])
        serials = [serial for _, serial in results]
        self.assertIn(oldSerial, serials)
        self.assertEqual(serials[-1], newSerial)
        self.assertTrue(seenInTime, "the new certificate was not served within 5 seconds")
        # Once the new certificate appears, the old one never comes back.
        self.assertNotIn(oldSerial, serials[serials.index(newSerial) :])
        self.assertIn("reloaded: server certificate", self.logs.text())

    async def test_openConnectionFinishesOnOldMaterial(self) -> None:
        self.start(**{"reload-interval": "0.2"})
        client = Client(self.port, self.pki.path("ca.pem"), self.clientCert, self.clientKey)
        connection = await deferToThread(client.connect)
        self.addCleanup(connection.close)
        self.assertEqual((await deferToThread(client.request, connection)).status, 200)
        renewed = devpki.issueServer(self.pki.ca)
        self.volume.update({"tls.crt": renewed.certificatePEM(), "tls.key": renewed.keyPEM()})
        await deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(
            await deferToThread(peerSerial, self.port, self.pki.path("ca.pem")), renewed.certificate.serial_number
        )
        # The keep-alive connection from before the swap still works, on its old session.
        self.assertEqual((await deferToThread(client.request, connection)).status, 200)
        der = connection.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        self.assertEqual(x509.load_der_x509_certificate(der).serial_number, self.pki.server.certificate.serial_number)

    async def test_brokenSwapKeepsServingOldMaterial(self) -> None:
        self.start(**{"reload-interval": "0.2"})
        stranger = devpki.issueServer(self.pki.ca)
        # A certificate with somebody else's key: must not be taken.
        self.volume.update({"tls.crt": stranger.certificatePEM(), "tls.key": self.pki.server.keyPEM()})
        await deferLater(reactor, 1.0, lambda: None)
        serial = await deferToThread(peerSerial, self.port, self.pki.path("ca.pem"))
        self.assertEqual(serial, self.pki.server.certificate.serial_number)
        client = Client(self.port, self.pki.path("ca.pem"), self.clientCert, self.clientKey)
        self.assertEqual((await deferToThread(client.call)).status, 200)
        errors = [m for m in self.logs.messages() if m.startswith("reload failed")]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("does not match", errors[0])
        metrics = self.service.metrics
        self.assertEqual(metrics.lastReloadSuccess._value.get(), 0)  # type: ignore[attr-defined]
        self.assertTrue(self.service.readiness()[0])

    async def test_sighupForcesReload(self) -> None:
        self.start(**{"reload-interval": "0"})
        renewed = devpki.issueServer(self.pki.ca)
        self.volume.update({"tls.crt": renewed.certificatePEM(), "tls.key": renewed.keyPEM()})
        await deferLater(reactor, 0.3, lambda: None)
        serial = await deferToThread(peerSerial, self.port, self.pki.path("ca.pem"))
        self.assertEqual(serial, self.pki.server.certificate.serial_number, "no polling: nothing changes by itself")
        os.kill(os.getpid(), signal.SIGHUP)
        await deferLater(reactor, 0.3, lambda: None)
        serial = await deferToThread(peerSerial, self.port, self.pki.path("ca.pem"))
        self.assertEqual(serial, renewed.certificate.serial_number)

    async def test_hmacKeyFileReloads(self) -> None:
        keyVolume = KubeletVolume(os.path.abspath(self.mktemp()), {"hmac": b"first-key-" + b"1" * 40 + b"\n"})
        self.start(**{"hmac-secret-file": keyVolume.path("hmac"), "reload-interval": "0.2"})
        client = Client(self.port, self.pki.path("ca.pem"), self.clientCert, self.clientKey)
        token = (await deferToThread(client.call)).json()["token"]
        consumerVerify(token, b"first-key-" + b"1" * 40, "gschmarri", "daheim_token_issuer")
        keyVolume.update({"hmac": b"second-key-" + b"2" * 40})
        await deferLater(reactor, 1.0, lambda: None)
        token = (await deferToThread(client.call)).json()["token"]
        consumerVerify(token, b"second-key-" + b"2" * 40, "gschmarri", "daheim_token_issuer")
        self.assertNotIn("second-key", self.logs.text())
        self.assertNotIn("first-key", self.logs.text())
        # A key that became too short is refused; the previous one stays in use.
        keyVolume.update({"hmac": b"short"})
        await deferLater(reactor, 1.0, lambda: None)
        token = (await deferToThread(client.call)).json()["token"]
        consumerVerify(token, b"second-key-" + b"2" * 40, "gschmarri", "daheim_token_issuer")
        self.assertNotIn(
            "short", "\n".join(m for m in self.logs.messages() if "reload failed" in m).replace("too short", "")
        )


class DrainTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.clientCert, self.clientKey = self.pki.clientFiles(self.pki.client, "good")

    async def test_requestInFlightFinishesAfterStop(self) -> None:
        port, service = startIssuer(self, self.pki, **{"drain-seconds": "5"})
        assert service.adminPort is not None
        adminPort = service.adminPort.getHost().port  # type: ignore[attr-defined]
        client = Client(port, self.pki.path("ca.pem"), self.clientCert, self.clientKey)
        body = b'{"audience": "gschmarri"}'
        connection = await deferToThread(client.connect)

        def sendHead() -> None:
            sock = connection.sock
            assert sock is not None
            sock.sendall(
                b"POST /jwthmac/issue HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )

        await deferToThread(sendHead)
        await deferLater(reactor, 0.2, lambda: None)
        stopped = service.stopService()
        await deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(stopped.called, "the drain waits for the request in flight")
        status, _ = await deferToThread(adminGet, adminPort, "/readyz")
        self.assertEqual(status, 503)
        with self.assertRaises(ConnectionRefusedError):
            await deferToThread(socket.create_connection, ("127.0.0.1", port), 2)

        def finish() -> tuple[int, str | None, bytes]:
            sock = connection.sock
            assert sock is not None
            sock.sendall(body)
            answer = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
            answer.begin()
            return answer.status, answer.getheader("Connection"), answer.read()

        status, connectionHeader, data = await deferToThread(finish)
        self.assertEqual(status, 200)
        self.assertEqual(connectionHeader, "close")
        self.assertIn(b'"token"', data)
        await stopped
        self.assertEqual(service.factory.connections, set())

    async def test_idleKeepAliveConnectionsDoNotHoldUpShutdown(self) -> None:
        logs = LogCapture(self)
        port, service = startIssuer(self, self.pki, **{"drain-seconds": "20"})
        client = Client(port, self.pki.path("ca.pem"), self.clientCert, self.clientKey)
        connection = await deferToThread(client.connect)
        self.assertEqual((await deferToThread(client.request, connection)).status, 200)
        await service.stopService()
        # Closed as idle by the drain, not cut off when its 20 s ran out.
        self.assertEqual(service.factory.connections, set())
        self.assertNotIn("drain time is up", logs.text())
        connection.close()


class SigtermTests(TestCase):
    """The real process: SIGTERM while clients keep requesting; nothing accepted is lost; exit 0."""

    timeout = 120
    #: More options for the command (a subclass runs this with several workers).
    arguments: tuple[str, ...] = ()

    async def test_sigtermDuringLoad(self) -> None:
        pki = TestPKI(os.path.abspath(self.mktemp()))
        certFile, keyFile = pki.clientFiles(pki.client, "good")
        issuer = await deferToThread(
            spawnIssuer, self, pki, "--drain-seconds", "10", "--audiences", "gschmarri", *self.arguments
        )
        port = issuer.port
        outcomes: list[str] = []
        lock = threading.Lock()

        def worker() -> None:
            client = Client(port, pki.path("ca.pem"), certFile, keyFile)
            deadline = time.monotonic() + 20
            for _ in range(1000):
                if time.monotonic() > deadline:
                    break
                try:
                    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
                except ConnectionRefusedError:
                    with lock:
                        outcomes.append("refused")
                    return
                except ConnectionResetError:
                    # The same as below, seen sooner: the kernel completed the TCP
                    # handshake and reset it before connect() returned here.
                    with lock:
                        outcomes.append("reset in accept queue")
                    continue
                try:
                    wrapped = client.context().wrap_socket(raw, server_hostname="localhost")
                except (ConnectionResetError, ssl.SSLEOFError):
                    # Reset before the service answered the handshake: the kernel
                    # held it in the accept queue when the listener closed, so the
                    # service never accepted it. Counted, and bounded below.
                    raw.close()
                    with lock:
                        outcomes.append("reset in accept queue")
                    continue
                try:
                    connection = http.client.HTTPConnection("localhost", port, timeout=10)
                    connection.sock = wrapped
                    outcome = str(client.request(connection).status)
                except Exception as error:  # noqa: BLE001 - every failure is a finding
                    outcome = f"failed: {error!r}"
                finally:
                    raw.close()
                with lock:
                    outcomes.append(outcome)

        workers = [threading.Thread(target=worker) for _ in range(4)]
        for thread in workers:
            thread.start()
        await deferLater(reactor, 1.5, lambda: None)
        returnCode = await deferToThread(issuer.terminate)
        for thread in workers:
            await deferToThread(thread.join, 30)
        rest = issuer.log()
        self.assertEqual(returnCode, 0, rest[-3000:])
        self.assertIn("Server Shut Down", rest)
        failures = [o for o in outcomes if o not in ("200", "refused", "reset in accept queue")]
        self.assertEqual(failures, [])
        self.assertGreater(outcomes.count("200"), 20)
        self.assertEqual(outcomes.count("refused"), 4, "every worker ends on a refused connection")
        self.assertLessEqual(outcomes.count("reset in accept queue"), 1, outcomes)
