"""Redis with TLS (rediss://) and a password, for the POS side and the worker."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, harvest_tokens, new_order_id
from tests.harness import ROOT, RedisServer, Sandbox

PASSWORD = "tls-redis-password-41c"


def make_certificates(directory: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=mipos-worker test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "redis.key", "-out", "redis.csr",
            "-subj", "/CN=127.0.0.1")
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "redis.crt", "-days", "2", "-extfile", "ext.cnf")


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
