from django.apps import AppConfig


class LegacyMiposOutboxConfig(AppConfig):
    name = "tests.legacy_django_outbox"  # 0.1.0: "tasks.django_outbox"
    label = "mipos_outbox"
    verbose_name = "mipos outbox"
    default_auto_field = "django.db.models.BigAutoField"
