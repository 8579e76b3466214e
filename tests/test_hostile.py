"""
A hostile-input corpus against a running issuer, sent the way an attacker would:
raw bytes over real TLS (the standard library's ssl module, with a valid client
certificate, so every request reaches the HTTP layer) or raw TCP on the TLS port,
on loopback.

Every case must end in a clear 4xx (a JSON error where the service answers
itself; Twisted's own bare "400 Bad Request" where HTTP cannot be parsed) or a
clean close: never a 2xx, never a 5xx, never a traceback, never a hang. After
every batch a good client still gets a token, nothing was minted for a hostile
case, and the captured log holds neither the HMAC key nor any token.

The issuer runs with 1 s request and handshake deadlines and a 2 s idle
timeout, so the slow cases (slowloris, stalled handshakes) finish quickly.
"""

from __future__ import annotations

import datetime
import json
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tokenissuer import devpki

from .support import TEST_HMAC_KEY, Client, LogCapture, TestPKI, startIssuer
from .test_policy import makeCRL

GOOD_BODY = b'{"audience": "gschmarri"}'
#: A case's answer (or close) must arrive within this many seconds.
CASE_SECONDS = 6.0
#: Cases that run in parallel (slow ones wait on the service's deadlines).
PARALLEL = 8
#: status 0 stands for "the connection was closed without an HTTP answer".
CLOSED = 0
#: What a line over Twisted's LineReceiver.MAX_LENGTH (16 KiB) gets today: a 408 at
#: the request deadline (see OverlongLineTests, which wants it refused at once).
OVERLONG_LINE = (400, 408, CLOSED)


# --- building requests ----------------------------------------------------


def request(
    method: bytes = b"POST",
    path: bytes = b"/jwthmac/issue",
    body: bytes | None = GOOD_BODY,
    headers: Sequence[tuple[bytes, bytes]] = (),
    contentType: bytes | None = b"application/json",
    contentLength: bool = True,
    version: bytes = b"HTTP/1.1",
    host: bytes | None = b"localhost",
) -> bytes:
    """Raw request bytes; C{headers} are appended verbatim (so they may be malformed)."""
    lines = [method + b" " + path + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    if contentType is not None:
        lines.append(b"Content-Type: " + contentType)
    for name, value in headers:
        lines.append(name + b": " + value if value is not None else name)
    if body is not None and contentLength:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def declared(length: int, body: bytes) -> bytes:
    """A request that declares a C{length}-byte body but sends only C{body} (the service answers at once)."""
    return withHead(ISSUE_HEAD + b"Content-Length: %d" % length, body)


def chunked(*chunks: bytes, last: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + last


def withHead(head: bytes, body: bytes) -> bytes:
    """A request head (request line and header lines, without the blank line) and a body."""
    return head + b"\r\n\r\n" + body


@dataclass(frozen=True)
class Case:
    """One hostile input and what answers it may get."""

    name: str
    #: The bytes to send, or a list of bytes and pauses (seconds) for slow senders.
    send: bytes | tuple[bytes | float, ...]
    #: Allowed statuses of the first answer (CLOSED: no answer, connection closed).
    statuses: frozenset[int]
    #: The JSON error code the first answer must carry, if fixed.
    code: str | None = None
    #: "tls" with the good client certificate, "anonymous" TLS without one, "tcp" raw, or a custom driver.
    transport: str = "tls"
    head: bool = False
    answers: int = 1
    driver: Callable[[int, Any], Outcome] | None = field(default=None, compare=False)


def case(
    name: str,
    send: bytes | tuple[bytes | float, ...],
    statuses: int | Sequence[int],
    code: str | None = None,
    **kw: Any,
) -> Case:
    wanted = frozenset([statuses] if isinstance(statuses, int) else statuses)
    return Case(name, send, wanted, code, **kw)


# --- the corpus -----------------------------------------------------------


def requestLineCases() -> list[Case]:
    bad = [
        (b"blank lines only", b"\r\n\r\n\r\n"),
        (b"method only", b"POST\r\n\r\n"),
        (b"no version", b"POST /jwthmac/issue\r\nHost: localhost\r\n\r\n"),
        (b"extra field", b"POST /jwthmac/issue HTTP/1.1 extra\r\nHost: localhost\r\n\r\n"),
        (b"double space", b"POST  /jwthmac/issue HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        (b"tabs", b"POST\t/jwthmac/issue\tHTTP/1.1\r\nHost: localhost\r\n\r\n"),
        (b"leading space", b" POST /jwthmac/issue HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        (b"trailing space", b"POST /jwthmac/issue HTTP/1.1 \r\nHost: localhost\r\n\r\n"),
        (b"HTTP/2.0", request(version=b"HTTP/2.0")),
        (b"HTTP/0.9", request(version=b"HTTP/0.9")),
        (b"HTTP/1.2", request(version=b"HTTP/1.2")),
        (b"HTTP/1.10", request(version=b"HTTP/1.10")),
        (b"lower-case version", request(version=b"http/1.1")),
        (b"version with NUL", request(version=b"HTTP/1.1\x00")),
        (b"no version number", request(version=b"HTTP/")),
        (b"NUL in path", request(path=b"/jwthmac/\x00issue")),
        (b"8-bit path", request(path=b"/jwthmac/\xffissue")),
        (b"space in path", b"POST /jwthmac/ issue HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        (b"control byte in path", request(path=b"/jwthmac/\x7fissue"), (400, 404)),
        (b"NUL in method", request(method=b"PO\x00ST")),
        (b"parenthesis in method", request(method=b"PO(ST")),
        (b"8-bit method", request(method=b"P\xd6ST")),
        (b"request line over the header limit", request(path=b"/" + b"a" * 9000)),
        (b"request line over the line limit", request(path=b"/" + b"a" * 20000), OVERLONG_LINE),
        (b"empty request-target", b"POST  HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        (b"TLS ClientHello inside TLS", b"\x16\x03\x01\x00\x2a" + b"\x01" * 42 + b"\r\n\r\n"),
        (b"HTTP/2 preface inside TLS", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        (b"binary garbage inside TLS", bytes(range(256)) + b"\r\n\r\n"),
    ]
    cases = [
        case("request line: " + entry[0].decode(), entry[1], entry[2] if len(entry) > 2 else (400, CLOSED))
        for entry in bad
    ]
    return cases


METHODS = [
    b"GET",
    b"PUT",
    b"DELETE",
    b"PATCH",
    b"TRACE",
    b"CONNECT",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"SEARCH",
    b"QUERY",
    b"LINK",
    b"PURGE",
    b"post",
    b"Post",
    b"POSTX",
    b"X-POST",
    b"123",
    b"!#$%&'*+-.^_`|~",
    b"M" * 2000,
]


def methodCases() -> list[Case]:
    cases = []
    for path in (b"/jwthmac/issue", b"/jwt/issue"):
        for method in METHODS:
            cases.append(
                case(
                    f"method {method[:20].decode()} on {path.decode()}",
                    request(method=method, path=path),
                    405,
                    "method_not_allowed",
                )
            )
        cases.append(case(f"method HEAD on {path.decode()}", request(method=b"HEAD", path=path), 405, head=True))
    cases += [
        case("CONNECT authority-form", b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n", (400, 404)),
        case("CONNECT to the issue path with a tunnel body", request(method=b"CONNECT", body=b"\x16\x03\x01"), 405),
        case("TRACE with a cookie to reflect", request(method=b"TRACE", headers=[(b"Cookie", b"s=1")]), 405),
        case(
            "preflight from a foreign origin",
            request(
                method=b"OPTIONS",
                body=None,
                headers=[(b"Origin", b"https://evil.example"), (b"Access-Control-Request-Method", b"POST")],
            ),
            403,
            "origin_not_allowed",
        ),
        case("GET on the root", request(method=b"GET", path=b"/", body=None), 404, "not_found"),
        case("POST on the root", request(path=b"/"), 404, "not_found"),
        case("DELETE on an unknown path", request(method=b"DELETE", path=b"/admin"), 404, "not_found"),
    ]
    return cases


def pathCases() -> list[Case]:
    paths = [
        b"/jwthmac/issue/",
        b"/jwthmac/issue/.",
        b"/jwthmac/issue/..",
        b"/jwthmac/./issue",
        b"/jwthmac/../jwthmac/issue",
        b"/jwt/../jwthmac/issue",
        b"/jwthmac/%2e%2e/jwthmac/issue",
        b"/%2e%2e/jwthmac/issue",
        b"/jwthmac/%2E/issue",
        b"/jwthmac%2fissue",
        b"/jwthmac%2Fissue",
        b"/jwthmac/issue%00",
        b"/jwthmac/issue%00.json",
        b"/jwthmac/%00",
        b"//jwthmac/issue",
        b"/jwthmac//issue",
        b"///",
        b"/JWTHMAC/ISSUE",
        b"/jwthmac/Issue",
        b"/jwthmac/issue;x=1",
        b"/jwthmac/issue%20",
        b"/jwthmac/issue%",
        b"/jwthmac/issue%zz",
        b"/jwthmac/issue#fragment",
        b"/jwthmac/issue\\",
        b"/jwthmac\\issue",
        b"/jwthmac/issue/extra/segments",
        b"/jwthmac/%69ssue/x",
        b"/%6a%77%74/issue/x",
        b"/metrics",
        b"/healthz",
        b"/.well-known/jwks.json/../../jwthmac/issue",
        b"/" + b"a" * 4000,
        b"/" + b"a/" * 2000,
        b"/jwthmac/issue/" + b"%2e%2e/" * 500,
        b"https://evil.example/jwthmac/issue",
        b"http://localhost/jwthmac/issue",
        b"//evil.example/jwthmac/issue",
        b"jwthmac/issue",
    ]
    cases = [case(f"path {path[:50]!r}", request(path=path), (400, 404)) for path in paths]
    queryBodies = [
        (b"?audience=gschmarri", b""),
        (b"?audience=gschmarri&audience=dummy", b"{}"),
        (b"?" + b"a=1&" * 1500, b"[]"),
        (b"?%00=%00", b"null"),
        (b"?x=%ff%fe", b'{"audience": "evil"}'),
        (b"?__proto__[audience]=gschmarri", b'{"audience": ""}'),
        (b"?;;;;", b"{oops"),
    ]
    for query, body in queryBodies:
        cases.append(
            case(
                f"query {query[:30]!r} with body {body!r}",
                request(path=b"/jwthmac/issue" + query, body=body),
                (400, 403),
            )
        )
    return cases


def headerCases() -> list[Case]:
    rl = b"POST /jwthmac/issue HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    length = b"Content-Length: %d\r\n" % len(GOOD_BODY)
    malformed = [
        ("header without a colon", rl + b"JustAName\r\n" + length + b"\r\n" + GOOD_BODY),
        ("empty header name", rl + b": value\r\n" + length + b"\r\n" + GOOD_BODY),
        ("space before the colon", rl + b"X-Test : value\r\n" + length + b"\r\n" + GOOD_BODY),
        ("space inside the name", rl + b"X Test: value\r\n" + length + b"\r\n" + GOOD_BODY),
        ("8-bit header name", rl + b"X-T\xe9st: value\r\n" + length + b"\r\n" + GOOD_BODY),
        ("NUL in a header value", rl + b"X-Test: a\x00b\r\n" + length + b"\r\n" + GOOD_BODY),
        ("bare CR in a header value", rl + b"X-Test: a\rb\r\n" + length + b"\r\n" + GOOD_BODY),
        ("bare LF in a header value", rl + b"X-Test: a\nb\r\n" + length + b"\r\n" + GOOD_BODY),
        ("LF-injected header", rl + b"X-Test: a\nContent-Length: 0\r\n" + length + b"\r\n" + GOOD_BODY),
        ("continuation as first header", b"POST /jwthmac/issue HTTP/1.1\r\n folded\r\n\r\n"),
        ("100 headers", rl + b"".join(b"X-F-%d: x\r\n" % i for i in range(100)) + length + b"\r\n" + GOOD_BODY),
        ("one 10 kB header", rl + b"X-Big: " + b"y" * 10000 + b"\r\n" + length + b"\r\n" + GOOD_BODY),
        ("9 kB of headers in 50 lines", rl + b"".join(b"X-%d: %s\r\n" % (i, b"z" * 180) for i in range(50)) + length),
        ("20 kB header line", rl + b"X-Huge: " + b"h" * 20000 + b"\r\n" + length + b"\r\n" + GOOD_BODY, OVERLONG_LINE),
        ("header name of 9 kB", rl + b"X" * 9000 + b": v\r\n" + length + b"\r\n" + GOOD_BODY),
        ("CR inside Origin", rl + b"Origin: http://localhost:8000\rSet-Cookie: a=b\r\n" + length + b"\r\n" + GOOD_BODY),
        ("NUL Content-Type", rl.replace(b"application/json", b"application/json\x00") + length + b"\r\n" + GOOD_BODY),
    ]
    cases = [
        case("header: " + entry[0], entry[1], entry[2] if len(entry) > 2 else (400, CLOSED)) for entry in malformed
    ]
    mediaTypes = [
        b"text/plain",
        b"application/jsonx",
        b"application/json, text/plain",
        b"application/json; charset=latin-1",
        b"application/json; charset=utf-16",
        b"application/x-www-form-urlencoded",
        b"text/json",
        b"*/*",
        b"application/*",
        b"",
        b"application/json\xff",
    ]
    cases += [case(f"Content-Type {t!r}", request(contentType=t), 415, "unsupported_media_type") for t in mediaTypes]
    cases += [
        case("no Content-Type", request(contentType=None), 415, "unsupported_media_type"),
        case(
            "Content-Type json then text",
            request(headers=[(b"Content-Type", b"text/plain")]),
            415,
            "unsupported_media_type",
        ),
        case(
            "folded Content-Type",
            withHead(
                b"POST /jwthmac/issue HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/\r\n json\r\n"
                b"Content-Length: %d" % len(GOOD_BODY),
                GOOD_BODY,
            ),
            415,
        ),
        case(
            "UTF-16 body declared as UTF-16",
            request(contentType=b"application/json; charset=utf-16", body=GOOD_BODY.decode().encode("utf-16")),
            415,
        ),
        case(
            "form body",
            request(contentType=b"application/x-www-form-urlencoded", body=b"audience=gschmarri&" + b"a=b&" * 500),
            415,
        ),
        case(
            "malformed multipart body",
            request(contentType=b"multipart/form-data; boundary=x", body=b"--x\r\nbroken"),
            (400, 415),
        ),
        case("multipart without boundary", request(contentType=b"multipart/form-data", body=GOOD_BODY), (400, 415)),
        case(
            "multipart form",
            request(
                contentType=b"multipart/form-data; boundary=b",
                body=b'--b\r\nContent-Disposition: form-data; name="audience"\r\n\r\ngschmarri\r\n--b--\r\n',
            ),
            (400, 415),
        ),
        case(
            "Upgrade to h2c with a bad body",
            request(headers=[(b"Upgrade", b"h2c"), (b"Connection", b"Upgrade")], body=b"{"),
            400,
        ),
        case("Upgrade to websocket", request(method=b"GET", body=None, headers=[(b"Upgrade", b"websocket")]), 405),
    ]
    return cases


def originCases() -> list[Case]:
    origins = [
        b"https://evil.example",
        b"null",
        b"http://localhost:8000.evil.example",
        b"http://localhost:8000@evil.example",
        b"http://evil.example#@localhost:8000",
        b"HTTP://LOCALHOST:8000",
        b"http://localhost:8000/",
        b"http://localhost:8001",
        b"http://localhost:08000x",
        b"https://localhost:8000",
        b"https://app.example.org:444",
        b"https://app.example.org.",
        b"file://",
        b"http://[::1]:8000",
        b"http://loc\xe4lhost:8000",
        b"http://localhost:\xd9\xa8\xd9\xa0\xd9\xa0\xd9\xa0",
        b"http://localhost:8000 https://evil.example",
        b"*",
        b"http://" + b"a" * 5000,
    ]
    cases = [case(f"Origin {o[:40]!r}", request(headers=[(b"Origin", o)]), 403, "origin_not_allowed") for o in origins]
    cases += [
        case(
            "allowed Origin, then a foreign one",
            request(headers=[(b"Origin", b"http://localhost:8000"), (b"Origin", b"https://evil.example")]),
            403,
            "origin_not_allowed",
        ),
        case("Origin of 9 kB", request(headers=[(b"Origin", b"http://" + b"a" * 9000)]), (400, CLOSED)),
    ]
    return cases


SMUGGLED = request()  # a complete, valid token request hidden in the body
ISSUE_HEAD = b"POST /jwthmac/issue HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
EVIL = b'{"audience": "evil"}'


def framingCases() -> list[Case]:
    """Content-Length and Transfer-Encoding abuse, chunked encoding abuse, request smuggling."""
    inner = chunked(EVIL)
    cases = [
        case(f"Content-Length {value!r}", withHead(ISSUE_HEAD + b"Content-Length: " + value, GOOD_BODY), (400, CLOSED))
        for value in (b"-1", b"+25", b"0x19", b"25.0", b"2e1", b"25 25", b"25,25", b"", b"\xd9\xa2\xd9\xa5", b"twenty")
    ]
    cases += [
        case(
            "two equal Content-Lengths",
            withHead(ISSUE_HEAD + b"Content-Length: 25\r\nContent-Length: 25", GOOD_BODY),
            (400, CLOSED),
        ),
        case(
            "two different Content-Lengths",
            withHead(ISSUE_HEAD + b"Content-Length: 25\r\nContent-Length: 0", GOOD_BODY + SMUGGLED),
            (400, CLOSED),
        ),
        case(
            "huge Content-Length",
            withHead(ISSUE_HEAD + b"Content-Length: 99999999999999999999999999", GOOD_BODY),
            413,
            "body_too_large",
        ),
        case("oversized body hiding a request", declared(5000, SMUGGLED), 413, "body_too_large"),
        case("body of 4097 bytes", request(body=b" " * 4072 + GOOD_BODY), 413, "body_too_large"),
        case("body of 64 kB", declared(65536, b"[" * 1024), 413, "body_too_large"),
        case(
            "oversized body with Expect: 100-continue",
            withHead(ISSUE_HEAD + b"Expect: 100-continue\r\nContent-Length: 1000000", b""),
            413,
            "body_too_large",
        ),
        case(
            "body shorter than Content-Length, then a second request",
            withHead(ISSUE_HEAD + b"Content-Length: 10", GOOD_BODY + b"\r\n\r\n"),
            (400,),
            answers=2,
        ),
        # Smuggling: the service must refuse, close, and never run the request hidden inside.
        case(
            "CL.TE smuggling",
            withHead(
                ISSUE_HEAD + b"Content-Length: %d\r\nTransfer-Encoding: chunked" % (5 + len(SMUGGLED)),
                b"0\r\n\r\n" + SMUGGLED,
            ),
            (400, CLOSED),
        ),
        case(
            "TE.CL smuggling",
            withHead(ISSUE_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 4", chunked(SMUGGLED)),
            (400, CLOSED),
        ),
        case(
            "TE with tab, and CL",
            withHead(ISSUE_HEAD + b"Transfer-Encoding:\tchunked\r\nContent-Length: 4", chunked(SMUGGLED)),
            (400, CLOSED),
        ),
        case(
            "TE chunked twice",
            withHead(ISSUE_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", inner),
            (400, CLOSED),
        ),
        case(
            "TE list chunked, chunked",
            withHead(ISSUE_HEAD + b"Transfer-Encoding: chunked, chunked", inner),
            (400, CLOSED),
        ),
        case("TE gzip", withHead(ISSUE_HEAD + b"Transfer-Encoding: gzip", inner), (400, CLOSED)),
        case("TE gzip, chunked", withHead(ISSUE_HEAD + b"Transfer-Encoding: gzip, chunked", inner), (400, CLOSED)),
        case("TE xchunked", withHead(ISSUE_HEAD + b"Transfer-Encoding: xchunked", inner), (400, CLOSED)),
        case(
            "TE chunked with vertical tab",
            withHead(ISSUE_HEAD + b"Transfer-Encoding: chunked\x0b", inner),
            (400, CLOSED),
        ),
        case(
            "space before colon in Transfer-Encoding",
            withHead(ISSUE_HEAD + b"Transfer-Encoding : chunked\r\nContent-Length: 4", chunked(SMUGGLED)),
            (400, CLOSED),
        ),
        case(
            "folded Transfer-Encoding and CL",
            withHead(
                ISSUE_HEAD + b"X-Folded: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5",
                b"0\r\n\r\n" + request(body=EVIL),
            ),
            (400,),
            answers=2,
        ),
        case(
            "TE identity and CL over a chunked-looking body",
            withHead(
                ISSUE_HEAD + b"Transfer-Encoding: identity\r\nContent-Length: %d" % len(chunked(SMUGGLED)),
                chunked(SMUGGLED),
            ),
            400,
            "malformed_json",
        ),
        case(
            "HTTP/1.0 with CL and TE",
            withHead(
                ISSUE_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Content-Length: 5\r\nTransfer-Encoding: chunked",
                b"0\r\n\r\n" + SMUGGLED,
            ),
            (400, CLOSED),
        ),
    ]
    te = ISSUE_HEAD + b"Transfer-Encoding: chunked"
    chunkAbuse = [
        ("non-hex chunk size", b"zz\r\n" + EVIL + b"\r\n0\r\n\r\n", (400, CLOSED)),
        ("negative chunk size", b"-14\r\n" + EVIL + b"\r\n0\r\n\r\n", (400, CLOSED)),
        ("0x chunk size", b"0x14\r\n" + EVIL + b"\r\n0\r\n\r\n", (400, CLOSED)),
        ("space before chunk size", b" 14\r\n" + EVIL + b"\r\n0\r\n\r\n", (400, 403, CLOSED)),
        ("huge chunk size", b"ffffffffffffffffffffffff\r\n" + EVIL + b"\r\n0\r\n\r\n", (400, 408, 413, CLOSED)),
        ("chunk size line of 10 kB", b"14;" + b"e" * 10000 + b"\r\n" + EVIL + b"\r\n0\r\n\r\n", (400, CLOSED)),
        ("chunk without CRLF after its data", b"14\r\n" + EVIL + b"0\r\n\r\n", (400, 408, CLOSED)),
        ("chunk longer than its size", b"5\r\n" + EVIL + b"\r\n0\r\n\r\n", (400, CLOSED)),
        ("many one-byte chunks over the limit", b"".join(b"1\r\n%c\r\n" % b for b in b"x" * 4200) + b"0\r\n\r\n", 413),
        ("chunks over the limit", chunked(b" " * 3000, b" " * 3000, EVIL), 413),
        ("chunked evil audience with trailers", chunked(EVIL, last=b"0\r\nX-Trailer: 1\r\n\r\n"), (400, 403)),
        (
            "chunked evil audience with a 20 kB trailer",
            chunked(EVIL, last=b"0\r\nX-T: " + b"t" * 20000 + b"\r\n\r\n"),
            (400, 403, CLOSED),
        ),
        (
            "trailers over 64 kB",
            chunked(EVIL, last=b"0\r\n" + b"X-T: %s\r\n" % (b"t" * 1000) * 70 + b"\r\n"),
            (400, CLOSED),
        ),
        ("chunk extension", b"14;name=value\r\n" + EVIL + b"\r\n0\r\n\r\n", (400, 403)),
        ("leading zeros", b"0000000000000014\r\n" + EVIL + b"\r\n0\r\n\r\n", (400, 403)),
        ("empty chunked body", b"0\r\n\r\n", 400),
        ("chunked NUL bytes", chunked(b"\x00" * 100), 400),
    ]
    cases += [case("chunked: " + name, withHead(te, body), statuses) for name, body, statuses in chunkAbuse]
    return cases


def jsonCases() -> list[Case]:
    bodies: list[tuple[str, bytes, int, str | None]] = [
        ("empty", b"", 400, "malformed_json"),
        ("lone brace", b"{", 400, "malformed_json"),
        ("closing brace", b"}", 400, "malformed_json"),
        ("array", b"[]", 400, "body_not_object"),
        ("array of the object", b"[" + GOOD_BODY + b"]", 400, "body_not_object"),
        ("null", b"null", 400, "body_not_object"),
        ("true", b"true", 400, "body_not_object"),
        ("number", b"1", 400, "body_not_object"),
        ("string", b'"gschmarri"', 400, "body_not_object"),
        ("empty object", b"{}", 400, "audience_missing"),
        ("audience key differs in case", b'{"Audience": "gschmarri"}', 400, "audience_missing"),
        ("audience null", b'{"audience": null}', 400, "audience_not_string"),
        ("audience number", b'{"audience": 1}', 400, "audience_not_string"),
        ("audience true", b'{"audience": true}', 400, "audience_not_string"),
        ("audience list", b'{"audience": ["gschmarri"]}', 400, "audience_not_string"),
        ("audience object", b'{"audience": {"gschmarri": 1}}', 400, "audience_not_string"),
        ("audience empty", b'{"audience": ""}', 400, "audience_empty"),
        ("audience 257 chars", b'{"audience": "%s"}' % (b"a" * 257), 400, "audience_invalid"),
        ("audience escaped NUL", b'{"audience": "gschmarri\\u0000"}', 400, "audience_invalid"),
        ("audience raw NUL", b'{"audience": "gschmarri\x00"}', 400, "malformed_json"),
        ("audience raw newline", b'{"audience": "gschmarri\n"}', 400, "malformed_json"),
        ("audience escaped newline", b'{"audience": "gschmarri\\n"}', 400, "audience_invalid"),
        ("audience escaped DEL", b'{"audience": "gschmarri\\u007f"}', 400, "audience_invalid"),
        ("audience escaped ESC", b'{"audience": "\\u001b[31mgschmarri"}', 400, "audience_invalid"),
        ("audience of 600 escaped NULs", b'{"audience": "%s"}' % (b"\\u0000" * 600), 400, "audience_invalid"),
        ("NaN", b'{"audience": "gschmarri", "x": NaN}', 400, "malformed_json"),
        ("Infinity", b'{"audience": "gschmarri", "x": Infinity}', 400, "malformed_json"),
        ("-Infinity", b'{"audience": "gschmarri", "x": -Infinity}', 400, "malformed_json"),
        ("audience NaN", b'{"audience": NaN}', 400, "malformed_json"),
        (
            "duplicate audience, same value",
            b'{"audience": "gschmarri", "audience": "gschmarri"}',
            400,
            "malformed_json",
        ),
        ("duplicate audience, evil first", b'{"audience": "evil", "audience": "gschmarri"}', 400, "malformed_json"),
        (
            "duplicate algorithm",
            b'{"audience": "gschmarri", "algorithm": "HS256", "algorithm": "none"}',
            400,
            "malformed_json",
        ),
        ("duplicate nested key", b'{"audience": "gschmarri", "x": {"a": 1, "a": 2}}', 400, "malformed_json"),
        ("algorithm none", b'{"audience": "gschmarri", "algorithm": "none"}', 400, "algorithm_mismatch"),
        ("algorithm RS256", b'{"audience": "gschmarri", "algorithm": "RS256"}', 400, "algorithm_mismatch"),
        ("algorithm lower case", b'{"audience": "gschmarri", "algorithm": "hs256"}', 400, "algorithm_mismatch"),
        ("algorithm null", b'{"audience": "gschmarri", "algorithm": null}', 400, "algorithm_mismatch"),
        ("algorithm list", b'{"audience": "gschmarri", "algorithm": ["HS256"]}', 400, "algorithm_mismatch"),
        (
            "algorithm huge number",
            b'{"audience": "gschmarri", "algorithm": 1%s}' % (b"0" * 4000),
            400,
            "algorithm_mismatch",
        ),
        ("audience huge integer", b'{"audience": 1%s}' % (b"0" * 4000), 400, "audience_not_string"),
        ("audience of 4061 digits", b'{"audience": -1%s}' % (b"0" * 4060), 400, "audience_not_string"),
        ("audience 1e999999", b'{"audience": 1e999999}', 400, "audience_not_string"),
        ("audience -0", b'{"audience": -0}', 400, "audience_not_string"),
        ("audience tiny float", b'{"audience": 1e-999999}', 400, "audience_not_string"),
        ("BOM before the object", b"\xef\xbb\xbf" + GOOD_BODY, 400, "malformed_json"),
        ("UTF-16 LE with BOM", b"\xff\xfe" + GOOD_BODY.decode().encode("utf-16-le"), 400, None),
        ("UTF-16 BE", GOOD_BODY.decode().encode("utf-16-be"), 400, None),
        ("UTF-32", GOOD_BODY.decode().encode("utf-32"), 400, None),
        ("latin-1 audience", '{"audience": "gschm\xe4rri"}'.encode("latin-1"), 400, "body_not_utf8"),
        ("overlong UTF-8 slash", b'{"audience": "\xc0\xafgschmarri"}', 400, "body_not_utf8"),
        ("CESU-8 surrogate", b'{"audience": "\xed\xa0\x80"}', 400, "body_not_utf8"),
        ("truncated UTF-8", b'{"audience": "gschmarri\xe2\x82"}', 400, "body_not_utf8"),
        ("lone 0xff", b'{"audience": "\xff"}', 400, "body_not_utf8"),
        ("trailing garbage", GOOD_BODY + b" x", 400, "malformed_json"),
        ("two objects", GOOD_BODY + b"{}", 400, "malformed_json"),
        ("trailing NUL", GOOD_BODY + b"\x00", 400, "malformed_json"),
        ("leading garbage", b"x" + GOOD_BODY, 400, "malformed_json"),
        ("comment", b'{/*c*/"audience": "gschmarri"}', 400, "malformed_json"),
        ("single quotes", b"{'audience': 'gschmarri'}", 400, "malformed_json"),
        ("trailing comma", b'{"audience": "gschmarri",}', 400, "malformed_json"),
        ("unquoted key", b'{audience: "gschmarri"}', 400, "malformed_json"),
        ("hex number", b'{"audience": 0x10}', 400, "malformed_json"),
        ("leading plus", b'{"audience": +1}', 400, "malformed_json"),
        ("leading zero", b'{"audience": 01}', 400, "malformed_json"),
        ("bare dot", b'{"audience": .5}', 400, "malformed_json"),
        ("bad escape", b'{"audience": "\\x41"}', 400, "malformed_json"),
        ("short unicode escape", b'{"audience": "\\u12"}', 400, "malformed_json"),
        ("unterminated string", b'{"audience": "gschmarri}', 400, "malformed_json"),
        ("2000-deep array", b'{"audience": ' + b"[" * 2000 + b"]" * 2000 + b"}", 400, None),
        ("600-deep object", b'{"audience": ' + b'{"a":' * 600 + b"1" + b"}" * 600 + b"}", 400, None),
        ("4000-deep array alone", b"[" * 4000, 400, "malformed_json"),
        (
            "400 keys without audience",
            b"{" + b",".join(b'"k%d":0' % i for i in range(400)) + b"}",
            400,
            "audience_missing",
        ),
        ("lone high surrogate", b'{"audience": "\\ud800"}', 400, "audience_invalid"),
        ("lone low surrogate", b'{"audience": "\\udfff"}', 400, "audience_invalid"),
        ("surrogate after a good audience", b'{"audience": "gschmarri\\ud800"}', 400, "audience_invalid"),
        ("reversed surrogate pair", b'{"audience": "\\udc00\\ud800"}', 400, "audience_invalid"),
        ("audience not on the list", EVIL, 403, "audience_not_allowed"),
        ("audience in upper case", b'{"audience": "GSCHMARRI"}', 403, "audience_not_allowed"),
        ("audience with a trailing space", b'{"audience": "gschmarri "}', 403, "audience_not_allowed"),
        ("audience with a zero-width space", b'{"audience": "gschmarri\\u200b"}', 403, "audience_not_allowed"),
        ("audience with a right-to-left override", b'{"audience": "\\u202eirramhcsg"}', 403, "audience_not_allowed"),
        ("audience with a line separator", b'{"audience": "gschmarri\\u2028"}', 403, "audience_not_allowed"),
        ("audience fullwidth", '{"audience": "ｇｓｃｈｍａｒｒｉ"}'.encode(), 403, "audience_not_allowed"),
        ("audience with a log-forging text", b'{"audience": "x issued token sub=admin"}', 403, "audience_not_allowed"),
        (
            "audience with a JSON-breaking quote",
            b'{"audience": "a\\"}, \\"token\\": \\"x"}',
            403,
            "audience_not_allowed",
        ),
        ("audience of 256 characters", b'{"audience": "%s"}' % (b"a" * 256), 403, "audience_not_allowed"),
        ("whitespace only", b" \t\r\n ", 400, "malformed_json"),
    ]
    return [case("JSON: " + name, request(body=body), status, code) for name, body, status, code in bodies]


def anonymousCases() -> list[Case]:
    """Without a client certificate nothing but a 401 (or a 4xx before it) comes back."""
    return [
        case("anonymous: good request", request(), 401, "client_certificate_required", transport="anonymous"),
        case("anonymous: evil audience", request(body=EVIL), 401, "client_certificate_required", transport="anonymous"),
        case(
            "anonymous: allowed origin",
            request(headers=[(b"Origin", b"http://localhost:8000")]),
            401,
            "client_certificate_required",
            transport="anonymous",
        ),
        case("anonymous: malformed HTTP", b"POST\r\n\r\n", (400, CLOSED), transport="anonymous"),
        case("anonymous: 64 kB body", declared(65536, b"x" * 1024), (401, 413), transport="anonymous"),
    ]


# --- drivers: how bytes reach the service ---------------------------------


@dataclass
class Answer:
    status: int
    reason: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


@dataclass
class Outcome:
    answers: list[Answer]
    closed: bool
    raw: bytes
    elapsed: float
    note: str = ""


def parseAnswers(data: bytes, head: bool, closed: bool) -> tuple[list[Answer], bool]:
    """HTTP responses in C{data} (1xx skipped); the flag says whether the last one is complete."""
    answers: list[Answer] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return answers, False
        lines = data[:end].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return answers, True  # not HTTP; the caller reports the raw bytes
        status = int(parts[1])
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        rest = data[end + 4 :]
        if 100 <= status < 200:
            data = rest
            continue
        if head or status in (204, 304):
            length = 0
        elif b"content-length" in headers:
            length = int(headers[b"content-length"][-1])
        else:
            length = len(rest) if closed else -1
        if length < 0 or len(rest) < length:
            return answers, False
        answers.append(Answer(status, parts[2] if len(parts) > 2 else b"", headers, rest[:length]))
        data = rest[length:]
    return answers, True


def readAnswers(sock: socket.socket, wanted: int, head: bool, deadline: float) -> tuple[bytes, bool]:
    """Read until C{wanted} complete answers, a close, or the deadline."""
    data = b""
    while True:
        answers, complete = parseAnswers(data, head, closed=False)
        if len(answers) >= wanted and complete:
            return data, False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, False
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except (ssl.SSLError, OSError):
            return data, True
        if not chunk:
            return data, True
        data += chunk


def answered(sock: socket.socket) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def send(sock: socket.socket, payload: bytes | tuple[bytes | float, ...], deadline: float) -> str:
    """Send everything (pausing where asked); a peer that hangs up early is fine."""
    pieces = (payload,) if isinstance(payload, bytes) else payload
    try:
        for piece in pieces:
            if time.monotonic() >= deadline:
                break
            if isinstance(piece, float):
                if answered(sock):
                    break  # the service has spoken (or closed): stop dribbling and read
                time.sleep(piece)
            else:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.sendall(piece)
    except (ssl.SSLError, OSError) as error:
        return f"send stopped: {type(error).__name__}"
    return ""


class Target:
    """Where the cases go: the port, and TLS contexts with and without the client certificate."""

    def __init__(self, port: int, pki: TestPKI) -> None:
        self.port = port
        self.pki = pki
        certFile, keyFile = pki.clientFiles(pki.client, "hostile-client")
        self.withCertificate = ssl.create_default_context(cafile=pki.path("ca.pem"))
        self.withCertificate.load_cert_chain(certFile, keyFile)
        self.anonymous = ssl.create_default_context(cafile=pki.path("ca.pem"))
        self.good = Client(port, pki.path("ca.pem"), certFile, keyFile)
        self._files: dict[str, tuple[str, str]] = {"client": (certFile, keyFile)}
        self._lock = threading.Lock()

    def files(self, name: str) -> tuple[str, str]:
        """Certificate and key files of one of the test PKI's client certificates, written once."""
        with self._lock:
            if name not in self._files:
                self._files[name] = self.pki.clientFiles(getattr(self.pki, name), f"hostile-{name}")
            return self._files[name]

    def connect(self, transport: str) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=CASE_SECONDS)
        if transport == "tcp":
            return raw
        context = self.withCertificate if transport == "tls" else self.anonymous
        try:
            return context.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise

    def run(self, hostile: Case) -> Outcome:
        started = time.monotonic()
        deadline = started + CASE_SECONDS
        if hostile.driver is not None:
            return hostile.driver(self.port, self)
        sock = self.connect(hostile.transport)
        try:
            note = send(sock, hostile.send, deadline)
            raw, closed = readAnswers(sock, hostile.answers, hostile.head, deadline)
        finally:
            sock.close()
        return Outcome(parseAnswers(raw, hostile.head, closed)[0], closed, raw, time.monotonic() - started, note)


# --- TLS-level cases: raw TCP and hand-driven handshakes -------------------


def clientHello(target: Target) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = target.withCertificate.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return tls, incoming, outgoing, outgoing.read()


def waitForClose(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def rawTcp(payload: bytes, pause: float = 0.0) -> Callable[[int, Target], Outcome]:
    """Send bytes (not TLS) to the TLS port, optionally wait, and expect the service to hang up."""

    def drive(port: int, target: Target) -> Outcome:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=CASE_SECONDS) as sock:
            note = send(sock, payload, started + CASE_SECONDS)
            if pause:
                time.sleep(pause)
            data, closed = waitForClose(sock, started + CASE_SECONDS)
        return Outcome([], closed, data, time.monotonic() - started, note)

    return drive


def partialHandshake(stage: str) -> Callable[[int, Target], Outcome]:
    """
    A real ClientHello, then: "half" sends half of it and stalls; "hello-close" sends it
    and hangs up; "stall" sends it, reads the server's flight and stalls; "garbage"
    answers the server's flight with garbage; "finished-garbage" completes the
    handshake and then sends bytes that are no TLS record.
    """

    def drive(port: int, target: Target) -> Outcome:
        started = time.monotonic()
        deadline = started + CASE_SECONDS
        tls, incoming, outgoing, hello = clientHello(target)
        with socket.create_connection(("127.0.0.1", port), timeout=CASE_SECONDS) as sock:
            if stage == "half":
                sock.sendall(hello[: len(hello) // 2])
                data, closed = waitForClose(sock, deadline)
                return Outcome([], closed, data, time.monotonic() - started)
            sock.sendall(hello)
            if stage == "hello-close":
                return Outcome([], True, b"", time.monotonic() - started, "client hung up")
            flight = sock.recv(65536)
            if stage == "stall":
                data, closed = waitForClose(sock, deadline)
                return Outcome([], closed, data, time.monotonic() - started)
            if stage == "garbage":
                sock.sendall(b"\x17\x03\x03\x00\x10" + b"\x00" * 16)
                data, closed = waitForClose(sock, deadline)
                return Outcome([], closed, data, time.monotonic() - started)
            incoming.write(flight)
            while time.monotonic() < deadline:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    incoming.write(sock.recv(65536))
            sock.sendall(outgoing.read())
            sock.sendall(b"\x17\x03\x03\x00\x20" + bytes(range(32)))  # an application record we did not encrypt
            data, closed = waitForClose(sock, deadline)
            return Outcome([], closed, data, time.monotonic() - started)

    return drive


def refusedHandshake(configure: Callable[[ssl.SSLContext], None], withClientCertificate: str | None = None) -> Any:
    """A TLS client the service must refuse at the handshake (old versions, weak ciphers, foreign certificates)."""

    def drive(port: int, target: Target) -> Outcome:
        started = time.monotonic()
        context = ssl.create_default_context(cafile=target.pki.path("ca.pem"))
        if withClientCertificate is not None:
            context.load_cert_chain(*target.files(withClientCertificate))
        configure(context)
        raw = socket.create_connection(("127.0.0.1", port), timeout=CASE_SECONDS)
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(request())
                data, closed = readAnswers(tls, 1, False, started + CASE_SECONDS)
        except (ssl.SSLError, OSError) as error:
            return Outcome([], True, b"", time.monotonic() - started, f"refused: {type(error).__name__}")
        finally:
            raw.close()
        return Outcome(parseAnswers(data, False, closed)[0], closed, data, time.monotonic() - started, "handshake done")

    return drive


def oldProtocol(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")


def weakCipher(context: ssl.SSLContext) -> None:
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-SHA:AES256-SHA:DES-CBC3-SHA:@SECLEVEL=0")


def transportCases() -> list[Case]:
    rng = random.Random(20261203)
    garbage = [bytes(rng.getrandbits(8) for _ in range(size)) for size in (1, 7, 100, 1024, 16384)]
    sslv2Hello = bytes.fromhex("802e0100020015000000100100800700c0030080060040020080040080") + b"\x00" * 16
    raw = [
        ("plain HTTP request", request()),
        ("plain HTTP/1.0 GET", b"GET / HTTP/1.0\r\n\r\n"),
        ("HTTP/2 prior knowledge", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("NUL bytes", b"\x00" * 100),
        ("0xff bytes", b"\xff" * 100),
        ("CRLFs", b"\r\n" * 100),
        ("SSLv2 ClientHello", sslv2Hello),
        ("application data before the handshake", b"\x17\x03\x03\x00\x05hello"),
        ("alert before the handshake", b"\x15\x03\x03\x00\x02\x02\x28"),
        ("handshake record of length 0", b"\x16\x03\x01\x00\x00"),
        ("handshake record of 18 kB", b"\x16\x03\x01\x48\x00" + b"\x01" * 18432),
        ("ClientHello with a bogus length", b"\x16\x03\x01\x00\x30\x01\xff\xff\xff" + b"\x03\x03" + b"\x00" * 43),
        ("SSL 3.0 record version", b"\x16\x03\x00\x00\x04\x01\x00\x00\x00"),
        *[(f"{len(g)} random bytes", g) for g in garbage],
    ]
    cases = [case("TCP: " + name, data, CLOSED, driver=rawTcp(data)) for name, data in raw]
    cases += [
        case("TLS: half a ClientHello, then silence", b"", CLOSED, driver=partialHandshake("half")),
        case("TLS: ClientHello, then hang up", b"", CLOSED, driver=partialHandshake("hello-close")),
        case("TLS: ClientHello, then silence", b"", CLOSED, driver=partialHandshake("stall")),
        case("TLS: garbage instead of the client's Finished", b"", CLOSED, driver=partialHandshake("garbage")),
        case("TLS: unencrypted record after the handshake", b"", CLOSED, driver=partialHandshake("finished-garbage")),
        case("TLS: TLS 1.0 and 1.1 only", b"", CLOSED, driver=refusedHandshake(oldProtocol, "client")),
        case("TLS: weak cipher suites only", b"", CLOSED, driver=refusedHandshake(weakCipher, "client")),
        case("TLS: certificate from another CA", b"", CLOSED, driver=refusedHandshake(lambda c: None, "untrusted")),
        case("TLS: expired certificate", b"", CLOSED, driver=refusedHandshake(lambda c: None, "expired")),
        case(
            "TLS: serverAuth-only certificate", b"", CLOSED, driver=refusedHandshake(lambda c: None, "serverAuthOnly")
        ),
        case("TCP: connect and stay silent", b"", CLOSED, driver=rawTcp(b"")),
        case("TCP: a partial record header, then silence", b"", CLOSED, driver=rawTcp(b"\x16\x03")),
    ]
    return cases


def slowCases() -> list[Case]:
    head = request()
    dribble = tuple(piece for byte in head for piece in (bytes([byte]), 0.05))
    return [
        case("slow: slowloris, one byte every 50 ms", dribble, (408, CLOSED), "request_timeout"),
        case(
            "slow: endless headers",
            (ISSUE_HEAD, *[x for i in range(30) for x in (b"X-Slow-%d: x\r\n" % i, 0.1)]),
            (408, CLOSED),
            "request_timeout",
        ),
        case(
            "slow: body one byte every 100 ms",
            (
                withHead(ISSUE_HEAD + b"Content-Length: %d" % len(GOOD_BODY), b""),
                *[x for b in GOOD_BODY for x in (bytes([b]), 0.1)],
            ),
            (408, CLOSED),
            "request_timeout",
        ),
        case(
            "slow: body shorter than Content-Length",
            withHead(ISSUE_HEAD + b"Content-Length: 100", GOOD_BODY),
            408,
            "request_timeout",
        ),
        case("slow: LF-only line ends", request().replace(b"\r\n", b"\n"), (408, CLOSED), "request_timeout"),
        case(
            "slow: Expect 100-continue, then no body",
            withHead(ISSUE_HEAD + b"Expect: 100-continue\r\nContent-Length: 25", b""),
            408,
            "request_timeout",
        ),
        case(
            "slow: chunked body never terminated",
            withHead(ISSUE_HEAD + b"Transfer-Encoding: chunked", b"5\r\nhello\r\n"),
            408,
            "request_timeout",
        ),
        case("slow: request line never ends", b"POST /jwthmac/issue", 408, "request_timeout"),
        case(
            "slow: a complete request after the 408",
            (b"POST /jwthmac/issue HTTP/1.1\r\n", 1.5, SMUGGLED),
            (408, CLOSED),
            "request_timeout",
        ),
        case(
            "slow: pipelined second request stalls",
            request(body=EVIL) + b"POST /jwthmac/issue HTTP/1.1\r\n",
            403,
            "audience_not_allowed",
            answers=2,
        ),
        case("slow: idle after the handshake", (b"", 0.1), (408, CLOSED)),
        case("slow: TCP connect, silent", b"", CLOSED, driver=rawTcp(b"", pause=0.0)),
        case("slow: half a ClientHello", b"", CLOSED, driver=partialHandshake("half")),
    ]


BATCHES: dict[str, Callable[[], list[Case]]] = {
    "request line": requestLineCases,
    "methods": methodCases,
    "paths": pathCases,
    "headers": headerCases,
    "origins": originCases,
    "framing": framingCases,
    "json": jsonCases,
    "anonymous": anonymousCases,
    "transport": transportCases,
    "slow": slowCases,
}


# --- judging outcomes -----------------------------------------------------


def problemsWith(hostile: Case, outcome: Outcome) -> list[str]:
    """Everything wrong with how the service met one hostile case (empty: fine)."""
    problems = []
    for marker in (b"Traceback", b'File "', b"twisted.", b"Exception", b"TwistedWeb"):
        if marker in outcome.raw:
            problems.append(f"answer contains {marker!r}")
    if outcome.elapsed > CASE_SECONDS + 1:
        problems.append(f"took {outcome.elapsed:.1f} s")
    if hostile.driver is not None and outcome.raw.startswith(b"HTTP/"):
        problems.append("the TLS port answered in plain HTTP")
    for answer in outcome.answers:
        if not 400 <= answer.status < 500:
            problems.append(f"status {answer.status}")
        if answer.body:
            if (answer.header(b"content-type") or b"").split(b";")[0] != b"application/json":
                problems.append(f"{answer.status} body is not JSON: {answer.body[:80]!r}")
                continue
            try:
                document = json.loads(answer.body)
            except ValueError:
                problems.append(f"{answer.status} body does not parse: {answer.body[:80]!r}")
                continue
            if not (isinstance(document.get("error"), str) and isinstance(document.get("message"), str)):
                problems.append(f"{answer.status} body is not an error document: {document}")
            if "token" in document:
                problems.append("a token came back")
        elif not hostile.head and not (answer.status == 400 and answer.reason == b"Bad Request"):
            problems.append(f"{answer.status} {answer.reason!r} without a body")
    if outcome.answers:
        first = outcome.answers[0]
        if first.status not in hostile.statuses:
            problems.append(f"status {first.status}, expected one of {sorted(hostile.statuses)}")
        if hostile.code is not None and first.body and json.loads(first.body).get("error") != hostile.code:
            problems.append(f"error {json.loads(first.body).get('error')!r}, expected {hostile.code!r}")
    elif CLOSED not in hostile.statuses:
        problems.append(f"no answer (closed={outcome.closed}, raw={outcome.raw[:60]!r}, {outcome.note})")
    elif not outcome.closed:
        problems.append("neither answered nor closed in time")
    return problems


def runBatch(target: Target, cases: list[Case]) -> dict[str, list[str]]:
    """Run the cases (PARALLEL at a time); return the problems of each case that had any."""

    def one(hostile: Case) -> tuple[str, list[str]]:
        try:
            return hostile.name, problemsWith(hostile, target.run(hostile))
        except Exception as error:  # noqa: BLE001 - a client-side failure is reported with the case
            return hostile.name, [f"client error {error!r}"]

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(one, cases))
    return {name: problems for name, problems in results if problems}


class CorpusTests(SynchronousTestCase):
    def test_corpusSize(self) -> None:
        cases = [hostile for build in BATCHES.values() for hostile in build()]
        self.assertGreaterEqual(len(cases), 200)
        names = [hostile.name for hostile in cases]
        self.assertEqual(len(names), len(set(names)), "case names are unique")


class HostileInputTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.pki = TestPKI(self.mktemp())
        self.logs = LogCapture(self)
        self.port, self.service = startIssuer(
            self,
            self.pki,
            **{"request-timeout": "1", "handshake-timeout": "1", "idle-timeout": "2"},
        )
        self.target = Target(self.port, self.pki)
        self.tokens: list[str] = []

    async def goodClientGetsAToken(self) -> None:
        response = await deferToThread(self.target.good.call)
        self.assertEqual(response.status, 200, response.body)
        self.tokens.append(response.json()["token"])

    async def settle(self) -> None:
        """Wait (at most 5 s) for any abort timer that a 408 left behind: trial wants a clean reactor."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            "_requestTooSlow" in getattr(call.func, "__qualname__", "")
            for call in reactor.getDelayedCalls()  # type: ignore[attr-defined]
        ):
            await deferLater(reactor, 0.1, lambda: None)

    async def runBatches(self, *names: str) -> None:
        await self.goodClientGetsAToken()
        total = 0
        for name in names:
            cases = BATCHES[name]()
            total += len(cases)
            problems = await deferToThread(runBatch, self.target, cases)
            self.assertEqual(
                problems,
                {},
                f"batch {name!r}: {len(problems)} of {len(cases)} cases misbehaved:\n"
                + "\n".join(f"  {case}: {what}" for case, what in problems.items()),
            )
            # Let the service finish with whatever the clients left behind, then check it still serves.
            await deferLater(reactor, 0.2, lambda: None)
            await self.goodClientGetsAToken()
        await self.settle()
        self.assertEqual(len(self.logs.issued()), len(self.tokens), "a token was minted for a hostile case")
        text = self.logs.text()
        self.assertNotIn(TEST_HMAC_KEY, text)
        for token in self.tokens:
            self.assertNotIn(token, text)
            self.assertNotIn(token.split(".")[2], text)
        failures = [event for event in self.logs.events if "log_failure" in event]
        self.assertEqual(failures, [], "the service logged an unhandled error")
        self.assertNotIn("internal_error", text)

    async def test_requestLinesMethodsAndPaths(self) -> None:
        await self.runBatches("request line", "methods", "paths")

    async def test_headersOriginsAndFraming(self) -> None:
        await self.runBatches("headers", "origins", "framing")

    async def test_jsonBodies(self) -> None:
        await self.runBatches("json", "anonymous")

    async def test_notTlsAndBrokenHandshakes(self) -> None:
        await self.runBatches("transport")

    async def test_slowClients(self) -> None:
        await self.runBatches("slow")
        # Every slow case is gone: nothing is left holding a connection.
        await deferLater(reactor, 1.5, lambda: None)
        self.assertLessEqual(len(self.service.factory.connections), 1)

    async def test_everythingAtOnce(self) -> None:
        """All batches together, while good clients keep asking: they are served throughout."""
        stop = threading.Event()
        served: list[int] = []

        def keepAsking() -> None:
            deadline = time.monotonic() + 120
            while not stop.is_set() and time.monotonic() < deadline and len(served) < 2000:
                response = self.target.good.call()
                served.append(response.status)
                if response.status == 200:
                    self.tokens.append(response.json()["token"])

        background = deferToThread(keepAsking)
        try:
            cases = [hostile for build in BATCHES.values() for hostile in build()]
            problems = await deferToThread(runBatch, self.target, cases)
        finally:
            stop.set()
            await background
        self.assertEqual(problems, {}, "\n".join(f"  {case}: {what}" for case, what in problems.items()))
        self.assertGreater(len(served), 10)
        self.assertEqual(set(served), {200})
        await self.runBatches()


class OverlongLineTests(TestCase):
    """A request or header line over Twisted's 16 KiB line limit."""

    timeout = 30

    async def test_refusedAtOnce(self) -> None:
        """
        BUG: LineReceiver.lineLengthExceeded calls transport.loseConnection(), which
        over TLS does not close the connection while HTTPChannel is registered as
        its producer: the connection stays open (TLS transport "disconnecting")
        until the request deadline answers 408 and closes it. Like every other
        unparseable request it should get Twisted's bare 400 and be closed at once
        (for example IssuerChannel.lineLengthExceeded calling
        self._respondToBadRequestAndDisconnect()).
        """
        pki = TestPKI(self.mktemp())
        port, _ = startIssuer(self, pki, **{"request-timeout": "5"})
        target = Target(port, pki)
        for name, data in (
            ("request line", request(path=b"/" + b"a" * 20000)),
            ("header line", request(headers=[(b"X-Huge", b"h" * 20000)])),
        ):
            outcome = await deferToThread(target.run, case(name, data, (400, CLOSED)))
            self.assertEqual(problemsWith(case(name, data, (400, CLOSED)), outcome), [], name)


class AsteriskTargetTests(TestCase):
    """
    The request-target "*" (RFC 9110's server-wide OPTIONS) is answered by Twisted
    itself (Request._handleStar), bypassing the resource tree.
    """

    timeout = 30

    async def test_answeredLikeEveryOtherPath(self) -> None:
        """
        BUG: "OPTIONS *" gets 200 and any other method on "*" a 405, both with an empty
        body and "Server: TwistedWeb/<version>" (the only answers that name the
        server software and its version), instead of the service's JSON and
        "Server: tokenissuer".
        """
        pki = TestPKI(self.mktemp())
        port, _ = startIssuer(self, pki)
        target = Target(port, pki)
        for method in (b"OPTIONS", b"POST", b"GET", b"TRACE"):
            hostile = case(f"{method.decode()} *", request(method=method, path=b"*"), (200, 204, 404, 405))
            outcome = await deferToThread(target.run, hostile)
            [answer] = outcome.answers
            self.assertEqual(answer.header(b"server"), b"tokenissuer", outcome.raw)
            if method != b"OPTIONS":
                self.assertEqual(problemsWith(hostile, outcome), [])


class RefusalPathsTests(TestCase):
    """Every way of being refused, on one issuer with an allow-list, a policy file and a CRL: none mints."""

    timeout = 60

    async def test_noRefusalMints(self) -> None:
        pki = TestPKI(self.mktemp())
        logs = LogCapture(self)
        revoked = devpki.issueClient(pki.ca, "Revoked")
        nextWeek = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
        crl = makeCRL(pki.ca, [revoked.certificate.serial_number], nextWeek)
        crlPath = pki.write("ca.crl", crl.public_bytes(serialization.Encoding.PEM))
        policy = {
            "clients": [
                {"subject": "Martin2", "audiences": ["gschmarri"], "flags": 1},
                {"subject": "Anne", "audiences": ["dummy"], "flags": 2},
            ]
        }
        policyPath = pki.write("policy.json", json.dumps(policy).encode())
        port, _ = startIssuer(self, pki, crl=crlPath, **{"policy-file": policyPath})
        ca = pki.path("ca.pem")
        files = {
            "Martin2": pki.clientFiles(pki.client, "martin"),
            "Anne": pki.clientFiles(devpki.issueClient(pki.ca, "Anne"), "anne"),
            "Stranger": pki.clientFiles(devpki.issueClient(pki.ca, "Stranger"), "stranger"),
            "Revoked": pki.clientFiles(revoked, "revoked"),
            "NoName": pki.clientFiles(pki.noCommonName, "noname"),
        }

        def ask(who: str | None, audience: str, origin: str | None = None) -> tuple[int, str]:
            client = Client(port, ca, *(files[who] if who else (None, None)))
            headers = {"Origin": origin} if origin else {}
            try:
                response = client.call(body=json.dumps({"audience": audience}).encode(), headers=headers)
            except (ssl.SSLError, OSError):
                return 0, "handshake refused"
            return response.status, response.json().get("error", "token")

        cases = [
            (("Martin2", "gschmarri"), (200, "token")),
            (("Anne", "dummy"), (200, "token")),
            (("Revoked", "gschmarri"), (0, "handshake refused")),
            (("Stranger", "gschmarri"), (403, "subject_not_allowed")),
            (("Anne", "gschmarri"), (403, "audience_not_allowed")),
            (("Martin2", "dummy"), (403, "audience_not_allowed")),
            (("Martin2", "not-on-the-allow-list"), (403, "audience_not_allowed")),
            (("Martin2", "gschmarri", "https://evil.example"), (403, "origin_not_allowed")),
            ((None, "gschmarri"), (401, "client_certificate_required")),
            (("NoName", "gschmarri"), (403, "subject_missing")),
        ]
        results = await deferToThread(lambda: [ask(*arguments) for arguments, _ in cases])
        self.assertEqual(results, [expected for _, expected in cases])
        self.assertEqual(sorted(event["sub"] for event in logs.issued()), ["Anne", "Martin2"])
        self.assertNotIn(TEST_HMAC_KEY, logs.text())
