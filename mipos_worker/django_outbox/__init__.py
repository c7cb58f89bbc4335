"""The transactional outbox as a Django app: add ``"mipos_worker.django_outbox"`` to INSTALLED_APPS.

    from django.db import transaction
    from mipos_worker.django_outbox import outbox

    with transaction.atomic():
        order = Order.objects.create(...)
        outbox.accept(delivery_id=..., store_id=..., order_external_id=...)

The tables are the SQLAlchemy outbox's (mipos_worker/sql_outbox), so the same relay,
``mipos-worker outbox relay --database-url URL``, publishes them.
"""
