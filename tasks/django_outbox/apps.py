from django.apps import AppConfig


class MiposOutboxConfig(AppConfig):
    name = "tasks.django_outbox"
    label = "mipos_outbox"
    verbose_name = "mipos outbox"
    default_auto_field = "django.db.models.BigAutoField"
