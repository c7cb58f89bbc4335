from __future__ import annotations

import pytest

from worker.mipos.client import parse_expires_in
from worker.mipos.tokens import StoredToken

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1585815796", 1585815796.0),  # the documented example: an absolute Unix time
        ("3600", NOW + 3600),  # small: seconds from now
        (3600, NOW + 3600),
        ("", None),
        (None, None),
        ("soon", None),
        ("-5", None),
        (True, None),
    ],
)
def test_expires_in(value: object, expected: float | None) -> None:
    assert parse_expires_in(value, NOW) == expected


def test_refresh_ahead_of_expiry() -> None:
    token = StoredToken("t", expires_at=NOW + 100, issued_at=NOW)
    assert not token.due_for_refresh(NOW + 79)
    assert token.due_for_refresh(NOW + 81)
    assert not StoredToken("t", None, NOW).due_for_refresh(NOW + 10**6)
