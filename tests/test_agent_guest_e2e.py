"""End to end: real agents as good guests on a real server. The test plays the desktop's owner
through --idle-command, which reads the time of the last input from a file the test touches."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import LiveApi

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="jobs use /bin/sh and /proc")]

IDLE_MINUTES = 0.05  # 3 s


class Owner:
    """The desktop's owner: `type()` is a keystroke (the file's modification time is the last input)."""

    def __init__(self, folder):
        self.path = folder / "last-input"
        self.path.touch()
        os.utime(self.path, (0, 0))  # away since 1970
        self.command = f"echo $(( $(date +%s) - $(stat -c %Y {self.path}) ))"
        self._typing = threading.Event()

    def type(self) -> float:
        self.path.touch()
        return time.monotonic()

    def keep_typing(self) -> None:
        """Type twice a second until stop() (in a thread)."""

        def loop():
            while not self._typing.wait(0.5):
                self.type()

        self.type()
        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._typing.set()


@pytest.fixture
def owner(tmp_path):
    person = Owner(tmp_path)
    yield person
    person.stop()


SIGSTOP_BIT = 1 << (19 - 1)  # in the pending-signal masks of /proc/<pid>/status


def job_processes(job_id: str) -> dict:
    """{pid: (stopped, session)} of the live processes of the job (DISPATCH_JOB_ID in their
    environment). Stopped: state T, or a SIGSTOP pending while the process waits in the kernel (D),
    as a shell does for a child it started with vfork() that was stopped before it could exec."""
    needle = f"DISPATCH_JOB_ID={job_id}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/status") as f:
                pending = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        except OSError:
            continue
        stop_pending = int(pending["ShdPnd"], 16) & SIGSTOP_BIT or int(pending["SigPnd"], 16) & SIGSTOP_BIT
        if fields[0] not in ("Z", "X"):
            found[int(entry)] = (fields[0] == "T" or (fields[0] == "D" and bool(stop_pending)), int(fields[3]))
    return found


def all_stopped(job_id: str) -> dict:
    """The job's processes if there are some and every one is stopped, else {}."""
    processes = job_processes(job_id)
    return processes if processes and all(stopped for stopped, _ in processes.values()) else {}


def wait_until(predicate, within: float, message: str):
    deadline = time.monotonic() + within
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"gave up waiting for {message}"
        time.sleep(0.05)
    return value


def worker(user: LiveApi, worker_id: str) -> dict:
    status, body = user.call("GET", f"/api/workers/{worker_id}")
    assert status == 200, body
    return body["worker"]


COUNTING = ("setsid -w sh -c 'for i in $(seq 1 25); do echo child $i; sleep 0.1; done' &\n"
            "echo \"pids $$ $!\"\n"
            "for i in $(seq 1 25); do echo parent $i; sleep 0.1; done\n"
            "wait\n"
            "exit 7\n")


def test_the_owner_returns_the_whole_tree_stops_and_runs_on_once_they_have_gone(user, start_agent, owner):
    agent = start_agent("desk-1", "--only-when-idle", str(IDLE_MINUTES), "--idle-command", owner.command)
    agent.wait_for_log("the owner's keyboard and mouse are watched through --idle-command")
    job_id = user.submit(COUNTING)
    job = user.wait(job_id, until=lambda j: "parent 3\n" in j["stdout"] and "child 3\n" in j["stdout"])
    shell, child = map(int, re.search(r"pids (\d+) (\d+)", job["stdout"]).groups())

    returned = owner.type()
    stopped = wait_until(lambda: all_stopped(job_id), within=2.0, message="the whole tree to be stopped")
    took = time.monotonic() - returned
    assert took < 2.0, took
    assert {shell, child} <= stopped.keys()
    assert stopped[child][1] != stopped[shell][1]  # the setsid child left the job's session: stopped all the same
    assert user.wait(job_id, until=lambda j: j["suspended"], within=3)["status"] == "running"
    assert worker(user, "desk-1")["pausedReason"] == "owner active"
    time.sleep(0.5)  # what was read before the stop is still being sent
    frozen = user.status(job_id)["stdout"]
    time.sleep(1.0)
    assert user.status(job_id)["stdout"] == frozen and all_stopped(job_id)

    wait_until(lambda: not any(stopped for stopped, _ in job_processes(job_id).values()),
               within=IDLE_MINUTES * 60 + 5 - (time.monotonic() - returned), message="the tree to run on")
    assert time.monotonic() - returned >= IDLE_MINUTES * 60 - 1  # not before the owner had been away that long
    done = user.wait(job_id, within=15)

    assert (done["status"], done["exitCode"], done["suspended"], done["attempts"]) == ("failed", 7, False, 1)
    lines = done["stdout"].splitlines()
    assert [line for line in lines if line.startswith("parent")] == [f"parent {i}" for i in range(1, 26)]
    assert [line for line in lines if line.startswith("child")] == [f"child {i}" for i in range(1, 26)]
    assert done["stderr"] == ""
    assert f"job {job_id} suspended (owner active)" in agent.log()


def test_a_job_suspended_past_evict_after_finishes_on_another_desktop_at_no_cost(user, start_agent, owner):
    desk_a = start_agent("desk-a", "--only-when-idle", str(IDLE_MINUTES), "--evict-after", "0.05",
                         "--idle-command", owner.command)
    desk_a.wait_for_log("registered as worker desk-a")
    job_id = user.submit("for i in $(seq 1 20); do echo $i; sleep 0.1; done; echo \"done on $DISPATCH_WORKER_ID\"",
                         maxAttempts=1, retries=0)
    user.wait(job_id, until=lambda j: j["status"] == "running" and "2\n" in j["stdout"])

    owner.keep_typing()  # and never leaves again
    user.wait(job_id, until=lambda j: j["suspended"], within=3)
    evicted = user.wait(job_id, until=lambda j: j["status"] == "queued", within=3 + 5)
    assert evicted["error"] == "attempt 1 evicted from desk-a (suspended for more than 0.05 min (owner active)); requeued"
    assert job_processes(job_id) == {}  # its tree on desk-a is gone
    assert worker(user, "desk-a")["state"] == "paused"

    start_agent("desk-b")
    done = user.wait(job_id, within=15)

    assert (done["status"], done["exitCode"], done["workerId"], done["attempts"], done["error"]) == (
        "completed", 0, "desk-b", 2, None)
    assert done["stdout"] == "".join(f"{i}\n" for i in range(1, 21)) + "done on desk-b\n"
    assert "evicted" in desk_a.log()


def local_hours_from_now(start_hours: int, length_minutes: int) -> str:
    start = dt.datetime.now() + dt.timedelta(hours=start_hours)
    end = start + dt.timedelta(minutes=length_minutes)
    return f"{start:%H:%M}-{end:%H:%M}"


def test_outside_its_hours_a_desktop_takes_no_job_and_shows_why(user, start_agent):
    hours = local_hours_from_now(2, 60)
    start_agent("desk-1", "--hours", hours).wait_for_log("registered as worker desk-1")

    shown = wait_until(lambda: (w := worker(user, "desk-1"))["state"] == "paused" and w, within=5,
                       message="the worker to show paused")
    assert shown["pausedReason"] == f"outside hours {hours}"
    job_id = user.submit("echo should not run")
    time.sleep(2)
    job = user.status(job_id)
    assert (job["status"], job["workerId"]) == ("queued", None)
    assert job["waitingFor"] == f"workers paused (outside hours {hours})"


def test_over_its_max_load_a_desktop_takes_no_job_and_shows_why(user, start_agent):
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # load that is not the farm's
    try:
        start_agent("desk-1", "--max-load", "0").wait_for_log("registered as worker desk-1")
        shown = wait_until(lambda: (w := worker(user, "desk-1"))["state"] == "paused" and w, within=20,
                           message="the worker to show paused")
        assert re.fullmatch(r"load [0-9.]+ > 0", shown["pausedReason"]), shown["pausedReason"]
        job_id = user.submit("echo should not run")
        time.sleep(2)
        assert user.status(job_id)["status"] == "queued"
    finally:
        spinner.kill()
        spinner.wait()


def test_only_when_idle_with_no_working_probe_refuses_to_start_and_says_why(start_agent):
    agent = start_agent("desk-1", "--only-when-idle", "10", "--idle-command", "exit 3")

    assert agent.process.wait(15) == 2
    assert "--only-when-idle needs to know when this computer last had keyboard or mouse input" in agent.log()
