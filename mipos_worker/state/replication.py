"""Acknowledged means replicated: ``WAIT`` for ``REDIS_MIN_REPLICAS_ACK`` replicas.

Redis replicates asynchronously: a write the master answered can be missing
from the replica Sentinel promotes. ``WAIT n timeout`` blocks until ``n``
replicas have every write *of the connection it is sent on*, so each WAIT here
goes in the same pipeline (one connection, one round trip) as the write it
guards. With ``REDIS_MIN_REPLICAS_ACK=0`` (the default) nothing here runs: no
extra round trip for a single Redis.

The producer's message is published by kombu on kombu's own connection, which
a WAIT on ours would not cover. The replication stream is one ordered log, so
after the publish has been answered a write on our connection (the "fence",
an INCR) comes after it in that log; a replica that has the fence has the
publish, and a WAIT after the fence waits for exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from mipos_worker.settings import RedisSettings
from mipos_worker.state.connection import milliseconds


class NotReplicated(redis.RedisError):
    """The write reached the master, but not the replicas REDIS_MIN_REPLICAS_ACK asks for in time:
    a failover now could lose it. Handled as "Redis is not there" by every caller."""


@dataclass(frozen=True)
class ReplicaAck:
    replicas: int = 0
    timeout_s: float = 1.0

    @classmethod
    def of(cls, settings: RedisSettings) -> ReplicaAck:
        return cls(settings.min_replicas_ack, settings.replica_ack_timeout_s)

    @property
    def enabled(self) -> bool:
        return self.replicas > 0

    def queue_wait(self, pipe: Any) -> None:
        """Add the WAIT to ``pipe``, after the writes it guards; its reply comes last."""
        pipe.execute_command("WAIT", self.replicas, milliseconds(self.timeout_s))

    def check(self, acked: Any, what: str) -> None:
        if int(acked) < self.replicas:
            raise NotReplicated(
                f"{what} reached the master but only {int(acked)} of the {self.replicas} replicas "
                f"REDIS_MIN_REPLICAS_ACK asks for within {self.timeout_s:g}s "
                "(REDIS_REPLICA_ACK_TIMEOUT_S); a failover now could lose it")


NO_ACK = ReplicaAck()


def fence_key(key_prefix: str) -> str:
    return f"{key_prefix}replication:fence"


def confirm_replicated(client: redis.Redis, key_prefix: str, ack: ReplicaAck, what: str) -> None:
    """Everything written to this Redis before now (by any connection) is on ``ack.replicas``
    replicas, or NotReplicated: a fence write on one connection, then WAIT on it."""
    if not ack.enabled:
        return
    pipe = client.pipeline(transaction=False)
    pipe.incr(fence_key(key_prefix))
    ack.queue_wait(pipe)
    _, acked = pipe.execute()
    ack.check(acked, what)
