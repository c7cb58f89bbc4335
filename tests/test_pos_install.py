"""The POS side as a POS gets it: the wheel built from this checkout, installed in fresh venvs,
used from POS projects whose own modules carry the checkout's generic names.

- a Django POS laid out as cookiecutter-django lays out every project: settings in
  ``config/``, its own Celery app (``config/celery_app.py``), an app with its own
  ``tasks.py``, and a root ``worker.py``; SQLite;
- a Flask + SQLAlchemy POS with its own root ``tasks.py``, ``config.py`` and ``worker.py``,
  on PostgreSQL.

Each commits an order with its outbox row, rolls another back, and runs the
relay command from its own venv and directory; a worker of this checkout (the
Procfile's line) takes the order to the sandbox, which accepts it once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.processes import ROOT, read_json_lines, stop_process, wait_for
from tests import postgres
from tests.conftest import ClusterFactory, new_order_id
from tests.outbox_processes import accepts_by_order

VERSION = "0.2.0"
# What a POS must never receive from us.
WORKER_ONLY = ("flower", "tornado", "requests", "structlog", "prometheus-client", "prometheus_client")
INSTALL_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The POS side's wheel, built from this checkout as `make wheel` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=INSTALL_TIMEOUT_S)
    (found,) = out.glob("mipos_worker-*.whl")
    return found


def fresh_venv(path: Path, *requirements: str) -> Path:
    """A new venv with ``requirements`` installed by pip, as a POS would; returns its bin/."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, timeout=120)
    bin_dir = path / "bin"
    result = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", *requirements],
                            capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return bin_dir


def pos_env(bin_dir: Path, redis_url: str, **extra: str) -> dict[str, str]:
    """A POS's environment: its own venv first, nothing of this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE")}
    env.update(PATH=f"{bin_dir}{os.pathsep}/usr/bin:/bin", REDIS_URL=redis_url, PYTHONUNBUFFERED="1", **extra)
    return env


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def run(bin_dir: Path, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(bin_dir / "python"), *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


class Relay:
    """``mipos-worker outbox relay``, from the POS's venv and directory, as its Procfile would run it."""

    def __init__(self, bin_dir: Path, cwd: Path, env: dict[str, str], database_url: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [str(bin_dir / "mipos-worker"), "outbox", "relay", "--database-url", database_url,
             "--poll-interval", "0.1", "--report-every", "1s"],
            cwd=cwd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)


def installed_top_level(bin_dir: Path) -> set[str]:
    """The names our distribution put into site-packages, from its RECORD."""
    script = ("import importlib.metadata as m\n"
              "print('\\n'.join(sorted({str(f).split('/')[0] for f in m.distribution('mipos-worker').files"
              " if not str(f).startswith('..')})))")
    out = subprocess.run([str(bin_dir / "python"), "-c", script], capture_output=True, text=True,
                         timeout=60, check=True, cwd="/")
    return set(out.stdout.split())


def installed_distributions(bin_dir: Path) -> set[str]:
    out = subprocess.run([str(bin_dir / "python"), "-m", "pip", "list", "--format=json",
                          "--disable-pip-version-check"], capture_output=True, text=True, timeout=60, check=True)
    return {d["name"].lower() for d in json.loads(out.stdout)}


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert names == {"mipos_worker", f"mipos_worker-{VERSION}.dist-info"}


# -- the Django POS, laid out as cookiecutter-django ------------------------------------------------

DJANGO_POS = {
    "manage.py": """
        import os
        import sys

        if __name__ == "__main__":
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
            from django.core.management import execute_from_command_line
            execute_from_command_line(sys.argv)
    """,
    "config/__init__.py": """
        # cookiecutter-django: the project's Celery app is loaded with Django.
        from .celery_app import app as celery_app

        __all__ = ("celery_app",)
        POS_OWN = "config"
    """,
    "config/celery_app.py": """
        import os

        from celery import Celery

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
        app = Celery("pos")
        app.config_from_object("django.conf:settings", namespace="CELERY")
        app.autodiscover_tasks()
    """,
    "config/settings/__init__.py": "",
    "config/settings/base.py": """
        import os
        from pathlib import Path

        BASE_DIR = Path(__file__).resolve().parent.parent.parent
        SECRET_KEY = "pos-test-only"
        DEBUG = False
        USE_TZ = True
        DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
        DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["POS_DB"]}}
        INSTALLED_APPS = [
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "mipos_worker.django_outbox",
            "pos.orders",
        ]
        CELERY_BROKER_URL = "memory://"
    """,
    "config/settings/local.py": "from .base import *  # noqa: F403\n",
    "worker.py": 'POS_OWN = "worker"\n',
    "pos/__init__.py": "",
    "pos/orders/__init__.py": "",
    "pos/orders/apps.py": """
        from django.apps import AppConfig

        class OrdersConfig(AppConfig):
            name = "pos.orders"
    """,
    "pos/orders/models.py": """
        from django.db import models

        class Order(models.Model):
            external_id = models.CharField(max_length=64, unique=True)
    """,
    "pos/orders/migrations/__init__.py": "",
    "pos/orders/migrations/0001_initial.py": """
        from django.db import migrations, models

        class Migration(migrations.Migration):
            initial = True
            dependencies = []
            operations = [
                migrations.CreateModel(name="Order", fields=[
                    ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                    ("external_id", models.CharField(max_length=64, unique=True)),
                ]),
            ]
    """,
    "pos/orders/tasks.py": """
        from celery import shared_task

        POS_OWN = "tasks"

        @shared_task
        def print_receipt(order_id):
            return order_id
    """,
    # What the POS's view does when an order arrives: the order and its acceptance, one transaction.
    "pos/orders/services.py": """
        from django.db import transaction

        from mipos_worker import accept_order
        from mipos_worker.django_outbox import outbox
        from pos.orders.models import Order

        def store(external_id, *, fail=False):
            with transaction.atomic():
                Order.objects.create(external_id=external_id)
                outbox.accept(delivery_id="7", store_id="3", order_external_id=external_id)
                if fail:
                    raise RuntimeError("the POS could not print the ticket")

        def store_on_commit(external_id):
            with transaction.atomic():
                Order.objects.create(external_id=external_id)
                accept_order.delay_on_commit(delivery_id="8", store_id="3", order_external_id=external_id)
    """,
}

DJANGO_SCRIPT = """
import json, sys
from pos.orders import services
committed, rolled_back, on_commit = sys.argv[1:4]
services.store(committed)
try:
    services.store(rolled_back, fail=True)
except RuntimeError:
    pass
services.store_on_commit(on_commit)

import celery, config, worker, pos.orders.tasks as pos_tasks
from mipos_worker.django_outbox.models import OutboxRow
print(json.dumps({
    "rows": sorted(json.loads(r.arguments)["order_external_id"] for r in OutboxRow.objects.all()),
    "own": [config.POS_OWN, worker.POS_OWN, pos_tasks.POS_OWN],
    "current_app": celery.current_app.main,
    "receipt": pos_tasks.print_receipt.name,
}))
"""


@pytest.fixture(scope="module")
def django_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    return fresh_venv(tmp_path_factory.mktemp("django-venv") / "venv", f"{wheel}[django]")


def test_django_pos_in_the_cookiecutter_layout(make_cluster: ClusterFactory, django_venv: Path,
                                               tmp_path: Path) -> None:
    cluster = make_cluster()
    project = tmp_path / "pos"
    write_tree(project, DJANGO_POS)
    database = tmp_path / "pos.sqlite3"
    env = pos_env(django_venv, cluster.redis.url, POS_DB=str(database))
    run(django_venv, project, env, "manage.py", "migrate", "--verbosity", "0")
    committed, rolled_back, on_commit = new_order_id(), new_order_id(), new_order_id()
    done = run(django_venv, project, {**env, "DJANGO_SETTINGS_MODULE": "config.settings.local"}, "-c",
               "import django; django.setup()\n" + DJANGO_SCRIPT, committed, rolled_back, on_commit)
    report = json.loads(done.stdout)
    assert report["rows"] == [committed]  # the rolled-back order wrote no row
    assert report["own"] == ["config", "worker", "tasks"]  # the POS's modules are still its own
    assert report["current_app"] == "pos"  # and its Celery app is still the current one
    assert report["receipt"] == "pos.orders.tasks.print_receipt"

    relay = Relay(django_venv, project, env, f"sqlite:///{database}", tmp_path / "relay.log")
    try:
        cluster.wait_final(committed, timeout=30)
        cluster.wait_final(on_commit, timeout=30)
        wait_for(lambda: any(line.get("event") == "outbox_backlog" and line.get("backlog") == 0
                             for line in read_json_lines(relay.log)),
                 timeout=15, what="the relay to report an empty outbox")
    finally:
        relay.stop()
    counts = accepts_by_order(cluster.control)
    assert counts[committed] == 1 and counts[on_commit] == 1 and counts[rolled_back] == 0
    assert cluster.attempt_lines(rolled_back) == []


def test_the_django_venv_has_only_the_pos_side(django_venv: Path) -> None:
    assert installed_top_level(django_venv) == {"mipos_worker", f"mipos_worker-{VERSION}.dist-info"}
    installed = installed_distributions(django_venv)
    assert {"celery", "kombu", "redis", "django", "sqlalchemy"} <= installed
    assert installed.isdisjoint(WORKER_ONLY)


def test_an_operator_command_in_a_pos_says_where_it_runs(django_venv: Path, tmp_path: Path) -> None:
    result = subprocess.run([str(django_venv / "mipos-worker"), "doctor"], cwd=tmp_path,
                            env=pos_env(django_venv, "redis://127.0.0.1:1/0"), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "'doctor' is an operator command of the worker, which runs from its checkout" in result.stderr
    assert "Traceback" not in result.stderr


# -- the Flask + SQLAlchemy POS, on PostgreSQL ---------------------------------------------------

FLASK_POS = {
    "config.py": """
        import os

        POS_OWN = "config"
        DATABASE_URL = os.environ["DATABASE_URL"]
    """,
    "tasks.py": """
        from celery import Celery

        POS_OWN = "tasks"
        celery = Celery("pos", broker="memory://")

        @celery.task
        def print_receipt(order_id):
            return order_id
    """,
    "worker.py": 'POS_OWN = "worker"\n',
    "pos_app.py": """
        from flask import Flask, jsonify, request
        from sqlalchemy import Column, MetaData, String, Table, create_engine, insert

        import config
        from mipos_worker import sql_outbox as outbox

        engine = create_engine(config.DATABASE_URL)
        metadata = MetaData()
        orders = Table("pos_order", metadata, Column("external_id", String(64), primary_key=True))
        app = Flask(__name__)

        @app.post("/orders")
        def create_order():
            body = request.get_json()
            with engine.begin() as conn:  # the order and its acceptance commit together
                conn.execute(insert(orders).values(external_id=body["external_id"]))
                outbox.accept(conn, delivery_id="9", store_id="3", order_external_id=body["external_id"])
                if body.get("fail"):
                    raise RuntimeError("the POS could not print the ticket")
            return jsonify(ok=True), 201

        @app.errorhandler(RuntimeError)
        def failed(exc):
            return jsonify(error=str(exc)), 500

        def create_tables():
            metadata.create_all(engine)
            outbox.create_tables(engine)
    """,
}

FLASK_SCRIPT = """
import json, sys
import config, tasks, worker
import pos_app
committed, rolled_back = sys.argv[1:3]
pos_app.create_tables()
client = pos_app.app.test_client()
ok = client.post("/orders", json={"external_id": committed})
failed = client.post("/orders", json={"external_id": rolled_back, "fail": True})
from sqlalchemy import select
with pos_app.engine.connect() as conn:
    rows = [json.loads(a)["order_external_id"]
            for a in conn.execute(select(pos_app.outbox.outbox_table.c.arguments)).scalars()]
print(json.dumps({"statuses": [ok.status_code, failed.status_code], "rows": rows,
                  "own": [config.POS_OWN, tasks.POS_OWN, worker.POS_OWN]}))
"""


def test_flask_pos_with_its_own_tasks_config_and_worker_on_postgresql(
        make_cluster: ClusterFactory, pg_server: postgres.PostgresServer, wheel: Path, tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "venv", f"{wheel}[sqlalchemy]", "flask", "psycopg[binary]")
    assert installed_top_level(bin_dir) == {"mipos_worker", f"mipos_worker-{VERSION}.dist-info"}
    assert installed_distributions(bin_dir).isdisjoint(WORKER_ONLY)
    cluster = make_cluster()
    project = tmp_path / "pos"
    write_tree(project, FLASK_POS)
    url = pg_server.create_database(f"flask_{uuid.uuid4().hex[:10]}")
    env = pos_env(bin_dir, cluster.redis.url, DATABASE_URL=url)
    committed, rolled_back = new_order_id(), new_order_id()
    report = json.loads(run(bin_dir, project, env, "-c", FLASK_SCRIPT, committed, rolled_back).stdout)
    assert report == {"statuses": [201, 500], "rows": [committed], "own": ["config", "tasks", "worker"]}

    relay = Relay(bin_dir, project, env, url, tmp_path / "relay.log")
    try:
        lines = cluster.wait_final(committed, timeout=30)
    finally:
        relay.stop()
    assert [line["outcome"] for line in lines] == ["accepted"]
    counts = accepts_by_order(cluster.control)
    assert counts[committed] == 1 and counts[rolled_back] == 0

