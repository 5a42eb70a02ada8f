"""agent.py without dispatch.py: run_job() on real processes, poll_once() against a small stdlib fake
server (backoff, Retry-After, registration, the token's origin, the result spool), and the config."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import socket
import stat
import sys
import threading
import time
import urllib.parse
import uuid
import zipfile
from pathlib import Path

import pytest

import agent

unix_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/bin/sh commands and /proc")


# --- run_job ---------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_gone(pids, within: float = 3) -> list:
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


class Sink:
    """A send_output that records batches, and can fail the way a server does."""

    def __init__(self, fail=None):
        self.batches = []
        self.fail = fail

    def __call__(self, stream: str, text: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.batches.append((stream, text))

    def text(self, stream: str) -> str:
        return "".join(text for s, text in self.batches if s == stream)


def run(tmp_path: Path, command: str, *, timeout: float = 10, sink=None, halt=None) -> agent.JobResult:
    marker = f"test-{uuid.uuid4().hex}/job/"
    env = dict(os.environ, **{agent.MARKER_ENV: marker})
    return agent.run_job(command, tmp_path, env=env, marker=marker, timeout=timeout,
                         send_output=sink or Sink(), halt=halt or threading.Event())


@pytest.fixture(params=["selector", "threads"])
def pipe_reader(request, monkeypatch):
    """Run the test with each job's pipes read through a selector (Unix), then by threads (Windows)."""
    if request.param == "threads":
        monkeypatch.setattr(agent, "_PipeSelector", agent._PipeThreads)


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
@unix_only
def test_output_is_streamed_complete_in_order_and_in_bounded_batches(tmp_path, pipe_reader):
    sink = Sink()
    command = f"'{sys.executable}' -c \"import sys\nfor i in range(150000): print(i)\nprint('done', file=sys.stderr)\""

    result = run(tmp_path, command, sink=sink)

    assert (result.exit_code, result.stdout, result.stderr) == (0, "", "")
    assert sink.text("stdout") == "".join(f"{i}\n" for i in range(150000))
    assert sink.text("stderr") == "done\n"
    assert max(len(text) for _, text in sink.batches) <= agent.OUTPUT_BATCH_CHARS


@unix_only
def test_a_character_split_across_reads_survives_and_bad_bytes_are_replaced(tmp_path, pipe_reader):
    sink = Sink()

    run(tmp_path, r"printf '\303'; sleep 0.3; printf '\251 \377\n'", sink=sink)

    assert sink.text("stdout") == "\u00e9 \ufffd\n"


@unix_only
def test_a_command_that_closed_its_output_is_still_waited_for_and_its_exit_seen(tmp_path, pipe_reader):
    sink = Sink()

    result = run(tmp_path, "echo early; exec >&- 2>&-; sleep 0.3; exit 3", sink=sink)

    assert (result.exit_code, sink.text("stdout") + result.stdout) == (3, "early\n")
    assert 0.3 <= result.duration < 1  # not cut short, nor left to the pipes' grace


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
@unix_only
def test_a_background_child_holding_the_pipes_does_not_hold_the_result(tmp_path, pipe_reader):
    sink = Sink()

    result = run(tmp_path, "sleep 600 & echo background $!; exit 5", sink=sink)

    assert result.exit_code == 5
    [pid] = [int(line.split()[1]) for line in (sink.text("stdout") + result.stdout).splitlines()]
    assert wait_gone([pid]) == []
    assert result.duration < agent.PIPE_GRACE_SECONDS + 1


@unix_only
def test_death_by_signal_is_reported_as_a_shell_would(tmp_path):
    assert run(tmp_path, "kill -9 $$").exit_code == 137


def test_exit_codes_are_reported_as_a_shell_shows_them():
    assert agent._exit_code(3) == 3
    assert agent._exit_code(-9) == 137  # killed by SIGKILL
    assert agent._exit_code(3221225477) == -1073741819  # a Windows crash (0xC0000005), as cmd shows it


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
@unix_only
def test_timeout_kills_a_tree_that_ignores_sigterm(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "KILL_GRACE_SECONDS", 0.5)
    sink = Sink()
    command = "sh -c 'trap \"\" TERM; echo stubborn $$; exec sleep 600' & echo main $$; wait"

    result = run(tmp_path, command, timeout=0.5, sink=sink)

    assert result.exit_code == agent.EXIT_TIMEOUT
    assert result.error == "timed out after 0.5 s; the process tree was killed"
    assert sink.text("stderr") + result.stderr == f"dispatch-agent: {result.error}\n"
    pids = [int(line.split()[1]) for line in sink.text("stdout").splitlines()]
    assert len(pids) == 2 and wait_gone(pids) == []
    assert result.duration < 3


@unix_only
def test_halt_kills_the_job_and_says_so(tmp_path):
    halt = threading.Event()
    threading.Timer(0.3, halt.set).start()

    result = run(tmp_path, "sleep 600", halt=halt)

    assert result.exit_code == agent.EXIT_STOPPED
    assert result.error == "the agent was stopped; the process tree was killed"


@unix_only
def test_a_lost_job_is_killed_and_no_result_is_made(tmp_path):
    pids = []

    def send(stream, text):
        pids.append(int(text))
        raise agent.JobLost("cancelled")

    with pytest.raises(agent.JobLost):
        run(tmp_path, "echo $$; exec sleep 600", sink=send)

    assert len(pids) == 1 and wait_gone(pids) == []


@unix_only
def test_a_silent_job_still_learns_that_it_was_cancelled(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "OUTPUT_PROBE_SECONDS", 0.2)
    started = time.monotonic()

    with pytest.raises(agent.JobLost):
        run(tmp_path, "sleep 600", sink=Sink(fail=agent.JobLost("cancelled")))

    assert time.monotonic() - started < 3


@unix_only
def test_output_the_server_could_not_take_comes_back_bounded_with_the_result(tmp_path):
    sink = Sink(fail=agent.ServerUnavailable("down"))

    result = run(tmp_path, f"'{sys.executable}' -c \"print('x' * 300000)\"", sink=sink)

    assert result.exit_code == 0
    assert len(result.stdout) < agent.RESULT_OUTPUT_CHARS + 100
    assert result.stdout.startswith("x" * 1000) and result.stdout.endswith("x\n")
    assert "characters dropped" in result.stdout


@pytest.mark.slow
@unix_only
def test_a_job_printing_without_end_while_the_server_is_down_waits_instead_of_filling_memory(tmp_path):
    sink = Sink(fail=agent.ServerUnavailable("down"))

    result = run(tmp_path, "yes 0123456789abcdef", timeout=1, sink=sink)

    assert result.exit_code == agent.EXIT_TIMEOUT  # blocked on its full pipe, never finished
    assert len(result.stdout) < agent.RESULT_OUTPUT_CHARS + 100


# --- poll_once against a fake server ---------------------------------------------------------


class FakeServer:
    """A stdlib HTTP server answering from a table; records every request.

    An answer is (status, headers, body), or a function returning one, called when the request
    arrives (to act, e.g. send a heartbeat, while the agent waits for that answer)."""

    def __init__(self):
        self.requests = []
        self.routes = {}
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def handle_one(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                fake.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                      json.loads(body) if body else None))
                answers = fake.routes.get((self.command, path), [(404, {}, {"message": "no route"})])
                answer = answers.pop(0) if len(answers) > 1 else answers[0]
                status, headers, payload = answer() if callable(answer) else answer
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(0 if status == 204 else len(data)))
                self.end_headers()
                if status != 204:
                    self.wfile.write(data)

            do_GET = do_POST = handle_one

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def route(self, method: str, path: str, *answers) -> None:
        """Answer (status, headers, body) (or a function returning one) in turn; the last one repeats."""
        self.routes[(method, path)] = list(answers)

    def paths(self) -> list:
        return [(method, path.split("?")[0]) for method, path, _, _ in self.requests]

    def bodies(self, path: str) -> list:
        """The JSON bodies of the requests to `path`, in order."""
        return [body for _, request_path, _, body in self.requests if request_path.split("?")[0] == path]

    def queries(self, path: str) -> list:
        """The query parameters of the requests to `path`, in order, one value each."""
        return [dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request_path).query))
                for _, request_path, _, _ in self.requests if request_path.split("?")[0] == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def fake():
    server = FakeServer()
    server.route("POST", "/api/workers/register", (201, {}, {"success": True, "token": "worker-secret"}))
    server.route("POST", "/api/workers/heartbeat", (200, {}, {"success": True, "nextCheckIn": 30000}))
    server.route("POST", "/api/jobs/stream-output", (200, {}, {"success": True}))
    server.route("POST", "/api/jobs/submit-result", (200, {}, {"success": True}))
    yield server
    server.close()


@pytest.fixture
def make_agent(tmp_path):
    agents = []

    def make(server_url: str, **changes) -> agent.Agent:
        config = agent.Config(server=server_url, token="registration-secret", worker_id="desk-1",
                              work_dir=tmp_path / "work", **changes)
        worker = agent.Agent(config)
        worker.prepare()
        agents.append(worker)
        return worker

    yield make
    for worker in agents:
        worker.close()


def job_answer(**fields) -> tuple:
    job = {"jobId": "job-1", "command": "echo hi", "fileUrl": None, "fileId": None, "sha256": None,
           "workingDirectory": None, "timeout": 10, "attempt": 1, "tags": [], **fields}
    return 200, {}, {"success": True, "job": job}


def test_registers_then_long_polls_with_the_worker_token(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", (204, {}, b""))
    worker = make_agent(fake.url, tags=("gpu",))

    delay = worker.poll_once()

    assert 0 <= delay <= agent.POLL_FLOOR_SECONDS
    (_, _, register_headers, register), (_, _, _, heartbeat), (_, get_job_path, get_job_headers, _) = fake.requests
    assert register_headers["authorization"] == "Bearer registration-secret"
    assert register["workerId"] == "desk-1" and register["metadata"]["tags"] == ["gpu"]
    assert {"osType", "pythonVersion"} <= register["metadata"].keys() and register["cpuCount"] >= 1
    run = heartbeat["run"]
    assert re.fullmatch(r"[0-9a-f]{32}", run)
    assert (heartbeat["runningJobs"], heartbeat["polled"]) == ([], 0)  # sent before the first get-job
    assert get_job_path == f"/api/jobs/get-job?wait={agent.POLL_WAIT_SECONDS}&run={run}&poll=1"
    assert get_job_headers["x-worker-token"] == "worker-secret"


@pytest.mark.parametrize("status", [503, 429])
def test_a_busy_server_is_left_alone_for_at_least_its_retry_after(fake, make_agent, status):
    fake.route("GET", "/api/jobs/get-job", (status, {"Retry-After": "7"}, {"message": "busy"}))
    worker = make_agent(fake.url)

    first = worker.poll_once(now=100.0)
    asked = len(fake.requests)
    second = worker.poll_once(now=101.0)

    assert first >= 7
    assert second == pytest.approx(first - 1)
    assert len(fake.requests) == asked  # waiting, not asking


def test_backoff_grows_while_the_server_is_unreachable_and_never_spins(make_agent):
    with socket.socket() as probe:  # a port nobody listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = make_agent(f"http://127.0.0.1:{port}")
    now, delays = 0.0, []
    for _ in range(6):
        delays.append(worker.poll_once(now=now))
        now += delays[-1]

    assert delays[0] >= agent.BACKOFF_BASE_SECONDS / 2
    assert delays[-1] >= 4 * delays[0]


def test_a_refused_worker_token_stops_the_agent_instead_of_registering_again(fake, make_agent, caplog):
    """An admin deleted the worker: registering it again behind their back would undo that."""
    fake.route("GET", "/api/jobs/get-job", (401, {}, {"message": "unknown worker"}), (204, {}, b""))
    worker = make_agent(fake.url)

    assert worker.poll_once(now=0.0) is None
    assert worker.poll_once(now=100.0) is None

    assert fake.paths() == [("POST", "/api/workers/register"), ("POST", "/api/workers/heartbeat"),
                            ("GET", "/api/jobs/get-job")]
    assert isinstance(worker.fatal, agent.Fatal)
    assert "no longer accepts worker 'desk-1'" in caplog.text and "worker.json" in caplog.text


@pytest.mark.parametrize("status, says", [
    (409, "worker id 'desk-1' is already registered"),
    (401, "refused the registration token"),
    (404, "--server must be the dispatch server's address"),
])
def test_a_registration_that_retrying_cannot_fix_stops_the_agent_and_says_what_to_change(
        fake, make_agent, caplog, status, says):
    fake.route("POST", "/api/workers/register", (status, {}, {"message": "no"}))
    worker = make_agent(fake.url)

    assert worker.poll_once(now=0.0) is None

    assert fake.paths() == [("POST", "/api/workers/register")]
    assert says in str(worker.fatal) and caplog.text.count(says) == 1
    assert "registration-secret" not in caplog.text


def test_an_unreachable_server_is_logged_once_not_per_retry(make_agent, caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = make_agent(f"http://127.0.0.1:{port}")
    now = 0.0
    for _ in range(4):
        now += worker.poll_once(now=now)

    assert caplog.text.count("cannot reach the server") == 1
    assert "heartbeat failed" not in caplog.text


def test_the_saved_token_is_reused_by_the_next_agent_on_the_same_work_dir(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", (204, {}, b""))
    first = make_agent(fake.url)
    first.poll_once()
    first.close()

    make_agent(fake.url).poll_once()

    assert fake.paths() == [("POST", "/api/workers/register"), ("POST", "/api/workers/heartbeat"),
                            ("GET", "/api/jobs/get-job"), ("POST", "/api/workers/heartbeat"),
                            ("GET", "/api/jobs/get-job")]
    token_file = first.config.work_dir / "worker.json"
    assert os.name == "nt" or stat.S_IMODE(token_file.stat().st_mode) == 0o600


def zip_of(name: str, content: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


def run_one_job(worker: agent.Agent, fake: FakeServer) -> dict:
    """poll_once() until the job was run and its result sent; the submit-result body."""
    worker.poll_once()
    results = fake.bodies("/api/jobs/submit-result")
    assert len(results) == 1, fake.paths()
    return results[0]


@unix_only
def test_the_worker_token_goes_only_to_the_servers_own_origin(fake, make_agent):
    other = FakeServer()
    try:
        other.route("GET", "/uploads/file-9/input.zip", (200, {}, zip_of("data.txt", "foreign\n")))
        fake.route("GET", "/api/jobs/get-job",
                   job_answer(command="cat data.txt", fileUrl=f"{other.url}/uploads/file-9/input.zip"),
                   (204, {}, b""))
        worker = make_agent(fake.url)

        result = run_one_job(worker, fake)

        assert result["exitCode"] == 0
        (_, _, headers, _), = other.requests
        assert "x-worker-token" not in headers
        assert list((worker.config.work_dir / "cache").iterdir()) == []  # not cached: not the server's file
    finally:
        other.close()


@unix_only
def test_a_redirect_is_not_followed_with_the_token(fake, make_agent):
    other = FakeServer()
    try:
        fake.route("GET", "/uploads/file-1/input.zip", (302, {"Location": f"{other.url}/steal"}, b""))
        fake.route("GET", "/api/jobs/get-job", job_answer(fileUrl=f"{fake.url}/uploads/file-1/input.zip"),
                   (204, {}, b""))
        worker = make_agent(fake.url)

        result = run_one_job(worker, fake)

        assert result["exitCode"] == agent.EXIT_SETUP_FAILED and "HTTP 302" in result["error"]
        assert other.requests == []
        download_headers = [h for _, path, h, _ in fake.requests if path.startswith("/uploads/")]
        assert download_headers[0]["x-worker-token"] == "worker-secret"
    finally:
        other.close()


@unix_only
def test_a_result_stays_spooled_until_the_server_takes_it(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", job_answer(command="echo hi; exit 4"), (204, {}, b""))
    fake.route("POST", "/api/jobs/submit-result", (503, {}, {"message": "down"}), (200, {}, {"success": True}))
    worker = make_agent(fake.url)
    spool = worker.config.work_dir / "results"

    worker.poll_once(now=0.0)
    assert [p.name for p in spool.iterdir()] == ["job-1.1.json"]
    assert json.loads((spool / "job-1.1.json").read_text())["exitCode"] == 4

    assert worker.heartbeat()["success"]
    assert fake.bodies("/api/workers/heartbeat")[-1]["runningJobs"] == ["job-1"]  # held until the server has it

    worker.poll_once(now=1000.0)  # past the backoff: the spool goes first

    assert list(spool.iterdir()) == []
    sent = fake.bodies("/api/jobs/submit-result")
    assert len(sent) == 2 and sent[1]["exitCode"] == 4 and sent[1]["attempt"] == 1
    worker.heartbeat()
    assert fake.bodies("/api/workers/heartbeat")[-1]["runningJobs"] == []


@unix_only
def test_a_refused_result_is_dropped_not_retried(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", job_answer(), (204, {}, b""))
    fake.route("POST", "/api/jobs/submit-result", (409, {}, {"message": "not yours"}))
    worker = make_agent(fake.url)

    worker.poll_once()
    worker.poll_once()

    assert list((worker.config.work_dir / "results").iterdir()) == []
    assert list((worker.config.work_dir / "jobs").iterdir()) == []
    assert fake.paths().count(("POST", "/api/jobs/submit-result")) == 1


@unix_only
def test_a_busy_agent_gets_its_next_job_with_the_result(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", job_answer(jobId="job-1"), (204, {}, b""))
    _, _, second = job_answer(jobId="job-2", command="exit 3")
    fake.route("POST", "/api/jobs/submit-result", (200, {}, {"success": True, "next": second["job"]}),
               (200, {}, {"success": True, "next": None}))
    worker = make_agent(fake.url)

    worker.poll_once()

    assert [body["jobId"] for body in fake.bodies("/api/jobs/submit-result")] == ["job-1", "job-2"]
    assert fake.bodies("/api/jobs/submit-result")[1]["exitCode"] == 3
    assert len(fake.queries("/api/jobs/get-job")) == 1
    run = fake.queries("/api/jobs/get-job")[0]["run"]
    assert fake.queries("/api/jobs/submit-result") == [
        {"next": "1", "wait": "0", "run": run, "poll": "2"}, {"next": "1", "wait": "0", "run": run, "poll": "3"}]
    worker.heartbeat()
    assert (fake.bodies("/api/workers/heartbeat")[-1]["polled"], worker._busy()) == (3, 0)


@unix_only
def test_a_stopping_agent_sends_its_last_result_without_asking_for_more(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", job_answer(command="echo bye"), (204, {}, b""))
    worker = make_agent(fake.url)

    def stop_while_it_runs():
        worker.request_stop()
        return 200, {}, {"success": True}

    fake.route("POST", "/api/jobs/stream-output", stop_while_it_runs)

    worker.poll_once()

    assert fake.queries("/api/jobs/submit-result") == [{}]  # the contract's plain submit-result
    assert fake.bodies("/api/jobs/submit-result")[0]["jobId"] == "job-1"


@unix_only
def test_a_restarted_agent_first_tells_the_server_which_jobs_it_still_holds(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", job_answer(jobId="job-done"), (204, {}, b""))
    fake.route("POST", "/api/jobs/submit-result", (503, {}, {"message": "down"}))
    first = make_agent(fake.url)
    first.poll_once(now=0.0)  # runs job-done; its result stays in the spool
    first.close()
    first_run = fake.queries("/api/jobs/get-job")[0]["run"]
    fake.requests.clear()

    make_agent(fake.url).poll_once(now=0.0)

    (method, path, _, body), *later = fake.requests
    assert (method, path) == ("POST", "/api/workers/heartbeat")
    assert body["runningJobs"] == ["job-done"]  # held until the server takes its result
    assert body["polled"] == 0 and body["run"] != first_run  # a new run: the server gives back the old one's others
    assert later[0][1] == "/api/jobs/submit-result"


def test_get_job_requests_are_numbered_once_across_slots(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", (204, {}, b""))
    worker = make_agent(fake.url)
    worker.poll_once()
    slots = [threading.Thread(target=worker.poll_once) for _ in range(4)]
    for slot in slots:
        slot.start()
    for slot in slots:
        slot.join()

    queries = fake.queries("/api/jobs/get-job")
    assert sorted(int(query["poll"]) for query in queries) == [1, 2, 3, 4, 5]
    assert len({query["run"] for query in queries}) == 1
    worker.heartbeat()
    assert fake.bodies("/api/workers/heartbeat")[-1]["polled"] == 5  # every answer handled


@unix_only
def test_a_heartbeat_never_counts_a_poll_whose_job_is_not_listed_yet(fake, make_agent, monkeypatch):
    worker = make_agent(fake.url)
    seen = []  # (moment, heartbeat body): a heartbeat sent at each point where the race could bite

    def heartbeat_at(moment: str) -> None:
        worker.heartbeat()
        seen.append((moment, fake.bodies("/api/workers/heartbeat")[-1]))

    def job_after_a_heartbeat():
        heartbeat_at("get-job in flight")
        return job_answer()

    def output_after_a_heartbeat():
        heartbeat_at("job running")
        return 200, {}, {"success": True}

    listing = agent._Job.from_api

    def job_read_after_a_heartbeat(data):
        heartbeat_at("answer received")
        return listing(data)

    fake.route("GET", "/api/jobs/get-job", job_after_a_heartbeat, (204, {}, b""))
    fake.route("POST", "/api/jobs/stream-output", output_after_a_heartbeat)
    monkeypatch.setattr(agent._Job, "from_api", job_read_after_a_heartbeat)

    worker.poll_once()
    heartbeat_at("result delivered")
    worker.poll_once()
    heartbeat_at("next poll answered")

    run = fake.queries("/api/jobs/get-job")[0]["run"]
    assert all(body["run"] == run for body in fake.bodies("/api/workers/heartbeat"))
    assert [(moment, body["polled"], body["runningJobs"]) for moment, body in seen] == [
        ("get-job in flight", 0, []),
        ("answer received", 0, []),  # job-1 is not listed yet, so poll 1 does not count as answered
        ("job running", 1, ["job-1"]),
        ("result delivered", 2, []),  # the result asked for the next job (next=1): poll 2, answered without one
        ("next poll answered", 3, []),
    ]


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
@unix_only
def test_output_and_result_say_how_long_the_command_has_been_running_not_the_download(fake, make_agent):
    def slow_download():
        time.sleep(0.6)  # counted by the lease, not by the job's clock
        return 200, {}, b"input"

    fake.route("GET", "/uploads/file-1/input.txt", slow_download)
    fake.route("GET", "/api/jobs/get-job",
               job_answer(command="cat input.txt; echo; sleep 0.8; echo two", fileUrl="/uploads/file-1/input.txt"),
               (204, {}, b""))
    worker = make_agent(fake.url)

    result = run_one_job(worker, fake)

    outputs = [body for body in fake.bodies("/api/jobs/stream-output") if body["data"]]
    assert "".join(body["data"] for body in outputs) == "input\ntwo\n"
    running_for = [body["runningFor"] for body in outputs]
    assert running_for == sorted(running_for) and running_for[0] < 0.5
    assert running_for[-1] - running_for[0] > 0.5
    assert result["exitCode"] == 0 and running_for[-1] <= result["runningFor"] < 0.6 + 0.8 + 0.5
    assert all(isinstance(body["runningFor"], float) for body in fake.bodies("/api/jobs/stream-output"))


@unix_only
def test_the_file_id_is_the_download_cache_key(fake, make_agent):
    content = zip_of("data.txt", "cached\n")
    file_id = f"file-{uuid.uuid4().hex}"
    url = f"{fake.url}/any/path/input.zip"  # the agent does not read ids out of URLs
    fake.route("GET", "/any/path/input.zip", (200, {}, content))
    fake.route("GET", "/api/jobs/get-job",
               job_answer(jobId="job-1", command="cat data.txt", fileUrl=url, fileId=file_id,
                          sha256=hashlib.sha256(content).hexdigest()),
               job_answer(jobId="job-2", command="cat data.txt", fileUrl=url, fileId=file_id,
                          sha256=hashlib.sha256(content).hexdigest()),
               job_answer(jobId="job-3", command="cat data.txt", fileUrl=url),  # no fileId: not cached
               (204, {}, b""))
    worker = make_agent(fake.url)

    for _ in range(3):
        worker.poll_once()

    assert [body["exitCode"] for body in fake.bodies("/api/jobs/submit-result")] == [0, 0, 0]
    output = {}
    for body in fake.bodies("/api/jobs/stream-output"):
        output[body["jobId"]] = output.get(body["jobId"], "") + body["data"]
    assert output == {"job-1": "cached\n", "job-2": "cached\n", "job-3": "cached\n"}
    assert fake.paths().count(("GET", "/any/path/input.zip")) == 2  # job-2 used the cached copy
    assert [p.name for p in (worker.config.work_dir / "cache").iterdir()] == [f"{file_id}.bin"]


@unix_only
def test_an_input_that_does_not_match_its_sha256_fails_the_job_without_running_it(fake, make_agent, monkeypatch):
    monkeypatch.setattr(agent, "DOWNLOAD_ATTEMPTS", 2)
    content = zip_of("data.txt", "tampered\n")
    expected = hashlib.sha256(b"what was uploaded").hexdigest()
    fake.route("GET", "/uploads/file-1/input.zip", (200, {}, content))
    fake.route("GET", "/api/jobs/get-job",
               job_answer(command="echo ran", fileUrl="/uploads/file-1/input.zip", fileId="file-1", sha256=expected),
               (204, {}, b""))
    worker = make_agent(fake.url)

    result = run_one_job(worker, fake)

    assert result["exitCode"] == agent.EXIT_SETUP_FAILED
    assert result["error"].startswith(f"the input's sha256 did not match: expected {expected}, got "
                                      f"{hashlib.sha256(content).hexdigest()}")
    assert (result["stdout"], result["stderr"]) == ("", f"dispatch-agent: {result['error']}\n")
    assert "runningFor" not in result  # the command never started
    assert fake.bodies("/api/jobs/stream-output") == []
    assert fake.paths().count(("GET", "/uploads/file-1/input.zip")) == 2  # downloaded again before giving up
    assert list((worker.config.work_dir / "cache").iterdir()) == []


@unix_only
def test_a_download_that_does_not_match_its_sha256_is_fetched_again(fake, make_agent):
    content = zip_of("data.txt", "intact\n")
    fake.route("GET", "/uploads/file-1/input.zip", (200, {}, content[:-10]), (200, {}, content))
    fake.route("GET", "/api/jobs/get-job",
               job_answer(command="cat data.txt", fileUrl="/uploads/file-1/input.zip", fileId="file-1",
                          sha256=hashlib.sha256(content).hexdigest().upper()),
               (204, {}, b""))
    worker = make_agent(fake.url)

    result = run_one_job(worker, fake)

    assert result["exitCode"] == 0
    assert "".join(body["data"] for body in fake.bodies("/api/jobs/stream-output")) == "intact\n"
    assert fake.paths().count(("GET", "/uploads/file-1/input.zip")) == 2
    assert (worker.config.work_dir / "cache" / "file-1.bin").read_bytes() == content


def test_one_work_dir_serves_one_agent(fake, make_agent):
    make_agent(fake.url)

    with pytest.raises(agent.AgentError, match="another agent is already using"):
        make_agent(fake.url)


# --- config ----------------------------------------------------------------------------------


def test_flags_win_over_the_environment_which_wins_over_defaults():
    environ = {"DISPATCH_SERVER": "http://env:1", "DISPATCH_REGISTRATION_TOKEN": "env-token",
               "DISPATCH_TAGS": "gpu, linux,,", "DISPATCH_CONCURRENCY": "3"}

    config = agent.parse_config(["--server", "http://flag:2/", "--concurrency", "2"], environ)

    assert (config.server, config.token, config.tags, config.concurrency) == (
        "http://flag:2", "env-token", ("gpu", "linux"), 2)
    assert config.work_dir == Path("~/.dispatch-agent").expanduser()
    assert config.worker_id  # the hostname


def test_the_agent_offers_its_cores_80_percent_of_its_memory_and_no_gpu_unless_told():
    base = ["--server", "http://lanbox:3000", "--token", "t"]

    default = agent.parse_config(base, {})
    told = agent.parse_config([*base, "--cpus", "3", "--gpus", "1"], {"DISPATCH_MEMORY_MB": "2048"})

    assert default.offers == {"cpus": os.cpu_count(), "memoryMb": agent._total_memory_mb() * 4 // 5, "gpus": 0}
    assert told.offers == {"cpus": 3, "memoryMb": 2048, "gpus": 1}


def test_register_and_heartbeat_say_what_the_agent_offers_and_a_job_sees_its_cpus(fake, make_agent):
    fake.route("GET", "/api/jobs/get-job", job_answer(command='echo "cpus=$DISPATCH_CPUS"', cpus=3))
    worker = make_agent(fake.url, cpus=4, memory_mb=1000, gpus=1)

    worker.poll_once()

    [register], [heartbeat, *_] = fake.bodies("/api/workers/register"), fake.bodies("/api/workers/heartbeat")
    [result] = fake.bodies("/api/jobs/submit-result")
    assert {k: register[k] for k in ("cpus", "memoryMb", "gpus")} == {"cpus": 4, "memoryMb": 1000, "gpus": 1}
    assert {k: heartbeat[k] for k in ("cpus", "memoryMb", "gpus")} == {"cpus": 4, "memoryMb": 1000, "gpus": 1}
    streamed = "".join(body["data"] for body in fake.bodies("/api/jobs/stream-output"))
    assert streamed + result["stdout"] == "cpus=3\n"


@pytest.mark.parametrize("argv, environ, message", [
    ([], {"DISPATCH_REGISTRATION_TOKEN": "t"}, "--server (or DISPATCH_SERVER) must be the server's URL"),
    (["--server", "lanbox:3000", "--token", "t"], {}, "--server (or DISPATCH_SERVER) must be the server's URL"),
    (["--server", "http://lanbox:3000"], {}, "--token (or DISPATCH_REGISTRATION_TOKEN) is required"),
    (["--server", "http://lanbox:3000", "--token", "t"], {"DISPATCH_CONCURRENCY": "0"}, "at least 1"),
])
def test_bad_configuration_is_a_usage_error(argv, environ, message, capsys):
    with pytest.raises(SystemExit) as exited:
        agent.parse_config(argv, environ)

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_only_the_same_scheme_host_and_port_count_as_the_servers_origin():
    assert agent._origin("http://LanBox/uploads/x") == agent._origin("http://lanbox:80")
    assert agent._origin("http://lanbox:3000/x") != agent._origin("http://lanbox:3001")
    assert agent._origin("https://lanbox:3000/x") != agent._origin("http://lanbox:3000")


def test_a_server_url_ending_in_api_is_refused_at_start_with_the_right_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        agent.parse_config(["--server", "http://lanbox:3000/api/", "--token", "t"], environ={})

    assert exit_.value.code == 2
    assert "without /api: http://lanbox:3000" in capsys.readouterr().err


def test_https_to_a_plain_http_server_stops_the_agent_and_says_so(fake, make_agent):
    worker = make_agent(fake.url.replace("http://", "https://"))

    assert worker.poll_once(now=0.0) is None

    assert "does not speak HTTPS: give --server as http://" in str(worker.fatal)
