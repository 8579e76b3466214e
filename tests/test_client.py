"""
tokenissuer-client against the real service on loopback: in-process through
its async C{run} with the running reactor, and as a real subprocess.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from typing import Any

import jwt
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol, Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tokenissuer import client, devpki

from .support import TEST_HMAC_KEY, TestPKI, startIssuer

P12_PASSWORD = "p12-secret-for-the-client-tests"
ERROR_PREFIX = "tokenissuer-client: error: "


def verify(token: str, audience: str = "gschmarri") -> dict[str, Any]:
    return jwt.decode(  # type: ignore[no-any-return]
        token,
        TEST_HMAC_KEY.encode(),
        algorithms=["HS256"],
        audience=audience,
        issuer="daheim_token_issuer",
        options={"require": ["exp", "iat", "sub", "jti"]},
    )


class Silent(Protocol):
    """Accept a connection and never say anything."""

    factory: SilentFactory

    def connectionMade(self) -> None:
        self.factory.connections.append(self)


class PlainHTTP(Protocol):
    """Answer in plain HTTP at once, as a server without TLS would answer a TLS handshake."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class SilentFactory(ServerFactory):
    protocol = Silent  # type: ignore[assignment]

    def __init__(self) -> None:
        self.connections: list[Silent] = []

    def abortAll(self) -> None:
        for connection in self.connections:
            connection.transport.abortConnection()  # type: ignore[union-attr]


class ClientTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.port, self.service = startIssuer(self, self.pki)
        self.url = f"https://localhost:{self.port}/jwthmac/issue"
        self.ca = self.pki.path("ca.pem")
        self.cert, self.key = self.pki.clientFiles(self.pki.client, "client")
        self.secrets = [self.pki.client.keyPEM().decode(), P12_PASSWORD, TEST_HMAC_KEY]

    async def invoke(self, *arguments: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        code = await client.run(reactor, list(arguments), stdout, stderr, environ or {})
        return code, stdout.getvalue(), stderr.getvalue()

    def good(self, *more: str) -> list[str]:
        return ["--url", self.url, "--cert", self.cert, "--key", self.key, "--ca", self.ca, *more]

    def assertError(self, result: tuple[int, str, str], code: int, *fragments: str) -> str:
        """Exit C{code}, nothing on stdout, one error line holding every fragment and no secret."""
        status, stdout, stderr = result
        self.assertEqual(status, code, stderr)
        self.assertEqual(stdout, "")
        self.assertTrue(stderr.startswith(ERROR_PREFIX), stderr)
        self.assertTrue(stderr.endswith("\n"), stderr)
        self.assertEqual(stderr.count("\n"), 1, stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertNotIn("eyJ", stderr)  # no token
        for secret in self.secrets:
            self.assertNotIn(secret, stderr)
        for line in self.pki.client.keyPEM().decode().splitlines()[1:-1]:
            self.assertNotIn(line, stderr)
        for fragment in fragments:
            self.assertIn(fragment, stderr)
        return stderr

    def writeP12(self, password: str = P12_PASSWORD) -> str:
        return self.pki.write("client.p12", devpki.pkcs12Bytes(self.pki.client, self.pki.ca, password))

    # --- success -------------------------------------------------------------

    async def test_printsTokenAlone(self) -> None:
        code, stdout, stderr = await self.invoke(*self.good("--audience", "gschmarri"))
        self.assertEqual((code, stderr), (0, ""))
        self.assertTrue(stdout.endswith("\n"))
        token = stdout[:-1]
        self.assertNotIn("\n", token)
        claims = verify(token)
        self.assertEqual(claims["sub"], "Martin2")
        self.assertEqual(claims["exp"] - claims["iat"], 3600)

    async def test_algorithmIsSent(self) -> None:
        code, stdout, _ = await self.invoke(*self.good("--audience", "dummy", "--algorithm", "HS256"))
        self.assertEqual(code, 0)
        verify(stdout.strip(), audience="dummy")
        self.assertError(
            await self.invoke(*self.good("--audience", "dummy", "--algorithm", "RS256")),
            client.EXIT_HTTP,
            "HTTP 400 algorithm_mismatch: This issuer signs with HS256",
        )

    async def test_otherApiPath(self) -> None:
        url = f"https://127.0.0.1:{self.port}/jwt/issue"
        code, stdout, _ = await self.invoke("--url", url, "--cert", self.cert, "--key", self.key, "--ca", self.ca,
                                         "--audience", "gschmarri")  # fmt: skip
        self.assertEqual(code, 0)
        verify(stdout.strip())

    async def test_keyInTheCertificateFile(self) -> None:
        """One file with the certificate, a chain certificate (sent along) and the key, as curl accepts."""
        combined = self.pki.write(
            "combined.pem", self.pki.client.certificatePEM() + self.pki.ca.certificatePEM() + self.pki.client.keyPEM()
        )
        code, stdout, _ = await self.invoke(
            "--url", self.url, "--cert", combined, "--ca", self.ca, "--audience", "dummy"
        )
        self.assertEqual(code, 0)
        verify(stdout.strip(), audience="dummy")

    async def test_json(self) -> None:
        code, stdout, stderr = await self.invoke(*self.good("--audience", "gschmarri", "--json"))
        self.assertEqual((code, stderr), (0, ""))
        answer = json.loads(stdout)
        self.assertEqual(sorted(answer), ["expires_in", "token"])
        self.assertEqual(answer["expires_in"], 3600)
        verify(answer["token"])

    async def test_decode(self) -> None:
        code, stdout, stderr = await self.invoke(*self.good("--audience", "gschmarri", "--decode"))
        self.assertEqual(code, 0)
        claims = json.loads(stdout)
        self.assertEqual((claims["sub"], claims["aud"], claims["iss"]), ("Martin2", "gschmarri", "daheim_token_issuer"))
        self.assertIn("\n  ", stdout, "pretty-printed")
        self.assertEqual(stderr.count("\n"), 1)
        self.assertNotIn("error", stderr)
        self.assertIn("'Martin2'", stderr)
        self.assertIn(" UTC (in ", stderr)
        self.assertRegex(stderr, r"\(in (59 min \d+ s|1 h 0 min)\)")

    async def test_jsonAndDecode(self) -> None:
        code, stdout, _ = await self.invoke(*self.good("--audience", "gschmarri", "--json", "--decode"))
        self.assertEqual(code, 0)
        answer = json.loads(stdout)
        self.assertEqual(answer["claims"], verify(answer["token"]))
        self.assertEqual(answer["expires_in"], 3600)
        exp = answer["claims"]["exp"]
        self.assertEqual(answer["expires_at"], client.datetime.datetime.fromtimestamp(exp, client.datetime.UTC)
                         .strftime("%Y-%m-%dT%H:%M:%SZ"))  # fmt: skip

    async def test_pkcs12PasswordFromEnvironment(self) -> None:
        p12 = self.writeP12()
        code, stdout, stderr = await self.invoke(
            "--url", self.url, "--p12", p12, "--ca", self.ca, "--audience", "gschmarri",
            environ={"TOKENISSUER_P12_PASSWORD": P12_PASSWORD},
        )  # fmt: skip
        self.assertEqual((code, stderr), (0, ""))
        self.assertEqual(verify(stdout.strip())["sub"], "Martin2")

    async def test_pkcs12PasswordOption(self) -> None:
        p12 = self.writeP12()
        code, stdout, _ = await self.invoke(
            "--url", self.url, "--p12", p12, "--p12-password", P12_PASSWORD, "--ca", self.ca, "--audience", "dummy",
            environ={"TOKENISSUER_P12_PASSWORD": "not this one"},
        )  # fmt: skip
        self.assertEqual(code, 0)
        verify(stdout.strip(), audience="dummy")

    async def test_pkcs12WrongOrMissingPassword(self) -> None:
        p12 = self.writeP12()
        base = ["--url", self.url, "--p12", p12, "--ca", self.ca, "--audience", "gschmarri"]
        self.assertError(
            await self.invoke(*base, environ={"TOKENISSUER_P12_PASSWORD": P12_PASSWORD + "x"}),
            client.EXIT_USAGE,
            "wrong password",
            p12,
        )
        self.secrets.append(P12_PASSWORD + "x")
        self.assertError(await self.invoke(*base, "--p12-password", "guess"), client.EXIT_USAGE, "wrong password")
        self.assertError(await self.invoke(*base), client.EXIT_USAGE, "TOKENISSUER_P12_PASSWORD")

    # --- exit 2: usage and local files ---------------------------------------

    async def test_usageErrors(self) -> None:
        cases = [
            ([], "required: --audience"),
            (["--audience", "x", "--url", "http://localhost:4443/jwthmac/issue"], "https://"),
            (["--audience", "x", "--url", "https:///nohost"], "has no host"),
            (["--audience", "x", "--timeout", "soon"], "--timeout"),
            (["--audience", "x", "--p12", "a.p12", "--cert", "c.pem"], "either --p12 or --cert"),
            (["--audience", "x", "--key", "k.pem"], "--key needs --cert"),
            (["--audience", "x", "--bogus"], "unrecognized arguments: --bogus (see"),
            (["--audience", "x", "--p12-pasword", P12_PASSWORD], "unrecognized arguments: --p12-pasword and 1 more"),
            (["--audience", "x", f"--p12-pasword={P12_PASSWORD}"], "unrecognized arguments: --p12-pasword (see"),
            (["--audience", "x", "--url", "https://me:" + P12_PASSWORD + "@localhost/"], "https://...@localhost/"),
        ]
        for arguments, fragment in cases:
            self.assertError(await self.invoke(*arguments), client.EXIT_USAGE, fragment)

    async def test_help(self) -> None:
        code, stdout, stderr = await self.invoke("--help")
        self.assertEqual((code, stderr), (0, ""))
        for status in (0, 2, 3, 4, 5, 6):
            self.assertRegex(stdout, rf"\n +{status}  ")
        self.assertIn("TOKEN=$(tokenissuer-client", stdout)

    async def test_badLocalFiles(self) -> None:
        otherKey = self.pki.write("other.key", self.pki.untrusted.keyPEM())
        garbage = self.pki.write(
            "garbage.key", b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
        )
        empty = self.pki.write("empty.pem", b"")
        missing = self.pki.path("missing.crt")
        ca = ["--ca", self.ca]
        cases: list[tuple[list[str], tuple[str, ...]]] = [
            (["--cert", missing, "--key", self.key, *ca], ("client certificate file", "does not exist")),
            (["--cert", self.cert, "--key", otherKey, *ca], ("does not match",)),
            (["--cert", self.cert, "--key", garbage, *ca], ("no usable PEM private key",)),
            (["--cert", self.cert, *ca], ("holds no private key; give --key",)),
            (["--cert", self.key, "--key", self.key, *ca], ("holds no PEM certificate",)),
            (["--cert", self.cert, "--key", self.key, "--ca", empty], ("CA bundle", "no PEM certificate")),
            (["--p12", self.cert, *ca], ("cannot open PKCS#12 file",)),
        ]
        self.secrets.append(self.pki.untrusted.keyPEM().decode())
        for arguments, fragments in cases:
            result = await self.invoke("--url", self.url, "--audience", "gschmarri", *arguments)
            self.assertError(result, client.EXIT_USAGE, *fragments)

    async def test_encryptedKeyRefused(self) -> None:
        from cryptography.hazmat.primitives import serialization

        encrypted = self.pki.write(
            "encrypted.key",
            self.pki.client.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"key-password"),
            ),
        )
        self.assertError(
            await self.invoke(*self.good("--audience", "gschmarri", "--key", encrypted)), client.EXIT_USAGE, "encrypted"
        )

    # --- exit 3: no connection -----------------------------------------------

    async def test_connectionRefused(self) -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        url = f"https://127.0.0.1:{port}/jwthmac/issue"
        self.assertError(
            await self.invoke("--url", url, "--ca", self.ca, "--audience", "gschmarri"),
            client.EXIT_CONNECTION,
            f"connection to 127.0.0.1:{port} refused",
        )

    async def test_timeout(self) -> None:
        factory = SilentFactory()
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        self.addCleanup(factory.abortAll)
        url = f"https://localhost:{listening.getHost().port}/jwthmac/issue"  # type: ignore[attr-defined]
        self.assertError(
            await self.invoke("--url", url, "--ca", self.ca, "--audience", "gschmarri", "--timeout", "0.5"),
            client.EXIT_CONNECTION,
            "no answer from localhost",
            "within 0.5 seconds",
        )

    async def test_notTLS(self) -> None:
        factory = ServerFactory.forProtocol(PlainHTTP)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(listening.stopListening)
        url = f"https://localhost:{listening.getHost().port}/jwthmac/issue"  # type: ignore[attr-defined]
        self.assertError(
            await self.invoke("--url", url, "--ca", self.ca, "--audience", "gschmarri"),
            client.EXIT_CONNECTION,
            "the TLS handshake with localhost:",
            "(is it an HTTPS server?)",
        )

    # --- exit 4: server certificate ------------------------------------------

    async def test_untrustedServer(self) -> None:
        other = self.pki.write("other-ca.pem", self.pki.otherCA.certificatePEM())
        self.assertError(
            await self.invoke(*self.good("--audience", "gschmarri", "--ca", other)),
            client.EXIT_SERVER_CERTIFICATE,
            "is not trusted by the CA bundle",
            "'CN=localhost' issued by 'CN=tokenissuer test CA'",
        )

    async def test_systemTrustStoreDoesNotKnowTheTestCA(self) -> None:
        self.assertError(
            await self.invoke("--url", self.url, "--cert", self.cert, "--key", self.key, "--audience", "gschmarri"),
            client.EXIT_SERVER_CERTIFICATE,
            "not trusted by the system's trust store",
        )

    async def test_hostnameMismatch(self) -> None:
        wrong = devpki.issueServer(self.pki.ca, names=("other.example",), addresses=())
        certFile = self.pki.write("wrong.crt", wrong.certificatePEM())
        keyFile = self.pki.write("wrong.pem", wrong.keyPEM())
        port, _ = startIssuer(self, self.pki, cert=certFile, key=keyFile)
        for host in ("localhost", "127.0.0.1"):
            url = f"https://{host}:{port}/jwthmac/issue"
            self.assertError(
                await self.invoke(
                    "--url", url, "--cert", self.cert, "--key", self.key, "--ca", self.ca, "--audience", "x"
                ),
                client.EXIT_SERVER_CERTIFICATE,
                f"not valid for the host name '{host}'",
                "(it is for other.example)",
            )

    # --- exit 5: client certificate refused in the handshake -----------------

    async def test_untrustedClientCertificate(self) -> None:
        cert, key = self.pki.clientFiles(self.pki.untrusted, "mallory")
        self.assertError(
            await self.invoke(
                "--url", self.url, "--cert", cert, "--key", key, "--ca", self.ca, "--audience", "gschmarri"
            ),
            client.EXIT_CLIENT_CERTIFICATE,
            "unknown ca",
            "'CN=Mallory'",
        )

    async def test_expiredClientCertificate(self) -> None:
        cert, key = self.pki.clientFiles(self.pki.expired, "expired")
        self.assertError(
            await self.invoke(
                "--url", self.url, "--cert", cert, "--key", key, "--ca", self.ca, "--audience", "gschmarri"
            ),
            client.EXIT_CLIENT_CERTIFICATE,
            "certificate expired",
        )

    async def test_certificateRequiredAtHandshake(self) -> None:
        port, _ = startIssuer(self, self.pki, **{"client-auth": "required"})
        url = f"https://localhost:{port}/jwthmac/issue"
        self.assertError(
            await self.invoke("--url", url, "--ca", self.ca, "--audience", "gschmarri"),
            client.EXIT_CLIENT_CERTIFICATE,
            "certificate required",
            "give --cert and --key, or --p12",
        )

    # --- exit 6: HTTP errors ---------------------------------------------------

    async def test_noClientCertificateIs401(self) -> None:
        self.assertError(
            await self.invoke("--url", self.url, "--ca", self.ca, "--audience", "gschmarri"),
            client.EXIT_HTTP,
            "HTTP 401 client_certificate_required: This connection carries no verified client certificate",
        )

    async def test_audienceNotAllowedIs403(self) -> None:
        self.assertError(
            await self.invoke(*self.good("--audience", "elsewhere")),
            client.EXIT_HTTP,
            "HTTP 403 audience_not_allowed: This issuer does not issue tokens for the audience 'elsewhere'.",
        )

    async def test_wrongPathIs404(self) -> None:
        url = f"https://localhost:{self.port}/nothing"
        self.assertError(
            await self.invoke("--url", url, "--cert", self.cert, "--key", self.key, "--ca", self.ca, "--audience", "g"),
            client.EXIT_HTTP,
            "HTTP 404 not_found: ",
        )

    # --- the real command ------------------------------------------------------

    def environment(self, **environ: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENISSUER_")}
        env.update(environ)
        return env

    async def command(self, *arguments: str, **environ: str) -> tuple[int, str, str]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tokenissuer.client", *arguments], env=self.environment(**environ), reactor=reactor
        )
        return code, out.decode(), err.decode()

    async def test_commandPrintsToken(self) -> None:
        p12 = self.writeP12()
        code, stdout, stderr = await self.command(
            "--url", self.url, "--p12", p12, "--ca", self.ca, "--audience", "gschmarri",
            TOKENISSUER_P12_PASSWORD=P12_PASSWORD,
        )  # fmt: skip
        self.assertEqual((code, stderr), (0, ""))
        self.assertEqual(verify(stdout.removesuffix("\n"))["sub"], "Martin2")

    async def test_commandErrors(self) -> None:
        self.assertError(
            await self.command("--url", self.url, "--ca", self.ca, "--audience", "gschmarri"),
            client.EXIT_HTTP,
            "HTTP 401 client_certificate_required",
        )
        other = self.pki.write("other-ca.pem", self.pki.otherCA.certificatePEM())
        self.assertError(
            await self.command(*self.good("--audience", "gschmarri", "--ca", other)),
            client.EXIT_SERVER_CERTIFICATE,
            "not trusted",
        )
        self.assertError(await self.command("--url", self.url), client.EXIT_USAGE, "--audience")

    async def test_consoleScript(self) -> None:
        """The installed tokenissuer-client script (pip install puts it next to the interpreter)."""
        script = os.path.join(os.path.dirname(sys.executable), "tokenissuer-client")
        if not os.path.exists(script):
            raise SkipTest(f"{script} is not installed; reinstall the project to get its console script")
        out, err, code = await getProcessOutputAndValue(
            script, [*self.good("--audience", "dummy", "--json")], env=self.environment(), reactor=reactor
        )
        self.assertEqual((code, err), (0, b""))
        verify(json.loads(out)["token"], audience="dummy")

    async def test_commandInterrupted(self) -> None:
        """SIGINT while waiting for the server: one line, exit 130, not a complaint about the server."""
        factory = SilentFactory()
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        self.addCleanup(factory.abortAll)
        url = f"https://localhost:{listening.getHost().port}/jwthmac/issue"  # type: ignore[attr-defined]
        collector = Collector()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            collector,
            sys.executable,
            [sys.executable, "-m", "tokenissuer.client", "--url", url, "--ca", self.ca, "--audience", "g"],
            env=self.environment(),
        )
        for _ in range(200):
            if factory.connections:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(factory.connections, "the client never connected")
        process.signalProcess("INT")
        code = await collector.ended
        self.assertError(
            (code, b"".join(collector.out).decode(), b"".join(collector.err).decode()),
            client.EXIT_INTERRUPTED,
            "interrupted",
        )


class Collector(ProcessProtocol):
    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value.exitCode)  # type: ignore[union-attr]


class AnswerTests(TestCase):
    """Answers that the real service does not give, from other servers on the way."""

    def test_nonJsonError(self) -> None:
        problem = client.httpError(502, b"Bad Gateway", b"<html>\n<body>bad gateway</body></html>")
        self.assertEqual(problem.code, client.EXIT_HTTP)
        self.assertEqual(
            problem.message, "HTTP 502 Bad Gateway: the answer is not a tokenissuer JSON answer; is the URL right?"
        )

    def test_messageOnOneLine(self) -> None:
        body = json.dumps({"error": "odd", "message": "two\nlines\r\n\tand a tab"}).encode()
        self.assertEqual(client.httpError(400, b"Bad Request", body).message, "HTTP 400 odd: two lines and a tab")

    def test_expiryInWords(self) -> None:
        self.assertEqual(
            client.describeExpiry({"exp": 1_000_000_000}, 1_000_000_000 - 3600),
            ("2001-09-09T01:46:40Z", "expires 2001-09-09 01:46:40 UTC (in 1 h 0 min)"),
        )
        self.assertEqual(client.describeExpiry({"exp": 100}, 105)[1], "expires 1970-01-01 00:01:40 UTC (5 s ago)")
        self.assertEqual(client.describeExpiry({}, 0), (None, "the token has no expiry time (no exp claim)"))
