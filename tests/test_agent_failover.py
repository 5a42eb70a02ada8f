"""Several servers on one database: the agent (and `agent.py run`) given a comma-separated --server list
uses one, moves to the next when it cannot reach it (no answer, or a 5xx; a 4xx or a 429 is an answer),
says so once per move, ends a long-poll parked on the server it left, and delivers a result to whichever
server is in use. Against the stdlib fake server first, then real processes."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

import agent
from conftest import ROOT, AgentProcess, LiveApi, ServerProcess, start_server_process
from test_agent_run import FakeServer, fake, job_answer, make_agent, unix_only  # noqa: F401 (fixtures)

NO_JOB = (204, {}, b"")


@pytest.fixture
def closed_url():
    """closed_url(): the URL of a loopback port held bound but never listening, so that connecting
    to it is refused (and nothing else can take the port during the test)."""
    with contextlib.ExitStack() as held:
        def make() -> str:
            probe = held.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{probe.getsockname()[1]}"

        yield make


def poll(worker: agent.Agent, times: int) -> None:
    """poll_once() `times` times, each at the moment the one before asked for (no sleeping)."""
    now = 0.0
    for _ in range(times):
        now += worker.poll_once(now=now)


# --- against the fake server -----------------------------------------------------------------


def test_an_unreachable_first_server_is_left_for_the_next_and_the_move_logged_once(fake, make_agent, closed_url,
                                                                                    caplog):
    fake.route("GET", "/api/jobs/get-job", NO_JOB)
    closed = closed_url()
    worker = make_agent(f"{closed},{fake.url}")

    poll(worker, 3)

    assert fake.paths()[:3] == [("POST", "/api/workers/register"), ("POST", "/api/workers/heartbeat"),
                                ("GET", "/api/jobs/get-job")]
    assert caplog.text.count("unreachable") == 1
    assert f"server {closed} unreachable (" in caplog.text and f"; using {fake.url}" in caplog.text
    assert "cannot reach" not in caplog.text  # no outage: the next server answered


@pytest.mark.parametrize("status, moves", [(503, True), (500, True), (429, False), (400, False)])
def test_a_5xx_moves_to_the_next_server_but_a_4xx_or_429_is_an_answer(fake, make_agent, status, moves):
    fake.route("GET", "/api/jobs/get-job", (status, {}, {"message": "no"}))
    other = FakeServer()
    other.route("GET", "/api/jobs/get-job", NO_JOB)
    try:
        worker = make_agent(f"{fake.url},{other.url}")

        worker.poll_once(now=0.0)
        worker.poll_once(now=100.0)

        assert other.paths() == ([("GET", "/api/jobs/get-job")] if moves else [])
    finally:
        other.close()


def test_with_no_server_answering_the_first_round_of_moves_and_then_the_outage_are_logged_once(make_agent,
                                                                                                 closed_url, caplog):
    first, second = closed_url(), closed_url()
    worker = make_agent(f"{first},{second}")

    poll(worker, 8)

    assert caplog.text.count("unreachable") == 2  # first -> second -> first, then quiet
    assert caplog.text.count(f"cannot reach any of {first}, {second} (") == 1


def test_a_long_poll_parked_on_a_server_that_stops_answering_ends_once_the_agent_moves(fake, make_agent):
    """A server whose database went down answers 503 to a heartbeat while a long-poll waits there:
    the long-poll must not wait out its timeout (45 s) before the slot asks the next server."""
    parked, released = threading.Event(), threading.Event()

    def park():
        parked.set()
        released.wait(30)
        return NO_JOB

    fake.route("GET", "/api/jobs/get-job", park)
    fake.route("POST", "/api/workers/heartbeat", (200, {}, {"success": True, "nextCheckIn": 30000}),
               (503, {}, {"message": "database unavailable"}))
    other = FakeServer()
    other.route("GET", "/api/jobs/get-job", NO_JOB)
    try:
        worker = make_agent(f"{fake.url},{other.url}")
        slot = threading.Thread(target=worker.poll_once)
        slot.start()
        assert parked.wait(10)

        moved = time.monotonic()
        with pytest.raises(agent.ServerUnavailable, match="503"):
            worker.heartbeat()
        slot.join(10)

        assert not slot.is_alive() and time.monotonic() - moved < 2
        worker.poll_once(now=time.monotonic() + 100)
        assert other.paths() == [("GET", "/api/jobs/get-job")]
    finally:
        released.set()
        other.close()


@unix_only
def test_a_result_the_first_server_could_not_take_is_delivered_to_the_next(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", job_answer(command="exit 3"))
    fake.route("POST", "/api/jobs/submit-result", (503, {}, {"message": "database unavailable"}))
    other = FakeServer()
    other.route("POST", "/api/jobs/submit-result", (200, {}, {"success": True}))
    other.route("GET", "/api/jobs/get-job", NO_JOB)
    try:
        worker = make_agent(f"{fake.url},{other.url}")

        worker.poll_once(now=0.0)  # runs the job; its result stays on disk
        worker.poll_once(now=100.0)

        [result] = other.bodies("/api/jobs/submit-result")
        assert (result["jobId"], result["exitCode"]) == ("job-1", 3)
        assert not list((worker.config.work_dir / "results").iterdir())
    finally:
        other.close()


def test_the_saved_worker_token_is_used_with_any_server_of_the_list(fake, make_agent, closed_url):
    fake.route("GET", "/api/jobs/get-job", NO_JOB)
    first = make_agent(fake.url)
    first.poll_once()
    first.close()

    poll(make_agent(f"{closed_url()},{fake.url}"), 2)

    assert fake.paths().count(("POST", "/api/workers/register")) == 1  # only the first agent registered


def test_agent_py_run_submits_to_the_first_server_that_answers(fake, closed_url, tmp_path):
    fake.route("POST", "/api/jobs/submit", (201, {}, {"success": True, "jobId": "job-7"}))
    closed = closed_url()
    (tmp_path / "empty").mkdir()
    stdout, stderr = io.StringIO(), io.StringIO()

    code = agent.run_client(["--server", f"{closed},{fake.url}", "-C", str(tmp_path / "empty"), "--detach", "--",
                             "true"], {"DISPATCH_API_TOKEN": "dsp_t", "XDG_CACHE_HOME": str(tmp_path / "cache")},
                            stdout=stdout, stderr=stderr)

    assert (code, stdout.getvalue()) == (0, "job-7\n"), stderr.getvalue()
    [told] = stderr.getvalue().splitlines()
    assert told.startswith(f"dispatch: server {closed} unreachable (POST /api/jobs/submit failed: ")
    assert told.endswith(f"); using {fake.url}")


# --- the list on the command line ------------------------------------------------------------


def test_a_server_list_keeps_its_order_without_spaces_or_trailing_slashes():
    config = agent.parse_config(["--token", "t"], {"DISPATCH_SERVER": " http://a:3000/ ,https://b:3000,"})

    assert config.servers == ("http://a:3000", "https://b:3000")


@pytest.mark.parametrize("servers, message", [
    ("http://a:3000,lanbox:3001", "or several separated by commas: 'lanbox:3001' in the list is not a URL"),
    ("http://a:3000, http://b:3000/api/", "--server is the server's address without /api: http://b:3000"),
    (" , ", "--server (or DISPATCH_SERVER) must be the server's URL, e.g. http://lanbox:3000"),
])
def test_every_server_of_the_list_is_checked_and_a_wrong_one_named(servers, message, capsys):
    for parse in (lambda: agent.parse_config(["--server", servers, "--token", "t"], {}),
                  lambda: agent.run_client(["--server", servers, "--", "true"], {"DISPATCH_API_TOKEN": "t"})):
        with pytest.raises(SystemExit) as exited:
            parse()

        assert exited.value.code == 2
        assert message in capsys.readouterr().err


# --- real processes --------------------------------------------------------------------------


@pytest.fixture
def agent_on(tmp_path):
    """agent_on(servers): an agent process (worker desk-1) given this --server list; stopped after the test."""
    folder = tmp_path / "desktop"
    folder.mkdir()
    shutil.copy(ROOT / "agent.py", folder / "agent.py")
    agents = []

    def start(servers: str) -> AgentProcess:
        agents.append(AgentProcess(folder / "agent.py", servers, "desk-1", folder / "work", []).start())
        return agents[-1]

    yield start
    for desk in agents:
        desk.stop()


@unix_only
def test_an_agent_whose_first_server_is_unreachable_works_through_the_next(server, user, agent_on, closed_url):
    closed = closed_url()
    desk = agent_on(f"{closed},{server.url}")

    job = user.wait(user.submit("echo hi"), within=20)

    assert (job["status"], job["stdout"], job["workerId"]) == ("completed", "hi\n", "desk-1")
    assert desk.log().count(" unreachable (") == 1
    assert f"server {closed} unreachable (" in desk.log() and f"; using {server.url}" in desk.log()


@unix_only
def test_an_agent_moves_to_the_server_that_took_over_the_data_and_finishes_its_jobs_there(tmp_path, server_env,
                                                                                          agent_on):
    """SQLite: one server at a time on a data dir, so the second starts once the first has stopped.
    A five-second heartbeat: the change-over stays well short of "worker lost"."""
    first = start_server_process(tmp_path, server_env, heartbeat=5)
    second = ServerProcess(first.data_dir, first.env)  # its own port, started later
    go = tmp_path / "go"
    try:
        desk = agent_on(f"{first.url},{second.url}")
        user = LiveApi(first.url).login()
        assert user.wait(user.submit("echo on-first"), within=20)["stdout"] == "on-first\n"
        job_id = user.submit(f"echo before; while [ ! -e {go} ]; do sleep 0.05; done; echo after")
        user.wait(job_id, until=lambda job: job["stdout"] == "before\n")

        first.stop()
        second.start()
        go.touch()

        user = LiveApi(second.url).login()
        job = user.wait(job_id, within=20)
        assert (job["status"], job["stdout"], job["attempts"]) == ("completed", "before\nafter\n", 1)
        assert user.wait(user.submit("echo on-second"), within=20)["workerId"] == "desk-1"
        assert f"server {first.url} unreachable (" in desk.log() and f"; using {second.url}" in desk.log()
    finally:
        first.stop()
        second.stop()


@unix_only
def test_agent_py_run_uses_the_first_server_that_answers(server, user, start_agent, tmp_path, closed_url):
    start_agent("run-1")
    status, body = user.call("POST", "/api/auth/tokens", {"name": "failover"})
    assert status == 201, body
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "data.txt").write_text("sent\n")
    closed = closed_url()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(DISPATCH_API_TOKEN=body["token"], DISPATCH_SERVER=f"{closed},{server.url}",
               XDG_CACHE_HOME=str(tmp_path / "cache"))

    result = subprocess.run([sys.executable, str(ROOT / "agent.py"), "run", "--", "cat data.txt"], cwd=folder,
                            env=env, capture_output=True, text=True, timeout=60)

    assert (result.returncode, result.stdout) == (0, "sent\n"), result.stderr
    assert result.stderr.count(" unreachable (") == 1 and f"using {server.url}" in result.stderr
