"""Upgrading the Django app from 0.1.0 (``"tasks.django_outbox"``) to ``"mipos_worker.django_outbox"``:
the migration history continues under the same app label, with no manual step."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests import postgres
from tests.outbox_processes import run_script

LEGACY_APP = "tests.legacy_django_outbox"  # 0.1.0's app: its migration and models as shipped
NEW_APP = "mipos_worker.django_outbox"

MIGRATE_AND_WRITE = """
import json, sys
import django
django.setup()
from io import StringIO
from django.core.management import call_command
from django.db import connection, transaction
out = StringIO()
call_command("migrate", stdout=out, verbosity=1)
app = sys.argv[1]
if app == "mipos_worker.django_outbox":
    from mipos_worker.django_outbox import outbox
    with transaction.atomic():
        outbox.accept(delivery_id="2", store_id="3", order_external_id=sys.argv[2])
else:  # 0.1.0 had no importable writer here: write its row as its models define it
    from tests.legacy_django_outbox.models import DatabaseNow, OutboxRow
    OutboxRow.objects.create(task_id=sys.argv[3], action="accept", created_at=DatabaseNow(), tries=0,
                             arguments=json.dumps({"delivery_id": "1", "store_id": "3",
                                                   "order_external_id": sys.argv[2]}))
shown = StringIO()
call_command("showmigrations", "mipos_outbox", stdout=shown)
with connection.cursor() as cursor:
    cursor.execute("SELECT arguments FROM mipos_outbox ORDER BY id")
    rows = [json.loads(r[0])["order_external_id"] for r in cursor.fetchall()]
print(json.dumps({"migrate": out.getvalue(), "shown": shown.getvalue(), "rows": rows}))
"""


def env_for(app: str, database: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIPOS_")}
    return {**env, "DJANGO_SETTINGS_MODULE": "tests.django_settings", "MIPOS_TEST_DJANGO_DB": database,
            "MIPOS_TEST_DJANGO_APP": app, "REDIS_URL": "redis://127.0.0.1:1/0"}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_database_migrated_by_the_old_app_needs_no_manual_step(
        pg_server: postgres.PostgresServer, tmp_path: Path, kind: str) -> None:
    if kind == "sqlite":
        database = str(tmp_path / "pos.sqlite3")
    else:
        url = pg_server.create_database(f"up_{uuid.uuid4().hex[:10]}")
        database = url.replace("postgresql+psycopg://", "postgresql://")
    old_order, new_order = str(uuid.uuid4()), str(uuid.uuid4())

    old = run_script(env_for(LEGACY_APP, database), MIGRATE_AND_WRITE, LEGACY_APP, old_order, str(uuid.uuid4()))
    assert old.returncode == 0, old.stderr
    assert "Applying mipos_outbox.0001_initial... OK" in json.loads(old.stdout)["migrate"]

    new = run_script(env_for(NEW_APP, database), MIGRATE_AND_WRITE, NEW_APP, new_order)
    assert new.returncode == 0, new.stderr
    report = json.loads(new.stdout)
    assert "mipos_outbox.0001_initial" not in report["migrate"]  # not applied again
    assert "[X] 0001_initial" in report["shown"] and "[ ]" not in report["shown"]
    assert report["rows"] == [old_order, new_order]  # the old row is kept and the new app writes beside it
