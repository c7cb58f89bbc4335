"""The POS side's log lines: stdlib ``logging``, an event name and its fields per record.

In a POS's process its own logging configuration decides where they go (the
logger names start with ``mipos.``). The relay command, a process of its own,
writes them to stderr as the worker does: one JSON object a line
(``LOG_FORMAT=json``, the default), or ``event key=value ...`` (``console``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

FIELDS = "mipos_fields"  # the LogRecord attribute the fields travel in


def log(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={FIELDS: fields})


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "event": record.getMessage(),
            **getattr(record, FIELDS, {}),
            "level": record.levelname.lower(),
            "logger": record.name,
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ConsoleLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in getattr(record, FIELDS, {}).items())
        when = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = f"{when} [{record.levelname.lower():<7}] {record.getMessage()} {fields}".rstrip()
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def configure_logging(level: str = "INFO", log_format: str = "json") -> None:
    """For a process of the POS side's own (the relay): ``mipos.*`` lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleLines() if log_format.lower() == "console" else JsonLines())
    logger = logging.getLogger("mipos")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")
    logger.propagate = False
