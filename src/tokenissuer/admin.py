"""
The admin listener: plain HTTP for the kubelet and Prometheus, never asking for
a client certificate (kubelet probes present none).

  /healthz  the process runs its event loop
  /readyz   it accepts connections with a valid TLS context and is not draining
            (with --workers: at least one worker runs)
  /metrics  Prometheus text format
  /openapi.yaml  the OpenAPI document of both listeners
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web import resource, server


def _json(request: server.Request, status: int, document: dict[str, object]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Server", b"tokenissuer")
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


class _Leaf(resource.Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return _json(request, 405, {"error": "method_not_allowed", "message": "Use GET."})
        if request.postpath and request.postpath != [b""]:
            return _json(request, 404, {"error": "not_found", "message": "Try /healthz, /readyz or /metrics."})
        return self.answer(request)

    def answer(self, request: server.Request) -> bytes:
        raise NotImplementedError


class Health(_Leaf):
    def answer(self, request: server.Request) -> bytes:
        return _json(request, 200, {"status": "alive"})


class Readiness(_Leaf):
    def __init__(self, isReady: Callable[[], tuple[bool, str]]):
        super().__init__()
        self._isReady = isReady

    def answer(self, request: server.Request) -> bytes:
        ready, why = self._isReady()
        return _json(request, 200 if ready else 503, {"status": "ready" if ready else "not ready", "reason": why})


class Metrics(_Leaf):
    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self._registry = registry

    def answer(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self._registry)


class OpenApiDocument(_Leaf):
    """The service's OpenAPI document (package data), read once."""

    def __init__(self) -> None:
        super().__init__()
        self._document = resources.files("tokenissuer").joinpath("openapi.yaml").read_bytes()

    def answer(self, request: server.Request) -> bytes:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/yaml")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Server", b"tokenissuer")
        return self._document


class AdminRoot(resource.Resource):
    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return NotFound()

    def render(self, request: server.Request) -> bytes:
        return NotFound().render(request)


class NotFound(_Leaf):
    def answer(self, request: server.Request) -> bytes:
        return _json(request, 404, {"error": "not_found", "message": "Try /healthz, /readyz or /metrics."})


class AdminSite(server.Site):
    noisy = False

    def log(self, request: object) -> None:
        pass


class Jwks(_Leaf):
    """Public signing keys for consumers (RFC 7517); 404 when tokens are HMAC-signed."""

    def __init__(self, jwks: Callable[[], dict[str, Any] | None]):
        super().__init__()
        self._jwks = jwks

    def answer(self, request: server.Request) -> bytes:
        document = self._jwks()
        if document is None:
            return _json(
                request, 404, {"error": "not_found", "message": "Tokens are HMAC-signed: there is no public key."}
            )
        body = _json(request, 200, document)
        request.setHeader(b"Content-Type", b"application/jwk-set+json")
        # Consumers may cache it briefly; rotation keeps retired keys published for a token lifetime.
        request.setHeader(b"Cache-Control", b"max-age=300")
        return body


def buildAdminSite(
    metrics: CollectorRegistry,
    isReady: Callable[[], tuple[bool, str]],
    jwks: Callable[[], dict[str, Any] | None] | None = None,
) -> AdminSite:
    root = AdminRoot()
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Readiness(isReady))
    root.putChild(b"metrics", Metrics(metrics))
    root.putChild(b"openapi.yaml", OpenApiDocument())
    if jwks is not None:
        wellKnown = AdminRoot()
        wellKnown.putChild(b"jwks.json", Jwks(jwks))
        root.putChild(b".well-known", wellKnown)
    return AdminSite(root)
