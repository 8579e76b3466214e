"""
TCP connections that send at once.

Twisted's TCP transport never sends from C{write()}: it queues the bytes, asks
epoll to report the socket writable, sends on the next turn of the loop and
then unregisters again. A TLS connection that carries one token writes three or
four times (server handshake flight, session tickets, the answer, close_notify),
so that round trip costs more than the writes themselves. L{WriteThroughServer}
sends immediately whenever nothing is queued ahead, and queues only what the
socket did not take; everything after that is Twisted's own behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp


class WriteThroughServer(tcp.Server):
    """A server-side TCP connection whose writes go straight to the socket when nothing is queued."""

    def write(self, data: bytes) -> None:
        if (
            data
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnected
            and not self._tempDataLen
            and self.offset == len(self.dataBuffer)
            and isinstance(data, bytes)
        ):
            try:
                sent = self.socket.send(data)
            except OSError:
                # Would block, or the connection broke: queue it, and the regular
                # write path sends it later or reports the loss.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))


def sendAtOnce(port: Any) -> None:
    """Make a listening TCP port's new connections L{WriteThroughServer}s (other ports are left alone)."""
    if isinstance(port, tcp.Port):
        port.transport = WriteThroughServer
