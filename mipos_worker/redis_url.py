"""REDIS_URL in its two shapes: one Redis (``redis://``, ``rediss://``) or Redis Sentinel.

A Sentinel deployment is written the way kombu reads it: one ``sentinel://``
URL per Sentinel, joined by ``;``, e.g.
``sentinel://:PASSWORD@s1:26379;sentinel://:PASSWORD@s2:26379;sentinel://:PASSWORD@s3:26379/0``.
The password in the URL is the Redis master's (and its replicas'); the
Sentinels' own password is ``REDIS_SENTINEL_PASSWORD``. The database number and
a TLS query (``?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.crt``) may be
written once, on any of the URLs: kombu reads only the first URL's, so
``normalized_sentinel_url`` copies them onto every one.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """Where the Sentinels are, and how to talk to the master they name."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None  # the Redis master's (and replicas'), not the Sentinels'
    query: str  # e.g. "ssl_cert_reqs=required&ssl_ca_certs=/path/ca.crt"; "" for plain TCP

    @property
    def tls(self) -> bool:
        return any(k.startswith("ssl_") for k, _ in query_items(self.query))


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def query_items(query: str) -> list[tuple[str, str]]:
    return [(k, v) for k, _, v in (item.partition("=") for item in query.split("&") if item)]


def parse_sentinel_url(url: str) -> tuple[SentinelTarget | None, list[str]]:
    """The target, or None and what is wrong (the password never appears in a problem)."""
    problems: list[str] = []
    sentinels: list[tuple[str, int]] = []
    db: int | None = None
    username: str | None = None
    password: str | None = None
    query = ""
    for n, part in enumerate((p.strip() for p in url.split(";")), start=1):
        if not part:
            continue
        parts = urlsplit(part)
        if parts.scheme != SENTINEL_SCHEME:
            problems.append(f"part {n} of a Sentinel REDIS_URL does not start with sentinel://")
            continue
        try:
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            problems.append(f"part {n} of REDIS_URL has a port that is not a number")
            continue
        if not parts.hostname:
            problems.append(f"part {n} of REDIS_URL names no host")
            continue
        sentinels.append((parts.hostname, port))
        username = username or (unquote(parts.username) if parts.username else None)
        password = password or (unquote(parts.password) if parts.password else None)
        query = query or parts.query
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                problems.append(f"REDIS_URL's database {path!r} is not a number")
            elif db is not None and int(path) != db:
                problems.append("REDIS_URL names two different databases")
            else:
                db = int(path)
    if not sentinels and not problems:
        problems.append("REDIS_URL names no Sentinel")
    if problems:
        return None, problems
    return SentinelTarget(tuple(sentinels), db or 0, username, password, query), []


def normalized_sentinel_url(target: SentinelTarget) -> str:
    """Every Sentinel's URL with the credentials, the database and the query: kombu
    takes these from the first URL only, and moves to the next when one is down."""
    auth = ""
    if target.password is not None or target.username is not None:
        auth = f"{target.username or ''}:{target.password or ''}@"
    suffix = f"/{target.db}" + (f"?{target.query}" if target.query else "")
    return ";".join(f"{SENTINEL_SCHEME}://{auth}{_host(h)}:{p}{suffix}" for h, p in target.sentinels)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def redis_url_passwords(url: str) -> list[str]:
    """Every password written in REDIS_URL (one per Sentinel URL at most)."""
    found = []
    for part in url.split(";"):
        try:
            password = urlsplit(part.strip()).password
        except ValueError:
            continue
        if password:
            found.append(password)
            found.append(unquote(password))
    return list(dict.fromkeys(found))
