"""
Soak: the real twistd process takes 20,000 mixed good and bad requests from
several client threads, some on fresh TLS connections and some on keep-alive
ones, and afterwards has not grown (RSS under 10 % growth after a warm-up),
leaks no file descriptors, answered no 5xx, and wrote neither the HMAC key nor
any token to its log.

Slow (a minute or two), so it runs only in its own tox environment:
`tox -e soak`, which sets TOKENISSUER_SOAK=1. TOKENISSUER_SOAK_REQUESTS
changes the number of requests (the warm-up is a tenth of them).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from twisted.trial.unittest import SynchronousTestCase

from .support import TEST_HMAC_KEY, TestPKI, spawnIssuer
from .test_hostile import GOOD_BODY, parseAnswers, readAnswers, request

SOAK = os.environ.get("TOKENISSUER_SOAK") == "1"
REQUESTS = int(os.environ.get("TOKENISSUER_SOAK_REQUESTS", "20000"))
WARM_UP = REQUESTS // 10
THREADS = 4
#: The whole soak (both phases) must finish within this many seconds.
TIME_LIMIT = 15 * 60
#: Requests on one keep-alive connection before the client opens a new one.
KEEP_ALIVE_REQUESTS = 50
ORIGIN = b"http://localhost:8000"

#: kind: (weight, the raw request, expected status; 0 means "closed without an answer")
KINDS: dict[str, tuple[int, bytes, int]] = {
    "token": (30, request(), 200),
    "token-later-path": (5, request(path=b"/jwt/issue", body=b'{"audience": "dummy", "algorithm": "HS256"}'), 200),
    "preflight": (
        5,
        request(
            method=b"OPTIONS", body=None, headers=[(b"Origin", ORIGIN), (b"Access-Control-Request-Method", b"POST")]
        ),
        204,
    ),
    "no-certificate": (8, request(), 401),
    "audience": (8, request(body=b'{"audience": "evil"}'), 403),
    "origin": (6, request(headers=[(b"Origin", b"https://evil.example")]), 403),
    "malformed-json": (8, request(body=b'{"audience": '), 400),
    "not-found": (6, request(path=b"/nothing/here"), 404),
    "method": (5, request(method=b"PUT"), 405),
    "too-large": (5, request(body=b" " * 5000 + GOOD_BODY), 413),
    "media-type": (5, request(contentType=b"text/plain"), 415),
    "bad-http": (5, b"POST /jwthmac/issue HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    "garbage": (4, b"\x16\x03\x01\x00\x05" + bytes(range(200)), 0),
}
#: Kinds after which the service closes the connection (so they get a fresh one).
CLOSING = {"too-large", "bad-http"}
ANONYMOUS = {"no-certificate"}
RAW_TCP = {"garbage"}

_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{43}")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def processStatus(pid: int) -> tuple[int, int]:
    """(VmRSS in kB, open file descriptors) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as handle:
        rss = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Tally:
    """What the clients saw, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    signatures: set[str] = field(default_factory=set)
    newConnections: int = 0
    keptAlive: int = 0

    def claim(self, limit: int) -> bool:
        with self.lock:
            if self.sent >= limit:
                return False
            self.sent += 1
            return True


class SoakClient:
    """One client thread: a keep-alive connection it reuses, and fresh connections for the rest."""

    def __init__(self, port: int, contexts: dict[str, ssl.SSLContext], tally: Tally, seed: int) -> None:
        self.port = port
        self.contexts = contexts
        self.tally = tally
        self.random = random.Random(seed)
        self.kinds = list(KINDS)
        self.weights = [KINDS[kind][0] for kind in self.kinds]
        self.kept: ssl.SSLSocket | None = None
        self.keptUses = 0

    def connect(self, kind: str) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=15)
        if kind in RAW_TCP:
            return raw
        context = self.contexts["anonymous" if kind in ANONYMOUS else "client"]
        return context.wrap_socket(raw, server_hostname="localhost")

    def exchange(self, sock: socket.socket, kind: str) -> tuple[str, bytes]:
        head = KINDS[kind][1].startswith(b"HEAD")
        sock.sendall(KINDS[kind][1])
        data, closed = readAnswers(sock, 1, head, time.monotonic() + 15)
        answers = parseAnswers(data, head, closed)[0]
        if not answers:
            return ("0" if closed else "no answer"), b""
        return str(answers[0].status), answers[0].body

    def one(self) -> None:
        kind = self.random.choices(self.kinds, self.weights)[0]
        reuse = kind not in CLOSING | ANONYMOUS | RAW_TCP and self.random.random() < 0.6
        try:
            if reuse:
                if self.kept is None or self.keptUses >= KEEP_ALIVE_REQUESTS:
                    self.closeKept()
                    self.kept = self.connect(kind)  # type: ignore[assignment]
                    self.keptUses = 0
                assert self.kept is not None
                self.keptUses += 1
                status, body = self.exchange(self.kept, kind)
            else:
                with self.connect(kind) as sock:
                    status, body = self.exchange(sock, kind)
        except (OSError, ssl.SSLError) as error:
            if kind in RAW_TCP:
                status, body = "0", b""
            else:
                status, body = f"error {type(error).__name__}", b""
            if reuse:
                self.closeKept()
        expected = str(KINDS[kind][2])
        with self.tally.lock:
            self.tally.outcomes[(kind, status)] += 1
            if reuse:
                self.tally.keptAlive += 1
            else:
                self.tally.newConnections += 1
            if status != expected and len(self.tally.unexpected) < 50:
                self.tally.unexpected.append(f"{kind}: {status} (expected {expected}) {body[:100]!r}")
            if status == "200":
                self.tally.signatures.add(json.loads(body)["token"].rsplit(".", 1)[1])

    def closeKept(self) -> None:
        if self.kept is not None:
            self.kept.close()
            self.kept = None

    def run(self, limit: int, deadline: float) -> None:
        try:
            while time.monotonic() < deadline and self.tally.claim(limit):
                self.one()
        finally:
            self.closeKept()


class SoakTests(SynchronousTestCase):
    if not SOAK:
        skip = "the soak test runs in its own tox environment: tox -e soak (or set TOKENISSUER_SOAK=1)"

    def phase(
        self, port: int, contexts: dict[str, ssl.SSLContext], tally: Tally, limit: int, deadline: float, number: int
    ) -> None:
        clients = [SoakClient(port, contexts, tally, seed=number * 100 + n) for n in range(THREADS)]
        threads = [threading.Thread(target=client.run, args=(limit, deadline)) for client in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, deadline - time.monotonic() + 30))

    def settledDescriptors(self, pid: int, baseline: int) -> int:
        """Open descriptors once the service has closed what the clients left (waits at most 10 s)."""
        deadline = time.monotonic() + 10
        count = processStatus(pid)[1]
        while count > baseline and time.monotonic() < deadline:
            time.sleep(0.2)
            count = processStatus(pid)[1]
        return count

    def test_twentyThousandMixedRequests(self) -> None:
        pki = TestPKI(os.path.abspath(self.mktemp()))
        certFile, keyFile = pki.clientFiles(pki.client, "good")
        issuer = spawnIssuer(self, pki, "--audiences", "gschmarri dummy", "--origins", ORIGIN.decode())
        process, port = issuer.process, issuer.port
        client = ssl.create_default_context(cafile=pki.path("ca.pem"))
        client.load_cert_chain(certFile, keyFile)
        contexts = {"client": client, "anonymous": ssl.create_default_context(cafile=pki.path("ca.pem"))}
        started = time.monotonic()
        deadline = started + TIME_LIMIT
        rssAtStart, fdsAtStart = processStatus(process.pid)

        tally = Tally()
        self.phase(port, contexts, tally, WARM_UP, deadline, 1)
        fdsAfterWarmUp = self.settledDescriptors(process.pid, fdsAtStart)
        rssAfterWarmUp = processStatus(process.pid)[0]
        warmUpSeconds = time.monotonic() - started

        self.phase(port, contexts, tally, REQUESTS, deadline, 2)
        elapsed = time.monotonic() - started
        fdsAtEnd = self.settledDescriptors(process.pid, fdsAtStart)
        rssAtEnd = processStatus(process.pid)[0]

        returnCode = issuer.terminate()
        log = issuer.log()

        growth = (rssAtEnd - rssAfterWarmUp) / rssAfterWarmUp
        statuses = Counter(status for (_, status), count in tally.outcomes.items() for _ in range(count))
        print(
            f"\nsoak: {tally.sent} requests in {elapsed:.1f} s ({tally.sent / elapsed:.0f}/s; warm-up of {WARM_UP} "
            f"in {warmUpSeconds:.1f} s) by {THREADS} threads; {tally.newConnections} on new connections, "
            f"{tally.keptAlive} on keep-alive ones\n"
            f"soak: answers {dict(sorted(statuses.items()))}; {len(tally.signatures)} distinct tokens\n"
            f"soak: RSS {rssAtStart} kB at start, {rssAfterWarmUp} kB after warm-up, {rssAtEnd} kB at the end "
            f"({growth:+.1%} after warm-up)\n"
            f"soak: open descriptors {fdsAtStart} at start, {fdsAfterWarmUp} after warm-up, {fdsAtEnd} at the end\n"
            f"soak: log {len(log.splitlines())} lines; exit status {returnCode}"
        )
        for kind, status in sorted(tally.outcomes):
            print(f"soak:   {kind:18} {status:>12} x {tally.outcomes[(kind, status)]}")

        self.assertEqual(tally.sent, REQUESTS, f"only {tally.sent} requests within {TIME_LIMIT} s")
        self.assertEqual(sum(tally.outcomes.values()), REQUESTS)
        self.assertEqual([s for s in statuses if s.startswith("5")], [], "a 5xx answer")
        self.assertEqual(tally.unexpected, [])
        self.assertEqual(statuses["200"], len(tally.signatures), "every token is new")
        self.assertLess(growth, 0.10, f"RSS grew from {rssAfterWarmUp} kB to {rssAtEnd} kB after warm-up")
        self.assertLessEqual(fdsAtEnd, fdsAtStart, "file descriptors leaked")
        self.assertEqual(returnCode, 0, log[-2000:])
        self.assertNotIn(TEST_HMAC_KEY, log)
        self.assertEqual(_JWT.findall(log), [], "a token in the log")
        self.assertEqual(set(_SIGNATURE.findall(log)) & tally.signatures, set(), "a token signature in the log")
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)
        self.assertEqual(log.count("issued token"), statuses["200"])
