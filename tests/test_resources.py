"""The server's own resources against a hostile or careless neighbour: descriptors, clients that
send their request slowly or not at all, and files another local account must not read. Real
``python dispatch.py`` processes, as an operator runs them."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, LiveApi, ServerProcess, make_zip, server_environment

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def health(server: ServerProcess, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(server.url + "/api/health", timeout=timeout) as response:
            return response.status
    except OSError:
        return 0


def open_files_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no open files line")


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    server = ServerProcess(tmp_path / "data", server_environment(), open_files=(256, 4096)).start()
    try:
        assert open_files_limit(server.process.pid) == ("4096", "4096")
    finally:
        server.stop()


def test_half_sent_requests_cannot_make_the_server_unreachable(tmp_path):
    """More slow-header connections than the server has descriptors: they are dropped after the
    request timeout, health answers again, and running out of descriptors is logged once."""
    env = server_environment(DISPATCH_REQUEST_TIMEOUT="1")
    server = ServerProcess(tmp_path / "data", env, open_files=(160, 160)).start()
    attackers = []
    try:
        for _ in range(300):
            try:
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=0.5)
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
                attackers.append(sock)
            except OSError:
                break
        time.sleep(0.5)
        deadline = time.monotonic() + 10
        while health(server) != 200:
            assert time.monotonic() < deadline, "the server stayed unreachable"
            time.sleep(0.2)
        assert server.process.poll() is None
        assert server.log().count("out of system resource") <= 1
        assert server.log().count("Traceback") <= 1
    finally:
        for sock in attackers:
            sock.close()
        server.stop()


def test_a_body_that_stops_arriving_is_refused_with_408(tmp_path):
    server = ServerProcess(tmp_path / "data", server_environment(DISPATCH_REQUEST_TIMEOUT="1")).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"email\": ")
            started = time.monotonic()
            answer = sock.recv(65536)
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code": "REQUEST_TIMEOUT"' in answer
        assert time.monotonic() - started < 5
        assert health(server) == 200
    finally:
        server.stop()


def test_the_data_dir_and_every_file_in_it_are_for_the_servers_account_only(tmp_path):
    old_umask = os.umask(0o022)  # an operator's usual umask: the server must not rely on it
    try:
        server = ServerProcess(tmp_path / "data", server_environment()).start()
    finally:
        os.umask(old_umask)
    try:
        LiveApi(server.url).login().upload(make_zip({"secret.txt": "mine"}))
        backup = tmp_path / "backup.db"
        subprocess.run([sys.executable, str(ROOT / "dispatch.py"), "--data-dir", str(server.data_dir), "backup",
                        str(backup)], check=True, capture_output=True)
        paths = [server.data_dir, *server.data_dir.rglob("*"), backup]

        modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
        assert {"data/dispatch.db", "data/dispatch.db-wal", "data/jwt_secret"} <= set(modes)
        assert any(name.endswith("project.zip") for name in modes)
        assert {name: mode for name, mode in modes.items() if mode & 0o077} == {}
    finally:
        server.stop()


def test_a_data_dir_an_older_version_left_readable_is_closed_at_start(tmp_path):
    data = tmp_path / "data"
    server = ServerProcess(data, server_environment()).start()
    server.stop()
    for path in [data, *data.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)

    server.start()
    try:
        assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in [data, *data.rglob("*")]
                if stat.S_IMODE(p.stat().st_mode) & 0o077} == {}
    finally:
        server.stop()
