"""What a job can reach of the agent: the registration token, the worker token, the cache, other jobs.

Without --run-as a job runs as the agent's own user (the documented limit), yet never finds the
registration token in any ancestor's environment. With --run-as (Unix, agent as root) it runs as an
unprivileged user who can read none of the agent's files. Tests that need root skip without it.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

import agent
from conftest import REGISTRATION_TOKEN
from test_agent_e2e import wait_until, zip_bytes
from test_agent_run import FakeServer, Sink, fake, job_answer, wait_gone, zip_of  # noqa: F401 (fake: a fixture)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/bin/sh commands and /proc")


def _nobody_reason() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "--run-as needs the tests to run as root on Linux"
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "--run-as tests need the user nobody"
    return None


as_root_with_nobody = pytest.mark.skipif(_nobody_reason() is not None, reason=_nobody_reason() or "")


@pytest.fixture
def open_dir():
    """A directory every user may pass through: pytest's own tmp_path (under a 0700 directory) is not."""
    path = Path(tempfile.mkdtemp(prefix="dispatch-trust-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_agent(fake: FakeServer, work_dir: Path, **changes) -> agent.Agent:
    config = agent.Config(server=fake.url, token="registration-secret", worker_id="desk-1", work_dir=work_dir,
                          **changes)
    worker = agent.Agent(config)
    worker.prepare()
    return worker


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- settings --------------------------------------------------------------------------------


def test_run_as_is_listed_in_the_settings_table_with_its_environment_name(capsys):
    with pytest.raises(SystemExit):
        agent.parse_config(["--help"], {})

    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--run-as USER" in text and "[DISPATCH_RUN_AS]" in text
    assert ("--run-as", "DISPATCH_RUN_AS") in [(s.flag, s.env) for s in agent._SETTINGS]


@pytest.mark.parametrize("windows, euid, name, message", [
    (True, 0, "nobody", "--run-as works on Unix only: on Windows, run the agent itself under the account"),
    (False, 1000, "nobody", "--run-as needs the agent to be started as root, not as uid 1000"),
    (False, 0, "no-such-user-here", "--run-as names the user 'no-such-user-here', who does not exist"),
    (False, 0, "root", "--run-as must name an unprivileged user, and 'root' has uid 0"),
], ids=["windows", "not root", "no such user", "root"])
def test_run_as_refuses_to_start_with_one_sentence(monkeypatch, capsys, windows, euid, name, message):
    if not windows and not hasattr(os, "geteuid"):
        pytest.skip("Unix only")
    monkeypatch.setattr(agent, "_WINDOWS", windows)
    monkeypatch.setattr(os, "geteuid", lambda: euid, raising=False)

    with pytest.raises(SystemExit) as exited:
        agent.parse_config(["--server", "http://lanbox:3000", "--token", "t"], {"DISPATCH_RUN_AS": name})

    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and error.count(". ") == 0  # one sentence


# --- without --run-as: the agent's files are its user's only -------------------------------


@linux_only
def test_the_work_dir_its_directories_and_the_agents_files_are_its_users_only(fake, tmp_path):
    fake.route("GET", "/api/jobs/get-job",
               job_answer(command="cat data.txt", fileUrl="/uploads/file-1/input.zip", fileId="file-1"),
               (204, {}, b""))
    fake.route("GET", "/uploads/file-1/input.zip", (200, {}, zip_of("data.txt", "private\n")))
    fake.route("POST", "/api/jobs/submit-result", (503, {}, {"message": "down"}))  # the result stays spooled
    old_umask = os.umask(0o022)  # the usual umask, which alone would leave directories 0755
    try:
        (tmp_path / "work").mkdir(mode=0o755)  # left open by someone: the agent closes it
        worker = make_agent(fake, tmp_path / "work")
        worker.poll_once()
    finally:
        os.umask(old_umask)
    work = tmp_path / "work"
    try:
        assert mode(work) == 0o700
        assert {p.name: mode(p) for p in work.iterdir() if p.is_dir()} == {
            "jobs": 0o700, "cache": 0o700, "results": 0o700}
        spooled, = (work / "results").glob("*.json")
        for path in (work / "worker.json", work / "agent.lock", work / "cache" / "file-1.bin", spooled):
            assert mode(path) == 0o600, path
    finally:
        worker.close()


# --- the registration token ------------------------------------------------------------------

# Walks from the job's shell up to pid 1 and says, for each process, whether its environment
# could be read and whether it holds the registration token.
ANCESTOR_WALK = rf"""
pid=$$
while [ "$pid" -gt 1 ]; do
  if environ=$(tr '\0' '\n' 2>/dev/null < /proc/$pid/environ); then
    case "$environ" in
      *DISPATCH_REGISTRATION_TOKEN=*|*{REGISTRATION_TOKEN}*) echo "token in $pid" ;;
      *) echo "clean $pid" ;;
    esac
  else
    echo "unreadable $pid"
  fi
  pid=$(sed 's/.*) //' /proc/$pid/stat | cut -d' ' -f2)
done
"""


@pytest.mark.slow
@linux_only
def test_no_ancestor_of_a_job_holds_the_registration_token_in_its_environment(user, start_agent):
    worker = start_agent("desk-1")  # DISPATCH_REGISTRATION_TOKEN in its environment, as a service would
    worker.wait_for_log("registered as worker desk-1")

    job = user.wait(user.submit(ANCESTOR_WALK))

    assert job["status"] == "completed", job
    assert f"clean {worker.process.pid}\n" in job["stdout"]  # the agent itself, read and clean
    assert "token in" not in job["stdout"]


def test_the_restart_hands_the_token_over_through_a_pipe_not_the_environment(monkeypatch):
    started = {}
    monkeypatch.setattr(agent, "_WINDOWS", False)
    monkeypatch.setenv(agent.TOKEN_ENV, "secret-token")
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.update(path=path, argv=argv, env=env))

    agent._restart_without_token()

    assert started["path"] == sys.executable and "secret-token" not in " ".join(started["argv"])
    assert agent.TOKEN_ENV not in started["env"]
    fd = started["env"][agent.TOKEN_FD_ENV]
    assert "secret-token" not in json.dumps(started["env"])
    monkeypatch.setattr(os, "environ", dict(started["env"]))

    environ = agent._environ_with_handed_token()

    assert environ[agent.TOKEN_ENV] == "secret-token"
    assert agent.TOKEN_FD_ENV not in environ and agent.TOKEN_FD_ENV not in os.environ
    with pytest.raises(OSError):
        os.fstat(int(fd))  # read once, then closed


# --- --run-as --------------------------------------------------------------------------------


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
@as_root_with_nobody
def test_a_job_run_as_another_user_is_killed_with_its_whole_tree(open_dir, monkeypatch):
    monkeypatch.setattr(agent, "KILL_GRACE_SECONDS", 0.5)
    nobody = agent._JobUser.lookup("nobody")
    sink = Sink()
    marker = f"test-{uuid.uuid4().hex}/job/"
    command = "id -u; setsid sh -c 'trap \"\" TERM; echo setsid $$; exec sleep 600' & echo main $$; exec sleep 600"

    result = agent.run_job(command, open_dir, env=dict(os.environ, **{agent.MARKER_ENV: marker}), marker=marker,
                           timeout=1, send_output=sink, halt=threading.Event(), user=nobody)

    assert result.exit_code == agent.EXIT_TIMEOUT
    lines = sink.text("stdout").splitlines()
    assert lines[0] == str(nobody.uid)
    pids = [int(line.split()[1]) for line in lines[1:]]
    assert len(pids) == 2 and wait_gone(pids) == []


@as_root_with_nobody
def test_a_finished_jobs_files_are_closed_to_the_job_user_while_its_result_waits(fake, open_dir):
    fake.route("GET", "/api/jobs/get-job", job_answer(command="echo mine > $HOME/secret; ls -ld $HOME"),
               (204, {}, b""))
    fake.route("POST", "/api/jobs/submit-result", (503, {}, {"message": "down"}))
    worker = make_agent(fake, open_dir / "work", run_as="nobody")
    try:
        worker.poll_once()

        job_dir, = (open_dir / "work" / "jobs").iterdir()
        assert (job_dir / "secret").read_text() == "mine\n"  # the job could write its own directory
        assert " nobody " in fake.bodies("/api/jobs/stream-output")[0]["data"]
        assert job_dir.stat().st_uid == 0 and mode(job_dir) == 0o700  # taken back once it ended
        as_nobody = subprocess.run(["cat", str(job_dir / "secret")], user="nobody", capture_output=True)
        assert as_nobody.returncode != 0 and b"Permission denied" in as_nobody.stderr
    finally:
        worker.close()


@as_root_with_nobody
def test_run_as_refuses_a_work_dir_the_user_cannot_reach(fake, tmp_path):
    # pytest's tmp_path lies under /tmp/pytest-of-root, mode 0700
    with pytest.raises(agent.AgentError, match=r"--run-as nobody: nobody may not pass through .*pytest-of-root"):
        make_agent(fake, tmp_path / "work", run_as="nobody")


PROBES = """
id -u; echo "home=$HOME user=$USER logname=$LOGNAME pwd=$(pwd)"
cat data.txt && echo more >> data.txt && mkdir made && echo "wrote into its tree"
for path in {work}/worker.json {work}/cache/{cached}; do
  cat "$path" >/dev/null 2>&1 && echo "read $path" || echo "cannot read $path"
done
for path in {work} {work}/jobs {work}/cache {work}/results; do
  ls "$path" >/dev/null 2>&1 && echo "listed $path" || echo "cannot list $path"
done
grep -rl {token} {work} 2>/dev/null || echo "the token is in no file it can read"
"""


@pytest.mark.slow
@as_root_with_nobody
def test_a_job_run_as_nobody_reaches_its_own_files_and_none_of_the_agents(user, start_agent, open_dir):
    work = open_dir / "work"
    worker = start_agent("desk-1", "--run-as", "nobody", work_dir=work)
    url = user.upload(zip_bytes({"proj/data.txt": "from the zip\n"}))
    first = user.wait(user.submit("cat data.txt", fileUrl=url, workingDirectory="proj"))
    assert (first["status"], first["stdout"]) == ("completed", "from the zip\n")
    cached, = (p.name for p in (work / "cache").iterdir())  # the first job's input: any user's upload
    command = PROBES.format(work=work, cached=cached, token=REGISTRATION_TOKEN) + ANCESTOR_WALK + "exit 7\n"

    job = user.wait(user.submit(command, fileUrl=url, workingDirectory="proj"))

    nobody = agent._JobUser.lookup("nobody")
    stdout = job["stdout"]
    home = stdout.splitlines()[1].split()[0].removeprefix("home=")
    assert (job["status"], job["exitCode"]) == ("failed", 7), job
    assert stdout.splitlines()[0] == str(nobody.uid)
    assert Path(home).parent == work.resolve() / "jobs"
    assert f"user=nobody logname=nobody pwd={home}/proj\n" in stdout
    assert "from the zip\nwrote into its tree\n" in stdout
    for path in (work / "worker.json", work / "cache" / cached):
        assert f"cannot read {path}\n" in stdout
    for path in (work, work / "jobs", work / "cache", work / "results"):
        assert f"cannot list {path}\n" in stdout
    assert "the token is in no file it can read\n" in stdout
    assert f"unreadable {worker.process.pid}\n" in stdout  # the agent's environment: root's only
    assert "token in" not in stdout
    for path in (work, work / "jobs"):
        assert (path.stat().st_uid, mode(path)) == (0, 0o711)
    for path in (work / "cache", work / "results"):
        assert (path.stat().st_uid, mode(path)) == (0, 0o700)
    assert mode(work / "worker.json") == 0o600
    wait_until(lambda: not any((work / "jobs").iterdir()), message="the job dirs to be removed")
