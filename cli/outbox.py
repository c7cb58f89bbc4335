"""``doctor --outbox-database-url``: the backlog of the POS database's outbox, as a check.

The outbox commands themselves are the POS side's (``mipos_worker/command.py``).
"""

from __future__ import annotations

from typing import Any

from cli.output import seconds


def outbox_check(database_url: str, max_age_s: float = 60.0) -> Any:
    """The ``doctor`` check for ``--outbox-database-url``: a ``cli.doctor.Check``."""
    from cli.doctor import Check

    try:
        from sqlalchemy import create_engine

        from mipos_worker.sql_outbox import Relay

        engine = create_engine(database_url, pool_pre_ping=True)
        try:
            status = Relay(engine).status()
        finally:
            engine.dispose()
    except Exception as exc:
        return Check("outbox", "fail", f"cannot read the outbox: {type(exc).__name__}: {exc}")
    detail = (f"{status.backlog} waiting, oldest {seconds(status.oldest_age_s)}"
              f"{f', {status.dead} moved aside (mipos_outbox_dead)' if status.dead else ''}")
    if status.oldest_age_s is not None and status.oldest_age_s > max_age_s:
        return Check("outbox", "fail", f"{detail}: older than {seconds(max_age_s)}; is a relay running, "
                                       "and Redis reachable?")
    return Check("outbox", "warn" if status.dead else "ok", detail)
