"""A Sentinel password reaches the servers decoded once (issue 25, item 2).

The settings normalize a Sentinel REDIS_URL (every URL gets the credentials,
the database and the query); the password they write back must stay
percent-encoded, or the next reader of the URL breaks on a '/', ';' or '#' in
it, or decodes a '%41' a second time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.sentinel import MASTER_NAME, SentinelCluster
from mipos_worker.redis_url import parse_sentinel_url
from mipos_worker.settings import load_producer_settings, url_without_password
from support.processes import SANDBOX_ENV, wait_for
from tests.test_redis_url_secrets import (
    CLI,
    ENCODED_PASSWORD,
    PASSWORD_PIECES,
    RAW_PASSWORD,
    assert_no_password,
    doctor,
    enqueue,
    environment,
    queued,
    run,
)

SENTINEL_PASSWORD = "se/nt;in#el%41-pw"


@pytest.mark.parametrize(("written", "meant"), [
    ("pa%2Fss-w0rd-long", "pa/ss-w0rd-long"),
    ("pa%3Bss-w0rd-long", "pa;ss-w0rd-long"),
    ("pa%23ss-w0rd-long", "pa#ss-w0rd-long"),
    ("x%2541y-long-pw", "x%41y-long-pw"),
    (ENCODED_PASSWORD, RAW_PASSWORD),
])
def test_the_normalized_sentinel_url_keeps_the_password_as_written(written: str, meant: str) -> None:
    settings = load_producer_settings({
        "REDIS_URL": f"sentinel://:{written}@127.0.0.1:26379;sentinel://127.0.0.1:26380/0",
        "REDIS_SENTINEL_MASTER": "m"})
    target, problems = parse_sentinel_url(settings.url)
    assert problems == [] and target is not None
    assert target.password == meant
    assert_no_password(url_without_password(settings.url), meant, written)
    assert meant in settings.secrets()


def sentinel_url(cluster: SentinelCluster) -> str:
    auth = f":{ENCODED_PASSWORD}@"
    return ";".join(f"sentinel://{auth}127.0.0.1:{s.port}" for s in cluster.sentinels) + "/0"


@pytest.fixture
def special_sentinels(tmp_path: Path) -> Iterator[SentinelCluster]:
    cluster = SentinelCluster(tmp_path / "redis", replicas=0, password=RAW_PASSWORD,
                              sentinel_password=SENTINEL_PASSWORD)
    yield cluster
    cluster.stop()


def test_a_special_sentinel_password_authenticates_everywhere(special_sentinels: SentinelCluster) -> None:
    env = environment(REDIS_URL=sentinel_url(special_sentinels), REDIS_SENTINEL_MASTER=MASTER_NAME,
                      REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD, **SANDBOX_ENV)
    producer = enqueue(env, "sent-1")
    assert producer.returncode == 0, producer.stderr
    master = special_sentinels.master()
    assert wait_for(lambda: queued(master) == 1, timeout=10, what="the message on the master")
    checks, result = doctor(env)
    assert checks["redis"]["status"] == "ok", checks["redis"]
    dead = run([CLI, "dead", "list", "--json"], env)
    assert dead.returncode == 0, dead.stderr
    assert_no_password(result.stdout + result.stderr + dead.stderr, RAW_PASSWORD, ENCODED_PASSWORD,
                       *PASSWORD_PIECES)


