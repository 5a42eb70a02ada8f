"""Running it for months: health, metrics, logs, retention, backup, graceful shutdown, CLI."""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dispatch
from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, REGISTRATION_TOKEN, ROOT, Api, ServerProcess, run_sql, sqlite_only, stored


async def test_health_reports_version_queue_and_workers_without_auth(api):
    token = await api.admin()
    await api.submit(token)
    await api.register()

    response = await api.call("GET", "/api/health")

    body = await response.json()
    assert response.status == 200
    assert (body["status"], body["version"], body["queueDepth"], body["onlineWorkers"]) == (
        "ok", dispatch.__version__, 1, 1)
    assert body["uptimeSeconds"] >= 0


@pytest.mark.slow
@sqlite_only
async def test_health_is_503_while_the_database_cannot_be_written(api, config):
    blocker = sqlite3.connect(f"{config.data_dir}/dispatch.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock past the busy timeout
    try:
        response = await api.call("GET", "/api/health")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert response.status == 503
    assert (await response.json())["code"] == "DATABASE_UNAVAILABLE"
    assert (await api.call("GET", "/api/health")).status == 200


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_metrics_move_as_jobs_run(api):
    token = await api.admin()
    before = scrape(await (await api.call("GET", "/metrics")).text())
    job_id = await api.submit(token, priority="high")
    queued = scrape(await (await api.call("GET", "/metrics")).text())
    worker = await api.register()
    job = await api.claim(worker)
    await api.call("POST", "/api/jobs/submit-result", worker=worker,
                   json={"jobId": job_id, "attempt": job["attempt"], "exitCode": 0})
    after = scrape(await (await api.call("GET", "/metrics")).text())

    assert before[("dispatch_queue_depth", (("priority", "high"),))] == 0
    assert queued[("dispatch_queue_depth", (("priority", "high"),))] == 1
    assert after[("dispatch_queue_depth", (("priority", "high"),))] == 0
    assert after[("dispatch_jobs", (("state", "completed"),))] == 1
    assert after[("dispatch_workers", (("status", "online"),))] == 1
    assert after[("dispatch_job_wait_seconds_count", ())] == 1
    assert after[("dispatch_job_duration_seconds_count", (("status", "completed"),))] == 1
    submits = ("dispatch_http_requests_total", (("code", "201"), ("method", "POST"), ("route", "/api/jobs/submit")))
    assert after[submits] == 1


async def test_metrics_need_the_token_from_beyond_loopback(make_client):
    api = Api(await make_client(metrics_token="scrape-me", trusted_proxies="127.0.0.1"))
    remote = {"X-Forwarded-For": "192.0.2.7"}  # through a proxy on this box, from another machine

    refused = await api.call("GET", "/metrics", headers=remote)
    wrong = await api.call("GET", "/metrics", headers={**remote, "Authorization": "Bearer nope"})
    allowed = await api.call("GET", "/metrics", headers={**remote, "Authorization": "Bearer scrape-me"})

    assert (refused.status, wrong.status, allowed.status) == (403, 403, 200)
    assert "dispatch_jobs" in await allowed.text()


async def test_retention_deletes_exactly_the_old_finished_jobs(client, api, config, clock):
    token = await api.admin()
    worker = await api.register()
    old, recent = await api.submit(token, "echo old"), await api.submit(token, "echo recent")
    for _ in range(2):
        job = await api.claim(worker)
        await api.call("POST", "/api/jobs/submit-result", worker=worker,
                       json={"jobId": job["jobId"], "attempt": job["attempt"], "exitCode": 0, "stdout": "out"})
    old_queued = await api.submit(token, "echo still waiting")
    long_ago = dispatch._iso(clock.now() - dt.timedelta(days=config.job_retention_days + 1))
    await run_sql(config, f"UPDATE jobs SET completed_at = '{long_ago}' WHERE id = '{old}'")
    await run_sql(config, f"UPDATE jobs SET created_at = '{long_ago}' WHERE id = '{old_queued}'")

    await dispatch._sweep_storage(client.app)

    listing = await (await api.call("GET", "/api/jobs/list", token=token)).json()
    assert sorted(job["jobId"] for job in listing["jobs"]) == sorted([recent, old_queued])
    assert await run_sql(config, f"SELECT COUNT(*) FROM job_output WHERE job_id = '{old}'") == [(0,)]
    assert await run_sql(config, f"SELECT COUNT(*) FROM job_output WHERE job_id = '{recent}'") == [(1,)]


async def test_expired_uploads_are_swept_from_disk_and_database(client, api, config):
    token = await api.admin()
    upload = await api.upload(token, b"zip bytes")
    await run_sql(config, f"UPDATE files SET expires_at = '2000-01-01T00:00:00.000Z' WHERE id = '{upload['fileId']}'")

    await dispatch._sweep_storage(client.app)

    response = await api.call("GET", f"/api/files/download/{upload['fileId']}", token=token)
    assert response.status == 404
    assert not (client.app[dispatch.CONFIG].data_path / "uploads" / upload["fileId"]).exists()
    assert await stored(config) == []


# -- a real process -------------------------------------------------------------


def post_json(server: ServerProcess, path: str, body: dict, token: str | None = None) -> dict:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_backup_under_load_holds_every_job_acknowledged_before_it_began(dispatch_server, tmp_path):
    token = post_json(dispatch_server, "/api/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})["token"]
    acknowledged: list[tuple[float, str]] = []
    stop = threading.Event()

    def submit_forever() -> None:
        while not stop.is_set():
            job_id = post_json(dispatch_server, "/api/jobs/submit", {"command": "true"}, token)["jobId"]
            acknowledged.append((time.monotonic(), job_id))

    submitter = threading.Thread(target=submit_forever)
    submitter.start()
    try:
        while len(acknowledged) < 50:
            time.sleep(0.01)
        began = time.monotonic()
        backup = subprocess.run([sys.executable, str(ROOT / "dispatch.py"), "--data-dir", str(dispatch_server.data_dir),
                                 "backup", str(tmp_path / "copy.db")], capture_output=True, text=True, timeout=30)
    finally:
        stop.set()
        submitter.join(10)

    assert backup.returncode == 0, backup.stderr
    copy = sqlite3.connect(tmp_path / "copy.db")
    saved = {row[0] for row in copy.execute("SELECT id FROM jobs")}
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    copy.close()
    before = {job_id for at, job_id in acknowledged if at < began}
    assert len(before) >= 50 and before <= saved


def test_sigterm_releases_a_long_poll_with_204_and_exits_cleanly(dispatch_server):
    worker = post_json(dispatch_server, "/api/workers/register", {"workerId": "w", "hostname": "h"},
                       REGISTRATION_TOKEN)["token"]
    answer: dict = {}

    def long_poll() -> None:
        request = urllib.request.Request(dispatch_server.url + "/api/jobs/get-job?wait=30",
                                         headers={"x-worker-token": worker})
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=30) as response:
            answer.update(status=response.status, seconds=time.monotonic() - started)

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.5)
    dispatch_server.process.send_signal(signal.SIGTERM)
    poller.join(15)

    assert answer["status"] == 204 and answer["seconds"] < 5
    assert dispatch_server.process.wait(15) == 0


def test_sigterm_during_an_upload_abandons_it_promptly_and_leaves_no_partial_file(dispatch_server):
    token = post_json(dispatch_server, "/api/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})["token"]
    boundary = "dispatchboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.zip\"\r\n"
            f"Content-Type: application/zip\r\n\r\n").encode()
    size = 20 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", dispatch_server.port)) as sock:
        sock.sendall(f"POST /api/files/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                     f"Content-Length: {len(head) + size + 100}\r\n\r\n".encode() + head)
        sock.sendall(b"x" * (size // 2))
        deadline = time.monotonic() + 10
        while not any(p.name.endswith(".partial") for p in (dispatch_server.data_dir / "uploads").iterdir()):
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
        stopping = time.monotonic()
        dispatch_server.process.send_signal(signal.SIGTERM)  # half way through the upload
        assert dispatch_server.process.wait(30) == 0
        stopped_after = time.monotonic() - stopping

    assert stopped_after < 5
    assert list((dispatch_server.data_dir / "uploads").iterdir()) == []


@pytest.mark.slow
def test_version_and_help_document_every_setting():
    version = subprocess.run([sys.executable, str(ROOT / "dispatch.py"), "--version"], capture_output=True, text=True)
    help_text = subprocess.run([sys.executable, str(ROOT / "dispatch.py"), "--help"], capture_output=True, text=True)

    assert version.stdout.strip() == f"dispatch {dispatch.__version__}"
    for _field, flag, env, *_ in dispatch.SETTINGS:
        assert env in help_text.stdout
        if flag:
            assert flag in help_text.stdout


def test_json_logs_carry_one_line_per_request_and_no_secret(tmp_path, server_env):
    server = ServerProcess(tmp_path / "data", server_env)
    server.env = {**server_env, "DISPATCH_LOG_FORMAT": "json"}
    server.start()
    try:
        token = post_json(server, "/api/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})["token"]
        post_json(server, "/api/jobs/submit", {"command": "make"}, token)
        with urllib.request.urlopen(server.url + "/api/health", timeout=10):
            pass
    finally:
        server.stop()

    log = server.log()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests = [(line["method"], line["route"], line["status"]) for line in lines if line["logger"] == "dispatch.access"]
    assert requests == [("POST", "/api/auth/login", 200), ("POST", "/api/jobs/submit", 201),
                        ("GET", "/api/health", 200)]
    assert [line["who"] for line in lines if line.get("route") == "/api/jobs/submit"] == [f"user:{ADMIN_EMAIL}"]
    assert token not in log and ADMIN_PASSWORD not in log


async def test_a_database_from_a_newer_dispatch_is_refused(config):
    config.data_path.mkdir(parents=True)
    await (await dispatch.Store.open(config.database)).close()
    await run_sql(config, "UPDATE meta SET value = '99' WHERE key = 'schema_version'" if config.database_url
                  else "PRAGMA user_version = 99")

    with pytest.raises(RuntimeError, match="schema version 99"):
        await dispatch.Store.open(config.database)
