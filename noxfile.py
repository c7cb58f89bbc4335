"""The suite on every supported Python (pyproject.toml: requires-python >=3.11).

    make test-all                # the whole suite on 3.11, 3.12 and 3.13 (nox -s tests)
    make test-fast               # a fast subset on 3.12 and 3.13, as CI runs it (nox -s fast)
    nox -s tests-3.13 -- -k tls  # one version; after --, pytest's arguments

Each session makes its own venv under .nox/ and installs the project as ``make test`` does:
the POS-side package (editable), the test requirements, and a .pth that puts this checkout's
top-level packages on the path (the worker runs from its checkout). The system packages the
tests start (redis-server, PostgreSQL, ...) are ``make test``'s: scripts/install-system-packages.
nox looks for ``python3.11`` etc. on PATH; the Makefile puts pyenv's installs first.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHONS = ["3.11", "3.12", "3.13"]
# CI's run on the Pythons besides the default one: the unit tests (no process of their own) and
# a few quick ones on a real Redis, worker and sandbox, with the version-sensitive parts (settings,
# the attempt's story, TLS options, the CLI, the metrics). About a minute, after the venv.
FAST_TESTS = [
    "tests/test_attempt_story.py",
    "tests/test_classification.py",
    "tests/test_cli_units.py",
    "tests/test_client_environment.py",
    "tests/test_layout.py",
    "tests/test_redaction.py",
    "tests/test_retry_schedule.py",
    "tests/test_settings.py",
    "tests/test_settle.py",
    "tests/test_token_parsing.py",
    "tests/test_version.py",
    "tests/test_pythons.py",
    "tests/test_field_limits.py",
    "tests/test_order_keys.py",
    "tests/test_secret_files.py",
    "tests/test_tls_options.py",
    "tests/test_metrics.py",
    "tests/test_sandbox_fast.py",
    "tests/test_hostile_text.py",
    "tests/test_alerts.py",
    "tests/test_dashboard.py",
]

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True  # a version not found fails, never skips


def install(session: nox.Session) -> None:
    session.install("--upgrade", "pip")
    session.install("-e", ".", "-r", "requirements/test.txt")
    purelib = session.run("python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                          silent=True)
    assert isinstance(purelib, str)
    Path(purelib.strip(), "mipos-worker-checkout.pth").write_text(f"{ROOT}\n")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite."""
    install(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHONS)
def fast(session: nox.Session) -> None:
    """FAST_TESTS: that the project installs on this Python and its core runs there."""
    install(session)
    session.run("python", "-m", "pytest", *FAST_TESTS, *session.posargs)

