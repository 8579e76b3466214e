"""
Prometheus metrics for operators: what was issued, what was refused and why,
how TLS handshakes fail, how long requests take, when the server certificate
expires and how the last reload went.

Each service owns its own registry, so tests (and several services in one
process) never share counters.

With --workers N, each worker's metrics live in prometheus_client's
multiprocess files (its environment names the folder) and the supervisor
serves them summed (L{SupervisorMetrics}): a worker's gauges say how to combine
them, and the two gauges computed at scrape time (certificate expiry, CRL next
update) come from the supervisor, which reloads the same files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

# The *_created series double the output and no dashboard of ours uses them.
disable_created_metrics()

#: The label used for audiences when no allow-list bounds them (keeps label cardinality finite).
UNLISTED_AUDIENCE = "_unlisted"

#: Handshake failure reasons, so dashboards can tell an abandoned browser
#: handshake (normal: Chromium retries with a certificate) from real refusals.
HANDSHAKE_REASONS = (
    "client_certificate_rejected",
    "client_certificate_missing",
    "client_closed",
    "protocol_mismatch",
    "not_tls",
    "timeout",
    "other",
)


class IssuerMetrics:
    """All metrics of one issuer (of one worker, with C{worker=True}: see the module's docstring)."""

    #: Computed at scrape time; absent in a worker (the supervisor publishes its own).
    certificateExpiry: Gauge | None = None
    crlNextUpdateSeconds: Gauge | None = None

    def __init__(
        self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time, worker: bool = False
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self.tokensIssued = Counter(
            "tokenissuer_tokens_issued", "Tokens issued, by audience.", ["audience"], registry=self.registry
        )
        self.refusals = Counter(
            "tokenissuer_refusals", "Requests refused, by error code.", ["reason"], registry=self.registry
        )
        self.handshakeFailures = Counter(
            "tokenissuer_tls_handshake_failures",
            "TLS handshakes that did not complete, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.requestDuration = Histogram(
            "tokenissuer_request_duration_seconds",
            "Time to answer a request on the issue endpoints, from full request to response.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self._certificateNotAfter: float | None = None
        if not worker:
            self.certificateExpiry = Gauge(
                "tokenissuer_server_certificate_expiry_seconds",
                "Seconds until the server certificate in use expires (negative once expired).",
                registry=self.registry,
            )
            self.certificateExpiry.set_function(self._secondsUntilExpiry)
        # Across workers: the latest reload, 0 if any live worker's last reload failed.
        self.lastReloadTimestamp = Gauge(
            "tokenissuer_last_reload_timestamp_seconds",
            "Unix time of the last reload attempt of certificates, keys or CA bundle (0: none yet).",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.lastReloadSuccess = Gauge(
            "tokenissuer_last_reload_success",
            "1 if the last reload attempt succeeded (or none happened yet), 0 if it failed and old material is in use.",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.lastReloadSuccess.set(1)
        self.reloads = Counter(
            "tokenissuer_reloads", "Reload attempts, by outcome.", ["outcome"], registry=self.registry
        )
        self.connectionsRefused = Counter(
            "tokenissuer_connections_refused",
            "Connections closed at once because max-connections were open.",
            registry=self.registry,
        )
        self._crlNextUpdate: float | None = None
        if not worker:
            self.crlNextUpdateSeconds = Gauge(
                "tokenissuer_crl_next_update_seconds",
                "Seconds until the earliest configured CRL's next update (negative: expired; absent without CRLs).",
                registry=self.registry,
            )
            self.crlNextUpdateSeconds.set_function(
                lambda: float("nan") if self._crlNextUpdate is None else self._crlNextUpdate - self._clock()
            )
        # Across workers: how many accept new connections.
        self.ready = Gauge(
            "tokenissuer_ready",
            "1 while the service accepts new connections.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        for reason in HANDSHAKE_REASONS:
            self.handshakeFailures.labels(reason=reason)
        for outcome in ("success", "failure"):
            self.reloads.labels(outcome=outcome)

    def _secondsUntilExpiry(self) -> float:
        if self._certificateNotAfter is None:
            return 0.0
        return self._certificateNotAfter - self._clock()

    def serverCertificateInUse(self, notAfter: float) -> None:
        self._certificateNotAfter = notAfter

    def crlNextUpdate(self, when: float | None) -> None:
        self._crlNextUpdate = when

    def issued(self, audience: str, listed: bool) -> None:
        self.tokensIssued.labels(audience=audience if listed else UNLISTED_AUDIENCE).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason=reason).inc()

    def handshakeFailed(self, reason: str) -> None:
        self.handshakeFailures.labels(reason=reason if reason in HANDSHAKE_REASONS else "other").inc()

    def reloaded(self, success: bool) -> None:
        self.lastReloadTimestamp.set(self._clock())
        self.lastReloadSuccess.set(1 if success else 0)
        self.reloads.labels(outcome="success" if success else "failure").inc()


class _WorkerFiles:
    """A collector of the workers' multiprocess files, once their folder exists."""

    def __init__(self, folder: Callable[[], str | None]) -> None:
        self._folder = folder

    def collect(self) -> Iterable[Metric]:
        folder = self._folder()
        if folder is None or not os.path.isdir(folder):
            return []
        return MultiProcessCollector(None, folder).collect()


class SupervisorMetrics:
    """
    What the supervisor of --workers serves on /metrics: the workers' metrics,
    summed from their multiprocess files in C{folder()}, the supervisor's own
    scrape-time gauges, and how often it restarted a worker.
    """

    def __init__(self, own: IssuerMetrics, folder: Callable[[], str | None]) -> None:
        self.registry = CollectorRegistry()
        assert own.certificateExpiry is not None and own.crlNextUpdateSeconds is not None
        self.registry.register(own.certificateExpiry)
        self.registry.register(own.crlNextUpdateSeconds)
        self.workerRestarts = Counter(
            "tokenissuer_worker_restarts",
            "Worker processes started again after an unexpected exit.",
            registry=self.registry,
        )
        self.registry.register(_WorkerFiles(folder))  # type: ignore[arg-type]
