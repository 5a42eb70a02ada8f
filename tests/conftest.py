"""Shared fixtures: a real dispatch app on a real SQLite file in a temp dir, and a small API helper."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import re
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
import uuid
import zipfile
from pathlib import Path

import aiohttp
import asyncpg
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# pytest rewrites each test module's asserts, ~4 s for all of them, and caches the result as
# bytecode; PYTHONDONTWRITEBYTECODE (set on some machines) would make every run pay it again.
sys.dont_write_bytecode = False

import dispatch  # noqa: E402

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin-password"
REGISTRATION_TOKEN = "registration-token-for-tests"
FINISHED = ("completed", "failed", "cancelled")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")  # the API's one timestamp format


def make_zip(files: dict[str, str | bytes]) -> bytes:
    """A zip archive in memory from {name: content}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def old_database(path: Path, commit: str) -> sqlite3.Connection:
    """A database made with the schema.sql of an older commit (for the migration tests); the
    caller adds rows and closes it."""
    old_schema = subprocess.run(["git", "show", f"{commit}:schema.sql"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
    db = sqlite3.connect(path)
    db.executescript(old_schema)
    return db


# The API tests run on both engines. The PostgreSQL variants need a server: this machine's, or the
# one DISPATCH_TEST_POSTGRES names; each test session makes its own database and drops it at the end.
POSTGRES_SERVER = os.environ.get("DISPATCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
ENGINES = ["sqlite", pytest.param("postgresql", marks=[pytest.mark.slow, pytest.mark.postgresql])]


def _postgres(url: str, *statements: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(url, timeout=5)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def _postgres_problem() -> str | None:
    try:
        _postgres(POSTGRES_SERVER, "SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any reason is a reason to skip, and it is said
        return (f"PostgreSQL is not reachable at {POSTGRES_SERVER} ({exc}): the postgresql variants are skipped."
                f" Run them with a PostgreSQL server there, or set DISPATCH_TEST_POSTGRES=postgresql://...")
    return None


def pytest_report_header() -> str:
    return _postgres_problem() or f"PostgreSQL: {POSTGRES_SERVER} (the postgresql variants run there)"


@pytest.fixture(scope="session")
def postgres_database() -> str:
    """A database of this session's own on the PostgreSQL server, dropped at the end."""
    if problem := _postgres_problem():
        pytest.skip(problem)
    name = f"dispatch_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _postgres(POSTGRES_SERVER, f"CREATE DATABASE {name}",
              f"ALTER DATABASE {name} SET synchronous_commit = off")  # tests of behaviour, not of fsync
    yield POSTGRES_SERVER.rsplit("/", 1)[0] + "/" + name
    _postgres(POSTGRES_SERVER, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=ENGINES)
def database_url(request) -> str:
    """'' for SQLite in the data dir, or a PostgreSQL database emptied for this test."""
    if request.param == "sqlite":
        return ""
    url = request.getfixturevalue("postgres_database")
    _postgres(url, """DO $$ DECLARE name text; BEGIN
                          FOR name IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
                              EXECUTE format('DELETE FROM %I', name);  -- TRUNCATE costs an fsync a table
                          END LOOP;
                          IF to_regclass('jobs_seq') IS NOT NULL THEN PERFORM setval('jobs_seq', 1, false); END IF;
                      END $$""")
    return url


# For a test of what only SQLite does (its file, its locks): it runs on that engine alone.
sqlite_only = pytest.mark.parametrize("database_url", [""], ids=["sqlite"])


# For a test of what only several servers on PostgreSQL do.
postgresql_only = pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=[pytest.mark.slow, pytest.mark.postgresql])], indirect=True)


async def run_sql(config: dispatch.Config, sql: str) -> list[tuple]:
    """Run a statement on the test's database, whichever engine; its rows. For checks of what is
    stored, and for moving a row back in time."""
    if not config.database_url:
        with contextlib.closing(sqlite3.connect(config.data_path / "dispatch.db", isolation_level=None)) as database:
            return database.execute(sql).fetchall()
    connection = await asyncpg.connect(config.database_url)
    try:
        return [tuple(row) for row in await connection.fetch(sql)]
    finally:
        await connection.close()


async def stored(config: dispatch.Config) -> list[str]:
    """The keys of the contents of uploads, blobs and artifacts kept now, partial ones too, whichever
    engine: SQLite's are paths of files in the data dir, PostgreSQL's keys in file_chunks."""
    if not config.database_url:
        return sorted(path.relative_to(config.data_path).as_posix() for folder in ("uploads", "blobs", "artifacts")
                      for path in (config.data_path / folder).rglob("*") if path.is_file())
    return sorted(key for (key,) in await run_sql(config, "SELECT DISTINCT key FROM file_chunks"))


async def secret_of(config: dispatch.Config, name: str = "jwt_secret") -> str:
    """A secret the server keeps: in the data dir with SQLite, in the database with PostgreSQL."""
    if not config.database_url:
        return (config.data_path / name).read_text().strip()
    return (await run_sql(config, f"SELECT value FROM meta WHERE key = '{name}'"))[0][0]


# The in-process app tests keep their data dirs in memory where the machine has a tmpfs: they test
# behaviour, not fsync (the real-process tests and bench/chaos.py use the disk). Removed at the end
# of the session, not of each test: an app may still be closing its database after its data dir's
# fixture has ended.
@pytest.fixture(scope="session")
def memory_dir(tmp_path_factory):
    if not Path("/dev/shm").is_dir():
        yield tmp_path_factory.mktemp("data-dirs")
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="dispatch-tests-") as memory:
        yield Path(memory)


@pytest.fixture
def data_dir(memory_dir) -> Path:
    return Path(tempfile.mkdtemp(dir=memory_dir)) / "data"


@pytest.fixture
def config(data_dir, database_url) -> dispatch.Config:
    """Limits off and cheap bcrypt, so tests measure behaviour, not waiting; tests that check a
    limit set it with ``dataclasses.replace``."""
    return dispatch.Config(data_dir=str(data_dir), database_url=database_url, admin_email=ADMIN_EMAIL,
                           admin_password=ADMIN_PASSWORD, registration_token=REGISTRATION_TOKEN, rate_limit=0,
                           worker_rate_limit=0, bcrypt_rounds=4)


class Api:
    """Calls the API the way a client would, with helpers for the common set-up steps."""

    def __init__(self, client):
        self.client = client
        self._admin_token: str | None = None

    async def call(self, method: str, path: str, *, token: str | None = None, worker: str | None = None,
                   json=None, data=None, headers: dict | None = None, params=None) -> aiohttp.ClientResponse:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if worker is not None:
            headers["x-worker-token"] = worker
        return await self.client.request(method, path, json=json, data=data, headers=headers, params=params)

    def forget_cookies(self) -> None:
        """Login leaves an auth_token cookie in the client; a test of another credential drops it."""
        self.client.session.cookie_jar.clear()

    async def login(self, email: str, password: str) -> str:
        response = await self.call("POST", "/api/auth/login", json={"email": email, "password": password})
        assert response.status == 200, await response.text()
        return (await response.json())["token"]

    async def admin(self) -> str:
        if self._admin_token is None:
            self._admin_token = await self.login(ADMIN_EMAIL, ADMIN_PASSWORD)
        return self._admin_token

    async def new_user(self, email: str = "user@example.com", role: str = "user") -> tuple[str, str]:
        """Create a user through the admin API; returns (token, user id)."""
        response = await self.call("POST", "/api/users", token=await self.admin(),
                                   json={"email": email, "password": "user-password", "role": role})
        assert response.status == 201, await response.text()
        user_id = (await response.json())["user"]["id"]
        return await self.login(email, "user-password"), user_id

    async def register(self, worker_id: str = "worker-001", tags: list[str] | None = None, **fields) -> str:
        body = {"workerId": worker_id, "hostname": "desktop-pc", "cpuCount": 8, "totalMemoryMb": 16384,
                "metadata": {"osType": "Linux", "tags": tags or []}, **fields}
        response = await self.call("POST", "/api/workers/register", token=REGISTRATION_TOKEN, json=body)
        assert response.status == 201, await response.text()
        return (await response.json())["token"]

    async def upload(self, token: str, content: bytes, name: str = "project.zip") -> dict:
        form = aiohttp.FormData()
        form.add_field("file", io.BytesIO(content), filename=name, content_type="application/zip")  # any size
        response = await self.call("POST", "/api/files/upload", token=token, data=form)
        assert response.status == 201, await response.text()
        return await response.json()

    async def submit(self, token: str, command: str = "echo hi", **fields) -> str:
        response = await self.call("POST", "/api/jobs/submit", token=token, json={"command": command, **fields})
        assert response.status == 201, await response.text()
        return (await response.json())["jobId"]

    async def claim(self, worker_token: str, wait: float | None = None) -> dict | None:
        params = {"wait": str(wait)} if wait is not None else None
        response = await self.call("GET", "/api/jobs/get-job", worker=worker_token, params=params)
        if response.status == 204:
            return None
        assert response.status == 200, await response.text()
        return (await response.json())["job"]

    async def status(self, token: str, job_id: str) -> dict:
        response = await self.call("GET", "/api/jobs/status", token=token, params={"jobId": job_id})
        assert response.status == 200, await response.text()
        return (await response.json())["job"]


class MovableClock(dispatch.Clock):
    """Real time, moved forward by the test (``advance``) or stopped at a moment (``frozen``), so
    lease and timeout tests never sleep around a threshold."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()
        self.frozen: dt.datetime | None = None

    def now(self) -> dt.datetime:
        return self.frozen or super().now() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock()


@pytest.fixture
async def client(aiohttp_client, config, clock):
    return await aiohttp_client(dispatch.create_app(config, clock=clock))


@pytest.fixture
def make_client(aiohttp_client, config, clock):
    """A client for an app with some settings changed: ``await make_client(rate_limit=5)``."""

    async def make(**changes):
        return await aiohttp_client(dispatch.create_app(dataclasses.replace(config, **changes), clock=clock))

    return make


@pytest.fixture
def api(client) -> Api:
    return Api(client)


class ServerProcess:
    """A real ``python dispatch.py`` on a loopback port, its banner captured to a file."""

    def __init__(self, data_dir: Path, env: dict[str, str], open_files: tuple[int, int] | None = None):
        self.data_dir = data_dir
        self.env = env
        self.open_files = open_files  # (soft, hard) RLIMIT_NOFILE to start it with
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"dispatch-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        offset = len(self.log())
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "dispatch.py"), "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir)], stdout=log, stderr=subprocess.STDOUT, env=self.env,
            preexec_fn=self._limit_open_files if self.open_files else None)
        log.close()
        deadline = time.monotonic() + 15
        while "add a desktop" not in self.log()[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dispatch.py did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def _limit_open_files(self) -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, self.open_files)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """kill -9: no shutdown handlers, no flush."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_environment(**extra: str) -> dict[str, str]:
    """The environment of a test server: known admin and registration token, limits off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(DISPATCH_ADMIN_EMAIL=ADMIN_EMAIL, DISPATCH_ADMIN_PASSWORD=ADMIN_PASSWORD,
               DISPATCH_REGISTRATION_TOKEN=REGISTRATION_TOKEN, DISPATCH_RATE_LIMIT="0",
               DISPATCH_WORKER_RATE_LIMIT="0", DISPATCH_BCRYPT_ROUNDS="4", PYTHONUNBUFFERED="1", **extra)
    return env


class LiveApi:
    """The user side of a real server's API over urllib, as a script would use it."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.token: str | None = None
        self.user: dict | None = None

    def call(self, method: str, path: str, body=None, *, data: bytes | None = None,
             content_type: str | None = None) -> tuple[int, dict | None]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if body is not None:
            data, content_type = json.dumps(body).encode(), "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            with err:
                return err.code, json.loads(err.read() or b"null")

    def login(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> "LiveApi":
        self.token = None
        status, body = self.call("POST", "/api/auth/login", {"email": email, "password": password})
        assert status == 200, body
        self.token, self.user = body["token"], body["user"]
        return self

    def upload(self, content: bytes, name: str = "project.zip") -> str:
        boundary = uuid.uuid4().hex
        data = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                f"Content-Type: application/zip\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        status, body = self.call("POST", "/api/files/upload", data=data,
                                 content_type=f"multipart/form-data; boundary={boundary}")
        assert status == 201, body
        return body["url"]

    def submit(self, command: str, **fields) -> str:
        status, body = self.call("POST", "/api/jobs/submit", {"command": command, "timeout": 60, **fields})
        assert status == 201, body
        return body["jobId"]

    def status(self, job_id: str) -> dict:
        status, body = self.call("GET", f"/api/jobs/status?jobId={job_id}")
        assert status == 200, body
        return body["job"]

    def wait(self, job_id: str, until=lambda job: job["status"] in FINISHED, within: float = 15) -> dict:
        """The job once ``until(job)`` holds (by default: once it has finished)."""
        deadline = time.monotonic() + within
        while True:
            job = self.status(job_id)
            if until(job):
                return job
            assert time.monotonic() < deadline, f"gave up waiting for job {job_id}: {job}"
            time.sleep(0.05)


# Fixtures that start real processes: a test that uses one is slow (left out of the fast loop,
# ``python -m pytest -m "not slow"``).
PROCESS_FIXTURES = frozenset({"server_env", "dispatch_server"})


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") and not item.get_closest_marker("postgresql"):
            # With pytest-xdist (-n), the slow tests run one after another on one worker, as they
            # were written to (real processes, timing bounds); the fast ones, and the PostgreSQL
            # variants of the API tests (slow only for the fast loop), share the others.
            item.add_marker(pytest.mark.xdist_group("slow"))


@pytest.fixture
def server_env() -> dict[str, str]:
    return server_environment()


@pytest.fixture
def dispatch_server(tmp_path, server_env):
    """A running ``python dispatch.py`` process; stopped after the test."""
    server = ServerProcess(tmp_path / "data", server_env).start()
    yield server
    server.stop()


# -- real agents on a real server -------------------------------------------------------------


class AgentProcess:
    """``python agent.py`` run from its own copy, logging to a file."""

    def __init__(self, script: Path, server_url: str, worker_id: str, work_dir: Path, args: list):
        self.script = script
        self.server_url = server_url
        self.worker_id = worker_id
        self.work_dir = work_dir
        self.args = args
        self.log_path = work_dir.parent / f"agent-{worker_id}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "AgentProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
        env["DISPATCH_REGISTRATION_TOKEN"] = REGISTRATION_TOKEN  # from the environment, as a service would
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(self.script), "--server", self.server_url, "--worker-id", self.worker_id,
                 "--work-dir", str(self.work_dir), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.script.parent)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, within: float = 10) -> None:
        deadline = time.monotonic() + within
        while text not in self.log():
            assert self.process.poll() is None, f"agent exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {text!r} in the agent log:\n{self.log()}"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM twice (kills running jobs), then SIGKILL if it still runs."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            time.sleep(0.3)
            if self.process.poll() is None:
                self.signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_server_process(tmp_path: Path, server_env: dict, heartbeat: float) -> ServerProcess:
    env = dict(server_env, DISPATCH_HEARTBEAT_INTERVAL=str(heartbeat), DISPATCH_RATE_LIMIT="0")
    return ServerProcess(tmp_path / "data", env).start()


@pytest.fixture
def server(tmp_path, server_env):
    """A running dispatch.py with a one-second heartbeat."""
    process = start_server_process(tmp_path, server_env, heartbeat=1)
    yield process
    process.stop()


@pytest.fixture
def user(server) -> LiveApi:
    return LiveApi(server.url).login()


@pytest.fixture
def start_agent(tmp_path, server):
    """start_agent(worker_id, *args): an agent process on `server` with its own work dir."""
    folder = tmp_path / "desktop"
    folder.mkdir()
    script = folder / "agent.py"
    shutil.copy(ROOT / "agent.py", script)
    agents = []

    def start(worker_id: str, *args: str, work_dir: Path | None = None) -> AgentProcess:
        agent = AgentProcess(script, server.url, worker_id, work_dir or folder / f"work-{worker_id}", list(args))
        agents.append(agent.start())
        return agent

    yield start
    for agent in agents:
        agent.stop()
