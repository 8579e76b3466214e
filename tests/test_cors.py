"""
Tests for L{tokenissuer.cors}: which origins may read tokens cross-origin.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tokenissuer.cors import CorsPolicy, OriginError, OriginPattern, parseOriginPattern


class ParseOriginPatternTests(SynchronousTestCase):
    """
    Configured origins are checked strictly so a typo fails at start-up instead
    of silently allowing nothing (or too much).
    """

    def test_https(self) -> None:
        """A plain https origin parses with the default port."""
        self.assertEqual(parseOriginPattern("https://app.example.org"), OriginPattern("https", "app.example.org", None))

    def test_httpWithPort(self) -> None:
        """An explicit non-default port is kept."""
        self.assertEqual(parseOriginPattern("http://localhost:8000"), OriginPattern("http", "localhost", "8000"))

    def test_wildcardPort(self) -> None:
        """Port * is allowed in configuration, for development servers."""
        self.assertEqual(parseOriginPattern("http://localhost:*"), OriginPattern("http", "localhost", "*"))

    def test_ipv6(self) -> None:
        """A bracketed IPv6 literal with a port parses."""
        self.assertEqual(parseOriginPattern("http://[::1]:8080"), OriginPattern("http", "[::1]", "8080"))

    def test_ipv4(self) -> None:
        """A dotted IPv4 address is a host."""
        self.assertEqual(parseOriginPattern("http://127.0.0.1:5173"), OriginPattern("http", "127.0.0.1", "5173"))

    def test_httpsDefaultPortNormalised(self) -> None:
        """https://x:443 is the same origin as https://x."""
        self.assertEqual(parseOriginPattern("https://x:443"), parseOriginPattern("https://x"))

    def test_httpDefaultPortNormalised(self) -> None:
        """http://x:80 is the same origin as http://x."""
        self.assertEqual(parseOriginPattern("http://x:80"), parseOriginPattern("http://x"))

    def test_otherSchemesDefaultNotNormalised(self) -> None:
        """Port 443 is only the default for https, not for http."""
        self.assertEqual(parseOriginPattern("http://x:443").port, "443")

    def test_str(self) -> None:
        """str() gives back the origin, for start-up logs."""
        self.assertEqual(str(parseOriginPattern("http://localhost:*")), "http://localhost:*")
        self.assertEqual(str(parseOriginPattern("https://x:443")), "https://x")

    def assertRejected(self, text: str) -> None:
        self.assertRaises(OriginError, parseOriginPattern, text)

    def test_rejectsStar(self) -> None:
        """A bare * would allow every site; it is never accepted."""
        self.assertRejected("*")

    def test_rejectsNull(self) -> None:
        """The opaque origin null is shared by sandboxed pages and files."""
        self.assertRejected("null")

    def test_rejectsEmpty(self) -> None:
        """An empty entry is an error, not 'nothing'."""
        self.assertRejected("")

    def test_rejectsTrailingSlash(self) -> None:
        """Browsers never send a slash, so such an entry would never match."""
        self.assertRejected("https://x/")

    def test_rejectsPath(self) -> None:
        """An origin has no path."""
        self.assertRejected("https://x/path")

    def test_rejectsOtherScheme(self) -> None:
        """Only http and https origins make sense."""
        self.assertRejected("ftp://x")

    def test_rejectsUppercase(self) -> None:
        """Browsers send lower-case hosts, so an upper-case entry would never match."""
        self.assertRejected("https://X.org")

    def test_rejectsPortOutOfRange(self) -> None:
        """Ports above 65535 do not exist."""
        self.assertRejected("https://x:99999")

    def test_rejectsPortZero(self) -> None:
        """Port 0 is not a port a browser can use."""
        self.assertRejected("https://x:0")

    def test_rejectsLeadingSpace(self) -> None:
        """Surrounding whitespace is a configuration mistake."""
        self.assertRejected(" https://x")

    def test_rejectsTrailingSpace(self) -> None:
        """Trailing whitespace is a configuration mistake too."""
        self.assertRejected("https://x ")

    def test_rejectsUserinfo(self) -> None:
        """user@host is a URL, not an origin."""
        self.assertRejected("https://user@x")

    def test_rejectsMissingScheme(self) -> None:
        """A bare host is not an origin."""
        self.assertRejected("app.example.org")

    def test_rejectsWildcardHost(self) -> None:
        """There are no wildcard subdomains."""
        self.assertRejected("https://*.example.org")


class IsAllowedTests(SynchronousTestCase):
    """
    An Origin header is allowed only on an exact match, so no near-miss site can
    read a token.
    """

    def setUp(self) -> None:
        self.policy = CorsPolicy.fromStrings(["https://app.example.org", "http://localhost:*", "http://[::1]:8080"])

    def test_exactMatch(self) -> None:
        """The configured origin itself is allowed."""
        self.assertTrue(self.policy.isAllowed("https://app.example.org"))

    def test_explicitDefaultPort(self) -> None:
        """An explicit default port names the same origin."""
        self.assertTrue(self.policy.isAllowed("https://app.example.org:443"))

    def test_differentScheme(self) -> None:
        """http is a different origin from https."""
        self.assertFalse(self.policy.isAllowed("http://app.example.org"))

    def test_differentHost(self) -> None:
        """Another host is not allowed."""
        self.assertFalse(self.policy.isAllowed("https://evil.example.org"))

    def test_differentPort(self) -> None:
        """Another port on the same host is another origin."""
        self.assertFalse(self.policy.isAllowed("https://app.example.org:8443"))

    def test_subdomain(self) -> None:
        """A subdomain of an allowed host is not allowed."""
        self.assertFalse(self.policy.isAllowed("https://evil.app.example.org"))

    def test_suffixHost(self) -> None:
        """A host merely ending in the allowed name is not allowed."""
        self.assertFalse(self.policy.isAllowed("https://app.example.org.evil.com"))

    def test_trailingSlash(self) -> None:
        """An allowed origin with a trailing slash is not a valid Origin value."""
        self.assertFalse(self.policy.isAllowed("https://app.example.org/"))

    def test_uppercase(self) -> None:
        """Browsers serialise origins in lower case; anything else is not one."""
        self.assertFalse(self.policy.isAllowed("https://APP.example.org"))

    def test_wildcardPortAnyPort(self) -> None:
        """http://localhost:* allows every port on http://localhost."""
        for origin in ("http://localhost:3000", "http://localhost:8000", "http://localhost:65535"):
            self.assertTrue(self.policy.isAllowed(origin), origin)

    def test_wildcardPortDefaultPort(self) -> None:
        """http://localhost:* includes the default port 80."""
        self.assertTrue(self.policy.isAllowed("http://localhost"))

    def test_wildcardPortNotHttps(self) -> None:
        """http://localhost:* does not allow https://localhost."""
        self.assertFalse(self.policy.isAllowed("https://localhost:3000"))

    def test_wildcardPortNotOtherHost(self) -> None:
        """http://localhost:* does not allow other hosts, even loopback ones."""
        self.assertFalse(self.policy.isAllowed("http://127.0.0.1:3000"))
        self.assertFalse(self.policy.isAllowed("http://localhost.evil.com:3000"))

    def test_wildcardNotAcceptedInHeader(self) -> None:
        """An Origin header of http://localhost:* is garbage, not a match-all."""
        self.assertFalse(self.policy.isAllowed("http://localhost:*"))

    def test_ipv6(self) -> None:
        """A bracketed IPv6 origin matches exactly."""
        self.assertTrue(self.policy.isAllowed("http://[::1]:8080"))
        self.assertFalse(self.policy.isAllowed("http://[::1]:8081"))

    def test_null(self) -> None:
        """null (sandboxed iframes, file: pages) is never allowed."""
        self.assertFalse(self.policy.isAllowed("null"))

    def test_star(self) -> None:
        """* is not an origin."""
        self.assertFalse(self.policy.isAllowed("*"))

    def test_garbage(self) -> None:
        """Malformed values are refused without raising."""
        for origin in ("", " ", "https://", "https:/app.example.org", "app.example.org", "https://app.example.org:x"):
            self.assertFalse(self.policy.isAllowed(origin), origin)

    def test_withPath(self) -> None:
        """An allowed origin followed by a path is not an origin."""
        self.assertFalse(self.policy.isAllowed("https://app.example.org/path"))

    def test_emptyPolicy(self) -> None:
        """With no origins configured, nothing is allowed."""
        policy = CorsPolicy.fromStrings([])
        self.assertFalse(policy.isAllowed("https://app.example.org"))
        self.assertFalse(policy.isAllowed("http://localhost:3000"))

    def test_fromStringsRejectsBad(self) -> None:
        """One bad entry fails the whole configuration."""
        self.assertRaises(OriginError, CorsPolicy.fromStrings, ["https://ok.example.org", "*"])

    def test_str(self) -> None:
        """str() lists the origins, or says none."""
        self.assertEqual(str(CorsPolicy.fromStrings([])), "(none)")
        self.assertEqual(str(self.policy), "https://app.example.org http://localhost:* http://[::1]:8080")


class HeaderTests(SynchronousTestCase):
    """
    Allowed origins are echoed with credentials; a wildcard would be both unsafe
    and, with credentials, refused by browsers.
    """

    def setUp(self) -> None:
        self.policy = CorsPolicy.fromStrings(["https://app.example.org", "http://localhost:*"])

    def test_echoesOrigin(self) -> None:
        """Access-Control-Allow-Origin is the request's origin."""
        headers = dict(self.policy.responseHeaders("https://app.example.org"))
        self.assertEqual(headers[b"Access-Control-Allow-Origin"], b"https://app.example.org")

    def test_echoesWildcardMatchedOrigin(self) -> None:
        """For a port-wildcard match the concrete origin is echoed, not the pattern."""
        headers = dict(self.policy.responseHeaders("http://localhost:3000"))
        self.assertEqual(headers[b"Access-Control-Allow-Origin"], b"http://localhost:3000")

    def test_neverStar(self) -> None:
        """No header value is *."""
        for _, value in self.policy.responseHeaders("https://app.example.org") + self.policy.preflightHeaders():
            self.assertNotEqual(value.strip(), b"*")

    def test_credentials(self) -> None:
        """Credentials (the client certificate) are allowed."""
        headers = dict(self.policy.responseHeaders("https://app.example.org"))
        self.assertEqual(headers[b"Access-Control-Allow-Credentials"], b"true")

    def test_headersAreBytes(self) -> None:
        """Names and values are bytes, as Twisted's request.setHeader wants."""
        for name, value in self.policy.responseHeaders("https://app.example.org") + self.policy.preflightHeaders():
            self.assertIsInstance(name, bytes)
            self.assertIsInstance(value, bytes)

    def test_preflightMethods(self) -> None:
        """Only POST is offered."""
        headers = dict(self.policy.preflightHeaders())
        self.assertEqual(headers[b"Access-Control-Allow-Methods"], b"POST")

    def test_preflightHeaders(self) -> None:
        """The headers the browser client sends are allowed."""
        headers = dict(self.policy.preflightHeaders())
        allowed = {part.strip().lower() for part in headers[b"Access-Control-Allow-Headers"].split(b",")}
        self.assertIn(b"content-type", allowed)
        self.assertIn(b"accept", allowed)

    def test_preflightMaxAge(self) -> None:
        """A positive Max-Age lets browsers cache the preflight."""
        headers = dict(self.policy.preflightHeaders())
        self.assertIn(b"Access-Control-Max-Age", headers)
        self.assertGreater(int(headers[b"Access-Control-Max-Age"]), 0)
