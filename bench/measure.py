"""What the benchmark reads, each cheap and outside the system under test.

CPU from ``/proc`` (a process group's own utime+stime, pool children included,
and the machine's idle share from ``/proc/stat``), Redis's command counts from
``INFO commandstats``, the memory an order leaves behind from ``MEMORY USAGE``,
and the median with its spread over repeated runs.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from mipos_worker.state.connection import text

TICK = os.sysconf("SC_CLK_TCK")

# Commands the benchmark itself sends; never counted as the system's.
BENCH_COMMANDS = {"info", "config", "rename", "memory", "scan", "ttl", "type", "flushall", "ping",
                  "dbsize", "client", "hello", "select", "keys", "exists"}
# kombu's exchange bindings: a few keys per app, whatever the number of orders.
FIXED_KEY_PREFIXES = ("_kombu.",)


def _stat_fields(pid: int | str) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def group_pids(pgids: set[int]) -> list[int]:
    """Every live process in these process groups (a worker and its pool children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(entry.name)[2]) in pgids:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return pids


def process_cpu_s(pid: int) -> float:
    """utime + stime of one process, plus what its waited-for children used."""
    try:
        fields = _stat_fields(pid)
    except (OSError, IndexError):
        return 0.0
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK


def group_cpu_s(pgids: set[int]) -> float:
    return sum(process_cpu_s(pid) for pid in group_pids(pgids))


def self_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def peak_rss_mb(pgids: set[int]) -> float:
    peak = 0.0
    for pid in group_pids(pgids):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return round(peak, 1)


@dataclass(frozen=True)
class MachineCpu:
    """Jiffies of all CPUs: total and idle (idle + iowait)."""

    total: int
    idle: int

    @classmethod
    def read(cls) -> MachineCpu:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return cls(total=sum(fields[:8]), idle=fields[3] + fields[4])

    def idle_share_since(self, before: MachineCpu) -> float:
        total = self.total - before.total
        return round((self.idle - before.idle) / total, 3) if total > 0 else 1.0


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT, the benchmark's own left out."""
    counts: dict[str, int] = {}
    for name, value in client.info("commandstats").items():
        command = name.removeprefix("cmdstat_")
        if command.split("|")[0] not in BENCH_COMMANDS:
            counts[command] = int(value["calls"]) if isinstance(value, dict) else 0
    return counts


def commands_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after if after[name] > before.get(name, 0)}


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def key_kind(key: str) -> str:
    """A key with its order-, task- or queue-specific part left out: ``mipos:done:…``."""
    parts = key.split(":")
    kept = [p for p in parts[:2] if not any(c.isdigit() for c in p) or len(p) < 6]
    return ":".join(kept) + (":…" if len(kept) < len(parts) else "")


Memory = dict[str, tuple[int, int, int]]  # key kind: (keys, bytes, longest TTL in s; -1: none)


def long_lived_memory(client: redis.Redis, held_longer_than_s: float) -> Memory:
    """The keys that will outlive ``held_longer_than_s``, by kind."""
    kinds: Memory = {}
    for raw in client.scan_iter(count=1000):
        key = text(raw, errors="replace")
        if key.startswith(FIXED_KEY_PREFIXES):
            continue
        ttl = client.ttl(raw)
        if ttl == -2 or (0 <= ttl <= held_longer_than_s):
            continue
        size = client.memory_usage(raw, samples=0) or 0
        count, total, longest = kinds.get(key_kind(key), (0, 0, 0))
        kinds[key_kind(key)] = (count + 1, total + int(size), -1 if ttl == -1 or longest == -1
                                else max(longest, ttl))
    return kinds


def memory_between(before: Memory, after: Memory) -> Memory:
    grown = {}
    for kind, (count, size, ttl) in after.items():
        old_count, old_size, _ = before.get(kind, (0, 0, 0))
        if size > old_size:
            grown[kind] = (count - old_count, size - old_size, ttl)
    return grown


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))

    def show(self, digits: int = 2) -> str:
        if self.runs == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}–{self.high:.{digits}f}]"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def as_json(value: Any) -> Any:
    if isinstance(value, Spread):
        return {"median": value.median, "min": value.low, "max": value.high, "runs": value.runs}
    return value
