"""Never lose a job: attempts and fencing, lost workers, server-side timeouts, cancellation,
retries and the output cap."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

import dispatch
from conftest import ADMIN_EMAIL, ADMIN_PASSWORD, REGISTRATION_TOKEN, Api


async def heartbeat(api: Api, worker_token: str) -> None:
    response = await api.call("POST", "/api/workers/heartbeat", worker=worker_token, json={"status": "idle"})
    assert response.status == 200


async def result(api: Api, worker_token: str, job: dict, exit_code: int = 0, **fields) -> int:
    response = await api.call("POST", "/api/jobs/submit-result", worker=worker_token,
                              json={"jobId": job["jobId"], "attempt": job["attempt"], "exitCode": exit_code,
                                    **fields})
    return response.status


async def test_lost_worker_job_is_requeued_and_the_zombie_cannot_touch_it(client, api, clock):
    token = await api.admin()
    job_id = await api.submit(token, "make test")
    frozen = await api.register("frozen")
    first = await api.claim(frozen)
    alive = await api.register("alive")

    clock.advance(89)
    await heartbeat(api, alive)  # "frozen" stops heartbeating: offline after three intervals (90 s)
    await client.app[dispatch.JOBS].sweep()
    assert (await api.status(token, job_id))["status"] == "running"
    clock.advance(2)
    await heartbeat(api, alive)
    await client.app[dispatch.JOBS].sweep()
    requeued = await api.status(token, job_id)
    assert (requeued["status"], requeued["error"]) == ("queued", "worker frozen lost; requeued")
    second = await api.claim(alive)

    assert (second["jobId"], first["attempt"], second["attempt"]) == (job_id, 1, 2)
    stale_output = await api.call("POST", "/api/jobs/stream-output", worker=frozen,
                                  json={"jobId": job_id, "attempt": 1, "data": "late\n", "type": "stdout"})
    assert stale_output.status == 409
    assert await result(api, frozen, first, exit_code=1) == 409
    assert await result(api, alive, second, stdout="ok") == 200
    job = await api.status(token, job_id)
    assert (job["status"], job["exitCode"], job["workerId"], job["stdout"], job["attempts"]) == (
        "completed", 0, "alive", "ok", 2)


async def test_job_fails_with_worker_lost_past_max_attempts(client, api, clock):
    token = await api.admin()
    job_id = await api.submit(token, maxAttempts=2)
    worker = await api.register()
    for attempt in (1, 2):
        assert (await api.claim(worker))["attempt"] == attempt
        clock.advance(91)
        await client.app[dispatch.JOBS].sweep()
        await heartbeat(api, worker)  # back, but its attempt is gone

    job = await api.status(token, job_id)

    assert (job["status"], job["error"], job["exitCode"]) == ("failed", "worker lost", None)


async def test_deleting_a_worker_requeues_its_running_job(api):
    token = await api.admin()
    job_id = await api.submit(token)
    worker = await api.register()
    await api.claim(worker)

    response = await api.call("DELETE", "/api/workers/worker-001", token=token)

    assert response.status == 200
    assert (await api.status(token, job_id))["status"] == "queued"


async def test_running_job_far_past_its_timeout_fails_even_without_its_worker(client, api, clock):
    token = await api.admin()
    job_id = await api.submit(token, timeout=1)
    worker = await api.register()
    await api.claim(worker)
    jobs = client.app[dispatch.JOBS]

    clock.advance(1 + jobs.timeout_grace - 0.5)
    await heartbeat(api, worker)  # still alive: only the timeout may end the job
    await jobs.sweep()
    assert (await api.status(token, job_id))["status"] == "running"
    clock.advance(1)
    await heartbeat(api, worker)
    await jobs.sweep()

    job = await api.status(token, job_id)
    assert (job["status"], job["exitCode"], job["error"]) == (
        "failed", 124, "timed out after 1 s (no result from the worker)")


async def test_cancel_a_queued_job(api):
    token = await api.admin()
    job_id = await api.submit(token)

    response = await api.call("POST", "/api/jobs/cancel", token=token, json={"jobId": job_id})

    assert response.status == 200
    assert (await api.status(token, job_id))["status"] == "cancelled"
    assert await api.claim(await api.register()) is None


async def test_cancel_a_running_job_fences_its_worker_and_tells_websocket_clients(api):
    user, _ = await api.new_user()
    job_id = await api.submit(user)
    worker = await api.register()
    job = await api.claim(worker)
    async with api.client.ws_connect(f"/api/jobs/stream?jobId={job_id}",
                                     headers={"Authorization": f"Bearer {user}"}) as ws:
        response = await api.call("POST", "/api/jobs/cancel", token=user, json={"jobId": job_id})
        event = await ws.receive_json(timeout=5)

    assert response.status == 200
    assert (event["type"], event["jobId"], event["status"]) == ("job.cancelled", job_id, "cancelled")
    keepalive = await api.call("POST", "/api/jobs/stream-output", worker=worker,
                               json={"jobId": job_id, "attempt": job["attempt"], "data": "", "type": "stdout"})
    assert keepalive.status == 409  # how the agent learns it must kill the job
    assert await result(api, worker, job) == 409
    status = await api.status(user, job_id)
    assert (status["status"], status["error"]) == ("cancelled", "cancelled by user@example.com")


async def test_only_the_submitter_or_an_admin_may_cancel_and_only_unfinished_jobs(api):
    owner, _ = await api.new_user("owner@example.com")
    other, _ = await api.new_user("other@example.com")
    job_id = await api.submit(owner)

    refused = await api.call("POST", "/api/jobs/cancel", token=other, json={"jobId": job_id})
    by_admin = await api.call("POST", "/api/jobs/cancel", token=await api.admin(), json={"jobId": job_id})
    again = await api.call("POST", "/api/jobs/cancel", token=owner, json={"jobId": job_id})
    unknown = await api.call("POST", "/api/jobs/cancel", token=owner, json={"jobId": "job-nope"})
    missing = await api.call("POST", "/api/jobs/cancel", token=owner, json={})

    assert [r.status for r in (refused, by_admin, again, unknown, missing)] == [403, 200, 409, 404, 400]


async def test_retries_rerun_a_failed_command_and_keep_only_the_last_attempts_output(api):
    token = await api.admin()
    job_id = await api.submit(token, retries=1)
    worker = await api.register()

    first = await api.claim(worker)
    assert await result(api, worker, first, exit_code=3, stdout="flaky\n") == 200
    assert (await api.status(token, job_id))["status"] == "queued"
    second = await api.claim(worker)
    assert await result(api, worker, second, exit_code=3, stdout="still flaky\n") == 200

    job = await api.status(token, job_id)
    assert (second["attempt"], job["status"], job["exitCode"], job["stdout"]) == (2, "failed", 3, "still flaky\n")
    assert await api.claim(worker) is None  # one retry, used


async def test_output_past_the_cap_keeps_head_and_tail_with_a_marker(make_client):
    api = Api(await make_client(max_output_mb=1))
    token = await api.admin()
    job_id = await api.submit(token)
    worker = await api.register()
    job = await api.claim(worker)
    chunk = 64 * 1024
    for i in range(48):  # 3 MiB, three times the cap
        response = await api.call("POST", "/api/jobs/stream-output", worker=worker, json={
            "jobId": job_id, "attempt": job["attempt"], "type": "stdout", "data": chr(ord("A") + i % 26) * chunk})
        assert response.status == 200
    assert await result(api, worker, job, exit_code=7) == 200

    status = await api.status(token, job_id)
    half = 512 * 1024
    head, marker, tail = status["stdout"][:half], status["stdout"][half:-half], status["stdout"][-half:]
    assert head == "A" * chunk + "B" * chunk + "C" * chunk + "D" * chunk + "E" * chunk + "F" * chunk + "G" * chunk + \
        "H" * chunk
    assert tail == "".join(chr(ord("A") + i % 26) * chunk for i in range(40, 48))
    assert marker == f"\n[... dispatch dropped {48 * chunk - 2 * half} characters of stdout here (output cap) ...]\n"
    assert (status["status"], status["exitCode"]) == ("failed", 7)


def test_a_long_poll_that_hung_up_never_swallows_a_job(dispatch_server):
    # A real process: aiohttp's test server cancels handlers on disconnect, run_app does not.
    def call(method, path, headers, body=None):
        request = urllib.request.Request(dispatch_server.url + path, method=method, headers=headers,
                                         data=json.dumps(body).encode() if body is not None else None)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")

    registration = {"Authorization": f"Bearer {REGISTRATION_TOKEN}"}
    gone = call("POST", "/api/workers/register", registration, {"workerId": "gone", "hostname": "h"})[1]["token"]
    with socket.create_connection(("127.0.0.1", dispatch_server.port)) as parked:
        parked.sendall(f"GET /api/jobs/get-job?wait=30 HTTP/1.1\r\nHost: x\r\nx-worker-token: {gone}\r\n\r\n".encode())
        time.sleep(0.3)
    # the agent died (or restarted) while its poll was parked; now a job arrives
    token = call("POST", "/api/auth/login", {}, {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})[1]["token"]
    user = {"Authorization": f"Bearer {token}"}
    job_id = call("POST", "/api/jobs/submit", user, {"command": "make"})[1]["jobId"]
    time.sleep(0.3)

    assert call("GET", f"/api/jobs/status?jobId={job_id}", user)[1]["job"]["status"] == "queued"
    alive = call("POST", "/api/workers/register", registration, {"workerId": "alive", "hostname": "h"})[1]["token"]
    job = call("GET", "/api/jobs/get-job", {"x-worker-token": alive})[1]["job"]
    assert (job["jobId"], job["attempt"]) == (job_id, 1)


async def test_a_restarted_worker_gives_back_the_jobs_it_no_longer_runs(api):
    token = await api.admin()
    kept, forgotten = await api.submit(token, "kept"), await api.submit(token, "forgotten", maxAttempts=1)
    worker = await api.register()
    await api.claim(worker), await api.claim(worker)

    response = await api.call("POST", "/api/workers/heartbeat", worker=worker,
                              json={"status": "busy", "runningJobs": [kept]})

    assert response.status == 200
    assert (await api.status(token, kept))["status"] == "running"
    job = await api.status(token, forgotten)
    # Handed back by a live worker: queued again, although maxAttempts=1 (it cost no attempt).
    assert (job["status"], job["error"]) == ("queued", "worker worker-001 no longer runs attempt 1; requeued")
    again = await api.claim(worker)
    assert (again["jobId"], again["attempt"]) == (forgotten, 2)
    bad = await api.call("POST", "/api/workers/heartbeat", worker=worker, json={"runningJobs": "all"})
    assert bad.status == 400


async def test_a_tagged_job_wakes_a_worker_that_has_its_tags_even_behind_one_that_does_not(api):
    token = await api.admin()
    plain = await api.register("plain")
    gpu = await api.register("gpu-box", tags=["gpu"])
    plain_poll = asyncio.ensure_future(api.claim(plain, wait=5))
    await asyncio.sleep(0.2)  # "plain" has waited longest
    gpu_poll = asyncio.ensure_future(api.claim(gpu, wait=5))
    await asyncio.sleep(0.2)

    started = time.monotonic()
    job_id = await api.submit(token, tags=["gpu"])
    job = await asyncio.wait_for(gpu_poll, 2)

    assert job["jobId"] == job_id and time.monotonic() - started < 1
    assert not plain_poll.done()
    plain_poll.cancel()
