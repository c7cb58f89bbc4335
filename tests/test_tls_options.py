"""REDIS_URL's TLS options: read once, applied alike, reported as in force (issue 25, item 10).

redis-py reads a URL's query with ``parse_qs`` and keeps the first value,
kombu with ``parse_qsl`` into a dict and keeps the last, and each reads
``ssl_check_hostname`` in its own way. The settings spell every TLS option out
once, in a form both read alike; the redis-py clients (single Redis, Sentinel
master, the Sentinels) take them from the same reading; ``doctor`` says what
is in force.
"""

from __future__ import annotations

import inspect
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mipos_worker.settings import SettingsError, load_producer_settings
from support.processes import RedisServer
from tests.test_redis_url_secrets import doctor, environment, run
from tests.test_tls import BROKER_PROBE, make_certificates, other_ca
from tests.test_tls import PASSWORD as TLS_PASSWORD


def kombu_ssl(url: str) -> dict[str, Any]:
    from kombu.utils.url import parse_url

    return dict(parse_url(url.split(";")[0]).get("ssl") or {})


def redis_py_ssl(url: str) -> dict[str, Any]:
    from mipos_worker.state.connection import redis_from_url

    kwargs = redis_from_url(url).connection_pool.connection_kwargs
    return {k: v for k, v in kwargs.items() if k.startswith("ssl_")}


CERT_CONSTANTS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def hostname_checked(ssl_kwargs: dict[str, Any]) -> bool:
    """What redis-py's SSLConnection does with these arguments: no name check without a certificate check."""
    from redis.connection import SSLConnection

    if ssl_kwargs["ssl_cert_reqs"] in (ssl.CERT_NONE, "none"):
        return False
    default = inspect.signature(SSLConnection.__init__).parameters["ssl_check_hostname"].default
    return bool(ssl_kwargs.get("ssl_check_hostname", default))


@pytest.mark.parametrize(("query", "cert_reqs", "check_hostname"), [
    ("ssl%5Fcert%5Freqs=none", "none", False),
    ("ssl_cert_reqs=CERT_NONE", "none", False),
    ("ssl_check_hostname=false", "required", False),
    ("ssl_check_hostname=no", "required", False),
    ("ssl_check_hostname=0&ssl%5Fca%5Fcerts=%2Fetc%2Fca.crt", "required", False),
    ("ssl_cert_reqs=optional&ssl_check_hostname=yes", "optional", True),
    ("", "required", True),  # redis-py >= 6 checks the name unless told not to
])
def test_kombu_and_redis_py_apply_the_same_tls_options(query: str, cert_reqs: str,
                                                        check_hostname: bool) -> None:
    url = load_producer_settings({"REDIS_URL": f"rediss://:pw-long-enough@127.0.0.1:6380/0?{query}"}).url
    broker, shared = kombu_ssl(url), redis_py_ssl(url)
    assert broker["ssl_cert_reqs"] == CERT_CONSTANTS[cert_reqs]
    assert shared["ssl_cert_reqs"] == cert_reqs
    assert hostname_checked(broker) is hostname_checked(shared) is check_hostname
    assert broker.get("ssl_ca_certs") == shared.get("ssl_ca_certs")


def test_sentinel_clients_apply_the_same_tls_options() -> None:
    from mipos_worker.state.sentinel import kombu_sentinel_options

    settings = load_producer_settings({
        "REDIS_URL": "sentinel://:pw@127.0.0.1:26379;sentinel://127.0.0.1:26380/0"
                     "?ssl%5Fcert%5Freqs=none&ssl_check_hostname=no",
        "REDIS_SENTINEL_MASTER": "m"})
    sentinels = kombu_sentinel_options(settings, 1.0)["sentinel_kwargs"]
    assert (sentinels["ssl"], sentinels["ssl_cert_reqs"], sentinels["ssl_check_hostname"]) == (True, "none", False)
    master = kombu_ssl(settings.url)
    assert (master["ssl_cert_reqs"], master["ssl_check_hostname"]) == (ssl.CERT_NONE, False)


@pytest.mark.parametrize(("query", "needle"), [
    ("ssl_cert_reqs=none&ssl%5Fcert%5Freqs=required", "ssl_cert_reqs twice"),
    ("ssl_check_hostname=maybe", "ssl_check_hostname"),
    ("ssl_ca_path=/etc/ssl", "ssl_ca_path"),
])
def test_tls_options_that_clients_would_read_differently_are_refused(query: str, needle: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_producer_settings({"REDIS_URL": f"rediss://:hunter22-long@127.0.0.1:6380/0?{query}"})
    assert needle in str(info.value) and "hunter22" not in str(info.value)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Redis over TLS with a certificate for 127.0.0.1 (not for ``localhost``)."""
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    make_certificates(tls_dir)
    server = RedisServer(tmp_path / "redis", tls_dir=tls_dir, password=TLS_PASSWORD)
    yield server
    server.stop()


def broker_answer(env: dict[str, str]) -> str:
    """``connected``, or the last line of the broker connection's error."""
    probe = run([sys.executable, "-c", BROKER_PROBE], env)
    return probe.stdout.strip() if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1]


def test_doctor_reports_an_unchecked_certificate_the_encoded_key_asked_for(tls_redis: RedisServer,
                                                                          tmp_path: Path) -> None:
    env = environment(REDIS_URL=f"rediss://:{TLS_PASSWORD}@127.0.0.1:{tls_redis.port}/0"
                                "?ssl%5Fcert%5Freqs=none",
                      SSL_CERT_FILE=str(other_ca(tmp_path / "other")))
    checks, result = doctor(env)
    tls = checks["redis tls"]
    # The shared state's client, doctor's report and the broker agree: no certificate check.
    assert (checks["redis"]["status"], tls["status"], broker_answer(env)) == ("ok", "warn", "connected"), tls
    assert "certificate NOT checked (ssl_cert_reqs=none)" in tls["detail"]
    assert TLS_PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("off", ["false", "no"])
def test_doctor_reports_a_host_name_not_checked(tls_redis: RedisServer, off: str) -> None:
    ca = tls_redis.workdir.parent / "tls" / "ca.crt"
    # The certificate names 127.0.0.1: through `localhost` only a client that skips the name connects.
    env = environment(REDIS_URL=f"rediss://:{TLS_PASSWORD}@localhost:{tls_redis.port}/0"
                                f"?ssl_ca_certs={ca}&ssl_check_hostname={off}")
    checks, result = doctor(env)
    tls = checks["redis tls"]
    assert (checks["redis"]["status"], tls["status"], broker_answer(env)) == ("ok", "warn", "connected"), tls
    assert "host name NOT checked (ssl_check_hostname=false)" in tls["detail"]
    assert TLS_PASSWORD not in result.stdout + result.stderr


def test_doctor_says_ok_only_when_certificate_and_host_name_are_checked(tls_redis: RedisServer) -> None:
    checks, _ = doctor(environment(REDIS_URL=tls_redis.url))
    tls = checks["redis tls"]
    assert tls["status"] == "ok" and "certificate and host name checked" in tls["detail"], tls
