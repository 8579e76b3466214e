"""
Server CPU per token, for sizing pods: the issuer against a reference server in
the same run.

The reference is the least a TLS token endpoint on this stack can cost: the same
Twisted + pyOpenSSL TLS context (same certificates, cipher suites, client
certificate verification), answering a fixed JSON body without JWT, routing or
checks. Each request opens a new TLS connection, as a browser or script that
fetches one token usually does. Server CPU is read from /proc, so the load
generator's speed does not change the figures. Bounded: a fixed request count
and a time limit per run.

    python benchmarks/cpu_per_token.py [--requests 600] [--clients 2]

Prints a markdown table; writes it to benchmarks/results/cpu_per_token.md.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from tokenissuer import devpki  # noqa: E402

KEY = "benchmark-hmac-key-0123456789-0123456789-0123456789"
REFERENCE_SERVER = textwrap.dedent(
    """
    import sys
    from twisted.internet import endpoints, reactor
    from twisted.web import resource, server
    from tokenissuer.pemfiles import loadClientCAs, loadServerIdentity
    from tokenissuer.tls import IssuerTLSFactory, ServerConnectionCreator, buildServerContext

    class Fixed(resource.Resource):
        isLeaf = True
        def render_POST(self, request):
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"token":"fixed","expires_in":3600}'

    cert, key, ca = sys.argv[1:4]
    context = buildServerContext(loadServerIdentity(cert, key), loadClientCAs(ca), "required")
    site = server.Site(Fixed())
    site.log = lambda request: None
    factory = IssuerTLSFactory(ServerConnectionCreator(context), site)
    def ready(port):
        print("ready port", port.getHost().port, flush=True)
    endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory).addCallback(ready)
    reactor.run()
    """
)


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(re.search(r"VmRSS:\s+(\d+)", handle.read()).group(1))  # type: ignore[union-attr]


def worker(arguments: tuple[int, str, str, str, int, float]) -> int:
    port, ca, cert, key, count, deadline = arguments
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    done = 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection = http.client.HTTPConnection("localhost", port, timeout=10)
        connection.sock = context.wrap_socket(raw, server_hostname="localhost")
        connection.request(
            "POST", "/jwthmac/issue", body=b'{"audience": "gschmarri"}', headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        connection.close()
        if response.status == 200:
            done += 1
    return done


def start(command: list[str], environ: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"(?:ready port|\(port) (\d+)", line)
        if match:
            # Keep reading the log so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # type: ignore[union-attr]
            return process, int(match.group(1))
    raise RuntimeError("server did not start")


def measure(
    process: subprocess.Popen[str], port: int, files: dict[str, str], requests: int, clients: int
) -> dict[str, float]:
    # Warm up (imports, first handshakes), then measure.
    worker((port, files["ca"], files["cert"], files["key"], 20, time.monotonic() + 30))
    before = cpuSeconds(process.pid)
    started = time.monotonic()
    perClient = requests // clients
    with multiprocessing.Pool(clients) as pool:
        done = sum(
            pool.map(worker, [(port, files["ca"], files["cert"], files["key"], perClient, started + 120)] * clients)
        )
    elapsed = time.monotonic() - started
    used = cpuSeconds(process.pid) - before
    return {"tokens": done, "cpu_ms": 1000 * used / done, "rate": done / elapsed, "rss_mib": rssKiB(process.pid) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--clients", type=int, default=2)
    options = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="tokenissuer-bench-")
    ca = devpki.makeCA()
    client = devpki.issueClient(ca, "bench")
    rows = []
    for keyKind in ("ec", "rsa"):
        server = devpki.issueServer(ca, keyKind=keyKind)
        files = {}
        for name, data in (
            ("ca", ca.certificatePEM()),
            ("server.crt", server.certificatePEM()),
            ("server.pem", server.keyPEM()),
            ("cert", client.certificatePEM()),
            ("key", client.keyPEM()),
        ):
            files[name] = os.path.join(folder, f"{keyKind}-{name}")
            with open(files[name], "wb") as handle:
                handle.write(data)
        environ = {**os.environ, "TOK_ISS_HMAC_SECRET": KEY, "PYTHONPATH": os.path.join(HERE, "..", "src")}
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        results = {}
        for name, command in (
            (
                "reference",
                [sys.executable, "-c", REFERENCE_SERVER, files["server.crt"], files["server.pem"], files["ca"]],
            ),
            (
                "tokenissuer",
                [
                    *twistd,
                    "-n",
                    "--pidfile=",
                    "tokenissuer",
                    "--listen",
                    "tcp:0:interface=127.0.0.1",
                    "--admin-listen",
                    "off",
                    "--cert",
                    files["server.crt"],
                    "--key",
                    files["server.pem"],
                    "--client-ca",
                    files["ca"],
                    "--audiences",
                    "gschmarri",
                ],
            ),
        ):
            process, port = start(command, environ)
            try:
                results[name] = measure(process, port, files, options.requests, options.clients)
            finally:
                process.terminate()
                process.wait(30)
        ours, reference = results["tokenissuer"], results["reference"]
        rows.append(
            f"| {'ECDSA P-256' if keyKind == 'ec' else 'RSA-2048'} | {ours['tokens']:.0f} | {ours['cpu_ms']:.2f} | "
            f"{reference['cpu_ms']:.2f} | {ours['cpu_ms'] / reference['cpu_ms']:.2f} | {1000 / ours['cpu_ms']:.0f} | "
            f"{ours['rss_mib']:.0f} |"
        )
    table = "\n".join(
        [
            f"New TLS connection per token, {options.clients} client processes, {os.cpu_count()} cores shared with the clients.",
            "",
            "| server key | tokens | tokenissuer CPU ms/token | reference CPU ms/token | ratio | tokens/s per core (CPU bound) | RSS MiB |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "cpu_per_token.md"), "w") as handle:
        handle.write(table + "\n")


if __name__ == "__main__":
    main()
