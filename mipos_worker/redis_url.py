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
from urllib.parse import SplitResult, quote, unquote, unquote_plus, urlsplit

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
# Why a URL whose host part ends early does not parse: said without quoting any of it.
PASSWORD_BREAKS_URL = ("the part before '@' may hold a password with '/', '#' or '?'; "
                       "percent-encode them (%2F, %23, %3F)")
NOT_A_URL = ("it does not parse as a URL (a '[' or ']' outside an IPv6 address?); "
             "percent-encode such characters in a password")


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
        """Some ``ssl_`` option is written (its key percent-encoded or not, as clients decode it)."""
        return any(unquote_plus(k).strip().startswith("ssl_") for k, _ in query_items(self.query))


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def query_items(query: str) -> list[tuple[str, str]]:
    return [(k, v) for k, _, v in (item.partition("=") for item in query.split("&") if item)]


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be read as one URL without guessing; None when it can.

    ``urlsplit`` ends the host part at the first ``/``, ``#`` or ``?``: with one of
    them unencoded in a password, the rest of the password and the host land in the
    path, query or fragment, ``urlsplit(url).password`` is not the password, and the
    URL must be neither used nor shown. The answer quotes nothing of the URL.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return NOT_A_URL
    if "@" in parts.path + parts.query + parts.fragment:
        return PASSWORD_BREAKS_URL
    return None


def url_pieces(url: str) -> list[str]:
    """The URLs REDIS_URL holds: one per Sentinel (joined by ';'), else the one URL (a ';' in
    a redis:// URL belongs to it)."""
    if is_sentinel_url(url):
        return [piece.strip() for piece in url.split(";") if piece.strip()]
    return [url.strip()]


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
        problem = url_problem(part)
        if problem is not None:
            problems.append(f"part {n} of REDIS_URL is not a valid URL: {problem} "
                            "(and a ';' in a password splits the Sentinel URLs: write it %3B)")
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
    takes these from the first URL only, and moves to the next when one is down.

    The target holds the credentials decoded: they are percent-encoded again here,
    every character but letters, digits and ``_.-~``, so that a ``/``, ``;``, ``#`` or
    ``%`` in them reaches kombu, redis-py and parse_sentinel_url as written, decoded
    once by whoever reads the URL."""
    auth = ""
    if target.password is not None or target.username is not None:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    suffix = f"/{target.db}" + (f"?{target.query}" if target.query else "")
    return ";".join(f"{SENTINEL_SCHEME}://{auth}{_host(h)}:{p}{suffix}" for h, p in target.sentinels)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def redis_url_passwords(url: str) -> list[str]:
    """Every password written in REDIS_URL (one per Sentinel URL at most), as written and
    decoded, for the log redaction; also from a URL that does not parse (then guessed
    generously: whatever stands between the first ':' after '://' and the last '@')."""
    found = []
    for piece in url_pieces(url):
        password = _password_as_written(piece)
        if password:
            found.append(password)
            found.append(unquote(password))
    return list(dict.fromkeys(found))


def _password_as_written(url: str) -> str | None:
    if url_problem(url) is None:
        return urlsplit(url).password
    userinfo = url.partition("://")[2].rpartition("@")[0]
    return userinfo.partition(":")[2] or None


def hide_password(parts: SplitResult) -> SplitResult:
    """``parts`` with the password (if any) replaced by ``***``."""
    if parts.password is None:
        return parts
    userinfo, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}")
