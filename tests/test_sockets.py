"""
Tests for L{tokenissuer.sockets}: connections that send at once keep every byte
in order, whether the socket takes a write whole, in part, or not at all.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from tokenissuer.sockets import WriteThroughServer, sendAtOnce


def _chunks() -> list[bytes]:
    """Small writes, then one far larger than any socket buffer, then small ones behind it."""
    small = [b"%06d;" % i for i in range(200)]
    large = hashlib.sha256(b"seed").digest() * (64 * 1024 * 1024 // 32)
    return small + [large] + small[:50] + [b"".join(small[:20])]


class Sender(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.transports.append(self.transport)  # type: ignore[attr-defined]
        chunks = _chunks()
        for chunk in chunks[:201]:
            self.transport.write(chunk)  # type: ignore[union-attr]
        # Later, once the reader has made room in the socket but not emptied our queue:
        reactor.callLater(0.05, self.rest, chunks[201:])  # type: ignore[attr-defined]

    def rest(self, chunks: list[bytes]) -> None:
        for chunk in chunks[:-1]:
            self.transport.write(chunk)  # type: ignore[union-attr]
        self.transport.writeSequence([chunks[-1][:7], chunks[-1][7:]])  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class Receiver(protocol.Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: object = None) -> None:
        self.done.callback(b"".join(self.received))


class Answerer(protocol.Protocol):
    """Answer each request with three writes and close: all caused by one read."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"head:")  # type: ignore[union-attr]
        self.transport.writeSequence([data, b":"])  # type: ignore[union-attr]
        self.transport.write(b"tail")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class CountingServer(WriteThroughServer):
    sends: list[bytes] = []

    def _sendNow(self, data: bytes) -> int:
        CountingServer.sends.append(bytes(data))
        return super()._sendNow(data)

    def writeSomeData(self, data: bytes) -> Any:
        CountingServer.sends.append(bytes(data))
        return super().writeSomeData(data)


class Asker(Receiver):
    def connectionMade(self) -> None:
        self.transport.write(b"question")  # type: ignore[union-attr]


class WriteThroughTests(TestCase):
    timeout = 60

    async def ask(self, answering: type[protocol.Protocol], transport: type = WriteThroughServer) -> bytes:
        """Send one question to a server speaking C{answering} on C{transport}s; all it sends back."""
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(answering)
        )
        self.addCleanup(port.stopListening)
        port.transport = transport  # type: ignore[attr-defined]
        asker = Asker()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), asker)
        return await asker.done

    async def test_everyByteInOrder(self) -> None:
        factory = protocol.Factory.forProtocol(Sender)
        factory.transports = []  # type: ignore[attr-defined]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        sendAtOnce(port)
        receiver = Receiver()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), receiver)
        data = await receiver.done
        self.assertIsInstance(factory.transports[0], WriteThroughServer)  # type: ignore[attr-defined]
        self.assertEqual(len(data), sum(len(c) for c in _chunks()))
        self.assertEqual(hashlib.sha256(data).digest(), hashlib.sha256(b"".join(_chunks())).digest())

    async def test_writesOfOneReadLeaveTogether(self) -> None:
        """
        What one read makes the server write leaves in one send, before the
        close, and no empty send precedes the close.
        """
        CountingServer.sends = []
        self.assertEqual(await self.ask(Answerer, CountingServer), b"head:question:tail")
        self.assertEqual(CountingServer.sends, [b"head:question:tail"])

    async def test_abortDropsWhatTheReadWrote(self) -> None:
        """As with Twisted's own transport: bytes written before abortConnection() are not sent."""

        class Aborter(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.transport.write(b"never sent")  # type: ignore[union-attr]
                self.transport.abortConnection()  # type: ignore[union-attr]

        self.assertEqual(await self.ask(Aborter), b"")

    def test_otherPortsUntouched(self) -> None:
        class NotTCP:
            transport = object

        other = NotTCP()
        sendAtOnce(other)
        self.assertIs(other.transport, object)
