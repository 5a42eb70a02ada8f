"""Shared pieces of the bench scripts: the machine banner, real dispatch.py and agent.py
processes on loopback, /proc CPU and memory accounting, percentiles.

Standard library plus aiohttp (already in requirements-dev.txt); Celery, RQ and redis are
imported only by the --peers mode, from peer_tasks.py.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent

ADMIN_EMAIL = "bench@example.com"
ADMIN_PASSWORD = "bench-password"
REGISTRATION_TOKEN = "bench-registration-token"

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- banner -----------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }
    try:
        import aiohttp

        info["aiohttp"] = aiohttp.__version__
    except ImportError:
        pass
    try:
        info["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    try:
        info["memory"] = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    return info


def code_version() -> str:
    """git HEAD (+ 'dirty') and short hashes of the two files measured, so a figure can be tied to code."""
    import hashlib

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "dispatch.py", "agent.py"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "?", ""
    files = ", ".join(f"{name} {hashlib.sha256((ROOT / name).read_bytes()).hexdigest()[:10]}"
                      for name in ("dispatch.py", "agent.py") if (ROOT / name).exists())
    return f"git {head}{' (dispatch.py/agent.py modified)' if dirty else ''}; {files}"


def print_banner(title: str) -> None:
    info = machine_info()
    print(f"== {title}")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    print("code:    " + code_version())
    print(f"date:    {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)


# --- small helpers ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def fmt_range(values, fmt: str = "{:.0f}") -> str:
    """'x' for one value, 'min–max (median m)' for several."""
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    import statistics

    return f"{fmt.format(min(values))}–{fmt.format(max(values))} (median {fmt.format(statistics.median(values))})"


def parse_iso(text: str) -> float:
    """Epoch seconds of dispatch's ISO 8601 UTC timestamps (2026-01-25T10:30:00.123Z)."""
    import datetime as dt

    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- /proc accounting -------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def cpu_seconds(pid: int, *, children: bool = True) -> float:
    """User + system CPU of a process (all its threads), plus its waited-for children's."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[0] is state (stat field 3); utime, stime, cutime, cstime are stat fields 14-17
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLK_TCK


def descendants(pid: int) -> list[int]:
    """Live descendants of pid (children, grandchildren, ...)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_seconds(pids) -> float:
    """CPU of whole process trees: each live process's own time plus what it reaped from its
    children, so a child that lived and died between two samples is counted exactly once."""
    seen = set()
    total = 0.0
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            if p not in seen:
                seen.add(p)
                total += cpu_seconds(p, children=True)
    return total


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, our own processes)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples a process's RSS in a thread; max and the samples, as a cross-check of VmHWM."""

    def __init__(self, pid: int, interval: float = 0.05):
        import threading

        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mb(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else float("nan")


def stop_tree(pids, sig=signal.SIGSTOP) -> None:
    for pid in pids:
        for p in [pid, *descendants(pid)]:
            try:
                os.kill(p, sig)
            except OSError:
                pass


# --- real processes ---------------------------------------------------------------------


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(DISPATCH_ADMIN_EMAIL=ADMIN_EMAIL, DISPATCH_ADMIN_PASSWORD=ADMIN_PASSWORD,
               DISPATCH_REGISTRATION_TOKEN=REGISTRATION_TOKEN, DISPATCH_RATE_LIMIT="0",
               DISPATCH_WORKER_RATE_LIMIT="0", DISPATCH_BCRYPT_ROUNDS="4")
    return env


def _raise_nofile(limit: int = 65536, lower: bool = False) -> None:
    """Raise the soft open-files limit to `limit` (at most the hard limit); with `lower`, also
    lower it to `limit` (a server started as a shell's default 1,024 would be)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = min(limit, hard) if hard != resource.RLIM_INFINITY else limit
        if soft < target or (lower and soft > target):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def open_files(pid: int) -> tuple[int, int, int]:
    """(descriptors open, soft limit, hard limit) of a process; -1 for 'unlimited' or unreadable."""
    try:
        count = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        count = -1
    soft = hard = -1
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                fields = line.split()
                soft, hard = (int(v) if v.isdigit() else -1 for v in fields[3:5])
    except OSError:
        pass
    return count, soft, hard


class DispatchServer:
    """A real ``python dispatch.py`` on 127.0.0.1, its log in the work dir.

    ``durability="full"`` starts it through bench/_dispatch_full.py, which is dispatch.py with
    ``PRAGMA synchronous = FULL`` (for the durability-matched comparison with Redis
    ``appendfsync always``); everything else is the unmodified module. ``script`` runs another
    such wrapper (bench/_dispatch_gc.py: the garbage collector timed).
    """

    def __init__(self, workdir: Path, *, port: int | None = None, env: dict | None = None,
                 durability: str = "normal", python: str = sys.executable, start_nofile: int | None = None,
                 script: Path | None = None):
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**base_env(), **(env or {})}
        self.durability = durability
        self.python = python
        self.start_nofile = start_nofile  # None: soft open-files limit raised to 65536; N: started with N
        self.script = script  # a bench wrapper of the dispatch module instead of dispatch.py
        self.log_path = self.workdir / "dispatch.log"
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def command(self) -> list[str]:
        script = self.script or (ROOT / "dispatch.py" if self.durability == "normal" else BENCH / "_dispatch_full.py")
        return [self.python, str(script), "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.data_dir)]

    def start(self, timeout: float = 20.0) -> "DispatchServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL, preexec_fn=self._limits)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dispatch.py did not start:\n{self.log()[-3000:]}")
            if "add a desktop" in self.log()[offset:]:
                break
            time.sleep(0.02)
        # the banner prints on startup, just before the socket listens: wait for it to answer
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/api/health", timeout=2):
                    return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.02)
        raise RuntimeError("dispatch.py does not answer /api/health")

    def _limits(self) -> None:
        if self.start_nofile is None:
            _raise_nofile()
        else:
            _raise_nofile(self.start_nofile, lower=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def db(self) -> sqlite3.Connection:
        """A read-only connection to the server's database (WAL: safe while it runs)."""
        conn = sqlite3.connect(f"file:{self.data_dir / 'dispatch.db'}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn


class Agents:
    """K real ``python agent.py`` processes, run from a copy of agent.py, each with its own
    --work-dir and --worker-id."""

    def __init__(self, workdir: Path, server_url: str, count: int, *, prefix: str = "bench-agent",
                 env: dict | None = None, python: str = sys.executable, concurrency: int = 1):
        self.workdir = Path(workdir)
        self.server_url = server_url
        self.count = count
        self.prefix = prefix
        self.python = python
        self.concurrency = concurrency
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
        self.env.update(DISPATCH_REGISTRATION_TOKEN=REGISTRATION_TOKEN, **(env or {}))
        self.processes: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def worker_ids(self) -> list[str]:
        return [f"{self.prefix}-{i}" for i in range(self.count)]

    def start(self) -> "Agents":
        code = self.workdir / "agent-code"
        code.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "agent.py", code / "agent.py")
        for worker_id in self.worker_ids():
            work = self.workdir / worker_id
            work.mkdir(parents=True, exist_ok=True)
            with open(self.workdir / f"{worker_id}.log", "ab") as log:
                self.processes.append(subprocess.Popen(
                    [self.python, str(code / "agent.py"), "--server", self.server_url, "--worker-id", worker_id,
                     "--work-dir", str(work), "--concurrency", str(self.concurrency)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, cwd=work))
        return self

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def logs(self) -> str:
        return "\n".join(f"--- {w}\n" + (self.workdir / f"{w}.log").read_text(errors="replace")[-2000:]
                         for w in self.worker_ids() if (self.workdir / f"{w}.log").exists())

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pids)

    def pause(self) -> None:
        stop_tree(self.pids, signal.SIGSTOP)

    def resume(self) -> None:
        stop_tree(self.pids, signal.SIGCONT)

    def stop(self, timeout: float = 15.0) -> None:
        self.resume()
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.send_signal(signal.SIGTERM)  # the second stop: do not wait for running jobs
        deadline = time.monotonic() + timeout
        for p in self.processes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


class Workspace:
    """A temp directory removed at the end unless --keep."""

    def __init__(self, keep: bool = False, prefix: str = "dispatch-bench-"):
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self.keep = keep

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        if self.keep:
            print(f"(kept {self.path})")
        else:
            shutil.rmtree(self.path, ignore_errors=True)


# --- a blocking API helper (set-up steps; the measured paths use aiohttp) ----------------


def api_call(url: str, method: str, path: str, body=None, token: str | None = None, worker: str | None = None,
             timeout: float = 30.0):
    headers = {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if worker:
        headers["x-worker-token"] = worker
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        with err:
            raw = err.read()
            try:
                return err.code, json.loads(raw) if raw else None
            except ValueError:
                return err.code, raw.decode(errors="replace")


def login(url: str) -> str:
    status, body = api_call(url, "POST", "/api/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    if status != 200:
        raise RuntimeError(f"login failed: {status} {body}")
    return body["token"]


def wait_for_workers(url: str, token: str, worker_ids, timeout: float = 30.0) -> None:
    """Until every worker id is registered and online."""
    wanted = set(worker_ids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = api_call(url, "GET", "/api/workers/list?status=online&limit=1000", token=token)
        if status == 200 and wanted <= {w["workerId"] for w in body["workers"]}:
            return
        time.sleep(0.1)
    raise RuntimeError(f"workers {sorted(wanted)} did not come online within {timeout:.0f} s")


class PostgresDatabase:
    """A fresh PostgreSQL database of this run's own on ``server`` (a postgresql:// URL of an
    existing database to connect through), dropped at the end: ``with PostgresDatabase(url) as db``;
    ``db.url`` is what the servers get as DISPATCH_DATABASE_URL."""

    def __init__(self, server: str):
        self.server = server
        self.name = f"dispatch_bench_{os.getpid()}_{int(time.time())}"
        self.url = server.rsplit("/", 1)[0] + "/" + self.name

    def __enter__(self) -> "PostgresDatabase":
        self._run(self.server, f"CREATE DATABASE {self.name}")
        return self

    def __exit__(self, *exc) -> None:
        self._run(self.server, f"DROP DATABASE {self.name} WITH (FORCE)")

    def rows(self, sql: str) -> list[dict]:
        return self._run(self.url, sql)

    @staticmethod
    def _run(url: str, sql: str) -> list[dict]:
        import asyncio
        import concurrent.futures

        import asyncpg

        async def run() -> list[dict]:
            connection = await asyncpg.connect(url)
            try:
                return [dict(row) for row in await connection.fetch(sql)]
            finally:
                await connection.close()

        with concurrent.futures.ThreadPoolExecutor(1) as thread:  # callers may be inside an event loop
            return thread.submit(asyncio.run, run()).result()
