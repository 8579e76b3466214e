"""
--workers N: the option; the supervisor's parts on their own (re-logged worker
lines, restart pacing, stopping); and the real twistd command with two workers:
both serve over mutual TLS, /metrics counts every token, a killed worker is
started again, SIGHUP reaches every worker, SIGTERM stops them all with status
0, and no worker outlives a supervisor killed with SIGKILL.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tokenissuer.audit import jsonLineObserver, textLineObserver
from tokenissuer.config import MAX_WORKERS, ConfigError, IssuerOptions, argumentsFor, availableCPUs, resolveSettings
from tokenissuer.workers import (
    RESTART_LIMIT,
    RESTART_WINDOW,
    WORKER_FD,
    LineBuffer,
    WorkerPool,
    WorkerRole,
    workerEvent,
    workerRoleFrom,
)

from . import test_operations
from .consumer import consumerVerify
from .support import TEST_HMAC_KEY, Client, IssuerProcess, TestPKI, cleanEnviron, issuerCommand, spawnIssuer
from .test_deploy import freePort
from .test_operations import adminGet, metricValue

ENV = {"TOK_ISS_HMAC_SECRET": TEST_HMAC_KEY}
T = TypeVar("T")


def _options(*argv: str) -> IssuerOptions:
    options = IssuerOptions()
    options.parseOptions(list(argv))
    return options


class WorkersOptionTests(SynchronousTestCase):
    """--workers / TOK_ISS_WORKERS: a whole number from 1 to 64, or auto."""

    def test_defaultIsOne(self) -> None:
        """One process, as before the option existed."""
        self.assertEqual(resolveSettings(_options(), ENV).workers, 1)

    def test_environment(self) -> None:
        self.assertEqual(resolveSettings(_options(), {**ENV, "TOK_ISS_WORKERS": "4"}).workers, 4)

    def test_commandLineWins(self) -> None:
        self.assertEqual(resolveSettings(_options("--workers", "3"), {**ENV, "TOK_ISS_WORKERS": "5"}).workers, 3)

    def test_bounds(self) -> None:
        for text in ("1", " 2 ", str(MAX_WORKERS)):
            with self.subTest(text=text):
                self.assertEqual(resolveSettings(_options("--workers", text), ENV).workers, int(text))

    def test_autoIsTheCPUsThisProcessMayUse(self) -> None:
        expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.assertEqual(availableCPUs(), expected)
        for text in ("auto", "AUTO", " Auto "):
            with self.subTest(text=text):
                self.assertEqual(resolveSettings(_options("--workers", text), ENV).workers, min(expected, MAX_WORKERS))

    def test_refusals(self) -> None:
        """Anything else is one line naming the value and where it came from."""
        for text in ("0", "-1", str(MAX_WORKERS + 1), "x", "1.5", "", "2 3", "\u0663", "0x2", "1e1"):
            with self.subTest(text=text):
                error = self.assertRaises(ConfigError, resolveSettings, _options(), {**ENV, "TOK_ISS_WORKERS": text})
                message = str(error)
                self.assertIn("TOK_ISS_WORKERS", message)
                self.assertIn(repr(text), message)
                self.assertIn("auto", message)
                self.assertNotIn("\n", message)
        error = self.assertRaises(ConfigError, resolveSettings, _options("--workers", "0"), ENV)
        self.assertIn("--workers", str(error))

    def test_help(self) -> None:
        """--help lists the option with its variable; the supervisor's own options say they are internal."""
        text = str(IssuerOptions())
        self.assertTrue(re.search(r"--workers=.*\[env\s+TOK_ISS_WORKERS\]", " ".join(text.split())), text)
        for internal in ("--worker-fd", "--worker-parent"):
            self.assertRegex(" ".join(text.split()), re.escape(internal) + r"=\S* internal")

    def test_argumentsGiveTheSameOptionsAgain(self) -> None:
        """What a worker is started with: the supervisor's own options, flags included."""
        argv = ["--ttl", "90", "--audiences", "a b", "--bind-token", "--dev", "--workers", "2"]
        again = _options(*argumentsFor(_options(*argv)))
        self.assertEqual(again, _options(*argv))
        self.assertEqual(argumentsFor(_options()), [])

    def test_workerRole(self) -> None:
        self.assertIsNone(workerRoleFrom(_options()))
        self.assertEqual(workerRoleFrom(_options("--worker-fd", "3", "--worker-parent", "42")), WorkerRole(3, 42))
        self.assertEqual(
            workerRoleFrom(_options(*"--worker-fd 3 --worker-parent 42 --worker-index 2 --worker-log direct".split())),
            WorkerRole(3, 42, 2, True),
        )
        for argv in (
            ["--worker-fd", "3"],
            ["--worker-fd", "x", "--worker-parent", "1"],
            ["--worker-parent", "0"],
            ["--worker-fd", "3", "--worker-parent", "1", "--worker-log", "elsewhere"],
            ["--worker-fd", "3", "--worker-parent", "1", "--worker-index", "-1"],
        ):
            with self.subTest(argv=argv):
                self.assertRaises(ValueError, workerRoleFrom, _options(*argv))


def _workerLine(**fields: Any) -> tuple[str, dict[str, Any]]:
    """What a worker writes for one event (its JSON log line), and that event."""
    events: list[dict[str, Any]] = []
    logger = Logger(namespace="tokenissuer.web", observer=events.append)
    logger.info("{text}", **fields)
    output = io.StringIO()
    jsonLineObserver(output)(events[0])
    return output.getvalue().rstrip("\n"), events[0]


class RelogTests(SynchronousTestCase):
    """Each line a worker writes is logged once by the supervisor, as it was, plus the worker's number and pid."""

    def setUp(self) -> None:
        self.line, self.original = _workerLine(
            text="issued token sub='Martin2' aud='gschmarri' jti=abc peer=127.0.0.1:5 origin=None",
            event="issued",
            sub="Martin2",
            aud="gschmarri",
            jti="abc",
            peer="127.0.0.1:5",
            origin=None,
        )

    def test_textLineIsTheWorkersLineTagged(self) -> None:
        single, relogged = io.StringIO(), io.StringIO()
        textLineObserver(single)(self.original)
        textLineObserver(relogged)(workerEvent(self.line, 2, 4321))
        expected = single.getvalue().replace("[tokenissuer.web#info]", "[worker 2 (pid 4321) tokenissuer.web#info]", 1)
        self.assertEqual(relogged.getvalue(), expected)

    def test_directTextLineIsTheRelayedOne(self) -> None:
        """A worker writing the log itself writes what the supervisor would have re-logged."""
        direct, relayed = io.StringIO(), io.StringIO()
        textLineObserver(direct, tag="worker 2 (pid 4321)")(self.original)
        textLineObserver(relayed)(workerEvent(self.line, 2, 4321))
        self.assertEqual(direct.getvalue(), relayed.getvalue())

    def test_directJsonLineIsTheRelayedOne(self) -> None:
        direct, relayed = io.StringIO(), io.StringIO()
        jsonLineObserver(direct, extra={"worker": 2, "worker_pid": 4321})(self.original)
        jsonLineObserver(relayed)(workerEvent(self.line, 2, 4321, textLog=False))
        self.assertEqual(json.loads(direct.getvalue()), json.loads(relayed.getvalue()))

    def test_jsonLineIsTheWorkersRecordTagged(self) -> None:
        output = io.StringIO()
        jsonLineObserver(output)(workerEvent(self.line, 2, 4321, textLog=False))
        self.assertEqual(json.loads(output.getvalue()), {**json.loads(self.line), "worker": 2, "worker_pid": 4321})

    def test_tracebackKept(self) -> None:
        events: list[dict[str, Any]] = []
        logger = Logger(namespace="tokenissuer.web", observer=events.append)
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            logger.failure("internal error while answering {path}", path="/jwthmac/issue")
        output = io.StringIO()
        jsonLineObserver(output)(events[0])
        line = output.getvalue().rstrip("\n")
        text = io.StringIO()
        textLineObserver(text)(workerEvent(line, 1, 7))
        self.assertIn("[worker 1 (pid 7) tokenissuer.web#critical] internal error while answering", text.getvalue())
        self.assertIn("ZeroDivisionError", text.getvalue())
        relogged = io.StringIO()
        jsonLineObserver(relogged)(workerEvent(line, 1, 7, textLog=False))
        record = json.loads(relogged.getvalue())
        self.assertEqual(record["message"], "internal error while answering /jwthmac/issue")
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_otherLinesAsTheyAre(self) -> None:
        """A crash or start-up error on stderr, or stray text on stdout, is logged unchanged."""
        event = workerEvent("tokenissuer: error: something {odd}", 1, 7, stream="stderr")
        self.assertEqual(event["log_level"], LogLevel.error)
        output = io.StringIO()
        textLineObserver(output)(event)
        self.assertTrue(
            output.getvalue().endswith(
                " [worker 1 (pid 7) tokenissuer.worker.stderr#error] tokenissuer: error: something {odd}\n"
            ),
            output.getvalue(),
        )
        self.assertEqual(workerEvent("[1, 2]", 1, 7)["text"], "[1, 2]")
        self.assertEqual(workerEvent("{not json", 1, 7)["text"], "{not json")

    def test_lineBuffer(self) -> None:
        buffer = LineBuffer()
        self.assertEqual(buffer.feed(b"first li"), [])
        self.assertEqual(buffer.feed(b"ne\r\n\nsecond\nthi"), ["first line", "second"])
        self.assertEqual(buffer.feed("rd \u00e9".encode()), [])
        self.assertEqual(buffer.flush(), ["third \u00e9"])
        self.assertEqual(buffer.flush(), [])
        self.assertEqual(len(buffer.feed(b"x" * 70000)), 1, "an endless line is not held forever")


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []
        self.stdinClosed = False

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)

    def closeStdin(self) -> None:
        self.stdinClosed = True


class FakeReactor(Clock):
    """A clock that records the processes it is asked to spawn."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, FakeProcess, list[str], dict[str, str], dict[int, Any]]] = []

    def spawnProcess(
        self, processProtocol: Any, executable: str, args: list[str], env: dict[str, str], childFDs: dict[int, Any]
    ) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((processProtocol, process, args, env, childFDs))
        return process


def _exited(status: int | None = None, signum: int | None = None) -> Failure:
    if status == 0:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(exitCode=status, signal=signum))


class PoolTests(SynchronousTestCase):
    """The supervisor's pool, with a fake reactor: start, restart pacing, stop."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.restarts: list[None] = []
        self.logged: list[dict[str, Any]] = []
        self.pool = WorkerPool(
            self.reactor,
            2,
            ["--ttl", "90"],
            onRestart=lambda: self.restarts.append(None),
            publish=self.logged.append,
            executable="/usr/bin/python3",
        )
        self.pool.prepare()
        self.addCleanup(self.pool.discard)
        self.pool.start(17)

    def end(self, index: int, reason: Failure) -> None:
        """The latest process of worker C{index} exits."""
        protocol = [spawned[0] for spawned in self.reactor.spawned if spawned[0].worker.index == index][-1]
        protocol.processEnded(reason)

    def test_startsEachWorkerOnTheSocket(self) -> None:
        self.assertEqual(self.pool.running(), 2)
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, (_, process, args, env, childFDs) in enumerate(self.reactor.spawned, 1):
            self.assertEqual(childFDs, {0: "w", 1: "r", 2: "r", WORKER_FD: 17})
            self.assertEqual(args[0], "/usr/bin/python3")
            self.assertEqual(
                args[-10:],
                ["--ttl", "90", "--worker-fd", str(WORKER_FD), "--worker-parent", str(os.getpid())]
                + ["--worker-index", str(index), "--worker-log", "relay"],
            )
            self.assertIn("tokenissuer", args)
            self.assertEqual(env["PROMETHEUS_MULTIPROC_DIR"], self.pool.metricsFolder)
            self.assertTrue(process.stdinClosed)

    def test_directLogWorkersWriteTheSupervisorsOutput(self) -> None:
        """With directLog the workers get the supervisor's own stdout and stderr, and are told so."""
        reactor = FakeReactor()
        pool = WorkerPool(reactor, 2, [], directLog=True, withMetrics=False, executable="/usr/bin/python3")
        pool.start(17)
        for index, (_, _, args, _, childFDs) in enumerate(reactor.spawned, 1):
            self.assertEqual(childFDs, {0: "w", 1: 1, 2: 2, WORKER_FD: 17})
            self.assertEqual(args[-4:], ["--worker-index", str(index), "--worker-log", "direct"])

    def test_outputIsRelogged(self) -> None:
        protocol, process = self.reactor.spawned[1][:2]
        protocol.childDataReceived(1, b'{"time":"2026-12-03T15:54:52.123+00:00","level":"info","logger":"x","event":')
        self.assertEqual(self.logged, [])
        protocol.childDataReceived(1, b'"log","message":"hello"}\n')
        protocol.childDataReceived(2, b"no newline at the end")
        protocol.childConnectionLost(2)
        self.assertEqual([event["text"] for event in self.logged], ["hello", "no newline at the end"])
        self.assertEqual({(event["worker"], event["worker_pid"]) for event in self.logged}, {(2, process.pid)})

    def test_restartAfterOneSecond(self) -> None:
        self.end(1, _exited(signum=signal.SIGKILL))
        self.assertEqual(self.pool.running(), 1)
        self.reactor.advance(0.9)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.pool.running(), 2)
        self.assertEqual(len(self.restarts), 1)
        # A clean exit nobody asked for is unexpected too.
        self.end(2, _exited(0))
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_atMostFiveRestartsWithinThirtySeconds(self) -> None:
        """A worker that keeps dying is started again at most 5 times in 30 s; the other one keeps running."""
        starts = []
        for _ in range(RESTART_LIMIT + 2):
            self.end(1, _exited(status=1))
            before = self.reactor.seconds()
            while len(self.reactor.spawned) == 2 + len(starts):
                self.reactor.advance(0.5)
                self.assertLess(self.reactor.seconds() - before, 60, "never started again")
            starts.append(self.reactor.seconds())
        for index in range(RESTART_LIMIT, len(starts)):
            self.assertGreaterEqual(starts[index] - starts[index - RESTART_LIMIT], RESTART_WINDOW)
        self.assertEqual(starts[:RESTART_LIMIT], [1.0, 2.0, 3.0, 4.0, 5.0])
        self.assertEqual(self.pool.running(), 2)

    def test_stopSendsSIGTERMAndWaits(self) -> None:
        self.end(2, _exited(status=1))  # a restart is pending: it must not happen
        folder = self.pool.metricsFolder
        assert folder is not None
        stopped = self.pool.stop(15)
        self.assertEqual(self.reactor.spawned[0][1].signals, [signal.SIGTERM])
        self.assertNoResult(stopped)
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.end(1, _exited(0))
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(folder))
        self.assertEqual(self.restarts, [])

    def test_stopKillsWhatOutlivesTheTimeout(self) -> None:
        stopped = self.pool.stop(15)
        self.reactor.advance(14.9)
        self.assertEqual(self.reactor.spawned[0][1].signals, [signal.SIGTERM])
        self.reactor.advance(0.1)
        self.assertEqual(self.reactor.spawned[0][1].signals, [signal.SIGTERM, signal.SIGKILL])
        self.end(1, _exited(signum=signal.SIGKILL))
        self.end(2, _exited(signum=signal.SIGKILL))
        self.successResultOf(stopped)

    def test_hangupForwarded(self) -> None:
        self.pool.signalAll(signal.SIGHUP)
        self.assertEqual([spawned[1].signals for spawned in self.reactor.spawned], [[signal.SIGHUP]] * 2)


# The real command


_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
_ISSUED = re.compile(r"\[worker (\d+) \(pid (\d+)\) tokenissuer\.web#info\] issued token .* jti=(\S+) ")


def startedWorkers(log: str) -> dict[int, int]:
    """Each worker's latest pid, from the supervisor's log."""
    return {int(index): int(pid) for index, pid in _STARTED.findall(log)}


def issuers(log: str) -> dict[str, int]:
    """The pid of the worker that issued each token (by jti), from the re-logged lines."""
    return {jti: int(pid) for _, pid, jti in _ISSUED.findall(log)}


def processGone(pid: int) -> bool:
    """No such process, or only its zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


async def eventually(check: Callable[[], T], timeout: float = 30) -> T:
    """C{check()} once it is true, or its last value after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        await deferLater(reactor, 0.1, lambda: None)


def issueTokens(client: Client, count: int, parallel: int = 4) -> list[str]:
    """C{count} tokens, each on a new connection, C{parallel} at a time; their jti."""
    with ThreadPoolExecutor(parallel) as executor:
        responses = list(executor.map(lambda _: client.call(), range(count)))
    assert [response.status for response in responses] == [200] * count, [r.body for r in responses]
    return [
        consumerVerify(response.json()["token"], TEST_HMAC_KEY.encode(), "gschmarri", "daheim_token_issuer")["jti"]
        for response in responses
    ]


class TwoWorkersTests(TestCase):
    """`twistd -n tokenissuer --workers 2`, as an operator runs it."""

    timeout = 180

    async def start(self, *arguments: str) -> IssuerProcess:
        self.pki = TestPKI(os.path.abspath(self.mktemp()))
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.adminPort = freePort()
        issuer = await deferToThread(
            spawnIssuer,
            self,
            self.pki,
            "--workers",
            "2",
            "--audiences",
            "gschmarri",
            "--admin-listen",
            f"tcp:{self.adminPort}:interface=127.0.0.1",
            *arguments,
            environ={"TMPDIR": self.tmp},
        )
        self.addCleanup(self.killWorkers, issuer)
        ready = await eventually(lambda: issuer.log().count("worker ready: accepting") >= 2)
        self.assertTrue(ready, issuer.log())
        certFile, keyFile = self.pki.clientFiles(self.pki.client, "good")
        self.client = Client(issuer.port, self.pki.path("ca.pem"), certFile, keyFile)
        return issuer

    def killWorkers(self, issuer: IssuerProcess) -> None:
        """Whatever a failed test left behind."""
        for pid in startedWorkers(issuer.log()).values():
            if not processGone(pid):
                os.kill(pid, signal.SIGKILL)

    async def metrics(self) -> str:
        status, text = await deferToThread(adminGet, self.adminPort, "/metrics")
        self.assertEqual(status, 200)
        return text

    async def tokensUntilAnsweredBy(self, issuer: IssuerProcess, pids: set[int]) -> list[str]:
        """Issue tokens (at most 400, 60 s) until each of C{pids} has answered at least once."""
        jtis: list[str] = []
        deadline = time.monotonic() + 60
        while len(jtis) < 400 and time.monotonic() < deadline:
            jtis += await deferToThread(issueTokens, self.client, 8)
            answered = {issuers(issuer.log()).get(jti) for jti in jtis}
            if pids <= answered:
                break
        return jtis

    async def test_workersShareTheSocketAndStopTogether(self) -> None:
        issuer = await self.start()
        pids = startedWorkers(issuer.log())
        self.assertEqual(sorted(pids), [1, 2])
        self.assertNotIn(issuer.process.pid, pids.values())
        [folder] = os.listdir(self.tmp)
        self.assertTrue(folder.startswith("tokenissuer-metrics-"), folder)

        # Both workers serve tokens over mutual TLS on the one port.
        jtis = await self.tokensUntilAnsweredBy(issuer, set(pids.values()))
        answeredBy = issuers(issuer.log())
        self.assertEqual({answeredBy.get(jti) for jti in jtis}, set(pids.values()))
        for jti in jtis:  # each worker line is logged once
            self.assertEqual(issuer.log().count(f"jti={jti} "), 1, jti)

        # The supervisor's admin listener: probes, and metrics summed over the workers.
        status, body = await deferToThread(adminGet, self.adminPort, "/readyz")
        self.assertEqual((status, json.loads(body)["reason"]), (200, "serving with 2 of 2 workers"))
        self.assertEqual((await deferToThread(adminGet, self.adminPort, "/healthz"))[0], 200)
        metrics = await self.metrics()
        self.assertEqual(metricValue(metrics, "tokenissuer_tokens_issued_total", audience="gschmarri"), len(jtis))
        self.assertEqual(metricValue(metrics, "tokenissuer_request_duration_seconds_count"), len(jtis))
        self.assertEqual(metricValue(metrics, "tokenissuer_ready"), 2.0)
        self.assertEqual(metricValue(metrics, "tokenissuer_worker_restarts_total"), 0.0)
        expiry = metricValue(metrics, "tokenissuer_server_certificate_expiry_seconds")
        assert expiry is not None
        self.assertGreater(expiry, 800 * 86400)
        self.assertEqual(metrics.count("# TYPE tokenissuer_tokens_issued_total counter"), 1)

        # SIGHUP reaches every worker: each reloads.
        issuer.process.send_signal(signal.SIGHUP)
        reloaded = re.compile(r"\[worker \d \(pid (\d+)\) tokenissuer\.service#info\] reloaded: ")
        both = await eventually(lambda: set(map(int, reloaded.findall(issuer.log()))) == set(pids.values()))
        self.assertTrue(both, issuer.log()[-3000:])

        # SIGTERM: every worker drains and exits 0, then the supervisor exits 0; nothing is left.
        status = await deferToThread(issuer.terminate)
        log = issuer.log()
        self.assertEqual(status, 0, log[-3000:])
        for index, pid in pids.items():
            self.assertIn(f"worker {index} (pid {pid}) exited with status 0", log)
            self.assertTrue(processGone(pid), pid)
        self.assertTrue(log.rstrip().endswith("Server Shut Down."), log[-1000:])
        self.assertEqual(os.listdir(self.tmp), [], "the metrics folder is removed")
        self.assertNotIn(TEST_HMAC_KEY, log)

    async def test_killedWorkerIsStartedAgain(self) -> None:
        issuer = await self.start()
        pids = startedWorkers(issuer.log())
        before = await deferToThread(issueTokens, self.client, 8)

        os.kill(pids[1], signal.SIGKILL)
        restarted = await eventually(lambda: startedWorkers(issuer.log())[1] != pids[1])
        self.assertTrue(restarted, issuer.log()[-3000:])
        self.assertIn(
            f"worker 1 (pid {pids[1]}) exited unexpectedly with signal 9 (SIGKILL); starting it again in 1s",
            issuer.log(),
        )
        newPid = startedWorkers(issuer.log())[1]

        # Tokens keep flowing, and the new worker serves some of them.
        after = await self.tokensUntilAnsweredBy(issuer, {newPid, pids[2]})
        self.assertIn(newPid, {issuers(issuer.log()).get(jti) for jti in after})

        # The killed worker's tokens still count; its gauges are gone.
        metrics = await self.metrics()
        self.assertEqual(
            metricValue(metrics, "tokenissuer_tokens_issued_total", audience="gschmarri"), len(before) + len(after)
        )
        self.assertEqual(metricValue(metrics, "tokenissuer_worker_restarts_total"), 1.0)
        self.assertEqual(metricValue(metrics, "tokenissuer_ready"), 2.0)
        self.assertEqual(await deferToThread(issuer.terminate), 0, issuer.log()[-3000:])
        self.assertTrue(processGone(newPid))

    async def test_workersDoNotOutliveAKilledSupervisor(self) -> None:
        issuer = await self.start("--drain-seconds", "1")
        pids = startedWorkers(issuer.log())
        issuer.process.kill()
        await deferToThread(issuer.process.wait, 30)
        gone = await eventually(lambda: all(processGone(pid) for pid in pids.values()))
        self.assertTrue(gone, f"workers {pids} still run")

    async def test_jsonLog(self) -> None:
        """With --log-format json every line, the workers' too, is one JSON object; worker lines name the worker."""
        issuer = await self.start("--log-format", "json")
        pids = startedWorkers(issuer.log())
        [jti] = await deferToThread(issueTokens, self.client, 1)
        self.assertEqual(await deferToThread(issuer.terminate), 0)
        records = [json.loads(line) for line in issuer.log().splitlines() if line.strip()]
        [issued] = [record for record in records if record.get("event") == "issued"]
        self.assertEqual((issued["jti"], issued["sub"], issued["logger"]), (jti, "Martin2", "tokenissuer.web"))
        self.assertEqual(pids[issued["worker"]], issued["worker_pid"])
        self.assertTrue(all(record["level"] in ("debug", "info", "warn", "error", "critical") for record in records))


class WorkersSigtermTests(test_operations.SigtermTests):
    """SIGTERM to the supervisor while clients keep requesting: as with one process, nothing accepted is lost."""

    arguments = ("--workers", "2")


class WorkersRefusalTests(TestCase):
    timeout = 120

    def test_badWorkerCountIsOneLine(self) -> None:
        pki = TestPKI(self.mktemp())
        for value in ("0", "x"):
            with self.subTest(value=value):
                result = subprocess.run(
                    issuerCommand(pki, "--workers", value),
                    env=cleanEnviron(TOK_ISS_HMAC_SECRET=TEST_HMAC_KEY),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                self.assertNotEqual(result.returncode, 0)
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                self.assertEqual(
                    lines,
                    [
                        f"tokenissuer: error: workers '{value}' from --workers must be a whole "
                        f"number from 1 to {MAX_WORKERS}, or auto"
                    ],
                    result.stderr,
                )
                self.assertNotIn("Traceback", result.stdout + result.stderr)
