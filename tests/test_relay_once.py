"""``mipos-worker outbox relay --once`` with Redis away: one line saying the rows wait, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.processes import ROOT, free_port


def test_relay_once_with_redis_down_says_the_rows_wait(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from mipos_worker import sql_outbox as outbox

    url = f"sqlite:///{tmp_path / 'pos.sqlite3'}"
    engine = sa.create_engine(url)
    outbox.create_tables(engine)
    with engine.begin() as conn:
        outbox.accept(conn, delivery_id="1", store_id="3", order_external_id="01f1b8ce-0000-4000-8000-00000000f001")
    engine.dispose()
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = subprocess.run([str(Path(sys.executable).parent / "mipos-worker"), "outbox", "relay", "--once",
                             "--database-url", url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "mipos-worker: the outbox's rows wait:" in result.stderr
    with sa.create_engine(url).connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(outbox.outbox_table)).scalar_one() == 1
