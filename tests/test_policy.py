"""
Who gets which token: the subject taken from the certificate, the policy file
(audiences and flags per subject, reloaded on change), and revocation by CRL.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tokenissuer import devpki
from tokenissuer.policy import ClientPolicy, PolicyError, PolicyRefusal, loadPolicyFile, parsePolicy, subjectOf
from tokenissuer.service import StartupError, makeService

from .support import TEST_HMAC_KEY, Client, LogCapture, TestPKI, startIssuer
from .test_integration import HANDSHAKE_REFUSED

POLICY = {
    "clients": [
        {"subject": "Martin2", "audiences": ["gschmarri", "dummy"], "flags": 5},
        {"subject": "*@example.org", "audiences": ["*"], "flags": 0},
    ],
    "default": {"audiences": [], "flags": 0},
}


def makeCRL(ca: devpki.Issued, revoked: list[int], nextUpdate: datetime.datetime) -> x509.CertificateRevocationList:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(min(now, nextUpdate) - datetime.timedelta(days=1))
        .next_update(nextUpdate)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - datetime.timedelta(hours=1))
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


class SubjectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = devpki.makeCA()
        self.full = devpki.issue(
            self.ca,
            "Martin2",
            usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
            dnsNames=["host.example.org"],
            emails=["martin@example.org"],
        )

    def test_sources(self) -> None:
        certificate = self.full.certificate
        self.assertEqual(subjectOf(certificate, "cn"), "Martin2")
        self.assertEqual(subjectOf(certificate, "san-email"), "martin@example.org")
        self.assertEqual(subjectOf(certificate, "san-dns"), "host.example.org")
        self.assertIsNone(subjectOf(certificate, "san-uri"))
        self.assertEqual(subjectOf(certificate, "dn"), "CN=Martin2")

    def test_missingFields(self) -> None:
        bare = devpki.issue(self.ca, "", usages=[ExtendedKeyUsageOID.CLIENT_AUTH]).certificate
        self.assertIsNone(subjectOf(bare, "cn"))
        self.assertIsNone(subjectOf(bare, "san-email"))
        self.assertEqual(subjectOf(bare, "dn"), "O=no common name")


class PolicyParsingTests(SynchronousTestCase):
    def test_firstMatchWinsAndGlobs(self) -> None:
        policy = parsePolicy(POLICY)
        self.assertEqual(policy.decide("Martin2", "dummy"), 5)
        self.assertEqual(policy.decide("anne@example.org", "anything"), 0)
        with self.assertRaises(PolicyRefusal) as raised:
            policy.decide("Martin2", "other")
        self.assertEqual(raised.exception.code, "audience_not_allowed")
        with self.assertRaises(PolicyRefusal) as raised:
            policy.decide("stranger", "gschmarri")
        self.assertEqual(raised.exception.code, "audience_not_allowed")

    def test_withoutDefaultUnknownSubjectsRefused(self) -> None:
        policy = parsePolicy({"clients": [{"subject": "a", "audiences": ["x"]}]})
        with self.assertRaises(PolicyRefusal) as raised:
            policy.decide("b", "x")
        self.assertEqual(raised.exception.code, "subject_not_allowed")

    def test_globIsCaseSensitiveAndAnchored(self) -> None:
        policy = parsePolicy({"clients": [{"subject": "*@example.org", "audiences": ["*"]}]})
        with self.assertRaises(PolicyRefusal):
            policy.decide("eve@example.org.evil", "x")
        with self.assertRaises(PolicyRefusal):
            policy.decide("EVE@EXAMPLE.ORG", "x")

    def test_badDocuments(self) -> None:
        cases = [
            ([], "must be an object"),
            ({"clients": {}}, "clients must be a list"),
            ({"clients": [{"audiences": []}]}, "clients[0].subject"),
            ({"clients": [{"subject": "a", "audiences": "x"}]}, "clients[0].audiences"),
            ({"clients": [{"subject": "a", "flags": -1}]}, "clients[0].flags"),
            ({"clients": [{"subject": "a", "flags": True}]}, "clients[0].flags"),
            ({"clients": [{"subject": "a", "flag": 1}]}, "unknown key(s): flag"),
            ({"client": []}, "unknown top-level key(s): client"),
            ({"default": {"subject": "x"}}, "default must not have a subject"),
        ]
        for document, expected in cases:
            with self.subTest(document=document):
                with self.assertRaises(PolicyError) as raised:
                    parsePolicy(document)
                self.assertIn(expected, str(raised.exception))

    def test_yamlAndJsonFiles(self) -> None:
        asJson = loadPolicyFile("p.json", json.dumps(POLICY).encode())
        asYaml = loadPolicyFile(
            "p.yaml",
            b"clients:\n  - subject: Martin2\n    audiences: [gschmarri, dummy]\n    flags: 5\n"
            b"  - subject: '*@example.org'\n    audiences: ['*']\n    flags: 0\n"
            b"default:\n  audiences: []\n  flags: 0\n",
        )
        self.assertIsInstance(asJson, ClientPolicy)
        self.assertEqual(asJson, asYaml)
        with self.assertRaises(PolicyError) as raised:
            loadPolicyFile("p.json", b"{broken")
        self.assertIn("cannot be parsed", str(raised.exception))


class PolicyOverTLSTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.logs = LogCapture(self)
        self.policyPath = self.pki.write("policy.json", json.dumps(POLICY).encode())
        self.martin = self.pki.clientFiles(self.pki.client, "martin")
        self.anne = self.pki.clientFiles(devpki.issueClient(self.pki.ca, "Anne"), "anne")

    def call(self, files: tuple[str, str], audience: str) -> Any:
        client = Client(self.port, self.pki.path("ca.pem"), *files)
        return deferToThread(client.call, body=json.dumps({"audience": audience}).encode())

    async def test_flagsAndAudiencesPerSubject(self) -> None:
        self.port, _ = startIssuer(self, self.pki, **{"policy-file": self.policyPath})
        response = await self.call(self.martin, "dummy")
        self.assertEqual(response.status, 200)
        claims = jwt.decode(response.json()["token"], TEST_HMAC_KEY, algorithms=["HS256"], audience="dummy")
        self.assertEqual(claims["flags"], 5)
        refused = await self.call(self.anne, "gschmarri")  # default grants nothing
        self.assertEqual((refused.status, refused.json()["error"]), (403, "audience_not_allowed"))
        self.assertEqual(len(self.logs.issued()), 1)

    async def test_allowedAudiencesStillBoundEverything(self) -> None:
        self.port, _ = startIssuer(
            self, self.pki, **{"policy-file": self.pki.write("all.json", b'{"default": {"audiences": ["*"]}}')}
        )
        response = await self.call(self.anne, "not-in-allow-list")
        self.assertEqual((response.status, response.json()["error"]), (403, "audience_not_allowed"))

    async def test_subjectFromSanEmail(self) -> None:
        policy = self.pki.write(
            "email.json", b'{"clients": [{"subject": "*@tokenissuer.invalid", "audiences": ["*"], "flags": 7}]}'
        )
        self.port, _ = startIssuer(self, self.pki, **{"policy-file": policy, "subject-from": "san-email"})
        response = await self.call(self.martin, "gschmarri")
        self.assertEqual(response.status, 200)
        claims = jwt.decode(response.json()["token"], TEST_HMAC_KEY, algorithms=["HS256"], audience="gschmarri")
        self.assertEqual((claims["sub"], claims["flags"]), ("martin2@tokenissuer.invalid", 7))
        nameless = self.pki.clientFiles(
            devpki.issue(self.pki.ca, "NoSan", usages=[ExtendedKeyUsageOID.CLIENT_AUTH]), "nosan"
        )
        refused = await self.call(nameless, "gschmarri")
        self.assertEqual((refused.status, refused.json()["error"]), (403, "subject_missing"))
        self.assertIn("e-mail address", refused.json()["message"])

    async def test_policyReloadsAndBrokenReloadKeepsOld(self) -> None:
        self.port, service = startIssuer(self, self.pki, **{"policy-file": self.policyPath, "reload-interval": "0.2"})
        self.assertEqual((await self.call(self.anne, "gschmarri")).status, 403)
        with open(self.policyPath, "w") as handle:
            json.dump({"clients": [{"subject": "Anne", "audiences": ["gschmarri"], "flags": 9}]}, handle)
        await deferLater(reactor, 1.0, lambda: None)
        response = await self.call(self.anne, "gschmarri")
        self.assertEqual(response.status, 200)
        with open(self.policyPath, "w") as handle:
            handle.write('{"clients": [{"subject": "Anne", "flags": "nine"}]}')
        await deferLater(reactor, 1.0, lambda: None)
        self.assertEqual((await self.call(self.anne, "gschmarri")).status, 200)
        self.assertTrue(any("reload failed" in m and "clients[0].flags" in m for m in self.logs.messages()))


class BrokenPolicyAtStartTests(SynchronousTestCase):
    def test_oneClearLine(self) -> None:
        pki = TestPKI(self.mktemp())
        options = {
            "listen": "tcp:0",
            "admin-listen": "off",
            "cert": pki.path("server.crt"),
            "key": pki.path("server.pem"),
            "client-ca": pki.path("ca.pem"),
            "policy-file": pki.write("bad.yaml", b"clients: [ {subject: x, audiences: 3} ]\n"),
        }
        with self.assertRaises(StartupError) as raised:
            makeService(options, {"TOK_ISS_HMAC_SECRET": TEST_HMAC_KEY})
        self.assertIn("clients[0].audiences", str(raised.exception))
        self.assertNotIn("\n", str(raised.exception))


class RevocationTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.logs = LogCapture(self)
        self.revoked = devpki.issueClient(self.pki.ca, "Revoked")
        self.good = self.pki.clientFiles(self.pki.client, "good")
        self.bad = self.pki.clientFiles(self.revoked, "revoked")

    def writeCRL(self, nextUpdate: datetime.datetime, der: bool = False) -> str:
        crl = makeCRL(self.pki.ca, [self.revoked.certificate.serial_number], nextUpdate)
        encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
        return self.pki.write("ca.crl", crl.public_bytes(encoding))

    async def assertRefused(self, files: tuple[str, str]) -> None:
        client = Client(self.port, self.pki.path("ca.pem"), *files)
        with self.assertRaises(HANDSHAKE_REFUSED):
            await deferToThread(client.call)

    async def assertServed(self, files: tuple[str, str]) -> None:
        client = Client(self.port, self.pki.path("ca.pem"), *files)
        self.assertEqual((await deferToThread(client.call)).status, 200)

    async def test_revokedCertificateFailsHandshake(self) -> None:
        future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
        for der in (False, True):
            self.port, service = startIssuer(self, self.pki, crl=self.writeCRL(future, der))
            await self.assertRefused(self.bad)
            await self.assertServed(self.good)
            await service.stopService()
        self.assertIn("certificate revoked", self.logs.text())
        self.assertEqual(self.logs.issued()[0]["sub"], "Martin2")
        self.assertEqual([e["sub"] for e in self.logs.issued()], ["Martin2", "Martin2"])

    async def test_expiredCRLFailsClosedByDefault(self) -> None:
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        self.port, service = startIssuer(self, self.pki, crl=self.writeCRL(past))
        await self.assertRefused(self.good)
        self.assertIn("CRL has expired", self.logs.text())
        self.assertTrue(any("expired at" in m and "refused" in m for m in self.logs.messages()))
        from prometheus_client import generate_latest

        text = generate_latest(service.metrics.registry).decode()
        [line] = [line for line in text.splitlines() if line.startswith("tokenissuer_crl_next_update_seconds ")]
        self.assertLess(float(line.split()[1]), 0)

    async def test_expiredCRLCanFailOpen(self) -> None:
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        self.port, _ = startIssuer(self, self.pki, crl=self.writeCRL(past), **{"crl-expired": "accept"})
        await self.assertServed(self.good)
        await self.assertRefused(self.bad)

    def test_crlFromAnotherCARefusedAtStart(self) -> None:
        foreign = makeCRL(self.pki.otherCA, [], datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1))
        path = self.pki.write("foreign.crl", foreign.public_bytes(serialization.Encoding.PEM))
        with self.assertRaises(StartupError) as raised:
            makeService(
                {
                    "listen": "tcp:0",
                    "admin-listen": "off",
                    "cert": self.pki.path("server.crt"),
                    "key": self.pki.path("server.pem"),
                    "client-ca": self.pki.path("ca.pem"),
                    "crl": path,
                },
                {"TOK_ISS_HMAC_SECRET": TEST_HMAC_KEY},
            )
        self.assertIn("not signed by a CA in the client CA bundle", str(raised.exception))


class CRLMetricTests(SynchronousTestCase):
    def test_nextUpdateExported(self) -> None:
        pki = TestPKI(self.mktemp())
        nextUpdate = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
        crl = makeCRL(pki.ca, [], nextUpdate)
        path = pki.write("ca.crl", crl.public_bytes(serialization.Encoding.PEM))
        service = makeService(
            {
                "listen": "tcp:0",
                "admin-listen": "off",
                "cert": pki.path("server.crt"),
                "key": pki.path("server.pem"),
                "client-ca": pki.path("ca.pem"),
                "crl": path,
            },
            {"TOK_ISS_HMAC_SECRET": TEST_HMAC_KEY},
        )
        from prometheus_client import generate_latest

        text = generate_latest(service.metrics.registry).decode()
        [line] = [line for line in text.splitlines() if line.startswith("tokenissuer_crl_next_update_seconds ")]
        self.assertLess(abs(float(line.split()[1]) - 2 * 86400), 120)
