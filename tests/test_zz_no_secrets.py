"""Runs last (file order): every worker log line of the whole run is free of secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.processes import Sandbox
from tests.conftest import SANDBOX_ENV, SEEN_TOKENS, harvest_tokens


def test_no_worker_log_line_contains_a_token_the_secret_or_the_password(
        logdir: Path, sandbox: Sandbox) -> None:
    harvest_tokens(sandbox)
    logs = sorted(logdir.glob("worker-*.log"))
    if not logs:
        pytest.skip("run with the whole suite: it reads the logs of the other tests' workers")
    text = "\n".join(path.read_text(errors="replace") for path in logs)
    assert logs and text.count("_attempt") > 50, "the run should have produced attempt lines"
    assert len(SEEN_TOKENS) >= 3, "the run should have used several tokens"
    secrets = [SANDBOX_ENV["MIPOS_CLIENT_SECRET"], SANDBOX_ENV["MIPOS_PASSWORD"], *SEEN_TOKENS]
    for secret in secrets:
        assert secret not in text, f"a secret ({secret[:3]}...) reached a worker log"
