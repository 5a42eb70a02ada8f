#!/usr/bin/env python3
"""dispatch agent: makes this computer a worker of a dispatch server.

Copy this one file onto a desktop with Python 3.9+ (standard library only) and run:

    python agent.py --server http://lanbox:3000 --token <registration token>

The agent registers (its worker token is kept in the work dir and reused after a restart),
long-polls the server for jobs, runs each job's command in a fresh directory holding the job's
input (checked against its sha256; a zip is extracted safely), streams the output, kills the
whole process tree past the job's timeout (counted from the command's start), and reports the
exit code. A result waits on disk until the server takes it. Every heartbeat is a lease: it
lists the jobs this run holds, so the server requeues one whose claim never reached the agent.
First Ctrl-C or SIGTERM: take no new jobs, let running ones finish. Second: kill them and
report them as failed. With --run-as USER (Unix, the agent started as root) every job runs as
that user, and the agent's own files stay root's.

Sections (`grep -n '^# ===' agent.py`): constants, errors, config, HTTP, platform (ctypes),
inputs, process trees, run_job, server link, spool, Agent, main.
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
import os
import platform
import queue
import random
import re
import shutil
import signal
import socket
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
    "JobLost",
    "JobResult",
    "JobSetupError",
    "Refused",
    "ServerUnavailable",
    "UnsafeArchive",
    "extract_zip",
    "main",
    "parse_config",
    "run_job",
]

log = logging.getLogger("dispatch.agent")

# === Constants ===

_WINDOWS = os.name == "nt"

POLL_WAIT_SECONDS = 30  # how long the server may hold a get-job long-poll
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

PIPE_GRACE_SECONDS = 1.5  # after the command exits, how long a background child may keep its pipes open
KILL_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL
LOST_KILL_GRACE_SECONDS = 2.0  # the same for a cancelled job: its tree must be gone within 5 s
KILL_ROUNDS = 10  # SIGKILL rounds, for processes forked while the tree was being killed
STOP_GRACE_SECONDS = KILL_GRACE_SECONDS + 2 * HTTP_TIMEOUT_SECONDS  # second stop: kill, spool, send

MAX_ZIP_ENTRIES = 100_000
MAX_ZIP_DIRECTORY_BYTES = 64 * 1024**2  # the central directory, which zipfile reads into memory whole
MAX_ZIP_BYTES = 4 * 1024**3  # bytes actually written, not what the zip headers claim
CACHE_MAX_BYTES = 2 * 1024**3
DOWNLOAD_ATTEMPTS = 4
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

    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


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


# === Config: flags and environment ===

class _Setting(NamedTuple):
    """One agent setting: --help and the README table come from these."""

    flag: str
    metavar: str
    env: str
    default: Optional[str]
    help: str


_SETTINGS = (
    _Setting("--server", "URL", "DISPATCH_SERVER", None, "the dispatch server, e.g. http://lanbox:3000 (required)"),
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
    _Setting(
        "--run-as",
        "USER",
        "DISPATCH_RUN_AS",
        None,
        "Unix, with the agent started as root: run every job as this unprivileged user, in a directory "
        "of its own; the worker token, the cache and unsent results stay readable by root only",
    ),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the agent is told at start."""

    server: str
    token: str
    worker_id: str
    work_dir: Path
    tags: tuple = ()
    concurrency: int = 1
    cpus: int = 1  # what it offers the farm: the server hands it only jobs that fit what is free
    memory_mb: Optional[int] = None  # None: the platform does not say how much memory there is
    gpus: int = 0
    run_as: Optional[str] = None  # the user every job runs as (the agent runs as root)
    verbose: bool = False

    @property
    def offers(self) -> dict:
        """What this computer offers the farm, as register and heartbeat send it."""
        return {"cpus": self.cpus, "memoryMb": self.memory_mb, "gpus": self.gpus}


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


_SETTING_TYPES = {"--concurrency": _at_least(1), "--cpus": _at_least(1), "--memory-mb": _at_least(0),
                  "--gpus": _at_least(0)}


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
        parser.add_argument(setting.flag, metavar=setting.metavar, default=default, help=f"{help_text} [{setting.env}]",
                            type=_SETTING_TYPES.get(setting.flag, str))
    parser.add_argument("--verbose", action="store_true", help="log every request and step")
    parser.add_argument("--version", action="version", version=f"dispatch agent {__version__}")
    args = parser.parse_args(argv)
    if not args.server or not re.match(r"https?://[^/]", args.server):
        parser.error("--server (or DISPATCH_SERVER) must be the server's URL, e.g. http://lanbox:3000")
    if not args.token:
        parser.error("--token (or DISPATCH_REGISTRATION_TOKEN) is required: the server prints it at start")
    if args.run_as:
        try:
            _JobUser.lookup(args.run_as)
        except AgentError as err:
            parser.error(str(err))
    return Config(
        server=args.server.rstrip("/"),
        token=args.token,
        worker_id=args.worker_id or socket.gethostname(),
        work_dir=Path(args.work_dir).expanduser(),
        tags=tuple(tag.strip() for tag in args.tags.split(",") if tag.strip()),
        concurrency=args.concurrency,
        cpus=args.cpus or os.cpu_count() or 1,
        memory_mb=args.memory_mb if args.memory_mb is not None else _default_memory_offer_mb(),
        gpus=args.gpus,
        run_as=args.run_as or None,
        verbose=args.verbose,
    )


# === HTTP: kept-alive connections, errors, backoff ===


_connections = threading.local()  # each thread keeps one connection per server: no handshake per request


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
            if reused and resp is None:
                continue  # the server closed a kept-alive connection before reading this request: once more
            raise ServerUnavailable(f"{method} {parts.path} failed: {err}") from None
        except (OSError, http.client.HTTPException, ValueError) as err:
            # Refused connections, timeouts, a truncated or non-JSON answer: all "try later".
            _forget_connection(parts.scheme, parts.netloc)
            raise ServerUnavailable(f"{method} {parts.path} failed: {err}") from None
        if resp.status == 429 or resp.status >= 500:
            raise ServerUnavailable(f"HTTP {resp.status}: {message}", retry_after)
        raise Refused(resp.status, message)
    raise ServerUnavailable(f"{method} {parts.path} failed: connection closed twice")


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


# === Platform: Windows Job Objects, memory size, private files, the work-dir lock, the job user ===


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
    return k32


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


# === Inputs: download, verify, cache, extract safely ===


def _entry_parts(info: zipfile.ZipInfo) -> list:
    """The path parts of a zip entry; UnsafeArchive for anything that could leave the job directory."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeArchive(f"entry {name!r} is a symbolic link")
    if "\\" in name:
        raise UnsafeArchive(f"entry {name!r} contains a backslash")
    if name.startswith("/"):
        raise UnsafeArchive(f"entry {name!r} is an absolute path")
    if re.match(r"[A-Za-z]:", name):
        raise UnsafeArchive(f"entry {name!r} starts with a drive letter")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"entry {name!r} climbs out with '..'")
    if _WINDOWS and any(":" in part for part in parts):  # an NTFS alternate data stream
        raise UnsafeArchive(f"entry {name!r} contains ':'")
    return parts


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
    """The job's working directory: `relative` inside `root`, which it may not leave."""
    base = root.resolve()
    if not relative:
        return base
    candidate = (base / relative).resolve()
    if candidate != base and base not in candidate.parents:
        raise JobSetupError(f"workingDirectory {relative!r} points outside the job's files")
    if not candidate.is_dir():
        raise JobSetupError(f"workingDirectory {relative!r} is not a directory in the job's files")
    return candidate


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
                finally:
                    tmp.unlink(missing_ok=True)
                self._evict(keep=key)
            yield path

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _evict(self, keep: str) -> None:
        entries = []
        for path in self._dir.glob("*.bin"):
            with contextlib.suppress(OSError):
                entries.append((path.stat().st_mtime, path.stat().st_size, path))
        total = sum(size for _, size, _ in entries)
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


# === Process trees: find and kill everything a job started ===


def _marked_pids(prefix: str) -> set:
    """Pids of live processes whose environment has MARKER_ENV set to a value starting with `prefix`.

    The marker is inherited by every descendant, including those that left the process group with
    setsid, so it finds a job's whole tree (the way Jenkins' ProcessTreeKiller does). Linux reads
    /proc, macOS asks `ps -E` (best effort); elsewhere only the process group is used. Windows jobs
    live in Job Objects instead.
    """
    needle = f"{MARKER_ENV}={prefix}"
    pids = set()
    if sys.platform.startswith("linux"):
        needle_bytes = needle.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read()
            except OSError:  # gone, or not ours to read
                continue
            # A zombie's environ reads empty, so only live processes are found.
            if any(var.startswith(needle_bytes) for var in environ.split(b"\0")):
                pids.add(int(entry))
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
    pids = _marked_pids(prefix)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


class _ProcessTree:
    """A job's command and every process it started, found again even after they left its group."""

    def __init__(self, popen: subprocess.Popen, marker: str):
        self._popen = popen
        self._marker = marker
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
        if self._popen.poll() is not None and not self._group_alive() and not _marked_pids(self._marker):
            return  # it ended by itself and left nothing behind: no signal, no wait
        self._signal(signal.SIGTERM)
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

    def _signal(self, sig: int) -> None:
        for pid in _marked_pids(self._marker):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        # The command leads its own group (start_new_session); the group outlives it while members
        # remain, and the kernel does not hand its number to a new process meanwhile.
        with contextlib.suppress(OSError):
            os.killpg(self._popen.pid, sig)


# === run_job: one command, its output, its timeout ===


@dataclasses.dataclass(frozen=True)
class JobResult:
    """How a job ended. stdout/stderr hold only the output not yet streamed to the server."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    error: Optional[str] = None
    duration: Optional[float] = None  # seconds the command ran; None if it never started


def _trim(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit // 2
    dropped = len(text) - limit
    return f"{text[:head]}\n[dispatch-agent: {dropped} characters dropped]\n{text[-(limit - head):]}"


class _Output:
    """One job's stdout and stderr on their way to the server.

    Two threads read the pipes (binary-safe, UTF-8 decoded incrementally so a character split
    across reads survives) and queue what they read, then an end-of-file mark; the job's thread
    batches it and sends it in order, at most OUTPUT_FLUSH_SECONDS late. wake() lets the job's
    thread notice the command's exit at once rather than at its next poll. Memory stays bounded: while the server is slow or down, output
    piles up only to OUTPUT_PENDING_CHARS, then the readers wait and so does the job.
    """

    def __init__(self, send: Callable, stdout, stderr):
        self._send = send
        self._queue = queue.Queue(OUTPUT_QUEUE_ITEMS)
        self._pending = {stream: [] for stream in STREAMS}
        self._held = 0
        self._first_at = None  # when the oldest unsent output was read
        self._last_contact = time.monotonic()  # when the server last heard about this job
        self._ends_line = {stream: True for stream in STREAMS}
        self._retry_at = 0.0
        self._backoff = _Backoff()
        self._closed = threading.Event()
        self._open = set(STREAMS)  # streams whose end-of-file mark has not been taken yet
        self._readers = [
            threading.Thread(target=self._read, args=(stream, pipe), daemon=True)
            for stream, pipe in zip(STREAMS, (stdout, stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: str, pipe) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with pipe:
            while not self._closed.is_set():
                try:
                    chunk = pipe.read(OUTPUT_READ_BYTES)  # a raw pipe: whatever is there, b"" at EOF
                except OSError:
                    chunk = b""
                text = decoder.decode(chunk, final=not chunk)
                if text:
                    self._put((stream, text))
                if not chunk:
                    self._put((stream, None))  # end of file
                    return

    def _put(self, item) -> None:
        """Queue an item, waiting while the queue is full (so the job waits) unless closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=STEP_SECONDS)
                return
            except queue.Full:
                pass

    def wake(self) -> None:
        """Make a waiting pump() return now (the command has exited)."""
        with contextlib.suppress(queue.Full):  # a full queue wakes it anyway
            self._queue.put_nowait(None)

    def wait_eof(self, seconds: float) -> None:
        """Pump until both pipes are at end of file, or `seconds` have passed."""
        deadline = time.monotonic() + seconds
        while self._open and (left := deadline - time.monotonic()) > 0:
            self.pump(min(STEP_SECONDS, left))
        self.pump(0)

    def pump(self, wait: float) -> None:
        """Take what the readers have (waiting up to `wait` seconds for it) and send due batches."""
        if self._held < OUTPUT_PENDING_CHARS:
            try:
                self._take(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
                while self._held < OUTPUT_BATCH_CHARS:
                    self._take(self._queue.get_nowait())
            except queue.Empty:
                pass
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

    def note(self, text: str) -> None:
        """Add a line of the agent's own to stderr."""
        self._add("stderr", ("" if self._ends_line["stderr"] else "\n") + text + "\n")

    def finish(self) -> tuple:
        """Stop reading, send what the server takes now, and return the rest (bounded) per stream."""
        self.close()
        with contextlib.suppress(queue.Empty):
            while True:
                self._take(self._queue.get_nowait())
        if self._held and time.monotonic() >= self._retry_at:
            self._flush()
        return tuple(_trim("".join(self._pending[stream]), RESULT_OUTPUT_CHARS) for stream in STREAMS)

    def close(self) -> None:
        """Let the reader threads end even if a pipe never reaches end of file."""
        self._closed.set()

    def _take(self, item) -> None:
        if item is None:  # a wake-up
            return
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
    return subprocess.Popen(
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


def _exit_code(returncode: int) -> int:
    if returncode < 0:  # Popen reports death by signal N as -N; a shell would say 128 + N
        return 128 - returncode
    if returncode >= 2**31:  # Windows: an unsigned DWORD, which cmd shows signed (e.g. -1073741819)
        return returncode - 2**32
    return returncode


def run_job(command: str, cwd: Path, *, env: dict, marker: str, timeout: float, send_output, halt,
            user: Optional[_JobUser] = None) -> JobResult:
    """Run `command` in `cwd` (as `user`, if given), stream its output with send_output(stream, text),
    and report how it ended.

    Returns once the command has exited (or was killed: past `timeout` with exit code 124, when
    the `halt` event is set with 143) and no process of its tree is left; the command's own exit
    code otherwise, even if a background child kept its pipes open. `env[MARKER_ENV]` must be
    `marker`. JobLost from send_output kills the tree and propagates.
    """
    started = time.monotonic()
    proc = _spawn(command, cwd, env, user)
    tree = _ProcessTree(proc, marker)
    output = _Output(send_output, proc.stdout, proc.stderr)
    threading.Thread(target=lambda: (proc.wait(), output.wake()), daemon=True).start()
    exit_code, error = None, None
    grace = KILL_GRACE_SECONDS
    try:
        while proc.poll() is None:
            if time.monotonic() - started > timeout:
                exit_code, error = EXIT_TIMEOUT, f"timed out after {timeout:g} s; the process tree was killed"
                break
            if halt.is_set():
                exit_code, error = EXIT_STOPPED, "the agent was stopped; the process tree was killed"
                break
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
    output.wait_eof(PIPE_GRACE_SECONDS)
    if error:
        output.note(f"dispatch-agent: {error}")
    stdout, stderr = output.finish()
    return JobResult(exit_code, stdout, stderr, error, time.monotonic() - started)


# === Server link: worker token, registration, heartbeats ===


class _ServerLink:
    """This agent's standing with the server: the worker token (saved in the work dir, reused by
    the next run), registration, requests made with the token, and heartbeats.

    Every heartbeat sends what `heartbeat_body()` returns at that moment.
    """

    def __init__(self, config: Config, token_path: Path, heartbeat_body: Callable[[], dict]):
        self.config = config
        self._token_path = token_path
        self._heartbeat_body = heartbeat_body
        self._token = None
        self._register_lock = threading.Lock()  # one registration at a time; guards replacing the token
        self._announce_lock = threading.Lock()
        self._announced = False  # a heartbeat of this run went through

    @property
    def token(self) -> Optional[str]:
        """The worker token, or None while not registered."""
        return self._token

    def load_token(self) -> None:
        """Take up the token an earlier run saved for this server and worker id, if there is one."""
        try:
            saved = json.loads(self._token_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if (isinstance(saved, dict) and saved.get("server") == self.config.server
                and saved.get("workerId") == self.config.worker_id):
            log.info("using the saved worker token for %s", self.config.worker_id)
            self._token = saved.get("token")

    def request(self, method: str, path: str, body=None, timeout=HTTP_TIMEOUT_SECONDS) -> tuple:
        """_request() to the server with the worker token; a refused token is forgotten, so the
        agent registers again. ServerUnavailable while not registered."""
        token = self._token
        if token is None:
            raise ServerUnavailable("not registered yet")
        try:
            return _request(method, self.config.server + path, headers={"x-worker-token": token}, body=body,
                            timeout=timeout)
        except Refused as err:
            if err.status == 401:
                with self._register_lock:
                    if self._token == token:  # not already replaced by another thread
                        self._token = None
                        log.warning("the server refused the worker token; registering again")
            raise

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
                _, data = _request("POST", cfg.server + "/api/workers/register", body=body,
                                   headers={"Authorization": f"Bearer {cfg.token}"})
            except Refused as err:
                if err.status == 409:
                    raise AgentError(
                        f"worker id {cfg.worker_id!r} is already registered, and {self._token_path} holds no "
                        f"valid token for it: an admin can delete the worker (DELETE /api/workers/"
                        f"{cfg.worker_id}), or start this agent with another --worker-id"
                    ) from None
                if err.status == 401:
                    raise AgentError("the server refused the registration token (--token)") from None
                raise
            token = data.get("token") if isinstance(data, dict) else None
            if not isinstance(token, str) or not token:
                raise ServerUnavailable("the register answer has no token")
            _write_private(
                self._token_path, json.dumps({"server": cfg.server, "workerId": cfg.worker_id, "token": token})
            )
            self._token = token
            log.info("registered as worker %s on %s", cfg.worker_id, cfg.server)

    def heartbeat(self) -> Optional[dict]:
        """Send one heartbeat, registering first if needed; the server's answer."""
        self.ensure_registered()
        _, data = self.request("POST", "/api/workers/heartbeat", self._heartbeat_body())
        self._announced = True
        return data

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
        while not stopped.wait(delay):
            try:
                data = self.heartbeat()  # registers too: with every slot busy, no slot would
            except AgentError as err:
                if not backoff.failures:
                    log.warning("heartbeat failed: %s", err)
                delay = min(interval, backoff.next(getattr(err, "retry_after", None)))
                continue
            if backoff.failures:
                log.info("heartbeats go through again")
                backoff.reset()
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                interval = min(max(float(data["nextCheckIn"]) / 1000, 1.0), 300.0)
            delay = interval


# === Spool: results waiting for the server ===


class _ResultSpool:
    """Results of finished jobs, kept on disk until the server takes them: they survive a server
    outage and an agent restart. A delivered (or refused) result is deleted with its job directory.

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
                    try:
                        self._submit(body)
                        log.info("result of job %s delivered", body.get("jobId"))
                    except Refused as err:
                        if err.status == 401:
                            raise
                        log.warning("the server refused the result of job %s (%s); dropped it", body.get("jobId"), err)
                path.unlink(missing_ok=True)
                shutil.rmtree(self._jobs_dir / path.stem, ignore_errors=True)
                with self._lock:
                    self._unsent.pop(path.stem, None)
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

    The lease: each run has an id, and numbers its get-job requests. Every heartbeat lists the
    jobs this run holds and `polled`, the number up to which every get-job answer is handled, so
    the server can take back a job this run does not hold without mistaking one whose answer is
    still on its way.
    """

    def __init__(self, config: Config):
        self.config = config
        self._job_user = _JobUser.lookup(config.run_as) if config.run_as else None
        self._work_dir = config.work_dir
        self._jobs_dir = config.work_dir / "jobs"
        self._cache = _DownloadCache(config.work_dir / "cache")
        self._link = _ServerLink(config, config.work_dir / "worker.json", self._heartbeat_body)
        self._spool = _ResultSpool(config.work_dir / "results", self._jobs_dir,
                                   functools.partial(self._link.request, "POST", "/api/jobs/submit-result"))
        # The marker ties job processes to this work dir, so a restarted agent finds its leftovers.
        self._marker_prefix = hashlib.sha256(str(config.work_dir.resolve()).encode()).hexdigest()[:16] + "/"
        self._run_id = uuid.uuid4().hex
        self._lock = threading.Lock()  # guards the fields below
        self._running = {}  # job key -> job id, from its get-job answer until its result is spooled
        self._polls_sent = 0  # get-job requests of this run so far; each carries its number
        self._polls_open = set()  # numbers of get-job requests whose answer is not fully handled yet
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

    # --- start and stop ---------------------------------------------------

    def prepare(self) -> None:
        """Set up the work dir: lock it, kill what an earlier run left, load the saved worker token
        and the results still waiting for the server.

        Only the agent's own account may read the work dir. With --run-as, the job user may pass
        through it and through the jobs dir (mode 0711) to its job's directory, but list neither;
        AgentError if a directory above the work dir stops it.
        """
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
        cfg = self.config
        log.info(
            "dispatch agent %s: worker %s, server %s, %d slot(s), tags %s, work dir %s%s",
            __version__, cfg.worker_id, cfg.server, cfg.concurrency, ",".join(cfg.tags) or "-", cfg.work_dir,
            f", jobs run as {cfg.run_as}" if cfg.run_as else "",
        )
        threading.Thread(target=self._link.heartbeat_loop, args=(self._stopped,), name="heartbeat",
                         daemon=True).start()
        for n in range(cfg.concurrency):
            # Daemon threads: a slot parked in a long-poll must not keep a stopping agent alive.
            threading.Thread(target=self._slot_loop, name=f"slot-{n + 1}", daemon=True).start()
        try:
            while not self._stop_requests:
                time.sleep(STOP_CHECK_SECONDS)
            self._draining.set()
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
        except AgentError as err:
            log.warning("%d result(s) stay in %s and are sent at the next start (%s)",
                        len(self._spool), self._spool.directory, err)
        finally:
            self._stopped.set()
            self.close()
        log.info("stopped")

    def _busy(self) -> int:
        with self._lock:
            return len(self._running)

    # --- the lease --------------------------------------------------------

    def heartbeat(self) -> Optional[dict]:
        """Send one heartbeat now, registering first if needed; the server's answer.

        The heartbeat thread does this every nextCheckIn; a test can call it between steps.
        """
        return self._link.heartbeat()

    def _heartbeat_body(self) -> dict:
        with self._lock:
            running = list(self._running.values())
            # Read under the same lock as _running: a job leaves _running only once it is spooled.
            held = set(running) | self._spool.job_ids()
            polled = min(self._polls_open) - 1 if self._polls_open else self._polls_sent
            return {
                "workerId": self.config.worker_id,
                "status": "busy" if running else "idle",
                "currentJobId": running[0] if running else None,
                "jobsCompleted": self._jobs_completed,
                "runningJobs": sorted(held),
                "run": self._run_id,
                "polled": polled,
                **self.config.offers,  # a saved token skips registering: flags changed since reach the server here
            }

    def _claim_job(self) -> Optional[_Job]:
        """Ask the server for a job (long-poll); a job it gives is in _running before the request
        counts as handled, so no heartbeat says "all answered" without listing it."""
        with self._lock:
            self._polls_sent += 1
            poll = self._polls_sent
            self._polls_open.add(poll)
        job = None
        try:
            status, data = self._link.request(
                "GET", f"/api/jobs/get-job?wait={POLL_WAIT_SECONDS}&run={self._run_id}&poll={poll}",
                timeout=POLL_WAIT_SECONDS + HTTP_TIMEOUT_SECONDS,
            )
            if status != 204 and isinstance(data, dict) and data.get("job"):
                job = _Job.from_api(data["job"])
        finally:
            with self._lock:
                if job is not None:
                    self._running[job.key] = job.job_id
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
        results, then ask for a job (long-poll) and run it to the end.

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
            self._link.ensure_registered()
            self._link.announce()
            self._spool.deliver()
            asked = time.monotonic()
            job = self._claim_job()
        except AgentError as err:
            with self._lock:
                self._retry_at = max(self._retry_at, now + self._backoff.next(getattr(err, "retry_after", None)))
                delay = self._retry_at - now
            log.warning("%s; retrying in %.1f s", err, delay)
            return delay
        with self._lock:
            self._backoff.reset()
        if job is None:
            return max(0.0, POLL_FLOOR_SECONDS - (time.monotonic() - asked))
        self._run(job)
        return 0.0

    def _run(self, job: _Job) -> None:
        """Run a job the server gave us (listed in _running), then spool its result and try to send it."""
        log.info("job %s started (attempt %d): %r", job.job_id, job.attempt, job.command[:200])
        try:
            try:
                result = self._execute(job)
            except JobLost as err:
                log.warning("job %s is no longer ours (%s): killed it, no result sent", job.job_id, err)
                shutil.rmtree(self._jobs_dir / job.key, ignore_errors=True)
                return
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
            self._spool.add(job.key, body)  # on disk first: it survives a server outage and a restart
            with self._lock:
                self._jobs_completed += 1
            try:
                self._spool.deliver()
            except AgentError as err:
                log.warning("result of job %s kept on disk, will retry: %s", job.job_id, err)
        finally:
            with self._lock:
                del self._running[job.key]

    def _execute(self, job: _Job) -> JobResult:
        job_dir = self._jobs_dir / job.key
        user = self._job_user
        shutil.rmtree(job_dir, ignore_errors=True)
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
        env.update(DISPATCH_JOB_ID=job.job_id, DISPATCH_WORKER_ID=self.config.worker_id, DISPATCH_CPUS=str(job.cpus),
                   **{MARKER_ENV: marker})
        if user is not None:
            env.update(user.environ(job_dir.resolve()))
        started = time.monotonic()
        try:
            return run_job(
                job.command,
                cwd,
                env=env,
                marker=marker,
                timeout=job.timeout,
                send_output=functools.partial(self._send_output, job, started),
                halt=self._halt,
                user=user,
            )
        except OSError as err:  # the shell itself could not start
            return _setup_failure(f"could not start the command: {err}")
        finally:
            if user is not None:
                user.take_back(job_dir)  # the next job, run as the same user, cannot read this one's files

    def _fetch_input(self, job: _Job, job_dir: Path) -> None:
        if not job.file_url:
            return
        url = urllib.parse.urljoin(self.config.server + "/", job.file_url)
        # The worker token goes only to the dispatch server itself, never to another host.
        token = (self._link.token or "") if _origin(url) == _origin(self.config.server) else None
        download = functools.partial(_download, url, token=token, sha256=job.sha256, halt=self._halt)
        with self._cache.fetch(job.file_id, download) as path:
            _place_input(path, _input_name(url), job_dir)

    def _send_output(self, job: _Job, started: float, stream: str, text: str) -> None:
        body = {"jobId": job.job_id, "data": text, "type": stream, "attempt": job.attempt,
                "runningFor": round(time.monotonic() - started, 3)}
        try:
            self._link.request("POST", "/api/jobs/stream-output", body)
        except Refused as err:
            if err.status == 409:
                raise JobLost(err.message) from None
            if err.status == 401:
                raise ServerUnavailable("the worker token was refused") from None
            raise


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
    """Run the agent from the command line; the process exit status."""
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
    except AgentError as err:
        log.error("%s", err)
        return 1
    finally:
        # Python puts back the default handlers while it exits: a stop signal arriving then would
        # turn a clean exit into death by that signal. Ignored handlers are left alone.
        for signum in stop_signals:
            signal.signal(signum, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    _restart_without_token()
    sys.exit(main())

