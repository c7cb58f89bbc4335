"""Redis with TLS (rediss://) and a password, for the POS side and the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.processes import ROOT, RedisServer, Sandbox
from tests.conftest import Cluster, harvest_tokens, new_order_id

PASSWORD = "tls-redis-password-41c"
# Opens the broker connection the POS and every process of ours open, and says whether it worked.
BROKER_PROBE = """
from worker.wiring.celery_app import app
with app.connection_for_write() as connection:
    connection.ensure_connection(max_retries=0)
    connection.default_channel.client.ping()
print("connected")
"""


CA_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {name}
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""
# What Python 3.13's strict X.509 checks (VERIFY_X509_STRICT) want of a server certificate.
SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


def openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> Path:
    """ca.crt and ca.key in ``directory``: a throwaway CA."""
    (directory / "ca.cnf").write_text(CA_CONFIG.format(name=name))
    openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", "ca.key",
            "-out", "ca.crt", "-days", "2", "-config", "ca.cnf", "-extensions", "v3_ca")
    return directory / "ca.crt"


def make_certificates(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed (ca.crt, redis.crt, redis.key)."""
    make_ca(directory, "mipos-worker test CA")
    openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", "redis.key",
            "-out", "redis.csr", "-subj", "/CN=127.0.0.1")
    (directory / "server.ext").write_text(SERVER_EXTENSIONS)
    openssl(directory, "x509", "-req", "-sha256", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "redis.crt", "-days", "2", "-extfile", "server.ext")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    make_certificates(tls_dir)
    server = RedisServer(tmp_path / "redis", tls_dir=tls_dir, password=PASSWORD)
    yield server
    server.stop()


def test_worker_and_pos_over_tls_with_a_password(tls_redis: RedisServer, sandbox: Sandbox,
                                                 logdir: Path) -> None:
    assert tls_redis.url.startswith(f"rediss://:{PASSWORD}@")
    harvest_tokens(sandbox)
    sandbox.control.reset()
    cluster = Cluster(tls_redis, sandbox, logdir, 1, {})
    try:
        order_id = new_order_id()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIPOS_")}
        env["REDIS_URL"] = tls_redis.url
        subprocess.run(
            [sys.executable, "-c", "import sys; from tasks import accept_order; "
             "accept_order.delay(delivery_id=1, store_id='3', order_external_id=sys.argv[1])", order_id],
            cwd=ROOT, env=env, check=True, capture_output=True, timeout=60,
        )
        [line] = cluster.wait_final(order_id)
        assert line["outcome"] == "accepted"
        log = "\n".join(w.log_path.read_text() for w in cluster.workers)
        assert PASSWORD not in log
    finally:
        cluster.stop()


def other_ca(directory: Path) -> Path:
    """A CA that signed nothing the server has."""
    directory.mkdir()
    return make_ca(directory, "some other CA")


def probe_broker(url: str, ca_file: Path) -> subprocess.CompletedProcess[str]:
    """The broker connection in a fresh process, with ``ca_file`` as its system certificate store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIPOS_", "SSL_CERT_"))}
    env.update(REDIS_URL=url, SSL_CERT_FILE=str(ca_file))
    return subprocess.run([sys.executable, "-c", BROKER_PROBE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def bare_url(server: RedisServer) -> str:
    """The server's rediss:// URL without any ssl_ parameter."""
    return f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0"


def test_broker_refuses_a_certificate_the_store_does_not_trust(tls_redis: RedisServer, tmp_path: Path) -> None:
    result = probe_broker(bare_url(tls_redis), other_ca(tmp_path / "other"))

    assert result.returncode != 0 and "connected" not in result.stdout, result
    assert "certificate verify failed" in result.stderr


def test_broker_verifies_against_the_system_store_without_ssl_parameters(tls_redis: RedisServer,
                                                                           tmp_path: Path) -> None:
    result = probe_broker(bare_url(tls_redis), tmp_path / "tls" / "ca.crt")

    assert result.returncode == 0 and result.stdout.strip() == "connected", result.stderr


@pytest.mark.parametrize("opt_out", ["none", "CERT_NONE"])
def test_doctor_warns_about_an_unverified_redis(tls_redis: RedisServer, tmp_path: Path, opt_out: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIPOS_", "SSL_CERT_"))}
    env.update(REDIS_URL=f"{bare_url(tls_redis)}?ssl_cert_reqs={opt_out}",
               SSL_CERT_FILE=str(other_ca(tmp_path / "other")))
    result = subprocess.run([str(Path(sys.executable).parent / "mipos-worker"), "doctor", "--json",
                             "--skip-mipos", "--ping-timeout", "0.5"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)

    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["redis"]["status"] == "ok", checks["redis"]
    assert checks["redis tls"]["status"] == "warn" and "ssl_cert_reqs=none" in checks["redis tls"]["detail"]
    assert PASSWORD not in result.stdout + result.stderr
