"""
TCP connections that send at once.

Twisted's TCP transport never sends from C{write()}: it queues the bytes, asks
epoll to report the socket writable, sends on the next turn of the loop and
then unregisters again. A TLS connection that carries one token writes three or
four times (server handshake flight, session tickets, the answer, close_notify),
so that round trip costs more than the writes themselves. L{WriteThroughServer}
sends immediately whenever nothing is queued ahead, and queues only what the
socket did not take; everything after that is Twisted's own behaviour.

Writes caused by reading (an answer, and the TLS close_notify that follows it on
a connection that closes; session tickets and the answer when a request comes
with the end of the handshake) are collected while the read is handled and
leave in one send: each send wakes the peer, which costs more than the bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp


class WriteThroughServer(tcp.Server):
    """A server-side TCP connection whose writes go straight to the socket when nothing is queued."""

    #: Writes made while a read is being handled, sent together when it is done.
    _duringRead: list[bytes] | None = None

    def doRead(self) -> Any:
        self._duringRead = []
        try:
            return super().doRead()
        finally:
            collected, self._duringRead = self._duringRead, None
            if collected:
                self.write(b"".join(collected))

    def _nothingQueued(self) -> bool:
        return not self._tempDataLen and self.offset == len(self.dataBuffer)

    def write(self, data: bytes) -> None:
        if not data or not isinstance(data, bytes):
            super().write(data)  # nothing to send, or Twisted's TypeError
            return
        if self._duringRead is not None:
            self._duringRead.append(data)
            return
        if (
            self.connected
            and not self.disconnecting
            and not self._aborting
            and not self._writeDisconnected
            and self._nothingQueued()
        ):
            try:
                sent = self._sendNow(data)
            except OSError:
                # Would block, or the connection broke: queue it, and the regular
                # write path sends it later or reports the loss.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)

    def _sendNow(self, data: bytes) -> int:
        return self.socket.send(data)

    def doWrite(self) -> Any:
        if self.disconnecting and self.producer is None and self._nothingQueued():
            # Closing with nothing left to send: close now, without Twisted's empty send first.
            self.stopWriting()
            return self._postLoseConnection()
        return super().doWrite()

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))


def sendAtOnce(port: Any) -> None:
    """Make a listening TCP port's new connections L{WriteThroughServer}s (other ports are left alone)."""
    if isinstance(port, tcp.Port):
        port.transport = WriteThroughServer
