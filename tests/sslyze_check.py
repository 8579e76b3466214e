"""
Scan the running service with sslyze (run by `tox -e sslyze`; not a trial test).

sslyze pins an older cryptography than the service uses, so this script runs in
its own environment, which has sslyze but not the project. The service runs from
another environment's Python (--issuer-python, by default the `tests` tox
environment's): that Python also makes a throwaway PKI with tokenissuer.devpki.

Three deployments are scanned, each a real `twistd tokenissuer` process on a
free loopback port: an ECDSA P-256 server certificate, an RSA-2048 one, and the
ECDSA one with --client-auth required (sslyze then presents a client
certificate). Each must:

- comply with Mozilla's "intermediate" TLS profile, as sslyze's own checker
  judges it (TLS versions, cipher suites, key-exchange groups, certificate type,
  curve, signature and lifespan, certificate path validation against the CA given
  here, and its vulnerability checks); the list of accepted deviations is empty;
- accept neither SSL 2.0/3.0 nor TLS 1.0/1.1, and accept TLS 1.2 and 1.3;
- support secure renegotiation and refuse client-initiated renegotiation;
- offer no TLS compression, and not be vulnerable to Heartbleed, ROBOT or the
  OpenSSL CCS injection;
- support TLS_FALLBACK_SCSV and the extended master secret;
- send only its own certificate (never the client CA), which passes RFC 5280
  path validation for "localhost" against the CA given here;
- ask for a client certificate the way the mode says (optional or required).

It prints a summary and exits 1 on any finding, 2 if it could not run.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.utils import CryptographyDeprecationWarning
from sslyze import (
    CertificateInfoExtraArgument,
    ClientAuthenticationCredentials,
    RobotScanResultEnum,
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanResult,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

#: Findings of sslyze's Mozilla checker that we accept, by its issue key, with why.
#: Empty: the service and the test PKI comply fully. (Missing DHE suites are not a
#: finding: the checker only flags what is offered beyond the profile.)
ACCEPTED_MOZILLA_DEVIATIONS: dict[str, str] = {}

#: Days the scanned server certificates are valid: Mozilla's intermediate profile
#: allows at most 366 (and recommends 90), which devpki's 825-day default exceeds.
SERVER_CERTIFICATE_DAYS = 90

MAKE_PKI = """
import datetime, sys
from cryptography.x509.oid import ExtendedKeyUsageOID
from tokenissuer import devpki
folder, days = sys.argv[1], int(sys.argv[2])
now = datetime.datetime.now(datetime.UTC)
ca = devpki.makeCA("tokenissuer sslyze CA")
clientCA = devpki.makeCA("tokenissuer sslyze client CA")
files = {"ca.pem": ca.certificatePEM(), "client-ca.pem": clientCA.certificatePEM()}
for kind in ("ec", "rsa"):
    server = devpki.issueServer(ca, notAfter=now + datetime.timedelta(days=days), keyKind=kind)
    files[f"server-{kind}.crt"], files[f"server-{kind}.key"] = server.certificatePEM(), server.keyPEM()
client = devpki.issueClient(clientCA, "sslyze")
files["client.crt"], files["client.key"] = client.certificatePEM(), client.keyPEM()
for name, data in files.items():
    with open(f"{folder}/{name}", "wb") as handle:
        handle.write(data)
"""

TWISTD = "from twisted.scripts.twistd import run; run()"
DEPLOYMENTS = [
    ("ECDSA P-256 certificate, client-auth optional", "ec", "optional"),
    ("RSA-2048 certificate, client-auth optional", "rsa", "optional"),
    ("ECDSA P-256 certificate, client-auth required", "ec", "required"),
]
SCAN_COMMANDS = set(SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER) | {ScanCommand.SESSION_RENEGOTIATION}


class CannotRun(Exception):
    """The scan could not be set up (exit status 2)."""


def makePKI(python: str, folder: Path) -> None:
    result = subprocess.run(
        [python, "-c", MAKE_PKI, str(folder), str(SERVER_CERTIFICATE_DAYS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise CannotRun(f"making the test PKI failed:\n{result.stderr}")


@contextmanager
def runningIssuer(python: str, folder: Path, keyKind: str, clientAuth: str) -> Iterator[tuple[int, list[str], str]]:
    """Start `twistd tokenissuer`; yield its port, its (growing) log lines and its HMAC key; stop it with SIGTERM."""
    command = [
        python,
        "-c",
        TWISTD,
        "-n",
        "--pidfile=",
        "tokenissuer",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--admin-listen",
        "off",
        "--cert",
        str(folder / f"server-{keyKind}.crt"),
        "--key",
        str(folder / f"server-{keyKind}.key"),
        "--client-ca",
        str(folder / "client-ca.pem"),
        "--client-auth",
        clientAuth,
        "--audiences",
        "gschmarri",
    ]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TOK_ISS_")}
    environ["TOK_ISS_HMAC_SECRET"] = secrets.token_urlsafe(48)
    process = subprocess.Popen(
        command, env=environ, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    assert process.stdout is not None
    stdout = process.stdout
    ready = threading.Event()

    def read() -> None:
        for line in stdout:
            lines.append(line)
            if "tokenissuer ready" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ready.wait(60)
        match = next((re.search(r"\(port (\d+)\)", line) for line in lines if "tokenissuer ready" in line), None)
        if match is None:
            raise CannotRun("the issuer did not start:\n" + "".join(lines)[-3000:])
        yield int(match.group(1)), lines, environ["TOK_ISS_HMAC_SECRET"]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        reader.join(10)


def scan(port: int, folder: Path, clientAuth: str) -> ServerScanResult:
    credentials = None
    if clientAuth == "required":
        credentials = ClientAuthenticationCredentials(
            certificate_chain_path=folder / "client.crt", key_path=folder / "client.key"
        )
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname="localhost", port=port, ip_address="127.0.0.1"),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication="localhost", tls_client_auth_credentials=credentials, network_timeout=10
        ),
        scan_commands=SCAN_COMMANDS,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=folder / "ca.pem")
        ),
    )
    scanner = Scanner(per_server_concurrent_connections_limit=5)
    scanner.queue_scans([request])
    [result] = list(scanner.get_results())
    return result


def findings(result: ServerScanResult, clientAuth: str, folder: Path) -> tuple[list[str], list[str]]:
    """(findings, summary lines) for one scan result."""
    problems: list[str] = []
    summary: list[str] = []
    if result.scan_status != ServerScanStatusEnum.COMPLETED or result.scan_result is None:
        trace = "".join(result.connectivity_error_trace.format()) if result.connectivity_error_trace else ""
        return [f"the scan did not complete ({result.scan_status.name}): {trace[-1500:]}"], summary
    scanned = result.scan_result
    for command in sorted(SCAN_COMMANDS, key=lambda c: c.value):
        attempt = getattr(scanned, command.value)
        if attempt.status != ScanCommandAttemptStatusEnum.COMPLETED:
            problems.append(f"{command.value} did not complete: {attempt.error_reason} {attempt.error_trace}")
    if problems:
        return problems, summary

    # Mozilla "intermediate", judged by sslyze's own checker.
    profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    try:
        check_server_against_tls_configuration(result, profile)
        issues: dict[str, str] = {}
    except ServerNotCompliantWithTlsConfiguration as error:
        issues = error.issues
    for key, text in sorted(issues.items()):
        if key not in ACCEPTED_MOZILLA_DEVIATIONS:
            problems.append(f"Mozilla intermediate: {key}: {text}")
    for key in sorted(set(ACCEPTED_MOZILLA_DEVIATIONS) - set(issues)):
        problems.append(f"accepted deviation {key!r} no longer occurs: remove it from ACCEPTED_MOZILLA_DEVIATIONS")
    accepted = sorted(set(issues) & set(ACCEPTED_MOZILLA_DEVIATIONS))
    refused = sorted(set(issues) - set(ACCEPTED_MOZILLA_DEVIATIONS))
    verdict = f"NOT compliant: {', '.join(refused)}" if refused else "compliant"
    summary.append(f"Mozilla intermediate: {verdict}" + (f" (accepted: {', '.join(accepted)})" if accepted else ""))

    # Protocol versions and what each accepts.
    versions = {
        "SSL 2.0": scanned.ssl_2_0_cipher_suites,
        "SSL 3.0": scanned.ssl_3_0_cipher_suites,
        "TLS 1.0": scanned.tls_1_0_cipher_suites,
        "TLS 1.1": scanned.tls_1_1_cipher_suites,
        "TLS 1.2": scanned.tls_1_2_cipher_suites,
        "TLS 1.3": scanned.tls_1_3_cipher_suites,
    }
    for name, attempt in versions.items():
        assert attempt.result is not None
        accepted = [suite.cipher_suite.name for suite in attempt.result.accepted_cipher_suites]
        wanted = name in ("TLS 1.2", "TLS 1.3")
        if attempt.result.is_tls_version_supported != wanted:
            problems.append(f"{name} is {'not ' if wanted else ''}accepted")
        if accepted:
            summary.append(f"{name}: {', '.join(accepted)}")
    assert scanned.elliptic_curves.result is not None
    curves = sorted(curve.name for curve in scanned.elliptic_curves.result.supported_curves or [])
    summary.append(f"key-exchange groups: {', '.join(curves)}")

    # Known weaknesses.
    weaknesses: list[str] = []
    renegotiation = scanned.session_renegotiation.result
    assert renegotiation is not None
    if not renegotiation.supports_secure_renegotiation:
        weaknesses.append("no secure renegotiation (RFC 5746)")
    if renegotiation.is_vulnerable_to_client_renegotiation_dos or renegotiation.client_renegotiations_success_count:
        count = renegotiation.client_renegotiations_success_count
        weaknesses.append(f"client-initiated renegotiation accepted ({count} times)")
    checks = {
        "TLS compression": scanned.tls_compression.result.supports_compression,  # type: ignore[union-attr]
        "Heartbleed": scanned.heartbleed.result.is_vulnerable_to_heartbleed,  # type: ignore[union-attr]
        "OpenSSL CCS injection": scanned.openssl_ccs_injection.result.is_vulnerable_to_ccs_injection,  # type: ignore[union-attr]
        "no TLS_FALLBACK_SCSV": not scanned.tls_fallback_scsv.result.supports_fallback_scsv,  # type: ignore[union-attr]
        "no extended master secret": not scanned.tls_extended_master_secret.result.supports_ems_extension,  # type: ignore[union-attr]
    }
    weaknesses += [name for name, found in checks.items() if found]
    robot = scanned.robot.result.robot_result  # type: ignore[union-attr]
    if robot not in (
        RobotScanResultEnum.NOT_VULNERABLE_NO_ORACLE,
        RobotScanResultEnum.NOT_VULNERABLE_RSA_NOT_SUPPORTED,
    ):
        weaknesses.append(f"ROBOT: {robot.name}")
    problems += weaknesses
    if not weaknesses:
        summary.append(
            "secure renegotiation, client-initiated renegotiation refused; no compression; not vulnerable to "
            f"Heartbleed or CCS injection; ROBOT: {robot.name.lower()}; TLS_FALLBACK_SCSV and extended master secret"
        )

    # The certificate: only our own, valid for localhost against the CA we made.
    certificates = scanned.certificate_info.result
    assert certificates is not None
    for deployment in certificates.certificate_deployments:
        chain = [c.subject.rfc4514_string() for c in deployment.received_certificate_chain]
        if chain != ["CN=localhost"]:
            problems.append(f"the server sent the chain {chain}, expected only its own certificate")
        ours = [r for r in deployment.path_validation_results if r.trust_store.name == "Supplied CA file"]
        # cryptography's RFC 5280 validation, for the server name "localhost".
        if not ours or not ours[0].was_validation_successful:
            problems.append(f"path validation against the given CA failed: {ours[0].validation_error if ours else '?'}")
        leaf = deployment.received_certificate_chain[0]
        summary.append(
            f"certificate: {chain[0]}, {type(leaf.public_key()).__name__.lstrip('_')}, "
            f"{leaf.signature_algorithm_oid._name}, path validation for localhost against the given CA: "
            f"{'ok' if ours and ours[0].was_validation_successful else 'FAILED'}"
        )

    # Client authentication as configured. (With client credentials, sslyze does not
    # probe the requirement: it reports DISABLED, so the required mode is probed here.)
    assert result.connectivity_result is not None
    requirement = result.connectivity_result.client_auth_requirement.name.lower()
    if clientAuth == "optional" and requirement != "optional":
        problems.append(f"client authentication is {requirement}, expected optional")
    if clientAuth == "required":
        requirement = requiredProbe(result.server_location.port, folder)
        if requirement != "required":
            problems.append(f"client authentication: {requirement}")
    summary.append(f"client certificate: {requirement}")
    return problems, summary


def requiredProbe(port: int, folder: Path) -> str:
    """Handshake (TLS 1.2) without and with a client certificate: "required" if only the second succeeds."""
    outcomes = []
    for withCertificate in (False, True):
        context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        if withCertificate:
            context.load_cert_chain(str(folder / "client.crt"), str(folder / "client.key"))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost"):
                    outcomes.append(True)
        except (ssl.SSLError, OSError):
            outcomes.append(False)
    if outcomes == [False, True]:
        return "required"
    words = ["failed", "succeeded"]
    return f"handshake without a certificate {words[outcomes[0]]}, with one {words[outcomes[1]]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--issuer-python",
        default=os.environ.get("TOKENISSUER_ISSUER_PYTHON", ""),
        help="a Python that has tokenissuer installed (default: $TOKENISSUER_ISSUER_PYTHON)",
    )
    arguments = parser.parse_args()
    # sslyze's bundled public trust stores hold a few certificates that newer cryptography warns about.
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
    python = arguments.issuer_python
    if not python or not Path(python).exists():
        print(
            f"sslyze_check: no Python with tokenissuer at {python!r}; run the `tests` environment first "
            "(tox -e tests,sslyze) or pass --issuer-python",
            file=sys.stderr,
        )
        return 2
    total: list[str] = []
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="tokenissuer-sslyze-") as temporary:
            folder = Path(temporary)
            makePKI(python, folder)
            for title, keyKind, clientAuth in DEPLOYMENTS:
                scanStarted = time.monotonic()
                with runningIssuer(python, folder, keyKind, clientAuth) as (port, log, key):
                    result = scan(port, folder, clientAuth)
                    time.sleep(0.2)
                    problems, summary = findings(result, clientAuth, folder)
                text = "".join(log)  # complete: the issuer has exited
                if "Traceback" in text or "Unhandled" in text:
                    problems.append("the issuer logged an unhandled error:\n" + text[-2000:])
                if key in text:
                    problems.append("the HMAC key appears in the issuer's log")
                print(f"\n== {title} (port {port}, {time.monotonic() - scanStarted:.0f} s)")
                for line in summary:
                    print(f"   {line}")
                for problem in problems:
                    print(f"   FINDING: {problem}")
                total += [f"{title}: {problem}" for problem in problems]
    except CannotRun as error:
        print(f"sslyze_check: {error}", file=sys.stderr)
        return 2
    print(f"\nsslyze_check: {len(DEPLOYMENTS)} deployments scanned in {time.monotonic() - started:.0f} s; ", end="")
    if total:
        print(f"{len(total)} finding(s)")
        return 1
    print("no findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
