# The dead table's own id (issue 24): outbox ids can repeat (a reset sequence, a restored dump),
# and a second row moved aside under an id already there could not be kept. The row's id in
# the outbox moves to outbox_id; the rows already there keep theirs in both.
# The same change as mipos_worker/sql_outbox/upgrade.py, for tables Django made.

from typing import Any

from django.core.management.color import no_style
from django.db import migrations, models


def start_ids_above_the_rows_kept(apps: Any, schema_editor: Any) -> None:
    """PostgreSQL's new identity starts at 1, below the ids kept; elsewhere the database
    already starts above them (SQLite's AUTOINCREMENT after the copy, AUTO_INCREMENT)."""
    connection = schema_editor.connection
    for sql in connection.ops.sequence_reset_sql(no_style(), [apps.get_model("mipos_outbox", "DeadOutboxRow")]):
        schema_editor.execute(sql)


class Migration(migrations.Migration):

    dependencies = [
        ("mipos_outbox", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="deadoutboxrow",
            name="outbox_id",
            field=models.BigIntegerField(null=True),
        ),
        migrations.RunSQL(
            "UPDATE mipos_outbox_dead SET outbox_id = id",
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name="deadoutboxrow",
            name="outbox_id",
            field=models.BigIntegerField(),
        ),
        migrations.AlterField(
            model_name="deadoutboxrow",
            name="id",
            field=models.BigAutoField(primary_key=True, serialize=False),
        ),
        migrations.RunPython(start_ids_above_the_rows_kept, migrations.RunPython.noop),
    ]
