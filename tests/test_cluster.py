"""Several servers on one PostgreSQL database (issue 16): two apps in this process, each with its
own data dir, share the database; what happens through one is seen through the other."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

import dispatch
from conftest import Api, postgresql_only, secret_of
from test_ws import connect, events_until, job_events, run_job

pytestmark = postgresql_only


@pytest.fixture
async def other(aiohttp_client, config, clock, tmp_path) -> Api:
    """A second server on the same database."""
    second = dataclasses.replace(config, data_dir=str(tmp_path / "other-data"))
    return Api(await aiohttp_client(dispatch.create_app(second, clock=clock)))


async def test_a_login_and_a_worker_token_from_one_server_work_on_the_other(api, other):
    admin = await api.admin()
    worker = await other.register()

    assert (await other.call("GET", "/api/auth/me", token=admin)).status == 200
    assert (await api.call("POST", "/api/workers/heartbeat", worker=worker, json={})).status == 200


async def test_a_job_submitted_on_one_server_wakes_a_worker_parked_on_the_other(api, other):
    admin = await api.admin()
    worker = await other.register()
    parked = asyncio.create_task(other.claim(worker, wait=20))
    await asyncio.sleep(0.3)  # parked on the other server

    began = time.monotonic()
    job_id = await api.submit(admin, "make")
    job = await asyncio.wait_for(parked, 20)

    assert job["jobId"] == job_id
    assert time.monotonic() - began < 5  # woken by the first server's news, not by the end of its wait


async def test_a_worker_deleted_on_one_server_has_its_poll_on_the_other_ended(api, other):
    worker = await other.register()
    parked = asyncio.create_task(other.call("GET", "/api/jobs/get-job", worker=worker, params={"wait": "20"}))
    await asyncio.sleep(0.3)  # parked on the other server

    began = time.monotonic()
    assert (await api.call("DELETE", "/api/workers/worker-001", token=await api.admin())).status == 200

    assert (await asyncio.wait_for(parked, 20)).status == 204
    assert time.monotonic() - began < 5  # ended by the first server's news, not by the end of its wait
    assert (await other.call("GET", "/api/jobs/get-job", worker=worker)).status == 401


async def test_a_websocket_on_one_server_sees_a_job_run_through_the_other_output_included(api, other):
    admin = await api.admin()
    worker = await api.register()
    ws = await connect(other, admin)

    job_id = await api.submit(admin, "npm test")
    assert (await api.claim(worker))["jobId"] == job_id
    await run_job(api, admin, worker, job_id, ["test line 1\n", "test line 2\n"])
    events = job_events(await events_until(ws, lambda e: e["type"] == "job.completed"))

    assert [e["type"] for e in events] == ["job.queued", "job.started", "job.output", "job.output", "job.completed"]
    assert [e["data"] for e in events if e["type"] == "job.output"] == ["test line 1\n", "test line 2\n"]
    assert {e["jobId"] for e in events} == {job_id}
    await ws.close()


async def test_one_server_sweeps_and_another_takes_over_when_it_stops(api, other):
    first, second = api.client.app[dispatch.CLUSTER], other.client.app[dispatch.CLUSTER]
    deadline = time.monotonic() + 5
    while not (await first.lead() or await second.lead()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)

    leaders = [await first.lead(), await second.lead()]
    assert sorted(leaders) == [False, True]
    leader, follower = (api, other) if leaders[0] else (other, api)
    await leader.client.close()
    # PostgreSQL frees the lock once the leader's session has ended, a moment after its close.
    deadline = time.monotonic() + 2
    while not await follower.client.app[dispatch.CLUSTER].lead():
        assert time.monotonic() < deadline, "no server took the sweeps over within 2 s"
        await asyncio.sleep(0.05)


async def test_a_rotated_registration_token_stops_working_on_the_other_server_within_a_second(
        make_client, config, aiohttp_client, clock, tmp_path):
    api = Api(await make_client(registration_token=""))
    other = Api(await aiohttp_client(dispatch.create_app(
        dataclasses.replace(config, registration_token="", data_dir=str(tmp_path / "other-data")), clock=clock)))
    old = await secret_of(config, "registration_token")
    body = {"workerId": "w1", "hostname": "pc", "cpuCount": 1, "totalMemoryMb": 1024, "metadata": {}}

    rotated = await api.call("POST", "/api/workers/registration-token", token=await api.admin())
    new = (await rotated.json())["token"]
    await asyncio.sleep(1.5)

    assert (await other.call("POST", "/api/workers/register", token=old, json=body)).status == 401
    assert (await other.call("POST", "/api/workers/register", token=new, json=body)).status == 201
