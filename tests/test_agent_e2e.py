"""End to end: a real ``python dispatch.py`` and real ``python agent.py`` processes on loopback.

The agent is copied to a temp folder and run from there with its own --work-dir, as on a desktop.
The test talks to the server with urllib only, as a curl script would.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest

from conftest import REGISTRATION_TOKEN, ROOT, AgentProcess, LiveApi, start_server_process

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="jobs use /bin/sh and /proc")]

# --- fixtures: the processes -------------------------------------------------------------


# --- helpers ---------------------------------------------------------------------------------


def zip_bytes(entries: dict) -> bytes:
    """A zip from {name: content} or {name: (content, unix mode)}; the mode may make a symlink."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            content, mode = content if isinstance(content, tuple) else (content, 0o644 | stat.S_IFREG)
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            archive.writestr(info, content)
    return buffer.getvalue()


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by its new parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids, within: float = 3) -> list:
    """The pids still alive after `within` seconds."""
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def pids_in(text: str, label: str) -> list:
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith(label + " ")]


def claim_as_worker(server_url: str, worker_token: str) -> dict | None:
    """get-job with a worker's token and no run: a claim the agent itself never hears of."""
    request = urllib.request.Request(f"{server_url}/api/jobs/get-job", headers={"x-worker-token": worker_token})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["job"] if response.status == 200 else None


def iso_now() -> str:
    """Now, formatted as the server's timestamps (which compare as strings)."""
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def wait_until(predicate, within: float = 5, message: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {message}"
        time.sleep(0.05)


# --- tests -----------------------------------------------------------------------------------


def test_zip_job_runs_in_its_working_directory_and_reports_output_and_exit_code(user, start_agent):
    script = "#!/bin/sh\ncat sub/data.txt\necho \"job=$DISPATCH_JOB_ID worker=$DISPATCH_WORKER_ID\"\n" \
             "echo \"registration token: ${DISPATCH_REGISTRATION_TOKEN:-hidden}\"\nprintf 'bad \\377 byte\\n'\n" \
             "echo oops >&2\nexit 3\n"
    url = user.upload(zip_bytes({"proj/run.sh": (script, 0o755 | stat.S_IFREG),
                                   "proj/sub/data.txt": "hello from zip\n"}))
    agent = start_agent("desk-1")
    agent.wait_for_log("registered as worker desk-1")

    submitted = time.monotonic()
    job_id = user.submit("./run.sh", fileUrl=url, workingDirectory="proj")
    job = user.wait(job_id)

    assert time.monotonic() - submitted < 3  # an idle agent is parked in a long-poll: no poll interval
    assert (job["status"], job["exitCode"], job["workerId"]) == ("failed", 3, "desk-1")
    assert job["stdout"] == (f"hello from zip\njob={job_id} worker=desk-1\nregistration token: hidden\n"
                             "bad \ufffd byte\n")
    assert job["stderr"] == "oops\n"
    wait_until(lambda: not any((agent.work_dir / "jobs").iterdir()), message="the job dir to be removed")
    assert f"job {job_id} finished: exit code 3" in agent.log()


def test_an_idle_agent_skips_heartbeats_while_its_poll_waits_and_stays_online(server, user, start_agent):
    """The server says a waiting get-job keeps the worker alive (pollKeepsAlive), so an idle agent
    sends no heartbeat after its first ones: a farm of idle desktops costs the server their polls.
    A running job's lease is still renewed by heartbeats."""
    start_agent("desk-1")
    wait_until(lambda: user.call("GET", "/api/workers/desk-1")[0] == 200, message="the agent to register")
    time.sleep(0.5)
    beats_at_start = server.log().count("POST /api/workers/heartbeat ")
    time.sleep(4)  # four one-second intervals, where an agent that did not skip would send four

    assert server.log().count("POST /api/workers/heartbeat ") == beats_at_start
    assert user.call("GET", "/api/workers/desk-1")[1]["worker"]["status"] == "online"
    job = user.wait(user.submit("sleep 2.5; echo done"))
    assert (job["status"], job["stdout"]) == ("completed", "done\n")
    assert server.log().count("POST /api/workers/heartbeat ") >= beats_at_start + 2


def test_output_is_visible_while_the_job_runs(user, start_agent, tmp_path):
    go = tmp_path / "go"
    start_agent("desk-1")
    job_id = user.submit(f"echo first; echo warming >&2; while [ ! -e {go} ]; do sleep 0.05; done; echo second")

    # stdout and stderr are read by separate threads, so they may arrive in separate batches
    running = user.wait(job_id, until=lambda job: "first" in job["stdout"] and "warming" in job["stderr"])
    assert running["status"] == "running"
    assert running["stdout"] == "first\n" and running["stderr"] == "warming\n"
    go.touch()

    job = user.wait(job_id)
    assert (job["status"], job["exitCode"], job["stdout"]) == ("completed", 0, "first\nsecond\n")


def test_a_second_zip_job_uses_the_cached_download(user, start_agent):
    url = user.upload(zip_bytes({"data.txt": "cached\n"}))
    agent = start_agent("desk-1", "--verbose")

    for _ in range(2):
        job = user.wait(user.submit("cat data.txt", fileUrl=url))
        assert (job["status"], job["stdout"]) == ("completed", "cached\n")

    assert len(list((agent.work_dir / "cache").glob("*.bin"))) == 1
    assert agent.log().count("is cached") == 1


def test_timeout_kills_the_whole_tree_including_a_setsid_child(user, start_agent):
    command = (
        "sh -c 'echo child $$; exec sleep 600' &\n"
        f"'{sys.executable}' -c 'import os, time; os.setsid(); print(\"setsid\", os.getpid(), flush=True); "
        "time.sleep(600)' &\n"
        "echo main $$\n"
        "exec sleep 600\n"
    )
    start_agent("desk-1")
    job_id = user.submit(command, timeout=2)

    job = user.wait(job_id)

    assert (job["status"], job["exitCode"]) == ("failed", 124)
    assert "timed out after 2 s" in job["error"]
    assert "dispatch-agent: timed out after 2 s" in job["stderr"]
    pids = [pid for label in ("main", "child", "setsid") for pid in pids_in(job["stdout"], label)]
    assert len(pids) == 3, job["stdout"]
    assert wait_gone(pids) == []


def children_of(pid: int) -> dict:
    """{child pid: its state letter} over every thread of `pid`."""
    children = {}
    for thread in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{thread}/children") as f:
            for child in map(int, f.read().split()):
                try:
                    with open(f"/proc/{child}/stat") as stat_file:
                        children[child] = stat_file.read().rsplit(")", 1)[1].split()[0]
                except FileNotFoundError:  # reaped meanwhile
                    pass
    return children


def test_orphans_a_job_leaves_are_the_agents_children_killed_and_reaped(user, start_agent):
    """Linux: the agent is its jobs' subreaper. An orphan that ended by itself and one still running
    when the job ends are both its children; the second is killed, and neither is left a zombie."""
    agent = start_agent("desk-1")
    job_id = user.submit("(setsid sh -c 'echo quick $$; sleep 0.2' &);"
                         " (setsid sh -c 'echo lingering $$; exec sleep 600' &); sleep 1.5; echo done")
    running = user.wait(job_id, until=lambda job: "lingering" in job["stdout"] and "quick" in job["stdout"])
    [quick], [lingering] = pids_in(running["stdout"], "quick"), pids_in(running["stdout"], "lingering")
    assert {quick, lingering} <= children_of(agent.process.pid).keys()  # adopted by the agent, not init

    job = user.wait(job_id)

    assert (job["status"], job["stdout"].splitlines()[-1]) == ("completed", "done")
    assert wait_gone([lingering]) == []
    wait_until(lambda: "Z" not in children_of(agent.process.pid).values(), message="no zombie left")
    assert not {quick, lingering} & children_of(agent.process.pid).keys()


def test_background_child_holding_the_pipe_does_not_hold_the_job(user, start_agent):
    start_agent("desk-1")
    started = time.monotonic()
    job_id = user.submit("sleep 600 & echo background $!; echo bye; exit 0")

    job = user.wait(job_id)

    assert time.monotonic() - started < 6
    assert (job["status"], job["exitCode"]) == ("completed", 0)
    assert job["stdout"].endswith("bye\n")
    assert wait_gone(pids_in(job["stdout"], "background")) == []


def test_zip_slip_and_symlink_archives_fail_and_write_nothing_outside(user, start_agent, tmp_path):
    marker = f"escaped-{uuid.uuid4().hex}"
    slip = user.upload(zip_bytes({"ok.txt": "fine", f"../../{marker}": "pwned"}), "slip.zip")
    link = user.upload(zip_bytes({"passwd": ("/etc/passwd", 0o777 | stat.S_IFLNK)}), "link.zip")
    start_agent("desk-1")

    slipped = user.wait(user.submit("cat ok.txt", fileUrl=slip))
    linked = user.wait(user.submit("cat passwd", fileUrl=link))

    for job, reason in ((slipped, "climbs out with '..'"), (linked, "is a symbolic link")):
        assert (job["status"], job["exitCode"]) == ("failed", 125)
        assert job["error"].startswith("unsafe archive: ") and reason in job["error"]
        assert job["stderr"] == f"dispatch-agent: {job['error']}\n"
        assert job["stdout"] == ""
    assert not list(tmp_path.rglob(marker))
    assert not [p for p in tmp_path.rglob("passwd") if p.is_symlink()]


def test_two_agents_share_one_queue(user, start_agent):
    start_agent("desk-a")
    start_agent("desk-b")
    job_ids = [user.submit("sleep 0.5; echo $DISPATCH_WORKER_ID") for _ in range(4)]

    jobs = [user.wait(job_id) for job_id in job_ids]

    assert all(job["status"] == "completed" and job["stdout"] == f"{job['workerId']}\n" for job in jobs)
    assert {job["workerId"] for job in jobs} == {"desk-a", "desk-b"}


def test_concurrency_runs_jobs_side_by_side(user, start_agent, tmp_path):
    go = tmp_path / "go"
    start_agent("desk-1", "--concurrency", "2", "--cpus", "2")
    job_ids = [user.submit(f"echo up; while [ ! -e {go} ]; do sleep 0.05; done") for _ in range(2)]

    for job_id in job_ids:  # both run at once: neither slot waits for the other
        user.wait(job_id, until=lambda job: job["stdout"] == "up\n")
    go.touch()

    assert [user.wait(job_id)["status"] for job_id in job_ids] == ["completed", "completed"]


def test_tags_route_jobs_to_workers_that_have_them(user, start_agent):
    start_agent("gpu-box", "--tags", "gpu,linux")
    plain = start_agent("plain-box")
    plain.wait_for_log("registered as worker plain-box")
    tagged = [user.submit("sleep 0.2", tags=["gpu"]) for _ in range(3)] + [
        user.submit("sleep 0.2", tags=["gpu", "linux"])]
    nowhere = user.submit("true", tags=["windows"])

    jobs = [user.wait(job_id) for job_id in tagged]

    assert [(job["status"], job["workerId"]) for job in jobs] == [("completed", "gpu-box")] * 4
    assert user.status(nowhere)["status"] == "queued"


def test_restart_reuses_the_saved_worker_token(user, start_agent, tmp_path):
    work_dir = tmp_path / "work"
    first = start_agent("desk-1", work_dir=work_dir)
    assert user.wait(user.submit("echo one"))["status"] == "completed"
    assert first.stop() == 0
    token_file = work_dir / "worker.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = json.loads(token_file.read_text())["token"]
    restarted_at = iso_now()

    second = start_agent("desk-1", work_dir=work_dir)

    second.wait_for_log("using the saved worker token for desk-1")
    wait_until(lambda: user.call("GET", "/api/workers/desk-1")[1]["worker"]["lastHeartbeat"] > restarted_at,
               message="a heartbeat with the saved token")
    assert second.log().count("registered as worker") == 1  # only the first run registered
    assert "refused" not in second.log()
    assert token not in second.log() and REGISTRATION_TOKEN not in second.log()


def test_a_job_submitted_right_after_an_agent_restart_runs(user, start_agent, tmp_path):
    work_dir = tmp_path / "work"
    first = start_agent("desk-1", work_dir=work_dir)
    first.wait_for_log("registered as worker desk-1")
    assert first.stop() == 0  # stopped while parked in a long-poll

    start_agent("desk-1", work_dir=work_dir).wait_for_log("using the saved worker token")
    job = user.wait(user.submit("echo two"))

    assert (job["status"], job["workerId"], job["stdout"]) == ("completed", "desk-1", "two\n")


def test_a_restarted_agent_kills_what_its_killed_predecessor_left_running(user, start_agent, tmp_path):
    work_dir = tmp_path / "work"
    first = start_agent("desk-1", work_dir=work_dir)
    job_id = user.submit("echo main $$; exec sleep 600")
    pid = pids_in(user.wait(job_id, until=lambda job: "main" in (job["stdout"] or ""))["stdout"], "main")[0]
    first.process.kill()
    first.process.wait()
    assert alive(pid)

    second = start_agent("desk-1", work_dir=work_dir)

    assert wait_gone([pid], within=5) == []
    second.wait_for_log("killed 1 process(es) left behind")
    # Its heartbeat's runningJobs does not list the lost attempt, so the server gives the job back.
    rerun = user.wait(job_id, until=lambda job: job["attempts"] == 2 and job["status"] == "running")
    assert rerun["workerId"] == "desk-1"


def test_a_claim_whose_answer_never_reached_the_agent_goes_back_to_the_queue(server, user, start_agent, tmp_path):
    go = tmp_path / "go"
    agent = start_agent("desk-1")
    busy = user.submit(f"while [ ! -e {go} ]; do sleep 0.05; done")  # keeps the agent's one slot from polling
    user.wait(busy, until=lambda job: job["status"] == "running")
    worker_token = json.loads((agent.work_dir / "worker.json").read_text())["token"]
    lost = user.submit("echo once", maxAttempts=1)

    assert claim_as_worker(server.url, worker_token)["jobId"] == lost

    # Within three one-second heartbeats the agent's lease, which does not list it, gives it back.
    user.wait(lost, until=lambda job: job["status"] == "queued", within=4)
    go.touch()
    job = user.wait(lost)
    # maxAttempts=1: had the give-back counted as an attempt, the job would have failed instead.
    assert (job["status"], job["workerId"], job["stdout"]) == ("completed", "desk-1", "once\n")


def _outage_farm(tmp_path, server_env) -> tuple:
    """A server, a logged-in user and one agent, for tests that take the server (or agent) down.
    A five-second heartbeat: the outage stays well short of "worker lost" (three missed beats)."""
    server = start_server_process(tmp_path, server_env, heartbeat=5)
    folder = tmp_path / "desktop"
    folder.mkdir()
    shutil.copy(ROOT / "agent.py", folder / "agent.py")
    agent = AgentProcess(folder / "agent.py", server.url, "desk-1", folder / "work", []).start()
    return server, LiveApi(server.url).login(), agent


def test_result_reaches_the_server_after_it_was_down_when_the_job_finished(tmp_path, server_env):
    server, user, agent = _outage_farm(tmp_path, server_env)
    go = tmp_path / "go"
    try:
        job_id = user.submit(f"echo before; while [ ! -e {go} ]; do sleep 0.05; done; echo after; exit 7")
        user.wait(job_id, until=lambda job: job["stdout"] == "before\n")

        server.kill()
        go.touch()
        wait_until(lambda: list((agent.work_dir / "results").glob("*.json")), message="the result to be spooled")
        server.start()

        job = LiveApi(server.url).login().wait(job_id, within=20)
        assert (job["status"], job["exitCode"], job["stdout"]) == ("failed", 7, "before\nafter\n")
        wait_until(lambda: not list((agent.work_dir / "results").glob("*.json")), message="the spool to empty")
        assert "kept on disk, will retry" in agent.log()
    finally:
        agent.stop()
        server.stop()


def test_a_spooled_result_survives_an_agent_restart(tmp_path, server_env):
    server, user, agent = _outage_farm(tmp_path, server_env)
    go = tmp_path / "go"
    try:
        job_id = user.submit(f"while [ ! -e {go} ]; do sleep 0.05; done; echo done")
        user.wait(job_id, until=lambda job: job["status"] == "running")
        server.kill()
        go.touch()
        wait_until(lambda: list((agent.work_dir / "results").glob("*.json")), message="the result to be spooled")
        assert agent.stop() == 0

        server.start()
        agent.start()

        job = LiveApi(server.url).login().wait(job_id, within=20)
        assert (job["status"], job["exitCode"], job["stdout"]) == ("completed", 0, "done\n")
    finally:
        agent.stop()
        server.stop()


def test_first_stop_lets_the_running_job_finish(user, start_agent, tmp_path):
    go = tmp_path / "go"
    agent = start_agent("desk-1")
    job_id = user.submit(f"echo start; while [ ! -e {go} ]; do sleep 0.05; done; echo finished")
    user.wait(job_id, until=lambda job: job["stdout"] == "start\n")

    agent.signal(signal.SIGTERM)
    agent.wait_for_log("stopping: no new jobs; 1 running job(s) will finish")
    second_job = user.submit("echo never")
    time.sleep(0.3)
    assert agent.process.poll() is None and user.status(job_id)["status"] == "running"
    go.touch()

    assert agent.process.wait(10) == 0
    job = user.status(job_id)
    assert (job["status"], job["exitCode"], job["stdout"]) == ("completed", 0, "start\nfinished\n")
    assert user.status(second_job)["status"] == "queued"


def test_second_stop_kills_the_running_job_and_reports_it_failed(user, start_agent):
    agent = start_agent("desk-1")
    job_id = user.submit("echo main $$; exec sleep 600")
    pid = pids_in(user.wait(job_id, until=lambda job: "main" in (job["stdout"] or ""))["stdout"], "main")[0]

    agent.signal(signal.SIGTERM)
    agent.wait_for_log("stopping: no new jobs")
    agent.signal(signal.SIGTERM)

    assert agent.process.wait(10) == 0
    job = user.status(job_id)
    assert (job["status"], job["exitCode"]) == ("failed", 143)
    assert "the agent was stopped" in job["error"]
    assert wait_gone([pid]) == []


def test_cancelling_a_silent_job_kills_its_whole_tree_within_5_seconds(user, start_agent):
    command = (
        f"'{sys.executable}' -c 'import os, signal, sys, time; os.setsid(); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(\"stubborn\", os.getpid(), flush=True); time.sleep(600)' &\n"
        "echo main $$\n"
        "exec sleep 600\n"
    )
    agent = start_agent("desk-1")
    job_id = user.submit(command)
    stdout = user.wait(job_id, until=lambda job: "stubborn" in (job["stdout"] or "") and "main" in job["stdout"])["stdout"]
    pids = pids_in(stdout, "main") + pids_in(stdout, "stubborn")

    status, body = user.call("POST", "/api/jobs/cancel", {"jobId": job_id})
    cancelled_at = time.monotonic()

    assert status == 200, body
    assert wait_gone(pids, within=5) == []
    assert time.monotonic() - cancelled_at < 5
    agent.wait_for_log(f"job {job_id} is no longer ours")
    assert user.status(job_id)["status"] == "cancelled"


# --- where jobs run: resources, fair share, dependencies (test_scheduling.py has the API side) ---------


def submit_batch(user: LiveApi, jobs: list) -> list:
    status, body = user.call("POST", "/api/jobs/submit", {"jobs": jobs})
    assert status == 201, body
    return body["jobIds"]


def most_at_once(log: Path) -> int:
    """The most jobs running at the same moment, from their "+" and "-" lines."""
    running = peak = 0
    for line in log.read_text().splitlines():
        running += 1 if line.startswith("+") else -1
        peak = max(peak, running)
    return peak


def test_a_4_cpu_agent_never_runs_three_2_cpu_jobs_at_once(user, start_agent, tmp_path):
    log = tmp_path / "running.log"
    start_agent("desk-1", "--cpus", "4", "--concurrency", "3")
    command = f'echo "+ $DISPATCH_CPUS" >> {log}; sleep 0.5; echo - >> {log}'
    job_ids = submit_batch(user, [{"command": command, "cpus": 2}] * 3)

    jobs = [user.wait(job_id) for job_id in job_ids]

    assert [job["status"] for job in jobs] == ["completed"] * 3
    assert most_at_once(log) == 2  # side by side, but a third slot never took the third job
    assert [line for line in log.read_text().splitlines() if line.startswith("+")] == ["+ 2"] * 3


def test_a_job_that_needs_more_memory_than_any_agent_offers_waits_and_says_why(user, start_agent):
    start_agent("desk-1", "--memory-mb", "1000")
    too_big = user.submit("true", memoryMb=5000)

    fits = user.wait(user.submit("true", memoryMb=1000))

    assert fits["status"] == "completed"
    job = user.status(too_big)
    assert (job["status"], job["waitingFor"]) == ("queued", "needs 5000 MB of memory; the largest online worker offers 1000")


def test_another_persons_job_starts_within_two_claims_of_a_long_queue(server, user, start_agent):
    def person(email: str) -> LiveApi:
        status, body = user.call("POST", "/api/users", {"email": email, "password": "password-1", "role": "user"})
        assert status == 201, body
        return LiveApi(server.url).login(email, "password-1")

    ann, bob = person("ann@example.com"), person("bob@example.com")
    start_agent("desk-1")
    anns = submit_batch(ann, [{"command": "sleep 0.1"}] * 200)
    user.wait(anns[2], until=lambda job: job["status"] != "queued")  # the agent is busy with ann's queue
    bobs = bob.submit("true")

    job = bob.wait(bobs)
    started = [ann.status(j)["startedAt"] for j in anns]

    assert job["status"] == "completed"
    assert len([s for s in started if s and job["createdAt"] < s < job["startedAt"]]) <= 1
    assert None in started  # ann's queue was far from done


def test_a_chain_runs_in_order_and_a_failure_cancels_the_rest(user, start_agent):
    start_agent("desk-1", "--cpus", "4", "--concurrency", "4")
    a, b, c = submit_batch(user, [{"command": "sleep 0.3"}, {"command": "sleep 0.3", "after": ["#0"]},
                                  {"command": "true", "after": ["#1"]}])
    x, y, z = submit_batch(user, [{"command": "exit 3"}, {"command": "true", "after": ["#0"]},
                                  {"command": "true", "after": ["#1"]}])

    chain = [user.wait(job_id) for job_id in (a, b, c)]
    failed = [user.wait(job_id) for job_id in (x, y, z)]

    assert [job["status"] for job in chain] == ["completed"] * 3
    assert chain[0]["completedAt"] <= chain[1]["startedAt"] and chain[1]["completedAt"] <= chain[2]["startedAt"]
    assert [(job["status"], job["error"]) for job in failed] == [
        ("failed", "exited with code 3"), ("cancelled", f"parent {x} failed"), ("cancelled", f"parent {y} cancelled")]
    assert failed[1]["startedAt"] is None and failed[2]["startedAt"] is None


def test_a_fan_in_of_100_parents_starts_once_after_the_last(user, start_agent):
    start_agent("desk-1", "--cpus", "4", "--concurrency", "4")
    start_agent("desk-2", "--cpus", "4", "--concurrency", "4")
    *parts, merge = submit_batch(user, [{"command": "sleep 0.05"}] * 100
                                 + [{"command": "echo merged", "after": [f"#{n}" for n in range(100)]}])

    job = user.wait(merge, within=60)
    last_part = max(user.status(part)["completedAt"] for part in parts)

    assert (job["status"], job["stdout"], job["attempts"]) == ("completed", "merged\n", 1)
    assert job["startedAt"] >= last_part


def test_a_deleted_worker_stays_deleted_its_agent_stops_and_says_how_to_add_it_again(user, start_agent):
    desk = start_agent("desk-1")
    assert user.wait(user.submit("echo one"))["status"] == "completed"

    assert user.call("DELETE", "/api/workers/desk-1")[0] == 200

    assert desk.process.wait(15) == 2
    assert "no longer accepts worker 'desk-1'" in desk.log() and "worker.json" in desk.log()
    time.sleep(1.5)  # a heartbeat interval: it would have registered again by now
    assert user.call("GET", "/api/workers/desk-1")[0] == 404


def test_a_wrong_registration_token_stops_the_agent_with_one_sentence(server, tmp_path):
    folder = tmp_path / "desktop"
    folder.mkdir()
    shutil.copy(ROOT / "agent.py", folder / "agent.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    result = subprocess.run([sys.executable, str(folder / "agent.py"), "--server", server.url, "--token", "wrong",
                             "--work-dir", str(folder / "work")], capture_output=True, text=True, timeout=30, env=env)

    assert result.returncode == 2
    assert "refused the registration token" in result.stderr and "Traceback" not in result.stderr


def test_a_cleanly_stopped_agent_shows_offline_at_once(user, start_agent):
    desk = start_agent("desk-1")
    wait_until(lambda: user.call("GET", "/api/workers/desk-1")[0] == 200, message="the agent to register")

    assert desk.stop() == 0

    assert user.call("GET", "/api/workers/desk-1")[1]["worker"]["status"] == "offline"
