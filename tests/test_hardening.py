"""
Hostile peers: slow requests (slowloris), oversized headers, stalled TLS
handshakes and connection floods are cut off without hurting good clients.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tokenissuer.cors import CorsPolicy
from tokenissuer.signer import HmacTokenSigner
from tokenissuer.tls import ClientIdentity
from tokenissuer.web import REQUEST_TIMEOUT, IssuePolicy, IssuerSite, buildResourceTree

from .support import Client, TestPKI, startIssuer
from .test_web import _CLIENT, parseResponses, rawRequest


class SlowRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(time.time())
        policy = IssuePolicy(
            signer=HmacTokenSigner(b"k" * 40, "iss", 3600, clock=self.clock.seconds),
            cors=CorsPolicy([]),
            audiences=None,
        )
        site = IssuerSite(
            buildResourceTree(policy, lambda transport: ClientIdentity(_CLIENT.certificate)), reactor=self.clock
        )
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        self.protocol.makeConnection(self.transport)

    def test_slowlorisGets408AndIsClosed(self) -> None:
        request = rawRequest()
        for index in range(0, 40):
            self.protocol.dataReceived(request[index : index + 1])
            self.clock.advance(0.5)  # a byte every half second: never idle, always slow
        self.assertTrue(self.transport.disconnecting)
        [response] = parseResponses(self.transport.value())
        self.assertEqual(response.status, 408)
        self.assertEqual(response.json()["error"], "request_timeout")

    def test_requestsInTimeAreServedAndDeadlineResets(self) -> None:
        self.protocol.dataReceived(rawRequest())
        self.clock.advance(REQUEST_TIMEOUT * 3)  # idle between requests is not a slow request
        self.protocol.dataReceived(rawRequest())
        responses = parseResponses(self.transport.value())
        self.assertEqual([r.status for r in responses], [200, 200])
        self.assertFalse(self.transport.disconnecting)
        # The deadline of a completed request never fires a 408 on the idle connection.
        self.clock.advance(REQUEST_TIMEOUT * 2)
        self.assertEqual(len(parseResponses(self.transport.value())), 2)
        self.assertFalse(self.transport.disconnecting)
        # ... and a new request gets a full deadline again.
        request = rawRequest()
        self.protocol.dataReceived(request[:10])
        self.clock.advance(REQUEST_TIMEOUT - 1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual([r.status for r in parseResponses(self.transport.value())], [200, 200, 408])
        self.assertTrue(self.transport.disconnecting)

    def test_tooManyHeaders(self) -> None:
        headers = {f"X-Filler-{index}": "x" for index in range(100)}
        self.protocol.dataReceived(rawRequest(headers=headers))
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400"))
        self.assertTrue(self.transport.disconnecting)

    def test_headersTooLarge(self) -> None:
        self.protocol.dataReceived(rawRequest(headers={"X-Big": "y" * 10000}))
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400"))
        self.assertTrue(self.transport.disconnecting)


class StalledHandshakeTests(TestCase):
    timeout = 60

    async def test_silentPeerDroppedAndCounted(self) -> None:
        pki = TestPKI(self.mktemp())
        port, service = startIssuer(self, pki, **{"handshake-timeout": "0.5"})

        def silent() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                try:
                    return raw.recv(100)  # b"" (or a reset) once the server drops us
                except ConnectionResetError:
                    return b""

        # Dropped by the service (0.5 s), not by the socket's own 10 s timeout, which would raise.
        self.assertEqual(await deferToThread(silent), b"")
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(service.metrics.handshakeFailures.labels(reason="timeout")._value.get(), 1)  # type: ignore[attr-defined]
        certFile, keyFile = pki.clientFiles(pki.client, "good")
        response = await deferToThread(Client(port, pki.path("ca.pem"), certFile, keyFile).call)
        self.assertEqual(response.status, 200)


class ConnectionLimitTests(TestCase):
    timeout = 60

    async def test_connectionsOverTheCapAreRefused(self) -> None:
        pki = TestPKI(self.mktemp())
        port, service = startIssuer(self, pki, **{"max-connections": "3"})
        holders = []

        def hold() -> None:
            for _ in range(3):
                holders.append(socket.create_connection(("127.0.0.1", port), timeout=10))

        await deferToThread(hold)
        self.addCleanup(lambda: [sock.close() for sock in holders])
        await deferLater(reactor, 0.2, lambda: None)

        def oneMore() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                try:
                    return raw.recv(100)
                except ConnectionResetError:
                    return b""

        self.assertEqual(await deferToThread(oneMore), b"")
        self.assertEqual(service.metrics.connectionsRefused._value.get(), 1)  # type: ignore[attr-defined]
        for sock in holders:
            sock.close()
        await deferLater(reactor, 0.2, lambda: None)
        certFile, keyFile = pki.clientFiles(pki.client, "good")
        response = await deferToThread(Client(port, pki.path("ca.pem"), certFile, keyFile).call)
        self.assertEqual(response.status, 200)
