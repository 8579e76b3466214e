"""
Tests for L{tokenissuer.audit}: the log lines, and when twistd's own text log is
replaced by ours.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from tokenissuer.audit import jsonLineObserver, textLineObserver
from tokenissuer.service import twistdLogsToStdout


def _events() -> list[dict[str, Any]]:
    """Events as Logger makes them: plain, with a pre-rendered text, multi-line, with a failure."""
    captured: list[dict[str, Any]] = []
    log = Logger(namespace="tokenissuer.web", observer=captured.append)
    log.info("issued token sub={sub!r} aud={aud!r}", sub="Martin2", aud="gschmarri", event="issued")
    log.info("{text}", text="issued token sub='Martin2' jti=abc", event="issued", sub="Martin2")
    log.warn("two\nlines {n}", n=2)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("internal error while answering {path}", Failure(), path="/jwthmac/issue")
    log.emit(LogLevel.info, "")
    log.info("{text}", text="")
    log.info("{text}", text="first\nsecond", log_system="elsewhere")
    for index, event in enumerate(captured):
        event["log_time"] = 1764777292.25 + index * 0.5  # two events share a second, two do not
    return captured


class TextLineObserverTests(SynchronousTestCase):
    """Our text observer writes exactly what twistd's would, one flushed line per event."""

    def test_sameTextAsTwistd(self) -> None:
        for event in _events():
            output = io.StringIO()
            textLineObserver(output)(event)
            expected = formatEventAsClassicLogText(event, formatTime=formatTime) or ""
            self.assertEqual(output.getvalue(), expected)

    def test_timeStampFollowsTheClock(self) -> None:
        """The stamp is cached per second, never reused for another second."""
        output = io.StringIO()
        observe = textLineObserver(output)
        for when in (100.1, 100.9, 101.0, 99.5):
            observe({"log_format": "x", "log_time": when, "log_namespace": "n", "log_level": LogLevel.info})
        stamps = [line.split(" ")[0] for line in output.getvalue().splitlines()]
        self.assertEqual(stamps, [formatTime(t) for t in (100.1, 100.9, 101.0, 99.5)])

    def test_flushedPerLine(self) -> None:
        flushes: list[str] = []

        class Output(io.StringIO):
            def flush(self) -> None:
                flushes.append(self.getvalue())

        output = Output()
        observe = textLineObserver(output)
        for event in _events()[:2]:
            observe(event)
        self.assertEqual(len(flushes), 2)
        self.assertEqual(flushes[-1], output.getvalue())


class JsonLineObserverTests(SynchronousTestCase):
    def test_timeInMilliseconds(self) -> None:
        output = io.StringIO()
        observe = jsonLineObserver(output)
        for event in _events()[:2]:
            observe(event)
        records = [json.loads(line) for line in output.getvalue().splitlines()]
        self.assertEqual(
            [r["time"] for r in records], ["2025-12-03T15:54:52.250+00:00", "2025-12-03T15:54:52.750+00:00"]
        )

    def test_preRenderedTextIsTheMessage(self) -> None:
        """The pre-rendered C{text} of a hot event becomes the message, not a second field."""
        output = io.StringIO()
        jsonLineObserver(output)(_events()[1])
        record = json.loads(output.getvalue())
        self.assertEqual(record["message"], "issued token sub='Martin2' jti=abc")
        self.assertNotIn("text", record)
        self.assertEqual((record["event"], record["sub"]), ("issued", "Martin2"))


class TwistdLogDestinationTests(SynchronousTestCase):
    """Ours replaces twistd's text log only where twistd would write to stdout."""

    def _twistd(self, *arguments: str) -> Any:
        config = ServerOptions()
        config.parseOptions([*arguments, "tokenissuer", "--dev"])
        self.assertIs(config.subOptions.parent, config)
        return config.subOptions.parent

    def test_stdout(self) -> None:
        self.assertTrue(twistdLogsToStdout(self._twistd("-n")))
        self.assertTrue(twistdLogsToStdout(self._twistd("-n", "--logfile", "-")))

    def test_elsewhere(self) -> None:
        self.assertFalse(twistdLogsToStdout(self._twistd()))
        self.assertFalse(twistdLogsToStdout(self._twistd("-n", "--logfile", "issuer.log")))
        self.assertFalse(twistdLogsToStdout(self._twistd("-n", "--syslog")))
        self.assertFalse(twistdLogsToStdout(self._twistd("-n", "--logger", "twisted.logger.textFileLogObserver")))
        self.assertFalse(twistdLogsToStdout(None))

    def test_makeServiceReadsTwistdOptions(self) -> None:
        """makeService sees twistd's options as its own options' parent."""
        from tokenissuer.service import makeService

        for arguments, expected in ((["-n"], True), (["-n", "--logfile", "issuer.log"], False)):
            config = ServerOptions()
            folder = self.mktemp()
            config.parseOptions(
                [*arguments, "tokenissuer", "--dev", "--dev-dir", folder, "--listen", "tcp:0:interface=127.0.0.1"]
                + ["--admin-listen", "off", "--demo-port", "off"]
            )
            self.assertIs(makeService(config.subOptions).textLogToStdout, expected)
