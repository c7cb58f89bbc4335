"""The database's clock as a Django expression (importable before Django's apps are loaded)."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models.expressions import Expression

# The same as mipos_worker/sql_outbox/schema.py's (not imported: a Django POS may not have
# SQLAlchemy). Not UNIX_TIMESTAMP(NOW(6)): with time_zone=SYSTEM in a zone with daylight saving,
# the autumn's repeated hour comes out one hour in the future. UTC_TIMESTAMP has no zone.
MYSQL_NOW = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1e6)"


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
            return MYSQL_NOW, []
        raise NotImplementedError(f"the mipos outbox does not support {vendor!r}")
