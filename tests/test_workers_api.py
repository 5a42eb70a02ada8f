"""Workers: registration, heartbeats, listing, details, going offline (or saying so), unregistering,
jobs done as the server counts them, and forgetting workers past retention."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import stat
import time
from pathlib import Path

import pytest

import dispatch
from conftest import ISO_MS, REGISTRATION_TOKEN, Api, sqlite_only

WORKER_BODY = {"workerId": "worker-001", "hostname": "desktop-pc", "cpuCount": 8, "totalMemoryMb": 16384,
               "metadata": {"osType": "Windows", "nodeVersion": "18.17.0", "tags": ["test", "build"]}}



def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


async def register_raw(api: Api, body: dict, token: str | None = REGISTRATION_TOKEN):
    return await api.call("POST", "/api/workers/register", token=token, json=body)


async def heartbeat(api: Api, worker_token: str, **body):
    return await api.call("POST", "/api/workers/heartbeat", worker=worker_token, json={"status": "idle", **body})


async def worker_ids(api: Api, token: str, **params) -> list[str]:
    response = await api.call("GET", "/api/workers/list", token=token, params=params)
    assert response.status == 200, await response.text()
    return [w["workerId"] for w in (await response.json())["workers"]]


async def total_workers(api: Api) -> int:
    response = await api.call("GET", "/api/workers/list", token=await api.admin())
    return (await response.json())["total"]


# -- register -------------------------------------------------------------------


async def test_register_returns_201_with_a_token(api):
    before = dt.datetime.now(dt.timezone.utc)
    response = await register_raw(api, WORKER_BODY)

    body = await response.json()
    assert response.status == 201
    assert (body["success"], body["workerId"]) == (True, "worker-001")
    assert isinstance(body["token"], str) and len(body["token"]) >= 20
    assert body["token"] != REGISTRATION_TOKEN
    assert ISO_MS.match(body["registeredAt"])
    assert before - dt.timedelta(seconds=1) <= parse_iso(body["registeredAt"]) <= before + dt.timedelta(seconds=5)
    assert (await heartbeat(api, body["token"])).status == 200  # the token works


async def test_worker_tokens_are_distinct_per_worker(api):
    first, second = await api.register("a"), await api.register("b")

    assert first != second
    assert (await heartbeat(api, first, workerId="a")).status == 200
    assert (await heartbeat(api, second, workerId="b")).status == 200


@pytest.mark.parametrize("missing", ["workerId", "hostname"])
async def test_register_without_a_required_field_is_400_naming_it(api, missing):
    body = {k: v for k, v in WORKER_BODY.items() if k != missing}

    response = await register_raw(api, body)

    assert response.status == 400
    error = await response.json()
    assert (error["error"], error["message"]) == ("Invalid request", f"{missing} is required")
    assert error["code"]
    assert await total_workers(api) == 0


@pytest.mark.parametrize("field, value", [
    ("workerId", ""), ("workerId", 7), ("workerId", "../etc"), ("hostname", ""), ("hostname", ["x"]),
    ("cpuCount", "eight"), ("cpuCount", -1), ("cpuCount", True), ("totalMemoryMb", "lots"),
    ("metadata", "not an object"),
])
async def test_register_with_a_bad_field_is_400_naming_it(api, field, value):
    response = await register_raw(api, {**WORKER_BODY, field: value})

    assert response.status == 400
    assert field in (await response.json())["message"]
    assert await total_workers(api) == 0


async def test_register_with_a_malformed_body_is_400(api):
    response = await api.call("POST", "/api/workers/register", token=REGISTRATION_TOKEN, data=b"{oops",
                              headers={"Content-Type": "application/json"})

    assert response.status == 400


async def test_duplicate_worker_id_is_409_and_keeps_the_first_token(api):
    first = await api.register("worker-001")

    response = await register_raw(api, WORKER_BODY)

    body = await response.json()
    assert response.status == 409
    assert (body["error"], body["message"]) == ("Conflict", "Worker already registered")
    assert "token" not in body
    assert (await heartbeat(api, first)).status == 200


@pytest.mark.parametrize("token", [None, "wrong-registration-token", REGISTRATION_TOKEN + "x"])
async def test_register_without_the_registration_token_is_401(api, token):
    response = await register_raw(api, WORKER_BODY, token=token)

    assert response.status == 401
    assert "token" not in await response.json()
    assert await total_workers(api) == 0


async def test_an_admin_jwt_may_register_a_worker(api):
    response = await register_raw(api, WORKER_BODY, token=await api.admin())

    assert response.status == 201
    assert (await heartbeat(api, (await response.json())["token"])).status == 200


async def test_a_user_jwt_may_not_register_a_worker(api):
    user, _ = await api.new_user()
    api.forget_cookies()

    response = await register_raw(api, WORKER_BODY, token=user)

    assert response.status == 403
    assert await total_workers(api) == 0


@sqlite_only
async def test_a_generated_registration_token_is_kept_with_mode_0600_and_works(make_client, config):
    api = Api(await make_client(registration_token=""))
    path = Path(config.data_dir) / "registration_token"
    token = path.read_text().strip()

    response = await register_raw(api, WORKER_BODY, token=token)

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(token) >= 20
    assert response.status == 201
    assert (await register_raw(api, {**WORKER_BODY, "workerId": "w2"}, token=REGISTRATION_TOKEN)).status == 401


async def test_the_registration_token_authenticates_nothing_else(api):
    api.forget_cookies()

    for method, path in [("GET", "/api/jobs/list"), ("GET", "/api/workers/list"), ("GET", "/api/users")]:
        assert (await api.call(method, path, token=REGISTRATION_TOKEN)).status == 401, path
    response = await api.call("POST", "/api/jobs/submit", token=REGISTRATION_TOKEN, json={"command": "id"})
    assert response.status == 401


# -- heartbeat ------------------------------------------------------------------


async def test_heartbeat_answers_server_time_and_next_check_in_in_ms(api, config):
    worker = await api.register()
    before = dt.datetime.now(dt.timezone.utc)

    response = await heartbeat(api, worker, workerId="worker-001", currentJobId=None, jobsCompleted=42)

    body = await response.json()
    assert response.status == 200
    assert body["success"] is True
    assert body["nextCheckIn"] == int(config.heartbeat_interval * 1000) == 30000
    assert ISO_MS.match(body["serverTime"])
    assert abs(parse_iso(body["serverTime"]) - before) < dt.timedelta(seconds=5)
    details = await (await api.call("GET", "/api/workers/worker-001", token=await api.admin())).json()
    assert details["worker"]["jobsCompleted"] == 0  # the server counts jobs done, not the agent
    assert details["worker"]["lastHeartbeat"] == body["serverTime"]


async def test_next_check_in_follows_the_configured_interval(make_client):
    api = Api(await make_client(heartbeat_interval=12.5))
    worker = await api.register()

    body = await (await heartbeat(api, worker)).json()

    assert body["nextCheckIn"] == 12500


async def test_heartbeat_for_another_worker_id_is_403(api):
    mine = await api.register("mine")
    await api.register("theirs")
    admin = await api.admin()
    before = (await (await api.call("GET", "/api/workers/theirs", token=admin)).json())["worker"]

    response = await heartbeat(api, mine, workerId="theirs", jobsCompleted=99)

    assert response.status == 403
    after = (await (await api.call("GET", "/api/workers/theirs", token=admin)).json())["worker"]
    assert after == before


@pytest.mark.parametrize("credentials, expected", [
    ({}, 401), ({"worker": "not-a-worker-token"}, 401), ({"token": "USER"}, 403)])
async def test_heartbeat_needs_a_worker_token(api, credentials, expected):
    if credentials.get("token") == "USER":
        credentials = {"token": (await api.new_user())[0]}
    api.forget_cookies()

    response = await api.call("POST", "/api/workers/heartbeat", json={"status": "idle"}, **credentials)

    assert response.status == expected


# -- list -----------------------------------------------------------------------


async def test_list_shows_the_contract_fields(api):
    await api.register("worker-001", tags=["test", "build"])

    body = await (await api.call("GET", "/api/workers/list", token=await api.admin())).json()

    assert (body["success"], body["total"], body["limit"], body["offset"], body["hasMore"]) == (True, 1, 100, 0, False)
    worker = body["workers"][0]
    assert {"workerId", "hostname", "cpuCount", "status", "lastHeartbeat", "registeredAt", "currentJobId",
            "jobsCompleted"} <= set(worker)
    assert (worker["workerId"], worker["hostname"], worker["cpuCount"], worker["status"], worker["currentJobId"],
            worker["jobsCompleted"]) == ("worker-001", "desktop-pc", 8, "online", None, 0)
    assert "token" not in worker and "tokenHash" not in worker


async def test_a_user_may_list_workers_but_a_worker_and_nobody_may_not(api):
    user, _ = await api.new_user()
    worker = await api.register()
    api.forget_cookies()

    assert (await api.call("GET", "/api/workers/list", token=user)).status == 200
    assert (await api.call("GET", "/api/workers/list", worker=worker)).status == 403
    assert (await api.call("GET", "/api/workers/list")).status == 401


async def test_list_filters_by_tags_all_of_which_must_match(api):
    await api.register("linux-gpu", tags=["linux", "gpu"])
    await api.register("linux", tags=["linux"])
    await api.register("windows", tags=["windows"])
    admin = await api.admin()

    assert await worker_ids(api, admin, tags="linux", sort="workerId") == ["linux", "linux-gpu"]
    assert await worker_ids(api, admin, tags="linux,gpu") == ["linux-gpu"]
    assert await worker_ids(api, admin, tags="gpu,windows") == []
    body = await (await api.call("GET", "/api/workers/list", token=admin, params={"tags": "linux"})).json()
    assert body["total"] == 2


async def test_list_filters_by_status(api, clock):
    admin = await api.admin()
    await api.register("quiet")
    alive = await api.register("alive")
    for _ in range(5):
        clock.advance(20)
        await heartbeat(api, alive)

    assert await worker_ids(api, admin, status="online") == ["alive"]
    assert await worker_ids(api, admin, status="offline") == ["quiet"]
    assert await worker_ids(api, admin, status="error") == []
    assert (await api.call("GET", "/api/workers/list", token=admin, params={"status": "busy"})).status == 400


async def test_worker_that_reports_an_error_is_listed_as_error(api):
    worker = await api.register("broken")

    await heartbeat(api, worker, status="error")

    assert await worker_ids(api, await api.admin(), status="error") == ["broken"]


async def test_list_pages_with_limit_offset_and_has_more(api):
    for n in range(5):
        await api.register(f"w{n}")
    admin = await api.admin()

    pages = []
    for offset in (0, 2, 4):
        response = await api.call("GET", "/api/workers/list", token=admin,
                                  params={"limit": "2", "offset": str(offset), "sort": "workerId"})
        pages.append(await response.json())

    assert [[w["workerId"] for w in p["workers"]] for p in pages] == [["w0", "w1"], ["w2", "w3"], ["w4"]]
    assert [(p["total"], p["limit"], p["offset"], p["hasMore"]) for p in pages] == [
        (5, 2, 0, True), (5, 2, 2, True), (5, 2, 4, False)]
    beyond = await (await api.call("GET", "/api/workers/list", token=admin, params={"offset": "10"})).json()
    assert (beyond["workers"], beyond["total"], beyond["hasMore"]) == ([], 5, False)


@pytest.mark.parametrize("key", ["workerId", "hostname", "registeredAt", "lastHeartbeat"])
async def test_descending_sort_is_exactly_the_reverse(api, key):
    for name in ("c", "a", "b", "e", "d"):
        await api.register(name)  # same hostname for all: the tie-break must follow the direction too
    admin = await api.admin()

    ascending = await worker_ids(api, admin, sort=key)
    descending = await worker_ids(api, admin, sort=f"-{key}")

    assert sorted(ascending) == ["a", "b", "c", "d", "e"]
    assert descending == list(reversed(ascending))
    if key == "workerId":
        assert ascending == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"limit": "-1"},
                                    {"offset": "-1"}, {"offset": "x"}, {"sort": "token_hash"},
                                    {"sort": "id; DROP TABLE workers"}])
async def test_bad_paging_and_sort_are_400(api, params):
    await api.register()

    response = await api.call("GET", "/api/workers/list", token=await api.admin(), params=params)

    assert response.status == 400
    body = await response.json()
    assert body["error"] == "Invalid request"
    assert next(iter(params)) in body["message"]


async def test_limit_of_1000_is_allowed(api):
    response = await api.call("GET", "/api/workers/list", token=await api.admin(), params={"limit": "1000"})

    assert response.status == 200
    assert (await response.json())["limit"] == 1000


# -- offline --------------------------------------------------------------------


async def test_worker_goes_offline_after_three_missed_intervals_and_back_online(api, clock):
    admin = await api.admin()  # the default interval: 30 s
    worker = await api.register()

    async def status() -> str:
        body = await (await api.call("GET", "/api/workers/worker-001", token=admin)).json()
        return body["worker"]["status"]

    clock.advance(89.9)  # late, but not yet three intervals missed
    assert await status() == "online"
    clock.advance(0.2)
    assert await status() == "offline"
    await heartbeat(api, worker)
    assert await status() == "online"


async def test_a_worker_whose_poll_waits_here_stays_online_without_heartbeats(make_client, clock):
    """A get-job waiting on the server is a sign of life, and the heartbeat's answer says so
    (``pollKeepsAlive``): an idle agent skips the heartbeats that would only say "still here".
    A worker that neither polls nor beats still goes offline."""
    api = Api(await make_client(heartbeat_interval=1.0))
    admin = await api.admin()
    polling = await api.register("polling")
    await api.register("silent")
    answer = await (await heartbeat(api, polling)).json()
    assert (answer["nextCheckIn"], answer["pollKeepsAlive"]) == (1000, True)

    poll = asyncio.ensure_future(api.call("GET", "/api/jobs/get-job", worker=polling, params={"wait": "2"}))
    await asyncio.sleep(0.2)
    clock.advance(60)  # twenty intervals without a heartbeat from either
    await asyncio.sleep(1.5)  # the server notes the waiting polls once an interval

    assert await worker_ids(api, admin, status="online") == ["polling"]
    assert await worker_ids(api, admin, status="offline") == ["silent"]
    assert (await poll).status == 204


# -- details --------------------------------------------------------------------


async def test_worker_details_include_memory_and_metadata(api):
    await register_raw(api, WORKER_BODY)

    response = await api.call("GET", "/api/workers/worker-001", token=await api.admin())

    body = await response.json()
    assert response.status == 200
    worker = body["worker"]
    assert (worker["workerId"], worker["hostname"], worker["cpuCount"], worker["totalMemoryMb"]) == (
        "worker-001", "desktop-pc", 8, 16384)
    assert worker["metadata"] == WORKER_BODY["metadata"]
    assert worker["status"] == "online"
    assert ISO_MS.match(worker["registeredAt"]) and ISO_MS.match(worker["lastHeartbeat"])


async def test_worker_details_show_the_current_job(api):
    worker = await api.register()
    job_id = await api.submit(await api.admin())
    await api.claim(worker)

    details = await (await api.call("GET", "/api/workers/worker-001", token=await api.admin())).json()
    listing = await (await api.call("GET", "/api/workers/list", token=await api.admin())).json()

    assert details["worker"]["currentJobId"] == job_id
    assert listing["workers"][0]["currentJobId"] == job_id


async def test_unknown_worker_is_404(api):
    response = await api.call("GET", "/api/workers/nobody", token=await api.admin())

    body = await response.json()
    assert response.status == 404
    assert (body["error"], body["message"]) == ("Not found", "Worker not found")


# -- delete ---------------------------------------------------------------------


async def test_admin_delete_revokes_the_token_at_once_and_requeues_its_job(api):
    admin = await api.admin()
    worker = await api.register()
    job_id = await api.submit(admin)
    assert (await api.claim(worker))["jobId"] == job_id

    response = await api.call("DELETE", "/api/workers/worker-001", token=admin)

    assert response.status == 200
    assert await response.json() == {"success": True, "message": "Worker unregistered"}
    assert (await heartbeat(api, worker)).status == 401
    assert (await api.call("GET", "/api/jobs/get-job", worker=worker)).status == 401
    job = await api.status(admin, job_id)
    assert (job["status"], job["workerId"]) == ("queued", None)
    other = await api.register("worker-002")
    assert (await api.claim(other))["jobId"] == job_id
    assert (await api.call("GET", "/api/workers/worker-001", token=admin)).status == 404
    assert (await api.call("DELETE", "/api/workers/worker-001", token=admin)).status == 404


async def test_a_deleted_workers_waiting_poll_ends_at_once_and_its_next_request_is_refused(api):
    """An idle agent skips heartbeats while its poll waits, so the poll itself must end when an
    admin unregisters the worker: the agent's next request then learns it."""
    worker = await api.register()
    poll = asyncio.ensure_future(api.call("GET", "/api/jobs/get-job", worker=worker, params={"wait": "30"}))
    await asyncio.sleep(0.1)
    started = time.monotonic()

    assert (await api.call("DELETE", "/api/workers/worker-001", token=await api.admin())).status == 200

    assert (await poll).status == 204
    assert time.monotonic() - started < 5
    assert (await api.call("GET", "/api/jobs/get-job", worker=worker)).status == 401


async def test_a_deleted_worker_id_may_register_again(api):
    await api.register()
    await api.call("DELETE", "/api/workers/worker-001", token=await api.admin())

    assert (await register_raw(api, WORKER_BODY)).status == 201


async def test_delete_by_a_user_or_a_worker_is_refused(api):
    user, _ = await api.new_user()
    worker = await api.register()
    api.forget_cookies()

    as_user = await api.call("DELETE", "/api/workers/worker-001", token=user)
    as_worker = await api.call("DELETE", "/api/workers/worker-001", worker=worker)
    anonymous = await api.call("DELETE", "/api/workers/worker-001")

    assert (as_user.status, as_worker.status, anonymous.status) == (403, 403, 401)
    assert (await heartbeat(api, worker)).status == 200


# -- jobs done, counted by the server -----------------------------------------------


async def jobs_done(api: Api, worker_id: str = "worker-001") -> int:
    body = await (await api.call("GET", f"/api/workers/{worker_id}", token=await api.admin())).json()
    return body["worker"]["jobsCompleted"]


async def test_jobs_done_are_counted_as_jobs_complete_and_survive_agent_restarts_and_retention(client, api, clock):
    admin = await api.admin()
    worker = await api.register()
    for exit_code in (0, 3, 0):
        job_id = await api.submit(admin)
        await api.claim(worker)
        await api.call("POST", "/api/jobs/submit-result", worker=worker, json={"jobId": job_id, "exitCode": exit_code})
    assert await jobs_done(api) == 2  # the failed job is not one done
    await heartbeat(api, worker, jobsCompleted=0)  # what an agent that restarted says
    assert await jobs_done(api) == 2

    clock.advance(31 * 86400)  # past DISPATCH_JOB_RETENTION_DAYS
    await heartbeat(api, worker)
    await dispatch._sweep_storage(client.app)

    assert (await (await api.call("GET", "/api/jobs/list", token=admin)).json())["total"] == 0
    assert await jobs_done(api) == 2


# -- a stopping agent's last word -------------------------------------------------


@pytest.mark.parametrize("last_word", ["offline", "stopping"])
async def test_a_stopping_agents_last_heartbeat_shows_it_offline_at_once(client, api, last_word):
    admin = await api.admin()
    worker = await api.register()
    job_id = await api.submit(admin)
    await api.claim(worker)

    assert (await heartbeat(api, worker, status=last_word, runningJobs=[job_id])).status == 200

    details = await (await api.call("GET", "/api/workers/worker-001", token=admin)).json()
    assert (details["worker"]["status"], details["worker"]["activity"]) == ("offline", "offline")
    assert await worker_ids(api, admin, status="offline") == ["worker-001"]
    assert (await (await api.call("GET", "/api/health")).json())["onlineWorkers"] == 0
    await client.app[dispatch.JOBS].sweep()
    job = await api.status(admin, job_id)
    assert (job["status"], job["error"]) == ("queued", "worker worker-001 lost; requeued")  # it moves on now
    await heartbeat(api, worker)  # the agent started again
    assert await worker_ids(api, admin, status="online") == ["worker-001"]


async def test_an_unknown_heartbeat_status_is_400(api):
    worker = await api.register()

    response = await heartbeat(api, worker, status="asleep")

    assert response.status == 400
    assert (await response.json())["details"] == {"field": "status"}


# -- retention ------------------------------------------------------------------


async def test_offline_workers_are_forgotten_past_the_retention_days(make_client, clock):
    api = Api(client := await make_client(worker_retention_days=2))
    admin = await api.admin()
    await api.register("gone-desktop")
    kept = await api.register("kept-desktop")
    clock.advance(86400)
    await heartbeat(api, kept)
    await dispatch._sweep_storage(client.app)
    assert await worker_ids(api, admin, sort="workerId") == ["gone-desktop", "kept-desktop"]  # offline, still kept

    clock.advance(86400 + 60)
    await dispatch._sweep_storage(client.app)

    assert await worker_ids(api, admin) == ["kept-desktop"]
    assert dispatch.Config().worker_retention_days == 7
