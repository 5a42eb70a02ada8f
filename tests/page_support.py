"""What the browser tests of the web page (and the README screenshot script) share: a real
``dispatch.py`` and a real ``agent.py`` as processes, a urllib client of the API, and headless
Chromium through Playwright (Debian's ``chromium`` package; Playwright never downloads a browser here).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REGISTRATION_TOKEN, ROOT, LiveApi, ServerProcess, server_environment

CHROMIUM = os.environ.get("DISPATCH_TEST_CHROMIUM", "/usr/bin/chromium")  # CI elsewhere: Google Chrome
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start_server(folder: Path) -> ServerProcess:
    """``python dispatch.py`` on a free loopback port, heartbeats every 2 s so the page looks alive."""
    return ServerProcess(folder / "data", server_environment(DISPATCH_HEARTBEAT_INTERVAL="2")).start()


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


class Api(LiveApi):
    """The API client of the page tests: a LiveApi that can also wait for a worker."""

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
