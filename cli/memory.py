"""``doctor``'s memory check: can Redis's ``maxmemory`` hold what the retention keeps?

The broker needs ``noeviction``, so a full Redis refuses writes: every ``delay()``
and every finished order fails. What finished orders hold at a steady rate is
``rate x (MIPOS_LEDGER_RETENTION_S x done record + MIPOS_HISTORY_RETENTION_S x
history)`` (config/retention.py, with the sizes the benchmark measures).

The rate is the orders finished (attempt lines ``accepted`` or ``denied`` in the
shared metrics) since a sample doctor left in Redis on an earlier run: cheap (one
hash read) and honest about its window, which the check prints. The sample is
replaced once it is older than an hour, so the rate follows the last hours; the
first run only leaves it.
"""

from __future__ import annotations

import redis

from cli.output import seconds
from config import WorkerSettings
from config.retention import bytes_held
from mipos_worker.state.connection import text
from worker.state.counters import Metrics, parse_field

SAMPLE_KEY = "doctor:finished-sample"  # after the key prefix: "<redis time> <orders finished>"
MIN_WINDOW_S = 60.0
RESAMPLE_AFTER_S = 3600.0
HEADROOM = 0.8  # the rest of maxmemory is for queues, in-flight tasks, dead letters, tokens


def finished_orders(client: redis.Redis, prefix: str) -> int:
    total = 0
    for raw, value in client.hgetall(Metrics(client, prefix).key).items():
        name, labels = parse_field(text(raw))
        if name == "mipos_attempts_total" and labels.get("outcome") in ("accepted", "denied"):
            total += int(float(value))
    return total


def observed_rate(client: redis.Redis, prefix: str) -> tuple[float | None, str]:
    """Orders finished per second since the sample, and how that was measured."""
    seconds_now, micros = client.time()
    now = seconds_now + micros / 1e6
    count = finished_orders(client, prefix)
    key = f"{prefix}{SAMPLE_KEY}"
    raw = client.get(key)
    sample = text(raw or "").split()
    then, before = (float(sample[0]), int(sample[1])) if len(sample) == 2 else (None, None)
    if then is None or before is None or before > count or now - then > RESAMPLE_AFTER_S:
        client.set(key, f"{now:.3f} {count}", ex=int(2 * RESAMPLE_AFTER_S))
    if then is None or before is None or before > count:
        return None, "rate not known yet: this run left a sample; run doctor again in a minute or more"
    window = now - then
    if window < MIN_WINDOW_S:
        return None, (f"rate not known yet: the sample is {seconds(window)} old, "
                      f"it needs {seconds(MIN_WINDOW_S)}")
    rate = (count - before) / window
    return rate, f"{rate:.3g} orders/s finished over the last {seconds(window)}"


def memory_check_detail(client: redis.Redis, settings: WorkerSettings) -> tuple[str, str]:
    """(status, detail) of the "redis memory" check."""
    info = client.info("memory")
    try:
        maxmemory = int(client.config_get("maxmemory").get("maxmemory") or 0)
    except redis.ResponseError:  # CONFIG disabled (managed Redis): INFO has it too
        maxmemory = int(info.get("maxmemory", 0))
    used = int(info.get("used_memory", 0))
    rate, how = observed_rate(client, settings.redis.key_prefix)
    retention = (f"MIPOS_LEDGER_RETENTION_S={settings.retention.done_s:g}, "
                 f"MIPOS_HISTORY_RETENTION_S={settings.retention.history_s:g}")
    need = bytes_held(settings, rate) if rate is not None else None
    held = f"; at that rate finished orders hold about {_mb(need)} ({retention})" if need is not None else ""
    if maxmemory == 0:
        return "warn", (f"no maxmemory: a noeviction Redis without a limit grows until the machine runs "
                        f"out of memory; set maxmemory (used now {_mb(used)}); {how}{held}")
    if need is not None and need > HEADROOM * maxmemory:
        return "warn", (f"maxmemory {_mb(maxmemory)} cannot hold the configured retention: {how}{held}, "
                        f"more than {HEADROOM:.0%} of maxmemory; once full, Redis refuses every write "
                        f"(delay() and finished orders fail). Raise maxmemory or shorten the retention "
                        f"(README: Sizing Redis)")
    return "ok", f"maxmemory {_mb(maxmemory)}, used {_mb(used)}; {how}{held}"


def _mb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
