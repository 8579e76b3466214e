"""
Start-up: every unusable setting stops the service with one clear line, and
the real twistd command (plugin discovery, dev mode, exit status) works.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tokenissuer import devpki
from tokenissuer.service import StartupError, makeService

from .consumer import consumerVerify
from .support import TEST_HMAC_KEY, TWISTD, Client, TestPKI, cleanEnviron, readUntil, spawnIssuer


class StartupRefusalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.options: dict[str, Any] = {
            "listen": "tcp:0:interface=127.0.0.1",
            "admin-listen": "tcp:0:interface=127.0.0.1",
            "cert": self.pki.path("server.crt"),
            "key": self.pki.path("server.pem"),
            "client-ca": self.pki.path("ca.pem"),
        }
        self.environ = {"TOK_ISS_HMAC_SECRET": TEST_HMAC_KEY, "TOK_ISS_ALLOWED_AUDIENCES": "gschmarri"}

    def refusal(self, **changes: Any) -> str:
        options = {**self.options, **{k: v for k, v in changes.items() if not k.startswith("TOK_")}}
        environ = {**self.environ, **{k: v for k, v in changes.items() if k.startswith("TOK_")}}
        with self.assertRaises(StartupError) as raised:
            makeService(options, environ)
        message = str(raised.exception)
        self.assertTrue(message.startswith("tokenissuer: error: "), message)
        self.assertNotIn("\n", message)
        self.assertNotIn(TEST_HMAC_KEY, message)
        return message

    def test_validSettingsBuild(self) -> None:
        service = makeService(self.options, self.environ)
        self.assertEqual(service.settings.audiences, frozenset({"gschmarri"}))

    def test_shortKey(self) -> None:
        message = self.refusal(TOK_ISS_HMAC_SECRET="x" * 31)
        self.assertIn("31 bytes", message)
        self.assertNotIn("x" * 31, message)

    def test_missingKey(self) -> None:
        self.environ.pop("TOK_ISS_HMAC_SECRET")
        self.assertIn("TOK_ISS_HMAC_SECRET", self.refusal())

    def test_keyDoesNotMatchCertificate(self) -> None:
        _, otherKey = self.pki.clientFiles(self.pki.client, "other")
        self.assertIn("does not match", self.refusal(key=otherKey))

    def test_missingFiles(self) -> None:
        for option in ("cert", "key", "client-ca"):
            with self.subTest(option=option):
                message = self.refusal(**{option: self.pki.path("missing.pem")})
                self.assertIn("does not exist", message)
                self.assertIn("missing.pem", message)

    def test_unreadableFile(self) -> None:
        if os.getuid() == 0:
            # root reads any file; a directory is unreadable as a file for everyone
            self.assertIn("is a directory", self.refusal(cert=self.pki.folder))
        else:
            path = self.pki.write("locked.pem", b"")
            os.chmod(path, 0)
            self.assertIn("not readable", self.refusal(cert=path))

    def test_emptyCABundle(self) -> None:
        empty = self.pki.write("empty.pem", b"")
        self.assertIn("no PEM certificate", self.refusal(**{"client-ca": empty}))

    def test_nonCAInBundle(self) -> None:
        leafOnly = self.pki.write("leaf.pem", self.pki.client.certificatePEM())
        self.assertIn("not a CA certificate", self.refusal(**{"client-ca": leafOnly}))

    def test_garbageKey(self) -> None:
        garbage = self.pki.write("garbage.pem", b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
        self.assertIn("no usable PEM private key", self.refusal(key=garbage))

    def test_expiredServerCertificate(self) -> None:
        import datetime

        now = datetime.datetime.now(datetime.UTC)
        old = devpki.issueServer(
            self.pki.ca, notBefore=now - datetime.timedelta(days=10), notAfter=now - datetime.timedelta(days=1)
        )
        cert, key = self.pki.write("old.crt", old.certificatePEM()), self.pki.write("old.pem", old.keyPEM())
        self.assertIn("expired", self.refusal(cert=cert, key=key))

    def test_invalidTTL(self) -> None:
        for value in ("abc", "0", "-1", "86401"):
            with self.subTest(value=value):
                self.assertIn("lifetime", self.refusal(TOK_ISS_TOKEN_TTL=value))

    def test_invalidOrigin(self) -> None:
        self.assertIn("https://app.example.org/", self.refusal(origins="https://app.example.org/"))

    def test_invalidEndpoint(self) -> None:
        for listen in ("nonsense:1", "tcp:notaport", "ssl:4443"):
            with self.subTest(listen=listen):
                self.assertIn(listen, self.refusal(listen=listen))

    def test_invalidClientAuth(self) -> None:
        self.assertIn("client-auth", self.refusal(**{"client-auth": "sometimes"}))


def _runTwistd(
    arguments: list[str], environ: dict[str, str], cwd: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "tokenissuer", *arguments],
        env=environ,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class TwistdCommandTests(TestCase):
    """The real command line, in a child process, as an operator runs it."""

    timeout = 120

    def test_refusalIsOneLineAndExitStatus1(self) -> None:
        pki = TestPKI(self.mktemp())
        result = _runTwistd(
            ["--cert", pki.path("server.crt"), "--key", pki.path("server.pem"), "--client-ca", pki.path("ca.pem")],
            cleanEnviron(TOK_ISS_HMAC_SECRET="short"),
            pki.folder,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("HMAC key", lines[0])
        self.assertNotIn("Traceback", result.stderr + result.stdout)

    def test_helpNamesEveryVariable(self) -> None:
        result = subprocess.run(
            [*TWISTD, "tokenissuer", "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        for variable in (
            "TOK_ISS_LISTEN",
            "TOK_ISS_FILE_CERT",
            "TOK_ISS_FILE_KEY",
            "TOK_ISS_FILE_ROOT",
            "TOK_ISS_HMAC_SECRET",
            "TOK_ISS_NAME",
            "TOK_ISS_ALLOWED_AUDIENCES",
            "TOK_ISS_ALLOWED_ORIGINS",
            "TOK_ISS_TOKEN_TTL",
            "TOK_ISS_CLIENT_AUTH",
        ):
            self.assertIn(variable, result.stdout)

    async def test_devModeFromNothingServesTokens(self) -> None:
        """`twistd -n tokenissuer --dev` in an empty folder: PKI created, summary logged, token served."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        process = subprocess.Popen(
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                "tokenissuer",
                "--dev",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--admin-listen",
                "off",
            ],
            env=cleanEnviron(),
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(process.wait, 30)
        self.addCleanup(process.send_signal, signal.SIGTERM)
        output = await deferToThread(readUntil, process, "development mode: import", 60)
        match = re.search(r"tokenissuer ready: .* \(port (\d+)\)", output)
        self.assertIsNotNone(match, output)
        assert match is not None
        self.assertIn("curl --cacert tokenissuer-dev/ca.pem --cert tokenissuer-dev/client.crt", output)
        self.assertIn("client-auth=optional", output)
        devDir = os.path.join(folder, "tokenissuer-dev")
        key = open(os.path.join(devDir, "hmac.key"), "rb").read()
        self.assertNotIn(key.decode(), output)
        for name in ("ca.pem", "server.crt", "server.pem", "client.crt", "client.key", "client.p12", "hmac.key"):
            self.assertTrue(os.path.exists(os.path.join(devDir, name)), name)
        client = Client(
            int(match.group(1)),
            os.path.join(devDir, "ca.pem"),
            os.path.join(devDir, "client.crt"),
            os.path.join(devDir, "client.key"),
        )
        response = await deferToThread(client.call, headers={"Origin": "http://localhost:5173"})
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["Access-Control-Allow-Origin"], "http://localhost:5173")
        consumerVerify(response.json()["token"], key, "gschmarri", "daheim_token_issuer")


class DevFolderTests(SynchronousTestCase):
    def test_incompleteFolderIsNotOverwritten(self) -> None:
        """A partly deleted dev folder stops start-up instead of silently replacing the PKI."""
        folder = self.mktemp()
        files, created = devpki.ensureDevFiles(folder)
        self.assertTrue(created)
        before = open(files.caCert, "rb").read()
        os.remove(files.hmacKey)
        with self.assertRaises(StartupError) as raised:
            makeService({"dev": True, "dev-dir": folder, "listen": "tcp:0"}, {})
        self.assertIn("incomplete (missing hmac.key)", str(raised.exception))
        self.assertEqual(open(files.caCert, "rb").read(), before)


class JsonLogTests(TestCase):
    """--log-format json: every line of the log is one JSON object, with stable event names."""

    timeout = 120

    async def test_auditEventsAsJsonLines(self) -> None:
        import json

        pki = TestPKI(os.path.abspath(self.mktemp()))
        issuer = await deferToThread(spawnIssuer, self, pki, "--log-format", "json", "--audiences", "gschmarri")
        port = issuer.port
        certFile, keyFile = pki.clientFiles(pki.client, "good")
        good = Client(port, pki.path("ca.pem"), certFile, keyFile)
        token = (await deferToThread(good.call)).json()["token"]
        self.assertEqual((await deferToThread(good.call, body=b'{"audience": "other"}')).status, 403)
        untrustedCert, untrustedKey = pki.clientFiles(pki.untrusted, "bad")
        try:
            await deferToThread(Client(port, pki.path("ca.pem"), untrustedCert, untrustedKey).call)
        except Exception:  # noqa: BLE001 - the handshake is meant to fail
            pass
        returnCode = await deferToThread(issuer.terminate)
        text = issuer.log()
        lines = [line for line in text.splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line parses
        byEvent: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            self.assertIn("time", record)
            self.assertIn("level", record)
            byEvent.setdefault(record["event"], []).append(record)
        [issued] = byEvent["issued"]
        self.assertEqual((issued["sub"], issued["aud"]), ("Martin2", "gschmarri"))
        self.assertTrue(issued["jti"])
        self.assertEqual([r["reason"] for r in byEvent["refused"]], ["audience_not_allowed"])
        self.assertEqual(byEvent["handshake_failure"][0]["reason"], "issuer not trusted")
        self.assertNotIn(token, text)
        self.assertNotIn(TEST_HMAC_KEY, text)
        self.assertEqual(returnCode, 0)
