"""
The diagnostic page: one self-contained HTML page (inline script and style, no
other fetches) served over plain HTTP on its own port. It calls the issuer
cross-origin the way a web application should, with C{credentials: 'include'},
and shows the decoded token or, in plain words, why there is none.

Opt-in with C{--demo-port} / C{TOK_ISS_DEMO_PORT}; on by default in development
mode. The page holds no secret: only the issuer URL and an audience to prefill.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Callable

from cryptography import x509
from twisted.web import resource, server

#: The path the page calls (the original issuer's).
ISSUE_PATH = "/jwthmac/issue"
#: The audience prefilled when the issuer allows any.
FALLBACK_AUDIENCE = "gschmarri"


def issuerUrlFor(certificate: x509.Certificate, port: int | None) -> str:
    """
    The issue URL a browser on this machine should call: a host name the server
    certificate is valid for (its first DNS name without a wildcard, else its
    first IP address, else localhost) and the port the issuer listens on.
    """
    host = "localhost"
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is not None:
        dnsNames = [name for name in names.get_values_for_type(x509.DNSName) if "*" not in name]
        addresses = names.get_values_for_type(x509.IPAddress)
        if dnsNames:
            host = dnsNames[0]
        elif addresses:
            address = addresses[0]
            host = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
    portText = "" if port in (None, 443) else f":{port}"
    return f"https://{host}{portText}{ISSUE_PATH}"


def pageUrlFor(host: str, port: int) -> str:
    """The URL to open the page at, for a listening address (a wildcard address becomes localhost)."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - naming the wildcard, not binding to it
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def _scriptJson(value: object) -> str:
    """JSON safe to place inside a <script> element (no closing tag, no HTML comment)."""
    text = json.dumps(value)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class DemoPage(resource.Resource):
    """C{GET /}: the page; every other path is 404 and every other method 405."""

    isLeaf = True

    def __init__(self, issuerUrl: Callable[[], str], audience: str) -> None:
        super().__init__()
        self._issuerUrl = issuerUrl
        self._audience = audience

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"Server", b"tokenissuer")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Use GET.\n"
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Not found: the diagnostic page is at /\n"
        nonce = secrets.token_urlsafe(18)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(
            b"Content-Security-Policy",
            (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "connect-src https: http:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            ).encode("ascii"),
        )
        request.setHeader(b"X-Frame-Options", b"DENY")
        config = {"issuerUrl": self._issuerUrl(), "audience": self._audience}
        page = PAGE.replace("{{nonce}}", nonce).replace("{{config}}", _scriptJson(config))
        return page.encode("utf-8")


class DemoSite(server.Site):
    """The page's own small site: no access log (the issuer logs its own events)."""

    noisy = False

    def log(self, request: object) -> None:
        pass


def buildDemoSite(issuerUrl: Callable[[], str], audience: str) -> DemoSite:
    """The site for the demo listener; C{issuerUrl} is asked on every page load."""
    return DemoSite(DemoPage(issuerUrl, audience))


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tokenissuer: browser check</title>
<style nonce="{{nonce}}">
  :root { color-scheme: light; --ok: #1a7f37; --bad: #b42318; --warn: #9a6700; --line: #d0d7de; }
  body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
         margin: 0; background: #f6f8fa; color: #1f2328; }
  main { max-width: 50rem; margin: 0 auto; padding: 1.5rem 1.25rem 3rem; }
  h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
  h2 { font-size: 1.2rem; margin: 0 0 .5rem; }
  p { margin: .5rem 0; }
  code, pre { font: 14px/1.45 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
  code { background: #eaeef2; padding: 0 .25em; border-radius: 4px; overflow-wrap: anywhere; }
  pre { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .75rem;
        overflow-x: auto; margin: .5rem 0; }
  form { display: grid; grid-template-columns: 7rem 1fr; gap: .5rem .75rem; align-items: center;
         background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; margin: 1rem 0; }
  input { font: inherit; padding: .3rem .5rem; border: 1px solid #8c959f; border-radius: 6px; min-width: 0; }
  button { grid-column: 2; justify-self: start; font: inherit; font-weight: 600; padding: .35rem 1rem;
           border-radius: 6px; border: 1px solid #1f6feb; background: #1f6feb; color: #fff; cursor: pointer; }
  #result { background: #fff; border: 1px solid var(--line); border-left: 6px solid #8c959f;
            border-radius: 8px; padding: 1rem 1.25rem; }
  #result[data-outcome="token"] { border-left-color: var(--ok); }
  #result[data-outcome="token"] h2 { color: var(--ok); }
  #result[data-outcome="pending"] h2 { color: #57606a; }
  #result.refused { border-left-color: var(--bad); }
  #result.refused h2 { color: var(--bad); }
  table { border-collapse: collapse; width: 100%; margin: .5rem 0; }
  th, td { text-align: left; vertical-align: top; padding: .25rem .5rem; border-bottom: 1px solid #eaeef2; }
  th { width: 4.5rem; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-weight: 600; }
  td.note { color: #57606a; }
  .countdown { font-size: 1.1rem; font-weight: 600; }
  .countdown.expired { color: var(--bad); }
  .small { color: #57606a; font-size: .9rem; }
  li { margin: .3rem 0; }
  details { margin-top: .75rem; }
</style>
</head>
<body>
<main>
<h1>tokenissuer: browser check</h1>
<p>This page asks the token issuer for a token the way a web application does: a cross-origin
<code>fetch</code> with <code>credentials: 'include'</code>, so that your browser presents its client
certificate. It shows the token it gets, or why it got none.</p>
<form id="form">
  <label for="issuer">Issuer URL</label><input id="issuer" type="url" required spellcheck="false">
  <label for="audience">Audience</label><input id="audience" required spellcheck="false">
  <button type="submit" id="again">Ask again</button>
</form>
<p class="small">This page's origin: <code id="origin"></code>. The issuer must list it in
<code>TOK_ISS_ALLOWED_ORIGINS</code>.</p>
<section id="result" aria-live="polite" data-outcome="pending"><h2>Not asked yet</h2></section>
<details>
  <summary>The call this page makes</summary>
  <pre id="call"></pre>
</details>
</main>
<script id="config" type="application/json">{{config}}</script>
<script nonce="{{nonce}}">
"use strict";
(() => {
  const config = JSON.parse(document.getElementById("config").textContent);
  const params = new URLSearchParams(window.location.search);
  const issuerInput = document.getElementById("issuer");
  const audienceInput = document.getElementById("audience");
  const result = document.getElementById("result");
  const pageOrigin = window.location.origin;
  issuerInput.value = params.get("issuer") || config.issuerUrl;
  audienceInput.value = params.get("audience") || config.audience;
  document.getElementById("origin").textContent = pageOrigin;
  let timer = null;

  // Build DOM nodes; strings always become text, never markup.
  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value; else node.setAttribute(key, value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  const code = (text) => h("code", {}, text);

  function show(outcome, refused, title, ...nodes) {
    if (timer !== null) { clearInterval(timer); timer = null; }
    result.dataset.outcome = outcome;
    result.classList.toggle("refused", refused);
    result.replaceChildren(h("h2", {}, title), ...nodes);
  }

  function fetchOptions(audience) {
    return {
      method: "post",
      credentials: "include",
      headers: {"Content-Type": "application/json", "Accept": "application/json"},
      body: JSON.stringify({audience}),
    };
  }

  function describeCall(url, audience) {
    document.getElementById("call").textContent = [
      "const response = await fetch(" + JSON.stringify(url) + ", {",
      '  method: "post",',
      '  credentials: "include",  // without it, Firefox sends no client certificate',
      '  headers: {"Content-Type": "application/json", "Accept": "application/json"},',
      "  body: JSON.stringify({audience: " + JSON.stringify(audience) + "}),",
      "});",
      "const answer = await response.json();  // {token, expires_in} or {error, message}",
    ].join("\\n");
  }

  function decodePart(part) {
    const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - base64.length % 4) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder("utf-8", {fatal: true}).decode(bytes));
  }

  function when(seconds) {
    const date = new Date(seconds * 1000);
    return date.toLocaleString(undefined, {dateStyle: "medium", timeStyle: "medium"}) +
      " (" + date.toISOString().replace(".000Z", "Z") + ")";
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const parts = [[Math.floor(s / 3600), "h"], [Math.floor((s % 3600) / 60), "min"], [s % 60, "s"]];
    return parts.filter(([n]) => n > 0).map(([n, unit]) => n + " " + unit).join(" ") || "0 s";
  }

  const CLAIM_NOTES = {
    sub: "subject: the name from your client certificate (by default its common name, CN)",
    aud: "audience: the service this token is for",
    iss: "issuer",
    iat: "issued at",
    exp: "expires at",
    jti: "token id: the issuer's log names it, never the token",
    flags: "flags: attributes the issuer's policy gives you (0 without a policy)",
    cnf: "confirmation: the token is bound to your client certificate (RFC 8705)",
  };

  function showToken(answer) {
    let header, claims;
    try {
      const parts = answer.token.split(".");
      if (parts.length !== 3) throw new Error("not three parts");
      header = decodePart(parts[0]);
      claims = decodePart(parts[1]);
    } catch (error) {
      show("error", true, "The answer holds no readable token",
        h("p", {}, "The issuer answered 200, but the token could not be decoded: " + error.message));
      return;
    }
    const rows = Object.entries(claims).map(([name, value]) => {
      const shown = (name === "iat" || name === "exp") && Number.isInteger(value)
        ? value + " = " + when(value) : JSON.stringify(value);
      return h("tr", {}, h("th", {}, name), h("td", {}, shown), h("td", {class: "note"}, CLAIM_NOTES[name] || ""));
    });
    const countdown = h("p", {class: "countdown", id: "countdown"});
    const tick = () => {
      const left = claims.exp - Date.now() / 1000;
      countdown.classList.toggle("expired", left <= 0);
      countdown.textContent = left > 0
        ? "Expires in " + duration(left) + " (lifetime " + duration(answer.expires_in) + ")"
        : "Expired " + duration(-left) + " ago: ask again for a new one";
    };
    show("token", false, "Token received for " + claims.sub,
      h("p", {}, "The issuer accepted your client certificate and issued a token for the audience ",
        code(claims.aud), "."),
      countdown,
      h("table", {id: "claims"}, h("caption", {class: "small"}, "Claims"), rows),
      h("p", {class: "small"}, "Header: ", code(JSON.stringify(header)),
        ". This page cannot check the signature: only the issuer and the services that accept the ",
        "token hold the key."),
      h("details", {}, h("summary", {}, "Show the token itself"), h("pre", {}, answer.token)));
    if (Number.isInteger(claims.exp)) { tick(); timer = setInterval(tick, 1000); }
  }

  function issuerSaid(answer) {
    return answer && answer.message ? h("p", {class: "small"}, "The issuer said: ", answer.message) : null;
  }

  function showNoCertificate(answer) {
    show("no_certificate", true, "No client certificate was presented",
      h("p", {}, "The issuer answered, but your browser sent no client certificate with the request, " +
        "so it issued no token (401 ", code("client_certificate_required"), ")."),
      h("ul", {},
        h("li", {}, "Is a client certificate installed in this browser? It must come from a CA that the issuer " +
          "trusts. Import the PKCS#12 file (", code(".p12"), ") in the browser's certificate settings, under " +
          "\\"Your certificates\\". In development mode that is ", code("tokenissuer-dev/client.p12"),
          " with the password ", code("tokenissuer-dev"), "."),
        h("li", {}, "Did you cancel the browser's certificate prompt, or choose not to send one? The browser " +
          "remembers that choice for this issuer until it restarts: close every window of the browser, then " +
          "open this page again."),
        h("li", {}, "Did you import the certificate while the browser was running? Restart the browser.")),
      issuerSaid(answer));
  }

  function showOriginNotAllowed(answer) {
    show("origin_not_allowed", true, "This page's origin is not allowed",
      h("p", {}, "The issuer is reachable and your browser trusts it, but it does not allow calls from this " +
        "page's origin:"),
      h("p", {}, code(pageOrigin)),
      h("p", {}, "Add it to the issuer's allowed origins and restart the issuer, for example ",
        code("TOK_ISS_ALLOWED_ORIGINS=\\"" + pageOrigin + "\\""), " (or ", code("--origins " + pageOrigin),
        "), next to any origins already there."),
      answer ? issuerSaid(answer) : h("p", {class: "small"},
        "The browser hides the issuer's refusal (403 ", code("origin_not_allowed"), ") from the page; this " +
        "page tells it from a second, plain request that did reach the issuer."));
  }

  function showUnreachable(url, error) {
    let link;
    try { link = new URL(url).href; } catch { link = url; }
    show("unreachable", true, "The browser could not talk to the issuer",
      h("p", {}, "The request failed before any answer reached this page. From inside a page, two causes " +
        "look the same:"),
      h("ol", {},
        h("li", {}, h("strong", {}, "The browser does not trust the issuer's TLS certificate. "),
          "The CA that signed it is not imported into this browser as trusted for websites (in development " +
          "mode: ", code("tokenissuer-dev/ca.pem"), "), or the host name in the URL is not one the " +
          "certificate is for."),
        h("li", {}, h("strong", {}, "The issuer is unreachable. "),
          "It is not running, the host name or port is wrong, or a firewall is in the way.")),
      h("p", {}, "How to tell: open the issuer URL directly, in a new tab: ",
        h("a", {href: link, target: "_blank", rel: "noopener noreferrer"}, link)),
      h("ul", {},
        h("li", {}, "A certificate warning means cause 1: import the CA, then reload this page."),
        h("li", {}, "\\"Unable to connect\\" or \\"This site can't be reached\\" means cause 2."),
        h("li", {}, "A JSON answer (", code("method_not_allowed"), ", since the tab sends GET) means the issuer " +
          "is reachable and trusted. Then check that this page's origin, ", code(pageOrigin), ", is in ",
          code("TOK_ISS_ALLOWED_ORIGINS"), ", and that the issuer runs with ", code("client-auth optional"),
          ": with ", code("required"), " Firefox cannot pass the CORS preflight.")),
      h("p", {class: "small"}, "The browser's error: " + error));
  }

  async function reachableWithoutCors(url) {
    // A no-cors request resolves (with an opaque answer) exactly when TLS and
    // the connection worked, whatever the issuer answered.
    try {
      await fetch(url, {mode: "no-cors", credentials: "omit", cache: "no-store"});
      return true;
    } catch {
      return false;
    }
  }

  async function ask() {
    const url = issuerInput.value.trim();
    const audience = audienceInput.value;
    describeCall(url, audience);
    try {
      new URL(url);
    } catch {
      show("error", true, "That is not a URL", h("p", {}, "Enter the issuer URL, like ",
        code("https://localhost:4443/jwthmac/issue"), "."));
      return;
    }
    show("pending", false, "Asking the issuer…", h("p", {}, "POST ", code(url)));
    let response;
    try {
      response = await fetch(url, fetchOptions(audience));
    } catch (error) {
      if (await reachableWithoutCors(url)) showOriginNotAllowed(null);
      else showUnreachable(url, String(error));
      return;
    }
    let answer = null;
    try { answer = await response.json(); } catch { answer = null; }
    const error = answer && typeof answer.error === "string" ? answer.error : null;
    if (response.ok && answer && typeof answer.token === "string") {
      showToken(answer);
    } else if (error === "client_certificate_required") {
      showNoCertificate(answer);
    } else if (error === "origin_not_allowed") {
      showOriginNotAllowed(answer);
    } else if (error === "audience_not_allowed") {
      show("audience_not_allowed", true, "The audience is not allowed",
        h("p", {}, "The issuer does not issue tokens for the audience ", code(audience), ". Ask for an " +
          "audience that the issuer is configured for (", code("TOK_ISS_ALLOWED_AUDIENCES"), "), or ask its " +
          "operator to add this one."),
        issuerSaid(answer));
    } else {
      show("error", true, "The issuer refused: HTTP " + response.status + (error ? " " + error : ""),
        answer && answer.message ? h("p", {}, answer.message)
          : h("p", {}, "The answer was not the issuer's JSON. Is the URL the issuer's issue endpoint?"));
    }
  }

  document.getElementById("form").addEventListener("submit", (event) => {
    event.preventDefault();
    ask();
  });
  ask();
})();
</script>
</body>
</html>
"""
