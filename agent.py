#!/usr/bin/env python3
"""dispatch agent: makes this computer a worker of a dispatch server.

Copy this one file onto a desktop with Python 3.9+ (standard library only) and run:

    python agent.py --server http://lanbox:3000 --token <registration token>

The agent registers (its worker token is kept in the work dir and reused after a restart),
long-polls the server for jobs, runs each job's command in a fresh directory holding the job's
input (checked against its sha256; a zip is extracted safely), streams the output, kills the
whole process tree past the job's timeout (counted from the command's start), and reports the
exit code, asking in the same request for its next job. A result the server cannot take at once
waits on disk until it can. Every heartbeat is a lease: it
lists the jobs this run holds, so the server requeues one whose claim never reached the agent;
while idle it sends none (its waiting poll keeps it online, when the server says so).
First Ctrl-C or SIGTERM: take no new jobs, let running ones finish. Second: kill them and
report them as failed. With --run-as USER (Unix, the agent started as root) every job runs as
that user, and the agent's own files stay root's. On someone's desktop (--only-when-idle, --hours,
--max-load, --not-on-battery) it takes jobs only while the owner lets it, and a running job steps
aside when they return: suspended, evicted or left to finish (--on-owner-return). A job given as
an input tree gets its files from the content cache (--cache-mb), fetching only what it lacks; its
artifacts are zipped and sent before its result.
Given several servers on one database (--server A,B), it uses one and moves to the next when
it cannot reach it.

The same file is the client that runs a folder on the farm:

    python agent.py run --server http://lanbox:3000 --artifacts 'dist/**' -- make test

Sections (`grep -n '^# ===' agent.py`): constants, errors, config, HTTP, platform (ctypes),
inputs, transfers (streamed requests, input trees, artifacts), process trees, guest (the owner
first), run_job, server link, spool, Agent, the `run` client, main.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import dataclasses
import email.utils
import functools
import hashlib
import http.client
import json
import logging
import math
import os
import platform
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Callable, NamedTuple, Optional

__version__ = "0.1.0"
__all__ = [
    "Agent",
    "AgentError",
    "Config",
    "Fatal",
    "JobLost",
    "JobResult",
    "JobSetupError",
    "Refused",
    "ServerUnavailable",
    "UnsafeArchive",
    "collect_artifacts",
    "collect_files",
    "extract_artifacts",
    "extract_zip",
    "main",
    "parse_config",
    "place_tree",
    "run_client",
    "run_job",
]

log = logging.getLogger("dispatch.agent")

# === Constants ===

_WINDOWS = os.name == "nt"

POLL_WAIT_SECONDS = 50  # how long the server may hold a get-job long-poll (proxies often cut at 60)
POLL_FLOOR_SECONDS = 1.0  # an empty answer faster than this (a server ignoring `wait`) is followed by a pause
HTTP_TIMEOUT_SECONDS = 15  # every other request (a socket timeout: a large download may take longer)
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 60.0
HEARTBEAT_DEFAULT_SECONDS = 30.0  # until the server's first nextCheckIn says otherwise

OUTPUT_READ_BYTES = 64 * 1024  # one read from a job's pipe
OUTPUT_BATCH_CHARS = 64 * 1024  # the most one stream-output request carries
OUTPUT_FLUSH_SECONDS = 0.2  # output is sent at most this long after it was read
OUTPUT_PROBE_SECONDS = 1.0  # a silent job still asks this often whether it is ours: how a cancel reaches it
OUTPUT_QUEUE_ITEMS = 16  # reads waiting to be batched; a full queue makes the reader (and so the job) wait
OUTPUT_PENDING_CHARS = 1024 * 1024  # output held while the server is slow or down; past it the job's pipe fills
RESULT_OUTPUT_CHARS = 100_000  # per stream, the most an unsent remainder adds to a result (head and tail kept)
STEP_SECONDS = 0.05  # how often a running job's state is checked
STOP_CHECK_SECONDS = 0.2  # how often the main thread looks for a stop request
GUEST_CHECK_SECONDS = 0.5  # how often the owner's input, the hours, the load and the power source are checked
PROBE_TIMEOUT_SECONDS = 5  # a probe command (--idle-command, ioreg, loginctl, pmset) that takes longer failed
INPUT_DEVICES_DIR = Path("/dev/input")  # Linux: the input devices whose access times say when input came
POWER_SUPPLY_DIR = Path("/sys/class/power_supply")
ON_OWNER_RETURN = ("suspend", "evict", "finish")

PIPE_GRACE_SECONDS = 1.5  # after the command exits, how long a background child may keep its pipes open
KILL_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL
LOST_KILL_GRACE_SECONDS = 2.0  # the same for a cancelled job: its tree must be gone within 5 s
KILL_ROUNDS = 10  # SIGKILL rounds, for processes forked while the tree was being killed
STOP_GRACE_SECONDS = KILL_GRACE_SECONDS + 2 * HTTP_TIMEOUT_SECONDS  # second stop: kill, spool, send

MAX_ZIP_ENTRIES = 100_000
MAX_ZIP_DIRECTORY_BYTES = 64 * 1024**2  # the central directory, which zipfile reads into memory whole
MAX_ZIP_BYTES = 4 * 1024**3  # bytes actually written, not what the zip headers claim
CACHE_MAX_BYTES = 2 * 1024**3
CACHE_DEFAULT_MB = "2048"  # --cache-mb
DOWNLOAD_ATTEMPTS = 4
FETCH_BATCH_BLOBS = 2000  # blobs of an input tree asked for in one POST /api/blobs/fetch
FETCH_BATCH_BYTES = 256 * 1024**2  # ... and at most about this many bytes of them
TRANSFER_CHUNK_BYTES = 1024 * 1024  # one read or write of a streamed body
ARTIFACT_ATTEMPTS = 6  # sends of a job's artifacts before its result goes without them
# Already compressed: stored in the artifacts zip as they are, not deflated again.
STORED_SUFFIXES = frozenset(".zip .gz .tgz .bz2 .xz .zst .7z .rar .jar .whl .png .jpg .jpeg .gif .webp .mp4 .mkv "
                            ".mov .mp3 .ogg .flac .pdf .docx .xlsx".split())
DEFAULT_JOB_TIMEOUT_SECONDS = 600  # a job the server sent without a timeout

EXIT_TIMEOUT = 124  # as coreutils `timeout`
EXIT_SETUP_FAILED = 125  # the job could not be set up: input download, unsafe archive, working directory
EXIT_STOPPED = 143  # 128 + SIGTERM: the agent was stopped twice while the job ran

MARKER_ENV = "DISPATCH_AGENT_MARK"  # in every job process's environment: "<agent key>/<job key>/"
TOKEN_ENV = "DISPATCH_REGISTRATION_TOKEN"
TOKEN_FD_ENV = "DISPATCH_AGENT_TOKEN_FD"  # set by the agent's own restart: where it reads the token from
STREAMS = ("stdout", "stderr")

# === Errors ===


class AgentError(Exception):
    """Base of the errors the agent raises on purpose."""


class ServerUnavailable(AgentError):
    """The server could not be reached or asked us to wait (network error, 5xx, 429): retry later."""

    def __init__(self, message: str, retry_after: Optional[float] = None, status: Optional[int] = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status  # of the server's answer (5xx, 429); None: no answer
        self.server = None  # the server asked, once _Servers.in_use() has seen this

    @property
    def unreachable(self) -> bool:
        """A reason to try another server: no answer, or a 5xx (a server whose database is down
        answers 503). A 429 is the server saying "not so fast": wait, but stay."""
        return self.status != 429


class Refused(AgentError):
    """The server answered with a 4xx other than 429; `status` says which."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class JobSetupError(AgentError):
    """A job's input or working directory could not be prepared: the job fails without running."""


class UnsafeArchive(JobSetupError):
    """A zip entry would land outside the job directory, is a symlink, or the zip exceeds a cap."""

    def __init__(self, reason: str):
        super().__init__(f"unsafe archive: {reason}")


class JobLost(AgentError):
    """The server says this worker no longer holds the job (cancelled, finished or reassigned)."""


class _Unknown(AgentError):
    """A probe (idle time, power source) cannot tell on this computer; the message says why."""


class Fatal(AgentError):
    """A mistake that retrying cannot fix (a wrong token or address, a deleted worker): the agent
    stops with exit code 2 and this one sentence, which is what a service manager shows."""


# === Config: flags and environment ===

class _Setting(NamedTuple):
    """One agent setting: --help and the README table come from these."""

    flag: str
    metavar: Optional[str]  # None: a switch, on when its variable is 1, true, yes or on
    env: str
    default: Optional[str]
    help: str


_SETTINGS = (
    _Setting("--server", "URL", "DISPATCH_SERVER", None,
             "the dispatch server, e.g. http://lanbox:3000, or several serving one database separated by commas: "
             "the agent uses one and moves to the next when it cannot reach it (required)"),
    _Setting(
        "--token",
        "TOKEN",
        TOKEN_ENV,
        None,
        "the registration token the server prints at start (required; the environment variable "
        "keeps it out of the process list)",
    ),
    _Setting("--worker-id", "ID", "DISPATCH_WORKER_ID", None,
             "this worker's name on the server (default: the hostname)"),
    _Setting(
        "--work-dir",
        "DIR",
        "DISPATCH_WORK_DIR",
        "~/.dispatch-agent",
        "where the agent keeps its worker token, downloads, job directories and unsent results",
    ),
    _Setting("--tags", "TAGS", "DISPATCH_TAGS", "",
             "comma list; a job with tags runs only on a worker that has all of them"),
    _Setting("--concurrency", "N", "DISPATCH_CONCURRENCY", "1",
             "how many jobs run at once, at most (and while what they asked fits what this computer offers)"),
    _Setting("--cpus", "N", "DISPATCH_CPUS", None, "cpus this computer offers the farm (default: its cores)"),
    _Setting("--memory-mb", "MB", "DISPATCH_MEMORY_MB", None,
             "MB of memory this computer offers the farm (default: 80 percent of its physical memory)"),
    _Setting("--gpus", "N", "DISPATCH_GPUS", "0", "gpus this computer offers the farm"),
    _Setting("--cache-mb", "MB", "DISPATCH_CACHE_MB", CACHE_DEFAULT_MB,
             "MB of job inputs (files by content, uploaded zips) kept for the next jobs; the least recently "
             "used go first"),
    _Setting(
        "--run-as",
        "USER",
        "DISPATCH_RUN_AS",
        None,
        "Unix, with the agent started as root: run every job as this unprivileged user, in a directory "
        "of its own; the worker token, the cache and unsent results stay readable by root only",
    ),
    _Setting("--only-when-idle", "MINUTES", "DISPATCH_ONLY_WHEN_IDLE", "0",
             "take a job only after this many minutes (decimals allowed) without keyboard or mouse input; "
             "0 takes jobs whatever the owner does"),
    _Setting("--hours", "HOURS", "DISPATCH_HOURS", None,
             "take jobs only inside these local hours, e.g. 18:00-08:00 (a comma list allowed); leaving them "
             "is handled like the owner returning"),
    _Setting("--max-load", "L", "DISPATCH_MAX_LOAD", None,
             "take no job while the load that is not our jobs' exceeds L (the 1-minute load average; busy "
             "processors on Windows)"),
    _Setting("--on-owner-return", "ACTION", "DISPATCH_ON_OWNER_RETURN", "suspend",
             "what a running job does when input resumes: suspend (stop its processes until the computer is "
             "idle again), evict (kill it and give it back to the queue) or finish"),
    _Setting("--evict-after", "MINUTES", "DISPATCH_EVICT_AFTER", "10",
             "a job suspended this long is killed and given back to the queue, at no cost to its retries"),
    _Setting("--not-on-battery", None, "DISPATCH_NOT_ON_BATTERY", None,
             "take no job while on battery; a running job is handled like the owner returning"),
    _Setting("--idle-command", "CMD", "DISPATCH_IDLE_COMMAND", None,
             "a shell command that prints the seconds since the last keyboard or mouse input, instead of "
             "the built-in probes"),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the agent is told at start."""

    server: str  # one URL, or several separated by commas (see servers)
    token: str
    worker_id: str
    work_dir: Path
    tags: tuple = ()
    concurrency: int = 1
    cpus: int = 1  # what it offers the farm: the server hands it only jobs that fit what is free
    memory_mb: Optional[int] = None  # None: the platform does not say how much memory there is
    gpus: int = 0
    cache_mb: int = int(CACHE_DEFAULT_MB)
    run_as: Optional[str] = None  # the user every job runs as (the agent runs as root)
    only_when_idle: float = 0.0  # minutes
    hours: tuple = ()  # (start, end) minutes of the local day; end < start wraps past midnight
    max_load: Optional[float] = None
    on_owner_return: str = "suspend"
    evict_after: float = 10.0  # minutes
    not_on_battery: bool = False
    idle_command: Optional[str] = None
    verbose: bool = False

    @property
    def offers(self) -> dict:
        """What this computer offers the farm, as register and heartbeat send it."""
        return {"cpus": self.cpus, "memoryMb": self.memory_mb, "gpus": self.gpus}

    @property
    def servers(self) -> tuple:
        """The servers' URLs in the order given: the agent starts with the first."""
        return tuple(self.server.split(","))


def _server_urls(parser: argparse.ArgumentParser, text: Optional[str]) -> tuple:
    """The URLs a --server value lists (one, or several separated by commas), without a trailing /;
    a usage error naming the one that is not a server's address, if one is not."""
    urls = tuple(url.strip().rstrip("/") for url in (text or "").split(",") if url.strip())
    not_a_url = "--server (or DISPATCH_SERVER) must be the server's URL, e.g. http://lanbox:3000"
    if not urls:
        parser.error(not_a_url)
    for url in urls:
        if not re.match(r"https?://[^/]", url):
            parser.error(not_a_url if len(urls) == 1 else f"{not_a_url}, or several separated by commas: "
                                                          f"{url!r} in the list is not a URL")
        if urllib.parse.urlsplit(url).path.endswith("/api"):
            parser.error(f"--server is the server's address without /api: {url[:-4]}")
    return urls


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {minimum}, not {text!r}")
        return value

    return whole_number


def _amount(text: str) -> float:
    """An argparse type: a number of at least 0, decimals allowed."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, such as 2 or 0.5, not {text!r}")
    return value


_CLOCK_TIME = r"([01]?[0-9]|2[0-3]):([0-5][0-9])"


def _hours(text: str) -> tuple:
    """An argparse type: local hours such as 18:00-08:00 or 12:00-13:30,18:00-23:00, as (start, end)
    minutes of the day."""
    windows = []
    for part in text.split(","):
        match = re.fullmatch(rf"\s*{_CLOCK_TIME}\s*-\s*{_CLOCK_TIME}\s*", part)
        minutes = match and [int(match[i]) * 60 + int(match[i + 1]) for i in (1, 3)]
        if not minutes or minutes[0] == minutes[1]:
            raise argparse.ArgumentTypeError(f"must be hours such as 18:00-08:00 (a comma list allowed), not {text!r}")
        windows.append(tuple(minutes))
    return tuple(windows)


def _format_hours(windows: tuple) -> str:
    return ",".join("-".join(f"{minute // 60:02d}:{minute % 60:02d}" for minute in window) for window in windows)


def _one_of(*choices: str) -> Callable[[str], str]:
    """An argparse type that also checks a value from the environment (argparse's choices would not)."""

    def choice(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"must be {', '.join(choices[:-1])} or {choices[-1]}, not {text!r}")
        return text

    return choice


_SETTING_TYPES = {"--concurrency": _at_least(1), "--cpus": _at_least(1), "--memory-mb": _at_least(0),
                  "--gpus": _at_least(0), "--cache-mb": _at_least(0),
                  "--only-when-idle": _amount, "--hours": _hours, "--max-load": _amount,
                  "--on-owner-return": _one_of(*ON_OWNER_RETURN), "--evict-after": _amount}


def parse_config(argv: Optional[list] = None, environ: Optional[dict] = None) -> Config:
    """Read the command line and the environment (flags win); exit with a usage message if invalid."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="agent.py",
        description="Run jobs from a dispatch server on this computer.",
        epilog=(
            "example:\n"
            "  python agent.py --server http://lanbox:3000 --token <registration token>\n\n"
            "Flags win over environment variables. Stopping: the first Ctrl-C (or SIGTERM) takes no\n"
            "new jobs and lets running ones finish; the second kills them and reports them as failed."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for setting in _SETTINGS:
        help_text = setting.help + (f" (default: {setting.default})" if setting.default else "")
        default = environ.get(setting.env, setting.default)
        if setting.metavar is None:
            parser.add_argument(setting.flag, action="store_true", help=f"{help_text} [{setting.env}=1]",
                                default=(default or "").strip().lower() in ("1", "true", "yes", "on"))
            continue
        parser.add_argument(setting.flag, metavar=setting.metavar, default=default, help=f"{help_text} [{setting.env}]",
                            type=_SETTING_TYPES.get(setting.flag, str))
    parser.add_argument("--verbose", action="store_true", help="log every request and step")
    parser.add_argument("--version", action="version", version=f"dispatch agent {__version__}")
    args = parser.parse_args(argv)
    servers = _server_urls(parser, args.server)
    if not args.token:
        parser.error("--token (or DISPATCH_REGISTRATION_TOKEN) is required: the server prints it at start")
    if args.run_as:
        try:
            _JobUser.lookup(args.run_as)
        except AgentError as err:
            parser.error(str(err))
    return Config(
        server=",".join(servers),
        token=args.token,
        worker_id=args.worker_id or socket.gethostname(),
        work_dir=Path(args.work_dir).expanduser(),
        tags=tuple(tag.strip() for tag in args.tags.split(",") if tag.strip()),
        concurrency=args.concurrency,
        cpus=args.cpus or os.cpu_count() or 1,
        memory_mb=args.memory_mb if args.memory_mb is not None else _default_memory_offer_mb(),
        gpus=args.gpus,
        cache_mb=int(args.cache_mb),
        run_as=args.run_as or None,
        only_when_idle=args.only_when_idle,
        hours=args.hours or (),
        max_load=args.max_load,
        on_owner_return=args.on_owner_return,
        evict_after=args.evict_after,
        not_on_battery=args.not_on_battery,
        idle_command=args.idle_command or None,
        verbose=args.verbose,
    )


# === HTTP: kept-alive connections, errors, backoff, several servers ===


_connections = threading.local()  # each thread keeps one connection per server: no handshake per request
_under_way = {}  # connection -> (scheme, netloc) while a request on it waits for its answer; None once cut
_under_way_lock = threading.Lock()


def _connection(scheme: str, netloc: str, timeout: float) -> tuple:
    """This thread's kept-alive connection to `netloc`, and whether it was used before."""
    cache = _connections.__dict__.setdefault("by_origin", {})
    conn = cache.get((scheme, netloc))
    reused = conn is not None
    if conn is None:
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cache[(scheme, netloc)] = kind(netloc, timeout=timeout)
    conn.timeout = timeout
    if conn.sock is not None:
        conn.sock.settimeout(timeout)
    return conn, reused


def _forget_connection(scheme: str, netloc: str) -> None:
    conn = _connections.__dict__.get("by_origin", {}).pop((scheme, netloc), None)
    if conn is not None:
        conn.close()


def _cut_requests_to(url: str) -> None:
    """End the requests every thread has under way to `url`'s server now, not at their timeout (a
    long-poll parked on a server that stopped answering): each fails as on a broken connection,
    without _request()'s one retry, and its caller retries as after any failure."""
    origin = urllib.parse.urlsplit(url)[:2]
    with _under_way_lock:
        cut = [conn for conn, where in _under_way.items() if where == origin]
        _under_way.update(dict.fromkeys(cut))
    for conn in cut:
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile by its own thread
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it


def _request(method, url, *, headers=None, body=None, timeout=HTTP_TIMEOUT_SECONDS, into=None):
    """Send one request; return (status, parsed JSON body or None) for a 2xx answer.

    With `into` (a binary file) a 2xx body is copied there instead. Raises ServerUnavailable for
    network errors, 5xx and 429, and Refused for any other answer (a redirect is never followed:
    it would carry the worker token to wherever it points).
    """
    headers = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers["Content-Type"] = "application/json"
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    log.debug("%s %s", method, url)
    for _ in range(2):
        conn, reused = _connection(parts.scheme, parts.netloc, timeout)
        resp = None
        with _under_way_lock:
            _under_way[conn] = (parts.scheme, parts.netloc)
        try:
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
            if 200 <= resp.status < 300:
                if into is not None:
                    shutil.copyfileobj(resp, into, 1024 * 1024)
                    return resp.status, None
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
            message, retry_after = _read_error(resp)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as err:
            _forget_connection(parts.scheme, parts.netloc)
            with _under_way_lock:
                cut = _under_way[conn] is None
            if reused and resp is None and not cut:
                continue  # the server closed a kept-alive connection before reading this request: once more
            raise ServerUnavailable(f"{method} {parts.path} failed: {err}") from None
        except ssl.SSLError as err:
            _forget_connection(parts.scheme, parts.netloc)
            raise _tls_mistake(url, err) from None
        except (OSError, http.client.HTTPException, ValueError) as err:
            # Refused connections, timeouts, a truncated or non-JSON answer: all "try later".
            _forget_connection(parts.scheme, parts.netloc)
            raise ServerUnavailable(f"{method} {parts.path} failed: {err}") from None
        finally:
            with _under_way_lock:
                del _under_way[conn]
        if resp.status == 429 or resp.status >= 500:
            raise ServerUnavailable(f"HTTP {resp.status}: {message}", retry_after, resp.status)
        raise Refused(resp.status, message)
    raise ServerUnavailable(f"{method} {parts.path} failed: connection closed twice")


def _tls_mistake(url: str, err: ssl.SSLError) -> AgentError:
    """What a TLS failure means: https:// to a plain-HTTP server or an untrusted certificate is a
    mistake in the setup (Fatal); anything else may pass (a connection cut during the handshake)."""
    if "WRONG_VERSION_NUMBER" in str(err) or "RECORD_LAYER_FAILURE" in str(err):
        return Fatal(f"{_origin_url(url)} does not speak HTTPS: give --server as http://")
    if isinstance(err, ssl.SSLCertVerificationError):
        return Fatal(f"{_origin_url(url)} has a certificate this computer does not trust ({err.verify_message})")
    return ServerUnavailable(f"TLS with {_origin_url(url)} failed: {err}")


def _origin_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _read_error(resp: http.client.HTTPResponse) -> tuple:
    """The message and Retry-After (seconds) of an error answer in the contract's JSON shape."""
    try:
        payload = json.loads(resp.read(64 * 1024))
    except (OSError, ValueError, http.client.HTTPException):
        payload = None
    if not isinstance(payload, dict):
        payload = {}
    message = str(payload.get("message") or payload.get("error") or resp.reason)
    value = resp.headers.get("Retry-After") or payload.get("retryAfter")
    try:
        retry_after = float(value)
    except (TypeError, ValueError):
        try:  # the HTTP-date form
            retry_after = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            retry_after = None
    if retry_after is not None:
        retry_after = min(max(retry_after, 0.0), 10 * BACKOFF_CAP_SECONDS)
    return message, retry_after


class _Backoff:
    """Jittered exponential delays that grow while failures repeat and reset after a success."""

    def __init__(self, base=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS):
        self._base = base
        self._cap = cap
        self.failures = 0

    def next(self, retry_after: Optional[float] = None) -> float:
        """The next delay: half fixed, half random (never near zero), at least `retry_after`."""
        ceiling = min(self._cap, self._base * 2 ** min(self.failures, 30))
        self.failures += 1
        return max(ceiling / 2 + random.uniform(0, ceiling / 2), retry_after or 0.0)

    def reset(self) -> None:
        self.failures = 0


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


class _Servers:
    """The servers --server lists, and the one in use. They share one database, so a token or a
    result is good on each: requests go to one until it cannot be reached, then to the next, round
    the list. Shared by every thread; `tell` says each move (until a whole round found none)."""

    def __init__(self, urls: tuple, tell: Callable[[str], None] = log.warning):
        self.urls = urls
        self._tell = tell
        self._lock = threading.Lock()  # guards the fields below
        self._in_use = 0
        self._moves = 0  # since the server in use last answered

    @property
    def current(self) -> str:
        """The URL of the server in use."""
        return self.urls[self._in_use]

    @property
    def none_answers(self) -> bool:
        """Every server of several failed since one last answered."""
        return len(self.urls) > 1 and self._moves >= len(self.urls)

    @contextlib.contextmanager
    def in_use(self):
        """The URL of the server in use, for one request: if that finds it unreachable (see
        ServerUnavailable.unreachable), the next request goes to the next server."""
        url = self.current
        try:
            yield url
        except ServerUnavailable as err:
            err.server = url
            if err.unreachable:
                self._move_on(url, err)
            raise
        if self._moves and url == self.current:
            with self._lock:
                self._moves = 0

    def _move_on(self, url: str, err: ServerUnavailable) -> None:
        """Use the server after `url`, say so, and end the requests still waiting on `url`."""
        with self._lock:
            if len(self.urls) == 1 or url != self.current:
                return  # nowhere to go, or another request already moved on from it
            self._in_use = (self._in_use + 1) % len(self.urls)
            self._moves += 1
            quiet = self._moves > len(self.urls)  # past a whole round it is one outage, logged once as such
            now_using = self.current
        if not quiet:
            self._tell(f"server {url} unreachable ({err}); using {now_using}")
        _cut_requests_to(url)


# === Platform: Windows Job Objects, the Linux subreaper, memory size, private files, the work-dir lock, the job user ===


class _JOBOBJECT_BASIC_LIMIT_INFORMATION(ctypes.Structure):
    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_int64),
        ("PerJobUserTimeLimit", ctypes.c_int64),
        ("LimitFlags", ctypes.c_uint32),
        ("MinimumWorkingSetSize", ctypes.c_size_t),
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", ctypes.c_uint32),
        ("Affinity", ctypes.c_size_t),
        ("PriorityClass", ctypes.c_uint32),
        ("SchedulingClass", ctypes.c_uint32),
    ]


class _JOBOBJECT_EXTENDED_LIMIT_INFORMATION(ctypes.Structure):
    _fields_ = [
        ("BasicLimitInformation", _JOBOBJECT_BASIC_LIMIT_INFORMATION),
        ("IoInfo", ctypes.c_uint64 * 6),  # IO_COUNTERS
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


_JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9
_JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000


@functools.lru_cache(maxsize=None)
def _kernel32():
    """kernel32, with the argument types of the calls made here (Windows only)."""
    k32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = ctypes.c_void_p
    k32.CreateJobObjectW.restype = handle
    k32.CreateJobObjectW.argtypes = (ctypes.c_void_p, ctypes.c_wchar_p)
    k32.SetInformationJobObject.argtypes = (handle, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
    k32.AssignProcessToJobObject.argtypes = (handle, handle)
    k32.TerminateJobObject.argtypes = (handle, ctypes.c_uint32)
    k32.CloseHandle.argtypes = (handle,)
    k32.GlobalMemoryStatusEx.argtypes = (ctypes.c_void_p,)
    k32.QueryInformationJobObject.argtypes = (handle, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
    k32.OpenProcess.restype = handle
    k32.OpenProcess.argtypes = (ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32)
    k32.GetTickCount.restype = ctypes.c_uint32
    k32.GetSystemPowerStatus.argtypes = (ctypes.c_void_p,)
    k32.GetSystemTimes.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    return k32


@functools.lru_cache(maxsize=None)
def _ntdll():
    """ntdll's NtSuspendProcess and NtResumeProcess: every thread of a process at once, as psutil
    suspends a process (Windows only)."""
    nt = ctypes.WinDLL("ntdll")
    for call in (nt.NtSuspendProcess, nt.NtResumeProcess):
        call.argtypes = (ctypes.c_void_p,)
    return nt


class _JOBOBJECT_BASIC_PROCESS_ID_LIST(ctypes.Structure):
    _fields_ = [
        ("NumberOfAssignedProcesses", ctypes.c_uint32),
        ("NumberOfProcessIdsInList", ctypes.c_uint32),
        ("ProcessIdList", ctypes.c_size_t * 4096),
    ]


_JOB_OBJECT_BASIC_PROCESS_ID_LIST_CLASS = 3
_PROCESS_SUSPEND_RESUME = 0x0800


class _WindowsJob:
    """A Windows Job Object holding one job's processes: terminating or closing it kills them all.

    KILL_ON_JOB_CLOSE also kills them when the agent dies, so nothing is left behind for a restart.
    """

    def __init__(self, popen: subprocess.Popen):
        k32 = _kernel32()
        handle = k32.CreateJobObjectW(None, None)
        if not handle:
            raise ctypes.WinError(ctypes.get_last_error())
        info = _JOBOBJECT_EXTENDED_LIMIT_INFORMATION()
        info.BasicLimitInformation.LimitFlags = _JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        ok = k32.SetInformationJobObject(
            handle, _JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS, ctypes.byref(info), ctypes.sizeof(info)
        )
        # Popen has no public handle. A child the command starts before this line is not in the
        # job; taskkill /T is the fallback that still reaches it while its parent lives.
        if not ok or not k32.AssignProcessToJobObject(handle, int(popen._handle)):
            error = ctypes.WinError(ctypes.get_last_error())
            k32.CloseHandle(handle)
            raise error
        self._handle = handle
        self._suspended = set()  # pids suspended once each: every suspension needs exactly one resume

    def suspend(self) -> bool:
        """Suspend every process in the job, repeated until a round finds none it had not suspended
        (one may start a process meanwhile); False if the job's processes cannot be listed."""
        nt, fresh = _ntdll(), self._pids()
        while fresh:
            self._call_each(fresh, nt.NtSuspendProcess)
            self._suspended |= fresh
            fresh = self._pids() - self._suspended
        return bool(self._suspended)

    def resume(self) -> None:
        self._call_each(self._suspended, _ntdll().NtResumeProcess)
        self._suspended = set()

    def _pids(self) -> set:
        ids = _JOBOBJECT_BASIC_PROCESS_ID_LIST()
        if not _kernel32().QueryInformationJobObject(self._handle, _JOB_OBJECT_BASIC_PROCESS_ID_LIST_CLASS,
                                                     ctypes.byref(ids), ctypes.sizeof(ids), None):
            return set()
        return set(ids.ProcessIdList[:ids.NumberOfProcessIdsInList])

    @staticmethod
    def _call_each(pids: set, call) -> None:
        k32 = _kernel32()
        for pid in pids:
            process = k32.OpenProcess(_PROCESS_SUSPEND_RESUME, False, pid)
            if process:
                call(process)
                k32.CloseHandle(process)

    def terminate(self) -> bool:
        k32 = _kernel32()
        ok = bool(k32.TerminateJobObject(self._handle, 1))
        k32.CloseHandle(self._handle)
        return ok


class _MEMORYSTATUSEX(ctypes.Structure):
    _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32)] + [
        (name, ctypes.c_uint64)
        for name in (
            "ullTotalPhys",
            "ullAvailPhys",
            "ullTotalPageFile",
            "ullAvailPageFile",
            "ullTotalVirtual",
            "ullAvailVirtual",
            "ullAvailExtendedVirtual",
        )
    ]


_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _become_subreaper() -> bool:
    """Linux: make this process the subreaper of its descendants (a process whose parent dies
    becomes its child, not init's) and say whether it is; the setting lasts for the process's life."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _total_memory_mb() -> Optional[int]:
    """This computer's RAM in MiB, or None where the platform does not say."""
    if _WINDOWS:
        status = _MEMORYSTATUSEX()
        status.dwLength = ctypes.sizeof(status)
        if _kernel32().GlobalMemoryStatusEx(ctypes.byref(status)):
            return status.ullTotalPhys // 2**20
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        return None


def _default_memory_offer_mb() -> Optional[int]:
    """80 % of the RAM: the rest stays with the desktop's owner and the system."""
    total = _total_memory_mb()
    return total * 4 // 5 if total else None


def _private_dir(path: Path, mode: int = 0o700) -> None:
    """Create the directory `path` if needed and give it exactly `mode`, whatever the umask (or an
    older agent) left. Windows has no such modes: there the directory inherits its parent's ACL."""
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    path.chmod(mode)


def _create_private(path: Path, mode: str = "wb"):
    """Create or truncate the file `path`, readable by its owner only, and open it with `mode`."""
    # O_BINARY: without it Windows would turn every \n written through the descriptor into \r\n.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o600)
    return open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def _write_private(path: Path, text: str, *, sync: bool = True) -> None:
    """Write a file atomically (a crash leaves the old or the new one), readable by its owner only.

    Without `sync` the file survives the agent's own crash but not a power cut.
    """
    tmp = path.with_name(path.name + ".tmp")
    with _create_private(tmp, "w") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _lock_work_dir(work_dir: Path):
    """Hold <work dir>/agent.lock for the life of the process: one agent per work dir."""
    lock = open(os.open(work_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600), "a+")
    try:
        if _WINDOWS:
            import msvcrt

            lock.seek(0)
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise AgentError(f"another agent is already using {work_dir}; give each agent its own --work-dir") from None
    return lock


@dataclasses.dataclass(frozen=True)
class _JobUser:
    """The unprivileged account every job runs as (--run-as; Unix, the agent running as root)."""

    name: str
    uid: int
    gid: int
    groups: tuple  # its supplementary groups, its primary group among them

    @classmethod
    def lookup(cls, name: str) -> "_JobUser":
        """The account `name`; AgentError, in one sentence, where jobs cannot be run as it."""
        if _WINDOWS:
            raise AgentError("--run-as works on Unix only: on Windows, run the agent itself under the "
                             "account the jobs should use")
        import pwd

        if os.geteuid() != 0:
            raise AgentError(f"--run-as needs the agent to be started as root, not as uid {os.geteuid()}")
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise AgentError(f"--run-as names the user {name!r}, who does not exist on this computer") from None
        if entry.pw_uid == 0:
            raise AgentError(f"--run-as must name an unprivileged user, and {name!r} has uid 0")
        return cls(name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))

    def popen_args(self) -> dict:
        """Popen arguments that start a process as this user, with its groups only."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def environ(self, home: Path) -> dict:
        """What a job's environment says about its user: HOME is the job's directory."""
        return {"HOME": str(home), "USER": self.name, "LOGNAME": self.name}

    def blocked_on_the_way_to(self, path: Path) -> Optional[Path]:
        """The first directory from / to `path` (included) that this user may not pass, if any."""
        for directory in [*reversed(path.parents), path]:
            st = directory.stat()
            if st.st_uid == self.uid:
                bit = stat.S_IXUSR
            elif st.st_gid in self.groups:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not st.st_mode & bit:
                return directory
        return None

    def give(self, directory: Path) -> None:
        """Make `directory` and everything in it this user's; only it may enter the directory."""
        for parent, dirs, files in os.walk(directory):  # never follows a symbolic link
            for name in dirs + files:
                os.chown(os.path.join(parent, name), self.uid, self.gid, follow_symlinks=False)
        directory.chmod(0o700)
        os.chown(directory, self.uid, self.gid)  # last: a failure before it leaves the directory closed

    @staticmethod
    def take_back(directory: Path) -> None:
        """Close `directory` to the user again (a finished job's files wait there for their result)."""
        os.chown(directory, os.getuid(), os.getgid())


# --- the owner's presence, the power source, the load: probes for the guest policy (see _Guest) ---


# === Platform: is the owner away? Idle time, power, load ===


def _probe_output(command, *, shell: bool = False) -> str:
    """What a probe command prints; _Unknown if it cannot run, fails or takes too long."""
    name = command if shell else command[0]
    try:
        result = subprocess.run(
            command, shell=shell, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, errors="replace", timeout=PROBE_TIMEOUT_SECONDS,
            # Windows: no console window flashing up twice a second on the owner's screen.
            creationflags=subprocess.CREATE_NO_WINDOW if _WINDOWS else 0,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise _Unknown(f"{name} failed ({err})") from None
    if result.returncode != 0:
        raise _Unknown(f"{name} exited with code {result.returncode}")
    return result.stdout


def _command_idle_seconds(command: str) -> float:
    """--idle-command: the seconds since the last input, as the first word the command prints."""
    text = _probe_output(command, shell=True)
    try:
        seconds = float(text.split()[0])
    except (IndexError, ValueError):
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise _Unknown(f"--idle-command printed {text.strip()[:40]!r}, not a number of seconds")
    return seconds


class _LASTINPUTINFO(ctypes.Structure):
    _fields_ = [("cbSize", ctypes.c_uint32), ("dwTime", ctypes.c_uint32)]


def _windows_idle_seconds() -> float:
    """GetLastInputInfo: the last input in this session. A service runs in a session of its own
    that sees no input, so an agent that should notice the owner runs at logon, in theirs."""
    info = _LASTINPUTINFO(ctypes.sizeof(_LASTINPUTINFO), 0)
    if not ctypes.WinDLL("user32", use_last_error=True).GetLastInputInfo(ctypes.byref(info)):
        raise _Unknown(f"GetLastInputInfo failed ({ctypes.get_last_error()})")
    return _ticks_between(info.dwTime, _kernel32().GetTickCount())


def _ticks_between(earlier: int, later: int) -> float:
    """Seconds between two GetTickCount() values, which wrap around every 49.7 days."""
    return (later - earlier) % 2**32 / 1000


def _macos_idle_seconds() -> float:
    return _hid_idle_seconds(_probe_output(["ioreg", "-r", "-c", "IOHIDSystem", "-d", "1"]))


def _hid_idle_seconds(text: str) -> float:
    """The idle time `ioreg -c IOHIDSystem` shows: HIDIdleTime, in nanoseconds."""
    times = [int(value) for value in re.findall(r'"HIDIdleTime"\s*=\s*([0-9]+)', text)]
    if not times:
        raise _Unknown("ioreg shows no HIDIdleTime")
    return min(times) / 1e9


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [("window", ctypes.c_ulong), ("state", ctypes.c_int), ("kind", ctypes.c_int),
                ("til_or_since", ctypes.c_ulong), ("idle", ctypes.c_ulong), ("event_mask", ctypes.c_ulong)]


@functools.lru_cache(maxsize=None)
def _xlib() -> Optional[tuple]:
    """libX11 and libXss (the screen saver extension) with the argument types used here; None if
    either is missing."""
    try:
        x11, xss = ctypes.CDLL("libX11.so.6"), ctypes.CDLL("libXss.so.1")
    except OSError:
        return None
    x11.XOpenDisplay.restype = ctypes.c_void_p
    x11.XOpenDisplay.argtypes = (ctypes.c_char_p,)
    x11.XDefaultRootWindow.restype = ctypes.c_ulong
    x11.XDefaultRootWindow.argtypes = (ctypes.c_void_p,)
    x11.XCloseDisplay.argtypes = (ctypes.c_void_p,)
    int_pointer = ctypes.POINTER(ctypes.c_int)
    xss.XScreenSaverQueryExtension.argtypes = (ctypes.c_void_p, int_pointer, int_pointer)
    xss.XScreenSaverQueryInfo.argtypes = (ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(_XScreenSaverInfo))
    return x11, xss


def _x11_idle_seconds() -> float:
    """The X11 screen saver extension's idle time, on the display DISPLAY names."""
    name = os.environ.get("DISPLAY")
    if not name:
        raise _Unknown("no DISPLAY")
    if os.environ.get("WAYLAND_DISPLAY") or os.environ.get("XDG_SESSION_TYPE") == "wayland":
        # Under Wayland, X11 sees only the input of X programs: it would call a busy desktop idle.
        raise _Unknown("a Wayland session")
    libraries = _xlib()
    if libraries is None:
        raise _Unknown("libX11 or libXss is not installed")
    x11, xss = libraries
    # A connection per question: Xlib ends the whole process when a connection it holds breaks,
    # as it would when the owner logs out.
    display = x11.XOpenDisplay(name.encode())
    if not display:
        raise _Unknown(f"cannot open display {name}")
    try:
        info, base = _XScreenSaverInfo(), ctypes.c_int()
        if not (xss.XScreenSaverQueryExtension(display, ctypes.byref(base), ctypes.byref(base))
                and xss.XScreenSaverQueryInfo(display, x11.XDefaultRootWindow(display), ctypes.byref(info))):
            raise _Unknown(f"display {name} has no screen saver extension")
        return info.idle / 1000
    finally:
        x11.XCloseDisplay(display)


def _logind_idle_seconds() -> float:
    return _logind_idle(_probe_output(["loginctl", "show", "--property=IdleHint", "--property=IdleSinceHint"]),
                        time.time())


def _logind_idle(text: str, now: float) -> float:
    """The idle time in `loginctl show` output: 0 while a session is in use (IdleHint=no), else the
    time since IdleSinceHint (microseconds since the epoch). A desktop sets the hint only after its
    own idle delay (GNOME: when it blanks the screen), so this errs on the owner's side."""
    properties = dict(line.partition("=")[::2] for line in text.splitlines())
    if properties.get("IdleHint") == "no":
        return 0.0
    since = properties.get("IdleSinceHint", "")
    if properties.get("IdleHint") != "yes" or not since.isdigit():
        raise _Unknown("loginctl shows no IdleHint")
    return max(0.0, now - int(since) / 1e6)


def _input_devices_idle_seconds(directory: Path = INPUT_DEVICES_DIR, now: Optional[float] = None) -> float:
    """The time since the newest access to an input device in `directory` (read as root or not: a
    stat needs no permission on the device)."""
    try:
        times = [max(st.st_atime, st.st_mtime) for st in (entry.stat() for entry in os.scandir(directory)
                                                          if not entry.is_dir())]
    except OSError as err:
        raise _Unknown(f"{directory}: {err.strerror}") from None
    if not times:
        raise _Unknown(f"{directory} holds no input devices")
    return max(0.0, (time.time() if now is None else now) - max(times))


def _idle_probes(idle_command: Optional[str]) -> tuple:
    """(name, probe) pairs to ask in order for the seconds since the last keyboard or mouse input:
    --idle-command alone when given, else this platform's."""
    if idle_command:
        return (("--idle-command", functools.partial(_command_idle_seconds, idle_command)),)
    if _WINDOWS:
        return (("GetLastInputInfo", _windows_idle_seconds),)
    if sys.platform == "darwin":
        return (("ioreg", _macos_idle_seconds),)
    return (("X11", _x11_idle_seconds), ("logind", _logind_idle_seconds), ("/dev/input", _input_devices_idle_seconds))


class _SYSTEM_POWER_STATUS(ctypes.Structure):
    _fields_ = [("ACLineStatus", ctypes.c_ubyte), ("BatteryFlag", ctypes.c_ubyte),
                ("BatteryLifePercent", ctypes.c_ubyte), ("SystemStatusFlag", ctypes.c_ubyte),
                ("BatteryLifeTime", ctypes.c_uint32), ("BatteryFullLifeTime", ctypes.c_uint32)]


def _on_battery() -> bool:
    """Whether this computer runs on battery now; _Unknown where it cannot tell."""
    if _WINDOWS:
        status = _SYSTEM_POWER_STATUS()
        if not _kernel32().GetSystemPowerStatus(ctypes.byref(status)):
            raise _Unknown(f"GetSystemPowerStatus failed ({ctypes.get_last_error()})")
        return status.ACLineStatus == 0  # 1: on AC, 255: unknown (a desktop)
    if sys.platform == "darwin":
        return _pmset_on_battery(_probe_output(["pmset", "-g", "batt"]))
    return _linux_on_battery()


def _pmset_on_battery(text: str) -> bool:
    """`pmset -g batt` says "Now drawing from 'AC Power'" (or 'Battery Power', 'UPS Power')."""
    source = re.search(r"drawing from '([^']+)'", text)
    if source is None:
        raise _Unknown("pmset does not say what the computer draws power from")
    return source[1] != "AC Power"


def _linux_on_battery(directory: Path = POWER_SUPPLY_DIR) -> bool:
    """A battery is discharging and no mains supply is online (a desktop has neither: False)."""
    supplies = []
    for supply in directory.glob("*"):
        fields = {}
        for name in ("type", "online", "status"):
            with contextlib.suppress(OSError):
                fields[name] = (supply / name).read_text().strip()
        supplies.append(fields)
    discharging = any(s.get("type") == "Battery" and s.get("status") == "Discharging" for s in supplies)
    return discharging and not any(s.get("type") == "Mains" and s.get("online") == "1" for s in supplies)


class _FILETIME(ctypes.Structure):
    _fields_ = [("low", ctypes.c_uint32), ("high", ctypes.c_uint32)]


class _ProcessorLoad:
    """How many processors are busy: the 1-minute load average; on Windows, which has none, the
    processor time between calls (GetSystemTimes), averaged over a minute the same way."""

    def __init__(self):
        self._average = 0.0
        self._at, self._times = time.monotonic(), self._system_times() if _WINDOWS else None

    def __call__(self) -> float:
        if not _WINDOWS:
            return os.getloadavg()[0]
        now, times = time.monotonic(), self._system_times()
        weight = math.exp(-(now - self._at) / 60)
        busy = _busy_processors(self._times, times, os.cpu_count() or 1)
        self._average = self._average * weight + busy * (1 - weight)
        self._at, self._times = now, times
        return self._average

    @staticmethod
    def _system_times() -> tuple:
        times = (_FILETIME(), _FILETIME(), _FILETIME())
        _kernel32().GetSystemTimes(*(ctypes.byref(t) for t in times))
        return tuple(t.high << 32 | t.low for t in times)


def _busy_processors(before: tuple, after: tuple, processors: int) -> float:
    """Processors busy between two GetSystemTimes() samples (idle, kernel, user), whose kernel time
    includes the idle time."""
    idle, kernel, user = (b - a for a, b in zip(before, after))
    return processors * (kernel + user - idle) / (kernel + user) if kernel + user else 0.0


# === Inputs: download, verify, cache, extract safely ===


def _safe_parts(path: str, what: str) -> list:
    """The parts of a relative path from an archive or an input tree (`what` names it in the
    error); UnsafeArchive for anything that could leave the job directory."""
    if "\\" in path:
        raise UnsafeArchive(f"{what} {path!r} contains a backslash")
    if path.startswith("/"):
        raise UnsafeArchive(f"{what} {path!r} is an absolute path")
    if re.match(r"[A-Za-z]:", path):
        raise UnsafeArchive(f"{what} {path!r} starts with a drive letter")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{what} {path!r} climbs out with '..'")
    if _WINDOWS and any(":" in part for part in parts):  # an NTFS alternate data stream
        raise UnsafeArchive(f"{what} {path!r} contains ':'")
    return parts


def _entry_parts(info: zipfile.ZipInfo) -> list:
    """The path parts of a zip entry; UnsafeArchive for anything that could leave the job directory."""
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeArchive(f"entry {info.filename!r} is a symbolic link")
    return _safe_parts(info.filename, "entry")


_ZIP_END = struct.Struct("<4s4H2LH")  # end of central directory record
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")
_ZIP_ENTRY = struct.Struct("<4s4B4HL2L5H2L")  # central directory file header, before its name


def _zip_directory_claims(f) -> list:
    """(where it ends, entries, bytes) of each central directory the zip's end records describe.

    zipfile believes one of them, which one depends on its version: the classic record, or the
    ZIP64 record where the locator points or just before the locator. All of them are returned,
    so checking every claim holds whichever zipfile reads the archive. A directory ends where the
    record that describes it begins. Empty without an end record (zipfile then refuses the file).
    """
    file_size = f.seek(0, os.SEEK_END)
    tail_at = max(file_size - _ZIP_END.size - 0xFFFF, 0)  # the record, then a comment of up to 64 KiB
    f.seek(tail_at)
    tail = f.read()
    at = len(tail) - _ZIP_END.size
    # As zipfile: a record without a comment at the very end, else the last signature.
    if at < 0 or not (tail.startswith(b"PK\5\6", at) and tail.endswith(b"\0\0")):
        at = tail.rfind(b"PK\5\6")
    if at < 0 or len(tail) - at < _ZIP_END.size:
        return []
    end = tail_at + at
    _, _, _, _, entries, size, _, _ = _ZIP_END.unpack_from(tail, at)
    claims = [(end, entries, size)]
    if end >= _ZIP64_LOCATOR.size:
        f.seek(end - _ZIP64_LOCATOR.size)
        signature, _, record_at, _ = _ZIP64_LOCATOR.unpack(f.read(_ZIP64_LOCATOR.size))
        if signature == b"PK\6\7":
            for position in {record_at, end - _ZIP64_LOCATOR.size - _ZIP64_END.size}:
                if position < 0:
                    continue
                f.seek(position)
                record = f.read(_ZIP64_END.size)
                if len(record) == _ZIP64_END.size and record.startswith(b"PK\6\6"):
                    _, _, _, _, _, _, _, entries, size, _ = _ZIP64_END.unpack(record)
                    claims.append((position, entries, size))
    return claims


def _count_zip_entries(f, end: int, size: int, limit: int) -> int:
    """How many entries zipfile would read from the `size` directory bytes before `end`, counted
    without building them, and no further than `limit` + 1."""
    f.seek(end - size)
    count = done = 0
    while done < size and count <= limit:
        header = f.read(_ZIP_ENTRY.size)
        if len(header) < _ZIP_ENTRY.size or not header.startswith(b"PK\1\2"):
            break  # a broken directory, which zipfile refuses by itself
        variable = sum(struct.unpack_from("<3H", header, 28))  # name, extra field and comment lengths
        f.seek(variable, os.SEEK_CUR)
        done += _ZIP_ENTRY.size + variable
        count += 1
    return count


def _check_zip_directory(f, max_entries: int, max_directory_bytes: int) -> None:
    """UnsafeArchive if a central directory of the zip in `f` holds (or claims) more entries or
    bytes than the limits: checked before zipfile builds an object for every entry."""
    for end, claimed, size in _zip_directory_claims(f):
        if claimed > max_entries:
            raise UnsafeArchive(f"the zip has {claimed} entries, more than the limit of {max_entries}")
        if size > max_directory_bytes:
            raise UnsafeArchive(
                f"the zip's central directory has {size} bytes, more than the limit of {max_directory_bytes}"
            )
        if size <= end and _count_zip_entries(f, end, size, max_entries) > max_entries:
            raise UnsafeArchive(
                f"the zip has more entries than the limit of {max_entries} (its end record says {claimed})"
            )


def extract_zip(archive, dest, *, max_entries=MAX_ZIP_ENTRIES, max_bytes=MAX_ZIP_BYTES,
                max_directory_bytes=MAX_ZIP_DIRECTORY_BYTES) -> None:
    """Extract the zip file at path `archive` into the existing directory `dest`, writing nothing outside it.

    The entry count and the directory size are checked first, from the zip's end records; then
    every entry, before anything is written. UnsafeArchive for a hostile entry or past a cap
    (bytes are counted as written, headers are not trusted), JobSetupError for a broken zip.
    """
    dest = Path(dest)
    root = os.path.abspath(dest) + os.sep
    try:
        with open(archive, "rb") as f:
            _check_zip_directory(f, max_entries, max_directory_bytes)
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                if len(infos) > max_entries:
                    raise UnsafeArchive(f"the zip has {len(infos)} entries, more than the limit of {max_entries}")
                entries = [(info, _entry_parts(info)) for info in infos]
                written = 0
                for info, parts in entries:
                    if not parts:
                        continue
                    target = dest.joinpath(*parts)
                    # Belt and braces: on Windows abspath also applies the Win32 renames ("a. " -> "a").
                    if not os.path.abspath(target).startswith(root):
                        raise UnsafeArchive(f"entry {info.filename!r} lands outside the job directory")
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "xb") as out:
                        while True:
                            chunk = src.read(1024 * 1024)
                            if not chunk:
                                break
                            written += len(chunk)
                            if written > max_bytes:
                                raise UnsafeArchive(f"the zip expands to more than the limit of {max_bytes} bytes")
                            out.write(chunk)
                    if not _WINDOWS and (info.external_attr >> 16) & 0o111:
                        target.chmod(target.stat().st_mode | 0o111)  # keep scripts like ./gradlew runnable
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as err:
        # RuntimeError: an encrypted entry; OSError: e.g. a file and a directory of the same name.
        raise JobSetupError(f"could not extract the zip: {err}") from None


def _input_name(url: str) -> str:
    """A safe file name for a downloaded input, from the last part of its URL."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    return name or "input"


def _place_input(path: Path, name: str, job_dir: Path) -> None:
    """Put a job's input into its directory: a .zip is extracted, anything else copied as it is."""
    if name.lower().endswith(".zip"):
        extract_zip(path, job_dir)
    else:
        shutil.copyfile(path, job_dir / name)


def _working_dir(root: Path, relative: Optional[str]) -> Path:
    """The job's working directory: `relative` inside `root`, which it may not leave. `root` is
    resolved already (the agent's jobs dir is), so a job without a working directory costs no
    look at each folder of the path."""
    if not relative:
        return root
    candidate = (root / relative).resolve()
    if candidate != root and root not in candidate.parents:
        raise JobSetupError(f"workingDirectory {relative!r} points outside the job's files")
    if not candidate.is_dir():
        raise JobSetupError(f"workingDirectory {relative!r} is not a directory in the job's files")
    return candidate


def _remove_dir(path: Path) -> None:
    """Delete a directory and what it holds, if it is there; one system call when it is empty, as
    most jobs leave it."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:  # not empty
        shutil.rmtree(path, ignore_errors=True)


class _Sha256Writer:
    """Writes through to a binary file, hashing what passes."""

    def __init__(self, out):
        self._out = out
        self._hash = hashlib.sha256()

    def write(self, data) -> int:
        self._hash.update(data)
        return self._out.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _download(url: str, out, *, token: Optional[str], sha256: Optional[str], halt: threading.Event) -> None:
    """Copy `url` into the binary file `out`, whose content then matches `sha256` (if given).

    Network errors, 5xx, 429 and a content that does not match are retried with backoff, up to
    DOWNLOAD_ATTEMPTS downloads in all; any other refusal fails at once. `token` is the worker
    token to send, None for a URL off the server's origin. JobSetupError when it fails for good
    or `halt` is set while waiting.
    """
    headers = {} if token is None else {"x-worker-token": token}
    backoff = _Backoff()
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        out.seek(0)
        out.truncate()
        written = _Sha256Writer(out)
        retry_after = None
        try:
            _request("GET", url, headers=headers, into=written)
        except ServerUnavailable as err:
            problem, retry_after = f"could not download {url}: {err}", err.retry_after
        except Refused as err:
            hint = "" if token is not None else " (not on the server's origin, so sent without the worker token)"
            raise JobSetupError(f"could not download {url}{hint}: {err}") from None
        else:
            if sha256 is None or written.hexdigest() == sha256:
                return
            problem = f"the input's sha256 did not match: expected {sha256}, got {written.hexdigest()} from {url}"
        if attempt == DOWNLOAD_ATTEMPTS or halt.wait(backoff.next(retry_after)):
            raise JobSetupError(problem)


class _DownloadCache:
    """Downloaded inputs kept by the server's file id, so many jobs on one upload fetch it once.

    A file enters the cache only once its download returned (and so was verified); a cached file
    is trusted by its key alone. Past `max_bytes` the least recently used files are deleted,
    except those in use by a job.
    """

    _KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # a file id that is safe as a file name

    def __init__(self, directory: Path, max_bytes: int = CACHE_MAX_BYTES):
        self._dir = directory
        self._max_bytes = max_bytes
        self._guard = threading.Lock()
        self._locks = {}  # file id -> Lock, held while that file is downloaded or used
        self._total = None  # bytes cached, once counted: no directory scan while under the cap

    def clean(self) -> None:
        """Create the cache directory (the agent's only); delete downloads an earlier run left half-done."""
        _private_dir(self._dir)
        for path in self._dir.glob("*.part"):
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def fetch(self, key: Optional[str], download: Callable):
        """Yield the path of file `key`, calling download(binary_file) first unless it is cached.

        With `key` None (or not a plain name) the file is not cached: it is downloaded to a
        temporary path, deleted after.
        """
        if key is None or not self._KEY.fullmatch(key):
            tmp = self._dir / f"{uuid.uuid4().hex}.part"
            try:
                with _create_private(tmp) as out:
                    download(out)
                yield tmp
            finally:
                tmp.unlink(missing_ok=True)
            return
        with self._lock_for(key):
            path = self._dir / f"{key}.bin"
            if path.exists():
                log.debug("input %s is cached", key)
                os.utime(path)  # recently used: evicted last
            else:
                tmp = self._dir / f"{key}.part"
                try:
                    with _create_private(tmp) as out:
                        download(out)
                    os.replace(tmp, path)
                    self._grew(path.stat().st_size)
                finally:
                    tmp.unlink(missing_ok=True)
                self._evict(keep=key)
            yield path

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    # Blobs (an input tree's files by content) live here too, named by their SHA-256, under the same
    # size cap: one least-recently-used content cache for every kind of input.

    @contextlib.contextmanager
    def hold(self, keys):
        """Hold `keys` while a job fetches and copies them: none is evicted, and another job that
        needs one waits rather than fetching it twice. Taken in sorted order, so two jobs never wait
        for each other in a circle; the cache is trimmed to its cap afterwards."""
        held = []
        try:
            for key in sorted(set(keys)):
                lock = self._lock_for(key)
                lock.acquire()
                held.append(lock)
            yield
        finally:
            for lock in reversed(held):
                lock.release()
        self._evict(keep=None)

    def path(self, key: str) -> Path:
        """Where the cached file `key` is (it may not be there)."""
        return self._dir / f"{key}.bin"

    def staging(self, key: str) -> Path:
        """Where `key` is written while it arrives; `install` puts it in place once it is checked."""
        return self._dir / f"{key}.part"

    def install(self, key: str, size: int) -> None:
        os.replace(self.staging(key), self.path(key))
        self._grew(size)

    def _grew(self, size: int) -> None:
        with self._guard:
            if self._total is not None:
                self._total += size

    def _evict(self, keep: Optional[str]) -> None:
        with self._guard:
            if self._total is not None and self._total <= self._max_bytes:
                return  # nothing to trim: no need to look at every file
        entries = []
        with os.scandir(self._dir) as found:
            for entry in found:
                if entry.name.endswith(".bin"):
                    with contextlib.suppress(OSError):
                        st = entry.stat(follow_symlinks=False)
                        entries.append((st.st_mtime, st.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in entries)
        with self._guard:
            self._total = total
        for _, size, path in sorted(entries):
            if total <= self._max_bytes:
                break
            lock = self._lock_for(path.stem)
            if path.stem == keep or not lock.acquire(blocking=False):
                continue  # in use by a job right now
            try:
                path.unlink(missing_ok=True)
                total -= size
                log.debug("evicted %s from the download cache", path.name)
            finally:
                lock.release()
        with self._guard:
            self._total = total


# === Transfers: streamed requests, input trees, artifacts ===


class _Multipart:
    """A multipart/form-data body of short fields and files, read from disk while it is sent (never
    whole in memory), whose exact length is known before the first byte goes."""

    def __init__(self) -> None:
        self.boundary = uuid.uuid4().hex
        self._parts = []  # (header, bytes or (path, size))

    def field(self, name: str, value: str) -> None:
        self._parts.append((self._header(name), value.encode()))

    def file(self, name: str, path: Path, size: int, filename: str = "blob") -> None:
        self._parts.append((self._header(name, filename), (Path(path), size)))

    def _header(self, name: str, filename: Optional[str] = None) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        kind = "Content-Type: application/octet-stream\r\n" if filename else ""
        return f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def length(self) -> int:
        closing = len(f"--{self.boundary}--\r\n")
        return closing + sum(len(header) + (len(body) if isinstance(body, bytes) else body[1]) + 2
                             for header, body in self._parts)

    def chunks(self):
        """The body in pieces; AgentError if a file is shorter now than when it was added."""
        for header, body in self._parts:
            yield header
            if isinstance(body, bytes):
                yield body
            else:
                yield from _file_chunks(*body)
            yield b"\r\n"
        yield f"--{self.boundary}--\r\n".encode()


def _file_chunks(path: Path, size: int):
    """The first `size` bytes of the file at `path`, a piece at a time."""
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(TRANSFER_CHUNK_BYTES, left))
            if not chunk:
                raise AgentError(f"{path} changed while it was being sent: run again")
            left -= len(chunk)
            yield chunk


@contextlib.contextmanager
def _stream_request(method: str, url: str, *, headers=None, body=None, timeout=HTTP_TIMEOUT_SECONDS, sent=None):
    """Send one request on a connection of its own, its body (bytes, a _Multipart or None) streamed
    as it goes, and yield the 2xx response to read as it arrives: a large download, a follow.
    Raises ServerUnavailable and Refused as _request does; sent(n) is told each piece's size."""
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.netloc, timeout=timeout)
    try:
        yield _send_streamed(conn, method, parts, dict(headers or {}), body, sent)
    finally:
        conn.close()


def _send_streamed(conn, method: str, parts, headers: dict, body, sent) -> http.client.HTTPResponse:
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if isinstance(body, _Multipart):
        headers["Content-Type"], length, pieces = body.content_type, body.length(), body.chunks()
    else:
        length, pieces = (len(body), [body]) if body is not None else (0, [])
    if body is not None or method in ("POST", "PUT"):
        headers["Content-Length"] = str(length)
    cut_short = None
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        for piece in pieces:
            conn.send(piece)
            if sent is not None:
                sent(len(piece))
    except (BrokenPipeError, ConnectionResetError) as err:
        cut_short = err  # the server answered before it read everything: its answer says why
    except OSError as err:
        raise ServerUnavailable(f"{method} {parts.path} failed: {err}") from None
    try:
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as err:
        raise ServerUnavailable(f"{method} {parts.path} failed: {cut_short or err}") from None
    if 200 <= resp.status < 300:
        return resp
    message, retry_after = _read_error(resp)
    if resp.status == 429 or resp.status >= 500:
        raise ServerUnavailable(f"HTTP {resp.status}: {message}", retry_after, resp.status)
    raise Refused(resp.status, message)


def _read_exactly(stream, size: int, what: str):
    """The next `size` bytes of a response, a piece at a time; ServerUnavailable if it ends early."""
    left = size
    while left:
        try:
            chunk = stream.read(min(TRANSFER_CHUNK_BYTES, left))
        except (OSError, http.client.HTTPException) as err:
            raise ServerUnavailable(f"{what} broke off: {err}") from None
        if not chunk:
            raise ServerUnavailable(f"{what} ended early")
        left -= len(chunk)
        yield chunk


def _job_transfers(data: dict) -> dict:
    """The input tree, artifacts and environment of a get-job answer's job (the tree's entries are
    checked when the job is set up)."""
    tree, patterns, env = data.get("inputTree"), data.get("artifactPatterns") or [], data.get("env") or {}
    if tree is not None and not isinstance(tree, list):
        raise TypeError("inputTree must be a list")
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise TypeError("artifactPatterns must be a list of strings")
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise TypeError("env must map names to strings")
    limit = data.get("maxArtifactBytes")
    return {"input_tree": tree, "artifact_patterns": tuple(patterns),
            "artifacts_when": str(data.get("artifactsWhen") or "on_success"),
            "env": tuple(sorted(env.items())), "max_artifact_bytes": None if limit is None else int(limit)}


def _tree_path_parts(path: str) -> list:
    """The parts of an input tree's path; UnsafeArchive for one that could leave the job directory
    (the rules of zip entries) or that names no file."""
    if not path:
        raise UnsafeArchive("an input tree entry has an empty path")
    parts = _safe_parts(path, "input tree entry")
    if not parts or any(ord(c) < 32 for c in path):
        raise UnsafeArchive(f"input tree entry {path!r} is not a file name")
    return parts


def _tree_entries(tree: list) -> list:
    """An input tree's entries as (path parts, sha256, size, executable), every one checked before
    anything is written: UnsafeArchive for one that could leave the job directory or past a cap,
    JobSetupError for a malformed one."""
    if len(tree) > MAX_ZIP_ENTRIES:
        raise UnsafeArchive(f"the input tree has {len(tree)} files, more than the limit of {MAX_ZIP_ENTRIES}")
    entries, total = [], 0
    for item in tree:
        item = item if isinstance(item, dict) else {}
        path, sha256, size, mode = item.get("path"), item.get("sha256"), item.get("size"), item.get("mode", 0o644)
        if (not isinstance(path, str) or not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256)
                or not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(mode, int)):
            raise JobSetupError(f"the input tree has a malformed entry: {str(item)[:200]}")
        total += size
        if total > MAX_ZIP_BYTES:
            raise UnsafeArchive(f"the input tree holds more than the limit of {MAX_ZIP_BYTES} bytes")
        entries.append((_tree_path_parts(path), sha256, size, bool(mode & 0o111)))
    return entries


def place_tree(tree: list, job_dir: Path, cache: _DownloadCache, open_blobs: Callable,
               halt: threading.Event) -> int:
    """Put an input tree's files into `job_dir`, writing nothing outside it; returns the bytes fetched.

    Blobs the cache lacks are fetched in batches (open_blobs([(sha256, size), ...]) yields a
    response holding their contents one after the other); each is checked against its hash before
    it enters the cache, and a batch that breaks off is asked for again (what arrived stays). Then
    every file is copied out of the cache, so a job that changes its files never changes the cache.
    """
    entries = _tree_entries(tree)
    root = os.path.abspath(job_dir)
    copies, folders = [], set()
    for parts, sha256, size, executable in entries:
        target = os.path.join(root, *parts)
        if not os.path.abspath(target).startswith(root + os.sep):  # Windows renames ("a. " -> "a") included
            raise UnsafeArchive(f"input tree entry {'/'.join(parts)!r} lands outside the job directory")
        copies.append((os.fspath(cache.path(sha256)), target, size, executable))
        folders.add(os.path.dirname(target))
    sizes = {sha256: size for _, sha256, size, _ in entries}
    fetched = 0
    with cache.hold(sizes):
        wanted = [(sha256, size) for sha256, size in sizes.items() if not os.path.exists(cache.path(sha256))]
        for batch in _blob_batches(wanted):
            fetched += _fetch_batch(batch, cache, open_blobs, halt)
        for folder in sorted(folders):
            os.makedirs(folder, exist_ok=True)
        for copy in copies:  # (threads were measured: no faster, the file system is the limit)
            if _copy_out(copy) is not None:
                raise UnsafeArchive(f"input tree entry {os.path.relpath(copy[1], root)!r} is there twice")
    return fetched


def _copy_out(copy: tuple) -> Optional[str]:
    """Copy a cached blob to its place in a job directory (never over a file already there, never
    through a link: the target is created); returns the target if one was there."""
    source, target, size, executable = copy
    try:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                      0o777 if executable else 0o666)  # the umask applies, as to any new file
    except FileExistsError:
        return target
    try:
        src = os.open(source, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            left = size  # the blob was checked when it entered the cache: it has this size
            while left > 0:
                data = os.read(src, min(left, TRANSFER_CHUNK_BYTES))
                if not data:
                    break
                left -= len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
            if time.time() - os.fstat(src).st_mtime > 60:
                os.utime(source)  # recently used: evicted last (to the minute: one system call less per file)
        finally:
            os.close(src)
    finally:
        os.close(out)
    return None


def _blob_batches(wanted: list):
    batch, size = [], 0
    for sha256, blob_size in wanted:
        if batch and (len(batch) == FETCH_BATCH_BLOBS or size + blob_size > FETCH_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append((sha256, blob_size))
        size += blob_size
    if batch:
        yield batch


def _fetch_batch(batch: list, cache: _DownloadCache, open_blobs: Callable, halt: threading.Event) -> int:
    backoff, fetched = _Backoff(), 0
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        batch = [(sha256, size) for sha256, size in batch if not cache.path(sha256).exists()]
        try:
            with open_blobs(batch) as stream:
                for sha256, size in batch:
                    fetched += _receive_blob(stream, sha256, size, cache)
            return fetched
        except ServerUnavailable as err:
            if attempt == DOWNLOAD_ATTEMPTS or halt.wait(backoff.next(err.retry_after)):
                raise JobSetupError(f"could not fetch the job's input files: {err}") from None
        except Refused as err:
            if err.status == 409:
                raise JobLost(err.message) from None
            raise JobSetupError(f"could not fetch the job's input files: {err}") from None
    return fetched


def _receive_blob(stream, sha256: str, size: int, cache: _DownloadCache) -> int:
    """Read one blob from the fetch response into the cache, if its content has the hash it was
    asked for; JobSetupError (nothing kept) if not."""
    staging = cache.staging(sha256)
    digest = hashlib.sha256()
    try:
        with _create_private(staging) as out:
            for chunk in _read_exactly(stream, size, f"the input file {sha256[:12]}"):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise JobSetupError(f"the server sent content for blob {sha256} whose sha256 is {digest.hexdigest()}: "
                                "refused, nothing was written")
        cache.install(sha256, size)
    finally:
        staging.unlink(missing_ok=True)
    return size


class ArtifactsTooBig(AgentError):
    """The artifacts zip would be larger than the server keeps."""


def _pattern_problem(pattern: str) -> Optional[str]:
    """Why an artifacts pattern could reach outside the working directory; None if it cannot."""
    if pattern.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", pattern):
        return "is an absolute path"
    if "\\" in pattern:
        return "contains a backslash"
    if ".." in pattern.split("/"):
        return "climbs out with '..'"
    return None if pattern.strip("/.") else "is empty"


def _glob_regex(pattern: str):
    """A glob relative to the working directory as a regex over '/'-separated paths: `*`, `?` and
    `[...]` within one name, `**` across folders; a pattern that names a folder takes all it holds."""
    pattern = re.sub(r"^(\./)+", "", pattern).rstrip("/")
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) > 0:
            inside = pattern[i + 1:end]
            negate = inside.startswith("!")
            members = (inside[1:] if negate else inside).replace("\\", "\\\\").replace("[", "\\[")
            if members.startswith("^"):
                members = "\\" + members
            out.append("[" + ("^/" if negate else "") + members + "]")  # ranges such as [a-z] kept
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + "(?:/.*)?", re.S)


def collect_artifacts(root: Path, patterns, archive: Path, *, max_bytes: Optional[int] = None) -> tuple:
    """Zip the regular files under `root` (the working directory) that match `patterns` into the
    file `archive`; returns (files zipped, notes on what was skipped and why).

    Never follows a symbolic link: a link that matches is skipped with a note, a linked folder is
    never entered; a pattern that could reach outside `root` is skipped with a note. ArtifactsTooBig
    once the zip passes `max_bytes`.
    """
    notes, regexes = [], []
    for pattern in patterns:
        problem = _pattern_problem(pattern)
        if problem:
            notes.append(f"artifacts pattern {pattern!r} {problem}: skipped (patterns stay inside the "
                         "working directory)")
        else:
            regexes.append((pattern, _glob_regex(pattern)))
    matched, files = set(), 0
    with open(archive, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
        for folder, dirs, names in os.walk(root):  # never into a linked folder: those are listed, not walked
            dirs.sort()
            relative = os.path.relpath(folder, root).replace(os.sep, "/")
            prefix = "" if relative == "." else relative + "/"
            for name in dirs + sorted(names):
                path, rel = os.path.join(folder, name), prefix + name
                hits = [p for p, regex in regexes if regex.fullmatch(rel)]
                if not hits:
                    continue
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    continue  # walked next
                matched.update(hits)
                if stat.S_ISLNK(st.st_mode):
                    notes.append(f"artifacts: skipped {rel}: a symbolic link (to {os.readlink(path)}); artifacts "
                                 "are regular files only")
                elif not stat.S_ISREG(st.st_mode):
                    notes.append(f"artifacts: skipped {rel}: not a regular file")
                elif _zip_file(zf, raw, path, rel, st, max_bytes):
                    files += 1
                else:
                    notes.append(f"artifacts: skipped {rel}: it changed into something else while being read")
    notes += [f"artifacts: no file matched {p!r}" for p, _ in regexes if p not in matched]
    return files, notes


def _zip_file(zf: zipfile.ZipFile, raw, path: str, name: str, st, max_bytes: Optional[int]) -> bool:
    """Add one regular file to the zip, streamed; False if it is no longer the file `st` describes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    except OSError:  # ELOOP: it became a symbolic link
        return False
    with open(fd, "rb") as src:
        now = os.fstat(src.fileno())
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        info = zipfile.ZipInfo(name, date_time=time.localtime(max(now.st_mtime, 315532800))[:6])  # zip: 1980 on
        info.external_attr = (stat.S_IMODE(now.st_mode) | stat.S_IFREG) << 16
        info.file_size = now.st_size
        chunk = src.read(TRANSFER_CHUNK_BYTES)
        sample = chunk[:64 * 1024]  # already compressed (or random): stored as it is, deflating it gains nothing
        stored = (os.path.splitext(name)[1].lower() in STORED_SUFFIXES
                  or len(zlib.compress(sample, 1)) > 0.95 * len(sample))
        info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
        info._compresslevel = 1  # fast: build outputs are large; zipfile reads this (compress_level in 3.13+)
        with zf.open(info, "w", force_zip64=now.st_size > 2**31) as out:
            while chunk:
                out.write(chunk)
                chunk = src.read(TRANSFER_CHUNK_BYTES)
                if max_bytes is not None and raw.tell() > max_bytes:
                    raise ArtifactsTooBig(f"artifacts too big: more than {max_bytes // 1024**2} MB (the server's "
                                          "DISPATCH_MAX_ARTIFACT_MB); none were sent")
    return True


# === Process trees: find and kill everything a job started ===


class _Descendants:
    """Linux, once the agent is a subreaper (see _become_subreaper): whatever a job starts stays
    among the agent's descendants, even a process that left the job's session and lost its parent,
    so a job's tree is found by walking down from the agent instead of reading every process's
    environment.

    The orphans the agent adopts are its own to reap: each walk reaps those that have died. A job's
    shell is never reaped here (subprocess does it): _spawn lists it before a walk can see it.
    """

    def __init__(self):
        self.enabled = False
        self.lock = threading.Lock()  # held while a job's shell is started and listed, and while reaping
        self.shells = set()  # pids of the jobs' shells not yet reaped by subprocess
        self._session = None

    def enable(self) -> bool:
        """Become the subreaper, where the walk can be made; False where it cannot."""
        children = Path(f"/proc/self/task/{threading.get_native_id()}/children")
        if not self.enabled and children.exists() and _become_subreaper():  # never adopt what no walk reaps
            self._session = os.getsid(0)
            self.enabled = True
        return self.enabled

    def marked(self, needle: bytes) -> set:
        """Pids of the agent's live descendants whose environment holds `needle`; the walk goes
        down through those only (what they start inherits the marker), and reaps the adopted
        orphans that have died."""
        agent = os.getpid()
        found, parents = set(), [agent]
        while parents:
            parent = parents.pop()
            for pid in _children_of(parent):
                if not (parent == agent and self._reaped(pid)) and _is_marked(pid, needle):
                    found.add(pid)
                    parents.append(pid)
        return found

    def shell_reaped(self, popen: subprocess.Popen) -> None:
        """Forget a job's shell once subprocess has reaped it: its pid may be anyone's now."""
        if popen.returncode is not None:
            with self.lock:
                self.shells.discard(popen.pid)

    def _reaped(self, pid: int) -> bool:
        """Reap `pid`, a child of the agent, if it is an adopted orphan that has died."""
        with self.lock:
            if pid in self.shells:
                return False
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold anything
            except (OSError, IndexError):
                return False
            # A child outside the agent's session came from a job (a job's session cannot be left for ours).
            if fields[0] != b"Z" or int(fields[3]) == self._session:
                return False
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return True


_DESCENDANTS = _Descendants()


def _children_of(pid: int) -> list:
    """Linux: the pids of the children of every thread of process `pid` ([] once it is gone)."""
    children = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children", "rb") as f:
                children += [int(child) for child in f.read().split()]
        except OSError:
            pass
    return children


def _is_marked(pid: int, needle: bytes) -> bool:
    """Linux: whether the environment of process `pid` holds `needle` (MARKER_ENV=prefix)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:  # gone, or not ours to read
        return False
    # A zombie's environ reads empty, so only live processes are found.
    return any(var.startswith(needle) for var in environ.split(b"\0"))


def _marked_pids(prefix: str, *, anywhere: bool = False) -> set:
    """Pids of live processes whose environment has MARKER_ENV set to a value starting with `prefix`.

    The marker is inherited by every descendant, including those that left the process group with
    setsid, so it finds a job's whole tree (the way Jenkins' ProcessTreeKiller does). Linux reads
    /proc: the agent's descendants only, once it is a subreaper (see _Descendants), unless
    `anywhere`; every process otherwise. macOS asks `ps -E` (best effort); elsewhere only the
    process group is used. Windows jobs live in Job Objects instead.
    """
    needle = f"{MARKER_ENV}={prefix}"
    pids = set()
    if sys.platform.startswith("linux"):
        needle_bytes = needle.encode()
        if _DESCENDANTS.enabled and not anywhere:
            pids = _DESCENDANTS.marked(needle_bytes)
        else:
            every = (int(entry) for entry in os.listdir("/proc") if entry.isdigit())
            pids = {pid for pid in every if _is_marked(pid, needle_bytes)}
    elif sys.platform == "darwin":
        result = subprocess.run(
            ["ps", "-A", "-ww", "-E", "-o", "pid=,command="],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        for line in result.stdout.splitlines():
            pid, _, rest = line.strip().partition(" ")
            if needle in rest and pid.isdigit():
                pids.add(int(pid))
    pids.discard(os.getpid())
    return pids


def _kill_marked(prefix: str) -> int:
    """SIGKILL every process marked with `prefix` (what an earlier run of this agent left); count them."""
    pids = _marked_pids(prefix, anywhere=True)  # an earlier run's processes are not this one's descendants
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


class _ProcessTree:
    """A job's command and every process it started, found again even after they left its group."""

    def __init__(self, popen: subprocess.Popen, marker: str):
        self._popen = popen
        self._marker = marker
        self.suspended = False
        self._windows_job = None
        if _WINDOWS:
            try:
                self._windows_job = _WindowsJob(popen)
            except OSError as err:
                log.debug("no Job Object for pid %d (%s); taskkill /T will be used", popen.pid, err)

    def kill(self, grace: float = KILL_GRACE_SECONDS) -> None:
        """SIGTERM the whole tree, then SIGKILL whatever is left after `grace` seconds.

        Windows has no SIGTERM for a tree: it is terminated at once.
        """
        if _WINDOWS:
            if self._windows_job is None or not self._windows_job.terminate():
                subprocess.run(
                    ["taskkill", "/T", "/F", "/PID", str(self._popen.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            self._windows_job = None
            return
        # The walk first: it reaps what the job left that has died, which would keep the group alive.
        if self._popen.poll() is not None and not _marked_pids(self._marker) and not self._group_alive():
            return  # it ended by itself and left nothing behind: no signal, no wait
        self._signal(signal.SIGTERM)
        if self.suspended:
            self._signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs
        deadline = time.monotonic() + grace
        while self._alive() and time.monotonic() < deadline:
            time.sleep(STEP_SECONDS)
        # Always at least one SIGKILL round: a group member that cleared its environment (so has no
        # marker) and ignores SIGTERM is reached only by the process-group kill.
        for _ in range(KILL_ROUNDS):
            self._signal(signal.SIGKILL)
            time.sleep(STEP_SECONDS)
            if not self._alive():
                break

    def _alive(self) -> bool:
        return self._popen.poll() is None or bool(_marked_pids(self._marker))

    def _group_alive(self) -> bool:
        try:
            os.killpg(self._popen.pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # exists, but not ours to signal
            pass
        return True

    def suspend(self) -> bool:
        """Stop the whole tree (SIGSTOP; on Windows, every process of its Job Object), repeated until
        a round finds no process it had not stopped: one forked meanwhile is stopped too. False where
        it cannot be done (Windows without a Job Object)."""
        if _WINDOWS:
            self.suspended = self._windows_job is not None and self._windows_job.suspend()
            return self.suspended
        stopped = set()
        for _ in range(KILL_ROUNDS):
            found = self._signal(signal.SIGSTOP)
            if found <= stopped:
                break
            stopped |= found
        self.suspended = True
        return True

    def resume(self) -> None:
        """Let a suspended tree run on."""
        if _WINDOWS:
            self._windows_job.resume()
        else:
            self._signal(signal.SIGCONT)
        self.suspended = False

    def _signal(self, sig: int) -> set:
        """Send `sig` to every process of the tree; the marked pids it found."""
        pids = _marked_pids(self._marker)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        # The command leads its own group (start_new_session); the group outlives it while members
        # remain, and the kernel does not hand its number to a new process meanwhile.
        with contextlib.suppress(OSError):
            os.killpg(self._popen.pid, sig)
        return pids


# === Guest: the desktop's owner comes first ===


class _Standing(NamedTuple):
    """What the owner allows now: why no new job is taken (None: jobs are taken), and why running
    jobs must step aside (None: they run on)."""

    paused: Optional[str] = None
    aside: Optional[str] = None


def _within_hours(windows: tuple, moment: time.struct_time) -> bool:
    minute = moment.tm_hour * 60 + moment.tm_min
    return any(start <= minute < end if start < end else (minute >= start or minute < end) for start, end in windows)


class _Guest:
    """A good guest on someone's desktop: takes jobs only while the owner is away (--only-when-idle),
    inside --hours, under --max-load and not on battery (--not-on-battery); running jobs step aside
    when the owner returns, the hours end or the power goes. The probes are arguments, so that a
    test can play the owner."""

    def __init__(self, config: Config, *, idle_probes: Optional[tuple] = None, load: Optional[Callable] = None,
                 on_battery: Callable[[], bool] = _on_battery, clock: Callable = time.localtime):
        self._config = config
        self._idle_probes = _idle_probes(config.idle_command) if idle_probes is None else idle_probes
        self._load = load or (_ProcessorLoad() if config.max_load is not None else None)
        self._on_battery = on_battery
        self._clock = clock

    @property
    def policy(self) -> Optional[str]:
        """The policy in a few words for the log; None if there is none (jobs are always taken)."""
        cfg = self._config
        parts = [f"after {cfg.only_when_idle:g} min without input" if cfg.only_when_idle else "",
                 f"during {_format_hours(cfg.hours)}" if cfg.hours else "",
                 f"under load {cfg.max_load:g}" if cfg.max_load is not None else "",
                 "not on battery" if cfg.not_on_battery else ""]
        if not any(parts):
            return None
        action = {"suspend": f"is suspended (and evicted after {cfg.evict_after:g} min)", "evict": "is evicted",
                  "finish": "finishes"}[cfg.on_owner_return]
        return f"{', '.join(p for p in parts if p)}; when the owner returns, a running job {action}"

    def idle_probe(self) -> Optional[str]:
        """The name of the idle probe that works here (None without --only-when-idle); AgentError,
        saying what each probe said, if none does."""
        if not self._config.only_when_idle:
            return None
        try:
            return self._idle()[0]
        except _Unknown as err:
            raise AgentError(f"--only-when-idle needs to know when this computer last had keyboard or mouse "
                             f"input, and nothing here can tell ({err}); give --idle-command") from None

    def _idle(self) -> tuple:
        """(probe name, seconds since the last input) from the first probe that can tell."""
        failures = []
        for name, probe in self._idle_probes:
            try:
                return name, probe()
            except _Unknown as err:
                failures.append(f"{name}: {err}")
        raise _Unknown("; ".join(failures))

    def standing(self, our_load: float = 0.0) -> _Standing:
        """What the owner allows now; `our_load` is the processors our running jobs asked for, which
        is not the owner's load."""
        cfg = self._config
        aside = None
        if cfg.only_when_idle:
            try:
                if self._idle()[1] < cfg.only_when_idle * 60:
                    aside = "owner active"
            except _Unknown:
                aside = "idle time unknown"
        if aside is None and cfg.hours and not _within_hours(cfg.hours, self._clock()):
            aside = f"outside hours {_format_hours(cfg.hours)}"
        if aside is None and cfg.not_on_battery:
            try:
                aside = "on battery" if self._on_battery() else None
            except _Unknown:
                aside = "power source unknown"
        if aside is not None:
            return _Standing(aside, aside)
        if cfg.max_load is not None:
            load = self._load() - our_load
            if load > cfg.max_load:
                return _Standing(f"load {round(load, 2):g} > {cfg.max_load:g}")
        return _Standing()


class _StepAside:
    """How one running job makes way for the owner (--on-owner-return): `suspend` stops its process
    tree and lets it run on once the owner is away again, `evict` kills it so that it goes back to
    the queue, `finish` lets it run. A job suspended longer than --evict-after is evicted."""

    def __init__(self, why: Callable[[], Optional[str]], action: str = "finish", evict_after: float = math.inf,
                 name: str = "the job"):
        self._why = why  # why running jobs must step aside now, or None
        self._action = action
        self._evict_after = evict_after  # seconds
        self._name = name  # for the log
        self._since = None  # time.monotonic() of the current suspension's start
        self._before = 0.0  # seconds of the earlier suspensions

    @property
    def suspended(self) -> bool:
        return self._since is not None

    def suspended_for(self, now: float) -> float:
        """Seconds the job has spent suspended, in all: they do not count against its timeout."""
        return self._before + (now - self._since if self._since is not None else 0.0)

    def step(self, tree: _ProcessTree, now: float) -> Optional[str]:
        """Suspend or resume `tree` as the owner comes and goes; why the job must be evicted, if it must."""
        why = self._why()
        if self._since is not None:
            if why is None:
                tree.resume()
                self._before, self._since = self.suspended_for(now), None
                log.info("%s resumed", self._name)
            elif now - self._since >= self._evict_after:
                return f"suspended for more than {self._evict_after / 60:g} min ({why})"
        elif why is not None and self._action == "evict":
            return why
        elif why is not None and self._action == "suspend":
            if not tree.suspend():
                return why  # it cannot be stopped here: it runs on another worker instead
            self._since = now
            log.info("%s suspended (%s)", self._name, why)
        return None


# === run_job: one command, its output, its timeout ===


@dataclasses.dataclass(frozen=True)
class JobResult:
    """How a job ended. stdout/stderr hold only the output not yet streamed to the server."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    error: Optional[str] = None
    duration: Optional[float] = None  # seconds the command ran; None if it never started
    evicted: Optional[str] = None  # why it was killed to make way for the owner: it goes back to the queue


def _trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit // 2
    dropped = len(text) - limit
    return f"{text[:head]}\n[dispatch-agent: {dropped} characters dropped]\n{text[-(limit - head):]}"


def _read_pipe(stream: str, pipe, decoder) -> list:
    """One read of a job's pipe (a raw pipe: whatever is there): (stream, text) items, and
    (stream, None) at end of file. `decoder` is the stream's incremental UTF-8 decoder, so a
    character split across reads survives."""
    try:
        chunk = pipe.read(OUTPUT_READ_BYTES)
    except OSError:
        chunk = b""
    text = decoder.decode(chunk, final=not chunk)
    return ([(stream, text)] if text else []) + ([] if chunk else [(stream, None)])


def _utf8_decoder():
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class _PipeSelector:
    """Unix: a job's pipes read by the job's own thread, through one selector."""

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc
        self._selector = selectors.DefaultSelector()
        for stream, pipe in zip(STREAMS, (proc.stdout, proc.stderr)):
            self._selector.register(pipe, selectors.EVENT_READ, (stream, _utf8_decoder()))

    def read(self, wait: float) -> list:
        """What the pipes hold, waiting up to `wait` seconds for something (see _read_pipe); once
        both are at end of file, up to `wait` seconds for the command's exit instead."""
        if not self._selector.get_map():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(wait)
            return []
        items = []
        for key, _ in self._selector.select(wait):
            stream, decoder = key.data
            read = _read_pipe(stream, key.fileobj, decoder)
            if read and read[-1][1] is None:
                self._selector.unregister(key.fileobj)
                key.fileobj.close()
            items += read
        return items

    def close(self) -> None:
        pipes = self._selector.get_map()
        if pipes is not None:  # not closed yet
            for key in list(pipes.values()):
                key.fileobj.close()
            self._selector.close()


class _PipeThreads:
    """Windows, where select() takes no pipes: a thread reads each pipe into a queue, and one more
    waits for the command's exit, so that a waiting read() notices it at once. A full queue makes
    the readers (and so the job) wait."""

    def __init__(self, proc: subprocess.Popen):
        self._queue = queue.Queue(OUTPUT_QUEUE_ITEMS)
        self._closed = threading.Event()
        for stream, pipe in zip(STREAMS, (proc.stdout, proc.stderr)):
            threading.Thread(target=self._read, args=(stream, pipe), daemon=True).start()
        threading.Thread(target=lambda: (proc.wait(), self._wake()), daemon=True).start()

    def _read(self, stream: str, pipe) -> None:
        decoder = _utf8_decoder()
        with pipe:
            while not self._closed.is_set():
                items = _read_pipe(stream, pipe, decoder)
                for item in items:
                    self._put(item)
                if items and items[-1][1] is None:
                    return

    def _put(self, item) -> None:
        """Queue an item, waiting while the queue is full unless closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=STEP_SECONDS)
                return
            except queue.Full:
                pass

    def _wake(self) -> None:
        with contextlib.suppress(queue.Full):  # a full queue wakes a read anyway
            self._queue.put_nowait(None)

    def read(self, wait: float) -> list:
        """What the readers queued, waiting up to `wait` seconds for the first item (see _read_pipe)."""
        items = []
        with contextlib.suppress(queue.Empty):
            items.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
            while True:
                items.append(self._queue.get_nowait())
        return [item for item in items if item is not None]  # None: the command has exited

    def close(self) -> None:
        """Let the reader threads end even if a pipe never reaches end of file."""
        self._closed.set()


class _Output:
    """One job's stdout and stderr on their way to the server.

    The pipes are read (binary-safe, UTF-8 decoded incrementally) by the job's thread through a
    selector, or by threads on Windows (see _PipeThreads); the job's thread batches the output and
    sends it in order, at most OUTPUT_FLUSH_SECONDS late. A waiting pump() notices the command's
    exit at once. Memory stays bounded: while the server is slow or down, output piles up only to
    OUTPUT_PENDING_CHARS, then the pipes are left unread and the job waits.
    """

    def __init__(self, send: Callable, proc: subprocess.Popen):
        self._send = send
        self._pipes = _PipeThreads(proc) if _WINDOWS else _PipeSelector(proc)
        self._pending = {stream: [] for stream in STREAMS}
        self._held = 0
        self._first_at = None  # when the oldest unsent output was read
        self._last_contact = time.monotonic()  # when the server last heard about this job
        self._ends_line = {stream: True for stream in STREAMS}
        self._retry_at = 0.0
        self._backoff = _Backoff()
        self._open = set(STREAMS)  # streams whose end-of-file mark has not been taken yet

    def wait_eof(self, seconds: float) -> None:
        """Pump until both pipes are at end of file, or `seconds` have passed."""
        deadline = time.monotonic() + seconds
        while self._open and (left := deadline - time.monotonic()) > 0:
            self.pump(min(STEP_SECONDS, left))
        self.pump(0)

    def pump(self, wait: float) -> None:
        """Take what the pipes have (waiting up to `wait` seconds for it) and send due batches."""
        if self._held < OUTPUT_PENDING_CHARS:
            for item in self._pipes.read(wait):
                self._take(item)
        else:
            time.sleep(wait)  # the server is behind: leave the output in the pipe, so the job waits
        now = time.monotonic()
        full = self._held >= OUTPUT_BATCH_CHARS
        if self._held and now >= self._retry_at and (full or now - self._first_at >= OUTPUT_FLUSH_SECONDS):
            self._flush()
        elif now - self._last_contact >= OUTPUT_PROBE_SECONDS:
            self._last_contact = now
            with contextlib.suppress(ServerUnavailable, Refused):  # only a 409 (JobLost) matters here
                self._send("stdout", "")

    def check_in(self) -> None:
        """Make the next pump() contact the server even with no output to send: it has news (the job
        was suspended or resumed) that the send function adds to every call."""
        self._last_contact = -math.inf

    def note(self, text: str) -> None:
        """Add a line of the agent's own to stderr."""
        self._add("stderr", ("" if self._ends_line["stderr"] else "\n") + text + "\n")

    def finish(self) -> tuple:
        """Stop reading, send what the server takes now, and return the rest (bounded) per stream."""
        for item in self._pipes.read(0):
            self._take(item)
        self.close()
        if self._held and time.monotonic() >= self._retry_at:
            self._flush()
        return tuple(_trim("".join(self._pending[stream]), RESULT_OUTPUT_CHARS) for stream in STREAMS)

    def close(self) -> None:
        """Stop reading, even if a pipe never reaches end of file."""
        self._pipes.close()

    def _take(self, item) -> None:
        stream, text = item
        if text is None:
            self._open.discard(stream)
        else:
            self._add(stream, text)

    def _add(self, stream: str, text: str) -> None:
        if self._first_at is None:
            self._first_at = time.monotonic()
        self._pending[stream].append(text)
        self._held += len(text)
        self._ends_line[stream] = text.endswith("\n")

    def _flush(self) -> None:
        """Send pending output, stdout then stderr, in batches; keep what the server cannot take yet."""
        for stream in STREAMS:
            text = "".join(self._pending[stream])
            self._pending[stream] = []
            while text:
                batch, text = text[:OUTPUT_BATCH_CHARS], text[OUTPUT_BATCH_CHARS:]
                try:
                    self._send(stream, batch)
                    self._last_contact = time.monotonic()
                except ServerUnavailable as err:
                    self._pending[stream] = [batch + text]
                    self._held = sum(len(part) for parts in self._pending.values() for part in parts)
                    self._retry_at = time.monotonic() + self._backoff.next(err.retry_after)
                    log.debug("output not sent (%s); will retry", err)
                    return
                except Refused as err:
                    log.warning("the server refused %d characters of %s (%s); dropped them", len(batch), stream, err)
        self._held = 0
        self._first_at = None
        self._backoff.reset()


def _spawn(command: str, cwd: Path, env: dict, user: Optional[_JobUser] = None) -> subprocess.Popen:
    # shell=True runs `/bin/sh -c command` on Unix and `cmd.exe /c command` (%COMSPEC%) on Windows.
    # Each job gets its own session (Unix) or process group (Windows, so Ctrl-C at the agent's
    # console does not reach it: stopping is the agent's decision).
    isolation = (
        {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if _WINDOWS else {"start_new_session": True}
    )
    if user is not None:
        isolation.update(user.popen_args())
    with _DESCENDANTS.lock:  # listed before a walk could take it for an orphan and reap it
        popen = subprocess.Popen(
            command,
            shell=True,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            **isolation,
        )
        if _DESCENDANTS.enabled:
            _DESCENDANTS.shells.add(popen.pid)
    return popen


def _exit_code(returncode: int) -> int:
    if returncode < 0:  # Popen reports death by signal N as -N; a shell would say 128 + N
        return 128 - returncode
    if returncode >= 2**31:  # Windows: an unsigned DWORD, which cmd shows signed (e.g. -1073741819)
        return returncode - 2**32
    return returncode


def run_job(command: str, cwd: Path, *, env: dict, marker: str, timeout: float, send_output, halt,
            user: Optional[_JobUser] = None, step_aside: Optional[_StepAside] = None) -> JobResult:
    """Run `command` in `cwd` (as `user`, if given), stream its output with send_output(stream, text),
    and report how it ended.

    Returns once the command has exited (or was killed: past `timeout` with exit code 124, when
    the `halt` event is set with 143, evicted by `step_aside` with 143 and `evicted` set) and no
    process of its tree is left; the command's own exit code otherwise, even if a background child
    kept its pipes open. Time suspended by `step_aside` does not count against `timeout`; a change
    of `step_aside.suspended` is sent at once (an empty chunk). `env[MARKER_ENV]` must be `marker`.
    JobLost from send_output kills the tree and propagates.
    """
    started = time.monotonic()
    proc = _spawn(command, cwd, env, user)
    tree = _ProcessTree(proc, marker)
    output = _Output(send_output, proc)
    step_aside = step_aside or _StepAside(lambda: None)
    exit_code, error, evicted = None, None, None
    grace = KILL_GRACE_SECONDS
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now - started - step_aside.suspended_for(now) > timeout:
                exit_code, error = EXIT_TIMEOUT, f"timed out after {timeout:g} s; the process tree was killed"
                break
            if halt.is_set():
                exit_code, error = EXIT_STOPPED, "the agent was stopped; the process tree was killed"
                break
            was_suspended = step_aside.suspended
            evicted = step_aside.step(tree, now)
            if evicted:
                exit_code, error = EXIT_STOPPED, f"evicted ({evicted}); the process tree was killed"
                grace = LOST_KILL_GRACE_SECONDS
                break
            if step_aside.suspended != was_suspended:
                output.check_in()
            output.pump(STEP_SECONDS)
        if exit_code is None:
            exit_code = _exit_code(proc.returncode)
            output.wait_eof(PIPE_GRACE_SECONDS)
    except JobLost:
        grace = LOST_KILL_GRACE_SECONDS
        output.close()
        raise
    finally:
        tree.kill(grace)  # the whole tree of a killed or lost job; what a finished one left running
        _DESCENDANTS.shell_reaped(proc)
    output.wait_eof(PIPE_GRACE_SECONDS)
    if error:
        output.note(f"dispatch-agent: {error}")
    stdout, stderr = output.finish()
    return JobResult(exit_code, stdout, stderr, error, time.monotonic() - started, evicted)


# === Server link: worker token, registration, heartbeats ===


class _ServerLink:
    """This agent's standing with the server: the worker token (saved in the work dir, reused by
    the next run), registration, requests made with the token, and heartbeats. With several
    servers, `servers` says which one is in use.

    Every heartbeat sends what `heartbeat_body()` returns at that moment. A server that says a
    waiting poll keeps the worker alive (`pollKeepsAlive`) is not sent the heartbeats that would
    only say "still here" while `quiet()`: a farm of idle agents then costs the server their polls.
    """

    def __init__(self, config: Config, token_path: Path, heartbeat_body: Callable[[], dict],
                 quiet: Callable[[], bool]):
        self.config = config
        self.servers = _Servers(config.servers)
        self._token_path = token_path
        self._heartbeat_body = heartbeat_body
        self._quiet = quiet
        self._kept_alive_by = None  # the server whose last heartbeat answer said pollKeepsAlive
        self._token = None
        self._register_lock = threading.Lock()  # one registration at a time; guards replacing the token
        self._announce_lock = threading.Lock()
        self._announced = False  # a heartbeat of this run went through
        self._failing = None  # why the server could not be reached, while it cannot
        self._failing_lock = threading.Lock()
        self._soon = threading.Event()  # wakes the heartbeat loop before its interval is up
        self._beat_lock = threading.Lock()  # one heartbeat at a time, so none overtakes the goodbye
        self._said_goodbye = False

    @property
    def token(self) -> Optional[str]:
        """The worker token, or None while not registered."""
        return self._token

    @property
    def server(self) -> str:
        """The URL of the server in use."""
        return self.servers.current

    def load_token(self) -> None:
        """Take up the token an earlier run saved for this server and worker id, if there is one."""
        try:
            saved = json.loads(self._token_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if (isinstance(saved, dict) and saved.get("server") in self.config.servers  # its token is good on each
                and saved.get("workerId") == self.config.worker_id):
            log.info("using the saved worker token for %s", self.config.worker_id)
            self._token = saved.get("token")

    def request(self, method: str, path: str, body=None, timeout=HTTP_TIMEOUT_SECONDS) -> tuple:
        """_request() to the server with the worker token. ServerUnavailable while not registered;
        Fatal once the server refuses the token: an admin deleted this worker, and registering it
        again behind their back would undo that."""
        token = self._token
        if token is None:
            raise ServerUnavailable("not registered yet")
        try:
            with self.servers.in_use() as server:
                return _request(method, server + path, headers={"x-worker-token": token}, body=body, timeout=timeout)
        except Refused as err:
            if err.status == 401:
                raise Fatal(f"the server no longer accepts worker {self.config.worker_id!r} (an admin deleted it, "
                            f"or the server's data was replaced): to add this computer again, delete "
                            f"{self._token_path} and start the agent") from None
            raise

    def note_failure(self, err: AgentError) -> None:
        """Log that the server cannot be reached, once per outage (not once per retry); with
        several, once none of them answers (each move to the next one is logged as it happens)."""
        servers = self.servers
        if getattr(err, "server", None) not in (None, servers.current) and not servers.none_answers:
            return  # the agent moved on from that server, and said so
        with self._failing_lock:
            first, self._failing = self._failing is None, str(err)
        if first:
            where = f"any of {', '.join(servers.urls)}" if servers.none_answers else f"the server at {servers.current}"
            log.warning("cannot reach %s (%s); retrying until it answers", where, err)

    def note_success(self) -> None:
        with self._failing_lock:
            was_failing, self._failing = self._failing is not None, None
        if was_failing:
            log.info("the server at %s answers again", self.server)

    def ensure_registered(self) -> None:
        """Register this worker unless a token is at hand, and save the token for the next run."""
        with self._register_lock:
            if self._token is not None:
                return
            cfg = self.config
            body = {
                "workerId": cfg.worker_id,
                "hostname": socket.gethostname(),
                "cpuCount": os.cpu_count() or 1,
                "totalMemoryMb": _total_memory_mb(),
                **cfg.offers,
                "metadata": {
                    "osType": platform.system(),
                    "pythonVersion": platform.python_version(),
                    "tags": list(cfg.tags),
                },
            }
            try:
                with self.servers.in_use() as server:
                    _, data = _request("POST", server + "/api/workers/register", body=body,
                                       headers={"Authorization": f"Bearer {cfg.token}"})
            except Refused as err:
                raise self._registration_mistake(server, err) from None
            token = data.get("token") if isinstance(data, dict) else None
            if not isinstance(token, str) or not token:
                raise ServerUnavailable("the register answer has no token")
            _write_private(
                self._token_path, json.dumps({"server": server, "workerId": cfg.worker_id, "token": token})
            )
            self._token = token
            log.info("registered as worker %s on %s", cfg.worker_id, server)

    def _registration_mistake(self, server: str, err: Refused) -> Fatal:
        """What a refused registration means, in a sentence that says what to change."""
        cfg = self.config
        if err.status == 409:
            return Fatal(f"worker id {cfg.worker_id!r} is already registered, and {self._token_path} holds no "
                         f"valid token for it: an admin can delete the worker (DELETE /api/workers/"
                         f"{cfg.worker_id}), or start this agent with another --worker-id")
        if err.status == 401:
            return Fatal("the server refused the registration token: give the one dispatch.py printed at start "
                         "(--token or DISPATCH_REGISTRATION_TOKEN)")
        if err.status == 404:
            return Fatal(f"{server} has no worker registration (HTTP 404): --server must be the dispatch "
                         f"server's address, e.g. http://lanbox:3000")
        return Fatal(f"the server refused to register this worker: {err}")

    def say_goodbye(self) -> None:
        """Tell the server this worker stops now, so it shows offline at once (best effort): after
        any heartbeat on its way, and before none."""
        with self._beat_lock:
            self._said_goodbye = True
            with contextlib.suppress(AgentError):
                self.request("POST", "/api/workers/heartbeat", {**self._heartbeat_body(), "status": "offline"})

    def heartbeat(self) -> Optional[dict]:
        """Send one heartbeat, registering first if needed; the server's answer (None after the goodbye)."""
        self.ensure_registered()
        with self._beat_lock:
            if self._said_goodbye:
                return None
            server = self.server
            _, data = self.request("POST", "/api/workers/heartbeat", self._heartbeat_body())
        self._announced = True
        self._kept_alive_by = server if isinstance(data, dict) and data.get("pollKeepsAlive") is True else None
        return data

    def heartbeat_soon(self) -> None:
        """Have the heartbeat loop send one now: the server shows what changed (a pause) at once."""
        self._soon.set()

    def announce(self) -> None:
        """Make sure a heartbeat of this run went through: before a slot's first get-job, so the
        server gives back at once the jobs an earlier run held and this one does not."""
        with self._announce_lock:
            if not self._announced:
                self.heartbeat()

    def heartbeat_loop(self, stopped: threading.Event) -> None:
        """Send heartbeats as often as the server's nextCheckIn asks until `stopped` is set; back
        off (never beyond that interval) while they fail."""
        interval = HEARTBEAT_DEFAULT_SECONDS
        backoff = _Backoff()
        delay = 0.0
        while True:
            woken = self._soon.wait(delay)
            self._soon.clear()
            if stopped.is_set():
                return
            if not woken and self._kept_alive_by == self.server and self._quiet():
                delay = interval  # the poll waiting on the server says "still here"
                continue
            try:
                data = self.heartbeat()  # registers too: with every slot busy, no slot would
            except Fatal:
                raise
            except AgentError as err:
                self.note_failure(err)
                delay = min(interval, backoff.next(getattr(err, "retry_after", None)))
                continue
            self.note_success()
            backoff.reset()
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                interval = min(max(float(data["nextCheckIn"]) / 1000, 1.0), 300.0)
            delay = interval


# === Spool: results waiting for the server ===


class _ResultSpool:
    """Results of finished jobs the server could not take when they were sent, kept on disk until
    it does: they survive a server outage and an agent restart. A delivered (or refused) result is
    deleted with its job directory.

    What it holds is mirrored in memory, so asking costs no directory scan.
    """

    def __init__(self, directory: Path, jobs_dir: Path, submit: Callable[[dict], object]):
        self.directory = directory
        self._jobs_dir = jobs_dir
        self._submit = submit  # sends one submit-result body; raises AgentError if not taken
        self._lock = threading.Lock()  # guards _unsent
        self._unsent = {}  # job key -> job id (None for an unreadable file)
        self._delivering = threading.Lock()

    def load(self) -> None:
        """Create the spool directory (the agent's only) and take up the results an earlier run left in it."""
        _private_dir(self.directory)
        for path in self.directory.glob("*.json"):
            try:
                job_id = json.loads(path.read_text(encoding="utf-8")).get("jobId")
            except (OSError, ValueError, AttributeError):
                job_id = None  # still listed, so that deliver() drops it
            with self._lock:
                self._unsent[path.stem] = job_id if isinstance(job_id, str) else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._unsent)

    def job_ids(self) -> set:
        """The ids of the jobs whose result waits here."""
        with self._lock:
            return {job_id for job_id in self._unsent.values() if job_id}

    def add(self, key: str, body: dict) -> None:
        """Keep a submit-result body (JSON-serialisable) under its job's key."""
        # No fsync: it costs more than the job itself for a short one, and a power cut loses the
        # job anyway.
        _write_private(self.directory / f"{key}.json", json.dumps(body), sync=False)
        with self._lock:
            self._unsent[key] = body["jobId"]

    def send_now(self, key: str, body: dict, submit: Callable[[dict], object]) -> object:
        """Send a finished job's result with `submit`; what it returned (None if the server refused
        the result). The job dir goes once the server has answered. If the server cannot take the
        result now, it is kept here (see add) and the AgentError raised."""
        try:
            answer = self._send(body, submit)
        except AgentError:
            self.add(key, body)
            raise
        self._forget(key)
        return answer

    def _send(self, body: dict, submit: Callable[[dict], object]) -> object:
        """submit(body), or None if the server refused the result: it is dropped, as every retry
        would be refused too."""
        try:
            return submit(body)
        except Refused as err:
            if err.status == 401:
                raise
            log.warning("the server refused the result of job %s (%s); dropped it", body.get("jobId"), err)
            return None

    def _forget(self, key: str) -> None:
        """The result under `key` is delivered or dropped: delete it (if it was spooled) and its job dir."""
        with self._lock:
            spooled = key in self._unsent
            self._unsent.pop(key, None)
        if spooled:
            (self.directory / f"{key}.json").unlink(missing_ok=True)
        _remove_dir(self._jobs_dir / key)

    def deliver(self, wait: bool = False) -> None:
        """Send every result held; an acknowledged or refused one is deleted with its job dir.

        Raises ServerUnavailable (or Refused 401) when the server cannot take them yet. Without
        `wait`, returns at once if another thread is already at it.
        """
        if not len(self):
            return
        if not self._delivering.acquire(blocking=wait):
            return
        try:
            for path in sorted(self.directory.glob("*.json")):
                try:
                    body = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as err:
                    log.warning("dropping unreadable spooled result %s: %s", path.name, err)
                else:
                    if self._send(body, self._submit) is not None:
                        log.info("result of job %s delivered", body.get("jobId"))
                self._forget(path.stem)
        finally:
            self._delivering.release()


# === Agent: job slots, the lease, stopping ===


@dataclasses.dataclass(frozen=True)
class _Job:
    """One attempt at a job, as get-job hands it over."""

    job_id: str
    command: str
    file_url: Optional[str]
    file_id: Optional[str]  # the server's name for the input: the download cache's key
    sha256: Optional[str]  # of the input file, lowercase hex
    working_directory: Optional[str]
    timeout: float
    attempt: int
    cpus: int  # what it asked: the command sees it as DISPATCH_CPUS
    input_tree: Optional[list] = None  # its files by content: [{"path", "sha256", "size", "mode"}]
    artifact_patterns: tuple = ()  # globs of the files to send back, relative to the working directory
    artifacts_when: str = "on_success"
    env: tuple = ()  # (name, value) pairs added to the command's environment
    max_artifact_bytes: Optional[int] = None  # the server keeps no larger artifacts zip

    @classmethod
    def from_api(cls, data) -> "_Job":
        """Read get-job's `job` object; ServerUnavailable if it is not usable."""
        try:
            job_id, command = data["jobId"], data["command"]
            file_id, sha256 = data.get("fileId"), data.get("sha256")
            if not isinstance(job_id, str) or not isinstance(command, str):
                raise TypeError("jobId and command must be strings")
            if not isinstance(file_id, (str, type(None))) or not isinstance(sha256, (str, type(None))):
                raise TypeError("fileId and sha256 must be strings or null")
            return cls(
                job_id=job_id,
                command=command,
                file_url=data.get("fileUrl"),
                file_id=file_id,
                sha256=sha256.lower() if sha256 else None,
                working_directory=data.get("workingDirectory"),
                timeout=float(data.get("timeout") or DEFAULT_JOB_TIMEOUT_SECONDS),
                attempt=int(data.get("attempt") or 1),
                cpus=int(data.get("cpus") or 1),
                **_job_transfers(data),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ServerUnavailable(f"get-job answered with an unusable job ({err})") from None

    @property
    def key(self) -> str:
        """A file-name-safe name for this attempt: its job directory and spool file."""
        return f"{re.sub(r'[^A-Za-z0-9_-]', '_', self.job_id)[:100]}.{self.attempt}"


def _setup_failure(error: str) -> JobResult:
    """The result of a job that failed before its command could run."""
    return JobResult(EXIT_SETUP_FAILED, stderr=f"dispatch-agent: {error}\n", error=error)


class Agent:
    """One worker: job slots that ask the server for jobs and run them, a heartbeat thread that
    keeps this run's lease on them, and stopping in two steps.

    run_forever() runs `concurrency` slot threads, each calling poll_once() in a loop, and a
    heartbeat thread. A test can call prepare() and then drive poll_once(now=...) and heartbeat()
    itself.

    The lease: each run has an id, and numbers its polls (get-job requests, and results sent with
    `next=1`). Every heartbeat lists the jobs this run holds and `polled`, the number up to which
    every poll's answer is handled, so the server can take back a job this run does not hold
    without mistaking one whose answer is still on its way.
    """

    def __init__(self, config: Config):
        self.config = config
        self._job_user = _JobUser.lookup(config.run_as) if config.run_as else None
        self._work_dir = config.work_dir
        self._jobs_dir = config.work_dir.resolve() / "jobs"  # resolved once, not per job (see _working_dir)
        self._cache = _DownloadCache(config.work_dir / "cache", config.cache_mb * 1024**2)
        self._link = _ServerLink(config, config.work_dir / "worker.json", self._heartbeat_body, self._quiet)
        self._spool = _ResultSpool(config.work_dir / "results", self._jobs_dir,
                                   functools.partial(self._link.request, "POST", "/api/jobs/submit-result"))
        # The marker ties job processes to this work dir, so a restarted agent finds its leftovers.
        self._marker_prefix = hashlib.sha256(str(config.work_dir.resolve()).encode()).hexdigest()[:16] + "/"
        self._run_id = uuid.uuid4().hex
        self._guest = _Guest(config)
        self._standing = _Standing()  # replaced whole by check_guest(), so it is read without the lock
        self._lock = threading.Lock()  # guards the fields below
        self._running = {}  # job key -> _Job, from its poll's answer until its result is sent or spooled
        self._polls_sent = 0  # polls of this run so far; each carries its number
        self._polls_open = set()  # numbers of polls whose answer is not fully handled yet
        self._jobs_completed = 0
        self._retry_at = 0.0  # no slot asks the server anything before this (monotonic) time
        self._backoff = _Backoff()
        # request_stop() runs in a signal handler, so it only counts; run_forever() turns the count
        # into the events (Event.set() in a handler can deadlock with a wait on the same event).
        self._stop_requests = 0
        self._draining = threading.Event()  # first stop: no new jobs
        self._halt = threading.Event()  # second stop: kill running jobs
        self._stopped = threading.Event()
        self._work_dir_lock = None
        self.fatal = None  # the mistake that stopped this agent, if one did (see Fatal)

    # --- start and stop ---------------------------------------------------

    def prepare(self) -> None:
        """Set up the work dir: lock it, kill what an earlier run left, load the saved worker token
        and the results still waiting for the server.

        Only the agent's own account may read the work dir. With --run-as, the job user may pass
        through it and through the jobs dir (mode 0711) to its job's directory, but list neither;
        AgentError if a directory above the work dir stops it, or if --only-when-idle is given and
        nothing here can tell when the owner last used the computer.
        """
        probe = self._guest.idle_probe()
        if probe is not None:
            log.info("the owner's keyboard and mouse are watched through %s", probe)
        passable = 0o700 if self._job_user is None else 0o711
        _private_dir(self._work_dir, passable)
        if self._job_user is not None:
            blocked = self._job_user.blocked_on_the_way_to(self._work_dir.resolve())
            if blocked is not None:
                name = self._job_user.name
                raise AgentError(f"--run-as {name}: {name} may not pass through {blocked} to reach the work dir; "
                                 f"choose a --work-dir it can reach, such as /var/lib/dispatch-agent")
        self._work_dir_lock = _lock_work_dir(self._work_dir)
        killed = _kill_marked(self._marker_prefix)
        if killed:
            log.info("killed %d process(es) left behind by an earlier run of this agent", killed)
        shutil.rmtree(self._jobs_dir, ignore_errors=True)
        _private_dir(self._jobs_dir, passable)
        self._cache.clean()
        self._spool.load()
        self._link.load_token()

    def close(self) -> None:
        """Release the work dir (run_forever does this when it returns)."""
        if self._work_dir_lock is not None:
            self._work_dir_lock.close()
            self._work_dir_lock = None

    def request_stop(self) -> None:
        """First call: take no new jobs, let running ones finish. Second: kill running jobs too.

        Safe in a signal handler: it only counts the calls.
        """
        self._stop_requests += 1

    def run_forever(self) -> None:
        """Take and run jobs until request_stop(); return once stopped (see request_stop)."""
        self.prepare()
        _DESCENDANTS.enable()  # Linux: what a job leaves behind becomes this process's child, not init's
        cfg = self.config
        log.info(
            "dispatch agent %s: worker %s, server %s, %d slot(s), tags %s, work dir %s%s",
            __version__, cfg.worker_id, cfg.server, cfg.concurrency, ",".join(cfg.tags) or "-", cfg.work_dir,
            f", jobs run as {cfg.run_as}" if cfg.run_as else "",
        )
        if self._guest.policy:
            log.info("jobs are taken %s", self._guest.policy)
            self.check_guest()  # before the first poll: a job must not start while the owner is at work
            threading.Thread(target=self._watch_guest, name="guest", daemon=True).start()
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        for n in range(cfg.concurrency):
            # Daemon threads: a slot parked in a long-poll must not keep a stopping agent alive.
            threading.Thread(target=self._slot_loop, name=f"slot-{n + 1}", daemon=True).start()
        try:
            while not self._stop_requests:
                time.sleep(STOP_CHECK_SECONDS)
            self._draining.set()
            self._link.heartbeat_soon()  # the server shows "draining" now
            running = self._busy()
            log.info("stopping: no new jobs%s",
                     f"; {running} running job(s) will finish (stop again to kill them)" if running else "")
            while self._busy() and self._stop_requests < 2:
                time.sleep(STOP_CHECK_SECONDS)
            if self._stop_requests >= 2:
                self._halt.set()
                log.info("stopping now: killing %d running job(s)", self._busy())
                deadline = time.monotonic() + STOP_GRACE_SECONDS
                while self._busy() and time.monotonic() < deadline:
                    time.sleep(STEP_SECONDS)
            # A slot still parked in a long-poll is abandoned here: its connection closes with the
            # process, and the server must not hand a job to a closed connection.
            self._spool.deliver(wait=True)
            if self.fatal is None:
                self._link.say_goodbye()
        except AgentError as err:
            log.warning("%d result(s) stay in %s and are sent at the next start (%s)",
                        len(self._spool), self._spool.directory, err)
        finally:
            self._stopped.set()
            self.close()
        log.info("stopped")
        if self.fatal is not None:
            raise self.fatal

    def _give_up(self, err: Fatal) -> None:
        """Stop now over a mistake that retrying cannot fix: running jobs are killed, and the
        reason is logged once."""
        with self._lock:
            first = self.fatal is None
            self.fatal = self.fatal or err
        if first:
            log.error("%s", err)
        self._stop_requests = max(self._stop_requests, 2)

    def _heartbeats(self) -> None:
        try:
            self._link.heartbeat_loop(self._stopped)
        except Fatal as err:
            self._give_up(err)

    def _busy(self) -> int:
        with self._lock:
            return len(self._running)

    # --- the owner (see _Guest) -------------------------------------------

    def check_guest(self) -> _Standing:
        """Ask the guest policy what the owner allows now; the slots and running jobs follow it.

        The guest thread does this every GUEST_CHECK_SECONDS; a test can call it between steps.
        """
        with self._lock:
            our_load = sum(job.cpus for job in self._running.values())
        standing, before = self._guest.standing(our_load), self._standing
        self._standing = standing
        if (standing.paused is None) != (before.paused is None):
            if standing.paused:
                log.info("taking no new jobs: %s", standing.paused)
            else:
                log.info("taking jobs again")
            self._link.heartbeat_soon()
        return standing

    def _watch_guest(self) -> None:
        while not self._stopped.wait(GUEST_CHECK_SECONDS):
            try:
                self.check_guest()
            except Exception:  # a bug must not leave the owner's desktop to the farm, or the farm without it
                log.exception("unexpected error in the guest check; trying again")

    def _paused_reason(self) -> Optional[str]:
        """Why this agent takes no new job now, or None."""
        return "draining" if self._stop_requests else self._standing.paused

    # --- the lease --------------------------------------------------------

    def heartbeat(self) -> Optional[dict]:
        """Send one heartbeat now, registering first if needed; the server's answer.

        The heartbeat thread does this every nextCheckIn; a test can call it between steps.
        """
        return self._link.heartbeat()

    def _heartbeat_body(self) -> dict:
        paused = self._paused_reason()
        with self._lock:
            running = [job.job_id for job in self._running.values()]
            # Read under the same lock as _running: a job leaves _running only once it is spooled.
            held = set(running) | self._spool.job_ids()
            polled = min(self._polls_open) - 1 if self._polls_open else self._polls_sent
            return {
                "state": "paused" if paused else "available",
                "pausedReason": paused,
                "workerId": self.config.worker_id,
                "status": "busy" if running else "idle",
                "currentJobId": running[0] if running else None,
                "jobsCompleted": self._jobs_completed,
                "runningJobs": sorted(held),
                "run": self._run_id,
                "polled": polled,
                **self.config.offers,  # a saved token skips registering: flags changed since reach the server here
            }

    def _quiet(self) -> bool:
        """Nothing for a heartbeat to tell: no job held, and a get-job poll waits on the server."""
        with self._lock:
            return bool(self._polls_open) and not self._running and not self._spool.job_ids()

    def _claim_job(self) -> Optional[_Job]:
        """Ask the server for a job (long-poll)."""
        return self._poll("GET", f"/api/jobs/get-job?wait={POLL_WAIT_SECONDS}", "job",
                          timeout=POLL_WAIT_SECONDS + HTTP_TIMEOUT_SECONDS)

    def _submit_result(self, body: dict) -> Optional[_Job]:
        """Send a result; while this agent takes jobs, ask in the same request for the next one
        (`next=1`): the job the server handed over, or None (none now, or a server older than
        `next`): the slot then asks get-job as usual."""
        if self._paused_reason():
            self._link.request("POST", "/api/jobs/submit-result", body)
            return None
        # wait=0: the answer that says the result is saved must not wait for a job to come.
        return self._poll("POST", "/api/jobs/submit-result?next=1&wait=0", "next", body)

    def _poll(self, method: str, path: str, field: str, body=None, timeout=HTTP_TIMEOUT_SECONDS) -> Optional[_Job]:
        """A numbered request that may claim a job (the answer's `field`); a job it gives is in
        _running before the request counts as handled, so no heartbeat says "all answered"
        without listing it."""
        with self._lock:
            self._polls_sent += 1
            poll = self._polls_sent
            self._polls_open.add(poll)
        job = None
        try:
            status, data = self._link.request(method, f"{path}&run={self._run_id}&poll={poll}", body, timeout=timeout)
            if status != 204 and isinstance(data, dict) and data.get(field):
                job = _Job.from_api(data[field])
        finally:
            with self._lock:
                if job is not None:
                    self._running[job.key] = job
                self._polls_open.discard(poll)
        return job

    # --- the job slots ----------------------------------------------------

    def _slot_loop(self) -> None:
        while True:
            try:
                delay = self.poll_once()
            except Exception:  # a bug must not silently cost this computer a job slot
                log.exception("unexpected error in a job slot; it carries on in %.0f s", BACKOFF_CAP_SECONDS)
                delay = BACKOFF_CAP_SECONDS
            if delay is None:
                return
            if delay:
                self._draining.wait(delay)

    def poll_once(self, now: Optional[float] = None) -> Optional[float]:
        """One step of a free job slot: register if needed, announce this run, resend spooled
        results, then ask for a job (long-poll) and run it to the end, and each next job the
        server hands over with a result.

        Returns how many seconds to wait before the next step (0 for at once), or None once the
        agent is stopping. `now` is a time.monotonic() value.
        """
        if self._stop_requests:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            if now < self._retry_at:
                return self._retry_at - now
        try:
            return self._step(now)
        except Fatal as err:
            self._give_up(err)
            return None

    def _step(self, now: float) -> float:
        try:
            self._link.ensure_registered()
            self._link.announce()
            self._spool.deliver()
            if self._standing.paused:
                return GUEST_CHECK_SECONDS
            asked = time.monotonic()
            job = self._claim_job()
        except Fatal:
            raise
        except AgentError as err:
            with self._lock:
                self._retry_at = max(self._retry_at, now + self._backoff.next(getattr(err, "retry_after", None)))
                delay = self._retry_at - now
            self._link.note_failure(err)
            return delay
        self._link.note_success()
        with self._lock:
            self._backoff.reset()
        if job is None:
            return max(0.0, POLL_FLOOR_SECONDS - (time.monotonic() - asked))
        while job is not None:  # a busy server hands over the next job with the result
            job = self._run(job)
        return 0.0

    def _run(self, job: _Job) -> Optional[_Job]:
        """Run a job the server gave us (listed in _running), then send its result (spooled if the
        server cannot take it now); the next job, if the server handed one over with the answer."""
        log.info("job %s started (attempt %d): %r", job.job_id, job.attempt, job.command[:200])
        try:
            try:
                result = self._execute(job)
                result = self._send_artifacts(job, result)  # before the result, which ends the attempt
            except JobLost as err:
                log.warning("job %s is no longer ours (%s): killed it, no result sent", job.job_id, err)
                _remove_dir(self._jobs_dir / job.key)
                return None
            if result.evicted:
                log.info("job %s evicted (%s): it goes back to the queue", job.job_id, result.evicted)
            else:
                log.info(
                    "job %s finished: exit code %d%s%s",
                    job.job_id, result.exit_code, "" if result.duration is None else f" in {result.duration:.1f} s",
                    f" ({result.error})" if result.error else "",
                )
            body = {
                "jobId": job.job_id,
                "workerId": self.config.worker_id,
                "exitCode": result.exit_code,
                "stdout": result.stdout,
                "stderr": result.stderr,
                "attempt": job.attempt,
            }
            if result.error:
                body["error"] = result.error
            if result.duration is not None:
                body["runningFor"] = round(result.duration, 3)
            if result.evicted:
                body["evicted"] = result.evicted  # the server queues it again, at no cost to its retries
            if not result.evicted:
                with self._lock:
                    self._jobs_completed += 1
            try:
                next_job = self._spool.send_now(job.key, body, self._submit_result)
            except AgentError as err:
                log.warning("result of job %s kept on disk, will retry: %s", job.job_id, err)
                return None
            with contextlib.suppress(AgentError):  # the server answers: results it could not take before go now
                self._spool.deliver()
            return next_job
        finally:
            with self._lock:
                del self._running[job.key]

    def _execute(self, job: _Job) -> JobResult:
        job_dir = self._jobs_dir / job.key
        user = self._job_user
        _remove_dir(job_dir)  # what an attempt of the same number left, if any
        try:
            job_dir.mkdir(mode=0o700, parents=True)
            self._fetch_input(job, job_dir)
            cwd = _working_dir(job_dir, job.working_directory)
            if user is not None:
                user.give(job_dir)  # only once extracted: the job's user never touches a tree being written
        except (JobSetupError, OSError) as err:  # OSError: e.g. a full disk
            return _setup_failure(str(err))
        marker = f"{self._marker_prefix}{job.key}/"
        env = dict(os.environ)
        env.pop(TOKEN_ENV, None)  # a job must not be able to register workers
        env.update((name, value) for name, value in job.env if not name.upper().startswith("DISPATCH_"))
        env.update(DISPATCH_JOB_ID=job.job_id, DISPATCH_WORKER_ID=self.config.worker_id, DISPATCH_CPUS=str(job.cpus),
                   **{MARKER_ENV: marker})
        if user is not None:
            env.update(user.environ(job_dir.resolve()))
        started = time.monotonic()
        cfg = self.config
        step_aside = _StepAside(lambda: self._standing.aside, cfg.on_owner_return, cfg.evict_after * 60,
                                f"job {job.job_id}")
        try:
            return run_job(
                job.command,
                cwd,
                env=env,
                marker=marker,
                timeout=job.timeout,
                send_output=functools.partial(self._send_output, job, started, step_aside),
                halt=self._halt,
                user=user,
                step_aside=step_aside,
            )
        except OSError as err:  # the shell itself could not start
            return _setup_failure(f"could not start the command: {err}")
        finally:
            if user is not None:
                user.take_back(job_dir)  # the next job, run as the same user, cannot read this one's files

    def _fetch_input(self, job: _Job, job_dir: Path) -> None:
        if job.input_tree is not None:
            fetched = place_tree(job.input_tree, job_dir, self._cache, functools.partial(self._open_blobs, job),
                                 self._halt)
            log.info("job %s: %d input files in place, %d bytes fetched", job.job_id, len(job.input_tree), fetched)
            return
        if not job.file_url:
            return
        url = urllib.parse.urljoin(self._link.server + "/", job.file_url)
        # The worker token goes only to the dispatch servers themselves, never to another host.
        ours = _origin(url) in {_origin(server) for server in self.config.servers}
        token = (self._link.token or "") if ours else None
        download = functools.partial(_download, url, token=token, sha256=job.sha256, halt=self._halt)
        with self._cache.fetch(job.file_id, download) as path:
            _place_input(path, _input_name(url), job_dir)

    @contextlib.contextmanager
    def _open_blobs(self, job: _Job, batch: list):
        """The server's answer holding these blobs of the job's input tree, one after the other."""
        body = json.dumps({"jobId": job.job_id, "attempt": job.attempt, "sha256": [h for h, _ in batch]}).encode()
        with self._link.servers.in_use() as server, _stream_request(
                "POST", server + "/api/blobs/fetch", body=body,
                headers={"x-worker-token": self._link.token or "", "Content-Type": "application/json"},
                timeout=4 * HTTP_TIMEOUT_SECONDS) as response:
            yield response

    def _send_artifacts(self, job: _Job, result: JobResult) -> JobResult:
        """Collect, zip and send the job's artifacts, if it names any and its artifactsWhen says so
        (a command that never ran has none); the result, with what was skipped added to its stderr and
        why none were sent (too big, refused) to its error. JobLost if the job is no longer ours."""
        ran = result.duration is not None and not getattr(result, "evicted", None) and not self._halt.is_set()
        failed = result.exit_code != 0
        wanted = {"always": True, "on_failure": failed}.get(job.artifacts_when, not failed)
        if not (job.artifact_patterns and ran and wanted):
            return result
        archive = self._jobs_dir / f"{job.key}.artifacts.zip"
        notes, error = [], None
        try:
            cwd = _working_dir(self._jobs_dir / job.key, job.working_directory)
            files, notes = collect_artifacts(cwd, job.artifact_patterns, archive, max_bytes=job.max_artifact_bytes)
            if files:
                self._upload_artifacts(job, archive)
                log.info("job %s: %d artifact file(s) sent, %d bytes", job.job_id, files, archive.stat().st_size)
        except JobLost:
            raise
        except (AgentError, OSError) as err:
            error = str(err) if isinstance(err, AgentError) else f"artifacts not sent: {err}"
            log.warning("job %s: %s", job.job_id, error)
        finally:
            archive.unlink(missing_ok=True)
        lines = "".join(f"dispatch-agent: {note}\n" for note in notes + ([error] if error else []))
        stderr = result.stderr + ("\n" if result.stderr and not result.stderr.endswith("\n") else "") + lines
        errors = "; ".join(e for e in (result.error, error) if e)
        return dataclasses.replace(result, stderr=stderr, error=errors or None)

    def _upload_artifacts(self, job: _Job, archive: Path) -> None:
        """POST the artifacts zip for the attempt this agent holds, retrying while the server is
        unreachable; JobLost if the job is no longer ours, AgentError if it is refused."""
        body = _Multipart()
        body.field("jobId", job.job_id)
        body.field("attempt", str(job.attempt))
        body.file("file", archive, archive.stat().st_size, "artifacts.zip")
        headers = {"x-worker-token": self._link.token or ""}
        backoff = _Backoff()
        for attempt in range(1, ARTIFACT_ATTEMPTS + 1):
            try:
                with self._link.servers.in_use() as server, _stream_request(
                        "POST", server + "/api/jobs/artifacts", body=body, headers=headers,
                        timeout=4 * HTTP_TIMEOUT_SECONDS) as response:
                    response.read()
                return
            except ServerUnavailable as err:
                if attempt == ARTIFACT_ATTEMPTS or self._halt.wait(backoff.next(err.retry_after)):
                    raise AgentError(f"artifacts not sent: {err}") from None
            except Refused as err:
                if err.status == 409:
                    raise JobLost(err.message) from None
                raise AgentError(err.message if err.status == 413 else f"artifacts refused: {err}") from None

    def _send_output(self, job: _Job, started: float, step_aside: _StepAside, stream: str, text: str) -> None:
        body = {"jobId": job.job_id, "data": text, "type": stream, "attempt": job.attempt,
                "runningFor": round(time.monotonic() - started, 3), "suspended": step_aside.suspended}
        try:
            self._link.request("POST", "/api/jobs/stream-output", body)
        except Refused as err:
            if err.status == 409:
                raise JobLost(err.message) from None
            if err.status == 401:
                raise ServerUnavailable("the worker token was refused") from None
            raise


# === Client: python agent.py run [options] -- COMMAND... ===

RUN_USAGE = "python agent.py run [options] -- COMMAND..."
UPLOAD_BATCH_BYTES = 64 * 1024**2  # blobs sent in one POST /api/blobs/batch (each request counts
UPLOAD_BATCH_BLOBS = 5000  # against the rate limit); a larger file goes alone, with PUT
MISSING_QUERY_HASHES = 50_000  # hashes asked about in one POST /api/blobs/missing
FOLLOW_READ_TIMEOUT = 60.0  # the server sends a keep-alive every 15 s
EXIT_CLIENT_ERROR = 1  # dispatch itself failed (unreachable, refused, lost the job): the job's own code is unknown
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C cancelled the job
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ClientError(AgentError):
    """What stops `agent.py run`, in one sentence."""


def _run_parser(environ: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent.py run", usage=RUN_USAGE,
        description="Run COMMAND on the farm with this folder's files: the files a git work tree holds "
                    "(git ls-files -co --exclude-standard) or everything, never .git, less what .dispatchignore "
                    "names. Only contents the server lacks are sent. Output streams here as it happens; "
                    "--artifacts come back into the folder; the exit code is the job's (124: timed out, "
                    "125: could not be set up). Ctrl-C cancels the job.",
        epilog="example:\n  DISPATCH_API_TOKEN=dsp_... python agent.py run --server http://lanbox:3000 "
               "--artifacts 'dist/**' -- make test",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", metavar="URL", default=environ.get("DISPATCH_SERVER"),
                        help="the dispatch server, e.g. http://lanbox:3000, or several serving one database "
                             "separated by commas: the first that answers is used [DISPATCH_SERVER]")
    parser.add_argument("--api-token", metavar="TOKEN", default=environ.get("DISPATCH_API_TOKEN"),
                        help="a personal API token (POST /api/auth/tokens) [DISPATCH_API_TOKEN]")
    parser.add_argument("-C", dest="folder", metavar="DIR", default=".", help="the folder to send (default: here)")
    parser.add_argument("--artifacts", metavar="PATTERN", action="append", default=[],
                        help="files to bring back into the folder, relative to the working directory: a glob, "
                             "** across folders, a folder takes all it holds (repeatable)")
    parser.add_argument("--artifacts-when", choices=("on_success", "on_failure", "always"),
                        help="when the artifacts are collected (default: on_success)")
    parser.add_argument("--tags", metavar="TAGS", help="comma list: run only on a worker that has all of them")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, help="kill the job after this long (default 600)")
    parser.add_argument("--priority", choices=("low", "normal", "high"))
    parser.add_argument("--working-directory", metavar="DIR", help="where COMMAND runs, relative to the folder")
    parser.add_argument("--env", metavar="KEY=VALUE", action="append", default=[],
                        help="a variable for the job's environment (repeatable)")
    parser.add_argument("--detach", action="store_true", help="print the job id and return once it is queued")
    return parser


def _shell_command(words: list) -> str:
    """One word is a shell command as it is (`-- 'make && make test'`); several are quoted and
    joined (`-- python -c 'print(1)'`), for the worker's /bin/sh."""
    import shlex

    return words[0] if len(words) == 1 else shlex.join(words)


def run_client(argv: list, environ: Optional[dict] = None, stdout=None, stderr=None) -> int:
    """`agent.py run`: send the folder, run the command on the farm, stream its output, bring the
    artifacts back; the process exit status (the job's exit code)."""
    environ = os.environ if environ is None else environ
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    parser = _run_parser(environ)
    if "--" not in argv:
        parser.error("put the command after --, e.g. python agent.py run -- make test")
    split = argv.index("--")
    args, words = parser.parse_args(argv[:split]), argv[split + 1:]
    if not words:
        parser.error("the command after -- is missing")
    servers = _server_urls(parser, args.server)
    if not args.api_token:
        parser.error("--api-token (or DISPATCH_API_TOKEN) is required: create one with POST /api/auth/tokens")
    env = {}
    for item in args.env:
        name, equals, value = item.partition("=")
        if not equals or not ENV_NAME.fullmatch(name):
            parser.error(f"--env {item!r} must be NAME=VALUE, NAME made of letters, digits and _")
        env[name] = value
    client = _Client(servers, args.api_token, stderr, environ)
    try:
        return client.run(args, _shell_command(words), env, stdout)
    except KeyboardInterrupt:
        return client.interrupted()
    except AgentError as err:
        client.say(str(err))
        return EXIT_CLIENT_ERROR


class _Client:
    """One `agent.py run`: its servers, its token, what it tells the person on stderr."""

    def __init__(self, servers: tuple, token: str, stderr, environ):
        self._token, self._stderr, self._environ = token, stderr, environ
        self.job_id: Optional[str] = None
        self._progress = _Progress(stderr)
        self._servers = _Servers(servers, tell=self.say)

    def say(self, text: str) -> None:
        self._progress.clear()
        self._stderr.write(f"dispatch: {text}\n")
        self._stderr.flush()

    @property
    def _auth(self) -> dict:
        return {"Authorization": f"Bearer {self._token}"}

    def _call(self, method: str, path: str, body=None, timeout=HTTP_TIMEOUT_SECONDS):
        """The answer of the server in use, or of the next ones in turn while it cannot be reached."""
        for others_left in reversed(range(len(self._servers.urls))):
            try:
                with self._servers.in_use() as server:
                    return _request(method, server + path, headers=self._auth, body=body, timeout=timeout)[1]
            except ServerUnavailable as err:
                if not (err.unreachable and others_left):
                    raise
            except Refused as err:
                raise ClientError(self._refusal(path, err)) from None

    @staticmethod
    def _refusal(path: str, err: Refused) -> str:
        if err.status == 401:
            return f"the server refused the API token ({err.message}): create one with POST /api/auth/tokens"
        return f"{path}: {err.message}"

    def run(self, args, command: str, env: dict, stdout) -> int:
        folder = Path(args.folder).resolve()
        if not folder.is_dir():
            raise ClientError(f"-C {args.folder}: not a folder")
        files, notes = collect_files(folder)
        for note in notes:
            self.say(note)
        cache = _HashCache(folder, self._environ)
        tree = self.send_files(files, cache)
        job = {"command": command}
        if tree:
            job["inputTree"] = tree
        optional = {"artifacts": args.artifacts, "artifactsWhen": args.artifacts_when, "timeout": args.timeout,
                    "priority": args.priority, "workingDirectory": args.working_directory, "env": env,
                    "tags": [t.strip() for t in (args.tags or "").split(",") if t.strip()]}
        job.update({name: value for name, value in optional.items() if value})
        try:
            self.job_id = self._call("POST", "/api/jobs/submit", job)["jobId"]
        except ClientError as err:
            if "inputTree names blob" not in str(err):
                raise
            # A content the server had last time is gone (expired): ask about every one, send, again.
            job["inputTree"] = self.send_files(files, cache, trust_cache=False)
            self.job_id = self._call("POST", "/api/jobs/submit", job)["jobId"]
        if args.detach:
            stdout.write(self.job_id + "\n")
            stdout.flush()
            return 0
        self.say(f"job {self.job_id} queued ({len(tree)} files); Ctrl-C cancels it")
        final = self.follow(stdout)
        if final.get("artifacts"):
            self.fetch_artifacts(final, folder / (args.working_directory or ""))
        return self.exit_code(final)

    # -- files ------------------------------------------------------------------

    def send_files(self, files: list, cache: "_HashCache", *, trust_cache: bool = True) -> list:
        """Hash the files (those unchanged since the last run are known), send the contents the
        server lacks (it is asked only about contents it did not have last time, unless not
        `trust_cache`); the input tree."""
        tree, paths = [], {}
        for rel, path, st in files:
            sha256, size = cache.hash(rel, path, st)
            tree.append({"path": rel, "sha256": sha256, "size": size, "mode": stat.S_IMODE(st.st_mode)})
            paths.setdefault(sha256, (path, size))
        farm = ",".join(self._servers.urls)  # the servers share one database: what one has, each has
        known = cache.sent(farm) if trust_cache else set()
        unknown = [sha256 for sha256 in paths if sha256 not in known]
        missing = []
        for start in range(0, len(unknown), MISSING_QUERY_HASHES):
            answer = self._call("POST", "/api/blobs/missing", {"sha256": unknown[start:start + MISSING_QUERY_HASHES]})
            missing += answer["missing"]
        if missing:
            self._upload([(sha256, *paths[sha256]) for sha256 in missing])
        cache.note_sent(farm, paths)
        cache.save()
        return tree

    def _upload(self, blobs: list) -> None:
        total = sum(size for _, _, size in blobs)
        self._progress.start(len(blobs), total)
        started = time.monotonic()
        batch, batch_bytes = [], 0
        for blob in sorted(blobs, key=lambda b: b[2]):  # the small ones first, many to a request
            if batch and (len(batch) == UPLOAD_BATCH_BLOBS or batch_bytes + blob[2] > UPLOAD_BATCH_BYTES):
                self._send_batch(batch)
                batch, batch_bytes = [], 0
            batch.append(blob)
            batch_bytes += blob[2]
        if batch:
            self._send_batch(batch)
        self._progress.clear()
        seconds = max(time.monotonic() - started, 1e-3)
        self.say(f"sent {len(blobs)} file(s), {total / 1024**2:.1f} MB in {seconds:.1f} s "
                 f"({total / 1024**2 / seconds:.0f} MB/s)")

    def _send_batch(self, batch: list) -> None:
        """One request: a lone blob with PUT, several with POST /api/blobs/batch; again while the
        server is unreachable or busy (429)."""
        if len(batch) == 1:
            sha256, path, size = batch[0]
            method, target, body = "PUT", f"/api/blobs/{sha256}", _FileBody(path, size)
        else:
            method, target, body = "POST", "/api/blobs/batch", _BlobBatch()
            for sha256, path, size in batch:
                body.add(sha256, path, size)
        backoff = _Backoff()
        while True:
            try:
                with self._servers.in_use() as server, _stream_request(
                        method, server + target, headers=self._auth, body=body, timeout=4 * HTTP_TIMEOUT_SECONDS,
                        sent=self._progress.sent) as response:
                    response.read()
                self._progress.files_done(len(batch))
                return
            except ServerUnavailable as err:
                self._progress.rewind()
                delay = backoff.next(err.retry_after)
                if backoff.failures > 8:
                    raise ClientError(f"could not send the files: {err}") from None
                self.say(f"sending paused ({err}); again in {delay:.0f} s")
                time.sleep(delay)
            except Refused as err:
                if err.status == 400 and "SHA-256" in err.message:
                    raise ClientError(f"a file changed while it was being sent ({err.message}): run again") from None
                raise ClientError(self._refusal("/api/blobs", err)) from None

    # -- the job ----------------------------------------------------------------

    def follow(self, stdout) -> dict:
        """Stream the job's output here until it ends (following again after a broken connection);
        its final status."""
        shown = _Shown(stdout, self._stderr, self.say)
        backoff = _Backoff(cap=10.0)
        target = f"/api/jobs/follow?jobId={urllib.parse.quote(self.job_id)}"
        while True:
            try:
                with self._servers.in_use() as server, _stream_request(
                        "GET", server + target, headers={**self._auth, "Accept": "text/event-stream"},
                        timeout=FOLLOW_READ_TIMEOUT) as response:
                    for name, event in _sse_events(response):
                        backoff.reset()
                        if name == "job.end":
                            return event
                        shown.event(name, event)
            except Refused as err:
                raise ClientError(self._refusal("/api/jobs/follow", err)) from None
            except (ServerUnavailable, OSError, http.client.HTTPException) as err:
                delay = backoff.next(getattr(err, "retry_after", None))
                if backoff.failures == 1 or backoff.failures % 10 == 0:
                    self.say(f"lost the server ({err}); following again in {delay:.0f} s")
                time.sleep(delay)

    def interrupted(self) -> int:
        """Ctrl-C: cancel the job (if there is one yet), exit 130."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cancel
        try:
            if self.job_id is None:
                self.say("interrupted before a job was submitted")
                return EXIT_INTERRUPTED
            try:
                self._call("POST", "/api/jobs/cancel", {"jobId": self.job_id})
                self.say(f"cancelled job {self.job_id}")
            except AgentError as err:
                self.say(f"could not cancel job {self.job_id}: {err}")
            return EXIT_INTERRUPTED
        finally:
            signal.signal(signal.SIGINT, previous)

    def fetch_artifacts(self, job: dict, dest: Path) -> None:
        archive = dest / f".dispatch-artifacts-{uuid.uuid4().hex}.zip"
        try:
            dest.mkdir(parents=True, exist_ok=True)
            with _create_private(archive) as out, self._servers.in_use() as server:
                written = _Sha256Writer(out)
                _request("GET", server + job["artifacts"]["url"], headers=self._auth, into=written,
                         timeout=4 * HTTP_TIMEOUT_SECONDS)
            if written.hexdigest() != job["artifacts"]["sha256"]:
                raise ClientError("the artifacts zip arrived damaged (its sha256 does not match): not unpacked")
            files, notes = extract_artifacts(archive, dest)
            for note in notes:
                self.say(note)
            self.say(f"{files} artifact file(s) in {dest}")
        except (AgentError, OSError) as err:
            self.say(f"could not bring the artifacts back: {err}")
        finally:
            archive.unlink(missing_ok=True)

    def exit_code(self, job: dict) -> int:
        """The job's exit code as this process's: 0 to 255 as it is; none (lost, cancelled) or
        outside that range: 1, told on stderr."""
        code, status = job.get("exitCode"), job.get("status")
        if job.get("error"):
            self.say(f"job {self.job_id} {status}: {job['error']}")
        if isinstance(code, int) and 0 <= code <= 255:
            return code
        if status == "completed":
            return 0
        if isinstance(code, int):
            self.say(f"the job's exit code {code} does not fit an exit status: exiting with 1")
        return EXIT_CLIENT_ERROR


class _FileBody(_Multipart):
    """A request body that is one file as it is (PUT /api/blobs/{sha256})."""

    def __init__(self, path: Path, size: int):
        super().__init__()
        self._path, self._size = path, size

    @property
    def content_type(self) -> str:
        return "application/octet-stream"

    def length(self) -> int:
        return self._size

    def chunks(self):
        return _file_chunks(self._path, self._size)


class _BlobBatch(_Multipart):
    """The body of POST /api/blobs/batch: for each blob a line `<sha256> <size>`, then its content;
    small files are gathered into pieces of about a megabyte (fewer writes for many small files)."""

    def __init__(self) -> None:
        super().__init__()
        self._blobs = []

    def add(self, sha256: str, path: Path, size: int) -> None:
        self._blobs.append((sha256, path, size))

    @property
    def content_type(self) -> str:
        return "application/octet-stream"

    def length(self) -> int:
        return sum(len(f"{sha256} {size}\n") + size for sha256, _, size in self._blobs)

    def chunks(self):
        piece = bytearray()
        for sha256, path, size in self._blobs:
            piece += f"{sha256} {size}\n".encode()
            for chunk in _file_chunks(path, size):
                piece += chunk
                if len(piece) >= TRANSFER_CHUNK_BYTES:
                    yield bytes(piece)
                    piece.clear()
        if piece:
            yield bytes(piece)


class _Shown:
    """Output events shown on stdout and stderr in order per stream, joined by offsets: after a
    reconnect what was shown is not shown again; a new attempt (its worker was lost) starts afresh."""

    def __init__(self, stdout, stderr, say: Callable[[str], None]):
        self._streams = {"stdout": stdout, "stderr": stderr}
        self._say = say
        self._attempt, self._known = 0, {"stdout": 0, "stderr": 0}

    def event(self, name: str, event: dict) -> None:
        attempt = event.get("attempt") or self._attempt
        if name == "job.output":
            self._output(attempt, event)
        elif name == "job.started" and attempt > 1:
            self._say(f"attempt {attempt} started on {event.get('workerId')}")
        elif name == "job.queued" and event.get("error"):
            self._say(f"back in the queue: {event['error']}")
        elif name in ("job.suspended", "job.resumed"):
            self._say(f"{name[4:]} on {event.get('workerId')}")

    def _output(self, attempt: int, event: dict) -> None:
        if attempt < self._attempt:
            return
        if attempt > self._attempt:
            self._attempt, self._known = attempt, {"stdout": 0, "stderr": 0}
        stream = "stderr" if event.get("stream") == "stderr" else "stdout"
        data, offset = str(event.get("data", "")), event.get("offset", 0)
        known, end = self._known[stream], offset + len(data)
        if end <= known:
            return
        if offset < known:
            data = data[known - offset:]
        self._known[stream] = end
        out = self._streams[stream]
        target = getattr(out, "buffer", None)
        if target is not None:
            out.flush()
            target.write(data.encode("utf-8", "replace"))
            target.flush()
        else:
            out.write(data)
            out.flush()


def _sse_events(response):
    """(event name, data) of each server-sent event of a response, as they arrive."""
    name, data = None, []
    while True:
        line = response.readline()
        if not line:
            return
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if name and data:
                try:
                    yield name, json.loads("\n".join(data))
                except ValueError:
                    pass
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


class _Progress:
    """A progress bar on stderr while files are sent, when stderr is a terminal."""

    def __init__(self, stderr):
        self._stderr = stderr
        self._on = hasattr(stderr, "isatty") and stderr.isatty()
        self._files = self._bytes = self._done_files = self._done_bytes = self._batch = 0
        self._started = self._drawn = 0.0
        self._visible = False

    def start(self, files: int, size: int) -> None:
        self._files, self._bytes, self._started = files, size, time.monotonic()

    def sent(self, size: int) -> None:
        self._batch += size
        now = time.monotonic()
        if self._on and now - self._drawn >= 0.1:
            self._drawn = now
            done = min(self._done_bytes + self._batch, self._bytes)
            fraction = done / self._bytes if self._bytes else 1.0
            rate = done / 1024**2 / max(now - self._started, 1e-3)
            bar = "#" * int(fraction * 30)
            self._stderr.write(f"\rdispatch: sending [{bar:<30}] {fraction:4.0%} {done / 1024**2:.1f}/"
                               f"{self._bytes / 1024**2:.1f} MB, {self._done_files}/{self._files} files, "
                               f"{rate:.0f} MB/s ")
            self._stderr.flush()
            self._visible = True

    def files_done(self, count: int) -> None:
        self._done_files += count
        self._done_bytes += self._batch
        self._batch = 0

    def rewind(self) -> None:
        self._batch = 0  # that batch goes again

    def clear(self) -> None:
        if self._visible:
            self._stderr.write("\r\033[K")
            self._stderr.flush()
            self._visible = False


class _HashCache:
    """The SHA-256 of the files of one folder, kept between runs (in the user's cache folder) by
    path, size, modification time and inode, as git's index keeps them: a file that looks the same
    is not read again. As in git, a file changed in the same second the cache was written may look
    the same, so such a file is always hashed."""

    RACY_NS = 2 * 10**9

    def __init__(self, folder: Path, environ: dict):
        base = environ.get("XDG_CACHE_HOME") or environ.get("LOCALAPPDATA") or os.path.join(
            os.path.expanduser("~"), ".cache")
        name = hashlib.sha256(os.fsencode(str(folder))).hexdigest()[:24]
        self.path = Path(base) / "dispatch" / f"hashes-{name}.json"
        self._seen = {}
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            self._written, self._known = int(saved["written"]), dict(saved["files"])
            self._sent = {server: set(hashes) for server, hashes in dict(saved.get("sent", {})).items()}
        except (OSError, ValueError, KeyError, TypeError):
            self._written, self._known, self._sent = 0, {}, {}

    def sent(self, server: str) -> set:
        """The contents the server had from us at the end of the last run: no need to ask about them
        (if one has expired since, the submit says so and everything is asked about again)."""
        return self._sent.get(server, set())

    def note_sent(self, server: str, hashes) -> None:
        self._sent = {server: set(hashes)}  # only this folder's last server is remembered

    def hash(self, rel: str, path, st=None) -> tuple:
        """(sha256, size) of the file at `path` (whose os.stat_result `st` is, if given): remembered
        when it looks unchanged, else read."""
        st = st or os.stat(path)
        look = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self._known.get(rel)
        if (isinstance(known, list) and known[:3] == look and st.st_mtime_ns < self._written - self.RACY_NS
                and isinstance(known[3], str)):
            sha256 = known[3]
        else:
            sha256, size = _hash_file(path)
            if size != st.st_size:  # it changed while being read: not remembered
                return sha256, size
        self._seen[rel] = look + [sha256]
        return sha256, st.st_size

    def save(self) -> None:
        """Keep what this run saw (only that: files gone since are forgotten); never fatal."""
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_private(self.path, json.dumps({"written": time.time_ns(), "files": self._seen, "sent": {
                server: sorted(hashes) for server, hashes in self._sent.items()}}), sync=False)


# === Client: which files go, and what comes back ===


def _hash_file(path: Path) -> tuple:
    """(sha256, size) of a file's content as it is now."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(TRANSFER_CHUNK_BYTES)
            if not chunk:
                return digest.hexdigest(), size
            digest.update(chunk)
            size += len(chunk)


def collect_files(folder: Path) -> tuple:
    """The files `agent.py run` sends from `folder`: (entries, notes), each entry (path relative to
    the folder with '/', the file's path, its os.stat_result). Inside a git work tree the files git
    lists (tracked, and untracked ones not ignored: `git ls-files -co --exclude-standard`),
    otherwise everything; never anything in a .git folder; never what .dispatchignore's patterns
    name. A symbolic link is sent as the file it points to when that is inside the folder, else
    skipped."""
    folder = os.path.realpath(folder)
    listed = _git_files(Path(folder))
    if listed is None:
        listed = _all_files(Path(folder))
    ignore = _ignore_rules(Path(folder) / ".dispatchignore")
    entries, notes = [], []
    for rel in sorted(set(listed)):
        parts = rel.split("/")
        if ".git" in parts or (ignore and _ignored(parts, ignore)):
            continue
        path = os.path.join(folder, *parts)
        try:
            st = os.lstat(path)
        except OSError:  # tracked but deleted
            continue
        if stat.S_ISLNK(st.st_mode):
            target = os.path.realpath(path)
            inside = os.path.relpath(target, folder).replace(os.sep, "/").split("/")
            if os.path.isfile(target) and inside[0] != ".." and ".git" not in inside:
                entries.append((rel, target, os.stat(target)))
            else:
                notes.append(f"skipped {rel}: a symbolic link to {os.readlink(path)}, outside the folder")
        elif stat.S_ISDIR(st.st_mode):  # a git submodule: its files, as they are
            for sub in _all_files(Path(path)):
                sub_st = os.lstat(os.path.join(path, sub))
                if stat.S_ISREG(sub_st.st_mode) and not _ignored(f"{rel}/{sub}".split("/"), ignore):
                    entries.append((f"{rel}/{sub}", os.path.join(path, sub), sub_st))
        elif stat.S_ISREG(st.st_mode):
            entries.append((rel, path, st))
    return entries, notes


def _git_files(folder: Path) -> Optional[list]:
    """What git lists in `folder` (relative to it), or None outside a work tree or without git."""
    def git(*args: str) -> Optional[bytes]:
        try:
            done = subprocess.run(["git", *args], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except OSError:
            return None
        return done.stdout if done.returncode == 0 else None

    inside = git("rev-parse", "--is-inside-work-tree")
    if inside is None or inside.strip() != b"true":
        return None
    listed = git("ls-files", "-co", "--exclude-standard", "-z")
    if listed is None:
        return None
    return [os.fsdecode(name) for name in listed.split(b"\0") if name]


def _all_files(folder: Path) -> list:
    """Every file under `folder` (relative, '/'), never inside .git, never through a linked folder."""
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".git"]
        relative = os.path.relpath(parent, folder).replace(os.sep, "/")
        prefix = "" if relative == "." else relative + "/"
        found += [prefix + name for name in names]
        found += [prefix + d for d in dirs if os.path.islink(os.path.join(parent, d))]  # shown as skipped links
    return found


def _ignore_rules(path: Path) -> list:
    """.dispatchignore: gitignore-like patterns, one a line (# comments; `!` brings a path back; a
    pattern with a / inside is from the folder's top, one without matches a name at any depth; a
    trailing / matches folders only)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rules = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        line = line[1:] if keep else line
        folders_only = line.endswith("/")
        line = line.strip("/")
        anchored = "/" in line
        whole = _glob_regex(line).pattern[:-len("(?:/.*)?")]  # the pattern itself, not what is below it
        rules.append((re.compile(whole, re.S), anchored, folders_only, keep))
    return rules


def _ignored(parts: list, rules: list) -> bool:
    """Whether .dispatchignore's rules leave out the file with these path parts (the last rule that
    matches it, or a folder above it, decides)."""
    ignored = False
    for regex, anchored, folders_only, keep in rules:
        for depth in range(1, len(parts) + 1):
            if folders_only and depth == len(parts):
                continue
            candidate = "/".join(parts[:depth]) if anchored else parts[depth - 1]
            if regex.fullmatch(candidate):
                ignored = not keep
                break
    return ignored


def extract_artifacts(archive: Path, dest: Path) -> tuple:
    """Unpack an artifacts zip into `dest` (created if need be), replacing files of the same name;
    returns (files written, notes). Writes nothing outside `dest`: an entry that could leave it, a
    symbolic link, or a local folder on the way that is a link out of it is skipped with a note;
    nothing is ever written into a .git folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    notes, files, written = [], 0, 0
    with open(archive, "rb") as f:
        _check_zip_directory(f, MAX_ZIP_ENTRIES, MAX_ZIP_DIRECTORY_BYTES)
        with zipfile.ZipFile(f) as zf:
            for info in zf.infolist():
                try:
                    parts = _entry_parts(info)
                except UnsafeArchive as err:
                    notes.append(f"artifacts: skipped: {err}")
                    continue
                if not parts or info.is_dir():
                    continue
                name = "/".join(parts)
                if ".git" in parts:
                    notes.append(f"artifacts: skipped {name}: nothing is written into .git")
                    continue
                target = dest.joinpath(*parts)
                folder = os.path.realpath(target.parent)
                if os.path.commonpath([root, folder]) != root or ".git" in Path(os.path.relpath(folder, root)).parts:
                    notes.append(f"artifacts: skipped {name}: a folder on its way is a link out of {dest} "
                                 "(or into .git)")
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_dir() and not target.is_symlink():
                    notes.append(f"artifacts: skipped {name}: a folder of that name is in the way")
                    continue
                staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
                try:
                    with zf.open(info) as src, open(staging, "xb") as out:
                        while True:
                            chunk = src.read(TRANSFER_CHUNK_BYTES)
                            if not chunk:
                                break
                            written += len(chunk)
                            if written > 4 * MAX_ZIP_BYTES:
                                raise UnsafeArchive(f"the artifacts expand to more than {4 * MAX_ZIP_BYTES} bytes")
                            out.write(chunk)
                    if not _WINDOWS and (info.external_attr >> 16) & 0o111:
                        staging.chmod(staging.stat().st_mode | 0o111)
                    os.replace(staging, target)  # replaces a link of that name, never writes through it
                finally:
                    staging.unlink(missing_ok=True)
                files += 1
    return files, notes


# === main ===


def _restart_without_token() -> None:
    """If the registration token is in this process's environment, start this program again
    without it there, handing it over through a pipe instead; return only if it is not there.

    Any process of the same user reads /proc/<pid>/environ (macOS: `ps -E`), and that keeps a
    process's first environment for life: deleting the variable later would not hide it from a job.
    Not on Windows, where os.exec* starts a new process rather than replacing this one.
    """
    token = os.environ.get(TOKEN_ENV)
    if token is None or _WINDOWS:
        return
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode())  # a token is far smaller than a pipe's buffer: this never blocks
    os.close(write_end)
    os.set_inheritable(read_end, True)
    env = {name: value for name, value in os.environ.items() if name != TOKEN_ENV}
    env[TOKEN_FD_ENV] = str(read_end)
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]  # orig_argv keeps -u, -X ... (3.10+)
    os.execve(sys.executable, argv, env)


def _environ_with_handed_token() -> dict:
    """The environment to read settings from: os.environ, plus the token _restart_without_token()
    handed over. Neither variable stays in os.environ, which jobs inherit."""
    environ = dict(os.environ)
    fd = os.environ.pop(TOKEN_FD_ENV, None)
    if fd is not None:
        with open(int(fd), "rb") as pipe:
            environ[TOKEN_ENV] = pipe.read().decode()
        del environ[TOKEN_FD_ENV]
    # Windows: a job of the same account reads the agent's current environment block (not its first).
    os.environ.pop(TOKEN_ENV, None)
    return environ


def main(argv: Optional[list] = None) -> int:
    """Run the agent from the command line (or, as `agent.py run ...`, the client); the process
    exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return run_client(argv[1:])
    config = parse_config(argv, _environ_with_handed_token())
    logging.basicConfig(
        level=logging.DEBUG if config.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    agent = Agent(config)
    stop_signals = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name)]
    for signum in stop_signals:  # SIGBREAK: Ctrl-Break on Windows
        signal.signal(signum, lambda _signum, _frame: agent.request_stop())
    try:
        agent.run_forever()
    except AgentError as err:  # a mistake in the setup: retrying would not help
        if err is not agent.fatal:  # a Fatal one is logged where it happened
            log.error("%s", err)
        return 2
    finally:
        # Python puts back the default handlers while it exits: a stop signal arriving then would
        # turn a clean exit into death by that signal. Ignored handlers are left alone.
        for signum in stop_signals:
            signal.signal(signum, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    _restart_without_token()
    sys.exit(main())

