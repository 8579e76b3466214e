"""
The benchmark suite of issue 6: tokens per second, latency, server CPU per token
and memory of tokenissuer, against a C ceiling measured in the same run.

    python benchmarks/run.py [--quick] [--requests 2000] [--time-limit 10] [--repeats 3] [--no-workers]

What it does:

- Makes a throwaway PKI with tokenissuer.devpki: a CA, a client certificate, and
  two server certificates, one with an RSA-2048 key and one with an ECDSA P-256
  key.
- For each server key, starts two servers, both pinned to CPU 0 with
  ``taskset -c 0``:
  - the issuer: ``twistd -n --pidfile= tokenissuer --admin-listen off ...`` with
    ``TOK_ISS_HMAC_SECRET`` set (its log is drained in a thread);
  - the ceiling: nginx (Debian ``nginx-light``) on loopback with the same
    certificates, the same TLS 1.2 cipher suites, ``ssl_verify_client on``,
    returning a fixed JSON body (a real token, same size) for
    ``POST /jwthmac/issue``. It runs as one process (``master_process off``)
    with its own configuration, pid file and logs in a temporary folder.
- The load generators run on CPU 1 (this script pins itself there):
  - new connection per token: ApacheBench, ``ab -E client.pem`` (client
    certificate and key in one PEM; HTTP/1.0, so every request is a new TLS
    connection with a full handshake);
  - HTTP/1.1 keep-alive: the small generator below, one process per
    connection, each a blocking TLS socket that sends the same request over and
    over. Its ceiling is shown by the nginx rows: it drives nginx far above the
    issuer's rate.
  - resumed session: a returning client, as a browser is: a new TLS connection
    per token that resumes the previous connection's TLS session (the same
    generator processes, Python's ssl with C{session=}); every resumption is
    counted, and a run in which one failed says so. Python's TLS client is
    slower than ab, so the generator core's busy share tells whether nginx's
    figure is its own or the generator's.
- For each key type x mode x concurrency (1, 8, 32) it runs a bounded run (a
  fixed request count and a time limit) against nginx and then the issuer,
  repeated (3 times, 1 with --quick), and reports medians of tokens/s, p50 and
  p99 latency, and server CPU per request (utime+stime from /proc/PID/stat
  over the run, divided by completed requests). Every issuer figure is also
  given as a ratio to nginx's from the same run.
- Memory: RSS of the idle issuer (and nginx), and RSS growth per 100 idle
  keep-alive TLS connections (500 connections, one request each, kept open).
- Workers: the issuer with ``--workers 1`` and ``--workers 2`` on both cores
  (ab stays on CPU 1), new connection per token, ECDSA key: tokens/s and CPU
  per token of all issuer processes, as ratios to one worker.

Writes benchmarks/results/results.md (markdown) and results.png (matplotlib, if
installed), and benchmarks/results/raw.json. Needs ``ab`` (apache2-utils),
``nginx`` (nginx-light) and ``taskset`` (util-linux), and at least 2 CPUs.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)

from tokenissuer import devpki  # noqa: E402
from tokenissuer.tls import MOZILLA_INTERMEDIATE_CIPHERS  # noqa: E402

SECRET = "benchmark-hmac-key-0123456789-0123456789-0123456789"
AUDIENCE = "gschmarri"
BODY = json.dumps({"audience": AUDIENCE}).encode()
SERVER_CPU, CLIENT_CPU = 0, 1
CONCURRENCIES = (1, 8, 32)
MODES = ("new connection", "resumed session", "keep-alive")
KEYS = (("ec", "ECDSA P-256"), ("rsa", "RSA-2048"))


# --------------------------------------------------------------------------- /proc


def childrenOf(pid: int) -> list[int]:
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children += [int(child) for child in handle.read().split()]
    except OSError:
        pass
    return children


def cpuSeconds(pid: int) -> float:
    """User + system CPU seconds of a process and its living descendants (an issuer's workers)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpuSeconds(child) for child in childrenOf(pid))


def coreTimes(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat."""
    with open("/proc/stat") as handle:
        for line in handle:
            if line.startswith(f"cpu{cpu} "):
                values = [int(value) for value in line.split()[1:]]
                idle = values[3] + values[4]
                return sum(values) - idle, sum(values)
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def coreBusy(before: tuple[int, int], after: tuple[int, int]) -> float:
    return 100 * (after[0] - before[0]) / max(after[1] - before[1], 1)


def rssKiB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(re.search(r"VmRSS:\s+(\d+)", handle.read()).group(1))  # type: ignore[union-attr]


# --------------------------------------------------------------------------- servers


def freePort() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def waitForPort(port: int, process: subprocess.Popen, timeout: float = 30) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def drain(process: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Read the server's output for ever, so it never blocks on a full pipe."""
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # type: ignore[union-attr]


def startIssuer(files: dict[str, str], workers: int = 1, cpus: str = str(SERVER_CPU)) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    port = freePort()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    command = [
        "taskset", "-c", cpus,
        twistd, "-n", "--pidfile=", "tokenissuer", *(["--workers", str(workers)] if workers != 1 else []),
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--admin-listen", "off",
        "--cert", files["server.crt"], "--key", files["server.pem"], "--client-ca", files["ca"],
        "--audiences", AUDIENCE,
    ]  # fmt: skip
    environ = {**os.environ, "TOK_ISS_HMAC_SECRET": SECRET}
    process = subprocess.Popen(command, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    drain(process)
    waitForPort(port, process)
    return process, port


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        location = /jwthmac/issue {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def startNginx(files: dict[str, str], body: str, folder: str) -> tuple[subprocess.Popen, int]:  # type: ignore[type-arg]
    port = freePort()
    os.makedirs(folder, exist_ok=True)
    conf = os.path.join(folder, "nginx.conf")
    with open(conf, "w") as handle:
        handle.write(
            NGINX_CONF.format(
                dir=folder,
                port=port,
                cert=files["server.crt"],
                key=files["server.pem"],
                ca=files["ca"],
                ciphers=MOZILLA_INTERMEDIATE_CIPHERS.decode(),
                body=body,
            )
        )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    command = [
        "taskset",
        "-c",
        str(SERVER_CPU),
        nginx,
        "-p",
        folder,
        "-c",
        conf,
        "-e",
        os.path.join(folder, "error.log"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    drain(process)
    waitForPort(port, process)
    return process, port


def stop(process: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------- clients


def clientContext(files: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=files["ca"])
    context.load_cert_chain(files["cert"], files["key"])
    return context


def request(port: int, keepAlive: bool) -> bytes:
    return (
        f"POST /jwthmac/issue HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n{'' if keepAlive else 'Connection: close' + chr(13) + chr(10)}\r\n"
    ).encode() + BODY


def readResponse(sock: ssl.SSLSocket, buffer: bytearray) -> tuple[int, bytes]:
    """Read one HTTP/1.1 response with a Content-Length; return (status, body)."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).decode("latin-1")
            match = re.search(r"(?im)^content-length:\s*(\d+)", head)
            if not match:
                raise RuntimeError("response without Content-Length")
            total = end + 4 + int(match.group(1))
            while len(buffer) < total:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed mid-response")
                buffer += chunk
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            return int(head.split(" ", 2)[1]), body
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buffer += chunk


def fetchOnce(port: int, files: dict[str, str]) -> bytes:
    context = clientContext(files)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as sock:
        sock.sendall(request(port, keepAlive=False))
        status, body = readResponse(sock, bytearray())
    if status != 200:
        raise RuntimeError(f"status {status}: {body!r}")
    return body


def _generate(name, prepare, count, timeLimit, ready, go, results):  # type: ignore[no-untyped-def]
    """
    One generator process: C{prepare()} connects and returns a function that
    makes one request and returns (status, whether a TLS session was resumed);
    report ready, wait for the start, then make requests until done.
    """
    latencies: list[float] = []
    errors = resumed = 0
    try:
        once = prepare()
        ready.put(True)
        go.wait()
        deadline = time.monotonic() + timeLimit
        clock = time.perf_counter
        for _ in range(count):
            started = clock()
            status, reused = once()
            latencies.append(clock() - started)
            resumed += reused
            if status != 200:
                errors += 1
            if time.monotonic() > deadline:
                break
    except Exception as error:  # noqa: BLE001 - reported to the parent
        ready.put(False)
        errors += 1
        print(f"{name} worker:", error, file=sys.stderr)
    results.put((latencies, errors, time.monotonic(), resumed))


def keepAliveWorker(port, files, count, timeLimit, ready, go, results):  # type: ignore[no-untyped-def]
    """One persistent connection, the same request over and over."""

    def prepare():  # type: ignore[no-untyped-def]
        sock = clientContext(files).wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost"
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload, buffer = request(port, keepAlive=True), bytearray()

        def once() -> tuple[int, bool]:
            sock.sendall(payload)
            return readResponse(sock, buffer)[0], False

        return once

    _generate("keep-alive", prepare, count, timeLimit, ready, go, results)


def resumingWorker(port, files, count, timeLimit, ready, go, results):  # type: ignore[no-untyped-def]
    """A returning client: a new TLS connection per token, resuming the previous TLS session."""

    def prepare():  # type: ignore[no-untyped-def]
        context = clientContext(files)
        payload = request(port, keepAlive=False)
        state: dict[str, ssl.SSLSession | None] = {"session": None}

        def once() -> tuple[int, bool]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname="localhost", session=state["session"]) as sock:
                sock.sendall(payload)
                status, _ = readResponse(sock, bytearray())
                state["session"] = sock.session
                return status, sock.session_reused

        once()  # the first visit: a full handshake, outside the measurement
        return once

    _generate("resuming", prepare, count, timeLimit, ready, go, results)


def runKeepAlive(
    pid: int,
    port: int,
    files: dict[str, str],
    requests: int,
    concurrency: int,
    timeLimit: float,
    worker: object = keepAliveWorker,
) -> dict:  # type: ignore[type-arg]
    """Run C{concurrency} generator processes (keep-alive, or resuming with C{worker=resumingWorker})."""
    fork = multiprocessing.get_context("fork")
    ready, results, go = fork.Queue(), fork.Queue(), fork.Event()
    perConnection = max(1, requests // concurrency)
    workers = [
        fork.Process(target=worker, args=(port, files, perConnection, timeLimit, ready, go, results))
        for _ in range(concurrency)
    ]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=60)
    cpuBefore, clientBefore = cpuSeconds(pid), coreTimes(CLIENT_CPU)
    started = time.monotonic()
    go.set()
    latencies: list[float] = []
    errors, finished, resumed = 0, started, 0
    for _ in workers:
        part, failed, ended, *reused = results.get(timeout=timeLimit + 60)
        latencies += part
        errors += failed
        finished = max(finished, ended)
        resumed += sum(reused)
    cpuUsed, clientBusy = cpuSeconds(pid) - cpuBefore, coreBusy(clientBefore, coreTimes(CLIENT_CPU))
    for worker in workers:
        worker.join()
    latencies.sort()
    elapsed = finished - started
    return figures(
        len(latencies) - errors,
        errors,
        elapsed,
        elapsed,
        cpuUsed,
        clientBusy,
        1000 * latencies[len(latencies) // 2],
        1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        resumed=resumed,
    )


def figures(
    done: int,
    errors: int,
    elapsed: float,
    wall: float,
    cpuUsed: float,
    clientBusy: float,
    p50: float,
    p99: float,
    **extra: object,
) -> dict:  # type: ignore[type-arg]
    """One run's figures: rate over C{elapsed}, server busy share over C{wall}, CPU per completed request."""
    return {
        "done": done,
        "errors": errors,
        "rate": done / elapsed,
        "server_busy": 100 * cpuUsed / wall,
        "client_busy": clientBusy,
        "p50": p50,
        "p99": p99,
        "cpu_ms": 1000 * cpuUsed / max(done, 1),
        **extra,
    }


def runAb(
    pid: int, port: int, files: dict[str, str], requests: int, concurrency: int, timeLimit: float, folder: str
) -> dict:  # type: ignore[type-arg]
    percentiles = os.path.join(folder, "ab.csv")
    # -t before -n: -t alone implies 50000 requests, -n then sets the real bound.
    command = [
        "ab", "-q", "-r", "-t", str(int(timeLimit)), "-n", str(requests), "-c", str(concurrency), "-s", "10",
        "-E", files["pem"], "-p", files["body"], "-T", "application/json", "-e", percentiles,
        f"https://127.0.0.1:{port}/jwthmac/issue",
    ]  # fmt: skip
    cpuBefore, clientBefore, started = cpuSeconds(pid), coreTimes(CLIENT_CPU), time.monotonic()
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    cpuUsed, clientBusy = cpuSeconds(pid) - cpuBefore, coreBusy(clientBefore, coreTimes(CLIENT_CPU))
    wall = time.monotonic() - started
    text = output.stdout
    complete = re.search(r"Complete requests:\s+(\d+)", text)
    if output.returncode != 0 or not complete:
        raise RuntimeError(f"ab failed: {output.stdout[-2000:]} {output.stderr[-2000:]}")
    done = int(complete.group(1))
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", text)
    exceptions = re.search(
        r"Failed requests:\s+(\d+)\s+\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)", text
    )
    errors = int(non2xx.group(1)) if non2xx else 0
    if exceptions:
        errors += sum(int(exceptions.group(i)) for i in (2, 3, 4))
    elapsed = float(re.search(r"Time taken for tests:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    with open(percentiles) as handle:
        table = {int(float(row[0])): float(row[1]) for row in csv.reader(handle) if row[0][0].isdigit()}
    return figures(max(done - errors, 0), errors, elapsed, wall, cpuUsed, clientBusy, table[50], table[99])


def holdIdleConnections(pid: int, port: int, files: dict[str, str], count: int) -> dict:  # type: ignore[type-arg]
    """RSS before and after opening C{count} keep-alive connections, one request each, left open."""
    time.sleep(0.5)
    before = rssKiB(pid)
    context = clientContext(files)
    payload = request(port, keepAlive=True)
    sockets = []
    try:
        for _ in range(count):
            sock = context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost"
            )
            sock.sendall(payload)
            status, _ = readResponse(sock, bytearray())
            if status != 200:
                raise RuntimeError(f"status {status}")
            sockets.append(sock)
        time.sleep(1)
        after = rssKiB(pid)
    finally:
        for sock in sockets:
            sock.close()
    return {
        "idle_mib": before / 1024,
        "loaded_mib": after / 1024,
        "per100_mib": (after - before) / 1024 / (count / 100),
    }


# --------------------------------------------------------------------------- the suite


def writePKI(folder: str) -> dict[str, dict[str, str]]:
    ca = devpki.makeCA("tokenissuer benchmark CA")
    client = devpki.issueClient(ca, "bench-client")
    sets = {}
    for keyKind, _ in KEYS:
        server = devpki.issueServer(ca, keyKind=keyKind)
        files = {}
        for name, data in (
            ("ca", ca.certificatePEM()),
            ("server.crt", server.certificatePEM()),
            ("server.pem", server.keyPEM()),
            ("cert", client.certificatePEM()),
            ("key", client.keyPEM()),
            ("pem", client.certificatePEM() + client.keyPEM()),
            ("body", BODY),
        ):
            files[name] = os.path.join(folder, f"{keyKind}-{name}")
            with open(files[name], "wb") as handle:
                handle.write(data)
        sets[keyKind] = files
    return sets


def median(runs: list[dict], key: str) -> float:  # type: ignore[type-arg]
    return statistics.median(run[key] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat and fewer requests per run")
    parser.add_argument("--requests", type=int, help="requests per run (default 2000, keep-alive 5x; --quick 500)")
    parser.add_argument("--time-limit", type=float, default=10, help="seconds per run (default 10)")
    parser.add_argument("--repeats", type=int, help="repeats per configuration (default 3, --quick 1)")
    parser.add_argument("--idle-connections", type=int, default=500)
    parser.add_argument("--no-workers", action="store_true", help="skip the --workers 1 vs 2 comparison")
    parser.add_argument("--output", default=os.path.join(HERE, "results"))
    options = parser.parse_args()
    requests = options.requests or (500 if options.quick else 2000)
    repeats = options.repeats or (1 if options.quick else 3)
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs at least 2 CPUs: the servers run on CPU 0, the load generators on CPU 1")
    for tool in ("ab", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found (apt-get install apache2-utils util-linux)")
    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        sys.exit("nginx not found (apt-get install nginx-light)")
    os.sched_setaffinity(0, {CLIENT_CPU})
    began = time.monotonic()
    folder = tempfile.mkdtemp(prefix="tokenissuer-bench-")
    pki = writePKI(folder)
    results: dict = {  # type: ignore[type-arg]
        "requests": requests,
        "keepalive_requests": requests * 5,
        "time_limit": options.time_limit,
        "repeats": repeats,
        "idle_connections": options.idle_connections,
        "rows": [],
        "memory": {},
    }
    try:
        for keyKind, keyName in KEYS:
            files = pki[keyKind]
            issuer, issuerPort = startIssuer(files)
            token = fetchOnce(issuerPort, files).decode()
            nginx, nginxPort = startNginx(files, token.replace("'", ""), os.path.join(folder, f"nginx-{keyKind}"))
            servers = {"nginx": (nginx.pid, nginxPort), "issuer": (issuer.pid, issuerPort)}
            try:
                for name, (pid, port) in servers.items():
                    fetchOnce(port, files)
                    results["memory"][f"{name} {keyName}"] = holdIdleConnections(
                        pid, port, files, options.idle_connections
                    )
                    print(f"memory {name} {keyName}: {results['memory'][f'{name} {keyName}']}", flush=True)
                for mode in MODES:
                    for concurrency in CONCURRENCIES:
                        runs: dict[str, list[dict]] = {"nginx": [], "issuer": []}  # type: ignore[type-arg]
                        for _ in range(repeats):
                            for name, (pid, port) in servers.items():
                                if mode == "keep-alive":
                                    outcome = runKeepAlive(
                                        pid, port, files, requests * 5, concurrency, options.time_limit
                                    )
                                elif mode == "resumed session":
                                    outcome = runKeepAlive(
                                        pid, port, files, requests, concurrency, options.time_limit, resumingWorker
                                    )
                                else:
                                    outcome = runAb(pid, port, files, requests, concurrency, options.time_limit, folder)
                                runs[name].append(outcome)
                                print(
                                    f"{keyName:12} {mode:15} c={concurrency:<3} {name:6} {outcome['rate']:8.0f}/s "
                                    f"p50 {outcome['p50']:6.2f} p99 {outcome['p99']:6.2f} ms "
                                    f"cpu {outcome['cpu_ms']:.3f} ms/req busy {outcome['server_busy']:.0f}%/{outcome['client_busy']:.0f}% n={outcome['done']} errors={outcome['errors']}",
                                    flush=True,
                                )
                        row = {"key": keyName, "mode": mode, "concurrency": concurrency, "runs": runs}
                        for name in runs:
                            for metric in ("rate", "p50", "p99", "cpu_ms", "server_busy", "client_busy"):
                                row[f"{name}_{metric}"] = median(runs[name], metric)
                            row[f"{name}_errors"] = sum(run["errors"] for run in runs[name])
                        results["rows"].append(row)
            finally:
                stop(issuer)
                stop(nginx)
        if not options.no_workers:
            results["workers"] = compareWorkers(pki["ec"], requests, options.time_limit, repeats, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["seconds"] = time.monotonic() - began
    write(results, options.output, options.quick)


def compareWorkers(files: dict[str, str], requests: int, timeLimit: float, repeats: int, folder: str) -> list[dict]:  # type: ignore[type-arg]
    """
    --workers 1 and 2 on both cores (ab stays on CPU 1, so the generator shares a
    core with the second worker): new connection per token, ECDSA key.
    """
    rows = []
    for workers in (1, 2):
        issuer, port = startIssuer(files, workers=workers, cpus=f"{SERVER_CPU},{CLIENT_CPU}")
        try:
            fetchOnce(port, files)
            for concurrency in (8, 32):
                runs = []
                for _ in range(repeats):
                    cores = coreTimes(SERVER_CPU), coreTimes(CLIENT_CPU)
                    outcome = runAb(issuer.pid, port, files, requests * 2, concurrency, timeLimit, folder)
                    outcome["both_busy"] = (
                        coreBusy(cores[0], coreTimes(SERVER_CPU)) + coreBusy(cores[1], coreTimes(CLIENT_CPU))
                    ) / 2
                    runs.append(outcome)
                    print(
                        f"workers={workers} new connection c={concurrency} {outcome['rate']:8.0f}/s "
                        f"p99 {outcome['p99']:6.2f} ms cpu {outcome['cpu_ms']:.3f} ms/req errors={outcome['errors']}",
                        flush=True,
                    )
                row = {"workers": workers, "concurrency": concurrency, "runs": runs}
                for metric in ("rate", "p50", "p99", "cpu_ms", "both_busy"):
                    row[metric] = median(runs, metric)
                row["errors"] = sum(run["errors"] for run in runs)
                rows.append(row)
        finally:
            stop(issuer)
    return rows


def write(results: dict, output: str, quick: bool) -> None:  # type: ignore[type-arg]
    os.makedirs(output, exist_ok=True)
    nginxVersion = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split("/")[-1]
    lines = [
        f"Issuer (twistd, one process) and nginx {nginxVersion} (one process, same certificates, "
        "`ssl_verify_client on`, fixed JSON body), both pinned to CPU 0; load generators on CPU 1. "
        f"Median of {results['repeats']} run(s); each run at most {results['requests']} requests "
        f"(keep-alive: {results['keepalive_requests']}) and {results['time_limit']:.0f} s"
        f"{' (--quick)' if quick else ''}. Ratio = issuer / nginx. CPU = server CPU per request. "
        f"Suite took {results['seconds'] / 60:.1f} min.",
        "",
        "| server key | mode | conc. | nginx tokens/s | issuer tokens/s | ratio | nginx p50 / p99 ms | issuer p50 / p99 ms "
        "| p99 ratio | nginx CPU ms | issuer CPU ms | CPU ratio | issuer tokens/s per core (1000 / CPU ms) "
        "| server core busy % nginx / issuer | generator core busy % nginx / issuer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['key']} | {row['mode']} | {row['concurrency']} | {row['nginx_rate']:.0f} | {row['issuer_rate']:.0f} "
            f"| {row['issuer_rate'] / row['nginx_rate']:.2f} | {row['nginx_p50']:.2f} / {row['nginx_p99']:.2f} "
            f"| {row['issuer_p50']:.2f} / {row['issuer_p99']:.2f} | {row['issuer_p99'] / row['nginx_p99']:.1f} "
            f"| {row['nginx_cpu_ms']:.3f} | {row['issuer_cpu_ms']:.3f} | {row['issuer_cpu_ms'] / row['nginx_cpu_ms']:.2f} "
            f"| {1000 / row['issuer_cpu_ms']:.0f} | {row['nginx_server_busy']:.0f} / {row['issuer_server_busy']:.0f} "
            f"| {row['nginx_client_busy']:.0f} / {row['issuer_client_busy']:.0f} |"
        )
    errors = sum(row["nginx_errors"] + row["issuer_errors"] for row in results["rows"])
    lines += ["", f"Failed requests over all runs: {errors}."]
    resumedRuns = [
        run
        for row in results["rows"]
        if row["mode"] == "resumed session"
        for name in row["runs"]
        for run in row["runs"][name]
    ]
    if resumedRuns:
        lines.append(
            f"Resumed-session runs: {sum(run['resumed'] for run in resumedRuns)} of "
            f"{sum(run['done'] + run['errors'] for run in resumedRuns)} connections resumed their TLS session."
        )
    lines.append("")
    if results.get("workers"):
        single = {row["concurrency"]: row for row in results["workers"] if row["workers"] == 1}
        lines += [
            "Workers (`--workers 1` and `2`, ECDSA P-256, new connection per token; the issuer may use both "
            "cores, ab runs on CPU 1, so the second worker shares a core with the load generator). "
            "CPU = CPU of all issuer processes per token.",
            "",
            "| workers | conc. | tokens/s | vs 1 worker | p50 / p99 ms | CPU ms | CPU vs 1 worker "
            "| both cores busy % (issuer + ab) | failed |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["workers"]:
            base = single[row["concurrency"]]
            lines.append(
                f"| {row['workers']} | {row['concurrency']} | {row['rate']:.0f} | {row['rate'] / base['rate']:.2f}x "
                f"| {row['p50']:.2f} / {row['p99']:.2f} | {row['cpu_ms']:.3f} | {row['cpu_ms'] / base['cpu_ms']:.2f}x "
                f"| {row['both_busy']:.0f} | {row['errors']} |"
            )
        lines.append("")
    lines += [
        f"Memory (RSS; growth measured with {results['idle_connections']} idle keep-alive TLS connections, "
        "one request each, kept open):",
        "",
        f"| server | idle RSS MiB | RSS with {results['idle_connections']} connections MiB | growth per 100 connections MiB |",
        "|---|---|---|---|",
    ]
    for name, memory in results["memory"].items():
        lines.append(f"| {name} | {memory['idle_mib']:.1f} | {memory['loaded_mib']:.1f} | {memory['per100_mib']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with open(os.path.join(output, "results.md"), "w") as handle:
        handle.write(table)
    with open(os.path.join(output, "raw.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: wrote only the table", file=sys.stderr)
        return
    figure, axes = plt.subplots(2, 4, figsize=(20, 8))
    for column, (mode, metric, label) in enumerate(
        (
            ("new connection", "rate", "tokens/s"),
            ("resumed session", "rate", "tokens/s"),
            ("keep-alive", "rate", "tokens/s"),
            ("new connection", "cpu_ms", "server CPU ms/req"),
        )
    ):
        for line, (_, keyName) in enumerate(KEYS):
            axis = axes[line][column]
            rows = [row for row in results["rows"] if row["mode"] == mode and row["key"] == keyName]
            positions = range(len(rows))
            for offset, name, colour in ((-0.2, "nginx", "tab:green"), (0.2, "issuer", "tab:blue")):
                axis.bar(
                    [p + offset for p in positions],
                    [row[f"{name}_{metric}"] for row in rows],
                    0.4,
                    label=name,
                    color=colour,
                )
            axis.set_xticks(list(positions), [f"c={row['concurrency']}" for row in rows])
            axis.set_title(f"{keyName}, {mode}: {label}")
            axis.legend()
    figure.suptitle("tokenissuer vs nginx (same certificates, client verification), one core each")
    figure.tight_layout()
    figure.savefig(os.path.join(output, "results.png"), dpi=90)


if __name__ == "__main__":
    main()
