"""The POS side's settings: Redis, read from the environment and checked.

The worker reads these the same way (``config/`` builds its settings on this
module), so a POS and the workers agree on the broker, the key prefix and the
retention of the task index. The loaders collect every problem before raising,
so one message names every bad setting.

A secret may come from a file, the form Docker and Kubernetes secrets take: the
variable ``<NAME>_FILE`` holds the file's path (``SettingsReader.secret``,
``secret_file``). Here that is ``REDIS_PASSWORD_FILE``: the password for
REDIS_URL, which must then carry none of its own (``read_redis``). Each file is
read once per process, its trailing newline stripped.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import SplitResult, quote, unquote_plus, urlsplit, urlunsplit

from mipos_worker.redis_url import (
    hide_password,
    is_sentinel_url,
    normalized_sentinel_url,
    parse_sentinel_url,
    redis_url_passwords,
    url_pieces,
    url_problem,
)

T = TypeVar("T")

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
# The done record: deduplication and reconciliation need it for the redelivery horizon
# (about 19 minutes by default); a day also covers a POS replaying yesterday's queue.
DEFAULT_LEDGER_RETENTION_S = 24 * 3600
# The attempt history and the order's task index: the running task needs them for the
# same horizon; beyond it only `mipos-worker order` reads them (dead letters keep a copy).
DEFAULT_HISTORY_RETENTION_S = 3600
# How a boolean setting may be written (any case).
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# What url_without_password shows for a URL that does not parse.
URL_NOT_SHOWN = "(a URL that does not parse: not shown)"
# The TLS options REDIS_URL may carry, as redis-py names them; each is applied alike by
# redis-py, kombu and the Sentinel clients (TlsOptions).
TLS_FILE_KEYS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
TLS_KEYS = (*TLS_FILE_KEYS, "ssl_check_hostname", "ssl_cert_reqs")
CERT_REQS = {"required": "required", "cert_required": "required", "optional": "optional",
             "cert_optional": "optional", "none": "none", "cert_none": "none"}
# A secret's file form: MIPOS_PASSWORD_FILE for MIPOS_PASSWORD, and so on.
FILE_SUFFIX = "_FILE"
REDIS_PASSWORD_FILE = "REDIS_PASSWORD_FILE"



class SettingsError(Exception):
    """One or more settings are missing or malformed; ``problems`` lists each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "invalid configuration: " + "; ".join(problems)
            + " (see docs/reference/settings.md)"
        )


@dataclass(frozen=True)
class RedisSettings:
    url: str
    key_prefix: str
    sentinel_master: str | None = None  # REDIS_SENTINEL_MASTER: set exactly when url is sentinel://
    sentinel_password: str | None = None  # REDIS_SENTINEL_PASSWORD: the Sentinels' own
    min_replicas_ack: int = 0  # REDIS_MIN_REPLICAS_ACK: replicas a write that counts must reach
    replica_ack_timeout_s: float = 1.0  # REDIS_REPLICA_ACK_TIMEOUT_S: how long to wait for them

    @property
    def sentinel(self) -> bool:
        return self.sentinel_master is not None

    def secrets(self) -> tuple[str, ...]:
        """The Redis and Sentinel passwords, for the log redaction."""
        found = redis_url_passwords(self.url)
        return tuple(s for s in (*found, self.sentinel_password) if s)


@dataclass(frozen=True)
class RetentionSettings:
    """How long Redis keeps each kind of record of a finished order (config/retention.py)."""

    done_s: float = DEFAULT_LEDGER_RETENTION_S  # MIPOS_LEDGER_RETENTION_S: the done record
    history_s: float = DEFAULT_HISTORY_RETENTION_S  # MIPOS_HISTORY_RETENTION_S: attempts, task index


def parse_boolean(text: str) -> bool:
    """One of TRUE_WORDS or FALSE_WORDS, in any case and with spaces around; ValueError otherwise."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean")


class SecretFileError(ValueError):
    """Why a secret's file cannot be used; the message never holds any of its content."""


_secret_files: dict[str, str] = {}  # path -> content: each file read once per process


def read_secret_file(path: str) -> str:
    """The secret a file holds: its text without the trailing newline, read at the first call for
    ``path`` and kept (a forked child keeps it too), so it is read once, at start. A file that
    cannot be read, is not UTF-8, is empty or holds more than one line is refused."""
    if path in _secret_files:
        return _secret_files[path]
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecretFileError(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise SecretFileError("is not UTF-8 text") from None  # the error would quote a byte
    if not text.strip():
        raise SecretFileError("is empty")
    if "\n" in text or "\r" in text:
        raise SecretFileError("holds more than one line: a secret's file holds the secret alone")
    _secret_files[path] = text
    return text


class SettingsReader:
    """Reads typed values from an environment, remembering every problem."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []
        self.seen: dict[str, str | None] = {}  # every name read, and its value then
        self.from_files: set[str] = set()  # the secrets read from their file form

    def raw(self, name: str, default: str | None) -> str | None:
        value = self.env.get(name)
        self.seen[name] = value
        if value is None or value.strip() == "":
            return default
        return value.strip()

    def required(self, name: str) -> str:
        value = self.raw(name, None)
        if value is None:
            self.problems.append(f"{name} is required but not set")
            return ""
        return value

    def secret_file(self, name: str) -> str | None:
        """The secret in the file the variable ``name`` names (REDIS_PASSWORD_FILE, ...); None when
        ``name`` is unset or the file cannot be used (a problem naming ``name``, never the content)."""
        path = self.raw(name, None)
        if path is None:
            return None
        try:
            return read_secret_file(path)
        except SecretFileError as exc:
            self.problems.append(f"{name}={path!r} {exc}")
            return None

    def secret(self, name: str, *, required: bool = False) -> str | None:
        """``name``'s value, or the secret in the file ``<name>_FILE`` names; both set is a problem
        naming both. None when neither gives one (a problem too when ``required``)."""
        file_name = name + FILE_SUFFIX
        value = self.raw(name, None)
        if self.raw(file_name, None) is None:
            if value is None and required:
                self.problems.append(f"{name} is required but not set (or set {file_name} to a file holding it)")
            return value
        if value is not None:
            self.problems.append(f"{name} and {file_name} are both set: set only one")
            return None
        found = self.secret_file(file_name)
        if found is not None:
            self.from_files.add(name)
        return found

    def parsed(self, name: str, default: str, parse: Callable[[str], T], expected: str) -> T | None:
        text = self.raw(name, default)
        assert text is not None
        try:
            return parse(text)
        except ValueError:
            self.problems.append(f"{name}={text!r} is not {expected}")
            return None

    def positive_float(self, name: str, default: str) -> float:
        value = self.parsed(name, default, float, "a number")
        if value is None:
            return float(default)
        if not math.isfinite(value) or value <= 0:
            self.problems.append(f"{name}={value!r} must be a number greater than 0")
        return value

    def whole_number(self, name: str, default: str) -> int:
        """0 or more."""
        value = self.parsed(name, default, int, "a whole number")
        if value is None:
            return int(default)
        if value < 0:
            self.problems.append(f"{name}={value!r} must be 0 or more")
        return value

    def positive_int(self, name: str, default: str) -> int:
        value = self.parsed(name, default, int, "a whole number")
        if value is None:
            return int(default)
        if value < 1:
            self.problems.append(f"{name}={value!r} must be at least 1")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...], *, upper: bool) -> str:
        text = self.raw(name, default) or default
        value = text.upper() if upper else text.lower()
        if value not in choices:
            self.problems.append(f"{name}={text!r} must be one of {', '.join(choices)}")
            return default
        return value

    def boolean(self, name: str, default: str) -> bool:
        text = (self.raw(name, default) or default).lower()
        try:
            return parse_boolean(text)
        except ValueError:
            self.problems.append(f"{name}={text!r} must be true or false")
            return default == "true"

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        """The URL as written (for http, without a trailing '/'); its problems recorded."""
        text = self.raw(name, default) or default
        self.check_url(name, text, schemes)
        return text.rstrip("/") if "http" in schemes else text

    def check_url(self, name: str, text: str, schemes: tuple[str, ...]) -> bool:
        """Whether ``text`` is a URL of one of ``schemes`` with a host and a numeric port;
        else a problem is recorded. A URL that does not parse is described, never quoted."""
        problem = url_problem(text)
        if problem is not None:
            self.problems.append(f"{name} is not a valid URL: {problem}")
            return False
        parts = urlsplit(text)
        if parts.scheme not in schemes or not parts.hostname:
            self.problems.append(
                f"{name}={url_without_password(text)!r} must be a URL starting with "
                + " or ".join(f"{s}://" for s in schemes)
            )
            return False
        if not _port_is_a_number(parts):
            self.problems.append(f"{name}={url_without_password(text)!r} has a port that is not a number")
            return False
        return True

    def check(self) -> None:
        if self.problems:
            raise SettingsError(self.problems)


def url_without_password(url: str) -> str:
    """The URL as it may be shown: every password (of each ``;``-joined Sentinel URL too)
    replaced with ``***``. A URL that does not parse is not shown at all: where its
    password ends cannot be told (url_problem)."""
    pieces = url_pieces(url)
    if any(url_problem(piece) is not None for piece in pieces):
        return URL_NOT_SHOWN
    return ";".join(urlunsplit(hide_password(urlsplit(piece))) for piece in pieces)


def _port_is_a_number(parts: SplitResult) -> bool:
    """Whether the URL's port, if it has one, is a number (urlsplit raises on reading it otherwise)."""
    try:
        port = parts.port
    except ValueError:
        return False
    return port is None or port >= 0


@dataclass(frozen=True)
class TlsOptions:
    """REDIS_URL's TLS options, read once (read_tls_query) and applied alike by every client:
    redis-py's from ``redis_kwargs``, kombu's from the URL the settings spell them out in
    (``query_items``: one of each, in values kombu reads as redis-py does)."""

    cert_reqs: str = "required"  # required, optional (for a client the same check) or none
    check_hostname: bool | None = None  # None: not written, redis-py's default for every client
    files: tuple[tuple[str, str], ...] = ()  # (one of TLS_FILE_KEYS, its path)

    @property
    def ca_certs(self) -> str | None:
        return dict(self.files).get("ssl_ca_certs")

    @property
    def hostname_checked(self) -> bool:
        """Whether the certificate must name the host: never without a certificate check."""
        if self.cert_reqs == "none":
            return False
        return self.check_hostname if self.check_hostname is not None else redis_py_checks_hostname()

    def redis_kwargs(self) -> dict[str, Any]:
        """redis-py's keyword arguments (SSLConnection, SentinelManagedSSLConnection, a
        Sentinel client with ``ssl=True``)."""
        kwargs: dict[str, Any] = {"ssl_cert_reqs": self.cert_reqs, **dict(self.files)}
        if self.check_hostname is not None:
            kwargs["ssl_check_hostname"] = self.check_hostname
        return kwargs

    def query_items(self) -> list[tuple[str, str]]:
        items = list(self.files)
        if self.check_hostname is not None:
            items.append(("ssl_check_hostname", "true" if self.check_hostname else "false"))
        items.append(("ssl_cert_reqs", self.cert_reqs))
        return items


@dataclass(frozen=True)
class TlsQuery:
    """A URL's query in two: its TLS options, read, and its other items as written."""

    options: TlsOptions
    others: tuple[str, ...]
    problems: tuple[str, ...]  # why clients would read the options differently; no value quoted
    given: bool  # some ssl_ option is written

    def canonical(self) -> str:
        """The query with each TLS option spelled out once, decoded keys, canonical values."""
        spelled = (f"{key}={quote(value, safe='/')}" for key, value in self.options.query_items())
        return "&".join((*self.others, *spelled))

    def without_tls(self) -> str:
        return "&".join(self.others)


@functools.cache
def redis_py_checks_hostname() -> bool:
    """Whether redis-py checks the host name when ``ssl_check_hostname`` is not given (it
    does since redis-py 6). kombu passes no value then either: both get this default."""
    from redis.connection import SSLConnection

    default = inspect.signature(SSLConnection.__init__).parameters["ssl_check_hostname"].default
    return default is True


def read_tls_query(query: str) -> TlsQuery:
    """The TLS options of a URL's query, read the way every client here applies them.

    Keys and values are percent-decoded, as redis-py (``parse_qs``) and kombu
    (``parse_qsl``) decode them, so ``ssl%5Fcert%5Freqs=none`` is ``ssl_cert_reqs=none``.
    What the two would read differently is a problem: an option given twice with
    different values (redis-py takes the first, kombu the last), an ``ssl_`` option
    not every client applies, a value neither reads alike."""
    values: dict[str, str] = {}
    others: list[str] = []
    problems: list[str] = []
    given = False
    for item in (i for i in query.split("&") if i):
        raw_key, _, raw_value = item.partition("=")
        key, value = unquote_plus(raw_key).strip(), unquote_plus(raw_value).strip()
        if not key.startswith("ssl_"):
            others.append(item)
            continue
        given = True
        if key not in TLS_KEYS:
            problems.append(f"REDIS_URL has {key!r}, which not every client would apply: "
                            f"the TLS options are {', '.join(TLS_KEYS)}")
        elif key in values and values[key] != value and value:
            problems.append(f"REDIS_URL gives {key} twice, with different values (redis-py would "
                            "use the first, kombu the last): write it once")
        elif value:  # both clients ignore an empty one
            values[key] = value
    options = _tls_options(values, problems)
    return TlsQuery(options, tuple(others), tuple(problems), given)


def _tls_options(values: Mapping[str, str], problems: list[str]) -> TlsOptions:
    cert_reqs = CERT_REQS.get(values.get("ssl_cert_reqs", "required").lower())
    if cert_reqs is None:
        problems.append("REDIS_URL has an ssl_cert_reqs that is not required, optional or none")
    check_hostname: bool | None = None
    if "ssl_check_hostname" in values:
        try:
            check_hostname = parse_boolean(values["ssl_check_hostname"])
        except ValueError:
            problems.append("REDIS_URL has an ssl_check_hostname that is not true or false")
    files = tuple((key, values[key]) for key in TLS_FILE_KEYS if key in values)
    return TlsOptions(cert_reqs or "required", check_hostname, files)


def tls_query_of(url: str) -> TlsQuery | None:
    """The TLS reading of REDIS_URL, of either shape; None when it asks for no TLS."""
    if is_sentinel_url(url):
        target, _ = parse_sentinel_url(url)
        return read_tls_query(target.query) if target is not None and target.tls else None
    parts = urlsplit(url)
    return read_tls_query(parts.query) if parts.scheme == "rediss" else None


def tls_options_of(url: str) -> TlsOptions | None:
    """REDIS_URL's TLS options (None: no TLS); ValueError when clients would read them differently."""
    tls = tls_query_of(url)
    if tls is None:
        return None
    if tls.problems:
        raise ValueError("; ".join(tls.problems))
    return tls.options


def url_without_tls_options(url: str) -> str:
    """A rediss:// URL without its ``ssl_`` options, for a client given them as arguments."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=read_tls_query(parts.query).without_tls()))


def ssl_cert_reqs(url: str) -> str | None:
    """The certificate check REDIS_URL asks for: required, optional or none
    (None: no TLS, or options the clients would read differently)."""
    try:
        options = tls_options_of(url)
    except ValueError:
        return None
    return options.cert_reqs if options is not None else None


def verified_redis_url(url: str) -> str:
    """A rediss:// URL with its TLS options spelled out (TlsQuery.canonical), so that every client verifies alike.

    kombu connects to ``rediss://`` without ``ssl_cert_reqs`` with no certificate
    check at all, while redis-py requires one; kombu takes ``CERT_NONE`` and
    redis-py only ``none``; kombu turns the host name check off only for
    ``false``, redis-py for ``no`` and ``0`` too. Writing each option once, with
    decoded keys and ``ssl_cert_reqs=required|optional|none``,
    ``ssl_check_hostname=true|false``, makes the broker, the shared-state client,
    the POS side, Flower and the CLI agree: verified unless ``none`` is asked for.
    A CA file comes from ``ssl_ca_certs`` in the URL, else from the system store.
    Other URLs are returned as they are.
    """
    if is_sentinel_url(url):
        return url
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return url
    return urlunsplit(parts._replace(query=read_tls_query(parts.query).canonical()))


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_redis(reader: SettingsReader) -> RedisSettings:
    text = reader.raw("REDIS_URL", DEFAULT_REDIS_URL) or DEFAULT_REDIS_URL
    master = reader.raw("REDIS_SENTINEL_MASTER", None)
    sentinel_password = reader.raw("REDIS_SENTINEL_PASSWORD", None)
    ack = reader.whole_number("REDIS_MIN_REPLICAS_ACK", "0")
    ack_timeout = reader.positive_float("REDIS_REPLICA_ACK_TIMEOUT_S", "1")
    password = reader.secret_file("REDIS_PASSWORD_FILE")
    if is_sentinel_url(text):
        url = _read_sentinel_url(reader, text, master, password)
    else:
        url = _read_single_url(reader, text, master, sentinel_password, password)
    return RedisSettings(
        url=url,
        key_prefix=reader.raw("MIPOS_REDIS_PREFIX", "mipos:") or "mipos:",
        sentinel_master=master if is_sentinel_url(text) else None,
        sentinel_password=sentinel_password,
        min_replicas_ack=ack,
        replica_ack_timeout_s=ack_timeout,
    )


# Why REDIS_PASSWORD_FILE and a password in REDIS_URL are refused together: which one counts
# would be a guess, and a stale one would be sent without a word.
TWO_REDIS_PASSWORDS = (f"REDIS_URL has a password and {REDIS_PASSWORD_FILE} is set: give the "
                       f"password in one place only (remove it from REDIS_URL to use the file)")


def _read_sentinel_url(reader: SettingsReader, text: str, master: str | None,
                       password: str | None = None) -> str:
    """The Sentinel URLs, each spelled out in full (normalized_sentinel_url); ``password``
    (REDIS_PASSWORD_FILE's) is the master's."""
    target, problems = parse_sentinel_url(text)
    reader.problems.extend(problems)
    if master is None:
        reader.problems.append(
            "REDIS_URL is a Sentinel URL (sentinel://) but REDIS_SENTINEL_MASTER is not set: "
            "name the master the Sentinels monitor (e.g. REDIS_SENTINEL_MASTER=mymaster)")
    if target is None:
        return text
    if password is not None:
        if target.password is not None:
            reader.problems.append(TWO_REDIS_PASSWORDS)
        target = replace(target, password=password)
    if target.tls:
        # TLS to the Sentinels and to Redis: spelled out, as for rediss:// URLs.
        tls = read_tls_query(target.query)
        reader.problems.extend(tls.problems)
        target = replace(target, query=tls.canonical())
    return normalized_sentinel_url(target)


def _read_single_url(reader: SettingsReader, text: str, master: str | None,
                     sentinel_password: str | None, password: str | None = None) -> str:
    """One redis:// or rediss:// URL, its TLS options spelled out (verified_redis_url), with
    ``password`` (REDIS_PASSWORD_FILE's) written into it."""
    for name, value in (("REDIS_SENTINEL_MASTER", master),
                        ("REDIS_SENTINEL_PASSWORD", sentinel_password)):
        if value is not None:
            reader.problems.append(
                f"{name} is set but REDIS_URL is not a Sentinel URL: use "
                "REDIS_URL=sentinel://host1:26379;sentinel://host2:26379/0, or unset " + name)
    if not reader.check_url("REDIS_URL", text, ("redis", "rediss")):
        return text
    if ";" in text:
        # kombu would split it there into several URLs, the password too.
        reader.problems.append(
            "REDIS_URL holds a ';': only Sentinel URLs (sentinel://) may be joined with ';', "
            "and a ';' in a password must be percent-encoded (%3B)")
        return text
    parts = urlsplit(text)
    tls = read_tls_query(parts.query)
    if parts.scheme == "redis" and tls.given:
        # kombu would connect with TLS, redis-py refuse the options.
        reader.problems.append("REDIS_URL has TLS options (ssl_...) but starts with redis://: "
                               "use rediss:// for TLS, or remove them")
        return text
    reader.problems.extend(tls.problems)
    url = verified_redis_url(text)
    if password is None:
        return url
    if parts.password:
        reader.problems.append(TWO_REDIS_PASSWORDS)
        return url
    return with_password(url, password)


def with_password(url: str, password: str) -> str:
    """``url`` (one without a password) with ``password`` in it, percent-encoded, so that every
    client (redis-py, kombu) decodes it once to what the file holds; a user name is kept."""
    parts = urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


_loaded: dict[Callable[..., Any], tuple[dict[str, str | None], Any]] = {}


def load(read: Callable[[SettingsReader], T], env: Mapping[str, str] | None) -> T:
    """Read one group of settings, raising once with every problem found.

    From the process's environment, the last result is kept while every variable it
    read is unchanged: ``delay()`` reads the Redis settings at every call, and parsing
    them cost more than the comparison."""
    if env is None and (kept := _loaded.get(read)) is not None:
        seen, settings = kept
        if all(os.environ.get(name) == value for name, value in seen.items()):
            return cast(T, settings)
    reader = SettingsReader(os.environ if env is None else env)
    settings = read(reader)
    reader.check()
    if env is None:
        _loaded[read] = (reader.seen, settings)
    return settings


def read_retention(reader: SettingsReader) -> RetentionSettings:
    return RetentionSettings(
        done_s=reader.positive_float("MIPOS_LEDGER_RETENTION_S", str(DEFAULT_LEDGER_RETENTION_S)),
        history_s=reader.positive_float("MIPOS_HISTORY_RETENTION_S", str(DEFAULT_HISTORY_RETENTION_S)),
    )


def load_retention_settings(env: Mapping[str, str] | None = None) -> RetentionSettings:
    """The retention settings alone (the POS side's registration keeps the task index as long);
    their floor is checked with the worker's settings (``load_worker_settings``)."""
    return load(read_retention, env)


def load_producer_settings(env: Mapping[str, str] | None = None) -> RedisSettings:
    """What the POS side needs to enqueue: Redis only, no mipos credentials."""
    return load(read_redis, env)
