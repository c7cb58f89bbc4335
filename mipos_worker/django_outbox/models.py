"""The outbox tables; the same columns as ``mipos_worker/sql_outbox/schema.py``."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models.expressions import Expression


class DatabaseNow(Expression):
    """The database's clock in epoch seconds (what the relay subtracts from to get a row's age)."""

    output_field = models.FloatField()

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        vendor = connection.vendor
        if vendor == "postgresql":
            return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)", []
        if vendor == "sqlite":
            return "((julianday('now') - 2440587.5) * 86400.0)", []
        if vendor == "mysql":
            return "CAST(UNIX_TIMESTAMP(NOW(6)) AS DOUBLE)", []
        raise NotImplementedError(f"the mipos outbox does not support {vendor!r}")


class OutboxRow(models.Model):
    id = models.BigAutoField(primary_key=True)
    task_id = models.CharField(max_length=36, unique=True)
    action = models.CharField(max_length=8)
    arguments = models.TextField()
    created_at = models.FloatField()  # the database's clock, epoch seconds
    claim = models.CharField(max_length=36, null=True)
    claimed_until = models.FloatField(null=True)
    tries = models.IntegerField(default=0)
    last_error = models.TextField(null=True)

    class Meta:
        db_table = "mipos_outbox"


class DeadOutboxRow(models.Model):
    id = models.BigAutoField(primary_key=True)  # its own: outbox ids can repeat (migration 0002)
    outbox_id = models.BigIntegerField()  # its id in the outbox
    task_id = models.CharField(max_length=36)
    action = models.CharField(max_length=8)
    arguments = models.TextField()
    created_at = models.FloatField()
    moved_at = models.FloatField(db_index=True)
    reason = models.TextField()

    class Meta:
        db_table = "mipos_outbox_dead"
