"""
Who may get a token for what: subject names from client certificates, and the
optional per-subject policy file (audiences and flags per subject).

Knows nothing of HTTP; the web layer turns a L{PolicyRefusal} into a 403.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

SUBJECT_SOURCES = ("cn", "san-email", "san-uri", "san-dns", "dn")
_SAN_TYPES: dict[str, type[x509.GeneralName]] = {
    "san-email": x509.RFC822Name,
    "san-uri": x509.UniformResourceIdentifier,
    "san-dns": x509.DNSName,
}
_SOURCE_WORDS = {
    "cn": "a common name (CN) in its subject",
    "san-email": "an e-mail address in its subjectAltName",
    "san-uri": "a URI in its subjectAltName",
    "san-dns": "a DNS name in its subjectAltName",
    "dn": "a subject",
}
#: Largest flags value: the consumer reads flags as an unsigned 64-bit integer.
MAX_FLAGS = 2**64 - 1


def describeSubjectSource(source: str) -> str:
    return _SOURCE_WORDS[source]


def subjectOf(certificate: x509.Certificate, source: str) -> str | None:
    """The name that becomes C{sub}, read with cryptography; None if the certificate has none."""
    if source == "dn":
        text = certificate.subject.rfc4514_string()
        return text or None
    if source == "cn":
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            return None
        value = names[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    values = alternative.get_values_for_type(_SAN_TYPES[source])  # type: ignore[arg-type]
    return str(values[0]) if values else None


class PolicyError(ValueError):
    """The policy file is unusable; the message names the file and the place in it."""


class PolicyRefusal(Exception):
    """The policy does not allow this subject, or this audience for it."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Grant:
    """Audiences (C{"*"} for any) and the flags value for matching subjects."""

    audiences: frozenset[str]
    flags: int

    def allows(self, audience: str) -> bool:
        return "*" in self.audiences or audience in self.audiences


@dataclass(frozen=True)
class ClientRule:
    subject: str  # exact, or a glob (fnmatch: * ? [..])
    grant: Grant

    def matches(self, subject: str) -> bool:
        return fnmatch.fnmatchcase(subject, self.subject)


@dataclass(frozen=True)
class ClientPolicy:
    """The parsed policy file: the first matching rule wins, else C{default}, else refusal."""

    rules: tuple[ClientRule, ...]
    default: Grant | None

    def grantFor(self, subject: str) -> Grant | None:
        for rule in self.rules:
            if rule.matches(subject):
                return rule.grant
        return self.default

    def decide(self, subject: str, audience: str) -> int:
        """The flags for a token to C{subject} for C{audience}, or raise L{PolicyRefusal}."""
        grant = self.grantFor(subject)
        if grant is None:
            raise PolicyRefusal(
                "subject_not_allowed", "The policy grants no tokens to this client certificate's subject."
            )
        if not grant.allows(audience):
            raise PolicyRefusal(
                "audience_not_allowed", f"The policy does not allow this client a token for {audience[:100]!r}."
            )
        return grant.flags


def _grant(value: Any, where: str) -> Grant:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise PolicyError(f"{where} must be an object with audiences and flags")
    unknown = set(value) - {"subject", "audiences", "flags"}
    if unknown:
        raise PolicyError(f"{where} has unknown key(s): {', '.join(sorted(unknown))}")
    audiences = value.get("audiences", [])
    if not isinstance(audiences, list) or not all(isinstance(a, str) and a for a in audiences):
        raise PolicyError(f"{where}.audiences must be a list of non-empty strings")
    flags = value.get("flags", 0)
    if not isinstance(flags, int) or isinstance(flags, bool) or not 0 <= flags <= MAX_FLAGS:
        raise PolicyError(f"{where}.flags must be an unsigned integer")
    return Grant(frozenset(audiences), flags)


def parsePolicy(document: Any) -> ClientPolicy:
    """Check and convert a parsed policy document; L{PolicyError} names what is wrong and where."""
    if not isinstance(document, dict) or not all(isinstance(key, str) for key in document):
        raise PolicyError('the policy must be an object like {"clients": [...], "default": {...}}')
    unknown = set(document) - {"clients", "default"}
    if unknown:
        raise PolicyError(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    clients = document.get("clients", [])
    if not isinstance(clients, list):
        raise PolicyError("clients must be a list")
    rules = []
    for index, entry in enumerate(clients):
        where = f"clients[{index}]"
        grant = _grant(entry, where)
        subject = entry.get("subject")
        if not isinstance(subject, str) or not subject:
            raise PolicyError(f"{where}.subject must be a non-empty string")
        rules.append(ClientRule(subject, grant))
    default = _grant(document["default"], "default") if "default" in document else None
    if "default" in document and "subject" in document["default"]:
        raise PolicyError("default must not have a subject")
    return ClientPolicy(tuple(rules), default)


def loadPolicyFile(path: str, data: bytes) -> ClientPolicy:
    """Parse JSON, or YAML for .yaml/.yml files, into a L{ClientPolicy}."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"policy file {path!r} is not UTF-8") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            document = yaml.safe_load(text)
        else:
            document = json.loads(text)
    except Exception as error:
        raise PolicyError(f"policy file {path!r} cannot be parsed: {str(error).splitlines()[0]}") from None
    try:
        return parsePolicy(document)
    except PolicyError as error:
        raise PolicyError(f"policy file {path!r}: {error}") from None
