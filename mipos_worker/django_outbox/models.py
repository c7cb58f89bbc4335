"""The outbox tables; the same columns as ``mipos_worker/sql_outbox/schema.py``."""

from __future__ import annotations

from django.db import models

from mipos_worker.django_outbox.clock import DatabaseNow

__all__ = ["DatabaseNow", "DeadOutboxRow", "OutboxRow"]


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
