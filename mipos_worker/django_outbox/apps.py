from django.apps import AppConfig


class MiposOutboxConfig(AppConfig):
    name = "mipos_worker.django_outbox"
    label = "mipos_outbox"
    verbose_name = "mipos outbox"
    default_auto_field = "django.db.models.BigAutoField"
