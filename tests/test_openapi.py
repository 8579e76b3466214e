"""
The OpenAPI document, src/tokenissuer/openapi.yaml: it is valid OpenAPI 3.1, it
names every error code the service can answer with, the admin listener serves
it, and the running service keeps to it.

schemathesis (its command line, run as a subprocess against an issuer started in
this process) fuzzes both listeners from the document it fetches from the admin
listener: over mutual TLS, and once more without a client certificate. Every
answer must conform to the document (status, content type, headers, body), and
none may be a 5xx. The statuses that generated requests do not reach (408, 413,
500, every 403 code, ...) are provoked directly and checked against the same
document.
"""

from __future__ import annotations

import base64
import http.client
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tokenissuer import admin, devpki, policy, web

from .support import Client, TestPKI, startIssuer

SPEC_BYTES = resources.files("tokenissuer").joinpath("openapi.yaml").read_bytes()
SPEC: dict[str, Any] = yaml.safe_load(SPEC_BYTES)

#: Reusable responses (not tied to one operation) and the status each one is for.
COMPONENT_STATUS = {"NotFound": 404, "MethodNotAllowed": 405, "AdminNotFound": 404, "AdminMethodNotAllowed": 405}

#: "No 5xx", every response-conformance check, the method checks, and: bad input refused, good input accepted.
SCHEMATHESIS_CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "unsupported_method",
        "allow_header_conformance",
        "negative_data_rejection",
        "positive_data_acceptance",
        "missing_required_header",
    ]
)
MAX_EXAMPLES = 50


def _resolve(node: Any) -> Any:
    """Follow a local C{$ref} (C{#/components/...}) to what it points at."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _errorCodes(schema: Any) -> set[str]:
    """The C{error} codes an error schema (C{allOf: [Error, {error: enum}]}) allows."""
    schema = _resolve(schema)
    for part in schema.get("allOf", []):
        enum = part.get("properties", {}).get("error", {}).get("enum")
        if enum is not None:
            return set(enum)
    error = schema.get("properties", {}).get("error")
    return set(_resolve(error)["enum"]) if error is not None else set()  # not an error body (e.g. /readyz 503)


def _jsonSchemaOf(response: dict[str, Any]) -> Any:
    return _resolve(response)["content"]["application/json"]["schema"]


def _codesByStatus() -> dict[int, set[str]]:
    """Status -> error codes, from every operation's responses and the reusable 404/405 answers."""
    result: dict[int, set[str]] = {}
    responses: list[tuple[int, Any]] = [
        (COMPONENT_STATUS[name], SPEC["components"]["responses"][name]) for name in COMPONENT_STATUS
    ]
    for pathItem in SPEC["paths"].values():
        for method in ("get", "head", "post", "options"):
            for status, response in pathItem.get(method, {}).get("responses", {}).items():
                responses.append((int(status), response))
    for status, response in responses:
        content = _resolve(response).get("content", {})
        if status >= 400 and "application/json" in content:
            result.setdefault(status, set()).update(_errorCodes(content["application/json"]["schema"]))
    return result


def _sourceErrorCodes() -> set[tuple[int | None, str]]:
    """(status, code) of every refusal in the source; status None where the source does not tie them together."""
    found: set[tuple[int | None, str]] = set()
    for module in (web, admin, policy):
        assert module.__file__ is not None
        with open(module.__file__, encoding="utf-8") as handle:
            source = handle.read()
        for status, code in re.findall(r'(?:ApiError|JsonErrorResource)\(\s*(\d{3}),\s*"([a-z0-9_]+)"', source):
            found.add((int(status), code))
        for code in re.findall(r'PolicyRefusal\(\s*"([a-z0-9_]+)"', source):
            found.add((403, code))  # web.py turns every PolicyRefusal into a 403
        for status, code in re.findall(r'(\d{3}),\s*\{"error":\s*"([a-z0-9_]+)"', source):
            found.add((int(status), code))
        for code in re.findall(r'"error":\s*"([a-z0-9_]+)"', source):
            found.add((None, code))
    return found


class SpecDocumentTests(SynchronousTestCase):
    def test_isValidOpenApi31(self) -> None:
        try:
            from openapi_spec_validator import validate
        except ImportError:
            raise SkipTest("openapi-spec-validator is not installed (it is in the `test` extra)") from None
        self.assertEqual(SPEC["openapi"], "3.1.0")
        validate(SPEC)
        self.assertEqual(SPEC["info"]["version"], importlib.metadata.version("tokenissuer"))

    def test_everyErrorCodeTheServiceSendsIsInTheDocument(self) -> None:
        found = _sourceErrorCodes()
        # The source scan must keep working as the code changes: it finds at least these.
        self.assertTrue(
            {(400, "malformed_json"), (401, "client_certificate_required"), (403, "subject_not_allowed")} <= found,
            sorted(found, key=str),
        )
        allCodes = set(_resolve(SPEC["components"]["schemas"]["ErrorCode"])["enum"])
        self.assertEqual({code for _, code in found} - allCodes, set())
        byStatus = _codesByStatus()
        for status, code in found:
            if status is not None:
                self.assertIn(code, byStatus.get(status, set()), f"{status} {code} is not in the document")
        # And the other way: each documented code belongs to the error schema of every code.
        for codes in byStatus.values():
            self.assertEqual(codes - allCodes, set())
        self.assertEqual(set().union(*byStatus.values()), allCodes)

    def test_readmeErrorTableMatches(self) -> None:
        """The README's table of errors and the document list the same (status, code) pairs."""
        readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md")
        if not os.path.exists(readme):
            raise SkipTest("README.md is not next to the tests")
        with open(readme, encoding="utf-8") as handle:
            table = set(re.findall(r"^\| (\d{3}) \| `([a-z0-9_]+)` \|", handle.read(), re.MULTILINE))
        self.assertGreater(len(table), 10)
        documented = {(str(status), code) for status, codes in _codesByStatus().items() for code in codes}
        self.assertEqual(table, documented)

    def test_issuePathsAreDocumentedAlike(self) -> None:
        first, second = SPEC["paths"]["/jwthmac/issue"], SPEC["paths"]["/jwt/issue"]
        for method in ("post", "options"):
            self.assertEqual(first[method]["responses"], second[method]["responses"])
            self.assertEqual(first[method].get("requestBody"), second[method].get("requestBody"))
        body = _resolve(first["post"]["requestBody"])["content"]["application/json"]["schema"]
        audience = _resolve(body)["properties"]["audience"]
        self.assertEqual(audience["maxLength"], web.MAX_AUDIENCE_LENGTH)


def _schemathesisInstalled() -> bool:
    return importlib.util.find_spec("schemathesis") is not None


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


def _adminCall(port: int, method: str, path: str) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        answer = connection.getresponse()
        return Answer(answer.status, answer.headers, answer.read())
    finally:
        connection.close()


class LiveServiceTests(TestCase):
    """The document against an issuer running in this process."""

    timeout = 600

    def setUp(self) -> None:
        if importlib.util.find_spec("openapi_schema_validator") is None:
            raise SkipTest("openapi-spec-validator is not installed (it is in the `test` extra)")
        self.pki = TestPKI(os.path.abspath(self.mktemp()))  # absolute: schemathesis runs in another folder
        self.certFile, self.keyFile = self.pki.clientFiles(self.pki.client, "client")
        # Any audience, so that generated audiences get tokens rather than 403.
        self.port, self.service = startIssuer(self, self.pki, audiences="")
        assert self.service.adminPort is not None
        self.adminPort: int = self.service.adminPort.getHost().port  # type: ignore[attr-defined]
        self.specURL = f"http://127.0.0.1:{self.adminPort}/openapi.yaml"

    # Checking one answer against the document

    def assertConforms(self, answer: Answer, response: Any, what: str) -> None:
        """Content type, required and present headers, and the JSON body, as the document says."""
        from openapi_schema_validator import OAS31Validator

        response = _resolve(response)
        for name, headerRef in response.get("headers", {}).items():
            header = _resolve(headerRef)
            value = answer.headers.get(name)
            if value is None:
                self.assertFalse(header.get("required", False), f"{what}: header {name} is missing")
                continue
            errors = [e.message for e in OAS31Validator(_resolve(header["schema"])).iter_errors(value)]
            self.assertEqual(errors, [], f"{what}: header {name}: {value!r}")
        content = response.get("content")
        if not content:
            self.assertEqual(answer.body, b"", what)
            return
        mediaType = (answer.headers.get("Content-Type") or "").split(";")[0].strip()
        self.assertIn(mediaType, content, what)
        if mediaType == "application/yaml":
            document = yaml.safe_load(answer.body)
        elif mediaType == "application/json" or mediaType.endswith("+json"):
            document = json.loads(answer.body)
        else:
            return  # text/plain (the metrics): a string
        schema = {"allOf": [content[mediaType]["schema"]], "components": SPEC["components"]}
        errors = [e.message for e in OAS31Validator(schema).iter_errors(document)]
        self.assertEqual(errors, [], f"{what}: {str(document)[:2000]}")

    def responseFor(self, path: str, method: str, status: int, adminListener: bool = False) -> Any:
        responses = SPEC["paths"].get(path, {}).get(method.lower(), {}).get("responses", {})
        if str(status) in responses:
            return responses[str(status)]
        prefix = "Admin" if adminListener else ""
        name = {404: f"{prefix}NotFound", 405: f"{prefix}MethodNotAllowed"}.get(status)
        self.assertIsNotNone(name, f"{method} {path}: the document has no {status} answer")
        return SPEC["components"]["responses"][name]

    async def test_jwksConforms(self) -> None:
        """With an asymmetric algorithm the admin listener publishes keys in the documented shape."""
        key = ec.generate_private_key(ec.SECP256R1())
        keyFile = self.pki.write(
            "signing.pem",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        _, service = startIssuer(self, self.pki, environ={"TOK_ISS_TYPE": "ES256"}, **{"hmac-secret-file": keyFile})
        assert service.adminPort is not None
        adminPort = service.adminPort.getHost().port  # type: ignore[attr-defined]
        answer = await deferToThread(_adminCall, adminPort, "GET", "/.well-known/jwks.json")
        self.assertEqual(answer.status, 200)
        self.assertConforms(answer, self.responseFor("/.well-known/jwks.json", "GET", 200, True), "JWKS")
        self.assertEqual(len(json.loads(answer.body)["keys"]), 1)

    # The admin listener serves the document

    async def test_adminListenerServesTheDocument(self) -> None:
        answer = await deferToThread(_adminCall, self.adminPort, "GET", "/openapi.yaml")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer.headers["Content-Type"], "application/yaml")
        self.assertEqual(answer.body, SPEC_BYTES)
        self.assertConforms(answer, self.responseFor("/openapi.yaml", "GET", 200, True), "GET /openapi.yaml")
        head = await deferToThread(_adminCall, self.adminPort, "HEAD", "/openapi.yaml")
        self.assertEqual((head.status, head.body), (200, b""))

    # schemathesis

    async def runSchemathesis(self, name: str, url: str, tag: str, *extra: str) -> list[dict[str, Any]]:
        """Run schemathesis on the operations tagged C{tag}; return the exchanges (HAR entries)."""
        if not _schemathesisInstalled():
            raise SkipTest("schemathesis is not installed (it is in the `test` extra: tox -e tests)")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        har = os.path.join(folder, f"{name}.har")
        command = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            self.specURL,
            "--url",
            url,
            "--include-tag",
            tag,
            "--checks",
            SCHEMATHESIS_CHECKS,
            "--max-examples",
            str(MAX_EXAMPLES),
            "--generation-deterministic",
            "--request-timeout",
            "10",
            "--no-color",
            # Keep headers such as Access-Control-Allow-Credentials readable in the HAR file.
            "--output-sanitize",
            "false",
            "--report",
            "har",
            "--report-har-path",
            har,
            *extra,
        ]
        # A proxy from the caller's environment must not sit between schemathesis and loopback.
        environment = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
        environment["NO_PROXY"] = "*"
        result = await deferToThread(
            subprocess.run, command, cwd=folder, env=environment, capture_output=True, text=True, timeout=400
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, f"schemathesis ({name}) found problems:\n{output[-20000:]}")
        self.assertIn("passed", output)
        with open(har, encoding="utf-8") as handle:
            entries: list[dict[str, Any]] = json.load(handle)["log"]["entries"]
        self.assertGreater(len(entries), 0)
        statuses = sorted({entry["response"]["status"] for entry in entries})
        self.assertEqual([status for status in statuses if status >= 500], [], statuses)
        # A second, independent look at every exchange: schemathesis lets some things pass
        # (an answer without Content-Type and body, for one), this check does not.
        for entry in entries:
            request, response = entry["request"], entry["response"]
            path = urlsplit(request["url"]).path
            headers = http.client.HTTPMessage()
            for header in response["headers"]:
                headers[header["name"]] = header["value"]
            content = response.get("content", {})
            body = content.get("text", "")
            data = base64.b64decode(body) if content.get("encoding") == "base64" else body.encode("utf-8")
            self.assertConforms(
                Answer(response["status"], headers, data),
                self.responseFor(path, request["method"], response["status"], adminListener=tag == "admin"),
                f"{name}: {request['method']} {request['url']} {request.get('postData')}",
            )
        return entries

    async def test_schemathesisOverMutualTLS(self) -> None:
        entries = await self.runSchemathesis(
            "mtls",
            f"https://localhost:{self.port}",
            "issue",
            "--tls-verify",
            self.pki.path("ca.pem"),
            "--request-cert",
            self.certFile,
            "--request-cert-key",
            self.keyFile,
        )
        # The certificate reached the issuer: both issue paths minted tokens.
        for path in ("/jwthmac/issue", "/jwt/issue"):
            statuses = {e["response"]["status"] for e in entries if e["request"]["url"].endswith(path)}
            self.assertIn(200, statuses, path)
        await self.runSchemathesis("admin", f"http://127.0.0.1:{self.adminPort}", "admin")

    async def test_schemathesisWithoutClientCertificate(self) -> None:
        entries = await self.runSchemathesis(
            "no-certificate", f"https://localhost:{self.port}", "issue", "--tls-verify", self.pki.path("ca.pem")
        )
        posts = [entry for entry in entries if entry["request"]["method"] == "POST"]
        self.assertGreater(len(posts), 0)
        for entry in posts:
            origin = [h["value"] for h in entry["request"]["headers"] if h["name"].lower() == "origin"]
            status = entry["response"]["status"]
            if status == 401:
                continue
            # The Origin is checked before the certificate: a foreign one gets its 403 first.
            self.assertEqual(status, 403, entry["request"])
            self.assertTrue(origin, entry["request"])
            self.assertEqual(json.loads(entry["response"]["content"]["text"])["error"], "origin_not_allowed")
        self.assertIn(401, {entry["response"]["status"] for entry in posts})

    # The answers generated requests do not reach

    async def test_everyRefusalConforms(self) -> None:
        """Provoke each status and error code directly; each answer must conform to the document."""
        pki = self.pki
        policyFile = pki.write(
            "policy.json",
            json.dumps(
                {
                    "clients": [
                        {"subject": "Martin2", "audiences": ["gschmarri"], "flags": 0},
                    ]
                }
            ).encode(),
        )
        options: dict[str, Any] = {"audiences": "gschmarri dummy", "policy-file": policyFile, "request-timeout": "1"}
        port, service = startIssuer(self, pki, **options)
        ca = pki.path("ca.pem")
        good = Client(port, ca, self.certFile, self.keyFile)
        stranger = Client(port, ca, *pki.clientFiles(devpki.issueClient(pki.ca, "Stranger"), "stranger"))
        nameless = Client(port, ca, *pki.clientFiles(pki.noCommonName, "nameless"))
        anonymous = Client(port, ca)
        for client in (good, stranger, nameless, anonymous):
            self.addCleanup(client.close)
        allowed = {"Origin": "https://app.example.org"}
        issue, old, token = "/jwt/issue", "/jwthmac/issue", b'{"audience": "gschmarri"}'
        evil = {"Origin": "https://evil.example"}
        latin1 = {"Content-Type": "application/json; charset=latin-1"}
        grant = {**allowed, "Access-Control-Request-Method": "POST"}
        cases: list[tuple[Client, str, str, bytes | None, dict[str, str], int, str | None]] = [
            (good, "POST", old, token, allowed, 200, None),
            (good, "POST", issue, b'{"audience": "gschmarri", "algorithm": "HS256"}', {}, 200, None),
            (good, "POST", issue, b"\xff", {}, 400, "body_not_utf8"),
            (good, "POST", issue, b'{"audience": "a", "audience": "b"}', {}, 400, "malformed_json"),
            (good, "POST", issue, b'{"audience": NaN}', {}, 400, "malformed_json"),
            (good, "POST", issue, b"[]", {}, 400, "body_not_object"),
            (good, "POST", issue, b"{}", {}, 400, "audience_missing"),
            (good, "POST", issue, b'{"audience": 1}', {}, 400, "audience_not_string"),
            (good, "POST", issue, b'{"audience": ""}', {}, 400, "audience_empty"),
            (good, "POST", issue, b'{"audience": "a\\u0001"}', {}, 400, "audience_invalid"),
            (good, "POST", issue, json.dumps({"audience": "a" * 257}).encode(), {}, 400, "audience_invalid"),
            (good, "POST", issue, b'{"audience": "gschmarri", "algorithm": "none"}', {}, 400, "algorithm_mismatch"),
            (anonymous, "POST", old, token, allowed, 401, "client_certificate_required"),
            (good, "POST", issue, token, evil, 403, "origin_not_allowed"),
            (good, "POST", issue, b'{"audience": "other"}', {}, 403, "audience_not_allowed"),
            (good, "POST", issue, b'{"audience": "dummy"}', {}, 403, "audience_not_allowed"),
            (stranger, "POST", issue, token, {}, 403, "subject_not_allowed"),
            (nameless, "POST", issue, token, {}, 403, "subject_missing"),
            (good, "GET", "/", None, {}, 404, "not_found"),
            (good, "POST", "/jwt/issue/extra", token, allowed, 404, "not_found"),
            (good, "GET", old, None, allowed, 405, "method_not_allowed"),
            (good, "DELETE", issue, None, {}, 405, "method_not_allowed"),
            (good, "POST", issue, b"{" * 5000, {}, 413, "body_too_large"),
            (good, "POST", issue, token, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            (good, "POST", issue, token, latin1, 415, "unsupported_media_type"),
            (anonymous, "OPTIONS", issue, None, {}, 204, None),
            (anonymous, "OPTIONS", old, None, grant, 204, None),
            (anonymous, "OPTIONS", issue, None, evil, 403, "origin_not_allowed"),
        ]
        seen: set[str] = set()
        for client, method, path, body, headers, status, code in cases:
            what = f"{method} {path} {body!r:.60} {headers}"
            answer = await deferToThread(client.call, method=method, path=path, body=body, headers=headers)
            self.assertEqual(answer.status, status, f"{what}: {answer.body!r}")
            if code is not None:
                self.assertEqual(answer.json()["error"], code, what)
                seen.add(code)
            self.assertConforms(
                Answer(answer.status, answer.headers, answer.body), self.responseFor(path, method, status), what
            )
        # 408: a request that does not finish within --request-timeout.
        timedOut = await deferToThread(_slowRequest, good)
        self.assertEqual(timedOut.status, 408)
        self.assertEqual(json.loads(timedOut.body)["error"], "request_timeout")
        self.assertConforms(timedOut, self.responseFor("/jwt/issue", "POST", 408), "slow POST")
        seen.add("request_timeout")
        await deferLater(reactor, 2.2, lambda: None)  # the issuer's follow-up abort of that connection

        # The admin listener's refusals.
        for method, path, status in (("GET", "/nope", 404), ("GET", "/healthz/x", 404), ("POST", "/healthz", 405)):
            answer2 = await deferToThread(_adminCall, self.adminPort, method, path)
            self.assertEqual(answer2.status, status, path)
            self.assertConforms(
                answer2, self.responseFor(path, method, status, adminListener=True), f"admin {method} {path}"
            )

        # 500: the signer fails; the client gets JSON, never a traceback.
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("signer broke (test)")

        self.patch(service.policy.signer, "mint", broken)
        failed = await deferToThread(lambda: good.call(path="/jwt/issue", headers=allowed))
        self.assertEqual(failed.status, 500)
        self.assertEqual(failed.json()["error"], "internal_error")
        self.assertConforms(
            Answer(failed.status, failed.headers, failed.body), self.responseFor("/jwt/issue", "POST", 500), "500"
        )
        self.flushLoggedErrors(RuntimeError)
        seen.add("internal_error")

        self.assertEqual(seen, set(_resolve(SPEC["components"]["schemas"]["ErrorCode"])["enum"]))


def _slowRequest(client: Client) -> Answer:
    """Send half a request and wait for the issuer to give up on it."""
    connection = client.connect()
    sock = connection.sock
    assert sock is not None
    sock.sendall(b"POST /jwt/issue HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n")
    answer = http.client.HTTPResponse(sock, method="POST")  # type: ignore[arg-type]
    try:
        answer.begin()
        return Answer(answer.status, answer.headers, answer.read())
    finally:
        sock.close()
