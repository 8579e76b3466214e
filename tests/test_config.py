"""
Tests for L{tokenissuer.config} (options, environment and defaults resolved
into checked settings) and L{tokenissuer.devpki} (the development PKI).

Every test passes an explicit environment, so the real C{os.environ} of the
machine running the tests cannot change the outcome.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from twisted.trial.unittest import SynchronousTestCase

from tokenissuer.config import DEV_LISTEN, ConfigError, IssuerOptions, Settings, resolveSettings
from tokenissuer.devpki import DevFiles, ensureDevFiles

SECRET = "a-test-hmac-secret-that-is-long-enough-1234"
ENV = {"TOK_ISS_HMAC_SECRET": SECRET}


def _options(*argv: str) -> IssuerOptions:
    options = IssuerOptions()
    options.parseOptions(list(argv))
    return options


def _resolve(argv: list[str] | None = None, **environ: str) -> Settings:
    """Resolve settings from a command line and an environment holding a valid key."""
    return resolveSettings(_options(*(argv or [])), {**ENV, **environ})


def _loadCertificate(path: str) -> x509.Certificate:
    with open(path, "rb") as handle:
        return x509.load_pem_x509_certificate(handle.read())


class DefaultTests(SynchronousTestCase):
    """
    With nothing configured but a key, the defaults match the original issuer's,
    so existing deployments keep working.
    """

    def setUp(self) -> None:
        self.settings = _resolve()

    def test_listen(self) -> None:
        """The default endpoint is TCP port 4443."""
        self.assertEqual(self.settings.listen, "tcp:4443")

    def test_cert(self) -> None:
        """The server certificate defaults to server.crt."""
        self.assertEqual(self.settings.cert, "server.crt")

    def test_key(self) -> None:
        """The server key defaults to server.pem."""
        self.assertEqual(self.settings.key, "server.pem")

    def test_clientCA(self) -> None:
        """The client CA bundle defaults to private-tls-ca.pem."""
        self.assertEqual(self.settings.clientCA, "private-tls-ca.pem")

    def test_issuer(self) -> None:
        """The iss claim defaults to the original issuer's name."""
        self.assertEqual(self.settings.issuer, "daheim_token_issuer")

    def test_ttl(self) -> None:
        """Tokens live an hour by default."""
        self.assertEqual(self.settings.ttl, 3600)

    def test_clientAuth(self) -> None:
        """Client certificates are checked per request by default."""
        self.assertEqual(self.settings.clientAuth, "optional")

    def test_audiences(self) -> None:
        """No audience list means any audience may be requested."""
        self.assertIsNone(self.settings.audiences)

    def test_origins(self) -> None:
        """No cross-origin caller is allowed unless configured."""
        self.assertEqual(self.settings.origins.patterns, ())
        self.assertFalse(self.settings.origins.isAllowed("http://localhost:3000"))

    def test_notDev(self) -> None:
        """Development mode is off by default."""
        self.assertFalse(self.settings.dev)


class EnvironmentTests(SynchronousTestCase):
    """
    Every option reads the original issuer's environment variable, so its
    deployment manifests work unchanged.
    """

    def test_listen(self) -> None:
        """TOK_ISS_LISTEN sets the endpoint."""
        self.assertEqual(_resolve(TOK_ISS_LISTEN="tcp:8443").listen, "tcp:8443")

    def test_cert(self) -> None:
        """TOK_ISS_FILE_CERT sets the server certificate path."""
        self.assertEqual(_resolve(TOK_ISS_FILE_CERT="/etc/tls/c.crt").cert, "/etc/tls/c.crt")

    def test_key(self) -> None:
        """TOK_ISS_FILE_KEY sets the server key path."""
        self.assertEqual(_resolve(TOK_ISS_FILE_KEY="/etc/tls/k.pem").key, "/etc/tls/k.pem")

    def test_clientCA(self) -> None:
        """TOK_ISS_FILE_ROOT sets the client CA bundle path."""
        self.assertEqual(_resolve(TOK_ISS_FILE_ROOT="/etc/tls/ca.pem").clientCA, "/etc/tls/ca.pem")

    def test_issuer(self) -> None:
        """TOK_ISS_NAME sets the iss claim."""
        self.assertEqual(_resolve(TOK_ISS_NAME="other_issuer").issuer, "other_issuer")

    def test_audiences(self) -> None:
        """TOK_ISS_ALLOWED_AUDIENCES is a space-separated list."""
        settings = _resolve(TOK_ISS_ALLOWED_AUDIENCES="svc-a  svc-b\tsvc-c")
        self.assertEqual(settings.audiences, frozenset({"svc-a", "svc-b", "svc-c"}))

    def test_origins(self) -> None:
        """TOK_ISS_ALLOWED_ORIGINS is a space-separated list of origins."""
        settings = _resolve(TOK_ISS_ALLOWED_ORIGINS="https://a.example.org http://localhost:*")
        self.assertTrue(settings.origins.isAllowed("https://a.example.org"))
        self.assertTrue(settings.origins.isAllowed("http://localhost:3000"))
        self.assertFalse(settings.origins.isAllowed("https://b.example.org"))

    def test_ttl(self) -> None:
        """TOK_ISS_TOKEN_TTL sets the lifetime in seconds."""
        self.assertEqual(_resolve(TOK_ISS_TOKEN_TTL="120").ttl, 120)

    def test_clientAuth(self) -> None:
        """TOK_ISS_CLIENT_AUTH selects the client-auth mode."""
        self.assertEqual(_resolve(TOK_ISS_CLIENT_AUTH="required").clientAuth, "required")

    def test_unrelatedVariablesIgnored(self) -> None:
        """Variables without the exact names have no effect."""
        self.assertEqual(_resolve(TOK_ISS_TTL="5", tok_iss_listen="tcp:1").ttl, 3600)
        self.assertEqual(_resolve(tok_iss_listen="tcp:1").listen, "tcp:4443")


class CommandLineWinsTests(SynchronousTestCase):
    """
    An option given on the command line overrides the environment, so one run
    can be adjusted without editing the manifest.
    """

    def test_listen(self) -> None:
        """--listen beats TOK_ISS_LISTEN."""
        self.assertEqual(_resolve(["--listen", "tcp:1111"], TOK_ISS_LISTEN="tcp:2222").listen, "tcp:1111")

    def test_cert(self) -> None:
        """--cert beats TOK_ISS_FILE_CERT."""
        self.assertEqual(_resolve(["--cert", "cli.crt"], TOK_ISS_FILE_CERT="env.crt").cert, "cli.crt")

    def test_key(self) -> None:
        """--key beats TOK_ISS_FILE_KEY."""
        self.assertEqual(_resolve(["--key", "cli.pem"], TOK_ISS_FILE_KEY="env.pem").key, "cli.pem")

    def test_clientCA(self) -> None:
        """--client-ca beats TOK_ISS_FILE_ROOT."""
        self.assertEqual(_resolve(["--client-ca", "cli-ca.pem"], TOK_ISS_FILE_ROOT="env-ca.pem").clientCA, "cli-ca.pem")

    def test_issuer(self) -> None:
        """--issuer beats TOK_ISS_NAME."""
        self.assertEqual(_resolve(["--issuer", "cli"], TOK_ISS_NAME="env").issuer, "cli")

    def test_audiences(self) -> None:
        """--audiences replaces, not extends, TOK_ISS_ALLOWED_AUDIENCES."""
        settings = _resolve(["--audiences", "cli"], TOK_ISS_ALLOWED_AUDIENCES="env")
        self.assertEqual(settings.audiences, frozenset({"cli"}))

    def test_origins(self) -> None:
        """--origins replaces TOK_ISS_ALLOWED_ORIGINS."""
        settings = _resolve(["--origins", "https://cli.example.org"], TOK_ISS_ALLOWED_ORIGINS="https://env.example.org")
        self.assertTrue(settings.origins.isAllowed("https://cli.example.org"))
        self.assertFalse(settings.origins.isAllowed("https://env.example.org"))

    def test_ttl(self) -> None:
        """--ttl beats TOK_ISS_TOKEN_TTL."""
        self.assertEqual(_resolve(["--ttl", "60"], TOK_ISS_TOKEN_TTL="120").ttl, 60)

    def test_clientAuth(self) -> None:
        """--client-auth beats TOK_ISS_CLIENT_AUTH."""
        self.assertEqual(_resolve(["--client-auth", "optional"], TOK_ISS_CLIENT_AUTH="required").clientAuth, "optional")

    def test_ttlAndAudiencesFromArgv(self) -> None:
        """Parsed options feed resolveSettings directly."""
        options = IssuerOptions()
        options.parseOptions(["--ttl", "60", "--audiences", "a b"])
        settings = resolveSettings(options, {**ENV})
        self.assertEqual(settings.ttl, 60)
        self.assertEqual(settings.audiences, frozenset({"a", "b"}))


class HmacKeyTests(SynchronousTestCase):
    """
    The HMAC key comes from a file or the environment, must be long enough, and
    never appears in messages or reprs.
    """

    def _writeKeyFile(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def test_fromEnvironment(self) -> None:
        """TOK_ISS_HMAC_SECRET's value is the key."""
        self.assertEqual(_resolve().hmacKey, SECRET.encode("utf-8"))

    def test_environmentUTF8(self) -> None:
        """The key is the UTF-8 encoding of the variable, counted in bytes."""
        secret = "\u00e9" * 16  # 16 characters, 32 bytes
        settings = resolveSettings(_options(), {"TOK_ISS_HMAC_SECRET": secret})
        self.assertEqual(settings.hmacKey, secret.encode("utf-8"))

    def test_fromFileOption(self) -> None:
        """--hmac-secret-file names a file whose bytes are the key."""
        key = b"k" * 40
        settings = resolveSettings(_options("--hmac-secret-file", self._writeKeyFile(key)), {})
        self.assertEqual(settings.hmacKey, key)

    def test_fromFileEnvironment(self) -> None:
        """TOK_ISS_HMAC_SECRET_FILE works like --hmac-secret-file."""
        key = b"e" * 40
        settings = resolveSettings(_options(), {"TOK_ISS_HMAC_SECRET_FILE": self._writeKeyFile(key)})
        self.assertEqual(settings.hmacKey, key)

    def test_fileOptionBeatsFileEnvironment(self) -> None:
        """--hmac-secret-file beats TOK_ISS_HMAC_SECRET_FILE."""
        cliPath, envPath = self._writeKeyFile(b"c" * 40), self._writeKeyFile(b"e" * 40)
        settings = resolveSettings(_options("--hmac-secret-file", cliPath), {"TOK_ISS_HMAC_SECRET_FILE": envPath})
        self.assertEqual(settings.hmacKey, b"c" * 40)

    def test_fileBeatsSecretVariable(self) -> None:
        """A key file wins over TOK_ISS_HMAC_SECRET."""
        path = self._writeKeyFile(b"f" * 40)
        settings = resolveSettings(_options("--hmac-secret-file", path), {**ENV})
        self.assertEqual(settings.hmacKey, b"f" * 40)

    def test_fileEnvironmentBeatsSecretVariable(self) -> None:
        """TOK_ISS_HMAC_SECRET_FILE also wins over TOK_ISS_HMAC_SECRET."""
        path = self._writeKeyFile(b"f" * 40)
        settings = resolveSettings(_options(), {**ENV, "TOK_ISS_HMAC_SECRET_FILE": path})
        self.assertEqual(settings.hmacKey, b"f" * 40)

    def test_fileTrailingNewlineStripped(self) -> None:
        """The newline left by editors and echo is not part of the key."""
        path = self._writeKeyFile(b"k" * 40 + b"\n")
        self.assertEqual(resolveSettings(_options("--hmac-secret-file", path), {}).hmacKey, b"k" * 40)

    def test_fileOnlyOneNewlineStripped(self) -> None:
        """Only one trailing newline is stripped; the rest is key material."""
        path = self._writeKeyFile(b"k" * 40 + b"\n\n")
        self.assertEqual(resolveSettings(_options("--hmac-secret-file", path), {}).hmacKey, b"k" * 40 + b"\n")

    def test_fileCRLFStripped(self) -> None:
        """A Windows line ending counts as the one trailing newline."""
        path = self._writeKeyFile(b"k" * 40 + b"\r\n")
        self.assertEqual(resolveSettings(_options("--hmac-secret-file", path), {}).hmacKey, b"k" * 40)

    def test_fileMissing(self) -> None:
        """A missing key file is a ConfigError naming the file."""
        path = self.mktemp()
        error = self.assertRaises(ConfigError, resolveSettings, _options("--hmac-secret-file", path), {**ENV})
        self.assertIn(path, str(error))

    def test_noKey(self) -> None:
        """Without any key the service refuses to start."""
        self.assertRaises(ConfigError, resolveSettings, _options(), {})

    def test_shortEnvironmentKey(self) -> None:
        """A 31-byte key is refused, and the message does not show it."""
        secret = "Zebra-Secret-Xylophone-Quokka99"
        self.assertEqual(len(secret.encode("utf-8")), 31)
        error = self.assertRaises(ConfigError, resolveSettings, _options(), {"TOK_ISS_HMAC_SECRET": secret})
        self.assertNotIn(secret, str(error))
        self.assertNotIn("Zebra", str(error))

    def test_shortFileKey(self) -> None:
        """A 31-byte key file is refused, and the message does not show the key."""
        secret = b"Zebra-Secret-Xylophone-Quokka99"
        path = self._writeKeyFile(secret + b"\n")
        error = self.assertRaises(ConfigError, resolveSettings, _options("--hmac-secret-file", path), {})
        self.assertNotIn("Zebra", str(error))

    def test_exactly32Bytes(self) -> None:
        """32 bytes is the minimum and is accepted."""
        settings = resolveSettings(_options(), {"TOK_ISS_HMAC_SECRET": "x" * 32})
        self.assertEqual(len(settings.hmacKey), 32)

    def test_reprHidesKey(self) -> None:
        """repr(Settings) may be logged; the key is not in it."""
        text = repr(_resolve())
        self.assertNotIn(SECRET, text)
        self.assertNotIn(repr(SECRET.encode("utf-8")), text)


class ValidationTests(SynchronousTestCase):
    """
    Bad values stop start-up with a one-line ConfigError rather than surfacing
    later as odd behaviour.
    """

    def assertBadTtl(self, text: str) -> None:
        error = self.assertRaises(ConfigError, resolveSettings, _options(), {**ENV, "TOK_ISS_TOKEN_TTL": text})
        self.assertIn("TOK_ISS_TOKEN_TTL", str(error))

    def test_ttlNotNumber(self) -> None:
        """A ttl that is not a number is refused."""
        self.assertBadTtl("abc")

    def test_ttlFraction(self) -> None:
        """A ttl must be whole seconds."""
        self.assertBadTtl("1.5")

    def test_ttlZero(self) -> None:
        """A zero ttl would mint expired tokens."""
        self.assertBadTtl("0")

    def test_ttlNegative(self) -> None:
        """A negative ttl is refused."""
        self.assertBadTtl("-5")

    def test_ttlTooLong(self) -> None:
        """More than a day is refused."""
        self.assertBadTtl("86401")

    def test_ttlBounds(self) -> None:
        """1 second and exactly one day are accepted."""
        self.assertEqual(_resolve(TOK_ISS_TOKEN_TTL="1").ttl, 1)
        self.assertEqual(_resolve(TOK_ISS_TOKEN_TTL="86400").ttl, 86400)

    def test_ttlOptionError(self) -> None:
        """A bad --ttl names the option in the message."""
        error = self.assertRaises(ConfigError, resolveSettings, _options("--ttl", "0"), {**ENV})
        self.assertIn("--ttl", str(error))

    def test_clientAuthUnknown(self) -> None:
        """Only optional and required exist."""
        self.assertRaises(ConfigError, resolveSettings, _options(), {**ENV, "TOK_ISS_CLIENT_AUTH": "maybe"})

    def test_clientAuthCaseInsensitive(self) -> None:
        """REQUIRED is read as required."""
        self.assertEqual(_resolve(TOK_ISS_CLIENT_AUTH="REQUIRED").clientAuth, "required")

    def test_badOrigin(self) -> None:
        """A bad origin is refused and the message names it."""
        error = self.assertRaises(
            ConfigError,
            resolveSettings,
            _options(),
            {**ENV, "TOK_ISS_ALLOWED_ORIGINS": "https://ok.example.org https://bad.example.org/"},
        )
        self.assertIn("https://bad.example.org/", str(error))

    def test_wildcardOrigin(self) -> None:
        """* is refused as an allowed origin."""
        self.assertRaises(ConfigError, resolveSettings, _options("--origins", "*"), {**ENV})

    def test_listenSSL(self) -> None:
        """tokenissuer adds TLS itself, so an ssl: endpoint would double-wrap it."""
        self.assertRaises(ConfigError, resolveSettings, _options("--listen", "ssl:443"), {**ENV})

    def test_listenTLSUppercase(self) -> None:
        """The endpoint type is matched case-insensitively."""
        self.assertRaises(ConfigError, resolveSettings, _options(), {**ENV, "TOK_ISS_LISTEN": "TLS:443"})

    def test_listenEmpty(self) -> None:
        """An empty endpoint is refused."""
        self.assertRaises(ConfigError, resolveSettings, _options(), {**ENV, "TOK_ISS_LISTEN": " "})

    def test_issuerEmpty(self) -> None:
        """An empty issuer name is refused."""
        self.assertRaises(ConfigError, resolveSettings, _options(), {**ENV, "TOK_ISS_NAME": " "})


class HelpTests(SynchronousTestCase):
    """
    --help documents each environment variable, because they are the main way
    the service is configured in containers.
    """

    def test_namesEveryVariable(self) -> None:
        """Every TOK_ISS_ variable appears as a whole word in the help text."""
        text = str(IssuerOptions())
        for name in (
            "TOK_ISS_LISTEN",
            "TOK_ISS_FILE_CERT",
            "TOK_ISS_FILE_KEY",
            "TOK_ISS_FILE_ROOT",
            "TOK_ISS_HMAC_SECRET",
            "TOK_ISS_HMAC_SECRET_FILE",
            "TOK_ISS_NAME",
            "TOK_ISS_ALLOWED_AUDIENCES",
            "TOK_ISS_ALLOWED_ORIGINS",
            "TOK_ISS_TOKEN_TTL",
            "TOK_ISS_CLIENT_AUTH",
            "TOK_ISS_DEV_DIR",
        ):
            self.assertTrue(re.search(rf"\b{name}\b", text), name)


class DevModeTests(SynchronousTestCase):
    """
    --dev uses the throwaway PKI and key in its folder and allows local web
    origins, so a developer needs no configuration.
    """

    def setUp(self) -> None:
        self.folder = self.mktemp()
        self.files, _ = ensureDevFiles(self.folder)
        self.settings = resolveSettings({"dev": True, "dev-dir": self.folder}, {})

    def test_dev(self) -> None:
        """The settings record development mode and its folder."""
        self.assertTrue(self.settings.dev)
        self.assertEqual(self.settings.devDir, self.folder)

    def test_files(self) -> None:
        """Certificate, key and client CA come from the dev folder."""
        self.assertEqual(
            (self.settings.cert, self.settings.key, self.settings.clientCA),
            (self.files.serverCert, self.files.serverKey, self.files.caCert),
        )

    def test_hmacKey(self) -> None:
        """The HMAC key is the dev folder's key file."""
        with open(self.files.hmacKey, "rb") as handle:
            self.assertEqual(self.settings.hmacKey, handle.read().rstrip(b"\n"))
        self.assertGreaterEqual(len(self.settings.hmacKey), 32)

    def test_listen(self) -> None:
        """Development mode listens on loopback only."""
        self.assertEqual(self.settings.listen, DEV_LISTEN)
        self.assertIn("127.0.0.1", self.settings.listen)

    def test_localOrigins(self) -> None:
        """Any port on http://localhost and http://127.0.0.1 may call cross-origin."""
        for origin in ("http://localhost:3000", "http://localhost:8000", "http://127.0.0.1:5173", "http://127.0.0.1"):
            self.assertTrue(self.settings.origins.isAllowed(origin), origin)

    def test_otherOriginsRefused(self) -> None:
        """Only those two local http origins are added."""
        for origin in ("https://localhost:3000", "http://example.org", "http://[::1]:3000"):
            self.assertFalse(self.settings.origins.isAllowed(origin), origin)

    def test_reprHidesKey(self) -> None:
        """The dev key is kept out of repr(Settings) too."""
        self.assertNotIn(self.settings.hmacKey.decode("ascii"), repr(self.settings))


class DevFilesTests(SynchronousTestCase):
    """
    ensureDevFiles creates a usable, private, stable PKI for development and tests.
    """

    def setUp(self) -> None:
        self.folder = self.mktemp()
        self.files, self.created = ensureDevFiles(self.folder)

    def test_created(self) -> None:
        """The first call reports that it created the files."""
        self.assertTrue(self.created)

    def test_allFilesExist(self) -> None:
        """Every listed file is written."""
        for path in self.files.all():
            self.assertTrue(os.path.isfile(path), path)

    def test_paths(self) -> None:
        """The files sit inside the given folder."""
        self.assertEqual(self.files, DevFiles(self.folder))
        for path in self.files.all():
            self.assertEqual(os.path.dirname(path), self.folder)

    def test_privateFilesMode0600(self) -> None:
        """Private keys, the PKCS#12 bundle and the HMAC key are readable by the owner only."""
        for path in (self.files.serverKey, self.files.clientKey, self.files.clientP12, self.files.hmacKey):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)

    def test_idempotent(self) -> None:
        """A second call creates nothing and leaves the files unchanged."""
        before = {}
        for path in self.files.all():
            with open(path, "rb") as handle:
                before[path] = (handle.read(), os.stat(path).st_mtime_ns)
        files, created = ensureDevFiles(self.folder)
        self.assertFalse(created)
        self.assertEqual(files, self.files)
        for path in self.files.all():
            with open(path, "rb") as handle:
                self.assertEqual((handle.read(), os.stat(path).st_mtime_ns), before[path], path)

    def _verifier(self) -> PolicyBuilder:
        return PolicyBuilder().store(Store([_loadCertificate(self.files.caCert)]))

    def test_serverCertificateLocalhost(self) -> None:
        """The server certificate passes strict RFC 5280 validation for localhost."""
        server = _loadCertificate(self.files.serverCert)
        self._verifier().build_server_verifier(x509.DNSName("localhost")).verify(server, [])

    def test_serverCertificateLoopbackAddress(self) -> None:
        """The server certificate is also valid for https://127.0.0.1."""
        server = _loadCertificate(self.files.serverCert)
        subject = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        self._verifier().build_server_verifier(subject).verify(server, [])

    def test_clientCertificate(self) -> None:
        """The client certificate passes strict RFC 5280 client validation."""
        client = _loadCertificate(self.files.clientCert)
        self._verifier().build_client_verifier().verify(client, [])

    def test_serverKeyMatches(self) -> None:
        """The server key belongs to the server certificate."""
        from tokenissuer.pemfiles import loadServerIdentity

        identity = loadServerIdentity(self.files.serverCert, self.files.serverKey)
        self.assertEqual(identity.leaf, _loadCertificate(self.files.serverCert))

    def test_hmacKeyLongEnough(self) -> None:
        """The generated HMAC key is long enough for HS256."""
        with open(self.files.hmacKey, "rb") as handle:
            self.assertGreaterEqual(len(handle.read()), 32)
