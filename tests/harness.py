"""The tests start the same real processes as the benchmarks: see bench/processes.py."""

from bench.processes import (
    ROOT,
    RedisServer,
    Sandbox,
    WorkerProcess,
    free_port,
    procfile_command,
    read_json_lines,
    stop_process,
    wait_for,
)

__all__ = [
    "ROOT",
    "RedisServer",
    "Sandbox",
    "WorkerProcess",
    "free_port",
    "procfile_command",
    "read_json_lines",
    "stop_process",
    "wait_for",
]
