"""``mipos-worker doctor``: is this deployment able to deliver orders right now?

Each check ends ``ok``, ``warn`` (worth a look, not broken) or ``fail``; any
``fail`` makes the exit code 1, so the command doubles as a health check.
Checks that need Redis are skipped, and say so, when Redis cannot be reached.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis

from cli.output import seconds
from config import (
    RedisSettings,
    SettingsError,
    WorkerSettings,
    broker_settings_problems,
    load_checked_worker_settings,
    load_producer_settings,
    url_without_password,
)
from config.timing import QUEUE
from mipos_worker.order.model import order_key
from mipos_worker.order.stamps import stamps_of
from mipos_worker.settings import TlsOptions, tls_options_of
from worker.mipos.errors import MiposError
from worker.ops.metrics import read_gauges

Status = Literal["ok", "warn", "fail", "skipped"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass(frozen=True)
class DoctorOptions:
    max_wait_s: float = 60.0  # oldest waiting message older than this: fail
    ping_timeout_s: float = 2.0
    skip_mipos: bool = False


def run_checks(options: DoctorOptions) -> list[Check]:
    checks: list[Check] = []
    worker_settings: WorkerSettings | None = None
    try:
        worker_settings = load_checked_worker_settings()
        redis_settings = worker_settings.redis
        checks.append(Check("settings", "ok", "every worker setting is present and valid"))
    except SettingsError as exc:
        checks.append(Check("settings", "fail", "; ".join(exc.problems)))
        try:
            redis_settings = load_producer_settings()
        except SettingsError as redis_exc:
            checks.append(Check("redis", "skipped", "; ".join(redis_exc.problems)))
            return checks

    client = _redis_check(redis_settings, checks)
    if worker_settings is None:
        checks.append(Check("mipos token", "skipped", "the mipos settings are not valid"))
    elif options.skip_mipos:
        checks.append(Check("mipos token", "skipped", "--skip-mipos"))
    else:
        checks.append(_mipos_check(worker_settings))
    if client is None:
        for name in ("workers", "queue", "oldest waiting", "dead letters", "circuit breaker",
                     "redis memory"):
            checks.append(Check(name, "skipped", "Redis cannot be reached"))
        return checks
    prefix = redis_settings.key_prefix
    broker_problems = broker_settings_problems()
    if broker_problems:
        # A ping consumes replies, and a consuming connection re-queues what workers hold
        # longer than its own visibility timeout: without the workers' value, do not ping.
        checks.append(Check("workers", "skipped", "no ping without a valid visibility timeout: "
                            + "; ".join(broker_problems)))
    else:
        checks.append(_workers_check(redis_settings.url, options.ping_timeout_s))
    gauges = {name: value for name, (_help, value) in read_gauges(client, prefix, QUEUE).items()}
    checks.extend(_queue_checks(client, gauges, options.max_wait_s))
    checks.append(_dead_letters_check(client, prefix))
    checks.append(_breaker_check(gauges))
    checks.append(_memory_check(client, worker_settings))
    return checks


def _memory_check(client: redis.Redis, settings: WorkerSettings | None) -> Check:
    from cli.memory import memory_check_detail

    if settings is None:
        return Check("redis memory", "skipped", "the worker settings are not valid")
    try:
        status, detail = memory_check_detail(client, settings)
    except redis.RedisError as exc:
        return Check("redis memory", "warn", f"cannot read Redis's memory figures: {exc}")
    return Check("redis memory", "ok" if status == "ok" else "warn", detail)


def _redis_check(settings: RedisSettings, checks: list[Check]) -> redis.Redis | None:
    from mipos_worker.state.connection import redis_from_url

    where = url_without_password(settings.url)
    client = redis_from_url(settings.url, timeout_s=3.0, retries=0)
    try:
        started = time.monotonic()
        client.ping()
        elapsed = time.monotonic() - started
        info = client.info("server")
    except redis.AuthenticationError as exc:
        checks.append(Check("redis", "fail", f"{where} refused the password in REDIS_URL ({exc})"))
        return None
    except redis.RedisError as exc:
        checks.append(Check("redis", "fail", f"cannot reach Redis at {where}: {exc}"))
        return None
    checks.append(Check("redis", "ok", f"{where} answered in {seconds(elapsed)} "
                                       f"(Redis {info.get('redis_version', '?')})"))
    checks.extend(_topology_checks(client, settings))
    tls = _tls_check(settings.url)
    if tls is not None:
        checks.append(tls)
    checks.append(_persistence_check(client))
    checks.append(_eviction_check(client))
    return client


def _topology_checks(client: redis.Redis, settings: RedisSettings) -> list[Check]:
    """The master, its replicas and their lag; with Sentinel, the quorum. Fails when
    REDIS_MIN_REPLICAS_ACK cannot be met: then no delay() and no finished order succeeds."""
    from worker.state.topology import replication_of, sentinel_view

    try:
        state = replication_of(client)
    except redis.RedisError as exc:
        return [Check("redis topology", "fail", f"cannot read INFO replication: {exc}")]
    replicas = ", ".join(f"{r.address} {r.state}, {r.lag_s}s / {r.behind_bytes} bytes behind"
                         for r in state.replicas) or "none"
    detail = f"master {state.master}; replicas: {replicas}"
    need = settings.min_replicas_ack
    if need and state.online < need:
        status: Status = "fail"
        detail += (f"; REDIS_MIN_REPLICAS_ACK={need} but {state.online} online: every delay() and "
                   "every finished order waits REDIS_REPLICA_ACK_TIMEOUT_S and fails")
    elif settings.sentinel and not state.replicas:
        status = "warn"
        detail += "; no replica: Sentinel has nothing to promote if the master is lost"
    else:
        status = "ok"
        if need:
            detail += f"; writes wait for {need} (REDIS_MIN_REPLICAS_ACK)"
        elif state.replicas:
            detail += ("; REDIS_MIN_REPLICAS_ACK=0: a failover can lose the last writes "
                       "(replication is asynchronous)")
    checks = [Check("redis topology", status, detail)]
    if settings.sentinel:
        view = sentinel_view(settings)
        failovers = f"; failovers so far: {view.failovers}" if view.failovers is not None else ""
        text = (f"{view.answered} of {view.configured} Sentinels answered; quorum {view.quorum}; "
                f"{view.quorum_detail}{failovers}")
        checks.append(Check("sentinel quorum", "ok" if view.quorum_ok else "fail", text))
    return checks


def _tls_check(url: str) -> Check | None:
    """What REDIS_URL's TLS checks, as every client applies it (mipos_worker.settings.TlsOptions):
    ok only with the certificate and the host name checked."""
    try:
        options = tls_options_of(url)
    except ValueError as exc:  # the settings refuse these: only a URL set by hand gets here
        return Check("redis tls", "fail", str(exc))
    if options is None:
        return None
    ca = "the CA in ssl_ca_certs" if options.ca_certs else "the system's CA store"
    if options.cert_reqs == "none":
        return Check("redis tls", "warn", "TLS, certificate NOT checked (ssl_cert_reqs=none): anyone on "
                     "the path can read the orders and the Redis password; remove it (and add "
                     "ssl_ca_certs=/path/ca.crt for a private CA)")
    if not options.hostname_checked:
        return Check("redis tls", "warn", f"TLS, certificate checked against {ca}, host name NOT checked "
                     f"({_hostname_off(options)}): a certificate it signed for any other host is "
                     "accepted too; use a certificate that names the host REDIS_URL uses")
    return Check("redis tls", "ok", f"TLS, the server's certificate and host name checked against {ca}")


def _hostname_off(options: TlsOptions) -> str:
    if options.check_hostname is False:
        return "ssl_check_hostname=false"
    return "the installed redis-py does not check it unless REDIS_URL says ssl_check_hostname=true"


def _persistence_check(client: redis.Redis) -> Check:
    info = client.info("persistence")
    if int(info.get("aof_enabled", 0)):
        return Check("redis persistence", "ok", "append-only file on: a restart keeps queued orders")
    try:
        save = str(client.config_get("save").get("save", "")).strip()
    except redis.ResponseError:
        save = "unknown"  # CONFIG is disabled on some managed Redis
    if save and save != "unknown":
        return Check("redis persistence", "warn", f"snapshots only (save {save!r}): a restart loses "
                     "what arrived since the last snapshot; turn on appendonly")
    return Check("redis persistence", "warn", "no append-only file" + (" and no snapshots" if not save else "")
                 + ": a Redis restart loses queued orders and retries; turn on appendonly")


def _eviction_check(client: redis.Redis) -> Check:
    try:
        policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy", ""))
    except redis.ResponseError:
        return Check("redis eviction", "warn", "CONFIG is disabled: cannot tell maxmemory-policy; "
                     "it must be noeviction")
    if policy == "noeviction":
        return Check("redis eviction", "ok", "maxmemory-policy noeviction")
    return Check("redis eviction", "fail", f"maxmemory-policy {policy}: under memory pressure Redis "
                 "would evict queued orders and the ledger; set it to noeviction")


def _mipos_check(settings: WorkerSettings) -> Check:
    from worker.mipos.client import MiposClient

    client = MiposClient(settings.mipos)
    started = time.monotonic()
    try:
        grant = client.request_token()  # the token call does not rotate: safe beside live workers
    except MiposError as exc:
        hint = ""
        if exc.error_class.value in ("auth", "permanent"):
            hint = " (check MIPOS_CLIENT_ID, MIPOS_CLIENT_SECRET, MIPOS_EMAIL and MIPOS_PASSWORD)"
        status = f"HTTP {exc.http_status}: " if exc.http_status else ""
        return Check("mipos token", "fail", f"the token call to {settings.mipos.base_url} failed: "
                     f"{status}{exc.message}{hint}")
    elapsed = time.monotonic() - started
    expiry = ""
    if grant.expires_at is not None:
        left = grant.expires_at - time.time()
        expiry = f"; the current token expires in {seconds(left)}" if left > 0 else \
            "; the current token has expired (workers refresh it)"
    return Check("mipos token", "ok", f"{settings.mipos.base_url} issued a token in "
                 f"{seconds(elapsed)} (not shown){expiry}")


def _workers_check(url: str, timeout_s: float) -> Check:
    from worker.wiring.celery_app import app

    app.conf.broker_url = url
    try:
        replies = app.control.ping(timeout=timeout_s)
    except Exception as exc:  # kombu raises its own and redis-py's errors here
        return Check("workers", "fail", f"could not ping the workers: {type(exc).__name__}: {exc}")
    names = sorted(name for reply in replies for name in reply)
    if not names:
        return Check("workers", "fail", f"no worker answered a ping within {timeout_s:g}s: start "
                     "one (the Procfile's worker: line) or check that it uses this REDIS_URL")
    return Check("workers", "ok", f"{len(names)} answered: {', '.join(names)}")


def _queue_checks(client: redis.Redis, gauges: dict[str, float], max_wait_s: float) -> list[Check]:
    queued = int(gauges["mipos_queue_depth"])
    unacked = int(gauges["mipos_unacked_messages"])
    inflight = int(gauges["mipos_orders_in_flight"])
    checks = [Check("queue", "ok", f"{queued} waiting, {unacked} taken by workers (scheduled "
                    f"retries included), {inflight} orders not final")]
    oldest = client.lindex(QUEUE, -1)  # LPUSH in, BRPOP out: the tail waited longest
    if oldest is None:
        checks.append(Check("oldest waiting", "ok", "nothing waiting"))
        return checks
    seconds_now, micros = client.time()  # the stamps are on Redis's clock (mipos_worker/state/clock.py)
    age, order = _message_age(oldest if isinstance(oldest, bytes) else str(oldest).encode(),
                              now=float(seconds_now) + float(micros) / 1e6)
    if age is None:
        checks.append(Check("oldest waiting", "ok", f"cannot tell the age of {order}"))
    elif age > max_wait_s:
        checks.append(Check("oldest waiting", "fail", f"{order} has waited {seconds(age)} "
                            f"(more than {seconds(max_wait_s)}): workers are missing or too few"))
    else:
        checks.append(Check("oldest waiting", "ok", f"{order}, waiting {seconds(age)}"))
    return checks


def _message_age(raw: bytes, now: float) -> tuple[float | None, str]:
    """How long the order of a queued Celery message has waited since it was enqueued."""
    try:
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        kwargs: dict[str, Any] = body[1]
        label = (f"{message['headers'].get('task')} for order "
                 f"{order_key(kwargs.get('store_id'), kwargs.get('order_external_id'))}")
        stamps = stamps_of(kwargs)
        since = max(stamps.enqueued_at or 0.0, stamps.not_before or 0.0) or None
        return (now - since if since else None), label
    except (ValueError, KeyError, IndexError, TypeError):
        return None, "a message in a format we do not know"


def _dead_letters_check(client: redis.Redis, prefix: str) -> Check:
    from worker.state.deadletters import DeadLetters

    hour_ago = time.time() - 3600
    letters = DeadLetters(client, prefix).list(since=hour_ago)
    if not letters:
        return Check("dead letters", "ok", "none in the last hour")
    reasons: dict[str, int] = {}
    for letter in letters:
        reasons[letter.reason] = reasons.get(letter.reason, 0) + 1
    by_reason = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    return Check("dead letters", "warn", f"{len(letters)} in the last hour ({by_reason}): "
                 "see `mipos-worker dead list --since 1h`")


def _breaker_check(gauges: dict[str, float]) -> Check:
    held = int(gauges["mipos_orders_held_by_breaker"])
    if gauges["mipos_breaker_open"]:
        return Check("circuit breaker", "warn", f"open: mipos is failing for every worker; {held} "
                     "orders held, probing for recovery")
    return Check("circuit breaker", "ok", "closed" + (f", {held} orders being released" if held else ""))


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not any(c.status == "fail" for c in checks), "checks": [asdict(c) for c in checks]}
