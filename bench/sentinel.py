"""A Redis master, its replicas and three Sentinels on this machine, for tests and the failover run.

Loopback only, ports from ``free_port``, every file in one directory, every
process ended by its PID. Sentinel's timeouts are small (a node is down after
1 s), so a failover takes a couple of seconds.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from support.processes import free_port, stop_process, wait_for
from mipos_worker.state.connection import text

MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 2000


class RedisNode:
    """One redis-server with a config file (Sentinel rewrites it when it reconfigures the node)."""

    def __init__(self, workdir: Path, name: str, *, replica_of: int | None = None,
                 password: str | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "redis.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}", "save \"\"",
                 "appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction",
                 "repl-diskless-sync no", f"logfile {self.dir / 'redis.log'}"]
        if password:
            lines += [f"requirepass {password}", f"masterauth {password}"]
        if replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        self.config.write_text("\n".join(lines) + "\n")
        self.client = redis.Redis(host="127.0.0.1", port=self.port, password=password,
                                  socket_timeout=5, socket_connect_timeout=2)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._ping, timeout=15, what=f"redis-server {self.name} to answer PING")

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last AOF write."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def role(self) -> str:
        return str(self.client.info("replication").get("role"))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class SentinelNode:
    def __init__(self, workdir: Path, name: str, master_port: int, quorum: int,
                 password: str | None, sentinel_password: str | None) -> None:
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "sentinel.conf"
        lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
                 f"logfile {self.dir / 'sentinel.log'}",
                 f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}",
                 f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                 f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
                 f"sentinel parallel-syncs {MASTER_NAME} 1"]
        if password:
            lines.append(f"sentinel auth-pass {MASTER_NAME} {password}")
        if sentinel_password:
            lines += [f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}"]
        config.write_text("\n".join(lines) + "\n")
        self.log = self.dir / "sentinel.log"
        self.client = redis.Redis(host="127.0.0.1", port=self.port, password=sentinel_password,
                                  socket_timeout=5, socket_connect_timeout=2)
        self.proc = subprocess.Popen(["redis-server", str(config), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self._ping, timeout=15, what=f"Sentinel {name} to answer PING")

    def _ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def master(self) -> tuple[str, int] | None:
        try:
            found: Any = self.client.sentinel_get_master_addr_by_name(MASTER_NAME)
            host, port = found
        except (redis.RedisError, TypeError, ValueError):
            return None
        return text(host), int(port)

    def stop(self) -> None:
        stop_process(self.proc)


class SentinelCluster:
    """A master, ``replicas`` replicas and three Sentinels (quorum 2)."""

    def __init__(self, workdir: Path, *, replicas: int = 1, password: str | None = None,
                 sentinel_password: str | None = None) -> None:
        self.workdir = workdir
        self.password = password
        self.sentinel_password = sentinel_password
        self.nodes: list[RedisNode] = []
        self.sentinels: list[SentinelNode] = []
        try:
            master = RedisNode(workdir, "node-0", password=password)
            self.nodes.append(master)
            for n in range(replicas):
                self.nodes.append(RedisNode(workdir, f"node-{n + 1}", replica_of=master.port,
                                            password=password))
            for n in range(3):
                self.sentinels.append(SentinelNode(workdir, f"sentinel-{n}", master.port, 2,
                                                   password, sentinel_password))
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def url(self, db: int = 0) -> str:
        """REDIS_URL for this deployment (with REDIS_SENTINEL_MASTER=mymaster)."""
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{s.port}" for s in self.sentinels) + f"/{db}"

    def env(self, replicas_ack: int | None = None) -> dict[str, str]:
        env = {"REDIS_URL": self.url(), "REDIS_SENTINEL_MASTER": MASTER_NAME}
        if self.sentinel_password:
            env["REDIS_SENTINEL_PASSWORD"] = self.sentinel_password
        if replicas_ack is not None:
            env["REDIS_MIN_REPLICAS_ACK"] = str(replicas_ack)
        return env

    def master_port(self) -> int | None:
        """The master the Sentinels agree on (a majority), None while they do not."""
        seen = [s.master() for s in self.sentinels]
        for address in seen:
            if address is not None and seen.count(address) >= 2:
                return address[1]
        return None

    def master(self) -> RedisNode:
        port = wait_for(self.master_port, timeout=30, what="the Sentinels to agree on a master")
        return next(node for node in self.nodes if node.port == port)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Every node up, one master with every other node replicating from it (link up),
        every Sentinel knowing the others and the replicas."""
        def healthy() -> bool:
            port = self.master_port()
            if port is None:
                return False
            try:
                master = next(node for node in self.nodes if node.port == port)
                info = master.client.info("replication")
                if info.get("role") != "master":
                    return False
                online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                          and v.get("state") == "online"]
                if len(online) < len(self.nodes) - 1:
                    return False
                for sentinel in self.sentinels:
                    state: dict[str, Any] = sentinel.client.sentinel_master(MASTER_NAME)  # type: ignore[assignment]
                    if int(state.get("num-other-sentinels", 0)) < 2 or \
                            int(state.get("num-slaves", 0)) < len(self.nodes) - 1:
                        return False
                return True
            except (redis.RedisError, StopIteration):
                return False
        wait_for(healthy, timeout=timeout, interval=0.2, what="the Sentinel deployment to be healthy")

    def kill_master(self) -> tuple[RedisNode, float]:
        """SIGKILL the current master; returns it and when (time.time())."""
        node = self.master()
        at = time.time()
        node.kill()
        return node, at

    def wait_promoted(self, old: RedisNode, timeout: float = 30.0) -> float:
        """Until the Sentinels agree on a master other than ``old``; returns when (time.time())."""
        wait_for(lambda: (self.master_port() or old.port) != old.port, timeout=timeout, interval=0.05,
                 what="Sentinel to promote a replica")
        return time.time()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()
