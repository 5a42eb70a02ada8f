"""`python agent.py run` end to end: a real dispatch.py, a real agent, the client in a temporary git
repository. Ignored files and .git stay home, the exit code comes back (0, 3, 124, 125), output
arrives live and in order per stream, artifacts land in the folder, Ctrl-C cancels the remote job
and its process tree, and a second run sends only the file that changed."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_agent_run import alive

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/bin/sh, /proc")]


@pytest.fixture
def api_token(user) -> str:
    status, body = user.call("POST", "/api/auth/tokens", {"name": "agent.py run"})
    assert status == 201, body
    return body["token"]


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git work tree: tracked files, an untracked one, ignored ones."""
    folder = tmp_path / "repo"
    files = {"src/main.c": "int main(void) { return 0; }\n", "run.sh": "#!/bin/sh\necho run.sh ran\n",
             ".gitignore": "secret.txt\nbuild/\n", "secret.txt": "do not send\n", "build/cache.o": "obj\n",
             "notes.txt": "untracked, not ignored\n"}
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    (folder / "run.sh").chmod(0o755)
    git = lambda *args: subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("add", "src", "run.sh", ".gitignore")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "start")
    return folder


def client(server, token: str, folder: Path, *args: str, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(DISPATCH_API_TOKEN=token, PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(folder.parent / "cache"))
    return subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "run", "--server", server.url, *args],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run(server, token: str, folder: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    process = client(server, token, folder, *args)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def job_id_in(stderr: str) -> str:
    return re.search(r"job (job-[0-9a-f]+) queued", stderr).group(1)


def test_the_work_tree_goes_out_and_the_output_exit_code_and_artifacts_come_back(server, start_agent, api_token,
                                                                                   repo):
    start_agent("run-1")
    command = ("find . -type f | sort; ./run.sh; mkdir -p dist/sub; echo built > dist/app.txt; echo deep > "
               "dist/sub/deep.txt; ln -s /etc/passwd dist/passwd; echo to-stderr >&2")

    result = run(server, api_token, repo, "--artifacts", "dist/**", "--", command)

    assert result.returncode == 0, result.stderr
    listed = [line for line in result.stdout.splitlines() if line.startswith("./")]
    assert listed == ["./.gitignore", "./notes.txt", "./run.sh", "./src/main.c"]  # no secret.txt, build/, .git
    assert "run.sh ran" in result.stdout and "to-stderr" in result.stderr
    assert (repo / "dist/app.txt").read_text() == "built\n" and (repo / "dist/sub/deep.txt").read_text() == "deep\n"
    assert not (repo / "dist/passwd").exists()
    assert "artifacts: skipped dist/passwd: a symbolic link (to /etc/passwd)" in result.stderr
    assert "2 artifact file(s) in" in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["--", "exit 3"], 3),
    (["--timeout", "1", "--", "sleep 30"], 124),
    (["--working-directory", "no/such/folder", "--", "true"], 125),
    (["--env", "GREETING=hello there", "--", 'test "$GREETING" = "hello there"'], 0),
])
def test_the_job_exit_code_is_the_client_exit_code(server, start_agent, api_token, repo, args, expected):
    start_agent("run-codes")
    result = run(server, api_token, repo, *args)
    assert result.returncode == expected, result.stderr


def test_output_arrives_live_and_in_order_per_stream(server, start_agent, api_token, repo):
    start_agent("run-live")
    with client(server, api_token, repo, "--",
                "for i in 1 2 3 4 5 6; do echo out$i; echo err$i >&2; sleep 0.4; done") as process:
        arrivals = [(line.strip(), time.monotonic()) for line in process.stdout]
        stderr = process.stderr.read()
        process.wait(30)
    finished = arrivals[-1][1]

    assert process.returncode == 0
    assert [line for line, _ in arrivals] == [f"out{i}" for i in range(1, 7)]
    assert finished - arrivals[0][1] >= 1.5  # the first line came while the job still ran, not with the last
    assert re.findall(r"^err\d$", stderr, re.M) == [f"err{i}" for i in range(1, 7)]


def test_ctrl_c_cancels_the_remote_job_and_its_process_tree(server, start_agent, api_token, repo, user, tmp_path):
    start_agent("run-cancel")
    pids = tmp_path / "pids"
    process = client(server, api_token, repo, "--",
                     f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; echo started; wait")
    assert process.stdout.readline().strip() == "started"
    running = [int(pid) for pid in pids.read_text().split()]
    assert all(alive(pid) for pid in running)

    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)

    assert process.returncode == 130, err
    job = user.status(job_id_in(err))
    assert job["status"] == "cancelled" and "cancelled" in err
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in running)


def test_a_second_run_sends_only_the_changed_file(server, start_agent, api_token, repo):
    start_agent("run-twice")
    first = run(server, api_token, repo, "--", "cat src/main.c")
    assert first.returncode == 0 and "sent 4 file(s)" in first.stderr
    blobs = server.data_dir / "blobs"
    stored = {p.name for p in blobs.rglob("*") if p.is_file()}

    (repo / "src/main.c").write_text("int main(void) { return 1; }\n")
    second = run(server, api_token, repo, "--", "cat src/main.c")

    assert second.returncode == 0 and "return 1" in second.stdout
    assert "sent 1 file(s), 0.0 MB" in second.stderr
    assert len({p.name for p in blobs.rglob("*") if p.is_file()} - stored) == 1
    third = run(server, api_token, repo, "--", "true")  # nothing changed: nothing is sent
    assert third.returncode == 0 and "sent" not in third.stderr


def test_detach_prints_the_job_id_and_returns(server, start_agent, api_token, repo, user):
    start_agent("run-detach")
    result = run(server, api_token, repo, "--detach", "--", "echo detached")
    assert result.returncode == 0
    job_id = result.stdout.strip()
    assert re.fullmatch(r"job-[0-9a-f]+", job_id)
    assert user.wait(job_id)["stdout"] == "detached\n"


def test_a_refused_token_is_one_sentence(server, repo):
    result = run(server, "dsp_not-a-real-token", repo, "--", "true")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("dispatch: the server refused the API token")


def test_a_content_the_server_lost_since_the_last_run_is_sent_again(server, start_agent, api_token, repo):
    """The client asks only about contents the server did not have last time; if one expired since,
    the submit says so and the client asks about everything, sends what is missing, and submits again."""
    import sqlite3

    start_agent("run-expired")
    assert run(server, api_token, repo, "--", "true").returncode == 0
    lost = hashlib.sha256((repo / "src/main.c").read_bytes()).hexdigest()
    db = sqlite3.connect(server.data_dir / "dispatch.db")
    with db:
        db.execute("DELETE FROM blobs WHERE sha256 = ?", (lost,))
    db.close()

    again = run(server, api_token, repo, "--", "cat src/main.c")

    assert again.returncode == 0, again.stderr
    assert "int main" in again.stdout and "sent 1 file(s)" in again.stderr
