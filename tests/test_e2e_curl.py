"""End to end: a real ``python dispatch.py`` process, driven by the README's own curl blocks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, REGISTRATION_TOKEN, ROOT, AgentProcess, ServerProcess, make_zip

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")]


def readme_bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def http(server: ServerProcess, method: str, path: str, *, token: str | None = None, body: dict | None = None):
    request = urllib.request.Request(server.url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read() or b"null")


def login(server: ServerProcess, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> str:
    return http(server, "POST", "/api/auth/login", body={"email": email, "password": password})[1]["token"]


def as_script(server: ServerProcess, *parts: str) -> str:
    """README blocks (and lines of our own) as one script for this server and its credentials."""
    script = "\n".join(parts).replace("http://localhost:3000", server.url)
    script = re.sub(r"EMAIL=\S+ PASSWORD='[^']*'", f"EMAIL={ADMIN_EMAIL} PASSWORD='{ADMIN_PASSWORD}'", script)
    return re.sub(r"REGISTRATION_TOKEN='[^']*'", f"REGISTRATION_TOKEN='{REGISTRATION_TOKEN}'", script)


def readme_script(server: ServerProcess) -> str:
    """Every curl block in README order: setup, person, worker, API token, cancel."""
    setup, client, worker, cancel, api_token = readme_bash_blocks()
    return as_script(server, setup, client, 'echo "CLIENT_JOB_ID=$JOB_ID"', worker, 'echo "WORKER_JOB_ID=$JOB_ID"',
                     api_token, 'echo "API_TOKEN=$API_TOKEN"', cancel)


def test_readme_curl_workflows_pass_when_pasted_twice_in_a_row(dispatch_server, tmp_path):
    (tmp_path / "project.zip").write_bytes(make_zip({"project/README": "hello\n"}))
    for paste in (1, 2):
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_script(dispatch_server)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)

        assert run.returncode == 0, f"paste {paste}: " + run.stdout + run.stderr
        # curl prints answers without newlines: the first is step 4 of the client block, before any worker ran
        first_answer, _ = json.JSONDecoder().raw_decode(run.stdout)
        assert first_answer["job"]["status"] == "queued"
        assert first_answer["job"]["fileUrl"].endswith("/project.zip")
        token = login(dispatch_server)
        client_job = http(dispatch_server, "GET", "/api/jobs/status?jobId=" +
                          re.search(r"CLIENT_JOB_ID=(job-\w+)", run.stdout).group(1), token=token)[1]["job"]
        assert client_job["command"] == "ls -R"
        worker_job = http(dispatch_server, "GET", "/api/jobs/status?jobId=" +
                          re.search(r"WORKER_JOB_ID=(job-\w+)", run.stdout).group(1), token=token)[1]["job"]
        assert (worker_job["status"], worker_job["exitCode"], worker_job["command"]) == ("completed", 0, "make test")
        assert worker_job["workerId"].startswith("by-hand-")
        assert worker_job["stdout"] == "test line\ntests passed"
        api_token = re.search(r"API_TOKEN=(dsp_\S+)", run.stdout).group(1)
        assert run.stdout.count('"jobs": [') == 2  # the client block's list, and the API token's
        assert '"message": "API token revoked"' in run.stdout
        with pytest.raises(urllib.error.HTTPError) as revoked:
            http(dispatch_server, "GET", "/api/jobs/list", token=api_token)
        assert revoked.value.code == 401
        revoked.value.close()
        cancelled = json.loads(run.stdout[run.stdout.rindex("{"):])  # the cancel block's answer, last
        assert cancelled["status"] == "cancelled"
        _, answer = http(dispatch_server, "GET", f"/api/jobs/status?jobId={cancelled['jobId']}", token=token)
        assert (answer["job"]["command"], answer["job"]["status"]) == ("sleep 600", "cancelled")


def test_the_worker_block_works_while_an_agent_takes_every_other_job(dispatch_server, tmp_path):
    setup, client, worker, _cancel, _api_token = readme_bash_blocks()
    log_in = client.split("# 2.")[0]  # the person block's step 1 gives the token the worker block submits with
    script = as_script(dispatch_server, setup, log_in, worker, 'echo "WORKER_JOB_ID=$JOB_ID"')
    folder = tmp_path / "desktop"
    folder.mkdir()
    shutil.copy(ROOT / "agent.py", folder / "agent.py")
    agent = AgentProcess(folder / "agent.py", dispatch_server.url, "desk-1", folder / "work", []).start()
    try:
        for paste in (1, 2):
            run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=60)
            assert run.returncode == 0, f"paste {paste}: " + run.stdout + run.stderr
            job_id = re.search(r"WORKER_JOB_ID=(job-\w+)", run.stdout).group(1)
            job = http(dispatch_server, "GET", f"/api/jobs/status?jobId={job_id}", token=login(dispatch_server))[1]
            assert (job["job"]["status"], job["job"]["workerId"][:8]) == ("completed", "by-hand-")
    finally:
        agent.stop()


def test_first_start_prints_token_admin_and_agent_command(tmp_path, server_env):
    del server_env["DISPATCH_ADMIN_EMAIL"], server_env["DISPATCH_ADMIN_PASSWORD"]
    del server_env["DISPATCH_REGISTRATION_TOKEN"]
    server = ServerProcess(tmp_path / "data", server_env).start()
    try:
        banner = server.log()
        password = re.search(r"first admin:\s+admin@localhost / (\S+)", banner).group(1)
        token = re.search(r"registration token:\s+(\S+)", banner).group(1)
        assert f"python agent.py --server http://127.0.0.1:{server.port} --token {token}" in banner
        assert login(server, "admin@localhost", password)
        assert (tmp_path / "data" / "registration_token").read_text() == token
        assert (tmp_path / "data" / "registration_token").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()
    server.start()  # second start: same token, no new admin, no password printed again
    try:
        second_banner = server.log()[len(banner):]
        assert f"registration token:  {token}" in second_banner
        assert "first admin" not in second_banner
    finally:
        server.stop()


def test_acknowledged_jobs_survive_kill_9(dispatch_server):
    token = login(dispatch_server)
    job_ids = [http(dispatch_server, "POST", "/api/jobs/submit", token=token, body={"command": f"echo {i}"})[1]["jobId"]
               for i in range(20)]

    dispatch_server.kill()
    dispatch_server.start()

    _, listing = http(dispatch_server, "GET", "/api/jobs/list?limit=1000", token=token)
    assert sorted(job["jobId"] for job in listing["jobs"]) == sorted(job_ids)


def test_user_add_command_creates_a_user_who_can_log_in(dispatch_server):
    add = subprocess.run([sys.executable, str(ROOT / "dispatch.py"), "--data-dir", str(dispatch_server.data_dir),
                          "user", "add", "alice@example.com", "--role", "user", "--password-stdin"],
                         input="alice-password\n", capture_output=True, text=True, timeout=30,
                         env=dispatch_server.env)
    assert add.returncode == 0, add.stderr
    token = login(dispatch_server, "alice@example.com", "alice-password")
    status, _ = http(dispatch_server, "GET", "/api/jobs/list", token=token)
    assert status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        http(dispatch_server, "GET", "/api/users", token=token)
    assert refused.value.code == 403
    refused.value.close()
