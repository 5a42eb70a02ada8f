"""Where jobs run: resources (cpus, memoryMb, gpus), fair share between people, dependencies
(``after``), batch submit, and ``waitingFor``. Through the API of an in-process app; the same
behaviours with real agents are in test_agent_e2e.py."""

from __future__ import annotations

import asyncio
import time

import pytest

import dispatch
from conftest import Api, sqlite_only


async def submit(api: Api, token: str, command: str = "true", **fields) -> str:
    return await api.submit(token, command, **fields)


async def batch(api: Api, token: str, jobs: list[dict]):
    return await api.call("POST", "/api/jobs/submit", token=token, json={"jobs": jobs})


async def finish(api: Api, worker: str, job_id: str, exit_code: int = 0) -> None:
    response = await api.call("POST", "/api/jobs/submit-result", worker=worker,
                              json={"jobId": job_id, "exitCode": exit_code})
    assert response.status == 200, await response.text()


async def claimed_ids(api: Api, worker: str) -> list[str]:
    """Claim until the worker gets nothing; the ids in order."""
    ids = []
    while job := await api.claim(worker):
        ids.append(job["jobId"])
    return ids


async def queued_total(api: Api) -> int:
    response = await api.call("GET", "/api/jobs/list", token=await api.admin(), params={"status": "queued"})
    return (await response.json())["total"]


def assert_400(body: dict, field: str, index: int | None = None) -> None:
    assert body["code"] == "VALIDATION_ERROR", body
    expected = {"field": field} if index is None else {"field": field, "index": index}
    assert body["details"] == expected, body


# -- resources ------------------------------------------------------------------


async def test_a_job_asks_one_cpu_no_memory_and_no_gpu_unless_it_says_more(api):
    admin = await api.admin()
    plain = await submit(api, admin)
    big = await submit(api, admin, cpus=4, memoryMb=2048, gpus=1)

    assert {k: (await api.status(admin, plain))[k] for k in ("cpus", "memoryMb", "gpus")} == {
        "cpus": 1, "memoryMb": 0, "gpus": 0}
    assert {k: (await api.status(admin, big))[k] for k in ("cpus", "memoryMb", "gpus")} == {
        "cpus": 4, "memoryMb": 2048, "gpus": 1}


@pytest.mark.parametrize("field, value", [
    ("cpus", 0), ("cpus", -1), ("cpus", 10**9), ("cpus", 1.5), ("cpus", "2"), ("cpus", True),
    ("memoryMb", -1), ("memoryMb", 2**62), ("gpus", -1), ("gpus", 10**6), ("gpus", [1]),
])
async def test_a_bad_resource_on_submit_is_a_400_naming_the_field(api, field, value):
    response = await api.call("POST", "/api/jobs/submit", token=await api.admin(),
                              json={"command": "make", field: value})

    assert response.status == 400
    assert_400(await response.json(), field)
    assert await queued_total(api) == 0


@pytest.mark.parametrize("field, value", [("cpus", 0), ("memoryMb", -5), ("gpus", 10**9)])
async def test_a_bad_offer_on_register_is_a_400_naming_the_field(api, field, value):
    response = await api.call("POST", "/api/workers/register", token="registration-token-for-tests",
                              json={"workerId": "w", "hostname": "h", field: value})

    assert response.status == 400
    assert_400(await response.json(), field)


async def test_a_worker_offers_what_it_says_else_what_it_has_and_a_heartbeat_may_change_it(api):
    admin = await api.admin()
    await api.register("says", cpus=2, memoryMb=1000, gpus=1)
    has = await api.register("has")  # the contract's cpuCount 8, totalMemoryMb 16384

    listed = await (await api.call("GET", "/api/workers/list", token=admin)).json()
    workers = {w["workerId"]: w for w in listed["workers"]}
    response = await api.call("POST", "/api/workers/heartbeat", worker=has, json={"cpus": 3})
    assert response.status == 200
    changed = (await (await api.call("GET", "/api/workers/has", token=admin)).json())["worker"]

    assert {k: workers["says"][k] for k in ("cpuCount", "cpus", "memoryMb", "gpus")} == {
        "cpuCount": 8, "cpus": 2, "memoryMb": 1000, "gpus": 1}
    assert {k: workers["has"][k] for k in ("cpus", "memoryMb", "gpus")} == {"cpus": 8, "memoryMb": 16384, "gpus": 0}
    assert {k: changed[k] for k in ("cpuCount", "cpus", "memoryMb")} == {"cpuCount": 8, "cpus": 3, "memoryMb": 16384}


async def test_a_4_cpu_worker_never_holds_more_than_4_cpus_of_jobs(api):
    admin = await api.admin()
    worker = await api.register(cpus=4)
    jobs = [await submit(api, admin, f"job {n}", cpus=2) for n in range(3)]

    first = await claimed_ids(api, worker)
    await finish(api, worker, first[0])
    then = await claimed_ids(api, worker)

    assert first == jobs[:2]
    assert then == jobs[2:]


async def test_a_worker_skips_a_job_it_has_no_room_for_and_takes_one_that_fits(api):
    admin = await api.admin()
    worker = await api.register(cpus=4, memoryMb=8000, gpus=0)
    big = await submit(api, admin, "big", cpus=3)
    gpu = await submit(api, admin, "gpu", gpus=1)
    huge = await submit(api, admin, "huge", memoryMb=9000)
    small = await submit(api, admin, "small", cpus=1)
    other = await submit(api, admin, "another big", cpus=3)

    assert await claimed_ids(api, worker) == [big, small]
    assert {(await api.status(admin, j))["status"] for j in (gpu, huge, other)} == {"queued"}


async def test_get_job_tells_the_worker_the_cpus_the_job_asked(api):
    worker = await api.register()
    await submit(api, await api.admin(), cpus=3)

    assert (await api.claim(worker))["cpus"] == 3


async def test_a_job_bigger_than_every_worker_stays_queued_and_says_so(api):
    admin = await api.admin()
    worker = await api.register("small", cpus=4, memoryMb=8192)
    await api.register("smaller", cpus=2, memoryMb=4096)

    response = await api.call("POST", "/api/jobs/submit", token=admin, json={"command": "x", "memoryMb": 65536})
    body = await response.json()

    assert await api.claim(worker) is None
    assert body["estimatedWaitTime"] is None  # no worker can take it
    assert (await api.status(admin, body["jobId"]))["waitingFor"] == (
        "needs 65536 MB of memory; the largest online worker offers 8192")


@pytest.mark.parametrize("fields, waiting_for", [
    ({"cpus": 8}, "needs 8 cpus; the largest online worker offers 4"),
    ({"gpus": 1}, "needs 1 gpus; the largest online worker offers 0"),
    ({"tags": ["gpu", "linux"]}, "no online worker has tags gpu, linux"),
])
async def test_waiting_for_names_what_no_online_worker_has(api, fields, waiting_for):
    admin = await api.admin()
    await api.register(cpus=4, tags=["linux"])

    job_id = await submit(api, admin, **fields)

    assert (await api.status(admin, job_id))["waitingFor"] == waiting_for


async def test_waiting_for_with_no_worker_online(api, clock):
    admin = await api.admin()
    await api.register()
    clock.advance(3600)  # its heartbeats stopped long ago

    response = await api.call("POST", "/api/jobs/submit", token=admin, json={"command": "x"})
    body = await response.json()

    assert body["estimatedWaitTime"] is None
    assert (await api.status(admin, body["jobId"]))["waitingFor"] == "no online worker"


async def test_waiting_for_counts_the_jobs_ahead_and_is_null_once_it_runs(api):
    admin = await api.admin()
    worker = await api.register(cpus=1)
    jobs = [await submit(api, admin, f"job {n}") for n in range(4)]

    lines = [(await api.status(admin, j))["waitingFor"] for j in jobs]
    await api.claim(worker)
    after_one = [(await api.status(admin, j))["waitingFor"] for j in jobs]

    assert lines == ["next in line", "1 job ahead", "2 jobs ahead", "3 jobs ahead"]
    assert after_one == [None, "next in line", "1 job ahead", "2 jobs ahead"]


async def test_a_finished_job_frees_its_worker_for_a_waiting_poll(api):
    admin = await api.admin()
    worker = await api.register(cpus=2)
    first = await submit(api, admin, "first", cpus=2)
    second = await submit(api, admin, "second", cpus=2)
    assert (await api.claim(worker))["jobId"] == first

    waiting = asyncio.ensure_future(api.claim(worker, wait=5))  # another slot of the agent: no room yet
    await asyncio.sleep(0.3)
    assert not waiting.done()
    finished = time.monotonic()
    await finish(api, worker, first)

    assert (await waiting)["jobId"] == second
    assert time.monotonic() - finished < 1


@pytest.mark.slow  # waits out real time (a long poll, a timeout, an interval)
async def test_a_worker_woken_for_a_job_it_has_no_room_for_passes_it_on(api):
    admin = await api.admin()
    busy = await api.register("busy", cpus=2)
    idle = await api.register("idle", cpus=2)
    await submit(api, admin, "running", cpus=2)
    assert await api.claim(busy)

    busy_waits = asyncio.ensure_future(api.claim(busy, wait=1))  # waiting longest: the bell wakes it first
    await asyncio.sleep(0.2)
    idle_waits = asyncio.ensure_future(api.claim(idle, wait=3))
    await asyncio.sleep(0.2)
    submitted = time.monotonic()
    job_id = await submit(api, admin, "new", cpus=2)

    assert (await idle_waits)["jobId"] == job_id
    assert time.monotonic() - submitted < 1
    assert await busy_waits is None


# -- fair share -------------------------------------------------------------------


async def test_one_persons_queue_does_not_hold_up_anothers_job(api):
    admin = await api.admin()
    ann, _ = await api.new_user("ann@example.com")
    bob, _ = await api.new_user("bob@example.com")
    worker = await api.register(cpus=1)
    assert (await batch(api, ann, [{"command": f"render {n}"} for n in range(200)])).status == 201
    bobs = await submit(api, bob, "test")

    first_two = []
    for _ in range(2):
        job = await api.claim(worker)
        first_two.append(job["jobId"])
        await finish(api, worker, job["jobId"])

    assert bobs in first_two
    assert (await api.status(admin, bobs))["status"] == "completed"


async def test_fair_share_fewest_running_first_then_oldest(api):
    ann, _ = await api.new_user("ann@example.com")
    bob, _ = await api.new_user("bob@example.com")
    cid, _ = await api.new_user("cid@example.com")
    worker = await api.register(cpus=100)
    anns = [await submit(api, ann, f"ann {n}") for n in range(3)]
    bobs = [await submit(api, bob, f"bob {n}") for n in range(2)]
    cids = [await submit(api, cid, f"cid {n}") for n in range(1)]
    urgent = await submit(api, ann, "ann urgent", priority="high")

    order = await claimed_ids(api, worker)

    # high first; then bob and cid (none running, never served) before ann (one running), the
    # oldest first; then ann (served before bob) and bob with one running each; then ann's rest
    assert order == [urgent, bobs[0], cids[0], anns[0], bobs[1], anns[1], anns[2]]


async def test_fair_share_between_equals_serves_the_one_served_least_recently(api, clock):
    ann, _ = await api.new_user("ann@example.com")
    bob, _ = await api.new_user("bob@example.com")
    worker = await api.register()
    earlier = await submit(api, ann, "ann's earlier job")
    assert (await api.claim(worker))["jobId"] == earlier
    await finish(api, worker, earlier)
    clock.advance(60)
    bobs = [await submit(api, bob, f"bob {n}") for n in range(2)]
    anns = await submit(api, ann, "ann")
    assert (await api.claim(worker))["jobId"] == bobs[0]  # never served before
    await finish(api, worker, bobs[0])
    clock.advance(60)

    # none running each; ann was served a minute before bob, so her newer job goes before his older one
    assert (await api.claim(worker))["jobId"] == anns


async def test_fair_share_never_puts_a_lower_priority_first(api):
    ann, _ = await api.new_user("ann@example.com")
    bob, _ = await api.new_user("bob@example.com")
    worker = await api.register(cpus=100)
    anns = [await submit(api, ann, f"ann {n}", priority="high") for n in range(3)]
    bobs = await submit(api, bob, "bob", priority="normal")

    assert await claimed_ids(api, worker) == [*anns, bobs]


# -- dependencies -------------------------------------------------------------------


async def test_a_chain_runs_in_order(api):
    admin = await api.admin()
    worker = await api.register(cpus=8)
    a = await submit(api, admin, "a")
    b = await submit(api, admin, "b", after=[a])
    c = await submit(api, admin, "c", after=[b])

    order = []
    for _ in range(3):
        running = await claimed_ids(api, worker)
        assert len(running) == 1, running
        order += running
        await finish(api, worker, running[0])

    assert order == [a, b, c]
    assert (await api.status(admin, b))["after"] == [a]
    assert (await api.status(admin, a))["children"] == [b]


async def test_a_failed_parent_cancels_its_children_and_theirs_naming_their_parent(api):
    admin = await api.admin()
    worker = await api.register()
    a = await submit(api, admin, "a")
    b = await submit(api, admin, "b", after=[a])
    c = await submit(api, admin, "c", after=[b])
    unrelated = await submit(api, admin, "d")
    assert (await api.claim(worker))["jobId"] == a
    ws = await api.client.ws_connect("/api/jobs/stream", headers={"Authorization": f"Bearer {admin}"})

    await finish(api, worker, a, exit_code=1)
    events = [await ws.receive_json(timeout=2) for _ in range(4)]
    events = [e for e in events if e["type"] != "worker.changed"]  # the worker's job ended too
    await ws.close()

    assert [(e["type"], e["jobId"]) for e in events] == [
        ("job.completed", a), ("job.cancelled", b), ("job.cancelled", c)]
    b_status, c_status = await api.status(admin, b), await api.status(admin, c)
    assert (b_status["status"], b_status["error"]) == ("cancelled", f"parent {a} failed")
    assert (c_status["status"], c_status["error"]) == ("cancelled", f"parent {b} cancelled")
    assert (await api.claim(worker))["jobId"] == unrelated


async def test_cancelling_a_parent_cancels_its_children(api):
    admin = await api.admin()
    a = await submit(api, admin, "a")
    b = await submit(api, admin, "b", after=[a])

    response = await api.call("POST", "/api/jobs/cancel", token=admin, json={"jobId": a})

    assert response.status == 200
    assert (await api.status(admin, b))["error"] == f"parent {a} cancelled"


async def test_a_child_waits_for_its_parents_and_says_for_which(api):
    admin = await api.admin()
    worker = await api.register()
    a = await submit(api, admin, "a")
    b = await submit(api, admin, "b")
    child = await submit(api, admin, "child", after=[a, b])

    before = (await api.status(admin, child))["waitingFor"]
    await api.claim(worker)
    running = (await api.status(admin, child))["waitingFor"]

    assert before == f"waiting for {a} (queued) and 1 more"
    assert running == f"waiting for {a} (running) and 1 more"


async def test_a_fan_in_of_100_parents_starts_once_after_the_last(api):
    admin = await api.admin()
    worker = await api.register(cpus=1000)
    response = await batch(api, admin, [{"command": f"part {n}"} for n in range(100)]
                           + [{"command": "merge", "after": [f"#{n}" for n in range(100)]}])
    *parts, merge = (await response.json())["jobIds"]

    assert sorted(await claimed_ids(api, worker)) == sorted(parts)
    for part in parts[:-1]:
        await finish(api, worker, part)
        assert await api.claim(worker) is None
    await finish(api, worker, parts[-1])

    assert (await api.claim(worker))["jobId"] == merge
    assert await api.claim(worker) is None
    assert (await api.status(admin, merge))["attempts"] == 1


async def test_a_completed_parent_wakes_a_waiting_worker_for_its_child(api):
    admin = await api.admin()
    worker = await api.register(cpus=2)
    other = await api.register("other")
    a = await submit(api, admin, "a")
    b = await submit(api, admin, "b", after=[a])
    assert (await api.claim(worker))["jobId"] == a

    waiting = asyncio.ensure_future(api.claim(other, wait=5))
    await asyncio.sleep(0.3)
    await finish(api, worker, a)

    assert (await asyncio.wait_for(waiting, 1))["jobId"] == b


@sqlite_only
async def test_completing_a_job_costs_the_same_with_a_long_queue(api):
    """The completion releases the job's children by their ids: it must not walk the queued jobs
    (it did, through an index on status, 17 times slower at 100,000 queued). Counted in SQLite's
    own steps, not in seconds."""
    admin = await api.admin()
    worker = await api.register()
    connection = api.client.app[dispatch.STORE].engine._conn

    async def steps_to_complete() -> int:
        job_id = await submit(api, admin, "next")
        assert (await api.claim(worker))["jobId"] == job_id  # normal priority: before the low ones
        steps = [0]
        connection.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1) or 0, 1)
        try:
            await finish(api, worker, job_id)
        finally:
            connection.set_progress_handler(None, 1)
        return steps[0]

    short = await steps_to_complete()
    assert (await batch(api, admin, [{"command": "later", "priority": "low"}] * 1000)).status == 201
    assert (await batch(api, admin, [{"command": "later", "priority": "low"}] * 1000)).status == 201
    long = await steps_to_complete()
    assert long < short * 1.5, (short, long)


async def test_after_a_job_that_already_failed_is_a_400(api):
    admin = await api.admin()
    worker = await api.register()
    a = await submit(api, admin, "a")
    await api.claim(worker)
    await finish(api, worker, a, exit_code=2)

    response = await api.call("POST", "/api/jobs/submit", token=admin, json={"command": "b", "after": [a]})

    assert response.status == 400
    assert_400(await response.json(), "after")


@pytest.mark.parametrize("after", [
    ["job-does-not-exist"], "job-1", [1], [""], ["#0"], [f"job-{n}" for n in range(1001)],
])
async def test_a_bad_after_is_a_400_naming_the_field(api, after):
    response = await api.call("POST", "/api/jobs/submit", token=await api.admin(),
                              json={"command": "x", "after": after})

    assert response.status == 400
    assert_400(await response.json(), "after")
    assert await queued_total(api) == 0


async def test_a_user_may_not_wait_for_another_users_job_but_an_admin_may(api):
    admin = await api.admin()
    ann, _ = await api.new_user("ann@example.com")
    bob, _ = await api.new_user("bob@example.com")
    anns = await submit(api, ann, "ann's build")

    refused = await api.call("POST", "/api/jobs/submit", token=bob, json={"command": "x", "after": [anns]})
    allowed = await api.call("POST", "/api/jobs/submit", token=admin, json={"command": "x", "after": [anns]})

    assert refused.status == 400
    assert_400(await refused.json(), "after")
    assert (await refused.json())["message"] == f"after: {anns} is not a job of yours"  # the same as for no job
    assert allowed.status == 201


# -- batch submit ---------------------------------------------------------------------


async def test_a_batch_is_queued_in_order_and_answers_the_ids(api):
    admin = await api.admin()
    worker = await api.register(cpus=100)

    response = await batch(api, admin, [{"command": f"step {n}", "timeout": 60} for n in range(5)])
    body = await response.json()

    assert response.status == 201
    assert set(body) == {"success", "jobIds"} and body["success"] is True
    assert await claimed_ids(api, worker) == body["jobIds"]
    assert [(await api.status(admin, j))["command"] for j in body["jobIds"]] == [f"step {n}" for n in range(5)]


async def test_a_batch_with_one_bad_item_queues_nothing_and_names_the_item(api):
    admin = await api.admin()
    items = [{"command": "ok"}] * 3 + [{"timeout": 5}] + [{"command": "ok"}]

    response = await batch(api, admin, items)
    body = await response.json()

    assert response.status == 400
    assert_400(body, "command", index=3)
    assert body["message"] == "jobs[3]: command is required"
    assert await queued_total(api) == 0


@pytest.mark.parametrize("items, field, index", [
    ([], "jobs", None),
    ([{"command": "x"}] * 1001, "jobs", None),
    ("not a list", "jobs", None),
    ([{"command": "x"}, "not an object"], "jobs", 1),
    ([{"command": "x", "after": ["#0"]}], "after", 0),  # itself
    ([{"command": "x", "after": ["#1"]}, {"command": "y", "after": ["#0"]}], "after", 0),  # a cycle
    ([{"command": "x"}, {"command": "y", "after": ["#7"]}], "after", 1),
    ([{"command": "x"}, {"command": "y", "cpus": -2}], "cpus", 1),
    ([{"command": "x"}, {"command": "y", "fileUrl": "/uploads/file-" + "0" * 32 + "/p.zip"}], "fileUrl", 1),
])
async def test_a_bad_batch_is_a_400_naming_the_field_and_item(api, items, field, index):
    response = await batch(api, await api.admin(), items)

    assert response.status == 400
    assert_400(await response.json(), field, index)
    assert await queued_total(api) == 0


async def test_a_batch_item_may_wait_for_an_earlier_item_and_an_existing_job(api):
    admin = await api.admin()
    worker = await api.register(cpus=100)
    existing = await submit(api, admin, "existing")

    response = await batch(api, admin, [{"command": "build"},
                                        {"command": "test", "after": ["#0", existing]},
                                        {"command": "package", "after": ["#1", "#01"]}])
    build, test, package = (await response.json())["jobIds"]

    assert sorted(await claimed_ids(api, worker)) == sorted([existing, build])
    assert (await api.status(admin, test))["after"] == [build, existing]
    assert (await api.status(admin, package))["after"] == [test]


async def test_the_single_submit_answer_is_unchanged(api):
    await api.register()

    response = await api.call("POST", "/api/jobs/submit", token=await api.admin(), json={"command": "x"})

    assert response.status == 201
    assert set(await response.json()) == {"success", "jobId", "status", "createdAt", "estimatedWaitTime"}
