"""
A throwaway PKI for development mode and tests: a CA, a server certificate for
localhost, and a client certificate (also as PKCS#12 for importing into a
browser), all valid under strict RFC 5280 path validation.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Password of the development PKCS#12 file (it protects nothing of value).
DEV_P12_PASSWORD = "tokenissuer-dev"  # noqa: S105 - protects a throwaway dev key
DEV_CLIENT_NAME = "dev-client"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def newKey(kind: str = "ec") -> CertificateIssuerPrivateKeyTypes:
    """An ECDSA P-256 key (fast) or, with C{kind="rsa"}, an RSA-2048 key."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes

    def certificatePEM(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def keyPEM(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def makeCA(commonName: str = "tokenissuer development CA", days: int = 3650) -> Issued:
    """A self-signed root CA allowed to sign end-entity certificates only."""
    key = newKey()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def _subject(commonName: str) -> x509.Name:
    """A subject with this common name; an empty one gives a subject without CN."""
    if not commonName:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no common name")])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


def issue(
    ca: Issued,
    commonName: str,
    *,
    usages: Sequence[x509.ObjectIdentifier],
    dnsNames: Sequence[str] = (),
    ipAddresses: Sequence[str] = (),
    emails: Sequence[str] = (),
    notBefore: datetime.datetime | None = None,
    notAfter: datetime.datetime | None = None,
    keyKind: str = "ec",
) -> Issued:
    """An end-entity certificate signed by C{ca} with the given extended key usages."""
    key = newKey(keyKind)
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(commonName))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore or now - datetime.timedelta(minutes=5))
        .not_valid_after(notAfter or now + datetime.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=keyKind == "rsa",
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    alternativeNames: list[x509.GeneralName] = [x509.DNSName(name) for name in dnsNames]
    alternativeNames += [x509.IPAddress(ipaddress.ip_address(address)) for address in ipAddresses]
    alternativeNames += [x509.RFC822Name(email) for email in emails]
    if alternativeNames:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternativeNames), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def issueServer(
    ca: Issued, names: Sequence[str] = ("localhost",), addresses: Sequence[str] = ("127.0.0.1", "::1"), **kw
) -> Issued:  # type: ignore[no-untyped-def]
    return issue(
        ca,
        names[0] if names else "tokenissuer",
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        dnsNames=names,
        ipAddresses=addresses,
        **kw,
    )


def issueClient(ca: Issued, commonName: str = DEV_CLIENT_NAME, **kw) -> Issued:  # type: ignore[no-untyped-def]
    """A clientAuth certificate; RFC 5280 validators want a subjectAltName, so it gets an e-mail one."""
    kw.setdefault("emails", [f"{commonName.lower()}@tokenissuer.invalid"])
    return issue(ca, commonName, usages=[ExtendedKeyUsageOID.CLIENT_AUTH], **kw)


def pkcs12Bytes(client: Issued, ca: Issued, password: str = DEV_P12_PASSWORD) -> bytes:
    """The client certificate, key and CA as a password-protected PKCS#12 file."""
    return pkcs12.serialize_key_and_certificates(
        client.certificate.subject.rfc4514_string().encode("utf-8"),
        client.key,  # type: ignore[arg-type]
        client.certificate,
        [ca.certificate],
        serialization.BestAvailableEncryption(password.encode("utf-8")),
    )


@dataclass(frozen=True)
class DevFiles:
    """Paths of the development PKI and HMAC key inside one folder."""

    folder: str

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    @property
    def caCert(self) -> str:
        return self.path("ca.pem")

    @property
    def serverCert(self) -> str:
        return self.path("server.crt")

    @property
    def serverKey(self) -> str:
        return self.path("server.pem")

    @property
    def clientCert(self) -> str:
        return self.path("client.crt")

    @property
    def clientKey(self) -> str:
        return self.path("client.key")

    @property
    def clientP12(self) -> str:
        return self.path("client.p12")

    @property
    def hmacKey(self) -> str:
        return self.path("hmac.key")

    def all(self) -> list[str]:
        return [
            self.caCert,
            self.serverCert,
            self.serverKey,
            self.clientCert,
            self.clientKey,
            self.clientP12,
            self.hmacKey,
        ]


def _write(path: str, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    descriptor = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def ensureDevFiles(folder: str) -> tuple[DevFiles, bool]:
    """
    Create the development PKI and HMAC key in C{folder} unless all files are
    already there; return the paths and whether anything was created.
    """
    files = DevFiles(folder)
    present = [path for path in files.all() if os.path.exists(path)]
    if len(present) == len(files.all()):
        return files, False
    if present:
        # Never overwrite part of a PKI whose client certificate may be imported somewhere.
        missing = ", ".join(os.path.basename(path) for path in files.all() if path not in present)
        raise FileExistsError(
            f"the development folder {folder!r} is incomplete (missing {missing}); delete it to start afresh"
        )
    os.makedirs(folder, mode=0o700, exist_ok=True)
    ca = makeCA()
    server = issueServer(ca)
    client = issueClient(ca)
    _write(files.caCert, ca.certificatePEM(), private=False)
    _write(files.serverCert, server.certificatePEM(), private=False)
    _write(files.serverKey, server.keyPEM(), private=True)
    _write(files.clientCert, client.certificatePEM(), private=False)
    _write(files.clientKey, client.keyPEM(), private=True)
    _write(files.clientP12, pkcs12Bytes(client, ca), private=True)
    _write(files.hmacKey, secrets.token_urlsafe(48).encode("ascii"), private=True)
    return files, True
