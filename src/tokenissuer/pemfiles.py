"""
Read and check the PEM files the service needs, with clear errors.

Everything here fails with L{PemError}, whose message names the file and the
problem in one sentence and never includes key material.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


class PemError(ValueError):
    """A PEM file is missing, unreadable or unusable."""


def readFile(path: str, what: str) -> bytes:
    """Read a whole file, turning OS errors into one readable sentence."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise PemError(f"{what} file {path!r} does not exist") from None
    except IsADirectoryError:
        raise PemError(f"{what} file {path!r} is a directory") from None
    except PermissionError:
        raise PemError(f"{what} file {path!r} is not readable (permission denied)") from None
    except OSError as error:
        raise PemError(f"{what} file {path!r} cannot be read: {error.strerror}") from None


def _loadCertificates(path: str, what: str) -> list[x509.Certificate]:
    data = readFile(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise PemError(f"{what} file {path!r} holds no PEM certificate")
    return certificates


@dataclass(frozen=True)
class ServerIdentity:
    """The server's certificate chain (leaf first) and its private key."""

    chain: list[x509.Certificate]
    key: PrivateKeyTypes

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def describe(self) -> str:
        """Subject and expiry, for the start-up summary."""
        return f"{self.leaf.subject.rfc4514_string()} (expires {self.leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"


def _publicKeysMatch(certificate: x509.Certificate, key: PrivateKeyTypes) -> bool:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return certificate.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def loadServerIdentity(certPath: str, keyPath: str) -> ServerIdentity:
    """Load the server certificate chain and key; refuse a key that does not match."""
    chain = _loadCertificates(certPath, "server certificate")
    keyData = readFile(keyPath, "server key")
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except TypeError:
        raise PemError(f"server key file {keyPath!r} is encrypted; give an unencrypted PEM key") from None
    except Exception:
        raise PemError(f"server key file {keyPath!r} holds no usable PEM private key") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        # Ed25519 and others have no TLS 1.2 cipher suite in the profile we serve.
        raise PemError(f"server key file {keyPath!r} holds a key type other than RSA or ECDSA")
    if not _publicKeysMatch(chain[0], key):
        raise PemError(f"server key file {keyPath!r} does not match the first certificate in {certPath!r}")
    now = datetime.datetime.now(datetime.UTC)
    if chain[0].not_valid_after_utc < now:
        raise PemError(f"server certificate in {certPath!r} expired on {chain[0].not_valid_after_utc:%Y-%m-%d}")
    return ServerIdentity(chain=chain, key=key)


def loadClientCAs(path: str) -> list[x509.Certificate]:
    """Load the bundle of CAs trusted to issue client certificates."""
    certificates = _loadCertificates(path, "client CA bundle")
    for certificate in certificates:
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue
        if not constraints.ca:
            raise PemError(
                f"client CA bundle {path!r} contains {certificate.subject.rfc4514_string()!r}, "
                "which is not a CA certificate"
            )
    return certificates


def loadCRLs(
    paths: tuple[str, ...] | list[str], clientCAs: list[x509.Certificate]
) -> list[x509.CertificateRevocationList]:
    """
    Load CRLs (PEM or DER). Each must be signed by a CA in the client CA bundle,
    so a stray or forged CRL cannot silently switch revocation off.
    """
    crls = []
    for path in paths:
        data = readFile(path, "CRL")
        try:
            if b"-----BEGIN X509 CRL-----" in data:
                crl = x509.load_pem_x509_crl(data)
            else:
                crl = x509.load_der_x509_crl(data)
        except ValueError:
            raise PemError(f"CRL file {path!r} holds no PEM or DER certificate revocation list") from None
        issuers = [ca for ca in clientCAs if ca.subject == crl.issuer]
        if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
            raise PemError(
                f"CRL file {path!r} is not signed by a CA in the client CA bundle "
                f"(its issuer is {crl.issuer.rfc4514_string()!r})"
            )
        crls.append(crl)
    return crls
