"""
Command-line options and environment variables, resolved into one checked
L{Settings}. The command line wins over the environment, which wins over the
default; the environment names are the original issuer's, so its manifests work.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.python import usage

from tokenissuer.audit import LOG_FORMATS
from tokenissuer.cors import CorsPolicy, OriginError
from tokenissuer.pemfiles import PemError, readFile
from tokenissuer.tls import CLIENT_AUTH_MODES

MAX_TTL = 86400
DEV_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*")
DEV_LISTEN = "tcp:4443:interface=127.0.0.1"
DEV_DEMO_LISTEN = "tcp:8000:interface=127.0.0.1"
MAX_WORKERS = 64


#: Options that take no value on the command line (their variable takes true/false).
FLAGS = ("bind-token",)


class ConfigError(ValueError):
    """A setting is unusable; the message is one line and never holds a secret."""


@dataclass(frozen=True)
class Option:
    name: str
    env: str | None
    default: str | None
    help: str


OPTIONS = (
    Option("listen", "TOK_ISS_LISTEN", "tcp:4443", "Twisted server endpoint string of the TCP socket TLS runs on"),
    Option("cert", "TOK_ISS_FILE_CERT", "server.crt", "PEM server certificate, intermediates after it"),
    Option("key", "TOK_ISS_FILE_KEY", "server.pem", "PEM private key of the server certificate"),
    Option("client-ca", "TOK_ISS_FILE_ROOT", "private-tls-ca.pem", "PEM bundle of CAs trusted for client certificates"),
    Option(
        "hmac-secret-file",
        "TOK_ISS_HMAC_SECRET_FILE",
        None,
        "file holding the HMAC key (one trailing newline is ignored); otherwise "
        "TOK_ISS_HMAC_SECRET holds the key itself; at least 32 bytes",
    ),
    Option("issuer", "TOK_ISS_NAME", "daheim_token_issuer", "value of the iss claim"),
    Option(
        "audiences", "TOK_ISS_ALLOWED_AUDIENCES", None, "space-separated audiences that may be requested (unset: any)"
    ),
    Option(
        "origins",
        "TOK_ISS_ALLOWED_ORIGINS",
        None,
        "space-separated web origins (scheme://host[:port], port * for any) that may call cross-origin (unset: none)",
    ),
    Option("ttl", "TOK_ISS_TOKEN_TTL", "3600", "token lifetime in seconds, from iat to exp (1-86400)"),
    Option(
        "client-auth",
        "TOK_ISS_CLIENT_AUTH",
        "optional",
        "optional: certificate checked per request; required: at the handshake",
    ),
    Option(
        "admin-listen",
        "TOK_ISS_ADMIN_LISTEN",
        "tcp:9090:interface=127.0.0.1",
        "endpoint of the plain-HTTP admin listener (/healthz, /readyz, /metrics); 'off' disables it",
    ),
    Option(
        "drain-seconds",
        "TOK_ISS_DRAIN_SECONDS",
        "10",
        "on SIGTERM, seconds to let requests in flight finish before exiting (0-300)",
    ),
    Option(
        "reload-interval",
        "TOK_ISS_RELOAD_INTERVAL",
        "2",
        "seconds between checks of the certificate, key, CA and HMAC key files for changes (0 disables)",
    ),
    Option(
        "demo-port",
        "TOK_ISS_DEMO_PORT",
        None,
        "port number or endpoint string of the plain-HTTP diagnostic page that calls the issuer from a browser "
        "(unset: off, with --dev 127.0.0.1:8000; 'off' disables it)",
    ),
    Option(
        "handshake-timeout",
        "TOK_ISS_HANDSHAKE_TIMEOUT",
        "10",
        "seconds a new connection has to finish the TLS handshake",
    ),
    Option(
        "request-timeout",
        "TOK_ISS_REQUEST_TIMEOUT",
        "10",
        "seconds from a request's first byte until its headers and body are complete",
    ),
    Option("idle-timeout", "TOK_ISS_IDLE_TIMEOUT", "60", "seconds an idle keep-alive connection stays open"),
    Option(
        "max-connections", "TOK_ISS_MAX_CONNECTIONS", "1024", "open TLS connections at most; more are closed at once"
    ),
    Option(
        "workers",
        "TOK_ISS_WORKERS",
        "1",
        f"processes serving the listening socket: 1-{MAX_WORKERS}, or auto for one per CPU this process may use; "
        "with more than 1, this process supervises them",
    ),
    Option(
        "ticket-key-rotation",
        "TOK_ISS_TICKET_KEY_ROTATION",
        "3600",
        "seconds between new TLS session-ticket keys (and session cache); 0 keeps them until a reload",
    ),
    Option("log-format", "TOK_ISS_LOG_FORMAT", "text", "text, or json: one JSON object per line for log collectors"),
    Option("type", "TOK_ISS_TYPE", "HS256", "signing algorithm: HS256, HS384, HS512, ES256, ES384 or EdDSA"),
    Option("key-id", "TOK_ISS_KEY_ID", None, "kid in every token header (default: derived from the key)"),
    Option(
        "env-secrets",
        "TOK_ISS_ENV_SECRETS",
        None,
        "space-separated names of variables holding one key per audience, in TOK_ISS_ALLOWED_AUDIENCES order",
    ),
    Option(
        "retired-keys",
        "TOK_ISS_RETIRED_KEYS",
        None,
        "space-separated PEM files of retired ES*/EdDSA keys still published in the JWKS",
    ),
    Option(
        "bind-token",
        "TOK_ISS_BIND_TOKEN",
        None,
        "true: bind tokens to the client certificate (RFC 8705 cnf x5t#S256)",
    ),
    Option(
        "subject-from",
        "TOK_ISS_SUBJECT_FROM",
        "cn",
        "which certificate name becomes sub: cn, san-email, san-uri, san-dns or dn (RFC 4514)",
    ),
    Option(
        "policy-file",
        "TOK_ISS_POLICY_FILE",
        None,
        "JSON or YAML file saying per subject which audiences it may request and its flags (reloaded on change)",
    ),
    Option(
        "crl",
        "TOK_ISS_FILE_CRL",
        None,
        "space-separated CRL files (PEM or DER), one per client CA; revoked certificates fail the handshake",
    ),
    Option(
        "crl-expired",
        "TOK_ISS_CRL_EXPIRED",
        "refuse",
        "when a CRL is past its next update: refuse (fail closed) or accept client certificates",
    ),
    Option("dev-dir", "TOK_ISS_DEV_DIR", "tokenissuer-dev", "folder for the development PKI and key (with --dev)"),
)


def _helpText(option: Option) -> str:
    parts = [option.help]
    if option.env:
        parts.append(f"[env {option.env}]")
    if option.name == "hmac-secret-file":
        parts.append("[env TOK_ISS_HMAC_SECRET: the key itself]")
    parts.append(f"[default: {option.default}]" if option.default is not None else "")
    return " ".join(part for part in parts if part)


class IssuerOptions(usage.Options):
    """twistd tokenissuer [options]; every option also reads an environment variable."""

    synopsis = "[options]"
    longdesc = (
        "Serve HTTPS on the listen endpoint and answer POST /jwthmac/issue with a short-lived "
        "JWT for the caller's verified TLS client certificate. Options override environment variables."
    )
    optParameters = [[option.name, None, None, _helpText(option)] for option in OPTIONS if option.name not in FLAGS]
    optFlags = [
        *([option.name, None, _helpText(option)] for option in OPTIONS if option.name in FLAGS),
        [
            "dev",
            None,
            "development mode: create a throwaway PKI and HMAC key in --dev-dir if missing, "
            "listen on 127.0.0.1:4443, allow http://localhost and http://127.0.0.1 origins, "
            "serve the diagnostic page on 127.0.0.1:8000",
        ],
    ]
    # Internal: how the supervisor of --workers starts each worker process.
    optParameters += [
        ["worker-fd", None, None, "internal (set by the supervisor of --workers): the inherited listening socket"],
        ["worker-parent", None, None, "internal (set by the supervisor of --workers): the supervisor's pid"],
        ["worker-index", None, None, "internal (set by the supervisor of --workers): the worker's number"],
        [
            "worker-log",
            None,
            None,
            "internal (set by the supervisor of --workers): 'direct' (write the shared log) or 'relay'",
        ],
    ]


@dataclass(frozen=True)
class Settings:
    """Every setting, resolved and checked (the HMAC key is held but never shown)."""

    listen: str
    cert: str
    key: str
    clientCA: str
    hmacKey: bytes
    hmacKeySource: str
    hmacKeyFile: str | None
    issuer: str
    audiences: frozenset[str] | None
    origins: CorsPolicy
    ttl: int
    clientAuth: str
    dev: bool
    devDir: str
    adminListen: str | None = "tcp:9090:interface=127.0.0.1"
    drainSeconds: float = 10.0
    reloadInterval: float = 2.0
    subjectFrom: str = "cn"
    logFormat: str = "text"
    ticketKeyRotation: float = 3600.0
    algorithm: str = "HS256"
    keyId: str | None = None
    audienceKeyMaterial: dict[str, bytes] = field(default_factory=dict, repr=False)
    bindToken: bool = False
    retiredKeyFiles: tuple[str, ...] = ()
    handshakeTimeout: float = 10.0
    requestTimeout: float = 10.0
    idleTimeout: float = 60.0
    maxConnections: int = 1024
    policyFile: str | None = None
    crlFiles: tuple[str, ...] = ()
    crlExpired: str = "refuse"
    demoListen: str | None = None
    workers: int = 1
    #: The demo listener is development mode's default (a busy port then only warns).
    demoIsDevDefault: bool = False

    def __repr__(self) -> str:
        return (
            f"Settings(listen={self.listen!r}, issuer={self.issuer!r}, audiences={self.audiences!r}, "
            f"origins={str(self.origins)!r}, ttl={self.ttl}, clientAuth={self.clientAuth!r}, hmacKey=<redacted>)"
        )


def _raw(options: Mapping[str, object], environ: Mapping[str, str], name: str) -> tuple[str | None, str]:
    """The value of one option and where it came from."""
    option = next(o for o in OPTIONS if o.name == name)
    value = options.get(name)
    if value is not None:
        return str(value), f"--{name}"
    if option.env and option.env in environ:
        return environ[option.env], option.env
    return option.default, "default"


def devDirFrom(options: Mapping[str, object], environ: Mapping[str, str]) -> str:
    """The development folder (--dev-dir, TOK_ISS_DEV_DIR or the default)."""
    folder, _ = _raw(options, environ, "dev-dir")
    assert folder is not None
    return folder


def readHmacKeyFile(path: str) -> bytes:
    """The key is the file's bytes, minus one trailing newline left by editors and echo."""
    try:
        data = readFile(path, "HMAC key")
    except PemError as error:
        raise ConfigError(str(error)) from None
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def _hmacKey(
    options: Mapping[str, object], environ: Mapping[str, str], required: bool = True
) -> tuple[bytes, str, str | None]:
    """The signing key material (HMAC bytes, or a PEM key for ES*/EdDSA), where it came from, and its file."""
    path, source = _raw(options, environ, "hmac-secret-file")
    if path is not None:
        key, where = readHmacKeyFile(path), f"file {path!r}"
    elif "TOK_ISS_HMAC_SECRET" in environ:
        key, where = environ["TOK_ISS_HMAC_SECRET"].encode("utf-8"), "TOK_ISS_HMAC_SECRET"
    elif not required:
        return b"", "nowhere", None
    else:
        raise ConfigError("no signing key: set TOK_ISS_HMAC_SECRET or give --hmac-secret-file")
    return key, where, path


def _choice(name: str, options: Mapping[str, object], environ: Mapping[str, str], choices: tuple[str, ...]) -> str:
    """An option that takes one of a few words (any case), or a one-line error naming them."""
    text, source = _raw(options, environ, name)
    value = (text or "").strip().lower()
    if value not in choices:
        raise ConfigError(f"{name} {text!r} from {source} must be one of: {', '.join(choices)}")
    return value


def _truthy(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def _signingSettings(
    options: Mapping[str, object],
    environ: Mapping[str, str],
    key: tuple[bytes, str],
    audiences: frozenset[str] | None,
    audienceOrder: list[str],
) -> tuple[str, str | None, dict[str, bytes], bool, tuple[str, ...]]:
    """Algorithm, key id, per-audience key material, certificate binding and retired key files, checked."""
    from tokenissuer.signer import ALGORITHMS, SignerKeyError, signingKeyFrom

    hmacKey, hmacSource = key

    typeText, typeSource = _raw(options, environ, "type")
    algorithm = (typeText or "").strip()
    matches = [name for name in ALGORITHMS if name.lower() == algorithm.lower()]
    if not matches:
        raise ConfigError(f"token type {typeText!r} from {typeSource} must be one of: {', '.join(ALGORITHMS)}")
    algorithm = matches[0]
    keyIdText, _ = _raw(options, environ, "key-id")
    keyId = keyIdText.strip() if keyIdText and keyIdText.strip() else None

    namesText, namesSource = _raw(options, environ, "env-secrets")
    names = (namesText or "").split()
    audienceKeys: dict[str, bytes] = {}
    if names:
        if audiences is None:
            raise ConfigError(f"{namesSource} needs TOK_ISS_ALLOWED_AUDIENCES: one key variable per audience, in order")
        if len(names) != len(audienceOrder):
            raise ConfigError(
                f"{namesSource} names {len(names)} variable(s) but TOK_ISS_ALLOWED_AUDIENCES has "
                f"{len(audienceOrder)} audience(s); give one key variable per audience, in the same order"
            )
        for name, audience in zip(names, audienceOrder, strict=True):
            if name not in environ:
                raise ConfigError(f"{namesSource} names {name}, which is not set (the key for {audience!r})")
            audienceKeys[audience] = environ[name].encode("utf-8")
    try:
        if hmacKey:
            signingKeyFrom(algorithm, hmacKey, keyId, where=hmacSource)
        for name, material in zip(names, audienceKeys.values(), strict=True):
            signingKeyFrom(algorithm, material, None, where=name)
    except SignerKeyError as error:
        raise ConfigError(str(error)) from None
    if not hmacKey and not audienceKeys:
        raise ConfigError("no signing key: set TOK_ISS_HMAC_SECRET or give --hmac-secret-file")

    bindToken = bool(options.get("bind-token")) or _truthy(environ.get("TOK_ISS_BIND_TOKEN"))
    retiredText, _ = _raw(options, environ, "retired-keys")
    retired = tuple((retiredText or "").split())
    if retired and algorithm.startswith("HS"):
        raise ConfigError("retired keys are published as public keys; they need an ES256, ES384 or EdDSA token type")
    return algorithm, keyId, audienceKeys, bindToken, retired


def _ttl(text: str, source: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"token lifetime {text!r} from {source} is not a whole number of seconds") from None
    if not 1 <= value <= MAX_TTL:
        raise ConfigError(f"token lifetime {value} from {source} is outside 1-{MAX_TTL} seconds")
    return value


def resolveSettings(options: Mapping[str, object], environ: Mapping[str, str] | None = None) -> Settings:
    """Combine command line, environment and defaults into checked L{Settings}."""
    if environ is None:
        environ = os.environ
    dev = bool(options.get("dev"))
    devDir, _ = _raw(options, environ, "dev-dir")
    assert devDir is not None

    listen, listenSource = _raw(options, environ, "listen")
    if dev and listenSource == "default":
        listen = DEV_LISTEN
    assert listen is not None
    if not listen.strip():
        raise ConfigError(f"the listen endpoint from {listenSource} is empty")
    kind = listen.split(":", 1)[0].strip().lower()
    if kind in ("ssl", "tls", "le", "lets"):
        raise ConfigError(
            f"listen endpoint {listen!r}: tokenissuer adds TLS itself; give a plain TCP endpoint such as tcp:4443"
        )

    cert, _ = _raw(options, environ, "cert")
    key, _ = _raw(options, environ, "key")
    clientCA, _ = _raw(options, environ, "client-ca")
    hmacFile: str | None
    if dev:
        from tokenissuer.devpki import DevFiles

        files = DevFiles(devDir)
        cert, key, clientCA = files.serverCert, files.serverKey, files.caCert
        hmacKey, hmacSource, hmacFile = readHmacKeyFile(files.hmacKey), f"file {files.hmacKey!r}", files.hmacKey
    else:
        envSecrets, _ = _raw(options, environ, "env-secrets")
        hmacKey, hmacSource, hmacFile = _hmacKey(options, environ, required=not (envSecrets or "").split())
    assert cert is not None and key is not None and clientCA is not None

    issuer, issuerSource = _raw(options, environ, "issuer")
    if not issuer or not issuer.strip():
        raise ConfigError(f"the issuer name from {issuerSource} is empty")

    audiencesText, _ = _raw(options, environ, "audiences")
    audienceList = audiencesText.split() if audiencesText else []
    audiences = frozenset(audienceList) if audienceList else None
    algorithm, keyId, audienceKeys, bindToken, retiredKeys = _signingSettings(
        options, environ, (hmacKey, hmacSource), audiences, audienceList
    )

    originsText, originsSource = _raw(options, environ, "origins")
    originList = originsText.split() if originsText else []
    if dev:
        originList = [*DEV_ORIGINS, *originList]
    try:
        origins = CorsPolicy.fromStrings(originList)
    except OriginError as error:
        raise ConfigError(f"allowed origin from {originsSource}: {error}") from None

    ttlText, ttlSource = _raw(options, environ, "ttl")
    assert ttlText is not None
    ttl = _ttl(ttlText, ttlSource)

    clientAuth = _choice("client-auth", options, environ, CLIENT_AUTH_MODES)

    adminText, adminSource = _raw(options, environ, "admin-listen")
    adminListen: str | None = (adminText or "").strip()
    if not adminListen:
        raise ConfigError(f"the admin listen endpoint from {adminSource} is empty (use 'off' to disable it)")
    if adminListen.lower() == "off":
        adminListen = None
    drainSeconds = _seconds("drain-seconds", options, environ, 0, 300)
    reloadInterval = _seconds("reload-interval", options, environ, 0, 3600)
    subjectFrom, policyFile, crlFiles, crlExpired = _clientPolicySettings(options, environ)
    handshakeTimeout = _seconds("handshake-timeout", options, environ, 0.1, 300)
    requestTimeout = _seconds("request-timeout", options, environ, 0.1, 300)
    idleTimeout = _seconds("idle-timeout", options, environ, 1, 3600)
    maxConnections = _seconds("max-connections", options, environ, 1, 1_000_000)
    if maxConnections != int(maxConnections):
        raise ConfigError(f"max-connections {maxConnections:g} is not a whole number")
    demoListen, demoIsDevDefault = _demoListen(options, environ, dev)

    return Settings(
        listen=listen,
        cert=cert,
        key=key,
        clientCA=clientCA,
        hmacKey=hmacKey,
        hmacKeySource=hmacSource,
        hmacKeyFile=hmacFile,
        issuer=issuer,
        audiences=audiences,
        origins=origins,
        ttl=ttl,
        clientAuth=clientAuth,
        dev=dev,
        devDir=devDir,
        adminListen=adminListen,
        drainSeconds=drainSeconds,
        reloadInterval=reloadInterval,
        subjectFrom=subjectFrom,
        logFormat=_choice("log-format", options, environ, LOG_FORMATS),
        ticketKeyRotation=_seconds("ticket-key-rotation", options, environ, 0, 86400),
        algorithm=algorithm,
        keyId=keyId,
        audienceKeyMaterial=audienceKeys,
        bindToken=bindToken,
        retiredKeyFiles=retiredKeys,
        handshakeTimeout=handshakeTimeout,
        requestTimeout=requestTimeout,
        idleTimeout=idleTimeout,
        maxConnections=int(maxConnections),
        policyFile=policyFile,
        crlFiles=crlFiles,
        crlExpired=crlExpired,
        demoListen=demoListen,
        demoIsDevDefault=demoIsDevDefault,
        workers=_workers(options, environ),
    )


def availableCPUs() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _workers(options: Mapping[str, object], environ: Mapping[str, str]) -> int:
    """How many processes serve the listening socket: a whole number, or auto (one per CPU)."""
    text, source = _raw(options, environ, "workers")
    value = (text or "").strip().lower()
    if value == "auto":
        return min(availableCPUs(), MAX_WORKERS)
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_WORKERS:
        raise ConfigError(f"workers {text!r} from {source} must be a whole number from 1 to {MAX_WORKERS}, or auto")
    return int(value)


def argumentsFor(options: Mapping[str, object]) -> list[str]:
    """The options given on the command line, as the arguments that give them again (for worker processes)."""
    arguments: list[str] = []
    for option in OPTIONS:
        value = options.get(option.name)
        if option.name in FLAGS:
            if value:
                arguments.append(f"--{option.name}")
        elif value is not None:
            arguments += [f"--{option.name}", str(value)]
    if options.get("dev"):
        arguments.append("--dev")
    return arguments


def _demoListen(options: Mapping[str, object], environ: Mapping[str, str], dev: bool) -> tuple[str | None, bool]:
    """The diagnostic page's endpoint (None: off) and whether it is only development mode's default."""
    text, source = _raw(options, environ, "demo-port")
    if text is None:
        return (DEV_DEMO_LISTEN, True) if dev else (None, False)
    value = text.strip()
    if not value:
        raise ConfigError(f"the demo port from {source} is empty (use 'off' to disable the diagnostic page)")
    if value.lower() == "off":
        return None, False
    if value.isdigit():
        if int(value) > 65535:
            raise ConfigError(f"demo port {value} from {source} is outside 0-65535")
        return f"tcp:{int(value)}", False
    return value, False


def _clientPolicySettings(
    options: Mapping[str, object], environ: Mapping[str, str]
) -> tuple[str, str | None, tuple[str, ...], str]:
    """Which name becomes sub, the policy file, the CRL files and what an expired CRL means."""
    from tokenissuer.policy import SUBJECT_SOURCES

    subjectFrom = _choice("subject-from", options, environ, SUBJECT_SOURCES)
    policyText, policySource = _raw(options, environ, "policy-file")
    policyFile = policyText.strip() if policyText and policyText.strip() else None
    crlText, _ = _raw(options, environ, "crl")
    crlFiles = tuple((crlText or "").split())
    crlExpired = _choice("crl-expired", options, environ, ("refuse", "accept"))
    return subjectFrom, policyFile, crlFiles, crlExpired


def _seconds(name: str, options: Mapping[str, object], environ: Mapping[str, str], low: float, high: float) -> float:
    text, source = _raw(options, environ, name)
    try:
        value = float((text or "").strip())
    except ValueError:
        raise ConfigError(f"{name} {text!r} from {source} is not a number of seconds") from None
    if not low <= value <= high:  # also refuses NaN
        raise ConfigError(f"{name} {value:g} from {source} is outside {low:g}-{high:g} seconds")
    return value
