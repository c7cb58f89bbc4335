"""No secret reaches a rendered log line, in any form a renderer may give it (issue 11, item 17)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from worker.logs import redaction
from worker.logs.setup import configure_logging

HOSTILE = 'pa"ss\\wörd-€1'  # a quote, a backslash, non-ASCII (Latin-1 and beyond)
SECRET = "client-secret-Ω-\t-42"


@pytest.fixture
def capture() -> Iterator[io.StringIO]:
    """Our logging set up as the worker has it, writing to a buffer instead of stderr."""
    redaction.register_secret(HOSTILE, permanent=True)
    redaction.register_secret(SECRET, permanent=True)
    buffer = io.StringIO()
    yield buffer
    logging.getLogger().handlers[:] = []
    structlog.reset_defaults()


def start(buffer: io.StringIO, log_format: str) -> None:
    configure_logging("DEBUG", log_format)
    root = logging.getLogger()
    [handler] = root.handlers
    handler.setStream(buffer)  # type: ignore[attr-defined]


def forms(secret: str) -> set[str]:
    """Every way a renderer writes the secret, or a recognisable part of it."""
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        ascii(secret)[1:-1],
        secret.encode("unicode_escape").decode("ascii"),
    }


def assert_clean(text: str) -> None:
    assert text.strip(), "nothing was logged"
    for secret in (HOSTILE, SECRET):
        for form in forms(secret):
            assert form not in text, f"{form!r} is in {text!r}"
    lowered = text.lower()
    for fragment in ("wörd", "00f6rd", "xf6rd", "ω", "03a9", "\\t-42"):
        assert fragment not in lowered, f"{fragment!r} is in {text!r}"
    assert redaction.REDACTED in text


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_secrets_in_values_nested_values_and_messages(capture: io.StringIO, log_format: str) -> None:
    start(capture, log_format)
    log = structlog.get_logger("test")
    log.info("token_call", body={"password": HOSTILE, "nested": [{"secret": SECRET}, (HOSTILE,)]})
    log.warning(f"the server said {HOSTILE!r} and {SECRET}")
    log.info("as json", raw=json.dumps({"password": HOSTILE, "client_secret": SECRET}))

    assert_clean(capture.getvalue())


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_secrets_in_stdlib_records_and_tracebacks(capture: io.StringIO, log_format: str) -> None:
    start(capture, log_format)
    logging.getLogger("celery.worker").warning("Task failed: %r", {"password": HOSTILE})
    try:
        raise ValueError(f"bad credentials {HOSTILE!r} / {SECRET!r}")
    except ValueError:
        structlog.get_logger("test").exception("failed")
        logging.getLogger("requests").exception("failed: %s", json.dumps(SECRET))

    assert_clean(capture.getvalue())


def test_the_json_line_stays_valid_json(capture: io.StringIO) -> None:
    start(capture, "json")
    structlog.get_logger("test").info("attempt", error=f'mipos said "{HOSTILE}"', n=3)

    [line] = capture.getvalue().splitlines()
    record = json.loads(line)
    assert record["error"] == f'mipos said "{redaction.REDACTED}"' and record["n"] == 3


def test_redact_walks_containers_without_touching_other_types() -> None:
    redaction.register_secret(HOSTILE, permanent=True)
    value = {"a": [HOSTILE, 1, None, {"b": (f"x{HOSTILE}y",)}], "c": 2.5}

    assert redaction.redact_value(value) == {
        "a": [redaction.REDACTED, 1, None, {"b": (f"x{redaction.REDACTED}y",)}], "c": 2.5}
