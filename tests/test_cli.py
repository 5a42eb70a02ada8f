"""The command line as a new user meets it: a start that cannot listen leaves nothing behind,
subcommands find (or refuse) the data dir wherever --data-dir is written, a lost password can be
set again, and mistakes are one sentence, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, ROOT, LiveApi, ServerProcess, free_port, server_environment

pytestmark = pytest.mark.slow


def dispatch_py(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in server_environment().items() if k != "DISPATCH_ADMIN_PASSWORD"}
    return subprocess.run([sys.executable, str(ROOT / "dispatch.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=30, env=env, cwd=cwd, stdin=None if stdin is not None else subprocess.DEVNULL)


def one_sentence(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dispatch.py: "), result.stderr
    return lines[0]


def test_a_start_that_cannot_listen_says_why_and_leaves_no_data_dir_behind(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = dispatch_py("--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path / "data"))

    assert "Address already in use" in one_sentence(result) and f"{port}" in result.stderr
    assert not (tmp_path / "data").exists()  # the first admin is made by the start that succeeds


def test_the_first_start_that_listens_prints_the_first_admin(tmp_path):
    env = {k: v for k, v in server_environment().items() if k != "DISPATCH_ADMIN_PASSWORD"}
    server = ServerProcess(tmp_path / "data", env).start()
    try:
        line = next(line for line in server.log().splitlines() if "first admin:" in line)
        password = line.split(" / ")[1].strip()
        LiveApi(server.url).login(ADMIN_EMAIL, password)
    finally:
        server.stop()


def test_a_second_server_on_the_same_data_dir_is_refused_until_the_first_is_gone_even_by_kill_9(tmp_path):
    first = ServerProcess(tmp_path / "data", server_environment()).start()
    try:
        refused = dispatch_py("--host", "127.0.0.1", "--port", str(free_port()), "--data-dir", str(tmp_path / "data"))
        assert "another dispatch server" in one_sentence(refused)
        assert f"pid {first.process.pid}" in refused.stderr  # who holds it
        LiveApi(first.url).login(ADMIN_EMAIL, ADMIN_PASSWORD)  # the first one goes on as before
    finally:
        first.kill()  # its lock goes with it: nothing stale is left to block the next start

    second = ServerProcess(tmp_path / "data", server_environment()).start()
    second.stop()


def test_user_add_refuses_a_folder_with_no_database_unless_told_to_create_one(tmp_path):
    refused = dispatch_py("user", "add", "a@example.com", "--password-stdin", stdin="password-1\n", cwd=tmp_path)

    assert "no dispatch database" in one_sentence(refused) and "--create" in refused.stderr
    assert list(tmp_path.iterdir()) == []
    created = dispatch_py("user", "add", "a@example.com", "--password-stdin", "--create", "--data-dir",
                          str(tmp_path / "farm"), stdin="password-1\n")
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "farm" / "dispatch.db").exists()


def test_data_dir_works_before_or_after_the_subcommand_and_a_lost_password_can_be_set(tmp_path):
    server = ServerProcess(tmp_path / "data", server_environment()).start()
    try:
        before = dispatch_py("--data-dir", str(server.data_dir), "user", "add", "bo@example.com",
                             "--password-stdin", stdin="first-password\n")
        after = dispatch_py("user", "set-password", "bo@example.com", "--data-dir", str(server.data_dir),
                            "--password-stdin", stdin="second-password\n")

        assert (before.returncode, after.returncode) == (0, 0), before.stderr + after.stderr
        LiveApi(server.url).login("bo@example.com", "second-password")
        unknown = dispatch_py("user", "set-password", "nobody@example.com", "--data-dir", str(server.data_dir),
                              "--password-stdin", stdin="third-password\n")
        assert "no user nobody@example.com" in one_sentence(unknown)
    finally:
        server.stop()


def test_no_terminal_for_the_password_is_a_sentence_not_a_traceback(tmp_path):
    result = dispatch_py("user", "add", "a@example.com", "--create", "--data-dir", str(tmp_path / "d"))

    assert "--password-stdin" in one_sentence(result)


def test_a_backup_into_a_missing_folder_is_a_sentence(tmp_path):
    dispatch_py("user", "add", "a@example.com", "--create", "--data-dir", str(tmp_path / "d"), "--password-stdin",
                stdin="password-1\n")

    result = dispatch_py("backup", str(tmp_path / "missing" / "copy.db"), "--data-dir", str(tmp_path / "d"))

    assert "No such file or directory" in one_sentence(result)


def test_a_backup_on_postgresql_says_to_use_pg_dump_which_holds_every_file_too(tmp_path):
    result = dispatch_py("--database-url", "postgresql://dispatch@127.0.0.1:1/farm", "backup", str(tmp_path / "copy"),
                         "--data-dir", str(tmp_path / "d"))

    sentence = one_sentence(result)
    assert "pg_dump" in sentence and "uploads, blobs and artifacts" in sentence
    assert not (tmp_path / "copy").exists()


def test_help_lists_every_subcommand_and_its_options():
    help_text = dispatch_py("--help").stdout

    for words in ("user add EMAIL", "--role admin|user", "--password-stdin", "--create", "user set-password EMAIL",
                  "backup FILE"):
        assert words in help_text
