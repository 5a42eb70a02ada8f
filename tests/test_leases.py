"""The job life cycle's clocks and leases: a claim whose answer never reached its agent comes
back, a slow input download is not a timeout, a timeout ends the same way whoever notices it,
output offsets join history and live output, and the worker can check its input. Time moves by
the injected clock, never by sleeping."""

from __future__ import annotations

import sqlite3

import pytest

import dispatch
from conftest import Api, make_zip, old_database


async def heartbeat(api: Api, worker: str, **fields) -> None:
    response = await api.call("POST", "/api/workers/heartbeat", worker=worker, json={"status": "idle", **fields})
    assert response.status == 200, await response.text()


async def claim(api: Api, worker: str, run: str, poll: int) -> dict:
    response = await api.call("GET", "/api/jobs/get-job", worker=worker, params={"run": run, "poll": str(poll)})
    assert response.status == 200, await response.text()
    return (await response.json())["job"]


async def output(api: Api, worker: str, job: dict, data: str = "", **fields) -> int:
    response = await api.call("POST", "/api/jobs/stream-output", worker=worker, json={
        "jobId": job["jobId"], "attempt": job["attempt"], "type": "stdout", "data": data, **fields})
    return response.status


# -- leases: a claim answer that never arrived --------------------------------------------------


async def test_a_claim_whose_answer_was_lost_is_back_at_the_next_heartbeat_at_no_cost(api):
    token = await api.admin()
    job_id = await api.submit(token, maxAttempts=1)
    worker = await api.register()
    lost = await claim(api, worker, "run-a", 1)  # the agent never saw this answer

    await heartbeat(api, worker, runningJobs=[], run="run-a", polled=0)  # poll 1 may still be on its way
    assert (await api.status(token, job_id))["status"] == "running"
    await heartbeat(api, worker, runningJobs=[], run="run-a", polled=1)  # poll 1 has ended without a job

    job = await api.status(token, job_id)
    assert (job["status"], job["error"]) == ("queued", "worker worker-001 no longer runs attempt 1; requeued")
    again = await claim(api, worker, "run-a", 2)
    assert (again["jobId"], again["attempt"]) == (job_id, 2)  # maxAttempts=1, yet it runs again
    assert await output(api, worker, lost) == 409  # the lost attempt is fenced off


async def test_a_listed_job_and_a_claim_still_in_flight_are_left_alone(api):
    token = await api.admin()
    listed, in_flight = await api.submit(token, "listed"), await api.submit(token, "in flight")
    worker = await api.register()
    await claim(api, worker, "run-a", 1)
    await claim(api, worker, "run-a", 2)

    await heartbeat(api, worker, runningJobs=[listed], run="run-a", polled=1)

    assert [(await api.status(token, j))["status"] for j in (listed, in_flight)] == ["running", "running"]


async def test_jobs_claimed_by_an_earlier_run_of_the_agent_come_back_at_its_first_heartbeat(api):
    token = await api.admin()
    job_id = await api.submit(token)
    worker = await api.register()
    await claim(api, worker, "before-restart", 7)

    await heartbeat(api, worker, runningJobs=[], run="after-restart", polled=0)

    assert (await api.status(token, job_id))["status"] == "queued"


@pytest.mark.parametrize("fields, field", [
    ({"run": "has space"}, "run"), ({"run": 5}, "run"), ({"polled": -1}, "polled"), ({"polled": "1"}, "polled"),
])
async def test_a_bad_lease_field_is_400_and_requeues_nothing(api, fields, field):
    token = await api.admin()
    job_id = await api.submit(token)
    worker = await api.register()
    await claim(api, worker, "run-a", 1)

    response = await api.call("POST", "/api/workers/heartbeat", worker=worker,
                              json={"runningJobs": [], "run": "run-a", "polled": 1, **fields})

    assert response.status == 400
    assert (await response.json())["details"]["field"] == field
    assert (await api.status(token, job_id))["status"] == "running"


@pytest.mark.parametrize("params", [{"run": "a b"}, {"poll": "0"}, {"poll": "x"}])
async def test_a_bad_run_or_poll_on_get_job_is_400_and_claims_nothing(api, params):
    token = await api.admin()
    job_id = await api.submit(token)
    worker = await api.register()

    response = await api.call("GET", "/api/jobs/get-job", worker=worker, params=params)

    assert response.status == 400
    assert (await api.status(token, job_id))["status"] == "queued"


# -- one request per job: the next job comes with the result ------------------------------------


async def result(api: Api, worker: str, job: dict, params: dict | None = None):
    return await api.call("POST", "/api/jobs/submit-result", worker=worker, params=params,
                          json={"jobId": job["jobId"], "attempt": job["attempt"], "exitCode": 0})


async def test_a_result_with_next_hands_over_the_next_job_as_a_get_job_poll(api):
    token = await api.admin()
    first_id, second_id = await api.submit(token, "first"), await api.submit(token, "second")
    worker = await api.register()
    first = await claim(api, worker, "run-a", 1)

    response = await result(api, worker, first, {"next": "1", "wait": "0", "run": "run-a", "poll": "2"})

    assert response.status == 200
    answer = await response.json()
    nxt = answer.pop("next")
    assert answer == {"success": True, "message": "Result saved", "jobId": first_id}
    assert (nxt["jobId"], nxt["command"], nxt["attempt"]) == (second_id, "second", 1)
    assert nxt.keys() == first.keys()  # get-job's shape
    assert [(await api.status(token, j))["status"] for j in (first_id, second_id)] == ["completed", "running"]
    await heartbeat(api, worker, runningJobs=[], run="run-a", polled=1)  # the claim was poll 2: still in flight
    assert (await api.status(token, second_id))["status"] == "running"
    await heartbeat(api, worker, runningJobs=[], run="run-a", polled=2)  # poll 2 ended without it: a lost answer
    assert (await api.status(token, second_id))["status"] == "queued"


async def test_a_result_with_next_and_nothing_to_hand_over_says_next_null(api):
    token = await api.admin()
    await api.submit(token, "only")
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)

    response = await result(api, worker, job, {"next": "1", "run": "run-a", "poll": "2"})

    assert response.status == 200
    assert (await response.json())["next"] is None


async def test_a_result_without_next_is_the_contracts_answer_and_claims_nothing(api):
    token = await api.admin()
    await api.submit(token, "first")
    queued_id = await api.submit(token, "second")
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)

    response = await result(api, worker, job)

    assert await response.json() == {"success": True, "message": "Result saved", "jobId": job["jobId"]}
    assert (await api.status(token, queued_id))["status"] == "queued"


async def test_a_stale_result_with_next_is_refused_and_claims_nothing(api):
    token = await api.admin()
    job_id = await api.submit(token, "first")
    other_id = await api.submit(token, "second")
    worker = await api.register()
    stale = await claim(api, worker, "run-a", 1)
    await heartbeat(api, worker, runningJobs=[], run="run-a", polled=1)  # lost: requeued, attempt 1 fenced off

    response = await result(api, worker, stale, {"next": "1", "run": "run-a", "poll": "2"})

    assert response.status == 409
    assert [(await api.status(token, j))["status"] for j in (job_id, other_id)] == ["queued", "queued"]


@pytest.mark.parametrize("params", [{"next": "2"}, {"next": "yes"}, {"next": "1", "poll": "0"},
                                    {"next": "1", "run": "a b"}, {"next": "1", "wait": "-1"}])
async def test_a_bad_next_or_poll_on_submit_result_is_400_and_saves_nothing(api, params):
    token = await api.admin()
    job_id = await api.submit(token)
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)

    response = await result(api, worker, job, params)

    assert response.status == 400
    assert (await api.status(token, job_id))["status"] == "running"


# -- one timeout clock ------------------------------------------------------------------------


async def test_a_slow_input_download_is_covered_by_the_lease_not_the_timeout(client, api, clock):
    token = await api.admin()
    job_id = await api.submit(token, timeout=5)
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)
    jobs = client.app[dispatch.JOBS]

    for _ in range(10):  # ten minutes of fetching the input, heartbeats listing the job
        clock.advance(60)
        await heartbeat(api, worker, runningJobs=[job_id], run="run-a", polled=1)
        await jobs.sweep()
    assert (await api.status(token, job_id))["status"] == "running"

    assert await output(api, worker, job, runningFor=1.0) == 200  # the command started a second ago
    clock.advance(4 + jobs.timeout_grace - 1)
    await heartbeat(api, worker, runningJobs=[job_id], run="run-a", polled=1)
    await jobs.sweep()
    assert (await api.status(token, job_id))["status"] == "running"
    clock.advance(2)
    await heartbeat(api, worker, runningJobs=[job_id], run="run-a", polled=1)
    await jobs.sweep()

    final = await api.status(token, job_id)
    assert (final["status"], final["exitCode"], final["error"]) == (
        "failed", 124, "timed out after 5 s (no result from the worker)")


async def test_a_client_that_names_no_run_is_timed_from_its_claim(client, api, clock):
    token = await api.admin()
    job_id = await api.submit(token, timeout=5)
    worker = await api.register()
    await api.claim(worker)
    jobs = client.app[dispatch.JOBS]

    clock.advance(5 + jobs.timeout_grace + 1)
    await heartbeat(api, worker)
    await jobs.sweep()

    assert (await api.status(token, job_id))["exitCode"] == 124


async def test_a_timeout_ends_the_same_way_whichever_side_notices_it(client, api, clock):
    """Noticed by the server, then reported by the agent: both exit 124, both spend a retry."""
    token = await api.admin()
    job_id = await api.submit(token, timeout=5, retries=1)
    worker = await api.register()
    jobs = client.app[dispatch.JOBS]

    first = await claim(api, worker, "run-a", 1)
    assert await output(api, worker, first, runningFor=0.0) == 200
    clock.advance(5 + jobs.timeout_grace + 1)
    await heartbeat(api, worker, runningJobs=[job_id], run="run-a", polled=1)
    await jobs.sweep()
    by_server = await api.status(token, job_id)
    assert (by_server["status"], by_server["exitCode"]) == ("queued", 124)
    assert by_server["error"] == "attempt 1: timed out after 5 s (no result from the worker); retrying"

    second = await claim(api, worker, "run-a", 2)
    response = await api.call("POST", "/api/jobs/submit-result", worker=worker, json={
        "jobId": job_id, "attempt": second["attempt"], "exitCode": 124, "runningFor": 5.1,
        "error": "timed out after 5 s; the process tree was killed"})
    assert response.status == 200
    by_agent = await api.status(token, job_id)
    assert (by_agent["status"], by_agent["exitCode"], by_agent["attempts"]) == ("failed", 124, 2)
    assert by_agent["error"].startswith("timed out after 5 s")
    assert await api.claim(worker) is None  # the one retry was spent by the server's timeout


@pytest.mark.parametrize("running_for", [-1, "3", True, 10**9])
async def test_a_bad_running_for_is_400(api, running_for):
    token = await api.admin()
    await api.submit(token)
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)

    assert await output(api, worker, job, runningFor=running_for) == 400


def test_the_outcome_rule_is_one_pure_function():
    job = {"attempt": 2, "worker_id": "w", "losses": 0, "max_attempts": 2, "retried": 0, "retries": 0,
           "timeout": 9}
    decide, E = dispatch.decide_outcome, dispatch.Ending

    assert decide(job, E.EXITED, 0).status == "completed"
    assert (decide(job, E.EXITED, 3).status, decide(job, E.EXITED, 3).error) == ("failed", "exited with code 3")
    assert decide(job, E.TIMED_OUT).exit_code == 124
    assert decide({**job, "retries": 1}, E.TIMED_OUT).spends_retry
    lost_once = decide(job, E.LOST)
    assert (lost_once.status, lost_once.counts_loss) == ("queued", True)
    assert decide({**job, "losses": 1}, E.LOST).status == "failed"
    returned = decide({**job, "losses": 1}, E.RETURNED)
    assert (returned.status, returned.counts_loss, returned.spends_retry) == ("queued", False, False)
    assert decide(job, E.CANCELLED, error="by me").status == "cancelled"


# -- exact output for viewers -------------------------------------------------------------------


async def test_output_events_and_status_carry_offsets_per_stream(api):
    token = await api.admin()
    job_id = await api.submit(token)
    worker = await api.register()
    job = await claim(api, worker, "run-a", 1)
    async with api.client.ws_connect(f"/api/jobs/stream?jobId={job_id}",
                                     headers={"Authorization": f"Bearer {token}"}) as ws:
        assert await output(api, worker, job, "abc") == 200
        assert await output(api, worker, job, "err", type="stderr") == 200
        assert await output(api, worker, job, "de") == 200
        events = [await ws.receive_json(timeout=5) for _ in range(3)]

    assert [(e["stream"], e["offset"], e["data"], e["attempt"]) for e in events] == [
        ("stdout", 0, "abc", 1), ("stderr", 0, "err", 1), ("stdout", 3, "de", 1)]
    status = await api.status(token, job_id)
    assert (status["stdout"], status["stdoutChars"], status["stderrChars"]) == ("abcde", 5, 3)


# -- inputs the agent can verify ------------------------------------------------------------------


async def test_get_job_names_the_input_file_and_its_sha256(api):
    token = await api.admin()
    upload = await api.upload(token, make_zip({"a.txt": "a"}))
    await api.submit(token, fileUrl=upload["url"])

    job = await api.claim(await api.register())

    assert (job["fileId"], job["sha256"]) == (upload["fileId"], upload["sha256"])
    assert job["fileUrl"].endswith(upload["url"])


# -- the schema moves forward -----------------------------------------------------------------------


async def test_a_version_1_database_is_migrated_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "dispatch.db"
    db = old_database(path, "a7c33fa")
    db.execute("INSERT INTO jobs (id, seq, command, timeout, priority, priority_rank, status, submitted_by,"
               " created_at) VALUES ('job-old', 1, 'make', 60, 'normal', 1, 'queued', 'u', '2026-01-01T00:00:00.000Z')")
    db.execute("INSERT INTO workers (id, token_hash, hostname, cpu_count, registered_at, last_heartbeat)"
               " VALUES ('w', 'hash', 'h', 4, '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')")
    db.commit()
    db.close()

    store = await dispatch.Store.open(path)
    try:
        job = await store.job_by_id("job-old")
        claimed = await store.claim_next_job("w", "[]", "run-a", 1)
        worker = await store.worker_by_id("w", "2026-01-01T00:00:00.000Z")
    finally:
        await store.close()

    assert (job["command"], job["losses"], claimed["id"], claimed["claim_run"]) == ("make", 0, "job-old", "run-a")
    assert (claimed["cpus"], worker["cpus"], worker["memory_mb"]) == (1, 4, 0)  # it offers what it has
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == dispatch.SCHEMA_VERSION
