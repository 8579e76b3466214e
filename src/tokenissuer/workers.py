"""
Several processes on one listening socket (--workers N).

With --workers 1 (the default) none of this runs. With N > 1 the twistd process
is the supervisor: it binds the listening socket but never accepts on it, and
L{WorkerPool} runs N workers, each C{twistd -n tokenissuer} with the same
options and environment plus C{--worker-fd 3 --worker-parent PID}, the socket
as its file descriptor 3. A worker adopts the socket and is otherwise the normal
service (L{tokenissuer.service}); the kernel gives each new connection to one of
the workers waiting on it.

The supervisor:

  - restarts a worker that exits while the supervisor is not stopping, 1 s
    later, and at most 5 times within 30 s per worker: a sixth restart waits
    until the oldest of those five is 30 s old, so a worker that cannot start
    never makes it spin;
  - forwards SIGHUP to every worker; when stopping, sends them SIGTERM, waits
    while they drain (up to the drain time plus L{EXIT_GRACE}), then kills any
    still running;
  - has every worker's log lines appear once in its own log, tagged with the
    worker's number and pid: a line looks as it would from a single process,
    plus the tag. Where the supervisor logs to stdout (C{-n} without
    C{--logfile}, and always with --log-format json), the workers write to that
    same stdout themselves, in the configured format (each line is one write,
    so lines do not mix), and the supervisor does no work per token; otherwise
    they send JSON lines to the supervisor, which re-logs them;
  - gives the workers a private folder for prometheus_client's multiprocess
    files (L{tokenissuer.metrics.SupervisorMetrics} reads it) and removes it
    at the end.

A worker whose supervisor died without stopping it (kill -9) notices within a
second that its parent changed (L{watchParent}), then drains and exits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client.multiprocess import mark_process_dead
from twisted.internet import error, protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.task import LoopingCall
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

log = Logger()

#: The listening socket's file descriptor in a worker.
WORKER_FD = 3
#: A worker that exited is started again this many seconds later ...
RESTART_DELAY = 1.0
#: ... and at most this many times within L{RESTART_WINDOW} seconds.
RESTART_LIMIT = 5
RESTART_WINDOW = 30.0
#: How long, beyond the drain time, workers may take to exit once told to stop.
EXIT_GRACE = 5.0
#: Seconds between a worker's checks that its supervisor is still its parent.
PARENT_CHECK_INTERVAL = 1.0
#: A worker's unfinished output line is logged once it grows beyond this many bytes.
MAX_LINE = 65536

_TWISTD = "from twisted.scripts.twistd import run; run()"
_STREAMS = {1: "stdout", 2: "stderr"}


# The worker's side


@dataclass(frozen=True)
class WorkerRole:
    """
    What the supervisor gave a worker: the listening socket's descriptor, its
    own pid, the worker's number, and whether the worker writes the shared log
    itself (C{directLog}) or sends JSON lines for the supervisor to re-log.
    """

    fd: int
    parentPid: int
    index: int = 0
    directLog: bool = False

    @property
    def tag(self) -> str:
        """What marks this worker's log lines: C{worker 2 (pid 4321)}."""
        return f"worker {self.index} (pid {os.getpid()})"


def workerRoleFrom(options: Mapping[str, Any]) -> WorkerRole | None:
    """The worker role from the internal options (None: not a worker); ValueError if they are unusable."""
    fd, parent = options.get("worker-fd"), options.get("worker-parent")
    if fd is None and parent is None:
        return None
    logMode = options.get("worker-log") or "relay"
    try:
        role = WorkerRole(
            int(str(fd)), int(str(parent)), int(str(options.get("worker-index") or 0)), logMode == "direct"
        )
    except ValueError:
        role = None
    if role is None or role.fd < 0 or role.parentPid < 1 or role.index < 0 or logMode not in ("direct", "relay"):
        raise ValueError(
            "--worker-fd, --worker-parent, --worker-index and --worker-log are set by the supervisor of --workers"
        )
    return role


def watchParent(reactor: Any, parentPid: int, onGone: Callable[[], None]) -> LoopingCall:
    """Call C{onGone} once this process's parent is no longer C{parentPid} (checked every second)."""

    def check() -> None:
        if os.getppid() != parentPid:
            watcher.stop()
            onGone()

    watcher = LoopingCall(check)
    watcher.clock = reactor
    watcher.start(PARENT_CHECK_INTERVAL, now=True)
    return watcher


# Re-logging a worker's output


class LineBuffer:
    """Bytes in, complete lines out (an unfinished line longer than L{MAX_LINE} comes out as it is)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > MAX_LINE:
            lines.append(self._pending)
            self._pending = b""
        return [_decode(line) for line in lines if line.strip()]

    def flush(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [_decode(rest)] if rest.strip() else []


def _decode(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")


def _jsonRecord(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _timeOf(text: object) -> float:
    try:
        # Half a millisecond keeps the millisecond digits the worker wrote.
        return datetime.fromisoformat(str(text)).timestamp() + 0.0005
    except ValueError:
        return time.time()


def _levelOf(name: object) -> LogLevel:
    try:
        return LogLevel.levelWithName(str(name))
    except InvalidLogLevelError:
        return LogLevel.info


def workerEvent(line: str, index: int, pid: int, stream: str = "stdout", textLog: bool = True) -> dict[str, Any]:
    """
    The log event that re-logs one line of a worker's output, tagged with the
    worker's number and pid. A JSON line (what a worker's log writes) becomes
    the event it was, with its own time, level, logger and fields; any other
    line (say, a crash on stderr) is logged as it is.
    """
    record = _jsonRecord(line) if stream == "stdout" else None
    fields: dict[str, Any]
    if record is None:
        level = LogLevel.error if stream == "stderr" else LogLevel.info
        namespace = f"tokenissuer.worker.{stream}"
        fields = {"text": line, "log_time": time.time()}
    else:
        level = _levelOf(record.get("level"))
        namespace = str(record.get("logger") or "-")
        message = str(record.get("message", ""))
        if textLog and record.get("traceback"):
            message = f"{message}\n{record['traceback']}"
        fields = {
            key: value
            for key, value in record.items()
            if key not in ("time", "level", "logger", "message") and not key.startswith("log_")
        }
        fields.update(text=message, log_time=_timeOf(record.get("time")))
    fields.update(
        log_format="{text}",
        log_level=level,
        log_namespace=namespace,
        log_system=f"worker {index} (pid {pid}) {namespace}#{level.name}",
        worker=index,
        worker_pid=pid,
    )
    return fields


# The supervisor's side


@dataclass
class _Worker:
    index: int
    process: IProcessTransport | None = None
    pid: int | None = None
    #: When it was last restarted (the latest L{RESTART_LIMIT} times).
    restarts: deque[float] = field(default_factory=lambda: deque(maxlen=RESTART_LIMIT))
    pendingRestart: IDelayedCall | None = None


class _WorkerProtocol(protocol.ProcessProtocol):
    """One worker process: its output, re-logged line by line, and its end."""

    def __init__(self, pool: WorkerPool, worker: _Worker) -> None:
        self.pool = pool
        self.worker = worker
        self.pid = 0
        self._buffers = {fd: LineBuffer() for fd in _STREAMS}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self._buffers.get(childFD)
        if buffer is not None:
            for line in buffer.feed(data):
                self.pool.relog(self.worker.index, self.pid, _STREAMS[childFD], line)

    def childConnectionLost(self, childFD: int) -> None:
        buffer = self._buffers.get(childFD)
        if buffer is not None:
            for line in buffer.flush():
                self.pool.relog(self.worker.index, self.pid, _STREAMS[childFD], line)

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self.worker, self.pid, reason)


def _exitDescription(reason: Failure) -> str:
    value = reason.value
    signalNumber = getattr(value, "signal", None)
    if signalNumber:
        try:
            return f"signal {signalNumber} ({signal.Signals(signalNumber).name})"
        except ValueError:
            return f"signal {signalNumber}"
    return f"status {getattr(value, 'exitCode', '?')}"


class WorkerPool:
    """The supervisor's worker processes (see the module's docstring)."""

    def __init__(
        self,
        reactor: Any,
        count: int,
        arguments: list[str],
        *,
        textLog: bool = True,
        directLog: bool = False,
        withMetrics: bool = True,
        onRestart: Callable[[], None] = lambda: None,
        publish: Callable[[dict[str, Any]], None] = globalLogPublisher,
        executable: str = sys.executable,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.arguments = arguments
        self.textLog = textLog
        self.directLog = directLog
        self.withMetrics = withMetrics
        self.onRestart = onRestart
        self.publish = publish
        self.executable = executable
        self.metricsFolder: str | None = None
        self.workers = [_Worker(index) for index in range(1, count + 1)]
        self._listeningFd: int | None = None
        self._stopping = False
        self._allEnded: Deferred[None] | None = None

    def prepare(self) -> None:
        """Create the private folder for the workers' metrics (OSError if that fails)."""
        if self.withMetrics and self.metricsFolder is None:
            self.metricsFolder = tempfile.mkdtemp(prefix="tokenissuer-metrics-")

    def discard(self) -> None:
        """Remove the metrics folder (at the end, or when start-up failed after L{prepare})."""
        folder, self.metricsFolder = self.metricsFolder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def start(self, listeningFd: int) -> None:
        """Start every worker on the listening socket C{listeningFd}."""
        if self._stopping:
            return
        self._listeningFd = listeningFd
        for worker in self.workers:
            self._spawn(worker)

    def running(self) -> int:
        """How many worker processes run now."""
        return sum(1 for worker in self.workers if worker.process is not None)

    def signalAll(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.signalProcess(signum)
                except (error.ProcessExitedAlready, OSError):
                    pass

    def stop(self, timeout: float) -> Deferred[None]:
        """
        Restart nothing more, send every worker SIGTERM and fire once all have
        exited; after C{timeout} seconds, kill those still running.
        """
        self._stopping = True
        for worker in self.workers:
            if worker.pendingRestart is not None and worker.pendingRestart.active():
                worker.pendingRestart.cancel()
            worker.pendingRestart = None
        if not self.running():
            self.discard()
            return succeed(None)
        allEnded: Deferred[None] = Deferred()
        self._allEnded = allEnded
        self.signalAll(signal.SIGTERM)
        killer = self.reactor.callLater(timeout, self._killRemaining, timeout)

        def finished(result: object) -> object:
            if killer.active():
                killer.cancel()
            self.discard()
            return result

        allEnded.addBoth(finished)
        return allEnded

    def _killRemaining(self, timeout: float) -> None:
        log.warn(
            "{count} worker(s) still running {timeout:g}s after SIGTERM: killing them",
            count=self.running(),
            timeout=timeout,
        )
        self.signalAll(signal.SIGKILL)

    def _spawn(self, worker: _Worker) -> None:
        assert self._listeningFd is not None
        environ = dict(os.environ)
        if self.metricsFolder is not None:
            environ["PROMETHEUS_MULTIPROC_DIR"] = self.metricsFolder
        argv = [
            self.executable,
            "-c",
            _TWISTD,
            "-n",
            "--pidfile=",
            "tokenissuer",
            *self.arguments,
            "--worker-fd",
            str(WORKER_FD),
            "--worker-parent",
            str(os.getpid()),
            "--worker-index",
            str(worker.index),
            "--worker-log",
            "direct" if self.directLog else "relay",
        ]
        # Direct: the worker writes its (tagged) lines to the supervisor's own stdout
        # and stderr, at no cost to the supervisor; relay: it sends them here.
        output: dict[int, int | str] = {1: 1, 2: 2} if self.directLog else {1: "r", 2: "r"}
        workerProtocol = _WorkerProtocol(self, worker)
        try:
            process = self.reactor.spawnProcess(
                workerProtocol,
                self.executable,
                argv,
                env=environ,
                childFDs={0: "w", **output, WORKER_FD: self._listeningFd},
            )
        except OSError as problem:
            log.error("cannot start worker {index}: {problem}", index=worker.index, problem=str(problem))
            self._scheduleRestart(worker)
            return
        worker.process, worker.pid = process, process.pid
        workerProtocol.pid = process.pid
        process.closeStdin()
        log.info("worker {index} started (pid {pid})", index=worker.index, pid=process.pid)

    def relog(self, index: int, pid: int, stream: str, line: str) -> None:
        self.publish(workerEvent(line, index, pid, stream, self.textLog))

    def ended(self, worker: _Worker, pid: int, reason: Failure) -> None:
        """A worker process exited: note it, and start it again unless the pool is stopping."""
        worker.process = None
        if self.metricsFolder is not None:
            mark_process_dead(pid, self.metricsFolder)
        how = _exitDescription(reason)
        if self._stopping:
            log.info("worker {index} (pid {pid}) exited with {how}", index=worker.index, pid=pid, how=how)
            if not self.running() and self._allEnded is not None and not self._allEnded.called:
                self._allEnded.callback(None)
            return
        delay = self._scheduleRestart(worker)
        log.warn(
            "worker {index} (pid {pid}) exited unexpectedly with {how}; starting it again in {delay:g}s{limit}",
            index=worker.index,
            pid=pid,
            how=how,
            delay=delay,
            limit="" if delay <= RESTART_DELAY else f" ({RESTART_LIMIT} restarts within {RESTART_WINDOW:g}s already)",
        )

    def restartDelay(self, worker: _Worker) -> float:
        """L{RESTART_DELAY}, or longer to keep to L{RESTART_LIMIT} restarts within L{RESTART_WINDOW}."""
        delay = RESTART_DELAY
        if len(worker.restarts) == RESTART_LIMIT:
            delay = max(delay, worker.restarts[0] + RESTART_WINDOW - self.reactor.seconds())
        return delay

    def _scheduleRestart(self, worker: _Worker) -> float:
        delay = self.restartDelay(worker)
        worker.pendingRestart = self.reactor.callLater(delay, self._restart, worker)
        return delay

    def _restart(self, worker: _Worker) -> None:
        worker.pendingRestart = None
        if self._stopping:
            return
        worker.restarts.append(self.reactor.seconds())
        self.onRestart()
        self._spawn(worker)
