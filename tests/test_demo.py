"""
The diagnostic page (L{tokenissuer.demo}) and how it is switched on: the
--demo-port option, development mode's default, the listener's life cycle.
What the page shows in real browsers is tested in test_browser.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import http.client
import json
import re
import shutil
import socket
import subprocess
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tokenissuer import devpki
from tokenissuer.config import DEV_DEMO_LISTEN, ConfigError, IssuerOptions, Settings, resolveSettings
from tokenissuer.demo import PAGE, issuerUrlFor, pageUrlFor
from tokenissuer.service import StartupError, buildService

from .support import TEST_HMAC_KEY, LogCapture, TestPKI, startIssuer

ENV = {"TOK_ISS_HMAC_SECRET": TEST_HMAC_KEY}


def _resolve(*argv: str, **environ: str):  # type: ignore[no-untyped-def]
    options = IssuerOptions()
    options.parseOptions(list(argv))
    return resolveSettings(options, {**ENV, **environ})


def _get(port: int, path: str = "/", method: str = "GET", host: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read().decode("utf-8")
    finally:
        connection.close()


class DemoPortSettingTests(SynchronousTestCase):
    """--demo-port / TOK_ISS_DEMO_PORT: off by default, a port or an endpoint, 'off'."""

    def test_offByDefault(self) -> None:
        settings = _resolve()
        self.assertIsNone(settings.demoListen)
        self.assertFalse(settings.demoIsDevDefault)

    def test_portNumber(self) -> None:
        """A bare port number listens like --listen's default, on every interface."""
        self.assertEqual(_resolve("--demo-port", "8001").demoListen, "tcp:8001")

    def test_endpointFromEnvironment(self) -> None:
        settings = _resolve(TOK_ISS_DEMO_PORT="tcp:9000:interface=127.0.0.1")
        self.assertEqual(settings.demoListen, "tcp:9000:interface=127.0.0.1")

    def test_commandLineWins(self) -> None:
        self.assertEqual(_resolve("--demo-port", "8002", TOK_ISS_DEMO_PORT="8003").demoListen, "tcp:8002")

    def test_off(self) -> None:
        self.assertIsNone(_resolve("--demo-port", "OFF").demoListen)

    def test_emptyRefused(self) -> None:
        error = self.assertRaises(ConfigError, _resolve, TOK_ISS_DEMO_PORT=" ")
        self.assertIn("TOK_ISS_DEMO_PORT", str(error))

    def test_portOutOfRange(self) -> None:
        error = self.assertRaises(ConfigError, _resolve, "--demo-port", "70000")
        self.assertIn("--demo-port", str(error))

    def test_helpNamesVariable(self) -> None:
        self.assertTrue(re.search(r"\bTOK_ISS_DEMO_PORT\b", str(IssuerOptions())))

    def test_invalidEndpointStopsStartup(self) -> None:
        pki = TestPKI(self.mktemp())
        settings = resolveSettings(
            {
                "cert": pki.path("server.crt"),
                "key": pki.path("server.pem"),
                "client-ca": pki.path("ca.pem"),
                "demo-port": "nonsense:1",
            },
            ENV,
        )
        error = self.assertRaises(StartupError, buildService, settings, reactor)
        self.assertIn("demo-port endpoint 'nonsense:1' is invalid", str(error))


class DevModeDemoTests(SynchronousTestCase):
    """Development mode serves the page on 127.0.0.1:8000 unless told otherwise, and allows its origin."""

    def setUp(self) -> None:
        self.folder = self.mktemp()
        devpki.ensureDevFiles(self.folder)

    def test_onByDefault(self) -> None:
        settings = resolveSettings({"dev": True, "dev-dir": self.folder}, {})
        self.assertEqual(settings.demoListen, DEV_DEMO_LISTEN)
        self.assertEqual(DEV_DEMO_LISTEN, "tcp:8000:interface=127.0.0.1")
        self.assertTrue(settings.demoIsDevDefault)

    def test_pageOriginAllowed(self) -> None:
        """The page's origin, by either local name, may call the issuer in development mode."""
        settings = resolveSettings({"dev": True, "dev-dir": self.folder}, {})
        for origin in ("http://127.0.0.1:8000", "http://localhost:8000"):
            self.assertTrue(settings.origins.isAllowed(origin), origin)

    def test_explicitSettingWins(self) -> None:
        settings = resolveSettings({"dev": True, "dev-dir": self.folder}, {"TOK_ISS_DEMO_PORT": "off"})
        self.assertIsNone(settings.demoListen)
        settings = resolveSettings({"dev": True, "dev-dir": self.folder, "demo-port": "8123"}, {})
        self.assertEqual(settings.demoListen, "tcp:8123")
        self.assertFalse(settings.demoIsDevDefault)


def _certificate(names: list[x509.GeneralName] | None) -> x509.Certificate:
    ca = devpki.makeCA("url test CA")
    key = devpki.newKey()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]


class UrlTests(SynchronousTestCase):
    """The prefilled issuer URL uses a name the server certificate is valid for."""

    def test_firstDnsName(self) -> None:
        certificate = _certificate([x509.DNSName("*.example.org"), x509.DNSName("issuer.example.org")])
        self.assertEqual(issuerUrlFor(certificate, 4443), "https://issuer.example.org:4443/jwthmac/issue")

    def test_defaultPortLeftOut(self) -> None:
        certificate = _certificate([x509.DNSName("issuer.example.org")])
        self.assertEqual(issuerUrlFor(certificate, 443), "https://issuer.example.org/jwthmac/issue")

    def test_ipv6Address(self) -> None:
        import ipaddress

        certificate = _certificate([x509.IPAddress(ipaddress.ip_address("::1"))])
        self.assertEqual(issuerUrlFor(certificate, 4443), "https://[::1]:4443/jwthmac/issue")

    def test_noAlternativeNames(self) -> None:
        self.assertEqual(issuerUrlFor(_certificate(None), 4443), "https://localhost:4443/jwthmac/issue")

    def test_pageUrl(self) -> None:
        self.assertEqual(pageUrlFor("0.0.0.0", 8000), "http://localhost:8000/")  # noqa: S104
        self.assertEqual(pageUrlFor("::1", 8000), "http://[::1]:8000/")
        self.assertEqual(pageUrlFor("127.0.0.1", 8000), "http://127.0.0.1:8000/")


class DemoListenerTests(TestCase):
    """The page over real HTTP from a running issuer."""

    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.logs = LogCapture(self)

    def settings(self, **changes: Any) -> Settings:
        """Settings for an issuer on free loopback ports, changed as given."""
        settings = resolveSettings(
            {
                "listen": "tcp:0:interface=127.0.0.1",
                "admin-listen": "off",
                "cert": self.pki.path("server.crt"),
                "key": self.pki.path("server.pem"),
                "client-ca": self.pki.path("ca.pem"),
            },
            ENV,
        )
        return dataclasses.replace(settings, **changes)

    def start(self, **options: str) -> int:
        self.port, self.service = startIssuer(self, self.pki, **{"demo-port": "tcp:0:interface=127.0.0.1", **options})
        assert self.service.demoPort is not None
        port: int = self.service.demoPort.getHost().port  # type: ignore[attr-defined]
        return port

    async def test_page(self) -> None:
        """One self-contained page: prefilled issuer URL and audience, a CSP nonce, nothing fetched from elsewhere."""
        demoPort = self.start()
        status, headers, body = await deferToThread(_get, demoPort)
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/html; charset=utf-8")
        self.assertEqual(headers["Cache-Control"], "no-store")
        config = json.loads(re.search(r'<script id="config" type="application/json">(.*?)</script>', body)[1])  # type: ignore[index]
        self.assertEqual(config, {"issuerUrl": f"https://localhost:{self.port}/jwthmac/issue", "audience": "dummy"})
        nonce = re.search(r"script-src 'nonce-([^']+)'", headers["Content-Security-Policy"])[1]  # type: ignore[index]
        self.assertIn(f'<script nonce="{nonce}">', body)
        self.assertIn(f'<style nonce="{nonce}">', body)
        self.assertIn("default-src 'none'", headers["Content-Security-Policy"])
        self.assertNotRegex(body, r"(?:src|href)=\"(?:https?:)?//")
        self.assertNotIn("@import", body)
        self.assertIn('credentials: "include"', body)

    async def test_freshNoncePerLoad(self) -> None:
        demoPort = self.start()
        first = (await deferToThread(_get, demoPort))[1]["Content-Security-Policy"]
        second = (await deferToThread(_get, demoPort))[1]["Content-Security-Policy"]
        self.assertNotEqual(first, second)

    async def test_configCannotCloseTheScript(self) -> None:
        """An audience with markup in it stays data."""
        demoPort = self.start(audiences="</script><script>alert(1)</script>")
        body = (await deferToThread(_get, demoPort))[2]
        self.assertNotIn("<script>alert(1)", body)
        self.assertIn("\\u003c/script\\u003e\\u003cscript\\u003ealert(1)", body)

    async def test_otherPathsAndMethods(self) -> None:
        demoPort = self.start()
        self.assertEqual((await deferToThread(_get, demoPort, "/favicon.ico"))[0], 404)
        status, headers, _ = await deferToThread(_get, demoPort, "/", "POST")
        self.assertEqual(status, 405)
        self.assertEqual(headers["Allow"], "GET, HEAD")

    async def test_loggedWithItsOrigin(self) -> None:
        """The start-up log names the page's URL, and says when its origin is not allowed."""
        demoPort = self.start()
        text = self.logs.text()
        self.assertIn(f"diagnostic page: open http://127.0.0.1:{demoPort}/", text)
        self.assertIn(f"its origin http://127.0.0.1:{demoPort} is not in the allowed origins", text)

    async def test_stoppedWithTheService(self) -> None:
        demoPort = self.start()
        await self.service.stopService()
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", demoPort), timeout=5).close()

    async def test_busyPortStopsStartup(self) -> None:
        """A page asked for explicitly must be served, or the issuer does not start."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            service = buildService(self.settings(demoListen=f"tcp:{port}:interface=127.0.0.1"), reactor)
            try:
                error = self.assertRaises(StartupError, service.startService)
            finally:
                await service.stopService()
        self.assertIn(f"cannot serve the diagnostic page on tcp:{port}:interface=127.0.0.1", str(error))

    async def test_busyPortOnlyWarnsForTheDevDefault(self) -> None:
        """Development mode's default page must not keep the issuer from starting."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            settings = self.settings(demoListen=f"tcp:{port}:interface=127.0.0.1", demoIsDevDefault=True)
            service = buildService(settings, reactor)
            service.startService()
        try:
            self.assertIsNone(service.demoPort)
            self.assertIsNotNone(service.port)
            self.assertIn("development mode: cannot serve the diagnostic page", self.logs.text())
        finally:
            await service.stopService()


class PageScriptTests(SynchronousTestCase):
    def test_scriptParses(self) -> None:
        """The inline script is valid JavaScript (node checks it, where node is installed)."""
        node = shutil.which("node")
        if node is None:
            raise self.skipTest("node is not installed")
        script = re.search(r'<script nonce="\{\{nonce\}\}">(.*?)</script>', PAGE, re.DOTALL)
        assert script is not None
        path = self.mktemp() + ".js"
        with open(path, "w") as handle:
            handle.write(script[1])
        result = subprocess.run([node, "--check", path], capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
