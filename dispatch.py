"""dispatch: a job farm for a LAN.

One box runs ``python dispatch.py``; every desktop that should help runs a copy of
``agent.py``. People upload a project zip, submit a shell command, and watch it run
on whichever desktop is free, with live output.

Run:    python dispatch.py [--host HOST] [--port PORT] [--data-dir DIR]       (Python 3.11+)
        python dispatch.py --database-url postgresql://...   (several servers on one database)
Users:  python dispatch.py user add EMAIL --role admin|user [--password-stdin] [--create]
        python dispatch.py user set-password EMAIL [--password-stdin]
Backup: python dispatch.py backup FILE      (with PostgreSQL: pg_dump, which holds every file too)
Embed:  web.run_app(create_app(Config.from_env()))

Sections (``grep -n '^# ===' dispatch.py``), in dependency order: calls go down the file,
HTTP -> domain -> storage. Constants, errors, configuration, rate limiter, storage (the engines:
SQLite on the loop or PostgreSQL through asyncpg, running the same statements; every SQL statement,
one class per topic, combined as ``Store``), domain (users, input rules, how an attempt ends, the
job life cycle in ``Jobs``, the contents of files, blobs and artifacts), events (with ``Cluster``:
what several servers on one database pass each other), HTTP (app keys, middleware, handlers named
``*_view``), app, CLI.

Endpoints (the route table in ``create_app`` is the index):
  POST /api/auth/login, /api/auth/logout, /api/auth/refresh; GET /api/auth/me
  GET/POST /api/auth/tokens, DELETE /api/auth/tokens/{id}                  (personal API tokens)
  GET/POST /api/users, DELETE /api/users/{id}                               (admin)
  POST /api/workers/register, /api/workers/heartbeat
  GET /api/workers/list, /api/workers/{id}; DELETE /api/workers/{id}
  POST /api/workers/approve, /pause, /resume, /api/workers/registration-token  (admin)
  POST /api/jobs/submit (one job, or a batch: {"jobs": [...]}), /api/jobs/cancel
  GET /api/jobs/status, /api/jobs/list, /api/jobs/stream (WebSocket), /api/jobs/follow (server-sent events)
  GET /api/jobs/artifacts (owner, admin); POST /api/jobs/artifacts                  (workers)
  POST /api/blobs/missing, /api/blobs/batch; PUT /api/blobs/{sha256}; POST /api/blobs/fetch (workers)
  GET /api/jobs/get-job; POST /api/jobs/stream-output, /api/jobs/submit-result    (workers)
  POST /api/files/upload; GET /api/files/download/{fileId}, /uploads/{fileId}/{name}
  GET / (the web page), /api/health, /metrics
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Clock", "Config", "DispatchError", "JobState", "Jobs", "Store", "create_app", "decide_outcome", "main"]

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import errno
import getpass
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import mimetypes
import os
import re
import secrets
import socket
import sqlite3
import struct
import sys
import time
import urllib.parse
import uuid
import weakref
from enum import Enum
from pathlib import Path
from typing import Any, Awaitable, Callable, NamedTuple, Optional

import aiohttp_cors
import aiosqlite
import bcrypt
import jwt
from aiohttp import WSCloseCode, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("dispatch")
access_log = logging.getLogger("dispatch.access")
server_log = logging.getLogger("dispatch.server")  # what aiohttp says about connections (create_app)


# === Constants ===


SCHEMA_PATH = Path(__file__).with_name("schema.sql")
POSTGRES_SCHEMA_PATH = Path(__file__).with_name("schema-postgresql.sql")
POSTGRES_POOL_SIZE = 10
ADVISORY_LOCK_SCHEMA = 7_401_001  # held while one server creates or upgrades the schema
ADVISORY_LOCK_SWEEPS = 7_401_002  # held by the one server that runs the sweeps
EVENTS_CHANNEL = "dispatch_events"
CLAIM_TRIES = 4  # with several servers: a claim that met only jobs another server was claiming looks again
CLUSTER_OUTBOX_LIMIT = 10_000  # events kept for the other servers while the database is down
EVENTS_KEPT = dt.timedelta(minutes=1)  # in the events table: a server that was away longer reads from now
PAGE_PATH = Path(__file__).with_name("dispatch.html")
# The page needs nothing from elsewhere, so it may load nothing from elsewhere.
PAGE_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                        "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
                        "form-action 'self'")
SCHEMA_VERSION = 7

TOKEN_LIFETIME = dt.timedelta(hours=24)
REFRESH_GRACE = dt.timedelta(days=7)  # an expired token may still be refreshed this long
VERIFIED_TOKENS_KEPT = 4096  # JWTs whose signature was checked, remembered (then forgotten all at once)
API_TOKEN_PREFIX = "dsp_"  # personal API tokens: told apart from JWTs and registration tokens at a glance
API_TOKEN_DEFAULT_DAYS = 90
API_TOKEN_MAX_DAYS = 3650
MAX_PASSWORD_BYTES = 72  # bcrypt reads no more, and refuses more
MAX_FILENAME_BYTES = 200  # an upload's name on disk, under the 255 bytes filesystems allow
MAX_LONG_POLL_SECONDS = 60
MAX_JOB_TIMEOUT = 7 * 24 * 3600
MAX_COMMAND_BYTES = 64 * 1024
MAX_TAGS = 32
MAX_TAG_LENGTH = 64
MAX_ATTEMPTS_LIMIT = 10
MAX_RETRIES = 10
MAX_BATCH_JOBS = 1000  # items of one batch submit
MAX_PARENTS = 1000  # ids in one job's `after`
AHEAD_COUNT_LIMIT = 1000  # "N jobs ahead" counts no further, so the estimate never walks a long queue
EXIT_TIMEOUT = 124  # a timed-out attempt's exit code, as coreutils `timeout` (the agent uses it too)
MAX_REQUEST_BODY = 32 * 1024 * 1024  # JSON bodies: output chunks and results
WS_BACKLOG_BYTES = 4 * 1024 * 1024  # unsent events a WebSocket client may fall behind by before it is closed
SWEEP_INTERVAL = 60.0
CREDENTIAL_PATHS = ("/api/", "/uploads/")  # other paths (the page, /metrics) take no user or worker credentials
LOGIN_PATH, REFRESH_PATH = "/api/auth/login", "/api/auth/refresh"
# Login needs no token (a stale cookie must not stop it); refresh reads its possibly expired one itself.
SELF_AUTHENTICATING = frozenset({LOGIN_PATH, REFRESH_PATH})
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FILE_ID_PATTERN = re.compile(r"file-[0-9a-f]{32}")
UPLOAD_ROUTE = "/uploads/{file_id}/{name}"  # the one place an upload's URL is spelled
ARTIFACTS_PATH = "/api/jobs/artifacts"  # a job's artifacts zip: POST by its worker, GET by its owner
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # an agent process's id for its get-job polls
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")  # a blob's name: the lowercase hex SHA-256 of its content
MAX_TREE_ENTRIES = 100_000  # files of one inputTree (the agent's zip entry limit)
MAX_TREE_PATH_BYTES = 4096
MAX_MISSING_QUERY = 100_000  # hashes one POST /api/blobs/missing may ask about
MAX_FETCH_BLOBS = 10_000  # blobs one POST /api/blobs/fetch may ask for
MAX_ARTIFACT_PATTERNS = 100
BLOB_TOUCH_SECONDS = 86400  # a blob's last use is noted again only once it is this old (TTLs are in days)
CONTENT_CHUNK_BYTES = 1024 * 1024  # a row of file_chunks (PostgreSQL): what a content costs the server's memory
PARTIAL_CONTENT_AGE = dt.timedelta(days=1)  # PostgreSQL: a partial content this old has lost its server
ZIP_TAIL_BYTES = 22 + 0xFFFF + 20 + 56  # a zip's end record and comment, after a ZIP64 locator and end record
ARTIFACTS_WHEN = ("on_success", "on_failure", "always")
MAX_ENV_VARS = 100
MAX_ENV_BYTES = 32 * 1024  # names and values of a job's env together
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SSE_KEEPALIVE_SECONDS = 15.0  # a comment line this often keeps a quiet follow open through proxies


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WorkerState(str, Enum):
    """Whether a worker may take jobs (beside its ``status``: online, offline, error)."""

    AVAILABLE = "available"
    PENDING = "pending"  # registered, waiting for an admin's approval
    PAUSED = "paused"  # by an admin, or (shown only: see worker_state) by its agent for its owner


PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2}
FINISHED_STATES = frozenset({JobState.COMPLETED.value, JobState.FAILED.value, JobState.CANCELLED.value})
STREAMS = ("stdout", "stderr")


class Resource(NamedTuple):
    """Something a job asks of the worker that runs it, and a worker offers the farm."""

    field: str  # its API name, on submit and in worker JSON
    column: str  # in jobs and in workers
    default: int  # a job's when it says nothing
    minimum: int
    maximum: int
    unit: str  # "needs 8 cpus", "needs 4096 MB of memory"


RESOURCES = (
    Resource("cpus", "cpus", 1, 1, 4096, "cpus"),
    Resource("memoryMb", "memory_mb", 0, 0, 2**30, "MB of memory"),
    Resource("gpus", "gpus", 0, 0, 256, "gpus"),
)

# Sort keys of the list endpoints: the whitelist and its SQL column in one table.
JOB_SORT_COLUMNS = {
    "createdAt": "created_at",
    "startedAt": "started_at",
    "completedAt": "completed_at",
    "priority": "priority_rank",
    "status": "status",
}
WORKER_SORT_COLUMNS = {
    "workerId": "id",
    "hostname": "hostname",
    "registeredAt": "registered_at",
    "lastHeartbeat": "last_heartbeat",
}


class Clock:
    """The time, injectable: tests move a job's life forward without sleeping."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def iso(self, delta_seconds: float = 0.0) -> str:
        """Now (plus ``delta_seconds``) in the API's timestamp format."""
        return _iso(self.now() + dt.timedelta(seconds=delta_seconds))


def _iso(moment: dt.datetime) -> str:
    """ISO 8601 UTC with milliseconds, the one timestamp format of the API and the database."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# === Errors ===



class DispatchError(Exception):
    """An error with its HTTP status, rendered as the contract's error JSON by one middleware."""

    status = 500
    error = "Server Error"
    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None,
                 headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.details = details
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict:
        body = {"error": self.error, "message": self.message, "code": self.code}
        if self.details:
            body["details"] = self.details
        return {**body, **self.extra}


class InvalidRequest(DispatchError):
    status, error, code = 400, "Invalid request", "VALIDATION_ERROR"


class InvalidFile(DispatchError):
    status, error, code = 400, "Invalid file", "INVALID_FILE"


class Unauthorized(DispatchError):
    status, error, code = 401, "Unauthorized", "UNAUTHORIZED"


class InvalidCredentials(DispatchError):
    status, error, code = 401, "Invalid credentials", "INVALID_CREDENTIALS"


class Forbidden(DispatchError):
    status, error, code = 403, "Forbidden", "FORBIDDEN"


class NotFound(DispatchError):
    status, error, code = 404, "Not found", "NOT_FOUND"


class MethodNotAllowed(DispatchError):
    status, error, code = 405, "Method not allowed", "METHOD_NOT_ALLOWED"


class Conflict(DispatchError):
    status, error, code = 409, "Conflict", "CONFLICT"


class PayloadTooLarge(DispatchError):
    status, error, code = 413, "Payload too large", "PAYLOAD_TOO_LARGE"


class RequestTimeout(DispatchError):
    status, error, code = 408, "Request Timeout", "REQUEST_TIMEOUT"


class RateLimited(DispatchError):
    status, error, code = 429, "Too Many Requests", "RATE_LIMITED"


class ServiceUnavailable(DispatchError):
    status, error, code = 503, "Service Unavailable", "DATABASE_UNAVAILABLE"


def _invalid_field(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, details={"field": field})


def _invalid_item(index: Optional[int], field: str, message: str) -> InvalidRequest:
    """A bad field of a submitted job; in a batch (``index`` not None) the error names the item too."""
    if index is None:
        return _invalid_field(field, message)
    return InvalidRequest(f"jobs[{index}]: {message}", details={"index": index, "field": field})


# === Configuration ===


class Setting(NamedTuple):
    """One setting. --help, ``Config.from_env`` and the README's table all come from SETTINGS."""

    field: str
    flag: Optional[str]
    env: str
    kind: type
    default: Any
    help: str


def _parse_setting(kind: type, raw: str) -> Any:
    """A setting's value from its text in the environment; ValueError if it is not one. A switch
    is 0 or 1 (``bool("0")`` would be true)."""
    if kind is bool:
        if raw not in ("0", "1"):
            raise ValueError(raw)
        return raw == "1"
    return kind(raw)


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "--host", "DISPATCH_HOST", str, "0.0.0.0", "address to listen on (a LAN box must be reachable)"),
    Setting("port", "--port", "DISPATCH_PORT", int, 3000, "port to listen on"),
    Setting("data_dir", "--data-dir", "DISPATCH_DATA_DIR", str, "./data", "database, uploads and secrets"),
    Setting("database_url", "--database-url", "DISPATCH_DATABASE_URL", str, "",
            "postgresql://user@host/db: jobs, files and secrets there, shared by several servers (unset: SQLite)"),
    Setting("admin_email", None, "DISPATCH_ADMIN_EMAIL", str, "admin@localhost",
            "first admin, created on the first start"),
    Setting("admin_password", None, "DISPATCH_ADMIN_PASSWORD", str, "",
            "first admin's password (random and printed once if unset)"),
    Setting("registration_token", None, "DISPATCH_REGISTRATION_TOKEN", str, "",
            "token agents register with (generated once into the data dir if unset)"),
    Setting("approve_workers", None, "DISPATCH_APPROVE_WORKERS", bool, False,
            "1: a newly registered worker is pending (gets no job) until an admin approves it"),
    Setting("open_registration", None, "DISPATCH_OPEN_REGISTRATION", bool, False,
            "1: registering needs no token, as in the API contract; approval is then always on"),
    Setting("rate_limit", None, "DISPATCH_RATE_LIMIT", int, 100,
            "requests per minute per user or IP; 0 turns limiting off"),
    Setting("worker_rate_limit", None, "DISPATCH_WORKER_RATE_LIMIT", int, 6000,
            "requests per minute per worker (output streaming); 0 turns it off"),
    Setting("max_upload_mb", None, "DISPATCH_MAX_UPLOAD_MB", int, 500, "largest upload (or blob) in MB"),
    Setting("max_artifact_mb", None, "DISPATCH_MAX_ARTIFACT_MB", int, 1024,
            "largest artifacts zip of one job in MB; past it the job ends without artifacts and says why"),
    Setting("file_ttl_days", None, "DISPATCH_FILE_TTL_DAYS", int, 30,
            "days an upload is kept, and a blob no job or input tree has used"),
    Setting("heartbeat_interval", None, "DISPATCH_HEARTBEAT_INTERVAL", float, 30.0,
            "seconds between agent heartbeats; offline after three missed"),
    Setting("max_output_mb", None, "DISPATCH_MAX_OUTPUT_MB", int, 10, "output kept per stream per job in MB"),
    Setting("job_retention_days", None, "DISPATCH_JOB_RETENTION_DAYS", int, 30, "days finished jobs are kept"),
    Setting("worker_retention_days", None, "DISPATCH_WORKER_RETENTION_DAYS", int, 7,
            "days an offline worker is kept after its last heartbeat"),
    Setting("metrics_token", None, "DISPATCH_METRICS_TOKEN", str, "", "token for /metrics (unset: loopback only)"),
    Setting("public_url", None, "DISPATCH_PUBLIC_URL", str, "", "base of absolute URLs (unset: the request's host)"),
    Setting("cors_origins", None, "DISPATCH_CORS_ORIGINS", str, "",
            "comma list of browser origins allowed cross-origin"),
    Setting("trusted_proxies", None, "DISPATCH_TRUSTED_PROXIES", str, "",
            "comma list of proxy IPs whose X-Forwarded-For is believed"),
    Setting("bcrypt_rounds", None, "DISPATCH_BCRYPT_ROUNDS", int, 12, "bcrypt cost of new password hashes (4-16)"),
    Setting("log_format", "--log-format", "DISPATCH_LOG_FORMAT", str, "text", "log lines as text or json"),
    Setting("request_timeout", None, "DISPATCH_REQUEST_TIMEOUT", float, 15.0,
            "seconds a client may take to send a request's headers, or to send more of a stalled body"),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Server configuration. Flags win over environment variables, which win over defaults."""

    host: str = "0.0.0.0"
    port: int = 3000
    data_dir: str = "./data"
    database_url: str = ""
    admin_email: str = "admin@localhost"
    admin_password: str = ""
    registration_token: str = ""
    approve_workers: bool = False
    open_registration: bool = False
    rate_limit: int = 100
    worker_rate_limit: int = 6000
    max_upload_mb: int = 500
    max_artifact_mb: int = 1024
    file_ttl_days: int = 30
    heartbeat_interval: float = 30.0
    max_output_mb: int = 10
    job_retention_days: int = 30
    worker_retention_days: int = 7
    metrics_token: str = ""
    public_url: str = ""
    cors_origins: str = ""
    trusted_proxies: str = ""
    bcrypt_rounds: int = 12
    log_format: str = "text"
    request_timeout: float = 15.0

    @classmethod
    def from_env(cls, environ: Optional[dict] = None, **overrides: Any) -> "Config":
        """Read every setting from ``environ`` (default ``os.environ``); ``overrides`` (flags) win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env)
            if raw not in (None, ""):
                try:
                    values[setting.field] = _parse_setting(setting.kind, raw)
                except ValueError:
                    raise SystemExit(f"{setting.env}={raw!r} is not a valid {setting.kind.__name__}"
                                     + (" (0 or 1)" if setting.kind is bool else ""))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def database(self) -> str | Path:
        """Where jobs live: the PostgreSQL URL, or the SQLite file in the data dir."""
        return self.database_url or self.data_path / "dispatch.db"

    @property
    def approval_required(self) -> bool:
        """New workers wait for an admin's approval: asked for, or implied by open registration."""
        return self.approve_workers or self.open_registration

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @property
    def trusted_proxy_list(self) -> list[str]:
        return [p.strip() for p in self.trusted_proxies.split(",") if p.strip()]


def _make_data_dir_private(path: Path) -> None:
    """Create the data dir, and close what an older version left open: it holds password hashes,
    tokens and people's code, so every folder is 0700 and every file 0600, whatever the umask."""
    for folder in ("uploads", "blobs", "artifacts"):
        (path / folder).mkdir(mode=0o700, parents=True, exist_ok=True)
    database = path / "dispatch.db"
    if not database.exists():  # SQLite gives its -wal and -shm files the database's mode
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
    for folder, _subfolders, files in os.walk(path):
        os.chmod(folder, 0o700)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o600)


class DataDirInUse(Exception):
    """Another ``python dispatch.py`` runs on this data dir (SQLite has one server; PostgreSQL may
    have several). An embedding program runs its apps as it sees fit."""


def _lock_data_dir(path: Path):
    """Hold <data dir>/dispatch.lock while the server runs; refuse if another process holds it. The
    operating system drops the lock when its process ends, however it ends, so a lock left by a
    dead server never blocks. Returns the open lock file: closing it lets go."""
    lock = open(path / "dispatch.lock", "a+")
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise DataDirInUse(f"another dispatch server ({holder}) uses the data dir {path}: stop it first, or give "
                           f"this one its own --data-dir (several servers can share one PostgreSQL database: "
                           f"--database-url)") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def _read_or_create_secret(path: Path, make: Callable[[], str]) -> str:
    """A secret kept in the data dir with mode 0600, created on first use."""
    if path.exists():
        return path.read_text().strip()
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


def _replace_secret(path: Path, value: str) -> None:
    """Put a new secret in place of the old one, mode 0600: on disk before this returns, and never
    half-written (a crash leaves the old one or the new one)."""
    staged = path.with_name(f".{path.name}.new")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)


# === Rate limiter ===



class RateLimiter:
    """Token buckets keyed by user, worker or IP: ``limit`` requests a minute, refilled smoothly."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self._clock = clock
        self._wall = wall
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def take(self, key: str, limit: int) -> tuple[bool, int, int, int]:
        """Spend one token. Returns (allowed, remaining, reset epoch seconds, retry-after seconds)."""
        now = self._clock()
        rate = limit / 60.0
        tokens, last = self._buckets.get(key, (float(limit), now))
        tokens = min(float(limit), tokens + (now - last) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 100_000:
            self._forget_full_buckets(now)
        retry_after = 0 if allowed else math.ceil((1.0 - tokens) / rate)
        reset = math.ceil(self._wall() + (limit - tokens) / rate)
        return allowed, int(tokens), reset, retry_after

    def _forget_full_buckets(self, now: float) -> None:
        # A bucket that would be full again carries no information; dropping it bounds memory.
        self._buckets = {k: (t, last) for k, (t, last) in self._buckets.items() if now - last < 60.0}


# === Storage: the database engines ===


class DuplicateKey(Exception):
    """An INSERT met a row with the same unique key."""


class DatabaseUnavailable(Exception):
    """The database cannot answer now (locked, disk full, connection lost): the caller gets a 503."""


class _SQLite:
    """One SQLite connection, used on the event loop. A hot-path statement takes SQLite tens of
    microseconds, less than a hop to a thread and back (bench/micro_sqlite.py); the one slow part,
    the WAL checkpoint's fsync, runs in a thread instead (``checkpoint``)."""

    # One writer: a claim needs no row lock, and the next seq is the highest plus one.
    skip_locked = ""
    next_seq = "(SELECT COALESCE(MAX(seq), 0) FROM jobs) + 1 + item.key"
    caches_workers = True

    def __init__(self, conn: sqlite3.Connection, checkpointer: aiosqlite.Connection):
        self._conn = conn
        self._checkpointer = checkpointer

    @classmethod
    async def open(cls, path: Path) -> "_SQLite":
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # survives kill -9; fsync per checkpoint
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoint() does it, off the loop
        return cls(conn, await aiosqlite.connect(path, isolation_level=None))

    async def all(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        try:
            return [dict(row) for row in self._conn.execute(sql, params)]
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorname in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"):
                raise DuplicateKey(str(exc)) from None
            raise
        except sqlite3.OperationalError as exc:
            raise DatabaseUnavailable(str(exc)) from exc

    async def schema_version(self) -> int:
        return (await self.all("PRAGMA user_version"))[0]["user_version"]

    async def upgrade(self, found: int) -> None:
        """Bring the schema from version ``found`` (0: a new database) to this dispatch.py's, in one
        transaction: an upgrade happens whole or not at all."""
        upgrade = [statement + ";\n" for version in range(found + 1, SCHEMA_VERSION + 1) if found
                   for statement in MIGRATIONS[version]]
        self._conn.executescript("BEGIN;\n" + "".join(upgrade) + SCHEMA_PATH.read_text() + "\nCOMMIT;\n")

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file and fsync it, in aiosqlite's thread on a connection of
        its own; a busy writer is not waited for (PASSIVE) and the WAL is reset when all is copied."""
        await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def close(self) -> None:
        try:
            await self.checkpoint()
        finally:
            await self._checkpointer.close()
            self._conn.close()


class _Postgres:
    """A pool of asyncpg connections to a database that several servers may share. The statements
    are SQLite's: ``?`` and ``:name`` become ``$n`` here, and schema-postgresql.sql defines the
    SQLite functions they use."""

    # Servers claim at once: a claim skips the jobs another is claiming; seq comes from a sequence;
    # a worker's state may change through another server, so it is read every time.
    skip_locked = "FOR UPDATE OF j SKIP LOCKED"
    next_seq = "nextval('jobs_seq')"
    caches_workers = False

    def __init__(self, pool, url: str):
        self._pool = pool
        self.url = url
        self._listener = None  # see listen()
        self._leading = False
        self._lead_lock = asyncio.Lock()
        self._translated: dict[str, tuple[str, list[str] | None]] = {}
        import asyncpg
        self._duplicate = asyncpg.UniqueViolationError
        self._unavailable = (OSError, asyncio.TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                             asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)

    @classmethod
    async def connect(cls, url: str) -> "_Postgres":
        import asyncpg  # only PostgreSQL mode needs it
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=POSTGRES_POOL_SIZE, statement_cache_size=512,
                                             reset=_keep_session)
        except (OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(f"cannot connect to {_without_password(url)}: {exc}") from None
        return cls(pool, url)

    def _postgres_sql(self, sql: str) -> tuple[str, list[str] | None]:
        """The statement with ``$n`` placeholders, and the parameter names in their order (None: the
        parameters are positional already)."""
        if (known := self._translated.get(sql)) is not None:
            return known
        names: list[str] = []
        positional = 0

        def number(match: re.Match) -> str:
            nonlocal positional
            token, name = match.group(0), match.group(1)
            if name:
                if name not in names:
                    names.append(name)
                return f"${names.index(name) + 1}"
            if token == "?":
                positional += 1
                return f"${positional}"
            return token  # a string literal, a comment or a :: cast

        text = _SQL_TOKENS.sub(number, sql)
        self._translated[sql] = known = (text, names if names else None)
        return known

    async def all(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        text, names = self._postgres_sql(sql)
        args = [params[name] for name in names] if names else params
        try:
            return [dict(row) for row in await self._pool.fetch(text, *args)]
        except self._duplicate as exc:
            raise DuplicateKey(str(exc)) from None
        except self._unavailable as exc:
            raise DatabaseUnavailable(str(exc)) from exc

    async def schema_version(self) -> int:
        if (await self.all("SELECT to_regclass('meta') IS NULL AS new"))[0]["new"]:
            return 0
        row = await self.all("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(row[0]["value"]) if row else 0

    async def upgrade(self, found: int) -> None:
        """Create or complete the schema, one server at a time (servers may start together)."""
        if found == SCHEMA_VERSION:
            return  # unlike SQLite's, re-applying it costs catalog writes and locks the others wait for
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_SCHEMA})")
            await conn.execute(POSTGRES_SCHEMA_PATH.read_text())

    async def checkpoint(self) -> None:
        """PostgreSQL checkpoints on its own."""

    async def close(self) -> None:
        await self.stop_listening()
        await self._pool.close()

    # What several servers on the database share: events, and who runs the sweeps. A connection of
    # its own listens for the NOTIFY and holds the sweeps' advisory lock, so both end with it.

    async def listen(self, on_notify: Callable[[str], None]) -> None:
        """Call ``on_notify(server)`` when a server has published events."""
        import asyncpg
        listener = await asyncpg.connect(self.url)
        try:
            await listener.add_listener(EVENTS_CHANNEL, lambda _conn, _pid, _channel, origin: on_notify(origin))
        except BaseException:  # cancelled too: the server stops
            listener.terminate()
            raise
        self._listener, self._leading = listener, False  # only now: lead() may use it

    async def stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()

    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    async def lead(self) -> bool:
        """Whether this server runs the cluster's sweeps: it holds their lock, or takes it now that
        the server that held it is gone."""
        async with self._lead_lock:  # one question at a time on the listening connection
            if not self._leading:
                self._leading = await self._listener.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_SWEEPS)
        return self._leading

    async def publish_events(self, server: str, at: str, events: list[dict]) -> None:
        """Add this server's events, in order, and tell the others (schema-postgresql.sql's
        publish_events: one round trip)."""
        await self.all("SELECT publish_events(?, ?, ?) AS done", (server, at, json.dumps(events)))

    async def events_after(self, last_id: int, server: str) -> list[dict]:
        """The other servers' events after ``last_id``, oldest first."""
        return await self.all("SELECT id, event FROM events WHERE id > ? AND server != ? ORDER BY id LIMIT 1000",
                              (last_id, server))

    async def last_event_id(self) -> int:
        return (await self.all("SELECT COALESCE(MAX(id), 0) AS id FROM events"))[0]["id"]

    async def forget_events(self, before: str) -> None:
        await self.all("DELETE FROM events WHERE at < ?", (before,))


class _FileChunks:
    """The statements of the contents of uploads, blobs and artifacts in PostgreSQL (_DatabaseContents),
    so that every server serves every file and one pg_dump holds them all: a content is the rows of its
    key in file_chunks, numbered from 0, each CONTENT_CHUNK_BYTES long but the last."""

    def __init__(self, engine: _Postgres):
        self._engine = engine

    async def insert(self, key: str, n: int, data: bytes) -> None:
        """Add a row to a partial content. Its commit waits for no flush to disk (twice as fast): the
        rename that puts the content in place does wait, for this row too, being later in the log."""
        await self._engine.all("WITH unflushed AS (SELECT set_config('synchronous_commit', 'off', true))"
                               " INSERT INTO file_chunks (key, n, data) SELECT ?, ?, ? FROM unflushed", (key, n, data))

    async def rename(self, moves: dict[str, str]) -> None:
        """Give each partial content (a key of ``moves``) its final key, all in one statement: each
        is seen whole or not at all. A final key that holds a content already keeps it."""
        for tries_left in (1, 0):
            try:
                await self._engine.all(
                    "UPDATE file_chunks c SET key = m.final"
                    " FROM (SELECT unnest(?::text[]) AS partial, unnest(?::text[]) AS final) AS m"
                    " WHERE c.key = m.partial AND NOT EXISTS (SELECT 1 FROM file_chunks t WHERE t.key = m.final)",
                    (list(moves), list(moves.values())))
                return
            except DuplicateKey:  # another server put one of these in place meanwhile: it holds one now
                if not tries_left:
                    raise

    async def chunk(self, key: str, n: int) -> dict | None:
        """Row ``n`` of a content: its ``data``, and the ``version`` of the content, the transaction that
        renamed all its rows at once (so a content put again under the same key is another version)."""
        rows = await self._engine.all("SELECT data, xmin::text AS version FROM file_chunks WHERE key = ? AND n = ?",
                                      (key, n))
        return rows[0] if rows else None

    async def present(self, keys: list[str]) -> set[str]:
        rows = await self._engine.all("SELECT key FROM file_chunks WHERE key = ANY(?) AND n = 0", (keys,))
        return {row["key"] for row in rows}

    async def delete(self, keys: list[str]) -> None:
        await self._engine.all("DELETE FROM file_chunks WHERE key = ANY(?)", (keys,))

    async def delete_range(self, first: str, end: str) -> None:
        """Delete the contents whose keys sort, byte by byte, from ``first`` up to (not including) ``end``."""
        await self._engine.all('DELETE FROM file_chunks WHERE key COLLATE "C" >= ? AND key COLLATE "C" < ?',
                               (first, end))


async def _keep_session(_connection) -> None:
    """What the pool does to a connection given back: nothing. Its connections hold no session state
    (no LISTEN, no session lock, no SET), and asyncpg's default reset costs a round trip each time."""


def _is_postgres(where: str | Path) -> bool:
    return str(where).startswith(("postgresql://", "postgres://"))


# A string literal, a comment, a cast, a :name parameter or a ? parameter.
_SQL_TOKENS = re.compile(r"'(?:[^']|'')*'|--[^\n]*|::|:(\w+)|\?")


def _without_password(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


# === Storage: what every table's statements share (all SQL lives in this and the next sections) ===


class _Database:
    """The database and what every table's statements share. Every write is one autocommitted
    statement, so a 2xx is on disk (WAL) before it is sent, and no coroutine can see another's
    half-done transaction. Timestamps come from the injected clock, never from the database's own."""

    def __init__(self, engine: _SQLite | _Postgres, clock: Clock):
        self._engine = engine
        self._clock = clock
        # Worker tokens are asked about on every worker call and change only when a worker is
        # deleted or changes state, so they are kept in memory; a lookup that raced a change is not kept.
        self._workers_by_token: dict[str, dict] = {}
        self._worker_changes = 0

    @classmethod
    async def open(cls, where: str | Path, clock: Optional[Clock] = None):
        """``where``: a SQLite file, or a postgresql:// URL."""
        engine = await (_Postgres.connect(str(where)) if _is_postgres(where) else _SQLite.open(Path(where)))
        found = await engine.schema_version()
        if found > SCHEMA_VERSION:
            await engine.close()
            raise RuntimeError(f"{_without_password(str(where))} has schema version {found}, newer than this "
                               f"dispatch.py knows ({SCHEMA_VERSION}): run the newer dispatch.py, or restore a backup")
        await engine.upgrade(found)
        return cls(engine, clock or Clock())

    async def close(self) -> None:
        await self._engine.close()

    async def checkpoint(self) -> None:
        await self._engine.checkpoint()

    @property
    def shared(self) -> bool:
        """Whether other servers may use the database at the same time (PostgreSQL)."""
        return isinstance(self._engine, _Postgres)

    @property
    def engine(self) -> _SQLite | _Postgres:
        return self._engine

    async def shared_secret(self, key: str, candidate: str) -> str:
        """The secret kept under ``key``; ``candidate`` if there was none yet (of servers starting
        together, the first to write wins, and all read the same)."""
        await self._write("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (key, candidate))
        return await self.secret(key)

    async def secret(self, key: str) -> str:
        return (await self._one("SELECT value FROM meta WHERE key = ?", (key,)))["value"]

    async def replace_shared_secret(self, key: str, value: str) -> None:
        await self._write("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    async def forget_events(self, before: str) -> None:
        """Drop the events passed between servers before ``before`` (only PostgreSQL has them)."""
        if self.shared:
            await self._engine.forget_events(before)

    async def _one(self, sql: str, params: tuple | dict = ()) -> dict | None:
        rows = await self._engine.all(sql, params)
        return rows[0] if rows else None

    async def _all(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        return await self._engine.all(sql, params)

    async def _write(self, sql: str, params: tuple | dict = ()) -> int:
        """Run an INSERT, UPDATE or DELETE; returns how many rows it touched."""
        return len(await self._engine.all(sql + " RETURNING 1", params))

    async def prove_writable(self) -> None:
        await self._write("INSERT INTO meta (key, value) VALUES ('health_checked_at', ?)"
                          " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                          (self._clock.iso(),))

    async def counts(self, cutoff: str) -> dict[str, dict[str, int]]:
        """Jobs by state, queued jobs by priority, workers by status."""
        jobs = await self._all("SELECT status AS k, COUNT(*) AS n FROM jobs GROUP BY status")
        queue = await self._all("SELECT priority AS k, COUNT(*) AS n FROM jobs WHERE status = 'queued' GROUP BY priority")
        workers = await self._all(f"SELECT status AS k, COUNT(*) AS n FROM ({self._WORKER_VIEW}) AS v GROUP BY status",
                                  {"cutoff": cutoff})
        return {name: {row["k"]: row["n"] for row in rows}
                for name, rows in (("jobs", jobs), ("queue", queue), ("workers", workers))}

    async def delete_finished_jobs(self, before: str, batch: int = 500) -> list[str]:
        """Delete up to ``batch`` jobs that finished before ``before``, output first (no orphans);
        returns their ids (their artifacts go next)."""
        rows = await self._all("SELECT id FROM jobs WHERE completed_at < ? AND status IN"
                               " ('completed', 'failed', 'cancelled') LIMIT ?", (before, batch))
        if rows:
            ids = json.dumps([row["id"] for row in rows])
            await self._write("DELETE FROM job_output WHERE job_id IN (SELECT value FROM json_each(?))", (ids,))
            await self._write("DELETE FROM job_parents WHERE parent_id IN (SELECT value FROM json_each(:ids))"
                              " OR child_id IN (SELECT value FROM json_each(:ids))", {"ids": ids})
            await self._write("DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?))", (ids,))
        return [row["id"] for row in rows]


# === Storage: users and their tokens ===


class _UserTables(_Database):

    async def count_users(self) -> int:
        return (await self._one("SELECT COUNT(*) AS n FROM users"))["n"]

    async def insert_user(self, user_id: str, email: str, password_hash: str, role: str) -> None:
        try:
            await self._write(
                "INSERT INTO users (id, email, password_hash, role, created_at) VALUES (?, ?, ?, ?, ?)",
                (user_id, email, password_hash, role, self._clock.iso()))
        except DuplicateKey:
            raise Conflict("User already exists") from None

    async def user_by_email(self, email: str) -> dict | None:
        return await self._one("SELECT * FROM users WHERE email = ?", (email,))

    async def highest_password_cost(self) -> int | None:
        """The highest bcrypt cost among the stored hashes ("$2b$12$..." costs 12), whoever wrote
        them: the server or ``user add`` with other settings."""
        row = await self._one("SELECT MAX(CAST(substr(password_hash, 5, 2) AS INTEGER)) AS cost FROM users")
        return row["cost"]

    async def user_for_token(self, user_id: str, jti: str) -> dict | None:
        """The token's user with a ``revoked`` flag, in one query (this runs on every request)."""
        return await self._one(
            "SELECT id, email, role, EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = ?) AS revoked"
            " FROM users WHERE id = ?", (jti, user_id))

    async def list_users(self) -> list[dict]:
        return await self._all("SELECT id, email, role, created_at FROM users ORDER BY created_at, id")

    async def set_password_hash(self, email: str, password_hash: str) -> bool:
        return await self._write("UPDATE users SET password_hash = ? WHERE email = ?", (password_hash, email)) > 0

    async def delete_user(self, user_id: str) -> bool:
        await self._write("DELETE FROM api_tokens WHERE user_id = ?", (user_id,))  # first: never an orphan
        return await self._write("DELETE FROM users WHERE id = ?", (user_id,)) > 0

    async def revoke_token(self, jti: str, token_exp: int) -> bool:
        """Revoke a JWT; False if it already was (one statement, so of two racing revocations
        exactly one wins). It is kept as long as a refresh could still use the token."""
        keep_until = token_exp + int(REFRESH_GRACE.total_seconds())
        return await self._write("INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                                 (jti, keep_until)) > 0

    async def insert_api_token(self, record: dict) -> None:
        await self._write("INSERT INTO api_tokens (id, user_id, name, token_hash, created_at, expires_at)"
                          " VALUES (:id, :user_id, :name, :token_hash, :created_at, :expires_at)", record)

    async def api_tokens_of(self, user_id: str) -> list[dict]:
        return await self._all("SELECT id, name, created_at, expires_at FROM api_tokens WHERE user_id = ?"
                               " ORDER BY created_at, id", (user_id,))

    async def user_for_api_token(self, token_hash: str) -> dict | None:
        """The token's user, with the token's id and expiry (this runs on every request made with one)."""
        return await self._one(
            "SELECT u.id, u.email, u.role, t.id AS token_id, t.expires_at FROM api_tokens t"
            " JOIN users u ON u.id = t.user_id WHERE t.token_hash = ?", (token_hash,))

    async def delete_api_token(self, user_id: str, token_id: str) -> bool:
        return await self._write("DELETE FROM api_tokens WHERE id = ? AND user_id = ?", (token_id, user_id)) > 0

    async def purge_revoked_tokens(self, before: int) -> None:
        await self._write("DELETE FROM revoked_tokens WHERE expires_at < ?", (before,))


# === Storage: workers ===


class _WorkerTables(_Database):

    # A worker's status and current job are derived, never stored: offline once its heartbeat is
    # older than the cutoff or its agent said it stops, its current job the one it holds.
    _WORKER_VIEW = """
        SELECT w.id, w.hostname, w.cpu_count, w.total_memory_mb, w.metadata, w.tags, w.reported_status,
               w.jobs_completed, w.registered_at, w.last_heartbeat, w.state, w.cpus, w.memory_mb, w.gpus,
               w.reported_pause,
               CASE WHEN w.last_heartbeat < :cutoff OR w.reported_status = 'offline' THEN 'offline'
                    WHEN w.reported_status = 'error' THEN 'error'
                    ELSE 'online' END AS status,
               (SELECT j.id FROM jobs j WHERE j.worker_id = w.id AND j.status = 'running'
                 ORDER BY j.started_at DESC LIMIT 1) AS current_job_id
        FROM workers w"""

    async def insert_worker(self, worker: dict) -> str:
        """Add a worker; returns its registration time."""
        now = self._clock.iso()
        try:
            await self._write(
                "INSERT INTO workers (id, token_hash, hostname, cpu_count, total_memory_mb, metadata, tags, state,"
                " cpus, memory_mb, gpus, registered_at, last_heartbeat) VALUES (:id, :token_hash, :hostname,"
                " :cpu_count, :total_memory_mb, :metadata, :tags, :state, :cpus, :memory_mb, :gpus, :now, :now)",
                {**worker, "now": now})
        except DuplicateKey:
            raise Conflict("Worker already registered", code="WORKER_EXISTS") from None
        self._worker_changes += 1
        return now

    async def worker_by_token_hash(self, token_hash: str) -> dict | None:
        worker = self._workers_by_token.get(token_hash)
        if worker is None:
            changes = self._worker_changes
            worker = await self._one("SELECT id, tags, state FROM workers WHERE token_hash = ?", (token_hash,))
            if worker is not None and changes == self._worker_changes and self._engine.caches_workers:
                self._workers_by_token[token_hash] = worker
        return worker

    @property
    def worker_changes(self) -> int:
        """How many times this server registered, changed or deleted a worker so far."""
        return self._worker_changes

    def _forget_worker(self, worker_id: str) -> None:
        """Drop the worker from the token cache; a lookup already on its way is not kept."""
        self._worker_changes += 1
        self._workers_by_token = {h: w for h, w in self._workers_by_token.items() if w["id"] != worker_id}

    async def worker_by_id(self, worker_id: str, cutoff: str) -> dict | None:
        return await self._one(f"SELECT * FROM ({self._WORKER_VIEW}) AS v WHERE id = :id",
                               {"cutoff": cutoff, "id": worker_id})

    async def list_workers(self, *, cutoff: str, status: str | None, tags: list[str], order: str,
                           limit: int, offset: int) -> tuple[int, list[dict]]:
        where = ["(CAST(:status AS TEXT) IS NULL OR status = :status)",
                 "NOT EXISTS (SELECT 1 FROM json_each(:tags) t"
                 "            WHERE t.value NOT IN (SELECT value FROM json_each(v.tags)))"]
        params = {"cutoff": cutoff, "status": status, "tags": json.dumps(tags), "limit": limit, "offset": offset}
        base = f"FROM ({self._WORKER_VIEW}) v WHERE {' AND '.join(where)}"
        total = (await self._one(f"SELECT COUNT(*) AS n {base}", params))["n"]
        rows = await self._all(f"SELECT * {base} ORDER BY {order} LIMIT :limit OFFSET :offset", params)
        return total, rows

    async def record_heartbeat(self, worker_id: str, status: str, offers: dict) -> str:
        """Note that the worker is alive, and what it offers now ({column: amount}, None: as before);
        returns the time noted."""
        now = self._clock.iso()
        await self._write(
            "UPDATE workers SET last_heartbeat = :now, reported_status = :status, cpus = COALESCE(:cpus, cpus),"
            " memory_mb = COALESCE(:memory_mb, memory_mb), gpus = COALESCE(:gpus, gpus) WHERE id = :id",
            {**offers, "now": now, "status": status, "id": worker_id})
        return now

    async def delete_worker(self, worker_id: str) -> bool:
        deleted = await self._write("DELETE FROM workers WHERE id = ?", (worker_id,)) > 0
        self._forget_worker(worker_id)
        return deleted

    async def delete_silent_workers(self, before: str) -> list[str]:
        """Forget the workers not heard from since ``before``; returns their ids."""
        rows = await self._all("DELETE FROM workers WHERE last_heartbeat < ? RETURNING id", (before,))
        for row in rows:
            self._forget_worker(row["id"])
        return [row["id"] for row in rows]

    async def workers_gone_silent(self, since: str, cutoff: str) -> list[dict]:
        """Workers whose last heartbeat the offline cutoff passed as it moved from ``since`` to ``cutoff``."""
        return await self._all(f"SELECT * FROM ({self._WORKER_VIEW}) AS v WHERE last_heartbeat >= :since"
                               " AND last_heartbeat < :cutoff AND reported_status != 'offline'",
                               {"since": since, "cutoff": cutoff})

    async def heard_from(self, worker_ids: set[str]) -> None:
        """Note that these workers are alive (their polls waited on this server), as a heartbeat would."""
        if worker_ids:
            await self._write("UPDATE workers SET last_heartbeat = ? WHERE id IN (SELECT value FROM json_each(?))",
                              (self._clock.iso(), json.dumps(sorted(worker_ids))))

    async def heartbeats_since(self, since: str) -> dict[str, str]:
        """{worker id: last heartbeat} of the workers heard from since ``since``."""
        rows = await self._all("SELECT id, last_heartbeat FROM workers WHERE last_heartbeat >= ?", (since,))
        return {row["id"]: row["last_heartbeat"] for row in rows}

    async def report_pause(self, worker_id: str, reason: str | None) -> bool:
        """Note why the worker's agent takes no jobs now ("owner active"; None: it takes them);
        True if that changed."""
        changed = await self._write("UPDATE workers SET reported_pause = :reason WHERE id = :id"
                                    " AND reported_pause IS DISTINCT FROM :reason", {"id": worker_id, "reason": reason})
        self._worker_changes += changed
        return changed > 0

    async def change_worker_state(self, worker_id: str, old: str, new: str) -> str | None:
        """Move the worker from state ``old`` to ``new`` (any other state stays); returns its state
        afterwards, None if there is no such worker."""
        row = await self._one("UPDATE workers SET state = CASE WHEN state = ? THEN ? ELSE state END WHERE id = ?"
                              " RETURNING state", (old, new, worker_id))
        self._forget_worker(worker_id)
        return row and row["state"]


# === Storage: files, blobs and artifacts ===


class _FileTables(_Database):

    async def insert_file(self, record: dict) -> None:
        await self._write(
            "INSERT INTO files (id, name, size, sha256, owner_id, uploaded_at, expires_at)"
            " VALUES (:id, :name, :size, :sha256, :owner_id, :uploaded_at, :expires_at)", record)

    async def file_by_id(self, file_id: str) -> dict | None:
        return await self._one("SELECT * FROM files WHERE id = ?", (file_id,))

    async def expired_files(self, batch: int = 100) -> list[dict]:
        return await self._all("SELECT id, name FROM files WHERE expires_at < ? LIMIT ?", (self._clock.iso(), batch))

    async def delete_file(self, file_id: str) -> None:
        await self._write("DELETE FROM files WHERE id = ?", (file_id,))

    async def worker_holds_file(self, worker_id: str, file_id: str) -> bool:
        row = await self._one("SELECT 1 AS ok FROM jobs WHERE worker_id = ? AND file_id = ? AND status = 'running'",
                              (worker_id, file_id))
        return row is not None

    # A blob's content is stored once, whoever sent it; each person who sent it is an owner, and only
    # an owner (or an admin) may name it in a job: knowing a hash is not having the content.
    _MAY_USE_BLOB = ("(CAST(:user AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM blob_owners o"
                     " WHERE o.sha256 = b.sha256 AND o.user_id = :user))")

    async def touch_usable_blobs(self, hashes: list[str], user_id: Optional[str]) -> set[str]:
        """Of ``hashes``, the stored blobs the user may use (``user_id`` None: an admin, any of them),
        marked as used now, so that no sweep takes them before the submit that follows."""
        params = {"now": self._clock.iso(), "stale": self._clock.iso(-BLOB_TOUCH_SECONDS),
                  "hashes": json.dumps(hashes), "user": user_id}
        rows = await self._all(f"SELECT sha256 FROM blobs b WHERE sha256 IN (SELECT value FROM json_each(:hashes))"
                               f" AND {self._MAY_USE_BLOB}", params)
        usable = json.dumps([row["sha256"] for row in rows])
        await self._write("UPDATE blobs SET last_used_at = :now WHERE sha256 IN (SELECT value FROM json_each(:usable))"
                          " AND last_used_at < :stale", {**params, "usable": usable})  # a day's precision is plenty
        return {row["sha256"] for row in rows}

    async def add_blobs(self, blobs: list[dict], owner_id: str) -> None:
        """Record blobs whose content is on disk now ({"sha256", "size"} each), and that ``owner_id``
        sent them."""
        params = {"items": json.dumps(blobs), "now": self._clock.iso(), "owner": owner_id}
        await self._write(
            "INSERT INTO blobs (sha256, size, created_at, last_used_at)"
            " SELECT json_extract(value, '$.sha256'), CAST(json_extract(value, '$.size') AS BIGINT), :now, :now"
            " FROM json_each(:items) WHERE true"  # WHERE: so that ON CONFLICT is not read as a join's ON
            " ON CONFLICT (sha256) DO UPDATE SET last_used_at = excluded.last_used_at", params)
        await self._write("INSERT INTO blob_owners (sha256, user_id)"
                          " SELECT json_extract(value, '$.sha256'), :owner FROM json_each(:items) WHERE true"
                          " ON CONFLICT DO NOTHING", params)

    async def tree_problem(self, tree: str, user_id: Optional[str]) -> dict | None:
        """The first entry of an input tree (JSON) whose blob is not stored, is not the user's to use
        (``user_id`` None: an admin), or has another size than the entry says; None if all are fine."""
        return await self._one(
            f"""SELECT json_extract(t.value, '$.path') AS path, json_extract(t.value, '$.sha256') AS sha256,
                       CAST(json_extract(t.value, '$.size') AS BIGINT) AS size, b.size AS stored_size,
                       b.sha256 IS NOT NULL AND {self._MAY_USE_BLOB} AS usable
                FROM json_each(:tree) t LEFT JOIN blobs b ON b.sha256 = json_extract(t.value, '$.sha256')
                WHERE b.sha256 IS NULL OR NOT {self._MAY_USE_BLOB} OR b.size != CAST(json_extract(t.value, '$.size') AS BIGINT)
                LIMIT 1""", {"tree": tree, "user": user_id})

    async def keep_tree(self, tree_id: str, tree: str, files: int, size: int) -> None:
        """Store an input tree (JSON) under its id (a hash of it; kept once however many jobs use it)
        and mark it and its blobs used now."""
        params = {"id": tree_id, "tree": tree, "files": files, "size": size, "now": self._clock.iso(),
                  "stale": self._clock.iso(-BLOB_TOUCH_SECONDS)}
        kept = await self._one(
            "INSERT INTO input_trees (id, tree, files, size, created_at, last_used_at)"
            " VALUES (:id, :tree, :files, :size, :now, :now)"
            " ON CONFLICT (id) DO UPDATE SET last_used_at = excluded.last_used_at RETURNING created_at", params)
        if kept["created_at"] == params["now"]:  # a new tree (the same tree again needs no second list)
            await self._write("INSERT INTO tree_blobs (tree_id, sha256)"
                              " SELECT :id, json_extract(value, '$.sha256') FROM json_each(:tree) WHERE true"
                              " ON CONFLICT DO NOTHING", params)
        await self._write("UPDATE blobs SET last_used_at = :now WHERE last_used_at < :stale"
                          " AND sha256 IN (SELECT sha256 FROM tree_blobs WHERE tree_id = :id)", params)

    async def tree_by_id(self, tree_id: str) -> list[dict] | None:
        row = await self._one("SELECT tree FROM input_trees WHERE id = ?", (tree_id,))
        return json.loads(row["tree"]) if row else None

    async def blobs_of_held_job(self, worker_id: str, job_id: str, attempt: Optional[int],
                                hashes: list[str]) -> dict[str, int] | None:
        """The sizes of ``hashes`` if the worker holds the job (that attempt, if given) and they are all
        in its input tree; None otherwise."""
        rows = await self._all(
            """SELECT b.sha256, b.size FROM jobs j JOIN tree_blobs t ON t.tree_id = j.input_tree_id
                 JOIN blobs b ON b.sha256 = t.sha256
               WHERE j.id = :job AND j.worker_id = :worker AND j.status = 'running'
                 AND (CAST(:attempt AS BIGINT) IS NULL OR j.attempt = :attempt)
                 AND t.sha256 IN (SELECT value FROM json_each(:hashes))""",
            {"job": job_id, "worker": worker_id, "attempt": attempt, "hashes": json.dumps(hashes)})
        sizes = {row["sha256"]: row["size"] for row in rows}
        return sizes if len(sizes) == len(set(hashes)) else None

    async def expire_trees_and_blobs(self, before: str, batch: int = 500) -> list[str]:
        """Delete input trees no job uses that were last used before ``before``, then up to ``batch``
        blobs no tree holds that were last used before it; returns those blobs' hashes (their files go
        next). A tree or blob used again meanwhile is kept."""
        params = {"before": before, "batch": batch}
        trees = await self._all(
            "DELETE FROM input_trees WHERE id IN (SELECT id FROM input_trees WHERE last_used_at < :before"
            " AND NOT EXISTS (SELECT 1 FROM jobs WHERE input_tree_id = input_trees.id) LIMIT :batch)"
            " RETURNING id", params)
        if trees:
            await self._write("DELETE FROM tree_blobs WHERE tree_id IN (SELECT value FROM json_each(?))"
                              " AND tree_id NOT IN (SELECT id FROM input_trees)",  # kept again since
                              (json.dumps([row["id"] for row in trees]),))
        blobs = await self._all(
            "DELETE FROM blobs WHERE sha256 IN (SELECT sha256 FROM blobs b WHERE last_used_at < :before"
            " AND NOT EXISTS (SELECT 1 FROM tree_blobs t WHERE t.sha256 = b.sha256) LIMIT :batch)"
            " RETURNING sha256", params)
        hashes = [row["sha256"] for row in blobs]
        if hashes:
            await self._write("DELETE FROM blob_owners WHERE sha256 IN (SELECT value FROM json_each(?))"
                              " AND sha256 NOT IN (SELECT sha256 FROM blobs)", (json.dumps(hashes),))
        return hashes

    async def record_artifacts(self, job: dict, artifacts: dict) -> dict | None:
        """Note the attempt's artifacts ({"size", "files", "sha256"}) or why it has none ({"error"}),
        if the job's worker still holds the attempt; the job as it is now, or None."""
        return await self._one(
            f"""UPDATE jobs SET artifacts_attempt = :attempt, artifacts_size = :size, artifacts_files = :files,
                  artifacts_sha256 = :sha256, artifacts_error = :artifacts_error
                WHERE {self._HOLDER} RETURNING *""",
            {"id": job["id"], "worker_id": job["worker_id"], "attempt": job["attempt"], "size": None,
             "files": None, "sha256": None, "artifacts_error": None, **artifacts})

    async def forget_artifacts_of_finished_jobs(self, before: str, batch: int = 500) -> list[dict]:
        """Up to ``batch`` jobs that finished before ``before`` (delete_finished_jobs takes them next)
        and had artifacts, which they no longer say they have; their ids and last attempts. Their
        artifacts go first: after the rows, nothing says which attempts there were."""
        return await self._all(
            "UPDATE jobs SET artifacts_attempt = NULL WHERE id IN (SELECT id FROM jobs WHERE completed_at < ?"
            " AND status IN ('completed', 'failed', 'cancelled') AND artifacts_attempt IS NOT NULL LIMIT ?)"
            " RETURNING id, attempt", (before, batch))


# === Storage: jobs ===


class _JobTables(_Database):

    # What a submit says about each job; the insert adds seq, status, created_at and parents_left.
    _SUBMITTED = ("id", "command", "file_id", "file_name", "file_sha256", "working_directory", "timeout", "priority",
                  "priority_rank", "tags", "max_attempts", "retries", "cpus", "memory_mb", "gpus", "after",
                  "submitted_by", "artifact_patterns", "artifacts_when", "input_tree_id", "env")

    _SUBMITTED_NUMBERS = {"timeout", "priority_rank", "max_attempts", "retries", "cpus", "memory_mb", "gpus"}

    def _submitted_value(self, column: str) -> str:
        value = f"json_extract(item.value, '$.{column}')"
        return f"CAST({value} AS BIGINT)" if column in self._SUBMITTED_NUMBERS else value

    async def insert_jobs(self, jobs: list[dict]) -> list[dict]:
        """Queue jobs in the given order, all or none: one statement. Each counts its parents not
        completed yet; the schema's triggers record its parents and count them down as they complete."""
        rows = await self._all(
            f"""INSERT INTO jobs ({', '.join(self._SUBMITTED)}, seq, status, created_at, parents_left)
                SELECT {', '.join(self._submitted_value(c) for c in self._SUBMITTED)},
                       {self._engine.next_seq}, 'queued', :now,
                       (SELECT COUNT(*) FROM json_each(json_extract(item.value, '$.after')) parent
                         WHERE NOT EXISTS (SELECT 1 FROM jobs p WHERE p.id = parent.value AND p.status = 'completed'))
                FROM json_each(:jobs) item ORDER BY item.key RETURNING *""",
            {"jobs": json.dumps([{c: job[c] for c in self._SUBMITTED} for job in jobs]), "now": self._clock.iso()})
        return sorted(rows, key=lambda row: row["seq"])

    async def jobs_by_ids(self, job_ids: list[str]) -> list[dict]:
        return await self._all("SELECT * FROM jobs WHERE id IN (SELECT value FROM json_each(?))",
                               (json.dumps(job_ids),))

    async def queued_children(self, parent_id: str) -> list[dict]:
        """The queued jobs that wait for ``parent_id`` (among others, maybe)."""
        return await self._all("SELECT c.* FROM job_parents e JOIN jobs c ON c.id = e.child_id"
                               " WHERE e.parent_id = ? AND c.status = 'queued' ORDER BY c.seq", (parent_id,))

    async def children_ids(self, parent_id: str, limit: int) -> list[str]:
        rows = await self._all("SELECT c.id FROM job_parents e JOIN jobs c ON c.id = e.child_id WHERE e.parent_id = ?"
                               " ORDER BY c.seq LIMIT ?", (parent_id, limit))
        return [row["id"] for row in rows]

    async def parents_not_completed(self, child_ids: list[str]) -> list[dict]:
        """The parents of these jobs that have not completed (yet), oldest first."""
        return await self._all(
            "SELECT DISTINCT p.* FROM job_parents e JOIN jobs p ON p.id = e.parent_id"
            " WHERE e.child_id IN (SELECT value FROM json_each(?)) AND p.status != 'completed' ORDER BY p.seq",
            (json.dumps(child_ids),))

    # The people with claimable jobs, one index seek each: a loose scan of jobs_ready.
    _OWNERS = """owners(id) AS (
          SELECT MIN(submitted_by) FROM jobs WHERE status = 'queued' AND parents_left = 0
          UNION ALL
          SELECT (SELECT MIN(submitted_by) FROM jobs
                   WHERE status = 'queued' AND parents_left = 0 AND submitted_by > owners.id)
          FROM owners WHERE owners.id IS NOT NULL)"""

    async def queue_estimate(self, job: dict, limit: int) -> dict:
        """About how many claimable jobs the claim will hand out before ``job`` (priority first, then
        fair share: each other person about as many of the same priority as this person has ahead
        of it), counted up to about ``limit`` each; running jobs; the recent mean run time."""
        return await self._one(
            f"""WITH RECURSIVE {self._OWNERS},
                  mine AS (SELECT COUNT(*) AS n FROM (SELECT 1 FROM jobs j WHERE j.status = 'queued'
                             AND j.parents_left = 0 AND j.submitted_by = :owner AND j.priority_rank = :rank
                             AND j.seq < :seq LIMIT :limit) AS m),
                  per_owner AS (SELECT
                      (SELECT COUNT(*) FROM (SELECT 1 FROM jobs j WHERE j.status = 'queued' AND j.parents_left = 0
                         AND j.submitted_by = owners.id AND j.priority_rank > :rank LIMIT :limit) AS h) AS higher,
                      CASE WHEN owners.id = :owner THEN (SELECT n FROM mine)  -- counted once
                           ELSE (SELECT COUNT(*) FROM (SELECT 1 FROM jobs j WHERE j.status = 'queued'
                                   AND j.parents_left = 0 AND j.submitted_by = owners.id AND j.priority_rank = :rank
                                   LIMIT (SELECT n + 1 FROM mine)) AS s) END AS same
                    FROM owners WHERE owners.id IS NOT NULL)
                SELECT (SELECT CAST(COALESCE(SUM(higher + same), 0) AS BIGINT) FROM per_owner) AS ahead,
                       (SELECT COUNT(*) FROM jobs WHERE status = 'running') AS running,
                       (SELECT AVG((julianday(completed_at) - julianday(started_at)) * 86400) FROM
                          (SELECT status, started_at, completed_at FROM jobs WHERE completed_at IS NOT NULL
                           ORDER BY completed_at DESC LIMIT 50) AS newest  -- by jobs_finished, not a scan
                        WHERE status IN ('completed', 'failed') AND started_at IS NOT NULL) AS mean_run""",
            {"owner": job["submitted_by"], "rank": job["priority_rank"], "seq": job["seq"], "limit": limit})

    async def online_kinds(self, cutoff: str) -> list[dict]:
        """The workers heard from since ``cutoff`` that have not said they stop, by kind: one row per
        tags, state and offers, with how many ``workers`` (a farm of like desktops is one row)."""
        return await self._all("SELECT tags, state, reported_pause, cpus, memory_mb, gpus, COUNT(*) AS workers"
                               " FROM workers WHERE last_heartbeat >= ? AND reported_status != 'offline'"
                               " GROUP BY tags, state, reported_pause, cpus, memory_mb, gpus", (cutoff,))

    async def job_by_id(self, job_id: str) -> dict | None:
        return await self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    async def list_jobs(self, *, status: str | None, worker_id: str | None, order: str,
                        limit: int, offset: int) -> tuple[int, list[dict]]:
        params = {"status": status, "worker_id": worker_id, "limit": limit, "offset": offset}
        where = "(CAST(:status AS TEXT) IS NULL OR status = :status) AND (CAST(:worker_id AS TEXT) IS NULL OR worker_id = :worker_id)"
        total = (await self._one(f"SELECT COUNT(*) AS n FROM jobs WHERE {where}", params))["n"]
        rows = await self._all(f"SELECT * FROM jobs WHERE {where} ORDER BY {order} LIMIT :limit OFFSET :offset",
                               params)
        return total, rows

    async def claim_next_job(self, worker_id: str, worker_tags: str, run: str | None, poll: int | None) -> dict | None:
        """Hand the worker, as a new attempt, the best claimable job (its parents completed) whose
        tags it has and that fits what it has free (what it offers, less what its running jobs
        asked), remembering which poll of which agent run asked (see ``unlisted_jobs``).

        Best: the highest priority; then the person with the fewest jobs running, then the one
        served least recently; then the oldest. Each person's first fitting job is found by
        seeks in jobs_ready, so the cost grows with the number of people, not of queued jobs.

        One UPDATE, so two workers polling at once can never both get a job, nor one worker more
        than it has room for; and a worker that may not take jobs (pending approval, paused by an
        admin or by its agent) gets none, whatever its caller believed.

        With several servers, a claim skips the job another server is claiming at that moment (the
        lock); as each person's best job is the only one looked at, that can leave nothing, so a claim
        that found nothing while claimable jobs remain tries again."""
        for _ in range(CLAIM_TRIES if self.shared else 1):
            job = await self._claim_once(worker_id, worker_tags, run, poll)
            if job is not None or not self.shared or not await self._one(
                    "SELECT 1 AS any FROM jobs WHERE status = 'queued' AND parents_left = 0 LIMIT 1"):
                return job
        return None

    async def _claim_once(self, worker_id: str, worker_tags: str, run: str | None, poll: int | None) -> dict | None:
        return await self._one(
            f"""UPDATE jobs SET status = 'running', worker_id = :worker, attempt = attempt + 1, started_at = :now,
                               command_started_at = NULL, claim_run = :run, claim_poll = :poll,
                               stdout_chars = 0, stderr_chars = 0, suspended_at = NULL, suspended_seconds = 0
                WHERE id = (
                  WITH RECURSIVE {self._OWNERS},
                    free AS (SELECT w.cpus - COALESCE(SUM(r.cpus), 0) AS cpus,
                                    w.memory_mb - COALESCE(SUM(r.memory_mb), 0) AS memory_mb,
                                    w.gpus - COALESCE(SUM(r.gpus), 0) AS gpus
                             FROM workers w LEFT JOIN jobs r ON r.worker_id = w.id AND r.status = 'running'
                             WHERE w.id = :worker AND w.state = 'available' AND w.reported_pause IS NULL
                             GROUP BY w.id),
                    firsts AS (SELECT (SELECT j.id FROM jobs j, free
                                        WHERE j.status = 'queued' AND j.parents_left = 0 AND j.submitted_by = owners.id
                                          AND j.cpus <= free.cpus AND j.memory_mb <= free.memory_mb
                                          AND j.gpus <= free.gpus
                                          AND NOT EXISTS (SELECT 1 FROM json_each(j.tags) t
                                                          WHERE t.value NOT IN (SELECT value FROM json_each(:tags)))
                                        ORDER BY j.priority_rank DESC, j.seq LIMIT 1) AS id
                               FROM owners WHERE owners.id IS NOT NULL)
                  SELECT j.id FROM firsts JOIN jobs j ON j.id = firsts.id
                  WHERE j.status = 'queued'  -- read again once locked: another server may have claimed it
                  ORDER BY j.priority_rank DESC,
                           (SELECT COUNT(*) FROM jobs r WHERE r.submitted_by = j.submitted_by AND r.status = 'running'),
                           COALESCE((SELECT MAX(s.started_at) FROM jobs s WHERE s.submitted_by = j.submitted_by), ''),
                           j.seq
                  LIMIT 1 {self._engine.skip_locked})
                AND status = 'queued'
                RETURNING *""",
            {"worker": worker_id, "tags": worker_tags, "now": self._clock.iso(), "run": run, "poll": poll})

    async def release_job(self, job: dict) -> None:
        """Undo a claim that never reached its worker: queued again, as if never handed out."""
        await self._write(
            f"UPDATE jobs SET status = 'queued', worker_id = NULL, started_at = NULL, attempt = attempt - 1"
            f" WHERE {self._HOLDER}", job)

    async def note_command_start(self, job: dict, running_for: float) -> None:
        """The moment the attempt's command started on the worker: the start of its timeout."""
        await self._write(
            f"UPDATE jobs SET command_started_at = :at WHERE {self._HOLDER} AND command_started_at IS NULL",
            {**job, "at": self._clock.iso(-running_for)})

    async def set_suspended(self, job: dict, suspended: bool) -> dict | None:
        """Note that the worker stopped the attempt's processes (or let them run on); the time
        suspended is kept out of its timeout. None if the worker no longer holds it."""
        return await self._one(
            f"""UPDATE jobs SET suspended_at = CASE WHEN :suspended THEN COALESCE(suspended_at, :now) END,
                  suspended_seconds = suspended_seconds + CASE WHEN :suspended OR suspended_at IS NULL THEN 0
                      ELSE (julianday(:now) - julianday(suspended_at)) * 86400 END
                WHERE {self._HOLDER} RETURNING *""", {**job, "suspended": suspended, "now": self._clock.iso()})

    async def append_output(self, job: dict, stream: str, data: str, cap: int) -> int | None:
        """Append a chunk to the attempt's stream if the job's worker still holds it; returns the
        characters the stream had before the chunk (its offset), None if it is not held anymore.
        A stream keeps its first cap/2 characters and its last cap/2; the middle is only counted."""
        counter = f"{stream}_chars"  # stream is stdout or stderr, checked at the edge
        row = await self._one(
            f"UPDATE jobs SET {counter} = {counter} + :size WHERE {self._HOLDER} RETURNING {counter} AS total",
            {**job, "size": len(data)})
        if row is None:
            return None
        job_id, attempt, offset, half = job["id"], job["attempt"], row["total"] - len(data), cap // 2
        head_room = max(0, half - offset)
        insert = "INSERT INTO job_output (job_id, attempt, stream, part, size, data) VALUES (?, ?, ?, ?, ?, ?)"
        if head := data[:head_room]:
            await self._write(insert, (job_id, attempt, stream, "head", len(head), head))
        if tail := data[head_room:][-half:]:
            await self._write(insert, (job_id, attempt, stream, "tail", len(tail), tail))
            if row["total"] > cap:
                await self._write(
                    """DELETE FROM job_output WHERE chunk IN (
                         SELECT chunk FROM (SELECT chunk, SUM(size) OVER (ORDER BY chunk DESC) AS kept
                                            FROM job_output WHERE job_id = ? AND attempt = ? AND stream = ?
                                              AND part = 'tail')
                         AS tail WHERE kept > ?)""", (job_id, attempt, stream, half))
        return offset

    async def output_parts(self, job_id: str, attempt: int) -> dict[tuple[str, str], str]:
        """The kept output of one attempt: {(stream, "head"|"tail"): text}."""
        parts: dict[tuple[str, str], list[str]] = {}
        for row in await self._all("SELECT stream, part, data FROM job_output WHERE job_id = ? AND attempt = ?"
                                   " ORDER BY chunk", (job_id, attempt)):
            parts.setdefault((row["stream"], row["part"]), []).append(row["data"])
        return {key: "".join(chunks) for key, chunks in parts.items()}

    async def set_progress(self, job_id: str, progress: int) -> None:
        await self._write("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'", (progress, job_id))

    # The fences of a change to a job, with the job row as read for parameters: its worker still
    # holds the attempt; or (for a cancel) it has not finished.
    _HOLDER = "id = :id AND status = 'running' AND worker_id = :worker_id AND attempt = :attempt"
    _UNFINISHED = "id = :id AND status IN ('queued', 'running')"

    async def end_attempt(self, job: dict, outcome: "Outcome", *, fence: str = _HOLDER) -> dict | None:
        """Apply an attempt's outcome: the job finishes or goes back to the queue. None if the
        fence no longer holds (another change came first)."""
        return await self._one(
            f"""UPDATE jobs SET status = :status, exit_code = :exit_code, error = :error, progress = NULL,
                  completed_at = CASE WHEN :status = 'queued' THEN NULL ELSE :now END,
                  worker_id = CASE WHEN :status = 'queued' THEN NULL ELSE worker_id END,
                  started_at = CASE WHEN :status = 'queued' THEN NULL ELSE started_at END,
                  retried = retried + :spends_retry, losses = losses + :counts_loss, suspended_at = NULL
                WHERE {fence} RETURNING *""",
            {**job, **dataclasses.asdict(outcome), "now": self._clock.iso()})

    async def jobs_of_lost_workers(self, cutoff: str) -> list[dict]:
        """Running jobs whose worker is offline (no heartbeat since ``cutoff``, or it said it stops) or deleted."""
        return await self._all(
            "SELECT * FROM jobs WHERE status = 'running' AND worker_id NOT IN"
            " (SELECT id FROM workers WHERE last_heartbeat >= ? AND reported_status != 'offline')", (cutoff,))

    async def unlisted_jobs(self, worker_id: str, running: list[str], run: str | None,
                            polled: int | None) -> list[dict]:
        """Running jobs a worker holds but did not list as running. Only those whose claim answer
        it has had: claimed by another run of the agent (or one that names no run), or by a poll
        it says has ended (``polled``). An answer still on its way is not a lost job."""
        return await self._all(
            """SELECT * FROM jobs WHERE worker_id = :worker AND status = 'running'
                 AND id NOT IN (SELECT value FROM json_each(:running))
                 AND (CAST(:run AS TEXT) IS NULL OR claim_run IS NULL OR claim_run != :run OR claim_poll <= :polled)""",
            {"worker": worker_id, "running": json.dumps(running), "run": run, "polled": polled})

    async def overdue_jobs(self, grace: float) -> list[dict]:
        """Running jobs past their timeout plus ``grace`` seconds, counted from their command's
        start, less the time it was suspended. An agent that reports the start (it names its run)
        is not timed while it fetches the input; its lease covers that. For other clients the clock
        starts at the claim."""
        return await self._all(
            """SELECT * FROM jobs WHERE status = 'running'
                 AND (julianday(COALESCE(suspended_at, :now))
                      - julianday(COALESCE(command_started_at, CASE WHEN claim_run IS NULL THEN started_at END)))
                     * 86400 - suspended_seconds > timeout + :grace""", {"now": self._clock.iso(), "grace": grace})


class Store(_UserTables, _WorkerTables, _FileTables, _JobTables):
    """Every SQL statement dispatch runs, on SQLite or PostgreSQL (``await Store.open(path or URL)``)."""


# Each schema version's changes to the one before, for databases written by an older dispatch.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE jobs ADD COLUMN file_sha256 TEXT",
        "ALTER TABLE jobs ADD COLUMN losses INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN claim_run TEXT",
        "ALTER TABLE jobs ADD COLUMN claim_poll INTEGER",
        "ALTER TABLE jobs ADD COLUMN command_started_at TEXT"),
    3: ("ALTER TABLE workers ADD COLUMN state TEXT NOT NULL DEFAULT 'available'"
        " CHECK (state IN ('available', 'paused', 'pending'))",),  # the new api_tokens table: schema.sql
    # What jobs ask and workers offer, and dependencies (job_parents, its triggers and indexes: schema.sql).
    4: ("ALTER TABLE jobs ADD COLUMN cpus INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE jobs ADD COLUMN memory_mb INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN after TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE jobs ADD COLUMN parents_left INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE workers ADD COLUMN cpus INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE workers ADD COLUMN memory_mb INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE workers ADD COLUMN gpus INTEGER NOT NULL DEFAULT 0",
        "UPDATE workers SET cpus = COALESCE(cpu_count, 1), memory_mb = COALESCE(total_memory_mb, 0)"),
    # Artifacts, input trees and env (the blobs, input_trees and tree_blobs tables: schema.sql).
    5: ("ALTER TABLE jobs ADD COLUMN artifact_patterns TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE jobs ADD COLUMN artifacts_when TEXT NOT NULL DEFAULT 'on_success'",
        "ALTER TABLE jobs ADD COLUMN input_tree_id TEXT",
        "ALTER TABLE jobs ADD COLUMN env TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE jobs ADD COLUMN artifacts_attempt INTEGER",
        "ALTER TABLE jobs ADD COLUMN artifacts_size INTEGER",
        "ALTER TABLE jobs ADD COLUMN artifacts_files INTEGER",
        "ALTER TABLE jobs ADD COLUMN artifacts_sha256 TEXT",
        "ALTER TABLE jobs ADD COLUMN artifacts_error TEXT"),
    # Desktops as good guests: an agent's own pause, and suspended jobs.
    6: ("ALTER TABLE workers ADD COLUMN reported_pause TEXT",
        "ALTER TABLE jobs ADD COLUMN suspended_at TEXT",
        "ALTER TABLE jobs ADD COLUMN suspended_seconds REAL NOT NULL DEFAULT 0"),
    # A completed job's children found by their ids, not by a walk of the queue (schema.sql recreates it).
    7: ("DROP TRIGGER IF EXISTS jobs_release_children",),
}


# === Domain: users and credentials ===



@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling: a user (by JWT from a header or the cookie, or by a personal API token) or
    a worker (by its token)."""

    kind: str  # "user" or "worker"
    id: str
    role: str = "worker"  # "admin", "user" or "worker"
    email: str = ""
    via_cookie: bool = False
    jti: str = ""  # the JWT's jti, or the API token's id: what a logout or a revocation ends
    exp: int = 0
    api_token: bool = False
    tags: str = "[]"  # a worker's tags, as stored JSON
    state: str = WorkerState.AVAILABLE.value  # a worker's

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class Tokens:
    """User JWTs: HS256 only, with a persisted secret, revocable by ``jti``."""

    def __init__(self, secret: str):
        self._secret = secret
        self._verified: dict[str, dict] = {}  # token -> claims: a signature is checked once, not per request

    def issue(self, user: dict, now: dt.datetime) -> tuple[str, int]:
        exp = int((now + TOKEN_LIFETIME).timestamp())
        claims = {"sub": user["id"], "role": user["role"], "jti": uuid.uuid4().hex,
                  "iat": int(now.timestamp()), "exp": exp}
        return jwt.encode(claims, self._secret, algorithm="HS256"), exp

    def decode(self, token: str, *, allow_expired_for: dt.timedelta | None = None) -> dict:
        """Verified claims, or Unauthorized. The algorithm is pinned, so ``alg: none`` never passes."""
        known = self._verified.get(token)
        if known is not None and allow_expired_for is None and known["exp"] > time.time():
            return known
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"],
                                options={"require": ["sub", "jti", "exp", "iat"],
                                         "verify_exp": allow_expired_for is None})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Token expired", code="TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("Invalid token", code="INVALID_TOKEN") from None
        if allow_expired_for is not None and claims["exp"] + allow_expired_for.total_seconds() < time.time():
            raise Unauthorized("Token too old to refresh; log in again", code="TOKEN_EXPIRED")
        if len(self._verified) >= VERIFIED_TOKENS_KEPT:
            self._verified.clear()
        self._verified[token] = claims
        return claims


async def _hash_password(password: str, rounds: int) -> str:
    salt = bcrypt.gensalt(rounds=rounds)
    return (await asyncio.to_thread(bcrypt.hashpw, password.encode(), salt)).decode()


async def _check_password(password: str, password_hash: str) -> bool:
    return await asyncio.to_thread(bcrypt.checkpw, password.encode(), password_hash.encode())


def _dummy_password_hash(cost: int) -> str:
    """A well-formed hash that no password matches, to check against when the email is unknown:
    at the cost of the real hashes, it takes as long as a wrong password for a known email."""
    return bcrypt.gensalt(rounds=cost).decode() + "." * 31  # salt, then a digest no password has


def _refuse_long_password(password: str) -> None:
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise _invalid_field("password", f"password must be at most {MAX_PASSWORD_BYTES} bytes (UTF-8)")


async def create_user(store: Store, email: str, password: str, role: str, rounds: int) -> dict:
    """Add a user; Conflict if the email is taken."""
    if not isinstance(email, str) or not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
        raise _invalid_field("email", "email must look like name@host")
    if not isinstance(password, str) or len(password) < 8:
        raise _invalid_field("password", "password must be at least 8 characters")
    _refuse_long_password(password)
    if role not in ("admin", "user"):
        raise _invalid_field("role", "role must be admin or user")
    user = {"id": _new_id("user"), "email": email, "role": role}
    await store.insert_user(user["id"], email, await _hash_password(password, rounds), role)
    return user


async def set_password(store: Store, email: str, password: str, rounds: int) -> None:
    """Give a user a new password (the command line's way back in); NotFound if there is no such user."""
    if not isinstance(password, str) or len(password) < 8:
        raise _invalid_field("password", "password must be at least 8 characters")
    _refuse_long_password(password)
    if not await store.set_password_hash(email, await _hash_password(password, rounds)):
        raise NotFound(f"There is no user {email}")


class RegistrationToken:
    """The token agents register with: pinned by DISPATCH_REGISTRATION_TOKEN, or kept in the data
    dir (SQLite) or the database (PostgreSQL: one for every server), where rotating replaces it.
    The old one stops working at once on the server that rotated it, within a sweep period (a
    second) on the others; registered workers keep their own tokens."""

    def __init__(self, config: Config, store: "Store"):
        self.pinned = bool(config.registration_token)
        self._path = config.data_path / "registration_token"
        self._store = store if store.shared else None
        self.value = config.registration_token

    async def load(self) -> None:
        """Read the token, made on the first start."""
        if self.pinned:
            return
        if self._store is None:
            self.value = _read_or_create_secret(self._path, self._new)
        else:
            self.value = await self._store.shared_secret("registration_token", self._new())

    async def refresh(self) -> None:
        """With PostgreSQL, read it again (each sweep period): another server may have rotated it."""
        if self._store is not None and not self.pinned:
            self.value = await self._store.secret("registration_token")

    @staticmethod
    def _new() -> str:
        return secrets.token_urlsafe(24)

    def matches(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(), self.value.encode())

    async def rotate(self) -> str:
        if self.pinned:
            raise Conflict("The registration token is set by DISPATCH_REGISTRATION_TOKEN: change it there and "
                           "restart the server", code="REGISTRATION_TOKEN_PINNED")
        value = self._new()
        if self._store is None:
            _replace_secret(self._path, value)
        else:
            await self._store.replace_shared_secret("registration_token", value)
        self.value = value
        return value


# === Domain: input rules ===


def _require_string(body: dict, field: str, *, required: bool = True, max_length: int = 1024) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise _invalid_field(field, f"{field} is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise _invalid_field(field, f"{field} must be a non-empty string")
    if len(value.encode()) > max_length:
        raise _invalid_field(field, f"{field} is longer than {max_length} bytes")
    return value


def _optional_int(body: dict, field: str, *, minimum: int = 0, maximum: int = 2**53) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _invalid_field(field, f"{field} must be a whole number from {minimum} to {maximum}")
    return value


def _validate_tags(value: Any, field: str = "tags") -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_TAGS or not all(
            isinstance(t, str) and 0 < len(t) <= MAX_TAG_LENGTH for t in value):
        raise _invalid_field(field, f"{field} must be a list of at most {MAX_TAGS} non-empty strings "
                                    f"of up to {MAX_TAG_LENGTH} characters")
    return sorted(set(value))


def _validate_resources(body: dict, defaults: dict[str, Optional[int]]) -> dict[str, Optional[int]]:
    """What a body asks (a job) or offers (a worker), by column: whole numbers within each
    resource's range; ``defaults`` (by column) for what it does not say."""
    amounts = {}
    for resource in RESOURCES:
        amount = _optional_int(body, resource.field, minimum=resource.minimum, maximum=resource.maximum)
        amounts[resource.column] = defaults[resource.column] if amount is None else amount
    return amounts


def _validate_after(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_PARENTS or not all(
            isinstance(j, str) and 0 < len(j) <= 128 for j in value):
        raise _invalid_field("after", f"after must be a list of at most {MAX_PARENTS} job ids")
    return list(dict.fromkeys(value))


def _validate_working_directory(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 1024:
        raise _invalid_field("workingDirectory", "workingDirectory must be a relative path")
    parts = value.replace("\\", "/").split("/")
    if (value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value) or ".." in parts
            or any(ord(c) < 32 for c in value)):
        raise _invalid_field("workingDirectory",
                             "workingDirectory must be a relative path inside the project, without '..'")
    return "/".join(p for p in parts if p not in ("", ".")) or None


def _validate_timeout(value: Any) -> int:
    if value is None:
        return 600
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_JOB_TIMEOUT:
        raise _invalid_field("timeout", f"timeout must be a positive number of seconds up to {MAX_JOB_TIMEOUT}")
    return math.ceil(value)


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def _relative_path_problem(path: str) -> Optional[str]:
    """Why ``path`` (a tree entry or an artifacts pattern) could reach outside the folder it is
    relative to, or could not be a file name anywhere; None if it cannot. The rules of the agent's
    zip entries: no absolute path, drive letter, backslash, '..' or control character."""
    if not path:
        return "is empty"
    if path.startswith("/"):
        return "is an absolute path"
    if re.match(r"[A-Za-z]:", path):
        return "starts with a drive letter"
    if "\\" in path:
        return "contains a backslash"
    if ".." in path.split("/"):
        return "climbs out with '..'"
    if _CONTROL_CHARACTER.search(path):
        return "contains a control character"
    return None


def _validate_artifacts(body: dict) -> tuple[list[str], str]:
    """The artifacts patterns (relative to the working directory; they may not leave it) and when
    to collect them."""
    patterns = body.get("artifacts")
    if patterns is None:
        patterns = []
    if not isinstance(patterns, list) or len(patterns) > MAX_ARTIFACT_PATTERNS or not all(
            isinstance(p, str) and 0 < len(p) <= 1024 for p in patterns):
        raise _invalid_field("artifacts", f"artifacts must be a list of at most {MAX_ARTIFACT_PATTERNS} glob "
                                          "patterns (\"dist/**\", \"report.xml\")")
    for pattern in patterns:
        if problem := _relative_path_problem(pattern):
            raise _invalid_field("artifacts", f"artifacts pattern {pattern!r} {problem}: patterns are relative "
                                              "to the working directory and may not leave it")
    when = body.get("artifactsWhen", "on_success")
    if when not in ARTIFACTS_WHEN:
        raise _invalid_field("artifactsWhen", f"artifactsWhen must be one of {', '.join(ARTIFACTS_WHEN)}")
    return list(dict.fromkeys(patterns)), when


def _validate_env(value: Any) -> dict[str, str]:
    """Variables for the job's environment: names like shell variables, none of dispatch's own."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ENV_VARS:
        raise _invalid_field("env", f"env must be an object of at most {MAX_ENV_VARS} names to string values")
    size = 0
    for name, text in value.items():
        if not ENV_NAME_PATTERN.fullmatch(name) or len(name) > 256:
            raise _invalid_field("env", f"env name {name[:50]!r} must be letters, digits and '_', not starting "
                                        "with a digit")
        if name.upper().startswith("DISPATCH_"):
            raise _invalid_field("env", f"env name {name} is reserved: dispatch sets DISPATCH_* itself")
        if not isinstance(text, str) or "\0" in text:
            raise _invalid_field("env", f"env value of {name} must be a string without NUL characters")
        size += len(name.encode()) + len(text.encode())
    if size > MAX_ENV_BYTES:
        raise _invalid_field("env", f"env is larger than {MAX_ENV_BYTES} bytes (names and values)")
    return value


def _validate_input_tree(value: Any) -> tuple[str, str, int, int]:
    """A checked input tree: (its canonical JSON, its id, files, bytes). Paths follow the rules of
    zip entries; each blob's existence, size and owner are checked by ``Jobs.submit``."""
    def bad(message: str) -> InvalidRequest:
        return _invalid_field("inputTree", f"inputTree {message}")

    if not isinstance(value, list) or not 1 <= len(value) <= MAX_TREE_ENTRIES:
        raise bad(f"must be a list of 1 to {MAX_TREE_ENTRIES} files, each {{\"path\", \"sha256\", \"size\", \"mode\"}}")
    entries, paths = [], set()
    for index, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) - {"path", "sha256", "size", "mode"}:
            raise bad(f"[{index}] must be an object with path, sha256, size and mode")
        path, sha256, size, mode = entry.get("path"), entry.get("sha256"), entry.get("size"), entry.get("mode", 0o644)
        if not isinstance(path, str) or len(path.encode()) > MAX_TREE_PATH_BYTES:
            raise bad(f"[{index}].path must be a string of at most {MAX_TREE_PATH_BYTES} bytes")
        parts = path.split("/")
        problem = _relative_path_problem(path) or (
            "is not normalized (an empty or '.' part)" if any(p in ("", ".") for p in parts) else None)
        if problem:
            raise bad(f"[{index}].path {path!r} {problem}")
        if not isinstance(sha256, str) or not SHA256_PATTERN.fullmatch(sha256):
            raise bad(f"[{index}].sha256 must be 64 lowercase hex digits")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 2**53:
            raise bad(f"[{index}].size must be the file's size in bytes")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise bad(f"[{index}].mode must be a file mode from 0 to 0o7777 (only the executable bits are used)")
        if path in paths:
            raise bad(f"names {path!r} twice")
        paths.add(path)
        entries.append({"path": path, "sha256": sha256, "size": size, "mode": mode})
    for path in paths:  # a file may not also be a folder of another
        for cut in range(1, path.count("/") + 1):
            if (folder := path.rsplit("/", cut)[0]) in paths:
                raise bad(f"names {folder!r} as a file and as the folder of {path!r}")
    entries.sort(key=lambda e: e["path"])
    tree = json.dumps(entries, separators=(",", ":"))
    return tree, hashlib.sha256(tree.encode()).hexdigest(), len(entries), sum(e["size"] for e in entries)


def _upload_url(file_id: str, name: str) -> str:
    return UPLOAD_ROUTE.format(file_id=file_id, name=urllib.parse.quote(name))


def _upload_key(file_id: str, name: str) -> str:
    """Where an upload is kept: a folder of its own, under its clean name."""
    return f"uploads/{file_id}/{name}"


_UPLOAD_PATH = re.compile(UPLOAD_ROUTE.format(file_id=f"({FILE_ID_PATTERN.pattern})", name="([^/]+)"))


def _parse_upload_url(url: Any, allowed_hosts: set[str]) -> tuple[str, str]:
    """(file id, name) from a URL this server handed out for an upload, or InvalidRequest."""
    if not isinstance(url, str):
        raise _invalid_field("fileUrl", "fileUrl must be a string")
    parsed = urllib.parse.urlsplit(url)
    match = _UPLOAD_PATH.fullmatch(parsed.path)
    foreign = (parsed.scheme or parsed.netloc) and (parsed.scheme not in ("http", "https")
                                                    or parsed.netloc not in allowed_hosts)
    if not match or foreign or parsed.query or parsed.fragment:
        raise _invalid_field("fileUrl", "fileUrl must be an upload URL from /api/files/upload "
                                        "(/uploads/<fileId>/<name>)")
    return match.group(1), urllib.parse.unquote(match.group(2))


def _safe_filename(name: str | None) -> str:
    """The last path component with control and quote characters removed (never a path), cut to
    MAX_FILENAME_BYTES of UTF-8 (filesystems count bytes, not characters); a cut keeps the
    extension, so a .zip stays a .zip."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and c not in '"<>|:*?').strip(" .")
    if len(name.encode()) > MAX_FILENAME_BYTES:
        stem, extension = os.path.splitext(name)
        if len(extension.encode()) > 32:  # a dot somewhere in a long name, not an extension
            stem, extension = name, ""
        room = MAX_FILENAME_BYTES - len(extension.encode())
        name = stem.encode()[:room].decode(errors="ignore").rstrip(" .") + extension
    return name or "upload.bin"


def _file_is_readable_by(principal: Principal, record: dict) -> bool:
    return principal.kind == "user" and (principal.is_admin or record["owner_id"] == principal.id)



# === Domain: how an attempt ends, and how jobs and workers show ===


class Ending(Enum):
    """How an attempt ended."""

    EXITED = "exited"  # the worker reported an exit code
    TIMED_OUT = "timed out"  # the server's backstop: far past the timeout with no result
    LOST = "lost"  # its worker went offline or was deleted: counts against maxAttempts
    RETURNED = "returned"  # a live worker does not run it (its claim answer was lost, it restarted)
    EVICTED = "evicted"  # its worker killed it to make way for the desktop's owner, and gave it back
    CANCELLED = "cancelled"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What an attempt's end does to its job: the new state, and what it spends."""

    status: str
    exit_code: Optional[int] = None
    error: Optional[str] = None
    spends_retry: bool = False
    counts_loss: bool = False


def decide_outcome(job: dict, ending: Ending, exit_code: Optional[int] = None, error: Optional[str] = None) -> Outcome:
    """The one rule for every way an attempt ends, whoever noticed it. A timeout is exit 124
    whichever side saw it; a non-zero exit spends a retry while any are left; a lost worker
    costs one of ``maxAttempts``; a job handed back by a live worker, or evicted by it (``error``
    says why), costs nothing."""
    attempt, worker = job["attempt"], job["worker_id"]
    if ending is Ending.CANCELLED:
        return Outcome(JobState.CANCELLED.value, error=error)
    if ending is Ending.RETURNED:
        return Outcome(JobState.QUEUED.value, error=f"worker {worker} no longer runs attempt {attempt}; requeued")
    if ending is Ending.EVICTED:
        return Outcome(JobState.QUEUED.value, error=f"attempt {attempt} evicted from {worker} ({error}); requeued")
    if ending is Ending.LOST:
        if job["losses"] + 1 < job["max_attempts"]:
            return Outcome(JobState.QUEUED.value, error=f"worker {worker} lost; requeued", counts_loss=True)
        return Outcome(JobState.FAILED.value, error="worker lost", counts_loss=True)
    if ending is Ending.TIMED_OUT:
        exit_code, error = EXIT_TIMEOUT, f"timed out after {job['timeout']} s (no result from the worker)"
    if exit_code == 0:  # an error here is a note, such as artifacts that were too big
        return Outcome(JobState.COMPLETED.value, exit_code=0, error=error)
    error = error or f"exited with code {exit_code}"
    if job["retried"] < job["retries"]:
        return Outcome(JobState.QUEUED.value, exit_code, f"attempt {attempt}: {error}; retrying", spends_retry=True)
    return Outcome(JobState.FAILED.value, exit_code, error)


# Every job field the API shows, by its API name: the one place a job row becomes JSON.
JOB_FIELDS: dict[str, Callable[[dict], Any]] = {
    "jobId": lambda job: job["id"],
    "command": lambda job: job["command"],
    "status": lambda job: job["status"],
    "workerId": lambda job: job["worker_id"],
    "priority": lambda job: job["priority"],
    "tags": lambda job: json.loads(job["tags"]),
    "createdAt": lambda job: job["created_at"],
    "startedAt": lambda job: job["started_at"],
    "completedAt": lambda job: job["completed_at"],
    "exitCode": lambda job: job["exit_code"],
    "error": lambda job: job["error"],
    "progress": lambda job: job["progress"],
    "timeout": lambda job: job["timeout"],
    "workingDirectory": lambda job: job["working_directory"],
    "attempt": lambda job: job["attempt"],
    "attempts": lambda job: job["attempt"],
    "fileUrl": lambda job: _upload_url(job["file_id"], job["file_name"]) if job["file_id"] else None,
    "fileId": lambda job: job["file_id"],
    "sha256": lambda job: job["file_sha256"],
    "stdoutChars": lambda job: job["stdout_chars"],
    "stderrChars": lambda job: job["stderr_chars"],
    "suspended": lambda job: job["suspended_at"] is not None,
    "cpus": lambda job: job["cpus"],
    "memoryMb": lambda job: job["memory_mb"],
    "gpus": lambda job: job["gpus"],
    "after": lambda job: json.loads(job["after"]),
    "artifactPatterns": lambda job: json.loads(job["artifact_patterns"]),
    "artifactsWhen": lambda job: job["artifacts_when"],
    "artifacts": lambda job: _artifacts_json(job),
    "env": lambda job: json.loads(job["env"]),
    "inputTree": lambda job: job.get("input_tree"),  # loaded by Jobs.claim (a tree may hold 100,000 files)
}
# The shapes: a list row, the status answer (plus output, waitingFor and children), a state event,
# and what a worker gets.
JOB_SUMMARY = ("jobId", "command", "status", "workerId", "priority", "tags", "createdAt", "startedAt",
               "completedAt", "exitCode", "error", "suspended")
JOB_STATUS = JOB_SUMMARY + ("progress", "timeout", "workingDirectory", "attempts", "fileUrl",
                            "stdoutChars", "stderrChars", "cpus", "memoryMb", "gpus", "after",
                            "artifactPatterns", "artifactsWhen", "artifacts", "env")
JOB_EVENT = ("jobId", "status", "command", "workerId", "priority", "attempt", "exitCode", "error", "createdAt",
             "startedAt", "completedAt", "artifacts", "suspended")
JOB_FOR_WORKER = ("jobId", "command", "fileUrl", "fileId", "sha256", "workingDirectory", "timeout", "attempt",
                  "tags", "cpus", "inputTree", "artifactPatterns", "artifactsWhen", "env")
CHILDREN_SHOWN = 1000  # children listed in a job's status

# The WebSocket event type that announces each job state.
STATE_EVENTS = {"queued": "job.queued", "running": "job.started", "completed": "job.completed",
                "failed": "job.completed", "cancelled": "job.cancelled"}


def job_json(job: dict, fields: tuple[str, ...]) -> dict:
    return {name: JOB_FIELDS[name](job) for name in fields}


def _artifacts_json(job: dict) -> Optional[dict]:
    """The current attempt's artifacts zip (where to get it, its size, files and sha256), or None."""
    if job["artifacts_attempt"] != job["attempt"] or job["artifacts_size"] is None:
        return None
    return {"url": ARTIFACTS_PATH + "?jobId=" + urllib.parse.quote(job["id"], safe=""),
            "size": job["artifacts_size"], "files": job["artifacts_files"], "sha256": job["artifacts_sha256"]}


def _artifacts_key(job_id: str, attempt: int) -> str:
    """Where an attempt's artifacts zip is kept (job ids are ``job-<hex>``: safe as file names)."""
    return f"artifacts/{job_id}.{attempt}.zip"


def job_event(job: dict) -> dict:
    """The event that tells a job's new state (one shape for all of them)."""
    return {"type": STATE_EVENTS[job["status"]], **job_json(job, JOB_EVENT)}


def worker_state(row: dict) -> tuple[str, Optional[str]]:
    """Whether a worker takes jobs, as shown (``state``, ``pausedReason``): pending, or paused by
    an admin, before what its agent says (paused for its owner: "owner active", "draining", ...)."""
    if row["state"] == WorkerState.PAUSED:
        return WorkerState.PAUSED.value, "paused by an admin"
    if row["state"] == WorkerState.AVAILABLE and row["reported_pause"]:
        return WorkerState.PAUSED.value, row["reported_pause"]
    return row["state"], None


def _worker_json(row: dict, *, detail: bool) -> dict:
    """A worker (a row of ``Store._WORKER_VIEW``) as the API and its events show it."""
    state, paused_reason = worker_state(row)
    worker = {"workerId": row["id"], "hostname": row["hostname"], "cpuCount": row["cpu_count"],
              "totalMemoryMb": row["total_memory_mb"], "status": row["status"],
              "activity": row["reported_status"], "lastHeartbeat": row["last_heartbeat"],
              "registeredAt": row["registered_at"], "currentJobId": row["current_job_id"],
              "jobsCompleted": row["jobs_completed"], "tags": json.loads(row["tags"]), "state": state,
              "pausedReason": paused_reason, **{r.field: row[r.column] for r in RESOURCES}}
    if detail:
        worker["metadata"] = json.loads(row["metadata"])
    return worker


def joined_output(job: dict, parts: dict[tuple[str, str], str]) -> dict[str, str]:
    """Each stream of the job's current attempt as one text; where output past the cap was
    dropped, a visible marker stands between the head and the tail."""
    output = {}
    for stream in ("stdout", "stderr"):
        head, tail = parts.get((stream, "head"), ""), parts.get((stream, "tail"), "")
        dropped = job[f"{stream}_chars"] - len(head) - len(tail)
        marker = f"\n[... dispatch dropped {dropped} characters of {stream} here (output cap) ...]\n"
        output[stream] = head + (marker if dropped > 0 else "") + tail
    return output


def workers_that_fit(job: dict, workers: list[dict]) -> tuple[list[dict], Optional[str]]:
    """The workers (rows with tags and offers) the job fits when idle; when none, why not, in one line."""
    tags = json.loads(job["tags"])
    fitting = [w for w in workers if set(tags) <= set(json.loads(w["tags"]))]
    if not fitting:
        return [], f"no online worker has tags {', '.join(tags)}" if tags else "no online worker"
    for resource in RESOURCES:
        enough = [w for w in fitting if w[resource.column] >= job[resource.column]]
        if not enough:
            largest = max(w[resource.column] for w in fitting)
            return [], f"needs {job[resource.column]} {resource.unit}; the largest online worker offers {largest}"
        fitting = enough
    return fitting, None


def _not_a_parent(entry: str, status: Optional[str], owner: Principal) -> str:
    """Why an ``after`` entry (with the status of the job it names, None if none the owner may see)
    cannot be a parent."""
    if entry.startswith("#"):
        return "must name an earlier item of a batch submit"
    if status is None:
        return "is not a job" + ("" if owner.is_admin else " of yours")
    return f"is {status}, so it will never complete"


# === Domain: the job life cycle ===


class Jobs:
    """The job life cycle: submit, claim, output, finish, retry, cancel, leases and the sweeps.
    Every change goes through here, is fenced in the database, and is announced to ``events``
    (an ``Announcer``: ``job_changed(job)``, ``job_ready(job)`` for a queued job whose last parent
    completed, ``output(job, stream, data, offset)``, ``job_suspended(job)`` when its worker stops or
    resumes it, and what the workers look like now)."""

    def __init__(self, store: Store, config: Config, clock: Clock, events: Announcer):
        self._store = store
        self._config = config
        self._clock = clock
        self._events = events
        # One lock per job for its worker's writes: check-then-append-then-finish is several
        # statements, and a second result or chunk must not slip in between them.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._swept_cutoff: Optional[str] = None  # the offline cutoff at the last sweep
        self._heartbeats_told_at = clock.now()  # the last heartbeat summary
        self._kinds_seen: tuple[float, int, list[dict]] = (-math.inf, -1, [])  # see _online_kinds

    @property
    def timeout_grace(self) -> float:
        """How long past its timeout a running job may go before the server ends it: enough for
        the agent to kill the job and report, plus the time it takes to notice a dead worker."""
        return 3 * self._config.heartbeat_interval + 5

    def heartbeat_cutoff(self) -> str:
        """Workers whose last heartbeat is older than this are offline (three missed)."""
        return self._clock.iso(-3 * self._config.heartbeat_interval)

    def _lock(self, job_id: str) -> asyncio.Lock:
        lock = self._locks.get(job_id)
        if lock is None:
            lock = self._locks[job_id] = asyncio.Lock()
        return lock

    # -- submit and read ------------------------------------------------------

    async def submit(self, owner: Principal, specs: list[dict], *, batch: bool = False) -> list[dict]:
        """Queue jobs in order, all or none. ``specs`` hold checked fields. A job's input, if any,
        must be the owner's, and so must the jobs it runs after (an admin's may be anyone's); in a
        batch, ``after`` may name an earlier item as "#<index>", and an error names the item."""
        ids = [_new_id("job") for _ in specs]
        parents = await self._resolve_after(owner, specs, ids, batch)
        inputs = {spec["file"][0]: None for spec in specs if spec["file"]}  # a batch often shares one input
        for file_id in inputs:
            inputs[file_id] = await self._store.file_by_id(file_id)
        trees = {}  # tree id -> the index of the first job that gives it
        for index, spec in enumerate(specs):
            if spec["tree"] and spec["tree"][1] not in trees:
                trees[spec["tree"][1]] = index
                await self._check_tree(owner, spec["tree"][0], index if batch else None)
        rows = []
        for index, (spec, job_id) in enumerate(zip(specs, ids)):
            file_id, file_name = spec["file"] or (None, None)
            record = inputs.get(file_id)
            if file_id and (record is None or record["name"] != file_name or not _file_is_readable_by(owner, record)):
                raise _invalid_item(index if batch else None, "fileUrl",
                                    "fileUrl names no file you uploaded (or it has expired)")
            rows.append({**spec, "id": job_id, "file_id": file_id, "file_name": file_name,
                         "file_sha256": record and record["sha256"], "priority_rank": PRIORITY_RANK[spec["priority"]],
                         "tags": json.dumps(spec["tags"]), "after": json.dumps(parents[index]),
                         "submitted_by": owner.id, "artifact_patterns": json.dumps(spec["artifact_patterns"]),
                         "env": json.dumps(spec["env"]), "input_tree_id": spec["tree"] and spec["tree"][1]})
        for spec in {spec["tree"][1]: spec for spec in specs if spec["tree"]}.values():
            await self._store.keep_tree(spec["tree"][1], spec["tree"][0], spec["tree"][2], spec["tree"][3])
        jobs = await self._store.insert_jobs(rows)
        for job in jobs:
            self._events.job_changed(job)
        waiting = [job["id"] for job in jobs if job["parents_left"]]
        parents_left = await self._store.parents_not_completed(waiting) if waiting else []
        for parent in parents_left:
            if parent["status"] in (JobState.FAILED, JobState.CANCELLED):  # it ended since _resolve_after looked
                await self._cancel_children(parent)
        return jobs

    async def _check_tree(self, owner: Principal, tree: str, index: Optional[int]) -> None:
        """Every blob of an input tree must be stored, of the size the tree says, and the owner's to
        use (an admin may use any): knowing a hash is not having the content."""
        problem = await self._store.tree_problem(tree, None if owner.is_admin else owner.id)
        if problem is None:
            return
        path, sha256 = problem["path"], problem["sha256"]
        if problem["stored_size"] is None or not problem["usable"]:
            reason = f"names blob {sha256} (for {path!r}), which is not stored or not yours: PUT it first"
        else:
            reason = f"says {path!r} has {problem['size']} bytes, but blob {sha256} has {problem['stored_size']}"
        raise _invalid_item(index, "inputTree", f"inputTree {reason}")

    async def _resolve_after(self, owner: Principal, specs: list[dict], ids: list[str], batch: bool) -> list[list[str]]:
        """Each spec's ``after`` as job ids: "#<index>" is an earlier item of the batch, any other id
        a job the owner may wait for. Parents always exist before their children, so no cycle can form."""
        named = sorted({entry for spec in specs for entry in spec["after"] if not entry.startswith("#")})
        allowed = {job["id"]: job["status"] for job in (await self._store.jobs_by_ids(named) if named else ())
                   if owner.is_admin or job["submitted_by"] == owner.id}
        resolved = []
        for index, spec in enumerate(specs):
            parents = []
            for entry in spec["after"]:
                earlier = re.fullmatch(r"#([0-9]{1,4})", entry)
                if earlier and batch and int(earlier[1]) < index:
                    parents.append(ids[int(earlier[1])])
                elif allowed.get(entry) in (JobState.QUEUED, JobState.RUNNING, JobState.COMPLETED):
                    parents.append(entry)
                else:
                    raise _invalid_item(index if batch else None, "after",
                                        f"after: {entry} {_not_a_parent(entry, allowed.get(entry), owner)}")
            resolved.append(list(dict.fromkeys(parents)))  # "#1" and "#01" are one parent
        return resolved

    async def why_waiting(self, job: dict, *, recent: bool = False) -> tuple[str, Optional[int]]:
        """What holds a queued job, in one line, and about how many seconds until it starts (None
        when no worker can take it now): its parents, then the online workers (tags, offers,
        state; ``recent``: as seen up to a second ago), then the jobs the claim will hand out
        first, at the recent mean run time, shared among the workers it fits."""
        if job["parents_left"] and (parents := await self._store.parents_not_completed([job["id"]])):
            more = f" and {len(parents) - 1} more" if len(parents) > 1 else ""
            return f"waiting for {parents[0]['id']} ({parents[0]['status']}){more}", None
        fitting, reason = workers_that_fit(job, await self._online_kinds(recent))
        if reason:
            return reason, None
        shown = [worker_state(w) for w in fitting]
        available = sum(w["workers"] for w, (state, _) in zip(fitting, shown) if state == WorkerState.AVAILABLE)
        if not available:
            states = ", ".join(sorted({state for state, _ in shown}))
            reasons = "; ".join(sorted({reason for _, reason in shown if reason}))
            return f"workers {states}" + (f" ({reasons})" if reasons else ""), None
        estimate = await self._store.queue_estimate(job, AHEAD_COUNT_LIMIT)
        ahead = min(estimate["ahead"], AHEAD_COUNT_LIMIT)
        line = (f"{ahead}{'+' if ahead == AHEAD_COUNT_LIMIT else ''} job{'s' if ahead != 1 else ''} ahead"
                if ahead else "next in line")
        waiting_for = ahead + estimate["running"] - available + 1
        return line, max(0, math.ceil(waiting_for * (estimate["mean_run"] or 0) / available))

    async def _online_kinds(self, recent: bool) -> list[dict]:
        """The online workers by kind (``Store.online_kinds``). ``recent``: a summary up to a second
        old will do, unless a worker registered, changed state or was deleted since on this server
        (a submit's estimate: with thousands of workers, reading them was most of a submit's cost)."""
        taken_at, changes, kinds = self._kinds_seen
        if recent and changes == self._store.worker_changes and time.monotonic() - taken_at < 1.0:
            return kinds
        changes = self._store.worker_changes
        kinds = await self._store.online_kinds(self.heartbeat_cutoff())
        self._kinds_seen = (time.monotonic(), changes, kinds)
        return kinds

    async def claimable(self, job_id: Optional[str]) -> bool:
        """Whether the job (None: one not named) may still be claimed."""
        if job_id is None:
            return True
        job = await self._store.job_by_id(job_id)
        return job is not None and job["status"] == JobState.QUEUED and not job["parents_left"]

    async def find(self, job_id: str) -> dict:
        job = await self._store.job_by_id(job_id)
        if job is None:
            raise NotFound("Job not found")
        return job

    async def status(self, job_id: str) -> dict:
        """The status answer's job: its fields, the current attempt's output, what it waits for
        (queued only) and the jobs that run after it."""
        job = await self.find(job_id)
        output = joined_output(job, await self._store.output_parts(job_id, job["attempt"]))
        waiting_for = (await self.why_waiting(job))[0] if job["status"] == JobState.QUEUED else None
        return {**job_json(job, JOB_STATUS), **output, "waitingFor": waiting_for,
                "children": await self._store.children_ids(job_id, CHILDREN_SHOWN)}

    # -- claim -----------------------------------------------------------------

    async def claim(self, worker: Principal, run: Optional[str], poll: Optional[int]) -> dict | None:
        """The best queued job for the worker, as its new attempt (not announced yet: see
        ``deliver`` and ``release``). A job given as an input tree comes with the tree."""
        job = await self._store.claim_next_job(worker.id, worker.tags, run, poll)
        if job is not None and job["input_tree_id"]:
            job["input_tree"] = await self._store.tree_by_id(job["input_tree_id"])
        return job

    async def deliver(self, job: dict) -> None:
        """The claim's answer is on its way to the worker."""
        self._events.job_changed(job)
        await self.announce_worker(job["worker_id"])

    async def release(self, job: dict) -> None:
        """The worker hung up before the answer: the job goes back untouched."""
        await self._store.release_job(job)

    # -- a worker's reports ----------------------------------------------------

    async def _held(self, worker: Principal, job_id: str, attempt: Optional[int]) -> dict:
        """The running job and attempt the worker holds, or 404/409."""
        job = await self.find(job_id)
        if job["worker_id"] != worker.id or job["status"] != JobState.RUNNING or attempt not in (None, job["attempt"]):
            raise _not_holder()
        return job

    async def _record(self, job: dict, stream: str, data: str, running_for: Optional[float]) -> None:
        if running_for is not None and job["command_started_at"] is None:
            await self._store.note_command_start(job, running_for)
        if data:
            cap = self._config.max_output_mb * 1024 * 1024
            offset = await self._store.append_output(job, stream, data, cap)
            if offset is None:
                raise _not_holder()
            self._events.output(job, stream, data, offset)

    async def record_output(self, worker: Principal, job_id: str, attempt: Optional[int], stream: str, data: str,
                            progress: Optional[int], running_for: Optional[float], suspended: Optional[bool]) -> None:
        """Append a chunk. An empty one is a keep-alive whose 409 tells the worker the job is no
        longer its own (cancelled, or given to another attempt). ``suspended`` (None: not said)
        is whether the worker has stopped the job's processes for now."""
        async with self._lock(job_id):
            job = await self._held(worker, job_id, attempt)
            if suspended is not None and suspended != (job["suspended_at"] is not None):
                if changed := await self._store.set_suspended(job, suspended):
                    self._events.job_suspended(changed)
            await self._record(job, stream, data, running_for)
            if progress is not None:
                await self._store.set_progress(job_id, progress)

    async def finish(self, worker: Principal, job_id: str, attempt: Optional[int], exit_code: int,
                     error: Optional[str], output: dict[str, str], evicted: Optional[str]) -> None:
        """The worker's final word on its attempt; its output is appended to what was streamed.
        ``evicted`` says why the worker killed it to make way for its owner: it goes back to the queue."""
        async with self._lock(job_id):
            job = await self._held(worker, job_id, attempt)
            for stream, data in output.items():
                await self._record(job, stream, data, None)
            outcome = (decide_outcome(job, Ending.EVICTED, error=evicted) if evicted
                       else decide_outcome(job, Ending.EXITED, exit_code, error))
            note = job["artifacts_error"] if job["artifacts_attempt"] == job["attempt"] else None
            if note and note not in (outcome.error or ""):  # the server refused the artifacts: the job says why
                outcome = dataclasses.replace(outcome, error=f"{outcome.error}; {note}" if outcome.error else note)
            ended = await self._store.end_attempt(job, outcome)
        if ended is None:  # cancelled or lost between the check and the write
            raise _not_holder()
        await self._announce_end(ended, worker.id)

    async def held(self, worker: Principal, job_id: str, attempt: Optional[int]) -> dict:
        """The running job the worker holds (that attempt, if given): before it sends the job's
        artifacts or fetches its input. 404/409 otherwise."""
        return await self._held(worker, job_id, attempt)

    async def record_artifacts(self, worker: Principal, job_id: str, attempt: Optional[int],
                               artifacts: dict) -> dict:
        """Keep the attempt's artifacts ({"size", "files", "sha256"}, the zip already in place) or
        why it has none ({"artifacts_error"}); the job as it is now. 409 unless the worker holds it."""
        async with self._lock(job_id):  # not between the worker's result and its check
            job = await self._held(worker, job_id, attempt)
            updated = await self._store.record_artifacts(job, artifacts)
        if updated is None:
            raise _not_holder()
        return updated

    async def cancel(self, principal: Principal, job_id: str) -> None:
        """Cancel a queued or running job (its submitter or an admin). A running job's worker
        learns it at its next output call (a 409) and kills the job's process tree."""
        job = await self.find(job_id)
        if job["submitted_by"] != principal.id and not principal.is_admin:
            raise Forbidden("Only the submitter or an admin may cancel a job")
        outcome = decide_outcome(job, Ending.CANCELLED, error=f"cancelled by {principal.email}")
        async with self._lock(job_id):  # not between a worker's final chunk and its result
            cancelled = await self._store.end_attempt(job, outcome, fence=Store._UNFINISHED)
        if cancelled is None:
            raise Conflict(f"Job already {(await self.find(job_id))['status']}", code="JOB_FINISHED")
        await self._announce_end(cancelled, job["worker_id"])

    async def heartbeat(self, worker: Principal, status: str, running: Optional[list[str]], run: Optional[str],
                        polled: Optional[int], offers: dict[str, Optional[int]], state: Optional[str],
                        paused_reason: Optional[str]) -> str:
        """A worker is alive (returns the time noted), and offers this now (by column; None: as
        before); status "offline" is its agent's last word. ``state`` (None: not said) is whether
        its agent takes jobs now, or pauses for ``paused_reason``. With ``running`` (the jobs it runs or
        holds a result for), the jobs it holds but no longer runs go back to the queue, without
        counting against them. A change the page would show is announced; the heartbeat itself only
        in the next summary (see ``sweep``)."""
        before = await self._worker_as_shown(worker.id)
        now = await self._store.record_heartbeat(worker.id, status, offers)
        if state is not None:
            reason = (paused_reason or "paused by its agent") if state == WorkerState.PAUSED else None
            if await self._store.report_pause(worker.id, reason) and reason is None:
                self._events.worker_free(worker.id)
        if running is not None:
            for job in await self._store.unlisted_jobs(worker.id, running, run, polled):
                await self._end(job, Ending.RETURNED)
        after = await self._worker_as_shown(worker.id)
        if after and (before is None or dict(before, lastHeartbeat=None) != dict(after, lastHeartbeat=None)):
            self._events.worker_changed("worker.changed", after)
        return now

    # -- workers, as the pages see them -------------------------------------------

    async def _worker_as_shown(self, worker_id: str) -> dict | None:
        """The worker's JSON; None if there is no such worker, or nobody listens to the events."""
        if not self._events.listening:
            return None
        row = await self._store.worker_by_id(worker_id, self.heartbeat_cutoff())
        return row and _worker_json(row, detail=False)

    async def announce_worker(self, worker_id: str, change: str = "worker.changed") -> None:
        """Announce the worker as it is now: it registered, or changed (state, status, current job,
        jobs done)."""
        if worker := await self._worker_as_shown(worker_id):
            self._events.worker_changed(change, worker)

    async def forget_worker(self, worker_id: str) -> bool:
        """Unregister a worker (False: no such worker): its token stops working at once and its
        running jobs go back to the queue."""
        if not await self._store.delete_worker(worker_id):
            return False
        self._events.worker_deleted(worker_id)
        await self.sweep()
        return True

    async def forget_silent_workers(self, days: int) -> None:
        """Forget the workers not heard from in ``days`` days."""
        for worker_id in await self._store.delete_silent_workers(self._clock.iso(-days * 86400)):
            log.info("worker %s forgotten: no heartbeat in %d days", worker_id, days)
            self._events.worker_deleted(worker_id)

    # -- sweeps ----------------------------------------------------------------

    async def sweep(self) -> None:
        """The jobs of offline or deleted workers are requeued (or fail past maxAttempts); jobs
        far past their timeout end as timed out. Workers that went offline since the last sweep
        are announced, and once a heartbeat interval, the heartbeats heard meanwhile."""
        cutoff = self.heartbeat_cutoff()
        for job in await self._store.jobs_of_lost_workers(cutoff):
            await self._end(job, Ending.LOST)
        for job in await self._store.overdue_jobs(self.timeout_grace):
            await self._end(job, Ending.TIMED_OUT)
        since, self._swept_cutoff = self._swept_cutoff or cutoff, cutoff
        if not self._events.listening:
            return
        for row in await self._store.workers_gone_silent(since, cutoff):
            self._events.worker_changed("worker.changed", _worker_json(row, detail=False))
        now = self._clock.now()
        if (now - self._heartbeats_told_at).total_seconds() >= self._config.heartbeat_interval:
            heard = await self._store.heartbeats_since(_iso(self._heartbeats_told_at))
            self._heartbeats_told_at = now
            if heard:
                self._events.heartbeats(heard)

    async def _end(self, job: dict, ending: Ending) -> None:
        async with self._lock(job["id"]):
            ended = await self._store.end_attempt(job, decide_outcome(job, ending))
        if ended is not None:
            await self._announce_end(ended, job["worker_id"])

    async def _announce_end(self, job: dict, holder: Optional[str]) -> None:
        """Announce an attempt's end and its worker (``holder``, None for a queued job) as it is now,
        then what it means for the jobs that run after the job: they may start (it completed; the
        schema counted their parents down) or never will (it failed or was cancelled)."""
        self._events.job_changed(job)
        if holder:
            await self.announce_worker(holder)
        if job["status"] == JobState.COMPLETED:
            for child in await self._store.queued_children(job["id"]):
                if child["parents_left"] == 0:
                    self._events.job_ready(child)
        elif job["status"] in (JobState.FAILED, JobState.CANCELLED):
            await self._cancel_children(job)

    async def _cancel_children(self, parent: dict) -> None:
        """Cancel the queued jobs that run after ``parent`` (failed or cancelled), and theirs in turn;
        each one's error names the parent it waited for."""
        ended = [parent]
        while ended:
            parent = ended.pop()
            for child in await self._store.queued_children(parent["id"]):
                outcome = decide_outcome(child, Ending.CANCELLED, error=f"parent {parent['id']} {parent['status']}")
                if cancelled := await self._store.end_attempt(child, outcome, fence=Store._UNFINISHED):
                    self._events.job_changed(cancelled)
                    ended.append(cancelled)


def _not_holder() -> Conflict:
    return Conflict("This worker does not hold the job (it finished, was cancelled or was reassigned)",
                    code="NOT_JOB_HOLDER")


# === Domain: the contents of uploads, blobs and artifacts ===

# Contents are kept under keys that are paths: ``uploads/<file id>/<name>``, ``blobs/<ab>/<sha256>``,
# ``artifacts/<job id>.<attempt>.zip``. With SQLite they are files at those paths in the data dir
# (_DiskContents); with PostgreSQL, rows of file_chunks under those keys (_DatabaseContents), which
# every server can serve. Both have the same methods; app[CONTENTS] is the one in use.


class ContentGone(Exception):
    """A stored content went (swept, or put again under its key) while it was read."""


class _Receiver:
    """A content arriving in chunks, to be kept under ``key``: counted and hashed on the way, refused
    past ``limit`` bytes, and stored as it comes (never whole in memory) as a partial file or partial
    rows. The contents' ``keep`` puts it in place; ``discard`` removes what is left (call it in a
    ``finally``). With ``tail``, its last ``tail`` bytes are kept at hand (a zip's end record)."""

    def __init__(self, key: str, limit: int, too_large: Callable[[], DispatchError], tail: int = 0):
        self.key = key
        self._limit, self._too_large, self._tail_size = limit, too_large, tail
        self._hash = hashlib.sha256()
        self.size = 0
        self.tail = bytearray()

    async def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._limit:
            raise self._too_large()
        self._hash.update(chunk)
        if self._tail_size:
            self.tail += chunk
            del self.tail[:-self._tail_size]
        await self._store(chunk)

    async def _store(self, chunk: bytes) -> None:
        raise NotImplementedError

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class _PartialFile(_Receiver):
    """A content arriving into a hidden partial file in ``folder``."""

    def __init__(self, folder: str, key: str, limit: int, too_large: Callable[[], DispatchError], tail: int = 0):
        super().__init__(key, limit, too_large, tail)
        self.path = os.path.join(folder, f".{uuid.uuid4().hex}.partial")
        self._out = open(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

    async def _store(self, chunk: bytes) -> None:
        self._out.write(chunk)

    async def finish(self) -> None:
        """All of it has arrived: close the file (a batch of many blobs holds no descriptor per blob)."""
        self._out.close()

    async def discard(self) -> None:
        self._out.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _DiskContents:
    """Contents as files in the data dir (SQLite mode), each one put in place by a rename."""

    def __init__(self, root: Path):
        self._root = os.fspath(root)  # paths are joined as text: 100,000 Path objects cost a second

    def file_path(self, key: str) -> Optional[str]:
        """The file that holds a content, for aiohttp to send as it sends files."""
        return os.path.join(self._root, key)

    def receiver(self, key: str, limit: int, too_large: Callable[[], DispatchError], tail: int = 0) -> _PartialFile:
        # In its kind's folder: on the file system of its place, so that keeping it is a rename.
        return _PartialFile(os.path.join(self._root, key.split("/", 1)[0]), key, limit, too_large, tail)

    async def keep(self, receivers: list[_PartialFile], replace: bool = True) -> None:
        """Put received contents in place under their keys. ``replace``: a content already under a
        key is replaced (an attempt that sends its artifacts again); else it may stay (a blob's key is
        its hash: it is the same)."""
        for receiver in receivers:
            await receiver.finish()
            target = self.file_path(receiver.key)
            try:
                os.replace(receiver.path, target)
            except FileNotFoundError:  # its folder is not there yet
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                os.replace(receiver.path, target)

    async def missing(self, keys: list[str]) -> set[str]:
        """Of ``keys``, those that hold no content."""
        return {key for key in keys if not os.path.isfile(self.file_path(key))}

    async def read(self, key: str, size: int):
        """A content's bytes, a piece at a time (``size``: what its record says it holds)."""
        try:
            file = open(self.file_path(key), "rb")
        except FileNotFoundError:
            raise ContentGone(f"{key} is gone") from None
        with file:
            while piece := file.read(256 * 1024):
                yield piece

    async def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self.file_path(key)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if key.count("/") == 2:  # an upload's own folder, a blob's <ab>: it goes once empty
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(path))

    async def clean(self) -> None:
        """At start: remove what the previous process did not finish receiving."""
        for leftover in Path(self._root).glob("*/.*.partial"):
            leftover.unlink()


class _PartialChunks(_Receiver):
    """A content arriving into file_chunks under a partial key of its own, a row each
    CONTENT_CHUNK_BYTES. One row is on its way to the database while the next one arrives (twice
    as fast as taking turns); that, and the one arriving, is all that is ever in memory."""

    def __init__(self, chunks: _FileChunks, partial: str, key: str, limit: int,
                 too_large: Callable[[], DispatchError], tail: int = 0):
        super().__init__(key, limit, too_large, tail)
        self._chunks, self.partial = chunks, partial
        self._pending = bytearray()
        self._rows = 0
        self._inserting: Optional[asyncio.Future] = None
        self.kept = False

    async def _store(self, chunk: bytes) -> None:
        self._pending += chunk
        while len(self._pending) >= CONTENT_CHUNK_BYTES:
            await self._insert(bytes(self._pending[:CONTENT_CHUNK_BYTES]))
            del self._pending[:CONTENT_CHUNK_BYTES]

    async def finish(self) -> None:
        if self._pending or not self._rows:  # an empty content is one empty row: row 0 says it is there
            await self._insert(bytes(self._pending))
            self._pending.clear()
        await self._inserted()

    async def _insert(self, data: bytes) -> None:
        await self._inserted()
        self._inserting = asyncio.ensure_future(self._chunks.insert(self.partial, self._rows, data))
        self._rows += 1

    async def _inserted(self) -> None:
        """Wait for the row on its way (its error, if it failed, is raised here)."""
        inserting, self._inserting = self._inserting, None
        if inserting is not None:
            await inserting

    async def discard(self) -> None:
        if not self.kept:
            with contextlib.suppress(Exception):  # it fails as the request did: its row must not come after
                await self._inserted()
            with contextlib.suppress(DatabaseUnavailable):  # then clean() takes it, a day later
                await self._chunks.delete([self.partial])


class _DatabaseContents:
    """Contents as rows of file_chunks in PostgreSQL, the same for every server. A content arrives
    under a partial key (``partial/<when it began>/<random>``) and is put in place by renaming its
    rows in one statement, so no server ever sees a part of one; what a failed request leaves is
    deleted by its ``discard``, what a dead server left by ``clean`` a day later."""

    _PARTIAL = "partial/"

    def __init__(self, chunks: _FileChunks, clock: Clock):
        self._chunks, self._clock = chunks, clock

    def file_path(self, key: str) -> Optional[str]:
        return None  # rows, not a file: sent as they are read (_ContentResponse)

    def receiver(self, key: str, limit: int, too_large: Callable[[], DispatchError], tail: int = 0) -> _PartialChunks:
        partial = f"{self._PARTIAL}{self._clock.iso()}/{uuid.uuid4().hex}"
        return _PartialChunks(self._chunks, partial, key, limit, too_large, tail)

    async def keep(self, receivers: list[_PartialChunks], replace: bool = True) -> None:
        """As _DiskContents.keep, all of them at once."""
        for receiver in receivers:
            await receiver.finish()
        first_by_key = {receiver.key: receiver for receiver in reversed(receivers)}
        if replace:  # a reader of the one there stops (ContentGone) rather than mix the two
            await self._chunks.delete(list(first_by_key))
        await self._chunks.rename({receiver.partial: key for key, receiver in first_by_key.items()})
        await self._chunks.delete([receiver.partial for receiver in receivers])  # those not moved
        for receiver in receivers:
            receiver.kept = True

    async def missing(self, keys: list[str]) -> set[str]:
        present = await self._chunks.present(keys)
        return {key for key in keys if key not in present}

    async def read(self, key: str, size: int):
        """A content's bytes, a row at a time; ContentGone if its rows go or change meanwhile."""
        version = None
        for n in range(math.ceil(size / CONTENT_CHUNK_BYTES)):
            row = await self._chunks.chunk(key, n)
            if row is None or version not in (None, row["version"]):
                raise ContentGone(f"{key} went or changed while it was read")
            version = row["version"]
            yield row["data"]

    async def delete(self, keys: list[str]) -> None:
        if keys:
            await self._chunks.delete(keys)

    async def clean(self) -> None:
        """Remove the partial contents a day old: their servers died (the other servers' newer ones are
        still arriving)."""
        await self._chunks.delete_range(self._PARTIAL, self._PARTIAL + self._clock.iso(
            -PARTIAL_CONTENT_AGE.total_seconds()))


class Blobs:
    """File contents by their SHA-256, kept under ``blobs/<first two hex digits>/<sha256>``; who sent
    each one is in the database. A blob is put in place only once its content's hash matches its
    name, so a stored blob is always what its name says."""

    def __init__(self, store: Store, contents: _DiskContents | _DatabaseContents, max_bytes: int):
        self._store = store
        self._contents = contents
        self.max_bytes = max_bytes

    @staticmethod
    def key(sha256: str) -> str:
        return f"blobs/{sha256[:2]}/{sha256}"

    def receiver(self, sha256: str, too_large: Callable[[], DispatchError]) -> _Receiver:
        return self._contents.receiver(self.key(sha256), self.max_bytes, too_large)

    async def missing(self, principal: Principal, hashes: list[str]) -> list[str]:
        """Of ``hashes``, those the caller must send before naming them in a job: not stored, or not
        theirs (an admin may use any stored blob). The others count as used now."""
        wanted = list(dict.fromkeys(hashes))
        usable = await self._store.touch_usable_blobs(wanted, None if principal.is_admin else principal.id)
        gone = await self._contents.missing([self.key(h) for h in wanted if h in usable])
        return [h for h in wanted if h not in usable or self.key(h) in gone]

    async def keep(self, principal: Principal, received: list[tuple[str, _Receiver]]) -> None:
        """Put received blobs in place, each checked against the hash it was sent as, and record the
        sender as an owner: all of them, or (a mismatch) none."""
        for sha256, receiver in received:
            if receiver.sha256 != sha256:
                raise InvalidFile(f"The content sent as blob {sha256} has the SHA-256 {receiver.sha256}: "
                                  "nothing was stored", code="BLOB_HASH_MISMATCH", details={"sha256": sha256})
        await self._contents.keep([receiver for _, receiver in received], replace=False)
        await self._store.add_blobs([{"sha256": h, "size": r.size} for h, r in received], principal.id)

    async def sweep(self, hashes: list[str]) -> None:
        """Remove the contents of blobs whose records the sweep deleted."""
        await self._contents.delete([self.key(sha256) for sha256 in hashes])


def _zip_entry_count(tail: bytes, size: int) -> Optional[int]:
    """How many entries a zip of ``size`` bytes says it holds, from its end record (ZIP64 too) in
    ``tail``, its last ZIP_TAIL_BYTES, without loading its directory; None if it is not a zip."""
    at = tail.rfind(b"PK\5\6")
    if at < 0 or len(tail) - at < 22:
        return None
    entries = struct.unpack_from("<H", tail, at + 10)[0]
    if entries == 0xFFFF and at >= 20 and tail[at - 20:at - 16] == b"PK\6\7":
        start = struct.unpack_from("<Q", tail, at - 12)[0] - (size - len(tail))  # where the tail begins
        record = tail[start:start + 56] if start >= 0 else b""
        if len(record) == 56 and record.startswith(b"PK\6\6"):
            entries = struct.unpack_from("<Q", record, 32)[0]
    return entries


# === Events: the queue bell, the event hub, metrics ===

class Ring(NamedTuple):
    """What woke a waiting worker: a job with these tags (None: look anyway), which the workers in
    ``passed`` were woken for already and had no room for; the job's id, if known."""

    tags: Optional[list[str]]
    passed: frozenset = frozenset()
    job_id: Optional[str] = None


class QueueBell:
    """Wakes long-polling workers the moment a job may be for them: one worker per job, the one
    waiting longest among those that have the job's tags, so a thousand idle agents cost one
    claim per job, not a thousand. A worker woken for a job it has no room for passes it on."""

    def __init__(self) -> None:
        # In the order they started waiting: (tags, worker id); tags None: a worker that may take no job yet.
        self._waiters: dict[asyncio.Future, tuple[Optional[frozenset], str]] = {}
        self._polled: set[str] = set()  # see take_polled
        self.closed = False

    def listen(self, worker_tags: Optional[frozenset], worker_id: str) -> asyncio.Future:
        """A future that completes with a ``Ring`` when a job for these tags is announced. Take it
        *before* looking at the queue, so a job submitted in between is never missed. A worker
        that may take no job (pending) listens with None: no job wakes it, only ``wake_held`` or
        a shutdown."""
        future = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_result(Ring(None))
        else:
            self._waiters[future] = (worker_tags, worker_id)
            self._polled.add(worker_id)
        return future

    def take_polled(self) -> set[str]:
        """The workers that have waited here since the last call (a parked poll is a sign of life)."""
        polled, self._polled = self._polled, {worker_id for _, worker_id in self._waiters.values()}
        return polled

    def forget(self, future: asyncio.Future) -> None:
        self._waiters.pop(future, None)

    async def wait(self, future: asyncio.Future, deadline: float) -> Optional[Ring]:
        """What rang for this listener, or None once ``deadline`` (the loop's clock) has passed.
        The future is awaited itself, so a ring resumes the waiting poll in the loop's next turn."""
        timer = asyncio.get_running_loop().call_at(deadline, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future) -> None:
        self.forget(future)
        if not future.done():
            future.set_result(None)

    def ring(self, job_tags: Optional[list[str]], passed: frozenset = frozenset(),
             job_id: Optional[str] = None) -> None:
        """Announce one queued job to a worker not in ``passed`` (None: wake every waiting worker)."""
        if job_tags is None:
            self._wake(lambda worker_tags, waiter: True)
            return
        for future, (worker_tags, worker_id) in self._waiters.items():  # the first that fits: no copy
            if worker_tags is not None and worker_id not in passed and worker_tags.issuperset(job_tags):
                del self._waiters[future]
                future.set_result(Ring(job_tags, passed, job_id))
                return

    def wake_worker(self, worker_id: str) -> None:
        """Wake the worker's waiting polls: a job of its ended, so it may have room now."""
        self._wake(lambda worker_tags, waiter: waiter == worker_id)

    def wake_held(self) -> None:
        """Wake the workers that could take no job, so that they ask again (one was approved)."""
        self._wake(lambda worker_tags, waiter: worker_tags is None)

    def end_polls(self, worker_id: str) -> None:
        """End the worker's waiting polls now, as if their wait had run out (it was unregistered)."""
        self._wake(lambda worker_tags, waiter: waiter == worker_id, None)

    def _wake(self, which: Callable[[Optional[frozenset], str], bool], ring: Optional[Ring] = Ring(None)) -> None:
        for future in [future for future, waiter in self._waiters.items() if which(*waiter)]:
            del self._waiters[future]
            future.set_result(ring)

    def close(self) -> None:
        self.closed = True
        self.ring(None)


class Feed:
    """One WebSocket client's events: who it is, the job it watches (None: all of them), and the
    messages not sent yet, bounded in bytes. Closing it drops that backlog at once."""

    def __init__(self, principal: Principal, job_id: Optional[str], limit: int):
        self.principal, self.job_id = principal, job_id
        self._limit = limit
        self._messages: collections.deque[str] = collections.deque()
        self.backlog = 0  # bytes of the messages waiting
        self._ready = asyncio.Event()
        self.closed_with: Optional[tuple[int, str]] = None  # (WebSocket close code, reason)

    def put(self, message: str) -> bool:
        """Queue a message; False if the backlog would pass the limit. A client with nothing
        waiting takes any one message, so one large output chunk alone does not drop it."""
        if self._messages and self.backlog + len(message) > self._limit:
            return False
        self._messages.append(message)
        self.backlog += len(message)
        self._ready.set()
        return True

    def close(self, code: int, reason: str) -> None:
        """Drop what waits, now; the sender closes the WebSocket with this code next."""
        self._messages.clear()
        self.backlog = 0
        self.closed_with = (code, reason)
        self._ready.set()

    async def next(self) -> Optional[str]:
        """The next message to send; None once the feed is closed."""
        while not self._messages and self.closed_with is None:
            self._ready.clear()
            await self._ready.wait()
        if self.closed_with is not None:
            return None
        message = self._messages.popleft()
        self.backlog -= len(message)
        return message


class EventHub:
    """Fans job events out to WebSocket clients and follows (``/api/jobs/follow``), each through
    its own ``Feed`` (keyed by its response). A client that falls WS_BACKLOG_BYTES behind is closed
    and its backlog freed at once, so it never slows the server or the other clients; so is one
    whose access ends (logout, revoked token, deleted user)."""

    def __init__(self) -> None:
        self._feeds: dict[web.WebSocketResponse, Feed] = {}

    def subscribe(self, ws: web.WebSocketResponse, principal: Principal, job_id: Optional[str]) -> Feed:
        feed = self._feeds[ws] = Feed(principal, job_id, WS_BACKLOG_BYTES)
        return feed

    def unsubscribe(self, ws: web.WebSocketResponse) -> None:
        self._feeds.pop(ws, None)

    @property
    def client_count(self) -> int:
        return len(self._feeds)

    @property
    def backlog_bytes(self) -> int:
        return sum(feed.backlog for feed in self._feeds.values())

    def publish(self, event: dict) -> None:
        if not self._feeds:
            return
        message = json.dumps(event)  # ASCII (ensure_ascii), so its length is its size in bytes
        for ws, feed in list(self._feeds.items()):
            if feed.job_id is not None and feed.job_id != event.get("jobId"):  # worker events have none
                continue
            if not feed.put(message):
                log.warning("closing a WebSocket client of %s: it fell %d bytes behind",
                            feed.principal.email, feed.backlog + len(message))
                self._close(ws, WSCloseCode.TRY_AGAIN_LATER, "too slow")

    def disconnect(self, reason: str, *, user_id: Optional[str] = None, jti: Optional[str] = None) -> None:
        """Close the WebSockets of a user (deleted) or of one of their tokens (logged out, revoked)."""
        for ws, feed in list(self._feeds.items()):
            if feed.principal.id == user_id or feed.principal.jti == jti:
                self._close(ws, WSCloseCode.POLICY_VIOLATION, reason)

    def _close(self, ws: web.WebSocketResponse, code: int, reason: str) -> None:
        self._feeds.pop(ws).close(code, reason)

    async def close_all(self) -> None:
        for ws, feed in list(self._feeds.items()):
            if isinstance(ws, web.WebSocketResponse):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
            else:  # a follow (server-sent events): its handler ends the stream
                feed.close(WSCloseCode.GOING_AWAY, "server shutdown")
        self._feeds.clear()


class Metrics:
    """The Prometheus instruments of one app, in its own registry (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.jobs = Gauge("dispatch_jobs", "Jobs by state", ["state"], registry=registry)
        self.queue_depth = Gauge("dispatch_queue_depth", "Queued jobs by priority", ["priority"], registry=registry)
        self.workers = Gauge("dispatch_workers", "Workers by status", ["status"], registry=registry)
        self.job_duration = Histogram("dispatch_job_duration_seconds", "Run time of finished jobs", ["status"],
                                      buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600), registry=registry)
        self.job_wait = Histogram("dispatch_job_wait_seconds", "Time from submit to start",
                                  buckets=(0.005, 0.05, 0.5, 5, 30, 120, 600, 3600), registry=registry)
        self.http_requests = Counter("dispatch_http_requests", "HTTP requests by route, method and status code",
                                     ["route", "method", "code"], registry=registry)
        self.rate_limited = Counter("dispatch_rate_limited", "Requests refused by the rate limiter",
                                    registry=registry)
        self.websocket_clients = Gauge("dispatch_websocket_clients", "Connected WebSocket clients",
                                       registry=registry)
        self.websocket_backlog = Gauge("dispatch_websocket_backlog_bytes",
                                       "Events not yet sent to WebSocket clients, in bytes", registry=registry)
        self.upload_bytes = Counter("dispatch_upload_bytes", "Bytes received in uploads", registry=registry)

    def set_counts(self, counts: dict[str, dict[str, int]]) -> None:
        for gauge, name, labels in ((self.jobs, "jobs", [s.value for s in JobState]),
                                    (self.queue_depth, "queue", list(PRIORITY_RANK)),
                                    (self.workers, "workers", ["online", "offline", "error"])):
            for label in labels:
                gauge.labels(label).set(counts[name].get(label, 0))


def _seconds_between(start: str, end: str) -> float:
    return (_parse_iso(end) - _parse_iso(start)).total_seconds()


class Announcer:
    """Tells everyone what happened to a job: WebSocket clients, waiting workers, the log, the
    metrics; and WebSocket clients what the workers look like. ``Jobs`` calls it after every change."""

    def __init__(self, hub: EventHub, bell: QueueBell, metrics: Metrics, cluster: Optional["Cluster"] = None):
        self._hub, self._bell, self._metrics, self._cluster = hub, bell, metrics, cluster

    def _publish(self, event: dict) -> None:
        """To this server's WebSocket clients, and through the cluster to the others'."""
        self._hub.publish(event)
        self._relay(event)

    def _relay(self, event: dict) -> None:
        """To the other servers only: their clients, or (a "bell." event) their waiting workers
        (``Cluster.deliver``)."""
        if self._cluster is not None:
            self._cluster.send(event)

    def job_changed(self, job: dict) -> None:
        if self.listening:
            self._publish(job_event(job))
        status, where = job["status"], f" on {job['worker_id']}" if job["worker_id"] else ""
        if status == JobState.QUEUED:
            if not job["parents_left"]:
                self.job_ready(job)
        elif status == JobState.RUNNING:
            self._metrics.job_wait.observe(_seconds_between(job["created_at"], job["started_at"]))
        elif job["started_at"]:
            self._metrics.job_duration.labels(status).observe(_seconds_between(job["started_at"], job["completed_at"]))
            self.worker_free(job["worker_id"])  # what the job asked of it is free again
        detail = f"attempt {job['attempt']}" if status == JobState.RUNNING else (
            job["error"] or (f"exit {job['exit_code']}" if job["exit_code"] is not None else ""))
        log.info("job %s %s%s%s", job["id"], status, where, f" ({detail})" if detail else "")

    def job_ready(self, job: dict) -> None:
        """A queued job may be claimed now: wake a worker for it (on each server)."""
        tags = json.loads(job["tags"])
        self._bell.ring(tags, job_id=job["id"])
        self._relay({"type": "bell.ring", "tags": tags, "jobId": job["id"]})

    def output(self, job: dict, stream: str, data: str, offset: int) -> None:
        """A chunk of output; ``offset`` is how many characters of the stream came before it, so a
        viewer joins history and live output exactly."""
        self._publish({"type": "job.output", "jobId": job["id"], "attempt": job["attempt"], "stream": stream,
                       "offset": offset, "data": data})

    def job_suspended(self, job: dict) -> None:
        """Its worker stopped the job's processes to make way for the owner (``suspended``), or let
        them run on."""
        suspended = job["suspended_at"] is not None
        self._publish({**job_event(job), "type": "job.suspended" if suspended else "job.resumed"})
        log.info("job %s %s on %s", job["id"], "suspended" if suspended else "resumed", job["worker_id"])

    def worker_free(self, worker_id: str) -> None:
        """The worker has room again (a job ended, or its agent takes jobs again): its parked get-job
        polls, on whichever server, look at once."""
        self._bell.wake_worker(worker_id)
        self._relay({"type": "bell.wake_worker", "workerId": worker_id})

    def worker_available(self, worker_id: str) -> None:
        """An admin approved or resumed the worker: its parked get-job answers now (it waited as a
        worker that may take no job), and one parked before a pause looks again."""
        self._bell.wake_held()
        self._relay({"type": "bell.wake_held"})
        self.worker_free(worker_id)

    @property
    def listening(self) -> bool:
        """Whether any client follows the events: what workers look like is read only for them (with
        other servers, whose clients this one cannot count, always)."""
        return self._cluster is not None or self._hub.client_count > 0

    def worker_changed(self, change: str, worker: dict) -> None:
        """A worker (its JSON) registered (``worker.registered``) or changed (``worker.changed``)."""
        self._publish({"type": change, **worker})

    def worker_deleted(self, worker_id: str) -> None:
        """The worker was unregistered: its parked polls end (the next request it makes is refused)."""
        self._publish({"type": "worker.deleted", "workerId": worker_id})
        self._bell.end_polls(worker_id)
        self._relay({"type": "bell.end_polls", "workerId": worker_id})

    def heartbeats(self, heard: dict[str, str]) -> None:
        """When each worker heard from lately was last heard from: one summary, not an event a heartbeat."""
        self._publish({"type": "worker.heartbeats", "lastHeartbeat": heard})


class Cluster:
    """Servers sharing one PostgreSQL database: what one announces (events, and wake-ups for its
    waiting workers) reaches the others through the events table, with a NOTIFY that carries only
    the sending server's id, so neither NOTIFY's 8,000-byte cap nor a pooler that drops LISTEN
    (transaction pooling) loses anything: each server also looks once a second. One server at a time, the one
    holding an advisory lock, runs the sweeps."""

    def __init__(self, engine: _Postgres, hub: EventHub, bell: QueueBell, clock: Clock):
        self.server_id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._engine, self._hub, self._bell, self._clock = engine, hub, bell, clock
        self._outbox: list[dict] = []
        self._outbox_filled = asyncio.Event()
        self._notified = asyncio.Event()
        self._last_id = 0  # the newest event delivered here (see start)

    async def start(self) -> None:
        """Take the other servers' events from now on: before this server answers anyone, so that a
        client connected at its start misses none."""
        self._last_id = await self._engine.last_event_id()

    def send(self, event: dict) -> None:
        self._outbox.append(event)
        self._outbox_filled.set()

    async def lead(self) -> bool:
        """Whether this server runs the sweeps now."""
        return self._engine.listening() and await self._engine.lead()

    async def run(self) -> None:
        """Send this server's events and receive the others', until cancelled."""
        await asyncio.gather(self._send_forever(), self._receive_forever())

    async def _send_forever(self) -> None:
        while True:
            await self._outbox_filled.wait()
            self._outbox_filled.clear()
            batch, self._outbox = self._outbox, []
            try:
                await self._engine.publish_events(self.server_id, self._clock.iso(), batch)
            except Exception as exc:  # the database is down: the events wait (the newest, bounded)
                log.warning("could not pass %d events to the other servers (%s); trying again", len(batch), exc)
                self._outbox = (batch + self._outbox)[-CLUSTER_OUTBOX_LIMIT:]
                self._outbox_filled.set()
                await asyncio.sleep(1.0)

    async def _receive_forever(self) -> None:
        while True:
            self._notified.clear()
            try:
                if not self._engine.listening():
                    await self._engine.listen(self._notice)
                for row in await self._engine.events_after(self._last_id, self.server_id):
                    self._last_id = row["id"]
                    self.deliver(json.loads(row["event"]))
            except Exception as exc:
                log.warning("could not read the other servers' events (%s); trying again", exc)
                await self._engine.stop_listening()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._notified.wait(), 1.0)

    def _notice(self, origin: str) -> None:
        if origin != self.server_id:  # its own events this server has delivered already
            self._notified.set()

    def deliver(self, event: dict) -> None:
        """Another server's event: to this server's WebSocket clients, or to its waiting workers."""
        kind = event["type"]
        if kind == "bell.ring":
            self._bell.ring(event["tags"], job_id=event.get("jobId"))
        elif kind == "bell.wake_worker":
            self._bell.wake_worker(event["workerId"])
        elif kind == "bell.wake_held":
            self._bell.wake_held()
        elif kind == "bell.end_polls":
            self._bell.end_polls(event["workerId"])
        else:
            self._hub.publish(event)


# === HTTP: app keys, middleware, request helpers ===

# The app's typed state. STORE, TOKENS, REGISTRATION and JOBS appear once the data dir is open (_storage_ctx).
CONFIG = web.AppKey("config", Config)
CLOCK = web.AppKey("clock", Clock)
STORE = web.AppKey("store", Store)
JOBS = web.AppKey("jobs", Jobs)
BLOBS = web.AppKey("blobs", Blobs)
CONTENTS = web.AppKey("contents", _DiskContents | _DatabaseContents)  # of uploads, blobs, artifacts
TOKENS = web.AppKey("tokens", Tokens)
BELL = web.AppKey("bell", QueueBell)
HUB = web.AppKey("hub", EventHub)
ANNOUNCER = web.AppKey("announcer", Announcer)
CLUSTER = web.AppKey("cluster", object)  # the Cluster with PostgreSQL, else None
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
METRICS = web.AppKey("metrics", Metrics)
STARTED = web.AppKey("started", float)
UPLOADS_IN_PROGRESS = web.AppKey("uploads_in_progress", set)
REGISTRATION = web.AppKey("registration", RegistrationToken)
FIRST_ADMIN = web.AppKey("first_admin", tuple)  # (email, password) of an admin made at this start
PRINCIPAL = web.RequestKey("principal", object)  # Principal, or None for an anonymous caller
RATE_HEADERS = web.RequestKey("rate_headers", dict)


def _json(data: dict, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


async def _in_time(request: web.Request, step: Awaitable) -> Any:
    """One read of a request's body; a client that sends nothing more for DISPATCH_REQUEST_TIMEOUT
    seconds is refused (and its connection closed), so a stalled body cannot hold the server."""
    try:
        async with asyncio.timeout(request.app[CONFIG].request_timeout):  # not wait_for: it may swallow a cancel
            return await step
    except TimeoutError:
        raise RequestTimeout("The request body stopped arriving") from None


async def _read_body(request: web.Request) -> bytes:
    chunks, size = [], 0
    while chunk := await _in_time(request, request.content.readany()):
        size += len(chunk)
        if size > MAX_REQUEST_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_REQUEST_BODY, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def _json_body(request: web.Request) -> dict:
    raw = await _read_body(request)
    try:
        body = json.loads(raw)
        if _SURROGATE_ESCAPE.search(raw):  # "\ud800" alone is no text: SQLite and bcrypt cannot take it
            json.dumps(body, ensure_ascii=False).encode()
    except (ValueError, RecursionError):  # RecursionError: nested too deep; UnicodeError is a ValueError
        raise InvalidRequest("Request body must be valid JSON", code="INVALID_JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object", code="INVALID_JSON")
    return body


def _client_ip(request: web.Request, trusted: list[str]) -> str:
    """The caller's address. X-Forwarded-For counts only when the peer is a configured proxy."""
    peer = request.remote or "unknown"
    if peer not in trusted:
        return peer
    for hop in reversed(request.headers.get("X-Forwarded-For", "").split(",")):
        hop = hop.strip()
        if hop and hop not in trusted:
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                break
    return peer


def _origin_of(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None and "Referer" in request.headers:
        parts = urllib.parse.urlsplit(request.headers["Referer"])
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin


def _refuse_cross_origin_change(request: web.Request) -> None:
    """A cookie rides along on any request a browser makes, so a state change it authenticates must
    come from our own page (or a listed origin). No Origin or Referer at all means not a browser."""
    origin = _origin_of(request)
    if request.method in STATE_CHANGING_METHODS and origin is not None and not _is_allowed_origin(request, origin):
        raise Forbidden("Cross-origin request refused", code="CROSS_ORIGIN")


def _is_allowed_origin(request: web.Request, origin: str) -> bool:
    same = f"{request.scheme}://{request.host}"
    return origin.rstrip("/") in (same, *request.app[CONFIG].cors_origin_list)


async def _authenticate(request: web.Request) -> Principal | None:
    """The caller from its credentials, None without any; Unauthorized when they are wrong."""
    app = request.app
    worker_token = request.headers.get("x-worker-token")
    if worker_token is not None:
        worker = await app[STORE].worker_by_token_hash(_hash_token(_as_credential(worker_token)))
        if worker is None:
            raise Unauthorized("Invalid worker token", code="INVALID_WORKER_TOKEN")
        return Principal("worker", worker["id"], tags=worker["tags"], state=worker["state"])
    token, via_cookie = _bearer(request), False
    if token is None and "auth_token" in request.cookies:
        token, via_cookie = _as_credential(request.cookies["auth_token"]), True
    if token is None:
        return None
    if app[REGISTRATION].matches(token):
        return None  # only /workers/register accepts it, and reads it there
    if token.startswith(API_TOKEN_PREFIX) and not via_cookie:  # a cookie only ever holds a JWT
        return await _api_token_principal(app, token)
    claims = app[TOKENS].decode(token)
    user = await app[STORE].user_for_token(claims["sub"], claims["jti"])
    if user is None or user["revoked"]:
        raise Unauthorized("Token revoked", code="TOKEN_REVOKED")
    return Principal("user", user["id"], user["role"], user["email"], via_cookie, claims["jti"], claims["exp"])


async def _api_token_principal(app: web.Application, token: str) -> Principal:
    found = await app[STORE].user_for_api_token(_hash_token(token))
    if found is None:
        raise Unauthorized("Unknown or revoked API token", code="INVALID_TOKEN")
    expires = _parse_iso(found["expires_at"])
    if expires <= app[CLOCK].now():
        raise Unauthorized("API token expired; create a new one", code="TOKEN_EXPIRED")
    return Principal("user", found["id"], found["role"], found["email"], jti=found["token_id"],
                     exp=int(expires.timestamp()), api_token=True)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return _as_credential(token.strip()) if scheme.lower() == "bearer" and token.strip() else None


def _as_credential(text: str) -> str:
    """Every token dispatch hands out is ASCII: other text is no token (and would not even encode)."""
    if not text.isascii():
        raise Unauthorized("Invalid token", code="INVALID_TOKEN")
    return text


class _WithoutRawRequest(logging.Filter):
    """aiohttp logs a request it cannot parse with the offending bytes and a traceback, and those
    bytes may be a header holding a token: keep only who sent it and the kind of error."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = f"{record.msg}: {type(error).__name__} (the request is not logged)"
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"  # the client's mistake, not ours
        return True


server_log.addFilter(_WithoutRawRequest())


@web.middleware
async def access_middleware(request: web.Request, handler) -> web.StreamResponse:
    """One log line and one metrics count per request: method, route, status, duration, who."""
    started = time.perf_counter()
    status = 499  # the client went away before an answer
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].http_requests.labels(route, request.method, str(status)).inc()
        principal = request.get(PRINCIPAL)
        who = f"{principal.kind}:{principal.email or principal.id}" if principal else f"ip:{request.remote}"
        millis = (time.perf_counter() - started) * 1000
        access_log.info("%s %s %d %.1fms %s", request.method, request.path, status, millis, who,
                        extra={"fields": {"method": request.method, "path": request.path, "route": route,
                                          "status": status, "ms": round(millis, 1), "who": who}})


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as the contract's error JSON with a stable code."""
    try:
        return await handler(request)
    except DispatchError as exc:
        error = exc
    except web.HTTPNotFound:
        error = NotFound(f"No route for {request.method} {request.path}", code="ROUTE_NOT_FOUND")
    except web.HTTPMethodNotAllowed as exc:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.path}",
                                 headers={"Allow": ", ".join(sorted(exc.allowed_methods))})
    except web.HTTPRequestEntityTooLarge:
        error = PayloadTooLarge(f"Request body exceeds {MAX_REQUEST_BODY // (1024 * 1024)} MB")
    except (DatabaseUnavailable, sqlite3.DatabaseError) as exc:
        log.error("database error on %s %s: %s", request.method, request.path, exc)
        error = ServiceUnavailable("Database unavailable, try again shortly")
    except (asyncio.CancelledError, web.HTTPException, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        error = DispatchError("Internal error")
    response = web.json_response(error.body(), status=error.status, headers=error.headers)
    if isinstance(error, RequestTimeout):
        response.force_close()  # the rest of the body may never come
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Resolve the caller, charge the rate limit to it (or its IP), and enforce same-origin
    for cookie-authenticated state changes."""
    config = request.app[CONFIG]
    ip = _client_ip(request, config.trusted_proxy_list)
    try:
        authenticates = request.path.startswith(CREDENTIAL_PATHS) and request.path not in SELF_AUTHENTICATING
        principal = await _authenticate(request) if authenticates else None
    except Unauthorized:
        _charge_rate_limit(request, f"ip:{ip}", config.rate_limit)  # wrong guesses cost the guesser's IP
        raise
    if principal is None:
        _charge_rate_limit(request, f"ip:{ip}", config.rate_limit)
    else:
        limit = config.worker_rate_limit if principal.kind == "worker" else config.rate_limit
        _charge_rate_limit(request, f"{principal.kind}:{principal.id}", limit)
    if principal is not None and principal.via_cookie:
        _refuse_cross_origin_change(request)
    request[PRINCIPAL] = principal
    return await handler(request)


def _charge_rate_limit(request: web.Request, key: str, limit: int) -> None:
    if limit <= 0:
        return
    allowed, remaining, reset, retry_after = request.app[RATE_LIMITER].take(key, limit)
    headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(remaining),
               "X-RateLimit-Reset": str(reset)}
    request[RATE_HEADERS] = headers
    if not allowed:
        request.app[METRICS].rate_limited.inc()
        raise RateLimited("Rate limit exceeded", headers={**headers, "Retry-After": str(retry_after)},
                          extra={"retryAfter": retry_after})


async def _add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(request.get(RATE_HEADERS, {}))


def _user(request: web.Request, *, admin: bool = False) -> Principal:
    principal = request[PRINCIPAL]
    if principal is None:
        raise Unauthorized("Authentication required")
    if principal.kind != "user" or (admin and not principal.is_admin):
        raise Forbidden("Permission denied")
    return principal


def _worker(request: web.Request) -> Principal:
    principal = request[PRINCIPAL]
    if principal is None:
        raise Unauthorized("Worker token required (x-worker-token)")
    if principal.kind != "worker":
        raise Forbidden("Only workers may call this endpoint")
    return principal


def _page(request: web.Request, sort_columns: dict[str, str], default_sort: str, tiebreak: str) -> dict:
    """limit, offset and an ORDER BY from a whitelisted sort key. The tie-break follows the
    direction, so ``-key`` is exactly the reverse of ``key``."""
    query = request.query
    limit = _query_number(query, "limit", 100, 1, 1000)
    offset = _query_number(query, "offset", 0, 0, 2**53)
    sort = query.get("sort", default_sort)
    descending = sort.startswith("-")
    column = sort_columns.get(sort[1:] if descending else sort)
    if column is None:
        raise _invalid_field("sort", f"sort must be one of {', '.join(sort_columns)} (prefix - for descending)")
    direction = "DESC NULLS LAST" if descending else "ASC NULLS FIRST"  # spelled out: engines differ
    return {"limit": limit, "offset": offset, "order": f"{column} {direction}, {tiebreak} {direction}"}


def _page_json(page: dict, total: int, key: str, items: list[dict]) -> web.Response:
    """A list answer: the items under ``key`` with total, limit, offset and hasMore."""
    return _json({"success": True, "total": total, "limit": page["limit"], "offset": page["offset"],
                  "hasMore": page["offset"] + len(items) < total, key: items})


def _query_number(query, name: str, default, minimum, maximum, *, parse=int, what: str = "a whole number"):
    """A number from the query string, ``default`` if absent; InvalidRequest if it is not one in range."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = math.nan
    if not minimum <= value <= maximum:
        raise _invalid_field(name, f"{name} must be {what} from {minimum} to {maximum}")
    return value


# === HTTP: auth and users ===


async def login_view(request: web.Request) -> web.Response:
    _refuse_cross_origin_change(request)  # another site must not log a visitor into its account
    body = await _json_body(request)
    email, password = body.get("email"), body.get("password")
    if not isinstance(email, str) or not email:
        raise _invalid_field("email", "email is required")
    if not isinstance(password, str) or not password:
        raise _invalid_field("password", "password is required")
    _refuse_long_password(password)
    store = request.app[STORE]
    user = await store.user_by_email(email)
    # An unknown email is checked against a hash as costly as the real ones: both answers take as long.
    password_hash = user["password_hash"] if user else _dummy_password_hash(
        await store.highest_password_cost() or request.app[CONFIG].bcrypt_rounds)
    valid = await _check_password(password, password_hash)
    if user is None or not valid:
        raise InvalidCredentials("Email or password incorrect")
    return _token_response(request, user, {"user": {"id": user["id"], "email": user["email"], "role": user["role"]},
                                           "expiresIn": "24h"})


def _token_response(request: web.Request, user: dict, extra: dict) -> web.Response:
    token, exp = request.app[TOKENS].issue(user, request.app[CLOCK].now())
    response = _json({"success": True, "token": token, **extra})
    response.set_cookie("auth_token", token, max_age=int(TOKEN_LIFETIME.total_seconds()), httponly=True,
                        samesite="Strict", secure=request.secure, path="/")
    return response


async def logout_view(request: web.Request) -> web.Response:
    """End the caller's token (a JWT is revoked, a personal API token deleted) and its WebSockets."""
    principal = _user(request)
    store = request.app[STORE]
    if principal.api_token:
        await store.delete_api_token(principal.id, principal.jti)
    else:
        await store.revoke_token(principal.jti, principal.exp)
    request.app[HUB].disconnect("logged out", jti=principal.jti)
    response = _json({"success": True, "message": "Logged out successfully"})
    response.del_cookie("auth_token", path="/")
    return response


async def refresh_view(request: web.Request) -> web.Response:
    """Swap a (possibly expired) unrevoked token for a new one; the old one is revoked."""
    token = _bearer(request)
    if token is None and "auth_token" in request.cookies:
        _refuse_cross_origin_change(request)
        token = _as_credential(request.cookies["auth_token"])
    if token is None:
        raise Unauthorized("Authentication required")
    if token.startswith(API_TOKEN_PREFIX):
        raise Unauthorized("A personal API token is not refreshed: create a new one (POST /api/auth/tokens)",
                           code="API_TOKEN_NOT_REFRESHABLE")
    claims = request.app[TOKENS].decode(token, allow_expired_for=REFRESH_GRACE)
    store = request.app[STORE]
    user = await store.user_for_token(claims["sub"], claims["jti"])
    # Revoking is the check: of several refreshes of one token, only the one whose revocation is
    # written gets a new token.
    if user is None or not await store.revoke_token(claims["jti"], claims["exp"]):
        raise Unauthorized("Token revoked", code="TOKEN_REVOKED")
    request.app[HUB].disconnect("token refreshed", jti=claims["jti"])
    return _token_response(request, user, {})


async def whoami_view(request: web.Request) -> web.Response:
    principal = _user(request)
    return _json({"success": True, "user": {"id": principal.id, "email": principal.email, "role": principal.role},
                  "expiresAt": _iso(dt.datetime.fromtimestamp(principal.exp, dt.timezone.utc))})


def _user_json(user: dict) -> dict:
    return {"id": user["id"], "email": user["email"], "role": user["role"], "createdAt": user.get("created_at")}


async def list_users_view(request: web.Request) -> web.Response:
    _user(request, admin=True)
    users = await request.app[STORE].list_users()
    return _json({"success": True, "total": len(users), "users": [_user_json(u) for u in users]})


async def add_user_view(request: web.Request) -> web.Response:
    _user(request, admin=True)
    body = await _json_body(request)
    user = await create_user(request.app[STORE], body.get("email"), body.get("password"), body.get("role", "user"),
                             request.app[CONFIG].bcrypt_rounds)
    return _json({"success": True, "user": user}, status=201)


async def delete_user_view(request: web.Request) -> web.Response:
    principal = _user(request, admin=True)
    user_id = request.match_info["user_id"]
    if user_id == principal.id:
        raise Conflict("You cannot delete yourself", code="SELF_DELETE")
    if not await request.app[STORE].delete_user(user_id):
        raise NotFound("User not found")
    request.app[HUB].disconnect("user deleted", user_id=user_id)
    return _json({"success": True, "message": "User deleted"})


def _api_token_json(row: dict) -> dict:
    return {"id": row["id"], "name": row["name"], "createdAt": row["created_at"], "expiresAt": row["expires_at"]}


async def create_api_token_view(request: web.Request) -> web.Response:
    """A personal API token for scripts, shown once in this answer; only its hash is kept."""
    principal = _user(request)
    body = await _json_body(request)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 100 or not name.isprintable():
        raise _invalid_field("name", "name is required: 1 to 100 printable characters")
    days = _optional_int(body, "expiresInDays", minimum=1, maximum=API_TOKEN_MAX_DAYS) or API_TOKEN_DEFAULT_DAYS
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = request.app[CLOCK].now()
    record = {"id": _new_id("token"), "user_id": principal.id, "name": name, "token_hash": _hash_token(token),
              "created_at": _iso(now), "expires_at": _iso(now + dt.timedelta(days=days))}
    await request.app[STORE].insert_api_token(record)
    return _json({"success": True, "token": token, **_api_token_json(record)}, status=201)


async def list_api_tokens_view(request: web.Request) -> web.Response:
    """The caller's own API tokens, without their secrets."""
    principal = _user(request)
    tokens = await request.app[STORE].api_tokens_of(principal.id)
    return _json({"success": True, "total": len(tokens), "tokens": [_api_token_json(t) for t in tokens]})


async def delete_api_token_view(request: web.Request) -> web.Response:
    """Revoke one of the caller's API tokens, at once (its WebSockets close too)."""
    principal = _user(request)
    token_id = request.match_info["token_id"]
    if not await request.app[STORE].delete_api_token(principal.id, token_id):
        raise NotFound("API token not found")
    request.app[HUB].disconnect("token revoked", jti=token_id)
    return _json({"success": True, "message": "API token revoked"})


# === HTTP: workers ===



async def register_view(request: web.Request) -> web.Response:
    """Register with the registration token, an admin's token or, with DISPATCH_OPEN_REGISTRATION=1,
    nothing at all; returns the worker's own token. While approval is on, a worker that no admin
    registered is pending: it gets no job until an admin approves it."""
    config = request.app[CONFIG]
    principal = request[PRINCIPAL]
    offered = _bearer(request)
    by_token = offered is not None and request.app[REGISTRATION].matches(offered)
    by_admin = principal is not None and principal.is_admin
    if not (by_token or by_admin or (config.open_registration and principal is None)):
        if principal is None:
            raise Unauthorized("Registration token required (Authorization: Bearer <registration token>)",
                               code="REGISTRATION_TOKEN_REQUIRED")
        raise Forbidden("Only the registration token or an admin may register workers")
    body = await _json_body(request)
    worker_id = _require_string(body, "workerId", max_length=128)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", worker_id) or worker_id == "list":
        raise _invalid_field("workerId", "workerId may contain only letters, digits, '.', '_' and '-' "
                                         "(and may not be 'list')")
    hostname = _require_string(body, "hostname", max_length=255)
    cpu_count = _optional_int(body, "cpuCount", minimum=1, maximum=100_000)
    memory = _optional_int(body, "totalMemoryMb", minimum=0, maximum=2**40)
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or len(json.dumps(metadata)) > 16 * 1024:
        raise _invalid_field("metadata", "metadata must be a JSON object under 16 KB")
    tags = _validate_tags(metadata.get("tags"), "metadata.tags")
    # What it offers the farm; a client that does not say offers what the machine has.
    offers = _validate_resources(body, {"cpus": cpu_count or 1, "memory_mb": memory or 0, "gpus": 0})
    token = secrets.token_urlsafe(32)
    state = WorkerState.PENDING if config.approval_required and not by_admin else WorkerState.AVAILABLE
    now = await request.app[STORE].insert_worker({
        "id": worker_id, "token_hash": _hash_token(token), "hostname": hostname, "cpu_count": cpu_count,
        "total_memory_mb": memory, "metadata": json.dumps(metadata), "tags": json.dumps(tags), "state": state.value,
        **offers})
    log.info("worker %s registered (%s), %s", worker_id, hostname, state.value)
    await request.app[JOBS].announce_worker(worker_id, "worker.registered")
    return _json({"success": True, "workerId": worker_id, "token": token, "registeredAt": now,
                  "state": state.value}, status=201)


async def heartbeat_view(request: web.Request) -> web.Response:
    """A worker is alive. ``runningJobs`` (every job it runs or holds a result for), with the agent
    run's id (``run``) and the last of its get-job polls that has ended (``polled``), renews the
    lease of the jobs listed; a job it holds but does not list goes back to the queue. ``state``
    (``available`` or ``paused``, with ``pausedReason``) says whether its agent takes jobs now."""
    worker = _worker(request)
    body = await _json_body(request)
    if body.get("workerId") not in (None, worker.id):
        raise Forbidden("workerId does not match the worker token")
    status = body.get("status", "idle")
    if status not in ("idle", "busy", "error", "offline", "stopping"):
        raise _invalid_field("status", "status must be idle, busy, error, or offline or stopping (the agent's last word)")
    status = "offline" if status == "stopping" else status
    _optional_int(body, "jobsCompleted")  # the contract's; checked, but the server counts jobs done itself
    running = body.get("runningJobs")
    if running is not None and not (isinstance(running, list) and all(isinstance(j, str) for j in running)):
        raise _invalid_field("runningJobs", "runningJobs must be a list of job ids")
    run = _run_id(body.get("run"), "run")
    polled = _optional_int(body, "polled")
    offers = _validate_resources(body, dict.fromkeys(r.column for r in RESOURCES))  # an agent restarted with new flags
    state = body.get("state")
    if state not in (None, WorkerState.AVAILABLE, WorkerState.PAUSED):
        raise _invalid_field("state", "state must be available or paused")
    paused_reason = _require_string(body, "pausedReason", required=False, max_length=200)
    now = await request.app[JOBS].heartbeat(worker, status, running, run, polled, offers, state, paused_reason)
    # pollKeepsAlive: an agent with nothing to tell may skip its heartbeats while a poll waits here.
    return _json({"success": True, "serverTime": now,
                  "nextCheckIn": int(request.app[CONFIG].heartbeat_interval * 1000), "pollKeepsAlive": True})


async def list_workers_view(request: web.Request) -> web.Response:
    _user(request)
    page = _page(request, WORKER_SORT_COLUMNS, "registeredAt", "id")
    status = request.query.get("status")
    if status not in (None, "online", "offline", "error"):
        raise _invalid_field("status", "status must be online, offline or error")
    tags = [t.strip() for t in request.query.get("tags", "").split(",") if t.strip()]
    total, rows = await request.app[STORE].list_workers(
        cutoff=request.app[JOBS].heartbeat_cutoff(), status=status, tags=tags, **page)
    return _page_json(page, total, "workers", [_worker_json(r, detail=False) for r in rows])


async def worker_view(request: web.Request) -> web.Response:
    _user(request)
    row = await request.app[STORE].worker_by_id(request.match_info["worker_id"], request.app[JOBS].heartbeat_cutoff())
    if row is None:
        raise NotFound("Worker not found")
    return _json({"success": True, "worker": _worker_json(row, detail=True)})


async def delete_worker_view(request: web.Request) -> web.Response:
    """Unregister: the token stops working at once and the worker's running jobs go back to the queue."""
    _user(request, admin=True)
    worker_id = request.match_info["worker_id"]
    if not await request.app[JOBS].forget_worker(worker_id):
        raise NotFound("Worker not found")
    log.info("worker %s unregistered", worker_id)
    return _json({"success": True, "message": "Worker unregistered"})


async def approve_worker_view(request: web.Request) -> web.Response:
    """Let a pending worker take jobs (approving an approved worker changes nothing)."""
    return await _move_worker(request, WorkerState.PENDING, WorkerState.AVAILABLE, "approved")


async def pause_worker_view(request: web.Request) -> web.Response:
    """Pause a worker: it takes no new job, and the jobs it runs finish (a pending worker stays pending)."""
    return await _move_worker(request, WorkerState.AVAILABLE, WorkerState.PAUSED, "paused")


async def resume_worker_view(request: web.Request) -> web.Response:
    """Let a worker an admin paused take jobs again."""
    return await _move_worker(request, WorkerState.PAUSED, WorkerState.AVAILABLE, "resumed")


async def _move_worker(request: web.Request, old: WorkerState, new: WorkerState, done: str) -> web.Response:
    """An admin moves the worker ``workerId`` from state ``old`` to ``new``; one in another state stays so."""
    principal = _user(request, admin=True)
    worker_id = _require_string(await _json_body(request), "workerId", max_length=128)
    state = await request.app[STORE].change_worker_state(worker_id, old, new)
    if state is None:
        raise NotFound("Worker not found")
    log.info("worker %s %s by %s", worker_id, done, principal.email)
    if new == WorkerState.AVAILABLE:
        request.app[ANNOUNCER].worker_available(worker_id)
    await request.app[JOBS].announce_worker(worker_id)
    return _json({"success": True, "workerId": worker_id, "state": state})


async def rotate_registration_token_view(request: web.Request) -> web.Response:
    """A new registration token; the old one stops working at once. Registered workers keep theirs."""
    principal = _user(request, admin=True)
    token = await request.app[REGISTRATION].rotate()
    log.info("registration token rotated by %s", principal.email)
    return _json({"success": True, "token": token})



# === HTTP: jobs ===


def _allowed_upload_hosts(request: web.Request) -> set[str]:
    hosts = {request.host}
    public = request.app[CONFIG].public_url
    if public:
        hosts.add(urllib.parse.urlsplit(public).netloc)
    return hosts


def _job_spec(request: web.Request, body: dict) -> dict:
    """The checked fields of a submit body (the input file is checked by ``Jobs.submit``)."""
    priority = body.get("priority", "normal")
    if not isinstance(priority, str) or priority not in PRIORITY_RANK:
        raise _invalid_field("priority", "priority must be low, normal or high")
    spec = {"command": _require_string(body, "command", max_length=MAX_COMMAND_BYTES), "priority": priority,
            "working_directory": _validate_working_directory(body.get("workingDirectory")),
            "timeout": _validate_timeout(body.get("timeout")), "tags": _validate_tags(body.get("tags")),
            "max_attempts": _optional_int(body, "maxAttempts", minimum=1, maximum=MAX_ATTEMPTS_LIMIT) or 3,
            "retries": _optional_int(body, "retries", minimum=0, maximum=MAX_RETRIES) or 0,
            **_validate_resources(body, {r.column: r.default for r in RESOURCES}),
            "after": _validate_after(body.get("after")), "file": None, "tree": None,
            "env": _validate_env(body.get("env"))}
    spec["artifact_patterns"], spec["artifacts_when"] = _validate_artifacts(body)
    if body.get("fileUrl") not in (None, ""):
        spec["file"] = _parse_upload_url(body["fileUrl"], _allowed_upload_hosts(request))
    if body.get("inputTree") is not None:
        if spec["file"]:
            raise _invalid_field("inputTree", "give fileUrl or inputTree, not both")
        spec["tree"] = _validate_input_tree(body["inputTree"])
    return spec


def _batch_specs(request: web.Request, items: Any) -> list[dict]:
    """The checked fields of each item of a batch submit; an error names the item (0-based)."""
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH_JOBS:
        raise _invalid_field("jobs", f"jobs must be a list of 1 to {MAX_BATCH_JOBS} submit bodies")
    specs = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise _invalid_item(index, "jobs", "each item must be a JSON object, a submit body")
        try:
            specs.append(_job_spec(request, item))
        except InvalidRequest as error:
            raise _invalid_item(index, error.details["field"], error.message) from None
    return specs


async def submit_view(request: web.Request) -> web.Response:
    """One job (the contract's body), or a batch, ``{"jobs": [body, ...]}``: all queued or none."""
    principal = _user(request)
    jobs = request.app[JOBS]
    body = await _json_body(request)
    if "jobs" in body:
        batch = await jobs.submit(principal, _batch_specs(request, body["jobs"]), batch=True)
        return _json({"success": True, "jobIds": [job["id"] for job in batch]}, status=201)
    [job] = await jobs.submit(principal, [_job_spec(request, body)])
    await asyncio.sleep(0)  # a worker woken for the job claims it now, before the estimate is made
    _, wait = await jobs.why_waiting(job, recent=True)
    return _json({"success": True, "jobId": job["id"], "status": JobState.QUEUED.value,
                  "createdAt": job["created_at"], "estimatedWaitTime": wait}, status=201)


async def status_view(request: web.Request) -> web.Response:
    _user(request)
    job_id = request.query.get("jobId")
    if not job_id:
        raise _invalid_field("jobId", "jobId is required")
    return _json({"success": True, "job": await request.app[JOBS].status(job_id)})


async def list_jobs_view(request: web.Request) -> web.Response:
    _user(request)
    page = _page(request, JOB_SORT_COLUMNS, "createdAt", "seq")
    status = request.query.get("status")
    if status is not None and status not in {s.value for s in JobState}:
        raise _invalid_field("status", f"status must be one of {', '.join(s.value for s in JobState)}")
    total, rows = await request.app[STORE].list_jobs(status=status, worker_id=request.query.get("workerId"), **page)
    return _page_json(page, total, "jobs", [job_json(row, JOB_SUMMARY) for row in rows])


async def claim_view(request: web.Request) -> web.Response:
    """A worker asks for work; with ``?wait=N`` the request waits up to N seconds for a job. An
    agent names its run and numbers its polls (``run``, ``poll``), so that its heartbeats can say
    which claims reached it."""
    worker = _worker(request)
    answer = await _next_job_answer(request, worker, *_poll_query(request.query))
    if answer is None:
        return web.Response(status=204)
    return _json({"success": True, "job": answer})


def _poll_query(query) -> tuple[float, Optional[str], Optional[int]]:
    """A poll's ``wait``, ``run`` and ``poll``: get-job's, and submit-result's with ``next=1``."""
    wait = _query_number(query, "wait", 0, 0, MAX_LONG_POLL_SECONDS, parse=float, what="a number of seconds")
    return wait, _run_id(query.get("run"), "run"), _query_number(query, "poll", None, 1, 2**62)


async def _next_job_answer(request: web.Request, worker: Principal, wait: float, run: Optional[str],
                           poll: Optional[int]) -> dict | None:
    """The job get-job hands the worker (claimed as its new attempt), or None: none came within
    ``wait`` seconds, the worker may take none now, or it hung up."""
    if worker.state != WorkerState.AVAILABLE:
        await _wait_for_approval(request, worker, wait)
        return None
    jobs = request.app[JOBS]
    job = await _claim_or_wait(request, worker, wait, run, poll)
    if job is None:
        return None
    if _client_gone(request):  # it hung up while we claimed: the job goes back, untouched
        await jobs.release(job)
        request.app[ANNOUNCER].job_ready(job)
        return None
    await jobs.deliver(job)
    answer = job_json(job, JOB_FOR_WORKER)
    if answer["fileUrl"]:
        answer["fileUrl"] = (request.app[CONFIG].public_url.rstrip("/") or f"{request.scheme}://{request.host}"
                             ) + answer["fileUrl"]
    answer["maxArtifactBytes"] = request.app[CONFIG].max_artifact_mb * 1024 * 1024  # not worth sending more
    return answer


async def _claim_or_wait(request: web.Request, worker: Principal, wait: float, run: Optional[str],
                         poll: Optional[int]) -> dict | None:
    """Claim the best job for the worker, waiting up to ``wait`` seconds for one to be announced.
    A wake-up this worker cannot use (it hung up, its claim took another job, or it has no room
    for the job) is passed on."""
    bell, jobs = request.app[BELL], request.app[JOBS]
    tags = frozenset(json.loads(worker.tags))
    deadline = _poll_deadline(wait)
    woken_by: Optional[Ring] = None
    while True:
        ring = bell.listen(tags, worker.id)
        try:
            job = await jobs.claim(worker, run, poll)
            if job is not None:
                if ring.done() and ring.result():  # it rang while we claimed, maybe for another job
                    bell.ring(*ring.result())
                return job
            if woken_by is not None and woken_by.tags is not None and await jobs.claimable(woken_by.job_id):
                # Not for us (no room): another worker may fit it. A job another claim took is not
                # passed on, or one lost race would wake every parked worker in turn.
                bell.ring(woken_by.tags, woken_by.passed | {worker.id}, woken_by.job_id)
            if deadline <= asyncio.get_running_loop().time() or bell.closed:
                return None
            woken_by = await bell.wait(ring, deadline)
            if _client_gone(request):
                if woken_by:
                    bell.ring(*woken_by)
                return None
            if woken_by is None:  # the wait ran out (the agent's next poll claims first anyway), or its worker went
                return None
        finally:
            bell.forget(ring)


async def _wait_for_approval(request: web.Request, worker: Principal, wait: float) -> None:
    """A worker that may take no job (pending, or paused by an admin) still waits out its poll, as
    an agent expects of an empty answer, and takes no wake-up meant for another worker; an approval
    or a resume (or a shutdown) ends the wait early."""
    bell = request.app[BELL]
    ring = bell.listen(None, worker.id)
    try:
        await bell.wait(ring, _poll_deadline(wait))
    finally:
        bell.forget(ring)


def _poll_deadline(wait: float) -> float:
    """When a poll that may wait ``wait`` seconds ends, on the loop's clock: a long one on a whole
    second, so that the polls of a large farm end, and come back, together: in a burst a request
    costs the server a quarter of the CPU it costs alone (bench/lone_requests.py)."""
    end = asyncio.get_running_loop().time() + wait
    return math.floor(end) if wait >= 2 else end


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _run_id(value: Any, field: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not RUN_ID_PATTERN.fullmatch(value):
        raise _invalid_field(field, f"{field} must be 1-64 letters, digits, '_' or '-'")
    return value


def _output_field(body: dict, field: str) -> str:
    value = body.get(field, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid_field(field, f"{field} must be a string")
    return value


def _running_for(body: dict) -> Optional[float]:
    """Seconds the attempt's command has run on the agent (it starts the timeout's clock)."""
    value = body.get("runningFor")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2 * MAX_JOB_TIMEOUT:
        raise _invalid_field("runningFor", "runningFor must be the seconds the command has run")
    return float(value)


async def stream_output_view(request: web.Request) -> web.Response:
    """Append a chunk of output. An empty chunk is a keep-alive: its 409 tells the worker the job
    is no longer its own (cancelled, or given to another attempt). ``suspended`` says whether the
    worker has stopped the job's processes for now."""
    worker = _worker(request)
    body = await _json_body(request)
    job_id = _require_string(body, "jobId", max_length=128)
    stream = body.get("type", "stdout")
    if stream not in ("stdout", "stderr"):
        raise _invalid_field("type", "type must be stdout or stderr")
    if not isinstance(body.get("data"), str):
        raise _invalid_field("data", "data is required (a string)")
    suspended = body.get("suspended")
    if suspended is not None and not isinstance(suspended, bool):
        raise _invalid_field("suspended", "suspended must be true or false")
    await request.app[JOBS].record_output(
        worker, job_id, _optional_int(body, "attempt", minimum=1), stream, body["data"],
        _optional_int(body, "progress", minimum=0, maximum=100), _running_for(body), suspended)
    return _json({"success": True, "received": True})


async def submit_result_view(request: web.Request) -> web.Response:
    """The worker's final word on its attempt. stdout/stderr here are appended to what was streamed.
    With ``evicted`` (why), the worker killed it to make way for its owner: it goes back to the
    queue, at no cost to its retries or maxAttempts.

    With ``?next=1`` (and get-job's ``wait``, ``run``, ``poll``) the answer also carries ``next``:
    the worker's next job as get-job would hand it over, or null. A busy agent then needs one
    request per job."""
    worker = _worker(request)
    query = request.query
    next_poll = _poll_query(query) if _query_number(query, "next", 0, 0, 1) else None  # checked before the finish
    body = await _json_body(request)
    job_id = _require_string(body, "jobId", max_length=128)
    if body.get("workerId") not in (None, worker.id):
        raise Forbidden("workerId does not match the worker token")
    exit_code = body.get("exitCode")
    if isinstance(exit_code, bool) or not isinstance(exit_code, int) or not -(2**31) <= exit_code < 2**31:
        raise _invalid_field("exitCode", "exitCode is required (an integer)")
    output = {stream: _output_field(body, stream) for stream in ("stdout", "stderr")}
    error = body.get("error")
    if error is not None and not isinstance(error, str):
        raise _invalid_field("error", "error must be a string")
    evicted = _require_string(body, "evicted", required=False, max_length=200)
    _running_for(body)  # checked; the attempt ends here, so when its command started no longer matters
    await request.app[JOBS].finish(worker, job_id, _optional_int(body, "attempt", minimum=1), exit_code, error,
                                   output, evicted)
    answer = {"success": True, "message": "Result saved", "jobId": job_id}
    if next_poll is not None:
        answer["next"] = await _next_job_answer(request, worker, *next_poll)
    return _json(answer)


async def cancel_view(request: web.Request) -> web.Response:
    principal = _user(request)
    job_id = _require_string(await _json_body(request), "jobId", max_length=128)
    await request.app[JOBS].cancel(principal, job_id)
    return _json({"success": True, "jobId": job_id, "status": JobState.CANCELLED.value})


async def events_view(request: web.Request) -> web.WebSocketResponse:
    """WebSocket of job events; ``?jobId=`` narrows to one job. Users only, same origin only. It is
    closed when the client falls too far behind, or when its token or user stops being valid."""
    principal = _user(request)
    origin = request.headers.get("Origin")
    if origin is not None and not _is_allowed_origin(request, origin):
        raise Forbidden("Cross-origin WebSocket refused", code="CROSS_ORIGIN")
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    hub = request.app[HUB]
    feed = hub.subscribe(ws, principal, request.query.get("jobId"))

    async def send_events() -> None:
        while (message := await feed.next()) is not None:
            await ws.send_str(message)
        code, reason = feed.closed_with
        await ws.close(code=code, message=reason.encode())

    sender = asyncio.create_task(send_events())
    try:
        async for _message in ws:
            pass  # clients only listen; reading keeps pings and the close handshake going
    finally:
        hub.unsubscribe(ws)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
            await sender
    return ws


# === HTTP: follow, artifacts, blobs ===


def _sse(event: str, data: dict) -> bytes:
    """One server-sent event (JSON never holds a raw newline, so one data line is enough)."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class _OutputJoin:
    """Joins a job's output history and its live chunks by offsets, as the page does: what the
    history (or an earlier chunk) covered is trimmed or skipped; a new attempt starts afresh."""

    def __init__(self, attempt: int, known: dict[str, int]):
        self.attempt, self.known = attempt, known

    def chunk(self, event: dict) -> Optional[dict]:
        """The part of an output event not shown yet (with its offset), or None."""
        attempt = event.get("attempt", self.attempt)
        if attempt < self.attempt:
            return None  # the last words of an earlier attempt
        if attempt > self.attempt:
            self.attempt, self.known = attempt, {"stdout": 0, "stderr": 0}
        stream, offset, data = event["stream"], event["offset"], event["data"]
        known, end = self.known[stream], event["offset"] + len(event["data"])
        if end <= known:
            return None
        if offset < known:
            data, offset = data[known - offset:], known
        self.known[stream] = end  # past what is shown (never while subscribed): shown anyway
        return {**event, "offset": offset, "data": data}


async def follow_view(request: web.Request) -> web.StreamResponse:
    """Server-sent events of one job, for curl -N and scripts: ``job.status``, the output so far
    (``job.output`` with ``history``), then live ``job.output`` (with offsets) and state events, and
    at the end ``job.end`` (the final status); then it closes. ``follow.interrupted`` ends it early
    (the client fell too far behind, its token ended, the server stops): follow again to go on."""
    principal = _user(request)
    job_id = request.query.get("jobId")
    if not job_id:
        raise _invalid_field("jobId", "jobId is required")
    hub, jobs = request.app[HUB], request.app[JOBS]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})  # nginx: pass each event on at once
    feed = hub.subscribe(response, principal, job_id)  # before the history: nothing falls in between
    try:
        job = await jobs.status(job_id)
        await response.prepare(request)
        await _follow(response, feed, job, jobs, request.app[CONFIG].max_output_mb * 1024 * 1024)
    except ConnectionResetError:
        pass  # the client went away
    finally:
        hub.unsubscribe(response)
    return response


async def _follow(response: web.StreamResponse, feed: Feed, job: dict, jobs: Jobs, cap: int) -> None:
    job_id = job["jobId"]
    fields = {k: v for k, v in job.items() if k not in STREAMS}
    await response.write(_sse("job.status", {"type": "job.status", **fields}))
    known = {}
    for stream in STREAMS:
        text, chars = job[stream], job[f"{stream}Chars"]
        # The history's text ends where the stream ended when it was read, which may be past the count
        # read just before it; a capped stream's text has a marker instead of its middle.
        known[stream] = chars if chars > cap else len(text)
        if text:
            await response.write(_sse("job.output", {"type": "job.output", "jobId": job_id, "attempt": job["attempts"],
                                                     "stream": stream, "offset": 0, "data": text, "history": True}))
    join = _OutputJoin(job["attempts"], known)
    status = job["status"]
    while status not in FINISHED_STATES:
        try:
            async with asyncio.timeout(SSE_KEEPALIVE_SECONDS):
                message = await feed.next()
        except TimeoutError:
            await response.write(b": keep-alive\n\n")
            continue
        if message is None:
            await response.write(_sse("follow.interrupted", {"type": "follow.interrupted", "jobId": job_id,
                                                             "reason": feed.closed_with[1]}))
            return
        event = json.loads(message)
        if event["type"] == "job.output":
            if chunk := join.chunk(event):
                await response.write(_sse("job.output", chunk))
            continue
        await response.write(_sse(event["type"], event))
        status = event.get("status", status)
    await response.write(_sse("job.end", {"type": "job.end", **job_json(await jobs.find(job_id), JOB_STATUS)}))
    await response.write_eof()


class _ContentResponse(web.StreamResponse):
    """Stored contents ((key, size) each), one after the other, sent as they are read: never whole in
    memory. A content that goes meanwhile (swept, or sent again by its attempt) cuts the answer
    short and closes the connection: the client sees it incomplete, never mixed."""

    def __init__(self, contents: _DiskContents | _DatabaseContents, parts: list[tuple[str, int]], headers: dict):
        super().__init__(headers=headers)
        self.content_length = sum(size for _, size in parts)
        self._contents, self._parts = contents, parts

    async def prepare(self, request: web.BaseRequest):
        writer = await super().prepare(request)
        if request.method == "HEAD":
            return writer
        try:
            for key, size in self._parts:
                async for piece in self._contents.read(key, size):
                    await self.write(piece)
        except (ContentGone, DatabaseUnavailable) as exc:
            log.warning("%s %s cut short: %s", request.method, request.path, exc)
            raise ConnectionResetError(str(exc)) from None  # aiohttp closes the connection, quietly
        return writer


def _content_response(contents: _DiskContents | _DatabaseContents, key: str, size: int,
                      headers: dict) -> web.StreamResponse:
    """A stored content as the answer: a file as aiohttp sends files (sendfile, ranges), rows as
    they are read."""
    path = contents.file_path(key)
    return web.FileResponse(path, headers=headers) if path else _ContentResponse(contents, [(key, size)], headers)


async def artifacts_upload_view(request: web.Request) -> web.Response:
    """A worker sends the artifacts zip of the attempt it holds, before its result: multipart
    fields ``jobId`` and ``attempt``, then ``file``. Stored as it arrives; past DISPATCH_MAX_ARTIFACT_MB
    it is refused (413) and the job's result will say so."""
    worker = _worker(request)
    config, jobs, contents = request.app[CONFIG], request.app[JOBS], request.app[CONTENTS]
    receiver: Optional[_Receiver] = None
    with _receiving(request):
        try:
            reader = await request.multipart()
            fields, part = await _fields_before_file(request, reader, ("jobId", "attempt"))
            job_id, attempt = fields.get("jobId"), fields.get("attempt")
            if not job_id:
                raise _invalid_field("jobId", "jobId is required (a field before the file)")
            if attempt is not None and not re.fullmatch(r"[1-9][0-9]{0,8}", attempt):
                raise _invalid_field("attempt", "attempt must be a whole number from 1")
            # Before a byte of the file is stored; the attempt it belongs to from now on.
            attempt = (await jobs.held(worker, job_id, attempt and int(attempt)))["attempt"]
            too_big = (f"artifacts too big: more than {config.max_artifact_mb} MB (DISPATCH_MAX_ARTIFACT_MB); "
                       "none were kept")
            receiver = contents.receiver(_artifacts_key(job_id, attempt), config.max_artifact_mb * 1024 * 1024,
                                         lambda: PayloadTooLarge(too_big, code="ARTIFACTS_TOO_LARGE"),
                                         tail=ZIP_TAIL_BYTES)
            try:
                await _receive_part(request, part, receiver)
            except PayloadTooLarge:
                with contextlib.suppress(DispatchError):
                    await jobs.record_artifacts(worker, job_id, attempt, {"artifacts_error": too_big})
                raise
            files = _zip_entry_count(receiver.tail, receiver.size)
            if files is None:
                raise InvalidFile("The artifacts file is not a zip", code="NOT_A_ZIP")
            await jobs.held(worker, job_id, attempt)
            await contents.keep([receiver])  # in place of what the attempt sent before, if it sends again
            try:
                job = await jobs.record_artifacts(worker, job_id, attempt,
                                                  {"size": receiver.size, "files": files, "sha256": receiver.sha256})
            except DispatchError:
                await contents.delete([receiver.key])
                raise
        except (ValueError, AssertionError, KeyError, HttpProcessingError):
            raise InvalidFile("Expected multipart/form-data with the fields jobId and attempt, then file",
                              code="MALFORMED_UPLOAD") from None
        finally:
            if receiver is not None:
                await receiver.discard()
    await contents.delete([_artifacts_key(job_id, earlier) for earlier in range(1, attempt)])  # no longer shown
    request.app[METRICS].upload_bytes.inc(receiver.size)
    return _json({"success": True, "jobId": job_id, "artifacts": _artifacts_json(job)}, status=201)


async def artifacts_download_view(request: web.Request) -> web.StreamResponse:
    """The artifacts zip of a job's current attempt: its owner and admins only."""
    principal = _user(request)
    job_id = request.query.get("jobId")
    if not job_id:
        raise _invalid_field("jobId", "jobId is required")
    job = await request.app[JOBS].find(job_id)
    if job["submitted_by"] != principal.id and not principal.is_admin:
        raise Forbidden("Only the job's owner or an admin may download its artifacts")
    contents, key = request.app[CONTENTS], _artifacts_key(job["id"], job["attempt"])
    if _artifacts_json(job) is None or await contents.missing([key]):
        why = job["artifacts_error"] if job["artifacts_attempt"] == job["attempt"] else None
        raise NotFound(f"This job has no artifacts{': ' + why if why else ''}", code="NO_ARTIFACTS")
    return _content_response(contents, key, job["artifacts_size"], {
        "Content-Type": "application/zip", "Content-Disposition": f'attachment; filename="{job["id"]}-artifacts.zip"'})


def _hash_list(value: Any, field: str, limit: int) -> list[str]:
    if not isinstance(value, list) or len(value) > limit or not all(
            isinstance(h, str) and SHA256_PATTERN.fullmatch(h) for h in value):
        raise _invalid_field(field, f"{field} must be a list of at most {limit} SHA-256 hashes "
                                    "(64 lowercase hex digits each)")
    return value


async def blobs_missing_view(request: web.Request) -> web.Response:
    """Which of these contents the caller must send (PUT) before naming them in an inputTree."""
    principal = _user(request)
    hashes = _hash_list((await _json_body(request)).get("sha256"), "sha256", MAX_MISSING_QUERY)
    return _json({"success": True, "missing": await request.app[BLOBS].missing(principal, hashes)})


async def blob_put_view(request: web.Request) -> web.Response:
    """Store one blob: the body is the content, refused unless its SHA-256 is the one in the path.
    Stored as it arrives; the upload size limit applies."""
    principal = _user(request)
    sha256 = request.match_info["sha256"]
    if not SHA256_PATTERN.fullmatch(sha256):
        raise _invalid_field("sha256", "a blob's name is the SHA-256 of its content: 64 lowercase hex digits")
    config, blobs = request.app[CONFIG], request.app[BLOBS]
    if request.content_length is not None and request.content_length > blobs.max_bytes:
        raise _too_large(config)
    receiver = blobs.receiver(sha256, lambda: _too_large(config))
    with _receiving(request):
        try:
            while chunk := await _in_time(request, request.content.readany()):
                await receiver.write(chunk)
            await blobs.keep(principal, [(sha256, receiver)])
        finally:
            await receiver.discard()
    request.app[METRICS].upload_bytes.inc(receiver.size)
    return _json({"success": True, "sha256": sha256, "size": receiver.size}, status=201)


_BATCH_LINE = re.compile(rb"([0-9a-f]{64}) ([0-9]{1,15})\n")


async def blobs_batch_view(request: web.Request) -> web.Response:
    """Store many blobs in one request (each request counts against the rate limit). The body is,
    for each blob, a line ``<sha256> <size>`` and then exactly that many bytes: far cheaper to read
    than a multipart part per small file. All are stored, or (one does not match its hash) none."""
    principal = _user(request)
    config, blobs = request.app[CONFIG], request.app[BLOBS]
    received: list[tuple[str, _Receiver]] = []
    body = request.content
    with _receiving(request):
        try:
            while line := await _in_time(request, body.readline()):
                header = _BATCH_LINE.fullmatch(line)
                if header is None:
                    raise InvalidFile("Each blob starts with a line '<sha256> <size>' (64 lowercase hex digits, a "
                                      "space, its size in bytes), then its content", code="MALFORMED_UPLOAD")
                if len(received) == MAX_FETCH_BLOBS:
                    raise InvalidFile(f"At most {MAX_FETCH_BLOBS} blobs per request", code="TOO_MANY_BLOBS")
                left = int(header[2])
                if left > blobs.max_bytes:
                    raise _too_large(config)
                sha256 = header[1].decode()
                receiver = blobs.receiver(sha256, lambda: _too_large(config))
                received.append((sha256, receiver))
                while left:
                    chunk = await _in_time(request, body.read(min(left, 256 * 1024)))
                    if not chunk:
                        raise InvalidFile("The body ended inside a blob", code="TRUNCATED_UPLOAD")
                    await receiver.write(chunk)
                    left -= len(chunk)
                await receiver.finish()
            if not received:
                raise InvalidFile("No blobs: send a line '<sha256> <size>' and the content for each",
                                  code="MISSING_FILE")
            await blobs.keep(principal, received)
        except ValueError:  # a line far too long: no header
            raise InvalidFile("Each blob starts with a line '<sha256> <size>'", code="MALFORMED_UPLOAD") from None
        finally:
            for _, receiver in received:
                await receiver.discard()
    size = sum(receiver.size for _, receiver in received)
    request.app[METRICS].upload_bytes.inc(size)
    return _json({"success": True, "stored": len(received), "size": size}, status=201)


async def blobs_fetch_view(request: web.Request) -> web.StreamResponse:
    """A worker fetches blobs of the input tree of a job it holds: the answer is their contents
    one after the other, in the order asked (the tree says each one's size; the agent checks each
    one's hash)."""
    worker = _worker(request)
    body = await _json_body(request)
    job_id = _require_string(body, "jobId", max_length=128)
    attempt = _optional_int(body, "attempt", minimum=1)
    hashes = _hash_list(body.get("sha256"), "sha256", MAX_FETCH_BLOBS)
    await request.app[JOBS].held(worker, job_id, attempt)
    sizes = await request.app[STORE].blobs_of_held_job(worker.id, job_id, attempt, hashes)
    if sizes is None:
        raise Forbidden("A worker may fetch only blobs of the input tree of a job it holds")
    contents, keys = request.app[CONTENTS], [Blobs.key(sha256) for sha256 in hashes]
    gone = await contents.missing(keys)
    for sha256, key in zip(hashes, keys):
        if key in gone:
            raise NotFound(f"Blob {sha256} is missing on the server: submit the job again", code="BLOB_MISSING")
    return _ContentResponse(contents, [(key, sizes[sha256]) for sha256, key in zip(hashes, keys)],
                            {"Content-Type": "application/octet-stream"})


@contextlib.contextmanager
def _receiving(request: web.Request):
    """A request body being received: aiohttp reads no more request bodies once shutdown begins,
    so a stop cancels it (and its partial files are removed)."""
    uploading = request.app[UPLOADS_IN_PROGRESS]
    uploading.add(asyncio.current_task())
    try:
        yield
    finally:
        uploading.discard(asyncio.current_task())


async def _fields_before_file(request: web.Request, reader, names: tuple[str, ...]) -> tuple[dict[str, str], Any]:
    """The short text fields ``names`` that come before the multipart ``file`` part, and that part."""
    fields: dict[str, str] = {}
    while (part := await _in_time(request, reader.next())) is not None:
        if part.name == "file":
            return fields, part
        if part.name in names:
            value = b""
            while chunk := await _in_time(request, part.read_chunk(1024)):
                value += chunk
                if len(value) > 256:
                    raise _invalid_field(part.name, f"{part.name} is too long")
            fields[part.name] = value.decode(errors="replace")
        else:
            await part.release()
    raise InvalidFile("Form field 'file' is required", code="MISSING_FILE", details={"field": "file"})


async def _receive_part(request: web.Request, part, receiver: _Receiver) -> None:
    while chunk := await _in_time(request, part.read_chunk(256 * 1024)):
        await receiver.write(chunk)
    if not part.at_eof():  # the body ended inside the part: keeping it would keep a truncated file
        raise InvalidFile("The upload ended before the file did", code="TRUNCATED_UPLOAD")


# === HTTP: files and operations ===



async def page_view(request: web.Request) -> web.FileResponse:
    """The web page: one self-contained file, no build step, nothing loaded from elsewhere."""
    return web.FileResponse(PAGE_PATH, headers={
        "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache",
        "Content-Security-Policy": PAGE_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin"})



async def health_view(request: web.Request) -> web.Response:
    """For monitors, without auth: 200 while the database takes writes, 503 otherwise."""
    app = request.app
    store = app[STORE]
    await store.prove_writable()
    counts = await store.counts(app[JOBS].heartbeat_cutoff())
    return _json({"status": "ok", "version": __version__, "uptimeSeconds": round(time.monotonic() - app[STARTED], 1),
                  "queueDepth": sum(counts["queue"].values()), "runningJobs": counts["jobs"].get("running", 0),
                  "onlineWorkers": counts["workers"].get("online", 0)})


async def metrics_view(request: web.Request) -> web.Response:
    """Prometheus text format. Open to loopback; elsewhere only with DISPATCH_METRICS_TOKEN."""
    app = request.app
    token = app[CONFIG].metrics_token
    offered = _bearer(request) or ""
    caller = _client_ip(request, app[CONFIG].trusted_proxy_list)  # a local proxy must not open it to all
    if not _is_loopback(caller) and not (token and hmac.compare_digest(offered.encode(), token.encode())):
        raise Forbidden("Metrics are open to loopback only; elsewhere send Authorization: Bearer "
                        "<DISPATCH_METRICS_TOKEN>", code="METRICS_FORBIDDEN")
    app[METRICS].set_counts(await app[STORE].counts(app[JOBS].heartbeat_cutoff()))
    return web.Response(body=generate_latest(app[METRICS].registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False


# -- files ----------------------------------------------------------------------


async def upload_view(request: web.Request) -> web.Response:
    """Store a multipart ``file`` as it arrives, never whole in memory. Over the limit, cut short or
    malformed, it is refused and nothing is kept."""
    principal = _user(request)
    config, contents = request.app[CONFIG], request.app[CONTENTS]
    limit = config.max_upload_mb * 1024 * 1024
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise _too_large(config)
    file_id = _new_id("file")
    receiver: Optional[_Receiver] = None
    with _receiving(request):
        try:
            part = await _in_time(request, _next_file_field(await request.multipart()))
            name = _safe_filename(part.filename)
            receiver = contents.receiver(_upload_key(file_id, name), limit, lambda: _too_large(config))
            await _receive_part(request, part, receiver)
            now = request.app[CLOCK].now()
            record = {"id": file_id, "name": name, "size": receiver.size, "sha256": receiver.sha256,
                      "owner_id": principal.id, "uploaded_at": _iso(now),
                      "expires_at": _iso(now + dt.timedelta(days=config.file_ttl_days))}
            await _keep_upload(request.app[STORE], contents, receiver, record)
        except (ValueError, AssertionError, KeyError, HttpProcessingError):
            raise InvalidFile("Expected multipart/form-data with a 'file' field", code="MALFORMED_UPLOAD") from None
        finally:
            if receiver is not None:
                await receiver.discard()
    request.app[METRICS].upload_bytes.inc(receiver.size)
    return _json({"success": True, "fileId": file_id, "filename": name, "size": receiver.size,
                  "sha256": receiver.sha256, "uploadedAt": record["uploaded_at"], "url": _upload_url(file_id, name),
                  "expiresAt": record["expires_at"]}, status=201)


async def _keep_upload(store: Store, contents: _DiskContents | _DatabaseContents, receiver: _Receiver,
                       record: dict) -> None:
    """Put a received file in place and record it: both, or neither (no content without a record)."""
    await contents.keep([receiver])
    try:
        await store.insert_file(record)
    except BaseException:
        await contents.delete([receiver.key])
        raise


def _too_large(config: Config) -> InvalidFile:
    return InvalidFile(f"File size exceeds {config.max_upload_mb}MB limit", code="FILE_TOO_LARGE")


async def _next_file_field(reader) -> Any:
    while (part := await reader.next()) is not None:
        if part.name == "file":
            return part
        await part.release()
    raise InvalidFile("Form field 'file' is required", code="MISSING_FILE", details={"field": "file"})


async def download_view(request: web.Request) -> web.StreamResponse:
    """The file by id (``/api/files/download/{id}``) or by its upload URL (``/uploads/{id}/{name}``)."""
    principal = request[PRINCIPAL]
    if principal is None:
        raise Unauthorized("Authentication required")
    file_id = request.match_info["file_id"]
    store = request.app[STORE]
    record = await store.file_by_id(file_id) if FILE_ID_PATTERN.fullmatch(file_id) else None
    if record is None or request.match_info.get("name", record["name"]) != record["name"]:
        raise NotFound("File not found")
    allowed = (await store.worker_holds_file(principal.id, file_id) if principal.kind == "worker"
               else _file_is_readable_by(principal, record))
    if not allowed:
        raise Forbidden("Permission denied")
    contents, key = request.app[CONTENTS], _upload_key(file_id, record["name"])
    if await contents.missing([key]):
        raise NotFound("File not found")
    content_type = mimetypes.guess_type(record["name"])[0] or "application/octet-stream"
    quoted = urllib.parse.quote(record["name"])
    return _content_response(contents, key, record["size"], {
        "Content-Type": content_type,
        "Content-Disposition": f"attachment; filename=\"{record['name']}\"; filename*=UTF-8''{quoted}"})



# === App: resources, background tasks, the route table ===



async def _storage_ctx(app: web.Application):
    """Open the database and the secrets (in the data dir, or with PostgreSQL in the database);
    create the first admin on first start."""
    config = app[CONFIG]
    _make_data_dir_private(config.data_path)
    app[STORE] = store = await Store.open(config.database, app[CLOCK])
    app[REGISTRATION] = RegistrationToken(config, store)
    await app[REGISTRATION].load()
    jwt_secret = secrets.token_hex(32)
    app[TOKENS] = Tokens(await store.shared_secret("jwt_secret", jwt_secret) if store.shared else
                         _read_or_create_secret(config.data_path / "jwt_secret", lambda: jwt_secret))
    if store.shared:
        app[CLUSTER] = Cluster(store.engine, app[HUB], app[BELL], app[CLOCK])
        await app[CLUSTER].start()
    app[ANNOUNCER] = Announcer(app[HUB], app[BELL], app[METRICS], app[CLUSTER])
    app[JOBS] = Jobs(store, config, app[CLOCK], app[ANNOUNCER])
    app[CONTENTS] = contents = (_DatabaseContents(_FileChunks(store.engine), app[CLOCK]) if config.database_url
                                else _DiskContents(config.data_path))
    await contents.clean()
    app[BLOBS] = Blobs(store, contents, config.max_upload_mb * 1024 * 1024)
    if await store.count_users() == 0:
        password = config.admin_password or secrets.token_urlsafe(12)
        with contextlib.suppress(Conflict):  # another server starting on the same database came first
            await create_user(store, config.admin_email, password, "admin", config.bcrypt_rounds)
            app[FIRST_ADMIN] = (config.admin_email, "" if config.admin_password else password)
    yield
    await store.close()


async def _sweeper_ctx(app: web.Application):
    """Background work: the database's checkpoint, and lost and overdue jobs, often (a dead
    worker's jobs must move on within a second of it being declared offline); uploads, revocations,
    and jobs and workers past retention every minute. With several servers on PostgreSQL, one of
    them sweeps (see ``Cluster``), and each passes events to the others."""
    job_period = min(1.0, app[CONFIG].heartbeat_interval / 2)
    cluster = app[CLUSTER]

    async def sweep_forever() -> None:
        next_storage_sweep = next_polls_noted = 0.0
        while True:
            try:
                await app[STORE].checkpoint()
                await app[REGISTRATION].refresh()
                if time.monotonic() >= next_polls_noted:
                    await app[STORE].heard_from(app[BELL].take_polled())
                    next_polls_noted = time.monotonic() + app[CONFIG].heartbeat_interval
                if cluster is None or await cluster.lead():
                    await app[JOBS].sweep()
                    if time.monotonic() >= next_storage_sweep:
                        await _sweep_storage(app)
                        next_storage_sweep = time.monotonic() + SWEEP_INTERVAL
            except Exception:
                log.exception("sweep failed; trying again")
            await asyncio.sleep(job_period)

    tasks = [asyncio.create_task(sweep_forever())] + ([asyncio.create_task(cluster.run())] if cluster else [])
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _sweep_storage(app: web.Application) -> None:
    store, contents = app[STORE], app[CONTENTS]
    now = app[CLOCK].now()
    while expired := await store.expired_files():
        await contents.delete([_upload_key(record["id"], record["name"]) for record in expired])
        for record in expired:
            await store.delete_file(record["id"])
    await store.purge_revoked_tokens(int(now.timestamp()))
    await app[JOBS].forget_silent_workers(app[CONFIG].worker_retention_days)
    await store.forget_events(_iso(now - EVENTS_KEPT))
    old = _iso(now - dt.timedelta(days=app[CONFIG].job_retention_days))
    while expiring := await store.forget_artifacts_of_finished_jobs(old):  # artifacts expire with their job
        await contents.delete([_artifacts_key(job["id"], attempt) for job in expiring
                               for attempt in range(1, job["attempt"] + 1)])
    while await store.delete_finished_jobs(old):
        await asyncio.sleep(0)  # small batches, so requests go on in between
    unused = _iso(now - dt.timedelta(days=app[CONFIG].file_ttl_days))
    while swept := await store.expire_trees_and_blobs(unused):
        await app[BLOBS].sweep(swept)
        await asyncio.sleep(0)


async def _on_shutdown(app: web.Application) -> None:
    app[BELL].close()  # long-polls answer 204 now
    await app[HUB].close_all()
    for upload in app[UPLOADS_IN_PROGRESS]:
        upload.cancel()  # its body would never arrive; the partial file is removed


def create_app(config: Config, *, clock: Optional[Clock] = None) -> web.Application:
    """The dispatch web application, ready for ``web.run_app`` or embedding. A test may pass a
    clock it moves itself."""
    app = web.Application(middlewares=[access_middleware, error_middleware, auth_middleware],
                          client_max_size=MAX_REQUEST_BODY, handler_args={"logger": server_log})
    app[CONFIG] = config
    app[CLOCK] = clock or Clock()
    app[BELL] = QueueBell()
    app[HUB] = EventHub()
    app[CLUSTER] = None
    app[RATE_LIMITER] = RateLimiter()
    app[METRICS] = Metrics()
    app[METRICS].websocket_clients.set_function(lambda: app[HUB].client_count)
    app[METRICS].websocket_backlog.set_function(lambda: app[HUB].backlog_bytes)
    app[STARTED] = time.monotonic()
    app[UPLOADS_IN_PROGRESS] = set()
    app.cleanup_ctx.extend([_storage_ctx, _sweeper_ctx])
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(_add_rate_limit_headers)
    routes = [
        web.post(LOGIN_PATH, login_view),
        web.post("/api/auth/logout", logout_view),
        web.post(REFRESH_PATH, refresh_view),
        web.get("/api/auth/me", whoami_view),
        web.post("/api/auth/tokens", create_api_token_view),
        web.get("/api/auth/tokens", list_api_tokens_view),
        web.delete("/api/auth/tokens/{token_id}", delete_api_token_view),
        web.get("/api/users", list_users_view),
        web.post("/api/users", add_user_view),
        web.delete("/api/users/{user_id}", delete_user_view),
        web.post("/api/workers/register", register_view),
        web.post("/api/workers/heartbeat", heartbeat_view),
        web.get("/api/workers/list", list_workers_view),
        web.get("/api/workers/{worker_id}", worker_view),
        web.delete("/api/workers/{worker_id}", delete_worker_view),
        web.post("/api/workers/approve", approve_worker_view),
        web.post("/api/workers/pause", pause_worker_view),
        web.post("/api/workers/resume", resume_worker_view),
        web.post("/api/workers/registration-token", rotate_registration_token_view),
        web.post("/api/jobs/submit", submit_view),
        web.get("/api/jobs/status", status_view),
        web.get("/api/jobs/list", list_jobs_view),
        web.get("/api/jobs/get-job", claim_view),
        web.post("/api/jobs/stream-output", stream_output_view),
        web.post("/api/jobs/submit-result", submit_result_view),
        web.post("/api/jobs/cancel", cancel_view),
        web.get("/api/jobs/follow", follow_view),
        web.post(ARTIFACTS_PATH, artifacts_upload_view),
        web.get(ARTIFACTS_PATH, artifacts_download_view),
        web.post("/api/blobs/missing", blobs_missing_view),
        web.post("/api/blobs/batch", blobs_batch_view),
        web.post("/api/blobs/fetch", blobs_fetch_view),
        web.put("/api/blobs/{sha256}", blob_put_view),
        web.post("/api/files/upload", upload_view),
        web.get("/api/files/download/{file_id}", download_view),
        web.get(UPLOAD_ROUTE, download_view),
        web.get("/", page_view),
        web.get("/api/health", health_view),
        web.get("/metrics", metrics_view),
    ]
    app.add_routes(routes)
    websocket = app.router.add_get("/api/jobs/stream", events_view)
    if config.cors_origin_list:
        options = aiohttp_cors.ResourceOptions(allow_credentials=True, expose_headers="*", allow_headers="*")
        cors = aiohttp_cors.setup(app, defaults={origin: options for origin in config.cors_origin_list})
        for route in list(app.router.routes()):
            if route is not websocket:
                cors.add(route)
    return app


# === CLI ===



def _build_parser() -> argparse.ArgumentParser:
    env_help = "\n".join(f"  {s.env:<30} {s.help} (default: {s.default!r})" for s in SETTINGS)
    parser = argparse.ArgumentParser(
        prog="dispatch.py", description="dispatch: a job farm for a LAN. Runs the server.",
        epilog=f"""commands (each takes --data-dir too, before or after its name):
  user add EMAIL [--role admin|user] [--password-stdin] [--create]
                                 add a user (the password from a prompt or standard input)
  user set-password EMAIL [--password-stdin]
                                 set a user's password (a lost first admin's, say)
  backup FILE                    a consistent copy of the database, safe while the server runs
                                 (SQLite; with PostgreSQL, pg_dump backs up everything)

environment variables (flags win over them):
{env_help}""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dispatch {__version__}")
    for s in SETTINGS:
        if s.flag:
            parser.add_argument(s.flag, dest=s.field, type=s.kind, help=f"{s.help} (env {s.env}, default {s.default})")
    # A subcommand's own --data-dir sets the same value; SUPPRESS keeps it from resetting one given before.
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", dest="data_dir", default=argparse.SUPPRESS, help="as above")
    commands = parser.add_subparsers(dest="command", metavar="{user,backup}")
    user = commands.add_parser("user", help="manage users: user add EMAIL, user set-password EMAIL")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    add = user_commands.add_parser("add", parents=[data_dir], help="add a user")
    add.add_argument("email")
    add.add_argument("--role", choices=["admin", "user"], default="user")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--create", action="store_true", help="create the data dir and its database if there is none")
    set_password = user_commands.add_parser("set-password", parents=[data_dir], help="set a user's password")
    set_password.add_argument("email")
    set_password.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    backup = commands.add_parser("backup", parents=[data_dir], help="backup FILE: a consistent copy of the "
                                                                   "database, safe while the server runs")
    backup.add_argument("file", type=Path)
    return parser


def _lan_address() -> str:
    """The address other machines most likely reach this one at (the hostname often resolves to
    127.0.1.1). Connecting a UDP socket sends nothing: it only asks which interface routes there."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostname()


class CommandError(Exception):
    """A command-line mistake, told in one sentence (exit code 2)."""


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise CommandError("there is no terminal to ask for the password: pipe it in with --password-stdin")
    return getpass.getpass(f"Password for {args.email}: ")


async def _user_command(config: Config, args: argparse.Namespace) -> str:
    """``user add`` and ``user set-password``; returns what was done."""
    database = config.database
    if isinstance(database, Path) and not database.exists() and not getattr(args, "create", False):
        raise CommandError(f"there is no dispatch database in {config.data_path}: give the server's --data-dir "
                           f"(or DISPATCH_DATA_DIR){', or add --create to start a new one' if args.user_command == 'add' else ''}")
    password = _read_password(args)
    _make_data_dir_private(config.data_path)
    store = await Store.open(database)
    try:
        if args.user_command == "add":
            await create_user(store, args.email, password, args.role, config.bcrypt_rounds)
            return f"added {args.role} {args.email}"
        await set_password(store, args.email, password, config.bcrypt_rounds)
        return f"set the password of {args.email}"
    finally:
        await store.close()


def backup_database(config: Config, target: Path) -> None:
    """Copy the database with SQLite's online backup: consistent even while the server writes."""
    if config.database_url:
        raise CommandError("the database is PostgreSQL (DISPATCH_DATABASE_URL), which holds everything, the contents "
                           "of uploads, blobs and artifacts included: back it up with pg_dump "
                           "(pg_dump -Fc -f FILE DBNAME, consistent while the servers run)")
    source_path = config.data_path / "dispatch.db"
    if not source_path.exists():
        raise CommandError(f"there is no dispatch database in {config.data_path}: give the server's --data-dir")
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # as private as the original
    except FileExistsError:
        raise CommandError(f"{target} exists: choose a new file") from None
    except OSError as err:
        raise CommandError(f"cannot create {target}: {err.strerror}") from None
    source, copy = sqlite3.connect(source_path), sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()


class _TextFormatter(logging.Formatter):
    """Plain log lines with control characters escaped, so input cannot forge a line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.isprintable():  # a copy: other handlers see the record as it was
            record = logging.makeLogRecord(record.__dict__)
            record.msg, record.args = _escape_controls(message), None
        return super().format(record)


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": _iso(dt.datetime.fromtimestamp(record.created, dt.timezone.utc)), "level": record.levelname,
                "logger": record.name, "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _escape_controls(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _setup_logging(log_format: str) -> None:
    if log_format not in ("text", "json"):
        raise SystemExit("--log-format must be text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonFormatter() if log_format == "json"
                         else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False  # no line shows them
    logging.getLogger("asyncio").addFilter(_OncePerMinute("out of system resource"))


class _OncePerMinute(logging.Filter):
    """Lets a message that contains ``text`` through once a minute: out of descriptors, asyncio
    reports every accept it cannot make, with a traceback, and the log would grow by megabytes."""

    def __init__(self, text: str):
        super().__init__()
        self._text = text
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if self._text not in record.getMessage():
            return True
        if time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + 60
        return True


def _raise_open_files_limit() -> None:
    """Every connection (a parked agent's long-poll) holds a descriptor, and the soft limit is
    often 1,024: use as many as the hard limit allows."""
    try:
        import resource
    except ImportError:  # Windows has no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux's default fs.nr_open
    for wanted in (ceiling, 10240):  # 10240: macOS's OPEN_MAX, when it refuses an "unlimited" hard limit
        if soft >= wanted:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return
        except (ValueError, OSError):
            continue


def _print_banner(app: web.Application) -> None:
    config, token = app[CONFIG], app[REGISTRATION].value
    host = _lan_address() if config.host in ("0.0.0.0", "::", "") else config.host
    url = config.public_url.rstrip("/") or f"http://{host}:{config.port}"
    where = _without_password(config.database_url) if config.database_url else config.data_path
    lines = [f"dispatch {__version__} listening on http://{config.host}:{config.port} (data in {where})",
             f"  web page & API:      {url}/  (API under {url}/api)",
             f"  registration token:  {token}"]
    if FIRST_ADMIN in app:
        email, password = app[FIRST_ADMIN]
        lines.append(f"  first admin:         {email} / " + (password or "(DISPATCH_ADMIN_PASSWORD)"))
    if config.approval_required:
        lines.append("  new desktops:        wait for an admin's approval (the Approve button on the web page)")
    lines.append(f"  add a desktop:       python agent.py --server {url} --token {token}")
    print("\n".join(lines), flush=True)


def _listen(config: Config) -> socket.socket:
    """The server's socket, bound before anything is written to the data dir: a start that
    cannot listen leaves nothing behind (no first admin whose password nobody saw)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    try:
        return socket.create_server((config.host, config.port), family=family, backlog=1024)
    except OSError as err:
        hint = " (another dispatch.py, or another program, is using it: stop it or give --port)" \
            if err.errno == errno.EADDRINUSE else ""
        raise CommandError(f"cannot listen on {config.host}:{config.port}: {os.strerror(err.errno)}{hint}") from None


def main(argv: Optional[list[str]] = None) -> int:
    os.umask(0o077)  # nothing the server or its commands write is for other accounts
    args = _build_parser().parse_args(argv)
    overrides = {s.field: getattr(args, s.field, None) for s in SETTINGS if s.flag}
    config = Config.from_env(**overrides)
    _setup_logging(config.log_format)
    try:
        if args.command == "backup":
            backup_database(config, args.file)
            print(f"backed up {config.data_path / 'dispatch.db'} to {args.file}")
            return 0
        if args.command == "user":
            print(asyncio.run(_user_command(config, args)))
            return 0
        sock = _listen(config)
        if not config.database_url:
            _make_data_dir_private(config.data_path)
            lock = _lock_data_dir(config.data_path)  # noqa: F841 - held until the process ends
    except (CommandError, DispatchError, DataDirInUse) as err:
        print(f"dispatch.py: {err.message if isinstance(err, DispatchError) else err}", file=sys.stderr)
        return 2
    _raise_open_files_limit()
    app = create_app(config)
    # run_app "prints" once the socket listens: the banner then tells the truth. The keep-alive
    # timeout also bounds how long a connection may take to send its request's headers; the
    # lingering time, how long an unread body is drained after the answer.
    web.run_app(app, sock=sock, print=lambda _message: _print_banner(app), access_log=None,
                keepalive_timeout=config.request_timeout, lingering_time=config.request_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())