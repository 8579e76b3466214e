"""
Decide which web origins may call the issuer cross-origin, and with which headers.

Never answers with C{*}: a wildcard would let any page the certificate holder
visits read their tokens. Allowed origins are echoed back, with credentials
allowed and C{Vary: Origin} so caches keep answers for different origins apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The headers the real browser client sends; a preflight asking for others is
#: still answered with this list and the browser then refuses on its own.
ALLOWED_REQUEST_HEADERS = ("content-type", "accept")
ALLOWED_METHODS = ("POST",)
#: How long a browser may cache a preflight answer (seconds).
PREFLIGHT_MAX_AGE = 600

_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_IPV6 = re.compile(r"^\[[0-9a-f:.]+\]$")


class OriginError(ValueError):
    """An allowed-origin entry is not of the form scheme://host[:port]."""


@dataclass(frozen=True)
class OriginPattern:
    """One allowed origin; C{port} None means the scheme's default, "*" any port."""

    scheme: str
    host: str
    port: str | None

    def matches(self, scheme: str, host: str, port: str | None) -> bool:
        if scheme != self.scheme or host != self.host:
            return False
        if self.port == "*":
            return True
        return port == self.port

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port else "")


def _split(origin: str, allowWildcardPort: bool) -> tuple[str, str, str | None]:
    """Split an origin into scheme, host and explicit non-default port, or raise."""
    if origin != origin.strip() or not origin:
        raise OriginError(f"{origin!r} is not an origin")
    match = re.fullmatch(r"(https?)://([^/:?#@\s]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}|\*))?", origin, re.ASCII)
    if match is None:
        raise OriginError(
            f"{origin!r} is not an origin: write scheme://host[:port] with http or https, no path and no trailing slash"
        )
    scheme, host, port = match.group(1), match.group(2), match.group(3)
    if host != host.lower():
        raise OriginError(f"{origin!r} is not an origin: write the host in lower case")
    if not (_HOST.match(host) or _IPV6.match(host)):
        raise OriginError(f"{origin!r} is not an origin: {host!r} is not a host name")
    if port == "*":
        if not allowWildcardPort:
            raise OriginError(f"{origin!r} is not an origin")
        return scheme, host, port
    if port is not None:
        number = int(port)
        if not 0 < number < 65536:
            raise OriginError(f"{origin!r} is not an origin: port {port} is out of range")
        default = "443" if scheme == "https" else "80"
        port = None if str(number) == default else str(number)
    return scheme, host, port


def parseOriginPattern(text: str) -> OriginPattern:
    """
    Parse one configured origin, e.g. C{https://app.example.org} or
    C{http://localhost:*} (any port, handy for development servers).
    """
    scheme, host, port = _split(text, allowWildcardPort=True)
    return OriginPattern(scheme, host, port)


class CorsPolicy:
    """The set of origins allowed to call cross-origin, and the headers each answer needs."""

    def __init__(self, patterns: list[OriginPattern]) -> None:
        self.patterns = tuple(patterns)

    @classmethod
    def fromStrings(cls, origins: list[str]) -> CorsPolicy:
        return cls([parseOriginPattern(origin) for origin in origins])

    def isAllowed(self, origin: str) -> bool:
        """True if a request carrying this C{Origin} header value may be served."""
        try:
            scheme, host, port = _split(origin, allowWildcardPort=False)
        except OriginError:
            return False
        return any(pattern.matches(scheme, host, port) for pattern in self.patterns)

    def responseHeaders(self, origin: str) -> list[tuple[bytes, bytes]]:
        """Headers for every answer to an allowed origin, errors included."""
        return [
            (b"Access-Control-Allow-Origin", origin.encode("ascii")),
            (b"Access-Control-Allow-Credentials", b"true"),
        ]

    def preflightHeaders(self) -> list[tuple[bytes, bytes]]:
        """Extra headers for a preflight answer to an allowed origin."""
        return [
            (b"Access-Control-Allow-Methods", ", ".join(ALLOWED_METHODS).encode("ascii")),
            (b"Access-Control-Allow-Headers", ", ".join(ALLOWED_REQUEST_HEADERS).encode("ascii")),
            (b"Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE).encode("ascii")),
        ]

    def __str__(self) -> str:
        return " ".join(str(pattern) for pattern in self.patterns) or "(none)"
