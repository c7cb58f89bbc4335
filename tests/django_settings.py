"""A Django project for the outbox tests: the app installed, the database from the environment.

``MIPOS_TEST_DJANGO_DB``: a path (SQLite) or ``postgresql://user@host:port/name``.
``MIPOS_TEST_DJANGO_APP``: the outbox app's INSTALLED_APPS entry (the upgrade test sets 0.1.0's).
"""

import os
from urllib.parse import urlsplit

_db = os.environ.get("MIPOS_TEST_DJANGO_DB", ":memory:")
if _db.startswith("postgresql://"):
    _url = urlsplit(_db)
    DATABASES = {"default": {"ENGINE": "django.db.backends.postgresql", "NAME": _url.path.lstrip("/"),
                             "USER": _url.username, "HOST": _url.hostname, "PORT": str(_url.port)}}
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": _db}}

INSTALLED_APPS = [os.environ.get("MIPOS_TEST_DJANGO_APP", "mipos_worker.django_outbox")]
SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
