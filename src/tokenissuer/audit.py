"""
Log output: twistd's classic text lines, or one JSON object per line for
collectors, for every event (issued, refused, handshake_failure, reload, and
everything else the service logs).

Every issued token is logged, so writing a line must cost little next to
minting the token: both observers format the time stamp once per second, not
once per line. Each line is flushed at once, so no audit line waits in a buffer.

Only scalar fields of our own events are copied into JSON, so no object's repr
(and no key or token, which never reach the log in the first place) can leak into it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, eventAsText, formatEvent, formatTime
from zope.interface import implementer, provider

LOG_FORMATS = ("text", "json")
#: The format of events whose message is already rendered in their C{text}
#: field (one per issued token): the observers take it as it is.
PRERENDERED = "{text}"
#: Keys the legacy twisted.python.log bridge adds, which duplicate our own;
#: C{text} is the pre-rendered message of hot events (see L{textLineObserver}).
_SKIP = {"format", "message", "time", "system", "isError", "why", "failure", "log_trace", "text"}


class _SecondStamp:
    """A time stamp formatter that formats each second once."""

    def __init__(self, format: Callable[[float], str]) -> None:
        self._format = format
        self._second: int | None = None
        self._stamp = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, self._format(second)
        return self._stamp


@implementer(ILogObserver)
class TextLineObserver:
    """
    twistd's own text format (C{2026-12-03T15:54:52+0000 [namespace#level] message},
    continuation lines indented by a tab), at a fraction of its cost per line.
    """

    def __init__(self, output: IO[str], tag: str = "") -> None:
        self._output = output
        self._stamp = _SecondStamp(formatTime)
        self._tag = f"{tag} " if tag else ""

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_format") == PRERENDERED and "log_failure" not in event:
            text = event.get("text")
        else:
            text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        if not text:
            return
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
        self._output.write(f"{self._stamp(event.get('log_time') or 0)} [{self._tag}{system}] {text}\n")
        self._output.flush()


def textLineObserver(output: IO[str], tag: str = "") -> TextLineObserver:
    """
    An observer writing each event as twistd's classic text line to C{output};
    a C{tag} (a worker's name) goes in front of the system in brackets.
    """
    return TextLineObserver(output, tag)


def jsonLineObserver(output: IO[str], extra: dict[str, Any] | None = None) -> Callable[[dict[str, Any]], None]:
    """An observer writing each event as one line of JSON to C{output}, with the C{extra} fields in each."""
    extraFields = dict(extra or {})

    stamp = _SecondStamp(lambda second: datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        when = event.get("log_time") or 0
        record: dict[str, Any] = {
            "time": f"{stamp(when)}.{int(when * 1000) % 1000:03d}+00:00",
            "level": getattr(level, "name", "info"),
            "logger": event.get("log_namespace", "-"),
            "event": event.get("event", "log"),
            "message": event.get("text", "") if event.get("log_format") == PRERENDERED else formatEvent(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in _SKIP or key in record:
                continue
            if isinstance(value, str | int | float | bool) or value is None:
                record[key] = value
        record.update(extraFields)
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        output.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
        output.flush()

    return observe
