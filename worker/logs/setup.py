"""structlog, configured once, through the stdlib so Celery's own records share it.

Every line (ours and Celery's) is rendered by one ``ProcessorFormatter``: JSON
by default (orjson: compact, UTF-8), a console layout with ``LOG_FORMAT=console``. Secrets are taken out
of the event's values before rendering, and out of the rendered text in every
escaped form after it (worker/logs/redaction.py). Tracebacks carry no local
variables: a frame's locals are where credentials live.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import structlog
import structlog.tracebacks
from celery.app.trace import LOG_SUCCESS
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.logs.redaction import redact_text, redact_value

try:
    import orjson
except ImportError:  # requirements/worker.txt has it; without it, the stdlib's json
    orjson = None  # type: ignore[assignment]


def _redact_values(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    return {key: redact_value(value) for key, value in event_dict.items()}


def _redact_rendered(_logger: WrappedLogger, _name: str, rendered: Any) -> Any:
    return redact_text(rendered) if isinstance(rendered, str) else rendered


def _dumps(value: Any, default: Callable[[Any], Any] | None = None, **_options: Any) -> str:
    """JSON by orjson (structlog's recipe for speed: a third of the stdlib's time), compact and in
    UTF-8; what orjson refuses (an integer past 64 bits, a lone surrogate) by the stdlib's json,
    ASCII-escaped, as before."""
    if orjson is not None:
        try:
            return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # orjson.JSONEncodeError is one
            pass
    return json.dumps(value, default=default, separators=(",", ":"))


def configure_logging(level: str = "INFO", log_format: str = "json") -> None:
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if log_format == "console":
        # The traceback as text in the event, so that it is redacted with the rest.
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                                 exception_formatter=structlog.dev.plain_traceback)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        shared.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _redact_values,
            renderer,
            _redact_rendered,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3 logs every connection at DEBUG; keep it at INFO even then.
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))
    _celerys_duplicates_at_debug(root.level)


class _NotSucceeded(logging.Filter):
    """Celery's "Task ...[id] succeeded in ..." line: the attempt line says it, with more."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != LOG_SUCCESS


_not_succeeded = _NotSucceeded()


def _celerys_duplicates_at_debug(level: int) -> None:
    """Celery's "received" and "succeeded" lines only at DEBUG: each attempt writes its own line,
    with every field they have (task id and name, the outcome, the time). Two lines fewer an
    acceptance, each rendered as JSON and scrubbed of secrets. Celery's other lines (a failure,
    "raised expected", a retry) stay. Set before the worker builds its strategies and tracers,
    which read the level once (the setup_logging signal)."""
    strategy = logging.getLogger("celery.worker.strategy")
    trace = logging.getLogger("celery.app.trace")
    trace.removeFilter(_not_succeeded)
    if level > logging.DEBUG:
        strategy.setLevel(logging.WARNING)
        trace.addFilter(_not_succeeded)
    else:
        strategy.setLevel(logging.NOTSET)


def bind_task_context(task_id: str, task_name: str) -> None:
    """Pool processes and threads are reused: start every task from a clean context."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task_name=task_name)


def clear_task_context() -> None:
    structlog.contextvars.clear_contextvars()

