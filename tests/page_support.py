"""What the browser tests of the web page (and the README screenshot script) share: a real
``dispatch.py`` and a real ``agent.py`` as processes, a urllib client of the API, and headless
Chromium through Playwright (Debian's ``chromium`` package; Playwright never downloads a browser here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, REGISTRATION_TOKEN, ROOT, ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FINISHED = ("completed", "failed", "cancelled")


def server_env(**extra: str) -> dict[str, str]:
    """The environment of conftest's ``server_env`` fixture (usable outside a test, too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(DISPATCH_ADMIN_EMAIL=ADMIN_EMAIL, DISPATCH_ADMIN_PASSWORD=ADMIN_PASSWORD,
               DISPATCH_REGISTRATION_TOKEN=REGISTRATION_TOKEN, DISPATCH_RATE_LIMIT="0",
               DISPATCH_BCRYPT_ROUNDS="4", PYTHONUNBUFFERED="1", **extra)
    return env


def start_server(folder: Path) -> ServerProcess:
    """``python dispatch.py`` on a free loopback port, heartbeats every 2 s so the page looks alive."""
    return ServerProcess(folder / "data", server_env(DISPATCH_HEARTBEAT_INTERVAL="2")).start()


class Agent:
    """``python agent.py`` run from its own copy in `folder`, as on a desktop; its log in a file."""

    def __init__(self, folder: Path, server_url: str, worker_id: str, *args: str):
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "agent.py"
        shutil.copy(ROOT / "agent.py", script)
        self.log_path = folder / f"agent-{worker_id}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(script), "--server", server_url, "--token", REGISTRATION_TOKEN,
                 "--worker-id", worker_id, "--work-dir", str(folder / f"work-{worker_id}"), *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM twice (the second kills running jobs), then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


class Api:
    """The user side of the API over urllib, as a script would use it."""

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

    def login(self) -> "Api":
        status, body = self.call("POST", "/api/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        assert status == 200, body
        self.token, self.user = body["token"], body["user"]
        return self

    def upload(self, content: bytes, name: str = "project.zip") -> str:
        boundary = "page-test-boundary-7d1f"
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

    def job(self, job_id: str) -> dict:
        status, body = self.call("GET", f"/api/jobs/status?jobId={job_id}")
        assert status == 200, body
        return body["job"]

    def wait_for_job(self, job_id: str, until=lambda job: job["status"] in FINISHED, within: float = 15) -> dict:
        deadline = time.monotonic() + within
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            assert time.monotonic() < deadline, f"gave up waiting for job {job_id}: {job}"
            time.sleep(0.05)

    def wait_for_worker(self, worker_id: str, agent: Agent, within: float = 15) -> dict:
        deadline = time.monotonic() + within
        while True:
            status, body = self.call("GET", "/api/workers/list")
            assert status == 200, body
            online = [w for w in body["workers"] if w["workerId"] == worker_id and w["status"] == "online"]
            if online:
                return online[0]
            assert agent.process.poll() is None, f"agent exited:\n{agent.log()}"
            assert time.monotonic() < deadline, f"worker {worker_id} never came online:\n{agent.log()}"
            time.sleep(0.05)


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
