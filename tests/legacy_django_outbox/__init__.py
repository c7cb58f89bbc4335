"""The Django app as 0.1.0 shipped it (``"tasks.django_outbox"``), kept to test the upgrade:
its migration and models as they were, under the same app label."""
