"""Desktops as good guests, on the server's side: an admin pauses and resumes a worker; an agent
says it takes no jobs for its owner (state, pausedReason); a suspended job (job.suspended,
job.resumed) is not timed while it is stopped; an evicted job goes back to the queue at no cost.
Time moves by the injected clock."""

from __future__ import annotations

import asyncio

import pytest

import dispatch
from conftest import Api
from test_leases import claim, heartbeat, output
from test_ws import connect, events_until, job_events


async def workers(api: Api) -> dict:
    response = await api.call("GET", "/api/workers/list", token=await api.admin())
    return {w["workerId"]: w for w in (await response.json())["workers"]}


async def move(api: Api, action: str, worker_id: str = "worker-001", token: str | None = None):
    return await api.call("POST", f"/api/workers/{action}", token=token or await api.admin(),
                          json={"workerId": worker_id})


async def result(api: Api, worker: str, job: dict, **fields) -> int:
    response = await api.call("POST", "/api/jobs/submit-result", worker=worker,
                              json={"jobId": job["jobId"], "attempt": job["attempt"], "exitCode": 0, **fields})
    return response.status


# -- an admin pauses a worker -----------------------------------------------------------------


async def test_a_paused_worker_takes_no_new_job_and_its_running_job_finishes(api):
    token = await api.admin()
    worker = await api.register()
    await api.submit(token, "echo first")
    running = await claim(api, worker, "run-a", 1)
    queued = await api.submit(token, "echo next")

    response = await move(api, "pause")

    assert (response.status, await response.json()) == (200, {"success": True, "workerId": "worker-001",
                                                              "state": "paused"})
    shown = (await workers(api))["worker-001"]
    assert (shown["state"], shown["pausedReason"]) == ("paused", "paused by an admin")
    assert await api.claim(worker) is None
    assert (await api.status(token, queued))["waitingFor"] == "workers paused (paused by an admin)"
    assert await output(api, worker, running, "still here") == 200
    assert await result(api, worker, running) == 200
    assert (await api.status(token, running["jobId"]))["status"] == "completed"


async def test_resuming_ends_a_paused_workers_long_poll_and_the_next_poll_gets_the_job(api):
    token = await api.admin()
    worker = await api.register()
    await move(api, "pause")
    job_id = await api.submit(token)
    parked = asyncio.ensure_future(api.claim(worker, wait=10))
    await asyncio.sleep(0.2)

    response = await move(api, "resume")

    assert (await response.json())["state"] == "available"
    assert await asyncio.wait_for(parked, 2) is None  # it answers at once, as for an approval
    assert (await api.claim(worker))["jobId"] == job_id
    shown = (await workers(api))["worker-001"]
    assert (shown["state"], shown["pausedReason"]) == ("available", None)


async def test_pausing_a_pending_worker_leaves_it_pending(make_client):
    api = Api(await make_client(approve_workers=True))
    await api.register()

    assert (await (await move(api, "pause")).json())["state"] == "pending"
    assert (await (await move(api, "resume")).json())["state"] == "pending"


@pytest.mark.parametrize("action", ["pause", "resume"])
async def test_pause_and_resume_are_for_admins_and_name_an_existing_worker(api, action):
    user, _ = await api.new_user()
    worker = await api.register()

    assert (await move(api, action, token=user)).status == 403
    assert (await api.call("POST", f"/api/workers/{action}", worker=worker, json={"workerId": "worker-001"})
            ).status in (401, 403)
    assert (await move(api, action, "no-such-worker")).status == 404
    missing = await api.call("POST", f"/api/workers/{action}", token=await api.admin(), json={})
    assert (missing.status, (await missing.json())["details"]) == (400, {"field": "workerId"})


# -- an agent pauses for its owner -------------------------------------------------------------


async def test_an_agent_that_pauses_for_its_owner_shows_why_and_gets_no_job(api):
    token = await api.admin()
    worker = await api.register()
    job_id = await api.submit(token)

    await heartbeat(api, worker, state="paused", pausedReason="outside hours 18:00-08:00")

    shown = (await workers(api))["worker-001"]
    assert (shown["state"], shown["pausedReason"]) == ("paused", "outside hours 18:00-08:00")
    assert await api.claim(worker) is None
    assert (await api.status(token, job_id))["waitingFor"] == "workers paused (outside hours 18:00-08:00)"


async def test_an_agent_back_to_available_gets_the_job_at_once_even_if_its_poll_came_first(api):
    token = await api.admin()
    worker = await api.register()
    await heartbeat(api, worker, state="paused", pausedReason="owner active")
    job_id = await api.submit(token)
    parked = asyncio.ensure_future(api.claim(worker, wait=10))  # the poll overtook the heartbeat
    await asyncio.sleep(0.2)

    await heartbeat(api, worker, state="available")

    assert (await asyncio.wait_for(parked, 2))["jobId"] == job_id


async def test_a_heartbeat_that_says_nothing_of_its_state_changes_nothing(api):
    worker = await api.register()
    await heartbeat(api, worker, state="paused", pausedReason="on battery")

    await heartbeat(api, worker)  # a contract-only client

    assert (await workers(api))["worker-001"]["pausedReason"] == "on battery"


async def test_an_admins_pause_and_a_pending_approval_come_before_what_the_agent_says(make_client):
    api = Api(await make_client(approve_workers=True))
    pending = await api.register()
    await heartbeat(api, pending, state="paused", pausedReason="owner active")
    assert ((await workers(api))["worker-001"]["state"], (await workers(api))["worker-001"]["pausedReason"]) == (
        "pending", None)

    await api.call("POST", "/api/workers/approve", token=await api.admin(), json={"workerId": "worker-001"})
    await move(api, "pause")
    assert (await workers(api))["worker-001"]["pausedReason"] == "paused by an admin"
    await move(api, "resume")
    assert (await workers(api))["worker-001"]["pausedReason"] == "owner active"


@pytest.mark.parametrize("fields, field", [
    ({"state": "sleeping"}, "state"), ({"state": 1}, "state"), ({"state": "paused", "pausedReason": 5}, "pausedReason"),
    ({"state": "paused", "pausedReason": "x" * 201}, "pausedReason"),
])
async def test_a_bad_state_in_a_heartbeat_is_400_naming_the_field(api, fields, field):
    worker = await api.register()
    response = await api.call("POST", "/api/workers/heartbeat", worker=worker, json={"status": "idle", **fields})

    assert (response.status, (await response.json())["details"]) == (400, {"field": field})
    assert (await workers(api))["worker-001"]["state"] == "available"


# -- suspended jobs ---------------------------------------------------------------------------


async def test_a_suspended_job_shows_it_and_each_change_is_one_event(api):
    token = await api.admin()
    job_id = await api.submit(token)
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)
    ws = await connect(api, token)

    assert await output(api, worker, job, suspended=True) == 200
    assert await output(api, worker, job, suspended=True) == 200  # no news: no event
    assert (await api.status(token, job_id))["suspended"] is True
    assert await output(api, worker, job, "more", suspended=False) == 200

    events = job_events(await events_until(ws, lambda e: e["type"] == "job.output"))
    assert [(e["type"], e.get("suspended")) for e in events] == [
        ("job.suspended", True), ("job.resumed", False), ("job.output", None)]
    assert events[0]["jobId"] == job_id and events[0]["status"] == "running"
    listed = (await (await api.call("GET", "/api/jobs/list", token=token)).json())["jobs"]
    assert listed[0]["suspended"] is False
    await ws.close()


async def test_a_bad_suspended_flag_is_400(api):
    await api.submit(await api.admin())
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)

    assert await output(api, worker, job, suspended="yes") == 400
    assert await output(api, worker, job, suspended=1) == 400


async def test_the_servers_timeout_leaves_out_the_time_a_job_was_suspended(client, api, clock):
    token = await api.admin()
    job_id = await api.submit(token, timeout=10)
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)
    jobs = client.app[dispatch.JOBS]

    async def after(seconds: float) -> str:
        clock.advance(seconds)
        await heartbeat(api, worker, runningJobs=[job_id], run="run-a", polled=1)
        await jobs.sweep()
        return (await api.status(token, job_id))["status"]

    assert await output(api, worker, job, runningFor=0.0) == 200
    assert await after(4) == "running"
    assert await output(api, worker, job, suspended=True) == 200
    assert await after(3600) == "running"  # an hour suspended: the clock stood still
    assert await output(api, worker, job, suspended=False) == 200
    assert await after(6 + jobs.timeout_grace - 1) == "running"
    assert await output(api, worker, job, suspended=True) == 200  # a second suspension adds up too
    assert await after(600) == "running"
    assert await output(api, worker, job, suspended=False) == 200
    assert await after(2) == "failed"
    assert (await api.status(token, job_id))["exitCode"] == 124


# -- evicted jobs -----------------------------------------------------------------------------


def test_an_eviction_requeues_the_job_and_spends_nothing():
    job = {"attempt": 3, "worker_id": "desk-1", "retried": 0, "retries": 0, "losses": 0, "max_attempts": 1}

    outcome = dispatch.decide_outcome(job, dispatch.Ending.EVICTED, error="owner active")

    assert outcome == dispatch.Outcome("queued", error="attempt 3 evicted from desk-1 (owner active); requeued")


async def test_an_evicted_job_runs_again_elsewhere_however_often_it_is_evicted(api):
    token = await api.admin()
    job_id = await api.submit(token, maxAttempts=1, retries=0)
    desk = await api.register("desk-1")
    for attempt in range(1, 4):
        job = await claim(api, desk, "run-a", attempt)
        assert await result(api, desk, job, exitCode=143, evicted="owner active") == 200
        queued = await api.status(token, job_id)
        assert (queued["status"], queued["exitCode"], queued["suspended"]) == ("queued", None, False)
        assert queued["error"] == f"attempt {attempt} evicted from desk-1 (owner active); requeued"

    other = await api.register("desk-2")
    job = await claim(api, other, "run-b", 1)
    assert await result(api, other, job) == 200

    final = await api.status(token, job_id)
    assert (final["status"], final["workerId"], final["attempts"], final["error"]) == ("completed", "desk-2", 4, None)


async def test_a_bad_eviction_reason_is_400(api):
    await api.submit(await api.admin())
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)

    assert await result(api, worker, job, evicted=["owner active"]) == 400


async def test_a_poll_parked_before_the_pause_gets_the_job_at_once_on_resume(api):
    token = await api.admin()
    worker = await api.register()
    parked = asyncio.ensure_future(api.claim(worker, wait=10))
    await asyncio.sleep(0.2)
    await move(api, "pause")
    job_id = await api.submit(token)  # it rings the parked poll, whose claim is refused
    await asyncio.sleep(0.2)
    assert not parked.done()

    await move(api, "resume")

    assert (await asyncio.wait_for(parked, 2))["jobId"] == job_id
