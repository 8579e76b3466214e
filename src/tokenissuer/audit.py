"""
Log output for collectors: one JSON object per line for every event (issued,
refused, handshake_failure, reload, and everything else the service logs).

Only scalar fields of our own events are copied, so no object's repr (and no
key or token, which never reach the log in the first place) can leak into it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider

LOG_FORMATS = ("text", "json")
#: Keys the legacy twisted.python.log bridge adds, which duplicate our own.
_SKIP = {"format", "message", "time", "system", "isError", "why", "failure", "log_trace"}


def jsonLineObserver(output: IO[str]) -> Callable[[dict[str, Any]], None]:
    """An observer writing each event as one line of JSON to C{output}."""

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(timespec="milliseconds"),
            "level": getattr(level, "name", "info"),
            "logger": event.get("log_namespace", "-"),
            "event": event.get("event", "log"),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in _SKIP or key in record:
                continue
            if isinstance(value, str | int | float | bool) or value is None:
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        output.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
        output.flush()

    return observe
