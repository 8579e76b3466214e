"""
End to end with real browsers: Debian's Chromium and Firefox ESR, headless, with
default preferences, call the issuer cross-origin from a page on another origin,
and load the diagnostic page.

These tests run only where TOKENISSUER_BROWSER_TESTS=1 (the tox environment
`browser` sets it). They need node with tests/browser/node_modules (`npm ci`
there), the packages chromium, firefox-esr and libnss3-tools, and write access
to /etc/chromium/policies/managed (root): Chromium picks a client certificate
without asking only by policy. Missing pieces skip the tests, or fail them when
TOKENISSUER_BROWSER_REQUIRED=1 (as CI sets it).

Each browser gets a fresh profile whose NSS certificate database trusts the test
CA for websites and (unless the test is about having none) holds the client
certificate; the certificate is chosen without a prompt: Chromium by the
AutoSelectCertificateForUrls policy, Firefox by security.default_personal_cert =
"Select Automatically". Nothing else is changed in either browser.

On the server side every request to the issue endpoint is recorded with whether
its own TLS connection carried a verified client certificate, and the tests
assert on that: which requests (preflight, POST) came with one and which without.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from tokenissuer import devpki
from tokenissuer.policy import subjectOf
from tokenissuer.service import IssuerService
from tokenissuer.tls import clientIdentityOf

from .support import TEST_HMAC_KEY, LogCapture, TestPKI, startIssuer

ENABLED = os.environ.get("TOKENISSUER_BROWSER_TESTS") == "1"
REQUIRED = os.environ.get("TOKENISSUER_BROWSER_REQUIRED") == "1"
#: Set to copy one diagnostic-page screenshot of each browser to docs/screenshots/.
UPDATE_SCREENSHOTS = os.environ.get("TOKENISSUER_UPDATE_SCREENSHOTS") == "1"

HERE = Path(__file__).resolve().parent
DRIVER_DIR = HERE / "browser"
DRIVER = DRIVER_DIR / "driver.mjs"
SCREENSHOT_DIR = HERE.parent / "docs" / "screenshots"
POLICY_DIR = Path("/etc/chromium/policies/managed")
EXECUTABLES = {"chromium": "chromium", "firefox": "firefox-esr"}
P12_PASSWORD = "browser-test"  # noqa: S105 - protects a throwaway test key
CLIENT_NAME = "Martin2"  # the CN of TestPKI's client certificate
AUDIENCE = "gschmarri"
CA_NICKNAME = "tokenissuer browser-test CA"

#: The page a web application would be: it calls the issuer the way the real
#: frontend does (../shared/NOTES.md), optionally with credentials: 'include'.
CALLER_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>caller</title>
<script>
async function callIssuer(url, variant, audience) {
  const init = {
    method: "post",
    headers: {'Content-Type': 'application/json', 'Accept': 'application/json'},
    body: JSON.stringify({"audience": audience, "algorithm": "HS256"})
  };
  if (variant === "include") init.credentials = "include";
  try {
    const response = await fetch(url, init);
    return {status: response.status, body: await response.text()};
  } catch (error) {
    return {networkError: error.name + ": " + error.message};
  }
}
</script></head><body><p>A page on another origin that calls the issuer.</p></body></html>
"""


def _which(name: str) -> str | None:
    return shutil.which(name)


def missingPrerequisites() -> list[str]:
    """What this machine lacks for the browser tests (empty when all is there)."""
    missing = []
    for program, package in (
        ("node", "nodejs"),
        ("chromium", "chromium"),
        ("firefox-esr", "firefox-esr"),
        ("certutil", "libnss3-tools"),
        ("pk12util", "libnss3-tools"),
        ("setsid", "util-linux"),
    ):
        if _which(program) is None:
            missing.append(f"{program} (Debian package {package})")
    if not (DRIVER_DIR / "node_modules" / "puppeteer-core").is_dir():
        missing.append("tests/browser/node_modules (run npm ci in tests/browser)")
    policyParent = POLICY_DIR
    while not policyParent.exists():
        policyParent = policyParent.parent
    if not os.access(policyParent, os.W_OK):
        missing.append(f"write access to {POLICY_DIR} (run as root)")
    return missing


@dataclass
class Seen:
    """One request to the issue endpoint, as the server saw it."""

    scenario: str | None
    method: str
    origin: str | None
    subject: str | None  # CN of the verified client certificate on this request's connection
    connection: int  # same number: same TLS connection
    status: int


class RequestRecorder:
    """Wrap the issue resource's render() to note, per request, whether its connection carried a certificate."""

    def __init__(self, service: IssuerService) -> None:
        self.seen: list[Seen] = []
        self._connections: list[object] = []
        issue = service.issueResource
        original = issue.render

        def render(request: server.Request) -> bytes:
            identity = clientIdentityOf(request.transport)  # type: ignore[attr-defined]
            body = original(request)
            scenario = request.args.get(b"scenario", [None])[0] if request.args else None
            origin = request.getHeader(b"origin")
            self.seen.append(
                Seen(
                    scenario=scenario.decode() if scenario is not None else None,
                    method=request.method.decode(),
                    origin=origin.decode() if origin is not None else None,
                    subject=subjectOf(identity.certificate, "cn") if identity.certificate is not None else None,
                    connection=self._connectionNumber(request.channel),
                    status=request.code,
                )
            )
            return body

        issue.render = render  # type: ignore[method-assign]

    def _connectionNumber(self, channel: object) -> int:
        for number, known in enumerate(self._connections):
            if known is channel:
                return number
        self._connections.append(channel)
        return len(self._connections) - 1

    def of(self, scenario: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.scenario == scenario]

    def fromOrigin(self, origin: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.origin == origin]


class CallerPage(resource.Resource):
    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return CALLER_PAGE


class DriverProtocol(protocol.ProcessProtocol):
    """Line-delimited JSON to and from tests/browser/driver.mjs."""

    def __init__(self) -> None:
        self.ready: Deferred[dict[str, Any]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.waiting: dict[int, Deferred[dict[str, Any]]] = {}
        self.buffer = b""
        self.stderr = b""
        self.closed = False

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if not line.strip():
                continue
            message = json.loads(line)
            if message.get("ready"):
                self.ready.callback(message)
            elif message.get("closed"):
                self.closed = True
            elif message.get("id") in self.waiting:
                self.waiting.pop(message["id"]).callback(message)

    def errReceived(self, data: bytes) -> None:
        self.stderr = (self.stderr + data)[-20000:]

    def processEnded(self, reason: Failure) -> None:
        problem = RuntimeError(f"the browser driver ended: {reason.value}\n{self.stderr.decode(errors='replace')}")
        if not self.ready.called:
            self.ready.errback(problem)
        for waiting in self.waiting.values():
            waiting.errback(problem)
        self.waiting.clear()
        self.ended.callback(None)


class Browser:
    """One browser, with a fresh profile, driven by a node process in its own process group."""

    def __init__(self, name: str, folder: str) -> None:
        self.name = name
        self.folder = folder
        self.protocol = DriverProtocol()
        self.pid: int | None = None
        self.version = ""
        self._next = 0

    async def start(self, profile: str, home: str, tmp: str) -> None:
        node, setsid = _which("node"), _which("setsid")
        executable = _which(EXECUTABLES[self.name])
        assert node and setsid and executable
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "XDG_CACHE_HOME": os.path.join(home, ".cache"),
            "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
            # Chromium puts a Unix socket in TMPDIR; socket paths are short (108 bytes).
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "TZ": "UTC",
        }
        # setsid: the driver and the browser it starts get their own process
        # group, so cleanup can end exactly them, whatever happens.
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.protocol,
            setsid,
            [setsid, node, str(DRIVER), self.name, executable, profile],
            env=env,
            path=str(DRIVER_DIR),
        )
        self.pid = transport.pid
        hello = await self.protocol.ready.addTimeout(90, reactor)  # type: ignore[arg-type]
        self.version = hello.get("version", "")

    async def call(self, cmd: str, timeout: float = 60, **arguments: Any) -> Any:
        self._next += 1
        waiting: Deferred[dict[str, Any]] = Deferred()
        self.protocol.waiting[self._next] = waiting
        line = json.dumps({"id": self._next, "cmd": cmd, **arguments}) + "\n"
        self.protocol.transport.write(line.encode())  # type: ignore[union-attr]
        answer = await waiting.addTimeout(timeout, reactor)  # type: ignore[arg-type]
        if not answer.get("ok"):
            raise AssertionError(f"{self.name}: {cmd} failed: {answer.get('error')}")
        return answer["result"]

    async def quit(self) -> None:
        if self.pid is None or self.protocol.ended.called:
            return
        self.protocol.transport.write(b'{"cmd": "quit"}\n')  # type: ignore[union-attr]
        try:
            await self.protocol.ended.addTimeout(30, reactor)  # type: ignore[arg-type]
        except Exception:
            self.killGroup()
            await self.protocol.ended

    def groupMembers(self) -> list[int]:
        """Processes still in the driver's process group (the driver, the browser and its helpers)."""
        if self.pid is None:
            return []
        members = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.pid:  # the process group id
                members.append(int(entry))
        return members

    def killGroup(self) -> None:
        if self.pid is not None and self.groupMembers():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def closedPort() -> int:
    """A loopback port that nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


def makeNssDatabase(folder: str, caFile: str, p12File: str | None) -> None:
    """An NSS database that trusts the test CA for TLS servers and, if given, holds a client certificate."""
    os.makedirs(folder, exist_ok=True)
    database = f"sql:{folder}"
    _run("certutil", "-N", "-d", database, "--empty-password")
    _run("certutil", "-A", "-d", database, "-n", CA_NICKNAME, "-t", "C,,", "-i", caFile)
    if p12File is not None:
        _run("pk12util", "-i", p12File, "-d", database, "-W", P12_PASSWORD, "-K", "")


class BrowserTestCase(TestCase):
    """Shared set-up: an issuer with the diagnostic page, a caller page, a fresh browser."""

    timeout = 300
    browserName = ""
    #: Which of this browser's diagnostic-page screenshots the README shows.
    readmeScreenshot = ""

    if not ENABLED:
        skip = "browser tests run in the tox environment 'browser' (TOKENISSUER_BROWSER_TESTS=1)"

    def setUp(self) -> None:
        missing = missingPrerequisites()
        if missing:
            message = "browser tests need: " + "; ".join(missing)
            if REQUIRED:
                self.fail(message)
            self.skipTest(message)
        self.folder = os.path.abspath(self.mktemp())
        self.pki = TestPKI(os.path.join(self.folder, "pki"))
        self.p12 = self.pki.write("client.p12", devpki.pkcs12Bytes(self.pki.client, self.pki.ca, P12_PASSWORD))
        self.logs = LogCapture(self)
        # Pages on http://localhost (any port) may call; the same pages reached
        # as http://127.0.0.1 are another origin, which may not.
        self.port, self.service = startIssuer(
            self,
            self.pki,
            origins="http://localhost:*",
            **{"demo-port": "tcp:0:interface=127.0.0.1"},
        )
        assert self.service.demoPort is not None
        self.demoPort: int = self.service.demoPort.getHost().port  # type: ignore[attr-defined]
        self.recorder = RequestRecorder(self.service)
        #: The count of abandoned handshakes (client_closed) after each fetch scenario.
        self.closedAfter: dict[str, float] = {}
        self.addCleanup(self.writeRecord)
        site = server.Site(CallerPage())
        pages = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(pages.stopListening)
        self.pagePort: int = pages.getHost().port  # type: ignore[attr-defined]
        self.page = f"http://localhost:{self.pagePort}/"
        self.foreignPage = f"http://127.0.0.1:{self.pagePort}/"

    def writeRecord(self) -> None:
        """Leave what the server saw next to the screenshots, for people reading a failed run."""
        record = {
            "requests": [vars(seen) for seen in self.recorder.seen],
            "handshakeFailures": {
                reason: self.handshakeFailures(reason)
                for reason in ("client_closed", "client_certificate_rejected", "client_certificate_missing", "other")
            },
            "clientClosedAfter": self.closedAfter,
            "log": self.logs.messages(),
        }
        with open(os.path.join(self.folder, "server-record.json"), "w") as handle:
            json.dump(record, handle, indent=2)

    def issueUrl(self, scenario: str) -> str:
        # A query string per scenario: the server can tell the scenarios apart,
        # and no scenario reuses another's cached preflight.
        return f"https://localhost:{self.port}/jwthmac/issue?scenario={scenario}"

    async def startBrowser(self, withCertificate: bool) -> Browser:
        name = self.browserName
        root = os.path.join(self.folder, f"{name}-{'cert' if withCertificate else 'nocert'}")
        home = os.path.join(root, "home")
        profile = os.path.join(root, "profile")
        os.makedirs(home)
        p12 = self.p12 if withCertificate else None
        if name == "chromium":
            # Chromium on Linux keeps certificates in $HOME/.pki/nssdb; HOME is ours.
            makeNssDatabase(os.path.join(home, ".pki", "nssdb"), self.pki.path("ca.pem"), p12)
            os.makedirs(profile)
            self.installChromiumPolicy()
        else:
            makeNssDatabase(profile, self.pki.path("ca.pem"), p12)
            with open(os.path.join(profile, "user.js"), "w") as handle:
                handle.write('user_pref("security.default_personal_cert", "Select Automatically");\n')
        tmp = tempfile.mkdtemp(prefix="tokiss-")
        self.addCleanup(shutil.rmtree, tmp, True)
        browser = Browser(name, root)
        self.addCleanup(self.stopBrowser, browser)
        await browser.start(profile, home, tmp)
        return browser

    async def stopBrowser(self, browser: Browser) -> None:
        await browser.quit()
        # Helper processes may take a moment to follow the browser out.
        for _ in range(100):
            left = browser.groupMembers()
            if not left:
                break
            await deferLater(reactor, 0.1, lambda: None)
        browser.killGroup()
        self.assertEqual(left, [], f"{browser.name} left processes behind")

    def installChromiumPolicy(self) -> None:
        """Let Chromium present the test client certificate to the issuer without a prompt."""
        created = []
        for folder in (POLICY_DIR.parent.parent, POLICY_DIR.parent, POLICY_DIR):
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        rule = {"pattern": f"https://localhost:{self.port}", "filter": {"ISSUER": {"CN": "tokenissuer test CA"}}}
        policy = POLICY_DIR / f"tokenissuer-browser-test-{os.getpid()}-{self.port}.json"
        policy.write_text(json.dumps({"AutoSelectCertificateForUrls": [json.dumps(rule)]}))

        def remove() -> None:
            policy.unlink(missing_ok=True)
            for folder in reversed(created):
                if not any(folder.iterdir()):
                    folder.rmdir()

        self.addCleanup(remove)

    # Checks shared by the browsers

    def assertValidToken(self, token: str) -> dict[str, Any]:
        claims = jwt.decode(
            token,
            TEST_HMAC_KEY.encode(),
            algorithms=["HS256"],
            audience=AUDIENCE,
            issuer="daheim_token_issuer",
            options={"require": ["exp", "iat", "sub", "jti"]},
        )
        self.assertEqual(claims["sub"], CLIENT_NAME)
        return claims

    async def fetch(self, browser: Browser, scenario: str, variant: str, page: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await browser.call(
            "fetch", page=page or self.page, url=self.issueUrl(scenario), variant=variant, audience=AUDIENCE
        )
        self.closedAfter[scenario] = self.handshakeFailures("client_closed")
        return result

    def assertToken(self, result: dict[str, Any]) -> None:
        self.assertEqual(result.get("status"), 200, result)
        answer = json.loads(result["body"])
        self.assertEqual(answer["expires_in"], 3600)
        self.assertValidToken(answer["token"])

    def assertReadable401(self, result: dict[str, Any]) -> dict[str, Any]:
        self.assertEqual(result.get("status"), 401, result)
        answer: dict[str, Any] = json.loads(result["body"])
        self.assertEqual(answer["error"], "client_certificate_required")
        self.assertIn("credentials: 'include'", answer["message"])
        return answer

    def assertSeen(self, scenario: str, expected: list[tuple[str, str | None, int]]) -> list[Seen]:
        """The requests of one scenario, as (method, client certificate CN or None, status), in order."""
        seen = self.recorder.of(scenario)
        self.assertEqual([(s.method, s.subject, s.status) for s in seen], expected, seen)
        return seen

    async def demo(self, browser: Browser, name: str, query: str = "", host: str = "localhost") -> dict[str, Any]:
        path = os.path.join(self.folder, f"demo-{browser.name}-{name}.png")
        state: dict[str, Any] = await browser.call(
            "demo", url=f"http://{host}:{self.demoPort}/{query}", screenshot=path
        )
        with open(path, "rb") as handle:
            self.assertEqual(handle.read(8), b"\x89PNG\r\n\x1a\n")
        state["screenshot"] = path
        return state

    def keepScreenshot(self, state: dict[str, Any], outcome: str) -> None:
        """With TOKENISSUER_UPDATE_SCREENSHOTS=1, copy the README's screenshot of this browser, if this is it."""
        if UPDATE_SCREENSHOTS and outcome == self.readmeScreenshot:
            SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(state["screenshot"], SCREENSHOT_DIR / f"demo-{self.browserName}-{outcome}.png")

    def assertNoErrorLogged(self) -> None:
        bad = [
            event
            for event in self.logs.events
            if event.get("log_failure") is not None
            or getattr(event.get("log_level"), "name", "") in ("warn", "error", "critical")
        ]
        self.assertEqual(bad, [], self.logs.text())
        self.assertNotIn("TLS handshake", self.logs.text())

    def handshakeFailures(self, reason: str) -> float:
        value = self.service.metrics.registry.get_sample_value(
            "tokenissuer_tls_handshake_failures_total", {"reason": reason}
        )
        return value or 0.0

    async def checkWithCertificate(self, browser: Browser) -> None:
        """What both browsers must do with a client certificate; browser-specific parts are in the subclasses."""
        # credentials: 'include' gets a token in every browser.
        self.assertToken(await self.fetch(browser, "include", "include"))

        # A page on an origin that is not allowed gets nothing, with or without
        # include; its preflight is refused (403) and no POST follows.
        for variant in ("include", "unchanged"):
            scenario = f"foreign-{variant}"
            result = await self.fetch(browser, scenario, variant, page=self.foreignPage)
            self.assertIn("TypeError", result.get("networkError", ""), result)
            seen = self.recorder.of(scenario)
            self.assertTrue(seen, f"{scenario}: the preflight did not reach the issuer")
            self.assertEqual({(s.method, s.status) for s in seen}, {("OPTIONS", 403)}, seen)
            self.assertEqual({s.origin for s in seen}, {self.foreignPage.rstrip("/")})

        # The diagnostic page: the decoded token ...
        state = await self.demo(browser, "token")
        self.assertEqual(state["outcome"], "token", state["text"])
        self.assertEqual(state["issuer"], f"https://localhost:{self.port}/jwthmac/issue")
        self.assertEqual(state["audience"], "dummy")  # the first allowed audience, sorted
        for text in (f"Token received for {CLIENT_NAME}", "sub", CLIENT_NAME, "aud", "dummy", "exp", "Expires in"):
            self.assertIn(text, state["text"])
        demoOrigin = f"http://localhost:{self.demoPort}"
        posts = [s for s in self.recorder.fromOrigin(demoOrigin) if s.method == "POST"]
        self.assertEqual([(s.subject, s.status) for s in posts], [(CLIENT_NAME, 200)])
        self.keepScreenshot(state, "token")

        # ... and its explanations.
        state = await self.demo(browser, "origin", host="127.0.0.1")
        self.assertEqual(state["outcome"], "origin_not_allowed", state["text"])
        self.assertIn(f"http://127.0.0.1:{self.demoPort}", state["text"])
        self.assertIn("TOK_ISS_ALLOWED_ORIGINS", state["text"])

        state = await self.demo(browser, "audience", query="?audience=not-listed")
        self.assertEqual(state["outcome"], "audience_not_allowed", state["text"])
        self.assertIn("not-listed", state["text"])

        # Nothing listens on a port just closed: the page cannot tell that from an untrusted issuer.
        query = f"?issuer=https://localhost:{closedPort()}/jwthmac/issue"
        state = await self.demo(browser, "unreachable", query=query)
        self.assertEqual(state["outcome"], "unreachable", state["text"])
        for text in ("does not trust the issuer's TLS certificate", "is unreachable", "open the issuer URL directly"):
            self.assertIn(text, state["text"])

        self.assertEqual(len(self.logs.issued()), 2)
        self.assertNoErrorLogged()

    async def checkWithoutCertificate(self, browser: Browser) -> None:
        """A browser without a client certificate gets a readable 401, and the page says why."""
        self.assertReadable401(await self.fetch(browser, "include", "include"))
        seen = self.recorder.of("include")
        self.assertEqual([(s.method, s.subject, s.status) for s in seen], [("OPTIONS", None, 204), ("POST", None, 401)])

        state = await self.demo(browser, "no-certificate")
        self.assertEqual(state["outcome"], "no_certificate", state["text"])
        for text in ("No client certificate was presented", "client.p12", "client_certificate_required"):
            self.assertIn(text, state["text"])
        self.keepScreenshot(state, "no-certificate")
        self.assertEqual(self.logs.issued(), [])
        self.assertNoErrorLogged()


class ChromiumTests(BrowserTestCase):
    browserName = "chromium"
    readmeScreenshot = "token"

    async def test_withCertificate(self) -> None:
        """
        Chromium presents its certificate on every connection, preflights
        included: the credentialed call and the unchanged call both get a token.
        """
        browser = await self.startBrowser(withCertificate=True)
        self.assertTrue(browser.version, "no version from the driver")
        await self.checkWithCertificate(browser)
        self.assertSeen("include", [("OPTIONS", CLIENT_NAME, 204), ("POST", CLIENT_NAME, 200)])

        self.assertToken(await self.fetch(browser, "unchanged", "unchanged"))
        self.assertSeen("unchanged", [("OPTIONS", CLIENT_NAME, 204), ("POST", CLIENT_NAME, 200)])

        # Chromium gave up a handshake when first asked for a certificate; the
        # service counted that as client_closed and logged no error about it.
        self.assertGreaterEqual(self.closedAfter["include"], 1, "no abandoned handshake during the first call")
        for reason in ("client_certificate_rejected", "client_certificate_missing", "protocol_mismatch", "other"):
            self.assertEqual(self.handshakeFailures(reason), 0, reason)
        self.assertNoErrorLogged()

    async def test_withoutCertificate(self) -> None:
        browser = await self.startBrowser(withCertificate=False)
        await self.checkWithoutCertificate(browser)


class FirefoxTests(BrowserTestCase):
    browserName = "firefox"
    readmeScreenshot = "no-certificate"

    async def test_withCertificate(self) -> None:
        """
        Firefox sends no certificate on a preflight, nor on an uncredentialed
        cross-origin request: only credentials: 'include' gets a token, over its
        own connection; the unchanged call gets a 401 that says what to change.
        """
        browser = await self.startBrowser(withCertificate=True)
        await self.checkWithCertificate(browser)
        preflight, post = self.assertSeen("include", [("OPTIONS", None, 204), ("POST", CLIENT_NAME, 200)])
        self.assertNotEqual(preflight.connection, post.connection)

        self.assertReadable401(await self.fetch(browser, "unchanged", "unchanged"))
        self.assertSeen("unchanged", [("OPTIONS", None, 204), ("POST", None, 401)])
        for reason in ("client_certificate_rejected", "client_certificate_missing", "protocol_mismatch", "other"):
            self.assertEqual(self.handshakeFailures(reason), 0, reason)

    async def test_withoutCertificate(self) -> None:
        browser = await self.startBrowser(withCertificate=False)
        await self.checkWithoutCertificate(browser)
